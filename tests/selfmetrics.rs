//! Self-metric events end to end: the real binary emits its own metrics
//! through the rules into the index, where the Riemann TCP protocol finds them.

mod common;

use std::time::Duration;

use common::*;
use vigil::client::Client;
use vigil::clock::{Clock, SystemClock};
use vigil::event::{Event, Metric};

const WAIT: Duration = Duration::from_secs(15);

/// The one self-metric event for `service` once `accept` holds for it.
async fn self_metric(v: &Vigil, service: &str, accept: impl Fn(f64) -> bool) -> Event {
    let mut client = Client::connect(v.tcp).await.unwrap();
    let query = format!(r#"service = "{service}""#);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let found = client.query(&query).await.unwrap();
        if let [event] = &found[..]
            && event.metric.is_some_and(|m| accept(m.as_f64()))
        {
            return event.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{service}: no acceptable value; last {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn self_metrics_reach_the_index_with_plausible_values() {
    let v = Vigil::start(&["--self-metrics-interval", "1s", "--node-name", "node-7"]);
    let events: Vec<_> = (0..5)
        .map(|i| Event {
            host: Some("app".into()),
            service: Some(format!("s{i}")),
            time: SystemClock.now(),
            metric: Some(Metric::Int(i)),
            ..Event::default()
        })
        .collect();
    Client::connect(v.tcp)
        .await
        .unwrap()
        .send(&events)
        .await
        .unwrap();

    // 5 sent plus the self-metric events themselves.
    let size = self_metric(&v, "vigil index size", |m| m >= 5.0).await;
    assert_eq!(size.host_str(), "node-7");
    assert_eq!(size.tags, vec!["vigil".to_owned()]);
    assert_eq!(size.ttl, Some(2.0), "twice the interval");
    assert_eq!(size.state.as_deref(), Some("ok"));
    assert!((SystemClock.now() - size.time).abs() < 10_000_000, "recent");

    // All five arrived within one interval of about a second.
    self_metric(&v, "vigil tcp events/s", |m| m > 0.0 && m <= 6.0).await;
    self_metric(&v, "vigil udp events/s", |m| m == 0.0).await;
    self_metric(&v, "vigil expired/s", |m| m == 0.0).await;
    self_metric(&v, "vigil subscribers", |m| m == 0.0).await;
    self_metric(&v, "vigil streams latency p99", |m| {
        (0.0..1000.0).contains(&m)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_report_their_counters_as_events() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("pager.vigil");
    // Nothing listens on port 1: the forward output never delivers.
    let source = "output pager = forward(host: \"127.0.0.1\", port: 1)\n\
                  streams {\n  index\n  where host = \"app\" {\n    pager\n  }\n}\n";
    std::fs::write(&rules, source).unwrap();
    let v = Vigil::start(&[
        "--rules",
        rules.to_str().unwrap(),
        "--self-metrics-interval",
        "1s",
    ]);
    let event = Event {
        host: Some("app".into()),
        service: Some("x".into()),
        time: SystemClock.now(),
        ..Event::default()
    };
    Client::connect(v.tcp)
        .await
        .unwrap()
        .send(&[event])
        .await
        .unwrap();
    let accepted = self_metric(&v, "vigil output pager accepted", |m| m == 1.0).await;
    assert_eq!(accepted.host_str(), vigil::selfmetrics::hostname());
    self_metric(&v, "vigil output pager delivered", |m| m == 0.0).await;
    for counter in ["dropped", "skipped", "queued", "in flight"] {
        self_metric(&v, &format!("vigil output pager {counter}"), |m| m <= 1.0).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_disables_self_metrics() {
    // The harness passes `--self-metrics-interval 0` unless told otherwise.
    let v = Vigil::start(&[]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut client = Client::connect(v.tcp).await.unwrap();
    let found = client.query(r#"tagged "vigil""#).await.unwrap();
    assert!(found.is_empty(), "{found:?}");
}
