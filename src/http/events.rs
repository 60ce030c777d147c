//! `POST`/`PUT /events`: newline-delimited JSON events, for agents that cannot
//! speak protobuf. Each non-blank line is answered, in order, with `{}` or
//! `{"error": "…"}` naming the field at fault; the accepted events then go
//! through the pipeline as one batch, like a TCP message's. In a cluster the
//! reply waits until JetStream stored them; if it did not, the answer is
//! `503` with `{"error": …}` and the client should resend. A body that has
//! not arrived whole within the read timeout of its head gets `408`; one over
//! 64 KiB is read only once it has room in the memory budget shared by every
//! transport ([`crate::budget`]), and gets `503` if it finds none in that
//! time; holding room, it gets `408` once it falls behind the pace that brings
//! it in within the read timeout. The
//! per-message [`Limits`](crate::limits::Limits) hold here too: a request of
//! more lines than `--max-events-per-msg` gets `413`, and a line over another
//! limit is answered with it, like a line that does not parse.
//!
//! Fields are Riemann's JSON names (`metric_f`, `metric_d` and `metric_sint64`
//! also name the metric). `time` is ISO 8601 (`2024-01-02T03:04:05.678Z`, or
//! with an offset: `+01:00`) or seconds since the epoch, `time_micros` microseconds; without either the
//! event gets its arrival time. Any other key is an attribute.

use std::time::UNIX_EPOCH;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use futures_util::StreamExt;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::{AppState, error};
use crate::budget::{self, Pace, Taken};
use crate::clock::{Micros, secs_to_micros};
use crate::event::{Event, Metric, RESERVED_FIELDS, number_text};
use crate::limits::{Exceeded, Limits};
use crate::stats::Stats;

/// Largest body accepted (as TCP's default maximum frame).
const MAX_BODY: usize = 16 * 1024 * 1024;

pub(super) async fn post(State(state): State<AppState>, request: Request) -> Response {
    // Kept until the events are handled: they are about the body's size again.
    let (body, _room) = match read_body(request, &state).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            json!({"error": "body is not UTF-8"}),
        );
    };
    // Some Windows tools start UTF-8 text with a byte-order mark: not JSON.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let lines = || text.lines().filter(|l| !l.trim().is_empty());
    // Counted before anything is kept for them, as the decoder counts a `Msg`'s events.
    let count = lines().count();
    if let Err(e) = state.per_message.check_count(count) {
        Stats::incr(e.limit.counter(state.stats()));
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("{e}; split the request")}),
        );
    }
    let arrival = state.clock.now();
    let mut events = Vec::with_capacity(count);
    let mut answers = String::with_capacity(count * 3);
    for line in lines() {
        let event =
            accept_line(line, arrival, &state.per_message).map_err(|refused| match refused {
                Refused::Invalid(reason) => reason,
                Refused::Over(e) => {
                    Stats::incr(e.limit.counter(state.stats()));
                    e.to_string()
                }
            });
        match event {
            Ok(event) => {
                events.push(event);
                answers.push_str("{}\n");
            }
            Err(reason) => {
                answers.push_str(&json!({ "error": reason }).to_string());
                answers.push('\n');
            }
        }
    }
    let stats = state.stats();
    let refused = answers.lines().count() - events.len();
    Stats::add(&stats.http_events, events.len() as u64);
    Stats::add(&stats.http_event_errors, refused as u64);
    if refused > 0 {
        tracing::debug!(
            refused,
            accepted = events.len(),
            "POST /events refused lines."
        );
    }
    if !events.is_empty() {
        match &state.cluster {
            Some(cluster) => {
                if let Err(e) = cluster.publish(&events).await {
                    cluster.not_stored("http", &e, state.stats());
                    return error(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": e }));
                }
            }
            None => state.streams.process(&events),
        }
    }
    ([(header::CONTENT_TYPE, "application/x-ndjson")], answers).into_response()
}

