//! The server in-process on ephemeral ports, driven over real sockets: framing,
//! replies, bad input and expiry. (Real third-party clients: `interop_*.rs`.)

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prost::Message;

use vigil::client::Client;
use vigil::clock::MICROS_PER_SEC;
use vigil::event::{Event, Metric};
use vigil::index::{Index, IndexConfig};
use vigil::proto::{Msg, PbEvent, PbQuery};
use vigil::server::ServerConfig;
use vigil::stats::Stats;
use vigil::streams::{IndexEverything, Streams};

use common::inproc::{Harness, T0, frame, noise};

/// Indexes everything and remembers every event it saw.
struct Recording {
    inner: IndexEverything,
    seen: Mutex<Vec<Event>>,
}

impl Streams for Recording {
    fn process(&self, events: &[Event]) {
        self.seen.lock().extend(events.iter().cloned());
        self.inner.process(events);
    }
}

fn read_reply(stream: &mut TcpStream) -> Msg {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).expect("reply length");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).expect("reply body");
    Msg::decode(body.as_slice()).expect("reply decodes")
}

fn raw(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

fn events_msg(events: Vec<PbEvent>) -> Vec<u8> {
    Msg {
        events,
        ..Msg::default()
    }
    .encode_to_vec()
}

fn pb_event(host: &str, service: &str) -> PbEvent {
    PbEvent {
        host: Some(host.into()),
        service: Some(service.into()),
        ..PbEvent::default()
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_is_exactly_field_two_and_pipelined_replies_keep_order() {
    let h = Harness::start(ServerConfig::default()).await;
    let addr = h.addr();
    let replies = blocking(move || {
        let mut s = raw(addr);
        // Three frames in one write: events, a query, a bad query.
        let mut bytes = frame(&events_msg(vec![pb_event("a", "one")]));
        let query = |q: &str| {
            Msg {
                query: Some(PbQuery {
                    string: Some(q.into()),
                }),
                ..Msg::default()
            }
            .encode_to_vec()
        };
        bytes.extend(frame(&query(r#"service = "one""#)));
        bytes.extend(frame(&query("service = = ")));
        s.write_all(&bytes).unwrap();
        let mut first = [0u8; 6];
        s.read_exact(&mut first).unwrap();
        (first, read_reply(&mut s), read_reply(&mut s))
    })
    .await;
    assert_eq!(replies.0, [0, 0, 0, 2, 0x10, 0x01]);
    assert_eq!(replies.1.ok, Some(true));
    assert_eq!(replies.1.events.len(), 1);
    assert_eq!(replies.1.events[0].host.as_deref(), Some("a"));
    assert_eq!(replies.2.ok, Some(false));
    assert!(
        replies
            .2
            .error
            .as_deref()
            .unwrap()
            .starts_with("parse error"),
        "{:?}",
        replies.2.error
    );
}

/// Frames that arrive together are processed as one batch: a refused frame
/// still gets its own error and none of its events go anywhere, the frames
/// around it are acked in order, and a query sees every event before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_frames_are_one_batch_but_a_refused_frame_stays_out() {
    let index = Arc::new(Index::new(IndexConfig::default()));
    let streams = Arc::new(Recording {
        inner: IndexEverything::new(index.clone()),
        seen: Mutex::default(),
    });
    let config = ServerConfig {
        limits: vigil::limits::Limits {
            max_events: 2,
            ..vigil::limits::Limits::DEFAULT
        },
        ..ServerConfig::default()
    };
    let h = Harness::with_streams(config, index, streams.clone()).await;
    let addr = h.addr();
    let replies = blocking(move || {
        let mut s = raw(addr);
        let mut bytes = frame(&events_msg(vec![pb_event("a", "x")]));
        let three = ["r1", "r2", "r3"].map(|host| pb_event(host, "x")).to_vec();
        bytes.extend(frame(&events_msg(three)));
        bytes.extend(frame(&events_msg(vec![pb_event("b", "x")])));
        let query = Msg {
            query: Some(PbQuery {
                string: Some(r#"service = "x""#.into()),
            }),
            ..Msg::default()
        };
        bytes.extend(frame(&query.encode_to_vec()));
        bytes.extend(frame(&events_msg(vec![pb_event("c", "x")])));
        s.write_all(&bytes).unwrap();
        (0..5).map(|_| read_reply(&mut s)).collect::<Vec<_>>()
    })
    .await;
    let ok: Vec<_> = replies.iter().map(|r| r.ok).collect();
    assert_eq!(
        ok,
        [Some(true), Some(false), Some(true), Some(true), Some(true)]
    );
    assert_eq!(
        replies[1].error.as_deref(),
        Some("3 events exceeds --max-events-per-msg 2")
    );
    let mut found: Vec<_> = replies[3].events.iter().map(|e| e.host.clone()).collect();
    found.sort();
    assert_eq!(found, [Some("a".to_owned()), Some("b".to_owned())]);
    let hosts: Vec<_> = streams.seen.lock().iter().map(|e| e.host.clone()).collect();
    let expected = ["a", "b", "c"].map(|h| Some(h.to_owned()));
    assert_eq!(hosts, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_still_arrive_after_the_client_stops_writing() {
    let h = Harness::start(ServerConfig::default()).await;
    let addr = h.addr();
    let replies = blocking(move || {
        let mut s = raw(addr);
        let mut bytes = Vec::new();
        for i in 0..3 {
            bytes.extend(frame(&events_msg(vec![pb_event("half", &i.to_string())])));
        }
        s.write_all(&bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        all
    })
    .await;
    assert_eq!(replies, [0, 0, 0, 2, 0x10, 0x01].repeat(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_time_is_stamped_with_arrival_and_metric_kinds_survive() {
    let h = Harness::start(ServerConfig::default()).await;
    h.clock.set(T0 + 123);
    let mut client = Client::connect(h.addr()).await.unwrap();
    let addr = h.addr();
    blocking(move || {
        let mut s = raw(addr);
        let mut int = pb_event("m", "int");
        int.metric_sint64 = Some(-7);
        let mut float = pb_event("m", "float");
        float.metric_f = Some(0.5);
        s.write_all(&frame(&events_msg(vec![int, float]))).unwrap();
        assert_eq!(read_reply(&mut s).ok, Some(true));
    })
    .await;
    let mut found = client.query(r#"host = "m""#).await.unwrap();
    found.sort_by(|a, b| a.service.cmp(&b.service));
    assert_eq!(found[0].metric, Some(Metric::Float(0.5)));
    assert_eq!(found[1].metric, Some(Metric::Int(-7)));
    assert!(found.iter().all(|e| e.time == T0 + 123));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_protobuf_gets_an_error_and_the_connection_stays_usable() {
    let h = Harness::start(ServerConfig::default()).await;
    let addr = h.addr();
    let (bad, good) = blocking(move || {
        let mut s = raw(addr);
        s.write_all(&frame(&[0xff, 0xff, 0xff, 0xff])).unwrap();
        let bad = read_reply(&mut s);
        s.write_all(&frame(&events_msg(vec![pb_event("after", "garbage")])))
            .unwrap();
        (bad, read_reply(&mut s))
    })
    .await;
    assert_eq!(bad.ok, Some(false));
    assert!(bad.error.unwrap().starts_with("invalid message"));
    assert_eq!(good.ok, Some(true));
    assert!(h.index.get("after", "garbage").is_some());
    assert_eq!(Stats::get(&h.server.stats.decode_errors), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_length_prefix_gets_an_error_and_close_without_allocating() {
    let h = Harness::start(ServerConfig {
        max_frame: 1024,
        ..ServerConfig::default()
    })
    .await;
    let addr = h.addr();
    let (reply, eof) = blocking(move || {
        let mut s = raw(addr);
        // Claims 4 GiB; only the prefix is ever sent.
        s.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
        let reply = read_reply(&mut s);
        let mut rest = Vec::new();
        let eof = s.read_to_end(&mut rest).map(|_| rest.len());
        (reply, eof)
    })
    .await;
    assert_eq!(reply.ok, Some(false));
    assert!(reply.error.unwrap().contains("maximum size of 1024 bytes"));
    assert_eq!(eof.unwrap(), 0, "closed after the error reply");
    assert_eq!(Stats::get(&h.server.stats.frames_oversized), 1);
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_frame_and_random_bytes_are_counted_and_harmless() {
    let h = Harness::start(ServerConfig::default()).await;
    let addr = h.addr();
    blocking(move || {
        // Promise 100 bytes, send 10, hang up.
        let mut s = raw(addr);
        s.write_all(&[0, 0, 0, 100]).unwrap();
        s.write_all(&[0x32; 10]).unwrap();
        drop(s);
        // Deterministic noise: a plausible small length, then junk.
        let mut s = raw(addr);
        s.write_all(&[0, 0, 0, 64]).unwrap();
        s.write_all(&noise(4096)).unwrap();
        drop(s);
    })
    .await;
    wait_for(|| Stats::get(&h.server.stats.frames_truncated) >= 1).await;
    h.assert_serves().await;
    let stats = &h.server.stats;
    assert!(Stats::get(&stats.decode_errors) + Stats::get(&stats.frames_oversized) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tags_are_accepted_and_read_back() {
    let h = Harness::start(ServerConfig::default()).await;
    let mut e = pb_event("many", "tags");
    e.tags = (0..10_000).map(|i| format!("tag{i}")).collect();
    let mut client = Client::connect(h.addr()).await.unwrap();
    let addr = h.addr();
    let reply = blocking(move || {
        let mut s = raw(addr);
        s.write_all(&frame(&events_msg(vec![e]))).unwrap();
        read_reply(&mut s)
    })
    .await;
    assert_eq!(reply.ok, Some(true));
    let found = client.query(r#"tagged "tag9999""#).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].tags.len(), 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_events_are_indexed_and_garbage_is_counted() {
    let h = Harness::start(ServerConfig {
        max_datagram: 512,
        ..ServerConfig::default()
    })
    .await;
    let udp = h.server.udp_addr;
    blocking(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(&[0xff, 0x00, 0x13], udp).unwrap();
        s.send_to(&[0u8; 2048], udp).unwrap();
        s.send_to(&events_msg(vec![pb_event("u", "dp")]), udp)
            .unwrap();
    })
    .await;
    wait_for(|| h.index.get("u", "dp").is_some()).await;
    let stats = &h.server.stats;
    wait_for(|| Stats::get(&stats.udp_datagrams) == 3).await;
    assert_eq!(Stats::get(&stats.decode_errors), 1);
    assert_eq!(Stats::get(&stats.udp_oversized), 1);
    assert_eq!(Stats::get(&stats.udp_events), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_expiry_removes_the_entry_and_runs_expired_through_the_streams() {
    let index = Arc::new(Index::new(IndexConfig::default()));
    let streams = Arc::new(Recording {
        inner: IndexEverything::new(index.clone()),
        seen: Mutex::default(),
    });
    let h = Harness::with_streams(ServerConfig::default(), index, streams.clone()).await;
    let mut client = Client::connect(h.addr()).await.unwrap();
    let event = Event {
        host: Some("short".into()),
        service: Some("lived".into()),
        state: Some("ok".into()),
        time: T0,
        ttl: Some(1.0),
        tags: vec!["keep".into()],
        ..Event::default()
    };
    client.send(&[event]).await.unwrap();
    assert_eq!(client.query(r#"host = "short""#).await.unwrap().len(), 1);

    h.clock.advance(MICROS_PER_SEC + 1);
    wait_for(|| h.index.get("short", "lived").is_none()).await;
    assert!(client.query(r#"host = "short""#).await.unwrap().is_empty());
    let seen = streams.seen.lock().clone();
    let expired: Vec<_> = seen.iter().filter(|e| e.is_expired_state()).collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].service.as_deref(), Some("lived"));
    assert_eq!(expired[0].time, T0 + MICROS_PER_SEC + 1);
    assert_eq!(expired[0].tags, vec!["keep".to_owned()]);
}

/// Polls a condition the server reaches asynchronously; fails after 10 s.
async fn wait_for(mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "condition not reached in 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One large message does not stay in memory for as long as its connection
/// stays open: the read buffer that held it, the decoded events with their
/// strings, and the write buffer that held a large query answer are cut back
/// once they are handled. Each connection here sends ~4.7 MB and reads an
/// answer of ~4.7 MB; before, each idle connection kept ~12 MB of them. Half
/// go silent right after the large message, when the events kept for the
/// next batch still hold its strings: at most 1 024 of them stay.
#[test]
fn an_idle_connection_does_not_keep_the_memory_of_its_largest_message() {
    const MIB: u64 = 1024 * 1024;
    const CONNECTIONS: u64 = 24;
    // mimalloc gives freed pages back to the system 10 ms after they were
    // freed, but only when the thread that freed them allocates again; idle
    // workers would keep 20-40 MiB here (for reuse) whatever the connections
    // hold. Given back at once, what remains is what the connections keep.
    let v = common::Vigil::start_with_env(&[], &[("MIMALLOC_PURGE_DELAY", "0")]);
    let addr: SocketAddr = format!("127.0.0.1:{}", v.port()).parse().unwrap();
    let description = "x".repeat(200);
    let events = (0..20_000)
        .map(|i| PbEvent {
            description: Some(description.clone()),
            ..pb_event("h", &format!("big-{i}"))
        })
        .collect();
    let large = frame(&events_msg(events));
    let query = frame(
        &Msg {
            query: Some(PbQuery {
                string: Some(r#"service =~ "big-%""#.into()),
            }),
            ..Msg::default()
        }
        .encode_to_vec(),
    );
    let small = frame(&events_msg(vec![pb_event("h", "s")]));
    let send = |stream: &mut TcpStream, frame: &[u8]| {
        stream.write_all(frame).unwrap();
        read_reply(stream)
    };
    // The index is filled (and its memory counted) first.
    assert_eq!(send(&mut raw(addr), &large).ok, Some(true));
    let before = common::resident_of(v.pid());
    let mut idle = Vec::new();
    for i in 0..CONNECTIONS {
        let mut stream = raw(addr);
        if i % 2 == 0 {
            assert_eq!(send(&mut stream, &large).ok, Some(true));
            assert_eq!(send(&mut stream, &query).events.len(), 20_000);
            // The usual traffic after them.
            assert_eq!(send(&mut stream, &small).ok, Some(true));
        } else {
            // Silent right after the large message.
            assert_eq!(send(&mut stream, &query).events.len(), 20_000);
            assert_eq!(send(&mut stream, &large).ok, Some(true));
        }
        idle.push(stream);
    }
    let grew = common::resident_of(v.pid()).saturating_sub(before);
    // For BENCHMARKS.md ("What an idle connection keeps"): `-- --nocapture`.
    println!(
        "{CONNECTIONS} idle connections: {} kB resident more",
        grew / 1024
    );
    assert!(
        grew < 16 * MIB,
        "{CONNECTIONS} idle connections hold {} MiB more than before",
        grew / MIB
    );
    drop(idle);
}

/// The binary runs with transparent huge pages off unless `--huge-pages`
/// (a fresh huge page stalls the thread that touches it while the index
/// grows: BENCHMARKS.md, "Huge pages"), set either way whatever it inherited.
#[test]
fn transparent_huge_pages_are_off_unless_asked_for() {
    let thp_enabled = |vigil: &common::Vigil| {
        let status = std::fs::read_to_string(format!("/proc/{}/status", vigil.pid())).unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("THP_enabled:"));
        line.expect("Linux ≥ 5.0 reports THP_enabled")
            .trim()
            .to_owned()
    };
    assert_eq!(thp_enabled(&common::Vigil::start(&[])), "0");
    assert_eq!(thp_enabled(&common::Vigil::start(&["--huge-pages"])), "1");
}

/// A query matching more than `--max-query-results` entries is refused with
/// an error naming the flag, over TCP and HTTP, and counted; narrower ones
/// and key lookups are answered.
#[test]
fn queries_over_the_result_limit_are_refused_with_the_flag_named() {
    let vigil = common::Vigil::start(&["--max-query-results", "3"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // Timed now, so none expires before the queries.
    let now = (common::now_secs() * 1e6) as i64;
    let events: Vec<Event> = (0..5)
        .map(|i| Event {
            host: Some(format!("web{i}")),
            service: Some(if i < 3 { "cpu" } else { "disk" }.into()),
            time: now,
            ..Event::default()
        })
        .collect();
    let expected = "the query matches more than 3 events (--max-query-results 3); narrow it";
    runtime.block_on(async {
        let mut client = Client::connect(vigil.tcp).await.unwrap();
        client.send(&events).await.unwrap();
        let refused = client.query("true").await.unwrap_err().to_string();
        assert_eq!(refused, format!("server error: {expected}"));
        assert_eq!(client.query(r#"service = "cpu""#).await.unwrap().len(), 3);
        let one = r#"host = "web4" and service = "disk""#;
        assert_eq!(client.query(one).await.unwrap().len(), 1);
        assert!(client.query("host = ").await.is_err(), "does not parse");
    });
    let http = vigil.http.unwrap();
    let get = |path: &str| {
        runtime.block_on(async {
            let response = reqwest::get(format!("http://{http}{path}")).await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        })
    };
    let (status, body) = get("/index?query=true");
    assert_eq!(status, 422, "{body}");
    assert_eq!(body, serde_json::json!({ "error": expected }).to_string());
    assert_eq!(get("/index?query=service%20%3D%20%22disk%22").0, 200);
    // A WebSocket subscription's snapshot too: closed with the same words.
    let closed = runtime.block_on(async {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        let url = format!("ws://{http}/index?query=true&subscribe=true");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        // Nothing before the close: the snapshot is refused whole.
        match ws.next().await {
            Some(Ok(Message::Close(frame))) => frame,
            other => panic!("not a close frame: {other:?}"),
        }
    });
    let closed = closed.expect("a close frame");
    assert_eq!(u16::from(closed.code), 1008, "policy violation");
    assert_eq!(closed.reason.as_str(), expected);
    // Every query asked is counted once, and each refused one once more
    // as an error, whatever refused it: four TCP, two HTTP, one WebSocket.
    let (_, metrics) = get("/metrics");
    for line in ["vigil_queries_total 7", "vigil_query_errors_total 4"] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
}

/// A query still scanning at `--query-timeout` is stopped with an error
/// naming the flag, over TCP and HTTP, and counted; key lookups, which never
/// scan, are answered.
#[test]
fn a_scan_past_the_query_timeout_is_stopped_with_the_flag_named() {
    let vigil = common::Vigil::start(&["--query-timeout", "1ms"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let now = (common::now_secs() * 1e6) as i64;
    // A thousand terms on each of 20 000 entries: far over a millisecond.
    let terms: Vec<String> = (0..1_000).map(|i| format!("metric = {i}")).collect();
    let costly = terms.join(" or ");
    let expected = "the query ran longer than 1ms (--query-timeout) and was stopped; narrow it";
    runtime.block_on(async {
        let mut client = Client::connect(vigil.tcp).await.unwrap();
        for hosts in (0..20_000).collect::<Vec<_>>().chunks(2_000) {
            let events: Vec<Event> = (hosts.iter())
                .map(|i| Event {
                    host: Some(format!("web{i}")),
                    service: Some("cpu".into()),
                    time: now,
                    ..Event::default()
                })
                .collect();
            client.send(&events).await.unwrap();
        }
        let stopped = client.query(&costly).await.unwrap_err().to_string();
        assert_eq!(stopped, format!("server error: {expected}"));
        let one = r#"host = "web7" and service = "cpu""#;
        assert_eq!(client.query(one).await.unwrap().len(), 1);
    });
    let http = vigil.http.unwrap();
    let (status, body) = runtime.block_on(async {
        let url = format!("http://{http}/index");
        let response = (reqwest::Client::new().get(url))
            .query(&[("query", &costly)])
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    });
    assert_eq!(status, 503, "{body}");
    assert_eq!(body, serde_json::json!({ "error": expected }).to_string());
    let metrics = runtime.block_on(common::metrics_text(http));
    for line in [
        "vigil_queries_total 3",
        "vigil_query_errors_total 2",
        "vigil_index_scans_timed_out_total 2",
        "vigil_index_scans_abandoned_total 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
}

/// The warning of a listener at its limit says which peer it refused.
#[test]
fn the_connection_limit_warning_names_the_refused_peer() {
    let vigil = common::Vigil::start(&["--max-connections", "1"]);
    // Admitted for sure once it has had an answer.
    let mut held = raw(vigil.tcp);
    held.write_all(&frame(&events_msg(vec![pb_event("web1", "cpu")])))
        .unwrap();
    assert_eq!(read_reply(&mut held).ok, Some(true));

    let mut refused = raw(vigil.tcp);
    let at = refused.local_addr().unwrap().to_string();
    assert_eq!(refused.read(&mut [0; 1]).unwrap(), 0, "closed at once");
    let warning = common::wait_until(Duration::from_secs(10), || {
        let logs = vigil.logs();
        let line = logs
            .lines()
            .find(|l| l.contains("Connection limit reached"))?;
        Some(serde_json::from_str::<serde_json::Value>(line).unwrap())
    })
    .expect("a refusal warning");
    assert_eq!(warning["fields"]["listener"], "riemann");
    assert_eq!(warning["fields"]["peer"].as_str(), Some(at.as_str()));
}
