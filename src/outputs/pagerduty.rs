//! PagerDuty Events API v2: what a trigger and a resolve look like. When to
//! send them is [`super::pager`]'s.
//!
//! PagerDuty refuses an event over 512 KB with a `400`, not to be retried: a
//! trigger that large would never page. Its details are cut to fit instead
//! ([`MAX_EVENT`]), saying what was left out; so are its other strings
//! ([`MAX_FIELD`]).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::pager::{MAX_SUMMARY, Severity, summary, truncate};
use crate::event::{Event, Metric};

/// PagerDuty's public Events API v2 endpoint.
pub const DEFAULT_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// A trigger's JSON at most, under PagerDuty's 512 KB.
pub const MAX_EVENT: usize = 500_000;
/// The payload's other strings at most (source, component, group, class),
/// as long as a summary.
pub const MAX_FIELD: usize = MAX_SUMMARY;
/// Kept aside for the note saying what a cut trigger left out.
const NOTE_ROOM: usize = 256;

/// A trigger with the event's details, within [`MAX_EVENT`].
pub(super) fn trigger(routing_key: &str, dedup_key: &str, severity: Severity, e: &Event) -> Value {
    let field = |text: &str| {
        let mut text = text.to_owned();
        truncate(&mut text, MAX_FIELD);
        Value::from(text)
    };
    let mut payload = Map::new();
    payload.insert("summary".into(), summary(e).into());
    let source = if e.host_str().is_empty() {
        "vigil"
    } else {
        e.host_str()
    };
    payload.insert("source".into(), field(source));
    payload.insert("severity".into(), severity.as_str().into());
    payload.insert("timestamp".into(), crate::json::iso8601(e.time).into());
    if let Some(service) = &e.service {
        payload.insert("component".into(), field(service));
    }
    // `group` is whatever a rule put in the attribute of that name.
    if let Some(group) = e.attribute("group") {
        payload.insert("group".into(), field(group));
    }
    if let Some(state) = &e.state {
        payload.insert("class".into(), field(state));
    }
    payload.insert("custom_details".into(), custom_details(e));
    let mut body = json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key,
        "payload": payload,
    });
    let len = body.to_string().len();
    if len > MAX_EVENT {
        let details_len = body["payload"]["custom_details"].to_string().len();
        let room = MAX_EVENT.saturating_sub(len - details_len);
        body["payload"]["custom_details"] = details_within(e, room);
    }
    body
}

/// A resolve needs nothing but the incident's key.
pub(super) fn resolve(routing_key: &str, dedup_key: &str) -> Value {
    json!({"routing_key": routing_key, "event_action": "resolve", "dedup_key": dedup_key})
}

fn custom_details(e: &Event) -> Value {
    let attributes: BTreeMap<&str, &str> = e
        .attributes
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    json!({
        "description": e.description,
        "metric": e.metric.map(metric_json),
        "tags": e.tags,
        "attributes": attributes,
    })
}

/// The custom details in at most `room` bytes of JSON: tags, then
/// attributes, in order, each while it fits in what half of the room has
/// left; the description cut to the rest; and a note of what was left out.
fn details_within(e: &Event, room: usize) -> Value {
    let json_len = |text: &str| Value::from(text).to_string().len();
    // The metric, the keys and the punctuation take less than this.
    let room = room.saturating_sub(NOTE_ROOM + 128);
    let mut left = room / 2;
    let mut fits = |len: usize| {
        let fits = len <= left;
        if fits {
            left -= len;
        }
        fits
    };
    let tags: Vec<&str> = (e.tags.iter())
        .filter(|tag| fits(json_len(tag) + 1))
        .map(String::as_str)
        .collect();
    let attributes: BTreeMap<&str, &str> = (e.attributes.iter())
        .filter(|(k, v)| fits(json_len(k) + json_len(v) + 2))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let description = e.description.as_deref().unwrap_or("");
    let kept = cut_to_json(description, room / 2 + left);
    let note = format!(
        "cut to fit PagerDuty's 512 KB: description {} of {} bytes, {} of {} tags, {} of {} attributes",
        kept.len(),
        description.len(),
        tags.len(),
        e.tags.len(),
        attributes.len(),
        e.attributes.len()
    );
    json!({
        "description": e.description.as_ref().map(|_| kept),
        "metric": e.metric.map(metric_json),
        "tags": tags,
        "attributes": attributes,
        "truncated": note,
    })
}

