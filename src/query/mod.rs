//! The Riemann query language: the public [`Query`] type (parse once, match many
//! events) and its [`QueryError`]. Parsing lives in `parser`, the compiled tree and
//! its evaluation in `eval`.

mod eval;
mod java_classes;
mod parser;
mod pattern;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::blocking::off_workers;
use crate::event::Event;

pub use parser::Doubt;

/// Longest query text parsed on an async worker (see [`Query::compiles_at_once`]).
const AT_ONCE_MAX: usize = 4 << 10;

/// Long queries with `~=` patterns compile off the async workers in turn,
/// one at a time: each may take some 20 ms and 16 MB (see `pattern`'s
/// budget). Others do not wait behind them: a long query without patterns
/// parses at about 30 ms a megabyte, with next to no memory.
static LONG_COMPILES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

/// A parsed and compiled predicate. Cheap to evaluate: no allocation per `matches`.
#[derive(Debug, Clone)]
pub struct Query {
    root: eval::Node,
    text: String,
    /// Whether one event may cost it more than a few microseconds: over
    /// [`eval::CHEAP_WEIGHT`] (many terms, or more than one that scans a
    /// string). Only such a query is evaluated against a [`Budget`]; the
    /// others cost what they always did.
    costly: bool,
}

/// Units of work (a term each, and one per 16 bytes a term scans) between
/// two looks at the clock in [`Query::matches_within`]: some 256 cheap
/// terms (about a microsecond), or a single term that scans 4 KiB. Reading
/// the clock costs some 25 ns, so it costs the costly queries it bounds a
/// few percent.
const CHECK_EVERY: u32 = 256;

/// How long a costly query may take before it is given up
/// ([`Query::matches_within`]): a deadline, or a flag its asker sets when it
/// stops waiting. The clock is read every [`CHECK_EVERY`] units of work,
/// never per term of a cheap run; a term scanning a long string is one
/// check of its own, so a deadline holds within one term (whose scan
/// `--max-string` bounds).
#[derive(Debug)]
pub struct Budget<'a> {
    started: Instant,
    deadline: Option<Instant>,
    cancelled: Option<&'a AtomicBool>,
    since_check: u32,
    /// Units of work done, and how many must be before a deadline counts
    /// (see [`Budget::with_floor`]).
    done: u64,
    floor: u64,
}

/// Why [`Query::matches_within`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    /// Past the deadline, this long after the budget started.
    Time { spent: Duration },
    /// Its asker stopped waiting.
    Cancelled,
}

impl Budget<'static> {
    /// `limit` from now.
    pub fn new(limit: Duration) -> Budget<'static> {
        let mut budget = Budget::until(None, None);
        budget.deadline = budget.started.checked_add(limit);
        budget
    }

    /// The deadline counts only once `units` of work were done: a thread
    /// descheduled for a millisecond mid-evaluation (a busy machine) then
    /// does not make a query of a few hundred terms look costly. 100 000
    /// units are some 100 000 comparisons, or 1.6 MB searched.
    pub fn with_floor(self, units: u64) -> Budget<'static> {
        Budget {
            floor: units,
            ..self
        }
    }
}

