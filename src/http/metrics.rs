//! `GET /metrics`: vigil's own counters and gauges in the Prometheus text
//! exposition format (version 0.0.4), written by hand from one [`Sample`].
//!
//! Every [`Stats`](crate::stats::Stats) field appears as `vigil_<field>_total`
//! (a counter), except those counting what is open or held now (`*_open`,
//! `*_held`), which are gauges named `vigil_<field>`, and every
//! [`RuleStats`] field as `vigil_rules_<field>_total`; new fields show up
//! without changes here.

use std::fmt::{Display, Write};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::rules::engine::RuleStats;
use crate::selfmetrics::{LATENCY_BUCKETS_NANOS, Sample};
use crate::stats::Stats;

pub(super) async fn get(State(state): State<AppState>) -> Response {
    let text = render(&state.telemetry.sample());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The exposition of `s`.
fn render(s: &Sample) -> String {
    let mut out = Exposition::default();
    for &(field, value) in &s.counters {
        let help = Stats::help(field);
        if field.ends_with("_open") || field.ends_with("_held") {
            out.family(&format!("vigil_{field}"), "gauge", &help);
        } else {
            out.family(&format!("vigil_{field}_total"), "counter", &help);
        }
        out.value("", value);
    }

    out.single(
        "vigil_index_size",
        "gauge",
        "Entries in the index.",
        s.index_size,
    );
    let expired = "Index entries removed by TTL expiry.";
    out.single("vigil_index_expired_total", "counter", expired, s.expired);
    let stalls = "Stalls of the process the timer saw (a VM paused, SIGSTOP, the clock stepped \
                  ahead by more than two ticks), after which the index entries whose TTL ran out \
                  meanwhile got back what the stall took of their TTL.";
    out.single("vigil_stalls_total", "counter", stalls, s.stalls);
    let stalled = "How long the stalls of vigil_stalls_total lasted in all.";
    out.single(
        "vigil_stalled_seconds_total",
        "counter",
        stalled,
        s.stalled_seconds,
    );
    let refused = "New index keys refused because the index was full.";
    out.single("vigil_index_refused_total", "counter", refused, s.refused);
    let ahead = "Events indexed whose time was over 5 minutes ahead of vigil's clock.";
    out.single(
        "vigil_index_time_ahead_total",
        "counter",
        ahead,
        s.time_ahead,
    );
    let arrived_expired = "Events indexed already expired: time plus TTL before vigil's clock.";
    out.single(
        "vigil_index_arrived_expired_total",
        "counter",
        arrived_expired,
        s.arrived_expired,
    );
    let came_back = "Index entries expired whose key was stored again before their expired \
                     event went out (the host came back): no expired event was run.";
    out.single(
        "vigil_index_expired_came_back_total",
        "counter",
        came_back,
        s.expired_came_back,
    );
    let timed_out = "Index scans stopped by --query-timeout.";
    out.single(
        "vigil_index_scans_timed_out_total",
        "counter",
        timed_out,
        s.scans_timed_out,
    );
    let abandoned = "Index scans stopped because their asker went away.";
    out.single(
        "vigil_index_scans_abandoned_total",
        "counter",
        abandoned,
        s.scans_abandoned,
    );

    let subs = "Live WebSocket, SSE and gRPC subscribers.";
    out.single("vigil_subscribers", "gauge", subs, s.subscribers);
    let delivered = "Events handed to subscribers.";
    out.single(
        "vigil_subscriber_events_total",
        "counter",
        delivered,
        s.subscriber_events,
    );
    let slow = "Subscribers disconnected because their queue was full, or furthest behind \
                when all queues together were.";
    out.single(
        "vigil_subscribers_disconnected_slow_total",
        "counter",
        slow,
        s.slow_disconnects,
    );
    let costly = "Subscribers disconnected because their query took more than 1ms on one event \
                  (on the ingest path).";
    out.single(
        "vigil_subscribers_disconnected_costly_total",
        "counter",
        costly,
        s.costly_disconnects,
    );
    let refused = "Subscriptions refused because their query was found too costly within the \
                   last minute.";
    out.single(
        "vigil_subscriptions_refused_costly_total",
        "counter",
        refused,
        s.costly_refusals,
    );
    let held = "Bytes of events held in all subscribers' queues.";
    out.single(
        "vigil_subscriber_bytes_held",
        "gauge",
        held,
        s.subscriber_bytes,
    );
    if let Some(cluster) = s.cluster {
        let forward = "Index changes a cluster owner dropped instead of forwarding to subscribers.";
        out.single(
            "vigil_cluster_forward_dropped_total",
            "counter",
            forward,
            s.forward_dropped,
        );
        out.single(
            "vigil_cluster_connected",
            "gauge",
            "1 while connected to NATS; 0 while cut off (nothing taken in can be stored).",
            u64::from(cluster.connected),
        );
        out.single(
            "vigil_cluster_members",
            "gauge",
            "Live cluster nodes, this one included, as of the last heartbeat round.",
            cluster.members,
        );
        out.single(
            "vigil_cluster_shards_owned",
            "gauge",
            "Shards whose lease this node holds.",
            cluster.shards_owned,
        );
    }

    type Field = fn(&crate::selfmetrics::OutputSample) -> u64;
    let outputs: [(&str, &str, &str, Field); 7] = [
        (
            "vigil_output_accepted_total",
            "counter",
            "Events handed to the output by the rules.",
            |o| o.accepted,
        ),
        (
            "vigil_output_delivered_total",
            "counter",
            "Events confirmed by the downstream.",
            |o| o.delivered,
        ),
        (
            "vigil_output_dropped_total",
            "counter",
            "Events given up on.",
            |o| o.dropped,
        ),
        (
            "vigil_output_skipped_total",
            "counter",
            "Events with nothing for the output to send (no metric to graph, a state not paged, a page already sent).",
            |o| o.skipped,
        ),
        (
            "vigil_output_retries_total",
            "counter",
            "Delivery attempts repeated after a failure.",
            |o| o.retries,
        ),
        (
            "vigil_output_queued",
            "gauge",
            "Events waiting in the output's queue.",
            |o| o.queued,
        ),
        (
            "vigil_output_in_flight",
            "gauge",
            "Events taken from the queue, not yet settled.",
            |o| o.in_flight,
        ),
    ];
    for (name, kind, help, field) in outputs {
        out.family(name, kind, help);
        for o in &s.outputs {
            out.value(&format!("{{output=\"{}\"}}", escape(&o.name)), field(o));
        }
    }

    let name = "vigil_streams_latency_seconds";
    out.family(
        name,
        "histogram",
        "Time the rules took per batch of events.",
    );
    let mut cumulative = 0;
    for (i, count) in s.latency.counts.iter().enumerate() {
        cumulative += count;
        let le = LATENCY_BUCKETS_NANOS
            .get(i)
            .map_or("+Inf".to_owned(), |&n| (n as f64 / 1e9).to_string());
        out.line(&format!("{name}_bucket{{le=\"{le}\"}}"), cumulative);
    }
    out.line(&format!("{name}_sum"), s.latency.sum_nanos as f64 / 1e9);
    out.line(&format!("{name}_count"), cumulative);

    for &(field, value) in &s.rules {
        let help = RuleStats::help(field);
        out.single(
            &format!("vigil_rules_{field}_total"),
            "counter",
            &help,
            value,
        );
    }
    let uptime = "Seconds since vigil started.";
    out.single(
        "vigil_uptime_seconds",
        "gauge",
        uptime,
        s.uptime.as_secs_f64(),
    );
    out.text
}

/// Label values may hold any text; these three must be escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

#[derive(Default)]
struct Exposition {
    text: String,
    /// The family samples from [`Exposition::value`] belong to.
    family: String,
}

impl Exposition {
    /// Starts a metric family; `help` may be empty.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        if !help.is_empty() {
            let _ = writeln!(self.text, "# HELP {name} {help}");
        }
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        name.clone_into(&mut self.family);
    }

    /// A sample of the family just started, under its own name.
    fn value(&mut self, labels: &str, value: impl Display) {
        let _ = writeln!(self.text, "{}{labels} {value}", self.family);
    }

    fn line(&mut self, series: &str, value: impl Display) {
        let _ = writeln!(self.text, "{series} {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl Display) {
        self.family(name, kind, help);
        self.line(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selfmetrics::{Histogram, OutputSample};
    use std::time::Duration;

    #[test]
    fn renders_counters_gauges_labels_and_histogram() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(3));
        h.observe(Duration::from_secs(9));
        let sample = Sample {
            counters: vec![
                ("tcp_events", 7),
                ("tcp_connections_open", 2),
                ("message_bytes_held", 3072),
            ],
            outputs: vec![OutputSample {
                name: "pa\"ger".into(),
                dropped: 4,
                skipped: 6,
                ..OutputSample::default()
            }],
            latency: h.snapshot(),
            rules: vec![("window_overflow", 5)],
            expired_came_back: 8,
            stalls: 0,
            stalled_seconds: 0.0,
            ..Sample::default()
        };
        let text = render(&sample);
        for line in [
            "# HELP vigil_tcp_events_total Events received over TCP.\n# TYPE vigil_tcp_events_total counter\nvigil_tcp_events_total 7\n",
            "# TYPE vigil_tcp_connections_open gauge\nvigil_tcp_connections_open 2\n",
            "# TYPE vigil_message_bytes_held gauge\nvigil_message_bytes_held 3072\n",
            "vigil_output_dropped_total{output=\"pa\\\"ger\"} 4\n",
            "vigil_output_skipped_total{output=\"pa\\\"ger\"} 6\n",
            "vigil_streams_latency_seconds_bucket{le=\"0.000005\"} 1\n",
            "vigil_streams_latency_seconds_bucket{le=\"5\"} 1\n",
            "vigil_streams_latency_seconds_bucket{le=\"+Inf\"} 2\n",
            "vigil_streams_latency_seconds_count 2\n",
            "# TYPE vigil_rules_window_overflow_total counter\nvigil_rules_window_overflow_total 5\n",
            "# TYPE vigil_index_expired_came_back_total counter\nvigil_index_expired_came_back_total 8\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        // Outside cluster mode, as the self-metric events.
        assert!(!text.contains("vigil_cluster_"), "{text}");
    }
}
