//! The gRPC API (`proto/vigil.proto`) through a tonic client: against the real
//! binary started with `--grpc`, and in-process where the test needs to reach
//! inside (counters, a subscriber that falls behind).

mod common;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt, stream};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use common::Vigil;
use common::inproc::{grpc as grpc_in_process, read_until_closed, wait_stat};
use vigil::client::Client;
use vigil::clock::{Clock, MICROS_PER_SEC, SystemClock};
use vigil::event::{Event, Metric};
use vigil::forwarded::TrustedProxies;
use vigil::grpc::{Ack, Grpc, GrpcLimits, Msg, QueryRequest, VigilClient};
use vigil::index::Index;
use vigil::limits::Limits;
use vigil::proto::{PbEvent, from_pb, to_pb};
use vigil::query::Query;
use vigil::stats::Stats;

/// Bound on every wait for a reply or a streamed event.
const WAIT: Duration = Duration::from_secs(10);

fn start_vigil() -> (Vigil, SocketAddr) {
    let vigil = Vigil::start(&["--grpc", "127.0.0.1:0", "--tick", "50ms"]);
    let grpc = vigil.grpc.expect("`listening` carries the grpc address");
    (vigil, grpc)
}

async fn connect(addr: SocketAddr) -> VigilClient<Channel> {
    VigilClient::connect(format!("http://{addr}"))
        .await
        .expect("gRPC client connects")
}

/// The next item of a stream, failing the test instead of hanging.
async fn next<T>(stream: &mut (impl Stream<Item = T> + Unpin)) -> Option<T> {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a reply within the timeout")
}

async fn next_event(events: &mut Streaming<PbEvent>) -> Event {
    let pb = next(events)
        .await
        .expect("the stream is still open")
        .expect("an event, not an error");
    from_pb(pb, 0)
}

