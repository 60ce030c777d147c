//! `predict_linear(n, s)`, Riemann's `predict-linear`: a least-squares line
//! through the last `n` metrics against their events' own times, read `s`
//! after the time of the event that just came, as Riemann's reads it after
//! `(last events)`: a late event, older than others in the window, is read
//! at its own time, which the event emitted carries. It keeps each event's
//! time and metric, not the event: the event it emits is always the one
//! that just came.
//!
//! [`Fit`] keeps the line's means and co-moments as points enter and leave
//! (Welford's, which do not cancel as sums of squares do), so an event costs
//! O(1), where refitting 100 000 points took 2.5 to 6 ms; it refits the window
//! whole once it has turned over, so what rounding leaving left is gone.

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

/// Metrics past 2^960 (~1e289) stay out of the running fit: their
/// deviations times the times' (up to ~2^44 s) over up to ~2^17 points
/// could pass f64's range. A window holding one is fitted whole on every
/// event, as [`fit`] does.
const RUNNING_UP_TO: f64 = f64::from_bits((1023 + 960) << 52);

/// Whether the running fit must leave out `y` ([`RUNNING_UP_TO`]).
fn too_huge_to_run(y: f64) -> bool {
    y.abs() > RUNNING_UP_TO
}

/// Where the running Σ(x − x̄)² has fallen this far below its peak since
/// the last refit, rounding as points left may be much of what is left
/// (times now all equal read a slope of it): the window is refitted. Each
/// such fall needs the points that made the peak gone, so it is rare.
const COLLAPSED: f64 = 1.0 / (1u64 << 20) as f64;

/// `predict_linear(n, s)`: on each event with a finite metric, once the
/// window holds two or more, the latest event with the metric the line
/// fitted to the window predicts `s` after it, always a float.
pub struct PredictLinear {
    /// At least 2, at most [`super::WINDOW_MAX`] (the compiler bounds it).
    pub count: usize,
    pub ahead: Micros,
    pub children: Children,
    pub fit: Mutex<Fit>,
}

/// The window's points and the line through them, kept as they come.
#[derive(Default)]
pub struct Fit {
    /// (event time, metric), oldest first; every metric finite.
    pub points: VecDeque<(Micros, f64)>,
    /// Times count from here, in seconds: the first point's at the last
    /// refit (epoch seconds squared keep too few digits for a slope).
    origin: Micros,
    mean_x: f64,
    mean_y: f64,
    /// Σ(x − x̄)² and Σ(x − x̄)(y − ȳ).
    sxx: f64,
    sxy: f64,
    /// The largest `sxx` since the last refit.
    peak_sxx: f64,
    /// Points whose metric passes [`RUNNING_UP_TO`]: while any is held the
    /// running values mean nothing.
    huge: usize,
    /// Points that entered since the last refit; a refit is due at `n`.
    since_refit: usize,
}

impl Fit {
    /// Takes `(time, y)` in, the oldest out past `count`, and refits where
    /// the window has turned over or the running values are not to be
    /// trusted.
    fn push(&mut self, time: Micros, y: f64, count: usize) {
        if self.points.capacity() == 0 && count <= EXACT_BUFFER_UP_TO {
            self.points.reserve_exact(count + 1);
        }
        if self.points.is_empty() {
            self.origin = time;
        }
        self.points.push_back((time, y));
        self.since_refit = self.since_refit.saturating_add(1);
        if too_huge_to_run(y) {
            self.huge += 1;
        }
        self.enter(self.x(time), y);
        while self.points.len() > count {
            let Some((t, y)) = self.points.pop_front() else {
                break;
            };
            if too_huge_to_run(y) {
                self.huge -= 1;
            }
            self.leave(self.x(t), y);
        }
        let collapsed = self.sxx < self.peak_sxx * COLLAPSED;
        if self.huge == 0 && (self.since_refit >= count || collapsed) {
            self.refit();
        }
    }

    fn x(&self, t: Micros) -> f64 {
        secs_from(self.origin, t)
    }

    fn enter(&mut self, x: f64, y: f64) {
        let n = self.points.len() as f64;
        let dx = x - self.mean_x;
        self.mean_x += dx / n;
        self.mean_y += (y - self.mean_y) / n;
        self.sxx += dx * (x - self.mean_x);
        self.sxy += dx * (y - self.mean_y);
        self.peak_sxx = self.peak_sxx.max(self.sxx);
    }

