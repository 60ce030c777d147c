//! The latest event of an index key packed into one heap block, with the
//! entry's slot in its shard's deadline set.
//!
//! An `Event` spreads over up to a dozen heap blocks (each string and list its
//! own) behind a 176-byte struct; a million of them cost ~475 bytes of RSS
//! apiece. Packed, an entry is a fixed header and its strings back to back in a
//! single boxed slice (~80 bytes for a typical agent event). Entries are
//! unpacked only on the way out: queries, snapshots and expiry notices, into
//! `Event`s whose allocations the caller may reuse.
//!
//! Layout (integers little-endian, lengths and counts LEB128):
//!
//! ```text
//! scheduled i64 | time i64 | metric 8 bytes | ttl f32 | flags u8
//! host | service | [state] | [description] | tags: n, n × str | attributes: n, n × (str, str)
//! ```
//!
//! `host` and `service` are always written (empty when absent, with a flag
//! telling absent from empty) so the key is found without parsing further.

use std::ops::Range;

use crate::clock::Micros;
use crate::event::{Event, Metric, STATE_EXPIRED, same_bytes};

const SCHEDULED: usize = 0;
const TIME: usize = 8;
const METRIC: usize = 16;
const TTL: usize = 24;
const FLAGS: usize = 28;
const HEADER: usize = 29;

const HAS_HOST: u8 = 1;
const HAS_SERVICE: u8 = 1 << 1;
const HAS_STATE: u8 = 1 << 2;
const HAS_DESCRIPTION: u8 = 1 << 3;
const HAS_TTL: u8 = 1 << 4;
const METRIC_INT: u8 = 1 << 5;
const METRIC_FLOAT: u8 = 1 << 6;

pub struct Packed(Box<[u8]>);

impl Packed {
    pub fn new(event: &Event, scheduled: Micros) -> Packed {
        let mut bytes = vec![0; packed_len(event)].into_boxed_slice();
        write_event(&mut bytes, event);
        let mut packed = Packed(bytes);
        packed.set_scheduled(scheduled);
        packed
    }

    /// Overwrites the stored event with `event`, which has the same key (the
    /// entry was found by it): header and what follows the key are rewritten,
    /// in place when they pack to the same length (an agent's next report
    /// usually does: same names, new numbers). The scheduled slot is kept.
    pub fn replace(&mut self, event: &Event) {
        debug_assert!(
            self.key() == (event.host_str().as_bytes(), event.service_str().as_bytes()),
            "replace keeps the key"
        );
        let key_end = self.key_end();
        write_header(&mut self.0, event);
        if !rewrite_after_key(&mut self.0, key_end, event) {
            let len = key_end + after_key_len(event);
            let mut bytes = vec![0; len].into_boxed_slice();
            bytes[..key_end].copy_from_slice(&self.0[..key_end]);
            self.0 = bytes;
            write_after_key(&mut self.0, key_end, event);
        }
    }

    /// Where the entry sits in its shard's deadline set.
    pub fn scheduled(&self) -> Micros {
        read_i64(&self.0, SCHEDULED)
    }

    pub fn set_scheduled(&mut self, at: Micros) {
        self.0[SCHEDULED..SCHEDULED + 8].copy_from_slice(&at.to_le_bytes());
    }

    /// The stored event's TTL, read without unpacking the rest.
    pub fn ttl(&self) -> Option<f32> {
        read_ttl(&self.0)
    }

    /// `(host, service)` as bytes; an absent field reads as empty, as in
    /// [`Event::host_str`].
    pub fn key(&self) -> (&[u8], &[u8]) {
        let mut r = Reader::at(&self.0, HEADER);
        (r.bytes(), r.bytes())
    }

