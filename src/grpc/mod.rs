//! The gRPC API (`proto/vigil.proto`): `Send`/`SendBatch` feed the rules exactly
//! as a Riemann TCP frame does (the same decoder and limits: see [`Msg`]),
//! `Query` reads the index, `Subscribe` streams the index's current matches and
//! then its live updates from [`pubsub`](crate::pubsub).
//!
//! Off unless `--grpc` is given. It runs beside the Riemann listeners with its
//! own shutdown token: cancelling it ends the open streams with `UNAVAILABLE`,
//! so a graceful HTTP/2 shutdown is not held up by a subscriber that never leaves.
//!
//! In a cluster `Send`/`SendBatch` ack once JetStream stored the events (an
//! `ok: false` ack with the error otherwise: resend), and `Query` and
//! `Subscribe` cover every node.
//!
//! A `Query` answer holds its room in `--max-answer-memory` from its scan
//! until tonic has sent it (see [`crate::answers`]); one that does not fit
//! is refused with `RESOURCE_EXHAUSTED`. It is made and encoded off the
//! async workers, as the scan is ([`QueryResponse`]).

// tonic's API hands `Status` around by value throughout.
#![allow(clippy::result_large_err)]

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt, stream};
use prost::Message;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::{Request, Response, Status, Streaming};
use tower::util::{MapRequestLayer, MapResponseLayer};

use crate::answers::{Holding, Room};
use crate::blocking::{SHUTTING_DOWN, off_workers};
use crate::bounded::{Bounds, Counters, MAX_STREAMS};
use crate::budget::{self, Budget};
use crate::clock::SharedClock;
use crate::cluster::{Cluster, ClusterQueryError};
use crate::event::Event;
use crate::forwarded::{self, TrustedProxies};
use crate::index::{Index, QueryError};
use crate::ingest;
use crate::limits::Limits;
use crate::proto::{self, PbEvent};
use crate::pubsub::{DEFAULT_CAPACITY, Subscription};
use crate::query::Query;
use crate::server::bind_tcp;
use crate::stats::Stats;
use crate::streams::Streams;
use crate::unread::Unread;

/// The generated code names Riemann's `Event` as `super::riemann::Event`.
mod riemann {
    pub use crate::proto::PbEvent as Event;
}

/// Code generated from `proto/vigil.proto`.
#[allow(clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/vigil.rs"));
}

mod gate;
mod msg;
mod query_request;
mod query_response;

pub use msg::Msg;
pub use pb::Ack;
pub use pb::vigil_client::VigilClient;
pub use query_request::QueryRequest;
pub use query_response::QueryResponse;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// What every call needs; shared by the connections.
struct Shared {
    index: Arc<Index>,
    streams: Arc<dyn Streams>,
    clock: SharedClock,
    stats: Arc<Stats>,
    /// What one `Msg` or query may carry, as on the Riemann transports.
    limits: Limits,
    shutdown: CancellationToken,
    /// Set in cluster mode: events go to JetStream, `Query` and `Subscribe`
    /// cover every node.
    cluster: Option<Arc<Cluster>>,
    /// Peers whose `x-forwarded-for` names the client subscriptions are
    /// charged to.
    trusted_proxies: TrustedProxies,
}

#[derive(Clone)]
struct Service(Arc<Shared>);

fn shutting_down() -> Status {
    Status::unavailable("vigil is shutting down")
}

impl Shared {
    /// The same path as a Riemann TCP frame: arrival time for events without
    /// one, counted, then the rules as one batch (or, in a cluster, JetStream).
    async fn accept(&self, msg: Msg) -> Ack {
        Stats::incr(&self.stats.grpc_messages);
        let mut events = Vec::new();
        let now = self.clock.now();
        let mut decoded = msg.decode_into(now, &self.limits, &mut events);
        if let Err(crate::wire::DecodeError::InvalidUtf8(_)) = decoded
            && let Some((repaired, strings)) = msg.repaired()
        {
            Stats::add(&self.stats.strings_repaired, strings as u64);
            decoded = repaired.decode_into(now, &self.limits, &mut events);
        }
        // Refused whole, as a Riemann TCP frame: none of its events go on.
        if let Err(e) = decoded {
            let error = ingest::refusal(&self.stats, format_args!("gRPC"), e);
            return Ack { ok: false, error };
        }
        if !events.is_empty() {
            Stats::add(&self.stats.grpc_events, events.len() as u64);
            match &self.cluster {
                Some(cluster) => {
                    if let Err(error) = cluster.publish(&events).await {
                        cluster.not_stored("grpc", &error, &self.stats);
                        return Ack { ok: false, error };
                    }
                }
                None => self.streams.process(&events),
            }
        }
        Ack {
            ok: true,
            error: String::new(),
        }
    }

