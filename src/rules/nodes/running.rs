//! A window's folds, kept up to date as events enter it (and, for a moving
//! window, leave it), so that folding the window costs O(1), not a pass over
//! its events: [`MetricSum`], the metrics' count and sum, compensated
//! (Neumaier) so that what left a moving window leaves no rounding behind;
//! [`Running`], a moving window's, with monotonic queues of the least and
//! greatest metric; [`FixedFolds`], a fixed window's, which only ever adds
//! and so needs none of its events but the extreme and latest ones.
//!
//! The results are those of [`fold`](super::window::fold) over the same
//! events, but for the last digits of a sum or mean of fractions: a
//! compensated sum rounds less than fold's left-to-right one.

use std::cmp::Ordering;
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::clock::Micros;
use crate::event::{Event, Metric};

use super::metric_f64;
use super::window::FoldKind;

/// Metrics above this are left out of the running sum: the window's sum is
/// then summed in order, as fold does. A moving window holds at most
/// `WINDOW_MAX` (10^5) of the others, which sum to at most 10^305, within
/// f64's range; a fixed window's may pass it (after 10^8 of them).
const HUGE: f64 = 1e300;

/// The window's events, oldest first, with their arrival times.
pub type Events = VecDeque<(Micros, Event)>;

/// The count and sum of a window's metrics. Its fields are part of a fixed
/// window's saved state ([`FixedFolds`]).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricSum {
    /// Metrics in, and of those the NaN, infinite and huge ones.
    count: u64,
    nan: u64,
    pos_inf: u64,
    neg_inf: u64,
    huge: u64,
    /// The finite metrics' sum, and the low digits its additions rounded off.
    sum: f64,
    compensation: f64,
}

impl MetricSum {
    pub fn add(&mut self, metric: f64) {
        self.count += 1;
        self.count_or_add(metric, 1);
    }

    pub fn take_away(&mut self, metric: f64) {
        self.count -= 1;
        self.count_or_add(metric, -1);
    }

    /// Counts a non-finite or huge metric in (`sign` 1) or out (-1); adds a
    /// finite one to the sum, or takes it away.
    fn count_or_add(&mut self, metric: f64, sign: i8) {
        let count = match metric {
            m if m.is_nan() => &mut self.nan,
            f64::INFINITY => &mut self.pos_inf,
            f64::NEG_INFINITY => &mut self.neg_inf,
            m if m.abs() > HUGE => &mut self.huge,
            m => return self.add_finite(if sign > 0 { m } else { -m }),
        };
        if sign > 0 {
            *count += 1;
        } else {
            *count -= 1;
        }
    }

    fn add_finite(&mut self, x: f64) {
        let total = self.sum + x;
        self.compensation += if self.sum.abs() >= x.abs() {
            (self.sum - total) + x
        } else {
            (x - total) + self.sum
        };
        self.sum = total;
    }

    /// The metrics' sum, as IEEE arithmetic has it: NaN with a NaN or both
    /// infinities in, else an infinity's sign with one in. Where the sum may
    /// pass f64's range (a huge metric in, or the finite ones' sum past it),
    /// only adding in order tells whether it does: `in_order` is the
    /// metrics' sum, left to right, as fold adds them. `None`: no metric.
    pub fn sum(&self, in_order: impl FnOnce() -> f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        if self.nan > 0 || (self.pos_inf > 0 && self.neg_inf > 0) {
            return Some(f64::NAN);
        }
        // Before the infinities: a sum that overflowed to one infinity and
        // then met the other is NaN.
        if self.huge > 0 {
            return Some(in_order());
        }
        if self.pos_inf > 0 {
            return Some(f64::INFINITY);
        }
        if self.neg_inf > 0 {
            return Some(f64::NEG_INFINITY);
        }
        let total = self.sum + self.compensation;
        Some(if total.is_finite() { total } else { in_order() })
    }

    pub fn mean(&self, in_order: impl FnOnce() -> f64) -> Option<f64> {
        Some(self.sum(in_order)? / self.count as f64)
    }
}

