//! Graphite (carbon) plaintext protocol over TCP: one `path value seconds\n`
//! line per event with a metric.
//!
//! Paths follow Riemann by default: host labels reversed (`a.b.com` →
//! `com.b.a`), then the service's words (`cpu user` → `cpu.user`), with a
//! trailing percentile written without its `0.` (`0.95` → `95`). A `path`
//! template replaces that layout; its dots separate segments.
//!
//! Every segment is sanitised to `[A-Za-z0-9_-]` (anything else becomes `_`)
//! and empty segments are left out: carbon turns segments into directory and
//! file names, and other characters either break that or Graphite's queries.
//!
//! Skipped (and counted apart from loss): events without a metric, with a
//! NaN or infinite one, or with an empty path (nothing to graph). Dropped
//! (and counted): points whose line is over
//! carbon's [`MAX_LINE`]; and points beyond [`BUFFER_LINES`] or
//! [`BUFFER_BYTES`] while carbon is unreachable (the newest ones: a queue
//! keeps its order).
//!
//! The plaintext protocol has no acknowledgement, so a point counts as
//! delivered once carbon's TCP acknowledged its bytes (on Linux; elsewhere
//! once written). Lines go out in batches of up to 1000, one write each.
//! When a connection fails, every line not yet acknowledged on it, and a
//! partly written batch, go out again on the next: carbon overwrites a point
//! sent twice, so a repeat does no harm, and a carbon that vanished (see
//! [`limit_unacked`](crate::bounded::limit_unacked)) loses nothing that
//! had not reached it.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use super::Delivery;
use super::template::Template;
use crate::bounded::unacked_bytes;
use crate::clock::MICROS_PER_SEC;
use crate::dial;
use crate::event::{Event, Metric};

/// Points kept while carbon is unreachable (about 6 MB of lines).
pub const BUFFER_LINES: usize = 100_000;
/// And at most this many bytes of them: hosts and services may be up to
/// `--max-string` long, and so may their lines.
pub const BUFFER_BYTES: usize = 64 * 1024 * 1024;
/// The longest line carbon takes, newline excluded: its line receiver
/// (twisted's `LineOnlyReceiver`) closes the connection on a longer one and
/// ignores every line after it in the same read, so one such point would
/// lose its neighbours too, after TCP had acknowledged them.
pub const MAX_LINE: usize = 16_384;
/// Events taken from the queue, and lines written, at a time.
const BATCH: usize = 1000;
/// Bytes written at a time (one line at least).
const WRITE_BYTES: usize = 1024 * 1024;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Riemann reconnects every 5 s; so do we at worst.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A blackholed host must not stall the output for minutes.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A carbon that stopped reading counts as down.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often acknowledgements are checked while lines wait for them and
/// nothing is being written.
const ACK_POLL: Duration = Duration::from_millis(200);
/// How long shutdown keeps trying to flush; less than the caller's bound, so
/// what is left is counted as dropped rather than left in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub host: String,
    pub port: u16,
    /// Prepended to every path, e.g. `vigil.prod`.
    pub prefix: Option<String>,
    /// By default Riemann's layout: reversed host labels, then the service.
    pub path: Option<Template>,
}

pub async fn run(config: Config, delivery: Delivery, shutdown: CancellationToken) {
    Graphite::new(config, BUFFER_LINES, BUFFER_BYTES)
        .drive(delivery, shutdown)
        .await;
}

// ---- lines -----------------------------------------------------------------

/// The carbon line for an event, or `None` when it has nothing graphable.
fn line(config: &Config, event: &Event) -> Option<String> {
    let value = value(event.metric?)?;
    let path = path(config, event)?;
    let secs = event.time.div_euclid(MICROS_PER_SEC);
    Some(format!("{path} {value} {secs}\n"))
}

/// Integers as integers; floats in their shortest exact form. Carbon cannot
/// store NaN or infinities.
fn value(metric: Metric) -> Option<String> {
    match metric {
        Metric::Int(i) => Some(i.to_string()),
        Metric::Float(f) if f.is_finite() => Some(f.to_string()),
        Metric::Float(_) => None,
    }
}

