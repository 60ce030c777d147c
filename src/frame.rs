//! Riemann's TCP framing: a 4-byte big-endian length, then the body, both ways.
//!
//! Unlike tokio-util's `LengthDelimitedCodec`, which reserves the whole
//! announced length as soon as it reads a prefix, this codec grows the buffer
//! only as bytes actually arrive. A client announcing 16 MiB and sending
//! nothing therefore costs almost nothing, so memory is bounded by what
//! clients really send, not by `max connections × max frame`. On the server
//! ([`gated`]), a frame over [`budget::FREE`] bytes must also get room in the
//! shared [`Budget`] before more of it is read, so what all clients really
//! send is bounded too, and then keep the [`Pace`] that brings it in within
//! the read timeout, so a stalled client gives its room back to the others.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};

use crate::budget::{self, Budget, Pace, PaceTimer, Taken, TooSlow, Waiter};

/// Riemann has no limit; vigil refuses larger frames without reading them.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// How much buffer to add at a time while a large frame arrives.
const GROW_STEP: usize = 64 * 1024;

const PREFIX: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum size of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error(transparent)]
    Io(#[from] io::Error),
}

#[derive(Clone)]
pub struct FrameCodec {
    max_frame: usize,
    /// On the server: where a large frame asks for room in the budget.
    gate: Option<Arc<Gate>>,
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            gate: None,
        }
    }
}

/// A server connection's stream and codec, sharing one gate: a large frame's
/// body is read only once `budget` has room for it, and must then keep the
/// [`Pace`] that brings it in within `timeout`.
pub fn gated<S>(
    stream: S,
    max_frame: usize,
    budget: &Budget,
    timeout: Duration,
) -> (Gated<S>, FrameCodec) {
    let gate = Arc::new(Gate {
        wanted: AtomicUsize::new(0),
        holding: AtomicBool::new(false),
        held: Mutex::default(),
        budget: budget.clone(),
        timeout,
    });
    let codec = FrameCodec {
        max_frame,
        gate: Some(gate.clone()),
    };
    let stream = Gated {
        inner: stream,
        gate,
        waiter: budget.waiter(),
        pace_timer: PaceTimer::default(),
    };
    (stream, codec)
}

/// Between the codec, which reads a large frame's length, and the stream,
/// which must not read the frame's body before it has room.
struct Gate {
    /// The length of the frame waiting for room; 0 when none is.
    wanted: AtomicUsize,
    /// Whether a frame holds room now: only then does a read count its bytes.
    holding: AtomicBool,
    held: Mutex<Held>,
    budget: Budget,
    timeout: Duration,
}

/// What the large frame arriving now holds.
#[derive(Default)]
struct Held {
    room: Option<(Taken, Pace)>,
    /// Bytes of the frame's body read so far.
    arrived: usize,
}

impl Gate {
    /// Whether the frame of `len` bytes now arriving, `arrived` bytes of its
    /// body in, has room, asking the budget for it if not; without it, the
    /// stream reads nothing more.
    fn admit(&self, len: usize, arrived: usize) -> bool {
        let mut held = self.held.lock();
        if held.room.is_some() {
            return true;
        }
        held.arrived = arrived;
        match self.budget.try_take(len) {
            Some(taken) => self.hold(&mut held, taken, len),
            None => self.wanted.store(len, Ordering::Relaxed),
        }
        held.room.is_some()
    }

    fn grant(&self, taken: Taken, len: usize) {
        self.hold(&mut self.held.lock(), taken, len);
        self.wanted.store(0, Ordering::Relaxed);
    }

    fn hold(&self, held: &mut Held, taken: Taken, len: usize) {
        held.room = Some((taken, Pace::new(len, self.timeout)));
        self.holding.store(true, Ordering::Relaxed);
    }

    /// The frame has arrived whole (or is given up): its room goes back.
    fn release(&self) {
        *self.held.lock() = Held::default();
        self.holding.store(false, Ordering::Relaxed);
    }
}

/// A server connection's stream: reads wait while a large frame waits for
/// room, and fail once one holding room falls behind its pace.
pub struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
    waiter: Waiter,
    /// Wakes the connection when the pace of the frame holding room should
    /// be checked.
    pace_timer: PaceTimer,
}

