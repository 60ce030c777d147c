//! Outputs: where rules send events beyond the index — pagers (PagerDuty Events
//! v2, paging webhooks), graphs (Graphite), push webhooks, and forwarding to
//! another vigil or Riemann.
//!
//! Each declared output is its own task behind a bounded queue. A stream hands
//! an event over with a non-blocking push; a full queue drops it and counts it,
//! so a slow or dead downstream never slows ingest or another output. Every
//! event handed over is accounted for:
//! `accepted = delivered + dropped + skipped + queued + in_flight`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::event::Event;
use crate::event_queue;
use crate::stats::Stats;
use holds::{Holds, Origin};

pub mod forward;
pub mod graphite;
pub mod holds;
pub mod http;
mod hygiene;
pub mod incidents;
pub mod pager;
pub mod pagerduty;
pub mod template;
pub mod webhook;

/// Events one output's queue holds: a whole `Msg` of the default
/// `--max-events-per-msg`, so that one large message (an import, a batching
/// agent's backlog) does not overflow an output whose downstream is healthy
/// while the rules push faster than the output drains; and pages must not be
/// lost while the process lives.
pub const QUEUE: usize = crate::limits::Limits::DEFAULT.max_events;
/// Bytes of events (by [`Event::approx_bytes`]) one output's queue may hold
/// besides its length: a dead downstream must not make 100 000 large events
/// gigabytes. Far above a full queue of ordinary events (~30 MB).
pub const MAX_QUEUED_BYTES: usize = 128 * 1024 * 1024;
/// A batch taken from the queue stops growing past this many bytes: an
/// output holds (and retries) a batch in flight, and a forwarded one must
/// fit in the downstream's 16 MiB frame.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

