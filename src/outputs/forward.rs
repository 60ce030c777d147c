//! Forwarding to another vigil or Riemann over the Riemann TCP protocol,
//! plain or TLS (`tls_ca`, and `tls_cert`/`tls_key` where the downstream
//! asks for a client certificate).
//!
//! Events travel in batches: one `Msg` carries up to [`BATCH_MAX`] events, and a
//! small batch lingers up to [`LINGER`] for company. A batch counts as delivered
//! only once the downstream acks it; on a connection error or an ack timeout the
//! task reconnects with backoff and sends the same batch again (at least once).
//! Meanwhile the queue fills and its overflow is dropped and counted upstream.
//! A batch the downstream answers `ok: false` to is retried too, but dropped
//! after [`MAX_REFUSALS`] attempts, so one poison batch cannot stall the output.
//! When the refusal names one event of the batch (a vigil downstream refuses
//! a `Msg` whole as `event 3: description of … bytes exceeds --max-string …`),
//! only that event is dropped and the rest sent again at once; when it says
//! the frame, or the number of events, was over the downstream's maximum (a
//! vigil with a smaller `--max-frame` or `--max-events-per-msg`), the batch is
//! sent again in parts that fit, and only an event that alone does not fit a
//! frame is dropped.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use super::{Delivery, MAX_BATCH_BYTES};
use crate::client::{Client, ClientError};
use crate::event::Event;
use crate::tcp::DEFAULT_MAX_FRAME;
use crate::tls::ClientTls;

/// Most events per `Msg`.
pub const BATCH_MAX: usize = 1000;
/// How long a batch short of `BATCH_MAX` waits for more events.
pub const LINGER: Duration = Duration::from_millis(50);
/// Longest wait for an ack (or a connection); past it the connection is dropped.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// A batch the downstream keeps refusing (`ok: false`) is dropped after this many attempts.
pub const MAX_REFUSALS: u32 = 4;
/// Once stopping (shutdown, or a reload that replaced the output), how long
/// the downstream may go without taking a batch before what is left is
/// dropped, counted: a dead downstream would otherwise hold the backlog
/// (and the task) for ever, and shutdown would end it uncounted.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub host: String,
    pub port: u16,
    /// `None`: plain TCP.
    pub tls: Option<ClientTls>,
}

/// Timings, separate from `Config` so tests can shrink them.
#[derive(Debug, Clone)]
struct Tuning {
    batch_max: usize,
    linger: Duration,
    ack_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    stop_grace: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            batch_max: BATCH_MAX,
            linger: LINGER,
            ack_timeout: ACK_TIMEOUT,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            stop_grace: STOP_GRACE,
        }
    }
}

/// The largest frame a vigil downstream's refusal of a frame says it takes.
fn frame_max(message: &str) -> Option<usize> {
    let max = message.strip_prefix("frame exceeds the maximum size of ")?;
    max.strip_suffix(" bytes")?.parse().ok()
}

/// The most events per `Msg` a vigil downstream's refusal of a batch says it
/// takes (`500 events exceeds --max-events-per-msg 100`).
fn events_max(message: &str) -> Option<usize> {
    let (_, max) = message.split_once(" events exceeds --max-events-per-msg ")?;
    max.parse().ok().filter(|&max| max > 0)
}

/// What the downstream's refusal says the batch must be cut to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    /// Frames of at most this many bytes; the downstream closed the connection.
    Bytes(usize),
    /// `Msg`s of at most this many events.
    Events(usize),
}

/// `batch` in parts of events whose `Event::approx_bytes` (more than their
/// encoding) add up to at most `max`, or in two halves if that would not
/// split it.
fn split_within(mut batch: Vec<Event>, max: usize) -> Vec<Vec<Event>> {
    let mut parts: Vec<Vec<Event>> = Vec::new();
    let mut bytes = 0;
    for event in batch.drain(..) {
        let size = event.approx_bytes();
        match parts.last_mut() {
            Some(part) if bytes + size <= max => part.push(event),
            _ => {
                parts.push(vec![event]);
                bytes = 0;
            }
        }
        bytes += size;
    }
    if let [whole] = &mut parts[..] {
        let second = whole.split_off(whole.len() / 2);
        parts.push(second);
    }
    parts
}

