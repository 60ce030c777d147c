//! `cargo fuzz run graphite_line`: the body is `vigil_fuzz::graphite_line` (fuzz/src/lib.rs), which
//! `tests/fuzz_corpus.rs` also replays over `fuzz/corpus/graphite_line/` on stable Rust.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_fuzz::graphite_line(data));
