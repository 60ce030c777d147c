//! The one `Event` type every part of vigil speaks. Wire formats (protobuf, JSON)
//! convert to and from it at the edges; nothing inside sees them.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::clock::{MICROS_PER_SEC, Micros};

/// `state` value that marks an index entry whose TTL ran out.
pub const STATE_EXPIRED: &str = "expired";

/// Field names that belong to the event itself; an attribute may not shadow them,
/// so the query language always means the same thing by a name.
pub const RESERVED_FIELDS: &[&str] = &[
    "host",
    "service",
    "state",
    "description",
    "metric",
    "metric_f",
    "metric_d",
    "metric_sint64",
    "tags",
    "time",
    "time_micros",
    "ttl",
];

/// A metric keeps the kind the sender chose, so integers round-trip exactly.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Metric {
    Int(i64),
    Float(f64),
}

impl Metric {
    pub fn as_f64(self) -> f64 {
        match self {
            Metric::Int(i) => i as f64,
            Metric::Float(f) => f,
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Metric::Int(i) => write!(f, "{i}"),
            Metric::Float(x) => write!(f, "{x}"),
        }
    }
}

/// A field of an event by name, as queries and rules refer to it: the standard
/// fields, or else an attribute. Resolved once when a query or rule compiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Host,
    Service,
    State,
    Description,
    /// `metric` and `metric_f` both name the metric, whatever its kind.
    Metric,
    Ttl,
    /// The event time in (fractional) seconds.
    Time,
    Attribute(String),
}

impl Field {
    pub fn named(name: &str) -> Field {
        match name {
            "host" => Field::Host,
            "service" => Field::Service,
            "state" => Field::State,
            "description" => Field::Description,
            "metric" | "metric_f" => Field::Metric,
            "ttl" => Field::Ttl,
            "time" => Field::Time,
            other => Field::Attribute(other.to_owned()),
        }
    }

    /// The field's value as text, `None` when absent; numbers by their
    /// canonical text, equal where the metrics are (`by`, `changed`, `runs`,
    /// `stable`): an integer and a float of the same value (1 and 1.0) and
    /// -0.0 and 0.0 alike, as queries compare them. A NaN is the same as
    /// another NaN here (Riemann's `=` says it differs), so a series stuck
    /// at NaN is no change at every event.
    pub fn text(&self, e: &Event) -> Option<String> {
        self.text_ref(e).map(Cow::into_owned)
    }

    /// A value of this field as a state file holds it ([`Field::text`] of
    /// the vigil that saved it): a metric of -0.0, which vigil wrote "-0"
    /// until metrics compared as numbers, is 0's, as [`Field::text`] now
    /// writes it; any other value is as saved.
    pub fn restored(&self, text: Option<String>) -> Option<String> {
        match (self, text) {
            (Field::Metric, Some(text)) if text == "-0" => Some("0".to_owned()),
            (_, text) => text,
        }
    }

    /// [`Field::text`], borrowed from the event where it can be: only numbers
    /// are written out.
    pub fn text_ref<'e>(&self, e: &'e Event) -> Option<Cow<'e, str>> {
        let text = |s: &'e Option<String>| s.as_deref().map(Cow::Borrowed);
        match self {
            Field::Host => text(&e.host),
            Field::Service => text(&e.service),
            Field::State => text(&e.state),
            Field::Description => text(&e.description),
            // `+ 0.0` makes -0.0 0.0, which would otherwise print as "-0".
            Field::Metric => e.metric.map(|m| {
                Cow::Owned(match m {
                    Metric::Float(f) => (f + 0.0).to_string(),
                    Metric::Int(i) => i.to_string(),
                })
            }),
            Field::Ttl => e.ttl.map(|t| Cow::Owned(t.to_string())),
            Field::Time => Some(Cow::Owned(e.time.to_string())),
            Field::Attribute(k) => e.attribute(k).map(Cow::Borrowed),
        }
    }
}

