//! Which cluster work each undelivered page came from, so a node's saved
//! progress never passes a page it has not delivered, and a page of a shard
//! the node no longer owns is left to the shard's new owner.
//!
//! A cluster node saves, per shard, how far it ran the shard's events and its
//! expiry; the next owner replays up to there with outputs suppressed (see
//! `src/cluster/README.md`). A page made there but not yet delivered when the
//! node dies (a receiver outage, a crash) would be lost: the dead node had it
//! only in memory, and the replay makes it again only to suppress it. So the
//! rules' thread names the [`Work`] it is doing ([`made_by`]), a pager's queue
//! *holds* it for each page it accepts, and releases it once the page is
//! settled (delivered, or refused for good). The node saves progress only up
//! to just before the oldest work still held: the next owner runs that work
//! live again and pages it. Pages made by anything else (timers of windows
//! and rates, self-metrics, a single node) carry no origin.
//!
//! When the node stops owning a shard (handed over, fenced, lease lost), the
//! shard is *disowned*: its pages still undelivered here are dropped before
//! their next attempt, since the next owner makes them again, in order with
//! the shard's later pages. Sending them from here too could land a trigger
//! after the new owner's resolve, leaving the incident open. Not waiting for
//! the disowning: a page is this node's to send only while its shard's local
//! lease deadline is ahead ([`Holds::time_left`]), which a process resumed
//! from a pause sees passed before its lease timer has run; and an attempt
//! in flight is cut at that deadline, or once the shard is disowned (handed
//! back: the lease is deleted only after), before another node can take it.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;
use std::time::Duration;

use parking_lot::Mutex;

use crate::clock::Micros;
use crate::event::Event;

/// What the rules' thread is doing, as [`made_by`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A shard's JetStream message at `seq`, run through the rules.
    Event { shard: u32, seq: u64 },
    /// An expiry pass of entries whose TTL ran out at or after `since` (the
    /// previous pass's time), of any shard.
    Expiry { since: Micros },
}

/// The work one page was made by, in the shard it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    shard: u32,
    /// The shard's ownership when the page was made: a page of an earlier
    /// ownership of the shard is not this node's to send.
    epoch: u64,
    made: Made,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Made {
    Event { seq: u64 },
    Expiry { since: Micros },
}

thread_local! {
    /// Set while [`made_by`] runs its closure on this thread.
    static WORK: Cell<Option<Work>> = const { Cell::new(None) };
}

/// Runs `f` (a batch through the rules) with every page it makes marked as
/// made by `work`.
pub fn made_by<R>(work: Work, f: impl FnOnce() -> R) -> R {
    let outer = WORK.with(|w| w.replace(Some(work)));
    let result = f();
    WORK.with(|w| w.set(outer));
    result
}

/// What the rules on this thread are doing now, if [`made_by`] said.
pub fn current() -> Option<Work> {
    WORK.with(Cell::get)
}

/// Which shard an event belongs to.
pub type Sharding = Box<dyn Fn(&Event) -> u32 + Send + Sync>;

/// How long this node may still run a shard (zero once its local lease
/// deadline passed, or the shard is not its own).
pub type LeaseLeft = Box<dyn Fn(u32) -> Duration + Send + Sync>;

/// The work held by undelivered pages, counted per origin (the same message
/// may page several times, through several outputs), and each shard's
/// ownership epoch.
#[derive(Default)]
pub struct Holds {
    held: Mutex<HashMap<u32, Shard>>,
    /// Set by a cluster node: an expiry's page belongs to its host's shard.
    sharding: OnceLock<Sharding>,
    /// Set by a cluster node: a page is its to send within its shard's lease.
    lease_left: OnceLock<LeaseLeft>,
}

#[derive(Debug, Default)]
struct Shard {
    epoch: u64,
    events: BTreeMap<u64, usize>,
    expiries: BTreeMap<Micros, usize>,
}

impl Shard {
    fn counts(&mut self, made: Made) -> &mut usize {
        match made {
            Made::Event { seq } => self.events.entry(seq).or_default(),
            Made::Expiry { since } => self.expiries.entry(since).or_default(),
        }
    }
}

