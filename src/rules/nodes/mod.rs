//! The runtime of compiled rules: a tree of stream nodes. Each node receives an
//! event, maybe changes or holds it, and passes it to its children — the shape of
//! a Riemann stream. Nodes with state keep it behind their own small lock, so
//! there is no lock around the whole tree.
//!
//! Time: nodes read "now" from the [`Cx`] (arrival time on the injected clock) and
//! are driven by [`Node::tick`] so timers fire even when no event arrives. A
//! stage the timer drives also tells [`Cx::schedule`] when it next needs a
//! tick, so a `by` ticks only the groups whose time has come.
//!
//! Reload: [`Node::adopt`] moves the state of a running tree into a freshly
//! compiled one, stage by stage, where the stage is unchanged (see
//! [`crate::rules::reload`]).
//!
//! Restart: [`Node::save`] writes the state out and [`Node::restore`] reads it
//! back into a tree compiled from the same text (see [`saved`] and
//! [`crate::rules::persist`]).

use std::any::Any;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::clock::Micros;
pub use crate::event::Field;
use crate::event::{Event, Metric};
use crate::index::{Index, KeyHash};
use crate::outputs::OutputSink;
use crate::rules::engine::RuleStats;

mod apdex;
mod basic;
mod fill;
mod numbers;
mod predict;
mod rollup;
mod running;
pub mod saved;
mod spread;
mod stateful;
mod window;

#[cfg(test)]
mod tests;

pub use apdex::Apdex;
pub use basic::{
    Drop, FieldSet, Index as IndexNode, Log, MetricTest, Output, Publish, Reinject, Scale, Split,
    Tag, Tap, Untag, Where, With,
};
pub use fill::FillIn;
pub use predict::PredictLinear;
pub use rollup::Rollup;
pub use stateful::{
    By, ByDefinition, Changed, Counter, Ddt, Ewma, EwmaMode, Rate, Runs, Stable, Throttle,
};
pub use window::{Fold, FoldKind, Percentiles, WINDOW_MAX, Window, WindowKind};

use saved::{RestoreError, Restorer, Saver};

/// What a node may touch while handling one event or tick.
pub struct Cx<'a> {
    pub now: Micros,
    pub index: &'a Index,
    /// The declared outputs, in order; under `vigil test` then a recorder
    /// for each `tap` and each topic published to (see [`Tap`], [`Publish`]).
    pub outputs: &'a [Arc<dyn OutputSink>],
    /// Events `reinject` sent back to the top; the engine runs them after the batch.
    pub reinjected: &'a mut Vec<Event>,
    /// The event the engine is running through the tree, and its key's hash
    /// (the engine hashed it to prefetch its index slot). Its address is only
    /// compared: a stage that passes the event on as it came gets the hash.
    pub hashed: Option<(*const Event, KeyHash)>,
    /// The earliest time a stage of the subtree being run asked to be ticked
    /// at ([`Cx::schedule`]); `by` reads it so it ticks only the groups with
    /// something due. `Micros::MAX`: nothing asked.
    pub due: Micros,
    /// How often the timer ticks: a stage due more than a tick ago (give
    /// or take a tick that ran long) was not ticked because vigil was
    /// stalled ([`Cx::stalled`]).
    pub tick: Micros,
    /// The latest stall of the process, `(since, until)`: from when vigil
    /// was last seen running until it ran again ([`StallWatch`]).
    ///
    /// [`StallWatch`]: crate::index::StallWatch
    pub stall: (Micros, Micros),
    /// Where a stage counts what it had to let go of.
    pub stats: &'a RuleStats,
}

impl Cx<'_> {
    /// Whether a period of `interval` that ended at `end` missed the next
    /// one too, by more than the timer's lateness: the process was stalled
    /// (a VM paused, the clock stepped ahead) from about its end until now,
    /// and nothing could come meanwhile. Its periods are no silence of the
    /// series, as a restart's are not.
    pub fn stalled(&self, end: Micros, interval: Micros) -> bool {
        let late = self.now.saturating_sub(end);
        // And it ended while vigil ran nothing ([`Cx::stall`]), not while
        // its batches went on and only the timer was late (a tick that ran
        // long, a reload, a busy machine): the series was silent then.
        let (since, until) = self.stall;
        late >= interval && late > self.tick.saturating_mul(2) && since < end && end <= until
    }

    /// A stage that the timer drives says when its next tick is needed, after
    /// each event and each tick; `None`: nothing pending.
    pub fn schedule(&mut self, at: Option<Micros>) {
        if let Some(at) = at {
            self.due = self.due.min(at);
        }
    }

    /// Runs `run` and returns the earliest tick it scheduled (`Micros::MAX`:
    /// none), leaving what was scheduled before as it was: a `by` keeps each
    /// group's time itself.
    pub fn scheduled(&mut self, run: impl FnOnce(&mut Self)) -> Micros {
        let outer = std::mem::replace(&mut self.due, Micros::MAX);
        run(self);
        std::mem::replace(&mut self.due, outer)
    }

    /// `event`'s key hash: the engine's, when `event` is the very event it
    /// hashed (borrowed, so unchanged), else computed.
    pub fn key_hash(&self, event: &Event) -> KeyHash {
        match self.hashed {
            Some((hashed, hash)) if std::ptr::eq(hashed, event) => hash,
            _ => self.index.key_hash(event),
        }
    }
}

