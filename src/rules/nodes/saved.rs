//! A stage's state as vigil writes it to disk, so it survives a restart
//! ([`crate::rules::persist`]). Each stateful stage turns its state into one
//! [`Saved`] entry and back; stateless stages only pass the walk on to their
//! children.
//!
//! Entries are in tree order (a stage before its children, siblings in
//! order) and are read back into a tree compiled from the very text they were
//! saved with, so an entry's position says whose it is. The entry's kind is
//! checked anyway: a mismatch abandons the restore rather than giving a stage
//! another stage's state.

use serde::{Deserialize, Serialize};

use crate::clock::Micros;
use crate::event::Event;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum Saved {
    Rate {
        sum: f64,
        latest: Option<Event>,
        window_end: Micros,
        pending: bool,
    },
    By(Vec<SavedGroup>),
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
}

impl Saved {
    fn kind(&self) -> &'static str {
        match self {
            Saved::Rate { .. } => "rate",
            Saved::By(_) => "by",
            Saved::Throttle { .. } => "throttle",
            Saved::Changed(_) => "changed",
            Saved::Stable { .. } => "stable",
            Saved::Ewma(_) => "ewma",
            Saved::Ddt(_) => "ddt",
            Saved::Window { .. } => "window",
            Saved::Percentiles { .. } => "percentiles",
        }
    }
}

/// One `by` group: its key, when it may be freed, and its stages' entries.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedGroup {
    pub key: Vec<Option<String>>,
    pub free_at: Micros,
    pub stages: Vec<Saved>,
}

#[derive(Debug, PartialEq, thiserror::Error)]
#[error("a {expected} stage found {found} in the saved state")]
pub struct Mismatch {
    expected: &'static str,
    found: &'static str,
}

impl Mismatch {
    pub fn new(expected: &'static str, found: &Saved) -> Self {
        Mismatch {
            expected,
            found: found.kind(),
        }
    }
}

/// The entries of one tree (or one `by` group), handed out in order.
pub struct Restorer {
    entries: std::vec::IntoIter<Saved>,
}

impl Restorer {
    pub fn new(entries: Vec<Saved>) -> Self {
        Restorer {
            entries: entries.into_iter(),
        }
    }

    /// The next entry, for a stage of kind `expected`.
    pub fn next(&mut self, expected: &'static str) -> Result<Saved, Mismatch> {
        self.entries.next().ok_or(Mismatch {
            expected,
            found: "no entry",
        })
    }

    /// Every entry must have found its stage.
    pub fn finish(mut self) -> Result<(), Mismatch> {
        match self.entries.next() {
            None => Ok(()),
            Some(left) => Err(Mismatch {
                expected: "no further",
                found: left.kind(),
            }),
        }
    }
}