/// The sanitised dotted path (prefix first), or `None` when it is empty.
fn path(config: &Config, event: &Event) -> Option<String> {
    let prefix = config.prefix.as_deref().unwrap_or("");
    let body = match &config.path {
        Some(template) => template.render(event),
        None => riemann_path(event),
    };
    let mut out = String::new();
    for segment in prefix.split('.').chain(body.split('.')) {
        if segment.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push('.');
        }
        push_sanitized(&mut out, segment);
    }
    (!out.is_empty()).then_some(out)
}

/// Riemann's default layout, still unsanitised: `web1.example.com` + `cpu
/// user 0.95` → `com.example.web1.cpu.user.95`.
fn riemann_path(event: &Event) -> String {
    let mut out = String::new();
    for label in event.host_str().split('.').rev() {
        out.push_str(label);
        out.push('.');
    }
    let mut words: Vec<&str> = event.service_str().split(' ').collect();
    if let Some(last) = words.last_mut() {
        *last = percentile(last).unwrap_or(last);
    }
    out.push_str(&words.join("."));
    out
}

/// `0.95` → `95`: the dot would otherwise split a percentile in two.
fn percentile(word: &str) -> Option<&str> {
    let digits = word.strip_prefix("0.")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(digits)
}

fn push_sanitized(out: &mut String, segment: &str) {
    let safe = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    out.extend(segment.chars().map(|c| if safe(c) { c } else { '_' }));
}

// ---- delivery ----------------------------------------------------------------

/// The output's state: lines not yet written, lines written but not yet
/// acknowledged, and the connection to carbon.
struct Graphite {
    config: Config,
    /// Lines taken from the queue and not yet written; each one is an event
    /// in flight.
    pending: VecDeque<String>,
    /// The bytes of `pending`.
    pending_bytes: usize,
    /// Lines written on the current connection whose bytes carbon's TCP has
    /// not acknowledged yet, oldest first; also in flight.
    unacked: VecDeque<String>,
    /// The bytes of `unacked`.
    unacked_bytes: usize,
    /// When to look for acknowledgements next while lines wait for them.
    ack_check_at: Instant,
    /// The most lines `pending` and `unacked` hold together
    /// ([`BUFFER_LINES`] outside tests).
    capacity: usize,
    /// The most bytes they hold together ([`BUFFER_BYTES`] outside tests).
    capacity_bytes: usize,
    conn: Option<TcpStream>,
    /// No connection attempt before this.
    retry_at: Instant,
    backoff: Duration,
    /// Set while carbon is unreachable, so an outage is logged once.
    down_since: Option<Instant>,
    /// Whether this outage has already overflowed (logged once).
    overflowed: bool,
    /// Whether a line over [`MAX_LINE`] was dropped yet (logged once).
    warned_too_long: bool,
    /// Reused for each write, so a batch costs one allocation at most.
    scratch: Vec<u8>,
}

impl Graphite {
    fn new(config: Config, capacity: usize, capacity_bytes: usize) -> Self {
        Graphite {
            config,
            pending: VecDeque::new(),
            pending_bytes: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            ack_check_at: Instant::now(),
            capacity,
            capacity_bytes,
            conn: None,
            retry_at: Instant::now(),
            backoff: BACKOFF_MIN,
            down_since: None,
            overflowed: false,
            warned_too_long: false,
            scratch: Vec::new(),
        }
    }

    async fn drive(mut self, mut delivery: Delivery, shutdown: CancellationToken) {
        loop {
            if self.due() {
                self.send(&delivery).await;
                continue;
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                batch = delivery.next_batch(BATCH) => match batch {
                    Some(events) => self.buffer(&events, &delivery),
                    None => break,
                },
                () = sleep_until(self.retry_at), if !self.pending.is_empty() => {}
                () = sleep_until(self.ack_check_at), if !self.unacked.is_empty() => {
                    self.check_acks(&delivery);
                }
            }
        }
        self.finish(&mut delivery).await;
    }

    /// Something to write and no backoff in the way.
    fn due(&self) -> bool {
        !self.pending.is_empty() && Instant::now() >= self.retry_at
    }

