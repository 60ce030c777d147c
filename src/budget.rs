//! The memory that large messages may hold while they arrive, one pool shared
//! by every connection of every transport (`--max-message-memory`).
//!
//! `--max-frame` and the body and gRPC message limits bound one message; this
//! bounds all of them together. Without it, `--max-connections` clients each
//! sending a 16 MiB message at once would make vigil hold connections × 16 MiB.
//! A message over [`FREE`] bytes takes its whole size from the budget before
//! more than its first [`FREE`] bytes are read, and gives it back once it has
//! arrived (HTTP: once it has been handled). When the budget is spent the
//! message waits, its connection reading nothing meanwhile, so the kernel's (or
//! HTTP/2's) flow control pushes back on the sender. Once it has room, it must
//! keep the [`Pace`] that brings it in within the read timeout, so no client
//! sits on room it does not use: one that announces a large message and stalls
//! gives its room back after a few seconds, not after the whole timeout.
//! Messages up to [`FREE`] bytes never wait: agents' messages are far
//! smaller, so a flood of large messages cannot hold them up.
//!
//! The budget is counted in KiB (tokio's semaphore takes at most `u32::MAX`
//! permits at a time); a message larger than the whole budget takes all of it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::PollSemaphore;

use crate::stats::Stats;

/// A message up to this many bytes takes nothing from the budget.
pub const FREE: usize = 64 * 1024;

/// 1 GiB: 64 messages of the default 16 MiB maximum arriving at once.
pub const DEFAULT_MAX: usize = 1024 * 1024 * 1024;

const KIB: usize = 1024;

/// A handle on the shared budget; clones share it.
#[derive(Debug, Clone)]
pub struct Budget {
    semaphore: Arc<Semaphore>,
    kib: u32,
    stats: Arc<Stats>,
    /// Messages waiting for room now: while any do, those holding room get
    /// the shorter grace.
    waiting: Arc<AtomicUsize>,
}

impl Budget {
    /// A budget of `bytes` (at least 1 KiB), counting into `stats`'
    /// `messages_waited_for_memory` and `message_bytes_held`.
    pub fn new(bytes: usize, stats: Arc<Stats>) -> Budget {
        let kib = u32::try_from(bytes / KIB).unwrap_or(u32::MAX).max(1);
        Budget {
            semaphore: Arc::new(Semaphore::new(kib as usize)),
            kib,
            stats,
            waiting: Arc::default(),
        }
    }

    /// The KiB a message of `bytes` takes.
    fn kib_of(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(KIB))
            .unwrap_or(u32::MAX)
            .min(self.kib)
    }

    /// Room for a message of `bytes`, if there is some now.
    pub fn try_take(&self, bytes: usize) -> Option<Taken> {
        let permit = self
            .semaphore
            .clone()
            .try_acquire_many_owned(self.kib_of(bytes))
            .ok()?;
        Some(self.taken(permit))
    }

    /// Room for a message of `bytes`, waiting for it if need be.
    pub async fn take(&self, bytes: usize) -> Taken {
        if let Some(taken) = self.try_take(bytes) {
            return taken;
        }
        Stats::incr(&self.stats.messages_waited_for_memory);
        let _waiting = Waiting::new(&self.waiting);
        let permit = self
            .semaphore
            .clone()
            .acquire_many_owned(self.kib_of(bytes))
            .await
            .expect("the budget's semaphore is never closed");
        self.taken(permit)
    }

    /// A waiter for code that polls (a stream's reader, a request body).
    pub fn waiter(&self) -> Waiter {
        Waiter {
            budget: self.clone(),
            waiting: None,
        }
    }

    /// Whether `pace`'s message, `arrived` bytes of it in, has fallen behind
    /// (counted, with what its sender is told), or else when to ask again.
    /// While other messages wait for room the grace is [`CONTENDED_GRACE`];
    /// a message behind by that measure is asked again every
    /// [`RECHECK`], so it gives its room up soon after one starts waiting.
    pub fn check(&self, pace: &Pace, arrived: usize) -> Result<Instant, TooSlow> {
        let now = Instant::now();
        let strict = pace.due(arrived, CONTENDED_GRACE);
        let relaxed = if pace.length_known {
            pace.due(arrived, GRACE)
        } else {
            pace.since + pace.timeout
        };
        let contended = self.waiting.load(Ordering::Relaxed) > 0;
        let due = if contended { strict } else { relaxed };
        if due <= now {
            Stats::incr(&self.stats.messages_too_slow);
            return Err(TooSlow {
                pace: *pace,
                arrived,
                after: pace.since.elapsed(),
                contended,
            });
        }
        Ok(if strict > now {
            strict
        } else {
            relaxed.min(now + RECHECK)
        })
    }

    fn taken(&self, permit: OwnedSemaphorePermit) -> Taken {
        let bytes = permit.num_permits() * KIB;
        Stats::add(&self.stats.message_bytes_held, bytes as u64);
        Taken {
            permit,
            stats: self.stats.clone(),
        }
    }
}

