//! The Riemann wire schema (generated from `proto/riemann.proto`) and the edge
//! conversions between its `Event` and vigil's core [`Event`].
//! Nothing past ingest and the client sees protobuf types.

use std::collections::HashMap;

use bytes::Bytes;
use prost::Message;

use crate::clock::{MICROS_PER_SEC, Micros};
use crate::event::{Event, Metric, RESERVED_FIELDS};

#[allow(clippy::all)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/riemann.rs"));
}

pub use generated::{Attribute, Event as PbEvent, Msg, Query as PbQuery};

/// The encoded body of `Msg{ok: true}`: field 2, varint 1. Clients check exactly this.
pub const ACK_BODY: &[u8] = &[0x10, 0x01];

pub fn ack() -> Bytes {
    Bytes::from_static(ACK_BODY)
}

/// Encodes `Msg{ok: false, error}`.
pub fn error_reply(error: impl Into<String>) -> Bytes {
    Msg {
        ok: Some(false),
        error: Some(error.into()),
        ..Msg::default()
    }
    .encode_to_vec()
    .into()
}

/// Encodes `Msg{ok: true, events}`.
pub fn events_reply(events: &[Event]) -> Bytes {
    Msg {
        ok: Some(true),
        events: events.iter().map(to_pb).collect(),
        ..Msg::default()
    }
    .encode_to_vec()
    .into()
}

/// At least the bytes `e` takes in an answer's `Msg` (its key and length
/// included), near exactly: an answer's room is taken by this as its scan
/// goes. [`Event::approx_bytes`] (memory) is some three times the
/// encoding of a small event, so an answer well under 64 KiB was taken
/// for a large one and refused as busy.
pub fn approx_bytes(e: &Event) -> usize {
    use prost::encoding::encoded_len_varint as varint;
    let bytes = |len: usize| 1 + varint(len as u64) + len;
    let text = |s: &String| bytes(s.len());
    let fields = [&e.host, &e.service, &e.state, &e.description];
    let attributes = (e.attributes.iter()).map(|(k, v)| bytes(text(k) + text(v)));
    let event = 2 + varint(e.time.div_euclid(MICROS_PER_SEC) as u64)
        + varint(e.time as u64)
        // `metric_f` (5) beside `metric_sint64` (up to 11) or `metric_d` (9).
        + e.metric.map_or(0, |_| 16)
        + e.ttl.map_or(0, |_| 5)
        + fields.into_iter().flatten().map(text).sum::<usize>()
        + e.tags.iter().map(text).sum::<usize>()
        + attributes.sum::<usize>();
    bytes(event)
}

/// Converts a wire event, stamping `now` when the sender gave no time.
pub fn from_pb(pb: PbEvent, now: Micros) -> Event {
    // Prefer the precise field; `time` is whole seconds.
    let time = match (pb.time_micros, pb.time) {
        (Some(us), _) => us,
        (None, Some(s)) => s.saturating_mul(MICROS_PER_SEC),
        (None, None) => now,
    };
    let metric = match (pb.metric_sint64, pb.metric_d, pb.metric_f) {
        (Some(i), _, _) => Some(Metric::Int(i)),
        (None, Some(d), _) => Some(Metric::Float(d)),
        (None, None, Some(f)) => Some(Metric::Float(f64::from(f))),
        (None, None, None) => None,
    };
    let attributes = pb
        .attributes
        .into_iter()
        .filter(|a| !RESERVED_FIELDS.contains(&a.key.as_str()))
        .map(|a| (a.key, a.value.unwrap_or_default()))
        .collect();
    Event {
        host: pb.host,
        service: pb.service,
        state: pb.state,
        time,
        description: pb.description,
        tags: pb.tags,
        metric,
        ttl: pb.ttl,
        attributes,
    }
}

/// Encodes as Riemann does: `metric_f` always (old clients read only that), plus
/// the exact kind; both `time` and `time_micros`.
pub fn to_pb(e: &Event) -> PbEvent {
    let (metric_sint64, metric_d, metric_f) = match e.metric {
        Some(Metric::Int(i)) => (Some(i), None, Some(i as f32)),
        Some(Metric::Float(f)) => (None, Some(f), Some(f as f32)),
        None => (None, None, None),
    };
    PbEvent {
        time: Some(e.time.div_euclid(MICROS_PER_SEC)),
        time_micros: Some(e.time),
        state: e.state.clone(),
        service: e.service.clone(),
        host: e.host.clone(),
        description: e.description.clone(),
        tags: e.tags.clone(),
        ttl: e.ttl,
        attributes: last_of_each(&e.attributes)
            .map(|(k, v)| Attribute {
                key: k.clone(),
                value: Some(v.clone()),
            })
            .collect(),
        metric_sint64,
        metric_d,
        metric_f,
    }
}

