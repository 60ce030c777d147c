//! Stages that collect events into windows and fold each window into one event:
//! time and event-count windows, `batch`, `coalesce`, and `percentiles`. Time windows
//! run on arrival time and are closed by the timer, so a window ends on time even
//! when no later event comes (Riemann waits for the next event).
//!
//! A fixed window holds none of its events, only their folds so far
//! ([`FixedFolds`]), so it folds every event of its span however many; for
//! a `median`, its events with a metric ([`FixedSpread`]). The buffers are
//! bounded; past the bound the oldest events are dropped
//! and counted in the log, at most once per [`OVERFLOW_LOG_EVERY`] for each
//! window: one line per dropped event wrote as fast as events came in.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hashbrown::{Equivalent, HashMap};
use parking_lot::Mutex;

use crate::clock::{Micros, secs_to_micros};
use crate::event::{Event, Metric};
use crate::index::{Index, expires_at};
use crate::rules::engine::RuleStats;

use super::numbers::{self, Sum};
use super::running::{Events, FixedFolds, Kept, Running};
use super::saved::{RestoreError, Restorer, Saved, Saver};
use super::spread::{FixedSpread, median_of, std_dev_of};
use super::{Children, Cx, Node, metric_f64, same, take_over};

/// Most events a moving window holds (`coalesce`: series).
pub const WINDOW_MAX: usize = 100_000;

/// The largest `moving_event_window` whose buffer is made its size at its
/// first event; a larger one grows as events come, which a series that
/// sends a few never fills.
const EXACT_BUFFER_UP_TO: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoldKind {
    Sum,
    Mean,
    Min,
    Max,
    Count,
    Median,
    StdDev,
}

/// A fold under a window: turns the window's events into one event.
pub struct Fold {
    pub kind: FoldKind,
    pub children: Children,
}

impl Fold {
    fn fresh(&self) -> Fold {
        Fold {
            kind: self.kind,
            children: self.children.fresh(),
        }
    }
}

/// Folds over the events that have a metric (`count` counts every event); the
/// latest event is the template, `min`/`max` return the extreme event itself.
/// Metrics add and compare as Riemann's do ([`Sum`], [`numbers::cmp`]): a
/// sum of integers is an exact integer, and so is a mean that divides it. The window's events
/// are read where they are, not copied. A moving window, folded on every
/// event, keeps these folds running instead ([`Running`]), and a fixed
/// window keeps them as its events come ([`FixedFolds`]): both must agree
/// with this.
pub fn fold<'a, I>(kind: FoldKind, events: I) -> Option<Event>
where
    I: DoubleEndedIterator<Item = &'a Event> + ExactSizeIterator + Clone,
{
    let template = events.clone().next_back()?;
    let metrics = || events.clone().filter_map(|e| e.metric);
    let metric = match kind {
        FoldKind::Count => Metric::Int(events.len() as i64),
        FoldKind::Sum => Sum::of(metrics())?.metric(),
        FoldKind::Mean => {
            let mut n = 0u64;
            Sum::of(metrics().inspect(|_| n += 1))?.mean(n)
        }
        FoldKind::Min | FoldKind::Max => {
            let pick = |(a, _): &(Metric, _), (b, _): &(Metric, _)| numbers::cmp(*a, *b);
            let with_metric = events.filter_map(|e| Some((e.metric?, e)));
            // Of equals the latest, as Riemann's `minimum` (`<=`) and
            // `maximum` (`>=`) keep it: `max_by` picks the last of equals.
            let extreme = if kind == FoldKind::Min {
                with_metric.max_by(|a, b| pick(b, a))
            } else {
                with_metric.max_by(pick)
            };
            return extreme.map(|(_, e)| e.clone());
        }
        FoldKind::Median => return median_of(events).cloned(),
        FoldKind::StdDev => Metric::Float(std_dev_of(metrics())?),
    };
    let mut out = template.clone();
    out.metric = Some(metric);
    Some(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// Consecutive windows of `dt`, starting at the first event.
    FixedTime(Micros),
    /// On every event, the events of the last `dt`.
    MovingTime(Micros),
    /// Every `n` events.
    FixedCount(usize),
    /// On every event, the last `n` events.
    MovingCount(usize),
    /// Every `dt`, the latest event of each (host, service) seen.
    Coalesce(Micros),
    /// Riemann's `batch`: every `n` events, and what gathered when the `dt`
    /// that started with the first of them ends.
    Batch(u64, Micros),
}

/// Folded events, each with the place of its fold among the window's.
type Folded = Vec<(usize, Event)>;

pub struct Window {
    pub kind: WindowKind,
    pub folds: Vec<Fold>,
    state: Mutex<WindowState>,
}

/// Only the window's own kind's fields, made for its kind (and adopted only
/// from a window of the same): a `by` holds one per group, and an idle fixed
/// window costs no moving window's buffers.
enum WindowState {
    Fixed(FixedState),
    Moving(MovingState),
    Coalesce(CoalesceState),
}

#[derive(Default)]
struct FixedState {
    /// The folds of the current window's events so far.
    folds: FixedFolds,
    /// Their median and deviations, if the window folds either. Boxed: a
    /// `by` group's window of only `mean` costs a pointer for it.
    spread: Option<Box<FixedSpread>>,
    /// The median's events past `WINDOW_MAX`.
    overflow: Overflow,
    /// When the current time window closes (a count window has no end).
    window_end: Option<Micros>,
}

#[derive(Default)]
struct MovingState {
    /// With arrival times.
    events: Events,
    /// The folds of `events`, kept as events come and go; built from them
    /// when first needed (after a restore or a reload too). Boxed: inline,
    /// they would make every kind's state as big.
    running: Option<Box<Running>>,
    overflow: Overflow,
}

/// An event's (host, service), borrowed: hashed as the owned key of
/// [`CoalesceState::latest`] is (a tuple of two strings), and equal to it.
#[derive(Hash)]
struct SeriesOf<'a>((&'a str, &'a str));

impl<'a> SeriesOf<'a> {
    fn of(event: &'a Event) -> Self {
        SeriesOf((event.host_str(), event.service_str()))
    }
}

impl Equivalent<(String, String)> for SeriesOf<'_> {
    fn equivalent(&self, (host, service): &(String, String)) -> bool {
        self.0 == (host.as_str(), service.as_str())
    }
}

