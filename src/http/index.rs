//! `GET /index?query=…`: what the index holds that matches, in Riemann's JSON
//! form. A plain request gets a JSON array; a WebSocket upgrade gets each match
//! as one text frame, then (with `subscribe=true`) every matching event as it
//! is indexed or expires; `Accept: text/event-stream` gets the same as SSE
//! (`data: <json>`), snapshot then live; `coalesce=250ms` makes the live part
//! the latest event of each series per interval ([`Live::Latest`]), for views
//! that cannot take every event. `/pubsub/<topic>` (WebSocket) is Riemann's
//! live-only form: no snapshot; `index` is the index's topic, another is
//! what the rules `publish` to it. In a cluster the snapshot and the
//! live updates cover every node (`local=true`: this node's index only, for
//! plain requests). A plain request's answer holds its room in
//! `--max-answer-memory` from its scan until hyper has sent it; one that
//! does not fit is answered `503` with `Retry-After` ([`crate::answers`]).
//!
//! A subscriber whose queue fills is dropped by the pubsub (counted there):
//! its WebSocket gets close code 1013 with the reason, its SSE stream ends.
//!
//! A departed subscriber must not hold its connection while no event matches:
//! a WebSocket one is pinged every read timeout and closed (1001, counted as
//! a read timeout) when it sent nothing, not even the pong, since the
//! previous ping; an SSE one gets keep-alive comments, which fail once the
//! peer is gone. Nor must one that left while its snapshot was scanned keep
//! the scan going: a WebSocket is read meanwhile, and its close drops the
//! scan (hyper drops a plain or SSE request's on its own).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, Path, Query as Params, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, Stream, StreamExt, stream};
use serde::Deserialize;
use serde_json::json;

use super::live::{self, Live};
use super::{AppState, RETRY_SOON, Refused, error};
use crate::answers::{self, Busy};
use crate::blocking::{SHUTTING_DOWN, off_workers};
use crate::cluster::ClusterQueryError;
use crate::event::Event;
use crate::forwarded::ClientAddr;
use crate::index::QueryError;
use crate::json;
use crate::limits::start_of;
use crate::pubsub::{HeldSnapshot, INDEX_TOPIC, Published, topic_name_error};
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
    /// A subscription gets the latest event of each series every this long
    /// (`250ms`) instead of every event ([`Live::Latest`]).
    coalesce: Option<String>,
    /// `coalesce`, read.
    #[serde(skip)]
    every: Option<Duration>,
    /// Set for `/pubsub/<topic>`: live events only, no snapshot first.
    #[serde(skip)]
    live_only: bool,
    /// `/pubsub/<topic>` of a topic the rules `publish` to: the index's
    /// when `None`.
    #[serde(skip)]
    topic: Option<String>,
}

/// Largest message a WebSocket subscriber may send. It has nothing to say but
/// pongs and a close, read only to notice it is there: a larger message ends
/// the connection instead of being buffered (tungstenite's default: 64 MiB).
const SUBSCRIBER_MESSAGE_MAX: usize = 64 * 1024;

/// Messages a WebSocket subscriber may send in a second. It has little to
/// say (pongs, a heartbeat), but each ping it sends queues a pong for it: a
/// client flooding pings while reading nothing grew those pongs by 1.7 GB
/// in seconds. At this rate they stay under 10 KB a second, until the
/// write timeout ends a client that reads nothing.
const SUBSCRIBER_MESSAGES_PER_SECOND: u32 = 64;

