//! Live subscriptions to the index: every event the index stores, and every
//! `expired` notice it emits, goes to each subscriber whose query matches it,
//! through that subscriber's bounded queue.
//!
//! Publishing never waits: a subscriber whose queue is full is disconnected
//! (and counted) rather than allowed to slow ingest; a lossy subscriber (the
//! cluster's tap, which forwards changes to other nodes) loses the event
//! instead, also counted. A queue is full at its length in events or at
//! [`MAX_QUEUED_BYTES`], whichever comes first ([`event_queue`]): 10 000
//! events of a megabyte each would otherwise be ten gigabytes held for one
//! slow reader. With no subscribers the cost on the ingest path is one atomic
//! load. Nothing is published while a replay runs its batch under
//! [`outputs::suppressed`]: subscribers see live changes only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use parking_lot::RwLock;
use tokio::sync::mpsc::error::TryRecvError;

use crate::event::Event;
use crate::event_queue::{self, Refused};
use crate::outputs;
use crate::query::Query;

/// Queue length per subscriber unless the caller asks otherwise.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Bytes of events (by [`Event::approx_bytes`]) one subscriber's queue may
/// hold: 10 000 ordinary events are ~3 MB.
pub const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct PubsubStats {
    /// Events handed to subscribers.
    pub delivered: AtomicU64,
    /// Subscribers disconnected because their queue was full.
    pub disconnected_slow: AtomicU64,
    /// Events a lossy subscriber's full queue could not take.
    pub dropped: AtomicU64,
}

#[derive(Default)]
pub struct Pubsub {
    subscribers: RwLock<Vec<Subscriber>>,
    /// Mirrors `subscribers.len()` so publishing can skip the lock when empty.
    count: AtomicUsize,
    next_id: AtomicU64,
    pub stats: PubsubStats,
}

struct Subscriber {
    id: u64,
    query: Query,
    tx: event_queue::Sender,
    lagged: Arc<AtomicBool>,
    /// A full queue drops the event instead of disconnecting the subscriber.
    lossy: bool,
}

/// One subscriber's end. Dropping it unsubscribes.
pub struct Subscription {
    rx: event_queue::Receiver,
    id: u64,
    lagged: Arc<AtomicBool>,
    pubsub: Arc<Pubsub>,
}

impl Subscription {
    /// The next event; `None` once unsubscribed (see [`Subscription::lagged`]).
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await.map(|(event, _)| event)
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Result<Event, TryRecvError> {
        self.rx.try_recv().map(|(event, _)| event)
    }

    /// True once the subscriber was dropped for being too slow; its receiver
    /// then ends.
    pub fn lagged(&self) -> bool {
        self.lagged.load(Ordering::Acquire)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.pubsub.remove(self.id);
    }
}

impl Pubsub {
    pub fn new() -> Arc<Pubsub> {
        Arc::new(Pubsub::default())
    }

    pub fn subscribe(self: &Arc<Self>, query: Query, capacity: usize) -> Subscription {
        self.add(query, capacity, false)
    }

    /// Like [`Pubsub::subscribe`], but a full queue loses (and counts) the
    /// event instead of disconnecting: for a forwarder that must stay attached.
    pub fn subscribe_lossy(self: &Arc<Self>, query: Query, capacity: usize) -> Subscription {
        self.add(query, capacity, true)
    }

    fn add(self: &Arc<Self>, query: Query, capacity: usize, lossy: bool) -> Subscription {
        let (tx, rx) = event_queue::queue(capacity.max(1), MAX_QUEUED_BYTES);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let lagged = Arc::new(AtomicBool::new(false));
        let mut subscribers = self.subscribers.write();
        subscribers.push(Subscriber {
            id,
            query,
            tx,
            lagged: lagged.clone(),
            lossy,
        });
        self.count.store(subscribers.len(), Ordering::Release);
        Subscription {
            rx,
            id,
            lagged,
            pubsub: self.clone(),
        }
    }

