//! PagerDuty Events API v2: `critical` and `warning` trigger an incident of
//! that severity, `expired` triggers one of severity `error` (a silent host is
//! an incident), `ok` resolves it; other states are not paged (dropped).
//!
//! One incident per host and service: the dedup key is derived from them
//! unless the `dedup_key` template says otherwise, so the resolve closes the
//! incident the trigger opened.
//!
//! Paging hygiene, from the incidents this output triggered and has not
//! resolved (kept across reloads and, with a data directory, restarts: see
//! [`super::incidents`]):
//! - a trigger for an open incident is re-sent at most every
//!   `resend_interval`, unless its severity changed; a suppressed one counts
//!   as delivered (PagerDuty already has it);
//! - a resolve is sent only for an incident vigil triggered; a suppressed one
//!   counts as delivered too, as nothing needed sending.
//!
//! They are bounded ([`MAX_OPEN`]); beyond it the least recently triggered
//! incident is forgotten.
//!
//! PagerDuty refuses an event over 512 KB with a `400`, not to be retried: a
//! trigger that large would never page. Its details are cut to fit instead
//! ([`MAX_EVENT`]), saying what was left out; so are its other strings
//! ([`MAX_FIELD`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Delivery;
use super::http::{self, Outcome, Payload, Poster, RetryPolicy};
use super::incidents::Memory;
use super::template::Template;
use crate::event::{Event, Metric};

/// PagerDuty's public Events API v2 endpoint.
pub const DEFAULT_URL: &str = "https://events.pagerduty.com/v2/enqueue";

/// How often an open incident's trigger may be re-sent, by default.
pub const DEFAULT_RESEND_INTERVAL: Duration = Duration::from_secs(3600);

/// Open incidents remembered at most.
pub const MAX_OPEN: usize = 100_000;

/// PagerDuty's limits on the dedup key and the summary.
const MAX_DEDUP_KEY: usize = 255;
const MAX_SUMMARY: usize = 1024;
/// A trigger's JSON at most, under PagerDuty's 512 KB.
pub const MAX_EVENT: usize = 500_000;
/// The payload's other strings at most (source, component, group, class),
/// as long as a summary.
pub const MAX_FIELD: usize = MAX_SUMMARY;
/// Kept aside for the note saying what a cut trigger left out.
const NOTE_ROOM: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub routing_key: String,
    pub url: String,
    /// By default derived from host and service.
    pub dedup_key: Option<Template>,
    pub resend_interval: Duration,
}

