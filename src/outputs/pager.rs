//! Paging, whatever the receiver: `critical` and `warning` trigger an
//! incident of that severity, `expired` triggers one of severity `error` (a
//! silent host is an incident), `ok` resolves it; other states are not paged
//! (skipped). What goes on the wire is the receiver's: PagerDuty's Events API
//! v2 ([`super::pagerduty`]) or a paging webhook's JSON ([`super::webhook`]).
//!
//! One incident per host and service: the dedup key is derived from them
//! unless the `dedup_key` template says otherwise, so the resolve closes the
//! incident the trigger opened. Derived, it is `host/service` with `%` and `/`
//! escaped in the host, so the first `/` ends the host and two series never
//! share a key; a host without either keeps the key it had before the
//! escaping (and its open incidents across that upgrade).
//!
//! Paging hygiene ([`super::hygiene`], which `vigil test`'s [`Pages`] runs
//! too), from the incidents this output triggered and has not resolved
//! (kept across reloads and, with a data directory, restarts: see
//! [`super::incidents`]):
//! - a trigger for an open incident is re-sent at most every
//!   `resend_interval`, unless its severity changed; one below the highest
//!   severity failing in an incident several series share is not sent; a
//!   suppressed one counts as skipped (the receiver already has it);
//! - a resolve is sent only for an incident vigil triggered, once every
//!   series that triggered it has cleared (several share one under a
//!   `dedup_key` such as `{host}`); a suppressed one counts as skipped too,
//!   as nothing needed sending. One the receiver refuses leaves the
//!   incident open, to the `ok` of the series that sent it, and to the
//!   last `ok` of a series failing in it since.
//!
//! An incident opened under the `dedup_key` of an earlier declaration (a
//! reload or a restart changed the template) keeps its key until it
//! resolves.
//!
//! They are bounded ([`MAX_OPEN`], and as many series failing in them
//! together); beyond it the least recently triggered incident is forgotten. A page is retried for as long as the process runs
//! (see [`super::http::RetryPolicy::pager`]); with a data directory, the pages
//! not delivered when it stops (or crashes) are sent first by the next run.
//! When a reload (or a restart) changed the receiver, the next run is the
//! new receiver's: it is sent the latest of them for each series (`handed`).
//! In a cluster, each undelivered page holds the work that made it
//! ([`super::holds`]), so the shard's next owner makes and sends it again;
//! once the shard is another node's, it is skipped here before its next
//! attempt, and an attempt in flight is cut at the shard's local lease
//! deadline, before another node can take the shard and page it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::holds::{Holds, Origin};
use super::http::{self, Outcome, Payload, Poster, RetryPolicy};
use super::hygiene::Incidents;
use super::incidents::{Generation, Memory};
use super::template::Template;
use super::{Delivery, Tally};
use super::{pagerduty, webhook};
use crate::clock::{Clock, Micros, SystemClock};
use crate::event::Event;
use crate::limits::start_of;

/// How often an open incident's trigger may be re-sent, by default.
pub const DEFAULT_RESEND_INTERVAL: Duration = Duration::from_secs(3600);

/// Open incidents remembered at most, and series failing in them together.
pub const MAX_OPEN: usize = 100_000;

/// PagerDuty's limits on the dedup key and the summary, kept for every
/// receiver: a key or a summary is for people to read.
const MAX_DEDUP_KEY: usize = 255;
pub(super) const MAX_SUMMARY: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub url: String,
    /// By default derived from host and service.
    pub dedup_key: Option<Template>,
    pub resend_interval: Duration,
    pub api: Api,
}

/// What the receiver at `url` speaks.
#[derive(Debug, Clone, PartialEq)]
pub enum Api {
    /// PagerDuty Events API v2.
    PagerDuty { routing_key: String },
    /// A paging webhook: each page is a JSON POST with these headers.
    Webhook { headers: BTreeMap<String, String> },
}

impl Config {
    /// Whether one incident may gather series of several hosts (a
    /// `dedup_key` that does not name `{host}`). In a cluster each node owns
    /// some hosts and keeps only their part of such an incident: it may
    /// resolve it while another node's host still fails.
    pub fn spans_hosts(&self) -> bool {
        (self.dedup_key.as_ref()).is_some_and(|key| !key.fields().any(|field| field == "host"))
    }

    /// The output type that declares it in a rule file.
    pub fn type_name(&self) -> &'static str {
        match self.api {
            Api::PagerDuty { .. } => "pagerduty",
            Api::Webhook { .. } => "paging_webhook",
        }
    }

    /// Who holds this output's incidents: one opened through another
    /// receiver cannot be resolved through this one. For PagerDuty the
    /// routing key (the URL may be a proxy's), for a webhook its URL.
    pub fn receiver(&self) -> &str {
        match &self.api {
            Api::PagerDuty { routing_key } => routing_key,
            Api::Webhook { .. } => &self.url,
        }
    }
}