pub(super) async fn get_index(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: HeaderMap,
    params: Result<Params<IndexParams>, QueryRejection>,
) -> Response {
    let (query, params) = match parse(&state, params).await {
        Ok(parsed) => parsed,
        Err(body) => return error(StatusCode::BAD_REQUEST, body),
    };
    let client = state.client(peer, &headers);
    if let Ok(upgrade) = upgrade {
        return upgrade
            .max_message_size(SUBSCRIBER_MESSAGE_MAX)
            .max_frame_size(SUBSCRIBER_MESSAGE_MAX)
            .on_upgrade(move |socket| websocket(socket, state, client, query, params));
    }
    let wants_sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_sse {
        return event_stream(state, client, query, params.every).await;
    }
    // Written out on the blocking thread too: a million events take longer
    // to turn into JSON than to find. One event's JSON tree at a time: a
    // whole answer's tree (99 000 events of 300-byte descriptions, 43 MB of
    // JSON) took the peak 232 MB above the index's, where this takes 115 MB.
    let to_body = |found: Vec<Event>| {
        let mut body = String::from("[");
        for (i, event) in found.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&json::to_json_text(event));
        }
        body.push(']');
        body
    };
    // Its room is taken as its events are found (by the scan, or as the
    // cluster's nodes answer): refused before the answer is made.
    let answered = match (&state.cluster, params.local) {
        (Some(cluster), false) => match cluster.query(&query, json::approx_bytes).await {
            Ok((found, room)) => (off_workers(move || (to_body(found), room)).await)
                .ok_or_else(|| Refused::new(StatusCode::SERVICE_UNAVAILABLE, SHUTTING_DOWN)),
            Err(ClusterQueryError::Refused(QueryError::Busy(busy))) => return busy_answer(busy),
            Err(e) => Err(state.cluster_refused(e)),
        },
        _ => match (state.telemetry.index)
            .answer_then(&query, json::approx_bytes, to_body)
            .await
        {
            Err(QueryError::Busy(busy)) => return busy_answer(busy),
            answered => answered.map_err(|e| state.refused(e)),
        },
    };
    let body = match answered {
        Ok((body, room)) => room.hold(body.into()),
        Err(refused) => return refused.into_response(),
    };
    match body {
        // Its room in --max-answer-memory goes back once hyper has sent it,
        // which must be within the write timeout (see `crate::unread`).
        Ok(body) => {
            let large = body.len() > answers::FREE;
            let mut answer = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
            if large {
                answer.extensions_mut().insert(answers::Large);
            }
            answer
        }
        Err(busy) => busy_answer(busy),
    }
}

/// `503`, to be asked again in a moment: `--max-answer-memory` is full.
fn busy_answer(busy: Busy) -> Response {
    let mut answer = error(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({ "error": busy.to_string() }),
    );
    answer.headers_mut().insert(header::RETRY_AFTER, RETRY_SOON);
    answer
}

/// `GET /pubsub/<topic>?query=…` over WebSocket, Riemann's subscription to
/// a pubsub topic: every matching event published to it from then on,
/// without the snapshot `/index?subscribe=true` sends first. The index's
/// topic (`index`) gets every event indexed or expired; another, what the
/// rules' `publish` stages give it: nothing until one does, so subscribing
/// before a reload adds the stage is allowed.
pub(super) async fn get_pubsub(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(topic): Path<String>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    headers: HeaderMap,
    params: Result<Params<IndexParams>, QueryRejection>,
) -> Response {
    if let Some(why) = topic_name_error(&topic) {
        return error(StatusCode::BAD_REQUEST, json!({ "error": why }));
    }
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let (query, mut params) = match parse(&state, params).await {
        Ok(parsed) => parsed,
        Err(body) => return error(StatusCode::BAD_REQUEST, body),
    };
    params.subscribe = true;
    params.live_only = true;
    params.topic = (topic != INDEX_TOPIC).then_some(topic);
    let client = state.client(peer, &headers);
    upgrade
        .max_message_size(SUBSCRIBER_MESSAGE_MAX)
        .max_frame_size(SUBSCRIBER_MESSAGE_MAX)
        .on_upgrade(move |socket| websocket(socket, state, client, query, params))
}

