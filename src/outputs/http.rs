//! HTTP delivery shared by the PagerDuty and webhook outputs: POST with
//! retries on connection errors, 429 and 5xx (exponential backoff with full
//! jitter, honouring `Retry-After`), and no retry on other 4xx; except that
//! a webhook refused as too large (`413`) is sent once more cut short.
//!
//! Also the loop shape both outputs share: [`next_batch`] waits for events
//! until shutdown, then hands out only what is already queued.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Client, Response, StatusCode};
use tokio_util::sync::CancellationToken;

use super::{Delivery, Tally};
use crate::event::Event;

/// Events taken from the queue at once; they are still sent one by one.
pub(super) const BATCH: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a refusal's body goes into the log.
const LOGGED_BODY: usize = 512;

/// How hard to try before giving up on one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// `None`: retry until it succeeds or the process stops (pages).
    pub max_attempts: Option<u32>,
}

impl RetryPolicy {
    /// A page is never given up on while the process lives.
    pub fn pager() -> Self {
        Self {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(60),
            max_attempts: None,
        }
    }

    /// Push notifications are worth a few tries, not a blocked queue.
    pub fn push() -> Self {
        Self {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_attempts: Some(6),
        }
    }

    /// The wait before retry number `retry` (1-based): full jitter over an
    /// exponentially growing window, or the server's `Retry-After` when it
    /// asks for longer; capped by `max_backoff`. A `Retry-After` of now
    /// (`0`, a past date) is no reason to retry at once: a receiver failing
    /// that way would get a request loop for as long as it fails.
    fn backoff(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let window = self
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1)))
            .min(self.max_backoff);
        let jittered = window.mul_f64(rand::random::<f64>());
        retry_after
            .map_or(jittered, |asked| asked.max(jittered))
            .min(self.max_backoff)
    }

    fn exhausted(&self, attempts: u32) -> bool {
        self.max_attempts.is_some_and(|max| attempts >= max)
    }
}

/// Why an output cannot send at all.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("invalid header `{name}`: {reason}")]
    Header { name: String, reason: String },
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    /// Without its URL, which may carry a secret (webhook tokens).
    #[error("{}", with_causes(.0))]
    Transport(reqwest::Error),
    #[error("HTTP {status}: {body}")]
    Status {
        status: StatusCode,
        body: String,
        retry_after: Option<Duration>,
    },
}

impl AttemptError {
    /// Connection trouble, timeouts, throttling and server errors pass; a
    /// request the server refused (or one that cannot be built) will not.
    fn retryable(&self) -> bool {
        match self {
            AttemptError::Transport(e) => !e.is_builder(),
            AttemptError::Status { status, .. } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::REQUEST_TIMEOUT
            }
        }
    }

    fn too_large(&self) -> bool {
        matches!(self, AttemptError::Status { status, .. } if *status == StatusCode::PAYLOAD_TOO_LARGE)
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            AttemptError::Status { retry_after, .. } => *retry_after,
            AttemptError::Transport(_) => None,
        }
    }

    /// The downstream is up: it answered, with an error.
    fn answered(&self) -> bool {
        matches!(self, AttemptError::Status { .. })
    }
}

/// One request to make, as often as it takes while it is wanted.
pub struct Payload<'a> {
    pub url: &'a str,
    pub content_type: &'static str,
    /// Sent after `content_type`, so a configured `Content-Type` wins.
    pub headers: &'a HeaderMap,
    pub body: Bytes,
    /// How much longer the payload is wanted, asked before each attempt and
    /// again when that time is up during one: `None` drops it unsent, and
    /// cuts an attempt in flight (a cluster node's page of a shard whose
    /// lease ran out here: it must not land after the next owner's pages).
    pub wanted: &'a (dyn Fn() -> Option<Duration> + Sync),
}

/// For a payload wanted until it is delivered.
pub fn always() -> Option<Duration> {
    Some(Duration::MAX)
}

/// What became of one event's request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Dropped,
    /// No longer wanted before an attempt, or during one (cut): skipped
    /// unsent.
    Unwanted,
    /// A page whose receiver failed while the output stops: still in
    /// flight, left to the output's next run.
    Left,
}

