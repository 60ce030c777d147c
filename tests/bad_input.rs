//! Hostile and malformed input, in-process over real sockets: each test checks
//! that the right counter moved and that a fresh client is still served right
//! after. (SIGHUP with a syntax error in the rule file: `tests/reload.rs`.)
//!
//! File descriptors: the idle-connection test holds 2 000 connections, both
//! ends in this process (~4 000 fds). It raises the soft `RLIMIT_NOFILE` to
//! the hard limit when needed and, should even that be too low, uses as many
//! connections as fit (printed).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

use vigil::client::Client;
use vigil::clock::{MICROS_PER_SEC, ManualClock, SharedClock};
use vigil::event::{Event, Metric};
use vigil::index::{Index, IndexConfig};
use vigil::limits::Limits;
use vigil::outputs::{self, Kept, OutputSink, Queue};
use vigil::proto::{Attribute, Msg, PbEvent, PbQuery};
use vigil::rules::engine::Rules;
use vigil::rules::{self, EnvPolicy};
use vigil::server::ServerConfig;
use vigil::streams::{IndexEverything, Streams};

use common::inproc::{Harness, T0, WAIT, frame, noise, wait_until};

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connects")
}

/// Reads one reply frame; panics after [`WAIT`] or on EOF.
async fn read_reply(stream: &mut TcpStream) -> Msg {
    tokio::time::timeout(WAIT, async {
        let len = stream.read_u32().await.expect("reply length");
        let mut body = vec![0u8; len as usize];
        stream.read_exact(&mut body).await.expect("reply body");
        Msg::decode(body.as_slice()).expect("reply decodes")
    })
    .await
    .expect("reply in time")
}

/// Writes one frame and reads its reply.
async fn exchange(stream: &mut TcpStream, body: &[u8]) -> Msg {
    stream.write_all(&frame(body)).await.unwrap();
    read_reply(stream).await
}

/// Resolves once the server closes the connection (EOF or reset), after
/// discarding whatever it sent first; panics after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) {
    let mut sink = [0u8; 4096];
    let closed = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    closed.await.expect("the server closes the connection");
}

fn events_msg(events: Vec<PbEvent>) -> Vec<u8> {
    Msg {
        events,
        ..Msg::default()
    }
    .encode_to_vec()
}

