//! What the subscription queries cost the publisher together: sampled, summed
//! over a window, and when the sum is over a share of a core, which clients
//! go (the dearest first).
//!
//! The cost is the publishing thread's CPU time ([`cpu_time`]), not the wall
//! clock: a thread descheduled mid-evaluation on a busy machine would
//! otherwise charge a cheap query milliseconds it never took. Reading that
//! clock is a system call (some 0.3 µs), more than a cheap query's whole
//! evaluation, so each audience's turn is timed on the wall clock (some
//! 20 ns a read), and the CPU clock is read only every [`SEGMENT`] of them
//! to take the time the thread was away off the turn it fell in ([`Timer`]).
//! Only some publishes are timed ([`Sampler`]), each standing for the
//! publishes since the one timed before it: a publish whose queries took
//! long is followed soon by the next timed one, a cheap one only after up to
//! [`MAX_EVERY`] publishes, so timing costs the publisher well under a
//! percent of what it times.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// What all subscription queries together may cost the publisher in a
/// [`WINDOW`]: a quarter of a core. Ingest keeps at least three quarters of a
/// core on a one- or two-core machine, and the normal case is far below it: a
/// query of a few comparisons costs some 50 ns an event, so a dozen
/// dashboards take it at 400 000 events a second.
pub const SHARE: Duration = Duration::from_millis(250);

/// How long costs are summed before they are weighed against [`SHARE`]: a
/// second, so a query that starves ingest goes within about that.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Publishes one timed publish may stand for at most.
pub const MAX_EVERY: u64 = 1024;

/// The evaluation time that passes, as estimated, between two timed
/// publishes: a publish whose queries took this long or more is followed by
/// a timed one at once.
const TIMED_EVERY: Duration = Duration::from_micros(500);

/// The evaluation time between two timed publishes per audience timed: a
/// timed publish reads the clock once per audience, so with hundreds of
/// audiences it is timed less often, the clock kept to a small part of what
/// it times.
const TIMED_EVERY_LAP: Duration = Duration::from_micros(50);

/// The wall-clock time after which a timed publish reads the CPU clock
/// again, at the end of the audience's turn then: the time away from the
/// core since the last read fell in one turn of that stretch (a time away
/// is far longer than this, so it ends the stretch), which is the longest
/// of them. Reading it costs some 0.3 µs: once in this long keeps it to
/// about 1 % of a timed publish.
const SEGMENT: Duration = Duration::from_micros(20);