thread_local! {
    /// Set while [`suppressed`] runs its closure on this thread.
    static SUPPRESSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` (a batch through the rules) with every output push on this thread
/// ignored: a cluster node replaying a shard it took over rebuilds rule state
/// without paging again what the previous owner already paged. A pager still
/// remembers the incident each ignored page opened or resolved, so it
/// resolves what the previous owner opened ([`pager::Replayed`]).
pub fn suppressed<R>(f: impl FnOnce() -> R) -> R {
    SUPPRESSED.with(|s| s.set(true));
    let result = f();
    SUPPRESSED.with(|s| s.set(false));
    result
}

/// True inside [`suppressed`]: a replayed batch, whose changes were already
/// reported by the previous owner.
pub fn is_suppressed() -> bool {
    SUPPRESSED.with(std::cell::Cell::get)
}

/// Where a stream hands events for an output.
pub trait OutputSink: Send + Sync {
    /// Must not block: a full queue drops (and counts) instead.
    fn push(&self, event: Event);
}

/// An output's type and settings, as a rule file declares them.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputKind {
    /// PagerDuty or a paging webhook.
    Pager(pager::Config),
    Webhook(webhook::Config),
    Graphite(graphite::Config),
    Forward(forward::Config),
}

impl OutputKind {
    pub fn type_name(&self) -> &'static str {
        match self {
            OutputKind::Pager(config) => config.type_name(),
            OutputKind::Webhook(_) => "webhook",
            OutputKind::Graphite(_) => "graphite",
            OutputKind::Forward(_) => "forward",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutputSpec {
    pub name: String,
    pub kind: OutputKind,
}

/// Per-output accounting, by output name: a redeclared output (but a pager)
/// counts on from its predecessor's numbers ([`Kept`]). `queued` is read from the current
/// queue, so the identity `accepted = delivered + dropped + skipped +
/// queued + in_flight` holds whenever nothing is moving (and a predecessor's queue
/// has drained).
#[derive(Debug, Default)]
pub struct OutputStats {
    /// Handed to the output by the streams.
    pub accepted: AtomicU64,
    /// Confirmed by the downstream (for Graphite, by carbon's TCP).
    pub delivered: AtomicU64,
    /// Given up on: queue full, refused by the downstream, or over a buffer bound.
    pub dropped: AtomicU64,
    /// Nothing to send, by design: no finite metric for Graphite; for a
    /// pager, a state it does not page, a page its incident already
    /// reflects, or one whose shard's new owner sends it. Apart from
    /// `dropped`, so that counter means loss.
    pub skipped: AtomicU64,
    /// Taken from the queue, not yet delivered or dropped.
    pub in_flight: AtomicU64,
    /// Attempts repeated after a failure.
    pub retries: AtomicU64,
}

/// The bounded queue in front of one output; what the streams push to.
pub struct Queue {
    pub name: String,
    pub stats: Arc<OutputStats>,
    tx: event_queue::Sender,
    /// Set while pushes are being dropped, so the overflow is logged once.
    overflowing: AtomicBool,
    /// A pager's memory of the pages it must not send (see [`suppressed`]).
    replayed: Option<pager::Replayed>,
    /// A pager's: the work each accepted page came from stays held until
    /// the page is settled.
    holds: Option<Arc<Holds>>,
}

impl Queue {
    /// Events waiting in the queue.
    pub fn queued(&self) -> u64 {
        self.tx.queued() as u64
    }

    /// How full the queue is, in events or bytes.
    pub fn fill(&self) -> event_queue::Fill {
        self.tx.fill()
    }
}

impl OutputSink for Queue {
    fn push(&self, event: Event) {
        if is_suppressed() {
            if let Some(replayed) = &self.replayed {
                replayed.remember(&event);
            }
            return;
        }
        self.stats.accepted.fetch_add(1, Ordering::AcqRel);
        let bytes = event.approx_bytes();
        // Held before it is queued: the delivery task may settle it at once.
        let held = self
            .holds
            .as_ref()
            .and_then(|kept| Some((kept, kept.origin(holds::current()?, &event))));
        if let Some((holds, origin)) = held {
            holds.hold(origin);
        }
        if self.tx.try_send(event, bytes, held.map(|(_, o)| o)).is_ok() {
            if self.overflowing.swap(false, Ordering::AcqRel) {
                tracing::warn!(output = %self.name, "Output queue accepting again.");
            }
            return;
        }
        if let Some((holds, origin)) = held {
            holds.release(origin);
        }
        self.stats.dropped.fetch_add(1, Ordering::AcqRel);
        // Loud once per overflow, not once per event: the counter has the total.
        if !self.overflowing.swap(true, Ordering::AcqRel) {
            tracing::error!(
                output = %self.name,
                capacity = self.tx.max_events(),
                max_bytes = MAX_QUEUED_BYTES,
                "Output queue full; dropping events until it drains (counted in `dropped`)."
            );
        }
    }
}

/// The consuming end of an output's queue, with its accounting ([`Tally`],
/// which it derefs to).
pub struct Delivery {
    tally: Tally,
    rx: event_queue::Receiver,
    /// What made each event of the last batch taken, in order.
    origins: Vec<Option<Origin>>,
}

/// The accounting of an output's events once taken from its queue: what
/// settles them. A separate handle, so an output can settle one event while
/// it takes the next from the queue.
#[derive(Clone)]
pub struct Tally {
    pub name: String,
    pub stats: Arc<OutputStats>,
}

impl std::ops::Deref for Delivery {
    type Target = Tally;

    fn deref(&self) -> &Tally {
        &self.tally
    }
}

impl Delivery {
    /// Waits for the next event, then takes whatever else is already queued,
    /// up to `max` in all and about [`MAX_BATCH_BYTES`]; they count as in
    /// flight. `None` once the queue is closed and empty.
    pub async fn next_batch(&mut self, max: usize) -> Option<Vec<Event>> {
        let batch = self.next_batch_within(max, MAX_BATCH_BYTES).await;
        batch.map(|(batch, _)| batch)
    }

    /// [`Delivery::next_batch`] up to about `max_bytes` (at least one event),
    /// with its size in bytes, for topping up a batch already taken.
    pub async fn next_batch_within(
        &mut self,
        max: usize,
        max_bytes: usize,
    ) -> Option<(Vec<Event>, usize)> {
        let (first, mut bytes, origin) = self.rx.recv().await?;
        let mut batch = Vec::with_capacity(max.min(1024));
        batch.push(first);
        self.origins.clear();
        self.origins.push(origin);
        while batch.len() < max && bytes < max_bytes {
            let Ok((event, size, origin)) = self.rx.try_recv() else {
                break;
            };
            bytes += size;
            batch.push(event);
            self.origins.push(origin);
        }
        self.stats
            .in_flight
            .fetch_add(batch.len() as u64, Ordering::AcqRel);
        Some((batch, bytes))
    }

    /// What made each event of the batch taken last, in its order.
    pub fn take_origins(&mut self) -> Vec<Option<Origin>> {
        std::mem::take(&mut self.origins)
    }

    /// The accounting, as a handle of its own.
    pub fn tally(&self) -> Tally {
        self.tally.clone()
    }
}

impl Tally {
    /// Counts `n` events left undelivered by an earlier run as accepted
    /// and in flight: they are settled like the queue's.
    pub fn adopt(&self, n: usize) {
        self.stats.accepted.fetch_add(n as u64, Ordering::AcqRel);
        self.stats.in_flight.fetch_add(n as u64, Ordering::AcqRel);
    }

    /// `n` in-flight events reached the downstream.
    pub fn delivered(&self, n: usize) {
        self.settle(n, &self.stats.delivered);
    }

    /// `n` in-flight events were given up on.
    pub fn dropped(&self, n: usize) {
        self.settle(n, &self.stats.dropped);
    }

    /// `n` in-flight events had nothing for this output to send.
    pub fn skipped(&self, n: usize) {
        self.settle(n, &self.stats.skipped);
    }

    fn settle(&self, n: usize, counter: &AtomicU64) {
        counter.fetch_add(n as u64, Ordering::AcqRel);
        self.stats.in_flight.fetch_sub(n as u64, Ordering::AcqRel);
    }

    pub fn retried(&self) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
    }
}

