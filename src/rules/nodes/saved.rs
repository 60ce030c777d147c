//! A stage's state as vigil writes it to disk, so it survives a restart
//! ([`crate::rules::persist`]). Each stateful stage turns its state into one
//! [`Saved`] entry and back; stateless stages only pass the walk on to their
//! children.
//!
//! Entries are flat and in tree order (a stage before its children, siblings
//! in order; a `by` as its group count, then each group as a [`Saved::Group`]
//! followed by its stages' entries). They go to the file one at a time as
//! they are made, so saving a `by` of many groups never holds a copy of all
//! of them. They are read back into a tree compiled from the very text they
//! were saved with, so an entry's position says whose it is; its kind is
//! checked anyway, and a mismatch abandons the restore rather than giving a
//! stage another stage's state.
//!
//! The file encodes them with postcard, which knows a variant or a field
//! (here and in what they hold, such as [`Event`]) by its position, not its
//! name: reordering or adding them changes the format, and needs a new
//! version of the file.

use serde::{Deserialize, Serialize};

use crate::clock::Micros;
use crate::event::Event;
use crate::index::DEFAULT_TTL_SECS;

use super::as_secs;
use super::numbers::Sum;
use super::running::{FixedFolds, FloatSumFolds};
use super::spread::{FixedSpread, UnscaledSpread};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum Saved {
    Rate {
        sum: f64,
        latest: Option<Event>,
        window_end: Micros,
        pending: bool,
    },
    /// A `by`; its groups follow.
    By {
        groups: u64,
    },
    /// One `by` group; its stages' entries follow.
    Group {
        key: Vec<Option<String>>,
        free_at: Micros,
        /// How long the group lives after an event. Absent from a file of
        /// version 1 written before it was saved: [`LIFETIME_UNSAVED`].
        #[serde(default = "lifetime_unsaved")]
        lifetime: Micros,
    },
    Throttle {
        window_start: Micros,
        passed: u64,
    },
    Changed(Option<String>),
    Stable {
        value: Option<Option<String>>,
        since: Micros,
        held: Vec<Event>,
    },
    Ewma(Option<(f64, Micros)>),
    Ddt(Option<(f64, Micros)>),
    Window {
        /// With their arrival times.
        events: Vec<(Micros, Event)>,
        /// `coalesce`'s latest event per (host, service).
        latest: Vec<Event>,
        window_end: Option<Micros>,
    },
    Percentiles {
        samples: Vec<f64>,
        seen: u64,
        latest: Option<Event>,
        window_end: Option<Micros>,
        rng: u64,
    },
    /// A fixed window as versions 2 and 3 saved it, its sum a float
    /// whatever its metrics. Still restores, its sum a float until the
    /// window closes.
    FixedWindow {
        folds: FloatSumFolds,
        window_end: Option<Micros>,
    },
    /// A fixed window: its folds so far, not its events, a sum of integers
    /// exact (version 4). Version 1 saved it as a [`Saved::Window`], which
    /// still restores into it.
    ExactFixedWindow {
        folds: FixedFolds,
        window_end: Option<Micros>,
    },
    /// A `counter`'s count (version 5).
    Counter(Sum),
    /// A `runs`: the last value (`None`: no event yet) and how many events
    /// in a row had it, up to the run's length (version 5).
    Runs {
        value: Option<Option<String>>,
        seen: u64,
    },
    /// A fixed window that folds `median` or `std_dev` as version 5 saved
    /// it: its other folds as [`Saved::ExactFixedWindow`]'s, and those
    /// two's, its deviations unscaled. Still restores.
    SpreadFixedWindow {
        folds: FixedFolds,
        spread: Box<UnscaledSpread>,
        window_end: Option<Micros>,
    },
    /// A `rollup` (version 5).
    Rollup {
        window_end: Option<Micros>,
        sent: u64,
        held: Vec<Event>,
    },
    /// A `fill_in` or `fill_in_last`: when it fills next (`None`: not
    /// filling), when its latest event expires, and `fill_in_last`'s latest
    /// event.
    FillIn {
        next: Option<Micros>,
        expires: Micros,
        latest: Option<Event>,
    },
    /// An `apdex`: when its `dt` ends, its satisfied, tolerated and other
    /// counts, and the latest event.
    Apdex {
        window_end: Option<Micros>,
        counts: [u64; 3],
        latest: Option<Event>,
    },
    /// A fixed window that folds `median` or `std_dev` (version 6): as
    /// [`Saved::SpreadFixedWindow`], its deviations scaled past 2^450.
    ScaledSpreadFixedWindow {
        folds: FixedFolds,
        spread: Box<FixedSpread>,
        window_end: Option<Micros>,
    },
    /// A `predict_linear`: its points, (event time, metric), oldest first.
    PredictLinear(Vec<(Micros, f64)>),
}

