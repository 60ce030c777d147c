//! What a decoded Riemann `Msg` means, independent of the transport that carried
//! it: its events go to the streams, its query is answered from the index. TCP
//! and UDP both call into here. A message over the [`Limits`] is refused whole
//! (no event of it is processed) with an error naming the limit.
//!
//! The `Msg`s one TCP read brought (or the datagrams queued on the UDP socket)
//! are handled as one batch: one clock read, one call into the streams for
//! all their events (a query first has the events before it processed), so a
//! pipelining client of small messages does not pay the pipeline's fixed
//! cost per message. A query that scans the index runs on a blocking thread
//! (see [`crate::blocking`]) and ends its batch: the frames after it wait for
//! its answer.
//!
//! In cluster mode ([`Ingest::cluster`]) events go to JetStream instead of the
//! local streams, and the ack waits until JetStream has stored them; queries
//! fan out to every node.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::blocking::off_workers;
use crate::clock::{Micros, SharedClock};
use crate::cluster::{Cluster, ClusterQueryError};
use crate::event::Event;
use crate::index::{Index, QueryError};
use crate::limits::Limits;
use crate::proto;
use crate::query::Query;
use crate::stats::Stats;
use crate::streams::Streams;
use crate::wire::{self, DecodeError};

/// Decoded events a connection keeps (with their strings) for its next
/// batch. Above a batch of ordinary messages (one TCP read of 100-event
/// messages is ~600 events) and a forwarding vigil's 1 000-event batches; an
/// empty event is 2 bytes on the wire and ~180 in memory, so without a cap
/// one message of 100 000 of them would stay that large for as long as its
/// connection idles.
const KEEP_EVENTS: usize = 1024;

/// Keeps the `used` decoded events, up to [`KEEP_EVENTS`], with their
/// allocations, for the connection's next batch.
fn keep_for_next_batch(events: &mut Vec<Event>, used: usize) {
    wire::keep_slots(events, used.min(KEEP_EVENTS));
}

/// A frame's reply: ready now, or later: once the cluster has stored its
/// events, or once a blocking thread has scanned the index for its query.
pub enum Reply {
    Ready(Bytes),
    Later(Pin<Box<dyn Future<Output = Bytes> + Send>>),
}

impl Reply {
    pub async fn wait(self) -> Bytes {
        match self {
            Reply::Ready(reply) => reply,
            Reply::Later(reply) => reply.await,
        }
    }
}

/// Counts a message the decoder refused and gives the error its sender is
/// answered with: the limit it went over, or why it did not decode. The same
/// on every transport that decodes Riemann events (TCP, UDP, gRPC).
pub fn refusal(stats: &Stats, transport: impl std::fmt::Debug, error: DecodeError) -> String {
    match error {
        DecodeError::Exceeded(e) => {
            Stats::incr(e.limit.counter(stats));
            tracing::debug!(?transport, error = %e, "Message over a limit refused.");
            e.to_string()
        }
        e => {
            Stats::incr(&stats.decode_errors);
            tracing::debug!(?transport, error = %e, "Undecodable message.");
            format!("invalid message: {e}")
        }
    }
}

/// Which transport a message came over, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Udp => "udp",
        }
    }
}

/// Frames of one read decoded into a connection's event buffer, whose events
/// go through the streams together: one clock read, one pipeline call.
struct Batch {
    /// The time given to events that carry none.
    now: Micros,
    /// `events[..pending]` are decoded and not yet processed.
    pending: usize,
    /// How many slots of the buffer this batch filled at most.
    used: usize,
}

impl Batch {
    fn new(now: Micros) -> Self {
        Self {
            now,
            pending: 0,
            used: 0,
        }
    }
}

/// Shared handles every connection needs.
pub struct Ingest {
    pub index: Arc<Index>,
    pub streams: Arc<dyn Streams>,
    pub clock: SharedClock,
    pub stats: Arc<Stats>,
    pub limits: Limits,
    /// Set by `--cluster`: events are published to the cluster, queries fan out.
    pub cluster: Option<Arc<Cluster>>,
}

