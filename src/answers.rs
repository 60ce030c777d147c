//! The memory query answers may hold while their askers read them, one pool
//! shared by every transport (`--max-answer-memory`).
//!
//! `--max-query-results` bounds one answer and each connection reads its
//! answers one at a time (Riemann TCP) or a few streams at a time (HTTP/2,
//! gRPC); nothing else bounded them all together. An encoded answer is held
//! until its asker has read it, so 64 HTTP/2 streams each reading a 30 MB
//! answer at 1 KB/s held some 320 MB until the write timeout, and more
//! connections multiplied that. An answer over [`FREE`] bytes takes its size
//! from this pool once encoded, and gives it back once written (or dropped,
//! its asker gone). One that does not fit is refused at once with [`Busy`]
//! rather than queued: a waiting answer would hold its memory all the same,
//! and a client told to retry soon is what a busy server owes it. Answers up
//! to [`FREE`] bytes take nothing, so a flood of large answers never refuses
//! a dashboard's small ones.
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

/// An answer's room in the pool, given back when dropped.
#[derive(Debug)]
pub struct Room {
    permit: Option<OwnedSemaphorePermit>,
    stats: Arc<Stats>,
}

impl Room {
    /// Whether it takes room from the pool (its answer is over [`FREE`]).
    pub fn takes_room(&self) -> bool {
        self.permit.is_some()
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if let Some(permit) = &self.permit {
            let bytes = permit.num_permits() * KIB;
            Stats::sub(&self.stats.answer_bytes_held, bytes as u64);
        }
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

    /// Room for an answer of `bytes`, if there is some now; refusals counted.
    pub fn take(&self, bytes: usize) -> Result<Room, Busy> {
        if bytes <= FREE {
            return Ok(self.room(None));
        }
        let kib = u32::try_from(bytes.div_ceil(KIB))
            .unwrap_or(u32::MAX)
            .min(self.kib);
        match self.semaphore.clone().try_acquire_many_owned(kib) {
            Ok(permit) => {
                Stats::add(&self.stats.answer_bytes_held, u64::from(kib) * KIB as u64);
                Ok(self.room(Some(permit)))
            }
            Err(_) => {
                Stats::incr(&self.stats.answers_refused_busy);
                Err(Busy {
                    max: self.kib as usize * KIB,
                })
            }
        }
    }

    /// `answer`, holding its room until it is dropped.
    pub fn hold(&self, answer: Bytes) -> Result<Bytes, Busy> {
        if answer.len() <= FREE {
            return Ok(answer);
        }
        let room = self.take(answer.len())?;
        Ok(Bytes::from_owner(Held {
            answer,
            _room: room,
        }))
    }

    fn room(&self, permit: Option<OwnedSemaphorePermit>) -> Room {
        Room {
            permit,
            stats: self.stats.clone(),
        }
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
}