/// The SSE-only listener's `/index`, whatever the `Accept` header says.
pub(super) async fn get_sse(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    params: Result<Params<IndexParams>, QueryRejection>,
) -> Response {
    match parse(&state, params).await {
        Ok((query, params)) => {
            let client = state.client(peer, &headers);
            event_stream(state, client, query, params.every).await
        }
        Err(body) => error(StatusCode::BAD_REQUEST, body),
    }
}

/// The query and the other parameters, or the body of a 400 answer naming
/// what is wrong and where.
async fn parse(
    state: &AppState,
    params: Result<Params<IndexParams>, QueryRejection>,
) -> Result<(Query, IndexParams), serde_json::Value> {
    // axum's own answer to parameters it cannot read is plain text.
    let Params(mut params) = params.map_err(|e| json!({ "error": e.body_text() }))?;
    if let Some(text) = &params.coalesce {
        params.every = Some(live::interval(text).map_err(|e| json!({ "error": e }))?);
    }
    let Some(text) = params.query.as_deref() else {
        return Err(json!({"error": "missing the `query` parameter"}));
    };
    if let Err(e) = state.per_message.check_query(text) {
        Stats::incr(e.limit.counter(state.stats()));
        return Err(json!({ "error": e.to_string() }));
    }
    Stats::incr(&state.stats().queries);
    match Query::parse_off_workers(text).await {
        Ok(query) => Ok((query, params)),
        Err(e) => {
            Stats::incr(&state.stats().query_errors);
            Err(json!({"error": e.to_string(), "message": e.message, "column": e.column}))
        }
    }
}

fn frame(event: &Event) -> Message {
    Message::Text(json::to_json_text(event).into())
}

async fn websocket(
    mut socket: WebSocket,
    state: AppState,
    client: ClientAddr,
    query: Query,
    params: IndexParams,
) {
    let subscription = match params.subscribe {
        true => match state
            .subscribe(
                client,
                &query,
                params.every.is_some(),
                params.topic.as_deref(),
            )
            .await
        {
            Ok(subscription) => Some(subscription),
            Err(refused) => return close(socket, close_code::POLICY, close_reason(refused)).await,
        },
        false => None,
    };
    let mut said = Rate::default();
    let snapshot = async {
        match params.live_only {
            true => Ok(Vec::new()),
            false => state.snapshot(&query).await,
        }
    };
    tokio::pin!(snapshot);
    // Read meanwhile, to notice an asker that left: its scan is dropped then,
    // instead of waiting for its turn and running in full for no one.
    let snapshot = loop {
        tokio::select! {
            snapshot = &mut snapshot => break snapshot,
            incoming = socket.recv() => match said.heard(incoming) {
                Heard::Gone => return,
                Heard::Flood => return flooded(socket, &state).await,
                Heard::Message => {}
            },
        }
    };
    let snapshot = match snapshot {
        Ok(snapshot) => snapshot,
        Err(Refused { status, why, soon }) => {
            let code = match (status, soon) {
                // The asker's: over --max-query-results.
                (StatusCode::UNPROCESSABLE_ENTITY, _) => close_code::POLICY,
                // Mended in a moment (a plain GET's `Retry-After`): "try
                // again later", as a snapshot without room is closed.
                (_, true) => close_code::AGAIN,
                _ => close_code::ERROR,
            };
            close(socket, code, close_reason(why)).await;
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
    // Fed, not sent: a flush per event is a write per event.
    for event in snapshot {
        if socket.feed(frame(&event)).await.is_err() {
            return;
        }
    }
    if socket.flush().await.is_err() {
        return;
    }
    let Some(subscription) = subscription else {
        close(socket, close_code::NORMAL, "snapshot sent").await;
        return;
    };
    tracing::debug!(%query, "WebSocket subscriber connected.");
    let quiet = state.read_timeout;
    let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + quiet, quiet);
    // Whether the client sent anything since the last ping.
    let mut heard = true;
    let mut live = Live::new(subscription, params.every);
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
            batch = live.next() => match batch {
                Some(events) => {
                    if send_all(&mut socket, events).await.is_err() {
                        return;
                    }
                }
                // Only the pubsub ends a live subscription: it fell behind,
                // or its query cost the ingest path too much.
                None => {
                    match live.why() {
                        Some(why) => close(socket, close_code::POLICY, close_reason(why.to_string())).await,
                        None => close(socket, close_code::AGAIN, "subscriber too slow; disconnected").await,
                    }
                    return;
                }
            },
            incoming = socket.recv() => match said.heard(incoming) {
                Heard::Gone => return,
                Heard::Flood => return flooded(socket, &state).await,
                Heard::Message => heard = true,
            },
            () = state.shutdown.cancelled() => {
                close(socket, close_code::AWAY, "server shutting down").await;
                return;
            }
        }
    }
}

