//! A window's folds, kept up to date as events enter it (and, for a moving
//! window, leave it), so that folding the window costs O(1), not a pass over
//! its events: [`Running`], a moving window's, with its metrics' count and
//! sum ([`MetricSum`]: its integers' exactly, its floats' compensated
//! (Neumaier) so that what left the window leaves no rounding behind) and
//! monotonic queues of the least and greatest metric (those it folds);
//! [`FixedFolds`], a fixed window's, which only ever adds and so needs none
//! of its events but the extreme and latest ones.
//!
//! The results are those of [`fold`](super::window::fold) over the same
//! events: exactly for a fixed window, which adds its metrics in fold's (and
//! Riemann's) order; for a moving window but for a sum with a float in it,
//! which its running sum rounds less (`0.1 + 1e17 - 1e17` is 0.1, not
//! fold's 0; integers past 2^53 then a float are not first rounded to one
//! float). A sum of only integers is the same exact integer in all three.

use std::cmp::Ordering;
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::clock::Micros;
use crate::event::{Event, Metric};

use super::numbers::{self, Sum};
use super::spread::{Deviations, FixedSpread, Middle, std_dev_of};
use super::window::FoldKind;

/// Metrics above this are left out of the running sum: the window's sum is
/// then summed in order, as fold does. A moving window holds at most
/// `WINDOW_MAX` (10^5) of the others, which sum to at most 10^305, within
/// f64's range.
const HUGE: f64 = 1e300;

/// Metrics above this in a moving window make its standard deviation be
/// folded in two passes: their squares may pass f64's range, and taking
/// them away would not undo adding them. They are kept out of its
/// [`Deviations`].
const HUGE_SQUARE_ROOT: f64 = 1e150;

/// The window's events, oldest first, with their arrival times.
pub type Events = VecDeque<(Micros, Event)>;

/// The count and sum of a moving window's metrics.
#[derive(Default)]
pub struct MetricSum {
    /// Metrics in; of those the floats, and of those the NaN, infinite and
    /// huge ones.
    count: u64,
    floats: u64,
    nan: u64,
    pos_inf: u64,
    neg_inf: u64,
    huge: u64,
    /// The integers' sum, exactly: with no float in the window, the sum is
    /// this integer, as fold's (and Riemann's) is. Within i128's range: the
    /// window holds at most `WINDOW_MAX` metrics.
    ints: i128,
    /// The finite floats' sum.
    floats_sum: Compensated,
}

impl MetricSum {
    pub fn add(&mut self, metric: Metric) {
        self.count += 1;
        self.count_or_add(metric, 1);
    }

    pub fn take_away(&mut self, metric: Metric) {
        self.count -= 1;
        self.count_or_add(metric, -1);
    }

    /// Adds an integer or a finite float to its sum (`sign` 1) or takes it
    /// away (-1); counts a non-finite or huge float in or out.
    fn count_or_add(&mut self, metric: Metric, sign: i8) {
        let metric = match metric {
            Metric::Int(m) => {
                self.ints += i128::from(sign) * i128::from(m);
                return;
            }
            Metric::Float(m) => m,
        };
        step(&mut self.floats, sign);
        let count = match metric {
            m if m.is_nan() => &mut self.nan,
            f64::INFINITY => &mut self.pos_inf,
            f64::NEG_INFINITY => &mut self.neg_inf,
            m if m.abs() > HUGE => &mut self.huge,
            m => return self.floats_sum.add(f64::from(sign) * m),
        };
        step(count, sign);
    }

