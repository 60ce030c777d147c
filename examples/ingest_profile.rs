//! A fixed ingest workload for instruction-count profiling, where timing on a
//! shared 2-core machine is too noisy to compare changes:
//!
//!     cargo build --release --example ingest_profile
//!     valgrind --tool=callgrind --toggle-collect='*measured*' \
//!         target/release/examples/ingest_profile 100 2000
//!
//! Fills an index of 100 000 keys, then runs MSGS messages of BATCH events each
//! through decode + `rules/bench.vigil` + index, like a TCP connection minus the
//! syscalls. Instructions per event = collected Ir / (MSGS × BATCH).

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use vigil::clock::{ManualClock, SharedClock};
use vigil::index::{Index, IndexConfig};
use vigil::ingest::{Ingest, Transport};
use vigil::proto::{Attribute, Msg, PbEvent};
use vigil::rules::engine::Rules;
use vigil::rules::{self, EnvPolicy};
use vigil::stats::Stats;
use vigil::wire::Limits;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEYS: usize = 100_000;

fn msg(first: usize, n: usize) -> Bytes {
    let events = (first..first + n)
        .map(|k| {
            let k = k % KEYS;
            PbEvent {
                host: Some(format!("host{}.example.com", k / 10)),
                service: Some(format!("cpu-{}/cpu-idle/value", k % 10)),
                state: Some("ok".into()),
                time_micros: Some(1_700_000_000_000_000 + k as i64),
                tags: vec!["collectd".into()],
                ttl: Some(20.0),
                metric_d: Some(k as f64 * 0.5),
                attributes: vec![Attribute {
                    key: "plugin".into(),
                    value: Some("cpu".into()),
                }],
                ..PbEvent::default()
            }
        })
        .collect();
    Msg {
        events,
        ..Msg::default()
    }
    .encode_to_vec()
    .into()
}

#[inline(never)]
fn measured(ingest: &Ingest, clock: &ManualClock, bodies: &[Bytes]) {
    let mut events = Vec::new();
    for body in bodies {
        clock.advance(1);
        ingest.handle_frame(body, Transport::Tcp, &mut events);
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let batch: usize = args.next().map_or(100, |a| a.parse().expect("BATCH"));
    let msgs: usize = args.next().map_or(1000, |a| a.parse().expect("MSGS"));
    let source = include_str!("../rules/bench.vigil");
    let (_, compiled) =
        rules::load("rules/bench.vigil", source, EnvPolicy::Lenient).expect("compiles");
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000));
    let shared: SharedClock = clock.clone();
    let index = Arc::new(Index::new(IndexConfig::default()));
    let ingest = Ingest {
        index: index.clone(),
        streams: Arc::new(Rules::new(
            compiled.roots,
            Vec::new(),
            index.clone(),
            shared.clone(),
        )),
        clock: shared,
        stats: Arc::new(Stats::default()),
        limits: Limits::DEFAULT,
        cluster: None,
    };
    for first in (0..KEYS).step_by(1000) {
        ingest.handle_frame(&msg(first, 1000), Transport::Tcp, &mut Vec::new());
    }
    let bodies: Vec<Bytes> = (0..msgs)
        .map(|i| msg(i * batch * 7919 % KEYS, batch))
        .collect();
    measured(&ingest, &clock, &bodies);
    println!(
        "{} events through the rules; index holds {}",
        msgs * batch,
        index.len()
    );
}
