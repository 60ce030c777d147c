//! The acceptance rule file (`rules/rabbitmq.vigil`) over a 100-event batch:
//! the per-`Msg` cost of the rules between decode and the index; the pause
//! of a reload of rules holding many `changed_state` series; the timer's
//! tick of a `by` holding many series; a `by` meeting new series;
//! `coalesce` replacing the latest event of the series it holds; and
//! `predict_linear` over a full window of 100 000 points.

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

/// A reload of rules holding 50 000 `changed_state` series: the pause ingest
/// waits for while the state moves, with the block unchanged and with it
/// edited (each group then rebuilt from the new block).
fn reload(c: &mut Criterion) {
    const SERIES: usize = 50_000;
    let source = |block: &str| format!("streams {{\n  changed_state {{ {block} }}\n}}\n");
    let compile = |source: &str| {
        rules::load("reload.vigil", source, EnvPolicy::Lenient)
            .expect("file compiles")
            .1
            .roots
    };
    let clock: SharedClock = Arc::new(ManualClock::new(1_700_000_000_000_000));
    let index = Arc::new(Index::new(IndexConfig::default()));
    let unchanged = source("index");
    let rules = Rules::new(compile(&unchanged), None, Vec::new(), index, clock);
    let events: Vec<Event> = (0..SERIES)
        .map(|i| Event {
            host: Some(format!("host{i}")),
            service: Some("svc".to_owned()),
            state: Some("ok".to_owned()),
            time: 1_700_000_000_000_000,
            ..Event::default()
        })
        .collect();
    for batch in events.chunks(100) {
        rules.process(batch);
    }
    let mut group = c.benchmark_group("reload");
    group.sample_size(20);
    // Alternating between two texts: every reload is an edit.
    let texts = [source("index"), source("index "), unchanged.clone()];
    for (name, sources) in [
        ("changed_state_50k_unchanged", &texts[2..]),
        ("changed_state_50k_edited", &texts[..2]),
    ] {
        let mut next = 0;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    next += 1;
                    compile(&sources[next % sources.len()])
                },
                |roots| rules.replace(&rules.reload_turn(), roots, None, Vec::new()),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// The timer's 100 ms tick of a `by` holding 200 000 series: with a
/// `rate(10s)` each whose windows are spread over the 10 s (1 % due on each
/// tick), and with `changed_state` (nothing ever due). The tick holds the
/// `by`'s locks against those series' events.
fn by_tick(c: &mut Criterion) {
    const SERIES: usize = 200_000;
    const START: i64 = 1_700_000_000_000_000;
    let mut group = c.benchmark_group("by_tick");
    for (name, block) in [
        (
            "rate_200k_series_1pct_due",
            "by(host) { rate(10s) { drop } }",
        ),
        ("changed_state_200k_series", "changed_state { drop }"),
    ] {
        let source = format!("streams {{\n  {block}\n}}\n");
        let (_, compiled) =
            rules::load("by.vigil", &source, EnvPolicy::Lenient).expect("file compiles");
        let clock = Arc::new(ManualClock::new(START));
        let index = Arc::new(Index::new(IndexConfig::default()));
        let shared: SharedClock = clock.clone();
        let rules = Rules::new(compiled.roots, None, Vec::new(), index, shared);
        let batches = SERIES / 100;
        for batch in 0..batches {
            // Arrivals spread over 10 s; the series never expire.
            let now = START + (batch * 10_000_000 / batches) as i64;
            clock.set(now);
            let events: Vec<Event> = (batch * 100..(batch + 1) * 100)
                .map(|i| Event {
                    host: Some(format!("host{i}")),
                    service: Some("svc".to_owned()),
                    state: Some("ok".to_owned()),
                    metric: Some(Metric::Int(1)),
                    ttl: Some(1e9),
                    time: now,
                    ..Event::default()
                })
                .collect();
            rules.process(&events);
        }
        group.bench_function(name, |b| {
            b.iter(|| {
                clock.advance(100_000);
                rules.tick();
            })
        });
    }
    group.finish();
}

/// 10 000 events of series a `by` of seven stages has not seen, in batches
/// of 100, into a `by` that holds none: what making a group costs (freeing
/// the rules, and with them the groups, is not measured).
fn by_new_groups(c: &mut Criterion) {
    const SERIES: usize = 10_000;
    const START: i64 = 1_700_000_000_000_000;
    let source = "streams {
  by(host, service) {
    rate(10s) { drop }
    changed_state { drop }
    fixed_time_window(10s) { mean { drop } }
    moving_event_window(1000) { mean { drop } }
    percentiles(10s, [0.5, 0.99]) { drop }
    throttle(5, 10s) { drop }
    coalesce(10s) { count { drop } }
  }
}
";
    let events: Vec<Event> = (0..SERIES)
        .map(|i| Event {
            host: Some(format!("host{}", i / 10)),
            service: Some(format!("service {}", i % 10)),
            state: Some("ok".to_owned()),
            metric: Some(Metric::Float(i as f64)),
            ttl: Some(600.0),
            time: START,
            ..Event::default()
        })
        .collect();
    let mut group = c.benchmark_group("by_new_groups");
    group.throughput(Throughput::Elements(SERIES as u64));
    group.sample_size(20);
    group.bench_function("seven_stages_10k", |b| {
        b.iter_batched(
            || {
                let (_, compiled) =
                    rules::load("by.vigil", source, EnvPolicy::Lenient).expect("file compiles");
                let clock: SharedClock = Arc::new(ManualClock::new(START));
                let index = Arc::new(Index::new(IndexConfig::default()));
                Rules::new(compiled.roots, None, Vec::new(), index, clock)
            },
            |rules| {
                for batch in events.chunks(100) {
                    rules.process(batch);
                }
                rules
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// `coalesce` over a 100-event batch of series it already holds: what it
/// costs per event to replace a series' latest event.
fn coalesce(c: &mut Criterion) {
    let source = "streams {\n  coalesce(10s) { count { drop } }\n}\n";
    let (_, compiled) =
        rules::load("coalesce.vigil", source, EnvPolicy::Lenient).expect("compiles");
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000));
    let shared: SharedClock = clock.clone();
    let index = Arc::new(Index::new(IndexConfig::default()));
    let rules = Rules::new(compiled.roots, None, Vec::new(), index, shared);
    rules.process(&batch(1_700_000_000_000_000));
    let mut group = c.benchmark_group("rules");
    group.throughput(Throughput::Elements(100));
    group.bench_function("coalesce_100", |b| {
        b.iter_batched(
            || batch(1_700_000_000_000_000),
            |events| rules.process(&events),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// `predict_linear(100000, 30m)` with its window full: what an event costs
/// once it enters and the oldest point leaves (a refit of the window whole
/// would be 100 000 points an event).
fn predict_linear(c: &mut Criterion) {
    const N: i64 = 100_000;
    let source = format!("streams {{\n  predict_linear({N}, 30m) {{ drop }}\n}}\n");
    let (_, compiled) =
        rules::load("predict.vigil", &source, EnvPolicy::Lenient).expect("compiles");
    let clock = Arc::new(ManualClock::new(1_700_000_000_000_000));
    let shared: SharedClock = clock.clone();
    let index = Arc::new(Index::new(IndexConfig::default()));
    let rules = Rules::new(compiled.roots, None, Vec::new(), index, shared);
    // One point a second, a disk filling with some noise.
    let point = |t: i64| Event {
        host: Some("web1".into()),
        service: Some("fs-usage".into()),
        time: 1_700_000_000_000_000 + t * 1_000_000,
        metric: Some(Metric::Float(40.0 + t as f64 * 1e-3 + (t % 7) as f64 * 0.1)),
        ..Event::default()
    };
    let mut t = 0;
    while t < N {
        let events: Vec<Event> = (t..t + 1000).map(point).collect();
        rules.process(&events);
        t += 1000;
    }
    let mut group = c.benchmark_group("rules");
    group.throughput(Throughput::Elements(100));
    group.bench_function("predict_linear_100k_window_100", |b| {
        b.iter_batched(
            || {
                let events: Vec<Event> = (t..t + 100).map(point).collect();
                t += 100;
                events
            },
            |events| rules.process(&events),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(
    benches,
    acceptance_file,
    reload,
    by_tick,
    by_new_groups,
    coalesce,
    predict_linear
);
criterion_main!(benches);
