//! One index shard's hash table: open addressing with linear probing over a
//! flat array of entries, each holding its key's hash beside the pointer to
//! its packed block.
//!
//! Why not `hashbrown`: an index update among 100 K keys or more waits on
//! main memory, and `hashbrown` reads three lines in a row for it (control
//! bytes, bucket, block) with no way to learn any of their addresses ahead.
//! Here an entry's slot is at a known place (`hash & mask`), so the index can
//! prefetch it a few events early ([`SlotHint`]); the stored hash
//! sends almost every probe that is not the key past it without reading its
//! block, and lets the table grow without reading any block at all.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::clock::Micros;

use super::packed::Packed;
use super::prefetch;

/// Grown when more than this share of slots is taken: linear probing stays
/// short (2.5 slots on average for a present key at the worst) while a slot
/// is 32 bytes, two to a cache line.
const MAX_LOAD_NUM: usize = 3;
const MAX_LOAD_DEN: usize = 4;

const INITIAL_SLOTS: usize = 16;

pub struct Entry {
    /// The key's hash, as the index computes it.
    pub hash: u64,
    /// When the stored event's TTL runs out. Kept beside the pointer, not in
    /// the packed block, so an expiry sweep tells what expires by reading
    /// the table front to back (a kept entry's block is read only to see
    /// whether its slot in the deadline set came due).
    pub deadline: Micros,
    /// One heap block (see `packed.rs`).
    pub packed: Packed,
}

#[derive(Default)]
pub struct Table {
    /// Empty, or a power of two long with at least one `None`.
    slots: Vec<Option<Entry>>,
    len: usize,
}

impl Table {
    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    fn home(&self, hash: u64) -> usize {
        hash as usize & self.mask()
    }

