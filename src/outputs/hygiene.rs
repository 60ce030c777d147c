//! Paging hygiene: the incidents a pager has open at its receiver, and which
//! pages they make needless. One table for the output (on its memory's
//! clock: the process's monotonic one, a virtual one in tests), for a cluster node's memory of replayed pages, and for
//! `vigil test`'s model of the output (on the test's virtual clock), so that
//! what `expect pager {…}` sees is what the receiver gets.
//!
//! An incident several series share (a `dedup_key` such as `{host}`) has the
//! severity of the highest of them failing: PagerDuty's Events API v2 takes
//! a trigger for an open incident as its update, so a trigger of a lower one
//! would show on-call a lower severity than is failing. A trigger is sent
//! when its severity is that highest and the receiver has another one (an
//! escalation, or the way down once the higher ones cleared), or after the
//! resend interval; one below it joins without a page. The `ok` of the series
//! that set it sends nothing while others fail: it says nothing of their
//! severity, and a trigger needs an event to show; the receiver keeps the
//! higher severity until their next trigger, or their resolve.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::pager::{Action, Severity};
use crate::clock::Micros;

/// How long after `earlier` `now` is; zero if before it.
fn since(now: Micros, earlier: Micros) -> Duration {
    Duration::from_micros(u64::try_from(now.saturating_sub(earlier)).unwrap_or(0))
}

/// The incidents open at the receiver by dedup key; bounded, forgetting the
/// least recently triggered first, in number and in the series they hold
/// together (`max` each: as many as `max` incidents of one series each).
pub(super) struct Incidents {
    pub(super) max: usize,
    open: HashMap<String, Open>,
    /// The series all of `open` hold.
    series: usize,
    /// Keys by the sequence number of their last trigger: oldest first.
    order: BTreeMap<u64, String>,
    next: u64,
}

/// An incident's last trigger, and the series failing in it.
pub(super) struct Open {
    /// When, on the table's clock.
    pub(super) sent: Micros,
    /// The severity the receiver has: the last trigger's.
    pub(super) severity: Severity,
    /// Its key in `Incidents::order`.
    seq: u64,
    /// The series (their derived keys' `fnv1a`) whose triggers it got and
    /// that have not cleared since, each at its latest severity; empty when
    /// unknown (a file written before). Under a later `dedup_key` template
    /// only they take it up ([`Open::of`]): another series the earlier one
    /// merged into it is an incident of its own. It is over once they have
    /// all cleared. Not bounded per incident: one forgotten would let the
    /// others' `ok` resolve what it still pages for (an incident per service
    /// across a fleet holds a series per host).
    series: HashMap<u64, Severity>,
    /// How many of `series` fail at each severity (by [`Severity::rank`]):
    /// the highest, without a scan of a fleet's series at every page.
    failing: [usize; Severity::COUNT],
    /// The series that cleared last, whose resolve the receiver has not
    /// taken (refused, or not yet sent): it fails no more, so it holds up
    /// neither the incident's severity nor the resolve of a series failing
    /// in it since; but the incident is still open at the receiver, and its
    /// next `ok` resolves it.
    cleared: Option<u64>,
}

impl Open {
    /// Whether `series` (its derived key's `fnv1a`) may take this incident
    /// up: it triggered it (and fails, or cleared last), or nobody knows who
    /// did.
    pub(super) fn of(&self, series: u64) -> bool {
        self.series.contains_key(&series)
            || self.cleared == Some(series)
            || (self.series.is_empty() && self.cleared.is_none())
    }

    /// The series whose resolve the receiver has not taken, if one cleared
    /// last (see `cleared`).
    pub(super) fn cleared(&self) -> Option<u64> {
        self.cleared
    }

    /// The series failing in it, each at its latest severity.
    pub(super) fn series(&self) -> impl Iterator<Item = (u64, Severity)> + '_ {
        self.series
            .iter()
            .map(|(series, severity)| (*series, *severity))
    }

    /// The highest severity failing in it; `None` when nobody knows.
    fn highest(&self) -> Option<Severity> {
        Severity::ALL
            .into_iter()
            .rev()
            .find(|severity| self.failing[severity.rank()] > 0)
    }

    /// `series` fails at `severity`: whether it is new to this incident.
    fn fails(&mut self, series: u64, severity: Severity) -> bool {
        if self.cleared == Some(series) {
            self.cleared = None;
        }
        let before = self.series.insert(series, severity);
        if let Some(before) = before {
            self.failing[before.rank()] -= 1;
        }
        self.failing[severity.rank()] += 1;
        before.is_none()
    }

    /// `series` cleared: whether it was failing in this incident.
    fn clears(&mut self, series: u64) -> bool {
        let Some(severity) = self.series.remove(&series) else {
            return false;
        };
        self.failing[severity.rank()] -= 1;
        true
    }
}

