//! The built-in dashboard (`GET /`) in a real browser: Debian's Chromium,
//! headless, driven by playwright-core from `tests/browser/dashboard.mjs`.
//!
//! The test starts the real binary, sends events with the real
//! `riemann-client`, and runs the node script (with a hard timeout) against
//! the page. The two coordinate through files in a temporary directory: the
//! script writes `ready-<step>` once the page is in place, this test sends
//! the step's events and writes `sent-<step>`. Steps: the initial grid (sent
//! before the browser starts), `change` (one cell ok → critical, via
//! riemann-client) and `bulk` (10 000 entries in batches over one Riemann TCP
//! connection). Screenshots land in `target/test-artifacts/`.
//!
//! Chromium, node and riemann-client missing fail the test (scripts/test
//! installs them); playwright-core is installed into `tests/browser` by
//! `npm ci` when its `node_modules` is missing.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use common::*;
use vigil::clock::{Clock, SystemClock};
use vigil::event::{Event, Metric};

/// The whole browser run (launch, three steps, 10 000 entries, screenshots).
const NODE_TIMEOUT: Duration = Duration::from_secs(240);
/// `npm ci` of playwright-core (one package, no browser download).
const NPM_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the handshake waits for the script to reach a step.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Time to live for every event sent: none may expire during the test.
const TTL: &str = "3600";

const BULK_HOSTS: usize = 100;
const BULK_SERVICES: usize = 100;
const BULK_BATCH: usize = 500;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn browser_dir() -> PathBuf {
    manifest_dir().join("tests/browser")
}

fn artifact_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target"))
        .join("test-artifacts")
}

/// Installs playwright-core into tests/browser unless it is there already.
/// Serialised within this process by a mutex and across processes by an
/// flock, so parallel runners never run two `npm ci` in one directory.
fn ensure_playwright() {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = browser_dir();
    let installed = || {
        dir.join("node_modules/playwright-core/package.json")
            .is_file()
    };
    if installed() {
        return;
    }
    let lock_path = artifact_dir().join("npm-install.lock");
    fs::create_dir_all(lock_path.parent().unwrap()).expect("create the artifact directory");
    let lock = fs::File::create(&lock_path).expect("create the npm lock file");
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {}", lock_path.display());
    }
    if installed() {
        return; // another process installed it meanwhile
    }
    let npm = require_peer("npm");
    let mut cmd = Command::new(npm);
    cmd.args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir);
    let out = run_command(cmd, NPM_TIMEOUT);
    expect_success("npm ci in tests/browser", &out);
    assert!(
        installed(),
        "npm ci did not install playwright-core\n{}",
        show(&out)
    );
    // The lock is released when `lock` is dropped.
}

/// `riemann-client send -T` one event; asserts success.
fn c_send(v: &Vigil, host: &str, service: &str, state: &str, metric: f64, extra: &[&str]) {
    let (ip, port) = (v.host_str(), v.port_str());
    let metric = metric.to_string();
    let mut args = vec![
        "send", "-T", "-h", host, "-S", service, "-s", state, "-d", &metric, "-L", TTL,
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[&ip, &port]);
    let out = run_cmd("riemann-client", &args, CMD_TIMEOUT);
    expect_success(&format!("riemann-client {args:?}"), &out);
}

/// Host `r`, service `c` of the bulk load, with a deterministic mix of states
/// and metrics.
fn bulk_event(r: usize, c: usize, now: i64) -> Event {
    let i = (r * BULK_SERVICES + c) as u64;
    // A multiplicative hash, so states and metrics look scattered.
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    let state = match h % 100 {
        0..=3 => "critical",
        4..=13 => "warning",
        14 => "unknown",
        _ => "ok",
    };
    Event {
        host: Some(format!("node-{r:03}")),
        service: Some(format!("svc-{c:03}")),
        state: Some(state.into()),
        metric: Some(Metric::Float(((h >> 8) % 1000) as f64 / 10.0)),
        time: now,
        ttl: Some(3600.0),
        tags: vec!["bulk".into()],
        ..Event::default()
    }
}

/// 10 000 events over one TCP connection, in acknowledged batches.
fn send_bulk(v: &Vigil) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let addr = v.tcp;
    rt.block_on(async move {
        let mut client = vigil::client::Client::connect(addr)
            .await
            .expect("connect for the bulk load");
        let now = SystemClock.now();
        let events: Vec<Event> = (0..BULK_HOSTS)
            .flat_map(|r| (0..BULK_SERVICES).map(move |c| (r, c)))
            .map(|(r, c)| bulk_event(r, c, now))
            .collect();
        for batch in events.chunks(BULK_BATCH) {
            client.send(batch).await.expect("bulk batch acknowledged");
        }
    });
}

