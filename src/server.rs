//! Wires a running vigil together: binds the listeners, spawns the TCP (plain
//! and, when configured, TLS), UDP, Graphite (when configured) and timer
//! tasks around one shared [`Ingest`], and shuts them down on request.
//!
//! Binding ([`Server::bind`]) and serving ([`Server::serve`]) are two steps
//! so that `vigil run` takes its ports before it loads a large saved state: a
//! port in use fails at once, and clients that connect meanwhile wait in the
//! kernel's queues instead of being refused.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::blocking::off_workers;
use crate::bounded::{self, LogGate, RefusalLog};
use crate::budget::{self, Budget};
use crate::clock::{Micros, SharedClock};
use crate::cluster::Cluster;
use crate::graphite_in::{self, Graphite};
use crate::index::{Index, Notices, StallWatch};
use crate::ingest::Ingest;
use crate::limits::Limits;
use crate::stats::Stats;
use crate::streams::Streams;
use crate::tls::TlsListener;
use crate::{tcp, udp};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub tcp: SocketAddr,
    /// `None` binds UDP on the same address (and port) TCP got.
    pub udp: Option<SocketAddr>,
    pub max_frame: usize,
    pub max_datagram: usize,
    /// Open TCP connections at once, plain and TLS together.
    pub max_connections: usize,
    /// Bytes all large messages may hold at once while they arrive, over
    /// every transport: [`Server::memory`] is shared with HTTP and gRPC.
    pub max_message_memory: usize,
    /// Longest wait for a frame to complete (and for a TLS handshake, and for
    /// replies to be written).
    pub read_timeout: Duration,
    /// What one `Msg` may carry, over TCP, TLS and UDP alike.
    pub limits: Limits,
    /// A second TCP listener speaking TLS; plain TCP keeps listening.
    pub tls: Option<TlsListener>,
    /// `--graphite`: Graphite plaintext lines, TCP and UDP on this address.
    pub graphite: Option<SocketAddr>,
    /// How often timers run: index expiry, then the time-based rule stages.
    pub tick: Duration,
    /// Whether the index entries whose TTL ran out during a stall of the
    /// process (the clock stepped ahead among them) get it again
    /// ([`StallWatch::tick_starts`]); off in tests that step a manual
    /// clock ahead to expire entries.
    pub resume_after_stalls: bool,
    /// `--cluster`: events go to the cluster (acked once stored), queries fan out.
    pub cluster: Option<Arc<Cluster>>,
    /// The counters, shared with what else the process counts in them.
    pub stats: Arc<Stats>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            tcp: SocketAddr::from(([127, 0, 0, 1], 5555)),
            udp: None,
            max_frame: tcp::DEFAULT_MAX_FRAME,
            max_datagram: udp::DEFAULT_MAX_DATAGRAM,
            max_connections: tcp::DEFAULT_MAX_CONNECTIONS,
            max_message_memory: budget::DEFAULT_MAX,
            read_timeout: tcp::DEFAULT_READ_TIMEOUT,
            limits: Limits::DEFAULT,
            tls: None,
            graphite: None,
            tick: Duration::from_millis(100),
            resume_after_stalls: true,
            cluster: None,
            stats: Arc::default(),
        }
    }
}

