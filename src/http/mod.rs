//! vigil's HTTP surface (axum), on Riemann's WebSocket port 5556 by default:
//! `GET /index` (JSON, WebSocket or SSE: [`index`]), `POST`/`PUT /events`
//! ([`events`]), `GET /metrics` ([`metrics`]) and `GET /health`. Optionally a
//! second listener serves only SSE on `/index`, like Riemann's port 5558.
//!
//! With a bearer token configured every endpoint but `/health` and the
//! dashboard's static files (which hold no data) requires it,
//! as `Authorization: Bearer …` or, for WebSocket clients that cannot set
//! headers, `?token=…`.

mod dashboard;
mod events;
mod index;
mod metrics;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bounded::{BoundedListener, Bounds};
use crate::clock::SharedClock;
use crate::cluster::Cluster;
use crate::event::Event;
use crate::pubsub::{self, Subscription};
use crate::query::Query;
use crate::selfmetrics::Telemetry;
use crate::stats::Stats;
use crate::streams::Streams;

/// Riemann's WebSocket port.
pub const DEFAULT_ADDR: &str = "127.0.0.1:5556";

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The full HTTP surface; `None` serves none of it.
    pub addr: Option<SocketAddr>,
    /// SSE-only listener for Riemann's SSE clients.
    pub sse: Option<SocketAddr>,
    /// Required by every endpoint but `/health` and the dashboard's static files when set.
    pub token: Option<String>,
    /// Queue length per WebSocket/SSE subscriber; a full queue disconnects it.
    pub subscriber_capacity: usize,
    /// Set in cluster mode: `GET /index` answers for every node (unless `local=true`).
    pub cluster: Option<Arc<Cluster>>,
    /// Connections open at once on each listener; more are closed at once.
    pub max_connections: usize,
    /// A connection whose client reads nothing of a response or subscription
    /// for this long is closed.
    pub write_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR.parse().ok(),
            sse: None,
            token: None,
            subscriber_capacity: pubsub::DEFAULT_CAPACITY,
            cluster: None,
            max_connections: crate::tcp::DEFAULT_MAX_CONNECTIONS,
            write_timeout: crate::tcp::DEFAULT_READ_TIMEOUT,
        }
    }
}

/// What every handler needs.
#[derive(Clone)]
struct AppState {
    telemetry: Arc<Telemetry>,
    /// Where `POST /events` sends what it accepts without a cluster: the
    /// server's pipeline.
    streams: Arc<dyn Streams>,
    clock: SharedClock,
    token: Option<Arc<str>>,
    subscriber_capacity: usize,
    cluster: Option<Arc<Cluster>>,
    /// Cancelled at shutdown: ends live subscriptions, which would otherwise
    /// keep their connections open forever.
    shutdown: CancellationToken,
}

impl AppState {
    fn stats(&self) -> &Stats {
        &self.telemetry.stats
    }

    /// A live subscription, counted; made before the snapshot is taken so no
    /// event falls between the two (one may arrive in both). In a cluster it
    /// sees every node's changes.
    async fn subscribe(&self, query: &Query) -> Subscription {
        Stats::incr(&self.stats().subscriptions);
        match &self.cluster {
            Some(cluster) => {
                cluster
                    .subscribe(query.clone(), self.subscriber_capacity)
                    .await
            }
            None => self
                .telemetry
                .index
                .pubsub()
                .subscribe(query.clone(), self.subscriber_capacity),
        }
    }

    /// What the index holds that matches: every node's in a cluster, unless
    /// `local`.
    async fn snapshot(&self, query: &Query, local: bool) -> Result<Vec<Event>, String> {
        match (&self.cluster, local) {
            (Some(cluster), false) => cluster.query(query.as_str()).await,
            _ => Ok(self.telemetry.index.query(query)),
        }
    }
}