/// What an event asks of the receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Trigger(Severity),
    Resolve,
}

/// PagerDuty's severities vigil sends, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Severity {
    Warning,
    Error,
    Critical,
}

impl Severity {
    pub(super) const COUNT: usize = 3;
    pub(super) const ALL: [Severity; Severity::COUNT] =
        [Severity::Warning, Severity::Error, Severity::Critical];

    /// Its place in [`Severity::ALL`].
    pub(super) fn rank(self) -> usize {
        self as usize
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// The state mapping; `None` for states that are not paged.
fn action(state: Option<&str>) -> Option<Action> {
    match state? {
        "critical" => Some(Action::Trigger(Severity::Critical)),
        "warning" => Some(Action::Trigger(Severity::Warning)),
        crate::event::STATE_EXPIRED => Some(Action::Trigger(Severity::Error)),
        "ok" => Some(Action::Resolve),
        _ => None,
    }
}

/// Pages for each queued event until shutdown, then for what is already
/// queued. `memory` holds the incidents open so far (from an earlier task of
/// this output, or saved before a restart) and the pages not yet settled,
/// which it saves as they change. A page's origin stays in `holds` until it
/// is settled.
pub async fn run(
    memory: Arc<Memory>,
    holds: Arc<Holds>,
    config: Config,
    mut delivery: Delivery,
    retry: RetryPolicy,
    shutdown: CancellationToken,
) {
    let setup = match &config.api {
        Api::PagerDuty { .. } => Ok(HeaderMap::new()),
        Api::Webhook { headers } => http::header_map(headers),
    }
    .and_then(|headers| Ok((headers, Poster::new(retry, shutdown.clone())?)));
    let (headers, poster) = match setup {
        Ok(ready) => ready,
        Err(error) => return http::refuse_all(delivery, shutdown, error).await,
    };
    // Before any page: a resolve is sent only for an incident it holds.
    memory.load().await;
    memory.declared_dedup_key(&config.dedup_key);
    let generation = memory.next_generation();
    let mut saves = Saves::default();
    // After the output's previous task (a reload's), which may leave pages;
    // those this one takes meanwhile are written down behind them.
    let _turn = {
        let turn = memory.turn_to_page();
        tokio::pin!(turn);
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                turn = &mut turn => break turn,
                taken = delivery.next_batch(http::BATCH), if open && memory.unsent().has_room() => {
                    open = keep_taken(&memory, &mut delivery, taken, generation, &mut saves);
                }
                () = saves.due(), if saves.pending() => saves.save(&memory).await,
            }
        }
    };
    memory.took_turn(generation);
    let mut pager = Pager {
        memory,
        holds,
        poster,
        headers,
        config,
        generation,
        saves,
    };
    pager.take_pages_left_to_replaced(&delivery).await;
    let (left, restored) = {
        let mut unsent = pager.memory.unsent();
        let left = unsent.left_before(generation);
        (left, unsent.adopt_restored(generation))
    };
    if left > 0 {
        let output = &delivery.name;
        tracing::warn!(
            output,
            pages = left,
            "Pages left undelivered by the output's previous run; sending them first."
        );
    }
    // Those a task of this process left are in the counters already.
    delivery.adopt(restored);
    let stopped = pager.page_in_order(&mut delivery, &shutdown).await;
    let memory = pager.memory.clone();
    pager.stop(delivery, stopped).await;
    if memory.save_failed() {
        // Stopped (a reload removed it) with its file unwritable: tried on
        // as this task would have, or a crash would leave the file as last
        // written. A declaration of it again saves as well; vigil's stop
        // tries once more itself.
        tokio::spawn(save_until_saved(memory));
    }
}

/// Saves `memory` at the waits of [`Saves`] until a save (this one's or
/// another's) succeeds.
async fn save_until_saved(memory: Arc<Memory>) {
    let mut wait = None;
    while memory.save_failed() {
        let next = next_save_retry(wait);
        tokio::time::sleep(next).await;
        memory.save().await;
        wait = Some(next);
    }
}

/// The wait before the next try of a failing save, after `last`'s.
fn next_save_retry(last: Option<Duration>) -> Duration {
    last.map_or(SAVE_RETRY, |wait| (wait * 2).min(SAVE_RETRY_MAX))
}

/// Why [`Pager::page_in_order`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// Every page was settled and the queue is done.
    Done,
    /// A last attempt while stopping failed: the receiver is down, and what
    /// is held is left to the next run.
    GaveUp,
}

/// How soon pages taken from the queue while another is being sent, and
/// pages settled, are saved: a crash meanwhile loses those taken since, and
/// sends again those settled since.
const SAVE_WITHIN: Duration = Duration::from_millis(100);

