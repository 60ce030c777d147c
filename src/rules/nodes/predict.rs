//! `predict_linear(n, s)`, Riemann's `predict-linear`: a least-squares line
//! through the last `n` metrics against their events' own times, read `s`
//! after the latest event. It keeps each event's time and metric, not the
//! event: the event it emits is always the one that just came.

use std::collections::VecDeque;

use parking_lot::Mutex;

use crate::clock::Micros;
use crate::event::{Event, Metric};

use super::saved::{RestoreError, Restorer, Saved, Saver};
use super::{Children, Cx, Node, as_secs, metric_f64, same, take_over};

/// Up to this `n` a window's buffer is made its size at its first point, as
/// a moving event window's is: grown by doubling, most `by` groups would
/// hold a slack of slots for nothing.
const EXACT_BUFFER_UP_TO: usize = 256;

/// `predict_linear(n, s)`: on each event with a finite metric, once the
/// window holds two or more, the latest event with the metric the line
/// fitted to the window predicts `s` after it, always a float.
pub struct PredictLinear {
    /// At least 2, at most [`super::WINDOW_MAX`] (the compiler bounds it).
    pub count: usize,
    pub ahead: Micros,
    pub children: Children,
    /// (event time, metric), oldest first; every metric finite.
    pub points: Mutex<VecDeque<(Micros, f64)>>,
}

impl PredictLinear {
    pub fn new(count: usize, ahead: Micros, children: Children) -> Self {
        Self {
            count,
            ahead,
            children,
            points: Mutex::default(),
        }
    }
}

impl Node for PredictLinear {
    fn event(&self, event: &Event, cx: &mut Cx) {
        // An `expired` notice has no metric, and a NaN or infinite one
        // would spoil the next `n` predictions: neither is a point.
        let Some(y) = metric_f64(event).filter(|y| y.is_finite()) else {
            return;
        };
        let predicted = {
            let mut points = self.points.lock();
            if points.capacity() == 0 && self.count <= EXACT_BUFFER_UP_TO {
                points.reserve_exact(self.count + 1);
            }
            points.push_back((event.time, y));
            while points.len() > self.count {
                points.pop_front();
            }
            predict(&points, self.ahead)
        };
        let Some(predicted) = predicted else {
            return;
        };
        let mut event = event.clone();
        event.metric = Some(Metric::Float(predicted));
        self.children.event(&event, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(PredictLinear::new(
            self.count,
            self.ahead,
            self.children.fresh(),
        ))
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) =
            same::<PredictLinear>(old).filter(|o| o.count == self.count && o.ahead == self.ahead)
        {
            take_over(&self.points, &old.points);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let points = self.points.lock().iter().copied().collect();
        out.push(Saved::PredictLinear(points));
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("predict_linear")? {
            Saved::PredictLinear(mut points) => {
                // The file passed its checksum but may not be vigil's: keep
                // what this stage could have held, its last `n` finite points.
                points.retain(|(_, y)| y.is_finite());
                points.drain(..points.len().saturating_sub(self.count));
                *self.points.lock() = points.into();
            }
            other => return Err(RestoreError::mismatch("predict_linear", &other)),
        }
        self.children.restore(from)
    }
}

/// The metric the least-squares line through `points` gives `ahead` after
/// the last point's time; `None` with fewer than two points, where all
/// their times are equal (no slope: Riemann's divides by zero), or where
/// the prediction is not finite (metrics near the float range's end).
///
/// Times are taken relative to the first point before they become
/// seconds: epoch seconds (~1.7e9) squared keep about seven of their
/// digits in a double, too few for a slope over seconds. The line is then
/// read from the means (`ȳ + m · (x − x̄)`), which is Riemann's
/// `b + m · x` without the large intercept's rounding.
fn predict(points: &VecDeque<(Micros, f64)>, ahead: Micros) -> Option<f64> {
    let (&(first, _), &(last, _)) = (points.front()?, points.back()?);
    if points.len() < 2 {
        return None;
    }
    // i128: two times of a hostile event may be i64's whole range apart.
    let x = |t: Micros| (i128::from(t) - i128::from(first)) as f64 / 1e6;
    let n = points.len() as f64;
    let mean_x = points.iter().map(|&(t, _)| x(t)).sum::<f64>() / n;
    let mean_y = points.iter().map(|&(_, y)| y).sum::<f64>() / n;
    let (mut sxx, mut sxy) = (0.0, 0.0);
    for &(t, y) in points {
        let dx = x(t) - mean_x;
        sxx += dx * dx;
        sxy += dx * (y - mean_y);
    }
    // Equal times are all exactly 0 from the first: their slope is 0 / 0,
    // NaN, and so is the prediction, which is not emitted.
    let slope = sxy / sxx;
    let predicted = mean_y + slope * (x(last) - mean_x + as_secs(ahead));
    predicted.is_finite().then_some(predicted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::nodes::Scratch;
    use crate::rules::nodes::basic::Drop;

    /// A state file that passed its checksum may hold more points than the
    /// stage's `n`, and metrics no event gave it: the stage keeps its last
    /// `n` finite points, and its next prediction is theirs.
    #[test]
    fn a_restored_predict_linear_keeps_its_last_n_finite_points() {
        let stage = PredictLinear::new(3, 1_000_000, Children(vec![Box::new(Drop {})]));
        let mut points: Vec<(Micros, f64)> = (0..1000).map(|t| (t, 5.0)).collect();
        points.extend([
            (Micros::MIN, f64::NAN),
            (1_000_000, 1.0),
            (Micros::MAX, f64::INFINITY),
        ]);
        points.push((2_000_000, 3.0));
        stage
            .restore(&mut Restorer::from_entries(
                vec![Saved::PredictLinear(points)],
                0,
            ))
            .unwrap();
        let kept: Vec<_> = stage.points.lock().iter().copied().collect();
        assert_eq!(kept, [(999, 5.0), (1_000_000, 1.0), (2_000_000, 3.0)]);
        let event = Event {
            time: 3_000_000,
            metric: Some(Metric::Int(5)),
            ..Event::default()
        };
        stage.event(&event, &mut Scratch::default().cx(0));
        assert_eq!(
            predict(&stage.points.lock(), 1_000_000),
            Some(7.0),
            "y = 2t - 1 over the last three, 1 s after t = 3"
        );
    }

    /// Times i64's whole range apart neither overflow nor panic.
    #[test]
    fn times_at_the_ends_of_the_range_fit_without_overflow() {
        let points = VecDeque::from([(Micros::MIN, 0.0), (Micros::MAX, 1.0)]);
        let predicted = predict(&points, Micros::MAX).unwrap();
        // The line's middle reads 0.5 and it rises 1 over the span; the
        // latest is half a span past the middle, and as far again ahead.
        assert!((predicted - 1.5).abs() < 1e-9, "{predicted}");
    }
}
