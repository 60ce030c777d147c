//! The HTTP surface end to end against the real binary: WebSocket and SSE
//! subscriptions with real client libraries (tokio-tungstenite, reqwest),
//! plain JSON queries, `POST /events`, the bearer token and `/metrics` parsed
//! by a Prometheus text parser. Slow subscribers and shutdown run in-process,
//! where the subscriber queue can be made tiny.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::{StatusCode, Url};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;

use common::inproc::{read_until_closed, wait_stat};
use common::*;
use vigil::budget::Budget;
use vigil::client::Client;
use vigil::clock::{Clock, SharedClock, SystemClock};
use vigil::event::{Event, Metric};
use vigil::http::{HttpConfig, HttpServer};
use vigil::index::{Index, IndexConfig};
use vigil::limits::Limits;
use vigil::outputs::Kept;
use vigil::rules::engine::Rules;
use vigil::rules::reload::{Outputs, Reloader};
use vigil::rules::{self, DEFAULT_RULES, DEFAULT_RULES_NAME, EnvPolicy};
use vigil::selfmetrics::Telemetry;
use vigil::stats::Stats;

const WAIT: Duration = Duration::from_secs(10);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn event(host: &str, service: &str, ttl: f32, metric: i64) -> Event {
    Event {
        host: Some(host.into()),
        service: Some(service.into()),
        state: Some("ok".into()),
        time: SystemClock.now(),
        metric: Some(Metric::Int(metric)),
        ttl: Some(ttl),
        ..Event::default()
    }
}

async fn send(v: &Vigil, events: &[Event]) {
    let mut client = Client::connect(v.tcp).await.expect("tcp connects");
    client.send(events).await.expect("events acknowledged");
}

fn http_addr(v: &Vigil) -> SocketAddr {
    v.http.expect("the listening line names the http address")
}

fn url(scheme: &str, addr: SocketAddr, path: &str, params: &[(&str, &str)]) -> Url {
    Url::parse_with_params(&format!("{scheme}://{addr}{path}"), params).unwrap()
}

/// The next text frame as JSON; `None` once the server closed (with its frame).
/// `GET /index` with `params`, asking for an SSE stream.
async fn sse_get(addr: SocketAddr, params: &[(&str, &str)]) -> reqwest::Response {
    reqwest::Client::new()
        .get(url("http", addr, "/index", params))
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap()
}

async fn next_json(ws: &mut Ws) -> Result<Value, Option<(u16, String)>> {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time");
        match message {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => {
                return Err(frame.map(|f| (u16::from(f.code), f.reason.to_string())));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(None),
        }
    }
}

