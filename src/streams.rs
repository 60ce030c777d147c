//! The processing pipeline interface: ingest hands each decoded `Msg` (or the
//! `Msg`s of one TCP read; the index, each batch of expired entries) to a
//! [`Streams`] as one batch.
//! What happens to the events — indexing, routing to outputs — is the
//! implementation's business; transports know nothing of it.

use std::sync::Arc;

use crate::event::Event;
use crate::index::{Index, Notices, StallWatch};

pub trait Streams: Send + Sync + 'static {
    /// Runs one batch through the pipeline. Must not block on I/O: it is called
    /// inline on the connection that read the batch. The events are borrowed:
    /// the caller reuses the buffer (and its allocations) for the next batch.
    fn process(&self, events: &[Event]);

    /// Runs a batch of the index's expiry notices, those whose key is not
    /// back ([`Notices::unless_back`]). An implementation that runs batches
    /// on several threads at once keeps out the events that could store
    /// their keys meanwhile, from before the check until they have run.
    fn process_expired(&self, mut notices: Notices<'_>) {
        let notices = notices.unless_back();
        if !notices.is_empty() {
            self.process(notices);
        }
    }

    /// Time has passed: time-based stages (rates, windows) emit what is due.
    /// Called periodically by the server's timer, and by tests on a virtual clock.
    fn tick(&self) {}

    /// When vigil was last seen running, which the timer reads to tell a
    /// stall of the process; `None`: the timer's own ticks tell.
    fn stalls(&self) -> Option<Arc<StallWatch>> {
        None
    }
}

/// The pipeline with no rules: every event goes to the index.
pub struct IndexEverything {
    index: Arc<Index>,
}

impl IndexEverything {
    pub fn new(index: Arc<Index>) -> Self {
        Self { index }
    }
}

impl Streams for IndexEverything {
    fn process(&self, events: &[Event]) {
        for event in events {
            self.index.insert(event);
        }
    }
}
