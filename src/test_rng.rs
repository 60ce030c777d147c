//! A deterministic stream of numbers for unit tests that drive a structure
//! through many random operations: the same run every time, so a failure
//! repeats with its step number.

/// xorshift64: good enough to pick a test's operations, nothing more.
pub fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}
