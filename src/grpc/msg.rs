//! `vigil.Msg` (`repeated riemann.Event events = 1`), written by hand instead
//! of generated: it keeps its events encoded, so the server decodes them with
//! vigil's own decoder ([`wire::decode_events`]), within the per-message
//! [`Limits`] and straight into core events, as a Riemann TCP frame is.
//!
//! prost would first decode every event into a `PbEvent` of ~400 bytes: a
//! request of 16 MiB (`--max-frame`) holding 8 million empty events made the
//! server allocate 3.2 GB before any limit could be checked. Kept encoded, a
//! `Msg` costs its own size, and no more than `--max-events-per-msg` events
//! are ever decoded from it.

use bytes::{Buf, BufMut};
use prost::DecodeError;
use prost::encoding::{DecodeContext, WireType, check_wire_type, decode_varint, encode_key};
use prost::encoding::{encode_varint, skip_field};

use crate::clock::Micros;
use crate::event::Event;
use crate::limits::Limits;
use crate::proto::{PbEvent, to_pb};
use crate::wire;

/// The field number of `events`.
const EVENTS: u32 = 1;

#[derive(Clone, Default, PartialEq)]
pub struct Msg {
    /// The `events` fields as sent (key, length, event), and nothing else:
    /// unknown fields are dropped on arrival, as prost drops them.
    encoded: Vec<u8>,
}

impl Msg {
    /// A `Msg` of these events, for a client.
    pub fn new(events: impl IntoIterator<Item = PbEvent>) -> Msg {
        let mut encoded = Vec::new();
        for event in events {
            prost::encoding::message::encode(EVENTS, &event, &mut encoded);
        }
        Msg { encoded }
    }

    /// A `Msg` of core events, for a client.
    pub fn of(events: &[Event]) -> Msg {
        Msg::new(events.iter().map(to_pb))
    }

    /// Decodes the events into `events` (reusing what is there), stamping
    /// those without a time with `now`: refused whole, with the limit named,
    /// when one is over `limits`.
    pub fn decode_into(
        &self,
        now: Micros,
        limits: &Limits,
        events: &mut Vec<Event>,
    ) -> Result<(), wire::DecodeError> {
        wire::decode_events(&self.encoded, EVENTS.into(), now, limits, events)
    }

    /// This `Msg` with the strings of its events that are not UTF-8
    /// repaired ([`wire::repair_utf8`]), and how many; `None` if none is.
    pub fn repaired(&self) -> Option<(Msg, usize)> {
        let (encoded, strings) = wire::repair_utf8(&self.encoded, EVENTS.into())?;
        Some((Msg { encoded }, strings))
    }
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msg")
            .field("encoded_bytes", &self.encoded.len())
            .finish()
    }
}

