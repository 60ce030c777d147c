//! Runs compiled rules as the server's [`Streams`]: each batch goes through the
//! top-level streams, `reinject`ed events go round again, and the timer's tick
//! reaches every time-based stage.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::clock::SharedClock;
use crate::event::Event;
use crate::index::Index;
use crate::streams::Streams;

use crate::outputs::OutputSink;

use super::nodes::{Children, Cx};

/// Rounds of `reinject` one batch may take. A rule that reinjects what it
/// reinjects would otherwise loop forever; past this the events are dropped
/// and counted.
pub const MAX_REINJECT_ROUNDS: usize = 16;

#[derive(Debug, Default)]
pub struct RuleStats {
    /// Events dropped because they kept being reinjected.
    pub reinject_overflow: AtomicU64,
    /// Events on which a stage failed (panicked); the event is dropped, the
    /// rules keep running.
    pub errors: AtomicU64,
}

pub struct Rules {
    roots: Children,
    outputs: Vec<Arc<dyn OutputSink>>,
    index: Arc<Index>,
    clock: SharedClock,
    pub stats: RuleStats,
}

impl Rules {
    /// `outputs` must be in the order of the compiled file's declarations.
    pub fn new(
        roots: Children,
        outputs: Vec<Arc<dyn OutputSink>>,
        index: Arc<Index>,
        clock: SharedClock,
    ) -> Self {
        Self {
            roots,
            outputs,
            index,
            clock,
            stats: RuleStats::default(),
        }
    }

    /// Runs `work` with a context, then the events it reinjected, round by round.
    fn run(&self, work: impl FnOnce(&mut Cx)) {
        let mut reinjected = Vec::new();
        let mut cx = Cx {
            now: self.clock.now(),
            index: &self.index,
            outputs: &self.outputs,
            reinjected: &mut reinjected,
        };
        work(&mut cx);
        for _ in 0..MAX_REINJECT_ROUNDS {
            if reinjected.is_empty() {
                return;
            }
            let batch = std::mem::take(&mut reinjected);
            let mut cx = Cx {
                now: self.clock.now(),
                index: &self.index,
                outputs: &self.outputs,
                reinjected: &mut reinjected,
            };
            for event in &batch {
                self.guarded(|| self.roots.event(event, &mut cx));
            }
        }
        if !reinjected.is_empty() {
            self.stats
                .reinject_overflow
                .fetch_add(reinjected.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                dropped = reinjected.len(),
                rounds = MAX_REINJECT_ROUNDS,
                "Events still being reinjected after the round limit; dropped (a reinject loop in the rules?)."
            );
        }
    }

    /// A failing stage costs one event, never the rules.
    fn guarded(&self, f: impl FnOnce()) {
        if catch_unwind(AssertUnwindSafe(f)).is_err() {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!("A stream stage failed on an event; the event was dropped.");
        }
    }
}

impl Streams for Rules {
    fn process(&self, events: Vec<Event>) {
        self.run(|cx| {
            for event in &events {
                self.guarded(|| self.roots.event(event, cx));
            }
        });
    }

    fn tick(&self) {
        self.run(|cx| self.guarded(|| self.roots.tick(cx)));
    }
}
