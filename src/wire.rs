//! Decoding a Riemann `Msg` straight into core [`Event`]s: the ingest hot path
//! (and, through [`decode_events`], the events of vigil's gRPC `Msg`).
//!
//! prost would decode into its generated structs first, then vigil would move
//! every field into an `Event` and rebuild the attribute list. Here each
//! protobuf field lands directly in its final place, and events decoded into a
//! reused buffer keep their string allocations from one message to the next,
//! so a connection in steady state decodes without allocating; a string equal
//! to what its slot already holds (a steady stream's states, tags and
//! attributes) is neither validated again nor copied. What a buffer keeps
//! is sized to what it holds now, not to the largest message it ever took
//! ([`keep_slots`], `replace`): one large message must not leave an idle
//! connection holding its size.
//!
//! Semantics match prost + [`proto::from_pb`](crate::proto::from_pb) exactly
//! (a test compares them on random inputs): proto2 last-value-wins for
//! scalars, repeated fields append, unknown fields are skipped, `Msg.states`
//! is ignored, and a known field with the wrong wire type is an error.
//!
//! A string that is not UTF-8 is an error here, as in prost; the transports
//! then decode again from a copy with such strings repaired ([`repair_utf8`]).
//!
//! [`Limits`] are checked as fields are decoded, before anything is copied:
//! the event, tag or attribute over its limit is never stored, and a string
//! over `max_string` is refused by its length alone.

use crate::clock::{MICROS_PER_SEC, Micros};
use crate::event::{Event, Metric, RESERVED_FIELDS, same_bytes};
use crate::limits::{Exceeded, Limit, Limits};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message truncated")]
    Truncated,
    #[error("varint longer than 10 bytes")]
    VarintOverflow,
    #[error("field {0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("field {field} has the wrong wire type {wire_type}")]
    WireType { field: &'static str, wire_type: u8 },
    #[error("unsupported wire type {0}")]
    UnsupportedWireType(u8),
    #[error("field number 0 is invalid")]
    ZeroTag,
    #[error("{0}")]
    Exceeded(Exceeded),
}

impl From<Exceeded> for DecodeError {
    fn from(e: Exceeded) -> Self {
        DecodeError::Exceeded(e)
    }
}

/// Too many occurrences of `field` in `body`; they are counted (only now, on
/// the way out) so the reply says how many there really were.
fn exceeded_count(
    limit: Limit,
    what: &'static str,
    body: &[u8],
    field: u64,
    max: usize,
) -> Exceeded {
    Exceeded {
        limit,
        event: None,
        what,
        size: count_fields(body, field),
        max,
    }
}

/// What a `Msg` asked for, besides its events.
#[derive(Debug, Default, PartialEq)]
pub struct Request {
    /// The query string, when the `Msg` carried a query.
    pub query: Option<String>,
}

/// Decodes `body` (a whole `Msg`) into `events`, reusing the events already
/// there (and their allocations); on return `events` holds exactly the
/// message's events. Events without a time get `now`. A message over one of
/// the `limits` is an [`DecodeError::Exceeded`] error, like any other.
pub fn decode_msg(
    body: &[u8],
    now: Micros,
    limits: &Limits,
    events: &mut Vec<Event>,
) -> Result<Request, DecodeError> {
    let (result, end) = decode_msg_at(body, now, limits, events, 0);
    keep_slots(events, end);
    result
}

/// Like [`decode_msg`], but the message's events land in `events[start..end]`
/// (`end` is returned with the request) and the events after them are left
/// in place, so several messages decode one after another into one buffer
/// and every slot keeps its allocations for the next time. On an error the
/// slots from `start` hold garbage; the caller reuses them.
pub fn decode_msg_at(
    body: &[u8],
    now: Micros,
    limits: &Limits,
    events: &mut Vec<Event>,
    start: usize,
) -> (Result<Request, DecodeError>, usize) {
    let mut slots = Slots::new(body, 6, now, limits, events, start);
    let mut request = Request::default();
    let mut r = reader(body);
    let result = (|| {
        while let Some((field, wire)) = r.key()? {
            match field {
                5 => merge_query(r.len_delimited("query", wire)?, limits, &mut request.query)?,
                6 => slots.decode(r.len_delimited("events", wire)?)?,
                // ok (2), error (3) and the deprecated states (4) mean nothing
                // to a server, but are validated as prost would, so both
                // decoders accept exactly the same messages.
                2 => r.varint_field("ok", wire).map(drop)?,
                3 => r
                    .len_delimited("error", wire)
                    .and_then(|b| utf8("error", b))
                    .map(drop)?,
                4 => validate_state(r.len_delimited("states", wire)?)?,
                _ => r.skip(wire)?,
            }
        }
        Ok(())
    })();
    (result.map(|()| request), slots.used)
}

/// Decodes a message that carries nothing but events, each in field `field`
/// (vigil's gRPC `Msg`: field 1), into `events`, reusing the events already
/// there, within `limits` as [`decode_msg`] does; other fields are skipped.
pub fn decode_events(
    body: &[u8],
    field: u64,
    now: Micros,
    limits: &Limits,
    events: &mut Vec<Event>,
) -> Result<(), DecodeError> {
    let mut slots = Slots::new(body, field, now, limits, events, 0);
    let mut r = reader(body);
    let result = (|| {
        while let Some((number, wire)) = r.key()? {
            if number == field {
                slots.decode(r.len_delimited("events", wire)?)?;
            } else {
                r.skip(wire)?;
            }
        }
        Ok(())
    })();
    let used = slots.used;
    keep_slots(events, used);
    result
}

/// `body` (a `Msg` whose events are its field `events_field`) with every
/// string of its events and of its query that is not UTF-8 made so, each
/// byte of an invalid sequence replaced by `?`, so no length, and no other
/// byte, changes; and how many strings that took. `None` when none needed
/// it, or the message is malformed otherwise (its own error then stands).
///
/// Riemann's Java decoder takes such strings (a proto2 `string` is not
/// checked there), and collectd's `write_riemann` sends some: refusing the
/// `Msg` would refuse its forty good events with the bad one, and their
/// series would expire. So the decoders stay strict, and the transports
/// decode again from this repaired copy when they refuse a message for it.
pub fn repair_utf8(body: &[u8], events_field: u64) -> Option<(Vec<u8>, usize)> {
    let mut fixed = body.to_vec();
    let mut repaired = 0;
    let mut strings = Vec::new();
    strings_of_msg(body, events_field, &mut strings).ok()?;
    for string in strings {
        let start = string.as_ptr() as usize - body.as_ptr() as usize;
        repaired += usize::from(repair(&mut fixed[start..start + string.len()]));
    }
    (repaired > 0).then_some((fixed, repaired))
}