fn query_msg(query: &str) -> Vec<u8> {
    Msg {
        query: Some(PbQuery {
            string: Some(query.into()),
        }),
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

fn error_of(reply: &Msg) -> &str {
    assert_eq!(reply.ok, Some(false), "an error reply: {reply:?}");
    reply.error.as_deref().expect("an error message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_length_prefix_gets_an_error_and_a_close() {
    let h = Harness::start(ServerConfig {
        max_frame: 1024,
        ..ServerConfig::default()
    })
    .await;
    let mut s = connect(h.addr()).await;
    // Claims 4 GiB; only the prefix is ever sent, so nothing may be allocated for it.
    s.write_all(&[0xff; 4]).await.unwrap();
    let reply = read_reply(&mut s).await;
    assert!(error_of(&reply).contains("maximum size of 1024 bytes"));
    closed_within(&mut s, WAIT).await;
    assert_eq!(h.count(|s| &s.frames_oversized), 1);
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_length_prefix_is_an_empty_msg_and_is_acked() {
    let h = Harness::start(ServerConfig::default()).await;
    let mut s = connect(h.addr()).await;
    let reply = exchange(&mut s, &[]).await;
    assert_eq!(reply.ok, Some(true));
    assert_eq!(h.count(|s| &s.tcp_messages), 1);
    // The same connection goes on.
    let reply = exchange(&mut s, &events_msg(vec![pb_event("after", "empty")])).await;
    assert_eq!(reply.ok, Some(true));
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_frame_then_close_is_counted() {
    let h = Harness::start(ServerConfig::default()).await;
    let mut s = connect(h.addr()).await;
    // Promises 100 bytes, sends 10, hangs up.
    s.write_all(&[0, 0, 0, 100]).await.unwrap();
    s.write_all(&[0x32; 10]).await.unwrap();
    drop(s);
    h.wait_count(|s| &s.frames_truncated, 1).await;
    assert_eq!(h.count(|s| &s.tcp_messages), 0);
    h.assert_serves().await;
}

/// The frames before a truncated one were handled: their replies reach a
/// client that half-closed and still reads. The query scans a large index;
/// the rest is sent meanwhile, so the event frame, the half frame and the
/// end of the stream are all read together, after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_before_a_truncated_one_are_all_answered() {
    let h = Harness::start(ServerConfig::default()).await;
    for i in 0..200_000 {
        h.index.insert(&Event {
            host: Some(format!("host-{i}")),
            service: Some("s".to_owned()),
            time: T0,
            ttl: Some(600.0),
            ..Event::default()
        });
    }
    let mut s = connect(h.addr()).await;
    s.write_all(&frame(&query_msg(r#"service = "none""#)))
        .await
        .unwrap();
    h.wait_count(|s| &s.tcp_messages, 1).await;
    let mut bytes = frame(&events_msg(vec![pb_event("h", "s")]));
    // Half a length prefix, then the end of the stream.
    bytes.extend_from_slice(&[0, 0]);
    s.write_all(&bytes).await.unwrap();
    s.shutdown().await.unwrap();
    let mut replies = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut replies))
        .await
        .expect("closed by the server")
        .unwrap();
    let mut expected = frame(
        &Msg {
            ok: Some(true),
            ..Msg::default()
        }
        .encode_to_vec(),
    );
    expected.extend(frame(vigil::proto::ACK_BODY));
    assert_eq!(
        replies, expected,
        "the query's answer, the event's ack, then the close"
    );
    h.wait_count(|s| &s.frames_truncated, 1).await;
    assert!(h.index.get("h", "s").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_are_refused_and_counted() {
    let h = Harness::start(ServerConfig {
        max_frame: 64 * 1024,
        ..ServerConfig::default()
    })
    .await;
    let mut s = connect(h.addr()).await;
    // Noise as a length prefix too: most likely far over the frame limit.
    s.write_all(&noise(8192)).await.unwrap();
    closed_within(&mut s, WAIT).await;
    let refused = |h: &Harness| {
        h.count(|s| &s.frames_oversized)
            + h.count(|s| &s.decode_errors)
            + h.count(|s| &s.frames_truncated)
    };
    assert!(refused(&h) >= 1, "{:?}", h.server.stats.snapshot());
    assert!(h.index.is_empty(), "nothing from the noise was indexed");
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_protobuf_in_a_valid_frame_gets_an_error_and_the_connection_goes_on() {
    let h = Harness::start(ServerConfig::default()).await;
    let mut s = connect(h.addr()).await;
    let reply = exchange(&mut s, &noise(300)).await;
    assert!(error_of(&reply).starts_with("invalid message"));
    assert_eq!(h.count(|s| &s.decode_errors), 1);
    let reply = exchange(&mut s, &events_msg(vec![pb_event("after", "garbage")])).await;
    assert_eq!(reply.ok, Some(true));
    h.assert_serves().await;
}

/// A string that is not UTF-8 (collectd's `write_riemann` sends some) is
/// taken with its invalid bytes as `?`, as Riemann takes it: the other
/// events of its `Msg` are not lost with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_is_repaired_and_its_message_kept() {
    let h = Harness::start(ServerConfig::default()).await;
    let mut s = connect(h.addr()).await;
    let mut bad = pb_event("utf8", "bad-");
    bad.tags = vec!["fine".into()];
    let mut body = events_msg(vec![
        pb_event("utf8", "good-1"),
        bad,
        pb_event("utf8", "good-2"),
    ]);
    // The service "bad-" is followed in the frame by the tag's field key:
    // make the service's last byte invalid (its length stays).
    let at = body.windows(4).position(|w| w == b"bad-").unwrap() + 3;
    body[at] = 0xff;
    let reply = exchange(&mut s, &body).await;
    assert_eq!(reply.ok, Some(true), "{:?}", reply.error);
    for service in ["good-1", "bad?", "good-2"] {
        assert!(h.index.get("utf8", service).is_some(), "{service} indexed");
    }
    assert_eq!(h.count(|s| &s.strings_repaired), 1);
    assert_eq!(h.count(|s| &s.decode_errors), 0);
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_and_infinite_metrics_are_stored_queryable_and_json_null() {
    let h = Harness::start(ServerConfig::default()).await;
    let mut s = connect(h.addr()).await;
    let metrics = [
        ("nan", f64::NAN),
        ("inf", f64::INFINITY),
        ("-inf", f64::NEG_INFINITY),
    ];
    let events = metrics
        .iter()
        .map(|(service, m)| PbEvent {
            metric_d: Some(*m),
            ..pb_event("odd", service)
        })
        .collect();
    assert_eq!(exchange(&mut s, &events_msg(events)).await.ok, Some(true));

    let mut client = Client::connect(h.addr()).await.unwrap();
    let found = client.query(r#"host = "odd""#).await.unwrap();
    assert_eq!(found.len(), 3);
    for (service, m) in metrics {
        let e = found.iter().find(|e| e.service_str() == service).unwrap();
        match e.metric {
            Some(Metric::Float(f)) => assert!(f.is_nan() == m.is_nan() && (m.is_nan() || f == m)),
            other => panic!("{service}: metric {other:?}"),
        }
        assert_eq!(vigil::json::to_json(e)["metric"], serde_json::Value::Null);
    }
    // Comparisons against them answer (NaN matches nothing), without error.
    let big = client
        .query(r#"host = "odd" and metric > 0"#)
        .await
        .unwrap();
    assert_eq!(big.len(), 1, "only +inf is > 0: {big:?}");
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_nan_and_huge_ttls_never_break_expiry() {
    let h = Harness::start(ServerConfig::default()).await;
    let mut s = connect(h.addr()).await;
    let ttls = [
        ("negative", -5.0),
        ("nan", f32::NAN),
        ("huge", f32::MAX),
        ("infinite", f32::INFINITY),
    ];
    let events = ttls
        .iter()
        .map(|(service, ttl)| PbEvent {
            time: Some(T0 / MICROS_PER_SEC),
            ttl: Some(*ttl),
            ..pb_event("ttl", service)
        })
        .collect();
    assert_eq!(exchange(&mut s, &events_msg(events)).await.ok, Some(true));
    h.clock.advance(MICROS_PER_SEC);
    // The negative TTL is already over; NaN falls back to the default (60 s).
    wait_until(
        || h.index.get("ttl", "negative").is_none(),
        || "the negative TTL not expired".into(),
    )
    .await;
    for service in ["nan", "huge", "infinite"] {
        assert!(h.index.get("ttl", service).is_some(), "{service} kept");
    }
    h.clock.advance(61 * MICROS_PER_SEC);
    wait_until(
        || h.index.get("ttl", "nan").is_none(),
        || "the NaN TTL not expired by the default".into(),
    )
    .await;
    assert!(h.index.get("ttl", "huge").is_some());
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_tags_are_refused_by_the_default_limit_and_the_msg_is_atomic() {
    let h = Harness::start(ServerConfig::default()).await;
    let mut tagged = pb_event("many", "tags");
    tagged.tags = (0..100_000).map(|i| format!("t{i}")).collect();
    // The good event before it is refused with it: the Msg is all or nothing.
    let body = events_msg(vec![pb_event("many", "fine"), tagged]);
    let mut s = connect(h.addr()).await;
    let reply = exchange(&mut s, &body).await;
    let max = Limits::DEFAULT.max_tags;
    assert_eq!(
        error_of(&reply),
        format!("event 1: 100000 tags exceeds --max-tags {max}")
    );
    assert_eq!(h.count(|s| &s.msgs_over_max_tags), 1);
    assert!(h.index.is_empty());
    assert_eq!(h.count(|s| &s.tcp_events), 0);
    // The connection stays usable.
    let reply = exchange(&mut s, &events_msg(vec![pb_event("many", "later")])).await;
    assert_eq!(reply.ok, Some(true));
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_megabyte_description_is_refused_by_max_string() {
    let h = Harness::start(ServerConfig::default()).await;
    let mut long = pb_event("long", "description");
    long.description = Some("d".repeat(10 * 1024 * 1024));
    let mut s = connect(h.addr()).await;
    let reply = exchange(&mut s, &events_msg(vec![long])).await;
    let max = Limits::DEFAULT.max_string;
    assert_eq!(
        error_of(&reply),
        format!("event 0: description of 10485760 bytes exceeds --max-string {max}")
    );
    assert_eq!(h.count(|s| &s.msgs_over_max_string), 1);
    assert!(h.index.is_empty());
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_events_or_attributes_are_refused_by_their_limits() {
    let h = Harness::start(ServerConfig {
        limits: Limits {
            max_events: 100,
            max_attributes: 10,
            ..Limits::DEFAULT
        },
        ..ServerConfig::default()
    })
    .await;
    let mut s = connect(h.addr()).await;
    let many = (0..101).map(|i| pb_event("n", &i.to_string())).collect();
    let reply = exchange(&mut s, &events_msg(many)).await;
    assert_eq!(
        error_of(&reply),
        "101 events exceeds --max-events-per-msg 100"
    );
    let mut attributed = pb_event("n", "attributes");
    attributed.attributes = (0..11)
        .map(|i| Attribute {
            key: format!("k{i}"),
            value: Some("v".into()),
        })
        .collect();
    let reply = exchange(&mut s, &events_msg(vec![attributed])).await;
    assert_eq!(
        error_of(&reply),
        "event 0: 11 attributes exceeds --max-attributes 10"
    );
    assert_eq!(h.count(|s| &s.msgs_over_max_events), 1);
    assert_eq!(h.count(|s| &s.msgs_over_max_attributes), 1);
    assert!(h.index.is_empty());
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_in_one_msg_are_all_indexed() {
    let h = Harness::start(ServerConfig::default()).await;
    let events = (0..10_000)
        .map(|i| pb_event("bulk", &i.to_string()))
        .collect();
    let mut s = connect(h.addr()).await;
    let reply = exchange(&mut s, &events_msg(events)).await;
    assert_eq!(reply.ok, Some(true));
    assert_eq!(h.index.len(), 10_000);
    assert_eq!(h.count(|s| &s.tcp_events), 10_000);
    h.assert_serves().await;
}

/// Raises the soft fd limit towards `wanted`; returns the limit now in force.
fn raise_fd_limit(wanted: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
    limit.rlim_cur
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_are_held_and_a_fresh_client_is_served() {
    const WANTED: usize = 2_000;
    // Both ends of each connection live in this process, plus some headroom.
    let limit = raise_fd_limit(2 * WANTED as u64 + 256);
    let n = WANTED.min((limit as usize).saturating_sub(256) / 2);
    if n < WANTED {
        eprintln!("fd limit {limit}: holding {n} connections instead of {WANTED}");
    }
    let h = Harness::start(ServerConfig::default()).await;
    let before = resident_bytes();
    let mut idle = Vec::with_capacity(n);
    for _ in 0..n {
        idle.push(connect(h.addr()).await);
    }
    h.wait_count(|s| &s.tcp_connections_open, n as u64).await;
    h.assert_serves().await;
    let grown = resident_bytes().saturating_sub(before);
    assert!(
        grown < 256 * 1024 * 1024,
        "{n} idle connections grew the process by {grown} bytes"
    );
    assert_eq!(h.count(|s| &s.tcp_connections_refused), 0);
    drop(idle);
    h.wait_count(|s| &s.tcp_connections_open, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_connections_are_closed_at_once_and_counted() {
    let h = Harness::start(ServerConfig {
        max_connections: 100,
        ..ServerConfig::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(connect(h.addr()).await);
    }
    h.wait_count(|s| &s.tcp_connections_open, 100).await;
    // The kernel completes the handshake; vigil accepts, then closes at once.
    let mut refused = connect(h.addr()).await;
    closed_within(&mut refused, WAIT).await;
    assert_eq!(h.count(|s| &s.tcp_connections_refused), 1);
    // The held ones still work.
    let reply = exchange(&mut held[0], &events_msg(vec![pb_event("held", "0")])).await;
    assert_eq!(reply.ok, Some(true));
    // A slot freed is a slot for a fresh client.
    held.pop();
    h.wait_count(|s| &s.tcp_connections_open, 99).await;
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_closed_after_the_read_timeout_while_steady_and_idle_ones_stay() {
    let timeout = Duration::from_secs(2);
    let h = Harness::start(ServerConfig {
        read_timeout: timeout,
        ..ServerConfig::default()
    })
    .await;
    let started = Instant::now();
    // One byte per second of a 100-byte frame: it would take 104 s to complete.
    let mut slow = connect(h.addr()).await;
    let slowloris = async {
        let mut bytes = [0u8, 0, 0, 100].into_iter().chain(std::iter::repeat(0x32));
        loop {
            if slow.write_all(&[bytes.next().unwrap()]).await.is_err() {
                return;
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return,
                Ok(Ok(_)) => panic!("no reply to an incomplete frame"),
                Err(_) => assert!(started.elapsed() < WAIT, "slowloris still connected"),
            }
        }
    };
    // Sends a frame, then nothing: kept, as Riemann keeps it.
    let mut idle = connect(h.addr()).await;
    let first = exchange(&mut idle, &events_msg(vec![pb_event("idle", "first")])).await;
    assert_eq!(first.ok, Some(true));
    // A complete frame every 500 ms for 3 s: longer than the timeout, never idle that long.
    let mut steady = connect(h.addr()).await;
    let steady_client = async {
        for i in 0..6 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let reply = exchange(
                &mut steady,
                &events_msg(vec![pb_event("steady", &i.to_string())]),
            )
            .await;
            assert_eq!(reply.ok, Some(true), "frame {i} answered");
        }
    };
    tokio::join!(slowloris, steady_client);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(3),
        "the steady client ran its course"
    );
    // Checked every timeout, a begun frame is closed at the second check.
    assert!(
        elapsed < Duration::from_secs(6),
        "slowloris closed in {elapsed:?}"
    );
    assert_eq!(h.count(|s| &s.tcp_read_timeouts), 1, "the slowloris");
    // The steady and the idle one: the slowloris's connection is counted
    // closed just after its socket is.
    h.wait_count(|s| &s.tcp_connections_open, 2).await;
    let later = exchange(&mut idle, &events_msg(vec![pb_event("idle", "later")])).await;
    assert_eq!(
        later.ok,
        Some(true),
        "idle for over the timeout, still served"
    );
    h.assert_serves().await;
}

/// A server with a 1 s read timeout holding 2 000 events of 4 KiB, so
/// that each `true` query answers ~8 MB, more than the socket buffers
/// hold; and the connection that sent them.
async fn holding_big_answers() -> (Harness, TcpStream) {
    let h = Harness::start(ServerConfig {
        read_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    })
    .await;
    let events = (0..2_000)
        .map(|i| PbEvent {
            description: Some("x".repeat(4096)),
            ..pb_event("big", &i.to_string())
        })
        .collect();
    let mut s = connect(h.addr()).await;
    assert_eq!(exchange(&mut s, &events_msg(events)).await.ok, Some(true));
    (h, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_is_closed_after_the_timeout() {
    let (h, mut s) = holding_big_answers().await;
    // Ten pipelined queries, never read: far more than the socket buffers hold.
    let queries: Vec<u8> = (0..10).flat_map(|_| frame(&query_msg("true"))).collect();
    s.write_all(&queries).await.unwrap();
    h.wait_count(|s| &s.tcp_write_timeouts, 1).await;
    h.wait_count(|s| &s.tcp_connections_open, 0).await;
    h.assert_serves().await;
}

/// One connection's pipelined queries, each answered with up to
/// `--max-query-results` events, must not all be answered (and held) before
/// the first answer is written: 16 pipelined `true` queries over 100 000
/// events took one server to 1.7 GB. Not read within the timeout, the
/// connection closes then, its answer's room back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_query_answers_are_written_one_at_a_time_to_a_client_reading_none() {
    let (h, mut s) = holding_big_answers().await;
    let queries: Vec<u8> = (0..4).flat_map(|_| frame(&query_msg("true"))).collect();
    s.write_all(&queries).await.unwrap();
    h.wait_count(|s| &s.tcp_write_timeouts, 1).await;
    h.wait_count(|s| &s.tcp_connections_open, 0).await;
    assert_eq!(
        h.count(|s| &s.queries),
        1,
        "the first answer, unread, held back the other queries"
    );
    // Closed at the first timeout: the unwritten answer was not written
    // again, waiting out a second one with its room held.
    assert_eq!(h.count(|s| &s.tcp_write_timeouts), 1, "one timeout");
    assert_eq!(h.count(|s| &s.answer_bytes_held), 0, "its room is back");
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_garbage_oversized_and_over_limit_datagrams_are_counted() {
    let h = Harness::start(ServerConfig {
        max_datagram: 1024,
        limits: Limits {
            max_tags: 10,
            ..Limits::DEFAULT
        },
        ..ServerConfig::default()
    })
    .await;
    let udp = h.server.udp_addr;
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&noise(100), udp).await.unwrap();
    s.send_to(&[0u8; 4096], udp).await.unwrap();
    let mut tagged = pb_event("u", "tagged");
    tagged.tags = (0..11).map(|i| i.to_string()).collect();
    s.send_to(&events_msg(vec![tagged]), udp).await.unwrap();
    s.send_to(&events_msg(vec![pb_event("u", "dp")]), udp)
        .await
        .unwrap();
    // Datagrams are counted as they are read, before they are decoded: wait
    // for what decoding counts.
    h.wait_count(|s| &s.decode_errors, 1).await;
    h.wait_count(|s| &s.msgs_over_max_tags, 1).await;
    h.wait_count(|s| &s.udp_events, 1).await;
    assert_eq!(h.count(|s| &s.udp_datagrams), 4);
    assert_eq!(h.count(|s| &s.udp_oversized), 1);
    // Indexed once the rest of its batch is decoded too.
    wait_until(
        || h.index.get("u", "dp").is_some(),
        || "u/dp not indexed".into(),
    )
    .await;
    assert!(h.index.get("u", "tagged").is_none());
    h.assert_serves().await;
}

/// The pipeline at a millisecond per batch: a UDP burst outruns it.
struct Slow(IndexEverything);

impl Streams for Slow {
    fn process(&self, events: &[Event]) {
        std::thread::sleep(Duration::from_millis(1));
        self.0.process(events);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_datagrams_a_burst_overflows_are_counted_as_dropped() {
    let index = Arc::new(Index::new(IndexConfig::default()));
    let slow = Arc::new(Slow(IndexEverything::new(index.clone())));
    let h = Harness::with_streams(ServerConfig::default(), index, slow).await;
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(h.server.udp_addr).await.unwrap();
    let sent = 3_000;
    let datagram = events_msg(vec![pb_event("burst", "udp")]);
    for _ in 0..sent {
        s.send(&datagram).await.unwrap();
    }
    // Each one was either read (and counted) or dropped by the kernel (and
    // counted once vigil next reads the kernel's count).
    let accounted = || h.count(|s| &s.udp_datagrams) + h.count(|s| &s.udp_receive_drops);
    wait_until(
        || accounted() == sent,
        || format!("{} of {sent} datagrams accounted for", accounted()),
    )
    .await;
    assert!(h.count(|s| &s.udp_receive_drops) > 0);
    assert!(h.index.get("burst", "udp").is_some());
}

/// Indexes everything and records each batch's size; the first batch is
/// held for a while, so what is sent meanwhile queues on the socket.
struct HoldFirst {
    inner: IndexEverything,
    batches: parking_lot::Mutex<Vec<usize>>,
    holding: tokio::sync::Notify,
}

impl Streams for HoldFirst {
    fn process(&self, events: &[Event]) {
        let first = {
            let mut batches = self.batches.lock();
            batches.push(events.len());
            batches.len() == 1
        };
        if first {
            self.holding.notify_one();
            std::thread::sleep(Duration::from_millis(200));
        }
        self.inner.process(events);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_datagrams_queued_together_are_one_batch_and_a_bad_one_costs_only_itself() {
    let index = Arc::new(Index::new(IndexConfig::default()));
    let streams = Arc::new(HoldFirst {
        inner: IndexEverything::new(index.clone()),
        batches: Default::default(),
        holding: Default::default(),
    });
    let config = ServerConfig {
        max_datagram: 1024,
        limits: Limits {
            max_tags: 10,
            ..Limits::DEFAULT
        },
        ..ServerConfig::default()
    };
    let h = Harness::with_streams(config, index, streams.clone()).await;
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(h.server.udp_addr).await.unwrap();
    s.send(&events_msg(vec![pb_event("q", "first")]))
        .await
        .unwrap();
    streams.holding.notified().await;
    let mut tagged = pb_event("q", "tagged");
    tagged.tags = (0..11).map(|i| i.to_string()).collect();
    for datagram in [
        noise(100),
        events_msg(vec![pb_event("q", "b")]),
        vec![0u8; 4096],
        events_msg(vec![pb_event("q", "c"), pb_event("q", "d")]),
        events_msg(vec![tagged]),
    ] {
        s.send(&datagram).await.unwrap();
    }
    wait_until(
        || h.index.get("q", "d").is_some(),
        || "the queued datagrams not indexed".into(),
    )
    .await;
    assert_eq!(*streams.batches.lock(), [1, 3], "b, c and d in one batch");
    assert_eq!(h.count(|s| &s.udp_events), 4);
    for service in ["first", "b", "c", "d"] {
        assert!(h.index.get("q", service).is_some(), "{service} indexed");
    }
    assert!(h.index.get("q", "tagged").is_none());
    assert_eq!(h.count(|s| &s.udp_datagrams), 6);
    assert_eq!(h.count(|s| &s.decode_errors), 1);
    assert_eq!(h.count(|s| &s.udp_oversized), 1);
    assert_eq!(h.count(|s| &s.msgs_over_max_tags), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_nested_ten_thousand_deep_gets_an_error_and_the_connection_goes_on() {
    let h = Harness::start(ServerConfig::default()).await;
    let mut s = connect(h.addr()).await;
    let deep = format!("{}true{}", "(".repeat(10_000), ")".repeat(10_000));
    let reply = exchange(&mut s, &query_msg(&deep)).await;
    assert!(
        error_of(&reply).contains("nested too deeply"),
        "{:?}",
        reply.error
    );
    assert_eq!(h.count(|s| &s.query_errors), 1);
    let reply = exchange(&mut s, &query_msg("true")).await;
    assert_eq!(reply.ok, Some(true));
    h.assert_serves().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catastrophic_backtracking_regex_answers_quickly() {
    let h = Harness::start(ServerConfig::default()).await;
    let mut s = connect(h.addr()).await;
    let evil = format!("{}b", "a".repeat(100_000));
    let events = vec![pb_event("re", &evil), pb_event("re", "aaaa")];
    assert_eq!(exchange(&mut s, &events_msg(events)).await.ok, Some(true));
    let started = Instant::now();
    let reply = exchange(&mut s, &query_msg(r#"host = "re" and service ~= "(a+)+$""#)).await;
    let took = started.elapsed();
    assert_eq!(reply.ok, Some(true));
    let services: Vec<_> = reply.events.iter().map(|e| e.service.as_deref()).collect();
    assert_eq!(services, [Some("aaaa")]);
    // A backtracking engine needs ~2^100000 steps; a linear one microseconds.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    h.assert_serves().await;
}

/// A port nothing listens on, held for as long as the socket lives: bound but
/// never listening, so connections to it are refused and no other socket (a
/// parallel test's listener, a connection's own source port) can take it.
fn dead_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// Carbon and PagerDuty down for 30 s while events keep coming: ingest must
/// keep acking every event within a second while both outputs retry behind
/// their bounded queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_keeps_acking_while_carbon_and_the_pager_are_down() {
    let ((_carbon, carbon_port), (_pager, pager_port)) = (dead_port(), dead_port());
    let source = format!(
        "output graph = graphite(host: \"127.0.0.1\", port: {carbon_port})\n\
         output pager = pagerduty(routing_key: \"k\", url: \"http://127.0.0.1:{pager_port}/v2/enqueue\")\n\
         streams {{\n  index\n  graph\n  pager\n}}\n"
    );
    let (_, compiled) = rules::load("down.vigil", &source, EnvPolicy::Strict).expect("compiles");
    let (stop, kept) = (CancellationToken::new(), Kept::default());
    let started: Vec<(Arc<Queue>, _)> = compiled
        .outputs
        .iter()
        .map(|spec| outputs::start(spec, &kept, stop.clone()))
        .collect();
    let queues: Vec<Arc<Queue>> = started.iter().map(|(q, _)| q.clone()).collect();
    let sinks = queues
        .iter()
        .map(|q| q.clone() as Arc<dyn OutputSink>)
        .collect();
    let index = Arc::new(Index::new(IndexConfig::default()));
    let clock: SharedClock = Arc::new(ManualClock::new(T0));
    let rules = Arc::new(Rules::new(
        compiled.roots,
        None,
        sinks,
        index.clone(),
        clock,
    ));
    let h = Harness::with_streams(ServerConfig::default(), index, rules).await;

    let mut client = Client::connect(h.addr()).await.unwrap();
    let outage = Instant::now();
    let mut sent = 0u64;
    while outage.elapsed() < Duration::from_secs(30) {
        let event = Event {
            host: Some("down".into()),
            service: Some(format!("svc {sent}")),
            state: Some("critical".into()),
            metric: Some(Metric::Float(1.0)),
            time: T0,
            ..Event::default()
        };
        let acked = tokio::time::timeout(Duration::from_secs(1), client.send(&[event])).await;
        acked.expect("acked within a second").expect("acked");
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.index.len() as u64, sent);
    for queue in &queues {
        let stats = &queue.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Acquire);
        assert_eq!(
            get(&stats.accepted),
            sent,
            "{}: every event handed over",
            queue.name
        );
        assert_eq!(
            get(&stats.delivered),
            0,
            "{}: nothing delivered",
            queue.name
        );
        assert!(
            get(&stats.retries) >= 2,
            "{}: retried: {stats:?}",
            queue.name
        );
    }
    stop.cancel();
    for (_, task) in started {
        task.abort();
    }
    h.assert_serves().await;
}

/// `vigil check` on rule files nested far past the 64-level cap: blocks, and
/// parentheses in a condition. A clean error, never a stack overflow.
#[test]
fn deeply_nested_rule_files_fail_vigil_check_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = format!(
        "streams {{\n{}index\n{}}}\n",
        "where true {\n".repeat(10_000),
        "}\n".repeat(10_000)
    );
    let parens = format!(
        "streams {{\n  where {}true{} {{ index }}\n}}\n",
        "(".repeat(10_000),
        ")".repeat(10_000)
    );
    for (name, text) in [("blocks", blocks), ("parens", parens)] {
        let path = dir.path().join(format!("{name}.vigil"));
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["check", path.to_str().unwrap()])
            .output()
            .expect("vigil check runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{name}: {stdout}");
        assert!(
            stdout.contains("nested too deeply (max 64)"),
            "{name}: {stdout}"
        );
    }
}
