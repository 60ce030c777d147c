//! The operator commands as operators run them: `vigil check`, `vigil test`,
//! `vigil run` refusing bad rules, and `vigil send`/`vigil query` giving up on
//! a server that never answers — exit codes and exact output.

mod common;

use std::process::{Command, Output};

use vigil::client::Client;
use vigil::event::Event;

fn vigil(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("VIGIL_PAGERDUTY_KEY")
        .output()
        .expect("vigil runs")
}

/// The stderr of `vigil ARGS`, which must exit 1.
fn refused(args: &[&str]) -> String {
    let out = vigil(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    stderr
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn shipped_rule_files() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/rules");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| format!("rules/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|f| f.ends_with(".vigil"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "rules/ ships the default and examples: {files:?}"
    );
    files
}

#[test]
fn every_shipped_rule_file_checks_clean() {
    let files = shipped_rule_files();
    let args: Vec<&str> = ["check"]
        .into_iter()
        .chain(files.iter().map(String::as_str))
        .collect();
    let out = vigil(&args);
    assert!(out.status.success(), "{}", stdout(&out));
    for file in &files {
        assert!(
            stdout(&out).contains(&format!("{file}: ok")),
            "{}",
            stdout(&out)
        );
    }
}

/// The rule file the README shows, as written there, checks and passes its
/// own test (with its secret set).
#[test]
fn the_readmes_rule_example_checks_and_passes_its_test() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("output pager = pagerduty(")
        .expect("the README shows a rule file");
    let end = start + readme[start..].find("```").expect("the example ends");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("readme.vigil");
    std::fs::write(&path, &readme[start..end]).unwrap();
    let path = path.to_str().unwrap();
    for command in ["check", "test"] {
        let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args([command, path])
            .env("VIGIL_PAGERDUTY_KEY", "key")
            .output()
            .unwrap();
        assert!(out.status.success(), "{command}: {}", stdout(&out));
    }
}

#[test]
fn every_shipped_rule_file_passes_its_tests() {
    let files = shipped_rule_files();
    let args: Vec<&str> = ["test"]
        .into_iter()
        .chain(files.iter().map(String::as_str))
        .collect();
    let out = vigil(&args);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    assert!(text.trim_end().ends_with(", 0 failed"), "{text}");
    assert!(
        text.contains("PASS rules/rabbitmq.vigil: a backlog over 300 pages critical"),
        "{text}"
    );
}