/// The body of `request`, whole within the read timeout of its head and at
/// most [`MAX_BODY`] bytes. One over [`budget::FREE`] bytes first gets room in
/// the shared budget for its announced length (for [`MAX_BODY`] when it
/// announces none), within the read timeout, and is read on only once it has
/// it: then at the [`Pace`] that brings it in within the read timeout of
/// getting it (a chunked body: within that time, and at the pace of the
/// largest body while others wait for room).
async fn read_body(request: Request, state: &AppState) -> Result<(Bytes, Option<Taken>), Response> {
    let stats = state.stats();
    let after = state.read_timeout;
    let mut deadline = Instant::now() + after;
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("the body is over {MAX_BODY} bytes")}),
        )
    };
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|len| len.to_str().ok()?.parse::<usize>().ok());
    if announced.is_some_and(|len| len > MAX_BODY) {
        return Err(too_large());
    }
    let room_for = |len: usize, deadline: Instant| async move {
        match tokio::time::timeout_at(deadline, state.memory.take(len)).await {
            Ok(room) => Ok(room),
            Err(_) => Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": format!(
                    "no room for a body of {len} bytes within {after:?} (--max-message-memory); resend it later"
                )}),
            )),
        }
    };
    let mut room = None;
    // A body keeps the pace that brings it in within the read timeout of
    // getting its room; a chunked one, whose length is unknown, only while
    // others wait for room (it holds room for the largest body).
    let mut pace = None;
    if let Some(len) = announced.filter(|&len| len > budget::FREE) {
        room = Some(room_for(len, deadline).await?);
        let paced = Pace::new(len, after);
        // Run out at once, so the pace says when the body falls behind.
        deadline = paced.since();
        pace = Some(paced);
    }
    let mut body = BytesMut::with_capacity(announced.unwrap_or(0));
    let mut chunks = request.into_body().into_data_stream();
    loop {
        let chunk = match tokio::time::timeout_at(deadline, chunks.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(None) => return Ok((body.freeze(), room)),
            Ok(Some(Err(e))) => {
                let reason = format!("the body could not be read: {e}");
                return Err(error(StatusCode::BAD_REQUEST, json!({ "error": reason })));
            }
            Err(_) => match pace.map(|pace| state.memory.check(&pace, body.len())) {
                Some(Ok(next)) => {
                    deadline = next;
                    continue;
                }
                Some(Err(too_slow)) => {
                    return Err(error(
                        StatusCode::REQUEST_TIMEOUT,
                        json!({"error": too_slow.to_string()}),
                    ));
                }
                None => {
                    Stats::incr(&stats.http_read_timeouts);
                    return Err(error(
                        StatusCode::REQUEST_TIMEOUT,
                        json!({"error": format!("the body did not arrive within {after:?}")}),
                    ));
                }
            },
        };
        let len = body.len() + chunk.len();
        if len > MAX_BODY {
            return Err(too_large());
        }
        if room.is_none() && len > budget::FREE {
            room = Some(room_for(MAX_BODY, deadline).await?);
            let paced = Pace::of_unknown_length(MAX_BODY, after);
            deadline = paced.since();
            pace = Some(paced);
        }
        body.extend_from_slice(&chunk);
    }
}

/// One line as `POST /events` reads it within `limits`: the event, or the
/// error its answer carries.
pub fn read_line(line: &str, arrival: Micros, limits: &Limits) -> Result<Event, String> {
    accept_line(line, arrival, limits).map_err(|refused| match refused {
        Refused::Invalid(reason) => reason,
        Refused::Over(e) => e.to_string(),
    })
}

/// Why a line was not accepted.
enum Refused {
    /// Not an event: the reason, naming the field at fault.
    Invalid(String),
    Over(Exceeded),
}

/// One line as an event within `limits`, or why not. The line is read once,
/// into values of bounded size: a string is kept as sent, but of an array or
/// object only its shape, and tags and attributes past their limit only
/// counted. Parsed whole into JSON values, a line of millions of tags or
/// nested elements would take ~25 times its size first.
fn accept_line(line: &str, arrival: Micros, limits: &Limits) -> Result<Event, Refused> {
    let mut deserializer = serde_json::Deserializer::from_str(line);
    let read = de::DeserializeSeed::deserialize(BoundedLine(limits), &mut deserializer)
        .and_then(|read| deserializer.end().map(|()| read));
    let (fields, counts) = match read {
        Ok(read) => read,
        // Every value inside an object is accepted: only the line itself can
        // have the wrong type. Is it JSON at all? (Read again, keeping nothing.)
        Err(e) if e.is_data() => {
            let reason = match serde_json::from_str::<IgnoredAny>(line) {
                Ok(_) => NOT_AN_OBJECT.to_owned(),
                Err(e) => invalid_json(e),
            };
            return Err(Refused::Invalid(reason));
        }
        Err(e) => return Err(Refused::Invalid(invalid_json(e))),
    };
    (limits.check_counts(counts.tags, counts.attributes)).map_err(Refused::Over)?;
    let event = to_event(fields, arrival).map_err(Refused::Invalid)?;
    // A JSON event has no attribute named like a field: each is the field.
    let attributes = event.attributes.len();
    limits
        .check_event(&event, attributes)
        .map_err(Refused::Over)?;
    Ok(event)
}

