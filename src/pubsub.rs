//! Live subscriptions to the index: every event the index stores, and every
//! `expired` notice it emits, goes to each subscriber whose query matches it,
//! through that subscriber's bounded queue.
//!
//! Publishing never waits: a subscriber whose queue is full is disconnected
//! (and counted) rather than allowed to slow ingest; a lossy subscriber (the
//! cluster's tap, which forwards changes to other nodes) loses the event
//! instead, also counted. A queue is full at its length in events or at
//! [`MAX_QUEUED_BYTES`], whichever comes first: 10 000 events of a megabyte
//! each would otherwise be ten gigabytes held for one slow reader.
//!
//! Subscribers share one copy of each event, and of its JSON ([`Published`],
//! encoded once), and those with the same query text one evaluation of it:
//! what an event costs the publisher (on the ingest path) grows with the
//! distinct queries it is matched against and the subscribers it is queued
//! for, not with its size.
//!
//! All queues together hold at most the pubsub's `max_held` bytes (by
//! [`Event::approx_bytes`]; [`DEFAULT_MAX_HELD`] unless configured), and so
//! do the snapshots still being sent to subscribers ([`Pubsub::hold`]) and
//! the series coalescing subscribers hold ([`Subscription::hold_coalesced`]). A
//! queued event counts in full in each queue holding it (its shared JSON,
//! about as large, is not counted): the last subscriber holding an event
//! pays for it, and many subscribers that read nothing would otherwise hold
//! their queue's bound each. Over it, the subscribers holding the most are
//! disconnected first: those furthest behind, never one that keeps up. A
//! disconnected subscriber's queue is emptied at once, whatever its
//! connection is doing.
//!
//! With no subscribers the cost on the ingest path is one atomic load.
//! Nothing is published while a replay runs its batch under
//! [`outputs::suppressed`]: subscribers see live changes only.

use std::collections::VecDeque;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio::sync::mpsc::error::TryRecvError;

use crate::event::Event;
use crate::event_queue::Refused;
use crate::json;
use crate::outputs;
use crate::query::Query;

/// Queue length per subscriber unless the caller asks otherwise.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Bytes of events (by [`Event::approx_bytes`]) one subscriber's queue may
/// hold: 10 000 ordinary events are ~3 MB.
pub const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// Bytes all subscribers' queues may hold together, by default.
pub const DEFAULT_MAX_HELD: usize = 256 * 1024 * 1024;

/// An event as its subscribers get it: one copy shared by all of them, with
/// its JSON encoded once, by the first of them that needs it.
#[derive(Debug)]
pub struct Published {
    event: Event,
    json: OnceLock<Box<str>>,
}

impl Published {
    /// The event's JSON ([`json::to_json`]), as SSE and WebSocket send it.
    pub fn json(&self) -> &str {
        self.json
            .get_or_init(|| json::to_json_text(&self.event).into())
    }
}

impl Deref for Published {
    type Target = Event;

    fn deref(&self) -> &Event {
        &self.event
    }
}

#[derive(Debug, Default)]
pub struct PubsubStats {
    /// Events handed to subscribers.
    pub delivered: AtomicU64,
    /// Subscribers disconnected because their queue was full, or because
    /// they were furthest behind when all queues together were.
    pub disconnected_slow: AtomicU64,
    /// Events a lossy subscriber's full queue could not take.
    pub dropped: AtomicU64,
    /// Bytes held in all queues now (a gauge).
    pub bytes_held: AtomicUsize,
}

pub struct Pubsub {
    audiences: RwLock<Vec<Audience>>,
    /// How many subscribers the audiences have, so publishing can skip the
    /// lock when there are none.
    count: AtomicUsize,
    next_id: AtomicU64,
    max_held: usize,
    pub stats: PubsubStats,
}

impl Default for Pubsub {
    fn default() -> Self {
        Pubsub {
            audiences: RwLock::default(),
            count: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            max_held: DEFAULT_MAX_HELD,
            stats: PubsubStats::default(),
        }
    }
}

/// The subscribers of one query text: it is evaluated once per event for
/// all of them (a dashboard opened by many people asks the same).
struct Audience {
    query: Query,
    members: Vec<Subscriber>,
}

struct Subscriber {
    id: u64,
    queue: Arc<Backlog>,
    /// A full queue drops the event instead of disconnecting the subscriber.
    lossy: bool,
}

