//! Scale-out across machines (`vigil run --cluster nats://…`), over NATS
//! JetStream. See `README.md` beside this file for the whole design.
//!
//! - Ingest: every node accepts agent traffic; a `Msg`'s events are grouped by
//!   shard (a fixed FNV-1a hash of the host, so every node agrees) and each
//!   group is published as one protobuf `Msg` to `vigil.events.<shard>`,
//!   coalesced with other senders' events for the shard ([`batcher`]). The
//!   agent is acked only once JetStream has stored every group.
//! - Ownership ([`ownership`]): each shard is leased by one live node through a
//!   KV bucket with a TTL; the owner replays and then follows its shards through
//!   the local rules and index, so all state for a host lives on one node.
//! - Queries: any node fans a query out on `vigil.query` and merges the answers.
//! - Subscriptions ([`feed`]): owners forward index changes to the nodes whose
//!   subscribers want them, only while some node declared interest.
//!
//! Without `--cluster` none of this runs and nothing else changes.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::jetstream::context::{
    CreateStreamError, CreateStreamErrorKind, GetStreamErrorKind,
};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::answers::{Busy, Room};
use crate::bounded::LogGate;
use crate::clock::{Micros, MonotonicClock, SharedClock};
use crate::event::Event;
use crate::index::{Index, Notices, QueryError, Sizing};
use crate::outputs::holds::{self, Holds, Work};
use crate::proto::{self, Msg};
use crate::pubsub::Pubsub;
use crate::query::Query;
use crate::stats::Stats;
use crate::streams::Streams;

pub mod batcher;
pub mod feed;
pub mod lease;
pub mod ownership;

/// The JetStream stream that holds every shard's events.
pub const STREAM: &str = "VIGIL_EVENTS";
/// Shard `n`'s events are published to `vigil.events.<n>`.
pub const SUBJECT_PREFIX: &str = "vigil.events";
/// Where queries are fanned out; every node answers from its own index.
pub const QUERY_SUBJECT: &str = "vigil.query";

/// A NATS or JetStream call that failed, and what it was for. The cause is
/// part of the message, so a log line with `%error` says all of it.
#[derive(Debug, thiserror::Error)]
#[error("{doing}: {cause}")]
pub struct NatsError {
    doing: String,
    cause: async_nats::Error,
}

/// Adds what a NATS call was for to its error.
pub(crate) trait Doing<T> {
    fn doing(self, doing: impl Into<String>) -> Result<T, NatsError>;
}

impl<T, E: Into<async_nats::Error>> Doing<T> for Result<T, E> {
    fn doing(self, doing: impl Into<String>) -> Result<T, NatsError> {
        self.map_err(|cause| NatsError {
            doing: doing.into(),
            cause: cause.into(),
        })
    }
}

/// Gets the stream `config` names, creating it when missing. Nodes started
/// at once on a fresh NATS each find it missing and create it, and the
/// server can refuse a create because another node's stream now holds the
/// subjects (seen once: "subjects overlap with an existing stream"): the
/// stream is then got instead. So is one made meanwhile with other
/// settings ("stream name already in use with a different
/// configuration"), as one found at once would be: not checked here.
pub(crate) async fn get_or_create_stream(
    js: &jetstream::Context,
    config: stream::Config,
) -> Result<stream::Stream, async_nats::Error> {
    let name = config.name.clone();
    let created = js.get_or_create_stream(config).await;
    let get = || async {
        match js.get_stream(&name).await {
            Ok(stream) => Ok(Some(stream)),
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(e)
                    if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    };
    found_if_made_meanwhile(created, get).await
}

/// Gets of a stream another node made meanwhile, [`MADE_MEANWHILE_PAUSE`]
/// apart: a NATS cluster may answer the create before every server shows
/// the stream.
const MADE_MEANWHILE_TRIES: u32 = 5;
const MADE_MEANWHILE_PAUSE: Duration = Duration::from_millis(200);

/// What a create that raced another node's comes to: the stream `get`
/// finds (`None`: not found yet) when the server refused the create
/// because the stream, or another with its subjects, exists; otherwise the
/// create's own result. Bounded: not found after [`MADE_MEANWHILE_TRIES`]
/// gets, it is the create's error.
async fn found_if_made_meanwhile<T, F>(
    created: Result<T, CreateStreamError>,
    mut get: impl FnMut() -> F,
) -> Result<T, async_nats::Error>
where
    F: Future<Output = Result<Option<T>, async_nats::Error>>,
{
    use jetstream::ErrorCode;
    let refused = match created {
        Ok(stream) => return Ok(stream),
        Err(e) => e,
    };
    let exists = match refused.kind() {
        CreateStreamErrorKind::JetStream(e) => [
            ErrorCode::STREAM_SUBJECT_OVERLAP,
            ErrorCode::STREAM_NAME_EXIST,
        ]
        .contains(&e.error_code()),
        _ => false,
    };
    if !exists {
        return Err(refused.into());
    }
    for _ in 0..MADE_MEANWHILE_TRIES {
        if let Some(stream) = get().await? {
            tracing::debug!(error = %refused, "Another node created the stream meanwhile; using it.");
            return Ok(stream);
        }
        tokio::time::sleep(MADE_MEANWHILE_PAUSE).await;
    }
    Err(refused.into())
}

/// What `vigil run --cluster …` configures.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS server URL(s), comma-separated.
    pub url: String,
    /// Unique among the live nodes: it names this node's leases and heartbeat.
    pub node_id: String,
    /// Number of shards; every node of a cluster must use the same.
    pub shards: u32,
    /// How long JetStream keeps events: a taker-over replays this much history,
    /// so it must cover the longest TTL or window in the rules.
    pub retention: Duration,
    /// A lease (and a heartbeat) not renewed for this long lapses.
    pub lease_ttl: Duration,
    /// How often leases and the heartbeat are renewed (and shards rebalanced).
    pub renew: Duration,
    /// How long a fanned-out query waits for the other nodes' answers.
    pub query_timeout: Duration,
}

/// The stable shard of a host: FNV-1a (fixed, unlike Rust's seeded hasher),
/// so every node and every restart agrees. A missing host is the empty one.
pub fn shard_of(host: &str, shards: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in host.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(shards.max(1))) as u32
}