/// What an event asks of PagerDuty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Trigger(Severity),
    Resolve,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Severity {
    Critical,
    Error,
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// The state mapping; `None` for states that are not paged.
fn action(state: Option<&str>) -> Option<Action> {
    match state? {
        "critical" => Some(Action::Trigger(Severity::Critical)),
        "warning" => Some(Action::Trigger(Severity::Warning)),
        crate::event::STATE_EXPIRED => Some(Action::Trigger(Severity::Error)),
        "ok" => Some(Action::Resolve),
        _ => None,
    }
}

/// Pages for each queued event until shutdown, then for what is already
/// queued. `memory` holds the incidents open so far (from an earlier task of
/// this output, or saved before a restart) and is saved after every batch
/// that changed it.
pub async fn run(
    memory: Arc<Memory>,
    config: Config,
    mut delivery: Delivery,
    retry: RetryPolicy,
    shutdown: CancellationToken,
) {
    let poster = match Poster::new(retry, shutdown.clone()) {
        Ok(poster) => poster,
        Err(error) => return http::refuse_all(delivery, shutdown, error).await,
    };
    // Before any page: a resolve is sent only for an incident it holds.
    memory.load().await;
    let mut pager = Pager {
        memory,
        poster,
        no_headers: HeaderMap::new(),
        config,
    };
    while let Some(batch) = http::next_batch(&mut delivery, &shutdown).await {
        let mut changed = false;
        for event in batch {
            changed |= pager.page(&delivery, &event).await;
        }
        if changed {
            pager.memory.save().await;
        }
    }
    pager.poster.finish(&delivery.name);
}

struct Pager {
    config: Config,
    poster: Poster,
    memory: Arc<Memory>,
    no_headers: HeaderMap,
}

impl Pager {
    /// Sends (or suppresses) one event's page and settles it in `delivery`;
    /// true when that opened, re-sent or resolved an incident.
    async fn page(&mut self, delivery: &Delivery, event: &Event) -> bool {
        let Some(action) = action(event.state.as_deref()) else {
            let state = event.state.as_deref();
            tracing::debug!(output = %delivery.name, ?state, "State not paged; event dropped.");
            delivery.dropped(1);
            return false;
        };
        let key = self.dedup_key(event);
        let now = Instant::now();
        if self.suppressed(action, &key, now) {
            tracing::debug!(output = %delivery.name, dedup_key = %key, ?action, "Page suppressed.");
            delivery.delivered(1);
            return false;
        }
        let body = match action {
            Action::Trigger(severity) => trigger(&self.config.routing_key, &key, severity, event),
            Action::Resolve => resolve(&self.config.routing_key, &key),
        };
        let payload = Payload {
            url: &self.config.url,
            content_type: "application/json",
            headers: &self.no_headers,
            body: Bytes::from(body.to_string()),
        };
        if self.poster.post(delivery, &payload).await != Outcome::Delivered {
            return false;
        }
        let mut open = self.memory.incidents();
        match action {
            Action::Trigger(severity) => open.triggered(key, severity, now),
            Action::Resolve => open.resolved(&key),
        }
        true
    }

    /// Hygiene: no re-trigger within the resend interval (unless the
    /// severity changed: an escalation is news), no resolve for an incident
    /// this output did not trigger.
    fn suppressed(&self, action: Action, key: &str, now: Instant) -> bool {
        match (action, self.memory.incidents().get(key)) {
            (Action::Trigger(severity), Some(open)) => {
                open.severity == severity
                    && now.duration_since(open.sent) < self.config.resend_interval
            }
            (Action::Trigger(_), None) => false,
            (Action::Resolve, open) => open.is_none(),
        }
    }

    /// The template's key, or `host/service` when there is none (or it
    /// renders empty, which PagerDuty would refuse).
    fn dedup_key(&self, event: &Event) -> String {
        let custom = self.config.dedup_key.as_ref().map(|t| t.render(event));
        let key = custom
            .filter(|key| !key.is_empty())
            .unwrap_or_else(|| format!("{}/{}", event.host_str(), event.service_str()));
        bounded_key(key)
    }
}

/// A trigger with the event's details, within [`MAX_EVENT`].
fn trigger(routing_key: &str, dedup_key: &str, severity: Severity, e: &Event) -> Value {
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
fn resolve(routing_key: &str, dedup_key: &str) -> Value {
    json!({"routing_key": routing_key, "event_action": "resolve", "dedup_key": dedup_key})
}

/// `web1 disk / is critical (0.97)`; without a metric, no parentheses.
fn summary(e: &Event) -> String {
    let mut text = format!(
        "{} {} is {}",
        e.host_str(),
        e.service_str(),
        e.state.as_deref().unwrap_or("")
    );
    if let Some(metric) = e.metric {
        text.push_str(&format!(" ({metric})"));
    }
    truncate(&mut text, MAX_SUMMARY);
    text
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

/// Keys over PagerDuty's limit keep their start and gain a hash of the whole,
/// so two long keys with a common start stay distinct.
fn bounded_key(mut key: String) -> String {
    if key.len() <= MAX_DEDUP_KEY {
        return key;
    }
    let hash = format!("~{:016x}", fnv1a(key.as_bytes()));
    truncate(&mut key, MAX_DEDUP_KEY - hash.len());
    key.push_str(&hash);
    key
}

/// A hash that stays the same across builds and restarts, unlike std's.
pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
fn truncate(text: &mut String, max: usize) {
    if text.len() > max {
        let cut = (0..=max)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(cut);
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
    fn states_map_to_actions_and_valid_severities() {
        assert_eq!(
            action(Some("critical")),
            Some(Action::Trigger(Severity::Critical))
        );
        assert_eq!(
            action(Some("warning")),
            Some(Action::Trigger(Severity::Warning))
        );
        assert_eq!(
            action(Some("expired")),
            Some(Action::Trigger(Severity::Error))
        );
        assert_eq!(action(Some("ok")), Some(Action::Resolve));
        assert_eq!(action(Some("flapping")), None);
        assert_eq!(action(None), None);
    }

    #[test]
    fn summary_names_host_service_state_and_metric() {
        assert_eq!(
            summary(&event("critical")),
            "web1 disk / is critical (0.97)"
        );
        let mut e = event("expired");
        e.metric = None;
        assert_eq!(summary(&e), "web1 disk / is expired");
        e.service = Some("é".repeat(2000));
        let long = summary(&e);
        assert!(long.len() <= MAX_SUMMARY && long.starts_with("web1 éé"));
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

    #[test]
    fn long_dedup_keys_stay_within_the_limit_and_distinct() {
        let a = bounded_key(format!("{}a", "x".repeat(300)));
        let b = bounded_key(format!("{}b", "x".repeat(300)));
        assert!(a.len() <= MAX_DEDUP_KEY && b.len() <= MAX_DEDUP_KEY);
        assert_ne!(a, b);
        assert_eq!(bounded_key("web1/cpu".into()), "web1/cpu");
    }
}
