//! Webhooks, for paging systems other than PagerDuty and push notifications:
//! each event is one POST to `url`, with the configured `headers` added.
//!
//! Without `body`, the request body is the event as Riemann's JSON
//! (`Content-Type: application/json`), a stable schema using Riemann's field
//! names:
//!
//! ```json
//! {
//!   "host": "web1",              // string or null
//!   "service": "disk /",         // string or null
//!   "state": "critical",         // string or null
//!   "description": "root full",  // string or null
//!   "metric": 0.97,              // number (integers stay integers) or null
//!   "tags": ["prod"],            // array of strings, possibly empty
//!   "time": "2024-01-02T03:04:05.678Z", // ISO 8601 UTC, milliseconds
//!   "ttl": 60.0,                 // seconds, number or null
//!   "env": "prod"                // each attribute as one more string field
//! }
//! ```
//!
//! An attribute never replaces a standard field. With `body`, the request
//! body is that template rendered for the event, as
//! `text/plain; charset=utf-8`. A configured `Content-Type` header overrides
//! either.
//!
//! A receiver's size limit is unknown until it answers `413`: then the event
//! is sent once more cut short (host, service and state to 1 KiB each; the
//! description, the tags and the attributes to 4 KiB each), with an
//! attribute `truncated` saying what was left out.
//!
//! A `paging_webhook` output posts pages instead (when to page is
//! [`super::pager`]'s), always as JSON:
//!
//! ```json
//! {
//!   "action": "trigger",        // or "resolve"
//!   "dedup_key": "web1/disk /", // the incident: its resolve has the same
//!   "severity": "critical",     // critical, warning or error (expired); not on a resolve
//!   "summary": "web1 disk / is critical (0.97)",
//!   "event": {"host": "web1", …} // the event that paged, as above
//! }
//! ```

use std::collections::BTreeMap;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::Delivery;
use super::http::{self, Payload, Poster, RetryPolicy, SetupError};
use super::pager::{Action, summary};
use super::template::Template;
use crate::event::Event;
use crate::limits::start_of;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub url: String,
    pub headers: BTreeMap<String, String>,
    /// By default the event as JSON.
    pub body: Option<Template>,
}

/// Posts each queued event until shutdown, then what is already queued.
pub async fn run(
    config: Config,
    mut delivery: Delivery,
    retry: RetryPolicy,
    shutdown: CancellationToken,
) {
    let (headers, mut poster) = match setup(&config, retry, &shutdown) {
        Ok(ready) => ready,
        Err(error) => return http::refuse_all(delivery, shutdown, error).await,
    };
    while let Some(batch) = http::next_batch(&mut delivery, &shutdown).await {
        for event in batch {
            let payload = payload(&config, &headers, &event);
            let cut = || payload_body(&config, &cut_short(&event)).1;
            poster.post_or_cut(&delivery, &payload, cut).await;
        }
    }
    poster.finish(&delivery.name);
}

fn setup(
    config: &Config,
    retry: RetryPolicy,
    shutdown: &CancellationToken,
) -> Result<(HeaderMap, Poster), SetupError> {
    Ok((
        http::header_map(&config.headers)?,
        Poster::new(retry, shutdown.clone())?,
    ))
}

/// The request for one event: its JSON, or the rendered body template.
fn payload<'a>(config: &'a Config, headers: &'a HeaderMap, event: &Event) -> Payload<'a> {
    let (content_type, body) = payload_body(config, event);
    Payload {
        url: &config.url,
        content_type,
        headers,
        body,
        wanted: &http::always,
    }
}

fn payload_body(config: &Config, event: &Event) -> (&'static str, Bytes) {
    match &config.body {
        Some(template) => ("text/plain; charset=utf-8", template.render(event).into()),
        None => ("application/json", crate::json::to_json_text(event).into()),
    }
}

/// Bytes of host, service and state kept by [`cut_short`], each.
const CUT_FIELD: usize = 1024;
/// Bytes of the description, of the tags and of the attributes kept by
/// [`cut_short`], each.
const CUT_PART: usize = 4096;