/// The event a vigil downstream's refusal names (`event 3: …`), if it is
/// one of a batch of `len`.
fn refused_event(message: &str, len: usize) -> Option<usize> {
    let (index, _) = message.strip_prefix("event ")?.split_once(": ")?;
    index.parse().ok().filter(|&i| i < len)
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The downstream answered `ok: false`; the connection stays usable.
    #[error("downstream refused the batch: {0}")]
    Refused(String),
    #[error(transparent)]
    Client(ClientError),
    /// The connection may still deliver a late reply, so it is abandoned.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Stopping, and the downstream took nothing for [`STOP_GRACE`].
    #[error("nothing delivered for {0:?} since the output began to stop")]
    OutOfTime(Duration),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Server(message) => Failure::Refused(message),
            other => Failure::Client(other),
        }
    }
}

/// Delivers the queue until it closes; once `shutdown` is cancelled, delivers
/// only what is already queued, then returns.
pub async fn run(config: Config, delivery: Delivery, shutdown: CancellationToken) {
    run_tuned(config, Tuning::default(), delivery, shutdown).await;
}

async fn run_tuned(
    config: Config,
    tuning: Tuning,
    mut delivery: Delivery,
    shutdown: CancellationToken,
) {
    let mut link = Link::new(&config, tuning, &delivery.name, shutdown.clone());
    let max = link.tuning.batch_max;
    loop {
        // Only the cancel-safe wait races shutdown: a lingering batch already
        // holds events, and dropping it would lose them.
        let batch = tokio::select! {
            batch = delivery.next_batch_within(max, MAX_BATCH_BYTES) => batch,
            () = shutdown.cancelled() => break,
        };
        let Some((batch, bytes)) = batch else { return };
        let batch = linger(&mut delivery, batch, bytes, &link.tuning).await;
        link.deliver(batch, &delivery).await;
    }
    // Shutting down: deliver what is already queued, without waiting for more.
    while let Some(batch) = delivery.next_batch(max).now_or_never().flatten() {
        link.deliver(batch, &delivery).await;
    }
    if link.given_up > 0 {
        tracing::error!(
            output = %link.output,
            addr = %link.addr,
            dropped = link.given_up,
            "Downstream took nothing for {:?} as the output stopped (shutdown, or a reload \
             replaced it); events dropped.",
            link.tuning.stop_grace
        );
    }
}

/// Tops up `batch` (of `bytes`) until `linger` has passed or it is full, in
/// events or in bytes ([`MAX_BATCH_BYTES`]: it must fit in the downstream's frame). A
/// busy queue fills it at once, so this adds no latency under load.
async fn linger(
    delivery: &mut Delivery,
    mut batch: Vec<Event>,
    mut bytes: usize,
    tuning: &Tuning,
) -> Vec<Event> {
    let deadline = Instant::now() + tuning.linger;
    while batch.len() < tuning.batch_max && bytes < MAX_BATCH_BYTES {
        let room = (tuning.batch_max - batch.len(), MAX_BATCH_BYTES - bytes);
        let more = delivery.next_batch_within(room.0, room.1);
        match timeout_at(deadline, more).await {
            Ok(Some((more, more_bytes))) => {
                bytes += more_bytes;
                batch.extend(more);
            }
            // Closed (the caller's next wait says so) or out of time.
            Ok(None) | Err(_) => break,
        }
    }
    batch
}

/// The connection to the downstream, reopened as needed, and its failure state.
struct Link {
    output: String,
    /// Where it connects: host and port apart, so an IPv6 address needs
    /// no brackets.
    target: (String, u16),
    /// The same, as logged.
    addr: String,
    tls: Option<ClientTls>,
    tuning: Tuning,
    client: Option<Client>,
    backoff: Duration,
    /// Whether the outage has been logged, so it is logged once, not per attempt.
    down: bool,
    /// Whether a refused event was logged yet: at warn once, then at debug.
    warned_refused: bool,
    /// Cancelled when the output stops.
    shutdown: CancellationToken,
    /// Once stopping: when what is left is given up on, unless the
    /// downstream takes a batch first (which puts it off again).
    give_up_at: Option<Instant>,
    /// Events dropped as the downstream took nothing while stopping.
    given_up: usize,
}

