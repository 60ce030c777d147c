//! Response bodies an HTTP/2 client leaves unread. HTTP/2 gives each
//! request a flow-control window of its own: a client can keep its
//! connection busy (answering pings, taking other answers) and grant one
//! stream no room, and the stream's body then waits, whole, for as long as
//! the connection lasts: no write of the connection ever stalls for
//! [`crate::bounded`] to notice. A client that asked 64 index queries of
//! 6.7 MB each on one connection that way held 415 MB of vigil's memory.
//!
//! [`Unread::watch`] wraps such a body. Once the consumer (hyper's HTTP/2
//! stream) has not come back for the body's next frame for the timeout,
//! while one was ready for it, the body is dropped, freeing what it holds;
//! it is counted, and the stream is reset when the client makes room.
//! Frames are cut to [`CHUNK`] bytes, so what the stream itself buffers
//! beyond the client's window is one chunk, not the whole answer; and the
//! stream comes back for the next one when the client has taken that
//! chunk, so a client reading slowly (a chunk per timeout, 16 KiB a minute
//! at the default) is not taken for one reading nothing.
//!
//! A query answer holding room in `--max-answer-memory` is watched with
//! [`Unread::watch_whole`]: it must also be taken whole within the timeout,
//! as a Riemann TCP answer must, or it is dropped (over HTTP/1 too).
//! Reading a chunk per timeout would otherwise let one client hold the
//! whole pool for hours, and every other large answer be refused as busy.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::stats::Stats;

/// The largest frame handed on: HTTP/2 buffers a whole frame for a stream
/// whatever its window, and a slice of a larger buffer keeps all of it.
/// HTTP/2's own frame size (16 KiB unless the client asks for larger), so
/// cutting adds no frame on the wire.
pub const CHUNK: usize = 16 * 1024;

