//! Riemann over TCP, plain or TLS: the accept loop (which the Graphite
//! listener runs too) and the per-connection handler (one, generic over the
//! stream).
//!
//! Framing is a 4-byte big-endian length then a protobuf `Msg`, both ways. Every
//! `Msg` gets exactly one reply, in order; clients pipeline, so replies to all
//! frames already buffered are written with one flush.
//!
//! Bounds, so no client can hold resources indefinitely:
//! - at most `max_connections` open at once, plain and TLS together; one more
//!   is accepted and closed at once, and counted;
//! - a frame, once begun, must be complete within `read_timeout` (at most
//!   twice that from its first byte: it is checked at that interval), and
//!   trickling bytes does not extend it, so slowloris clients are closed.
//!   An idle connection, with no frame begun, is kept however long, as
//!   Riemann keeps it (some clients do not reconnect when it is closed);
//!   TCP keepalive probes it once idle for `read_timeout`, so one whose
//!   peer vanished is ended. The TLS handshake, and writing a batch of
//!   replies to a client that does not read, get the `read_timeout` bound;
//! - a frame over 64 KiB is read on only once it has room in the memory budget
//!   all connections share ([`crate::budget`]): until then the connection
//!   reads nothing more, and its read timeout runs from when it got the room.
//!   Holding room, it must keep the pace that brings it in within that
//!   timeout, or the connection is closed and the room goes back.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bounded::{self, LogGate, RefusalLog};
use crate::budget::{Budget, TooSlow};
use crate::event::Event;
pub use crate::frame::DEFAULT_MAX_FRAME;
use crate::frame::{self, FrameCodec, FrameError, Gated};
use crate::ingest::{Ingest, Reply, Transport};
use crate::proto;
use crate::stats::Stats;
use crate::tls::Acceptor;

/// Far above any real fleet's agents, far below the default fd limit of a
/// service (each connection is one descriptor).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Riemann clients send at least every few seconds; a minute of silence is
/// a dead or hostile peer.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The wire framing, shared with the client.
pub fn codec(max_frame: usize) -> FrameCodec {
    FrameCodec::new(max_frame)
}

/// What every connection needs, shared by the plain and the TLS listener.
pub struct Connections {
    pub ingest: Arc<Ingest>,
    pub max_frame: usize,
    /// Shared with every connection of every transport: room for large frames.
    pub memory: Budget,
    pub read_timeout: Duration,
    /// One permit per open connection: `max_connections` in all.
    pub permits: Arc<Semaphore>,
    /// Shared by the plain and the TLS listener, like the permits.
    pub refusals: RefusalLog,
    /// Failed TLS handshakes are warned about through this: a client whose
    /// certificate is refused is a misconfiguration someone must see, a
    /// scanner's flood must not fill the log.
    pub tls_failures: LogGate,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

type RiemannFramed<S> = Framed<Gated<S>, FrameCodec>;

/// Accepts until shutdown; with `tls`, each connection handshakes first.
pub async fn serve(listener: TcpListener, conns: Arc<Connections>, tls: Option<Arc<Acceptor>>) {
    let each = Listener {
        name: "riemann",
        stats: &conns.ingest.stats,
        permits: &conns.permits,
        refusals: &conns.refusals,
        read_timeout: conns.read_timeout,
        shutdown: &conns.shutdown,
        tracker: &conns.tracker,
        accepted: |stats| &stats.tcp_connections,
        open: |stats| &stats.tcp_connections_open,
        refused: |stats| &stats.tcp_connections_refused,
    };
    accept_loop(listener, each, |socket, peer| {
        // Only this listener writes: small replies, awaited by pipelining clients.
        let _ = socket.set_nodelay(true);
        let conns = conns.clone();
        let tls = tls.as_ref().map(|tls| tls.current());
        async move {
            match tls {
                None => conns.handle(socket, peer).await,
                Some(acceptor) => conns.handle_tls(&acceptor, socket, peer).await,
            }
        }
    })
    .await;
}

/// A kind of TCP listener as [`accept_loop`] bounds and counts it.
pub struct Listener<'a> {
    /// As its logs name it.
    pub name: &'static str,
    pub stats: &'a Arc<Stats>,
    /// One per open connection: `--max-connections`.
    pub permits: &'a Arc<Semaphore>,
    pub refusals: &'a RefusalLog,
    /// Idle connections are probed by TCP keepalive after this.
    pub read_timeout: Duration,
    pub shutdown: &'a CancellationToken,
    pub tracker: &'a TaskTracker,
    pub accepted: fn(&Stats) -> &AtomicU64,
    pub open: fn(&Stats) -> &AtomicU64,
    pub refused: fn(&Stats) -> &AtomicU64,
}

