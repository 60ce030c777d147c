//! A gRPC request body that passes a message over [`budget::FREE`] bytes on to
//! tonic only once the shared [`Budget`] has room for it.
//!
//! tonic buffers each message whole (up to `--max-frame`) before vigil's
//! handler sees it, so the budget is taken here, below tonic: the body's data
//! is read through and each message's 5-byte gRPC prefix (a compression flag,
//! then the length) is noted as it goes by. A chunk that starts a large
//! message is held, and the body read no further, until the message has room;
//! the room goes back once the message's last byte has been passed on. While a
//! chunk is held HTTP/2's flow control stops the sender. A message that holds
//! room must keep the [`Pace`] that brings it in within the read timeout of
//! getting it, or the request fails: a client that answers HTTP/2 pings but
//! stops sending could otherwise keep its room, and others waiting, for ever.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::budget::{self, Budget, Pace, PaceTimer, Taken, TooSlow, Waiter};
use crate::stats::Stats;

const PREFIX: usize = 5;

/// `body`, with every large message waiting for room in `budget`, then
/// keeping the pace that brings it in within `timeout` of getting it. A
/// message over `max_message` goes straight on, for tonic to refuse at its
/// prefix, rather than wait for room it would never use; it is counted in
/// `stats` as a TCP frame over `--max-frame` is (tonic counts nothing).
pub fn gated<B>(
    body: B,
    budget: &Budget,
    timeout: Duration,
    max_message: usize,
    stats: Arc<Stats>,
) -> Gated<B> {
    Gated {
        inner: body,
        max_message,
        stats,
        budget: budget.clone(),
        waiter: budget.waiter(),
        prefix: [0; PREFIX],
        prefix_seen: 0,
        remaining: 0,
        room: None,
        timeout,
        pace_timer: PaceTimer::default(),
        held: None,
    }
}

pub struct Gated<B> {
    inner: B,
    max_message: usize,
    stats: Arc<Stats>,
    budget: Budget,
    waiter: Waiter,
    /// The prefix of the next message, `prefix_seen` bytes of it so far.
    prefix: [u8; PREFIX],
    prefix_seen: usize,
    /// Bytes of the current message not yet passed on.
    remaining: usize,
    /// The current message's room and pace, when it is a large one.
    room: Option<(Taken, Pace)>,
    timeout: Duration,
    /// Wakes the call when the pace of the message holding room should be
    /// checked.
    pace_timer: PaceTimer,
    /// A chunk that starts a large message without room yet, with where in it
    /// that message's body begins and its length.
    held: Option<(Bytes, usize, usize)>,
}

/// How far a chunk could be passed on.
enum Walk {
    /// All of it.
    Through,
    /// Up to `at`, where a message of `len` bytes begins that needs room.
    NeedsRoom { at: usize, len: usize },
}

impl<B> Gated<B> {
    /// Follows the message boundaries in `chunk` from `from` on.
    fn walk(&mut self, chunk: &[u8], mut from: usize) -> Walk {
        while from < chunk.len() {
            if self.remaining > 0 {
                let passed = self.remaining.min(chunk.len() - from);
                from += passed;
                self.remaining -= passed;
                if self.remaining == 0 {
                    self.room = None;
                }
                continue;
            }
            self.prefix[self.prefix_seen] = chunk[from];
            self.prefix_seen += 1;
            from += 1;
            if self.prefix_seen == PREFIX {
                self.prefix_seen = 0;
                let len = u32::from_be_bytes(self.prefix[1..].try_into().expect("4 bytes"));
                let len = len as usize;
                if len > self.max_message {
                    Stats::incr(&self.stats.frames_oversized);
                } else if len > budget::FREE {
                    return Walk::NeedsRoom { at: from, len };
                }
                self.remaining = len;
            }
        }
        Walk::Through
    }

    /// Whether the message holding room has fallen behind its pace (if not,
    /// the task is woken when to ask again). One that has gives its room back
    /// at once; the request ends with it.
    fn behind(&mut self, cx: &mut Context<'_>) -> Option<TooSlow> {
        let (_, pace) = self.room.as_ref()?;
        let arrived = pace.message_len() - self.remaining;
        match self.pace_timer.poll_behind(cx, &self.budget, pace, arrived) {
            Poll::Ready(too_slow) => {
                self.room = None;
                Some(too_slow)
            }
            Poll::Pending => None,
        }
    }

