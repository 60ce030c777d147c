//! vigil's own numbers: a lock-free latency histogram around the rule pipeline,
//! one [`Sample`] of every counter and gauge (what `GET /metrics` exposes), and
//! the self-metric events emitted every interval into the same pipeline, as
//! Riemann does, so operators alert on vigil with ordinary rules. The series
//! of an output no longer declared leave the index quietly: they stopped, and
//! must not expire into pages that nothing can resolve.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::blocking::off_workers;
use crate::clock::{MICROS_PER_SEC, Micros, SharedClock};
use crate::cluster::{Cluster, ClusterStatus};
use crate::event::{Event, Metric};
use crate::event_queue::Fill;
use crate::index::{Index, Notices};
use crate::pubsub::Pubsub;
use crate::rules::engine::Rules;
use crate::rules::reload::Reloader;
use crate::stats::Stats;
use crate::streams::Streams;

/// Upper bounds of the latency buckets, in nanoseconds (5 µs … 5 s); one more
/// bucket above the last catches everything slower.
pub const LATENCY_BUCKETS_NANOS: [u64; 19] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

const BUCKETS: usize = LATENCY_BUCKETS_NANOS.len() + 1;

/// Fixed-bucket histogram: one atomic add per observation, never a lock, so it
/// can sit on the ingest path.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_NANOS.partition_point(|&le| le < nanos);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self.counts.each_ref().map(|c| c.load(Ordering::Relaxed)),
            sum_nanos: self.sum_nanos.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment: per bucket (not cumulative), the last
/// one unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    pub counts: [u64; BUCKETS],
    pub sum_nanos: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was observed between `earlier` and this snapshot.
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        let mut counts = self.counts;
        for (c, e) in counts.iter_mut().zip(earlier.counts) {
            *c = c.saturating_sub(e);
        }
        HistogramSnapshot {
            counts,
            sum_nanos: self.sum_nanos.saturating_sub(earlier.sum_nanos),
        }
    }

    /// The `q` quantile, interpolated linearly inside its bucket as
    /// Prometheus's `histogram_quantile` does; `None` when nothing was observed.
    /// The unbounded bucket answers with the largest bound.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &n) in self.counts.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let Some(&upper) = LATENCY_BUCKETS_NANOS.get(i) else {
                    break;
                };
                let lower = if i == 0 {
                    0
                } else {
                    LATENCY_BUCKETS_NANOS[i - 1]
                };
                let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
                let nanos = lower as f64 + within * (upper - lower) as f64;
                return Some(Duration::from_nanos(nanos as u64));
            }
            below += n;
        }
        LATENCY_BUCKETS_NANOS
            .last()
            .map(|&n| Duration::from_nanos(n))
    }
}

/// The pipeline with each batch timed: what the server (and HTTP, and the
/// self-metrics) hand events to, wrapped around the rules.
pub struct TimedStreams {
    inner: Arc<dyn Streams>,
    latency: Arc<Histogram>,
}

impl TimedStreams {
    pub fn new(inner: Arc<dyn Streams>, latency: Arc<Histogram>) -> Self {
        Self { inner, latency }
    }
}

impl Streams for TimedStreams {
    fn process(&self, events: &[Event]) {
        let started = Instant::now();
        self.inner.process(events);
        self.latency.observe(started.elapsed());
    }

    fn process_expired(&self, notices: Notices<'_>) {
        let started = Instant::now();
        self.inner.process_expired(notices);
        self.latency.observe(started.elapsed());
    }

    fn tick(&self) {
        self.inner.tick();
    }

    fn stalls(&self) -> Option<Arc<crate::index::StallWatch>> {
        self.inner.stalls()
    }
}

/// Where every number vigil reports about itself is read from.
pub struct Telemetry {
    pub stats: Arc<Stats>,
    pub index: Arc<Index>,
    /// Where WebSocket/SSE/gRPC subscribers are: the index's pubsub, or in a
    /// cluster the node's feed of every node's changes.
    pub subscribers: Arc<Pubsub>,
    pub rules: Arc<Rules>,
    /// Holds the current outputs (they change on reload).
    pub reloader: Arc<Reloader>,
    pub latency: Arc<Histogram>,
    pub started: Instant,
    /// Set in cluster mode.
    pub cluster: Option<Arc<Cluster>>,
}

