//! Graphite's plaintext protocol in (`--graphite ADDR`, carbon's port 2003),
//! as Riemann's `graphite-server` takes it, over TCP and UDP on one address.
//!
//! A line is `path value timestamp`, fields separated by runs of whitespace,
//! ended by `\n` (a `\r` before it is dropped). It becomes an event with
//! `service = path`, the value as a float metric (Riemann parses it as a
//! double, so `42` is `42.0`) and `time` from the timestamp in seconds
//! (fractions kept, as carbon keeps them; Riemann takes whole seconds only);
//! no host, state or TTL. As in Riemann a line with more than three fields, a
//! blank path (an empty line, or one starting with whitespace), or no value
//! or no timestamp is refused, and so is one whose value or timestamp is not
//! a number; a `nan` value is dropped (carbon drops it too; collectd sends it
//! for a value it does not know yet). A path over `--max-string` is refused.
//! Refused lines are counted and warned about at most every 10 s.
//!
//! Bounds, as the Riemann TCP listener has them (its accept loop,
//! [`tcp::accept_loop`]):
//! - at most `--max-connections` open at once, a pool of its own, so a flood
//!   of Graphite clients cannot lock Riemann agents out (nor the reverse);
//!   one more is accepted and closed at once, counted;
//! - a line is at most [`MAX_LINE`] bytes, carbon's own limit (so no Graphite
//!   client sends longer): a longer one is dropped as it arrives, nothing of
//!   it held, counted, and the connection goes on after its newline. A
//!   connection holds at most that plus one read, so it takes nothing from
//!   the shared budget of large messages ([`crate::budget`]);
//! - a line, once begun, must end within `--read-timeout` (checked at that
//!   interval, so at most twice it), or the connection is closed: trickling
//!   bytes does not extend it. An idle connection is kept, probed by TCP
//!   keepalive, as Riemann's are.
//!
//! The lines of one TCP read go through the pipeline as one batch: the local
//! streams, or in a cluster JetStream; so do those of the UDP datagrams
//! queued together, up to [`MAX_BATCH`] lines, as the Riemann UDP listener
//! batches its datagrams ([`crate::udp`]). Datagrams the kernel dropped
//! (the socket's receive buffer full) are counted as that listener counts
//! its own. A line has no ack to refuse
//! it with, so points the cluster does not store are dropped and counted.

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bounded::{LogGate, RefusalLog};
use crate::clock::secs_to_micros;
use crate::event::{Event, Metric};
use crate::ingest::Ingest;
use crate::limits::{Exceeded, Limits, start_of};
use crate::stats::Stats;
use crate::{tcp, udp, wire};

/// Carbon's longest line (Twisted's `LineOnlyReceiver`): its clients never
/// send longer, as carbon closes the connection on one.
pub const MAX_LINE: usize = 16 * 1024;

/// Points handed to the pipeline at once, and lines of queued datagrams
/// read together: a read of short lines holds thousands, and the rules'
/// batch should stay small enough to be quick.
const MAX_BATCH: usize = 1024;

/// What a read asks room for in a connection's buffer.
const READ_CHUNK: usize = 8 * 1024;

/// Largest UDP payload: a datagram is received whole.
const MAX_DATAGRAM: usize = 64 * 1024;

/// How much of a refused line its warning quotes.
const QUOTED: usize = 200;

/// Why a line was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LineError {
    #[error("too many fields (a line is `path value timestamp`)")]
    TooManyFields,
    #[error("blank path")]
    BlankPath,
    #[error("no value")]
    NoValue,
    #[error("no timestamp")]
    NoTimestamp,
    #[error("value {0:?} is not a number")]
    InvalidValue(String),
    #[error("timestamp {0:?} is not a finite number of seconds")]
    InvalidTimestamp(String),
    #[error(transparent)]
    Over(#[from] Exceeded),
}

/// Java's `\s`, which Riemann splits lines on (vertical tab included).
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0B' | '\x0C' | '\r')
}