/// What a WebSocket client's next message means.
enum Heard {
    /// It closed the connection, or the connection failed.
    Gone,
    /// One message too many this second.
    Flood,
    /// Anything else: clients have nothing to say but pongs.
    Message,
}

/// Closes a flooding client's connection, counted.
async fn flooded(socket: WebSocket, state: &AppState) {
    Stats::incr(&state.stats().http_websocket_floods);
    let why = "too many messages: over 64 a second from a subscriber";
    close(socket, close_code::POLICY, why).await;
}

/// The messages a subscriber sent in the current second.
#[derive(Default)]
struct Rate {
    since: Option<tokio::time::Instant>,
    count: u32,
}

impl Rate {
    /// Counts one more; whether it is within [`SUBSCRIBER_MESSAGES_PER_SECOND`].
    fn one_more(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        match self.since {
            Some(since) if now - since < Duration::from_secs(1) => self.count += 1,
            _ => (self.since, self.count) = (Some(now), 1),
        }
        self.count <= SUBSCRIBER_MESSAGES_PER_SECOND
    }

    /// What `incoming`, the client's next message, means; a message counts.
    fn heard(&mut self, incoming: Option<Result<Message, axum::Error>>) -> Heard {
        match incoming {
            Some(Ok(Message::Close(_)) | Err(_)) | None => Heard::Gone,
            Some(Ok(_)) if !self.one_more() => Heard::Flood,
            Some(Ok(_)) => Heard::Message,
        }
    }
}

/// `events`, each a text frame, then one flush: a flush per event is a
/// write per event.
async fn send_all(socket: &mut WebSocket, events: Vec<Arc<Published>>) -> Result<(), axum::Error> {
    for event in events {
        socket.feed(Message::Text(event.json().into())).await?;
    }
    socket.flush().await
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
    text.truncate(start_of(&text, MAX_CLOSE_REASON).len());
    text
}

/// Snapshot then live, as Server-Sent Events, until the subscriber falls
/// behind or the server shuts down.
async fn event_stream(
    state: AppState,
    client: ClientAddr,
    query: Query,
    coalesce: Option<Duration>,
) -> Response {
    tracing::debug!(%query, %client, "SSE subscriber connected.");
    let subscription = match state
        .subscribe(client, &query, coalesce.is_some(), None)
        .await
    {
        Ok(subscription) => subscription,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, json!({ "error": e })),
    };
    let snapshot = match state.snapshot(&query).await {
        Ok(snapshot) => snapshot,
        Err(refused) => return refused.into_response(),
    };
    let snapshot = match state.hold(Some(&subscription), snapshot) {
        Ok(held) => held,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, json!({ "error": e })),
    };
    let headers = [
        (header::CONTENT_TYPE, "text/event-stream"),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    let chunks = sse_chunks(snapshot, Live::new(subscription, coalesce));
    let chunks = chunks.take_until(state.shutdown.cancelled_owned());
    (headers, Body::from_stream(chunks)).into_response()
}

