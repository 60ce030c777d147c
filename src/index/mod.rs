//! The index: the latest event per `(host, service)`, with TTL expiry.
//!
//! Sharded by key hash so ingest never takes a global lock. Each shard keeps its
//! entries in a hash table and their expiry deadlines in an ordered set
//! (`deadlines.rs`), so an expiry pass touches only what is due instead of
//! scanning everything.
//!
//! Deadlines are re-armed lazily: a refresh that pushes an entry's deadline later
//! (the common case: an agent reporting every few seconds) only updates the entry;
//! when its old slot in the deadline set comes due, the entry is found alive and
//! re-scheduled once. Each entry holds exactly one slot in the set.
//!
//! Entries are stored packed, one heap block each (see `packed.rs`): the
//! index is the one place that keeps an event per key for hours, so it keeps
//! them small, and unpacks on the way out. Each shard's table (`table.rs`)
//! lets the streams prefetch a key's slot a few events before its update
//! ([`Index::prefetch`]): among a hundred thousand keys or more, the update
//! would otherwise wait on main memory.

use std::cell::Cell;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hashbrown::DefaultHashBuilder;
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use crate::answers::{Answers, Busy, Room};
use crate::blocking::{SHUTTING_DOWN, off_workers};
use crate::clock::{MICROS_PER_SEC, Micros, secs_to_micros};
use crate::event::Event;
use crate::pubsub::Pubsub;
use crate::query::{Budget, Exceeded, Query};

mod deadlines;
mod packed;
mod table;

use deadlines::{Deadlines, Slot};
use packed::{Copies, Packed};
use table::{Entry, SlotHint, Table};

/// Riemann's default when an event carries no TTL.
pub const DEFAULT_TTL_SECS: f64 = 60.0;

/// How far ahead of vigil's clock an event's `time` may be and still set
/// its expiry, as in Riemann (`time + ttl`): an agent whose clock runs a
/// little fast is not expired early. Further ahead (a clock far off, or a
/// `time` sent in milliseconds), the entry expires `ttl` plus this after it
/// was stored, so a host that falls silent is still noticed.
pub const MAX_TIME_AHEAD: Micros = 5 * 60 * MICROS_PER_SEC;

/// At most one log line per this long (vigil's clock) names a host whose
/// events are timed too far ahead, and one whose events arrive expired; the
/// counters count every one.
const TIME_OFF_LOG_EVERY: Micros = 60 * MICROS_PER_SEC;

/// Events whose `time` is off in one way, counted, and when the last line
/// naming one was logged.
struct TimeOff {
    count: AtomicU64,
    logged: AtomicI64,
}

impl TimeOff {
    fn new() -> TimeOff {
        TimeOff {
            count: AtomicU64::new(0),
            logged: AtomicI64::new(Micros::MIN),
        }
    }

    /// Counts one at `now`; true when it is the one to log (one a
    /// [`TIME_OFF_LOG_EVERY`], whichever thread gets there first).
    fn count(&self, now: Micros) -> bool {
        self.count.fetch_add(1, Ordering::Relaxed);
        let last = self.logged.load(Ordering::Relaxed);
        let due = last == Micros::MIN || now.saturating_sub(last) >= TIME_OFF_LOG_EVERY;
        due && (self.logged)
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    fn total(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// When an event timed `time`, living `ttl`, that came at `now` (vigil's
/// clock) expires: `time + ttl`, as in Riemann, but no later than
/// [`MAX_TIME_AHEAD`] past `now + ttl`. The stages that hold events until
/// they expire go by it too, so none outlives the index's entry.
pub fn expires_at(time: Micros, ttl: Micros, now: Micros) -> Micros {
    let latest = now.saturating_add(MAX_TIME_AHEAD).saturating_add(ttl);
    time.saturating_add(ttl).min(latest)
}

/// The least a stall lasts, whatever the tick: an idle vigil (no batch)
/// whose timer a busy machine put off a few hundred milliseconds did not
/// stall, and its entries whose TTL ran out meanwhile expire; a VM paused
/// or a SIGSTOP lasts seconds.
pub const STALL_AT_LEAST: Micros = MICROS_PER_SEC;

/// When vigil was last seen running, to tell a stall of the process (a VM
/// paused, SIGSTOP, the clock stepped ahead) from a timer a little late.
/// The end of each tick's work and of each batch the rules ran counts as
/// seen running: a tick, or a batch, that starts more than two ticks after
/// that, found the process stalled since. Not a tick that ran long (a mass
/// expiry, a million `by` groups), which the next one waits for, nor a
/// timer held up (a reload, a busy machine) while batches went on, nor
/// one put off less than [`STALL_AT_LEAST`]. Shared
/// by the timer, which gives the index entries whose TTL ran out during
/// the stall back what it took of their TTL, and the rules, whose `rate` and `fill_in`
/// report no silence for it (`Cx::stalled`).
pub struct StallWatch {
    tick: Micros,
    /// The latest end of a tick's work or of a batch; `Micros::MIN`
    /// before the first.
    alive: AtomicI64,
    /// The latest stall: from when vigil was last seen running, until it
    /// was seen running again. `Micros::MIN` for none.
    since: AtomicI64,
    until: AtomicI64,
    /// The latest stall whose index entries got time back, by `since`:
    /// every run that saw it (the tick at the resume, the batches queued
    /// meanwhile, which may start before the first of them ends) saw vigil
    /// last running then, each with its own `until`. By `until`, one that
    /// stored its own after the tick gave time back had the next tick give
    /// it again.
    resumed: AtomicI64,
    /// Ticks under way ([`StallWatch::tick_starts`]): vigil runs, however
    /// long one takes.
    ticking: AtomicUsize,
}

/// A tick under way, from [`StallWatch::tick_starts`] until dropped.
pub struct Ticking<'a>(&'a StallWatch);

impl Drop for Ticking<'_> {
    fn drop(&mut self) {
        self.0.ticking.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StallWatch {
    pub fn new(tick: Micros) -> Self {
        StallWatch {
            tick,
            alive: AtomicI64::new(Micros::MIN),
            since: AtomicI64::new(Micros::MIN),
            until: AtomicI64::new(Micros::MIN),
            resumed: AtomicI64::new(Micros::MIN),
            ticking: AtomicUsize::new(0),
        }
    }

    /// A tick or a batch starts at `now`: the latest stall of the process,
    /// `(since, until)`, this one if vigil was last seen running more than
    /// two ticks ago (`(Micros::MIN, Micros::MIN)` if none yet). Not while
    /// a tick is under way ([`StallWatch::tick_starts`]): vigil runs,
    /// though it was last seen when the previous work ended; taken for a
    /// stall, a batch that came while a tick was held by a reload, or
    /// ticked a million `by` groups, gave the entries that came due
    /// meanwhile (a dead host's) time back, and swallowed the rules' 0
    /// rates and fills.
    pub fn runs(&self, now: Micros) -> (Micros, Micros) {
        let alive = self.alive.load(Ordering::Relaxed);
        let stall = self.tick.saturating_mul(2).max(STALL_AT_LEAST);
        if alive != Micros::MIN
            && now.saturating_sub(alive) > stall
            && self.ticking.load(Ordering::Relaxed) == 0
        {
            self.since.store(alive, Ordering::Relaxed);
            self.until.store(now, Ordering::Relaxed);
        }
        let until = self.until.load(Ordering::Relaxed);
        (self.since.load(Ordering::Relaxed), until)
    }

    /// A tick's work or a batch ended at `now`: vigil ran until then.
    /// Stored as the clock says, back too: kept at its latest, a clock
    /// stepped back hid every stall until it caught up. Only when it moved
    /// by more than an eighth of a tick, so that batches on every core do
    /// not write it each time; batches ending out of order move it back by
    /// as little, far below the two ticks a stall takes.
    pub fn seen(&self, now: Micros) {
        let alive = self.alive.load(Ordering::Relaxed);
        if alive == Micros::MIN || now.abs_diff(alive) > (self.tick / 8).unsigned_abs() {
            self.alive.store(now, Ordering::Relaxed);
        }
    }

    /// What the timer does first at a tick at `now`, before the expiry:
    /// after a stall (seen by this tick, or by a batch that ran first),
    /// the index entries whose TTL ran out since it began get time back
    /// ([`Index::resume_after_stall`]), once, with `index` (`None`: the
    /// stall is only told the rules). The tick is under way until the
    /// guard is dropped, after [`StallWatch::seen`] at its end.
    pub fn tick_starts(&self, index: Option<&Index>, now: Micros) -> Ticking<'_> {
        let (since, until) = self.runs(now);
        self.ticking.fetch_add(1, Ordering::Relaxed);
        let ticking = Ticking(self);
        if let Some(index) = index
            && until != Micros::MIN
            && self.resumed.swap(since, Ordering::Relaxed) != since
        {
            index.resume_after_stall(since, now);
        }
        ticking
    }
}

const SHARDS: usize = 64;

/// How many due deadlines an expiry pass handles per shard lock, so a mass expiry
/// never holds a shard away from ingest for long.
/// (Small under test, so tests cross chunks with a few thousand keys.)
const EXPIRE_CHUNK: usize = if cfg!(test) { 64 } else { 1024 };

/// Expiry notices are made and handed on this many at a time: the notices'
/// strings, reused batch after batch, then stay in the core's cache (with
/// 1 024, `index_1m/expire_all` measured ~10 % slower).
const NOTICE_BATCH: usize = 256;

/// Expiry notices looked up and published per lock of their shard (see
/// `Index::publish_unless_back`).
const NOTICES_PER_LOCK: usize = 16;

#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// TTL in seconds for events that carry none.
    pub default_ttl: f64,
    /// Refuse (and count) new keys beyond this many entries; `None` is unbounded.
    pub max_entries: Option<usize>,
    /// Refuse a query that matches more entries than this; `None` is
    /// unbounded. An answer is held whole until its asker has read it.
    pub max_query_results: Option<usize>,
    /// Bytes of events all live subscribers' queues may hold together.
    pub max_subscriber_memory: usize,
    /// What all live subscriptions' queries may take of each second of
    /// ingest together (`--subscription-share`).
    pub subscription_share: Duration,
    /// How long a scan of the index may run before it is stopped and its
    /// asker told so; `None` is unbounded. A query's cost is its size times
    /// the index's: one long enough would otherwise hold a scan's turn
    /// ([`Index::query_then`]) for minutes.
    pub query_timeout: Option<Duration>,
    /// Room for encoded answers while their askers read them, shared by
    /// every transport (`--max-answer-memory`).
    pub answers: Answers,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            default_ttl: DEFAULT_TTL_SECS,
            max_entries: None,
            max_query_results: None,
            max_subscriber_memory: crate::pubsub::DEFAULT_MAX_HELD,
            subscription_share: crate::pubsub::SHARE,
            query_timeout: None,
            answers: Answers::new(crate::answers::DEFAULT_MAX, Arc::default()),
        }
    }
}

/// Why a query of the index was not answered with events.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    #[error("the query matches more than {limit} events (--max-query-results {limit}); narrow it")]
    TooMany { limit: usize },
    #[error("the query ran longer than {limit:?} (--query-timeout) and was stopped; narrow it")]
    TimedOut { limit: Duration },
    /// Its asker stopped waiting (disconnected): nobody hears this one.
    #[error("the query's asker went away")]
    Abandoned,
    #[error("{SHUTTING_DOWN}")]
    ShuttingDown,
    /// Every scan turn of its lane stayed taken for as long as its asker
    /// waits: a cluster node's own part of a query, the others' answers
    /// bounded so. `costly`: the lane of queries of over [`COSTLY_TERMS`]
    /// terms, one turn, where the cores may be idle.
    #[error("{}", no_turn(*.waited, *.costly))]
    NoTurn { waited: Duration, costly: bool },
    /// Its answer did not fit beside those being sent: ask again soon.
    #[error(transparent)]
    Busy(#[from] Busy),
}

