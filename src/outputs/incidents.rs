//! The incidents a pager output (PagerDuty or a paging webhook) triggered and
//! has not resolved ([`super::hygiene`]'s table): what lets it re-send a
//! trigger only after its resend interval and send a resolve only for an
//! incident it opened.
//!
//! They outlive the output's task. A reload that redeclares the output hands
//! the new task the same [`Memory`] (see [`super::Kept`]), or an empty one
//! taking over its file when the receiver changed (the previous key's is
//! kept aside, and serves again if a later reload brings that key back);
//! then the previous receiver's task, once stopped, hands the new one the
//! pages it did not deliver (see `pager::handed`), and the new one's pages
//! only after that: the memories of an output's receivers share one turn.
//! An output removed or renamed leaves them to a later declaration of its
//! name, with a warning ([`warn_of_undeclared`] at each start).
//! With a data directory they are saved to `pagerduty-<output>.json` after
//! every batch that changed them, and loaded when the output's first task
//! starts, both off the async workers; so an incident open before a restart
//! is still resolved when its series turns `ok`. The file also holds the
//! pages not yet settled (`Unsent`), taken from the queue as they come,
//! even while an earlier page is retried, so a restart or a crash loses none
//! of them.
//!
//! Incidents belong to their receiver ([`super::pager::Config::receiver`]: PagerDuty's
//! routing key, a webhook's URL). The file holds no receiver (a secret), only
//! its hash: incidents saved under another receiver cannot be resolved
//! through this one, and are left out with a warning. They are kept aside,
//! in `pagerduty-<output>.<receiver hash>.json` ([`kept_aside`]), as are
//! those of a receiver a reload replaced: a later run paging that receiver
//! again resolves them.

use std::collections::{HashSet, VecDeque};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use super::holds::Origin;
use super::hygiene::Incidents;
use super::pager::{self, Severity, fnv1a};
use super::template::Template;
use crate::blocking::off_workers;
use crate::clock::{Micros, MonotonicClock, SharedClock};
use crate::event::Event;
use crate::snapshot::{self, SnapshotError};
use crate::stats::Stats;

/// The file's layout. Version 1 holds the open incidents; version 2 adds
/// the pages not delivered yet (`unsent`). A file with none is written as
/// version 1, which a vigil from before `unsent` reads whole; one with some
/// as version 2, which such a vigil refuses, saying so, where as version 1
/// it dropped the pages without a word (a downgrade). A file of a later
/// version is not loaded.
const VERSION: u32 = 2;

/// The version of a file without unsent pages.
const WITHOUT_UNSENT: u32 = 1;
/// Larger than any file `MAX_OPEN` incidents make (keys are ≤ 255 bytes):
/// anything bigger is not ours, and is not read into memory.
/// Larger than any file `MAX_OPEN` incidents and [`MAX_UNSENT_BYTES`] of
/// unsent pages make (keys are ≤ 255 bytes; JSON escapes a byte in at most
/// six): anything bigger is not ours, and is not read into memory.
const MAX_FILE: u64 = 128 * 1024 * 1024;
/// `dedup_key` templates remembered per memory: a reload that changed the
/// template still resolves the incidents opened under the earlier ones.
const DEDUP_KEYS: usize = 4;
/// Undelivered pages kept for the next run at most, in number and in bytes
/// (by [`Event::approx_bytes`]); a dead pager at shutdown may have its whole
/// queue undelivered.
const MAX_UNSENT: usize = 10_000;
const MAX_UNSENT_BYTES: usize = 8 * 1024 * 1024;

/// The pages a pager took from its queue and has not settled, oldest first,
/// each with the work that made it: the pager's own queue. It takes pages
/// into it as they come, even while it retries an earlier one, and writes
/// them down (saves them with the incidents) before their first attempt, as
/// far as [`MAX_UNSENT`] and [`MAX_UNSENT_BYTES`] allow; each is taken off
/// once settled (delivered, or refused for good). So a crash loses no page
/// written down, and what is left when a task stops is sent first by the
/// next run: the next task of a reload takes them all, a restart those
/// written down.
#[derive(Default)]
pub(super) struct Unsent {
    /// Each with what made it and the [`Generation`] of the task that took it.
    pages: VecDeque<(Event, Option<Origin>, Generation)>,
    /// How many of the first pages are written down; those after did not fit.
    written: usize,
    /// Bytes of the pages written down.
    bytes: usize,
    /// Pages ever settled, and the number the oldest page settled before the
    /// last save had: pages numbered from there on were in the file.
    settled: u64,
    saved_from: u64,
    saved_to: u64,
    /// The pages were [taken](Unsent::take) for another receiver's memory,
    /// which saves them: the file gets this one's no more.
    handed_on: bool,
}

impl Unsent {
    /// Whether pages taken from the queue now would be written down: every
    /// page held is, and there is room for more. Until then the queue keeps
    /// them, in memory.
    pub(super) fn has_room(&self) -> bool {
        self.fits(1)
    }

    /// Whether a page of `bytes` added now would be written down: every page
    /// before it is, and it stays within the bounds.
    fn fits(&self, bytes: usize) -> bool {
        self.written == self.pages.len()
            && self.written < MAX_UNSENT
            && self.bytes + bytes <= MAX_UNSENT_BYTES
    }

    /// Adds `batch` (made by `origins`, in the same order), taken by the
    /// task of `generation`, after the pages held, writing down as many of
    /// it as the bounds allow: the first ones.
    pub(super) fn add(
        &mut self,
        batch: Vec<Event>,
        origins: Vec<Option<Origin>>,
        generation: Generation,
    ) {
        for (event, origin) in batch.into_iter().zip(origins) {
            let bytes = event.approx_bytes();
            if self.fits(bytes) {
                self.written += 1;
                self.bytes += bytes;
            }
            self.pages.push_back((event, origin, generation));
        }
    }

    /// The oldest page for the task of `generation` to send (none if the
    /// oldest was taken by a later task, which sends it once this one has
    /// stopped), what made it, and whether it is written down but not yet
    /// in the file (so to be saved before its first attempt).
    pub(super) fn oldest(&self, generation: Generation) -> Option<(Event, Option<Origin>, bool)> {
        let (event, origin, taken_by) = self.pages.front()?;
        if *taken_by > generation {
            return None;
        }
        let unsaved = self.written > 0 && self.settled >= self.saved_to;
        Some((event.clone(), *origin, unsaved))
    }

    /// How many pages held were taken by tasks before `generation`: what it
    /// sends, as its predecessors left them, among its own.
    pub(super) fn left_before(&self, generation: Generation) -> usize {
        self.pages
            .iter()
            .filter(|(_, _, by)| *by < generation)
            .count()
    }

    /// Makes the pages restored from the file (which no task of this
    /// process has counted yet) the task of `generation`'s; how many.
    pub(super) fn adopt_restored(&mut self, generation: Generation) -> usize {
        let restored = self
            .pages
            .iter_mut()
            .filter(|(_, _, by)| *by == Generation::RESTORED);
        restored.map(|(_, _, by)| *by = generation).count()
    }

    /// How many pages held were taken by the task of `generation` or an
    /// earlier one.
    pub(super) fn taken_until(&self, generation: Generation) -> usize {
        self.pages
            .iter()
            .filter(|(_, _, by)| *by <= generation)
            .count()
    }

    /// The oldest page was settled.
    pub(super) fn settled(&mut self) {
        if let Some((event, _, _)) = self.pages.pop_front() {
            self.settled += 1;
            if self.written > 0 {
                self.written -= 1;
                self.bytes -= event.approx_bytes();
            }
        }
    }

    /// Whether pages were settled or written down since the last save.
    pub(super) fn changed_since_saved(&self) -> bool {
        self.saved_from != self.settled || self.saved_to != self.settled + self.written as u64
    }

    /// Takes every page held, and what made each, for another receiver's
    /// memory (see [`Unsent::handed_on`]).
    pub(super) fn take(&mut self) -> (Vec<Event>, Vec<Option<Origin>>) {
        self.handed_on = true;
        self.settled += self.pages.len() as u64;
        self.written = 0;
        self.bytes = 0;
        self.pages.drain(..).map(|(e, o, _)| (e, o)).unzip()
    }

    pub(super) fn len(&self) -> usize {
        self.pages.len()
    }

