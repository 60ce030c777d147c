//! Stages that remember: `rate`, `by`, `throttle`, `changed`, `counter`,
//! `runs`, `stable`, `ewma`, `ddt`. Each keeps its state behind its own lock; timers run on arrival time
//! (the injected clock), except `ddt` and `ewma(halflife)`, which measure the
//! gaps between the events' own times.
//!
//! On reload a stage takes over its predecessor's state when its kind and
//! parameters are unchanged ([`Node::adopt`]).

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};

use hashbrown::hash_table::Entry;
use hashbrown::{DefaultHashBuilder, HashTable};
use parking_lot::Mutex;

use crate::clock::{Micros, secs_to_micros};
use crate::event::{Event, Metric};
use crate::index::MAX_TIME_AHEAD;

use super::numbers::Sum;
use super::saved::{LIFETIME_UNSAVED, RestoreError, Restorer, Saved, Saver};
use super::{Children, Cx, Field, Node, as_secs, metric_f64, same, take_over};

/// How many intervals that ended between two ticks (a `dt` shorter than the
/// tick's) a timer catches up on, one event each, before skipping ahead. A
/// stall is caught up on by none ([`Cx::stalled`]).
pub(super) const MAX_CATCH_UP: u32 = 16;

/// `rate(dt)`: the sum of metrics per second over each `dt`, emitted every `dt`
/// from the timer (0 when nothing arrived) until the latest event has expired,
/// with the latest event's fields and its TTL plus `dt`.
pub struct Rate {
    pub interval: Micros,
    pub children: Children,
    pub state: Mutex<RateState>,
}

#[derive(Default)]
pub struct RateState {
    sum: f64,
    /// The latest event: template for what is emitted, and its TTL bounds how
    /// long the rate keeps reporting.
    latest: Option<Event>,
    window_end: Micros,
    /// An event arrived in the current window: it is reported even if the
    /// series has expired by the time the window closes.
    pending: bool,
    /// Restored: the earliest end of the period after the saved one, a
    /// `dt` after the start. vigil's downtime is no silence of the series,
    /// and its periods are not reported (as 0, caught up at once). Set
    /// until the saved period is reported, which lives from then.
    resumed: Option<Micros>,
}

/// When a rate reports next: the end of its window, while it reports at all.
fn next_tick(s: &RateState) -> Option<Micros> {
    s.latest.is_some().then_some(s.window_end)
}

impl Rate {
    pub fn new(interval: Micros, children: Children) -> Self {
        Self {
            interval,
            children,
            state: Mutex::default(),
        }
    }

    /// The windows that closed by `cx.now`, as events to emit (the caller
    /// emits them after releasing the lock). Nearly every event finds none
    /// due: that is checked inline, without the call to close them.
    #[inline]
    fn due(&self, s: &mut RateState, cx: &Cx) -> Vec<Event> {
        if s.latest.is_some() && cx.now >= s.window_end {
            self.close_due(s, cx)
        } else {
            Vec::new()
        }
    }

    #[inline(never)]
    fn close_due(&self, s: &mut RateState, cx: &Cx) -> Vec<Event> {
        let mut due = Vec::new();
        let mut rounds = 0;
        while s.latest.is_some() && cx.now >= s.window_end {
            let latest = s.latest.as_ref().expect("checked above");
            let mut out = latest.clone();
            out.metric = Some(Metric::Float(s.sum / as_secs(self.interval)));
            out.time = s.window_end;
            let ttl = cx.index.ttl_secs(latest);
            // As Riemann does: the rate stays alive until the next one is due.
            let mut lives = ttl + as_secs(self.interval);
            let stalled = cx.stalled(s.window_end, self.interval);
            if s.resumed.is_some() || stalled {
                // The period before a restart or a stall, reported with its
                // true end, long past: it lives that long from now, as a
                // restored index entry does, not reaching the index already
                // expired (which paged `expired` for a series still alive).
                lives += as_secs(cx.now.saturating_sub(s.window_end));
            }
            out.ttl = Some(lives as f32);
            let expired = latest.time.saturating_add(secs_to_micros(ttl)) < s.window_end;
            let pending = std::mem::take(&mut s.pending);
            s.sum = 0.0;
            s.window_end = s.window_end.saturating_add(self.interval);
            if let Some(resumed) = s.resumed.take() {
                s.window_end = s.window_end.max(resumed);
            } else if stalled {
                // Reported once, then at its pace from now, as after a
                // restart: not a 0 for each period the process was stalled
                // (Riemann's timer runs each, back to back), as nothing
                // could come meanwhile.
                s.window_end = cx.now.saturating_add(self.interval);
            }
            if expired && !pending {
                // The series went silent (and this window got nothing): stop
                // reporting until it speaks again.
                s.latest = None;
                break;
            }
            due.push(out);
            rounds += 1;
            if rounds == MAX_CATCH_UP {
                s.window_end = cx.now.saturating_add(self.interval);
            }
        }
        due
    }

    fn emit(&self, due: Vec<Event>, cx: &mut Cx) {
        for event in &due {
            self.children.event(event, cx);
        }
    }
}

