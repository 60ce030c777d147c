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
//! # Format (version 1)
//!
//! ```text
//! "VIGILSTS"  u32 version (little-endian)
//! CBOR { name, text, stages }
//! u32 CRC32 of every byte before it (little-endian)
//! ```
//!
//! A file that does not check out, or whose rule text no longer compiles, is
//! reported and skipped: the stages start empty, as they did before vigil kept
//! them.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::snapshot::{CrcWriter, SnapshotError, replace_file};

use super::engine::Rules;
use super::nodes::Children;
use super::nodes::saved::{Mismatch, Restorer, Saved};
use super::{EnvPolicy, RuleText};

/// The file's name inside the data directory.
pub const FILE_NAME: &str = "streams.state";

const MAGIC: &[u8; 8] = b"VIGILSTS";
const VERSION: u32 = 1;
const HEADER_LEN: usize = MAGIC.len() + 4;
const CRC_LEN: usize = 4;

#[derive(Serialize, Deserialize)]
struct StateFile {
    name: String,
    text: String,
    stages: Vec<Saved>,
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
    #[error("unsupported stream state version {0} (this vigil reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error(
        "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): truncated or corrupted"
    )]
    Checksum { stored: u32, computed: u32 },
    #[error("does not decode: {0}")]
    Decode(String),
    #[error("the rules it was saved with no longer compile:\n{0}")]
    Rules(String),
    #[error("it does not fit the rules it was saved with: {0}")]
    Mismatch(#[from] Mismatch),
}

/// What was taken back at start.
#[derive(Debug, PartialEq)]
pub struct Restored {
    /// Entries of stateful stages (a `by` with all its groups is one).
    pub stages: usize,
    /// The rule file differs from the one the state was saved with.
    pub rules_changed: bool,
}

/// How a write went.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    /// Entries of stateful stages (a `by` with all its groups is one).
    pub stages: usize,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Writes the running rules' state into `dir` (which must exist),
/// atomically. `None` when the rules were compiled without their text and
/// have nothing to save it with.
pub fn save(rules: &Rules, dir: &Path) -> Result<Option<Written>, StateError> {
    let started = Instant::now();
    let Some((text, stages)) = rules.save_state() else {
        return Ok(None);
    };
    let file = StateFile {
        name: text.name.clone(),
        text: text.text.clone(),
        stages,
    };
    // Encoded straight into the file: no second copy of the state in memory.
    let bytes = replace_file(&dir.join(FILE_NAME), |out| {
        let mut out = CrcWriter::new(out);
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        ciborium::into_writer(&file, &mut out).map_err(|e| match e {
            ciborium::ser::Error::Io(e) => e,
            ciborium::ser::Error::Value(what) => io::Error::new(io::ErrorKind::InvalidData, what),
        })?;
        out.finish()
    })?;
    Ok(Some(Written {
        stages: file.stages.len(),
        bytes,
        elapsed: started.elapsed(),
    }))
}

/// Parses a whole file; the checksum is verified before anything is decoded.
fn decode(bytes: &[u8]) -> Result<StateFile, StateError> {
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(StateError::TooShort(bytes.len()));
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(StateError::BadMagic);
    }
    let version = u32::from_le_bytes(bytes[MAGIC.len()..HEADER_LEN].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(StateError::UnsupportedVersion(version));
    }
    let (covered, stored) = bytes.split_at(bytes.len() - CRC_LEN);
    let stored = u32::from_le_bytes(stored.try_into().expect("4 bytes"));
    let computed = crc32fast::hash(covered);
    if stored != computed {
        return Err(StateError::Checksum { stored, computed });
    }
    // ciborium bounds its recursion, so no file can exhaust the stack.
    ciborium::from_reader(&covered[HEADER_LEN..]).map_err(|e| StateError::Decode(e.to_string()))
}

fn read(dir: &Path) -> Result<Option<StateFile>, StateError> {
    let path = dir.join(FILE_NAME);
    match fs::read(&path) {
        Ok(bytes) => decode(&bytes).map(Some),
        Err(cause) if cause.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(cause) => Err(StateError::Read { path, cause }),
    }
}

/// Gives `roots`, compiled from `text` and not running yet, the state saved
/// in `dir`. Never fails: a file that cannot be used is logged with the
/// reason, and the stages start empty.
pub fn restore(roots: &Children, text: &RuleText, dir: &Path) {
    let started = Instant::now();
    let path = dir.join(FILE_NAME);
    match read(dir).and_then(|saved| saved.map(|s| restore_from(roots, text, s)).transpose()) {
        Ok(None) => tracing::info!(
            path = %path.display(),
            "No saved stream state; the stages start empty."
        ),
        Ok(Some(restored)) if restored.rules_changed => tracing::info!(
            stages = restored.stages,
            elapsed = ?started.elapsed(),
            "Restored the stream state of the last run. The rules changed meanwhile: as on a reload, only unchanged stages keep theirs."
        ),
        Ok(Some(restored)) => tracing::info!(
            stages = restored.stages,
            elapsed = ?started.elapsed(),
            "Restored the stream state of the last run."
        ),
        Err(error) => tracing::error!(
            path = %path.display(),
            %error,
            "Ignoring the saved stream state; the stages start empty."
        ),
    }
}

