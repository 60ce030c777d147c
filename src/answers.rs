//! The memory query answers may hold while their askers read them, one pool
//! shared by every transport (`--max-answer-memory`).
//!
//! `--max-query-results` bounds one answer and each connection reads its
//! answers one at a time (Riemann TCP) or a few streams at a time (HTTP/2,
//! gRPC); nothing else bounded them all together. An encoded answer is held
//! until its asker has read it, so 64 HTTP/2 streams each reading a 30 MB
//! answer at 1 KB/s held some 320 MB until the write timeout, and more
//! connections multiplied that. An answer over [`FREE`] bytes takes its size
//! from this pool as its events are found ([`Room::grow`]), keeps it while
//! encoded, and gives it back once written (or dropped, its asker gone).
//! One that does not fit is refused at once with [`Busy`], its scan stopped
//! and nothing encoded: taken only once encoded, a refused answer of 12 MB
//! had cost its whole scan and encoding first, and askers retrying while
//! the pool was full kept a core busy making answers to throw away. Nor is
//! one queued: a waiting answer would hold its memory all the same, and a
//! client told to retry soon is what a busy server owes it. Answers up to
//! [`FREE`] bytes take nothing, so a flood of large answers never refuses a
//! dashboard's small ones.
//!
//! An answer holding room must be taken whole within the write timeout
//! (`--read-timeout`), so the pool turns over: a client reading just fast
//! enough that no write stalls for the timeout would otherwise keep its
//! room for as long as it liked, and every other large answer be refused
//! as busy meanwhile. A Riemann TCP reply always had to be written within
//! it; HTTP and gRPC answers are dropped by [`crate::unread`] otherwise.
//!
//! Counted in KiB, as the message budget is ([`crate::budget`]); an answer
//! larger than the whole pool takes all of it, so any answer fits on an idle
//! server.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::stats::Stats;

/// An answer up to this many bytes takes nothing from the pool.
pub const FREE: usize = 64 * 1024;

/// An answer being built takes room this far ahead of what it has found,
/// so its scan asks the pool once per step rather than once per event.
const STEP: usize = FREE;

/// 256 MiB: eight answers of 100 000 (`--max-query-results`) events of a
/// few hundred bytes each, beside `--max-subscriber-memory`'s 256 MiB for
/// snapshots and live queues.
pub const DEFAULT_MAX: usize = 256 * 1024 * 1024;

const KIB: usize = 1024;

/// The pool; clones share it.
#[derive(Debug, Clone)]
pub struct Answers {
    semaphore: Arc<Semaphore>,
    kib: u32,
    stats: Arc<Stats>,
}

/// Why an answer was not sent: the pool is spent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "busy: query answers being sent fill --max-answer-memory ({max} bytes); retry in a moment or narrow the query"
)]
pub struct Busy {
    pub max: usize,
}

/// Marks an HTTP response whose answer holds room in the pool: it must be
/// taken whole within the write timeout ([`crate::unread::Unread::watch_whole`]),
/// so that a client reading it slowly cannot keep its room for hours.
#[derive(Debug, Clone, Copy)]
pub struct Large;

/// An answer's room in the pool, given back when dropped: grown as the
/// answer is built, then fitted to it once encoded and kept until written.
#[derive(Debug)]
pub struct Room {
    permit: Option<OwnedSemaphorePermit>,
    answers: Answers,
}

impl Room {
    /// Whether it takes room from the pool (its answer is over [`FREE`]).
    pub fn takes_room(&self) -> bool {
        self.permit.is_some()
    }

    /// Room for an answer grown to `bytes` so far (a [`STEP`] ahead of
    /// it), if there is some now; a refusal is counted, and the answer
    /// should then be given up before more of it is built.
    pub fn grow(&mut self, bytes: usize) -> Result<(), Busy> {
        let held = self.kib();
        if bytes <= FREE || bytes <= held as usize * KIB || held == self.answers.kib {
            return Ok(());
        }
        let ahead = self.answers.kib_for(bytes + STEP);
        self.take_kib(ahead)
            .or_else(|_| self.take_kib(self.answers.kib_for(bytes)))
            .inspect_err(|_| Stats::incr(&self.answers.stats.answers_refused_busy))
    }

    /// Room for exactly an encoded answer of `bytes`: what was taken ahead
    /// of it goes back, and one up to [`FREE`] keeps none.
    pub fn fit(&mut self, bytes: usize) -> Result<(), Busy> {
        if bytes <= FREE {
            self.give_back(self.kib());
            return Ok(());
        }
        let kib = self.answers.kib_for(bytes);
        match kib.checked_sub(self.kib()) {
            Some(0) => Ok(()),
            Some(_) => (self.take_kib(kib))
                .inspect_err(|_| Stats::incr(&self.answers.stats.answers_refused_busy)),
            None => {
                self.give_back(self.kib() - kib);
                Ok(())
            }
        }
    }

    /// `answer`, holding this room, fitted to it, until it is dropped.
    pub fn hold(mut self, answer: Bytes) -> Result<Bytes, Busy> {
        self.fit(answer.len())?;
        if !self.takes_room() {
            return Ok(answer);
        }
        Ok(Bytes::from_owner(Held {
            answer,
            _room: self,
        }))
    }

    fn kib(&self) -> u32 {
        self.permit.as_ref().map_or(0, |p| p.num_permits() as u32)
    }

