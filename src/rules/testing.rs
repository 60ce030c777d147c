//! `vigil test`: runs the `test "…" { … }` blocks of a rule file against fresh
//! rules on a virtual clock, with every output recorded instead of delivered.
//!
//! `at 5s` moves the clock forward in [`TICK`] steps, expiring the index and
//! ticking the timers at each step, exactly as the server's timer would.
//! `expect TARGET {fields}` passes when something TARGET (the index, or an
//! output) holds or received matches every field given; `expect no` inverts it.
//! `expect tap NAME {fields}` checks what reached stage `tap(NAME)` likewise,
//! `expect publish TOPIC {fields}` what the `publish(TOPIC)` stages published.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde_json::Value as Json;

use crate::clock::{Clock, MICROS_PER_SEC, ManualClock, Micros, SharedClock, secs_to_micros};
use crate::event::{Event, Metric, number_text, ttl_f64};
use crate::index::{Index, IndexConfig};
use crate::json::{iso8601, to_json};
use crate::outputs::pager::{self, Pages};
use crate::outputs::{OutputKind, OutputSink};
use crate::query::Query;
use crate::streams::Streams;

use super::ast::{Expected, Ident, RuleFile, Stmt, TestAction, Value, ValueKind};
use super::compile::{EnvPolicy, compile};
use super::diag::Diagnostic;
use super::engine::{MAX_REINJECT_ROUNDS, Rules};

/// Virtual time at the start of every test: 2024-01-01T00:00:00Z.
pub const TEST_EPOCH: Micros = 1_704_067_200 * MICROS_PER_SEC;

/// The timer's step while virtual time advances.
pub const TICK: Micros = super::engine::DEFAULT_TICK;

#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    /// Empty when the test passed.
    pub failures: Vec<String>,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The failures as `vigil test` prints them under the test's name, one
    /// indented line (and its continuation lines) each.
    pub fn failure_text(&self) -> String {
        self.failures.iter().map(|f| format!("    {f}\n")).collect()
    }
}

/// Runs every test of an already parsed file. Steps that make a test
/// meaningless ([`check_tests`]) are returned as diagnostics.
pub fn run_tests(file: &RuleFile) -> Result<Vec<Outcome>, Vec<Diagnostic>> {
    let plans = plan(file)?;
    file.tests
        .iter()
        .zip(plans)
        .map(|(test, steps)| run_one(file, &test.name, &steps))
        .collect()
}

/// What makes a test step meaningless, found without running it (so `vigil
/// check` reports it too): an `expect` of no such output, tap or topic, or
/// not given a map, a `send` of no event, an `at` earlier than the step
/// before.
pub fn check_tests(file: &RuleFile) -> Vec<Diagnostic> {
    plan(file).err().unwrap_or_default()
}

/// A test step, read once before any test runs.
struct Step {
    at: Option<Micros>,
    action: Action,
}

enum Action {
    /// The events, as one batch (one `Msg` of an agent), each with whether
    /// it gave its `time` (else it is sent at the step's time).
    Send(Vec<(Event, bool)>),
    Expect {
        target: String,
        /// Whether `target` names an output, a tap or a topic.
        of: Expected,
        wanted: Vec<(String, Json)>,
        negated: bool,
    },
}

/// Every test's steps, read; or what makes any of them meaningless.
fn plan(file: &RuleFile) -> Result<Vec<Vec<Step>>, Vec<Diagnostic>> {
    let outputs: Vec<String> = file.outputs.iter().map(|o| o.name.name.clone()).collect();
    let (mut taps, mut topics) = (Vec::new(), Vec::new());
    named_in(&file.streams, "tap", &mut taps);
    named_in(&file.streams, "publish", &mut topics);
    let mut problems = Vec::new();
    let mut plans = Vec::with_capacity(file.tests.len());
    for test in &file.tests {
        let mut latest = 0;
        let mut steps = Vec::with_capacity(test.steps.len());
        for step in &test.steps {
            if let Some(at) = step.at {
                if at < latest {
                    problems.push(Diagnostic::new(
                        step.span.clone(),
                        format!(
                            "`at {}s` is earlier than the step before (at {}s); steps move forward in time",
                            at as f64 / 1e6,
                            latest as f64 / 1e6
                        ),
                    ));
                }
                if TEST_EPOCH.checked_add(at).is_none() {
                    problems.push(Diagnostic::new(
                        step.span.clone(),
                        format!(
                            "`at {}s` is past what the clock holds (about 292 000 years from 1970)",
                            at as f64 / 1e6
                        ),
                    ));
                }
                latest = latest.max(at);
            }
            let action = match &step.action {
                TestAction::Send(value) => match &value.kind {
                    ValueKind::List(items) if !items.is_empty() => {
                        items.iter().map(event_from).collect::<Result<_, _>>()
                    }
                    _ => event_from(value).map(|sent| vec![sent]),
                }
                .map(Action::Send),
                TestAction::Expect {
                    target,
                    of: Expected::Tap,
                    ..
                } if !taps.contains(&target.name) => Err(unknown_tap(target, &taps)),
                TestAction::Expect {
                    target,
                    of: Expected::Publish,
                    ..
                } if !topics.contains(&target.name) => Err(unknown_topic(target, &topics)),
                TestAction::Expect {
                    target,
                    of: Expected::Output,
                    ..
                } if target.name != "index" && !outputs.contains(&target.name) => {
                    Err(unknown_target(target, &outputs))
                }
                TestAction::Expect {
                    target,
                    fields,
                    negated,
                    of,
                } => expected_fields(fields).map(|wanted| Action::Expect {
                    target: target.name.clone(),
                    of: *of,
                    wanted,
                    negated: *negated,
                }),
            };
            match action {
                Ok(action) => steps.push(Step {
                    at: step.at,
                    action,
                }),
                Err(problem) => problems.push(problem),
            }
        }
        plans.push(steps);
    }
    if problems.is_empty() {
        Ok(plans)
    } else {
        Err(problems)
    }
}

