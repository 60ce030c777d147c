//! `cargo fuzz run frame_decoder`: the body is `vigil_fuzz::frame_decoder` (fuzz/src/lib.rs), which
//! `tests/fuzz_corpus.rs` also replays over `fuzz/corpus/frame_decoder/` on stable Rust.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vigil_fuzz::frame_decoder(data));
