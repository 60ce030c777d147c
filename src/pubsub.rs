//! Live subscriptions to the index: every event the index stores, and every
//! `expired` notice it emits, goes to each subscriber whose query matches it,
//! through that subscriber's bounded queue.
//!
//! That is the [`INDEX_TOPIC`]; the rules' `publish` stage publishes to
//! topics of their own ([`Pubsub::topic`], [`Pubsub::publish_to`]). All
//! topics share this module's bounds: on what all queues hold, on what the
//! queries cost, slow subscribers. A topic's state (its name and count of
//! subscribers) lives only while a subscriber or a `publish` stage holds it,
//! so a client subscribing to many random names makes one per subscription,
//! and subscriptions are bounded by connections.
//!
//! Publishing never waits: a subscriber whose queue is full is disconnected
//! (and counted) rather than allowed to slow ingest; a lossy subscriber (the
//! cluster's tap, which forwards changes to other nodes) loses the event
//! instead, also counted. A queue is full at its length in events or at
//! [`MAX_QUEUED_BYTES`], whichever comes first: 10 000 events of a megabyte
//! each would otherwise be ten gigabytes held for one slow reader.
//!
//! A coalescing subscriber's queue ([`Pubsub::subscribe_latest`]) holds the
//! latest event of each series instead, replaced as it is published (see
//! the `queue` module): a burst of changes to the series it holds never fills it,
//! whatever its reader is doing; it is full at its length in series or at
//! its bytes. It costs the publisher one hash of the event's series per
//! coalescing subscriber, and the others nothing.
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
//! the batches coalescing subscribers took and are writing
//! ([`Subscription::take_all`]). A queued event counts in full in each queue
//! holding it, a replaced one no longer (its shared JSON,
//! about as large, is not counted): the last subscriber holding an event
//! pays for it, and many subscribers that read nothing would otherwise hold
//! their queue's bound each. Over it, the subscribers holding the most are
//! disconnected first: those furthest behind, never one that keeps up. A
//! disconnected subscriber's queue is emptied at once, whatever its
//! connection is doing.
//!
//! An audience's query is evaluated on the publisher's thread (the ingest
//! path of every connection), so what it may cost is bounded: a query that
//! is [`Query::costly`] (many terms, or several scanning strings) is
//! evaluated within [`QUERY_BUDGET`] per event ([`Query::matches_within`]),
//! and one that overruns it has its subscribers to that topic disconnected,
//! with the reason (counted in [`PubsubStats::disconnected_costly`], logged
//! with the query); the event does not match it. Its text is remembered
//! with the topic for [`REFUSED_FOR`] ([`REMEMBERED`] texts at most):
//! subscribing it to that topic again meanwhile is refused, whoever asks
//! ([`Client::admit_to`]): it is the text that costs on the topic's events,
//! and a dashboard reconnecting in a loop costs a budget once, not once per
//! reconnection. Another topic's events may be small enough for it. A lossy
//! subscriber (the cluster's tap, which filters again what it forwards)
//! is not disconnected: its audience takes every event from then on,
//! unevaluated. Cheap queries (`true`, a few comparisons) are evaluated
//! without reading the clock per event.
//!
//! What the queries cost together is bounded too, and charged to the
//! clients that subscribed them: while anyone is subscribed, some publishes
//! are timed (CPU time, see the `ledger` module), and what each audience's
//! query took is summed over a [`WINDOW`], each subscriber charged its
//! share (the audience's cost over its subscribers) and each client (a
//! peer address, or the one a trusted proxy forwards: [`Pubsub::client`],
//! [`crate::forwarded`]) the sum of its subscribers'. When all
//! took more than [`SHARE`] of it together, every subscription of the
//! dearest client is disconnected, then the next's, until the rest are
//! within it, and a client cut is refused whatever it asks for
//! [`REFUSED_FOR`]: many distinct queries, cheap or not, would otherwise
//! starve ingest together, and the client asking for them is the one that
//! pays, not one with a single dashboard beside it. A lossy subscriber
//! (the cluster's tap) is a client of its own, which is never
//! disconnected: cut, its audience takes every event unevaluated.
//!
//! With no subscribers to a topic, publishing to it costs one atomic load.
//! Nothing is published while a replay runs its batch under
//! [`outputs::suppressed`]: subscribers see live changes only.

mod ledger;
mod queue;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;
use tokio::sync::mpsc::error::TryRecvError;

use crate::event::Event;
use crate::event_queue::Refused;
use crate::forwarded::ClientAddr;
use crate::json;
use crate::limits::start_of;
use crate::outputs;
use crate::query::{Budget, Exceeded, Query};
use ledger::{Ledger, Sampler, Timer};
use queue::{Full, Queue, Queued};

pub use ledger::{SHARE, WINDOW};

/// Queue length per subscriber unless the caller asks otherwise.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Bytes of events (by [`Event::approx_bytes`]) one subscriber's queue may
/// hold: 10 000 ordinary events are ~3 MB.
pub const MAX_QUEUED_BYTES: usize = 64 * 1024 * 1024;

/// Bytes all subscribers' queues may hold together, by default.
pub const DEFAULT_MAX_HELD: usize = 256 * 1024 * 1024;

/// What a costly query may take of the publisher's time per event: over it,
/// its subscribers are disconnected (see the module's documentation).
pub const QUERY_BUDGET: Duration = Duration::from_millis(1);

/// Units of work (a term each, one per 16 bytes a term searches) a costly
/// query must have done on an event before its [`QUERY_BUDGET`] counts: a
/// publisher descheduled for a millisecond on a busy machine would
/// otherwise make a query of a few hundred terms (some 30 µs) look
/// costly. What this leaves unbounded by the clock is about a millisecond
/// of work.
pub const MIN_WORK: u64 = 100_000;

/// How long a query found too costly, or a client cut, is refused after
/// (see [`Client::admit`]).
pub const REFUSED_FOR: Duration = Duration::from_secs(60);

/// Query texts found too costly and clients cut that are remembered at
/// most (texts by hash): the oldest is forgotten for a new one.
pub const REMEMBERED: usize = 64;

/// The topic of what the index stores and expires.
pub const INDEX_TOPIC: &str = "index";

/// The longest topic name: one is part of a subscriber's URL.
pub const MAX_TOPIC_NAME: usize = 128;