/// Why a watched body ended early.
#[derive(Debug, thiserror::Error)]
pub enum LeftUnread {
    #[error("the client took nothing of this response for {0:?}; it was dropped")]
    Stalled(Duration),
    #[error("the client did not take this answer whole within {0:?}; it was dropped")]
    TooSlow(Duration),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The bodies being watched, and the task that drops the stalled ones.
pub struct Unread {
    bodies: Mutex<Vec<Weak<dyn Stall>>>,
    timeout: Duration,
    stats: Arc<Stats>,
    counter: fn(&Stats) -> &AtomicU64,
    /// When the watch began: the bodies' times are milliseconds since.
    epoch: Instant,
}

impl Unread {
    /// Watches for bodies left unread for `timeout`, counting each dropped
    /// in `counter` of `stats`. Must run inside tokio: a task checks them
    /// until the returned handle and every body are gone.
    pub fn start(
        timeout: Duration,
        stats: Arc<Stats>,
        counter: fn(&Stats) -> &AtomicU64,
    ) -> Arc<Unread> {
        let unread = Arc::new(Unread {
            bodies: Mutex::new(Vec::new()),
            timeout,
            stats,
            counter,
            epoch: Instant::now(),
        });
        let watching = Arc::downgrade(&unread);
        // Checked at a quarter of the timeout: a body goes at most 1.25
        // times it unread.
        let every = (timeout / 4).max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(unread) = watching.upgrade() else {
                    return;
                };
                unread.sweep();
            }
        });
        unread
    }

    /// `body`, dropped once left unread for the timeout, in frames of at
    /// most [`CHUNK`] bytes.
    pub fn watch<B>(self: &Arc<Self>, body: B) -> Watched<B>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.watched(body, NEVER)
    }

    /// [`Unread::watch`], and dropped too unless taken whole within the
    /// timeout: an answer holding room in `--max-answer-memory`.
    pub fn watch_whole<B>(self: &Arc<Self>, body: B) -> Watched<B>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let deadline = self.now().saturating_add(self.timeout.as_millis() as u64);
        self.watched(body, deadline)
    }

    fn watched<B>(self: &Arc<Self>, body: B, deadline: u64) -> Watched<B>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let slot = Arc::new(Slot {
            body: Mutex::new(Some(Held {
                body: Box::pin(body),
                rest: Bytes::new(),
            })),
            ready_since: AtomicU64::new(self.now()),
            deadline,
            dropped: AtomicBool::new(false),
        });
        let stall: Arc<dyn Stall> = slot.clone();
        self.bodies.lock().push(Arc::downgrade(&stall));
        Watched {
            slot,
            unread: self.clone(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Drops the bodies left unread too long; forgets the ended ones.
    fn sweep(&self) {
        let now = self.now();
        let limit = self.timeout.as_millis() as u64;
        let mut dropped = 0;
        self.bodies.lock().retain(|body| {
            let Some(body) = body.upgrade() else {
                return false;
            };
            let left = body.drop_if_unread(now, limit);
            dropped += u64::from(left);
            !left
        });
        if dropped > 0 {
            Stats::add((self.counter)(&self.stats), dropped);
            tracing::debug!(dropped, timeout = ?self.timeout, "Responses left unread dropped.");
        }
    }
}

/// A body whose consumer may stop coming back for it.
trait Stall: Send + Sync {
    /// Drops the body if a frame was ready for longer than `limit`
    /// milliseconds before `now`; whether it did.
    fn drop_if_unread(&self, now: u64, limit: u64) -> bool;
}

/// No frame ready: the body itself is waited on.
const WAITING: u64 = u64::MAX;
/// No deadline for taking the whole body.
const NEVER: u64 = u64::MAX;

struct Slot<B> {
    /// `None` once ended or dropped.
    body: Mutex<Option<Held<B>>>,
    /// When the consumer last got a frame (or the body began), in the
    /// watch's milliseconds; [`WAITING`] while the body has none ready.
    ready_since: AtomicU64,
    /// When the body must have been taken whole by, or [`NEVER`].
    deadline: u64,
    dropped: AtomicBool,
}

struct Held<B> {
    body: Pin<Box<B>>,
    /// What is left of a frame cut to [`CHUNK`].
    rest: Bytes,
}

impl<B: Send> Stall for Slot<B> {
    fn drop_if_unread(&self, now: u64, limit: u64) -> bool {
        let since = self.ready_since.load(Ordering::Acquire);
        let stalled = since != WAITING && now.saturating_sub(since) >= limit;
        let late = now >= self.deadline;
        if !stalled && !late {
            return false;
        }
        let mut body = self.body.lock();
        // Ended, or taken since the load above (and not late anyway).
        if body.is_none() || (!late && self.ready_since.load(Ordering::Acquire) != since) {
            return false;
        }
        *body = None;
        self.dropped.store(true, Ordering::Release);
        true
    }
}

/// A body [`Unread`] watches.
pub struct Watched<B> {
    slot: Arc<Slot<B>>,
    unread: Arc<Unread>,
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let slot = &this.slot;
        let mut guard = slot.body.lock();
        let Some(held) = guard.as_mut() else {
            if slot.dropped.load(Ordering::Acquire) {
                let timeout = this.unread.timeout;
                let left = if this.unread.now() >= slot.deadline {
                    LeftUnread::TooSlow(timeout)
                } else {
                    LeftUnread::Stalled(timeout)
                };
                return Poll::Ready(Some(Err(left.into())));
            }
            return Poll::Ready(None);
        };
        let frame = if held.rest.has_remaining() {
            Frame::data(cut(&mut held.rest))
        } else {
            match held.body.as_mut().poll_frame(cx) {
                Poll::Pending => {
                    slot.ready_since.store(WAITING, Ordering::Release);
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    *guard = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    *guard = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if data.len() > CHUNK => {
                        held.rest = data;
                        Frame::data(cut(&mut held.rest))
                    }
                    Ok(data) => Frame::data(data),
                    Err(trailers) => trailers,
                },
            }
        };
        slot.ready_since.store(this.unread.now(), Ordering::Release);
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        let body = self.slot.body.lock();
        match body.as_ref() {
            Some(held) => !held.rest.has_remaining() && held.body.is_end_stream(),
            None => !self.slot.dropped.load(Ordering::Acquire),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let body = self.slot.body.lock();
        match body.as_ref() {
            Some(held) => {
                let rest = held.rest.remaining() as u64;
                let inner = held.body.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + rest);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + rest);
                }
                hint
            }
            None => SizeHint::with_exact(0),
        }
    }
}