/// How the attempts at one payload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Delivered,
    Dropped,
    Unwanted,
    /// Refused as too large: worth sending again cut short.
    TooLarge,
    /// A page given up on while the output stops: the next run sends it.
    Left,
}

/// Counts the event delivered, dropped or skipped; a page left to the next
/// run stays in flight.
fn settle(delivery: &Tally, ended: Ended) -> Outcome {
    match ended {
        Ended::Left => Outcome::Left,
        Ended::Delivered => {
            delivery.delivered(1);
            Outcome::Delivered
        }
        Ended::Unwanted => {
            delivery.skipped(1);
            Outcome::Unwanted
        }
        Ended::Dropped | Ended::TooLarge => {
            delivery.dropped(1);
            Outcome::Dropped
        }
    }
}

/// Sends payloads for one output, retrying as its policy says.
pub struct Poster {
    client: Client,
    retry: RetryPolicy,
    shutdown: CancellationToken,
    /// Set when a last attempt during shutdown failed: the downstream is down
    /// and the caller's grace period is better spent not waiting on it.
    given_up: bool,
    /// Events dropped unsent since then, reported once by [`Poster::finish`].
    unsent: usize,
}

impl Poster {
    pub fn new(retry: RetryPolicy, shutdown: CancellationToken) -> Result<Poster, SetupError> {
        let client = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("vigil/", env!("CARGO_PKG_VERSION")))
            // A redirected POST may silently become a GET: report it instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Poster {
            client,
            retry,
            shutdown,
            given_up: false,
            unsent: 0,
        })
    }

    /// Sends one event's payload and settles it in `delivery` (delivered or
    /// dropped); every retry is counted there too.
    pub async fn post(&mut self, delivery: &Tally, payload: &Payload<'_>) -> Outcome {
        let ended = self.attempts(delivery, payload, false).await;
        settle(delivery, ended)
    }

    /// As [`post`](Self::post), but when the downstream refuses the payload
    /// as too large (`413`), the body `cut` makes is sent instead: an event
    /// cut short beats one never delivered, above all a page.
    pub async fn post_or_cut(
        &mut self,
        delivery: &Tally,
        payload: &Payload<'_>,
        cut: impl FnOnce() -> Bytes,
    ) -> Outcome {
        let mut ended = self.attempts(delivery, payload, true).await;
        if ended == Ended::TooLarge {
            let shorter = Payload {
                body: cut(),
                ..*payload
            };
            ended = self.attempts(delivery, &shorter, false).await;
        }
        settle(delivery, ended)
    }

    /// Tries `payload` as the policy says; with `can_cut`, a `413` ends the
    /// attempts as [`Ended::TooLarge`] instead of dropping the event.
    async fn attempts(&mut self, delivery: &Tally, payload: &Payload<'_>, can_cut: bool) -> Ended {
        let output = delivery.name.as_str();
        if self.given_up {
            self.unsent += 1;
            return Ended::Dropped;
        }
        let mut attempts = 0;
        loop {
            let Some(wanted_for) = (payload.wanted)() else {
                return Ended::Unwanted;
            };
            attempts += 1;
            let attempted = tokio::select! {
                // First: a process resumed from a pause past the time finds
                // the attempt cut before it is polled on.
                biased;
                () = no_longer_wanted(payload.wanted, wanted_for) => {
                    tracing::warn!(output, attempts, "Attempt cut in flight: no longer wanted here.");
                    return Ended::Unwanted;
                }
                attempted = self.attempt(payload) => attempted,
            };
            let Err(error) = attempted else {
                return Ended::Delivered;
            };
            // URLs stay out of the logs: a webhook's may carry a token.
            if can_cut && error.too_large() {
                tracing::warn!(
                    output, %error, bytes = payload.body.len(),
                    "Event refused as too large; sending it again cut short."
                );
                return Ended::TooLarge;
            }
            if !error.retryable() {
                tracing::error!(output, %error, "Event refused by the downstream; dropped.");
                return Ended::Dropped;
            }
            let stopping = self.shutdown.is_cancelled();
            // Once stopping, a receiver that does not answer gets no more
            // attempts (even at an event tried before): another may wait on
            // it as long again. Pages (tried for as long as the process
            // lives) stop at any failure: they are written down for the
            // next run or declaration. A push has nothing else keeping it,
            // so a receiver that answers gets the rest of its tries.
            if stopping && (!error.answered() || self.retry.max_attempts.is_none()) {
                self.given_up = true;
                if self.retry.max_attempts.is_none() {
                    tracing::warn!(
                        output, %error, attempts,
                        "Delivery failed while the output stops (shutdown, or a reload replaced it); the page is left to the next run."
                    );
                    return Ended::Left;
                }
                tracing::error!(
                    output, %error, attempts,
                    "Delivery failed while the output stops (shutdown, or a reload replaced it); event dropped."
                );
                return Ended::Dropped;
            }
            if self.retry.exhausted(attempts) {
                // While stopping, the next events would likely fare the same.
                self.given_up = stopping;
                tracing::error!(
                    output, %error, attempts,
                    "Delivery failed; giving up, event dropped."
                );
                return Ended::Dropped;
            }
            let wait = self.retry.backoff(attempts, error.retry_after());
            tracing::warn!(output, %error, attempts, ?wait, "Delivery failed; retrying.");
            delivery.retried();
            if stopping {
                // Within the grace: soon, not after a full backoff.
                tokio::time::sleep(wait.min(self.retry.initial_backoff)).await;
            } else {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = self.shutdown.cancelled() => {}
                }
            }
        }
    }

    /// Whether it gave up while stopping: every later payload is dropped
    /// unsent.
    pub fn gave_up(&self) -> bool {
        self.given_up
    }

    /// Reports, once, what stopping (shutdown or a reload) left unsent.
    pub fn finish(self, output: &str) {
        if self.unsent > 0 {
            tracing::error!(
                output,
                dropped = self.unsent,
                "Events dropped unsent as the output stopped (shutdown, or a reload replaced it): the downstream was failing."
            );
        }
    }

    async fn attempt(&self, payload: &Payload<'_>) -> Result<(), AttemptError> {
        let response = self
            .client
            .post(payload.url)
            .header(CONTENT_TYPE, payload.content_type)
            .headers(payload.headers.clone())
            .body(payload.body.clone())
            .send()
            .await
            .map_err(|e| AttemptError::Transport(e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = retry_after(response.headers());
        Err(AttemptError::Status {
            status,
            body: body_start(response).await,
            retry_after,
        })
    }
}

/// How often an attempt in flight asks whether its payload is still wanted,
/// at most: a cluster node that hands a shard back waits this long before
/// letting another node take it, so its pages of the shard in flight are
/// cut by then.
pub const WANTED_RECHECK: Duration = Duration::from_millis(100);

/// Returns once `wanted` says the payload is wanted no more, asking it again
/// each time the time it gave (`wanted_for` first) is up, and at least every
/// [`WANTED_RECHECK`] (a shard handed back is disowned before its deadline).
/// A payload wanted for ever ([`always`]: outside a cluster, a webhook's)
/// is never asked again: no timer per request.
async fn no_longer_wanted(
    wanted: &(dyn Fn() -> Option<Duration> + Sync),
    mut wanted_for: Duration,
) {
    if wanted_for == Duration::MAX {
        return std::future::pending().await;
    }
    loop {
        tokio::time::sleep(wanted_for.min(WANTED_RECHECK)).await;
        match wanted() {
            Some(more) => wanted_for = more,
            None => return,
        }
    }
}

/// `error sending request: client error (Connect): tcp connect error: …`:
/// reqwest's own message alone rarely says what went wrong.
fn with_causes(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(e) = cause {
        text.push_str(": ");
        text.push_str(&e.to_string());
        cause = e.source();
    }
    text
}

/// `Retry-After` as delay-seconds or an HTTP-date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// The first bytes of a response body, for the log; never reads a huge body.
async fn body_start(mut response: Response) -> String {
    let mut start = Vec::new();
    while start.len() < LOGGED_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => start.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let truncated = start.len() > LOGGED_BODY;
    start.truncate(LOGGED_BODY);
    let mut text = String::from_utf8_lossy(&start).into_owned();
    if truncated {
        text.push('…');
    }
    text
}

/// Configured headers, checked once rather than on every request.
pub fn header_map(headers: &BTreeMap<String, String>) -> Result<HeaderMap, SetupError> {
    let invalid = |name: &str, reason: String| SetupError::Header {
        name: name.to_owned(),
        reason,
    };
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let (key, value) = header(name, value).map_err(|reason| invalid(name, reason))?;
        map.insert(key, value);
    }
    Ok(map)
}

