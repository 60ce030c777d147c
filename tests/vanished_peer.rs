//! Peers that vanish without closing (host down, link cut) answer nothing,
//! not even with TCP acknowledgements. This test makes such peers in a
//! network namespace of its own: they sit on 127.0.0.2, and once their
//! connections are up an nftables rule drops every packet to and from there,
//! as the network does for a host that went away.
//! vigil must give up on them soon after twice its write timeout without an
//! acknowledgement (graphite's `TCP_USER_TIMEOUT`, the HTTP listeners' own
//! watch of `TCP_INFO`), where the kernel alone would retransmit to them for
//! about 15 minutes:
//! - the graphite output's carbon: a few points a second never fill the
//!   send buffer, so no write ever stalls;
//! - an SSE subscriber whose query matches nothing: its keep-alives never
//!   stall either;
//! - a Riemann agent keeping its connection open while idle, which vigil
//!   keeps open as Riemann does: TCP keepalive probes find it gone.
//!
//! Once carbon is back, every point reaches it: those its TCP had not
//! acknowledged when it vanished are sent again.
//!
//! `harness = false`: `main` enters the namespace before any thread starts,
//! so every thread and child (vigil too) lives in it. Needs root or
//! unprivileged user namespaces, iproute2's `ip` and nftables' `nft`.

mod common;

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::{Vigil, find_program, metrics_text, require_peer, run_ok};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use vigil::client::Client;
use vigil::clock::{Clock, SystemClock};
use vigil::event::{Event, Metric};

/// Where the vanishing peers live.
const VANISHING: &str = "127.0.0.2";
/// Twice vigil's graphite write timeout (10 s) is 20 s; twice the
/// `--read-timeout` below plus SSE's 15 s keep-alive interval is 19 s.
const GIVE_UP_WITHIN: Duration = Duration::from_secs(60);

fn main() {
    enter_network_namespace();
    ip(&["link", "set", "lo", "up"]);
    let started = Instant::now();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(a_vanished_carbon_and_subscriber_are_given_up_on_and_no_point_is_lost());
    println!("test a_vanished_carbon_and_subscriber_are_given_up_on_and_no_point_is_lost ... ok");
    // libtest's summary line, which scripts/test adds up; a failure panics
    // before it, and the non-zero exit fails the run.
    println!(
        "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
        started.elapsed().as_secs_f64()
    );
}

fn enter_network_namespace() {
    // SAFETY: plain syscalls; no other thread exists yet, as a new user
    // namespace requires.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) == 0 {
            return;
        }
        // Not root: in a new user namespace this process is, for its
        // network namespace and for the `ip` commands it runs.
        let (uid, gid) = (libc::getuid(), libc::getgid());
        if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
            panic!(
                "cannot make a network namespace (needs root or unprivileged user namespaces): {}",
                io::Error::last_os_error()
            );
        }
        std::fs::write("/proc/self/setgroups", "deny").unwrap();
        std::fs::write("/proc/self/uid_map", format!("0 {uid} 1")).unwrap();
        std::fs::write("/proc/self/gid_map", format!("0 {gid} 1")).unwrap();
    }
}

fn ip(args: &[&str]) {
    run_ok(require_peer("ip"), args, Duration::from_secs(10));
}

fn nft(args: &[&str]) {
    // In /usr/sbin, which a user's PATH may lack.
    let nft = find_program("nft").unwrap_or_else(|| require_peer("/usr/sbin/nft"));
    run_ok(nft, args, Duration::from_secs(10));
}

/// From now on nothing sent to [`VANISHING`] arrives, and nothing comes
/// from it.
fn vanish() {
    nft(&["add", "table", "ip", "vanished"]);
    for (chain, hook, direction) in [("in", "input", "daddr"), ("out", "output", "saddr")] {
        let spec = format!("{{ type filter hook {hook} priority 0; }}");
        nft(&["add", "chain", "ip", "vanished", chain, &spec]);
        nft(&[
            "add", "rule", "ip", "vanished", chain, "ip", direction, VANISHING, "drop",
        ]);
    }
}

/// [`VANISHING`] is reachable again.
fn come_back() {
    nft(&["delete", "table", "ip", "vanished"]);
}

