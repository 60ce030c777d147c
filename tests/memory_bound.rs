//! Memory stays bounded under the cheapest abuse there is: many connections
//! each announcing the largest allowed frame and then sending almost nothing.
//! A codec that reserves the announced length would need 500 × 16 MiB = 8 GiB
//! here; vigil must hold only what was actually sent. And a request costs
//! about its own size: a gRPC `Msg` of millions of empty events is refused
//! without decoding them. (Its own test binary, one test at a time: the memory
//! measured is the whole process's.)

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::peak_of;

use vigil::clock::{SharedClock, SystemClock};
use vigil::grpc::{GrpcLimits, Msg, VigilClient};
use vigil::index::{Index, IndexConfig};
use vigil::limits::Limits;
use vigil::proto::PbEvent;
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