    async fn parse(&self, request: &QueryRequest) -> Result<Query, Status> {
        if let Some(e) = request.malformed() {
            Stats::incr(&self.stats.decode_errors);
            return Err(Status::invalid_argument(format!(
                "invalid QueryRequest: {e}"
            )));
        }
        let text = request.query.as_str();
        if request.repaired() {
            Stats::incr(&self.stats.strings_repaired);
        }
        if let Err(e) = self.limits.check_query(text) {
            Stats::incr(e.limit.counter(&self.stats));
            return Err(Status::invalid_argument(e.to_string()));
        }
        Stats::incr(&self.stats.queries);
        Query::parse_off_workers(text).await.map_err(|e| {
            Stats::incr(&self.stats.query_errors);
            tracing::debug!(query = text, error = %e, "gRPC query refused.");
            // "parse error at column N: …": the column is in the message.
            Status::invalid_argument(e.to_string())
        })
    }

    /// The status of a query the index did not answer (a refusal counted).
    fn refused(&self, e: QueryError) -> Status {
        match e {
            QueryError::TooMany { .. } => {
                Stats::incr(&self.stats.query_errors);
                Status::resource_exhausted(e.to_string())
            }
            QueryError::TimedOut { .. } => {
                Stats::incr(&self.stats.query_errors);
                Status::deadline_exceeded(e.to_string())
            }
            QueryError::Abandoned => Status::cancelled(e.to_string()),
            QueryError::ShuttingDown | QueryError::NoTurn { .. } => {
                Status::unavailable(e.to_string())
            }
            QueryError::Busy(_) => Status::resource_exhausted(e.to_string()),
        }
    }

    /// The status of a query the cluster did not answer.
    fn cluster_refused(&self, e: ClusterQueryError) -> Status {
        match e {
            ClusterQueryError::Refused(e) => self.refused(e),
            ClusterQueryError::Unavailable(e) | ClusterQueryError::Again(e) => {
                Status::unavailable(e)
            }
        }
    }
}

#[tonic::async_trait]
impl pb::vigil_server::Vigil for Service {
    type SendStream = ResponseStream<Ack>;
    type SubscribeStream = ResponseStream<PbEvent>;

    async fn send(
        &self,
        request: Request<Streaming<Msg>>,
    ) -> Result<Response<Self::SendStream>, Status> {
        // Acks are produced as the Msgs are read, so they come back in order.
        let acks = stream::unfold(
            Some((request.into_inner(), self.0.clone())),
            |state| async move {
                let (mut msgs, shared) = state?;
                let next = tokio::select! {
                    next = msgs.next() => next?,
                    () = shared.shutdown.cancelled() => Err(shutting_down()),
                };
                match next {
                    Ok(msg) => {
                        let ack = shared.accept(msg).await;
                        Some((Ok(ack), Some((msgs, shared))))
                    }
                    // A Msg over --max-frame ends the call (bytes that are not
                    // a Msg, or an event in one that does not decode, get an Ack).
                    Err(status) => Some((Err(status), None)),
                }
            },
        );
        Ok(Response::new(Box::pin(acks)))
    }

    async fn send_batch(&self, request: Request<Msg>) -> Result<Response<Ack>, Status> {
        Ok(Response::new(self.0.accept(request.into_inner()).await))
    }