    /// Puts `handed` (pages another receiver's memory did not deliver, each
    /// with what made it) behind the pages restored or handed over before
    /// and those of tasks up to `paged` (which had their turn before the
    /// handing task: a receiver that came back), ahead of those later tasks
    /// took: those were made after. Called while no task of this memory
    /// pages (they wait for the turn the handing task holds), so the oldest
    /// page is in no one's hands. Every page is renumbered as taken anew:
    /// the next save writes them all down, and the next attempt waits for
    /// it.
    pub(super) fn hand_over(&mut self, handed: Vec<(Event, Option<Origin>)>, paged: Generation) {
        if handed.is_empty() {
            return;
        }
        self.settled += self.pages.len() as u64;
        (self.written, self.bytes) = (0, 0);
        let held = std::mem::take(&mut self.pages);
        let before = held
            .iter()
            .take_while(|(_, _, by)| *by <= paged.max(Generation::HANDED))
            .count();
        let mut held = held.into_iter();
        let earlier = held.by_ref().take(before).collect::<Vec<_>>();
        let handed = handed
            .into_iter()
            .map(|(event, origin)| (event, origin, Generation::HANDED));
        for (event, origin, by) in earlier.into_iter().chain(handed).chain(held) {
            self.add(vec![event], vec![origin], by);
        }
    }

    /// How many of the pages held are written down.
    #[cfg(test)]
    fn written(&self) -> usize {
        self.written
    }

    /// The pages written down, for the file, and what the file holds once
    /// they are in it: for [`Unsent::saved`], once it is written.
    fn saving(&self) -> (Vec<Event>, Saving) {
        let written = self.pages.iter().take(self.written);
        let pages = written.map(|(event, _, _)| event.clone()).collect();
        (
            pages,
            Saving(self.settled, self.settled + self.written as u64),
        )
    }

    /// The file holds the pages [`Unsent::saving`] gave with `saving`.
    fn saved(&mut self, Saving(from, to): Saving) {
        (self.saved_from, self.saved_to) = (from, to);
    }

    /// How many of the pages held the file holds.
    fn in_the_file(&self) -> usize {
        let held_to = self.settled + self.pages.len() as u64;
        let from = self.saved_from.max(self.settled);
        usize::try_from(self.saved_to.min(held_to).saturating_sub(from)).unwrap_or(usize::MAX)
    }

    /// Pages saved by an earlier run: no work of this one made them, and
    /// they are in the file already.
    fn restore(&mut self, pages: Vec<Event>) {
        let origins = vec![None; pages.len()];
        self.add(pages, origins, Generation::RESTORED);
        let (_, saving) = self.saving();
        self.saved(saving);
    }
}

/// The pages a save writes, as numbered by [`Unsent`]'s settled count: the
/// file holds them once it is written.
#[derive(Debug, Clone, Copy)]
struct Saving(u64, u64);

/// Which of a memory's successive tasks (one per declaration of the output,
/// see [`Memory::next_generation`]) took a page: a task sends only the
/// pages of its own and earlier tasks, so a reload's new task may write
/// pages down while the old one still sends, and sends them after it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Generation(u64);

impl Generation {
    /// Before every task: the pages read from the file, which the first task
    /// to page adopts into the output's counters.
    const RESTORED: Generation = Generation(0);
    /// Pages another receiver's memory handed over ([`Unsent::hand_over`]):
    /// sent by any task of this memory, before the pages its tasks took, and
    /// counted already (in the output's counters, which every declaration
    /// shares). Tasks start after it.
    const HANDED: Generation = Generation(1);
}

/// Pages handed from one receiver's memory to the next, each with what
/// made it.
pub(super) type Handed = Vec<(Event, Option<Origin>)>;

/// The saved form.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    version: u32,
    /// `fnv1a` of the receiver, as 16 hex digits (named when it could only
    /// be a routing key).
    #[serde(rename = "routing_key_hash")]
    receiver_hash: String,
    /// Oldest trigger first.
    incidents: Vec<SavedIncident>,
    /// Pages taken from the queue and not yet delivered, oldest first.
    #[serde(default)]
    unsent: Vec<Event>,
    /// The `dedup_key` templates declared (`null`: the derived key), the
    /// latest last: a restart with another one still resolves what the
    /// earlier ones opened. Absent from older files, and ignored by them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    dedup_keys: Vec<Option<String>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedIncident {
    dedup_key: String,
    severity: Severity,
    /// When the trigger was sent, in seconds since the epoch.
    sent: f64,
    /// The series failing in it (see `hygiene::Open`); absent from older
    /// files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    series: Vec<u64>,
    /// The severity each of `series` fails at, in the same order; absent
    /// from older files (each then fails at the incident's `severity`), and
    /// ignored by them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    severities: Vec<Severity>,
    /// The series that cleared last, whose resolve the receiver has not
    /// taken (see `hygiene::Open`); absent from older files, which then
    /// take the incident for anyone's to resolve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cleared: Option<u64>,
}

/// One output's open incidents, and where they are saved.
pub struct Memory {
    /// The output's name, for the logs.
    output: String,
    file: Option<PathBuf>,
    /// Where a failed save is counted (`state_write_failures`).
    failures: Option<Arc<Stats>>,
    /// The last save failed: said once, until one succeeds.
    failing: AtomicBool,
    receiver_hash: String,
    incidents: Mutex<Incidents>,
    /// What the incidents' triggers are timed on: the process's monotonic
    /// clock, as a resend interval must not jump with the wall clock; a
    /// virtual one in tests.
    clock: SharedClock,
    /// Held through a whole save, so saves land in the order they read the
    /// incidents: the newest state is the one left on disk. Shared with the
    /// memory that replaces this one, which saves to the same file. Holds
    /// the hash of the receiver whose state the file holds, as last read or
    /// written (`None`: no file yet).
    saving: Arc<Mutex<Option<String>>>,
    /// Another receiver's memory took over the file: this one's task may
    /// still be draining, but it no longer saves.
    replaced: AtomicBool,
    /// Set once the file was read (or there was nothing to read).
    loaded: OnceCell<()>,
    /// The pages taken from the queue and not yet delivered, oldest first:
    /// what the next task of this output sends first. Saved with the
    /// incidents, so that a restart (or a crash) does the same. See
    /// [`Unsent`].
    unsent: Mutex<Unsent>,
    /// Held by the task paging from this memory: a reload's new task pages
    /// only once the previous one stopped, so it sends what that one left
    /// unsent before anything newer. Shared by the memories of every
    /// receiver of the output: one that replaced another (a reload changed
    /// the routing key or URL) pages once the previous receiver's task has
    /// stopped and handed it what it could not deliver.
    paging: Arc<tokio::sync::Mutex<()>>,
    /// The output's memory of its current receiver, shared by the memories
    /// of all its receivers: where a replaced one's task hands the pages it
    /// could not deliver. Set by [`Memory::made_current`].
    current: Arc<Mutex<Weak<Memory>>>,
    /// The last [`Generation`] given to a task of this memory.
    generations: AtomicU64,
    /// The last [`Generation`] of a task that had its turn to page.
    paged: AtomicU64,
    /// The `dedup_key` templates of the output's declarations that paged
    /// from this memory, the latest last (`None`: the derived key); at most
    /// [`DEDUP_KEYS`]. Saved with the incidents.
    dedup_keys: Mutex<Vec<Option<Template>>>,
    /// The memory this one replaced: the file is read through it (if it
    /// has not read it yet), under the key it was saved with, before this
    /// one can save over it. Taken by [`load`](Self::load).
    predecessor: Mutex<Option<Arc<Memory>>>,
    /// The memory of the receiver this one replaced (or took the file back
    /// from): pages its task left there are this one's to send
    /// ([`replaced_memory`](Self::replaced_memory)).
    /// Held until then: with nothing open, nothing else keeps it.
    previous_receiver: Mutex<Option<Arc<Memory>>>,
    /// This memory's incidents were (or may be) in its file kept aside,
    /// which the next save of the output's file makes stale: removed then.
    aside_to_clear: AtomicBool,
}

impl Memory {
    /// The memory of output `output` paging `receiver`, empty until
    /// [`load`](Self::load)ed from `file`.
    pub fn open(output: &str, file: Option<PathBuf>, receiver: &str, max: usize) -> Memory {
        Memory {
            output: output.to_owned(),
            receiver_hash: key_hash(receiver),
            incidents: Mutex::new(Incidents::new(max)),
            clock: Arc::new(MonotonicClock::default()),
            saving: Arc::default(),
            replaced: AtomicBool::new(false),
            loaded: OnceCell::new(),
            unsent: Mutex::default(),
            paging: Arc::default(),
            current: Arc::default(),
            generations: AtomicU64::new(0),
            paged: AtomicU64::new(0),
            predecessor: Mutex::new(None),
            previous_receiver: Mutex::new(None),
            aside_to_clear: AtomicBool::new(false),
            dedup_keys: Mutex::default(),
            failures: None,
            failing: AtomicBool::new(false),
            file,
        }
    }

