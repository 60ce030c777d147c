//! Scale-out across machines: real `vigil run --cluster` nodes around a real
//! `nats-server -js` on loopback (src/cluster/README.md).
//!
//! Each test starts its own nats-server (a port it picks, temp store dir, killed on
//! drop) and its own nodes. The tests run one at a time: each has three
//! nodes and a NATS server on a small machine, and the takeover bounds they
//! check are about time.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use common::{Vigil, wait_until};
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use vigil::client::Client;
use vigil::clock::{Clock, SystemClock};
use vigil::event::Event;
use vigil::grpc::{QueryRequest, VigilClient};

/// Survivors must own a dead node's shards within this (lease TTL 6 s plus a
/// renew round), and have replayed them; the slack is for a debug build on
/// a busy machine.
const TAKEOVER: Duration = Duration::from_secs(15);
/// Bound for anything else to settle.
const SETTLE: Duration = Duration::from_secs(30);

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A `nats-server -js` child; killed (and reaped) on drop.
struct Nats {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
}

impl Nats {
    /// The first start picks its own free port (`-p -1`) and says which in a
    /// ports file: a port chosen here and released for it to bind could be
    /// taken by another socket meanwhile.
    fn start() -> Nats {
        common::require_peer("nats-server");
        let store = tempfile::tempdir().unwrap();
        let ports = store.path().join("ports");
        std::fs::create_dir(&ports).unwrap();
        let mut nats = Nats {
            child: None,
            port: 0,
            store,
        };
        let child = nats
            .command("-1")
            .arg("--ports_file_dir")
            .arg(&ports)
            .spawn();
        let child = child.expect("spawn nats-server");
        let file = ports.join(format!("nats-server_{}.ports", child.id()));
        nats.child = Some(child);
        nats.port = wait_until(Duration::from_secs(10), || {
            client_port(&std::fs::read_to_string(&file).ok()?)
        })
        .unwrap_or_else(|| panic!("nats-server wrote no ports file {}", file.display()));
        nats.wait_accepting();
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port and store dir, as a restarted
    /// NATS comes back where its clients reconnect.
    fn spawn(&mut self) {
        let child = self.command(&self.port.to_string()).spawn();
        self.child = Some(child.expect("spawn nats-server"));
        self.wait_accepting();
    }

    fn command(&self, port: &str) -> Command {
        let mut command = Command::new("nats-server");
        command
            .args(["-js", "-a", "127.0.0.1", "-p", port])
            .arg("-sd")
            .arg(self.store.path().join("store"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    fn wait_accepting(&self) {
        let port = self.port;
        wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .expect("nats-server accepts connections");
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The client port from a nats-server ports file:
/// `{"nats":["nats://127.0.0.1:41765"],…}`.
fn client_port(ports_file: &str) -> Option<u16> {
    let ports: serde_json::Value = serde_json::from_str(ports_file).ok()?;
    let url = ports["nats"].get(0)?.as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn node(nats: &Nats, id: &str, extra: &[&str]) -> Vigil {
    let url = nats.url();
    let mut args = vec!["--cluster", &url, "--node-id", id];
    args.extend_from_slice(extra);
    Vigil::start(&args)
}

fn event(host: &str, service: &str, state: &str) -> Event {
    Event {
        host: Some(host.to_owned()),
        service: Some(service.to_owned()),
        state: Some(state.to_owned()),
        time: SystemClock.now(),
        // Longer than any test: nothing expires under the assertions.
        ttl: Some(600.0),
        ..Event::default()
    }
}

/// An `ok` of `service` for each host, living `ttl` seconds.
fn ok_with_ttl(hosts: &[String], service: &str, ttl: f32) -> Vec<Event> {
    let ok = |host: &String| Event {
        ttl: Some(ttl),
        ..event(host, service, "ok")
    };
    hosts.iter().map(ok).collect()
}

/// Sends `events` through `node` in batches of 100; every batch must be acked.
fn send(node: &Vigil, events: &[Event]) {
    let addr = node.tcp;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = Client::connect(addr).await.unwrap();
        for batch in events.chunks(100) {
            client.send(batch).await.expect("batch acked");
        }
    });
}

/// Every entry a TCP query on `node` returns (fanned out to the cluster).
fn query_all(node: &Vigil) -> Vec<Event> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = Client::connect(node.tcp).await.unwrap();
        client.query("true").await.unwrap_or_default()
    })
}

/// The `(host, service)` keys `node` holds itself (`GET /index?local=true`).
fn local_keys(node: &Vigil) -> Keys {
    let url = format!(
        "http://{}/index?query=true&local=true",
        node.http.expect("HTTP on")
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let body: serde_json::Value = runtime.block_on(async {
        reqwest::get(&url)
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or_default()
    });
    // A refusal (over `--max-query-results` while shards move) holds nothing
    // the caller can wait on.
    let Some(entries) = body.as_array() else {
        return Keys::new();
    };
    entries
        .iter()
        .map(|e| {
            (
                e["host"].as_str().unwrap_or_default().to_owned(),
                e["service"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

type Keys = BTreeSet<(String, String)>;

/// Each node's own keys, when together they hold exactly `want`, each once.
fn partition(nodes: &[&Vigil], want: usize) -> Option<Vec<Keys>> {
    let per_node: Vec<_> = nodes.iter().map(|n| local_keys(n)).collect();
    let total: usize = per_node.iter().map(BTreeSet::len).sum();
    let union: BTreeSet<_> = per_node.iter().flatten().collect();
    (total == want && union.len() == want).then_some(per_node)
}

/// Waits until the nodes together hold exactly `want` keys, each on one node.
fn wait_partitioned(nodes: &[&Vigil], want: usize) -> Vec<Keys> {
    wait_until(SETTLE, || partition(nodes, want)).unwrap_or_else(|| {
        let sizes: Vec<_> = nodes.iter().map(|n| local_keys(n).len()).collect();
        panic!("nodes never held {want} keys, each once: local sizes {sizes:?}")
    })
}

/// Waits until every node owns some of the `want` keys, each on one node,
/// and the split stayed the same over more than a renew round: rebalancing
/// is over.
fn wait_settled(nodes: &[&Vigil], want: usize) -> Vec<Keys> {
    let split = || partition(nodes, want).filter(|per_node| per_node.iter().all(|k| !k.is_empty()));
    wait_until(SETTLE, || {
        let before = split()?;
        thread::sleep(Duration::from_secs(3));
        (split()? == before).then_some(before)
    })
    .expect("every node owns some of the hosts, each on one node, and it stays so")
}

/// A webhook receiver recording pages; while `failing`, it answers `503`
/// and records nothing.
#[derive(Clone, Default)]
struct Pager {
    pages: Arc<Mutex<Vec<String>>>,
    failing: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
}

/// A `webhook` post is recorded as its host, a `paging_webhook` page as
/// its action and host.
async fn record(State(pager): State<Pager>, body: Bytes) -> StatusCode {
    if pager.failing.load(Ordering::Acquire) {
        pager.refused.fetch_add(1, Ordering::AcqRel);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let post: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let page = match post["action"].as_str() {
        Some(action) => format!("{action} {}", post["event"]["host"].as_str().unwrap_or("?")),
        None => post["host"].as_str().unwrap_or("?").to_owned(),
    };
    pager.pages.lock().unwrap().push(page);
    StatusCode::OK
}

impl Pager {
    /// Starts the receiver on its own runtime thread; returns it and its URL.
    fn start() -> (Pager, String) {
        let pager = Pager::default();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/page", listener.local_addr().unwrap());
        let app = Router::new().fallback(record).with_state(pager.clone());
        thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            });
        });
        (pager, url)
    }

    fn pages(&self) -> Vec<String> {
        self.pages.lock().unwrap().clone()
    }

    /// Answers `503` from now on (or no longer).
    fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::Release);
    }

    /// Waits until `n` posts in all were refused.
    fn wait_refused(&self, n: usize) {
        let refused = || self.refused.load(Ordering::Acquire);
        wait_until(SETTLE, || (refused() >= n).then_some(()))
            .unwrap_or_else(|| panic!("only {} of {n} posts refused", refused()));
    }

    /// Waits for `n` pages, then a while longer for any extra one; all of them.
    fn settle_at(&self, n: usize) -> Vec<String> {
        wait_until(SETTLE, || (self.pages().len() >= n).then_some(()))
            .unwrap_or_else(|| panic!("only {} of {n} pages arrived", self.pages().len()));
        thread::sleep(Duration::from_secs(3));
        self.pages()
    }
}

fn assert_each_once(pages: &[String], hosts: &BTreeSet<String>) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for host in pages {
        *counts.entry(host).or_default() += 1;
    }
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "paged more than once: {doubled:?}");
    let paged: BTreeSet<String> = counts.keys().map(|h| (*h).to_owned()).collect();
    assert_eq!(&paged, hosts, "exactly these hosts page");
}

/// A pager receiver and a rules file (in a temp dir kept as long as this)
/// that indexes everything and pages it from the given streams.
struct Paging {
    pager: Pager,
    rules: String,
    _dir: tempfile::TempDir,
}

/// Pages once per host turning critical.
const PAGE_ON_CRITICAL: &str = r#"changed_state {
    where state = "critical" { pager }
  }"#;

/// Pages each expiry.
const PAGE_ON_EXPIRY: &str = r#"where state = "expired" { pager }"#;

fn paging(streams: &str) -> Paging {
    paging_through("webhook", streams)
}

/// As [`paging`], through an output of type `output` (`webhook`,
/// `paging_webhook`).
fn paging_through(output: &str, streams: &str) -> Paging {
    let (pager, url) = Pager::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("paging.vigil");
    let source = format!(
        r#"output pager = {output}(url: "{url}")

streams {{
  index
  {streams}
}}
"#
    );
    std::fs::write(&path, source).unwrap();
    Paging {
        pager,
        rules: path.to_str().unwrap().to_owned(),
        _dir: dir,
    }
}

/// `ok` then `critical` for each host: one transition each.
fn turn_critical(hosts: &BTreeSet<String>) -> (Vec<Event>, Vec<Event>) {
    let ok = hosts.iter().map(|h| event(h, "disk", "ok")).collect();
    let critical = hosts.iter().map(|h| event(h, "disk", "critical")).collect();
    (ok, critical)
}