/// One output's counters (see `OutputStats`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputSample {
    pub name: String,
    pub accepted: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub skipped: u64,
    pub queued: u64,
    pub in_flight: u64,
    pub retries: u64,
    /// How full its queue is: the state of its `queued` series.
    pub fill: Fill,
}

/// Every counter and gauge, read once.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// [`Stats`] by field name.
    pub counters: Vec<(&'static str, u64)>,
    pub index_size: u64,
    pub expired: u64,
    /// Stalls of the process the timer saw (a VM paused, the clock stepped
    /// ahead), and their length in all.
    pub stalls: u64,
    pub stalled_seconds: f64,
    pub refused: u64,
    /// Events stored with a `time` far ahead of vigil's clock.
    pub time_ahead: u64,
    /// Events stored already expired (an agent's clock far behind).
    pub arrived_expired: u64,
    /// Entries expired whose key was stored again before their `expired`
    /// event went out: the event was dropped.
    pub expired_came_back: u64,
    /// Index scans stopped by `--query-timeout`, and stopped because their
    /// asker went away.
    pub scans_timed_out: u64,
    pub scans_abandoned: u64,
    pub subscribers: u64,
    pub subscriber_events: u64,
    pub slow_disconnects: u64,
    /// Subscribers disconnected because their query overran its budget on
    /// an event, and subscriptions refused because their query had.
    pub costly_disconnects: u64,
    pub costly_refusals: u64,
    /// Bytes of events held in all subscribers' queues.
    pub subscriber_bytes: u64,
    /// Index changes a cluster owner could not forward to other nodes' subscribers.
    pub forward_dropped: u64,
    pub outputs: Vec<OutputSample>,
    pub latency: HistogramSnapshot,
    /// [`RuleStats`](crate::rules::engine::RuleStats) by field name.
    pub rules: Vec<(&'static str, u64)>,
    pub uptime: Duration,
    /// In cluster mode.
    pub cluster: Option<ClusterStatus>,
}

impl Sample {
    /// A [`Stats`] counter by field name (0 if there is none).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |&(_, v)| v)
    }
}

impl Telemetry {
    pub fn sample(&self) -> Sample {
        let pubsub = &self.subscribers;
        let rules = &self.rules.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Sample {
            counters: self.stats.snapshot(),
            index_size: self.index.len() as u64,
            expired: self.index.expired_total(),
            stalls: self.index.stalls_total(),
            stalled_seconds: self.index.stalled_seconds_total(),
            refused: self.index.refused_total(),
            time_ahead: self.index.time_ahead_total(),
            arrived_expired: self.index.arrived_expired_total(),
            expired_came_back: self.index.expired_came_back_total(),
            scans_timed_out: self.index.scans_timed_out_total(),
            scans_abandoned: self.index.scans_abandoned_total(),
            subscribers: pubsub.subscribers() as u64,
            subscriber_events: get(&pubsub.stats.delivered),
            slow_disconnects: get(&pubsub.stats.disconnected_slow),
            costly_disconnects: get(&pubsub.stats.disconnected_costly),
            costly_refusals: get(&pubsub.stats.refused_costly),
            subscriber_bytes: pubsub.stats.bytes_held.load(Ordering::Relaxed) as u64,
            forward_dropped: get(&self.index.pubsub().stats.dropped),
            outputs: self
                .reloader
                .output_counts()
                .into_iter()
                .map(|c| OutputSample {
                    accepted: c.get(|s| &s.accepted),
                    delivered: c.get(|s| &s.delivered),
                    dropped: c.get(|s| &s.dropped),
                    skipped: c.get(|s| &s.skipped),
                    queued: c.queued,
                    in_flight: c.get(|s| &s.in_flight),
                    retries: c.get(|s| &s.retries),
                    fill: c.fill,
                    name: c.name,
                })
                .collect(),
            latency: self.latency.snapshot(),
            rules: rules.snapshot(),
            uptime: self.started.elapsed(),
            cluster: self.cluster.as_ref().map(|cluster| cluster.status()),
        }
    }
}

