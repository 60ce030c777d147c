//! `GET /index?query=…`: what the index holds that matches, in Riemann's JSON
//! form. A plain request gets a JSON array; a WebSocket upgrade gets each match
//! as one text frame, then (with `subscribe=true`) every matching event as it
//! is indexed or expires; `Accept: text/event-stream` gets the same as SSE
//! (`data: <json>`), snapshot then live. In a cluster the snapshot and the
//! live updates cover every node (`local=true`: this node's index only, for
//! plain requests).
//!
//! A subscriber whose queue fills is dropped by the pubsub (counted there):
//! its WebSocket gets close code 1013 with the reason, its SSE stream ends.
//!
//! A departed subscriber must not hold its connection while no event matches:
//! a WebSocket one is pinged every read timeout and closed (1001, counted as
//! a read timeout) when it sent nothing, not even the pong, since the
//! previous ping; an SSE one gets keep-alive comments, which fail once the
//! peer is gone.

use std::convert::Infallible;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{Query as Params, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, stream};
use serde::Deserialize;
use serde_json::json;

use super::{AppState, error};
use crate::event::Event;
use crate::json;
use crate::query::Query;
use crate::stats::Stats;

#[derive(Deserialize)]
pub(super) struct IndexParams {
    query: Option<String>,
    #[serde(default)]
    subscribe: bool,
    /// In a cluster: only this node's entries, without the fan-out.
    #[serde(default)]
    local: bool,
}

/// Largest message a WebSocket subscriber may send. It has nothing to say but
/// pongs and a close, read only to notice it is there: a larger message ends
/// the connection instead of being buffered (tungstenite's default: 64 MiB).
const SUBSCRIBER_MESSAGE_MAX: usize = 64 * 1024;

pub(super) async fn get_index(
    State(state): State<AppState>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: HeaderMap,
    params: Result<Params<IndexParams>, QueryRejection>,
) -> Response {
    let (query, params) = match parse(&state, params) {
        Ok(parsed) => parsed,
        Err(body) => return error(StatusCode::BAD_REQUEST, body),
    };
    if let Ok(upgrade) = upgrade {
        return upgrade
            .max_message_size(SUBSCRIBER_MESSAGE_MAX)
            .max_frame_size(SUBSCRIBER_MESSAGE_MAX)
            .on_upgrade(move |socket| websocket(socket, state, query, params.subscribe));
    }
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_sse {
        return event_stream(state, query).await;
    }
    // Written out on the blocking thread too: a million events take longer
    // to turn into JSON than to find.
    let to_body = |found: Vec<Event>| {
        serde_json::Value::Array(found.iter().map(json::to_json).collect()).to_string()
    };
    match state.snapshot_then(&query, params.local, to_body).await {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err((status, e)) => error(status, json!({ "error": e })),
    }
}

/// The SSE-only listener's `/index`, whatever the `Accept` header says.
pub(super) async fn get_sse(
    State(state): State<AppState>,
    params: Result<Params<IndexParams>, QueryRejection>,
) -> Response {
    match parse(&state, params) {
        Ok((query, _)) => event_stream(state, query).await,
        Err(body) => error(StatusCode::BAD_REQUEST, body),
    }
}

/// The query and the other parameters, or the body of a 400 answer naming
/// what is wrong and where.
fn parse(
    state: &AppState,
    params: Result<Params<IndexParams>, QueryRejection>,
) -> Result<(Query, IndexParams), serde_json::Value> {
    // axum's own answer to parameters it cannot read is plain text.
    let Params(params) = params.map_err(|e| json!({ "error": e.body_text() }))?;
    let Some(text) = params.query.as_deref() else {
        return Err(json!({"error": "missing the `query` parameter"}));
    };
    if let Err(e) = state.per_message.check_query(text) {
        Stats::incr(e.limit.counter(state.stats()));
        return Err(json!({ "error": e.to_string() }));
    }
    Stats::incr(&state.stats().queries);
    match Query::parse(text) {
        Ok(query) => Ok((query, params)),
        Err(e) => {
            Stats::incr(&state.stats().query_errors);
            Err(json!({"error": e.to_string(), "message": e.message, "column": e.column}))
        }
    }
}

fn frame(event: &Event) -> Message {
    Message::Text(json::to_json(event).to_string().into())
}

