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

/// A rule file declaring webhooks `outputs` (never sent to), indexing
/// everything, and every expiry again under the host `expired`, for a test
/// to see.
fn rules_with(outputs: &[&str]) -> String {
    let declare = |name: &&str| format!("output {name} = webhook(url: \"http://127.0.0.1:9/\")\n");
    let declared: String = outputs.iter().map(declare).collect();
    format!(
        "{declared}streams {{\n  index\n  \
         expired {{ with(host: \"expired\", state: \"seen\", ttl: 3600) {{ index }} }}\n  \
         where service = \"never\" {{ {} }}\n}}\n",
        outputs.join(" ")
    )
}

/// The self-metric events of `host` (`--node-name`) every second, with `rules`.
fn start_with(rules: &std::path::Path, more: &[&str]) -> Vigil {
    let rules = rules.to_str().unwrap();
    let args = [
        "--rules",
        rules,
        "--self-metrics-interval",
        "1s",
        "--node-name",
        "self",
    ];
    Vigil::start(&[&args[..], more].concat())
}

/// The services of the index's entries of `host`, sorted.
async fn services_of(client: &mut Client, host: &str) -> Vec<String> {
    let found = client.query(&format!(r#"host = "{host}""#)).await.unwrap();
    let mut services: Vec<_> = found.iter().map(|e| e.service_str().to_owned()).collect();
    services.sort();
    services
}

/// How many of `services` are series of `output`.
fn of(output: &str, services: &[String]) -> usize {
    let prefix = format!("vigil output {output} ");
    services.iter().filter(|s| s.starts_with(&prefix)).count()
}

/// Polls until `output`'s series on the host `self` number `n`.
async fn until_series(client: &mut Client, output: &str, n: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let indexed = services_of(client, "self").await;
        if of(output, &indexed) == n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not {n} series of {output}: {indexed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Once `removed`'s series have left the index, a canary sent then with
/// their TTL expires: had one of them expired, or come back and expired,
/// its notice would be indexed before the canary's. `kept`'s stay.
async fn assert_gone_without_expiring(client: &mut Client, removed: &str, kept: &str) {
    until_series(client, removed, 0).await;
    let canary = Event {
        host: Some("canary".into()),
        service: Some("c".into()),
        time: SystemClock.now(),
        ttl: Some(2.0),
        ..Event::default()
    };
    client.send(&[canary]).await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while !services_of(client, "expired")
        .await
        .contains(&"c".to_owned())
    {
        assert!(std::time::Instant::now() < deadline, "the canary expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expired = services_of(client, "expired").await;
    assert_eq!(of(removed, &expired), 0, "expired: {expired:?}");
    let indexed = services_of(client, "self").await;
    assert_eq!(of(removed, &indexed), 0, "{indexed:?}");
    assert_eq!(of(kept, &indexed), 7, "{indexed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_removed_by_a_reload_takes_its_series_out_of_the_index_without_expiring() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.vigil");
    std::fs::write(&rules, rules_with(&["extra", "kept"])).unwrap();
    let v = start_with(&rules, &[]);
    let mut client = Client::connect(v.tcp).await.unwrap();
    until_series(&mut client, "extra", 7).await;

    std::fs::write(&rules, rules_with(&["kept"])).unwrap();
    run_ok("kill", &["-HUP", &v.pid().to_string()], CMD_TIMEOUT);
    assert_gone_without_expiring(&mut client, "extra", "kept").await;
    let removed = v.log_line("Removed the series of vigil's own metrics");
    assert!(
        removed.contains(r#""series":7,"outputs":"extra""#),
        "{removed}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_removed_while_vigil_was_down_does_not_come_back_to_expire() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.vigil");
    let data = dir.path().join("data");
    let data = ["--data-dir", data.to_str().unwrap()];
    std::fs::write(&rules, rules_with(&["extra", "kept"])).unwrap();
    let mut v = start_with(&rules, &data);
    let mut client = Client::connect(v.tcp).await.unwrap();
    until_series(&mut client, "extra", 7).await;
    v.terminate();

    std::fs::write(&rules, rules_with(&["kept"])).unwrap();
    let v = start_with(&rules, &data);
    let mut client = Client::connect(v.tcp).await.unwrap();
    assert_gone_without_expiring(&mut client, "extra", "kept").await;
    let removed = v.log_line("Removed the series of vigil's own metrics");
    assert!(
        removed.contains(r#""series":7,"outputs":"extra""#),
        "{removed}"
    );
}
