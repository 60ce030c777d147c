//! Riemann's TCP framing: a 4-byte big-endian length, then the body, both ways.
//!
//! Unlike tokio-util's `LengthDelimitedCodec`, which reserves the whole
//! announced length as soon as it reads a prefix, this codec grows the buffer
//! only as bytes actually arrive. A client announcing 16 MiB and sending
//! nothing therefore costs almost nothing, so memory is bounded by what
//! clients really send, not by `max connections × max frame`.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

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

#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    pub fn new(max_frame: usize) -> Self {
        Self { max_frame }
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
        if missing > 0 {
            src.reserve(missing.min(GROW_STEP));
            return Ok(None);
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
        let len = u32::try_from(body.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
        dst.reserve(PREFIX + body.len());
        dst.put_u32(len);
        dst.put_slice(&body);
        Ok(())
    }
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
}