impl Node for Rate {
    fn event(&self, event: &Event, cx: &mut Cx) {
        // One lock per event: closing due windows and adding this one together.
        let (due, next) = {
            let mut s = self.state.lock();
            let due = self.due(&mut s, cx);
            if let Some(metric) = metric_f64(event) {
                if s.latest.is_none() {
                    s.window_end = cx.now.saturating_add(self.interval);
                }
                s.sum += metric;
                s.pending = true;
                // Reuses the previous template's allocations.
                let latest = s.latest.get_or_insert_default();
                latest.clone_from(event);
                // Its time only says when the series goes silent (the rate
                // is timed by its window): bounded as the index bounds it,
                // or a time far ahead would keep it reporting for ever.
                latest.time = latest.time.min(cx.now.saturating_add(MAX_TIME_AHEAD));
            }
            (due, next_tick(&s))
        };
        cx.schedule(next);
        self.emit(due, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        let (due, next) = {
            let mut s = self.state.lock();
            (self.due(&mut s, cx), next_tick(&s))
        };
        cx.schedule(next);
        self.emit(due, cx);
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Rate::new(self.interval, self.children.fresh()))
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) = same::<Rate>(old).filter(|o| o.interval == self.interval) {
            take_over(&self.state, &old.state);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let s = self.state.lock();
        let entry = Saved::Rate {
            sum: s.sum,
            latest: s.latest.clone(),
            window_end: s.window_end,
            pending: s.pending,
        };
        drop(s);
        out.push(entry);
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("rate")? {
            Saved::Rate {
                sum,
                mut latest,
                window_end,
                pending,
            } => {
                // Bounded as when it came, as the index bounds a restored
                // entry: a build before the bound saved its time as sent.
                if let Some(latest) = &mut latest {
                    let bound = from.started().saturating_add(MAX_TIME_AHEAD);
                    latest.time = latest.time.min(bound);
                }
                let resumed =
                    (latest.is_some()).then(|| from.started().saturating_add(self.interval));
                *self.state.lock() = RateState {
                    sum,
                    latest,
                    window_end: from.due_within(window_end, self.interval),
                    pending,
                    resumed,
                }
            }
            other => return Err(RestoreError::mismatch("rate", &other)),
        }
        self.children.restore(from)
    }
}

/// `by(fields…) { … }`: an independent copy of the children per distinct value
/// of the fields. Groups idle longer than `idle_after` (the longest duration
/// written in the block) or than their last event's TTL are freed — Riemann
/// never frees them.
///
/// The groups are spread over `BY_SHARDS` locks by their key's hash, so
/// connections whose events belong to different groups rarely wait on each
/// other; a group's events all go through one shard, in order. A `by` in a
/// `by` group has one: its events come one at a time, under the lock of the
/// outer group's shard.
pub struct By {
    /// Shared, as the prototype is, by the `by`s in an enclosing `by`'s groups.
    pub fields: Arc<[Field]>,
    /// What each group's stages are made from. It never holds state, so the
    /// `by`s in groups of an enclosing `by` share their block's.
    pub prototype: Arc<Children>,
    pub idle_after: Micros,
    definition: Arc<ByDefinition>,
    shards: Box<[Mutex<Shard>]>,
    /// Groups held, all shards together: bounded by `--max-index` as the
    /// index is, since each distinct key of a flood would make one.
    groups: AtomicUsize,
    /// Whether a refused group has been logged (once per `by`).
    warned: AtomicBool,
}

/// What a `by` (or `changed_state`) was compiled from: its statement's text
/// and the names of the file's outputs in order, to which its `Output`
/// stages refer by position. The same definition compiles to the same
/// stages, so a reload can hand the groups over as they are.
#[derive(Debug, PartialEq, Eq)]
pub struct ByDefinition {
    pub text: Box<str>,
    pub outputs: Arc<[String]>,
}

/// One seed for every `by` of the process: a group's stored hash stays
/// valid when a reload hands the group to the next rules' `by`. Random per
/// process, so a client cannot choose keys that collide.
static GROUP_HASHER: LazyLock<DefaultHashBuilder> = LazyLock::new(DefaultHashBuilder::default);

/// Locks a `by`'s groups are spread over. `changed_state` puts every event
/// through a `by`; more shards than cores gain nothing.
pub const BY_SHARDS: usize = 8;

/// The fields' values. Shared, like the group's stages, so saving the state
/// copies pointers under the lock and walks the groups after releasing it.
type GroupKey = Arc<[Option<String>]>;

/// One lock's share of a `by`'s groups, and when each next needs the timer.
#[derive(Default)]
struct Shard {
    groups: HashTable<Group>,
    /// Earliest first: (when, group id, group hash). A group has an entry at
    /// its `queued` time; entries it left behind (its time moved, or it was
    /// freed) are passed over when they come up. So a tick visits only the
    /// groups whose time has come, not every group of the `by`.
    due: BinaryHeap<Reverse<(Micros, u64, u64)>>,
    next_id: u64,
}

/// Queue entries a tick takes while holding a shard's lock: events of that
/// shard's groups wait at most this many groups' ticks, however many are due.
/// Fewer in unit tests, so that their few groups take several holds.
const VISITS_PER_LOCK: usize = if cfg!(test) { 16 } else { 256 };

impl Shard {
    /// A group brought over with state (a restore, an edited `by`).
    fn add(&mut self, mut group: Group) {
        group.id = Self::new_id(&mut self.next_id);
        group.queued = Micros::MAX;
        let hash = group.hash;
        let group = self
            .groups
            .insert_unique(hash, group, |g| g.hash)
            .into_mut();
        Self::queue(&mut self.due, group);
    }

