//! `cargo fuzz run proto_roundtrip`: the body is `vigil_fuzz::proto_roundtrip` (fuzz/src/lib.rs), which
//! `tests/fuzz_corpus.rs` also replays over `fuzz/corpus/proto_roundtrip/` on stable Rust.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_fuzz::proto_roundtrip(data));
