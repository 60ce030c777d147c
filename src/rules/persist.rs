//! Stream state across restarts. Riemann forgets every window, counter and
//! `changed_state` when it restarts, so the first events after a restart can
//! page again for what had already paged. vigil writes its stages' state to
//! `--data-dir/streams.state` with every index snapshot (periodically and at
//! shutdown, see [`crate::snapshot::Snapshots`]) and reads it back at start,
//! before the first event.
//!
//! The file holds the rule text the state belongs to. At start that text is
//! compiled again, the state is restored into that tree (where each entry
//! finds its stage by position), and the tree vigil starts with adopts it as
//! a reload would ([`super::reload`]): unchanged stages keep their state,
//! changed ones start empty. Editing the rule file while vigil is down is
//! therefore the same as a reload.
//!
//! Times are the clock's (wall-clock microseconds), so a window due while
//! vigil was down closes on the first tick, and a throttle counts the
//! downtime as time passed.
//!
//! # Format (version 6)
//!
//! ```text
//! "VIGILSTS"  u32 version (little-endian)
//! postcard { name, text }
//! postcard entry × n   (see nodes::saved: in tree order, streamed as made)
//! u32 CRC32 of every byte before it (little-endian)
//! ```
//!
//! Version 3 encodes with postcard what versions 1 and 2 encoded as CBOR:
//! a `by` of a million groups decoded several times slower from CBOR, whose
//! every struct names its fields. Postcard names nothing, so fields and
//! enum variants are known by their position: changing their order or
//! meaning needs a new version. Kinds appended for a new stage (`counter`,
//! `runs`, `fill_in`, `apdex`, `predict_linear`) do not: only rules with that stage save them, and a vigil
//! without it refuses their text (which no longer compiles) before it
//! reads an entry.
//!
//! Version 2 saves a fixed window's folds where version 1 saved its events;
//! version 4 its sum as Riemann's, exactly while its metrics are integers
//! (a new entry kind: version 3's still decode, their sums floats); version
//! 5 a fixed window's `median` and `std_dev` so far (a new entry kind, only
//! for a window that folds either) and `rollup`'s state; version 6 that
//! window's deviations scaled past 2^450 (a new entry kind: squares of
//! metrics near 1e200 passed f64's range; version 5's restore unscaled).
//! All are still read. A vigil that reads only older versions refuses a newer file
//! by its number rather than failing on its first entry.
//!
//! A file that does not check out, or whose rule text no longer compiles, is
//! reported and skipped: the stages start empty, as they did before vigil kept
//! them.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::clock::Micros;
use crate::snapshot::{CrcWriter, SnapshotError, interruption, replace_file};

use super::engine::Rules;
use super::nodes::Children;
use super::nodes::saved::{RestoreError, Restorer, Saved, Saver};
use super::{EnvPolicy, RuleText};

/// The file's name inside the data directory.
pub const FILE_NAME: &str = "streams.state";

const MAGIC: &[u8; 8] = b"VIGILSTS";
const VERSION: u32 = 6;
/// The oldest version read.
const FIRST_VERSION: u32 = 1;
/// The first version in postcard; those before it are CBOR.
const POSTCARD_VERSION: u32 = 3;
const HEADER_LEN: usize = MAGIC.len() + 4;
const CRC_LEN: usize = 4;
/// What the encoder's writes gather into before each is checksummed.
const CRC_BUFFER: usize = 64 * 1024;

/// What the entries belong to.
#[derive(Serialize, Deserialize)]
struct Header {
    name: String,
    text: String,
}

/// Why the stream state could not be written or taken back.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {cause}", path.display())]
    Read { path: PathBuf, cause: io::Error },
    #[error(transparent)]
    Write(#[from] SnapshotError),
    #[error("too short to be a stream state file ({0} bytes): truncated")]
    TooShort(usize),
    #[error("not a vigil stream state file (bad magic)")]
    BadMagic,
    #[error(
        "unsupported stream state version {0} (this vigil reads versions {FIRST_VERSION} to {VERSION})"
    )]
    UnsupportedVersion(u32),
    #[error(
        "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): truncated or corrupted"
    )]
    Checksum { stored: u32, computed: u32 },
    #[error("the header does not decode: {0}")]
    Decode(String),
    #[error("the rules it was saved with no longer compile:\n{0}")]
    Rules(String),
    #[error("it does not fit the rules it was saved with: {0}")]
    Restore(#[from] RestoreError),
}

/// What was taken back at start.
#[derive(Debug, PartialEq)]
pub struct Restored {
    /// Entries: one per stateful stage, plus one per `by` group.
    pub entries: usize,
    /// The rule file differs from the one the state was saved with.
    pub rules_changed: bool,
}

/// How a write went.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// One per stateful stage, plus one per `by` group.
    pub entries: usize,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Which write of the stream state it is, and so what may cut it short.
#[derive(Debug, Clone)]
pub enum Occasion {
    /// The final write, at shutdown: nothing does.
    Final,
    /// A periodic write: abandoned once its token is cancelled (vigil
    /// stopping writes its final state instead), and given up to a reload
    /// waiting to swap the rules (the next periodic write saves theirs).
    Periodic(CancellationToken),
    /// A periodic write after one that gave way: abandoned as one, but
    /// given up to no reload, or reloads every few seconds, each during a
    /// long write, would keep the state from ever being written.
    Overdue(CancellationToken),
}

impl Occasion {
    /// Why a write of `rules` must stop short now, if it must.
    fn interrupted(&self, rules: &Rules) -> Option<SnapshotError> {
        match self {
            Occasion::Final => None,
            Occasion::Periodic(stop) | Occasion::Overdue(stop) if stop.is_cancelled() => {
                Some(SnapshotError::Abandoned)
            }
            Occasion::Overdue(_) => None,
            Occasion::Periodic(_) if rules.reload_waiting() => Some(SnapshotError::GaveWay),
            Occasion::Periodic(_) => None,
        }
    }
}

/// Encodes each entry into the file as the walk makes it. The first error
/// is kept and the rest of the walk writes nothing; so once the write is
/// interrupted ([`Occasion`]).
struct PostcardSaver<'a, W: Write> {
    out: W,
    /// Each entry is encoded here first and written whole.
    buffer: Vec<u8>,
    entries: usize,
    failed: Option<io::Error>,
    occasion: &'a Occasion,
    rules: &'a Rules,
}

impl<W: Write> PostcardSaver<'_, W> {
    fn write<T: Serialize>(&mut self, value: &T) -> io::Result<()> {
        self.buffer.clear();
        self.buffer = postcard::to_extend(value, std::mem::take(&mut self.buffer))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.out.write_all(&self.buffer)
    }
}

impl<W: Write> Saver for PostcardSaver<'_, W> {
    fn push(&mut self, entry: Saved) {
        // Once stopped, the walk's end fails the write (`save`).
        if self.abandoned() {
            return;
        }
        match self.write(&entry) {
            Ok(()) => self.entries += 1,
            Err(e) => self.failed = Some(e),
        }
    }

    fn abandoned(&self) -> bool {
        self.failed.is_some() || self.occasion.interrupted(self.rules).is_some()
    }
}

/// Writes the running rules' state into `dir` (which must exist),
/// atomically. `None` when the rules were compiled without their text and
/// have nothing to save it with. A write the `occasion` interrupts fails
/// with why ([`SnapshotError::Abandoned`], [`SnapshotError::GaveWay`]), its
/// temporary file removed and the file before it left in place.
pub fn save(rules: &Rules, dir: &Path, occasion: &Occasion) -> Result<Option<Written>, StateError> {
    let started = Instant::now();
    let mut interrupted = None;
    let written = rules.saving(|text, roots| {
        replace_file(&dir.join(FILE_NAME), |out| {
            // Buffered before the checksum, not only after it: entries come
            // a few bytes per write, and a CRC32 taken a few bytes at a time
            // ran at a fraction of its speed over whole buffers.
            let mut out = BufWriter::with_capacity(CRC_BUFFER, CrcWriter::new(out));
            out.write_all(MAGIC)?;
            out.write_all(&VERSION.to_le_bytes())?;
            let header = Header {
                name: text.name.clone(),
                text: text.text.clone(),
            };
            let mut saver = PostcardSaver {
                out: &mut out,
                buffer: Vec::new(),
                entries: 0,
                failed: None,
                occasion,
                rules,
            };
            saver.write(&header)?;
            roots.save(&mut saver);
            // Checked before the walk lets go of the rules: a reload
            // waiting now stays waiting until then.
            interrupted = occasion.interrupted(rules);
            if let Some(e) = saver.failed {
                return Err(e);
            }
            if interrupted.is_some() {
                // The walk may have stopped short with no push to fail.
                return Err(interruption());
            }
            let entries = saver.entries;
            let out = out.into_inner().map_err(io::IntoInnerError::into_error)?;
            Ok((entries, out.finish()?))
        })
    });
    let Some(written) = written else {
        return Ok(None);
    };
    let (entries, bytes) = written.map_err(|e| interrupted.unwrap_or(e))?;
    Ok(Some(Written {
        entries,
        bytes,
        elapsed: started.elapsed(),
    }))
}