/// A started server; dropping it does not stop it, [`Server::shutdown`] does.
pub struct Server {
    pub tcp_addr: SocketAddr,
    pub udp_addr: SocketAddr,
    /// Where TLS listens, when configured.
    pub tls_addr: Option<SocketAddr>,
    /// Where Graphite listens (TCP and UDP), when configured.
    pub graphite_addr: Option<SocketAddr>,
    pub stats: Arc<Stats>,
    /// Room for large messages, for the HTTP and gRPC listeners to share.
    pub memory: Budget,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// The server's sockets, bound and not served yet: connections queue in the
/// kernel (up to the listen backlog) and datagrams in the receive buffer
/// until [`Server::serve`].
pub struct Bound {
    pub tcp_addr: SocketAddr,
    pub udp_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub graphite_addr: Option<SocketAddr>,
    listener: TcpListener,
    udp_socket: UdpSocket,
    tls: Option<TcpListener>,
    graphite: Option<(TcpListener, UdpSocket)>,
}

impl Server {
    /// Binds and serves at once.
    pub async fn start(
        config: ServerConfig,
        index: Arc<Index>,
        streams: Arc<dyn Streams>,
        clock: SharedClock,
    ) -> io::Result<Server> {
        let bound = Server::bind(&config).await?;
        Ok(Server::serve(bound, config, index, streams, clock))
    }

    /// Binds the TCP, UDP, TLS and Graphite addresses of `config`, serving
    /// nothing yet.
    pub async fn bind(config: &ServerConfig) -> io::Result<Bound> {
        let listener = bind_tcp("--tcp", config.tcp).await?;
        let tcp_addr = listener.local_addr()?;
        let udp = config.udp.unwrap_or(tcp_addr);
        let udp_socket = (UdpSocket::bind(udp).await).map_err(not_bound("--udp", udp))?;
        let udp_addr = udp_socket.local_addr()?;
        let tls = match &config.tls {
            Some(tls) => Some(bind_tcp("--tls", tls.addr).await?),
            None => None,
        };
        let tls_addr = tls.as_ref().map(TcpListener::local_addr).transpose()?;
        let graphite = match config.graphite {
            Some(addr) => Some(bind_graphite(addr).await?),
            None => None,
        };
        let graphite_addr = (graphite.as_ref())
            .map(|(listener, _)| listener.local_addr())
            .transpose()?;
        Ok(Bound {
            tcp_addr,
            udp_addr,
            tls_addr,
            graphite_addr,
            listener,
            udp_socket,
            tls,
            graphite,
        })
    }