    /// Takes the next group id (a field, so the table may stay borrowed).
    fn new_id(next_id: &mut u64) -> u64 {
        *next_id += 1;
        *next_id
    }

    /// Gives `group` an entry at its time if it has none that early. An
    /// event moves a group's freeing later without one: the entry it has
    /// comes up early and is moved then.
    fn queue(due: &mut BinaryHeap<Reverse<(Micros, u64, u64)>>, group: &mut Group) {
        let at = group.due();
        if at < group.queued {
            group.queued = at;
            due.push(Reverse((at, group.id, group.hash)));
        }
    }

    /// Drops the entries groups left behind once they outnumber the groups:
    /// a client whose events keep bringing a group's time forward (a TTL
    /// shorter each time) would otherwise grow the queue with every event.
    fn compact(&mut self) {
        if self.due.len() > 2 * self.groups.len() + 64 {
            self.due = self
                .groups
                .iter()
                .map(|g| Reverse((g.queued, g.id, g.hash)))
                .collect();
        }
    }
}

pub struct Group {
    key: GroupKey,
    hash: u64,
    /// Tells the group from another of the same hash in the shard's queue.
    id: u64,
    /// The time of its earliest entry in the shard's queue; never later
    /// than [`Group::due`].
    queued: Micros,
    children: Arc<Children>,
    /// When the group may be freed if no event comes first.
    free_at: Micros,
    /// How long it lives after an event: the event's TTL, or the block's
    /// longest duration if that is longer.
    lifetime: Micros,
    /// When a stage of the group next needs the timer ([`Cx::schedule`]);
    /// `Micros::MAX` when none does, e.g. in `changed_state`.
    next_tick: Micros,
}

impl Group {
    /// When the timer next has something to do with the group: tick a
    /// stage, or free it.
    fn due(&self) -> Micros {
        self.next_tick.min(self.free_at.saturating_add(1))
    }
}

impl By {
    pub fn new(
        fields: Vec<Field>,
        prototype: Children,
        idle_after: Micros,
        definition: Arc<ByDefinition>,
    ) -> Self {
        Self::with_shards(
            fields.into(),
            Arc::new(prototype),
            idle_after,
            definition,
            BY_SHARDS,
        )
    }

    fn with_shards(
        fields: Arc<[Field]>,
        prototype: Arc<Children>,
        idle_after: Micros,
        definition: Arc<ByDefinition>,
        shards: usize,
    ) -> Self {
        Self {
            fields,
            prototype,
            idle_after,
            definition,
            shards: (0..shards).map(|_| Mutex::default()).collect(),
            groups: AtomicUsize::new(0),
            warned: AtomicBool::new(false),
        }
    }

    /// Room for one more group within `max` (none: unbounded), taken.
    fn reserve_group(&self, max: Option<usize>) -> bool {
        let Some(max) = max else {
            self.groups.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        let more = |n: usize| (n < max).then_some(n + 1);
        (self
            .groups
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, more))
        .is_ok()
    }

    /// An event whose group could not be made: counted, and logged once.
    fn refuse(&self, cx: &Cx) {
        cx.stats.by_refused.fetch_add(1, Ordering::Relaxed);
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                fields = ?self.fields,
                max = ?cx.index.max_entries(),
                "A `by` holds --max-index groups; events of new keys are not run through it \
                 (counted in vigil_rules_by_refused_total)."
            );
        }
    }

    /// The same for a key's values whether they come from an event (as
    /// `Option<Cow<str>>`) or from a group (as `Option<&str>`): both hash as
    /// the text.
    fn hash(&self, values: impl Iterator<Item = Option<impl Hash>>) -> u64 {
        let mut hasher = GROUP_HASHER.build_hasher();
        for value in values {
            value.hash(&mut hasher);
        }
        hasher.finish()
    }

    fn shard(&self, hash: u64) -> &Mutex<Shard> {
        // The table uses the hash's low bits and its top seven as tags; the
        // shard takes bits of the middle.
        &self.shards[(hash >> 32) as usize % self.shards.len()]
    }

    fn insert(&self, key: GroupKey, free_at: Micros, lifetime: Micros, children: Children) {
        self.groups.fetch_add(1, Ordering::Relaxed);
        let hash = self.hash(key.iter().map(Option::as_deref));
        self.shard(hash).lock().add(Group {
            key,
            hash,
            id: 0,
            queued: Micros::MAX,
            children: Arc::new(children),
            free_at,
            lifetime,
            // Brought over with state: its first tick says what is due.
            next_tick: Micros::MIN,
        });
    }

    /// Visits `shard`'s groups whose time has come at `cx.now`, a few at a
    /// time under its lock: ticks those with a stage due, frees those idle
    /// past their time. Returns the shard's earliest time and how many
    /// groups it freed.
    fn tick_shard(&self, shard: &Mutex<Shard>, cx: &mut Cx) -> (Micros, usize) {
        let now = cx.now;
        let mut freed = 0;
        // Groups whose stages asked for a time already past: queued after
        // this tick, which visits each group once.
        let mut overdue = Vec::new();
        loop {
            let mut shard = shard.lock();
            let Shard { groups, due, .. } = &mut *shard;
            let mut visits = 0;
            while let Some(&Reverse((at, id, hash))) = due.peek()
                && at <= now
            {
                if visits == VISITS_PER_LOCK {
                    break;
                }
                visits += 1;
                due.pop();
                let Ok(mut entry) = groups.find_entry(hash, |g| g.id == id) else {
                    continue;
                };
                let group = entry.get_mut();
                if group.queued != at {
                    continue;
                }
                // Before freeing: a group's last window may be due on this very tick.
                if group.next_tick <= now {
                    group.next_tick = cx.scheduled(|cx| group.children.tick(cx));
                }
                if group.free_at < now {
                    entry.remove();
                    freed += 1;
                    continue;
                }
                // Freeing is due too: a virtual clock that skipped it would
                // tick the group's stages past the time the server's timer
                // frees them.
                group.queued = Micros::MAX;
                if group.due() <= now {
                    group.queued = group.due();
                    overdue.push(Reverse((group.queued, id, hash)));
                } else {
                    Shard::queue(due, group);
                }
            }
            if visits < VISITS_PER_LOCK {
                shard.due.extend(overdue);
                shard.compact();
                let earliest = shard.due.peek().map_or(Micros::MAX, |Reverse(e)| e.0);
                return (earliest, freed);
            }
        }
    }
}

