//! A moving window's folds, kept up to date as events enter and leave it, so
//! that folding the window on every event costs O(1) (amortized), not a pass
//! over up to [`WINDOW_MAX`](super::window::WINDOW_MAX) events: counts, a
//! running sum of the finite metrics, compensated (Neumaier) so that what
//! left it leaves no rounding behind, and monotonic queues of the least and
//! greatest metric.
//!
//! The results are those of [`fold`](super::window::fold) over the same
//! events, but for the last digits of a sum or mean of fractions: a running
//! sum adds and takes away in another order than a fresh one.

use std::cmp::Ordering;
use std::collections::VecDeque;

use crate::clock::Micros;
use crate::event::{Event, Metric};

use super::metric_f64;
use super::window::FoldKind;

/// Metrics above this are left out of the running sum: the window's sum is
/// then summed afresh. At most `WINDOW_MAX` (10^5) of the others sum to
/// 10^305, within f64's range, so a running sum never overflows.
const HUGE: f64 = 1e300;

/// The window's events, oldest first, with their arrival times.
pub type Events = VecDeque<(Micros, Event)>;

#[derive(Default)]
pub struct Running {
    /// The number of the window's oldest event; each event pushed gets the
    /// next number.
    front: u64,
    /// Events with a metric, and of those the NaN, infinite and huge ones.
    with_metric: u64,
    nan: u64,
    pos_inf: u64,
    neg_inf: u64,
    huge: u64,
    /// The finite metrics' sum, and the low digits its additions rounded off.
    sum: f64,
    compensation: f64,
    /// Candidates for the least metric: increasing, the earliest of equals
    /// first (as `Iterator::min_by` picks); for the greatest: decreasing,
    /// the latest of equals kept (as `max_by` picks).
    mins: VecDeque<(u64, f64)>,
    maxs: VecDeque<(u64, f64)>,
}

impl Running {
    /// Running folds of `events`.
    pub fn of(events: &Events) -> Running {
        let mut running = Running::default();
        for (len, (_, event)) in events.iter().enumerate() {
            running.pushed(event, len);
        }
        running
    }

    /// `event` joined the back of the window, which held `len` events.
    pub fn pushed(&mut self, event: &Event, len: usize) {
        let Some(metric) = metric_f64(event) else {
            return;
        };
        let number = self.front + len as u64;
        self.with_metric += 1;
        self.count_or_add(metric, 1);
        while self
            .mins
            .back()
            .is_some_and(|(_, m)| m.total_cmp(&metric) == Ordering::Greater)
        {
            self.mins.pop_back();
        }
        self.mins.push_back((number, metric));
        while self
            .maxs
            .back()
            .is_some_and(|(_, m)| m.total_cmp(&metric) != Ordering::Greater)
        {
            self.maxs.pop_back();
        }
        self.maxs.push_back((number, metric));
    }

    /// `event`, the window's oldest, left it.
    pub fn popped(&mut self, event: &Event) {
        let number = self.front;
        self.front += 1;
        let Some(metric) = metric_f64(event) else {
            return;
        };
        self.with_metric -= 1;
        self.count_or_add(metric, -1);
        for queue in [&mut self.mins, &mut self.maxs] {
            if queue.front().is_some_and(|(n, _)| *n == number) {
                queue.pop_front();
            }
        }
    }

    /// Counts a non-finite metric in (`sign` 1) or out (-1); adds a finite
    /// one to the sum, or takes it away.
    fn count_or_add(&mut self, metric: f64, sign: i8) {
        let count = match metric {
            m if m.is_nan() => &mut self.nan,
            f64::INFINITY => &mut self.pos_inf,
            f64::NEG_INFINITY => &mut self.neg_inf,
            m if m.abs() > HUGE => &mut self.huge,
            m => return self.add(if sign > 0 { m } else { -m }),
        };
        if sign > 0 {
            *count += 1;
        } else {
            *count -= 1;
        }
    }

    fn add(&mut self, x: f64) {
        let total = self.sum + x;
        self.compensation += if self.sum.abs() >= x.abs() {
            (self.sum - total) + x
        } else {
            (x - total) + self.sum
        };
        self.sum = total;
    }

    /// The fold `kind` of `events`, the window these folds follow.
    pub fn fold(&self, kind: FoldKind, events: &Events) -> Option<Event> {
        let template = &events.back()?.1;
        let metric = match kind {
            FoldKind::Count => Metric::Int(events.len() as i64),
            FoldKind::Sum => Metric::Float(self.sum(events)?),
            FoldKind::Mean => Metric::Float(self.sum(events)? / self.with_metric as f64),
            FoldKind::Min | FoldKind::Max => {
                let queue = if kind == FoldKind::Min {
                    &self.mins
                } else {
                    &self.maxs
                };
                let (number, _) = queue.front()?;
                return Some(events[(number - self.front) as usize].1.clone());
            }
        };
        let mut out = template.clone();
        out.metric = Some(metric);
        Some(out)
    }

