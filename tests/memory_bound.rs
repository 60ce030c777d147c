//! Memory stays bounded under the cheapest abuse there is: many connections
//! each announcing the largest allowed frame and then sending almost nothing.
//! A codec that reserves the announced length would need 500 × 16 MiB = 8 GiB
//! here; vigil must hold only what was actually sent. And a request costs
//! about its own size: a gRPC `Msg` of millions of empty events is refused
//! without decoding them. Large messages arriving at once, over any
//! transport, share one budget and wait their turn; a stalled one gives its
//! turn back within seconds. (Its own test binary, one
//! test at a time: the memory measured is the whole process's.)

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::inproc::frame;
use common::{Vigil, metrics_text, peak_of};

use vigil::client::Client;
use vigil::clock::{Clock, SharedClock, SystemClock};
use vigil::event::Event;
use vigil::forwarded::TrustedProxies;
use vigil::grpc::{GrpcLimits, Msg, QueryRequest, VigilClient};
use vigil::index::{Index, IndexConfig};
use vigil::limits::Limits;
use vigil::proto::{self, PbEvent};
use vigil::server::{Server, ServerConfig};
use vigil::stats::Stats;
use vigil::streams::IndexEverything;

const CONNECTIONS: usize = 500;

/// The tests measure the same process: one at a time.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts this process's peak resident size ([`peak_of`]) over.
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak resident size");
}