#[test]
fn three_nodes_split_the_hosts_and_each_answers_for_all() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let nodes: Vec<Vigil> = (1..=3)
        .map(|i| node(&nats, &format!("n{i}"), &["--grpc", "127.0.0.1:0"]))
        .collect();
    let events: Vec<Event> = (0..1000)
        .flat_map(|h| (0..5).map(move |s| event(&format!("host-{h}"), &format!("svc-{s}"), "ok")))
        .collect();
    send(&nodes[0], &events);

    for (i, node) in nodes.iter().enumerate() {
        let found = wait_until(SETTLE, || {
            let found = query_all(node);
            (found.len() == 5000).then_some(found)
        });
        assert!(
            found.is_some(),
            "node {i} never answered with all 5000 entries"
        );
    }
    // HTTP and gRPC queries fan out too. Asked once each, so only after
    // rebalancing is over: a query during a shard's move can miss it.
    let per_node = wait_settled(&nodes.iter().collect::<Vec<_>>(), 5000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let http = format!("http://{}/index?query=true", nodes[1].http.unwrap());
    let via_http: Vec<serde_json::Value> =
        runtime.block_on(async { reqwest::get(&http).await.unwrap().json().await.unwrap() });
    assert_eq!(via_http.len(), 5000, "HTTP GET /index");
    let grpc = format!("http://{}", nodes[2].grpc.expect("gRPC on"));
    let via_grpc = runtime.block_on(async {
        let mut client = VigilClient::connect(grpc).await.unwrap();
        let request = QueryRequest::new("true");
        client.query(request).await.unwrap().into_inner().events
    });
    assert_eq!(via_grpc.len(), 5000, "gRPC Query");
    // A host's entries all live on one node.
    let mut owner: BTreeMap<String, usize> = BTreeMap::new();
    for (i, keys) in per_node.iter().enumerate() {
        assert!(
            !keys.is_empty(),
            "node {i} holds nothing: shards not spread"
        );
        for (host, _) in keys {
            let first = *owner.entry(host.clone()).or_insert(i);
            assert_eq!(first, i, "{host} lives on nodes {first} and {i}");
        }
    }
    assert_eq!(owner.len(), 1000);
}

/// The status and body of `GET /index?query=…` on `node`, fanned out.
fn http_query(node: &Vigil, query: &str) -> (reqwest::StatusCode, String) {
    let url = format!("http://{}/index", node.http.expect("HTTP on"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let answer = client
            .get(&url)
            .query(&[("query", query)])
            .send()
            .await
            .unwrap();
        (answer.status(), answer.text().await.unwrap())
    })
}

/// A query over `--max-query-results` is the asker's error (HTTP 422, a TCP
/// error naming the flag), not the cluster being unavailable: whether a node
/// refused it (alone, it holds all 60 entries) or only the merged answer is
/// over the limit (two nodes, ~30 each).
#[test]
fn a_query_over_the_result_limit_is_refused_as_the_askers_error() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let limit = ["--max-query-results", "50"];
    let first = node(&nats, "n1", &limit);
    let events: Vec<Event> = (0..60)
        .map(|h| event(&format!("host-{h}"), "cpu", "ok"))
        .collect();
    send(&first, &events);
    let refused = |node: &Vigil| {
        wait_until(SETTLE, || {
            let (status, body) = http_query(node, "true");
            (status == reqwest::StatusCode::UNPROCESSABLE_ENTITY).then_some(body)
        })
    };
    let body = refused(&first).expect("refused by the node holding all 60");
    assert!(body.contains("--max-query-results 50"), "{body}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let over_tcp = runtime.block_on(async {
        let mut client = Client::connect(first.tcp).await.unwrap();
        client.query("true").await.map(|found| found.len())
    });
    let error = over_tcp.expect_err("refused over TCP").to_string();
    assert!(error.contains("--max-query-results 50"), "{error}");
    let (status, body) = http_query(&first, r#"host = "host-7""#);
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");

    let second = node(&nats, "n2", &limit);
    let per_node = wait_settled(&[&first, &second], 60);
    assert!(per_node.iter().all(|keys| keys.len() <= 50), "{per_node:?}");
    let body = refused(&second).expect("the merged 60 refused");
    assert!(body.contains("--max-query-results 50"), "{body}");
}

/// `name`'s value on `node`'s `/metrics`.
fn metric_of(runtime: &tokio::runtime::Runtime, node: &Vigil, name: &str) -> u64 {
    runtime.block_on(common::metric(node.http.expect("HTTP on"), name))
}