fn subject(shard: u32) -> String {
    format!("{SUBJECT_PREFIX}.{shard}")
}

/// A running cluster membership: publishes ingest, fans out queries.
/// Why a node cut off from NATS cannot answer a query.
const NOT_CONNECTED_TO_ASK: &str =
    "not connected to NATS: this node cannot ask the cluster; query another node, or later";

pub struct Cluster {
    config: ClusterConfig,
    /// A random nonce of this process, in its heartbeat: another process
    /// with the same `--node-id` writes another.
    instance: String,
    client: async_nats::Client,
    js: jetstream::Context,
    /// Publishes ingest per shard, coalescing concurrent senders.
    batcher: Arc<batcher::Batcher>,
    /// Live nodes as of the last heartbeat round: how many answers a query waits for.
    members: AtomicUsize,
    index: Arc<Index>,
    /// This node's cluster-wide subscribers (see [`feed`]).
    feed: Arc<Pubsub>,
    /// Local lease deadlines and paused expiry, per shard.
    leases: Arc<lease::Leases>,
    /// The `now` of the last index expiry pass: entries of live shards whose
    /// TTL ran out before it have been expired here. Saved with progress.
    expired_until: AtomicI64,
    /// When this node last began reaching NATS (wall time): its first
    /// heartbeat, or its first after a failed one. Entries of a shard it
    /// takes over that ran out before then were silent for want of NATS.
    reaching_since: AtomicI64,
    /// The work this node's undelivered pages came from: progress is saved
    /// only up to before it, so the next owner pages it again.
    holds: Arc<Holds>,
    /// While NATS is down every message of every agent is refused: warned
    /// about at most every 10 s.
    not_stored_log: LogGate,
    /// Why this node stepped down, once another process took its id over
    /// ([`Cluster::stepped_down`]).
    taken_over: std::sync::OnceLock<ownership::DuplicateNodeId>,
    stepping_down: CancellationToken,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.config.node_id)
            .field("shards", &self.config.shards)
            .finish_non_exhaustive()
    }
}

/// The cluster's background tasks; [`Running::shutdown`] hands this node's
/// shards back before it goes.
pub struct Running {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        let all = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                ?grace,
                "Cluster tasks still running after the grace period."
            );
        }
    }
}