    /// The metrics' sum: the integers' exactly with no float in; with one,
    /// as IEEE arithmetic has it: NaN with a NaN or both infinities in, else
    /// an infinity's sign with one in. Where the sum may pass f64's range (a
    /// huge metric in), only adding in order tells whether it does:
    /// `in_order` is the metrics' sum, left to right, as fold adds them.
    /// `None`: no metric.
    pub fn sum(&self, in_order: impl FnOnce() -> f64) -> Option<Sum> {
        if self.count == 0 {
            return None;
        }
        if self.floats == 0 {
            return Some(Sum::Int(self.ints));
        }
        if self.nan > 0 || (self.pos_inf > 0 && self.neg_inf > 0) {
            return Some(Sum::Float(f64::NAN));
        }
        // Before the infinities: a sum that overflowed to one infinity and
        // then met the other is NaN.
        if self.huge > 0 {
            return Some(Sum::Float(in_order()));
        }
        if self.pos_inf > 0 {
            return Some(Sum::Float(f64::INFINITY));
        }
        if self.neg_inf > 0 {
            return Some(Sum::Float(f64::NEG_INFINITY));
        }
        // The integers' sum rounded, and what the rounding left off, added
        // as the floats were: the sum rounds about once.
        let mut total = self.floats_sum;
        let rounded = self.ints as f64;
        total.add(rounded);
        total.add((self.ints - rounded as i128) as f64);
        Some(Sum::Float(total.value()))
    }

    pub fn mean(&self, in_order: impl FnOnce() -> f64) -> Option<Metric> {
        Some(self.sum(in_order)?.mean(self.count))
    }
}

fn step(count: &mut u64, sign: i8) {
    if sign > 0 {
        *count += 1;
    } else {
        *count -= 1;
    }
}

/// A float sum and the low digits its additions rounded off (Neumaier).
#[derive(Default, Clone, Copy)]
struct Compensated {
    sum: f64,
    compensation: f64,
}

impl Compensated {
    fn add(&mut self, x: f64) {
        let total = self.sum + x;
        self.compensation += if self.sum.abs() >= x.abs() {
            (self.sum - total) + x
        } else {
            (x - total) + self.sum
        };
        self.sum = total;
    }

    fn value(self) -> f64 {
        self.sum + self.compensation
    }
}

pub struct Running {
    /// The number of the window's oldest event; each event pushed gets the
    /// next number.
    front: u64,
    metrics: MetricSum,
    /// The queues kept: those of the extremes the window folds. A `by`
    /// group's window of only `mean` saves two allocations.
    kept: Kept,
    /// Candidates for the least metric: increasing (in [`numbers::cmp`]'s
    /// order); for the greatest: decreasing. Of equals, the latest is kept,
    /// as Riemann's `minimum` (`<=`) and `maximum` (`>=`) keep it.
    mins: VecDeque<(u64, Metric)>,
    maxs: VecDeque<(u64, Metric)>,
    /// The median's ranks, kept if the window folds it.
    middle: Middle,
    deviations: Deviations,
    /// Metrics taken out of `deviations` since it was last built anew, and
    /// of those in the window the ones whose squares may pass f64's range.
    taken_away: usize,
    huge: u64,
}

impl Running {
    /// Running folds of no events, for a window that folds `extremes`.
    pub fn new(kept: Kept) -> Running {
        Running {
            front: 0,
            metrics: MetricSum::default(),
            kept,
            mins: VecDeque::new(),
            maxs: VecDeque::new(),
            middle: Middle::default(),
            deviations: Deviations::default(),
            taken_away: 0,
            huge: 0,
        }
    }

    /// The folds by order whose ranks are kept.
    pub fn kept(&self) -> Kept {
        self.kept
    }

    /// Running folds of `events`.
    pub fn of(events: &Events, kept: Kept) -> Running {
        let mut running = Running::new(kept);
        for (len, (_, event)) in events.iter().enumerate() {
            running.pushed(event, len);
        }
        running
    }

    /// `event` joined the back of the window, which held `len` events.
    pub fn pushed(&mut self, event: &Event, len: usize) {
        let Some(metric) = event.metric else {
            return;
        };
        let number = self.front + len as u64;
        self.metrics.add(metric);
        if metric.as_f64().abs() > HUGE_SQUARE_ROOT {
            self.huge += 1;
        } else {
            self.deviations.add(metric);
        }
        if self.kept.median {
            self.middle.insert(number, metric);
        }
        if self.kept.min {
            while self
                .mins
                .back()
                .is_some_and(|(_, m)| numbers::cmp(*m, metric) != Ordering::Less)
            {
                self.mins.pop_back();
            }
            self.mins.push_back((number, metric));
        }
        if self.kept.max {
            while self
                .maxs
                .back()
                .is_some_and(|(_, m)| numbers::cmp(*m, metric) != Ordering::Greater)
            {
                self.maxs.pop_back();
            }
            self.maxs.push_back((number, metric));
        }
    }

