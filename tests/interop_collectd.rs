//! Interop with the real collectd (Debian collectd-core 5.12, plugin
//! write_riemann over TCP, Batch true): vigil ingests its stream, the
//! cpu/load/memory series are queryable, and the events collectd corrupts
//! (empty host/service, garbage `time`: collectd issue 4050) do no harm.
//!
//! The config template is `tests/fixtures/collectd.conf.in`, a copy of
//! `../shared/interop/collectd/collectd.conf.in` so the repo is self-contained.

mod common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const TEMPLATE: &str = include_str!("fixtures/collectd.conf.in");
const WRITE_RIEMANN: &str = "/usr/lib/collectd/write_riemann.so";
/// How long collectd runs (seconds, for `timeout -k 2 N`).
const COLLECTD_SECS: &str = "6";

/// Some testhost event among `events` satisfying `pred`, with a metric.
fn testhost_with_metric(events: &[Value], pred: impl Fn(&Value) -> bool) -> Option<Value> {
    events
        .iter()
        .find(|e| {
            str_field(e, "host") == Some("testhost") && !metric_values(e).is_empty() && pred(e)
        })
        .cloned()
}

#[test]
fn collectd_write_riemann_stream() {
    require_peer("riemann-client");
    assert!(
        Path::new(WRITE_RIEMANN).is_file(),
        "{WRITE_RIEMANN} not found: run scripts/test, which installs the interop peers"
    );

    let mut v = Vigil::start(&[]);
    // Runs for a few seconds, once `collectd -t` accepts the rendered config.
    let mut collectd = Collectd::start(TEMPLATE, v.port(), COLLECTD_SECS);

    // Poll while collectd streams (its events have ttl = Interval 1 s × TTLFactor 2).
    let mut last = Vec::new();
    let cpu = wait_until(Duration::from_secs(15), || {
        last = c_query(&v, "service =~ \"cpu%\"");
        testhost_with_metric(&last, |e| {
            tags(e).iter().any(|t| t == "collectd") && attr(e, "plugin") == Some("cpu") && attr(e, "env") == Some("test")
        })
    })
    .unwrap_or_else(|| {
        panic!("no cpu event from collectd for host testhost; last query result: {last:?}\ncollectd log:\n{}", collectd.log())
    });
    let service = str_field(&cpu, "service").unwrap();
    assert!(service.starts_with("cpu"), "{cpu}");
    assert_eq!(
        num_field(&cpu, "ttl"),
        Some(2.0),
        "collectd ttl is Interval x TTLFactor = 2: {cpu}"
    );
    assert!(
        attr(&cpu, "type").is_some_and(|t| !t.is_empty()),
        "collectd sets attribute type: {cpu}"
    );
    assert!(
        attr(&cpu, "ds_name").is_some_and(|t| !t.is_empty()),
        "collectd sets attribute ds_name: {cpu}"
    );
    assert!(
        metric_values(&cpu)
            .iter()
            .all(|m| m.is_finite() && *m >= 0.0),
        "cpu metric: {cpu}"
    );

    // Every event the query returned is a cpu service (the query language holds).
    for e in &last {
        let s = str_field(e, "service").unwrap_or("");
        assert!(s.starts_with("cpu"), "service =~ \"cpu%\" returned {e}");
    }

    // A whole batch arrived, not just one event.
    let testhost = c_query(&v, "host = \"testhost\"");
    assert!(
        testhost.len() >= 10,
        "expected a collectd batch for testhost, got {} events: {testhost:?}",
        testhost.len()
    );

    // Other plugins arrive too.
    for (q, prefix) in [
        ("service =~ \"load/%\"", "load/"),
        ("service =~ \"memory/%\"", "memory/"),
    ] {
        let mut last = Vec::new();
        let e = wait_until(Duration::from_secs(10), || {
            last = c_query(&v, q);
            testhost_with_metric(&last, |e| {
                str_field(e, "service").is_some_and(|s| s.starts_with(prefix))
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "no {prefix} event from collectd; last: {last:?}\ncollectd log:\n{}",
                collectd.log()
            )
        });
        assert!(
            metric_values(&e).iter().all(|m| m.is_finite() && *m >= 0.0),
            "{e}"
        );
    }

    // While collectd is streaming, other clients are still served.
    let port = v.port_str();
    run_ok(
        "riemann-client",
        &[
            "send",
            "-T",
            "-h",
            "other",
            "-S",
            "during collectd",
            "-s",
            "ok",
            "-i",
            "1",
            "-L",
            "60",
            "127.0.0.1",
            &port,
        ],
        CMD_TIMEOUT,
    );
    let during = c_query(&v, "service = \"during collectd\"");
    assert_eq!(during.len(), 1, "{during:?}");
    assert_metric(&during[0], 1.0);

    // Let collectd finish (timeout -k 2 guarantees it ends).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match collectd.process.try_wait().expect("wait collectd") {
            Some(_) => break,
            None if Instant::now() < deadline => thread::sleep(Duration::from_millis(100)),
            None => {
                let _ = collectd.process.kill();
                let _ = collectd.process.wait();
                break;
            }
        }
    }

    // The server survived the whole stream, corrupted events included.
    v.assert_alive();
    let everything = c_query(&v, "true");
    for e in &everything {
        assert!(e.is_object(), "query true returned a non-object: {e}");
    }
    run_ok(
        "riemann-client",
        &[
            "send",
            "-T",
            "-h",
            "after",
            "-S",
            "after collectd",
            "-s",
            "ok",
            "-d",
            "6.5",
            "-t",
            "post",
            "-L",
            "120",
            "-D",
            "still alive",
            "127.0.0.1",
            &port,
        ],
        CMD_TIMEOUT,
    );
    let after = c_query(&v, "service = \"after collectd\"");
    assert_eq!(after.len(), 1, "{after:?}");
    let e = &after[0];
    assert_eq!(str_field(e, "host"), Some("after"));
    assert_eq!(str_field(e, "state"), Some("ok"));
    assert_eq!(str_field(e, "description"), Some("still alive"));
    assert_eq!(tags(e), vec!["post".to_string()]);
    assert_eq!(num_field(e, "ttl"), Some(120.0));
    assert_metric(e, 6.5);
    v.assert_alive();
}