    /// The metrics' sum, as IEEE arithmetic has it: NaN with a NaN or both
    /// infinities in, else an infinity's sign with one in.
    fn sum(&self, events: &Events) -> Option<f64> {
        if self.with_metric == 0 {
            return None;
        }
        if self.nan > 0 || (self.pos_inf > 0 && self.neg_inf > 0) {
            return Some(f64::NAN);
        }
        if self.pos_inf > 0 {
            return Some(f64::INFINITY);
        }
        if self.neg_inf > 0 {
            return Some(f64::NEG_INFINITY);
        }
        if self.huge > 0 {
            // Where a sum may pass f64's range: as a fresh sum, left to
            // right, overflows (or does not).
            let metrics = events.iter().filter_map(|(_, e)| metric_f64(e));
            return metrics.reduce(|a, b| a + b);
        }
        Some(self.sum + self.compensation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::nodes::window::fold;
    use crate::test_rng::xorshift;

    const KINDS: [FoldKind; 5] = [
        FoldKind::Count,
        FoldKind::Sum,
        FoldKind::Mean,
        FoldKind::Min,
        FoldKind::Max,
    ];

    fn event(n: u64, metric: Option<Metric>) -> Event {
        Event {
            service: Some(format!("e{n}")),
            metric,
            ..Event::default()
        }
    }

    /// A window driven through random arrivals and departures folds as a
    /// fresh fold of its events does: the same event for count, min and
    /// max; for sum and mean the same number, within rounding when the
    /// metrics are fractions.
    fn agrees_with_fresh_folds(seed: u64, metric: impl Fn(u64) -> Option<Metric>) {
        let mut next = xorshift(seed);
        let (mut events, mut running) = (Events::new(), Running::default());
        for step in 0..5_000u64 {
            if !next().is_multiple_of(3) || events.is_empty() {
                let e = event(step, metric(next()));
                running.pushed(&e, events.len());
                events.push_back((0, e));
            } else {
                let (_, e) = events.pop_front().unwrap();
                running.popped(&e);
            }
            for kind in KINDS {
                let fresh = fold(kind, events.iter().map(|(_, e)| e));
                let kept = running.fold(kind, &events);
                let (fresh, kept) = match (kind, fresh, kept) {
                    (FoldKind::Sum | FoldKind::Mean, Some(f), Some(k)) => (f.metric, k.metric),
                    (_, f, k) => {
                        // As printed: a NaN metric is not equal to itself.
                        assert_eq!(format!("{f:?}"), format!("{k:?}"), "step {step}, {kind:?}");
                        continue;
                    }
                };
                let (f, k) = (fresh.unwrap().as_f64(), kept.unwrap().as_f64());
                let close = (f - k).abs() <= 1e-9 * f.abs().max(1.0);
                assert!(
                    f == k || (f.is_nan() && k.is_nan()) || close,
                    "step {step}, {kind:?}: {f} {k}"
                );
            }
        }
    }

    /// What left the window leaves no rounding behind in the sum.
    #[test]
    fn a_sum_forgets_what_left_it_exactly() {
        let (mut events, mut running) = (Events::new(), Running::default());
        let metrics = [1e16].into_iter().chain([1.0; 1000]).chain([0.5, 0.25]);
        for (n, metric) in metrics.enumerate() {
            let e = event(n as u64, Some(Metric::Float(metric)));
            running.pushed(&e, events.len());
            events.push_back((0, e));
        }
        let (_, big) = events.pop_front().unwrap();
        running.popped(&big);
        let sum = running.fold(FoldKind::Sum, &events).unwrap().metric;
        assert_eq!(sum, Some(Metric::Float(1000.75)));
    }

    #[test]
    fn integers_fold_exactly_as_a_fresh_fold() {
        agrees_with_fresh_folds(7, |r| match r % 5 {
            0 => None,
            1 => Some(Metric::Int((r % 1000) as i64 - 500)),
            _ => Some(Metric::Float((r % 64) as f64)),
        });
    }

    #[test]
    fn fractions_and_non_finite_metrics_fold_as_a_fresh_fold() {
        agrees_with_fresh_folds(11, |r| match r % 40 {
            0 => Some(Metric::Float(f64::NAN)),
            1 => Some(Metric::Float(f64::INFINITY)),
            2 => Some(Metric::Float(f64::NEG_INFINITY)),
            3 => None,
            _ => Some(Metric::Float((r % 100_000) as f64 / 7.0 - 5000.0)),
        });
    }

    #[test]
    fn metrics_past_f64s_range_sum_as_a_fresh_sum() {
        agrees_with_fresh_folds(13, |r| match r % 4 {
            0 => Some(Metric::Float(1e308)),
            1 => Some(Metric::Float(-1e308)),
            _ => Some(Metric::Int((r % 10) as i64)),
        });
    }
}
