//! Who owns which shard, and feeding the owned shards through the local rules.
//!
//! Three KV buckets:
//! - `vigil_nodes`: `<node id>` = `<shards> <instance>`, the node's heartbeat:
//!   its `--shards` and a random nonce of its process. A bucket TTL makes a
//!   dead node's key lapse, so the live keys are the membership. A node
//!   refuses to join nodes with another shard count (a host would then
//!   belong to a shard on each side, and page twice), or to start while
//!   another process renews a heartbeat of its id ([`DuplicateNodeId`]),
//!   and steps down when a renewal (an update at the revision it last
//!   wrote) finds another process's there.
//! - `vigil_leases`: `shard.<n>` = owner's node id. Taken with `create` (only if
//!   absent), renewed with `update` at the revision we hold, so two nodes can
//!   never both renew one lease; an unrenewed lease lapses with the bucket TTL.
//! - `vigil_progress`: `shard.<n>` = `<seq> <micros>`: the last stream
//!   sequence the owner ran through its rules, and the wall time up to which
//!   it expired the shard's index entries (no TTL). A new owner replays the
//!   shard from the start of retention to rebuild index and rule state, with
//!   outputs suppressed up to that sequence; its expiry of the shard waits
//!   for the replay, and entries whose TTL ran out before that time expire
//!   suppressed: what the previous owner already paged is not paged again.
//!   Saved progress stops before the work of any page not yet delivered
//!   ([`holds`]), so what a node had not paged when it died or handed the
//!   shard over is paged by the next (and no longer by it).
//!
//! Every renew interval each node heartbeats, counts the live nodes, renews
//! its leases, then moves toward its share `ceil(shards / live)`: releasing
//! extras (gracefully: progress saved, lease deleted) or taking free shards.
//! A shard whose local lease deadline ([`lease`](super::lease)) passes stops
//! at once (fenced), renewed or not. The deadline counts from this node's
//! own lease TTL, so the lease and heartbeat buckets' TTL is kept at least
//! that long: raised at start and whenever a round finds it lower.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::kv::{CreateErrorKind, Operation, Store, UpdateErrorKind};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use prost::Message as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterConfig, Doing as _, NatsError, STREAM, shard_of, subject};
use crate::clock::{Micros, SharedClock};
use crate::outputs;
use crate::outputs::holds::{self, Work};
use crate::proto::{self, Msg};
use crate::streams::Streams;

/// The three KV buckets, opened (or created) once at start.
pub struct Buckets {
    nodes: Store,
    leases: Store,
    progress: Store,
}

impl Buckets {
    pub async fn open(js: &jetstream::Context, config: &ClusterConfig) -> Result<Self, NatsError> {
        Ok(Self {
            nodes: open(js, "vigil_nodes", config.lease_ttl).await?,
            leases: open(js, "vigil_leases", config.lease_ttl).await?,
            // Zero: progress never lapses; it is what stops a replay re-paging.
            progress: open(js, "vigil_progress", Duration::ZERO).await?,
        })
    }
}

/// Opens a KV bucket, creating its stream first when missing. The stream is
/// made by hand with the KV layout (`create_key_value` first asks for account
/// info in a form nats-server 2.9 does not answer). A `max_age` (zero: none)
/// is the bucket's TTL, kept at least that long ([`lasting_at_least`]).
async fn open(js: &jetstream::Context, name: &str, max_age: Duration) -> Result<Store, NatsError> {
    let stream = super::get_or_create_stream(
        js,
        stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        },
    )
    .await
    .doing(format!("creating the KV bucket {name}"))?;
    if !max_age.is_zero() {
        let config = &stream.cached_info().config;
        if config.max_age > max_age {
            tracing::warn!(
                bucket = name,
                buckets = ?config.max_age,
                ours = ?max_age,
                "--cluster-lease-ttl is shorter than the bucket's TTL, which another node set and which stays: this node renews and fences by its own, but its leases and heartbeat lapse only after the bucket's, when it dies."
            );
        }
        lasting_at_least(js, config, name, max_age).await?;
    }
    js.get_key_value(name)
        .await
        .doing(format!("opening the KV bucket {name}"))
}

