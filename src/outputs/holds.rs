//! Which cluster work each undelivered page came from, so a node's saved
//! progress never passes a page it has not delivered.
//!
//! A cluster node saves, per shard, how far it ran the shard's events and its
//! expiry; the next owner replays up to there with outputs suppressed (see
//! `src/cluster/README.md`). A page made there but not yet delivered when the
//! node dies (a receiver outage, a crash) would be lost: the dead node had it
//! only in memory, and the replay makes it again only to suppress it. So the
//! rules' thread names the work it is doing ([`made_by`]), a pager's queue
//! *holds* that work for each page it accepts, and releases it once the page
//! is settled (delivered, or refused for good). The node saves progress only
//! up to just before the oldest work still held: the next owner runs that
//! work live again and pages it. Pages made by anything else (timers of
//! windows and rates, self-metrics, a single node) carry no origin.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};

use parking_lot::Mutex;

use crate::clock::Micros;

/// The work a page was made by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A shard's JetStream message at `seq`, run through the rules.
    Event { shard: u32, seq: u64 },
    /// An expiry pass of entries whose TTL ran out at or after `since` (the
    /// previous pass's time).
    Expiry { since: Micros },
}

thread_local! {
    /// Set while [`made_by`] runs its closure on this thread.
    static ORIGIN: Cell<Option<Origin>> = const { Cell::new(None) };
}

/// Runs `f` (a batch through the rules) with every page it makes marked as
/// made by `origin`.
pub fn made_by<R>(origin: Origin, f: impl FnOnce() -> R) -> R {
    let outer = ORIGIN.with(|o| o.replace(Some(origin)));
    let result = f();
    ORIGIN.with(|o| o.set(outer));
    result
}

/// The origin of what the rules make on this thread now, if any.
pub fn current() -> Option<Origin> {
    ORIGIN.with(Cell::get)
}

/// The work held by undelivered pages, counted per origin: the same message
/// may page several times, through several outputs.
#[derive(Debug, Default)]
pub struct Holds {
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    events: HashMap<u32, BTreeMap<u64, usize>>,
    expiries: BTreeMap<Micros, usize>,
}

impl Holds {
    /// A page made by `origin` was accepted.
    pub fn hold(&self, origin: Origin) {
        let mut held = self.held.lock();
        let count = match origin {
            Origin::Event { shard, seq } => held
                .events
                .entry(shard)
                .or_default()
                .entry(seq)
                .or_default(),
            Origin::Expiry { since } => held.expiries.entry(since).or_default(),
        };
        *count += 1;
    }

    /// A page made by `origin` was settled.
    pub fn release(&self, origin: Origin) {
        let mut held = self.held.lock();
        match origin {
            Origin::Event { shard, seq } => {
                if let Some(seqs) = held.events.get_mut(&shard) {
                    forget_one(seqs, seq);
                    if seqs.is_empty() {
                        held.events.remove(&shard);
                    }
                }
            }
            Origin::Expiry { since } => forget_one(&mut held.expiries, since),
        }
    }

    /// How far `shard`'s events may be saved as run: `processed`, or just
    /// before its oldest message with a page undelivered.
    pub fn seq_settled(&self, shard: u32, processed: u64) -> u64 {
        let held = self.held.lock();
        let oldest = held.events.get(&shard).and_then(|seqs| seqs.keys().next());
        oldest.map_or(processed, |&seq| processed.min(seq.saturating_sub(1)))
    }

    /// How far the expiry may be saved as done: `expired_until`, or the
    /// start of the oldest pass with a page undelivered.
    pub fn expiry_settled(&self, expired_until: Micros) -> Micros {
        let held = self.held.lock();
        let oldest = held.expiries.keys().next();
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

    #[test]
    fn progress_stops_before_the_oldest_message_with_a_page_undelivered() {
        let holds = Holds::default();
        let page = |seq| Origin::Event { shard: 3, seq };
        assert_eq!(holds.seq_settled(3, 100), 100, "nothing held");
        holds.hold(page(40));
        holds.hold(page(40));
        holds.hold(page(70));
        assert_eq!(holds.seq_settled(3, 100), 39);
        assert_eq!(holds.seq_settled(4, 100), 100, "another shard");
        holds.release(page(40));
        assert_eq!(
            holds.seq_settled(3, 100),
            39,
            "one of message 40's pages is left"
        );
        holds.release(page(40));
        assert_eq!(holds.seq_settled(3, 100), 69);
        holds.release(page(70));
        assert_eq!(holds.seq_settled(3, 100), 100);
        assert!(
            holds.held.lock().events.is_empty(),
            "nothing kept once released"
        );
    }

    #[test]
    fn expiry_stops_at_the_start_of_the_oldest_pass_with_a_page_undelivered() {
        let holds = Holds::default();
        holds.hold(Origin::Expiry { since: 2_000 });
        holds.hold(Origin::Expiry { since: 5_000 });
        assert_eq!(holds.expiry_settled(9_000), 2_000);
        assert_eq!(
            holds.expiry_settled(1_000),
            1_000,
            "never later than the expiry"
        );
        holds.release(Origin::Expiry { since: 2_000 });
        assert_eq!(holds.expiry_settled(9_000), 5_000);
        holds.release(Origin::Expiry { since: 5_000 });
        assert_eq!(holds.expiry_settled(9_000), 9_000);
    }

    #[test]
    fn the_origin_is_set_only_inside_made_by_and_nests() {
        assert_eq!(current(), None);
        let outer = Origin::Event { shard: 1, seq: 7 };
        let inner = Origin::Expiry { since: 5 };
        made_by(outer, || {
            assert_eq!(current(), Some(outer));
            made_by(inner, || assert_eq!(current(), Some(inner)));
            assert_eq!(current(), Some(outer));
        });
        assert_eq!(current(), None);
    }
}