impl<'a> Budget<'a> {
    /// Until `deadline` (none: no end), or until `cancelled` is set.
    pub fn until(deadline: Option<Instant>, cancelled: Option<&'a AtomicBool>) -> Budget<'a> {
        Budget {
            started: Instant::now(),
            deadline,
            cancelled,
            since_check: 0,
            done: 0,
            floor: 0,
        }
    }

    /// Counts `units` of work done; past [`CHECK_EVERY`] since the last
    /// look, looks whether the budget is spent.
    #[inline]
    fn spend(&mut self, units: u32) -> Result<(), Exceeded> {
        self.since_check = self.since_check.saturating_add(units);
        if self.since_check < CHECK_EVERY {
            return Ok(());
        }
        self.done = self.done.saturating_add(u64::from(self.since_check));
        self.since_check = 0;
        self.check()
    }

    #[cold]
    fn check(&self) -> Result<(), Exceeded> {
        if self.cancelled.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Exceeded::Cancelled);
        }
        match self.deadline {
            Some(_) if self.done < self.floor => Ok(()),
            Some(deadline) => {
                let now = Instant::now();
                match now >= deadline {
                    true => Err(Exceeded::Time {
                        spent: now - self.started,
                    }),
                    false => Ok(()),
                }
            }
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parse error at column {column}: {message}")]
pub struct QueryError {
    /// Byte offset into the parsed text.
    pub offset: usize,
    /// 1-based, counted in characters.
    pub column: usize,
    pub message: String,
}

impl Query {
    /// Parses `text`, which must hold one predicate and nothing else but whitespace.
    pub fn parse(text: &str) -> Result<Query, QueryError> {
        Ok(Self::from_parsed(text, parser::parse(text, true)?))
    }

    /// [`Query::parse`] for async callers. A query that may take long to
    /// compile, one with `~=` patterns or a long one, is compiled on a
    /// blocking thread (see `LONG_COMPILES`): a 500 KB alternation of 40 000
    /// literals took 0.12 s, which every connection queued on the async
    /// worker would otherwise have waited (BENCHMARKS.md, "Queries compiled
    /// off the async workers").
    pub async fn parse_off_workers(text: &str) -> Result<Query, QueryError> {
        if Self::compiles_at_once(text) {
            return Self::parse(text);
        }
        // Holds the permit; never closed, so never an error.
        let _turn = match text.len() > AT_ONCE_MAX && text.contains("~=") {
            true => Some(LONG_COMPILES.acquire().await),
            false => None,
        };
        let owned = text.to_owned();
        match off_workers(move || Query::parse(&owned)).await {
            Some(parsed) => parsed,
            // The runtime is shutting down: nobody is queued behind it.
            None => Self::parse(text),
        }
    }

    /// Whether `text` parses in tens of microseconds, short enough for an
    /// async worker: not long, and without `~=` patterns to compile.
    pub fn compiles_at_once(text: &str) -> bool {
        text.len() <= AT_ONCE_MAX && !text.contains("~=")
    }

    /// Parses the longest predicate at the start of `input` (leading whitespace
    /// allowed) and stops in front of the first token that cannot continue it.
    /// Returns the query and the byte offset of that token (`input.len()` if none),
    /// so whitespace after the predicate counts as consumed.
    pub fn parse_prefix(input: &str) -> Result<(Query, usize), QueryError> {
        let parsed = parser::parse(input, false)?;
        let consumed = parsed.consumed;
        Ok((Self::from_parsed(input, parsed), consumed))
    }

    fn from_parsed(source: &str, parsed: parser::Parsed) -> Query {
        Self::from_node(parsed.node, source[parsed.text].to_owned())
    }

    fn from_node(root: eval::Node, text: String) -> Query {
        Query {
            costly: root.weight() > eval::CHEAP_WEIGHT,
            root,
            text,
        }
    }

    /// `tagged "a" and tagged "b" …` where `all`, else `tagged "a" or …`:
    /// what the rule language's `tagged_all` and `tagged_any` test, equal to
    /// that query as parsed (so a reload from one form to the other keeps
    /// the stages below it). Built from the tags, not parsed from text in
    /// which they would have to be escaped.
    pub fn tagged(tags: &[String], all: bool) -> Query {
        let terms = tags.iter().map(|tag| eval::Node::Tagged(tag.clone()));
        let (root, joint) = match all {
            true => (eval::Node::all(terms.collect()), " and "),
            false => (eval::Node::any(terms.collect()), " or "),
        };
        let text = tags
            .iter()
            .map(|tag| format!("tagged {}", quoted(tag)))
            .collect::<Vec<_>>()
            .join(joint);
        Self::from_node(root, text)
    }

    /// What the predicate at the start of `input` says that is valid but
    /// seldom meant (`state = critical`, `service = "x" or "y"`), for a rule
    /// file's check to warn of; none when it does not parse.
    pub fn doubts(input: &str) -> Vec<Doubt> {
        parser::parse(input, false).map_or_else(|_| Vec::new(), |parsed| parsed.doubts)
    }

    pub fn matches(&self, event: &Event) -> bool {
        self.root.eval(event)
    }

    /// Whether evaluating the query may cost one event more than a few
    /// microseconds (see [`Query::matches_within`]): more than 16 terms, or
    /// more than one that scans a string (`=~ "%x%"`, `~=`, a long `or` of
    /// equalities).
    pub fn costly(&self) -> bool {
        self.costly
    }

    /// [`Query::matches`], given up once `budget` is spent: checked between
    /// terms, every so much work (see [`Budget`]). A query that is not
    /// [`Query::costly`] is evaluated as by [`Query::matches`], without the
    /// clock.
    pub fn matches_within(&self, event: &Event, budget: &mut Budget<'_>) -> Result<bool, Exceeded> {
        match self.costly {
            true => self.root.eval_within(event, budget),
            false => Ok(self.root.eval(event)),
        }
    }

    /// `Some((host, service))` when the query is exactly `host = "X" and service = "Y"`
    /// (either order, either operand order, possibly parenthesised), so the index can
    /// look the pair up directly instead of scanning.
    pub fn exact_key(&self) -> Option<(&str, &str)> {
        self.root.exact_key()
    }

    /// How many tests (comparisons, `tagged`, …) the query makes of an
    /// event at most: its cost per event scanned.
    pub fn terms(&self) -> usize {
        self.root.terms()
    }

    /// The source text of the predicate, without surrounding whitespace.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Two queries are equal when they say the same: whitespace and redundant
/// parentheses do not count, so a reload can tell an edited predicate from
/// a reformatted one.
impl PartialEq for Query {
    fn eq(&self, other: &Query) -> bool {
        self.root == other.root
    }
}

/// `text` as a string literal of the query language, which reads it back
/// as `text` (Java's escapes, as its parser takes them).
fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str(r#"\""#),
            '\\' => out.push_str(r"\\"),
            '\n' => out.push_str(r"\n"),
            '\t' => out.push_str(r"\t"),
            '\r' => out.push_str(r"\r"),
            '\u{8}' => out.push_str(r"\b"),
            '\u{c}' => out.push_str(r"\f"),
            // Every control character is below U+00A0: four digits hold it.
            c if c.is_control() => out.push_str(&format!(r"\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Query {
    type Err = QueryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Query::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Metric;

    fn event() -> Event {
        Event {
            host: Some("web-1".into()),
            service: Some("cpu user".into()),
            state: Some("ok".into()),
            time: 1_500_000,
            description: Some("all \"good\"\n".into()),
            tags: vec!["prod".into(), "tag with space".into()],
            metric: Some(Metric::Float(0.5)),
            ttl: Some(60.0),
            attributes: vec![("env".into(), "staging".into()), ("n".into(), "3".into())],
        }
    }

    fn q(text: &str) -> Query {
        Query::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    /// Only long queries with patterns take turns: a long one without waits
    /// for none of them.
    #[tokio::test]
    async fn a_long_query_without_patterns_does_not_wait_for_a_turn() {
        let turn = LONG_COMPILES.acquire().await.unwrap();
        let long = vec![r#"host = "a""#; 1000].join(" or ");
        assert!(!Query::compiles_at_once(&long));
        let wait = std::time::Duration::from_secs(10);
        let parsed = tokio::time::timeout(wait, Query::parse_off_workers(&long)).await;
        drop(turn);
        assert!(parsed.expect("no turn awaited").is_ok());
    }

    /// A query's patterns compile while the (single) async worker runs
    /// other tasks; a short query without any is parsed at once.
    #[tokio::test]
    async fn patterns_compile_off_the_async_worker() {
        let alternation: Vec<_> = (0..5_000).map(|i| format!("literal{i}")).collect();
        let long = format!(r#"service ~= "{}""#, alternation.join("|"));
        for (text, compiled_aside) in [(long.as_str(), true), (r#"host = "a""#, false)] {
            assert_eq!(!Query::compiles_at_once(text), compiled_aside);
            let others_ran = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counter = others_ran.clone();
            let other = tokio::spawn(async move {
                loop {
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            });
            let parsed = Query::parse_off_workers(text).await.unwrap();
            let ran = others_ran.load(std::sync::atomic::Ordering::Relaxed);
            other.abort();
            assert_eq!(parsed.as_str(), text);
            assert_eq!(ran > 0, compiled_aside, "{ran} turns of the other task");
        }
    }

    fn check(text: &str, event: &Event) -> bool {
        q(text).matches(event)
    }

    #[test]
    fn a_ttl_compares_as_the_decimal_it_was_given() {
        let e = Event {
            ttl: Some(12.3),
            ..event()
        };
        assert_all(&e, &["ttl = 12.3", "ttl <= 12.3"], &["ttl > 12.3"]);
    }

    #[track_caller]
    fn assert_all(event: &Event, yes: &[&str], no: &[&str]) {
        for text in yes {
            assert!(check(text, event), "{text:?} should match");
        }
        for text in no {
            assert!(!check(text, event), "{text:?} should not match");
        }
    }

    #[test]
    fn many_equalities_of_one_field_are_one_lookup_and_match_as_written() {
        // 21 hosts, either operand order, among other terms; 7 services.
        let mut terms: Vec<String> = (0..20).map(|i| format!("host = \"h{i}\"")).collect();
        terms.push(r#""h20" = host"#.into());
        terms.extend((0..7).map(|i| format!("service = \"s{i}\"")));
        terms.push("metric > 5".into());
        let query = q(&terms.join(" or "));
        // The hosts one test, the services and the metric one each.
        assert_eq!(query.terms(), 1 + 7 + 1);
        let of = |host: &str, service: &str, metric: f64| Event {
            host: Some(host.into()),
            service: Some(service.into()),
            metric: Some(Metric::Float(metric)),
            ..Event::default()
        };
        for (event, matches) in [
            (of("h0", "x", 0.0), true),
            (of("h20", "x", 0.0), true),
            (of("h21", "x", 0.0), false),
            (of("h2", "x", 0.0), true),
            (of("H2", "x", 0.0), false),
            (of("h21", "s6", 0.0), true),
            (of("h21", "x", 6.0), true),
            (Event::default(), false),
        ] {
            assert_eq!(query.matches(&event), matches, "{event:?}");
        }
        // The hosts in another order: it says the same.
        terms[..21].reverse();
        assert_eq!(q(&terms.join(" or ")), query);
        // An attribute too; `!=` and `=~` are not equalities.
        let chain: Vec<String> = (0..10).map(|i| format!("env = \"e{i}\"")).collect();
        let attributes = q(&format!(
            "{} or env != \"x\" or env =~ \"y%\"",
            chain.join(" or ")
        ));
        assert_eq!(attributes.terms(), 3);
        let with_env = |env: &str| Event {
            attributes: vec![("env".into(), env.into())],
            ..Event::default()
        };
        assert!(attributes.matches(&with_env("e9")));
        assert!(attributes.matches(&with_env("yes")));
        assert!(!attributes.matches(&with_env("x")));
    }

    #[test]
    fn only_queries_that_may_cost_an_event_much_are_costly() {
        let costly = |q: &str| Query::parse(q).unwrap().costly();
        for cheap in [
            "true",
            r#"service =~ "cpu%" and host = "a""#,
            r#"description =~ "%error%""#,
            r#"service ~= "^cpu""#,
            &vec!["metric > 1"; 16].join(" or "),
        ] {
            assert!(!costly(cheap), "{cheap}");
        }
        for dear in [
            &vec!["metric > 1"; 17].join(" or "),
            r#"description =~ "%a%" or description =~ "%b%""#,
            r#"description ~= "a" and service =~ "%b%""#,
        ] {
            assert!(costly(dear), "{dear}");
        }
    }

    /// With no time at all, a costly query gives up at its first look at the
    /// clock: after some 256 cheap terms, or after the first term that
    /// scanned a long string. A cheap one never looks.
    #[test]
    fn a_costly_query_gives_up_once_its_budget_is_spent() {
        let chain = (0..300).map(|i| format!("metric > {}", 1000 + i));
        let chain = q(&chain.collect::<Vec<_>>().join(" or "));
        let scans = q(r#"description =~ "%nowhere%" or description ~= "nowhere""#);
        let long = Event {
            description: Some("x".repeat(64 * 1024)),
            ..event()
        };
        for (what, query, event) in [("chain", &chain, event()), ("scans", &scans, long)] {
            let spent = query.matches_within(&event, &mut Budget::new(Duration::ZERO));
            assert!(
                matches!(spent, Err(Exceeded::Time { .. })),
                "{what}: {spent:?}"
            );
            let ample = Budget::new(Duration::from_secs(3600));
            assert_eq!(query.matches_within(&event, &mut { ample }), Ok(false));
        }
        let cheap = q(r#"service = "cpu user""#);
        let zero = &mut Budget::new(Duration::ZERO);
        assert_eq!(cheap.matches_within(&event(), zero), Ok(true));
        // A flag its asker sets stops it as well, with no deadline.
        let gone = AtomicBool::new(true);
        let stopped = chain.matches_within(&event(), &mut Budget::until(None, Some(&gone)));
        assert_eq!(stopped, Err(Exceeded::Cancelled));
        // Below its floor of work, a deadline passed does not count.
        let floored = &mut Budget::new(Duration::ZERO).with_floor(100_000);
        assert_eq!(chain.matches_within(&event(), floored), Ok(false));
        let unbounded = &mut Budget::until(None, None);
        assert_eq!(chain.matches_within(&event(), unbounded), Ok(false));
    }

    #[test]
    fn a_query_counts_its_tests() {
        let terms = |q: &str| Query::parse(q).unwrap().terms();
        assert_eq!(terms("true"), 1);
        assert_eq!(
            terms(r#"service = "a" or not (host = "b" and tagged "x")"#),
            3
        );
        let chain: Vec<String> = (0..500).map(|i| format!("metric > {i}")).collect();
        assert_eq!(terms(&chain.join(" or ")), 500);
    }

    #[test]
    fn queries_are_equal_when_they_say_the_same() {
        let same = [
            (
                r#"service="cpu" and metric>0.9"#,
                r#"service = "cpu"  and (metric > 0.9)"#,
            ),
            (
                r#"a =~ "x%" or (b ~= "^y" or tagged "t")"#,
                r#"a=~"x%" or b~="^y" or tagged "t""#,
            ),
            ("not (host = nil)", "not host = nil"),
        ];
        for (a, b) in same {
            assert_eq!(q(a), q(b), "{a} / {b}");
        }
        let different = [
            (r#"service = "cpu""#, r#"service = "cpu ""#),
            ("metric > 0.9", "metric >= 0.9"),
            ("metric > 1", "metric > 2"),
            (r#"a ~= "^y""#, r#"a ~= "^z""#),
            (r#"a = 1 and b = 2"#, r#"a = 1 or b = 2"#),
            (r#"a = 1 and b = 2"#, r#"b = 2 and a = 1"#),
        ];
        for (a, b) in different {
            assert_ne!(q(a), q(b), "{a} / {b}");
        }
    }

    #[test]
    fn string_fields_and_attributes() {
        let e = event();
        assert_all(
            &e,
            &[
                r#"host = "web-1""#,
                r#""web-1" = host"#,
                r#"service = "cpu user""#,
                r#"state != "critical""#,
                r#"description = "all \"good\"\n""#,
                r#"description = "\u0061ll \u0022good\u0022\u000A""#,
                r#"env = "staging""#,
                r#"n = "3""#,
                r#"missing = nil"#,
                r#"missing = null"#,
                r#"missing != "x""#,
            ],
            &[
                r#"host = "web-2""#,
                r#"host != "web-1""#,
                r#"state = "OK""#,
                r#"env = "prod""#,
                r#"n = 3"#,
                r#"missing = "x""#,
                r#"host = nil"#,
                r#"host < "x""#,
                r#"host >= "web-1""#,
            ],
        );
    }

    #[test]
    fn numeric_fields() {
        let e = event();
        assert_all(
            &e,
            &[
                "metric = 0.5",
                "metric_f = 0.5",
                "metric > 0",
                "metric >= 0.5",
                "metric <= 0.5",
                "metric < 1",
                "metric != 1",
                "ttl = 60",
                "ttl > 59.9",
                "time = 1.5",
                "time > 1",
                "time < 2",
                "1 < 2",
                "-1 < 0",
                "2.5e1 = 25",
            ],
            &[
                "metric = 1",
                "metric > 0.5",
                "metric < 0.5",
                "metric = \"0.5\"",
                "ttl < 60",
                "time = 1",
            ],
        );
    }

    #[test]
    fn long_and_bigint_literals_are_integers() {
        let mut e = event();
        e.metric = Some(Metric::Int(2));
        assert_all(
            &e,
            &[
                "metric = 2N",
                "metric = 2L",
                "metric > 1l",
                "metric < 3n",
                "2N = 2",
            ],
            &["metric = 1L", "metric != 2N", "metric = -2N"],
        );
        assert_eq!(q("metric = 2N"), q("metric = 2"));
        assert!(Query::parse("metric = 2.0N").is_err());
    }

    #[test]
    fn integer_and_float_metrics_compare_as_numbers() {
        let mut e = event();
        e.metric = Some(Metric::Float(1.0));
        assert!(check("metric = 1", &e));
        assert!(check("metric = 1.0", &e));
        assert!(!check("metric != 1", &e));
        e.metric = Some(Metric::Int(1));
        assert!(check("metric = 1", &e));
        assert!(check("metric = 1.0", &e));
        e.metric = Some(Metric::Int(9_007_199_254_740_993));
        assert!(check("metric = 9007199254740993", &e));
        assert!(
            !check("metric = 9007199254740992", &e),
            "int vs int is exact"
        );
        assert!(check("metric > 9007199254740992", &e));
    }

    #[test]
    fn nil_handling() {
        let e = Event::default();
        assert_all(
            &e,
            &[
                "metric = nil",
                "ttl = nil",
                "host = null",
                "nil = nil",
                "metric != 0",
                "host != \"a\"",
                "not metric",
                "not host",
                "time",
                "time = 0",
            ],
            &[
                "metric",
                "host",
                "metric > 0",
                "metric < 0",
                "metric <= 0",
                "nil < 1",
                "nil = false",
                "host =~ \"%\"",
            ],
        );
    }

    #[test]
    fn infinity_and_nan() {
        let mut e = event();
        e.metric = Some(Metric::Float(f64::INFINITY));
        assert_all(
            &e,
            &["metric = Infinity", "metric > 1e300", "metric > -Infinity"],
            &["metric < Infinity"],
        );
        e.metric = Some(Metric::Float(f64::NAN));
        assert_all(
            &e,
            &["metric != NaN", "metric != 1", "metric", "NaN"],
            &[
                "metric = NaN",
                "metric < 1",
                "metric > 1",
                "metric <= NaN",
                "metric >= -Infinity",
                "-NaN = -NaN",
            ],
        );
    }

    /// Valid, and seldom meant: an unquoted word compared with one of the
    /// event's own fields, a bare value tested on its own.
    #[test]
    fn doubts_point_at_what_is_seldom_meant() {
        fn doubts(text: &str) -> Vec<(&str, String)> {
            (Query::doubts(text).into_iter())
                .map(|d| (&text[d.span.clone()], d.message))
                .collect()
        }
        assert_eq!(
            doubts("state = critical or critical != state"),
            [
                (
                    "critical",
                    "`critical` is the attribute named `critical` here, not the text".into()
                ),
                (
                    "critical",
                    "`critical` is the attribute named `critical` here, not the text".into()
                ),
            ]
        );
        assert_eq!(
            doubts(r#"service = "x" or "y" or (metric > 1 and 0)"#),
            [
                (
                    r#""y""#,
                    r#"`"y"` on its own tests no field: it is always true"#.into()
                ),
                (
                    "0",
                    "`0` on its own tests no field: it is always true".into()
                ),
            ]
        );
        let meant = [
            r#"state = "critical""#,
            "env = prod",
            "true or false or nil or null",
            "host and not description",
            "metric > 3 and ttl < 10.5",
            r#"tagged "a" and service =~ "x%""#,
        ];
        for text in meant {
            assert_eq!(doubts(text), [], "{text}");
        }
        assert_eq!(doubts("state = "), [], "no doubts where it does not parse");
        let hint = &Query::doubts("state = critical")[0].hint;
        assert_eq!(hint, r#"quote it to compare with the text: `"critical"`"#);
    }

    #[test]
    fn truthiness_of_bare_values() {
        let e = event();
        assert_all(
            &e,
            &[
                "true",
                "host",
                "env",
                "\"x\"",
                "\"\"",
                "0",
                "-1.5",
                "metric",
                "ttl",
                "true = true",
            ],
            &[
                "false",
                "nil",
                "null",
                "missing",
                "description2",
                "true = false",
                "true = 1",
            ],
        );
        assert!(check("true", &Event::default()));
    }

    #[test]
    fn like_and_regex() {
        let e = event();
        assert_all(
            &e,
            &[
                r#"service =~ "cpu%""#,
                r#"service =~ "%user""#,
                r#"service =~ "%""#,
                r#"host =~ "web-_""#.replace('_', "1").as_str(),
                r#"env =~ "st%g%g""#,
                r#""abc" =~ "a%c""#,
                r#"service ~= "^cpu""#,
                r#"service ~= "u.e""#,
                r#"host ~= "\\d$""#,
                r#"description ~= "\n""#,
                r#"host ~= "(a+)+$|web""#,
            ],
            &[
                r#"service =~ "cpu""#,
                r#"service =~ "user%""#,
                r#"service =~ """#,
                r#"host =~ "web_1""#,
                r#"metric =~ "%""#,
                r#"missing =~ "%""#,
                r#"service ~= "^user""#,
                r#"metric ~= ".""#,
                r#"missing ~= """#,
            ],
        );
    }

    #[test]
    fn pathological_regex_is_linear() {
        let mut e = event();
        e.host = Some(format!("{}!", "a".repeat(50_000)));
        let started = std::time::Instant::now();
        assert!(!check(r#"host ~= "^(a+)+$""#, &e));
        assert!(check(r#"host ~= "(a+)+!""#, &e));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let e = Query::parse(r#"host ~= "\\w{1000}{1000}""#).unwrap_err();
        assert_eq!(
            e.message,
            "invalid regex: too large (compiled size limit 1048576 bytes)"
        );
        assert_eq!(e.column, 9);
        // `\w`, `\d` and `\s` are Java's ASCII classes, which fit where the
        // regex crate's Unicode ones did not.
        for pattern in [
            r"\\w{24}",
            r"\\w+@\\w+\\.\\w{2,30}",
            r"\\d{500}",
            r"\\w{1000}",
        ] {
            Query::parse(&format!(r#"service ~= "{pattern}""#)).unwrap();
        }
    }

    #[test]
    fn a_querys_regexes_share_one_budget() {
        // Each near its own cap; a query within --max-string could hold
        // forty thousand, each compiling to a megabyte.
        let big = r#"service ~= ".{1000}""#;
        let four = [big; 4].join(" or ");
        Query::parse(&four).unwrap();
        let e = Query::parse(&format!("{four} or {big}")).unwrap_err();
        assert!(
            e.message.starts_with("too many or too large regexes"),
            "{e}"
        );
        assert_eq!(e.column, four.len() + " or service ~= ".len() + 1);
        let many_small = vec![r#"host ~= "^web[0-9]+$""#; 1000].join(" or ");
        let e = Query::parse(&many_small).unwrap_err();
        assert!(e.message.contains("4 MiB together"), "{e}");
    }

    #[test]
    fn tagged() {
        let e = event();
        assert_all(
            &e,
            &[
                r#"tagged "prod""#,
                r#"tagged "tag with space""#,
                r#"not tagged "dev""#,
            ],
            &[
                r#"tagged "dev""#,
                r#"tagged "pro""#,
                r#"tagged "prod" and tagged "dev""#,
            ],
        );
    }

    /// A query made of tags is the one its text parses to, whatever the
    /// tags hold: it shows as it tests.
    #[test]
    fn tagged_of_tags_is_the_query_its_text_says() {
        let tags = [
            "prod",
            "a \"quoted\" \\ tag",
            "new\nline\t\u{1}\u{8}\u{c}\r\u{7f}é",
        ]
        .map(str::to_owned);
        for all in [true, false] {
            let query = Query::tagged(&tags, all);
            assert_eq!(Query::parse(query.as_str()), Ok(query.clone()), "{query}");
        }
        let query = Query::tagged(&tags[..2], true);
        let written = r#"tagged "prod" and tagged "a \"quoted\" \\ tag""#;
        assert_eq!(query.as_str(), written);
        assert_eq!(
            Query::tagged(&tags[..1], false).as_str(),
            r#"tagged "prod""#
        );

        let e = event();
        let prod_dev = ["prod", "dev"].map(str::to_owned);
        assert!(!Query::tagged(&prod_dev, true).matches(&e));
        assert!(Query::tagged(&prod_dev, false).matches(&e));
        assert!(Query::tagged(&prod_dev[..1], true).matches(&e));
    }

    /// A random tag: mostly what a query's text must escape or could read
    /// otherwise (quotes, backslashes, `\u`, control characters, spaces,
    /// keywords, parentheses), some any character, a few empty or long.
    fn random_tag(next: &mut impl FnMut() -> u64) -> String {
        const TRICKY: &[char] = &[
            '"', '\\', 'u', '0', 'a', ' ', ',', '(', ')', '{', '\n', '\r', '\t', '\0', '\u{8}',
            '\u{c}', '\u{7f}', '\u{85}', '\u{9f}', '\u{a0}', '\u{2028}', '\u{feff}', 'é', '€',
            '😀', '=', '~', '%',
        ];
        let len = match next() % 16 {
            0 => 0,
            1 => 5_000 + next() % 5_000,
            _ => next() % 12,
        };
        (0..len)
            .map(|_| match next() % 4 {
                0 => char::from_u32((next() % 0x11_0000) as u32).unwrap_or('?'),
                _ => TRICKY[(next() as usize) % TRICKY.len()],
            })
            .collect()
    }

    /// Over many random tag sets: the text of a tag query parses back to
    /// that query and shows the same, it tests what it says, and two tag
    /// queries are equal (a reload keeps the state below) only when they
    /// test the same tags the same way.
    #[test]
    fn tagged_of_any_tags_parses_back_to_itself_and_tests_them() {
        let mut next = crate::test_rng::xorshift(0x7a66_6564);
        let words = ["and", "or", "not", "tagged", "a"].map(str::to_owned);
        for round in 0..2_000 {
            let mut tags: Vec<String> =
                (0..1 + next() % 4).map(|_| random_tag(&mut next)).collect();
            if round % 7 == 0 {
                tags.push(words[(next() as usize) % words.len()].clone());
            }
            let all = next().is_multiple_of(2);
            let query = Query::tagged(&tags, all);
            let parsed = Query::parse(query.as_str())
                .unwrap_or_else(|e| panic!("round {round}: {tags:?}: {e}"));
            assert_eq!(parsed, query, "round {round}: {tags:?}");
            assert_eq!(parsed.as_str(), query.as_str(), "round {round}");

            let mut e = event();
            e.tags = tags[..(next() as usize) % (tags.len() + 1)].to_vec();
            let has = |t: &String| e.tags.contains(t);
            let expected = match all {
                true => tags.iter().all(has),
                false => tags.iter().any(has),
            };
            assert_eq!(
                query.matches(&e),
                expected,
                "round {round}: {tags:?} on {:?}",
                e.tags
            );

            let mut other = tags.clone();
            match next() % 4 {
                0 => other.reverse(),
                1 => other.push(tags[0].clone()),
                2 => other[0].push('x'),
                _ => {}
            }
            let other_all = next().is_multiple_of(2);
            let same = other == tags && (other_all == all || tags.len() == 1);
            assert_eq!(
                Query::tagged(&other, other_all) == query,
                same,
                "round {round}: {tags:?} {all} and {other:?} {other_all}"
            );
        }
    }

    #[test]
    fn precedence() {
        // `a or b and c` is `a or (b and c)`.
        assert!(check("true or false and false", &Event::default()));
        assert!(!check("(true or false) and false", &Event::default()));
        // `not a and b` is `(not a) and b`.
        assert!(!check("not false and false", &Event::default()));
        assert!(check("not (false and false)", &Event::default()));
        assert!(check("not not true", &Event::default()));
        assert!(check("false or false or true", &Event::default()));
        assert!(check("not false or false and true", &Event::default()));
        let e = event();
        assert!(check(
            r#"state = "x" or host = "web-1" and tagged "prod""#,
            &e
        ));
        assert!(!check(r#"state = "ok" and host = "x" or not metric"#, &e));
    }

    #[test]
    fn keywords_are_lowercase_and_whole_words() {
        let attributes = [("AND", "1"), ("android", "2"), ("nothing", "3")];
        let e = Event {
            attributes: attributes
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .to_vec(),
            ..Event::default()
        };
        assert!(check("AND and android and nothing", &e));
        assert!(check(r#"nothing = "3""#, &e));
        assert!(Query::parse("host AND service").is_err());
        assert!(Query::parse("TRUE").is_ok(), "an attribute, not a keyword");
        assert!(!check("TRUE", &e));
    }

    #[test]
    fn attribute_names_as_riemann_reads_them() {
        let e = Event {
            attributes: [("k:v", "colon"), ("is?", "q"), ("Über", "u"), ("and?", "a")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .to_vec(),
            ..event()
        };
        assert_all(
            &e,
            &[
                r#"k:v = "colon""#,
                r#"is? = "q""#,
                r#"Über = "u""#,
                r#"is?="q" and Über="u""#,
                r#"and? = "a" and not k = "colon""#,
                r#"host="web-1" and metric>0"#,
                "not (k:v != \"colon\") or false",
            ],
            &[r#"k:v = "v""#, r#"k = "colon""#, r#"über = "u""#, "is"],
        );
        // A predicate still ends in front of a rule's `{`.
        let (query, consumed) = Query::parse_prefix(r#"Über = "u"{ x }"#).unwrap();
        assert_eq!(
            (query.as_str(), consumed),
            (r#"Über = "u""#, "Über = \"u\"".len())
        );
        assert!(query.matches(&e));
    }

    #[test]
    fn commas_and_whitespace() {
        let e = event();
        assert!(check(",host,=,\"web-1\",and\ttagged\r\n\"prod\",,", &e));
        assert!(check("(host)and(metric)", &e));
        assert!(check("not(missing)", &e));
    }

    #[test]
    fn text_display_and_from_str() {
        let query: Query = "  host = \"a\" and\n metric > 1 , ".parse().unwrap();
        assert_eq!(query.as_str(), "host = \"a\" and\n metric > 1");
        assert_eq!(query.to_string(), query.as_str());
        let err = "host =".parse::<Query>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "parse error at column 7: expected a value after `=`, found end of input"
        );
        assert_eq!(err.offset, 6);
    }

    #[test]
    fn parse_prefix_stops_before_the_block() {
        let input = r#"metric > 300 or state = "expired" { ... }"#;
        let (query, consumed) = Query::parse_prefix(input).unwrap();
        assert_eq!(&input[consumed..], "{ ... }");
        assert_eq!(query.as_str(), r#"metric > 300 or state = "expired""#);
        let mut e = event();
        assert!(!query.matches(&e));
        e.state = Some("expired".into());
        assert!(query.matches(&e));

        let (query, consumed) = Query::parse_prefix("  (tagged \"a\")\n{").unwrap();
        assert_eq!((query.as_str(), consumed), ("(tagged \"a\")", 15));
        let (query, consumed) = Query::parse_prefix("host").unwrap();
        assert_eq!((query.as_str(), consumed), ("host", 4));
        // A value cannot follow a complete comparison, nor can an unterminated string.
        let (query, consumed) = Query::parse_prefix("host = \"a\" \"b\"").unwrap();
        assert_eq!((query.as_str(), consumed), ("host = \"a\"", 11));
        let (_, consumed) = Query::parse_prefix("host = \"a\" \"b").unwrap();
        assert_eq!(consumed, 11);
        let (_, consumed) = Query::parse_prefix("\"ü\" = \"é\" } x").unwrap();
        assert_eq!(consumed, "\"ü\" = \"é\" ".len());

        // Errors inside the predicate are still errors, with offsets into `input`.
        let e = Query::parse_prefix("  metric > 300 or { }").unwrap_err();
        assert_eq!(
            (e.offset, e.column, e.message.as_str()),
            (18, 19, "expected a value, found `{`")
        );
        let e = Query::parse_prefix("{").unwrap_err();
        assert_eq!(e.column, 1);
    }

    #[test]
    fn exact_key() {
        for text in [
            r#"host = "a" and service = "b""#,
            r#"service = "b" and host = "a""#,
            r#""a" = host and "b" = service"#,
            r#"(host = "a" and service = "b")"#,
            r#"((host = "a") and ("b" = service))"#,
        ] {
            assert_eq!(q(text).exact_key(), Some(("a", "b")), "{text}");
        }
        for text in [
            r#"host = "a" or service = "b""#,
            r#"host =~ "a" and service = "b""#,
            r#"host = "a" and service = "b" and state = "ok""#,
            r#"(host = "a" and service = "b") and tagged "x""#,
            r#"host = "a" and host = "b""#,
            r#"host = "a" and service != "b""#,
            r#"host = "a" and service = 1"#,
            r#"host = "a" and not service = "b""#,
            r#"not (host = "a" and service = "b")"#,
            r#"host = "a""#,
            r#"host = service and service = "b""#,
        ] {
            assert_eq!(q(text).exact_key(), None, "{text}");
        }
    }

    #[test]
    fn long_chains_evaluate_without_deep_recursion() {
        let text = vec![r#"host = "web-1""#; 100_000].join(" and ");
        assert!(check(&text, &event()));
        let text = format!("{} or true", vec!["false"; 100_000].join(" or "));
        assert!(check(&text, &event()));
    }

    /// Deterministic fuzzing: random token soups must never panic, errors must
    /// point inside the input, and successful parses must round-trip via Display.
    #[test]
    fn fuzz_never_panics_and_round_trips() {
        const PIECES: &[&str] = &[
            "host",
            "service",
            "metric",
            "ttl",
            "time",
            "env",
            "state",
            "and",
            "or",
            "not",
            "tagged",
            "true",
            "false",
            "nil",
            "null",
            "=",
            "!=",
            "<",
            ">",
            "<=",
            ">=",
            "=~",
            "~=",
            "(",
            ")",
            "\"a%\"",
            "\"%b\"",
            "\"web-1\"",
            "\"(a+)+$\"",
            "\"[\"",
            "\"\\q\"",
            "\"unterminated",
            "\\",
            "1",
            "-2.5e3",
            "0.5",
            "Infinity",
            "-Infinity",
            "NaN",
            "99999999999999999999",
            " ",
            " ",
            ",",
            "\n",
            "{",
            "}",
            "ü",
            "-",
            ".",
            "\"",
            "e",
            "_x",
        ];
        let mut next = crate::test_rng::xorshift(0x9E37_79B9_7F4A_7C15);
        let samples = [event(), Event::default()];
        let mut parsed = 0;
        for _ in 0..20_000 {
            let len = next() % 12;
            let mut text = String::new();
            for _ in 0..len {
                let r = next();
                if r.is_multiple_of(5) {
                    // Raw characters, including some that start no token.
                    text.push(char::from(
                        b" ()\"\\=<>!~%,.-_aZ9{}"[(r >> 8) as usize % 20],
                    ));
                } else {
                    text.push_str(PIECES[(r >> 8) as usize % PIECES.len()]);
                    if r & 0x10 != 0 {
                        text.push(' ');
                    }
                }
            }
            match Query::parse(&text) {
                Ok(query) => {
                    parsed += 1;
                    let again = Query::parse(&query.to_string()).expect("Display must re-parse");
                    assert_eq!(again.as_str(), query.as_str());
                    for e in &samples {
                        assert_eq!(again.matches(e), query.matches(e), "{text:?}");
                    }
                }
                Err(e) => {
                    assert!(text.is_char_boundary(e.offset), "{text:?}: {e:?}");
                    assert_eq!(e.column, text[..e.offset].chars().count() + 1);
                }
            }
            match Query::parse_prefix(&text) {
                Ok((query, consumed)) => {
                    assert!(text.is_char_boundary(consumed), "{text:?}");
                    assert!(text[..consumed].contains(query.as_str()));
                    let again = Query::parse(query.as_str()).expect("a prefix must parse alone");
                    assert_eq!(again.as_str(), query.as_str());
                }
                Err(e) => assert!(text.is_char_boundary(e.offset), "{text:?}: {e:?}"),
            }
        }
        assert!(
            parsed > 1_000,
            "the fuzz alphabet should yield many valid queries, got {parsed}"
        );
    }
}
