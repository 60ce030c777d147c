//! Interop with the real Ruby client (Debian ruby-riemann-client 0.2.x,
//! `require "riemann/client"`): send over TCP and UDP, query over TCP with
//! `client[query]`, and assert on the values the Ruby client decodes.

mod common;

use common::*;
use serde_json::Value;

/// Prints the events matching ARGV[1] as a JSON array, decoded by the Ruby
/// client itself (`e.metric` is the client's own metric_d||metric_sint64||metric_f).
const RUBY_PRELUDE: &str = r#"
require "riemann/client"
require "json"
$c = Riemann::Client.new(host: ARGV[0], port: Integer(ARGV[1]), timeout: 5)
def dump(q)
  $c[q].map do |e|
    {
      host: e.host, service: e.service, state: e.state, description: e.description,
      metric: e.metric, metric_sint64: e.metric_sint64, metric_d: e.metric_d, metric_f: e.metric_f,
      tags: (e.tags || []), ttl: e.ttl, time: e.time,
      attributes: (e.attributes || []).map { |a| [a.key, a.value] }.to_h,
    }
  end
end
"#;

const RUBY_SEND_TCP: &str = r#"
$c.tcp << {host: "rb-host", service: "rb int", state: "ok", metric: 42, tags: ["t1", "t2"], ttl: 30, description: "ruby int", env: "prod"}
$c.tcp << {host: "rb-host", service: "rb float", state: "warning", metric: 2.5, tags: ["t1"], ttl: 45, description: "ruby float", env: "staging", team: "ops"}
$c.tcp << {host: "rb-host", service: "rb negative", state: "critical", metric: -3, ttl: 30}
puts JSON.generate({
  int: dump(%q{service = "rb int"}),
  float: dump(%q{service = "rb float"}),
  negative: dump(%q{service = "rb negative"}),
  all: dump(%q{host = "rb-host"}),
})
"#;

const RUBY_SEND_UDP: &str = r#"
$c.udp << {host: "rb-udp", service: "rb udp int", state: "ok", metric: 7, tags: ["u"], ttl: 30, env: "prod"}
$c.udp << {host: "rb-udp", service: "rb udp float", state: "ok", metric: 0.75, tags: ["u"], ttl: 30, env: "prod"}
puts JSON.generate("sent")
"#;

const RUBY_QUERY: &str = r#"
puts JSON.generate(dump(ARGV[2]))
"#;

fn ruby(body: &str, args: &[&str]) -> Value {
    require_peer("ruby");
    let script = format!("{RUBY_PRELUDE}\n{body}");
    let mut argv = vec!["-e", script.as_str(), "--"];
    argv.extend_from_slice(args);
    let out = run_cmd("ruby", &argv, CMD_TIMEOUT);
    let stdout = expect_success("ruby riemann client script", &out);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("ruby printed unparsable JSON ({e}):\n{}", show(&out)))
}

/// The Ruby client is installed and loads (a missing gem is a failure, not a skip).
fn require_ruby_client() {
    require_peer("ruby");
    let out = run_cmd(
        "ruby",
        &["-e", "require 'riemann/client'; puts :ok"],
        CMD_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "ruby cannot load riemann/client: run scripts/test, which installs the interop peers\n{}",
        show(&out)
    );
}

fn one(v: &Value, key: &str) -> Value {
    let arr = v[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is not an array in {v}"));
    assert_eq!(arr.len(), 1, "expected one event for {key}, got {v}");
    arr[0].clone()
}

#[test]
fn ruby_tcp_send_and_query() {
    require_ruby_client();
    let v = Vigil::start(&[]);
    let out = ruby(RUBY_SEND_TCP, &[&v.host_str(), &v.port_str()]);

    let e = one(&out, "int");
    assert_eq!(e["host"], "rb-host");
    assert_eq!(e["service"], "rb int");
    assert_eq!(e["state"], "ok");
    assert_eq!(e["description"], "ruby int");
    assert_metric_value(&e["metric"], 42.0, &e);
    assert_eq!(e["tags"], serde_json::json!(["t1", "t2"]));
    assert_eq!(e["ttl"].as_f64(), Some(30.0), "{e}");
    assert_eq!(e["attributes"]["env"], "prod", "{e}");
    assert_ruby_time(&e);

    let e = one(&out, "float");
    assert_eq!(e["host"], "rb-host");
    assert_eq!(e["service"], "rb float");
    assert_eq!(e["state"], "warning");
    assert_eq!(e["description"], "ruby float");
    assert_metric_value(&e["metric"], 2.5, &e);
    assert_eq!(e["tags"], serde_json::json!(["t1"]));
    assert_eq!(e["ttl"].as_f64(), Some(45.0), "{e}");
    assert_eq!(e["attributes"]["env"], "staging", "{e}");
    assert_eq!(e["attributes"]["team"], "ops", "{e}");
    assert_ruby_time(&e);

    let e = one(&out, "negative");
    assert_eq!(e["state"], "critical");
    assert_metric_value(&e["metric"], -3.0, &e);

    let all = out["all"].as_array().expect("all is an array");
    assert_eq!(all.len(), 3, "host query returned {all:?}");
}

#[test]
fn ruby_udp_send_tcp_query() {
    require_ruby_client();
    let v = Vigil::start(&[]);
    let out = ruby(RUBY_SEND_UDP, &[&v.udp.ip().to_string(), &v.udp_port_str()]);
    assert_eq!(out, "sent");

    for (service, want) in [("rb udp int", 7.0), ("rb udp float", 0.75)] {
        let q = format!("service = \"{service}\"");
        let mut last = Value::Null;
        let e = wait_until(VISIBLE_TIMEOUT, || {
            last = ruby(RUBY_QUERY, &[&v.host_str(), &v.port_str(), &q]);
            last.as_array().and_then(|a| a.first().cloned())
        })
        .unwrap_or_else(|| panic!("{service:?} sent over UDP never became visible; last: {last}"));
        assert_eq!(last.as_array().map(Vec::len), Some(1), "{last}");
        assert_eq!(e["host"], "rb-udp");
        assert_eq!(e["service"], service);
        assert_eq!(e["state"], "ok");
        assert_metric_value(&e["metric"], want, &e);
        assert_eq!(e["tags"], serde_json::json!(["u"]));
        assert_eq!(e["ttl"].as_f64(), Some(30.0), "{e}");
        assert_eq!(e["attributes"]["env"], "prod", "{e}");
    }
}

fn assert_metric_value(m: &Value, want: f64, ev: &Value) {
    let got = m.as_f64().unwrap_or_else(|| panic!("no metric in {ev}"));
    assert!((got - want).abs() < 1e-9, "metric {got} != {want} in {ev}");
    // Every metric field the server returned agrees.
    for k in ["metric_sint64", "metric_d", "metric_f"] {
        if let Some(x) = ev[k].as_f64() {
            assert!((x - want).abs() < 1e-6, "{k} = {x} != {want} in {ev}");
        }
    }
}

/// The Ruby client stamps `time` (seconds) itself; it must come back unchanged-ish (same second).
fn assert_ruby_time(ev: &Value) {
    let t = ev["time"]
        .as_f64()
        .unwrap_or_else(|| panic!("no time in {ev}"));
    assert!(
        (t - now_secs()).abs() < 86_400.0,
        "time {t} not near now in {ev}"
    );
}