#[derive(Default)]
struct CoalesceState {
    /// The latest event of each (host, service), with when it came: that
    /// bounds how long one timed far ahead is held, as the index bounds its
    /// entry (its time is emitted as sent).
    latest: HashMap<(String, String), (Micros, Event)>,
    /// When the current period closes.
    window_end: Option<Micros>,
    overflow: Overflow,
}

impl WindowState {
    fn new(kind: WindowKind) -> Self {
        match kind {
            WindowKind::FixedTime(_) | WindowKind::FixedCount(_) | WindowKind::Batch(..) => {
                WindowState::Fixed(FixedState::default())
            }
            WindowKind::MovingTime(_) | WindowKind::MovingCount(_) => {
                WindowState::Moving(MovingState::default())
            }
            WindowKind::Coalesce(_) => WindowState::Coalesce(CoalesceState::default()),
        }
    }

    /// When the window is next due to close.
    fn window_end(&self) -> Option<Micros> {
        match self {
            WindowState::Fixed(fixed) => fixed.window_end,
            WindowState::Moving(_) => None,
            WindowState::Coalesce(coalesce) => coalesce.window_end,
        }
    }
}

impl MovingState {
    /// The running folds, built from the events the first time (or for
    /// other extremes), and the events they fold.
    fn tracked(&mut self, kept: Kept) -> (&mut Running, &Events) {
        // Taken over from a window that folded other extremes (a reload).
        if self.running.as_ref().is_some_and(|r| r.kept() != kept) {
            self.running = None;
        }
        let events = &self.events;
        let running = self
            .running
            .get_or_insert_with(|| Box::new(Running::of(events, kept)));
        running.refresh(events);
        (running, events)
    }

    /// `event` in at the back; the oldest out first if the window is full.
    fn push(&mut self, now: Micros, event: Event, stats: &RuleStats, kept: Kept) {
        if self.events.len() == WINDOW_MAX {
            self.pop_front();
            self.overflow.dropped_one(stats);
        }
        let (running, events) = self.tracked(kept);
        running.pushed(&event, events.len());
        self.events.push_back((now, event));
    }

    fn pop_front(&mut self) {
        if let Some((_, event)) = self.events.pop_front()
            && let Some(running) = &mut self.running
        {
            running.popped(&event);
        }
    }
}

/// How often an overflowing window says how many it dropped.
pub const OVERFLOW_LOG_EVERY: Micros = 10 * crate::clock::MICROS_PER_SEC;

/// What a full window let go of.
#[derive(Default)]
struct Overflow {
    /// Dropped since the last overflow line, which was logged at `logged_at`.
    dropped: u64,
    logged_at: Micros,
}

impl Overflow {
    fn dropped_one(&mut self, stats: &RuleStats) {
        self.dropped += 1;
        stats.window_overflow.fetch_add(1, Ordering::Relaxed);
    }

    /// How many were dropped since the last line, when a line is due at `now`.
    fn line_due(&mut self, now: Micros) -> Option<u64> {
        if self.dropped == 0 || now.saturating_sub(self.logged_at) < OVERFLOW_LOG_EVERY {
            return None;
        }
        self.logged_at = now;
        Some(std::mem::take(&mut self.dropped))
    }

    fn log_due(&mut self, now: Micros) {
        if let Some(dropped) = self.line_due(now) {
            tracing::warn!(
                dropped,
                max = WINDOW_MAX,
                "Window overflowed; oldest events dropped."
            );
        }
    }
}

impl Window {
    pub fn new(kind: WindowKind, folds: Vec<Fold>) -> Self {
        Self {
            kind,
            folds,
            state: Mutex::new(WindowState::new(kind)),
        }
    }

    /// Each fold's event, as `fold_as` folds its kind, into `out` with the
    /// fold's place.
    fn fold_each(&self, fold_as: impl Fn(FoldKind) -> Option<Event>, out: &mut Folded) {
        let folded = self.folds.iter().map(|f| fold_as(f.kind));
        out.extend(folded.enumerate().filter_map(|(at, e)| Some((at, e?))));
    }

    /// The extreme events this window's folds return.
    fn kept(&self) -> Kept {
        let folds = |kind| self.folds.iter().any(|f| f.kind == kind);
        Kept {
            min: folds(FoldKind::Min),
            max: folds(FoldKind::Max),
            median: folds(FoldKind::Median),
        }
    }