#[derive(Default)]
pub struct Running {
    /// The number of the window's oldest event; each event pushed gets the
    /// next number.
    front: u64,
    metrics: MetricSum,
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
        self.metrics.add(metric);
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
        self.metrics.take_away(metric);
        for queue in [&mut self.mins, &mut self.maxs] {
            if queue.front().is_some_and(|(n, _)| *n == number) {
                queue.pop_front();
            }
        }
    }

    /// The fold `kind` of `events`, the window these folds follow.
    pub fn fold(&self, kind: FoldKind, events: &Events) -> Option<Event> {
        let template = &events.back()?.1;
        let in_order = || events.iter().filter_map(|(_, e)| metric_f64(e)).sum();
        let metric = match kind {
            FoldKind::Count => Metric::Int(events.len() as i64),
            FoldKind::Sum => Metric::Float(self.metrics.sum(in_order)?),
            FoldKind::Mean => Metric::Float(self.metrics.mean(in_order)?),
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
}

/// Which extreme events a fixed window keeps: those its folds return. Each is
/// a copy of an event, which a window of only `mean` (say) need not hold.
#[derive(Debug, Clone, Copy)]
pub struct Extremes {
    pub min: bool,
    pub max: bool,
}

/// A fixed window's folds. The window only adds events until it closes, so
/// none need be held but the least, the greatest and the latest. Its fields
/// are the window's saved state
/// ([`Saved::FixedWindow`](super::saved::Saved::FixedWindow)).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct FixedFolds {
    events: u64,
    metrics: MetricSum,
    /// Every metric added left to right, uncompensated: fold's own sum,
    /// which [`MetricSum::sum`] falls back to past f64's range, where only
    /// this order says whether the sum overflows.
    in_order: f64,
    /// As `fold` picks them: the first of equal least metrics, the last of
    /// equal greatest ones (when [`Extremes`] asks for them). Boxed, as the
    /// latest: a window that holds none (idle, or that keeps no extremes)
    /// costs a pointer, not an event.
    min: Option<Box<Event>>,
    max: Option<Box<Event>>,
    /// The template of count, sum and mean.
    latest: Option<Box<Event>>,
}

impl FixedFolds {
    pub fn add(&mut self, event: &Event, extremes: Extremes) {
        self.events += 1;
        keep(&mut self.latest, event);
        let Some(metric) = metric_f64(event) else {
            return;
        };
        self.metrics.add(metric);
        self.in_order += metric;
        let beats = |kept: &Option<Box<Event>>, wins: fn(Ordering) -> bool| {
            kept.as_deref()
                .and_then(metric_f64)
                .is_none_or(|kept| wins(metric.total_cmp(&kept)))
        };
        if extremes.min && beats(&self.min, Ordering::is_lt) {
            keep(&mut self.min, event);
        }
        if extremes.max && beats(&self.max, Ordering::is_ge) {
            keep(&mut self.max, event);
        }
    }

    /// Events added.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// The fold `kind` of the events added.
    pub fn fold(&self, kind: FoldKind) -> Option<Event> {
        let in_order = || self.in_order;
        let metric = match kind {
            FoldKind::Count => Metric::Int(self.events as i64),
            FoldKind::Sum => Metric::Float(self.metrics.sum(in_order)?),
            FoldKind::Mean => Metric::Float(self.metrics.mean(in_order)?),
            FoldKind::Min => return self.min.as_deref().cloned(),
            FoldKind::Max => return self.max.as_deref().cloned(),
        };
        let mut out = self.latest.as_deref()?.clone();
        out.metric = Some(metric);
        Some(out)
    }
}