async fn a_vanished_carbon_and_subscriber_are_given_up_on_and_no_point_is_lost() {
    let carbon = TcpListener::bind((VANISHING, 0)).await.unwrap();
    let rules = tempfile::NamedTempFile::new().unwrap();
    let port = carbon.local_addr().unwrap().port();
    std::fs::write(
        rules.path(),
        format!(
            "output graph = graphite(host: \"{VANISHING}\", port: {port})\nstreams {{ graph }}\n"
        ),
    )
    .unwrap();
    let vigil = Vigil::start(&[
        "--rules",
        rules.path().to_str().unwrap(),
        "--read-timeout",
        "2s",
    ]);
    let http = vigil.http.expect("HTTP listener");

    // A point every 100 ms until carbon is back; `last_acked` is the
    // newest one vigil took.
    let tcp = vigil.tcp;
    let last_acked = Arc::new(AtomicI64::new(-1));
    let acked = Arc::clone(&last_acked);
    let sender = tokio::spawn(async move {
        let mut client = Client::connect(tcp).await.unwrap();
        for i in 0.. {
            let event = Event {
                host: Some("web1".to_owned()),
                service: Some("load".to_owned()),
                metric: Some(Metric::Int(i)),
                time: SystemClock.now(),
                ..Event::default()
            };
            client.send(&[event]).await.expect("acked");
            acked.store(i, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (mut from_vigil, _) = carbon.accept().await.unwrap();
    let mut lines = Vec::new();
    while lines.iter().filter(|&&b| b == b'\n').count() < 3 {
        assert_ne!(from_vigil.read_buf(&mut lines).await.unwrap(), 0);
    }

    let _subscriber = subscribe_sse(http).await;
    assert_eq!(gauge(http, "vigil_subscribers").await, 1.0);
    let _agent = idle_agent(tcp).await;
    let agents = || gauge(http, "vigil_tcp_connections_open");
    assert_eq!(agents().await, 2.0, "the sender and the idle agent");
    let retries = || gauge(http, "vigil_output_retries_total");
    assert_eq!(retries().await, 0.0, "carbon is up");

    vanish();
    let vanished = Instant::now();
    let (mut carbon_given_up, mut subscriber_given_up) = (None, None);
    let mut agent_given_up = None;
    while carbon_given_up.is_none() || subscriber_given_up.is_none() || agent_given_up.is_none() {
        assert!(
            vanished.elapsed() < GIVE_UP_WITHIN,
            "still holding on after {GIVE_UP_WITHIN:?}: carbon given up {carbon_given_up:?}, \
             subscriber {subscriber_given_up:?}, agent {agent_given_up:?}\n{}",
            vigil.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        if carbon_given_up.is_none() && retries().await >= 1.0 {
            carbon_given_up = Some(vanished.elapsed());
        }
        if subscriber_given_up.is_none() && gauge(http, "vigil_subscribers").await == 0.0 {
            subscriber_given_up = Some(vanished.elapsed());
        }
        if agent_given_up.is_none() && agents().await == 1.0 {
            agent_given_up = Some(vanished.elapsed());
        }
    }
    println!(
        "carbon given up after {carbon_given_up:?}, the subscriber after \
         {subscriber_given_up:?}, the idle agent after {agent_given_up:?}"
    );
    assert_eq!(
        gauge(http, "vigil_tcp_read_timeouts_total").await,
        0.0,
        "idle, not timed out"
    );
    // The kernel ended both, as it does for a host gone away.
    assert_eq!(gauge(http, "vigil_http_peers_vanished_total").await, 1.0);
    assert_eq!(gauge(http, "vigil_http_write_timeouts_total").await, 0.0);
    let logs = vigil.logs();
    assert!(
        logs.contains("Carbon unreachable") && logs.contains("Connection timed out"),
        "{logs}"
    );

    // What the first connection brought before carbon vanished.
    while let Ok(read) =
        tokio::time::timeout(Duration::from_millis(500), from_vigil.read_buf(&mut lines)).await
    {
        assert_ne!(read.unwrap(), 0, "vigil closed the first connection");
    }
    come_back();
    let (mut again, _) = tokio::time::timeout(GIVE_UP_WITHIN, carbon.accept())
        .await
        .expect("vigil reconnects to carbon once it is back")
        .unwrap();
    sender.abort();
    let _ = sender.await;
    let last = last_acked.load(Ordering::Acquire);
    let mut received = values(&lines);
    let mut more = Vec::new();
    while !received.contains(&last) {
        let read = tokio::time::timeout(GIVE_UP_WITHIN, again.read_buf(&mut more))
            .await
            .unwrap_or_else(|_| panic!("point {last} never came; got {received:?}"));
        assert_ne!(read.unwrap(), 0, "vigil closed the second connection");
        let complete = more.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        received.extend(values(&more[..complete]));
        more.drain(..complete);
    }
    let missing: Vec<i64> = (0..=last).filter(|i| !received.contains(i)).collect();
    assert!(missing.is_empty(), "lost points {missing:?} of 0..={last}");
    assert_eq!(gauge(http, "vigil_output_dropped_total").await, 0.0);
    println!("all {} points reached carbon", last + 1);
}

/// The values of carbon plaintext lines (`path value timestamp`).
fn values(lines: &[u8]) -> BTreeSet<i64> {
    String::from_utf8_lossy(lines)
        .lines()
        .map(|line| {
            let value = line.split(' ').nth(1);
            value
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("line {line:?}"))
        })
        .collect()
}

/// A connection to `to` from [`VANISHING`].
async fn from_vanishing(to: SocketAddr) -> tokio::net::TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{VANISHING}:0").parse().unwrap())
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// A Riemann connection from [`VANISHING`] that sent one event and is idle.
async fn idle_agent(tcp: SocketAddr) -> tokio::net::TcpStream {
    let mut stream = from_vanishing(tcp).await;
    let msg = vigil::proto::Msg {
        // A point carbon takes (one without a metric would count as
        // dropped), of a value the sender never sends.
        events: vec![vigil::proto::to_pb(&Event {
            host: Some("agent".to_owned()),
            metric: Some(Metric::Int(-1)),
            time: SystemClock.now(),
            ..Event::default()
        })],
        ..vigil::proto::Msg::default()
    };
    let body = prost::Message::encode_to_vec(&msg);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend(body);
    stream.write_all(&frame).await.unwrap();
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).await.unwrap();
    let len = u32::from_be_bytes(reply) as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.unwrap();
    stream
}

/// An SSE subscription from [`VANISHING`], its response head read.
async fn subscribe_sse(http: SocketAddr) -> tokio::net::TcpStream {
    let mut stream = from_vanishing(http).await;
    // A query nothing matches: only keep-alives will flow.
    let request = "GET /index?query=service%20%3D%20%22nothing%22 HTTP/1.1\r\n\
                   Host: vigil\r\nAccept: text/event-stream\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        assert_ne!(stream.read_buf(&mut head).await.unwrap(), 0);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    stream
}

/// One sample of `/metrics` (the graphite output's for output metrics).
async fn gauge(http: SocketAddr, name: &str) -> f64 {
    let text = metrics_text(http).await;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}