    /// Whether the stored key is `(host, service)` (as [`Packed::key`]
    /// reads it). Names under 128 bytes, nearly all, have one-byte lengths:
    /// their encoding is compared where it lies, without reading the
    /// stored key's lengths first (callgrind, stop 50: 64 instructions per
    /// message in `key` on the 1-event path).
    #[inline]
    pub fn has_key(&self, host: &[u8], service: &[u8]) -> bool {
        let (h, s) = (host.len(), service.len());
        if h >= 0x80 || s >= 0x80 {
            let (held_host, held_service) = self.key();
            return same_bytes(held_service, service) && same_bytes(held_host, host);
        }
        // A stored length of 128 or more starts with a byte of 128 or more:
        // never equal to `h` or `s` then.
        let Some(stored) = self.0.get(HEADER..HEADER + 2 + h + s) else {
            return false;
        };
        stored[0] as usize == h
            && stored[1 + h] as usize == s
            && same_bytes(&stored[2 + h..], service)
            && same_bytes(&stored[1..1 + h], host)
    }

    /// Where what follows `(host, service)` starts.
    fn key_end(&self) -> usize {
        let mut r = Reader::at(&self.0, HEADER);
        r.span();
        r.span();
        r.pos
    }

    /// The stored event's host; empty when it has none.
    pub fn host(&self) -> &str {
        Reader::at(&self.0, HEADER).str()
    }

    /// The stored event's host and service; empty when it has none.
    pub fn host_service(&self) -> (&str, &str) {
        let mut r = Reader::at(&self.0, HEADER);
        (r.str(), r.str())
    }

    /// A copy of the stored event.
    pub fn to_event(&self) -> Event {
        let mut event = Event::default();
        self.unpack_into(&mut event);
        event
    }

    /// Overwrites `out` with the stored event, reusing its allocations.
    pub fn unpack_into(&self, out: &mut Event) {
        unpack(&self.0, out, None);
    }

    /// Overwrites `out` with the `expired` notice for the stored event (see
    /// [`Event::into_expired`]), reusing its allocations.
    pub fn unpack_expired_into(&self, now: Micros, out: &mut Event) {
        unpack(&self.0, out, Some(now));
    }

    /// See `warm` in the index.
    pub fn first_byte(&self) -> u8 {
        self.0[0]
    }
}

/// Packed blocks copied back to back: a scan copies a shard's blocks under
/// its lock (a `memcpy` each, into room made beforehand) and unpacks them
/// once the lock is released, so the lock is not held while strings are
/// copied out and allocated.
#[derive(Default)]
pub struct Copies {
    bytes: Vec<u8>,
    /// Where each block ends in `bytes`.
    ends: Vec<usize>,
}

impl Copies {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Appends a copy of `packed` if there is room for it without
    /// allocating; false (and nothing copied) otherwise.
    pub fn push(&mut self, packed: &Packed) -> bool {
        let fits = self.ends.len() < self.ends.capacity()
            && packed.0.len() <= self.bytes.capacity() - self.bytes.len();
        if fits {
            self.bytes.extend_from_slice(&packed.0);
            self.ends.push(self.bytes.len());
        }
        fits
    }

    /// Makes room for `blocks` blocks after a [`Copies::push`] found none,
    /// (the shard held `blocks`), and clears the copies. Their size is judged
    /// by the blocks copied so far, and when bytes ran out they at least
    /// double, so retrying always ends.
    pub fn grow_for(&mut self, blocks: usize) {
        let out_of_slots = self.ends.len() == self.ends.capacity();
        let average = self
            .bytes
            .len()
            .div_ceil(self.ends.len().max(1))
            .max(HEADER);
        // A quarter more: the shard may grow before it is locked again.
        let blocks = blocks + blocks / 4 + 1;
        let mut bytes = blocks * average;
        if !out_of_slots {
            bytes = bytes.max(2 * self.bytes.capacity());
        }
        self.clear();
        // More than the shard held, so more than the slots that ran out.
        self.ends.reserve(blocks);
        self.bytes.reserve(bytes);
    }