/// Accepts until shutdown, each connection within the listener's permits
/// handled on a task of its own (on its tracker); one more is closed at once
/// and counted. The Riemann and the Graphite TCP listeners run this.
pub async fn accept_loop<H, F>(listener: TcpListener, each: Listener<'_>, handle: H)
where
    H: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = io::Result<()>> + Send + 'static,
{
    let name = each.name;
    loop {
        let (socket, peer) = tokio::select! {
            accepted = accept(&listener, name) => accepted,
            () = each.shutdown.cancelled() => return,
        };
        let Ok(permit) = each.permits.clone().try_acquire_owned() else {
            // Dropping the socket closes it: the client sees EOF at once.
            each.refusals
                .refused(name, peer, (each.refused)(each.stats));
            continue;
        };
        bounded::probe_when_idle(&socket, each.read_timeout);
        Stats::incr((each.accepted)(each.stats));
        let handled = handle(socket, peer);
        let (stats, open) = (each.stats.clone(), each.open);
        each.tracker.spawn(async move {
            Stats::incr(open(&stats));
            if let Err(e) = handled.await {
                tracing::debug!(listener = name, %peer, error = %e, "Connection ended with an error.");
            }
            Stats::decr(open(&stats));
            drop(permit);
        });
    }
}

/// The next connection of `listener`. Accept errors (usually EMFILE) are
/// logged and retried after a pause instead of spun on.
pub async fn accept(listener: &TcpListener, what: &'static str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!(listener = what, error = %e, "Accept failed; backing off.");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

impl Connections {
    async fn handle_tls(
        &self,
        acceptor: &TlsAcceptor,
        socket: TcpStream,
        peer: SocketAddr,
    ) -> io::Result<()> {
        let stats = &self.ingest.stats;
        let handshake = tokio::select! {
            handshake = tokio::time::timeout(self.read_timeout, acceptor.accept(socket)) => handshake,
            () = self.shutdown.cancelled() => return Ok(()),
        };
        let stream = match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                self.tls_failed(peer, &e.to_string());
                return Ok(());
            }
            Err(_) => {
                self.tls_failed(peer, "no handshake within --read-timeout");
                return Ok(());
            }
        };
        Stats::incr(&stats.tls_connections);
        self.handle(stream, peer).await
    }

    /// Counts a failed handshake; warns at most every 10 s (with the count so
    /// far), at debug otherwise.
    fn tls_failed(&self, peer: SocketAddr, error: &str) {
        let failures = &self.ingest.stats.tls_handshake_failures;
        Stats::incr(failures);
        if self.tls_failures.open() {
            let failures = Stats::get(failures);
            tracing::warn!(%peer, error, failures, "TLS handshake failed (more are logged at most every 10 s; all are counted in tls_handshake_failures).");
        } else {
            tracing::debug!(%peer, error, "TLS handshake failed.");
        }
    }

    async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        peer: SocketAddr,
    ) -> io::Result<()> {
        let (stream, codec) = frame::gated(stream, self.max_frame, &self.memory, self.read_timeout);
        let mut framed = Framed::new(stream, codec);
        let mut buffers = Buffers::default();
        // Reset only when a frame completes, never by a byte arriving.
        let deadline = tokio::time::sleep(self.read_timeout);
        tokio::pin!(deadline);
        // Whether the last check found a frame begun: the next one, a
        // timeout later, closes the connection if it is still not whole.
        let mut begun = false;
        loop {
            let next = tokio::select! {
                next = framed.next() => next,
                () = &mut deadline => {
                    // A frame that waited for room in the memory budget has
                    // the whole timeout from when it got it.
                    let from = framed.get_ref().room_since();
                    let later = from.map(|from| from + self.read_timeout);
                    if let Some(until) = later.filter(|&until| until > Instant::now()) {
                        deadline.as_mut().reset(until);
                        continue;
                    }
                    let idle = framed.read_buffer().is_empty() && from.is_none();
                    if idle || !begun {
                        begun = !idle;
                        deadline.as_mut().reset(Instant::now() + self.read_timeout);
                        continue;
                    }
                    Stats::incr(&self.ingest.stats.tcp_read_timeouts);
                    tracing::debug!(%peer, timeout = ?self.read_timeout, "No complete frame in time; closing the connection.");
                    return Ok(());
                }
                () = self.shutdown.cancelled() => return Ok(()),
            };
            let after = self.answer(&mut framed, next, &mut buffers).await;
            // Only the writing waits on the client, so only it is bounded by
            // the timeout, and the timer is armed only when a write is held
            // up (nearly never), not once per batch.
            let written = self.write(&mut framed, &mut buffers.out, after);
            tokio::pin!(written);
            let written = match futures_util::poll!(&mut written) {
                Poll::Ready(written) => Ok(written),
                Poll::Pending => tokio::time::timeout(self.read_timeout, written).await,
            };
            match written {
                Ok(Ok(true)) => {
                    begun = false;
                    deadline.as_mut().reset(Instant::now() + self.read_timeout);
                }
                Ok(done) => return done.map(drop),
                Err(_) => {
                    Stats::incr(&self.ingest.stats.tcp_write_timeouts);
                    tracing::debug!(%peer, timeout = ?self.read_timeout, "Client not reading its replies; closing the connection.");
                    return Ok(());
                }
            }
        }
    }

    /// Handles `next` and every further frame already buffered: their
    /// replies, in order, land in `buffers.out`. The frames' events go
    /// through the rules as one batch; in a cluster the buffered frames'
    /// events are all sent before their acks are awaited (replies stay in
    /// order), so a pipelining client is not held to one JetStream round trip
    /// per frame. A reply waits only on the server (a scan, the cluster),
    /// never on the client; but the replies so far are written (within the
    /// write timeout) before a further frame is handled once they are over
    /// [`MAX_BATCH_BYTES`]: a query's answer may be `--max-query-results`
    /// events, and a batch of pipelined queries would otherwise hold all of
    /// theirs at once (16 of 100 000 events each took a server to 1.7 GB).
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        framed: &mut RiemannFramed<S>,
        mut next: Option<Result<BytesMut, FrameError>>,
        buffers: &mut Buffers,
    ) -> After {
        let Buffers {
            events,
            frames,
            replies,
            out,
        } = buffers;
        let (mut bytes, mut largest) = (0, 0);
        // Only frames already complete in the read buffer join, and boundedly,
        // so a batch holds neither much memory nor its first reply for long.
        let after = loop {
            match next {
                Some(Ok(frame)) => {
                    bytes += frame.len();
                    largest = largest.max(frame.len());
                    frames.push(frame);
                }
                None => break After::Eof,
                Some(Err(e)) => break After::Failed(e),
            }
            if frames.len() >= MAX_BATCH_FRAMES || bytes >= MAX_BATCH_BYTES {
                break After::More;
            }
            match framed.next().now_or_never() {
                Some(more) => next = more,
                None => break After::More,
            }
        };
        Stats::add(&self.ingest.stats.tcp_messages, frames.len() as u64);
        let mut unhandled = frames.iter();
        // The bytes of the replies not yet written.
        let mut held = 0;
        // More than one round only after a query that scans the index: the
        // frames after it are handled once it is answered.
        while unhandled.len() > 0 {
            self.ingest
                .begin_all(&mut unhandled, Transport::Tcp, events, replies);
            let mut answered = replies.drain(..);
            while let Some(reply) = answered.next() {
                let reply = match reply {
                    // An ack, nearly always: no future to build and poll.
                    Reply::Ready(reply) => reply,
                    later => later.wait().await,
                };
                held += reply.len();
                out.push(reply);
                if held > MAX_BATCH_BYTES && (answered.len() > 0 || unhandled.len() > 0) {
                    if let Err(e) = self.write_now(framed, out).await {
                        frames.clear();
                        return After::Failed(FrameError::Io(e));
                    }
                    held = 0;
                }
            }
        }
        // Views into the read buffer: released before it is read into again.
        frames.clear();
        let buffer = framed.read_buffer_mut();
        // The read buffer grew to hold that frame and would keep its size for
        // as long as the connection stays open, idle or not; unless the next
        // large frame is already arriving in it.
        if largest > KEEP_BUFFER && buffer.len() <= KEEP_BUFFER {
            *buffer = BytesMut::from(&buffer[..]);
        }
        after
    }

    /// Writes the replies so far in the middle of a batch, within the write
    /// timeout (counted when it runs out).
    async fn write_now<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        framed: &mut RiemannFramed<S>,
        out: &mut Vec<Bytes>,
    ) -> io::Result<()> {
        match tokio::time::timeout(self.read_timeout, self.write(framed, out, After::More)).await {
            Ok(written) => written.map(drop),
            Err(_) => {
                Stats::incr(&self.ingest.stats.tcp_write_timeouts);
                // Cut off mid-write: kept, the replies were written again
                // when the connection closed, waiting out a second timeout
                // with their room held (and counted twice).
                out.clear();
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client not reading its replies",
                ))
            }
        }
    }

    /// Writes the replies with one flush. `false` when the connection is done.
    async fn write<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        framed: &mut RiemannFramed<S>,
        out: &mut Vec<Bytes>,
        after: After,
    ) -> io::Result<bool> {
        // Encoded straight into the write buffer, which the flush below
        // empties: `feed` would check for room once per (few-byte) reply.
        // A large answer is written from where it is held instead: copied
        // into the buffer, it took twice its size until flushed.
        let mut bytes = 0;
        for reply in out.iter() {
            let put = match reply.len() > KEEP_BUFFER {
                true => write_unbuffered(framed, reply).await,
                false => {
                    bytes += reply.len();
                    frame::put(reply, framed.write_buffer_mut())
                }
            };
            if let Err(e) = put {
                out.clear();
                return Err(e);
            }
        }
        let open = match after {
            After::More => SinkExt::<Bytes>::flush(framed).await.map(|()| true),
            // The peer finished sending: it may still be reading replies.
            After::Eof => SinkExt::<Bytes>::flush(framed).await.map(|()| false),
            After::Failed(e) => self.fail(framed, e).await.map(|()| false),
        };
        // Kept until written: a large answer holds its room in
        // `--max-answer-memory` until then.
        out.clear();
        let open = open?;
        if bytes > KEEP_BUFFER {
            // Many replies, written: their room is not kept.
            *framed.write_buffer_mut() = BytesMut::new();
        }
        Ok(open)
    }

    /// A framing error leaves the stream unsynchronised: say why (when the
    /// client can still hear it) and close.
    async fn fail<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        framed: &mut RiemannFramed<S>,
        error: FrameError,
    ) -> io::Result<()> {
        let stats = &self.ingest.stats;
        match error {
            FrameError::Oversized { len, max } => {
                Stats::incr(&stats.frames_oversized);
                tracing::info!(
                    len,
                    max,
                    "Frame over the size limit; closing the connection."
                );
                let reply: Bytes =
                    proto::error_reply(format!("frame exceeds the maximum size of {max} bytes"));
                framed.send(reply).await
            }
            // The peer stopped sending halfway through a frame: the frames
            // before it were handled, and it may still read their replies.
            FrameError::Truncated => {
                Stats::incr(&stats.frames_truncated);
                SinkExt::<Bytes>::flush(framed).await
            }
            FrameError::Io(e) => match e.get_ref().and_then(|e| e.downcast_ref::<TooSlow>()) {
                // Counted where it fell behind, and its room is already back;
                // logged like a read timeout, as a flood of them is noise.
                Some(too_slow) => {
                    tracing::debug!("{too_slow}; closing the connection.");
                    let reply: Bytes = proto::error_reply(too_slow.to_string());
                    framed.send(reply).await
                }
                None => Err(e),
            },
        }
    }
}