/// A node whose `--max-answer-memory` has no room for its part of an answer
/// refuses it as busy, and the asker refuses the query as a single node
/// does (HTTP `503` with `Retry-After`, gRPC `RESOURCE_EXHAUSTED`, a TCP
/// error reply), to be asked again: not as an unavailable cluster.
#[test]
fn a_node_without_room_for_its_answer_makes_the_query_busy_not_unavailable() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let memory = ["--grpc", "127.0.0.1:0", "--max-answer-memory", "1048576"];
    let node = node(&nats, "n1", &memory);
    // A 12 MB answer to `true`: far more than the socket buffers hold.
    let large = |i: usize| Event {
        description: Some("x".repeat(4_000)),
        ..event(&format!("host-{i}"), "big", "ok")
    };
    send(&node, &(0..3_000).map(large).collect::<Vec<_>>());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    wait_until(SETTLE, || {
        (metric_of(&runtime, &node, "vigil_index_size") == 3_000).then_some(())
    })
    .expect("all 3 000 indexed");
    // A local answer its client does not read holds all of the pool.
    let http = node.http.unwrap();
    let get = |query: &str| {
        let url = format!("http://{http}/index?query={query}");
        runtime.block_on(async { reqwest::get(url).await.unwrap() })
    };
    let stalled = get("true&local=true");
    assert_eq!(stalled.status(), reqwest::StatusCode::OK);
    wait_until(SETTLE, || {
        (metric_of(&runtime, &node, "vigil_answer_bytes_held") == 1 << 20).then_some(())
    })
    .expect("the unread answer holds the pool");

    let busy = get("true");
    assert_eq!(busy.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(busy.headers()["retry-after"], "1");
    let error: serde_json::Value = runtime.block_on(busy.json()).unwrap();
    let error = error["error"].as_str().unwrap().to_owned();
    assert!(
        error
            .starts_with("busy: query answers being sent fill --max-answer-memory (1048576 bytes)"),
        "{error}"
    );
    let grpc = format!("http://{}", node.grpc.expect("gRPC on"));
    let refused = runtime.block_on(async {
        let mut client = VigilClient::connect(grpc).await.unwrap();
        client.query(QueryRequest::new("true")).await.unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(refused.message(), error);
    let mut tcp = runtime.block_on(Client::connect(node.tcp)).unwrap();
    let refused = runtime.block_on(tcp.query("true")).unwrap_err();
    assert_eq!(refused.to_string(), format!("server error: {error}"));
    assert_eq!(
        metric_of(&runtime, &node, "vigil_answers_refused_busy_total"),
        3
    );

    // Its room back, the whole answer fits the idle pool again.
    drop(stalled);
    wait_until(SETTLE, || {
        (metric_of(&runtime, &node, "vigil_answer_bytes_held") == 0).then_some(())
    })
    .expect("the dropped answer gives its room back");
    let found = runtime.block_on(tcp.query("true")).unwrap();
    assert_eq!(found.len(), 3_000);
}

/// A node whose scan turn stayed taken for as long as a query waits for it
/// answers `503` saying when to ask again, as a busy one does: it said
/// nothing. The turn is the one of queries of over 100 terms, held by a
/// local query costing every event 1 200 scans of its 40 KB description
/// (the room its scan takes shows it scanning): some 14 GB to search, six
/// times the work of the 200 scans that took 7.7 s on a loaded machine,
/// which a quick one could end within the 2 s the asked query waits.
#[test]
fn a_query_refused_for_want_of_a_scan_turn_says_when_to_ask_again() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let node = node(&nats, "n1", &["--query-timeout", "10m"]);
    let long = |i: usize| Event {
        description: Some("x".repeat(40_000)),
        ..event(&format!("host-{i}"), "long", "ok")
    };
    send(&node, &(0..300).map(long).collect::<Vec<_>>());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    wait_until(SETTLE, || {
        (metric_of(&runtime, &node, "vigil_index_size") == 300).then_some(())
    })
    .expect("all 300 indexed");
    // As many as the URL holds (64 KiB of request head); the scan stops
    // once its asker is gone.
    let mut terms: Vec<String> = (0..1_200)
        .map(|i| format!(r#"description =~ "%q{i}%""#))
        .collect();
    terms.push(r#"description =~ "%x%""#.to_owned());
    let costly = terms.join(" or ");
    let costly_text = costly.clone();
    let url = format!("http://{}/index", node.http.unwrap());
    let get = move |local: &'static str| {
        let (url, costly) = (url.clone(), costly.clone());
        async move {
            let query = [("query", costly.as_str()), ("local", local)];
            reqwest::Client::new().get(url).query(&query).send().await
        }
    };
    let scanning = runtime.spawn(get("true"));
    wait_until(SETTLE, || {
        (metric_of(&runtime, &node, "vigil_answer_bytes_held") > 0).then_some(())
    })
    .expect("the local query scanning");
    let refused = runtime.block_on(get("false")).unwrap();
    assert!(
        !scanning.is_finished(),
        "the local query no longer held the turn: {:?}",
        runtime
            .block_on(scanning)
            .unwrap()
            .map(|answer| answer.status())
    );
    assert_eq!(refused.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let no_turn = "the one scan turn of this node for queries of over 100 terms stayed taken \
                   for 2s (scanning another); ask again in a moment";
    let error: serde_json::Value = runtime.block_on(refused.json()).unwrap();
    assert_eq!(error["error"], no_turn);
    // A WebSocket's snapshot refused so is closed "try again later" (1013),
    // as one without room in --max-subscriber-memory is: it was closed as
    // failed (1011).
    let address = format!("ws://{}/index", node.http.unwrap());
    let address = reqwest::Url::parse_with_params(&address, [("query", costly_text.as_str())]);
    let (mut ws, _) = runtime
        .block_on(tokio_tungstenite::connect_async(address.unwrap().as_str()))
        .expect("websocket handshake");
    let closed = runtime.block_on(async {
        loop {
            let message = tokio::time::timeout(SETTLE, ws.next())
                .await
                .expect("a frame within the bound")
                .expect("a close frame")
                .expect("a frame");
            if let tokio_tungstenite::tungstenite::Message::Close(frame) = message {
                break frame.map(|f| (u16::from(f.code), f.reason.to_string()));
            }
        }
    });
    assert!(
        !scanning.is_finished(),
        "the local query no longer held the turn"
    );
    scanning.abort();
    let reason = no_turn.get(..123).unwrap_or(no_turn).to_owned();
    assert_eq!(closed, Some((1013, reason)));
    assert_eq!(
        metric_of(
            &runtime,
            &node,
            "vigil_cluster_queries_refused_no_turn_total"
        ),
        2
    );
}

/// A node answering another's query that gets no scan turn refuses its
/// part soon enough for its asker, still waiting, to pass the refusal on,
/// saying when to ask again. Its turn is held as in
/// `a_query_refused_for_want_of_a_scan_turn_says_when_to_ask_again`; the
/// asked query is cheap (101 tests of a missing metric) but of its lane.
/// The node waited for its turn as long as the asker waits for answers:
/// the asker answered `200` without the node's part about as often as it
/// refused, and refused `503` without `Retry-After`.
#[test]
fn a_node_refusing_its_part_for_want_of_a_scan_turn_makes_the_query_say_when_to_ask_again() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let n1 = node(&nats, "n1", &["--query-timeout", "10m"]);
    let n2 = node(&nats, "n2", &["--query-timeout", "10m"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let both = |name| metric_of(&runtime, &n1, name) + metric_of(&runtime, &n2, name);
    wait_until(SETTLE, || {
        (both("vigil_cluster_members") == 4 && both("vigil_cluster_shards_owned") == 64)
            .then_some(())
    })
    .expect("two members sharing the shards");
    let long = |i: usize| Event {
        description: Some("x".repeat(40_000)),
        ..event(&format!("host-{i}"), "long", "ok")
    };
    send(&n1, &(0..300).map(long).collect::<Vec<_>>());
    wait_until(SETTLE, || (both("vigil_index_size") == 300).then_some(())).expect("all indexed");
    let mut terms: Vec<String> = (0..1_200)
        .map(|i| format!(r#"description =~ "%q{i}%""#))
        .collect();
    terms.push(r#"description =~ "%x%""#.to_owned());
    let costly = terms.join(" or ");
    let get = |node: &Vigil, query: String, local: &'static str| {
        let url = format!("http://{}/index", node.http.unwrap());
        async move {
            let query = [("query", query.as_str()), ("local", local)];
            reqwest::Client::new().get(url).query(&query).send().await
        }
    };
    let scanning = runtime.spawn(get(&n2, costly, "true"));
    wait_until(SETTLE, || {
        (metric_of(&runtime, &n2, "vigil_answer_bytes_held") > 0).then_some(())
    })
    .expect("n2's local query scanning");
    let cheap: Vec<String> = (0..101).map(|i| format!("metric > {i}")).collect();
    let refused = runtime.block_on(get(&n1, cheap.join(" or "), "false"));
    let refused = refused.unwrap();
    assert!(
        !scanning.is_finished(),
        "n2's local query no longer held the turn"
    );
    scanning.abort();
    let status = refused.status();
    let again = refused.headers().get("retry-after").cloned();
    let error: serde_json::Value = runtime.block_on(refused.json()).unwrap();
    assert_eq!(
        (status, again.as_ref().map(|v| v.to_str().unwrap())),
        (reqwest::StatusCode::SERVICE_UNAVAILABLE, Some("1")),
        "{error}"
    );
    assert_eq!(
        error["error"],
        "node n2: the one scan turn of this node for queries of over 100 terms stayed taken \
         for 1.6s (scanning another); ask again in a moment"
    );
    let refusals = |node| {
        metric_of(
            &runtime,
            node,
            "vigil_cluster_queries_refused_no_turn_total",
        )
    };
    assert_eq!((refusals(&n1), refusals(&n2)), (0, 1));
}

/// An event of about 4 KB: 3 000 of them answer `true` with 12 MB.
fn large(i: usize) -> Event {
    Event {
        description: Some("x".repeat(4_000)),
        ..event(&format!("host-{i}"), "big", "ok")
    }
}

/// A connection of the test's own to `nats`, as a node's peer.
async fn peer(nats: &Nats) -> async_nats::Client {
    async_nats::connect(nats.url())
        .await
        .expect("connect to NATS")
}

/// An answer larger than `--max-answer-memory` takes all of it on an idle
/// cluster, as on a single node: the asker's own part counts once. It
/// counted twice, in the answering side's room until handed to NATS and
/// in the merge's as it came back, and 1 query in 20 on two idle nodes was
/// refused as busy. Here a part of another answer reaches the merge first
/// (the test sends it on every query, older than the entries, as a third
/// node still answering would): the asker's own part found no room beside
/// it, every time.
#[test]
fn an_answer_larger_than_the_pool_takes_all_of_it_on_an_idle_cluster() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let memory = ["--max-answer-memory", "1048576"];
    let first = node(&nats, "n1", &memory);
    let second = node(&nats, "n2", &memory);
    send(&first, &(0..3_000).map(large).collect::<Vec<_>>());
    wait_settled(&[&first, &second], 3_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let nats_peer = runtime.block_on(peer(&nats));
    let mut questions = runtime
        .block_on(nats_peer.subscribe("vigil.query"))
        .unwrap();
    // 600 KB: over the pool's free answers, under NATS's max payload.
    let older = |i| Event {
        time: 1,
        ..large(i)
    };
    let part = vigil::proto::events_reply(&(0..150).map(older).collect::<Vec<_>>());
    runtime.spawn(async move {
        while let Some(question) = questions.next().await {
            let Some(reply) = question.reply else {
                continue;
            };
            let mut more = async_nats::HeaderMap::new();
            more.insert("Vigil-More", "1");
            let sent = nats_peer.publish_with_headers(reply, more, part.clone());
            sent.await.unwrap();
        }
    });
    for _ in 0..3 {
        let (status, body) = http_query(&first, "true");
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
        let found: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        assert_eq!(found.len(), 3_000);
    }
}

/// One node holding 3 000 events of 4 KB: a `true` query's answer is 12 MB
/// to scan and send, long enough for more questions to arrive meanwhile.
fn answering_12_mb() -> (Nats, Vigil, tokio::runtime::Runtime) {
    let nats = Nats::start();
    let node = node(&nats, "n1", &[]);
    send(&node, &(0..3_000).map(large).collect::<Vec<_>>());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    wait_until(SETTLE, || {
        (metric_of(&runtime, &node, "vigil_index_size") == 3_000).then_some(())
    })
    .expect("all 3 000 indexed");
    (nats, node, runtime)
}

/// A node stops answering a query its asker gave up (a `Vigil-Abandoned`
/// message naming its inbox, after the question on `vigil.query`): it
/// kept scanning and sending every part, holding its room in
/// `--max-answer-memory`, and refused its own askers as busy meanwhile.
/// The test asks as a node would, gives up at once, then asks again: the
/// node answers one question at a time, in order, so whatever it sent for
/// the first came before the second's answer.
#[test]
fn a_node_stops_answering_a_query_its_asker_gave_up() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (nats, _node, runtime) = answering_12_mb();
    let parts = runtime.block_on(async {
        let client = peer(&nats).await;
        let mut answers = client.subscribe("test.>").await.unwrap();
        let ask = |reply: &'static str, query: &'static str| {
            client.publish_with_reply("vigil.query", reply, query.into())
        };
        ask("test.given-up", "true").await.unwrap();
        let mut abandoned = async_nats::HeaderMap::new();
        abandoned.insert("Vigil-Abandoned", "test.given-up");
        (client.publish_with_headers("vigil.query", abandoned, "".into()))
            .await
            .unwrap();
        ask("test.next", "host = \"host-1\" and service = \"big\"")
            .await
            .unwrap();
        let mut parts = Vec::new();
        while let Some(answer) = answers.next().await {
            if answer.subject.as_str() == "test.next" {
                return parts;
            }
            let more = answer.headers.as_ref().and_then(|h| h.get("Vigil-More"));
            parts.push(more.is_some());
        }
        panic!("the subscription ended")
    });
    assert!(
        parts.iter().all(|&more| more),
        "the given-up query was answered whole: {} parts",
        parts.len()
    );
}

/// A node whose NATS server does not answer (stopped, as a hung server or a
/// partition without a reset looks: the connection still seems up) refuses
/// a query as unavailable, as when no node answered, rather than answering
/// with its own part alone as if that were the cluster's.
#[test]
fn a_query_nats_does_not_pass_on_is_unavailable_not_the_askers_part() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let nodes: Vec<Vigil> = (1..=2)
        .map(|i| node(&nats, &format!("n{i}"), &[]))
        .collect();
    let hosts: Vec<String> = (0..60).map(|h| format!("host-{h}")).collect();
    send(&nodes[0], &ok_with_ttl(&hosts, "cpu", 600.0));
    wait_settled(&nodes.iter().collect::<Vec<_>>(), 60);
    let pid = nats.child.as_ref().map(Child::id).unwrap();
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let (status, body) = http_query(&nodes[0], "true");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert_eq!(
        status,
        reqwest::StatusCode::SERVICE_UNAVAILABLE,
        "{body:.200}"
    );
}

/// An asker that gives a query up tells the other nodes so
/// (`Vigil-Abandoned` naming its inbox, on `vigil.query` after the
/// question): here refused as busy, its pool held by an answer its client
/// does not read. The nodes were not told, and kept answering.
#[test]
fn an_asker_refused_as_busy_tells_the_nodes_to_stop() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let node = node(&nats, "n1", &["--max-answer-memory", "1048576"]);
    send(&node, &(0..3_000).map(large).collect::<Vec<_>>());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    wait_until(SETTLE, || {
        (metric_of(&runtime, &node, "vigil_index_size") == 3_000).then_some(())
    })
    .expect("all 3 000 indexed");
    let nats_peer = runtime.block_on(peer(&nats));
    let questions = runtime
        .block_on(nats_peer.subscribe("vigil.query"))
        .unwrap();
    let http = node.http.unwrap();
    let get = |query: &str| {
        let url = format!("http://{http}/index?query={query}");
        runtime.block_on(async { reqwest::get(url).await.unwrap() })
    };
    let stalled = get("true&local=true");
    wait_until(SETTLE, || {
        (metric_of(&runtime, &node, "vigil_answer_bytes_held") == 1 << 20).then_some(())
    })
    .expect("the unread answer holds the pool");
    assert_eq!(
        get("true").status(),
        reqwest::StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get("false").status(), reqwest::StatusCode::OK);
    drop(stalled);
    let seen = runtime.block_on(async {
        // Dropped within the runtime, as a subscriber must be.
        let mut questions = questions;
        let mut seen = Vec::new();
        while let Some(message) = questions.next().await {
            let header = |name| message.headers.as_ref().and_then(|h| h.get(name));
            match (&message.reply, header("Vigil-Abandoned")) {
                (Some(reply), _) => {
                    seen.push(format!("{} asked by {reply}", from_utf8(&message.payload)));
                    if &message.payload[..] == b"false" {
                        return seen;
                    }
                }
                (None, Some(inbox)) => seen.push(format!("gave up {inbox}")),
                (None, None) => seen.push("neither".to_owned()),
            }
        }
        panic!("the subscription ended")
    });
    let [asked, given_up, _next] = &seen[..] else {
        panic!("{seen:?}")
    };
    let inbox = asked.strip_prefix("true asked by ").expect("the query");
    assert_eq!(given_up, &format!("gave up {inbox}"), "{seen:?}");
}

/// A give-up is seen however many questions wait: here 1 100 behind the
/// answer it gives up. The node read 1 024 of them ahead and then stopped
/// reading, so the give-up waited until the answer was sent whole; now the
/// answer stops, and the questions past 1 024 are refused at once, saying
/// why.
#[test]
fn a_give_up_behind_more_questions_than_are_read_ahead_stops_the_answer() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (nats, node, runtime) = answering_12_mb();
    const WAITING: usize = 1_100;
    let (parts, replies) = runtime.block_on(async {
        let asker = peer(&nats).await;
        let (given_up, others) = (asker.new_inbox(), asker.new_inbox());
        let mut answer = asker.subscribe(given_up.clone()).await.unwrap();
        let mut replies = asker.subscribe(others.clone()).await.unwrap();
        // 12 MB to scan and send: the rest arrives while it is answered.
        let ask = |inbox: &str, query: &'static str| {
            asker.publish_with_reply("vigil.query", inbox.to_owned(), query.into())
        };
        ask(&given_up, "true").await.unwrap();
        for _ in 0..WAITING {
            ask(&others, "false").await.unwrap();
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Vigil-Abandoned", given_up.as_str());
        (asker.publish_with_headers("vigil.query", headers, Default::default()))
            .await
            .unwrap();
        // Every other question answered (or refused): the given-up answer,
        // sent before the last of them on the same connection, is all here.
        let mut got = Vec::new();
        while got.len() < WAITING {
            got.push(replies.next().await.expect("a reply"));
        }
        let mut parts = Vec::new();
        while let Some(Some(part)) = answer.next().now_or_never() {
            parts.push(part);
        }
        (parts, got)
    });
    let last = |part: &async_nats::Message| {
        part.headers
            .as_ref()
            .is_none_or(|h| h.get("Vigil-More").is_none())
    };
    assert!(
        !parts.iter().any(last),
        "the given-up answer was sent whole: {} parts",
        parts.len()
    );
    let refused = replies
        .iter()
        .filter(|r| {
            let text = String::from_utf8_lossy(&r.payload);
            text.contains("node n1 has 1024 cluster queries waiting (")
                && text.contains(" bytes); ask again in a moment")
        })
        .count();
    assert!(refused > 0, "none refused");
    assert_eq!(
        metric_of(
            &runtime,
            &node,
            "vigil_cluster_queries_refused_waiting_total"
        ),
        refused as u64
    );
}

#[test]
fn large_questions_read_ahead_are_refused_past_a_megabyte() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (nats, _node, runtime) = answering_12_mb();
    // 512 KB questions (under NATS's 1 MB payload limit), 8 of them.
    const LARGE: usize = 8;
    let replies = runtime.block_on(async {
        let asker = peer(&nats).await;
        let (scanned, others) = (asker.new_inbox(), asker.new_inbox());
        let mut replies = asker.subscribe(others.clone()).await.unwrap();
        // 12 MB to scan and send: the rest arrives while it is answered.
        (asker.publish_with_reply("vigil.query", scanned, "true".into()))
            .await
            .unwrap();
        let question = format!("{}false", " ".repeat(512 * 1024));
        for _ in 0..LARGE {
            let payload = question.clone().into();
            (asker.publish_with_reply("vigil.query", others.clone(), payload))
                .await
                .unwrap();
        }
        let mut got = Vec::new();
        while got.len() < LARGE {
            got.push(replies.next().await.expect("a reply"));
        }
        got
    });
    let refused = replies
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.payload).contains("cluster queries waiting"))
        .count();
    assert!(
        refused > 0,
        "none refused: {LARGE} questions of 512 KB queued"
    );
}

