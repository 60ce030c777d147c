//! Interop with the real collectd (Debian collectd-core 5.12, plugin
//! write_graphite) at vigil's `--graphite` port: one node over TCP, one over
//! UDP, both to the same address. Their points are indexed under collectd's
//! paths (`tcp.testhost.cpu-0.cpu-idle`, `udp.testhost.load.load.shortterm`,
//! …) with collectd's metric and time and no host, as Riemann's
//! graphite-server indexes them; the `nan` collectd sends for a rate it does
//! not know yet is dropped, and no line of collectd's is refused.
//!
//! The config template is `tests/fixtures/collectd_graphite.conf.in`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use vigil::client::Client;
use vigil::event::Event;

const TEMPLATE: &str = include_str!("fixtures/collectd_graphite.conf.in");
const WRITE_GRAPHITE: &str = "/usr/lib/collectd/write_graphite.so";
/// How long collectd runs (seconds, for `timeout -k 2 N`).
const COLLECTD_SECS: &str = "6";

async fn query(v: &Vigil, query: &str) -> Vec<Event> {
    let mut client = Client::connect(v.tcp).await.expect("connect");
    client.query(query).await.expect("query")
}

#[tokio::test(flavor = "multi_thread")]
async fn collectd_write_graphite_over_tcp_and_udp() {
    assert!(
        Path::new(WRITE_GRAPHITE).is_file(),
        "{WRITE_GRAPHITE} not found: run scripts/test, which installs the interop peers"
    );

    let v = Vigil::start(&["--graphite", "127.0.0.1:0"]);
    let graphite = v.graphite.expect("the listening line names --graphite");
    let mut collectd = Collectd::start(TEMPLATE, graphite.port(), COLLECTD_SECS);

    // Each node's cpu, load and memory series, under collectd's own paths.
    let wanted = [
        "tcp.testhost.cpu-0.cpu-idle",
        "tcp.testhost.load.load.shortterm",
        "tcp.testhost.memory.memory-used",
        "udp.testhost.cpu-0.cpu-idle",
        "udp.testhost.load.load.shortterm",
        "udp.testhost.memory.memory-used",
    ];
    let mut found = Vec::new();
    for _ in 0..150 {
        found = query(
            &v,
            r#"service =~ "tcp.testhost.%" or service =~ "udp.testhost.%""#,
        )
        .await;
        let has = |path: &&str| found.iter().any(|e| e.service.as_deref() == Some(path));
        if wanted.iter().all(has) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let services: Vec<_> = found.iter().filter_map(|e| e.service.as_deref()).collect();
    for path in wanted {
        assert!(
            services.contains(&path),
            "no {path} among {services:?}\ncollectd log:\n{}",
            collectd.log()
        );
    }
    let now = now_secs();
    for e in &found {
        assert_eq!(e.host, None, "Graphite sets no host: {e:?}");
        let metric = e.metric.expect("a metric").as_f64();
        assert!(metric.is_finite() && metric >= 0.0, "{e:?}");
        let time = e.time as f64 / 1e6;
        assert!((time - now).abs() < 60.0, "collectd's own time: {e:?}");
    }
    let shortterm = found
        .iter()
        .find(|e| e.service.as_deref() == Some("tcp.testhost.load.load.shortterm"))
        .unwrap();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap();
    let now_load: f64 = loadavg.split(' ').next().unwrap().parse().unwrap();
    let load = shortterm.metric.unwrap().as_f64();
    assert!(
        (load - now_load).abs() < 5.0,
        "load {load} is this machine's ({now_load})"
    );

    let _ = collectd.process.wait();
    let http = v.http.unwrap();
    assert_eq!(
        metric(http, "vigil_graphite_lines_invalid_total").await,
        0,
        "collectd's lines are all well-formed\ncollectd log:\n{}",
        collectd.log()
    );
    assert!(metric(http, "vigil_graphite_events_total").await >= found.len() as u64);
    // A derive's first rate is not known yet: collectd sends `nan`, dropped.
    assert!(metric(http, "vigil_graphite_lines_nan_total").await > 0);
    assert_eq!(metric(http, "vigil_graphite_connections_total").await, 1);
}