/// The strings of `body`'s events and query, where [`repair_utf8`] looks.
fn strings_of_msg<'a>(
    body: &'a [u8],
    events_field: u64,
    out: &mut Vec<&'a [u8]>,
) -> Result<(), DecodeError> {
    let mut r = reader(body);
    while let Some((field, wire)) = r.key()? {
        if field == events_field {
            strings_of(
                r.len_delimited("events", wire)?,
                &[2, 3, 4, 5, 7],
                Some(9),
                out,
            )?;
        } else if field == 5 && events_field == 6 {
            strings_of(r.len_delimited("query", wire)?, &[1], None, out)?;
        } else {
            r.skip(wire)?;
        }
    }
    Ok(())
}

/// The string fields `fields` of message `body`, and the key and value of
/// each of its attributes (field `attributes`).
fn strings_of<'a>(
    body: &'a [u8],
    fields: &[u64],
    attributes: Option<u64>,
    out: &mut Vec<&'a [u8]>,
) -> Result<(), DecodeError> {
    let mut r = reader(body);
    while let Some((field, wire)) = r.key()? {
        if fields.contains(&field) && wire == LEN {
            out.push(r.len_delimited("string", wire)?);
        } else if Some(field) == attributes && wire == LEN {
            strings_of(r.len_delimited("attributes", wire)?, &[1, 2], None, out)?;
        } else {
            r.skip(wire)?;
        }
    }
    Ok(())
}

/// `bytes` as a string, each byte of its invalid UTF-8 sequences replaced
/// by `?` as [`repair_utf8`] does; whether there were any.
pub fn repaired_string(mut bytes: Vec<u8>) -> (String, bool) {
    let repaired = repair(&mut bytes);
    let text = String::from_utf8(bytes).expect("repair leaves only UTF-8");
    (text, repaired)
}

/// Replaces each byte of `text`'s invalid UTF-8 sequences by `?`; whether
/// there were any.
pub fn repair(mut text: &mut [u8]) -> bool {
    let mut any = false;
    while let Err(e) = std::str::from_utf8(text) {
        let bad = e.error_len().unwrap_or(text.len() - e.valid_up_to());
        let (_, rest) = text.split_at_mut(e.valid_up_to());
        rest[..bad].fill(b'?');
        text = &mut rest[bad..];
        any = true;
    }
    any
}

/// Below this many slots (events, or a slot's tags and attributes) a reused
/// buffer keeps its capacity whatever it holds; above it, at most four times
/// what it holds. Small enough that an idle connection's buffers cost little,
/// large enough that a steady stream of messages never reallocates them.
const KEEP_SLOTS: usize = 64;

/// Beyond this many bytes a reused string is kept only up to four times the
/// length it holds now.
const KEEP_STRING: usize = 1024;

/// Keeps the first `used` slots of a reused buffer, with their allocations,
/// for the next message; the buffer's own capacity is cut back when it is far
/// larger than that (after one message of many events).
#[inline]
pub fn keep_slots<T>(slots: &mut Vec<T>, used: usize) {
    slots.truncate(used);
    if slots.capacity() > KEEP_SLOTS && slots.capacity() / 4 > used {
        shrink(slots);
    }
}

/// Off the hot path: taken once after a message far larger than the next.
#[cold]
fn shrink<T>(slots: &mut Vec<T>) {
    slots.shrink_to(slots.len().max(KEEP_SLOTS));
}

/// Where one message's events go: `events[start..]`, one slot per event field
/// (`field`) of `body`, reusing what the slots hold.
struct Slots<'a> {
    body: &'a [u8],
    field: u64,
    now: Micros,
    limits: &'a Limits,
    events: &'a mut Vec<Event>,
    start: usize,
    /// The slot the next event goes to.
    used: usize,
}

impl<'a> Slots<'a> {
    fn new(
        body: &'a [u8],
        field: u64,
        now: Micros,
        limits: &'a Limits,
        events: &'a mut Vec<Event>,
        start: usize,
    ) -> Self {
        Slots {
            body,
            field,
            now,
            limits,
            events,
            start,
            used: start,
        }
    }

    /// Decodes the encoded event `bytes` into the next slot, or refuses it
    /// past `max_events` (counting the message's events for the error).
    fn decode(&mut self, bytes: &[u8]) -> Result<(), DecodeError> {
        let (position, max) = (self.used - self.start, self.limits.max_events);
        if position == max {
            let (body, field) = (self.body, self.field);
            return Err(exceeded_count(Limit::Events, "events", body, field, max).into());
        }
        if self.used == self.events.len() {
            self.events.push(Event::default());
        }
        let event = &mut self.events[self.used];
        decode_event(bytes, self.now, self.limits, event).map_err(|e| match e {
            DecodeError::Exceeded(e) => e.in_event(position).into(),
            other => other,
        })?;
        self.used += 1;
        Ok(())
    }
}

/// A repeated `query` field merges into the first, as protobuf says.
fn merge_query(
    body: &[u8],
    limits: &Limits,
    query: &mut Option<String>,
) -> Result<(), DecodeError> {
    let query = query.get_or_insert_with(String::new);
    let mut r = reader(body);
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => replace(
                query,
                text("query", r.len_delimited("query.string", wire)?, limits)?,
            ),
            _ => r.skip(wire)?,
        }
    }
    Ok(())
}

/// The deprecated `State` message: checked, then ignored.
fn validate_state(body: &[u8]) -> Result<(), DecodeError> {
    let mut r = reader(body);
    while let Some((field, wire)) = r.key()? {
        match field {
            1 | 6 => r.varint_field("states", wire).map(drop)?,
            2..=5 | 7 => r
                .len_delimited("states", wire)
                .and_then(|b| utf8("states", b))
                .map(drop)?,
            8 => r.fixed32_field("states", wire).map(drop)?,
            _ => r.skip(wire)?,
        }
    }
    Ok(())
}