/// `reply` framed and written after what the write buffer holds, from
/// where it is: not copied into the buffer.
async fn write_unbuffered<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut RiemannFramed<S>,
    reply: &Bytes,
) -> io::Result<()> {
    frame::put_prefix(reply.len(), framed.write_buffer_mut())?;
    SinkExt::<Bytes>::flush(framed).await?;
    framed.get_mut().write_all(reply).await
}

/// Frames of one connection handled as one batch (and, in a cluster, whose
/// replies may wait on JetStream at once). Small enough that a client with
/// many frames in flight gets the first replies, and sends more, while the
/// rest are handled: one pipelined connection of 1-event messages (window 64)
/// is acked at ~1.3 M msgs/s with 16, ~0.85 M with 64, where the whole window
/// is one batch and client and server take turns (BENCHMARKS.md).
pub const MAX_BATCH_FRAMES: usize = 16;
/// Bytes of frames in one batch beyond which no further frame joins it.
const MAX_BATCH_BYTES: usize = 64 * 1024;
/// A read or write buffer that grew past this for one frame or one batch of
/// replies is given back once they are handled: a connection keeps room for
/// its usual traffic, not for the largest message it ever carried. Above the
/// frames of a forwarding vigil (up to 1 000 events, ~100-200 KB), which would
/// otherwise grow a fresh buffer for every batch.
const KEEP_BUFFER: usize = 256 * 1024;

/// What ended a batch of frames.
enum After {
    /// The batch is full, or no further frame is complete yet.
    More,
    /// The peer closed its side.
    Eof,
    Failed(FrameError),
}

/// A connection's buffers, reused from batch to batch so a steady stream of
/// frames is handled without allocating.
#[derive(Default)]
struct Buffers {
    /// Decoded events (their strings' allocations are reused too).
    events: Vec<Event>,
    frames: Vec<BytesMut>,
    replies: Vec<Reply>,
    /// The replies of a batch, written together.
    out: Vec<Bytes>,
}