impl Node for By {
    fn event(&self, event: &Event, cx: &mut Cx) {
        // Borrowed: a group that exists costs no copy of its key.
        let value = |f: &Field| f.text_ref(event);
        let hash = self.hash(self.fields.iter().map(value));
        let lifetime = secs_to_micros(cx.index.ttl_secs(event)).max(self.idle_after);
        let free_at = cx.now.saturating_add(lifetime);
        let mut locked = self.shard(hash).lock();
        let shard = &mut *locked;
        let same_key = |g: &Group| {
            g.hash == hash
                && g.key
                    .iter()
                    .zip(self.fields.iter())
                    .all(|(stored, f)| stored.as_deref() == value(f).as_deref())
        };
        let group = match shard.groups.entry(hash, same_key, |g| g.hash) {
            Entry::Occupied(group) => group.into_mut(),
            Entry::Vacant(_) if !self.reserve_group(cx.index.max_entries()) => {
                drop(locked);
                return self.refuse(cx);
            }
            Entry::Vacant(vacant) => vacant
                .insert(Group {
                    key: self.fields.iter().map(|f| f.text(event)).collect(),
                    hash,
                    id: Shard::new_id(&mut shard.next_id),
                    queued: Micros::MAX,
                    children: Arc::new(self.prototype.fresh()),
                    free_at,
                    lifetime,
                    next_tick: Micros::MAX,
                })
                .into_mut(),
        };
        group.free_at = free_at;
        group.lifetime = lifetime;
        // The shard's lock is held while the group runs so each group sees its
        // events in order.
        let due = cx.scheduled(|cx| group.children.event(event, cx));
        group.next_tick = group.next_tick.min(due);
        Shard::queue(&mut shard.due, group);
        // An enclosing `by` must tick this group's group too.
        cx.schedule(Some(group.next_tick));
        shard.compact();
    }

    /// Visits only the groups whose time has come, from each shard's queue:
    /// a window or rate of each series is due once per its interval, nothing
    /// in `changed_state` ever is, and a pass over all the groups of a `by`
    /// of many series under its locks stalled their events on every tick.
    fn tick(&self, cx: &mut Cx) {
        let mut earliest = Micros::MAX;
        let mut freed = 0;
        for shard in &self.shards {
            let (shard_earliest, shard_freed) = self.tick_shard(shard, cx);
            earliest = earliest.min(shard_earliest);
            freed += shard_freed;
        }
        self.groups.fetch_sub(freed, Ordering::Relaxed);
        cx.schedule(Some(earliest));
    }

    /// A copy for a group of an enclosing `by`: one shard, as every event
    /// reaching it holds the lock of that group's shard already. Eight
    /// cost ~500 bytes more a group of `by(host) { changed_state }`.
    fn fresh(&self) -> Box<dyn Node> {
        Box::new(By::with_shards(
            self.fields.clone(),
            self.prototype.clone(),
            self.idle_after,
            self.definition.clone(),
            1,
        ))
    }

    /// An unchanged definition hands the groups over as they are, a few
    /// pointers per shard however many groups there are. After an edit
    /// inside the block, each group is rebuilt from the new prototype and
    /// adopts its old copy stage by stage, so the groups and the state of the
    /// unchanged stages in them are kept.
    fn adopt(&self, old: &dyn Node) {
        let Some(old) = same::<By>(old).filter(|o| o.fields == self.fields) else {
            return;
        };
        if old.definition == self.definition && old.shards.len() == self.shards.len() {
            for (new, old) in self.shards.iter().zip(&old.shards) {
                take_over(new, old);
            }
            let held = old.groups.swap(0, Ordering::Relaxed);
            self.groups.store(held, Ordering::Relaxed);
            return;
        }
        for shard in &old.shards {
            let mut shard = shard.lock();
            shard.due.clear();
            for old_group in shard.groups.drain() {
                let children = self.prototype.fresh();
                children.adopt(&old_group.children);
                self.insert(
                    old_group.key,
                    old_group.free_at,
                    old_group.lifetime,
                    children,
                );
            }
        }
        old.groups.store(0, Ordering::Relaxed);
    }