/// The server lets a key of a bucket with a TTL lapse at the TTL its stream
/// was made with, by whichever node came first, while this node fences its
/// shards from its own `--cluster-lease-ttl`. Under a shorter bucket TTL its
/// lease lapsed, and another node took the shard, while it still ran it. So
/// a TTL shorter than ours is raised, for every node; a longer one stays
/// (each node's fence then passes before the server lets its lease go, and
/// only takeover is slower). Never lowered: that would undercut the longest
/// TTL's nodes. (Zero, no TTL: nothing lapses.)
async fn lasting_at_least(
    js: &jetstream::Context,
    config: &stream::Config,
    name: &str,
    ttl: Duration,
) -> Result<(), NatsError> {
    if config.max_age.is_zero() || config.max_age >= ttl {
        return Ok(());
    }
    tracing::warn!(
        bucket = name,
        from = ?config.max_age,
        to = ?ttl,
        "--cluster-lease-ttl is longer than the bucket's TTL: raising it for every node of the cluster. A dead node's leases and heartbeat lapse after it."
    );
    let raised = stream::Config {
        max_age: ttl,
        ..config.clone()
    };
    js.update_stream(raised)
        .await
        .doing(format!("raising the TTL of the KV bucket {name}"))?;
    Ok(())
}

impl Buckets {
    /// The live nodes' ids. A key put again while the bucket is being
    /// listed is listed twice; counting it twice would shrink every node's
    /// share and move shards back and forth.
    async fn live_nodes(&self) -> Result<BTreeSet<String>, NatsError> {
        keys_of(&self.nodes, "listing nodes").await
    }

    /// Raises the lease and heartbeat buckets' TTL again where it is found
    /// below `ttl`: two nodes raising it at once, to different TTLs, race,
    /// and the shorter may land last (so may an edit by hand).
    async fn keep_lasting(&self, js: &jetstream::Context, ttl: Duration) -> Result<(), NatsError> {
        let checks = [&self.nodes, &self.leases].map(|store| async move {
            let mut stream = store.stream.clone();
            let info =
                (stream.info().await).doing(format!("reading the KV bucket {}", store.name))?;
            lasting_at_least(js, &info.config, &store.name, ttl).await
        });
        futures_util::future::try_join_all(checks).await?;
        Ok(())
    }

    /// The keys of the leases held now.
    async fn held_leases(&self) -> Result<BTreeSet<String>, NatsError> {
        keys_of(&self.leases, "listing leases").await
    }

    /// Refuses to join live nodes that run with another `--shards`. (An
    /// empty heartbeat is an older vigil's, which did not say.)
    pub async fn check_shards(&self, config: &ClusterConfig) -> Result<(), NatsError> {
        for node in self.live_nodes().await? {
            if node == config.node_id {
                continue;
            }
            let heartbeat = self
                .nodes
                .get(&node)
                .await
                .doing(format!("reading node {node}'s heartbeat"))?;
            let Some(theirs) = heartbeat.as_deref().and_then(shards_of) else {
                continue;
            };
            if theirs != config.shards {
                return Err(format!(
                    "node {node} runs with --shards {theirs}, this node with --shards {}: \
                     every node of a cluster must use the same",
                    config.shards
                ))
                .doing("checking the live nodes' --shards");
            }
        }
        Ok(())
    }