    /// The slot of the entry with this hash that `is_key` accepts.
    pub fn find(&self, hash: u64, is_key: impl Fn(&Entry) -> bool) -> Option<usize> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            match &self.slots[i] {
                None => return None,
                Some(entry) if entry.hash == hash && is_key(entry) => return Some(i),
                Some(_) => i = (i + 1) & mask,
            }
        }
    }

    /// The entry in a slot [`Table::find`] returned.
    pub fn get(&self, slot: usize) -> Option<&Entry> {
        self.slots.get(slot)?.as_ref()
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Entry> {
        self.slots.get_mut(slot)?.as_mut()
    }

    /// Adds an entry whose key is not in the table; true when the slots
    /// moved to make room (a [`SlotHint`] of the table is then stale).
    pub fn insert_new(&mut self, entry: Entry) -> bool {
        let grows = (self.len + 1) * MAX_LOAD_DEN > self.slots.len() * MAX_LOAD_NUM;
        if grows {
            self.grow();
        }
        self.place(entry);
        self.len += 1;
        grows
    }

    /// Puts `entry` in the first free slot from its home.
    fn place(&mut self, entry: Entry) {
        let mask = self.mask();
        let mut i = self.home(entry.hash);
        while self.slots[i].is_some() {
            i = (i + 1) & mask;
        }
        self.slots[i] = Some(entry);
    }

    /// Doubles the slots.
    fn grow(&mut self) {
        self.resize((self.slots.len() * 2).max(INITIAL_SLOTS));
    }

    /// Moves every entry into `slots` new slots, placed again by its stored
    /// hash without its block being read.
    fn resize(&mut self, slots: usize) {
        let old = std::mem::replace(&mut self.slots, (0..slots).map(|_| None).collect());
        for entry in old.into_iter().flatten() {
            self.place(entry);
        }
    }

    /// Takes the entry out of `slot` and closes the gap: each following entry
    /// of the run that may sit earlier (its home is not after the gap) moves
    /// back, so every entry stays reachable from its home without a tombstone.
    pub fn remove(&mut self, slot: usize) -> Option<Entry> {
        let removed = self.slots.get_mut(slot)?.take()?;
        self.len -= 1;
        let mask = self.mask();
        let mut gap = slot;
        let mut next = (gap + 1) & mask;
        while let Some(entry) = &self.slots[next] {
            let from_home = next.wrapping_sub(self.home(entry.hash)) & mask;
            let from_gap = next.wrapping_sub(gap) & mask;
            if from_home >= from_gap {
                self.slots[gap] = self.slots[next].take();
                gap = next;
            }
            next = (next + 1) & mask;
        }
        Some(removed)
    }

    /// When the entries would fit a quarter of the slots, moves them to a
    /// table that can still take twice as many before it grows: the memory
    /// of keys gone, by a mass expiry or one [`Table::remove`] at a time, is
    /// given back, and a table never swings between growing and shrinking.
    /// True when the slots moved (a [`SlotHint`] of the table is then stale).
    pub fn shrink_if_sparse(&mut self) -> bool {
        let fit = slots_for(2 * self.len);
        if fit > self.slots.len() / 4 {
            return false;
        }
        self.resize(fit);
        true
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> + Clone {
        self.slots.iter().flatten()
    }

    /// The entries, to change anything but their hash.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Entry> {
        self.slots.iter_mut().flatten()
    }

    /// Keeps the entries `keep` accepts (it may change them, not their hash)
    /// and hands the others to `removed`, in one pass over the slots and a
    /// second one only when something went: every remaining entry is placed
    /// again from its home, which lands it at or before where it was. Cheaper
    /// than closing each gap as it opens when much goes.
    ///
    /// When so much went that the rest would fit a quarter of the slots (a
    /// mass expiry), they move to a smaller table instead (see
    /// [`Table::shrink_if_sparse`]). Returns true when the slots moved.
    pub fn retain(
        &mut self,
        mut keep: impl FnMut(&mut Entry) -> bool,
        mut removed: impl FnMut(Entry),
    ) -> bool {
        // A slot free before anything goes: no run of entries crosses it, so
        // starting just after it each entry's home is at or before it, and it
        // is placed again once, after every entry before it in its run.
        let Some(free) = self.slots.iter().position(Option::is_none) else {
            return false;
        };
        let before = self.len;
        for slot in &mut self.slots {
            if slot.as_mut().is_some_and(|entry| !keep(entry))
                && let Some(entry) = slot.take()
            {
                self.len -= 1;
                removed(entry);
            }
        }
        if self.len == before {
            return false;
        }
        if self.shrink_if_sparse() {
            return true;
        }
        let mask = self.mask();
        for offset in 1..self.slots.len() {
            let i = (free + offset) & mask;
            if let Some(entry) = self.slots[i].take() {
                self.place(entry);
            }
        }
        false
    }
}

/// The fewest slots (none, or a power of two from [`INITIAL_SLOTS`]) that
/// hold `entries` within the load limit.
fn slots_for(entries: usize) -> usize {
    if entries == 0 {
        return 0;
    }
    let mut slots = INITIAL_SLOTS;
    while entries * MAX_LOAD_DEN > slots * MAX_LOAD_NUM {
        slots *= 2;
    }
    slots
}

/// Where a table's slots are, readable without its shard's lock, so the
/// index can prefetch a key's home slot a few events before it needs it. A
/// table that grows in between only makes that prefetch useless.
#[derive(Default)]
pub struct SlotHint {
    base: AtomicUsize,
    mask: AtomicUsize,
}

impl SlotHint {
    /// Called with the shard locked, after the slots moved: only then, since
    /// other cores read the hint on every event.
    pub fn update(&self, table: &Table) {
        let base = if table.slots.is_empty() {
            0
        } else {
            table.slots.as_ptr() as usize
        };
        self.base.store(base, Ordering::Relaxed);
        self.mask.store(table.mask(), Ordering::Relaxed);
    }