    /// Grows to `kib` in all, or leaves it as it was.
    fn take_kib(&mut self, kib: u32) -> Result<(), Busy> {
        let more = kib - self.kib();
        let semaphore = self.answers.semaphore.clone();
        let taken = semaphore.try_acquire_many_owned(more).map_err(|_| Busy {
            max: self.answers.kib as usize * KIB,
        })?;
        Stats::add(
            &self.answers.stats.answer_bytes_held,
            u64::from(more) * KIB as u64,
        );
        match &mut self.permit {
            Some(permit) => permit.merge(taken),
            None => self.permit = Some(taken),
        }
        Ok(())
    }

    fn give_back(&mut self, kib: u32) {
        if let Some(permit) = &mut self.permit {
            Stats::sub(
                &self.answers.stats.answer_bytes_held,
                u64::from(kib) * KIB as u64,
            );
            drop(permit.split(kib as usize));
            if permit.num_permits() == 0 {
                self.permit = None;
            }
        }
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.give_back(self.kib());
    }
}

/// An encoded answer with its room: the room goes back when the last
/// [`Bytes`] made of it is dropped, i.e. once it has been written.
struct Held {
    answer: Bytes,
    _room: Room,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.answer
    }
}

/// A response body holding its answer's room (in a response's extensions
/// on its way out) until the body is dropped: sent, or its asker gone.
#[derive(Debug)]
pub struct Holding<B> {
    body: B,
    _room: Option<Arc<Room>>,
}

impl<B> Holding<B> {
    pub fn new(body: B, room: Option<Arc<Room>>) -> Holding<B> {
        Holding { body, _room: room }
    }
}

impl<B: Body + Unpin> Body for Holding<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Answers {
    /// A pool of `bytes` (at least 1 KiB), counting into `stats`'
    /// `answers_refused_busy` and `answer_bytes_held`.
    pub fn new(bytes: usize, stats: Arc<Stats>) -> Answers {
        let kib = u32::try_from(bytes / KIB).unwrap_or(u32::MAX).max(1);
        Answers {
            semaphore: Arc::new(Semaphore::new(kib as usize)),
            kib,
            stats,
        }
    }

    /// The counters the pool counts into: the process's.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// No room yet, for an answer about to be built: see [`Room::grow`].
    pub fn room(&self) -> Room {
        Room {
            permit: None,
            answers: self.clone(),
        }
    }

    /// `answer`, holding its room until it is dropped.
    pub fn hold(&self, answer: Bytes) -> Result<Bytes, Busy> {
        self.room().hold(answer)
    }

    /// KiB for an answer of `bytes`: all of the pool for one larger.
    fn kib_for(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(KIB))
            .unwrap_or(u32::MAX)
            .min(self.kib)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_hold_room_until_dropped_and_refuse_past_it() {
        let stats = Arc::new(Stats::default());
        let answers = Answers::new(3 * FREE, stats.clone());
        let big = || Bytes::from(vec![7; 2 * FREE]);
        let first = answers.hold(big()).unwrap();
        assert_eq!(&first[..], &big()[..]);
        assert_eq!(Stats::get(&stats.answer_bytes_held), 2 * FREE as u64);
        let busy = answers.hold(big()).unwrap_err();
        assert_eq!(busy.max, 3 * FREE);
        assert_eq!(Stats::get(&stats.answers_refused_busy), 1);
        // Small answers never wait for room.
        assert!(answers.hold(Bytes::from(vec![1; FREE])).is_ok());
        // A slice of it keeps the room too: it is gone with the last one.
        let tail = first.slice(FREE..);
        drop(first);
        assert!(answers.hold(big()).is_err(), "the slice still holds it");
        drop(tail);
        assert_eq!(Stats::get(&stats.answer_bytes_held), 0);
        let whole = answers.hold(Bytes::from(vec![0; 10 * FREE])).unwrap();
        assert_eq!(
            Stats::get(&stats.answer_bytes_held),
            3 * FREE as u64,
            "all of it"
        );
        drop(whole);
        assert!(answers.hold(big()).is_ok());
    }

    #[test]
    fn a_room_grows_ahead_of_its_answer_and_is_fitted_to_it_once_made() {
        let stats = Arc::new(Stats::default());
        let answers = Answers::new(4 * FREE, stats.clone());
        let held = || Stats::get(&stats.answer_bytes_held) as usize;
        let mut room = answers.room();
        room.grow(FREE).unwrap();
        assert_eq!(held(), 0, "up to FREE takes nothing");
        room.grow(FREE + 1).unwrap();
        assert_eq!(held(), 2 * FREE + KIB, "all of it, a step ahead");
        room.grow(2 * FREE).unwrap();
        assert_eq!(held(), 2 * FREE + KIB, "within what it holds");
        // Another answer's growth past what is left is refused, counted.
        let mut other = answers.room();
        assert_eq!(other.grow(2 * FREE), Err(Busy { max: 4 * FREE }));
        assert_eq!(Stats::get(&stats.answers_refused_busy), 1);
        assert!(!other.takes_room());
        // A step ahead does not fit, what it has found does.
        other.grow(FREE + KIB).unwrap();
        assert_eq!(held(), 3 * FREE + 2 * KIB);
        room.fit(FREE + 1).unwrap();
        assert_eq!(held(), 2 * FREE + 2 * KIB, "fitted: the rest is back");
        room.fit(FREE).unwrap();
        assert!(!room.takes_room(), "made small, it takes none");
        assert_eq!(held(), FREE + KIB);
        drop(other);
        assert_eq!(held(), 0);
        // Larger than the pool, it takes all of it, and grows on.
        room.grow(100 * FREE).unwrap();
        room.grow(200 * FREE).unwrap();
        assert_eq!(held(), 4 * FREE);
        assert_eq!(Stats::get(&stats.answers_refused_busy), 1);
    }
}