/// Restores `saved` into a tree compiled from its own text, which `roots` then
/// adopts stage by stage.
fn restore_from(
    roots: &Children,
    text: &RuleText,
    saved: StateFile,
) -> Result<Restored, StateError> {
    // Lenient: the tree never runs, so a secret missing from the environment
    // now does not matter to it.
    let (_, old) =
        super::load(&saved.name, &saved.text, EnvPolicy::Lenient).map_err(StateError::Rules)?;
    let stages = saved.stages.len();
    let mut from = Restorer::new(saved.stages);
    old.roots.restore(&mut from)?;
    from.finish()?;
    roots.adopt(&old.roots);
    Ok(Restored {
        stages,
        rules_changed: saved.text != text.text,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::{Clock, ManualClock, Micros, SharedClock, secs_to_micros};
    use crate::event::{Event, Metric};
    use crate::index::{Index, IndexConfig};
    use crate::rules::nodes::saved::SavedGroup;
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
            let text = text(streams);
            let (_, compiled) = crate::rules::load(&text.name, &text.text, EnvPolicy::Strict)
                .unwrap_or_else(|e| panic!("{e}"));
            restore(&compiled.roots, &text, dir);
            let clock = Arc::new(ManualClock::new(TEST_EPOCH + secs_to_micros(at_secs)));
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
            assert!(save(&self.rules, dir).unwrap().is_some());
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
        let rules = "  changed_state { out }";
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

    /// `by` groups and `coalesce`'s latest events come back in any order.
    fn sorted(mut stages: Vec<Saved>) -> Vec<Saved> {
        for stage in &mut stages {
            match stage {
                Saved::By(groups) => {
                    groups.sort_by(|a, b| a.key.cmp(&b.key));
                    for group in groups.iter_mut() {
                        group.stages = sorted(std::mem::take(&mut group.stages));
                    }
                }
                Saved::Window { latest, .. } => latest.sort_by_key(|e| e.time),
                _ => {}
            }
        }
        stages
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
  throttle(10, 1m) { changed(metric) { out } }"#;
        let first = Life::start(rules, dir.path(), 0.0);
        for (i, host) in ["a", "b", "a", "c"].iter().enumerate() {
            first.advance_to(i as f64 * 0.5);
            first.send(host, Some("ok"), Some(i as f64));
        }
        let before = first.rules.save_state().unwrap().1;
        assert_eq!(
            before.len(),
            12,
            "every stateful stage outside `by` has an entry"
        );
        assert!(
            matches!(&before[0], Saved::By(groups) if groups.len() == 3),
            "{:?}",
            before[0]
        );
        first.stop(dir.path());

        let second = Life::start(rules, dir.path(), 2.0);
        let after = second.rules.save_state().unwrap().1;
        assert_eq!(sorted(after), sorted(before));
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
        let mut newer = good.clone();
        newer[MAGIC.len()] = 2;
        assert!(matches!(
            decode(&newer),
            Err(StateError::UnsupportedVersion(2))
        ));
        // A valid checksum over bytes that are not the state.
        let mut garbage = MAGIC.to_vec();
        garbage.extend_from_slice(&VERSION.to_le_bytes());
        garbage.extend_from_slice(b"\xff\x00 not CBOR");
        let crc = crc32fast::hash(&garbage);
        garbage.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&garbage), Err(StateError::Decode(_))));

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
        let group = |stages| SavedGroup {
            key: vec![Some("a".into()), Some("svc".into())],
            free_at: Micros::MAX,
            stages,
        };
        let file = |stages| StateFile {
            name: roots_text.name.clone(),
            text: roots_text.text.clone(),
            stages,
        };
        let wrong_kind = vec![
            Saved::By(vec![group(vec![Saved::Changed(None)])]),
            Saved::Ddt(None),
        ];
        assert!(matches!(
            restore_from(&compiled.roots, &roots_text, file(wrong_kind)),
            Err(StateError::Mismatch(_))
        ));
        let too_many = vec![Saved::By(vec![group(vec![
            Saved::Changed(None),
            Saved::Ddt(None),
        ])])];
        assert!(matches!(
            restore_from(&compiled.roots, &roots_text, file(too_many)),
            Err(StateError::Mismatch(_))
        ));
        let mut broken = file(Vec::new());
        broken.text = "streams { nonsense }".to_owned();
        assert!(matches!(
            restore_from(&compiled.roots, &roots_text, broken),
            Err(StateError::Rules(_))
        ));
    }
}