    /// Serves what [`Server::bind`] bound of `config` (its addresses are
    /// not read again), events going into `index` through `streams`.
    pub fn serve(
        bound: Bound,
        config: ServerConfig,
        index: Arc<Index>,
        streams: Arc<dyn Streams>,
        clock: SharedClock,
    ) -> Server {
        let Bound {
            tcp_addr,
            udp_addr,
            tls_addr,
            graphite_addr,
            listener,
            udp_socket,
            tls,
            graphite,
        } = bound;
        let tls = tls.zip(config.tls.map(|tls| tls.acceptor));
        let stats = config.stats.clone();
        let ingest = Arc::new(Ingest {
            index: index.clone(),
            streams: streams.clone(),
            clock: clock.clone(),
            stats: stats.clone(),
            limits: config.limits,
            cluster: config.cluster.clone(),
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let memory = Budget::new(config.max_message_memory, stats.clone());
        let conns = Arc::new(tcp::Connections {
            ingest: ingest.clone(),
            max_frame: config.max_frame,
            memory: memory.clone(),
            read_timeout: config.read_timeout,
            permits: bounded::connection_permits(config.max_connections),
            refusals: RefusalLog::default(),
            tls_failures: LogGate::default(),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        });
        tracker.spawn(tcp::serve(listener, conns.clone(), None));
        if let Some((listener, acceptor)) = tls {
            tracker.spawn(tcp::serve(listener, conns, Some(acceptor)));
        }
        if let Some((listener, socket)) = graphite {
            let graphite = Arc::new(Graphite {
                ingest: ingest.clone(),
                read_timeout: config.read_timeout,
                permits: bounded::connection_permits(config.max_connections),
                refusals: RefusalLog::default(),
                bad_lines: LogGate::default(),
                not_stored: LogGate::default(),
                shutdown: shutdown.clone(),
                tracker: tracker.clone(),
            });
            tracker.spawn(graphite_in::serve_tcp(listener, graphite.clone()));
            tracker.spawn(graphite_in::serve_udp(socket, graphite));
        }
        tracker.spawn(udp::serve(
            udp_socket,
            ingest,
            config.max_datagram,
            shutdown.clone(),
        ));
        tracker.spawn(run_timers(
            index,
            config.cluster,
            streams,
            clock,
            config.tick,
            config.resume_after_stalls,
            shutdown.clone(),
        ));
        Server {
            tcp_addr,
            udp_addr,
            tls_addr,
            graphite_addr,
            stats,
            memory,
            shutdown,
            tracker,
        }
    }

    /// Stops accepting, ends every connection at its next frame boundary and
    /// waits (up to `grace`) for the tasks to finish.
    pub async fn shutdown(self, grace: Duration) {
        stop_tasks(&self.shutdown, &self.tracker, grace, "server").await;
    }
}

/// A listener's bind error, naming the flag that chose its address: every
/// listener fails alike ("Address already in use"), and the operator must
/// know which one to move.
pub fn not_bound(flag: &'static str, addr: SocketAddr) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{flag} {addr}: {e}"))
}

/// Graphite's TCP listener on `addr`, and its UDP socket on the address
/// (and port) TCP got, as the Riemann listeners share theirs.
async fn bind_graphite(addr: SocketAddr) -> io::Result<(TcpListener, UdpSocket)> {
    let listener = bind_tcp("--graphite", addr).await?;
    let bound = listener.local_addr()?;
    let socket = (UdpSocket::bind(bound).await).map_err(not_bound("--graphite", bound))?;
    Ok((listener, socket))
}

/// A TCP listener on `addr`, the address `flag` chose; its error names both.
pub async fn bind_tcp(flag: &'static str, addr: SocketAddr) -> io::Result<TcpListener> {
    (TcpListener::bind(addr).await).map_err(not_bound(flag, addr))
}

/// Cancels `shutdown`, then waits up to `grace` for every task `tracker`
/// tracks; what is still running then is logged and left to the runtime.
pub async fn stop_tasks(
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    grace: Duration,
    what: &'static str,
) {
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            ?grace,
            what,
            "Tasks still running after the shutdown grace period."
        );
    }
}

/// Each tick: expired index entries go back through the streams like any other
/// event (in a cluster, only those of shards running here), then the streams'
/// own timers (rates, windows) get their turn.
async fn run_timers(
    index: Arc<Index>,
    cluster: Option<Arc<Cluster>>,
    streams: Arc<dyn Streams>,
    clock: SharedClock,
    interval: Duration,
    resume_after_stalls: bool,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The rules' own, which their batches tell too.
    let stalls = streams.stalls().unwrap_or_else(|| {
        Arc::new(StallWatch::new(
            Micros::try_from(interval.as_micros()).unwrap_or(Micros::MAX),
        ))
    });
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        // On a blocking thread: a mass expiry (a rack going silent) runs
        // thousands of notices through the rules, which must not hold an
        // async worker and the connections queued on it.
        let (index, cluster, streams, clock, stalls) = (
            index.clone(),
            cluster.clone(),
            streams.clone(),
            clock.clone(),
            stalls.clone(),
        );
        let ticked = off_workers(move || {
            let started = std::time::Instant::now();
            let now = clock.now();
            // Before the expiry, as a restart restores before it.
            let ticking = stalls.tick_starts(resume_after_stalls.then_some(&*index), now);
            let emit = |notices: Notices<'_>| streams.process_expired(notices);
            let expired = match &cluster {
                Some(cluster) => cluster.expire(now, emit),
                None => index.expire_batches(now, emit),
            };
            streams.tick();
            stalls.seen(clock.now());
            drop(ticking);
            (expired, started.elapsed())
        });
        // `None`: the runtime is shutting down.
        if let Some((expired @ 1.., elapsed)) = ticked.await {
            tracing::debug!(count = expired, ?elapsed, "Expired index entries.");
        }
    }
}