/// Why `name` cannot name a topic: not 1 to [`MAX_TOPIC_NAME`] bytes of
/// ASCII letters, digits, `_`, `-` and `.` (it stands in a URL's path as
/// it is), or `.` or `..`.
pub fn topic_name_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a topic's name is empty".to_owned());
    }
    if name.len() > MAX_TOPIC_NAME {
        return Some(format!(
            "a topic's name is at most {MAX_TOPIC_NAME} bytes, not {}",
            name.len()
        ));
    }
    // A client resolves these in a URL's path (`/pubsub/..` is `/`): a
    // topic of such a name could not be subscribed to.
    if matches!(name, "." | "..") {
        return Some(format!(
            "a topic's name is not `{name}`: in a URL's path it is not a name"
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    let bad = name.chars().find(|&c| !allowed(c))?;
    Some(format!(
        "a topic's name is ASCII letters, digits, `_`, `-` and `.`, not {bad:?}"
    ))
}

/// One topic: its subscribers are those of the audiences naming it.
#[derive(Debug)]
pub struct Topic {
    name: Box<str>,
    /// How many subscribers it has, so publishing to it skips everything
    /// when there are none.
    subscribers: AtomicUsize,
    /// Where it is found by name, which forgets it when it is dropped;
    /// none for the index's.
    registry: Weak<Topics>,
}

impl Topic {
    fn new(name: &str, registry: Weak<Topics>) -> Topic {
        Topic {
            name: name.into(),
            subscribers: AtomicUsize::new(0),
            registry,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The topics other than the index's, by name: only those someone holds,
/// so a client subscribing to one random name after another leaves none
/// behind.
type Topics = Mutex<HashMap<Box<str>, Weak<Topic>>>;

impl Drop for Topic {
    fn drop(&mut self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let mut names = registry.lock();
        // The name may already be a new topic's, made since the last holder
        // of this one let go and before this lock: that one stays.
        if names
            .get(&*self.name)
            .is_some_and(|topic| std::ptr::eq(topic.as_ptr(), self))
        {
            names.remove(&*self.name);
        }
    }
}

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
    /// Subscribers disconnected because their query took more than its
    /// budget ([`QUERY_BUDGET`]) on one event, or their client was the
    /// dearest when all took more than their [`SHARE`].
    pub disconnected_costly: AtomicU64,
    /// Subscriptions refused because their query was found too costly, or
    /// their client cut, within the last [`REFUSED_FOR`].
    pub refused_costly: AtomicU64,
    /// Bytes held in all queues now (a gauge).
    pub bytes_held: AtomicUsize,
}

pub struct Pubsub {
    audiences: RwLock<Vec<Audience>>,
    /// How many subscribers the audiences have, all topics together.
    count: AtomicUsize,
    /// The [`INDEX_TOPIC`].
    index: Arc<Topic>,
    /// The other topics by name, while a subscriber or a publisher holds
    /// them.
    topics: Arc<Topics>,
    next_id: AtomicU64,
    max_held: usize,
    /// What a costly query may take per event ([`QUERY_BUDGET`]).
    query_budget: Duration,
    /// Query texts found too costly and clients cut, when, and how,
    /// oldest first.
    too_costly: Mutex<VecDeque<(Barred, Instant, Overran)>>,
    /// Which publishes are timed.
    sampler: Sampler,
    /// What the queries may cost together, over which window.
    ledger: Ledger,
    pub stats: PubsubStats,
}

impl Default for Pubsub {
    fn default() -> Self {
        Pubsub {
            audiences: RwLock::default(),
            count: AtomicUsize::new(0),
            index: Arc::new(Topic::new(INDEX_TOPIC, Weak::new())),
            topics: Arc::default(),
            next_id: AtomicU64::new(0),
            max_held: DEFAULT_MAX_HELD,
            query_budget: QUERY_BUDGET,
            too_costly: Mutex::default(),
            sampler: Sampler::default(),
            ledger: Ledger::new(SHARE, WINDOW),
            stats: PubsubStats::default(),
        }
    }
}

/// Where `topic`'s audiences are in `audiences`, which are kept in the
/// order of their topics' addresses: a publish visits its own topic's
/// only, so idle subscriptions to other topics (one per connection, to
/// names of a client's choosing) cost ingest nothing.
fn topic_range(audiences: &[Audience], topic: &Arc<Topic>) -> std::ops::Range<usize> {
    let key = |a: &Audience| Arc::as_ptr(&a.topic) as usize;
    let at = Arc::as_ptr(topic) as usize;
    audiences.partition_point(|a| key(a) < at)..audiences.partition_point(|a| key(a) <= at)
}

/// The subscribers of one topic with one query text: it is evaluated once
/// per event for all of them (a dashboard opened by many people asks the
/// same).
struct Audience {
    topic: Arc<Topic>,
    query: Query,
    members: Vec<Subscriber>,
    /// The query overran its budget and only lossy subscribers (which
    /// filter again) are left: every event is theirs, unevaluated.
    unfiltered: bool,
    /// What its query took of the publisher in this window, as timed
    /// (nanoseconds).
    spent: AtomicU64,
}

impl Audience {
    /// Whether `event` is for this audience; the time spent when its query
    /// overran `budget`.
    #[inline]
    fn wants(&self, event: &Event, budget: Duration) -> Result<bool, Duration> {
        if self.unfiltered {
            return Ok(true);
        }
        if !self.query.costly() {
            return Ok(self.query.matches(event));
        }
        let spend = &mut Budget::new(budget).with_floor(MIN_WORK);
        (self.query.matches_within(event, spend)).map_err(|e| match e {
            Exceeded::Time { spent } => spent,
            Exceeded::Cancelled => budget,
        })
    }
}

struct Subscriber {
    id: u64,
    /// Who pays for its share of its query's cost.
    payer: Payer,
    /// The trusted proxy its client came through, named in the log of a cut.
    via: Option<IpAddr>,
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
    /// Events held at most; series, for a coalescing queue.
    max_events: usize,
}

#[derive(Default)]
struct BacklogState {
    queue: Queue,
    /// The snapshot still to be sent before the events (see
    /// [`HeldSnapshot`]), and its bytes: held here so that disconnecting
    /// the subscriber frees it too, whatever its connection is doing.
    snapshot: std::vec::IntoIter<Event>,
    snapshot_bytes: usize,
    /// The batch taken whole last, while its connection writes it (see
    /// [`Subscription::take_all`], [`Subscription::written`]).
    taken_bytes: usize,
    /// Disconnected for being too slow: nothing more comes.
    lagged: bool,
    /// Why it was disconnected, when it was not for being too slow.
    why: Option<Arc<str>>,
    /// No more events: lagged, or the subscription was dropped.
    closed: bool,
}

impl Backlog {
    fn new(queue: Queue, max_events: usize) -> Backlog {
        Backlog {
            state: Mutex::new(BacklogState {
                queue,
                ..BacklogState::default()
            }),
            ready: Notify::new(),
            max_events: max_events.max(1),
        }
    }

    fn push(&self, event: Arc<Published>, bytes: usize, held: &AtomicUsize) -> Result<(), Refused> {
        let mut state = self.state.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        // The subscriber waits only once it found the queue empty, and
        // takes all that is queued before it waits again: only the first
        // event after it emptied the queue needs to wake it.
        let first = state.queue.is_empty();
        let before = state.queue.bytes();
        let pushed = (state.queue).push(event, bytes, self.max_events, MAX_QUEUED_BYTES);
        let replaced = pushed.map_err(|Full| Refused::Full)?;
        // Counted under the lock, so a reader never takes away what was
        // not yet added.
        let after = state.queue.bytes();
        if after >= before {
            held.fetch_add(after - before, Ordering::AcqRel);
        } else {
            held.fetch_sub(before - after, Ordering::AcqRel);
        }
        drop(state);
        drop(replaced);
        if first {
            self.ready.notify_one();
        }
        Ok(())
    }

    fn pop(&self, held: &AtomicUsize) -> Result<Arc<Published>, TryRecvError> {
        let mut state = self.state.lock();
        match state.queue.pop() {
            Some((event, bytes)) => {
                held.fetch_sub(bytes, Ordering::AcqRel);
                Ok(event)
            }
            None if state.closed => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Everything queued, counted now as the batch taken (see
    /// [`Subscription::take_all`]) instead of the one before.
    fn take_all(&self, held: &AtomicUsize) -> Result<VecDeque<Queued>, TryRecvError> {
        let mut state = self.state.lock();
        if state.queue.is_empty() {
            return Err(match state.closed {
                true => TryRecvError::Disconnected,
                false => TryRecvError::Empty,
            });
        }
        let bytes = state.queue.bytes();
        let taken = state.queue.take();
        let before = std::mem::replace(&mut state.taken_bytes, bytes);
        // The batch's bytes stay held, as the one before's go.
        held.fetch_sub(before, Ordering::AcqRel);
        Ok(taken)
    }

    /// What the subscriber holds: its queue, its snapshot not sent yet and
    /// the batch it took whole and is writing.
    fn bytes(&self) -> usize {
        let state = self.state.lock();
        state.queue.bytes() + state.snapshot_bytes + state.taken_bytes
    }

    /// [`Backlog::close`] for being too costly: `why`.
    fn close_because(&self, why: Arc<str>, held: &AtomicUsize) -> VecDeque<Queued> {
        self.state.lock().why = Some(why);
        self.close(true, held)
    }

    /// Takes no more events and frees those queued and the snapshot not
    /// sent; returns the events, for the caller to drop outside the lock.
    fn close(&self, lagged: bool, held: &AtomicUsize) -> VecDeque<Queued> {
        let mut state = self.state.lock();
        state.closed = true;
        state.lagged |= lagged;
        let freed = Self::empty(&mut state, held);
        let snapshot = Self::take_snapshot(&mut state, held);
        // Its connection drops the batch as it sees the end.
        held.fetch_sub(std::mem::take(&mut state.taken_bytes), Ordering::AcqRel);
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
    fn shed(&self, held: &AtomicUsize) -> VecDeque<Queued> {
        Self::empty(&mut self.state.lock(), held)
    }

    fn empty(state: &mut BacklogState, held: &AtomicUsize) -> VecDeque<Queued> {
        held.fetch_sub(state.queue.bytes(), Ordering::AcqRel);
        state.queue.take()
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

    /// True once the subscriber was dropped for being too slow, or for
    /// its query's cost ([`Subscription::why`]); its receiver then ends.
    pub fn lagged(&self) -> bool {
        self.queue.state.lock().lagged
    }

    /// Why the pubsub disconnected the subscriber, when it was not for
    /// being too slow: its query took too long on an event. Short enough
    /// for a WebSocket close frame.
    pub fn why(&self) -> Option<Arc<str>> {
        self.queue.state.lock().why.clone()
    }

    /// Everything queued, once something is: for a coalescing subscriber,
    /// the latest event of each series since the last take. `None` once
    /// unsubscribed (see [`Subscription::lagged`]). The batch stays counted
    /// in the pubsub's `max_held`, as its queue was, until its connection
    /// says it was written ([`Subscription::written`]), the next take or the
    /// end: a connection that takes a hundred thousand series and writes
    /// them slowly holds them.
    pub async fn take_all(&mut self) -> Option<Vec<Arc<Published>>> {
        let held = &self.pubsub.stats.bytes_held;
        loop {
            match self.queue.take_all(held) {
                Ok(taken) => return Some(taken.into_iter().map(|(event, _)| event).collect()),
                Err(TryRecvError::Disconnected) => return None,
                // A notification since the last look is kept as a permit.
                Err(TryRecvError::Empty) => self.queue.ready.notified().await,
            }
        }
    }

    /// The batch [`Subscription::take_all`] took last is written: no longer
    /// held.
    pub fn written(&self) {
        let held = &self.pubsub.stats.bytes_held;
        let mut state = self.queue.state.lock();
        held.fetch_sub(std::mem::take(&mut state.taken_bytes), Ordering::AcqRel);
    }

    /// This subscriber's snapshot, held within its pubsub's `max_held` (see
    /// [`Pubsub::hold`]) and freed with its queue if it is disconnected.
    pub fn hold(&self, snapshot: Vec<Event>) -> Result<HeldSnapshot, SnapshotRefused> {
        self.pubsub.hold_in(self.queue.clone(), snapshot)
    }
}

/// A client of the pubsub: what its subscribers' queries cost is charged to
/// it, and when it is the dearest while all cost too much, all of them go
/// (see the module's documentation).
pub struct Client {
    pubsub: Arc<Pubsub>,
    peer: Option<ClientAddr>,
}

impl Client {
    /// Whether `query` may be subscribed to the index's topic: refused (and
    /// counted) when it was found too costly there on one event within
    /// [`REFUSED_FOR`], or the client was cut for what its queries cost
    /// together, whatever the query and topic.
    pub fn admit(&self, query: &Query) -> Result<(), TooCostly> {
        self.admit_to(&self.pubsub.index, query)
    }

    /// Like [`Client::admit`], to `topic` instead of the index's.
    pub fn admit_to(&self, topic: &Topic, query: &Query) -> Result<(), TooCostly> {
        self.pubsub.admit(self.peer, topic, query)
    }

    pub fn subscribe(&self, query: Query, capacity: usize) -> Subscription {
        self.subscribe_to(self.pubsub.index.clone(), query, capacity)
    }

    /// Like [`Client::subscribe`], to `topic` instead of the index's.
    pub fn subscribe_to(&self, topic: Arc<Topic>, query: Query, capacity: usize) -> Subscription {
        let queue = Backlog::new(Queue::default(), capacity);
        self.pubsub.add(topic, self.peer, query, queue, false)
    }

    /// Like [`Client::subscribe`], but the queue holds the latest event of
    /// each series (host, service), up to `max_series` series: for a view
    /// of the latest states, which is not too slow for the events it skips.
    pub fn subscribe_latest(&self, query: Query, max_series: usize) -> Subscription {
        self.subscribe_latest_to(self.pubsub.index.clone(), query, max_series)
    }

    /// Like [`Client::subscribe_latest`], to `topic` instead of the index's.
    pub fn subscribe_latest_to(
        &self,
        topic: Arc<Topic>,
        query: Query,
        max_series: usize,
    ) -> Subscription {
        let queue = Backlog::new(Queue::coalescing(), max_series);
        self.pubsub.add(topic, self.peer, query, queue, false)
    }
}

/// A subscription refused because its query was found too costly for the
/// publisher a short while ago. Short enough for a WebSocket close frame.
#[derive(Debug, thiserror::Error)]
#[error(
    "query too costly for a live subscription ({overran}); narrow it, or retry in {retry_in} s"
)]
pub struct TooCostly {
    overran: Overran,
    retry_in: u64,
}

/// Who a subscriber's cost is charged to, and who is cut with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Payer {
    /// A client, by its peer address: all its subscribers together.
    Peer(IpAddr),
    /// A subscriber of no known peer, or a lossy one: itself, by id.
    Alone(u64),
}

/// What is refused for a while after it was found too costly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Barred {
    /// A query text over its budget on one event of a topic (the hash of
    /// both): it is the text that costs, whoever subscribes it, on that
    /// topic's events; another topic's may be small enough.
    Text(u64),
    /// A client cut for what its subscriptions cost together: whatever it
    /// asks for, as any text would cost as much again.
    Client(IpAddr),
}

/// How a query or client was found too costly, for a subscription refused.
#[derive(Debug, Clone, Copy)]
enum Overran {
    /// Over this budget on one event.
    Event(Duration),
    /// The dearest client when all queries took more than this share of a
    /// core, in percent.
    Share(u64),
}

impl std::fmt::Display for Overran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Overran::Event(budget) => write!(f, "over {budget:?} on one event"),
            Overran::Share(percent) => {
                write!(
                    f,
                    "the dearest client when all took over {percent}% of a core"
                )
            }
        }
    }
}

fn text_hash(topic: &Topic, text: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
        .hash_one((topic.name(), text))
}

/// `text`'s first `max` bytes or so (at a character boundary), marked as cut.
fn shorten(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    format!("{}…", start_of(text, max)).into()
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

    /// A pubsub whose queues hold `max_held` bytes together and whose
    /// queries may take `share` of each [`WINDOW`] together.
    pub fn bounded(max_held: usize, share: Duration) -> Arc<Pubsub> {
        Arc::new(Pubsub {
            max_held,
            ledger: Ledger::new(share, WINDOW),
            ..Pubsub::default()
        })
    }

    /// A pubsub whose costly queries may take `budget` per event (instead
    /// of [`QUERY_BUDGET`]).
    pub fn with_query_budget(budget: Duration) -> Arc<Pubsub> {
        Arc::new(Pubsub {
            query_budget: budget,
            ..Pubsub::default()
        })
    }

    /// A pubsub whose queries may take `share` of each `window` together
    /// (instead of [`SHARE`] of [`WINDOW`]).
    pub fn with_ingest_share(share: Duration, window: Duration) -> Arc<Pubsub> {
        Arc::new(Pubsub {
            ledger: Ledger::new(share, window),
            ..Pubsub::default()
        })
    }

    /// The client at `peer` (its address, without the port: a client's
    /// connections are one client, whichever proxy they came through), or
    /// one of no known peer, whose subscribers are each a client of their own.
    pub fn client(self: &Arc<Self>, peer: Option<ClientAddr>) -> Client {
        Client {
            pubsub: self.clone(),
            peer,
        }
    }

    /// A subscriber that is a client of its own (see [`Pubsub::client`]).
    pub fn subscribe(self: &Arc<Self>, query: Query, capacity: usize) -> Subscription {
        self.client(None).subscribe(query, capacity)
    }

    /// Like [`Pubsub::subscribe`], but a full queue loses (and counts) the
    /// event instead of disconnecting: for a forwarder that must stay
    /// attached. It is never disconnected for its query's cost either.
    pub fn subscribe_lossy(self: &Arc<Self>, query: Query, capacity: usize) -> Subscription {
        let queue = Backlog::new(Queue::default(), capacity);
        self.add(self.index.clone(), None, query, queue, true)
    }

    /// Like [`Pubsub::subscribe`], the queue holding the latest event of
    /// each series ([`Client::subscribe_latest`]).
    pub fn subscribe_latest(self: &Arc<Self>, query: Query, max_series: usize) -> Subscription {
        self.client(None).subscribe_latest(query, max_series)
    }

    /// Whether `peer` may subscribe `query` to `topic`: refused (and
    /// counted) when the query was found too costly on one event of the
    /// topic, or the client cut, within [`REFUSED_FOR`].
    fn admit(
        &self,
        peer: Option<ClientAddr>,
        topic: &Topic,
        query: &Query,
    ) -> Result<(), TooCostly> {
        let text = Barred::Text(text_hash(topic, query.as_str()));
        let client = peer.map(|peer| Barred::Client(peer.addr));
        let mut remembered = self.too_costly.lock();
        while (remembered.front()).is_some_and(|&(_, at, _)| at.elapsed() >= REFUSED_FOR) {
            remembered.pop_front();
        }
        let barred =
            |&&(what, ..): &&(Barred, Instant, Overran)| what == text || Some(what) == client;
        let Some(&(_, at, overran)) = remembered.iter().find(barred) else {
            return Ok(());
        };
        drop(remembered);
        self.stats.refused_costly.fetch_add(1, Ordering::Relaxed);
        Err(TooCostly {
            overran,
            retry_in: REFUSED_FOR.saturating_sub(at.elapsed()).as_secs() + 1,
        })
    }

    /// Remembers `what` as too costly, for [`REFUSED_FOR`].
    fn bar(&self, what: Barred, overran: Overran) {
        let mut remembered = self.too_costly.lock();
        remembered.retain(|&(w, ..)| w != what);
        if remembered.len() >= REMEMBERED {
            remembered.pop_front();
        }
        remembered.push_back((what, Instant::now(), overran));
    }

    fn add(
        self: &Arc<Self>,
        topic: Arc<Topic>,
        peer: Option<ClientAddr>,
        query: Query,
        queue: Backlog,
        lossy: bool,
    ) -> Subscription {
        let queue = Arc::new(queue);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let subscriber = Subscriber {
            id,
            payer: peer.map_or(Payer::Alone(id), |peer| Payer::Peer(peer.addr)),
            via: peer.and_then(|peer| peer.via),
            queue: queue.clone(),
            lossy,
        };
        let mut audiences = self.audiences.write();
        let same =
            |a: &&mut Audience| Arc::ptr_eq(&a.topic, &topic) && a.query.as_str() == query.as_str();
        topic.subscribers.fetch_add(1, Ordering::AcqRel);
        match audiences.iter_mut().find(same) {
            // Not lossy, it wants the query evaluated again.
            Some(audience) => {
                audience.unfiltered &= lossy;
                audience.members.push(subscriber);
            }
            None => {
                let at = topic_range(&audiences, &topic).end;
                audiences.insert(
                    at,
                    Audience {
                        topic,
                        query,
                        members: vec![subscriber],
                        unfiltered: false,
                        spent: AtomicU64::new(0),
                    },
                );
            }
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

    /// What all queries may take of each [`WINDOW`] together.
    pub fn share(&self) -> Duration {
        self.ledger.share()
    }

    /// `snapshot` sent alone (no subscription follows it), its bytes
    /// counted with the queues' while it is sent; refused when they do not
    /// fit in `max_held` beside what is held now. The client is then
    /// refused (try again later) rather than the memory of many clients'
    /// snapshots growing without bound.
    pub fn hold(self: &Arc<Self>, snapshot: Vec<Event>) -> Result<HeldSnapshot, SnapshotRefused> {
        self.hold_in(Arc::new(Backlog::new(Queue::default(), 1)), snapshot)
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

    /// The distinct queries of the index topic's subscribers, as text.
    pub fn queries(&self) -> Vec<String> {
        let mut queries: Vec<String> = (self.audiences.read().iter())
            .filter(|a| Arc::ptr_eq(&a.topic, &self.index))
            .map(|a| a.query.as_str().to_owned())
            .collect();
        queries.sort_unstable();
        queries
    }

    /// The topic named `name` ([`INDEX_TOPIC`]: the index's), the same for
    /// everyone holding it, made if nobody does. The caller checked the
    /// name ([`topic_name_error`]).
    pub fn topic(&self, name: &str) -> Arc<Topic> {
        if name == INDEX_TOPIC {
            return self.index.clone();
        }
        let mut names = self.topics.lock();
        if let Some(topic) = names.get(name).and_then(Weak::upgrade) {
            return topic;
        }
        let topic = Arc::new(Topic::new(name, Arc::downgrade(&self.topics)));
        // Replaces the name of a topic whose last holder let go and whose
        // drop is yet to find it: never the drop of one it holds, as no
        // topic is dropped under this lock.
        names.insert(name.into(), Arc::downgrade(&topic));
        topic
    }

    /// Offers `event` to every subscriber of the index's topic whose query
    /// matches it.
    pub fn publish(&self, event: &Event) {
        self.publish_to(&self.index, event);
    }

    /// Offers `event` to every subscriber of `topic` whose query matches it.
    pub fn publish_to(&self, topic: &Arc<Topic>, event: &Event) {
        if topic.subscribers.load(Ordering::Acquire) == 0 || outputs::is_suppressed() {
            return;
        }
        let held = &self.stats.bytes_held;
        let mut slow = Vec::new();
        let mut costly = Vec::new();
        let mut shared = None;
        let audiences = self.audiences.read();
        let mut timer = self.sampler.due().map(Timer::start);
        let mine = &audiences[topic_range(&audiences, topic)];
        let laps = u32::try_from(mine.len()).unwrap_or(u32::MAX);
        for audience in mine {
            if let Some(timer) = &mut timer {
                timer.lap(&audience.spent);
            }
            // Over its budget, the query matches for its lossy subscribers
            // (they filter again) and nobody else.
            let lossy_only = match audience.wants(event, self.query_budget) {
                Ok(true) => false,
                Ok(false) => continue,
                Err(spent) => {
                    costly.push((audience.query.as_str().to_owned(), spent));
                    if !audience.members.iter().any(|s| s.lossy) {
                        continue;
                    }
                    true
                }
            };
            let (published, bytes) = shared.get_or_insert_with(|| {
                let published = Published {
                    event: event.clone(),
                    json: OnceLock::new(),
                };
                (Arc::new(published), event.approx_bytes())
            });
            for sub in (audience.members.iter()).filter(|s| s.lossy || !lossy_only) {
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
        let cost = timer.map(Timer::stop);
        drop(audiences);
        for (query, spent) in costly {
            self.too_costly(topic, &query, spent);
        }
        if let Some(cost) = cost {
            self.sampler.timed(cost, laps);
            for (payer, percent, all) in self.over_share() {
                self.cut(payer, percent, all);
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

    /// The clients to cut, with what they and all took (in percent of a
    /// core), when the window is over and all took more than their share
    /// of it together: the dearest, until the rest are within it. Each
    /// audience's cost starts again from nothing.
    #[cold]
    fn over_share(&self) -> Vec<(Payer, u64, u64)> {
        let Some(lasted) = self.ledger.close(Instant::now()) else {
            return Vec::new();
        };
        let mut clients: HashMap<Payer, Duration> = HashMap::new();
        for audience in self.audiences.read().iter() {
            let spent = Duration::from_nanos(audience.spent.swap(0, Ordering::Relaxed));
            let share = spent / audience.members.len().max(1) as u32;
            for sub in &audience.members {
                *clients.entry(sub.payer).or_default() += share;
            }
        }
        let (payers, spent): (Vec<Payer>, Vec<Duration>) = clients.into_iter().unzip();
        let all = ledger::percent(spent.iter().sum(), lasted);
        (self.ledger.over_share(&spent, lasted).into_iter())
            .map(|i| (payers[i], ledger::percent(spent[i], lasted), all))
            .collect()
    }

    /// `query` took `spent` on one event of `topic`, over its budget: its
    /// subscribers to the topic are disconnected with the reason, its lossy
    /// ones take every event from now on, and the text is refused on the
    /// topic for [`REFUSED_FOR`]. On other topics it is left: their events
    /// may be small enough (the index's holding megabyte descriptions, a
    /// topic of alerts not), and those with events are the rules' few, so
    /// a client trying it on each costs a budget a topic.
    #[cold]
    fn too_costly(&self, topic: &Arc<Topic>, query: &str, spent: Duration) {
        let spent = Duration::from_micros(spent.as_micros().try_into().unwrap_or(u64::MAX));
        let budget = self.query_budget;
        let why: Arc<str> = format!(
            "query too costly for a live subscription: {spent:?} on one event, over {budget:?}; narrow it"
        )
        .into();
        self.bar(
            Barred::Text(text_hash(topic, query)),
            Overran::Event(budget),
        );
        let (gone, taps, _) =
            self.take(|a, _| Arc::ptr_eq(&a.topic, topic) && a.query.as_str() == query);
        let (disconnected, freed) = self.close_all(&gone, &why);
        let shown = shorten(query, 200);
        tracing::warn!(
            topic = topic.name(),
            query = %shown,
            query_bytes = query.len(),
            reason = %why,
            subscribers = disconnected,
            lossy_kept = taps,
            events = freed,
            "Live subscription query too costly for the ingest path: its subscribers are disconnected \
             and the query refused for {REFUSED_FOR:?}."
        );
    }

    /// `payer`, the dearest client when all took more than their share
    /// (it `percent` of a core, all `all`): all its subscribers are
    /// disconnected with the reason and the client refused for
    /// [`REFUSED_FOR`]; a lossy one's audience takes every event from now
    /// on instead.
    #[cold]
    fn cut(&self, payer: Payer, percent: u64, all: u64) {
        let share = self.ledger.percent();
        let why: Arc<str> = format!(
            "query too costly for a live subscription: this client's {percent}% of a core, all queries {all}%, over {share}%; narrow it"
        )
        .into();
        if let Payer::Peer(peer) = payer {
            self.bar(Barred::Client(peer), Overran::Share(share));
        }
        let (gone, taps, queries) = self.take(|_, sub| sub.payer == payer);
        // Gone meanwhile (its connections closed): nothing to tell.
        if queries.is_empty() {
            return;
        }
        let (disconnected, freed) = self.close_all(&gone, &why);
        let shown = queries.first().map(|q| shorten(q, 200).into_owned());
        let client = match payer {
            Payer::Peer(addr) => {
                let via = gone.iter().find_map(|sub| sub.via);
                ClientAddr { addr, via }.to_string()
            }
            Payer::Alone(id) => format!("subscriber {id}"),
        };
        tracing::warn!(
            %client,
            reason = %why,
            subscribers = disconnected,
            lossy_kept = taps,
            queries = queries.len(),
            query = shown.as_deref().unwrap_or(""),
            events = freed,
            "Live subscriptions too costly for the ingest path together: the dearest client's are \
             disconnected and the client refused for {REFUSED_FOR:?}."
        );
    }

    /// Takes out the subscribers `picked` (of an audience), but lossy
    /// ones, which stay and whose audience takes every event unevaluated
    /// from now on if nobody else is left in it. Returns those taken, how
    /// many lossy ones stayed, and the texts of the queries picked from.
    fn take(
        &self,
        picked: impl Fn(&Audience, &Subscriber) -> bool,
    ) -> (Vec<Subscriber>, usize, Vec<String>) {
        let (mut gone, mut taps, mut queries) = (Vec::new(), 0, Vec::new());
        let mut audiences = self.audiences.write();
        for audience in audiences.iter_mut() {
            let (chosen, others): (Vec<_>, Vec<_>) = std::mem::take(&mut audience.members)
                .into_iter()
                .partition(|s| picked(audience, s));
            audience.members = others;
            if chosen.is_empty() {
                continue;
            }
            queries.push(audience.query.as_str().to_owned());
            let (lossy, taken): (Vec<_>, Vec<_>) = chosen.into_iter().partition(|s| s.lossy);
            (audience.topic.subscribers).fetch_sub(taken.len(), Ordering::AcqRel);
            gone.extend(taken);
            taps += lossy.len();
            if !lossy.is_empty() && audience.members.iter().all(|s| s.lossy) {
                audience.unfiltered = true;
            }
            audience.members.extend(lossy);
        }
        audiences.retain(|a| !a.members.is_empty());
        self.count.fetch_sub(gone.len(), Ordering::AcqRel);
        (gone, taps, queries)
    }

    /// Closes `gone`'s queues because `why`, counted; returns how many
    /// they were and the events they held.
    fn close_all(&self, gone: &[Subscriber], why: &Arc<str>) -> (u64, usize) {
        let mut freed = 0;
        for sub in gone {
            freed += (sub.queue)
                .close_because(why.clone(), &self.stats.bytes_held)
                .len();
        }
        let disconnected = gone.len() as u64;
        (self.stats.disconnected_costly).fetch_add(disconnected, Ordering::Relaxed);
        (disconnected, freed)
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
        audience.topic.subscribers.fetch_sub(1, Ordering::AcqRel);
        if audience.members.is_empty() {
            // `remove`, not `swap_remove`: the audiences stay in topic order.
            audiences.remove(a);
        }
        self.count.fetch_sub(1, Ordering::AcqRel);
        Some((sub, query))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::event::Metric;

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

    fn metric_of(host: &str, metric: i64) -> Event {
        Event {
            host: Some(host.into()),
            service: Some("cpu".into()),
            metric: Some(Metric::Int(metric)),
            ..Event::default()
        }
    }

    /// A coalescing subscriber that reads nothing is not too slow for the
    /// events it skips: however many come, it holds one per series, the
    /// latest, in the order the series first came.
    #[tokio::test]
    async fn a_coalescing_subscriber_holds_the_latest_of_each_series_however_many_come() {
        // Publishing without a pause, the subscribers' turns are most of
        // the thread's time: on a loaded machine the test outlasts a window
        // and would be cut for its cost (24 runs in 60 beside two busy
        // loops), which is not what it tests. A whole core never runs over.
        let pubsub = Pubsub::with_ingest_share(WINDOW, WINDOW);
        let all = || Query::parse("true").unwrap();
        let mut latest = pubsub.subscribe_latest(all(), 100);
        let mut each = pubsub.subscribe(all(), DEFAULT_CAPACITY);
        for metric in 0..50_000 {
            pubsub.publish(&metric_of(&format!("h{}", metric % 10), metric));
        }
        assert!(each.lagged(), "{DEFAULT_CAPACITY} events did not hold them");
        assert!(!latest.lagged());
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 1);
        let held: Vec<_> = std::iter::from_fn(|| latest.try_recv().ok())
            .map(|e| (e.host_str().to_owned(), e.metric))
            .collect();
        let want: Vec<_> = (49_990..50_000)
            .map(|m| (format!("h{}", m % 10), Some(Metric::Int(m))))
            .collect();
        assert_eq!(held, want);
        assert!(each.recv().await.is_none());
    }

    /// What a coalescing subscriber holds is what its latest events take:
    /// a replaced one is given back, all of it when it goes; and it is
    /// disconnected when it holds the most while all hold too much.
    #[tokio::test]
    async fn a_coalescing_subscriber_holds_the_bytes_of_its_latest_events() {
        let one = metric_of("h0", 0).approx_bytes();
        let pubsub = Pubsub::with_max_held(10 * one);
        let held = || pubsub.stats.bytes_held.load(Ordering::Acquire);
        let all = || Query::parse("true").unwrap();
        let bigger = |host: &str| Event {
            description: Some("x".repeat(100)),
            ..metric_of(host, 0)
        };
        let mut latest = pubsub.subscribe_latest(all(), 100);
        for metric in 0..1_000 {
            pubsub.publish(&metric_of(&format!("h{}", metric % 3), metric));
        }
        assert_eq!(held(), 3 * one);
        pubsub.publish(&bigger("h1"));
        assert_eq!(held(), 2 * one + bigger("h1").approx_bytes());
        pubsub.publish(&metric_of("h1", 0));
        assert_eq!(held(), 3 * one);
        // Taken whole, the batch is held while its connection writes it.
        let batch = latest.take_all().await.unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(held(), 3 * one);
        pubsub.publish(&metric_of("h0", 1));
        assert_eq!(held(), 4 * one);
        let next = latest.take_all().await.unwrap();
        assert_eq!(next[0].metric, Some(Metric::Int(1)));
        assert_eq!(held(), one, "the batch before is given back");
        drop(latest);
        assert_eq!(held(), 0, "given back when it goes");

        let latest = pubsub.subscribe_latest(all(), 100);
        let mut reader = pubsub.subscribe(all(), 100);
        for n in 0..10 {
            pubsub.publish(&metric_of(&format!("h{n}"), 0));
            assert!(reader.recv().await.is_some());
        }
        // 10 series and the reader's event: the coalescing one holds the most.
        assert!(latest.lagged() && !reader.lagged());
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 1);
        assert_eq!(held(), 0);
    }

    /// However fast its series change, a coalescing subscriber holds at
    /// most its bound of them: one more and it is too slow.
    #[test]
    fn a_coalescing_subscriber_is_disconnected_past_its_series() {
        let pubsub = Pubsub::new();
        let mut latest = pubsub.subscribe_latest(Query::parse("true").unwrap(), 1_000);
        for round in 0..3 {
            for n in 0..1_000 {
                pubsub.publish(&metric_of(&format!("h{n}"), round));
            }
        }
        assert!(!latest.lagged());
        pubsub.publish(&metric_of("one more", 0));
        assert!(latest.lagged());
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 1);
        assert_eq!(pubsub.stats.bytes_held.load(Ordering::Acquire), 0);
        assert!(latest.try_recv().is_err());
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

    /// 300 searches of the description: costly, and past a budget of
    /// nothing (and past [`MIN_WORK`]) after two terms on a [`long`] event,
    /// whatever the machine's speed.
    fn dear() -> Query {
        let terms: Vec<_> = (0..300)
            .map(|i| format!(r#"description =~ "%q{i}zM%""#))
            .collect();
        Query::parse(&terms.join(" or ")).unwrap()
    }

    /// An event with a 1 MB description: 65 537 units of work per search.
    fn long(service: &str) -> Event {
        Event {
            description: Some("x".repeat(1024 * 1024)),
            ..event(service)
        }
    }

    /// A query of 300 comparisons is evaluated in full however late the
    /// clock says it is: below [`MIN_WORK`], being descheduled does not
    /// make it costly.
    #[test]
    fn a_query_below_the_floor_of_work_is_never_too_costly() {
        let pubsub = Pubsub::with_query_budget(Duration::ZERO);
        let terms: Vec<_> = (0..300).map(|i| format!("metric > {}", 1000 + i)).collect();
        let chain = Query::parse(&terms.join(" or ")).unwrap();
        assert!(chain.costly());
        let mut sub = pubsub.subscribe(chain, 10);
        // None of the terms matches: all 300 are evaluated, each time.
        for _ in 0..1_000 {
            pubsub.publish(&metric_of("h", 0));
        }
        pubsub.publish(&metric_of("h", 5000));
        assert!(!sub.lagged());
        assert_eq!(pubsub.stats.disconnected_costly.load(Ordering::Relaxed), 0);
        assert!(sub.try_recv().is_ok());
    }

    /// A query over its budget on one event costs that event its budget
    /// once: its subscribers are disconnected, told why and counted, the
    /// others served, and the same text refused for a while.
    #[tokio::test]
    async fn a_subscription_whose_query_overruns_its_budget_is_disconnected_and_refused() {
        let pubsub = Pubsub::with_query_budget(Duration::ZERO);
        let mut costly = pubsub.subscribe(dear(), 10);
        let mut same = pubsub.subscribe(dear(), 10);
        let mut cheap = pubsub.subscribe(Query::parse("true").unwrap(), 10);
        let few = Query::parse(r#"service = "cpu" or service = "disk""#).unwrap();
        assert!(!few.costly());
        let mut other = pubsub.subscribe(few, 10);
        pubsub.publish(&long("cpu"));
        for sub in [&costly, &same] {
            assert!(sub.lagged());
            let why = sub.why().expect("a reason");
            assert!(
                why.starts_with("query too costly for a live subscription: ")
                    && why.ends_with("on one event, over 0ns; narrow it"),
                "{why}"
            );
            assert!(why.len() <= 123, "fits a close frame");
        }
        assert!(costly.recv().await.is_none() && same.recv().await.is_none());
        assert_eq!(pubsub.stats.disconnected_costly.load(Ordering::Relaxed), 2);
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 0);
        assert_eq!(pubsub.subscribers(), 2);
        assert_eq!(pubsub.queries().len(), 2, "its audience is gone");
        assert_eq!(cheap.recv().await.unwrap().service.as_deref(), Some("cpu"));
        assert_eq!(other.recv().await.unwrap().service.as_deref(), Some("cpu"));
        assert!(!cheap.lagged() && cheap.why().is_none());
        // Refused now, before it costs another event its budget.
        let refused = pubsub.client(None).admit(&dear()).expect_err("refused");
        assert!(
            refused.to_string().starts_with("query too costly"),
            "{refused}"
        );
        assert!(refused.to_string().len() <= 123);
        assert_eq!(pubsub.stats.refused_costly.load(Ordering::Relaxed), 1);
        assert!(
            pubsub
                .client(None)
                .admit(&Query::parse("true").unwrap())
                .is_ok()
        );
    }

    /// A query over its budget on one event of a topic is barred on that
    /// topic, and its subscribers there disconnected; on another topic,
    /// whose events it evaluates within its budget, its subscribers stay
    /// and it may be subscribed again.
    #[test]
    fn a_query_too_costly_on_one_topic_is_barred_on_that_topic_only() {
        let pubsub = Pubsub::with_query_budget(Duration::ZERO);
        let alerts = pubsub.topic("alerts");
        let anyone = pubsub.client(None);
        let on_index = anyone.subscribe(dear(), 10);
        let mut on_alerts = anyone.subscribe_to(alerts.clone(), dear(), 10);
        pubsub.publish(&long("cpu"));
        assert!(on_index.lagged());
        assert_eq!(
            (on_alerts.lagged(), on_alerts.why()),
            (false, None),
            "the subscriber to alerts stays"
        );
        let short = Event {
            description: Some("q7zM".into()),
            ..event("disk")
        };
        pubsub.publish_to(&alerts, &short);
        assert_eq!(
            on_alerts.try_recv().unwrap().service.as_deref(),
            Some("disk")
        );
        assert!(anyone.admit(&dear()).is_err());
        assert!(anyone.admit_to(&alerts, &dear()).is_ok());
        assert_eq!(pubsub.stats.disconnected_costly.load(Ordering::Relaxed), 1);
        assert_eq!(pubsub.stats.refused_costly.load(Ordering::Relaxed), 1);
    }

    /// A lossy subscriber (the cluster's tap filters again what it
    /// forwards) stays when its query overruns: it takes every event from
    /// then on, and its query costs the publisher nothing more.
    #[test]
    fn a_lossy_subscriber_over_its_budget_stays_and_takes_every_event() {
        let pubsub = Pubsub::with_query_budget(Duration::ZERO);
        let mut tap = pubsub.subscribe_lossy(dear(), 10);
        pubsub.publish(&long("first"));
        assert!(!tap.lagged());
        assert_eq!(pubsub.subscribers(), 1);
        assert_eq!(tap.try_recv().unwrap().service.as_deref(), Some("first"));
        pubsub.publish(&long("second"));
        assert_eq!(tap.try_recv().unwrap().service.as_deref(), Some("second"));
        assert_eq!(pubsub.stats.disconnected_costly.load(Ordering::Relaxed), 0);
    }

    /// Query texts found too costly are remembered up to a bound, the oldest
    /// forgotten first.
    #[test]
    fn refused_queries_are_remembered_up_to_a_bound() {
        let pubsub = Pubsub::with_query_budget(Duration::ZERO);
        let nth = |n: usize| {
            let terms: Vec<_> = (0..300)
                .map(|i| format!(r#"description =~ "%q{i}z{n}M%""#))
                .collect();
            Query::parse(&terms.join(" or ")).unwrap()
        };
        for n in 0..=REMEMBERED {
            let _sub = pubsub.subscribe(nth(n), 10);
            pubsub.publish(&long("x"));
        }
        assert_eq!(pubsub.too_costly.lock().len(), REMEMBERED);
        let anyone = pubsub.client(None);
        assert!(anyone.admit(&nth(0)).is_ok(), "the oldest forgotten");
        assert!(anyone.admit(&nth(1)).is_err());
        assert!(anyone.admit(&nth(REMEMBERED)).is_err());
    }

    /// A chain of `terms` comparisons, none of which matches [`metric_of`]
    /// 0, so each is evaluated every time: costly past 16 terms, and far
    /// below [`MIN_WORK`], so never over its budget on one event.
    fn chain(terms: usize, from: usize) -> Query {
        let terms: Vec<_> = (0..terms)
            .map(|i| format!("metric > {}", 1000 + from + i))
            .collect();
        Query::parse(&terms.join(" or ")).unwrap()
    }

    const A: Option<ClientAddr> = Some(ClientAddr::direct(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))));
    const B: Option<ClientAddr> = Some(ClientAddr::direct(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))));

    /// A client subscribing many distinct cheap queries takes more than
    /// all may together: it is the one cut, all of its subscriptions, with
    /// the reason, counted, and refused whatever it asks next; another
    /// client's cheap and costly queries stay and are served.
    #[test]
    fn a_client_flooding_cheap_queries_is_cut_not_a_bystander() {
        // Well over the evaluation a timed publish stands for (500 µs, up
        // to 10 ms for the flood's 200 audiences): in a shorter window one
        // timed publish's charge, standing for those since the last, could
        // put the bystander over the share once the flood was cut (2 runs
        // in 100 beside two busy loops at 100 µs). At 20 ms, 3 runs in 240
        // (a debug build, the machine shared) cut the bystander with the
        // flood, charged 75% of a core: a timed publish stands for up to
        // 1 024, so a page fault or interrupt of a few µs in one of its
        // turns (on the thread's CPU clock: not time away) was milliseconds
        // of a window of only a few timed publishes. Ten times longer, it
        // is an average of ten times as many: none in 240. No injected
        // clock: the timer reads the real ones.
        let window = Duration::from_millis(200);
        let pubsub = Pubsub::with_ingest_share(window / 5, window);
        let (flood, other) = (pubsub.client(A), pubsub.client(B));
        let flooding: Vec<_> = (0..200)
            .map(|i| {
                let query = Query::parse(&format!(r#"service =~ "%zzz{i}%""#)).unwrap();
                assert!(!query.costly());
                flood.subscribe(query, 10)
            })
            .collect();
        let mut cheap = other.subscribe(Query::parse(r#"service = "cpu""#).unwrap(), 10);
        let mut modest = other.subscribe(chain(20, 0), 10);
        assert!(chain(20, 0).costly());
        for _ in 0..1_000_000 {
            pubsub.publish(&metric_of("h", 5_000));
            assert!(cheap.try_recv().is_ok() && modest.try_recv().is_ok());
            if flooding.iter().all(Subscription::lagged) {
                break;
            }
        }
        assert!(flooding.iter().all(Subscription::lagged), "all of its go");
        assert!(!cheap.lagged() && !modest.lagged());
        let why = flooding[0].why().expect("a reason");
        assert!(
            why.starts_with("query too costly for a live subscription: this client's ")
                && why.contains("% of a core, all queries ")
                && why.ends_with("%, over 20%; narrow it"),
            "{why}"
        );
        assert!(why.len() <= 123, "fits a close frame");
        assert_eq!(
            pubsub.stats.disconnected_costly.load(Ordering::Relaxed),
            200
        );
        assert_eq!(pubsub.subscribers(), 2);
        pubsub.publish(&metric_of("h", 5_000));
        assert!(cheap.try_recv().is_ok() && modest.try_recv().is_ok());
        // Refused whatever the text: a variant of one it had, or another.
        for text in [
            r#"service =~  "%zzz0%""#,
            r#"service =~ "%zzz0%" and true"#,
            "true",
        ] {
            let refused = flood.admit(&Query::parse(text).unwrap()).expect_err(text);
            assert_eq!(
                refused.to_string(),
                "query too costly for a live subscription (the dearest client when all took over 20% of a core); narrow it, or retry in 60 s"
            );
        }
        assert_eq!(pubsub.stats.refused_costly.load(Ordering::Relaxed), 3);
        // Not the text: another client may subscribe it.
        assert!(
            other
                .admit(&Query::parse(r#"service =~ "%zzz0%""#).unwrap())
                .is_ok()
        );
        assert!(pubsub.client(None).admit(&chain(20, 0)).is_ok());
    }

    /// A lossy tap whose query is among the dearest is never disconnected:
    /// it takes every event unevaluated from then on. The dearest client
    /// loses its cheap query with its costly one; another's stay.
    #[test]
    fn a_lossy_tap_over_the_share_stays_and_takes_every_event() {
        let window = Duration::from_micros(100);
        let pubsub = Pubsub::with_ingest_share(window / 5, window);
        let (dear, other) = (pubsub.client(A), pubsub.client(B));
        let costly = dear.subscribe(chain(3_000, 0), 10);
        let mut its_cheap = dear.subscribe(Query::parse(r#"host = "h""#).unwrap(), 10);
        let mut tap = pubsub.subscribe_lossy(chain(3_000, 5_000), 10);
        let mut cheap = other.subscribe(Query::parse("true").unwrap(), 10);
        let modest = other.subscribe(chain(20, 10_000), 10);
        let tap_unfiltered = || pubsub.audiences.read().iter().any(|a| a.unfiltered);
        // Each timed publish closes a window: the first cuts nothing (the
        // window since the pubsub was made is long), a later one each of
        // the two that cost far more than a fifth of it.
        for _ in 0..10_000 {
            pubsub.publish(&metric_of("h", 0));
            assert!(cheap.try_recv().is_ok());
            let _ = its_cheap.try_recv();
            if costly.lagged() && tap_unfiltered() {
                break;
            }
        }
        assert!(costly.lagged() && its_cheap.lagged() && tap_unfiltered());
        assert_eq!(costly.why(), its_cheap.why());
        assert!(!modest.lagged() && !cheap.lagged() && !tap.lagged());
        assert_eq!(pubsub.stats.disconnected_costly.load(Ordering::Relaxed), 2);
        assert_eq!(pubsub.subscribers(), 3);
        while tap.try_recv().is_ok() {}
        pubsub.publish(&metric_of("h", 0));
        assert!(tap.try_recv().is_ok(), "every event is the tap's now");
        assert!(dear.admit(&Query::parse("true").unwrap()).is_err());
        assert!(other.admit(&chain(3_000, 0)).is_ok());
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

    /// The audiences are kept in topic order, so a publish visits only its
    /// own topic's: subscriptions to many topics, in any order, with some
    /// gone again, leave each topic's audiences side by side.
    #[test]
    fn a_publish_visits_its_own_topics_audiences_only() {
        let pubsub = Pubsub::new();
        let anyone = pubsub.client(None);
        let names = ["a", "b", INDEX_TOPIC, "c"];
        let mut held = Vec::new();
        for round in 0..5 {
            for name in names {
                let query = Query::parse(&format!("metric > {round}")).unwrap();
                held.push(anyone.subscribe_to(pubsub.topic(name), query, 10));
            }
        }
        // Every third one leaves: its audience (one subscriber) goes.
        let mut n = 0;
        held.retain(|_| {
            n += 1;
            n % 3 != 0
        });
        let audiences = pubsub.audiences.read();
        for name in names {
            let topic = pubsub.topic(name);
            let mine = topic_range(&audiences, &topic);
            let all = (audiences.iter())
                .filter(|a| Arc::ptr_eq(&a.topic, &topic))
                .count();
            assert!(all > 0, "{name} has audiences");
            assert_eq!(mine.len(), all, "{name}'s audiences side by side");
            assert!(
                audiences[mine]
                    .iter()
                    .all(|a| Arc::ptr_eq(&a.topic, &topic)),
                "{name}"
            );
        }
    }

    /// A topic's events reach its subscribers only: not the index's, nor
    /// another topic's, though they ask the same query; and the index's
    /// reach none of the topic's.
    #[test]
    fn a_topic_reaches_its_own_subscribers_only() {
        let pubsub = Pubsub::new();
        let all = || Query::parse("true").unwrap();
        let (alerts, other) = (pubsub.topic("alerts"), pubsub.topic("other"));
        assert!(
            Arc::ptr_eq(&alerts, &pubsub.topic("alerts")),
            "one topic per name"
        );
        let anyone = pubsub.client(None);
        let mut to_alerts = anyone.subscribe_to(pubsub.topic("alerts"), all(), 10);
        let mut to_other = anyone.subscribe_to(other.clone(), all(), 10);
        let mut to_index = pubsub.subscribe(all(), 10);
        assert_eq!(
            pubsub.queries(),
            vec!["true".to_owned()],
            "the index's only"
        );
        pubsub.publish_to(&alerts, &event("alert"));
        pubsub.publish(&event("indexed"));
        assert_eq!(
            to_alerts.try_recv().unwrap().service.as_deref(),
            Some("alert")
        );
        assert!(to_alerts.try_recv().is_err());
        assert!(to_other.try_recv().is_err());
        assert_eq!(
            to_index.try_recv().unwrap().service.as_deref(),
            Some("indexed")
        );
        assert!(to_index.try_recv().is_err());
        assert_eq!(pubsub.topic(INDEX_TOPIC).name(), INDEX_TOPIC);
        drop(to_index);
        // A topic without subscribers is skipped, whoever else listens.
        pubsub.publish(&event("nobody"));
        assert_eq!(pubsub.stats.delivered.load(Ordering::Relaxed), 2);
        assert_eq!(alerts.subscribers.load(Ordering::Acquire), 1);
        drop(to_alerts);
        assert_eq!(alerts.subscribers.load(Ordering::Acquire), 0);
        assert_eq!(other.subscribers.load(Ordering::Acquire), 1);
    }

    /// A topic's subscribers are within the bound on what all hold: one
    /// reading nothing is disconnected as furthest behind, as the index's.
    #[test]
    fn a_topic_subscriber_counts_in_what_all_hold() {
        let one = event("x").approx_bytes();
        let pubsub = Pubsub::with_max_held(3 * one);
        let topic = pubsub.topic("t");
        let mut reader = pubsub.subscribe(Query::parse("true").unwrap(), 100);
        let idle =
            (pubsub.client(None)).subscribe_to(topic.clone(), Query::parse("true").unwrap(), 100);
        for _ in 0..4 {
            pubsub.publish_to(&topic, &event("x"));
            pubsub.publish(&event("x"));
            assert!(reader.try_recv().is_ok());
        }
        assert!(idle.lagged() && !reader.lagged());
        assert_eq!(topic.subscribers.load(Ordering::Acquire), 0);
        assert_eq!(pubsub.stats.bytes_held.load(Ordering::Acquire), 0);
    }

    /// Subscribing to one random topic name after another leaves no state
    /// behind: the registry holds the names of the topics held, and no
    /// other, whatever their peak; a topic a publisher holds stays the same.
    #[test]
    fn topics_nobody_holds_are_forgotten() {
        let pubsub = Pubsub::new();
        let published = pubsub.topic("published");
        let anyone = pubsub.client(None);
        let mut held = Vec::new();
        for n in 0..10_000 {
            let topic = pubsub.topic(&format!("random{n}"));
            let sub = anyone.subscribe_to(topic, Query::parse("true").unwrap(), 1);
            if n % 1_000 == 0 {
                held.push(sub);
            }
            // The subscription made in this round included, held or not.
            let live = held.len() + usize::from(n % 1_000 != 0);
            assert_eq!(pubsub.topics.lock().len(), 1 + live, "round {n}");
        }
        assert!(Arc::ptr_eq(&published, &pubsub.topic("published")));
        assert_eq!(pubsub.subscribers(), held.len());
        drop(held);
        assert_eq!(pubsub.audiences.read().len(), 0);
        let names: Vec<_> = pubsub.topics.lock().keys().cloned().collect();
        assert_eq!(names, [Box::from("published")]);
        drop(published);
        assert_eq!(pubsub.topics.lock().len(), 0);
    }

    #[test]
    fn topic_names_are_checked() {
        for good in [
            "alerts",
            "a",
            "team-1.critical_pages",
            &"x".repeat(MAX_TOPIC_NAME),
        ] {
            assert_eq!(topic_name_error(good), None, "{good}");
        }
        let why = |name: &str| topic_name_error(name).expect(name);
        assert_eq!(why(""), "a topic's name is empty");
        assert_eq!(
            why(&"x".repeat(MAX_TOPIC_NAME + 1)),
            "a topic's name is at most 128 bytes, not 129"
        );
        assert_eq!(
            why("a/b"),
            "a topic's name is ASCII letters, digits, `_`, `-` and `.`, not '/'"
        );
        assert!(why("é").ends_with("not 'é'"));
        for dots in [".", ".."] {
            assert_eq!(
                why(dots),
                format!("a topic's name is not `{dots}`: in a URL's path it is not a name")
            );
        }
        assert!(why("a b").ends_with("not ' '"));
    }
}

/// Topics made and dropped by many threads at once, by the same names.
#[cfg(test)]
mod topic_races {
    use super::*;

    /// While one holds a topic, looking its name up finds that topic, and
    /// a publish to it reaches its subscribers, however many other threads
    /// make and drop the topic of that name meanwhile (its last holder's
    /// drop, racing a new lookup, never takes a live topic's name); once
    /// nobody holds them the registry is empty, and no drop waited forever
    /// for the registry's lock.
    #[test]
    fn a_topic_held_is_the_one_its_name_finds_whoever_drops_one() {
        let pubsub = Pubsub::new();
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let pubsub = pubsub.clone();
                scope.spawn(move || {
                    let anyone = pubsub.client(None);
                    for n in 0..5_000 {
                        let name = ["a", "b"][(n + thread) % 2];
                        let topic = pubsub.topic(name);
                        let all = Query::parse("true").unwrap();
                        // Room for every thread's events meanwhile.
                        let mut sub = anyone.subscribe_to(topic.clone(), all, 1_000_000);
                        drop(topic);
                        let publisher = pubsub.topic(name);
                        let mine = Event {
                            service: Some(format!("{thread}-{n}")),
                            ..Event::default()
                        };
                        pubsub.publish_to(&publisher, &mine);
                        drop(publisher);
                        let got = std::iter::from_fn(|| sub.try_recv().ok())
                            .filter(|event| event.service == mine.service)
                            .count();
                        assert_eq!((got, sub.lagged()), (1, false), "{name} round {n}");
                    }
                });
            }
        });
        assert_eq!(pubsub.topics.lock().len(), 0);
        assert_eq!(pubsub.subscribers(), 0);
    }
}
