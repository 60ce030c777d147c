//! Bounds on the connections hyper and tonic drive (HTTP, WebSocket, SSE,
//! gRPC), as the Riemann TCP handler has its own: how many may be open at
//! once, and how long a peer may leave vigil's writes unread.
//!
//! - Over `max_connections` open, a new connection is accepted and closed at
//!   once, and counted: a flood of idle clients cannot take every file
//!   descriptor (and with them the agents' listeners).
//! - Those servers write a response, or a subscriber's next event, and wait
//!   as long as the peer's receive window stays full: a client that stops
//!   reading without closing, or a peer that vanished, would hold its
//!   connection task, socket and buffers forever. A write (or flush) that
//!   made no progress for `write_timeout` fails instead, which ends the
//!   connection, and is counted.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::stats::Stats;

/// The bounds of one listener, and the counters of [`Stats`] they bump.
#[derive(Clone)]
pub struct Bounds {
    pub write_timeout: Duration,
    /// One permit per open connection.
    pub permits: Arc<Semaphore>,
    pub stats: Arc<Stats>,
    pub refused: fn(&Stats) -> &AtomicU64,
    pub write_timeouts: fn(&Stats) -> &AtomicU64,
}

impl Bounds {
    pub fn new(
        max_connections: usize,
        write_timeout: Duration,
        stats: Arc<Stats>,
        refused: fn(&Stats) -> &AtomicU64,
        write_timeouts: fn(&Stats) -> &AtomicU64,
    ) -> Self {
        Self {
            write_timeout,
            permits: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))),
            stats,
            refused,
            write_timeouts,
        }
    }

    /// `io` as a bounded connection, or `None` (counted; dropping `io`
    /// closes it) when as many are open as allowed.
    pub fn admit<IO>(&self, io: IO) -> Option<Bounded<IO>> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            Stats::incr((self.refused)(&self.stats));
            return None;
        };
        Some(Bounded {
            io,
            bounds: self.clone(),
            _permit: permit,
            stalled: None,
            expired: false,
        })
    }
}

/// An admitted connection: it holds one permit until dropped, and its writes
/// fail once the peer has accepted nothing for the write timeout.
pub struct Bounded<IO> {
    io: IO,
    bounds: Bounds,
    _permit: OwnedSemaphorePermit,
    /// Armed while a write waits on the peer; disarmed when one progresses.
    stalled: Option<Pin<Box<Sleep>>>,
    /// The deadline passed: every later wait fails at once, counted once.
    expired: bool,
}

impl<IO> Bounded<IO> {
    /// What a pending write or flush becomes: still pending, or an error once
    /// the deadline passed.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.bounds.write_timeout;
        if !self.expired {
            let sleep = self
                .stalled
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.expired = true;
            Stats::incr((self.bounds.write_timeouts)(&self.bounds.stats));
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer read nothing for {timeout:?}"),
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
                self.stalled = None;
                ready
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Bounded<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Bounded<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progressed(done, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progressed(done, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.io).poll_flush(cx);
        this.progressed(done, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let done = Pin::new(&mut this.io).poll_shutdown(cx);
        this.progressed(done, cx)
    }
}

/// A TCP listener for `axum::serve` whose connections are [`Bounded`].
pub struct BoundedListener {
    pub listener: TcpListener,
    pub bounds: Bounds,
}

impl axum::serve::Listener for BoundedListener {
    type Io = Bounded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = crate::tcp::accept(&self.listener, "http").await;
            match self.bounds.admit(stream) {
                Some(io) => return (io, peer),
                None => tracing::debug!(%peer, "HTTP connection limit reached; refused."),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
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

    fn bounds(max_connections: usize, write_timeout_secs: u64) -> Bounds {
        Bounds::new(
            max_connections,
            Duration::from_secs(write_timeout_secs),
            Arc::default(),
            |s| &s.http_connections_refused,
            |s| &s.http_write_timeouts,
        )
    }

    #[test]
    fn connections_over_the_limit_are_refused_until_one_closes() {
        let bounds = bounds(2, 60);
        let first = bounds.admit(()).expect("under the limit");
        let _second = bounds.admit(()).expect("at the limit");
        assert!(bounds.admit(()).is_none());
        assert_eq!(Stats::get(&bounds.stats.http_connections_refused), 1);
        drop(first);
        assert!(bounds.admit(()).is_some(), "its permit came back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_reads_fails_after_the_timeout() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let bounds = bounds(1, 5);
        let mut io = bounds.admit(ours).unwrap();
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
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_never_timed_out() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let bounds = bounds(1, 5);
        let mut io = bounds.admit(ours).unwrap();
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
}
