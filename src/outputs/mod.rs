//! Outputs as rule files declare them (`output pager = pagerduty(…)`): their
//! validated settings, and the bounded queue a stream hands events to.
//!
//! Handing over never blocks the stream tree: a full queue drops the event and
//! counts it. Delivery to the real downstreams (PagerDuty, Graphite, webhooks,
//! forwarding) is not built yet; until it is, each queue's consumer only counts
//! what it takes, so `accepted = delivered + dropped + queued` still holds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::clock::Micros;
use crate::event::Event;

use super::nodes::OutputSink;

/// PagerDuty's public Events API v2 endpoint.
pub const PAGERDUTY_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// Pages must not be lost while the process lives: their queue is large.
pub const PAGER_QUEUE: usize = 100_000;
pub const DEFAULT_QUEUE: usize = 10_000;

#[derive(Debug, Clone, PartialEq)]
pub enum OutputKind {
    PagerDuty {
        routing_key: String,
        url: String,
        dedup_key: Option<String>,
        resend_interval: Option<Micros>,
    },
    Webhook {
        url: String,
        headers: BTreeMap<String, String>,
        body: Option<String>,
    },
    Graphite {
        host: String,
        port: u16,
        prefix: Option<String>,
        path: Option<String>,
    },
    Forward {
        host: String,
        port: u16,
    },
}

impl OutputKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            OutputKind::PagerDuty { .. } => "pagerduty",
            OutputKind::Webhook { .. } => "webhook",
            OutputKind::Graphite { .. } => "graphite",
            OutputKind::Forward { .. } => "forward",
        }
    }

    pub fn queue_capacity(&self) -> usize {
        match self {
            OutputKind::PagerDuty { .. } => PAGER_QUEUE,
            _ => DEFAULT_QUEUE,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutputSpec {
    pub name: String,
    pub kind: OutputKind,
}

/// Per-output accounting: `accepted = delivered + dropped + queued`.
#[derive(Debug, Default)]
pub struct OutputStats {
    pub accepted: AtomicU64,
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
}

impl OutputStats {
    pub fn queued(&self) -> u64 {
        let accepted = self.accepted.load(Ordering::Acquire);
        accepted
            .saturating_sub(self.delivered.load(Ordering::Acquire))
            .saturating_sub(self.dropped.load(Ordering::Acquire))
    }
}

/// The bounded queue in front of one output.
pub struct QueueSink {
    pub name: String,
    pub stats: Arc<OutputStats>,
    tx: mpsc::Sender<Event>,
}

impl OutputSink for QueueSink {
    fn push(&self, event: Event) {
        self.stats.accepted.fetch_add(1, Ordering::AcqRel);
        if self.tx.try_send(event).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(output = %self.name, "Output queue full; event dropped.");
        }
    }
}

/// Starts the queue for `spec` with a consumer that counts what it takes (no
/// delivery yet). Must be called inside a tokio runtime.
pub fn spawn_counting(spec: &OutputSpec) -> Arc<QueueSink> {
    let (tx, mut rx) = mpsc::channel::<Event>(spec.kind.queue_capacity());
    let stats = Arc::new(OutputStats::default());
    let consumer_stats = stats.clone();
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            consumer_stats.delivered.fetch_add(1, Ordering::AcqRel);
        }
    });
    Arc::new(QueueSink {
        name: spec.name.clone(),
        stats,
        tx,
    })
}

/// Records everything it is given; what `vigil test` uses in place of delivery.
#[derive(Default)]
pub struct Recorder {
    pub events: Mutex<Vec<Event>>,
}

impl OutputSink for Recorder {
    fn push(&self, event: Event) {
        self.events.lock().push(event);
    }
}
