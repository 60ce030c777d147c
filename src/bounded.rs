//! Bounds on the connections hyper and tonic drive (HTTP, WebSocket, SSE,
//! gRPC), as the Riemann TCP handler has its own: how many may be open at
//! once, how long a new one may stay silent, and how long a peer may leave
//! vigil's writes unread.
//!
//! - Over `max_connections` open, a new connection is accepted and closed at
//!   once, and counted: a flood of idle clients cannot take every file
//!   descriptor (and with them the agents' listeners). A warning says so at
//!   most every ten seconds per listener ([`RefusalLog`], which the Riemann
//!   TCP listeners share).
//! - A connection whose first byte has not come `read_timeout` after its
//!   first read began fails that read, which ends it, and is counted. hyper
//!   waits for the first bytes (to tell HTTP/1 from HTTP/2) and tonic for the
//!   HTTP/2 preface with no limit of their own; what a client may take after
//!   that is bounded by the servers (request heads, keepalive pings).
//! - Those servers write a response, or a subscriber's next event, and wait
//!   as long as the peer's receive window stays full: a client that stops
//!   reading without closing, or a peer that vanished, would hold its
//!   connection task, socket and buffers forever. A write (or flush) that
//!   made no progress for `write_timeout` fails instead, which ends the
//!   connection, and is counted.
//! - A peer that vanished (host down, link cut) acknowledges nothing, yet
//!   small writes (an SSE keep-alive, a quiet subscription) fit in the send
//!   buffer and never stall, and the kernel retransmits to it for about 15
//!   minutes. [`Bounded::watched`] ends such a connection once nothing has
//!   been acknowledged for twice the write timeout while data waits (a peer
//!   that reads slowly acknowledges what it takes, and is kept). The graphite
//!   output has the kernel do so ([`limit_unacked`]), and counts as delivered
//!   only what carbon's TCP acknowledged ([`unacked_bytes`]): carbon
//!   acknowledges nothing else.
//! - An HTTP/2 connection may carry at most [`MAX_STREAMS`] requests at once.
//!   One of them left unread while the client reads the connection stalls
//!   no write here: [`crate::unread`] drops such an answer.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::stats::Stats;

/// Requests (gRPC calls) open at once on one HTTP/2 connection. Each may be
/// receiving a body of up to `--max-frame` (a `POST /events` of 16 MiB),
/// held until it is whole, so this bounds what one connection can make vigil
/// hold; tonic's default is no limit at all, hyper's 200.
pub const MAX_STREAMS: u32 = 64;

/// Refusals are logged at most this often; the counter has every one.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Has the kernel end `stream` once data sent on it has gone unacknowledged
/// for twice `write_timeout` (`TCP_USER_TIMEOUT`). Twice, so that a peer that
/// only stopped reading (its window closed, which also counts as unacked)
/// is ended, and counted, by the write timeout first. A no-op off Linux.
pub fn limit_unacked(stream: &TcpStream, write_timeout: Duration) {
    #[cfg(target_os = "linux")]
    {
        let millis = write_timeout.saturating_mul(2).as_millis();
        let millis = u32::try_from(millis).unwrap_or(u32::MAX);
        if let Err(error) = rustix::net::sockopt::set_tcp_user_timeout(stream, millis) {
            tracing::debug!(%error, "Could not set TCP_USER_TIMEOUT.");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (stream, write_timeout);
}

/// Watches `socket` (a duplicate of a connection's, so the checks never
/// touch a descriptor closed and reused meanwhile) until `done`, and tells
/// `watch` once its peer looks vanished (host down, link cut): it holds data
/// vigil sent and has acknowledged nothing, not even a probe of its closed
/// window, for twice `write_timeout`, seen at two checks a check apart (so a
/// write just made after a long quiet is not taken for one). A peer that
/// reads slowly keeps acknowledging, so it is not taken for vanished however
/// long its answer takes (the kernel's `TCP_USER_TIMEOUT`, used before, ended
/// it); one that stopped reading is the write timeout's. Once the
/// connection is dropped, the watch [lingers](linger) over what it left.
async fn watch_for_vanishing(write_timeout: Duration, watch: Arc<Watch>, done: CancellationToken) {
    let quiet = write_timeout.saturating_mul(2);
    let every = check_every(write_timeout);
    let mut suspected = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = done.cancelled() => return linger(&watch.socket, write_timeout).await,
        }
        let looks = tcp_info(&watch.socket).is_some_and(|info| {
            let waiting = info.unacked > 0 || info.probes > 0;
            waiting && info.since_last_ack >= quiet
        });
        if looks && suspected {
            // Nothing more to send it: what the socket holds goes at close.
            abort_at_close(&watch.socket);
            watch.vanished.store(true, Ordering::Release);
            watch.waker.wake();
            return;
        }
        suspected = looks;
    }
}