impl Cluster {
    /// Connects, makes sure the stream and the KV buckets exist and that the
    /// live nodes run with the same `--shards`, then starts the query
    /// responder and the ownership loop. A NATS that does not answer at start
    /// is an error naming its URL and why (connecting in the background
    /// instead only failed later, as a JetStream timeout naming neither);
    /// once connected, the node reconnects for ever.
    /// `streams` is the local pipeline the owned shards are fed through;
    /// `holds`, what its pager outputs have not delivered yet.
    pub async fn start(
        config: ClusterConfig,
        index: Arc<Index>,
        streams: Arc<dyn Streams>,
        clock: SharedClock,
        holds: Arc<Holds>,
    ) -> Result<(Arc<Cluster>, Running), NatsError> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("vigil-{}", config.node_id))
            // Reconnect for ever: a NATS restart must not end the node.
            .max_reconnects(None)
            .connect(config.url.as_str())
            .await
            .doing(format!("connecting to NATS at {}", config.url))?;
        let js = jetstream::new(client.clone());
        let events_config = stream::Config {
            name: STREAM.to_owned(),
            subjects: vec![format!("{SUBJECT_PREFIX}.*")],
            max_age: config.retention,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let events = get_or_create_stream(&js, events_config.clone())
            .await
            .doing("creating the JetStream events stream")?;
        // The stream is the cluster's: a node started with another
        // --cluster-retention changes it for every node (how a rolling
        // restart changes it), which the log must say.
        let stream_retention = events.cached_info().config.max_age;
        if stream_retention != config.retention {
            tracing::warn!(
                from = ?stream_retention,
                to = ?config.retention,
                "--cluster-retention differs from the events stream's: changing the retention for every node of the cluster. Events older than it are deleted, and a node taking a shard over rebuilds it from what is left."
            );
            js.update_stream(events_config)
                .await
                .doing("updating the events stream's retention")?;
        }
        let buckets = ownership::Buckets::open(&js, &config).await?;
        buckets.check_shards(&config).await?;
        let instance = format!("{:016x}", rand::random::<u64>());
        let beat = buckets.check_node_id(&config, &instance).await?;
        let shards = config.shards;
        holds.set_sharding(Box::new(move |page| shard_of(page.host_str(), shards)));
        let leases = Arc::new(lease::Leases::new(
            Arc::new(MonotonicClock::default()),
            config.shards,
            config.lease_ttl,
        ));
        // A page in flight is cut at its shard's local lease deadline, which
        // passes before another node can take the lease.
        let lease_left = Arc::clone(&leases);
        holds.set_lease_left(Box::new(move |shard| lease_left.remaining(shard)));
        // The rules' topics are this node's, but their subscribers count
        // beside its other subscribers, in the feed's bounds and metrics.
        let feed = Pubsub::bounded(index.pubsub().max_held(), index.pubsub().share());
        index.publish_topics_on(feed.clone());
        let cluster = Arc::new(Cluster {
            instance,
            client,
            batcher: Arc::new(batcher::Batcher::new(js.clone(), config.shards)),
            js,
            members: AtomicUsize::new(1),
            feed,
            index,
            leases,
            expired_until: AtomicI64::new(0),
            reaching_since: AtomicI64::new(0),
            holds,
            not_stored_log: LogGate::default(),
            taken_over: std::sync::OnceLock::new(),
            stepping_down: CancellationToken::new(),
            config,
        });
        let stop = CancellationToken::new();
        let responder = cluster
            .client
            .subscribe(QUERY_SUBJECT)
            .await
            .doing("subscribing to cluster queries")?;
        let interests = cluster
            .client
            .subscribe(feed::INTEREST_SUBJECT)
            .await
            .doing("subscribing to subscription interests")?;
        let changes = cluster
            .client
            .subscribe(feed::changes_subject(&cluster.config.node_id))
            .await
            .doing("subscribing to forwarded changes")?;
        let tasks = vec![
            tokio::spawn(answer_queries(cluster.clone(), responder, stop.clone())),
            tokio::spawn(feed::tap(cluster.clone(), interests, stop.clone())),
            tokio::spawn(feed::receive(cluster.clone(), changes, stop.clone())),
            tokio::spawn(feed::announce(cluster.clone(), stop.clone())),
            tokio::spawn(ownership::run(
                cluster.clone(),
                buckets,
                beat,
                streams,
                clock,
                stop.clone(),
            )),
        ];
        tracing::info!(
            node = %cluster.config.node_id,
            shards = cluster.config.shards,
            url = %cluster.config.url,
            "Joined the cluster."
        );
        Ok((cluster, Running { stop, tasks }))
    }

    /// Publishes `events` (grouped per shard) and returns once JetStream has
    /// stored them all: only then may the agent be acked.
    /// Whether this node's NATS connection is up now.
    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Counts a message whose events the cluster did not store (its sender
    /// was told to send them again), and warns about it unless it warned
    /// within the last 10 s.
    pub fn not_stored(&self, transport: &str, error: &str, stats: &Stats) {
        Stats::incr(&stats.cluster_not_stored);
        if self.not_stored_log.open() {
            tracing::warn!(
                transport,
                error,
                refused_since_start = Stats::get(&stats.cluster_not_stored),
                "Events not acked: the cluster did not store them (warned at most every 10 s; \
                 counted in vigil_cluster_not_stored_total)."
            );
        }
    }

    pub async fn publish(&self, events: &[Event]) -> Result<(), String> {
        self.send(events).await
    }

    /// Queues `events` for JetStream, in parts per shard of at most
    /// [`batcher::MAX_MESSAGE_BYTES`] (NATS refuses a message over its
    /// `max_payload`, 1 MiB by default, and closes the connection on it), and
    /// returns what resolves once JetStream has stored them all. Split from
    /// the wait so a connection can send the next frames before this one's
    /// acks arrive. An event that alone is over `max_payload` fails them all,
    /// before any is sent.
    pub fn send(
        &self,
        events: &[Event],
    ) -> impl Future<Output = Result<(), String>> + Send + 'static {
        let mut groups: HashMap<u32, Vec<(Msg, usize)>> = HashMap::new();
        // Cut off, a publish would wait out JetStream's ack timeout (5 s) per
        // request: an agent retrying, or failing over to another node, is
        // told at once instead.
        let connected = self.connected();
        let mut refused = (!connected).then(|| {
            "not connected to NATS: nothing was stored; send again (to another node, or later)"
                .to_owned()
        });
        for (i, event) in events.iter().enumerate().take_while(|_| connected) {
            let pb = proto::to_pb(event);
            // As a field of a `Msg`: its key, its length, the event.
            let len = pb.encoded_len();
            let len = 1 + prost::length_delimiter_len(len) + len;
            // The server's INFO is a copy of a dozen strings: read only for an
            // event over a part's size, since parts assume a `max_payload`
            // of at least that (NATS's default is twice it).
            let max_payload =
                (len > batcher::MAX_MESSAGE_BYTES).then(|| self.client.server_info().max_payload);
            if let Some(max_payload) = max_payload.filter(|&max| len > max) {
                refused = Some(format!(
                    "event {i} takes {len} bytes, over the cluster's NATS max_payload of {max_payload} bytes"
                ));
                break;
            }
            let parts = (groups.entry(shard_of(event.host_str(), self.config.shards))).or_default();
            match parts.last_mut() {
                Some((msg, bytes)) if *bytes + len <= batcher::MAX_MESSAGE_BYTES => {
                    msg.events.push(pb);
                    *bytes += len;
                }
                _ => parts.push((
                    Msg {
                        events: vec![pb],
                        ..Msg::default()
                    },
                    len,
                )),
            }
        }
        let stored: Vec<_> = match refused {
            Some(_) => Vec::new(),
            None => (groups.into_iter())
                .flat_map(|(shard, parts)| parts.into_iter().map(move |part| (shard, part)))
                .map(|(shard, (msg, _))| {
                    let part = Bytes::from(msg.encode_to_vec());
                    self.batcher.enqueue(shard, part)
                })
                .collect(),
        };
        async move {
            if let Some(refused) = refused {
                return Err(refused);
            }
            for part in stored {
                part.await
                    .map_err(|_| "cluster publisher stopped".to_owned())??;
            }
            Ok(())
        }
    }

    /// Runs `query` on every live node (this one included) and merges the
    /// answers: one event per `(host, service)`, the latest by time. A node
    /// that does not answer within the timeout is left out (and logged).
    /// The merged answer takes its room in `--max-answer-memory` as it is
    /// collected, `bytes` an event at least (as [`Index::answer_then`]'s
    /// scan does), and comes with it, to be fitted to the answer once made
    /// and held until written ([`Room::hold`]). Refused as busy, the replies
    /// dropped, once the pool has no room for it, or when a node's own pool
    /// had none for its part. Given up (refused, timed out, or this future
    /// dropped), the other nodes are told to stop answering it.
    pub async fn query(
        &self,
        query: &Query,
        bytes: Sizing,
    ) -> Result<(Vec<Event>, Room), ClusterQueryError> {
        let failed = |e: &dyn fmt::Display| {
            ClusterQueryError::Unavailable(format!("cluster query failed: {e}"))
        };
        // Cut off, the question would wait out the answer timeout and read
        // as if no other node were up.
        if !self.connected() {
            return Err(ClusterQueryError::Unavailable(
                NOT_CONNECTED_TO_ASK.to_owned(),
            ));
        }
        let inbox = self.client.new_inbox();
        let mut replies = (self.client.subscribe(inbox.clone()).await).map_err(|e| failed(&e))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(ASKER, self.config.node_id.as_str());
        self.client
            .publish_with_reply_and_headers(
                QUERY_SUBJECT,
                inbox.clone(),
                headers,
                Bytes::from(query.as_str().to_owned()),
            )
            .await
            .map_err(|e| failed(&e))?;
        let mut asking = Asking {
            client: self.client.clone(),
            inbox: Some(inbox.clone()),
        };
        // Back through NATS, it shows the server passes this node's messages
        // on: a stopped server, or a partition without a reset, still looks
        // connected, and the asker's own part alone would pass for the
        // cluster's answer.
        let mut echo = async_nats::HeaderMap::new();
        echo.insert(ECHO, "1");
        (self.client.publish_with_headers(inbox, echo, Bytes::new()))
            .await
            .map_err(|e| failed(&e))?;
        let expected = self.members.load(Ordering::Relaxed).max(1);
        let collected = self.collect(query, bytes, &mut replies, expected).await;
        match &collected {
            Ok((_, answered)) if *answered == expected => asking.done(),
            _ => asking.give_up().await,
        }
        let (merged, _) = collected?;
        // Each node kept within the limit; together they may not have.
        if let Some(limit) = self.index.max_query_results()
            && merged.events.len() > limit
        {
            return Err(QueryError::TooMany { limit }.into());
        }
        Ok((merged.events.into_values().collect(), merged.room))
    }

    /// This node's part of `query`, scanned straight into the merge's room,
    /// then the other nodes' answers from `replies` until `expected` nodes
    /// answered (this one included) or the timeout: the merge and how many
    /// answered. The answering side skips this node's own request: its part
    /// held there until handed to NATS, and again in the merge as it came
    /// back, an answer larger than the pool was refused as busy on an idle
    /// cluster now and then (1 query in 20 on two nodes).
    async fn collect(
        &self,
        query: &Query,
        bytes: Sizing,
        replies: &mut async_nats::Subscriber,
        expected: usize,
    ) -> Result<(Merged, usize), ClusterQueryError> {
        // Its wait for a scan turn bounded as the other nodes' answers are:
        // with every turn taken it waited for ever.
        let patience = self.config.query_timeout;
        let mut merged = own_part(&self.index, query, bytes, patience).await?;
        let (mut answered, mut echoed) = (1, false);
        let deadline = tokio::time::sleep(self.config.query_timeout);
        tokio::pin!(deadline);
        while answered < expected {
            let reply = tokio::select! {
                reply = replies.next() => reply,
                () = &mut deadline => {
                    tracing::warn!(answered, expected, "Cluster query timed out waiting for nodes.");
                    break;
                }
            };
            let Some(reply) = reply else { break };
            // A node's answer may come in parts; only its last one counts it in.
            let header = |name| reply.headers.as_ref().and_then(|h| h.get(name));
            if header(ECHO).is_some() {
                echoed = true;
                continue;
            }
            if header(MORE).is_none() {
                answered += 1;
            }
            if let Some(limit) = header(TOO_MANY).and_then(|l| l.as_str().parse().ok()) {
                return Err(QueryError::TooMany { limit }.into());
            }
            if let Some(max) = header(BUSY).and_then(|m| m.as_str().parse().ok()) {
                return Err(QueryError::Busy(Busy { max }).into());
            }
            let again = header(AGAIN).is_some();
            let msg = Msg::decode(reply.payload).map_err(|e| {
                ClusterQueryError::Unavailable(format!("bad cluster query answer: {e}"))
            })?;
            if msg.ok != Some(true) {
                let why = msg.error.unwrap_or_default();
                return Err(match again {
                    true => ClusterQueryError::Again(why),
                    false => ClusterQueryError::Unavailable(why),
                });
            }
            (merged.add(msg.events.into_iter().map(|pb| proto::from_pb(pb, 0))))
                .map_err(|busy| ClusterQueryError::Refused(busy.into()))?;
        }
        if answered < expected && !echoed {
            return Err(ClusterQueryError::Unavailable(
                "no cluster node answered the query: NATS did not pass on this node's own message"
                    .to_owned(),
            ));
        }
        Ok((merged, answered))
    }

    /// The index expiry pass in cluster mode: entries of shards whose expiry
    /// is paused (replaying, handed back, past the lease deadline) stay; the
    /// rest expire through `emit` as on a single node. What it pages holds
    /// the expiry's saved progress back until delivered.
    pub fn expire(&self, now: Micros, mut emit: impl FnMut(Notices<'_>)) -> usize {
        let shards = self.config.shards;
        let may_expire = |host: &str| self.leases.may_expire(shard_of(host, shards));
        let work = Work::Expiry {
            since: self.expired_until(),
        };
        let emit = |notices: Notices<'_>| holds::made_by(work, || emit(notices));
        let expired = self.index.expire_where(now, may_expire, emit);
        self.expired_until.store(now, Ordering::Release);
        expired
    }

    /// Another process with this node's id rewrote its heartbeat (this one
    /// was taken for dead): its shards were handed back, and it owns none
    /// from now on. Returns once so, with why: the process then stops, as
    /// one refused at start does.
    pub async fn stepped_down(&self) -> &ownership::DuplicateNodeId {
        self.stepping_down.cancelled().await;
        self.taken_over.get().expect("set before the token")
    }

    fn step_down(&self, taken: ownership::DuplicateNodeId) {
        let _ = self.taken_over.set(taken);
        self.stepping_down.cancel();
    }

    fn expired_until(&self) -> Micros {
        self.expired_until.load(Ordering::Acquire)
    }

    fn reaching_since(&self) -> Micros {
        self.reaching_since.load(Ordering::Acquire)
    }

    fn set_members(&self, live: usize) {
        self.members.store(live, Ordering::Relaxed);
    }

    /// This node's part in the cluster now, for `/health` and the metrics.
    pub fn status(&self) -> ClusterStatus {
        ClusterStatus {
            connected: self.connected(),
            members: self.members.load(Ordering::Relaxed) as u64,
            shards_owned: (0..self.config.shards)
                .filter(|&shard| self.leases.valid(shard))
                .count() as u64,
        }
    }
}