/// One configured header, or why HTTP cannot carry it.
pub fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let key = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
    // How the request is framed and carried is the client's to say: a fixed
    // `Content-Length` cut every longer body short, silently.
    const SET_BY_VIGIL: [&str; 9] = [
        "content-length",
        "transfer-encoding",
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ];
    if SET_BY_VIGIL.contains(&key.as_str()) {
        return Err(format!(
            "`{name}` is set for each request, not by configuration"
        ));
    }
    let value = HeaderValue::from_str(value).map_err(|e| e.to_string())?;
    Ok((key, value))
}

/// Why `url` cannot be posted to, if it cannot: an absolute `http` or
/// `https` URL is needed (parsing one already requires its host).
pub fn url_problem(url: &str) -> Option<String> {
    match reqwest::Url::parse(url) {
        Err(e) => Some(e.to_string()),
        Ok(url) if !matches!(url.scheme(), "http" | "https") => Some(format!(
            "the scheme `{}` is not sent to; use http or https",
            url.scheme()
        )),
        // What the request is built from: stricter than the URL parser
        // (e.g. at most 64 KiB).
        Ok(url) => url
            .as_str()
            .parse::<hyper::Uri>()
            .err()
            .map(|e| e.to_string()),
    }
}

/// The next events to send: waits for them until `shutdown` is cancelled,
/// then takes only what is already queued. `None` when there is nothing more
/// to do.
pub async fn next_batch(
    delivery: &mut Delivery,
    shutdown: &CancellationToken,
) -> Option<Vec<Event>> {
    if !shutdown.is_cancelled() {
        tokio::select! {
            batch = delivery.next_batch(BATCH) => return batch,
            () = shutdown.cancelled() => {}
        }
    }
    // Yielding first gives the task a fresh cooperative budget, so a queued
    // event is ready on the first poll and never mistaken for an empty queue.
    tokio::task::yield_now().await;
    delivery.next_batch(BATCH).now_or_never().flatten()
}