/// A queue and the delivery end that drains it.
pub fn queue(name: &str, capacity: usize) -> (Arc<Queue>, Delivery) {
    counted_queue(name, capacity, Arc::default(), None, None)
}

/// A queue counting into `stats`, with a pager's memory of replayed pages
/// and holds.
fn counted_queue(
    name: &str,
    capacity: usize,
    stats: Arc<OutputStats>,
    replayed: Option<pager::Replayed>,
    holds: Option<Arc<Holds>>,
) -> (Arc<Queue>, Delivery) {
    let (tx, rx) = event_queue::queue(capacity, MAX_QUEUED_BYTES);
    let queue = Arc::new(Queue {
        name: name.to_owned(),
        stats: stats.clone(),
        tx,
        overflowing: AtomicBool::new(false),
        replayed,
        holds,
    });
    let delivery = Delivery {
        tally: Tally {
            name: name.to_owned(),
            stats,
        },
        rx,
        origins: Vec::new(),
    };
    (queue, delivery)
}

/// What outputs keep beyond one task: each pager output's open incidents,
/// by output name. A reload that redeclares the output with the same
/// receiver (PagerDuty's routing key, a paging webhook's URL) hands them to
/// its new task; with another receiver, the new task starts empty and takes
/// over the file, and the previous receiver's incidents are kept aside
/// ([`RETIRED_KEYS`] at most) in case it comes back, while the pages it did
/// not deliver are handed to the new one (`pager::handed`). With a directory they
/// are also saved there, so a restart keeps the current receiver's too.
#[derive(Default)]
pub struct Kept {
    dir: Option<PathBuf>,
    pagers: Mutex<HashMap<String, Pager>>,
    /// Each output's counters by name: a redeclared output counts on from
    /// its predecessor's, which settles what it still holds into them (a
    /// pager leaves its undelivered pages in flight for its successor), so
    /// the counters never go back and the drops of a backlog left behind
    /// show.
    counters: Mutex<HashMap<String, Arc<OutputStats>>>,
    /// Each webhook output's turn to post, by name: a redeclared webhook
    /// posts only once its predecessor has posted what it queued, so a
    /// receiver never gets an old `critical` after the new `ok`.
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The work every pager output's undelivered pages came from.
    holds: Arc<Holds>,
    /// Where a pager's failed save is counted.
    failures: Option<Arc<Stats>>,
    /// Run by a cluster node, which owns some hosts' events only.
    in_cluster: bool,
}

/// The most receivers an output keeps incidents of besides its current
/// one: enough to undo a few mistaken edits, bounded against many.
pub const RETIRED_KEYS: usize = 4;

/// One pager output's memories: the current receiver's, and those of
/// previous receivers that still have incidents open, oldest first.
struct Pager {
    current: Arc<incidents::Memory>,
    retired: Vec<Arc<incidents::Memory>>,
}

impl Kept {
    /// Kept in `dir` (which must exist) as well as in memory; a write that
    /// fails is counted in `stats`.
    pub fn in_dir(dir: PathBuf, stats: Arc<Stats>) -> Kept {
        Kept {
            dir: Some(dir),
            failures: Some(stats),
            ..Kept::default()
        }
    }

    /// For a cluster node: a pager whose incidents may span hosts is
    /// warned of as it is declared (at start and on each reload).
    pub fn in_cluster(self) -> Kept {
        Kept {
            in_cluster: true,
            ..self
        }
    }

    /// The counters of output `name`, shared by every declaration of it.
    fn counters(&self, name: &str) -> Arc<OutputStats> {
        let mut counters = self.counters.lock();
        counters.entry(name.to_owned()).or_default().clone()
    }