/// (virtual, resident) bytes of this process. Virtual counts too: memory
/// reserved but not yet touched is still committed to whoever asked for it.
fn memory() -> (u64, u64) {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let mut pages = statm
        .split_whitespace()
        .map(|p| p.parse::<u64>().unwrap() * 4096);
    (pages.next().unwrap(), pages.next().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_but_unsent_frames_cost_nothing() {
    let _alone = ALONE.lock().await;
    let index = Arc::new(Index::new(IndexConfig::default()));
    let clock: SharedClock = Arc::new(SystemClock);
    let server = Server::start(
        ServerConfig {
            tcp: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        },
        index.clone(),
        Arc::new(IndexEverything::new(index)),
        clock,
    )
    .await
    .unwrap();
    let before = memory();
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut stream = TcpStream::connect(server.tcp_addr).await.unwrap();
        // The largest frame allowed by default, then 100 bytes of it.
        stream
            .write_all(&(vigil::frame::DEFAULT_MAX_FRAME as u32).to_be_bytes())
            .await
            .unwrap();
        stream.write_all(&[0x32; 100]).await.unwrap();
        clients.push(stream);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Stats::get(&server.stats.tcp_connections_open) < CONNECTIONS as u64 {
        assert!(Instant::now() < deadline, "connections not all open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let every connection read what it was sent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = memory();
    let mib = |b: u64| b / (1024 * 1024);
    let (virt, rss) = (
        after.0.saturating_sub(before.0),
        after.1.saturating_sub(before.1),
    );
    eprintln!(
        "grew by {} MiB virtual, {} MiB resident",
        mib(virt),
        mib(rss)
    );
    assert!(
        virt < 1024 * 1024 * 1024 && rss < 256 * 1024 * 1024,
        "{CONNECTIONS} half-sent 16 MiB frames grew the process by {} MiB virtual, {} MiB resident",
        mib(virt),
        mib(rss)
    );
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_msg_of_millions_of_empty_events_costs_about_its_size() {
    let _alone = ALONE.lock().await;
    let max_message = vigil::frame::DEFAULT_MAX_FRAME;
    let (grpc, index, stats) = common::inproc::grpc(GrpcLimits {
        max_message,
        per_message: Limits::DEFAULT,
        max_connections: 10,
        write_timeout: Duration::from_secs(60),
        read_timeout: Duration::from_secs(60),
        memory: None,
        trusted_proxies: TrustedProxies::default(),
    })
    .await;
    let mut client = VigilClient::connect(format!("http://{}", grpc.addr))
        .await
        .unwrap();
    // An empty event is two bytes on the wire: as many as fit the limit.
    let count = max_message / 2 - 8;
    let msg = Msg::new(std::iter::repeat_with(PbEvent::default).take(count));
    reset_peak();
    let before = peak_of(std::process::id());
    let ack = client.send_batch(msg).await.unwrap().into_inner();
    let grew = peak_of(std::process::id()).saturating_sub(before);
    let max = Limits::DEFAULT.max_events;
    assert_eq!(
        ack.error,
        format!("{count} events exceeds --max-events-per-msg {max}")
    );
    assert!(index.is_empty());
    assert_eq!(Stats::get(&stats.msgs_over_max_events), 1);
    eprintln!("the peak grew by {} MiB", grew / (1024 * 1024));
    // The request is 16 MiB; decoded into PbEvents it was 3.2 GB.
    assert!(
        grew < 256 * 1024 * 1024,
        "a 16 MiB Msg of {count} empty events grew the peak by {} MiB",
        grew / (1024 * 1024)
    );
    grpc.shutdown(Duration::from_secs(5)).await;
}

/// A Riemann `Msg` of `event`, encoded.
fn msg_of(event: PbEvent) -> Vec<u8> {
    let msg = proto::Msg {
        events: vec![event],
        ..proto::Msg::default()
    };
    msg.encode_to_vec()
}

/// `POST /events` of `body` in 64 KiB chunks, with no length announced; the
/// whole answer, once vigil closes the connection.
async fn post_chunked(http: std::net::SocketAddr, body: String) -> String {
    let mut stream = TcpStream::connect(http).await.unwrap();
    let mut request = b"POST /events HTTP/1.1\r\nhost: vigil\r\ntransfer-encoding: chunked\r\n\
        connection: close\r\n\r\n"
        .to_vec();
    for chunk in body.as_bytes().chunks(64 * 1024) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    read_all(&mut stream).await
}

/// The value of `name` on `GET /metrics`, once it is `want` (within 10 s).
async fn wait_metric(http: std::net::SocketAddr, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics_text(http).await;
        let value = text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .map(|value| value.parse::<u64>().unwrap());
        if value == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {value:?}, not {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_of_every_transport_wait_their_turn_in_one_budget() {
    let _alone = ALONE.lock().await;
    let v = Vigil::start(&["--grpc", "127.0.0.1:0", "--max-message-memory", "1048576"]);
    let (http, grpc) = (v.http.unwrap(), v.grpc.unwrap());
    let description = "d".repeat(600_000);
    let large = |service: &str| PbEvent {
        host: Some("h".into()),
        service: Some(service.into()),
        description: Some(description.clone()),
        ..PbEvent::default()
    };
    // A TCP frame of ~600 KB, of which 100 KB have arrived: it holds its room.
    let msg = msg_of(large("tcp"));
    let framed = frame(&msg);
    let mut tcp = TcpStream::connect(v.tcp).await.unwrap();
    tcp.write_all(&framed[..100_000]).await.unwrap();
    let room = (msg.len() as u64).div_ceil(1024) * 1024;
    wait_metric(http, "vigil_message_bytes_held", room).await;

    // A ~600 KB body and a ~600 KB gRPC Msg find no room beside it: they wait.
    let line = serde_json::json!({"host": "h", "service": "http", "description": description});
    let post = reqwest::Client::new()
        .post(format!("http://{http}/events"))
        .body(line.to_string())
        .send();
    let post = tokio::spawn(post);
    let mut client = VigilClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let msg = Msg::new([large("grpc")]);
    let send = tokio::spawn(async move { client.send_batch(msg).await });
    // A chunked body announces no length: it waits for room for the largest.
    let chunked = tokio::spawn(post_chunked(
        http,
        line.to_string().replace("http", "chunked"),
    ));
    wait_metric(http, "vigil_messages_waited_for_memory_total", 3).await;

    // Small messages never wait.
    let mut small = Client::connect(v.tcp).await.unwrap();
    let event = Event {
        host: Some("h".into()),
        service: Some("small".into()),
        // Not at the epoch: the index would expire it before the query.
        time: SystemClock.now(),
        ..Event::default()
    };
    small.send(&[event]).await.unwrap();
    assert!(!post.is_finished() && !send.is_finished());

    // Once the frame has arrived, each waiting message gets its turn.
    tcp.write_all(&framed[100_000..]).await.unwrap();
    assert_eq!(read_reply(&mut tcp).await.ok, Some(true));
    let posted = post.await.unwrap().unwrap();
    assert_eq!(posted.status(), reqwest::StatusCode::OK);
    assert_eq!(posted.text().await.unwrap(), "{}\n");
    let ack = send.await.unwrap().unwrap().into_inner();
    assert!(ack.ok, "{}", ack.error);
    let answer = chunked.await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n{}\n"), "{answer}");
    wait_metric(http, "vigil_message_bytes_held", 0).await;
    wait_metric(http, "vigil_messages_waited_for_memory_total", 3).await;

    let mut stored = small.query("host = \"h\"").await.unwrap();
    stored.sort_by(|a, b| a.service.cmp(&b.service));
    let stored: Vec<_> = stored
        .iter()
        .map(|e| {
            (
                e.service.as_deref().unwrap(),
                e.description.as_ref().map(String::len),
            )
        })
        .collect();
    assert_eq!(
        stored,
        [
            ("chunked", Some(600_000)),
            ("grpc", Some(600_000)),
            ("http", Some(600_000)),
            ("small", None),
            ("tcp", Some(600_000)),
        ]
    );
}

/// Stalled large messages give their room back a few seconds after getting it
/// (once behind the pace that brings them in within the read timeout), not
/// after the whole timeout, on every transport: the messages waiting behind
/// them go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_large_messages_give_their_room_back_long_before_the_read_timeout() {
    let _alone = ALONE.lock().await;
    let v = Vigil::start(&[
        "--grpc",
        "127.0.0.1:0",
        "--read-timeout",
        "10m",
        "--max-message-memory",
        "1048576",
    ]);
    let (http, grpc) = (v.http.unwrap(), v.grpc.unwrap());
    // A TCP frame, a `POST /events` body and a gRPC message of 300 000 bytes
    // each, of which 1 000 arrive: between them they hold nearly all the room.
    let len = 300_000;
    let mut stalled_frame = TcpStream::connect(v.tcp).await.unwrap();
    stalled_frame.write_u32(len as u32).await.unwrap();
    stalled_frame.write_all(&[0; 1000]).await.unwrap();
    let mut stalled_body = TcpStream::connect(http).await.unwrap();
    let head = format!("POST /events HTTP/1.1\r\nhost: vigil\r\ncontent-length: {len}\r\n\r\n");
    stalled_body.write_all(head.as_bytes()).await.unwrap();
    stalled_body.write_all(&[b' '; 1000]).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(TcpStream::connect(grpc).await.unwrap())
        .await
        .unwrap();
    tokio::spawn(connection);
    let call = axum::http::Request::post(format!("http://{grpc}/vigil.Vigil/SendBatch"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (called, mut stalled_message) = h2.send_request(call, false).unwrap();
    let mut start = vec![0];
    start.extend_from_slice(&(len as u32).to_be_bytes());
    start.resize(5 + 1000, 0);
    stalled_message.send_data(start.into(), false).unwrap();
    let room = (len as u64).div_ceil(1024) * 1024;
    wait_metric(http, "vigil_message_bytes_held", 3 * room).await;

    // A whole frame of 300 KB waits for room.
    let msg = msg_of(PbEvent {
        host: Some("h".into()),
        service: Some("waited".into()),
        description: Some("d".repeat(300_000)),
        ..PbEvent::default()
    });
    let mut waiting = TcpStream::connect(v.tcp).await.unwrap();
    waiting.write_all(&frame(&msg)).await.unwrap();
    wait_metric(http, "vigil_messages_waited_for_memory_total", 1).await;

    // Every stalled sender is told why (with a read timeout of 600 s, well
    // within a minute), and the waiting frame is acked.
    let too_slow = "a message of 300000 bytes held room in --max-message-memory for ";
    let error = within(read_reply(&mut stalled_frame)).await.error.unwrap();
    assert!(
        error.starts_with(too_slow)
            && error.ends_with(
                "and only 1000 bytes of it arrived: too slow to arrive within 600s (--read-timeout)"
            ),
        "{error}"
    );
    let answer = within(read_all(&mut stalled_body)).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains(too_slow), "{answer}");
    // The call fails with a trailers-only answer.
    let failed = within(called).await.unwrap();
    let header = |name| failed.headers()[name].to_str().unwrap().replace("%20", " ");
    assert_eq!(header("grpc-status"), "4", "DEADLINE_EXCEEDED");
    assert!(header("grpc-message").starts_with(too_slow), "{failed:?}");
    let acked = within(read_reply(&mut waiting)).await;
    assert_eq!(acked.ok, Some(true), "{:?}", acked.error);
    wait_metric(http, "vigil_messages_too_slow_total", 3).await;
    wait_metric(http, "vigil_message_bytes_held", 0).await;
    wait_metric(http, "vigil_tcp_read_timeouts_total", 0).await;
}

/// A chunked `POST /events` body over 64 KiB holds room for the largest body,
/// its length being unknown: while other messages wait for room, it must keep
/// that pace, or give the room up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_chunked_body_gives_its_room_up_when_another_message_needs_it() {
    let _alone = ALONE.lock().await;
    let v = Vigil::start(&["--read-timeout", "10m", "--max-message-memory", "1048576"]);
    let http = v.http.unwrap();
    // 70 000 bytes of a chunked body: room for 16 MiB, so all of the budget.
    let mut stalled = TcpStream::connect(http).await.unwrap();
    let head = "POST /events HTTP/1.1\r\nhost: vigil\r\ntransfer-encoding: chunked\r\n\r\n";
    let chunk = format!("{:x}\r\n{}\r\n", 70_000, " ".repeat(70_000));
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(chunk.as_bytes()).await.unwrap();
    wait_metric(http, "vigil_message_bytes_held", 1_048_576).await;

    let msg = msg_of(PbEvent {
        host: Some("h".into()),
        description: Some("d".repeat(100_000)),
        ..PbEvent::default()
    });
    let mut waiting = TcpStream::connect(v.tcp).await.unwrap();
    waiting.write_all(&frame(&msg)).await.unwrap();
    let answer = within(read_all(&mut stalled)).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(
        answer.contains("while other messages waited for room, and only 70000 bytes of it arrived: send it faster, or announce its length (Content-Length)"),
        "{answer}"
    );
    let acked = within(read_reply(&mut waiting)).await;
    assert_eq!(acked.ok, Some(true), "{:?}", acked.error);
    wait_metric(http, "vigil_messages_too_slow_total", 1).await;
    wait_metric(http, "vigil_messages_waited_for_memory_total", 1).await;
}

/// The next Riemann reply on `tcp`.
async fn read_reply(tcp: &mut TcpStream) -> proto::Msg {
    let len = tcp
        .read_u32()
        .await
        .expect("a reply, not a closed connection");
    let mut reply = vec![0; len as usize];
    tcp.read_exact(&mut reply).await.unwrap();
    proto::Msg::decode(&reply[..]).unwrap()
}

/// All that comes on `stream` until vigil closes it.
async fn read_all(stream: &mut TcpStream) -> String {
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

/// `what`, within a minute.
async fn within<T>(what: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), what)
        .await
        .expect("within a minute")
}

/// A frame that waits for room longer than the read timeout is not closed for
/// it: the wait is the server's, and the timeout runs from when it got room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_waiting_for_room_is_not_timed_out_meanwhile() {
    let _alone = ALONE.lock().await;
    let index = Arc::new(Index::new(IndexConfig::default()));
    let server = Server::start(
        ServerConfig {
            tcp: "127.0.0.1:0".parse().unwrap(),
            read_timeout: Duration::from_secs(1),
            max_message_memory: 1024 * 1024,
            ..ServerConfig::default()
        },
        index.clone(),
        Arc::new(IndexEverything::new(index.clone())),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let held = server.memory.try_take(1024 * 1024).unwrap();
    let msg = msg_of(PbEvent {
        host: Some("h".into()),
        description: Some("d".repeat(200_000)),
        ..PbEvent::default()
    });
    let mut tcp = TcpStream::connect(server.tcp_addr).await.unwrap();
    tcp.write_all(&frame(&msg)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(Stats::get(&server.stats.messages_waited_for_memory), 1);
    drop(held);
    assert_eq!(read_reply(&mut tcp).await.ok, Some(true));
    assert_eq!(Stats::get(&server.stats.tcp_read_timeouts), 0);
    assert_eq!(index.len(), 1);
}

/// `--max-answer-memory` for the answer tests: 1 MiB, less than one answer
/// to `true`, which then takes all of it.
const ANSWER_MEMORY: u64 = 1 << 20;

/// vigil with `--max-answer-memory` of [`ANSWER_MEMORY`] and `extra`
/// arguments, holding 3 000 events of 4 KB (the answer to `true`, ~12 MB,
/// far more than the socket buffers hold) and one small one.
async fn holding_large_answers(extra: &[&str]) -> Vigil {
    let memory = ANSWER_MEMORY.to_string();
    let mut args = vec!["--grpc", "127.0.0.1:0", "--max-answer-memory", &memory];
    args.extend_from_slice(extra);
    let v = Vigil::start(&args);
    let mut client = Client::connect(v.tcp).await.unwrap();
    let now = SystemClock.now();
    for batch in 0..3 {
        let events: Vec<Event> = (0..1_000)
            .map(|i| Event {
                host: Some("big".into()),
                service: Some(format!("{batch}-{i}")),
                description: Some("x".repeat(4_000)),
                time: now,
                ..Event::default()
            })
            .collect();
        client.send(&events).await.unwrap();
    }
    let small = Event {
        host: Some("small".into()),
        time: now,
        ..Event::default()
    };
    client.send(&[small]).await.unwrap();
    v
}

/// Query answers held for slow readers share one budget over every
/// transport: while a Riemann TCP client reads nothing of a ~12 MB answer,
/// further large answers are refused as busy (HTTP `503` with
/// `Retry-After`, gRPC `RESOURCE_EXHAUSTED`, TCP an error reply), counted,
/// small ones are answered, and once it has read its answer the room is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_beyond_the_answer_memory_are_refused_as_busy_on_every_transport() {
    let _alone = ALONE.lock().await;
    let v = holding_large_answers(&[]).await;
    let (http, grpc) = (v.http.unwrap(), v.grpc.unwrap());
    let mut stalled = TcpStream::connect(v.tcp).await.unwrap();
    stalled.write_all(&frame(&query_of("true"))).await.unwrap();
    wait_metric(http, "vigil_answer_bytes_held", ANSWER_MEMORY).await;

    let get = |query: &str| reqwest::get(format!("http://{http}/index?query={query}"));
    let busy = within(get("true")).await.unwrap();
    assert_eq!(busy.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(busy.headers()["retry-after"], "1");
    let error: serde_json::Value = busy.json().await.unwrap();
    let error = error["error"].as_str().unwrap();
    assert!(
        error
            .starts_with("busy: query answers being sent fill --max-answer-memory (1048576 bytes)"),
        "{error}"
    );
    let mut client = VigilClient::connect(format!("http://{grpc}"))
        .await
        .unwrap();
    let refused = client.query(QueryRequest::new("true")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(refused.message(), error);
    let mut tcp = Client::connect(v.tcp).await.unwrap();
    let refused = tcp.query("true").await.unwrap_err().to_string();
    assert_eq!(refused, format!("server error: {error}"));
    wait_metric(http, "vigil_answers_refused_busy_total", 3).await;

    // Small answers take no room: still answered.
    let small = within(get("host%20%3D%20%22small%22")).await.unwrap();
    assert_eq!(small.status(), reqwest::StatusCode::OK);
    assert_eq!(
        small.json::<Vec<serde_json::Value>>().await.unwrap().len(),
        1
    );
    assert_eq!(tcp.query("host = \"small\"").await.unwrap().len(), 1);

    // Read, the answer gives its room back: the next one is answered.
    let answer = within(read_reply(&mut stalled)).await;
    assert_eq!(answer.events.len(), 3_001);
    wait_metric(http, "vigil_answer_bytes_held", 0).await;
    assert_eq!(within(tcp.query("true")).await.unwrap().len(), 3_001);
    wait_metric(http, "vigil_answers_refused_busy_total", 3).await;
}

/// An HTTP/2 `GET /index` and a gRPC `Query` answer hold their room until
/// sent: while their client grants them no window, a Riemann TCP query's
/// large answer is refused; once the client goes, the room is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_grpc_answers_hold_their_room_until_sent() {
    let _alone = ALONE.lock().await;
    let v = holding_large_answers(&[]).await;
    let (http, grpc) = (v.http.unwrap(), v.grpc.unwrap());
    let mut tcp = Client::connect(v.tcp).await.unwrap();
    let get = axum::http::Request::get(format!("http://{http}/index?query=true"))
        .body(())
        .unwrap();
    let call = axum::http::Request::post(format!("http://{grpc}/vigil.Vigil/Query"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut message = vec![0];
    let request = QueryRequest::new("true").encode_to_vec();
    message.extend_from_slice(&(request.len() as u32).to_be_bytes());
    message.extend_from_slice(&request);
    for (addr, request, body) in [(http, get, None), (grpc, call, Some(message))] {
        let io = TcpStream::connect(addr).await.unwrap();
        let (mut h2, connection) = h2::client::handshake(io).await.unwrap();
        let driven = tokio::spawn(connection);
        let (answer, mut sending) = h2.send_request(request, body.is_none()).unwrap();
        if let Some(body) = body {
            sending.send_data(body.into(), true).unwrap();
        }
        // Its head comes; of its body, no more than the window is read.
        let answer = within(answer).await.unwrap();
        assert_eq!(answer.status(), 200);
        wait_metric(http, "vigil_answer_bytes_held", ANSWER_MEMORY).await;
        let refused = tcp.query("true").await.unwrap_err().to_string();
        assert!(refused.contains("--max-answer-memory"), "{refused}");
        drop((answer, h2, sending));
        driven.abort();
        wait_metric(http, "vigil_answer_bytes_held", 0).await;
    }
    assert_eq!(within(tcp.query("true")).await.unwrap().len(), 3_001);
    wait_metric(http, "vigil_answers_refused_busy_total", 2).await;
}

fn query_of(query: &str) -> Vec<u8> {
    proto::Msg {
        query: Some(proto::PbQuery {
            string: Some(query.into()),
        }),
        ..proto::Msg::default()
    }
    .encode_to_vec()
}

/// An answer holding room must be taken whole within `--read-timeout`, as a
/// Riemann TCP answer must: an HTTP/1 client reading it steadily (every
/// write progressing well within the timeout) but slowly would otherwise
/// keep the pool, every other large answer refused as busy, for as long as
/// the answer lasted at its pace (a 12 MB answer at 330 KB/s: 32 s, six
/// times a 5 s timeout). It is cut short, counted, and its room is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_read_slowly_gives_its_room_back_after_the_read_timeout() {
    let _alone = ALONE.lock().await;
    let v = holding_large_answers(&["--read-timeout", "2s"]).await;
    let http = v.http.unwrap();
    // A small receive buffer, fixed: grown by the kernel's autotuning (up
    // to 32 MiB here), it took the whole answer in while the client slept,
    // and the server saw it written within the timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let mut slow = socket.connect(http).await.unwrap();
    let get = b"GET /index?query=true HTTP/1.1\r\nHost: vigil\r\n\r\n";
    slow.write_all(get).await.unwrap();
    // 512 KiB every quarter of a second: the whole answer in some 6 s (the
    // connection is kept open after it, and closed once idle).
    let (mut taken, mut buffer) = (0, vec![0; 512 * 1024]);
    'reading: loop {
        let mut part = 0;
        while part < buffer.len() {
            match within(slow.read(&mut buffer[part..])).await {
                Ok(0) | Err(_) => break 'reading,
                Ok(n) => (part, taken) = (part + n, taken + n),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_metric(http, "vigil_answer_bytes_held", 0).await;
    let whole = within(reqwest::get(format!("http://{http}/index?query=true")))
        .await
        .unwrap();
    assert_eq!(whole.status(), reqwest::StatusCode::OK, "its room is back");
    let whole = whole.bytes().await.unwrap().len();
    assert!(
        taken < whole,
        "cut short: {taken} bytes (with the head) of {whole}"
    );
    wait_metric(http, "vigil_http_responses_unread_total", 1).await;
}

/// The same over gRPC: a `Query` answer its client takes steadily (its
/// window given back a quarter of a megabyte at a time, four times a
/// second) but not whole within `--read-timeout` is reset, and its room is
/// back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_answer_read_slowly_gives_its_room_back_after_the_read_timeout() {
    let _alone = ALONE.lock().await;
    let v = holding_large_answers(&["--read-timeout", "2s"]).await;
    let (http, grpc) = (v.http.unwrap(), v.grpc.unwrap());
    let call = axum::http::Request::post(format!("http://{grpc}/vigil.Vigil/Query"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let request = QueryRequest::new("true").encode_to_vec();
    let mut message = vec![0];
    message.extend_from_slice(&(request.len() as u32).to_be_bytes());
    message.extend_from_slice(&request);
    let io = TcpStream::connect(grpc).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(io).await.unwrap();
    let driven = tokio::spawn(connection);
    let (answer, mut sending) = h2.send_request(call, false).unwrap();
    sending.send_data(message.into(), true).unwrap();
    let mut body = within(answer).await.unwrap().into_body();
    let (mut taken, mut since_pause) = (0, 0);
    let ended = loop {
        match within(body.data()).await {
            Some(Ok(data)) => {
                (taken, since_pause) = (taken + data.len(), since_pause + data.len());
                body.flow_control().release_capacity(data.len()).unwrap();
            }
            Some(Err(e)) => break Some(e),
            None => break None,
        }
        if since_pause >= 256 * 1024 {
            since_pause = 0;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    assert!(ended.is_some(), "reset after {taken} bytes, not ended");
    wait_metric(http, "vigil_answer_bytes_held", 0).await;
    wait_metric(http, "vigil_grpc_responses_unread_total", 1).await;
    drop((body, h2));
    driven.abort();
}