/// A node's part in the cluster ([`Cluster::status`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterStatus {
    /// Connected to NATS: without it, nothing this node takes in can be
    /// stored, and it runs no shard for long.
    pub connected: bool,
    /// Live nodes, this one included, as of the last heartbeat round.
    pub members: u64,
    /// Shards whose lease this node holds.
    pub shards_owned: u64,
}

/// The nodes' answers to a query merged as they come, its room in
/// `--max-answer-memory` grown with it: held uncounted, the answers of N
/// nodes to a query of a big index took N times what the pool bounds.
struct Merged {
    events: HashMap<(Option<String>, Option<String>), Event>,
    /// What the merged events take in the answer, by `sizing`.
    bytes: usize,
    sizing: Sizing,
    room: Room,
}

impl Merged {
    fn new(room: Room, sizing: Sizing) -> Merged {
        Merged {
            events: HashMap::new(),
            bytes: 0,
            sizing,
            room,
        }
    }

    /// Keeps the latest by time of each `(host, service)`, then grows the
    /// room to what is kept: refused (counted) when the pool has none.
    fn add(&mut self, events: impl IntoIterator<Item = Event>) -> Result<(), Busy> {
        self.insert(events);
        self.room.grow(self.bytes)
    }

    /// [`Merged::add`] without growing the room.
    fn insert(&mut self, events: impl IntoIterator<Item = Event>) {
        for event in events {
            let key = (event.host.clone(), event.service.clone());
            match self.events.entry(key) {
                Entry::Occupied(mut kept) => {
                    if kept.get().time < event.time {
                        self.bytes -= (self.sizing)(kept.get());
                        self.bytes += (self.sizing)(&event);
                        kept.insert(event);
                    }
                }
                Entry::Vacant(slot) => {
                    self.bytes += (self.sizing)(&event);
                    slot.insert(event);
                }
            }
        }
    }
}