/// The event for a receiver that refused it as too large: host, service
/// and state cut to [`CUT_FIELD`] bytes, the description to [`CUT_PART`],
/// tags and attributes kept in order while they fit in [`CUT_PART`] each,
/// and the attribute `truncated` saying what was left out.
pub(super) fn cut_short(event: &Event) -> Event {
    let field = |text: &Option<String>, max| text.as_deref().map(|t| start_of(t, max).to_owned());
    let tags = first_within(&event.tags, String::len);
    let theirs = event.attributes.iter().filter(|(k, _)| k != "truncated");
    let mut attributes = first_within(theirs, |(k, v)| k.len() + v.len());
    let description = field(&event.description, CUT_PART);
    let note = format!(
        "cut short, the receiver refused it as too large: description {} of {} bytes, \
         {} of {} tags, {} of {} attributes",
        description.as_ref().map_or(0, String::len),
        event.description.as_ref().map_or(0, String::len),
        tags.len(),
        event.tags.len(),
        attributes.len(),
        event.attributes.len(),
    );
    attributes.push(("truncated".to_owned(), note));
    Event {
        host: field(&event.host, CUT_FIELD),
        service: field(&event.service, CUT_FIELD),
        state: field(&event.state, CUT_FIELD),
        description,
        tags,
        attributes,
        ..*event
    }
}

/// A paging webhook's page: what to do with which incident, and the event.
pub(super) fn page(action: Action, dedup_key: &str, event: &Event) -> Value {
    let mut page = json!({
        "action": "resolve",
        "dedup_key": dedup_key,
        "summary": summary(event),
        "event": crate::json::to_json(event),
    });
    if let Action::Trigger(severity) = action {
        page["action"] = "trigger".into();
        page["severity"] = severity.as_str().into();
    }
    page
}

/// The first of `items` while their lengths add up to at most [`CUT_PART`].
fn first_within<'a, T: Clone + 'a>(
    items: impl IntoIterator<Item = &'a T>,
    len: impl Fn(&T) -> usize,
) -> Vec<T> {
    let mut room = CUT_PART;
    let fits = |item: &&T| {
        let fits = len(item) <= room;
        if fits {
            room -= len(item);
        }
        fits
    };
    items.into_iter().take_while(fits).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Metric;

    #[test]
    fn cut_short_keeps_within_its_bounds_in_order_on_character_boundaries() {
        let event = Event {
            host: Some("é".repeat(1000)),
            service: Some("s".repeat(10)),
            state: None,
            time: 7,
            description: Some("d".repeat(CUT_PART + 1)),
            tags: vec!["t".repeat(4000), "u".repeat(96), "v".into(), "w".into()],
            metric: Some(Metric::Int(3)),
            ttl: Some(60.0),
            attributes: vec![
                ("truncated".into(), "the sender's".into()),
                ("a".into(), "x".repeat(CUT_PART - 1)),
                ("b".into(), "y".into()),
            ],
        };
        let cut = cut_short(&event);
        assert_eq!(cut.host, Some("é".repeat(CUT_FIELD / 2)), "1 024 bytes");
        assert_eq!((cut.service, cut.state), (event.service.clone(), None));
        assert_eq!(cut.description, Some("d".repeat(CUT_PART)));
        assert_eq!(cut.tags, &event.tags[..2], "4 096 bytes, then no more");
        assert_eq!(
            cut.attributes,
            [
                ("a".into(), "x".repeat(CUT_PART - 1)),
                (
                    "truncated".into(),
                    "cut short, the receiver refused it as too large: description 4096 of \
                     4097 bytes, 2 of 4 tags, 1 of 3 attributes"
                        .into()
                )
            ]
        );
        assert_eq!(
            (cut.time, cut.metric, cut.ttl),
            (7, Some(Metric::Int(3)), Some(60.0))
        );
    }
}