    /// Whether a fixed window keeps a [`FixedSpread`]: it folds `median`
    /// or `std_dev`.
    fn spreads(&self) -> bool {
        let spread = |f: &Fold| matches!(f.kind, FoldKind::Median | FoldKind::StdDev);
        self.folds.iter().any(spread)
    }

    /// Adds `event` to the current fixed window.
    fn add_fixed(&self, fixed: &mut FixedState, event: &Event, stats: &RuleStats) {
        let kept = self.kept();
        fixed.folds.add(event, kept);
        if self.spreads() {
            let spread = fixed.spread.get_or_insert_default();
            if spread.add(event, kept.median) {
                fixed.overflow.dropped_one(stats);
            }
        }
    }

    /// Closes the current fixed window, folded into `out`.
    fn close_fixed(&self, fixed: &mut FixedState, out: &mut Folded) {
        let folds = std::mem::take(&mut fixed.folds);
        let spread = fixed.spread.take();
        self.fold_each(|kind| folds.fold(kind, spread.as_deref()), out);
    }

    /// Makes what a state file gave sense, as a hostile or corrupted one
    /// need not: a moving window's arrival times in order and none after
    /// the start (one ahead stayed in the window until then, and kept the
    /// later ones in behind it); a period's end within its `dt` of the
    /// start, a count window none; a fixed window's folds and spread that
    /// this build could have made, else none (logged): a count past i64's
    /// range, a mean over no metric, a NaN deviation.
    fn bound_restored(&self, state: &mut WindowState, from: &Restorer<'_>) {
        match (self.kind, state) {
            (_, WindowState::Moving(moving)) => {
                let mut earliest = Micros::MIN;
                for (at, _) in &mut moving.events {
                    *at = from.past(*at).max(earliest);
                    earliest = *at;
                }
            }
            (WindowKind::Coalesce(dt), WindowState::Coalesce(coalesce)) => {
                coalesce.window_end = coalesce.window_end.map(|end| from.due_within(end, dt));
            }
            (_, WindowState::Coalesce(_)) => unreachable!("a window's state is made for its kind"),
            (kind, WindowState::Fixed(fixed)) => {
                let fits = fixed.folds.fits() && fixed.spread.as_ref().is_none_or(|s| s.fits());
                if !fits {
                    tracing::warn!(
                        ?kind,
                        "A fixed window's saved state is not one vigil makes; the window starts empty."
                    );
                    *fixed = FixedState::default();
                }
                fixed.window_end = match kind {
                    WindowKind::FixedTime(dt) | WindowKind::Batch(_, dt) => {
                        fixed.window_end.map(|end| from.due_within(end, dt))
                    }
                    _ => None,
                };
            }
        }
    }

    /// Passes each folded event on, to its fold's children (with no lock held).
    fn emit(&self, folded: Folded, cx: &mut Cx) {
        for (at, event) in folded {
            self.folds[at].children.event(&event, cx);
        }
    }

    /// A moving window's folds of what it holds now, into `out`: each in
    /// O(1), where folding up to [`WINDOW_MAX`] events took ~0.2 ms.
    fn fold_moving(&self, moving: &mut MovingState, out: &mut Folded) {
        let (running, events) = moving.tracked(self.kept());
        self.fold_each(|kind| running.fold(kind, events), out);
    }

    /// Closes the windows that are due at `now`, folded into `out`.
    fn due(&self, s: &mut WindowState, now: Micros, index: &Index, out: &mut Folded) {
        match (self.kind, s) {
            (_, WindowState::Fixed(fixed)) => {
                // Every event a time window took came before its end: an
                // event first closes what is due, then starts a window if
                // none is open, which ends after it (durations are above zero).
                if fixed.window_end.is_some_and(|end| now >= end) {
                    self.close_fixed(fixed, out);
                    // Idle: the next window starts with the next event.
                    fixed.window_end = None;
                }
                fixed.overflow.log_due(now);
            }
            (_, WindowState::Moving(moving)) => moving.overflow.log_due(now),
            (WindowKind::Coalesce(dt), WindowState::Coalesce(coalesce)) => {
                if let Some(end) = coalesce.window_end.filter(|end| now >= *end) {
                    let current: Vec<&Event> = coalesce.latest.values().map(|(_, e)| e).collect();
                    self.fold_each(|kind| fold(kind, current.iter().copied()), out);
                    // Expired (by state or TTL) entries are emitted once, then forgotten.
                    coalesce.latest.retain(|_, (came, e)| {
                        let ttl = secs_to_micros(index.ttl_secs(e));
                        !e.is_expired_state() && expires_at(e.time, ttl, *came) >= now
                    });
                    coalesce.window_end =
                        (!coalesce.latest.is_empty()).then(|| end.max(now).saturating_add(dt));
                }
                coalesce.overflow.log_due(now);
            }
            (_, WindowState::Coalesce(_)) => unreachable!("a window's state is made for its kind"),
        }
    }
}