/// One attribute per key, the last, in order, as queries and JSON read
/// them: Riemann's attributes are a map, and a client given two would not
/// know which holds. Linear however many there are (up to
/// `--max-attributes`, 10 000 by default).
fn last_of_each(attributes: &[(String, String)]) -> impl Iterator<Item = &(String, String)> {
    // Few, nearly always: comparing each with those after it beats hashing.
    const SCAN_BELOW: usize = 16;
    let last: Option<HashMap<&str, usize>> = (attributes.len() >= SCAN_BELOW).then(|| {
        let by_key = attributes.iter().enumerate();
        by_key.map(|(at, (k, _))| (k.as_str(), at)).collect()
    });
    attributes.iter().enumerate().filter_map(move |(at, pair)| {
        let is_last = match &last {
            Some(last) => last[pair.0.as_str()] == at,
            None => !attributes[at + 1..]
                .iter()
                .any(|(later, _)| *later == pair.0),
        };
        is_last.then_some(pair)
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn approx_bytes_is_at_least_an_events_encoding_and_near_it() {
        let small = Event {
            host: Some("host-0001".into()),
            service: Some("cpu".into()),
            state: Some("ok".into()),
            time: 1_700_000_000_123_456,
            metric: Some(Metric::Float(0.25)),
            ttl: Some(60.0),
            ..Event::default()
        };
        let shapes = [
            Event::default(),
            Event {
                time: -1,
                metric: Some(Metric::Int(i64::MIN)),
                ..small.clone()
            },
            Event {
                description: Some("d".repeat(300)),
                tags: vec!["t".repeat(200); 100],
                attributes: vec![("k".into(), "v".repeat(200)); 100],
                ..small.clone()
            },
            small.clone(),
        ];
        let in_answer =
            |e: &Event| events_reply(std::slice::from_ref(e)).len() - events_reply(&[]).len();
        for e in &shapes {
            assert!(
                approx_bytes(e) >= in_answer(e),
                "{} < {}",
                approx_bytes(e),
                in_answer(e)
            );
        }
        assert!(
            approx_bytes(&small) <= in_answer(&small) + 8,
            "{}",
            in_answer(&small)
        );
    }
    use super::*;

    #[test]
    fn an_attribute_given_twice_is_encoded_once_with_its_last_value() {
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        // Many, past the scan: the same through the map.
        let many: Vec<_> = (0..100)
            .map(|i| pair(&format!("a{}", i % 50), &i.to_string()))
            .collect();
        let kept: Vec<_> = last_of_each(&many).cloned().collect();
        let expected: Vec<_> = (50..100)
            .map(|i| pair(&format!("a{}", i % 50), &i.to_string()))
            .collect();
        assert_eq!(kept, expected);
        let event = Event {
            attributes: vec![pair("k", "1"), pair("j", "x"), pair("k", "2")],
            ..Event::default()
        };
        assert_eq!(event.attribute("k"), Some("2"), "what a query reads");
        let encoded: Vec<(String, Option<String>)> = to_pb(&event)
            .attributes
            .into_iter()
            .map(|a| (a.key, a.value))
            .collect();
        assert_eq!(
            encoded,
            [
                ("j".to_owned(), Some("x".to_owned())),
                ("k".to_owned(), Some("2".to_owned()))
            ]
        );
    }

    fn decode(bytes: &[u8]) -> Msg {
        Msg::decode(bytes).expect("valid Msg")
    }

    #[test]
    fn ack_is_field_two_true() {
        let encoded = Msg {
            ok: Some(true),
            ..Msg::default()
        }
        .encode_to_vec();
        assert_eq!(encoded, ACK_BODY);
        assert_eq!(decode(&ack()).ok, Some(true));
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// A `Msg` body captured from riemann-c-client 1.10.4:
    /// `riemann-client send -T -h web1 -S "http req" -s ok -d 3.25 -t tagA -a env=prod -L 60 -D desc`.
    /// No time, metric_d, and the client's own `x-client` attribute.
    const C_CLIENT_MSG: &str = "325912026f6b1a0868747470207265712204776562312a04646573633a0474\
        61674145000070424a1c0a08782d636c69656e7412107269656d616e6e2d632d636c69656e744a0b0a03656e\
        76120470726f64710000000000000a40";

    /// A `Msg` body captured from ruby-riemann-client 0.2.3:
    /// `c.tcp << {host: "web1", service: "rb", state: "ok", metric: 2, tags: ["t1"], ttl: 30, env: "prod"}`.
    /// Whole-second time, metric_sint64 plus metric_f.
    const RUBY_CLIENT_MSG: &str = "32310890ab9ad80612026f6b1a0272622204776562313a02743145000\
        0f0414a0b0a03656e76120470726f6468047d00000040";

    /// A `Msg` body captured from the Python `riemann-client` 7.0.0 (PyPI):
    /// `riemann-client -T tcp send -s "py svc" -S ok -h pyhost -m 1.5 -l 30 -d "py desc" -t pytag -a env=prod`.
    /// No time at all and only `metric_f`.
    const PYTHON_CLIENT_MSG: &str = "323b12026f6b1a0670792073766322067079686f73742a07707920646573\
        633a057079746167450000f0414a0b0a03656e76120470726f647d0000c03f";

    #[test]
    fn decodes_c_client_bytes_and_stamps_arrival_time() {
        let msg = decode(&unhex(C_CLIENT_MSG));
        assert_eq!(msg.events.len(), 1);
        let e = from_pb(msg.events[0].clone(), 42);
        assert_eq!(e.time, 42);
        assert_eq!((e.host_str(), e.service_str()), ("web1", "http req"));
        assert_eq!(e.state.as_deref(), Some("ok"));
        assert_eq!(e.description.as_deref(), Some("desc"));
        assert_eq!(e.tags, vec!["tagA".to_owned()]);
        assert_eq!(e.metric, Some(Metric::Float(3.25)));
        assert_eq!(e.ttl, Some(60.0));
        assert_eq!(e.attribute("env"), Some("prod"));
        assert_eq!(e.attribute("x-client"), Some("riemann-c-client"));
        // Re-encoding and decoding again loses nothing.
        let again = Msg::decode(events_reply(std::slice::from_ref(&e))).unwrap();
        assert_eq!(from_pb(again.events[0].clone(), 0), e);
    }

    #[test]
    fn decodes_ruby_client_bytes() {
        let msg = decode(&unhex(RUBY_CLIENT_MSG));
        let e = from_pb(msg.events[0].clone(), 42);
        assert_eq!(e.time, 1_795_593_616_000_000);
        assert_eq!(e.metric, Some(Metric::Int(2)), "sint64 wins over metric_f");
        assert_eq!(e.ttl, Some(30.0));
        assert_eq!(e.tags, vec!["t1".to_owned()]);
        assert_eq!(e.attribute("env"), Some("prod"));
    }

    #[test]
    fn decodes_python_client_bytes() {
        let msg = decode(&unhex(PYTHON_CLIENT_MSG));
        let e = from_pb(msg.events[0].clone(), 42);
        assert_eq!(e.time, 42, "no time sent: arrival time");
        assert_eq!((e.host_str(), e.service_str()), ("pyhost", "py svc"));
        assert_eq!(e.metric, Some(Metric::Float(1.5)), "metric_f only");
        assert_eq!(e.ttl, Some(30.0));
        assert_eq!(e.description.as_deref(), Some("py desc"));
        assert_eq!(e.tags, vec!["pytag".to_owned()]);
        assert_eq!(e.attribute("env"), Some("prod"));
    }

    /// A whole batch captured from collectd 5.12 `write_riemann` (`Batch true`):
    /// both `time` and `time_micros`, `metric_d`, tags and many attributes.
    #[test]
    fn decodes_a_collectd_batch() {
        let msg = decode(include_bytes!(
            "../tests/fixtures/collectd-write_riemann.msg"
        ));
        assert!(msg.events.len() > 10, "a batch, got {}", msg.events.len());
        for pb in msg.events {
            let micros = pb.time_micros;
            let e = from_pb(pb, 0);
            assert_eq!(Some(e.time), micros, "time_micros wins");
            assert!(
                matches!(e.metric, Some(Metric::Float(_))),
                "metric_d: {e:?}"
            );
            assert!(e.has_tag("collectd"));
            assert_eq!(e.attribute("env"), Some("test"));
            assert!(e.attribute("plugin").is_some());
        }
    }

    /// collectd sends both `time` and `time_micros` (and sometimes a garbage
    /// `time`): the micros win.
    #[test]
    fn time_micros_wins_over_time() {
        let pb = PbEvent {
            time: Some(-77),
            time_micros: Some(1_700_000_000_123_456),
            ..PbEvent::default()
        };
        assert_eq!(from_pb(pb, 0).time, 1_700_000_000_123_456);
        let pb = PbEvent {
            time: Some(1_700_000_000),
            ..PbEvent::default()
        };
        assert_eq!(from_pb(pb, 0).time, 1_700_000_000_000_000);
        let pb = PbEvent {
            time: Some(i64::MAX),
            ..PbEvent::default()
        };
        assert_eq!(from_pb(pb, 0).time, i64::MAX, "saturates, never overflows");
    }

    #[test]
    fn metric_precedence_is_sint64_then_d_then_f() {
        let pb = PbEvent {
            metric_sint64: Some(-5),
            metric_d: Some(2.0),
            metric_f: Some(3.0),
            ..PbEvent::default()
        };
        assert_eq!(from_pb(pb, 0).metric, Some(Metric::Int(-5)));
        let pb = PbEvent {
            metric_d: Some(2.5),
            metric_f: Some(3.0),
            ..PbEvent::default()
        };
        assert_eq!(from_pb(pb, 0).metric, Some(Metric::Float(2.5)));
        let pb = PbEvent {
            metric_f: Some(1.5),
            ..PbEvent::default()
        };
        assert_eq!(from_pb(pb, 0).metric, Some(Metric::Float(1.5)));
    }

    #[test]
    fn reserved_attribute_names_are_dropped() {
        let pb = PbEvent {
            attributes: vec![
                Attribute {
                    key: "ttl".into(),
                    value: Some("9".into()),
                },
                Attribute {
                    key: "host".into(),
                    value: Some("x".into()),
                },
                Attribute {
                    key: "plugin".into(),
                    value: None,
                },
            ],
            ..PbEvent::default()
        };
        let e = from_pb(pb, 0);
        assert_eq!(e.attributes, vec![("plugin".to_owned(), String::new())]);
    }

    #[test]
    fn encodes_like_riemann_and_round_trips() {
        let e = Event {
            host: Some("h".into()),
            service: Some("s".into()),
            state: Some("ok".into()),
            time: 1_700_000_000_250_000,
            description: Some("d".into()),
            tags: vec!["a".into(), "b".into()],
            metric: Some(Metric::Int(7)),
            ttl: Some(30.0),
            attributes: vec![("env".into(), "prod".into())],
        };
        let pb = to_pb(&e);
        assert_eq!(pb.time, Some(1_700_000_000));
        assert_eq!(pb.time_micros, Some(1_700_000_000_250_000));
        assert_eq!(
            (pb.metric_sint64, pb.metric_d, pb.metric_f),
            (Some(7), None, Some(7.0))
        );
        let bytes = pb.encode_to_vec();
        let back = from_pb(PbEvent::decode(bytes.as_slice()).unwrap(), 0);
        assert_eq!(back, e);

        let float = Event {
            metric: Some(Metric::Float(0.25)),
            ..e
        };
        let pb = to_pb(&float);
        assert_eq!(
            (pb.metric_sint64, pb.metric_d, pb.metric_f),
            (None, Some(0.25), Some(0.25))
        );
        assert_eq!(from_pb(pb, 0), float);
    }

    #[test]
    fn negative_time_encodes_floor_seconds() {
        let e = Event {
            time: -1,
            ..Event::default()
        };
        assert_eq!(to_pb(&e).time, Some(-1));
    }

    #[test]
    fn garbage_is_a_decode_error_not_a_panic() {
        assert!(Msg::decode(&[0xff, 0xff, 0xff][..]).is_err());
        assert!(
            Msg::decode(&[0x32, 0x05, 0x22][..]).is_err(),
            "truncated event"
        );
    }
}