impl Link {
    fn new(config: &Config, tuning: Tuning, output: &str, shutdown: CancellationToken) -> Self {
        Self {
            output: output.to_owned(),
            target: (config.host.clone(), config.port),
            // An IPv6 address in brackets, so the port stands apart.
            addr: if config.host.contains(':') {
                format!("[{}]:{}", config.host, config.port)
            } else {
                format!("{}:{}", config.host, config.port)
            },
            tls: config.tls.clone(),
            backoff: tuning.backoff_min,
            tuning,
            client: None,
            down: false,
            warned_refused: false,
            shutdown,
            give_up_at: None,
            given_up: 0,
        }
    }

    /// `None` while running; once stopping, when what is left is given up on.
    fn give_up_at(&mut self) -> Option<Instant> {
        if !self.shutdown.is_cancelled() {
            return None;
        }
        let grace = self.tuning.stop_grace;
        Some(
            *self
                .give_up_at
                .get_or_insert_with(|| Instant::now() + grace),
        )
    }

    /// Stopping, and out of time: what is left is dropped.
    fn out_of_time(&mut self) -> bool {
        self.give_up_at().is_some_and(|at| Instant::now() >= at)
    }

    /// Drops `batch` as given up on (counted, logged once when the output ends).
    fn give_up(&mut self, batch: &[Event], delivery: &Delivery) {
        delivery.dropped(batch.len());
        self.given_up += batch.len();
    }

    /// Sends `batch`, in parts if the downstream's frames, or `Msg`s, are
    /// smaller.
    async fn deliver(&mut self, batch: Vec<Event>, delivery: &Delivery) {
        let mut batches = VecDeque::from([batch]);
        while let Some(batch) = batches.pop_front() {
            if self.out_of_time() {
                self.give_up(&batch, delivery);
                continue;
            }
            let Some((mut batch, fit)) = self.deliver_one(batch, delivery).await else {
                continue;
            };
            let parts = match fit {
                Fit::Bytes(max) => {
                    // The downstream closed the connection after saying so.
                    self.client = None;
                    if batch.len() == 1 {
                        delivery.dropped(1);
                        let (output, addr) = (&self.output, &self.addr);
                        tracing::warn!(%output, %addr, max, "An event alone is over the downstream's largest frame; dropped it.");
                        continue;
                    }
                    split_within(batch, max)
                }
                Fit::Events(max) => {
                    let mut parts = Vec::new();
                    while batch.len() > max {
                        let rest = batch.split_off(max);
                        parts.push(std::mem::replace(&mut batch, rest));
                    }
                    parts.push(batch);
                    parts
                }
            };
            for part in parts.into_iter().rev() {
                batches.push_front(part);
            }
        }
    }

    /// Sends `batch` until it is acked, retrying with backoff. Only a batch the
    /// downstream keeps refusing is given up on; an unreachable downstream is
    /// waited for (the queue bounds what piles up meanwhile). A batch refused
    /// as over the downstream's largest frame or `Msg` comes back, with what
    /// it must fit.
    async fn deliver_one(
        &mut self,
        mut batch: Vec<Event>,
        delivery: &Delivery,
    ) -> Option<(Vec<Event>, Fit)> {
        let mut refusals = 0;
        loop {
            match self.attempt(&batch).await {
                Ok(()) => {
                    self.recovered();
                    delivery.delivered(batch.len());
                    // Taken: the downstream gets another grace for the rest.
                    self.give_up_at = None;
                    return None;
                }
                Err(Failure::Refused(message)) => {
                    if let Some(max) = frame_max(&message) {
                        return Some((batch, Fit::Bytes(max)));
                    }
                    if let Some(max) = events_max(&message).filter(|&max| max < batch.len()) {
                        return Some((batch, Fit::Events(max)));
                    }
                    if let Some(i) = refused_event(&message, batch.len()) {
                        batch.remove(i);
                        delivery.dropped(1);
                        let (output, addr) = (&self.output, &self.addr);
                        if std::mem::replace(&mut self.warned_refused, true) {
                            tracing::debug!(%output, %addr, error = %message, "Downstream refused an event; dropped it.");
                        } else {
                            tracing::warn!(%output, %addr, error = %message, "Downstream refused one event of a batch; dropped it and sent the rest (further ones are logged at debug, counted as dropped).");
                        }
                        if batch.is_empty() {
                            return None;
                        }
                        continue;
                    }
                    refusals += 1;
                    if refusals == MAX_REFUSALS {
                        tracing::error!(
                            output = %self.output,
                            addr = %self.addr,
                            events = batch.len(),
                            error = %message,
                            "Downstream keeps refusing a batch; dropped it."
                        );
                        delivery.dropped(batch.len());
                        return None;
                    }
                    tracing::debug!(
                        output = %self.output,
                        addr = %self.addr,
                        error = %message,
                        "Downstream refused a batch; retrying."
                    );
                }
                Err(e) => self.lost(&e),
            }
            if self.out_of_time() {
                self.give_up(&batch, delivery);
                return None;
            }
            delivery.retried();
            self.back_off().await;
        }
    }