/// This node's part of `query`, merged on the blocking thread that scanned
/// it, in the room its scan took; refused when no scan turn comes within
/// `patience`. Merged on the async worker, the 100 000 events of a whole
/// part held it for 240–400 ms (debug build), where the other nodes' parts
/// come a thousand events at a time.
async fn own_part(
    index: &Arc<Index>,
    query: &Query,
    bytes: Sizing,
    patience: Duration,
) -> Result<Merged, QueryError> {
    let answers = index.answers().clone();
    let (mut merged, room) = (index.answer_within(query, bytes, patience, move |found| {
        // No room of its own: the scan's, which holds every event found,
        // replaces it.
        let mut merged = Merged::new(answers.room(), bytes);
        merged.insert(found);
        merged
    }))
    .await?;
    merged.room = room;
    merged.room.grow(merged.bytes)?;
    Ok(merged)
}

/// A query this node asked, until it has every answer: given up before
/// (refused, timed out, or its asker gone), the other nodes are told, so
/// they stop scanning and sending parts nobody merges and their
/// `--max-answer-memory` comes back. Not told, a node kept answering an
/// asker that had already refused as busy, and refused its own askers as
/// busy meanwhile (1.9 s for a 12 MB answer).
struct Asking {
    client: async_nats::Client,
    /// The reply inbox that names the query; taken once told or done.
    inbox: Option<String>,
}

impl Asking {
    fn done(&mut self) {
        self.inbox = None;
    }

    /// Tells the nodes, in order after the question on the same subject, so
    /// a node that has not begun its answer yet skips it.
    async fn give_up(&mut self) {
        if let Some(inbox) = self.inbox.take() {
            tell_given_up(&self.client, inbox).await;
        }
    }
}

impl Drop for Asking {
    /// The asking future dropped (its client went away): told from a task.
    /// The task holds no `Asking`: a runtime shutting down drops a task as
    /// it is spawned, and one dropping an `Asking` spawned the next, until
    /// the stack overflowed.
    fn drop(&mut self) {
        let Some(inbox) = self.inbox.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        runtime.spawn(async move { tell_given_up(&client, inbox).await });
    }
}

/// Publishes the give-up of the query whose reply inbox is `inbox`.
async fn tell_given_up(client: &async_nats::Client, inbox: String) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(ABANDONED, inbox.as_str());
    let told = (client.publish_with_headers(QUERY_SUBJECT, headers, Bytes::new())).await;
    if let Err(e) = told {
        tracing::debug!(error = %e, "Could not tell the nodes a query was given up.");
    }
}

/// Requests read ahead while one is answered, to see whether its asker
/// gave it up; one more is refused at once ([`refuse_waiting`]).
const READ_AHEAD: usize = 1024;

/// Bytes of requests read ahead at most, a request counted by its query:
/// NATS lets any client send 1 MB ones, and [`READ_AHEAD`] of those held
/// 1 GB outside every budget; a query is rarely over a few hundred bytes.
const READ_AHEAD_BYTES: usize = 1 << 20;

/// Answers `vigil.query` from this node's own index, one request at a
/// time, except this node's own (its asker scans that part itself). The
/// requests are read on while one is answered: one its asker gave up is
/// dropped (its scan stopped, its room given back), and one queued behind
/// is skipped. Reading never stops, so a give-up is always seen: with
/// [`READ_AHEAD`] requests or [`READ_AHEAD_BYTES`] queued, a further one
/// is refused instead.
/// (Reading stopped there, and the current answer's give-up waited behind
/// the queued requests until the answer was sent whole.)
async fn answer_queries(
    cluster: Arc<Cluster>,
    mut requests: async_nats::Subscriber,
    stop: CancellationToken,
) {
    let mut queued: VecDeque<async_nats::Message> = VecDeque::new();
    let mut queued_bytes = 0;
    loop {
        let request = match queued.pop_front() {
            Some(request) => {
                queued_bytes -= request.payload.len();
                request
            }
            None => tokio::select! {
                request = requests.next() => match request {
                    Some(request) => request,
                    None => return,
                },
                () = stop.cancelled() => return,
            },
        };
        // A give-up for a query answered already, or asked by a node before
        // this one started, has no reply.
        let Some(reply) = request.reply.clone() else {
            continue;
        };
        if header_of(&request, ASKER) == Some(cluster.config.node_id.as_str()) {
            continue;
        }
        let answering = answer(&cluster, request, reply.clone());
        tokio::pin!(answering);
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                // First, so a flood of requests cannot starve it.
                () = &mut answering => break,
                next = requests.next() => {
                    let Some(next) = next else { return };
                    match header_of(&next, ABANDONED) {
                        Some(inbox) if inbox == reply.as_str() => {
                            tracing::debug!("Stopped answering a cluster query its asker gave up.");
                            break;
                        }
                        Some(inbox) => {
                            queued.retain(|q| {
                                q.reply.as_ref().is_none_or(|r| r.as_str() != inbox)
                            });
                            queued_bytes = queued.iter().map(|q| q.payload.len()).sum();
                        }
                        None if queued.len() < READ_AHEAD
                            && queued_bytes + next.payload.len() <= READ_AHEAD_BYTES =>
                        {
                            queued_bytes += next.payload.len();
                            queued.push_back(next);
                        }
                        None => refuse_waiting(&cluster, next, queued.len(), queued_bytes).await,
                    }
                }
            }
        }
    }
}

