//! `apdex(dt, satisfied: "PRED", tolerated: "PRED")`: Riemann's `apdex`.
//! Over each `dt`, counts the events the first predicate matches
//! (satisfied), those only the second does (tolerated) and the rest; when
//! the `dt` ends, emits the latest of them with the Apdex score as its
//! metric, (satisfied + tolerated / 2) / all. `expired` events are not
//! counted. A `dt` starts with its first event and ends by the timer, on
//! time even when no later event comes; with none, nothing is emitted.

use parking_lot::Mutex;

use crate::clock::{Micros, secs_to_micros};
use crate::event::{Event, Metric};
use crate::index::expires_at;
use crate::query::Query;

use super::saved::{RestoreError, Restorer, Saved, Saver};
use super::{Children, Cx, Node, same, take_over};

pub struct Apdex {
    pub interval: Micros,
    pub satisfied: Query,
    pub tolerated: Query,
    pub children: Children,
    state: Mutex<ApdexState>,
}

#[derive(Default)]
struct ApdexState {
    /// When the current `dt` ends; `None`: idle, the next event starts one.
    window_end: Option<Micros>,
    satisfied: u64,
    tolerated: u64,
    other: u64,
    latest: Option<Event>,
}

impl ApdexState {
    /// The score of the `dt` that ended by `now`, on its latest event.
    fn due(&mut self, now: Micros) -> Option<Event> {
        self.window_end.filter(|end| now >= *end)?;
        let s = std::mem::take(self);
        let mut out = s.latest?;
        // As Riemann's ratio: a whole score (all satisfied, or none even
        // tolerated) is an integer. No sum of the counts in integers: a
        // restored state file's may be anything.
        let (satisfied, tolerated) = (s.satisfied as f64, s.tolerated as f64);
        out.metric = Some(if s.tolerated == 0 && s.other == 0 {
            Metric::Int(1)
        } else if s.satisfied == 0 && s.tolerated == 0 {
            Metric::Int(0)
        } else {
            Metric::Float((satisfied + tolerated / 2.0) / (satisfied + tolerated + s.other as f64))
        });
        Some(out)
    }
}

impl Apdex {
    pub fn new(interval: Micros, satisfied: Query, tolerated: Query, children: Children) -> Self {
        Self {
            interval,
            satisfied,
            tolerated,
            children,
            state: Mutex::default(),
        }
    }

    fn emit(&self, due: Option<Event>, cx: &mut Cx) {
        if let Some(event) = due {
            self.children.event(&event, cx);
        }
    }
}

impl Node for Apdex {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let (due, next) = {
            let mut s = self.state.lock();
            let due = s.due(cx.now);
            // Riemann's `expired?`: the state, or a TTL already run out.
            let ttl = secs_to_micros(cx.index.ttl_secs(event));
            let expired = event.is_expired_state() || expires_at(event.time, ttl, cx.now) < cx.now;
            if !expired {
                s.window_end
                    .get_or_insert(cx.now.saturating_add(self.interval));
                let count = if self.satisfied.matches(event) {
                    &mut s.satisfied
                } else if self.tolerated.matches(event) {
                    &mut s.tolerated
                } else {
                    &mut s.other
                };
                *count = count.saturating_add(1);
                s.latest.get_or_insert_default().clone_from(event);
            }
            (due, s.window_end)
        };
        cx.schedule(next);
        self.emit(due, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        let (due, next) = {
            let mut s = self.state.lock();
            (s.due(cx.now), s.window_end)
        };
        cx.schedule(next);
        self.emit(due, cx);
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Apdex::new(
            self.interval,
            self.satisfied.clone(),
            self.tolerated.clone(),
            self.children.fresh(),
        ))
    }

    fn adopt(&self, old: &dyn Node) {
        fn definition(a: &Apdex) -> (Micros, &str, &str) {
            (a.interval, a.satisfied.as_str(), a.tolerated.as_str())
        }
        if let Some(old) = same::<Apdex>(old).filter(|o| definition(o) == definition(self)) {
            take_over(&self.state, &old.state);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let s = self.state.lock();
        let entry = Saved::Apdex {
            window_end: s.window_end,
            counts: [s.satisfied, s.tolerated, s.other],
            latest: s.latest.clone(),
        };
        drop(s);
        out.push(entry);
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("apdex")? {
            Saved::Apdex {
                window_end,
                counts: [satisfied, tolerated, other],
                latest,
            } => {
                *self.state.lock() = ApdexState {
                    window_end: window_end.map(|end| from.due_within(end, self.interval)),
                    satisfied,
                    tolerated,
                    other,
                    latest,
                }
            }
            other => return Err(RestoreError::mismatch("apdex", &other)),
        }
        self.children.restore(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::nodes::Scratch;

    /// A state file that passed its checksum may hold any counts: near
    /// 2^64 they overflowed, a panic where overflow is checked (the
    /// fuzzer's build) and a wrapped score where it is not.
    #[test]
    fn counts_restored_near_their_limit_score_without_overflowing() {
        let query = |text| Query::parse(text).unwrap();
        let apdex = Apdex::new(10, query("metric < 1"), query("false"), Children::default());
        let latest = Event::default();
        let entry = Saved::Apdex {
            window_end: Some(10),
            counts: [u64::MAX, 0, u64::MAX],
            latest: Some(latest.clone()),
        };
        apdex
            .restore(&mut Restorer::from_entries(vec![entry], 0))
            .unwrap();
        let mut scratch = Scratch::default();
        apdex.event(
            &Event {
                metric: Some(Metric::Float(0.5)),
                ..latest
            },
            &mut scratch.cx(0),
        );
        let score = apdex.state.lock().due(10).unwrap().metric;
        assert_eq!(score, Some(Metric::Float(0.5)));
    }
}