/// When the pages taken or settled since the last save are written down:
/// within [`SAVE_WITHIN`] of the first change, or, when saving takes long (a
/// file of thousands of pages), within ten times the last save's length, so
/// a flood does not spend its time rewriting the file.
#[derive(Default)]
struct Saves {
    due_at: Option<Instant>,
    last_took: Duration,
    /// How long after a failed save the next is tried: doubling from
    /// [`SAVE_RETRY`] while they fail (a full disk), up to [`SAVE_RETRY_MAX`].
    retry: Option<Duration>,
}

/// The first wait after a failed save.
const SAVE_RETRY: Duration = Duration::from_secs(1);
const SAVE_RETRY_MAX: Duration = Duration::from_secs(30);

impl Saves {
    /// Something changed: a save is due, if none is yet.
    fn changed(&mut self) {
        let within = SAVE_WITHIN.max(self.last_took * 10);
        self.due_at.get_or_insert(Instant::now() + within);
    }

    fn pending(&self) -> bool {
        self.due_at.is_some()
    }

    fn is_due(&self) -> bool {
        self.due_at.is_some_and(|at| Instant::now() >= at)
    }

    /// Resolves when the pending save is due (at once if none is).
    async fn due(&self) {
        tokio::time::sleep_until(self.due_at.unwrap_or_else(Instant::now)).await;
    }

    /// Saves now; a save that fails is tried again later, however long
    /// nothing else changes: an incident the file misses would be left open
    /// by a restart.
    async fn save(&mut self, memory: &Arc<Memory>) {
        self.due_at = None;
        let started = Instant::now();
        let saved = memory.save().await;
        self.last_took = started.elapsed();
        self.retry = (!saved).then(|| next_save_retry(self.retry));
        if let Some(wait) = self.retry {
            self.due_at = Some(Instant::now() + wait);
        }
    }
}

/// Writes down a batch the task of `generation` took from the queue, behind
/// the pages held (`None`: the queue has closed); whether the queue is
/// still open.
fn keep_taken(
    memory: &Memory,
    delivery: &mut Delivery,
    taken: Option<Vec<Event>>,
    generation: Generation,
    saves: &mut Saves,
) -> bool {
    let Some(batch) = taken else {
        return false;
    };
    memory
        .unsent()
        .add(batch, delivery.take_origins(), generation);
    saves.changed();
    true
}

struct Pager {
    config: Config,
    poster: Poster,
    memory: Arc<Memory>,
    holds: Arc<Holds>,
    /// Checked once, sent with every page.
    headers: HeaderMap,
    /// This task's place among the output's tasks: it sends the pages of
    /// its own and of earlier ones.
    generation: Generation,
    saves: Saves,
}

impl Pager {
    /// Pages the pages held, oldest first, each settled before the next (a
    /// page may wait for its receiver as long as the process runs), while
    /// taking the queue's pages in behind them and saving those: a crash
    /// loses none written down, wherever it strikes. A page is saved before
    /// its first attempt.
    async fn page_in_order(
        &mut self,
        delivery: &mut Delivery,
        shutdown: &CancellationToken,
    ) -> Stopped {
        let memory = self.memory.clone();
        let generation = self.generation;
        let tally = delivery.tally();
        let mut open = true;
        // The pending save outlives each page: pages quicker than
        // SAVE_WITHIN would otherwise put it off for ever.
        let mut saves = std::mem::take(&mut self.saves);
        loop {
            let oldest = memory.unsent().oldest(generation);
            let Some((event, origin, unsaved)) = oldest else {
                if memory.unsent().changed_since_saved() {
                    saves.save(&memory).await;
                }
                let batch = tokio::select! {
                    biased;
                    batch = http::next_batch(delivery, shutdown) => batch,
                    // A failed save, tried again while nothing comes.
                    () = saves.due(), if saves.pending() => {
                        saves.save(&memory).await;
                        continue;
                    }
                };
                let Some(batch) = batch else {
                    return Stopped::Done;
                };
                memory
                    .unsent()
                    .add(batch, delivery.take_origins(), generation);
                continue;
            };
            if unsaved || saves.is_due() {
                saves.save(&memory).await;
            }
            {
                let page = self.page(&tally, &event, origin);
                tokio::pin!(page);
                loop {
                    tokio::select! {
                        biased;
                        () = &mut page => break,
                        taken = delivery.next_batch(http::BATCH),
                            if open && memory.unsent().has_room() =>
                        {
                            open = keep_taken(&memory, delivery, taken, generation, &mut saves);
                        }
                        () = saves.due(), if saves.pending() => saves.save(&memory).await,
                    }
                }
            }
            if self.poster.gave_up() {
                return Stopped::GaveUp;
            }
            memory.unsent().settled();
            // Settled pages leave the file too: one delivered before a crash
            // is sent again only if it settled within the last save's wait.
            saves.changed();
            self.release(origin);
        }
    }

