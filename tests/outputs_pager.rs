//! The PagerDuty and webhook outputs against a local HTTP receiver (axum on
//! 127.0.0.1:0) that records every request and answers as scripted: the
//! outputs driven in-process through their queues, plus one end-to-end run of
//! the real binary fed by riemann-client.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vigil::clock::{MICROS_PER_SEC, ManualClock};
use vigil::event::{Event, Metric};
use vigil::outputs::holds::{self, Work};
use vigil::outputs::http::RetryPolicy;
use vigil::outputs::incidents::{self, Memory};
use vigil::outputs::template::Template;
use vigil::outputs::{
    self, Kept, OutputKind, OutputSink, OutputSpec, OutputStats, Queue, pager, webhook,
};

/// Bound on waiting for something the outputs should do within milliseconds.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The receiver
// ---------------------------------------------------------------------------

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    method: Method,
    path: String,
    headers: HeaderMap,
    body: String,
}

impl Seen {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// An answer to give: status, headers, body.
#[derive(Debug, Clone)]
struct Reply(u16, Vec<(&'static str, &'static str)>, &'static str);

/// PagerDuty's answer to an accepted event.
fn accepted() -> Reply {
    Reply(
        202,
        vec![],
        r#"{"status":"success","message":"Event processed"}"#,
    )
}

#[derive(Default)]
struct Script {
    seen: Vec<Seen>,
    /// Answers for the next requests, in order; then `otherwise`.
    next: VecDeque<Reply>,
    otherwise: Option<Reply>,
    /// Answer nothing, ever, while set.
    hang: bool,
    /// Take this long over each answer.
    delay: Option<Duration>,
}

#[derive(Clone)]
struct Receiver {
    url: String,
    script: Arc<Mutex<Script>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let script = Arc::new(Mutex::new(Script::default()));
        let app = Router::new().fallback(record).with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v2/enqueue", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Receiver { url, script }
    }

    fn reply_next(&self, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().unwrap().next.extend(replies);
    }

    fn reply_always(&self, reply: Reply) {
        self.script.lock().unwrap().otherwise = Some(reply);
    }

    /// From now on, takes `delay` over each answer.
    fn slow(&self, delay: Duration) {
        self.script.lock().unwrap().delay = Some(delay);
    }

    /// From now on, takes each request and never answers it.
    fn hang(&self) {
        self.script.lock().unwrap().hang = true;
    }

    fn seen(&self) -> Vec<Seen> {
        self.script.lock().unwrap().seen.clone()
    }

    /// Waits until at least `n` requests arrived; returns all of them.
    async fn wait_for(&self, n: usize) -> Vec<Seen> {
        let deadline = Instant::now() + WAIT;
        loop {
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} requests within {WAIT:?}, got {seen:#?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn record(
    State(script): State<Arc<Mutex<Script>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (Reply(status, headers, body), hang, delay) = {
        let mut script = script.lock().unwrap();
        script.seen.push(Seen {
            at: Instant::now(),
            method,
            path: uri.path().to_owned(),
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
        let reply = script
            .next
            .pop_front()
            .or_else(|| script.otherwise.clone())
            .unwrap_or_else(accepted);
        (reply, script.hang, script.delay)
    };
    if hang {
        std::future::pending::<()>().await;
    }
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
    for (name, value) in headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}

// ---------------------------------------------------------------------------
// Driving an output in-process
// ---------------------------------------------------------------------------

fn fast(max_attempts: Option<u32>) -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(10),
        // Above the 1 s Retry-After the 429 test asks for.
        max_backoff: Duration::from_secs(2),
        max_attempts,
    }
}

fn pager_config(url: &str) -> pager::Config {
    pager::Config {
        url: url.into(),
        dedup_key: None,
        resend_interval: Duration::from_secs(3600),
        api: pager::Api::PagerDuty {
            routing_key: "R0UT1NGKEY".into(),
        },
    }
}

/// A running output: its queue, its shutdown switch and its task.
struct Running {
    queue: Arc<Queue>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// Open incidents of output `pager`, saved to `file` if there is one.
fn memory(config: &pager::Config, file: Option<PathBuf>) -> Arc<Memory> {
    let max = pager::MAX_OPEN;
    Arc::new(Memory::open("pager", file, config.receiver(), max))
}

/// [`pager_config`] with one incident per host (`dedup_key: "{host}"`),
/// which the series of a host share.
fn per_host(url: &str) -> pager::Config {
    pager::Config {
        dedup_key: Some(Template::parse("{host}").unwrap()),
        ..pager_config(url)
    }
}

impl Running {
    /// Queues an event of each `(service, state)`, in order.
    fn push_all(&self, pages: &[(&str, &str)]) {
        for (service, state) in pages {
            self.queue.push(event(service, state));
        }
    }

    fn pager(config: pager::Config) -> Running {
        Running::pager_remembering(memory(&config, None), config)
    }

    fn pager_remembering(memory: Arc<Memory>, config: pager::Config) -> Running {
        let (queue, delivery) = outputs::queue("pager", 100);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(pager::run(
            memory,
            Arc::default(),
            config,
            delivery,
            fast(None),
            shutdown.clone(),
        ));
        Running {
            queue,
            shutdown,
            task,
        }
    }

    /// A pager output started as the server starts one: its pages hold the
    /// work that made them in `kept`'s holds.
    fn pager_holding(url: &str, kept: &Kept) -> Running {
        let spec = OutputSpec {
            name: "pager".into(),
            kind: OutputKind::Pager(pager_config(url)),
        };
        let shutdown = CancellationToken::new();
        let (queue, task) = outputs::start(&spec, kept, shutdown.clone());
        Running {
            queue,
            shutdown,
            task,
        }
    }

    fn webhook(config: webhook::Config, max_attempts: u32) -> Running {
        let (queue, delivery) = outputs::queue("push", 100);
        let shutdown = CancellationToken::new();
        let policy = fast(Some(max_attempts));
        let task = tokio::spawn(webhook::run(config, delivery, policy, shutdown.clone()));
        Running {
            queue,
            shutdown,
            task,
        }
    }

    fn count(&self, pick: fn(&OutputStats) -> &AtomicU64) -> u64 {
        pick(&self.queue.stats).load(Ordering::Acquire)
    }

    fn delivered(&self) -> u64 {
        self.count(|s| &s.delivered)
    }

    fn dropped(&self) -> u64 {
        self.count(|s| &s.dropped)
    }

    fn skipped(&self) -> u64 {
        self.count(|s| &s.skipped)
    }

    /// Taken and not settled: what a pager stopped with its receiver failing
    /// leaves to its next run.
    fn in_flight(&self) -> u64 {
        self.count(|s| &s.in_flight)
    }

    fn retries(&self) -> u64 {
        self.count(|s| &s.retries)
    }

    /// Waits until every accepted event is settled, then checks the identity.
    async fn settled(&self) {
        eventually(
            || self.queue.queued() == 0 && self.count(|s| &s.in_flight) == 0,
            || format!("events still unsettled after {WAIT:?}"),
        )
        .await;
        self.assert_accounted();
    }

    fn assert_accounted(&self) {
        let (accepted, in_flight) = (self.count(|s| &s.accepted), self.count(|s| &s.in_flight));
        let (delivered, dropped, skipped) = (self.delivered(), self.dropped(), self.skipped());
        let queued = self.queue.queued();
        assert_eq!(
            accepted,
            delivered + dropped + skipped + queued + in_flight,
            "accepted {accepted} != delivered {delivered} + dropped {dropped} \
             + skipped {skipped} + queued {queued} + in flight {in_flight}"
        );
    }

    /// Cancels shutdown and waits for the task to end.
    async fn stop(&mut self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the output ends soon after shutdown")
            .expect("the output task does not panic");
    }
}

fn event(service: &str, state: &str) -> Event {
    Event {
        host: Some("web1".into()),
        service: Some(service.into()),
        state: Some(state.into()),
        time: 1_700_000_000_123_456,
        description: Some("root is full".into()),
        tags: vec!["prod".into()],
        metric: Some(Metric::Float(0.97)),
        ttl: Some(60.0),
        attributes: vec![("team".into(), "ops".into())],
    }
}

// ---------------------------------------------------------------------------
// PagerDuty
// ---------------------------------------------------------------------------

/// A page of a shard its node stopped owning is skipped before its next
/// attempt (the shard's new owner sends it: not a loss), and holds nothing
/// any more.
#[tokio::test]
async fn a_page_of_a_disowned_shard_is_skipped_before_its_next_attempt() {
    let rx = Receiver::start().await;
    rx.reply_always(Reply(503, vec![], "down"));
    let kept = Kept::default();
    let held = kept.holds();
    let mut pager = Running::pager_holding(&rx.url, &kept);
    let queue = pager.queue.clone();
    let message = Work::Event { shard: 2, seq: 10 };
    holds::made_by(message, || queue.push(event("cpu", "critical")));
    rx.wait_for(1).await;
    held.disown(2);
    assert_eq!(held.seq_settled(2, 50), 50, "the next owner has it");
    eventually(
        || queue.stats.skipped.load(Ordering::Acquire) > 0,
        || "skipped before its next attempt".into(),
    )
    .await;
    let attempts = rx.seen().len();
    rx.reply_always(accepted());
    queue.push(event("disk", "critical"));
    let seen = rx.wait_for(attempts + 1).await;
    let after_the_skip: Vec<_> = seen[attempts..]
        .iter()
        .map(|s| s.json()["dedup_key"].clone())
        .collect();
    assert_eq!(
        after_the_skip,
        ["web1/disk"],
        "the skipped page was not sent again"
    );
    assert_eq!(queue.stats.dropped.load(Ordering::Acquire), 0, "no loss");
    pager.stop().await;
}

/// A page made while a cluster node runs a shard's message holds that
/// message (the node saves its progress only up to before it) until the page
/// is delivered, through failed attempts; then it is released.
#[tokio::test]
async fn a_page_holds_the_message_that_made_it_until_it_is_delivered() {
    let rx = Receiver::start().await;
    rx.reply_always(Reply(503, vec![], "down"));
    let kept = Kept::default();
    let held = kept.holds();
    let mut pager = Running::pager_holding(&rx.url, &kept);
    let queue = pager.queue.clone();
    let message = Work::Event { shard: 2, seq: 10 };
    holds::made_by(message, || queue.push(event("cpu", "critical")));
    queue.push(event("disk", "critical"));
    assert_eq!(held.seq_settled(2, 50), 9, "held once queued");
    rx.wait_for(2).await;
    assert_eq!(
        held.seq_settled(2, 50),
        9,
        "still held after failed attempts"
    );
    rx.reply_always(accepted());
    eventually(
        || held.seq_settled(2, 50) == 50,
        || "released once delivered".into(),
    )
    .await;
    pager.stop().await;
}

#[tokio::test]
async fn critical_triggers_and_ok_resolves_the_same_incident() {
    let rx = Receiver::start().await;
    let out = Running::pager(pager_config(&rx.url));
    out.queue.push(event("disk /", "critical"));
    out.queue.push(event("disk /", "ok"));
    let seen = rx.wait_for(2).await;

    assert_eq!(
        seen[0].json(),
        json!({
            "routing_key": "R0UT1NGKEY",
            "event_action": "trigger",
            "dedup_key": "web1/disk /",
            "payload": {
                "summary": "web1 disk / is critical (0.97)",
                "source": "web1",
                "severity": "critical",
                "timestamp": "2023-11-14T22:13:20.123Z",
                "component": "disk /",
                "class": "critical",
                "custom_details": {
                    "description": "root is full",
                    "metric": 0.97,
                    "tags": ["prod"],
                    "attributes": {"team": "ops"}
                }
            }
        })
    );
    assert_eq!(
        seen[1].json(),
        json!({"routing_key": "R0UT1NGKEY", "event_action": "resolve", "dedup_key": "web1/disk /"})
    );
    assert_eq!(seen[0].json()["dedup_key"], seen[1].json()["dedup_key"]);
    for s in &seen {
        assert_eq!((&s.method, s.path.as_str()), (&Method::POST, "/v2/enqueue"));
        assert_eq!(s.header("content-type"), "application/json");
    }
    out.settled().await;
    assert_eq!((out.delivered(), out.dropped(), out.retries()), (2, 0, 0));
}

#[tokio::test]
async fn warning_and_expired_trigger_with_their_severities() {
    let rx = Receiver::start().await;
    let out = Running::pager(pager_config(&rx.url));
    out.queue.push(event("cpu", "warning"));
    let mut silent = event("heartbeat", "expired");
    silent.metric = None;
    out.queue.push(silent);
    let seen = rx.wait_for(2).await;

    let (warning, expired) = (seen[0].json(), seen[1].json());
    assert_eq!(warning["event_action"], "trigger");
    assert_eq!(warning["payload"]["severity"], "warning");
    assert_eq!(expired["event_action"], "trigger");
    assert_eq!(expired["payload"]["severity"], "error");
    assert_eq!(expired["payload"]["summary"], "web1 heartbeat is expired");
    assert_eq!(expired["dedup_key"], "web1/heartbeat");
    out.settled().await;
}

#[tokio::test]
async fn a_custom_dedup_key_template_is_used_for_trigger_and_resolve() {
    let rx = Receiver::start().await;
    let mut config = pager_config(&rx.url);
    config.dedup_key = Some(Template::parse("{team}:{service}").unwrap());
    let out = Running::pager(config);
    out.queue.push(event("disk /", "critical"));
    out.queue.push(event("disk /", "ok"));
    let seen = rx.wait_for(2).await;
    assert_eq!(seen[0].json()["dedup_key"], "ops:disk /");
    assert_eq!(seen[1].json()["dedup_key"], "ops:disk /");
    out.settled().await;
}

/// One incident per host (`dedup_key: "{host}"`): the `ok` of one series
/// once resolved it while another series of the host was still critical,
/// and nothing paged for that one again (its state stayed). It resolves
/// once the last series that triggered it clears; an `ok` of a series that
/// never did resolves nothing.
#[tokio::test]
async fn an_incident_shared_by_series_resolves_when_the_last_of_them_clears() {
    let rx = Receiver::start().await;
    let config = per_host(&rx.url);
    let out = Running::pager(config);
    out.push_all(&[
        ("disk /", "critical"),
        ("cpu", "critical"),
        ("disk /", "ok"),
        ("load", "ok"),
    ]);
    out.settled().await;
    assert_eq!(actions(&rx), ["trigger web1"], "cpu is still critical");
    out.queue.push(event("cpu", "ok"));
    out.settled().await;
    assert_eq!(actions(&rx), ["trigger web1", "resolve web1"]);
    assert_eq!((out.delivered(), out.skipped()), (2, 3));
}

/// One incident per host (`dedup_key: "{host}"`) whose series fail at
/// different severities: `disk warning` re-triggered it at warning while
/// `cpu` was still critical, and PagerDuty (which takes a trigger for an open
/// incident as its update) showed on-call a warning. Its severity is the
/// highest of its failing series': a lower one joins without a page, a
/// higher one escalates it; the `ok` of the series that set it sends
/// nothing (it tells nothing of the others' severity), and the next trigger
/// at the severity still failing brings the receiver's down to it.
#[tokio::test]
async fn a_shared_incident_pages_at_the_highest_severity_of_its_failing_series() {
    let rx = Receiver::start().await;
    let config = per_host(&rx.url);
    let out = Running::pager(config);
    out.push_all(&[
        ("cpu", "critical"),
        ("disk /", "warning"),
        ("disk /", "critical"),
        ("load", "warning"),
        ("cpu", "ok"),
        ("disk /", "ok"),
        ("load", "warning"),
        ("load", "ok"),
    ]);
    out.settled().await;
    let pages: Vec<String> = (rx.seen().iter())
        .map(|seen| {
            let page = seen.json();
            let payload = &page["payload"];
            format!(
                "{} {}",
                page["event_action"].as_str().unwrap(),
                payload["summary"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        pages,
        [
            "trigger web1 cpu is critical (0.97)",
            "trigger web1 load is warning (0.97)",
            "resolve "
        ]
    );
    let severities: Vec<_> = (rx.seen().iter())
        .map(|seen| seen.json()["payload"]["severity"].clone())
        .collect();
    assert_eq!(
        severities,
        [json!("critical"), json!("warning"), Value::Null]
    );
}

/// One incident per host: the resolve sent when its last series cleared was
/// refused for good (a 4xx), so the receiver still has it open. The output
/// forgot which series had triggered it, and took the `ok` of a series that
/// never had for its resolve. It remembers the series whose `ok` was
/// refused: the next `ok` of that series resolves it, no other's does.
#[tokio::test]
async fn a_refused_resolve_leaves_the_incident_to_the_series_that_triggered_it() {
    let rx = Receiver::start().await;
    let config = per_host(&rx.url);
    let out = Running::pager(config);
    rx.reply_next([
        accepted(),
        Reply(400, vec![], r#"{"status":"invalid event"}"#),
    ]);
    out.queue.push(event("cpu", "critical"));
    out.queue.push(event("cpu", "ok"));
    out.settled().await;
    assert_eq!(actions(&rx), ["trigger web1", "resolve web1"]);
    assert_eq!(out.dropped(), 1, "the resolve, refused");
    out.queue.push(event("disk /", "ok"));
    out.settled().await;
    assert_eq!(
        actions(&rx),
        ["trigger web1", "resolve web1"],
        "disk never triggered it"
    );
    out.queue.push(event("cpu", "ok"));
    out.settled().await;
    assert_eq!(
        actions(&rx),
        ["trigger web1", "resolve web1", "resolve web1"]
    );
}

/// One incident per host: cpu's resolve was refused for good, so the
/// receiver still has the incident open; disk then failed in it, at
/// warning, and cleared. cpu, `ok` since, was still counted failing at
/// critical: disk's warning was not sent (the receiver kept showing cpu's
/// critical), nor was disk's `ok`, the last of a series failing in it (the
/// incident stayed open until cpu's next `ok`, which `changed_state` rules
/// do not send while cpu stays `ok`).
#[tokio::test]
async fn a_series_failing_after_a_refused_resolve_resolves_the_incident_when_it_clears() {
    let rx = Receiver::start().await;
    let config = per_host(&rx.url);
    let out = Running::pager(config);
    rx.reply_next([
        accepted(),
        Reply(400, vec![], r#"{"status":"invalid event"}"#),
    ]);
    out.push_all(&[
        ("cpu", "critical"),
        ("cpu", "ok"),
        ("disk /", "warning"),
        ("disk /", "ok"),
    ]);
    out.settled().await;
    let pages: Vec<String> = (rx.seen().iter())
        .map(|seen| {
            let page = seen.json();
            let severity = page["payload"]["severity"].as_str().unwrap_or("");
            format!("{} {severity}", page["event_action"].as_str().unwrap())
        })
        .collect();
    assert_eq!(
        pages,
        [
            "trigger critical",
            "resolve ",
            "trigger warning",
            "resolve "
        ]
    );
}

/// A reload changed `dedup_key` from the derived `host/service` to
/// `{host}` while `web1/cpu` was open, and another series then opened
/// `web1`: cpu's `ok` was taken for `web1`'s, which cpu never triggered, and
/// suppressed; `web1/cpu` stayed open at the receiver for good.
#[tokio::test]
async fn an_incident_a_reload_left_under_its_earlier_key_resolves_beside_the_new_one() {
    let rx = Receiver::start().await;
    let memory = memory(&pager_config(&rx.url), None);
    let mut before = Running::pager_remembering(memory.clone(), pager_config(&rx.url));
    before.queue.push(event("cpu", "critical"));
    before.settled().await;
    before.stop().await;

    let config = per_host(&rx.url);
    let after = Running::pager_remembering(memory, config);
    after.push_all(&[("disk /", "critical"), ("cpu", "ok"), ("disk /", "ok")]);
    after.settled().await;
    assert_eq!(
        actions(&rx),
        [
            "trigger web1/cpu",
            "trigger web1",
            "resolve web1/cpu",
            "resolve web1"
        ]
    );
}

/// `vigil test`'s model of a pager (`pager::Pages`) and the output itself,
/// fed the same events, send the same pages: `expect pager {…}` checks what
/// on-call will get.
#[tokio::test]
async fn vigil_test_pages_what_the_output_sends() {
    let many = 70;
    let mut crowd: Vec<(String, &str)> = (0..many)
        .map(|i| (format!("disk {i}"), "critical"))
        .collect();
    crowd.extend((1..many).map(|i| (format!("disk {i}"), "ok")));
    crowd.push(("disk 0".into(), "ok"));
    let sequences: Vec<Vec<(String, &str)>> = [
        vec![
            ("cpu", "critical"),
            ("disk", "critical"),
            ("cpu", "ok"),
            ("load", "ok"),
            ("disk", "ok"),
        ],
        vec![
            ("cpu", "warning"),
            ("disk", "critical"),
            ("cpu", "ok"),
            ("disk", "ok"),
        ],
        vec![
            ("cpu", "critical"),
            ("disk", "expired"),
            ("cpu", "ok"),
            ("disk", "ok"),
        ],
        vec![
            ("cpu", "critical"),
            ("cpu", "ok"),
            ("cpu", "critical"),
            ("disk", "unknown"),
            ("cpu", "ok"),
        ],
        vec![
            ("cpu", "critical"),
            ("disk", "warning"),
            ("disk", "critical"),
            ("load", "warning"),
            ("cpu", "ok"),
            ("disk", "ok"),
            ("load", "warning"),
            ("load", "ok"),
        ],
        vec![
            ("cpu", "warning"),
            ("disk", "expired"),
            ("load", "critical"),
            ("cpu", "warning"),
            ("load", "ok"),
            ("disk", "expired"),
            ("cpu", "critical"),
            ("disk", "ok"),
            ("cpu", "warning"),
            ("cpu", "ok"),
        ],
    ]
    .into_iter()
    .map(|pages| {
        pages
            .into_iter()
            .map(|(s, st)| (s.to_owned(), st))
            .collect()
    })
    .chain([crowd])
    .collect();
    for pages in sequences {
        let rx = Receiver::start().await;
        let config = per_host(&rx.url);
        let mut model = pager::Pages::new(config.clone());
        let out = Running::pager(config);
        // Each event settled before the next: which of them was paged.
        let (mut modelled, mut paged) = (Vec::new(), Vec::new());
        for (service, state) in &pages {
            let page = event(service, state);
            modelled.push(model.sends(&page, page.time));
            let before = rx.seen().len();
            out.queue.push(page);
            out.settled().await;
            paged.push(rx.seen().len() > before);
        }
        let at = |sent: &[bool]| -> Vec<String> {
            (sent.iter().zip(&pages))
                .filter(|(sent, _)| **sent)
                .map(|(_, (service, state))| format!("{service} {state}"))
                .collect()
        };
        assert_eq!(at(&paged), at(&modelled), "paged vs modelled");
    }
}

#[tokio::test]
async fn a_server_error_is_retried_until_accepted() {
    let rx = Receiver::start().await;
    rx.reply_next([Reply(500, vec![], "oops"), accepted()]);
    let out = Running::pager(pager_config(&rx.url));
    out.queue.push(event("disk /", "critical"));
    let seen = rx.wait_for(2).await;
    assert_eq!(seen[0].body, seen[1].body, "the retry sends the same page");
    out.settled().await;
    assert_eq!((out.delivered(), out.dropped(), out.retries()), (1, 0, 1));
}

/// On a paused clock: the retry waits on tokio's, which the receiver's
/// times are read from too, so the second passes at once and is measured
/// exactly.
#[tokio::test(start_paused = true)]
async fn throttling_is_retried_after_the_retry_after_delay() {
    let rx = Receiver::start().await;
    rx.reply_next([Reply(429, vec![("retry-after", "1")], "slow down")]);
    let out = Running::pager(pager_config(&rx.url));
    out.queue.push(event("disk /", "critical"));
    let seen = rx.wait_for(2).await;
    let waited = seen[1].at - seen[0].at;
    assert!(
        waited >= Duration::from_secs(1),
        "retried after {waited:?}, before Retry-After"
    );
    out.settled().await;
    assert_eq!((out.delivered(), out.retries()), (1, 1));
}

#[tokio::test]
async fn a_refused_page_is_not_retried_and_counts_as_dropped() {
    let rx = Receiver::start().await;
    rx.reply_next([Reply(400, vec![], r#"{"status":"invalid event"}"#)]);
    let out = Running::pager(pager_config(&rx.url));
    out.queue.push(event("disk /", "critical"));
    out.settled().await;
    assert_eq!((out.delivered(), out.dropped(), out.retries()), (0, 1, 0));
    // Pages go one at a time, each settled before the next: a retry of the
    // refused one would reach the receiver before the next page.
    out.queue.push(event("cpu", "critical"));
    rx.wait_for(2).await;
    out.settled().await;
    assert_eq!(actions(&rx), ["trigger web1/disk /", "trigger web1/cpu"]);
    assert_eq!((out.delivered(), out.dropped(), out.retries()), (1, 1, 0));
}

#[tokio::test]
async fn open_incidents_are_not_re_triggered_nor_unknown_ones_resolved() {
    let rx = Receiver::start().await;
    let out = Running::pager(pager_config(&rx.url));
    out.queue.push(event("never triggered", "ok"));
    out.queue.push(event("disk /", "critical"));
    out.queue.push(event("disk /", "critical"));
    out.queue.push(event("disk /", "ok"));
    out.queue.push(event("disk /", "ok"));
    out.settled().await;

    let actions: Vec<_> = rx
        .seen()
        .iter()
        .map(|s| s.json()["event_action"].clone())
        .collect();
    assert_eq!(
        actions,
        ["trigger", "resolve"],
        "only the first trigger and resolve are sent"
    );
    // Suppressed pages need no sending: skipped, not dropped.
    assert_eq!((out.delivered(), out.dropped(), out.skipped()), (2, 0, 3));
}

/// The page actions the receiver saw, in order.
/// An output's `(accepted, delivered, dropped, skipped, in flight)`.
/// A paging webhook output `oncall` paging `rx`.
fn oncall(rx: &Receiver) -> OutputSpec {
    OutputSpec {
        name: "oncall".into(),
        kind: OutputKind::Pager(paging_webhook_config(&rx.url)),
    }
}

/// Stops an output as a reload or vigil's stop does (its queue dropped, its
/// task cancelled by `stop`, then ended): its counters then.
async fn stopped(
    queue: Arc<Queue>,
    stop: CancellationToken,
    task: JoinHandle<()>,
) -> (u64, u64, u64, u64, u64) {
    let stats = queue.stats.clone();
    drop(queue);
    stop.cancel();
    task.await.unwrap();
    settlement(&stats)
}

fn settlement(stats: &OutputStats) -> (u64, u64, u64, u64, u64) {
    let get = |c: &AtomicU64| c.load(Ordering::Acquire);
    (
        get(&stats.accepted),
        get(&stats.delivered),
        get(&stats.dropped),
        get(&stats.skipped),
        get(&stats.in_flight),
    )
}

fn actions(rx: &Receiver) -> Vec<String> {
    rx.seen()
        .iter()
        .map(|s| {
            let page = s.json();
            format!(
                "{} {}",
                page["event_action"].as_str().unwrap(),
                page["dedup_key"].as_str().unwrap()
            )
        })
        .collect()
}

/// Host `k8s/node1` with service `cpu` and host `k8s` with service
/// `node1/cpu` once shared the key `k8s/node1/cpu`: the second's `ok`
/// resolved the first's incident, and its own trigger was suppressed as a
/// repeat of it.
#[tokio::test]
async fn series_whose_host_and_service_join_alike_keep_their_own_incidents() {
    let rx = Receiver::start().await;
    let out = Running::pager(pager_config(&rx.url));
    let page = |host: &str, service: &str, state: &str| Event {
        host: Some(host.into()),
        ..event(service, state)
    };
    out.queue.push(page("k8s/node1", "cpu", "critical"));
    out.queue.push(page("k8s", "node1/cpu", "ok"));
    out.queue.push(page("k8s", "node1/cpu", "critical"));
    // Both critical: the second is no repeat of the first.
    out.queue.push(page("db/1", "df/root", "critical"));
    out.queue.push(page("db", "1/df/root", "critical"));
    out.settled().await;

    assert_eq!(
        actions(&rx),
        [
            "trigger k8s%2Fnode1/cpu",
            "trigger k8s/node1/cpu",
            "trigger db%2F1/df/root",
            "trigger db/1/df/root"
        ]
    );
    // The `ok` resolves no incident of its series: nothing to send.
    assert_eq!((out.delivered(), out.dropped(), out.skipped()), (4, 0, 1));
}

#[tokio::test]
async fn an_incident_open_before_a_restart_is_resolved_after_it() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = incidents::file_in(dir.path(), "pager");
    let config = pager_config(&rx.url);
    let mut before =
        Running::pager_remembering(memory(&config, Some(file.clone())), config.clone());
    before.queue.push(event("disk /", "critical"));
    before.queue.push(event("cpu", "critical"));
    before.queue.push(event("cpu", "ok"));
    before.settled().await;
    before.stop().await;

    // A new process: only the file is left.
    let after = Running::pager_remembering(memory(&config, Some(file)), config);
    after.queue.push(event("disk /", "critical")); // still open: not re-sent
    after.queue.push(event("cpu", "ok")); // resolved before the restart
    after.queue.push(event("disk /", "ok"));
    after.settled().await;
    assert_eq!(
        actions(&rx),
        [
            "trigger web1/disk /",
            "trigger web1/cpu",
            "resolve web1/cpu",
            "resolve web1/disk /"
        ]
    );
    assert_eq!(
        (after.delivered(), after.dropped(), after.skipped()),
        (1, 0, 2)
    );
}

/// The series failing in an incident they share are saved with it: after a
/// restart the first one's `ok` still leaves it open for the other, which
/// joined it with a suppressed trigger.
#[tokio::test]
async fn an_incident_series_share_stays_open_across_a_restart_until_the_last_clears() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = incidents::file_in(dir.path(), "pager");
    let config = per_host(&rx.url);
    let mut before =
        Running::pager_remembering(memory(&config, Some(file.clone())), config.clone());
    before.queue.push(event("cpu", "critical"));
    before.queue.push(event("disk /", "critical"));
    before.settled().await;
    before.stop().await;

    let after = Running::pager_remembering(memory(&config, Some(file)), config);
    after.queue.push(event("cpu", "ok"));
    after.settled().await;
    assert_eq!(actions(&rx), ["trigger web1"], "disk is still critical");
    after.queue.push(event("disk /", "ok"));
    after.settled().await;
    assert_eq!(actions(&rx), ["trigger web1", "resolve web1"]);
}

/// A restart with another `dedup_key` template once left the incidents
/// opened under the previous one open for good, as a reload did.
#[tokio::test]
async fn an_incident_opened_under_a_dedup_key_changed_across_a_restart_is_resolved() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = incidents::file_in(dir.path(), "pager");
    let custom = pager::Config {
        dedup_key: Some(Template::parse("{host}:{service}").unwrap()),
        ..pager_config(&rx.url)
    };
    let mut before = Running::pager_remembering(memory(&custom, Some(file.clone())), custom);
    before.queue.push(event("disk /", "critical"));
    before.settled().await;
    before.stop().await;

    // A new process, its rule file edited back to the derived key.
    let config = pager_config(&rx.url);
    let after = Running::pager_remembering(memory(&config, Some(file)), config);
    after.queue.push(event("disk /", "ok"));
    after.settled().await;
    assert_eq!(actions(&rx), ["trigger web1:disk /", "resolve web1:disk /"]);
}

/// A pager that stops while its receiver is failing keeps its pages for the
/// next run, which sends them first.
#[tokio::test]
async fn pages_undelivered_at_shutdown_are_sent_first_by_the_next_run() {
    let rx = Receiver::start().await;
    rx.reply_always(Reply(503, vec![], "down"));
    let dir = tempfile::tempdir().unwrap();
    let file = incidents::file_in(dir.path(), "pager");
    let config = pager_config(&rx.url);
    let mut before =
        Running::pager_remembering(memory(&config, Some(file.clone())), config.clone());
    before.queue.push(event("disk /", "critical"));
    before.queue.push(event("cpu", "critical"));
    rx.wait_for(2).await;
    before.stop().await;
    before.assert_accounted();
    assert_eq!(
        (before.delivered(), before.dropped(), before.in_flight()),
        (0, 0, 2),
        "left to the next run, which the process counts dropped as it ends"
    );
    let saved: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(saved["unsent"].as_array().map(Vec::len), Some(2), "{saved}");

    rx.reply_always(accepted());
    let tried = rx.seen().len();
    let after = Running::pager_remembering(memory(&config, Some(file.clone())), config.clone());
    rx.wait_for(tried + 2).await;
    after.settled().await;
    assert_eq!(
        actions(&rx)[tried..],
        ["trigger web1/disk /", "trigger web1/cpu"],
        "in the order they were made"
    );
    assert_eq!((after.delivered(), after.dropped()), (2, 0));
    // Settled pages leave the file with the next save, soon after.
    let saved = saved_when(&file, |saved| saved["unsent"] == json!([])).await;
    assert_eq!(saved["incidents"].as_array().map(Vec::len), Some(2));
}

/// `file`'s content once `done` holds for it, waiting for the saves.
async fn saved_when(file: &std::path::Path, done: impl Fn(&Value) -> bool) -> Value {
    let saved = RefCell::new(None);
    let read_and_check = || {
        let read = std::fs::read(file)
            .ok()
            .map(|bytes| serde_json::from_slice::<Value>(&bytes).unwrap());
        let holds = read.as_ref().is_some_and(&done);
        *saved.borrow_mut() = read;
        holds
    };
    eventually(read_and_check, || {
        format!("not saved so: {:?}", saved.borrow())
    })
    .await;
    saved.into_inner().expect("read")
}

/// Polls `done` until it holds; after [`WAIT`], fails saying `what`.
async fn eventually(mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{}", what());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Makes every save of `file` fail, as a full disk would: its temporary
/// file's path is taken by a directory, the path returned. Removing it lets
/// saves succeed again.
fn block_saves(file: &std::path::Path) -> PathBuf {
    let mut temp = file.to_owned().into_os_string();
    temp.push(".tmp");
    let blocker = PathBuf::from(temp);
    std::fs::create_dir_all(blocker.join("taken")).unwrap();
    blocker
}

/// A pager output whose file cannot be written (see [`block_saves`]) once
/// it has paged one critical event.
struct Unsaved {
    _dir: tempfile::TempDir,
    file: PathBuf,
    blocker: PathBuf,
    memory: Arc<Memory>,
    out: Running,
}

async fn paged_unsaved(rx: &Receiver) -> Unsaved {
    let dir = tempfile::tempdir().unwrap();
    let file = incidents::file_in(dir.path(), "pager");
    let blocker = block_saves(&file);
    let config = pager_config(&rx.url);
    let memory = memory(&config, Some(file.clone()));
    let out = Running::pager_remembering(memory.clone(), config);
    out.queue.push(event("disk /", "critical"));
    rx.wait_for(1).await;
    out.settled().await;
    Unsaved {
        _dir: dir,
        file,
        blocker,
        memory,
        out,
    }
}

/// A save that fails (a full disk) is tried again while nothing else
/// happens: once it can be written, the file holds the incident a restart
/// must resolve. On a paused clock: the retry's second passes at once.
#[tokio::test(start_paused = true)]
async fn a_failed_save_is_tried_again_until_the_file_holds_the_incident() {
    let rx = Receiver::start().await;
    let Unsaved {
        _dir,
        file,
        blocker,
        out: _out,
        memory: saving,
    } = paged_unsaved(&rx).await;
    eventually(|| saving.save_failed(), || "the first save fails".into()).await;
    assert!(!file.exists());
    std::fs::remove_dir_all(&blocker).unwrap();
    let saved = saved_when(&file, |_| true).await;
    assert_eq!(saved["incidents"][0]["dedup_key"], "web1/disk /", "{saved}");
}

/// Stopped before a failed save was tried again (a full disk freed just
/// before a clean shutdown), the output saves once more as it stops.
#[tokio::test]
async fn a_failed_save_is_tried_once_more_as_the_output_stops() {
    let rx = Receiver::start().await;
    let Unsaved {
        _dir,
        file,
        blocker,
        memory,
        mut out,
    } = paged_unsaved(&rx).await;
    eventually(|| memory.save_failed(), || "no save failed".into()).await;
    assert_eq!(memory.pages_written_down(), 0, "the file holds none of it");
    std::fs::remove_dir_all(&blocker).unwrap();
    out.stop().await;
    let saved: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(saved["incidents"][0]["dedup_key"], "web1/disk /", "{saved}");
}

/// Stopped (a reload removed it) while its file still cannot be written, a
/// pager's file is still tried until it can be: else a crash later would
/// leave the incident out of it.
#[tokio::test]
async fn a_stopped_pagers_failing_save_is_tried_until_it_succeeds() {
    let rx = Receiver::start().await;
    let Unsaved {
        _dir,
        file,
        blocker,
        memory,
        mut out,
    } = paged_unsaved(&rx).await;
    out.stop().await;
    assert!(memory.save_failed());
    std::fs::remove_dir_all(&blocker).unwrap();
    eventually(
        || !memory.save_failed(),
        || "never saved after the output stopped".into(),
    )
    .await;
    let saved: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(saved["incidents"][0]["dedup_key"], "web1/disk /", "{saved}");
}

/// The pages a pager's file holds as not yet delivered, as `"service"/"state"`
/// (none before the file is first written).
fn saved_pages(file: &std::path::Path) -> Vec<String> {
    let Ok(bytes) = std::fs::read(file) else {
        return Vec::new();
    };
    let saved: Value = serde_json::from_slice(&bytes).unwrap();
    let pages = saved["unsent"].as_array().cloned().unwrap_or_default();
    // Saved events are tuples: host, service, state, …
    pages.iter().map(|p| format!("{}/{}", p[1], p[2])).collect()
}

/// The receiver takes the first page and never answers; the pages made
/// meanwhile wait behind it. Stopped as a crash (or the end of shutdown's
/// grace) stops it, the output loses none of them: they were saved while the
/// first was in flight, and the next run sends them all, in order.
#[tokio::test]
async fn pages_queued_behind_a_page_in_flight_survive_a_crash() {
    let rx = Receiver::start().await;
    rx.hang();
    let dir = tempfile::tempdir().unwrap();
    let file = incidents::file_in(dir.path(), "pager");
    let config = pager_config(&rx.url);
    let mut before =
        Running::pager_remembering(memory(&config, Some(file.clone())), config.clone());
    before.queue.push(event("a", "critical"));
    rx.wait_for(1).await;
    before.queue.push(event("b", "critical"));
    before.queue.push(event("c", "ok"));
    before.queue.push(event("a", "ok"));
    eventually(
        || saved_pages(&file).len() >= 4,
        || format!("saved: {:?}", saved_pages(&file)),
    )
    .await;
    before.shutdown.cancel();
    before.task.abort();
    let _ = (&mut before.task).await;
    assert_eq!(
        saved_pages(&file),
        [
            r#""a"/"critical""#,
            r#""b"/"critical""#,
            r#""c"/"ok""#,
            r#""a"/"ok""#
        ]
    );

    let rx = Receiver::start().await;
    let config = pager_config(&rx.url);
    let after = Running::pager_remembering(memory(&config, Some(file.clone())), config);
    rx.wait_for(3).await;
    after.settled().await;
    assert_eq!(
        actions(&rx),
        ["trigger web1/a", "trigger web1/b", "resolve web1/a"],
        "c's ok resolves nothing vigil triggered"
    );
}

/// A receiver that takes each page, slowly (40 ms, as a distant one may):
/// pages taken from the queue while earlier ones are sent are saved within
/// `SAVE_WITHIN` (100 ms) of being taken, not once they are the oldest, and
/// a crash loses none of them. On a paused clock: the receiver's delay and
/// the save window are both on tokio's, so which comes first does not
/// depend on how busy the machine is (saves run on blocking threads, which
/// hold the clock while they write).
#[tokio::test(start_paused = true)]
async fn pages_taken_behind_quick_pages_are_saved_without_waiting_for_their_turn() {
    let rx = Receiver::start().await;
    rx.slow(Duration::from_millis(40));
    let dir = tempfile::tempdir().unwrap();
    let file = incidents::file_in(dir.path(), "pager");
    let config = pager_config(&rx.url);
    let mut before =
        Running::pager_remembering(memory(&config, Some(file.clone())), config.clone());
    let first: Vec<String> = (0..50).map(|i| format!("s{i}")).collect();
    let behind: Vec<String> = (0..50).map(|i| format!("t{i}")).collect();
    for service in &first {
        before.queue.push(event(service, "critical"));
    }
    rx.wait_for(1).await;
    for service in &behind {
        before.queue.push(event(service, "critical"));
    }
    // The 50 pages ahead take 2 s: `t49` is the oldest page only then.
    while !saved_pages(&file).contains(&r#""t49"/"critical""#.to_owned()) {
        let sent = rx.seen().len();
        assert!(sent < first.len(), "t49 unsaved after {sent} pages");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Delivered pages leave the file as soon, though nothing more is taken
    // from the queue: not once the last page is sent.
    let delivered = rx.seen().len() + 2;
    let later = format!(r#""s{delivered}"/"critical""#);
    rx.wait_for(delivered + 2).await;
    while saved_pages(&file).contains(&later) {
        let sent = rx.seen().len();
        assert!(sent < first.len(), "{later} still saved after {sent} pages");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    before.shutdown.cancel();
    before.task.abort();
    let _ = (&mut before.task).await;

    let again = Receiver::start().await;
    let config = pager_config(&again.url);
    let after = Running::pager_remembering(memory(&config, Some(file.clone())), config);
    again
        .wait_for(first.len() + behind.len() - rx.seen().len())
        .await;
    after.settled().await;
    let mut paged: Vec<String> = actions(&rx).into_iter().chain(actions(&again)).collect();
    paged.sort();
    let sent = paged.len();
    paged.dedup();
    // Those settled since the last save, and the one in flight at the crash.
    assert!(
        sent - paged.len() <= 4,
        "{} pages sent twice",
        sent - paged.len()
    );
    let mut expected: Vec<String> = (first.iter().chain(&behind))
        .map(|s| format!("trigger web1/{s}"))
        .collect();
    expected.sort();
    assert_eq!(paged, expected, "every page, in one run or the other");
}

/// A reload redeclares a pager (same receiver) while the old declaration
/// still sends a burst, slowly: the pages the new one takes meanwhile are
/// written down at once, though it sends them only after the old one's. On
/// a paused clock, as the test above.
#[tokio::test(start_paused = true)]
async fn a_redeclared_pager_writes_its_pages_down_while_the_old_one_sends() {
    let rx = Receiver::start().await;
    rx.slow(Duration::from_millis(40));
    let dir = tempfile::tempdir().unwrap();
    let file = incidents::file_in(dir.path(), "pager");
    let config = pager_config(&rx.url);
    let memory = memory(&config, Some(file.clone()));
    let mut old = Running::pager_remembering(memory.clone(), config.clone());
    for i in 0..30 {
        old.queue.push(event(&format!("old{i}"), "critical"));
    }
    rx.wait_for(1).await;
    let new = Running::pager_remembering(memory, config);
    for i in 0..20 {
        new.queue.push(event(&format!("new{i}"), "critical"));
    }
    while !saved_pages(&file).contains(&r#""new19"/"critical""#.to_owned()) {
        let sent = rx.seen().len();
        assert!(sent < 30, "new19 unsaved after {sent} pages");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    old.stop().await;
    rx.wait_for(50).await;
    new.settled().await;
    let expected: Vec<String> = (0..30)
        .map(|i| format!("trigger web1/old{i}"))
        .chain((0..20).map(|i| format!("trigger web1/new{i}")))
        .collect();
    assert_eq!(
        actions(&rx),
        expected,
        "each once, the old declaration's first"
    );
    old.assert_accounted();
    assert_eq!((old.delivered(), old.dropped()), (30, 0));
    assert_eq!((new.delivered(), new.dropped()), (20, 0));
}

/// A reload that redeclares a pager while its receiver is failing: the
/// stopping task leaves its pages to the new one, which sends them before
/// its own.
#[tokio::test]
async fn a_reload_hands_the_pages_not_yet_delivered_to_the_new_declaration() {
    let rx = Receiver::start().await;
    rx.reply_always(Reply(503, vec![], "down"));
    let spec = |resend_interval| OutputSpec {
        name: "pager".into(),
        kind: OutputKind::Pager(pager::Config {
            resend_interval,
            ..pager_config(&rx.url)
        }),
    };
    let kept = Kept::default();
    let (first_stop, second_stop) = (CancellationToken::new(), CancellationToken::new());
    let (first, first_task) =
        outputs::start(&spec(Duration::from_secs(3600)), &kept, first_stop.clone());
    first.push(event("disk /", "critical"));
    first.push(event("cpu", "critical"));
    rx.wait_for(1).await;
    let (second, _task) =
        outputs::start(&spec(Duration::from_secs(60)), &kept, second_stop.clone());
    second.push(event("disk /", "ok"));
    first_stop.cancel();
    first_task.await.unwrap();
    let stats = |q: &Queue| {
        let get = |c: &AtomicU64| c.load(Ordering::Acquire);
        (
            get(&q.stats.accepted),
            get(&q.stats.delivered),
            get(&q.stats.dropped),
        )
    };
    let pending = second.queued() + second.stats.in_flight.load(Ordering::Acquire);
    assert_eq!(
        (stats(&first), pending),
        ((3, 0, 0), 3),
        "the first's pages left for the second, in the counters they share: none settled"
    );

    rx.reply_always(accepted());
    let tried = rx.seen().len();
    rx.wait_for(tried + 3).await;
    assert_eq!(
        actions(&rx)[tried..],
        [
            "trigger web1/disk /",
            "trigger web1/cpu",
            "resolve web1/disk /"
        ],
        "the first's pages, then the second's"
    );
    // Counted once the receiver's answer is read, after it saw the request.
    eventually(
        || stats(&second) == (3, 3, 0),
        || format!("accepted, delivered, dropped: {:?}", stats(&second)),
    )
    .await;
    second_stop.cancel();
}

/// The new declaration pages only once the stopping task is done: pages
/// that task still delivers are not sent twice.
#[tokio::test]
async fn a_reload_sends_no_page_twice_when_the_receiver_recovers_meanwhile() {
    let rx = Receiver::start().await;
    rx.reply_next([Reply(503, vec![], "down")]);
    let spec = OutputSpec {
        name: "pager".into(),
        kind: OutputKind::Pager(pager_config(&rx.url)),
    };
    let kept = Kept::default();
    let first_stop = CancellationToken::new();
    let (first, first_task) = outputs::start(&spec, &kept, first_stop.clone());
    first.push(event("disk /", "critical"));
    rx.wait_for(1).await;
    let (second, _task) = outputs::start(&spec, &kept, CancellationToken::new());
    second.push(event("cpu", "critical"));
    first_stop.cancel();
    first_task.await.unwrap();
    // Pages go one at a time, in order: a page sent twice would reach the
    // receiver before this one.
    second.push(event("load", "critical"));
    rx.wait_for(4).await;
    assert_eq!(
        actions(&rx),
        [
            "trigger web1/disk /",
            "trigger web1/disk /",
            "trigger web1/cpu",
            "trigger web1/load"
        ],
        "the first's page (refused once), then the second's"
    );
}

/// Pages left undelivered to a routing key a reload replaced are handed to
/// the key that replaced it, and by that one, undelivered too, to the first
/// key when a reload brings it back: each goes to the receiver current when
/// the previous one stops, never parked for a receiver that may come back
/// when they are stale. The first key also resolves its incident kept aside.
#[tokio::test]
async fn pages_left_for_a_replaced_routing_key_follow_the_current_one_when_it_comes_back() {
    let rx = Receiver::start().await;
    rx.reply_always(Reply(503, vec![], "down"));
    let spec = |routing_key: &str| OutputSpec {
        name: "pager".into(),
        kind: OutputKind::Pager(pager::Config {
            api: pager::Api::PagerDuty {
                routing_key: routing_key.into(),
            },
            ..pager_config(&rx.url)
        }),
    };
    let kept = Kept::default();
    let first_stop = CancellationToken::new();
    let (first, first_task) = outputs::start(&spec("k1"), &kept, first_stop.clone());
    // One incident open (so k1's memory is kept aside), one page not sent.
    rx.reply_next([accepted()]);
    first.push(event("cpu", "critical"));
    first.push(event("disk /", "critical"));
    rx.wait_for(2).await;
    let second_stop = CancellationToken::new();
    let (second, second_task) = outputs::start(&spec("k2"), &kept, second_stop.clone());
    drop(first);
    first_stop.cancel();
    first_task.await.unwrap();
    // k2 tries the page k1 left.
    let tried = rx.seen().len();
    rx.wait_for(tried + 1).await;

    let (back, _task) = outputs::start(&spec("k1"), &kept, CancellationToken::new());
    drop(second);
    second_stop.cancel();
    second_task.await.unwrap();
    rx.reply_always(accepted());
    let tried = rx.seen().len();
    back.push(event("cpu", "ok"));
    rx.wait_for(tried + 2).await;
    eventually(
        || back.queued() + back.stats.in_flight.load(Ordering::Acquire) == 0,
        || "pages still unsettled".to_owned(),
    )
    .await;
    assert_eq!(
        actions(&rx)[tried..],
        ["trigger web1/disk /", "resolve web1/cpu"],
        "the page k2 did not take, then k1's open incident resolved"
    );
    let tries: Vec<String> = (rx.seen().iter())
        .map(|s| format!("{} {}", s.json()["routing_key"], s.json()["dedup_key"]))
        .collect();
    let by = |key: &'static str| move |t: &String| *t == format!("\"{key}\" \"web1/disk /\"");
    let k2_from = (tries.iter().position(by("k2"))).expect("k2 tried the page k1 left");
    assert!(
        k2_from > 1
            && tries[1..k2_from].iter().all(by("k1"))
            && tries[k2_from..tried].iter().all(by("k2"))
            && tries[tried..].iter().all(|t| t.starts_with("\"k1\"")),
        "{tries:#?}"
    );
    let get = |c: &AtomicU64| c.load(Ordering::Acquire);
    let stats = &back.stats;
    assert_eq!(
        (
            get(&stats.accepted),
            get(&stats.delivered),
            get(&stats.dropped),
            get(&stats.skipped)
        ),
        (3, 3, 0, 0)
    );
}

/// The on-call scenario: the paging webhook's URL is wrong (its receiver
/// answers 500 for ever) when a series turns critical; the operator fixes
/// the URL and reloads. The trigger stuck at the wrong URL is the only page
/// that incident gets (`changed_state` makes no other while it stays
/// critical): the new URL gets it, once, and then the resolve.
#[tokio::test]
async fn a_reload_that_fixes_a_failing_receiver_pages_the_new_one_for_the_ongoing_incident() {
    let (wrong, fixed) = (Receiver::start().await, Receiver::start().await);
    wrong.reply_always(Reply(500, vec![], "no such route"));
    let kept = Kept::default();
    let first_stop = CancellationToken::new();
    let (first, first_task) = outputs::start(&oncall(&wrong), &kept, first_stop.clone());
    first.push(event("disk /", "critical"));
    wrong.wait_for(2).await;
    // The reload, as the server makes it: the new declaration starts, then
    // the one it replaced is stopped.
    let stop = CancellationToken::new();
    let (second, second_task) = outputs::start(&oncall(&fixed), &kept, stop.clone());
    stopped(first, first_stop, first_task).await;
    fixed.wait_for(1).await;
    second.push(event("disk /", "ok"));
    fixed.wait_for(2).await;
    assert_eq!(
        webhook_actions(&fixed),
        ["trigger critical", "resolve -"],
        "one trigger for the ongoing incident, then its resolve"
    );
    let keys: Vec<_> = (fixed.seen().iter())
        .map(|s| s.json()["dedup_key"].clone())
        .collect();
    assert_eq!(keys, ["web1/disk /", "web1/disk /"]);
    assert!(
        (wrong.seen().iter()).all(|s| s.json()["action"] == "trigger"),
        "the wrong URL only ever got the trigger, refused"
    );
    assert_eq!(
        stopped(second, stop, second_task).await,
        (2, 2, 0, 0, 0),
        "each page counted once, in the counters the declarations share"
    );
}

/// A reload removed a pager while its receiver failed; a later one declares
/// it again with another receiver: that one is paged for the ongoing
/// incident, as when one reload changes the receiver.
#[tokio::test]
async fn a_pager_removed_while_failing_and_declared_again_with_another_receiver_pages_it() {
    let (wrong, fixed) = (Receiver::start().await, Receiver::start().await);
    wrong.reply_always(Reply(500, vec![], "no such route"));
    let kept = Kept::default();
    let first_stop = CancellationToken::new();
    let (first, first_task) = outputs::start(&oncall(&wrong), &kept, first_stop.clone());
    first.push(event("disk /", "critical"));
    first.push(event("cpu", "critical"));
    first.push(event("cpu", "ok"));
    wrong.wait_for(2).await;
    stopped(first, first_stop, first_task).await;

    let stop = CancellationToken::new();
    let (second, second_task) = outputs::start(&oncall(&fixed), &kept, stop.clone());
    fixed.wait_for(1).await;
    second.push(event("disk /", "ok"));
    fixed.wait_for(2).await;
    assert_eq!(
        webhook_actions(&fixed),
        ["trigger critical", "resolve -"],
        "one trigger for the ongoing incident, then its resolve; cpu is over"
    );
    assert_eq!(
        stopped(second, stop, second_task).await,
        (4, 2, 0, 2, 0),
        "each page counted once: cpu's trigger superseded by its ok, which resolves nothing here"
    );
}

/// The receiver is changed to a wrong one, which fails a page; a reload
/// removes the pager, and a later one declares it again with the first
/// receiver, which still has an incident open (so its memory came back):
/// it is paged for the ongoing incident the wrong one did not take.
#[tokio::test]
async fn a_pager_removed_while_failing_and_declared_again_with_its_previous_receiver_pages_it() {
    let (good, wrong) = (Receiver::start().await, Receiver::start().await);
    wrong.reply_always(Reply(500, vec![], "no such route"));
    let kept = Kept::default();
    let first_stop = CancellationToken::new();
    let (first, first_task) = outputs::start(&oncall(&good), &kept, first_stop.clone());
    first.push(event("cpu", "critical"));
    good.wait_for(1).await;
    let second_stop = CancellationToken::new();
    let (second, second_task) = outputs::start(&oncall(&wrong), &kept, second_stop.clone());
    stopped(first, first_stop, first_task).await;
    second.push(event("disk /", "critical"));
    wrong.wait_for(2).await;
    // Removed while failing.
    stopped(second, second_stop, second_task).await;

    let stop = CancellationToken::new();
    let (back, task) = outputs::start(&oncall(&good), &kept, stop.clone());
    good.wait_for(2).await;
    back.push(event("disk /", "ok"));
    back.push(event("cpu", "ok"));
    good.wait_for(4).await;
    let pages: Vec<_> = (good.seen().iter())
        .map(|s| format!("{} {}", s.json()["action"], s.json()["dedup_key"]))
        .collect();
    assert_eq!(
        pages,
        [
            r#""trigger" "web1/cpu""#,
            r#""trigger" "web1/disk /""#,
            r#""resolve" "web1/disk /""#,
            r#""resolve" "web1/cpu""#,
        ],
        "the page the wrong receiver did not take, then both resolves"
    );
    assert_eq!(
        stopped(back, stop, task).await,
        (4, 4, 0, 0, 0),
        "each page counted once"
    );
}

/// vigil's stop ran out of its grace while a receiver a reload replaced
/// still held pages (it answers nothing) and the new one waited for its
/// turn: the last save keeps them, for the new receiver's next run.
#[tokio::test]
async fn pages_a_replaced_receiver_held_when_the_stop_cut_it_short_are_saved_for_the_new_one() {
    let rx = Receiver::start().await;
    rx.hang();
    let spec = |routing_key: &str| OutputSpec {
        name: "pager".into(),
        kind: OutputKind::Pager(pager::Config {
            api: pager::Api::PagerDuty {
                routing_key: routing_key.into(),
            },
            ..pager_config(&rx.url)
        }),
    };
    let dir = tempfile::tempdir().unwrap();
    let file = incidents::file_in(dir.path(), "pager");
    let kept = Kept::in_dir(dir.path().to_owned(), Default::default());
    let (first, first_task) = outputs::start(&spec("k1"), &kept, CancellationToken::new());
    first.push(event("cpu", "critical"));
    first.push(event("disk /", "critical"));
    rx.wait_for(1).await;
    saved_when(&file, |saved| {
        saved["unsent"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    let (_second, second_task) = outputs::start(&spec("k2"), &kept, CancellationToken::new());
    // The grace ran out: the tasks are stopped where they are.
    first_task.abort();
    second_task.abort();
    for task in [first_task, second_task] {
        assert!(task.await.unwrap_err().is_cancelled());
    }
    outputs::save_pagers(kept.pager_memories()).await;

    let next_run = Memory::open("pager", Some(file), "k2", 10);
    next_run.load().await;
    assert_eq!(next_run.pages_held(), 2, "both pages, for k2");
}

/// What the previous receiver did not take, the new one gets as the latest
/// page of each series, before the pages made since: a trigger for each
/// incident still ongoing (once, at its latest severity); nothing for one
/// already over (its trigger and its resolve both undelivered).
#[tokio::test]
async fn a_change_of_routing_key_hands_the_new_one_a_trigger_per_ongoing_incident_only() {
    let (old, new) = (Receiver::start().await, Receiver::start().await);
    old.reply_always(Reply(503, vec![], "down"));
    let spec = |rx: &Receiver, routing_key: &str| OutputSpec {
        name: "pager".into(),
        kind: OutputKind::Pager(pager::Config {
            api: pager::Api::PagerDuty {
                routing_key: routing_key.into(),
            },
            ..pager_config(&rx.url)
        }),
    };
    let kept = Kept::default();
    let first_stop = CancellationToken::new();
    let (first, first_task) = outputs::start(&spec(&old, "k1"), &kept, first_stop.clone());
    for (service, state) in [
        ("disk /", "critical"),
        ("cpu", "critical"),
        ("cpu", "ok"),
        ("load", "warning"),
        ("load", "critical"),
        ("load", "flapping"),
    ] {
        first.push(event(service, state));
    }
    old.wait_for(2).await;
    let stop = CancellationToken::new();
    let (second, second_task) = outputs::start(&spec(&new, "k2"), &kept, stop.clone());
    // Made by the new rules before the old declaration has stopped.
    second.push(event("mem", "critical"));
    drop(first);
    first_stop.cancel();
    first_task.await.unwrap();
    new.wait_for(3).await;
    second.push(event("disk /", "ok"));
    new.wait_for(4).await;
    assert_eq!(
        actions(&new),
        [
            "trigger web1/disk /",
            "trigger web1/load",
            "trigger web1/mem",
            "resolve web1/disk /"
        ],
        "the previous receiver's ongoing incidents first, then the new pages"
    );
    let severities: Vec<_> = (new.seen().iter())
        .map(|s| s.json()["payload"]["severity"].clone())
        .collect();
    assert_eq!(severities[..3], ["critical", "critical", "critical"]);
    let keys: Vec<_> = (new.seen().iter())
        .map(|s| s.json()["routing_key"].clone())
        .collect();
    assert_eq!(keys, ["k2"; 4]);
    assert_eq!(
        stopped(second, stop, second_task).await,
        (8, 4, 0, 4, 0),
        "cpu's trigger and resolve, load's warning and flapping: skipped"
    );
}

/// A restart whose rules page another receiver than the one the file was
/// saved for (the operator fixed it while vigil was down): the pages saved
/// undelivered go to the new receiver, the latest of each series; the
/// incidents of the previous one are left out, as before.
#[tokio::test]
async fn pages_saved_for_another_receiver_are_sent_to_the_new_one_after_a_restart() {
    let (old, new) = (Receiver::start().await, Receiver::start().await);
    old.reply_always(Reply(503, vec![], "down"));
    let dir = tempfile::tempdir().unwrap();
    let file = incidents::file_in(dir.path(), "pager");
    let config = |rx: &Receiver, routing_key: &str| pager::Config {
        api: pager::Api::PagerDuty {
            routing_key: routing_key.into(),
        },
        ..pager_config(&rx.url)
    };
    let before_config = config(&old, "k1");
    let mut before =
        Running::pager_remembering(memory(&before_config, Some(file.clone())), before_config);
    before.queue.push(event("disk /", "critical"));
    before.queue.push(event("cpu", "critical"));
    before.queue.push(event("cpu", "ok"));
    old.wait_for(1).await;
    before.stop().await;
    assert_eq!(saved_pages(&file).len(), 3);

    let after_config = config(&new, "k2");
    let after = Running::pager_remembering(memory(&after_config, Some(file)), after_config);
    new.wait_for(1).await;
    after.queue.push(event("disk /", "ok"));
    new.wait_for(2).await;
    after.settled().await;
    assert_eq!(
        actions(&new),
        ["trigger web1/disk /", "resolve web1/disk /"],
        "cpu is over: not paged"
    );
    assert_eq!(
        (after.delivered(), after.skipped(), after.dropped()),
        (2, 1, 0),
        "cpu's resolve, the latest of its pages, resolves nothing here"
    );
}

#[tokio::test]
async fn a_redeclared_pager_takes_over_the_open_incidents_of_its_routing_key() {
    let rx = Receiver::start().await;
    let spec = |routing_key: &str| OutputSpec {
        name: "pager".into(),
        kind: OutputKind::Pager(pager::Config {
            api: pager::Api::PagerDuty {
                routing_key: routing_key.into(),
            },
            ..pager_config(&rx.url)
        }),
    };
    let dir = tempfile::tempdir().unwrap();
    let kept = Kept::in_dir(dir.path().to_owned(), Default::default());
    // Whether the output's file holds `key`'s open incidents (read from a
    // copy: not from what is kept aside for other keys beside it).
    let saved_under = async |key: &str| {
        let probe = tempfile::tempdir().unwrap();
        let copy = incidents::file_in(probe.path(), "pager");
        let _ = std::fs::copy(incidents::file_in(dir.path(), "pager"), &copy);
        let memory = Memory::open("pager", Some(copy), key, 10);
        memory.load().await;
        memory.has_open()
    };
    let stop = CancellationToken::new();
    let (first, task) = outputs::start(&spec("k1"), &kept, stop.child_token());
    first.push(event("disk /", "critical"));
    first.push(event("cpu", "critical"));
    rx.wait_for(2).await;
    drop(first);
    // A reload changed something else (here the URL's spelling): same key.
    let mut changed = spec("k1");
    if let OutputKind::Pager(config) = &mut changed.kind {
        config.url = config.url.replace("127.0.0.1", "localhost");
    }
    let (second, _) = outputs::start(&changed, &kept, stop.child_token());
    second.push(event("disk /", "ok"));
    rx.wait_for(3).await;
    // As a reload does, each replaced declaration's task is ended (here by
    // its queue closing): the next one of its key pages only after it.
    drop(second);
    // Another routing key is another PagerDuty service: nothing of it is open.
    let (third, _) = outputs::start(&spec("k2"), &kept, stop.child_token());
    third.push(event("cpu", "ok"));
    third.push(event("cpu", "critical"));
    rx.wait_for(4).await;
    drop(third);
    // The first key comes back (a mistaken edit undone): its incident is
    // still open, and is resolved through it; then the second key's.
    assert!(!saved_under("k1").await, "the file is the second key's");
    assert_eq!(
        kept_aside_keys(dir.path()),
        ["web1/cpu"],
        "the first key's open incident, kept aside"
    );
    let (fourth, _) = outputs::start(&spec("k1"), &kept, stop.child_token());
    let deadline = Instant::now() + WAIT;
    while !saved_under("k1").await {
        assert!(
            Instant::now() < deadline,
            "the first key's incident saved again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    fourth.push(event("cpu", "ok"));
    rx.wait_for(5).await;
    drop(fourth);
    let (fifth, _) = outputs::start(&spec("k2"), &kept, stop.child_token());
    fifth.push(event("cpu", "ok"));
    rx.wait_for(6).await;
    assert_eq!(
        actions(&rx),
        [
            "trigger web1/disk /",
            "trigger web1/cpu",
            "resolve web1/disk /",
            "trigger web1/cpu",
            "resolve web1/cpu",
            "resolve web1/cpu"
        ]
    );
    let keys: Vec<_> = rx
        .seen()
        .iter()
        .map(|s| s.json()["routing_key"].clone())
        .collect();
    assert_eq!(keys, ["k1", "k1", "k1", "k2", "k1", "k2"]);
    stop.cancel();
    task.await.unwrap();
}

/// The dedup keys of the open incidents in the pager files kept aside in
/// `dir` for receivers their output no longer pages.
fn kept_aside_keys(dir: &std::path::Path) -> Vec<String> {
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let name = entry.file_name().into_string().unwrap();
        if is_kept_aside(&name) {
            let saved: Value =
                serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
            let incidents = saved["incidents"].as_array().cloned().unwrap_or_default();
            keys.extend(
                incidents
                    .iter()
                    .map(|i| i["dedup_key"].as_str().unwrap().to_owned()),
            );
        }
    }
    keys
}

/// Whether `name` is a pager file kept aside,
/// `pagerduty-<output>.<receiver hash>.json`: not the output's own file
/// being written (`pagerduty-<output>.json.tmp`, which a save in flight
/// holds, the current receiver's incidents in it).
fn is_kept_aside(name: &str) -> bool {
    let stem = name
        .strip_prefix("pagerduty-")
        .and_then(|n| n.strip_suffix(".json"));
    stem.and_then(|stem| stem.rsplit_once('.'))
        .is_some_and(|(_, hash)| hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A reload changed the routing key with an incident open under the first
/// one; vigil restarted with the first key back (the change was a
/// mistake): the incident is still open there, and its `ok` resolves it.
#[tokio::test]
async fn an_incident_left_open_under_a_replaced_receiver_is_resolved_after_a_restart_brings_it_back()
 {
    let rx = Receiver::start().await;
    let spec = |routing_key: &str| OutputSpec {
        name: "pager".into(),
        kind: OutputKind::Pager(pager::Config {
            api: pager::Api::PagerDuty {
                routing_key: routing_key.into(),
            },
            ..pager_config(&rx.url)
        }),
    };
    let dir = tempfile::tempdir().unwrap();
    let run = || Kept::in_dir(dir.path().to_owned(), Default::default());
    let stop = CancellationToken::new();
    let kept = run();
    let (first, task) = outputs::start(&spec("k1"), &kept, stop.child_token());
    first.push(event("cpu", "critical"));
    rx.wait_for(1).await;
    let (second, second_task) = outputs::start(&spec("k2"), &kept, stop.child_token());
    drop(first);
    task.await.unwrap();
    second.push(event("disk /", "critical"));
    rx.wait_for(2).await;
    drop(second);
    second_task.await.unwrap();
    assert_eq!(kept_aside_keys(dir.path()), ["web1/cpu"]);

    // The next run pages the first key again, then the second once more.
    let kept = run();
    let (third, task) = outputs::start(&spec("k1"), &kept, stop.child_token());
    third.push(event("cpu", "ok"));
    rx.wait_for(3).await;
    drop(third);
    task.await.unwrap();
    assert_eq!(
        kept_aside_keys(dir.path()),
        ["web1/disk /"],
        "the second key's, aside"
    );
    let kept = run();
    let (fourth, task) = outputs::start(&spec("k2"), &kept, stop.child_token());
    fourth.push(event("disk /", "ok"));
    rx.wait_for(4).await;
    drop(fourth);
    task.await.unwrap();
    assert_eq!(
        actions(&rx),
        [
            "trigger web1/cpu",
            "trigger web1/disk /",
            "resolve web1/cpu",
            "resolve web1/disk /"
        ]
    );
    let keys: Vec<_> = (rx.seen().iter())
        .map(|s| s.json()["routing_key"].clone())
        .collect();
    assert_eq!(keys, ["k1", "k2", "k1", "k2"]);
    assert!(kept_aside_keys(dir.path()).is_empty(), "nothing left aside");
}

/// What `pager` sends when it triggers `service`'s critical under the
/// `dedup_key` template `from`, then a reload changes the template to `to`
/// (`None`: the derived key) and the new declaration is given `then`
/// (service, state), until the receiver has `pages` pages.
async fn across_a_dedup_key_change(
    from: Option<&str>,
    service: &str,
    to: Option<&str>,
    then: &[(&str, &str)],
    pages: usize,
) -> Vec<String> {
    let rx = Receiver::start().await;
    let spec = |dedup_key: Option<&str>| OutputSpec {
        name: "pager".into(),
        kind: OutputKind::Pager(pager::Config {
            dedup_key: dedup_key.map(|t| Template::parse(t).unwrap()),
            ..pager_config(&rx.url)
        }),
    };
    let kept = Kept::default();
    let stop = CancellationToken::new();
    let (first, task) = outputs::start(&spec(from), &kept, stop.child_token());
    first.push(event(service, "critical"));
    rx.wait_for(1).await;
    drop(first);
    let (second, _) = outputs::start(&spec(to), &kept, stop.child_token());
    for (service, state) in then {
        second.push(event(service, state));
    }
    rx.wait_for(pages).await;
    stop.cancel();
    task.await.unwrap();
    actions(&rx)
}

/// A reload that changes the `dedup_key` template (here back to the derived
/// key) once left every incident opened under the old one open for good:
/// the `ok` made the new key, under which nothing was open, and was skipped.
#[tokio::test]
async fn a_reload_that_changes_the_dedup_key_still_resolves_what_was_opened_before() {
    // Then `cpu` is opened under the new key, and resolved under it.
    let then = [("disk /", "ok"), ("cpu", "critical"), ("cpu", "ok")];
    let sent = across_a_dedup_key_change(Some("{host}:{service}"), "disk /", None, &then, 4).await;
    assert_eq!(
        sent,
        [
            "trigger web1:disk /",
            "resolve web1:disk /",
            "trigger web1/cpu",
            "resolve web1/cpu"
        ]
    );
}

/// A reload that makes the `dedup_key` finer (`{host}` to the derived
/// `host/service`): another series of the host, which the old template
/// would have merged into the open incident, is a new incident under the
/// new key, paged; the old one is resolved by its own series' `ok` only.
#[tokio::test]
async fn a_finer_dedup_key_pages_a_new_series_the_old_key_merged() {
    let then = [("disk /", "critical"), ("disk /", "ok"), ("cpu", "ok")];
    let sent = across_a_dedup_key_change(Some("{host}"), "cpu", None, &then, 4).await;
    assert_eq!(
        sent,
        [
            "trigger web1",
            "trigger web1/disk /",
            "resolve web1/disk /",
            "resolve web1"
        ]
    );
}

#[tokio::test]
async fn a_change_of_severity_is_sent_within_the_resend_interval() {
    let rx = Receiver::start().await;
    let out = Running::pager(pager_config(&rx.url));
    for state in ["warning", "critical", "critical"] {
        out.queue.push(event("disk /", state));
    }
    out.settled().await;
    let severities: Vec<_> = rx
        .seen()
        .iter()
        .map(|s| s.json()["payload"]["severity"].clone())
        .collect();
    assert_eq!(
        severities,
        ["warning", "critical"],
        "an escalation is news; a repeat is not"
    );
}

#[tokio::test]
async fn a_trigger_is_re_sent_after_the_resend_interval() {
    let rx = Receiver::start().await;
    let mut config = pager_config(&rx.url);
    config.resend_interval = Duration::from_secs(60);
    let clock = Arc::new(ManualClock::new(0));
    let memory = Memory::open("pager", None, config.receiver(), pager::MAX_OPEN);
    let memory = Arc::new(memory.on_clock(clock.clone()));
    let out = Running::pager_remembering(memory, config);
    out.queue.push(event("disk /", "critical"));
    out.settled().await;
    clock.advance(59 * MICROS_PER_SEC);
    out.queue.push(event("disk /", "critical"));
    out.settled().await;
    assert_eq!(
        (out.delivered(), out.skipped()),
        (1, 1),
        "within the interval"
    );
    clock.advance(MICROS_PER_SEC);
    out.queue.push(event("disk /", "critical"));
    out.settled().await;
    assert_eq!((out.delivered(), out.skipped()), (2, 1), "after it");
    assert_eq!(actions(&rx), ["trigger web1/disk /", "trigger web1/disk /"]);
}

#[tokio::test]
async fn states_that_are_not_paged_are_skipped() {
    let rx = Receiver::start().await;
    let out = Running::pager(pager_config(&rx.url));
    out.queue.push(event("disk /", "flapping"));
    out.queue.push(Event::default());
    out.settled().await;
    assert!(rx.seen().is_empty());
    assert_eq!((out.delivered(), out.dropped(), out.skipped()), (0, 0, 2));
}

#[tokio::test]
async fn shutdown_delivers_what_is_already_queued_then_ends() {
    let rx = Receiver::start().await;
    let (queue, delivery) = outputs::queue("pager", 100);
    for service in ["a", "b", "c"] {
        queue.push(event(service, "critical"));
    }
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let config = pager_config(&rx.url);
    let run = pager::run(
        memory(&config, None),
        Arc::default(),
        config,
        delivery,
        fast(None),
        shutdown,
    );
    // The queue stays open (streams still hold it): the run must not wait for more.
    tokio::time::timeout(WAIT, run)
        .await
        .expect("ends once the queue is drained");
    assert_eq!(rx.seen().len(), 3);
    assert_eq!(queue.stats.delivered.load(Ordering::Acquire), 3);
}

#[tokio::test]
async fn shutdown_with_the_downstream_failing_leaves_the_pages_after_one_last_attempt() {
    let rx = Receiver::start().await;
    rx.reply_always(Reply(503, vec![], "unavailable"));
    let mut out = Running::pager(pager_config(&rx.url));
    for service in ["a", "b", "c"] {
        out.queue.push(event(service, "critical"));
    }
    rx.wait_for(2).await; // retrying the first page, as a pager must
    out.stop().await;
    assert_eq!(
        (out.in_flight(), out.dropped(), out.delivered()),
        (3, 0, 0),
        "the failing page and the two queued behind it, left to the next run"
    );
    out.assert_accounted();
    let pages: Vec<_> = rx
        .seen()
        .iter()
        .map(|s| s.json()["dedup_key"].clone())
        .collect();
    assert!(
        pages.iter().all(|k| k == "web1/a"),
        "no attempts for the rest: {pages:?}"
    );
}

// ---------------------------------------------------------------------------
// Webhook
// ---------------------------------------------------------------------------

fn webhook_config(url: &str, body: Option<&str>) -> webhook::Config {
    webhook::Config {
        url: url.into(),
        headers: BTreeMap::from([
            ("X-Token".to_owned(), "s3cret".to_owned()),
            ("X-Source".to_owned(), "vigil".to_owned()),
        ]),
        body: body.map(|b| Template::parse(b).unwrap()),
    }
}

#[tokio::test]
async fn webhook_posts_riemann_json_with_the_configured_headers() {
    let rx = Receiver::start().await;
    let out = Running::webhook(webhook_config(&rx.url, None), 3);
    out.queue.push(event("disk /", "critical"));
    let seen = rx.wait_for(1).await;

    assert_eq!(
        seen[0].json(),
        json!({
            "host": "web1", "service": "disk /", "state": "critical",
            "description": "root is full", "metric": 0.97, "tags": ["prod"],
            "time": "2023-11-14T22:13:20.123Z", "ttl": 60.0, "team": "ops"
        })
    );
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(seen[0].header("content-type"), "application/json");
    assert_eq!(seen[0].header("x-token"), "s3cret");
    assert_eq!(seen[0].header("x-source"), "vigil");
    out.settled().await;
    assert_eq!(out.delivered(), 1);
}

#[tokio::test]
async fn webhook_body_template_is_rendered_as_text() {
    let rx = Receiver::start().await;
    let config = webhook_config(
        &rx.url,
        Some("{host} {service} is {state} ({metric}) for {team}"),
    );
    let out = Running::webhook(config, 3);
    out.queue.push(event("disk /", "warning"));
    let seen = rx.wait_for(1).await;
    assert_eq!(seen[0].body, "web1 disk / is warning (0.97) for ops");
    assert_eq!(seen[0].header("content-type"), "text/plain; charset=utf-8");
    assert_eq!(seen[0].header("x-token"), "s3cret");
    out.settled().await;
}

#[tokio::test]
async fn a_configured_content_type_wins() {
    let rx = Receiver::start().await;
    let mut config = webhook_config(&rx.url, Some(r#"{{"text": "{host} is {state}"}}"#));
    config
        .headers
        .insert("Content-Type".into(), "application/json".into());
    let out = Running::webhook(config, 3);
    out.queue.push(event("disk /", "critical"));
    let seen = rx.wait_for(1).await;
    assert_eq!(seen[0].json(), json!({"text": "web1 is critical"}));
    assert_eq!(seen[0].header("content-type"), "application/json");
    out.settled().await;
}

#[tokio::test]
async fn a_webhook_with_an_invalid_header_drops_every_event() {
    let rx = Receiver::start().await;
    let mut config = webhook_config(&rx.url, None);
    config.headers.insert("X Bad".into(), "v".into());
    let out = Running::webhook(config, 3);
    out.queue.push(event("disk /", "critical"));
    out.settled().await;
    assert!(rx.seen().is_empty());
    assert_eq!((out.delivered(), out.dropped()), (0, 1));
}

#[tokio::test]
async fn webhook_gives_up_after_its_attempts() {
    let rx = Receiver::start().await;
    rx.reply_always(Reply(502, vec![], "bad gateway"));
    let out = Running::webhook(webhook_config(&rx.url, None), 3);
    out.queue.push(event("disk /", "critical"));
    out.settled().await;
    assert_eq!(rx.seen().len(), 3);
    assert_eq!((out.delivered(), out.dropped(), out.retries()), (0, 1, 2));
}

/// What a webhook output already queued when it stops, against `rx`.
async fn webhook_stopping_with(rx: &Receiver, services: &[&str]) -> Arc<Queue> {
    let (queue, delivery) = outputs::queue("push", 100);
    for service in services {
        queue.push(event(service, "critical"));
    }
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let run = webhook::run(
        webhook_config(&rx.url, None),
        delivery,
        fast(Some(3)),
        shutdown,
    );
    tokio::time::timeout(WAIT, run)
        .await
        .expect("ends once the queue is settled");
    queue
}

fn services_seen(rx: &Receiver) -> Vec<String> {
    rx.seen()
        .iter()
        .map(|s| s.json()["service"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Nothing else keeps a push: a receiver that answers gets its tries while
/// vigil stops, so one error during a deploy does not lose the backlog.
#[tokio::test]
async fn a_webhook_stopping_retries_a_receiver_that_answers_and_posts_the_rest() {
    let rx = Receiver::start().await;
    rx.reply_next([Reply(503, vec![], "unavailable")]);
    let queue = webhook_stopping_with(&rx, &["a", "b", "c", "d"]).await;
    assert_eq!(services_seen(&rx), ["a", "a", "b", "c", "d"]);
    let stats = &queue.stats;
    assert_eq!(stats.delivered.load(Ordering::Acquire), 4);
    assert_eq!(stats.dropped.load(Ordering::Acquire), 0);
}

/// Bounded all the same: once one event's tries are spent, the receiver is
/// taken for down and the rest is dropped unsent.
#[tokio::test]
async fn a_webhook_stopping_gives_up_after_one_events_tries() {
    let rx = Receiver::start().await;
    rx.reply_always(Reply(503, vec![], "unavailable"));
    let queue = webhook_stopping_with(&rx, &["a", "b", "c", "d"]).await;
    assert_eq!(
        services_seen(&rx),
        ["a", "a", "a"],
        "three tries, at `a` only"
    );
    assert_eq!(queue.stats.dropped.load(Ordering::Acquire), 4);
}

/// A reload that changes a webhook: the new declaration posts only after
/// the old one has posted its backlog, so the receiver's last word is the
/// latest event's.
#[tokio::test]
async fn a_redeclared_webhook_posts_after_its_predecessors_backlog() {
    let rx = Receiver::start().await;
    let kept = Kept::default();
    let declared = |body: Option<&str>| OutputSpec {
        name: "push".into(),
        kind: OutputKind::Webhook(webhook_config(&rx.url, body)),
    };
    let old_stop = CancellationToken::new();
    let (old, old_task) = outputs::start(&declared(None), &kept, old_stop.clone());
    let backlog: Vec<String> = (0..50).map(|i| format!("old {i}")).collect();
    for service in &backlog {
        old.push(event(service, "critical"));
    }
    let new_stop = CancellationToken::new();
    let (new, new_task) = outputs::start(
        &declared(Some("{service} {state}")),
        &kept,
        new_stop.clone(),
    );
    new.push(event("new", "ok"));
    old_stop.cancel();
    tokio::time::timeout(WAIT, old_task).await.unwrap().unwrap();
    let seen = rx.wait_for(51).await;
    let last = seen.last().map(|s| s.body.as_str());
    assert_eq!(last, Some("new ok"), "{} requests", seen.len());
    new_stop.cancel();
    tokio::time::timeout(WAIT, new_task).await.unwrap().unwrap();
}

/// An event too large for most receivers' body limits.
fn large_event(state: &str) -> Event {
    Event {
        description: Some("d".repeat(100_000)),
        tags: (0..1000).map(|i| format!("tag-{i}")).collect(),
        ..event("disk /", state)
    }
}

#[tokio::test]
async fn a_webhook_refused_as_too_large_is_sent_again_cut_short_once() {
    let rx = Receiver::start().await;
    let too_large = || Reply(413, vec![], "request entity too large");
    rx.reply_next([too_large()]);
    let out = Running::webhook(webhook_config(&rx.url, None), 3);
    out.queue.push(large_event("critical"));
    let seen = rx.wait_for(2).await;
    out.settled().await;
    let (whole, cut) = (seen[0].json(), seen[1].json());
    assert_eq!(whole["description"].as_str().unwrap().len(), 100_000);
    assert!(whole.get("truncated").is_none());
    assert_eq!(cut["description"], "d".repeat(4096));
    assert_eq!(
        (cut["host"].clone(), cut["team"].clone()),
        (json!("web1"), json!("ops"))
    );
    let tags = cut["tags"].as_array().unwrap().len();
    assert!(tags > 400 && tags < 1000, "{tags} tags");
    assert_eq!(
        cut["truncated"],
        format!(
            "cut short, the receiver refused it as too large: description 4096 of 100000 \
             bytes, {tags} of 1000 tags, 1 of 1 attributes"
        )
    );
    assert!(
        seen[1].body.len() < 16 * 1024,
        "{} bytes",
        seen[1].body.len()
    );
    assert_eq!((out.delivered(), out.dropped(), out.retries()), (1, 0, 0));

    // Refused again cut short: dropped, and not tried a third time.
    rx.reply_next([too_large(), too_large()]);
    out.queue.push(large_event("critical"));
    out.settled().await;
    assert_eq!((out.delivered(), out.dropped(), out.retries()), (1, 1, 0));
    // Posts go one at a time: a third try would reach the receiver before
    // the next event.
    out.queue.push(event("cpu", "critical"));
    let seen = rx.wait_for(5).await;
    out.settled().await;
    assert_eq!(seen.len(), 5);
    assert_eq!(seen[4].json()["service"], "cpu");
    assert_eq!((out.delivered(), out.dropped(), out.retries()), (2, 1, 0));
}

// ---------------------------------------------------------------------------
// Paging webhook
// ---------------------------------------------------------------------------

fn paging_webhook_config(url: &str) -> pager::Config {
    pager::Config {
        api: pager::Api::Webhook {
            headers: BTreeMap::from([("X-Token".to_owned(), "s3cret".to_owned())]),
        },
        ..pager_config(url)
    }
}

/// The webhook's page actions, in order.
fn webhook_actions(rx: &Receiver) -> Vec<String> {
    rx.seen()
        .iter()
        .map(|s| {
            let page = s.json();
            let severity = page.get("severity").and_then(Value::as_str);
            format!(
                "{} {}",
                page["action"].as_str().unwrap(),
                severity.unwrap_or("-")
            )
        })
        .collect()
}

#[tokio::test]
async fn a_paging_webhook_pages_once_per_incident_and_resolves_only_what_it_triggered() {
    let rx = Receiver::start().await;
    let out = Running::pager(paging_webhook_config(&rx.url));
    let states = [
        "ok", "critical", "critical", "warning", "flapping", "ok", "ok",
    ];
    for state in states {
        out.queue.push(event("disk /", state));
    }
    out.settled().await;

    assert_eq!(
        webhook_actions(&rx),
        ["trigger critical", "trigger warning", "resolve -"],
        "no resolve before a trigger, no repeat, a change of severity is news"
    );
    let seen = rx.seen();
    assert_eq!(
        seen[0].json(),
        json!({
            "action": "trigger",
            "dedup_key": "web1/disk /",
            "severity": "critical",
            "summary": "web1 disk / is critical (0.97)",
            "event": {
                "host": "web1", "service": "disk /", "state": "critical",
                "description": "root is full", "metric": 0.97, "tags": ["prod"],
                "time": "2023-11-14T22:13:20.123Z", "ttl": 60.0, "team": "ops"
            }
        })
    );
    let resolve = seen[2].json();
    assert_eq!(resolve["dedup_key"], "web1/disk /");
    assert_eq!(resolve["event"]["state"], "ok");
    assert_eq!(resolve["summary"], "web1 disk / is ok (0.97)");
    for page in &seen {
        assert_eq!(page.method, Method::POST);
        assert_eq!(page.header("content-type"), "application/json");
        assert_eq!(page.header("x-token"), "s3cret");
    }
    // The suppressed pages needed no sending; `flapping` is not paged.
    assert_eq!((out.delivered(), out.dropped(), out.skipped()), (3, 0, 4));
}

/// A push webhook gives up after its attempts; a page is not given up on
/// (`Running::pager` retries as `outputs::start` has every pager do: with no
/// limit).
#[tokio::test]
async fn a_paging_webhook_retries_a_page_until_it_is_taken() {
    let rx = Receiver::start().await;
    rx.reply_next((0..8).map(|_| Reply(503, vec![], "down for maintenance")));
    let out = Running::pager(paging_webhook_config(&rx.url));
    out.queue.push(event("disk /", "critical"));
    rx.wait_for(9).await;
    out.settled().await;
    assert_eq!((out.delivered(), out.dropped(), out.retries()), (1, 0, 8));
}

#[tokio::test]
async fn a_page_refused_as_too_large_pages_cut_short_and_its_incident_is_resolved() {
    let rx = Receiver::start().await;
    rx.reply_next([Reply(413, vec![], "")]);
    let out = Running::pager(paging_webhook_config(&rx.url));
    out.queue.push(large_event("critical"));
    out.queue.push(event("disk /", "ok"));
    let seen = rx.wait_for(3).await;
    out.settled().await;
    let page = seen[1].json();
    assert_eq!(
        (page["action"].clone(), page["severity"].clone()),
        (json!("trigger"), json!("critical"))
    );
    assert_eq!(page["event"]["description"].as_str().unwrap().len(), 4096);
    assert!(
        page["event"]["truncated"]
            .as_str()
            .unwrap()
            .starts_with("cut short")
    );
    assert_eq!(
        webhook_actions(&rx),
        ["trigger critical", "trigger critical", "resolve -"]
    );
    assert_eq!((out.delivered(), out.dropped()), (2, 0));
}

/// Its incidents belong to its URL: redeclared at another, it cannot
/// resolve what it opened at the first.
#[tokio::test]
async fn a_paging_webhook_moved_to_another_url_does_not_resolve_there_what_it_opened_here() {
    let (first, second) = (Receiver::start().await, Receiver::start().await);
    let kept = Kept::default();
    let stop = CancellationToken::new();
    let (queue, task) = outputs::start(&oncall(&first), &kept, stop.child_token());
    queue.push(event("disk /", "critical"));
    first.wait_for(1).await;
    drop(queue);
    let (moved, _) = outputs::start(&oncall(&second), &kept, stop.child_token());
    moved.push(event("disk /", "ok"));
    moved.push(event("cpu", "critical"));
    second.wait_for(1).await;
    drop(moved);
    let (back, _) = outputs::start(&oncall(&first), &kept, stop.child_token());
    back.push(event("disk /", "ok"));
    first.wait_for(2).await;
    assert_eq!(webhook_actions(&first), ["trigger critical", "resolve -"]);
    let at_second: Vec<_> = second
        .seen()
        .iter()
        .map(|s| s.json()["dedup_key"].clone())
        .collect();
    assert_eq!(at_second, ["web1/cpu"], "only its own trigger");
    stop.cancel();
    task.await.unwrap();
}

// ---------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------

/// riemann-client → vigil (`changed_state { pager }`) → the receiver.
#[test]
fn riemann_client_states_page_and_resolve_through_the_binary() {
    common::require_peer("riemann-client");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let rx = runtime.block_on(Receiver::start());
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("pager.vigil");
    let source = format!(
        r#"output pager = pagerduty(routing_key: "k", url: "{}")

streams {{
  changed_state {{ pager }}
}}
"#,
        rx.url
    );
    std::fs::write(&rules, source).unwrap();
    let vigil = common::Vigil::start(&["--rules", rules.to_str().unwrap()]);

    let (ip, port) = (vigil.host_str(), vigil.port_str());
    for state in ["critical", "ok"] {
        let args = [
            "send", "-T", "-h", "web1", "-S", "disk /", "-s", state, "-d", "0.97", &ip, &port,
        ];
        let out = common::run_cmd("riemann-client", &args, common::CMD_TIMEOUT);
        common::expect_success(&format!("riemann-client {args:?}"), &out);
    }
    let seen = runtime.block_on(rx.wait_for(2));
    let (trigger, resolve) = (seen[0].json(), seen[1].json());
    assert_eq!(trigger["event_action"], "trigger", "{trigger}");
    assert_eq!(trigger["routing_key"], "k");
    assert_eq!(
        trigger["payload"]["summary"],
        "web1 disk / is critical (0.97)"
    );
    assert_eq!(resolve["event_action"], "resolve", "{resolve}");
    assert_eq!(trigger["dedup_key"], resolve["dedup_key"]);
    assert_eq!(seen.len(), 2, "nothing else paged: {seen:#?}");
}

/// An incident opened before a restart of the binary is resolved after it:
/// the open incidents are saved beside the index snapshot.
#[test]
fn the_binary_resolves_after_a_restart_what_it_triggered_before() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let rx = runtime.block_on(Receiver::start());
    let dir = tempfile::tempdir().unwrap();
    let args = pager_keeping_state(dir.path(), &rx.url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let send = |vigil: &common::Vigil, state: &str| send_state(&runtime, vigil, "disk /", state);

    let mut first = common::Vigil::start(&args);
    send(&first, "critical");
    runtime.block_on(rx.wait_for(1));
    assert!(first.terminate().success());
    assert!(
        dir.path().join("data/pagerduty-pager.json").exists(),
        "saved in the data directory"
    );

    let second = common::Vigil::start(&args);
    send(&second, "ok");
    let seen = runtime.block_on(rx.wait_for(2));
    let (trigger, resolve) = (seen[0].json(), seen[1].json());
    assert_eq!(trigger["event_action"], "trigger", "{trigger}");
    assert_eq!(resolve["event_action"], "resolve", "{resolve}");
    assert_eq!(trigger["dedup_key"], resolve["dedup_key"]);
    assert!(
        second.logs().contains("Open incidents loaded."),
        "{}",
        second.logs()
    );
}

/// `paging_webhook` declared in a rule file, through the binary.
#[test]
fn the_binary_pages_through_a_paging_webhook() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let rx = runtime.block_on(Receiver::start());
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("pager.vigil");
    let source = format!(
        "output oncall = paging_webhook(url: \"{}\", headers: {{\"X-Token\": \"t\"}}, \
         dedup_key: \"{{host}}:{{service}}\")\n\
         streams {{\n  oncall\n}}\n",
        rx.url
    );
    std::fs::write(&rules, source).unwrap();
    let vigil = common::Vigil::start(&["--rules", rules.to_str().unwrap()]);
    runtime.block_on(async {
        let mut client = vigil::client::Client::connect(vigil.tcp).await.unwrap();
        for state in ["critical", "critical", "ok"] {
            client.send(&[event("disk /", state)]).await.unwrap();
        }
    });
    let seen = runtime.block_on(rx.wait_for(2));
    assert_eq!(webhook_actions(&rx), ["trigger critical", "resolve -"]);
    assert!(
        seen.iter()
            .all(|page| page.json()["dedup_key"] == "web1:disk /")
    );
    assert_eq!(seen[0].header("x-token"), "t");
}

/// Killed while its receiver was failing, the binary sends the pages after
/// the restart, the one it was retrying and those made behind it: the
/// rules' state was saved too, so nothing would make them again.
#[test]
fn the_binary_sends_after_a_crash_the_pages_it_had_not_delivered() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let rx = runtime.block_on(Receiver::start());
    rx.reply_always(Reply(500, vec![], "down"));
    let dir = tempfile::tempdir().unwrap();
    let args = pager_keeping_state(dir.path(), &rx.url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut first = common::Vigil::start(&args);
    send_state(&runtime, &first, "disk /", "critical");
    runtime.block_on(rx.wait_for(1));
    send_state(&runtime, &first, "cpu", "critical");
    send_state(&runtime, &first, "load", "warning");
    let file = incidents::file_in(&dir.path().join("data"), "pager");
    let deadline = std::time::Instant::now() + WAIT;
    while saved_pages(&file).len() < 3 {
        assert!(std::time::Instant::now() < deadline, "{}", first.logs());
        std::thread::sleep(Duration::from_millis(10));
    }
    first.kill9();
    rx.reply_always(accepted());
    let tried = rx.seen().len();

    let second = common::Vigil::start(&args);
    runtime.block_on(rx.wait_for(tried + 3));
    assert_eq!(
        actions(&rx)[tried..],
        [
            "trigger web1/disk /",
            "trigger web1/cpu",
            "trigger web1/load"
        ],
        "in the order they were made"
    );
    assert!(
        second
            .logs()
            .contains("Pages left undelivered by the output's previous run; sending them first."),
        "{}",
        second.logs()
    );
}

/// A pager renamed by a reload leaves its open incidents to no one: said at
/// the reload, and at each start while its file holds them. Declared again
/// under its name, it resolves them.
#[test]
fn a_pager_renamed_with_open_incidents_says_they_are_left_open() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let rx = runtime.block_on(Receiver::start());
    let dir = tempfile::tempdir().unwrap();
    let args = pager_keeping_state(dir.path(), &rx.url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let rules = dir.path().join("pager.vigil");
    let as_declared = std::fs::read_to_string(&rules).unwrap();
    let renamed =
        (as_declared.replace("output pager", "output oncall")).replace("{ pager }", "{ oncall }");
    assert_ne!(renamed, as_declared);

    let mut first = common::Vigil::start(&args);
    send_state(&runtime, &first, "disk /", "critical");
    runtime.block_on(rx.wait_for(1));
    std::fs::write(&rules, &renamed).unwrap();
    common::run_ok("kill", &["-HUP", &first.pid().to_string()], WAIT);
    assert!(
        first.wait_for_log("A reload removed (or renamed) a pager output", WAIT),
        "{}",
        first.logs()
    );
    let warning = first.log_line("A reload removed");
    assert!(warning.contains(r#""incidents":1"#), "{warning}");
    assert!(warning.contains(r#""output":"pager""#), "{warning}");
    first.terminate();

    let second = common::Vigil::start(&args);
    let file = incidents::file_in(&dir.path().join("data"), "pager");
    assert!(
        second.wait_for_log("A pager output the rules do not declare", WAIT),
        "{}",
        second.logs()
    );
    let warning = second.log_line("do not declare");
    assert!(warning.contains(&file.display().to_string()), "{warning}");
    assert!(warning.contains(r#""incidents":1"#), "{warning}");
    drop(second);

    std::fs::write(&rules, &as_declared).unwrap();
    let third = common::Vigil::start(&args);
    send_state(&runtime, &third, "disk /", "ok");
    runtime.block_on(rx.wait_for(2));
    assert_eq!(actions(&rx), ["trigger web1/disk /", "resolve web1/disk /"]);
    assert!(!third.logs().contains("do not declare"), "{}", third.logs());
}

/// A reload moving a failing pager to another routing key (and URL) hands
/// the pages the old key did not take to the new one, which sends them
/// first: each counted once, delivered, in the counters every declaration
/// of the name shares (so a reload never turns them back either).
#[test]
fn pages_a_change_of_receiver_left_are_sent_to_the_new_one_and_counted_once() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (rx, moved_to) =
        runtime.block_on(async { (Receiver::start().await, Receiver::start().await) });
    rx.reply_always(Reply(503, vec![], "down"));
    let dir = tempfile::tempdir().unwrap();
    let args = pager_keeping_state(dir.path(), &rx.url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let rules = dir.path().join("pager.vigil");
    let declared = std::fs::read_to_string(&rules).unwrap();
    let moved = declared
        .replace("routing_key: \"k\"", "routing_key: \"k2\"")
        .replace(&rx.url, &moved_to.url);
    assert_ne!(moved, declared);
    let vigil = common::Vigil::start(&args);
    for service in ["disk /", "cpu", "load"] {
        send_state(&runtime, &vigil, service, "critical");
    }
    let counted = |want: &[(&str, f64)]| {
        let seen = common::wait_until(WAIT, || {
            let text = runtime.block_on(metrics_of(&vigil));
            let values: Vec<_> = want
                .iter()
                .map(|(name, _)| pager_metric(&text, name))
                .collect();
            let wanted = want.iter().map(|&(_, v)| Some(v));
            values.iter().copied().eq(wanted).then_some(values)
        });
        assert!(
            seen.is_some(),
            "{want:?} not counted: {}",
            runtime.block_on(metrics_of(&vigil))
        );
    };
    counted(&[("accepted_total", 3.0), ("in_flight", 3.0)]);

    std::fs::write(&rules, &moved).unwrap();
    common::run_ok("kill", &["-HUP", &vigil.pid().to_string()], WAIT);
    assert!(
        vigil.wait_for_log("Pages undelivered to the previous receiver", WAIT),
        "{}",
        vigil.logs()
    );
    let said = vigil.log_line("previous receiver");
    assert!(said.contains(r#""handed":3"#), "{said}");
    assert!(said.contains(r#""superseded":0"#), "{said}");
    runtime.block_on(moved_to.wait_for(3));
    counted(&[
        ("accepted_total", 3.0),
        ("delivered_total", 3.0),
        ("dropped_total", 0.0),
        ("in_flight", 0.0),
    ]);

    send_state(&runtime, &vigil, "disk /", "ok");
    send_state(&runtime, &vigil, "mem", "critical");
    runtime.block_on(moved_to.wait_for(5));
    counted(&[
        ("accepted_total", 5.0),
        ("delivered_total", 5.0),
        ("dropped_total", 0.0),
        ("skipped_total", 0.0),
    ]);
    assert_eq!(
        actions(&moved_to),
        [
            "trigger web1/disk /",
            "trigger web1/cpu",
            "trigger web1/load",
            "resolve web1/disk /",
            "trigger web1/mem"
        ],
        "the new key opened what the old one could not, and resolves it"
    );
    assert!(
        (rx.seen().iter()).all(|s| s.json()["routing_key"] == "k"),
        "the old receiver only ever got its own key's pages"
    );
}

/// The binary's `/metrics` text.
async fn metrics_of(vigil: &common::Vigil) -> String {
    let url = format!("http://{}/metrics", vigil.http.expect("an HTTP listener"));
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// `vigil_output_NAME{output="pager"}` in a `/metrics` text.
fn pager_metric(text: &str, name: &str) -> Option<f64> {
    let sample = format!("vigil_output_{name}{{output=\"pager\"}} ");
    let line = text.lines().find(|l| l.starts_with(&sample))?;
    line[sample.len()..].trim().parse().ok()
}

/// Stopped while a receiver hangs: the pages written down are said to be
/// kept for the next run, not dropped.
#[test]
fn pages_left_at_shutdown_are_said_to_be_kept_for_the_next_run() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let rx = runtime.block_on(Receiver::start());
    rx.hang();
    let dir = tempfile::tempdir().unwrap();
    let (mut vigil, file) = paging_until_written(&runtime, &rx, dir.path(), 3, 3);
    vigil.terminate();
    let logs = vigil.logs();
    let said = vigil.log_line("Pages undelivered when the output stopped");
    assert!(said.contains(r#""level":"WARN""#), "{said}");
    assert!(said.contains(r#""kept":3"#), "{said}");
    let errors: Vec<_> = logs
        .lines()
        .filter(|l| l.contains(r#""level":"ERROR""#))
        .collect();
    assert!(errors.is_empty(), "nothing lost, yet {errors:#?}");
    assert_eq!(saved_pages(&file).len(), 3);
}

/// Stopped with its receiver failing and its file unwritable (a full disk):
/// the pages are said to be lost, not kept in a file that does not hold them.
#[test]
fn pages_a_failed_save_left_out_of_the_file_are_said_to_be_lost_at_shutdown() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let rx = runtime.block_on(Receiver::start());
    rx.reply_always(Reply(503, vec![], "down"));
    let dir = tempfile::tempdir().unwrap();
    let args = pager_keeping_state(dir.path(), &rx.url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let file = incidents::file_in(&dir.path().join("data"), "pager");
    block_saves(&file);
    let mut vigil = common::Vigil::start(&args);
    for service in ["disk /", "cpu"] {
        send_state(&runtime, &vigil, service, "critical");
    }
    assert!(
        vigil.wait_for_log("Open incidents not saved", WAIT),
        "{}",
        vigil.logs()
    );
    vigil.terminate();
    let logs = vigil.logs();
    assert!(
        !logs.contains("those kept are in the pager's file"),
        "{logs}"
    );
    let stopped = vigil.log_line("Pages undelivered when the output stopped");
    assert!(stopped.contains(r#""level":"ERROR""#), "{stopped}");
    assert!(stopped.contains(r#""written":0"#), "{stopped}");
    let unsaved = vigil.log_line("not saved as vigil stops");
    assert!(unsaved.contains(r#""pages":2"#), "{unsaved}");
    let lost = vigil.log_line("Events not delivered when vigil stopped");
    assert!(lost.contains(r#""dropped":2"#), "{lost}");
    assert!(!file.exists());
}

/// Stopped while a slow receiver still takes pages, past the shutdown's
/// grace: those written down are said to be kept, none lost.
#[test]
fn pages_still_sending_past_the_grace_are_said_to_be_kept() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let rx = runtime.block_on(Receiver::start());
    rx.slow(Duration::from_secs(2));
    let dir = tempfile::tempdir().unwrap();
    let (mut vigil, file) = paging_until_written(&runtime, &rx, dir.path(), 10, 9);
    vigil.terminate();
    let logs = vigil.logs();
    let said = vigil.log_line("Pages not delivered when vigil stopped");
    let kept = saved_pages(&file).len();
    assert!(kept > 0, "{logs}");
    assert!(said.contains(&format!(r#""kept":{kept}"#)), "{said}");
    assert!(said.contains(r#""lost":0"#), "{said}");
    assert!(!logs.contains("Events not delivered"), "{logs}");
}

/// The binary keeping its state in `dir`, paging to `rx`, sent `pages`
/// services turning critical; returned with its pager's file once that
/// holds at least `written` pages.
fn paging_until_written(
    runtime: &tokio::runtime::Runtime,
    rx: &Receiver,
    dir: &std::path::Path,
    pages: usize,
    written: usize,
) -> (common::Vigil, std::path::PathBuf) {
    let args = pager_keeping_state(dir, &rx.url);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vigil = common::Vigil::start(&args);
    for i in 0..pages {
        send_state(runtime, &vigil, &format!("s{i}"), "critical");
    }
    let file = incidents::file_in(&dir.join("data"), "pager");
    let deadline = std::time::Instant::now() + WAIT;
    while saved_pages(&file).len() < written {
        assert!(std::time::Instant::now() < deadline, "{}", vigil.logs());
        std::thread::sleep(Duration::from_millis(10));
    }
    (vigil, file)
}

/// Arguments for the binary paging every change of state through PagerDuty
/// at `url`, its rule file and data directory in `dir` (the same across
/// restarts).
fn pager_keeping_state(dir: &std::path::Path, url: &str) -> Vec<String> {
    let rules = dir.join("pager.vigil");
    let source = format!(
        "output pager = pagerduty(routing_key: \"k\", url: \"{url}\")\n\
         streams {{\n  changed_state {{ pager }}\n}}\n"
    );
    std::fs::write(&rules, source).unwrap();
    let data = dir.join("data");
    [
        "--rules",
        rules.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Sends `service` in `state` through the binary's TCP port, acked.
fn send_state(
    runtime: &tokio::runtime::Runtime,
    vigil: &common::Vigil,
    service: &str,
    state: &str,
) {
    runtime.block_on(async {
        let mut client = vigil::client::Client::connect(vigil.tcp).await.unwrap();
        client.send(&[event(service, state)]).await.unwrap();
    });
}
