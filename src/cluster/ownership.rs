//! Who owns which shard, and feeding the owned shards through the local rules.
//!
//! Three KV buckets:
//! - `vigil_nodes`: `<node id>` heartbeats; a bucket TTL makes a dead node's
//!   key lapse, so the live keys are the membership.
//! - `vigil_leases`: `shard.<n>` = owner's node id. Taken with `create` (only if
//!   absent), renewed with `update` at the revision we hold, so two nodes can
//!   never both renew one lease; an unrenewed lease lapses with the bucket TTL.
//! - `vigil_progress`: `shard.<n>` = the last stream sequence the owner ran
//!   through its rules (no TTL). A new owner replays the shard from the start
//!   of retention to rebuild index and rule state, with outputs suppressed up
//!   to that sequence: what the previous owner already paged is not paged again.
//!
//! Every renew interval each node heartbeats, counts the live nodes, renews
//! its leases, then moves toward its share `ceil(shards / live)`: releasing
//! extras (gracefully: progress saved, lease deleted) or taking free shards.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::kv::{Operation, Store};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use prost::Message as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterConfig, STREAM, shard_of, subject};
use crate::clock::SharedClock;
use crate::index::Index;
use crate::outputs;
use crate::proto::{self, Msg};
use crate::streams::Streams;

/// The three KV buckets, opened (or created) once at start.
pub struct Buckets {
    nodes: Store,
    leases: Store,
    progress: Store,
}

impl Buckets {
    pub async fn open(js: &jetstream::Context, config: &ClusterConfig) -> anyhow::Result<Self> {
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
/// info in a form nats-server 2.9 does not answer).
async fn open(js: &jetstream::Context, name: &str, max_age: Duration) -> anyhow::Result<Store> {
    js.get_or_create_stream(stream::Config {
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
    })
    .await
    .map_err(|e| anyhow!("creating the KV bucket {name}: {e}"))?;
    js.get_key_value(name)
        .await
        .map_err(|e| anyhow!("opening the KV bucket {name}: {e}"))
}

fn key(shard: u32) -> String {
    format!("shard.{shard}")
}

/// A shard this node holds the lease of, and the task following it.
struct Owned {
    revision: u64,
    /// Last stream sequence run through the rules.
    processed: Arc<AtomicU64>,
    /// What `vigil_progress` last got.
    saved: u64,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

struct Owner {
    cluster: Arc<Cluster>,
    buckets: Buckets,
    streams: Arc<dyn Streams>,
    clock: SharedClock,
    owned: BTreeMap<u32, Owned>,
}

/// The ownership loop; on `stop` it hands every shard back and leaves.
pub(super) async fn run(
    cluster: Arc<Cluster>,
    buckets: Buckets,
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
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        if let Err(e) = owner.round().await {
            tracing::warn!(error = %e, "Cluster ownership round failed; retrying.");
        }
    }
    let shards: Vec<u32> = owner.owned.keys().copied().collect();
    for shard in shards {
        owner.release(shard).await;
    }
    let node = owner.cluster.config.node_id.clone();
    if let Err(e) = owner.buckets.nodes.delete(&node).await {
        tracing::debug!(error = %e, "Could not remove the heartbeat.");
    }
    tracing::info!(node = %node, "Left the cluster; shards handed back.");
}

impl Owner {
    fn node(&self) -> &str {
        &self.cluster.config.node_id
    }

    async fn round(&mut self) -> anyhow::Result<()> {
        let node = self.node().to_owned();
        self.buckets
            .nodes
            .put(&node, Bytes::new())
            .await
            .context("heartbeat")?;
        let live: Vec<String> = self
            .buckets
            .nodes
            .keys()
            .await
            .context("listing nodes")?
            .try_collect()
            .await
            .context("listing nodes")?;
        let live = live.len().max(1);
        self.cluster.set_members(live);
        self.renew().await;
        let shards = self.cluster.config.shards as usize;
        let target = shards.div_ceil(live);
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
            for shard in extras {
                self.release(shard).await;
            }
        } else if self.owned.len() < target {
            self.acquire(target).await;
        }
        Ok(())
    }

    /// Renews every lease and saves progress. A lease found held by someone
    /// else (or lapsed) is dropped; a transport error keeps it for the next round.
    async fn renew(&mut self) {
        let node = Bytes::from(self.node().to_owned());
        let mut lost = Vec::new();
        for (&shard, owned) in &mut self.owned {
            match self
                .buckets
                .leases
                .update(key(shard), node.clone(), owned.revision)
                .await
            {
                Ok(revision) => owned.revision = revision,
                Err(e) => match self.buckets.leases.entry(key(shard)).await {
                    Ok(Some(entry)) if entry.operation == Operation::Put && entry.value == node => {
                        owned.revision = entry.revision;
                    }
                    Ok(_) => {
                        tracing::warn!(shard, error = %e, "Lease lost (lapsed or taken over); dropping the shard.");
                        lost.push(shard);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(shard, error = %e, "Lease renewal failed; keeping the shard for now.");
                        continue;
                    }
                },
            }
            let processed = owned.processed.load(Ordering::Acquire);
            if processed > owned.saved
                && self
                    .buckets
                    .progress
                    .put(key(shard), processed.to_string().into())
                    .await
                    .is_ok()
            {
                owned.saved = processed;
            }
        }
        for shard in lost {
            if let Some(owned) = self.owned.remove(&shard) {
                owned.stop.cancel();
                let _ = owned.task.await;
                forget(&self.cluster.index, shard, self.cluster.config.shards);
            }
        }
    }

    /// Takes free shards until this node holds `target`, starting at a
    /// node-specific place so joining nodes do not all contend for shard 0.
    async fn acquire(&mut self, target: usize) {
        let shards = self.cluster.config.shards;
        let start = shard_of(self.node(), shards);
        let node = Bytes::from(self.node().to_owned());
        let mut taken = 0;
        for i in 0..shards {
            if self.owned.len() >= target {
                break;
            }
            let shard = (start + i) % shards;
            if self.owned.contains_key(&shard) {
                continue;
            }
            let Ok(revision) = self.buckets.leases.create(key(shard), node.clone()).await else {
                continue;
            };
            let floor = match self.buckets.progress.get(key(shard)).await {
                Ok(value) => value
                    .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<u64>().ok())
                    .unwrap_or(0),
                Err(e) => {
                    // Without the floor a replay could re-page: give the lease back.
                    tracing::warn!(shard, error = %e, "Cannot read shard progress; not taking it now.");
                    let _ = self
                        .buckets
                        .leases
                        .delete_expect_revision(key(shard), Some(revision))
                        .await;
                    continue;
                }
            };
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
                    saved: floor,
                    stop,
                    task,
                },
            );
            taken += 1;
        }
        if taken > 0 {
            tracing::info!(taken, owned = self.owned.len(), target, "Took shards over.");
        }
    }

    /// Hands a shard back gracefully: stop following, save where we got to,
    /// delete the lease, and forget the shard's index entries.
    async fn release(&mut self, shard: u32) {
        let Some(owned) = self.owned.remove(&shard) else {
            return;
        };
        owned.stop.cancel();
        let _ = owned.task.await;
        let processed = owned.processed.load(Ordering::Acquire);
        if processed > owned.saved
            && let Err(e) = self
                .buckets
                .progress
                .put(key(shard), processed.to_string().into())
                .await
        {
            tracing::warn!(shard, error = %e, "Could not save progress; the next owner may page again.");
        }
        if let Err(e) = self
            .buckets
            .leases
            .delete_expect_revision(key(shard), Some(owned.revision))
            .await
        {
            tracing::debug!(shard, error = %e, "Could not delete the lease; it will lapse.");
        }
        forget(&self.cluster.index, shard, self.cluster.config.shards);
    }
}

