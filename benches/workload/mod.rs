//! The ingest workload shared by `benches/ingest.rs` (timed) and
//! `examples/ingest_profile.rs` (instruction counts), so both measure the same
//! thing: collectd-like events over 100 000 keys through `rules/bench.vigil`.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use vigil::clock::{ManualClock, SharedClock};
use vigil::index::{Index, IndexConfig};
use vigil::ingest::Ingest;
use vigil::limits::Limits;
use vigil::proto::{Attribute, Msg, PbEvent};
use vigil::rules::engine::Rules;
use vigil::rules::{self, EnvPolicy};
use vigil::stats::Stats;

pub const KEYS: usize = 100_000;

/// A collectd-like message of `n` events starting at key `first`.
pub fn msg(first: usize, n: usize) -> Bytes {
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

/// Ingest running `rules/bench.vigil` into an empty index, on a virtual clock.
pub fn bench_rules_ingest() -> (Arc<ManualClock>, Ingest) {
    let source = include_str!("../../rules/bench.vigil");
    let (_, compiled) =
        rules::load("rules/bench.vigil", source, EnvPolicy::Lenient).expect("compiles");
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000));
    let index = Arc::new(Index::new(IndexConfig::default()));
    let shared: SharedClock = clock.clone();
    let streams = Arc::new(Rules::new(
        compiled.roots,
        None,
        Vec::new(),
        index.clone(),
        shared.clone(),
    ));
    let ingest = Ingest {
        index,
        streams,
        clock: shared,
        stats: Arc::new(Stats::default()),
        limits: Limits::DEFAULT,
        cluster: None,
    };
    (clock, ingest)
}