/// Overwrites `e` with the event encoded in `body`.
fn decode_event(
    body: &[u8],
    now: Micros,
    limits: &Limits,
    e: &mut Event,
) -> Result<(), DecodeError> {
    let mut r = reader(body);
    let (mut time, mut time_micros) = (None, None);
    let (mut sint64, mut double, mut float) = (None, None, None);
    let mut tags = 0;
    // Stored attributes, and all decoded (the limit counts dropped ones too).
    let (mut attributes, mut attribute_fields) = (0, 0);
    let mut seen = Seen::default();
    e.ttl = None;
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => time = Some(r.varint_field("time", wire)? as i64),
            2 => set_text(&mut e.state, &mut seen.state, "state", &mut r, wire, limits)?,
            3 => set_text(
                &mut e.service,
                &mut seen.service,
                "service",
                &mut r,
                wire,
                limits,
            )?,
            4 => set_text(&mut e.host, &mut seen.host, "host", &mut r, wire, limits)?,
            5 => set_text(
                &mut e.description,
                &mut seen.description,
                "description",
                &mut r,
                wire,
                limits,
            )?,
            7 => {
                let tag = r.len_delimited("tags", wire)?;
                if tags == limits.max_tags {
                    let max = limits.max_tags;
                    return Err(exceeded_count(Limit::Tags, "tags", body, 7, max).into());
                }
                if tags == e.tags.len() {
                    e.tags.push(String::new());
                }
                let slot = &mut e.tags[tags];
                text_for("tag", tag, limits, slot)?.store(slot);
                tags += 1;
            }
            8 => e.ttl = Some(f32::from_bits(r.fixed32_field("ttl", wire)?)),
            9 => {
                let attribute = r.len_delimited("attributes", wire)?;
                if attribute_fields == limits.max_attributes {
                    let (what, max) = ("attributes", limits.max_attributes);
                    return Err(exceeded_count(Limit::Attributes, what, body, 9, max).into());
                }
                attribute_fields += 1;
                if attributes == e.attributes.len() {
                    e.attributes.push((String::new(), String::new()));
                }
                let slot = &mut e.attributes[attributes];
                let (key, value) = decode_attribute(attribute, limits, slot)?;
                let name = match key {
                    Text::Same => slot.0.as_str(),
                    Text::New(name) => name,
                };
                // Names of standard fields are dropped, as Riemann does.
                if !RESERVED_FIELDS.contains(&name) {
                    key.store(&mut slot.0);
                    value.store(&mut slot.1);
                    attributes += 1;
                }
            }
            10 => time_micros = Some(r.varint_field("time_micros", wire)? as i64),
            13 => {
                let v = r.varint_field("metric_sint64", wire)?;
                sint64 = Some(((v >> 1) as i64) ^ -((v & 1) as i64));
            }
            14 => double = Some(f64::from_bits(r.fixed64_field("metric_d", wire)?)),
            15 => float = Some(f32::from_bits(r.fixed32_field("metric_f", wire)?)),
            _ => r.skip(wire)?,
        }
    }
    for (field, seen) in [
        (&mut e.host, seen.host),
        (&mut e.service, seen.service),
        (&mut e.state, seen.state),
        (&mut e.description, seen.description),
    ] {
        if !seen {
            *field = None;
        }
    }
    e.tags.truncate(tags);
    e.attributes.truncate(attributes);
    // One test for both on the hot path: nearly always neither is large.
    if e.tags.capacity().max(e.attributes.capacity()) > KEEP_SLOTS {
        keep_slots(&mut e.tags, tags);
        keep_slots(&mut e.attributes, attributes);
    }
    e.time = match (time_micros, time) {
        (Some(us), _) => us,
        (None, Some(s)) => s.saturating_mul(MICROS_PER_SEC),
        (None, None) => now,
    };
    e.metric = match (sint64, double, float) {
        (Some(i), _, _) => Some(Metric::Int(i)),
        (None, Some(d), _) => Some(Metric::Float(d)),
        (None, None, Some(f)) => Some(Metric::Float(f64::from(f))),
        (None, None, None) => None,
    };
    Ok(())
}

/// Which optional strings the encoded event set (the rest become `None`).
#[derive(Default)]
struct Seen {
    host: bool,
    service: bool,
    state: bool,
    description: bool,
}

/// An attribute's key and value, each compared with what `slot` holds.
fn decode_attribute<'a>(
    body: &'a [u8],
    limits: &Limits,
    slot: &(String, String),
) -> Result<(Text<'a>, Text<'a>), DecodeError> {
    let mut r = reader(body);
    let (mut key, mut value) = (Text::New(""), Text::New(""));
    while let Some((field, wire)) = r.key()? {
        match field {
            1 => {
                let bytes = r.len_delimited("attributes.key", wire)?;
                key = text_for("attributes.key", bytes, limits, &slot.0)?;
            }
            2 => {
                let bytes = r.len_delimited("attributes.value", wire)?;
                value = text_for("attributes.value", bytes, limits, &slot.1)?;
            }
            _ => r.skip(wire)?,
        }
    }
    Ok((key, value))
}

/// A string field decoded for a reused slot.
#[derive(Clone, Copy)]
enum Text<'a> {
    /// Exactly what the slot holds already: valid UTF-8 (it is a `String`),
    /// so neither validated again nor copied. Most fields of a steady stream
    /// (state, tags, attributes) repeat from one event to the next.
    Same,
    New(&'a str),
}

impl Text<'_> {
    fn store(self, slot: &mut String) {
        if let Text::New(text) = self {
            replace(slot, text);
        }
    }
}

/// [`text`] for a field that goes to a slot now holding `held`. Inlined on
/// purpose: unrelated edits elsewhere in the crate were seen to tip the
/// compiler into calling it, +6 % instructions per 1-event message.
#[inline(always)]
fn text_for<'a>(
    field: &'static str,
    bytes: &'a [u8],
    limits: &Limits,
    held: &str,
) -> Result<Text<'a>, DecodeError> {
    if bytes.len() <= limits.max_string && same_bytes(bytes, held.as_bytes()) {
        return Ok(Text::Same);
    }
    text(field, bytes, limits).map(Text::New)
}

