//! Runs compiled rules as the server's [`Streams`]: each batch goes through the
//! top-level streams, `reinject`ed events go round again, and the timer's tick
//! reaches every time-based stage.
//!
//! The running [`Tree`] sits behind an [`ArcSwap`] so a reload can replace it
//! while the server keeps calling the same `Streams`: each batch (or tick)
//! loads the tree once and finishes on it, the next batch sees the new one.
//! A reload waits for the batches running to finish and holds the next ones
//! while the state moves from the old tree to the new: an event processed on
//! the old tree meanwhile would change state already moved out, and be lost
//! to the new tree (a transition `changed_state` never reports, an incident
//! never resolved). It first waits for a state write and a tick under way
//! to end, with the batches going on, so they are held only for the swap
//! itself.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use parking_lot::{Mutex, MutexGuard, RwLock};

use crate::clock::{Micros, SharedClock};
use crate::event::Event;
use crate::index::{Index, KeyHash, Notices, StallWatch};
use crate::streams::Streams;

use crate::outputs::OutputSink;

use super::RuleText;
use super::nodes::{Children, Cx};

/// How many events ahead of the one going through the rules the index is
/// asked to prefetch the slot of (see [`Index::prefetch`]): far enough for
/// the load to arrive, near enough to stay in the cache. Rule files nearly
/// always index what they receive; one that does not pays a hash per event.
const PREFETCH_AHEAD: usize = 4;

/// Rounds of `reinject` one batch may take. A rule that reinjects what it
/// reinjects would otherwise loop forever; past this the events are dropped
/// and counted.
pub const MAX_REINJECT_ROUNDS: usize = 16;

/// How many reinjected events one batch may run through the rules, in all its
/// rounds: [`MAX_REINJECT_ROUNDS`] times the batch or its first round of
/// reinjects, whichever is larger. A chain that reinjects each event once per
/// round fits for all its rounds; a rule that reinjects each event twice
/// would otherwise double the work every round, 65 536 times over by the
/// last. Past it the events are dropped and counted with the loops'.
fn reinject_budget(batch: usize, first_round: usize) -> usize {
    MAX_REINJECT_ROUNDS * batch.max(first_round)
}

crate::stats::counters! {
    /// What the rules dropped or refused, and their reloads.
    RuleStats {
        /// Events dropped because they kept being reinjected.
        reinject_overflow,
        /// Events on which a stage failed (panicked); the event is dropped,
        /// the rules keep running.
        errors,
        /// Rule files swapped in by a reload.
        reloads,
        /// Reloads refused because the file did not load; the old rules kept
        /// running.
        reload_failures,
        /// Events a full window or `coalesce` let go of (the oldest, or a new
        /// series) to stay within its 100 000 events.
        window_overflow,
        /// Events a `by` did not run because they would have made a group
        /// past `--max-index` groups (a flood of distinct keys).
        by_refused,
    }
}

/// No tick runs, no state write and no other reload, while this lives
/// ([`Rules::reload_turn`]).
pub struct ReloadTurn<'a> {
    _one_at_a_time: MutexGuard<'a, ()>,
    _no_tick: MutexGuard<'a, ()>,
}

/// One reload counted in [`Rules`]' `reloads_waiting` while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One compiled rule file as it runs: its stages, and the outputs its
/// `Output` stages address by position.
pub struct Tree {
    pub roots: Children,
    pub outputs: Vec<Arc<dyn OutputSink>>,
    /// What `roots` were compiled from; `None` in the test harness, which
    /// compiles syntax trees and never saves state.
    pub text: Option<Arc<RuleText>>,
}

pub struct Rules {
    current: ArcSwap<Tree>,
    /// Serialises reloads: state moves out of the tree being replaced once.
    /// A state write holds it too, while it walks the tree.
    replacing: Mutex<()>,
    /// Reloads waiting for `replacing`: a periodic state write gives way to
    /// them ([`Rules::reload_waiting`]).
    reloads_waiting: AtomicUsize,
    /// Held shared by each batch and tick while it runs, and exclusively by
    /// a reload while it moves the state and swaps the tree.
    running: RwLock<()>,
    /// Held by each tick for its whole length, and by a reload from before
    /// it waits for `running` ([`Rules::reload_turn`]): a tick of a million
    /// `by` groups takes a second, and a writer waiting on `running` holds
    /// up every batch meanwhile.
    ticking: Mutex<()>,
    index: Arc<Index>,
    clock: SharedClock,
    /// How often the timer ticks (`--tick`): a stage due longer ago than
    /// that was not ticked because vigil was stalled ([`Cx::tick`]).
    tick: Micros,
    /// When the rules last ran (a batch or a tick), and the latest stall of
    /// the process, shared with the timer ([`Rules::with_tick`]).
    stalls: Arc<StallWatch>,
    pub stats: RuleStats,
}