    fn leave(&mut self, x: f64, y: f64) {
        let n = self.points.len() as f64;
        let dx = x - self.mean_x;
        self.mean_x -= dx / n;
        self.mean_y -= (y - self.mean_y) / n;
        // Rounding may leave a hair below zero where the times left are equal.
        self.sxx = (self.sxx - dx * (x - self.mean_x)).max(0.0);
        self.sxy -= dx * (y - self.mean_y);
    }

    /// The running values anew from the points, from the first one's time.
    fn refit(&mut self) {
        self.origin = self.points.front().map_or(0, |&(t, _)| t);
        let (mean_x, mean_y, sxx, sxy) = moments(&self.points, self.origin, 1.0);
        (self.mean_x, self.mean_y, self.sxx, self.sxy) = (mean_x, mean_y, sxx, sxy);
        self.peak_sxx = sxx;
        // A huge metric's moments may be no number: due again once it left.
        self.since_refit = if self.huge > 0 { usize::MAX } else { 0 };
    }

    /// The metric the line gives `ahead` after the time of the point that
    /// came last (not the latest time: a late point's own);
    /// `None` with fewer than two points, where all their times are equal
    /// (no slope: Riemann's divides by zero, 0 / 0 here), or where the
    /// prediction is not finite. It is read from the means
    /// (`ȳ + m · (x − x̄)`), Riemann's `b + m · x` without the large
    /// intercept's rounding.
    fn predict(&self, ahead: Micros) -> Option<f64> {
        let &(last, _) = self.points.back()?;
        if self.points.len() < 2 {
            return None;
        }
        if self.huge > 0 {
            return fit(&self.points, ahead);
        }
        let slope = self.sxy / self.sxx;
        let predicted = self.mean_y + slope * (self.x(last) - self.mean_x + as_secs(ahead));
        predicted.is_finite().then_some(predicted)
    }
}

impl PredictLinear {
    pub fn new(count: usize, ahead: Micros, children: Children) -> Self {
        Self {
            count,
            ahead,
            children,
            fit: Mutex::default(),
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
            let mut fit = self.fit.lock();
            fit.push(event.time, y, self.count);
            fit.predict(self.ahead)
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
            take_over(&self.fit, &old.fit);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let points = self.fit.lock().points.iter().copied().collect();
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
                let mut fit = Fit {
                    points: points.into(),
                    ..Fit::default()
                };
                fit.huge = fit
                    .points
                    .iter()
                    .filter(|(_, y)| too_huge_to_run(*y))
                    .count();
                fit.refit();
                *self.fit.lock() = fit;
            }
            other => return Err(RestoreError::mismatch("predict_linear", &other)),
        }
        self.children.restore(from)
    }
}

/// Seconds from `origin` to `t`; i128: two times of a hostile event may be
/// i64's whole range apart.
fn secs_from(origin: Micros, t: Micros) -> f64 {
    (i128::from(t) - i128::from(origin)) as f64 / 1e6
}

/// The means of `points`' times (in seconds from `origin`) and metrics (in
/// units of `unit`), and their Σ(x − x̄)² and Σ(x − x̄)(y − ȳ), in two passes.
fn moments(points: &VecDeque<(Micros, f64)>, origin: Micros, unit: f64) -> (f64, f64, f64, f64) {
    let x = |t: Micros| secs_from(origin, t);
    let n = points.len().max(1) as f64;
    let mean_x = points.iter().map(|&(t, _)| x(t)).sum::<f64>() / n;
    let mean_y = points.iter().map(|&(_, y)| y / unit).sum::<f64>() / n;
    let (mut sxx, mut sxy) = (0.0, 0.0);
    for &(t, y) in points {
        let dx = x(t) - mean_x;
        sxx += dx * dx;
        sxy += dx * (y / unit - mean_y);
    }
    (mean_x, mean_y, sxx, sxy)
}

