//! A subscriber's live events, as the batches its connection writes: every
//! event, those queued when one arrives in one write ([`Live::Each`]); or,
//! for a coalescing subscription (`coalesce=250ms`), the latest event of
//! each series (host, service) per interval ([`Live::Latest`]).
//!
//! A coalescing subscription is drained by a task of its own, whatever its
//! connection is doing: the latest of each series is handed over every
//! interval once the connection took the previous batch, and held on
//! (coalescing further) while it has not. A view of the latest states (the
//! dashboard) that cannot take every event of a busy index then gets fewer,
//! larger batches instead of being disconnected as too slow, until it falls
//! more than [`MAX_SERIES`] series behind. What the drain holds (the series,
//! and the batch its connection has not taken yet) counts in the pubsub's
//! bound on what all subscribers hold (`--max-subscriber-memory`), as
//! queued events do: a connection that takes nothing cannot hold a hundred
//! thousand series outside it.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::pubsub::{Published, Subscription};

/// Most events written at once: those queued when one arrives, up to this
/// many. A write per event is a syscall per event per subscriber.
pub const BATCH: usize = 256;

/// The shortest interval taken: shorter is no coalescing at all.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// The longest interval taken.
pub const MAX_INTERVAL: Duration = Duration::from_secs(10);
/// Series held at most: past it, the drain waits for the connection (and
/// the subscriber's queue fills), so what one subscriber holds stays bounded
/// whatever the index size.
pub const MAX_SERIES: usize = 100_000;

/// The interval a `coalesce` parameter asks for (`250ms`, `1s`).
pub fn interval(text: &str) -> Result<Duration, String> {
    let every = humantime::parse_duration(text)
        .map_err(|e| format!("`coalesce={text}`: {e}; give a duration such as 250ms"))?;
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&every) {
        return Err(format!(
            "`coalesce={text}`: give an interval from 10ms to 10s"
        ));
    }
    Ok(every)
}

/// Where a subscriber's live events come from.
pub enum Live {
    Each(Subscription),
    /// Batches of the latest event per series, from the draining task.
    Latest(mpsc::Receiver<Vec<Arc<Published>>>),
}

impl Live {
    /// Every event of `subscription`, or with `coalesce` the latest of each
    /// series per that interval.
    pub fn new(subscription: Subscription, coalesce: Option<Duration>) -> Live {
        match coalesce {
            None => Live::Each(subscription),
            Some(interval) => {
                // One batch waits while the connection writes the one before.
                let (batches, taken) = mpsc::channel(1);
                tokio::spawn(drain(subscription, interval, batches));
                Live::Latest(taken)
            }
        }
    }

    /// The next events to write; `None` once the pubsub disconnected the
    /// subscriber as too slow.
    pub async fn next(&mut self) -> Option<Vec<Arc<Published>>> {
        match self {
            Live::Each(subscription) => {
                let mut batch = vec![subscription.recv().await?];
                while batch.len() < BATCH {
                    let Ok(event) = subscription.try_recv() else {
                        break;
                    };
                    batch.push(event);
                }
                Some(batch)
            }
            Live::Latest(batches) => batches.recv().await,
        }
    }
}

/// Holds what `subscription` brings in `latest`, handing it to `batches`
/// every `interval` when the connection took the previous batch; ends when
/// the subscription does (disconnected as too slow) or the connection went.
async fn drain(
    mut subscription: Subscription,
    interval: Duration,
    batches: mpsc::Sender<Vec<Arc<Published>>>,
) {
    let mut latest = Latest::default();
    // The bytes of the batch handed over and perhaps not taken yet: counted
    // until the next one goes, since the channel has room for one.
    let mut handed = 0;
    let mut writes = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    writes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // An interval passed since what is held was first held.
    let mut due = false;
    loop {
        if latest.len() >= MAX_SERIES {
            // Too far behind to hold more: the connection's pace now.
            let bytes = latest.bytes();
            if batches.send(latest.take().collect()).await.is_err() {
                return;
            }
            handed = bytes;
            subscription.hold_coalesced(handed);
            due = false;
            continue;
        }
        tokio::select! {
            event = subscription.recv() => {
                let Some(first) = event else { return };
                latest.keep(first);
                for _ in 1..BATCH {
                    let Ok(event) = subscription.try_recv() else { break };
                    latest.keep(event);
                }
                subscription.hold_coalesced(latest.bytes() + handed);
            }
            _ = writes.tick() => due = !latest.is_empty(),
            () = batches.closed() => return,
        }
        if due {
            match batches.try_reserve() {
                Ok(permit) => {
                    handed = latest.bytes();
                    permit.send(latest.take().collect());
                    subscription.hold_coalesced(handed);
                    due = false;
                }
                // Still writing the previous batch: coalesce on.
                Err(TrySendError::Full(())) => {}
                Err(TrySendError::Closed(())) => return,
            }
        }
    }
}

/// The latest live event of each series since they were last taken.
#[derive(Default)]
pub struct Latest {
    series: HashSet<Series>,
    /// Of the events held, by [`Event::approx_bytes`](crate::event::Event::approx_bytes),
    /// and of their slots.
    bytes: usize,
}

/// A held series' slot in the set, and in the batch it is handed over in.
const SERIES_OVERHEAD: usize = 2 * std::mem::size_of::<Series>();