    /// Output `name`'s turn, which each of its declarations holds while it
    /// delivers, in the order they were made.
    fn turn(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.turns.lock();
        turns.entry(name.to_owned()).or_default().clone()
    }

    /// Each pager output's undelivered pages its file holds for the next
    /// run, by output name.
    pub fn pages_written_down(&self) -> HashMap<String, usize> {
        let pagers = self.pagers.lock();
        let written = pagers
            .iter()
            .map(|(name, p)| (name.clone(), p.current.pages_written_down()));
        written.collect()
    }

    /// Every pager output's memory of its current receiver (those of pagers
    /// a reload removed too).
    pub fn pager_memories(&self) -> Vec<Arc<incidents::Memory>> {
        let pagers = self.pagers.lock();
        pagers.values().map(|p| p.current.clone()).collect()
    }

    /// The memories of [`Kept::pager_memories`] whose last save failed.
    pub fn pager_memories_unsaved(&self) -> Vec<Arc<incidents::Memory>> {
        let mut memories = self.pager_memories();
        memories.retain(|memory| memory.save_failed());
        memories
    }

    /// Warns when pager output `name`, which the rules no longer declare,
    /// holds open incidents: nothing resolves them now, though they are
    /// kept, in memory and in its file, for a declaration of that name.
    pub fn warn_if_left_open(&self, name: &str) {
        let pagers = self.pagers.lock();
        let Some(pager) = pagers.get(name) else {
            return;
        };
        let incidents = pager.current.open_incidents();
        if incidents > 0 {
            tracing::warn!(
                output = name,
                incidents,
                "A reload removed (or renamed) a pager output with open incidents: nothing \
                 resolves them now. Declare it again under this name, paging the same \
                 receiver, or resolve them by hand."
            );
        }
    }

    /// Warns, off the async workers, of the pager files in the data
    /// directory that none of `specs` declares, but which hold incidents.
    pub fn warn_of_undeclared_pagers(&self, specs: &[OutputSpec]) {
        let Some(dir) = self.dir.clone() else {
            return;
        };
        let declared = specs
            .iter()
            .filter(|spec| matches!(spec.kind, OutputKind::Pager(_)))
            .map(|spec| incidents::file_in(&dir, &spec.name))
            .collect();
        tokio::task::spawn_blocking(move || incidents::warn_of_undeclared(&dir, &declared));
    }

    /// What the pagers' undelivered pages hold: how far a cluster node may
    /// save its progress.
    pub fn holds(&self) -> Arc<Holds> {
        self.holds.clone()
    }

    fn pager(&self, name: &str, config: &pager::Config) -> Arc<incidents::Memory> {
        let key = config.receiver();
        let mut pagers = self.pagers.lock();
        let Some(pager) = pagers.get_mut(name) else {
            let file = self.dir.as_ref().map(|dir| incidents::file_in(dir, name));
            let memory = incidents::Memory::open(name, file, key, pager::MAX_OPEN);
            let current = Arc::new(match &self.failures {
                Some(stats) => memory.counting_failures_in(stats.clone()),
                None => memory,
            });
            current.made_current();
            let pager = Pager {
                current: current.clone(),
                retired: Vec::new(),
            };
            pagers.insert(name.to_owned(), pager);
            return current;
        };
        if pager.current.serves(key) {
            return pager.current.clone();
        }
        // A memory with nothing open is of no use aside, unless it has yet
        // to read what the file holds for its key.
        let worth_keeping = |memory: &incidents::Memory| memory.has_open() || !memory.is_loaded();
        pager.retired.retain(|memory| worth_keeping(memory));
        let next = match pager.retired.iter().position(|m| m.serves(key)) {
            Some(at) => {
                let back = pager.retired.remove(at);
                back.takes_over_from(&pager.current);
                tokio::spawn(back.clone().resume());
                back
            }
            None => Arc::new(pager.current.replaced_by(key)),
        };
        // The previous receiver's task hands it the pages it did not deliver.
        next.made_current();
        let previous = std::mem::replace(&mut pager.current, next.clone());
        // Its incidents, kept aside for when its receiver comes back; its
        // task saves them again as it stops, should it change any meanwhile.
        tokio::spawn({
            let previous = previous.clone();
            async move {
                previous.load().await;
                previous.save().await;
            }
        });
        if worth_keeping(&previous) {
            if pager.retired.len() == RETIRED_KEYS {
                pager.retired.remove(0);
            }
            pager.retired.push(previous);
        }
        next
    }
}