/// The longest start of `text` whose JSON string takes at most `room` bytes.
fn cut_to_json(text: &str, room: usize) -> String {
    let mut kept = text.to_owned();
    let mut max = room.saturating_sub(2);
    loop {
        truncate(&mut kept, max);
        let len = Value::from(kept.as_str()).to_string().len();
        if len <= room || kept.is_empty() {
            return kept;
        }
        // As if every byte took its share of the JSON: strictly shorter
        // each time, and exact when the escapes are spread evenly.
        max = kept.len() * room / len;
    }
}

fn metric_json(m: Metric) -> Value {
    match m {
        Metric::Int(i) => i.into(),
        // NaN and infinities have no JSON form: null.
        Metric::Float(f) => f.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(state: &str) -> Event {
        Event {
            host: Some("web1".into()),
            service: Some("disk /".into()),
            state: Some(state.into()),
            time: 1_700_000_000_123_456,
            metric: Some(Metric::Float(0.97)),
            description: Some("root is full".into()),
            tags: vec!["prod".into()],
            attributes: vec![("team".into(), "ops".into())],
            ..Event::default()
        }
    }

    /// PagerDuty would refuse it, and a refused trigger is not retried.
    #[test]
    fn a_trigger_over_pagerdutys_limit_is_cut_to_fit_and_says_what_it_left_out() {
        let mut e = event("critical");
        let long = |c: &str| c.repeat(1024 * 1024);
        e.host = Some(long("h"));
        e.service = Some(long("s"));
        // Quotes take two bytes each in JSON.
        e.description = Some(format!("disk full\n{}", long("\"")));
        e.tags = (0..10_000).map(|i| format!("tag-{i}")).collect();
        e.attributes = (0..10_000)
            .map(|i| (format!("key-{i}"), "v".repeat(100)))
            .collect();
        let body = trigger("rk", "key", Severity::Critical, &e);
        let len = body.to_string().len();
        assert!(len <= MAX_EVENT && len > MAX_EVENT - 4096, "{len} bytes");
        let payload = &body["payload"];
        assert_eq!(payload["source"], "h".repeat(MAX_FIELD));
        assert_eq!(payload["component"], "s".repeat(MAX_FIELD));
        assert_eq!(payload["summary"].as_str().unwrap().len(), MAX_SUMMARY);
        let details = &payload["custom_details"];
        let description = details["description"].as_str().unwrap();
        assert!(description.starts_with("disk full\n\"\"\""));
        let (tags, attributes) = (
            details["tags"].as_array().unwrap().len(),
            details["attributes"].as_object().unwrap().len(),
        );
        assert_eq!(details["tags"][0], "tag-0", "in order");
        assert!(tags == 10_000 && attributes > 1000 && attributes < 10_000);
        assert_eq!(details["metric"], 0.97);
        assert_eq!(
            details["truncated"],
            format!(
                "cut to fit PagerDuty's 512 KB: description {} of {} bytes, 10000 of 10000 tags, {attributes} of 10000 attributes",
                description.len(),
                e.description.as_ref().unwrap().len()
            )
        );
    }

    #[test]
    fn trigger_carries_the_event_details() {
        let body = trigger("k", "web1/disk /", Severity::Critical, &event("critical"));
        assert_eq!(
            body["payload"],
            json!({
                "summary": "web1 disk / is critical (0.97)",
                "source": "web1",
                "severity": "critical",
                "timestamp": "2023-11-14T22:13:20.123Z",
                "component": "disk /",
                "class": "critical",
                "custom_details": {
                    "description": "root is full",
                    "metric": 0.97,
                    "tags": ["prod"],
                    "attributes": {"team": "ops"},
                },
            })
        );
        let mut anonymous = Event::default();
        anonymous.set_attribute("group", "db".into());
        let payload = &trigger("k", "/", Severity::Error, &anonymous)["payload"];
        assert_eq!(
            (&payload["source"], &payload["group"]),
            (&json!("vigil"), &json!("db"))
        );
        assert!(payload.get("component").is_none());
    }
}
