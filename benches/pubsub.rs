//! Live subscriptions: what publishing a 100-event batch costs the ingest
//! path with 1, 10 and 200 subscribers to everything, and what delivering it
//! costs in all (each subscriber takes every event and its JSON, as an SSE
//! or WebSocket subscriber does); and with 200 subscribers whose query
//! matches none of it; and with one subscriber whose query is a costly
//! chain of 1 500 comparisons matching none of it (evaluated within its
//! budget, the clock read every 256 terms, some publishes timed; never
//! cut for its share of the publisher, which it takes whole here).

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use vigil::event::{Event, Metric};
use vigil::pubsub::{Pubsub, Subscription, WINDOW};
use vigil::query::Query;

// As the server runs: event copies are the allocator's work.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn batch() -> Vec<Event> {
    (0..100)
        .map(|i| Event {
            host: Some(format!("web{i}.example.com")),
            service: Some("cpu-3/cpu-idle/value".into()),
            state: Some("ok".into()),
            description: Some("idle time of the third core".into()),
            metric: Some(Metric::Float(0.93)),
            tags: vec!["collectd".into(), "prod".into()],
            attributes: vec![("plugin".into(), "cpu".into())],
            time: 1_700_000_000_000_000,
            ttl: Some(60.0),
        })
        .collect()
}

fn subscribers(pubsub: &std::sync::Arc<Pubsub>, n: usize) -> Vec<Subscription> {
    (0..n)
        .map(|_| pubsub.subscribe(Query::parse("true").unwrap(), 10_000))
        .collect()
}

fn pubsub(c: &mut Criterion) {
    let events = batch();
    let mut group = c.benchmark_group("pubsub");
    group.throughput(Throughput::Elements(events.len() as u64));
    for n in [1, 10, 200] {
        let pubsub = Pubsub::new();
        let mut subs = subscribers(&pubsub, n);
        group.bench_function(BenchmarkId::new("publish", n), |b| {
            b.iter(|| {
                events.iter().for_each(|e| pubsub.publish(e));
                // Taken too, so the queues never fill: cheap beside publishing.
                for sub in &mut subs {
                    while sub.try_recv().is_ok() {}
                }
            });
        });
        group.bench_function(BenchmarkId::new("deliver_json", n), |b| {
            b.iter(|| {
                events.iter().for_each(|e| pubsub.publish(e));
                let mut bytes = 0;
                for sub in &mut subs {
                    while let Ok(event) = sub.try_recv() {
                        bytes += event.json().len();
                    }
                }
                bytes
            });
        });
    }
    let pubsub = Pubsub::new();
    let _unmatched: Vec<Subscription> = (0..200)
        .map(|_| pubsub.subscribe(Query::parse(r#"service = "disk""#).unwrap(), 10_000))
        .collect();
    group.bench_function(BenchmarkId::new("publish_unmatched", 200), |b| {
        b.iter(|| events.iter().for_each(|e| pubsub.publish(e)));
    });
    let pubsub = Pubsub::with_ingest_share(Duration::MAX, WINDOW);
    let chain: Vec<String> = (0..1_500)
        .map(|i| format!("metric > {}", 1_000 + i))
        .collect();
    let _costly = pubsub.subscribe(Query::parse(&chain.join(" or ")).unwrap(), 10_000);
    group.bench_function(BenchmarkId::new("publish_costly_unmatched", 1), |b| {
        b.iter(|| events.iter().for_each(|e| pubsub.publish(e)));
    });
    group.finish();
}

criterion_group!(benches, pubsub);
criterion_main!(benches);