/// Copies the script's PNGs into target/test-artifacts (each replaced
/// atomically) and returns where they went.
fn publish_screenshots(from: &Path) -> Vec<PathBuf> {
    let to = artifact_dir();
    fs::create_dir_all(&to).expect("create the artifact directory");
    let mut published = Vec::new();
    for entry in fs::read_dir(from).expect("read the screenshot directory") {
        let path = entry.expect("screenshot directory entry").path();
        if path.extension().is_none_or(|e| e != "png") {
            continue;
        }
        let name = path.file_name().unwrap();
        let tmp = to.join(format!(
            ".{}.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        fs::copy(&path, &tmp).expect("copy a screenshot");
        fs::rename(&tmp, to.join(name)).expect("publish a screenshot");
        published.push(to.join(name));
    }
    published
}

/// Waits for `name` in `dir`, unless `stop` is set (the script has ended).
fn wait_for_file(dir: &Path, name: &str, stop: &AtomicBool) -> bool {
    let deadline = Instant::now() + STEP_TIMEOUT;
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        if dir.join(name).exists() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn dashboard_grid_updates_details_and_10k_entries_in_chromium() {
    // Fail, never skip, without the browser and its driver.
    let chromium = require_peer("chromium");
    let node = require_peer("node");
    require_peer("riemann-client");
    ensure_playwright();

    let mut v = Vigil::start(&["--http", "127.0.0.1:0"]);
    let http = v.http.expect("the listening line names the http address");

    // The initial grid: three hosts, three services, every colour.
    let initial = [
        ("app-1", "cpu", "ok", 42.0),
        ("app-1", "memory", "warning", 81.5),
        ("app-2", "cpu", "ok", 12.25),
        ("db-1", "disk", "critical", 97.0),
        ("db-1", "cpu", "ok", 7.0),
    ];
    for (host, service, state, metric) in initial {
        c_send(&v, host, service, state, metric, &[]);
    }
    let indexed = wait_until(VISIBLE_TIMEOUT, || {
        (c_query(&v, "true").len() == initial.len()).then_some(())
    });
    assert!(indexed.is_some(), "the initial events were not all indexed");

    // app-2/cpu turns critical while the page is open.
    let change = json!({
        "host": "app-2", "service": "cpu", "state": "critical", "metric": 99.5,
        "description": "cpu on fire", "tags": ["dashboard", "hot"],
        "attributes": {"team": "infra", "x-client": "riemann-c-client"},
    });
    let total = initial.len() + BULK_HOSTS * BULK_SERVICES;
    let last = bulk_event(BULK_HOSTS - 1, BULK_SERVICES - 1, 0);
    let plan = json!({
        "initial": initial.iter().map(|(host, service, state, metric)| json!({
            "host": host, "service": service, "state": state, "metric": metric,
        })).collect::<Vec<_>>(),
        "change": change,
        "bulk": {
            "count": BULK_HOSTS * BULK_SERVICES,
            "total": total,
            "last": {"host": last.host, "service": last.service, "metric": last.metric.map(|m| m.as_f64())},
        },
    });

    let sync = tempfile::tempdir().expect("handshake directory");
    // The script writes its screenshots here; they are published to
    // target/test-artifacts afterwards (concurrent runs never mix files).
    let shots = tempfile::tempdir().expect("screenshot directory");

    // The test's side of the handshake runs beside the script.
    let stop = AtomicBool::new(false);
    let (out, sent) = thread::scope(|scope| {
        let sync_dir = sync.path();
        let (v_ref, stop_ref) = (&v, &stop);
        let sender = scope.spawn(move || -> Result<(), String> {
            if !wait_for_file(sync_dir, "ready-change", stop_ref) {
                return Err("the script never reached the `change` step".into());
            }
            c_send(
                v_ref,
                "app-2",
                "cpu",
                "critical",
                99.5,
                &[
                    "-D",
                    "cpu on fire",
                    "-t",
                    "dashboard",
                    "-t",
                    "hot",
                    "-a",
                    "team=infra",
                ],
            );
            fs::write(sync_dir.join("sent-change"), "").map_err(|e| e.to_string())?;
            if !wait_for_file(sync_dir, "ready-bulk", stop_ref) {
                return Err("the script never reached the `bulk` step".into());
            }
            let started = Instant::now();
            send_bulk(v_ref);
            eprintln!(
                "bulk: {} events sent in {:?}",
                BULK_HOSTS * BULK_SERVICES,
                started.elapsed()
            );
            fs::write(sync_dir.join("sent-bulk"), "").map_err(|e| e.to_string())?;
            Ok(())
        });

        let mut cmd = Command::new(&node);
        cmd.arg(browser_dir().join("dashboard.mjs"))
            .arg(format!("http://{http}/"))
            .arg(shots.path())
            .env("DASHBOARD_PLAN", plan.to_string())
            .env("DASHBOARD_SYNC_DIR", sync_dir)
            .env("CHROMIUM", &chromium)
            .current_dir(browser_dir());
        let out = run_command(cmd, NODE_TIMEOUT);
        stop.store(true, Ordering::SeqCst);
        (out, sender.join())
    });
    let published = publish_screenshots(shots.path());
    // A panic in the sender is the root cause when the script then timed out.
    match sent {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}\n{}", show(&out)),
        Err(panic) => std::panic::resume_unwind(panic),
    }
    let stdout = expect_success("node tests/browser/dashboard.mjs", &out);
    eprintln!("{stdout}");
    assert!(
        stdout.contains("RESULT "),
        "the script printed no RESULT line\n{}",
        show(&out)
    );
    let shot = artifact_dir().join("dashboard.png");
    assert!(
        published.contains(&shot),
        "the script saved no dashboard.png (published {published:?})"
    );
    eprintln!("screenshot: {}", shot.display());

    // The server took all of it in stride.
    v.assert_alive();
    assert_eq!(c_query(&v, "true").len(), total, "every entry is indexed");
}
