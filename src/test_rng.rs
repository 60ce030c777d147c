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

/// `seed` changed for round `round` of a decoder's differential test: in turn
/// one to four bytes overwritten, cut short, or replaced by up to 63 random
/// bytes.
pub fn mutated(seed: &[u8], round: usize, next: &mut impl FnMut() -> u64) -> Vec<u8> {
    let mut body = seed.to_vec();
    match round % 3 {
        0 => {
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % body.len();
                body[at] = next() as u8;
            }
        }
        1 => body.truncate((next() as usize) % (body.len() + 1)),
        _ => body = (0..next() % 64).map(|_| next() as u8).collect(),
    }
    body
}