impl Incidents {
    pub(super) fn new(max: usize) -> Incidents {
        Incidents {
            max,
            open: HashMap::new(),
            series: 0,
            order: BTreeMap::new(),
            next: 0,
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<&Open> {
        self.open.get(key)
    }

    pub(super) fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether a page of `series` (its derived key's `fnv1a`) asking
    /// `action` of the incident under `key`, at `now`, must be sent; the
    /// series joins the open incident, or leaves it, either way (see the
    /// module's header). A resolve is needed only for an incident this
    /// output opened, once every series that triggered it has cleared (or
    /// nobody knows which did): the `ok` of one must not resolve it while
    /// another still fails, which would not page again while its state
    /// stays. The last series to clear is remembered until the resolve is
    /// [sent](Self::sent): one the receiver refuses leaves the incident
    /// open there, to that series' next `ok`, and to the last `ok` of any
    /// series failing in it since.
    pub(super) fn needs_sending(
        &mut self,
        key: &str,
        series: u64,
        action: Action,
        now: Micros,
        resend: Duration,
    ) -> bool {
        let Some(open) = self.open.get_mut(key) else {
            return matches!(action, Action::Trigger(_));
        };
        match action {
            Action::Trigger(severity) => {
                let (sent, before) = (open.sent, open.severity);
                // Its own severity replaces the one it failed at before.
                self.joined(key, series, severity);
                let highest = (self.open.get(key)).and_then(Open::highest);
                highest == Some(severity) && (severity != before || since(now, sent) >= resend)
            }
            Action::Resolve => {
                if open.series.is_empty() {
                    // Unknown (a file written before), or its resolve again.
                    return open.cleared.is_none_or(|cleared| cleared == series);
                }
                if !open.clears(series) {
                    return false;
                }
                self.series -= 1;
                let last = open.series.is_empty();
                if last {
                    open.cleared = Some(series);
                }
                last
            }
        }
    }

    /// The receiver took the page of `series` asking `action` of the
    /// incident under `key`, at `now`.
    pub(super) fn sent(&mut self, key: String, series: u64, action: Action, now: Micros) {
        match action {
            Action::Trigger(severity) => {
                self.triggered(key.clone(), severity, now);
                self.joined(&key, series, severity);
            }
            Action::Resolve => self.resolved(&key),
        }
    }

    /// `series` fails at `severity` in the incident open under `key`, if one
    /// is. Beyond `max` series together, the least recently triggered other
    /// incidents are forgotten, as beyond `max` incidents.
    pub(super) fn joined(&mut self, key: &str, series: u64, severity: Severity) {
        let Some(open) = self.open.get_mut(key) else {
            return;
        };
        if !open.fails(series, severity) {
            return;
        }
        self.series += 1;
        let seq = open.seq;
        while self.series > self.max {
            let Some(oldest) = (self.order.iter())
                .find(|(at, _)| **at != seq)
                .map(|(_, key)| key.clone())
            else {
                break;
            };
            self.resolved(&oldest);
        }
    }

    /// The incident open under `key`, (re)triggered at `now`: the series
    /// failing in it before stay its own.
    pub(super) fn triggered(&mut self, key: String, severity: Severity, now: Micros) {
        let before = self.open.remove(&key).inspect(|before| {
            self.order.remove(&before.seq);
        });
        if self.open.len() >= self.max
            && let Some((_, oldest)) = self.order.pop_first()
            && let Some(forgotten) = self.open.remove(&oldest)
        {
            self.series -= forgotten.series.len();
        }
        self.order.insert(self.next, key.clone());
        let (series, failing, cleared) = before
            .map(|b| (b.series, b.failing, b.cleared))
            .unwrap_or_default();
        let open = Open {
            sent: now,
            severity,
            seq: self.next,
            series,
            failing,
            cleared,
        };
        self.next += 1;
        self.open.insert(key, open);
    }

    /// The incident open under `key`, if one is, awaits the resolve of
    /// `series`, which cleared last (as a saved file says).
    pub(super) fn left_to(&mut self, key: &str, series: u64) {
        if let Some(open) = self.open.get_mut(key)
            && open.series.is_empty()
        {
            open.cleared = Some(series);
        }
    }

    pub(super) fn resolved(&mut self, key: &str) {
        if let Some(open) = self.open.remove(key) {
            self.order.remove(&open.seq);
            self.series -= open.series.len();
        }
    }

    /// Oldest trigger first, each with how long before `now` it was sent.
    pub(super) fn oldest_first(
        &self,
        now: Micros,
    ) -> impl Iterator<Item = (&str, &Open, Duration)> {
        self.order.values().map(move |key| {
            let open = &self.open[key];
            (key.as_str(), open, since(now, open.sent))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_incidents_are_bounded_forgetting_the_oldest() {
        let mut open = Incidents::new(2);
        let (now, severity) = (0, Severity::Critical);
        open.triggered("a".into(), severity, now);
        open.triggered("b".into(), severity, now);
        open.triggered("a".into(), severity, now); // a is now the most recent
        open.triggered("c".into(), severity, now);
        assert!(open.get("b").is_none());
        assert!(open.get("a").is_some() && open.get("c").is_some());
        open.resolved("a");
        assert_eq!((open.open.len(), open.order.len()), (1, 1));
    }

    /// An incident keeps every series failing in it (one forgotten would let
    /// the others' `ok` resolve it); the series of all incidents together
    /// are bounded by forgetting the least recently triggered other ones.
    #[test]
    fn series_failing_together_are_bounded_forgetting_the_oldest_other_incident() {
        let mut open = Incidents::new(3);
        let (now, severity) = (0, Severity::Critical);
        let (resend, ok) = (Duration::from_secs(3600), Action::Resolve);
        open.triggered("a".into(), severity, now);
        open.joined("a", 1, severity);
        open.triggered("b".into(), severity, now);
        (0..5).for_each(|series| open.joined("b", 10 + series, severity));
        assert!(open.get("a").is_none(), "a went for b's series");
        assert_eq!(open.series, 5);
        assert!((1..5).all(|series| !open.needs_sending("b", 10 + series, ok, now, resend)));
        assert!(open.needs_sending("b", 10, ok, now, resend), "the last");
        open.sent("b".into(), 10, ok, now);
        assert_eq!((open.open.len(), open.series), (0, 0));
    }

    /// Which page of a shared incident is sent, by the severities of the
    /// series failing in it, on a virtual clock.
    #[test]
    fn a_shared_incident_is_paged_at_the_highest_severity_failing() {
        let (critical, warning, error) = (Severity::Critical, Severity::Warning, Severity::Error);
        let mut open = Incidents::new(10);
        let resend = Duration::from_secs(60);
        let minute = 60_000_000;
        let mut page = |series, action, at| {
            let sends = open.needs_sending("web1", series, action, at, resend);
            if sends {
                open.sent("web1".into(), series, action, at);
            }
            sends
        };
        let trigger = Action::Trigger;
        assert!(page(1, trigger(warning), 0), "opens it");
        assert!(page(2, trigger(critical), 1), "escalates it");
        assert!(!page(3, trigger(error), 2), "lower: joins");
        assert!(!page(2, trigger(critical), 3), "a repeat");
        assert!(page(2, trigger(critical), 3 + minute), "after the interval");
        assert!(
            !page(1, trigger(warning), 4 + minute),
            "lower, however late"
        );
        assert!(!page(2, Action::Resolve, 5 + minute), "1 and 3 still fail");
        assert!(!page(1, trigger(warning), 6 + minute), "3 is higher");
        assert!(page(3, trigger(warning), 7 + minute), "3 went down to 1's");
        assert!(page(3, trigger(error), 7 + minute), "and back up");
        assert!(!page(3, Action::Resolve, 8 + minute), "1 still fails");
        assert!(
            !page(4, Action::Resolve, 9 + minute),
            "4 never failed in it"
        );
        assert!(page(1, Action::Resolve, 10 + minute), "the last");
        assert!(!page(1, Action::Resolve, 11 + minute), "over");
    }

    /// A resolve the receiver refused leaves the incident as it was: open,
    /// to the series whose `ok` it was, and to none other.
    #[test]
    fn a_resolve_not_sent_leaves_the_last_series_in_the_incident() {
        let mut open = Incidents::new(10);
        let (now, resend) = (0, Duration::from_secs(3600));
        open.sent("web1".into(), 1, Action::Trigger(Severity::Critical), now);
        assert!(open.needs_sending("web1", 1, Action::Resolve, now, resend));
        let incident = open.get("web1").unwrap();
        assert!(incident.of(1) && !incident.of(2));
        assert!(!open.needs_sending("web1", 2, Action::Resolve, now, resend));
        assert!(open.needs_sending("web1", 1, Action::Resolve, now, resend));
    }
}
