//! Replays the committed fuzz corpora on stable Rust, without cargo-fuzz.
//!
//! Every file of `fuzz/corpus/<target>/` goes through the very body the fuzz
//! target runs: `fuzz/src/lib.rs` is compiled into this test as a module (it uses
//! only vigil's public API and vigil's own dependencies), so the checks cannot
//! drift apart. A crash the fuzzer found, once minimized into the corpus, stays
//! fixed. See "Fuzzing" in the README.

#[path = "../fuzz/src/lib.rs"]
mod fuzz_bodies;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} corpus files failed (panic messages above): {failed:#?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn frame_decoder_corpus() {
    assert_eq!(fuzz_bodies::MAX_FRAME, 1 << 20);
    replay("frame_decoder", fuzz_bodies::frame_decoder);
}

#[test]
fn event_line_corpus() {
    replay("event_line", fuzz_bodies::event_line);
}

#[test]
fn graphite_line_corpus() {
    replay("graphite_line", fuzz_bodies::graphite_line);
}

#[test]
fn proto_roundtrip_corpus() {
    replay("proto_roundtrip", fuzz_bodies::proto_roundtrip);
}

#[test]
fn query_parse_corpus() {
    replay("query_parse", fuzz_bodies::query_parse);
}

#[test]
fn rules_load_corpus() {
    replay("rules_load", fuzz_bodies::rules_load);
}

#[test]
fn rules_run_corpus() {
    replay("rules_run", fuzz_bodies::rules_run);
}

#[test]
fn state_restore_corpus() {
    replay("state_restore", fuzz_bodies::state_restore);
}