    /// The group count, then each group and its stages' entries; the
    /// prototype never holds state. A shard's lock is held only to list its
    /// groups: events keep flowing through them while their stages are saved
    /// one by one (each under its own lock), and a group freed meanwhile is
    /// saved anyway.
    fn save(&self, out: &mut dyn Saver) {
        let mut groups: Vec<(GroupKey, Micros, Micros, Arc<Children>)> = Vec::new();
        for shard in self.shards.iter() {
            // Listing a million groups takes a while too.
            if out.abandoned() {
                return;
            }
            let shard = shard.lock();
            let listed = shard.groups.iter();
            groups
                .extend(listed.map(|g| (g.key.clone(), g.free_at, g.lifetime, g.children.clone())));
        }
        out.push(Saved::By {
            groups: groups.len() as u64,
        });
        for (key, free_at, lifetime, children) in groups {
            if out.abandoned() {
                return;
            }
            out.push(Saved::Group {
                key: key.to_vec(),
                free_at,
                lifetime,
            });
            children.save(out);
        }
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        let groups = match from.next("by")? {
            Saved::By { groups } => groups,
            other => return Err(RestoreError::mismatch("by", &other)),
        };
        // Each group takes at least one entry: a count larger than the file
        // ends at its end, with an error.
        for _ in 0..groups {
            let (key, free_at, lifetime) = match from.next("group")? {
                Saved::Group {
                    key,
                    free_at,
                    lifetime,
                } => (key, free_at, lifetime),
                other => return Err(RestoreError::mismatch("group", &other)),
            };
            // Its key as this vigil writes it: a group of a metric of
            // -0.0 saved as "-0" is the group of the next -0.0.
            let key: GroupKey = (key.into_iter().enumerate())
                .map(|(i, value)| match self.fields.get(i) {
                    Some(field) => field.restored(value),
                    None => value,
                })
                .collect();
            let children = self.prototype.fresh();
            children.restore(from)?;
            // As the index does with its entries: the series could not
            // report while vigil was down, so its group lives one lifetime
            // from the start, not only what was left of it. Nor more: a
            // later time came from a clock that jumped back (or a file
            // vigil did not write), and kept the group, and its state, as
            // long. A lifetime of 0 counts too; a file of before lifetimes
            // were saved, which holds none, keeps its own free time.
            let (free_at, lifetime) = if lifetime == LIFETIME_UNSAVED {
                (free_at.max(from.started()), 0)
            } else {
                (from.started().saturating_add(lifetime), lifetime)
            };
            self.insert(key, free_at, lifetime, children);
        }
        Ok(())
    }
}

/// `throttle(n, dt)`: at most `n` events per `dt`; the rest are dropped.
pub struct Throttle {
    pub limit: u64,
    pub interval: Micros,
    pub children: Children,
    /// (window start, events passed in it)
    pub state: Mutex<(Micros, u64)>,
}

impl Throttle {
    pub fn new(limit: u64, interval: Micros, children: Children) -> Self {
        Self {
            limit,
            interval,
            children,
            state: Mutex::new((Micros::MIN, 0)),
        }
    }
}

impl Node for Throttle {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let pass = {
            let mut s = self.state.lock();
            if cx.now.saturating_sub(s.0) >= self.interval {
                *s = (cx.now, 0);
            }
            // Saturating: a restored count may be anything the file held.
            s.1 = s.1.saturating_add(1);
            s.1 <= self.limit
        };
        if pass {
            self.children.event(event, cx);
        }
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Throttle::new(
            self.limit,
            self.interval,
            self.children.fresh(),
        ))
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) =
            same::<Throttle>(old).filter(|o| (o.limit, o.interval) == (self.limit, self.interval))
        {
            take_over(&self.state, &old.state);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let (window_start, passed) = *self.state.lock();
        out.push(Saved::Throttle {
            window_start,
            passed,
        });
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("throttle")? {
            Saved::Throttle {
                window_start,
                passed,
            } => *self.state.lock() = (from.past(window_start), passed),
            other => return Err(RestoreError::mismatch("throttle", &other)),
        }
        self.children.restore(from)
    }
}

/// `changed(field)`: passes an event only when the field differs from the
/// previous event's (the first event passes unless its value is absent, as
/// Riemann's default `init` of nil). Wrap in `by` for per-series transitions.
pub struct Changed {
    pub field: Field,
    pub children: Children,
    pub last: Mutex<Option<String>>,
}

impl Changed {
    pub fn new(field: Field, children: Children) -> Self {
        Self {
            field,
            children,
            last: Mutex::default(),
        }
    }
}

impl Node for Changed {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let value = self.field.text_ref(event);
        let changed = {
            let mut last = self.last.lock();
            // Copied only on a change: most events repeat the last value.
            let changed = last.as_deref() != value.as_deref();
            if changed {
                *last = value.map(Cow::into_owned);
            }
            changed
        };
        if changed {
            self.children.event(event, cx);
        }
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Changed::new(self.field.clone(), self.children.fresh()))
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) = same::<Changed>(old).filter(|o| o.field == self.field) {
            take_over(&self.last, &old.last);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let last = self.last.lock().clone();
        out.push(Saved::Changed(last));
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("changed")? {
            Saved::Changed(last) => *self.last.lock() = self.field.restored(last),
            other => return Err(RestoreError::mismatch("changed", &other)),
        }
        self.children.restore(from)
    }
}