/// The calling thread's CPU time: what it ran, not how long it waited to.
#[cfg(target_os = "linux")]
pub fn cpu_time() -> Duration {
    use rustix::time::{ClockId, clock_gettime};
    let now = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// The wall clock, where no thread's CPU time is at hand.
#[cfg(not(target_os = "linux"))]
pub fn cpu_time() -> Duration {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}

/// What timing one turn takes, the wall clock's read and the timer's own
/// work, as [`Timer::lap`] runs it: the least of a few rounds of turns
/// timed back to back, measured once (a round alone may be slowed by a cold
/// cache or an interrupt). Untimed publishes do not pay it: charged, it
/// would be most of what a cheap query is (a few comparisons take some
/// 50 ns), and twenty such audiences were charged 1.5 times what they took.
fn lap_cost() -> Duration {
    static LAP: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *LAP.get_or_init(|| {
        let idle = AtomicU64::new(0);
        (0..8)
            .map(|_| {
                let mut timer = Timer::taking_off(0, Duration::ZERO);
                let began = Instant::now();
                for _ in 0..16 {
                    timer.lap(&idle);
                }
                began.elapsed() / 16
            })
            .min()
            .unwrap_or_default()
    })
}

/// Which publishes are timed: the first, then one after as many as the last
/// timed one's cost says (see [`MAX_EVERY`], [`TIMED_EVERY`]). One publish
/// is timed at a time, by whichever thread claims it.
#[derive(Debug, Default)]
pub struct Sampler {
    /// Publishes so far.
    published: AtomicU64,
    /// The count at which the next publish is timed; `u64::MAX` while one is.
    next: AtomicU64,
    /// The count at the last timed publish.
    last: AtomicU64,
}

impl Sampler {
    /// Counts a publish; whether it is timed, and then how many publishes
    /// (itself included) its cost stands for.
    #[inline]
    pub fn due(&self) -> Option<u64> {
        let n = self.published.fetch_add(1, Ordering::Relaxed);
        let next = self.next.load(Ordering::Relaxed);
        if n < next {
            return None;
        }
        self.claim(next, n)
    }

    #[cold]
    fn claim(&self, next: u64, n: u64) -> Option<u64> {
        (self.next)
            .compare_exchange(next, u64::MAX, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        Some(n + 1 - self.last.swap(n + 1, Ordering::Relaxed))
    }

    /// The timed publish's `laps` audiences cost `cost`: the next timed
    /// publish is the one after `TIMED_EVERY / cost` more (1 to
    /// [`MAX_EVERY`]), or `laps * TIMED_EVERY_LAP / cost` when that is more.
    pub fn timed(&self, cost: Duration, laps: u32) {
        let span = TIMED_EVERY.max(TIMED_EVERY_LAP * laps);
        let every = span.as_nanos() / cost.as_nanos().max(1);
        let every = (every as u64).clamp(1, MAX_EVERY);
        let last = self.last.load(Ordering::Relaxed);
        self.next.store(last + every - 1, Ordering::Relaxed);
    }
}

/// Times the audiences of one publish, in turn: what passes on the wall
/// clock between one lap and the next, less what timing it takes, is charged to
/// the audience of the first, weighed by the publishes it stands for. Each
/// [`SEGMENT`] of laps is checked against the CPU clock: the time the
/// thread was away from its core meanwhile is taken off the longest turn
/// (the one it fell in), not charged to a cheap bystander's query nor to a
/// dear one's.
pub struct Timer<'a> {
    weight: u64,
    /// What timing a turn takes ([`lap_cost`]), taken off each.
    lap_cost: Duration,
    /// Whose turn it is, since when.
    current: Option<&'a AtomicU64>,
    at: Instant,
    /// The turns of the segment so far, and when it began on both clocks.
    laps: Vec<(&'a AtomicU64, Duration)>,
    segment: (Instant, Duration),
    /// The CPU time of the segments settled.
    cost: Duration,
}

impl<'a> Timer<'a> {
    /// A timer for a publish standing for `weight` publishes.
    pub fn start(weight: u64) -> Timer<'a> {
        Timer::taking_off(weight, lap_cost())
    }

    fn taking_off(weight: u64, lap_cost: Duration) -> Timer<'a> {
        let cpu = cpu_time();
        let now = Instant::now();
        Timer {
            weight,
            lap_cost,
            current: None,
            at: now,
            laps: Vec::new(),
            segment: (now, cpu),
            cost: Duration::ZERO,
        }
    }

    /// The turn of the audience whose cost is `spent`.
    pub fn lap(&mut self, spent: &'a AtomicU64) {
        let mut now = Instant::now();
        self.end_turn(now);
        if now.saturating_duration_since(self.segment.0) >= SEGMENT {
            now = self.settle(now);
        }
        self.current = Some(spent);
        self.at = now;
    }

    /// The publish's CPU time, every turn charged.
    pub fn stop(mut self) -> Duration {
        let now = Instant::now();
        self.end_turn(now);
        self.settle(now);
        self.cost
    }

    fn end_turn(&mut self, now: Instant) {
        if let Some(spent) = self.current.take() {
            let took = now.saturating_duration_since(self.at);
            self.laps.push((spent, took.saturating_sub(self.lap_cost)));
        }
    }

    /// Charges the segment's turns, which ended at `now`; the time the next
    /// one begins (after the CPU clock's read, which no turn took).
    fn settle(&mut self, now: Instant) -> Instant {
        let cpu = cpu_time();
        let (began, cpu_began) = self.segment;
        let away = now
            .saturating_duration_since(began)
            .saturating_sub(cpu.saturating_sub(cpu_began));
        off_the_longest(&mut self.laps, away);
        for (spent, took) in self.laps.drain(..) {
            let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
            spent.fetch_add(nanos.saturating_mul(self.weight), Ordering::Relaxed);
        }
        self.cost += cpu.saturating_sub(cpu_began);
        let next = Instant::now();
        self.segment = (next, cpu);
        next
    }
}