/// Writes the pagers' incidents and undelivered pages (`memories`, from
/// [`Kept::pager_memories`]) down now: at the end of shutdown's grace, a
/// pager still sending would otherwise leave its file as it last saved it,
/// and the pages settled since would be sent again after the restart; and a
/// save that failed (a full disk) gets its last try. Pages a receiver a
/// reload replaced still held, its task cut short before it handed them
/// over, are saved with the current receiver's. One that fails now is
/// said, with what the next run will not know.
pub async fn save_pagers(memories: Vec<Arc<incidents::Memory>>) {
    for memory in memories {
        memory.take_pages_left_by_replaced();
        if !memory.save().await {
            tracing::error!(
                output = memory.output(),
                incidents = memory.open_incidents(),
                pages = memory.pages_held(),
                "Open incidents and undelivered pages not saved as vigil stops: the next run \
                 finds the file as it was last written, and neither resolves these incidents \
                 nor sends these pages."
            );
        }
    }
}

/// Starts the output's delivery task. Once `shutdown` is cancelled the task
/// delivers what is already queued (the caller bounds how long it waits for
/// the returned handle) and ends. Must be called inside a tokio runtime.
pub fn start(
    spec: &OutputSpec,
    kept: &Kept,
    shutdown: CancellationToken,
) -> (Arc<Queue>, JoinHandle<()>) {
    let (name, capacity) = (spec.name.as_str(), QUEUE);
    let stats = kept.counters(name);
    let plain = || counted_queue(name, capacity, stats.clone(), None, None);
    match spec.kind.clone() {
        OutputKind::Pager(config) => {
            if kept.in_cluster && config.spans_hosts() {
                tracing::warn!(
                    output = name,
                    dedup_key = config.dedup_key.as_ref().map(template::Template::as_str),
                    "This pager's dedup_key does not name {{host}}: in a cluster each node \
                     keeps only its own hosts' part of an incident, and may resolve it while \
                     another node's host still fails. Name {{host}} in it, or run this pager \
                     on one vigil."
                );
            }
            let memory = kept.pager(name, &config);
            let replayed = pager::Replayed::new(config.clone(), memory.clone());
            let holds = kept.holds();
            // The pages a predecessor left stay in flight in these
            // counters until this declaration settles them.
            let (queue, delivery) = counted_queue(
                name,
                capacity,
                stats.clone(),
                Some(replayed),
                Some(holds.clone()),
            );
            let retry = http::RetryPolicy::pager();
            let paging = pager::run(memory, holds, config, delivery, retry, shutdown);
            let task = tokio::spawn(paging);
            (queue, task)
        }
        OutputKind::Webhook(config) => {
            let (queue, delivery) = plain();
            let retry = http::RetryPolicy::push();
            // The predecessor holds it until it has posted its backlog.
            let turn = kept.turn(name);
            let posting = async move {
                let _turn = turn.lock_owned().await;
                webhook::run(config, delivery, retry, shutdown).await;
            };
            (queue, tokio::spawn(posting))
        }
        OutputKind::Graphite(config) => {
            let (queue, delivery) = plain();
            (
                queue,
                tokio::spawn(graphite::run(config, delivery, shutdown)),
            )
        }
        OutputKind::Forward(config) => {
            let (queue, delivery) = plain();
            (
                queue,
                tokio::spawn(forward::run(config, delivery, shutdown)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pager_config(routing_key: &str) -> pager::Config {
        pager::Config {
            url: String::new(),
            dedup_key: None,
            resend_interval: std::time::Duration::from_secs(3600),
            api: pager::Api::PagerDuty {
                routing_key: routing_key.to_owned(),
            },
        }
    }

    /// The rules push a whole `Msg` without yielding to the output's task:
    /// its queue holds one of the default `--max-events-per-msg`, whatever
    /// the output. (At 10 000, 20 000 points of one 30 000-event POST were
    /// dropped with carbon healthy.)
    #[tokio::test]
    async fn an_output_queue_holds_a_whole_msg_of_the_default_size() {
        let kinds = [
            OutputKind::Graphite(graphite::Config {
                host: "127.0.0.1".into(),
                port: 1,
                prefix: None,
                path: None,
            }),
            OutputKind::Forward(forward::Config {
                host: "127.0.0.1".into(),
                port: 1,
                tls: None,
            }),
        ];
        for kind in kinds {
            let spec = OutputSpec {
                name: "out".into(),
                kind,
            };
            let shutdown = CancellationToken::new();
            let (queue, task) = start(&spec, &Kept::default(), shutdown.clone());
            let event = Event {
                metric: Some(crate::event::Metric::Int(1)),
                ..Event::default()
            };
            for _ in 0..crate::limits::Limits::DEFAULT.max_events {
                queue.push(event.clone());
            }
            let dropped = || queue.stats.dropped.load(Ordering::Acquire);
            assert_eq!((queue.queued(), dropped()), (100_000, 0));
            queue.push(event);
            assert_eq!(dropped(), 1, "bounded all the same");
            task.abort();
        }
    }

    /// Keys changed one after another: each earlier key's open incident
    /// comes back with it, up to [`RETIRED_KEYS`] keys back.
    #[tokio::test]
    async fn earlier_routing_keys_keep_their_incidents_a_bounded_number_of_keys_back() {
        let kept = Kept::default();
        let config = |key: usize| pager_config(&format!("k{key}"));
        for key in 0..=RETIRED_KEYS + 1 {
            let memory = kept.pager("pager", &config(key));
            assert!(!memory.has_open(), "k{key} is new");
            let dedup_key = format!("web{key}/cpu");
            memory
                .incidents()
                .triggered(dedup_key, pager::Severity::Critical, 0);
        }
        // The last key is current, the RETIRED_KEYS before it are aside, and
        // k0 is gone; setting aside the last pushes out the oldest, k1.
        let open = |key: usize| kept.pager("pager", &config(key)).has_open();
        assert!(!open(0), "k0 is gone");
        assert!(open(RETIRED_KEYS + 1));
        for key in 2..=RETIRED_KEYS {
            assert!(open(key), "k{key}");
        }
        assert!(!open(1), "k1 is gone");
    }

    /// k1 → k2 → k1 before any task read the file (reloads right after a
    /// start): k1's incidents from before the start come back with it.
    #[tokio::test]
    async fn a_key_replaced_before_it_read_its_file_keeps_what_the_file_holds() {
        let dir = tempfile::tempdir().unwrap();
        let file = incidents::file_in(dir.path(), "pager");
        let before_the_restart = Arc::new(incidents::Memory::open("pager", Some(file), "k1", 10));
        before_the_restart.load().await;
        before_the_restart
            .incidents()
            .triggered("web1/cpu".into(), pager::Severity::Critical, 0);
        before_the_restart.save().await;

        let kept = Kept::in_dir(dir.path().to_owned(), Arc::default());
        let first = kept.pager("pager", &pager_config("k1"));
        let second = kept.pager("pager", &pager_config("k2"));
        let back = kept.pager("pager", &pager_config("k1"));
        assert!(Arc::ptr_eq(&first, &back), "k1's memory came back");
        second.load().await;
        back.load().await;
        assert!(back.has_open() && !second.has_open());
    }

    /// At the end of shutdown's grace every pager's state is written down as
    /// it is: a page settled since the last save leaves the file.
    #[tokio::test]
    async fn the_pagers_are_saved_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let kept = Kept::in_dir(dir.path().to_owned(), Arc::default());
        let memory = kept.pager("pager", &pager_config("k"));
        memory.load().await;
        let page = |service: &str| Event {
            service: Some(service.into()),
            state: Some("critical".into()),
            ..Event::default()
        };
        let generation = memory.next_generation();
        memory
            .unsent()
            .add(vec![page("a"), page("b")], vec![None; 2], generation);
        memory.save().await;
        memory.unsent().settled();
        let saved = || std::fs::read_to_string(incidents::file_in(dir.path(), "pager")).unwrap();
        assert!(saved().contains(r#""a""#), "settled after the last save");
        save_pagers(kept.pager_memories()).await;
        assert!(!saved().contains(r#""a""#) && saved().contains(r#""b""#));
    }

    /// Only a pager's queue holds the work a page came from, and only for a
    /// page it accepted: one refused by a full queue is not waited for.
    #[tokio::test]
    async fn a_page_holds_its_work_only_once_queued() {
        let holds = Arc::new(Holds::default());
        let (pager, _delivery) =
            counted_queue("pager", 1, Arc::default(), None, Some(holds.clone()));
        let (push, _push_delivery) = queue("push", 10);
        let made_by = |seq| holds::Work::Event { shard: 0, seq };
        holds::made_by(made_by(5), || {
            pager.push(Event::default());
            push.push(Event::default());
        });
        holds::made_by(made_by(3), || pager.push(Event::default()));
        assert_eq!(pager.stats.dropped.load(Ordering::Acquire), 1, "full");
        assert_eq!(holds.seq_settled(0, 10), 4, "only the queued page holds");
        pager.push(Event::default());
        assert_eq!(holds.seq_settled(0, 10), 4, "no origin, nothing held");
    }

    /// The pages of a replayed shard are not sent, but what they opened and
    /// resolved is known to the pager afterwards.
    #[tokio::test]
    async fn a_suppressed_page_is_not_queued_but_its_incident_is_remembered() {
        let kept = Kept::default();
        let (queue, _task) = pager_output(&kept, pager_config("k"));
        let memory = kept.pager("pager", &pager_config("k"));
        let open = |key: &str| memory.incidents().get(key).map(|open| open.severity);
        suppressed(|| {
            queue.push(page("cpu", "critical"));
            queue.push(page("disk", "warning"));
            queue.push(page("disk", "ok"));
            queue.push(page("load", "flapping"));
        });
        assert_eq!(queue.queued(), 0);
        assert_eq!(queue.stats.accepted.load(Ordering::Acquire), 0);
        assert_eq!(open("web1/cpu"), Some(pager::Severity::Critical));
        assert_eq!((open("web1/disk"), open("web1/load")), (None, None));

        let (webhook, _task) = start(
            &OutputSpec {
                name: "push".into(),
                kind: OutputKind::Webhook(webhook::Config {
                    url: String::new(),
                    headers: Default::default(),
                    body: None,
                }),
            },
            &kept,
            CancellationToken::new(),
        );
        suppressed(|| webhook.push(page("cpu", "critical")));
        assert_eq!(webhook.queued(), 0, "other outputs ignore it");
    }

    /// A replayed `ok` resolves the incident a replayed trigger opened under
    /// the `dedup_key` of an earlier declaration, as a sent one does.
    #[tokio::test]
    async fn a_replayed_resolve_finds_the_incident_opened_under_an_earlier_dedup_key() {
        let kept = Kept::default();
        let declared = |template: Option<&str>| OutputSpec {
            name: "pager".into(),
            kind: OutputKind::Pager(pager::Config {
                dedup_key: template.map(|t| template::Template::parse(t).unwrap()),
                ..pager_config("k")
            }),
        };
        let page = |state: &str| Event {
            host: Some("web1".into()),
            service: Some("cpu".into()),
            state: Some(state.into()),
            ..Event::default()
        };
        let memory = kept.pager("pager", &pager_config("k"));
        let declared_last = |template: Option<&str>| {
            let template = template.map(|t| template::Template::parse(t).unwrap());
            memory.dedup_keys().last() == Some(&template)
        };
        let (first, _task) = start(
            &declared(Some("cpu-{host}")),
            &kept,
            CancellationToken::new(),
        );
        while !declared_last(Some("cpu-{host}")) {
            tokio::task::yield_now().await;
        }
        suppressed(|| first.push(page("critical")));
        assert!(memory.incidents().get("cpu-web1").is_some());

        let (second, _task) = start(&declared(None), &kept, CancellationToken::new());
        while !declared_last(None) {
            tokio::task::yield_now().await;
        }
        suppressed(|| second.push(page("ok")));
        assert!(memory.incidents().get("cpu-web1").is_none(), "resolved");
        assert!(!memory.has_open());
    }

    /// A replayed `ok` of one series leaves open the incident another
    /// series that triggered it shares (`dedup_key: "{host}"`), as a sent
    /// one does: the shard's new owner resolves it when that one clears.
    #[tokio::test]
    async fn a_replayed_resolve_leaves_open_an_incident_another_series_still_fails() {
        let kept = Kept::default();
        let config = pager::Config {
            dedup_key: Some(template::Template::parse("{host}").unwrap()),
            ..pager_config("k")
        };
        let (queue, _task) = pager_output(&kept, config.clone());
        let memory = kept.pager("pager", &config);
        suppressed(|| {
            queue.push(page("cpu", "critical"));
            queue.push(page("disk", "critical"));
            queue.push(page("cpu", "ok"));
        });
        assert!(memory.incidents().get("web1").is_some(), "disk still fails");
        suppressed(|| queue.push(page("disk", "ok")));
        assert!(!memory.has_open());
    }

    /// A replayed trigger was sent by the previous owner when it was made
    /// (its time), not when it is replayed; a repeat the previous owner
    /// suppressed (within the resend interval) did not re-send it. Counted
    /// from the replay, the new owner's next trigger was suppressed up to an
    /// interval too long.
    #[tokio::test]
    async fn a_replayed_trigger_counts_from_when_the_previous_owner_sent_it() {
        use crate::clock::{Clock, MICROS_PER_SEC, SystemClock};
        let kept = Kept::default();
        let (queue, _task) = pager_output(&kept, pager_config("k"));
        let memory = kept.pager("pager", &pager_config("k"));
        let minutes_ago = |minutes: i64| Event {
            time: SystemClock.now() - minutes * 60 * MICROS_PER_SEC,
            ..page("cpu", "critical")
        };
        let minutes_since_sent = || {
            let sent = memory.incidents().get("web1/cpu").unwrap().sent;
            (memory.now() - sent) / MICROS_PER_SEC / 60
        };
        suppressed(|| {
            queue.push(minutes_ago(120));
            queue.push(minutes_ago(90));
        });
        assert_eq!(minutes_since_sent(), 120, "the 90 min repeat was not sent");
        suppressed(|| queue.push(minutes_ago(30)));
        assert_eq!(minutes_since_sent(), 30, "re-sent after the interval");
    }

    /// A pager output named `pager` paging as `config` says, started.
    fn pager_output(kept: &Kept, config: pager::Config) -> (Arc<Queue>, JoinHandle<()>) {
        let spec = OutputSpec {
            name: "pager".into(),
            kind: OutputKind::Pager(config),
        };
        start(&spec, kept, CancellationToken::new())
    }

    /// A page of host `web1`'s `service` in `state`.
    fn page(service: &str, state: &str) -> Event {
        Event {
            host: Some("web1".into()),
            service: Some(service.into()),
            state: Some(state.into()),
            ..Event::default()
        }
    }

    fn accounted(queue: &Queue) -> bool {
        let s = &queue.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Acquire);
        let settled = get(&s.delivered) + get(&s.dropped) + get(&s.skipped);
        get(&s.accepted) == settled + queue.queued() + get(&s.in_flight)
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_every_event_stays_accounted_for() {
        let (queue, mut delivery) = queue("test", 3);
        for _ in 0..6 {
            queue.push(Event::default());
        }
        assert_eq!(queue.stats.accepted.load(Ordering::Acquire), 6);
        assert_eq!(queue.stats.dropped.load(Ordering::Acquire), 3);
        assert_eq!(queue.queued(), 3);
        assert!(accounted(&queue));

        let batch = delivery.next_batch(10).await.unwrap();
        assert_eq!(batch.len(), 3);
        assert_eq!(
            (
                queue.queued(),
                queue.stats.in_flight.load(Ordering::Acquire)
            ),
            (0, 3)
        );
        assert!(accounted(&queue));

        delivery.delivered(1);
        delivery.dropped(1);
        delivery.skipped(1);
        assert_eq!(queue.stats.delivered.load(Ordering::Acquire), 1);
        assert_eq!(queue.stats.dropped.load(Ordering::Acquire), 4);
        assert_eq!(queue.stats.skipped.load(Ordering::Acquire), 1);
        assert_eq!(queue.stats.in_flight.load(Ordering::Acquire), 0);
        assert!(accounted(&queue));
    }

    #[tokio::test]
    async fn a_queue_is_full_at_its_bytes_before_its_length() {
        let (queue, mut delivery) = queue("test", 10_000);
        let big = Event {
            description: Some("x".repeat(1024 * 1024)),
            ..Event::default()
        };
        let fit = MAX_QUEUED_BYTES / big.approx_bytes();
        assert!(fit < 200);
        for _ in 0..fit + 10 {
            queue.push(big.clone());
        }
        assert_eq!(queue.queued(), fit as u64);
        assert_eq!(queue.stats.dropped.load(Ordering::Acquire), 10);
        assert!(accounted(&queue));
        // Taken out in batches of about MAX_BATCH_BYTES, the room is there
        // again.
        let per_batch = MAX_BATCH_BYTES.div_ceil(big.approx_bytes());
        let mut taken = 0;
        while taken < fit {
            let batch = delivery.next_batch(fit).await.unwrap();
            assert_eq!(batch.len(), per_batch.min(fit - taken));
            taken += batch.len();
        }
        queue.push(big.clone());
        assert_eq!(queue.queued(), 1);
        assert_eq!(queue.stats.dropped.load(Ordering::Acquire), 10);
        assert!(accounted(&queue));
    }

    #[tokio::test]
    async fn batches_take_what_is_queued_up_to_the_limit() {
        let (queue, mut delivery) = queue("test", 100);
        for _ in 0..7 {
            queue.push(Event::default());
        }
        assert_eq!(delivery.next_batch(5).await.unwrap().len(), 5);
        assert_eq!(delivery.next_batch(5).await.unwrap().len(), 2);
        drop(queue);
        assert!(delivery.next_batch(5).await.is_none(), "closed and empty");
    }
}