/// `counter([initial])`: a running sum of the metrics, passed on as each
/// event's metric (exact while they are integers, as `sum`'s); an event
/// tagged `reset` sets it to its own metric. Events without a metric pass
/// unchanged, as Riemann's. Wrap in `by` for a count per series.
pub struct Counter {
    pub initial: Metric,
    pub children: Children,
    pub count: Mutex<Sum>,
}

impl Counter {
    pub fn new(initial: Metric, children: Children) -> Self {
        Self {
            initial,
            children,
            count: Mutex::new(Sum::from(initial)),
        }
    }
}

impl Node for Counter {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let Some(metric) = event.metric else {
            return self.children.event(event, cx);
        };
        let count = {
            let mut count = self.count.lock();
            *count = if event.has_tag("reset") {
                Sum::from(metric)
            } else {
                count.add(metric)
            };
            count.metric()
        };
        let mut event = event.clone();
        event.metric = Some(count);
        self.children.event(&event, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Counter::new(self.initial, self.children.fresh()))
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) = same::<Counter>(old).filter(|o| o.initial == self.initial) {
            take_over(&self.count, &old.count);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let count = *self.count.lock();
        out.push(Saved::Counter(count));
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("counter")? {
            Saved::Counter(count) => *self.count.lock() = count,
            other => return Err(RestoreError::mismatch("counter", &other)),
        }
        self.children.restore(from)
    }
}

/// `runs(n[, field])`: passes an event once it and the `n - 1` before it
/// all had the same value of the field (default `state`), and each event
/// after it while the value holds: `runs(3, state)` passes the third
/// `critical` in a row and the ones after it. Events without the field make
/// a run of their own, as Riemann's nils do. It remembers the last value
/// and how long its run is, not the events.
pub struct Runs {
    pub length: u64,
    pub field: Field,
    pub children: Children,
    pub state: Mutex<RunState>,
}

#[derive(Default)]
pub struct RunState {
    /// The last event's value; `None` before the first event.
    value: Option<Option<String>>,
    /// Events in a row with that value, counted up to the run's length.
    seen: u64,
}

impl Runs {
    pub fn new(length: u64, field: Field, children: Children) -> Self {
        Self {
            length,
            field,
            children,
            state: Mutex::default(),
        }
    }
}

impl Node for Runs {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let value = self.field.text_ref(event);
        let pass = {
            let mut s = self.state.lock();
            let same = matches!(&s.value, Some(last) if last.as_deref() == value.as_deref());
            if same {
                s.seen = (s.seen + 1).min(self.length);
            } else {
                // Copied only on a change: a run repeats its value.
                s.value = Some(value.map(Cow::into_owned));
                s.seen = 1;
            }
            s.seen == self.length
        };
        if pass {
            self.children.event(event, cx);
        }
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Runs::new(
            self.length,
            self.field.clone(),
            self.children.fresh(),
        ))
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) =
            same::<Runs>(old).filter(|o| o.length == self.length && o.field == self.field)
        {
            take_over(&self.state, &old.state);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let s = self.state.lock();
        let entry = Saved::Runs {
            value: s.value.clone(),
            seen: s.seen,
        };
        drop(s);
        out.push(entry);
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("runs")? {
            Saved::Runs { value, seen } => {
                // The file is vigil's own, but a run is at most its length.
                let seen = seen.min(self.length);
                let value = value.map(|value| self.field.restored(value));
                *self.state.lock() = RunState { value, seen };
            }
            other => return Err(RestoreError::mismatch("runs", &other)),
        }
        self.children.restore(from)
    }
}

/// Most events `stable` holds while waiting for a value to settle; beyond it the
/// oldest are dropped, so a flapping flood cannot grow memory.
pub const STABLE_BUFFER_MAX: usize = 10_000;

/// `stable(dt[, field])`: passes events only once the field (default `state`)
/// has held the same value for `dt`, then releases everything held meanwhile.
pub struct Stable {
    pub interval: Micros,
    pub field: Field,
    pub children: Children,
    pub state: Mutex<StableState>,
}

#[derive(Default)]
pub struct StableState {
    value: Option<Option<String>>,
    since: Micros,
    held: Vec<Event>,
}

impl Stable {
    pub fn new(interval: Micros, field: Field, children: Children) -> Self {
        Self {
            interval,
            field,
            children,
            state: Mutex::default(),
        }
    }

    /// When held events are released if the value holds.
    fn next_tick(&self, s: &StableState) -> Option<Micros> {
        (!s.held.is_empty()).then(|| s.since.saturating_add(self.interval))
    }

    /// Releases the held events if the value has been stable long enough.
    fn release(&self, s: &mut StableState, now: Micros) -> Vec<Event> {
        if s.value.is_some() && now.saturating_sub(s.since) >= self.interval {
            std::mem::take(&mut s.held)
        } else {
            Vec::new()
        }
    }
}