/// Takes `away` (the time the thread was off its core during these turns)
/// off the longest turn, the one it fell in.
fn off_the_longest<T>(laps: &mut [(T, Duration)], away: Duration) {
    if let Some((_, longest)) = laps.iter_mut().max_by_key(|(_, took)| *took) {
        *longest = longest.saturating_sub(away);
    }
}

/// The window queries' costs are summed over, and what they may be.
#[derive(Debug)]
pub struct Ledger {
    started: Mutex<Instant>,
    window: Duration,
    share: Duration,
}

impl Ledger {
    /// Costs summed over `window` may be `share` together.
    pub fn new(share: Duration, window: Duration) -> Ledger {
        Ledger {
            started: Mutex::new(Instant::now()),
            window: window.max(Duration::from_nanos(1)),
            share,
        }
    }

    /// What the queries may take of each window together.
    pub fn share(&self) -> Duration {
        self.share
    }

    /// The share of a core the queries may take, in percent.
    pub fn percent(&self) -> u64 {
        percent(self.share, self.window)
    }

    /// How long the window lasted, when it is over at `now`, for one caller:
    /// a new one starts. Another thread closing it meanwhile is not waited
    /// for. A window lasts longer than [`Ledger::new`]'s while nothing is
    /// timed (a quiet ingest).
    pub fn close(&self, now: Instant) -> Option<Duration> {
        let mut started = self.started.try_lock()?;
        let lasted = now.saturating_duration_since(*started);
        if lasted < self.window {
            return None;
        }
        *started = now;
        Some(lasted)
    }

    /// Of clients whose queries cost `spent` each over a window that
    /// `lasted`, which to cut, dearest first, for the others to be within
    /// the share together; none when they all are.
    pub fn over_share(&self, spent: &[Duration], lasted: Duration) -> Vec<usize> {
        let windows = lasted.div_duration_f64(self.window).max(1.0);
        let allowed = Duration::try_from_secs_f64(self.share.as_secs_f64() * windows)
            .unwrap_or(Duration::MAX);
        let mut total: Duration = spent.iter().sum();
        let mut dearest: Vec<usize> = (0..spent.len()).collect();
        dearest.sort_unstable_by_key(|&i| std::cmp::Reverse(spent[i]));
        let mut cut = Vec::new();
        for i in dearest {
            if total <= allowed || spent[i].is_zero() {
                break;
            }
            total -= spent[i];
            cut.push(i);
        }
        cut
    }
}

