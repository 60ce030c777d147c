//! `vigil.QueryResponse` (`repeated riemann.Event events = 1`), written by
//! hand instead of generated: the server encodes its events ahead, on a
//! blocking thread, and tonic's encoding of it is then a copy of those
//! bytes.
//!
//! tonic encodes a response on the async worker that polls the call: the
//! generated message, 100 000 small events, held a worker for 101–142 ms
//! (debug build), and every connection queued on it, as the HTTP and TCP
//! transports no longer do ([`crate::blocking`]). A client decodes it into
//! `events`, as it did the generated one.

use bytes::{Buf, BufMut, Bytes};
use prost::DecodeError;
use prost::encoding::{DecodeContext, WireType};

use crate::event::Event;
use crate::proto::{PbEvent, to_pb};

/// The field number of `events`.
const EVENTS: u32 = 1;

#[derive(Clone, Default, PartialEq)]
pub struct QueryResponse {
    /// The events a client decoded (or one built from `PbEvent`s).
    pub events: Vec<PbEvent>,
    /// Further `events` fields already encoded, sent before those of
    /// `events`: the server's whole answer.
    encoded: Bytes,
}

impl QueryResponse {
    /// The answer of these events, encoded now: call it off the async
    /// workers.
    pub fn of(events: &[Event]) -> QueryResponse {
        let mut encoded = Vec::new();
        for event in events {
            prost::encoding::message::encode(EVENTS, &to_pb(event), &mut encoded);
        }
        QueryResponse {
            events: Vec::new(),
            encoded: encoded.into(),
        }
    }
}

impl std::fmt::Debug for QueryResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryResponse")
            .field("events", &self.events)
            .field("encoded_bytes", &self.encoded.len())
            .finish()
    }
}

impl prost::Message for QueryResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.encoded);
        for event in &self.events {
            prost::encoding::message::encode(EVENTS, event, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            EVENTS => {
                prost::encoding::message::merge_repeated(wire_type, &mut self.events, buf, ctx)
            }
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        self.encoded.len() + prost::encoding::message::encoded_len_repeated(EVENTS, &self.events)
    }

    fn clear(&mut self) {
        self.events.clear();
        self.encoded = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn encoded_ahead_it_is_the_generated_messages_bytes_and_decodes_to_its_events() {
        let events: Vec<Event> = (0..3)
            .map(|i| Event {
                host: Some(format!("host-{i}")),
                metric: Some(crate::event::Metric::Float(f64::from(i))),
                ..Event::default()
            })
            .collect();
        let pbs: Vec<PbEvent> = events.iter().map(to_pb).collect();
        let ahead = QueryResponse::of(&events);
        let built = QueryResponse {
            events: pbs.clone(),
            ..QueryResponse::default()
        };
        assert_eq!(ahead.encode_to_vec(), built.encode_to_vec());
        assert_eq!(ahead.encoded_len(), built.encoded_len());
        let decoded = QueryResponse::decode(&ahead.encode_to_vec()[..]).unwrap();
        assert_eq!(decoded.events, pbs);
    }
}