    /// `event`, the window's oldest, left it.
    pub fn popped(&mut self, event: &Event) {
        let number = self.front;
        self.front += 1;
        let Some(metric) = event.metric else {
            return;
        };
        self.metrics.take_away(metric);
        if metric.as_f64().abs() > HUGE_SQUARE_ROOT {
            self.huge -= 1;
        } else {
            self.deviations.take_away(metric);
            self.taken_away += 1;
        }
        if self.kept.median {
            self.middle.remove(number, metric);
        }
        for queue in [&mut self.mins, &mut self.maxs] {
            if queue.front().is_some_and(|(n, _)| *n == number) {
                queue.pop_front();
            }
        }
    }

    /// Builds the deviations anew from `events` once as many have left the
    /// window as it holds: what rounding taking them away left behind goes,
    /// at O(1) an event.
    pub fn refresh(&mut self, events: &Events) {
        if self.taken_away <= events.len() {
            return;
        }
        self.deviations = Deviations::default();
        let metrics = events.iter().filter_map(|(_, e)| e.metric);
        for metric in metrics.filter(|m| m.as_f64().abs() <= HUGE_SQUARE_ROOT) {
            self.deviations.add(metric);
        }
        self.taken_away = 0;
    }

    /// The fold `kind` of `events`, the window these folds follow.
    pub fn fold(&self, kind: FoldKind, events: &Events) -> Option<Event> {
        let template = &events.back()?.1;
        let in_order =
            || Sum::of(events.iter().filter_map(|(_, e)| e.metric)).map_or(0.0, Sum::as_f64);
        let metric = match kind {
            FoldKind::Count => Metric::Int(events.len() as i64),
            FoldKind::Sum => self.metrics.sum(in_order)?.metric(),
            FoldKind::Mean => self.metrics.mean(in_order)?,
            // Where a square may pass f64's range, taking it away does not
            // undo adding it: in two passes, as fold does.
            FoldKind::StdDev if self.huge > 0 => {
                Metric::Float(std_dev_of(events.iter().filter_map(|(_, e)| e.metric))?)
            }
            FoldKind::StdDev => Metric::Float(self.deviations.std_dev()?),
            FoldKind::Median => {
                let number = self.middle.median()?;
                return Some(events[(number - self.front) as usize].1.clone());
            }
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

/// Which folds by order a window keeps what they need for: those it folds.
/// A fixed window's extremes are copies of events, a moving window's queues
/// and its median's ranks, which a window of only `mean` (say) need not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub min: bool,
    pub max: bool,
    pub median: bool,
}

/// A fixed window's folds. The window only adds events until it closes, so
/// none need be held but the least, the greatest and the latest. Its fields
/// are the window's saved state
/// ([`Saved::ExactFixedWindow`](super::saved::Saved::ExactFixedWindow)).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct FixedFolds {
    events: u64,
    with_metric: u64,
    /// The metrics added left to right, as fold (and Riemann) adds them, so
    /// a sum is theirs to the last bit: integers exactly, then floats with
    /// their rounding and overflow. `None`: no metric yet.
    sum: Option<Sum>,
    /// As `fold` picks them: the last of equal least metrics, and of equal
    /// greatest ones (when [`Kept`] asks for them). Boxed, as the
    /// latest: a window that holds none (idle, or that keeps no extremes)
    /// costs a pointer, not an event.
    min: Option<Box<Event>>,
    max: Option<Box<Event>>,
    /// The template of count, sum and mean.
    latest: Option<Box<Event>>,
}

impl FixedFolds {
    pub fn add(&mut self, event: &Event, kept: Kept) {
        // Saturating: restored counts may be anything the file held.
        self.events = self.events.saturating_add(1);
        keep(&mut self.latest, event);
        let Some(metric) = event.metric else {
            return;
        };
        self.with_metric = self.with_metric.saturating_add(1);
        self.sum = Some(self.sum.map_or(metric.into(), |sum| sum.add(metric)));
        let beats = |kept: &Option<Box<Event>>, wins: fn(Ordering) -> bool| {
            kept.as_deref()
                .and_then(|kept| kept.metric)
                .is_none_or(|kept| wins(numbers::cmp(metric, kept)))
        };
        // Of equals the latest, as Riemann's `<=` and `>=`.
        if kept.min && beats(&self.min, Ordering::is_le) {
            keep(&mut self.min, event);
        }
        if kept.max && beats(&self.max, Ordering::is_ge) {
            keep(&mut self.max, event);
        }
    }

