//! Decode + index of a 100-event `Msg`, the unit of work of the TCP ingest path.

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;

use vigil::clock::ManualClock;
use vigil::index::{Index, IndexConfig};
use vigil::ingest::{Ingest, Transport};
use vigil::proto::{Attribute, Msg, PbEvent};
use vigil::stats::Stats;
use vigil::streams::IndexEverything;

/// A collectd-like batch: 100 events over 10 hosts with tags and attributes.
fn batch() -> bytes::Bytes {
    let events = (0..100)
        .map(|i| PbEvent {
            host: Some(format!("host{}.example.com", i % 10)),
            service: Some(format!("cpu-{}/cpu-idle/value", i / 10)),
            state: Some("ok".into()),
            time_micros: Some(1_700_000_000_000_000 + i),
            tags: vec!["collectd".into()],
            ttl: Some(20.0),
            metric_d: Some(i as f64 * 0.5),
            attributes: vec![Attribute {
                key: "plugin".into(),
                value: Some("cpu".into()),
            }],
            ..PbEvent::default()
        })
        .collect();
    Msg {
        events,
        ..Msg::default()
    }
    .encode_to_vec()
    .into()
}

fn ingest(c: &mut Criterion) {
    let body = batch();
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(100));
    group.bench_function("decode_100", |b| {
        b.iter(|| Msg::decode(body.clone()).unwrap())
    });
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000));
    let index = Arc::new(Index::new(IndexConfig::default()));
    let ingest = Ingest {
        index: index.clone(),
        streams: Arc::new(IndexEverything::new(index)),
        clock: clock.clone(),
        stats: Arc::new(Stats::default()),
    };
    group.bench_function("decode_and_index_100", |b| {
        b.iter_batched(
            || body.clone(),
            |body| {
                clock.advance(1);
                ingest.handle_frame(body, Transport::Tcp)
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