/// Refuses `request` at once, `waiting` requests of `bytes` queued already
/// ([`READ_AHEAD`], [`READ_AHEAD_BYTES`]): its asker refuses its query as
/// unavailable, naming this node, rather than waiting out its timeout for
/// an answer that would come late.
async fn refuse_waiting(
    cluster: &Cluster,
    request: async_nats::Message,
    waiting: usize,
    bytes: usize,
) {
    let node = &cluster.config.node_id;
    if header_of(&request, ASKER) == Some(node.as_str()) {
        return;
    }
    let Some(reply) = request.reply else { return };
    Stats::incr(
        &cluster
            .index
            .answers()
            .stats()
            .cluster_queries_refused_waiting,
    );
    let refusal = proto::error_reply(format!(
        "node {node} has {waiting} cluster queries waiting ({bytes} bytes); ask again in a moment"
    ));
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(AGAIN, "1");
    let refused = cluster.client.publish_with_headers(reply, headers, refusal);
    if let Err(e) = refused.await {
        tracing::debug!(error = %e, "Could not refuse a cluster query.");
    }
}

/// The value of header `name` of `message`, if it has it.
fn header_of<'m>(message: &'m async_nats::Message, name: &str) -> Option<&'m str> {
    let headers = message.headers.as_ref()?;
    headers.get(name).map(|value| value.as_str())
}

/// This node's part of the answer to `request`, published to `reply`.
async fn answer(cluster: &Cluster, request: async_nats::Message, reply: async_nats::Subject) {
    let parsed = match std::str::from_utf8(&request.payload) {
        Ok(text) => (Query::parse_off_workers(text).await).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let (node, patience) = (&cluster.config.node_id, answering_patience(&cluster.config));
    // Its room in --max-answer-memory is taken as the scan finds its
    // events, and kept until its parts are handed to NATS.
    let (parts, _room, mut refusal) = match parsed {
        Ok(query) => answered(&cluster.index, &query, node, patience).await,
        Err(e) => (
            vec![proto::error_reply(e)],
            cluster.index.answers().room(),
            None,
        ),
    };
    let last = parts.len() - 1;
    for (i, part) in parts.into_iter().enumerate() {
        let header = if i < last {
            Some((MORE, "1".to_owned()))
        } else {
            refusal.take()
        };
        let sent = match header {
            Some((name, value)) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(name, value.as_str());
                (cluster.client)
                    .publish_with_headers(reply.clone(), headers, part)
                    .await
            }
            None => cluster.client.publish(reply.clone(), part).await,
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "Could not answer a cluster query.");
            break;
        }
    }
}