fn unknown_target(target: &Ident, outputs: &[String]) -> Diagnostic {
    let mut known = vec!["index".to_owned()];
    known.extend(outputs.iter().cloned());
    Diagnostic::new(
        target.span.clone(),
        format!("`expect {}`: no such output", target.name),
    )
    .with_hint(format!("expect can check: {}", known.join(", ")))
}

fn unknown_tap(target: &Ident, taps: &[String]) -> Diagnostic {
    let problem = Diagnostic::new(
        target.span.clone(),
        format!("`expect tap {}`: no such tap", target.name),
    );
    match taps {
        [] => problem.with_hint(format!(
            "put `tap({})` in the streams where the events are to be seen",
            target.name
        )),
        taps => problem.with_hint(format!("the streams' taps: {}", taps.join(", "))),
    }
}

fn unknown_topic(target: &Ident, topics: &[String]) -> Diagnostic {
    let problem = Diagnostic::new(
        target.span.clone(),
        format!("`expect publish {}`: no stage publishes to it", target.name),
    );
    match topics {
        [] => problem.with_hint(format!(
            "put `publish(\"{}\")` in the streams where the events are to go",
            target.name
        )),
        topics => problem.with_hint(format!("the topics published to: {}", topics.join(", "))),
    }
}

/// The names the `stage(NAME)` stages in `stmts` take (`tap`'s, `publish`'s
/// topics), in the file's order, each once; a malformed or repeated one is
/// compiling's to report.
fn named_in(stmts: &[Stmt], stage: &str, out: &mut Vec<String>) {
    for stmt in stmts {
        if let Stmt::Call {
            name,
            args: Some(args),
            ..
        } = stmt
            && name.name == stage
            && let [arg] = args.as_slice()
            && let ValueKind::Ident(named) | ValueKind::String(named) = &arg.value.kind
            && !out.contains(named)
        {
            out.push(named.clone());
        }
        for block in stmt.blocks() {
            named_in(&block.stmts, stage, out);
        }
    }
}

/// The most events one output keeps in a test (some hundreds of MB); a test
/// that sends more fails rather than run out of memory.
pub const MAX_RECORDED: usize = if cfg!(test) { 1_000 } else { 1_000_000 };

/// Records what it is given, in place of delivery: the first
/// [`MAX_RECORDED`] events, counting the rest. A pager output's records only
/// the events it would send as pages.
#[derive(Default)]
pub struct Recorder {
    pub events: Mutex<Vec<Event>>,
    pub not_kept: AtomicU64,
    /// For a pager output: which events it pages, on the test's clock.
    pages: Option<(Mutex<Pages>, SharedClock)>,
}

impl Recorder {
    /// The recorder of a pager output that would page as `config` says.
    pub fn of_pager(config: pager::Config, clock: SharedClock) -> Recorder {
        Recorder {
            pages: Some((Mutex::new(Pages::new(config)), clock)),
            ..Recorder::default()
        }
    }
}

