//! Rule files: the language operators write to say what happens to every event.
//!
//! - [`ast`]: the syntax tree, with a span on every node.
//! - [`parser`]: source text → [`ast::RuleFile`].
//! - [`diag`]: errors rendered as `FILE:LINE:COL: message` with the source line and a caret.
//! - [`compile`]: AST → a tree of stream [`nodes`], validating every name and argument.
//! - [`engine`]: runs the tree as the server's `Streams`.
//! - [`reload`]: `SIGHUP` swaps in an edited rule file, keeping unchanged stages' state.
//! - [`persist`]: the stages' state written to `--data-dir` and read back at start.
//! - [`testing`]: `vigil test`, the `test "…" { … }` blocks on a virtual clock.
//! - [`junit`]: `vigil test --junit`, its results as a JUnit XML report.

pub mod ast;
pub mod compile;
pub mod diag;
pub mod engine;
pub mod junit;
pub mod nodes;
pub mod parser;
pub mod persist;
pub mod reload;
pub mod testing;

pub use compile::{Compiled, EnvPolicy};
pub use diag::Diagnostic;

use crate::files;

/// The rules `vigil run` uses when given no `--rules`: index everything.
pub const DEFAULT_RULES: &str = include_str!("../../rules/default.vigil");
pub const DEFAULT_RULES_NAME: &str = "<embedded rules/default.vigil>";

/// The most bytes a rule file may have. Real ones are kilobytes; a million
/// statements are ~50 MB. What matters is that a path to `/dev/zero`, or a
/// file still being written, cannot make vigil read without end.
pub const MAX_RULE_FILE: u64 = 64 * 1024 * 1024;

/// The most errors of a file that parses that are rendered, and the most
/// warnings of one that compiles (after them, where the rest start and how
/// many there are), as the parser stops after 20 syntax errors: rendering
/// one reads its whole line, so a long line of bad items would cost its
/// length once per item.
pub const MAX_ERRORS: usize = 20;

/// Why a rule file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    File(#[from] files::ReadError),
    #[error("not UTF-8 text: {0}")]
    NotText(#[from] std::string::FromUtf8Error),
}

impl ReadError {
    /// The error as `vigil check` prints it: text that is not UTF-8 at the
    /// line and column of its first bad byte, else `FILE: cannot read: why`.
    pub fn render(&self, name: &str) -> String {
        match self {
            ReadError::NotText(e) => {
                let at = e.utf8_error().valid_up_to();
                let message = format!("not UTF-8 text: byte {:#04x}", e.as_bytes()[at]);
                Diagnostic::new(at..at, message)
                    .render(name, &String::from_utf8_lossy(e.as_bytes()))
            }
            ReadError::File(e) => format!("{name}: cannot read: {e}"),
        }
    }
}

/// Reads a rule file: a regular file (never opened otherwise: opening a
/// FIFO with no writer would block), of at most [`MAX_RULE_FILE`] bytes.
pub fn read_file(path: &std::path::Path) -> Result<String, ReadError> {
    let bytes = files::read(path, MAX_RULE_FILE, "a rule file")?;
    Ok(String::from_utf8(bytes)?)
}

/// A rule file's text as it was compiled. The running rules keep it, so their
/// stream state is saved with the text that gives it meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleText {
    pub name: String,
    pub text: String,
}

/// A rule file parsed and compiled, its test blocks checked too, or every
/// problem found, rendered for humans.
pub fn load(name: &str, source: &str, env: EnvPolicy) -> Result<(ast::RuleFile, Compiled), String> {
    let file = parser::parse(source).map_err(|d| render_all(&d, name, source))?;
    let compiled = compile::compile(&file, env);
    let mut errors = compiled.as_ref().err().cloned().unwrap_or_default();
    errors.extend(testing::check_tests(&file));
    errors.sort_by_key(|d| d.span.start);
    match compiled {
        Ok(mut compiled) if errors.is_empty() => {
            bound(&mut compiled.warnings, "warnings");
            Ok((file, compiled))
        }
        _ => {
            bound(&mut errors, "errors");
            Err(render_all(&errors, name, source))
        }
    }
}

/// Keeps the first [`MAX_ERRORS`] of `found` (in the order found),
/// then says where the rest start and how many there are.
fn bound(found: &mut Vec<Diagnostic>, what: &str) {
    if let Some(next) = found.get(MAX_ERRORS) {
        let (at, more) = (next.span.start, found.len() - MAX_ERRORS);
        found.truncate(MAX_ERRORS);
        found.push(Diagnostic::new(
            at..at,
            format!("stopped after {MAX_ERRORS} {what}: {more} more not shown"),
        ));
    }
}