/// One line (without its `\n`) as an event; `Ok(None)` for a NaN value,
/// dropped. Fields are split as Riemann splits them: a leading run of
/// whitespace leaves an empty first field (the blank path), trailing ones
/// are ignored.
pub fn parse_line(line: &str, limits: &Limits) -> Result<Option<Event>, LineError> {
    let line = line.trim_end_matches(is_space);
    let (path, rest) = line.split_once(is_space).unwrap_or((line, ""));
    let mut fields = rest.split(is_space).filter(|field| !field.is_empty());
    let (value, timestamp) = (fields.next(), fields.next());
    if fields.next().is_some() {
        return Err(LineError::TooManyFields);
    }
    if path.is_empty() {
        return Err(LineError::BlankPath);
    }
    let value = value.ok_or(LineError::NoValue)?;
    let timestamp = timestamp.ok_or(LineError::NoTimestamp)?;
    limits.check_string("service", path)?;
    let quoted = |field: &str| start_of(field, QUOTED).to_owned();
    let metric: f64 = (value.parse()).map_err(|_| LineError::InvalidValue(quoted(value)))?;
    let secs = (timestamp.parse::<f64>().ok())
        .filter(|secs| secs.is_finite())
        .ok_or_else(|| LineError::InvalidTimestamp(quoted(timestamp)))?;
    if metric.is_nan() {
        return Ok(None);
    }
    Ok(Some(Event {
        service: Some(path.to_owned()),
        metric: Some(Metric::Float(metric)),
        time: secs_to_micros(secs),
        ..Event::default()
    }))
}

/// A line's text, and whether it was not UTF-8: Riemann's decoder takes
/// such a line with its bad bytes replaced, as the other transports do
/// ([`wire::repair`]). A valid line, nearly every one, is checked once and
/// borrowed; only a repaired one is copied.
pub fn line_text(line: &[u8]) -> (Cow<'_, str>, bool) {
    match std::str::from_utf8(line) {
        Ok(text) => (Cow::Borrowed(text), false),
        Err(_) => {
            let (text, repaired) = wire::repaired_string(line.to_vec());
            (Cow::Owned(text), repaired)
        }
    }
}

/// What [`Lines::next_line`] found in the bytes read so far.
#[derive(Debug, PartialEq)]
enum Line {
    /// A whole line, without its `\n`.
    Whole(BytesMut),
    /// A line over [`MAX_LINE`]: what came of it is dropped, and so is what
    /// comes until its `\n`.
    TooLong,
}

/// A connection's bytes split into lines, holding at most [`MAX_LINE`] of
/// an unfinished one.
#[derive(Default)]
struct Lines {
    buf: BytesMut,
    /// How far `buf` is known to hold no `\n`: a line trickled in is not
    /// searched again from its start at each read.
    scanned: usize,
    /// Dropping the rest of a line over [`MAX_LINE`], up to its `\n`.
    discarding: bool,
    /// Lines ended (by their `\n`) so far, over-long ones included.
    ended: u64,
}

impl Lines {
    /// Where a read puts its bytes, with room for [`READ_CHUNK`] of them.
    fn read_buf(&mut self) -> &mut BytesMut {
        self.buf.reserve(READ_CHUNK);
        &mut self.buf
    }

    /// Whether part of a line has arrived and not its end.
    fn begun(&self) -> bool {
        !self.buf.is_empty() || self.discarding
    }

    /// Whether bytes of a line within the limit wait for its end.
    fn partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next line read, if one has ended (or gone over the limit).
    fn next_line(&mut self) -> Option<Line> {
        loop {
            let newline = (self.buf[self.scanned..].iter())
                .position(|&b| b == b'\n')
                .map(|at| self.scanned + at);
            self.scanned = 0;
            match newline {
                Some(end) => {
                    self.ended += 1;
                    if std::mem::take(&mut self.discarding) {
                        self.buf.advance(end + 1);
                        continue;
                    }
                    if end > MAX_LINE {
                        self.buf.advance(end + 1);
                        return Some(Line::TooLong);
                    }
                    let mut line = self.buf.split_to(end + 1);
                    line.truncate(end);
                    return Some(Line::Whole(line));
                }
                None if self.discarding => self.buf.clear(),
                None if self.buf.len() > MAX_LINE => {
                    self.buf.clear();
                    self.discarding = true;
                    return Some(Line::TooLong);
                }
                None => self.scanned = self.buf.len(),
            }
            return None;
        }
    }
}