/// Drops this node's index entries of a shard it no longer owns: the new
/// owner has them, and a host's entries must live on one node only.
fn forget(index: &Index, shard: u32, shards: u32) {
    let mut forgotten = 0;
    for mut event in index.entries() {
        if shard_of(event.host_str(), shards) == shard {
            event.state = Some("expired".to_owned());
            index.insert(&event);
            forgotten += 1;
        }
    }
    tracing::debug!(shard, forgotten, "Forgot a released shard's entries.");
}

/// Follows one shard until `stop`: replays it from the start of retention,
/// then stays live, re-subscribing after the last processed sequence when
/// the consumer fails (e.g. NATS restarted).
async fn follow(
    cluster: Arc<Cluster>,
    shard: u32,
    floor: u64,
    processed: Arc<AtomicU64>,
    streams: Arc<dyn Streams>,
    clock: SharedClock,
    stop: CancellationToken,
) {
    tracing::debug!(
        shard,
        replay_until = floor,
        "Following a shard (outputs suppressed while replaying)."
    );
    let mut live = floor == 0;
    loop {
        let followed = consume(
            &cluster, shard, floor, &processed, &*streams, &clock, &stop, &mut live,
        );
        match followed.await {
            Ok(()) => return,
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

#[allow(clippy::too_many_arguments)]
async fn consume(
    cluster: &Cluster,
    shard: u32,
    floor: u64,
    processed: &AtomicU64,
    streams: &dyn Streams,
    clock: &SharedClock,
    stop: &CancellationToken,
    live: &mut bool,
) -> anyhow::Result<()> {
    let stream = cluster.js.get_stream(STREAM).await?;
    let deliver_policy = match processed.load(Ordering::Acquire) {
        0 => DeliverPolicy::All,
        seq => DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
    };
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subject(shard),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            () = stop.cancelled() => return Ok(()),
        };
        let message = message.ok_or_else(|| anyhow!("consumer ended"))??;
        let seq = message.info().map_err(|e| anyhow!("{e}"))?.stream_sequence;
        match Msg::decode(message.payload.clone()) {
            Ok(msg) => {
                let now = clock.now();
                let events: Vec<_> = msg
                    .events
                    .into_iter()
                    .map(|pb| proto::from_pb(pb, now))
                    .collect();
                if seq <= floor {
                    outputs::suppressed(|| streams.process(&events));
                } else {
                    if !*live {
                        *live = true;
                        tracing::debug!(shard, seq, "Shard replay caught up; outputs live.");
                    }
                    streams.process(&events);
                }
            }
            Err(e) => {
                tracing::warn!(shard, seq, error = %e, "Undecodable cluster message skipped.")
            }
        }
        processed.store(seq, Ordering::Release);
    }
}
