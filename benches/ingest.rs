//! The ingest path per `Msg`: framing + protobuf decode, then decode + rules
//! (`rules/bench.vigil`) + index, for 100-event and 1-event messages over
//! 100 000 distinct keys — everything a TCP connection does but the syscalls.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use tokio_util::codec::Decoder;

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

/// A collectd-like message of `n` events starting at key `first`.
fn msg(first: usize, n: usize) -> Bytes {
    let events = (first..first + n)
        .map(|k| {
            let k = k % KEYS;
            PbEvent {
                host: Some(format!("host{}.example.com", k / 10)),
                service: Some(format!("cpu-{}/cpu-idle/value", k % 10)),
                state: Some("ok".into()),
                time_micros: Some(1_700_000_000_000_000),
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

fn bench_rules_ingest() -> (Arc<ManualClock>, Ingest) {
    let source = include_str!("../rules/bench.vigil");
    let (_, compiled) =
        rules::load("rules/bench.vigil", source, EnvPolicy::Lenient).expect("compiles");
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000));
    let index = Arc::new(Index::new(IndexConfig::default()));
    let shared: SharedClock = clock.clone();
    let streams = Arc::new(Rules::new(
        compiled.roots,
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

fn ingest(c: &mut Criterion) {
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(100));
    let body = msg(0, 100);
    let mut framed = BytesMut::new();
    framed.put_u32(body.len() as u32);
    framed.put_slice(&body);
    let framed = framed.freeze();
    group.bench_function("frame_and_decode_100", |b| {
        let mut codec = vigil::tcp::codec(vigil::tcp::DEFAULT_MAX_FRAME);
        b.iter(|| {
            let mut buf = BytesMut::from(&framed[..]);
            let frame = codec.decode(&mut buf).unwrap().unwrap();
            Msg::decode(frame.freeze()).unwrap()
        })
    });

    for n in [100, 1] {
        let (clock, ingest) = bench_rules_ingest();
        // Fill the index first, so updates hit existing keys as in steady state.
        for first in (0..KEYS).step_by(100) {
            ingest.handle_frame(&msg(first, 100), Transport::Tcp, &mut Vec::new());
        }
        let bodies: Vec<Bytes> = (0..KEYS / n.max(100) * 100 / n)
            .take(10_000)
            .map(|i| msg(i * n * 7 % KEYS, n))
            .collect();
        let mut next = 0;
        let mut events = Vec::new();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("bench_rules_{n}"), |b| {
            b.iter_batched(
                || {
                    next = (next + 1) % bodies.len();
                    bodies[next].clone()
                },
                |body| {
                    clock.advance(1);
                    ingest.handle_frame(&body, Transport::Tcp, &mut events)
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