fn from_utf8(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

#[test]
fn pages_fire_once_across_a_node_kill_and_a_rejoin() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let Paging { pager, rules, _dir } = paging(PAGE_ON_CRITICAL);
    let rules = rules.as_str();
    let mut nodes: Vec<Vigil> = (1..=3)
        .map(|i| node(&nats, &format!("n{i}"), &["--rules", rules]))
        .collect();

    let first: BTreeSet<String> = (0..100).map(|h| format!("web-{h}")).collect();
    let (ok, critical) = turn_critical(&first);
    send(&nodes[0], &ok);
    send(&nodes[0], &critical);
    assert_each_once(&pager.settle_at(100), &first);
    // Ownership settled: every node holds some of the hosts.
    let per_node = wait_partitioned(&nodes.iter().collect::<Vec<_>>(), 100);
    assert!(per_node.iter().all(|keys| !keys.is_empty()), "{per_node:?}");

    nodes[2].kill9();
    let killed = Instant::now();
    // After the kill: still critical (no new page: the taker-over rebuilt the
    // state by replay), and 100 more hosts turning critical (one page each).
    let second: BTreeSet<String> = (0..100).map(|h| format!("db-{h}")).collect();
    let (ok2, critical2) = turn_critical(&second);
    send(&nodes[0], &critical);
    send(&nodes[0], &ok2);
    send(&nodes[0], &critical2);
    let survivors = [&nodes[0], &nodes[1]];
    wait_until(TAKEOVER, || {
        survivors
            .iter()
            .all(|n| query_all(n).len() == 200)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("queries incomplete {TAKEOVER:?} after the kill"));
    println!(
        "all 200 entries answered {:?} after the kill",
        killed.elapsed()
    );
    let all: BTreeSet<String> = first.union(&second).cloned().collect();
    assert_each_once(&pager.settle_at(200), &all);

    // The node comes back: it takes some shards again, nothing pages again.
    nodes[2] = node(&nats, "n3", &["--rules", rules]);
    wait_until(SETTLE, || {
        partition(&nodes.iter().collect::<Vec<_>>(), 200).filter(|per_node| !per_node[2].is_empty())
    })
    .expect("the restarted node owns some hosts again, each host on one node");
    assert_eq!(query_all(&nodes[2]).len(), 200);
    thread::sleep(Duration::from_secs(3));
    assert_each_once(&pager.pages(), &all);
}

#[test]
fn acked_events_survive_a_nats_restart() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut nats = Nats::start();
    let nodes: Vec<Vigil> = (1..=2)
        .map(|i| node(&nats, &format!("n{i}"), &[]))
        .collect();
    let addr = nodes[0].tcp;
    // The agent: batches of 10 new hosts, retried (on a new connection if
    // need be) until acked; it stops after a bounded time.
    let agent = thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async move {
            let (mut acked, mut errors) = (Vec::new(), 0usize);
            let mut slowest = Duration::ZERO;
            let stop = Instant::now() + Duration::from_secs(14);
            let mut client = None;
            let mut batch = 0;
            while Instant::now() < stop {
                let hosts: Vec<String> = (0..10).map(|i| format!("agent-{batch}-{i}")).collect();
                let events: Vec<Event> = hosts.iter().map(|h| event(h, "up", "ok")).collect();
                if client.is_none() {
                    client = Client::connect(addr).await.ok();
                }
                let started = Instant::now();
                let sent = match client.as_mut() {
                    Some(c) => tokio::time::timeout(Duration::from_secs(10), c.send(&events)).await,
                    None => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                slowest = slowest.max(started.elapsed());
                match sent {
                    Ok(Ok(())) => {
                        acked.extend(hosts);
                        batch += 1;
                    }
                    _ => {
                        errors += 1;
                        client = None;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acked, errors, slowest)
        })
    });
    thread::sleep(Duration::from_secs(3));
    nats.kill();
    thread::sleep(Duration::from_secs(3));
    nats.spawn();
    let (acked, errors, slowest) = agent.join().unwrap();
    println!(
        "acked {} events, {errors} errors or timeouts, slowest ack {slowest:?}",
        acked.len()
    );
    assert!(
        acked.len() > 100,
        "the agent got through before and after: {}",
        acked.len()
    );
    let missing = wait_until(SETTLE, || {
        let found: BTreeSet<String> = query_all(&nodes[1])
            .into_iter()
            .filter_map(|e| e.host)
            .collect();
        let missing: Vec<_> = acked.iter().filter(|h| !found.contains(*h)).collect();
        missing.is_empty().then_some(())
    });
    assert!(
        missing.is_some(),
        "acked events lost; node logs:\n{}\n---\n{}",
        nodes[0].logs(),
        nodes[1].logs()
    );
}

/// The `(host, service)` → metric of `events`, for comparing values.
fn metrics_by_key(events: &[Event]) -> BTreeMap<(String, String), Option<f64>> {
    events
        .iter()
        .map(|e| {
            let key = (e.host_str().to_owned(), e.service_str().to_owned());
            (key, e.metric.map(|m| m.as_f64()))
        })
        .collect()
}