impl Latest {
    /// Holds `event`, replacing the one held for its series.
    pub fn keep(&mut self, event: Arc<Published>) {
        self.bytes += event.approx_bytes();
        match self.series.replace(Series(event)) {
            Some(Series(replaced)) => self.bytes -= replaced.approx_bytes(),
            None => self.bytes += SERIES_OVERHEAD,
        }
    }

    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// What the events held take.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The events held, one per series, in no particular order; none are
    /// held after.
    pub fn take(&mut self) -> impl Iterator<Item = Arc<Published>> + '_ {
        self.bytes = 0;
        self.series.drain().map(|series| series.0)
    }
}

/// An event hashed and compared by its series, as the index keys it.
struct Series(Arc<Published>);

impl Series {
    fn key(&self) -> (&str, &str) {
        (self.0.host_str(), self.0.service_str())
    }
}

impl Hash for Series {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialEq for Series {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Series {}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::event::{Event, Metric};
    use crate::pubsub::Pubsub;
    use crate::query::Query;

    #[test]
    fn an_interval_is_a_duration_from_10ms_to_10s() {
        assert_eq!(interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(interval("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(
            interval("1ms"),
            Err("`coalesce=1ms`: give an interval from 10ms to 10s".to_owned())
        );
        assert_eq!(
            interval("1m"),
            Err("`coalesce=1m`: give an interval from 10ms to 10s".to_owned())
        );
        let bad = interval("soon").unwrap_err();
        assert!(bad.starts_with("`coalesce=soon`: "), "{bad}");
        assert!(bad.ends_with("; give a duration such as 250ms"), "{bad}");
    }

    fn event(host: &str, metric: i64) -> Event {
        Event {
            host: Some(host.into()),
            service: Some("cpu".into()),
            metric: Some(Metric::Int(metric)),
            ..Event::default()
        }
    }

    /// The hosts and metrics of a batch, sorted.
    fn seen(batch: Vec<Arc<Published>>) -> Vec<(String, Option<Metric>)> {
        let mut seen: Vec<_> = (batch.iter())
            .map(|e| (e.host_str().to_owned(), e.metric))
            .collect();
        seen.sort_by(|x, y| x.0.cmp(&y.0));
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn a_coalescing_subscription_keeps_up_while_its_connection_takes_nothing() {
        let pubsub = Pubsub::new();
        // A queue of 4 events: without the drain, the 5th would disconnect it.
        let subscription = pubsub.subscribe(Query::parse("true").unwrap(), 4);
        let mut live = Live::new(subscription, Some(Duration::from_millis(100)));
        for metric in 0..50 {
            pubsub.publish(&event(["a", "b"][metric as usize % 2], metric));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 0);
        let want = |a, b| [("a", a), ("b", b)].map(|(h, m)| (h.to_owned(), Some(Metric::Int(m))));
        // Handed over at the first interval (100 ms: metrics 0 to 3 were in).
        assert_eq!(seen(live.next().await.unwrap()), want(2, 3));
        // Not taken since: what came after was held on, the latest of each.
        assert_eq!(seen(live.next().await.unwrap()), want(48, 49));
    }

    /// A connection that takes nothing holds as many series as the index
    /// has, outside its queue: they count in the bound of what all
    /// subscribers hold, and past it the subscriber is disconnected.
    #[tokio::test(start_paused = true)]
    async fn the_series_a_coalescing_subscriber_holds_count_in_the_subscribers_bound() {
        let host = |n: usize| format!("h{n:02}");
        let one = event(&host(0), 0).approx_bytes();
        let pubsub = Pubsub::with_max_held(20 * one);
        let held = || pubsub.stats.bytes_held.load(Ordering::Acquire);
        let subscription = pubsub.subscribe(Query::parse("true").unwrap(), 1_000);
        let mut live = Live::new(subscription, Some(Duration::from_millis(100)));
        for n in 0..10 {
            pubsub.publish(&event(&host(n), 0));
        }
        // The drain takes them from the queue.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(held() >= 10 * one, "{} held of 10 series of {one}", held());
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 0);
        for n in 10..30 {
            pubsub.publish(&event(&host(n), 0));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 1);
        assert_eq!(held(), 0);
        // Its connection learns it once it takes what was handed to it.
        let mut batches = 0;
        while live.next().await.is_some() {
            batches += 1;
            assert!(batches <= 1, "one batch at most was handed over");
        }
    }

    #[tokio::test]
    async fn the_latest_event_of_each_series_is_held() {
        let pubsub = Pubsub::new();
        let mut subscription = pubsub.subscribe(Query::parse("true").unwrap(), 10);
        for e in [event("a", 1), event("b", 1), event("a", 2), event("a", 3)] {
            pubsub.publish(&e);
        }
        let mut latest = Latest::default();
        while let Ok(e) = subscription.try_recv() {
            latest.keep(e);
        }
        assert_eq!(latest.len(), 2);
        let mut held: Vec<(String, Option<Metric>)> = (latest.take())
            .map(|e| (e.host_str().to_owned(), e.metric))
            .collect();
        held.sort_by(|x, y| x.0.cmp(&y.0));
        let want = [("a", 3), ("b", 1)].map(|(h, m)| (h.to_owned(), Some(Metric::Int(m))));
        assert_eq!(held, want);
        assert!(latest.is_empty());
    }
}