fn key(e: &Value) -> (&str, &str, &str) {
    (
        e["host"].as_str().unwrap_or_default(),
        e["service"].as_str().unwrap_or_default(),
        e["state"].as_str().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_sends_the_snapshot_then_live_matches_and_expiry() {
    let v = Vigil::start(&[]);
    send(
        &v,
        &[event("ws", "a", 60.0, 1), event("other", "a", 60.0, 1)],
    )
    .await;

    let query = [("query", r#"host = "ws""#), ("subscribe", "true")];
    let (mut ws, _) =
        tokio_tungstenite::connect_async(url("ws", http_addr(&v), "/index", &query).as_str())
            .await
            .expect("websocket handshake");
    let first = next_json(&mut ws).await.expect("snapshot frame");
    assert_eq!(key(&first), ("ws", "a", "ok"));
    assert_eq!(first["metric"], 1);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));

    send(&v, &[event("other", "b", 1.0, 2), event("ws", "b", 1.0, 2)]).await;
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e: &Value| key(e) == ("ws", "b", "expired"))
    {
        seen.push(next_json(&mut ws).await.expect("live frame"));
    }
    let keys: Vec<_> = seen.iter().map(key).collect();
    assert_eq!(keys[0], ("ws", "b", "ok"), "live event first: {keys:?}");
    assert!(keys.iter().all(|k| k.0 == "ws"), "only matches: {keys:?}");
    ws.close(None).await.unwrap();

    // Without subscribe: the snapshot, then a normal close.
    let (mut ws, _) = tokio_tungstenite::connect_async(
        url(
            "ws",
            http_addr(&v),
            "/index",
            &[("query", r#"host = "ws""#)],
        )
        .as_str(),
    )
    .await
    .unwrap();
    assert_eq!(key(&next_json(&mut ws).await.unwrap()), ("ws", "a", "ok"));
    let closed = next_json(&mut ws).await.unwrap_err();
    assert_eq!(closed.map(|c| c.0), Some(1000));
}

/// Riemann's `/pubsub/index`: live matches only, no snapshot first; a
/// topic name no rule could publish to is refused.
#[tokio::test(flavor = "multi_thread")]
async fn pubsub_index_sends_live_matches_without_a_snapshot() {
    let v = Vigil::start(&[]);
    send(&v, &[event("ps", "before", 60.0, 1)]).await;

    let query = [("query", r#"host = "ps""#)];
    let pubsub = url("ws", http_addr(&v), "/pubsub/index", &query);
    let (mut ws, _) = tokio_tungstenite::connect_async(pubsub.as_str())
        .await
        .expect("websocket handshake");
    // Nothing comes first to say the subscription is in place: the gauge does.
    scrape_until(http_addr(&v), "one subscriber", |s| {
        value(s, "vigil_subscribers", None) == Some(1.0)
    })
    .await;
    send(
        &v,
        &[event("other", "x", 60.0, 2), event("ps", "live", 60.0, 3)],
    )
    .await;
    let first = next_json(&mut ws).await.expect("a live frame");
    assert_eq!(key(&first), ("ps", "live", "ok"), "no snapshot: {first}");
    ws.close(None).await.unwrap();

    let bad = url("http", http_addr(&v), "/pubsub/a%20b", &query);
    let answer = reqwest::get(bad).await.unwrap();
    assert_eq!(answer.status(), StatusCode::BAD_REQUEST);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(
        body["error"],
        "a topic's name is ASCII letters, digits, `_`, `-` and `.`, not ' '"
    );
}

/// `/pubsub/<topic>` gets what the rules `publish` to that topic, from
/// then on: not what they publish to another, nor what the index stores.
#[tokio::test(flavor = "multi_thread")]
async fn pubsub_topic_sends_what_the_rules_publish_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("publish.vigil");
    let source = "streams {\n  index\n  where service = \"disk\" { publish(alerts) }\n  \
                  where service = \"cpu\" { publish(\"other\") }\n}\n";
    std::fs::write(&rules, source).unwrap();
    let v = Vigil::start(&["--rules", rules.to_str().unwrap()]);
    let all = [("query", "true")];
    let open = |topic: &str| {
        let address = url("ws", http_addr(&v), &format!("/pubsub/{topic}"), &all);
        async move {
            let (ws, _) = tokio_tungstenite::connect_async(address.as_str())
                .await
                .expect("websocket handshake");
            ws
        }
    };
    let mut alerts = open("alerts").await;
    let mut other = open("other").await;
    let mut index = open("index").await;
    scrape_until(http_addr(&v), "three subscribers", |s| {
        value(s, "vigil_subscribers", None) == Some(3.0)
    })
    .await;
    send(
        &v,
        &[
            event("h", "cpu", 60.0, 1),
            event("h", "mem", 60.0, 2),
            event("h", "disk", 60.0, 3),
        ],
    )
    .await;
    send(&v, &[event("h", "disk", 60.0, 4)]).await;
    let first = next_json(&mut alerts).await.expect("a published frame");
    assert_eq!(
        (key(&first), &first["metric"]),
        (("h", "disk", "ok"), &json!(3))
    );
    let second = next_json(&mut alerts).await.expect("a published frame");
    assert_eq!(
        (key(&second), &second["metric"]),
        (("h", "disk", "ok"), &json!(4))
    );
    let theirs = next_json(&mut other).await.expect("a published frame");
    assert_eq!(key(&theirs), ("h", "cpu", "ok"));
    let mut services = Vec::new();
    for _ in 0..4 {
        let frame = next_json(&mut index).await.expect("an indexed frame");
        services.push(frame["service"].as_str().unwrap().to_owned());
    }
    assert_eq!(services, ["cpu", "mem", "disk", "disk"]);
    // Anything else for `other` would have come before this: it got the
    // cpu events only (and `alerts` its disk events first: none of the
    // index's).
    send(&v, &[event("h", "cpu", 60.0, 5)]).await;
    let next = next_json(&mut other).await.expect("a published frame");
    assert_eq!(next["metric"], 5);
}

/// Reads `data:` payloads from a streaming response.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn open(url: Url, accept: bool) -> SseReader {
        SseReader::open_with(&reqwest::Client::new(), url, accept).await
    }

    /// [`SseReader::open`] with `client` (say, from another local address).
    async fn open_with(client: &reqwest::Client, url: Url, accept: bool) -> SseReader {
        let mut request = client.get(url);
        if accept {
            request = request.header("Accept", "text/event-stream");
        }
        let response = request.send().await.expect("SSE request");
        assert_eq!(response.status(), StatusCode::OK);
        let kind = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        SseReader {
            response,
            buffer: String::new(),
        }
    }

    async fn next(&mut self) -> Value {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                // Keep-alive comments carry no data.
                if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                    return serde_json::from_str(data).unwrap();
                }
                continue;
            }
            let chunk = tokio::time::timeout(WAIT, self.response.chunk())
                .await
                .expect("an SSE event in time")
                .expect("stream readable")
                .expect("stream still open");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

/// The `sse` address from the `listening` log line.
fn sse_addr(v: &Vigil) -> SocketAddr {
    let logs = v.logs();
    logs.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["message"] == "listening")
        .and_then(|l| l["fields"]["sse"].as_str()?.parse().ok())
        .expect("listening line with an sse address")
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_streams_the_snapshot_then_live_matches_on_both_listeners() {
    let v = Vigil::start(&["--sse", "127.0.0.1:0"]);
    send(
        &v,
        &[event("sse", "a", 60.0, 1), event("other", "a", 60.0, 1)],
    )
    .await;
    let query = [("query", r#"host = "sse""#)];
    let mut main = SseReader::open(url("http", http_addr(&v), "/index", &query), true).await;
    let mut riemann = SseReader::open(url("http", sse_addr(&v), "/index", &query), false).await;
    for stream in [&mut main, &mut riemann] {
        assert_eq!(key(&stream.next().await), ("sse", "a", "ok"));
    }

    send(
        &v,
        &[event("other", "b", 1.0, 2), event("sse", "b", 1.0, 2)],
    )
    .await;
    for stream in [&mut main, &mut riemann] {
        let live = stream.next().await;
        assert_eq!(
            key(&live),
            ("sse", "b", "ok"),
            "non-matching events skipped"
        );
        assert_eq!(live["metric"], 2);
        assert_eq!(key(&stream.next().await), ("sse", "b", "expired"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_get_answers_json_and_a_bad_query_gets_400_with_its_column() {
    let v = Vigil::start(&[]);
    let mut e = event("json", "disk", 60.0, 5);
    e.attributes.push(("env".into(), "prod".into()));
    e.tags.push("t".into());
    send(&v, &[e, event("other", "disk", 60.0, 5)]).await;

    let http = reqwest::Client::new();
    let response = http
        .get(url(
            "http",
            http_addr(&v),
            "/index",
            &[("query", r#"host = "json""#)],
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let events: Vec<Value> = response.json().await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(key(e), ("json", "disk", "ok"));
    assert_eq!(
        (e["env"].as_str(), e["tags"][0].as_str()),
        (Some("prod"), Some("t"))
    );
    assert_eq!(
        (e["ttl"].as_f64(), e["description"].is_null()),
        (Some(60.0), true)
    );

    let response = http
        .get(url(
            "http",
            http_addr(&v),
            "/index",
            &[("query", "service =")],
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["column"], 10, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("column 10"),
        "{body}"
    );

    // Parameters that cannot be read are answered in JSON too.
    for params in [
        &[("query", "true"), ("query", "false")][..],
        &[("query", "true"), ("subscribe", "maybe")],
        &[],
    ] {
        let response = http
            .get(url("http", http_addr(&v), "/index", params))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{params:?}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn posted_events_are_answered_per_line_and_queryable_over_tcp() {
    let v = Vigil::start(&[]);
    let now = SystemClock.now();
    let secs = now as f64 / 1e6;
    let body = [
        format!(
            r#"{{"host":"agent","service":"cpu","metric":0.5,"time":"{}","tags":["x"],"rack":"r1"}}"#,
            vigil::json::iso8601(now)
        ),
        r#"{"host":"agent","service":"load","metric":"high"}"#.to_owned(),
        String::new(),
        format!(r#"{{"host":"agent","service":"mem","metric":3,"time":{secs},"ttl":120}}"#),
        "not json".to_owned(),
        r#"{"host":"agent","service":"disk","state":"warning","tags":"x"}"#.to_owned(),
        r#"{"host":"agent","service":"net"}"#.to_owned(),
    ]
    .join("\n");
    let response = reqwest::Client::new()
        .post(url("http", http_addr(&v), "/events", &[]))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answers: Vec<Value> = response
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let errors: Vec<_> = answers.iter().map(|a| a["error"].as_str()).collect();
    assert_eq!(
        answers.len(),
        6,
        "one answer per non-blank line: {answers:?}"
    );
    assert_eq!(answers[0], serde_json::json!({}));
    assert_eq!(errors[1], Some("metric must be a number"));
    assert!(
        errors[3].unwrap().starts_with("invalid JSON"),
        "{answers:?}"
    );
    assert_eq!(errors[4], Some("tags must be an array of strings"));
    assert_eq!([errors[0], errors[2], errors[5]], [None, None, None]);

    let mut client = Client::connect(v.tcp).await.unwrap();
    let mut indexed = client.query(r#"host = "agent""#).await.unwrap();
    indexed.sort_by(|a, b| a.service.cmp(&b.service));
    let services: Vec<_> = indexed.iter().map(|e| e.service_str()).collect();
    assert_eq!(services, ["cpu", "mem", "net"]);
    let (cpu, mem, net) = (&indexed[0], &indexed[1], &indexed[2]);
    assert_eq!(cpu.metric, Some(Metric::Float(0.5)));
    assert_eq!(cpu.time / 1000, now / 1000, "ISO time to the millisecond");
    assert_eq!(
        (cpu.tags.clone(), cpu.attribute("rack")),
        (vec!["x".to_owned()], Some("r1"))
    );
    assert_eq!((mem.metric, mem.ttl), (Some(Metric::Int(3)), Some(120.0)));
    assert!((mem.time - now).abs() < 2, "numeric seconds");
    assert!(net.time >= now, "arrival time when none was given");

    // PUT is the same endpoint.
    let response = reqwest::Client::new()
        .put(url("http", http_addr(&v), "/events", &[]))
        .body(r#"{"host":"agent","service":"put"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "{}\n");
    assert_eq!(client.query(r#"service = "put""#).await.unwrap().len(), 1);

    // A body some Windows tools write, starting with a byte-order mark.
    let (status, answers) = post_events(
        http_addr(&v),
        "\u{feff}{\"host\":\"agent\",\"service\":\"bom\"}".to_owned(),
    )
    .await;
    assert_eq!(
        (status, answers),
        (StatusCode::OK, vec![serde_json::json!({})])
    );
    assert_eq!(client.query(r#"service = "bom""#).await.unwrap().len(), 1);
}

/// The answers of a `POST /events`, one JSON value per line.
async fn post_events(addr: SocketAddr, body: String) -> (StatusCode, Vec<Value>) {
    let response = reqwest::Client::new()
        .post(url("http", addr, "/events", &[]))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (
        status,
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn posted_lines_and_queries_over_a_per_message_limit_are_refused_naming_the_flag() {
    let (http, index, stats) = in_process_with(HttpConfig {
        per_message: Limits {
            max_events: 3,
            max_tags: 1,
            max_attributes: 1,
            max_string: 8,
        },
        ..HttpConfig::default()
    })
    .await;
    let addr = http.addr.unwrap();
    let lines = [
        r#"{"host":"8 bytes!","service":"s","tags":["t"],"env":"prod"}"#,
        r#"{"host":"a-long-host","service":"s"}"#,
        r#"{"host":"h","service":"two tags","tags":["a","b"]}"#,
        "",
    ];
    let (status, answers) = post_events(addr, lines.join("\n")).await;
    assert_eq!(status, StatusCode::OK);
    let errors: Vec<_> = answers.iter().map(|a| a["error"].as_str()).collect();
    assert_eq!(
        errors,
        [
            None,
            Some("host of 11 bytes exceeds --max-string 8"),
            Some("2 tags exceeds --max-tags 1"),
        ]
    );
    let (_, answers) = post_events(addr, r#"{"host":"h","a":"1","b":"2"}"#.to_owned()).await;
    assert_eq!(
        answers[0]["error"],
        "2 attributes exceeds --max-attributes 1"
    );
    let (status, answers) =
        post_events(addr, r#"{"host":"h"}"#.repeat(4).replace("}{", "}\n{")).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        answers[0]["error"],
        "4 events exceeds --max-events-per-msg 3; split the request"
    );
    assert_eq!(index.len(), 1, "only the line within the limits");
    assert_eq!(Stats::get(&stats.msgs_over_max_string), 1);
    assert_eq!(Stats::get(&stats.msgs_over_max_tags), 1);
    assert_eq!(Stats::get(&stats.msgs_over_max_attributes), 1);
    assert_eq!(Stats::get(&stats.msgs_over_max_events), 1);

    let query = [("query", r#"host = "8 bytes!""#)];
    let response = reqwest::get(url("http", addr, "/index", &query))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "query of 17 bytes exceeds --max-string 8");
    assert_eq!(Stats::get(&stats.msgs_over_max_string), 2);
    let all = reqwest::get(url("http", addr, "/index", &[("query", "true")]))
        .await
        .unwrap();
    assert_eq!(all.json::<Vec<Value>>().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_line_of_millions_of_tags_or_attributes_is_refused_for_about_its_size() {
    let v = Vigil::start(&[]);
    const MIB: usize = 1024 * 1024;
    // 8 MiB each: ~2.8 million empty tags; ~700 000 attributes.
    let tags = vec![r#""""#; 8 * MIB / 3].join(",");
    let attributes: Vec<String> = (0..8 * MIB / 12)
        .map(|i| format!(r#""{i:06x}":1"#))
        .collect();
    let before = peak_of(v.pid());
    let (_, answers) = post_events(http_addr(&v), format!(r#"{{"tags":[{tags}]}}"#)).await;
    assert_eq!(
        answers[0]["error"],
        format!("{} tags exceeds --max-tags 10000", 8 * MIB / 3)
    );
    let line = format!("{{{}}}", attributes.join(","));
    let (_, answers) = post_events(http_addr(&v), line).await;
    let too_many = format!("{} attributes exceeds --max-attributes 10000", 8 * MIB / 12);
    assert_eq!(answers[0]["error"], too_many);
    // A `tags` of the wrong type first does not get the rest parsed uncounted.
    let line = format!(r#"{{"tags":1,{}}}"#, attributes.join(","));
    let (_, answers) = post_events(http_addr(&v), line).await;
    assert_eq!(answers[0]["error"], too_many);
    // Nor does a line that is no object, or an array where none belongs.
    let (_, answers) = post_events(http_addr(&v), format!("[{tags}]")).await;
    assert_eq!(answers[0]["error"], "an event must be a JSON object");
    let line = format!(r#"{{"host":"h","env":[{tags}]}}"#);
    let (_, answers) = post_events(http_addr(&v), line).await;
    assert_eq!(answers[0]["error"], "attribute env must be a string");
    // Null attributes are no attributes, and are not kept either.
    let nulls: Vec<String> = (0..8 * MIB / 15)
        .map(|i| format!(r#""{i:06x}":null"#))
        .collect();
    let line = format!(r#"{{"service":"nulls",{}}}"#, nulls.join(","));
    let (_, answers) = post_events(http_addr(&v), line).await;
    assert_eq!(answers[0], serde_json::json!({}));
    let grew = peak_of(v.pid()).saturating_sub(before);
    // Parsed into JSON values first, these lines took 25 times their size.
    assert!(
        grew < (64 * MIB) as u64,
        "six 8 MiB lines grew vigil's peak by {} MiB",
        grew / MIB as u64
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_connection_is_told_how_many_requests_it_may_open_at_once() {
    let v = Vigil::start(&[]);
    let tcp = tokio::net::TcpStream::connect(http_addr(&v)).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let health = axum::http::Request::get(format!("http://{}/health", http_addr(&v)))
        .body(())
        .unwrap();
    let (answer, _) = h2.send_request(health, true).unwrap();
    let answer = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(
        h2.current_max_send_streams(),
        vigil::bounded::MAX_STREAMS as usize
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_per_message_flags_reach_http() {
    let v = Vigil::start(&["--max-string", "16", "--max-events-per-msg", "2"]);
    let body = [
        r#"{"host":"a-host"}"#,
        r#"{"host":"a-very-long-host-name"}"#,
    ]
    .join("\n");
    let (_, answers) = post_events(http_addr(&v), body).await;
    assert_eq!(answers[0], serde_json::json!({}));
    assert_eq!(
        answers[1]["error"],
        "host of 21 bytes exceeds --max-string 16"
    );
    let (status, _) = post_events(http_addr(&v), "{}\n{}\n{}".to_owned()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bearer_token_guards_everything_but_health() {
    let v = Vigil::start_with_env(&[], &[("VIGIL_HTTP_TOKEN", "s3cret")]);
    let addr = http_addr(&v);
    let http = reqwest::Client::new();
    let status =
        |request: reqwest::RequestBuilder| async move { request.send().await.unwrap().status() };
    let metrics = url("http", addr, "/metrics", &[]);
    assert_eq!(
        status(http.get(metrics.clone())).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(http.get(metrics.clone()).bearer_auth("wrong")).await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(http.get(metrics.clone()).bearer_auth("s3cret")).await,
        StatusCode::OK
    );
    let events = url("http", addr, "/events", &[]);
    assert_eq!(
        status(http.post(events).body("{}")).await,
        StatusCode::UNAUTHORIZED
    );
    let health = http
        .get(url("http", addr, "/health", &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let health: Value = health.json().await.unwrap();
    assert_eq!(
        (health["status"].as_str(), health["index"].as_u64()),
        (Some("ok"), Some(0))
    );
    assert!(health["uptime_s"].is_u64());

    // WebSocket clients that cannot set headers pass the token in the URL.
    let query = [("query", "true")];
    let refused =
        tokio_tungstenite::connect_async(url("ws", addr, "/index", &query).as_str()).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED.as_u16());
        }
        other => panic!("expected 401, got {other:?}"),
    }
    let with_token = [("query", "true"), ("token", "s3cret")];
    let (mut ws, _) =
        tokio_tungstenite::connect_async(url("ws", addr, "/index", &with_token).as_str())
            .await
            .expect("token in the URL accepted");
    assert_eq!(
        next_json(&mut ws).await.unwrap_err().map(|c| c.0),
        Some(1000)
    );
}

/// `/metrics` parsed with a Prometheus text parser.
async fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let text = metrics_text(addr).await;
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// Scrapes until `done` holds (panics with `what` after a while).
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    done: impl Fn(&prometheus_parse::Scrape) -> bool,
) -> prometheus_parse::Scrape {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = scrape(addr).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: not seen in {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn value(scrape: &prometheus_parse::Scrape, name: &str, output: Option<&str>) -> Option<f64> {
    use prometheus_parse::Value::{Counter, Gauge, Untyped};
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.get("output") == output)
        .map(|s| match s.value {
            Counter(v) | Gauge(v) | Untyped(v) => v,
            _ => panic!("{name} is not a single value"),
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_what_was_sent() {
    let downstream = Vigil::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("forward.vigil");
    let port = downstream.port();
    // A carbon that takes every line: the two events without a metric are
    // the graph's to skip, not lost.
    let carbon = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let carbon_port = carbon.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut line, _) = carbon.accept().await.unwrap();
        tokio::io::copy(&mut line, &mut tokio::io::sink()).await
    });
    let source = format!(
        "output next = forward(host: \"127.0.0.1\", port: {port})\n\
         output graph = graphite(port: {carbon_port})\n\
         streams {{\n  index\n  next\n  graph\n}}\n"
    );
    std::fs::write(&rules, &source).unwrap();
    let v = Vigil::start(&["--rules", rules.to_str().unwrap()]);
    let addr = http_addr(&v);

    let events: Vec<_> = (0..7)
        .map(|i| event("m", &format!("s{i}"), 60.0, i))
        .collect();
    send(&v, &events[..3]).await;
    send(&v, &events[3..]).await;
    let body =
        "{\"host\":\"m\",\"service\":\"h1\"}\n{\"metric\":[]}\n{\"host\":\"m\",\"service\":\"h2\"}";
    reqwest::Client::new()
        .post(url("http", addr, "/events", &[]))
        .body(body)
        .send()
        .await
        .unwrap();

    let s = scrape_until(addr, "all 9 events delivered downstream", |s| {
        value(s, "vigil_output_delivered_total", Some("next")) == Some(9.0)
            && value(s, "vigil_output_delivered_total", Some("graph")) == Some(7.0)
    })
    .await;
    let get = |name: &str| value(&s, name, None).unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!(get("vigil_tcp_events_total"), 7.0);
    assert_eq!(get("vigil_tcp_messages_total"), 2.0);
    assert_eq!(get("vigil_http_events_total"), 2.0);
    assert_eq!(get("vigil_http_event_errors_total"), 1.0);
    assert_eq!(get("vigil_decode_errors_total"), 0.0);
    assert_eq!(get("vigil_index_size"), 9.0);
    assert_eq!(get("vigil_index_expired_total"), 0.0);
    assert_eq!(get("vigil_subscribers"), 0.0);
    assert_eq!(get("vigil_subscribers_disconnected_slow_total"), 0.0);
    assert_eq!(
        value(&s, "vigil_output_accepted_total", Some("next")),
        Some(9.0)
    );
    assert_eq!(
        value(&s, "vigil_output_dropped_total", Some("next")),
        Some(0.0)
    );
    assert_eq!(value(&s, "vigil_output_queued", Some("next")), Some(0.0));
    assert_eq!(value(&s, "vigil_output_in_flight", Some("next")), Some(0.0));
    let graph = |name| value(&s, name, Some("graph"));
    assert_eq!(
        [
            "vigil_output_accepted_total",
            "vigil_output_dropped_total",
            "vigil_output_skipped_total"
        ]
        .map(graph),
        [Some(9.0), Some(0.0), Some(2.0)]
    );
    let latency = s
        .samples
        .iter()
        .find(|s| s.metric == "vigil_streams_latency_seconds")
        .expect("latency histogram");
    let prometheus_parse::Value::Histogram(buckets) = &latency.value else {
        panic!("not a histogram: {latency:?}");
    };
    let all = buckets
        .iter()
        .find(|b| b.less_than.is_infinite())
        .unwrap()
        .count;
    assert!(
        all >= 3.0,
        "two TCP batches and one HTTP batch at least: {buckets:?}"
    );

    // Reloads, good and bad, are counted.
    let pid = v.pid().to_string();
    run_ok("kill", &["-HUP", &pid], CMD_TIMEOUT);
    scrape_until(addr, "reload counted", |s| {
        value(s, "vigil_rules_reloads_total", None) == Some(1.0)
    })
    .await;
    std::fs::write(&rules, "streams {\n  nonsense\n}\n").unwrap();
    run_ok("kill", &["-HUP", &pid], CMD_TIMEOUT);
    scrape_until(addr, "failed reload counted", |s| {
        value(s, "vigil_rules_reload_failures_total", None) == Some(1.0)
    })
    .await;
}

/// Everything in-process on a tiny subscriber queue.
async fn in_process(capacity: usize) -> (HttpServer, Arc<Index>) {
    let (http, index, _) = in_process_with(HttpConfig {
        subscriber_capacity: capacity,
        ..HttpConfig::default()
    })
    .await;
    (http, index)
}

/// Everything in-process, `config` listening on an ephemeral port.
async fn in_process_with(config: HttpConfig) -> (HttpServer, Arc<Index>, Arc<Stats>) {
    in_process_indexing(config, IndexConfig::default()).await
}

async fn in_process_indexing(
    config: HttpConfig,
    index: IndexConfig,
) -> (HttpServer, Arc<Index>, Arc<Stats>) {
    let clock: SharedClock = Arc::new(SystemClock);
    let index = Arc::new(Index::new(index));
    let (_, compiled) = rules::load(DEFAULT_RULES_NAME, DEFAULT_RULES, EnvPolicy::Strict).unwrap();
    let rules = Arc::new(Rules::new(
        compiled.roots,
        None,
        vec![],
        index.clone(),
        clock.clone(),
    ));
    let outputs = Outputs::start(&[], Kept::default(), CancellationToken::new());
    let stats = Arc::new(Stats::default());
    let telemetry = Arc::new(Telemetry {
        stats: stats.clone(),
        index: index.clone(),
        subscribers: index.pubsub().clone(),
        rules: rules.clone(),
        reloader: Arc::new(Reloader::new(None, rules.clone(), outputs)),
        latency: Arc::default(),
        started: Instant::now(),
        cluster: None,
    });
    let config = HttpConfig {
        addr: Some("127.0.0.1:0".parse().unwrap()),
        ..config
    };
    let http = HttpServer::start(config, telemetry, rules, clock)
        .await
        .unwrap();
    (http, index, stats)
}

/// A subscription to everything, once the server has registered it.
async fn subscribe_all(http: &HttpServer, index: &Index) -> Ws {
    subscribe(http, index, "true").await
}

/// A subscription to `query`, once the server has registered it.
async fn subscribe(http: &HttpServer, index: &Index, query: &str) -> Ws {
    let before = index.pubsub().subscribers();
    let query = [("query", query), ("subscribe", "true")];
    let (ws, _) =
        tokio_tungstenite::connect_async(url("ws", http.addr.unwrap(), "/index", &query).as_str())
            .await
            .unwrap();
    let deadline = Instant::now() + WAIT;
    while index.pubsub().subscribers() <= before {
        assert!(Instant::now() < deadline, "never subscribed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ws
}

/// A dashboard whose query costs each stored event far more than the
/// publisher's budget (800 `=~ "%…%"` terms against a 1 MB description) is
/// disconnected at the first such event, told why, counted and logged, and
/// refused when it comes back; meanwhile an agent's events are acked and a
/// cheap subscriber gets them.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscription_too_costly_for_ingest_is_disconnected_with_its_reason_and_refused() {
    let v = Vigil::start(&[]);
    let addr = http_addr(&v);
    let terms: Vec<String> = (0..800)
        .map(|i| format!(r#"description =~ "%q{i}zM%""#))
        .collect();
    let costly = terms.join(" or ");
    let mut dashboard =
        SseReader::open(url("http", addr, "/index", &[("query", &costly)]), true).await;
    let watch = [("query", "true"), ("subscribe", "true")];
    let (mut cheap, _) =
        tokio_tungstenite::connect_async(url("ws", addr, "/index", &watch).as_str())
            .await
            .unwrap();
    let subscribed = scrape_until(addr, "both subscribed", |s| {
        value(s, "vigil_subscribers", None) == Some(2.0)
    })
    .await;
    assert_eq!(
        value(
            &subscribed,
            "vigil_subscribers_disconnected_costly_total",
            None
        ),
        Some(0.0)
    );

    let big = |n: i64| Event {
        description: Some("d".repeat(1024 * 1024 - 64)),
        ..event("big", &n.to_string(), 60.0, n)
    };
    let agent = Instant::now();
    send(&v, &[big(1), big(2), big(3)]).await;
    send(&v, &[event("agent", "cpu", 60.0, 4)]).await;
    let acked_in = agent.elapsed();

    let ended = dashboard.next().await;
    let why = ended["error"].as_str().expect("the last event says why");
    assert!(
        why.starts_with("query too costly for a live subscription: ")
            && why.ends_with("on one event, over 1ms; narrow it"),
        "{why}"
    );
    let seen: Vec<Value> = [next_json(&mut cheap).await, next_json(&mut cheap).await]
        .into_iter()
        .map(|e| e.expect("the cheap subscriber is served"))
        .collect();
    assert_eq!(key(&seen[0]), ("big", "1", "ok"));
    let mut rest = seen;
    while key(rest.last().unwrap()) != ("agent", "cpu", "ok") {
        rest.push(next_json(&mut cheap).await.expect("served"));
    }
    // Held for seconds per such event before (4.5 s in all, debug build).
    assert!(acked_in < Duration::from_secs(3), "acked in {acked_in:?}");

    // It comes back, by SSE or WebSocket: refused at once, with the reason.
    let again = sse_get(addr, &[("query", &costly)]).await;
    assert_eq!(again.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = again.json().await.unwrap();
    let refused = body["error"].as_str().unwrap();
    assert!(
        refused.starts_with("query too costly for a live subscription (over 1ms"),
        "{refused}"
    );
    let query = [("query", costly.as_str()), ("subscribe", "true")];
    let (mut ws, _) = tokio_tungstenite::connect_async(url("ws", addr, "/index", &query).as_str())
        .await
        .unwrap();
    let (code, reason) = next_json(&mut ws)
        .await
        .err()
        .flatten()
        .expect("a close frame");
    assert_eq!(code, u16::from(CloseCode::Policy));
    assert!(reason.starts_with("query too costly"), "{reason}");

    let s = scrape(addr).await;
    assert_eq!(
        value(&s, "vigil_subscribers_disconnected_costly_total", None),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "vigil_subscriptions_refused_costly_total", None),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "vigil_subscribers_disconnected_slow_total", None),
        Some(0.0)
    );
    assert_eq!(value(&s, "vigil_subscribers", None), Some(1.0));
    let logged = v.log_line("too costly for the ingest path");
    assert!(logged.contains(r#"description =~ \"%q0zM%\""#), "{logged}");
}

/// A client from 127.0.0.1 (say) that sends `X-Forwarded-For: for_whom`
/// when given.
fn client_from(local: &str, forwarded_for: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(whom) = forwarded_for {
        headers.insert("x-forwarded-for", whom.parse().unwrap());
    }
    reqwest::Client::builder()
        .local_address(local.parse::<std::net::IpAddr>().unwrap())
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Subscriptions the flooding client opens in [`cut_a_flood`].
const FLOODING: usize = 200;

/// The flood tests' vigils let subscriptions take 5% of a core together
/// (not 25%): the flood is cut on a machine slowed several times over,
/// where its queries' share, charged what they take, shrinks with the
/// agent's rate.
const FLOOD_SHARE: [&str; 2] = ["--subscription-share", "5"];

/// One flood at a time: a flood is cut for the share of a core its queries
/// take, which two vigils flooded at once on a small machine may not get.
static ONE_FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `flooder` subscribes [`FLOODING`] distinct cheap queries (one search of
/// the service each), `bystander` one of the agent's events, and an agent
/// sends until the flood is cut for taking more than a quarter of a core
/// together. The flood's reason is checked, and that the bystander got every
/// event sent; returns its subscription, still open.
async fn cut_a_flood(
    v: &Vigil,
    flooder: &reqwest::Client,
    bystander: &reqwest::Client,
) -> SseReader {
    let _alone = ONE_FLOOD.lock().await;
    let addr = http_addr(v);
    let sse = |query: &str| url("http", addr, "/index", &[("query", query)]);
    let mut flood = Vec::new();
    for i in 0..FLOODING {
        flood.push(SseReader::open_with(flooder, sse(&common::cheap_query(i)), true).await);
    }
    let mut watcher = SseReader::open_with(bystander, sse(r#"host = "agent""#), true).await;
    scrape_until(addr, "all subscribed", |s| {
        value(s, "vigil_subscribers", None) == Some(FLOODING as f64 + 1.0)
    })
    .await;

    // The bystander reads while an agent sends until the flood is cut (a
    // burst shorter than the pubsub's window is not weighed).
    let (total, mut told) = tokio::sync::watch::channel(None);
    let reader = tokio::spawn(async move {
        let mut seen = 0u64;
        loop {
            if told.borrow().is_some_and(|sent| seen == sent) {
                return watcher;
            }
            tokio::select! {
                event = watcher.next() => {
                    assert_eq!(key(&event), ("agent", seen.to_string().as_str(), "ok"));
                    seen += 1;
                }
                _ = told.changed() => {}
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sender = common::agent_until(v.tcp, stop.clone());
    let until_error = async {
        loop {
            let next = flood[0].next().await;
            if next.get("error").is_some() {
                return next;
            }
        }
    };
    let ended = tokio::time::timeout(WAIT, until_error)
        .await
        .expect("the flood is cut while the agent sends");
    stop.store(true, Ordering::Relaxed);
    total.send_replace(Some(sender.await.unwrap()));
    let why = ended["error"].as_str().expect("the last event says why");
    assert!(
        why.starts_with("query too costly for a live subscription: this client's ")
            && why.ends_with("%, over 5%; narrow it"),
        "{why}"
    );
    // Every event sent, in order, to the bystander.
    reader.await.unwrap()
}

/// The answer to `client` subscribing `query` over SSE.
async fn sse_get_from(
    client: &reqwest::Client,
    addr: SocketAddr,
    query: &str,
) -> reqwest::Response {
    client
        .get(url("http", addr, "/index", &[("query", query)]))
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap()
}

const CLIENT_REFUSED: &str = "query too costly for a live subscription (the dearest client when all took over 5% of a core); narrow it, or retry in 60 s";

/// A client subscribing hundreds of distinct cheap queries takes more than
/// a quarter of a core together while an agent sends: all of that client's
/// subscriptions are disconnected with the reason, counted, logged, and the
/// client refused whatever it asks next; another client (from 127.0.0.2)
/// gets every event throughout and may still subscribe the same text.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_whose_subscriptions_are_too_costly_together_is_cut_not_another() {
    let v = Vigil::start(&FLOOD_SHARE);
    let addr = http_addr(&v);
    let other = client_from("127.0.0.2", None);
    let _watcher = cut_a_flood(&v, &reqwest::Client::new(), &other).await;

    // Refused whatever it asks, the other client not.
    let again = sse_get(addr, &[("query", r#"host = "agent""#)]).await;
    assert_eq!(again.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"].as_str().unwrap(), CLIENT_REFUSED);
    let sse = |query: &str| url("http", addr, "/index", &[("query", query)]);
    let mut same = SseReader::open_with(&other, sse(&common::cheap_query(0)), true).await;
    send(&v, &[event("h", "zzz0", 60.0, 0)]).await;
    assert_eq!(key(&same.next().await), ("h", "zzz0", "ok"));
    let s = scrape(addr).await;
    assert_eq!(
        value(&s, "vigil_subscribers_disconnected_costly_total", None),
        Some(FLOODING as f64)
    );
    assert_eq!(
        value(&s, "vigil_subscribers_disconnected_slow_total", None),
        Some(0.0)
    );
    assert_eq!(value(&s, "vigil_subscribers", None), Some(2.0));
    let logged = v.log_line("too costly for the ingest path together");
    assert!(logged.contains(r#""client":"127.0.0.1""#), "{logged}");
    assert!(
        logged.contains(&format!(r#""subscribers":{FLOODING}"#)),
        "{logged}"
    );
}

/// Behind a trusted reverse proxy every subscriber's peer is the proxy:
/// each is the client its `X-Forwarded-For` names. One user's flood is
/// cut and that user refused; another user of the same proxy keeps its
/// subscription and may subscribe, and so may the proxy itself.
#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_the_forwarded_client_is_cut_not_the_proxys_other_users() {
    let v = Vigil::start(&[&FLOOD_SHARE[..], &["--trusted-proxy", "127.0.0.1"]].concat());
    let addr = http_addr(&v);
    let flooder = client_from("127.0.0.1", Some("192.0.2.1"));
    let other = client_from("127.0.0.1", Some("203.0.113.9, 192.0.2.2"));
    let _watcher = cut_a_flood(&v, &flooder, &other).await;

    let again = sse_get_from(&flooder, addr, r#"host = "agent""#).await;
    assert_eq!(again.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"].as_str().unwrap(), CLIENT_REFUSED);
    let sse = |query: &str| url("http", addr, "/index", &[("query", query)]);
    let mut same = SseReader::open_with(&other, sse(&common::cheap_query(0)), true).await;
    let mut proxy = SseReader::open(sse(&common::cheap_query(1)), true).await;
    send(
        &v,
        &[event("h", "zzz0", 60.0, 0), event("h", "zzz1", 60.0, 0)],
    )
    .await;
    assert_eq!(key(&same.next().await), ("h", "zzz0", "ok"));
    assert_eq!(key(&proxy.next().await), ("h", "zzz1", "ok"));
    let logged = v.log_line("too costly for the ingest path together");
    assert!(
        logged.contains(r#""client":"192.0.2.1 via proxy 127.0.0.1""#),
        "{logged}"
    );
}

/// A peer that is not a trusted proxy is its own client whatever its
/// `X-Forwarded-For` says: cut, it cannot escape the refusal by naming
/// someone else.
#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_peers_forwarded_for_is_ignored() {
    let v = Vigil::start(&[&FLOOD_SHARE[..], &["--trusted-proxy", "127.0.0.1"]].concat());
    let addr = http_addr(&v);
    let flooder = client_from("127.0.0.2", Some("192.0.2.1"));
    let bystander = client_from("127.0.0.1", Some("192.0.2.2"));
    let _watcher = cut_a_flood(&v, &flooder, &bystander).await;

    let disguised = client_from("127.0.0.2", Some("192.0.2.3"));
    let again = sse_get_from(&disguised, addr, r#"host = "agent""#).await;
    assert_eq!(again.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["error"].as_str().unwrap(), CLIENT_REFUSED);
    let logged = v.log_line("too costly for the ingest path together");
    assert!(logged.contains(r#""client":"127.0.0.2""#), "{logged}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_subscriber_is_disconnected_with_a_reason_and_counted() {
    let (http, index) = in_process(1).await;
    let mut ws = subscribe_all(&http, &index).await;
    // Published from this thread far faster than the server can write frames.
    for i in 0..10_000 {
        index.insert(&event("flood", &i.to_string(), 60.0, i));
    }
    let closed = loop {
        if let Err(closed) = next_json(&mut ws).await {
            break closed;
        }
    };
    let (code, reason) = closed.expect("a close frame");
    assert_eq!(code, u16::from(CloseCode::Again));
    assert!(reason.contains("too slow"), "{reason}");
    let stats = &index.pubsub().stats;
    assert_eq!(
        stats
            .disconnected_slow
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(index.pubsub().subscribers(), 0);
    let s = scrape(http.addr.unwrap()).await;
    assert_eq!(
        value(&s, "vigil_subscribers_disconnected_slow_total", None),
        Some(1.0)
    );
    http.shutdown(WAIT).await;
}

/// Each queue counts every event it holds in full: subscribers that read
/// nothing hold no more than `--max-subscriber-memory` together, and the
/// server goes on serving new ones.
#[tokio::test(flavor = "multi_thread")]
async fn subscribers_that_read_nothing_hold_no_more_than_the_bound_together() {
    const BOUND: usize = 1024 * 1024;
    let index = IndexConfig {
        max_subscriber_memory: BOUND,
        ..IndexConfig::default()
    };
    let (http, index, _) = in_process_indexing(HttpConfig::default(), index).await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(subscribe_all(&http, &index).await);
    }
    let large = |i: i64| Event {
        description: Some("d".repeat(10_000)),
        ..event("large", &i.to_string(), 600.0, i)
    };
    let one = large(0).approx_bytes();
    let held = || {
        let held = &index.pubsub().stats.bytes_held;
        held.load(std::sync::atomic::Ordering::Acquire)
    };
    let mut most = 0;
    // 20 MB for each: more than its connection's socket buffers take.
    for i in 0..2000 {
        index.insert(&large(i));
        most = most.max(held());
        // A subscriber's task takes events off its queue into its socket:
        // give it the chance, as a busy server would.
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert!(most <= BOUND, "held {most} bytes at most, over {BOUND}");
    let disconnected = index
        .pubsub()
        .stats
        .disconnected_slow
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(disconnected >= 1, "nobody was disconnected");
    assert!(most > BOUND - 8 * one, "the bound was reached: {most}");

    // Its snapshot must fit beside what the others hold: not all of it.
    let mut fresh = subscribe(&http, &index, r#"host = "fresh""#).await;
    index.insert(&event("fresh", "s", 60.0, 1));
    let fresh_event = loop {
        let event = next_json(&mut fresh)
            .await
            .expect("the new subscriber is served");
        if event["host"] == "fresh" {
            break event;
        }
    };
    assert_eq!(fresh_event["service"], "s");
    let s = scrape(http.addr.unwrap()).await;
    let gauge = value(&s, "vigil_subscriber_bytes_held", None).unwrap();
    assert!(gauge <= BOUND as f64, "{gauge}");
    drop(idle);
    http.shutdown(WAIT).await;
}

/// A subscriber's snapshot is held while it is sent, as long as the client
/// takes to read it: snapshots count in `--max-subscriber-memory` with the
/// queues, and a subscription whose snapshot does not fit is refused (try
/// again later) instead of 4 MB more of memory per reconnecting dashboard.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_that_does_not_fit_in_the_subscriber_memory_is_refused() {
    const BOUND: usize = 1024 * 1024;
    let index = IndexConfig {
        max_subscriber_memory: BOUND,
        ..IndexConfig::default()
    };
    let (http, index, stats) = in_process_indexing(HttpConfig::default(), index).await;
    for i in 0..500 {
        index.insert(&Event {
            description: Some("d".repeat(4096)),
            ..event("large", &i.to_string(), 600.0, i)
        });
    }
    let addr = http.addr.unwrap();
    let query = [("query", "true"), ("subscribe", "true")];
    let (mut ws, _) = tokio_tungstenite::connect_async(url("ws", addr, "/index", &query).as_str())
        .await
        .unwrap();
    let (code, reason) = next_json(&mut ws)
        .await
        .unwrap_err()
        .expect("a close frame");
    assert_eq!(code, u16::from(CloseCode::Again));
    assert!(reason.ends_with("narrow the query"), "whole: {reason}");
    let sse = sse_get(addr, &query).await;
    assert_eq!(sse.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = sse.json().await.unwrap();
    assert!(
        (body["error"].as_str().unwrap()).starts_with("500 matching events do not fit"),
        "{body}"
    );
    // A narrower subscription is served, and nothing stays held.
    let mut one = subscribe(&http, &index, r#"service = "7""#).await;
    assert_eq!(next_json(&mut one).await.unwrap()["service"], "7");
    let held = &index.pubsub().stats.bytes_held;
    assert_eq!(held.load(std::sync::atomic::Ordering::Acquire), 0);
    assert_eq!(Stats::get(&stats.subscriptions_refused), 2);
    let s = scrape(addr).await;
    assert_eq!(
        value(&s, "vigil_subscriptions_refused_total", None),
        Some(2.0)
    );
    http.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_sending_a_large_message_is_disconnected_not_buffered() {
    use futures_util::SinkExt;
    let (http, index) = in_process(100).await;
    let mut ws = subscribe_all(&http, &index).await;
    // Anything small is only a sign of life.
    ws.send(Message::text("x".repeat(60 * 1024))).await.unwrap();
    index.insert(&event("small", "s", 60.0, 1));
    assert_eq!(next_json(&mut ws).await.unwrap()["host"], "small");
    // Sent in one go; the server stops reading after the first 64 KiB.
    let _ = ws.send(Message::binary(vec![0u8; 1024 * 1024])).await;
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            if let Err(closed) = next_json(&mut ws).await {
                return closed;
            }
        }
    })
    .await
    .expect("the connection ends");
    assert_eq!(ended, None, "dropped without a close frame");
    let deadline = Instant::now() + WAIT;
    while index.pubsub().subscribers() > 0 {
        assert!(Instant::now() < deadline, "subscription still open");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    http.shutdown(WAIT).await;
}

/// Each ping a subscriber sends queues a pong for it: one flooding pings
/// while reading nothing is closed, and counted, before those add up.
#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_flooding_pings_is_closed() {
    use futures_util::SinkExt;
    let (http, index, stats) = in_process_with(HttpConfig::default()).await;
    let mut ws = subscribe_all(&http, &index).await;
    for _ in 0..100 {
        if ws.feed(Message::Ping(vec![7; 125].into())).await.is_err() {
            break;
        }
    }
    let _ = ws.flush().await;
    let (code, reason) = next_json(&mut ws)
        .await
        .unwrap_err()
        .expect("a close frame");
    assert_eq!(code, u16::from(CloseCode::Policy));
    assert_eq!(
        reason,
        "too many messages: over 64 a second from a subscriber"
    );
    assert_eq!(Stats::get(&stats.http_websocket_floods), 1);
    let deadline = Instant::now() + WAIT;
    while index.pubsub().subscribers() > 0 {
        assert!(Instant::now() < deadline, "subscription still open");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Ten pings and ten heartbeats a second for four seconds are no flood
    // (more messages than a count per server ping would have taken).
    let mut ws = subscribe_all(&http, &index).await;
    for _ in 0..40 {
        ws.send(Message::Ping(Default::default())).await.unwrap();
        ws.send(Message::Text("{\"type\":\"heartbeat\"}".into()))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    index.insert(&event("after", "s", 60.0, 1));
    assert_eq!(next_json(&mut ws).await.unwrap()["host"], "after");
    http.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_closes_live_subscriptions() {
    let (http, index) = in_process(100).await;
    let mut ws = subscribe_all(&http, &index).await;
    let shutdown = tokio::spawn(http.shutdown(WAIT));
    let closed = next_json(&mut ws).await.unwrap_err();
    assert_eq!(closed.map(|c| c.0), Some(u16::from(CloseCode::Away)));
    tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
}

/// Indexes `count` events of 4 KiB each (host `big`).
fn index_large_events(index: &Index, count: i64) {
    for i in 0..count {
        index.insert(&Event {
            description: Some("x".repeat(4096)),
            ..event("big", &i.to_string(), 60.0, i)
        });
    }
}

/// Fills the index with 2 000 events of 4 KiB and asks for all of them on a
/// raw connection that the caller then does not read: the JSON answer
/// (~8 MB) is far more than the socket buffers hold.
async fn ask_for_a_large_answer(http: &HttpServer, index: &Index) -> tokio::net::TcpStream {
    index_large_events(index, 2_000);
    let addr = http.addr.unwrap();
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /index?query=true HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut stalled, request.as_bytes())
        .await
        .unwrap();
    stalled
}

/// A client reading a large answer slowly through a small receive window
/// acknowledges what it takes, so it is not taken for a vanished peer,
/// however long the answer lasts (the kernel's `TCP_USER_TIMEOUT` ended such
/// a connection at twice the write timeout: a 1 MB answer read 16 KiB every
/// 2 s was lost at 14 s under a 5 s timeout).
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_read_slowly_through_a_small_window_arrives_whole() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (http, index, stats) = with_a_write_timeout_of_a_second().await;
    index_large_events(&index, 16);
    let addr = http.addr.unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8192).unwrap();
    let mut slow = socket.connect(addr).await.unwrap();
    let request =
        format!("GET /index?query=true HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    slow.write_all(request.as_bytes()).await.unwrap();
    let (started, mut answer) = (Instant::now(), Vec::new());
    let mut chunk = vec![0; 16384];
    loop {
        let read = tokio::time::timeout(WAIT, slow.read(&mut chunk)).await;
        match read.expect("a read in time") {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) => panic!(
                "cut off after {:?}, {} bytes: {e}",
                started.elapsed(),
                answer.len()
            ),
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "read in {:?}: not slowly enough to outlast twice the write timeout",
        started.elapsed()
    );
    let text = String::from_utf8(answer).unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        body.matches("\"host\":\"big\"").count(),
        16,
        "every event, whole"
    );
    assert_eq!(Stats::get(&stats.http_peers_vanished), 0);
    assert_eq!(Stats::get(&stats.http_write_timeouts), 0);
}

/// In-process, with a write timeout of a second.
async fn with_a_write_timeout_of_a_second() -> (HttpServer, Arc<Index>, Arc<Stats>) {
    in_process_with(HttpConfig {
        write_timeout: Duration::from_secs(1),
        ..HttpConfig::default()
    })
    .await
}

/// An HTTP/2 connection to `addr` granting each stream `window` bytes.
async fn h2_granting(addr: SocketAddr, window: u32) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    h2.ready().await.unwrap()
}

/// `GET /index?query=QUERY` for an HTTP/2 connection to `addr`.
fn get_index(addr: SocketAddr, query: &str) -> axum::http::Request<()> {
    axum::http::Request::get(url("http", addr, "/index", &[("query", query)]).as_str())
        .body(())
        .unwrap()
}

/// Over HTTP/2 a client can read its connection yet grant one answer no
/// room: nothing of the connection stalls, and the answer would wait whole
/// for as long as it lasts. It is dropped after the write timeout; the
/// connection goes on.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_answer_its_client_grants_no_room_is_dropped() {
    let (http, index, stats) = with_a_write_timeout_of_a_second().await;
    index_large_events(&index, 2_000);
    let addr = http.addr.unwrap();
    let mut h2 = h2_granting(addr, 0).await;
    let get = |query| get_index(addr, query);
    let (answer, _) = h2.send_request(get("true"), true).unwrap();
    let answer = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    wait_stat(&stats, |s| &s.http_responses_unread, 1).await;
    assert_eq!(
        Stats::get(&stats.http_write_timeouts),
        0,
        "the connection is read"
    );
    let (other, _) = h2.send_request(get("service = \"7\""), true).unwrap();
    let other = tokio::time::timeout(WAIT, other).await.unwrap().unwrap();
    assert_eq!(other.status(), StatusCode::OK);
    drop(h2);
    http.shutdown(WAIT).await;
}

/// A client that grants an answer room slowly but steadily (16 KiB every
/// half second, under a one-second timeout) is reading: it gets it whole.
/// An answer that takes no room in `--max-answer-memory` (up to 64 KiB): a
/// larger one must moreover come whole within the timeout.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_answer_read_slowly_is_not_dropped() {
    let (http, index, stats) = with_a_write_timeout_of_a_second().await;
    index_large_events(&index, 14);
    let addr = http.addr.unwrap();
    let mut h2 = h2_granting(addr, 16 * 1024).await;
    let (answer, _) = h2.send_request(get_index(addr, "true"), true).unwrap();
    let answer = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
    let mut body = answer.into_body();
    let mut got = Vec::new();
    while let Some(data) = body.data().await {
        let data = data.expect("not reset");
        got.extend_from_slice(&data);
        tokio::time::sleep(Duration::from_millis(500)).await;
        body.flow_control().release_capacity(data.len()).unwrap();
    }
    let answer: Vec<Value> = serde_json::from_slice(&got).unwrap();
    assert_eq!(answer.len(), 14);
    assert!(
        (48_000..=vigil::answers::FREE).contains(&got.len()),
        "{} bytes",
        got.len()
    );
    assert_eq!(Stats::get(&stats.http_responses_unread), 0);
    drop(h2);
    http.shutdown(WAIT).await;
}

/// A client that stopped reading would otherwise hold the shutdown until
/// its write timeout (a minute by default) or the 10 s grace.
#[tokio::test(flavor = "multi_thread")]
async fn shutdown_does_not_wait_for_a_client_that_stopped_reading() {
    let (http, index) = in_process(100).await;
    let mut stalled = ask_for_a_large_answer(&http, &index).await;
    // The answer has begun; the rest fills the socket buffers.
    let mut head = [0; 12];
    tokio::io::AsyncReadExt::read_exact(&mut stalled, &mut head)
        .await
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    tokio::time::timeout(WAIT, http.shutdown(Duration::from_secs(60)))
        .await
        .expect("shutdown ended long before the write timeout");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_its_response_is_closed_after_the_write_timeout() {
    let (http, index, _) = in_process_with(HttpConfig {
        write_timeout: Duration::from_secs(1),
        ..HttpConfig::default()
    })
    .await;
    let addr = http.addr.unwrap();
    let mut stalled = ask_for_a_large_answer(&http, &index).await;
    // Two deadlines of the same second end it: the connection's write
    // stalling (a write timeout) and the query answer, which holds room in
    // `--max-answer-memory`, not taken whole (an unread response). Which one
    // is seen first depends on the scheduling; exactly one counts it.
    scrape_until(addr, "the stalled connection timed out", |s| {
        let count = |name| value(s, name, None).unwrap_or(0.0);
        count("vigil_http_write_timeouts_total") + count("vigil_http_responses_unread_total") == 1.0
    })
    .await;
    // Closed by the server: what the buffers held, then the end, short of the answer.
    let mut received = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(&mut stalled, &mut received);
    let _ = tokio::time::timeout(WAIT, read)
        .await
        .expect("the server closed the connection");
    assert!(
        received.len() < 8_000_000,
        "only part of the answer: {} bytes",
        received.len()
    );
    let s = scrape(addr).await;
    let count = |name| value(&s, name, None).unwrap_or(0.0);
    assert_eq!(
        count("vigil_http_write_timeouts_total") + count("vigil_http_responses_unread_total"),
        1.0,
        "counted once"
    );
    // Everyone else is still served.
    let answer: Value = reqwest::get(url("http", addr, "/index", &[("query", "service = \"7\"")]))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer.as_array().map(Vec::len), Some(1));
    http.shutdown(WAIT).await;
}

async fn text_until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    String::from_utf8_lossy(&read_until_closed(stream).await).into_owned()
}

/// hyper's HTTP/1 read buffer, which a connection keeps while it stays open,
/// is at most 64 KiB (hyper's default is ~400 KB): a request head must fit in
/// it, and one that does not is answered 431.
#[tokio::test(flavor = "multi_thread")]
async fn an_http1_request_head_over_64_kib_is_refused() {
    let (http, _index, _) = in_process_with(HttpConfig::default()).await;
    let addr = http.addr.unwrap();
    let head = |header: usize| {
        format!(
            "GET /health HTTP/1.1\r\nHost: vigil\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
            "x".repeat(header)
        )
    };
    let ask = |request: String| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
            .await
            .unwrap();
        text_until_closed(&mut stream).await
    };
    let answer = ask(head(60 * 1024)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = ask(head(70 * 1024)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    http.shutdown(WAIT).await;
}

/// A `POST /events` body over 16 MiB is refused: at once when its head
/// announces the length, after 16 MiB when it is chunked.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_16_mib_is_refused() {
    let (http, index, _) = in_process_with(HttpConfig::default()).await;
    let addr = http.addr.unwrap();
    let max = 16 * 1024 * 1024;
    let ask = |head: String, body: Vec<u8>| async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = stream.into_split();
        // vigil may answer, and close, before it has read everything.
        let sending = tokio::spawn(async move {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut write, head.as_bytes()).await;
            let _ = tokio::io::AsyncWriteExt::write_all(&mut write, &body).await;
            write
        });
        let answer = text_until_closed(&mut read).await;
        drop(sending.await);
        answer
    };
    let head = |framing: String| {
        format!("POST /events HTTP/1.1\r\nHost: vigil\r\n{framing}\r\nConnection: close\r\n\r\n")
    };
    let refusal = format!("{{\"error\":\"the body is over {max} bytes\"}}");
    let answer = ask(head(format!("Content-Length: {}", max + 1)), Vec::new()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.ends_with(&refusal), "{answer}");

    let line = b"{\"host\": \"h\"}\n".repeat(max / 14 + 1);
    let mut chunked = Vec::new();
    for chunk in line.chunks(1024 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let answer = ask(head("Transfer-Encoding: chunked".into()), chunked).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.ends_with(&refusal), "{answer}");
    assert!(index.is_empty());
    http.shutdown(WAIT).await;
}

/// A server with a 1 s read timeout and a 1 MiB message budget the test can
/// take room from, and a 140 KB body of 10 000 lines.
async fn with_a_1_mib_budget() -> (HttpServer, Arc<Index>, Budget, String) {
    let memory = Budget::new(1024 * 1024, Arc::new(Stats::default()));
    let (http, index, _) = in_process_with(HttpConfig {
        read_timeout: Duration::from_secs(1),
        memory: Some(memory.clone()),
        ..HttpConfig::default()
    })
    .await;
    let body = "{\"host\": \"h\"}\n".repeat(10_000);
    (http, index, memory, body)
}

/// A body over 64 KiB that finds no room in `--max-message-memory` within
/// the read timeout is answered `503`, and nothing of it is kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_body_without_room_in_the_budget_is_answered_503() {
    let (http, index, memory, body) = with_a_1_mib_budget().await;
    let addr = http.addr.unwrap();
    let held = memory.try_take(1024 * 1024).unwrap();
    let (status, answers) = post_events(addr, body.clone()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let error = format!(
        "no room for a body of {} bytes within 1s (--max-message-memory); resend it later",
        body.len()
    );
    assert_eq!(answers, [json!({ "error": error })]);
    assert!(index.is_empty());
    drop(held);
    let (status, answers) = post_events(addr, body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answers.len(), 10_000);
    http.shutdown(WAIT).await;
}

/// A body that waited for room has the whole read timeout from when it got
/// it: here it arrives 1.3 s after its head, 0.5 s after its room.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_has_the_read_timeout_from_when_it_got_its_room() {
    let (http, index, memory, body) = with_a_1_mib_budget().await;
    let head = format!(
        "POST /events HTTP/1.1\r\nHost: vigil\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let held = memory.try_take(1024 * 1024).unwrap();
    let mut stream = tokio::net::TcpStream::connect(http.addr.unwrap())
        .await
        .unwrap();
    use tokio::io::AsyncWriteExt;
    let first = [head.as_bytes(), &body.as_bytes()[..1000]].concat();
    stream.write_all(&first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stream.write_all(&body.as_bytes()[1000..]).await.unwrap();
    let answer = text_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(index.len(), 1);
    http.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_never_finish_a_request_are_closed_after_the_read_timeout() {
    let (http, _index, _) = in_process_with(HttpConfig {
        read_timeout: Duration::from_secs(1),
        ..HttpConfig::default()
    })
    .await;
    let addr = http.addr.unwrap();
    let open = |sends: &'static [u8]| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, sends)
            .await
            .unwrap();
        stream
    };
    let mut silent = open(b"").await;
    let mut half_head = open(b"GET /health HTTP/1.1\r\nHost: vigil\r\n").await;
    let mut half_body =
        open(b"POST /events HTTP/1.1\r\nHost: vigil\r\nContent-Length: 100\r\n\r\n{\"host\": ")
            .await;
    // Answered once, then asks nothing more on its kept-alive connection.
    let mut idle = open(b"GET /health HTTP/1.1\r\nHost: vigil\r\n\r\n").await;

    assert_eq!(text_until_closed(&mut silent).await, "");
    let answer = text_until_closed(&mut half_head).await;
    assert!(!answer.contains("200 OK"), "{answer}");
    let answer = text_until_closed(&mut half_body).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let answer = text_until_closed(&mut idle).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    scrape_until(addr, "all four counted", |s| {
        value(s, "vigil_http_read_timeouts_total", None) == Some(4.0)
    })
    .await;
    http.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_subscriber_that_stops_answering_pings_is_closed() {
    let (http, index, _) = in_process_with(HttpConfig {
        read_timeout: Duration::from_secs(1),
        ..HttpConfig::default()
    })
    .await;
    let addr = http.addr.unwrap();
    // A live subscriber: its library answers pings as long as it reads.
    let mut live = subscribe_all(&http, &index).await;
    let live = tokio::spawn(async move { next_json(&mut live).await });
    // A departed one: upgraded, then not a byte more.
    let mut gone = tokio::net::TcpStream::connect(addr).await.unwrap();
    let upgrade = "GET /index?query=true&subscribe=true HTTP/1.1\r\nHost: vigil\r\n\
        Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut gone, upgrade.as_bytes())
        .await
        .unwrap();
    let received = read_until_closed(&mut gone).await;
    assert!(received.starts_with(b"HTTP/1.1 101"));
    // Its close frame (opcode 8, unmasked) with code 1001, "going away".
    assert!(
        received
            .windows(4)
            .any(|w| w[0] == 0x88 && w[2..] == [0x03, 0xe9]),
        "{received:?}"
    );
    scrape_until(addr, "the departed subscriber counted", |s| {
        value(s, "vigil_http_read_timeouts_total", None) == Some(1.0)
    })
    .await;
    // The live one is still subscribed.
    index.insert(&event("after", "1", 60.0, 1));
    let got = live.await.unwrap().expect("still subscribed");
    assert_eq!(key(&got), ("after", "1", "ok"));
    http.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_limit_are_closed_at_once_until_one_leaves() {
    let (http, _index, stats) = in_process_with(HttpConfig {
        max_connections: 2,
        ..HttpConfig::default()
    })
    .await;
    let addr = http.addr.unwrap();
    // Two idle clients hold both places.
    let first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut third, &mut buf))
        .await
        .expect("closed at once, not left waiting");
    assert!(matches!(read, Ok(0) | Err(_)), "closed: {read:?}");
    assert_eq!(
        stats
            .http_connections_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Once one leaves, its place serves the next client.
    drop(first);
    let deadline = Instant::now() + WAIT;
    while !reqwest::get(url("http", addr, "/health", &[]))
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
    {
        assert!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    http.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn coalescing_subscriptions_get_the_latest_event_of_each_series_per_interval() {
    let v = Vigil::start(&[]);
    send(&v, &[event("co", "start", 60.0, 0)]).await;
    let params = [
        ("query", r#"host = "co""#),
        ("subscribe", "true"),
        ("coalesce", "400ms"),
    ];
    let (mut ws, _) =
        tokio_tungstenite::connect_async(url("ws", http_addr(&v), "/index", &params).as_str())
            .await
            .expect("websocket handshake");
    let mut sse = SseReader::open(url("http", http_addr(&v), "/index", &params), true).await;
    // The snapshot: both subscriptions are live from here.
    assert_eq!(
        key(&next_json(&mut ws).await.unwrap()),
        ("co", "start", "ok")
    );
    assert_eq!(key(&sse.next().await), ("co", "start", "ok"));

    // One batch: five updates of `a`, one of `b`.
    let mut batch: Vec<Event> = (1..=5).map(|m| event("co", "a", 60.0, m)).collect();
    batch.push(event("co", "b", 60.0, 1));
    send(&v, &batch).await;
    let metric = |e: &Value| {
        (
            e["service"].as_str().unwrap().to_owned(),
            e["metric"].clone(),
        )
    };
    let mut from_ws = vec![metric(&next_json(&mut ws).await.unwrap())];
    from_ws.push(metric(&next_json(&mut ws).await.unwrap()));
    let mut from_sse = vec![metric(&sse.next().await), metric(&sse.next().await)];
    from_ws.sort_by(|x, y| x.0.cmp(&y.0));
    from_sse.sort_by(|x, y| x.0.cmp(&y.0));
    let latest = vec![("a".to_owned(), json!(5)), ("b".to_owned(), json!(1))];
    assert_eq!(from_ws, latest, "the latest of each series, once");
    assert_eq!(from_sse, latest);

    // The next interval has only what came since.
    send(&v, &[event("co", "a", 60.0, 6)]).await;
    assert_eq!(
        metric(&next_json(&mut ws).await.unwrap()),
        ("a".to_owned(), json!(6))
    );
    assert_eq!(metric(&sse.next().await), ("a".to_owned(), json!(6)));

    let bad = [("query", "true"), ("subscribe", "true"), ("coalesce", "1m")];
    let response = reqwest::get(url("http", http_addr(&v), "/index", &bad))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"],
        "`coalesce=1m`: give an interval from 10ms to 10s"
    );
}