    /// Starts loading the home slot of `hash` into the cache.
    pub fn prefetch(&self, hash: u64) {
        let base = self.base.load(Ordering::Relaxed);
        let mask = self.mask.load(Ordering::Relaxed);
        if base != 0 {
            prefetch(base.wrapping_add((hash as usize & mask) * size_of::<Option<Entry>>()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn entry(hash: u64, name: &str) -> Entry {
        let event = Event {
            host: Some(name.into()),
            ..Event::default()
        };
        Entry {
            hash,
            deadline: 0,
            packed: Packed::new(&event, 0),
        }
    }

    /// A well-spread hash of `i`.
    fn spread(i: u64) -> u64 {
        i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// A table of `n` entries, the `i`th named `i` with hash `spread(i)`.
    fn numbered(n: u64) -> Table {
        let mut table = Table::default();
        for i in 0..n {
            table.insert_new(entry(spread(i), &i.to_string()));
        }
        table
    }

    fn find(table: &Table, hash: u64, name: &str) -> Option<usize> {
        table.find(hash, |e| e.packed.host() == name)
    }

    /// Every entry reachable from its home: no gap between them.
    fn assert_reachable(table: &Table) {
        for entry in table.iter() {
            let slot = find(table, entry.hash, entry.packed.host()).expect("reachable");
            assert_eq!(table.get(slot).map(|e| e.hash), Some(entry.hash));
        }
    }

    #[test]
    fn colliding_hashes_are_told_apart_by_key() {
        let mut table = Table::default();
        table.insert_new(entry(7, "a"));
        table.insert_new(entry(7, "b"));
        table.insert_new(entry(7 + 16, "c"));
        assert_eq!(table.len(), 3);
        let a = find(&table, 7, "a").unwrap();
        let b = find(&table, 7, "b").unwrap();
        assert_ne!(a, b);
        assert_eq!(table.get(b).unwrap().packed.host(), "b");
        assert_eq!(find(&table, 7, "c"), None, "same slot run, other hash");
        assert!(find(&table, 23, "c").is_some());
    }

    #[test]
    fn removal_keeps_the_rest_of_a_run_reachable_across_the_wrap() {
        let mut table = Table::default();
        // Homes 14 and 15 of 16 slots: the run wraps to slots 0 and 1.
        for (hash, name) in [(14, "a"), (15, "b"), (14, "c"), (15, "d"), (1, "e")] {
            table.insert_new(entry(hash, name));
        }
        let a = find(&table, 14, "a").unwrap();
        assert_eq!(table.remove(a).unwrap().packed.host(), "a");
        assert_eq!(find(&table, 14, "a"), None);
        assert_reachable(&table);
        assert_eq!(table.len(), 4);
        assert!(table.remove(a + 100).is_none());
    }

    #[test]
    fn growing_keeps_every_entry() {
        let table = numbered(1000);
        assert_eq!(table.len(), 1000);
        assert!(table.slots.len() * MAX_LOAD_NUM >= 1000 * MAX_LOAD_DEN);
        assert_reachable(&table);
    }

    #[test]
    fn retain_hands_out_the_rest_and_leaves_the_kept_reachable() {
        let mut table = Table::default();
        // Few distinct homes: long runs that wrap, so placing again matters.
        for i in 0..40u64 {
            table.insert_new(entry(i % 5 + 60, &i.to_string()));
        }
        let mut removed = Vec::new();
        table.retain(
            |e| e.packed.host().parse::<u64>().unwrap() % 3 != 0,
            |e| removed.push(e.packed.host().to_string()),
        );
        assert_eq!(removed.len(), 14);
        assert_eq!(table.len(), 26);
        assert_reachable(&table);
        for i in (0..40u64).filter(|i| i % 3 == 0) {
            assert_eq!(find(&table, i % 5 + 60, &i.to_string()), None);
        }
    }

    #[test]
    fn a_retain_that_leaves_little_gives_the_slots_back() {
        let mut table = numbered(10_000);
        let full = table.slots.len();
        let some_gone = |e: &mut Entry| e.packed.host().parse::<u64>().unwrap() % 4 != 0;
        assert!(!table.retain(some_gone, drop), "a quarter went: no move");
        assert_eq!(table.slots.len(), full);

        let few = |e: &mut Entry| e.packed.host().parse::<u64>().unwrap() < 100;
        assert!(table.retain(few, drop), "the slots moved");
        assert_eq!(table.len(), 75);
        assert_eq!(table.slots.len(), 256, "room for twice the 75 left");
        assert_reachable(&table);
        for i in (0..100u64).filter(|i| i % 4 != 0) {
            assert!(find(&table, spread(i), &i.to_string()).is_some(), "{i}");
        }

        assert!(table.retain(|_| false, drop));
        assert_eq!((table.len(), table.slots.len()), (0, 0));
        assert!(find(&table, spread(1), "1").is_none());
        table.insert_new(entry(spread(1), "1"));
        assert!(find(&table, spread(1), "1").is_some());
    }

    #[test]
    fn a_table_emptied_one_removal_at_a_time_gives_the_slots_back() {
        let mut table = numbered(10_000);
        assert_eq!(table.slots.len(), 16_384);
        let mut sizes = Vec::new();
        for i in 100..10_000u64 {
            let slot = find(&table, spread(i), &i.to_string()).unwrap();
            table.remove(slot).unwrap();
            if table.shrink_if_sparse() {
                sizes.push((table.len(), table.slots.len()));
            }
        }
        // Each time the rest fit a quarter of the slots: room for twice them.
        assert_eq!(sizes, [(1_536, 4_096), (384, 1_024)]);
        assert_eq!(table.len(), 100);
        assert_reachable(&table);
        for i in 0..100u64 {
            assert!(find(&table, spread(i), &i.to_string()).is_some(), "{i}");
        }
        // Growing back needs twice the entries left: no swinging.
        let slots = table.slots.len();
        for i in 100..200u64 {
            table.insert_new(entry(spread(i), &i.to_string()));
        }
        assert_eq!(table.slots.len(), slots);
    }

    /// Random inserts, removals and retains with few distinct homes, checked
    /// against a `HashMap` after every step.
    #[test]
    fn agrees_with_a_map_under_random_operations() {
        let mut table = Table::default();
        let mut model = std::collections::HashMap::new();
        let mut next = crate::test_rng::xorshift(0x2545_F491_4F6C_DD1D);
        for step in 0..3000 {
            let key = next() % 300;
            // Many keys per hash, homes at both ends of the table: runs that
            // wrap around into runs from the start.
            let hash = if key.is_multiple_of(2) {
                u64::MAX - key % 5
            } else {
                key % 5 * 3
            };
            let name = key.to_string();
            match next() % 10 {
                0..=5 if find(&table, hash, &name).is_none() => {
                    table.insert_new(entry(hash, &name));
                    model.insert(key, hash);
                }
                6..=8 => {
                    if let Some(slot) = find(&table, hash, &name) {
                        table.remove(slot);
                        assert!(model.remove(&key).is_some());
                    }
                }
                9 => {
                    let salt = next();
                    table.retain(
                        |e| !(e.packed.host().parse::<u64>().unwrap() ^ salt).is_multiple_of(4),
                        |e| assert!(model.remove(&e.packed.host().parse().unwrap()).is_some()),
                    );
                }
                _ => {}
            }
            assert_eq!(table.len(), model.len());
            for (key, hash) in &model {
                assert!(
                    find(&table, *hash, &key.to_string()).is_some(),
                    "step {step}: {key} lost"
                );
            }
        }
    }

    #[test]
    fn the_hint_points_at_the_home_slot() {
        let mut table = Table::default();
        let hint = SlotHint::default();
        hint.update(&table);
        assert_eq!(
            hint.base.load(Ordering::Relaxed),
            0,
            "no slots: no prefetch"
        );
        hint.prefetch(3);
        assert!(
            table.insert_new(entry(3, "a")),
            "the first slots are allocated"
        );
        assert!(!table.insert_new(entry(4, "b")));
        hint.update(&table);
        let base = table.slots.as_ptr() as usize;
        assert_eq!(hint.base.load(Ordering::Relaxed), base);
        assert_eq!(hint.mask.load(Ordering::Relaxed), 15);
        assert_eq!(size_of::<Option<Entry>>(), 32, "two slots to a cache line");
        hint.prefetch(u64::MAX);
    }
}