impl Node for Window {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let now = cx.now;
        let (folded, next) = {
            let mut s = self.state.lock();
            let mut out = Folded::new();
            self.due(&mut s, now, cx.index, &mut out);
            match (self.kind, &mut *s) {
                (WindowKind::FixedTime(dt), WindowState::Fixed(fixed)) => {
                    fixed.window_end.get_or_insert(now.saturating_add(dt));
                    self.add_fixed(fixed, event, cx.stats);
                }
                (WindowKind::FixedCount(n), WindowState::Fixed(fixed)) => {
                    self.add_fixed(fixed, event, cx.stats);
                    if fixed.folds.events() >= n as u64 {
                        self.close_fixed(fixed, &mut out);
                    }
                }
                (WindowKind::Batch(n, dt), WindowState::Fixed(fixed)) => {
                    fixed.window_end.get_or_insert(now.saturating_add(dt));
                    self.add_fixed(fixed, event, cx.stats);
                    // Full: folded at once; the `dt` runs on, and what
                    // gathers in the rest of it is folded when it ends.
                    if fixed.folds.events() >= n {
                        self.close_fixed(fixed, &mut out);
                    }
                }
                (WindowKind::MovingTime(dt), WindowState::Moving(moving)) => {
                    moving.push(now, event.clone(), cx.stats, self.kept());
                    let horizon = now.saturating_sub(dt);
                    while moving.events.front().is_some_and(|(at, _)| *at <= horizon) {
                        moving.pop_front();
                    }
                    self.fold_moving(moving, &mut out);
                }
                (WindowKind::MovingCount(n), WindowState::Moving(moving)) => {
                    // Grown by doubling, a window of 10 kept 16 slots of
                    // ~184 bytes: 1.1 KB a series of a `by` for nothing. It
                    // holds one more than `n` between the push and the pop.
                    if moving.events.capacity() == 0 && n <= EXACT_BUFFER_UP_TO {
                        moving.events.reserve_exact(n + 1);
                    }
                    moving.push(now, event.clone(), cx.stats, self.kept());
                    while moving.events.len() > n {
                        moving.pop_front();
                    }
                    self.fold_moving(moving, &mut out);
                }
                (WindowKind::Coalesce(dt), WindowState::Coalesce(coalesce)) => {
                    coalesce.window_end.get_or_insert(now.saturating_add(dt));
                    let latest = &mut coalesce.latest;
                    // Found by the event's own strings: a series already held
                    // costs no copy of its key, and its event's strings are
                    // reused.
                    if let Some((came, held)) = latest.get_mut(&SeriesOf::of(event)) {
                        *came = now;
                        held.clone_from(event);
                    } else if latest.len() < WINDOW_MAX {
                        let key = (event.host_str().to_owned(), event.service_str().to_owned());
                        latest.insert(key, (now, event.clone()));
                    } else {
                        coalesce.overflow.dropped_one(cx.stats);
                    }
                }
                _ => unreachable!("a window's state is made for its kind"),
            }
            (out, s.window_end())
        };
        cx.schedule(next);
        self.emit(folded, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        let (folded, next) = {
            let mut s = self.state.lock();
            let mut out = Folded::new();
            self.due(&mut s, cx.now, cx.index, &mut out);
            (out, s.window_end())
        };
        cx.schedule(next);
        self.emit(folded, cx);
        for fold in &self.folds {
            fold.children.tick(cx);
        }
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Window::new(
            self.kind,
            self.folds.iter().map(Fold::fresh).collect(),
        ))
    }

    /// The held events (a fixed window: its folds so far) carry over when
    /// the window kind and size are unchanged; each fold adopts its old
    /// counterpart if it folds the same way. A `min`, `max`, `median` or
    /// `std_dev` new to a fixed window folds the events from then on: the
    /// old window kept nothing for a fold it did not have.
    fn adopt(&self, old: &dyn Node) {
        let Some(old) = same::<Window>(old).filter(|o| o.kind == self.kind) else {
            return;
        };
        take_over(&self.state, &old.state);
        for (new, old) in self.folds.iter().zip(&old.folds) {
            if new.kind == old.kind {
                new.children.adopt(&old.children);
            }
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let s = self.state.lock();
        let entry = match &*s {
            // As version 4 wrote it, where the window holds no spread.
            WindowState::Fixed(fixed) => match &fixed.spread {
                None => Saved::ExactFixedWindow {
                    folds: fixed.folds.clone(),
                    window_end: fixed.window_end,
                },
                Some(spread) => Saved::ScaledSpreadFixedWindow {
                    folds: fixed.folds.clone(),
                    spread: spread.clone(),
                    window_end: fixed.window_end,
                },
            },
            WindowState::Moving(moving) => Saved::Window {
                events: moving.events.iter().cloned().collect(),
                latest: Vec::new(),
                window_end: None,
            },
            WindowState::Coalesce(coalesce) => Saved::Window {
                events: Vec::new(),
                latest: coalesce.latest.values().map(|(_, e)| e.clone()).collect(),
                window_end: coalesce.window_end,
            },
        };
        drop(s);
        out.push(entry);
        for fold in &self.folds {
            fold.children.save(out);
        }
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        let mut state = WindowState::new(self.kind);
        match (&mut state, from.next("window")?) {
            (WindowState::Fixed(fixed), Saved::ExactFixedWindow { folds, window_end }) => {
                (fixed.folds, fixed.window_end) = (folds, window_end);
            }
            (WindowState::Fixed(fixed), Saved::FixedWindow { folds, window_end }) => {
                (fixed.folds, fixed.window_end) = (folds.into(), window_end);
            }
            (
                WindowState::Fixed(fixed),
                Saved::ScaledSpreadFixedWindow {
                    folds,
                    spread,
                    window_end,
                },
            ) => {
                (fixed.folds, fixed.window_end) = (folds, window_end);
                fixed.spread = Some(spread);
            }
            (
                WindowState::Fixed(fixed),
                Saved::SpreadFixedWindow {
                    folds,
                    spread,
                    window_end,
                },
            ) => {
                (fixed.folds, fixed.window_end) = (folds, window_end);
                fixed.spread = Some(Box::new((*spread).into()));
            }
            // Written by a build that held a fixed window's events: all of
            // the current window's (see `due`), folded as they came.
            (
                WindowState::Fixed(fixed),
                Saved::Window {
                    events, window_end, ..
                },
            ) => {
                for (_, event) in &events {
                    fixed.folds.add(event, self.kept());
                }
                if self.spreads() {
                    let spread = fixed.spread.insert(Box::default());
                    for (_, event) in &events {
                        spread.add(event, self.kept().median);
                    }
                }
                fixed.window_end = window_end;
            }
            (WindowState::Moving(moving), Saved::Window { mut events, .. }) => {
                // The file is vigil's own, but its bound is this build's.
                events.drain(..events.len().saturating_sub(WINDOW_MAX));
                moving.events = events.into();
            }
            (
                WindowState::Coalesce(coalesce),
                Saved::Window {
                    latest, window_end, ..
                },
            ) => {
                // When each came is not saved (the format stays): taken as
                // the start, as the index bounds a restored entry.
                let came = from.started();
                coalesce.latest = latest
                    .into_iter()
                    .take(WINDOW_MAX)
                    .map(|e| {
                        (
                            (e.host_str().to_owned(), e.service_str().to_owned()),
                            (came, e),
                        )
                    })
                    .collect();
                coalesce.window_end = window_end;
            }
            (_, other) => return Err(RestoreError::mismatch("window", &other)),
        }
        self.bound_restored(&mut state, from);
        *self.state.lock() = state;
        self.folds
            .iter()
            .try_for_each(|fold| fold.children.restore(from))
    }
}