/// The next [`CHUNK`] of a frame larger than that, copied: a slice would
/// keep the whole frame alive for as long as the stream holds the chunk.
fn cut(rest: &mut Bytes) -> Bytes {
    let len = rest.len().min(CHUNK);
    let chunk = Bytes::copy_from_slice(&rest[..len]);
    rest.advance(len);
    chunk
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::future::poll_fn;

    use tokio::sync::mpsc;

    use super::*;

    /// Frames handed out in turn, then the end; says when it is dropped.
    struct Frames {
        frames: VecDeque<Frame<Bytes>>,
        dropped: Arc<AtomicBool>,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.frames.pop_front().map(Ok))
        }
    }

    impl Drop for Frames {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::Release);
        }
    }

    /// Frames as they are sent, pending in between.
    struct Channel(mpsc::Receiver<Bytes>);

    impl Body for Channel {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|d| Ok(Frame::data(d))))
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn watch() -> (Arc<Unread>, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        let unread = Unread::start(TIMEOUT, stats.clone(), |s| &s.http_responses_unread);
        (unread, stats)
    }

    fn frames(sizes: &[usize]) -> (Frames, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        let frames = sizes
            .iter()
            .map(|&n| Frame::data(Bytes::from(vec![7; n])))
            .collect();
        let body = Frames {
            frames,
            dropped: dropped.clone(),
        };
        (body, dropped)
    }

    async fn next<B: Body + Unpin>(body: &mut B) -> Option<Result<Frame<B::Data>, B::Error>> {
        poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    fn len(frame: Option<Result<Frame<Bytes>, BoxError>>) -> usize {
        frame.unwrap().unwrap().into_data().unwrap().len()
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_left_unread_is_dropped_and_counted() {
        let (unread, stats) = watch();
        let (body, dropped) = frames(&[200 * 1024]);
        let mut watched = unread.watch(body);
        assert_eq!(len(next(&mut watched).await), CHUNK);
        tokio::time::sleep(TIMEOUT - Duration::from_secs(1)).await;
        assert!(!dropped.load(Ordering::Acquire), "not yet");
        tokio::time::sleep(TIMEOUT / 2).await;
        assert!(dropped.load(Ordering::Acquire), "what it held is freed");
        assert_eq!(Stats::get(&stats.http_responses_unread), 1);
        let ended = next(&mut watched).await.unwrap().unwrap_err();
        assert_eq!(
            ended.to_string(),
            "the client took nothing of this response for 10s; it was dropped"
        );
        assert!(!watched.is_end_stream(), "cut short, not ended");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_read_slowly_but_steadily_is_kept() {
        let (unread, stats) = watch();
        let (body, dropped) = frames(&[3 * CHUNK + 100, 10]);
        let mut watched = unread.watch(body);
        let mut sizes = Vec::new();
        while let Some(frame) = next(&mut watched).await {
            sizes.push(frame.unwrap().into_data().unwrap().len());
            tokio::time::sleep(TIMEOUT - Duration::from_secs(1)).await;
        }
        assert_eq!(sizes, [CHUNK, CHUNK, CHUNK, 100, 10]);
        assert!(dropped.load(Ordering::Acquire), "ended");
        assert_eq!(Stats::get(&stats.http_responses_unread), 0);
        drop(watched);
        tokio::time::sleep(TIMEOUT / 2).await;
        assert!(unread.bodies.lock().is_empty(), "forgotten once gone");
    }

    /// An answer read a chunk per timeout would hold its room in
    /// `--max-answer-memory` for hours: watched whole, it is dropped once
    /// the timeout has passed since it began.
    #[tokio::test(start_paused = true)]
    async fn an_answer_not_taken_whole_within_the_timeout_is_dropped() {
        let (unread, stats) = watch();
        let (body, dropped) = frames(&[10 * CHUNK]);
        let mut watched = unread.watch_whole(body);
        let mut taken = 0;
        for _ in 0..3 {
            taken += len(next(&mut watched).await);
            tokio::time::sleep(TIMEOUT / 3 - Duration::from_millis(1)).await;
        }
        tokio::time::sleep(TIMEOUT / 2).await;
        assert_eq!(taken, 3 * CHUNK, "steadily read, never stalled");
        assert!(dropped.load(Ordering::Acquire), "what it held is freed");
        assert_eq!(Stats::get(&stats.http_responses_unread), 1);
        let ended = next(&mut watched).await.unwrap().unwrap_err();
        assert_eq!(
            ended.to_string(),
            "the client did not take this answer whole within 10s; it was dropped"
        );
        // One taken whole in time is kept.
        let (body, _) = frames(&[3 * CHUNK]);
        let mut watched = unread.watch_whole(body);
        while let Some(frame) = next(&mut watched).await {
            frame.unwrap();
            tokio::time::sleep(TIMEOUT / 4).await;
        }
        assert_eq!(Stats::get(&stats.http_responses_unread), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_waiting_for_its_own_data_is_kept() {
        let (unread, stats) = watch();
        let (send, receive) = mpsc::channel(1);
        let mut watched = unread.watch(Channel(receive));
        let pending = tokio::time::timeout(TIMEOUT * 3, next(&mut watched)).await;
        assert!(pending.is_err(), "nothing to send yet");
        send.send(Bytes::from_static(b"late")).await.unwrap();
        assert_eq!(len(next(&mut watched).await), 4);
        assert_eq!(Stats::get(&stats.http_responses_unread), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn trailers_pass_and_small_frames_are_not_copied() {
        let (unread, _) = watch();
        let data = Bytes::from_static(b"small");
        let mut trailers = axum::http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = Frames {
            frames: [Frame::data(data.clone()), Frame::trailers(trailers.clone())].into(),
            dropped: Arc::default(),
        };
        let mut watched = unread.watch(body);
        let first = next(&mut watched)
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        assert_eq!(first.as_ptr(), data.as_ptr(), "handed on as it is");
        let last = next(&mut watched).await.unwrap().unwrap();
        assert_eq!(last.into_trailers().unwrap(), trailers);
        assert!(next(&mut watched).await.is_none());
    }
}
