//! One index shard's expiry deadlines: the ordered set of `(due, key hash)`
//! slots, kept as sorted runs of at most [`RUN`] slots, with the first slot of
//! every run copied into one small array that finding a run searches.
//!
//! Why not `BTreeSet`: a mass expiry takes most of the set away at once, and
//! a B-tree frees its nodes one by one, each a cache miss at a random address
//! (a million deadlines are ~130 000 nodes: 23 ms on the development
//! machine, a fifth of the whole expiry). Here the due runs are counted from
//! their lengths without reading them and freed a hundred times fewer.
//! Deadlines mostly arrive in time order (`now + ttl`), and a run that fills
//! at the end is not split, so such runs stay full.

use crate::clock::Micros;

use super::prefetch;

/// `(scheduled, key hash)`, ordered by time first.
pub type Slot = (Micros, u64);

/// Slots per run: inserting into one moves 1 KiB on average. (Small under
/// test, so tests split and merge runs with a few dozen slots.)
const RUN: usize = if cfg!(test) { 8 } else { 128 };

/// A run this short is merged into a neighbour it fits in, so removals never
/// leave the set as many nearly empty runs.
const SHORT_RUN: usize = RUN / 4;

#[derive(Default)]
pub struct Deadlines {
    /// `firsts[i] == runs[i][0]`.
    firsts: Vec<Slot>,
    /// Each non-empty, sorted, holding capacity for [`RUN`] slots, and
    /// wholly before the next.
    runs: Vec<Vec<Slot>>,
}