/// A checked file: what it belongs to, and its entries still encoded.
struct Decoded<'a> {
    version: u32,
    header: Header,
    entries: &'a [u8],
}

/// Checks a whole file and decodes its header.
fn decode(bytes: &[u8]) -> Result<Decoded<'_>, StateError> {
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(StateError::TooShort(bytes.len()));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(StateError::BadMagic);
    }
    let version = u32::from_le_bytes(bytes[MAGIC.len()..HEADER_LEN].try_into().expect("4 bytes"));
    if !(FIRST_VERSION..=VERSION).contains(&version) {
        return Err(StateError::UnsupportedVersion(version));
    }
    let (covered, stored) = bytes.split_at(bytes.len() - CRC_LEN);
    let stored = u32::from_le_bytes(stored.try_into().expect("4 bytes"));
    let computed = crc32fast::hash(covered);
    if stored != computed {
        return Err(StateError::Checksum { stored, computed });
    }
    let body = &covered[HEADER_LEN..];
    let decoded = if version >= POSTCARD_VERSION {
        // Nothing saved is recursive, so no file can nest deep enough to
        // exhaust the stack; a length larger than what is left of the file
        // is an error, and serde preallocates at most 1 MiB for any Vec.
        postcard::take_from_bytes(body).map_err(|e| e.to_string())
    } else {
        // ciborium bounds its recursion.
        let mut rest = body;
        ciborium::from_reader(&mut rest)
            .map(|header| (header, rest))
            .map_err(|e| e.to_string())
    };
    let (header, entries) = decoded.map_err(StateError::Decode)?;
    Ok(Decoded {
        version,
        header,
        entries,
    })
}

/// The entries in `body`, encoded as `version` has them, decoded one at a
/// time as the restore asks for them.
fn entries(mut body: &[u8], version: u32, started: Micros) -> Restorer<'_> {
    if version >= POSTCARD_VERSION {
        return Restorer::new(
            std::iter::from_fn(move || {
                (!body.is_empty()).then(|| {
                    let (entry, rest) =
                        postcard::take_from_bytes(body).map_err(|e| e.to_string())?;
                    body = rest;
                    Ok(entry)
                })
            }),
            started,
        );
    }
    // The size `ciborium::from_reader` gives the buffer it zeroes on every
    // call, once per entry: millions of times for a big `by`.
    let mut scratch = vec![0; 4096];
    Restorer::new(
        std::iter::from_fn(move || {
            (!body.is_empty()).then(|| {
                ciborium::de::from_reader_with_buffer(&mut body, &mut scratch)
                    .map_err(|e: ciborium::de::Error<io::Error>| e.to_string())
            })
        }),
        started,
    )
}

/// Gives `roots`, compiled from `text` and not running yet, the state saved
/// in `dir`, for a vigil started at `started` (the clock's time) whose
/// events without a TTL live `default_ttl` seconds. Never fails: a file
/// that cannot be used is logged with the reason, and the stages start
/// empty.
pub fn restore(roots: &Children, text: &RuleText, dir: &Path, started: Micros, default_ttl: f64) {
    let loading = Instant::now();
    let path = dir.join(FILE_NAME);
    let restored = match fs::read(&path) {
        Ok(bytes) => restore_bytes(roots, text, &bytes, started, default_ttl).map(Some),
        Err(cause) if cause.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(cause) => Err(StateError::Read {
            path: path.clone(),
            cause,
        }),
    };
    match restored {
        Ok(None) => tracing::info!(
            path = %path.display(),
            "No saved stream state; the stages start empty."
        ),
        Ok(Some(restored)) if restored.rules_changed => tracing::info!(
            entries = restored.entries,
            elapsed = ?loading.elapsed(),
            "Restored the stream state of the last run. The rules changed meanwhile: as on a reload, only unchanged stages keep theirs."
        ),
        Ok(Some(restored)) => tracing::info!(
            entries = restored.entries,
            elapsed = ?loading.elapsed(),
            "Restored the stream state of the last run."
        ),
        // The file may be fine, the disk not: the next write tells.
        Err(error @ StateError::Read { .. }) => tracing::error!(
            %error,
            "Ignoring the saved stream state; the stages start empty."
        ),
        Err(error) => crate::snapshot::set_aside(
            &path,
            &error,
            "Ignoring the saved stream state; the stages start empty.",
        ),
    }
}

/// What [`restore`] does with the file's bytes, returning what went wrong
/// instead of logging it.
pub fn restore_bytes(
    roots: &Children,
    text: &RuleText,
    bytes: &[u8],
    started: Micros,
    default_ttl: f64,
) -> Result<Restored, StateError> {
    let decoded = decode(bytes)?;
    let from = entries(decoded.entries, decoded.version, started).default_ttl(default_ttl);
    restore_from(roots, text, &decoded.header, from)
}

