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

use std::collections::BTreeMap;

use bytes::Bytes;
use reqwest::header::HeaderMap;
use tokio_util::sync::CancellationToken;

use super::Delivery;
use super::http::{self, Payload, Poster, RetryPolicy, SetupError};
use super::template::Template;
use crate::event::Event;

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
            poster
                .post(&delivery, &payload(&config, &headers, &event))
                .await;
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
    let (content_type, body) = match &config.body {
        Some(template) => ("text/plain; charset=utf-8", template.render(event)),
        None => ("application/json", crate::json::to_json(event).to_string()),
    };
    Payload {
        url: &config.url,
        content_type,
        headers,
        body: Bytes::from(body),
    }
}