/// The server timer's period unless `--tick` says otherwise, and the
/// virtual clock's step.
pub const DEFAULT_TICK: Micros = 100_000;

impl Rules {
    /// `outputs` must be in the order of the compiled file's declarations.
    pub fn new(
        roots: Children,
        text: Option<Arc<RuleText>>,
        outputs: Vec<Arc<dyn OutputSink>>,
        index: Arc<Index>,
        clock: SharedClock,
    ) -> Self {
        Self {
            current: ArcSwap::from_pointee(Tree {
                roots,
                outputs,
                text,
            }),
            replacing: Mutex::new(()),
            reloads_waiting: AtomicUsize::new(0),
            running: RwLock::new(()),
            ticking: Mutex::new(()),
            index,
            clock,
            tick: DEFAULT_TICK,
            stalls: Arc::new(StallWatch::new(DEFAULT_TICK)),
            stats: RuleStats::default(),
        }
    }

    /// The rules of a timer that ticks every `tick`.
    pub fn with_tick(self, tick: Micros) -> Self {
        let stalls = Arc::new(StallWatch::new(tick));
        Rules {
            tick,
            stalls,
            ..self
        }
    }

    /// When the rules last ran, and the latest stall of the process.
    pub fn stalls(&self) -> &Arc<StallWatch> {
        &self.stalls
    }

