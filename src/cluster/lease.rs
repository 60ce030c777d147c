//! This node's local view of its shard leases: until when it may run each
//! shard through its rules and outputs, and whether the shard's index expiry
//! is paused.
//!
//! **Fencing.** The KV lease lapses the bucket's TTL, never shorter than this
//! node's lease TTL (see `ownership`), after the server received the last
//! renewal, which is after this node sent it. So a node that counts its
//! deadline from the moment it *sent* each successful renewal, minus a safety
//! margin, gives a shard up strictly before any other node can take its lease
//! — even when it is cut off from NATS (or paused) and cannot learn that it
//! lost it. Deadlines use an injected monotonic clock.
//!
//! **Paused expiry.** While a taker-over replays a shard (and while a shard
//! is handed back) its entries must not expire through the rules: the
//! previous owner already reported those expiries, or the next owner will,
//! and an event still to be replayed may have kept the series alive.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use crate::clock::{Micros, SharedClock};

/// Part of the lease TTL a node keeps in hand: it stops running a shard this
/// long before the lease could lapse on the server.
const MARGIN_DIVISOR: u32 = 5;

/// No deadline: this node does not hold the shard.
const NOT_HELD: Micros = Micros::MIN;

struct ShardLease {
    /// Monotonic micros until which the shard may run; [`NOT_HELD`] if not ours.
    until: AtomicI64,
    paused: AtomicBool,
    /// Wall micros by which the entries given grace when the shard caught
    /// up will have expired here unless refreshed (see [`Leases::caught_up`]).
    graced_until: AtomicI64,
}

pub struct Leases {
    clock: SharedClock,
    /// Lease TTL minus the margin, in micros.
    valid_for: Micros,
    shards: Box<[ShardLease]>,
}

impl Leases {
    /// `clock` must be monotonic (or virtual, in tests).
    pub fn new(clock: SharedClock, shards: u32, lease_ttl: Duration) -> Leases {
        let ttl = i64::try_from(lease_ttl.as_micros()).unwrap_or(i64::MAX);
        let margin = ttl / i64::from(MARGIN_DIVISOR);
        Leases {
            clock,
            valid_for: ttl - margin,
            shards: (0..shards.max(1))
                .map(|_| ShardLease {
                    until: AtomicI64::new(NOT_HELD),
                    paused: AtomicBool::new(false),
                    graced_until: AtomicI64::new(Micros::MIN),
                })
                .collect(),
        }
    }

    fn shard(&self, shard: u32) -> &ShardLease {
        &self.shards[shard as usize % self.shards.len()]
    }

    /// Now, on the lease clock: read it *before* sending a take or a renewal,
    /// and hand it to [`Leases::taken`] / [`Leases::renewed`] once it succeeded.
    pub fn now(&self) -> Micros {
        self.clock.now()
    }

    /// The lease was created by a request sent at `sent`; the shard's expiry
    /// stays paused until [`Leases::caught_up`].
    pub fn taken(&self, shard: u32, sent: Micros) {
        let lease = self.shard(shard);
        lease.paused.store(true, Ordering::Release);
        lease.graced_until.store(Micros::MIN, Ordering::Release);
        lease
            .until
            .store(sent.saturating_add(self.valid_for), Ordering::Release);
    }