    /// Waits until no other process renews a heartbeat of this node's id:
    /// one found is watched until it lapses (a process that died, e.g. a
    /// crash just before this restart) or is renewed (a live one: refused).
    /// The heartbeat is then written with `create`, so of two processes
    /// checking at once one finds the other's. (Both read none and both
    /// ran while it was only read.)
    /// Returns the heartbeat's revision, which each renewal updates at.
    pub async fn check_node_id(
        &self,
        config: &ClusterConfig,
        instance: &str,
    ) -> Result<u64, NatsError> {
        let node = &config.node_id;
        let doing = || format!("checking that no live node runs with --node-id {node}");
        let ours = heartbeat(config.shards, instance);
        let mut found: Option<u64> = None;
        loop {
            match self.nodes.create(node, ours.clone()).await {
                Ok(revision) => return Ok(revision),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).doing(doing()),
            }
            match (self.live_heartbeat(node).await.doing(doing())?, found) {
                // Lapsed since `create`: try again after a pause.
                (None, _) => {}
                (Some(now), None) => {
                    tracing::info!(
                        node = %node,
                        "A heartbeat of this node id is there: waiting until it lapses \
                         (its process died) or is renewed (another process runs with this id)."
                    );
                    found = Some(now.revision);
                }
                (Some(now), Some(revision)) if now.revision == revision => {}
                (Some(now), Some(_)) => {
                    let theirs = instance_of(&now.value).unwrap_or("of an older vigil");
                    return Err(DuplicateNodeId {
                        node: node.clone(),
                        ours: instance.to_owned(),
                        theirs: theirs.to_owned(),
                    })
                    .doing(doing());
                }
            }
            tokio::time::sleep(config.renew).await;
        }
    }

    /// Renews this process's heartbeat, an update at `revision`, the last
    /// it wrote: a compare-and-set, as a lease's renewal is. A heartbeat
    /// found rewritten by another process (this one was taken for dead,
    /// paused or cut off past the TTL, and a process with its id started)
    /// is left to it: [`Beat::Taken`]. (Put, this process wrote its nonce
    /// over the other's and ran on beside it under the same id.) Ours at
    /// another revision (an update that timed out went through) is written
    /// again at it; lapsed or deleted, with `create`, only while absent.
    async fn renew_heartbeat(
        &self,
        node: &str,
        shards: u32,
        instance: &str,
        revision: u64,
    ) -> Result<Beat, NatsError> {
        let doing = "heartbeat";
        let beat = heartbeat(shards, instance);
        match self.nodes.update(node, beat.clone(), revision).await {
            Ok(renewed) => return Ok(Beat::Ours(renewed)),
            // Cut off: no read after it to wait out as well (a round, and a
            // shutdown behind it, took two request timeouts).
            Err(e) if e.kind() != UpdateErrorKind::WrongLastRevision => {
                return Err(e).doing(doing);
            }
            Err(_) => {}
        }
        let Some(entry) = self.live_heartbeat(node).await.doing(doing)? else {
            return Ok(Beat::Ours(
                self.nodes.create(node, beat).await.doing(doing)?,
            ));
        };
        match instance_of(&entry.value) {
            Some(ours) if ours == instance => {
                let renewed = (self.nodes.update(node, beat, entry.revision).await).doing(doing)?;
                Ok(Beat::Ours(renewed))
            }
            theirs => Ok(Beat::Taken(DuplicateNodeId {
                node: node.to_owned(),
                ours: instance.to_owned(),
                theirs: theirs.unwrap_or("of an older vigil").to_owned(),
            })),
        }
    }

    /// Deletes this process's heartbeat, if it still is this process's:
    /// taken for dead (paused past the TTL), it may have seen another
    /// process take its id over since, and deleting that one's heartbeat
    /// made the cluster count it out (and a third start with the id)
    /// until its next renewal. Deleted at the revision read, so a write
    /// in between is kept too.
    async fn leave(&self, node: &str, instance: &str) -> Result<(), NatsError> {
        let doing = "removing the heartbeat";
        let Some(entry) = self.live_heartbeat(node).await.doing(doing)? else {
            return Ok(());
        };
        if instance_of(&entry.value) != Some(instance) {
            let theirs = instance_of(&entry.value).unwrap_or("of an older vigil");
            tracing::warn!(
                node,
                theirs,
                "The heartbeat of this node id is another process's now (this one was taken \
                 for dead meanwhile): left to it."
            );
            return Ok(());
        }
        (self
            .nodes
            .delete_expect_revision(node, Some(entry.revision)))
        .await
        .doing(doing)
    }

    /// The heartbeat of `node`, unless lapsed or deleted.
    async fn live_heartbeat(
        &self,
        node: &str,
    ) -> Result<Option<jetstream::kv::Entry>, jetstream::kv::EntryError> {
        let entry = self.nodes.entry(node).await?;
        Ok(entry.filter(|entry| entry.operation == Operation::Put))
    }
}

/// How long one listing of a bucket's keys may take before it is begun
/// again, and how many times it is begun. async-nats ends a listing at the
/// message its consumer counted as the last when it was made: a key written
/// while the consumer is being made can leave it waiting for ever (seen: of
/// two nodes starting at once, one hung here, silent, about one start in 30).
const LISTING_PATIENCE: Duration = Duration::from_secs(2);
const LISTING_TRIES: u32 = 3;

/// The keys a bucket holds now (deleted ones are not listed).
async fn keys_of(store: &Store, doing: &str) -> Result<BTreeSet<String>, NatsError> {
    let list = || async {
        let keys = store.keys().await.doing(doing)?;
        keys.try_collect().await.doing(doing)
    };
    for _ in 1..LISTING_TRIES {
        if let Ok(listed) = tokio::time::timeout(LISTING_PATIENCE, list()).await {
            return listed;
        }
        tracing::debug!(doing, "A listing of keys did not end; listing again.");
    }
    (tokio::time::timeout(LISTING_PATIENCE, list()).await).doing(doing)?
}

/// A heartbeat's value: the node's shard count and its process's nonce.
fn heartbeat(shards: u32, instance: &str) -> Bytes {
    format!("{shards} {instance}").into()
}

/// A heartbeat's shard count.
fn shards_of(heartbeat: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(heartbeat).ok()?;
    text.split(' ').next()?.parse().ok()
}

