//! Coalescing ingest per shard: what every connection of this node sends to
//! one shard goes out in as few JetStream messages as the load allows.
//!
//! At most one publish per shard is in flight. Events that arrive meanwhile
//! wait, and go out together as one message once it is acknowledged: idle, an
//! event costs one round trip as before; under load the messages grow instead
//! of their number (each message costs NATS a publish, a PubAck and a
//! delivery, whatever its size). Each sender learns whether its own events
//! were stored.
//!
//! Every part is one sender's events for the shard, encoded as a `Msg`; the
//! concatenation of encoded `Msg`s is a valid `Msg` holding all their events
//! (protobuf merges repeated fields), so parts are joined without re-encoding.

use std::sync::Arc;

use async_nats::jetstream;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::subject;

/// A message stops growing at this size: well under NATS's default maximum
/// payload (1 MiB). A single larger part still goes out alone.
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024;

/// Whether a part was stored, as its sender is told.
pub type Stored = Result<(), String>;

#[derive(Default)]
struct Pending {
    parts: Vec<(Bytes, oneshot::Sender<Stored>)>,
    /// A task is publishing this shard's parts.
    flushing: bool,
}

pub struct Batcher {
    js: jetstream::Context,
    shards: Box<[Mutex<Pending>]>,
}

impl Batcher {
    pub fn new(js: jetstream::Context, shards: u32) -> Batcher {
        Batcher {
            js,
            shards: (0..shards.max(1)).map(|_| Mutex::default()).collect(),
        }
    }

    /// Queues `part` (an encoded `Msg`) for `shard`; the receiver resolves once
    /// JetStream stored it, or with why not.
    pub fn enqueue(self: &Arc<Self>, shard: u32, part: Bytes) -> oneshot::Receiver<Stored> {
        let (tx, rx) = oneshot::channel();
        let shard = shard as usize % self.shards.len();
        let start = {
            let mut pending = self.shards[shard].lock();
            pending.parts.push((part, tx));
            !std::mem::replace(&mut pending.flushing, true)
        };
        if start {
            tokio::spawn(self.clone().flush(shard));
        }
        rx
    }

    /// Publishes the shard's waiting parts, a message at a time, until none
    /// are left.
    async fn flush(self: Arc<Self>, shard: usize) {
        loop {
            let batch = {
                let mut pending = self.shards[shard].lock();
                if pending.parts.is_empty() {
                    pending.flushing = false;
                    return;
                }
                let take = batch_len(pending.parts.iter().map(|(part, _)| part.len()));
                pending.parts.drain(..take).collect::<Vec<_>>()
            };
            let payload = join(batch.iter().map(|(part, _)| part));
            let stored = self.publish(shard as u32, payload).await;
            for (_, tx) in batch {
                // The sender may have gone (connection closed): nobody to tell.
                let _ = tx.send(stored.clone());
            }
        }
    }

    async fn publish(&self, shard: u32, payload: Bytes) -> Stored {
        let ack = self
            .js
            .publish(subject(shard), payload)
            .await
            .map_err(|e| format!("cluster publish failed: {e}"))?;
        ack.await
            .map(drop)
            .map_err(|e| format!("cluster publish not confirmed: {e}"))
    }
}

/// How many of the leading parts (of these sizes) make one message: at least
/// one, then as many as stay within [`MAX_MESSAGE_BYTES`].
fn batch_len(sizes: impl Iterator<Item = usize>) -> usize {
    let mut total = 0;
    let mut count = 0;
    for size in sizes {
        if count > 0 && total + size > MAX_MESSAGE_BYTES {
            break;
        }
        total += size;
        count += 1;
    }
    count
}

/// The parts as one payload; a lone part is sent as is.
fn join<'a>(mut parts: impl ExactSizeIterator<Item = &'a Bytes>) -> Bytes {
    if parts.len() == 1 {
        return parts.next().cloned().unwrap_or_default();
    }
    let mut joined = BytesMut::new();
    for part in parts {
        joined.extend_from_slice(part);
    }
    joined.freeze()
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::event::Event;
    use crate::proto::{self, Msg};

    #[test]
    fn joined_parts_decode_as_one_msg_with_every_event() {
        let part = |hosts: &[&str]| {
            let events = hosts
                .iter()
                .map(|h| {
                    proto::to_pb(&Event {
                        host: Some((*h).to_owned()),
                        ..Event::default()
                    })
                })
                .collect();
            Bytes::from(
                Msg {
                    events,
                    ..Msg::default()
                }
                .encode_to_vec(),
            )
        };
        let parts = [part(&["a", "b"]), part(&["c"])];
        let msg = Msg::decode(join(parts.iter())).unwrap();
        let hosts: Vec<_> = msg.events.iter().map(|e| e.host.clone().unwrap()).collect();
        assert_eq!(hosts, ["a", "b", "c"]);
        assert_eq!(join(parts[..1].iter()), parts[0], "a lone part as is");
    }

    #[test]
    fn a_message_takes_parts_up_to_the_size_bound() {
        let half = MAX_MESSAGE_BYTES / 2;
        assert_eq!(batch_len([10, 20, 30].into_iter()), 3);
        assert_eq!(batch_len([half, half, 1].into_iter()), 2);
        assert_eq!(
            batch_len([2 * MAX_MESSAGE_BYTES, 1].into_iter()),
            1,
            "an oversized part alone"
        );
        assert_eq!(batch_len(std::iter::empty()), 0);
    }
}