/// Restores the entries into a tree compiled from the text they were saved
/// with, which `roots` then adopts stage by stage.
fn restore_from(
    roots: &Children,
    text: &RuleText,
    saved: &Header,
    mut from: Restorer<'_>,
) -> Result<Restored, StateError> {
    // The tree never runs, so a secret missing from the environment now, or
    // a TLS file removed with its output, does not matter to it.
    let (_, old) =
        super::load(&saved.name, &saved.text, EnvPolicy::StateOnly).map_err(StateError::Rules)?;
    old.roots.restore(&mut from)?;
    let entries = from.finish()?;
    roots.adopt(&old.roots);
    Ok(Restored {
        entries,
        rules_changed: saved.text != text.text,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::{Clock, ManualClock, Micros, SharedClock, secs_to_micros};
    use crate::event::{Event, Metric};
    use crate::index::{DEFAULT_TTL_SECS, Index, IndexConfig};
    use crate::outputs::OutputSink;
    use crate::rules::testing::{Recorder, TEST_EPOCH, advance};
    use crate::streams::Streams;

    fn text(streams: &str) -> RuleText {
        RuleText {
            name: "persist.vigil".to_owned(),
            text: format!("output out = forward(host: \"127.0.0.1\")\nstreams {{\n{streams}\n}}\n"),
        }
    }

    /// One life of vigil: rules on a virtual clock that took back what the
    /// data directory held when they started.
    struct Life {
        clock: Arc<ManualClock>,
        index: Arc<Index>,
        rules: Rules,
        out: Arc<Recorder>,
    }

    impl Life {
        fn start(streams: &str, dir: &Path, at_secs: f64) -> Life {
            Life::start_with(streams, at_secs, |roots, text, started| {
                restore(roots, text, dir, started, DEFAULT_TTL_SECS);
            })
        }

        /// Started with `entries` as if a file held them: one an earlier
        /// build wrote.
        fn start_from(streams: &str, entries: Vec<Saved>, at_secs: f64) -> Life {
            Life::start_with(streams, at_secs, |roots, text, started| {
                let header = Header {
                    name: text.name.clone(),
                    text: text.text.clone(),
                };
                let from = Restorer::from_entries(entries, started);
                restore_from(roots, text, &header, from).unwrap();
            })
        }

        fn start_with(
            streams: &str,
            at_secs: f64,
            restore: impl FnOnce(&Children, &RuleText, Micros),
        ) -> Life {
            let text = text(streams);
            let (_, compiled) = crate::rules::load(&text.name, &text.text, EnvPolicy::Strict)
                .unwrap_or_else(|e| panic!("{e}"));
            let started = TEST_EPOCH + secs_to_micros(at_secs);
            restore(&compiled.roots, &text, started);
            let clock = Arc::new(ManualClock::new(started));
            let index = Arc::new(Index::new(IndexConfig::default()));
            let out = Arc::new(Recorder::default());
            let shared: SharedClock = clock.clone();
            let rules = Rules::new(
                compiled.roots,
                Some(Arc::new(text)),
                vec![out.clone()],
                index.clone(),
                shared,
            );
            Life {
                clock,
                index,
                rules,
                out,
            }
        }

        fn send(&self, host: &str, state: Option<&str>, metric: Option<f64>) {
            self.rules.process(&[Event {
                host: Some(host.to_owned()),
                service: Some("svc".to_owned()),
                state: state.map(str::to_owned),
                metric: metric.map(Metric::Float),
                time: self.clock.now(),
                ttl: Some(3600.0),
                ..Event::default()
            }]);
        }

        fn advance_to(&self, secs: f64) {
            let target = TEST_EPOCH + secs_to_micros(secs);
            advance(&self.clock, &self.index, &self.rules, target);
        }

        /// What reached `out`, as (host, state, metric), and forgets it.
        fn took(&self) -> Vec<(String, Option<String>, Option<f64>)> {
            std::mem::take(&mut *self.out.events.lock())
                .into_iter()
                .map(|e| {
                    (
                        e.host_str().to_owned(),
                        e.state,
                        e.metric.map(Metric::as_f64),
                    )
                })
                .collect()
        }

        fn stop(self, dir: &Path) {
            assert!(save(&self.rules, dir, &Occasion::Final).unwrap().is_some());
        }
    }

    fn out(
        host: &str,
        state: Option<&str>,
        metric: Option<f64>,
    ) -> (String, Option<String>, Option<f64>) {
        (host.to_owned(), state.map(str::to_owned), metric)
    }

    #[test]
    fn changed_state_does_not_fire_again_for_what_it_saw_before_the_restart() {
        let dir = tempfile::tempdir().unwrap();
        // A comment longer than ciborium's 4 KiB scratch buffer.
        let rules = &format!("  # {}\n  changed_state {{ out }}", "x".repeat(10_000));
        let first = Life::start(rules, dir.path(), 0.0);
        first.send("a", Some("ok"), None);
        first.send("b", Some("critical"), None);
        assert_eq!(first.took().len(), 2);
        first.stop(dir.path());

        let second = Life::start(rules, dir.path(), 30.0);
        second.send("a", Some("ok"), None);
        second.send("b", Some("critical"), None);
        assert_eq!(second.took(), [], "no transition: nothing pages again");
        second.send("b", Some("ok"), None);
        assert_eq!(second.took(), [out("b", Some("ok"), None)]);
    }

    /// When a held event came is not saved: a restored one timed far
    /// ahead is held as the index holds a restored entry, its TTL plus 5
    /// minutes from the start, not for ever.
    #[test]
    fn coalesce_forgets_a_restored_event_timed_far_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let rules = "  coalesce(5s) { count { out } }";
        let first = Life::start(rules, dir.path(), 0.0);
        first.rules.process(&[Event {
            host: Some("a".to_owned()),
            time: TEST_EPOCH + secs_to_micros(365.0 * 86_400.0),
            ttl: Some(10.0),
            ..Event::default()
        }]);
        first.stop(dir.path());

        let second = Life::start(rules, dir.path(), 1_000.0);
        second.advance_to(1_000.0 + 315.0);
        assert!(
            !second.took().is_empty(),
            "held until 310 s after the start"
        );
        second.advance_to(5_000.0);
        assert_eq!(second.took().len(), 0, "then forgotten");
    }

    /// A build before rates bounded a far-ahead time saved it as sent: the
    /// restored rate stops its TTL plus 5 minutes after the start, as the
    /// index expires a restored entry, not never.
    #[test]
    fn a_restored_rate_timed_far_ahead_stops() {
        let started = TEST_EPOCH + secs_to_micros(1_000.0);
        let latest = Event {
            host: Some("a".to_owned()),
            metric: Some(Metric::Float(1.0)),
            time: TEST_EPOCH + secs_to_micros(365.0 * 86_400.0),
            ttl: Some(10.0),
            ..Event::default()
        };
        let saved = vec![Saved::Rate {
            sum: 0.0,
            latest: Some(latest),
            window_end: started + secs_to_micros(10.0),
            pending: false,
        }];
        let life = Life::start_from("  rate(10s) { out }", saved, 1_000.0);
        life.advance_to(1_000.0 + 310.0);
        assert_eq!(life.took().len(), 31, "windows ending at 10 s … 310 s");
        life.advance_to(5_000.0);
        assert_eq!(life.took().len(), 0, "then stopped");
    }

    /// An event of host "a" at `at` (the clock's time), alive an hour.
    fn held_event(at: Micros, metric: f64) -> Event {
        Event {
            host: Some("a".to_owned()),
            service: Some("svc".to_owned()),
            state: Some("ok".to_owned()),
            metric: Some(Metric::Float(metric)),
            time: at,
            ttl: Some(3600.0),
            ..Event::default()
        }
    }

    /// Every timed stage restored from a clock that was ahead of this one
    /// (times saved a year past the start: a clock that jumped back, a file
    /// vigil did not write) fires first within its `dt`, once, then at its
    /// pace: no period waits longer (each stayed silent until then before
    /// its end was bounded), none is caught up in a burst.
    #[test]
    fn stages_restored_from_a_clock_ahead_fire_within_a_dt_and_at_their_pace() {
        let started = TEST_EPOCH + secs_to_micros(1_000.0);
        let far = started + secs_to_micros(365.0 * 86_400.0);
        let event = held_event(started, 1.0);
        let window = |events: Vec<(Micros, Event)>, latest: Vec<Event>| Saved::Window {
            events,
            latest,
            window_end: Some(far),
        };
        // The rules, what they saved, and how many times each fires in the
        // first 5 dt: those that go on while their series lives, 5.
        let cases = [
            (
                "  rate(10s) { out }",
                Saved::Rate {
                    sum: 1.0,
                    latest: Some(Event {
                        time: far,
                        ..event.clone()
                    }),
                    window_end: far,
                    pending: true,
                },
                5,
            ),
            (
                "  rate(10s) { out }",
                Saved::Rate {
                    sum: 1.0,
                    latest: Some(event.clone()),
                    window_end: far,
                    pending: true,
                },
                5,
            ),
            (
                r#"  apdex(10s, satisfied: "metric < 2", tolerated: "false") { out }"#,
                Saved::Apdex {
                    window_end: Some(far),
                    counts: [1, 0, 0],
                    latest: Some(event.clone()),
                },
                1,
            ),
            (
                "  rollup(1, 10s) { out }",
                Saved::Rollup {
                    window_end: Some(far),
                    sent: 1,
                    held: vec![event.clone()],
                },
                1,
            ),
            (
                "  percentiles(10s, [0.5]) { out }",
                Saved::Percentiles {
                    samples: vec![1.0],
                    seen: 1,
                    latest: Some(event.clone()),
                    window_end: Some(far),
                    rng: 1,
                },
                1,
            ),
            (
                "  fixed_time_window(10s) { count { out } }",
                window(vec![(far, event.clone())], Vec::new()),
                1,
            ),
            (
                "  fixed_time_window(10s) { count { out } }",
                window(vec![(started, event.clone())], Vec::new()),
                1,
            ),
            (
                "  batch(5, 10s) { count { out } }",
                window(vec![(far, event.clone())], Vec::new()),
                1,
            ),
            (
                "  coalesce(10s) { count { out } }",
                window(Vec::new(), vec![event.clone()]),
                5,
            ),
            (
                r#"  fill_in(10s, {service: "gap"}) { out }"#,
                Saved::FillIn {
                    next: Some(far),
                    expires: far + secs_to_micros(3_600.0),
                    latest: None,
                },
                5,
            ),
            (
                "  stable(10s) { out }",
                Saved::Stable {
                    value: Some(Some("ok".to_owned())),
                    since: far,
                    held: vec![event.clone()],
                },
                1,
            ),
        ];
        for (rules, entry, fires) in cases {
            let life = Life::start_from(rules, vec![entry], 1_000.0);
            life.advance_to(1_000.0 + 10.0);
            assert_eq!(life.took().len(), 1, "{rules}: once, within the first dt");
            life.advance_to(1_000.0 + 50.0);
            assert_eq!(life.took().len(), fires - 1, "{rules}: then at its pace");
        }
    }

    /// After a long restart a rate's saved period is reported once; the
    /// periods vigil was down for are no silence of the series (as for
    /// `fill_in`): no zeros for them, caught up in a burst.
    #[test]
    fn a_rate_restored_after_a_long_restart_reports_its_period_once() {
        let started = TEST_EPOCH + secs_to_micros(10_000.0);
        let came = started - secs_to_micros(3_600.0);
        let saved = vec![Saved::Rate {
            sum: 10.0,
            latest: Some(Event {
                ttl: Some(86_400.0),
                ..held_event(came, 1.0)
            }),
            window_end: came + secs_to_micros(5.0),
            pending: true,
        }];
        let life = Life::start_from("  rate(10s) { out }", saved, 10_000.0);
        life.advance_to(10_000.0 + 9.0);
        assert_eq!(life.took(), [out("a", Some("ok"), Some(1.0))]);
        life.advance_to(10_000.0 + 50.0);
        assert_eq!(life.took().len(), 5, "then every 10 s");
    }

    /// The saved period is reported with its true end, long past after a
    /// long restart: with only its TTL plus `dt` it reached the index
    /// already expired, and the index paged `expired` for a series still
    /// alive at the next tick. It lives that long from the report, as a
    /// restored index entry lives its TTL from the start.
    #[test]
    fn a_rate_restored_after_its_ttl_reports_no_expiry() {
        let started = TEST_EPOCH + secs_to_micros(10_000.0);
        let came = started - secs_to_micros(300.0);
        let saved = vec![Saved::Rate {
            sum: 10.0,
            latest: Some(Event {
                ttl: Some(60.0),
                ..held_event(came, 1.0)
            }),
            window_end: came + secs_to_micros(5.0),
            pending: true,
        }];
        let rules = "  rate(10s) { index out }\n  expired { out }";
        let life = Life::start_from(rules, saved, 10_000.0);
        life.advance_to(10_000.0 + 2.0);
        assert_eq!(life.took(), [out("a", Some("ok"), Some(1.0))]);
        let reported = life.index.get("a", "svc").unwrap();
        assert_eq!(reported.time, came + secs_to_micros(5.0), "its true end");
        let lives = secs_to_micros(f64::from(reported.ttl.unwrap()));
        assert!(
            reported.time + lives >= started + secs_to_micros(70.0),
            "{reported:?}"
        );
        life.send("a", Some("ok"), Some(5.0));
        life.advance_to(10_000.0 + 30.0);
        let alive = out("a", Some("ok"), Some(0.0));
        assert_eq!(
            life.took(),
            [out("a", Some("ok"), Some(0.5)), alive.clone(), alive],
            "no expired: the rate's entry lived till the next"
        );
    }

    /// As a rate's: every stage holding events across a restart emits them
    /// with their own time, long past after a long restart. Each must live
    /// at least its TTL from the start, as a restored index entry does, or
    /// it reached the index already expired and the index paged `expired`
    /// for a series still alive at the next tick.
    #[test]
    fn events_held_across_a_restart_after_their_ttl_report_no_expiry() {
        // (stage, metrics it holds, whether another series' event closes
        // its window after the restart)
        let cases = [
            (
                "fixed_time_window(10s) { sum { index out } }",
                &[1.0][..],
                false,
            ),
            (
                "fixed_time_window(10s) { median { index out } }",
                &[1.0],
                false,
            ),
            ("batch(5, 10s) { max { index out } }", &[1.0], false),
            ("fixed_event_window(2) { max { index out } }", &[5.0], true),
            ("moving_event_window(2) { max { index out } }", &[5.0], true),
            ("moving_time_window(1d) { max { index out } }", &[5.0], true),
            ("coalesce(10s) { max { index out } }", &[1.0], false),
            ("percentiles(10s, [0.5]) { index out }", &[1.0], false),
            (
                r#"apdex(10s, satisfied: "metric < 2", tolerated: "false") { index out }"#,
                &[1.0],
                false,
            ),
            ("rollup(1, 10s) { index out }", &[1.0, 2.0], false),
            ("stable(10s) { index out }", &[1.0], false),
        ];
        let at = |secs| TEST_EPOCH + secs_to_micros(secs);
        let mut paged = Vec::new();
        // None: the default TTL, 60 s.
        for ttl in [Some(60.0), None] {
            for (stage, held, closed_by_another) in cases {
                let dir = tempfile::tempdir().unwrap();
                let rules = &format!("  {stage}\n  expired {{ out }}");
                let first = Life::start(rules, dir.path(), 0.0);
                for &metric in held {
                    first.rules.process(&[Event {
                        ttl,
                        ..held_event(first.clock.now(), metric)
                    }]);
                }
                first.stop(dir.path());

                let second = Life::start(rules, dir.path(), 10_000.0);
                if closed_by_another {
                    second.send("b", Some("ok"), Some(1.0));
                }
                second.advance_to(10_000.0 + 30.0);
                let took = second.took();
                assert!(
                    took.iter().any(|(host, ..)| host == "a"),
                    "{stage}: {took:?}"
                );
                if took
                    .iter()
                    .any(|(_, state, _)| state.as_deref() == Some("expired"))
                {
                    paged.push((stage, ttl));
                    continue;
                }
                // A percentile is stamped with its period's end.
                let (service, time) = if stage.starts_with("percentiles") {
                    ("svc 0.5", at(10.0))
                } else {
                    ("svc", at(0.0))
                };
                let reported = second.index.get("a", service).unwrap();
                assert_eq!(reported.time, time, "{stage}: its true time");
                let lives = secs_to_micros(f64::from(reported.ttl.unwrap()));
                assert!(
                    reported.time + lives >= at(10_060.0),
                    "{stage}: {reported:?}"
                );
            }
        }
        assert_eq!(paged, Vec::<(&str, Option<f32>)>::new(), "paged expired");
    }

    /// A moment restored ahead of the start counts as the start: a
    /// `throttle` whose window began far ahead dropped every event until
    /// then, and a `stable` held its events as long.
    #[test]
    fn a_moment_restored_far_ahead_counts_as_the_start() {
        let started = TEST_EPOCH + secs_to_micros(1_000.0);
        let far = started + secs_to_micros(365.0 * 86_400.0);
        let throttle = Saved::Throttle {
            window_start: far,
            passed: 1,
        };
        let life = Life::start_from("  throttle(1, 10s) { out }", vec![throttle], 1_000.0);
        life.advance_to(1_000.0 + 10.0);
        life.send("a", Some("ok"), Some(1.0));
        assert_eq!(life.took().len(), 1, "throttle: a new window");

        let stable = Saved::Stable {
            value: Some(Some("ok".to_owned())),
            since: far,
            held: vec![held_event(started, 1.0)],
        };
        let life = Life::start_from("  stable(10s) { out }", vec![stable], 1_000.0);
        life.advance_to(1_000.0 + 10.0);
        assert_eq!(life.took().len(), 1, "stable: released");
    }

    /// A moving time window's event restored as come far ahead stayed in
    /// it until then, and kept every later one in behind it.
    #[test]
    fn a_moving_windows_event_restored_as_come_far_ahead_leaves_in_time() {
        let started = TEST_EPOCH + secs_to_micros(1_000.0);
        let far = started + secs_to_micros(365.0 * 86_400.0);
        let saved = Saved::Window {
            events: vec![(far, held_event(started, 1.0))],
            latest: Vec::new(),
            window_end: None,
        };
        let rules = "  moving_time_window(10s) { count { out } }";
        let life = Life::start_from(rules, vec![saved], 1_000.0);
        life.advance_to(1_000.0 + 20.0);
        life.send("a", Some("ok"), Some(2.0));
        assert_eq!(life.took(), [out("a", Some("ok"), Some(1.0))]);
    }

    #[test]
    fn groups_keyed_by_numbers_and_attributes_are_found_again() {
        // Looked up by values borrowed from each event, stored as text.
        let dir = tempfile::tempdir().unwrap();
        let rules = "  by(host, metric, env) { changed(state) { out } }";
        let event = |life: &Life, metric: i64| Event {
            host: Some("a".to_owned()),
            state: Some("ok".to_owned()),
            metric: Some(Metric::Int(metric)),
            attributes: vec![("env".to_owned(), "prod".to_owned())],
            time: life.clock.now(),
            ttl: Some(3600.0),
            ..Event::default()
        };
        let first = Life::start(rules, dir.path(), 0.0);
        first.rules.process(&[event(&first, 7), event(&first, 8)]);
        assert_eq!(first.took().len(), 2);
        first.stop(dir.path());

        let second = Life::start(rules, dir.path(), 1.0);
        second
            .rules
            .process(&[event(&second, 7), event(&second, 8), event(&second, 9)]);
        assert_eq!(
            second.took(),
            [out("a", Some("ok"), Some(9.0))],
            "only the new group"
        );
    }

    #[test]
    fn windows_throttles_and_rates_go_on_where_they_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let rules = r#"  where host = "w" { fixed_event_window(3) { count { out } } }
  where host = "t" { throttle(2, 60s) { out } }
  where host = "r" { rate(10s) { out } }"#;
        let first = Life::start(rules, dir.path(), 0.0);
        first.send("w", None, Some(1.0));
        first.send("w", None, Some(1.0));
        first.send("t", None, None);
        first.send("t", None, None);
        first.send("r", None, Some(10.0));
        first.advance_to(1.0);
        first.send("r", None, Some(20.0));
        assert_eq!(first.took(), [out("t", None, None), out("t", None, None)]);
        first.stop(dir.path());

        let second = Life::start(rules, dir.path(), 2.0);
        second.send("w", None, Some(1.0));
        assert_eq!(
            second.took(),
            [out("w", None, Some(3.0))],
            "the third event closes the window"
        );
        second.send("t", None, None);
        assert_eq!(second.took(), [], "still two in this minute");
        second.advance_to(10.0);
        assert_eq!(
            second.took(),
            [out("r", None, Some(3.0))],
            "(10 + 20) / 10s"
        );
        second.advance_to(61.0);
        assert_eq!(
            second.took().len(),
            5,
            "the rate goes on reporting, 0 per second"
        );
        second.send("t", None, None);
        assert_eq!(second.took(), [out("t", None, None)], "a new minute");
    }

    /// Riemann's `counter` and `runs` start from nothing after a restart:
    /// vigil's go on.
    #[test]
    fn counters_and_runs_go_on_where_they_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let rules = r#"  where host = "c" { by(host) { counter { out } } }
  where host = "r" { runs(3, state) { out } }"#;
        let first = Life::start(rules, dir.path(), 0.0);
        first.send("c", None, Some(2.0));
        first.send("c", None, Some(3.0));
        first.send("r", Some("critical"), None);
        first.send("r", Some("critical"), None);
        assert_eq!(
            first.took(),
            [out("c", None, Some(2.0)), out("c", None, Some(5.0))]
        );
        first.stop(dir.path());

        let second = Life::start(rules, dir.path(), 10.0);
        second.send("c", None, Some(4.0));
        second.send("r", Some("critical"), None);
        assert_eq!(
            second.took(),
            [out("c", None, Some(9.0)), out("r", Some("critical"), None)],
            "the count goes on; the third critical in a row passes"
        );
    }

    /// A fixed window's median and deviations so far are saved with its
    /// other folds: the window closes on the events of both lives.
    #[test]
    fn a_fixed_windows_median_and_std_dev_go_on_where_they_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let rules = "  fixed_event_window(4) { median { out } std_dev { out } }";
        let first = Life::start(rules, dir.path(), 0.0);
        for m in [2.0, 4.0, 9.0] {
            first.send("w", None, Some(m));
        }
        assert_eq!(first.took(), []);
        first.stop(dir.path());

        let second = Life::start(rules, dir.path(), 1.0);
        second.send("w", None, Some(1.0));
        // 1, 2, 4, 9: the median at rank 2 is 4; the mean 4, the squared
        // deviations 9 + 4 + 0 + 25 = 38 over 4.
        assert_eq!(
            second.took(),
            [
                out("w", None, Some(4.0)),
                out("w", None, Some(9.5f64.sqrt()))
            ]
        );
    }

    /// A rollup's held events and its count go on after a restart.
    #[test]
    fn a_rollups_held_events_pass_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let rules = "  rollup(1, 10s) { out }";
        let first = Life::start(rules, dir.path(), 0.0);
        for m in [1.0, 2.0, 3.0] {
            first.send("r", None, Some(m));
        }
        assert_eq!(first.took(), [out("r", None, Some(1.0))]);
        first.stop(dir.path());

        let second = Life::start(rules, dir.path(), 1.0);
        second.send("r", None, Some(4.0));
        assert_eq!(second.took(), [], "still one in these 10 s");
        second.advance_to(10.0);
        let held = [2.0, 3.0, 4.0].map(|m| out("r", None, Some(m)));
        assert_eq!(second.took(), held);
    }

    /// A fill's gap and an apdex's counts so far go on after a restart.
    #[test]
    fn fill_ins_and_apdex_go_on_where_they_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let rules = r#"  where host = "f" { fill_in_last(10s, {state: "gap"}) { out } }
  where host = "a" { apdex(10s, satisfied: "metric < 1", tolerated: "false") { out } }"#;
        let first = Life::start(rules, dir.path(), 0.0);
        first.send("f", Some("ok"), Some(1.0));
        first.send("a", None, Some(0.5));
        assert_eq!(first.took(), [out("f", Some("ok"), Some(1.0))]);
        first.stop(dir.path());

        let second = Life::start(rules, dir.path(), 5.0);
        second.send("a", None, Some(3.0));
        second.advance_to(10.0);
        assert_eq!(
            second.took(),
            [out("a", None, Some(0.5))],
            "one of two satisfied"
        );
        second.advance_to(15.0);
        assert_eq!(
            second.took(),
            [out("f", Some("gap"), Some(1.0))],
            "the latest event before the restart, 10 s after the start"
        );
    }

    /// A series that goes on speaking through a restart is no gap: while
    /// vigil was down, nothing came because nothing was listening.
    #[test]
    fn a_restart_is_no_gap_in_a_fill_ins_series() {
        let dir = tempfile::tempdir().unwrap();
        let rules = r#"  by(host) { fill_in_last(10s, {state: "gap"}) { out } }"#;
        let first = Life::start(rules, dir.path(), 0.0);
        first.send("f", Some("ok"), Some(1.0));
        first.took();
        first.stop(dir.path());

        let second = Life::start(rules, dir.path(), 120.0);
        second.advance_to(125.0);
        second.send("f", Some("ok"), Some(1.0));
        assert_eq!(second.took(), [out("f", Some("ok"), Some(1.0))]);
        second.advance_to(135.0);
        assert_eq!(
            second.took(),
            [out("f", Some("gap"), Some(1.0))],
            "a gap of its own after the restart is filled"
        );
    }

    /// A `fill_in`'s next fill and expiry saved far ahead (a clock that
    /// jumped back, a file vigil did not write) filled the series until
    /// that expiry, a year on: its last fill counts as the start, and the
    /// series keeps from the start the time it had left after it.
    #[test]
    fn a_fill_ins_expiry_restored_far_ahead_counts_from_the_start() {
        let started = TEST_EPOCH + secs_to_micros(1_000.0);
        let far = started + secs_to_micros(365.0 * 86_400.0);
        // Last filled at `far` less 10 s, alive 40 s after it.
        let saved = vec![Saved::FillIn {
            next: Some(far),
            expires: far + secs_to_micros(30.0),
            latest: None,
        }];
        let rules = r#"  fill_in(10s, {service: "gap"}) { out }"#;
        let life = Life::start_from(rules, saved, 1_000.0);
        life.advance_to(1_000.0 + 100.0);
        let filled: Vec<Micros> = life.out.events.lock().drain(..).map(|e| e.time).collect();
        let expected = [10.0, 20.0, 30.0, 40.0].map(|secs| started + secs_to_micros(secs));
        assert_eq!(filled, expected, "filled until 40 s after the start");
    }

    #[test]
    fn edited_rules_keep_the_unchanged_stages_and_reset_the_changed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let first = Life::start(
            "  changed_state { out }\n  throttle(1, 60s) { out }",
            dir.path(),
            0.0,
        );
        first.send("a", Some("ok"), None);
        assert_eq!(first.took().len(), 2, "a transition and the throttle's one");
        first.stop(dir.path());

        let second = Life::start(
            "  changed_state { out }\n  throttle(2, 60s) { out }",
            dir.path(),
            1.0,
        );
        second.send("a", Some("ok"), None);
        assert_eq!(
            second.took(),
            [out("a", Some("ok"), None)],
            "only the changed throttle starts empty"
        );
    }

    #[test]
    fn a_predicate_spaced_differently_keeps_the_state_below_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = Life::start(
            r#"  where host="a" and metric>0 { throttle(1, 1h) { out } }"#,
            dir.path(),
            0.0,
        );
        first.send("a", None, Some(1.0));
        assert_eq!(first.took().len(), 1);
        first.stop(dir.path());

        let second = Life::start(
            r#"  where host = "a" and (metric > 0) { throttle(1, 1h) { out } }"#,
            dir.path(),
            1.0,
        );
        second.send("a", None, Some(1.0));
        assert_eq!(second.took(), [], "the throttle's hour is not over");
        second.stop(dir.path());

        let third = Life::start(
            r#"  where host = "a" and metric > 1 { throttle(1, 1h) { out } }"#,
            dir.path(),
            2.0,
        );
        third.send("a", None, Some(2.0));
        assert_eq!(third.took().len(), 1, "a changed predicate starts empty");
    }

    #[test]
    fn a_group_lives_one_ttl_from_the_start_as_its_index_entry_does() {
        let dir = tempfile::tempdir().unwrap();
        let rules = "  by(host) { changed(state) { out } }";
        let critical = |life: &Life| Event {
            host: Some("a".to_owned()),
            state: Some("critical".to_owned()),
            time: life.clock.now(),
            ttl: Some(5.0),
            ..Event::default()
        };
        let first = Life::start(rules, dir.path(), 0.0);
        first.rules.process(&[critical(&first)]);
        assert_eq!(first.took().len(), 1);
        first.stop(dir.path());

        // Down for longer than the TTL: the agent could not report meanwhile.
        let second = Life::start(rules, dir.path(), 30.0);
        second.advance_to(34.0);
        second.rules.process(&[critical(&second)]);
        assert_eq!(second.took(), [], "still critical: no transition");
        second.advance_to(40.0);
        second.rules.process(&[critical(&second)]);
        assert_eq!(
            second.took().len(),
            1,
            "silent for a TTL after its last event: the group was freed"
        );
    }

    /// A group's free time restored far ahead (a clock that jumped back, a
    /// file vigil did not write) kept it, and its `changed` state, until
    /// then: it lives one lifetime from the start, as a fresh group whose
    /// events came then would.
    #[test]
    fn a_group_restored_to_be_freed_far_ahead_lives_one_lifetime() {
        let started = TEST_EPOCH + secs_to_micros(1_000.0);
        let saved = vec![
            Saved::By { groups: 1 },
            Saved::Group {
                key: vec![Some("a".to_owned())],
                free_at: started + secs_to_micros(365.0 * 86_400.0),
                lifetime: secs_to_micros(5.0),
            },
            Saved::Changed(Some("critical".to_owned())),
        ];
        let life = Life::start_from("  by(host) { changed(state) { out } }", saved, 1_000.0);
        life.advance_to(1_000.0 + 6.0);
        life.send("a", Some("critical"), None);
        assert_eq!(
            life.took(),
            [out("a", Some("critical"), None)],
            "freed 5 s after the start: the state is new"
        );
    }

    /// A lifetime of 0 (an event's TTL of 0 in a block with no `dt`) is
    /// one too: the group restored to be freed a year ahead was kept as
    /// long, also from a CBOR file (versions 1 and 2). Only a group that
    /// holds no lifetime (a version 1 file written before lifetimes were
    /// saved) keeps its own free time.
    #[test]
    fn a_group_of_lifetime_0_restored_to_be_freed_far_ahead_is_freed() {
        let rules = "  by(host) { changed(state) { out } }";
        let started = TEST_EPOCH + secs_to_micros(1_000.0);
        let saved = || {
            vec![
                Saved::By { groups: 1 },
                Saved::Group {
                    key: vec![Some("a".to_owned())],
                    free_at: started + secs_to_micros(365.0 * 86_400.0),
                    lifetime: 0,
                },
                Saved::Changed(Some("critical".to_owned())),
            ]
        };
        let life = Life::start_from(rules, saved(), 1_000.0);
        life.advance_to(1_000.0 + 1.0);
        life.send("a", Some("critical"), None);
        assert_eq!(
            life.took(),
            [out("a", Some("critical"), None)],
            "freed at the start: the state is new"
        );

        let as_cbor = |entry: &Saved| ciborium::Value::serialized(entry).unwrap();
        let mut unsaved: Vec<_> = saved().iter().map(as_cbor).collect();
        // {"Group": {"key": …, "free_at": …}}, as before lifetimes.
        let group = unsaved[1].as_map_mut().unwrap()[0].1.as_map_mut().unwrap();
        group.retain(|(field, _)| field.as_text() != Some("lifetime"));
        assert_eq!(group.len(), 2);
        let saved: Vec<_> = saved().iter().map(as_cbor).collect();
        let dir = tempfile::tempdir().unwrap();
        for (version, entries, kept) in
            [(1, &saved, false), (2, &saved, false), (1, &unsaved, true)]
        {
            let file = cbor_file(version, &text(rules), entries);
            fs::write(dir.path().join(FILE_NAME), file).unwrap();
            let life = Life::start(rules, dir.path(), 1_000.0);
            life.advance_to(1_000.0 + 1.0);
            life.send("a", Some("critical"), None);
            let paged = !life.took().is_empty();
            assert_eq!(paged, !kept, "version {version}, kept: {kept}");
        }
    }

    /// An earlier build let a NaN or infinite metric into an ewma's
    /// average, which it then was for ever: restored, the average starts
    /// again from the next metric.
    #[test]
    fn an_ewma_saved_nan_starts_again() {
        for stuck in [f64::NAN, f64::INFINITY] {
            let saved = vec![Saved::Ewma(Some((stuck, TEST_EPOCH)))];
            let life = Life::start_from("  ewma_timeless(0.5) { out }", saved, 1_000.0);
            life.send("a", None, Some(10.0));
            assert_eq!(life.took(), [out("a", None, Some(10.0))], "{stuck}");
        }
    }

    /// An `ewma(halflife)`'s average restored as of a time far ahead
    /// weighed the first metric after the start by a gap of 0, not at
    /// all: its output was the saved average. That time counts as the
    /// start.
    #[test]
    fn an_ewma_saved_far_ahead_goes_on_from_the_start() {
        let started = TEST_EPOCH + secs_to_micros(1_000.0);
        let far = started + secs_to_micros(365.0 * 86_400.0);
        let saved = vec![Saved::Ewma(Some((10.0, far)))];
        let life = Life::start_from("  ewma(10s) { out }", saved, 1_000.0);
        life.advance_to(1_000.0 + 10.0);
        life.send("a", None, Some(20.0));
        assert_eq!(
            life.took(),
            [out("a", None, Some(15.0))],
            "one half-life after the start"
        );
    }

    const GROWN: &str = "by(host) { throttle(5, 10s) { out } }";

    /// The file a life of [`GROWN`] with one group wrote in `dir`, and the
    /// next life, holding 1 001 groups: a write of those that is cut short
    /// must leave that file as it was.
    fn written_then_grown(dir: &Path) -> (Vec<u8>, Life) {
        let life = Life::start(GROWN, dir, 0.0);
        life.send("first", Some("ok"), None);
        life.stop(dir);
        let before = fs::read(dir.join(FILE_NAME)).unwrap();
        let life = Life::start(GROWN, dir, 1.0);
        for n in 0..1000 {
            life.send(&format!("h{n}"), Some("ok"), None);
        }
        (before, life)
    }

    /// `dir` holds the state file `before`, unchanged, and no temporary file.
    fn assert_left_as_before(dir: &Path, before: &[u8]) {
        assert_eq!(fs::read(dir.join(FILE_NAME)).unwrap(), before);
        let names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [FILE_NAME]);
    }

    /// A write abandoned once vigil stops leaves the file before it, no
    /// temporary file, and is not walked to its end: a `by` of many groups
    /// stops at the first group after.
    #[test]
    fn a_stopped_write_keeps_the_file_before_it_and_stops_its_walk() {
        let dir = tempfile::tempdir().unwrap();
        let (before, life) = written_then_grown(dir.path());
        let stopped = CancellationToken::new();
        stopped.cancel();
        let abandoned = save(&life.rules, dir.path(), &Occasion::Periodic(stopped)).unwrap_err();
        assert!(
            matches!(abandoned, StateError::Write(SnapshotError::Abandoned)),
            "{abandoned}"
        );
        assert_left_as_before(dir.path(), &before);

        /// Abandons after its first `limit` entries, counting what it is offered.
        struct Abandoning {
            offered: usize,
            limit: usize,
        }
        impl Saver for Abandoning {
            fn push(&mut self, _: Saved) {
                self.offered += 1;
            }
            fn abandoned(&self) -> bool {
                self.offered >= self.limit
            }
        }
        // The `by`'s entry, then four groups of two (the group, its `throttle`).
        let mut saver = Abandoning {
            offered: 0,
            limit: 9,
        };
        life.rules.saving(|_, roots| roots.save(&mut saver));
        assert_eq!(saver.offered, 9, "the walk went on past its abandonment");
        // Abandoned before it began, it lists no group.
        let mut saver = Abandoning {
            offered: 0,
            limit: 0,
        };
        life.rules.saving(|_, roots| roots.save(&mut saver));
        assert_eq!(saver.offered, 0, "the walk began although abandoned");
    }

    /// A reload waits for a state write to let go of the rules; a periodic
    /// write under way gives way to it (the next one saves the new rules'
    /// state), leaving the file before it, where it would keep the reload,
    /// and a Prometheus scrape reading the outputs' counts behind it,
    /// waiting for seconds with a million `by` groups. The final write, at
    /// shutdown, does not.
    #[test]
    fn a_periodic_write_gives_way_to_a_waiting_reload() {
        let dir = tempfile::tempdir().unwrap();
        let (before, life) = written_then_grown(dir.path());
        // A reload counts as waiting while a write holds the rules.
        std::thread::scope(|threads| {
            life.rules.saving(|_, _| {
                let reload = threads.spawn(|| {
                    let text = text(GROWN);
                    let (_, compiled) =
                        crate::rules::load(&text.name, &text.text, EnvPolicy::Strict).unwrap();
                    let outputs: Vec<Arc<dyn OutputSink>> = vec![life.out.clone()];
                    let turn = life.rules.reload_turn();
                    life.rules
                        .replace(&turn, compiled.roots, Some(Arc::new(text)), outputs);
                });
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while !life.rules.reload_waiting() {
                    assert!(!reload.is_finished(), "the reload did not wait");
                    assert!(std::time::Instant::now() < deadline, "no reload waiting");
                    std::thread::yield_now();
                }
            });
        });
        assert!(!life.rules.reload_waiting(), "the reload is done");

        let waiting = life.rules.pretend_a_reload_waits();
        let periodic = Occasion::Periodic(CancellationToken::new());
        let gave_way = save(&life.rules, dir.path(), &periodic).unwrap_err();
        assert!(
            matches!(gave_way, StateError::Write(SnapshotError::GaveWay)),
            "{gave_way}"
        );
        assert_left_as_before(dir.path(), &before);
        let written = save(&life.rules, dir.path(), &Occasion::Final).unwrap();
        // The `by`, and its 1 001 groups of two entries each.
        assert_eq!(written.map(|w| w.entries), Some(2003), "the final write");
        drop(waiting);
        let written = save(&life.rules, dir.path(), &periodic).unwrap();
        assert_eq!(written.map(|w| w.entries), Some(2003), "no reload waiting");
    }

    fn entries_of(rules: &Rules) -> Vec<Saved> {
        rules
            .saving(|_, roots| {
                let mut entries = Vec::new();
                roots.save(&mut entries);
                entries
            })
            .expect("rules with their text")
    }

    /// The entries as text, sorted: `by` groups and `coalesce`'s latest
    /// events come back in any order.
    fn normalized(mut entries: Vec<Saved>) -> Vec<String> {
        for entry in &mut entries {
            if let Saved::Window { latest, .. } = entry {
                latest.sort_by_key(|e| e.time);
            }
        }
        let mut texts: Vec<_> = entries.iter().map(|e| format!("{e:?}")).collect();
        texts.sort();
        texts
    }

    #[test]
    fn every_kind_of_state_comes_back_as_it_was_saved() {
        let dir = tempfile::tempdir().unwrap();
        let rules = r#"  by(host) { stable(5s) { out } }
  ewma(10s) { out }
  ewma_timeless(0.5) { out }
  ddt { out }
  percentiles(10s, [0.5, 0.99]) { out }
  coalesce(10s) { count { out } }
  moving_time_window(10s) { max { out } }
  moving_event_window(5) { mean { out } }
  fixed_time_window(10s) { sum { out } }
  rate(10s) { out }
  throttle(10, 1m) { changed(metric) { out } }
  counter { out }
  runs(2, state) { out }
  fixed_event_window(10) { median { out } std_dev { out } }
  rollup(1, 1m) { out }
  fill_in_last(1m) { out }
  apdex(1m, satisfied: "metric < 1", tolerated: "metric < 2") { out }
  batch(10, 1m) { sum { out } }
  predict_linear(3, 1m) { out }"#;
        let first = Life::start(rules, dir.path(), 0.0);
        for (i, host) in ["a", "b", "a", "c"].iter().enumerate() {
            first.advance_to(i as f64 * 0.5);
            first.send(host, Some("ok"), Some(i as f64));
        }
        let before = entries_of(&first.rules);
        assert_eq!(before[0], Saved::By { groups: 3 });
        assert_eq!(
            before.len(),
            1 + 3 * 2 + 19,
            "the by, each group and its stable, every other stateful stage"
        );
        first.stop(dir.path());

        let second = Life::start(rules, dir.path(), 2.0);
        // Each group lives at least its lifetime from the second start, and
        // each held event its TTL; the fill is due a whole `dt` (1m) after
        // it at the earliest.
        let started = second.clock.now();
        let mut expected = before;
        for entry in &mut expected {
            entry.each_held(|event| lives_an_hour_from(event, started));
            if let Saved::Group {
                free_at, lifetime, ..
            } = entry
            {
                *free_at = (*free_at).max(started + *lifetime);
            }
            if let Saved::FillIn {
                next: Some(next), ..
            } = entry
            {
                *next = (*next).max(started + secs_to_micros(60.0));
            }
        }
        assert_eq!(normalized(entries_of(&second.rules)), normalized(expected));
    }

    #[test]
    fn a_damaged_or_foreign_file_is_reported_and_the_stages_start_empty() {
        let dir = tempfile::tempdir().unwrap();
        let rules = "  changed_state { out }";
        let first = Life::start(rules, dir.path(), 0.0);
        first.send("a", Some("ok"), None);
        first.stop(dir.path());
        let path = dir.path().join(FILE_NAME);
        let good = fs::read(&path).unwrap();

        let mut flipped = good.clone();
        flipped[HEADER_LEN + 3] ^= 0x20;
        assert!(matches!(decode(&flipped), Err(StateError::Checksum { .. })));
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(StateError::Checksum { .. })
        ));
        assert!(matches!(decode(b"VIGILSTS"), Err(StateError::TooShort(8))));
        assert!(matches!(
            decode(b"VIGILIDX\x01\0\0\0\0\0\0\0"),
            Err(StateError::BadMagic)
        ));
        let with_version = |version: u32| {
            let mut file = good[..good.len() - CRC_LEN].to_vec();
            file[MAGIC.len()..HEADER_LEN].copy_from_slice(&version.to_le_bytes());
            let crc = crc32fast::hash(&file);
            file.extend_from_slice(&crc.to_le_bytes());
            file
        };
        assert!(matches!(
            decode(&with_version(VERSION + 1)),
            Err(StateError::UnsupportedVersion(v)) if v == VERSION + 1
        ));
        assert!(matches!(
            decode(&with_version(0)),
            Err(StateError::UnsupportedVersion(0))
        ));
        // Postcard read as CBOR.
        assert!(matches!(
            decode(&with_version(2)),
            Err(StateError::Decode(_))
        ));
        // A valid checksum over bytes that are not the state, in either
        // encoding.
        for version in [2, VERSION] {
            let mut garbage = MAGIC.to_vec();
            garbage.extend_from_slice(&version.to_le_bytes());
            garbage.extend_from_slice(b"\xff\x00 not an entry");
            let crc = crc32fast::hash(&garbage);
            garbage.extend_from_slice(&crc.to_le_bytes());
            assert!(
                matches!(decode(&garbage), Err(StateError::Decode(_))),
                "version {version}"
            );
        }

        fs::write(&path, &flipped).unwrap();
        let second = Life::start(rules, dir.path(), 1.0);
        second.send("a", Some("ok"), None);
        assert_eq!(
            second.took().len(),
            1,
            "started empty: the first event passes"
        );
    }

    #[test]
    fn state_that_does_not_fit_its_rules_is_refused_whole() {
        let roots_text = text("  changed_state { out }\n  rate(5s) { out }");
        let (_, compiled) =
            crate::rules::load(&roots_text.name, &roots_text.text, EnvPolicy::Strict).unwrap();
        let mut header = Header {
            name: roots_text.name.clone(),
            text: roots_text.text.clone(),
        };
        let restore = |header: &Header, entries| {
            restore_from(
                &compiled.roots,
                &roots_text,
                header,
                Restorer::from_entries(entries, 0),
            )
        };
        let group = || Saved::Group {
            key: vec![Some("a".into()), Some("svc".into())],
            free_at: Micros::MAX,
            lifetime: 0,
        };
        let rate = || Saved::Rate {
            sum: 0.0,
            latest: None,
            window_end: 0,
            pending: false,
        };
        let refused = |result: Result<Restored, StateError>| {
            matches!(
                result,
                Err(StateError::Restore(RestoreError::Mismatch { .. }))
            )
        };
        let fits = vec![
            Saved::By { groups: 1 },
            group(),
            Saved::Changed(None),
            rate(),
        ];
        assert_eq!(
            restore(&header, fits).unwrap(),
            Restored {
                entries: 4,
                rules_changed: false
            }
        );
        let wrong_kind = vec![
            Saved::By { groups: 1 },
            group(),
            Saved::Changed(None),
            Saved::Ddt(None),
        ];
        assert!(refused(restore(&header, wrong_kind)));
        let one_too_many = vec![Saved::By { groups: 0 }, rate(), Saved::Ddt(None)];
        assert!(refused(restore(&header, one_too_many)));
        let more_groups_than_entries = vec![Saved::By { groups: 5 }, group(), Saved::Changed(None)];
        assert!(refused(restore(&header, more_groups_than_entries)));
        header.text = "streams { nonsense }".to_owned();
        assert!(matches!(
            restore(&header, Vec::new()),
            Err(StateError::Rules(_))
        ));
    }

    #[test]
    fn state_saved_with_a_forward_whose_tls_files_are_gone_is_still_restored() {
        // The rules were edited while vigil was down: the forward, and its
        // CA file, removed. The stages that stayed keep their state.
        let gone = tempfile::tempdir().unwrap();
        let ca = gone.path().join("ca.pem");
        let saved = Header {
            name: "persist.vigil".to_owned(),
            text: format!(
                "output up = forward(host: \"127.0.0.1\", tls_ca: \"{}\")\nstreams {{\n  changed_state {{ up }}\n}}\n",
                ca.display()
            ),
        };
        let now = text("  changed_state { out }");
        let (_, compiled) = crate::rules::load(&now.name, &now.text, EnvPolicy::Strict).unwrap();
        let entries = vec![
            Saved::By { groups: 1 },
            Saved::Group {
                key: vec![Some("a".into()), Some("svc".into())],
                free_at: Micros::MAX,
                lifetime: 0,
            },
            Saved::Changed(None),
        ];
        let restored = restore_from(
            &compiled.roots,
            &now,
            &saved,
            Restorer::from_entries(entries, 0),
        );
        assert_eq!(
            restored.unwrap(),
            Restored {
                entries: 3,
                rules_changed: true
            }
        );
    }

    #[test]
    fn entries_that_do_not_decode_are_refused() {
        let roots_text = text("  changed_state { out }");
        let (_, compiled) =
            crate::rules::load(&roots_text.name, &roots_text.text, EnvPolicy::Strict).unwrap();
        let header = Header {
            name: roots_text.name.clone(),
            text: roots_text.text.clone(),
        };
        let mut cbor = Vec::new();
        ciborium::into_writer(&Saved::By { groups: 1 }, &mut cbor).unwrap();
        cbor.extend_from_slice(b"\xff\xfe not an entry");
        let mut postcard = postcard::to_allocvec(&Saved::By { groups: 1 }).unwrap();
        postcard.extend_from_slice(b"\xff\xfe not an entry");
        for (version, body) in [(2, cbor), (VERSION, postcard)] {
            assert!(
                matches!(
                    restore_from(
                        &compiled.roots,
                        &roots_text,
                        &header,
                        entries(&body, version, 0)
                    ),
                    Err(StateError::Restore(RestoreError::Decode { entry: 1, .. }))
                ),
                "version {version}"
            );
        }
    }

    #[test]
    fn lengths_larger_than_the_file_are_refused_without_taking_that_memory() {
        let roots_text = text("  by(host) { percentiles(10s, [0.5]) { out } }");
        let (_, compiled) =
            crate::rules::load(&roots_text.name, &roots_text.text, EnvPolicy::Strict).unwrap();
        let header = Header {
            name: roots_text.name.clone(),
            text: roots_text.text.clone(),
        };
        let restore = |body: &[u8]| {
            restore_from(
                &compiled.roots,
                &roots_text,
                &header,
                entries(body, VERSION, 0),
            )
        };
        let group = Saved::Group {
            key: vec![Some("a".into())],
            free_at: 0,
            lifetime: 0,
        };
        // A varint of 2^63 - 1: a length no allocation could hold.
        let huge = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f];
        let mut body = postcard::to_allocvec(&Saved::By { groups: 1 }).unwrap();
        body.extend_from_slice(&postcard::to_allocvec(&group).unwrap());
        let prefix = body.len();
        // Percentiles' samples: a Vec<f64> that says it has 2^63 - 1.
        body.push(9);
        body.extend_from_slice(&huge);
        body.extend_from_slice(&1.0f64.to_le_bytes());
        assert!(matches!(
            restore(&body),
            Err(StateError::Restore(RestoreError::Decode { entry: 2, .. }))
        ));
        // A group key: a string that says it has 2^63 - 1 bytes.
        body.truncate(prefix - postcard::to_allocvec(&group).unwrap().len());
        body.extend_from_slice(&[2, 1, 1]);
        body.extend_from_slice(&huge);
        body.extend_from_slice(b"a");
        assert!(matches!(
            restore(&body),
            Err(StateError::Restore(RestoreError::Decode { entry: 1, .. }))
        ));
    }

    /// A state file as versions 1 and 2 wrote it: CBOR throughout.
    fn cbor_file<T: Serialize>(version: u32, text: &RuleText, entries: &[T]) -> Vec<u8> {
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&version.to_le_bytes());
        let header = Header {
            name: text.name.clone(),
            text: text.text.clone(),
        };
        ciborium::into_writer(&header, &mut file).unwrap();
        for entry in entries {
            ciborium::into_writer(entry, &mut file).unwrap();
        }
        let crc = crc32fast::hash(&file);
        file.extend_from_slice(&crc.to_le_bytes());
        file
    }

    /// `event`, sent by [`Life::send`] to live an hour, as restored at
    /// `started`: living an hour from then.
    fn lives_an_hour_from(event: &mut Event, started: Micros) {
        let down = (started - event.time) as f32 / 1e6;
        event.ttl = Some(3600.0 + down);
    }

    #[test]
    fn files_of_versions_1_and_2_are_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let rules = r#"  by(host, service) {
    changed_state { out }
    rate(10s) { out }
  }
  fixed_time_window(10s) { mean { out } }
  moving_event_window(3) { max { out } }
  percentiles(10s, [0.5]) { out }
  stable(5s) { out }"#;
        let first = Life::start(rules, dir.path(), 0.0);
        for (i, host) in ["a", "b", "a"].iter().enumerate() {
            first.advance_to(i as f64);
            first.send(host, Some("ok"), Some(i as f64));
        }
        let before = entries_of(&first.rules);
        for version in [1, 2] {
            let file = cbor_file(version, &text(rules), &before);
            fs::write(dir.path().join(FILE_NAME), file).unwrap();
            // Started after the last event, as a restart is: times
            // restored ahead of the start are taken as the start.
            let second = Life::start(rules, dir.path(), 2.0);
            let started = second.clock.now();
            let mut expected = entries_of(&first.rules);
            for entry in &mut expected {
                entry.each_held(|event| lives_an_hour_from(event, started));
                if let Saved::Group {
                    free_at, lifetime, ..
                } = entry
                {
                    *free_at = (*free_at).max(started + *lifetime);
                }
            }
            assert_eq!(
                normalized(entries_of(&second.rules)),
                normalized(expected),
                "version {version}"
            );
        }
    }
}