    /// Waits before the next attempt: 100 ms doubling up to 5 s, by default;
    /// once stopping, no longer than the time left.
    async fn back_off(&mut self) {
        let until = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(self.tuning.backoff_max);
        self.within(until, std::future::pending::<()>()).await;
    }

    /// Runs `work` until `until`; once stopping (from the start or when the
    /// output stops meanwhile), no longer than the time left. `None`: out
    /// of time.
    async fn within<T>(&mut self, until: Instant, work: impl Future<Output = T>) -> Option<T> {
        tokio::pin!(work);
        loop {
            let stopping = self.give_up_at();
            let deadline = stopping.map_or(until, |at| at.min(until));
            tokio::select! {
                done = timeout_at(deadline, &mut work) => return done.ok(),
                // Wakes to take the time left into account.
                () = self.shutdown.cancelled(), if stopping.is_none() => {}
            }
        }
    }

    /// One send of `batch`, connecting first when there is no connection.
    async fn attempt(&mut self, batch: &[Event]) -> Result<(), Failure> {
        let wait = self.tuning.ack_timeout;
        let out_of_time = |link: &mut Self| {
            if link.out_of_time() {
                Failure::OutOfTime(link.tuning.stop_grace)
            } else {
                Failure::Timeout(wait)
            }
        };
        let mut client = match self.client.take() {
            Some(client) => client,
            None => {
                let until = Instant::now() + wait;
                let (target, tls) = (self.target.clone(), self.tls.clone());
                let connect = async move {
                    Client::connect_with(target, tls.as_ref(), DEFAULT_MAX_FRAME).await
                };
                match self.within(until, connect).await {
                    Some(connected) => connected?,
                    None => return Err(out_of_time(self)),
                }
            }
        };
        let until = Instant::now() + wait;
        let Some(sent) = self.within(until, client.send(batch)).await else {
            return Err(out_of_time(self));
        };
        // Only an answered request leaves the connection in step for the next one.
        if matches!(sent, Ok(()) | Err(ClientError::Server(_))) {
            self.client = Some(client);
        }
        Ok(sent?)
    }

    /// The connection failed (and is gone): log the outage once.
    fn lost(&mut self, error: &Failure) {
        if self.down {
            tracing::debug!(
                output = %self.output,
                addr = %self.addr,
                %error,
                "Forward attempt failed."
            );
        } else {
            self.down = true;
            tracing::warn!(
                output = %self.output,
                addr = %self.addr,
                %error,
                "Downstream unreachable; retrying with backoff."
            );
        }
    }

