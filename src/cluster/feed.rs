//! Subscriptions across the cluster: a WebSocket, SSE or gRPC subscriber on
//! any node sees what every owner's index stores and expires.
//!
//! - **Interest.** A node whose feed has subscribers announces their queries
//!   on `vigil.interest`: at once when one subscribes (waiting until every
//!   live node confirmed, so the owners forward before the snapshot query is
//!   answered), then every renew interval. An interest not renewed within the
//!   lease TTL is forgotten; a node whose last subscriber left announces an
//!   empty list.
//! - **Tap.** An owner that holds any interest subscribes to its own index's
//!   pubsub (one lossy subscription for the union of the queries: a full queue
//!   drops and counts, it never slows the owner) and publishes the changes,
//!   in batches, on `vigil.changes.<node>` to each node whose queries match.
//!   Without interest there is no tap and no per-event NATS traffic.
//! - **Feed.** Each node hands what arrives on its `vigil.changes.<node>` to
//!   its local subscribers through its feed [`Pubsub`] (which disconnects a
//!   slow one, as a single node does). Its own shards' changes come the same
//!   way, so a subscriber sees one ordered stream per owner.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Cluster, PART_EVENTS, parts};
use crate::event::Event;
use crate::forwarded::ClientAddr;
use crate::proto::{self, Msg};
use crate::pubsub::{Published, Pubsub, Subscription};
use crate::query::Query;

/// Where nodes announce the queries of their subscribers.
pub const INTEREST_SUBJECT: &str = "vigil.interest";
/// Node `<id>`'s subscribers get the owners' changes on `vigil.changes.<id>`.
const CHANGES_PREFIX: &str = "vigil.changes";
/// Queries kept per announcing node; more are ignored (and logged).
const MAX_QUERIES: usize = 1000;
/// Changes an owner's tap may hold before it drops (and counts) new ones.
const TAP_CAPACITY: usize = 10_000;

pub(super) fn changes_subject(node: &str) -> String {
    format!("{CHANGES_PREFIX}.{node}")
}

/// What a node announces on [`INTEREST_SUBJECT`].
#[derive(Debug, Serialize, Deserialize)]
struct Interest {
    node: String,
    queries: Vec<String>,
}

impl Cluster {
    /// Subscribes to changes on every node of the cluster: the subscription is
    /// made on this node's feed, then its query announced to every owner.
    /// Take the snapshot after this returns, so no change falls in between.
    /// The client at `peer` pays for it (see [`Pubsub::client`]).
    pub async fn subscribe(
        &self,
        peer: Option<ClientAddr>,
        query: Query,
        capacity: usize,
    ) -> Subscription {
        let subscription = self.feed.client(peer).subscribe(query, capacity);
        self.announced(subscription).await
    }

    /// Like [`Cluster::subscribe`], the subscription holding the latest event
    /// of each series ([`Client::subscribe_latest`]).
    ///
    /// [`Client::subscribe_latest`]: crate::pubsub::Client::subscribe_latest
    pub async fn subscribe_latest(
        &self,
        peer: Option<ClientAddr>,
        query: Query,
        max_series: usize,
    ) -> Subscription {
        let subscription = self.feed.client(peer).subscribe_latest(query, max_series);
        self.announced(subscription).await
    }

    /// `subscription`, just made on this node's feed, once its query was
    /// announced to every owner.
    async fn announced(&self, subscription: Subscription) -> Subscription {
        if let Err(e) = self.declare(self.feed.queries(), true).await {
            // The periodic announcement retries; until then changes may be missed.
            tracing::warn!(error = %e, "Could not announce a subscription to the cluster.");
        }
        subscription
    }

    /// Where this node's cluster-wide subscribers are (for the metrics).
    pub fn feed(&self) -> &Arc<Pubsub> {
        &self.feed
    }

