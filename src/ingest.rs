//! What a decoded Riemann `Msg` means, independent of the transport that carried
//! it: its events go to the streams as one batch, its query is answered from the
//! index. TCP and UDP both call into here.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message;

use crate::clock::SharedClock;
use crate::index::Index;
use crate::proto::{self, Msg};
use crate::query::Query;
use crate::stats::Stats;
use crate::streams::Streams;

/// Which transport a message came over, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Shared handles every connection needs.
pub struct Ingest {
    pub index: Arc<Index>,
    pub streams: Arc<dyn Streams>,
    pub clock: SharedClock,
    pub stats: Arc<Stats>,
}

impl Ingest {
    /// Handles one frame body and returns the encoded reply body.
    pub fn handle_frame(&self, body: Bytes, transport: Transport) -> Bytes {
        let msg = match Msg::decode(body) {
            Ok(msg) => msg,
            Err(e) => {
                Stats::incr(&self.stats.decode_errors);
                tracing::debug!(?transport, error = %e, "Undecodable message.");
                return proto::error_reply(format!("invalid message: {e}"));
            }
        };
        self.handle_msg(msg, transport)
    }

    fn handle_msg(&self, msg: Msg, transport: Transport) -> Bytes {
        if !msg.events.is_empty() {
            let now = self.clock.now();
            let events: Vec<_> = msg
                .events
                .into_iter()
                .map(|pb| proto::from_pb(pb, now))
                .collect();
            let counter = match transport {
                Transport::Tcp => &self.stats.tcp_events,
                Transport::Udp => &self.stats.udp_events,
            };
            Stats::add(counter, events.len() as u64);
            self.streams.process(events);
        }
        // Riemann answers a query even when the same Msg also carried events.
        match msg.query {
            Some(query) if transport == Transport::Tcp => {
                self.answer(query.string.as_deref().unwrap_or_default())
            }
            _ => proto::ack(),
        }
    }

    fn answer(&self, text: &str) -> Bytes {
        match Query::parse(text) {
            Ok(query) => {
                Stats::incr(&self.stats.queries);
                proto::events_reply(&self.index.query(&query))
            }
            Err(e) => {
                Stats::incr(&self.stats.query_errors);
                proto::error_reply(e.to_string())
            }
        }
    }
}
