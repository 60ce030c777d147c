//! Interop with the real riemann-c-client CLI (`riemann-client`, Debian
//! package riemann-c-client 1.10.x): send over TCP and UDP, query over TCP
//! with `-j` (JSON output), assert on every field.

mod common;

use common::*;
use serde_json::Value;

const PEER: &str = "riemann-client";

/// `riemann-client send <transport> -h HOST -S SERVICE -s STATE <metric> -t tagA -t tagB
///  -a env=prod -L TTL -D DESC ADDR PORT`; asserts success.
#[allow(clippy::too_many_arguments)]
fn c_send(
    transport: &str,
    ip: &str,
    port: &str,
    host: &str,
    service: &str,
    state: &str,
    metric: &[&str],
    ttl: &str,
    desc: &str,
) {
    let mut args: Vec<&str> = vec!["send", transport, "-h", host, "-S", service, "-s", state];
    args.extend_from_slice(metric);
    args.extend_from_slice(&[
        "-t", "tagA", "-t", "tagB", "-a", "env=prod", "-L", ttl, "-D", desc, ip, port,
    ]);
    let out = run_cmd(PEER, &args, CMD_TIMEOUT);
    expect_success(&format!("{PEER} {args:?}"), &out);
}

/// Assert everything riemann-c-client sent came back.
fn assert_c_event(
    ev: &Value,
    host: &str,
    service: &str,
    state: &str,
    desc: &str,
    metric: f64,
    ttl: f64,
) {
    assert_eq!(str_field(ev, "host"), Some(host), "host in {ev}");
    assert_eq!(str_field(ev, "service"), Some(service), "service in {ev}");
    assert_eq!(str_field(ev, "state"), Some(state), "state in {ev}");
    assert_eq!(
        str_field(ev, "description"),
        Some(desc),
        "description in {ev}"
    );
    assert_metric(ev, metric);
    let t = tags(ev);
    assert!(t.iter().any(|x| x == "tagA"), "tagA missing in {ev}");
    assert!(t.iter().any(|x| x == "tagB"), "tagB missing in {ev}");
    assert_eq!(num_field(ev, "ttl"), Some(ttl), "ttl in {ev}");
    assert_eq!(attr(ev, "env"), Some("prod"), "attribute env in {ev}");
    // riemann-c-client always adds x-client=riemann-c-client.
    assert_eq!(
        attr(ev, "x-client"),
        Some("riemann-c-client"),
        "attribute x-client in {ev}"
    );
    // The CLI sends no time: the server must stamp the arrival time.
    assert_time_is_recent(ev);
}

#[test]
fn c_client_tcp_every_field_and_metric_kind() {
    require_peer(PEER);
    let v = Vigil::start(&[]);
    let (ip, port) = (v.host_str(), v.port_str());

    // An earlier version of one event, overwritten below: the index keeps the latest.
    c_send(
        "-T",
        &ip,
        &port,
        "web1",
        "c tcp double",
        "critical",
        &["-d", "1.5"],
        "60",
        "old",
    );

    let cases: [(&str, [&str; 2], f64, &str); 4] = [
        ("c tcp double", ["-d", "3.25"], 3.25, "ok"),
        ("c tcp float", ["-f", "1.25"], 1.25, "warning"),
        ("c tcp int", ["-i", "42"], 42.0, "ok"),
        ("c tcp negative int", ["-i", "-7"], -7.0, "critical"),
    ];
    for (service, metric, _, state) in &cases {
        c_send(
            "-T",
            &ip,
            &port,
            "web1",
            service,
            state,
            metric,
            "60",
            &format!("desc of {service}"),
        );
    }

    for (service, _, want, state) in &cases {
        let events = c_query(&v, &format!("service = \"{service}\""));
        assert_eq!(events.len(), 1, "query for {service:?} returned {events:?}");
        assert_c_event(
            &events[0],
            "web1",
            service,
            state,
            &format!("desc of {service}"),
            *want,
            60.0,
        );
    }

    // A compound query sees all four, and nothing else.
    let events = c_query(&v, "host = \"web1\" and service =~ \"c tcp %\"");
    assert_eq!(events.len(), 4, "compound query returned {events:?}");
    for (service, _, want, _) in &cases {
        assert_metric(by_service(&events, service), *want);
    }
    // Nothing matches another host.
    assert!(c_query(&v, "host = \"nope\"").is_empty());
}

#[test]
fn c_client_udp_send_tcp_query() {
    require_peer(PEER);
    let v = Vigil::start(&[]);
    let (ip, udp_port) = (v.udp.ip().to_string(), v.udp_port_str());

    let cases: [(&str, [&str; 2], f64); 3] = [
        ("c udp double", ["-d", "0.125"], 0.125),
        ("c udp float", ["-f", "2.5"], 2.5),
        ("c udp int", ["-i", "9000"], 9000.0),
    ];
    for (service, metric, _) in &cases {
        c_send(
            "-U", &ip, &udp_port, "web2", service, "ok", metric, "30", "over udp",
        );
    }
    for (service, _, want) in &cases {
        let q = format!("service = \"{service}\"");
        let events = c_query_until_some(&v, &q, VISIBLE_TIMEOUT);
        assert_eq!(events.len(), 1, "query for {service:?} returned {events:?}");
        assert_c_event(&events[0], "web2", service, "ok", "over udp", *want, 30.0);
    }
}

/// riemann-client -j prints a NaN metric as a bare `NaN` (seen with
/// collectd's first derive rates); the harness's parser turns it into null.
#[test]
fn harness_parses_c_client_nan_output() {
    let text = r#"[{"service":"cpu-1\/cpu-nice\/value","metric_d":NaN,"metric_f":-Infinity,"description":"NaN stays","ok":true,"n":null}]"#;
    let events = parse_event_array(text).expect("parse");
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert!(e["metric_d"].is_null() && e["metric_f"].is_null(), "{e}");
    assert_eq!(e["description"], "NaN stays");
    assert_eq!(e["service"], "cpu-1/cpu-nice/value");
    assert_eq!(e["ok"], true);
    assert!(metric_values(e).is_empty());
}
