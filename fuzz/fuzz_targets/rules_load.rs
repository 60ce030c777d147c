//! `cargo fuzz run rules_load`: the body is `vigil_fuzz::rules_load` (fuzz/src/lib.rs), which
//! `tests/fuzz_corpus.rs` also replays over `fuzz/corpus/rules_load/` on stable Rust.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_fuzz::rules_load(data));