    /// Unpacks the copies, in order, into the first [`Copies::len`] events of
    /// `out`, reusing their allocations.
    pub fn unpack_into(&self, out: &mut [Event]) {
        let mut start = 0;
        for (&end, event) in self.ends.iter().zip(out) {
            unpack(&self.bytes[start..end], event, None);
            start = end;
        }
    }
}

/// A notice (`expired_at`) skips what [`Event::into_expired`] drops instead
/// of copying it out first.
fn unpack(block: &[u8], out: &mut Event, expired_at: Option<Micros>) {
    let flags = block[FLAGS];
    let mut r = Reader::at_checked(block, HEADER);
    set_opt(&mut out.host, r.str(), flags & HAS_HOST != 0);
    set_opt(&mut out.service, r.str(), flags & HAS_SERVICE != 0);
    // Read as text only if kept: a notice drops both.
    let state = (flags & HAS_STATE != 0).then(|| r.span());
    let description = (flags & HAS_DESCRIPTION != 0).then(|| r.span());
    read_tags(&mut r, &mut out.tags);
    read_attributes(&mut r, &mut out.attributes);
    out.ttl = read_ttl(block);
    if let Some(now) = expired_at {
        set_opt(&mut out.state, STATE_EXPIRED, true);
        out.time = now;
        out.description = None;
        out.metric = None;
        return;
    }
    for (slot, span) in [(&mut out.state, state), (&mut out.description, description)] {
        let text = span.map(|span| r.text(span));
        set_opt(slot, text.unwrap_or(""), text.is_some());
    }
    out.time = read_i64(block, TIME);
    out.metric = if flags & METRIC_INT != 0 {
        Some(Metric::Int(read_i64(block, METRIC)))
    } else if flags & METRIC_FLOAT != 0 {
        Some(Metric::Float(
            f64::from_bits(read_i64(block, METRIC) as u64),
        ))
    } else {
        None
    };
}

fn read_ttl(block: &[u8]) -> Option<f32> {
    (block[FLAGS] & HAS_TTL != 0).then(|| {
        let bits: [u8; 4] = block[TTL..TTL + 4].try_into().unwrap_or_default();
        f32::from_le_bytes(bits)
    })
}

fn read_i64(block: &[u8], at: usize) -> i64 {
    let bits: [u8; 8] = block[at..at + 8].try_into().unwrap_or_default();
    i64::from_le_bytes(bits)
}

fn packed_len(e: &Event) -> usize {
    HEADER + str_len(e.host_str()) + str_len(e.service_str()) + after_key_len(e)
}

fn after_key_len(e: &Event) -> usize {
    let opt = |s: &Option<String>| s.as_deref().map_or(0, str_len);
    opt(&e.state)
        + opt(&e.description)
        + varint_len(e.tags.len())
        + e.tags.iter().map(|t| str_len(t)).sum::<usize>()
        + varint_len(e.attributes.len())
        + e.attributes
            .iter()
            .map(|(k, v)| str_len(k) + str_len(v))
            .sum::<usize>()
}

fn str_len(s: &str) -> usize {
    varint_len(s.len()) + s.len()
}

fn varint_len(mut n: usize) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

/// Writes everything but the scheduled slot; `out` is exactly
/// `packed_len(e)` long.
fn write_event(out: &mut [u8], e: &Event) {
    write_header(out, e);
    let mut w = Writer {
        out: &mut *out,
        pos: HEADER,
    };
    w.str(e.host_str());
    w.str(e.service_str());
    let key_end = w.pos;
    write_after_key(out, key_end, e);
}