    /// Waits for a state write under way to end (a periodic one gives way,
    /// [`Rules::reload_waiting`]), then for a tick under way, and holds off
    /// the next of each, and other reloads, until dropped: what a reload
    /// takes first, before the outputs' lock (which a Prometheus scrape
    /// takes too), then [`Rules::replace`]. The batches go on meanwhile,
    /// and so do the ticks while it waits for a write that does not give
    /// way (the final one, or one overdue).
    pub fn reload_turn(&self) -> ReloadTurn<'_> {
        let waiting = Waiting::new(&self.reloads_waiting);
        let one_at_a_time = self.replacing.lock();
        drop(waiting);
        ReloadTurn {
            _one_at_a_time: one_at_a_time,
            _no_tick: self.ticking.lock(),
        }
    }

    /// Swaps in a newly compiled tree: each stage whose definition and place are
    /// unchanged first takes over its predecessor's state, once the batches
    /// running on it have finished; the next ones wait for the swap. Returns
    /// the replaced tree, whose outputs the caller retires.
    pub fn replace(
        &self,
        _turn: &ReloadTurn<'_>,
        roots: Children,
        text: Option<Arc<RuleText>>,
        outputs: Vec<Arc<dyn OutputSink>>,
    ) -> Arc<Tree> {
        let new = Tree {
            roots,
            outputs,
            text,
        };
        let quiet = self.running.write();
        let old = self.current.load_full();
        new.roots.adopt(&old.roots);
        self.current.store(Arc::new(new));
        drop(quiet);
        self.stats.reloads.fetch_add(1, Ordering::Relaxed);
        old
    }

    /// Runs `save` on the running rules' text and stages, for a restart
    /// ([`super::persist`]); `None` when the rules were compiled without their
    /// text. A reload waits for it to return: a walk that need not finish
    /// (a periodic write) stops once [`Rules::reload_waiting`].
    pub fn saving<T>(&self, save: impl FnOnce(&RuleText, &Children) -> T) -> Option<T> {
        // Not while a reload moves the state from one tree to the other.
        let _one_at_a_time = self.replacing.lock();
        let tree = self.current.load();
        let text = tree.text.as_ref()?;
        Some(save(text, &tree.roots))
    }

    /// A reload is waiting for a state write ([`Rules::saving`]) to let go
    /// of the rules. The stream state of a million `by` groups takes
    /// seconds to write, during which the reload, and everything waiting on
    /// it (the outputs' counts a Prometheus scrape reads), would wait too.
    pub fn reload_waiting(&self) -> bool {
        self.reloads_waiting.load(Ordering::SeqCst) > 0
    }

    /// Counts as a reload waiting while it lives: a write given up to one
    /// cannot be tested inside a real reload's wait, which is for that write.
    #[cfg(test)]
    pub(crate) fn pretend_a_reload_waits(&self) -> impl Sized + '_ {
        Waiting::new(&self.reloads_waiting)
    }

    /// [`Streams::tick`], returning the earliest time a stage asked to be
    /// ticked again (`None`: nothing pending). Every stage with something
    /// pending says so on each tick, so this is the whole picture as of the
    /// tick, and a virtual clock can skip the ticks before it
    /// ([`super::testing::advance`]).
    pub fn tick_scheduled(&self) -> Option<Micros> {
        let _ticking = self.ticking.lock();
        let _running = self.running.read();
        let tree = self.current.load();
        let due = self.run(&tree, 0, |cx| self.guarded(|| tree.roots.tick(cx)));
        (due != Micros::MAX).then_some(due)
    }

    /// Runs `work` (on a batch of `batch` events; 0 for a tick) on `tree` with
    /// a context, then the events it reinjected, round by round, on the same
    /// tree. Returns the earliest tick any of it scheduled ([`Cx::schedule`];
    /// `Micros::MAX`: none).
    fn run(&self, tree: &Tree, batch: usize, work: impl FnOnce(&mut Cx)) -> Micros {
        let mut reinjected = Vec::new();
        let now = self.clock.now();
        let stall = self.stalls.runs(now);
        let mut cx = Cx {
            now,
            index: &self.index,
            outputs: &tree.outputs,
            reinjected: &mut reinjected,
            hashed: None,
            due: Micros::MAX,
            tick: self.tick,
            stall,
            stats: &self.stats,
        };
        work(&mut cx);
        let mut due = cx.due;
        let budget = reinject_budget(batch, reinjected.len());
        let (mut ran, mut rounds, mut dropped) = (0, 0, 0);
        while !reinjected.is_empty() {
            let mut round = std::mem::take(&mut reinjected);
            if rounds == MAX_REINJECT_ROUNDS {
                dropped += round.len();
                break;
            }
            let room = budget - ran;
            if round.len() > room {
                dropped += round.len() - room;
                round.truncate(room);
            }
            ran += round.len();
            rounds += 1;
            let mut cx = Cx {
                now: self.clock.now(),
                index: &self.index,
                outputs: &tree.outputs,
                reinjected: &mut reinjected,
                hashed: None,
                due: Micros::MAX,
                tick: self.tick,
                stall,
                stats: &self.stats,
            };
            for event in &round {
                self.guarded(|| tree.roots.event(event, &mut cx));
            }
            due = due.min(cx.due);
        }
        self.stalls.seen(self.clock.now());
        if dropped > 0 {
            self.stats
                .reinject_overflow
                .fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::warn!(
                dropped,
                rounds,
                reinjected = ran,
                "Events still being reinjected after the round limit or the batch's reinject budget; dropped (a reinject loop in the rules, or a reinject that multiplies events?)."
            );
        }
        due
    }

    /// A failing stage costs one event, never the rules.
    fn guarded(&self, f: impl FnOnce()) {
        if catch_unwind(AssertUnwindSafe(f)).is_err() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("A stream stage failed on an event; the event was dropped.");
        }
    }
}

impl Rules {
    /// Runs one batch on `tree`; the caller holds `running`.
    fn run_batch(&self, tree: &Tree, events: &[Event]) {
        // Each event's key is hashed once, PREFETCH_AHEAD events before the
        // event runs: to prefetch its slot, then (through `Cx`) to index it.
        let mut ahead = [None; PREFETCH_AHEAD];
        let hash_ahead = |ahead: &mut [Option<KeyHash>; PREFETCH_AHEAD], i: usize| {
            if let Some(event) = events.get(i) {
                let hash = self.index.key_hash(event);
                self.index.prefetch(hash);
                ahead[i % PREFETCH_AHEAD] = Some(hash);
            }
        };
        for i in 0..PREFETCH_AHEAD {
            hash_ahead(&mut ahead, i);
        }
        self.run(tree, events.len(), |cx| {
            for (i, event) in events.iter().enumerate() {
                let hash = ahead[i % PREFETCH_AHEAD].take();
                hash_ahead(&mut ahead, i + PREFETCH_AHEAD);
                cx.hashed = hash.map(|hash| (event as *const Event, hash));
                self.guarded(|| tree.roots.event(event, cx));
            }
            cx.hashed = None;
        });
    }
}

impl Streams for Rules {
    fn process(&self, events: &[Event]) {
        let _running = self.running.read();
        self.run_batch(&self.current.load(), events);
    }