/// `spent` over `lasted`, in percent of a core.
pub fn percent(spent: Duration, lasted: Duration) -> u64 {
    (spent.div_duration_f64(lasted.max(Duration::from_nanos(1))) * 100.0).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_dearest_clients_go_until_the_rest_are_within_the_share() {
        let ledger = Ledger::new(250 * MS, WINDOW);
        // 20 clients of 100 ms each (2 s of a 1 s window): enough of them go
        // to leave 250 ms, the dearest first.
        let mut spent = vec![100 * MS; 20];
        spent[7] = 120 * MS;
        spent.push(10 * MS);
        let cut = ledger.over_share(&spent, WINDOW);
        assert_eq!(cut.len(), 18);
        assert_eq!(cut[0], 7, "the dearest first");
        assert!(!cut.contains(&20), "the cheapest stays");
        let kept: Duration = (0..spent.len())
            .filter(|i| !cut.contains(i))
            .map(|i| spent[i])
            .sum();
        assert_eq!(kept, 210 * MS);
        // Within the share together: nobody goes, however dear one is.
        assert!(ledger.over_share(&[249 * MS, MS], WINDOW).is_empty());
        // One that cost nothing in the window never goes.
        let idle = [Duration::ZERO, 300 * MS];
        assert_eq!(ledger.over_share(&idle, WINDOW), [1]);
        // Over a window twice as long (nothing timed meanwhile), twice the
        // share: 400 ms in 2 s is within it.
        let long = [300 * MS, 100 * MS];
        assert!(ledger.over_share(&long, 2 * WINDOW).is_empty());
        assert_eq!(ledger.over_share(&long, WINDOW), [0]);
        assert_eq!(percent(300 * MS, 2 * WINDOW), 15);
        assert_eq!(ledger.percent(), 25);
    }

    #[test]
    fn a_window_closes_once_for_one_caller() {
        let ledger = Ledger::new(SHARE, WINDOW);
        let start = *ledger.started.lock();
        assert_eq!(ledger.close(start + WINDOW / 2), None);
        assert_eq!(ledger.close(start + WINDOW), Some(WINDOW));
        assert_eq!(ledger.close(start + WINDOW), None, "closed already");
        assert_eq!(ledger.close(start + WINDOW * 3 / 2), None);
        assert_eq!(ledger.close(start + WINDOW * 4), Some(WINDOW * 3));
        let busy = ledger.started.lock();
        let later = start + WINDOW * 9;
        assert_eq!(ledger.close(later), None, "another is closing it");
        drop(busy);
    }

    #[test]
    fn a_dear_publish_is_followed_by_a_timed_one_a_cheap_one_later() {
        let sampler = Sampler::default();
        assert_eq!(sampler.due(), Some(1), "the first is timed");
        assert_eq!(sampler.due(), None, "one at a time");
        // The one not timed meanwhile counts with the next.
        sampler.timed(Duration::from_millis(2), 1);
        assert_eq!(sampler.due(), Some(2));
        sampler.timed(Duration::from_micros(50), 1);
        for _ in 0..9 {
            assert_eq!(sampler.due(), None);
        }
        assert_eq!(sampler.due(), Some(10));
        // Of 100 audiences, timed after 5 ms of evaluation, not 0.5 ms.
        sampler.timed(Duration::from_micros(50), 100);
        for _ in 0..99 {
            assert_eq!(sampler.due(), None);
        }
        assert_eq!(sampler.due(), Some(100));
        // A cheap one: timed again after MAX_EVERY, which it stands for.
        for cost in [Duration::from_nanos(30), Duration::ZERO] {
            sampler.timed(cost, 1);
            let skipped = std::iter::repeat_with(|| sampler.due())
                .take_while(Option::is_none)
                .count();
            assert_eq!(skipped as u64, MAX_EVERY - 1);
        }
    }

    #[test]
    fn a_timer_charges_each_turn_weighed() {
        let (first, second) = (AtomicU64::new(0), AtomicU64::new(0));
        let mut timer = Timer::start(1000);
        timer.lap(&first);
        work();
        timer.lap(&second);
        let cost = timer.stop();
        let (first, second) = (first.into_inner(), second.into_inner());
        assert!(first > 0, "worked");
        assert!(first + second <= cost.as_nanos() as u64 * 1000);
        assert!(first >= cost.as_nanos() as u64 * 1000 / 2, "most of it");
    }

    #[test]
    fn time_off_the_core_is_charged_to_no_turn() {
        let (asleep, cheap, after) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
        let mut timer = Timer::start(1);
        timer.lap(&cheap);
        timer.lap(&asleep);
        // Off the core as a thread descheduled mid-evaluation is.
        std::thread::sleep(Duration::from_millis(20));
        timer.lap(&after);
        let cost = timer.stop();
        let charged = |turn: &AtomicU64| Duration::from_nanos(turn.load(Ordering::Relaxed));
        assert!(cost < Duration::from_millis(10), "{cost:?}");
        for turn in [&asleep, &cheap, &after] {
            assert!(
                charged(turn) < Duration::from_millis(10),
                "{:?}",
                charged(turn)
            );
        }
    }

    #[test]
    fn the_time_away_comes_off_the_turn_it_fell_in() {
        let us = Duration::from_micros;
        let mut laps = [("cheap", us(1)), ("away", us(4_003)), ("next", us(2))];
        off_the_longest(&mut laps, us(4_000));
        assert_eq!(laps, [("cheap", us(1)), ("away", us(3)), ("next", us(2))]);
        // More than any turn took (the clocks' reads): none below nothing.
        off_the_longest(&mut laps, us(9));
        assert_eq!(laps, [("cheap", us(1)), ("away", us(0)), ("next", us(2))]);
    }

    fn work() {
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_cpu_clock_moves_with_work_not_with_sleep() {
        let before = cpu_time();
        work();
        let worked = cpu_time() - before;
        assert!(worked > Duration::ZERO);
        std::thread::sleep(Duration::from_millis(50));
        let slept = cpu_time() - before - worked;
        assert!(slept < Duration::from_millis(25), "{slept:?}");
    }
}