/// A heartbeat's process nonce (an older vigil's has none).
fn instance_of(heartbeat: &[u8]) -> Option<&str> {
    std::str::from_utf8(heartbeat).ok()?.split(' ').nth(1)
}

/// What renewing the heartbeat found.
enum Beat {
    /// Renewed: its revision now.
    Ours(u64),
    /// Another process with this node's id wrote it.
    Taken(DuplicateNodeId),
}

/// Two live processes run with one `--node-id`: each skips the other's query
/// questions (a node answers its own part itself), so answers miss parts
/// silently, and each takes the other's leases for its own, so both run (and
/// page for) the same shards.
#[derive(Debug, thiserror::Error)]
#[error(
    "another vigil process runs with --node-id {node}: its heartbeat was \
     rewritten by instance {theirs} (this process is {ours}); every node \
     needs its own --node-id"
)]
pub struct DuplicateNodeId {
    node: String,
    ours: String,
    theirs: String,
}

fn key(shard: u32) -> String {
    format!("shard.{shard}")
}

/// A shard's entry in `vigil_progress`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    /// The last stream sequence run through the rules.
    seq: u64,
    /// Wall micros: the shard's entries whose TTL ran out before this were
    /// expired (and their expiry reported) by the owner that saved it.
    at: Micros,
}

impl Progress {
    fn encode(self) -> Bytes {
        format!("{} {}", self.seq, self.at).into()
    }

    /// `<seq> <micros>`, or a bare `<seq>` as saved before expiry was tracked.
    fn decode(value: &[u8]) -> Option<Progress> {
        let text = std::str::from_utf8(value).ok()?;
        let mut parts = text.split(' ');
        let seq = parts.next()?.parse().ok()?;
        let at = match parts.next() {
            Some(at) => at.parse().ok()?,
            None => 0,
        };
        Some(Progress { seq, at })
    }
}

/// A shard this node holds the lease of, and the task following it.
struct Owned {
    revision: u64,
    /// Last stream sequence run through the rules.
    processed: Arc<AtomicU64>,
    /// Where the replay stops suppressing outputs.
    floor: u64,
    /// What `vigil_progress` last got.
    saved: Progress,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Owned {
    /// Whether the replay reached the previous owner's progress: from there
    /// on the shard has progress of its own to save.
    fn past_replay(&self) -> bool {
        self.processed.load(Ordering::Acquire) >= self.floor
    }

    /// What to save as this shard's progress, its expiry having run here
    /// until `expired_until` (`None`: not yet, the previous owner's time
    /// stands): never past a page not delivered yet, which the next owner
    /// must then make again. Nor past an entry given grace at catch-up and
    /// not expired yet: its deadline in the stream is earlier than the time
    /// it will expire here, and the next owner would expire it quietly (and
    /// take its page for one already sent).
    fn progress(&self, cluster: &Cluster, shard: u32, expired_until: Option<Micros>) -> Progress {
        let seq = self.processed.load(Ordering::Acquire).max(self.floor);
        let graced_until = cluster.leases.graced_until(shard);
        Progress {
            seq: cluster.holds.seq_settled(shard, seq),
            at: match expired_until {
                Some(until) if until > graced_until => cluster.holds.expiry_settled(shard, until),
                _ => self.saved.at,
            },
        }
    }
}

struct Owner {
    cluster: Arc<Cluster>,
    buckets: Buckets,
    streams: Arc<dyn Streams>,
    clock: SharedClock,
    owned: BTreeMap<u32, Owned>,
    /// Whether the last heartbeat went through.
    reaching: bool,
    /// The revision of the last heartbeat this process wrote.
    beat: u64,
}

/// The ownership loop; on `stop` it hands every shard back and leaves.
pub(super) async fn run(
    cluster: Arc<Cluster>,
    buckets: Buckets,
    beat: u64,
    streams: Arc<dyn Streams>,
    clock: SharedClock,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(cluster.config.renew);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owner = Owner {
        cluster,
        buckets,
        streams,
        clock,
        owned: BTreeMap::new(),
        reaching: false,
        beat,
    };
    let taken = loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break None,
        }
        match owner.round().await {
            Ok(Some(taken)) => break Some(taken),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "Cluster ownership round failed; retrying."),
        }
    };
    let shards: Vec<u32> = owner.owned.keys().copied().collect();
    owner.release(shards).await;
    let node = owner.cluster.config.node_id.clone();
    if let Some(taken) = taken {
        // The other process's heartbeat stays; this one stops as one
        // refused at start does.
        tracing::info!(node = %node, "Stepped down; shards handed back.");
        owner.cluster.step_down(taken);
        return;
    }
    if let Err(e) = owner.buckets.leave(&node, &owner.cluster.instance).await {
        tracing::debug!(error = %e, "Could not remove the heartbeat.");
    }
    tracing::info!(node = %node, "Left the cluster; shards handed back.");
}

