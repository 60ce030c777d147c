//! The folds that need more than a sum: `median`, Riemann's event at rank
//! ⌊n/2⌋ of the metrics sorted (the upper of two middles; of equal metrics
//! the earliest, as its stable sort leaves them), and `std_dev`, Riemann's
//! population standard deviation (√(Σ(x − mean)² / n)), a float.
//!
//! [`Middle`] keeps a moving window's median in O(log n) an event, where
//! selecting it anew would take a pass over the window on every event, as
//! folding a sum did (BENCHMARKS.md, "Moving windows fold in place"). [`Deviations`] keeps a standard deviation as Welford's running
//! mean and sum of squared deviations, which do not cancel as a sum of
//! squares does (values of 10^9 ± 1); a moving window takes values back out
//! of it, whose rounding it then rebuilds away once the window has turned
//! over. [`FixedSpread`] is a fixed window's: its deviations and, for a
//! median, its events with a metric, up to `WINDOW_MAX` (the oldest dropped
//! past it).
//!
//! Squares of metrics past ~1e154 pass f64's range: both kinds then work
//! in units of a power of two (exact: it only moves the exponent), so a
//! standard deviation of metrics near 1e200 is one, not infinity or NaN.

use std::cmp::Ordering;
use std::collections::{BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::event::{Event, Metric};

use super::numbers::{self, Sum};
use super::window::WINDOW_MAX;

/// The median of `events`' metrics, the event itself, as Riemann picks it.
pub fn median_of<'a>(events: impl Iterator<Item = &'a Event>) -> Option<&'a Event> {
    // The arrival place breaks ties: the earliest of equals, as a stable sort.
    let mut ranked: Vec<(Metric, usize, &Event)> = events
        .enumerate()
        .filter_map(|(at, e)| Some((e.metric?, at, e)))
        .collect();
    if ranked.is_empty() {
        return None;
    }
    let middle = ranked.len() / 2;
    let (_, (_, _, event), _) =
        ranked.select_nth_unstable_by(middle, |a, b| numbers::cmp(a.0, b.0).then(a.1.cmp(&b.1)));
    Some(event)
}

/// The population standard deviation of `metrics`, in two passes over them
/// as Riemann's `std-dev` goes. `None`: no metric.
pub fn std_dev_of(metrics: impl Iterator<Item = Metric> + Clone) -> Option<f64> {
    let count = metrics.clone().count() as f64;
    let mean = Sum::of(metrics.clone())?.as_f64() / count;
    let squares: f64 = metrics.clone().map(|m| (m.as_f64() - mean).powi(2)).sum();
    let std_dev = (squares / count).sqrt();
    let values = metrics.map(Metric::as_f64);
    if std_dev.is_finite() || !values.clone().all(f64::is_finite) {
        return Some(std_dev);
    }
    // The squares (or the sum) passed f64's range: again, in units of the
    // largest metric's power of two.
    let largest = values.clone().fold(0.0, |a: f64, x| a.max(x.abs()));
    let unit = power_of_two(-exponent(largest).min(MAX_EXPONENT - 1));
    let scaled = values.map(|x| x * unit);
    let mean = scaled.clone().sum::<f64>() / count;
    let squares: f64 = scaled.map(|x| (x - mean).powi(2)).sum();
    Some((squares / count).sqrt() / unit)
}

/// f64's largest binary exponent.
const MAX_EXPONENT: i32 = 1023;

/// The largest binary exponent of a metric [`Deviations`] takes as it is
/// (~2.9e135): the squares of deviations of up to twice that, however
/// many (2^64), stay within f64's range. Past it, it works in units of
/// 2^(exponent − this).
const UNSCALED_EXPONENT: i32 = 450;

/// The binary exponent of a finite, nonzero `x` (of a subnormal, the least).
fn exponent(x: f64) -> i32 {
    ((x.to_bits() >> 52) & 0x7ff) as i32 - MAX_EXPONENT
}

/// 2^`e`, for `e` in −1022 ..= 1023.
fn power_of_two(e: i32) -> f64 {
    f64::from_bits(((e + MAX_EXPONENT) as u64) << 52)
}

/// A metric ordered by [`numbers::cmp`], a total order.
#[derive(Debug, Clone, Copy)]
struct Ranked(Metric);

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> Ordering {
        numbers::cmp(self.0, other.0)
    }
}