impl prost::Message for Msg {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.encoded);
    }

    /// Never fails: bytes that are not a `Msg` are kept as sent, so that
    /// [`Msg::decode_into`] refuses them with the error a Riemann TCP frame of
    /// the same bytes gets. A failure here would end a `Send` stream (tonic
    /// closes it, `INTERNAL`), taking the acks of the messages behind along.
    fn merge(&mut self, mut buf: impl Buf) -> Result<(), DecodeError> {
        let raw = buf.copy_to_bytes(buf.remaining());
        let mut fields = &raw[..];
        while fields.has_remaining() {
            let parsed = prost::encoding::decode_key(&mut fields).and_then(|(tag, wire_type)| {
                self.merge_field(tag, wire_type, &mut fields, DecodeContext::default())
            });
            if parsed.is_err() {
                self.encoded.clear();
                self.encoded.extend_from_slice(&raw);
                break;
            }
        }
        Ok(())
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != EVENTS {
            return skip_field(wire_type, tag, buf, ctx);
        }
        check_wire_type(WireType::LengthDelimited, wire_type)?;
        let len = decode_varint(buf)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&len| len <= buf.remaining())
            .ok_or_else(|| DecodeError::new("buffer underflow"))?;
        encode_key(EVENTS, WireType::LengthDelimited, &mut self.encoded);
        encode_varint(len as u64, &mut self.encoded);
        self.encoded.put(buf.take(len));
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.encoded.len()
    }

    fn clear(&mut self) {
        self.encoded.clear();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::limits::{Exceeded, Limit};
    use crate::proto::from_pb;

    const NOW: Micros = 1_700_000_000_000_000;

    fn full_event(i: i64) -> PbEvent {
        to_pb(&Event {
            host: Some(format!("host{i}")),
            service: Some("svc".into()),
            state: Some("ok".into()),
            time: NOW - i,
            description: Some("d".into()),
            tags: vec!["a".into(), "b".into()],
            metric: Some(crate::event::Metric::Float(i as f64 / 2.0)),
            ttl: Some(30.0),
            attributes: vec![("env".into(), "prod".into())],
        })
    }

    fn decoded(msg: &Msg, limits: &Limits) -> Result<Vec<Event>, wire::DecodeError> {
        let mut events = Vec::new();
        msg.decode_into(NOW, limits, &mut events).map(|()| events)
    }

    #[test]
    fn round_trips_through_prost_framing_and_decodes_as_prost_would() {
        let pbs: Vec<PbEvent> = (0..3).map(full_event).chain([PbEvent::default()]).collect();
        let sent = Msg::new(pbs.clone());
        let received = Msg::decode(sent.encode_to_vec().as_slice()).unwrap();
        assert_eq!(received, sent);
        let expected: Vec<Event> = pbs.into_iter().map(|pb| from_pb(pb, NOW)).collect();
        assert_eq!(decoded(&received, &Limits::DEFAULT).unwrap(), expected);
    }

    #[test]
    fn a_msg_with_a_string_that_is_not_utf8_is_repaired() {
        let mut bytes = Msg::new((0..3).map(full_event)).encode_to_vec();
        let at = bytes.windows(5).position(|w| w == b"host1").unwrap() + 4;
        bytes[at] = 0xfe;
        let bad = Msg::decode(bytes.as_slice()).unwrap();
        assert!(decoded(&bad, &Limits::DEFAULT).is_err());
        assert!(Msg::new([full_event(0)]).repaired().is_none());
        let (fixed, strings) = bad.repaired().expect("repairable");
        assert_eq!(strings, 1);
        let hosts: Vec<_> = (decoded(&fixed, &Limits::DEFAULT).unwrap().into_iter())
            .map(|e| e.host.unwrap())
            .collect();
        assert_eq!(hosts, ["host0", "host?", "host2"]);
    }

    #[test]
    fn unknown_fields_are_dropped_and_bytes_that_are_no_msg_are_refused_when_decoded() {
        let mut bytes = Vec::new();
        prost::encoding::string::encode(7, &"ignored".to_owned(), &mut bytes);
        bytes.extend(Msg::new([full_event(1)]).encode_to_vec());
        prost::encoding::uint64::encode(9, &5, &mut bytes);
        assert_eq!(
            Msg::decode(bytes.as_slice()).unwrap(),
            Msg::new([full_event(1)])
        );
        // `events` as a varint, a length past the end, a key never ended:
        // kept as sent, and refused when decoded, as a TCP frame would be.
        for bytes in [&[0x08, 0x01][..], &[0x0a, 0x05, 0x00], &[0xff, 0xff]] {
            let msg = Msg::decode(bytes).unwrap();
            assert_eq!(msg.encode_to_vec(), bytes);
            assert!(decoded(&msg, &Limits::DEFAULT).is_err(), "{bytes:02x?}");
        }
    }

    /// `vigil.Msg` as prost would generate it.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Generated {
        #[prost(message, repeated, tag = "1")]
        events: Vec<PbEvent>,
    }

    #[test]
    fn agrees_with_prost_on_mutated_and_random_bytes() {
        let seed = Msg::new((0..4).map(full_event)).encode_to_vec();
        let mut next = crate::test_rng::xorshift(0x2545_f491_4f6c_dd1d);
        let mut agreed_ok = 0;
        for round in 0..20_000 {
            let body = crate::test_rng::mutated(&seed, round, &mut next);
            let expected = Generated::decode(body.as_slice()).ok().map(|m| {
                m.events
                    .into_iter()
                    .map(|pb| from_pb(pb, NOW))
                    .collect::<Vec<_>>()
            });
            let got = Msg::decode(body.as_slice())
                .ok()
                .and_then(|msg| decoded(&msg, &Limits::DEFAULT).ok());
            // NaN metrics compare unequal; compare their debug forms instead.
            assert_eq!(
                format!("{got:?}"),
                format!("{expected:?}"),
                "input {body:02x?}"
            );
            agreed_ok += usize::from(expected.is_some());
        }
        assert!(agreed_ok > 1000, "successful decodes exercised too");
    }

    #[test]
    fn limits_are_checked_while_decoding_and_name_the_event() {
        let limits = Limits {
            max_events: 2,
            max_string: 5,
            ..Limits::DEFAULT
        };
        let too_many = Msg::new((0..4).map(|_| PbEvent::default()));
        let Err(wire::DecodeError::Exceeded(e)) = decoded(&too_many, &limits) else {
            panic!("over --max-events-per-msg");
        };
        assert_eq!(e.to_string(), "4 events exceeds --max-events-per-msg 2");
        let long = Msg::new([full_event(1), full_event(10_000)]);
        let Err(wire::DecodeError::Exceeded(e)) = decoded(&long, &limits) else {
            panic!("over --max-string");
        };
        assert_eq!(
            e,
            Exceeded {
                limit: Limit::String,
                event: Some(1),
                what: "host",
                size: 9,
                max: 5
            }
        );
    }
}
