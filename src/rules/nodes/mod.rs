//! The runtime of compiled rules: a tree of stream nodes. Each node receives an
//! event, maybe changes or holds it, and passes it to its children — the shape of
//! a Riemann stream. Nodes with state keep it behind their own small lock, so
//! there is no lock around the whole tree.
//!
//! Time: nodes read "now" from the [`Cx`] (arrival time on the injected clock) and
//! are driven by [`Node::tick`] so timers fire even when no event arrives.

use std::sync::Arc;

use crate::clock::Micros;
pub use crate::event::Field;
use crate::event::{Event, Metric};
use crate::index::Index;
use crate::outputs::OutputSink;

mod basic;
mod stateful;
mod window;

#[cfg(test)]
mod tests;

pub use basic::{
    Drop, FieldSet, Index as IndexNode, Log, MetricTest, Output, Reinject, Scale, Split, Tag,
    Where, With,
};
pub use stateful::{By, Changed, Ddt, Ewma, EwmaMode, Rate, Stable, Throttle};
pub use window::{Fold, FoldKind, Percentiles, WINDOW_MAX, Window, WindowKind};

/// What a node may touch while handling one event or tick.
pub struct Cx<'a> {
    pub now: Micros,
    pub index: &'a Index,
    pub outputs: &'a [Arc<dyn OutputSink>],
    /// Events `reinject` sent back to the top; the engine runs them after the batch.
    pub reinjected: &'a mut Vec<Event>,
}

pub trait Node: Send + Sync {
    /// Events are borrowed: filters pass them on untouched, and only a stage
    /// that changes or keeps an event pays for a copy.
    fn event(&self, event: &Event, cx: &mut Cx);

    /// Time passes: emit what is due, then pass the tick on to the children.
    fn tick(&self, cx: &mut Cx);

    /// A copy of this subtree with fresh, empty state, for each `by` group.
    fn fresh(&self) -> Box<dyn Node>;
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
}

/// Seconds as f64, for dividing metrics by durations.
pub fn as_secs(d: Micros) -> f64 {
    d as f64 / 1e6
}

pub fn metric_f64(e: &Event) -> Option<f64> {
    e.metric.map(Metric::as_f64)
}