#[test]
fn a_subscriber_on_one_node_sees_every_nodes_changes() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let nodes: Vec<Vigil> = (1..=3)
        .map(|i| node(&nats, &format!("n{i}"), &["--grpc", "127.0.0.1:0"]))
        .collect();
    let hosts: Vec<String> = (0..60).map(|h| format!("sub-{h}")).collect();
    let before: Vec<Event> = hosts.iter().map(|h| event(h, "cpu", "ok")).collect();
    send(&nodes[0], &before);
    let per_node = wait_settled(&nodes.iter().collect::<Vec<_>>(), 60);
    // Hosts the subscriber's node (node 2) does not own: their changes must
    // come from the other owners.
    let elsewhere: Vec<String> = per_node[0]
        .iter()
        .chain(&per_node[2])
        .map(|(host, _)| host.clone())
        .collect();

    let grpc = format!("http://{}", nodes[1].grpc.expect("gRPC on"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut stream = runtime.block_on(async {
        let mut client = VigilClient::connect(grpc).await.unwrap();
        let request = QueryRequest::new(r#"service = "cpu""#);
        client.subscribe(request).await.unwrap().into_inner()
    });
    let next = |stream: &mut tonic::Streaming<vigil::proto::PbEvent>| {
        runtime.block_on(async {
            let pb = tokio::time::timeout(SETTLE, stream.message())
                .await
                .expect("an event within the bound")
                .expect("the stream goes on")
                .expect("the stream goes on");
            vigil::proto::from_pb(pb, 0)
        })
    };
    // The snapshot: every node's entries, not only node 2's.
    let snapshot: Vec<Event> = (0..60).map(|_| next(&mut stream)).collect();
    assert_eq!(metrics_by_key(&snapshot), metrics_by_key(&before));

    // Live: new metrics for hosts other nodes own, sent through node 1, and
    // one that expires on its owner.
    let updates: Vec<Event> = elsewhere
        .iter()
        .enumerate()
        .map(|(i, h)| Event {
            metric: Some(vigil::event::Metric::Int(i as i64 + 1)),
            ..event(h, "cpu", "ok")
        })
        .collect();
    let short = Event {
        ttl: Some(1.0),
        ..event(&elsewhere[0], "cpu", "warning")
    };
    send(&nodes[0], &updates);
    send(&nodes[0], std::slice::from_ref(&short));
    let mut live = Vec::new();
    let mut expired = None;
    while expired.is_none() {
        let event = next(&mut stream);
        if event.state.as_deref() == Some("expired") {
            expired = Some(event);
        } else {
            live.push(event);
        }
    }
    let expired = expired.unwrap();
    assert_eq!(expired.host_str(), elsewhere[0]);
    assert_eq!(expired.service_str(), "cpu");
    // Each update (then the short-lived one) arrived, with its value.
    let mut want = metrics_by_key(&updates);
    want.insert((elsewhere[0].clone(), "cpu".to_owned()), None);
    assert_eq!(metrics_by_key(&live), want);
    assert_eq!(
        live.iter()
            .filter(|e| e.state.as_deref() == Some("warning"))
            .count(),
        1
    );
}

/// `/pubsub/<topic>` on a node gets what its rules `publish` of the shards
/// it owns, and its subscriber is one of the node's subscribers (in
/// `vigil_subscribers`, the feed's bounds), as a `/pubsub/index` one is.
#[test]
fn a_published_topics_subscriber_is_one_of_the_nodes_subscribers() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("publish.vigil");
    let source = "streams {\n  index\n  where service = \"disk\" { publish(alerts) }\n}\n";
    std::fs::write(&rules, source).unwrap();
    let n1 = node(&nats, "n1", &["--rules", rules.to_str().unwrap()]);
    // Live on its owner, not replayed (replays reach no subscriber).
    send(&n1, &[event("pub", "cpu", "ok")]);
    wait_partitioned(&[&n1], 1);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let address = format!(
        "ws://{}/pubsub/alerts?query=true",
        n1.http.expect("HTTP on")
    );
    let (mut ws, _) = runtime
        .block_on(tokio_tungstenite::connect_async(address.as_str()))
        .expect("websocket handshake");
    let subscribed = || (metric_of(&runtime, &n1, "vigil_subscribers") == 1).then_some(());
    wait_until(SETTLE, subscribed).expect("the topic's subscriber in vigil_subscribers");
    send(&n1, &[event("pub", "disk", "critical")]);
    let frame = runtime.block_on(async {
        loop {
            let message = tokio::time::timeout(SETTLE, ws.next())
                .await
                .expect("a frame within the bound")
                .expect("the socket stays open")
                .expect("a frame");
            if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                break serde_json::from_str::<serde_json::Value>(&text).unwrap();
            }
        }
    });
    assert_eq!(
        (&frame["host"], &frame["service"]),
        (&"pub".into(), &"disk".into())
    );
}

#[test]
fn http_events_are_acked_only_once_stored() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut nats = Nats::start();
    let node = node(&nats, "n1", &[]);
    let url = format!("http://{}/events", node.http.unwrap());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::builder().timeout(SETTLE).build().unwrap();
    let post = |host: &str| {
        let body = format!(r#"{{"host":"{host}","service":"http","metric":7,"ttl":600}}"#);
        runtime.block_on(async {
            client
                .post(&url)
                .body(body)
                .send()
                .await
                .map(|r| r.status())
        })
    };
    // Stored means processed by the owner soon after (it follows the stream).
    let stored = |host: &str| {
        wait_until(SETTLE, || {
            query_all(&node)
                .iter()
                .any(|e| e.host_str() == host && e.metric.map(|m| m.as_f64()) == Some(7.0))
                .then_some(())
        })
        .is_some()
    };

    assert_eq!(post("before").unwrap(), reqwest::StatusCode::OK);
    assert!(stored("before"), "queryable once the POST was answered");

    nats.kill();
    let refused = post("while-down").expect("an answer, not a hang");
    assert_eq!(refused, reqwest::StatusCode::SERVICE_UNAVAILABLE);
    // Once the node knows it is cut off, it says so at once: an agent that
    // retries, or fails over to another node, is not held for the 5 s of
    // JetStream's ack timeout per request.
    for i in 0..3 {
        let started = Instant::now();
        let refused = post(&format!("while-down-{i}")).expect("an answer");
        assert_eq!(refused, reqwest::StatusCode::SERVICE_UNAVAILABLE);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "refused after {took:?}");
    }
    // Counted each, warned about once: every agent's every message is
    // refused while NATS is down.
    let (_, metrics) = get(&node, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "vigil_cluster_not_stored_total 4"),
        "{metrics}"
    );
    let warned = node.logs().matches("Events not acked").count();
    assert_eq!(warned, 1, "{}", node.logs());
    // A query says why this node cannot answer, not that no node did.
    let (status, body) = http_query(&node, "true");
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body,
        serde_json::json!({
            "error": "not connected to NATS: this node cannot ask the cluster; query another node, or later"
        })
        .to_string()
    );

    nats.spawn();
    wait_until(SETTLE, || {
        (post("after").ok() == Some(reqwest::StatusCode::OK)).then_some(())
    })
    .expect("accepted again once NATS is back");
    assert!(stored("after"), "queryable once the POST was answered");
}

/// Graphite lines in a cluster are published as `POST /events` bodies are;
/// a line has no ack to refuse, so what JetStream does not store while NATS
/// is down is dropped, counted and warned of once.
#[test]
fn graphite_points_are_published_and_what_is_not_stored_is_counted_dropped() {
    use std::io::Write;
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut nats = Nats::start();
    let node = node(&nats, "n1", &["--graphite", "127.0.0.1:0"]);
    let graphite = node.graphite.expect("--graphite listening");
    let mut lines = std::net::TcpStream::connect(graphite).unwrap();
    // Points of now: an old one would be stored already expired.
    let now = common::now_secs() as u64;
    let mut send = |text: &str| {
        let text = text.replace("NOW", &now.to_string());
        lines.write_all(text.as_bytes()).unwrap();
    };
    let stored = |service: &str| {
        let found = query_all(&node)
            .into_iter()
            .find(|e| e.service_str() == service);
        found.map(|e| e.metric.map(|m| m.as_f64()))
    };
    send("clustered.before 7 NOW\n");
    let before = wait_until(SETTLE, || stored("clustered.before"));
    assert_eq!(before, Some(Some(7.0)), "stored through JetStream");

    nats.kill();
    // Sent before the node's NATS client noticed, a point is held by the
    // client and may still be stored once NATS is back (counted dropped
    // when its publish timed out): once it noticed, nothing is held.
    assert!(node.wait_for_log("event: disconnected", SETTLE));
    send("clustered.down 1 NOW\nclustered.down.too 2 NOW\n");
    let dropped = |node: &Vigil| {
        let (_, metrics) = get(node, "/metrics");
        metrics
            .lines()
            .any(|l| l == "vigil_graphite_events_dropped_total 2")
            .then_some(())
    };
    wait_until(SETTLE, || dropped(&node)).unwrap_or_else(|| {
        panic!("{}", get(&node, "/metrics").1);
    });
    let warned = node.logs().matches("Graphite points dropped").count();
    assert_eq!(warned, 1, "{}", node.logs());

    nats.spawn();
    // Sent again until the node is back: the connection itself went on.
    let after = wait_until(SETTLE, || {
        send("clustered.after 3 NOW\n");
        thread::sleep(Duration::from_millis(200));
        stored("clustered.after")
    });
    assert_eq!(after, Some(Some(3.0)), "stored again once NATS is back");
    assert_eq!(stored("clustered.down"), None);
}

#[test]
fn an_expiry_the_old_owner_paged_is_not_paged_again_after_replay() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let Paging { pager, rules, _dir } = paging(PAGE_ON_EXPIRY);
    let rules = rules.as_str();
    let mut first = node(&nats, "n1", &["--rules", rules]);
    let gone = Event {
        ttl: Some(1.0),
        ..event("gone", "disk", "ok")
    };
    send(&first, &[gone]);
    assert_eq!(pager.settle_at(1), vec!["gone".to_owned()]);
    // Still indexed when the node hands over; expires on the next owner.
    let later = Event {
        ttl: Some(10.0),
        ..event("later", "disk", "ok")
    };
    send(&first, &[later]);
    first.terminate();

    // The next owner replays both: `gone` ran out before n1's last expiry
    // pass (n1 paged it), `later` has not.
    let second = node(&nats, "n2", &["--rules", rules]);
    wait_until(SETTLE, || (local_keys(&second).len() == 1).then_some(()))
        .expect("the next owner replayed the shard");
    assert_eq!(
        local_keys(&second),
        Keys::from([("later".to_owned(), "disk".to_owned())]),
        "the expired entry is gone, quietly"
    );
    let pages = pager.settle_at(2);
    assert_each_once(
        &pages,
        &BTreeSet::from(["gone".to_owned(), "later".to_owned()]),
    );
    assert!(local_keys(&second).is_empty());
}

/// An incident stays the cluster's, not the node's: the owner that takes a
/// shard over learns from the replay which incidents the previous owner
/// opened and resolves them when their series clear, neither paging them
/// again nor taking their `ok` for one it never opened.
#[test]
fn an_incident_opened_before_a_handover_is_resolved_by_the_next_owner() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let Paging { pager, rules, _dir } = paging_through("paging_webhook", "changed_state { pager }");
    let rules = rules.as_str();

    let mut first = node(&nats, "n1", &["--rules", rules]);
    send(&first, &[event("web", "disk", "critical")]);
    assert_eq!(pager.settle_at(1), ["trigger web"]);
    first.terminate();

    let second = node(&nats, "n2", &["--rules", rules]);
    wait_until(SETTLE, || (local_keys(&second).len() == 1).then_some(()))
        .expect("the next owner replayed the shard");
    send(&second, &[event("web", "disk", "critical")]);
    send(&second, &[event("web", "disk", "ok")]);
    assert_eq!(pager.settle_at(2), ["trigger web", "resolve web"]);
}

/// A pager whose `dedup_key` does not name `{host}` gathers several hosts'
/// series into one incident, which in a cluster each node knows only its
/// own hosts' part of: the node says so as it starts, naming that pager
/// and not one keyed by host.
#[test]
fn a_pager_whose_incidents_span_hosts_is_warned_of_in_a_cluster() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pagers.vigil");
    let source = r#"output by_service = paging_webhook(url: "http://127.0.0.1:9/", dedup_key: "{service}")
output by_host = paging_webhook(url: "http://127.0.0.1:9/", dedup_key: "{host} {service}")

streams {
  changed_state { by_service by_host }
}
"#;
    std::fs::write(&path, source).unwrap();
    let n1 = node(&nats, "n1", &["--rules", path.to_str().unwrap()]);
    let warned = n1.log_line("does not name {host}");
    assert!(warned.contains("by_service"), "{warned}");
    let warnings = n1.logs().matches("does not name {host}").count();
    assert_eq!(warnings, 1, "the pager keyed by host is not warned of");
}