/// A scan checks whether to stop once per this many entries (and once per
/// shard): often enough that a cheap query stops within microseconds of
/// its deadline, seldom enough that reading the clock costs nothing. A
/// costly one ([`Query::costly`]) is also checked as it is evaluated
/// ([`Query::matches_within`]): every few hundred terms, and after each
/// term that scanned a long string, so one whose every entry costs seconds
/// stops within one term of its deadline, not 256 entries.
const SCAN_CHECK: usize = 256;

/// At least how many bytes an event takes in an answer being made
/// ([`Index::answer_then`]).
pub type Sizing = fn(&Event) -> usize;

/// When a scan stops early: past its deadline, or once its asker is gone.
struct ScanLimit<'a> {
    deadline: Option<(Instant, Duration)>,
    abandoned: Option<&'a AtomicBool>,
}

impl ScanLimit<'_> {
    const NONE: ScanLimit<'static> = ScanLimit {
        deadline: None,
        abandoned: None,
    };

    /// What a costly query's evaluation may spend: until the deadline, or
    /// until the asker goes.
    fn budget(&self) -> Budget<'_> {
        Budget::until(self.deadline.map(|(at, _)| at), self.abandoned)
    }

    /// Why the scan stops, when a costly query's evaluation gave up.
    fn exceeded(&self, exceeded: Exceeded) -> QueryError {
        match (exceeded, self.deadline) {
            (Exceeded::Time { .. }, Some((_, limit))) => QueryError::TimedOut { limit },
            _ => QueryError::Abandoned,
        }
    }

    fn check(&self) -> Result<(), QueryError> {
        if self.abandoned.is_some_and(|a| a.load(Ordering::Relaxed)) {
            return Err(QueryError::Abandoned);
        }
        match self.deadline {
            Some((at, limit)) if Instant::now() >= at => Err(QueryError::TimedOut { limit }),
            _ => Ok(()),
        }
    }
}

/// Tells the scan its asker stopped waiting when the asking future is
/// dropped before the answer came.
struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// An event's key as [`Index::key_hash`] hashed it; only the index makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(u64);

/// What [`Index::insert`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    Added,
    Replaced,
    /// The event had state `expired`: its key was deleted (or was absent,
    /// or the event is one of the index's own notices: see [`Index::expire`]).
    Removed,
    /// A new key while the index was full.
    Refused,
}

pub struct Index {
    shards: Box<[Mutex<Shard>]>,
    /// Where each shard's table is, beside it: read without its lock.
    hints: Box<[SlotHint]>,
    /// Live subscribers see every stored event and every expiry.
    pubsub: Arc<Pubsub>,
    /// Where the rules' `publish` topics are, when not `pubsub`: in a
    /// cluster the feed, where this node's subscribers and their bounds are.
    topics: OnceLock<Arc<Pubsub>>,
    hasher: DefaultHashBuilder,
    config: IndexConfig,
    len: AtomicUsize,
    refused: AtomicU64,
    expired: AtomicU64,
    /// Stalls of the process, and their length in all
    /// ([`Index::resume_after_stall`]).
    stalls: AtomicU64,
    stalled_micros: AtomicU64,
    /// Expiry notices dropped because their key was stored again first.
    came_back: AtomicU64,
    /// Events stored whose `time` was more than [`MAX_TIME_AHEAD`] ahead.
    ahead: TimeOff,
    /// Events stored already expired: `time + ttl` before vigil's clock.
    arrived_expired: TimeOff,
    /// Scans stopped by `query_timeout`, and scans stopped because their
    /// asker went away.
    scans_timed_out: AtomicU64,
    scans_abandoned: AtomicU64,
    /// Scans [`Index::query_then`] runs at once: one per core. More would
    /// not finish sooner, only hold more results (a million events each at
    /// a million keys) in memory, so further askers wait their turn.
    scans: Semaphore,
    /// Scans of queries of over [`COSTLY_TERMS`] take turns here instead,
    /// one at a time: each can run for up to `query_timeout`, and ordinary
    /// queries must not wait behind them.
    costly_scans: Semaphore,
}

/// Why [`QueryError::NoTurn`] refused its query.
fn no_turn(waited: Duration, costly: bool) -> String {
    match costly {
        true => format!(
            "the one scan turn of this node for queries of over {COSTLY_TERMS} terms stayed \
             taken for {waited:?} (scanning another); ask again in a moment"
        ),
        false => format!(
            "every scan turn of this node stayed taken for {waited:?} (one per core, all \
             scanning); ask again in a moment"
        ),
    }
}

/// Terms beyond which a query is scanned in the lane of costly ones: an
/// event costs each term a test, so a query of thousands of them scans
/// thousands of times slower than `service = "x"`.
const COSTLY_TERMS: usize = 100;

#[derive(Default)]
struct Shard {
    entries: Table,
    /// `(scheduled, key hash)`. A slot already taken by another entry with
    /// the same hash is moved a microsecond earlier (see [`schedule`]), so
    /// a slot names exactly one entry without storing an id or the key.
    deadlines: Deadlines,
    /// Keys added so far (wrapping): an expiry pass whose shard added none
    /// since it began knows none of its expired keys is back, without
    /// looking each up (see `Index::publish_unless_back`).
    added: u64,
}