impl Owner {
    fn node(&self) -> &str {
        &self.cluster.config.node_id
    }

    /// One round; `Some` when another process took this node's id over:
    /// this one then stops owning anything.
    async fn round(&mut self) -> Result<Option<DuplicateNodeId>, NatsError> {
        let node = self.node().to_owned();
        let shards = self.cluster.config.shards;
        let instance = &self.cluster.instance;
        let renewed = (self.buckets)
            .renew_heartbeat(&node, shards, instance, self.beat)
            .await;
        match renewed {
            Ok(Beat::Ours(revision)) => self.beat = revision,
            Ok(Beat::Taken(taken)) => {
                tracing::error!(
                    error = %taken,
                    "This node's heartbeat was rewritten by another process with its id (this \
                     one was taken for dead meanwhile): stepping down, handing its shards back, \
                     and exiting."
                );
                return Ok(Some(taken));
            }
            Err(e) => {
                self.reaching = false;
                return Err(e);
            }
        }
        if !self.reaching {
            self.reaching = true;
            let now = self.clock.now();
            self.cluster.reaching_since.store(now, Ordering::Release);
        }
        let live = self.buckets.live_nodes().await?.len().max(1);
        self.cluster.set_members(live);
        self.renew().await;
        let target = (shards as usize).div_ceil(live);
        if self.owned.len() > target {
            // The highest-numbered extras go; the survivors keep their state.
            let extras: Vec<u32> = self
                .owned
                .keys()
                .rev()
                .take(self.owned.len() - target)
                .copied()
                .collect();
            tracing::info!(
                live,
                target,
                releasing = extras.len(),
                "Rebalancing: releasing shards."
            );
            self.release(extras).await;
        } else if self.owned.len() < target {
            self.acquire(target).await;
        }
        let ttl = self.cluster.config.lease_ttl;
        if let Err(e) = self.buckets.keep_lasting(&self.cluster.js, ttl).await {
            tracing::warn!(error = %e, "Cannot check the lease buckets' TTL; checking next round.");
        }
        Ok(None)
    }

    /// Renews every lease and saves progress. A lease found held by someone
    /// else (or lapsed), or whose local deadline passed, is dropped; a
    /// transport error keeps it for the next round (the deadline still runs).
    /// The renewals (and the saves) go out together: a round takes about one
    /// round trip, not one per shard, so a busy NATS does not make the
    /// deadlines pass.
    async fn renew(&mut self) {
        let node = Bytes::from(self.node().to_owned());
        let cluster = self.cluster.clone();
        let leases = &cluster.leases;
        let (store, progress_store) = (&self.buckets.leases, &self.buckets.progress);
        let mut lost: Vec<u32> = self
            .owned
            .keys()
            .copied()
            .filter(|&shard| !leases.valid(shard))
            .collect();
        for shard in &lost {
            tracing::warn!(
                shard,
                "Lease deadline passed without a renewal; shard dropped."
            );
        }
        let sent = leases.now();
        let renewals = self
            .owned
            .iter()
            .filter(|(shard, _)| !lost.contains(shard))
            .map(|(&shard, owned)| {
                let (node, revision) = (node.clone(), owned.revision);
                async move { (shard, store.update(key(shard), node, revision).await) }
            });
        for (shard, renewed) in futures_util::future::join_all(renewals).await {
            let Some(owned) = self.owned.get_mut(&shard) else {
                continue;
            };
            match renewed {
                Ok(revision) => {
                    owned.revision = revision;
                    leases.renewed(shard, sent);
                }
                // Ours at another revision (an earlier update that timed out
                // went through): renewed next round; its write time is unknown,
                // so the deadline does not move now.
                Err(e) => match store.entry(key(shard)).await {
                    Ok(Some(entry)) if entry.operation == Operation::Put && entry.value == node => {
                        owned.revision = entry.revision;
                    }
                    Ok(_) => {
                        tracing::warn!(shard, error = %e, "Lease lost (lapsed or taken over); dropping the shard.");
                        lost.push(shard);
                    }
                    Err(e) => {
                        tracing::warn!(shard, error = %e, "Lease renewal failed; keeping the shard for now.");
                    }
                },
            }
        }
        // Only a shard past its replay has progress of its own; and expiry
        // of its own once caught up.
        let expired_until = cluster.expired_until();
        let saves = self
            .owned
            .iter()
            .filter(|(shard, owned)| {
                leases.valid(**shard) && owned.past_replay() && !lost.contains(shard)
            })
            .filter_map(|(&shard, owned)| {
                let expired = leases.live(shard).then_some(expired_until);
                let progress = owned.progress(&cluster, shard, expired);
                // A future does nothing until polled: building it is free.
                (progress != owned.saved).then_some(async move {
                    let saved = progress_store.put(key(shard), progress.encode()).await;
                    (shard, progress, saved.is_ok())
                })
            });
        for (shard, progress, saved) in futures_util::future::join_all(saves).await {
            if let Some(owned) = self.owned.get_mut(&shard).filter(|_| saved) {
                owned.saved = progress;
            }
        }
        let lost: Vec<(u32, Owned)> = (lost.into_iter())
            .filter_map(|shard| Some((shard, self.owned.remove(&shard)?)))
            .collect();
        for (_, owned) in &lost {
            owned.stop.cancel();
        }
        // Freed all at once, as they are renewed: a round trip each to a
        // loaded NATS would hold up the round.
        let cluster = &cluster;
        let freed = lost.into_iter().map(|(shard, owned)| async move {
            let _ = owned.task.await;
            forget(cluster, shard);
            leases.dropped(shard);
            // Frees it at once if it is still ours on the server.
            let _ = store
                .delete_expect_revision(key(shard), Some(owned.revision))
                .await;
        });
        futures_util::future::join_all(freed).await;
    }

