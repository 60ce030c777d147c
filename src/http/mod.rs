//! vigil's HTTP surface (axum), on Riemann's WebSocket port 5556 by default:
//! `GET /index` (JSON, WebSocket or SSE: `index`), `POST`/`PUT /events`
//! (`events`), `GET /metrics` (`metrics`) and `GET /health`. Optionally a
//! second listener serves only SSE on `/index`, like Riemann's port 5558.
//!
//! With a bearer token configured every endpoint but `/health` and the
//! dashboard's static files (which hold no data) requires it,
//! as `Authorization: Bearer …` or, for WebSocket clients that cannot set
//! headers, `?token=…`.

mod dashboard;
mod events;
mod index;
mod live;
mod metrics;

pub use events::read_line as read_event_line;

use std::io;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, Version, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::answers;
use crate::bounded::{Bounded, Bounds, Counters, MAX_STREAMS};
use crate::budget::{self, Budget};
use crate::clock::SharedClock;
use crate::cluster::{Cluster, ClusterQueryError};
use crate::event::Event;
use crate::forwarded::{self, ClientAddr, TrustedProxies};
use crate::index::QueryError;
use crate::json;
use crate::limits::Limits;
use crate::pubsub::{self, HeldSnapshot, Subscription};
use crate::query::Query;
use crate::selfmetrics::Telemetry;
use crate::server::bind_tcp;
use crate::stats::Stats;
use crate::streams::Streams;
use crate::unread::Unread;

/// Riemann's WebSocket port.
pub const DEFAULT_ADDR: &str = "127.0.0.1:5556";

/// How long a connection has, once vigil shuts down, to take the rest of
/// its answer. A subscriber or a client that stopped reading would
/// otherwise hold the whole shutdown until its write timeout.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);

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
    /// What one `POST /events` request (events: its lines) or query may
    /// carry, as on the Riemann transports.
    pub per_message: Limits,
    /// Set in cluster mode: `GET /index` answers for every node (unless `local=true`).
    pub cluster: Option<Arc<Cluster>>,
    /// Connections open at once on each listener; more are closed at once.
    pub max_connections: usize,
    /// A connection whose client reads nothing of a response or subscription
    /// for this long is closed.
    pub write_timeout: Duration,
    /// A connection is closed when its client sends nothing for this long
    /// after connecting, takes longer over a request head (from its first
    /// byte or the previous answer) or a posted body, or leaves an HTTP/2 or
    /// WebSocket ping unanswered for as long.
    pub read_timeout: Duration,
    /// Room for large posted bodies, shared with the other transports
    /// ([`Server::memory`](crate::server::Server::memory)); `None`: a budget
    /// of its own, of [`budget::DEFAULT_MAX`].
    pub memory: Option<Budget>,
    /// Peers whose `X-Forwarded-For` names the client that live
    /// subscriptions are charged to ([`crate::forwarded`]).
    pub trusted_proxies: TrustedProxies,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR.parse().ok(),
            sse: None,
            token: None,
            subscriber_capacity: pubsub::DEFAULT_CAPACITY,
            per_message: Limits::DEFAULT,
            cluster: None,
            max_connections: crate::tcp::DEFAULT_MAX_CONNECTIONS,
            write_timeout: crate::tcp::DEFAULT_READ_TIMEOUT,
            read_timeout: crate::tcp::DEFAULT_READ_TIMEOUT,
            memory: None,
            trusted_proxies: TrustedProxies::default(),
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
    per_message: Limits,
    cluster: Option<Arc<Cluster>>,
    /// How long a posted body may take to arrive after its head.
    read_timeout: Duration,
    /// Room for large posted bodies.
    memory: Budget,
    trusted_proxies: Arc<TrustedProxies>,
    /// Cancelled at shutdown: ends live subscriptions, which would otherwise
    /// keep their connections open forever.
    shutdown: CancellationToken,
}

impl AppState {
    fn stats(&self) -> &Stats {
        &self.telemetry.stats
    }

    /// Who a request from `peer` with `headers` is, to charge its live
    /// subscriptions to ([`crate::forwarded`]).
    fn client(&self, peer: SocketAddr, headers: &HeaderMap) -> ClientAddr {
        // A value that is not text is unreadable: the peer is the client.
        let forwarded =
            (headers.get_all(forwarded::HEADER).iter()).map(|value| value.to_str().unwrap_or(""));
        self.trusted_proxies.client(peer.ip(), forwarded)
    }