/// What a connection's watch found, how to wake the connection's task, and
/// the duplicate of its socket the watch reads.
struct Watch {
    vanished: AtomicBool,
    waker: AtomicWaker,
    socket: std::os::fd::OwnedFd,
}

fn check_every(write_timeout: Duration) -> Duration {
    (write_timeout / 2).max(Duration::from_millis(250))
}

/// After its connection was dropped (an answer's end, an idle keep-alive
/// ended, a timeout): the socket, still open through the watch's duplicate,
/// sends what vigil wrote and the peer has not taken yet, then its end, for
/// as long as the peer takes some of it every `write_timeout`; a peer that
/// takes nothing for that long has it dropped (reset). Left to the kernel, an
/// orphaned socket is kept for minutes for a peer that answers probes of its
/// closed window but reads nothing (measured: 987 KB held past 166 s), and
/// `TCP_USER_TIMEOUT` would end one that reads slowly.
async fn linger(socket: &std::os::fd::OwnedFd, write_timeout: Duration) {
    let Some(mut acked) = tcp_info(socket).map(|info| info.bytes_acked) else {
        return;
    };
    // The peer hears the end right after the data, not once this is done.
    #[cfg(target_os = "linux")]
    let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Write);
    let mut progressed = Instant::now();
    loop {
        let Some(info) = tcp_info(socket) else { return };
        if info.unacked == 0 && info.not_sent == 0 {
            return;
        }
        if info.bytes_acked != acked {
            (acked, progressed) = (info.bytes_acked, Instant::now());
        } else if progressed.elapsed() >= write_timeout {
            return abort_at_close(socket);
        }
        tokio::time::sleep(check_every(write_timeout)).await;
    }
}

/// Has closing `socket` drop what it still holds and reset the connection.
fn abort_at_close(socket: &std::os::fd::OwnedFd) {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::net::sockopt::set_socket_linger(socket, Some(Duration::ZERO)) {
        tracing::debug!(%error, "Could not set SO_LINGER.");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// What the watch reads of a connection's TCP state (`TCP_INFO`).
struct TcpState {
    /// Segments sent and not acknowledged.
    unacked: u32,
    /// Probes of the peer's closed window it has not answered.
    probes: u8,
    since_last_ack: Duration,
    bytes_acked: u64,
    /// Bytes written and not sent yet.
    not_sent: u32,
}

/// `socket`'s TCP state; `None` when it cannot be read (or off Linux).
#[cfg(target_os = "linux")]
fn tcp_info(socket: &std::os::fd::OwnedFd) -> Option<TcpState> {
    use std::os::fd::AsRawFd;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, a plain C
    // struct for which all zeroes is a valid value; `len` is its size.
    let info = unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let got = libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        );
        if got != 0 {
            return None;
        }
        info
    };
    Some(TcpState {
        unacked: info.tcpi_unacked,
        probes: info.tcpi_probes,
        since_last_ack: Duration::from_millis(info.tcpi_last_ack_recv.into()),
        bytes_acked: info.tcpi_bytes_acked,
        not_sent: info.tcpi_notsent_bytes,
    })
}

#[cfg(not(target_os = "linux"))]
fn tcp_info(_: &std::os::fd::OwnedFd) -> Option<TcpState> {
    None
}