/// Logs the warnings of rules about to run (what `vigil check` prints as
/// `warning:`), so rules started or reloaded unchecked still say them.
pub fn log_warnings(compiled: &Compiled, name: &str, source: &str) {
    if !compiled.warnings.is_empty() {
        let warnings = render_all(&compiled.warnings, name, source);
        tracing::warn!(rules = %name, %warnings, "The rules run, with warnings.");
    }
}

pub fn render_all(diagnostics: &[Diagnostic], name: &str, source: &str) -> String {
    diagnostics
        .iter()
        .map(|d| d.render(name, source))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `by(hsot)` groups by an attribute events lack: all in one group;
    /// `changed(field: sate)` watches one: nothing changes; `with(hots: …)`
    /// sets an attribute, not the host.
    #[test]
    fn a_field_spelled_like_an_event_field_is_warned_of() {
        let source = "streams {\n  by(hsot, env, servce, host) { index }\n  \
                      changed(field: sate) { index }\n  changed(field: env) { index }\n  \
                      with(hots: \"a\", env: \"b\", tgas: \"c\", tiem: 1) { index }\n  \
                      default(stat: \"ok\") { index }\n  \
                      stable(interval: 5s, field: metirc) { index }\n}\n";
        let (_, compiled) = load("w.vigil", source, EnvPolicy::Strict).unwrap();
        let warnings: Vec<_> = (compiled.warnings.iter())
            .map(|w| (&source[w.span.clone()], w.hint.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(
            warnings,
            [
                (
                    "hsot",
                    "did you mean `host`? Events without the attribute all go to one group"
                ),
                (
                    "servce",
                    "did you mean `service`? Events without the attribute all go to one group"
                ),
                (
                    "sate",
                    "did you mean `state`? Events without the attribute never change"
                ),
                (
                    "hots",
                    "did you mean `host`? As written, it sets the attribute `hots`"
                ),
                (
                    "tgas",
                    "did you mean `tags`? As written, it sets the attribute `tgas`"
                ),
                (
                    "stat",
                    "did you mean `state`? As written, it sets the attribute `stat`"
                ),
                (
                    "metirc",
                    "did you mean `metric`? Events without the attribute all look alike: it never changes"
                ),
            ]
        );
    }

    /// A Riemann stream vigil lacks is named as such, not matched to a
    /// stage of a like name: `smap` is not `tap`.
    #[test]
    fn a_riemann_stream_vigil_lacks_is_not_taken_for_a_like_named_stage() {
        let source = "streams {\n  smap { index }\n}\n";
        let Err(error) = load("m.vigil", source, EnvPolicy::Strict) else {
            panic!("`smap` compiled");
        };
        assert!(error.contains("unknown stream `smap`"), "{error}");
        assert!(!error.contains("did you mean"), "{error}");
        assert!(
            error.contains("Riemann's stream of that name has no vigil stage"),
            "{error}"
        );
    }

    /// `publish` takes one topic name, checked where written: not empty,
    /// of the allowed characters, not the index's own, and no block.
    #[test]
    fn publish_topics_are_checked_where_written() {
        let source = "streams {\n  publish(\"\")\n  publish(\"a/b\")\n  publish(index)\n  \
                      publish(5)\n  publish(\"x\") { index }\n  publish\n  publish(\"ok-1.a_b\")\n}\n";
        let Err(error) = load("p.vigil", source, EnvPolicy::Strict) else {
            panic!("bad topics compiled");
        };
        for expected in [
            "p.vigil:2:11: a topic's name is empty",
            "p.vigil:3:11: a topic's name is ASCII letters, digits, `_`, `-` and `.`, not '/'",
            "p.vigil:4:11: `index` is the index's own topic",
            "p.vigil:5:11: expected a topic's name",
            "p.vigil:6:16: `publish` takes no block: events end here",
            "p.vigil:7:3: `publish` needs `topic`",
        ] {
            assert!(error.contains(expected), "{expected} in\n{error}");
        }
        assert!(!error.contains(":8:"), "{error}");
        let source = "streams {\n  publish(\"alerts\")\n  publish(pages)\n}\n";
        load("p.vigil", source, EnvPolicy::Strict).expect("good topics compile");
    }

    /// `vigil check` points at each bad argument of `untag`, `counter` and
    /// `runs`, and says what it takes.
    #[test]
    fn bad_arguments_of_untag_counter_and_runs_are_refused_where_written() {
        let source = "streams {\n  untag(5) { index }\n  counter(\"x\") { index }\n  \
                      runs(0, state) { index }\n  runs(field: host) { index }\n  \
                      counter(start: 1) { index }\n  runs(2, state)\n  \
                      runs(2, field: sate) { index }\n}\n";
        let Err(error) = load("a.vigil", source, EnvPolicy::Strict) else {
            panic!("bad arguments compiled");
        };
        for expected in [
            "a.vigil:2:9: expected a tag or a list of tags, found the number 5",
            "a.vigil:3:11: expected a number, found a string",
            "a.vigil:4:8: expected a whole number of at least 1, found the number 0",
            "a.vigil:5:3: `runs` needs `count`",
            "a.vigil:6:11: unknown parameter `start` for `counter`",
            "a.vigil:7:3: `runs` needs a block of streams to pass events to",
        ] {
            assert!(error.contains(expected), "{expected} in\n{error}");
        }
        assert!(!error.contains("sate"), "a warning, not an error:\n{error}");
        let source = "streams {\n  runs(2, field: sate) { index }\n}\n";
        let (_, compiled) = load("w.vigil", source, EnvPolicy::Strict).unwrap();
        assert_eq!(
            compiled.warnings[0].hint.as_deref(),
            Some(
                "did you mean `state`? Events without the attribute all look alike: one run of them"
            )
        );
    }

    /// `vigil check` points at each bad argument of `predict_linear`, and
    /// says what it takes: a window of at least two events, a duration.
    #[test]
    fn bad_arguments_of_predict_linear_are_refused_where_written() {
        let source = "streams {\n  predict_linear(1, 10s) { index }\n  \
                      predict_linear(10, 5) { index }\n  predict_linear(10) { index }\n  \
                      predict_linear(2.5, 1m) { index }\n  predict_linear(3, 1m)\n}\n";
        let Err(error) = load("a.vigil", source, EnvPolicy::Strict) else {
            panic!("bad arguments compiled");
        };
        for expected in [
            "a.vigil:2:18: expected a whole number of at least 2 (a line needs two points), found the number 1",
            "a.vigil:3:22: expected a duration such as 500ms, 5s, 2m or 1h, found the number 5",
            "a.vigil:4:3: `predict_linear` needs `ahead`",
            "a.vigil:5:18: expected a whole number of at least 2 (a line needs two points), found the number 2.5",
            "a.vigil:6:3: `predict_linear` needs a block of streams to pass events to",
        ] {
            assert!(error.contains(expected), "{expected} in\n{error}");
        }
    }

    /// `vigil check` points at a tag test without a tag, with an empty
    /// list, or with what is not a tag, and at an `else` after any other
    /// stream.
    #[test]
    fn tag_tests_without_a_tag_or_with_a_bad_one_are_refused_where_written() {
        let source = "streams {\n  tagged { index }\n  tagged_all() { index }\n  \
                      tagged_any([]) { index }\n  tagged(\"a\", 1) { index }\n  \
                      tagged_all([\"a\", x]) { index }\n  tagged(tag: \"a\") { index }\n  \
                      tagged(\"a\")\n  tag(\"a\") { index } else { drop }\n}\n";
        let Err(error) = load("t.vigil", source, EnvPolicy::Strict) else {
            panic!("bad tag tests compiled");
        };
        for expected in [
            "t.vigil:2:3: `tagged` needs a tag",
            "hint: write `tagged(\"a\") { … }` or `tagged(\"a\", \"b\") { … }`",
            "t.vigil:3:3: `tagged_all` needs a tag",
            "t.vigil:4:14: `tagged_any` needs a tag, not an empty list",
            "t.vigil:5:15: expected a tag or a list of tags, found the number 1",
            "t.vigil:6:20: expected a string, found a name",
            "t.vigil:7:10: unknown parameter `tag` for `tagged`",
            "t.vigil:8:3: `tagged` needs a block of streams to pass events to",
            "t.vigil:9:27: `else` only follows `where`, `split` and the `tagged` streams, not `tag`",
        ] {
            assert!(error.contains(expected), "{expected} in\n{error}");
        }
    }

    /// Every bad item of a tag list is reported, as every bad argument is,
    /// not only the first: in the tag tests, `tag`, `untag` and `with(tags: …)`.
    #[test]
    fn every_bad_item_of_a_tag_list_is_reported() {
        let source = "streams {\n  tagged([\"a\", 1, x, [\"b\"]]) { index }\n  \
                      tagged_any(\"a\", [2, \"b\", null]) { index }\n  \
                      untag([3, 4]) { index }\n  with(tags: [true, \"c\", 5]) { index }\n}\n";
        let Err(error) = load("t.vigil", source, EnvPolicy::Strict) else {
            panic!("bad tag lists compiled");
        };
        let found: Vec<&str> = (error.lines())
            .filter(|l| l.starts_with("t.vigil:"))
            .collect();
        assert_eq!(
            found,
            [
                "t.vigil:2:16: expected a string, found the number 1",
                "t.vigil:2:19: expected a string, found a name",
                "t.vigil:2:22: expected a string, found a list",
                "t.vigil:3:20: expected a string, found the number 2",
                "t.vigil:3:28: expected a string, found null",
                "t.vigil:4:10: expected a string, found the number 3",
                "t.vigil:4:13: expected a string, found the number 4",
                "t.vigil:5:15: expected a string, found a boolean",
                "t.vigil:5:26: expected a string, found the number 5",
            ],
            "{error}"
        );
    }

    /// However many errors a file has, at most [`MAX_ERRORS`] are rendered,
    /// then where the rest start and how many there are: rendering one
    /// reads its whole line, so a long line of bad items (a list of 16 000
    /// took 29 s) would cost its length once per item.
    #[test]
    fn the_errors_rendered_are_bounded() {
        let items = vec!["1"; 1000].join(", ");
        let source =
            format!("streams {{\n  tag([{items}]) {{ index }}\n  over(\"a\") {{ index }}\n}}\n");
        let Err(error) = load("t.vigil", &source, EnvPolicy::Strict) else {
            panic!("bad tag lists compiled");
        };
        let found: Vec<&str> = (error.lines())
            .filter(|l| l.starts_with("t.vigil:"))
            .collect();
        assert_eq!(found.len(), MAX_ERRORS + 1);
        assert_eq!(
            found[MAX_ERRORS - 1],
            "t.vigil:2:65: expected a string, found the number 1"
        );
        assert_eq!(
            found[MAX_ERRORS],
            "t.vigil:2:68: stopped after 20 errors: 981 more not shown"
        );
    }

    /// The warnings kept, which `vigil check` prints and `vigil run` logs,
    /// are bounded as the errors are: 4 000 on one line took 40 s to check.
    #[test]
    fn the_warnings_kept_are_bounded() {
        let wheres = vec!["where state = critical { index }"; 30].join(" ");
        let source = format!("streams {{ {wheres} }}\n");
        let (_, compiled) = load("w.vigil", &source, EnvPolicy::Strict).unwrap();
        let found: Vec<_> = (compiled.warnings.iter())
            .map(|w| (diag::line_col(&source, w.span.start).1, w.message.as_str()))
            .collect();
        assert_eq!(found.len(), MAX_ERRORS + 1);
        assert_eq!(
            found[MAX_ERRORS],
            (685, "stopped after 20 warnings: 10 more not shown")
        );
    }

    /// A tag test takes a tag from `env(…)` given directly, as in a list
    /// and as `tag` and `untag` do: unset, `vigil check` warns of it where
    /// it is written and `vigil run` refuses it there.
    #[test]
    fn a_tag_test_takes_a_tag_from_the_environment_as_tag_does() {
        let source = "streams {\n  tagged(env(\"VIGIL_UNSET_TAG_A\")) { index }\n  \
                      tagged_any([env(\"VIGIL_UNSET_TAG_B\")], \"c\") { index }\n  \
                      tag(env(\"VIGIL_UNSET_TAG_D\")) { index }\n}\n";
        let lenient = load("t.vigil", source, EnvPolicy::Lenient);
        let (_, compiled) = lenient.unwrap_or_else(|e| panic!("{e}"));
        let warned: Vec<_> = (compiled.warnings.iter())
            .map(|w| diag::line_col(source, w.span.start))
            .collect();
        assert_eq!(warned, [(2, 10), (3, 15), (4, 7)]);
        let Err(error) = load("t.vigil", source, EnvPolicy::Strict) else {
            panic!("unset variables compiled");
        };
        let found: Vec<&str> = (error.lines())
            .filter(|l| l.starts_with("t.vigil:"))
            .collect();
        assert_eq!(
            found,
            [
                "t.vigil:2:10: environment variable `VIGIL_UNSET_TAG_A` is not set",
                "t.vigil:3:15: environment variable `VIGIL_UNSET_TAG_B` is not set",
                "t.vigil:4:7: environment variable `VIGIL_UNSET_TAG_D` is not set",
            ],
            "{error}"
        );
    }

    /// `tags` given by keyword and by position is given twice, as `tag`'s
    /// is; another keyword is refused with the one there is.
    #[test]
    fn a_tag_tests_tags_are_given_once_by_keyword_or_by_position() {
        let source = "streams {\n  tagged(\"a\", tags: [\"b\"]) { index }\n  \
                      tagged_any(tags: \"a\", \"b\") { index }\n  \
                      tagged_all(tag: \"a\") { index }\n  tag(\"a\", tags: \"b\") { index }\n}\n";
        let Err(error) = load("t.vigil", source, EnvPolicy::Strict) else {
            panic!("tags given twice compiled");
        };
        let found: Vec<&str> = (error.lines())
            .filter(|l| l.starts_with("t.vigil:") || l.starts_with("  hint: "))
            .collect();
        assert_eq!(
            found,
            [
                "t.vigil:2:15: `tags` is given twice",
                "  hint: give the tags by position, `tagged(\"a\", \"b\")`, or as `tags: [\"a\", \"b\"]` alone",
                "t.vigil:3:25: `tags` is given twice",
                "  hint: give the tags by position, `tagged_any(\"a\", \"b\")`, or as `tags: [\"a\", \"b\"]` alone",
                "t.vigil:4:14: unknown parameter `tag` for `tagged_all`",
                "  hint: did you mean `tags`? (`tagged_all` takes `tags`)",
                "t.vigil:5:12: `tags` is given twice",
            ],
            "{error}"
        );
    }

    /// The tag tests are stages: an output may not take their names, as it
    /// may not any stage's (a bare `tagged` would read as either).
    #[test]
    fn outputs_named_like_the_tag_tests_are_refused() {
        let source = "output tagged = webhook(url: \"http://127.0.0.1:9/\")\n\
                      output tagged_all = webhook(url: \"http://127.0.0.1:9/\")\n\
                      output tagged_any = webhook(url: \"http://127.0.0.1:9/\")\n\
                      streams { index }\n";
        let Err(error) = load("t.vigil", source, EnvPolicy::Strict) else {
            panic!("outputs named like stages loaded");
        };
        for (line, name) in [(1, "tagged"), (2, "tagged_all"), (3, "tagged_any")] {
            let expected = format!("t.vigil:{line}:8: output name `{name}` is a stream name");
            assert!(error.contains(&expected), "{expected} in\n{error}");
        }
    }

    /// `vigil check` points at each bad argument of `fill_in`,
    /// `fill_in_last`, `apdex` and `batch`, and says what it takes.
    #[test]
    fn bad_arguments_of_fill_in_apdex_and_batch_are_refused_where_written() {
        let source = "streams {\n  fill_in(5s) { index }\n  fill_in(5s, \"x\") { index }\n  \
                      fill_in_last(5, {metric: 0}) { index }\n  \
                      fill_in(1s, {metric: \"a\"}) { index }\n  \
                      apdex(5s, \"metric <\", \"true\") { index }\n  \
                      apdex(5s, metric, \"true\") { index }\n  apdex(5s) { index }\n  \
                      batch(10, 1s) { index }\n  batch(0, 1s) { sum { index } }\n}\n";
        let Err(error) = load("f.vigil", source, EnvPolicy::Strict) else {
            panic!("bad arguments compiled");
        };
        for expected in [
            "f.vigil:2:3: `fill_in` needs `event`",
            "f.vigil:3:15: expected the event's fields, e.g. `{service: \"up\", metric: 0}`, \
             found a string",
            "f.vigil:4:16: expected a duration such as 500ms, 5s, 2m or 1h, found the number 5",
            "f.vigil:5:24: expected a number, found a string",
            "f.vigil:6:13: predicate \"metric <\": parse error",
            "f.vigil:7:13: expected a predicate as a string, e.g. `\"metric < 0.5\"`, found a name",
            "f.vigil:8:3: `apdex` needs `satisfied`",
            "f.vigil:9:19: `batch` emits windows of events; only a fold can take them",
            "f.vigil:10:9: expected a whole number of at least 1, found the number 0",
        ] {
            assert!(error.contains(expected), "{expected} in\n{error}");
        }
    }

    /// `apdex`'s predicates are warned of as a `where`'s: `state = ok`
    /// compares with the attribute `ok`, so nothing is ever tolerated.
    #[test]
    fn apdex_predicates_are_warned_of_as_a_wheres() {
        let source = "streams {\n  apdex(1m, satisfied: \"metric < 0.5\", tolerated: \"state = ok\") \
                      { index }\n  apdex(1m, \"tagged \\\"x\\\" or \\\"y\\\"\", \"false\") { index }\n}\n";
        let (_, compiled) = load("d.vigil", source, EnvPolicy::Strict).unwrap();
        let warnings: Vec<_> = (compiled.warnings.iter())
            .map(|w| (&source[w.span.clone()], w.message.as_str()))
            .collect();
        assert_eq!(
            warnings,
            [
                ("ok", "`ok` is the attribute named `ok` here, not the text"),
                (
                    r#""tagged \"x\" or \"y\"""#,
                    r#"`"y"` on its own tests no field: it is always true"#
                ),
            ]
        );
        // Written as the rule's string needs them: quotes escaped.
        let hints: Vec<_> = (compiled.warnings.iter())
            .map(|w| w.hint.as_deref())
            .collect();
        assert_eq!(
            hints,
            [
                Some(r#"quote it to compare with the text: `\"ok\"`"#),
                Some(r#"compare a field with it, e.g. `service = \"y\"`"#),
            ]
        );
    }

    /// A pager's `dedup_key` naming `{state}` gave the `ok` another key
    /// than the trigger's: it resolved nothing, and the incident stayed open
    /// at the receiver for good. `{metric}` opened a new incident at each
    /// new value.
    #[test]
    fn a_dedup_key_naming_what_changes_between_trigger_and_resolve_is_refused() {
        for field in ["state", "metric", "time", "description"] {
            let source = format!(
                "output p = pagerduty(routing_key: \"k\", dedup_key: \"{{host}}-{{{field}}}\")\n\
                 streams {{ p }}\n"
            );
            let Err(error) = load("p.vigil", &source, EnvPolicy::Strict) else {
                panic!("`{{{field}}}` in a dedup_key passed");
            };
            assert!(
                error.contains(&format!("`dedup_key` names `{{{field}}}`")),
                "{error}"
            );
        }
        let source = "output p = paging_webhook(url: \"http://127.0.0.1:1/p\", \
                      dedup_key: \"{host}/{service}/{team}\")\nstreams { p }\n";
        assert!(load("p.vigil", source, EnvPolicy::Strict).is_ok());
    }

    #[test]
    fn a_rule_file_is_a_regular_file_of_bounded_size_in_utf_8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.vigil");
        std::fs::write(&path, "streams { index }\n").unwrap();
        assert_eq!(read_file(&path).unwrap(), "streams { index }\n");
        // Sparse: over the bound without writing 64 MiB.
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_RULE_FILE + 1).unwrap();
        let error = read_file(&path).unwrap_err().to_string();
        assert_eq!(error, "over the 64 MiB a rule file may have");
        std::fs::write(&path, b"streams {\xff}").unwrap();
        let error = read_file(&path).unwrap_err().to_string();
        assert!(error.starts_with("not UTF-8 text: "), "{error}");
        let error = read_file(dir.path()).unwrap_err().to_string();
        assert_eq!(error, "not a regular file (a directory)");
    }

    #[test]
    fn text_that_is_not_utf_8_is_shown_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.vigil");
        std::fs::write(
            &path,
            b"streams {\n  where service = \"\xff\xfe\" { index }\n}\n",
        )
        .unwrap();
        let error = read_file(&path).unwrap_err().render("r.vigil");
        let lines: Vec<_> = error.lines().collect();
        assert_eq!(lines[0], "r.vigil:2:20: not UTF-8 text: byte 0xff");
        assert_eq!(
            lines[1],
            "      where service = \"\u{fffd}\u{fffd}\" { index }"
        );
        assert_eq!(lines[2], format!("{}^", " ".repeat(4 + 19)));
        let error = read_file(&dir.path().join("none"))
            .unwrap_err()
            .render("none");
        assert!(error.starts_with("none: cannot read: "), "{error}");
    }
}