/// `event` into `slot`, reusing the allocations of the event it replaces.
fn keep(slot: &mut Option<Box<Event>>, event: &Event) {
    match slot {
        Some(kept) => (**kept).clone_from(event),
        None => *slot = Some(Box::new(event.clone())),
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

    const BOTH_EXTREMES: Extremes = Extremes {
        min: true,
        max: true,
    };

    fn event(n: u64, metric: Option<Metric>) -> Event {
        Event {
            service: Some(format!("e{n}")),
            metric,
            ..Event::default()
        }
    }

    /// The same event for count, min and max; for sum and mean the same
    /// number, or within `tolerance` (relative, absolute below 1).
    fn assert_same_fold(
        fresh: Option<Event>,
        kept: Option<Event>,
        tolerance: f64,
        at: impl std::fmt::Display,
    ) {
        let (fresh, kept) = match (fresh, kept) {
            (Some(f), Some(k)) if f.service == k.service && f.metric.is_some() => (f, k),
            (f, k) => {
                // As printed: a NaN metric is not equal to itself.
                return assert_eq!(format!("{f:?}"), format!("{k:?}"), "{at}");
            }
        };
        let (f, k) = (
            fresh.metric.unwrap().as_f64(),
            kept.metric.unwrap().as_f64(),
        );
        let close = (f - k).abs() <= tolerance * f.abs().max(1.0);
        assert!(
            f == k || (f.is_nan() && k.is_nan()) || close,
            "{at}: {f} {k}"
        );
        assert_eq!(
            format!(
                "{:?}",
                Event {
                    metric: None,
                    ..fresh
                }
            ),
            format!(
                "{:?}",
                Event {
                    metric: None,
                    ..kept
                }
            ),
            "{at}: the template"
        );
    }

    /// A moving window driven through random arrivals and departures folds
    /// as a fresh fold of its events does.
    fn moving_agrees_with_fresh_folds(
        seed: u64,
        tolerance: f64,
        metric: &impl Fn(u64) -> Option<Metric>,
    ) {
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
                assert_same_fold(fresh, kept, tolerance, format!("step {step}, {kind:?}"));
            }
        }
    }

    /// Fixed windows of random lengths (up to thousands of events) fold as
    /// a fold of their events does, at every event.
    fn fixed_agrees_with_fresh_folds(
        seed: u64,
        tolerance: f64,
        metric: &impl Fn(u64) -> Option<Metric>,
    ) {
        let mut next = xorshift(seed);
        let (mut events, mut folds) = (Vec::new(), FixedFolds::default());
        for step in 0..20_000u64 {
            let e = event(step, metric(next()));
            folds.add(&e, BOTH_EXTREMES);
            events.push(e);
            for kind in KINDS {
                let fresh = fold(kind, events.iter());
                assert_same_fold(
                    fresh,
                    folds.fold(kind),
                    tolerance,
                    format!("step {step}, {kind:?}"),
                );
            }
            if next().is_multiple_of(1_000) {
                (events, folds) = Default::default();
            }
        }
    }

    fn both_agree_with_fresh_folds(
        seed: u64,
        tolerance: f64,
        metric: impl Fn(u64) -> Option<Metric>,
    ) {
        moving_agrees_with_fresh_folds(seed, tolerance, &metric);
        fixed_agrees_with_fresh_folds(seed, tolerance, &metric);
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

    /// Ties too: few distinct values, as ints and as floats.
    #[test]
    fn integers_fold_exactly_as_a_fresh_fold() {
        both_agree_with_fresh_folds(7, 0.0, |r| match r % 5 {
            0 => None,
            1 => Some(Metric::Int((r % 1000) as i64 - 500)),
            _ => Some(Metric::Float((r % 64) as f64)),
        });
    }

    #[test]
    fn fractions_and_non_finite_metrics_fold_as_a_fresh_fold() {
        both_agree_with_fresh_folds(11, 1e-9, |r| match r % 400 {
            0 => Some(Metric::Float(f64::NAN)),
            1 => Some(Metric::Float(-f64::NAN)),
            2..=4 => Some(Metric::Float(f64::INFINITY)),
            5..=7 => Some(Metric::Float(f64::NEG_INFINITY)),
            8..=40 => None,
            _ => Some(Metric::Float((r % 100_000) as f64 / 7.0 - 5000.0)),
        });
    }

    #[test]
    fn metrics_past_f64s_range_sum_as_a_fresh_sum() {
        both_agree_with_fresh_folds(13, 0.0, |r| match r % 4 {
            0 => Some(Metric::Float(1e308)),
            1 => Some(Metric::Float(-1e308)),
            _ => Some(Metric::Int((r % 10) as i64)),
        });
    }

    /// A sum that overflowed to one infinity and met the other is NaN.
    #[test]
    fn metrics_past_f64s_range_and_infinities_sum_as_a_fresh_sum() {
        both_agree_with_fresh_folds(17, 0.0, |r| match r % 50 {
            0 => Some(Metric::Float(f64::INFINITY)),
            1 => Some(Metric::Float(f64::NEG_INFINITY)),
            2..=9 => Some(Metric::Float(1e308)),
            10..=14 => Some(Metric::Float(-1e308)),
            15..=19 => None,
            _ => Some(Metric::Int((r % 10) as i64)),
        });
    }

    /// Past f64's range with every metric within it, after some 10^8 of
    /// them near it: the compensated sum overflows, fold's sum tells.
    #[test]
    fn a_fixed_windows_finite_sum_past_f64s_range_is_folds() {
        let mut folds = FixedFolds::default();
        let near = event(0, Some(Metric::Float(1e300)));
        folds.add(&near, BOTH_EXTREMES);
        (folds.metrics.sum, folds.in_order) = (f64::MAX, f64::MAX);
        folds.add(&near, BOTH_EXTREMES);
        let sum = folds.fold(FoldKind::Sum).unwrap().metric;
        assert_eq!(sum, Some(Metric::Float(f64::INFINITY)));
    }
}