/// A moving window's metrics with the numbers of their events, split at the
/// median: `low` holds the ⌊n/2⌋ least (of equals, the earliest), `high`
/// the rest, whose first is the median.
#[derive(Default)]
pub struct Middle {
    low: BTreeSet<(Ranked, u64)>,
    high: BTreeSet<(Ranked, u64)>,
}

impl Middle {
    pub fn insert(&mut self, number: u64, metric: Metric) {
        let key = (Ranked(metric), number);
        if self.high.first().is_some_and(|first| key < *first) {
            self.low.insert(key);
        } else {
            self.high.insert(key);
        }
        self.balance();
    }

    pub fn remove(&mut self, number: u64, metric: Metric) {
        let key = (Ranked(metric), number);
        if !self.high.remove(&key) {
            self.low.remove(&key);
        }
        self.balance();
    }

    /// The number of the median's event.
    pub fn median(&self) -> Option<u64> {
        self.high.first().map(|(_, number)| *number)
    }

    fn balance(&mut self) {
        let wanted = (self.low.len() + self.high.len()) / 2;
        while self.low.len() > wanted {
            let moved = self.low.pop_last().expect("low is longer than wanted");
            self.high.insert(moved);
        }
        while self.low.len() < wanted {
            let moved = self.high.pop_first().expect("high holds the rest");
            self.low.insert(moved);
        }
    }
}

/// Welford's running count, mean and sum of squared deviations of the
/// finite metrics (as floats); a NaN or infinite one makes the deviation
/// NaN, as Riemann's `(- x mean)` does, and is only counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Deviations {
    count: u64,
    mean: f64,
    /// In units of 4^`scale`: the squares of metrics past 2^450 would
    /// pass f64's range.
    squares: f64,
    non_finite: u64,
    /// Metrics are taken in units of 2^`scale`; 0 until one passes 2^450,
    /// so that the others' deviations are as exact as they were.
    scale: i32,
}

impl Deviations {
    pub fn add(&mut self, metric: Metric) {
        let x = metric.as_f64();
        // Saturating: restored counts may be anything the file held.
        if !x.is_finite() {
            self.non_finite = self.non_finite.saturating_add(1);
            return;
        }
        self.scale_for(x);
        self.count = self.count.saturating_add(1);
        let unit = self.unit();
        let (x, mean) = (x * unit, self.mean * unit);
        let delta = x - mean;
        let mean = mean + delta / self.count as f64;
        self.mean = mean / unit;
        self.squares += delta * (x - mean);
    }

    /// Takes back `metric`, one of those added.
    pub fn take_away(&mut self, metric: Metric) {
        let x = metric.as_f64();
        if !x.is_finite() {
            self.non_finite = self.non_finite.saturating_sub(1);
            return;
        }
        if self.count <= 1 {
            (self.count, self.mean, self.squares, self.scale) = (0, 0.0, 0.0, 0);
            return;
        }
        self.scale_for(x);
        self.count -= 1;
        let unit = self.unit();
        let (x, before) = (x * unit, self.mean * unit);
        let after = before - (x - before) / self.count as f64;
        self.mean = after / unit;
        // Rounding may leave a hair below zero where all that is left is equal.
        self.squares = (self.squares - (x - before) * (x - after)).max(0.0);
    }

    /// `None`: no metric.
    pub fn std_dev(&self) -> Option<f64> {
        if self.non_finite > 0 {
            return Some(f64::NAN);
        }
        (self.count > 0).then(|| (self.squares / self.count as f64).sqrt() / self.unit())
    }

    /// What a metric is multiplied by: 2^−scale.
    fn unit(&self) -> f64 {
        power_of_two(-self.scale)
    }

    /// Takes a larger unit if `x` passes the current one's range.
    fn scale_for(&mut self, x: f64) {
        let wanted = exponent(x.abs()) - UNSCALED_EXPONENT;
        if wanted <= self.scale {
            return;
        }
        // 4^−(wanted − scale), in two steps of at most 2^−574 each.
        let down = power_of_two(self.scale - wanted);
        self.squares = self.squares * down * down;
        self.scale = wanted;
    }

    /// Could this build have made them? A file may hold anything: a NaN
    /// mean or sum of squares, or a scale past f64's exponents, made every
    /// standard deviation NaN, or panicked.
    pub fn fits(&self) -> bool {
        self.mean.is_finite()
            && self.squares.is_finite()
            && self.squares >= 0.0
            && (0..=MAX_EXPONENT - UNSCALED_EXPONENT).contains(&self.scale)
    }
}