    /// A live subscription, counted; made before the snapshot is taken so no
    /// event falls between the two (one may arrive in both). In a cluster it
    /// sees every node's changes. A coalescing one holds the latest event of
    /// each series from the start: the snapshot may take long to send.
    /// Refused (counted), with the reason, when the query was found too
    /// costly for a live subscription a short while ago, or `client` cut
    /// for what its subscriptions cost ([`Client::admit`]).
    ///
    /// [`Client::admit`]: crate::pubsub::Client::admit
    ///
    /// A `topic` other than the index's is this node's: in a cluster, what
    /// its rules publish, of the shards it owns, subscribed to on the feed
    /// ([`Index::topics`]) so that its bounds hold all subscribers.
    ///
    /// [`Index::topics`]: crate::index::Index::topics
    async fn subscribe(
        &self,
        client: ClientAddr,
        query: &Query,
        coalescing: bool,
        topic: Option<&str>,
    ) -> Result<Subscription, String> {
        Stats::incr(&self.stats().subscriptions);
        let (query, capacity, peer) = (query.clone(), self.subscriber_capacity, Some(client));
        let pubsub = match (&self.cluster, topic) {
            (_, Some(_)) => self.telemetry.index.topics(),
            (Some(cluster), None) => cluster.feed(),
            (None, None) => self.telemetry.index.pubsub(),
        };
        let client = pubsub.client(peer);
        let topic = topic.map(|name| pubsub.topic(name));
        let admitted = match &topic {
            Some(topic) => client.admit_to(topic, &query),
            None => client.admit(&query),
        };
        if let Err(refused) = admitted {
            Stats::incr(&self.stats().subscriptions_refused);
            return Err(refused.to_string());
        }
        if let Some(topic) = topic {
            return Ok(match coalescing {
                false => client.subscribe_to(topic, query, capacity),
                true => client.subscribe_latest_to(topic, query, live::MAX_SERIES),
            });
        }
        Ok(match (&self.cluster, coalescing) {
            (Some(cluster), false) => cluster.subscribe(peer, query, capacity).await,
            (Some(cluster), true) => {
                (cluster.subscribe_latest(peer, query, live::MAX_SERIES)).await
            }
            (None, false) => client.subscribe(query, capacity),
            (None, true) => client.subscribe_latest(query, live::MAX_SERIES),
        })
    }

    /// `snapshot`, held within `--max-subscriber-memory` with the
    /// subscribers' queues (those of `subscription`'s pubsub; the index's
    /// for a snapshot sent alone) while it is sent; the refusal's reason
    /// when it does not fit, counted.
    fn hold(
        &self,
        subscription: Option<&Subscription>,
        snapshot: Vec<Event>,
    ) -> Result<HeldSnapshot, String> {
        let held = match subscription {
            Some(subscription) => subscription.hold(snapshot),
            None => self.telemetry.index.pubsub().hold(snapshot),
        };
        held.map_err(|refused| {
            Stats::incr(&self.stats().subscriptions_refused);
            refused.to_string()
        })
    }

    /// What the index holds that matches: every node's in a cluster.
    async fn snapshot(&self, query: &Query) -> Result<Vec<Event>, Refused> {
        match &self.cluster {
            // Its room in --max-answer-memory, taken as the nodes' answers
            // came, goes once returned: the snapshot is then held with the
            // subscribers' queues.
            Some(cluster) => (cluster.query(query, json::approx_bytes).await)
                .map(|(found, _room)| found)
                .map_err(|e| self.cluster_refused(e)),
            None => (self.telemetry.index.query_then(query, |found| found).await)
                .map_err(|e| self.refused(e)),
        }
    }

    /// How to answer a query the cluster did not answer.
    fn cluster_refused(&self, e: ClusterQueryError) -> Refused {
        match e {
            ClusterQueryError::Refused(e) => self.refused(e),
            ClusterQueryError::Unavailable(e) => Refused::new(StatusCode::SERVICE_UNAVAILABLE, e),
            ClusterQueryError::Again(e) => Refused {
                soon: true,
                ..Refused::new(StatusCode::SERVICE_UNAVAILABLE, e)
            },
        }
    }

