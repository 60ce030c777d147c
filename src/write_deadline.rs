//! A bound on how long a peer may leave vigil's writes unread, for the
//! connections hyper and tonic drive (HTTP, WebSocket, SSE, gRPC).
//!
//! Those servers write a response, or a subscriber's next event, and wait as
//! long as the peer's receive window stays full: a client that stops reading
//! without closing, or a peer that vanished, would hold its connection task,
//! socket and buffers forever. [`WriteDeadline`] fails a write (or flush) that
//! has made no progress for `timeout`, which ends the connection; the Riemann
//! TCP handler bounds its replies the same way (`--read-timeout`).

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
use tokio::time::Sleep;

use crate::stats::Stats;

/// How long a write may wait on the peer, and the counter of [`Stats`] a
/// connection ended for it bumps.
#[derive(Clone)]
pub struct Deadline {
    pub timeout: Duration,
    pub stats: Arc<Stats>,
    pub counter: fn(&Stats) -> &AtomicU64,
}

/// `io` whose writes fail once the peer has accepted nothing for the
/// deadline's timeout.
pub struct WriteDeadline<IO> {
    io: IO,
    deadline: Deadline,
    /// Armed while a write waits on the peer; disarmed when one progresses.
    stalled: Option<Pin<Box<Sleep>>>,
    /// The deadline passed: every later wait fails at once, counted once.
    expired: bool,
}

impl<IO> WriteDeadline<IO> {
    pub fn new(io: IO, deadline: Deadline) -> Self {
        Self {
            io,
            deadline,
            stalled: None,
            expired: false,
        }
    }

    /// What a pending write or flush becomes: still pending, or an error once
    /// the deadline passed.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.deadline.timeout;
        if !self.expired {
            let sleep = self
                .stalled
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.expired = true;
            Stats::incr((self.deadline.counter)(&self.deadline.stats));
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

impl<IO: AsyncRead + Unpin> AsyncRead for WriteDeadline<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<IO> {
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

/// A TCP listener for `axum::serve` whose connections carry a write deadline.
pub struct DeadlineListener {
    pub listener: TcpListener,
    pub deadline: Deadline,
}

impl axum::serve::Listener for DeadlineListener {
    type Io = WriteDeadline<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    return (WriteDeadline::new(stream, self.deadline.clone()), peer);
                }
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning on the error.
                    tracing::warn!(error = %e, "HTTP accept failed; backing off.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

impl tonic::transport::server::Connected for WriteDeadline<TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn deadline(secs: u64) -> Deadline {
        Deadline {
            timeout: Duration::from_secs(secs),
            stats: Arc::default(),
            counter: |s| &s.http_write_timeouts,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_reads_fails_after_the_timeout() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let deadline = deadline(5);
        let stats = deadline.stats.clone();
        let mut io = WriteDeadline::new(ours, deadline);
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
        assert_eq!(Stats::get(&stats.http_write_timeouts), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_reading_is_never_timed_out() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let deadline = deadline(5);
        let stats = deadline.stats.clone();
        let mut io = WriteDeadline::new(ours, deadline);
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
        assert_eq!(Stats::get(&stats.http_write_timeouts), 0);
    }
}