    /// Takes free shards until this node holds `target`, starting at a
    /// node-specific place so joining nodes do not all contend for shard 0.
    /// One listing of the leases, then every take and its floor at once:
    /// one by one, two round trips each to a loaded NATS took a round 9 s
    /// for 22 shards, the first leases' deadlines passed before the next
    /// round could renew them, and the shards went round from node to node.
    async fn acquire(&mut self, target: usize) {
        let shards = self.cluster.config.shards;
        let start = shard_of(self.node(), shards);
        let held = match self.buckets.held_leases().await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot list the leases; taking no shard now.");
                return;
            }
        };
        let free: Vec<u32> = (0..shards)
            .map(|i| (start + i) % shards)
            .filter(|shard| !self.owned.contains_key(shard) && !held.contains(&key(*shard)))
            .take(target.saturating_sub(self.owned.len()))
            .collect();
        let node = Bytes::from(self.node().to_owned());
        let (leases, progress) = (&self.buckets.leases, &self.buckets.progress);
        let sent = self.cluster.leases.now();
        let takes = free.into_iter().map(|shard| {
            let node = node.clone();
            async move {
                // Taken meanwhile by another node: not ours this round.
                let revision = leases.create(key(shard), node).await.ok()?;
                match progress.get(key(shard)).await {
                    Ok(value) => {
                        let floor = value.and_then(|v| Progress::decode(&v)).unwrap_or_default();
                        Some((shard, revision, floor))
                    }
                    Err(e) => {
                        // Without the floor a replay could re-page: give the lease back.
                        tracing::warn!(shard, error = %e, "Cannot read shard progress; not taking it now.");
                        let _ = leases.delete_expect_revision(key(shard), Some(revision)).await;
                        None
                    }
                }
            }
        });
        let taken: Vec<_> = futures_util::future::join_all(takes)
            .await
            .into_iter()
            .flatten()
            .collect();
        for &(shard, revision, floor) in &taken {
            self.cluster.leases.taken(shard, sent);
            let processed = Arc::new(AtomicU64::new(0));
            let stop = CancellationToken::new();
            let task = tokio::spawn(follow(
                self.cluster.clone(),
                shard,
                floor,
                processed.clone(),
                self.streams.clone(),
                self.clock.clone(),
                stop.clone(),
            ));
            self.owned.insert(
                shard,
                Owned {
                    revision,
                    processed,
                    floor: floor.seq,
                    saved: floor,
                    stop,
                    task,
                },
            );
        }
        if !taken.is_empty() {
            let taken = taken.len();
            tracing::info!(taken, owned = self.owned.len(), target, "Took shards over.");
        }
    }

    /// Hands shards back gracefully, all at once: each pauses its expiry,
    /// stops following, saves where it got to, deletes its lease and forgets
    /// its index entries. Together, so handing back many shards (shutdown)
    /// takes a few round trips, not a few per shard: no shard's local
    /// deadline passes (which would skip its progress save) on the way.
    async fn release(&mut self, shards: Vec<u32>) {
        let cluster = self.cluster.clone();
        let buckets = &self.buckets;
        let handed = shards.into_iter().filter_map(|shard| {
            let owned = self.owned.remove(&shard)?;
            Some(hand_back(&cluster, buckets, shard, owned))
        });
        futures_util::future::join_all(handed.collect::<Vec<_>>()).await;
    }
}