/// How many tags and (non-null) attributes a line had, kept or not.
#[derive(Default)]
struct Counts {
    tags: usize,
    attributes: usize,
}

/// Reads a line's object into the fields [`to_event`] takes, at most
/// `max_tags` tags and `max_attributes` attributes of them, and [`Counts`].
struct BoundedLine<'a>(&'a Limits);

impl<'de> de::DeserializeSeed<'de> for BoundedLine<'_> {
    type Value = (Map<String, Value>, Counts);

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for BoundedLine<'_> {
    type Value = (Map<String, Value>, Counts);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut fields, mut counts) = (Map::new(), Counts::default());
        while let Some(key) = map.next_key::<String>()? {
            if key == "tags" {
                let (tags, count) = map.next_value_seed(BoundedTags(self.0.max_tags))?;
                counts.tags = count;
                fields.insert(key, tags);
                continue;
            }
            let Shallow(value) = map.next_value()?;
            // `to_event` skips a null as if the key were absent, and a later
            // key wins: a null is not kept, so millions of them cost nothing.
            if value.is_null() {
                fields.remove(&key);
                continue;
            }
            // `to_event` reads every reserved name as its field; any other key is an attribute.
            if !RESERVED_FIELDS.contains(&key.as_str()) {
                counts.attributes += 1;
                if counts.attributes > self.0.max_attributes {
                    continue;
                }
            }
            fields.insert(key, value);
        }
        Ok((fields, counts))
    }
}

/// A `tags` value: an array keeps at most `max` elements and counts them all.
struct BoundedTags(usize);

impl<'de> de::DeserializeSeed<'de> for BoundedTags {
    type Value = (Value, usize);

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BoundedTags {
    type Value = (Value, usize);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let (mut kept, mut count) = (Vec::new(), 0);
        while let Some(Shallow(tag)) = seq.next_element()? {
            count += 1;
            if count <= self.0 {
                kept.push(tag);
            }
        }
        Ok((Value::Array(kept), count))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Ok((ShallowVisitor.visit_map(map)?, 0))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok((Value::Bool(v), 0))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok((Value::from(v), 0))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok((Value::from(v), 0))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok((Value::from(v), 0))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok((Value::from(v), 0))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok((Value::Null, 0))
    }
}

/// A value as [`to_event`] needs it: a scalar as sent; an array or object,
/// which it only ever refuses, as an empty one (its contents skipped).
struct Shallow(Value);

impl<'de> Deserialize<'de> for Shallow {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ShallowVisitor).map(Shallow)
    }
}

struct ShallowVisitor;

impl<'de> Visitor<'de> for ShallowVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Value::Array(Vec::new()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Value::Object(Map::new()))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

const NOT_AN_OBJECT: &str = "an event must be a JSON object";

fn invalid_json(e: serde_json::Error) -> String {
    format!("invalid JSON: {e}")
}

/// The keys a metric may come under, the wire's precedence first (`metric`
/// is Riemann's JSON name, the others the protobuf's): the fields arrive in
/// the keys' alphabetical order, which would make `metric_f` win over
/// `metric_d`.
const METRIC_KEYS: [&str; 4] = ["metric_sint64", "metric_d", "metric_f", "metric"];

