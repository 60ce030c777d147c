//! The index at a million keys: upserting into it, a query that scans it,
//! filling it with new keys, one expiry pass that removes all of them, and
//! how ingest fares while scans or that expiry run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use vigil::clock::MICROS_PER_SEC;
use vigil::event::{Event, Metric};
use vigil::index::{Index, IndexConfig};
use vigil::query::Query;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A million keys when benchmarking; `cargo test` only checks that the bench
/// runs, on a small index.
fn keys() -> usize {
    if std::env::args().any(|a| a == "--bench") {
        1_000_000
    } else {
        10_000
    }
}
const T0: i64 = 1_700_000_000 * MICROS_PER_SEC;

fn event(k: usize, ttl: f32) -> Event {
    Event {
        host: Some(format!("host{}", k / 10)),
        service: Some(format!("service {}", k % 10)),
        state: Some("ok".into()),
        time: T0,
        ttl: Some(ttl),
        metric: Some(Metric::Float(k as f64)),
        tags: vec!["load".into()],
        ..Event::default()
    }
}

fn full_index(ttl: f32) -> Index {
    let index = Index::new(IndexConfig::default());
    for k in 0..keys() {
        index.insert(&event(k, ttl));
    }
    index
}

fn index(c: &mut Criterion) {
    let mut group = c.benchmark_group("index_1m");
    group.sample_size(10);

    let index = full_index(60.0);
    let updates: Vec<Event> = (0..10_000)
        .map(|i| event(i * 7919 % keys(), 60.0))
        .collect();
    group.throughput(Throughput::Elements(updates.len() as u64));
    group.bench_function("upsert_existing_10k", |b| {
        b.iter(|| {
            for e in &updates {
                index.insert(e);
            }
        })
    });

    // A query no key lookup answers reads every entry (dashboards, `GET
    // /index`): each is unpacked and matched, a tenth of them copied out.
    let scan = Query::parse(r#"service = "service 3""#).unwrap();
    group.throughput(Throughput::Elements(keys() as u64));
    group.bench_function("query_scan", |b| {
        b.iter(|| assert_eq!(index.query(&scan).unwrap().len(), keys() / 10))
    });
    drop(index);

    // A million new keys, all due at the same microsecond: their deadlines
    // go into each shard's set in random (hash) order, the set's worst case.
    group.bench_function("insert_new_1m", |b| {
        let events: Vec<Event> = (0..keys()).map(|k| event(k, 60.0)).collect();
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let index = Index::new(IndexConfig::default());
                let started = Instant::now();
                for e in &events {
                    index.insert(e);
                }
                total += started.elapsed();
            }
            total
        })
    });
    group.bench_function("expire_all", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let index = full_index(1.0);
                let started = Instant::now();
                let expired = index.expire(T0 + 2 * MICROS_PER_SEC, |_| {});
                total += started.elapsed();
                assert_eq!(expired, keys());
            }
            total
        })
    });
    group.finish();
}

/// Ingest while the index is busy elsewhere: `work` runs on this thread
/// while another upserts keys the index does not hold yet, one at a time.
/// Printed, not asserted: how long `work` took, how many upserts went in, how
/// many of them took over 1 ms (waiting for a shard `work` held) and the
/// longest single one.
fn ingest_during(name: &str, index: &Index, work: impl FnOnce() -> String) {
    let fresh: Vec<Event> = (0..100_000).map(|i| event(keys() + i, 60.0)).collect();
    let busy = AtomicBool::new(true);
    let (took, done, (upserts, slow, longest)) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let (mut upserts, mut slow, mut longest) = (0, 0, Duration::ZERO);
            while busy.load(Ordering::Relaxed) {
                let started = Instant::now();
                index.insert(&fresh[upserts % fresh.len()]);
                let took = started.elapsed();
                slow += usize::from(took > Duration::from_millis(1));
                longest = longest.max(took);
                upserts += 1;
            }
            (upserts, slow, longest)
        });
        let started = Instant::now();
        let done = work();
        let took = started.elapsed();
        busy.store(false, Ordering::Relaxed);
        (took, done, writer.join().unwrap())
    });
    println!(
        "index_1m/{name}: {done} in {took:.1?}; meanwhile {upserts} upserts, {slow} over 1 ms, the longest {longest:.1?}"
    );
}

/// Ingest during a mass expiry of a million keys, and during queries that
/// read every entry (what a dashboard polling `GET /index` does).
fn ingest_during_expiry_and_scans(_: &mut Criterion) {
    let index = full_index(60.0);
    ingest_during("ingest_during_query_scan", &index, || {
        let scan = Query::parse(r#"service = "service 3""#).unwrap();
        let found: usize = (0..5).map(|_| index.query(&scan).unwrap().len()).sum();
        format!("5 scans found {found} events")
    });
    drop(index);
    let index = full_index(1.0);
    ingest_during("ingest_during_expire_all", &index, || {
        let expired = index.expire(T0 + 2 * MICROS_PER_SEC, |_| {});
        format!("{expired} keys expired")
    });
}

criterion_group!(benches, index, ingest_during_expiry_and_scans);
criterion_main!(benches);