/// Rates reported as `<service>` from the delta of a [`Stats`] counter.
const COUNTER_RATES: [(&str, &str); 5] = [
    ("vigil tcp events/s", "tcp_events"),
    ("vigil udp events/s", "udp_events"),
    ("vigil grpc events/s", "grpc_events"),
    ("vigil http events/s", "http_events"),
    ("vigil graphite events/s", "graphite_events"),
];

/// The series of each output, `vigil output NAME <counter>`, in the order of
/// [`OutputSample::counters`].
const OUTPUT_COUNTERS: [&str; 7] = [
    "accepted",
    "delivered",
    "dropped",
    "skipped",
    "queued",
    // Taken from the queue and not yet settled: what an output stuck on a
    // dead downstream holds, while its queue may look empty.
    "in flight",
    "retries",
];

impl OutputSample {
    fn counters(&self) -> [u64; OUTPUT_COUNTERS.len()] {
        [
            self.accepted,
            self.delivered,
            self.dropped,
            self.skipped,
            self.queued,
            self.in_flight,
            self.retries,
        ]
    }
}

/// The state of a queue's series, at Riemann's thresholds for its executor
/// queues: an output falling behind shows before its queue drops events.
fn queue_state(fill: Fill) -> &'static str {
    if fill.over(3, 4) {
        "critical"
    } else if fill.over(1, 2) {
        "warning"
    } else {
        "ok"
    }
}

/// The output whose own series `service` is (`extra` for `vigil output
/// extra in flight`). An output's name is an identifier: it has no space.
fn output_of(service: &str) -> Option<&str> {
    let rest = service.strip_prefix("vigil output ")?;
    OUTPUT_COUNTERS
        .iter()
        .find_map(|counter| rest.strip_suffix(counter)?.strip_suffix(' '))
        .filter(|name| !name.is_empty() && !name.contains(' '))
}

/// Removes from `index`, quietly (no expiry notice, nothing to subscribers
/// or through the rules), `host`'s own series of the outputs not in
/// `declared`: they are no longer sent, and expiring would page for each
/// of them with nothing to resolve it. Returns how many went, and the
/// names of their outputs. Scans the whole index.
fn forget_outputs(index: &Index, host: &str, declared: &[String]) -> (usize, Vec<String>) {
    let mut gone = BTreeSet::new();
    let removed = index.remove_where(|h, service| {
        if h != host {
            return false;
        }
        match output_of(service) {
            Some(name) if !declared.iter().any(|d| d == name) => {
                gone.insert(name.to_owned());
                true
            }
            _ => false,
        }
    });
    let gone: Vec<String> = gone.into_iter().collect();
    if removed > 0 {
        tracing::info!(
            series = removed,
            outputs = %gone.join(", "),
            "Removed the series of vigil's own metrics for outputs no longer declared."
        );
    }
    (removed, gone)
}

/// [`forget_outputs`] of the outputs `sample` does not report, off the
/// async workers: it scans the whole index.
async fn forget_undeclared(index: &Arc<Index>, host: &str, sample: &Sample) {
    let (index, host) = (index.clone(), host.to_owned());
    let declared: Vec<String> = sample.outputs.iter().map(|o| o.name.clone()).collect();
    off_workers(move || forget_outputs(&index, &host, &declared)).await;
}

/// Turns successive samples into self-metric events. Rates divide counter
/// deltas by the time between samples on the injected clock.
pub struct Emitter {
    host: String,
    ttl: f32,
    /// The sample the next rates are computed from, and when it was taken.
    previous: (Micros, Sample),
}

impl Emitter {
    /// `baseline` is taken at start-up (before any listener accepts), so the
    /// first interval's rates count everything that arrived in it.
    pub fn new(host: String, interval: Duration, now: Micros, baseline: Sample) -> Self {
        Self {
            host,
            ttl: 2.0 * interval.as_secs_f32(),
            previous: (now, baseline),
        }
    }

