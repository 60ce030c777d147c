//! Riemann over UDP: one bare `Msg` per datagram, never a reply. What cannot be
//! used is counted and dropped.

use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::ingest::{Ingest, Transport};
use crate::stats::Stats;

/// Riemann's default maximum datagram size.
pub const DEFAULT_MAX_DATAGRAM: usize = 16 * 1024;

/// Largest possible UDP payload; receiving into this much means an oversized
/// datagram is seen whole and counted rather than silently truncated.
const RECV_BUFFER: usize = 64 * 1024;

pub async fn serve(
    socket: UdpSocket,
    ingest: Arc<Ingest>,
    max_datagram: usize,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; RECV_BUFFER];
    let mut events = Vec::new();
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buf) => received,
            () = shutdown.cancelled() => return,
        };
        let len = match received {
            Ok((len, _peer)) => len,
            Err(e) => {
                // ICMP errors from earlier sends surface here; nothing to do but go on.
                tracing::debug!(error = %e, "UDP receive failed.");
                continue;
            }
        };
        Stats::incr(&ingest.stats.udp_datagrams);
        if len > max_datagram {
            Stats::incr(&ingest.stats.udp_oversized);
            continue;
        }
        // The reply (ack or error) is discarded: UDP senders never hear back.
        ingest
            .handle(&buf[..len], Transport::Udp, &mut events)
            .await;
    }
}