/// A group's lifetime where its file holds none (version 1, written before
/// lifetimes were saved), told from a saved 0: no lifetime vigil makes.
pub const LIFETIME_UNSAVED: Micros = Micros::MIN;

fn lifetime_unsaved() -> Micros {
    LIFETIME_UNSAVED
}

impl Saved {
    /// Gives `revive` each event the stage held, which it emits later
    /// with the event's own time.
    pub(crate) fn each_held(&mut self, revive: impl FnMut(&mut Event)) {
        // Every kind named: a new one says whether it holds events.
        match self {
            Saved::Stable { held, .. } | Saved::Rollup { held, .. } => {
                held.iter_mut().for_each(revive);
            }
            Saved::Window { events, latest, .. } => {
                let events = events.iter_mut().map(|(_, event)| event);
                events.chain(latest).for_each(revive);
            }
            Saved::Percentiles { latest, .. } | Saved::Apdex { latest, .. } => {
                latest.iter_mut().for_each(revive);
            }
            Saved::FixedWindow { folds, .. } => folds.held_mut().for_each(revive),
            Saved::ExactFixedWindow { folds, .. } => folds.held_mut().for_each(revive),
            Saved::SpreadFixedWindow { folds, spread, .. } => {
                folds.held_mut().chain(spread.held_mut()).for_each(revive);
            }
            Saved::ScaledSpreadFixedWindow { folds, spread, .. } => {
                folds.held_mut().chain(spread.held_mut()).for_each(revive);
            }
            // A rate stamps its report with its period's end, and extends
            // the one late report itself; a fill is stamped with its own
            // moment, and stops at `expires`.
            Saved::Rate { .. } | Saved::FillIn { .. } => {}
            Saved::By { .. }
            | Saved::Group { .. }
            | Saved::Throttle { .. }
            | Saved::Changed(_)
            | Saved::Ewma(_)
            | Saved::Ddt(_)
            | Saved::Counter(_)
            | Saved::Runs { .. }
            | Saved::PredictLinear(_) => {}
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Saved::Rate { .. } => "rate",
            Saved::By { .. } => "by",
            Saved::Group { .. } => "group",
            Saved::Throttle { .. } => "throttle",
            Saved::Changed(_) => "changed",
            Saved::Stable { .. } => "stable",
            Saved::Ewma(_) => "ewma",
            Saved::Ddt(_) => "ddt",
            Saved::Window { .. } => "window",
            Saved::Percentiles { .. } => "percentiles",
            Saved::FixedWindow { .. }
            | Saved::ExactFixedWindow { .. }
            | Saved::SpreadFixedWindow { .. }
            | Saved::ScaledSpreadFixedWindow { .. } => "fixed window",
            Saved::Counter(_) => "counter",
            Saved::Runs { .. } => "runs",
            Saved::Rollup { .. } => "rollup",
            Saved::FillIn { .. } => "fill_in",
            Saved::Apdex { .. } => "apdex",
            Saved::PredictLinear(_) => "predict_linear",
        }
    }
}

/// Where a walk's entries go: into the state file as they come, or into a
/// `Vec` (tests).
pub trait Saver {
    /// May wait on the disk: a stage builds its entry under its lock and
    /// pushes it after, so its events never wait for a write.
    fn push(&mut self, entry: Saved);