fn to_event(fields: Map<String, Value>, arrival: Micros) -> Result<Event, String> {
    let mut event = Event {
        time: arrival,
        ..Event::default()
    };
    let mut metric_from = METRIC_KEYS.len();
    for (key, value) in fields {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "host" => event.host = Some(text(&key, value)?),
            "service" => event.service = Some(text(&key, value)?),
            "state" => event.state = Some(text(&key, value)?),
            "description" => event.description = Some(text(&key, value)?),
            "metric" | "metric_f" | "metric_d" | "metric_sint64" => {
                let read = metric(&key, &value)?;
                let rank = METRIC_KEYS.iter().position(|k| *k == key);
                if let Some(rank) = rank.filter(|&rank| rank < metric_from) {
                    (event.metric, metric_from) = (Some(read), rank);
                }
            }
            "tags" => event.tags = tags(value)?,
            "time" => event.time = time(&value)?,
            "time_micros" => {
                event.time = value.as_i64().ok_or("time_micros must be an integer")?;
            }
            "ttl" => {
                event.ttl = Some(value.as_f64().ok_or("ttl must be a number")? as f32);
            }
            _ => {
                let value = match value {
                    Value::String(s) => s,
                    // Whole numbers exactly, others as a rule file has them.
                    Value::Number(n) if n.is_f64() => number_text(n.as_f64().unwrap_or_default()),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Err(format!("attribute {key} must be a string")),
                };
                event.attributes.push((key, value));
            }
        }
    }
    Ok(event)
}

fn text(key: &str, value: Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s),
        _ => Err(format!("{key} must be a string")),
    }
}

/// `metric` is an integer when it is one, as the wire's `metric_sint64`;
/// the protobuf's names keep their field's type: `metric_sint64` must be an
/// integer (a fraction there is a client's mistake, not a rounding to make),
/// `metric_d` and `metric_f` are doubles however they are written.
fn metric(key: &str, value: &Value) -> Result<Metric, String> {
    let float = || value.as_f64().map(Metric::Float);
    match key {
        "metric_sint64" => value
            .as_i64()
            .map(Metric::Int)
            .ok_or_else(|| format!("{key} must be an integer (within 64 bits)")),
        "metric_d" | "metric_f" => float().ok_or_else(|| format!("{key} must be a number")),
        _ => value
            .as_i64()
            .map(Metric::Int)
            .or_else(float)
            .ok_or_else(|| format!("{key} must be a number")),
    }
}

fn tags(value: Value) -> Result<Vec<String>, String> {
    let fail = || "tags must be an array of strings".to_owned();
    let Value::Array(items) = value else {
        return Err(fail());
    };
    items
        .into_iter()
        .map(|t| match t {
            Value::String(s) => Ok(s),
            _ => Err(fail()),
        })
        .collect()
}

fn time(value: &Value) -> Result<Micros, String> {
    const EXPECTED: &str = "time must be ISO 8601 (e.g. 2024-01-02T03:04:05.678Z or \
         2024-01-02T04:04:05.678+01:00) or seconds since the epoch";
    match value {
        Value::Number(n) => n
            .as_f64()
            .map(secs_to_micros)
            .ok_or_else(|| EXPECTED.to_owned()),
        Value::String(s) => {
            // humantime reads UTC only: a local time is read as UTC and its
            // offset taken off (Python's `isoformat()` writes `+01:00`).
            let (local, offset) = utc_offset(s).unwrap_or((s.as_str(), 0));
            let utc = if local.ends_with(['Z', 'z']) {
                local.to_owned()
            } else {
                format!("{local}Z")
            };
            let at = humantime::parse_rfc3339_weak(&utc).map_err(|_| EXPECTED.to_owned())?;
            let micros = match at.duration_since(UNIX_EPOCH) {
                Ok(after) => micros(after.as_micros()),
                Err(before) => -micros(before.duration().as_micros()),
            };
            Ok(micros.saturating_sub(offset))
        }
        _ => Err(EXPECTED.to_owned()),
    }
}