/// Time, metric, TTL and the flags.
fn write_header(out: &mut [u8], e: &Event) {
    let mut flags = 0;
    for (present, flag) in [
        (e.host.is_some(), HAS_HOST),
        (e.service.is_some(), HAS_SERVICE),
        (e.state.is_some(), HAS_STATE),
        (e.description.is_some(), HAS_DESCRIPTION),
        (e.ttl.is_some(), HAS_TTL),
    ] {
        if present {
            flags |= flag;
        }
    }
    let metric_bits = match e.metric {
        Some(Metric::Int(i)) => {
            flags |= METRIC_INT;
            i
        }
        Some(Metric::Float(f)) => {
            flags |= METRIC_FLOAT;
            f.to_bits() as i64
        }
        None => 0,
    };
    out[TIME..TIME + 8].copy_from_slice(&e.time.to_le_bytes());
    out[METRIC..METRIC + 8].copy_from_slice(&metric_bits.to_le_bytes());
    out[TTL..TTL + 4].copy_from_slice(&e.ttl.unwrap_or(0.0).to_le_bytes());
    out[FLAGS] = flags;
}

/// State, description, tags and attributes, from `pos` (the key's end) to
/// the end of `out`.
fn write_after_key(out: &mut [u8], pos: usize, e: &Event) {
    let mut w = Writer { out, pos };
    for s in [&e.state, &e.description].into_iter().flatten() {
        w.str(s);
    }
    w.varint(e.tags.len());
    for tag in &e.tags {
        w.str(tag);
    }
    w.varint(e.attributes.len());
    for (k, v) in &e.attributes {
        w.str(k);
        w.str(v);
    }
}

/// [`write_after_key`] into a block that may not be its size: false when it
/// is not (what follows the key is then partly written, and must be written
/// again into a block of the right size). A string the block already holds
/// where it goes is compared, not copied: an agent's next report mostly
/// repeats its state, tags and attributes, and the comparison is inline
/// where a copy was a call to `memcpy` (callgrind, stop 50).
fn rewrite_after_key(out: &mut [u8], pos: usize, e: &Event) -> bool {
    let mut w = Rewriter { out, pos };
    let written = (|| {
        for s in [&e.state, &e.description].into_iter().flatten() {
            w.str(s)?;
        }
        w.varint(e.tags.len())?;
        for tag in &e.tags {
            w.str(tag)?;
        }
        w.varint(e.attributes.len())?;
        for (k, v) in &e.attributes {
            w.str(k)?;
            w.str(v)?;
        }
        Some(())
    })();
    written.is_some() && w.pos == w.out.len()
}

/// A [`Writer`] that stops (`None`) at the end of its block.
struct Rewriter<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl Rewriter<'_> {
    #[inline(always)]
    fn varint(&mut self, mut n: usize) -> Option<()> {
        while n >= 0x80 {
            *self.out.get_mut(self.pos)? = (n as u8) | 0x80;
            self.pos += 1;
            n >>= 7;
        }
        *self.out.get_mut(self.pos)? = n as u8;
        self.pos += 1;
        Some(())
    }

    #[inline(always)]
    fn str(&mut self, s: &str) -> Option<()> {
        self.varint(s.len())?;
        let to = self.out.get_mut(self.pos..self.pos + s.len())?;
        if !same_bytes(to, s.as_bytes()) {
            to.copy_from_slice(s.as_bytes());
        }
        self.pos += s.len();
        Some(())
    }
}

struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn varint(&mut self, mut n: usize) {
        while n >= 0x80 {
            self.out[self.pos] = (n as u8) | 0x80;
            self.pos += 1;
            n >>= 7;
        }
        self.out[self.pos] = n as u8;
        self.pos += 1;
    }

    fn str(&mut self, s: &str) {
        self.varint(s.len());
        self.out[self.pos..self.pos + s.len()].copy_from_slice(s.as_bytes());
        self.pos += s.len();
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// `buf[pos..]` as text, when all of it is (see [`Reader::at_checked`]).
    checked: Option<(&'a str, usize)>,
}

impl<'a> Reader<'a> {
    fn at(buf: &'a [u8], pos: usize) -> Self {
        Reader {
            buf,
            pos,
            checked: None,
        }
    }

    /// For reading many strings: checks all the rest of the block as UTF-8
    /// at once (text whenever every length and count is below 128, a
    /// one-byte varint, which is ASCII), then slices strings out of it
    /// without checking each: one check of ~40 bytes costs less than four
    /// short ones, and unpacking is most of an expiry.
    fn at_checked(buf: &'a [u8], pos: usize) -> Self {
        let checked = std::str::from_utf8(&buf[pos..])
            .ok()
            .map(|text| (text, pos));
        Reader {
            checked,
            ..Self::at(buf, pos)
        }
    }

    fn varint(&mut self) -> usize {
        let mut n = 0;
        let mut shift = 0;
        loop {
            let byte = self.buf[self.pos];
            self.pos += 1;
            n |= usize::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return n;
            }
            shift += 7;
        }
    }

    /// Where the next length-prefixed field is, moving past it.
    fn span(&mut self) -> Range<usize> {
        let len = self.varint();
        let span = self.pos..self.pos + len;
        self.pos = span.end;
        span
    }

    fn bytes(&mut self) -> &'a [u8] {
        let span = self.span();
        &self.buf[span]
    }

    fn str(&mut self) -> &'a str {
        let span = self.span();
        self.text(span)
    }

    fn text(&self, span: Range<usize>) -> &'a str {
        match self.checked {
            // Each string is text on its own, so within text its ends are
            // character boundaries, and `get` always finds it.
            Some((text, base)) => text
                .get(span.start - base..span.end - base)
                .unwrap_or_default(),
            None => Self::utf8(&self.buf[span]),
        }
    }

    fn utf8(bytes: &[u8]) -> &str {
        // Only `write_event` fills these buffers, copying from `&str`s, so
        // the bytes are always UTF-8 and the fallback is never taken.
        std::str::from_utf8(bytes).unwrap_or_default()
    }
}

fn set_opt(slot: &mut Option<String>, value: &str, present: bool) {
    match (slot, present) {
        (Some(s), true) => {
            s.clear();
            s.push_str(value);
        }
        (slot @ None, true) => *slot = Some(value.to_owned()),
        (slot, false) => *slot = None,
    }
}

fn set_string(slot: &mut String, value: &str) {
    slot.clear();
    slot.push_str(value);
}

fn read_tags(r: &mut Reader<'_>, tags: &mut Vec<String>) {
    let n = r.varint();
    tags.truncate(n);
    let kept = tags.len();
    for tag in tags.iter_mut() {
        set_string(tag, r.str());
    }
    tags.extend((kept..n).map(|_| r.str().to_owned()));
}