/// What the Graphite listeners share.
pub struct Graphite {
    /// The pipeline (or the cluster), the counters and `--max-string`.
    pub ingest: Arc<Ingest>,
    pub read_timeout: Duration,
    /// One per open TCP connection: `--max-connections`, apart from the
    /// Riemann listeners' own.
    pub permits: Arc<Semaphore>,
    pub refusals: RefusalLog,
    /// Refused lines are warned about through this: a misconfigured agent
    /// must be seen, its every line must not fill the log.
    pub bad_lines: LogGate,
    /// Points the cluster did not store, likewise.
    pub not_stored: LogGate,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

/// Accepts until shutdown, each connection on a task of its own.
pub async fn serve_tcp(listener: TcpListener, graphite: Arc<Graphite>) {
    let each = tcp::Listener {
        name: "graphite",
        stats: &graphite.ingest.stats,
        permits: &graphite.permits,
        refusals: &graphite.refusals,
        read_timeout: graphite.read_timeout,
        shutdown: &graphite.shutdown,
        tracker: &graphite.tracker,
        accepted: |stats| &stats.graphite_connections,
        open: |stats| &stats.graphite_connections_open,
        refused: |stats| &stats.graphite_connections_refused,
    };
    tcp::accept_loop(listener, each, |socket, peer| {
        let conn = graphite.clone();
        async move { conn.handle(socket, peer).await }
    })
    .await;
}

/// Takes datagrams until shutdown: each holds whole lines, the last one
/// with or without its `\n`. Datagrams already queued when one arrives are
/// read with it, up to [`MAX_BATCH`] lines in all, and their points go
/// through the pipeline as one batch: collectd sends a line per datagram,
/// and a flood of those must not cost a pass through the rules each.
pub async fn serve_udp(socket: UdpSocket, graphite: Arc<Graphite>) {
    let stats = graphite.ingest.stats.clone();
    let mut buf = vec![0; MAX_DATAGRAM];
    let mut events = Vec::new();
    let mut drops = udp::ReceiveDrops::of(&socket);
    loop {
        let mut received = tokio::select! {
            received = socket.recv_from(&mut buf) => received,
            dropped = drops.next() => {
                Stats::set(&stats.graphite_udp_receive_drops, dropped);
                continue;
            }
            () = graphite.shutdown.cancelled() => return,
        };
        let mut lines = 0;
        loop {
            lines += match received {
                Ok((len, peer)) => graphite.take_datagram(&buf[..len], peer, &mut events).await,
                Err(e) => {
                    tracing::debug!(error = %e, "Graphite UDP receive failed.");
                    1
                }
            };
            if lines >= MAX_BATCH {
                break;
            }
            received = match socket.try_recv_from(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                received => received,
            };
        }
        graphite.deliver(&mut events).await;
    }
}

impl Graphite {
    async fn handle<S: AsyncRead + Unpin>(
        &self,
        mut socket: S,
        peer: SocketAddr,
    ) -> io::Result<()> {
        let stats = &self.ingest.stats;
        let mut lines = Lines::default();
        let mut events = Vec::new();
        // Closing needs a line begun at two checks with none ended between
        // them: then it is one line, begun at least a timeout ago.
        let first = Instant::now() + self.read_timeout;
        let mut check = tokio::time::interval_at(first, self.read_timeout);
        // Checks missed while the pipeline held this task must not come
        // back to back, with no read between them.
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut begun_at_check = None;
        loop {
            let read = tokio::select! {
                read = socket.read_buf(lines.read_buf()) => read?,
                _ = check.tick() => {
                    let begun = lines.begun().then_some(lines.ended);
                    if begun.is_some() && begun == begun_at_check {
                        Stats::incr(&stats.graphite_read_timeouts);
                        tracing::debug!(%peer, timeout = ?self.read_timeout, "No end of a Graphite line in time; closing the connection.");
                        return Ok(());
                    }
                    begun_at_check = begun;
                    continue;
                }
                () = self.shutdown.cancelled() => return Ok(()),
            };
            if read == 0 {
                if lines.partial() {
                    Stats::incr(&stats.graphite_lines_truncated);
                }
                return Ok(());
            }
            while let Some(line) = lines.next_line() {
                match line {
                    Line::Whole(line) => self.take(&line, peer, &mut events),
                    Line::TooLong => self.too_long(peer),
                }
                if events.len() >= MAX_BATCH {
                    self.deliver(&mut events).await;
                }
            }
            self.deliver(&mut events).await;
        }
    }