impl Node for Stable {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let value = self.field.text(event);
        let (out, next) = {
            let mut s = self.state.lock();
            if s.value.as_ref() != Some(&value) {
                s.value = Some(value);
                s.since = cx.now;
                s.held.clear();
            }
            if s.held.len() == STABLE_BUFFER_MAX {
                s.held.remove(0);
            }
            s.held.push(event.clone());
            (self.release(&mut s, cx.now), self.next_tick(&s))
        };
        cx.schedule(next);
        for event in &out {
            self.children.event(event, cx);
        }
    }

    fn tick(&self, cx: &mut Cx) {
        let (out, next) = {
            let mut s = self.state.lock();
            (self.release(&mut s, cx.now), self.next_tick(&s))
        };
        cx.schedule(next);
        for event in &out {
            self.children.event(event, cx);
        }
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Stable::new(
            self.interval,
            self.field.clone(),
            self.children.fresh(),
        ))
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) =
            same::<Stable>(old).filter(|o| o.interval == self.interval && o.field == self.field)
        {
            take_over(&self.state, &old.state);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let s = self.state.lock();
        let entry = Saved::Stable {
            value: s.value.clone(),
            since: s.since,
            held: s.held.clone(),
        };
        drop(s);
        out.push(entry);
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("stable")? {
            Saved::Stable {
                value,
                since,
                mut held,
            } => {
                // The file is vigil's own, but its bound is this build's.
                held.drain(..held.len().saturating_sub(STABLE_BUFFER_MAX));
                let since = from.past(since);
                let value = value.map(|value| self.field.restored(value));
                *self.state.lock() = StableState { value, since, held };
            }
            other => return Err(RestoreError::mismatch("stable", &other)),
        }
        self.children.restore(from)
    }
}

/// `ewma(halflife)` weighs by the time between events (event time);
/// `ewma_timeless(r)` weighs each event by `r`. Both emit every event with the
/// smoothed metric; one with a NaN or infinite metric passes as it came,
/// left out of the average.
pub struct Ewma {
    pub mode: EwmaMode,
    pub children: Children,
    /// (smoothed value, time of the last event)
    pub state: Mutex<Option<(f64, Micros)>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EwmaMode {
    HalfLife(Micros),
    Timeless(f64),
}

impl Ewma {
    pub fn new(mode: EwmaMode, children: Children) -> Self {
        Self {
            mode,
            children,
            state: Mutex::default(),
        }
    }
}

impl Node for Ewma {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let Some(m) = metric_f64(event) else {
            return;
        };
        // Data, passed on, but kept out of the average: once in it, a NaN
        // or infinity would be every later value (Riemann's is), and an
        // ewma has no reset to end that.
        if !m.is_finite() {
            return self.children.event(event, cx);
        }
        let smoothed = {
            let mut s = self.state.lock();
            let next = match (*s, self.mode) {
                (None, _) => m,
                (Some((prev, _)), EwmaMode::Timeless(r)) => r * m + (1.0 - r) * prev,
                (Some((prev, at)), EwmaMode::HalfLife(half)) => {
                    let gap = as_secs(event.time.saturating_sub(at).max(0));
                    let weight = 1.0 - 0.5f64.powf(gap / as_secs(half));
                    weight * m + (1.0 - weight) * prev
                }
            };
            *s = Some((next, event.time));
            next
        };
        let mut event = event.clone();
        event.metric = Some(Metric::Float(smoothed));
        self.children.event(&event, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Ewma::new(self.mode, self.children.fresh()))
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) = same::<Ewma>(old).filter(|o| o.mode == self.mode) {
            take_over(&self.state, &old.state);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let state = *self.state.lock();
        out.push(Saved::Ewma(state));
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("ewma")? {
            // An earlier build let a NaN or infinity in, which it kept
            // for ever: the average starts again from the next metric. A
            // time ahead of the start weighed the next metric by nothing.
            Saved::Ewma(state) => {
                *self.state.lock() = state
                    .filter(|(avg, _)| avg.is_finite())
                    .map(|(avg, at)| (avg, from.past(at)));
            }
            other => return Err(RestoreError::mismatch("ewma", &other)),
        }
        self.children.restore(from)
    }
}

/// `ddt`: the rate of change per second between consecutive events (event
/// time), e.g. a counter turned into a rate. The first event only primes it.
/// As Riemann's, an event older than the one before it (UDP reordered them)
/// gives the slope back to it, and one of the same time nothing.
pub struct Ddt {
    pub children: Children,
    pub last: Mutex<Option<(f64, Micros)>>,
}

impl Ddt {
    pub fn new(children: Children) -> Self {
        Self {
            children,
            last: Mutex::default(),
        }
    }
}

impl Node for Ddt {
    fn event(&self, event: &Event, cx: &mut Cx) {
        let Some(m) = metric_f64(event) else {
            return;
        };
        let previous = self.last.lock().replace((m, event.time));
        let Some((prev, at)) = previous else {
            return;
        };
        let gap = as_secs(event.time.saturating_sub(at));
        if gap == 0.0 {
            return;
        }
        let mut event = event.clone();
        event.metric = Some(Metric::Float((m - prev) / gap));
        self.children.event(&event, cx);
    }

    fn tick(&self, cx: &mut Cx) {
        self.children.tick(cx);
    }

    fn fresh(&self) -> Box<dyn Node> {
        Box::new(Ddt::new(self.children.fresh()))
    }

    fn adopt(&self, old: &dyn Node) {
        if let Some(old) = same::<Ddt>(old) {
            take_over(&self.last, &old.last);
            self.children.adopt(&old.children);
        }
    }

    fn save(&self, out: &mut dyn Saver) {
        let last = *self.last.lock();
        out.push(Saved::Ddt(last));
        self.children.save(out);
    }