impl<S> Gated<S> {
    /// Since when the frame arriving now has had its room (now, while it
    /// still waits for it): the wait is the server's, so the connection's read
    /// timeout should run from then.
    pub fn room_since(&self) -> Option<Instant> {
        if self.gate.wanted.load(Ordering::Relaxed) > 0 {
            return Some(Instant::now());
        }
        let held = self.gate.held.lock();
        held.room.as_ref().map(|(_, pace)| pace.since())
    }

    /// Whether the frame holding room has fallen behind its pace (if not, the
    /// task is woken when to ask again). One that has gives its room back.
    fn behind(&mut self, cx: &mut Context<'_>) -> Option<TooSlow> {
        let held = self.gate.held.lock();
        let (_, pace) = held.room.as_ref()?;
        let (pace, arrived) = (*pace, held.arrived);
        drop(held);
        let budget = &self.gate.budget;
        let too_slow = match self.pace_timer.poll_behind(cx, budget, &pace, arrived) {
            Poll::Ready(too_slow) => too_slow,
            Poll::Pending => return None,
        };
        self.gate.release();
        Some(too_slow)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let wanted = this.gate.wanted.load(Ordering::Relaxed);
        if wanted > 0 {
            let taken = ready!(this.waiter.poll_take(cx, wanted));
            this.gate.grant(taken, wanted);
        }
        let filled = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !this.gate.holding.load(Ordering::Relaxed) {
            return read;
        }
        match read {
            Poll::Ready(Ok(())) => {
                this.gate.held.lock().arrived += buf.filled().len() - filled;
                Poll::Ready(Ok(()))
            }
            // Only a read that finds nothing new asks, so bytes already
            // arrived always count.
            Poll::Pending => match this.behind(cx) {
                Some(too_slow) => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, too_slow)))
                }
                None => Poll::Pending,
            },
            failed => failed,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        if src.len() < PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes(src[..PREFIX].try_into().expect("4 bytes")) as usize;
        if len > self.max_frame {
            return Err(FrameError::Oversized {
                len,
                max: self.max_frame,
            });
        }
        let missing = (PREFIX + len).saturating_sub(src.len());
        let gate = self.gate.as_ref().filter(|_| len > budget::FREE);
        if missing > 0 {
            let arrived = src.len() - PREFIX;
            if gate.is_some_and(|gate| !gate.admit(len, arrived)) {
                return Ok(None);
            }
            src.reserve(missing.min(GROW_STEP));
            return Ok(None);
        }
        if let Some(gate) = gate {
            gate.release();
        }
        src.advance(PREFIX);
        Ok(Some(src.split_to(len)))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated),
        }
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = io::Error;

    fn encode(&mut self, body: Bytes, dst: &mut BytesMut) -> io::Result<()> {
        put(&body, dst)
    }
}

/// `body` framed, onto the end of `dst`.
pub fn put(body: &[u8], dst: &mut BytesMut) -> io::Result<()> {
    dst.reserve(PREFIX + body.len());
    put_prefix(body.len(), dst)?;
    dst.put_slice(body);
    Ok(())
}