    /// This memory, counting its failed saves in `stats`.
    pub fn counting_failures_in(self, stats: Arc<Stats>) -> Memory {
        Memory {
            failures: Some(stats),
            ..self
        }
    }

    /// This memory, timing its incidents' triggers on `clock`.
    pub fn on_clock(self, clock: SharedClock) -> Memory {
        Memory { clock, ..self }
    }

    /// Now, on the clock the incidents' triggers are timed on.
    pub(super) fn now(&self) -> Micros {
        self.clock.now()
    }

    /// Reads the file, the first time only, off the async workers (it may
    /// hold [`MAX_OPEN`](super::pager::MAX_OPEN) incidents): what it
    /// holds is restored when it was saved for the same receiver. A
    /// file that cannot be read is logged with the reason and renamed to
    /// `….unreadable` ([`snapshot::set_aside`]); nothing here fails.
    pub async fn load(&self) {
        self.loaded
            .get_or_init(|| async {
                let predecessor = self.predecessor.lock().take();
                if let Some(predecessor) = predecessor {
                    let read_here = !predecessor.is_loaded();
                    // Boxed: a chain of replaced memories loads through each other.
                    Box::pin(predecessor.load()).await;
                    // Unless its key came back meanwhile, and it serves again.
                    if read_here && predecessor.replaced.load(Ordering::Acquire) {
                        predecessor.warn_left_open();
                    }
                    return self.restore_kept_aside().await;
                }
                let Some(file) = self.file.clone() else {
                    return;
                };
                let path = file.clone();
                let read = off_workers(move || read(&path)).await;
                if let Some(Ok(saved)) = &read {
                    *self.saving.lock() = saved.as_ref().map(|s| s.receiver_hash.clone());
                }
                match read {
                    Some(Ok(Some(saved))) if saved.receiver_hash == self.receiver_hash => {
                        // Whatever was kept aside for this receiver is older
                        // than the file: stale once the file is saved again.
                        self.aside_to_clear.store(true, Ordering::Release);
                        self.restore(saved);
                    }
                    Some(Ok(Some(saved))) => {
                        self.restore_for_another(&file, saved).await;
                        self.restore_kept_aside().await;
                    }
                    Some(Ok(None)) => self.restore_kept_aside().await,
                    None => {}
                    // The file may be fine, the disk not: the next save tells.
                    Some(Err(error @ LoadError::Io { .. })) => tracing::warn!(
                        output = %self.output,
                        %error,
                        "{NOT_LOADED}"
                    ),
                    // Kept aside: it lists what to resolve by hand, and the
                    // next save would replace it.
                    Some(Err(error)) => {
                        off_workers(move || snapshot::set_aside(&file, &error, NOT_LOADED)).await;
                    }
                }
            })
            .await;
    }

    /// What `saved`, this receiver's, holds.
    fn restore(&self, saved: Saved) {
        let output = &self.output;
        self.unsent.lock().restore(saved.unsent);
        // Those declared since (none yet, at a start) stay the latest.
        let declared = std::mem::take(&mut *self.dedup_keys.lock());
        let saved_keys = saved.dedup_keys.iter().filter_map(|t| match t {
            None => Some(None),
            // Checked when it was declared; a file edited by hand may not be.
            Some(text) => Template::parse(text).ok().map(Some),
        });
        for template in saved_keys.collect::<Vec<_>>().iter().chain(&declared) {
            self.declared_dedup_key(template);
        }
        let (now, wall) = (self.now(), SystemTime::now());
        let mut incidents = self.incidents.lock();
        for incident in saved.incidents {
            let sent = UNIX_EPOCH + Duration::try_from_secs_f64(incident.sent).unwrap_or_default();
            let age = wall.duration_since(sent).unwrap_or_default();
            let age = Micros::try_from(age.as_micros()).unwrap_or(Micros::MAX);
            let sent = now.saturating_sub(age);
            let key = incident.dedup_key;
            incidents.triggered(key.clone(), incident.severity, sent);
            // A file from before severities were saved: the incident's.
            let severities =
                (incident.severities.into_iter()).chain(std::iter::repeat(incident.severity));
            for (series, severity) in incident.series.into_iter().zip(severities) {
                incidents.joined(&key, series, severity);
            }
            if let Some(cleared) = incident.cleared {
                incidents.left_to(&key, cleared);
            }
        }
        tracing::info!(
            output,
            incidents = incidents.len(),
            "Open incidents loaded."
        );
    }

    /// This receiver's incidents kept aside while another one paged (see
    /// [`kept_aside`]), when the output's file is not this receiver's.
    async fn restore_kept_aside(&self) {
        let Some(file) = &self.file else {
            return;
        };
        let aside = kept_aside(file, &self.receiver_hash);
        let path = aside.clone();
        let saved = match off_workers(move || read(&path)).await {
            Some(Ok(Some(saved))) if saved.receiver_hash == self.receiver_hash => saved,
            Some(Ok(_)) | None => return,
            Some(Err(error @ LoadError::Io { .. })) => {
                return tracing::warn!(output = %self.output, %error, "{NOT_LOADED}");
            }
            // As the output's own file: this receiver's save aside would
            // replace it.
            Some(Err(error)) => {
                off_workers(move || snapshot::set_aside(&aside, &error, NOT_LOADED)).await;
                return;
            }
        };
        tracing::info!(
            output = %self.output,
            file = %aside.display(),
            incidents = saved.incidents.len(),
            "The receiver's open incidents, kept aside while another one paged, are loaded again."
        );
        self.aside_to_clear.store(true, Ordering::Release);
        self.restore(saved);
    }

    /// The output's file holds `saved`, another receiver's (the rules
    /// changed the routing key or URL while vigil was down): its open
    /// incidents are kept aside, for a later run paging that receiver again;
    /// the pages it could not deliver, most often because that receiver
    /// was wrong, are sent to this one instead, as a reload hands them over
    /// (see [`pager::handed`]), the latest page of each series. Those left
    /// out were never counted by this run.
    async fn restore_for_another(&self, file: &Path, mut saved: Saved) {
        let unsent = std::mem::take(&mut saved.unsent);
        let template = saved_template(&saved.dedup_keys);
        if !saved.incidents.is_empty() {
            let aside = kept_aside(file, &saved.receiver_hash);
            tracing::warn!(
                output = %self.output,
                file = %file.display(),
                incidents = saved.incidents.len(),
                kept_in = %aside.display(),
                "Open incidents were saved for another receiver (routing key or URL); this \
                 output cannot resolve them: resolve them by hand, or page that receiver \
                 again, which resolves them."
            );
            saved.version = WITHOUT_UNSENT;
            let written = off_workers(move || write_saved(&aside, &saved)).await;
            if let Some(Err(error)) = written {
                tracing::warn!(output = %self.output, %error, "Open incidents not kept aside.");
            }
        }
        self.hand_over_restored(unsent, template);
    }

    /// Pages another receiver could not deliver (see
    /// [`restore_for_another`](Self::restore_for_another)), made with
    /// `template`.
    fn hand_over_restored(&self, unsent: Vec<Event>, template: Option<Template>) {
        if unsent.is_empty() {
            return;
        }
        let made = unsent.into_iter().map(|event| (event, None));
        let (handed, left_out) = pager::handed(made.collect(), template.as_ref());
        tracing::warn!(
            output = %self.output,
            handed = handed.len(),
            superseded = left_out.len(),
            "Pages the previous run did not deliver to another receiver (routing key or URL): \
             sent to this one first, the latest page of each series (one that series \
             superseded is not)."
        );
        let (pages, origins) = handed.into_iter().unzip();
        self.unsent.lock().add(pages, origins, Generation::RESTORED);
        // Not in this receiver's file yet: saved before their first attempt.
    }

    /// The memory of the same output paging another `receiver`,
    /// saving to the same file from now on, never at the same time as this
    /// one. It starts with what was kept aside for `receiver` (see
    /// [`kept_aside`]): this one's incidents cannot be resolved through
    /// another receiver. If this one has not read the file yet, the new one's
    /// [`load`](Self::load) reads it into this one first.
    pub fn replaced_by(self: &Arc<Self>, receiver: &str) -> Memory {
        self.replaced.store(true, Ordering::Release);
        self.unsent.lock().handed_on = false;
        let loaded = self.is_loaded();
        if loaded {
            self.warn_left_open();
        }
        Memory {
            output: self.output.clone(),
            file: self.file.clone(),
            failures: self.failures.clone(),
            failing: AtomicBool::new(false),
            receiver_hash: key_hash(receiver),
            incidents: Mutex::new(Incidents::new(self.incidents.lock().max)),
            clock: self.clock.clone(),
            saving: self.saving.clone(),
            replaced: AtomicBool::new(false),
            // The file is this one's to read: the new one reads only what
            // was kept aside for its receiver.
            loaded: OnceCell::new(),
            unsent: Mutex::default(),
            // Its tasks page once this one's have stopped (and handed over).
            paging: self.paging.clone(),
            current: self.current.clone(),
            generations: AtomicU64::new(0),
            paged: AtomicU64::new(0),
            predecessor: Mutex::new(Some(self.clone())),
            previous_receiver: Mutex::new(Some(self.clone())),
            aside_to_clear: AtomicBool::new(false),
            dedup_keys: Mutex::default(),
        }
    }