    /// Takes the lines of one datagram into `events`, handing them to the
    /// pipeline whenever [`MAX_BATCH`] are held; how many lines it held (an
    /// empty datagram counts as one, so a flood of them is bounded too).
    async fn take_datagram(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        events: &mut Vec<Event>,
    ) -> usize {
        let mut taken = 0;
        let mut lines = datagram.split(|&b| b == b'\n').peekable();
        while let Some(line) = lines.next() {
            if line.is_empty() && lines.peek().is_none() {
                break;
            }
            taken += 1;
            match line.len() > MAX_LINE {
                true => self.too_long(peer),
                false => self.take(line, peer, events),
            }
            if events.len() >= MAX_BATCH {
                self.deliver(events).await;
            }
        }
        taken.max(1)
    }

    /// Parses one line (without its `\n`) into `events`, or counts why not.
    fn take(&self, line: &[u8], peer: SocketAddr, events: &mut Vec<Event>) {
        let stats = &self.ingest.stats;
        let line = match line {
            [text @ .., b'\r'] => text,
            line => line,
        };
        let (line, repaired) = line_text(line);
        if repaired {
            Stats::incr(&stats.strings_repaired);
        }
        match parse_line(&line, &self.ingest.limits) {
            Ok(Some(event)) => events.push(event),
            Ok(None) => Stats::incr(&stats.graphite_lines_nan),
            Err(error) => {
                let counter = match &error {
                    LineError::Over(over) => over.limit.counter(stats),
                    _ => &stats.graphite_lines_invalid,
                };
                Stats::incr(counter);
                self.refused(peer, &error.to_string(), start_of(&line, QUOTED));
            }
        }
    }

    fn too_long(&self, peer: SocketAddr) {
        Stats::incr(&self.ingest.stats.graphite_lines_oversized);
        let error = format!("line over {MAX_LINE} bytes");
        self.refused(peer, &error, "");
    }

    /// Warns of a refused line at most every 10 s, at debug otherwise.
    fn refused(&self, peer: SocketAddr, error: &str, line: &str) {
        if self.bad_lines.open() {
            tracing::warn!(%peer, error, line, "Graphite line refused (more are logged at most every 10 s; all are counted in vigil_graphite_lines_*_total, a path over --max-string in vigil_msgs_over_max_string_total).");
        } else {
            tracing::debug!(%peer, error, line, "Graphite line refused.");
        }
    }

