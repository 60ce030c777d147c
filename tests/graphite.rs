//! `vigil run --graphite ADDR`: Graphite plaintext lines over real TCP and
//! UDP sockets reach the index (service = path, metric, time), bad lines are
//! counted on `/metrics` while the connection goes on, and the listener has
//! its own connection limit and read timeout.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::*;
use vigil::client::Client;
use vigil::event::{Event, Metric};

/// A Riemann client of `v`, kept for the whole test: one connecting per
/// query could find the last one's permit not back yet.
async fn riemann(v: &Vigil) -> Client {
    Client::connect(v.tcp).await.expect("connect")
}

/// The index's events matching `query`, over the Riemann protocol.
async fn query(client: &mut Client, query: &str) -> Vec<Event> {
    client.query(query).await.expect("query")
}

/// Polls until `query` matches `n` events; them, sorted by service.
async fn until_n(client: &mut Client, q: &str, n: usize) -> Vec<Event> {
    for _ in 0..200 {
        let mut found = query(client, q).await;
        if found.len() >= n {
            found.sort_by(|a, b| a.service.cmp(&b.service));
            return found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{q} never matched {n} events: {:?}", query(client, q).await);
}

fn graphite(v: &Vigil) -> SocketAddr {
    v.graphite
        .expect("the listening line names the graphite address")
}

fn point(e: &Event) -> (&str, Option<Metric>, i64, Option<&str>) {
    (
        e.service.as_deref().unwrap(),
        e.metric,
        e.time,
        e.host.as_deref(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn lines_over_tcp_and_udp_reach_the_index_and_bad_ones_are_counted() {
    let mut v = Vigil::start(&["--graphite", "127.0.0.1:0"]);
    let mut client = riemann(&v).await;
    let at = now_secs().floor() as i64;
    let mut tcp = TcpStream::connect(graphite(&v)).unwrap();
    let long = "x".repeat(20_000);
    let lines = format!(
        "servers.web1.cpu 42 {at}\n\
         servers.web1.load\t0.5  {at}.25\r\n\
         not a graphite line\n\
         servers.web1.unknown nan {at}\n\
         {long} 1 {at}\n\
         servers.web1.after -3 {at}\n"
    );
    tcp.write_all(lines.as_bytes()).unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let datagram = format!("udp.one 7 {at}\nudp.two 1e3 {at}");
    udp.send_to(datagram.as_bytes(), graphite(&v)).unwrap();

    let found = until_n(
        &mut client,
        r#"service =~ "servers.%" or service =~ "udp.%""#,
        5,
    )
    .await;
    let secs = |s: i64| s * 1_000_000;
    let got: Vec<_> = found.iter().map(point).collect();
    assert_eq!(
        got,
        [
            (
                "servers.web1.after",
                Some(Metric::Float(-3.0)),
                secs(at),
                None
            ),
            (
                "servers.web1.cpu",
                Some(Metric::Float(42.0)),
                secs(at),
                None
            ),
            (
                "servers.web1.load",
                Some(Metric::Float(0.5)),
                secs(at) + 250_000,
                None
            ),
            ("udp.one", Some(Metric::Float(7.0)), secs(at), None),
            ("udp.two", Some(Metric::Float(1000.0)), secs(at), None),
        ]
    );

    // The connection went on after the bad lines: it still takes points.
    tcp.write_all(format!("servers.web1.later 1 {at}\n").as_bytes())
        .unwrap();
    until_n(&mut client, r#"service = "servers.web1.later""#, 1).await;

    let http = v.http.unwrap();
    assert_eq!(metric(http, "vigil_graphite_events_total").await, 6);
    assert_eq!(metric(http, "vigil_graphite_lines_invalid_total").await, 1);
    assert_eq!(metric(http, "vigil_graphite_lines_nan_total").await, 1);
    assert_eq!(
        metric(http, "vigil_graphite_lines_oversized_total").await,
        1
    );
    assert_eq!(metric(http, "vigil_graphite_connections_total").await, 1);
    assert_eq!(metric(http, "vigil_graphite_connections_open").await, 1);
    assert!(
        v.logs().contains("Graphite line refused"),
        "a refused line is warned of"
    );

    // Shutdown ends the open connection with the server's other tasks,
    // not after the grace period.
    assert!(v.terminate().success(), "{}", v.logs());
    assert!(!v.logs().contains("Tasks still running"), "{}", v.logs());
    drop(tcp);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_over_max_string_is_refused_and_counted() {
    let v = Vigil::start(&["--graphite", "127.0.0.1:0", "--max-string", "8"]);
    let mut client = riemann(&v).await;
    let mut tcp = TcpStream::connect(graphite(&v)).unwrap();
    // Points of now: an old one would be stored already expired.
    let at = now_secs() as u64;
    let lines = format!("too.long.path 1 {at}\nshort 2 {at}\n");
    tcp.write_all(lines.as_bytes()).unwrap();
    let found = until_n(&mut client, "true", 1).await;
    assert_eq!(point(&found[0]).0, "short");
    let http = v.http.unwrap();
    assert_eq!(metric(http, "vigil_msgs_over_max_string_total").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_limit_are_refused_apart_from_riemann_ones() {
    let v = Vigil::start(&[
        "--graphite",
        "127.0.0.1:0",
        "--max-connections",
        "1",
        "--self-metrics-interval",
        "1s",
        "--node-name",
        "me",
    ]);
    let mut client = riemann(&v).await;
    let mut first = TcpStream::connect(graphite(&v)).unwrap();
    let at = now_secs() as u64;
    first
        .write_all(format!("held 1 {at}\n").as_bytes())
        .unwrap();
    until_n(&mut client, r#"service = "held""#, 1).await;
    // The first holds the only permit: the second is closed at once.
    let mut second = TcpStream::connect(graphite(&v)).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let read = second.read(&mut [0; 16]);
    assert!(
        matches!(read, Ok(0))
            || read.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the second connection is closed"
    );
    // Counted (before the socket is dropped), and reported as a self-metric
    // event, which the Riemann listener, a pool of its own, still answers.
    let refused = "vigil_graphite_connections_refused_total";
    assert_eq!(metric(v.http.unwrap(), refused).await, 1);
    let q = r#"host = "me" and service = "vigil graphite connections refused" and metric = 1"#;
    until_n(&mut client, q, 1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_line_left_unfinished_is_closed_after_the_read_timeout() {
    let v = Vigil::start(&["--graphite", "127.0.0.1:0", "--read-timeout", "1s"]);
    let mut client = riemann(&v).await;
    let mut tcp = TcpStream::connect(graphite(&v)).unwrap();
    tcp.write_all(b"begun 1").unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert_eq!(tcp.read(&mut [0; 16]).unwrap(), 0, "closed by vigil");
    let http = v.http.unwrap();
    assert_eq!(metric(http, "vigil_graphite_read_timeouts_total").await, 1);
    assert!(
        query(&mut client, "true").await.is_empty(),
        "the line never ended"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn datagrams_the_kernel_dropped_are_counted() {
    let v = Vigil::start(&[
        "--graphite",
        "127.0.0.1:0",
        "--self-metrics-interval",
        "1s",
        "--node-name",
        "me",
    ]);
    let mut client = riemann(&v).await;
    let http = v.http.unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.connect(graphite(&v)).unwrap();
    let at = now_secs() as u64;
    // Stopped, vigil reads nothing: the kernel drops what overflows the
    // socket's receive buffer.
    v.signal("STOP");
    let sent = 5_000;
    for i in 0..sent {
        udp.send(format!("burst.{i} 1 {at}\n").as_bytes()).unwrap();
    }
    v.signal("CONT");
    // Each one was either taken or dropped by the kernel, counted once
    // vigil next reads the kernel's count.
    let drops = "vigil_graphite_udp_receive_drops_total";
    let mut accounted = 0;
    for _ in 0..200 {
        accounted = metric(http, "vigil_graphite_events_total").await + metric(http, drops).await;
        if accounted == sent {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accounted, sent, "taken and dropped");
    let dropped = metric(http, drops).await;
    assert!(dropped > 0, "a burst over the receive buffer was dropped");
    // Reported as a self-metric event too.
    let q = format!(
        r#"host = "me" and service = "vigil graphite udp receive drops" and metric = {dropped}"#
    );
    until_n(&mut client, &q, 1).await;
}