    fn restore(&self, from: &mut Restorer<'_>) -> Result<(), RestoreError> {
        match from.next("ddt")? {
            Saved::Ddt(last) => *self.last.lock() = last,
            other => return Err(RestoreError::mismatch("ddt", &other)),
        }
        self.children.restore(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::nodes::Scratch;
    use crate::rules::nodes::basic::Drop;

    /// A state file that passed its checksum may hold any count: at 2^64
    /// the next event overflowed it (a panic where overflow is checked, as
    /// in the fuzzer's build, which the engine's guard hides).
    #[test]
    fn a_throttles_count_restored_at_its_limit_drops_the_next_event() {
        let throttle = Throttle::new(1, 10, Children::default());
        let entry = Saved::Throttle {
            window_start: 0,
            passed: u64::MAX,
        };
        throttle
            .restore(&mut Restorer::from_entries(vec![entry], 0))
            .unwrap();
        throttle.event(&Event::default(), &mut Scratch::default().cx(0));
        assert_eq!(*throttle.state.lock(), (0, u64::MAX));
    }

    /// A `by` in a `by` group has one shard, an outer one eight; either
    /// keeps its groups apart.
    #[test]
    fn a_by_in_a_by_group_has_one_shard() {
        let src = "streams {\n by(host) { changed_state { drop } }\n}";
        let (_, compiled) =
            crate::rules::load("t.vigil", src, crate::rules::EnvPolicy::Lenient).unwrap();
        let outer = same::<By>(compiled.roots.0[0].as_ref()).unwrap();
        assert_eq!(outer.shards.len(), BY_SHARDS);
        let group = outer.prototype.fresh();
        let inner = same::<By>(group.0[0].as_ref()).unwrap();
        assert_eq!(inner.shards.len(), 1);
    }

    /// A client whose events bring its group's time forward every time (a
    /// shorter TTL each) queues an entry per event; the queue is rebuilt
    /// before it outgrows the groups by much.
    #[test]
    fn a_shards_queue_stays_near_its_groups_count() {
        let by = By::new(
            vec![Field::Host],
            Children(vec![Box::new(Drop {})]),
            0,
            Arc::new(ByDefinition {
                text: "by(host) { drop }".into(),
                outputs: Arc::new([]),
            }),
        );
        let mut scratch = Scratch::default();
        let mut cx = scratch.cx(1_000_000);
        for ttl in (1..=10_000).rev() {
            let event = Event {
                host: Some("a".into()),
                ttl: Some(ttl as f32),
                ..Event::default()
            };
            by.event(&event, &mut cx);
        }
        let queued: usize = by.shards.iter().map(|s| s.lock().due.len()).sum();
        assert!(queued <= 2 + 64, "{queued} entries for one group");
        // The group's entry is at its latest, shortest time: freed just after.
        cx.now += 1_000_000;
        by.tick(&mut cx);
        assert_eq!(by.groups.load(Ordering::Relaxed), 1);
        cx.now += 1;
        by.tick(&mut cx);
        assert_eq!(by.groups.load(Ordering::Relaxed), 0);
    }

    /// A state file of a vigil that wrote a metric of -0.0 as "-0" (before
    /// metrics compared as numbers, -0.0 as 0.0): restored, that value is
    /// 0's, so the next -0.0 is the same value to `changed`, `runs` and
    /// `stable`, and in the same group of a `by(metric)`, as it was before
    /// the restart.
    #[test]
    fn a_metric_saved_as_minus_zero_is_restored_as_zero() {
        let minus_zero = || Some("-0".to_owned());
        let event = Event {
            metric: Some(Metric::Float(-0.0)),
            state: Some("ok".into()),
            time: 2_000_000,
            ..Event::default()
        };
        let passed = |stage: &str, saved: Vec<Saved>| {
            let source = format!("streams {{\n  {stage}\n}}\n");
            let (_, compiled) =
                crate::rules::load("t.vigil", &source, crate::rules::EnvPolicy::Lenient)
                    .unwrap_or_else(|e| panic!("{stage}: {e}"));
            let roots = compiled.roots;
            roots
                .restore(&mut Restorer::from_entries(saved, 0))
                .unwrap_or_else(|e| panic!("{stage}: {e}"));
            let mut scratch = Scratch::default();
            roots.event(&event, &mut scratch.cx(2_000_000));
            scratch.reinjected.len()
        };
        let changed = vec![Saved::Changed(minus_zero())];
        let runs = vec![Saved::Runs {
            value: Some(minus_zero()),
            seen: 1,
        }];
        let stable = vec![Saved::Stable {
            value: Some(minus_zero()),
            since: 0,
            held: Vec::new(),
        }];
        let by = vec![
            Saved::By { groups: 1 },
            Saved::Group {
                key: vec![minus_zero()],
                free_at: Micros::MAX,
                lifetime: 60_000_000,
            },
            Saved::Changed(Some("ok".into())),
        ];
        let passed = [
            passed("changed(metric) { reinject }", changed),
            passed("runs(2, metric) { reinject }", runs),
            passed("stable(1s, metric) { reinject }", stable),
            passed("by(metric) { changed(state) { reinject } }", by),
        ];
        assert_eq!(passed, [0, 1, 1, 0], "changed, runs, stable, by");
    }
}