/// What a [`Cx`] borrows, for tests that run stages without the engine.
#[cfg(test)]
pub struct Scratch {
    pub index: Index,
    pub stats: RuleStats,
    pub reinjected: Vec<Event>,
}

#[cfg(test)]
impl Default for Scratch {
    fn default() -> Scratch {
        Scratch {
            index: Index::new(crate::index::IndexConfig::default()),
            stats: RuleStats::default(),
            reinjected: Vec::new(),
        }
    }
}

#[cfg(test)]
impl Scratch {
    /// A context at `now`, with no outputs.
    pub fn cx(&mut self, now: Micros) -> Cx<'_> {
        Cx {
            now,
            index: &self.index,
            outputs: &[],
            reinjected: &mut self.reinjected,
            hashed: None,
            due: Micros::MAX,
            tick: crate::rules::engine::DEFAULT_TICK,
            stall: (Micros::MIN, Micros::MIN),
            stats: &self.stats,
        }
    }
}

/// Lets [`Node::adopt`] see whether the old stage is of its own kind.
pub trait AsAny {
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

pub trait Node: AsAny + Send + Sync {
    /// Events are borrowed: filters pass them on untouched, and only a stage
    /// that changes or keeps an event pays for a copy.
    fn event(&self, event: &Event, cx: &mut Cx);

    /// Time passes: emit what is due, then pass the tick on to the children.
    /// A stage with something pending calls [`Cx::schedule`] here and in
    /// [`Node::event`]; inside a `by`, a stage that does not is not ticked,
    /// and `vigil test`'s virtual time skips the ticks before the earliest
    /// one asked for.
    fn tick(&self, cx: &mut Cx);

    /// A copy of this subtree with fresh, empty state, for each `by` group.
    fn fresh(&self) -> Box<dyn Node>;

    /// On reload: if `old` (the stage at the same place in the running tree) is
    /// the same kind of stage with the same definition, takes over its state,
    /// then lets the children do the same with `old`'s children. Called on a
    /// tree that receives no events yet.
    fn adopt(&self, old: &dyn Node);

    /// For a restart: appends this subtree's state to `out` in tree order.
    /// Stateless stages only walk their children.
    fn save(&self, out: &mut dyn Saver);

    /// Takes back what [`Node::save`] wrote, on a tree compiled from the same
    /// text that receives no events yet.
    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError>;
}

/// `old` as a stage of type `T`, if it is one.
pub fn same<T: 'static>(old: &dyn Node) -> Option<&T> {
    old.as_any().downcast_ref()
}

/// Moves `old`'s state into `new`; `old` is left with `new`'s empty state.
pub fn take_over<T>(new: &Mutex<T>, old: &Mutex<T>) {
    std::mem::swap(&mut *new.lock(), &mut *old.lock());
}

/// A node's children: every event goes to each of them.
#[derive(Default)]
pub struct Children(pub Vec<Box<dyn Node>>);

impl Children {
    pub fn event(&self, event: &Event, cx: &mut Cx) {
        for child in &self.0 {
            child.event(event, cx);
        }
    }

    pub fn tick(&self, cx: &mut Cx) {
        for child in &self.0 {
            child.tick(cx);
        }
    }

    pub fn fresh(&self) -> Children {
        Children(self.0.iter().map(|c| c.fresh()).collect())
    }

    /// Pairs children by position: a stage inserted or removed shifts the
    /// ones after it, which then start fresh.
    pub fn adopt(&self, old: &Children) {
        for (new, old) in self.0.iter().zip(&old.0) {
            new.adopt(old.as_ref());
        }
    }

    pub fn save(&self, out: &mut dyn Saver) {
        for child in &self.0 {
            child.save(out);
        }
    }

    pub fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        self.0.iter().try_for_each(|child| child.restore(from))
    }
}

/// Seconds as f64, for dividing metrics by durations.
pub fn as_secs(d: Micros) -> f64 {
    d as f64 / 1e6
}

pub fn metric_f64(e: &Event) -> Option<f64> {
    e.metric.map(Metric::as_f64)
}