    /// How to answer a refused query; a refusal for the query's own sake
    /// counted.
    fn refused(&self, e: QueryError) -> Refused {
        let status = match e {
            QueryError::TooMany { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        if let QueryError::TooMany { .. } | QueryError::TimedOut { .. } = e {
            Stats::incr(&self.stats().query_errors);
        }
        // Over in a moment, as a full --max-answer-memory is: the turns
        // come back as scans end.
        let soon = matches!(e, QueryError::NoTurn { .. } | QueryError::Busy(_));
        Refused {
            soon,
            ..Refused::new(status, e.to_string())
        }
    }
}

/// When to ask again after a `503` a moment mends: `--max-answer-memory`
/// full (its answers leave as their askers read them), or every scan turn
/// taken (they come back as scans end).
const RETRY_SOON: header::HeaderValue = header::HeaderValue::from_static("1");

/// A query not answered: the status to answer with, and why.
struct Refused {
    status: StatusCode,
    why: String,
    /// Mended in a moment: the answer says when to ask again
    /// ([`RETRY_SOON`]).
    soon: bool,
}

impl Refused {
    fn new(status: StatusCode, why: impl Into<String>) -> Refused {
        Refused {
            status,
            why: why.into(),
            soon: false,
        }
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let mut answer = error(self.status, json!({ "error": self.why }));
        if self.soon {
            answer.headers_mut().insert(header::RETRY_AFTER, RETRY_SOON);
        }
        answer
    }
}

/// The running HTTP listeners.
pub struct HttpServer {
    pub addr: Option<SocketAddr>,
    pub sse_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// The HTTP listeners, bound and not served yet (see [`crate::server`]).
pub struct HttpBound {
    http: Option<TcpListener>,
    sse: Option<TcpListener>,
}

impl HttpServer {
    /// Binds the configured listeners and serves them until [`HttpServer::shutdown`].
    pub async fn start(
        config: HttpConfig,
        telemetry: Arc<Telemetry>,
        streams: Arc<dyn Streams>,
        clock: SharedClock,
    ) -> io::Result<HttpServer> {
        let bound = HttpServer::bind(&config).await?;
        HttpServer::serve(bound, config, telemetry, streams, clock)
    }

    /// Binds the listeners `config` names, serving nothing yet.
    pub async fn bind(config: &HttpConfig) -> io::Result<HttpBound> {
        async fn bind(
            flag: &'static str,
            addr: Option<SocketAddr>,
        ) -> io::Result<Option<TcpListener>> {
            match addr {
                Some(addr) => bind_tcp(flag, addr).await.map(Some),
                None => Ok(None),
            }
        }
        Ok(HttpBound {
            http: bind("--http", config.addr).await?,
            sse: bind("--sse", config.sse).await?,
        })
    }

    /// Serves what [`HttpServer::bind`] bound of `config` (its addresses are
    /// not read again) until [`HttpServer::shutdown`].
    pub fn serve(
        bound: HttpBound,
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
                config.read_timeout,
                config.write_timeout,
                stats.clone(),
                Counters::HTTP,
            )
        };
        let state = AppState {
            telemetry,
            streams,
            clock,
            token: config.token.map(Arc::from),
            subscriber_capacity: config.subscriber_capacity,
            per_message: config.per_message,
            cluster: config.cluster,
            read_timeout: config.read_timeout,
            memory: config
                .memory
                .unwrap_or_else(|| Budget::new(budget::DEFAULT_MAX, stats.clone())),
            trusted_proxies: Arc::new(config.trusted_proxies),
            shutdown: shutdown.clone(),
        };
        let tracker = TaskTracker::new();
        let unread = Unread::start(config.write_timeout, stats.clone(), |s| {
            &s.http_responses_unread
        });
        let watched = |router: Router| {
            router.layer(middleware::from_fn_with_state(unread.clone(), watch_unread))
        };
        let addr = match bound.http {
            Some(listener) => {
                let router = watched(router(state.clone()));
                Some(listen(listener, router, bounds(), &shutdown, &tracker)?)
            }
            None => None,
        };
        let sse_addr = match bound.sse {
            Some(listener) => {
                let router = watched(sse_router(state));
                Some(listen(listener, router, bounds(), &shutdown, &tracker)?)
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

/// Serves `router` on `listener` until `shutdown`, each connection
/// [`Bounded`] and on the tracker (so shutdown waits for requests in flight).
///
/// Served with hyper directly rather than `axum::serve`, which sets no timer:
/// hyper's header read timeout then never runs, and a client that opens a
/// connection and never finishes a request head (slowloris), or leaves a
/// kept-alive connection idle, would hold it forever. Here a request head
/// must arrive within the read timeout of the connection's first byte or of
/// the previous answer, and an HTTP/2 peer must answer keepalive pings.
fn listen(
    listener: TcpListener,
    router: Router,
    bounds: Bounds,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let mut hyper = auto::Builder::new(TokioExecutor::new());
    hyper
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.read_timeout)
        // The read buffer, which a kept-alive connection holds while it idles
        // (hyper's default ~400 KB); also the largest request head.
        .max_buf_size(64 * 1024);
    hyper
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(bounds.read_timeout)
        .keep_alive_timeout(bounds.read_timeout)
        .max_concurrent_streams(MAX_STREAMS)
        // WebSockets over HTTP/2, as `axum::serve` allows.
        .enable_connect_protocol();
    let hyper = Arc::new(hyper);
    let (shutdown, connections) = (shutdown.clone(), tracker.clone());
    tracker.spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = crate::tcp::accept(&listener, "http") => accepted,
                () = shutdown.cancelled() => return,
            };
            let Some(io) = bounds.admit(stream, peer) else {
                tracing::debug!(%peer, "HTTP connection limit reached; refused.");
                continue;
            };
            let io = io.watched();
            let connection = serve_connection(
                hyper.clone(),
                io,
                peer,
                router.clone(),
                bounds.clone(),
                shutdown.clone(),
            );
            connections.spawn(connection);
        }
    });
    Ok(bound)
}