    /// Announces this node's queries; with `confirmed`, waits (up to the query
    /// timeout) until every live node has taken them in.
    async fn declare(&self, queries: Vec<String>, confirmed: bool) -> Result<(), String> {
        let interest = Interest {
            node: self.config.node_id.clone(),
            queries,
        };
        let payload = Bytes::from(serde_json::to_vec(&interest).map_err(|e| e.to_string())?);
        if !confirmed {
            return self
                .client
                .publish(INTEREST_SUBJECT, payload)
                .await
                .map_err(|e| e.to_string());
        }
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| e.to_string())?;
        self.client
            .publish_with_reply(INTEREST_SUBJECT, inbox, payload)
            .await
            .map_err(|e| e.to_string())?;
        let expected = self.members.load(Ordering::Relaxed).max(1);
        let confirmations = replies.by_ref().take(expected).count();
        match tokio::time::timeout(self.config.query_timeout, confirmations).await {
            Ok(_) => Ok(()),
            Err(_) => Err(format!(
                "not every one of {expected} nodes confirmed within {:?}",
                self.config.query_timeout
            )),
        }
    }
}

/// Re-announces this node's queries every renew interval while it has
/// subscribers, and once more (empty) after the last one left.
pub(super) async fn announce(cluster: Arc<Cluster>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(cluster.config.renew);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut announced = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        let queries = cluster.feed.queries();
        if queries.is_empty() && !announced {
            continue;
        }
        announced = !queries.is_empty();
        if let Err(e) = cluster.declare(queries, false).await {
            tracing::debug!(error = %e, "Could not renew the subscription interest.");
        }
    }
}

/// Hands the changes other nodes (and this one) forward to this node's feed.
pub(super) async fn receive(
    cluster: Arc<Cluster>,
    mut changes: async_nats::Subscriber,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            message = changes.next() => message,
            () = stop.cancelled() => return,
        };
        let Some(message) = message else { return };
        match Msg::decode(message.payload) {
            Ok(msg) => {
                for pb in msg.events {
                    // Every forwarded event has its time; 0 is never used.
                    cluster.feed.publish(&proto::from_pb(pb, 0));
                }
            }
            Err(e) => tracing::debug!(error = %e, "Undecodable cluster change skipped."),
        }
    }
}

/// One node's announced queries, and when they were last renewed.
struct Wanted {
    queries: Vec<Query>,
    renewed: Instant,
}

/// The owner side: which nodes want what, and the index subscription feeding them.
struct Tap {
    cluster: Arc<Cluster>,
    wanted: HashMap<String, Wanted>,
    /// The union query the subscription was made with ("" when there is none).
    tapped: String,
    subscription: Option<Subscription>,
}

/// Keeps the interests up to date and forwards matching index changes.
pub(super) async fn tap(
    cluster: Arc<Cluster>,
    mut interests: async_nats::Subscriber,
    stop: CancellationToken,
) {
    let mut sweep = tokio::time::interval(cluster.config.renew);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tap = Tap {
        cluster,
        wanted: HashMap::new(),
        tapped: String::new(),
        subscription: None,
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            message = interests.next() => {
                let Some(message) = message else { return };
                tap.heard(&message.payload);
                if let Some(reply) = message.reply {
                    // Confirms the interest is in force: the asker may snapshot now.
                    let _ = tap.cluster.client.publish(reply, Bytes::new()).await;
                }
            }
            _ = sweep.tick() => tap.sweep(),
            Some(first) = next_change(&mut tap.subscription) => tap.forward(first).await,
        }
    }
}

/// One query text matching what any of `texts` matches ("" for none).
fn union<'a>(texts: impl Iterator<Item = &'a str>) -> String {
    let texts: BTreeSet<&str> = texts.collect();
    match texts.len() {
        0 => String::new(),
        1 => texts.iter().map(|t| (*t).to_owned()).collect(),
        _ => texts
            .iter()
            .map(|t| format!("({t})"))
            .collect::<Vec<_>>()
            .join(" or "),
    }
}

async fn next_change(subscription: &mut Option<Subscription>) -> Option<Arc<Published>> {
    match subscription {
        Some(subscription) => subscription.recv().await,
        None => std::future::pending().await,
    }
}