/// One shard of [`Owner::release`].
async fn hand_back(cluster: &Cluster, buckets: &Buckets, shard: u32, mut owned: Owned) {
    let leases = &cluster.leases;
    // Read before pausing: every expiry up to here ran; one in flight may
    // page again on the next owner (at least once, never lost).
    let expired = leases.live(shard).then(|| cluster.expired_until());
    leases.pause(shard);
    owned.stop.cancel();
    let _ = (&mut owned.task).await;
    let progress = owned.progress(cluster, shard, expired);
    // Still replaying: the previous owner's progress stands.
    if leases.valid(shard)
        && owned.past_replay()
        && progress != owned.saved
        && let Err(e) = buckets.progress.put(key(shard), progress.encode()).await
    {
        tracing::warn!(shard, error = %e, "Could not save progress; the next owner may page again.");
    }
    // Disowned before the lease goes, and given the time to cut its pages
    // in flight: none may land after the next owner's.
    forget(cluster, shard);
    leases.dropped(shard);
    tokio::time::sleep(outputs::http::WANTED_RECHECK).await;
    if let Err(e) = buckets
        .leases
        .delete_expect_revision(key(shard), Some(owned.revision))
        .await
    {
        tracing::debug!(shard, error = %e, "Could not delete the lease; it will lapse.");
    }
}

/// Drops this node's index entries of a shard it no longer owns: the new
/// owner has them, and a host's entries must live on one node only. Not an
/// expiry: nothing goes through the rules or to subscribers. Its pages not
/// delivered yet are the new owner's to make (its saved progress stops
/// before them) and send, in order with what it pages next: they are not
/// sent from here.
fn forget(cluster: &Cluster, shard: u32) {
    let shards = cluster.config.shards;
    let forgotten = (cluster.index).remove_where(|host, _| shard_of(host, shards) == shard);
    cluster.holds.disown(shard);
    tracing::debug!(shard, forgotten, "Forgot a released shard's entries.");
}

/// How following a shard ended.
enum Ended {
    Stopped,
    /// The local lease deadline passed: another node may own it soon.
    Fenced,
}

