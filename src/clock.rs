//! Time as a dependency: the index, the expiry task and (later) the stream nodes ask a
//! [`Clock`] for "now" instead of the OS, so tests drive them on a virtual clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch: the one time unit inside vigil.
pub type Micros = i64;

pub const MICROS_PER_SEC: i64 = 1_000_000;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Micros;
}

/// Shared handle to whichever clock a server runs on.
pub type SharedClock = Arc<dyn Clock>;

/// Wall-clock time from the OS.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Micros {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
    }
}

/// Microseconds since this clock was made, from the OS's monotonic clock:
/// for measuring durations (lease deadlines) that must not jump with the
/// wall clock. Not a time of day.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    start: std::time::Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self {
            start: std::time::Instant::now(),
        }
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Micros {
        i64::try_from(self.start.elapsed().as_micros()).unwrap_or(i64::MAX)
    }
}

/// A clock that only moves when told to; for tests and `vigil test`.
#[derive(Debug, Default)]
pub struct ManualClock {
    now: AtomicI64,
}

impl ManualClock {
    pub fn new(start: Micros) -> Self {
        Self {
            now: AtomicI64::new(start),
        }
    }

    pub fn set(&self, now: Micros) {
        self.now.store(now, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Micros) {
        self.now.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Micros {
        self.now.load(Ordering::SeqCst)
    }
}

/// Converts seconds (as Riemann's wire and rule files express them) to micros,
/// to the nearest micro, saturating instead of overflowing on absurd inputs.
pub fn secs_to_micros(secs: f64) -> Micros {
    // Rounded: many decimal fractions are a hair under their value as a
    // binary float (0.000249 s is 248.999… µs), and cutting toward zero
    // would take a whole micro off what was written.
    // `as` saturates on overflow and maps NaN to 0, which is what callers want.
    (secs * MICROS_PER_SEC as f64).round() as Micros
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(5);
        assert_eq!(clock.now(), 5);
        clock.advance(10);
        assert_eq!(clock.now(), 15);
        clock.set(1);
        assert_eq!(clock.now(), 1);
    }

    #[test]
    fn monotonic_clock_never_goes_back() {
        let clock = MonotonicClock::default();
        let first = clock.now();
        assert!(first >= 0);
        assert!(clock.now() >= first);
    }

    #[test]
    fn secs_to_micros_saturates() {
        assert_eq!(secs_to_micros(1.5), 1_500_000);
        // Each a hair under its value as a binary float.
        assert_eq!(secs_to_micros(0.000249), 249);
        assert_eq!(secs_to_micros(1.000001), 1_000_001);
        assert_eq!(secs_to_micros(1_700_000_000.000001), 1_700_000_000_000_001);
        assert_eq!(secs_to_micros(f64::INFINITY), i64::MAX);
        assert_eq!(secs_to_micros(f64::NAN), 0);
    }
}