/// [`Deviations`] as version 5 of the state file saved them, before
/// they could be scaled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UnscaledDeviations {
    count: u64,
    mean: f64,
    squares: f64,
    non_finite: u64,
}

/// [`FixedSpread`] as version 5 of the state file saved it
/// ([`Saved::SpreadFixedWindow`](super::saved::Saved::SpreadFixedWindow)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnscaledSpread {
    deviations: UnscaledDeviations,
    held: VecDeque<Event>,
}

impl UnscaledSpread {
    /// The events it holds, which its median emits.
    pub fn held_mut(&mut self) -> impl Iterator<Item = &mut Event> {
        self.held.iter_mut()
    }
}

impl From<UnscaledSpread> for FixedSpread {
    fn from(saved: UnscaledSpread) -> FixedSpread {
        let UnscaledDeviations {
            count,
            mean,
            squares,
            non_finite,
        } = saved.deviations;
        let mut deviations = Deviations {
            count,
            mean,
            squares,
            non_finite,
            scale: 0,
        };
        if !deviations.fits() {
            deviations = unscaled_overflow(&saved.held, count.saturating_add(non_finite));
        }
        FixedSpread {
            deviations,
            held: saved.held,
        }
    }
}

/// Deviations in place of version 5's that passed f64's range (metrics
/// near 1e200 squared to infinity, or ±1e308 made the mean NaN), which
/// this build cannot make: built anew from `held` if it is all `metrics`
/// of the window (it folds `median`), else NaN, as version 5 had them,
/// until the window closes. Taken for a file vigil did not write, they
/// emptied the whole window, its count and other folds too.
fn unscaled_overflow(held: &VecDeque<Event>, metrics: u64) -> Deviations {
    let mut deviations = Deviations::default();
    if held.len() as u64 == metrics {
        held.iter()
            .filter_map(|e| e.metric)
            .for_each(|m| deviations.add(m));
    } else {
        deviations.non_finite = 1;
    }
    deviations
}

/// A fixed window's `median` and `std_dev` so far; saved with its other
/// folds ([`Saved::SpreadFixedWindow`](super::saved::Saved::SpreadFixedWindow)).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct FixedSpread {
    deviations: Deviations,
    /// For a median: the events with a metric, oldest first.
    held: VecDeque<Event>,
}

impl FixedSpread {
    /// Adds `event`; true if the oldest held event was dropped for it.
    pub fn add(&mut self, event: &Event, median: bool) -> bool {
        let Some(metric) = event.metric else {
            return false;
        };
        self.deviations.add(metric);
        if !median {
            return false;
        }
        let full = self.held.len() >= WINDOW_MAX;
        if full {
            self.held.pop_front();
        }
        self.held.push_back(event.clone());
        full
    }

    pub fn median(&self) -> Option<Event> {
        median_of(self.held.iter()).cloned()
    }

    /// The events it holds, which its median emits.
    pub fn held_mut(&mut self) -> impl Iterator<Item = &mut Event> {
        self.held.iter_mut()
    }

    pub fn std_dev(&self) -> Option<f64> {
        self.deviations.std_dev()
    }

    /// Could this build have made it? See [`Deviations::fits`].
    pub fn fits(&self) -> bool {
        self.deviations.fits() && self.held.len() <= WINDOW_MAX
    }

    /// Holds nothing: the window has no median or std_dev, or no events.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty() && self.deviations == Deviations::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::xorshift;

    /// A state file that passed its checksum may hold any count: at 2^64
    /// the next metric overflowed it (a panic where overflow is checked,
    /// as in the fuzzer's build).
    #[test]
    fn counts_restored_at_their_limit_take_the_next_metric() {
        let mut deviations = Deviations {
            count: u64::MAX,
            non_finite: u64::MAX,
            ..Deviations::default()
        };
        deviations.add(Metric::Float(1.0));
        deviations.add(Metric::Float(f64::NAN));
        assert_eq!(
            (deviations.count, deviations.non_finite),
            (u64::MAX, u64::MAX)
        );
    }