    fn warn_left_open(&self) {
        let incidents = self.incidents.lock().len();
        if incidents > 0 {
            tracing::warn!(
                output = %self.output,
                incidents,
                "The receiver (routing key or URL) changed; the open incidents of the previous one \
                 cannot be resolved through it: resolve them by hand, or bring it back, \
                 which resolves them (they are kept aside in the data directory)."
            );
        }
    }

    /// This memory, replaced when its receiver changed, serving again
    /// because that receiver came back: it takes the file over from `current`
    /// (which no longer saves). [`resume`](Self::resume) then saves it, so
    /// that the file holds its incidents again. Pages a stopped task of
    /// `current` left (a reload removed the output meanwhile) are this one's
    /// to send, as for a new receiver ([`replaced_memory`](Self::replaced_memory)).
    pub fn takes_over_from(&self, current: &Arc<Memory>) {
        current.replaced.store(true, Ordering::Release);
        current.unsent.lock().handed_on = false;
        self.replaced.store(false, Ordering::Release);
        self.aside_to_clear.store(true, Ordering::Release);
        *self.previous_receiver.lock() = Some(current.clone());
    }

    /// Saves a memory that [took the file over](Self::takes_over_from),
    /// once it has read the file: saving first would overwrite incidents it
    /// has yet to read.
    pub async fn resume(self: Arc<Self>) {
        self.load().await;
        let (output, incidents) = (&self.output, self.incidents.lock().len());
        if incidents > 0 {
            tracing::info!(
                output,
                incidents,
                "The previous receiver came back with its open incidents."
            );
        }
        self.save().await;
    }

    /// A declaration of the output pages from this memory with `template`.
    pub(super) fn declared_dedup_key(&self, template: &Option<Template>) {
        let mut keys = self.dedup_keys.lock();
        keys.retain(|t| t != template);
        keys.push(template.clone());
        if keys.len() > DEDUP_KEYS {
            keys.remove(0);
        }
    }

    /// The `dedup_key` templates declared so far, the latest last.
    pub(super) fn dedup_keys(&self) -> Vec<Option<Template>> {
        self.dedup_keys.lock().clone()
    }

    /// This memory is the output's current receiver's: a replaced one's task
    /// hands it what it could not deliver.
    pub fn made_current(self: &Arc<Self>) {
        *self.current.lock() = Arc::downgrade(self);
    }

    /// The output's memory of its current receiver, when another receiver's
    /// memory replaced this one.
    pub(super) fn successor(&self) -> Option<Arc<Memory>> {
        let current = self.current.lock().upgrade()?;
        let other = !std::ptr::eq(Arc::as_ptr(&current), self);
        (other && !current.is_replaced()).then_some(current)
    }

    /// Whether another receiver's memory took this one's place.
    pub(super) fn is_replaced(&self) -> bool {
        self.replaced.load(Ordering::Acquire)
    }

    /// Whether the file was read, or there was none to read.
    pub fn is_loaded(&self) -> bool {
        self.loaded.initialized()
    }

    /// Whether it has incidents open.
    /// How many of the undelivered pages the next run finds in its file
    /// (none without one): as of the last save that succeeded.
    pub fn pages_written_down(&self) -> usize {
        match self.file {
            Some(_) => self.unsent.lock().in_the_file(),
            None => 0,
        }
    }

    /// Whether the last save failed: the file does not hold what this
    /// memory does.
    pub fn save_failed(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// The output's name.
    pub fn output(&self) -> &str {
        &self.output
    }

    /// How many undelivered pages it holds.
    pub fn pages_held(&self) -> usize {
        self.unsent.lock().len()
    }

    /// How many incidents it holds open.
    pub fn open_incidents(&self) -> usize {
        self.incidents.lock().len()
    }

    pub fn has_open(&self) -> bool {
        self.incidents.lock().len() > 0
    }

    /// Whether this memory serves an output paging `receiver`.
    pub fn serves(&self, receiver: &str) -> bool {
        self.receiver_hash == key_hash(receiver)
    }

    pub(super) fn incidents(&self) -> parking_lot::MutexGuard<'_, Incidents> {
        self.incidents.lock()
    }

    /// Waits until no other task pages from this memory; this one does until
    /// it drops the guard.
    pub(super) async fn turn_to_page(&self) -> tokio::sync::OwnedMutexGuard<()> {
        self.paging.clone().lock_owned().await
    }

    /// The generation of a task starting on this memory: later than every
    /// task before it.
    pub(super) fn next_generation(&self) -> Generation {
        Generation(self.generations.fetch_add(1, Ordering::AcqRel) + Generation::HANDED.0 + 1)
    }

    /// The task of `generation` has its turn to page: pages handed over
    /// later go behind its own (see [`Unsent::hand_over`]).
    pub(super) fn took_turn(&self, generation: Generation) {
        self.paged.fetch_max(generation.0, Ordering::AcqRel);
    }

    /// The memory of the receiver this one replaced, while it stays
    /// replaced: a task that stopped before the replacement (a reload
    /// removed the output, a later one declared it with this receiver) left
    /// its undelivered pages there, and no task of it hands them over.
    /// Taken once.
    pub(super) fn replaced_memory(&self) -> Option<Arc<Memory>> {
        let previous = self.previous_receiver.lock().take()?;
        previous.is_replaced().then_some(previous)
    }

    /// The pages left in the memories of the receivers this one replaced by
    /// tasks vigil's stop cut short before they handed them over (see
    /// [`replaced_memory`](Self::replaced_memory)): this one's, the latest
    /// page of each series, so its last save keeps them for the next run.
    pub(super) fn take_pages_left_by_replaced(&self) {
        let Some(previous) = self.replaced_memory() else {
            return;
        };
        // Those it was to get from its own predecessors first.
        previous.take_pages_left_by_replaced();
        // Those read from the file stay uncounted: vigil is stopping.
        let (handed, superseded, _) = previous.take_for_successor(Generation::HANDED);
        if handed.is_empty() && superseded.is_empty() {
            return;
        }
        tracing::warn!(
            output = %self.output,
            handed = handed.len(),
            superseded = superseded.len(),
            "Pages undelivered to the previous receiver (routing key or URL) when vigil's stop \
             cut its output short: kept for this receiver's next run, the latest page of each \
             series."
        );
        self.hand_over(handed);
    }

    /// Takes every page this memory, replaced, holds for the memory that
    /// replaced it, as its task hands them over ([`pager::handed`], with the
    /// template they were made with): the latest page of each series, the
    /// origins of those superseded, and how many were read from the file
    /// (no task of this process counted them; `generation`'s now).
    pub(super) fn take_for_successor(
        &self,
        generation: Generation,
    ) -> (Handed, Vec<Option<Origin>>, usize) {
        let ((pages, origins), restored) = {
            let mut unsent = self.unsent();
            let restored = unsent.adopt_restored(generation);
            (unsent.take(), restored)
        };
        let template = self.dedup_keys().pop().flatten();
        let made = pages.into_iter().zip(origins).collect();
        let (handed, superseded) = pager::handed(made, template.as_ref());
        (handed, superseded, restored)
    }

    /// Hands `pages` over to this memory, which another receiver's task
    /// did not deliver (see [`Unsent::hand_over`]).
    pub(super) fn hand_over(&self, pages: Vec<(Event, Option<Origin>)>) {
        let paged = Generation(self.paged.load(Ordering::Acquire));
        self.unsent.lock().hand_over(pages, paged);
    }

