//! The index: the latest event per `(host, service)`, with TTL expiry.
//!
//! Sharded by key hash so ingest never takes a global lock. Each shard keeps its
//! entries in a hash table and their expiry deadlines in an ordered set, so an
//! expiry pass touches only what is due instead of scanning everything.
//!
//! Deadlines are re-armed lazily: a refresh that pushes an entry's deadline later
//! (the common case: an agent reporting every few seconds) only updates the entry;
//! when its old slot in the deadline set comes due, the entry is found alive and
//! re-scheduled once. Each entry holds exactly one slot in the set.

use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use hashbrown::{DefaultHashBuilder, HashTable};
use parking_lot::Mutex;

use crate::clock::{Micros, secs_to_micros};
use crate::event::Event;
use crate::pubsub::Pubsub;
use crate::query::Query;

/// Riemann's default when an event carries no TTL.
pub const DEFAULT_TTL_SECS: f64 = 60.0;

const SHARDS: usize = 64;

/// How many due deadlines an expiry pass handles per shard lock, so a mass expiry
/// never holds a shard away from ingest for long.
const EXPIRE_CHUNK: usize = 1024;

#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// TTL in seconds for events that carry none.
    pub default_ttl: f64,
    /// Refuse (and count) new keys beyond this many entries; `None` is unbounded.
    pub max_entries: Option<usize>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            default_ttl: DEFAULT_TTL_SECS,
            max_entries: None,
        }
    }
}

/// What [`Index::insert`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    Added,
    Replaced,
    /// The event had state `expired`: its key was deleted (or was absent).
    Removed,
    /// A new key while the index was full.
    Refused,
}

pub struct Index {
    shards: Box<[Mutex<Shard>]>,
    /// Live subscribers see every stored event and every expiry.
    pubsub: Arc<Pubsub>,
    hasher: DefaultHashBuilder,
    config: IndexConfig,
    len: AtomicUsize,
    refused: AtomicU64,
    expired: AtomicU64,
}

#[derive(Default)]
struct Shard {
    /// Boxed: a hash table is up to half empty after it grows, and empty
    /// buckets then cost a pointer instead of a whole entry (measured: 658 →
    /// about 420 bytes of RSS per entry at a million keys).
    entries: HashTable<Box<Entry>>,
    /// `(deadline, entry id, key hash)`; the id makes elements unique, the hash
    /// finds the entry again without storing its key twice.
    deadlines: BTreeSet<(Micros, u64, u64)>,
    next_id: u64,
}

struct Entry {
    event: Event,
    id: u64,
    /// When the current event's TTL runs out.
    deadline: Micros,
    /// Where this entry sits in `Shard::deadlines`; never later than `deadline`.
    scheduled: Micros,
}

impl Index {
    pub fn new(config: IndexConfig) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            pubsub: Pubsub::new(),
            hasher: DefaultHashBuilder::default(),
            config,
            len: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            expired: AtomicU64::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where subscriptions to what the index stores and expires are made.
    pub fn pubsub(&self) -> &Arc<Pubsub> {
        &self.pubsub
    }

    /// TTL in seconds applied to events that carry none.
    pub fn default_ttl(&self) -> f64 {
        self.config.default_ttl
    }

    /// New keys refused because the index was full, since start.
    pub fn refused_total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Entries removed by TTL expiry, since start.
    pub fn expired_total(&self) -> u64 {
        self.expired.load(Ordering::Relaxed)
    }

    fn hash(&self, host: &str, service: &str) -> u64 {
        self.hasher.hash_one((host, service))
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        // Middle bits: hashbrown uses the low bits for buckets and the top 7 for
        // tags, so picking shards by either would cluster entries inside a shard.
        &self.shards[(hash >> 32) as usize % SHARDS]
    }

    fn deadline(&self, event: &Event) -> Micros {
        let ttl = match event.ttl {
            Some(ttl) if !ttl.is_nan() => f64::from(ttl),
            _ => self.config.default_ttl,
        };
        event.time.saturating_add(secs_to_micros(ttl))
    }

