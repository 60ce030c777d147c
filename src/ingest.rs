//! What a decoded Riemann `Msg` means, independent of the transport that carried
//! it: its events go to the streams as one batch, its query is answered from the
//! index. TCP and UDP both call into here. A message over the [`Limits`] is
//! refused whole (no event of it is processed) with an error naming the limit.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use bytes::Bytes;

use crate::clock::SharedClock;
use crate::event::Event;
use crate::index::Index;
use crate::proto;
use crate::query::Query;
use crate::stats::Stats;
use crate::streams::Streams;
use crate::wire::{self, DecodeError, Limit, Limits};

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
    pub limits: Limits,
}

impl Ingest {
    /// Handles one frame body and returns the encoded reply body. `events` is
    /// the connection's decode buffer: reused from message to message, so a
    /// steady stream of events decodes without allocating.
    pub fn handle_frame(
        &self,
        body: &[u8],
        transport: Transport,
        events: &mut Vec<Event>,
    ) -> Bytes {
        let request = match wire::decode_msg(body, self.clock.now(), &self.limits, events) {
            Ok(request) => request,
            // Refused whole: none of its events go anywhere.
            Err(DecodeError::Exceeded(e)) => {
                Stats::incr(self.limit_counter(e.limit));
                tracing::debug!(?transport, error = %e, "Message over a limit refused.");
                return proto::error_reply(e.to_string());
            }
            Err(e) => {
                Stats::incr(&self.stats.decode_errors);
                tracing::debug!(?transport, error = %e, "Undecodable message.");
                return proto::error_reply(format!("invalid message: {e}"));
            }
        };
        if !events.is_empty() {
            let counter = match transport {
                Transport::Tcp => &self.stats.tcp_events,
                Transport::Udp => &self.stats.udp_events,
            };
            Stats::add(counter, events.len() as u64);
            self.streams.process(events);
        }
        // Riemann answers a query even when the same Msg also carried events.
        match request.query {
            Some(query) if transport == Transport::Tcp => self.answer(&query),
            _ => proto::ack(),
        }
    }

    fn limit_counter(&self, limit: Limit) -> &AtomicU64 {
        match limit {
            Limit::Events => &self.stats.msgs_over_max_events,
            Limit::Tags => &self.stats.msgs_over_max_tags,
            Limit::Attributes => &self.stats.msgs_over_max_attributes,
            Limit::String => &self.stats.msgs_over_max_string,
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