    /// A renewal sent at `sent` succeeded. An older one never shortens the
    /// deadline, and one answered after the deadline passed does not revive
    /// it: the shard was given up (and forgotten) at the deadline.
    pub fn renewed(&self, shard: u32, sent: Micros) {
        let until = sent.saturating_add(self.valid_for);
        let now = self.clock.now();
        let _ = self
            .shard(shard)
            .until
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                (held != NOT_HELD && now < held && until > held).then_some(until)
            });
    }

    /// The shard's replay reached what the stream held when it was taken:
    /// its entries may expire here from now on. Those given grace then
    /// (wall micros) expire here by `graced_until` unless refreshed: until
    /// this node's expiry passed that, its expiry time does not tell which
    /// of the shard's entries it expired and reported.
    pub fn caught_up(&self, shard: u32, graced_until: Micros) {
        let lease = self.shard(shard);
        lease.graced_until.store(graced_until, Ordering::Release);
        lease.paused.store(false, Ordering::Release);
    }

    /// See [`Leases::caught_up`].
    pub fn graced_until(&self, shard: u32) -> Micros {
        self.shard(shard).graced_until.load(Ordering::Acquire)
    }

    /// The shard is being handed back: no more expiry through the rules here.
    pub fn pause(&self, shard: u32) {
        self.shard(shard).paused.store(true, Ordering::Release);
    }

    /// The shard is no longer this node's.
    pub fn dropped(&self, shard: u32) {
        let lease = self.shard(shard);
        lease.until.store(NOT_HELD, Ordering::Release);
        lease.paused.store(false, Ordering::Release);
    }

    /// True while this node may run the shard: it holds the lease and its
    /// local deadline has not passed.
    pub fn valid(&self, shard: u32) -> bool {
        let until = self.shard(shard).until.load(Ordering::Acquire);
        until != NOT_HELD && self.clock.now() < until
    }

    /// Valid, and its expiry not paused: the shard runs fully here.
    pub fn live(&self, shard: u32) -> bool {
        self.valid(shard) && !self.shard(shard).paused.load(Ordering::Acquire)
    }

    /// How long until the shard's deadline (zero once passed or not held).
    pub fn remaining(&self, shard: u32) -> Duration {
        let until = self.shard(shard).until.load(Ordering::Acquire);
        let left = until.saturating_sub(self.clock.now());
        Duration::from_micros(u64::try_from(left).unwrap_or(0))
    }

    /// Whether an entry of `shard` may expire through the rules now: yes for
    /// a shard that is not ours (nothing of it should be indexed here, but
    /// e.g. this node's own self-metric events are), no while its expiry is
    /// paused or its deadline has passed (it is about to be forgotten).
    pub fn may_expire(&self, shard: u32) -> bool {
        let lease = self.shard(shard);
        lease.until.load(Ordering::Acquire) == NOT_HELD || self.live(shard)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::{Clock, MICROS_PER_SEC, ManualClock};

    const SEC: Micros = MICROS_PER_SEC;

    fn leases() -> (Arc<ManualClock>, Leases) {
        let clock = Arc::new(ManualClock::new(100 * SEC));
        let leases = Leases::new(clock.clone(), 4, Duration::from_secs(6));
        (clock, leases)
    }

    #[test]
    fn a_shard_is_given_up_a_margin_before_its_lease_can_lapse() {
        let (clock, leases) = leases();
        assert!(!leases.valid(1), "not held");
        let sent = clock.now();
        // The create took a while to be answered: the deadline counts from the send.
        clock.advance(SEC);
        leases.taken(1, sent);
        assert!(leases.valid(1));
        // 6 s TTL, 1.2 s margin: valid until 4.8 s after the send.
        clock.set(sent + 4_799_999);
        assert!(leases.valid(1));
        assert_eq!(leases.remaining(1), Duration::from_micros(1));
        clock.set(sent + 4_800_000);
        assert!(
            !leases.valid(1),
            "gone before the server could let anyone else take it"
        );
        assert_eq!(leases.remaining(1), Duration::ZERO);
        assert!(
            !leases.may_expire(1),
            "no expiry through the rules once fenced"
        );
    }

    #[test]
    fn renewals_extend_from_their_send_time_and_never_shorten() {
        let (clock, leases) = leases();
        let t0 = clock.now();
        leases.taken(2, t0);
        clock.advance(2 * SEC);
        let renew_sent = clock.now();
        clock.advance(2 * SEC + SEC / 2); // A slow answer, 4.5 s after the take.
        leases.renewed(2, renew_sent);
        assert!(leases.valid(2));
        // A late-arriving older renewal does not pull the deadline back.
        leases.renewed(2, t0);
        clock.set(renew_sent + 4_799_999);
        assert!(leases.valid(2));
        clock.set(renew_sent + 4_800_000);
        assert!(!leases.valid(2));
        // A renewal sent just before the deadline but answered after it.
        leases.renewed(2, renew_sent + 4_799_000);
        assert!(!leases.valid(2), "a fenced shard stays given up");
        // Renewing a shard not held does not take it.
        leases.renewed(3, clock.now());
        assert!(!leases.valid(3));
    }

    #[test]
    fn expiry_waits_for_the_replay_and_stops_at_hand_over() {
        let (clock, leases) = leases();
        assert!(leases.may_expire(0), "not ours: e.g. self-metric entries");
        leases.taken(0, clock.now());
        assert!(leases.valid(0));
        assert!(!leases.may_expire(0), "replaying");
        assert!(!leases.live(0));
        leases.caught_up(0, Micros::MIN);
        assert!(leases.may_expire(0));
        assert!(leases.live(0));
        leases.pause(0);
        assert!(!leases.may_expire(0), "being handed back");
        leases.dropped(0);
        assert!(!leases.valid(0));
        assert!(leases.may_expire(0));
    }
}