/// One subscriber's queue, shared by the publisher and the subscriber.
/// Unlike a channel, the publisher can empty it: a disconnected subscriber's
/// events are freed at once, not when its connection gets round to it.
struct Backlog {
    state: Mutex<BacklogState>,
    /// Woken when an event comes to an empty queue, and on closing; one
    /// waiter (the subscriber).
    ready: Notify,
    max_events: usize,
}

#[derive(Default)]
struct BacklogState {
    events: VecDeque<(Arc<Published>, usize)>,
    bytes: usize,
    /// The snapshot still to be sent before the events (see
    /// [`HeldSnapshot`]), and its bytes: held here so that disconnecting
    /// the subscriber frees it too, whatever its connection is doing.
    snapshot: std::vec::IntoIter<Event>,
    snapshot_bytes: usize,
    /// What a coalescing subscriber's drain holds outside the queue (see
    /// [`Subscription::hold_coalesced`]).
    coalesced_bytes: usize,
    /// Disconnected for being too slow: nothing more comes.
    lagged: bool,
    /// No more events: lagged, or the subscription was dropped.
    closed: bool,
}

impl Backlog {
    fn push(&self, event: Arc<Published>, bytes: usize, held: &AtomicUsize) -> Result<(), Refused> {
        let mut state = self.state.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        if state.events.len() >= self.max_events || state.bytes + bytes > MAX_QUEUED_BYTES {
            return Err(Refused::Full);
        }
        state.bytes += bytes;
        held.fetch_add(bytes, Ordering::AcqRel);
        // The subscriber waits only once it found the queue empty, and
        // takes all that is queued before it waits again: only the first
        // event after it emptied the queue needs to wake it.
        let first = state.events.is_empty();
        state.events.push_back((event, bytes));
        drop(state);
        if first {
            self.ready.notify_one();
        }
        Ok(())
    }

