//! Riemann's JSON form of an event (as its WebSocket/SSE transports and
//! `riemann-client query -j` show it): standard field names, missing fields as
//! `null`, time as ISO 8601 UTC with milliseconds, attributes as extra keys.

use std::time::{Duration, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::clock::Micros;
use crate::event::{Event, Metric};

/// The event's JSON as text: what a subscriber, a webhook or an HTTP answer
/// carries.
pub fn to_json_text(e: &Event) -> String {
    to_json(e).to_string()
}

pub fn to_json(e: &Event) -> Value {
    let mut map = Map::new();
    // Attributes first so a standard field can never be shadowed by one.
    for (k, v) in &e.attributes {
        map.insert(k.clone(), Value::String(v.clone()));
    }
    let text = |s: &Option<String>| s.clone().map_or(Value::Null, Value::String);
    map.insert("host".into(), text(&e.host));
    map.insert("service".into(), text(&e.service));
    map.insert("state".into(), text(&e.state));
    map.insert("description".into(), text(&e.description));
    map.insert(
        "metric".into(),
        match e.metric {
            Some(Metric::Int(i)) => Value::from(i),
            // NaN and infinities have no JSON form.
            Some(Metric::Float(f)) => {
                serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
            }
            None => Value::Null,
        },
    );
    map.insert(
        "tags".into(),
        Value::Array(e.tags.iter().cloned().map(Value::String).collect()),
    );
    map.insert("time".into(), Value::String(iso8601(e.time)));
    map.insert(
        "ttl".into(),
        e.ttl
            .and_then(|t| serde_json::Number::from_f64(crate::event::ttl_f64(t)))
            .map_or(Value::Null, Value::Number),
    );
    Value::Object(map)
}

/// At least the bytes of `e`'s JSON text in an answer, its comma
/// included: an answer's room is taken by this as its scan goes, so one
/// that will not fit is refused before it is made. Escaping is counted: a
/// control character takes six bytes (`\u0001`).
pub fn approx_bytes(e: &Event) -> usize {
    // `{"host":null,…,"ttl":null}` (129 bytes) without the metric's and
    // the TTL's `null`s, and a comma.
    const FIXED: usize = 129 - 8 + 1;
    let number = |f: f64| match f.is_finite() {
        true => ryu::Buffer::new().format_finite(f).len(),
        false => 4,
    };
    let metric = match e.metric {
        Some(Metric::Int(i)) => i.to_string().len(),
        Some(Metric::Float(f)) => number(f),
        None => 4,
    };
    let ttl = e.ttl.map_or(4, |t| number(crate::event::ttl_f64(t)));
    let text = |s: &String| s.len() + escaping_adds(s);
    let fields = [&e.host, &e.service, &e.state, &e.description];
    FIXED
        + metric
        + ttl
        + fields.into_iter().flatten().map(text).sum::<usize>()
        + e.tags.iter().map(|t| 3 + text(t)).sum::<usize>()
        + (e.attributes.iter())
            .map(|(k, v)| 6 + text(k) + text(v))
            .sum::<usize>()
}

/// The bytes escaping `s` into a JSON string adds to it (as serde_json
/// escapes: `\"`, `\\`, `\n` and its kind, `\u00XX` for the other
/// control characters).
fn escaping_adds(s: &str) -> usize {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            0..0x20 => 5,
            _ => 0,
        })
        .sum()
}

/// Microseconds since the epoch as `2024-01-02T03:04:05.678Z`. Times outside
/// years 1970..=9999 (garbage from broken agents) are clamped, not rejected.
pub fn iso8601(time: Micros) -> String {
    const MAX_MILLIS: u64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let millis = u64::try_from(time.div_euclid(1000))
        .unwrap_or(0)
        .min(MAX_MILLIS);
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(millis)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn riemann_shape_with_nulls_and_attributes() {
        let e = Event {
            host: Some("h".into()),
            service: Some("s".into()),
            time: 1_500_000,
            tags: vec!["t".into()],
            metric: Some(Metric::Float(0.5)),
            attributes: vec![("env".into(), "prod".into())],
            ..Event::default()
        };
        assert_eq!(
            to_json(&e),
            json!({
                "host": "h", "service": "s", "state": null, "description": null,
                "metric": 0.5, "tags": ["t"], "time": "1970-01-01T00:00:01.500Z",
                "ttl": null, "env": "prod"
            })
        );
    }

    #[test]
    fn integer_metric_stays_integer_and_nan_is_null() {
        let mut e = Event {
            metric: Some(Metric::Int(3)),
            ..Event::default()
        };
        assert_eq!(to_json(&e)["metric"], json!(3));
        e.metric = Some(Metric::Float(f64::NAN));
        assert_eq!(to_json(&e)["metric"], Value::Null);
    }

    #[test]
    fn approx_bytes_is_at_least_the_json_text_however_escaped() {
        let shapes = [
            Event::default(),
            Event {
                host: Some("h".into()),
                metric: Some(Metric::Float(-1.234_567_890_123_456_7e-300)),
                state: Some(String::new()),
                ttl: Some(1.234_567_9e-30),
                time: 1_700_000_000_123_456,
                tags: vec![String::new(); 100],
                attributes: vec![(String::new(), String::new()); 100],
                ..Event::default()
            },
            Event {
                metric: Some(Metric::Int(i64::MIN)),
                ttl: Some(f32::NAN),
                time: i64::MAX,
                ..Event::default()
            },
            Event {
                host: Some("\u{1}".repeat(1000)),
                description: Some("\u{1f}\"\\\n\u{7f}é".repeat(1000)),
                tags: vec!["\u{0}".repeat(10); 10],
                attributes: vec![("\u{2}".repeat(10), "\"".repeat(10)); 10],
                ..Event::default()
            },
        ];
        for e in shapes {
            let text = to_json_text(&e).len() + 1;
            assert!(approx_bytes(&e) >= text, "{} < {text}", approx_bytes(&e));
        }
        let small = Event {
            host: Some("host-0001".into()),
            service: Some("cpu".into()),
            state: Some("ok".into()),
            metric: Some(Metric::Float(0.25)),
            ttl: Some(60.0),
            ..Event::default()
        };
        let text = to_json_text(&small).len() + 1;
        assert!(
            approx_bytes(&small) <= text + 8,
            "{} for {text}",
            approx_bytes(&small)
        );
    }

    #[test]
    fn out_of_range_times_are_clamped() {
        assert_eq!(iso8601(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(i64::MAX), "9999-12-31T23:59:59.999Z");
        assert_eq!(iso8601(1_700_000_000_123_456), "2023-11-14T22:13:20.123Z");
    }
}