    /// Could adding events have made them? A state file may hold
    /// anything: a sum with no metric counted made a mean of it over none
    /// (infinite), and an extreme with none a min of no metric.
    pub fn fits(&self) -> bool {
        let with_metric = self.with_metric > 0;
        self.with_metric <= self.events
            && self.sum.is_some() == with_metric
            && self.latest.is_some() == (self.events > 0)
            && (with_metric || (self.min.is_none() && self.max.is_none()))
    }

    /// Events added.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// The events it holds, which its folds emit.
    pub fn held_mut(&mut self) -> impl Iterator<Item = &mut Event> {
        held_mut([&mut self.min, &mut self.max, &mut self.latest])
    }

    /// The fold `kind` of the events added, `spread` their median and
    /// deviations.
    pub fn fold(&self, kind: FoldKind, spread: Option<&FixedSpread>) -> Option<Event> {
        let metric = match kind {
            // A restored count may pass i64's range: not negative then.
            FoldKind::Count => Metric::Int(i64::try_from(self.events).unwrap_or(i64::MAX)),
            FoldKind::Sum => self.sum?.metric(),
            FoldKind::Mean => self.sum?.mean(self.with_metric),
            FoldKind::StdDev => Metric::Float(spread?.std_dev()?),
            FoldKind::Median => return spread?.median(),
            FoldKind::Min => return self.min.as_deref().cloned(),
            FoldKind::Max => return self.max.as_deref().cloned(),
        };
        let mut out = self.latest.as_deref()?.clone();
        out.metric = Some(metric);
        Some(out)
    }
}

/// A fixed window's folds as versions 2 and 3 of the state file saved them
/// ([`Saved::FixedWindow`](super::saved::Saved::FixedWindow)): their sum a
/// float whatever the metrics. Restored, the window goes on adding to it as
/// a float, as the build that saved it would have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloatSumFolds {
    events: u64,
    with_metric: u64,
    sum: Option<f64>,
    min: Option<Box<Event>>,
    max: Option<Box<Event>>,
    latest: Option<Box<Event>>,
}

impl FloatSumFolds {
    /// The events it holds, which its folds emit.
    pub fn held_mut(&mut self) -> impl Iterator<Item = &mut Event> {
        held_mut([&mut self.min, &mut self.max, &mut self.latest])
    }
}

/// The events of a fixed window's slots.
fn held_mut(slots: [&mut Option<Box<Event>>; 3]) -> impl Iterator<Item = &mut Event> {
    slots.into_iter().flatten().map(|event| &mut **event)
}