/// Has the kernel probe `stream` once it has been idle for `idle`, and end
/// it when three probes `idle / 3` apart (at least 1 s) go unanswered: a
/// connection kept open while idle, as Riemann clients keep theirs, is
/// still given up on once its peer has vanished. A no-op off Linux.
pub fn probe_when_idle(stream: &TcpStream, idle: Duration) {
    #[cfg(target_os = "linux")]
    {
        use rustix::net::sockopt;
        let interval = (idle / 3).max(Duration::from_secs(1));
        let set = sockopt::set_socket_keepalive(stream, true)
            .and_then(|()| sockopt::set_tcp_keepidle(stream, idle.max(Duration::from_secs(1))))
            .and_then(|()| sockopt::set_tcp_keepintvl(stream, interval))
            .and_then(|()| sockopt::set_tcp_keepcnt(stream, 3));
        if let Err(error) = set {
            tracing::debug!(%error, "Could not set TCP keepalive.");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (stream, idle);
}

/// Bytes written to `stream` that its peer has not acknowledged yet (sent or
/// not: `SIOCOUTQ`). Always 0 off Linux, where written means delivered.
pub fn unacked_bytes(stream: &TcpStream) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        use rustix::ioctl::{Getter, Opcode, ioctl};
        const SIOCOUTQ: Opcode = linux_raw_sys::ioctl::TIOCOUTQ as Opcode;
        // SAFETY: on a socket SIOCOUTQ (the same number as TIOCOUTQ) writes
        // one int, which is what the getter provides room for.
        let bytes = unsafe { ioctl(stream, Getter::<SIOCOUTQ, rustix::ffi::c_int>::new()) }?;
        Ok(usize::try_from(bytes).unwrap_or(0))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = stream;
        Ok(0)
    }
}

/// One permit per connection allowed open at once (tokio's semaphore holds
/// at most [`Semaphore::MAX_PERMITS`]).
pub fn connection_permits(max_connections: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS)))
}

/// Lets a warning through at most once per `REFUSAL_LOG_INTERVAL`: a flood
/// of what it warns about must not flood the log too.
#[derive(Default)]
pub struct LogGate {
    next: Mutex<Option<Instant>>,
}

impl LogGate {
    /// Whether to log now; if so, not again for the interval.
    pub fn open(&self) -> bool {
        let now = Instant::now();
        let mut next = self.next.lock();
        if next.is_some_and(|next| now < next) {
            return false;
        }
        *next = Some(now + REFUSAL_LOG_INTERVAL);
        true
    }
}

/// Warns that a listener is refusing connections at its limit, through a
/// [`LogGate`].
#[derive(Default)]
pub struct RefusalLog {
    gate: LogGate,
}

impl RefusalLog {
    /// Counts one refusal (of `peer`) in `counter`; true if it was also
    /// logged. The warning names that one peer: in a flood, one of many.
    pub fn refused(&self, listener: &'static str, peer: SocketAddr, counter: &AtomicU64) -> bool {
        Stats::incr(counter);
        let refused = Stats::get(counter);
        if !self.gate.open() {
            return false;
        }
        tracing::warn!(
            listener,
            refused,
            %peer,
            "Connection limit reached; refusing new connections (see --max-connections)."
        );
        true
    }
}

/// The counters of [`Stats`] one kind of listener bumps.
#[derive(Clone, Copy)]
pub struct Counters {
    /// The listener, as its refusal warnings name it.
    pub listener: &'static str,
    pub refused: fn(&Stats) -> &AtomicU64,
    pub read_timeouts: fn(&Stats) -> &AtomicU64,
    pub write_timeouts: fn(&Stats) -> &AtomicU64,
    /// `None` for HTTP/2 only: its keepalive ping, unanswered, closes a
    /// vanished peer's connection before the watch can find it.
    pub peers_vanished: Option<fn(&Stats) -> &AtomicU64>,
}

impl Counters {
    pub const HTTP: Counters = Counters {
        listener: "http",
        refused: |stats| &stats.http_connections_refused,
        read_timeouts: |stats| &stats.http_read_timeouts,
        write_timeouts: |stats| &stats.http_write_timeouts,
        peers_vanished: Some(|stats| &stats.http_peers_vanished),
    };
    pub const GRPC: Counters = Counters {
        listener: "grpc",
        refused: |stats| &stats.grpc_connections_refused,
        read_timeouts: |stats| &stats.grpc_read_timeouts,
        write_timeouts: |stats| &stats.grpc_write_timeouts,
        peers_vanished: None,
    };
}