    /// After the last page: what is still held is left to the next run (a
    /// reload's next task takes it all, a restart what was written down),
    /// in flight in the output's counters meanwhile: a process that stops
    /// counts it dropped then. Pages for a receiver a reload replaced are
    /// handed to the new receiver (see [`handed`]).
    async fn stop(self, mut delivery: Delivery, stopped: Stopped) {
        let output = delivery.name.clone();
        if stopped == Stopped::GaveUp {
            // Queued behind: lost with the queue unless held.
            while let Some(batch) = delivery.next_batch(http::BATCH).now_or_never().flatten() {
                let origins = delivery.take_origins();
                self.memory.unsent().add(batch, origins, self.generation);
            }
        }
        if self.memory.is_replaced() {
            // Its incidents, kept aside for when that receiver comes back.
            self.memory.save().await;
            let (pages, origins) = {
                let mut unsent = self.memory.unsent();
                delivery.adopt(unsent.adopt_restored(self.generation));
                unsent.take()
            };
            if pages.is_empty() {
                return self.poster.finish(&output);
            }
            let Some(next) = self.memory.successor() else {
                // No receiver to take them (none declared by this process
                // since: cannot happen through a reload).
                origins.into_iter().for_each(|origin| self.release(origin));
                let dropped = pages.len();
                tracing::error!(
                    output,
                    dropped,
                    "Pages undelivered to the previous receiver (routing key or URL), which a \
                     reload replaced; no receiver to hand them to: dropped."
                );
                delivery.dropped(dropped);
                return self.poster.finish(&output);
            };
            let made = pages.into_iter().zip(origins).collect();
            let (handed, superseded) = handed(made, self.config.dedup_key.as_ref());
            superseded.iter().for_each(|origin| self.release(*origin));
            // Nothing to send: a later page of the same series says it all.
            delivery.skipped(superseded.len());
            tracing::warn!(
                output,
                handed = handed.len(),
                superseded = superseded.len(),
                "Pages undelivered to the previous receiver (routing key or URL), which a \
                 reload replaced: handed to the new receiver, which sends them first, the \
                 latest page of each series."
            );
            // In flight in the counters all declarations share, until the
            // new receiver's task settles them.
            next.hand_over(handed);
            next.save().await;
            return self.poster.finish(&output);
        }
        // Its own: a later declaration's pages are that one's to count.
        let kept = self.memory.unsent().taken_until(self.generation);
        if kept == 0 {
            // A save that failed and had yet to be tried again: its last
            // try here (shutdown's own, should this one fail, comes after).
            if self.memory.save_failed() {
                self.memory.save().await;
            }
            return self.poster.finish(&output);
        }
        self.memory.save().await;
        if stopped == Stopped::Done {
            // Behind a page a reload's new declaration took while this one
            // was sending: that one sends them, in order.
            tracing::info!(
                output,
                pages = kept,
                "Pages handed to the output's new declaration."
            );
            return self.poster.finish(&output);
        }
        // Lost at a restart: those not in the file (none are when it could
        // not be written).
        let written = self.memory.pages_written_down();
        let unwritten = kept - written.min(kept);
        if unwritten == 0 {
            tracing::warn!(
                output,
                kept,
                written,
                "Pages undelivered when the output stopped: the receiver was failing. They are \
                 sent first by its next run: after a reload that redeclares it, or a restart."
            );
        } else {
            tracing::error!(
                output,
                kept,
                written,
                "Pages undelivered when the output stopped: the receiver was failing. They are \
                 sent first by its next run: all of them after a reload that redeclares it, those \
                 written down after a restart with a data directory."
            );
        }
    }

    /// A page made by `origin` is settled or dropped: the work is not held
    /// for it any more.
    /// The pages left undelivered in the memory of the receiver this one
    /// replaced, by a task that stopped before the replacement (see
    /// [`Memory::replaced_memory`]): handed to this one first, as that task
    /// would have handed them ([`handed`]). With this one's turn to page,
    /// every task of that memory has stopped.
    async fn take_pages_left_to_replaced(&mut self, delivery: &Delivery) {
        let Some(previous) = self.memory.replaced_memory() else {
            return;
        };
        let (handed, superseded, restored) = previous.take_for_successor(self.generation);
        // Read from the file, never counted by a task of this process.
        delivery.adopt(restored);
        if handed.is_empty() && superseded.is_empty() {
            return;
        }
        superseded.iter().for_each(|origin| self.release(*origin));
        delivery.skipped(superseded.len());
        tracing::warn!(
            output = %delivery.name,
            handed = handed.len(),
            superseded = superseded.len(),
            "Pages undelivered to the previous receiver (routing key or URL) when a reload \
             removed the output: sent to this receiver first, the latest page of each series."
        );
        self.memory.hand_over(handed);
        self.memory.save().await;
    }

    fn release(&self, origin: Option<Origin>) {
        if let Some(origin) = origin {
            self.holds.release(origin);
        }
    }