fn read_attributes(r: &mut Reader<'_>, attributes: &mut Vec<(String, String)>) {
    let n = r.varint();
    attributes.truncate(n);
    let kept = attributes.len();
    for (k, v) in attributes.iter_mut() {
        set_string(k, r.str());
        set_string(v, r.str());
    }
    attributes.extend((kept..n).map(|_| (r.str().to_owned(), r.str().to_owned())));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Event {
        Event {
            host: Some("web-1".into()),
            service: Some("cpu user".into()),
            state: Some("warning".into()),
            time: 1_700_000_000_123_456,
            description: Some("ünïcode and a long ".repeat(20)),
            tags: vec!["a".into(), "".into(), "x".repeat(300)],
            metric: Some(Metric::Float(0.25)),
            ttl: Some(12.5),
            attributes: vec![("env".into(), "prod".into()), ("env".into(), "".into())],
        }
    }

    #[test]
    fn copies_take_blocks_only_into_room_made_beforehand() {
        // Growing blocks, then a huge one: the size judged from the ones
        // before it falls short, every time alike.
        let events: Vec<Event> = (0..40)
            .map(|i| Event {
                description: Some("d".repeat(if i < 39 { i * i } else { 100_000 })),
                ..full()
            })
            .collect();
        let blocks: Vec<Packed> = events.iter().map(|e| Packed::new(e, 0)).collect();
        let mut copies = Copies::default();
        assert!(!copies.push(&blocks[0]), "no room made yet");
        assert_eq!(copies.len(), 0);
        let mut tries = 1;
        while !blocks.iter().all(|b| copies.push(b)) {
            copies.grow_for(blocks.len());
            tries += 1;
            assert!(tries < 20, "room must grow until everything fits");
        }
        assert!(tries > 2, "the first guess fell short: {tries} tries");
        let mut out = vec![Event::default(); copies.len()];
        copies.unpack_into(&mut out);
        assert_eq!(out, events);
    }

    #[test]
    fn round_trips_every_field_and_every_absence() {
        let mut int = full();
        int.metric = Some(Metric::Int(-7));
        let short = Event {
            host: Some("hôst".into()),
            service: Some("ßervice ✓".into()),
            state: Some("ök".into()),
            description: Some("ü".into()),
            tags: vec!["é".into()],
            attributes: vec![("ключ".into(), "значение".into())],
            ..full()
        };
        let cases = [
            full(),
            short,
            int,
            Event::default(),
            Event {
                host: Some(String::new()),
                service: None,
                time: -1,
                ..Event::default()
            },
        ];
        for event in cases {
            let packed = Packed::new(&event, 42);
            assert_eq!(packed.to_event(), event);
            assert_eq!(packed.0.len(), packed_len(&event), "exactly sized");
            assert_eq!(packed.scheduled(), 42);
            // Strings are read out of one check of the whole block, except
            // when a length needs two varint bytes (`full`'s long ones).
            let long = event.description.as_ref().is_some_and(|d| d.len() >= 128);
            let checked_at_once = Reader::at_checked(&packed.0, HEADER).checked.is_some();
            assert_eq!(checked_at_once, !long, "{event:?}");
            assert_eq!(
                packed.key(),
                (event.host_str().as_bytes(), event.service_str().as_bytes())
            );
            assert_eq!(
                packed.host_service(),
                (event.host_str(), event.service_str())
            );
        }
    }

    #[test]
    fn unpack_reuses_a_bigger_or_smaller_event() {
        let packed = Packed::new(&full(), 0);
        let mut small = Event {
            tags: vec!["only".into()],
            ..Event::default()
        };
        packed.unpack_into(&mut small);
        assert_eq!(small, full());
        let mut out = full();
        out.tags.extend(["b".to_owned(), "c".to_owned()]);
        out.attributes.push(("k".into(), "v".into()));
        let bare = Packed::new(&Event::default(), 0);
        bare.unpack_into(&mut out);
        assert_eq!(out, Event::default());
    }

    #[test]
    fn replace_keeps_the_slot_in_place_or_regrown() {
        let mut packed = Packed::new(&full(), 10);
        packed.set_scheduled(5);
        let mut same_len = full();
        same_len.metric = Some(Metric::Float(9.0));
        same_len.time += 1;
        let block = packed.0.as_ptr();
        packed.replace(&same_len);
        assert_eq!(packed.0.as_ptr(), block, "same length: no new block");
        assert_eq!(packed.to_event(), same_len);
        let mut longer = full();
        longer.tags.push("new".into());
        packed.replace(&longer);
        assert_eq!(packed.to_event(), longer);
        let shorter = Event {
            state: None,
            description: None,
            tags: Vec::new(),
            ..full()
        };
        packed.replace(&shorter);
        assert_eq!(packed.to_event(), shorter);
        assert_eq!(packed.0.len(), packed_len(&shorter), "exactly sized");
        assert_eq!(packed.scheduled(), 5);
        // An absent host is the same key as an empty one; the flag follows.
        let mut empty_host = Packed::new(
            &Event {
                host: Some(String::new()),
                ..full()
            },
            1,
        );
        let no_host = Event {
            host: None,
            ..full()
        };
        empty_host.replace(&no_host);
        assert_eq!(empty_host.to_event(), no_host);
    }

    /// An entry whose event shrinks from a 1 MB description keeps no
    /// block of that size (the in-place rewrite must end at the block's
    /// end), and one that grows again gets a new block, not a write past
    /// its end.
    #[test]
    fn a_huge_event_replaced_by_a_small_one_leaves_a_small_block() {
        let huge = Event {
            description: Some("d".repeat(1 << 20)),
            ..full()
        };
        let small = Event {
            description: Some("d".into()),
            ..full()
        };
        let mut packed = Packed::new(&huge, 3);
        packed.replace(&small);
        assert_eq!(packed.0.len(), packed_len(&small));
        assert!(packed.0.len() < 1_000, "{} bytes kept", packed.0.len());
        assert_eq!(packed.to_event(), small);
        packed.replace(&huge);
        assert_eq!(packed.0.len(), packed_len(&huge));
        assert_eq!(packed.to_event(), huge);
        assert_eq!(packed.scheduled(), 3);
    }

    /// Whatever follows the key, of the same packed length as before or
    /// not, and split differently between state, tags and attributes, a
    /// replaced entry reads back as the new event, exactly sized.
    #[test]
    fn replace_rewrites_every_layout_of_what_follows_the_key() {
        let strings = [
            "",
            "a",
            "bc",
            "ok",
            "ab",
            "c",
            "collectd",
            "x".repeat(130).leak(),
        ];
        let mut next = crate::test_rng::xorshift(0x5851_f42d_4c95_7f2d);
        let mut packed = Packed::new(&full(), 7);
        for _ in 0..3000 {
            let mut r = (0..16).map(|_| next() as usize);
            let mut pick = |n: usize| r.next().expect("16 numbers") % n;
            let text =
                |pick: &mut dyn FnMut(usize) -> usize| strings[pick(strings.len())].to_string();
            let event = Event {
                state: (pick(3) > 0).then(|| text(&mut pick)),
                description: (pick(4) == 0).then(|| text(&mut pick)),
                tags: (0..pick(3)).map(|_| text(&mut pick)).collect(),
                attributes: (0..pick(3))
                    .map(|_| (text(&mut pick), text(&mut pick)))
                    .collect(),
                ..full()
            };
            packed.replace(&event);
            assert_eq!(packed.to_event(), event);
            assert_eq!(packed.0.len(), packed_len(&event), "exactly sized");
            assert_eq!(packed.scheduled(), 7);
        }
    }

    /// `has_key` answers as comparing with `key` does, for names on either
    /// side of a one-byte length, empty ones, and keys whose bytes run on
    /// into what follows (a shorter host, a service split differently).
    #[test]
    fn has_key_agrees_with_the_key_read_back() {
        let names: Vec<String> = ["", "a", "ab", "b", "bc", "c", "ok", "collectd"]
            .into_iter()
            .map(String::from)
            .chain([126, 127, 128, 129, 300].map(|n| "x".repeat(n)))
            .collect();
        for stored_host in &names {
            for stored_service in &names {
                let event = Event {
                    host: Some(stored_host.clone()),
                    service: Some(stored_service.clone()),
                    ..full()
                };
                let packed = Packed::new(&event, 0);
                for host in &names {
                    for service in &names {
                        let (h, s) = (host.as_bytes(), service.as_bytes());
                        assert_eq!(
                            packed.has_key(h, s),
                            packed.key() == (h, s),
                            "stored ({stored_host:.9}, {stored_service:.9}), asked ({host:.9}, {service:.9})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn expired_notice_matches_into_expired() {
        let packed = Packed::new(&full(), 0);
        let mut out = Event::default();
        packed.unpack_expired_into(99, &mut out);
        assert_eq!(out, full().into_expired(99));
    }
}