    /// Formats the events into `pending`, dropping what cannot be graphed and
    /// what does not fit.
    fn buffer(&mut self, events: &[Event], delivery: &Delivery) {
        let mut ungraphable = 0;
        let mut too_long = 0;
        let mut overflow = 0;
        for event in events {
            // Full (carbon down): drop before formatting, so an outage costs
            // ingest's cores as little as possible.
            if self.pending.len() + self.unacked.len() >= self.capacity
                || self.pending_bytes + self.unacked_bytes >= self.capacity_bytes
            {
                overflow += 1;
                continue;
            }
            match line(&self.config, event) {
                None => ungraphable += 1,
                // The newline is not part of carbon's count.
                Some(l) if l.len() > MAX_LINE + 1 => too_long += 1,
                Some(l) => {
                    self.pending_bytes += l.len();
                    self.pending.push_back(l);
                }
            }
        }
        if ungraphable > 0 {
            delivery.skipped(ungraphable);
            tracing::debug!(output = %delivery.name, count = ungraphable, "Events without a graphable metric or path skipped.");
        }
        if too_long > 0 {
            delivery.dropped(too_long);
            if !self.warned_too_long {
                self.warned_too_long = true;
                tracing::warn!(output = %delivery.name, count = too_long, max = MAX_LINE, "Points whose carbon line would be over carbon's limit dropped (their host or service is that long); counted as dropped from now on, logged once.");
            }
        }
        if overflow > 0 {
            delivery.dropped(overflow);
            if !self.overflowed {
                self.overflowed = true;
                tracing::error!(output = %delivery.name, capacity = self.capacity, "Graphite buffer full; dropping new points until carbon is back.");
            }
        }
    }

    /// Writes `pending` in batches, connecting first if needed (which settles
    /// acknowledgements before each batch; once more after the last). On
    /// failure the unwritten lines stay pending and the next attempt waits
    /// out a backoff.
    async fn send(&mut self, delivery: &Delivery) {
        while !self.pending.is_empty() {
            let result = match self.connect(delivery).await {
                Ok(()) => {
                    let conn = self.conn.as_mut().expect("connected");
                    write_batch(conn, &self.pending, &mut self.scratch).await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(n) => {
                    for line in self.pending.drain(..n) {
                        self.pending_bytes -= line.len();
                        self.unacked_bytes += line.len();
                        self.unacked.push_back(line);
                    }
                    self.recovered(delivery);
                }
                Err(e) => return self.failed(delivery, &e),
            }
        }
        self.check_acks(delivery);
    }

    /// Counts as delivered the written lines carbon's TCP has acknowledged;
    /// a connection found over fails as a write would.
    fn check_acks(&mut self, delivery: &Delivery) {
        self.ack_check_at = Instant::now() + ACK_POLL;
        if let Some(over) = self.settle(delivery) {
            self.failed(delivery, &over);
        }
    }

    /// Counts as delivered the written lines carbon's TCP has acknowledged,
    /// and says why the connection is over, if it is.
    fn settle(&mut self, delivery: &Delivery) -> Option<std::io::Error> {
        let conn = self.conn.as_ref()?;
        // Still true once the connection is over: the kernel keeps its
        // sequence numbers.
        let outstanding = match unacked_bytes(conn) {
            Ok(outstanding) => outstanding,
            Err(e) => return Some(e),
        };
        let mut acked = self.unacked_bytes.saturating_sub(outstanding);
        let mut lines = 0;
        while let Some(line) = self.unacked.front() {
            if line.len() > acked {
                break;
            }
            acked -= line.len();
            self.unacked_bytes -= line.len();
            self.unacked.pop_front();
            lines += 1;
        }
        if lines > 0 {
            delivery.delivered(lines);
        }
        peer_closed(conn)
    }

    /// Keeps the open connection or opens one. A connection found over is
    /// not written to: one carbon closed with everything acknowledged (an
    /// idle one) is replaced quietly, any other fails.
    async fn connect(&mut self, delivery: &Delivery) -> std::io::Result<()> {
        if let Some(over) = self.settle(delivery) {
            if !self.unacked.is_empty() || over.raw_os_error().is_some() {
                return Err(over);
            }
            self.disconnect();
        }
        if self.conn.is_none() {
            let addr = (self.config.host.as_str(), self.config.port);
            let stream = timeout(CONNECT_TIMEOUT, dial::connect(addr))
                .await
                .map_err(|_| std::io::ErrorKind::TimedOut)??;
            // Batches are already coalesced; Nagle would only add latency.
            stream.set_nodelay(true)?;
            // A carbon that vanished acknowledges nothing: give up on it
            // soon, so that its unacknowledged points go out again.
            crate::bounded::limit_unacked(&stream, WRITE_TIMEOUT);
            self.conn = Some(stream);
        }
        Ok(())
    }

    /// Drops the connection; the lines it has not acknowledged perhaps never
    /// arrived, so they are first in line again.
    fn disconnect(&mut self) {
        self.conn = None;
        while let Some(line) = self.unacked.pop_back() {
            self.pending.push_front(line);
        }
        self.pending_bytes += self.unacked_bytes;
        self.unacked_bytes = 0;
    }

    fn failed(&mut self, delivery: &Delivery, error: &std::io::Error) {
        self.disconnect();
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        delivery.retried();
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            tracing::warn!(output = %delivery.name, host = %self.config.host, port = self.config.port, %error, "Carbon unreachable; buffering points and reconnecting.");
        }
    }