/// `bytes` as text, if they are UTF-8. A host or service name that differs
/// from its slot's is checked on every event: short ASCII (nearly all of
/// them) is recognised inline, where the call to `from_utf8` cost some 70
/// instructions for a 20-byte name (callgrind, stop 47).
#[inline(always)]
fn utf8<'a>(field: &'static str, bytes: &'a [u8]) -> Result<&'a str, DecodeError> {
    if short_ascii(bytes) {
        // SAFETY: ASCII is valid UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8(field))
}

/// Whether `s` is at most 32 bytes, all ASCII (a longer string is left to
/// `from_utf8`, whose loop is as fast there). Overlapping loads of the first
/// and last bytes cover every length in a bracket, as in
/// [`same_bytes`](crate::event::same_bytes).
#[inline(always)]
fn short_ascii(s: &[u8]) -> bool {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    fn u64_at(s: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(s[at..at + 8].try_into().expect("8 bytes"))
    }
    fn u32_at(s: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(s[at..at + 4].try_into().expect("4 bytes"))
    }
    let n = s.len();
    match n {
        0 => true,
        1..4 => (s[0] | s[n / 2] | s[n - 1]) < 0x80,
        4..8 => (u32_at(s, 0) | u32_at(s, n - 4)) & (HIGH as u32) == 0,
        8..=16 => (u64_at(s, 0) | u64_at(s, n - 8)) & HIGH == 0,
        17..=32 => (u64_at(s, 0) | u64_at(s, 8) | u64_at(s, n - 16) | u64_at(s, n - 8)) & HIGH == 0,
        _ => false,
    }
}

/// A string vigil keeps: within `max_string`, then valid UTF-8.
fn text<'a>(field: &'static str, bytes: &'a [u8], limits: &Limits) -> Result<&'a str, DecodeError> {
    if bytes.len() > limits.max_string {
        return Err(DecodeError::Exceeded(Exceeded {
            limit: Limit::String,
            event: None,
            what: field,
            size: bytes.len(),
            max: limits.max_string,
        }));
    }
    utf8(field, bytes)
}

/// How many times `wanted` occurs in `body`, up to the first malformed field.
fn count_fields(body: &[u8], wanted: u64) -> usize {
    let mut r = reader(body);
    let mut n = 0;
    while let Ok(Some((field, wire))) = r.key() {
        n += usize::from(field == wanted);
        if r.skip(wire).is_err() {
            break;
        }
    }
    n
}

/// Overwrites a reused string, keeping its allocation unless that is far
/// larger than `value` (it last held a long description, say).
#[inline]
fn replace(target: &mut String, value: &str) {
    if target.capacity() > KEEP_STRING && target.capacity() / 4 > value.len() {
        return reallocate(target, value);
    }
    target.clear();
    target.push_str(value);
}

#[cold]
fn reallocate(target: &mut String, value: &str) {
    *target = value.to_owned();
}

/// Decodes the optional string `field` of an event into `target`. Inlined:
/// host, service and state come in every event, and the three calls cost
/// some 48 instructions per 1-event message (callgrind).
#[inline(always)]
fn set_text(
    target: &mut Option<String>,
    seen: &mut bool,
    field: &'static str,
    r: &mut Reader<'_>,
    wire: u8,
    limits: &Limits,
) -> Result<(), DecodeError> {
    let bytes = r.len_delimited(field, wire)?;
    match target {
        Some(held) => text_for(field, bytes, limits, held)?.store(held),
        None => *target = Some(text(field, bytes, limits)?.to_owned()),
    }
    *seen = true;
    Ok(())
}

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

struct Reader<'a> {
    buf: &'a [u8],
    /// The number of the field whose key was read last (to match group ends).
    field: u64,
}

/// Nesting allowed for unknown groups, as prost's recursion limit.
const MAX_GROUP_DEPTH: u32 = 100;

fn reader(buf: &[u8]) -> Reader<'_> {
    Reader { buf, field: 0 }
}

