//! The `forward` output end to end: two real vigil processes, the first
//! forwarding everything to the second over the Riemann TCP protocol, fed and
//! queried with the real riemann-c-client CLI.

mod common;

use common::*;
use serde_json::Value;
use tempfile::TempDir;

const PEER: &str = "riemann-client";

/// A vigil that indexes everything and forwards it to 127.0.0.1:`port`.
fn forwarding_to(port: u16) -> (Vigil, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("forward.vigil");
    let source = format!(
        "output next = forward(host: \"127.0.0.1\", port: {port})\nstreams {{\n  index\n  next\n}}\n"
    );
    std::fs::write(&rules, source).unwrap();
    let upstream = Vigil::start(&["--rules", rules.to_str().unwrap()]);
    (upstream, dir)
}

/// `riemann-client send -T` with every field the CLI can set.
fn c_send(to: &Vigil, service: &str, metric: [&str; 2]) {
    let (ip, port) = (to.host_str(), to.port_str());
    let mut args = vec!["send", "-T", "-h", "web1", "-S", service, "-s", "warning"];
    args.extend_from_slice(&metric);
    args.extend_from_slice(&["-t", "tagA", "-t", "tagB", "-a", "env=prod", "-L", "60"]);
    args.extend_from_slice(&["-D", "via forward", &ip, &port]);
    let out = run_cmd(PEER, &args, CMD_TIMEOUT);
    expect_success(&format!("{PEER} {args:?}"), &out);
}

fn only(events: Vec<Value>, query: &str) -> Value {
    assert_eq!(events.len(), 1, "{query} returned {events:?}");
    events.into_iter().next().unwrap()
}

#[test]
fn forwarded_events_arrive_downstream_with_every_field() {
    require_peer(PEER);
    let downstream = Vigil::start(&[]);
    let (upstream, _dir) = forwarding_to(downstream.port());

    let cases: [(&str, [&str; 2], f64); 2] = [
        ("fwd double", ["-d", "3.25"], 3.25),
        ("fwd int", ["-i", "42"], 42.0),
    ];
    for (service, metric, _) in &cases {
        c_send(&upstream, service, *metric);
    }

    for (service, _, metric) in &cases {
        let query = format!("service = \"{service}\"");
        let there = only(
            c_query_until_some(&downstream, &query, VISIBLE_TIMEOUT),
            &query,
        );
        let here = only(c_query(&upstream, &query), &query);
        assert_eq!(str_field(&there, "host"), Some("web1"), "host in {there}");
        assert_eq!(str_field(&there, "service"), Some(*service), "{there}");
        assert_eq!(str_field(&there, "state"), Some("warning"), "{there}");
        assert_eq!(str_field(&there, "description"), Some("via forward"));
        assert_metric(&there, *metric);
        assert_eq!(tags(&there), ["tagA", "tagB"], "tags in {there}");
        assert_eq!(attr(&there, "env"), Some("prod"), "attribute in {there}");
        assert_eq!(attr(&there, "x-client"), Some("riemann-c-client"));
        assert_eq!(num_field(&there, "ttl"), Some(60.0), "ttl in {there}");
        assert_time_is_recent(&there);
        // Identical to the upstream's copy: the arrival time it stamped (to the
        // microsecond) and the metric's kind survive forwarding.
        assert_eq!(there, here, "downstream vs upstream");
    }
}

/// How many of the upstream's log lines say the downstream is unreachable.
fn outage_lines(v: &Vigil) -> usize {
    v.logs().matches("Downstream unreachable").count()
}

#[test]
fn an_unreachable_downstream_is_logged_once_and_never_blocks_ingest() {
    require_peer(PEER);
    // Start a downstream only to learn a free port, then stop it.
    let port = {
        let gone = Vigil::start(&[]);
        gone.port()
    };
    let (mut upstream, _dir) = forwarding_to(port);

    for i in 0..5 {
        c_send(&upstream, &format!("while down {i}"), ["-i", "1"]);
    }
    wait_until(VISIBLE_TIMEOUT, || {
        (outage_lines(&upstream) > 0).then_some(())
    })
    .unwrap_or_else(|| panic!("no outage logged:\n{}", upstream.logs()));
    // Retries continue (100 ms doubling) while more events arrive: still one line.
    for i in 5..10 {
        c_send(&upstream, &format!("while down {i}"), ["-i", "1"]);
    }
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(outage_lines(&upstream), 1, "{}", upstream.logs());
    // Ingest and the local index are unaffected.
    upstream.assert_alive();
    assert_eq!(c_query(&upstream, "service =~ \"while down %\"").len(), 10);
}