#[test]
fn check_reports_every_error_with_position_caret_and_hint() {
    let out = vigil(&["check", "tests/fixtures/broken.vigil"]);
    assert_eq!(out.status.code(), Some(1));
    let expected = "\
tests/fixtures/broken.vigil:1:44: unknown parameter `rout` for `pagerduty`
    output pager = pagerduty(routing_key: \"k\", rout: 1)
                                               ^^^^
  hint: `pagerduty` takes `routing_key`, `url`, `dedup_key`, `resend_interval`
tests/fixtures/broken.vigil:2:16: unknown output type `graphit`
    output graph = graphit(host: \"x\")
                   ^^^^^^^
  hint: did you mean `graphite`?
tests/fixtures/broken.vigil:4:8: expected a duration such as 500ms, 5s, 2m or 1h, found the number 5
      rate(5) { index }
           ^
tests/fixtures/broken.vigil:5:27: `fixed_time_window` emits windows of events; only a fold can take them
      fixed_time_window(1m) { index }
                              ^^^^^
  hint: use one of: sum, mean, min, max, count, median, std_dev — e.g. `mean { index }`
tests/fixtures/broken.vigil:6:3: `mean` folds a window of events and cannot stand here
      mean { index }
      ^^^^
  hint: put it directly inside a window, e.g. `fixed_time_window(1m) { mean { index } }`
tests/fixtures/broken.vigil:7:3: unknown stream or output `pagr`
      pagr
      ^^^^
  hint: did you mean `pager`?
tests/fixtures/broken.vigil:8:13: expected a TTL in seconds (0 to 3.4e38), found a string
      with(ttl: \"x\") { index }
                ^^^
";
    assert_eq!(stdout(&out), expected);
}

/// A `publish` topic that no WebSocket URL could name, or the index's
/// own, is an error where it is written; a good one checks clean.
#[test]
fn check_points_at_a_bad_publish_topic() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("topics.vigil");
    let source = "streams {\n  publish(\"pages\")\n  publish(\"on call\")\n  publish(index)\n}\n";
    std::fs::write(&file, source).unwrap();
    let out = vigil(&["check", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let path = file.display();
    let expected = format!(
        "\
{path}:3:11: a topic's name is ASCII letters, digits, `_`, `-` and `.`, not ' '
      publish(\"on call\")
              ^^^^^^^^^
{path}:4:11: `index` is the index's own topic: its subscribers get what the index stores and expires
      publish(index)
              ^^^^^
  hint: `index` the events, or publish them to a topic of another name
"
    );
    assert_eq!(stdout(&out), expected);
}

/// A file that cannot be read is one error among the others: the files
/// after it are checked (and tested) all the same.
#[test]
fn check_and_test_go_on_past_a_file_they_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let not_text = dir.path().join("not_text.vigil");
    std::fs::write(
        &not_text,
        b"streams {\n  where service = \"\xff\" { index }\n}\n",
    )
    .unwrap();
    let (missing, not_text) = ("tests/fixtures/none.vigil", not_text.to_str().unwrap());
    let out = vigil(&["check", missing, not_text, "rules/default.vigil"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let lines: Vec<_> = text.lines().collect();
    assert!(
        lines[0].starts_with("tests/fixtures/none.vigil: cannot read: "),
        "{text}"
    );
    assert_eq!(
        lines[1],
        format!("{not_text}:2:20: not UTF-8 text: byte 0xff")
    );
    assert_eq!(lines.last(), Some(&"rules/default.vigil: ok"), "{text}");
    let out = vigil(&["test", missing, "rules/default.vigil"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).ends_with(", 1 failed\n"), "{}", stdout(&out));
}

/// With `--log-format json` every line of stderr is JSON: the error vigil
/// exits on too, and the counters it stops with are `name=value` words.
#[tokio::test]
async fn json_logs_hold_the_exit_error_and_readable_counters() {
    let out = vigil(&[&["--log-format", "json"], &BROKEN_RULES[..]].concat());
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = (stderr.lines())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["level"], "ERROR", "{stderr}");
    let error = last["fields"]["error"].as_str().unwrap();
    assert!(
        error.contains("broken.vigil:2:16: unknown output type `graphit`"),
        "{error}"
    );

    // A refused command line is one JSON line too, clap's exit code kept.
    let out = vigil(&["--log-format=json", "run", "--max-index", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line: serde_json::Value = serde_json::from_str(stderr.trim_end()).unwrap();
    let error = line["fields"]["error"].as_str().unwrap();
    assert!(
        error.contains("for '--max-index <MAX_INDEX>': must be at least 1"),
        "{error}"
    );

    let mut v = common::Vigil::start(&[]);
    let mut client = Client::connect(v.tcp).await.unwrap();
    client.send(&[Event::default()]).await.unwrap();
    v.terminate();
    let stopped: serde_json::Value = serde_json::from_str(&v.log_line("Stopped.")).unwrap();
    let counters = stopped["fields"]["counters"].as_str().unwrap();
    assert!(
        counters.split(' ').any(|c| c == "tcp_events=1"),
        "{counters}"
    );
}

/// `vigil check rules/*.vigil | head` ends quietly when `head` does, with
/// the exit code of the check.
#[test]
fn check_ends_quietly_when_its_reader_has_gone() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["check", "rules/default.vigil"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");
}

/// An emptied rule file (a failed deploy) would drop every event.
#[test]
fn check_refuses_a_file_without_streams() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.vigil");
    std::fs::write(&empty, "").unwrap();
    let empty = empty.to_str().unwrap();
    let out = vigil(&["check", empty]);
    assert_eq!(out.status.code(), Some(1));
    let first = format!("{empty}:1:1: no `streams {{ … }}` block: every event would be dropped.");
    assert!(stdout(&out).starts_with(&first), "{}", stdout(&out));
}

#[test]
fn check_reports_the_syntax_error_of_every_item() {
    let out = vigil(&["check", "tests/fixtures/syntax_errors.vigil"]);
    assert_eq!(out.status.code(), Some(1));
    let expected = "\
tests/fixtures/syntax_errors.vigil:3:40: invalid `where` predicate: expected a value after `>`, found `>`
      where service =~ \"disk%\" and metric >> 0.9 { index }
                                           ^
tests/fixtures/syntax_errors.vigil:6:31: expected a value, found `)`
    output graph = graphite(host: )
                                  ^
tests/fixtures/syntax_errors.vigil:12:1: `test` is only allowed at the top level of a file
    test \"db1 is indexed\" {
    ^^^^
  hint: is a `}` missing before it?
";
    assert_eq!(stdout(&out), expected);
}

#[test]
fn check_suggests_the_declared_outputs_for_a_misspelled_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.vigil");
    std::fs::write(
        &path,
        "output pager = webhook(url: \"http://x\")\nstreams {\n  pagr\n  zzz\n}\n",
    )
    .unwrap();
    let out = vigil(&["check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains(":3:3: unknown stream or output `pagr`"),
        "{text}"
    );
    assert!(text.contains("hint: did you mean `pager`?"), "{text}");
    assert!(
        text.contains(":4:3: unknown stream or output `zzz`"),
        "{text}"
    );
    assert!(text.contains("hint: declared outputs: `pager`"), "{text}");
}

/// An output whose declaration has an error is still declared: a
/// misspelled reference to it is pointed at it, not told there are none.
#[test]
fn check_suggests_an_output_whose_declaration_has_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.vigil");
    std::fs::write(
        &path,
        "output pager = pagerduty(url: \"http://x\")\nstreams {\n  pagr\n  zzz\n}\n",
    )
    .unwrap();
    let out = vigil(&["check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    assert!(
        text.contains(":1:16: `pagerduty` needs `routing_key`"),
        "{text}"
    );
    assert!(text.contains("hint: did you mean `pager`?"), "{text}");
    assert!(text.contains("hint: declared outputs: `pager`"), "{text}");
    assert!(!text.contains("no outputs are declared"), "{text}");
}

/// A stage written without its block: the hint keeps what was written, so
/// following it does not lose the arguments.
#[test]
fn check_hints_a_missing_block_with_the_stage_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noblock.vigil");
    let long = format!("with(description: \"{}\")", "x".repeat(60));
    std::fs::write(
        &path,
        format!("streams {{\n  throttle(2, 1s) index\n  by(host) index\n  {long} index\n  fixed_time_window(5s) {{ sum }}\n}}\n"),
    )
    .unwrap();
    let out = vigil(&["check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    for hint in [
        "write `throttle(2, 1s) { index }` or similar",
        "write `by(host) { index }` or similar",
        "write `with(…) { index }` or similar",
        "write `sum { index }` or similar",
    ] {
        assert!(text.contains(hint), "{hint} in\n{text}");
    }
}

/// Riemann's streams that are written otherwise here say how.
#[test]
fn check_says_how_riemanns_splitp_and_sdo_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("riemann.vigil");
    let source = "streams {\n  splitp(\"x\") { index }\n  sdo { index }\n}\n";
    std::fs::write(&path, source).unwrap();
    let out = vigil(&["check", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    for hint in [
        "hint: `split { when metric > 0.9 { … } when metric > 0.5 { … } else { … } }`",
        "hint: list the streams side by side: each gets every event",
    ] {
        assert!(text.contains(hint), "{hint} in\n{text}");
    }
}

/// Riemann's `tagged`, `tagged-all` and `tagged-any` as a ported
/// configuration writes them: checked, and their own tests pass.
#[test]
fn tagged_tagged_all_and_tagged_any_check_and_pass_their_tests() {
    checks_and_passes(
        "tests/fixtures/tagged.vigil",
        &[
            "a production database pages; a test one does not",
            "noisy and test events are left out of the index",
        ],
    );
}

#[test]
fn test_prints_a_diff_for_a_failing_expectation_and_exits_1() {
    let out = vigil(&["test", "tests/fixtures/failing_test.vigil"]);
    assert_eq!(out.status.code(), Some(1));
    let expected = "\
FAIL tests/fixtures/failing_test.vigil: expects the wrong state
    expected pager to have an event matching
      {\"host\":\"a\",\"metric\":5.0,\"state\":\"warning\"}
    1 event(s) in pager; the closest differs in:
      state: expected \"warning\", got \"critical\"
PASS tests/fixtures/failing_test.vigil: passes
1 passed, 1 failed
";
    assert_eq!(stdout(&out), expected);
}

/// `--junit FILE` writes what `vigil test` found as a JUnit report, one
/// suite per file, for CI to show: a failure carries the text `vigil test`
/// prints for it, a file whose rules do not load an errored case with its
/// diagnostics. The printed report and the exit code stay as they were.
#[test]
fn test_writes_a_junit_report_with_a_suite_per_file() {
    use quick_junit::{NonSuccessKind, Report, TestCaseStatus};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.xml");
    let (failing, broken) = (
        "tests/fixtures/failing_test.vigil",
        "tests/fixtures/broken.vigil",
    );
    let out = vigil(&["test", "--junit", path.to_str().unwrap(), failing, broken]);
    assert_eq!(out.status.code(), Some(1));
    let printed = stdout(&out);
    assert!(printed.ends_with("\n1 passed, 2 failed\n"), "{printed}");

    let xml = std::fs::read_to_string(&path).unwrap();
    let report = Report::deserialize_from_str(&xml).unwrap();
    let counts = |tests, failures, errors| (tests, failures, errors);
    assert_eq!(
        counts(report.tests, report.failures, report.errors),
        (3, 1, 1)
    );
    let [tested, errored] = &report.test_suites[..] else {
        panic!("two suites: {xml}")
    };

    assert_eq!(tested.name.as_str(), failing);
    assert_eq!(
        counts(tested.tests, tested.failures, tested.errors),
        (2, 1, 0)
    );
    let cases: Vec<(&str, Option<&str>)> = (tested.test_cases.iter())
        .map(|c| (c.name.as_str(), c.classname.as_ref().map(|c| c.as_str())))
        .collect();
    assert_eq!(
        cases,
        [
            ("expects the wrong state", Some(failing)),
            ("passes", Some(failing))
        ]
    );
    let TestCaseStatus::NonSuccess {
        kind: NonSuccessKind::Failure,
        message,
        description,
        ..
    } = &tested.test_cases[0].status
    else {
        panic!("a failure: {xml}")
    };
    assert_eq!(
        message.as_ref().map(|m| m.as_str()),
        Some("expected pager to have an event matching")
    );
    let description = description.as_ref().unwrap().as_str();
    let diff = "      state: expected \"warning\", got \"critical\"";
    assert!(description.contains(diff), "{description}");
    assert!(printed.contains(description), "as printed:\n{description}");
    assert!(matches!(
        tested.test_cases[1].status,
        TestCaseStatus::Success { .. }
    ));

    assert_eq!(errored.name.as_str(), broken);
    assert_eq!(
        counts(errored.tests, errored.failures, errored.errors),
        (1, 0, 1)
    );
    let TestCaseStatus::NonSuccess {
        kind: NonSuccessKind::Error,
        message,
        description,
        ..
    } = &errored.test_cases[0].status
    else {
        panic!("an error: {xml}")
    };
    assert_eq!(
        message.as_ref().map(|m| m.as_str()),
        Some("the rule file has errors")
    );
    let description = description.as_ref().unwrap().as_str();
    assert!(
        description.starts_with("tests/fixtures/broken.vigil:1:"),
        "{description}"
    );
    assert!(printed.contains(description), "as printed:\n{description}");
}

/// `expect tap NAME` checks what reached `tap(NAME)`: the events a `where`
/// let through, before the `with` under the tap changed them.
#[test]
fn test_checks_what_reached_a_tap() {
    let out = vigil(&["test", "tests/fixtures/taps.vigil"]);
    assert_eq!(
        stdout(&out),
        "PASS tests/fixtures/taps.vigil: a tap sees what reached it, before the stages under it\n\
         1 passed, 0 failed\n"
    );
    assert_eq!(out.status.code(), Some(0));
}

/// `expect publish TOPIC` checks what `publish(TOPIC)` published; one of
/// a topic no stage publishes to is refused where it is written, by `vigil
/// check` and `vigil test` alike, as an undeclared output is.
#[test]
fn test_checks_what_was_published_and_refuses_a_topic_nobody_publishes_to() {
    checks_and_passes(
        "tests/fixtures/publish.vigil",
        &["a full disk is published to its topic, a quiet one indexed"],
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("topics.vigil");
    let source = "streams { publish(\"disk.alerts\") }\n\
                  test \"t\" { expect publish \"disk.alert\" {host: \"a\"} }\n";
    std::fs::write(&file, source).unwrap();
    let path = file.display();
    let expected = format!(
        "\
{path}:2:27: `expect publish disk.alert`: no stage publishes to it
    test \"t\" {{ expect publish \"disk.alert\" {{host: \"a\"}} }}
                              ^^^^^^^^^^^^
  hint: the topics published to: disk.alerts
"
    );
    for command in ["check", "test"] {
        let out = vigil(&[command, file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{command}");
        assert!(
            stdout(&out).starts_with(&expected),
            "{command}: {}",
            stdout(&out)
        );
    }
}

/// Riemann's `untag`, `counter` and `runs` as a ported configuration
/// writes them: checked, and their own tests pass.
#[test]
fn untag_counter_and_runs_check_and_pass_their_tests() {
    checks_and_passes(
        "tests/fixtures/counters_and_runs.vigil",
        &[
            "a count per host, reset by an event tagged reset",
            "a disk pages after three checks in a row agree",
        ],
    );
}

/// Riemann's `predict-linear` as a ported configuration writes it:
/// checked, and its own test passes.
#[test]
fn predict_linear_checks_and_passes_its_test() {
    checks_and_passes(
        "tests/fixtures/predict_linear.vigil",
        &["a disk filling 1 % every 64 s pages, a flat one does not"],
    );
}

/// `fixture` passes `vigil check` as it is, and `vigil test` runs exactly
/// `tests`, in order, all passing.
fn checks_and_passes(fixture: &str, tests: &[&str]) {
    let out = vigil(&["check", fixture]);
    assert_eq!(stdout(&out), format!("{fixture}: ok\n"));
    let out = vigil(&["test", fixture]);
    let passed: String = tests
        .iter()
        .map(|name| format!("PASS {fixture}: {name}\n"))
        .collect();
    let total = tests.len();
    assert_eq!(stdout(&out), format!("{passed}{total} passed, 0 failed\n"));
    assert_eq!(out.status.code(), Some(0));
}

/// Riemann's `fill-in-last`, `apdex` and `batch` as a ported configuration
/// writes them: checked, and their own tests pass.
#[test]
fn fill_in_apdex_and_batch_check_and_pass_their_tests() {
    checks_and_passes(
        "tests/fixtures/fill_in_apdex_batch.vigil",
        &[
            "a silent host's heartbeat reads 0 every 10 s until it expires",
            "the apdex of a minute: two satisfied, one tolerated, one not",
            "bytes are summed three at a time, the rest when the minute ends",
        ],
    );
}

#[test]
fn check_refuses_what_an_output_could_never_send_keys_given_twice_and_ttls_out_of_range() {
    // Each of these passed `check`, then `run` dropped every event of the output.
    let out = vigil(&["check", "tests/fixtures/unsendable.vigil"]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let firsts: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("tests/"))
        .map(|l| l.trim_start_matches("tests/fixtures/unsendable.vigil:"))
        .collect();
    assert_eq!(
        firsts,
        [
            "1:25: `not a url` is not a URL vigil can post to: relative URL without a base",
            "2:25: `ftp://127.0.0.1/x` is not a URL vigil can post to: the scheme `ftp` is not sent to; use http or https",
            "3:69: invalid header `Bad Header`: invalid HTTP header name",
            "4:59: invalid header `X-Token`: failed to parse header value",
            "5:45: `http://` is not a URL vigil can post to: empty host",
            "6:59: invalid header `Content-Length`: `Content-Length` is set for each request, not by configuration",
            "7:26: `host` is empty: name a host or an address",
            "8:27: `host` is empty: name a host or an address",
            "9:26: `host` \"127.0.0.1:5555\" includes a port: give the host alone and the port as `port: N`",
            "10:27: `host` \"carbon.example.com:2003\" includes a port: give the host alone and the port as `port: N`",
            "11:26: `host` \"[::1]\": give an IPv6 address without brackets, e.g. \"::1\"",
            "13:27: expected a port number (1-65535), found the number 0",
            "13:36: `host` is empty: name a host or an address",
            "14:35: `routing_key` is empty",
            "15:8: output name of 131 bytes: at most 128",
            "17:19: `host` is given twice",
            "18:13: expected a TTL in seconds (0 to 3.4e38), found the number -5",
            "19:16: expected a TTL in seconds (0 to 3.4e38), found the number 1e300",
        ],
        "{text}"
    );
}

#[test]
fn test_jumps_a_year_ahead_when_nothing_is_due_on_the_way() {
    // Stepping 100 ms at a time, a year took minutes and ten years an hour.
    let out = vigil(&["test", "tests/fixtures/long_jumps.vigil"]);
    assert_eq!(
        stdout(&out),
        "PASS tests/fixtures/long_jumps.vigil: a host silent for a year is noticed\n1 passed, 0 failed\n"
    );
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn run_refuses_rules_with_errors_and_unset_secrets() {
    let out = vigil(&[
        "run",
        "--rules",
        "tests/fixtures/broken.vigil",
        "--tcp",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tests/fixtures/broken.vigil:2:16: unknown output type `graphit`"),
        "{err}"
    );
    assert!(err.contains("the rules have errors; not starting"), "{err}");

    let out = vigil(&[
        "run",
        "--rules",
        "rules/rabbitmq.vigil",
        "--tcp",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "rules/rabbitmq.vigil:3:39: environment variable `VIGIL_PAGERDUTY_KEY` is not set"
        ),
        "{err}"
    );
}

/// `vigil run` with these rules stops once past its flags: a test of a flag's
/// refusal ends whether or not the flag is refused.
const BROKEN_RULES: [&str; 4] = [
    "run",
    "--rules",
    "tests/fixtures/broken.vigil",
    "--tcp=127.0.0.1:0",
];

/// An empty token, given or inherited, made every endpoint but /health
/// answer 401 to any credential.
#[test]
fn run_refuses_an_empty_http_token() {
    let expected = "--http-token must not be empty: unset it to serve without a token";
    let out = vigil(&[&BROKEN_RULES[..], &["--http-token", ""]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(expected), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(BROKEN_RULES)
        .env("VIGIL_HTTP_TOKEN", "")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(expected), "{err}");
}

/// Every listener failed alike ("starting the listeners: Address already in
/// use"), and --sse's under a hint that --no-http would help.
#[test]
fn run_names_the_flag_and_address_a_listener_cannot_bind() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tcp = taken.local_addr().unwrap().to_string();
    let taken_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp = taken_udp.local_addr().unwrap().to_string();
    for (flag, addr, extra) in [
        ("--tcp", &tcp, vec![]),
        ("--udp", &udp, vec![]),
        ("--tls", &tcp, vec!["--tls-cert", cert, "--tls-key", key]),
        ("--http", &tcp, vec![]),
        ("--sse", &tcp, vec![]),
        ("--grpc", &tcp, vec![]),
    ] {
        // Every other listener on a free port.
        let mut args = vec!["run", "--no-snapshot"];
        for (other, free) in [("--tcp", "127.0.0.1:0"), ("--http", "127.0.0.1:0")] {
            if other != flag {
                args.extend([other, free]);
            }
        }
        args.extend([flag, addr.as_str()]);
        args.extend(extra);
        let err = refused(&args);
        let expected = format!("{flag} {addr}: Address already in use");
        assert!(err.contains(&expected), "{expected} in {err}");
        assert!(!err.contains("--no-http"), "{err}");
    }
}

/// Each was accepted, and then refused every message, expired every event at
/// the next tick, or ran the timers back to back.
#[test]
fn run_refuses_limits_that_would_refuse_everything() {
    for (arg, expected) in [
        ("--max-frame=0", "must be at least 1"),
        ("--max-events-per-msg=0", "must be at least 1"),
        ("--max-string=0", "must be at least 1"),
        ("--max-datagram=0", "must be at least 1"),
        ("--default-ttl=-5", "must be a number of seconds over 0"),
        ("--default-ttl=0", "must be a number of seconds over 0"),
        ("--default-ttl=NaN", "must be a number of seconds over 0"),
        ("--default-ttl=inf", "must be a number of seconds over 0"),
        ("--tick=1ns", "must be at least 1ms"),
        ("--tick=999us", "must be at least 1ms"),
        ("--max-index=0", "must be at least 1"),
        (
            "--snapshot-interval=300000000000y",
            "must be at most 10 years",
        ),
        ("--read-timeout=3651d", "must be at most 10 years"),
        (
            "--query-timeout=18446744073709551615s",
            "must be at most 10 years",
        ),
        (
            "--self-metrics-interval=300000000000y",
            "must be at most 10 years",
        ),
    ] {
        let out = vigil(&[&BROKEN_RULES[..], &[arg]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{arg}: {err}");
        let (flag, value) = arg.split_once('=').unwrap();
        assert!(
            err.contains(&format!("invalid value '{value}' for '{flag} ")),
            "{err}"
        );
        assert!(err.contains(expected), "{arg}: {err}");
    }
}

/// Each was accepted and then ignored; flags left at their defaults still are.
#[test]
fn run_refuses_flags_that_conflict_or_would_go_unused() {
    let required = |flag: &str| {
        let missing = "the following required arguments were not provided:";
        vec![missing.to_owned(), format!("\n  {flag} <")]
    };
    let conflict = |flag: &str, with: &str| {
        vec![format!(
            "the argument '{flag}' cannot be used with '{with} <"
        )]
    };
    let cases: [(&[&str], Vec<String>); 9] = [
        (
            &["--no-http", "--http", "127.0.0.1:0"],
            conflict("--no-http", "--http"),
        ),
        (
            &["--no-snapshot", "--snapshot-interval", "5s"],
            conflict("--no-snapshot", "--snapshot-interval"),
        ),
        (&["--node-id", "a"], required("--cluster")),
        (&["--shards", "8"], required("--cluster")),
        (&["--cluster-retention", "2h"], required("--cluster")),
        (&["--cluster-lease-ttl", "9s"], required("--cluster")),
        (&["--cluster-renew", "1s"], required("--cluster")),
        (&["--tls", "127.0.0.1:0"], required("--tls-cert")),
        (
            &["--tls", "127.0.0.1:0", "--tls-cert", "c.pem"],
            required("--tls-key"),
        ),
    ];
    for (args, expected) in cases {
        let out = vigil(&[&BROKEN_RULES[..], args].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        for expected in expected {
            assert!(err.contains(&expected), "{expected} in {err}");
        }
    }
    // Refused before NATS is dialled.
    let cluster = [
        "run",
        "--tcp",
        "127.0.0.1:0",
        "--cluster",
        "nats://127.0.0.1:1",
        "--node-id",
        "a",
    ];
    let renew = ["--cluster-lease-ttl", "3s", "--cluster-renew", "3s"];
    let err = refused(&[&cluster[..], &renew].concat());
    assert!(
        err.contains("--cluster-renew 3s must be shorter than --cluster-lease-ttl 3s"),
        "{err}"
    );
}

/// An HTTP server's 400 was read as a frame length of 1213486160 bytes
/// ("HTTP"), and `query` said to raise --max-answer.
#[test]
fn send_and_query_say_an_http_port_is_not_riemanns() {
    let server = common::Vigil::start(&[]);
    let http = server.http.unwrap().to_string();
    let expected = "the server answered in HTTP: this is an HTTP port (vigil's is --http); \
                    Riemann's protocol is on --tcp (5555)";
    for args in [
        vec!["query", "true", &http],
        vec!["send", "--host", "h", &http],
    ] {
        let stderr = refused(&args);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

/// Human logs carried colour codes into files and journals.
/// Started under a low soft limit on open files (1 024 is common), vigil
/// raises it to the hard one: each HTTP and gRPC connection takes two.
#[test]
fn run_raises_the_open_files_limit_to_the_hard_one() {
    let script =
        "ulimit -Sn 256 && exec \"$0\" run --no-snapshot --tcp 127.0.0.1:0 --http 127.0.0.1:0";
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script, env!("CARGO_BIN_EXE_vigil")]);
    let mut vigil = common::Logging::spawn(cmd);
    let listening = vigil.wait_for("listening", common::START_TIMEOUT);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", vigil.child.id())).unwrap();
    vigil.child.kill().unwrap();
    vigil.child.wait().unwrap();
    assert!(listening, "{}", vigil.seen);
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers[0], numbers[1], "soft raised to hard: {open_files}");
}

/// A limit below `--max-connections` is said at start, where an operator
/// looks, rather than found as failed accepts under load.
#[test]
fn run_warns_of_an_open_files_limit_below_max_connections() {
    for (max, warned) in [("10000", true), ("100", false)] {
        let script = "ulimit -n 256 && exec \"$0\" run --no-snapshot --tcp 127.0.0.1:0 \
                      --http 127.0.0.1:0 --max-connections \"$1\"";
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script, env!("CARGO_BIN_EXE_vigil"), max]);
        let mut vigil = common::Logging::spawn(cmd);
        let listening = vigil.wait_for("listening", common::START_TIMEOUT);
        vigil.child.kill().unwrap();
        vigil.child.wait().unwrap();
        assert!(listening, "{}", vigil.seen);
        let warning = "The open files limit is below --max-connections";
        assert_eq!(
            vigil.seen.contains(warning),
            warned,
            "{max}: {}",
            vigil.seen
        );
    }
}

/// `where state = critical` compares with an attribute named `critical`:
/// valid, and seldom meant. `check` warns, and passes; `run` says it too.
#[test]
fn an_unquoted_word_compared_with_a_field_is_warned_of() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("doubt.vigil");
    std::fs::write(&path, "streams {\n  where state = critical { index }\n}\n").unwrap();
    let out = vigil(&["check", path.to_str().unwrap()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(
            "doubt.vigil:2:17: `critical` is the attribute named `critical` here, not the text"
        ) && text.contains(r#"hint: quote it to compare with the text: `"critical"`"#),
        "{text}"
    );

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vigil"));
    cmd.args(["run", "--no-snapshot", "--tcp", "127.0.0.1:0"])
        .args(["--http", "127.0.0.1:0", "--rules"])
        .arg(&path);
    let mut vigil = common::Logging::spawn(cmd);
    let listening = vigil.wait_for("listening", common::START_TIMEOUT);
    vigil.child.kill().unwrap();
    vigil.child.wait().unwrap();
    assert!(listening, "{}", vigil.seen);
    assert!(
        vigil.seen.contains("The rules run, with warnings.") && vigil.seen.contains(":2:17:"),
        "{}",
        vigil.seen
    );
}

#[test]
fn human_logs_to_a_pipe_carry_no_colour_codes() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vigil"));
    cmd.args(["run", "--no-snapshot", "--tcp", "127.0.0.1:0"])
        .args(["--http", "127.0.0.1:0"])
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info");
    let mut vigil = common::Logging::spawn(cmd);
    let listening = vigil.wait_for("listening", common::START_TIMEOUT);
    vigil.child.kill().unwrap();
    vigil.child.wait().unwrap();
    let seen = std::mem::take(&mut vigil.seen);
    assert!(listening, "{seen:?}");
    assert!(!seen.contains("\x1b["), "{seen:?}");
}

#[test]
fn send_and_query_give_up_on_a_server_that_never_answers() {
    // Accepts (the kernel completes the handshake) and never reads or replies.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let expected = format!("no answer from {addr} within 300ms (--timeout)");
    for args in [
        vec!["query", "--timeout", "300ms", "true", &addr],
        vec!["send", "--timeout", "300ms", "--host", "h", &addr],
    ] {
        let stderr = refused(&args);
        assert!(stderr.contains(&expected), "{args:?}: {stderr}");
    }
    drop(silent);
}

#[test]
fn send_and_query_take_negative_numbers_and_answers_over_the_frame_limit() {
    let server = common::Vigil::start(&[]);
    let addr = server.tcp.to_string();
    let sent = vigil(&[
        "send",
        "--host",
        "h",
        "--service",
        "delta",
        "--metric",
        "-2",
        "--ttl",
        "60",
        &addr,
    ]);
    assert!(sent.status.success(), "{sent:?}");
    let found = vigil(&["query", "-2 = metric", &addr]);
    assert!(found.status.success(), "{found:?}");
    assert!(stdout(&found).contains(r#""metric":-2,"#), "{found:?}");

    // 20 events of 1 MiB each: an answer over the 16 MiB frame limit.
    let now = (common::now_secs() * 1e6) as i64;
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = Client::connect(server.tcp).await.unwrap();
        for batch in 0..4 {
            let events: Vec<Event> = (0..5)
                .map(|i| Event {
                    host: Some(format!("big{batch}-{i}")),
                    service: Some("large".into()),
                    description: Some("x".repeat(1 << 20)),
                    time: now,
                    ttl: Some(600.0),
                    ..Event::default()
                })
                .collect();
            client.send(&events).await.unwrap();
        }
    });
    let large = r#"service = "large""#;
    let found = vigil(&["query", large, &addr]);
    assert!(found.status.success(), "{found:?}");
    assert_eq!(stdout(&found).lines().count(), 20);
    // A reader that stops early (`| head -c 10`) ends it quietly.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["query", large, &addr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 10];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut head).unwrap();
    drop(child.stdout.take());
    let ended = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert_eq!(ended.status.code(), Some(0), "{stderr}");
    let stderr = refused(&["query", "--max-answer", "1000000", large, &addr]);
    assert!(
        stderr.contains("exceeds the maximum size of 1000000 bytes: raise --max-answer"),
        "{stderr}"
    );
}

#[test]
fn check_refuses_a_forwards_tls_without_its_ca_half_an_identity_or_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let certified = rcgen::generate_simple_self_signed(vec!["central".to_owned()]).unwrap();
    std::fs::write(&ca, certified.cert.pem()).unwrap();
    let missing = dir.path().join("missing.pem");
    // Never opened: with no writer, opening it would block `check` for good.
    let fifo = dir.path().join("fifo.pem");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let (ca, missing, fifo) = (ca.display(), missing.display(), fifo.display());
    let rules = dir.path().join("tls.vigil");
    let source = format!(
        "output a = forward(host: \"x\", tls_cert: \"c.pem\", tls_key: \"k.pem\")\n\
         output b = forward(host: \"x\", tls_cert: \"c.pem\", tls_ca: \"{ca}\")\n\
         output c = forward(host: \"x\", tls_ca: \"{missing}\")\n\
         output d = forward(host: \"x\", tls_ca: \"{ca}\")\n\
         output e = forward(host: \"x\", tls_cert: \"{missing}\", tls_key: \"k.pem\", tls_ca: \"{ca}\")\n\
         output f = forward(host: \"x\", tls_ca: \"{fifo}\")\n\
         output g = forward(host: \"x\", tls_name: \"not a name!\", tls_ca: \"{ca}\")\n\
         output h = forward(host: \"x\", tls_ca: \"/dev/zero\")\n\
         streams {{\n  a\n  b\n  c\n  d\n  e\n  f\n  g\n  h\n}}\n"
    );
    std::fs::write(&rules, source).unwrap();
    let out = vigil(&["check", rules.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let text = stdout(&out);
    let prefix = format!("{}:", rules.display());
    let firsts: Vec<&str> = (text.lines())
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect();
    assert_eq!(
        firsts,
        [
            "1:41: `tls_cert` without `tls_ca`".to_owned(),
            "2:41: `tls_cert` and `tls_key` go together: the client certificate and its key"
                .to_owned(),
            format!(
                "3:39: TLS for `forward`: reading certificates from {missing}: \
                 I/O error: No such file or directory (os error 2)"
            ),
            format!(
                "5:41: TLS for `forward`: reading certificates from {missing}: \
                 I/O error: No such file or directory (os error 2)"
            ),
            format!("6:39: TLS for `forward`: {fifo}: not a regular file (a FIFO)"),
            "7:41: TLS for `forward`: `not a name!` is not a name or address a certificate \
             can be checked against"
                .to_owned(),
            "8:39: TLS for `forward`: /dev/zero: not a regular file (a character device)"
                .to_owned(),
        ],
        "{text}"
    );
}

/// A test step's `time` far in the future is an error at its place: it
/// overflowed the clock, a panic in a build with overflow checks and a time
/// in the far past without. So is an `at` there, which was capped silently.
#[test]
fn a_test_step_time_beyond_the_clock_range_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    for (name, step) in [
        ("send.vigil", r#"send {host: "a", time: 1e13}"#),
        ("expect.vigil", r#"expect index {time: 1e13}"#),
        ("at.vigil", r#"at 9223372036854s send {host: "a"}"#),
    ] {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!("streams {{ index }}\ntest \"t\" {{\n  {step}\n}}\n"),
        )
        .unwrap();
        for command in ["check", "test"] {
            let out = vigil(&[command, path.to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(!stderr.contains("panicked"), "{command} {name}: {stderr}");
            assert!(
                stdout.contains(":3:") && stdout.contains("` is past what the clock holds"),
                "{command} {name}: {stdout}"
            );
            assert_eq!(out.status.code(), Some(1), "{command} {name}: {stderr}");
        }
    }
}