impl Holds {
    /// How an expiry's page finds its shard; set once, by the cluster.
    pub fn set_sharding(&self, sharding: Sharding) {
        let _ = self.sharding.set(sharding);
    }

    /// How long a shard's pages are this node's to send; set once, by the
    /// cluster.
    pub fn set_lease_left(&self, lease_left: LeaseLeft) {
        let _ = self.lease_left.set(lease_left);
    }

    /// The origin of `page`, made by `work` now.
    pub fn origin(&self, work: Work, page: &Event) -> Origin {
        let (shard, made) = match work {
            Work::Event { shard, seq } => (shard, Made::Event { seq }),
            Work::Expiry { since } => {
                let shard = self.sharding.get().map_or(0, |shard_of| shard_of(page));
                (shard, Made::Expiry { since })
            }
        };
        let epoch = self.held.lock().get(&shard).map_or(0, |s| s.epoch);
        Origin { shard, epoch, made }
    }

    /// A page made by `origin` was accepted.
    pub fn hold(&self, origin: Origin) {
        let mut held = self.held.lock();
        let shard = held.entry(origin.shard).or_default();
        if shard.epoch == origin.epoch {
            *shard.counts(origin.made) += 1;
        }
    }

    /// A page made by `origin` was settled, or dropped.
    pub fn release(&self, origin: Origin) {
        let mut held = self.held.lock();
        let Some(shard) = held.get_mut(&origin.shard) else {
            return;
        };
        if shard.epoch != origin.epoch {
            return;
        }
        match origin.made {
            Made::Event { seq } => forget_one(&mut shard.events, seq),
            Made::Expiry { since } => forget_one(&mut shard.expiries, since),
        }
    }

    /// How much longer a page made by `origin` is this node's to send: `None`
    /// once the shard was disowned since, or its lease deadline passed.
    pub fn time_left(&self, origin: Origin) -> Option<Duration> {
        let epoch = self.held.lock().get(&origin.shard).map_or(0, |s| s.epoch);
        if epoch != origin.epoch {
            return None;
        }
        let Some(lease_left) = self.lease_left.get() else {
            return Some(Duration::MAX);
        };
        Some(lease_left(origin.shard)).filter(|left| !left.is_zero())
    }

    /// This node no longer owns `shard`: its undelivered pages are the next
    /// owner's to make and send.
    pub fn disown(&self, shard: u32) {
        let mut held = self.held.lock();
        let shard = held.entry(shard).or_default();
        *shard = Shard {
            epoch: shard.epoch + 1,
            ..Shard::default()
        };
    }

    /// How far `shard`'s events may be saved as run: `processed`, or just
    /// before its oldest message with a page undelivered.
    pub fn seq_settled(&self, shard: u32, processed: u64) -> u64 {
        let held = self.held.lock();
        let oldest = held.get(&shard).and_then(|s| s.events.keys().next());
        oldest.map_or(processed, |&seq| processed.min(seq.saturating_sub(1)))
    }

    /// How far `shard`'s expiry may be saved as done: `expired_until`, or
    /// the start of its oldest pass with a page undelivered.
    pub fn expiry_settled(&self, shard: u32, expired_until: Micros) -> Micros {
        let held = self.held.lock();
        let oldest = held.get(&shard).and_then(|s| s.expiries.keys().next());
        oldest.map_or(expired_until, |&since| expired_until.min(since))
    }
}