/// The bounds of one listener, and the counters of [`Stats`] they bump.
#[derive(Clone)]
pub struct Bounds {
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// One permit per open connection.
    pub permits: Arc<Semaphore>,
    pub stats: Arc<Stats>,
    pub counters: Counters,
    refusals: Arc<RefusalLog>,
}

impl Bounds {
    pub fn new(
        max_connections: usize,
        read_timeout: Duration,
        write_timeout: Duration,
        stats: Arc<Stats>,
        counters: Counters,
    ) -> Self {
        Self {
            read_timeout,
            write_timeout,
            permits: connection_permits(max_connections),
            stats,
            counters,
            refusals: Arc::default(),
        }
    }

    /// Counts one connection closed for a request that never arrived whole.
    pub fn read_timed_out(&self) {
        Stats::incr((self.counters.read_timeouts)(&self.stats));
    }

    /// `io`, from `peer`, as a bounded connection, or `None` (counted;
    /// dropping `io` closes it) when as many are open as allowed.
    pub fn admit<IO>(&self, io: IO, peer: SocketAddr) -> Option<Bounded<IO>> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let counter = (self.counters.refused)(&self.stats);
            self.refusals.refused(self.counters.listener, peer, counter);
            return None;
        };
        Some(Bounded {
            io,
            bounds: self.clone(),
            _permit: permit,
            silent: Some(Deadline::default()),
            stalled: Deadline::default(),
            vanished: false,
            watch: None,
        })
    }
}

/// An admitted connection: it holds one permit until dropped, its reads fail
/// if its first byte does not come within the read timeout, and its writes
/// fail once the peer has accepted nothing for the write timeout.
pub struct Bounded<IO> {
    io: IO,
    bounds: Bounds,
    _permit: OwnedSemaphorePermit,
    /// Armed by the first read that waits; `None` once a byte came.
    silent: Option<Deadline>,
    /// Armed while a write waits on the peer; disarmed when one progresses.
    stalled: Deadline,
    /// The peer vanished (the kernel ended the connection, or the watch of
    /// [`Bounded::watched`] found it gone); counted once.
    vanished: bool,
    /// The watch, and what stops it once the connection is dropped.
    watch: Option<(Arc<Watch>, DropGuard)>,
}

impl Bounded<TcpStream> {
    /// This connection, ended (and counted) once its peer looks vanished
    /// (data unacknowledged, and no acknowledgement of anything for twice
    /// the write timeout), its socket held after it is dropped while the
    /// peer still takes what it holds. Must be called inside tokio.
    pub fn watched(mut self) -> Self {
        use std::os::fd::AsFd;
        let Ok(socket) = self.io.as_fd().try_clone_to_owned() else {
            // Out of descriptors: the kernel's bound, which also ends a
            // slow reader, beats none.
            limit_unacked(&self.io, self.bounds.write_timeout);
            return self;
        };
        let watch = Arc::new(Watch {
            vanished: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            socket,
        });
        let (write_timeout, done) = (self.bounds.write_timeout, CancellationToken::new());
        tokio::spawn(watch_for_vanishing(
            write_timeout,
            watch.clone(),
            done.clone(),
        ));
        self.watch = Some((watch, done.drop_guard()));
        self
    }
}

/// A timer armed by the first wait (no timer at all for I/O that never
/// waits); once it has gone off, every later wait fails at once.
#[derive(Default)]
struct Deadline {
    timer: Option<Pin<Box<Sleep>>>,
    expired: bool,
}

impl Deadline {
    /// Ready once `limit` has passed since the first call after a disarm;
    /// the first time it is, `counter` is bumped.
    fn poll(&mut self, limit: Duration, counter: &AtomicU64, cx: &mut Context<'_>) -> Poll<()> {
        if !self.expired {
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.expired = true;
            Stats::incr(counter);
        }
        Poll::Ready(())
    }

    fn disarm(&mut self) {
        self.timer = None;
    }
}