/// `percentiles(dt, [0.5, 0.95, 0.99])`: every `dt`, one event per point with
/// service `"<service> <point>"` and the metric at that quantile (nearest rank,
/// as Riemann). Samples beyond [`WINDOW_MAX`] are reservoir-sampled.
pub struct Percentiles {
    pub interval: Micros,
    /// Shared by the copies in a `by`'s groups.
    pub points: Arc<[f64]>,
    pub children: Children,
    pub state: Mutex<PercentileState>,
}

#[derive(Default)]
pub struct PercentileState {
    samples: Vec<f64>,
    seen: u64,
    latest: Option<Event>,
    window_end: Option<Micros>,
    rng: u64,
}

impl Percentiles {
    pub fn new(interval: Micros, points: Arc<[f64]>, children: Children) -> Self {
        Self {
            interval,
            points,
            children,
            state: Mutex::new(PercentileState {
                rng: 0x2545_f491_4f6c_dd1d,
                ..PercentileState::default()
            }),
        }
    }

    fn due(&self, s: &mut PercentileState, now: Micros) -> Vec<Event> {
        let Some(end) = s.window_end.filter(|end| now >= *end) else {
            return Vec::new();
        };
        let mut samples = std::mem::take(&mut s.samples);
        s.seen = 0;
        s.window_end = None;
        let Some(template) = s.latest.take() else {
            return Vec::new();
        };
        samples.sort_by(f64::total_cmp);
        self.points
            .iter()
            .map(|&q| {
                let rank = ((q * samples.len() as f64) as usize).min(samples.len() - 1);
                let mut out = template.clone();
                out.service = Some(format!("{} {q}", template.service_str()));
                out.metric = Some(Metric::Float(samples[rank]));
                out.time = end;
                out
            })
            .collect()
    }
}

