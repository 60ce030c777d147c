//! `cargo fuzz run rules_run`: the body is `vigil_fuzz::rules_run` (fuzz/src/lib.rs), which
//! `tests/fuzz_corpus.rs` also replays over `fuzz/corpus/rules_run/` on stable Rust.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_fuzz::rules_run(data));