    fn recovered(&mut self, delivery: &Delivery) {
        self.backoff = BACKOFF_MIN;
        if let Some(since) = self.down_since.take() {
            self.overflowed = false;
            tracing::info!(output = %delivery.name, outage_secs = since.elapsed().as_secs_f64(), "Carbon reachable again.");
        }
    }

    /// After shutdown: takes what is still queued, tries to write everything
    /// for a while, then counts the rest as dropped.
    async fn finish(mut self, delivery: &mut Delivery) {
        while let Some(Some(events)) = delivery.next_batch(BATCH).now_or_never() {
            self.buffer(&events, delivery);
        }
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        loop {
            if !self.pending.is_empty() {
                sleep_until(self.retry_at.min(deadline)).await;
                let _ = timeout_at(deadline, self.send(delivery)).await;
            } else if !self.unacked.is_empty() {
                sleep_until(self.ack_check_at.min(deadline)).await;
                self.check_acks(delivery);
            }
            let done = self.pending.is_empty() && self.unacked.is_empty();
            if done || Instant::now() >= deadline {
                break;
            }
        }
        let left = self.pending.len() + self.unacked.len();
        if left > 0 {
            delivery.dropped(left);
            tracing::error!(output = %delivery.name, count = left, "Carbon unreachable as the output stopped (shutdown, or a reload replaced it), or not acknowledging; points dropped.");
        }
    }
}

/// Writes up to `BATCH` lines (and `WRITE_BYTES`, or one line) from the
/// front of `pending` in one write; returns how many.
async fn write_batch(
    conn: &mut TcpStream,
    pending: &VecDeque<String>,
    scratch: &mut Vec<u8>,
) -> std::io::Result<usize> {
    scratch.clear();
    let mut n = 0;
    for line in pending.iter().take(BATCH) {
        if n > 0 && scratch.len() + line.len() > WRITE_BYTES {
            break;
        }
        scratch.extend_from_slice(line.as_bytes());
        n += 1;
    }
    let write = async {
        conn.write_all(scratch).await?;
        conn.flush().await
    };
    timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    Ok(n)
}