    async fn query(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<QueryResponse>, Status> {
        let query = self.0.parse(request.get_ref()).await?;
        let answer = |found: Vec<Event>| QueryResponse::of(&found);
        // Its room is taken as its events are found (by the scan, or as
        // the cluster's nodes answer): refused before the answer is made,
        // which is made and encoded off the async workers either way (tonic
        // then only copies its bytes).
        let (answer, mut room) = match &self.0.cluster {
            Some(cluster) => {
                let found = (cluster.query(&query, proto::approx_bytes).await)
                    .map_err(|e| self.0.cluster_refused(e))?;
                (off_workers(move || (answer(found.0), found.1)).await)
                    .ok_or_else(|| Status::unavailable(SHUTTING_DOWN))?
            }
            // A local one as its scan finds it: refused before it is made.
            None => (self
                .0
                .index
                .answer_then(&query, proto::approx_bytes, answer)
                .await)
                .map_err(|e| self.0.refused(e))?,
        };
        // Held, until tonic has sent it, within `--max-answer-memory`:
        // the layer in `Grpc::serve` moves it into the response's body.
        (room.fit(answer.encoded_len())).map_err(|busy| self.0.refused(busy.into()))?;
        let mut response = Response::new(answer);
        response.extensions_mut().insert(AnswerRoom(Arc::new(room)));
        Ok(response)
    }

    async fn subscribe(
        &self,
        request: Request<QueryRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let query = self.0.parse(request.get_ref()).await?;
        Stats::incr(&self.0.stats.subscriptions);
        // What its subscriptions cost ingest is charged to the client's
        // address (behind a trusted proxy, the one it forwards).
        let client = request.remote_addr().map(|addr| {
            // A value that is not text is unreadable: the peer is the client.
            let forwarded = (request.metadata().get_all(forwarded::HEADER).iter())
                .map(|value| value.to_str().unwrap_or(""));
            self.0.trusted_proxies.client(addr.ip(), forwarded)
        });
        let pubsub = match &self.0.cluster {
            Some(cluster) => cluster.feed(),
            None => self.0.index.pubsub(),
        };
        if let Err(refused) = pubsub.client(client).admit(&query) {
            Stats::incr(&self.0.stats.subscriptions_refused);
            return Err(Status::resource_exhausted(refused.to_string()));
        }
        // Subscribed before the snapshot is taken: an event indexed in between
        // may arrive twice, but none is missed.
        let (subscription, current) = match &self.0.cluster {
            Some(cluster) => {
                let subscription =
                    (cluster.subscribe(client, query.clone(), DEFAULT_CAPACITY)).await;
                // Its room in --max-answer-memory goes once returned: the
                // snapshot is then held with the subscribers' queues.
                let (current, _room) = (cluster.query(&query, proto::approx_bytes))
                    .await
                    .map_err(|e| self.0.cluster_refused(e))?;
                (subscription, current)
            }
            None => {
                let subscription = pubsub
                    .client(client)
                    .subscribe(query.clone(), DEFAULT_CAPACITY);
                let current = (self.0.index.query_then(&query, |found| found).await)
                    .map_err(|e| self.0.refused(e))?;
                (subscription, current)
            }
        };
        tracing::debug!(
            query = %query,
            client = %client.map_or("unknown".to_owned(), |client| client.to_string()),
            current = current.len(),
            "gRPC subscriber joined."
        );
        let current = subscription.hold(current).map_err(|refused| {
            Stats::incr(&self.0.stats.subscriptions_refused);
            Status::resource_exhausted(refused.to_string())
        })?;
        // Ends at shutdown too: a snapshot still being sent to a slow reader
        // must not hold the shutdown until it has all of it.
        let current = stream::iter(current.map(|e| Ok(proto::to_pb(&e))))
            .take_until(self.0.shutdown.clone().cancelled_owned());
        let live = stream::unfold(
            Some((subscription, self.0.shutdown.clone())),
            |state| async move {
                let (mut subscription, shutdown) = state?;
                tokio::select! {
                    event = subscription.recv() => match event {
                        Some(e) => Some((Ok(proto::to_pb(&e)), Some((subscription, shutdown)))),
                        None => Some((Err(ended(&subscription)), None)),
                    },
                    () = shutdown.cancelled() => Some((Err(shutting_down()), None)),
                }
            },
        );
        Ok(Response::new(Box::pin(current.chain(live))))
    }
}

/// Why a subscription's queue closed: pubsub drops a subscriber that falls
/// behind, or whose query costs it too much, rather than slow ingest down.
fn ended(subscription: &Subscription) -> Status {
    if let Some(why) = subscription.why() {
        Status::resource_exhausted(why.to_string())
    } else if subscription.lagged() {
        Status::resource_exhausted("subscriber too slow: its queue filled up")
    } else {
        Status::internal("subscription closed")
    }
}

/// A `Query` answer's room in `--max-answer-memory`, on its way from the
/// call to the response's body.
#[derive(Clone)]
struct AnswerRoom(Arc<Room>);

/// What bounds a gRPC client.
#[derive(Debug, Clone)]
pub struct GrpcLimits {
    /// Largest decoded request message, as `--max-frame` bounds a TCP frame.
    pub max_message: usize,
    /// What one `Msg` or query may carry (`--max-events-per-msg`, `--max-tags`,
    /// `--max-attributes`, `--max-string`).
    pub per_message: Limits,
    /// Connections open at once; more are closed at once.
    pub max_connections: usize,
    /// A connection whose client reads nothing for this long is closed.
    pub write_timeout: Duration,
    /// A connection whose client sends nothing for this long after opening it,
    /// or leaves a keepalive ping unanswered this long, is closed.
    pub read_timeout: Duration,
    /// Room for large messages, shared with the other transports
    /// ([`Server::memory`](crate::server::Server::memory)); `None`: a budget
    /// of its own, of [`budget::DEFAULT_MAX`].
    pub memory: Option<Budget>,
    /// Peers whose `x-forwarded-for` names the client that subscriptions
    /// are charged to and cut with ([`crate::forwarded`]).
    pub trusted_proxies: TrustedProxies,
}

/// A running gRPC listener; [`Grpc::shutdown`] stops it.
pub struct Grpc {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Grpc {
    /// Binds `addr` and serves within `limits`: [`Grpc::bind`], then
    /// [`Grpc::serve`].
    pub async fn start(
        addr: SocketAddr,
        limits: GrpcLimits,
        index: Arc<Index>,
        streams: Arc<dyn Streams>,
        clock: SharedClock,
        stats: Arc<Stats>,
        cluster: Option<Arc<Cluster>>,
    ) -> io::Result<Grpc> {
        let listener = Grpc::bind(addr).await?;
        Grpc::serve(listener, limits, index, streams, clock, stats, cluster)
    }