impl From<FloatSumFolds> for FixedFolds {
    fn from(saved: FloatSumFolds) -> FixedFolds {
        FixedFolds {
            events: saved.events,
            with_metric: saved.with_metric,
            sum: saved.sum.map(Sum::Float),
            min: saved.min,
            max: saved.max,
            latest: saved.latest,
        }
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

    const KINDS: [FoldKind; 7] = [
        FoldKind::Count,
        FoldKind::Sum,
        FoldKind::Mean,
        FoldKind::Min,
        FoldKind::Max,
        FoldKind::Median,
        FoldKind::StdDev,
    ];

    const ALL_KEPT: Kept = Kept {
        min: true,
        max: true,
        median: true,
    };

    /// A state file that passed its checksum may hold any count: at 2^64
    /// the next event overflowed them (a panic where overflow is checked,
    /// as in the fuzzer's build).
    #[test]
    fn counts_restored_at_their_limit_take_the_next_event() {
        let mut folds = FixedFolds {
            events: u64::MAX,
            with_metric: u64::MAX,
            ..FixedFolds::default()
        };
        folds.add(&event(0, Some(Metric::Int(1))), ALL_KEPT);
        assert_eq!((folds.events, folds.with_metric), (u64::MAX, u64::MAX));
    }

    fn event(n: u64, metric: Option<Metric>) -> Event {
        Event {
            service: Some(format!("e{n}")),
            metric,
            ..Event::default()
        }
    }

    /// The same event for count, min and max; for sum and mean the same
    /// integer, or float, or one within `tolerance` (relative, absolute
    /// below 1).
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
        let (f, k) = match (fresh.metric.unwrap(), kept.metric.unwrap()) {
            (Metric::Int(f), Metric::Int(k)) => return assert_eq!(f, k, "{at}"),
            (Metric::Float(f), Metric::Float(k)) => (f, k),
            (f, k) => panic!("{at}: {f:?} {k:?}"),
        };
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

    /// A standard deviation within rounding of one folded anew: relative
    /// 1e-9, or 1e-7 of the metrics' `scale`; non-finite alike.
    fn assert_close_deviation(fresh: Option<Event>, kept: Option<Event>, scale: f64, at: String) {
        let metric = |e: &Option<Event>| e.as_ref().and_then(|e| e.metric).map(Metric::as_f64);
        let (f, k) = match (metric(&fresh), metric(&kept)) {
            (Some(f), Some(k)) => (f, k),
            (f, k) => return assert_eq!(f, k, "{at}"),
        };
        if !f.is_finite() || !k.is_finite() {
            return assert!(!f.is_finite() && !k.is_finite(), "{at}: {f} {k}");
        }
        let close = (f - k).abs() <= 1e-9 * f.abs() + 1e-7 * scale;
        assert!(close, "{at}: {f} {k}, scale {scale}");
    }

    /// A moving window driven through random arrivals and departures folds
    /// as a fresh fold of its events does.
    fn moving_agrees_with_fresh_folds(
        seed: u64,
        tolerance: f64,
        metric: &impl Fn(u64) -> Option<Metric>,
    ) {
        let mut next = xorshift(seed);
        let (mut events, mut running) = (Events::new(), Running::new(ALL_KEPT));
        let mut scale = 0.0f64;
        for step in 0..5_000u64 {
            if !next().is_multiple_of(3) || events.is_empty() {
                let e = event(step, metric(next()));
                running.pushed(&e, events.len());
                events.push_back((0, e));
            } else {
                let (_, e) = events.pop_front().unwrap();
                running.popped(&e);
            }
            // A standard deviation that went through values that left
            // keeps their rounding, to their scale, until the window turns
            // over.
            let latest = events.back().and_then(|(_, e)| e.metric);
            if let Some(m) = latest.map(Metric::as_f64).filter(|m| m.is_finite()) {
                scale = scale.max(m.abs());
            }
            for kind in KINDS {
                let fresh = fold(kind, events.iter().map(|(_, e)| e));
                let kept = running.fold(kind, &events);
                let at = format!("step {step}, {kind:?}");
                if kind == FoldKind::StdDev {
                    assert_close_deviation(fresh, kept, scale, at);
                } else {
                    assert_same_fold(fresh, kept, tolerance, at);
                }
            }
        }
    }

    /// Fixed windows of random lengths (up to thousands of events) fold as
    /// a fold of their events does, at every event, to the last bit.
    fn fixed_agrees_with_fresh_folds(seed: u64, metric: &impl Fn(u64) -> Option<Metric>) {
        let mut next = xorshift(seed);
        let (mut events, mut folds) = (Vec::new(), FixedFolds::default());
        let mut spread = FixedSpread::default();
        for step in 0..20_000u64 {
            let e = event(step, metric(next()));
            folds.add(&e, ALL_KEPT);
            spread.add(&e, true);
            events.push(e);
            // A median and a deviation folded anew cost a pass over the
            // window: checked at every event of a short window, then now and then.
            let spread_checked = events.len() < 64 || step.is_multiple_of(16);
            for kind in KINDS {
                let spread_kind = matches!(kind, FoldKind::Median | FoldKind::StdDev);
                if spread_kind && !spread_checked {
                    continue;
                }
                let fresh = fold(kind, events.iter());
                let kept = folds.fold(kind, Some(&spread));
                let at = format!("step {step}, {kind:?}");
                if kind == FoldKind::StdDev {
                    // Welford's one pass, not fold's two, which overflow
                    // where Welford's need not.
                    let huge = |e: &Event| {
                        e.metric
                            .is_some_and(|m| m.as_f64().abs() > HUGE_SQUARE_ROOT)
                    };
                    if !events.iter().any(huge) {
                        assert_close_deviation(fresh, kept, 0.0, at);
                    }
                    continue;
                }
                // As printed: -0.0 apart from 0.0, and NaN equal to itself.
                assert_eq!(format!("{fresh:?}"), format!("{kept:?}"), "{at}");
            }
            if next().is_multiple_of(1_000) {
                (events, folds, spread) = Default::default();
            }
        }
    }

    fn both_agree_with_fresh_folds(
        seed: u64,
        tolerance: f64,
        metric: impl Fn(u64) -> Option<Metric>,
    ) {
        moving_agrees_with_fresh_folds(seed, tolerance, &metric);
        fixed_agrees_with_fresh_folds(seed, &metric);
    }

    /// What left the window leaves no rounding behind in the sum.
    #[test]
    fn a_sum_forgets_what_left_it_exactly() {
        let (mut events, mut running) = (Events::new(), Running::new(ALL_KEPT));
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

    /// Integers past 2^53, and sums past i64's range.
    #[test]
    fn large_integers_fold_exactly_as_a_fresh_fold() {
        both_agree_with_fresh_folds(19, 0.0, |r| match r % 10 {
            0 => None,
            1 => Some(Metric::Int(i64::MAX - (r % 3) as i64)),
            2 => Some(Metric::Int(i64::MIN + (r % 3) as i64)),
            _ => Some(Metric::Int((r as i64) >> (8 + r % 4))),
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

    /// Where large values cancel, a fixed window's sum is Riemann's, left to
    /// right; a moving window's is the exact one.
    #[test]
    fn cancelling_values_sum_in_a_fixed_window_as_riemann_adds_them() {
        let events: Vec<Event> = [0.1, 1e17, -1e17]
            .into_iter()
            .zip(0..)
            .map(|(metric, n)| event(n, Some(Metric::Float(metric))))
            .collect();
        let mut folds = FixedFolds::default();
        let (mut held, mut running) = (Events::new(), Running::new(ALL_KEPT));
        for e in &events {
            folds.add(e, ALL_KEPT);
            running.pushed(e, held.len());
            held.push_back((0, e.clone()));
        }
        let sum = |e: Option<Event>| e.and_then(|e| e.metric);
        assert_eq!(
            sum(folds.fold(FoldKind::Sum, None)),
            Some(Metric::Float(0.0))
        );
        assert_eq!(
            sum(fold(FoldKind::Sum, events.iter())),
            Some(Metric::Float(0.0))
        );
        assert_eq!(
            sum(running.fold(FoldKind::Sum, &held)),
            Some(Metric::Float(0.1))
        );
    }

    /// 2^53 + 1: the least integer an f64 cannot hold.
    const BIG: i64 = (1 << 53) + 1;

    /// The metric of fold `kind` over `metrics` by a fresh fold, a fixed
    /// window's folds and a moving window's, in that order.
    fn folded_three_ways(kind: FoldKind, metrics: &[Metric]) -> [Option<Metric>; 3] {
        let events: Vec<Event> = (0..)
            .zip(metrics)
            .map(|(n, m)| event(n, Some(*m)))
            .collect();
        let mut folds = FixedFolds::default();
        let (mut held, mut running) = (Events::new(), Running::new(ALL_KEPT));
        for e in &events {
            folds.add(e, ALL_KEPT);
            running.pushed(e, held.len());
            held.push_back((0, e.clone()));
        }
        [
            fold(kind, events.iter()),
            folds.fold(kind, None),
            running.fold(kind, &held),
        ]
        .map(|e| e.and_then(|e| e.metric))
    }

    /// Each case's metrics folded three ways give its one expected metric.
    fn fold_alike_to(kind: FoldKind, cases: &[(Vec<Metric>, Metric)]) {
        for (metrics, folded) in cases {
            let expected = [Some(*folded); 3];
            assert_eq!(folded_three_ways(kind, metrics), expected, "{metrics:?}");
        }
    }

    /// Riemann's `(reduce + metrics)` adds Longs as Longs until a Double
    /// comes: a sum of integers is an integer, exact past 2^53.
    #[test]
    fn a_sum_of_integers_is_an_exact_integer() {
        use Metric::{Float, Int};
        let cases = [
            (vec![Int(BIG), Int(0)], Int(BIG)),
            (vec![Int(1), Int(2), Float(0.5)], Float(3.5)),
            (vec![Int(-BIG), Int(-BIG), Int(2)], Int(-2 * BIG + 2)),
            // Riemann's `+` throws partway (its event is lost); the sum is
            // exact, and an integer where it ends within i64.
            (vec![Int(i64::MAX), Int(1), Int(-1)], Int(i64::MAX)),
            (vec![Int(i64::MIN), Int(-1), Int(1)], Int(i64::MIN)),
            // Past i64: the exact sum, as a float.
            (
                vec![Int(i64::MAX), Int(2)],
                Float(9_223_372_036_854_775_808.0),
            ),
            (
                vec![Int(i64::MIN), Int(i64::MIN)],
                Float(-18_446_744_073_709_551_616.0),
            ),
        ];
        fold_alike_to(FoldKind::Sum, &cases);
    }

    /// A fixed window adds as Riemann does, the integers before the first
    /// float rounded to one float; a moving window's sum rounds once.
    #[test]
    fn a_float_after_large_integers_sums_as_riemann_adds_in_a_fixed_window() {
        let metrics = [Metric::Int(BIG), Metric::Float(0.5)];
        let [fresh, fixed, moving] = folded_three_ways(FoldKind::Sum, &metrics);
        // 2^53 + 1 as a double is 2^53; plus 0.5 is 2^53 still.
        assert_eq!(fresh, Some(Metric::Float(9_007_199_254_740_992.0)));
        assert_eq!(fixed, fresh);
        // 2^53 + 1.5, rounded.
        assert_eq!(moving, Some(Metric::Float(9_007_199_254_740_994.0)));
    }

    /// A mean of integers is Riemann's `(/ sum count)` of the exact sum: an
    /// integer where the count divides it, else the ratio as a float.
    #[test]
    fn a_mean_of_integers_is_their_exact_sum_divided_as_riemann_divides() {
        use Metric::{Float, Int};
        let cases = [
            (vec![Int(1), Int(2)], Float(1.5)),
            (vec![Int(2), Int(4)], Int(3)),
            (vec![Int(BIG), Int(1)], Int(4_503_599_627_370_497)),
            (vec![Int(BIG), Int(2)], Float(4_503_599_627_370_497.5)),
            (vec![Int(i64::MAX), Int(i64::MAX)], Int(i64::MAX)),
            (vec![Int(1), Float(2.0)], Float(1.5)),
            (vec![Int(2), Float(4.0)], Float(3.0)),
        ];
        fold_alike_to(FoldKind::Mean, &cases);
    }

    /// Integers that one f64 stands for are apart, as Riemann's Longs are.
    #[test]
    fn extremes_of_integers_past_2_53_are_exact() {
        let metrics = [Metric::Int(BIG), Metric::Int(BIG - 1)];
        let least = Some(Metric::Int(BIG - 1));
        assert_eq!(folded_three_ways(FoldKind::Min, &metrics), [least; 3]);
        let greatest = Some(Metric::Int(BIG));
        assert_eq!(folded_three_ways(FoldKind::Max, &metrics), [greatest; 3]);
    }

    /// Fold's sum and mean add from the first metric, as Riemann's
    /// `reduce` does: both are -0.0.
    #[test]
    fn a_fixed_window_of_negative_zeros_folds_as_fold_does() {
        let events = [event(0, Some(Metric::Float(-0.0)))];
        let (mut folds, mut spread) = (FixedFolds::default(), FixedSpread::default());
        folds.add(&events[0], ALL_KEPT);
        spread.add(&events[0], true);
        for kind in KINDS {
            let (fresh, kept) = (fold(kind, events.iter()), folds.fold(kind, Some(&spread)));
            assert_eq!(format!("{fresh:?}"), format!("{kept:?}"), "{kind:?}");
        }
    }
}