/// A comment is sent after this long without an event: it makes a departed
/// client's connection fail (and its subscription go) even when no event
/// matches for a long time.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The SSE body: the snapshot, then each batch of live events as one chunk
/// (axum's `Sse` writes a chunk per event); a comment when none came for
/// [`SSE_KEEP_ALIVE`].
fn sse_chunks(
    snapshot: HeldSnapshot,
    live: Live,
) -> impl Stream<Item = Result<String, Infallible>> {
    let snapshot = stream::iter(snapshot).chunks(live::BATCH).map(|events| {
        let mut chunk = String::new();
        for event in events {
            push_sse_data(&mut chunk, &json::to_json_text(&event));
        }
        chunk
    });
    let live = stream::unfold(Some(live), |live| async move {
        let mut live = live?;
        let events = match tokio::time::timeout(SSE_KEEP_ALIVE, live.next()).await {
            Ok(Some(events)) => events,
            // Disconnected for its query's cost: the last event says why.
            Ok(None) => {
                let why = live.why()?;
                let error = json!({ "error": why.as_ref() }).to_string();
                return Some((format!("event: error\ndata: {error}\n\n"), None));
            }
            Err(_quiet) => return Some((":\n\n".to_owned(), Some(live))),
        };
        let mut chunk = String::new();
        for event in events {
            push_sse_data(&mut chunk, event.json());
        }
        Some((chunk, Some(live)))
    });
    snapshot.chain(live).map(Ok)
}

/// One SSE event of one `data` line: compact JSON has no line breaks (they
/// are escaped inside strings).
fn push_sse_data(chunk: &mut String, json: &str) {
    debug_assert!(!json.contains('\n'), "one line per event");
    chunk.push_str("data: ");
    chunk.push_str(json);
    chunk.push_str("\n\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pubsub::Pubsub;

    #[tokio::test(start_paused = true)]
    async fn sse_chunks_hold_the_events_queued_and_a_comment_when_quiet() {
        let pubsub = Pubsub::new();
        let subscription = pubsub.subscribe(Query::parse("true").unwrap(), 10);
        let snapshot = subscription.hold(vec![event("a")]).unwrap();
        let mut chunks = std::pin::pin!(sse_chunks(snapshot, Live::new(subscription, None)));
        let text = |chunk: Option<Result<String, Infallible>>| chunk.unwrap().unwrap();
        let json = |host| json::to_json_text(&event(host));
        assert_eq!(
            text(chunks.next().await),
            format!("data: {}\n\n", json("a"))
        );
        pubsub.publish(&event("b"));
        pubsub.publish(&event("c"));
        let both = format!("data: {}\n\ndata: {}\n\n", json("b"), json("c"));
        assert_eq!(text(chunks.next().await), both, "one chunk");
        let started = tokio::time::Instant::now();
        assert_eq!(text(chunks.next().await), ":\n\n");
        assert_eq!(started.elapsed(), SSE_KEEP_ALIVE);
    }

    #[tokio::test(start_paused = true)]
    async fn coalesced_sse_writes_the_latest_of_each_series_then_a_comment_when_quiet() {
        let pubsub = Pubsub::new();
        let subscription = pubsub.subscribe_latest(Query::parse("true").unwrap(), 10);
        let snapshot = subscription.hold(Vec::new()).unwrap();
        let interval = Duration::from_millis(100);
        let chunks = sse_chunks(snapshot, Live::new(subscription, Some(interval)));
        let mut chunks = std::pin::pin!(chunks);
        let text = |chunk: Option<Result<String, Infallible>>| chunk.unwrap().unwrap();
        let started = tokio::time::Instant::now();
        for host in ["a", "a", "b", "a"] {
            pubsub.publish(&event(host));
        }
        let chunk = text(chunks.next().await);
        assert_eq!(started.elapsed(), interval);
        assert_eq!(chunk.matches("data: ").count(), 2, "{chunk}");
        let written = tokio::time::Instant::now();
        assert_eq!(text(chunks.next().await), ":\n\n");
        assert_eq!(written.elapsed(), SSE_KEEP_ALIVE);
    }

    fn event(host: &str) -> Event {
        Event {
            host: Some(host.into()),
            ..Event::default()
        }
    }

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
