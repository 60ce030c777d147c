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

/// A trigger with the event's details.
fn trigger(routing_key: &str, dedup_key: &str, severity: Severity, e: &Event) -> Value {
    let mut payload = Map::new();
    payload.insert("summary".into(), summary(e).into());
    let source = if e.host_str().is_empty() {
        "vigil"
    } else {
        e.host_str()
    };
    payload.insert("source".into(), source.into());
    payload.insert("severity".into(), severity.as_str().into());
    payload.insert("timestamp".into(), crate::json::iso8601(e.time).into());
    if let Some(service) = &e.service {
        payload.insert("component".into(), service.as_str().into());
    }
    // `group` is whatever a rule put in the attribute of that name.
    if let Some(group) = e.attribute("group") {
        payload.insert("group".into(), group.into());
    }
    if let Some(state) = &e.state {
        payload.insert("class".into(), state.as_str().into());
    }
    payload.insert("custom_details".into(), custom_details(e));
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": dedup_key,
        "payload": payload,
    })
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