    /// Hands `events` to the pipeline (in a cluster, to JetStream) and
    /// empties it.
    async fn deliver(&self, events: &mut Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let stats = &self.ingest.stats;
        Stats::add(&stats.graphite_events, events.len() as u64);
        match &self.ingest.cluster {
            None => self.ingest.streams.process(events),
            Some(cluster) => {
                if let Err(error) = cluster.publish(events).await {
                    // No ack to refuse them with: the points are lost.
                    Stats::add(&stats.graphite_events_dropped, events.len() as u64);
                    if self.not_stored.open() {
                        let dropped = Stats::get(&stats.graphite_events_dropped);
                        tracing::warn!(
                            error,
                            dropped,
                            "Graphite points dropped: the cluster did not store them (warned at most every 10 s; counted in vigil_graphite_events_dropped_total)."
                        );
                    }
                }
            }
        }
        events.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::MICROS_PER_SEC;
    use crate::limits::Limit;

    fn parse(line: &str) -> Result<Option<Event>, LineError> {
        parse_line(line, &Limits::DEFAULT)
    }

    fn point(line: &str) -> (String, Metric, i64) {
        let event = parse(line).unwrap().expect("a point");
        let service = event.service.clone().unwrap();
        assert_eq!((event.host, event.state, event.ttl), (None, None, None));
        (service, event.metric.unwrap(), event.time)
    }

    #[test]
    fn a_line_is_path_value_and_seconds() {
        let at = |secs: i64| secs * MICROS_PER_SEC;
        assert_eq!(
            point("servers.web1.cpu 42 1700000000"),
            (
                "servers.web1.cpu".into(),
                Metric::Float(42.0),
                at(1_700_000_000)
            )
        );
        // Any runs of spaces and tabs between fields, trailing ones ignored.
        assert_eq!(
            point("a.b\t\t-0.25   456\t \r"),
            ("a.b".into(), Metric::Float(-0.25), at(456))
        );
        assert_eq!(point("a 1e3 0").1, Metric::Float(1000.0));
        assert_eq!(point("a inf 0").1, Metric::Float(f64::INFINITY));
    }

    #[test]
    fn the_value_is_a_float_even_when_written_as_an_integer() {
        assert!(matches!(point("a 7 1").1, Metric::Float(v) if v == 7.0));
    }

    #[test]
    fn timestamps_keep_fractions_and_may_be_negative() {
        assert_eq!(point("a 1 1700000000.25").2, 1_700_000_000_250_000);
        assert_eq!(point("a 1 -12.5").2, -12_500_000);
    }

    #[test]
    fn a_nan_value_is_dropped_not_refused() {
        for value in ["nan", "NaN", "-nan"] {
            assert_eq!(parse(&format!("a {value} 1")), Ok(None), "{value}");
        }
    }

    #[test]
    fn malformed_lines_are_refused_with_the_reason() {
        use LineError::*;
        let cases = [
            ("a 1 2 3", TooManyFields),
            ("name with space 1 2", TooManyFields),
            (" a 1 2", TooManyFields),
            ("", BlankPath),
            ("   ", BlankPath),
            (" a 1", BlankPath),
            ("a", NoValue),
            ("a ", NoValue),
            ("a 1", NoTimestamp),
            ("a one 2", InvalidValue("one".into())),
            ("a 1 two", InvalidTimestamp("two".into())),
            ("a 1 nan", InvalidTimestamp("nan".into())),
            ("a 1 inf", InvalidTimestamp("inf".into())),
        ];
        for (line, error) in cases {
            assert_eq!(parse(line), Err(error), "{line:?}");
        }
    }

    #[test]
    fn a_line_not_utf8_is_taken_with_its_bad_bytes_replaced() {
        let (text, repaired) = line_text(b"a.b 1 2");
        assert!(matches!(text, Cow::Borrowed("a.b 1 2")) && !repaired);
        let (text, repaired) = line_text(b"a\xff\xfe.b 1 2");
        assert_eq!((text.as_ref(), repaired), ("a??.b 1 2", true));
        assert_eq!(point(&text).0, "a??.b");
    }

    #[test]
    fn a_path_over_max_string_is_refused() {
        let limits = Limits {
            max_string: 4,
            ..Limits::DEFAULT
        };
        assert!(parse_line("abcd 1 2", &limits).unwrap().is_some());
        let Err(LineError::Over(over)) = parse_line("abcde 1 2", &limits) else {
            panic!("not refused");
        };
        assert_eq!((over.limit, over.size), (Limit::String, 5));
        assert_eq!(
            over.to_string(),
            "service of 5 bytes exceeds --max-string 4"
        );
    }

    /// The services of each batch the pipeline got.
    #[derive(Default)]
    struct Batches(parking_lot::Mutex<Vec<Vec<String>>>);

    impl crate::streams::Streams for Batches {
        fn process(&self, events: &[Event]) {
            let services = events.iter().filter_map(|e| e.service.clone());
            self.0.lock().push(services.collect());
        }
    }

    const PEER: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);
    const TIMEOUT: Duration = Duration::from_secs(10);