    /// `chunk`, once every large message it starts has room.
    fn poll_pass(
        &mut self,
        cx: &mut Context<'_>,
        chunk: Bytes,
        mut from: usize,
        mut wanted: Option<usize>,
    ) -> Poll<Bytes> {
        loop {
            if let Some(len) = wanted {
                match self.waiter.poll_take(cx, len) {
                    Poll::Ready(room) => {
                        self.room = Some((room, Pace::new(len, self.timeout)));
                        self.remaining = len;
                    }
                    Poll::Pending => {
                        self.held = Some((chunk, from, len));
                        return Poll::Pending;
                    }
                }
            }
            match self.walk(&chunk, from) {
                Walk::Through => return Poll::Ready(chunk),
                Walk::NeedsRoom { at, len } => (from, wanted) = (at, Some(len)),
            }
        }
    }
}

impl<B> Body for Gated<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some((chunk, from, len)) = this.held.take() {
            let chunk = ready!(this.poll_pass(cx, chunk, from, Some(len)));
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            // Only a poll that finds nothing new asks, so data already
            // arrived always counts.
            Poll::Pending => {
                return match this.behind(cx) {
                    // The client's message missed the server's deadline for
                    // it; without a status tonic would answer UNKNOWN.
                    Some(too_slow) => {
                        let status = tonic::Status::deadline_exceeded(too_slow.to_string());
                        Poll::Ready(Some(Err(status.into())))
                    }
                    None => Poll::Pending,
                };
            }
        };
        match frame.into_data() {
            Ok(chunk) => {
                let chunk = ready!(this.poll_pass(cx, chunk, 0, None));
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Err(trailers) => Poll::Ready(Some(Ok(trailers))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::task::Waker;

    use super::*;
    use crate::stats::Stats;

    /// A body of the given chunks, then its end (or, stalled, nothing more).
    struct Chunks(VecDeque<Bytes>, bool);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            match self.0.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None if self.1 => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(60);
    const MAX_MESSAGE: usize = 16 * 1024 * 1024;

    fn message(len: usize) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.resize(PREFIX + len, 7);
        out
    }

    fn poll(body: &mut Gated<Chunks>) -> Poll<Option<Bytes>> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(body)
            .poll_frame(&mut cx)
            .map(|frame| frame.map(|frame| frame.unwrap().into_data().unwrap()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_message_that_stops_arriving_gives_its_room_back_once_behind_its_pace() {
        let stats = Arc::new(Stats::default());
        let budget = Budget::new(budget::FREE * 2, stats.clone());
        let len = budget::FREE + 1;
        let start = Bytes::from(message(len)).slice(..1000);
        let mut body = gated(
            Chunks([start.clone()].into(), true),
            &budget,
            TIMEOUT,
            MAX_MESSAGE,
            Arc::default(),
        );
        let mut cx = Context::from_waker(Waker::noop());
        let mut poll = || Pin::new(&mut body).poll_frame(&mut cx);
        assert!(matches!(poll(), Poll::Ready(Some(Ok(_)))));
        assert!(Stats::get(&stats.message_bytes_held) > 0);
        // The 995 bytes of it that came buy ~0.8 s past the grace.
        tokio::time::advance(budget::GRACE).await;
        assert!(poll().is_pending(), "still in time");
        tokio::time::advance(Duration::from_secs(1)).await;
        let Poll::Ready(Some(Err(e))) = poll() else {
            panic!("the request fails");
        };
        let status = e.downcast::<tonic::Status>().expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            status.message(),
            format!(
                "a message of {len} bytes held room in --max-message-memory for 6.0s and only 995 bytes of it arrived: too slow to arrive within 60s (--read-timeout)"
            )
        );
        assert_eq!(Stats::get(&stats.message_bytes_held), 0, "given back");
        assert_eq!(Stats::get(&stats.messages_too_slow), 1);
    }

    #[tokio::test]
    async fn small_messages_pass_and_a_large_one_waits_for_room_until_it_has_passed() {
        let stats = Arc::new(Stats::default());
        let budget = Budget::new(budget::FREE * 2, stats.clone());
        let large = budget::FREE + 1;
        // Two small messages and the start of a large one in the first chunk
        // (its prefix split over two chunks), the large one's end and a small
        // one in the last.
        let mut wire = [message(3), message(0), message(large), message(2)].concat();
        let first: Vec<u8> = wire.drain(..PREFIX + 3 + PREFIX + 2).collect();
        let second: Vec<u8> = wire.drain(..3 + 1000).collect();
        let chunks = [first, second, wire].map(Bytes::from);
        let mut body = gated(
            Chunks(chunks.iter().cloned().collect(), false),
            &budget,
            TIMEOUT,
            MAX_MESSAGE,
            Arc::default(),
        );

        let other = budget.try_take(budget::FREE * 2).unwrap();
        assert_eq!(poll(&mut body), Poll::Ready(Some(chunks[0].clone())));
        assert!(poll(&mut body).is_pending(), "no room for the large one");
        assert!(poll(&mut body).is_pending());
        assert_eq!(Stats::get(&stats.messages_waited_for_memory), 1);
        drop(other);
        assert_eq!(poll(&mut body), Poll::Ready(Some(chunks[1].clone())));
        let room = (large as u64).div_ceil(1024) * 1024;
        assert_eq!(Stats::get(&stats.message_bytes_held), room);
        assert_eq!(poll(&mut body), Poll::Ready(Some(chunks[2].clone())));
        assert_eq!(Stats::get(&stats.message_bytes_held), 0, "it has passed");
        assert_eq!(poll(&mut body), Poll::Ready(None));
    }

    #[tokio::test]
    async fn a_message_over_the_largest_one_taken_passes_without_room() {
        let stats = Arc::new(Stats::default());
        let budget = Budget::new(budget::FREE * 2, stats.clone());
        let held = budget.try_take(budget::FREE * 2).unwrap();
        let mut prefix = vec![0];
        prefix.extend_from_slice(&(MAX_MESSAGE as u32 + 1).to_be_bytes());
        let chunk = Bytes::from(prefix);
        let mut body = gated(
            Chunks([chunk.clone()].into(), false),
            &budget,
            TIMEOUT,
            MAX_MESSAGE,
            Arc::default(),
        );
        assert_eq!(
            poll(&mut body),
            Poll::Ready(Some(chunk)),
            "for tonic to refuse"
        );
        assert_eq!(Stats::get(&stats.messages_waited_for_memory), 0);
        drop(held);
    }

    #[tokio::test]
    async fn one_chunk_of_two_large_messages_takes_room_for_each_in_turn() {
        let stats = Arc::new(Stats::default());
        let budget = Budget::new(budget::FREE * 2, stats.clone());
        let large = budget::FREE + 1;
        let wire = Bytes::from([message(large), message(large)].concat());
        let mut body = gated(
            Chunks([wire.clone()].into(), false),
            &budget,
            TIMEOUT,
            MAX_MESSAGE,
            Arc::default(),
        );
        assert_eq!(poll(&mut body), Poll::Ready(Some(wire)));
        assert_eq!(Stats::get(&stats.message_bytes_held), 0);
        assert_eq!(Stats::get(&stats.messages_waited_for_memory), 0);
    }

    #[tokio::test]
    async fn any_split_of_any_messages_passes_every_byte_and_gives_every_room_back() {
        let mut next = crate::test_rng::xorshift(0x5eed);
        for round in 0..200 {
            let stats = Arc::new(Stats::default());
            let budget = Budget::new(budget::FREE * 4, stats.clone());
            let wire: Vec<u8> = (0..1 + next() % 4)
                .flat_map(|_| match next() % 3 {
                    0 => message(budget::FREE + 1 + (next() % 1000) as usize),
                    _ => message((next() % 100) as usize),
                })
                .collect();
            let mut chunks = VecDeque::new();
            let mut rest = &wire[..];
            while !rest.is_empty() {
                let len = (1 + next() % 40_000).min(rest.len() as u64) as usize;
                chunks.push_back(Bytes::copy_from_slice(&rest[..len]));
                rest = &rest[len..];
            }
            let mut body = gated(
                Chunks(chunks, false),
                &budget,
                TIMEOUT,
                MAX_MESSAGE,
                Arc::default(),
            );
            let mut passed = Vec::new();
            while let Poll::Ready(Some(chunk)) = poll(&mut body) {
                passed.extend_from_slice(&chunk);
            }
            assert_eq!(passed, wire, "round {round}");
            assert_eq!(Stats::get(&stats.message_bytes_held), 0, "round {round}");
            assert_eq!(Stats::get(&stats.messages_waited_for_memory), 0);
        }
    }
}