impl Tap {
    /// Takes in one announcement; a malformed one is ignored.
    fn heard(&mut self, payload: &[u8]) {
        let interest: Interest = match serde_json::from_slice(payload) {
            Ok(interest) => interest,
            Err(e) => {
                tracing::debug!(error = %e, "Malformed subscription interest ignored.");
                return;
            }
        };
        if interest.queries.len() > MAX_QUERIES {
            tracing::warn!(
                node = %interest.node,
                queries = interest.queries.len(),
                "More subscription queries than {MAX_QUERIES}; the rest are ignored."
            );
        }
        let queries: Vec<Query> = interest
            .queries
            .iter()
            .take(MAX_QUERIES)
            .filter_map(|text| Query::parse(text).ok())
            .collect();
        if queries.is_empty() {
            self.wanted.remove(&interest.node);
        } else {
            let renewed = Instant::now();
            self.wanted
                .insert(interest.node, Wanted { queries, renewed });
        }
        self.retap();
    }

    /// Forgets interests not renewed within the lease TTL (their node died).
    fn sweep(&mut self) {
        let ttl = self.cluster.config.lease_ttl;
        let before = self.wanted.len();
        self.wanted.retain(|_, w| w.renewed.elapsed() <= ttl);
        if self.wanted.len() != before {
            self.retap();
        }
    }

    /// Re-subscribes to the index with the union of every wanted query, only
    /// when that union changed. The new subscription is made before the old
    /// one goes, so a change may arrive twice but none is missed.
    fn retap(&mut self) {
        let union = union(
            self.wanted
                .values()
                .flat_map(|w| w.queries.iter().map(Query::as_str)),
        );
        if union == self.tapped {
            return;
        }
        self.subscription = if union.is_empty() {
            None
        } else {
            // Too deep to nest once more: tap everything, forward() still filters.
            let query = Query::parse(&union)
                .or_else(|_| Query::parse("true"))
                .expect("`true` is a query");
            Some(
                self.cluster
                    .index
                    .pubsub()
                    .subscribe_lossy(query, TAP_CAPACITY),
            )
        };
        tracing::debug!(nodes = self.wanted.len(), union = %union, "Subscription tap changed.");
        self.tapped = union;
    }

    /// Sends `first` and whatever else is queued (one part's worth) to every
    /// node with a matching query, one message per node.
    async fn forward(&mut self, first: Arc<Published>) {
        let mut batch = vec![first];
        if let Some(subscription) = &mut self.subscription {
            while batch.len() < PART_EVENTS {
                match subscription.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
        }
        for (node, wanted) in &self.wanted {
            let matching: Vec<&Event> = (batch.iter().map(|published| -> &Event { published }))
                .filter(|e| wanted.queries.iter().any(|q| q.matches(e)))
                .collect();
            for part in parts(&matching, |e| e.approx_bytes()) {
                let payload = Bytes::from(
                    Msg {
                        events: part.iter().map(|e| proto::to_pb(e)).collect(),
                        ..Msg::default()
                    }
                    .encode_to_vec(),
                );
                let client = &self.cluster.client;
                if let Err(e) = client.publish(changes_subject(node), payload).await {
                    let dropped = &self.cluster.index.pubsub().stats.dropped;
                    dropped.fetch_add(part.len() as u64, Ordering::Relaxed);
                    tracing::debug!(node = %node, error = %e, "Could not forward changes.");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interest_round_trips_as_json() {
        let interest = Interest {
            node: "n1".to_owned(),
            queries: vec![r#"service = "cpu""#.to_owned()],
        };
        let back: Interest =
            serde_json::from_slice(&serde_json::to_vec(&interest).unwrap()).unwrap();
        assert_eq!(back.node, "n1");
        assert_eq!(back.queries, interest.queries);
    }

    #[test]
    fn a_union_of_queries_matches_what_either_does() {
        assert_eq!(union(std::iter::empty()), "");
        assert_eq!(union(["true", "true"].into_iter()), "true");
        let text = union([r#"service = "a""#, r#"host = "h" and metric > 1"#].into_iter());
        assert_eq!(text, r#"(host = "h" and metric > 1) or (service = "a")"#);
        let union = Query::parse(&text).unwrap();
        let event = |host: &str, service: &str| Event {
            host: Some(host.to_owned()),
            service: Some(service.to_owned()),
            ..Event::default()
        };
        assert!(union.matches(&event("x", "a")));
        assert!(!union.matches(&event("h", "b")), "no metric");
        assert!(!union.matches(&event("y", "b")));
    }
}