    fn graphite(batches: Arc<Batches>) -> Graphite {
        use crate::index::{Index, IndexConfig};
        Graphite {
            ingest: Arc::new(Ingest {
                index: Arc::new(Index::new(IndexConfig::default())),
                streams: batches,
                clock: Arc::new(crate::clock::ManualClock::new(1)),
                stats: Arc::default(),
                limits: Limits::DEFAULT,
                cluster: None,
            }),
            read_timeout: TIMEOUT,
            permits: crate::bounded::connection_permits(1),
            refusals: RefusalLog::default(),
            bad_lines: LogGate::default(),
            not_stored: LogGate::default(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// `graphite` handling one connection, and the client's end of it.
    fn connected(
        graphite: &Arc<Graphite>,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let graphite = graphite.clone();
        let handled = tokio::spawn(async move { graphite.handle(server, PEER).await });
        (client, handled)
    }

    #[tokio::test(start_paused = true)]
    async fn the_lines_of_a_read_are_one_batch_and_bad_ones_are_counted() {
        use tokio::io::AsyncWriteExt;
        let batches = Arc::new(Batches::default());
        let graphite = Arc::new(graphite(batches.clone()));
        let (mut client, handled) = connected(&graphite);
        let read = b"a 1 2\r\nbad line\nb nan 3\n\nc 2 3\nd 1";
        client.write_all(read).await.unwrap();
        drop(client);
        handled.await.unwrap().unwrap();
        assert_eq!(*batches.0.lock(), [vec!["a", "c"]]);
        let stats = &graphite.ingest.stats;
        let count = |counter| Stats::get(counter);
        assert_eq!(count(&stats.graphite_events), 2);
        assert_eq!(
            count(&stats.graphite_lines_invalid),
            2,
            "bad line, blank line"
        );
        assert_eq!(count(&stats.graphite_lines_nan), 1);
        assert_eq!(count(&stats.graphite_lines_truncated), 1, "d, cut off");
        assert!(!graphite.bad_lines.open(), "the first refusal warned");
    }

    #[tokio::test(start_paused = true)]
    async fn an_over_long_line_is_counted_and_the_connection_goes_on() {
        use tokio::io::AsyncWriteExt;
        let batches = Arc::new(Batches::default());
        let graphite = Arc::new(graphite(batches.clone()));
        let (mut client, handled) = connected(&graphite);
        client.write_all(&[b'x'; 3 * MAX_LINE]).await.unwrap();
        client.write_all(b" 1 2\ne 1 2\n").await.unwrap();
        drop(client);
        handled.await.unwrap().unwrap();
        assert_eq!(batches.0.lock().concat(), ["e"]);
        let stats = &graphite.ingest.stats;
        assert_eq!(Stats::get(&stats.graphite_lines_oversized), 1);
        assert_eq!(Stats::get(&stats.graphite_lines_invalid), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_line_begun_and_not_ended_closes_the_connection() {
        use tokio::io::AsyncWriteExt;
        let batches = Arc::new(Batches::default());
        let graphite = Arc::new(graphite(batches.clone()));
        let (mut client, handled) = connected(&graphite);
        let started = Instant::now();
        client.write_all(b"a 1 2\nb 1").await.unwrap();
        let closed = tokio::time::timeout(10 * TIMEOUT, handled).await;
        closed.expect("closed").unwrap().unwrap();
        // Begun at the first check, still at the second: closed then.
        assert_eq!(started.elapsed(), 2 * TIMEOUT);
        assert_eq!(Stats::get(&graphite.ingest.stats.graphite_read_timeouts), 1);
        assert_eq!(*batches.0.lock(), [vec!["a"]]);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_and_lines_ended_in_time_are_kept() {
        use tokio::io::AsyncWriteExt;
        let batches = Arc::new(Batches::default());
        let graphite = Arc::new(graphite(batches.clone()));
        let (mut client, handled) = connected(&graphite);
        tokio::time::sleep(10 * TIMEOUT).await;
        // Each line trickled over most of a timeout: it spans one check at most.
        for _ in 0..10 {
            client.write_all(b"slow 1").await.unwrap();
            tokio::time::sleep(TIMEOUT - Duration::from_secs(1)).await;
            client.write_all(b" 2\n").await.unwrap();
        }
        tokio::time::sleep(10 * TIMEOUT).await;
        assert!(!handled.is_finished());
        assert_eq!(Stats::get(&graphite.ingest.stats.graphite_read_timeouts), 0);
        assert_eq!(batches.0.lock().concat().len(), 10);
        drop(client);
        handled.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn queued_datagrams_are_one_batch_of_at_most_max_batch_lines() {
        let batches = Arc::new(Batches::default());
        let graphite = Arc::new(graphite(batches.clone()));
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sender.connect(socket.local_addr().unwrap()).await.unwrap();
        // Queued before the listener reads any, as when a burst outruns it.
        let many =
            |name: &str| -> String { (0..600).map(|i| format!("{name}{i} 1 2\n")).collect() };
        let datagrams = [
            "a 1 2".to_owned(),
            "b 1 2\n".to_owned(),
            String::new(),
            "bad\n".to_owned(),
            many("m"),
            many("n"),
        ];
        for datagram in &datagrams {
            sender.send(datagram.as_bytes()).await.unwrap();
        }
        let served = tokio::spawn(serve_udp(socket, graphite.clone()));
        let stats = &graphite.ingest.stats;
        let taken = async {
            while Stats::get(&stats.graphite_events) < 1202 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(TIMEOUT, taken)
            .await
            .expect("every point taken");
        // a, b and m: 602 points; with n's first 422 the batch is full, and
        // the lines taken (an empty datagram counting as one) too.
        let sizes: Vec<usize> = batches.0.lock().iter().map(Vec::len).collect();
        assert_eq!(sizes, [MAX_BATCH, 1202 - MAX_BATCH]);
        assert_eq!(batches.0.lock()[0][..3], ["a", "b", "m0"]);
        assert_eq!(Stats::get(&stats.graphite_lines_invalid), 1);
        graphite.shutdown.cancel();
        served.await.unwrap();
    }

    fn feed(lines: &mut Lines, bytes: &[u8]) -> Vec<Line> {
        lines.read_buf().extend_from_slice(bytes);
        std::iter::from_fn(|| lines.next_line()).collect()
    }

    fn whole(text: &str) -> Line {
        Line::Whole(BytesMut::from(text))
    }

    #[test]
    fn lines_are_split_across_reads() {
        let mut lines = Lines::default();
        assert_eq!(feed(&mut lines, b"a 1 2\nb 3"), [whole("a 1 2")]);
        assert!(lines.begun());
        assert_eq!(feed(&mut lines, b" 4"), []);
        assert_eq!(feed(&mut lines, b"\n\n"), [whole("b 3 4"), whole("")]);
        assert!(!lines.begun());
        assert_eq!(lines.ended, 3);
    }

    #[test]
    fn an_over_long_line_is_dropped_and_the_next_one_read() {
        let mut lines = Lines::default();
        let long = vec![b'x'; MAX_LINE + 1];
        // Whole in one read.
        let mut read = long.clone();
        read.extend_from_slice(b"\na 1 2\n");
        assert_eq!(feed(&mut lines, &read), [Line::TooLong, whole("a 1 2")]);
        // Arriving over several reads: refused once over, nothing of it kept.
        assert_eq!(feed(&mut lines, &long[..MAX_LINE]), []);
        assert_eq!(feed(&mut lines, b"xx"), [Line::TooLong]);
        assert!(lines.begun() && !lines.partial());
        assert_eq!(feed(&mut lines, &long), []);
        assert_eq!(lines.buf.len(), 0);
        assert_eq!(feed(&mut lines, b"x\nb 1 2\n"), [whole("b 1 2")]);
        assert!(!lines.begun());
        // A line of exactly the limit is whole.
        let mut read = vec![b'y'; MAX_LINE];
        read.push(b'\n');
        assert_eq!(feed(&mut lines, &read).len(), 1);
    }
}