    /// One self-metric event.
    fn event(&self, now: Micros, service: String, state: &str, metric: Metric) -> Event {
        Event {
            host: Some(self.host.clone()),
            service: Some(service),
            state: Some(state.to_owned()),
            time: now,
            tags: vec!["vigil".to_owned()],
            metric: Some(metric),
            ttl: Some(self.ttl),
            ..Event::default()
        }
    }

    /// The events for `sample`, taken at `now`.
    pub fn events(&mut self, now: Micros, sample: Sample) -> Vec<Event> {
        let mut out = Vec::new();
        let gauge = |n: u64| Metric::Int(i64::try_from(n).unwrap_or(i64::MAX));
        if let Some(cluster) = sample.cluster {
            // Critical while cut off from NATS, so a rule can page on it.
            let state = if cluster.connected { "ok" } else { "critical" };
            let connected = gauge(u64::from(cluster.connected));
            out.extend([
                self.event(now, "vigil cluster connected".into(), state, connected),
                self.event(
                    now,
                    "vigil cluster members".into(),
                    "ok",
                    gauge(cluster.members),
                ),
                self.event(
                    now,
                    "vigil cluster shards owned".into(),
                    "ok",
                    gauge(cluster.shards_owned),
                ),
                self.event(
                    now,
                    "vigil cluster forward dropped".into(),
                    "ok",
                    gauge(sample.forward_dropped),
                ),
            ]);
        }
        for o in &sample.outputs {
            for (counter, value) in OUTPUT_COUNTERS.iter().zip(o.counters()) {
                let service = format!("vigil output {} {counter}", o.name);
                let state = match *counter {
                    "queued" => queue_state(o.fill),
                    _ => "ok",
                };
                out.push(self.event(now, service, state, gauge(value)));
            }
        }
        let mut emit = |service: String, metric: Metric| {
            out.push(self.event(now, service, "ok", metric));
        };
        emit("vigil index size".to_owned(), gauge(sample.index_size));
        emit("vigil subscribers".to_owned(), gauge(sample.subscribers));
        emit(
            "vigil subscriber bytes held".to_owned(),
            gauge(sample.subscriber_bytes),
        );
        // Everything `/metrics` exposes is an event too, for a rule to alert
        // on: the counters as totals since start, named by their words.
        for &(field, value) in &sample.counters {
            emit(format!("vigil {}", field.replace('_', " ")), gauge(value));
        }
        for (service, value) in [
            ("vigil index expired", sample.expired),
            ("vigil index refused", sample.refused),
            ("vigil index time ahead", sample.time_ahead),
            ("vigil index arrived expired", sample.arrived_expired),
            ("vigil index expired came back", sample.expired_came_back),
            ("vigil index scans timed out", sample.scans_timed_out),
            ("vigil index scans abandoned", sample.scans_abandoned),
            ("vigil subscriber events", sample.subscriber_events),
            (
                "vigil subscribers disconnected slow",
                sample.slow_disconnects,
            ),
            (
                "vigil subscribers disconnected costly",
                sample.costly_disconnects,
            ),
            ("vigil subscriptions refused costly", sample.costly_refusals),
        ] {
            emit(service.to_owned(), gauge(value));
        }
        for &(field, value) in &sample.rules {
            emit(
                format!("vigil rules {}", field.replace('_', " ")),
                gauge(value),
            );
        }
        emit(
            "vigil uptime".to_owned(),
            Metric::Float(sample.uptime.as_secs_f64()),
        );
        let (then, before) = &self.previous;
        let secs = (now - then) as f64 / MICROS_PER_SEC as f64;
        // A clock that did not move (or went back) gives no rate.
        if secs > 0.0 {
            let rate = |now: u64, then: u64| Metric::Float(now.saturating_sub(then) as f64 / secs);
            for (service, counter) in COUNTER_RATES {
                let metric = rate(sample.counter(counter), before.counter(counter));
                emit(service.to_owned(), metric);
            }
            emit(
                "vigil expired/s".to_owned(),
                rate(sample.expired, before.expired),
            );
        }
        // Latency of the batches in this interval, in milliseconds like Riemann's.
        let p99 = sample.latency.since(&before.latency).quantile(0.99);
        let millis = p99.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        emit(
            "vigil streams latency p99".to_owned(),
            Metric::Float(millis),
        );
        self.previous = (now, sample);
        out
    }