    fn pop(&self, held: &AtomicUsize) -> Result<Arc<Published>, TryRecvError> {
        let mut state = self.state.lock();
        match state.events.pop_front() {
            Some((event, bytes)) => {
                state.bytes -= bytes;
                held.fetch_sub(bytes, Ordering::AcqRel);
                Ok(event)
            }
            None if state.closed => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// What the subscriber holds: its queue, its snapshot not sent yet and
    /// the series it coalesces.
    fn bytes(&self) -> usize {
        let state = self.state.lock();
        state.bytes + state.snapshot_bytes + state.coalesced_bytes
    }

    /// Takes no more events and frees those queued and the snapshot not
    /// sent; returns the events, for the caller to drop outside the lock.
    fn close(&self, lagged: bool, held: &AtomicUsize) -> VecDeque<(Arc<Published>, usize)> {
        let mut state = self.state.lock();
        state.closed = true;
        state.lagged |= lagged;
        let freed = Self::empty(&mut state, held);
        let snapshot = Self::take_snapshot(&mut state, held);
        // Its drain sees the end and frees what it holds.
        held.fetch_sub(std::mem::take(&mut state.coalesced_bytes), Ordering::AcqRel);
        drop(state);
        drop(snapshot);
        self.ready.notify_one();
        freed
    }

    /// The snapshot's next event, its bytes no longer held.
    fn next_of_snapshot(&self, held: &AtomicUsize) -> Option<Event> {
        let mut state = self.state.lock();
        let event = state.snapshot.next()?;
        let bytes = event.approx_bytes().min(state.snapshot_bytes);
        state.snapshot_bytes -= bytes;
        held.fetch_sub(bytes, Ordering::AcqRel);
        Some(event)
    }

    /// Takes the snapshot not sent, its bytes no longer held.
    fn take_snapshot(state: &mut BacklogState, held: &AtomicUsize) -> std::vec::IntoIter<Event> {
        held.fetch_sub(state.snapshot_bytes, Ordering::AcqRel);
        state.snapshot_bytes = 0;
        std::mem::take(&mut state.snapshot)
    }

    /// Frees the events queued, and goes on taking more.
    fn shed(&self, held: &AtomicUsize) -> VecDeque<(Arc<Published>, usize)> {
        Self::empty(&mut self.state.lock(), held)
    }

    fn empty(state: &mut BacklogState, held: &AtomicUsize) -> VecDeque<(Arc<Published>, usize)> {
        held.fetch_sub(state.bytes, Ordering::AcqRel);
        state.bytes = 0;
        std::mem::take(&mut state.events)
    }
}

/// One subscriber's end. Dropping it unsubscribes.
pub struct Subscription {
    queue: Arc<Backlog>,
    id: u64,
    pubsub: Arc<Pubsub>,
}

impl Subscription {
    /// The next event; `None` once unsubscribed (see [`Subscription::lagged`]).
    pub async fn recv(&mut self) -> Option<Arc<Published>> {
        loop {
            match self.try_recv() {
                Ok(event) => return Some(event),
                Err(TryRecvError::Disconnected) => return None,
                // A notification since the last look is kept as a permit.
                Err(TryRecvError::Empty) => self.queue.ready.notified().await,
            }
        }
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Result<Arc<Published>, TryRecvError> {
        self.queue.pop(&self.pubsub.stats.bytes_held)
    }

    /// True once the subscriber was dropped for being too slow; its receiver
    /// then ends.
    pub fn lagged(&self) -> bool {
        self.queue.state.lock().lagged
    }

    /// Counts `bytes` as what this subscriber holds besides its queue: the
    /// latest event of each series of a coalescing subscriber, taken from
    /// the queue and not written yet ([`crate::http`]'s `live`). They count
    /// within the pubsub's `max_held` like a queue's events, so the
    /// subscriber holding the most is the first disconnected when all
    /// together hold too much. Nothing once it was disconnected.
    pub fn hold_coalesced(&self, bytes: usize) {
        let mut state = self.queue.state.lock();
        if state.closed {
            return;
        }
        let held = &self.pubsub.stats.bytes_held;
        let before = std::mem::replace(&mut state.coalesced_bytes, bytes);
        if bytes >= before {
            held.fetch_add(bytes - before, Ordering::AcqRel);
        } else {
            held.fetch_sub(before - bytes, Ordering::AcqRel);
        }
    }

    /// This subscriber's snapshot, held within its pubsub's `max_held` (see
    /// [`Pubsub::hold`]) and freed with its queue if it is disconnected.
    pub fn hold(&self, snapshot: Vec<Event>) -> Result<HeldSnapshot, SnapshotRefused> {
        self.pubsub.hold_in(self.queue.clone(), snapshot)
    }
}

/// A snapshot that did not fit beside what subscribers hold. Short enough,
/// with the count, for a WebSocket close frame's 123 bytes.
#[derive(Debug, thiserror::Error)]
#[error(
    "{events} matching events do not fit in --max-subscriber-memory now; retry later or narrow the query"
)]
pub struct SnapshotRefused {
    events: usize,
}

/// A subscription's snapshot (the current matches, sent before the live
/// events), counted with the queues' bytes until each event is taken: a
/// subscriber that reads nothing holds it as long as its connection lasts,
/// and one snapshot of a large index is megabytes. It is held in the
/// subscriber's queue, so disconnecting the subscriber frees it; the
/// iterator then ends.
pub struct HeldSnapshot {
    queue: Arc<Backlog>,
    pubsub: Arc<Pubsub>,
}

impl Iterator for HeldSnapshot {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        self.queue.next_of_snapshot(&self.pubsub.stats.bytes_held)
    }
}

impl Drop for HeldSnapshot {
    fn drop(&mut self) {
        let mut state = self.queue.state.lock();
        let rest = Backlog::take_snapshot(&mut state, &self.pubsub.stats.bytes_held);
        drop(state);
        drop(rest);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.pubsub.remove(self.id);
        self.queue.close(false, &self.pubsub.stats.bytes_held);
    }
}

impl Pubsub {
    pub fn new() -> Arc<Pubsub> {
        Arc::new(Pubsub::default())
    }