    /// Stores a copy of `event` as the latest for its key (reusing the previous
    /// copy's allocations); an `expired` event deletes the key.
    pub fn insert(&self, event: &Event) -> Insert {
        let outcome = self.store(event);
        // Published outside the shard lock: subscribers never slow the shard.
        if matches!(outcome, Insert::Added | Insert::Replaced) {
            self.pubsub.publish(event);
        }
        outcome
    }

    fn store(&self, event: &Event) -> Insert {
        let hash = self.hash(event.host_str(), event.service_str());
        let mut shard = self.shard(hash).lock();
        let shard = &mut *shard;
        let found = shard
            .entries
            .find_entry(hash, |e| same_key(&e.event, event));
        if event.is_expired_state() {
            if let Ok(occupied) = found {
                let (entry, _) = occupied.remove();
                shard.deadlines.remove(&(entry.scheduled, entry.id, hash));
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            return Insert::Removed;
        }
        let deadline = self.deadline(event);
        match found {
            Ok(mut occupied) => {
                let entry = occupied.get_mut();
                entry.event.clone_from(event);
                entry.deadline = deadline;
                if deadline < entry.scheduled {
                    shard.deadlines.remove(&(entry.scheduled, entry.id, hash));
                    shard.deadlines.insert((deadline, entry.id, hash));
                    entry.scheduled = deadline;
                }
                Insert::Replaced
            }
            Err(_) => {
                if !self.reserve_slot() {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Insert::Refused;
                }
                let id = shard.next_id;
                shard.next_id += 1;
                shard.deadlines.insert((deadline, id, hash));
                let hasher = &self.hasher;
                shard.entries.insert_unique(
                    hash,
                    Box::new(Entry {
                        event: event.clone(),
                        id,
                        deadline,
                        scheduled: deadline,
                    }),
                    |e| hasher.hash_one((e.event.host_str(), e.event.service_str())),
                );
                Insert::Added
            }
        }
    }

    fn reserve_slot(&self) -> bool {
        match self.config.max_entries {
            None => {
                self.len.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(max) => self
                .len
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok(),
        }
    }

    /// The entry for exactly this key: a hash lookup, never a scan.
    pub fn get(&self, host: &str, service: &str) -> Option<Event> {
        let hash = self.hash(host, service);
        let shard = self.shard(hash).lock();
        shard
            .entries
            .find(hash, |e| {
                e.event.host_str() == host && e.event.service_str() == service
            })
            .map(|e| e.event.clone())
    }

    /// Every entry the query matches. `host = X and service = Y` is a direct lookup.
    pub fn query(&self, query: &Query) -> Vec<Event> {
        if let Some((host, service)) = query.exact_key() {
            return self
                .get(host, service)
                .filter(|e| query.matches(e))
                .into_iter()
                .collect();
        }
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            out.extend(
                shard
                    .entries
                    .iter()
                    .filter(|e| query.matches(&e.event))
                    .map(|e| e.event.clone()),
            );
        }
        out
    }

    /// A copy of every entry, for snapshots. Locks one shard at a time, so
    /// ingest only ever waits for one shard's copy, never for the whole index.
    pub fn entries(&self) -> Vec<Event> {
        let mut out = Vec::with_capacity(self.len());
        for shard in self.shards.iter() {
            out.extend(shard.lock().entries.iter().map(|e| e.event.clone()));
        }
        out
    }

    /// Removes every entry `select` picks, quietly: no expiry notice, nothing
    /// to subscribers (a cluster node forgetting a shard it no longer owns).
    /// One shard locked at a time; returns how many went.
    pub fn remove_where(&self, select: impl Fn(&Event) -> bool) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let shard = &mut *shard;
            let before = shard.entries.len();
            let deadlines = &mut shard.deadlines;
            let hasher = &self.hasher;
            shard.entries.retain(|entry| {
                if !select(&entry.event) {
                    return true;
                }
                let hash = hasher.hash_one((entry.event.host_str(), entry.event.service_str()));
                deadlines.remove(&(entry.scheduled, entry.id, hash));
                false
            });
            removed += before - shard.entries.len();
        }
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Removes every entry whose deadline is before `now` and hands the
    /// `expired` notices for them to `emit` (to be run back through the
    /// streams), a chunk at a time, shard by shard: no shard is locked while
    /// `emit` runs, and a mass expiry holds at most one shard's notices at
    /// once. Returns how many expired.
    pub fn expire(&self, now: Micros, emit: impl FnMut(&[Event])) -> usize {
        self.expire_where(now, |_| true, emit)
    }