    /// Whether an output of the previous sample is not in `sample`: one a
    /// reload removed or renamed, reported until it delivered what it had
    /// queued, has ended.
    fn lost_an_output(&self, sample: &Sample) -> bool {
        let (_, before) = &self.previous;
        (before.outputs.iter()).any(|o| sample.outputs.iter().all(|now| now.name != o.name))
    }
}

/// Every `interval`, samples `telemetry` and runs the self-metric events
/// through `streams`, until `shutdown`.
pub async fn run(
    telemetry: Arc<Telemetry>,
    streams: Arc<dyn Streams>,
    clock: SharedClock,
    mut emitter: Emitter,
    interval: Duration,
    shutdown: CancellationToken,
) {
    // A snapshot of an earlier run brings back the series of the outputs
    // declared then.
    forget_undeclared(&telemetry.index, &emitter.host, &emitter.previous.1).await;
    // The first tick is one interval away: the emitter's baseline is "now".
    let first = tokio::time::Instant::now() + interval;
    let mut tick = tokio::time::interval_at(first, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let sample = telemetry.sample();
        if emitter.lost_an_output(&sample) {
            forget_undeclared(&telemetry.index, &emitter.host, &sample).await;
        }
        let events = emitter.events(clock.now(), sample);
        tracing::trace!(count = events.len(), "Self-metric events.");
        streams.process(&events);
    }
}