impl Index {
    pub fn new(config: IndexConfig) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hints: (0..SHARDS).map(|_| SlotHint::default()).collect(),
            pubsub: Pubsub::bounded(config.max_subscriber_memory, config.subscription_share),
            topics: OnceLock::new(),
            hasher: DefaultHashBuilder::default(),
            config,
            len: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            stalled_micros: AtomicU64::new(0),
            came_back: AtomicU64::new(0),
            ahead: TimeOff::new(),
            arrived_expired: TimeOff::new(),
            scans_timed_out: AtomicU64::new(0),
            scans_abandoned: AtomicU64::new(0),
            scans: Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get())),
            costly_scans: Semaphore::new(1),
        }
    }

    /// Room for encoded answers while their askers read them.
    pub fn answers(&self) -> &Answers {
        &self.config.answers
    }

    /// `--max-index`: the most entries it holds, if bounded.
    pub fn max_entries(&self) -> Option<usize> {
        self.config.max_entries
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where subscriptions to what the index stores and expires are made.
    pub fn pubsub(&self) -> &Arc<Pubsub> {
        &self.pubsub
    }

    /// Where the rules' `publish` stages publish and their topics'
    /// subscribers subscribe: [`Index::pubsub`] unless
    /// [`Index::publish_topics_on`] said otherwise.
    pub fn topics(&self) -> &Arc<Pubsub> {
        self.topics.get().unwrap_or(&self.pubsub)
    }

    /// Makes `pubsub` hold the topics (the cluster's feed, so that their
    /// subscribers count beside the node's others, in one bound). Set
    /// before any event runs through the rules: a `publish` stage keeps
    /// the topic it finds first, and a second call changes nothing.
    pub fn publish_topics_on(&self, pubsub: Arc<Pubsub>) {
        let _ = self.topics.set(pubsub);
    }

    /// Most entries a query may match; `None` when unbounded.
    pub fn max_query_results(&self) -> Option<usize> {
        self.config.max_query_results
    }

    /// New keys refused because the index was full, since start.
    pub fn refused_total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Events stored whose `time` was more than [`MAX_TIME_AHEAD`] ahead
    /// of vigil's clock.
    pub fn time_ahead_total(&self) -> u64 {
        self.ahead.total()
    }

    /// Events stored already expired (`time + ttl` before vigil's clock,
    /// with a positive TTL): expired at the next tick.
    pub fn arrived_expired_total(&self) -> u64 {
        self.arrived_expired.total()
    }

    /// Entries removed by TTL expiry, since start.
    pub fn expired_total(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    /// Expiry notices dropped because their key was stored again before
    /// the notice went out (the host came back), since start: counted in
    /// [`Index::expired_total`] too, but never run through the rules.
    pub fn expired_came_back_total(&self) -> u64 {
        self.came_back.load(Ordering::Relaxed)
    }

    /// Scans stopped by `--query-timeout`, since start.
    pub fn scans_timed_out_total(&self) -> u64 {
        self.scans_timed_out.load(Ordering::Relaxed)
    }

    /// Scans stopped because their asker went away, since start.
    pub fn scans_abandoned_total(&self) -> u64 {
        self.scans_abandoned.load(Ordering::Relaxed)
    }

    /// Hashed as bytes: the stored copy gives its key as bytes (see
    /// [`Packed::key`]) and must hash the same when the table grows.
    fn hash(&self, host: &[u8], service: &[u8]) -> u64 {
        self.hasher.hash_one((host, service))
    }

    fn shard_of(hash: u64) -> usize {
        // Middle bits: a shard's table uses the low bits for slots, so picking
        // shards by them would cluster entries inside a shard.
        (hash >> 32) as usize % SHARDS
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        &self.shards[Self::shard_of(hash)]
    }

    /// The hash of `event`'s key, for a caller that both prefetches and
    /// inserts the event: one hash instead of two.
    pub fn key_hash(&self, event: &Event) -> KeyHash {
        KeyHash(self.hash(event.host_str().as_bytes(), event.service_str().as_bytes()))
    }

    /// Starts loading the table slot of the key that hashed to `hash`, so
    /// that an insert of it a few events later finds it in the cache. Takes
    /// no lock; a hint only.
    pub fn prefetch(&self, hash: KeyHash) {
        self.hints[Self::shard_of(hash.0)].prefetch(hash.0);
    }

    /// When `event`, stored at `now`, expires (see [`expires_at`]).
    fn deadline(&self, event: &Event, now: Micros) -> Micros {
        expires_at(event.time, self.ttl_of(event), now)
    }

    /// Counts an event timed more than [`MAX_TIME_AHEAD`] after `now`, or
    /// one that arrived expired (`deadline` before `now`), and names its host
    /// at most once per [`TIME_OFF_LOG_EVERY`] each.
    fn check_time(&self, event: &Event, now: Micros, deadline: Micros) {
        let ahead = event.time.saturating_sub(now);
        if ahead > MAX_TIME_AHEAD {
            if self.ahead.count(now) {
                tracing::warn!(
                    host = event.host_str(),
                    service = event.service_str(),
                    ahead_secs = ahead / MICROS_PER_SEC,
                    "An event's time is far ahead of vigil's clock (the agent's clock is off, or \
                     it sends milliseconds for seconds): it expires its TTL plus 5 minutes after \
                     it was stored, and its time is kept as sent. Counted in \
                     vigil_index_time_ahead_total; logged at most once a minute."
                );
            }
            return;
        }
        // A TTL of zero or less asks for the next tick; an `expired` event
        // deletes its key; a cluster node replaying a shard it took over
        // runs events again that came long ago, and were on time then.
        let stale = deadline < now
            && self.ttl_of(event) > 0
            && !event.is_expired_state()
            && !crate::outputs::is_suppressed();
        if stale && self.arrived_expired.count(now) {
            tracing::warn!(
                host = event.host_str(),
                service = event.service_str(),
                behind_secs = now.saturating_sub(event.time) / MICROS_PER_SEC,
                ttl_secs = self.ttl_secs(event),
                "An event arrived already expired: its time plus its TTL is before vigil's \
                 clock (the agent's clock is behind by more than the TTL, or its events were \
                 held back). It expires at the next tick, as in Riemann, so a series sending \
                 only such events goes expired after each one, and pages that way. Counted \
                 in vigil_index_arrived_expired_total; logged at most once a minute."
            );
        }
    }

    fn ttl_of(&self, event: &Event) -> Micros {
        secs_to_micros(self.ttl_secs(event))
    }

    /// How long `event` lives, in seconds, as the index reads it: its own
    /// TTL, or the default when it has none or a NaN. The stages that go by
    /// a series' TTL read it here, so they agree with the index.
    pub fn ttl_secs(&self, event: &Event) -> f64 {
        self.ttl_secs_of(event.ttl)
    }

    fn ttl_secs_of(&self, ttl: Option<f32>) -> f64 {
        match ttl {
            Some(ttl) if !ttl.is_nan() => f64::from(ttl),
            _ => self.config.default_ttl,
        }
    }

    /// Stores an event saved by an earlier run, vigil starting at `started`:
    /// it lives at least one TTL from `started`. Its agent could not report
    /// while vigil was down; if alive, it reports again meanwhile, and one
    /// that died during the restart still expires. Expiring at the first
    /// tick those whose TTL ran out during the restart would page for every
    /// short-lived series after each restart, vigil's own metrics of the
    /// previous run (10 s) first.
    pub fn restore(&self, event: &Event, started: Micros) -> Insert {
        let deadline = self
            .deadline(event, started)
            .max(started.saturating_add(self.ttl_of(event)));
        self.store(event, self.key_hash(event).0, deadline)
    }

    /// Stores a copy of `event` as the latest for its key (reusing the previous
    /// copy's allocations); an `expired` event deletes the key. For events
    /// timed by vigil's own clock (its metrics, tests): stored at their
    /// `time`. Events from agents go through [`Index::insert_hashed`].
    pub fn insert(&self, event: &Event) -> Insert {
        self.insert_hashed(event, self.key_hash(event), event.time)
    }

    /// [`Index::insert`] of an event whose [`Index::key_hash`] is `hash`,
    /// stored at `now`, vigil's clock, which bounds its expiry.
    pub fn insert_hashed(&self, event: &Event, hash: KeyHash, now: Micros) -> Insert {
        debug_assert_eq!(hash, self.key_hash(event), "the hash of another key");
        let deadline = self.deadline(event, now);
        self.check_time(event, now, deadline);
        let outcome = self.store(event, hash.0, deadline);
        // Published outside the shard lock: subscribers never slow the shard.
        if matches!(outcome, Insert::Added | Insert::Replaced) {
            self.pubsub.publish(event);
        }
        outcome
    }

    fn store(&self, event: &Event, hash: u64, deadline: Micros) -> Insert {
        let key = (event.host_str().as_bytes(), event.service_str().as_bytes());
        let mut shard = self.shard(hash).lock();
        let shard = &mut *shard;
        let found = shard.entries.find(hash, |e| is_key(&e.packed, key));
        if event.is_expired_state() {
            // The expiry removed the notice's entry before the notice went
            // out; an entry found now was stored since, by an agent that
            // came back, and stays.
            if is_notice_being_emitted(event) {
                return Insert::Removed;
            }
            if let Some(entry) = found.and_then(|slot| shard.entries.remove(slot)) {
                shard.deadlines.remove(&(entry.packed.scheduled(), hash));
                self.len.fetch_sub(1, Ordering::Relaxed);
                if shard.entries.shrink_if_sparse() {
                    self.hints[Self::shard_of(hash)].update(&shard.entries);
                }
            }
            return Insert::Removed;
        }
        match found.and_then(|slot| shard.entries.get_mut(slot)) {
            Some(entry) => {
                entry.packed.replace(event);
                entry.deadline = deadline;
                let scheduled = entry.packed.scheduled();
                if deadline < scheduled {
                    shard.deadlines.remove(&(scheduled, hash));
                    let slot = schedule(&mut shard.deadlines, deadline, hash);
                    entry.packed.set_scheduled(slot);
                }
                Insert::Replaced
            }
            None => {
                if !self.reserve_slot() {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Insert::Refused;
                }
                let slot = schedule(&mut shard.deadlines, deadline, hash);
                let moved = shard.entries.insert_new(Entry {
                    hash,
                    deadline,
                    packed: Packed::new(event, slot),
                });
                if moved {
                    self.hints[Self::shard_of(hash)].update(&shard.entries);
                }
                shard.added = shard.added.wrapping_add(1);
                Insert::Added
            }
        }
    }

    fn reserve_slot(&self) -> bool {
        match self.config.max_entries {
            None => {
                self.len.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(max) => self
                .len
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok(),
        }
    }

    /// The entry for exactly this key: a hash lookup, never a scan.
    pub fn get(&self, host: &str, service: &str) -> Option<Event> {
        let key = (host.as_bytes(), service.as_bytes());
        let hash = self.hash(key.0, key.1);
        let shard = self.shard(hash).lock();
        let slot = shard.entries.find(hash, |e| is_key(&e.packed, key))?;
        shard.entries.get(slot).map(|e| e.packed.to_event())
    }

    /// Every entry the query matches, or [`QueryError::TooMany`] once more
    /// than `max_query_results` do (the scan stops there). `host = X and
    /// service = Y` is a direct lookup. Not bounded in time: the scans of
    /// remote askers go through [`Index::query_then`].
    pub fn query(&self, query: &Query) -> Result<Vec<Event>, QueryError> {
        self.scan(query, &ScanLimit::NONE, None)
    }

    /// What [`Index::query`] finds, with room in `--max-answer-memory` taken
    /// into `room` as it is found (see [`Room::grow`], by `bytes`, at least
    /// an event's encoding in the answer): once the pool has none, the scan
    /// stops, refused as busy.
    fn scan(
        &self,
        query: &Query,
        stop: &ScanLimit<'_>,
        mut room: Option<(&mut Room, Sizing)>,
    ) -> Result<Vec<Event>, QueryError> {
        let mut found_bytes = 0;
        let mut grow = |found: &[Event]| match room.as_mut() {
            Some((room, bytes)) => {
                found_bytes += found.iter().map(*bytes).sum::<usize>();
                room.grow(found_bytes)
            }
            None => Ok(()),
        };
        if let Some((host, service)) = query.exact_key() {
            let found: Vec<Event> = (self.get(host, service).filter(|e| query.matches(e)))
                .into_iter()
                .collect();
            grow(&found)?;
            return Ok(found);
        }
        let limit = self.config.max_query_results.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut budget = stop.budget();
        // Matched with no lock held; only matches are copied out.
        self.for_each_shard(|events| {
            for chunk in events.chunks(SCAN_CHECK) {
                stop.check()?;
                let before = out.len();
                if query.costly() {
                    for event in chunk {
                        let matched = query.matches_within(event, &mut budget);
                        if matched.map_err(|e| stop.exceeded(e))? {
                            out.push(event.clone());
                        }
                    }
                } else {
                    out.extend(chunk.iter().filter(|e| query.matches(e)).cloned());
                }
                if out.len() > limit {
                    return Err(QueryError::TooMany { limit });
                }
                grow(&out[before..])?;
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// [`Index::query`] for async callers, then `then` on what it found: a key
    /// lookup right away, a scan and `then` on a blocking thread (see
    /// [`crate::blocking`]), as many at once as there are cores, and one
    /// costly query's (of over 100 terms) beside. A scan stops
    /// at `query_timeout`, or as soon as this future is dropped: an asker
    /// that went away does not keep holding a turn others wait for.
    pub async fn query_then<T: Send + 'static>(
        self: &Arc<Self>,
        query: &Query,
        then: impl FnOnce(Vec<Event>) -> T + Send + 'static,
    ) -> Result<T, QueryError> {
        let (answer, _) = self.scan_then(query, None, None, then).await?;
        Ok(answer)
    }

    /// [`Index::query_then`] for an answer to send: `then` makes it, and it
    /// comes with its room in `--max-answer-memory`, taken as the scan
    /// found its events and held while `then` ran, to be fitted to it and
    /// kept until it is written ([`Room::hold`]). Refused as busy as soon
    /// as the pool has no room for what is found, `then` never run. `bytes`
    /// is at least what `then` makes of an event, and near it
    /// ([`crate::proto::approx_bytes`], [`crate::json::approx_bytes`]).
    pub async fn answer_then<T: Send + 'static>(
        self: &Arc<Self>,
        query: &Query,
        bytes: Sizing,
        then: impl FnOnce(Vec<Event>) -> T + Send + 'static,
    ) -> Result<(T, Room), QueryError> {
        self.scan_then(query, Some(bytes), None, then).await
    }

    /// [`Index::answer_then`], refused ([`QueryError::NoTurn`]) when no
    /// scan turn comes within `patience`, and counted: only a cluster's
    /// queries, the asker's own part and the answers to other nodes, wait
    /// so.
    pub async fn answer_within<T: Send + 'static>(
        self: &Arc<Self>,
        query: &Query,
        bytes: Sizing,
        patience: Duration,
        then: impl FnOnce(Vec<Event>) -> T + Send + 'static,
    ) -> Result<(T, Room), QueryError> {
        let answered = (self.scan_then(query, Some(bytes), Some(patience), then)).await;
        if let Err(QueryError::NoTurn { .. }) = answered {
            crate::stats::Stats::incr(&self.answers().stats().cluster_queries_refused_no_turn);
        }
        answered
    }

    /// Every ordinary scan turn, held until dropped: askers wait meanwhile.
    #[cfg(test)]
    pub(crate) async fn take_every_scan_turn(&self) -> tokio::sync::SemaphorePermit<'_> {
        let all = self.scans.available_permits() as u32;
        // Never closed, so acquiring fails never.
        self.scans.acquire_many(all).await.unwrap()
    }

    /// [`Index::query_then`], with the answer's room: taken as the scan
    /// goes when `metered` tells an event's size, none otherwise; its turn
    /// waited for up to `patience`, if bounded.
    async fn scan_then<T: Send + 'static>(
        self: &Arc<Self>,
        query: &Query,
        metered: Option<Sizing>,
        patience: Option<Duration>,
        then: impl FnOnce(Vec<Event>) -> T + Send + 'static,
    ) -> Result<(T, Room), QueryError> {
        let mut room = self.answers().room();
        if query.exact_key().is_some() {
            let found = self.scan(query, &ScanLimit::NONE, metered.map(|b| (&mut room, b)))?;
            return Ok((then(found), room));
        }
        let costly = query.terms() > COSTLY_TERMS;
        let lane = match costly {
            true => &self.costly_scans,
            false => &self.scans,
        };
        let turn = match patience {
            Some(waited) => (tokio::time::timeout(waited, lane.acquire()).await)
                .map_err(|_| QueryError::NoTurn { waited, costly })?,
            None => lane.acquire().await,
        };
        // Never closed, so acquiring fails never.
        let _turn = turn.map_err(|_| QueryError::ShuttingDown)?;
        let abandoned = Arc::new(AtomicBool::new(false));
        let _abandon_on_drop = AbandonOnDrop(abandoned.clone());
        let (index, query) = (self.clone(), query.clone());
        let limit = self.config.query_timeout;
        (off_workers(move || {
            let stop = ScanLimit {
                deadline: limit.map(|limit| (Instant::now() + limit, limit)),
                abandoned: Some(&abandoned),
            };
            let found = index.scan(&query, &stop, metered.map(|b| (&mut room, b)));
            let stopped = match &found {
                Err(QueryError::TimedOut { .. }) => Some(&index.scans_timed_out),
                Err(QueryError::Abandoned) => Some(&index.scans_abandoned),
                _ => None,
            };
            if let Some(count) = stopped {
                count.fetch_add(1, Ordering::Relaxed);
            }
            found.map(|found| (then(found), room))
        })
        .await)
            .unwrap_or(Err(QueryError::ShuttingDown))
    }

    /// Every entry, a shard at a time: each shard's blocks are copied under
    /// its lock (see `copy_shard`) and unpacked with no lock held, into one
    /// buffer reused from shard to shard, and `f` runs on them. A snapshot
    /// of a million keys so holds 1/64th of them as events.
    pub fn for_each_shard<E>(&self, mut f: impl FnMut(&[Event]) -> Result<(), E>) -> Result<(), E> {
        let (mut copies, mut events) = (Copies::default(), Vec::new());
        for shard in self.shards.iter() {
            copy_shard(shard, &mut copies);
            let len = copies.len();
            if events.len() < len {
                events.resize_with(len, Event::default);
            }
            copies.unpack_into(&mut events[..len]);
            f(&events[..len])?;
        }
        Ok(())
    }

    /// Removes every entry `select` picks by its host and service, quietly:
    /// no expiry notice, nothing to subscribers (a cluster node forgetting a
    /// shard it no longer owns, vigil forgetting its own series of an output
    /// no longer declared). One shard locked at a time; returns how many went.
    pub fn remove_where(&self, mut select: impl FnMut(&str, &str) -> bool) -> usize {
        let mut removed = 0;
        for (shard, hint) in self.shards.iter().zip(self.hints.iter()) {
            let mut shard = shard.lock();
            let shard = &mut *shard;
            let deadlines = &mut shard.deadlines;
            let moved = shard.entries.retain(
                |entry| {
                    let (host, service) = entry.packed.host_service();
                    !select(host, service)
                },
                |entry| {
                    deadlines.remove(&(entry.packed.scheduled(), entry.hash));
                    removed += 1;
                },
            );
            if moved {
                hint.update(&shard.entries);
            }
        }
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Gives each entry of the hosts `select` picks whose TTL ran out before
    /// `now` at least its TTL from `since`, as [`Index::restore`] does after
    /// a restart: a cluster node
    /// that takes a shard over just after it started, or after it was cut
    /// off from NATS, could not store these series' events meanwhile, and
    /// neither could their agents. Returns how many were given more time,
    /// and the latest deadline one got (`Micros::MIN` when none).
    pub fn extend_overdue_where(
        &self,
        now: Micros,
        since: Micros,
        select: impl Fn(&str) -> bool,
    ) -> (usize, Micros) {
        let (mut extended, mut latest) = (0, Micros::MIN);
        for shard in &self.shards {
            let mut shard = shard.lock();
            for entry in shard.entries.iter_mut() {
                if entry.deadline >= now || !select(entry.packed.host()) {
                    continue;
                }
                // Its TTL, not deadline less time: that is negative for an
                // entry timed far ahead (bounded by `expires_at`), which
                // would get no time at all. Read only for the few overdue.
                let ttl = secs_to_micros(self.ttl_secs_of(entry.packed.ttl()));
                let deadline = since.saturating_add(ttl);
                // Its slot in the deadline set stays early: when it comes
                // due, the entry is re-armed at this deadline.
                if deadline > entry.deadline {
                    entry.deadline = deadline;
                    extended += 1;
                    latest = latest.max(deadline);
                }
            }
        }
        (extended, latest)
    }

    /// Gives each entry whose deadline fell inside a stall of the process
    /// (a VM paused, SIGSTOP, the clock stepped ahead), from `since`, when
    /// vigil was last seen running, to `now`, back what the stall took of
    /// its TTL (from `since` to its deadline, at most its TTL), from `now`:
    /// its agent could not be heard meanwhile, and expiring it at the
    /// resume paged `expired` for every such series at once, hosts alive.
    /// An agent alive reports by its deadline, so in the stall: it has as
    /// long after the resume as it had before its deadline. Not its whole
    /// TTL from `now`, as [`Index::restore`] gives after a restart: an
    /// entry whose new deadline fell in the next stall got it again, and
    /// again, and a dead host under stalls every few seconds (a noisy VM)
    /// never expired; given back only what each stall took, an entry
    /// expires once vigil ran its TTL. One whose deadline passed before
    /// `since` still expires. Logs and counts the stall; returns how many
    /// entries got time back.
    pub fn resume_after_stall(&self, since: Micros, now: Micros) -> usize {
        let mut extended = 0;
        for shard in &self.shards {
            let mut shard = shard.lock();
            for entry in shard.entries.iter_mut() {
                // Due at this pass (`expire` takes a deadline before `now`)
                // and not before the stall.
                if entry.deadline >= now || entry.deadline < since {
                    continue;
                }
                let ttl = secs_to_micros(self.ttl_secs_of(entry.packed.ttl()));
                let taken = entry.deadline.saturating_sub(since).min(ttl);
                // Its slot in the deadline set stays early: when it comes
                // due, the entry is re-armed at this deadline.
                entry.deadline = now.saturating_add(taken);
                extended += 1;
            }
        }
        let stalled = now.saturating_sub(since);
        self.stalls.fetch_add(1, Ordering::Relaxed);
        (self.stalled_micros).fetch_add(stalled.max(0) as u64, Ordering::Relaxed);
        tracing::warn!(
            stalled_secs = stalled as f64 / MICROS_PER_SEC as f64,
            given_time_back = extended,
            "The process was stalled (a VM paused, SIGSTOP, the clock stepped ahead): the index \
             entries whose TTL ran out meanwhile get back, from now, what the stall took of \
             it, and the rules report no silence of a series for it."
        );
        extended
    }

    /// Stalls of the process seen by the timer ([`StallWatch`]), since start.
    pub fn stalls_total(&self) -> u64 {
        self.stalls.load(Ordering::Relaxed)
    }

    /// How long those stalls lasted in all, in seconds.
    pub fn stalled_seconds_total(&self) -> f64 {
        self.stalled_micros.load(Ordering::Relaxed) as f64 / MICROS_PER_SEC as f64
    }

    /// The first time at which [`Index::expire`] may have something to do
    /// (`None`: no entry has a deadline), so a virtual clock can jump there
    /// instead of expiring nothing at every step on the way.
    pub fn next_expiry(&self) -> Option<Micros> {
        self.shards
            .iter()
            .filter_map(|shard| shard.lock().deadlines.first())
            // Due strictly after its deadline, as `expire` takes it.
            .map(|(scheduled, _)| scheduled.saturating_add(1))
            .min()
    }

    /// Removes every entry whose deadline is before `now` and hands the
    /// `expired` notices for them to `emit` (to be run back through the
    /// streams), a chunk at a time, shard by shard: no shard is locked while
    /// notices are made or `emit` runs. Returns how many expired.
    ///
    /// An agent may store its key again between the removal and the notice
    /// (on another thread; a mass expiry's notices go out batch after batch
    /// after the sweep). A notice whose key is back by the time its batch
    /// goes out is dropped: subscribers and the rules would see the key come
    /// back and then expire, and page for a host that is up. A notice that
    /// goes out before, but reaches the rules' `index` stream after the fresh
    /// event, deletes nothing there (`is_notice_being_emitted`). A fresh
    /// event may still be in the rules when its notice is checked, and
    /// pass them before it: the rules keep such events out while they
    /// check and run notices ([`Index::expire_batches`]).
    pub fn expire(&self, now: Micros, mut emit: impl FnMut(&[Event])) -> usize {
        self.expire_held(now, None, |mut notices| {
            let kept = notices.unless_back();
            if !kept.is_empty() {
                emit(kept);
            }
        })
    }

    /// [`Index::expire`], handing each batch of notices to `emit` before
    /// any is checked or published: `emit` may first wait for what else
    /// could store their keys to finish (see [`Notices::unless_back`]).
    pub fn expire_batches(&self, now: Micros, emit: impl FnMut(Notices<'_>)) -> usize {
        self.expire_held(now, None, emit)
    }

    /// Like [`Index::expire`], but the entries of hosts `may_expire` refuses
    /// stay (due, and looked at again by the next pass): a cluster node holds
    /// back the expiry of a shard it is replaying or handing over.
    pub fn expire_where(
        &self,
        now: Micros,
        may_expire: impl Fn(&str) -> bool,
        emit: impl FnMut(Notices<'_>),
    ) -> usize {
        self.expire_held(now, Some(&may_expire), emit)
    }

    /// `may_expire` is optional, not "always true", so a plain expiry never
    /// reads an entry's block to find its host.
    fn expire_held(
        &self,
        now: Micros,
        may_expire: Option<&dyn Fn(&str) -> bool>,
        mut emit: impl FnMut(Notices<'_>),
    ) -> usize {
        let mut due = Vec::with_capacity(EXPIRE_CHUNK);
        // Reused chunk after chunk, so a mass expiry allocates the notices'
        // strings once, not once per entry.
        let mut notices: Vec<Event> = Vec::new();
        let mut total = 0;
        for (shard, hint) in self.shards.iter().zip(self.hints.iter()) {
            let mut locked = shard.lock();
            let added_before = locked.added;
            let due_now = locked.deadlines.count_before(&(now, 0));
            if mass_expiry(due_now, locked.entries.len()) {
                // Room for the due entries is made with the lock let go: a
                // large allocation's slow path, growing `due` under it, was
                // seen to keep ingest waiting 26–54 ms on the development VM.
                if due.capacity() - due.len() < due_now {
                    drop(locked);
                    due.reserve(due_now);
                    locked = shard.lock();
                }
                if self.sweep(&mut locked, now, may_expire, &mut due) {
                    hint.update(&locked.entries);
                }
            } else {
                // Slots of held entries go back once the pass is over: put
                // back at once, the next chunk would meet them again.
                let mut held = Vec::new();
                while self.expire_chunk(&mut locked, now, may_expire, &mut due, &mut held) {
                    // Let ingest in between chunks.
                    drop(locked);
                    locked = shard.lock();
                }
                for slot in held {
                    locked.deadlines.insert(slot);
                }
                // Keys expiring a few at a time give their slots back too.
                if locked.entries.shrink_if_sparse() {
                    hint.update(&locked.entries);
                }
            }
            drop(locked);
            total += due.len();
            self.expired.fetch_add(due.len() as u64, Ordering::Relaxed);
            for chunk in due.chunks(NOTICE_BATCH) {
                warm(chunk.iter().map(|entry| &entry.packed));
                notices.resize_with(chunk.len().max(notices.len()), Event::default);
                let notices = &mut notices[..chunk.len()];
                for (entry, notice) in chunk.iter().zip(notices.iter_mut()) {
                    entry.packed.unpack_expired_into(now, notice);
                }
                emit(Notices {
                    index: self,
                    shard,
                    added_before,
                    expired: chunk,
                    notices,
                    kept: None,
                });
            }
            due.clear();
        }
        total
    }

    /// Publishes the notice of each entry of `expired` whose key has not been
    /// stored again since, and moves those notices to the front of
    /// `notices`; returns how many. Each is published under the shard's
    /// lock: an agent's fresh event, stored after the look-up, is published
    /// after the lock goes, so no subscriber sees it before the notice. The
    /// lock is taken per [`NOTICES_PER_LOCK`] notices: ingest waits for that
    /// many notices' subscription queries at most, not a batch's, and a
    /// million notices do not pay a million locks. A key can only be back
    /// if the shard added one since the pass began (`added_before`): until
    /// it does, none is looked up (a look-up per notice made a full expiry
    /// of a million keys some 15 % slower).
    fn publish_unless_back(
        &self,
        shard: &Mutex<Shard>,
        added_before: u64,
        expired: &[Entry],
        notices: &mut [Event],
    ) -> usize {
        let mut kept = 0;
        let mut dropped = 0;
        for (group, entries) in expired.chunks(NOTICES_PER_LOCK).enumerate() {
            let shard = shard.lock();
            let none_added = shard.added == added_before;
            for (i, entry) in entries.iter().enumerate() {
                let key = entry.packed.key();
                let back = !none_added
                    && (shard.entries)
                        .find(entry.hash, |e| is_key(&e.packed, key))
                        .is_some();
                if !back {
                    let at = group * NOTICES_PER_LOCK + i;
                    self.pubsub.publish(&notices[at]);
                    // An event is some 200 bytes: a swap with itself for
                    // each of a million notices was a tenth of the expiry.
                    if kept != at {
                        notices.swap(kept, at);
                    }
                    kept += 1;
                } else {
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            self.came_back.fetch_add(dropped, Ordering::Relaxed);
        }
        kept
    }

    /// A mass expiry (see [`mass_expiry`]): walks the shard's table in memory
    /// order once, instead of chasing each due deadline to an entry at a
    /// random address. The shard is locked for one pass over it. True when
    /// the table's slots moved (it shrank: see [`Table::retain`]).
    fn sweep(
        &self,
        shard: &mut Shard,
        now: Micros,
        may_expire: Option<&dyn Fn(&str) -> bool>,
        out: &mut Vec<Entry>,
    ) -> bool {
        // The due slots are all settled below: expired, or re-armed.
        shard.deadlines.remove_before(&(now, 0));
        let deadlines = &mut shard.deadlines;
        let before = out.len();
        let moved = shard.entries.retain(
            |entry| {
                if entry.deadline < now && may_expire.is_none_or(|may| may(entry.packed.host())) {
                    return false;
                }
                // Refreshed, or held (then re-armed at its past deadline: due
                // again at the next pass).
                if entry.packed.scheduled() < now {
                    let slot = schedule(deadlines, entry.deadline, entry.hash);
                    entry.packed.set_scheduled(slot);
                }
                true
            },
            |entry| out.push(entry),
        );
        self.len.fetch_sub(out.len() - before, Ordering::Relaxed);
        moved
    }

    /// Handles up to [`EXPIRE_CHUNK`] due deadlines one by one; true if more
    /// may be due. The slots of held entries are taken out into `held`.
    fn expire_chunk(
        &self,
        shard: &mut Shard,
        now: Micros,
        may_expire: Option<&dyn Fn(&str) -> bool>,
        out: &mut Vec<Entry>,
        held: &mut Vec<Slot>,
    ) -> bool {
        for _ in 0..EXPIRE_CHUNK {
            let Some((scheduled, hash)) = shard.deadlines.first() else {
                return false;
            };
            // Riemann expires when `now - time > ttl`, i.e. strictly after the deadline.
            if scheduled >= now {
                return false;
            }
            shard.deadlines.pop_first();
            let Some(slot) = shard
                .entries
                .find(hash, |e| e.packed.scheduled() == scheduled)
            else {
                continue;
            };
            let Some(entry) = shard.entries.get_mut(slot) else {
                continue;
            };
            if entry.deadline < now && may_expire.is_some_and(|may| !may(entry.packed.host())) {
                held.push((scheduled, hash));
            } else if entry.deadline < now {
                if let Some(entry) = shard.entries.remove(slot) {
                    self.len.fetch_sub(1, Ordering::Relaxed);
                    out.push(entry);
                }
            } else {
                // Refreshed since it was scheduled: re-arm at the real deadline.
                let slot = schedule(&mut shard.deadlines, entry.deadline, hash);
                entry.packed.set_scheduled(slot);
            }
        }
        true
    }
}

/// A batch of expiry notices an expiry pass hands on: their entries are gone
/// from the index, and nothing was published or run yet.
pub struct Notices<'a> {
    index: &'a Index,
    shard: &'a Mutex<Shard>,
    added_before: u64,
    expired: &'a [Entry],
    notices: &'a mut [Event],
    /// How many are kept, once checked; marked as being emitted meanwhile.
    kept: Option<(usize, Emitting)>,
}

impl Notices<'_> {
    /// Publishes the notices whose key was not stored again since it
    /// expired, and returns them, to be run through the rules on this
    /// thread; the others are dropped (counted in
    /// [`Index::expired_came_back_total`]). A fresh event of one of their
    /// keys that is in the rules now, not yet stored, is not seen: the
    /// caller keeps such events out of the rules from before this until
    /// the notices have run. Checked once; later calls return the same.
    pub fn unless_back(&mut self) -> &[Event] {
        if self.kept.is_none() {
            let (index, shard) = (self.index, self.shard);
            let kept =
                index.publish_unless_back(shard, self.added_before, self.expired, self.notices);
            self.kept = Some((kept, Emitting::mark(&self.notices[..kept])));
        }
        let kept = self.kept.as_ref().map_or(0, |(kept, _)| *kept);
        &self.notices[..kept]
    }
}

/// More than a sixteenth of the shard's entries are due: one pass over its
/// whole table then costs less than finding each due entry on its own (a
/// cache miss each). `due` is counted from the deadline runs' lengths, so
/// the common tick, with nothing or little due, costs next to nothing.
fn mass_expiry(due: usize, entries: usize) -> bool {
    due > entries / 16
}

/// Copies every block of `shard` into `copies` under one hold of its lock,
/// a chunk at a time with each chunk's blocks warmed first. Only copying
/// happens under the lock: when `copies` lacks room, the lock is let go
/// while it grows, and the copy starts over. (Unpacking under the lock kept
/// an upsert waiting over a millisecond on every shard of a million keys,
/// one for 50–100 ms per five scans: `index_1m/ingest_during_query_scan`.)
fn copy_shard(shard: &Mutex<Shard>, copies: &mut Copies) {
    loop {
        copies.clear();
        let shard = shard.lock();
        if copy_entries(&shard.entries, copies) {
            return;
        }
        let blocks = shard.entries.len();
        drop(shard);
        copies.grow_for(blocks);
    }
}

/// False as soon as a block finds no room in `copies`.
fn copy_entries(table: &Table, copies: &mut Copies) -> bool {
    let mut entries = table.iter();
    loop {
        warm(entries.clone().take(EXPIRE_CHUNK).map(|e| &e.packed));
        let mut chunk = entries.by_ref().take(EXPIRE_CHUNK).peekable();
        if chunk.peek().is_none() {
            return true;
        }
        if !chunk.all(|e| copies.push(&e.packed)) {
            return false;
        }
    }
}

/// Reads one byte of each entry's block before any is unpacked: the loads
/// are independent, so the CPU overlaps their cache misses, where unpacking
/// one block after another waits for each miss in turn (measured on a
/// million keys, `index_1m/expire_all`: ~190 ms without, ~70 ms with).
fn warm<'a>(entries: impl Iterator<Item = &'a Packed>) {
    std::hint::black_box(entries.fold(0, |acc, e| acc ^ e.first_byte()));
}

/// Takes a slot in `deadlines` for an entry due at `due` and returns it: `due`
/// itself, or the latest free microsecond before it when another entry with
/// the same key hash (a 64-bit collision) holds that slot. Earlier is safe: a
/// slot that comes due before the deadline only re-arms the entry. Only at the
/// very start of time, where every entry is long due anyway, does it go later.
fn schedule(deadlines: &mut Deadlines, due: Micros, hash: u64) -> Micros {
    let earlier = (Micros::MIN..=due).rev();
    let later = due.saturating_add(1)..=Micros::MAX;
    earlier
        .chain(later)
        .find(|&at| deadlines.insert((at, hash)))
        .unwrap_or(due)
}

/// Asks the CPU to start loading the cache line at `address`.
fn prefetch(address: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint to the cache: it reads nothing the
    // program sees and never faults, whatever the address.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(address as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = address;
}

thread_local! {
    /// The addresses of the notices [`Index::expire`] is handing to `emit`
    /// on this thread, while it does.
    static EMITTING: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

/// Marks a batch of notices as being emitted on this thread, until dropped.
struct Emitting((usize, usize));

impl Emitting {
    fn mark(notices: &[Event]) -> Emitting {
        let range = notices.as_ptr_range();
        let addresses = (range.start as usize, range.end as usize);
        Emitting(EMITTING.with(|e| e.replace(addresses)))
    }
}

impl Drop for Emitting {
    fn drop(&mut self) {
        EMITTING.with(|e| e.set(self.0));
    }
}

/// Whether `event` is one of the index's own notices, come back to it as
/// the rules got it (they run on the thread that emits). Told by its
/// address, as the engine tells the event it hashed (see `Cx::hashed`): a
/// copy, an event the rules changed, and an agent's `expired` event delete
/// their key, as in Riemann.
fn is_notice_being_emitted(event: &Event) -> bool {
    let (start, end) = EMITTING.with(Cell::get);
    (start..end).contains(&(event as *const Event as usize))
}

/// Whether `packed` is stored under `key`.
fn is_key(packed: &Packed, key: (&[u8], &[u8])) -> bool {
    packed.has_key(key.0, key.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MICROS_PER_SEC;
    use crate::event::Metric;
    use crate::proto;
    use crate::stats::Stats;

    const T0: Micros = 1_700_000_000 * MICROS_PER_SEC;

    fn expire_all(index: &Index, now: Micros) -> Vec<Event> {
        let mut out = Vec::new();
        index.expire(now, |chunk| out.extend_from_slice(chunk));
        out
    }

    fn event(host: &str, service: &str, time: Micros, ttl: Option<f32>) -> Event {
        Event {
            host: Some(host.into()),
            service: Some(service.into()),
            state: Some("ok".into()),
            time,
            ttl,
            metric: Some(Metric::Int(1)),
            ..Event::default()
        }
    }

    fn secs(s: i64) -> Micros {
        s * MICROS_PER_SEC
    }

    /// A query that costs its thousands of terms on every entry scanned:
    /// none matches the metric of [`filled`]'s entries.
    fn costly_query() -> Query {
        let terms: Vec<String> = (2..5_002).map(|i| format!("metric = {i}")).collect();
        Query::parse(&terms.join(" or ")).unwrap()
    }

    fn filled(config: IndexConfig, entries: usize) -> Arc<Index> {
        let index = Arc::new(Index::new(config));
        for i in 0..entries {
            index.insert(&event(&format!("h{i}"), "s", T0, None));
        }
        index
    }

    /// Polls `done` for up to ten seconds.
    async fn eventually(done: impl Fn() -> bool) -> bool {
        for _ in 0..10_000 {
            if done() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        false
    }

    /// A query of over COSTLY_TERMS terms waits in a lane of one turn:
    /// refused for want of it, it said every turn of each core was taken,
    /// with the cores idle.
    #[tokio::test(start_paused = true)]
    async fn a_costly_query_refused_for_want_of_a_turn_names_its_lane() {
        let index = filled(IndexConfig::default(), 1);
        let held = index.costly_scans.acquire().await.unwrap();
        let (costly, waited) = (costly_query(), Duration::from_secs(2));
        let answer = || index.answer_within(&costly, proto::approx_bytes, waited, |f| f.len());
        let refused = answer().await.unwrap_err();
        assert_eq!(
            refused,
            QueryError::NoTurn {
                waited,
                costly: true
            }
        );
        assert!(
            refused
                .to_string()
                .contains("the one scan turn of this node for queries of over 100 terms"),
            "{refused}"
        );
        drop(held);
        assert_eq!(answer().await.map(|(found, _)| found).ok(), Some(0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scan_past_the_query_timeout_stops_with_an_error_naming_the_flag() {
        let config = IndexConfig {
            query_timeout: Some(Duration::from_millis(1)),
            ..IndexConfig::default()
        };
        let index = filled(config, 20_000);
        let stopped = index.query_then(&costly_query(), |found| found.len()).await;
        assert_eq!(
            stopped.unwrap_err().to_string(),
            "the query ran longer than 1ms (--query-timeout) and was stopped; narrow it"
        );
        assert_eq!(index.scans_timed_out_total(), 1);
        // A key lookup is no scan.
        let lookup = Query::parse(r#"host = "h7" and service = "s""#).unwrap();
        assert_eq!(index.query_then(&lookup, |found| found.len()).await, Ok(1));
        assert_eq!(index.scans_timed_out_total(), 1);
    }

    /// A query that costs one entry far longer than `--query-timeout`
    /// (2 000 scans of a 1 MB description: gigabytes) stops within one term
    /// of its deadline: it is not evaluated in full first, on that entry or
    /// the 255 after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_costly_scan_stops_within_one_term_of_its_deadline() {
        let config = IndexConfig {
            query_timeout: Some(Duration::from_millis(20)),
            ..IndexConfig::default()
        };
        let index = Arc::new(Index::new(config));
        let long = Event {
            description: Some("x".repeat(1024 * 1024)),
            ..event("long", "s", T0, None)
        };
        index.insert(&long);
        let terms: Vec<_> = (0..2_000)
            .map(|i| format!(r#"description =~ "%q{i}zM%""#))
            .collect();
        let dear = Query::parse(&terms.join(" or ")).unwrap();
        let stopped = index.query_then(&dear, |found| found.len()).await;
        assert_eq!(
            stopped,
            Err(QueryError::TimedOut {
                limit: Duration::from_millis(20)
            })
        );
        assert_eq!(index.scans_timed_out_total(), 1);
        // Without a deadline it runs to the end.
        let unbounded = Query::parse(r#"description =~ "%x%" or description =~ "%y%""#).unwrap();
        assert!(unbounded.costly());
        assert_eq!(index.query(&unbounded).map(|found| found.len()), Ok(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scan_whose_asker_went_away_stops() {
        let index = filled(IndexConfig::default(), 20_000);
        let asking = tokio::spawn({
            let index = index.clone();
            async move { index.query_then(&costly_query(), |found| found.len()).await }
        });
        assert!(eventually(|| index.costly_scans.available_permits() == 0).await);
        asking.abort();
        assert!(asking.await.unwrap_err().is_cancelled());
        assert!(
            eventually(|| index.scans_abandoned_total() == 1).await,
            "the scan went on without its asker"
        );
        assert_eq!(index.scans_timed_out_total(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn costly_queries_take_turns_of_their_own_and_ordinary_ones_go_on() {
        let index = filled(IndexConfig::default(), 20_000);
        let costly: Vec<_> = (0..index.scans.available_permits())
            .map(|_| {
                let index = index.clone();
                tokio::spawn(async move { index.query_then(&costly_query(), |f| f.len()).await })
            })
            .collect();
        let scanning =
            || index.costly_scans.available_permits() == 0 || index.scans.available_permits() == 0;
        assert!(eventually(scanning).await);
        let ordinary = Query::parse(r#"service = "s""#).unwrap();
        assert_eq!(index.query_then(&ordinary, |f| f.len()).await, Ok(20_000));
        assert!(costly.iter().all(|c| !c.is_finished()), "still scanning");
        for asking in costly {
            asking.abort();
        }
        // One scanned and was stopped; the others waited and never began.
        assert!(eventually(|| index.scans_abandoned_total() == 1).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scans_wait_for_a_turn_and_key_lookups_do_not() {
        let index = Arc::new(Index::new(IndexConfig::default()));
        for service in ["a", "b", "c"] {
            index.insert(&event("h", service, T0, None));
        }
        let all = index.scans.available_permits() as u32;
        let busy = index.scans.acquire_many(all).await.unwrap();
        let lookup = Query::parse(r#"host = "h" and service = "b""#).unwrap();
        assert_eq!(index.query_then(&lookup, |found| found.len()).await, Ok(1));
        let scan = Query::parse("true").unwrap();
        let waiting = tokio::spawn({
            let index = index.clone();
            async move { index.query_then(&scan, |found| found.len()).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "every core is scanning already");
        drop(busy);
        assert_eq!(waiting.await.unwrap(), Ok(3));
    }

    #[test]
    fn insert_replace_and_get() {
        let index = Index::new(IndexConfig::default());
        assert_eq!(index.insert(&event("a", "x", T0, None)), Insert::Added);
        let mut newer = event("a", "x", T0 + 1, None);
        newer.metric = Some(Metric::Float(2.5));
        assert_eq!(index.insert(&newer.clone()), Insert::Replaced);
        assert_eq!(index.insert(&event("a", "y", T0, None)), Insert::Added);
        assert_eq!(index.len(), 2);
        assert_eq!(index.get("a", "x"), Some(newer));
        assert_eq!(index.get("b", "x"), None);
    }

    #[test]
    fn missing_host_and_empty_host_share_a_key() {
        let index = Index::new(IndexConfig::default());
        let mut e = event("", "x", T0, None);
        e.host = None;
        index.insert(&e);
        assert!(index.get("", "x").is_some());
    }

    #[test]
    fn expires_strictly_after_ttl_and_emits_expired() {
        let index = Index::new(IndexConfig::default());
        let mut e = event("a", "x", T0, Some(10.0));
        e.tags = vec!["keep".into()];
        index.insert(&e);
        assert!(
            expire_all(&index, T0 + secs(10)).is_empty(),
            "not before time + ttl"
        );
        let expired = expire_all(&index, T0 + secs(10) + 1);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].state.as_deref(), Some("expired"));
        assert_eq!(expired[0].time, T0 + secs(10) + 1);
        assert_eq!(expired[0].tags, vec!["keep".to_owned()]);
        assert_eq!(index.get("a", "x"), None);
        assert_eq!(index.len(), 0);
        assert_eq!(index.expired_total(), 1);
        assert!(
            expire_all(&index, T0 + secs(100)).is_empty(),
            "expires once"
        );
    }

    #[test]
    fn a_restored_entry_lives_at_least_one_ttl_from_the_start() {
        let index = Index::new(IndexConfig::default());
        let started = T0 + secs(100);
        // Ran out 90 s before the start; would run out 1 s after it; far from it.
        index.restore(&event("a", "lapsed", T0, Some(10.0)), started);
        index.restore(
            &event("a", "closing", started - secs(9), Some(10.0)),
            started,
        );
        index.restore(&event("a", "long", T0, Some(1000.0)), started);
        assert_eq!(
            index.get("a", "lapsed").unwrap().time,
            T0,
            "its own time kept"
        );
        assert!(expire_all(&index, started + secs(10)).is_empty());
        let mut expired: Vec<String> = expire_all(&index, started + secs(10) + 1)
            .iter()
            .map(|e| e.service_str().to_owned())
            .collect();
        expired.sort();
        assert_eq!(expired, ["closing", "lapsed"]);
        // Even one far from running out: a TTL from the start, not from its time.
        assert!(expire_all(&index, started + secs(1000)).is_empty());
        assert_eq!(expire_all(&index, started + secs(1000) + 1).len(), 1);
        // Refreshed by its agent after the start: the new event's deadline.
        index.restore(&event("b", "x", T0, Some(10.0)), started);
        index.insert(&event("b", "x", started + secs(1), Some(60.0)));
        assert!(expire_all(&index, started + secs(61)).is_empty());
        assert_eq!(expire_all(&index, started + secs(61) + 1).len(), 1);
    }

    #[test]
    fn overdue_entries_of_the_chosen_hosts_live_one_ttl_from_since() {
        let index = Index::new(IndexConfig::default());
        let (since, now) = (T0 + secs(100), T0 + secs(103));
        index.insert(&event("a", "lapsed", T0, Some(10.0)));
        index.insert(&event("b", "other shard", T0, Some(10.0)));
        index.insert(&event("a", "fresh", now - secs(1), Some(10.0)));
        index.insert(&event("a", "long ago", T0 - secs(500), Some(2.0)));
        let extended = index.extend_overdue_where(now, since, |host| host == "a");
        assert_eq!(extended, (2, since + secs(10)));
        let expired = |at| -> Vec<String> {
            let mut expired: Vec<String> = expire_all(&index, at)
                .iter()
                .map(|e| format!("{}/{}", e.host_str(), e.service_str()))
                .collect();
            expired.sort();
            expired
        };
        // `b` was not chosen; `a`'s two overdue ones live until since + TTL,
        // which for a TTL of 2 s has passed by now.
        assert_eq!(expired(now), ["a/long ago", "b/other shard"]);
        assert!(expired(since + secs(10)).is_empty());
        assert_eq!(expired(since + secs(10) + 1), ["a/lapsed"]);
        // The one not yet due kept its own deadline.
        assert_eq!(expired(now + secs(9) + 1), ["a/fresh"]);
    }

    /// An entry timed far ahead, bounded to expire its TTL plus
    /// [`MAX_TIME_AHEAD`] after it was stored, gets its TTL from `since`
    /// as any other: its deadline less its time is negative.
    #[test]
    fn an_overdue_entry_timed_far_ahead_lives_one_ttl_from_since() {
        let index = Index::new(IndexConfig::default());
        let millis = event("a", "ms", T0 * 1000, Some(10.0));
        index.insert_hashed(&millis, index.key_hash(&millis), T0);
        let since = T0 + secs(10) + MAX_TIME_AHEAD + secs(100);
        let now = since + secs(3);
        let extended = index.extend_overdue_where(now, since, |_| true);
        assert_eq!(extended, (1, since + secs(10)));
        assert!(expire_all(&index, now).is_empty(), "given its TTL");
        assert!(expire_all(&index, since + secs(10)).is_empty());
        assert_eq!(expire_all(&index, since + secs(10) + 1).len(), 1);
    }

    #[test]
    fn default_ttl_applies_without_event_ttl() {
        let index = Index::new(IndexConfig {
            default_ttl: 5.0,
            max_entries: None,
            ..IndexConfig::default()
        });
        index.insert(&event("a", "x", T0, None));
        assert!(expire_all(&index, T0 + secs(5)).is_empty());
        assert_eq!(expire_all(&index, T0 + secs(6)).len(), 1);
    }

    #[test]
    fn refresh_postpones_expiry() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("a", "x", T0, Some(10.0)));
        index.insert(&event("a", "x", T0 + secs(8), Some(10.0)));
        assert!(
            expire_all(&index, T0 + secs(11)).is_empty(),
            "re-armed, not expired"
        );
        assert!(index.get("a", "x").is_some());
        assert!(expire_all(&index, T0 + secs(18)).is_empty());
        assert_eq!(expire_all(&index, T0 + secs(19)).len(), 1);
    }

    #[test]
    fn shorter_ttl_brings_expiry_forward() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("a", "x", T0, Some(100.0)));
        index.insert(&event("a", "x", T0, Some(1.0)));
        assert_eq!(expire_all(&index, T0 + secs(2)).len(), 1);
        assert!(
            expire_all(&index, T0 + secs(200)).is_empty(),
            "old slot was dropped"
        );
    }

    #[test]
    fn expired_state_deletes_the_key() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("a", "x", T0, None));
        let mut gone = event("a", "x", T0, None);
        gone.state = Some("expired".into());
        assert_eq!(index.insert(&gone.clone()), Insert::Removed);
        assert_eq!(index.len(), 0);
        assert!(
            expire_all(&index, T0 + secs(1000)).is_empty(),
            "no ghost deadline"
        );
        assert_eq!(index.insert(&gone), Insert::Removed, "absent key is fine");
    }

    #[test]
    fn cap_refuses_and_counts_new_keys_but_updates_existing() {
        let index = Index::new(IndexConfig {
            default_ttl: 60.0,
            max_entries: Some(2),
            ..IndexConfig::default()
        });
        assert_eq!(index.insert(&event("a", "1", T0, None)), Insert::Added);
        assert_eq!(index.insert(&event("a", "2", T0, None)), Insert::Added);
        assert_eq!(index.insert(&event("a", "3", T0, None)), Insert::Refused);
        assert_eq!(
            index.insert(&event("a", "1", T0 + 1, None)),
            Insert::Replaced
        );
        assert_eq!((index.len(), index.refused_total()), (2, 1));
        assert!(index.get("a", "3").is_none());
    }

    #[test]
    fn odd_ttls_never_overflow() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("a", "inf", T0, Some(f32::INFINITY)));
        index.insert(&event("a", "nan", T0, Some(f32::NAN)));
        index.insert(&event("a", "neg", T0, Some(-5.0)));
        index.insert(&event("a", "late", i64::MAX, Some(f32::MAX)));
        let expired: Vec<_> = expire_all(&index, T0 + 1)
            .into_iter()
            .map(|e| e.service)
            .collect();
        assert_eq!(expired, vec![Some("neg".to_owned())]);
        // NaN falls back to the default TTL.
        let expired = expire_all(&index, T0 + secs(61));
        assert_eq!(expired[0].service.as_deref(), Some("nan"));
        assert!(index.get("a", "inf").is_some() && index.get("a", "late").is_some());
    }

    /// An agent sending `time` in milliseconds: its entry would outlive
    /// every one of us. It expires its TTL plus [`MAX_TIME_AHEAD`] after it
    /// was stored, keeps its time as sent, and is counted.
    #[test]
    fn an_event_timed_far_ahead_expires_a_ttl_and_the_allowance_after_it_was_stored() {
        let index = Index::new(IndexConfig::default());
        let millis = event("h", "ms", T0 * 1000, Some(10.0));
        let hash = index.key_hash(&millis);
        assert_eq!(index.insert_hashed(&millis, hash, T0), Insert::Added);
        assert_eq!(index.time_ahead_total(), 1);
        assert_eq!(index.get("h", "ms").unwrap().time, millis.time, "as sent");
        let due = T0 + secs(10) + MAX_TIME_AHEAD;
        assert!(
            expire_all(&index, due).is_empty(),
            "not before its deadline"
        );
        let expired = expire_all(&index, due + 1);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].service.as_deref(), Some("ms"));
    }

    /// An agent whose clock is an hour behind: its event is stored, expired
    /// at the next tick as in Riemann, and counted, so the flapping it
    /// causes is explained. One behind by less than its TTL, one with a TTL
    /// of zero or less, an `expired` event and a cluster's replayed one are
    /// not counted.
    #[test]
    fn an_event_that_arrives_expired_is_counted() {
        let index = Index::new(IndexConfig::default());
        let insert = |event: Event| index.insert_hashed(&event, index.key_hash(&event), T0);
        assert_eq!(
            insert(event("h", "slow", T0 - secs(3600), Some(60.0))),
            Insert::Added
        );
        assert_eq!(index.arrived_expired_total(), 1);
        insert(event("h", "late", T0 - secs(30), Some(60.0)));
        insert(event("h", "now", T0 - secs(30), Some(0.0)));
        let mut gone = event("h", "slow", T0 - secs(3600), Some(60.0));
        gone.state = Some(crate::event::STATE_EXPIRED.into());
        insert(gone);
        crate::outputs::suppressed(|| insert(event("h", "replayed", T0 - secs(600), Some(60.0))));
        assert_eq!(index.arrived_expired_total(), 1);
        let mut expired: Vec<_> = expire_all(&index, T0 + 1)
            .into_iter()
            .map(|e| e.service.unwrap())
            .collect();
        expired.sort();
        assert_eq!(expired, ["now", "replayed"]);
        assert_eq!(index.time_ahead_total(), 0);
    }

    /// A clock a minute fast is within the allowance: the entry expires
    /// at `time + ttl`, as in Riemann, not earlier, and is not counted.
    #[test]
    fn an_event_timed_a_little_ahead_expires_at_its_time_plus_ttl() {
        let index = Index::new(IndexConfig::default());
        let fast = event("h", "fast", T0 + secs(60), Some(10.0));
        index.insert_hashed(&fast, index.key_hash(&fast), T0);
        assert_eq!(index.time_ahead_total(), 0);
        assert!(expire_all(&index, T0 + secs(70)).is_empty());
        assert_eq!(expire_all(&index, T0 + secs(70) + 1).len(), 1);
    }

    #[test]
    fn mass_expiry_crosses_chunks() {
        let index = Index::new(IndexConfig::default());
        let n = SHARDS * EXPIRE_CHUNK * 2;
        for i in 0..n {
            index.insert(&event("h", &i.to_string(), T0, Some(1.0)));
        }
        // Notices are unpacked into buffers reused chunk after chunk: each
        // must still name its own entry.
        let mut services: Vec<usize> = expire_all(&index, T0 + secs(2))
            .iter()
            .map(|e| e.service_str().parse().unwrap())
            .collect();
        services.sort_unstable();
        assert_eq!(services, (0..n).collect::<Vec<_>>());
        assert!(index.is_empty());
        // The emptied tables gave their slots back and take keys again.
        for i in 0..10 {
            index.insert(&event("h", &i.to_string(), T0 + secs(3), None));
        }
        assert_eq!(index.len(), 10);
        assert!(index.get("h", "7").is_some());
        assert_eq!(
            index.query(&Query::parse("true").unwrap()).unwrap().len(),
            10
        );
    }

    #[test]
    fn subscribers_see_stored_and_expired_events_but_not_refusals() {
        let index = Index::new(IndexConfig {
            default_ttl: 60.0,
            max_entries: Some(1),
            ..IndexConfig::default()
        });
        let mut sub = index
            .pubsub()
            .subscribe(Query::parse(r#"host = "a""#).unwrap(), 10);
        index.insert(&event("a", "x", T0, Some(1.0)));
        index.insert(&event("a", "refused", T0, None));
        index.insert(&event("b", "x", T0, None));
        expire_all(&index, T0 + secs(2));
        let states: Vec<_> = std::iter::from_fn(|| sub.try_recv().ok())
            .map(|e| (e.service.clone().unwrap(), e.state.clone().unwrap()))
            .collect();
        assert_eq!(
            states,
            vec![
                ("x".to_owned(), "ok".to_owned()),
                ("x".to_owned(), "expired".to_owned())
            ]
        );
    }

    /// `n` services of host `h` whose keys fall in one shard, so that their
    /// notices go out after one sweep, in several batches.
    fn services_in_one_shard(index: &Index, n: usize) -> Vec<String> {
        let shard_of = |s: &String| Index::shard_of(index.hash(b"h", s.as_bytes()));
        (0..)
            .map(|i: usize| i.to_string())
            .filter(|s| shard_of(s) == 0)
            .take(n)
            .collect()
    }

    /// Agents that report again while their shard's notices go out, batch
    /// after batch (on other threads in vigil; here from `emit`): the notices
    /// not yet out for them are dropped, neither to subscribers after their
    /// fresh event nor to the rules' `index` stream, which would delete them.
    #[test]
    fn keys_stored_again_while_their_shard_expires_get_no_late_notice() {
        let index = Index::new(IndexConfig::default());
        let mut sub = index
            .pubsub()
            .subscribe(Query::parse("true").unwrap(), 10_000);
        let services = services_in_one_shard(&index, NOTICE_BATCH * 2);
        for service in &services {
            index.insert(&event("h", service, T0, Some(1.0)));
        }
        while sub.try_recv().is_ok() {}
        let (mut noticed, mut back) = (Vec::new(), Vec::new());
        let expired = index.expire(T0 + secs(2), |notices| {
            noticed.extend(notices.iter().map(|n| n.service_str().to_owned()));
            if back.is_empty() {
                for service in services.iter().filter(|s| !noticed.contains(s)) {
                    index.insert(&event("h", service, T0 + secs(2), Some(60.0)));
                    back.push(service.clone());
                }
            }
            // As the rules' `index` stream does with each.
            for notice in notices {
                index.insert(notice);
            }
        });
        assert_eq!(expired, services.len(), "all were due and removed");
        assert!(!back.is_empty());
        let late: Vec<_> = noticed.iter().filter(|s| back.contains(s)).collect();
        assert!(
            late.is_empty(),
            "{} notices after their key came back",
            late.len()
        );
        assert_eq!(noticed.len() + back.len(), services.len());
        assert_eq!(
            index.expired_came_back_total(),
            back.len() as u64,
            "each notice dropped is counted"
        );
        assert_eq!(index.expired_total(), services.len() as u64);
        for service in &back {
            assert!(index.get("h", service).is_some(), "{service} came back");
        }
        let mut last_seen = std::collections::HashMap::new();
        while let Ok(seen) = sub.try_recv() {
            last_seen.insert(seen.service_str().to_owned(), seen.state.clone().unwrap());
        }
        for service in &back {
            assert_eq!(
                last_seen[service], "ok",
                "{service} seen last by subscribers"
            );
        }
    }

    /// A notice already out when its key is stored again reaches the rules'
    /// `index` stream after the fresh event: it deletes nothing, its entry is
    /// gone already. An agent's own `expired` event still deletes its key.
    #[test]
    fn an_expiry_notice_never_deletes_the_fresh_entry_of_its_key() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("h", "x", T0, Some(1.0)));
        let expired = index.expire(T0 + secs(2), |notices| {
            index.insert(&event("h", "x", T0 + secs(2), Some(60.0)));
            assert_eq!(index.insert(&notices[0]), Insert::Removed);
        });
        assert_eq!(expired, 1);
        let fresh = index.get("h", "x").expect("the fresh entry stays");
        assert_eq!(fresh.time, T0 + secs(2));
        let sent = Event {
            state: Some(crate::event::STATE_EXPIRED.into()),
            ..event("h", "x", T0 + secs(3), None)
        };
        assert_eq!(index.insert(&sent), Insert::Removed);
        assert!(index.get("h", "x").is_none(), "an agent's expired deletes");
    }

    #[test]
    fn mass_expiry_keeps_and_rearms_refreshed_entries() {
        let index = Index::new(IndexConfig::default());
        let n = SHARDS * EXPIRE_CHUNK * 2;
        for i in 0..n {
            index.insert(&event("h", &i.to_string(), T0, Some(1.0)));
        }
        // Every other key reports again before the mass expiry.
        for i in (0..n).step_by(2) {
            index.insert(&event("h", &i.to_string(), T0 + secs(5), Some(10.0)));
        }
        let expired = expire_all(&index, T0 + secs(2));
        assert_eq!(expired.len(), n / 2);
        assert!(
            expired
                .iter()
                .all(|e| e.service_str().parse::<usize>().unwrap() % 2 == 1)
        );
        assert_eq!(index.len(), n / 2);
        assert!(
            expire_all(&index, T0 + secs(15)).is_empty(),
            "re-armed at their deadline"
        );
        assert_eq!(expire_all(&index, T0 + secs(15) + 1).len(), n / 2);
        assert!(index.is_empty());
    }

    #[test]
    fn query_scans_and_exact_key_looks_up() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("a", "cpu user", T0, None));
        index.insert(&event("a", "cpu system", T0, None));
        index.insert(&event("b", "disk", T0, None));
        let q = Query::parse(r#"service =~ "cpu%""#).unwrap();
        let found = index.query(&q).unwrap();
        let mut services: Vec<_> = found.into_iter().map(|e| e.service).collect();
        services.sort();
        assert_eq!(
            services,
            vec![Some("cpu system".to_owned()), Some("cpu user".to_owned())]
        );
        let q = Query::parse(r#"host = "b" and service = "disk""#).unwrap();
        assert!(q.exact_key().is_some());
        assert_eq!(index.query(&q).unwrap().len(), 1);
        let q = Query::parse(r#"host = "b" and service = "nope""#).unwrap();
        assert!(index.query(&q).unwrap().is_empty());
    }

    fn slots(index: &Index) -> usize {
        index.shards.iter().map(|s| s.lock().entries.slots()).sum()
    }

    /// Keys that go a few at a time (each expiry too small for a sweep, or an
    /// `expired` event) give the table's slots back as a sweep does.
    #[test]
    fn tables_shrink_when_keys_go_a_few_at_a_time() {
        let index = Index::new(IndexConfig::default());
        // 2 % of what is left expires at each second: never a sixteenth of
        // a shard, so each expiry takes the due entries one by one.
        let (mut left, mut second, mut i) = (64_000, 1, 0);
        while left > 3_200 {
            for _ in 0..(left / 50).max(1) {
                index.insert(&event("h", &i.to_string(), T0, Some(second as f32)));
                (i, left) = (i + 1, left - 1);
            }
            second += 1;
        }
        for _ in 0..left {
            index.insert(&event("h", &i.to_string(), T0, Some(1e6)));
            i += 1;
        }
        let full = slots(&index);
        for s in 1..=second {
            index.expire(T0 + secs(s) + 1, |_| {});
        }
        assert_eq!(index.len(), left);
        assert!(
            slots(&index) * 4 <= full,
            "{} of {full} slots kept",
            slots(&index)
        );

        let kept = slots(&index);
        for j in i - left..i - 64 {
            index.insert(&Event {
                state: Some(crate::event::STATE_EXPIRED.into()),
                ..event("h", &j.to_string(), T0, None)
            });
        }
        assert_eq!(index.len(), 64);
        assert!(
            slots(&index) * 8 <= kept,
            "{} of {kept} slots kept",
            slots(&index)
        );
        let q = Query::parse("true").unwrap();
        assert_eq!(index.query(&q).unwrap().len(), 64);
    }

    #[tokio::test]
    async fn a_query_matching_more_than_the_limit_is_refused() {
        let index = Arc::new(Index::new(IndexConfig {
            max_query_results: Some(100),
            ..IndexConfig::default()
        }));
        // Spread over every shard, so the scan must stop partway.
        for i in 0..1000 {
            let service = if i < 100 { "hundred" } else { "rest" };
            index.insert(&event(&format!("h{i}"), service, T0, None));
        }
        let hundred = Query::parse(r#"service = "hundred""#).unwrap();
        assert_eq!(index.query(&hundred).map(|found| found.len()), Ok(100));
        let all = Query::parse("true").unwrap();
        let too_many = QueryError::TooMany { limit: 100 };
        let refused = Err(too_many.clone());
        assert_eq!(index.query(&all).map(|found| found.len()), refused);
        let counted = index.query_then(&all, |found| found.len()).await;
        assert_eq!(counted, refused);
        assert_eq!(
            too_many.to_string(),
            "the query matches more than 100 events (--max-query-results 100); narrow it"
        );
        // A lookup of one key is never over any limit.
        let one = Query::parse(r#"host = "h5" and service = "hundred""#).unwrap();
        assert_eq!(index.query(&one).map(|found| found.len()), Ok(1));
    }

    /// An index of 1 000 events of 1 KB descriptions (some 1.2 MB to
    /// answer `true`, more than `--max-query-results` of 500 allow),
    /// spread over every shard, whose answers take room from a pool of
    /// `pool` bytes counting into `stats`.
    fn holding_answers(pool: usize, stats: &Arc<Stats>) -> Arc<Index> {
        let index = Arc::new(Index::new(IndexConfig {
            max_query_results: Some(500),
            answers: Answers::new(pool, stats.clone()),
            ..IndexConfig::default()
        }));
        for i in 0..1000 {
            index.insert(&Event {
                description: Some("d".repeat(1000)),
                ..event(&format!("h{i}"), "s", T0, None)
            });
        }
        index
    }

    #[tokio::test]
    async fn an_answer_the_pool_has_no_room_for_stops_its_scan_and_is_never_made() {
        let stats = Arc::new(Stats::default());
        let pool = 4 * crate::answers::FREE;
        let index = holding_answers(pool, &stats);
        let mut full = index.answers().room();
        full.grow(pool).unwrap();
        let made = Arc::new(AtomicUsize::new(0));
        let making = made.clone();
        let all = Query::parse("true").unwrap();
        let answered = index.answer_then(&all, proto::approx_bytes, move |found| {
            making.fetch_add(1, Ordering::Relaxed);
            found.len()
        });
        let refused = answered.await.map(|(made, _)| made).unwrap_err();
        // Stopped as soon as it was found to be over FREE: had it scanned on,
        // it would have been refused as over --max-query-results (500).
        assert!(matches!(refused, QueryError::Busy(_)), "{refused:?}");
        assert_eq!(made.load(Ordering::Relaxed), 0, "never made");
        assert_eq!(Stats::get(&stats.answers_refused_busy), 1);
        drop(full);
        let small = Query::parse(r#"host = "h7""#).unwrap();
        let (found, room) = index
            .answer_then(&small, proto::approx_bytes, |found| found.len())
            .await
            .unwrap();
        assert_eq!(found, 1);
        assert!(!room.takes_room(), "an answer up to FREE takes none");
    }

    /// JSON escapes a control character into six bytes: an answer of such
    /// events, sized as JSON, is refused before it is made, not once made.
    #[tokio::test]
    async fn a_json_answer_is_sized_as_escaped_and_refused_before_it_is_made() {
        let stats = Arc::new(Stats::default());
        let pool = 4 << 20;
        let index = Arc::new(Index::new(IndexConfig {
            answers: Answers::new(pool, stats.clone()),
            ..IndexConfig::default()
        }));
        for i in 0..100 {
            index.insert(&Event {
                description: Some("\u{1}".repeat(5000)),
                ..event(&format!("h{i}"), "s", T0, None)
            });
        }
        // Half the pool is taken; the answer's JSON (3 MB) does not fit,
        // though its events' `approx_bytes` (0.5 MB) would.
        let mut taken = index.answers().room();
        taken.grow(pool / 2).unwrap();
        let made = Arc::new(AtomicUsize::new(0));
        let making = made.clone();
        let all = Query::parse("true").unwrap();
        let answered = index.answer_then(&all, crate::json::approx_bytes, move |found| {
            making.fetch_add(1, Ordering::Relaxed);
            let json: usize = found
                .iter()
                .map(|e| crate::json::to_json_text(e).len())
                .sum();
            assert!(json > 3_000_000, "{json}");
        });
        let refused = answered.await.map(|_| ()).unwrap_err();
        assert!(matches!(refused, QueryError::Busy(_)), "{refused:?}");
        assert_eq!(made.load(Ordering::Relaxed), 0, "refused once made");
        drop(taken);
        assert_eq!(Stats::get(&stats.answer_bytes_held), 0);
    }

    /// An answer of many small events, under 64 KiB encoded, takes no room
    /// and is never refused: sized by their memory (some three times their
    /// encoding), it was refused as busy while large answers filled the pool.
    #[tokio::test]
    async fn an_answer_of_many_small_events_under_free_is_never_refused() {
        let stats = Arc::new(Stats::default());
        let index = Arc::new(Index::new(IndexConfig {
            answers: Answers::new(4 * crate::answers::FREE, stats.clone()),
            ..IndexConfig::default()
        }));
        for i in 0..1100 {
            index.insert(&Event {
                state: Some("ok".into()),
                metric: Some(Metric::Float(0.25)),
                ..event(&format!("host-{i:04}"), "cpu", T0, Some(60.0))
            });
        }
        let mut full = index.answers().room();
        full.grow(4 * crate::answers::FREE).unwrap();
        let cpu = Query::parse(r#"service = "cpu""#).unwrap();
        let (encoded, room) = (index.answer_then(&cpu, proto::approx_bytes, |found| {
            proto::events_reply(&found)
        }))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            encoded.len() > crate::answers::FREE * 3 / 4,
            "{}",
            encoded.len()
        );
        assert!(encoded.len() <= crate::answers::FREE, "{}", encoded.len());
        assert!(room.hold(encoded).is_ok());
        assert_eq!(Stats::get(&stats.answers_refused_busy), 0);
    }

    #[tokio::test]
    async fn an_answer_holds_its_room_while_it_is_made_then_as_much_as_it_is() {
        let stats = Arc::new(Stats::default());
        let index = holding_answers(64 << 20, &stats);
        let held = |stats: &Stats| Stats::get(&stats.answer_bytes_held) as usize;
        let (making, query) = (stats.clone(), Query::parse(r#"host =~ "h1%""#).unwrap());
        let ((encoded, found, held_making), room) =
            (index.answer_then(&query, proto::approx_bytes, move |found| {
                let found_bytes: usize = found.iter().map(proto::approx_bytes).sum();
                (proto::events_reply(&found), found_bytes, held(&making))
            }))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(found > 100 * 1000, "{found}");
        assert!(
            (found..=found + 2 * crate::answers::FREE).contains(&held_making),
            "{held_making} held for {found} bytes found"
        );
        let written = room.hold(encoded.clone()).unwrap();
        assert_eq!(held(&stats), encoded.len().div_ceil(1024) * 1024, "fitted");
        drop(written);
        assert_eq!(held(&stats), 0);
    }

    #[test]
    fn schedule_takes_the_latest_free_slot_at_or_before_the_deadline() {
        let mut deadlines = Deadlines::default();
        assert_eq!(schedule(&mut deadlines, 100, 7), 100);
        assert_eq!(schedule(&mut deadlines, 100, 7), 99, "same hash, same time");
        assert_eq!(schedule(&mut deadlines, 100, 8), 100, "another hash");
        assert_eq!(schedule(&mut deadlines, Micros::MIN, 7), Micros::MIN);
        assert_eq!(schedule(&mut deadlines, Micros::MIN, 7), Micros::MIN + 1);
        assert_eq!(deadlines.len(), 5);
    }

    #[test]
    fn few_due_among_many_expire_one_by_one_and_rearm() {
        let index = Index::new(IndexConfig::default());
        let n = SHARDS * 64;
        for i in 0..n {
            let ttl = if i % 64 < 2 { 1.0 } else { 100.0 };
            index.insert(&event("h", &i.to_string(), T0, Some(ttl)));
        }
        // Every 64th-plus-one key reports again: its old slot comes due first.
        for i in (1..n).step_by(64) {
            index.insert(&event("h", &i.to_string(), T0 + secs(1), Some(100.0)));
        }
        let one_by_one = index
            .shards
            .iter()
            .filter(|shard| {
                let shard = shard.lock();
                let due = shard.deadlines.count_before(&(T0 + secs(3), 0));
                !mass_expiry(due, shard.entries.len())
            })
            .count();
        assert!(one_by_one > SHARDS / 2, "{one_by_one} shards one by one");
        let expired = expire_all(&index, T0 + secs(3));
        let mut services: Vec<usize> = expired
            .iter()
            .map(|e| e.service_str().parse().unwrap())
            .collect();
        services.sort_unstable();
        assert_eq!(services, (0..n).step_by(64).collect::<Vec<_>>());
        assert_eq!(index.len(), n - n / 64);
        assert_eq!(
            expire_all(&index, T0 + secs(100) + 1).len(),
            n - 2 * (n / 64)
        );
        assert_eq!(
            expire_all(&index, T0 + secs(101) + 1).len(),
            n / 64,
            "re-armed"
        );
        assert!(index.is_empty());
    }

    #[test]
    fn for_each_shard_visits_every_entry_once_and_stops_at_an_error() {
        let index = Index::new(IndexConfig::default());
        let n = SHARDS * 8;
        for i in 0..n {
            index.insert(&event("h", &i.to_string(), T0, None));
        }
        let mut services = Vec::new();
        let visited: Result<(), ()> = index.for_each_shard(|events| {
            services.extend(
                events
                    .iter()
                    .map(|e| e.service_str().parse::<usize>().unwrap()),
            );
            Ok(())
        });
        assert!(visited.is_ok());
        services.sort_unstable();
        assert_eq!(services, (0..n).collect::<Vec<_>>());
        let mut calls = 0;
        let stopped = index.for_each_shard(|_| {
            calls += 1;
            Err("disk full")
        });
        assert_eq!((stopped, calls), (Err("disk full"), 1));
    }

    #[test]
    fn held_entries_stay_until_allowed_to_expire() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("held", "x", T0, Some(1.0)));
        index.insert(&event("free", "x", T0, Some(1.0)));
        let later = T0 + secs(5);
        let held = |host: &str| host != "held";
        let mut out = Vec::new();
        assert_eq!(
            index.expire_where(later, held, |mut n| out.extend_from_slice(n.unless_back())),
            1
        );
        assert_eq!(out[0].host_str(), "free");
        assert!(index.get("held", "x").is_some(), "held back, still indexed");
        out.clear();
        assert_eq!(
            index.expire_where(later, held, |mut n| out.extend_from_slice(n.unless_back())),
            0
        );
        assert_eq!(expire_all(&index, later).len(), 1, "expires once allowed");
        assert!(index.is_empty());
    }

    #[test]
    fn held_entries_beyond_a_chunk_do_not_stall_the_pass() {
        let index = Index::new(IndexConfig::default());
        // Few due among many (one by one), and more held per shard than a
        // chunk: the pass must end, and the held keys expire later.
        let n = SHARDS * EXPIRE_CHUNK * 40;
        for i in 0..n {
            let (host, ttl) = if i % 20 == 0 {
                ("held", 1.0)
            } else {
                ("kept", 100.0)
            };
            index.insert(&event(host, &i.to_string(), T0, Some(ttl)));
        }
        let later = T0 + secs(5);
        assert_eq!(index.expire_where(later, |host| host != "held", |_| {}), 0);
        assert_eq!(index.len(), n);
        assert_eq!(expire_all(&index, later).len(), n / 20);
    }

    #[test]
    fn removed_entries_leave_no_deadline_behind() {
        let index = Index::new(IndexConfig::default());
        let mut sub = index.pubsub().subscribe(Query::parse("true").unwrap(), 100);
        for i in 0..100 {
            let host = if i % 4 == 0 { "gone" } else { "kept" };
            index.insert(&event(host, &i.to_string(), T0, Some(1.0)));
        }
        while sub.try_recv().is_ok() {}
        assert_eq!(index.remove_where(|host, _| host == "gone"), 25);
        assert_eq!(index.len(), 75);
        assert!(index.get("gone", "0").is_none());
        assert!(sub.try_recv().is_err(), "quietly");
        let expired = expire_all(&index, T0 + secs(5));
        assert_eq!(expired.len(), 75);
        assert!(expired.iter().all(|e| e.host_str() == "kept"));
    }

    #[test]
    fn a_mass_expiry_holds_back_too() {
        let index = Index::new(IndexConfig::default());
        let n = SHARDS * EXPIRE_CHUNK * 2;
        for i in 0..n {
            let host = if i % 2 == 0 { "held" } else { "free" };
            index.insert(&event(host, &i.to_string(), T0, Some(1.0)));
        }
        let expired = index.expire_where(T0 + secs(5), |host| host == "free", |_| {});
        assert_eq!(expired, n / 2);
        assert_eq!(index.len(), n / 2);
        assert_eq!(expire_all(&index, T0 + secs(5)).len(), n / 2);
    }
}