/// The length prefix of a frame of `len` bytes, onto the end of `dst`: its
/// body is to be written after it.
pub fn put_prefix(len: usize, dst: &mut BytesMut) -> io::Result<()> {
    let len = u32::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    dst.put_u32(len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use futures_util::{FutureExt, StreamExt};
    use tokio::io::{AsyncWriteExt, DuplexStream};
    use tokio_util::codec::FramedRead;

    use super::*;
    use crate::stats::Stats;

    fn framed(body: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        FrameCodec::new(100)
            .encode(Bytes::copy_from_slice(body), &mut out)
            .unwrap();
        out
    }

    #[test]
    fn round_trips_and_splits_pipelined_frames() {
        let mut buf = framed(b"one");
        buf.extend_from_slice(&framed(b""));
        buf.extend_from_slice(&framed(b"three"));
        let mut codec = FrameCodec::new(100);
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"one");
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"");
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"three");
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
    }

    #[test]
    fn waits_for_the_rest_without_reserving_the_announced_length() {
        let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME);
        let mut buf = BytesMut::new();
        buf.put_u32(DEFAULT_MAX_FRAME as u32);
        buf.put_slice(b"abc");
        assert!(codec.decode(&mut buf).unwrap().is_none());
        assert!(
            buf.capacity() <= PREFIX + 3 + GROW_STEP + 64,
            "{}",
            buf.capacity()
        );
        assert!(matches!(
            codec.decode_eof(&mut buf),
            Err(FrameError::Truncated)
        ));
    }

    #[test]
    fn refuses_an_oversized_prefix() {
        let mut buf = BytesMut::new();
        buf.put_u32(101);
        match FrameCodec::new(100).decode(&mut buf) {
            Err(FrameError::Oversized { len: 101, max: 100 }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_large_frame_is_read_on_only_once_the_budget_has_room() {
        let (stats, budget, mut client, mut frames) = gated_frames(4 * budget::FREE);
        let len = 3 * budget::FREE;
        let mut wire = BytesMut::new();
        put(&framed(b"small")[PREFIX..], &mut wire).unwrap();
        put(&vec![7; len], &mut wire).unwrap();
        client.write_all(&wire).await.unwrap();

        let other = budget.try_take(2 * budget::FREE).unwrap();
        assert_eq!(&frames.next().await.unwrap().unwrap()[..], b"small");
        assert!(frames.next().now_or_never().is_none(), "no room yet");
        assert!(
            frames.read_buffer().len() <= 2 * budget::FREE,
            "read on without room: {} bytes",
            frames.read_buffer().len()
        );
        assert_eq!(Stats::get(&stats.messages_waited_for_memory), 1);
        drop(other);
        assert_eq!(frames.next().await.unwrap().unwrap().len(), len);
        assert_eq!(Stats::get(&stats.message_bytes_held), 0, "given back");
        assert_eq!(Stats::get(&stats.messages_waited_for_memory), 1);
    }

    const TIMEOUT: Duration = Duration::from_secs(60);

    /// A server's frames over a budget of `bytes`, read as they come from the
    /// client end, with a read timeout of [`TIMEOUT`].
    fn gated_frames(
        bytes: usize,
    ) -> (
        Arc<Stats>,
        Budget,
        DuplexStream,
        FramedRead<Gated<DuplexStream>, FrameCodec>,
    ) {
        let stats = Arc::new(Stats::default());
        let budget = Budget::new(bytes, stats.clone());
        let (client, server) = tokio::io::duplex(8 * budget::FREE);
        let (stream, codec) = gated(server, DEFAULT_MAX_FRAME, &budget, TIMEOUT);
        (stats, budget, client, FramedRead::new(stream, codec))
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_frame_that_stalls_gives_its_room_back_once_behind_its_pace() {
        let (stats, _, mut client, mut frames) = gated_frames(4 * budget::FREE);
        let len = 2 * budget::FREE;
        let mut wire = BytesMut::new();
        wire.put_u32(len as u32);
        wire.put_slice(&[7; 1000]);
        client.write_all(&wire).await.unwrap();

        let start = Instant::now();
        let Some(Err(FrameError::Io(e))) = frames.next().await else {
            panic!("the frame is given up");
        };
        // The paused clock jumps to each timer (whole milliseconds): the
        // grace, and what the 1 000 bytes bought.
        let due = budget::GRACE + (TIMEOUT - budget::GRACE).mul_f64(1000.0 / len as f64);
        let given_up = start.elapsed();
        assert!(
            given_up >= due && given_up <= due + Duration::from_millis(1),
            "{given_up:?}"
        );
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.get_ref().unwrap().is::<TooSlow>(), "{e}");
        assert_eq!(Stats::get(&stats.message_bytes_held), 0, "given back");
        assert_eq!(Stats::get(&stats.messages_too_slow), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_frame_sent_steadily_enough_to_arrive_within_the_timeout_arrives() {
        let (stats, _, mut client, mut frames) = gated_frames(16 * budget::FREE);
        let len = 10 * budget::FREE;
        // A tenth every 5.9 s: all of it 53.1 s after its first byte, each
        // tenth within a second of when the pace wants it.
        let writer = tokio::spawn(async move {
            client.write_all(&(len as u32).to_be_bytes()).await.unwrap();
            for tenth in 0..10 {
                if tenth > 0 {
                    tokio::time::sleep(Duration::from_millis(5900)).await;
                }
                client.write_all(&[7; budget::FREE]).await.unwrap();
            }
            client
        });
        let start = Instant::now();
        assert_eq!(frames.next().await.unwrap().unwrap().len(), len);
        assert_eq!(start.elapsed(), Duration::from_millis(53_100));
        assert_eq!(Stats::get(&stats.messages_too_slow), 0);
        assert_eq!(Stats::get(&stats.message_bytes_held), 0, "given back");
        drop(writer.await.unwrap());
    }
}