    /// Sends (or suppresses) one event's page, made by `origin`, and settles
    /// it in `delivery`; a delivered page opens, re-sends or resolves its
    /// incident. A page of a shard this node no longer owns is skipped before
    /// its next attempt, and an attempt in flight is cut at the shard's lease
    /// deadline: the shard's new owner sends it.
    async fn page(&mut self, delivery: &Tally, event: &Event, origin: Option<Origin>) {
        let Some(action) = action(event.state.as_deref()) else {
            let state = event.state.as_deref();
            tracing::debug!(output = %delivery.name, ?state, "State not paged; event skipped.");
            delivery.skipped(1);
            return;
        };
        let key = open_key(&self.config, &self.memory, event);
        let (series, now) = (series_hash(event), self.memory.now());
        let resend = self.config.resend_interval;
        let needed = (self.memory.incidents()).needs_sending(&key, series, action, now, resend);
        if !needed {
            tracing::debug!(output = %delivery.name, dedup_key = %key, ?action, "Page suppressed.");
            delivery.skipped(1);
            return;
        }
        let body = self.body(action, &key, event);
        let holds = &self.holds;
        let ours = || origin.map_or_else(http::always, |origin| holds.time_left(origin));
        let payload = Payload {
            url: &self.config.url,
            content_type: "application/json",
            headers: &self.headers,
            body: Bytes::from(body.to_string()),
            wanted: &ours,
        };
        let outcome = match self.config.api {
            // PagerDuty's limit is known: the trigger is already within it.
            Api::PagerDuty { .. } => self.poster.post(delivery, &payload).await,
            Api::Webhook { .. } => {
                let cut = || {
                    let page = webhook::page(action, &key, &webhook::cut_short(event));
                    Bytes::from(page.to_string())
                };
                self.poster.post_or_cut(delivery, &payload, cut).await
            }
        };
        if outcome == Outcome::Unwanted {
            tracing::info!(
                output = %delivery.name, dedup_key = %key, ?action,
                "Page skipped unsent: its shard moved to another node, which sends it."
            );
        }
        if outcome != Outcome::Delivered {
            return;
        }
        self.memory.incidents().sent(key, series, action, now);
    }

    fn body(&self, action: Action, key: &str, event: &Event) -> Value {
        match (&self.config.api, action) {
            (Api::PagerDuty { routing_key }, Action::Trigger(severity)) => {
                pagerduty::trigger(routing_key, key, severity, event)
            }
            (Api::PagerDuty { routing_key }, Action::Resolve) => {
                pagerduty::resolve(routing_key, key)
            }
            (Api::Webhook { .. }, action) => webhook::page(action, key, event),
        }
    }
}

/// What a new receiver is handed of the pages its predecessor (a reload or a
/// restart changed the routing key or URL) did not deliver, each with what
/// made it: the latest paged page of each series (by dedup key, as
/// `template` made it, and by host and service within an incident the
/// template shares between series), in their order; and the origins of the
/// others, which a later page of their series supersedes (or that page no
/// state).
///
/// The new receiver has none of the old one's incidents. So:
/// - a series whose latest page is a trigger is an incident still on: the
///   new receiver gets one trigger for it, at its latest severity, whether
///   or not the old receiver had opened it (an escalation of an incident
///   open there is, for the new receiver, a new incident); its later `ok`
///   resolves it there. Without it nobody would be paged for the incident:
///   the rules do not page a series again while its state stays.
/// - a series whose latest page is a resolve is over: its earlier trigger
///   is not sent (paging someone for what has already cleared only wakes
///   them to find nothing), and the resolve is sent only if the receiver
///   has that incident open (one that came back with its incidents);
///   otherwise the hygiene skips it. An incident open at the old receiver
///   stays open there, kept aside, resolved should it come back.
pub(super) fn handed<T: Copy>(
    made: Vec<(Event, T)>,
    template: Option<&Template>,
) -> (Vec<(Event, T)>, Vec<T>) {
    // By series within an incident: one the template shares between series
    // is still on while any of them is.
    let keys: Vec<Option<(String, u64)>> = made
        .iter()
        .map(|(event, _)| {
            action(event.state.as_deref()).map(|_| (key_from(template, event), series_hash(event)))
        })
        .collect();
    let mut latest: HashMap<&(String, u64), usize> = HashMap::new();
    for (at, key) in keys.iter().enumerate() {
        if let Some(key) = key {
            latest.insert(key, at);
        }
    }
    let mut handed = Vec::with_capacity(latest.len());
    let mut superseded = Vec::new();
    for (at, page) in made.into_iter().enumerate() {
        let last = keys[at].as_ref().is_some_and(|key| latest[key] == at);
        if last {
            handed.push(page);
        } else {
            superseded.push(page.1);
        }
    }
    (handed, superseded)
}

/// The pages a pager output would send for the events it is given, on the
/// caller's clock: what `vigil test` records for a pager output, so that
/// `expect pager {…}` sees pages, not events.
pub struct Pages {
    config: Config,
    /// The incidents it opened, on the caller's clock.
    open: Incidents,
}