fn forget_one<K: Ord>(counts: &mut BTreeMap<K, usize>, key: K) {
    if let Some(count) = counts.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            counts.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(host: &str) -> Event {
        Event {
            host: Some(host.into()),
            ..Event::default()
        }
    }

    #[test]
    fn progress_stops_before_the_oldest_message_with_a_page_undelivered() {
        let holds = Holds::default();
        let made = |seq| holds.origin(Work::Event { shard: 3, seq }, &page("web"));
        assert_eq!(holds.seq_settled(3, 100), 100, "nothing held");
        let (at_40, at_70) = (made(40), made(70));
        holds.hold(at_40);
        holds.hold(at_40);
        holds.hold(at_70);
        assert_eq!(holds.seq_settled(3, 100), 39);
        assert_eq!(holds.seq_settled(4, 100), 100, "another shard");
        holds.release(at_40);
        assert_eq!(
            holds.seq_settled(3, 100),
            39,
            "one of message 40's pages is left"
        );
        holds.release(at_40);
        assert_eq!(holds.seq_settled(3, 100), 69);
        holds.release(at_70);
        assert_eq!(holds.seq_settled(3, 100), 100);
        assert!(
            holds.held.lock()[&3].events.is_empty(),
            "nothing kept once released"
        );
    }

    #[test]
    fn an_expirys_page_holds_its_hosts_shard_from_the_start_of_its_pass() {
        let holds = Holds::default();
        holds.set_sharding(Box::new(|e: &Event| e.host_str().len() as u32));
        let early = holds.origin(Work::Expiry { since: 2_000 }, &page("ab"));
        let late = holds.origin(Work::Expiry { since: 5_000 }, &page("ab"));
        holds.hold(early);
        holds.hold(late);
        assert_eq!(holds.expiry_settled(2, 9_000), 2_000);
        assert_eq!(holds.expiry_settled(3, 9_000), 9_000, "another shard");
        assert_eq!(
            holds.expiry_settled(2, 1_000),
            1_000,
            "never later than the expiry"
        );
        holds.release(early);
        assert_eq!(holds.expiry_settled(2, 9_000), 5_000);
        holds.release(late);
        assert_eq!(holds.expiry_settled(2, 9_000), 9_000);
    }

    #[test]
    fn a_disowned_shards_pages_are_no_longer_current_nor_held() {
        let holds = Holds::default();
        let before = holds.origin(Work::Event { shard: 1, seq: 7 }, &page("web"));
        holds.hold(before);
        assert_eq!(holds.time_left(before), Some(Duration::MAX));
        holds.disown(1);
        assert_eq!(holds.time_left(before), None);
        assert_eq!(holds.seq_settled(1, 10), 10, "the next owner has it");
        // Owned again: the new ownership's pages hold, the old ones do not.
        let after = holds.origin(Work::Event { shard: 1, seq: 9 }, &page("web"));
        holds.hold(before);
        holds.hold(after);
        assert_eq!(holds.seq_settled(1, 10), 8);
        holds.release(before);
        assert_eq!(
            holds.seq_settled(1, 10),
            8,
            "a stale release changes nothing"
        );
        holds.release(after);
        assert_eq!(holds.seq_settled(1, 10), 10);
    }

    #[test]
    fn a_shards_pages_are_no_longer_current_once_its_lease_deadline_passed() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        let holds = Holds::default();
        let left_ms = Arc::new(AtomicU64::new(1_500));
        let lease = Arc::clone(&left_ms);
        holds.set_lease_left(Box::new(move |shard| {
            let ms = if shard == 1 {
                lease.load(Ordering::Relaxed)
            } else {
                0
            };
            Duration::from_millis(ms)
        }));
        let page_of_1 = holds.origin(Work::Event { shard: 1, seq: 7 }, &page("web"));
        assert_eq!(
            holds.time_left(page_of_1),
            Some(Duration::from_millis(1_500))
        );
        // A process resumed from a pause: the deadline passed, the lease
        // timer that disowns the shard has not run yet.
        left_ms.store(0, Ordering::Relaxed);
        assert_eq!(holds.time_left(page_of_1), None);
        let page_of_2 = holds.origin(Work::Event { shard: 2, seq: 7 }, &page("web"));
        assert_eq!(holds.time_left(page_of_2), None, "a shard not held");
    }

    #[test]
    fn the_work_is_set_only_inside_made_by_and_nests() {
        assert_eq!(current(), None);
        let outer = Work::Event { shard: 1, seq: 7 };
        let inner = Work::Expiry { since: 5 };
        made_by(outer, || {
            assert_eq!(current(), Some(outer));
            made_by(inner, || assert_eq!(current(), Some(inner)));
            assert_eq!(current(), Some(outer));
        });
        assert_eq!(current(), None);
    }
}
