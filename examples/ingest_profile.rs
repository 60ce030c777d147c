//! A fixed ingest workload for instruction-count profiling, where timing on a
//! shared 2-core machine is too noisy to compare changes:
//!
//!     cargo build --release --example ingest_profile
//!     valgrind --tool=callgrind --toggle-collect='*measured*' \
//!         target/release/examples/ingest_profile 100 2000
//!
//! Fills an index of 100 000 keys, then runs MSGS messages of BATCH events each
//! through decode + `rules/bench.vigil` + index, like a TCP connection minus the
//! syscalls: PER_READ messages (default 1) at a time, as a connection handles
//! the frames of one read. Instructions per event = collected Ir / (MSGS × BATCH).

use bytes::Bytes;

use vigil::clock::ManualClock;
use vigil::ingest::{Ingest, Transport};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../benches/workload/mod.rs"]
mod workload;

use workload::{KEYS, bench_rules_ingest, msg};

#[inline(never)]
fn measured(ingest: &Ingest, clock: &ManualClock, bodies: &[Bytes], per_read: usize) {
    let (mut events, mut replies) = (Vec::new(), Vec::new());
    for read in bodies.chunks(per_read) {
        clock.advance(1);
        ingest.handle_frames(&mut read.iter(), Transport::Tcp, &mut events, &mut replies);
        replies.clear();
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().map_or(100, |a| a.parse().expect("BATCH"));
    let msgs: usize = args.next().map_or(1000, |a| a.parse().expect("MSGS"));
    let per_read: usize = args.next().map_or(1, |a| a.parse().expect("PER_READ"));
    let (clock, ingest) = bench_rules_ingest();
    for first in (0..KEYS).step_by(1000) {
        ingest.handle_frame(&msg(first, 1000), Transport::Tcp, &mut Vec::new());
    }
    let bodies: Vec<Bytes> = (0..msgs)
        .map(|i| msg(i * batch * 7919 % KEYS, batch))
        .collect();
    measured(&ingest, &clock, &bodies, per_read);
    println!(
        "{} events through the rules; index holds {}",
        msgs * batch,
        ingest.index.len()
    );
}