impl Pages {
    pub fn new(config: Config) -> Pages {
        Pages {
            config,
            open: Incidents::new(MAX_OPEN),
        }
    }

    /// Whether `event`, handed to the output at `now`, is sent as a page;
    /// one that is opens or resolves its incident, by the output's hygiene.
    pub fn sends(&mut self, event: &Event, now: Micros) -> bool {
        let Some(action) = action(event.state.as_deref()) else {
            return false;
        };
        let (key, series) = (dedup_key(&self.config, event), series_hash(event));
        let resend = self.config.resend_interval;
        let needed = (self.open).needs_sending(&key, series, action, now, resend);
        if needed {
            self.open.sent(key, series, action, now);
        }
        needed
    }
}

/// The series of `event`, for [`Open::of`](super::hygiene::Open::of): its derived key's hash.
fn series_hash(event: &Event) -> u64 {
    fnv1a(derived_key(event.host_str(), event.service_str()).as_bytes())
}

/// The template's key, or `host/service` when there is none (or it renders
/// empty, which PagerDuty would refuse).
fn dedup_key(config: &Config, event: &Event) -> String {
    key_from(config.dedup_key.as_ref(), event)
}

/// The key `template` gives `event`, derived as [`dedup_key`]'s.
fn key_from(template: Option<&Template>, event: &Event) -> String {
    let custom = template.map(|t| t.render(event));
    let key = custom
        .filter(|key| !key.is_empty())
        .unwrap_or_else(|| derived_key(event.host_str(), event.service_str()));
    bounded_key(key)
}

/// `host/service`, with `%` and `/` percent-escaped in the host: unescaped,
/// host `a/b` with service `c` and host `a` with service `b/c` would share
/// an incident, one's `ok` resolving the other's.
fn derived_key(host: &str, service: &str) -> String {
    let mut key = String::with_capacity(host.len() + service.len() + 1);
    for c in host.chars() {
        match c {
            '%' => key.push_str("%25"),
            '/' => key.push_str("%2F"),
            c => key.push(c),
        }
    }
    key.push('/');
    key.push_str(service);
    key
}

/// The event's dedup key; unless the incident open under it is not the
/// series' but one is under the key an earlier declaration's `dedup_key`
/// gives it (a reload changed the template): that incident keeps its key
/// until it resolves, or its `ok` would resolve nothing. Another series may
/// have opened the new key's since (`{host}` after `host/service`).
fn open_key(config: &Config, memory: &Memory, event: &Event) -> String {
    let key = dedup_key(config, event);
    let series = series_hash(event);
    let incidents = memory.incidents();
    if incidents.get(&key).is_some_and(|open| open.of(series)) {
        return key;
    }
    // Under the incidents' lock, as `Memory::save` takes them.
    let templates = memory.dedup_keys();
    let earlier = templates.iter().rev().filter(|t| **t != config.dedup_key);
    // Only by a series that triggered it: another one the earlier template
    // merged into it is an incident of its own now.
    earlier
        .map(|template| key_from(template.as_ref(), event))
        .find(|earlier| incidents.get(earlier).is_some_and(|open| open.of(series)))
        .unwrap_or(key)
}

/// What a pager output keeps of a page it must not send: one the rules made
/// again while a cluster node replays a shard it took over, which the
/// previous owner already sent. The incident it opened or resolved is
/// remembered all the same, so the new owner resolves what the previous one
/// opened (and does not page it again within the resend interval).
pub struct Replayed {
    config: Config,
    memory: Arc<Memory>,
}

impl Replayed {
    pub fn new(config: Config, memory: Arc<Memory>) -> Replayed {
        Replayed { config, memory }
    }

    /// Called on the rules' thread, in the order the pages were made. Each
    /// goes through the output's hygiene, as the previous owner's did (a
    /// repeat it suppressed was not sent), at the time its event was made:
    /// when the previous owner sent it, not when it is replayed.
    pub fn remember(&self, event: &Event) {
        let Some(action) = action(event.state.as_deref()) else {
            return;
        };
        let key = open_key(&self.config, &self.memory, event);
        let made = made_at(event.time, self.memory.now());
        let series = series_hash(event);
        let resend = self.config.resend_interval;
        let mut open = self.memory.incidents();
        if open.needs_sending(&key, series, action, made, resend) {
            open.sent(key, series, action, made);
        }
    }
}

/// When on the incidents' clock, `now` on it, a page made at `time` (the
/// event's, on the wall clock) was sent: as long ago as `time` is; now if
/// it is to come.
fn made_at(time: Micros, now: Micros) -> Micros {
    now.saturating_sub(SystemClock.now().saturating_sub(time).max(0))
}

