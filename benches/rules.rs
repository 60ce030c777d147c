//! The acceptance rule file (`rules/rabbitmq.vigil`) over a 100-event batch:
//! the per-`Msg` cost of the rules between decode and the index.

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};

use vigil::clock::{ManualClock, SharedClock};
use vigil::event::{Event, Metric};
use vigil::index::{Index, IndexConfig};
use vigil::outputs::OutputSink;
use vigil::rules::engine::Rules;
use vigil::rules::{self, EnvPolicy};
use vigil::streams::Streams;

/// Outputs are not what is measured here.
struct Discard;

impl OutputSink for Discard {
    fn push(&self, _event: Event) {}
}

fn batch(now: i64) -> Vec<Event> {
    (0..100)
        .map(|i| Event {
            host: Some(format!("host{}", i % 10)),
            service: Some(if i % 20 == 0 {
                "curl json-rabbitmq/gauge-queue totals-messages".to_owned()
            } else {
                format!("cpu-{}/cpu-idle/value", i / 10)
            }),
            time: now,
            tags: if i % 7 == 0 {
                vec!["push".into()]
            } else {
                Vec::new()
            },
            metric: Some(Metric::Float(f64::from(i) * 5.0)),
            ..Event::default()
        })
        .collect()
}

fn acceptance_file(c: &mut Criterion) {
    let source = include_str!("../rules/rabbitmq.vigil");
    let (_, compiled) =
        rules::load("rules/rabbitmq.vigil", source, EnvPolicy::Lenient).expect("file compiles");
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000));
    let index = Arc::new(Index::new(IndexConfig::default()));
    let sinks: Vec<Arc<dyn OutputSink>> = compiled
        .outputs
        .iter()
        .map(|_| Arc::new(Discard) as _)
        .collect();
    let shared: SharedClock = clock.clone();
    let rules = Rules::new(compiled.roots, None, sinks, index, shared);
    let mut group = c.benchmark_group("rules");
    group.throughput(Throughput::Elements(100));
    group.bench_function("rabbitmq_vigil_100", |b| {
        b.iter_batched(
            || {
                clock.advance(1_000);
                batch(1_700_000_000_000_000)
            },
            |events| rules.process(&events),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, acceptance_file);
criterion_main!(benches);