    pub(super) fn unsent(&self) -> parking_lot::MutexGuard<'_, Unsent> {
        self.unsent.lock()
    }

    /// Writes the incidents to the file, if there is one, off the async
    /// workers; whether the file holds them now. A failure is counted, and
    /// logged once until a save succeeds: paging goes on, from memory, and
    /// the pager's task saves again (see `pager::Saves`).
    pub(super) async fn save(self: &Arc<Self>) -> bool {
        let Some(file) = self.file.clone() else {
            return true;
        };
        let memory = self.clone();
        match off_workers(move || memory.write(&file)).await {
            Some(Err(error)) => {
                if let Some(stats) = &self.failures {
                    Stats::incr(&stats.state_write_failures);
                }
                if !self.failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        output = %self.output, %error,
                        "Open incidents not saved; trying again until they are (a restart \
                         meanwhile finds the file as it was last written)."
                    );
                }
                false
            }
            // Not run: the runtime is stopping.
            None => false,
            Some(Ok(())) => {
                if self.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!(output = %self.output, "Open incidents saved again.");
                }
                true
            }
        }
    }

    /// Writes the output's file; or, once another receiver's memory
    /// replaced this one, the file kept aside for this receiver's incidents
    /// (removed when none is left open), and the output's file too while
    /// it is still this receiver's.
    fn write(&self, file: &Path) -> Result<(), SnapshotError> {
        let mut file_holds = self.saving.lock();
        let replaced = self.replaced.load(Ordering::Acquire);
        if replaced {
            let (saved, _, _) = self.saved(false);
            let aside = kept_aside(file, &self.receiver_hash);
            match saved.incidents.is_empty() {
                true => remove_if_present(&aside)?,
                false => write_saved(&aside, &saved)?,
            }
        }
        let (saved, saving, handed_on) = self.saved(true);
        // Until the new receiver saves it, the file is still this one's,
        // and what a restart reads: kept as current as the file aside, or
        // it would open again what this one resolved since; but not once
        // its pages went to the new receiver, which saves them there.
        let own_file = file_holds.as_deref() == Some(self.receiver_hash.as_str());
        if replaced && (handed_on || !own_file) {
            return Ok(());
        }
        write_saved(file, &saved)?;
        *file_holds = Some(self.receiver_hash.clone());
        // Only now: after a failed write the file holds what it held.
        self.unsent.lock().saved(saving);
        if !replaced && self.aside_to_clear.swap(false, Ordering::AcqRel) {
            // Stale now; left, it is never read while the file is this
            // receiver's, so a failure here loses nothing.
            let _ = remove_if_present(&kept_aside(file, &self.receiver_hash));
        }
        Ok(())
    }

    /// The pages the receivers this one replaced still hold, their tasks not
    /// stopped yet (one waits on a receiver that does not answer), as they
    /// will hand them over (see [`pager::handed`]): the file, this one's
    /// now, keeps them ahead of this one's, or a crash (or a second signal)
    /// before the handover would lose them.
    fn pages_left_by_replaced(&self, seen: &mut Vec<*const Memory>) -> Vec<Event> {
        seen.push(self);
        let previous = self.previous_receiver.lock().clone();
        // A receiver that came back replaced the one that had replaced it.
        let Some(previous) = previous
            .filter(|previous| previous.is_replaced() && !seen.contains(&Arc::as_ptr(previous)))
        else {
            return Vec::new();
        };
        let mut made: Vec<_> = (previous.pages_left_by_replaced(seen).into_iter())
            .map(|event| (event, ()))
            .collect();
        let held = previous.unsent.lock();
        if !held.handed_on {
            made.extend(held.pages.iter().map(|(event, _, _)| (event.clone(), ())));
        }
        drop(held);
        let template = previous.dedup_keys().pop().flatten();
        let (handed, _) = pager::handed(made, template.as_ref());
        handed.into_iter().map(|(event, ())| event).collect()
    }

    /// What this memory saves: its incidents, and `with_unsent` its pages
    /// written down, with what the file holds once they are in it, and
    /// whether they were [handed on](Unsent::handed_on) (read with them).
    fn saved(&self, with_unsent: bool) -> (Saved, Saving, bool) {
        let incidents = self.incidents.lock();
        let (now, wall) = (self.now(), SystemTime::now());
        let since_epoch = |age| {
            wall.checked_sub(age)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let (mut unsent, saving, handed_on) = {
            let held = self.unsent.lock();
            let (unsent, saving) = held.saving();
            (unsent, saving, held.handed_on)
        };
        if with_unsent {
            let mut left = self.pages_left_by_replaced(&mut Vec::new());
            left.append(&mut unsent);
            unsent = left;
        } else {
            unsent.clear();
        }
        let saved = Saved {
            version: if unsent.is_empty() {
                WITHOUT_UNSENT
            } else {
                VERSION
            },
            receiver_hash: self.receiver_hash.clone(),
            incidents: incidents
                .oldest_first(now)
                .map(|(key, open, age)| {
                    let (series, severities) = open.series().unzip();
                    SavedIncident {
                        dedup_key: key.to_owned(),
                        severity: open.severity,
                        sent: since_epoch(age),
                        series,
                        severities,
                        cleared: open.cleared(),
                    }
                })
                .collect(),
            unsent,
            dedup_keys: (self.dedup_keys.lock().iter())
                .map(|t| t.as_ref().map(|t| t.as_str().to_owned()))
                .collect(),
        };
        (saved, saving, handed_on)
    }
}

fn write_saved(file: &Path, saved: &Saved) -> Result<(), SnapshotError> {
    snapshot::replace_file(file, |out| {
        serde_json::to_writer(&mut *out, saved).map_err(io::Error::from)?;
        out.write_all(b"\n")
    })
}

fn remove_if_present(file: &Path) -> Result<(), SnapshotError> {
    match std::fs::remove_file(file) {
        Err(cause) if cause.kind() != io::ErrorKind::NotFound => Err(SnapshotError::Io {
            path: file.to_owned(),
            cause,
        }),
        _ => Ok(()),
    }
}

/// The template the pages of `saved` were made with: the latest declared.
fn saved_template(saved: &[Option<String>]) -> Option<Template> {
    match saved.last() {
        Some(Some(text)) => Template::parse(text).ok(),
        _ => None,
    }
}

/// The output's file that `path` is [kept aside](kept_aside) for; else
/// `path` itself.
fn kept_for(path: &Path) -> PathBuf {
    let stem = path.file_stem().and_then(|stem| stem.to_str());
    match stem.and_then(|stem| stem.rsplit_once('.')) {
        Some((output, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            path.with_file_name(format!("{output}.json"))
        }
        _ => path.to_owned(),
    }
}

/// Where the open incidents of a receiver the output no longer pages are
/// kept, beside the output's `file`: `pagerduty-<output>.<receiver hash>.json`.
pub fn kept_aside(file: &Path, receiver_hash: &str) -> PathBuf {
    file.with_extension(format!("{receiver_hash}.json"))
}

/// The file of output `output` in `dir`. Output names are identifiers; any
/// other character becomes `_` all the same, so the name stays one file.
pub fn file_in(dir: &Path, output: &str) -> PathBuf {
    let name: String = output
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' => c,
            _ => '_',
        })
        .collect();
    dir.join(format!("pagerduty-{name}.json"))
}

/// Warns of each pager file in `dir` but the `declared` ones that holds open
/// incidents or unsent pages: left by an output the rules no longer declare
/// (renamed or removed), they are resolved and sent by no one. Reads files,
/// so not on an async worker.
pub fn warn_of_undeclared(dir: &Path, declared: &HashSet<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.flatten().map(|entry| entry.path()) {
        let named = path.file_name().and_then(|n| n.to_str());
        let is_pagers = named.is_some_and(|n| n.starts_with("pagerduty-") && n.ends_with(".json"));
        if !is_pagers || declared.contains(&path) || declared.contains(&kept_for(&path)) {
            continue;
        }
        let Ok(Some(saved)) = read(&path) else {
            continue;
        };
        let (incidents, unsent) = (saved.incidents.len(), saved.unsent.len());
        if incidents + unsent > 0 {
            tracing::warn!(
                file = %path.display(),
                incidents,
                unsent,
                "A pager output the rules do not declare (renamed or removed) left open \
                 incidents and unsent pages: this run resolves and sends none of them. \
                 Declare it again under its old name, paging the same receiver, or \
                 resolve them by hand and delete the file, which stops this warning."
            );
        }
    }
}

fn key_hash(receiver: &str) -> String {
    format!("{:016x}", fnv1a(receiver.as_bytes()))
}

/// What a pager whose file could not be read logs, with the reason.
const NOT_LOADED: &str =
    "Open incidents not loaded; an incident left open before the restart must be resolved by hand.";

/// Why saved incidents were not loaded.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: io::Error },
    #[error("{}: {size} bytes, more than a pager saves ({MAX_FILE})", path.display())]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{}: not saved incidents: {cause}", path.display())]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error(
        "{}: version {version}; this vigil reads versions {WITHOUT_UNSENT} to {VERSION}",
        path.display()
    )]
    Version { path: PathBuf, version: u32 },
}

