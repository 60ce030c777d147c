//! `cargo fuzz run state_restore`: the body is `vigil_fuzz::state_restore` (fuzz/src/lib.rs), which
//! `tests/fuzz_corpus.rs` also replays over `fuzz/corpus/state_restore/` on stable Rust.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_fuzz::state_restore(data));