/// How long a message holding room may take before it must keep [`Pace`].
pub const GRACE: Duration = Duration::from_secs(5);
/// The grace while other messages wait for room: a stalled sender keeps them
/// waiting about this long.
pub const CONTENDED_GRACE: Duration = Duration::from_secs(1);
/// How often a message behind by the measure of [`CONTENDED_GRACE`], but not
/// of [`GRACE`], checks whether others now wait.
pub const RECHECK: Duration = Duration::from_secs(1);

/// The pace a message must keep while it holds room: `t` after getting it,
/// past a grace of [`GRACE`] ([`CONTENDED_GRACE`] while others wait for room;
/// at most the whole timeout), at least the share `(t - grace) / (timeout -
/// grace)` of it must have arrived, so all of it by the timeout. A sender
/// steady enough to finish within the timeout always keeps it; one that
/// stalls falls behind once the grace is over, and its room goes back to the
/// messages waiting for it. [`Budget::check`] applies it.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    since: Instant,
    /// The message's length, or the room it holds when that is unknown.
    len: usize,
    timeout: Duration,
    length_known: bool,
}

impl Pace {
    /// The pace of a message of `len` bytes that got its room now.
    pub fn new(len: usize, timeout: Duration) -> Pace {
        Pace {
            since: Instant::now(),
            len,
            timeout,
            length_known: true,
        }
    }

    /// The pace of a message of unknown length (a chunked body) that got
    /// `room` bytes of room now. While others wait for room it must keep the
    /// pace of a message that size, as it holds that much; otherwise it just
    /// has to arrive within the timeout.
    pub fn of_unknown_length(room: usize, timeout: Duration) -> Pace {
        Pace {
            length_known: false,
            ..Pace::new(room, timeout)
        }
    }

    /// When the message got its room.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// The length of the message.
    pub fn message_len(&self) -> usize {
        self.len
    }

    /// When the message falls behind, after `grace`, if no more than
    /// `arrived` bytes of it have come by then.
    fn due(&self, arrived: usize, grace: Duration) -> Instant {
        let grace = grace.min(self.timeout);
        let share = arrived.min(self.len) as f64 / self.len.max(1) as f64;
        self.since + grace + (self.timeout - grace).mul_f64(share)
    }
}

/// Wakes a task reading a message that holds room when its [`Pace`] should
/// be checked next: made on first use, as most connections never hold room.
#[derive(Default)]
pub struct PaceTimer(Option<Pin<Box<Sleep>>>);

impl PaceTimer {
    /// Whether `pace`'s message, `arrived` bytes of it in, has fallen behind
    /// ([`Budget::check`]); if not, the task is woken when to ask again.
    pub fn poll_behind(
        &mut self,
        cx: &mut Context<'_>,
        budget: &Budget,
        pace: &Pace,
        arrived: usize,
    ) -> Poll<TooSlow> {
        loop {
            let next = match budget.check(pace, arrived) {
                Ok(next) => next,
                Err(too_slow) => return Poll::Ready(too_slow),
            };
            let timer = (self.0).get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
            if timer.deadline() != next {
                timer.as_mut().reset(next);
            }
            ready!(timer.as_mut().poll(cx));
        }
    }
}

/// A message that fell behind its [`Pace`].
#[derive(Debug)]
pub struct TooSlow {
    pace: Pace,
    arrived: usize,
    after: Duration,
    /// Whether others were waiting for room.
    contended: bool,
}

impl std::fmt::Display for TooSlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let TooSlow {
            pace,
            arrived,
            after,
            ..
        } = self;
        let (len, timeout) = (pace.len, pace.timeout);
        if pace.length_known {
            write!(
                f,
                "a message of {len} bytes held room in --max-message-memory for {after:.1?} and only {arrived} bytes of it arrived: too slow to arrive within {timeout:?} (--read-timeout)"
            )
        } else if self.contended {
            write!(
                f,
                "a body of unknown length held room for {len} bytes in --max-message-memory for {after:.1?} while other messages waited for room, and only {arrived} bytes of it arrived: send it faster, or announce its length (Content-Length)"
            )
        } else {
            write!(
                f,
                "a body of unknown length held room for {len} bytes in --max-message-memory for {after:.1?} and only {arrived} bytes of it arrived: it did not arrive within {timeout:?} (--read-timeout)"
            )
        }
    }
}