    pub fn subscribers(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// The distinct queries of the current subscribers, as text.
    pub fn queries(&self) -> Vec<String> {
        let mut queries: Vec<String> = self
            .subscribers
            .read()
            .iter()
            .map(|s| s.query.as_str().to_owned())
            .collect();
        queries.sort_unstable();
        queries.dedup();
        queries
    }

    /// Offers `event` to every subscriber whose query matches it.
    pub fn publish(&self, event: &Event) {
        if self.count.load(Ordering::Acquire) == 0 || outputs::is_suppressed() {
            return;
        }
        let mut slow = Vec::new();
        let mut bytes = None;
        for sub in self.subscribers.read().iter() {
            if !sub.query.matches(event) {
                continue;
            }
            let bytes = *bytes.get_or_insert_with(|| event.approx_bytes());
            match sub.tx.try_send(event.clone(), bytes) {
                Ok(()) => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(Refused::Full) if sub.lossy => {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(Refused::Full) => slow.push(sub.id),
                // The receiver is gone; its Subscription's drop removes it.
                Err(Refused::Closed) => {}
            }
        }
        for id in slow {
            if let Some(sub) = self.remove(id) {
                sub.lagged.store(true, Ordering::Release);
                self.stats.disconnected_slow.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(query = %sub.query, "Subscriber too slow; disconnected.");
            }
        }
    }

    fn remove(&self, id: u64) -> Option<Subscriber> {
        let mut subscribers = self.subscribers.write();
        let at = subscribers.iter().position(|s| s.id == id)?;
        let sub = subscribers.swap_remove(at);
        self.count.store(subscribers.len(), Ordering::Release);
        Some(sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(service: &str) -> Event {
        Event {
            service: Some(service.into()),
            ..Event::default()
        }
    }

    #[tokio::test]
    async fn matching_events_reach_their_subscribers_only() {
        let pubsub = Pubsub::new();
        let mut cpu = pubsub.subscribe(Query::parse(r#"service =~ "cpu%""#).unwrap(), 10);
        let mut all = pubsub.subscribe(Query::parse("true").unwrap(), 10);
        pubsub.publish(&event("cpu user"));
        pubsub.publish(&event("disk"));
        assert_eq!(
            cpu.recv().await.unwrap().service.as_deref(),
            Some("cpu user")
        );
        assert!(cpu.try_recv().is_err());
        assert_eq!(
            all.recv().await.unwrap().service.as_deref(),
            Some("cpu user")
        );
        assert_eq!(all.recv().await.unwrap().service.as_deref(), Some("disk"));
        assert_eq!(pubsub.stats.delivered.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_full_subscriber_is_disconnected_and_counted() {
        let pubsub = Pubsub::new();
        let mut slow = pubsub.subscribe(Query::parse("true").unwrap(), 2);
        for i in 0..5 {
            pubsub.publish(&event(&i.to_string()));
        }
        assert!(slow.lagged());
        assert_eq!(pubsub.subscribers(), 0);
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 1);
        // What was queued is still readable, then the stream ends.
        assert!(slow.recv().await.is_some());
        assert!(slow.recv().await.is_some());
        assert!(slow.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_queue_is_full_at_its_bytes_before_its_length() {
        let pubsub = Pubsub::new();
        let big = Event {
            description: Some("x".repeat(1024 * 1024)),
            ..event("big")
        };
        let fit = MAX_QUEUED_BYTES / big.approx_bytes();
        assert!(fit < 100);
        // A reader that keeps up gives the room back as it reads.
        let mut reader = pubsub.subscribe(Query::parse("true").unwrap(), 10_000);
        for _ in 0..3 * fit {
            pubsub.publish(&big);
            assert!(reader.recv().await.is_some());
        }
        assert!(!reader.lagged());
        drop(reader);
        let mut slow = pubsub.subscribe(Query::parse("true").unwrap(), 10_000);
        let mut tap = pubsub.subscribe_lossy(Query::parse("true").unwrap(), 10_000);
        for _ in 0..=fit {
            pubsub.publish(&big);
        }
        assert!(slow.lagged() && !tap.lagged());
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 1);
        assert_eq!(pubsub.stats.dropped.load(Ordering::Relaxed), 1);
        let mut queued = 0;
        while slow.recv().await.is_some() {
            queued += 1;
        }
        assert_eq!(queued, fit);
        for _ in 0..fit {
            assert!(tap.try_recv().is_ok());
        }
        assert!(tap.try_recv().is_err());
        // Emptied, the lossy queue takes events again.
        pubsub.publish(&big);
        assert!(tap.try_recv().is_ok());
    }

    #[tokio::test]
    async fn a_full_lossy_subscriber_loses_events_but_stays() {
        let pubsub = Pubsub::new();
        let mut tap = pubsub.subscribe_lossy(Query::parse("true").unwrap(), 2);
        for i in 0..5 {
            pubsub.publish(&event(&i.to_string()));
        }
        assert!(!tap.lagged());
        assert_eq!(pubsub.subscribers(), 1);
        assert_eq!(pubsub.stats.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(tap.recv().await.unwrap().service.as_deref(), Some("0"));
        assert_eq!(tap.recv().await.unwrap().service.as_deref(), Some("1"));
        pubsub.publish(&event("later"));
        assert_eq!(tap.recv().await.unwrap().service.as_deref(), Some("later"));
    }

    #[test]
    fn replayed_batches_reach_no_subscriber() {
        let pubsub = Pubsub::new();
        let mut sub = pubsub.subscribe(Query::parse("true").unwrap(), 10);
        outputs::suppressed(|| pubsub.publish(&event("replayed")));
        assert!(sub.try_recv().is_err());
        assert_eq!(pubsub.queries(), vec!["true".to_owned()]);
    }

    #[test]
    fn dropping_a_subscription_unsubscribes() {
        let pubsub = Pubsub::new();
        let sub = pubsub.subscribe(Query::parse("true").unwrap(), 1);
        assert_eq!(pubsub.subscribers(), 1);
        drop(sub);
        assert_eq!(pubsub.subscribers(), 0);
        pubsub.publish(&event("x"));
    }
}