impl OutputSink for Recorder {
    fn push(&self, event: Event) {
        if let Some((pages, clock)) = &self.pages
            && !pages.lock().sends(&event, clock.now())
        {
            return;
        }
        let mut events = self.events.lock();
        if events.len() < MAX_RECORDED {
            events.push(event);
        } else {
            self.not_kept.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The most timer ticks one test may run: a day of virtual time with a
/// timer due at every 100 ms tick takes a few seconds. Past it the test
/// fails instead of running for hours and recording outputs without end.
/// (Fewer in unit tests, which reach it on purpose.)
pub const MAX_TEST_TICKS: usize = if cfg!(test) { 1_000 } else { 1_000_000 };

/// Moves `clock` to `target` in [`TICK`] steps, each followed by the index's
/// expiry and the rules' timers, as the server's timer would. Steps at which
/// nothing is due are skipped: they would change nothing, and stepping
/// through them made `at 3650d` run for most of an hour. Returns how many
/// steps it ran.
pub fn advance(clock: &ManualClock, index: &Index, rules: &Rules, target: Micros) -> usize {
    advance_at_most(clock, index, rules, target, usize::MAX)
}

/// [`advance`], stopping after `max_steps` steps short of `target` if it
/// has not reached it by then.
pub fn advance_at_most(
    clock: &ManualClock,
    index: &Index,
    rules: &Rules,
    target: Micros,
    max_steps: usize,
) -> usize {
    // Events sent since the last step may have started a timer; the first
    // step's tick tells.
    let mut rules_due = Micros::MIN;
    let mut steps = 0;
    while clock.now() < target && steps < max_steps {
        steps += 1;
        let now = clock.now();
        let due = index
            .next_expiry()
            .map_or(rules_due, |at| at.min(rules_due));
        let next = now.saturating_add(steps_until(now, due).saturating_mul(TICK));
        let next = next.min(target);
        clock.set(next);
        index.expire_batches(next, |notices| rules.process_expired(notices));
        rules_due = rules.tick_scheduled().unwrap_or(Micros::MAX);
    }
    steps
}

/// How many [`TICK`] steps from `now` reach `due`: at least one.
fn steps_until(now: Micros, due: Micros) -> Micros {
    let gap = due.saturating_sub(now).max(1);
    gap / TICK + Micros::from(gap % TICK != 0)
}

/// Fresh rules on a virtual clock with every output recorded; also the
/// harness of the stream stages' unit tests.
pub(crate) struct Bench {
    pub clock: Arc<ManualClock>,
    pub index: Arc<Index>,
    pub rules: Rules,
    pub recorders: Vec<(String, Arc<Recorder>)>,
    /// What reached each `tap`, by name.
    pub taps: Vec<(String, Arc<Recorder>)>,
    /// What the `publish` stages published, by topic.
    pub topics: Vec<(String, Arc<Recorder>)>,
}

impl Bench {
    pub fn new(file: &RuleFile) -> Result<Bench, Vec<Diagnostic>> {
        Self::with_index(file, IndexConfig::default())
    }

    /// With an index configured as `config`.
    pub fn with_index(file: &RuleFile, config: IndexConfig) -> Result<Bench, Vec<Diagnostic>> {
        let compiled = compile(file, EnvPolicy::Lenient)?;
        let clock = Arc::new(ManualClock::new(TEST_EPOCH));
        let index = Arc::new(Index::new(config));
        let shared: SharedClock = clock.clone();
        let recorder = |kind: &OutputKind| match kind {
            OutputKind::Pager(config) => Recorder::of_pager(config.clone(), shared.clone()),
            _ => Recorder::default(),
        };
        let recorders: Vec<(String, Arc<Recorder>)> = compiled
            .outputs
            .iter()
            .map(|o| (o.name.clone(), Arc::new(recorder(&o.kind))))
            .collect();
        let mut sinks: Vec<Arc<dyn OutputSink>> = (recorders.iter())
            .map(|(_, r)| r.clone() as Arc<dyn OutputSink>)
            .collect();
        // The taps' and topics' recorders after the outputs', in the
        // order their stages look for them.
        let (mut taps, mut topics) = (Vec::new(), Vec::new());
        for (of, name) in compiled.recorded {
            let recorder = Arc::new(Recorder::default());
            sinks.push(recorder.clone());
            let to = if of == Expected::Publish {
                &mut topics
            } else {
                &mut taps
            };
            to.push((name, recorder));
        }
        let rules = Rules::new(compiled.roots, None, sinks, index.clone(), shared);
        Ok(Bench {
            clock,
            index,
            rules,
            recorders,
            taps,
            topics,
        })
    }

    /// Moves virtual time to `target` in [`TICK`] steps, running expiry and timers.
    #[cfg(test)]
    pub fn advance_to(&self, target: Micros) -> usize {
        advance(&self.clock, &self.index, &self.rules, target)
    }

    /// The index's entries, or everything an output received.
    pub fn seen_by(&self, target: &str) -> Vec<Event> {
        if target == "index" {
            return self
                .index
                .query(&Query::parse("true").expect("constant query"))
                .expect("no limit on a test's index");
        }
        self.recorders
            .iter()
            .find(|(name, _)| name == target)
            .map(|(_, r)| r.events.lock().clone())
            .unwrap_or_default()
    }

    /// Everything that reached tap `name`.
    pub fn tapped(&self, name: &str) -> Vec<Event> {
        recorded(&self.taps, name)
    }

    /// Everything the `publish` stages published to `topic`.
    pub fn published(&self, topic: &str) -> Vec<Event> {
        recorded(&self.topics, topic)
    }

    /// Every recorder, outputs', taps' and topics', with what a failure calls it.
    fn all_recorders(&self) -> impl Iterator<Item = (String, &Arc<Recorder>)> {
        let outputs = (self.recorders.iter()).map(|(name, r)| (name.clone(), r));
        let taps = (self.taps.iter()).map(|(name, r)| (format!("tap {name}"), r));
        let topics = (self.topics.iter()).map(|(name, r)| (format!("publish {name}"), r));
        outputs.chain(taps).chain(topics)
    }
}

/// What the recorder named `name` in `recorders` holds.
fn recorded(recorders: &[(String, Arc<Recorder>)], name: &str) -> Vec<Event> {
    (recorders.iter())
        .find(|(named, _)| named == name)
        .map(|(_, r)| r.events.lock().clone())
        .unwrap_or_default()
}

fn run_one(file: &RuleFile, test_name: &str, steps: &[Step]) -> Result<Outcome, Vec<Diagnostic>> {
    let bench = Bench::new(file)?;
    let mut failures = Vec::new();
    let mut ticks = 0;
    for step in steps {
        if let Some(at) = step.at {
            let target = TEST_EPOCH.saturating_add(at);
            match advance_test(&bench, target, &mut ticks) {
                Advanced::Reached => {}
                Advanced::OutOfTicks => {
                    failures.push(format!(
                        "`at {}s`: stopped at {}s after {MAX_TEST_TICKS} timer ticks, {} ms \
                         apart, with something due at each, the most one test may run (a stage \
                         with a short interval kept busy across a long jump?)",
                        at as f64 / 1e6,
                        (bench.clock.now() - TEST_EPOCH) as f64 / 1e6,
                        TICK / 1000,
                    ));
                    break;
                }
                // Reported with the other outputs' counts below.
                Advanced::OutputFull => break,
            }
        }
        match &step.action {
            Action::Send(sent) => {
                let now = bench.clock.now();
                let batch: Vec<Event> = sent
                    .iter()
                    .map(|(event, timed)| Event {
                        time: if *timed { event.time } else { now },
                        ..event.clone()
                    })
                    .collect();
                bench.rules.process(&batch);
            }
            Action::Expect {
                target,
                of,
                wanted,
                negated,
            } => {
                let (seen, target) = match of {
                    Expected::Tap => (bench.tapped(target), format!("tap {target}")),
                    Expected::Publish => (bench.published(target), format!("publish {target}")),
                    Expected::Output => (bench.seen_by(target), target.clone()),
                };
                if let Err(e) = expect(&seen, &target, wanted, *negated) {
                    failures.push(e);
                }
            }
        }
    }
    for (name, recorder) in bench.all_recorders() {
        let not_kept = recorder.not_kept.load(Ordering::Relaxed);
        if not_kept > 0 {
            failures.push(format!(
                "{name} received {} events, more than the {MAX_RECORDED} a test keeps",
                MAX_RECORDED as u64 + not_kept
            ));
        }
    }
    // Dropped and counted by the engine, so the test would otherwise pass.
    let dropped = bench.rules.stats.reinject_overflow.load(Ordering::Relaxed);
    if dropped > 0 {
        failures.push(format!(
            "{dropped} reinjected event(s) dropped: still being reinjected after \
             {MAX_REINJECT_ROUNDS} rounds, or past the batch's reinject budget (a reinject \
             loop, or a reinject that multiplies events?)"
        ));
    }
    let failed = bench.rules.stats.errors.load(Ordering::Relaxed);
    if failed > 0 {
        failures.push(format!(
            "a stage failed (panicked) {failed} time(s); `vigil run` drops the event it \
             was running and counts it in vigil_rules_errors_total"
        ));
    }
    Ok(Outcome {
        name: test_name.to_owned(),
        failures,
    })
}

/// How far [`advance_test`] got.
enum Advanced {
    Reached,
    /// The test ran [`MAX_TEST_TICKS`] ticks.
    OutOfTicks,
    /// An output received more than [`MAX_RECORDED`] events: the test has
    /// failed, and running on would only take longer.
    OutputFull,
}

/// Steps run between checks that an output is not full.
const CHECK_EVERY: usize = if cfg!(test) { 100 } else { 10_000 };

/// Moves a test's virtual time to `target`, counting the ticks it runs in
/// `ticks`, unless the test runs out of ticks or fills an output first.
fn advance_test(bench: &Bench, target: Micros, ticks: &mut usize) -> Advanced {
    while bench.clock.now() < target {
        let full =
            |(_, recorder): (String, &Arc<Recorder>)| recorder.not_kept.load(Ordering::Relaxed) > 0;
        if bench.all_recorders().any(full) {
            return Advanced::OutputFull;
        }
        if *ticks == MAX_TEST_TICKS {
            return Advanced::OutOfTicks;
        }
        let steps = (MAX_TEST_TICKS - *ticks).min(CHECK_EVERY);
        *ticks += advance_at_most(&bench.clock, &bench.index, &bench.rules, target, steps);
    }
    Advanced::Reached
}

/// Whether `target` (the index, an output, `tap NAME` or `publish TOPIC`), which holds or
/// received `seen`, has an event matching `wanted` (none, `negated`).
fn expect(
    seen: &[Event],
    target: &str,
    wanted: &[(String, Json)],
    negated: bool,
) -> Result<(), String> {
    let seen: Vec<Json> = seen.iter().map(to_json).collect();
    let matching = seen.iter().filter(|e| matches(e, wanted)).count();
    let want = Json::Object(wanted.iter().cloned().collect());
    match (negated, matching) {
        (false, 0) => Err(format!(
            "expected {target} to have an event matching\n      {want}\n{}",
            closest_diff(&seen, wanted, target)
        )),
        (true, n) if n > 0 => Err(format!(
            "expected {target} to have no event matching\n      {want}\n    but {n} matched"
        )),
        _ => Ok(()),
    }
}

/// The time `offset` after the test's start, as `value` gave it; an error
/// past what the clock holds (a far-future `time: 1e13` overflowed it).
fn since_start(offset: Micros, value: &Value) -> Result<Micros, Diagnostic> {
    TEST_EPOCH.checked_add(offset).ok_or_else(|| {
        Diagnostic::new(
            value.span.clone(),
            "`time` is past what the clock holds (about 292 000 years from 1970)",
        )
    })
}

/// The fields an `expect` wants, in the JSON form events are compared in,
/// read the way `send` reads them: `time` in seconds since the test started,
/// a number given for an attribute as its text.
fn expected_fields(fields: &Value) -> Result<Vec<(String, Json)>, Diagnostic> {
    let ValueKind::Map(entries) = &fields.kind else {
        return Err(Diagnostic::new(
            fields.span.clone(),
            "expected a map of fields, e.g. `{service: \"cpu\", state: \"ok\"}`",
        ));
    };
    let mut wanted = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let json = match (key.name.as_str(), &value.kind) {
            ("time", ValueKind::Number(n)) => {
                Json::String(iso8601(since_start(secs_to_micros(*n), value)?))
            }
            ("time", ValueKind::Duration(d)) => Json::String(iso8601(since_start(*d, value)?)),
            ("time", ValueKind::String(_)) => to_plain_json(value),
            ("time", _) => {
                return Err(Diagnostic::new(
                    value.span.clone(),
                    "`time` is seconds since the test started (or an ISO 8601 time)",
                ));
            }
            // A TTL is an f32: the one expected is rounded as the one sent.
            ("ttl", ValueKind::Number(n)) => Json::from(ttl_f64(*n as f32)),
            (name, ValueKind::Number(n)) if !STANDARD_FIELDS.contains(&name) => {
                Json::String(number_text(*n))
            }
            (name, ValueKind::Bool(b)) if !STANDARD_FIELDS.contains(&name) => {
                Json::String(b.to_string())
            }
            _ => to_plain_json(value),
        };
        wanted.push((key.name.clone(), json));
    }
    Ok(wanted)
}

/// The fields of an event's JSON form that are not attributes.
const STANDARD_FIELDS: &[&str] = &[
    "host",
    "service",
    "state",
    "description",
    "metric",
    "tags",
    "time",
    "ttl",
];

/// Explains the failure with the candidate that matched the most fields.
fn closest_diff(seen: &[Json], wanted: &[(String, Json)], target: &str) -> String {
    let Some(best) = seen.iter().max_by_key(|e| {
        wanted
            .iter()
            .filter(|(k, v)| field_matches(e.get(k), v))
            .count()
    }) else {
        return format!("    but {target} has nothing");
    };
    let mut out = format!(
        "    {} event(s) in {target}; the closest differs in:",
        seen.len()
    );
    for (k, v) in wanted {
        let actual = best.get(k).cloned().unwrap_or(Json::Null);
        if !field_matches(Some(&actual), v) {
            out.push_str(&format!("\n      {k}: expected {v}, got {actual}"));
        }
    }
    out
}

fn matches(event: &Json, wanted: &[(String, Json)]) -> bool {
    wanted.iter().all(|(k, v)| field_matches(event.get(k), v))
}

fn field_matches(actual: Option<&Json>, wanted: &Json) -> bool {
    match (actual.unwrap_or(&Json::Null), wanted) {
        (Json::Number(a), Json::Number(b)) => {
            let (a, b) = (
                a.as_f64().unwrap_or(f64::NAN),
                b.as_f64().unwrap_or(f64::NAN),
            );
            (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
        }
        (a, b) => a == b,
    }
}

fn to_plain_json(v: &Value) -> Json {
    match &v.kind {
        ValueKind::Number(n) => serde_json::Number::from_f64(*n).map_or(Json::Null, Json::Number),
        ValueKind::String(s) | ValueKind::Ident(s) => Json::String(s.clone()),
        ValueKind::Duration(d) => Json::from(*d as f64 / 1e6),
        ValueKind::Bool(b) => Json::Bool(*b),
        ValueKind::Null => Json::Null,
        ValueKind::List(items) => Json::Array(items.iter().map(to_plain_json).collect()),
        ValueKind::Map(entries) => Json::Object(
            entries
                .iter()
                .map(|(k, v)| (k.name.clone(), to_plain_json(v)))
                .collect(),
        ),
        ValueKind::Env(name) => Json::String(std::env::var(name).unwrap_or_default()),
    }
}

/// The event a `send {…}` step describes, and whether it gives its `time`
/// (else the step's time is its time).
fn event_from(v: &Value) -> Result<(Event, bool), Diagnostic> {
    let ValueKind::Map(entries) = &v.kind else {
        return Err(Diagnostic::new(
            v.span.clone(),
            "`send` takes a map of event fields, e.g. `send {host: \"web1\", metric: 1}`, \
             or a list of them sent as one batch",
        ));
    };
    let mut event = Event::default();
    let mut timed = false;
    for (key, value) in entries {
        let wrong = |what: String| Diagnostic::new(value.span.clone(), what);
        let text = || match &value.kind {
            ValueKind::String(s) => Ok(Some(s.clone())),
            ValueKind::Null => Ok(None),
            _ => Err(wrong(format!("`{}` must be a string", key.name))),
        };
        match key.name.as_str() {
            "host" => event.host = text()?,
            "service" => event.service = text()?,
            "state" => event.state = text()?,
            "description" => event.description = text()?,
            "metric" => {
                event.metric = match value.kind {
                    ValueKind::Number(n) if n.fract() == 0.0 && n.abs() < 9e15 => {
                        Some(Metric::Int(n as i64))
                    }
                    ValueKind::Number(n) => Some(Metric::Float(n)),
                    ValueKind::Null => None,
                    _ => return Err(wrong("`metric` must be a number".into())),
                }
            }
            "ttl" => match value.kind {
                ValueKind::Number(n) => event.ttl = Some(n as f32),
                ValueKind::Duration(d) => event.ttl = Some(d as f32 / 1e6),
                _ => return Err(wrong("`ttl` must be a number of seconds".into())),
            },
            "time" => {
                event.time = match value.kind {
                    // Seconds since the test started, like `at`.
                    ValueKind::Number(n) => since_start(secs_to_micros(n), value)?,
                    ValueKind::Duration(d) => since_start(d, value)?,
                    _ => {
                        return Err(wrong(
                            "`time` must be seconds since the test started".into(),
                        ));
                    }
                };
                timed = true;
            }
            "tags" => {
                let tags = match &value.kind {
                    ValueKind::List(items) => items
                        .iter()
                        .map(|t| match &t.kind {
                            ValueKind::String(s) => Some(s.clone()),
                            _ => None,
                        })
                        .collect::<Option<_>>(),
                    _ => None,
                };
                match tags {
                    Some(tags) => event.tags = tags,
                    None => return Err(wrong("`tags` must be a list of strings".into())),
                }
            }
            attribute => match &value.kind {
                ValueKind::String(s) => event.set_attribute(attribute, s.clone()),
                ValueKind::Number(n) => event.set_attribute(attribute, number_text(*n)),
                ValueKind::Bool(b) => event.set_attribute(attribute, b.to_string()),
                _ => {
                    return Err(wrong(format!(
                        "attribute `{attribute}` must be a string, a number or true/false"
                    )));
                }
            },
        }
    }
    Ok((event, timed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::parser::parse;

    /// Each test's failures, in the file's order.
    fn failures_of(file: &RuleFile) -> Vec<Vec<String>> {
        run_tests(file)
            .unwrap()
            .into_iter()
            .map(|o| o.failures)
            .collect()
    }

    /// `send [{…}, {…}]` sends one batch, as an agent's `Msg`: a `reinject`
    /// runs after the whole batch, as in `vigil run`.
    #[test]
    fn a_list_is_sent_as_one_batch() {
        let file = parse(
            r#"output out = forward(host: "x")
streams {
  where service = "a" and not r { with(r: "1") { reinject } }
  where r or service = "b" { out }
}
test "one batch" {
  send [{host: "h", service: "a"}, {host: "h", service: "b", time: 9}]
  expect out {service: "b", time: 9}
}
test "two sends" {
  send {host: "h", service: "a"}
  send {host: "h", service: "b"}
}"#,
        )
        .unwrap();
        assert_eq!(failures_of(&file), [Vec::<String>::new(), Vec::new()]);
        let order = |test: &str| {
            let bench = Bench::new(&file).unwrap();
            let plan = plan(&file).unwrap();
            let at = file.tests.iter().position(|t| t.name == test).unwrap();
            for step in &plan[at] {
                if let Action::Send(sent) = &step.action {
                    let batch: Vec<Event> = sent.iter().map(|(e, _)| e.clone()).collect();
                    bench.rules.process(&batch);
                }
            }
            let seen = bench.seen_by("out");
            seen.iter()
                .map(|e| e.service_str().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(order("one batch"), ["b", "a"], "reinjected after the batch");
        assert_eq!(order("two sends"), ["a", "b"]);
    }

    /// The `index` stage stores an event at the engine's clock: one timed
    /// a year ahead (a `time` in milliseconds looks like that and worse)
    /// expires its TTL plus the 5 minutes allowed after it was sent, on
    /// the virtual clock.
    #[test]
    fn an_event_timed_far_ahead_expires_on_the_engines_clock() {
        let file = parse(
            r#"streams { index }
test "far ahead" {
  send {host: "h", service: "ahead", ttl: 10, time: 31536000}
  at 310s
  expect index {service: "ahead"}
  at 311s
  expect no index {service: "ahead"}
}"#,
        )
        .unwrap();
        assert_eq!(failures_of(&file), [Vec::<String>::new()]);
    }

    /// A pager output's test sees the pages it would send: not an `ok` with
    /// no incident open, nor a repeated trigger within `resend_interval`.
    #[test]
    fn a_pager_output_records_the_pages_it_would_send() {
        let file = parse(
            r#"output pager = paging_webhook(url: "http://127.0.0.1:9/p", resend_interval: 1m)
streams { pager }
test "pages" {
  at 0s send {host: "h", service: "s", state: "ok", metric: 1}
  at 1s send {host: "h", service: "s", state: "critical", metric: 2}
  at 2s send {host: "h", service: "s", state: "critical", metric: 3}
  at 3s send {host: "h", service: "s", state: "warning", metric: 4}
  at 4s send {host: "h", service: "s", state: "unknown", metric: 5}
  at 5s send {host: "h", service: "s", state: "ok", metric: 6}
  at 6s send {host: "h", service: "s", state: "ok", metric: 7}
  at 7s send {host: "h", service: "s", state: "critical", metric: 8}
  at 30s send {host: "h", service: "s", state: "critical", metric: 9}
  at 70s send {host: "h", service: "s", state: "critical", metric: 10}
  expect no pager {metric: 1}
  expect pager {metric: 2}
  expect no pager {metric: 3}
  expect pager {metric: 4}
  expect no pager {metric: 5}
  expect pager {metric: 6}
  expect no pager {metric: 7}
  expect pager {metric: 8}
  expect no pager {metric: 9}
  expect pager {metric: 10}
}"#,
        )
        .unwrap();
        assert_eq!(failures_of(&file), [Vec::<String>::new()]);
    }

    #[test]
    fn an_output_that_receives_too_much_stops_and_fails_the_test() {
        // A rate per group reports every 100 ms. With two groups the output
        // is full after 500 ticks, which the check after the sixth hundred
        // notices: the test stops there, before the 1 000-tick cap and far
        // from 3650 days. One group's 990 events by 99 s fit.
        let file = parse(
            r#"output out = forward(host: "x")
streams { by(host) { rate(100ms) { out } } }
test "two groups" {
  send {host: "a", service: "b", metric: 1, ttl: 1000000000}
  send {host: "b", service: "b", metric: 1, ttl: 1000000000}
  at 3650d expect out {host: "a"}
}
test "one group" {
  send {host: "a", service: "b", metric: 1, ttl: 100}
  at 99s expect out {host: "a"}
}"#,
        )
        .unwrap();
        let failures = failures_of(&file);
        assert_eq!((MAX_RECORDED, CHECK_EVERY), (1_000, 100));
        let too_many = "out received 1200 events, more than the 1000 a test keeps";
        assert_eq!(failures, [vec![too_many.to_owned()], vec![]]);
    }

    #[test]
    fn expect_reads_time_and_numeric_attributes_as_send_does() {
        let file = parse(
            r#"output out = forward(host: "x")
streams { out }
test "they match" {
  at 2s send {host: "h", time: 5, build: 42, ratio: 0.5, version: 2.0, big: 1e3, on: true, ttl: 1234.5678}
  expect out {host: "h", time: 5, build: 42, ratio: 0.5, version: 2.0, big: 1e3, on: true, ttl: 1234.5678}
  expect out {version: "2", big: "1000", ratio: "0.5", on: "true"}
  expect out {time: 5s}
  expect out {time: "2024-01-01T00:00:05.000Z"}
}
test "so `expect no` of them can fail" {
  send {host: "h", time: 5, build: 42}
  expect no out {time: 5}
  expect no out {build: 42}
  expect out {time: 6}
}"#,
        )
        .unwrap();
        let failures = failures_of(&file);
        assert!(failures[0].is_empty(), "{:?}", failures[0]);
        assert_eq!(failures[1].len(), 3, "{:?}", failures[1]);
        assert!(
            failures[1][0].contains("but 1 matched"),
            "{}",
            failures[1][0]
        );
        assert!(
            failures[1][1].contains("but 1 matched"),
            "{}",
            failures[1][1]
        );
        assert!(
            failures[1][2].contains(
                r#"time: expected "2024-01-01T00:00:06.000Z", got "2024-01-01T00:00:05.000Z""#
            ),
            "{}",
            failures[1][2]
        );
    }

    #[test]
    fn steps_that_cannot_run_are_found_before_any_test_runs() {
        let source = r#"output out = forward(host: "x")
streams { out }
test "t" {
  at 12s send {metric: "x"}
  at 10s send {tags: [1]}
  expect typo {host: "h"}
  expect index "x"
  send {time: "now"}
  expect out {time: true}
}"#;
        let file = parse(source).unwrap();
        let found: Vec<String> = check_tests(&file)
            .iter()
            .map(|d| {
                d.render("x.vigil", source)
                    .lines()
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            found,
            [
                "x.vigil:4:24: `metric` must be a number",
                "x.vigil:5:3: `at 10s` is earlier than the step before (at 12s); steps move forward in time",
                "x.vigil:5:22: `tags` must be a list of strings",
                "x.vigil:6:10: `expect typo`: no such output",
                "x.vigil:7:16: expected a map of fields, e.g. `{service: \"cpu\", state: \"ok\"}`",
                "x.vigil:8:15: `time` must be seconds since the test started",
                "x.vigil:9:21: `time` is seconds since the test started (or an ISO 8601 time)",
            ]
        );
        assert!(run_tests(&file).is_err());
    }

    /// A tap records what reached it, as a leaf or before the stages under
    /// it, from every `by` group; `expect tap` checks it as `expect` checks
    /// an output, with the same diff.
    #[test]
    fn taps_record_what_reached_them_for_expect_tap() {
        let file = parse(
            r#"output out = forward(host: "x")
streams {
  tap(all)
  where metric > 3 { tap("high") { with(state: "critical") { out } } }
  by(host) { tap(grouped) }
}
test "checks" {
  send {host: "a", service: "b", metric: 5}
  send {host: "c", service: "d", metric: 1}
  expect tap all {service: "d"}
  expect tap high {service: "b", state: null}
  expect no tap high {service: "d"}
  expect tap grouped {host: "a"}
  expect tap grouped {host: "c"}
  expect out {service: "b", state: "critical"}
}
test "fails" {
  send {host: "a", service: "b", metric: 5}
  expect tap high {state: "critical"}
  expect no tap all {host: "a"}
}"#,
        )
        .unwrap();
        let failures = failures_of(&file);
        assert_eq!(
            failures,
            [
                vec![],
                vec![
                    "expected tap high to have an event matching\n      \
                     {\"state\":\"critical\"}\n    \
                     1 event(s) in tap high; the closest differs in:\n      \
                     state: expected \"critical\", got null"
                        .to_owned(),
                    "expected tap all to have no event matching\n      \
                     {\"host\":\"a\"}\n    but 1 matched"
                        .to_owned(),
                ]
            ]
        );
    }

    /// `expect publish TOPIC` checks what the `publish(TOPIC)` stages
    /// published, from every stage and `by` group publishing to it, with
    /// the diff of `expect`; a tap after the topics' stages still finds its
    /// own recorder.
    #[test]
    fn expect_publish_checks_what_was_published_to_a_topic() {
        let file = parse(
            r#"output out = forward(host: "x")
streams {
  where metric > 3 { with(state: "critical") { publish("alerts.disk-1") } }
  by(host) { publish(all) }
  where service = "d" { publish(all) }
  tap(last)
  out
}
test "checks" {
  send {host: "a", service: "b", metric: 5}
  send {host: "c", service: "d", metric: 1}
  expect publish "alerts.disk-1" {host: "a", state: "critical", metric: 5}
  expect no publish "alerts.disk-1" {host: "c"}
  expect publish all {host: "a", state: null}
  expect publish all {host: "c"}
  expect tap last {host: "c"}
  expect out {host: "a"}
}
test "fails" {
  send {host: "a", service: "b", metric: 5}
  expect publish "alerts.disk-1" {state: "ok"}
  expect no publish all {host: "a"}
}"#,
        )
        .unwrap();
        let bench = Bench::new(&file).unwrap();
        bench.rules.process(&[Event {
            service: Some("d".into()),
            ..Event::default()
        }]);
        assert_eq!(
            bench.published("all").len(),
            2,
            "the `by`'s and the `where`'s"
        );
        assert_eq!(
            failures_of(&file),
            [
                vec![],
                vec![
                    "expected publish alerts.disk-1 to have an event matching\n      \
                     {\"state\":\"ok\"}\n    \
                     1 event(s) in publish alerts.disk-1; the closest differs in:\n      \
                     state: expected \"ok\", got \"critical\""
                        .to_owned(),
                    "expected publish all to have no event matching\n      \
                     {\"host\":\"a\"}\n    but 1 matched"
                        .to_owned(),
                ]
            ]
        );
    }

    /// A topic no stage publishes to is refused where the `expect` names
    /// it, as an undeclared output or tap is, with the topics there are.
    #[test]
    fn expect_publish_of_a_topic_nobody_publishes_to_is_a_positioned_error() {
        let source = r#"streams {
  publish(a)
  where metric > 1 { publish("b.c") }
}
test "t" {
  expect publish "a" {host: "h"}
  expect no publish typo {host: "h"}
  expect publish "b.c" {}
}
"#;
        let (rendered, found) = refused_with_hints(source);
        assert_eq!(
            found,
            [
                "x.vigil:7:21: `expect publish typo`: no stage publishes to it",
                "  hint: the topics published to: a, b.c",
            ],
            "{rendered}"
        );
        assert_eq!(
            hints_without_streams_for("expect publish \"c\" {}"),
            ["put `publish(\"c\")` in the streams where the events are to go"]
        );
    }

    /// The positioned errors and hints `vigil check` renders for `source`,
    /// which must not load, with the whole rendering for a failure message.
    fn refused_with_hints(source: &str) -> (String, Vec<String>) {
        let rendered = crate::rules::load("x.vigil", source, EnvPolicy::Lenient)
            .err()
            .unwrap();
        let found = (rendered.lines())
            .filter(|l| l.starts_with("x.vigil:") || l.starts_with("  hint: "))
            .map(str::to_owned)
            .collect();
        (rendered, found)
    }

    /// The hints for `expect` in a test of a file whose streams only index.
    fn hints_without_streams_for(expect: &str) -> Vec<String> {
        let none = parse(&format!("streams {{ index }}\ntest \"t\" {{ {expect} }}")).unwrap();
        (check_tests(&none).into_iter())
            .map(|d| d.hint.unwrap_or_default())
            .collect()
    }

    /// Without a recorder after the outputs (`vigil run`), a tap only passes
    /// events on.
    #[test]
    fn without_a_recorder_a_tap_passes_events_on() {
        let file = parse(
            r#"output out = forward(host: "x")
streams { tap(t) { out } }"#,
        )
        .unwrap();
        let compiled = compile(&file, EnvPolicy::Lenient).unwrap();
        assert_eq!(compiled.recorded, [(Expected::Tap, "t".to_owned())]);
        let out = Arc::new(Recorder::default());
        let clock: SharedClock = Arc::new(ManualClock::new(TEST_EPOCH));
        let index = Arc::new(Index::new(IndexConfig::default()));
        let rules = Rules::new(compiled.roots, None, vec![out.clone()], index, clock);
        rules.process(&[Event {
            host: Some("h".into()),
            ..Event::default()
        }]);
        assert_eq!(out.events.lock().len(), 1);
        assert_eq!(rules.stats.errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_tap_named_twice_or_expected_undeclared_is_a_positioned_error() {
        let source = r#"streams {
  tap(a)
  where metric > 1 { tap(a) { index } }
  tap(b)
}
test "t" {
  expect tap c {host: "h"}
  expect no tap a {host: "h"}
}
"#;
        let (rendered, found) = refused_with_hints(source);
        assert_eq!(
            found,
            [
                "x.vigil:3:26: tap `a` is declared twice",
                "  hint: the first is at 2:7; `expect tap a` must name one",
                "x.vigil:7:14: `expect tap c`: no such tap",
                "  hint: the streams' taps: a, b",
            ],
            "{rendered}"
        );
        assert_eq!(
            hints_without_streams_for("expect tap c {}"),
            ["put `tap(c)` in the streams where the events are to be seen"]
        );
    }

    #[test]
    fn a_reinject_loop_fails_the_test() {
        let file = parse(
            r#"output out = forward(host: "x")
streams { out where service = "loop" { reinject } }
test "loops" {
  send {host: "a", service: "loop"}
  expect out {host: "a"}
}
test "does not" {
  send {host: "a", service: "b"}
  expect out {host: "a"}
}"#,
        )
        .unwrap();
        let failures = failures_of(&file);
        let dropped = "1 reinjected event(s) dropped: still being reinjected after 16 rounds, \
                       or past the batch's reinject budget (a reinject loop, or a reinject that \
                       multiplies events?)";
        assert_eq!(failures, [vec![dropped.to_owned()], vec![]]);
    }

    #[test]
    fn a_timer_busy_at_every_tick_stops_the_test_with_a_reason() {
        let file = parse(
            r#"output out = forward(host: "x")
streams { rate(100ms) { out } }
test "busy" {
  send {host: "a", service: "b", metric: 1, ttl: 1000000000}
  at 3650d expect out {host: "a"}
}
test "idle" {
  send {host: "a", service: "b", metric: 1, ttl: 1}
  at 3650d expect out {host: "a"}
}"#,
        )
        .unwrap();
        let failures = failures_of(&file);
        let stopped_at = MAX_TEST_TICKS as f64 / 10.0;
        assert_eq!(
            failures,
            [
                vec![format!(
                    "`at 315360000s`: stopped at {stopped_at}s after {MAX_TEST_TICKS} timer ticks, \
                     100 ms apart, with something due at each, the most one test may run (a stage \
                     with a short interval kept busy across a long jump?)"
                )],
                vec![],
            ]
        );
    }
}