/// A NATS outage longer than the lease TTL fences every node, and the
/// agents cannot store anything meanwhile either. When NATS is back, the
/// series whose TTL ran out during it live one TTL from then, as after a
/// single node's restart: those that report again do not page; one that
/// stays silent still pages, once, and resolves when it reports.
#[test]
fn series_silent_only_while_nats_was_down_do_not_page() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut nats = Nats::start();
    let Paging { pager, rules, _dir } = paging_through("paging_webhook", "changed_state { pager }");
    let quick = ["--cluster-lease-ttl", "3s", "--cluster-renew", "1s"];
    let node = node(
        &nats,
        "n1",
        &[&["--rules", rules.as_str()][..], &quick].concat(),
    );
    let hosts: Vec<String> = (0..10).map(|i| format!("h{i}")).collect();
    let ok = |hosts: &[String], ttl: f32| ok_with_ttl(hosts, "disk", ttl);
    send(&node, &ok(&hosts, 6.0));
    wait_until(SETTLE, || (local_keys(&node).len() == 10).then_some(()))
        .expect("the node runs the hosts");

    nats.kill();
    // Past the lease deadline (the node forgets its shards) and every TTL.
    thread::sleep(Duration::from_secs(10));
    nats.spawn();
    wait_until(SETTLE, || (local_keys(&node).len() == 10).then_some(())).unwrap_or_else(|| {
        panic!(
            "the node never held the replayed hosts; pages: {:?}",
            pager.pages()
        )
    });
    send(&node, &ok(&hosts[..9], 600.0));
    assert_eq!(
        pager.settle_at(1),
        ["trigger h9"],
        "only the host still silent a TTL after NATS came back pages; node log:\n{}",
        node.logs()
    );
    send(&node, &ok(&hosts[9..], 600.0));
    assert_eq!(pager.settle_at(2), ["trigger h9", "resolve h9"]);
}

/// A shard handed over after its owner gave its entries grace (a NATS
/// outage): the next owner must not take the graced entries for expired and
/// reported, which the stream says they are by their deadlines. A host
/// silent since before the outage is paged once, by the next owner, a TTL
/// after NATS came back, and resolved once; nobody else pages.
#[test]
fn a_shard_handed_over_after_an_outage_still_pages_its_silent_host() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut nats = Nats::start();
    let Paging { pager, rules, _dir } = paging_through("paging_webhook", "changed_state { pager }");
    let flags = [
        "--rules",
        rules.as_str(),
        "--shards",
        "2",
        "--cluster-lease-ttl",
        "3s",
        "--cluster-renew",
        "1s",
    ];
    let first = node(&nats, "m1", &flags);
    // Hosts of shard 1, which the first node hands to a second one joining.
    let hosts: Vec<String> = (0..200)
        .map(|i| format!("r{i}"))
        .filter(|host| vigil::cluster::shard_of(host, 2) == 1)
        .take(5)
        .collect();
    let ok = |hosts: &[String], ttl: f32| ok_with_ttl(hosts, "status", ttl);
    send(&first, &ok(&hosts, 10.0));
    wait_until(SETTLE, || (local_keys(&first).len() == 5).then_some(()))
        .expect("the first node runs the hosts");

    nats.kill();
    thread::sleep(Duration::from_secs(12));
    nats.spawn();
    wait_until(SETTLE, || (local_keys(&first).len() == 5).then_some(()))
        .expect("the first node took its shards again and replayed them");
    // The first four report again; the last stays silent, and is handed
    // over (well) within its TTL of grace.
    send(&first, &ok(&hosts[..4], 600.0));
    let second = node(&nats, "m2", &flags);
    wait_until(SETTLE, || (local_keys(&second).len() >= 4).then_some(()))
        .expect("the second node took shard 1 over");
    let silent = &hosts[4];
    assert_eq!(
        pager.settle_at(1),
        [format!("trigger {silent}")],
        "logs:\n{}\n---\n{}",
        first.logs(),
        second.logs()
    );
    send(&second, &ok(&hosts[4..], 600.0));
    assert_eq!(
        pager.settle_at(2),
        [format!("trigger {silent}"), format!("resolve {silent}")]
    );
}

/// A page its node could not deliver (the receiver was down) is not lost
/// with the node: its saved progress stopped before the event or the expiry
/// that made it, so the shard's next owner runs that again live and pages
/// it once the receiver is back. After a `kill -9`, and after a SIGTERM
/// whose last attempts failed too.
#[test]
fn a_page_undelivered_when_its_node_stops_is_sent_by_the_next_owner() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let streams = r#"where state = "critical" or state = "expired" { pager }"#;
    let Paging { pager, rules, _dir } = paging_through("paging_webhook", streams);
    let rules = rules.as_str();

    pager.fail(true);
    let mut first = node(&nats, "n1", &["--rules", rules]);
    let gone = Event {
        ttl: Some(1.0),
        ..event("gone", "disk", "ok")
    };
    send(&first, &[event("web", "disk", "critical"), gone]);
    pager.wait_refused(1);
    wait_until(SETTLE, || {
        (local_keys(&first) == Keys::from([("web".to_owned(), "disk".to_owned())])).then_some(())
    })
    .expect("`gone` expired on the first node");
    // Long enough for a renew round to save progress past both.
    thread::sleep(Duration::from_secs(3));
    first.kill9();
    pager.fail(false);
    let second = node(&nats, "n2", &["--rules", rules]);
    let mut pages = pager.settle_at(2);
    pages.sort();
    assert_eq!(pages, ["trigger gone", "trigger web"]);

    pager.fail(true);
    let mut second = second;
    send(&second, &[event("db", "disk", "critical")]);
    let refused = pager.refused.load(Ordering::Acquire);
    pager.wait_refused(refused + 1);
    second.terminate();
    pager.fail(false);
    let _third = node(&nats, "n3", &["--rules", rules]);
    let pages = pager.settle_at(3);
    assert_eq!(pages[2..], ["trigger db"], "{pages:?}");
}

/// A shard handed to a joining node while its page could not be delivered:
/// the new owner makes the page again and sends it, in order with what it
/// pages next, and the node that made it drops it. Were both to send it once
/// the receiver was back, the first node's trigger could land after the new
/// owner's resolve and leave the incident open.
#[test]
fn a_page_undelivered_when_its_shard_moves_is_sent_once_by_the_new_owner() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let streams = r#"where state = "critical" or state = "ok" { pager }"#;
    let Paging { pager, rules, _dir } = paging_through("paging_webhook", streams);
    let rules = rules.as_str();
    // A node that joins a single one takes its upper half of the 64 shards.
    let host = (0..)
        .map(|i| format!("web-{i}"))
        .find(|host| vigil::cluster::shard_of(host, 64) >= 32)
        .unwrap();

    pager.fail(true);
    let first = node(&nats, "n1", &["--rules", rules]);
    send(&first, &[event(&host, "disk", "critical")]);
    pager.wait_refused(1);
    let second = node(&nats, "n2", &["--rules", rules]);
    wait_until(SETTLE, || {
        local_keys(&second)
            .contains(&(host.clone(), "disk".to_owned()))
            .then_some(())
    })
    .expect("the joining node took the host's shard over");
    send(&second, &[event(&host, "disk", "ok")]);
    pager.fail(false);
    assert!(
        first.wait_for_log("its shard moved to another node", SETTLE),
        "the first node skipped its page at its next attempt"
    );
    let pages = pager.settle_at(2);
    assert_eq!(
        pages,
        [format!("trigger {host}"), format!("resolve {host}")]
    );
}

/// A receiver that holds the first request it gets open, never answering
/// it, and answers every later one `200`; it logs what it sees in order:
/// each page as its action and host (the held one marked so), and `closed`
/// once the held request's client hung up.
#[derive(Clone, Default)]
struct Holding {
    seen: Arc<Mutex<Vec<String>>>,
}

impl Holding {
    fn start() -> (Holding, String) {
        let holding = Holding::default();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/page", listener.local_addr().unwrap());
        let seen = holding.seen.clone();
        thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let mut first = true;
                while let Ok((conn, _)) = listener.accept().await {
                    tokio::spawn(Holding::serve(conn, seen.clone(), first));
                    first = false;
                }
            });
        });
        (holding, url)
    }

    /// One request per connection: `Connection: close` on each answer.
    async fn serve(mut conn: tokio::net::TcpStream, seen: Arc<Mutex<Vec<String>>>, hold: bool) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        let body = loop {
            let Ok(n @ 1..) = conn.read(&mut buf).await else {
                return;
            };
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request).into_owned();
            let Some(end) = text.find("\r\n\r\n") else {
                continue;
            };
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                break request[end + 4..end + 4 + length].to_vec();
            }
        };
        let post: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let page = format!(
            "{} {}",
            post["action"].as_str().unwrap_or("?"),
            post["event"]["host"].as_str().unwrap_or("?")
        );
        if hold {
            seen.lock().unwrap().push(format!("{page} (held)"));
            while let Ok(1..) = conn.read(&mut buf).await {}
            seen.lock().unwrap().push("closed".to_owned());
            return;
        }
        seen.lock().unwrap().push(page);
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        let _ = conn.write_all(answer).await;
        let _ = conn.shutdown().await;
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    fn wait_seen(&self, n: usize) -> Vec<String> {
        wait_until(SETTLE, || (self.seen().len() >= n).then_some(()))
            .unwrap_or_else(|| panic!("only {:?} of {n} seen", self.seen()));
        thread::sleep(Duration::from_secs(3));
        self.seen()
    }
}

/// A host whose shard a node joining a single one takes (its upper half of
/// the 64 shards), or (`upper` false) leaves it.
fn host_in_half(upper: bool) -> String {
    (0..)
        .map(|i| format!("web-{i}"))
        .find(|host| (vigil::cluster::shard_of(host, 64) >= 32) == upper)
        .unwrap()
}