#[derive(Debug, PartialEq, Default)]
pub struct Event {
    pub host: Option<String>,
    pub service: Option<String>,
    pub state: Option<String>,
    /// Microseconds since the epoch. Always set: ingest stamps arrival time when
    /// the sender gave none.
    pub time: Micros,
    pub description: Option<String>,
    pub tags: Vec<String>,
    pub metric: Option<Metric>,
    /// Seconds; `None` means "the index's default TTL".
    pub ttl: Option<f32>,
    /// In the order the sender gave them; a later duplicate key wins on lookup.
    pub attributes: Vec<(String, String)>,
}

/// `clone_from` reuses the target's allocations field by field: the index and
/// the stateful stages overwrite a kept event with each new one for the same
/// series, which then costs no allocation when the strings fit. A string
/// that already holds the source's bytes is left alone: state, tags and
/// attributes mostly repeat from one event to the next, and comparing short
/// strings inline costs less than the call to `memcpy` of copying them
/// (`rate` does this on every event it counts).
impl Clone for Event {
    fn clone(&self) -> Self {
        Event {
            host: self.host.clone(),
            service: self.service.clone(),
            state: self.state.clone(),
            time: self.time,
            description: self.description.clone(),
            tags: self.tags.clone(),
            metric: self.metric,
            ttl: self.ttl,
            attributes: self.attributes.clone(),
        }
    }

    /// Inlined: `rate` calls it on every event it counts, and the call's
    /// prologue and epilogue cost some 30 instructions per event (callgrind).
    #[inline(always)]
    fn clone_from(&mut self, source: &Self) {
        assign_optional(&mut self.host, &source.host);
        assign_optional(&mut self.service, &source.service);
        assign_optional(&mut self.state, &source.state);
        self.time = source.time;
        assign_optional(&mut self.description, &source.description);
        // By hand, so each string is compared before it is copied.
        self.tags.truncate(source.tags.len());
        let kept = self.tags.len();
        for (tag, source_tag) in self.tags.iter_mut().zip(&source.tags) {
            assign(tag, source_tag);
        }
        if kept < source.tags.len() {
            self.tags.extend_from_slice(&source.tags[kept..]);
        }
        self.metric = source.metric;
        self.ttl = source.ttl;
        self.attributes.truncate(source.attributes.len());
        let kept = self.attributes.len();
        for ((k, v), (sk, sv)) in self.attributes.iter_mut().zip(&source.attributes) {
            assign(k, sk);
            assign(v, sv);
        }
        if kept < source.attributes.len() {
            self.attributes
                .extend_from_slice(&source.attributes[kept..]);
        }
    }
}

/// `target.clone_from(source)`, skipped when `target` holds the same bytes.
#[inline(always)]
fn assign(target: &mut String, source: &str) {
    if !same_bytes(target.as_bytes(), source.as_bytes()) {
        target.clear();
        target.push_str(source);
    }
}

/// [`assign`] for an optional string.
#[inline(always)]
fn assign_optional(target: &mut Option<String>, source: &Option<String>) {
    match (target, source) {
        (Some(held), Some(new)) => assign(held, new),
        (target, source) => target.clone_from(source),
    }
}

type EventTuple = (
    Option<String>,
    Option<String>,
    Option<String>,
    Micros,
    Option<String>,
    Vec<String>,
    Option<Metric>,
    Option<f32>,
    Vec<(String, String)>,
);

/// Serde is for vigil's own files (the stream state kept across restarts;
/// the wire formats have their own conversions). A tuple, not a map: a saved
/// window holds many events, and each field name would be repeated in each.
impl Serialize for Event {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (
            &self.host,
            &self.service,
            &self.state,
            self.time,
            &self.description,
            &self.tags,
            self.metric,
            self.ttl,
            &self.attributes,
        )
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (host, service, state, time, description, tags, metric, ttl, attributes) =
            EventTuple::deserialize(deserializer)?;
        Ok(Event {
            host,
            service,
            state,
            time,
            description,
            tags,
            metric,
            ttl,
            attributes,
        })
    }
}

impl Event {
    pub fn host_str(&self) -> &str {
        self.host.as_deref().unwrap_or("")
    }