    /// Like [`Index::expire`], but an entry `may_expire` refuses stays (due,
    /// and looked at again by the next pass): a cluster node holds back the
    /// expiry of a shard it is replaying or handing over.
    pub fn expire_where(
        &self,
        now: Micros,
        may_expire: impl Fn(&Event) -> bool,
        mut emit: impl FnMut(&[Event]),
    ) -> usize {
        let mut expired = Vec::with_capacity(EXPIRE_CHUNK);
        let mut total = 0;
        for shard in self.shards.iter() {
            let more = self.expire_chunk(&mut shard.lock(), now, &may_expire, &mut expired);
            if more {
                self.sweep(&mut shard.lock(), now, &may_expire, &mut expired);
            }
            for chunk in expired.chunks(EXPIRE_CHUNK) {
                self.expired
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                for event in chunk {
                    self.pubsub.publish(event);
                }
                emit(chunk);
            }
            total += expired.len();
            expired.clear();
        }
        total
    }

    /// A mass expiry (more than a chunk due in one shard): walks the shard's
    /// table in memory order once, instead of chasing each due deadline to an
    /// entry at a random address. The shard is locked for one pass over it.
    fn sweep(
        &self,
        shard: &mut Shard,
        now: Micros,
        may_expire: &impl Fn(&Event) -> bool,
        out: &mut Vec<Event>,
    ) {
        let not_due = shard.deadlines.split_off(&(now, 0, 0));
        // The due slots are all settled below: expired, or re-armed.
        shard.deadlines = not_due;
        let deadlines = &mut shard.deadlines;
        let hasher = &self.hasher;
        let mut removed = 0;
        shard.entries.retain(|entry| {
            if entry.deadline < now && may_expire(&entry.event) {
                out.push(std::mem::take(&mut entry.event).into_expired(now));
                removed += 1;
                return false;
            }
            if entry.scheduled < now {
                entry.scheduled = entry.deadline;
                let hash = hasher.hash_one((entry.event.host_str(), entry.event.service_str()));
                deadlines.insert((entry.deadline, entry.id, hash));
            }
            true
        });
        self.len.fetch_sub(removed, Ordering::Relaxed);
    }

    /// Handles up to [`EXPIRE_CHUNK`] due deadlines one by one; true if more
    /// may be due.
    fn expire_chunk(
        &self,
        shard: &mut Shard,
        now: Micros,
        may_expire: &impl Fn(&Event) -> bool,
        out: &mut Vec<Event>,
    ) -> bool {
        // Due but held back: their slots go back after the loop, which would
        // otherwise meet them again at once.
        let mut held = Vec::new();
        let mut more = true;
        for _ in 0..EXPIRE_CHUNK {
            let Some(&(scheduled, id, hash)) = shard.deadlines.first() else {
                more = false;
                break;
            };
            // Riemann expires when `now - time > ttl`, i.e. strictly after the deadline.
            if scheduled >= now {
                more = false;
                break;
            }
            shard.deadlines.pop_first();
            let Ok(occupied) = shard.entries.find_entry(hash, |e| e.id == id) else {
                continue;
            };
            if occupied.get().deadline < now && !may_expire(&occupied.get().event) {
                held.push((scheduled, id, hash));
            } else if occupied.get().deadline < now {
                let (entry, _) = occupied.remove();
                self.len.fetch_sub(1, Ordering::Relaxed);
                out.push(entry.event.into_expired(now));
            } else {
                // Refreshed since it was scheduled: re-arm at the real deadline.
                let entry = occupied.into_mut();
                entry.scheduled = entry.deadline;
                shard.deadlines.insert((entry.deadline, id, hash));
            }
        }
        shard.deadlines.extend(held);
        more
    }
}

