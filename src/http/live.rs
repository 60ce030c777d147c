//! A subscriber's live events, as the batches its connection writes: every
//! event, those queued when one arrives in one write ([`Live::Each`]); or,
//! for a coalescing subscription (`coalesce=250ms`), the latest event of
//! each series (host, service) per interval ([`Live::Latest`]).
//!
//! A coalescing subscription's queue holds the latest event of each series
//! as it is published ([`Pubsub::subscribe_latest`]), whatever its
//! connection is doing; the connection takes it whole an interval after it
//! took the previous batch, or later if it was still writing that one. A
//! view of the latest states (the dashboard) that cannot take every event
//! of a busy index then gets fewer, larger batches instead of being
//! disconnected as too slow, until it holds more than [`MAX_SERIES`]
//! series. What it holds (the series, and the batch its connection is
//! writing) counts in the pubsub's bound on what all subscribers hold
//! (`--max-subscriber-memory`), as queued events do.
//!
//! [`Pubsub::subscribe_latest`]: crate::pubsub::Pubsub::subscribe_latest

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::pubsub::{Published, Subscription};

/// Most events written at once: those queued when one arrives, up to this
/// many. A write per event is a syscall per event per subscriber.
pub const BATCH: usize = 256;

/// The shortest interval taken: shorter is no coalescing at all.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// The longest interval taken.
pub const MAX_INTERVAL: Duration = Duration::from_secs(10);
/// Series a coalescing subscription holds at most: one more and it is
/// disconnected as too slow, so what one subscriber holds stays bounded
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
    /// A coalescing subscription, taken whole once per `writes` tick.
    Latest {
        subscription: Subscription,
        writes: Interval,
    },
}

impl Live {
    /// Every event of `subscription`, or with `coalesce` the latest of each
    /// series per that interval (`subscription` then made by
    /// [`Pubsub::subscribe_latest`](crate::pubsub::Pubsub::subscribe_latest)).
    pub fn new(subscription: Subscription, coalesce: Option<Duration>) -> Live {
        match coalesce {
            None => Live::Each(subscription),
            Some(interval) => {
                let mut writes = tokio::time::interval_at(Instant::now() + interval, interval);
                // A connection still writing when a tick was due takes the
                // next batch as it is done, the one after an interval later.
                writes.set_missed_tick_behavior(MissedTickBehavior::Delay);
                Live::Latest {
                    subscription,
                    writes,
                }
            }
        }
    }

    /// Why the pubsub disconnected the subscriber, when it was not for
    /// being too slow ([`Subscription::why`]).
    pub fn why(&self) -> Option<Arc<str>> {
        match self {
            Live::Each(subscription) | Live::Latest { subscription, .. } => subscription.why(),
        }
    }

