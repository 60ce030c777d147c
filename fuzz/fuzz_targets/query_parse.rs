//! `cargo fuzz run query_parse`: the body is `vigil_fuzz::query_parse` (fuzz/src/lib.rs), which
//! `tests/fuzz_corpus.rs` also replays over `fuzz/corpus/query_parse/` on stable Rust.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_fuzz::query_parse(data));