impl Node for Percentiles {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let (out, next) = {
            let mut s = self.state.lock();
            let out = self.due(&mut s, cx.now);
            if let Some(m) = metric_f64(event) {
                s.window_end
                    .get_or_insert(cx.now.saturating_add(self.interval));
                // Saturating: a restored count may be anything the file held.
                s.seen = s.seen.saturating_add(1);
                if s.samples.len() < WINDOW_MAX {
                    s.samples.push(m);
                } else {
                    // Reservoir sampling keeps a uniform sample of the whole window.
                    s.rng ^= s.rng << 13;
                    s.rng ^= s.rng >> 7;
                    s.rng ^= s.rng << 17;
                    let slot = (s.rng % s.seen) as usize;
                    if slot < WINDOW_MAX {
                        s.samples[slot] = m;
                    }
                }
                match &mut s.latest {
                    Some(latest) => latest.clone_from(event),
                    None => s.latest = Some(event.clone()),
                }
            }
            (out, s.window_end)
        };
        cx.schedule(next);
        for e in &out {
            self.children.event(e, cx);
        }
    }

    fn tick(&self, cx: &mut Cx) {
        let (out, next) = {
            let mut s = self.state.lock();
            (self.due(&mut s, cx.now), s.window_end)
        };
        cx.schedule(next);
        for e in &out {
            self.children.event(e, cx);
        }
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Percentiles::new(
            self.interval,
            self.points.clone(),
            self.children.fresh(),
        ))
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) = same::<Percentiles>(old)
            .filter(|o| o.interval == self.interval && o.points == self.points)
        {
            take_over(&self.state, &old.state);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let s = self.state.lock();
        let entry = Saved::Percentiles {
            samples: s.samples.clone(),
            seen: s.seen,
            latest: s.latest.clone(),
            window_end: s.window_end,
            rng: s.rng,
        };
        drop(s);
        out.push(entry);
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("percentiles")? {
            Saved::Percentiles {
                mut samples,
                seen,
                latest,
                window_end,
                rng,
            } => {
                samples.truncate(WINDOW_MAX);
                *self.state.lock() = PercentileState {
                    samples,
                    seen,
                    latest,
                    window_end: window_end.map(|end| from.due_within(end, self.interval)),
                    // Zero would make the reservoir's xorshift stick at zero.
                    rng: rng.max(1),
                };
            }
            other => return Err(RestoreError::mismatch("percentiles", &other)),
        }
        self.children.restore(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MICROS_PER_SEC;
    use crate::rules::nodes::Scratch;

    /// A state file that passed its checksum may hold any count: at 2^64
    /// the next metric overflowed it (a panic where overflow is checked,
    /// as in the fuzzer's build).
    #[test]
    fn a_percentiles_count_restored_at_its_limit_takes_the_next_metric() {
        let percentiles = Percentiles::new(10, Arc::from([0.5]), Children::default());
        let entry = Saved::Percentiles {
            samples: Vec::new(),
            seen: u64::MAX,
            latest: None,
            window_end: Some(10),
            rng: 1,
        };
        percentiles
            .restore(&mut Restorer::from_entries(vec![entry], 0))
            .unwrap();
        let event = Event {
            metric: Some(Metric::Float(1.0)),
            ..Event::default()
        };
        percentiles.event(&event, &mut Scratch::default().cx(0));
        let s = percentiles.state.lock();
        assert_eq!((s.seen, s.samples.len()), (u64::MAX, 1));
    }

    /// `coalesce` finds a held series by the event's strings: were the two
    /// hashed apart, a full window would drop the events of series it holds.
    #[test]
    fn a_series_is_found_by_its_borrowed_strings_as_by_its_owned_key() {
        let mut latest: HashMap<(String, String), u32> = HashMap::new();
        latest.insert(("web1".into(), "cpu".into()), 1);
        latest.insert(("web1cpu".into(), String::new()), 2);
        let event = |host: &str, service: &str| Event {
            host: Some(host.into()),
            service: Some(service.into()),
            ..Event::default()
        };
        let found = |e: &Event| latest.get(&SeriesOf::of(e)).copied();
        assert_eq!(found(&event("web1", "cpu")), Some(1));
        assert_eq!(found(&event("web1cpu", "")), Some(2));
        assert_eq!(found(&Event::default()), None);
        assert_eq!(found(&event("web1", "cp")), None);
    }

    const FIXED: [WindowKind; 2] = [
        WindowKind::FixedTime(10 * MICROS_PER_SEC),
        WindowKind::FixedCount(100),
    ];

    /// A window with every fold, each with no children.
    fn every_fold(kind: WindowKind) -> Window {
        let kinds = [
            FoldKind::Count,
            FoldKind::Sum,
            FoldKind::Mean,
            FoldKind::Min,
            FoldKind::Max,
        ];
        let folds = kinds.map(|kind| Fold {
            kind,
            children: Children::default(),
        });
        Window::new(kind, folds.into())
    }

    /// Ties, a missing metric, ints and floats.
    fn events() -> Vec<Event> {
        let metrics = [Some(3.0), Some(1.0), None, Some(7.0), Some(1.0), Some(7.0)];
        (0..)
            .zip(metrics)
            .map(|(n, metric)| Event {
                service: Some(format!("e{n}")),
                metric: metric.map(|m| match n % 2 {
                    0 => Metric::Int(m as i64),
                    _ => Metric::Float(m),
                }),
                ..Event::default()
            })
            .collect()
    }

    fn fixed_state(s: &mut WindowState) -> &mut FixedState {
        match s {
            WindowState::Fixed(fixed) => fixed,
            _ => panic!("not a fixed window's state"),
        }
    }

    #[test]
    fn a_small_moving_event_windows_buffer_is_its_size() {
        let window = every_fold(WindowKind::MovingCount(10));
        let mut scratch = super::super::Scratch::default();
        let mut cx = scratch.cx(0);
        for event in events().iter().cycle().take(25) {
            window.event(event, &mut cx);
        }
        let WindowState::Moving(moving) = &*window.state.lock() else {
            panic!("a moving window's state");
        };
        assert_eq!(moving.events.len(), 10);
        assert_eq!(moving.events.capacity(), 11);
    }

    /// A window's end of 123 restored: a count window has none.
    fn ends_at_123(kind: WindowKind) -> Option<Micros> {
        matches!(kind, WindowKind::FixedTime(_)).then_some(123)
    }

    fn restored(kind: WindowKind, entry: Saved) -> Window {
        let window = every_fold(kind);
        let mut from = Restorer::from_entries(vec![entry], 0);
        window.restore(&mut from).unwrap();
        assert_eq!(from.finish(), Ok(1));
        window
    }

    #[test]
    fn a_fixed_windows_folds_come_back_as_they_were_saved() {
        // Mixed, and a sum of integers past 2^53, which must stay exact.
        let big = Event {
            metric: Some(Metric::Int((1 << 53) + 1)),
            ..Event::default()
        };
        let cases = [
            (events(), Metric::Float(19.0)),
            (vec![big.clone(), big], Metric::Int(2 * ((1 << 53) + 1))),
        ];
        for (kind, (events, sum)) in FIXED.into_iter().zip(cases) {
            let window = every_fold(kind);
            let mut s = window.state.lock();
            let fixed = fixed_state(&mut s);
            for event in events {
                fixed.folds.add(&event, window.kept());
            }
            fixed.window_end = Some(123);
            drop(s);
            let mut saved = Vec::new();
            window.save(&mut saved);
            let [entry] = <[Saved; 1]>::try_from(saved).unwrap();
            // Through postcard, as the state file holds it.
            let entry: Saved =
                postcard::from_bytes(&postcard::to_allocvec(&entry).unwrap()).unwrap();
            assert!(matches!(entry, Saved::ExactFixedWindow { .. }), "{entry:?}");
            let back = restored(kind, entry);
            let (mut back, mut s) = (back.state.lock(), window.state.lock());
            let (back, s) = (fixed_state(&mut back), fixed_state(&mut s));
            assert_eq!(back.folds, s.folds, "{kind:?}");
            let back_sum = back.folds.fold(FoldKind::Sum, None).and_then(|e| e.metric);
            assert_eq!(back_sum, Some(sum), "{kind:?}");
            assert_eq!(back.window_end, ends_at_123(kind));
        }
    }

    /// A fixed window's entry as version 3 wrote it (the bytes of a build
    /// before version 4: 2^53 + 1 then 2, and `max`) restores, its sum the
    /// float that build added.
    #[test]
    fn a_fixed_window_saved_with_a_float_sum_comes_back_with_it() {
        let v3 = [
            10, 2, 2, 1, 1, 0, 0, 0, 0, 0, 64, 67, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 130, 128, 128,
            128, 128, 128, 128, 32, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 4, 0, 0, 1, 246, 1,
        ];
        let entry: Saved = postcard::from_bytes(&v3).unwrap();
        assert!(matches!(entry, Saved::FixedWindow { .. }), "{entry:?}");
        let window = restored(FIXED[0], entry);
        let mut s = window.state.lock();
        let s = fixed_state(&mut s);
        let metric = |kind| s.folds.fold(kind, None).and_then(|e| e.metric);
        assert_eq!(
            metric(FoldKind::Sum),
            Some(Metric::Float(9_007_199_254_740_994.0))
        );
        assert_eq!(metric(FoldKind::Max), Some(Metric::Int((1 << 53) + 1)));
        assert_eq!(metric(FoldKind::Count), Some(Metric::Int(2)));
        assert_eq!(s.window_end, Some(123));
        s.folds.add(
            &Event {
                metric: Some(Metric::Int(1)),
                ..Event::default()
            },
            window.kept(),
        );
        assert_eq!(
            s.folds.fold(FoldKind::Sum, None).and_then(|e| e.metric),
            Some(Metric::Float(9_007_199_254_740_996.0))
        );
    }

    /// An entry as a state file may hold it, however this build's types
    /// let a test make one: postcard knows fields and variants by their
    /// position (11: `ExactFixedWindow`, 14: `SpreadFixedWindow`, 18:
    /// `ScaledSpreadFixedWindow`).
    fn entry_from(fields: &impl serde::Serialize) -> Saved {
        postcard::from_bytes(&postcard::to_allocvec(fields).unwrap()).unwrap()
    }

    const EXACT_FIXED_WINDOW: u32 = 11;
    const SPREAD_FIXED_WINDOW: u32 = 14;
    const SCALED_SPREAD_FIXED_WINDOW: u32 = 18;

    /// A fixed window's folds, field by field.
    type Folds = (
        u64,
        u64,
        Option<Sum>,
        Option<Event>,
        Option<Event>,
        Option<Event>,
    );

    fn folds(events: u64, with_metric: u64, sum: Option<Sum>) -> Folds {
        let latest = Event {
            metric: sum.map(|_| Metric::Float(1.0)),
            ..Event::default()
        };
        (events, with_metric, sum, None, None, Some(latest))
    }

    fn fold_of(window: &Window, kind: FoldKind) -> Option<Metric> {
        let mut s = window.state.lock();
        let s = fixed_state(&mut s);
        s.folds.fold(kind, s.spread.as_deref())?.metric
    }

    /// A count restored past i64's range was folded negative (-1).
    #[test]
    fn a_count_restored_past_i64s_range_folds_to_the_largest() {
        let entry = (EXACT_FIXED_WINDOW, folds(u64::MAX, 0, None), None::<Micros>);
        let window = restored(FIXED[1], entry_from(&entry));
        let count = fold_of(&window, FoldKind::Count);
        assert_eq!(count, Some(Metric::Int(i64::MAX)));
    }

    /// A sum restored with no metric counted made a mean over none, an
    /// infinity: folds adding could not make are dropped.
    #[test]
    fn folds_adding_could_not_make_are_dropped() {
        let sum = Some(Sum::Float(3.0));
        let entry = (EXACT_FIXED_WINDOW, folds(5, 0, sum), None::<Micros>);
        let window = restored(FIXED[1], entry_from(&entry));
        assert_eq!(fold_of(&window, FoldKind::Mean), None);
        assert_eq!(
            fold_of(&window, FoldKind::Count),
            None,
            "the window is empty"
        );
    }

    /// A NaN mean restored made every standard deviation of the window
    /// NaN: as version 6 saved it (scaled), which cannot make one, the
    /// window starts empty.
    #[test]
    fn a_nan_deviation_restored_is_dropped() {
        let spread = ((1u64, f64::NAN, 0.0f64, 0u64, 0i32), Vec::<Event>::new());
        let folds = folds(1, 1, Some(Sum::Float(1.0)));
        let entry = (SCALED_SPREAD_FIXED_WINDOW, folds, spread, None::<Micros>);
        let window = restored(FIXED[1], entry_from(&entry));
        assert_eq!(fold_of(&window, FoldKind::StdDev), None);
    }

    /// Version 5 saved the squares of metrics near 1e200 as they passed
    /// f64's range (1e200 and -1e200: infinite), as this build cannot: the
    /// window lost its count and every other fold with them.
    #[test]
    fn a_spread_version_5_saved_overflowed_keeps_its_window() {
        let held = [1e200, -1e200].map(|m| Event {
            metric: Some(Metric::Float(m)),
            ..Event::default()
        });
        let spread = ((2u64, 0.0f64, f64::INFINITY, 0u64), held.to_vec());
        let folds = folds(2, 2, Some(Sum::Float(0.0)));
        let entry = (SPREAD_FIXED_WINDOW, folds, spread, None::<Micros>);
        let window = restored(FIXED[1], entry_from(&entry));
        assert_eq!(fold_of(&window, FoldKind::Count), Some(Metric::Int(2)));
        // Built anew from the events held for the median: all of them.
        let std_dev = fold_of(&window, FoldKind::StdDev);
        assert_eq!(std_dev, Some(Metric::Float(1e200)));
    }

    /// As above, with too few events held to build them anew: the
    /// deviation is NaN, as version 5's overflow made it, until the window
    /// closes.
    #[test]
    fn a_spread_version_5_saved_overflowed_without_its_events_is_nan() {
        let spread = ((3u64, f64::NAN, f64::NAN, 0u64), Vec::<Event>::new());
        let folds = folds(3, 3, Some(Sum::Float(1.0)));
        let entry = (SPREAD_FIXED_WINDOW, folds, spread, None::<Micros>);
        let window = restored(FIXED[1], entry_from(&entry));
        assert_eq!(fold_of(&window, FoldKind::Count), Some(Metric::Int(3)));
        let std_dev = fold_of(&window, FoldKind::StdDev);
        assert!(
            matches!(std_dev, Some(Metric::Float(d)) if d.is_nan()),
            "{std_dev:?}"
        );
    }

    /// A count window has no end: one restored with an end closed there,
    /// short of its count.
    #[test]
    fn a_count_window_restored_with_an_end_has_none() {
        let entry = (EXACT_FIXED_WINDOW, folds(1, 0, None), Some(123 as Micros));
        let window = restored(FIXED[1], entry_from(&entry));
        let mut s = window.state.lock();
        assert_eq!(fixed_state(&mut s).window_end, None);
    }

    /// Version 5's unscaled deviations restore, and are saved scaled.
    #[test]
    fn a_spread_saved_unscaled_comes_back_and_is_saved_scaled() {
        let spread = ((2u64, 0.0f64, 2.0f64, 0u64), Vec::<Event>::new());
        let folds = folds(2, 2, Some(Sum::Float(0.0)));
        let entry = (SPREAD_FIXED_WINDOW, folds, spread, None::<Micros>);
        let window = restored(FIXED[1], entry_from(&entry));
        assert_eq!(fold_of(&window, FoldKind::StdDev), Some(Metric::Float(1.0)));
        let mut saved = Vec::new();
        window.save(&mut saved);
        assert!(matches!(saved[..], [Saved::ScaledSpreadFixedWindow { .. }]));
    }

    /// A state file of a build that held a fixed window's events restores.
    #[test]
    fn a_fixed_window_saved_with_its_events_comes_back_as_their_folds() {
        let events = events();
        for kind in FIXED {
            let window = restored(
                kind,
                Saved::Window {
                    events: events.iter().map(|e| (7, e.clone())).collect(),
                    latest: Vec::new(),
                    window_end: Some(123),
                },
            );
            let mut s = window.state.lock();
            let s = fixed_state(&mut s);
            assert_eq!(s.folds.events(), events.len() as u64);
            for f in &window.folds {
                assert_eq!(
                    s.folds.fold(f.kind, s.spread.as_deref()),
                    fold(f.kind, events.iter()),
                    "{kind:?}, {:?}",
                    f.kind
                );
            }
            assert_eq!(s.window_end, ends_at_123(kind));
        }
    }

    /// A `by` holds a window's state per group: the other kinds' fields
    /// make a fixed window's no bigger than its own (but for a tag).
    #[test]
    fn a_fixed_windows_state_holds_only_its_own_fields() {
        use std::mem::size_of;
        assert!(size_of::<WindowState>() <= size_of::<FixedState>() + 8);
    }

    #[test]
    fn an_overflowing_window_says_so_at_most_once_per_interval() {
        let t0 = 1_700_000_000 * crate::clock::MICROS_PER_SEC;
        let mut overflow = Overflow::default();
        assert_eq!(overflow.line_due(t0), None, "nothing dropped");
        // One event dropped per arrival, 25 000 a second (one per 40 µs), for 25 s.
        let mut lines = Vec::new();
        for i in 0..25_000 * 25 {
            overflow.dropped += 1;
            lines.extend(overflow.line_due(t0 + i * 40));
        }
        assert_eq!(lines.len(), 3, "at 0, 10 and 20 s: {lines:?}");
        assert_eq!(lines[..2], [1, 250_000]);
        assert_eq!(
            lines.iter().sum::<u64>() + overflow.dropped,
            25_000 * 25,
            "every drop is in a line or still to be told"
        );
    }
}