    fn recovered(&mut self) {
        self.backoff = self.tuning.backoff_min;
        if self.down {
            self.down = false;
            tracing::info!(
                output = %self.output,
                addr = %self.addr,
                "Downstream reachable again."
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use futures_util::{SinkExt, StreamExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;
    use tokio::time::{sleep, timeout};
    use tokio_util::codec::Framed;

    use super::*;
    use crate::clock::{MICROS_PER_SEC, ManualClock, SharedClock};
    use crate::event::Metric;
    use crate::index::{Index, IndexConfig};
    use crate::outputs::{OutputSink, OutputStats, Queue, queue};
    use crate::query::Query;
    use crate::server::{Server, ServerConfig};
    use crate::streams::IndexEverything;
    use crate::{proto, tcp};

    const T0: i64 = 1_700_000_000 * MICROS_PER_SEC;

    /// [`fast`], but a small batch waits half a second for more.
    fn lingering() -> Tuning {
        Tuning {
            linger: Duration::from_millis(500),
            ..fast()
        }
    }

    fn fast() -> Tuning {
        Tuning {
            linger: Duration::from_millis(20),
            ack_timeout: Duration::from_millis(300),
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(50),
            ..Tuning::default()
        }
    }

    /// An event with every field set, distinct per `i`.
    fn event(i: usize) -> Event {
        Event {
            host: Some("web1".into()),
            service: Some(format!("svc {i}")),
            state: Some("ok".into()),
            time: T0 + i as i64,
            description: Some("forwarded".into()),
            tags: vec!["a".into(), "b".into()],
            metric: Some(Metric::Int(i as i64)),
            ttl: Some(60.0),
            attributes: [("env".to_owned(), "prod".to_owned())].into(),
        }
    }

    /// A vigil server indexing everything it receives.
    async fn downstream(addr: SocketAddr) -> (Server, Arc<Index>) {
        downstream_with(ServerConfig {
            tcp: addr,
            ..ServerConfig::default()
        })
        .await
    }

    async fn downstream_with(config: ServerConfig) -> (Server, Arc<Index>) {
        let index = Arc::new(Index::new(IndexConfig::default()));
        let clock: SharedClock = Arc::new(ManualClock::new(T0));
        let streams = Arc::new(IndexEverything::new(index.clone()));
        let server = Server::start(config, index.clone(), streams, clock)
            .await
            .expect("downstream starts");
        (server, index)
    }

    fn any_port() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// A queue with `n` events already in it, and the forward task draining it.
    fn forward(
        addr: SocketAddr,
        tuning: Tuning,
        n: usize,
    ) -> (Arc<Queue>, JoinHandle<()>, CancellationToken) {
        forward_events(addr, tuning, (0..n).map(event))
    }

    /// The same with the given events.
    fn forward_events(
        addr: SocketAddr,
        tuning: Tuning,
        events: impl IntoIterator<Item = Event>,
    ) -> (Arc<Queue>, JoinHandle<()>, CancellationToken) {
        let (queue, delivery) = queue("fwd", 10_000);
        events.into_iter().for_each(|e| queue.push(e));
        let config = Config {
            host: addr.ip().to_string(),
            port: addr.port(),
            tls: None,
        };
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_tuned(config, tuning, delivery, shutdown.clone()));
        (queue, task, shutdown)
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Acquire)
    }

    fn assert_accounted(queue: &Queue) {
        let s: &OutputStats = &queue.stats;
        let settled = get(&s.delivered) + get(&s.dropped) + queue.queued() + get(&s.in_flight);
        assert_eq!(
            get(&s.accepted),
            settled,
            "accepted = delivered + dropped + queued + in_flight"
        );
    }

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            sleep(Duration::from_millis(10)).await;
        }
    }

    #[derive(Clone, Copy)]
    enum Reply {
        Ack,
        Refuse,
        Silent,
    }