/// One connection, until the client leaves, a bound closes it, or
/// `shutdown`: then the request in flight is answered (within
/// [`SHUTDOWN_DRAIN`]) and the connection closed.
async fn serve_connection(
    hyper: Arc<auto::Builder<TokioExecutor>>,
    io: Bounded<TcpStream>,
    peer: SocketAddr,
    router: Router,
    bounds: Bounds,
    shutdown: CancellationToken,
) {
    // Each request knows its peer, as `axum::serve` would tell it: live
    // subscriptions are charged to the client's address.
    let router = router.map_request(
        move |mut request: axum::http::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            request
        },
    );
    let connection =
        hyper.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(router));
    let mut connection = pin!(connection);
    let ended = tokio::select! {
        ended = connection.as_mut() => ended,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(SHUTDOWN_DRAIN, connection).await {
                Ok(ended) => ended,
                Err(_) => {
                    tracing::debug!(
                        drain = ?SHUTDOWN_DRAIN,
                        "HTTP connection not done reading its answer at shutdown; closed."
                    );
                    Ok(())
                }
            }
        }
    };
    if let Err(e) = ended {
        // The header read timeout; a silent connection's (see `bounded`)
        // is an I/O error, counted where it happened.
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
        {
            bounds.read_timed_out();
        }
        tracing::debug!(error = %e, "HTTP connection ended with an error.");
    }
}

/// Every endpoint on the main HTTP listener.
fn router(state: AppState) -> Router {
    Router::new()
        .route("/index", get(index::get_index))
        .route("/pubsub/{topic}", get(index::get_pubsub))
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
        .with_state(state)
}

/// An answer over HTTP/2 is dropped once its client leaves it unread (see
/// [`crate::unread`]); over HTTP/1 its writes are the connection's, which
/// [`Bounded`] times out. A query answer holding room in
/// `--max-answer-memory` is dropped too, over either, unless taken whole
/// within the timeout.
async fn watch_unread(State(unread): State<Arc<Unread>>, request: Request, next: Next) -> Response {
    let http2 = request.version() == Version::HTTP_2;
    let response = next.run(request).await;
    if response.extensions().get::<answers::Large>().is_some() {
        return response.map(|body| axum::body::Body::new(unread.watch_whole(body)));
    }
    if !http2 {
        return response;
    }
    response.map(|body| axum::body::Body::new(unread.watch(body)))
}

/// Riemann's SSE port: `/index` always answers as an event stream.
fn sse_router(state: AppState) -> Router {
    Router::new()
        .route("/index", get(index::get_sse))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// `200 {"status":"ok",…}`; in a cluster also this node's part in it, and
/// `503` with `"status":"unavailable"` while it is cut off from NATS: it
/// can store nothing it takes in, so a load balancer should send elsewhere.
async fn health(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let telemetry = &state.telemetry;
    let mut body = json!({
        "status": "ok",
        "index": telemetry.index.len(),
        "uptime_s": telemetry.started.elapsed().as_secs(),
    });
    let mut status = StatusCode::OK;
    if let Some(cluster) = &telemetry.cluster {
        let now = cluster.status();
        body["cluster"] = json!({
            "connected": now.connected,
            "members": now.members,
            "shards_owned": now.shards_owned,
        });
        if !now.connected {
            body["status"] = json!("unavailable");
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    (status, Json(body))
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
