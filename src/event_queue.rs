//! A queue of events for a reader that may fall behind (an output's
//! delivery task): bounded in events and in bytes (by [`Event::approx_bytes`]),
//! whichever fills first, so a slow reader of large events cannot make it
//! hold gigabytes. Sending never waits. Each event travels with the size it
//! was counted at, so the count always comes back to zero, and with the work
//! that made it ([`Origin`]: a pager settles it when the page is). (A live
//! subscriber's queue is [`crate::pubsub`]'s own: the publisher must be able
//! to empty it.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::event::Event;
use crate::outputs::holds::Origin;

/// A queue of at most `max_events` events and `max_bytes` bytes of them.
pub fn queue(max_events: usize, max_bytes: usize) -> (Sender, Receiver) {
    let (tx, rx) = mpsc::channel(max_events);
    let bytes = Arc::new(AtomicUsize::new(0));
    let sender = Sender {
        tx,
        bytes: bytes.clone(),
        max_bytes,
    };
    (sender, Receiver { rx, bytes })
}

/// Why an event was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// At its length or its bytes.
    Full,
    /// The receiver is gone.
    Closed,
}

/// A queued event, the size it was counted at, and what made it.
pub type Queued = (Event, usize, Option<Origin>);

pub struct Sender {
    tx: mpsc::Sender<Queued>,
    /// Bytes of the events queued, shared with the [`Receiver`].
    bytes: Arc<AtomicUsize>,
    max_bytes: usize,
}

impl Sender {
    /// Queues `event`, of `bytes` ([`Event::approx_bytes`], which a caller
    /// sending one event to many queues computes once), made by `origin`.
    pub fn try_send(
        &self,
        event: Event,
        bytes: usize,
        origin: Option<Origin>,
    ) -> Result<(), Refused> {
        // Counted before the send, so the receiver never takes away what was
        // not yet added.
        let held = self.bytes.fetch_add(bytes, Ordering::AcqRel);
        let sent = if held + bytes > self.max_bytes {
            Err(Refused::Full)
        } else {
            self.tx
                .try_send((event, bytes, origin))
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => Refused::Full,
                    mpsc::error::TrySendError::Closed(_) => Refused::Closed,
                })
        };
        if sent.is_err() {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
        sent
    }

    /// Events queued now.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn max_events(&self) -> usize {
        self.tx.max_capacity()
    }

    /// How full the queue is: its events against their bound or its bytes
    /// against theirs, whichever is fuller.
    pub fn fill(&self) -> Fill {
        let events = Fill {
            used: self.queued() as u64,
            bound: self.max_events() as u64,
        };
        let bytes = Fill {
            used: self.bytes.load(Ordering::Acquire) as u64,
            bound: self.max_bytes as u64,
        };
        events.fuller(bytes)
    }
}

/// What a bounded queue holds against its bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fill {
    pub used: u64,
    pub bound: u64,
}

impl Fill {
    /// Whether more than `numerator / denominator` of the bound is used.
    pub fn over(self, numerator: u64, denominator: u64) -> bool {
        u128::from(self.used) * u128::from(denominator)
            > u128::from(self.bound) * u128::from(numerator)
    }

    /// Whichever of the two is the larger share of its bound.
    pub fn fuller(self, other: Fill) -> Fill {
        let share = |f: Fill, of: Fill| u128::from(f.used) * u128::from(of.bound);
        if share(other, self) > share(self, other) {
            other
        } else {
            self
        }
    }
}

pub struct Receiver {
    rx: mpsc::Receiver<Queued>,
    bytes: Arc<AtomicUsize>,
}

impl Receiver {
    /// The next event, its size and origin; `None` once every sender is gone
    /// and the queue is empty.
    pub async fn recv(&mut self) -> Option<Queued> {
        let taken = self.rx.recv().await?;
        Some(self.taken(taken))
    }

    /// The next event, its size and origin, if one is queued.
    pub fn try_recv(&mut self) -> Result<Queued, mpsc::error::TryRecvError> {
        self.rx.try_recv().map(|taken| self.taken(taken))
    }

    fn taken(&self, queued: Queued) -> Queued {
        self.bytes.fetch_sub(queued.1, Ordering::AcqRel);
        queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(bytes: usize) -> Event {
        Event {
            description: Some("x".repeat(bytes)),
            ..Event::default()
        }
    }

    #[tokio::test]
    async fn full_at_its_bytes_or_its_length_and_taking_makes_room() {
        let big = event(1000);
        let size = big.approx_bytes();
        let (tx, mut rx) = queue(10, 3 * size);
        for _ in 0..3 {
            assert_eq!(tx.try_send(big.clone(), size, None), Ok(()));
        }
        assert_eq!(tx.try_send(big.clone(), size, None), Err(Refused::Full));
        assert_eq!(tx.queued(), 3);
        assert_eq!(rx.recv().await.unwrap().1, size);
        assert_eq!(tx.try_send(big.clone(), size, None), Ok(()));
        while rx.try_recv().is_ok() {}
        // At its length before its bytes.
        let (tx, _rx) = queue(2, usize::MAX);
        assert_eq!(tx.try_send(event(0), 1, None), Ok(()));
        assert_eq!(tx.try_send(event(0), 1, None), Ok(()));
        assert_eq!(tx.try_send(event(0), 1, None), Err(Refused::Full));
        assert_eq!((tx.queued(), tx.max_events()), (2, 2));
    }

    #[tokio::test]
    async fn a_refused_event_takes_no_room() {
        let (tx, rx) = queue(1, 100);
        assert_eq!(tx.try_send(event(0), 60, None), Ok(()));
        // Full by length: its 30 bytes are not kept counted.
        assert_eq!(tx.try_send(event(0), 30, None), Err(Refused::Full));
        drop(rx);
        assert_eq!(tx.try_send(event(0), 10, None), Err(Refused::Closed));
        assert_eq!(tx.bytes.load(Ordering::Acquire), 60);
    }
}
