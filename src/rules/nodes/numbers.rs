//! Metrics added and compared as Riemann's Clojure does them: integers
//! (Longs) exactly, as integers; a float with anything, as floats. A fold's
//! sum and extremes follow it, so that counters past 2^53 (nanosecond
//! totals, byte counts), which an f64 cannot hold, keep their last digits.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

use crate::event::Metric;

/// A sum of metrics, left to right as Riemann's `(reduce + metrics)`: exact
/// while every metric so far is an integer, a float from the first float
/// on. Where an integer sum passes i64's range Riemann's `+` throws (and
/// the event is lost); this one goes on exactly (an i128 holds the sum of
/// 2^64 metrics) and is a float only if it ends out of that range.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Sum {
    Int(i128),
    Float(f64),
}

impl Sum {
    /// `None`: no metric.
    pub fn of(metrics: impl IntoIterator<Item = Metric>) -> Option<Sum> {
        let mut metrics = metrics.into_iter();
        let first = Sum::from(metrics.next()?);
        Some(metrics.fold(first, Sum::add))
    }

    pub fn add(self, metric: Metric) -> Sum {
        match (self, metric) {
            // Past i128's range only in a state file vigil did not write.
            (Sum::Int(sum), Metric::Int(m)) => sum
                .checked_add(m.into())
                .map_or(Sum::Float(sum as f64 + m as f64), Sum::Int),
            (sum, m) => Sum::Float(sum.as_f64() + m.as_f64()),
        }
    }

    /// Rounded to the nearest f64, as Clojure turns a Long into a Double.
    pub fn as_f64(self) -> f64 {
        match self {
            Sum::Int(sum) => sum as f64,
            Sum::Float(sum) => sum,
        }
    }

    /// The mean of the `count` metrics summed, as Riemann's `(/ sum count)`:
    /// an integer where `count` divides a sum of integers (the mean of 2
    /// and 4 is 3, a Long), else a float.
    pub fn mean(self, count: u64) -> Metric {
        match self {
            Sum::Int(sum) if count > 0 && sum % i128::from(count) == 0 => {
                Sum::Int(sum / i128::from(count)).metric()
            }
            sum => Metric::Float(sum.as_f64() / count as f64),
        }
    }

    /// An integer metric if it is one within i64's range, else a float.
    pub fn metric(self) -> Metric {
        match self {
            Sum::Int(sum) => i64::try_from(sum).map_or(Metric::Float(sum as f64), Metric::Int),
            Sum::Float(sum) => Metric::Float(sum),
        }
    }
}

impl From<Metric> for Sum {
    fn from(metric: Metric) -> Sum {
        match metric {
            Metric::Int(m) => Sum::Int(m.into()),
            Metric::Float(m) => Sum::Float(m),
        }
    }
}

/// The order of metrics by their exact values: integers as integers (two
/// past 2^53 that round to one f64 are apart, as Riemann's Longs are), floats
/// by `total_cmp`, an integer and a float exactly. Riemann compares the last
/// as doubles, which only tells apart an integer past 2^53 and the float it
/// rounds to; exact, the order stays one for a moving window's queues.
pub fn cmp(a: Metric, b: Metric) -> Ordering {
    match (a, b) {
        (Metric::Int(a), Metric::Int(b)) => a.cmp(&b),
        (Metric::Float(a), Metric::Float(b)) => a.total_cmp(&b),
        (Metric::Int(a), Metric::Float(b)) => cmp_int_float(a, b),
        (Metric::Float(a), Metric::Int(b)) => cmp_int_float(b, a).reverse(),
    }
}

fn cmp_int_float(int: i64, float: f64) -> Ordering {
    // Where `int` rounds to `float`, that is an integer within i128's range.
    let rounded = int as f64;
    rounded
        .total_cmp(&float)
        .then_with(|| i128::from(int).cmp(&(float as i128)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_integer_and_the_float_it_rounds_to_are_apart() {
        const BIG: i64 = (1 << 53) + 1;
        let rounded = Metric::Float(BIG as f64);
        assert_eq!(cmp(Metric::Int(BIG), rounded), Ordering::Greater);
        assert_eq!(cmp(rounded, Metric::Int(BIG)), Ordering::Less);
        assert_eq!(cmp(Metric::Int(BIG - 1), rounded), Ordering::Equal);
        assert_eq!(
            cmp(Metric::Int(i64::MAX), Metric::Float(2f64.powi(63))),
            Ordering::Less
        );
        assert_eq!(cmp(Metric::Int(0), Metric::Float(-0.0)), Ordering::Greater);
        assert_eq!(
            cmp(Metric::Int(i64::MIN), Metric::Float(f64::NAN)),
            Ordering::Less
        );
        assert_eq!(cmp(Metric::Int(3), Metric::Float(2.5)), Ordering::Greater);
    }
}
