//! `~=` patterns: compiled as Riemann reads them ([`ascii_perl_classes`]) and
//! within a budget per query. A query is user input and may hold thousands
//! of patterns: a hundred `.{1000}` took 0.47 s and 135 MB to compile, and
//! a query within `--max-string` could hold forty thousand. Each pattern is
//! charged its compiled size plus a fixed cost for its own structures, and a
//! query's patterns together get [`QUERY_BUDGET`].

use regex_automata::util::syntax;
use regex_automata::{MatchKind, meta};

use super::java_classes::ascii_perl_classes;

/// Compiled-size cap of one pattern. With Java's ASCII `\w`, `\w{1000}` fits.
pub(super) const PATTERN_LIMIT: usize = 1 << 20;

/// What all of one query's patterns may take together.
pub(super) const QUERY_BUDGET: usize = 4 << 20;

/// Charged per pattern on top of its compiled size: what even a literal costs
/// in structures and compile time (about 4 KB and 4 µs measured; a small
/// regex, 10 KB and 60 µs), so thousands of tiny patterns are bounded too.
pub(super) const PATTERN_OVERHEAD: usize = 16 << 10;

/// Charged per byte of a pattern's text on top: an alternation of
/// literals compiles to little, but building it takes ~200 bytes per byte of
/// text for a while (a 530 KB one, 80 MB and 0.15 s). So a query's patterns
/// are at most ~64 KB of text together, a few milliseconds to compile.
pub(super) const PATTERN_TEXT_COST: usize = 64;

/// The lazy DFA's cache per pattern and thread (the regex crate's default is
/// 2 MiB): a query's patterns could otherwise fill that many caches. A
/// pattern whose DFA would not fit is matched by the slower NFA engines.
const CACHE_CAPACITY: usize = 256 << 10;

/// A compiled `~=` pattern and the text it was compiled from.
#[derive(Debug, Clone)]
pub(super) struct Pattern {
    regex: meta::Regex,
    source: String,
}

impl Pattern {
    pub(super) fn is_match(&self, haystack: &str) -> bool {
        self.regex.is_match(haystack)
    }

    /// The pattern as compiled (Java's classes spelled out).
    pub(super) fn as_str(&self) -> &str {
        &self.source
    }
}

/// Compiles one query's patterns, charging each to the query's budget.
#[derive(Debug)]
pub(super) struct Compiler {
    left: usize,
}

impl Default for Compiler {
    fn default() -> Self {
        Compiler { left: QUERY_BUDGET }
    }
}

impl Compiler {
    /// `pattern` compiled, or one line saying why not.
    pub(super) fn compile(&mut self, pattern: &str) -> Result<Pattern, String> {
        let over_budget = || {
            format!(
                "too many or too large regexes: the `~=` patterns of a query (or a rule's \
                 predicate) may take {} MiB together (each its compiled size, plus {} KiB, \
                 plus {} bytes per byte of its text)",
                QUERY_BUDGET >> 20,
                PATTERN_OVERHEAD >> 10,
                PATTERN_TEXT_COST
            )
        };
        let charge =
            PATTERN_OVERHEAD.saturating_add(pattern.len().saturating_mul(PATTERN_TEXT_COST));
        let Some(room) = self.left.checked_sub(charge) else {
            return Err(over_budget());
        };
        let source = ascii_perl_classes(pattern);
        let regex = meta::Builder::new()
            .configure(config(room.min(PATTERN_LIMIT)))
            .syntax(syntax::Config::new().utf8(true))
            .build(&source)
            .map_err(|e| match e.size_limit() {
                Some(_) if room < PATTERN_LIMIT => over_budget(),
                _ => build_message(&e),
            })?;
        self.left = room.saturating_sub(regex.memory_usage());
        Ok(Pattern { regex, source })
    }
}

/// As the regex crate configures a `Regex` (leftmost-first, UTF-8, with
/// its syntax), with the given compiled-size limit and a smaller lazy DFA
/// cache.
fn config(size_limit: usize) -> meta::Config {
    meta::Config::new()
        .match_kind(MatchKind::LeftmostFirst)
        .utf8_empty(true)
        .nfa_size_limit(Some(size_limit))
        .hybrid_cache_capacity(CACHE_CAPACITY)
}

/// One line for an error column: syntax errors are multi-line drawings of
/// the pattern; keep only their final "error: ..." line.
fn build_message(error: &meta::BuildError) -> String {
    if let Some(limit) = error.size_limit() {
        return format!("invalid regex: too large (compiled size limit {limit} bytes)");
    }
    if let Some(syntax) = error.syntax_error() {
        let text = syntax.to_string();
        let last = text.lines().last().unwrap_or_default();
        return format!("invalid regex: {}", last.trim_start_matches("error: "));
    }
    format!("invalid regex: {error}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_as_the_regex_crate_does() {
        let mut compiler = Compiler::default();
        let pattern = compiler.compile(r"^web\d+\.example$").unwrap();
        assert_eq!(pattern.as_str(), r"^web[0-9]+\.example$");
        assert!(pattern.is_match("web12.example"));
        assert!(!pattern.is_match("web٣.example"), "Java's `\\d` is ASCII");
        let empty = compiler.compile("").unwrap();
        assert!(empty.is_match("é"));
        let unicode = compiler.compile("^.$").unwrap();
        assert!(unicode.is_match("é"), "`.` is one character, not a byte");
    }

    #[test]
    fn one_pattern_over_its_cap_is_refused_with_the_cap() {
        let e = Compiler::default().compile(r".{1000}{1000}").unwrap_err();
        assert_eq!(
            e,
            "invalid regex: too large (compiled size limit 1048576 bytes)"
        );
        let e = Compiler::default().compile("(unclosed").unwrap_err();
        assert_eq!(e, "invalid regex: unclosed group");
    }

    #[test]
    fn a_querys_patterns_share_one_budget() {
        let mut compiler = Compiler::default();
        // Each `.{1000}` compiles to about 1 MB: four fit, a fifth does not.
        let fitted = (0..10)
            .take_while(|_| compiler.compile(".{1000}").is_ok())
            .count();
        assert_eq!(fitted, 4);
        let e = compiler.compile(".{1000}").unwrap_err();
        assert!(e.starts_with("too many or too large regexes"), "{e}");
        assert!(
            compiler.compile("x").is_ok(),
            "a small one still fits in what is left"
        );

        // Literals cost next to nothing compiled; the overhead bounds them.
        let mut compiler = Compiler::default();
        let literals = (0..1000)
            .take_while(|i| compiler.compile(&format!("cpu{i}")).is_ok())
            .count();
        let most = QUERY_BUDGET / PATTERN_OVERHEAD;
        assert!((most - 8..=most).contains(&literals), "{literals} literals");
    }

    /// A long alternation of literals compiles small, slowly, through a lot
    /// of memory: its text is charged.
    #[test]
    fn a_patterns_text_is_charged() {
        let alternation = |n: usize| {
            (0..n)
                .map(|i| format!("l{i}"))
                .collect::<Vec<_>>()
                .join("|")
        };
        let fits = alternation(8_000);
        assert!(fits.len() < 64 << 10);
        assert!(Compiler::default().compile(&fits).is_ok());
        let mut compiler = Compiler::default();
        let e = compiler.compile(&alternation(80_000)).unwrap_err();
        assert!(e.starts_with("too many or too large regexes"), "{e}");
        assert!(compiler.compile("x").is_ok(), "nothing was taken");
    }
}