    /// Squares of metrics near 1e200 pass f64's range: the deviation was
    /// infinite (Welford's) or NaN (two passes); a tiny metric among huge
    /// ones, or metrics at f64's limit, too.
    #[test]
    fn metrics_near_1e200_have_a_finite_standard_deviation() {
        let cases: [(&[f64], f64); 4] = [
            (&[1e200, -1e200], 1e200),
            (&[1e200, 3e200, 1e200, 3e200], 1e200),
            (&[1e-300, 1e200, 5.0, -1e200], 1e200 / 2f64.sqrt()),
            (&[1.7e308, -1.7e308], 1.7e308),
        ];
        for (metrics, expected) in cases {
            let metrics = metrics.iter().map(|m| Metric::Float(*m));
            let mut deviations = Deviations::default();
            metrics.clone().for_each(|m| deviations.add(m));
            let both = [deviations.std_dev(), std_dev_of(metrics)];
            for got in both.map(Option::unwrap) {
                let close = (got - expected).abs() <= 1e-12 * expected;
                assert!(close, "{expected}: {both:?}");
            }
        }
    }

    fn event(n: usize, metric: Option<Metric>) -> Event {
        Event {
            service: Some(format!("e{n}")),
            metric,
            ..Event::default()
        }
    }

    /// Riemann's `(nth sorted (int (* n 0.5)))`: the upper middle, and of
    /// equal metrics the earliest.
    #[test]
    fn the_median_is_the_upper_middle_and_the_earliest_of_equals() {
        let cases: [(&[Option<f64>], Option<&str>); 5] = [
            (&[Some(3.0), Some(1.0), Some(2.0)], Some("e2")),
            (&[Some(4.0), Some(1.0), Some(3.0), Some(2.0)], Some("e2")),
            (&[Some(5.0), Some(1.0), Some(5.0), Some(5.0)], Some("e2")),
            (&[None, Some(7.0), None], Some("e1")),
            (&[None], None),
        ];
        for (metrics, median) in cases {
            let events: Vec<Event> = (0..)
                .zip(metrics)
                .map(|(n, m)| event(n, m.map(Metric::Float)))
                .collect();
            let got = median_of(events.iter()).and_then(|e| e.service.as_deref());
            assert_eq!(got, median, "{metrics:?}");
        }
    }

    /// Riemann's `std-dev` of 2, 4, 4, 4, 5, 5, 7, 9 is 2 (the population's).
    #[test]
    fn the_standard_deviation_is_the_populations() {
        let metrics = [2, 4, 4, 4, 5, 5, 7, 9].map(Metric::Int);
        assert_eq!(std_dev_of(metrics.into_iter()), Some(2.0));
        let mut deviations = Deviations::default();
        metrics.into_iter().for_each(|m| deviations.add(m));
        assert_eq!(deviations.std_dev(), Some(2.0));
        assert_eq!(std_dev_of(std::iter::empty()), None);
    }

    /// Values far from zero and close together: a sum of squares would
    /// cancel to nothing (or below zero); Welford's keeps the digits.
    #[test]
    fn large_close_values_do_not_cancel() {
        let mut deviations = Deviations::default();
        for m in [1e9 + 1.0, 1e9 - 1.0, 1e9 + 1.0, 1e9 - 1.0, 1e12] {
            deviations.add(Metric::Float(m));
        }
        deviations.take_away(Metric::Float(1e9 + 1.0));
        deviations.take_away(Metric::Float(1e9 - 1.0));
        let mut back = Deviations::default();
        for m in [1e9 + 1.0, 1e9 - 1.0, 1e12] {
            back.add(Metric::Float(m));
        }
        let (left, fresh) = (deviations.std_dev().unwrap(), back.std_dev().unwrap());
        assert!((left - fresh).abs() <= 1e-6 * fresh, "{left} {fresh}");
        let mut close = Deviations::default();
        for m in [1e9 + 1.0, 1e9 - 1.0] {
            close.add(Metric::Float(m));
        }
        assert_eq!(close.std_dev(), Some(1.0));
    }

    /// A running median through random arrivals and departures is the
    /// median picked anew.
    #[test]
    fn a_running_median_is_the_median_picked_anew() {
        let mut next = xorshift(23);
        let (mut events, mut middle) = (VecDeque::new(), Middle::default());
        let mut front = 0u64;
        for step in 0..5_000usize {
            if !next().is_multiple_of(3) || events.is_empty() {
                let metric = match next() % 7 {
                    0 => None,
                    r => Some(Metric::Int((r % 4) as i64)),
                };
                let e = event(step, metric);
                if let Some(m) = metric {
                    middle.insert(front + events.len() as u64, m);
                }
                events.push_back(e);
            } else {
                let e = events.pop_front().unwrap();
                if let Some(m) = e.metric {
                    middle.remove(front, m);
                }
                front += 1;
            }
            let kept = middle.median().map(|n| &events[(n - front) as usize]);
            assert_eq!(kept, median_of(events.iter()), "step {step}");
        }
    }
}