    pub fn service_str(&self) -> &str {
        self.service.as_deref().unwrap_or("")
    }

    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets an attribute, replacing an existing one of the same key.
    pub fn set_attribute(&mut self, key: &str, value: String) {
        match self.attributes.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.attributes.push((key.to_owned(), value)),
        }
    }

    pub fn is_expired_state(&self) -> bool {
        self.state.as_deref() == Some(STATE_EXPIRED)
    }

    /// Event time as (possibly fractional) seconds, the unit rules and queries use.
    pub fn time_secs(&self) -> f64 {
        self.time as f64 / MICROS_PER_SEC as f64
    }

    /// The notice the index emits when this entry's TTL has run out: identity,
    /// tags and attributes kept so rules can still route it; the stale metric and
    /// description are not.
    pub fn into_expired(self, now: Micros) -> Event {
        Event {
            state: Some(STATE_EXPIRED.to_owned()),
            time: now,
            description: None,
            metric: None,
            ..self
        }
    }
}

impl Event {
    /// About how many bytes this event holds in memory: the struct and its
    /// strings' lengths (not their spare capacity). For bounding queues by
    /// size as well as by count.
    pub fn approx_bytes(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        let tags: usize = self
            .tags
            .iter()
            .map(|t| size_of::<String>() + t.len())
            .sum();
        let attributes: usize = (self.attributes.iter())
            .map(|(k, v)| size_of::<(String, String)>() + k.len() + v.len())
            .sum();
        size_of::<Event>()
            + text(&self.host)
            + text(&self.service)
            + text(&self.state)
            + text(&self.description)
            + tags
            + attributes
    }
}

/// A TTL (an `f32`, as the protocol carries it) as the `f64` of its
/// shortest decimal: `12.3` sent is `12.3` in JSON, not 12.300000190734863,
/// the `f32`'s exact value. (A query rounds its number to the TTL's
/// precision instead, once: see `query::parser::at_ttl_precision`.)
pub fn ttl_f64(ttl: f32) -> f64 {
    if !ttl.is_finite() {
        return f64::from(ttl);
    }
    ryu::Buffer::new()
        .format_finite(ttl)
        .parse()
        .unwrap_or(f64::from(ttl))
}

/// The text an attribute holds for a number given where a string belongs
/// (in a rule file, a test, or a `POST /events` line): the number's
/// shortest form, so `42`, `42.0` and `4.2e1` are all `"42"`, and each
/// place that turns numbers into attributes agrees with the others.
pub fn number_text(n: f64) -> String {
    n.to_string()
}