/// Runs an output that cannot send at all: every event is dropped, so the
/// accounting stays whole and the failure stays visible.
pub async fn refuse_all(mut delivery: Delivery, shutdown: CancellationToken, error: SetupError) {
    let output = delivery.name.clone();
    tracing::error!(output, %error, "Output cannot send; every event will be dropped.");
    while let Some(batch) = next_batch(&mut delivery, &shutdown).await {
        tracing::error!(
            output,
            count = batch.len(),
            "Events dropped: the output cannot send."
        );
        delivery.dropped(batch.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            max_attempts: Some(3),
        }
    }

    /// A cluster node's page whose shard is handed back while the receiver
    /// holds the request: cut then, not left to land after the next owner's
    /// pages (the request timeout is longer than the lease's margin).
    #[tokio::test(start_paused = true)]
    async fn an_attempt_in_flight_is_cut_once_no_longer_wanted() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        // Takes the request and never answers.
        let receiver = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut conn, &mut sink).await;
        });
        let asked = AtomicU32::new(0);
        // The lease has seconds left, then the shard is handed back.
        let lease_left = || match asked.fetch_add(1, Ordering::Relaxed) {
            0 => Some(Duration::from_secs(4)),
            _ => None,
        };
        let payload = Payload {
            url: &url,
            content_type: "application/json",
            headers: &HeaderMap::new(),
            body: Bytes::from_static(b"{}"),
            wanted: &lease_left,
        };
        let tally = Tally {
            name: "pager".into(),
            stats: Default::default(),
        };
        tally.adopt(1);
        let mut poster = Poster::new(RetryPolicy::pager(), CancellationToken::new()).unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(poster.post(&tally, &payload).await, Outcome::Unwanted);
        assert_eq!(
            tally.stats.retries.load(Ordering::Relaxed),
            0,
            "not retried"
        );
        assert_eq!(
            started.elapsed(),
            WANTED_RECHECK,
            "cut at the first check after it was no longer wanted"
        );
        receiver.abort();
    }

    /// Outside a cluster (and for a webhook) a payload is wanted until
    /// delivered: an attempt the receiver answers late is not watched by a
    /// timer asking again every [`WANTED_RECHECK`].
    #[tokio::test(start_paused = true)]
    async fn a_payload_wanted_for_ever_is_asked_once_per_attempt() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        // Answers a second after the request came.
        let receiver = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = conn.read(&mut request).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            conn.write_all(answer).await.unwrap();
        });
        let asked = AtomicU32::new(0);
        let wanted = || {
            asked.fetch_add(1, Ordering::Relaxed);
            always()
        };
        let payload = Payload {
            url: &url,
            content_type: "application/json",
            headers: &HeaderMap::new(),
            body: Bytes::from_static(b"{}"),
            wanted: &wanted,
        };
        let tally = Tally {
            name: "webhook".into(),
            stats: Default::default(),
        };
        tally.adopt(1);
        let mut poster = Poster::new(RetryPolicy::pager(), CancellationToken::new()).unwrap();
        assert_eq!(poster.post(&tally, &payload).await, Outcome::Delivered);
        assert_eq!(
            asked.load(Ordering::Relaxed),
            1,
            "asked before the attempt only"
        );
        receiver.await.unwrap();
    }

    #[test]
    fn a_url_too_long_for_a_request_is_refused_where_the_parser_took_it() {
        let long = format!("http://127.0.0.1:1/{}", "a".repeat(70_000));
        assert!(reqwest::Url::parse(&long).is_ok());
        assert!(url_problem(&long).is_some());
        assert_eq!(url_problem("http://127.0.0.1:1/hook?token=x"), None);
    }

    #[test]
    fn headers_that_frame_or_route_the_request_are_not_configurable() {
        for name in ["Content-Length", "transfer-encoding", "Host", "Connection"] {
            let refused = header(name, "5").unwrap_err();
            assert!(refused.contains("is set for each request"), "{refused}");
        }
        assert!(header("X-Token", "s3cret").is_ok());
    }

    #[test]
    fn backoff_stays_within_the_growing_window_and_the_cap() {
        let p = policy();
        for _ in 0..100 {
            assert!(p.backoff(1, None) <= Duration::from_millis(100));
            assert!(p.backoff(3, None) <= Duration::from_millis(400));
            assert!(p.backoff(40, None) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn retry_after_wins_but_is_capped() {
        let p = policy();
        assert_eq!(
            p.backoff(1, Some(Duration::from_millis(700))),
            Duration::from_millis(700)
        );
        assert_eq!(
            p.backoff(1, Some(Duration::from_secs(90))),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn a_retry_after_of_now_still_backs_off() {
        // `Retry-After: 0`, or a date already past, once made every retry
        // immediate: a pager hammered a failing receiver (and the log) for
        // as long as it failed.
        let p = policy();
        let waited: Duration = (0..100).map(|_| p.backoff(4, Some(Duration::ZERO))).sum();
        assert!(
            waited > Duration::from_secs(1),
            "{waited:?} over 100 retries"
        );
    }

    #[test]
    fn attempts_run_out_only_with_a_limit() {
        assert!(!policy().exhausted(2));
        assert!(policy().exhausted(3));
        assert!(!RetryPolicy::pager().exhausted(u32::MAX));
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        h.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        let wait = retry_after(&h).unwrap();
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(
            retry_after(&h),
            Some(Duration::ZERO),
            "a past date means now"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn invalid_headers_are_named() {
        let ok = BTreeMap::from([("X-Token".to_owned(), "t".to_owned())]);
        assert_eq!(header_map(&ok).unwrap()["x-token"], "t");
        let bad = BTreeMap::from([("X Token".to_owned(), "t".to_owned())]);
        assert!(
            header_map(&bad)
                .unwrap_err()
                .to_string()
                .contains("`X Token`")
        );
    }
}