impl Ingest {
    /// Starts handling the frames a connection (or a UDP socket) read at
    /// once, taking them from `frames` and pushing one reply per frame, in
    /// order, to `replies`. Locally their events go through the streams as
    /// one batch; in a cluster the events are sent and each reply waits for
    /// JetStream, so a connection may read its next frames meanwhile.
    ///
    /// Locally it stops after a query that scans the index: that reply
    /// scans on a blocking thread once awaited, and the caller awaits the
    /// replies before handing over the frames left in `frames`, so the
    /// query sees exactly the events sent before it.
    pub fn begin_all<B: AsRef<[u8]>>(
        &self,
        frames: &mut impl Iterator<Item = B>,
        transport: Transport,
        events: &mut Vec<Event>,
        replies: &mut Vec<Reply>,
    ) {
        match &self.cluster {
            None => self.handle_frames(frames, transport, events, replies),
            Some(cluster) => {
                for body in frames {
                    let reply =
                        self.begin_clustered(cluster.clone(), body.as_ref(), transport, events);
                    replies.push(reply);
                }
                keep_for_next_batch(events, events.len());
            }
        }
    }

    /// The local part of [`Ingest::begin_all`]: the events of the frames
    /// taken go through the streams as one batch.
    pub fn handle_frames<B: AsRef<[u8]>>(
        &self,
        frames: &mut impl Iterator<Item = B>,
        transport: Transport,
        events: &mut Vec<Event>,
        replies: &mut Vec<Reply>,
    ) {
        let mut batch = Batch::new(self.clock.now());
        for body in frames {
            let reply = self.add(&mut batch, body.as_ref(), transport, events);
            let scans = matches!(reply, Reply::Later(_));
            replies.push(reply);
            if scans {
                break;
            }
        }
        self.finish(batch, events);
    }

    /// Handles one frame body and returns its reply. `events` is the
    /// connection's decode buffer: reused from message to message, so a
    /// steady stream of events decodes without allocating.
    pub fn handle_frame(
        &self,
        body: &[u8],
        transport: Transport,
        events: &mut Vec<Event>,
    ) -> Reply {
        let mut batch = Batch::new(self.clock.now());
        let reply = self.add(&mut batch, body, transport, events);
        self.finish(batch, events);
        reply
    }

    /// Decodes one frame into the batch and returns its reply. Its events
    /// wait for [`Ingest::finish`], unless it carries a query: then the
    /// batch so far (this frame included) is processed first, so the answer
    /// sees it.
    fn add(
        &self,
        batch: &mut Batch,
        body: &[u8],
        transport: Transport,
        events: &mut Vec<Event>,
    ) -> Reply {
        let (decoded, end) = self.decode_at(body, batch.now, events, batch.pending);
        batch.used = batch.used.max(end);
        let request = match self.counted(decoded, transport, end - batch.pending) {
            Ok(request) => request,
            // Refused whole: its slots are reused by the next frame.
            Err(reply) => return Reply::Ready(reply),
        };
        batch.pending = end;
        // Riemann answers a query even when the same Msg also carried events.
        match request.query {
            Some(query) if transport == Transport::Tcp => {
                self.process(batch, events);
                self.answer(query)
            }
            _ => Reply::Ready(proto::ack()),
        }
    }

    /// Runs the batch's pending events through the streams.
    fn process(&self, batch: &mut Batch, events: &[Event]) {
        if batch.pending > 0 {
            self.streams.process(&events[..batch.pending]);
            batch.pending = 0;
        }
    }

    /// Processes what is pending and keeps as many decoded events (with their
    /// allocations) as the batch used, up to [`KEEP_EVENTS`], for the next one.
    fn finish(&self, mut batch: Batch, events: &mut Vec<Event>) {
        self.process(&mut batch, events);
        keep_for_next_batch(events, batch.used);
    }

