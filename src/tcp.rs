//! Riemann over TCP: the accept loop and the per-connection handler.
//!
//! Framing is a 4-byte big-endian length then a protobuf `Msg`, both ways. Every
//! `Msg` gets exactly one reply, in order; clients pipeline, so replies to all
//! frames already buffered are written with one flush.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{
    Framed, LengthDelimitedCodec, length_delimited::LengthDelimitedCodecError,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ingest::{Ingest, Transport};
use crate::proto;
use crate::stats::Stats;

/// Riemann has no limit; one oversized prefix must not make vigil allocate it.
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// The wire framing, shared with the client.
pub fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(max_frame)
        .new_codec()
}

pub async fn serve(
    listener: TcpListener,
    ingest: Arc<Ingest>,
    max_frame: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                Stats::incr(&ingest.stats.tcp_connections);
                let ingest = ingest.clone();
                let shutdown = shutdown.clone();
                tracker.spawn(async move {
                    Stats::incr(&ingest.stats.tcp_connections_open);
                    if let Err(e) = handle(socket, &ingest, max_frame, shutdown).await {
                        tracing::debug!(%peer, error = %e, "Connection ended with an error.");
                    }
                    Stats::decr(&ingest.stats.tcp_connections_open);
                });
            }
            Err(e) => {
                // Usually EMFILE: back off instead of spinning on the error.
                tracing::warn!(error = %e, "Accept failed; backing off.");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(
    socket: TcpStream,
    ingest: &Ingest,
    max_frame: usize,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut framed = Framed::new(socket, codec(max_frame));
    let mut events = Vec::new();
    loop {
        let mut next = tokio::select! {
            next = framed.next() => next,
            () = shutdown.cancelled() => return Ok(()),
        };
        // Answer every frame already buffered, then flush once.
        loop {
            match next {
                // The peer finished sending: it may still be reading replies.
                None => return SinkExt::<Bytes>::flush(&mut framed).await,
                Some(Ok(frame)) => {
                    Stats::incr(&ingest.stats.tcp_messages);
                    let reply = ingest.handle_frame(&frame, Transport::Tcp, &mut events);
                    framed.feed(reply).await?;
                }
                Some(Err(e)) => return fail(&mut framed, ingest, e, max_frame).await,
            }
            match framed.next().now_or_never() {
                Some(more) => next = more,
                None => break,
            }
        }
        SinkExt::<Bytes>::flush(&mut framed).await?;
    }
}

/// A framing error leaves the stream unsynchronised: say why (when the client can
/// still hear it) and close.
async fn fail(
    framed: &mut Framed<TcpStream, LengthDelimitedCodec>,
    ingest: &Ingest,
    error: io::Error,
    max_frame: usize,
) -> io::Result<()> {
    let oversized = error
        .get_ref()
        .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>());
    if oversized {
        Stats::incr(&ingest.stats.frames_oversized);
        tracing::info!("Frame over the {max_frame}-byte limit; closing the connection.");
        let reply: Bytes = proto::error_reply(format!(
            "frame exceeds the maximum size of {max_frame} bytes"
        ));
        framed.send(reply).await?;
        return Ok(());
    }
    if error.kind() == io::ErrorKind::Other {
        // tokio-util's "bytes remaining on stream": EOF in the middle of a frame.
        Stats::incr(&ingest.stats.frames_truncated);
        return Ok(());
    }
    Err(error)
}