/// `a == b` for the short strings events are made of (names, states, tags:
/// mostly under 32 bytes), compared inline: a call to `memcmp` costs more
/// than the comparison itself at these lengths, and the hot path makes about
/// a dozen per event (the decoder against what a slot holds, the index
/// against a stored key, the rules' filters). Always inlined: the decoder
/// grew past what the compiler inlines on its own, and its four calls per
/// message cost 36 instructions more as calls.
#[inline(always)]
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    // Overlapping loads of the first and last bytes cover every length in a
    // bracket with two comparisons.
    fn u32_at(s: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(s[at..at + 4].try_into().expect("4 bytes"))
    }
    fn u64_at(s: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(s[at..at + 8].try_into().expect("8 bytes"))
    }
    match n {
        0 => true,
        1..4 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..8 => u32_at(a, 0) == u32_at(b, 0) && u32_at(a, n - 4) == u32_at(b, n - 4),
        8..=16 => u64_at(a, 0) == u64_at(b, 0) && u64_at(a, n - 8) == u64_at(b, n - 8),
        17..=32 => {
            u64_at(a, 0) == u64_at(b, 0)
                && u64_at(a, 8) == u64_at(b, 8)
                && u64_at(a, n - 16) == u64_at(b, n - 16)
                && u64_at(a, n - 8) == u64_at(b, n - 8)
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ttl_reads_as_the_decimal_it_was_given() {
        for (given, read) in [(12.3f32, 12.3f64), (2.01, 2.01), (60.0, 60.0), (0.1, 0.1)] {
            assert_eq!(ttl_f64(given), read);
        }
        assert_eq!(ttl_f64(f32::INFINITY), f64::INFINITY);
        assert!(ttl_f64(f32::NAN).is_nan());
    }

    #[test]
    fn same_bytes_agrees_with_eq_at_every_length_and_difference() {
        for len in 0..48usize {
            let a: Vec<u8> = (0..len).map(|i| i as u8 + 1).collect();
            assert!(same_bytes(&a, &a.clone()), "len {len}");
            for at in 0..len {
                let mut b = a.clone();
                b[at] ^= 0x40;
                assert!(!same_bytes(&a, &b), "len {len}, differing at {at}");
            }
            assert!(!same_bytes(&a, &a[..len.saturating_sub(1)]) || len == 0);
        }
    }

    #[test]
    fn attribute_lookup_prefers_the_last_duplicate() {
        let mut e = Event::default();
        e.attributes.push(("env".into(), "a".into()));
        e.attributes.push(("env".into(), "b".into()));
        assert_eq!(e.attribute("env"), Some("b"));
        assert_eq!(e.attribute("missing"), None);
    }

    #[test]
    fn approx_bytes_counts_the_struct_and_every_string() {
        let e = Event {
            host: Some("host".into()),
            description: Some("x".repeat(1000)),
            tags: vec!["ab".into()],
            attributes: vec![("k".into(), "vvv".into())],
            ..Event::default()
        };
        let expected = size_of::<Event>()
            + 4
            + 1000
            + (size_of::<String>() + 2)
            + (size_of::<(String, String)>() + 4);
        assert_eq!(e.approx_bytes(), expected);
        assert_eq!(Event::default().approx_bytes(), size_of::<Event>());
    }

    #[test]
    fn clone_from_copies_every_field() {
        let source = Event {
            host: Some("h".into()),
            service: None,
            state: Some("ok".into()),
            time: 7,
            description: Some("d".into()),
            tags: vec!["a".into()],
            metric: Some(Metric::Int(3)),
            ttl: Some(1.0),
            attributes: vec![("k".into(), "v".into()), ("k2".into(), "v2".into())],
        };
        let mut longer = Event {
            service: Some("old".into()),
            tags: vec!["x".into(), "y".into()],
            attributes: vec![("a".into(), "b".into()); 3],
            ..Event::default()
        };
        longer.clone_from(&source);
        assert_eq!(longer, source);
        let mut shorter = Event::default();
        shorter.clone_from(&source);
        assert_eq!(shorter, source);
    }

    #[test]
    fn clone_from_overwrites_what_differs_and_keeps_what_is_the_same() {
        // Each string of the target is as long as the source's, so only
        // their bytes tell a changed field from a repeated one.
        let source = Event {
            host: Some("host1.example.com".into()),
            service: Some("cpu-1".into()),
            state: Some("ok".into()),
            description: Some("same".into()),
            tags: vec!["collectd".into(), "b".into()],
            attributes: vec![("plugin".into(), "cpu".into()), ("k".into(), "v2".into())],
            ..Event::default()
        };
        let mut held = Event {
            host: Some("host2.example.com".into()),
            service: Some("cpu-2".into()),
            state: Some("no".into()),
            description: Some("same".into()),
            tags: vec!["collectd".into(), "c".into()],
            attributes: vec![("plugin".into(), "mem".into()), ("j".into(), "v2".into())],
            ..Event::default()
        };
        held.clone_from(&source);
        assert_eq!(held, source);
    }

    #[test]
    fn set_attribute_replaces_in_place() {
        let mut e = Event::default();
        e.set_attribute("env", "a".into());
        e.set_attribute("env", "b".into());
        assert_eq!(e.attributes, vec![("env".to_owned(), "b".to_owned())]);
    }

    #[test]
    fn expired_notice_keeps_identity_tags_and_attributes() {
        let e = Event {
            host: Some("h".into()),
            service: Some("s".into()),
            state: Some("ok".into()),
            time: 10,
            description: Some("d".into()),
            tags: vec!["t".into()],
            metric: Some(Metric::Float(1.0)),
            ttl: Some(5.0),
            attributes: vec![("k".into(), "v".into())],
        };
        let x = e.clone().into_expired(99);
        assert_eq!(x.state.as_deref(), Some("expired"));
        assert_eq!(x.time, 99);
        assert_eq!((x.host_str(), x.service_str()), ("h", "s"));
        assert_eq!(x.tags, e.tags);
        assert_eq!(x.attributes, e.attributes);
        assert_eq!(x.metric, None);
        assert!(x.is_expired_state());
    }
}