    /// Like [`Ingest::handle_frame`], but the events are acked only once the
    /// cluster stored them, and a query is answered by every node.
    fn begin_clustered(
        &self,
        cluster: Arc<Cluster>,
        body: &[u8],
        transport: Transport,
        events: &mut Vec<Event>,
    ) -> Reply {
        let request = match self.decode(body, transport, events) {
            Ok(request) => request,
            Err(reply) => return Reply::Ready(reply),
        };
        let stored = (!events.is_empty()).then(|| cluster.send(events));
        let query = match request.query {
            Some(text) if transport == Transport::Tcp => {
                Stats::incr(&self.stats.queries);
                Some(text)
            }
            _ => None,
        };
        let stats = self.stats.clone();
        Reply::Later(Box::pin(async move {
            if let Some(stored) = stored
                && let Err(e) = stored.await
            {
                // The agent resends.
                cluster.not_stored(transport.name(), &e, &stats);
                return proto::error_reply(e);
            }
            let Some(text) = query else {
                return proto::ack();
            };
            let query = match parsed(&stats, Query::parse_off_workers(&text).await) {
                Ok(query) => query,
                Err(reply) => return reply,
            };
            // Its room, taken as the nodes' answers came, is kept until written.
            match cluster.query(&query, proto::approx_bytes).await {
                Ok((found, room)) => {
                    let answer = off_workers(move || room.hold(proto::events_reply(&found))).await;
                    let answer = answer.ok_or(QueryError::ShuttingDown);
                    replied(&stats, answer.and_then(|held| Ok(held?)))
                }
                Err(ClusterQueryError::Refused(e)) => replied(&stats, Err(e)),
                Err(e) => proto::error_reply(e.to_string()),
            }
        }))
    }

    /// Decodes and counts a frame; a refused one becomes its error reply.
    fn decode(
        &self,
        body: &[u8],
        transport: Transport,
        events: &mut Vec<Event>,
    ) -> Result<wire::Request, Bytes> {
        let (decoded, end) = self.decode_at(body, self.clock.now(), events, 0);
        wire::keep_slots(events, end);
        self.counted(decoded, transport, events.len())
    }

    /// [`wire::decode_msg_at`]; a `Msg` refused for a string that is not
    /// UTF-8 is decoded again from a copy with its strings repaired
    /// ([`wire::repair_utf8`]), counted.
    fn decode_at(
        &self,
        body: &[u8],
        now: Micros,
        events: &mut Vec<Event>,
        start: usize,
    ) -> (Result<wire::Request, DecodeError>, usize) {
        let decoded = wire::decode_msg_at(body, now, &self.limits, events, start);
        if !matches!(decoded.0, Err(DecodeError::InvalidUtf8(_))) {
            return decoded;
        }
        let Some((repaired, strings)) = wire::repair_utf8(body, 6) else {
            return decoded;
        };
        Stats::add(&self.stats.strings_repaired, strings as u64);
        wire::decode_msg_at(&repaired, now, &self.limits, events, start)
    }

    /// Counts a decoded frame of `decoded_events` events; a refused one
    /// becomes its error reply.
    fn counted(
        &self,
        decoded: Result<wire::Request, DecodeError>,
        transport: Transport,
        decoded_events: usize,
    ) -> Result<wire::Request, Bytes> {
        let request = match decoded {
            Ok(request) => request,
            // Refused whole: none of its events go anywhere.
            Err(e) => return Err(proto::error_reply(refusal(&self.stats, transport, e))),
        };
        if decoded_events > 0 {
            let counter = match transport {
                Transport::Tcp => &self.stats.tcp_events,
                Transport::Udp => &self.stats.udp_events,
            };
            Stats::add(counter, decoded_events as u64);
        }
        Ok(request)
    }

    /// A key lookup is answered at once; a query that scans the index, or
    /// takes compiling (see [`Query::compiles_at_once`]), is answered when
    /// the reply is awaited, by blocking threads.
    fn answer(&self, text: String) -> Reply {
        Stats::incr(&self.stats.queries);
        let (index, stats) = (self.index.clone(), self.stats.clone());
        if !Query::compiles_at_once(&text) {
            return Reply::Later(Box::pin(async move {
                match parsed(&stats, Query::parse_off_workers(&text).await) {
                    Ok(query) => answered(index, stats, query).wait().await,
                    Err(reply) => reply,
                }
            }));
        }
        match parsed(&stats, Query::parse(&text)) {
            Ok(query) => answered(index, stats, query),
            Err(reply) => Reply::Ready(reply),
        }
    }
}

/// A key lookup's answer now; a scan's when awaited, from a blocking thread.
fn answered(index: Arc<Index>, stats: Arc<Stats>, query: Query) -> Reply {
    if query.exact_key().is_some() {
        let found = index.query(&query).map(|found| proto::events_reply(&found));
        return Reply::Ready(replied(&stats, held(&index, found)));
    }
    Reply::Later(Box::pin(async move {
        // Its room taken as the scan finds it, then kept until written.
        let answer = (index.answer_then(&query, proto::approx_bytes, |found| {
            proto::events_reply(&found)
        }))
        .await;
        let held = answer.and_then(|(answer, room)| Ok(room.hold(answer)?));
        replied(&stats, held)
    }))
}