/// Calls `method` (`Query`, `Subscribe`) with `query` over a bare HTTP/2
/// connection, for a client whose reading the test controls; the answer's
/// head, once it comes.
fn raw_query_call(
    h2: &mut h2::client::SendRequest<bytes::Bytes>,
    addr: SocketAddr,
    method: &str,
    query: &str,
) -> h2::client::ResponseFuture {
    let call = axum::http::Request::post(format!("http://{addr}/vigil.Vigil/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (answer, mut body) = h2.send_request(call, false).unwrap();
    let request = prost::Message::encode_to_vec(&QueryRequest::new(query));
    // A gRPC message: not compressed, its length, the protobuf.
    let mut message = vec![0];
    message.extend_from_slice(&(request.len() as u32).to_be_bytes());
    message.extend_from_slice(&request);
    body.send_data(message.into(), true).unwrap();
    answer
}

async fn query(client: &mut VigilClient<Channel>, query: &str) -> Result<Vec<Event>, Status> {
    let reply = client.query(QueryRequest::new(query)).await?;
    Ok(reply
        .into_inner()
        .events
        .into_iter()
        .map(|pb| from_pb(pb, 0))
        .collect())
}

fn msg(events: &[Event]) -> Msg {
    Msg::of(events)
}

fn event(host: &str, service: &str) -> Event {
    Event {
        host: Some(host.into()),
        service: Some(service.into()),
        state: Some("ok".into()),
        time: SystemClock.now(),
        ..Event::default()
    }
}

fn assert_ok(ack: &Ack) {
    assert!(ack.ok, "ack not ok: {ack:?}");
    assert!(ack.error.is_empty(), "ack with an error: {ack:?}");
}

#[tokio::test]
async fn send_acks_each_msg_in_order_and_query_returns_every_field() {
    let (_vigil, addr) = start_vigil();
    let mut client = connect(addr).await;
    let now = SystemClock.now();
    let int = Event {
        host: Some("grpc-send".into()),
        service: Some("int".into()),
        state: Some("warning".into()),
        time: now - 5 * MICROS_PER_SEC + 250_000,
        description: Some("an integer".into()),
        tags: vec!["a".into(), "b".into()],
        metric: Some(Metric::Int(-42)),
        ttl: Some(300.0),
        attributes: vec![("env".into(), "prod".into()), ("team".into(), "db".into())],
    };
    let float = Event {
        service: Some("float".into()),
        metric: Some(Metric::Float(0.125)),
        ttl: Some(120.5),
        tags: vec!["c".into()],
        attributes: vec![("region".into(), "eu".into())],
        ..int.clone()
    };
    // No time: vigil stamps the arrival time.
    let untimed = PbEvent {
        host: Some("grpc-send".into()),
        service: Some("untimed".into()),
        ..PbEvent::default()
    };

    // Each Msg is sent only once the previous one is acknowledged, and its
    // event is in the index by then: one Ack per Msg, in order.
    let (tx, rx) = mpsc::channel(1);
    let outbound = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut acks = client
        .send(outbound)
        .await
        .expect("Send starts")
        .into_inner();
    let msgs = [
        msg(std::slice::from_ref(&int)),
        msg(std::slice::from_ref(&float)),
        Msg::new([untimed]),
    ];
    for (i, m) in msgs.into_iter().enumerate() {
        tx.send(m).await.unwrap();
        let ack = next(&mut acks)
            .await
            .expect("an ack")
            .expect("not an error");
        assert_ok(&ack);
        let indexed = query(&mut client, r#"host = "grpc-send""#).await.unwrap();
        assert_eq!(indexed.len(), i + 1, "after ack {i}: {indexed:?}");
    }
    drop(tx);
    assert!(next(&mut acks).await.is_none(), "exactly one ack per Msg");

    let mut indexed = query(&mut client, r#"host = "grpc-send""#).await.unwrap();
    indexed.sort_by(|a, b| a.service.cmp(&b.service));
    assert_eq!(indexed[0], float);
    assert_eq!(indexed[1], int);
    let stamped = &indexed[2];
    assert_eq!(stamped.service.as_deref(), Some("untimed"));
    assert!(
        (stamped.time - now).abs() < 60 * MICROS_PER_SEC,
        "arrival time stamped: {stamped:?}"
    );

    // The unary form goes the same way.
    let ack = client
        .send_batch(msg(&[event("grpc-send", "batch")]))
        .await
        .unwrap()
        .into_inner();
    assert_ok(&ack);
    let found = query(&mut client, r#"service = "batch""#).await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
}

#[tokio::test]
async fn a_bad_query_is_invalid_argument_with_the_column() {
    let (_vigil, addr) = start_vigil();
    let mut client = connect(addr).await;
    let text = r#"service = "x" and and"#;
    let column = Query::parse(text).unwrap_err().column;
    for status in [
        query(&mut client, text).await.unwrap_err(),
        client
            .subscribe(QueryRequest::new(text))
            .await
            .map(drop)
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains(&format!("column {column}")),
            "the parser's column in {status:?}"
        );
    }
}

#[tokio::test]
async fn a_scan_past_the_query_timeout_is_deadline_exceeded() {
    let vigil = Vigil::start(&["--grpc", "127.0.0.1:0", "--query-timeout", "1ms"]);
    let mut client = connect(vigil.grpc.unwrap()).await;
    for first in (0..20_000).step_by(2_000) {
        let events: Vec<Event> = (first..first + 2_000)
            .map(|i| event(&format!("web{i}"), "cpu"))
            .collect();
        assert_ok(client.send_batch(msg(&events)).await.unwrap().get_ref());
    }
    // A thousand terms on each of 20 000 entries: far over a millisecond.
    let terms: Vec<String> = (0..1_000).map(|i| format!("metric = {i}")).collect();
    let status = query(&mut client, &terms.join(" or ")).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        status.message(),
        "the query ran longer than 1ms (--query-timeout) and was stopped; narrow it"
    );
    let one = r#"host = "web7" and service = "cpu""#;
    assert_eq!(query(&mut client, one).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_query_over_the_result_limit_is_resource_exhausted() {
    let vigil = Vigil::start(&["--grpc", "127.0.0.1:0", "--max-query-results", "1"]);
    let mut client = connect(vigil.grpc.unwrap()).await;
    let ack = client
        .send_batch(msg(&[event("a", "x"), event("b", "x")]))
        .await
        .unwrap();
    assert_ok(ack.get_ref());
    let request = || QueryRequest::new(r#"service = "x""#);
    let subscribed = client.subscribe(request()).await.map(drop);
    for status in [
        query(&mut client, &request().query).await.unwrap_err(),
        subscribed.unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("--max-query-results 1"),
            "{status:?}"
        );
    }
    assert_eq!(query(&mut client, r#"host = "a""#).await.unwrap().len(), 1);
    // Counted as HTTP and TCP count them: three asked, two refused, one of
    // them a subscription.
    let metrics = common::metrics_text(vigil.http.unwrap()).await;
    for line in [
        "vigil_queries_total 3",
        "vigil_query_errors_total 2",
        "vigil_subscriptions_total 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn subscribe_sends_current_matches_then_live_events() {
    let (vigil, addr) = start_vigil();
    let mut client = connect(addr).await;
    let mut tcp = Client::connect(vigil.tcp).await.expect("TCP connects");
    tcp.send(&[event("sub", "before")]).await.unwrap();

    let mut events = client
        .subscribe(QueryRequest::new(r#"host = "sub""#))
        .await
        .expect("Subscribe starts")
        .into_inner();
    assert_eq!(
        next_event(&mut events).await.service.as_deref(),
        Some("before"),
        "the current match first"
    );

    // Over the Riemann protocol: a non-matching event, then a matching one.
    tcp.send(&[event("elsewhere", "ignored")]).await.unwrap();
    let live = Event {
        metric: Some(Metric::Float(2.5)),
        tags: vec!["live".into()],
        ..event("sub", "after")
    };
    tcp.send(std::slice::from_ref(&live)).await.unwrap();
    assert_eq!(
        next_event(&mut events).await,
        live,
        "only the matching event"
    );
}

#[tokio::test]
async fn an_expiring_event_reaches_subscribers_as_expired() {
    let (vigil, addr) = start_vigil();
    let mut client = connect(addr).await;
    let mut events = client
        .subscribe(QueryRequest::new(r#"host = "ttl""#))
        .await
        .expect("Subscribe starts")
        .into_inner();
    let mut tcp = Client::connect(vigil.tcp).await.expect("TCP connects");
    let short = Event {
        ttl: Some(0.2),
        ..event("ttl", "short")
    };
    tcp.send(std::slice::from_ref(&short)).await.unwrap();

    assert_eq!(next_event(&mut events).await, short, "indexed");
    let expired = next_event(&mut events).await;
    assert_eq!(expired.state.as_deref(), Some("expired"), "{expired:?}");
    assert_eq!(expired.service.as_deref(), Some("short"));
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable() {
    let (mut vigil, addr) = start_vigil();
    let mut client = connect(addr).await;
    let mut events = client
        .subscribe(QueryRequest::new(r#"host = "nobody""#))
        .await
        .expect("Subscribe starts")
        .into_inner();
    // The subscription is registered once the server answered the call.
    let status = tokio::task::spawn_blocking(move || vigil.terminate())
        .await
        .unwrap();
    assert!(status.success(), "clean exit: {status:?}");
    let end = next(&mut events).await.expect("a final status");
    assert_eq!(end.unwrap_err().code(), Code::Unavailable);
}

/// A gRPC client that sends whatever message it is given, for requests the
/// generated client cannot make.
async fn raw_client(addr: SocketAddr) -> tonic::client::Grpc<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

/// `vigil.QueryRequest` as bytes: a client whose query need not be UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawQueryRequest {
    #[prost(bytes = "vec", tag = "1")]
    query: Vec<u8>,
}

#[tokio::test]
async fn a_query_that_is_not_utf8_is_repaired_as_over_tcp() {
    let (grpc, index, stats) = start_in_process(1 << 20).await;
    index.insert(&event("a?", "cpu"));
    let mut raw = raw_client(grpc.addr).await;
    let bad = RawQueryRequest {
        query: b"host = \"a\xff\"".to_vec(),
    };
    for path in ["/vigil.Vigil/Query", "/vigil.Vigil/Subscribe"] {
        raw.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        let codec = tonic::codec::ProstCodec::<RawQueryRequest, PbEvent>::default();
        let first = if path.path().ends_with("Query") {
            let codec =
                tonic::codec::ProstCodec::<RawQueryRequest, vigil::grpc::QueryResponse>::default();
            let answer = raw
                .unary(tonic::Request::new(bad.clone()), path, codec)
                .await;
            answer
                .expect("a repaired query is answered")
                .into_inner()
                .events
        } else {
            let answer = raw
                .server_streaming(tonic::Request::new(bad.clone()), path, codec)
                .await;
            let mut events = answer.expect("a repaired query subscribes").into_inner();
            vec![next(&mut events).await.unwrap().unwrap()]
        };
        let hosts: Vec<_> = first.into_iter().map(|pb| pb.host.unwrap()).collect();
        assert_eq!(hosts, ["a?"]);
    }
    assert_eq!(Stats::get(&stats.strings_repaired), 2);
    assert_eq!(Stats::get(&stats.query_errors), 0);
    grpc.shutdown(Duration::from_secs(5)).await;
}

/// `query` as a number: bytes that are not a `vigil.QueryRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct NumberQueryRequest {
    #[prost(uint64, tag = "1")]
    query: u64,
}

#[tokio::test]
async fn a_request_that_is_not_a_query_request_is_the_clients_error() {
    let (grpc, _index, stats) = start_in_process(1 << 20).await;
    let mut raw = raw_client(grpc.addr).await;
    let bad = NumberQueryRequest { query: 1 };
    for path in ["/vigil.Vigil/Query", "/vigil.Vigil/Subscribe"] {
        raw.ready().await.unwrap();
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        let codec = tonic::codec::ProstCodec::<NumberQueryRequest, PbEvent>::default();
        let status = match path.path().ends_with("Query") {
            true => raw
                .unary(tonic::Request::new(bad.clone()), path, codec)
                .await
                .map(drop),
            false => (raw.server_streaming(tonic::Request::new(bad.clone()), path, codec))
                .await
                .map(drop),
        }
        .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status
                .message()
                .starts_with("invalid QueryRequest: failed to decode Protobuf message: "),
            "{status:?}"
        );
    }
    assert_eq!(Stats::get(&stats.decode_errors), 2);
    grpc.shutdown(Duration::from_secs(5)).await;
}

/// A subscriber that stopped reading its snapshot (its stream's HTTP/2
/// window full, its connection alive) gets 2 s of the shutdown, as an HTTP
/// client does: the index snapshot is written without waiting for it, well
/// within a container's 10 s stop timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_not_reading_its_snapshot_does_not_hold_the_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let mut vigil = Vigil::start(&["--grpc", "127.0.0.1:0", "--data-dir", data]);
    let addr = vigil.grpc.unwrap();
    let mut client = connect(addr).await;
    // ~8 MB of snapshot: far more than the stream's 64 KiB window.
    for batch in 0..20 {
        let events: Vec<Event> = (0..100)
            .map(|i| Event {
                description: Some("x".repeat(4096)),
                ..event("big", &format!("{batch}-{i}"))
            })
            .collect();
        assert_ok(client.send_batch(msg(&events)).await.unwrap().get_ref());
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let answer = raw_query_call(&mut h2, addr, "Subscribe", "true");
    // Its answer began (the snapshot is on its way); its body is never read.
    let _answer = tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();

    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || (vigil.terminate(), vigil))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(status.0.success(), "clean exit: {:?}", status.0);
    assert!(
        took < Duration::from_secs(6),
        "exit took {took:?}; log:\n{}",
        status.1.logs()
    );
    let again = Vigil::start(&["--grpc", "127.0.0.1:0", "--data-dir", data]);
    let mut client = connect(again.grpc.unwrap()).await;
    for batch in ["0", "19"] {
        let found = query(&mut client, &format!(r#"service =~ "{batch}-%""#)).await;
        assert_eq!(found.unwrap().len(), 100, "batch {batch} saved");
    }
}

/// A subscription's snapshot counts in `--max-subscriber-memory` while it
/// is sent: one that does not fit is refused, `RESOURCE_EXHAUSTED` with the
/// flag named, and counted.
#[tokio::test]
async fn a_snapshot_that_does_not_fit_in_the_subscriber_memory_is_refused() {
    let vigil = Vigil::start(&[
        "--grpc",
        "127.0.0.1:0",
        "--max-subscriber-memory",
        "1048576",
    ]);
    let mut client = connect(vigil.grpc.unwrap()).await;
    let events: Vec<Event> = (0..500)
        .map(|i| Event {
            description: Some("d".repeat(4096)),
            ..event("large", &i.to_string())
        })
        .collect();
    assert_ok(client.send_batch(msg(&events)).await.unwrap().get_ref());
    let refused = client
        .subscribe(QueryRequest::new("true"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-subscriber-memory"),
        "{refused:?}"
    );
    let mut one = (client
        .subscribe(QueryRequest::new(r#"service = "7""#))
        .await)
        .unwrap()
        .into_inner();
    assert_eq!(next_event(&mut one).await.service.as_deref(), Some("7"));
    let metrics = common::metrics_text(vigil.http.unwrap()).await;
    let line = "vigil_subscriptions_refused_total 1";
    assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
}

/// In-process, indexing everything: for the counters and limits.
async fn start_in_process(max_message: usize) -> (Grpc, Arc<Index>, Arc<Stats>) {
    grpc_in_process(GrpcLimits {
        max_message,
        per_message: Limits::DEFAULT,
        max_connections: 100,
        write_timeout: Duration::from_secs(60),
        read_timeout: Duration::from_secs(60),
        memory: None,
        trusted_proxies: TrustedProxies::default(),
    })
    .await
}

#[tokio::test]
async fn a_message_over_the_limit_is_refused() {
    let (grpc, index, stats) = start_in_process(1024).await;
    let mut client = connect(grpc.addr).await;
    let big = Event {
        description: Some("x".repeat(2048)),
        ..event("big", "x")
    };
    let status = client.send_batch(msg(&[big])).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(index.is_empty());
    assert_eq!(Stats::get(&stats.grpc_messages), 0);
    assert_eq!(Stats::get(&stats.frames_oversized), 1, "counted as TCP's");
    // The connection is still usable for messages within the limit.
    let ack = client
        .send_batch(msg(&[event("small", "x")]))
        .await
        .unwrap();
    assert_ok(ack.get_ref());
    assert_eq!(index.len(), 1);
    grpc.shutdown(WAIT).await;
}

/// Tight per-message limits: 3 events, 1 tag, 1 attribute, 8-byte strings.
const TIGHT: Limits = Limits {
    max_events: 3,
    max_tags: 1,
    max_attributes: 1,
    max_string: 8,
};

#[tokio::test]
async fn a_msg_over_a_per_message_limit_is_refused_whole_naming_the_flag() {
    let (grpc, index, stats) = grpc_in_process(GrpcLimits {
        max_message: 1 << 20,
        per_message: TIGHT,
        max_connections: 100,
        write_timeout: Duration::from_secs(60),
        read_timeout: Duration::from_secs(60),
        memory: None,
        trusted_proxies: TrustedProxies::default(),
    })
    .await;
    let mut client = connect(grpc.addr).await;
    let at_limits = Event {
        tags: vec!["8 bytes!".into()],
        attributes: vec![("env".into(), "prod".into())],
        ..event("8 bytes!", "svc")
    };
    let refused = |events: Vec<Event>| {
        let mut client = client.clone();
        async move {
            let ack = client.send_batch(msg(&events)).await.unwrap().into_inner();
            assert!(!ack.ok, "refused: {ack:?}");
            ack.error
        }
    };
    assert_eq!(
        refused(vec![at_limits.clone(), event("a-long-host", "svc")]).await,
        "event 1: host of 11 bytes exceeds --max-string 8"
    );
    assert_eq!(
        refused(vec![event("h", "s"); 4]).await,
        "4 events exceeds --max-events-per-msg 3"
    );
    let two_tags = Event {
        tags: vec!["a".into(), "b".into()],
        ..event("h", "s")
    };
    assert_eq!(
        refused(vec![two_tags]).await,
        "event 0: 2 tags exceeds --max-tags 1"
    );
    // A reserved name is dropped from the event, but counts as sent.
    let mut reserved = to_pb(&at_limits);
    reserved.attributes.insert(
        0,
        vigil::proto::Attribute {
            key: "host".into(),
            value: Some("x".into()),
        },
    );
    let ack = client
        .send_batch(Msg::new([reserved]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ack.error,
        "event 0: 2 attributes exceeds --max-attributes 1"
    );
    assert!(index.is_empty(), "nothing of a refused Msg is indexed");
    assert_eq!(Stats::get(&stats.grpc_events), 0);
    assert_eq!(Stats::get(&stats.msgs_over_max_string), 1);
    assert_eq!(Stats::get(&stats.msgs_over_max_events), 1);
    assert_eq!(Stats::get(&stats.msgs_over_max_tags), 1);
    assert_eq!(Stats::get(&stats.msgs_over_max_attributes), 1);

    let ack = client.send_batch(msg(&[at_limits])).await.unwrap();
    assert_ok(ack.get_ref());
    assert_eq!(index.len(), 1);
    let status = query(&mut client, "host = \"8 bytes!\"").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), "query of 17 bytes exceeds --max-string 8");
    assert_eq!(Stats::get(&stats.msgs_over_max_string), 2);
    let status = client
        .subscribe(QueryRequest::new("service = \"svc\""))
        .await
        .unwrap_err();
    assert_eq!(status.message(), "query of 15 bytes exceeds --max-string 8");
    assert_eq!(query(&mut client, "true").await.unwrap().len(), 1);
    grpc.shutdown(WAIT).await;
}

#[tokio::test]
async fn a_msg_or_an_event_that_does_not_decode_gets_an_error_ack_and_the_stream_goes_on() {
    let (grpc, index, stats) = start_in_process(1 << 20).await;
    let mut client = connect(grpc.addr).await;
    // `events` holding two bytes that are no event: a varint never ended.
    let garbage = <Msg as prost::Message>::decode([0x0a, 0x02, 0x08, 0xff].as_slice()).unwrap();
    let (tx, rx) = mpsc::channel(2);
    let outbound = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut acks = client.send(outbound).await.unwrap().into_inner();
    tx.send(garbage).await.unwrap();
    let ack = next(&mut acks).await.unwrap().unwrap();
    assert_eq!(
        (ack.ok, ack.error.as_str()),
        (false, "invalid message: message truncated")
    );
    // Bytes that are no `Msg` at all: a key whose varint never ends. They
    // ended the stream (`INTERNAL`), losing the acks of the messages behind.
    let not_a_msg = <Msg as prost::Message>::decode([0xff, 0xff].as_slice()).unwrap();
    tx.send(not_a_msg).await.unwrap();
    let ack = next(&mut acks).await.unwrap().unwrap();
    assert_eq!(
        (ack.ok, ack.error.as_str()),
        (false, "invalid message: message truncated"),
        "as a Riemann TCP frame of the same bytes is answered"
    );
    tx.send(msg(&[event("after", "garbage")])).await.unwrap();
    assert_ok(&next(&mut acks).await.unwrap().unwrap());
    assert_eq!(index.len(), 1);
    assert_eq!(Stats::get(&stats.decode_errors), 2);
    grpc.shutdown(WAIT).await;
}

#[tokio::test]
async fn a_connection_is_told_how_many_calls_it_may_open_at_once() {
    let (grpc, _index, _stats) = start_in_process(1 << 20).await;
    let tcp = TcpStream::connect(grpc.addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    // The server's SETTINGS arrive with the first exchange.
    let call = axum::http::Request::post(format!("http://{}/vigil.Vigil/Query", grpc.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (answer, _body) = h2.send_request(call, true).unwrap();
    tokio::time::timeout(WAIT, answer).await.unwrap().unwrap();
    assert_eq!(
        h2.current_max_send_streams(),
        vigil::bounded::MAX_STREAMS as usize
    );
    grpc.shutdown(WAIT).await;
}

#[tokio::test]
async fn the_per_message_flags_reach_grpc() {
    let vigil = Vigil::start(&["--grpc", "127.0.0.1:0", "--max-string", "16"]);
    let mut client = connect(vigil.grpc.expect("grpc address")).await;
    let ack = client
        .send_batch(msg(&[
            event("a-host", "svc"),
            event("a-very-long-host-name", "svc"),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ack.error,
        "event 1: host of 21 bytes exceeds --max-string 16"
    );
    assert!(
        query(&mut client, "host =~ \"a-%\"")
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_falls_behind_ends_with_resource_exhausted() {
    let (grpc, index, stats) = start_in_process(64 * 1024 * 1024).await;
    let mut client = connect(grpc.addr).await;
    let mut events = client
        .subscribe(QueryRequest::new("true"))
        .await
        .expect("Subscribe starts")
        .into_inner();

    // Not reading: HTTP/2 flow control stops the server's writes, then the
    // subscriber's queue fills and pubsub drops it.
    const BATCHES: u64 = 4;
    const PER_BATCH: u64 = 50_000;
    let batch = msg(&vec![event("flood", "x"); PER_BATCH as usize]);
    for _ in 0..BATCHES {
        let ack = client.send_batch(batch.clone()).await.unwrap().into_inner();
        assert_ok(&ack);
    }
    assert_eq!(Stats::get(&stats.grpc_messages), BATCHES);
    assert_eq!(Stats::get(&stats.grpc_events), BATCHES * PER_BATCH);
    assert_eq!(
        index
            .pubsub()
            .stats
            .disconnected_slow
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let mut received = 0u64;
    let end = loop {
        match next(&mut events).await.expect("ends with a status") {
            Ok(_) => received += 1,
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert!(received < BATCHES * PER_BATCH, "dropped before the end");
    grpc.shutdown(WAIT).await;
}

/// A subscription whose query costs a stored event far more than the
/// publisher's budget (800 `=~ "%…%"` terms against a 1 MB description)
/// ends with RESOURCE_EXHAUSTED and the reason; subscribing it again is
/// refused the same way.
#[tokio::test]
async fn a_subscription_too_costly_for_ingest_ends_with_resource_exhausted() {
    let (vigil, addr) = start_vigil();
    let mut client = connect(addr).await;
    let terms: Vec<String> = (0..800)
        .map(|i| format!(r#"description =~ "%q{i}zM%""#))
        .collect();
    let costly = terms.join(" or ");
    let mut events = client
        .subscribe(QueryRequest::new(&costly))
        .await
        .expect("Subscribe starts")
        .into_inner();
    let big = Event {
        description: Some("d".repeat(1024 * 1024 - 64)),
        ..event("big", "1")
    };
    let mut agent = Client::connect(vigil.tcp).await.unwrap();
    agent.send(&[big]).await.expect("acknowledged");

    let end = next(&mut events)
        .await
        .expect("ends with a status")
        .expect_err("nothing matched");
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    let why = end.message();
    assert!(
        why.starts_with("query too costly for a live subscription: ")
            && why.ends_with("on one event, over 1ms; narrow it"),
        "{why}"
    );
    let again = client
        .subscribe(QueryRequest::new(&costly))
        .await
        .expect_err("refused");
    assert_eq!(again.code(), Code::ResourceExhausted, "{again:?}");
    assert!(
        (again.message()).starts_with("query too costly for a live subscription (over 1ms on one event); narrow it, or retry in "),
        "{again:?}"
    );
}

/// A gRPC client whose connections come from `local` (127.0.0.2, say).
async fn connect_from(local: &str, addr: SocketAddr) -> VigilClient<Channel> {
    let local = SocketAddr::new(local.parse().unwrap(), 0);
    let connector = tower::service_fn(move |_| async move {
        let socket = TcpSocket::new_v4()?;
        socket.bind(local)?;
        Ok::<_, io::Error>(TokioIo::new(socket.connect(addr).await?))
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("gRPC client connects");
    VigilClient::new(channel)
}

/// A subscriber in [`cut_a_flood`]: where its connections come from, and
/// the `x-forwarded-for` its calls carry, if any.
#[derive(Clone, Copy)]
struct Subscriber {
    from: &'static str,
    forwarded_for: Option<&'static str>,
}

impl Subscriber {
    async fn subscribe(
        self,
        client: &mut VigilClient<Channel>,
        query: &str,
    ) -> Result<Streaming<PbEvent>, Status> {
        let mut request = tonic::Request::new(QueryRequest::new(query));
        if let Some(whom) = self.forwarded_for {
            request
                .metadata_mut()
                .insert("x-forwarded-for", whom.parse().unwrap());
        }
        Ok(client.subscribe(request).await?.into_inner())
    }
}

/// Subscriptions the flooding client opens in [`cut_a_flood`], over
/// connections of 50 calls each (64 may be open on one).
const FLOODING: usize = 200;

/// One flood at a time: a flood is cut for the share of a core its queries
/// take, which two vigils flooded at once on a small machine may not get.
static ONE_FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `flooder` subscribes [`FLOODING`] distinct cheap queries (one search of
/// the service each), `bystander` one of the agent's events, and an agent
/// sends until the flood is cut for taking more than a quarter of a core
/// together: the flood ends with the reason, and the bystander gets every
/// event sent. Returns a connection of the flooder's and the bystander's.
async fn cut_a_flood(
    vigil: &Vigil,
    flooder: Subscriber,
    bystander: Subscriber,
) -> (VigilClient<Channel>, VigilClient<Channel>) {
    let _alone = ONE_FLOOD.lock().await;
    let addr = vigil.grpc.unwrap();
    let mut flood = Vec::new();
    let mut connection = connect_from(flooder.from, addr).await;
    for i in 0..FLOODING {
        if i > 0 && i % 50 == 0 {
            connection = connect_from(flooder.from, addr).await;
        }
        let query = common::cheap_query(i);
        flood.push(
            flooder
                .subscribe(&mut connection, &query)
                .await
                .expect("subscribed"),
        );
    }
    let mut other = connect_from(bystander.from, addr).await;
    let mut watcher =
        (bystander.subscribe(&mut other, r#"host = "agent""#).await).expect("subscribed");
    // Subscribed once the call is answered.
    let subscribers = common::metric(vigil.http.unwrap(), "vigil_subscribers").await;
    assert_eq!(subscribers, FLOODING as u64 + 1);

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
                event = next_event(&mut watcher) => {
                    assert_eq!(event.service, Some(seen.to_string()));
                    seen += 1;
                }
                _ = told.changed() => {}
            }
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sender = common::agent_until(vigil.tcp, stop.clone());
    let end = next(&mut flood[0])
        .await
        .expect("ends with a status")
        .expect_err("nothing matched");
    stop.store(true, Ordering::Relaxed);
    total.send_replace(Some(sender.await.unwrap()));
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    let why = end.message();
    assert!(
        why.starts_with("query too costly for a live subscription: this client's ")
            && why.ends_with("%, over 5%; narrow it"),
        "{why}"
    );
    // Every event sent, in order, to the bystander.
    drop(reader.await.unwrap());
    (connection, other)
}

const CLIENT_REFUSED: &str = "query too costly for a live subscription (the dearest client when all took over 5% of a core); narrow it, or retry in 60 s";

/// gRPC subscribers are charged by their peer's address: a client (from
/// 127.0.0.2) whose subscriptions cost too much together is cut and
/// refused whatever it asks next; another (from 127.0.0.1) gets every
/// event throughout and may still subscribe the same text.
#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_client_whose_subscriptions_are_too_costly_together_is_cut_not_another() {
    // A share of 5% (not 25%): cut on a machine slowed several times over.
    let vigil = Vigil::start(&[
        "--grpc",
        "127.0.0.1:0",
        "--tick",
        "50ms",
        "--subscription-share",
        "5",
    ]);
    let flooder = Subscriber {
        from: "127.0.0.2",
        forwarded_for: None,
    };
    let bystander = Subscriber {
        from: "127.0.0.1",
        forwarded_for: None,
    };
    let (mut cut, mut other) = cut_a_flood(&vigil, flooder, bystander).await;

    let again = (flooder.subscribe(&mut cut, r#"host = "agent""#).await).expect_err("refused");
    assert_eq!(again.code(), Code::ResourceExhausted, "{again:?}");
    assert_eq!(again.message(), CLIENT_REFUSED);
    let mut same = (bystander
        .subscribe(&mut other, &common::cheap_query(0))
        .await)
        .expect("the other client may subscribe");
    let mut agent = Client::connect(vigil.tcp).await.unwrap();
    agent.send(&[event("h", "zzz0")]).await.unwrap();
    assert_eq!(next_event(&mut same).await.service.as_deref(), Some("zzz0"));
    let logged = vigil.log_line("too costly for the ingest path together");
    assert!(logged.contains(r#""client":"127.0.0.2""#), "{logged}");
}

/// Behind a trusted proxy a gRPC subscriber is the client its
/// `x-forwarded-for` metadata names: one user's flood is cut, not the
/// proxy's other user.
#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_a_grpc_client_is_the_one_forwarded() {
    let vigil = Vigil::start(&[
        "--grpc",
        "127.0.0.1:0",
        "--trusted-proxy",
        "127.0.0.1",
        "--subscription-share",
        "5",
    ]);
    let flooder = Subscriber {
        from: "127.0.0.1",
        forwarded_for: Some("192.0.2.1"),
    };
    let bystander = Subscriber {
        from: "127.0.0.1",
        forwarded_for: Some("192.0.2.2"),
    };
    let (mut cut, _) = cut_a_flood(&vigil, flooder, bystander).await;

    let again = (flooder.subscribe(&mut cut, r#"host = "agent""#).await).expect_err("refused");
    assert_eq!(again.message(), CLIENT_REFUSED);
    let logged = vigil.log_line("too costly for the ingest path together");
    assert!(
        logged.contains(r#""client":"192.0.2.1 via proxy 127.0.0.1""#),
        "{logged}"
    );
}

/// A socket this side never reads, while its writes still go out.
struct Unread(TcpStream);

impl AsyncRead for Unread {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for Unread {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answer_is_closed_after_the_write_timeout() {
    let (grpc, stats) = holding_a_large_answer().await;
    // HTTP/2 windows as large as the answer, so only TCP can hold the server
    // back, and a socket never read: the server's writes wait on it.
    let tcp = TcpStream::connect(grpc.addr).await.unwrap();
    let (mut h2, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 30)
        .initial_connection_window_size(1 << 30)
        .handshake::<_, bytes::Bytes>(Unread(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let _answer = raw_query_call(&mut h2, grpc.addr, "Query", "true");
    wait_stat(&stats, |s| &s.grpc_write_timeouts, 1).await;
    // Everyone else is still served.
    let mut client = connect(grpc.addr).await;
    let found = query(&mut client, r#"service = "7""#).await.unwrap();
    assert_eq!(found.len(), 1);
    grpc.shutdown(Duration::from_secs(5)).await;
}

/// A client that reads its connection (pings, other calls) but grants one
/// call's answer no room: no write of the connection stalls, yet the answer
/// would wait whole for as long as the connection lasts. It is dropped
/// after the write timeout, and other calls on the connection go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_its_client_grants_no_room_is_dropped_after_the_write_timeout() {
    let (grpc, stats) = holding_a_large_answer().await;
    let tcp = TcpStream::connect(grpc.addr).await.unwrap();
    let (mut h2, connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let answer = raw_query_call(&mut h2, grpc.addr, "Query", "true")
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    wait_stat(&stats, |s| &s.grpc_responses_unread, 1).await;
    assert_eq!(
        Stats::get(&stats.grpc_write_timeouts),
        0,
        "the connection is read"
    );
    // The same connection still takes calls (their heads need no room).
    let other = raw_query_call(&mut h2, grpc.addr, "Query", r#"service = "7""#);
    let other = tokio::time::timeout(WAIT, other).await.unwrap().unwrap();
    assert_eq!(other.status(), 200);
    grpc.shutdown(Duration::from_secs(5)).await;
}

/// In-process, with a write timeout of a second, holding 2 000 events of
/// 4 KiB: the answer to `true` is ~8 MB.
async fn holding_a_large_answer() -> (Grpc, Arc<Stats>) {
    let (grpc, index, stats) = grpc_in_process(GrpcLimits {
        max_message: 1 << 20,
        per_message: Limits::DEFAULT,
        max_connections: 100,
        write_timeout: Duration::from_secs(1),
        read_timeout: Duration::from_secs(60),
        memory: None,
        trusted_proxies: TrustedProxies::default(),
    })
    .await;
    for i in 0..2_000 {
        index.insert(&Event {
            description: Some("x".repeat(4096)),
            ..event("big", &i.to_string())
        });
    }
    (grpc, stats)
}

/// In-process, with a read timeout of a second.
async fn start_impatient() -> (Grpc, Arc<Index>, Arc<Stats>) {
    grpc_in_process(GrpcLimits {
        max_message: 1 << 20,
        per_message: Limits::DEFAULT,
        max_connections: 100,
        write_timeout: Duration::from_secs(60),
        read_timeout: Duration::from_secs(1),
        memory: None,
        trusted_proxies: TrustedProxies::default(),
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_closed_after_the_read_timeout() {
    let (grpc, index, stats) = start_impatient().await;
    let mut silent = TcpStream::connect(grpc.addr).await.unwrap();
    read_until_closed(&mut silent).await;
    assert_eq!(Stats::get(&stats.grpc_read_timeouts), 1);
    // A client that speaks is served.
    index.insert(&event("web1", "cpu"));
    let mut client = connect(grpc.addr).await;
    assert_eq!(query(&mut client, "true").await.unwrap().len(), 1);
    grpc.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_closed() {
    let (grpc, _index, _stats) = start_impatient().await;
    // A valid HTTP/2 start (preface, then empty SETTINGS), then silence: a
    // peer that vanished without closing.
    let mut gone = TcpStream::connect(grpc.addr).await.unwrap();
    gone.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let received = read_until_closed(&mut gone).await;
    // Among what the server sent before closing: a PING (frame type 6).
    assert!(
        frame_types(&received).contains(&6),
        "frames: {:?}",
        frame_types(&received)
    );
    grpc.shutdown(Duration::from_secs(5)).await;
}

/// The types of the HTTP/2 frames in `bytes`, in order.
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_at_once_until_one_leaves() {
    let (grpc, _index, stats) = grpc_in_process(GrpcLimits {
        max_message: 1 << 20,
        per_message: Limits::DEFAULT,
        max_connections: 1,
        write_timeout: Duration::from_secs(60),
        read_timeout: Duration::from_secs(60),
        memory: None,
        trusted_proxies: TrustedProxies::default(),
    })
    .await;
    let holder = TcpStream::connect(grpc.addr).await.unwrap();
    let refused = Channel::from_shared(format!("http://{}", grpc.addr))
        .unwrap()
        .connect()
        .await;
    match refused {
        Err(_) => {}
        Ok(channel) => {
            let answer = VigilClient::new(channel)
                .query(QueryRequest::new("true"))
                .await;
            assert!(answer.is_err(), "served over the limit: {answer:?}");
        }
    }
    assert!(Stats::get(&stats.grpc_connections_refused) >= 1);
    // Once the holder leaves, its permit serves the next client.
    drop(holder);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(mut client) = VigilClient::connect(format!("http://{}", grpc.addr)).await
            && query(&mut client, "true").await.is_ok()
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    grpc.shutdown(Duration::from_secs(5)).await;
}

/// A gRPC connection, like a Riemann TCP one, keeps nothing of its largest
/// call once it ends: 24 idle connections that each sent a 4.7 MB
/// `SendBatch` and read a 4.7 MB `Query` answer hold little more than none.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_grpc_connection_does_not_keep_the_memory_of_its_largest_call() {
    const MIB: u64 = 1024 * 1024;
    const CONNECTIONS: usize = 24;
    // Freed pages given back at once (see tests/server.rs' TCP twin).
    let env = [("MIMALLOC_PURGE_DELAY", "0")];
    let vigil = Vigil::start_with_env(&["--grpc", "127.0.0.1:0"], &env);
    let addr = vigil.grpc.expect("`listening` carries the grpc address");
    let description = "x".repeat(200);
    let events: Vec<Event> = (0..20_000)
        .map(|i| Event {
            description: Some(description.clone()),
            // The same events are sent 25 times: on a loaded machine that
            // takes over a minute, and with the default TTL the last sends
            // arrived already expired (2 862 of 20 000 answered).
            ttl: Some(3600.0),
            ..event("h", &format!("big-{i}"))
        })
        .collect();
    let batch = msg(&events);
    let large_call = |mut client: VigilClient<Channel>| {
        let batch = batch.clone();
        async move {
            assert_ok(&client.send_batch(batch).await.unwrap().into_inner());
            let answer = query(&mut client, r#"service =~ "big-%""#).await.unwrap();
            assert_eq!(answer.len(), 20_000);
            client
        }
    };
    let client = |addr| async move { connect(addr).await.max_decoding_message_size(usize::MAX) };
    // The index is filled (and its memory counted) first.
    drop(large_call(client(addr).await).await);
    let before = common::resident_of(vigil.pid());
    let mut idle = Vec::new();
    for _ in 0..CONNECTIONS {
        idle.push(large_call(client(addr).await).await);
    }
    let grew = common::resident_of(vigil.pid()).saturating_sub(before);
    // For BENCHMARKS.md ("What an idle connection keeps"): `-- --nocapture`.
    println!(
        "{CONNECTIONS} idle gRPC connections: {} kB resident more",
        grew / 1024
    );
    assert!(
        grew < 16 * MIB,
        "{CONNECTIONS} idle gRPC connections hold {} MiB more than before",
        grew / MIB
    );
    drop(idle);
}

/// Out of file descriptors, the gRPC listener backs off and says so, as the
/// other listeners do: its failed accepts went to tonic, which retried them
/// at once, spinning a core without a word.
#[test]
fn out_of_descriptors_the_grpc_listener_backs_off_and_says_so() {
    let script = "ulimit -n 64 && exec \"$0\" --log-format json run --no-snapshot \
                  --tcp 127.0.0.1:0 --http 127.0.0.1:0 --grpc 127.0.0.1:0 --self-metrics-interval 0";
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", script, env!("CARGO_BIN_EXE_vigil")]);
    let mut vigil = common::Logging::spawn(cmd);
    assert!(
        vigil.wait_for("listening", common::START_TIMEOUT),
        "{}",
        vigil.seen
    );
    let listening = vigil
        .seen
        .lines()
        .find(|l| l.contains("listening"))
        .unwrap();
    let listening: serde_json::Value = serde_json::from_str(listening).unwrap();
    let grpc: SocketAddr = listening["fields"]["grpc"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // Two descriptors each (see `Bounded::watched`): more than 64 allows.
    let held: Vec<_> = (0..48)
        .map(|_| std::net::TcpStream::connect(grpc).unwrap())
        .collect();
    let backed_off = vigil.wait_for(r#""listener":"grpc""#, Duration::from_secs(10));
    vigil.child.kill().unwrap();
    vigil.child.wait().unwrap();
    drop(held);
    assert!(backed_off, "{}", vigil.seen);
    let line = vigil
        .seen
        .lines()
        .find(|l| l.contains(r#""listener":"grpc""#));
    assert!(
        line.unwrap().contains("Accept failed; backing off."),
        "{}",
        vigil.seen
    );
}