impl std::error::Error for TooSlow {}

/// A message's room in the budget, given back when dropped.
pub struct Taken {
    permit: OwnedSemaphorePermit,
    stats: Arc<Stats>,
}

impl Drop for Taken {
    fn drop(&mut self) {
        let bytes = self.permit.num_permits() * KIB;
        Stats::sub(&self.stats.message_bytes_held, bytes as u64);
    }
}

/// Takes room for one message at a time from poll-based code. Each call for
/// the same message must ask for the same `bytes`.
pub struct Waiter {
    budget: Budget,
    /// Made on the first wait (most connections never wait), with the count
    /// of it among the messages waiting.
    waiting: Option<(PollSemaphore, Waiting)>,
}

/// One message counted among those waiting for room, while it lives.
struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    fn new(waiting: &Arc<AtomicUsize>) -> Waiting {
        waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(waiting.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Waiter {
    /// Room for a message of `bytes`; when there is none now, counts one wait
    /// and wakes the task once there is.
    pub fn poll_take(&mut self, cx: &mut Context<'_>, bytes: usize) -> Poll<Taken> {
        let (semaphore, _) = match &mut self.waiting {
            Some(waiting) => waiting,
            None => {
                if let Some(taken) = self.budget.try_take(bytes) {
                    return Poll::Ready(taken);
                }
                Stats::incr(&self.budget.stats.messages_waited_for_memory);
                let semaphore = PollSemaphore::new(self.budget.semaphore.clone());
                let waiting = Waiting::new(&self.budget.waiting);
                self.waiting.insert((semaphore, waiting))
            }
        };
        let permit = ready!(semaphore.poll_acquire_many(cx, self.budget.kib_of(bytes)))
            .expect("the budget's semaphore is never closed");
        // The next message starts with a try again, and counts its own wait.
        self.waiting = None;
        Poll::Ready(self.budget.taken(permit))
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::Waker;

    use super::*;

    fn budget(bytes: usize) -> (Budget, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        (Budget::new(bytes, stats.clone()), stats)
    }

    #[test]
    fn room_is_taken_in_kib_and_given_back_when_dropped() {
        let (budget, stats) = budget(4 * KIB);
        let first = budget.try_take(2 * KIB + 1).unwrap();
        assert_eq!(Stats::get(&stats.message_bytes_held), 3 * KIB as u64);
        assert!(budget.try_take(2 * KIB).is_none());
        let second = budget.try_take(KIB).unwrap();
        drop(first);
        assert_eq!(Stats::get(&stats.message_bytes_held), KIB as u64);
        assert!(budget.try_take(3 * KIB).is_some());
        drop(second);
        assert_eq!(Stats::get(&stats.message_bytes_held), 0);
    }

    #[test]
    fn a_message_larger_than_the_budget_takes_all_of_it() {
        let (budget, _) = budget(4 * KIB);
        let all = budget.try_take(100 * KIB).unwrap();
        assert!(budget.try_take(1).is_none());
        drop(all);
        assert!(budget.try_take(4 * KIB).is_some());
    }

    #[test]
    fn a_waiter_is_woken_when_room_is_given_back_and_counts_one_wait() {
        let (budget, stats) = budget(4 * KIB);
        let held = budget.try_take(3 * KIB).unwrap();
        let mut waiter = budget.waiter();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(waiter.poll_take(&mut cx, 2 * KIB).is_pending());
        assert!(waiter.poll_take(&mut cx, 2 * KIB).is_pending());
        assert_eq!(Stats::get(&stats.messages_waited_for_memory), 1);
        drop(held);
        let Poll::Ready(taken) = waiter.poll_take(&mut cx, 2 * KIB) else {
            panic!("room was given back");
        };
        assert_eq!(Stats::get(&stats.message_bytes_held), 2 * KIB as u64);
        drop(taken);
        assert!(waiter.poll_take(&mut cx, KIB).is_ready());
        assert_eq!(Stats::get(&stats.messages_waited_for_memory), 1);
    }

    #[test]
    fn a_message_steady_enough_to_arrive_within_the_timeout_keeps_pace() {
        let timeout = Duration::from_secs(60);
        let pace = Pace::new(1000, timeout);
        // Nothing in yet: behind once the grace is over.
        assert_eq!(pace.due(0, GRACE), pace.since() + GRACE);
        // Half of it in: due halfway through what follows the grace.
        let half = pace.since() + GRACE + (timeout - GRACE) / 2;
        assert_eq!(pace.due(500, GRACE), half);
        // All of it: by the timeout, however much more was counted.
        assert_eq!(pace.due(1000, GRACE), pace.since() + timeout);
        assert_eq!(pace.due(5000, CONTENDED_GRACE), pace.since() + timeout);
        // A sender steady enough to finish within the timeout is never
        // behind, whichever the grace.
        for tenth in 0..=10 {
            let (t, arrived) = (timeout * tenth / 10, 100 * tenth as usize);
            assert!(
                pace.due(arrived, CONTENDED_GRACE) >= pace.since() + t,
                "{t:?}"
            );
        }
        // A timeout shorter than the grace is the whole pace.
        let pace = Pace::new(1000, Duration::from_secs(2));
        assert_eq!(pace.due(0, GRACE), pace.since() + Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_message_gives_its_room_up_sooner_while_another_waits() {
        let (budget, stats) = budget(4 * KIB);
        let held = budget.try_take(3 * KIB).unwrap();
        let pace = Pace::new(3 * KIB, Duration::from_secs(60));
        let second = Duration::from_secs(1);
        // Nobody waits: asked again at each second past the short grace.
        assert_eq!(
            budget.check(&pace, 0).unwrap(),
            pace.since() + CONTENDED_GRACE
        );
        tokio::time::advance(CONTENDED_GRACE).await;
        assert_eq!(budget.check(&pace, 0).unwrap(), Instant::now() + RECHECK);
        tokio::time::advance(second).await;
        // Another message starts waiting: behind at the next check.
        let mut waiter = budget.waiter();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(waiter.poll_take(&mut cx, 2 * KIB).is_pending());
        let error = budget.check(&pace, 10).unwrap_err().to_string();
        assert_eq!(
            error,
            "a message of 3072 bytes held room in --max-message-memory for 2.0s and only 10 bytes of it arrived: too slow to arrive within 60s (--read-timeout)"
        );
        assert_eq!(Stats::get(&stats.messages_too_slow), 1);
        // Once it has its room, nobody waits: the long grace again.
        drop(held);
        assert!(waiter.poll_take(&mut cx, 2 * KIB).is_ready());
        assert_eq!(budget.check(&pace, 0).unwrap(), Instant::now() + RECHECK);
        tokio::time::advance(GRACE - 2 * second).await;
        assert!(budget.check(&pace, 0).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_of_unknown_length_keeps_the_pace_of_its_room_only_while_another_waits() {
        let (budget, _) = budget(4 * KIB);
        let held = budget.try_take(4 * KIB).unwrap();
        let timeout = Duration::from_secs(60);
        let pace = Pace::of_unknown_length(4 * KIB, timeout);
        // Nobody waits: it has the whole timeout, however little arrives.
        tokio::time::advance(timeout - Duration::from_secs(1)).await;
        assert!(budget.check(&pace, 0).is_ok());
        let mut waiter = budget.waiter();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(waiter.poll_take(&mut cx, KIB).is_pending());
        let error = budget.check(&pace, 100).unwrap_err().to_string();
        assert_eq!(
            error,
            "a body of unknown length held room for 4096 bytes in --max-message-memory for 59.0s while other messages waited for room, and only 100 bytes of it arrived: send it faster, or announce its length (Content-Length)"
        );
        drop((waiter, held));
        tokio::time::advance(Duration::from_secs(1)).await;
        let error = budget.check(&pace, 100).unwrap_err().to_string();
        assert!(
            error.ends_with("it did not arrive within 60s (--read-timeout)"),
            "{error}"
        );
    }

    #[test]
    fn a_waiter_dropped_while_waiting_no_longer_counts() {
        let (budget, _) = budget(4 * KIB);
        let _held = budget.try_take(4 * KIB).unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        let mut waiter = budget.waiter();
        assert!(waiter.poll_take(&mut cx, KIB).is_pending());
        let mut taking = Box::pin(budget.take(KIB));
        assert!(taking.as_mut().poll(&mut cx).is_pending());
        assert_eq!(budget.waiting.load(Ordering::Relaxed), 2);
        drop(waiter);
        drop(taking);
        assert_eq!(budget.waiting.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn take_waits_its_turn() {
        let (budget, stats) = budget(4 * KIB);
        let held = budget.try_take(4 * KIB).unwrap();
        let mut cx = Context::from_waker(Waker::noop());
        let mut waiting = pin!(budget.take(KIB));
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        assert_eq!(Stats::get(&stats.messages_waited_for_memory), 1);
        drop(held);
        assert!(waiting.as_mut().poll(&mut cx).is_ready());
    }
}