/// An encoded answer holding its room in `--max-answer-memory` until
/// written, or refused as busy when there is none.
fn held(index: &Index, answer: Result<Bytes, QueryError>) -> Result<Bytes, QueryError> {
    Ok(index.answers().hold(answer?)?)
}

/// A parsed query, or its error as a reply (counted).
fn parsed(stats: &Stats, query: Result<Query, crate::query::QueryError>) -> Result<Query, Bytes> {
    query.map_err(|e| {
        Stats::incr(&stats.query_errors);
        proto::error_reply(e.to_string())
    })
}

/// A query's answer, or its error as a reply (a refused one counted).
fn replied(stats: &Stats, answer: Result<Bytes, QueryError>) -> Bytes {
    answer.unwrap_or_else(|e| {
        if let QueryError::TooMany { .. } | QueryError::TimedOut { .. } = e {
            Stats::incr(&stats.query_errors);
        }
        proto::error_reply(e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::clock::ManualClock;
    use crate::index::IndexConfig;
    use crate::proto::{Msg, PbEvent};
    use crate::streams::IndexEverything;

    fn ingest() -> Ingest {
        let index = Arc::new(Index::new(IndexConfig::default()));
        Ingest {
            streams: Arc::new(IndexEverything::new(index.clone())),
            index,
            clock: Arc::new(ManualClock::new(1)),
            stats: Arc::new(Stats::default()),
            limits: Limits::DEFAULT,
            cluster: None,
        }
    }

    fn msg(events: usize) -> Vec<u8> {
        let event = PbEvent {
            host: Some("h".into()),
            ..PbEvent::default()
        };
        Msg {
            events: vec![event; events],
            ..Msg::default()
        }
        .encode_to_vec()
    }

    fn query(text: &str) -> Vec<u8> {
        let query = crate::proto::PbQuery {
            string: Some(text.into()),
        };
        let msg = Msg {
            query: Some(query),
            ..Msg::default()
        };
        msg.encode_to_vec()
    }

    /// Queries with patterns are parsed when their reply is awaited (off
    /// the async workers), and answered or refused as any other.
    #[tokio::test]
    async fn a_query_with_patterns_is_parsed_when_its_reply_is_awaited() {
        let ingest = ingest();
        let mut events = Vec::new();
        let event = PbEvent {
            host: Some("h".into()),
            service: Some("s".into()),
            ..PbEvent::default()
        };
        let msg = Msg {
            events: vec![event],
            ..Msg::default()
        };
        ingest.handle_frame(&msg.encode_to_vec(), Transport::Tcp, &mut events);
        let cases = [
            (r#"host ~= "^h$""#, true, 1),
            (r#"host = "h" and service = "s" and host ~= "h""#, true, 1),
            (r#"host ~= "(""#, false, 0),
        ];
        for (text, ok, found) in cases {
            let reply = ingest.handle_frame(&query(text), Transport::Tcp, &mut events);
            assert!(matches!(reply, Reply::Later(_)), "{text}");
            let reply = Msg::decode(reply.wait().await).unwrap();
            assert_eq!(reply.ok, Some(ok), "{text}: {reply:?}");
            assert_eq!(reply.events.len(), found, "{text}");
        }
        assert_eq!(Stats::get(&ingest.stats.queries), 3);
        assert_eq!(Stats::get(&ingest.stats.query_errors), 1);
        let reply = ingest.handle_frame(
            &query(r#"host = "h" and service = "s""#),
            Transport::Tcp,
            &mut events,
        );
        let Reply::Ready(reply) = reply else {
            panic!("a key lookup without patterns is answered at once");
        };
        assert_eq!(Msg::decode(reply).unwrap().events.len(), 1);
    }

    #[test]
    fn a_connection_keeps_at_most_keep_events_decoded_events() {
        let ingest = ingest();
        let mut events = Vec::new();
        ingest.handle_frame(&msg(50_000), Transport::Tcp, &mut events);
        assert_eq!(Stats::get(&ingest.stats.tcp_events), 50_000);
        assert_eq!(events.len(), KEEP_EVENTS);
        assert!(events.capacity() < 50_000, "{}", events.capacity());
        ingest.handle_frame(&msg(10), Transport::Tcp, &mut events);
        assert_eq!(events.len(), 10);
    }
}