    /// With no batch in the rules, from the check that the notices' keys
    /// are not back until they have run. An agent's fresh event that is in
    /// the rules when its key expires (past `changed_state`, not yet at
    /// `index`) has stored its key by then, and its notice is dropped; one
    /// that comes meanwhile runs after the notice. Otherwise the rules
    /// could see `ok` then `expired` and page for a host that is up, until
    /// its next report.
    fn process_expired(&self, mut notices: Notices<'_>) {
        let _alone = self.running.write();
        let notices = notices.unless_back();
        if !notices.is_empty() {
            self.run_batch(&self.current.load(), notices);
        }
    }

    fn tick(&self) {
        self.tick_scheduled();
    }

    fn stalls(&self) -> Option<Arc<StallWatch>> {
        Some(self.stalls.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use parking_lot::Condvar;

    use super::*;
    use crate::clock::{Clock, MICROS_PER_SEC, ManualClock};
    use crate::index::IndexConfig;
    use crate::rules::EnvPolicy;
    use crate::rules::testing::TEST_EPOCH;

    /// An output that holds whoever pushes to it until opened: a tick
    /// stuck in it stands for a long one.
    struct Gate {
        entered: Mutex<mpsc::Sender<()>>,
        open: Mutex<bool>,
        opened: Condvar,
    }

    impl Gate {
        fn open(&self) {
            *self.open.lock() = true;
            self.opened.notify_all();
        }
    }

    impl OutputSink for Gate {
        fn push(&self, _: Event) {
            let _ = self.entered.lock().send(());
            let mut open = self.open.lock();
            while !*open {
                self.opened.wait(&mut open);
            }
        }
    }

    fn compiled() -> Children {
        let source =
            "output out = forward(host: \"127.0.0.1\")\nstreams {\n  rate(1s) { out }\n}\n";
        let (_, compiled) = crate::rules::load("gate.vigil", source, EnvPolicy::Strict).unwrap();
        compiled.roots
    }

    /// A reload waits for a tick under way (a second, with a million `by`
    /// groups) before it waits for the batches: waiting for the batches, it
    /// holds up every new one, which would then wait for the tick too.
    #[test]
    fn a_reload_waiting_for_a_tick_holds_up_no_batch() {
        let (entered, tick_entered) = mpsc::channel();
        let gate = Arc::new(Gate {
            entered: Mutex::new(entered),
            open: Mutex::new(false),
            opened: Condvar::new(),
        });
        let clock = Arc::new(ManualClock::new(TEST_EPOCH));
        let index = Arc::new(Index::new(IndexConfig::default()));
        let outputs = || -> Vec<Arc<dyn OutputSink>> { vec![gate.clone()] };
        let rules = Rules::new(compiled(), None, outputs(), index, clock.clone());
        let event = Event {
            host: Some("h".into()),
            service: Some("s".into()),
            metric: Some(crate::event::Metric::Float(1.0)),
            time: TEST_EPOCH,
            ttl: Some(60.0),
            ..Event::default()
        };
        rules.process(std::slice::from_ref(&event));
        // Arms `rate`'s timer; the next tick, a second on, emits.
        rules.tick_scheduled();
        clock.advance(2 * MICROS_PER_SEC);

        let (rules, event, outputs) = (&rules, &event, &outputs);
        std::thread::scope(|threads| {
            let tick = threads.spawn(move || rules.tick_scheduled());
            tick_entered
                .recv_timeout(Duration::from_secs(10))
                .expect("the tick reached the output");
            let reload = threads.spawn(move || {
                let turn = rules.reload_turn();
                rules.replace(&turn, compiled(), None, outputs());
            });
            // Time for the reload to reach its wait; were it not there yet,
            // this test would pass whatever the reload waits for.
            std::thread::sleep(Duration::from_millis(100));
            let (done, batch_done) = mpsc::channel();
            threads.spawn(move || {
                rules.process(std::slice::from_ref(event));
                done.send(()).unwrap();
            });
            let batch = batch_done.recv_timeout(Duration::from_secs(10));
            assert!(
                !reload.is_finished(),
                "the reload did not wait for the tick"
            );
            gate.open();
            batch.expect("a batch waited for the reload waiting for the tick");
            tick.join().unwrap();
            reload.join().unwrap();
        });
        assert_eq!(rules.stats.reloads.load(Ordering::Relaxed), 1);
    }

    /// A reload waiting for a state write that does not give way to it (the
    /// final one, or one overdue: seconds with a million `by` groups) holds
    /// up no tick meanwhile.
    #[test]
    fn a_reload_waiting_for_a_state_write_holds_up_no_tick() {
        let clock = Arc::new(ManualClock::new(TEST_EPOCH));
        let index = Arc::new(Index::new(IndexConfig::default()));
        let out = Arc::new(crate::rules::testing::Recorder::default());
        let outputs = || -> Vec<Arc<dyn OutputSink>> { vec![out.clone()] };
        let text = Arc::new(RuleText {
            name: "gate.vigil".into(),
            text: String::new(),
        });
        let rules = Rules::new(compiled(), Some(text), outputs(), index, clock);
        let (rules, outputs) = (&rules, &outputs);
        std::thread::scope(|threads| {
            let (in_write, writing) = mpsc::channel();
            let (release, released) = mpsc::channel::<()>();
            let write = threads.spawn(move || {
                rules.saving(|_, _| {
                    in_write.send(()).unwrap();
                    released.recv_timeout(Duration::from_secs(10)).ok();
                })
            });
            writing.recv().unwrap();
            let reload = threads.spawn(move || {
                let turn = rules.reload_turn();
                rules.replace(&turn, compiled(), None, outputs());
            });
            while !rules.reload_waiting() {
                assert!(!reload.is_finished(), "the reload did not wait");
                std::thread::yield_now();
            }
            let (done, tick_done) = mpsc::channel();
            threads.spawn(move || {
                rules.tick_scheduled();
                // Gone once the test has failed.
                let _ = done.send(());
            });
            let tick = tick_done.recv_timeout(Duration::from_secs(10));
            release.send(()).unwrap();
            tick.expect("a tick waited for the reload waiting for the write");
            write.join().unwrap();
            reload.join().unwrap();
        });
    }

    /// A host whose TTL ran out reports again just as its entry expires: its
    /// fresh event is in the rules (past `changed_state`, not yet indexed)
    /// when the expiry checks whether it is back. The notice must not run
    /// after it: the rules would see `ok` then `expired`, and page for a
    /// host that is up until its next report.
    #[test]
    fn an_expiry_notice_never_follows_a_fresh_event_of_its_key_through_the_rules() {
        let source = "output gate = forward(host: \"127.0.0.1\")\n\
                      output out = forward(host: \"127.0.0.1\")\n\
                      streams {\n  changed_state { out }\n  \
                      where metric = 2 { gate }\n  index\n}\n";
        let (_, compiled) = crate::rules::load("race.vigil", source, EnvPolicy::Strict).unwrap();
        let (entered, fresh_entered) = mpsc::channel();
        let gate = Arc::new(Gate {
            entered: Mutex::new(entered),
            open: Mutex::new(false),
            opened: Condvar::new(),
        });
        let out = Arc::new(crate::rules::testing::Recorder::default());
        let clock = Arc::new(ManualClock::new(TEST_EPOCH));
        let index = Arc::new(Index::new(IndexConfig::default()));
        let outputs: Vec<Arc<dyn OutputSink>> = vec![gate.clone(), out.clone()];
        let rules = Rules::new(compiled.roots, None, outputs, index.clone(), clock.clone());
        let report = |metric: f64| Event {
            host: Some("h".into()),
            service: Some("s".into()),
            state: Some("ok".into()),
            metric: Some(crate::event::Metric::Float(metric)),
            time: clock.now(),
            ttl: Some(1.0),
            ..Event::default()
        };
        rules.process(&[report(1.0)]);
        clock.advance(2 * MICROS_PER_SEC);
        let fresh = report(2.0);

        let (rules, index, fresh) = (&rules, &index, &fresh);
        std::thread::scope(|threads| {
            let agent = threads.spawn(move || rules.process(std::slice::from_ref(fresh)));
            fresh_entered
                .recv_timeout(Duration::from_secs(10))
                .expect("the fresh event reached the gate");
            let now = clock.now();
            let expiry =
                threads.spawn(move || index.expire_batches(now, |n| rules.process_expired(n)));
            // The expiry ran its notices, or waits for the fresh event.
            while !expiry.is_finished() && !rules.running.is_locked_exclusive() {
                std::thread::yield_now();
            }
            gate.open();
            agent.join().unwrap();
            expiry.join().unwrap();
        });
        let states: Vec<String> = (out.events.lock().iter())
            .map(|e| e.state.clone().unwrap_or_default())
            .collect();
        assert!(
            states.last().is_none_or(|s| s != "expired"),
            "the rules' last word on a host that is up: {states:?}"
        );
        assert!(index.get("h", "s").is_some(), "the fresh entry was lost");
        assert_eq!(index.expired_came_back_total(), 1, "its notice was dropped");
    }
}