/// `web1 disk / is critical (0.97)`; without a metric, no parentheses.
pub(super) fn summary(e: &Event) -> String {
    // An event without a host (or service) has no blank where it would be.
    let names = [e.host_str(), e.service_str()];
    let mut text = names
        .into_iter()
        .filter(|n| !n.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if !text.is_empty() {
        text.push(' ');
    }
    text.push_str("is ");
    text.push_str(e.state.as_deref().unwrap_or(""));
    if let Some(metric) = e.metric {
        text.push_str(&format!(" ({metric})"));
    }
    truncate(&mut text, MAX_SUMMARY);
    text
}

/// Keys over PagerDuty's limit keep their start and gain a hash of the whole,
/// so two long keys with a common start stay distinct.
fn bounded_key(mut key: String) -> String {
    if key.len() <= MAX_DEDUP_KEY {
        return key;
    }
    let hash = format!("~{:016x}", fnv1a(key.as_bytes()));
    truncate(&mut key, MAX_DEDUP_KEY - hash.len());
    key.push_str(&hash);
    key
}

/// A hash that stays the same across builds and restarts, unlike std's.
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
pub(super) fn truncate(text: &mut String, max: usize) {
    let end = start_of(text, max).len();
    text.truncate(end);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Metric;

    #[test]
    fn an_incident_spans_hosts_when_its_key_does_not_name_the_host() {
        let keyed = |key: Option<&str>| Config {
            dedup_key: key.map(|k| Template::parse(k).unwrap()),
            ..pagerduty()
        };
        assert!(!keyed(None).spans_hosts(), "the derived key names the host");
        assert!(!keyed(Some("{host}")).spans_hosts());
        assert!(!keyed(Some("db-{service}-{host}")).spans_hosts());
        assert!(keyed(Some("{service}")).spans_hosts());
        assert!(keyed(Some("everything")).spans_hosts());
    }

    #[test]
    fn states_map_to_actions_and_valid_severities() {
        assert_eq!(
            action(Some("critical")),
            Some(Action::Trigger(Severity::Critical))
        );
        assert_eq!(
            action(Some("warning")),
            Some(Action::Trigger(Severity::Warning))
        );
        assert_eq!(
            action(Some("expired")),
            Some(Action::Trigger(Severity::Error))
        );
        assert_eq!(action(Some("ok")), Some(Action::Resolve));
        assert_eq!(action(Some("flapping")), None);
        assert_eq!(action(None), None);
    }

    #[test]
    fn summary_names_host_service_state_and_metric() {
        let mut e = Event {
            host: Some("web1".into()),
            service: Some("disk /".into()),
            state: Some("critical".into()),
            metric: Some(Metric::Float(0.97)),
            ..Event::default()
        };
        assert_eq!(summary(&e), "web1 disk / is critical (0.97)");
        e.state = Some("expired".into());
        e.metric = None;
        assert_eq!(summary(&e), "web1 disk / is expired");
        let no_host = Event {
            host: None,
            ..e.clone()
        };
        assert_eq!(summary(&no_host), "disk / is expired");
        let nameless = Event {
            service: None,
            ..no_host
        };
        assert_eq!(summary(&nameless), "is expired");
        e.service = Some("é".repeat(2000));
        let long = summary(&e);
        assert!(long.len() <= MAX_SUMMARY && long.starts_with("web1 éé"));
    }

    #[test]
    fn long_dedup_keys_stay_within_the_limit_and_distinct() {
        let a = bounded_key(format!("{}a", "x".repeat(300)));
        let b = bounded_key(format!("{}b", "x".repeat(300)));
        assert!(a.len() <= MAX_DEDUP_KEY && b.len() <= MAX_DEDUP_KEY);
        assert_ne!(a, b);
        assert_eq!(bounded_key("web1/cpu".into()), "web1/cpu");
        // Long hosts once joined alike past the cut: hashed apart now.
        let long = |host: &str, service: &str| {
            bounded_key(derived_key(&format!("{}{host}", "h".repeat(300)), service))
        };
        let (a, b) = (long("a/b", "c"), long("a", "b/c"));
        assert!(a.len() <= MAX_DEDUP_KEY && b.len() <= MAX_DEDUP_KEY);
        assert_ne!(a, b);
    }

    fn series(host: &str, service: &str) -> Event {
        Event {
            host: Some(host.into()),
            service: Some(service.into()),
            ..Event::default()
        }
    }

    fn pagerduty() -> Config {
        Config {
            url: "https://events.pagerduty.com/v2/enqueue".into(),
            dedup_key: None,
            resend_interval: DEFAULT_RESEND_INTERVAL,
            api: Api::PagerDuty {
                routing_key: "R0UT1NG".into(),
            },
        }
    }

    fn derived(host: &str, service: &str) -> String {
        dedup_key(&pagerduty(), &series(host, service))
    }

    #[test]
    fn the_derived_dedup_key_escapes_the_host_only() {
        // Once the same key `k8s/node1/cpu`: one series resolved the other's.
        assert_eq!(derived("k8s/node1", "cpu"), "k8s%2Fnode1/cpu");
        assert_eq!(derived("k8s", "node1/cpu"), "k8s/node1/cpu");
        // `%` is escaped too, or `a%2Fb` would take `a/b`'s key.
        assert_eq!(derived("a%2Fb", "c"), "a%252Fb/c");
        assert_eq!(derived("a/b", "c"), "a%2Fb/c");
        // Any other host keeps the key it had: its open incidents too.
        assert_eq!(derived("web1", "df/root"), "web1/df/root");
        assert_eq!(
            derived("web-1.example.com", "disk /"),
            "web-1.example.com/disk /"
        );
        assert_eq!(derived("", ""), "/");
        // A template's key is the operator's, unescaped.
        let mut custom = pagerduty();
        custom.dedup_key = Some(Template::parse("{host}/{service}").unwrap());
        assert_eq!(
            dedup_key(&custom, &series("k8s/node1", "cpu")),
            "k8s/node1/cpu"
        );
    }

    #[test]
    fn colliding_series_page_their_own_incidents_in_vigil_test() {
        let mut pages = Pages::new(pagerduty());
        let page = |host: &str, service: &str, state: &str| Event {
            state: Some(state.into()),
            ..series(host, service)
        };
        let sent: Vec<bool> = [
            page("k8s/node1", "cpu", "critical"),
            page("k8s", "node1/cpu", "ok"),
            page("k8s", "node1/cpu", "critical"),
            page("k8s/node1", "cpu", "critical"),
        ]
        .iter()
        .map(|event| pages.sends(event, 0))
        .collect();
        // B's `ok` resolves nothing of A's; B's trigger is its own; A's
        // repeat is suppressed.
        assert_eq!(sent, [true, false, true, false]);
    }

    /// `vigil test` resolves an incident several series share as the
    /// output does: once the last series that triggered it clears.
    #[test]
    fn an_incident_series_share_resolves_in_vigil_test_once_the_last_clears() {
        let mut config = pagerduty();
        config.dedup_key = Some(Template::parse("{host}").unwrap());
        let mut pages = Pages::new(config);
        let page = |service: &str, state: &str| Event {
            state: Some(state.into()),
            ..series("web1", service)
        };
        let sent: Vec<bool> = [
            page("cpu", "critical"),
            page("disk", "critical"),
            page("cpu", "ok"),
            page("load", "ok"),
            page("disk", "ok"),
        ]
        .iter()
        .map(|event| pages.sends(event, 0))
        .collect();
        assert_eq!(sent, [true, false, false, false, true]);
    }

    /// A new receiver is handed the latest page of each series: a trigger
    /// for an incident still on, at its latest severity; for one over, the
    /// resolve alone; states not paged are left out.
    #[test]
    fn a_new_receiver_is_handed_the_latest_page_of_each_series() {
        let page = |service: &str, state: &str| Event {
            state: Some(state.into()),
            ..series("web1", service)
        };
        let made = [
            page("disk", "critical"),
            page("cpu", "critical"),
            page("load", "warning"),
            page("cpu", "ok"),
            page("load", "critical"),
            page("mem", "flapping"),
        ];
        let made: Vec<_> = made.into_iter().zip(0..).collect();
        let (kept, superseded) = handed(made, None);
        let kept: Vec<_> = (kept.iter())
            .map(|(e, at)| (*at, e.service_str(), e.state.as_deref().unwrap()))
            .collect();
        assert_eq!(
            kept,
            [
                (0, "disk", "critical"),
                (3, "cpu", "ok"),
                (4, "load", "critical")
            ]
        );
        assert_eq!(superseded, [1, 2, 5]);
        // One incident for every service (`{host}`): each series' latest
        // page, or cpu's `ok` alone would leave disk, still critical,
        // unpaged at the new receiver.
        let host = Template::parse("{host}").unwrap();
        let made = vec![
            (page("disk", "critical"), 0),
            (page("cpu", "critical"), 1),
            (page("cpu", "ok"), 2),
        ];
        let (kept, superseded) = handed(made, Some(&host));
        assert_eq!(kept.iter().map(|(_, at)| *at).collect::<Vec<_>>(), [0, 2]);
        assert_eq!(superseded, [1]);
    }

    #[test]
    fn the_receiver_of_a_pagerduty_output_is_its_routing_key_of_a_webhook_its_url() {
        let config = |api| Config {
            url: "https://example.com/page?token=t".into(),
            dedup_key: None,
            resend_interval: DEFAULT_RESEND_INTERVAL,
            api,
        };
        let pd = config(Api::PagerDuty {
            routing_key: "R0UT1NG".into(),
        });
        assert_eq!((pd.receiver(), pd.type_name()), ("R0UT1NG", "pagerduty"));
        let hook = config(Api::Webhook {
            headers: BTreeMap::new(),
        });
        assert_eq!(
            (hook.receiver(), hook.type_name()),
            ("https://example.com/page?token=t", "paging_webhook")
        );
    }
}
