//! Riemann's TCP framing: a 4-byte big-endian length, then the body, both ways.
//!
//! Unlike tokio-util's `LengthDelimitedCodec`, which reserves the whole
//! announced length as soon as it reads a prefix, this codec grows the buffer
//! only as bytes actually arrive. A client announcing 16 MiB and sending
//! nothing therefore costs almost nothing, so memory is bounded by what
//! clients really send, not by `max connections × max frame`. On the server
//! ([`gated`]), a frame over [`budget::FREE`] bytes must also get room in the
//! shared [`Budget`] before more of it is read, so what all clients really
//! send is bounded too.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::codec::{Decoder, Encoder};

use crate::budget::{self, Budget, Taken, Waiter};

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
/// body is read only once `budget` has room for it.
pub fn gated<S>(stream: S, max_frame: usize, budget: &Budget) -> (Gated<S>, FrameCodec) {
    let gate = Arc::new(Gate {
        wanted: AtomicUsize::new(0),
        held: Mutex::default(),
        budget: budget.clone(),
    });
    let codec = FrameCodec {
        max_frame,
        gate: Some(gate.clone()),
    };
    let stream = Gated {
        inner: stream,
        gate,
        waiter: budget.waiter(),
    };
    (stream, codec)
}

/// Between the codec, which reads a large frame's length, and the stream,
/// which must not read the frame's body before it has room.
struct Gate {
    /// The length of the frame waiting for room; 0 when none is.
    wanted: AtomicUsize,
    held: Mutex<Held>,
    budget: Budget,
}

/// What the large frame arriving now holds.
#[derive(Default)]
struct Held {
    room: Option<Taken>,
    /// When it got its room after waiting for it.
    granted_at: Option<Instant>,
}

impl Gate {
    /// Whether the frame of `len` bytes now arriving has room, asking the
    /// budget for it if not; without it, the stream reads nothing more.
    fn admit(&self, len: usize) -> bool {
        let mut held = self.held.lock();
        if held.room.is_some() {
            return true;
        }
        held.room = self.budget.try_take(len);
        if held.room.is_none() {
            self.wanted.store(len, Ordering::Relaxed);
        }
        held.room.is_some()
    }

    fn grant(&self, taken: Taken) {
        *self.held.lock() = Held {
            room: Some(taken),
            granted_at: Some(Instant::now()),
        };
        self.wanted.store(0, Ordering::Relaxed);
    }

    /// The frame has arrived whole: its room goes back to the budget.
    fn release(&self) {
        *self.held.lock() = Held::default();
    }
}

/// A server connection's stream: reads wait while a large frame waits for room.
pub struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
    waiter: Waiter,
}

impl<S> Gated<S> {
    /// Since when the frame arriving now has had its room, if it waited for
    /// it (now, while it still waits): the wait is the server's, so the
    /// connection's read timeout should run from then.
    pub fn room_since(&self) -> Option<Instant> {
        if self.gate.wanted.load(Ordering::Relaxed) > 0 {
            return Some(Instant::now());
        }
        self.gate.held.lock().granted_at
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
            this.gate.grant(taken);
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
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
            if gate.is_some_and(|gate| !gate.admit(len)) {
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
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    dst.reserve(PREFIX + body.len());
    dst.put_u32(len);
    dst.put_slice(body);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        use futures_util::{FutureExt, StreamExt};
        use tokio::io::AsyncWriteExt;
        use tokio_util::codec::FramedRead;

        use crate::stats::Stats;

        let stats = Arc::new(crate::stats::Stats::default());
        let budget = Budget::new(4 * budget::FREE, stats.clone());
        let (mut client, server) = tokio::io::duplex(8 * budget::FREE);
        let (stream, codec) = gated(server, DEFAULT_MAX_FRAME, &budget);
        let mut frames = FramedRead::new(stream, codec);
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
}
