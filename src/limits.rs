//! What one message may carry (`--max-events-per-msg`, `--max-tags`,
//! `--max-attributes`, `--max-string`) and the error that names the limit a
//! message went over. Every ingest transport refuses the same messages: the
//! Riemann protocol's decoder ([`crate::wire`]) checks fields as it reads
//! them, before anything is copied; HTTP's JSON lines and gRPC's `Msg`s,
//! decoded whole by their libraries (within the request size limits), are
//! checked here before any of their events goes on.

use std::sync::atomic::AtomicU64;

use crate::event::Event;
use crate::stats::Stats;

/// The longest start of `text` of at most `max` bytes: cut on a character
/// boundary, where a string is cut to fit a bound.
pub fn start_of(text: &str, max: usize) -> &str {
    let end = (0..=max.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    &text[..end]
}

/// Bounds on one message, so a single one cannot make vigil keep or process
/// more than an operator allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_events: usize,
    pub max_tags: usize,
    pub max_attributes: usize,
    /// In bytes, for every string kept: host, service, state, description,
    /// each tag, attribute key and value, and the query.
    pub max_string: usize,
}

impl Limits {
    /// Generous for any real agent (Riemann itself has no limits).
    pub const DEFAULT: Limits = Limits {
        max_events: 100_000,
        max_tags: 10_000,
        max_attributes: 10_000,
        max_string: 1024 * 1024,
    };

    /// A message of `count` events.
    pub fn check_count(&self, count: usize) -> Result<(), Exceeded> {
        self.within(Limit::Events, "events", count, self.max_events)
    }

    /// A decoded event, in the order the fields' checks would fail while
    /// decoding: tags, attributes (`attributes_sent` counts them as sent,
    /// reserved names included, as the decoder does), then each string.
    pub fn check_event(&self, event: &Event, attributes_sent: usize) -> Result<(), Exceeded> {
        self.check_counts(event.tags.len(), attributes_sent)?;
        let fields = [
            ("host", &event.host),
            ("service", &event.service),
            ("state", &event.state),
            ("description", &event.description),
        ];
        for (what, text) in fields {
            self.check_string(what, text.as_deref().unwrap_or(""))?;
        }
        for tag in &event.tags {
            self.check_string("tag", tag)?;
        }
        for (key, value) in &event.attributes {
            self.check_string("attributes.key", key)?;
            self.check_string("attributes.value", value)?;
        }
        Ok(())
    }

    /// An event's numbers of tags and attributes, before it is decoded.
    pub fn check_counts(&self, tags: usize, attributes: usize) -> Result<(), Exceeded> {
        self.within(Limit::Tags, "tags", tags, self.max_tags)?;
        let max = self.max_attributes;
        self.within(Limit::Attributes, "attributes", attributes, max)
    }

    /// A query's text.
    pub fn check_query(&self, text: &str) -> Result<(), Exceeded> {
        self.check_string("query", text)
    }

    /// One string, named `what` in the error (a Graphite line's path).
    pub fn check_string(&self, what: &'static str, text: &str) -> Result<(), Exceeded> {
        self.within(Limit::String, what, text.len(), self.max_string)
    }

    fn within(
        &self,
        limit: Limit,
        what: &'static str,
        size: usize,
        max: usize,
    ) -> Result<(), Exceeded> {
        if size <= max {
            return Ok(());
        }
        Err(Exceeded {
            limit,
            event: None,
            what,
            size,
            max,
        })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Which of the [`Limits`] a message went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Events,
    Tags,
    Attributes,
    String,
}

impl Limit {
    /// The `vigil run` flag that sets it, so the error tells what to raise.
    pub fn flag(self) -> &'static str {
        match self {
            Limit::Events => "--max-events-per-msg",
            Limit::Tags => "--max-tags",
            Limit::Attributes => "--max-attributes",
            Limit::String => "--max-string",
        }
    }