/// Carbon never talks back, so a readable socket means the connection is
/// over: why, if it is.
fn peer_closed(conn: &TcpStream) -> Option<std::io::Error> {
    // Asked of the kernel first: tokio may not have seen a reset yet, and
    // until it has, `try_read` does not try.
    match conn.take_error() {
        Ok(Some(e)) | Err(e) => return Some(e),
        Ok(None) => {}
    }
    let mut byte = [0u8; 1];
    match conn.try_read(&mut byte) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => Some(e),
        Ok(0) => Some(std::io::Error::other("carbon closed the connection")),
        Ok(_) => Some(std::io::Error::other(
            "carbon sent data, which it never does",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::{TcpListener, TcpSocket};

    use super::*;
    use crate::outputs::{OutputSink, Queue, queue};

    const T0: i64 = 1_700_000_000;

    fn config(port: u16) -> Config {
        Config {
            host: "127.0.0.1".into(),
            port,
            prefix: None,
            path: None,
        }
    }

    fn event(host: &str, service: &str, metric: Option<Metric>) -> Event {
        Event {
            host: Some(host.into()),
            service: Some(service.into()),
            metric,
            time: T0 * MICROS_PER_SEC + 999_999,
            ..Event::default()
        }
    }

    fn point(i: i64) -> Event {
        event("web1", &format!("s{i}"), Some(Metric::Int(i)))
    }

    fn default_path(host: &str, service: &str) -> Option<String> {
        path(&config(0), &event(host, service, None))
    }

    #[test]
    fn default_path_reverses_host_labels_and_splits_the_service_on_spaces() {
        let p = default_path("web1.example.com", "cpu user");
        assert_eq!(p.as_deref(), Some("com.example.web1.cpu.user"));
    }

    #[test]
    fn trailing_percentiles_lose_their_leading_zero() {
        let p = default_path("web1", "api latency 0.95");
        assert_eq!(p.as_deref(), Some("web1.api.latency.95"));
        let p = default_path("web1", "api latency 0.999");
        assert_eq!(p.as_deref(), Some("web1.api.latency.999"));
        // Only a trailing `0.<digits>` is a percentile.
        let p = default_path("web1", "0.5 ratio");
        assert_eq!(p.as_deref(), Some("web1.0.5.ratio"));
    }

    #[test]
    fn unsafe_characters_become_underscores_and_empty_segments_vanish() {
        let p = default_path("web 1", "disk  /var/lib:é");
        assert_eq!(p.as_deref(), Some("web_1.disk._var_lib__"));
        assert_eq!(default_path("", "cpu").as_deref(), Some("cpu"));
        assert_eq!(default_path("", ""), None, "nothing to graph");
    }

    #[test]
    fn prefix_comes_first_and_is_sanitised_too() {
        let mut c = config(0);
        c.prefix = Some("vigil.prod env".into());
        let p = path(&c, &event("a.b.com", "cpu", None));
        assert_eq!(p.as_deref(), Some("vigil.prod_env.com.b.a.cpu"));
    }

    #[test]
    fn a_template_sets_the_layout_and_its_dots_separate_segments() {
        let mut c = config(0);
        c.prefix = Some("vigil".into());
        c.path = Some(Template::parse("servers.{host}.{env}.{service}.{missing}").unwrap());
        let mut e = event("web1", "cpu user", None);
        e.set_attribute("env", "prod/eu".into());
        assert_eq!(
            path(&c, &e).as_deref(),
            Some("vigil.servers.web1.prod_eu.cpu_user")
        );
    }

    #[test]
    fn lines_carry_integers_exact_floats_and_whole_seconds() {
        let c = config(0);
        let line_of = |m: Metric| line(&c, &event("web1", "cpu", Some(m)));
        assert_eq!(
            line_of(Metric::Int(42)).unwrap(),
            "web1.cpu 42 1700000000\n"
        );
        assert_eq!(
            line_of(Metric::Int(-7)).unwrap(),
            "web1.cpu -7 1700000000\n"
        );
        assert_eq!(
            line_of(Metric::Float(0.1 + 0.2)).unwrap(),
            "web1.cpu 0.30000000000000004 1700000000\n"
        );
        assert_eq!(
            line_of(Metric::Float(2.5)).unwrap(),
            "web1.cpu 2.5 1700000000\n"
        );
        assert_eq!(
            line_of(Metric::Float(1e-7)).unwrap(),
            "web1.cpu 0.0000001 1700000000\n"
        );
    }

    #[test]
    fn events_without_a_finite_metric_have_no_line() {
        let c = config(0);
        assert_eq!(line(&c, &event("web1", "cpu", None)), None);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(
                line(&c, &event("web1", "cpu", Some(Metric::Float(bad)))),
                None
            );
        }
    }

    // ---- delivery against a local listener ----------------------------------

    struct Counts {
        delivered: u64,
        dropped: u64,
        skipped: u64,
        in_flight: u64,
    }

    fn counts(q: &Queue) -> Counts {
        let s = &q.stats;
        Counts {
            delivered: s.delivered.load(Ordering::Acquire),
            dropped: s.dropped.load(Ordering::Acquire),
            skipped: s.skipped.load(Ordering::Acquire),
            in_flight: s.in_flight.load(Ordering::Acquire),
        }
    }

    async fn wait_for(q: &Queue, what: &str, ok: impl Fn(&Counts) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok(&counts(q)) {
            let c = counts(q);
            assert!(
                Instant::now() < deadline,
                "{what}: delivered {} dropped {} skipped {} in flight {} queued {}",
                c.delivered,
                c.dropped,
                c.skipped,
                c.in_flight,
                q.queued()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the output with a small buffer against `port`.
    fn start(
        port: u16,
        capacity: usize,
    ) -> (Arc<Queue>, CancellationToken, tokio::task::JoinHandle<()>) {
        let (q, delivery) = queue("graphite-test", 100);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(
            Graphite::new(config(port), capacity, BUFFER_BYTES).drive(delivery, shutdown.clone()),
        );
        (q, shutdown, task)
    }

    /// A port nothing listens on, held by a bound socket the caller keeps:
    /// no other socket (nor a connection's source port) can take it, yet a
    /// test can still listen on it later (the holder allows address reuse).
    fn closed_port() -> (TcpSocket, u16) {
        let holder = TcpSocket::new_v4().unwrap();
        holder.set_reuseaddr(true).unwrap();
        holder.set_reuseport(true).unwrap();
        holder.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = holder.local_addr().unwrap().port();
        (holder, port)
    }

    async fn read_lines(listener: &TcpListener, n: usize) -> (Vec<String>, BufReader<TcpStream>) {
        let read = async {
            let (stream, _) = listener.accept().await.unwrap();
            let mut reader = BufReader::new(stream);
            let mut lines = Vec::new();
            while lines.len() < n {
                let mut l = String::new();
                assert_ne!(
                    reader.read_line(&mut l).await.unwrap(),
                    0,
                    "closed after {lines:?}"
                );
                lines.push(l);
            }
            (lines, reader)
        };
        timeout(Duration::from_secs(10), read)
            .await
            .expect("lines within 10 s")
    }

    #[tokio::test]
    async fn writes_lines_and_counts_them_delivered() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (q, _shutdown, _task) = start(listener.local_addr().unwrap().port(), 10);
        q.push(point(1));
        q.push(event("web1", "no metric", None));
        q.push(point(2));
        let (lines, _conn) = read_lines(&listener, 2).await;
        assert_eq!(lines, ["web1.s1 1 1700000000\n", "web1.s2 2 1700000000\n"]);
        wait_for(&q, "2 delivered, 1 skipped", |c| {
            (c.delivered, c.dropped, c.skipped, c.in_flight) == (2, 0, 1, 0)
        })
        .await;
    }

    #[tokio::test]
    async fn a_line_over_carbons_limit_is_dropped_and_its_neighbours_written() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (q, _shutdown, _task) = start(listener.local_addr().unwrap().port(), 10);
        // `web1.<service> 1 1700000000`: 18 bytes besides the service.
        let longest = "x".repeat(MAX_LINE - 18);
        q.push(event("web1", &longest, Some(Metric::Int(1))));
        q.push(event("web1", &format!("{longest}x"), Some(Metric::Int(1))));
        q.push(point(2));
        let (lines, _conn) = read_lines(&listener, 2).await;
        assert_eq!(
            lines[0].len(),
            MAX_LINE + 1,
            "the longest line carbon takes"
        );
        assert_eq!(lines[1], "web1.s2 2 1700000000\n");
        wait_for(&q, "2 delivered, 1 dropped", |c| {
            c.delivered == 2 && c.dropped == 1 && c.in_flight == 0
        })
        .await;
    }

    #[tokio::test]
    async fn an_outage_buffers_up_to_the_bound_in_bytes() {
        let (_holder, port) = closed_port();
        let (q, delivery) = queue("graphite-test", 100);
        let shutdown = CancellationToken::new();
        // Room for two 10 KB lines: the third finds the buffer full.
        let graphite = Graphite::new(config(port), 100, 20_000);
        let _task = tokio::spawn(graphite.drive(delivery, shutdown.clone()));
        for i in 0..4 {
            let service = format!("{i}{}", "x".repeat(10_000));
            q.push(event("web1", &service, Some(Metric::Int(i))));
        }
        wait_for(&q, "2 buffered, 2 dropped", |c| {
            c.in_flight == 2 && c.dropped == 2
        })
        .await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn an_outage_buffers_up_to_the_bound_then_delivers_the_buffer() {
        let (_holder, port) = closed_port();
        let (q, _shutdown, _task) = start(port, 5);
        for i in 0..8 {
            q.push(point(i));
        }
        wait_for(&q, "5 buffered, 3 dropped", |c| {
            c.in_flight == 5 && c.dropped == 3
        })
        .await;

        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let (lines, _conn) = read_lines(&listener, 5).await;
        assert_eq!(
            lines[0], "web1.s0 0 1700000000\n",
            "oldest first, newest dropped"
        );
        assert_eq!(lines[4], "web1.s4 4 1700000000\n");
        wait_for(&q, "5 delivered", |c| c.delivered == 5 && c.in_flight == 0).await;
        assert!(q.stats.retries.load(Ordering::Acquire) >= 1);
    }

    /// Carbon's kernel takes a few KiB and then its window stays shut (it
    /// never reads); when the connection is reset, exactly the lines it had
    /// not acknowledged go out again on the next one, before a new point
    /// (whose arrival finds the reset connection).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn lines_carbon_did_not_acknowledge_are_sent_again_on_the_next_connection() {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(4).unwrap();
        let (q, _shutdown, _task) = start(listener.local_addr().unwrap().port(), 10_000);
        const POINTS: i64 = 400;
        let mut stalled = None;
        for chunk in (0..POINTS).collect::<Vec<_>>().chunks(100) {
            for &i in chunk {
                q.push(point(i));
            }
            if stalled.is_none() {
                // The output connects once it has something to send.
                let accepted = timeout(Duration::from_secs(10), listener.accept()).await;
                stalled = Some(accepted.expect("connected within 10 s").unwrap().0);
            }
            wait_for(&q, "taken from the queue", |_| q.queued() == 0).await;
        }
        let stalled = stalled.unwrap();
        // Only acknowledged lines are delivered, and the window stays shut.
        wait_for(&q, "the window shut", |c| c.delivered > 0).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let acknowledged = counts(&q).delivered;
        assert!(acknowledged < POINTS as u64 / 2, "{acknowledged}");
        assert_eq!(
            counts(&q).delivered,
            acknowledged,
            "no further acknowledgement"
        );

        // Unread data makes the close a reset.
        rustix::net::sockopt::set_socket_linger(&stalled, Some(Duration::ZERO)).unwrap();
        drop(stalled);
        q.push(point(POINTS));
        let expected = POINTS as u64 + 1 - acknowledged;
        let (lines, _conn) = read_lines(&listener, expected as usize).await;
        let first = acknowledged as i64;
        for (line, i) in lines.iter().zip(first..) {
            assert_eq!(line, &format!("web1.s{i} {i} 1700000000\n"));
        }
        wait_for(&q, "all delivered", |c| {
            c.delivered == POINTS as u64 + 1 && c.dropped == 0 && c.in_flight == 0
        })
        .await;
        assert!(q.stats.retries.load(Ordering::Acquire) >= 1);
    }

    #[tokio::test]
    async fn a_connection_carbon_closed_is_replaced_without_losing_points() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (q, _shutdown, _task) = start(listener.local_addr().unwrap().port(), 10);
        q.push(point(1));
        let (lines, first) = read_lines(&listener, 1).await;
        assert_eq!(lines, ["web1.s1 1 1700000000\n"]);
        drop(first);
        // Let the close reach the output before the next point.
        tokio::time::sleep(Duration::from_millis(100)).await;

        q.push(point(2));
        let (lines, _second) = read_lines(&listener, 1).await;
        assert_eq!(lines, ["web1.s2 2 1700000000\n"]);
        wait_for(&q, "2 delivered", |c| c.delivered == 2 && c.in_flight == 0).await;
    }

    #[tokio::test]
    async fn shutdown_flushes_what_is_queued() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (q, shutdown, task) = start(listener.local_addr().unwrap().port(), 10);
        shutdown.cancel();
        for i in 0..3 {
            q.push(point(i));
        }
        let (lines, _conn) = read_lines(&listener, 3).await;
        assert_eq!(lines.len(), 3);
        timeout(Duration::from_secs(10), task)
            .await
            .expect("ends")
            .unwrap();
        let c = counts(&q);
        assert_eq!((c.delivered, c.dropped, c.in_flight), (3, 0, 0));
    }

    #[tokio::test]
    async fn shutdown_with_carbon_down_counts_the_buffer_as_dropped() {
        let (_holder, port) = closed_port();
        let (q, shutdown, task) = start(port, 10);
        for i in 0..3 {
            q.push(point(i));
        }
        wait_for(&q, "3 buffered", |c| c.in_flight == 3).await;
        shutdown.cancel();
        timeout(SHUTDOWN_GRACE * 2, task)
            .await
            .expect("ends within the grace")
            .unwrap();
        let c = counts(&q);
        assert_eq!((c.delivered, c.dropped, c.in_flight), (0, 3, 0));
    }
}