/// The old owner's trigger in flight when its shard is handed back (a node
/// joins and takes it; the owner gets a SIGTERM) is cut, its connection
/// closed, before the new owner's pages reach the receiver: the new owner,
/// whose replay starts before that trigger's event, triggers and then
/// resolves, and nothing of the old owner's lands after its resolve. The
/// series turns `ok` on the old owner while its trigger is held, so the
/// new owner pages as soon as it can.
#[test]
fn a_trigger_in_flight_when_its_shard_is_handed_back_is_cut_before_the_new_owners_pages() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for sigterm in [false, true] {
        let nats = Nats::start();
        let (receiver, url) = Holding::start();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paging.vigil");
        let source = format!(
            "output pager = paging_webhook(url: \"{url}\")\n\nstreams {{\n  index\n  \
             where state = \"critical\" or state = \"ok\" {{ pager }}\n}}\n"
        );
        std::fs::write(&path, source).unwrap();
        let rules = path.to_str().unwrap();
        // Joining, the second node takes this host; or leaves it to the
        // first, until that one gets a SIGTERM.
        let host = host_in_half(!sigterm);
        let mut first = node(&nats, "n1", &["--rules", rules]);
        send(&first, &[event(&host, "disk", "critical")]);
        receiver.wait_seen(1);
        send(&first, &[event(&host, "disk", "ok")]);
        wait_until(SETTLE, || {
            let ok = query_all(&first)
                .iter()
                .any(|e| e.state.as_deref() == Some("ok"));
            ok.then_some(())
        })
        .expect("the old owner ran the ok");
        let second = node(&nats, "n2", &["--rules", rules]);
        if sigterm {
            assert!(second.wait_for_log("Took shards over", SETTLE));
            first.terminate();
        }
        let seen = receiver.wait_seen(4);
        assert_eq!(
            seen,
            [
                format!("trigger {host} (held)"),
                "closed".to_owned(),
                format!("trigger {host}"),
                format!("resolve {host}"),
            ],
            "sigterm: {sigterm}"
        );
        assert!(
            first.logs().contains("Attempt cut in flight"),
            "sigterm: {sigterm}"
        );
        drop(second);
    }
}

fn signal(node: &Vigil, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(node.pid()).unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

#[test]
fn a_paused_node_does_not_page_for_shards_taken_over_meanwhile() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let Paging { pager, rules, _dir } = paging(PAGE_ON_CRITICAL);
    let rules = rules.as_str();
    let nodes: Vec<Vigil> = (1..=2)
        .map(|i| node(&nats, &format!("n{i}"), &["--rules", rules]))
        .collect();
    let hosts: BTreeSet<String> = (0..60).map(|h| format!("app-{h}")).collect();
    let (ok, critical) = turn_critical(&hosts);
    send(&nodes[0], &ok);
    wait_until(SETTLE, || {
        partition(&nodes.iter().collect::<Vec<_>>(), 60)
            .filter(|per_node| per_node.iter().all(|keys| !keys.is_empty()))
    })
    .expect("both nodes own some hosts");

    // Node 2 stops (as if cut off) for longer than the lease TTL: node 1
    // takes its shards, and the hosts turn critical there.
    signal(&nodes[1], libc::SIGSTOP);
    wait_until(SETTLE, || (local_keys(&nodes[0]).len() == 60).then_some(()))
        .expect("node 1 took the paused node's shards over");
    send(&nodes[0], &critical);
    assert_each_once(&pager.settle_at(60), &hosts);

    // Node 2 resumes with the critical events for its old shards delivered
    // but its lease deadline long gone: it must not run them.
    signal(&nodes[1], libc::SIGCONT);
    wait_until(SETTLE, || {
        partition(&nodes.iter().collect::<Vec<_>>(), 60)
            .filter(|per_node| per_node.iter().all(|keys| !keys.is_empty()))
    })
    .expect("node 2 rejoined and owns some hosts again");
    thread::sleep(Duration::from_secs(3));
    assert_each_once(&pager.pages(), &hosts);
}

/// One `Msg` of one host's events, over NATS's 1 MiB payload, is stored
/// whole and answered whole: it goes to JetStream, and a node's answer to
/// the query comes back, in parts. One event over it alone is refused
/// with the reason, and the node's NATS connection (which NATS would close on
/// such a message) goes on serving.
#[test]
fn a_msg_over_the_nats_payload_limit_is_stored_and_answered_in_parts() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let node = node(&nats, "n1", &[]);
    // 10 MB: in parts to JetStream, and the query's answer too (1 000
    // events of it used to be one 2 MB part, which NATS refused).
    let events: Vec<Event> = (0..5_000)
        .map(|i| Event {
            description: Some("d".repeat(2_000)),
            ..event("one-host", &format!("service {i}"), "ok")
        })
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = Client::connect(node.tcp).await.unwrap();
        client.send(&events).await.expect("the whole Msg acked");
        let huge = Event {
            description: Some("d".repeat(1024 * 1024)),
            attributes: vec![("a".into(), "v".repeat(1024))],
            ..event("one-host", "huge", "ok")
        };
        let refused = client.send(&[huge]).await.unwrap_err().to_string();
        assert!(
            refused.contains("event 0 takes 1049")
                && refused.contains("over the cluster's NATS max_payload of 1048576 bytes"),
            "{refused}"
        );
        let after = event("one-host", "after", "ok");
        client.send(&[after]).await.expect("acked");
    });
    let stored = wait_until(SETTLE, || {
        let count = query_all(&node).len();
        (count == events.len() + 1).then_some(count)
    });
    assert_eq!(stored, Some(events.len() + 1));
}

/// Two shard counts would put one host in a shard on each side, owned by
/// two nodes that would both page for it.
#[test]
fn a_node_with_another_shard_count_is_refused_and_says_why() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let first = node(&nats, "n1", &["--shards", "8"]);
    assert!(
        first.wait_for_log("Took shards", SETTLE),
        "n1 never took its shards:\n{}",
        first.logs()
    );
    let url = nats.url();
    let args = ["--cluster", &url, "--node-id", "n2", "--shards", "16"];
    let (code, stderr) = common::run_refused(&args, SETTLE);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "node n1 runs with --shards 8, this node with --shards 16: \
             every node of a cluster must use the same"
        ),
        "{stderr}"
    );
    let same = node(&nats, "n3", &["--shards", "8"]);
    assert!(
        same.wait_for_log("Took shards", SETTLE),
        "the same shard count joins:\n{}",
        same.logs()
    );
}

/// A copy of a unit file runs a second process with a live node's id: the
/// two would skip each other's query questions (a node answers its own part
/// itself) and both run the shards their leases name. The second is
/// refused once it saw the first renew its heartbeat; the first runs on.
#[test]
fn a_node_with_a_live_nodes_id_is_refused_and_says_why() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let mut first = node(&nats, "n1", &[]);
    assert!(
        first.wait_for_log("Took shards", SETTLE),
        "n1 never took its shards:\n{}",
        first.logs()
    );
    let url = nats.url();
    let (code, stderr) = common::run_refused(&["--cluster", &url, "--node-id", "n1"], SETTLE);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("another vigil process runs with --node-id n1"),
        "{stderr}"
    );
    first.assert_alive();
    let hosts: Vec<String> = (0..20).map(|h| format!("host-{h}")).collect();
    send(&first, &ok_with_ttl(&hosts, "cpu", 600.0));
    assert_eq!(query_all(&first).len(), 20);
    // A crash leaves a heartbeat nobody renews: a restart waits it out.
    first.kill9();
    let again = node(&nats, "n1", &[]);
    assert!(
        again.wait_for_log("Took shards", SETTLE),
        "n1 restarted after a crash never took its shards:\n{}",
        again.logs()
    );
}

#[test]
fn of_two_processes_started_at_once_with_one_id_one_is_refused() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let url = nats.url();
    // Spawned together, not one after the other's `listening`: both check
    // for a heartbeat of n1 before either has written one.
    let start = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_vigil"));
        command
            .args(["run", "--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .args(["--no-snapshot", "--cluster", &url, "--node-id", "n1"])
            .env("RUST_BACKTRACE", "0");
        common::Logging::spawn(command)
    };
    let mut both = [start(), start()];
    let refusal = "another vigil process runs with --node-id n1";
    let refused = wait_until(SETTLE, || {
        (0..2).find(|&i| both[i].wait_for(refusal, Duration::from_millis(50)))
    });
    let Some(refused) = refused else {
        panic!("both ran:\n{}\n---\n{}", both[0].seen, both[1].seen);
    };
    let code = wait_until(SETTLE, || both[refused].child.try_wait().unwrap());
    assert_eq!(code.and_then(|c| c.code()), Some(1));
    let kept = &mut both[1 - refused];
    assert!(kept.wait_for("Took shards", SETTLE), "{}", kept.seen);
    assert_eq!(kept.child.try_wait().unwrap(), None, "{}", kept.seen);
}

#[test]
fn a_restart_started_while_the_old_process_drains_waits_for_it() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let mut old = node(&nats, "n1", &[]);
    assert!(
        old.wait_for_log("Took shards", SETTLE),
        "n1 never took its shards:\n{}",
        old.logs()
    );
    // A client halfway through a message: the old process drains, then
    // hands its shards back and deletes its heartbeat, which the new waits for.
    let mut client = std::net::TcpStream::connect(old.tcp).unwrap();
    std::io::Write::write_all(&mut client, &[0, 0, 0, 100, 1, 2]).unwrap();
    old.signal("TERM");
    assert!(
        old.wait_for_log("Shutting down", SETTLE),
        "n1 never began shutting down:\n{}",
        old.logs()
    );
    let new = node(&nats, "n1", &[]);
    assert!(
        new.wait_for_log("Took shards", SETTLE),
        "the restarted n1 never took its shards:\n{}",
        new.logs()
    );
    assert!(old.wait_for_exit(SETTLE).success(), "{}", old.logs());
}

/// The heartbeat of `node` in `vigil_nodes`: its value, or `None` once
/// deleted or lapsed.
fn heartbeat_of(nats: &Nats, node: &str) -> Option<String> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let js = async_nats::jetstream::new(peer(nats).await);
        let nodes = js.get_key_value("vigil_nodes").await.unwrap();
        let entry = nodes.entry(node).await.unwrap()?;
        let put = entry.operation == async_nats::jetstream::kv::Operation::Put;
        put.then(|| from_utf8(&entry.value).to_owned())
    })
}

/// A process taken for dead (paused past the TTL; here its heartbeat is
/// deleted as the lapse would) sees another process take its id over: its
/// shutdown leaves the new one's heartbeat. It deleted it, whatever it held,
/// and the cluster counted the new process out until its next renewal.
/// Renewals a minute apart: neither writes its heartbeat again meanwhile.
#[test]
fn a_process_whose_id_was_taken_over_leaves_the_new_ones_heartbeat_when_it_stops() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let slow = ["--cluster-lease-ttl", "90s", "--cluster-renew", "60s"];
    let mut old = node(&nats, "n1", &slow);
    assert!(
        old.wait_for_log("Took shards", SETTLE),
        "n1 never took its shards:\n{}",
        old.logs()
    );
    let olds = heartbeat_of(&nats, "n1").expect("n1's heartbeat");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let js = async_nats::jetstream::new(peer(&nats).await);
        let nodes = js.get_key_value("vigil_nodes").await.unwrap();
        nodes.delete("n1").await.unwrap();
    });
    let mut new = node(&nats, "n1", &slow);
    let news = heartbeat_of(&nats, "n1").expect("the new n1's heartbeat");
    assert_ne!(news, olds, "another process, another nonce");
    assert!(old.terminate().success(), "{}", old.logs());
    let left = old.log_line("The heartbeat of this node id is another process's now");
    assert!(left.contains(&news["64 ".len()..]), "{left}");
    assert_eq!(heartbeat_of(&nats, "n1"), Some(news));
    new.assert_alive();
}