    /// A scripted downstream: `script(n)` answers the n-th `Msg` (counted
    /// across connections). Returns its address and how many connections it saw.
    async fn scripted(script: fn(usize) -> Reply) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let frames = Arc::new(AtomicUsize::new(0));
        let seen = connections.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::AcqRel);
                let frames = frames.clone();
                tokio::spawn(async move {
                    let mut framed = Framed::new(socket, tcp::codec(tcp::DEFAULT_MAX_FRAME));
                    while let Some(Ok(_)) = framed.next().await {
                        let reply = match script(frames.fetch_add(1, Ordering::AcqRel)) {
                            Reply::Ack => proto::ack(),
                            Reply::Refuse => proto::error_reply("busy"),
                            Reply::Silent => continue,
                        };
                        if framed.send(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, connections)
    }

    #[tokio::test]
    async fn many_events_travel_in_few_messages_with_fields_intact() {
        let (server, index) = downstream(any_port()).await;
        let (queue, _task, _shutdown) = forward(server.tcp_addr, Tuning::default(), 2500);

        wait_until("all delivered", || get(&queue.stats.delivered) == 2500).await;
        assert_eq!(get(&server.stats.tcp_messages), 3, "batches of up to 1000");
        assert_eq!(index.len(), 2500);
        assert_eq!(index.get("web1", "svc 7"), Some(event(7)));
        assert_eq!(get(&queue.stats.retries), 0);
        assert_accounted(&queue);
    }

    #[tokio::test]
    async fn a_small_batch_lingers_for_more_events() {
        let (server, index) = downstream(any_port()).await;
        let (queue, _task, _shutdown) = forward(server.tcp_addr, lingering(), 0);
        for i in 0..20 {
            queue.push(event(i));
            sleep(Duration::from_millis(2)).await;
        }

        wait_until("all delivered", || get(&queue.stats.delivered) == 20).await;
        assert!(
            get(&server.stats.tcp_messages) <= 2,
            "not one Msg per event"
        );
        assert_eq!(index.len(), 20);
        assert_accounted(&queue);
    }

    /// Lingering tops a batch up to `batch_max` events but no further than
    /// MAX_BATCH_BYTES: forty 1 MiB events in one `Msg` would be over the
    /// downstream's 16 MiB frame, which it refuses.
    #[tokio::test]
    async fn large_events_go_in_messages_that_fit_the_downstreams_frame() {
        let (server, index) = downstream(any_port()).await;
        let (queue, _task, _shutdown) = forward(server.tcp_addr, lingering(), 0);
        for i in 0..40 {
            queue.push(Event {
                description: Some("x".repeat(1024 * 1024)),
                ..event(i)
            });
        }
        wait_until("all delivered", || get(&queue.stats.delivered) == 40).await;
        assert_eq!(index.len(), 40);
        assert_eq!(get(&server.stats.frames_oversized), 0);
        assert!(get(&server.stats.tcp_messages) >= 40 / 4);
        assert_accounted(&queue);
    }

    #[tokio::test]
    async fn events_queued_while_the_downstream_is_down_arrive_once_it_listens() {
        // A free port, nothing listening on it yet.
        let addr = TcpListener::bind(any_port())
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let (queue, _task, _shutdown) = forward(addr, fast(), 50);
        wait_until("a few failed attempts", || get(&queue.stats.retries) >= 3).await;
        assert_eq!(get(&queue.stats.delivered), 0);
        assert_accounted(&queue);

        let (_server, index) = downstream(addr).await;
        wait_until("all delivered", || get(&queue.stats.delivered) == 50).await;
        assert_eq!(index.len(), 50);
        assert_eq!(get(&queue.stats.dropped), 0);
        assert_accounted(&queue);
    }

    #[tokio::test]
    async fn a_refused_batch_is_retried_on_the_same_connection() {
        let (addr, connections) =
            scripted(|n| if n < 2 { Reply::Refuse } else { Reply::Ack }).await;
        let (queue, _task, _shutdown) = forward(addr, fast(), 10);

        wait_until("all delivered", || get(&queue.stats.delivered) == 10).await;
        assert_eq!(get(&queue.stats.retries), 2);
        assert_eq!(connections.load(Ordering::Acquire), 1);
        assert_accounted(&queue);
    }

    /// A vigil downstream with a smaller `--max-string` refuses a `Msg`
    /// naming the event at fault: only that event is lost.
    #[tokio::test]
    async fn an_event_the_downstream_refuses_is_dropped_alone() {
        let (server, index) = downstream_with(ServerConfig {
            tcp: any_port(),
            limits: crate::limits::Limits {
                max_string: 20,
                ..crate::limits::Limits::DEFAULT
            },
            ..ServerConfig::default()
        })
        .await;
        let events = (0..10).map(|i| {
            let mut e = event(i);
            if i == 3 || i == 7 {
                e.description = Some("too long for the downstream".into());
            }
            e
        });
        let (queue, _task, _shutdown) = forward_events(server.tcp_addr, fast(), events);

        wait_until("8 delivered", || get(&queue.stats.delivered) == 8).await;
        assert_eq!(get(&queue.stats.dropped), 2);
        assert_eq!(get(&queue.stats.retries), 0, "sent again at once");
        let mut services: Vec<_> = (index.query(&Query::parse("true").unwrap()).unwrap())
            .into_iter()
            .map(|e| e.service.unwrap())
            .collect();
        services.sort();
        let kept = [0, 1, 2, 4, 5, 6, 8, 9].map(|i| format!("svc {i}"));
        assert_eq!(services, kept);
        assert_accounted(&queue);
    }

    /// A vigil downstream with a smaller `--max-frame` refuses the batch's
    /// frame and closes the connection: the batch goes again in parts that
    /// fit, and only an event too large for any frame is lost.
    #[tokio::test]
    async fn a_batch_over_the_downstreams_largest_frame_goes_in_parts() {
        let (server, index) = downstream_with(ServerConfig {
            tcp: any_port(),
            max_frame: 2000,
            ..ServerConfig::default()
        })
        .await;
        let events = (0..10).map(|i| {
            let mut e = event(i);
            e.description = Some("d".repeat(if i == 6 { 3000 } else { 500 }));
            e
        });
        let (queue, _task, _shutdown) = forward_events(server.tcp_addr, fast(), events);

        wait_until("9 delivered", || get(&queue.stats.delivered) == 9).await;
        assert_eq!(get(&queue.stats.dropped), 1);
        assert_eq!(index.len(), 9);
        assert!(index.get("web1", "svc 6").is_none());
        assert!(get(&server.stats.frames_oversized) >= 2);
        assert_accounted(&queue);
    }

    /// A vigil downstream with a smaller `--max-events-per-msg` refuses the
    /// batch (keeping the connection): it goes again in `Msg`s that fit,
    /// and none of it is lost. (It was refused four times, then dropped whole.)
    #[tokio::test]
    async fn a_batch_over_the_downstreams_most_events_per_msg_goes_in_parts() {
        let (server, index) = downstream_with(ServerConfig {
            tcp: any_port(),
            limits: crate::limits::Limits {
                max_events: 4,
                ..crate::limits::Limits::DEFAULT
            },
            ..ServerConfig::default()
        })
        .await;
        let (queue, _task, _shutdown) = forward_events(server.tcp_addr, fast(), (0..10).map(event));

        wait_until("10 delivered", || get(&queue.stats.delivered) == 10).await;
        assert_eq!(get(&queue.stats.dropped), 0);
        assert_eq!(get(&queue.stats.retries), 0, "sent again at once");
        assert_eq!(index.len(), 10);
        assert_accounted(&queue);
        let refusal = "10 events exceeds --max-events-per-msg 4";
        assert_eq!(events_max(refusal), Some(4));
        assert_eq!(events_max("event 1: too long"), None);
    }

    #[test]
    fn a_batch_splits_within_the_largest_frame_or_in_halves() {
        let batch: Vec<Event> = (0..10).map(event).collect();
        let size = batch[0].approx_bytes();
        let lens = |parts: Vec<Vec<Event>>| parts.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(lens(split_within(batch.clone(), 3 * size)), [3, 3, 3, 1]);
        assert_eq!(lens(split_within(batch.clone(), 100 * size)), [5, 5]);
        assert_eq!(lens(split_within(batch, 1)), [1; 10]);
        let refusal = "frame exceeds the maximum size of 2000 bytes";
        assert_eq!(frame_max(refusal), Some(2000));
        assert_eq!(frame_max("event 1: too long"), None);
    }

    #[test]
    fn only_a_refusal_naming_an_event_of_the_batch_picks_one_out() {
        let refused = "event 3: description of 27 bytes exceeds --max-string 20";
        assert_eq!(refused_event(refused, 10), Some(3));
        assert_eq!(refused_event(refused, 3), None, "not in this batch");
        assert_eq!(
            refused_event("10 events exceeds --max-events-per-msg 5", 10),
            None
        );
        assert_eq!(refused_event("event x: y", 10), None);
    }

    #[tokio::test]
    async fn a_batch_refused_every_time_is_dropped() {
        let (addr, _) = scripted(|_| Reply::Refuse).await;
        let (queue, _task, _shutdown) = forward(addr, fast(), 10);

        wait_until("the batch is dropped", || get(&queue.stats.dropped) == 10).await;
        assert_eq!(get(&queue.stats.retries), u64::from(MAX_REFUSALS - 1));
        assert_eq!(get(&queue.stats.delivered), 0);
        assert_accounted(&queue);
    }

    #[tokio::test]
    async fn an_unacked_batch_times_out_and_is_resent_on_a_new_connection() {
        let (addr, connections) =
            scripted(|n| if n == 0 { Reply::Silent } else { Reply::Ack }).await;
        let (queue, _task, _shutdown) = forward(addr, fast(), 10);

        wait_until("all delivered", || get(&queue.stats.delivered) == 10).await;
        assert_eq!(get(&queue.stats.retries), 1);
        assert_eq!(connections.load(Ordering::Acquire), 2);
        assert_accounted(&queue);
    }

    #[tokio::test]
    async fn shutdown_delivers_what_is_queued_then_returns() {
        let (server, index) = downstream(any_port()).await;
        let (queue, task, shutdown) = forward(server.tcp_addr, Tuning::default(), 2500);
        shutdown.cancel();

        timeout(Duration::from_secs(10), task)
            .await
            .expect("returns without waiting for more events")
            .unwrap();
        assert_eq!(get(&queue.stats.delivered), 2500);
        assert_eq!(index.len(), 2500);
        assert_accounted(&queue);
    }

    #[tokio::test]
    async fn shutdown_while_a_batch_lingers_still_delivers_it() {
        let (server, _index) = downstream(any_port()).await;
        let tuning = Tuning {
            linger: Duration::from_millis(300),
            ..fast()
        };
        let (queue, task, shutdown) = forward(server.tcp_addr, tuning, 10);
        sleep(Duration::from_millis(50)).await;
        assert_eq!(get(&queue.stats.in_flight), 10, "the batch is lingering");
        shutdown.cancel();

        timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(get(&queue.stats.delivered), 10);
        assert_accounted(&queue);
    }

    /// Stopping with a downstream that is gone, or that takes batches and
    /// never answers (a 10 s ack timeout, longer than the grace): the task
    /// ends once the grace has passed with nothing taken, and every event
    /// is accounted for, the undelivered as dropped.
    #[tokio::test]
    async fn stopping_gives_up_on_a_downstream_that_takes_nothing_and_counts_the_rest() {
        let gone = TcpListener::bind(any_port()).await.unwrap();
        let gone_addr = gone.local_addr().unwrap();
        drop(gone);
        let (silent, _) = scripted(|_| Reply::Silent).await;
        for addr in [gone_addr, silent] {
            let tuning = Tuning {
                ack_timeout: Duration::from_secs(10),
                stop_grace: Duration::from_millis(300),
                ..fast()
            };
            let (queue, task, shutdown) = forward(addr, tuning, 2500);
            sleep(Duration::from_millis(100)).await;
            let started = std::time::Instant::now();
            shutdown.cancel();
            timeout(Duration::from_secs(5), task)
                .await
                .expect("ends soon after the grace")
                .unwrap();
            let took = started.elapsed();
            assert!(took < Duration::from_secs(3), "{addr}: {took:?}");
            assert_eq!(get(&queue.stats.dropped), 2500, "{addr}");
            assert_accounted(&queue);
        }
    }

    #[tokio::test]
    async fn an_ipv6_downstream_is_reached_by_its_address_alone() {
        let (server, index) = downstream("[::1]:0".parse().unwrap()).await;
        let (queue, _task, _shutdown) = forward(server.tcp_addr, fast(), 5);
        wait_until("all delivered", || get(&queue.stats.delivered) == 5).await;
        assert_eq!(index.len(), 5);
    }

    #[tokio::test]
    async fn a_closed_queue_ends_the_task() {
        let (server, _index) = downstream(any_port()).await;
        let (queue, task, _shutdown) = forward(server.tcp_addr, fast(), 5);
        let stats = queue.stats.clone();
        drop(queue);

        timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(get(&stats.delivered), 5);
    }
}
