//! Memory stays bounded under the cheapest abuse there is: many connections
//! each announcing the largest allowed frame and then sending almost nothing.
//! A codec that reserves the announced length would need 500 × 16 MiB = 8 GiB
//! here; vigil must hold only what was actually sent. (Its own test binary:
//! the resident size measured is the whole process's.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use vigil::clock::{SharedClock, SystemClock};
use vigil::index::{Index, IndexConfig};
use vigil::server::{Server, ServerConfig};
use vigil::stats::Stats;
use vigil::streams::IndexEverything;

const CONNECTIONS: usize = 500;

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
