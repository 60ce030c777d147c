//! The server in-process on an ephemeral port, with its index, its virtual
//! clock and its counters at hand: for tests that need to look inside, where
//! [`super::Vigil`] runs the real binary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use vigil::client::Client;
use vigil::clock::{MICROS_PER_SEC, ManualClock, SharedClock, SystemClock};
use vigil::event::Event;
use vigil::grpc::{Grpc, GrpcLimits};
use vigil::index::{Index, IndexConfig};
use vigil::server::{Server, ServerConfig};
use vigil::stats::Stats;
use vigil::streams::{IndexEverything, Streams};

/// Where the virtual clock starts.
pub const T0: i64 = 1_700_000_000 * MICROS_PER_SEC;
/// Bound on every wait for the server; never reached when things work.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Harness {
    pub server: Server,
    pub index: Arc<Index>,
    pub clock: Arc<ManualClock>,
}

impl Harness {
    pub async fn start(config: ServerConfig) -> Harness {
        let index = Arc::new(Index::new(IndexConfig::default()));
        let streams = Arc::new(IndexEverything::new(index.clone()));
        Self::with_streams(config, index, streams).await
    }

    pub async fn with_streams(
        config: ServerConfig,
        index: Arc<Index>,
        streams: Arc<dyn Streams>,
    ) -> Harness {
        let clock = Arc::new(ManualClock::new(T0));
        let config = ServerConfig {
            tcp: "127.0.0.1:0".parse().unwrap(),
            tick: Duration::from_millis(10),
            // The tests step the clock ahead to expire entries.
            resume_after_stalls: false,
            ..config
        };
        let shared: SharedClock = clock.clone();
        let server = Server::start(config, index.clone(), streams, shared)
            .await
            .expect("server starts");
        Harness {
            server,
            index,
            clock,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.tcp_addr
    }

    pub fn count(&self, pick: fn(&Stats) -> &AtomicU64) -> u64 {
        Stats::get(pick(&self.server.stats))
    }

    /// Polls until the counter reaches `want`; panics after [`WAIT`].
    pub async fn wait_count(&self, pick: fn(&Stats) -> &AtomicU64, want: u64) {
        wait_stat(&self.server.stats, pick, want).await;
    }

    /// A fresh client can still send and read back an event.
    pub async fn assert_serves(&self) {
        let mut client = tokio::time::timeout(WAIT, Client::connect(self.addr()))
            .await
            .expect("connects in time")
            .expect("connects");
        let event = Event {
            host: Some("fresh".into()),
            service: Some("probe".into()),
            time: T0,
            ..Event::default()
        };
        client.send(&[event]).await.expect("acked");
        let found = client
            .query(r#"host = "fresh" and service = "probe""#)
            .await
            .expect("query answered");
        assert_eq!(found.len(), 1);
    }
}

/// Polls until the counter of `stats` reaches `want`; panics after [`WAIT`].
pub async fn wait_stat(stats: &Stats, pick: fn(&Stats) -> &AtomicU64, want: u64) {
    wait_until(
        || Stats::get(pick(stats)) == want,
        || format!("counter at {} instead of {want}", Stats::get(pick(stats))),
    )
    .await;
}

/// Polls until `done`; panics after [`WAIT`] saying `what` is still so.
pub async fn wait_until(done: impl Fn() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{} after {WAIT:?}", what());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the server sent before it closed `stream`; panics if it is still
/// open after [`WAIT`].
pub async fn read_until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(stream, &mut received);
    // An error is a reset: closed all the same.
    let _ = tokio::time::timeout(WAIT, read)
        .await
        .expect("the server closed the connection");
    received
}

/// `body` with its 4-byte big-endian length prefix.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// Deterministic junk bytes for bad-input tests: the same every run.
pub fn noise(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The gRPC listener in-process within `limits`, indexing everything, on the
/// system clock; with its index and counters.
pub async fn grpc(limits: GrpcLimits) -> (Grpc, Arc<Index>, Arc<Stats>) {
    let index = Arc::new(Index::new(IndexConfig::default()));
    let stats = Arc::new(Stats::default());
    let grpc = Grpc::start(
        "127.0.0.1:0".parse().unwrap(),
        limits,
        index.clone(),
        Arc::new(IndexEverything::new(index.clone())),
        Arc::new(SystemClock),
        stats.clone(),
        None,
    )
    .await
    .expect("gRPC listener starts");
    (grpc, index, stats)
}