impl<IO> Bounded<IO> {
    /// What a pending write or flush becomes: still pending, or an error once
    /// the deadline passed.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let (timeout, bounds) = (self.bounds.write_timeout, &self.bounds);
        let counter = (bounds.counters.write_timeouts)(&bounds.stats);
        ready!(self.stalled.poll(timeout, counter, cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer read nothing for {timeout:?}"),
        )))
    }

    /// What a pending read becomes: still pending, or, before the first byte
    /// came, an error once the read timeout passed.
    fn silent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(silent) = &mut self.silent else {
            return Poll::Pending;
        };
        let (timeout, bounds) = (self.bounds.read_timeout, &self.bounds);
        let counter = (bounds.counters.read_timeouts)(&bounds.stats);
        ready!(silent.poll(timeout, counter, cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer sent nothing for {timeout:?}"),
        )))
    }

    fn progressed<T>(
        &mut self,
        done: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match done {
            Poll::Pending => self.stalled(cx),
            ready => {
                self.stalled.disarm();
                self.count_if_vanished(ready)
            }
        }
    }

    /// An error once the watch found the peer vanished (counted once), after
    /// having the watch wake this task when it does.
    fn watched_vanished<T>(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<T>>> {
        let (watch, _) = self.watch.as_ref()?;
        watch.waker.register(cx.waker());
        if !watch.vanished.load(Ordering::Acquire) {
            return None;
        }
        if !self.vanished {
            self.vanished = true;
            self.count_vanished();
        }
        let quiet = self.bounds.write_timeout.saturating_mul(2);
        Some(Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer acknowledged nothing for {quiet:?}: vanished"),
        ))))
    }

    fn count_vanished(&self) {
        if let Some(counter) = self.bounds.counters.peers_vanished {
            Stats::incr(counter(&self.bounds.stats));
        }
    }

    /// Counts the connection once if `done` is the kernel giving up on a
    /// peer that acknowledged nothing (`ETIMEDOUT`; vigil's own timeouts
    /// carry no OS error).
    fn count_if_vanished<T>(&mut self, done: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Poll::Ready(Err(e)) = &done
            && e.kind() == io::ErrorKind::TimedOut
            && e.raw_os_error().is_some()
            && !self.vanished
        {
            self.vanished = true;
            self.count_vanished();
        }
        done
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Bounded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(vanished) = this.watched_vanished(cx) {
            return vanished;
        }
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending => this.silent(cx),
            ready => {
                // A byte, the end or an error: the silence is over either way.
                this.silent = None;
                this.count_if_vanished(ready)
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Bounded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(vanished) = this.watched_vanished(cx) {
            return vanished;
        }
        let done = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progressed(done, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(vanished) = this.watched_vanished(cx) {
            return vanished;
        }
        let done = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progressed(done, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(vanished) = this.watched_vanished(cx) {
            return vanished;
        }
        let done = Pin::new(&mut this.io).poll_flush(cx);
        this.progressed(done, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.io).poll_shutdown(cx);
        this.progressed(done, cx)
    }
}

impl tonic::transport::server::Connected for Bounded<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const PEER: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        40000,
    ));

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn unacked_data_is_given_up_on_after_twice_the_write_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let unset = rustix::net::sockopt::tcp_user_timeout(&stream).unwrap();
        assert_eq!(unset, 0, "the kernel's default: retransmit for ~15 min");
        limit_unacked(&stream, Duration::from_secs(3));
        let set = rustix::net::sockopt::tcp_user_timeout(&stream).unwrap();
        assert_eq!(set, 6_000);
    }

    fn bounds(max_connections: usize, read_timeout_secs: u64, write_timeout_secs: u64) -> Bounds {
        Bounds::new(
            max_connections,
            Duration::from_secs(read_timeout_secs),
            Duration::from_secs(write_timeout_secs),
            Arc::default(),
            Counters::HTTP,
        )
    }

    #[test]
    fn connections_over_the_limit_are_refused_until_one_closes() {
        let bounds = bounds(2, 60, 60);
        let first = bounds.admit((), PEER).expect("under the limit");
        let _second = bounds.admit((), PEER).expect("at the limit");
        assert!(bounds.admit((), PEER).is_none());
        assert_eq!(Stats::get(&bounds.stats.http_connections_refused), 1);
        assert!(bounds.refusals.gate.next.lock().is_some(), "and warned of");
        drop(first);
        assert!(bounds.admit((), PEER).is_some(), "its permit came back");
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_once_per_interval() {
        let (log, counter) = (RefusalLog::default(), AtomicU64::new(0));
        assert!(log.refused("http", PEER, &counter), "the first is said");
        assert!(!log.refused("http", PEER, &counter));
        tokio::time::advance(REFUSAL_LOG_INTERVAL - Duration::from_millis(1)).await;
        assert!(
            !log.refused("http", PEER, &counter),
            "not before the interval is over"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(log.refused("http", PEER, &counter));
        assert!(!log.refused("http", PEER, &counter));
        assert_eq!(Stats::get(&counter), 5, "every refusal counted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_reads_fails_after_the_timeout() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let bounds = bounds(1, 60, 5);
        let mut io = bounds.admit(ours, PEER).unwrap();
        let started = tokio::time::Instant::now();
        let error = io.write_all(&[0; 1024]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // The connection is done: another write fails at once, not counted again.
        assert_eq!(
            io.write(&[0]).await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(Stats::get(&bounds.stats.http_write_timeouts), 1);
        assert_eq!(Stats::get(&bounds.stats.http_peers_vanished), 0);
    }

    /// A connection whose every read and write fails with one OS error.
    struct Failing(i32);

    impl AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::from_raw_os_error(self.0)))
        }
    }

    impl AsyncWrite for Failing {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::Error::from_raw_os_error(self.0)))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::from_raw_os_error(self.0)))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::from_raw_os_error(self.0)))
        }
    }

    #[tokio::test]
    async fn a_connection_the_kernel_timed_out_is_counted_once_as_vanished() {
        let bounds = bounds(2, 60, 60);
        let mut vanished = bounds.admit(Failing(libc::ETIMEDOUT), PEER).unwrap();
        let error = vanished.read(&mut [0; 8]).await.unwrap_err();
        assert_eq!(
            error.raw_os_error(),
            Some(libc::ETIMEDOUT),
            "passed on as it was"
        );
        vanished.write(&[0]).await.unwrap_err();
        vanished.flush().await.unwrap_err();
        assert_eq!(Stats::get(&bounds.stats.http_peers_vanished), 1);

        let mut reset = bounds.admit(Failing(libc::ECONNRESET), PEER).unwrap();
        reset.read(&mut [0; 8]).await.unwrap_err();
        reset.write(&[0]).await.unwrap_err();
        assert_eq!(
            Stats::get(&bounds.stats.http_peers_vanished),
            1,
            "a reset is the peer's doing"
        );
        assert_eq!(Stats::get(&bounds.stats.http_write_timeouts), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_never_timed_out() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let bounds = bounds(1, 60, 5);
        let mut io = bounds.admit(ours, PEER).unwrap();
        // 64 bytes every 4 s: each write waits on the reader, never 5 s.
        let reader = tokio::spawn(async move {
            let mut buf = [0; 64];
            let mut total = 0;
            while total < 1024 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                total += theirs.read(&mut buf).await.unwrap();
            }
            total
        });
        io.write_all(&[0; 1024]).await.unwrap();
        drop(io);
        assert_eq!(reader.await.unwrap(), 1024);
        assert_eq!(Stats::get(&bounds.stats.http_write_timeouts), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_silent_from_the_start_fails_the_read_after_the_timeout() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let bounds = bounds(1, 5, 60);
        let mut io = bounds.admit(ours, PEER).unwrap();
        let started = tokio::time::Instant::now();
        let mut buf = [0; 8];
        let error = io.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // Done: the next read fails at once, and is not counted again.
        assert_eq!(
            io.read(&mut buf).await.unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(Stats::get(&bounds.stats.http_read_timeouts), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn once_a_peer_has_spoken_reads_wait_as_long_as_it_takes() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let bounds = bounds(1, 5, 60);
        let mut io = bounds.admit(ours, PEER).unwrap();
        let peer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            theirs.write_all(b"a").await.unwrap();
            // Then quiet for far longer than the timeout (an idle WebSocket
            // subscriber, a kept-alive connection: their servers bound those).
            tokio::time::sleep(Duration::from_secs(50)).await;
            theirs.write_all(b"b").await.unwrap();
            theirs
        });
        let mut buf = [0; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        assert_eq!(&buf[..1], b"b");
        drop(peer.await.unwrap());
        assert_eq!(Stats::get(&bounds.stats.http_read_timeouts), 0);
    }
}