    /// Nothing more will be written (a write failed, or vigil is stopping
    /// and writes its final state instead): a long walk, a `by`'s groups,
    /// stops early.
    fn abandoned(&self) -> bool {
        false
    }
}

impl Saver for Vec<Saved> {
    fn push(&mut self, entry: Saved) {
        Vec::push(self, entry);
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum RestoreError {
    #[error("a {expected} stage found {found} in the saved state")]
    Mismatch {
        expected: &'static str,
        found: &'static str,
    },
    #[error("entry {entry} does not decode: {cause}")]
    Decode { entry: usize, cause: String },
}

impl RestoreError {
    pub fn mismatch(expected: &'static str, found: &Saved) -> Self {
        RestoreError::Mismatch {
            expected,
            found: found.kind(),
        }
    }
}

/// The entries of one tree, handed out in order as they are decoded.
pub struct Restorer<'a> {
    entries: Box<dyn Iterator<Item = Result<Saved, String>> + 'a>,
    taken: usize,
    started: Micros,
    /// How long an event without a TTL lives, in seconds.
    default_ttl: f64,
}

impl<'a> Restorer<'a> {
    /// The entries of a tree restored by a vigil started at `started`.
    pub fn new(entries: impl Iterator<Item = Result<Saved, String>> + 'a, started: Micros) -> Self {
        Restorer {
            entries: Box::new(entries),
            taken: 0,
            started,
            default_ttl: DEFAULT_TTL_SECS,
        }
    }

    /// The entries of a vigil whose events without a TTL live `secs`.
    pub fn default_ttl(self, secs: f64) -> Self {
        Restorer {
            default_ttl: secs,
            ..self
        }
    }

    pub fn from_entries(entries: Vec<Saved>, started: Micros) -> Self {
        Restorer::new(entries.into_iter().map(Ok), started)
    }

    /// When the vigil taking the state back started.
    pub fn started(&self) -> Micros {
        self.started
    }

    /// `at`, a time the saved state says was past, at most the start: one
    /// ahead of it (a clock that jumped, a file vigil did not write) kept
    /// a stage waiting for it, as a throttle's window, for as long.
    pub fn past(&self, at: Micros) -> Micros {
        at.min(self.started)
    }

    /// `at`, when a saved period of `interval` ends, at most one
    /// `interval` after the start: a period that would end later could
    /// only have begun after it, and kept its stage silent until then.
    pub fn due_within(&self, at: Micros, interval: Micros) -> Micros {
        at.min(self.started.saturating_add(interval))
    }

    /// Lets `event`, held across the restart, live at least its TTL from
    /// the start, as a restored index entry does: emitted later with its
    /// own time, long past, it reached the index already expired, and the
    /// index paged `expired` for a series still alive.
    fn revive(&self, event: &mut Event) {
        let down = self.started.saturating_sub(event.time);
        if down <= 0 {
            return;
        }
        let ttl = match event.ttl {
            Some(ttl) if !ttl.is_nan() => f64::from(ttl),
            _ => self.default_ttl,
        };
        let lives = ttl + as_secs(down);
        // Rounded up: rounded down, it could expire just before its due.
        let narrowed = lives as f32;
        event.ttl = Some(if f64::from(narrowed) < lives {
            narrowed.next_up()
        } else {
            narrowed
        });
    }

    /// The next entry, for a stage of kind `expected`.
    pub fn next(&mut self, expected: &'static str) -> Result<Saved, RestoreError> {
        let entry = self.taken;
        self.taken += 1;
        match self.entries.next() {
            Some(Ok(mut saved)) => {
                saved.each_held(|event| self.revive(event));
                Ok(saved)
            }
            Some(Err(cause)) => Err(RestoreError::Decode { entry, cause }),
            None => Err(RestoreError::Mismatch {
                expected,
                found: "the end",
            }),
        }
    }

    /// Every entry must have found its stage; returns how many there were.
    pub fn finish(mut self) -> Result<usize, RestoreError> {
        match self.entries.next() {
            None => Ok(self.taken),
            Some(left) => Err(RestoreError::Mismatch {
                expected: "the end",
                found: left.as_ref().map_or("an undecodable entry", Saved::kind),
            }),
        }
    }
}
