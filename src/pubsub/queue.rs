//! A live subscriber's queue: the events published for it, in the order
//! they came. A coalescing subscriber's (`coalesce=`) holds the latest event
//! of each series (host, service) instead: an event of a series it holds
//! replaces that series' event where it stands (the series keeps the place
//! of its first change since it was last taken), so however fast a series
//! changes it takes one place, and the queue is as long as the series that
//! changed, not the events.
//!
//! Finding the series held costs one hash of the event's host and service,
//! borrowed: no key is copied, and an ordinary queue does none of it.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::hash_table::Entry;
use hashbrown::{DefaultHashBuilder, HashTable};

use super::Published;

/// An event queued, with the bytes it is counted at.
pub(super) type Queued = (Arc<Published>, usize);

/// At its length or its bytes: the event was not queued.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Full;

#[derive(Default)]
pub(super) struct Queue {
    events: VecDeque<Queued>,
    /// Of the events queued.
    bytes: usize,
    /// A coalescing queue's series.
    series: Option<Places>,
}

/// Where each series a coalescing queue holds is in its events.
#[derive(Default)]
struct Places {
    /// Each series' event by its sequence number: its index in the events
    /// once `front` is subtracted, which stays right as events are popped.
    of_series: HashTable<u64>,
    hasher: DefaultHashBuilder,
    /// The sequence number of the event at the front.
    front: u64,
}

/// What an event is coalesced by: its series, as the index keys it.
fn series(event: &Published) -> (&str, &str) {
    (event.host_str(), event.service_str())
}

impl Queue {
    /// A queue holding the latest event of each series.
    pub(super) fn coalescing() -> Queue {
        Queue {
            series: Some(Places::default()),
            ..Queue::default()
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Queues `event`, of `bytes`, unless the queue would then hold more
    /// than `max_events` events or `max_bytes` bytes. Returns the event it
    /// replaced, if any, for the caller to drop outside its lock.
    pub(super) fn push(
        &mut self,
        event: Arc<Published>,
        bytes: usize,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Option<Queued>, Full> {
        let Some(places) = &mut self.series else {
            if self.events.len() >= max_events || self.bytes + bytes > max_bytes {
                return Err(Full);
            }
            self.bytes += bytes;
            self.events.push_back((event, bytes));
            return Ok(None);
        };
        let Places {
            of_series,
            hasher,
            front,
        } = places;
        let events = &mut self.events;
        let at = |seq: u64| (seq - *front) as usize;
        let entry = of_series.entry(
            hasher.hash_one(series(&event)),
            |&seq| series(&events[at(seq)].0) == series(&event),
            |&seq| hasher.hash_one(series(&events[at(seq)].0)),
        );
        match entry {
            Entry::Occupied(held) => {
                let held = &mut events[at(*held.get())];
                let bytes_after = self.bytes - held.1 + bytes;
                if bytes_after > max_bytes {
                    return Err(Full);
                }
                self.bytes = bytes_after;
                Ok(Some(std::mem::replace(held, (event, bytes))))
            }
            Entry::Vacant(place) => {
                if events.len() >= max_events || self.bytes + bytes > max_bytes {
                    return Err(Full);
                }
                place.insert(*front + events.len() as u64);
                self.bytes += bytes;
                events.push_back((event, bytes));
                Ok(None)
            }
        }
    }

    pub(super) fn pop(&mut self) -> Option<Queued> {
        let (event, bytes) = self.events.pop_front()?;
        self.bytes -= bytes;
        if let Some(places) = &mut self.series {
            let front = places.front;
            let hash = places.hasher.hash_one(series(&event));
            let found = places.of_series.find_entry(hash, |&seq| seq == front);
            debug_assert!(found.is_ok(), "a held series has its place");
            if let Ok(place) = found {
                place.remove();
            }
            places.front += 1;
        }
        Some((event, bytes))
    }

    /// Every event queued, in order; the queue is empty after.
    pub(super) fn take(&mut self) -> VecDeque<Queued> {
        self.bytes = 0;
        if let Some(places) = &mut self.series {
            // Its room is kept: the series come back by the next take.
            places.of_series.clear();
            places.front += self.events.len() as u64;
        }
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::event::{Event, Metric};

    fn published(host: &str, metric: i64) -> Arc<Published> {
        Arc::new(Published {
            event: Event {
                host: Some(host.into()),
                service: Some("cpu".into()),
                metric: Some(Metric::Int(metric)),
                ..Event::default()
            },
            json: OnceLock::new(),
        })
    }

    fn metrics(events: impl IntoIterator<Item = Queued>) -> Vec<(String, Option<Metric>)> {
        (events.into_iter())
            .map(|(e, _)| (e.host_str().to_owned(), e.metric))
            .collect()
    }

    fn want(held: &[(&str, i64)]) -> Vec<(String, Option<Metric>)> {
        (held.iter())
            .map(|&(host, m)| (host.to_owned(), Some(Metric::Int(m))))
            .collect()
    }

    #[test]
    fn a_coalescing_queue_replaces_a_series_event_where_it_stands() {
        let mut queue = Queue::coalescing();
        for (host, metric) in [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("a", 3)] {
            queue.push(published(host, metric), 10, 3, 100).unwrap();
        }
        assert_eq!(queue.bytes(), 30);
        assert_eq!(metrics(queue.pop()), want(&[("a", 3)]));
        // Popped, `a` is a new series: it goes to the back.
        queue.push(published("a", 4), 10, 3, 100).unwrap();
        queue.push(published("b", 2), 10, 3, 100).unwrap();
        assert_eq!(queue.bytes(), 30);
        assert_eq!(metrics(queue.take()), want(&[("b", 2), ("c", 1), ("a", 4)]));
        assert_eq!(queue.bytes(), 0);
        // Taken, every series is new again.
        queue.push(published("c", 2), 10, 3, 100).unwrap();
        assert_eq!(metrics(queue.take()), want(&[("c", 2)]));
    }

    #[test]
    fn a_coalescing_queue_is_full_at_its_series_or_its_bytes() {
        let mut queue = Queue::coalescing();
        queue.push(published("a", 1), 10, 2, 25).unwrap();
        queue.push(published("b", 1), 10, 2, 25).unwrap();
        assert_eq!(queue.push(published("c", 1), 1, 2, 25).err(), Some(Full));
        let replaced = queue.push(published("a", 2), 15, 2, 25).unwrap();
        assert_eq!(metrics(replaced), want(&[("a", 1)]));
        assert_eq!(queue.push(published("b", 2), 11, 2, 25).err(), Some(Full));
        assert_eq!(queue.bytes(), 25);
        assert_eq!(metrics(queue.take()), want(&[("a", 2), ("b", 1)]));
    }
}