    /// The next events to write; `None` once the pubsub disconnected the
    /// subscriber (too slow, or its query too costly: [`Live::why`]).
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
            Live::Latest {
                subscription,
                writes,
            } => {
                // Asked for the next, its connection wrote the last.
                subscription.written();
                writes.tick().await;
                let batch = subscription.take_all().await;
                // The next an interval after this one, not at the next tick:
                // after a quiet spell this one went with its first event.
                writes.reset();
                batch
            }
        }
    }
}

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
        // Room for 2 series: a queue of every event would be full at the 3rd.
        let subscription = pubsub.subscribe_latest(Query::parse("true").unwrap(), 2);
        let mut live = Live::new(subscription, Some(Duration::from_millis(100)));
        for metric in 0..50 {
            pubsub.publish(&event(["a", "b"][metric as usize % 2], metric));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 0);
        let want = |a, b| [("a", a), ("b", b)].map(|(h, m)| (h.to_owned(), Some(Metric::Int(m))));
        // Taken at once (an interval passed long ago): what came meanwhile,
        // coalesced.
        let started = Instant::now();
        assert_eq!(seen(live.next().await.unwrap()), want(48, 49));
        assert_eq!(started.elapsed(), Duration::ZERO);
        // The next batch an interval later.
        pubsub.publish(&event("a", 50));
        let next = seen(live.next().await.unwrap());
        assert_eq!(next, [("a".to_owned(), Some(Metric::Int(50)))]);
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    /// A connection that takes nothing holds as many series as the index
    /// has: they count in the bound of what all subscribers hold, and past
    /// it the subscriber is disconnected; the batch its connection took
    /// counts while it is written.
    #[tokio::test(start_paused = true)]
    async fn the_series_a_coalescing_subscriber_holds_count_in_the_subscribers_bound() {
        let host = |n: usize| format!("h{n:02}");
        let one = event(&host(0), 0).approx_bytes();
        let pubsub = Pubsub::with_max_held(20 * one);
        let held = || pubsub.stats.bytes_held.load(Ordering::Acquire);
        let subscription = pubsub.subscribe_latest(Query::parse("true").unwrap(), MAX_SERIES);
        let mut live = Live::new(subscription, Some(Duration::from_millis(100)));
        for metric in 0..100 {
            for n in 0..10 {
                pubsub.publish(&event(&host(n), metric));
            }
        }
        assert_eq!(held(), 10 * one, "the latest of 10 series");
        let batch = live.next().await.unwrap();
        assert_eq!(batch.len(), 10);
        assert_eq!(held(), 10 * one, "being written");
        for n in 10..20 {
            pubsub.publish(&event(&host(n), 0));
        }
        assert_eq!(held(), 20 * one);
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 0);
        pubsub.publish(&event(&host(20), 0));
        assert_eq!(pubsub.stats.disconnected_slow.load(Ordering::Relaxed), 1);
        assert_eq!(held(), 0, "freed at once");
        // Its connection learns it when it asks for the next batch.
        assert!(live.next().await.is_none());
    }

    /// The batch its connection took is held until it asks for the next,
    /// having written it; not until the next batch, which may be long.
    #[tokio::test(start_paused = true)]
    async fn a_batch_written_is_no_longer_held() {
        let host = |n: usize| format!("h{n:02}");
        let one = event(&host(0), 0).approx_bytes();
        let pubsub = Pubsub::new();
        let held = || pubsub.stats.bytes_held.load(Ordering::Acquire);
        let subscription = pubsub.subscribe_latest(Query::parse("true").unwrap(), MAX_SERIES);
        let mut live = Live::new(subscription, Some(Duration::from_millis(100)));
        for n in 0..10 {
            pubsub.publish(&event(&host(n), 0));
        }
        let batch = live.next().await.unwrap();
        assert_eq!((batch.len(), held()), (10, 10 * one), "being written");
        drop(batch);
        let quiet = tokio::time::timeout(Duration::from_secs(1), live.next()).await;
        assert!(quiet.is_err(), "nothing more came");
        assert_eq!(held(), 0, "written, so no longer held");
        pubsub.publish(&event(&host(0), 1));
        assert_eq!(held(), one);
    }

    /// A batch taken late in an interval (the first event after a quiet
    /// spell goes at once) is followed by the next an interval later, not at
    /// the next tick: that was 10 ms after it for `coalesce=100ms`.
    #[tokio::test(start_paused = true)]
    async fn a_batch_taken_late_in_an_interval_is_followed_an_interval_later() {
        let pubsub = Pubsub::new();
        let subscription = pubsub.subscribe_latest(Query::parse("true").unwrap(), 10);
        let mut live = Live::new(subscription, Some(Duration::from_millis(100)));
        let publisher = pubsub.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(190)).await;
            publisher.publish(&event("a", 1));
            tokio::time::sleep(Duration::from_millis(1)).await;
            publisher.publish(&event("a", 2));
        });
        assert_eq!(
            seen(live.next().await.unwrap()),
            [("a".to_owned(), Some(Metric::Int(1)))]
        );
        let taken = Instant::now();
        assert_eq!(
            seen(live.next().await.unwrap()),
            [("a".to_owned(), Some(Metric::Int(2)))]
        );
        assert!(
            taken.elapsed() >= Duration::from_millis(100),
            "the next batch {:?} after the one before",
            taken.elapsed()
        );
    }
}