/// [`Fit::predict`] of a window holding a metric past [`RUNNING_UP_TO`],
/// fitted whole from the first point's time, in units of 2^64: a power of
/// two changes no digit, and the sums of metrics up to the float range's
/// end stay in it, so a line through 1.7e308 and 1.7e308 reads 1.7e308.
fn fit(points: &VecDeque<(Micros, f64)>, ahead: Micros) -> Option<f64> {
    let (&(first, _), &(last, _)) = (points.front()?, points.back()?);
    if points.len() < 2 {
        return None;
    }
    let unit = (1u128 << 64) as f64;
    let (mean_x, mean_y, sxx, sxy) = moments(points, first, unit);
    let x_last = secs_from(first, last);
    let predicted = (mean_y + sxy / sxx * (x_last - mean_x + as_secs(ahead))) * unit;
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
        let kept: Vec<_> = stage.fit.lock().points.iter().copied().collect();
        assert_eq!(kept, [(999, 5.0), (1_000_000, 1.0), (2_000_000, 3.0)]);
        let event = Event {
            time: 3_000_000,
            metric: Some(Metric::Int(5)),
            ..Event::default()
        };
        stage.event(&event, &mut Scratch::default().cx(0));
        assert_eq!(
            stage.fit.lock().predict(1_000_000),
            Some(7.0),
            "y = 2t - 1 over the last three, 1 s after t = 3"
        );
    }

    /// Times i64's whole range apart neither overflow nor panic.
    #[test]
    fn times_at_the_ends_of_the_range_fit_without_overflow() {
        let mut points = Fit::default();
        points.push(Micros::MIN, 0.0, 2);
        points.push(Micros::MAX, 1.0, 2);
        let predicted = points.predict(Micros::MAX).unwrap();
        // The line's middle reads 0.5 and it rises 1 over the span; the
        // latest is half a span past the middle, and as far again ahead.
        assert!((predicted - 1.5).abs() < 1e-9, "{predicted}");
    }

    const EPOCH: Micros = 1_700_000_000_000_000;

    /// A window that turned over many times, of points on the line
    /// y = 10^9 + 3t at epoch times 1 s apart: the running fit, points
    /// leaving it every event, reads the line 60 s on as a whole refit
    /// would, to within 2^-20 of 10^9 (a few units of the last place).
    #[test]
    fn a_running_fit_reads_the_line_after_many_turnovers() {
        let mut window = Fit::default();
        for k in 0..5_000_i64 {
            window.push(EPOCH + k * 1_000_000, 1e9 + 3.0 * k as f64, 1_000);
            let Some(predicted) = window.predict(60_000_000) else {
                assert_eq!(k, 0, "every window of two or more times reads a line");
                continue;
            };
            let exact = 1e9 + 3.0 * (k + 60) as f64;
            assert!(
                (predicted - exact).abs() < 1e-6,
                "{k}: {predicted} for {exact}"
            );
        }
    }

    /// Once points of other times have left, a window of equal times has
    /// no slope: nothing, not the slope of what rounding their leaving left
    /// behind (-1.9666666666666666 here, refitted only at the turnover).
    #[test]
    fn equal_times_left_behind_by_others_read_no_line() {
        let mut window = Fit::default();
        for (t, y) in [(95_243, 0.8), (638_173, 0.4), (638_173, 0.3)] {
            window.push(EPOCH + t, y, 3);
        }
        assert!(window.predict(1_000_000).is_some());
        window.push(EPOCH + 638_173, 0.9, 3);
        assert_eq!(window.predict(1_000_000), None, "{:?}", window.points);
    }

    /// Metrics near the float range's end are fitted in units of a power of
    /// two: where the line stays in the range it is read (Fraction-exact
    /// values), and once they left, the running fit is a fit of what is left.
    #[test]
    fn metrics_near_the_float_range_end_fit_and_leave_no_trace() {
        let mut window = Fit::default();
        for (k, y) in [(0, 1.7e308), (1, 1.6e308), (2, 1.5e308)] {
            window.push(EPOCH + k * 1_000_000, y, 3);
        }
        assert_eq!(window.predict(1_000_000), Some(1.4e308));
        window.push(EPOCH + 3_000_000, 1.7e308, 3);
        window.push(EPOCH + 4_000_000, -1.7e308, 3);
        let predicted = window.predict(0).unwrap();
        assert!((predicted / -1.1e308 - 1.0).abs() < 1e-15, "{predicted}");
        for (k, y) in [(5, 3.0), (6, 5.0), (7, 7.0)] {
            window.push(EPOCH + k * 1_000_000, y, 3);
        }
        assert_eq!(window.predict(1_000_000), Some(9.0));
    }

    /// A restored window holding a metric past the running fit's range is
    /// refitted as soon as that one left, not once the window turned over:
    /// what its leaving left in the running means is no fit.
    #[test]
    fn a_restored_huge_metric_leaves_no_trace_in_the_running_fit() {
        let stage = PredictLinear::new(3, 1_000_000, Children(vec![Box::new(Drop {})]));
        let points = vec![(0, 1e300), (1_000_000, 1.0), (2_000_000, 2.0)];
        let mut from = Restorer::from_entries(vec![Saved::PredictLinear(points)], 0);
        stage.restore(&mut from).unwrap();
        let mut fit = stage.fit.lock();
        fit.push(3_000_000, 3.0, 3);
        assert_eq!(fit.predict(1_000_000), Some(4.0), "{:?}", fit.points);
    }
}