/// A header marking a refused answer: its name and value.
type Refusal = Option<(&'static str, String)>;

/// How long a node answering another's query waits for a scan turn: a
/// fifth less than its asker waits for its answer (at least the cluster
/// query timeout, counted once its own part is scanned), so the refusal
/// reaches an asker still waiting. Waited for as long, it came about when
/// the asker stopped waiting, which then answered without the node's part
/// (`200` with what the others found) as often as it refused.
fn answering_patience(config: &ClusterConfig) -> Duration {
    config.query_timeout - config.query_timeout / 5
}

/// This node's answer to another node's `query`: its parts, their room in
/// `--max-answer-memory`, and the header of a refusal its asker refuses the
/// same way (over the limit, or busy: the asker's error or a node to ask
/// again, not an unavailable cluster). Its scan turn is waited for no
/// longer than the asker waits for it (`patience`, the cluster query
/// timeout): then refused, counted, as the asker's own part is. Waited
/// for without a bound, a node with every turn taken scanned and sent
/// answers nobody merged any more.
async fn answered(
    index: &Arc<Index>,
    query: &Query,
    node: &str,
    patience: Duration,
) -> (Vec<Bytes>, Room, Refusal) {
    let scanned = index.answer_within(query, proto::approx_bytes, patience, |found| {
        answer_parts(&found)
    });
    match scanned.await {
        Ok((parts, room)) => (parts, room, None),
        Err(e) => {
            let refusal = match &e {
                QueryError::TooMany { limit } => Some((TOO_MANY, limit.to_string())),
                QueryError::Busy(busy) => Some((BUSY, busy.max.to_string())),
                QueryError::NoTurn { .. } => Some((AGAIN, "1".to_owned())),
                _ => None,
            };
            let why = match &e {
                QueryError::NoTurn { .. } => format!("node {node}: {e}"),
                _ => e.to_string(),
            };
            (
                vec![proto::error_reply(why)],
                index.answers().room(),
                refusal,
            )
        }
    }
}

/// Header on a query naming the node that asked it (it answers its own part).
const ASKER: &str = "Vigil-Asker";
/// Header on a message on [`QUERY_SUBJECT`] that gives up the query whose
/// reply inbox it names (see [`Asking`]).
const ABANDONED: &str = "Vigil-Abandoned";
/// Header on the message an asker sends its own reply inbox, to see that
/// NATS passes its messages on (not an answer).
const ECHO: &str = "Vigil-Echo";
/// Header on every part of a query answer but the last.
const MORE: &str = "Vigil-More";
/// Header on a node's refusal of a query matching more than its limit (the
/// value).
const TOO_MANY: &str = "Vigil-Too-Many";
/// Header on a node's refusal of a query as busy: its `--max-answer-memory`
/// (the value, in bytes) had no room for its answer.
const BUSY: &str = "Vigil-Busy";
/// Header on a node's refusal of a query that a moment mends: no scan turn
/// came, or too many questions were waiting ([`ClusterQueryError::Again`]).
const AGAIN: &str = "Vigil-Again";
/// Events per part of a query answer or of forwarded changes; a part is also
/// cut at [`batcher::MAX_MESSAGE_BYTES`] ([`parts`]), under NATS's max
/// payload (1 MiB by default).
const PART_EVENTS: usize = 1000;

/// Why a query across the cluster was not answered with events.
#[derive(Debug, thiserror::Error)]
pub enum ClusterQueryError {
    /// Refused as a single node would: a node's answer, or the merged one,
    /// matched more than the limit, or found no room in a node's
    /// `--max-answer-memory` (the asker's included).
    #[error(transparent)]
    Refused(#[from] QueryError),
    /// NATS, the nodes, or their answers failed.
    #[error("{0}")]
    Unavailable(String),
    /// A node refused its part for a moment (no scan turn came, or too
    /// many questions were waiting): unavailable, to be asked again soon
    /// (HTTP `Retry-After`).
    #[error("{0}")]
    Again(String),
}

/// A query answer split into [`parts`]; at least one, so an empty answer
/// still counts the node in.
fn answer_parts(events: &[Event]) -> Vec<Bytes> {
    if events.is_empty() {
        return vec![proto::events_reply(&[])];
    }
    parts(events, Event::approx_bytes)
        .map(proto::events_reply)
        .collect()
}

/// `events` in runs of at most [`PART_EVENTS`] events and
/// [`batcher::MAX_MESSAGE_BYTES`] by `size` (at least one event each):
/// [`Event::approx_bytes`] is more than an event's encoding, so each run
/// encodes within it.
fn parts<T>(mut events: &[T], size: impl Fn(&T) -> usize) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if events.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let len = (events.iter().take(PART_EVENTS))
            .take_while(|event| {
                bytes += size(event);
                bytes <= batcher::MAX_MESSAGE_BYTES
            })
            .count()
            .max(1);
        let (part, rest) = events.split_at(len);
        events = rest;
        Some(part)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nats_error_says_what_failed_and_why() {
        let refused: Result<(), std::io::Error> = Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        let error = refused
            .doing("connecting to NATS at nats://x:4222")
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "connecting to NATS at nats://x:4222: connection refused"
        );
    }

    /// A create refused by the server with `err_code`, as it answers it.
    fn refused(err_code: u64, description: &str) -> CreateStreamError {
        let answer = serde_json::json!({
            "code": 400, "err_code": err_code, "description": description,
        });
        serde_json::from_value::<jetstream::Error>(answer)
            .unwrap()
            .into()
    }

    /// Nodes started at once both create the stream; the server refused
    /// the later create as overlapping the stream the other just made, and
    /// the node failed to start.
    #[tokio::test(start_paused = true)]
    async fn a_create_refused_for_a_stream_made_meanwhile_gets_that_stream() {
        let overlap = || refused(10065, "subjects overlap with an existing stream");
        let gets = AtomicUsize::new(0);
        let get = || async {
            // Not found at first: a NATS cluster may not show it at once.
            let n = gets.fetch_add(1, Ordering::Relaxed);
            Ok((n == 2).then_some("theirs"))
        };
        assert_eq!(
            found_if_made_meanwhile(Err(overlap()), get).await.unwrap(),
            "theirs"
        );
        assert_eq!(gets.load(Ordering::Relaxed), 3);
        // Never found: bounded, the create's error.
        let never = || async { Ok(None::<&str>) };
        let error = found_if_made_meanwhile(Err(overlap()), never)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("subjects overlap"), "{error}");
        // Refused for another reason: no get, the create's error.
        gets.store(0, Ordering::Relaxed);
        let other = Err(refused(10052, "replicas > 1 not supported"));
        let error = found_if_made_meanwhile(other, get).await.unwrap_err();
        assert!(error.to_string().contains("replicas"), "{error}");
        assert_eq!(gets.load(Ordering::Relaxed), 0);
        assert_eq!(
            found_if_made_meanwhile(Ok("ours"), get).await.unwrap(),
            "ours"
        );
    }

    #[test]
    fn shard_is_stable_and_in_range() {
        // Fixed values: a change here would move every host to another shard.
        assert_eq!(shard_of("", 64), (0xcbf2_9ce4_8422_2325u64 % 64) as u32);
        assert_eq!(shard_of("web1", 64), shard_of("web1", 64));
        for i in 0..1000 {
            assert!(shard_of(&format!("host-{i}"), 7) < 7);
        }
    }

    #[test]
    fn parts_are_cut_at_their_bytes_before_their_count() {
        let event = |description: usize| Event {
            description: Some("d".repeat(description)),
            ..Event::default()
        };
        let large: Vec<Event> = (0..1000).map(|_| event(2000)).collect();
        let lens: Vec<usize> = parts(&large, Event::approx_bytes).map(<[_]>::len).collect();
        assert!(
            lens.len() > 4 && lens.iter().sum::<usize>() == 1000,
            "{lens:?}"
        );
        for part in answer_parts(&large) {
            assert!(part.len() <= batcher::MAX_MESSAGE_BYTES, "{}", part.len());
        }
        let huge = [event(2 * batcher::MAX_MESSAGE_BYTES), event(1)];
        let lens: Vec<usize> = parts(&huge, Event::approx_bytes).map(<[_]>::len).collect();
        assert_eq!(lens, [1, 1], "an event over the bound goes alone");
    }

    #[test]
    fn answers_are_split_into_parts_under_the_payload_limit() {
        assert_eq!(answer_parts(&[]).len(), 1, "an empty answer still answers");
        let events = vec![Event::default(); 2 * PART_EVENTS + 1];
        assert_eq!(answer_parts(&events).len(), 3);
    }

    #[test]
    fn answers_are_merged_latest_first_within_room_taken_as_they_come() {
        use crate::answers::{Answers, FREE};
        let stats = Arc::new(Stats::default());
        let answers = Answers::new(5 * FREE, stats.clone());
        let event = |host: &str, time: Micros, description: usize| Event {
            host: Some(host.to_owned()),
            service: Some("cpu".to_owned()),
            time,
            description: Some("d".repeat(description)),
            ..Event::default()
        };
        let mut merged = Merged::new(answers.room(), proto::approx_bytes);
        merged.add([event("a", 2, 10), event("b", 1, 10)]).unwrap();
        merged.add([event("a", 1, 20), event("b", 3, 30)]).unwrap();
        let mut kept: Vec<_> = (merged.events.values())
            .map(|e| (e.host_str().to_owned(), e.time))
            .collect();
        kept.sort();
        assert_eq!(kept, [("a".to_owned(), 2), ("b".to_owned(), 3)]);
        let sizes =
            proto::approx_bytes(&event("a", 2, 10)) + proto::approx_bytes(&event("b", 3, 30));
        assert_eq!(merged.bytes, sizes, "a replaced event's size is not kept");
        assert_eq!(Stats::get(&stats.answer_bytes_held), 0, "small: no room");
        // Large, it takes room as it comes in.
        merged.add([event("c", 1, 2 * FREE)]).unwrap();
        assert!(Stats::get(&stats.answer_bytes_held) > 2 * FREE as u64);
        // The rest of the pool held by another answer, a further part is
        // refused busy.
        let mut other = answers.room();
        other
            .grow(5 * FREE - Stats::get(&stats.answer_bytes_held) as usize)
            .unwrap();
        let busy = merged.add([event("d", 1, 2 * FREE)]).unwrap_err();
        assert_eq!(busy, Busy { max: 5 * FREE });
        assert_eq!(Stats::get(&stats.answers_refused_busy), 1);
        drop((merged, other));
        assert_eq!(Stats::get(&stats.answer_bytes_held), 0);
    }

    #[test]
    fn replayed_batches_reach_no_output() {
        use crate::outputs::{self, OutputSink};
        let (queue, _delivery) = outputs::queue("pager", 10);
        outputs::suppressed(|| queue.push(Event::default()));
        assert_eq!(queue.queued(), 0);
        queue.push(Event::default());
        assert_eq!(queue.queued(), 1, "outputs are live again afterwards");
    }

    /// Threads [`on_thread`] sized an event on.
    static SIZED_ON: std::sync::Mutex<Vec<std::thread::ThreadId>> =
        std::sync::Mutex::new(Vec::new());

    fn on_thread(event: &Event) -> usize {
        SIZED_ON.lock().unwrap().push(std::thread::current().id());
        proto::approx_bytes(event)
    }

    #[tokio::test]
    async fn the_askers_own_part_is_merged_off_the_async_worker() {
        let index = Arc::new(Index::new(crate::index::IndexConfig::default()));
        for i in 0..10 {
            index.insert(&Event {
                host: Some(format!("host-{i}")),
                ..Event::default()
            });
        }
        let all = Query::parse("true").unwrap();
        let merged = own_part(&index, &all, on_thread, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(merged.events.len(), 10);
        let worker = std::thread::current().id();
        let sized_on = SIZED_ON.lock().unwrap();
        assert_eq!(sized_on.len(), 20, "by the scan, then by the merge");
        assert!(
            !sized_on.contains(&worker),
            "merged on the async worker: {sized_on:?}"
        );
    }

    /// The asker's own part waits for a scan turn as long as the other
    /// nodes' answers are waited for, then refuses saying why: with every
    /// turn taken it waited for ever.
    #[tokio::test(start_paused = true)]
    async fn the_askers_own_part_waits_for_a_scan_turn_no_longer_than_the_query_timeout() {
        let index = Arc::new(Index::new(crate::index::IndexConfig::default()));
        index.insert(&Event::default());
        let all = Query::parse("true").unwrap();
        let waited = Duration::from_secs(2);
        let turns = index.take_every_scan_turn().await;
        let part = own_part(&index, &all, proto::approx_bytes, waited);
        // Virtual time: the bound the test gives it, not the wall clock's.
        let refused = tokio::time::timeout(2 * waited, part).await;
        let refused = refused.expect("still waiting for a turn").err();
        assert_eq!(
            refused,
            Some(QueryError::NoTurn {
                waited,
                costly: false
            })
        );
        let stats = index.answers().stats();
        assert_eq!(Stats::get(&stats.cluster_queries_refused_no_turn), 1);
        assert!(
            refused.unwrap().to_string().contains("every scan turn"),
            "says why"
        );
        drop(turns);
        let part = own_part(&index, &all, proto::approx_bytes, waited).await;
        assert_eq!(part.map(|merged| merged.events.len()).ok(), Some(1));
    }

    /// The answering side waits for a scan turn no longer than its
    /// patience (a fifth less than its asker waits for its answer), then
    /// refuses saying why, counted: it waited for ever, and then scanned
    /// and sent an answer nobody merged.
    #[tokio::test(start_paused = true)]
    async fn an_answer_waits_for_a_scan_turn_no_longer_than_its_asker_waits() {
        let index = Arc::new(Index::new(crate::index::IndexConfig::default()));
        index.insert(&Event::default());
        let all = Query::parse("true").unwrap();
        let waited = Duration::from_secs(2);
        let turns = index.take_every_scan_turn().await;
        let answer = answered(&index, &all, "n2", waited);
        // Virtual time: the bound the test gives it, not the wall clock's.
        let refused = tokio::time::timeout(2 * waited, answer).await;
        let (parts, _room, refusal) = refused.expect("still waiting for a turn");
        let replies: Vec<Msg> = parts.into_iter().map(|p| Msg::decode(p).unwrap()).collect();
        let [reply] = &replies[..] else {
            panic!("{replies:?}")
        };
        assert_eq!(reply.ok, Some(false));
        let turn = "every scan turn of this node stayed taken for 2s";
        assert_eq!(
            reply.error.as_deref(),
            Some(
                format!("node n2: {turn} (one per core, all scanning); ask again in a moment")
                    .as_str()
            )
        );
        let again = Some((AGAIN, "1".to_owned()));
        assert_eq!(
            refusal, again,
            "passed on as unavailable, to ask again soon"
        );
        let stats = index.answers().stats();
        assert_eq!(Stats::get(&stats.cluster_queries_refused_no_turn), 1);
        drop(turns);
        let (parts, _room, refusal) = answered(&index, &all, "n2", waited).await;
        let reply = Msg::decode(parts[0].clone()).unwrap();
        assert_eq!(
            (reply.ok, reply.events.len(), refusal),
            (Some(true), 1, None)
        );
    }

    /// A query still asking when the runtime shuts down is dropped with its
    /// task; telling the nodes then must not spawn without end.
    #[test]
    fn a_query_asking_as_its_runtime_shuts_down_lets_go() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            // No server there: the client only queues what it is given.
            let client = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect("nats://127.0.0.1:29017")
                .await
                .unwrap();
            let asking = Asking {
                client,
                inbox: Some("_INBOX.given-up".to_owned()),
            };
            tokio::spawn(async move {
                let _asking = asking;
                std::future::pending::<()>().await
            });
        });
        drop(runtime);
    }
}