/// A process taken for dead (paused or cut off past the TTL) whose id
/// another process took meanwhile steps down at its next renewal, an
/// update at the revision it last wrote: it leaves the other's heartbeat
/// (here written by hand, as the other's `create` after the lapse would),
/// hands its shards back and exits, status 1, naming both processes, as one
/// refused at start does. Its renewal was a plain `put`: it wrote its nonce
/// over the other's and ran on beside it under the same id.
#[test]
fn a_process_whose_heartbeat_another_took_steps_down_and_exits() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let mut old = node(&nats, "n1", &["--cluster-renew", "500ms"]);
    assert!(
        old.wait_for_log("Took shards", SETTLE),
        "n1 never took its shards:\n{}",
        old.logs()
    );
    let theirs = "64 00000000deadbeef";
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let leases = runtime.block_on(async {
        let js = async_nats::jetstream::new(peer(&nats).await);
        let nodes = js.get_key_value("vigil_nodes").await.unwrap();
        nodes.put("n1", theirs.into()).await.unwrap();
        js.get_key_value("vigil_leases").await.unwrap()
    });
    let seen = wait_until(SETTLE, || {
        let now = heartbeat_of(&nats, "n1");
        let stepped = old.logs().contains("Stepped down");
        (stepped || now.as_deref() != Some(theirs)).then_some(now)
    });
    assert_eq!(seen, Some(Some(theirs.to_owned())), "{}", old.logs());
    let status = old.wait_for_exit(SETTLE);
    assert_eq!(status.code(), Some(1), "{}", old.logs());
    let why = old.log_line("another vigil process runs with --node-id n1");
    assert!(
        why.contains("rewritten by instance 00000000deadbeef"),
        "{why}"
    );
    let held: Vec<String> = runtime.block_on(async {
        let keys = leases.keys().await.unwrap();
        keys.try_collect().await.unwrap()
    });
    assert_eq!(held, Vec::<String>::new(), "its leases handed back");
    assert_eq!(heartbeat_of(&nats, "n1").as_deref(), Some(theirs));
}

#[test]
fn a_nats_that_does_not_answer_is_named_with_the_reason() {
    // Bound and released: nothing listens there now.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let (code, stderr) = common::run_refused(&["--cluster", &url, "--node-id", "n1"], SETTLE);
    assert_eq!(code, Some(1), "{stderr}");
    // Not a JetStream request timing out later, which named neither.
    assert!(
        stderr.contains(&format!("connecting to NATS at {url}: "))
            && stderr.contains("Connection refused"),
        "{stderr}"
    );
}

/// The events stream is the cluster's: a node's own `--cluster-retention`
/// changes it for every node, and must say so.
#[test]
fn a_node_that_changes_the_clusters_retention_says_so() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let first = node(&nats, "n1", &[]);
    assert!(!first.logs().contains("--cluster-retention differs"));
    let second = node(&nats, "n2", &["--cluster-retention", "20m"]);
    let warned = second
        .logs()
        .lines()
        .find(|line| line.contains("--cluster-retention differs"))
        .map(str::to_owned);
    let warned = warned.unwrap_or_else(|| panic!("no warning:\n{}", second.logs()));
    assert!(
        warned.contains(r#""from":"3600s""#) && warned.contains(r#""to":"1200s""#),
        "{warned}"
    );
}

/// The `max_age` of the stream of the KV bucket `bucket`.
fn bucket_ttl(nats: &Nats, bucket: &str) -> Duration {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let js = async_nats::jetstream::new(peer(nats).await);
        let mut stream = js.get_stream(format!("KV_{bucket}")).await.unwrap();
        stream.info().await.unwrap().config.max_age
    })
}

/// The server lets a lease or heartbeat lapse at its bucket's TTL, which
/// the first node made. A node with a longer `--cluster-lease-ttl` counts
/// its fence from its own: under a shorter bucket TTL its lease lapsed, and
/// another node took the shard, while it still ran it. So a longer TTL
/// raises the buckets' for every node, and a shorter one leaves it (its own
/// fence then passes first), each saying so.
#[test]
fn a_longer_lease_ttl_raises_the_buckets_and_a_shorter_one_keeps_them() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let first = node(
        &nats,
        "n1",
        &["--cluster-lease-ttl", "3s", "--cluster-renew", "1s"],
    );
    assert_eq!(bucket_ttl(&nats, "vigil_leases"), Duration::from_secs(3));
    assert!(
        !first.logs().contains("--cluster-lease-ttl"),
        "{}",
        first.logs()
    );
    let second = node(&nats, "n2", &["--cluster-lease-ttl", "9s"]);
    for bucket in ["vigil_nodes", "vigil_leases"] {
        assert_eq!(
            bucket_ttl(&nats, bucket),
            Duration::from_secs(9),
            "{bucket}"
        );
    }
    assert_eq!(bucket_ttl(&nats, "vigil_progress"), Duration::ZERO);
    let raised = second.log_line("--cluster-lease-ttl is longer");
    assert!(
        raised.contains(r#""from":"3s""#) && raised.contains(r#""to":"9s""#),
        "{raised}"
    );
    let third = node(&nats, "n3", &["--cluster-lease-ttl", "6s"]);
    for bucket in ["vigil_nodes", "vigil_leases"] {
        assert_eq!(
            bucket_ttl(&nats, bucket),
            Duration::from_secs(9),
            "{bucket}"
        );
    }
    let kept = third.log_line("--cluster-lease-ttl is shorter");
    assert!(
        kept.contains(r#""buckets":"9s""#) && kept.contains(r#""ours":"6s""#),
        "{kept}"
    );
}

/// Two nodes started at once raising the buckets' TTL, to different
/// values, race, and the shorter may land last (as may an edit by hand):
/// the node with the longer TTL raises it back at its next round.
#[test]
fn a_bucket_ttl_lowered_under_a_nodes_lease_ttl_is_raised_again() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let node = node(&nats, "n1", &["--cluster-lease-ttl", "9s"]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let js = async_nats::jetstream::new(peer(&nats).await);
        let mut stream = js.get_stream("KV_vigil_leases").await.unwrap();
        let mut config = stream.info().await.unwrap().config.clone();
        config.max_age = Duration::from_secs(3);
        // The server refuses one longer than the TTL.
        config.duplicate_window = config.max_age;
        js.update_stream(config).await.unwrap();
    });
    // The node's next round may raise it before it can be read back here:
    // its warning, which only a lowered TTL makes, says it saw the 3 s.
    assert!(
        node.wait_for_log(r#""from":"3s","to":"9s""#, SETTLE),
        "{}",
        node.logs()
    );
    assert_eq!(bucket_ttl(&nats, "vigil_leases"), Duration::from_secs(9));
}

/// `GET /health` and `/metrics` of `node`: status and body.
fn get(node: &Vigil, path: &str) -> (u16, String) {
    let url = format!("http://{}{path}", node.http.expect("HTTP on"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let answer = reqwest::get(&url).await.unwrap();
        (answer.status().as_u16(), answer.text().await.unwrap())
    })
}

/// A node cut off from NATS can store nothing it takes in: `/health` says
/// so (a load balancer then sends elsewhere), and the metrics say what the
/// node holds of the cluster.
#[test]
fn a_node_reports_its_part_in_the_cluster_and_is_unhealthy_while_cut_off() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut nats = Nats::start();
    let node = node(&nats, "n1", &["--shards", "8"]);
    let health = wait_until(SETTLE, || {
        let (status, body) = get(&node, "/health");
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        (status == 200 && health["cluster"]["shards_owned"] == 8).then_some(health)
    })
    .unwrap_or_else(|| panic!("never owned its 8 shards: {:?}", get(&node, "/health")));
    assert_eq!(health["status"], "ok");
    assert_eq!(health["cluster"]["connected"], true);
    assert_eq!(health["cluster"]["members"], 1);
    let (_, metrics) = get(&node, "/metrics");
    for line in [
        "vigil_cluster_connected 1",
        "vigil_cluster_members 1",
        "vigil_cluster_shards_owned 8",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    nats.kill();
    let cut_off = wait_until(SETTLE, || {
        let (status, body) = get(&node, "/health");
        (status == 503).then_some(body)
    })
    .expect("503 once NATS is gone");
    let health: serde_json::Value = serde_json::from_str(&cut_off).unwrap();
    assert_eq!(health["status"], "unavailable");
    assert_eq!(health["cluster"]["connected"], false);
    let (_, metrics) = get(&node, "/metrics");
    assert!(
        metrics.lines().any(|l| l == "vigil_cluster_connected 0"),
        "{metrics}"
    );
}

/// A TCP relay to `upstream` that holds what passes each way for `delay`:
/// a NATS server far away. Returns its port.
fn far_link(runtime: &tokio::runtime::Runtime, upstream: u16, delay: Duration) -> u16 {
    let listener = (runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))).unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(async move {
        while let Ok((near, _)) = listener.accept().await {
            let Ok(far) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                continue;
            };
            let ((near_in, near_out), (far_in, far_out)) = (near.into_split(), far.into_split());
            tokio::spawn(delayed(near_in, far_out, delay));
            tokio::spawn(delayed(far_in, near_out, delay));
        }
    });
    port
}

/// Copies `from` to `to`, each chunk `delay` after it was read.
async fn delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (chunks, mut due) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((read_at, chunk)) = due.recv().await {
            tokio::time::sleep_until(read_at + delay).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut buffer = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buffer).await {
        if chunks
            .send((tokio::time::Instant::now(), buffer[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(chunks);
    let _ = writer.await;
}

/// Taking shards over costs round trips to NATS. Taken one by one, 64 of
/// them over a 300 ms round trip took longer than a lease lives: the first
/// leases lapsed before the round that took the last could renew them, and
/// the node never held its shards.
#[test]
fn a_node_far_from_nats_takes_its_shards_and_keeps_them() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let nats = Nats::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let port = far_link(&runtime, nats.port, Duration::from_millis(150));
    let url = format!("nats://127.0.0.1:{port}");
    let node = Vigil::start(&["--cluster", &url, "--node-id", "far"]);
    let owned = || {
        let (_, body) = get(&node, "/health");
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        health["cluster"]["shards_owned"].as_u64()
    };
    wait_until(SETTLE, || (owned() == Some(64)).then_some(()))
        .unwrap_or_else(|| panic!("owns {:?} of 64 shards:\n{}", owned(), node.logs()));
    // And keeps them, round after round.
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(500));
        assert_eq!(owned(), Some(64), "{}", node.logs());
    }
    assert!(
        !node.logs().contains("Lease deadline passed"),
        "{}",
        node.logs()
    );
}
