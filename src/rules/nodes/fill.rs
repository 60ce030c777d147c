//! `fill_in(dt, {fields})` and `fill_in_last(dt, {fields})`: pass every
//! event on and, wherever `dt` passes without one, emit an event of their
//! own, stamped with that moment: `fill_in` the event the fields make,
//! `fill_in_last` the latest event with the fields set over it (Riemann's
//! `fill-in` and `fill-in-last`). The gap is measured from the latest event
//! on the injected clock, and the timer emits while nothing comes.
//!
//! Filling stops once the latest event has expired as the index would
//! expire it, or when an `expired` event arrives (Riemann stops only on
//! the latter, and fills for ever after an event that never expires by
//! state). It starts with the first event: Riemann's starts when the rules
//! load, and with no event yet there is nothing whose expiry would stop it.
//! After a restart, or a stall of the process, the gap is measured from
//! the start again, or the stall's end: vigil was not listening
//! meanwhile, which says nothing of the series.

use parking_lot::Mutex;

use crate::clock::{Micros, secs_to_micros};
use crate::event::Event;
use crate::index::expires_at;

use super::saved::{RestoreError, Restorer, Saved, Saver};
// Gaps that ended between two ticks, caught up on as `rate` catches up its
// windows.
use super::stateful::MAX_CATCH_UP;
use super::{Children, Cx, FieldSet, Node, same, take_over};

pub struct FillIn {
    pub interval: Micros,
    /// The fields of the event emitted: set over an empty event
    /// (`fill_in`), or over the latest one (`fill_in_last`).
    pub sets: Vec<FieldSet>,
    pub last: bool,
    pub children: Children,
    state: Mutex<FillState>,
}

#[derive(Default)]
struct FillState {
    /// When the next fill is due; `None`: not filling.
    next: Option<Micros>,
    /// When the latest event expires: no fill after it.
    expires: Micros,
    /// `fill_in_last`'s latest event.
    latest: Option<Event>,
    /// A reload changed `dt`: the next fill is no earlier than the first
    /// tick or event after it, the new `dt` not being in force before.
    moved: bool,
}

impl FillIn {
    pub fn new(interval: Micros, sets: Vec<FieldSet>, last: bool, children: Children) -> Self {
        Self {
            interval,
            sets,
            last,
            children,
            state: Mutex::default(),
        }
    }

    /// The fills due by `cx.now`.
    fn due(&self, s: &mut FillState, cx: &Cx) -> Vec<Event> {
        let now = cx.now;
        let mut due = Vec::new();
        let mut rounds = 0;
        if std::mem::take(&mut s.moved) {
            s.next = s.next.map(|at| at.max(now));
        }
        while let Some(at) = s.next.filter(|at| *at <= now) {
            if at > s.expires {
                // Silent past its expiry: stop until an event comes.
                *s = FillState::default();
                break;
            }
            if cx.stalled(at, self.interval) {
                // The process was stalled, not the series silent: as after
                // a restart, it has a whole `dt` from now to speak.
                s.next = Some(now.saturating_add(self.interval));
                break;
            }
            let mut fill = match (&s.latest, self.last) {
                (Some(latest), true) => latest.clone(),
                _ => Event::default(),
            };
            for set in &self.sets {
                set.apply(&mut fill);
            }
            fill.time = at;
            due.push(fill);
            rounds += 1;
            s.next = Some(if rounds == MAX_CATCH_UP {
                now.saturating_add(self.interval)
            } else {
                at.saturating_add(self.interval)
            });
        }
        due
    }

    fn emit(&self, due: Vec<Event>, cx: &mut Cx) {
        for event in &due {
            self.children.event(event, cx);
        }
    }
}

impl Node for FillIn {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let (due, next) = {
            let mut s = self.state.lock();
            let due = self.due(&mut s, cx);
            if event.is_expired_state() {
                *s = FillState::default();
            } else {
                let ttl = secs_to_micros(cx.index.ttl_secs(event));
                s.expires = expires_at(event.time, ttl, cx.now);
                s.next = Some(cx.now.saturating_add(self.interval));
                if self.last {
                    s.latest.get_or_insert_default().clone_from(event);
                }
            }
            (due, s.next)
        };
        cx.schedule(next);
        self.emit(due, cx);
        self.children.event(event, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        let (due, next) = {
            let mut s = self.state.lock();
            (self.due(&mut s, cx), s.next)
        };
        cx.schedule(next);
        self.emit(due, cx);
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(FillIn::new(
            self.interval,
            self.sets.clone(),
            self.last,
            self.children.fresh(),
        ))
    }

    /// A `dt` or fields changed (or `fill_in_last` made `fill_in`) keep the
    /// state: dropping it made a series silent across the reload look new,
    /// and never filled. The gap since its latest event (or fill) is measured in the new `dt`, from the
    /// reload on: a fill that puts before it comes at the reload, once, not
    /// caught up as after a stall (those moments the old `dt` was in force,
    /// and said the series was not silent). The children adopt theirs only
    /// if nothing changed, as below any stage whose parameters did.
    fn adopt(&self, old: &dyn Node) {
        // `fill_in_last` fills with the latest event, which `fill_in` keeps
        // not: it starts empty; the other way, it only drops that event.
        let Some(old) = same::<FillIn>(old).filter(|o| o.last || !self.last) else {
            return;
        };
        take_over(&self.state, &old.state);
        let mut s = self.state.lock();
        if !self.last {
            s.latest = None;
        }
        if (old.interval, &old.sets, old.last) == (self.interval, &self.sets, self.last) {
            drop(s);
            self.children.adopt(&old.children);
            return;
        }
        s.next = s.next.map(|at| {
            at.saturating_sub(old.interval)
                .saturating_add(self.interval)
        });
        s.moved = old.interval != self.interval;
    }

    fn save(&self, out: &mut dyn Saver) {
        let s = self.state.lock();
        let entry = Saved::FillIn {
            next: s.next,
            expires: s.expires,
            latest: s.latest.clone(),
        };
        drop(s);
        out.push(entry);
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("fill_in")? {
            Saved::FillIn {
                next,
                expires,
                latest,
            } => {
                // vigil's downtime is no silence of the series: from the
                // start it has a whole `dt` to speak, as after its first
                // event, else each series still alive would be filled for
                // every `dt` vigil was down, all at once. Nor later: a saved
                // fill due after that could only come from a file vigil did
                // not write. So a saved fill is due exactly then.
                let resumed = from.started().saturating_add(self.interval);
                // The series' latest event or fill came a `dt` before its
                // next fill. Saved after the start (a clock that jumped
                // back), it counts as the start, as every restored moment
                // does, and the time the series had left after it with it:
                // kept as saved, a far-ahead expiry filled the series,
                // silent or dead, until then.
                let expires = next.map_or(expires, |next| {
                    let last = next.saturating_sub(self.interval);
                    expires.saturating_sub(last.saturating_sub(from.past(last)))
                });
                *self.state.lock() = FillState {
                    next: next.map(|_| resumed),
                    expires,
                    latest: latest.filter(|_| self.last),
                    moved: false,
                }
            }
            other => return Err(RestoreError::mismatch("fill_in", &other)),
        }
        self.children.restore(from)
    }
}