    /// A pubsub whose queues hold at most `max_held` bytes together.
    pub fn with_max_held(max_held: usize) -> Arc<Pubsub> {
        Arc::new(Pubsub {
            max_held,
            ..Pubsub::default()
        })
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
        let queue = Arc::new(Backlog {
            state: Mutex::default(),
            ready: Notify::new(),
            max_events: capacity.max(1),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let subscriber = Subscriber {
            id,
            queue: queue.clone(),
            lossy,
        };
        let mut audiences = self.audiences.write();
        match (audiences.iter_mut()).find(|a| a.query.as_str() == query.as_str()) {
            Some(audience) => audience.members.push(subscriber),
            None => audiences.push(Audience {
                query,
                members: vec![subscriber],
            }),
        }
        self.count.fetch_add(1, Ordering::AcqRel);
        Subscription {
            queue,
            id,
            pubsub: self.clone(),
        }
    }

    /// Bytes all queues may hold together.
    pub fn max_held(&self) -> usize {
        self.max_held
    }

    /// `snapshot` sent alone (no subscription follows it), its bytes
    /// counted with the queues' while it is sent; refused when they do not
    /// fit in `max_held` beside what is held now. The client is then
    /// refused (try again later) rather than the memory of many clients'
    /// snapshots growing without bound.
    pub fn hold(self: &Arc<Self>, snapshot: Vec<Event>) -> Result<HeldSnapshot, SnapshotRefused> {
        let alone = Arc::new(Backlog {
            state: Mutex::default(),
            ready: Notify::new(),
            max_events: 1,
        });
        self.hold_in(alone, snapshot)
    }

    /// `snapshot`, held in `queue` (see [`Pubsub::hold`]).
    fn hold_in(
        self: &Arc<Self>,
        queue: Arc<Backlog>,
        snapshot: Vec<Event>,
    ) -> Result<HeldSnapshot, SnapshotRefused> {
        let bytes: usize = snapshot.iter().map(Event::approx_bytes).sum();
        let fits = |held: usize| {
            let total = held.saturating_add(bytes);
            (bytes == 0 || total <= self.max_held).then_some(total)
        };
        let held = &self.stats.bytes_held;
        (held.fetch_update(Ordering::AcqRel, Ordering::Acquire, fits)).map_err(|_| {
            SnapshotRefused {
                events: snapshot.len(),
            }
        })?;
        let mut state = queue.state.lock();
        let before = Backlog::take_snapshot(&mut state, held);
        state.snapshot = snapshot.into_iter();
        state.snapshot_bytes = bytes;
        // Disconnected meanwhile (too slow while the snapshot was taken):
        // nothing of it will be sent.
        let dropped = state
            .closed
            .then(|| Backlog::take_snapshot(&mut state, held));
        drop(state);
        drop((before, dropped));
        Ok(HeldSnapshot {
            queue,
            pubsub: self.clone(),
        })
    }

    pub fn subscribers(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// The distinct queries of the current subscribers, as text.
    pub fn queries(&self) -> Vec<String> {
        let mut queries: Vec<String> = (self.audiences.read().iter())
            .map(|a| a.query.as_str().to_owned())
            .collect();
        queries.sort_unstable();
        queries
    }

    /// Offers `event` to every subscriber whose query matches it.
    pub fn publish(&self, event: &Event) {
        if self.count.load(Ordering::Acquire) == 0 || outputs::is_suppressed() {
            return;
        }
        let held = &self.stats.bytes_held;
        let mut slow = Vec::new();
        let mut shared = None;
        for audience in self.audiences.read().iter() {
            if !audience.query.matches(event) {
                continue;
            }
            let (published, bytes) = shared.get_or_insert_with(|| {
                let published = Published {
                    event: event.clone(),
                    json: OnceLock::new(),
                };
                (Arc::new(published), event.approx_bytes())
            });
            for sub in &audience.members {
                match sub.queue.push(published.clone(), *bytes, held) {
                    Ok(()) => {
                        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Refused::Full) if sub.lossy => {
                        self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Refused::Full) => slow.push(sub.id),
                    // The subscription is being dropped; its drop removes it.
                    Err(Refused::Closed) => {}
                }
            }
        }
        for id in slow {
            self.disconnect(id, "Subscriber too slow; disconnected.");
        }
        while held.load(Ordering::Acquire) > self.max_held {
            let Some((furthest_behind, lossy_queue)) = self.furthest_behind() else {
                break;
            };
            match lossy_queue {
                Some(queue) => self.shed(&queue),
                None => self.disconnect(
                    furthest_behind,
                    "Subscribers together hold too much; the one furthest behind is disconnected.",
                ),
            }
        }
    }

    /// The subscriber holding the most bytes, with its queue if it is lossy;
    /// of those holding as much, a lossy one (it sheds, nobody is
    /// disconnected).
    fn furthest_behind(&self) -> Option<(u64, Option<Arc<Backlog>>)> {
        let audiences = self.audiences.read();
        let (sub, bytes) = (audiences.iter())
            .flat_map(|a| &a.members)
            .map(|s| (s, s.queue.bytes()))
            .max_by_key(|&(s, bytes)| (bytes, s.lossy))?;
        // One that holds nothing is not behind.
        (bytes > 0).then(|| (sub.id, sub.lossy.then(|| sub.queue.clone())))
    }

    /// A lossy subscriber furthest behind loses what it holds (counted),
    /// and stays.
    fn shed(&self, queue: &Backlog) {
        let freed = queue.shed(&self.stats.bytes_held);
        let dropped = &self.stats.dropped;
        dropped.fetch_add(freed.len() as u64, Ordering::Relaxed);
        tracing::debug!(events = freed.len(), "Lossy subscriber shed its queue.");
    }

    fn disconnect(&self, id: u64, why: &'static str) {
        let Some((sub, query)) = self.remove(id) else {
            return;
        };
        let freed = sub.queue.close(true, &self.stats.bytes_held);
        self.stats.disconnected_slow.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%query, events = freed.len(), "{why}");
    }

    /// Removes subscriber `id`; returns it and its query's text.
    fn remove(&self, id: u64) -> Option<(Subscriber, String)> {
        let mut audiences = self.audiences.write();
        let (a, at) = (audiences.iter().enumerate()).find_map(|(a, audience)| {
            let at = audience.members.iter().position(|s| s.id == id)?;
            Some((a, at))
        })?;
        let audience = &mut audiences[a];
        let sub = audience.members.swap_remove(at);
        let query = audience.query.as_str().to_owned();
        if audience.members.is_empty() {
            audiences.swap_remove(a);
        }
        self.count.fetch_sub(1, Ordering::AcqRel);
        Some((sub, query))
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
    async fn subscribers_share_one_copy_of_an_event_and_of_its_json() {
        let pubsub = Pubsub::new();
        let mut one = pubsub.subscribe(Query::parse("true").unwrap(), 10);
        let mut other = pubsub.subscribe(Query::parse("true").unwrap(), 10);
        pubsub.publish(&event("cpu"));
        let (one, other) = (one.recv().await.unwrap(), other.recv().await.unwrap());
        assert!(Arc::ptr_eq(&one, &other));
        let json = one.json();
        assert_eq!(json, json::to_json_text(&event("cpu")));
        assert!(std::ptr::eq(json, other.json()), "encoded once");
    }

    #[tokio::test]
    async fn subscribers_of_one_query_are_one_audience_until_the_last_leaves() {
        let pubsub = Pubsub::new();
        let cpu = || Query::parse(r#"service =~ "cpu%""#).unwrap();
        let first = pubsub.subscribe(cpu(), 10);
        let mut second = pubsub.subscribe(cpu(), 10);
        let _disk = pubsub.subscribe(Query::parse(r#"service = "disk""#).unwrap(), 10);
        assert_eq!(
            pubsub.queries(),
            [r#"service = "disk""#, r#"service =~ "cpu%""#]
        );
        assert_eq!(pubsub.subscribers(), 3);
        drop(first);
        pubsub.publish(&event("cpu user"));
        assert_eq!(
            second.recv().await.unwrap().service.as_deref(),
            Some("cpu user")
        );
        assert_eq!(pubsub.queries().len(), 2, "the audience stays");
        drop(second);
        assert_eq!(pubsub.queries(), [r#"service = "disk""#]);
        assert_eq!(pubsub.subscribers(), 1);
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
        // What was queued is freed at once: the stream ends.
        assert_eq!(pubsub.stats.bytes_held.load(Ordering::Acquire), 0);
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
        assert!(slow.recv().await.is_none(), "its queue was freed");
        assert_eq!(
            pubsub.stats.bytes_held.load(Ordering::Acquire),
            fit * big.approx_bytes(),
            "the lossy queue's"
        );
        for _ in 0..fit {
            assert!(tap.try_recv().is_ok());
        }
        assert!(tap.try_recv().is_err());
        // Emptied, the lossy queue takes events again.
        pubsub.publish(&big);
        assert!(tap.try_recv().is_ok());
    }

    /// Many subscribers that read nothing hold no more than the pubsub's
    /// bound together: the one furthest behind goes first, never one that
    /// keeps up.
    #[tokio::test]
    async fn subscribers_together_hold_at_most_the_bound_the_furthest_behind_going_first() {
        let one = event("0").approx_bytes();
        let pubsub = Pubsub::with_max_held(10 * one);
        let all = || Query::parse("true").unwrap();
        let mut reader = pubsub.subscribe(all(), 100);
        let mut first = pubsub.subscribe(all(), 100);
        let held = || pubsub.stats.bytes_held.load(Ordering::Acquire);
        for i in 0..6 {
            pubsub.publish(&event(&i.to_string()));
            assert!(reader.recv().await.is_some());
        }
        let second = pubsub.subscribe(all(), 100);
        let mut tap = pubsub.subscribe_lossy(all(), 100);
        // first holds 6, second 0, the tap 0: 6 of 10.
        for i in 6..8 {
            pubsub.publish(&event(&i.to_string()));
            assert!(reader.recv().await.is_some());
            assert!(held() <= 10 * one, "{} of {}", held(), 10 * one);
        }
        // Reader 1 + first 8 + second 2 + tap 2 = 13 > 10: first, furthest
        // behind, goes.
        assert!(first.lagged() && !second.lagged() && !reader.lagged());
        assert!(first.recv().await.is_none(), "freed at once");
        assert_eq!(held(), 4 * one);
        for i in 8..30 {
            pubsub.publish(&event(&i.to_string()));
            assert!(reader.recv().await.is_some());
            assert!(held() <= 10 * one, "{} of {}", held(), 10 * one);
        }
        // Then second; the lossy tap sheds its queue instead, and the reader
        // never goes.
        assert!(second.lagged() && !tap.lagged() && !reader.lagged());
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 2);
        assert!(pubsub.stats.dropped.load(Ordering::Relaxed) >= 10);
        assert!(tap.try_recv().is_ok());
        drop((tap, reader));
        assert_eq!(held(), 0, "every queue gave its bytes back");
    }

    #[test]
    fn snapshots_are_held_within_the_bound_until_each_event_is_taken() {
        let one = event("0").approx_bytes();
        let pubsub = Pubsub::with_max_held(10 * one);
        let held = || pubsub.stats.bytes_held.load(Ordering::Acquire);
        let snapshot = |n: usize| (0..n).map(|i| event(&i.to_string())).collect::<Vec<_>>();
        let mut first = pubsub.hold(snapshot(6)).expect("6 of 10 fit");
        assert_eq!(held(), 6 * one);
        let refused = pubsub.hold(snapshot(5)).err().expect("11 of 10 do not");
        assert_eq!(
            refused.to_string(),
            "5 matching events do not fit in --max-subscriber-memory now; retry later or narrow the query"
        );
        // With the largest count a snapshot can have, whole in a close frame.
        let largest = SnapshotRefused { events: usize::MAX }.to_string();
        assert!(largest.len() <= 123, "{} bytes", largest.len());
        assert_eq!(held(), 6 * one, "a refusal holds nothing");
        assert!(pubsub.hold(Vec::new()).is_ok(), "an empty one always fits");
        assert_eq!(first.next().unwrap().service.as_deref(), Some("0"));
        assert_eq!(first.next().unwrap().service.as_deref(), Some("1"));
        assert_eq!(held(), 4 * one, "given back as sent");
        let second = pubsub.hold(snapshot(5)).expect("now they fit");
        drop((first, second));
        assert_eq!(held(), 0, "given back when dropped unsent");
    }

    /// A subscriber that does not take its snapshot holds it; when the
    /// subscribers together hold too much it is the one furthest behind,
    /// and disconnecting it frees the snapshot at once, not when its
    /// connection gets round to it.
    #[tokio::test]
    async fn disconnecting_a_subscriber_frees_its_snapshot() {
        let one = event("0").approx_bytes();
        let pubsub = Pubsub::with_max_held(10 * one);
        let held = || pubsub.stats.bytes_held.load(Ordering::Acquire);
        let all = || Query::parse("true").unwrap();
        let stuck = pubsub.subscribe(all(), 100);
        let snapshot: Vec<Event> = (0..8).map(|i| event(&i.to_string())).collect();
        let mut unsent = stuck.hold(snapshot).expect("8 of 10 fit");
        let mut reader = pubsub.subscribe(all(), 100);
        for i in 0..3 {
            pubsub.publish(&event(&format!("live {i}")));
            assert!(reader.recv().await.is_some());
        }
        // 8 + 3 queued for `stuck` + 1 for the reader: over 10.
        assert!(stuck.lagged() && !reader.lagged());
        assert_eq!(held(), 0, "its snapshot and queue were freed");
        assert!(unsent.next().is_none(), "nothing of it is sent any more");
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 1);
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
