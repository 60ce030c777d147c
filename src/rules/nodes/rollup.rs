//! `rollup(n, dt)`: of each `dt`, the first `n` events pass at once and the
//! rest are held, then passed on together when the `dt` ends, one by one
//! (Riemann hands its children the held events as one vector; a vigil stage
//! takes one event at a time). As Riemann's, that flush counts as one of the
//! next `dt`'s `n`, which starts as the last ends. The `dt` ends by the
//! timer, so the held events go on time even when no later event comes.
//! At most [`WINDOW_MAX`] are held; past that a new event is dropped and
//! counted as a full window's are.

use std::sync::atomic::Ordering;

use parking_lot::Mutex;

use crate::clock::Micros;
use crate::event::Event;

use super::saved::{RestoreError, Restorer, Saved, Saver};
use super::window::WINDOW_MAX;
use super::{Children, Cx, Node, same, take_over};

pub struct Rollup {
    pub limit: u64,
    pub interval: Micros,
    pub children: Children,
    state: Mutex<RollupState>,
}

#[derive(Default)]
struct RollupState {
    /// When the current `dt` ends; `None`: idle, the next event starts one.
    window_end: Option<Micros>,
    /// Events passed in it (and a flush that opened it).
    sent: u64,
    held: Vec<Event>,
}

impl RollupState {
    /// The held events, if the current `dt` is over at `now`.
    fn due(&mut self, now: Micros, interval: Micros) -> Vec<Event> {
        let Some(end) = self.window_end.filter(|end| now >= *end) else {
            return Vec::new();
        };
        let held = std::mem::take(&mut self.held);
        // A flush opens the next `dt` where this one ended, one of its `n`
        // spent; with nothing to flush the stage goes idle.
        (self.window_end, self.sent) = if held.is_empty() {
            (None, 0)
        } else {
            (
                Some(
                    end.max(now.saturating_sub(interval))
                        .saturating_add(interval),
                ),
                1,
            )
        };
        held
    }

    /// A tick is needed only to flush.
    fn next_tick(&self) -> Option<Micros> {
        self.window_end.filter(|_| !self.held.is_empty())
    }
}

impl Rollup {
    pub fn new(limit: u64, interval: Micros, children: Children) -> Self {
        Self {
            limit,
            interval,
            children,
            state: Mutex::default(),
        }
    }

    fn flush(&self, held: Vec<Event>, cx: &mut Cx) {
        for event in &held {
            self.children.event(event, cx);
        }
    }
}

impl Node for Rollup {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let (held, pass, next) = {
            let mut s = self.state.lock();
            let held = s.due(cx.now, self.interval);
            s.window_end
                .get_or_insert(cx.now.saturating_add(self.interval));
            // Saturating: a restored count may be anything the file held.
            s.sent = s.sent.saturating_add(1);
            let pass = s.sent <= self.limit;
            if !pass {
                if s.held.len() < WINDOW_MAX {
                    s.held.push(event.clone());
                } else {
                    cx.stats.window_overflow.fetch_add(1, Ordering::Relaxed);
                }
            }
            (held, pass, s.next_tick())
        };
        cx.schedule(next);
        self.flush(held, cx);
        if pass {
            self.children.event(event, cx);
        }
    }

    fn tick(&self, cx: &mut Cx) {
        let (held, next) = {
            let mut s = self.state.lock();
            (s.due(cx.now, self.interval), s.next_tick())
        };
        cx.schedule(next);
        self.flush(held, cx);
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Rollup::new(
            self.limit,
            self.interval,
            self.children.fresh(),
        ))
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) =
            same::<Rollup>(old).filter(|o| (o.limit, o.interval) == (self.limit, self.interval))
        {
            take_over(&self.state, &old.state);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let s = self.state.lock();
        let entry = Saved::Rollup {
            window_end: s.window_end,
            sent: s.sent,
            held: s.held.clone(),
        };
        drop(s);
        out.push(entry);
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("rollup")? {
            Saved::Rollup {
                window_end,
                sent,
                mut held,
            } => {
                // The file is vigil's own, but its bound is this build's.
                held.truncate(WINDOW_MAX);
                *self.state.lock() = RollupState {
                    window_end: window_end.map(|end| from.due_within(end, self.interval)),
                    sent,
                    held,
                };
            }
            other => return Err(RestoreError::mismatch("rollup", &other)),
        }
        self.children.restore(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::nodes::Scratch;

    /// A state file that passed its checksum may hold any count: at 2^64
    /// the next event overflowed it (a panic where overflow is checked, as
    /// in the fuzzer's build; a count back at 0, passing everything, where
    /// it is not).
    #[test]
    fn a_count_restored_at_its_limit_holds_the_next_event() {
        let rollup = Rollup::new(3, 10, Children::default());
        let entry = Saved::Rollup {
            window_end: Some(10),
            sent: u64::MAX,
            held: Vec::new(),
        };
        rollup
            .restore(&mut Restorer::from_entries(vec![entry], 0))
            .unwrap();
        let mut scratch = Scratch::default();
        rollup.event(&Event::default(), &mut scratch.cx(0));
        let s = rollup.state.lock();
        assert_eq!((s.sent, s.held.len()), (u64::MAX, 1));
    }
}