async fn websocket(mut socket: WebSocket, state: AppState, query: Query, subscribe: bool) {
    let subscription = match subscribe {
        true => Some(state.subscribe(&query).await),
        false => None,
    };
    let snapshot = match state.snapshot(&query, false).await {
        Ok(snapshot) => snapshot,
        Err((status, error)) => {
            let code = match status {
                // The asker's: over --max-query-results.
                StatusCode::UNPROCESSABLE_ENTITY => close_code::POLICY,
                _ => close_code::ERROR,
            };
            close(socket, code, close_reason(error)).await;
            return;
        }
    };
    let snapshot = match state.hold(subscription.as_ref(), snapshot) {
        Ok(held) => held,
        Err(refused) => {
            close(socket, close_code::AGAIN, close_reason(refused)).await;
            return;
        }
    };
    for event in snapshot {
        if socket.send(frame(&event)).await.is_err() {
            return;
        }
    }
    let Some(mut subscription) = subscription else {
        close(socket, close_code::NORMAL, "snapshot sent").await;
        return;
    };
    tracing::debug!(%query, "WebSocket subscriber connected.");
    let quiet = state.read_timeout;
    let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + quiet, quiet);
    // Whether the client sent anything since the last ping.
    let mut heard = true;
    loop {
        tokio::select! {
            _ = pings.tick() => {
                if !heard {
                    Stats::incr(&state.stats().http_read_timeouts);
                    close(socket, close_code::AWAY, "no answer to ping").await;
                    return;
                }
                heard = false;
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    return;
                }
            }
            event = subscription.recv() => match event {
                Some(event) => {
                    if socket.send(frame(&event)).await.is_err() {
                        return;
                    }
                }
                // Only the pubsub ends a live subscription: it fell behind.
                None => {
                    close(socket, close_code::AGAIN, "subscriber too slow; disconnected").await;
                    return;
                }
            },
            incoming = socket.recv() => match incoming {
                // Clients have nothing to say but pongs; reading notices when they leave.
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => heard = true,
            },
            () = state.shutdown.cancelled() => {
                close(socket, close_code::AWAY, "server shutting down").await;
                return;
            }
        }
    }
}

async fn close(mut socket: WebSocket, code: u16, reason: impl Into<Utf8Bytes>) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    // The peer may already be gone; nothing more to tell it then.
    let _ = socket.send(Message::Close(Some(frame))).await;
}

/// A close frame's reason holds at most 123 bytes (a control frame's 125,
/// less the code's two): longer text is cut at a character boundary.
const MAX_CLOSE_REASON: usize = 123;

fn close_reason(mut text: String) -> String {
    if text.len() > MAX_CLOSE_REASON {
        let end = (0..=MAX_CLOSE_REASON)
            .rev()
            .find(|&end| text.is_char_boundary(end))
            .unwrap_or(0);
        text.truncate(end);
    }
    text
}

/// Snapshot then live, as Server-Sent Events, until the subscriber falls
/// behind or the server shuts down.
async fn event_stream(state: AppState, query: Query) -> Response {
    tracing::debug!(%query, "SSE subscriber connected.");
    let subscription = state.subscribe(&query).await;
    let snapshot = match state.snapshot(&query, false).await {
        Ok(snapshot) => snapshot,
        Err((status, e)) => return error(status, json!({ "error": e })),
    };
    let snapshot = match state.hold(Some(&subscription), snapshot) {
        Ok(held) => held,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": e })),
    };
    let live = stream::unfold(subscription, |mut subscription| async move {
        let event = subscription.recv().await?;
        Some((event, subscription))
    });
    let events = stream::iter(snapshot)
        .chain(live)
        .map(|event| {
            Ok::<_, Infallible>(sse::Event::default().data(json::to_json(&event).to_string()))
        })
        .take_until(state.shutdown.cancelled_owned());
    // Keep-alive comments make a departed client's connection fail (and its
    // subscription go) even when no event matches for a long time.
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_reason_is_cut_to_123_bytes_on_a_character_boundary() {
        let short = "the query matches more than 3 events (--max-query-results 3); narrow it";
        assert_eq!(close_reason(short.to_owned()), short);
        assert_eq!(close_reason("x".repeat(200)), "x".repeat(123));
        // 'é' is two bytes: 61 of them are 122 bytes, the 62nd would end at 124.
        let cut = close_reason("é".repeat(100));
        assert_eq!(cut, "é".repeat(61));
        assert_eq!(cut.len(), 122);
    }
}