    /// The counter of messages refused over it.
    pub fn counter(self, stats: &Stats) -> &AtomicU64 {
        match self {
            Limit::Events => &stats.msgs_over_max_events,
            Limit::Tags => &stats.msgs_over_max_tags,
            Limit::Attributes => &stats.msgs_over_max_attributes,
            Limit::String => &stats.msgs_over_max_string,
        }
    }
}

/// A message over one of the [`Limits`]; displays as the error reply, e.g.
/// `event 3: 100000 tags exceeds --max-tags 10000`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub limit: Limit,
    /// The offending event's position in the message, from 0.
    pub event: Option<usize>,
    /// What went over: `events`, `tags`, `attributes` or a string field's name.
    pub what: &'static str,
    /// How many there were, or the string's length in bytes.
    pub size: usize,
    pub max: usize,
}

impl Exceeded {
    /// The same, naming event `i` of its message.
    pub fn in_event(self, i: usize) -> Self {
        Exceeded {
            event: Some(i),
            ..self
        }
    }
}

impl std::fmt::Display for Exceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(i) = self.event {
            write!(f, "event {i}: ")?;
        }
        let (what, size, flag, max) = (self.what, self.size, self.limit.flag(), self.max);
        match self.limit {
            Limit::String => write!(f, "{what} of {size} bytes exceeds {flag} {max}"),
            _ => write!(f, "{size} {what} exceeds {flag} {max}"),
        }
    }
}

impl std::error::Error for Exceeded {}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Limits {
        Limits {
            max_events: 2,
            max_tags: 1,
            max_attributes: 1,
            max_string: 4,
        }
    }

    fn event() -> Event {
        Event {
            host: Some("h".into()),
            service: Some("s".into()),
            tags: vec!["t".into()],
            attributes: vec![("k".into(), "v".into())],
            ..Event::default()
        }
    }

    fn refusal(result: Result<(), Exceeded>) -> String {
        result.expect_err("over a limit").to_string()
    }

    #[test]
    fn exactly_at_the_limits_passes() {
        let limits = tiny();
        let mut e = event();
        e.host = Some("abcd".into());
        assert_eq!(limits.check_count(2), Ok(()));
        assert_eq!(limits.check_event(&e, 1), Ok(()));
        assert_eq!(limits.check_query("abcd"), Ok(()));
    }

    #[test]
    fn each_limit_names_the_field_the_size_and_the_flag() {
        let limits = tiny();
        assert_eq!(
            refusal(limits.check_count(3)),
            "3 events exceeds --max-events-per-msg 2"
        );
        let over = |change: fn(&mut Event)| {
            let mut e = event();
            change(&mut e);
            refusal(
                limits
                    .check_event(&e, e.attributes.len())
                    .map_err(|x| x.in_event(1)),
            )
        };
        assert_eq!(
            over(|e| e.tags.push("u".into())),
            "event 1: 2 tags exceeds --max-tags 1"
        );
        assert_eq!(
            over(|e| e.attributes.push(("a".into(), "b".into()))),
            "event 1: 2 attributes exceeds --max-attributes 1"
        );
        for (change, field) in [
            (
                (|e| e.host = Some("hosts".into())) as fn(&mut Event),
                "host",
            ),
            (|e| e.service = Some("servi".into()), "service"),
            (|e| e.state = Some("state".into()), "state"),
            (|e| e.description = Some("descr".into()), "description"),
            (|e| e.tags[0] = "tagss".into(), "tag"),
            (|e| e.attributes[0].0 = "keyss".into(), "attributes.key"),
            (|e| e.attributes[0].1 = "value".into(), "attributes.value"),
        ] {
            assert_eq!(
                over(change),
                format!("event 1: {field} of 5 bytes exceeds --max-string 4")
            );
        }
        assert_eq!(
            refusal(limits.check_query("a = 1")),
            "query of 5 bytes exceeds --max-string 4"
        );
    }

    #[test]
    fn dropped_attributes_count_as_sent() {
        assert_eq!(
            refusal(tiny().check_event(&event(), 2)),
            "2 attributes exceeds --max-attributes 1"
        );
    }
}