/// Follows one shard until `stop` or its lease deadline: replays it from the
/// start of retention, then stays live, re-subscribing after the last
/// processed sequence when the consumer fails (e.g. NATS restarted).
async fn follow(
    cluster: Arc<Cluster>,
    shard: u32,
    floor: Progress,
    processed: Arc<AtomicU64>,
    streams: Arc<dyn Streams>,
    clock: SharedClock,
    stop: CancellationToken,
) {
    tracing::debug!(
        shard,
        replay_until = floor.seq,
        "Following a shard (outputs suppressed while replaying)."
    );
    let mut live = floor.seq == 0;
    loop {
        let followed = consume(
            &cluster, shard, floor, &processed, &*streams, &clock, &stop, &mut live,
        );
        match followed.await {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Fenced) => {
                // Gone from the index before anyone else can take the lease,
                // so nothing of it expires (or pages) here any more.
                forget(&cluster, shard);
                tracing::warn!(
                    shard,
                    "Lease deadline passed without a renewal; stopped running the shard."
                );
                return;
            }
            Err(e) => {
                tracing::warn!(shard, error = %e, "Shard consumer failed; resuming.");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

/// The replay reached the previous owner's progress: entries whose TTL ran
/// out before its last expiry pass were expired (and reported) by it, so they
/// go quietly; from here on the shard's events run through the outputs.
fn replayed(cluster: &Cluster, shard: u32, floor: Progress, streams: &dyn Streams) {
    let shards = cluster.config.shards;
    let ours = |host: &str| shard_of(host, shards) == shard;
    let quiet = outputs::suppressed(|| {
        cluster
            .index
            .expire_where(floor.at, ours, |notices| streams.process_expired(notices))
    });
    tracing::debug!(
        shard,
        seq = floor.seq,
        expired_quietly = quiet,
        "Shard replay reached the previous owner's progress; outputs live."
    );
}

/// The replay ran everything the shard held when it was taken (or when the
/// consumer was made again): no stored event is left that could keep an
/// entry alive, so the shard's entries may expire here. Those whose TTL ran
/// out while this node could not reach NATS (or before it started) live a
/// TTL from when it could again, as after a single node's restart: their
/// agents could not report either.
fn caught_up(cluster: &Cluster, shard: u32, now: Micros) {
    let shards = cluster.config.shards;
    let since = cluster.reaching_since();
    let (graced, graced_until) =
        (cluster.index).extend_overdue_where(now, since, |host| shard_of(host, shards) == shard);
    cluster.leases.caught_up(shard, graced_until);
    tracing::debug!(shard, graced, "Shard caught up; its entries expire here.");
}

#[allow(clippy::too_many_arguments)]
async fn consume(
    cluster: &Cluster,
    shard: u32,
    floor: Progress,
    processed: &AtomicU64,
    streams: &dyn Streams,
    clock: &SharedClock,
    stop: &CancellationToken,
    live: &mut bool,
) -> Result<Ended, NatsError> {
    let stream = cluster
        .js
        .get_stream(STREAM)
        .await
        .doing("getting the events stream")?;
    let deliver_policy = match processed.load(Ordering::Acquire) {
        0 => DeliverPolicy::All,
        seq => DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
    };
    let mut consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject(shard),
            deliver_policy,
            ..Default::default()
        })
        .await
        .doing("following the shard")?;
    let leases = &cluster.leases;
    // What the shard holds now: its expiry waits until that much ran, so no
    // entry expires for want of an event already stored.
    let catching_up = !leases.live(shard);
    let mut behind = match catching_up {
        true => {
            (consumer.info().await)
                .doing("asking what is left to replay")?
                .num_pending
        }
        false => 0,
    };
    // Nothing (left) to replay: e.g. retention dropped the shard's history.
    if catching_up && behind == 0 {
        if !*live {
            replayed(cluster, shard, floor, streams);
            *live = true;
        }
        caught_up(cluster, shard, clock.now());
    }
    let mut messages = consumer.messages().await.doing("reading the shard")?;
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            () = stop.cancelled() => return Ok(Ended::Stopped),
            () = tokio::time::sleep(leases.remaining(shard)) => {
                if leases.valid(shard) {
                    continue; // Renewed meanwhile.
                }
                return Ok(Ended::Fenced);
            }
        };
        // Checked per message too: after a pause (SIGSTOP, a stalled VM) a
        // message and the deadline are ready at once.
        if !leases.valid(shard) {
            return Ok(Ended::Fenced);
        }
        // Static texts: this runs per message, and the log line names the shard.
        let message = message
            .ok_or_else(|| async_nats::Error::from("the consumer ended"))
            .and_then(|message| message.map_err(Into::into))
            .doing("reading the shard")?;
        let info = message.info().doing("reading a message's stream info")?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        if !*live && seq > floor.seq {
            replayed(cluster, shard, floor, streams);
            *live = true;
        }
        let now = clock.now();
        match Msg::decode(message.payload.clone()) {
            Ok(msg) => {
                let events: Vec<_> = msg
                    .events
                    .into_iter()
                    .map(|pb| proto::from_pb(pb, now))
                    .collect();
                if *live {
                    let work = Work::Event { shard, seq };
                    holds::made_by(work, || streams.process(&events));
                } else {
                    outputs::suppressed(|| streams.process(&events));
                }
            }
            Err(e) => {
                tracing::warn!(shard, seq, error = %e, "Undecodable cluster message skipped.")
            }
        }
        processed.store(seq, Ordering::Release);
        if !*live && (seq >= floor.seq || pending == 0) {
            replayed(cluster, shard, floor, streams);
            *live = true;
        }
        if behind > 0 {
            behind -= 1;
            if behind == 0 || pending == 0 {
                behind = 0;
                caught_up(cluster, shard, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_round_trips_and_reads_the_old_form() {
        let progress = Progress {
            seq: 42,
            at: 1_700_000_000_000_000,
        };
        assert_eq!(Progress::decode(&progress.encode()), Some(progress));
        assert_eq!(
            Progress::decode(b"17"),
            Some(Progress { seq: 17, at: 0 }),
            "saved by an older vigil"
        );
        assert_eq!(Progress::decode(b"x"), None);
        assert_eq!(Progress::decode(b"1 y"), None);
    }

    #[test]
    fn a_heartbeat_says_its_nodes_shard_count_and_process() {
        let ours = heartbeat(64, "00ff");
        assert_eq!(shards_of(&ours), Some(64));
        assert_eq!(instance_of(&ours), Some("00ff"));
        assert_eq!(shards_of(b"64"), Some(64), "an older vigil's");
        assert_eq!(instance_of(b"64"), None, "an older vigil's");
        assert_eq!(shards_of(b""), None, "an even older vigil's");
        assert_eq!(shards_of(b"x"), None);
    }
}