    /// Binds `addr`, serving nothing yet (see [`crate::server`]).
    pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
        bind_tcp("--grpc", addr).await
    }

    /// Serves `listener` within `limits`. With a cluster, events go to
    /// JetStream and `Query` and `Subscribe` cover every node.
    pub fn serve(
        listener: TcpListener,
        limits: GrpcLimits,
        index: Arc<Index>,
        streams: Arc<dyn Streams>,
        clock: SharedClock,
        stats: Arc<Stats>,
        cluster: Option<Arc<Cluster>>,
    ) -> io::Result<Grpc> {
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let bounds = Bounds::new(
            limits.max_connections,
            limits.read_timeout,
            limits.write_timeout,
            stats.clone(),
            Counters::GRPC,
        );
        let memory =
            (limits.memory).unwrap_or_else(|| Budget::new(budget::DEFAULT_MAX, stats.clone()));
        // A large message holds its room at most this long while it arrives.
        let (message_timeout, max_message) = (limits.read_timeout, limits.max_message);
        let refusals = stats.clone();
        // A call's answer (or stream) its client leaves unread while
        // reading the connection is dropped: see `crate::unread`.
        let unread = Unread::start(limits.write_timeout, stats.clone(), |s| {
            &s.grpc_responses_unread
        });
        let service = pb::vigil_server::VigilServer::new(Service(Arc::new(Shared {
            index,
            streams,
            clock,
            stats,
            limits: limits.per_message,
            shutdown: shutdown.clone(),
            cluster,
            trusted_proxies: limits.trusted_proxies,
        })))
        .max_decoding_message_size(limits.max_message);
        // Accepted as the other listeners do: a failed accept (out of file
        // descriptors) is logged and retried after a pause. Handed to tonic,
        // it was retried at once, spinning a core and starving the rest.
        let accepted = stream::unfold(listener, |listener| async {
            let accepted = crate::tcp::accept(&listener, "grpc").await;
            Some((accepted, listener))
        });
        let incoming = accepted.filter_map(move |(io, peer)| {
            // Acks and subscription events are small writes that should not wait for Nagle.
            if let Err(e) = io.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "Could not set TCP_NODELAY.");
            }
            let admitted = bounds.admit(io, peer);
            std::future::ready(admitted.map(|io| Ok::<_, io::Error>(io.watched())))
        });
        // A peer that vanished without closing leaves an idle HTTP/2
        // connection no write ever fails on: a ping it cannot answer ends it.
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(MAX_STREAMS)
            .http2_keepalive_interval(Some(limits.read_timeout))
            .http2_keepalive_timeout(Some(limits.read_timeout))
            .layer(MapRequestLayer::new(move |request: http::Request<Body>| {
                let gated = |body| {
                    gate::gated(
                        body,
                        &memory,
                        message_timeout,
                        max_message,
                        refusals.clone(),
                    )
                };
                request.map(|body| Body::new(gated(body)))
            }))
            .layer(MapResponseLayer::new(
                move |mut response: http::Response<Body>| {
                    let room =
                        (response.extensions_mut().remove::<AnswerRoom>()).map(|room| room.0);
                    // One holding room must be sent whole within the write
                    // timeout, not read a frame per timeout for hours.
                    let large = room.as_ref().is_some_and(|room| room.takes_room());
                    response.map(|body| {
                        let held = Holding::new(body, room);
                        Body::new(match large {
                            true => unread.watch_whole(held),
                            false => unread.watch(held),
                        })
                    })
                },
            ))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
        let task = tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "gRPC server failed.");
            }
        });
        Ok(Grpc {
            addr,
            shutdown,
            task,
        })
    }

    /// Ends every open stream, stops accepting and waits (up to `grace`) for
    /// the calls in flight to finish: a client still taking its answer (or
    /// the end of its subscription) is not waited for longer.
    pub async fn shutdown(self, grace: Duration) {
        self.shutdown.cancel();
        if tokio::time::timeout(grace, self.task).await.is_err() {
            tracing::warn!(
                ?grace,
                "gRPC calls still running after the shutdown grace period; not waiting for them."
            );
        }
    }
}