fn same_key(a: &Event, b: &Event) -> bool {
    a.host_str() == b.host_str() && a.service_str() == b.service_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MICROS_PER_SEC;
    use crate::event::Metric;

    const T0: Micros = 1_700_000_000 * MICROS_PER_SEC;

    fn expire_all(index: &Index, now: Micros) -> Vec<Event> {
        let mut out = Vec::new();
        index.expire(now, |chunk| out.extend_from_slice(chunk));
        out
    }

    fn event(host: &str, service: &str, time: Micros, ttl: Option<f32>) -> Event {
        Event {
            host: Some(host.into()),
            service: Some(service.into()),
            state: Some("ok".into()),
            time,
            ttl,
            metric: Some(Metric::Int(1)),
            ..Event::default()
        }
    }

    fn secs(s: i64) -> Micros {
        s * MICROS_PER_SEC
    }

    #[test]
    fn insert_replace_and_get() {
        let index = Index::new(IndexConfig::default());
        assert_eq!(index.insert(&event("a", "x", T0, None)), Insert::Added);
        let mut newer = event("a", "x", T0 + 1, None);
        newer.metric = Some(Metric::Float(2.5));
        assert_eq!(index.insert(&newer.clone()), Insert::Replaced);
        assert_eq!(index.insert(&event("a", "y", T0, None)), Insert::Added);
        assert_eq!(index.len(), 2);
        assert_eq!(index.get("a", "x"), Some(newer));
        assert_eq!(index.get("b", "x"), None);
    }

    #[test]
    fn missing_host_and_empty_host_share_a_key() {
        let index = Index::new(IndexConfig::default());
        let mut e = event("", "x", T0, None);
        e.host = None;
        index.insert(&e);
        assert!(index.get("", "x").is_some());
    }

    #[test]
    fn expires_strictly_after_ttl_and_emits_expired() {
        let index = Index::new(IndexConfig::default());
        let mut e = event("a", "x", T0, Some(10.0));
        e.tags = vec!["keep".into()];
        index.insert(&e);
        assert!(
            expire_all(&index, T0 + secs(10)).is_empty(),
            "not before time + ttl"
        );
        let expired = expire_all(&index, T0 + secs(10) + 1);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].state.as_deref(), Some("expired"));
        assert_eq!(expired[0].time, T0 + secs(10) + 1);
        assert_eq!(expired[0].tags, vec!["keep".to_owned()]);
        assert_eq!(index.get("a", "x"), None);
        assert_eq!(index.len(), 0);
        assert_eq!(index.expired_total(), 1);
        assert!(
            expire_all(&index, T0 + secs(100)).is_empty(),
            "expires once"
        );
    }

    #[test]
    fn held_entries_stay_until_allowed_to_expire() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("held", "x", T0, Some(1.0)));
        index.insert(&event("free", "x", T0, Some(1.0)));
        let later = T0 + secs(5);
        let held = |e: &Event| e.host_str() != "held";
        let mut out = Vec::new();
        assert_eq!(
            index.expire_where(later, held, |c| out.extend_from_slice(c)),
            1
        );
        assert_eq!(out[0].host_str(), "free");
        assert!(index.get("held", "x").is_some(), "held back, still indexed");
        out.clear();
        assert_eq!(
            index.expire_where(later, held, |c| out.extend_from_slice(c)),
            0
        );
        assert_eq!(expire_all(&index, later).len(), 1, "expires once allowed");
        assert!(index.is_empty());
    }

    #[test]
    fn removed_entries_leave_no_deadline_behind() {
        let index = Index::new(IndexConfig::default());
        let mut sub = index.pubsub().subscribe(Query::parse("true").unwrap(), 100);
        for i in 0..100 {
            let host = if i % 4 == 0 { "gone" } else { "kept" };
            index.insert(&event(host, &i.to_string(), T0, Some(1.0)));
        }
        while sub.rx.try_recv().is_ok() {}
        assert_eq!(index.remove_where(|e| e.host_str() == "gone"), 25);
        assert_eq!(index.len(), 75);
        assert!(index.get("gone", "0").is_none());
        assert!(sub.rx.try_recv().is_err(), "quietly");
        let expired = expire_all(&index, T0 + secs(5));
        assert_eq!(expired.len(), 75);
        assert!(expired.iter().all(|e| e.host_str() == "kept"));
    }

    #[test]
    fn a_mass_expiry_holds_back_too() {
        let index = Index::new(IndexConfig::default());
        let n = SHARDS * EXPIRE_CHUNK * 2;
        for i in 0..n {
            let host = if i % 2 == 0 { "held" } else { "free" };
            index.insert(&event(host, &i.to_string(), T0, Some(1.0)));
        }
        let expired = index.expire_where(T0 + secs(5), |e| e.host_str() == "free", |_| {});
        assert_eq!(expired, n / 2);
        assert_eq!(index.len(), n / 2);
        assert_eq!(expire_all(&index, T0 + secs(5)).len(), n / 2);
    }

    #[test]
    fn default_ttl_applies_without_event_ttl() {
        let index = Index::new(IndexConfig {
            default_ttl: 5.0,
            max_entries: None,
        });
        index.insert(&event("a", "x", T0, None));
        assert!(expire_all(&index, T0 + secs(5)).is_empty());
        assert_eq!(expire_all(&index, T0 + secs(6)).len(), 1);
    }

    #[test]
    fn refresh_postpones_expiry() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("a", "x", T0, Some(10.0)));
        index.insert(&event("a", "x", T0 + secs(8), Some(10.0)));
        assert!(
            expire_all(&index, T0 + secs(11)).is_empty(),
            "re-armed, not expired"
        );
        assert!(index.get("a", "x").is_some());
        assert!(expire_all(&index, T0 + secs(18)).is_empty());
        assert_eq!(expire_all(&index, T0 + secs(19)).len(), 1);
    }

    #[test]
    fn shorter_ttl_brings_expiry_forward() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("a", "x", T0, Some(100.0)));
        index.insert(&event("a", "x", T0, Some(1.0)));
        assert_eq!(expire_all(&index, T0 + secs(2)).len(), 1);
        assert!(
            expire_all(&index, T0 + secs(200)).is_empty(),
            "old slot was dropped"
        );
    }

    #[test]
    fn expired_state_deletes_the_key() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("a", "x", T0, None));
        let mut gone = event("a", "x", T0, None);
        gone.state = Some("expired".into());
        assert_eq!(index.insert(&gone.clone()), Insert::Removed);
        assert_eq!(index.len(), 0);
        assert!(
            expire_all(&index, T0 + secs(1000)).is_empty(),
            "no ghost deadline"
        );
        assert_eq!(index.insert(&gone), Insert::Removed, "absent key is fine");
    }

    #[test]
    fn cap_refuses_and_counts_new_keys_but_updates_existing() {
        let index = Index::new(IndexConfig {
            default_ttl: 60.0,
            max_entries: Some(2),
        });
        assert_eq!(index.insert(&event("a", "1", T0, None)), Insert::Added);
        assert_eq!(index.insert(&event("a", "2", T0, None)), Insert::Added);
        assert_eq!(index.insert(&event("a", "3", T0, None)), Insert::Refused);
        assert_eq!(
            index.insert(&event("a", "1", T0 + 1, None)),
            Insert::Replaced
        );
        assert_eq!((index.len(), index.refused_total()), (2, 1));
        assert!(index.get("a", "3").is_none());
    }

    #[test]
    fn odd_ttls_never_overflow() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("a", "inf", T0, Some(f32::INFINITY)));
        index.insert(&event("a", "nan", T0, Some(f32::NAN)));
        index.insert(&event("a", "neg", T0, Some(-5.0)));
        index.insert(&event("a", "late", i64::MAX, Some(f32::MAX)));
        let expired: Vec<_> = expire_all(&index, T0 + 1)
            .into_iter()
            .map(|e| e.service)
            .collect();
        assert_eq!(expired, vec![Some("neg".to_owned())]);
        // NaN falls back to the default TTL.
        let expired = expire_all(&index, T0 + secs(61));
        assert_eq!(expired[0].service.as_deref(), Some("nan"));
        assert!(index.get("a", "inf").is_some() && index.get("a", "late").is_some());
    }

    #[test]
    fn mass_expiry_crosses_chunks() {
        let index = Index::new(IndexConfig::default());
        let n = SHARDS * EXPIRE_CHUNK * 2;
        for i in 0..n {
            index.insert(&event("h", &i.to_string(), T0, Some(1.0)));
        }
        assert_eq!(expire_all(&index, T0 + secs(2)).len(), n);
        assert!(index.is_empty());
    }

    #[test]
    fn entries_copies_every_shard() {
        let index = Index::new(IndexConfig::default());
        let n = SHARDS * 4;
        for i in 0..n {
            index.insert(&event("h", &i.to_string(), T0, None));
        }
        let mut services: Vec<usize> = index
            .entries()
            .iter()
            .map(|e| e.service_str().parse().unwrap())
            .collect();
        services.sort_unstable();
        assert_eq!(services, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn subscribers_see_stored_and_expired_events_but_not_refusals() {
        let index = Index::new(IndexConfig {
            default_ttl: 60.0,
            max_entries: Some(1),
        });
        let mut sub = index
            .pubsub()
            .subscribe(Query::parse(r#"host = "a""#).unwrap(), 10);
        index.insert(&event("a", "x", T0, Some(1.0)));
        index.insert(&event("a", "refused", T0, None));
        index.insert(&event("b", "x", T0, None));
        expire_all(&index, T0 + secs(2));
        let states: Vec<_> = std::iter::from_fn(|| sub.rx.try_recv().ok())
            .map(|e| (e.service.unwrap(), e.state.unwrap()))
            .collect();
        assert_eq!(
            states,
            vec![
                ("x".to_owned(), "ok".to_owned()),
                ("x".to_owned(), "expired".to_owned())
            ]
        );
    }

    #[test]
    fn mass_expiry_keeps_and_rearms_refreshed_entries() {
        let index = Index::new(IndexConfig::default());
        let n = SHARDS * EXPIRE_CHUNK * 2;
        for i in 0..n {
            index.insert(&event("h", &i.to_string(), T0, Some(1.0)));
        }
        // Every other key reports again before the mass expiry.
        for i in (0..n).step_by(2) {
            index.insert(&event("h", &i.to_string(), T0 + secs(5), Some(10.0)));
        }
        let expired = expire_all(&index, T0 + secs(2));
        assert_eq!(expired.len(), n / 2);
        assert!(
            expired
                .iter()
                .all(|e| e.service_str().parse::<usize>().unwrap() % 2 == 1)
        );
        assert_eq!(index.len(), n / 2);
        assert!(
            expire_all(&index, T0 + secs(15)).is_empty(),
            "re-armed at their deadline"
        );
        assert_eq!(expire_all(&index, T0 + secs(15) + 1).len(), n / 2);
        assert!(index.is_empty());
    }

    #[test]
    fn query_scans_and_exact_key_looks_up() {
        let index = Index::new(IndexConfig::default());
        index.insert(&event("a", "cpu user", T0, None));
        index.insert(&event("a", "cpu system", T0, None));
        index.insert(&event("b", "disk", T0, None));
        let q = Query::parse(r#"service =~ "cpu%""#).unwrap();
        let mut services: Vec<_> = index.query(&q).into_iter().map(|e| e.service).collect();
        services.sort();
        assert_eq!(
            services,
            vec![Some("cpu system".to_owned()), Some("cpu user".to_owned())]
        );
        let q = Query::parse(r#"host = "b" and service = "disk""#).unwrap();
        assert!(q.exact_key().is_some());
        assert_eq!(index.query(&q).len(), 1);
        let q = Query::parse(r#"host = "b" and service = "nope""#).unwrap();
        assert!(index.query(&q).is_empty());
    }
}