/// This machine's name, the default `host` of self-metric events.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Micros = 1_700_000_000 * MICROS_PER_SEC;

    fn metric(events: &[Event], service: &str) -> Option<f64> {
        events
            .iter()
            .find(|e| e.service_str() == service)
            .map(|e| e.metric.unwrap().as_f64())
    }

    #[test]
    fn observations_land_in_their_bucket_and_quantiles_interpolate() {
        let h = Histogram::default();
        for _ in 0..99 {
            h.observe(Duration::from_micros(3));
        }
        h.observe(Duration::from_millis(7));
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert_eq!(s.counts[0], 99, "≤ 5 µs");
        assert_eq!(s.counts[10], 1, "5 ms < 7 ms ≤ 10 ms");
        assert!(s.quantile(0.5).unwrap() <= Duration::from_micros(5));
        let p999 = s.quantile(0.999).unwrap();
        assert!(p999 > Duration::from_millis(5) && p999 <= Duration::from_millis(10));
        assert_eq!(HistogramSnapshot::default().quantile(0.99), None);

        h.observe(Duration::from_secs(60));
        assert_eq!(h.snapshot().counts[BUCKETS - 1], 1, "beyond every bound");
        let only_slow = h.snapshot().since(&s);
        assert_eq!(only_slow.count(), 1);
        assert_eq!(only_slow.quantile(0.99), Some(Duration::from_secs(5)));
    }

    #[test]
    fn rate_counters_exist_in_stats() {
        let names: Vec<_> = Stats::default()
            .snapshot()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for (_, counter) in COUNTER_RATES {
            assert!(names.contains(&counter), "{counter}");
        }
    }

    #[test]
    fn rates_come_from_deltas_over_the_clock_and_outputs_are_reported() {
        let mut sample = Sample {
            counters: vec![("tcp_events", 100), ("udp_events", 0)],
            index_size: 3,
            expired: 10,
            rules: vec![("window_overflow", 4)],
            outputs: vec![OutputSample {
                name: "pager".into(),
                accepted: 4,
                dropped: 1,
                skipped: 1,
                in_flight: 2,
                ..OutputSample::default()
            }],
            ..Sample::default()
        };
        let mut emitter = Emitter::new("node-1".into(), Duration::from_secs(5), T0, sample.clone());
        let first = emitter.events(T0, sample.clone());
        assert_eq!(metric(&first, "vigil index size"), Some(3.0));
        assert_eq!(metric(&first, "vigil output pager dropped"), Some(1.0));
        assert_eq!(metric(&first, "vigil output pager skipped"), Some(1.0));
        assert_eq!(metric(&first, "vigil output pager in flight"), Some(2.0));
        assert_eq!(
            metric(&first, "vigil tcp events/s"),
            None,
            "no time passed: no rate"
        );
        assert_eq!(metric(&first, "vigil streams latency p99"), Some(0.0));
        assert_eq!(metric(&first, "vigil tcp events"), Some(100.0), "a total");
        assert_eq!(metric(&first, "vigil rules window overflow"), Some(4.0));
        assert_eq!(metric(&first, "vigil output pager retries"), Some(0.0));
        assert_eq!(metric(&first, "vigil uptime"), Some(0.0));
        let e = &first[0];
        assert_eq!((e.host_str(), e.ttl, e.time), ("node-1", Some(10.0), T0));
        assert_eq!(e.tags, vec!["vigil".to_owned()]);

        sample.counters[0].1 = 150;
        sample.expired = 12;
        let h = Histogram::default();
        h.observe(Duration::from_micros(800));
        sample.latency = h.snapshot();
        let second = emitter.events(T0 + 10 * MICROS_PER_SEC, sample);
        assert_eq!(metric(&second, "vigil tcp events/s"), Some(5.0));
        assert_eq!(metric(&second, "vigil udp events/s"), Some(0.0));
        assert_eq!(metric(&second, "vigil expired/s"), Some(0.2));
        let p99 = metric(&second, "vigil streams latency p99").unwrap();
        assert!(p99 > 0.5 && p99 <= 1.0, "{p99} ms");
        assert_eq!(metric(&second, "vigil cluster members"), None, "no cluster");
    }

    #[test]
    fn an_output_queue_is_warning_past_half_full_and_critical_past_three_quarters() {
        let filled = |used: u64| Sample {
            outputs: vec![OutputSample {
                name: "graph".into(),
                queued: used,
                fill: Fill { used, bound: 100 },
                ..OutputSample::default()
            }],
            ..Sample::default()
        };
        let mut emitter = Emitter::new("n".into(), Duration::from_secs(5), T0, filled(0));
        let state = |used| {
            let events = emitter.events(T0, filled(used));
            let queued = events
                .iter()
                .find(|e| e.service_str() == "vigil output graph queued");
            queued.and_then(|e| e.state.clone()).unwrap()
        };
        let states: Vec<String> = [0, 50, 51, 75, 76, 100].map(state).into();
        assert_eq!(
            states,
            ["ok", "ok", "warning", "warning", "critical", "critical"]
        );
    }

    #[test]
    fn a_queue_is_as_full_as_the_fuller_of_its_events_and_bytes() {
        let events = Fill {
            used: 10,
            bound: 100,
        };
        let bytes = Fill {
            used: 90,
            bound: 128,
        };
        assert_eq!(events.fuller(bytes), bytes);
        assert_eq!(bytes.fuller(events), bytes);
        let (sender, _receiver) = crate::event_queue::queue(4, 1_000_000);
        sender.try_send(Event::default(), 10, None).unwrap();
        sender.try_send(Event::default(), 10, None).unwrap();
        sender.try_send(Event::default(), 10, None).unwrap();
        assert!(sender.fill().over(1, 2), "{:?}", sender.fill());
        let (sender, _receiver) = crate::event_queue::queue(100, 1000);
        sender.try_send(Event::default(), 800, None).unwrap();
        assert_eq!(
            sender.fill(),
            Fill {
                used: 800,
                bound: 1000
            }
        );
    }

    fn outputs(names: &[&str]) -> Sample {
        let output = |name: &&str| OutputSample {
            name: (*name).to_owned(),
            ..OutputSample::default()
        };
        Sample {
            outputs: names.iter().map(output).collect(),
            ..Sample::default()
        }
    }

    /// An index holding the self-metric series of `node-1` with these
    /// outputs, and an agent's series named like one of an output's.
    fn indexed(names: &[&str]) -> Index {
        let index = Index::new(crate::index::IndexConfig::default());
        let sample = outputs(names);
        let mut emitter = Emitter::new("node-1".into(), Duration::from_secs(5), T0, sample.clone());
        for event in emitter.events(T0, sample) {
            index.insert(&event);
        }
        index.insert(&Event {
            host: Some("app".into()),
            service: Some("vigil output extra accepted".into()),
            time: T0,
            ttl: Some(10.0),
            ..Event::default()
        });
        index
    }

    /// Every `(host, service)` of the index.
    fn keys(index: &Index) -> BTreeSet<(String, String)> {
        let mut keys = BTreeSet::new();
        let key = |e: &Event| (e.host_str().to_owned(), e.service_str().to_owned());
        let each = |events: &[Event]| {
            keys.extend(events.iter().map(key));
            Ok::<_, ()>(())
        };
        index.for_each_shard(each).unwrap();
        keys
    }

    fn series_of(output: &str) -> BTreeSet<(String, String)> {
        let service = |c: &&str| format!("vigil output {output} {c}");
        let key = |c| ("node-1".to_owned(), service(c));
        OUTPUT_COUNTERS.iter().map(key).collect()
    }

    #[test]
    fn the_series_of_outputs_no_longer_declared_leave_the_index_quietly() {
        let index = indexed(&["a", "ab", "extra"]);
        let before = keys(&index);
        let everything = crate::query::Query::parse("true").unwrap();
        let mut subscriber = index.pubsub().subscribe(everything, 1000);

        let declared = ["a".to_owned(), "ab".to_owned()];
        let (removed, gone) = forget_outputs(&index, "node-1", &declared);
        assert_eq!((removed, gone), (7, vec!["extra".to_owned()]));
        assert_eq!(keys(&index), &before - &series_of("extra"));
        assert!(subscriber.try_recv().is_err(), "nothing to subscribers");
        let mut notices = Vec::new();
        index.expire(T0 + 60 * MICROS_PER_SEC, |c| notices.extend_from_slice(c));
        let expired = |e: &Event| (e.host_str().to_owned(), e.service_str().to_owned());
        let expired: BTreeSet<_> = notices.iter().map(expired).collect();
        assert_eq!(expired, &before - &series_of("extra"), "no notice for them");

        // `a` no longer declared takes its own series, not those of `ab`.
        let index = indexed(&["a", "ab"]);
        let before = keys(&index);
        let (removed, gone) = forget_outputs(&index, "node-1", &["ab".to_owned()]);
        assert_eq!((removed, gone), (7, vec!["a".to_owned()]));
        assert_eq!(keys(&index), &before - &series_of("a"));
        assert!(series_of("ab").is_subset(&keys(&index)));
    }

    #[test]
    fn an_output_missing_from_a_sample_is_noticed() {
        let mut emitter =
            Emitter::new("n".into(), Duration::from_secs(5), T0, outputs(&["a", "b"]));
        assert!(
            !emitter.lost_an_output(&outputs(&["a", "b", "c"])),
            "one more"
        );
        assert!(emitter.lost_an_output(&outputs(&["a", "c"])), "b renamed c");
        emitter.events(T0, outputs(&["a", "c"]));
        assert!(!emitter.lost_an_output(&outputs(&["c", "a"])));
        assert!(emitter.lost_an_output(&outputs(&[])));
    }

    #[test]
    fn a_cluster_node_reports_its_part_and_is_critical_while_cut_off() {
        let sample = |connected| Sample {
            cluster: Some(ClusterStatus {
                connected,
                members: 3,
                shards_owned: 22,
            }),
            ..Sample::default()
        };
        let mut emitter = Emitter::new("n1".into(), Duration::from_secs(5), T0, sample(true));
        let up = emitter.events(T0, sample(true));
        assert_eq!(metric(&up, "vigil cluster members"), Some(3.0));
        assert_eq!(metric(&up, "vigil cluster shards owned"), Some(22.0));
        assert_eq!(metric(&up, "vigil cluster forward dropped"), Some(0.0));
        let state = |events: &[Event]| {
            let connected = events
                .iter()
                .find(|e| e.service_str() == "vigil cluster connected")
                .unwrap();
            (connected.state.clone(), connected.metric)
        };
        assert_eq!(state(&up), (Some("ok".into()), Some(Metric::Int(1))));
        let down = emitter.events(T0 + MICROS_PER_SEC, sample(false));
        assert_eq!(
            state(&down),
            (Some("critical".into()), Some(Metric::Int(0)))
        );
    }
}