/// The running HTTP listeners.
pub struct HttpServer {
    pub addr: Option<SocketAddr>,
    pub sse_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl HttpServer {
    /// Binds the configured listeners and serves them until [`HttpServer::shutdown`].
    pub async fn start(
        config: HttpConfig,
        telemetry: Arc<Telemetry>,
        streams: Arc<dyn Streams>,
        clock: SharedClock,
    ) -> io::Result<HttpServer> {
        let shutdown = CancellationToken::new();
        let stats = telemetry.stats.clone();
        // Each listener has its own budget of connections.
        let bounds = || {
            Bounds::new(
                config.max_connections,
                config.write_timeout,
                stats.clone(),
                |stats| &stats.http_connections_refused,
                |stats| &stats.http_write_timeouts,
            )
        };
        let state = AppState {
            telemetry,
            streams,
            clock,
            token: config.token.map(Arc::from),
            subscriber_capacity: config.subscriber_capacity,
            cluster: config.cluster,
            shutdown: shutdown.clone(),
        };
        let tracker = TaskTracker::new();
        let addr = match config.addr {
            Some(addr) => {
                Some(listen(addr, router(state.clone()), bounds(), &shutdown, &tracker).await?)
            }
            None => None,
        };
        let sse_addr = match config.sse {
            Some(addr) => {
                Some(listen(addr, sse_router(state), bounds(), &shutdown, &tracker).await?)
            }
            None => None,
        };
        Ok(HttpServer {
            addr,
            sse_addr,
            shutdown,
            tracker,
        })
    }

    /// Closes subscriptions, stops accepting and waits (up to `grace`) for
    /// requests in progress.
    pub async fn shutdown(self, grace: Duration) {
        crate::server::stop_tasks(&self.shutdown, &self.tracker, grace, "http").await;
    }
}

/// Binds `addr` and serves `router` on it until `shutdown`.
async fn listen(
    addr: SocketAddr,
    router: Router,
    bounds: Bounds,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let listener = BoundedListener { listener, bounds };
    let serve =
        axum::serve(listener, router).with_graceful_shutdown(shutdown.clone().cancelled_owned());
    tracker.spawn(async move {
        if let Err(e) = serve.await {
            tracing::error!(addr = %bound, error = %e, "HTTP listener failed.");
        }
    });
    Ok(bound)
}

/// Every endpoint on the main HTTP listener.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/index", get(index::get_index))
        .route(
            "/events",
            axum::routing::post(events::post).put(events::post),
        )
        .route("/metrics", get(metrics::get))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        // Added after the token layer: health checks need no credentials.
        .route("/health", get(health))
        // The dashboard's static files (no data; its WebSocket needs the token).
        .merge(dashboard::routes())
        .layer(DefaultBodyLimit::max(events::MAX_BODY))
        .with_state(state)
}

/// Riemann's SSE port: `/index` always answers as an event stream.
fn sse_router(state: AppState) -> Router {
    Router::new()
        .route("/index", get(index::get_sse))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "index": state.telemetry.index.len(),
        "uptime_s": state.telemetry.started.elapsed().as_secs(),
    }))
}

#[derive(Deserialize)]
struct TokenParam {
    token: Option<String>,
}

async fn require_token(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.token else {
        return next.run(request).await;
    };
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let presented = bearer.or_else(|| {
        axum::extract::Query::<TokenParam>::try_from_uri(request.uri())
            .ok()
            .and_then(|q| q.0.token)
    });
    if presented.is_some_and(|t| same_secret(t.as_bytes(), expected.as_bytes())) {
        return next.run(request).await;
    }
    Stats::incr(&state.stats().http_unauthorized);
    tracing::debug!(
        path = request.uri().path(),
        "HTTP request without a valid token."
    );
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({"error": "missing or invalid bearer token"})),
    )
        .into_response()
}

/// Compares without returning early, so response timing does not reveal how
/// much of a guessed token was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A JSON `{"error": …}` body with `status`.
fn error(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"", b"abc"));
    }
}