/// The saved incidents; `None` when nothing was saved yet.
fn read(file: &Path) -> Result<Option<Saved>, LoadError> {
    let path = || file.to_owned();
    let io = |cause| LoadError::Io {
        path: path(),
        cause,
    };
    let size = match std::fs::metadata(file) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    if size > MAX_FILE {
        return Err(LoadError::TooLarge { path: path(), size });
    }
    let bytes = std::fs::read(file).map_err(io)?;
    let saved: Saved = serde_json::from_slice(&bytes).map_err(|cause| LoadError::Json {
        path: path(),
        cause,
    })?;
    if !(WITHOUT_UNSENT..=VERSION).contains(&saved.version) {
        let version = saved.version;
        return Err(LoadError::Version {
            path: path(),
            version,
        });
    }
    Ok(Some(saved))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MICROS_PER_SEC;

    #[test]
    fn pages_are_written_down_within_bounds_the_first_ones() {
        let mut unsent = Unsent::default();
        let small = Event::default();
        let made_by = |n| vec![None; n];
        unsent.add(
            vec![small.clone(); MAX_UNSENT + 5],
            made_by(MAX_UNSENT + 5),
            Generation::default(),
        );
        assert_eq!(
            (unsent.len(), unsent.written()),
            (MAX_UNSENT + 5, MAX_UNSENT)
        );
        assert!(!unsent.has_room(), "the queue keeps the next ones");
        for _ in 0..6 {
            unsent.settled();
        }
        assert_eq!(
            (unsent.len(), unsent.written()),
            (MAX_UNSENT - 1, MAX_UNSENT - 6)
        );
        assert!(
            !unsent.has_room(),
            "until those not written down are settled"
        );
        unsent.take();
        assert_eq!((unsent.len(), unsent.written(), unsent.bytes), (0, 0, 0));
        assert!(unsent.has_room());

        let large = Event {
            description: Some("d".repeat(MAX_UNSENT_BYTES / 3)),
            ..Event::default()
        };
        unsent.add(
            vec![large.clone(), large.clone(), large, small.clone()],
            made_by(4),
            Generation::default(),
        );
        assert_eq!(
            (unsent.len(), unsent.written()),
            (4, 2),
            "by bytes too, in order"
        );
        for _ in 0..4 {
            unsent.settled();
        }
        assert_eq!((unsent.len(), unsent.written(), unsent.bytes), (0, 0, 0));
        unsent.add(vec![small], made_by(1), Generation::default());
        assert_eq!(unsent.written(), 1);
    }

    #[test]
    fn a_page_written_down_is_saved_before_its_first_attempt() {
        let mut unsent = Unsent::default();
        let page = Event::default();
        assert!(!unsent.changed_since_saved());
        unsent.add(
            vec![page.clone(), page.clone()],
            vec![None; 2],
            Generation::default(),
        );
        assert!(
            unsent.oldest(Generation::default()).unwrap().2,
            "not in the file yet"
        );
        assert!(unsent.changed_since_saved());
        let (pages, saving) = unsent.saving();
        assert_eq!(pages.len(), 2);
        unsent.saved(saving);
        assert!(!unsent.oldest(Generation::default()).unwrap().2);
        assert!(!unsent.changed_since_saved());
        unsent.add(vec![page], vec![None], Generation::default());
        unsent.settled();
        assert!(
            !unsent.oldest(Generation::default()).unwrap().2,
            "the second was saved"
        );
        unsent.settled();
        assert!(
            unsent.oldest(Generation::default()).unwrap().2,
            "the third was not"
        );
        assert!(unsent.changed_since_saved());
        let (_, saving) = unsent.saving();
        unsent.saved(saving);
        unsent.settled();
        assert!(unsent.oldest(Generation::default()).is_none());
        assert!(
            unsent.changed_since_saved(),
            "the file still holds the third"
        );
    }

    /// A page left for the next task keeps the work that made it, so that
    /// task releases that work when it delivers the page.
    #[test]
    fn unsent_pages_keep_their_origins_in_order() {
        use super::super::holds::{Holds, Work};
        let holds = Holds::default();
        let page = Event::default();
        let made = |seq| Some(holds.origin(Work::Event { shard: 1, seq }, &page));
        let mut unsent = Unsent::default();
        let origins = vec![made(1), None, made(3)];
        unsent.add(
            vec![page.clone(), page.clone(), page.clone()],
            origins,
            Generation::default(),
        );
        unsent.settled();
        let (left, left_origins) = unsent.take();
        assert_eq!(left.len(), 2);
        assert_eq!(left_origins, [None, made(3)]);
    }

    /// Pages handed over by another receiver's memory go behind those
    /// restored or handed before, ahead of those this memory's tasks took,
    /// and are all written down anew.
    #[test]
    fn handed_pages_go_after_earlier_ones_before_those_tasks_took() {
        let page = |service: &str| Event {
            service: Some(service.into()),
            ..Event::default()
        };
        let mut unsent = Unsent::default();
        unsent.restore(vec![page("restored")]);
        let task = Generation(Generation::HANDED.0 + 1);
        unsent.add(vec![page("taken")], vec![None], task);
        unsent.hand_over(vec![(page("a"), None)], Generation::default());
        unsent.hand_over(vec![(page("b"), None)], Generation::default());
        let order: Vec<_> = (unsent.pages.iter())
            .map(|(e, _, by)| (e.service.clone().unwrap(), by.0))
            .collect();
        let order: Vec<_> = order.iter().map(|(s, by)| (s.as_str(), *by)).collect();
        assert_eq!(
            order,
            [("restored", 0), ("a", 1), ("b", 1), ("taken", task.0)]
        );
        assert_eq!(unsent.written(), 4);
        assert!(unsent.oldest(task).unwrap().2, "saved before its attempt");
        assert_eq!(unsent.in_the_file(), 0);

        // A receiver that came back: its task that paged before left pages,
        // older than the handed ones; the task waiting took newer ones.
        let (paged, waiting) = (task, Generation(task.0 + 1));
        let mut unsent = Unsent::default();
        unsent.add(vec![page("left")], vec![None], paged);
        unsent.add(vec![page("new")], vec![None], waiting);
        unsent.hand_over(vec![(page("handed"), None)], paged);
        let order: Vec<_> = (unsent.pages.iter())
            .map(|(e, _, _)| e.service.clone().unwrap())
            .collect();
        assert_eq!(order, ["left", "handed", "new"]);
    }

    /// As vigil wrote them before unsent pages were kept: still loaded.
    #[tokio::test]
    async fn a_file_without_unsent_pages_loads() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let text = format!(
            r#"{{"version":1,"routing_key_hash":"{}","incidents":[{{"dedup_key":"web1/cpu","severity":"critical","sent":1700000000.5}}]}}"#,
            key_hash("key")
        );
        std::fs::write(&file, text).unwrap();
        let memory = from_file(file, "key", 10).await;
        assert_eq!(keys(&memory), [("web1/cpu".to_owned(), Severity::Critical)]);
        assert_eq!(memory.unsent().len(), 0);
    }

    /// A file holding undelivered pages says version 2, so a vigil that
    /// does not know them refuses it (logged) instead of dropping them
    /// unsaid; one without is version 1, read whole by such a vigil.
    #[tokio::test]
    async fn a_file_is_version_2_only_while_it_holds_unsent_pages() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let version = || -> u64 {
            let text = std::fs::read_to_string(&file).unwrap();
            serde_json::from_str::<serde_json::Value>(&text).unwrap()["version"]
                .as_u64()
                .unwrap()
        };
        let memory = from_file(file.clone(), "key", 10).await;
        memory
            .incidents()
            .triggered("web1/disk".into(), Severity::Critical, 0);
        memory.save().await;
        assert_eq!(version(), 1);
        let page = Event {
            host: Some("web2".into()),
            ..Event::default()
        };
        (memory.unsent()).add(vec![page], vec![None], Generation::default());
        memory.save().await;
        assert_eq!(version(), 2);
        let again = from_file(file.clone(), "key", 10).await;
        assert_eq!(again.unsent().len(), 1, "this vigil reads it back");
        assert_eq!(keys(&again).len(), 1);
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replace(r#""version":2"#, r#""version":3"#)).unwrap();
        let error = read(&file).unwrap_err().to_string();
        assert!(
            error.ends_with("version 3; this vigil reads versions 1 to 2"),
            "{error}"
        );
    }

    /// A save that fails (its temporary file's path taken by a directory
    /// here, a full disk in production) is counted where the output says.
    #[tokio::test]
    async fn a_failed_save_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let mut temp = file.clone().into_os_string();
        temp.push(".tmp");
        std::fs::create_dir_all(PathBuf::from(temp).join("taken")).unwrap();
        let stats = Arc::new(Stats::default());
        let memory = Memory::open("pager", Some(file), "key", 10);
        let memory = Arc::new(memory.counting_failures_in(stats.clone()));
        memory.load().await;
        memory
            .incidents()
            .triggered("web1/disk".into(), Severity::Critical, 0);
        memory.save().await;
        assert_eq!(Stats::get(&stats.state_write_failures), 1);
    }

    /// Pages the file holds are those of the last save that succeeded: a
    /// failed one leaves the earlier pages in it, and adds none.
    #[tokio::test]
    async fn pages_in_the_file_are_those_of_the_last_save_that_succeeded() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let memory = Arc::new(Memory::open("pager", Some(file.clone()), "key", 10));
        memory.load().await;
        let page = |service: &str| Event {
            service: Some(service.into()),
            ..Event::default()
        };
        let generation = memory.next_generation();
        (memory.unsent()).add(vec![page("a")], vec![None], generation);
        assert!(memory.save().await);
        assert_eq!(memory.pages_written_down(), 1);
        let mut temp = file.into_os_string();
        temp.push(".tmp");
        std::fs::create_dir_all(PathBuf::from(temp).join("taken")).unwrap();
        let more = vec![page("b"), page("c")];
        (memory.unsent()).add(more, vec![None; 2], generation);
        assert!(!memory.save().await);
        assert_eq!(memory.pages_written_down(), 1, "a, not b and c");
        memory.unsent().settled();
        assert_eq!(memory.pages_written_down(), 0, "a settled");
    }

    fn keys(memory: &Memory) -> Vec<(String, Severity)> {
        let incidents = memory.incidents();
        incidents
            .oldest_first(memory.now())
            .map(|(key, open, _)| (key.to_owned(), open.severity))
            .collect()
    }

    /// Output `pager`'s memory, with what `file` holds.
    async fn from_file(file: PathBuf, key: &str, max: usize) -> Arc<Memory> {
        let memory = Arc::new(Memory::open("pager", Some(file), key, max));
        memory.load().await;
        memory
    }

    #[tokio::test]
    async fn saved_incidents_load_in_order_with_their_severity_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let memory = from_file(file.clone(), "key", 10).await;
        {
            let mut incidents = memory.incidents();
            let now = memory.now();
            let hour_ago = now - 3600 * MICROS_PER_SEC;
            incidents.triggered("web1/disk".into(), Severity::Critical, hour_ago);
            incidents.triggered("web2/cpu".into(), Severity::Warning, now);
            incidents.triggered("web3/gone".into(), Severity::Error, now);
            incidents.resolved("web2/cpu");
        }
        memory.save().await;

        let loaded = from_file(file.clone(), "key", 10).await;
        assert_eq!(
            keys(&loaded),
            [
                ("web1/disk".to_owned(), Severity::Critical),
                ("web3/gone".to_owned(), Severity::Error)
            ]
        );
        let age = loaded.now() - loaded.incidents().get("web1/disk").unwrap().sent;
        assert!(
            (3599..=3610).contains(&(age / MICROS_PER_SEC)),
            "triggered an hour ago, not {age:?}"
        );
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("\"key\""),
            "the routing key is not saved: {text}"
        );
        // Read once: a later load (the output's next task) keeps what it has.
        std::fs::write(&file, "{").unwrap();
        loaded.load().await;
        assert_eq!(keys(&loaded).len(), 2);
        memory.save().await;

        // Fewer than saved fit: the most recent are kept.
        let small = from_file(file, "key", 1).await;
        assert_eq!(keys(&small), [("web3/gone".to_owned(), Severity::Error)]);
    }

    #[tokio::test]
    async fn another_routing_key_a_bad_file_or_none_start_empty() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        assert!(keys(&*from_file(file.clone(), "key", 10).await).is_empty());

        let memory = from_file(file.clone(), "key", 10).await;
        memory
            .incidents()
            .triggered("web1/disk".into(), Severity::Critical, 0);
        memory.save().await;
        let other = from_file(file.clone(), "another key", 10).await;
        assert!(keys(&other).is_empty());
        assert!(!other.serves("key") && other.serves("another key"));

        for garbage in ["", "{", r#"{"version": 3}"#, "[1, 2]"] {
            std::fs::write(&file, garbage).unwrap();
            assert!(keys(&*from_file(file.clone(), "key", 10).await).is_empty());
        }
        let aside = dir.path().join("pagerduty-pager.json.unreadable");
        let error = read(&aside).unwrap_err().to_string();
        assert!(
            error.contains("pagerduty-pager.json.unreadable: not saved incidents"),
            "{error}"
        );
    }

    /// Which series triggered an incident is saved with it, each with the
    /// severity it fails at: a restart that made the `dedup_key` finer
    /// still tells them from the others, and a lower one's next trigger
    /// still does not page.
    #[tokio::test]
    async fn the_series_that_triggered_an_incident_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let memory = from_file(file.clone(), "key", 10).await;
        {
            let mut incidents = memory.incidents();
            incidents.triggered("web1".into(), Severity::Critical, 0);
            incidents.joined("web1", 7, Severity::Warning);
            incidents.triggered("web1".into(), Severity::Critical, 0);
        }
        assert!(memory.save().await);
        let restarted = from_file(file, "key", 10).await;
        let incidents = restarted.incidents();
        let open = incidents.get("web1").unwrap();
        assert!(open.of(7) && !open.of(8));
        assert_eq!(open.severity, Severity::Critical);
        assert_eq!(open.series().collect::<Vec<_>>(), [(7, Severity::Warning)]);
    }

    /// An incident whose last series' resolve the receiver refused is still
    /// that series' to resolve after a restart: saved with no series
    /// failing, it came back as anyone's, and the `ok` of a series that
    /// never failed in it resolved it.
    #[tokio::test]
    async fn the_series_whose_resolve_was_refused_survives_a_restart() {
        use pager::Action::{Resolve, Trigger};
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let memory = from_file(file.clone(), "key", 10).await;
        let (now, resend) = (0, Duration::from_secs(3600));
        {
            let mut incidents = memory.incidents();
            incidents.sent("web1".into(), 7, Trigger(Severity::Critical), now);
            // Its resolve, never delivered.
            assert!(incidents.needs_sending("web1", 7, Resolve, now, resend));
        }
        assert!(memory.save().await);
        let restarted = from_file(file, "key", 10).await;
        let mut incidents = restarted.incidents();
        let open = incidents.get("web1").unwrap();
        assert!(open.of(7) && !open.of(8));
        assert!(!incidents.needs_sending("web1", 8, Resolve, now, resend));
        assert!(incidents.needs_sending("web1", 7, Resolve, now, resend));
    }

    /// A file that cannot be read holds what an operator must resolve by
    /// hand: the next save must not destroy it.
    #[tokio::test]
    async fn a_file_that_cannot_be_read_is_kept_aside_from_the_next_save() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let cut_short = r#"{"version":1,"routing_key_hash":"0","incidents":[{"dedup_key":"web1/cp"#;
        std::fs::write(&file, cut_short).unwrap();
        let memory = from_file(file.clone(), "key", 10).await;
        assert!(keys(&memory).is_empty());
        memory
            .incidents()
            .triggered("web2/disk".into(), Severity::Critical, 0);
        assert!(memory.save().await);
        let aside = dir.path().join("pagerduty-pager.json.unreadable");
        assert_eq!(std::fs::read_to_string(aside).unwrap(), cut_short);
        assert_eq!(keys(&*from_file(file, "key", 10).await).len(), 1);
    }

    /// A file kept aside for a receiver that cannot be read lists what to
    /// resolve by hand, as the output's own does: the receiver's next save
    /// aside (another one replaced it again) must not destroy it.
    #[tokio::test]
    async fn a_file_kept_aside_that_cannot_be_read_is_not_saved_over() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let aside = kept_aside(&file, &key_hash("k1"));
        let cut_short = r#"{"version":1,"routing_key_hash":"0","incidents":[{"dedup_key":"web1/cp"#;
        std::fs::write(&aside, cut_short).unwrap();
        let first = from_file(file.clone(), "k1", 10).await;
        assert!(keys(&first).is_empty());
        first
            .incidents()
            .triggered("web2/disk".into(), Severity::Critical, 0);
        let second = Arc::new(first.replaced_by("k2"));
        second.load().await;
        assert!(first.save().await);
        let unreadable = dir.path().join(format!(
            "pagerduty-pager.{}.json.unreadable",
            key_hash("k1")
        ));
        assert_eq!(
            std::fs::read_to_string(&unreadable).ok().as_deref(),
            Some(cut_short)
        );
        let back = from_file(aside, "k1", 10).await;
        assert_eq!(keys(&back), [("web2/disk".to_owned(), Severity::Critical)]);
    }

    /// A reload replaced the receiver; the previous one's task, draining,
    /// resolved its incident; vigil stopped before the new receiver saved
    /// the file (a crash, a second signal). The next run must not take the
    /// file's older incident back as open: a new trigger of that series
    /// would be suppressed as already sent.
    #[tokio::test]
    async fn what_a_replaced_receiver_resolved_stays_resolved_when_the_file_is_still_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let first = from_file(file.clone(), "k1", 10).await;
        first
            .incidents()
            .triggered("web1/disk".into(), Severity::Critical, 0);
        assert!(first.save().await);
        let second = Arc::new(first.replaced_by("k2"));
        second.load().await;
        first.incidents().resolved("web1/disk");
        assert!(first.save().await);

        let restarted = from_file(file.clone(), "k2", 10).await;
        assert!(keys(&restarted).is_empty());
        assert!(restarted.save().await);
        let back = from_file(file, "k1", 10).await;
        assert!(keys(&back).is_empty(), "resolved before the restart");
    }

    /// The new receiver saves the file while the one it replaced still
    /// holds a page (its task, stopping, waits on a receiver that does not
    /// answer): the file keeps that page too, ahead of the new one's, so a
    /// crash or a second signal before the handover loses neither.
    #[tokio::test]
    async fn pages_the_replaced_receiver_still_holds_stay_in_the_file_the_new_one_saves() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let first = from_file(file.clone(), "k1", 10).await;
        let page = |service: &str| Event {
            service: Some(service.into()),
            state: Some("critical".into()),
            ..Event::default()
        };
        let generation = first.next_generation();
        (first.unsent()).add(vec![page("disk")], vec![None], generation);
        assert!(first.save().await);
        let second = Arc::new(first.replaced_by("k2"));
        second.load().await;
        let generation = second.next_generation();
        (second.unsent()).add(vec![page("mem")], vec![None], generation);
        assert!(second.save().await);

        let restarted = from_file(file, "k2", 10).await;
        let services: Vec<_> = (restarted.unsent().pages.iter())
            .map(|(event, _, _)| event.service.clone().unwrap())
            .collect();
        assert_eq!(services, ["disk", "mem"]);

        // Back to the first receiver, then to a third, before any task
        // stopped: each replaced the other.
        first.takes_over_from(&second);
        let third = Arc::new(first.replaced_by("k3"));
        third.load().await;
        assert!(third.save().await);
        let restarted = from_file(file_in(dir.path(), "pager"), "k3", 10).await;
        assert_eq!(restarted.pages_held(), 2, "disk and mem, once each");
    }

    /// Pages a replaced receiver's task handed to the new one are in the
    /// output's file until the new one saves them: the replaced one's saves
    /// meanwhile leave them there.
    #[tokio::test]
    async fn pages_handed_to_the_new_receiver_stay_in_the_file_until_it_saves_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let first = from_file(file.clone(), "k1", 10).await;
        let page = Event {
            service: Some("disk".into()),
            state: Some("critical".into()),
            ..Event::default()
        };
        let generation = first.next_generation();
        (first.unsent()).add(vec![page], vec![None], generation);
        assert!(first.save().await);
        let second = Arc::new(first.replaced_by("k2"));
        second.load().await;
        let (pages, origins) = first.unsent().take();
        second.hand_over(pages.into_iter().zip(origins).collect());
        assert!(first.save().await);

        let restarted = from_file(file, "k2", 10).await;
        assert_eq!(restarted.pages_held(), 1, "the handed page, from the file");
    }

    /// A file kept aside for the receiver whose the output's file is (a
    /// crash before the receiver that came back saved) is older than that
    /// file: gone with its next save, or a later run would open again what
    /// it lists.
    #[tokio::test]
    async fn a_file_kept_aside_older_than_the_receivers_own_is_removed_by_its_next_save() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let own = from_file(file.clone(), "k1", 10).await;
        assert!(own.save().await);
        let stale = from_file(kept_aside(&file, &key_hash("k1")), "k1", 10).await;
        stale
            .incidents()
            .triggered("web1/cpu".into(), Severity::Critical, 0);
        assert!(stale.save().await);

        let restarted = from_file(file.clone(), "k1", 10).await;
        assert!(keys(&restarted).is_empty());
        assert!(restarted.save().await);
        assert!(!kept_aside(&file, &key_hash("k1")).exists());
    }

    /// A reload that changed the routing key: the retiring task, still
    /// draining, must not overwrite the new key's incidents.
    #[tokio::test]
    async fn a_replaced_memory_no_longer_saves_over_its_successor() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let first = from_file(file.clone(), "k1", 10).await;
        let now = 0;
        first
            .incidents()
            .triggered("web1/disk".into(), Severity::Critical, now);
        let second = Arc::new(first.replaced_by("k2"));
        assert!(keys(&second).is_empty() && second.serves("k2"));
        second
            .incidents()
            .triggered("web2/cpu".into(), Severity::Warning, now);
        second.save().await;
        first
            .incidents()
            .triggered("web3/gone".into(), Severity::Error, now);
        first.save().await;

        let loaded = from_file(file, "k2", 10).await;
        assert_eq!(keys(&loaded), [("web2/cpu".to_owned(), Severity::Warning)]);
    }

    /// A key changed and changed back: the first key's memory saves again,
    /// and its successor no longer does.
    #[tokio::test]
    async fn a_memory_whose_key_came_back_takes_the_file_over_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let first = from_file(file.clone(), "k1", 10).await;
        let now = 0;
        first
            .incidents()
            .triggered("web1/disk".into(), Severity::Critical, now);
        first.save().await;
        let second = Arc::new(first.replaced_by("k2"));
        second.save().await;
        assert!(!from_file(file.clone(), "k1", 10).await.has_open());

        first.takes_over_from(&second);
        first.save().await;
        second
            .incidents()
            .triggered("web2/cpu".into(), Severity::Warning, now);
        second.save().await;
        let loaded = from_file(file, "k1", 10).await;
        assert_eq!(
            keys(&loaded),
            [("web1/disk".to_owned(), Severity::Critical)]
        );
        assert!(first.has_open() && second.has_open());
    }

    /// A reload changed the key before the first task had read the file
    /// (right after a start): the file is read under the key it was saved
    /// with before the new key's memory saves over it, and what it held
    /// comes back with that key.
    #[tokio::test]
    async fn a_key_changed_before_the_file_was_read_reads_it_under_the_previous_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let before_the_restart = from_file(file.clone(), "k1", 10).await;
        before_the_restart
            .incidents()
            .triggered("web1/disk".into(), Severity::Critical, 0);
        before_the_restart.save().await;

        let first = Arc::new(Memory::open("pager", Some(file.clone()), "k1", 10));
        let second = Arc::new(first.replaced_by("k2"));
        assert!(!first.is_loaded() && !second.is_loaded());
        second.load().await;
        assert!(first.is_loaded() && second.is_loaded());
        assert!(keys(&second).is_empty());
        let web1_disk = [("web1/disk".to_owned(), Severity::Critical)];
        assert_eq!(keys(&first), web1_disk);
        second.save().await;

        first.takes_over_from(&second);
        first.clone().resume().await;
        assert_eq!(keys(&*from_file(file, "k1", 10).await), web1_disk);
    }

    #[test]
    fn file_names_stay_in_the_directory() {
        let dir = Path::new("/data");
        assert_eq!(
            file_in(dir, "pager"),
            Path::new("/data/pagerduty-pager.json")
        );
        assert_eq!(
            file_in(dir, "../../etc/x"),
            Path::new("/data/pagerduty-______etc_x.json")
        );
    }

    /// Files kept aside for a receiver belong to their output's file: the
    /// start's warning of undeclared outputs' files passes them by.
    #[test]
    fn a_file_kept_aside_belongs_to_its_outputs_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_in(dir.path(), "pager");
        let aside = kept_aside(&file, &key_hash("k1"));
        assert_eq!(
            aside,
            dir.path()
                .join(format!("pagerduty-pager.{}.json", key_hash("k1")))
        );
        assert_eq!(kept_for(&aside), file);
        assert_eq!(kept_for(&file), file);
        let other = dir.path().join("pagerduty-pager.notahash.json");
        assert_eq!(kept_for(&other), other);
    }
}