impl<'a> Reader<'a> {
    /// The next field's number and wire type, or `None` at the end.
    fn key(&mut self) -> Result<Option<(u64, u8)>, DecodeError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        // Field numbers are 29 bits; prost rejects larger keys the same way.
        if key > u64::from(u32::MAX) {
            return Err(DecodeError::VarintOverflow);
        }
        let field = key >> 3;
        if field == 0 {
            return Err(DecodeError::ZeroTag);
        }
        let wire = (key & 7) as u8;
        if wire > FIXED32 {
            return Err(DecodeError::UnsupportedWireType(wire));
        }
        self.field = field;
        Ok(Some((field, wire)))
    }

    /// Inlined, the longer forms called: this is on every key and length.
    #[inline(always)]
    fn varint(&mut self) -> Result<u64, DecodeError> {
        // Keys and most lengths fit in one byte: skip the general loop for them.
        if let Some((&byte, rest)) = self.buf.split_first()
            && byte < 0x80
        {
            self.buf = rest;
            return Ok(u64::from(byte));
        }
        self.long_varint()
    }

    #[inline(never)]
    fn long_varint(&mut self) -> Result<u64, DecodeError> {
        // A varint of up to 8 bytes, with 8 bytes to read (a time in
        // microseconds takes 8), is gathered from one word: the byte
        // loop below cost ~95 instructions for it (callgrind, stop 50).
        if let Some(word) = self.buf.first_chunk::<8>() {
            let word = u64::from_le_bytes(*word);
            let ends = !word & 0x8080_8080_8080_8080;
            if ends != 0 {
                // The high bit of the last byte: bit 8k + 7 of byte k.
                let last_bit = ends.trailing_zeros();
                return Ok(self.gathered(word, last_bit));
            }
        }
        self.general_varint()
    }

    /// The varint whose last byte's (clear) high bit is bit `last_bit` of
    /// `word`, the buffer's first 8 bytes: its 7-bit groups put together, and
    /// its bytes consumed.
    #[inline(always)]
    fn gathered(&mut self, word: u64, last_bit: u32) -> u64 {
        // The varint's bytes only, without their continuation bits.
        let mut x = word & (u64::MAX >> (63 - last_bit)) & 0x7f7f_7f7f_7f7f_7f7f;
        // Pairs of 7-bit groups into 14 bits, then 28, then 56.
        x = (x & 0x007f_007f_007f_007f) | ((x & 0x7f00_7f00_7f00_7f00) >> 1);
        x = (x & 0x0000_3fff_0000_3fff) | ((x & 0x3fff_0000_3fff_0000) >> 2);
        x = (x & 0x0000_0000_0fff_ffff) | ((x & 0x0fff_ffff_0000_0000) >> 4);
        self.buf = &self.buf[(last_bit / 8 + 1) as usize..];
        x
    }

    /// Any varint, a byte at a time.
    fn general_varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for (i, &byte) in self.buf.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                // The 10th byte may only carry the top bit of a u64.
                if i == 9 && byte > 1 {
                    return Err(DecodeError::VarintOverflow);
                }
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        Err(if self.buf.len() >= 10 {
            DecodeError::VarintOverflow
        } else {
            DecodeError::Truncated
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn expect(field: &'static str, wire: u8, expected: u8) -> Result<(), DecodeError> {
        if wire == expected {
            Ok(())
        } else {
            Err(DecodeError::WireType {
                field,
                wire_type: wire,
            })
        }
    }

    fn varint_field(&mut self, field: &'static str, wire: u8) -> Result<u64, DecodeError> {
        Self::expect(field, wire, VARINT)?;
        self.varint()
    }

    fn fixed32_field(&mut self, field: &'static str, wire: u8) -> Result<u32, DecodeError> {
        Self::expect(field, wire, FIXED32)?;
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn fixed64_field(&mut self, field: &'static str, wire: u8) -> Result<u64, DecodeError> {
        Self::expect(field, wire, FIXED64)?;
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn len_delimited(&mut self, field: &'static str, wire: u8) -> Result<&'a [u8], DecodeError> {
        Self::expect(field, wire, LEN)?;
        let len = self.varint()?;
        self.take(usize::try_from(len).map_err(|_| DecodeError::Truncated)?)
    }

    fn skip(&mut self, wire: u8) -> Result<(), DecodeError> {
        self.skip_nested(wire, 0)
    }

    /// Skips an unknown field; a (deprecated) group is skipped whole, up to its
    /// matching end, as prost does.
    fn skip_nested(&mut self, wire: u8, depth: u32) -> Result<(), DecodeError> {
        match wire {
            VARINT => self.varint().map(drop),
            FIXED64 => self.take(8).map(drop),
            LEN => {
                let len = self.varint()?;
                self.take(usize::try_from(len).map_err(|_| DecodeError::Truncated)?)
                    .map(drop)
            }
            FIXED32 => self.take(4).map(drop),
            START_GROUP => {
                if depth >= MAX_GROUP_DEPTH {
                    return Err(DecodeError::UnsupportedWireType(wire));
                }
                let group = self.field;
                loop {
                    let Some((field, inner)) = self.key()? else {
                        return Err(DecodeError::Truncated);
                    };
                    if inner == END_GROUP {
                        return if field == group {
                            Ok(())
                        } else {
                            Err(DecodeError::UnsupportedWireType(inner))
                        };
                    }
                    self.skip_nested(inner, depth + 1)?;
                }
            }
            other => Err(DecodeError::UnsupportedWireType(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::proto::{self, Attribute, Msg, PbEvent, PbQuery};

    /// prost + `from_pb`: the reference this decoder must agree with.
    fn reference(body: &[u8], now: Micros) -> Option<(Vec<Event>, Option<String>)> {
        let msg = Msg::decode(body).ok()?;
        let query = msg.query.map(|q| q.string.unwrap_or_default());
        Some((
            msg.events
                .into_iter()
                .map(|e| proto::from_pb(e, now))
                .collect(),
            query,
        ))
    }

    fn ours(
        body: &[u8],
        now: Micros,
        events: &mut Vec<Event>,
    ) -> Option<(Vec<Event>, Option<String>)> {
        let request = decode_msg(body, now, &Limits::DEFAULT, events).ok()?;
        Some((events.clone(), request.query))
    }

    fn full_event(i: i64) -> PbEvent {
        PbEvent {
            time: Some(1_700_000_000 + i),
            time_micros: (i % 2 == 0).then_some(1_700_000_000_123_456 + i),
            state: Some("ok".into()),
            service: Some(format!("svc {i}")),
            host: Some("host".into()),
            description: (i % 3 == 0).then(|| "d".into()),
            tags: (0..i % 4).map(|t| format!("t{t}")).collect(),
            ttl: Some(30.5),
            attributes: vec![
                Attribute {
                    key: "env".into(),
                    value: Some("prod".into()),
                },
                Attribute {
                    key: "ttl".into(),
                    value: Some("dropped".into()),
                },
                Attribute {
                    key: "novalue".into(),
                    value: None,
                },
            ],
            metric_sint64: (i % 3 == 1).then_some(-i),
            metric_d: (i % 3 != 1).then_some(i as f64 * 0.25),
            metric_f: Some(1.5),
        }
    }

    #[test]
    fn agrees_with_prost_on_full_messages_and_reuses_the_buffer() {
        let mut events = Vec::new();
        for n in [3usize, 1, 5, 0, 2] {
            let msg = Msg {
                events: (0..n as i64).map(full_event).collect(),
                query: (n == 2).then(|| PbQuery {
                    string: Some("service = \"x\"".into()),
                }),
                ..Msg::default()
            };
            let body = msg.encode_to_vec();
            assert_eq!(ours(&body, 7, &mut events), reference(&body, 7), "n = {n}");
            assert_eq!(events.len(), n);
        }
    }

    #[test]
    fn a_shorter_event_after_a_longer_one_leaves_nothing_behind() {
        let mut events = Vec::new();
        let long = Msg {
            events: vec![full_event(3)],
            ..Msg::default()
        }
        .encode_to_vec();
        let short = Msg {
            events: vec![PbEvent {
                service: Some("only".into()),
                ..PbEvent::default()
            }],
            ..Msg::default()
        }
        .encode_to_vec();
        decode_msg(&long, 1, &Limits::DEFAULT, &mut events).unwrap();
        decode_msg(&short, 1, &Limits::DEFAULT, &mut events).unwrap();
        assert_eq!(events, reference(&short, 1).unwrap().0);
        assert_eq!(events[0].host, None);
        assert!(events[0].tags.is_empty() && events[0].attributes.is_empty());
    }

    #[test]
    fn a_large_message_leaves_buffers_sized_to_the_next_one() {
        let encode = |events: Vec<PbEvent>| {
            Msg {
                events,
                ..Msg::default()
            }
            .encode_to_vec()
        };
        let big = PbEvent {
            host: Some("h".repeat(100_000)),
            service: Some("s".into()),
            tags: vec!["t".into(); 5_000],
            attributes: vec![
                Attribute {
                    key: "k".into(),
                    value: Some("v".into()),
                };
                5_000
            ],
            ..PbEvent::default()
        };
        let large = encode(vec![big; 20]);
        let small = |host: &str| {
            encode(vec![PbEvent {
                host: Some(host.into()),
                service: Some("s".into()),
                tags: vec!["t".into()],
                ..PbEvent::default()
            }])
        };
        let mut events = Vec::new();
        decode_msg(&large, 1, &Limits::DEFAULT, &mut events).unwrap();
        let host = events[0].host.as_ref().unwrap().capacity();
        assert!(host >= 100_000 && events[0].tags.capacity() >= 5_000);
        decode_msg(
            &encode(vec![PbEvent::default(); 2_000]),
            1,
            &Limits::DEFAULT,
            &mut events,
        )
        .unwrap();
        assert!(events.capacity() >= 2_000);
        decode_msg(&small("host-a"), 1, &Limits::DEFAULT, &mut events).unwrap();
        assert_eq!(events, reference(&small("host-a"), 1).unwrap().0);
        let e = &events[0];
        assert!(events.capacity() <= KEEP_SLOTS, "{}", events.capacity());
        assert!(e.host.as_ref().unwrap().capacity() <= KEEP_STRING);
        assert!(e.tags.capacity() <= KEEP_SLOTS && e.attributes.capacity() <= KEEP_SLOTS);
        // Ordinary messages keep what they use: a new host of the same
        // length is copied into the same allocation.
        let host = e.host.as_ref().unwrap().as_ptr();
        decode_msg(&small("host-b"), 1, &Limits::DEFAULT, &mut events).unwrap();
        assert_eq!(events[0].host.as_deref(), Some("host-b"));
        assert_eq!(events[0].host.as_ref().unwrap().as_ptr(), host);
    }

    #[test]
    fn strings_a_slot_already_holds_are_kept_and_others_still_checked() {
        let event = |state: &str, tag: &str, key: &str| PbEvent {
            state: Some(state.into()),
            tags: vec![tag.into()],
            attributes: vec![Attribute {
                key: key.into(),
                value: Some("v".into()),
            }],
            ..PbEvent::default()
        };
        let body = |e: PbEvent| {
            Msg {
                events: vec![e],
                ..Msg::default()
            }
            .encode_to_vec()
        };
        let mut events = Vec::new();
        for (state, tag, key) in [("ok", "t", "k"), ("ok", "t", "k"), ("ok", "u", "k")] {
            let b = body(event(state, tag, key));
            assert_eq!(ours(&b, 1, &mut events), reference(&b, 1));
        }
        // A slot holding a reserved name (only a caller could put it there)
        // does not let that name through.
        events[0].attributes[0].0 = "ttl".into();
        let b = body(event("ok", "t", "ttl"));
        assert_eq!(ours(&b, 1, &mut events), reference(&b, 1));
        assert!(events[0].attributes.is_empty());
        // A differing string is still validated.
        let mut b = body(event("ok", "x", "k"));
        let at = b.iter().position(|&c| c == b'x').unwrap();
        b[at] = 0xff;
        let got = decode_msg(&b, 1, &Limits::DEFAULT, &mut events);
        assert_eq!(got, Err(DecodeError::InvalidUtf8("tag")));
    }

    #[test]
    fn agrees_with_prost_on_mutated_and_random_bytes() {
        let seed = Msg {
            events: (0..4).map(full_event).collect(),
            query: Some(PbQuery {
                string: Some("true".into()),
            }),
            ..Msg::default()
        }
        .encode_to_vec();
        let mut next = crate::test_rng::xorshift(0x9e37_79b9_7f4a_7c15);
        let mut events = Vec::new();
        let mut agreed_ok = 0;
        for round in 0..20_000 {
            let body = crate::test_rng::mutated(&seed, round, &mut next);
            let expected = reference(&body, 9);
            let got = ours(&body, 9, &mut events);
            // NaN metrics compare unequal; compare their encodings instead.
            assert_eq!(
                format!("{got:?}"),
                format!("{expected:?}"),
                "input {body:02x?}"
            );
            agreed_ok += usize::from(expected.is_some());
        }
        assert!(
            agreed_ok > 1000,
            "the mutations must also exercise successful decodes"
        );
    }

    /// The word-at-a-time path agrees with the byte loop on every varint
    /// length (1 to 10 bytes, and 11, over), whatever follows it (nothing,
    /// or bytes with and without their high bit) and cut short anywhere.
    #[test]
    fn varints_of_every_length_read_as_the_byte_loop_reads_them() {
        let mut next = crate::test_rng::xorshift(0x2545_f491_4f6c_dd1d);
        for len in 1..=11usize {
            for round in 0..200 {
                let random = next();
                // Continuation bits on all but the last byte; the payload
                // random, or all ones (the largest value of each length).
                let mut bytes: Vec<u8> = (0..len)
                    .map(|i| {
                        let payload = if round % 2 == 0 {
                            0x7f
                        } else {
                            (random >> (7 * i % 57)) as u8 & 0x7f
                        };
                        payload | if i + 1 < len { 0x80 } else { 0 }
                    })
                    .collect();
                bytes.extend((0..round % 12).map(|i| if i % 2 == 0 { 0x80 } else { 0x01 }));
                for cut in 0..=bytes.len() {
                    let buf = &bytes[..cut];
                    let (mut fast, mut slow) = (reader(buf), reader(buf));
                    let (got, expected) = (fast.varint(), slow.general_varint());
                    assert_eq!(got, expected, "bytes {buf:02x?}");
                    assert_eq!(fast.buf.len(), slow.buf.len(), "bytes {buf:02x?}");
                }
            }
        }
    }

    /// A varint of `v`, `pad` bytes longer than its shortest form (never
    /// past 10 bytes): protobuf allows these, and prost reads them.
    fn put_varint(out: &mut Vec<u8>, mut v: u64, pad: usize) {
        let start = out.len();
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
        let pad = pad.min(10 - (out.len() - start));
        if pad > 0 {
            *out.last_mut().expect("a byte") |= 0x80;
            out.extend(std::iter::repeat_n(0x80, pad - 1));
            out.push(0);
        }
    }

    /// A random u64 of any bit width 0-64: varints of every length 1-10.
    fn any_width(next: &mut impl FnMut() -> u64) -> u64 {
        match next() % 8 {
            0 => u64::MAX,
            1 => 1 << 63,
            2 => (next() % 3).wrapping_sub(1), // u64::MAX, 0 or 1
            _ => next() >> (next() % 64),
        }
    }

    /// A hand-encoded event whose varints (keys too) are of every length,
    /// some overlong, in random field order, with unknown varint fields
    /// (keys of up to 5 bytes) and a varint often the event's last bytes.
    fn varint_heavy_event(next: &mut impl FnMut() -> u64) -> Vec<u8> {
        let mut e = Vec::new();
        let pad = |next: &mut dyn FnMut() -> u64| {
            if next().is_multiple_of(4) {
                (next() % 10) as usize
            } else {
                0
            }
        };
        for _ in 0..next() % 9 {
            match next() % 9 {
                0 | 1 => {
                    // time, time_micros, metric_sint64 (zigzag of any i64)
                    let field = [1u64, 10, 13][(next() % 3) as usize];
                    put_varint(&mut e, field << 3, pad(next));
                    let v = any_width(next);
                    let v = if field == 13 && next().is_multiple_of(2) {
                        let i = v as i64;
                        ((i << 1) ^ (i >> 63)) as u64
                    } else {
                        v
                    };
                    put_varint(&mut e, v, pad(next));
                }
                2 => {
                    // An unknown varint field, its key up to 5 bytes.
                    let field =
                        [6u64, 11, 12, 16, 2047, 1 << 20, (1 << 29) - 1][(next() % 7) as usize];
                    put_varint(&mut e, field << 3, pad(next));
                    put_varint(&mut e, any_width(next), pad(next));
                }
                3 => {
                    let field = 2 + next() % 4; // state, service, host, description
                    let len = (next() % 12) as usize;
                    put_varint(&mut e, field << 3 | 2, pad(next));
                    put_varint(&mut e, len as u64, pad(next));
                    e.extend((0..len).map(|_| b'a' + (next() % 26) as u8));
                }
                4 => {
                    // An attribute whose last bytes are an unknown varint.
                    let mut a = vec![0x0a, 1, b'k'];
                    put_varint(&mut a, 3 << 3, pad(next));
                    put_varint(&mut a, any_width(next), pad(next));
                    put_varint(&mut e, 9 << 3 | 2, 0);
                    put_varint(&mut e, a.len() as u64, pad(next));
                    e.extend(a);
                }
                5 => {
                    put_varint(&mut e, 14 << 3 | 1, 0); // metric_d
                    e.extend(next().to_le_bytes());
                }
                6 => {
                    put_varint(&mut e, 8 << 3 | 5, 0); // ttl
                    e.extend((next() as u32).to_le_bytes());
                }
                _ => {
                    put_varint(&mut e, 7 << 3 | 2, 0); // a tag
                    put_varint(&mut e, 1, pad(next));
                    e.push(b't');
                }
            }
        }
        e
    }

    /// Messages of such events (with unknown varints between them) agree
    /// with prost, whole, cut anywhere, with continuation bits flipped,
    /// with a varint's 10th byte over 1 or an 11th byte, and with an
    /// event's length cut inside its last varint while the frame goes on
    /// (the 8-byte window must end at the event's end, not the frame's).
    #[test]
    fn agrees_with_prost_on_varints_of_every_length_and_bound() {
        let mut next = crate::test_rng::xorshift(0xd1b5_4a32_d192_ed03);
        let mut events = Vec::new();
        let (mut agreed_ok, mut agreed_err) = (0, 0);
        let mut check = |body: &[u8], events: &mut Vec<Event>| {
            let expected = reference(body, 9);
            let got = ours(body, 9, events);
            assert_eq!(
                format!("{got:?}"),
                format!("{expected:?}"),
                "input {body:02x?}"
            );
            if expected.is_some() {
                agreed_ok += 1;
            } else {
                agreed_err += 1;
            }
        };
        for _ in 0..6_000 {
            let mut body = Vec::new();
            let mut last_event = None;
            for _ in 0..1 + next() % 4 {
                if next().is_multiple_of(3) {
                    // Msg.ok (a bool) or an unknown field, any varint.
                    let field = [2u64, 8, 100][(next() % 3) as usize];
                    put_varint(&mut body, field << 3, 0);
                    put_varint(&mut body, any_width(&mut next), (next() % 3) as usize);
                }
                let event = varint_heavy_event(&mut next);
                last_event = Some((body.len(), event.len()));
                body.push(6 << 3 | 2);
                put_varint(&mut body, event.len() as u64, 0);
                body.extend(&event);
            }
            check(&body, &mut events);
            for _ in 0..4 {
                let cut = (next() as usize) % (body.len() + 1);
                check(&body[..cut], &mut events);
            }
            for _ in 0..4 {
                let mut b = body.clone();
                for _ in 0..1 + next() % 3 {
                    let at = (next() as usize) % b.len();
                    b[at] ^= 0x80;
                }
                check(&b, &mut events);
            }
            // The last varint of the whole message, made overlong: a 10th
            // byte of 2-0xff, or an 11th byte.
            if let Some(at) = body.iter().rposition(|&c| c >= 0x80)
                && body.len() - at <= 2
            {
                let mut b = body[..at].to_vec();
                b.extend([0xff; 9]);
                b.push(if next().is_multiple_of(2) {
                    2 + (next() % 254) as u8
                } else {
                    1
                });
                check(&b, &mut events);
                b.pop();
                b.extend([0x80, 0x00]);
                check(&b, &mut events);
            }
            // The last event's length cut by 1-8 bytes, its tail left in
            // the frame: mostly bytes without a high bit that would end a
            // varint read past the event's end.
            let (key_at, len) = last_event.expect("an event");
            let start = body.len() - len;
            for short in 1..=8.min(len) {
                let mut b = body[..key_at].to_vec();
                b.push(6 << 3 | 2);
                put_varint(&mut b, (len - short) as u64, 0);
                b.extend(&body[start..]);
                check(&b, &mut events);
                // And the tail followed by more bytes, ending every varint.
                b.extend([0x00; 8]);
                check(&b, &mut events);
            }
        }
        assert!(
            agreed_ok > 10_000 && agreed_err > 10_000,
            "{agreed_ok} ok, {agreed_err} refused"
        );
    }

    #[test]
    fn short_ascii_sees_a_high_bit_at_every_byte_of_every_length() {
        for len in 0..48usize {
            let ascii: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            assert_eq!(short_ascii(&ascii), len <= 32, "len {len}");
            for at in 0..len {
                let mut high = ascii.clone();
                high[at] |= 0x80;
                assert!(!short_ascii(&high), "len {len}, high bit at {at}");
            }
        }
    }

    /// Strings that are not UTF-8, wherever an event or a query has them,
    /// are repaired byte for byte; nothing else of the message changes.
    #[test]
    fn a_repaired_message_decodes_with_its_bad_bytes_as_question_marks() {
        let msg = Msg {
            events: (0..4).map(full_event).collect(),
            query: Some(PbQuery {
                string: Some("host = \"qq\"".into()),
            }),
            ..Msg::default()
        };
        let body = msg.encode_to_vec();
        assert_eq!(repair_utf8(&body, 6), None, "nothing to repair");
        let mut bad = body.clone();
        for needle in [&b"svc 1"[..], b"t2", b"prod", b"qq"] {
            let at = bad.windows(needle.len()).position(|w| w == needle).unwrap();
            bad[at + needle.len() - 1] = 0xff;
        }
        let mut events = Vec::new();
        assert!(matches!(
            decode_msg(&bad, 0, &Limits::DEFAULT, &mut events),
            Err(DecodeError::InvalidUtf8(_))
        ));
        let (fixed, repaired) = repair_utf8(&bad, 6).expect("repairable");
        assert_eq!(repaired, 4);
        let request = decode_msg(&fixed, 0, &Limits::DEFAULT, &mut events).unwrap();
        assert_eq!(request.query.as_deref(), Some("host = \"q?\""));
        assert_eq!(events[1].service.as_deref(), Some("svc ?"));
        assert_eq!(events[3].tags, ["t0", "t1", "t?"]);
        assert_eq!(events[0].attribute("env"), Some("pro?"));
        let changed = (body.iter().zip(&fixed)).filter(|(a, b)| a != b).count();
        assert_eq!(changed, 4, "only the bad bytes");
        assert_eq!(repair_utf8(&bad[..bad.len() - 1], 6), None, "malformed");
    }

    /// On mutated messages: whatever a repair makes decodes without an
    /// event or query string that is not UTF-8 (`error` and the deprecated
    /// `states` are not repaired: a client has no business sending them).
    #[test]
    fn a_repair_leaves_no_event_string_invalid() {
        let seed = Msg {
            events: (0..4).map(full_event).collect(),
            ..Msg::default()
        }
        .encode_to_vec();
        let mut next = crate::test_rng::xorshift(0x2545_f491_4f6c_dd1d);
        let (mut events, mut repaired) = (Vec::new(), 0);
        for round in 0..20_000 {
            let body = crate::test_rng::mutated(&seed, round, &mut next);
            let decoded = decode_msg(&body, 0, &Limits::DEFAULT, &mut events);
            if !matches!(decoded, Err(DecodeError::InvalidUtf8(_))) {
                continue;
            }
            // None also when the message is malformed past the bad string.
            let Some((fixed, _)) = repair_utf8(&body, 6) else {
                continue;
            };
            repaired += 1;
            assert_eq!(fixed.len(), body.len());
            let again = decode_msg(&fixed, 0, &Limits::DEFAULT, &mut events);
            if let Err(DecodeError::InvalidUtf8(field)) = again {
                assert!(["error", "states"].contains(&field), "{field}: {body:02x?}");
            }
        }
        assert!(
            repaired > 100,
            "the mutations must make repairable messages"
        );
    }

    #[test]
    fn errors_name_what_is_wrong() {
        assert_eq!(
            decode_msg(&[0x32, 0x05, 0x22], 0, &Limits::DEFAULT, &mut Vec::new()),
            Err(DecodeError::Truncated)
        );
        // Field 6 (events) with wire type 0.
        assert_eq!(
            decode_msg(&[0x30, 0x01], 0, &Limits::DEFAULT, &mut Vec::new()),
            Err(DecodeError::WireType {
                field: "events",
                wire_type: 0
            })
        );
        // An event whose host (field 4) is invalid UTF-8.
        assert_eq!(
            decode_msg(
                &[0x32, 0x03, 0x22, 0x01, 0xff],
                0,
                &Limits::DEFAULT,
                &mut Vec::new()
            ),
            Err(DecodeError::InvalidUtf8("host"))
        );
        assert_eq!(
            decode_msg(&[0xff; 11], 0, &Limits::DEFAULT, &mut Vec::new()),
            Err(DecodeError::VarintOverflow)
        );
    }

    fn limited(msg: &Msg, limits: Limits) -> Result<Request, DecodeError> {
        decode_msg(&msg.encode_to_vec(), 0, &limits, &mut Vec::new())
    }

    fn tiny() -> Limits {
        Limits {
            max_events: 2,
            max_tags: 3,
            max_attributes: 1,
            max_string: 8,
        }
    }

    #[test]
    fn limits_name_the_event_the_real_count_and_the_flag() {
        let tagged = PbEvent {
            tags: (0..10).map(|i| i.to_string()).collect(),
            ..PbEvent::default()
        };
        let msg = Msg {
            events: vec![PbEvent::default(), tagged],
            ..Msg::default()
        };
        let e = limited(&msg, tiny()).unwrap_err();
        assert_eq!(e.to_string(), "event 1: 10 tags exceeds --max-tags 3");

        let msg = Msg {
            events: vec![PbEvent::default(); 5],
            ..Msg::default()
        };
        let e = limited(&msg, tiny()).unwrap_err();
        assert_eq!(e.to_string(), "5 events exceeds --max-events-per-msg 2");

        let described = PbEvent {
            description: Some("x".repeat(9)),
            ..PbEvent::default()
        };
        let msg = Msg {
            events: vec![described],
            ..Msg::default()
        };
        let e = limited(&msg, tiny()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "event 0: description of 9 bytes exceeds --max-string 8"
        );

        let attribute = |key: &str| Attribute {
            key: key.into(),
            value: Some("v".into()),
        };
        // A reserved name is dropped, but still counts against the limit.
        let attributed = PbEvent {
            attributes: vec![attribute("ttl"), attribute("a")],
            ..PbEvent::default()
        };
        let msg = Msg {
            events: vec![attributed],
            ..Msg::default()
        };
        let e = limited(&msg, tiny()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "event 0: 2 attributes exceeds --max-attributes 1"
        );

        let msg = Msg {
            query: Some(PbQuery {
                string: Some("host = \"long\"".into()),
            }),
            ..Msg::default()
        };
        let e = limited(&msg, tiny()).unwrap_err();
        assert_eq!(e.to_string(), "query of 13 bytes exceeds --max-string 8");
    }

    #[test]
    fn exactly_at_the_limits_is_accepted() {
        let full = PbEvent {
            tags: (0..3).map(|i| i.to_string()).collect(),
            host: Some("x".repeat(8)),
            attributes: vec![Attribute {
                key: "k".into(),
                value: Some("12345678".into()),
            }],
            ..PbEvent::default()
        };
        let msg = Msg {
            events: vec![full.clone(), full],
            ..Msg::default()
        };
        let mut events = Vec::new();
        decode_msg(&msg.encode_to_vec(), 0, &tiny(), &mut events).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].tags.len(), 3);
    }
}