impl Deadlines {
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.runs.iter().map(Vec::len).sum()
    }

    pub fn first(&self) -> Option<Slot> {
        self.firsts.first().copied()
    }

    /// The run that holds `slot`, or would: the last one starting at or before
    /// it, or the first run when none does.
    fn run_of(&self, slot: &Slot) -> usize {
        self.firsts
            .partition_point(|first| first <= slot)
            .saturating_sub(1)
    }

    /// Adds `slot`; false if it was already there.
    pub fn insert(&mut self, slot: Slot) -> bool {
        if self.runs.is_empty() {
            self.push_run(slot);
            return true;
        }
        let mut run = self.run_of(&slot);
        self.load(run);
        let mut at = match self.runs[run].binary_search(&slot) {
            Ok(_) => return false,
            Err(at) => at,
        };
        if self.runs[run].len() == RUN {
            if at == RUN && run + 1 == self.runs.len() {
                self.push_run(slot);
                return true;
            }
            let mut upper = Vec::with_capacity(RUN);
            upper.extend_from_slice(&self.runs[run][RUN / 2..]);
            self.runs[run].truncate(RUN / 2);
            self.firsts.insert(run + 1, upper[0]);
            self.runs.insert(run + 1, upper);
            if at > RUN / 2 {
                run += 1;
                at -= RUN / 2;
            }
        }
        self.runs[run].insert(at, slot);
        self.firsts[run] = self.runs[run][0];
        true
    }

    /// Starts loading all of a run before searching it: a binary search would
    /// otherwise wait for one cache miss after another (this halved the time
    /// of a million inserts in random order).
    fn load(&self, run: usize) {
        let start = self.runs[run].as_ptr() as usize;
        let end = start + size_of_val(self.runs[run].as_slice());
        for line in (start..end).step_by(64).chain([end - 1]) {
            prefetch(line);
        }
    }

    fn push_run(&mut self, slot: Slot) {
        let mut run = Vec::with_capacity(RUN);
        run.push(slot);
        self.runs.push(run);
        self.firsts.push(slot);
    }

    /// Takes `slot` out; false if it was not there.
    pub fn remove(&mut self, slot: &Slot) -> bool {
        if self.runs.is_empty() {
            return false;
        }
        let run = self.run_of(slot);
        self.load(run);
        let Ok(at) = self.runs[run].binary_search(slot) else {
            return false;
        };
        self.runs[run].remove(at);
        self.settle(run);
        true
    }

    pub fn pop_first(&mut self) -> Option<Slot> {
        let run = self.runs.first_mut()?;
        let first = run.remove(0);
        self.settle(0);
        Some(first)
    }

    /// How many slots come before `at`. Reads the lengths of the runs wholly
    /// before it and searches one run.
    pub fn count_before(&self, at: &Slot) -> usize {
        let boundary = self.run_of(at);
        let Some(run) = self.runs.get(boundary) else {
            return 0;
        };
        let whole: usize = self.runs[..boundary].iter().map(Vec::len).sum();
        whole + run.partition_point(|slot| slot < at)
    }

    /// Removes every slot before `at`, freeing the runs wholly before it
    /// without reading them.
    pub fn remove_before(&mut self, at: &Slot) {
        let boundary = self.run_of(at);
        self.runs.drain(..boundary);
        self.firsts.drain(..boundary);
        if let Some(run) = self.runs.first_mut() {
            let cut = run.partition_point(|slot| slot < at);
            if cut > 0 {
                run.drain(..cut);
                self.settle(0);
            }
        }
    }

    /// After slots left run `run`: drops it if empty, merges it into a
    /// neighbour if short and it fits, and refreshes its first slot.
    fn settle(&mut self, run: usize) {
        let len = self.runs[run].len();
        if len == 0 {
            self.runs.remove(run);
            self.firsts.remove(run);
            return;
        }
        self.firsts[run] = self.runs[run][0];
        if len >= SHORT_RUN {
            return;
        }
        if self
            .runs
            .get(run + 1)
            .is_some_and(|next| len + next.len() <= RUN)
        {
            let next = self.runs.remove(run + 1);
            self.firsts.remove(run + 1);
            self.runs[run].extend_from_slice(&next);
        } else if run > 0 && self.runs[run - 1].len() + len <= RUN {
            let short = self.runs.remove(run);
            self.firsts.remove(run);
            self.runs[run - 1].extend_from_slice(&short);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Every invariant the type's fields state.
    fn assert_sound(set: &Deadlines) {
        assert_eq!(set.firsts.len(), set.runs.len());
        let mut previous: Option<Slot> = None;
        for (first, run) in set.firsts.iter().zip(&set.runs) {
            assert!(!run.is_empty() && run.len() <= RUN, "run of {}", run.len());
            assert_eq!(run.capacity(), RUN, "a run never reallocates");
            assert_eq!(Some(first), run.first());
            for slot in run {
                assert!(
                    previous.is_none_or(|p| p < *slot),
                    "out of order at {slot:?}"
                );
                previous = Some(*slot);
            }
        }
    }

    fn contents(set: &Deadlines) -> Vec<Slot> {
        set.runs.iter().flatten().copied().collect()
    }

    #[test]
    fn slots_in_time_order_fill_whole_runs() {
        let mut set = Deadlines::default();
        for at in 0..10 * RUN as Micros {
            assert!(set.insert((at, 1)));
        }
        assert!(!set.insert((5, 1)), "already there");
        assert_eq!(set.runs.len(), 10);
        assert!(set.runs.iter().all(|run| run.len() == RUN));
        assert_sound(&set);
    }

    #[test]
    fn removing_before_frees_whole_runs_and_cuts_one() {
        let mut set = Deadlines::default();
        for at in 0..10 * RUN as Micros {
            set.insert((at, 0));
        }
        let cut = (3 * RUN + 2) as Micros;
        assert_eq!(set.count_before(&(cut, 0)), 3 * RUN + 2);
        set.remove_before(&(cut, 0));
        assert_eq!(set.first(), Some((cut, 0)));
        assert_eq!(set.len(), 7 * RUN - 2);
        assert_eq!(set.count_before(&(cut, 0)), 0);
        assert_sound(&set);
        set.remove_before(&(Micros::MAX, u64::MAX));
        assert_eq!((set.len(), set.first()), (0, None));
    }

    #[test]
    fn short_runs_merge_with_a_neighbour() {
        let mut set = Deadlines::default();
        for at in 0..4 * RUN as Micros {
            set.insert((at, 0));
        }
        let run = RUN as Micros;
        // The third run down to half, then the second down to its last slot:
        // that one joins the third.
        for at in (2 * run + run / 2..3 * run).chain(run..2 * run - 1) {
            assert!(set.remove(&(at, 0)));
        }
        assert!(!set.remove(&(run, 0)), "already gone");
        assert_eq!(set.runs.len(), 3);
        assert_eq!(set.runs[1].first(), Some(&(2 * run - 1, 0)));
        assert_eq!(set.runs[1].len(), 1 + RUN / 2);
        assert_sound(&set);
    }

    /// Random inserts, removals, pops and cuts, checked against `BTreeSet`
    /// after every step, with times drawn from a narrow range so runs split,
    /// empty and merge often.
    #[test]
    fn agrees_with_a_btreeset() {
        let mut set = Deadlines::default();
        let mut model = BTreeSet::new();
        let mut next = crate::test_rng::xorshift(0x2545_f491_4f6c_dd1d);
        for step in 0..20_000 {
            let slot = ((next() % 200) as Micros, next() % 3);
            match next() % 10 {
                0..=4 => assert_eq!(set.insert(slot), model.insert(slot), "step {step}"),
                5..=7 => assert_eq!(set.remove(&slot), model.remove(&slot), "step {step}"),
                8 => assert_eq!(set.pop_first(), model.pop_first(), "step {step}"),
                _ => {
                    let cut = ((next() % 60) as Micros, 1);
                    assert_eq!(
                        set.count_before(&cut),
                        model.range(..cut).count(),
                        "step {step}"
                    );
                    if next().is_multiple_of(4) {
                        set.remove_before(&cut);
                        model = model.split_off(&cut);
                    }
                }
            }
            assert_eq!(set.first(), model.first().copied(), "step {step}");
            assert_eq!(set.len(), model.len(), "step {step}");
            if step % 100 == 0 {
                assert_eq!(contents(&set), model.iter().copied().collect::<Vec<_>>());
                assert_sound(&set);
            }
        }
        assert_sound(&set);
    }
}