/// Splits a trailing RFC 3339 offset (`+hh:mm`, `-hh:mm`) off a time,
/// with the offset in microseconds.
fn utc_offset(time: &str) -> Option<(&str, Micros)> {
    let split = time.len().checked_sub(6)?;
    let (local, offset) = (time.get(..split)?, time.get(split..)?.as_bytes());
    let sign = match offset[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let two = |at: usize| -> Option<i64> {
        let digits = offset.get(at..at + 2)?;
        digits
            .iter()
            .all(u8::is_ascii_digit)
            .then(|| i64::from(digits[0] - b'0') * 10 + i64::from(digits[1] - b'0'))
    };
    let (hours, minutes) = (two(1)?, two(4)?);
    (offset[3] == b':' && hours < 24 && minutes < 60)
        .then_some((local, sign * (hours * 3600 + minutes * 60) * 1_000_000))
}

fn micros(m: u128) -> Micros {
    Micros::try_from(m).unwrap_or(Micros::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MICROS_PER_SEC;

    /// A line as `POST /events` reads it with the default limits.
    fn parse_line(line: &str, arrival: Micros) -> Result<Event, String> {
        read_line(line, arrival, &Limits::DEFAULT)
    }

    #[test]
    fn a_full_event_with_attributes() {
        let line = r#"{"host":"h","service":"s","state":"ok","description":"d","metric":2.5,
            "tags":["a","b"],"time":"2023-11-14T22:13:20.123Z","ttl":30,"env":"prod","n":3,
            "version":2.0,"big":1e3,"ratio":0.5,"on":true}"#;
        let e = parse_line(&line.replace('\n', ""), 0).unwrap();
        assert_eq!(
            (e.host_str(), e.service_str(), e.state.as_deref()),
            ("h", "s", Some("ok"))
        );
        assert_eq!(e.metric, Some(Metric::Float(2.5)));
        assert_eq!(e.tags, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(e.time, 1_700_000_000_123_000);
        assert_eq!(e.ttl, Some(30.0));
        assert_eq!(e.attribute("env"), Some("prod"));
        assert_eq!(e.attribute("n"), Some("3"));
        // Numbers as a rule file or a test gives them (`event::number_text`).
        let attributes = ["version", "big", "ratio", "on"].map(|k| e.attribute(k));
        assert_eq!(
            attributes,
            [Some("2"), Some("1000"), Some("0.5"), Some("true")]
        );
    }

    /// The metric a line gives is the double nearest to its decimal text,
    /// so vigil's own JSON of an event (shortest round-trip digits) reads
    /// back as the same event. Found by the `event_line` fuzz target.
    #[test]
    fn a_metric_is_read_as_the_nearest_double() {
        let metric = |text: &str| {
            parse_line(&format!(r#"{{"metric":{text}}}"#), 0)
                .unwrap()
                .metric
        };
        let nearest = 1.844_674_407_131_290_6e19;
        assert_eq!(
            metric("1.8446744071312906e+19"),
            Some(Metric::Float(nearest))
        );
        assert_eq!(metric("18446744071312906848"), Some(Metric::Float(nearest)));
        assert_eq!(metric("0.1"), Some(Metric::Float(0.1)));
    }

    /// As on the wire: `metric_sint64`, else `metric_d`, else `metric_f`,
    /// whatever order the keys come in.
    #[test]
    fn a_metric_given_twice_is_read_with_the_wires_precedence() {
        let m = |line: &str| parse_line(line, 42).unwrap().metric;
        assert_eq!(
            m(r#"{"metric_d": 1.5, "metric_f": 2.5}"#),
            Some(Metric::Float(1.5))
        );
        assert_eq!(
            m(r#"{"metric_f": 2.5, "metric_d": 1.5}"#),
            Some(Metric::Float(1.5))
        );
        assert_eq!(
            m(r#"{"metric_f": 2.5, "metric_sint64": 7}"#),
            Some(Metric::Int(7))
        );
        assert_eq!(
            m(r#"{"metric": 3, "metric_f": 2.5}"#),
            Some(Metric::Float(2.5))
        );
        // Each protobuf name keeps its field's type, as a client using it means.
        assert_eq!(m(r#"{"metric_d": 3}"#), Some(Metric::Float(3.0)));
        assert_eq!(m(r#"{"metric_f": 3}"#), Some(Metric::Float(3.0)));
        assert_eq!(m(r#"{"metric": 3}"#), Some(Metric::Int(3)));
        assert_eq!(m(r#"{"metric": 3}"#), Some(Metric::Int(3)));
    }

    #[test]
    fn times_in_every_accepted_form() {
        let t = |line: &str| parse_line(line, 42).unwrap().time;
        assert_eq!(
            t(r#"{"time": 1700000000.5}"#),
            1_700_000_000 * MICROS_PER_SEC + 500_000
        );
        assert_eq!(
            t(r#"{"time": "2023-11-14T22:13:20+00:00"}"#),
            1_700_000_000 * MICROS_PER_SEC
        );
        assert_eq!(
            t(r#"{"time": "2023-11-14T23:13:20.250+01:00"}"#),
            1_700_000_000 * MICROS_PER_SEC + 250_000
        );
        assert_eq!(
            t(r#"{"time": "2023-11-14T16:43:20-05:30"}"#),
            1_700_000_000 * MICROS_PER_SEC
        );
        assert_eq!(t(r#"{"time_micros": 7}"#), 7);
        assert_eq!(t(r#"{"host": "h"}"#), 42, "arrival time");
        assert_eq!(t(r#"{"time": null}"#), 42);
    }

    #[test]
    fn errors_name_the_field() {
        let err = |line: &str| parse_line(line, 0).unwrap_err();
        assert_eq!(err(r#"{"metric": "high"}"#), "metric must be a number");
        assert_eq!(err(r#"{"host": 1}"#), "host must be a string");
        assert_eq!(err(r#"{"tags": "a"}"#), "tags must be an array of strings");
        assert_eq!(err(r#"{"ttl": "1"}"#), "ttl must be a number");
        assert!(err(r#"{"time": "yesterday"}"#).starts_with("time must be ISO 8601"));
        for bad in [
            "2023-11-14T23:13:20+25:00",
            "2023-11-14T23:13:20+01:60",
            "+01:00",
        ] {
            let line = format!(r#"{{"time": "{bad}"}}"#);
            assert!(err(&line).starts_with("time must be ISO 8601"), "{bad}");
        }
        assert_eq!(
            err(r#"{"metric_sint64": 1.5}"#),
            "metric_sint64 must be an integer (within 64 bits)"
        );
        assert_eq!(
            err(r#"{"env": {"a": 1}}"#),
            "attribute env must be a string"
        );
        assert_eq!(err("[1]"), "an event must be a JSON object");
        assert!(err("{nope").starts_with("invalid JSON"));
    }

    #[test]
    fn every_key_counted_as_a_field_is_read_as_one() {
        for key in RESERVED_FIELDS {
            let read = ["\"x\"", "1", "[\"a\"]"]
                .iter()
                .filter_map(|value| parse_line(&format!("{{\"{key}\": {value}}}"), 0).ok());
            let attributes: Vec<_> = read.map(|e| e.attributes).collect();
            assert!(!attributes.is_empty(), "{key} accepts a value");
            assert!(
                attributes.iter().all(Vec::is_empty),
                "{key}: {attributes:?}"
            );
        }
        assert_eq!(parse_line(r#"{"rack": 1}"#, 0).unwrap().attributes.len(), 1);
    }

    #[test]
    fn a_line_is_read_into_bounded_values_and_counted() {
        let read = |line: &str, limits: &Limits| {
            let mut deserializer = serde_json::Deserializer::from_str(line);
            let (fields, counts) =
                de::DeserializeSeed::deserialize(BoundedLine(limits), &mut deserializer).unwrap();
            (Value::Object(fields), counts.tags, counts.attributes)
        };
        let line =
            r#"{"host":"h","tags":["a",{"x":[1]}],"env":"p","n":null,"m":{"deep":[1,2]},"h2":[3]}"#;
        assert_eq!(
            read(line, &Limits::DEFAULT),
            (
                serde_json::json!({"host":"h","tags":["a",{}],"env":"p","m":{},"h2":[]}),
                2,
                3
            )
        );
        let few = Limits {
            max_tags: 1,
            max_attributes: 1,
            ..Limits::DEFAULT
        };
        assert_eq!(
            read(r#"{"tags":["a","b","c"],"x":"1","y":"2","z":null}"#, &few),
            (serde_json::json!({"tags":["a"],"x":"1"}), 3, 2)
        );
        assert_eq!(
            read(r#"{"tags":null,"t\u0061gs":"t"}"#, &few),
            (serde_json::json!({"tags":"t"}), 0, 0)
        );
        // The last of a key wins, a null as well.
        assert_eq!(
            read(
                r#"{"host":"a","host":null,"env":"x","env":"y"}"#,
                &Limits::DEFAULT
            ),
            (serde_json::json!({"env":"y"}), 0, 2)
        );
    }

    /// How a line read before the bounded reading: parsed whole into JSON
    /// values, then made an event.
    fn reference(line: &str) -> Result<Event, String> {
        let value: Value = serde_json::from_str(line).map_err(invalid_json)?;
        let Value::Object(fields) = value else {
            return Err(NOT_AN_OBJECT.to_owned());
        };
        to_event(fields, 0)
    }

    #[test]
    fn reads_every_line_as_parsing_it_whole_would() {
        let seeds = [
            r#"{"host":"h","service":"s","state":"ok","description":"d","metric":2.5,"tags":["a","b"],"time":"2023-11-14T22:13:20.123Z","ttl":30,"env":"prod","n":3}"#,
            r#"{"metric_sint64":-4,"time_micros":7,"tags":[],"x":null,"x":true,"host":null,"host":"k"}"#,
            r#"{"tags":["a",["b"]],"env":{"k":[1,{"z":null}]},"time":1.5e9,"m":-0.0}"#,
        ];
        let mut next = crate::test_rng::xorshift(0x1234_5678_9abc_def1);
        let alphabet = br#"{}[]",:0123456789.-eEtrufalsn hostagsv\u"#;
        let mut agreed_ok = 0;
        for round in 0..30_000 {
            let mut line = seeds[round % seeds.len()].as_bytes().to_vec();
            for _ in 0..1 + next() % 3 {
                let at = (next() as usize) % line.len();
                let byte = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 => line[at] = byte,
                    1 => line.insert(at, byte),
                    _ => drop(line.remove(at)),
                }
                if line.is_empty() {
                    line.push(b'{');
                }
            }
            let Ok(line) = std::str::from_utf8(&line) else {
                continue;
            };
            let expected = reference(line);
            let got = parse_line(line, 0);
            agreed_ok += usize::from(expected.is_ok());
            // Bad JSON inside a skipped array or object can be named
            // differently by serde_json (`trailing comma` is `key must be a
            // string` there), at the same place.
            let at = |e: &str| e.rsplit_once(" at line ").map(|(_, at)| at.to_owned());
            if let (Err(got), Err(expected)) = (&got, &expected)
                && got.starts_with("invalid JSON")
                && expected.starts_with("invalid JSON")
            {
                assert_eq!(at(got), at(expected), "line {line}: {got} / {expected}");
                continue;
            }
            assert_eq!(format!("{got:?}"), format!("{expected:?}"), "line {line}");
        }
        assert!(
            agreed_ok > 1000,
            "accepted lines exercised too: {agreed_ok}"
        );
    }

    #[test]
    fn limits_refuse_a_line_and_invalid_lines_say_why() {
        let limits = Limits {
            max_tags: 2,
            max_attributes: 1,
            ..Limits::DEFAULT
        };
        let refused = |line: &str| match accept_line(line, 0, &limits) {
            Err(Refused::Over(e)) => e.to_string(),
            Err(Refused::Invalid(reason)) => panic!("invalid: {reason}"),
            Ok(e) => panic!("accepted: {e:?}"),
        };
        assert_eq!(
            refused(r#"{"tags":["a","b","c"]}"#),
            "3 tags exceeds --max-tags 2"
        );
        assert_eq!(
            refused(r#"{"a":"1","b":"2"}"#),
            "2 attributes exceeds --max-attributes 1"
        );
        // A wrong `tags` does not keep the attributes from being counted.
        assert_eq!(
            refused(r#"{"tags":1,"a":"1","b":"2"}"#),
            "2 attributes exceeds --max-attributes 1"
        );
        assert!(accept_line(r#"{"tags":["a","b"],"a":"1","b":null}"#, 0, &limits).is_ok());
        let invalid = |line: &str| match accept_line(line, 0, &limits) {
            Err(Refused::Invalid(reason)) => reason,
            other => panic!("{line}: {:?}", other.map(drop).map_err(|_| ())),
        };
        assert_eq!(invalid("[1]"), "an event must be a JSON object");
        assert_eq!(invalid("\"x\""), "an event must be a JSON object");
        assert!(invalid("{nope").starts_with("invalid JSON: key must be a string"));
        assert!(invalid(r#"{"a":1"#).starts_with("invalid JSON: EOF"));
        assert!(invalid(r#"{"a":1} x"#).starts_with("invalid JSON: trailing characters"));
        for (line, reason) in [
            (r#"{"tags":"a"}"#, "tags must be an array of strings"),
            (
                r#"{"tags":["a",["b"]]}"#,
                "tags must be an array of strings",
            ),
            (r#"{"host":["h"]}"#, "host must be a string"),
            (r#"{"metric":{"v":1}}"#, "metric must be a number"),
            (r#"{"env":[1,2,3]}"#, "attribute env must be a string"),
        ] {
            assert_eq!(invalid(line), reason, "{line}");
        }
    }
}
