//! Restarts of the real binary: the index and the rules' stream state survive
//! SIGTERM (final snapshot) and `kill -9` (periodic snapshot), entries that ran
//! out while vigil was down expire through the rules, a corrupted snapshot
//! is reported, skipped and kept aside, a reload signal while starting
//! waits for the rules, and the ports are taken before the saved state loads.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use prost::Message;

use common::{VISIBLE_TIMEOUT, Vigil, wait_until};
use vigil::client::Client;
use vigil::clock::{Clock, MICROS_PER_SEC, SystemClock};
use vigil::event::{Event, Metric};
use vigil::proto::{Msg, to_pb};
use vigil::snapshot;

fn block_on<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn send(v: &Vigil, events: &[Event]) {
    block_on(async {
        let mut client = Client::connect(v.tcp).await.expect("connects");
        client.send(events).await.expect("acked");
    });
}

/// The matching events, sorted by host and service.
fn query(v: &Vigil, q: &str) -> Vec<Event> {
    let mut events = block_on(async {
        let mut client = Client::connect(v.tcp).await.expect("connects");
        client.query(q).await.expect("query answered")
    });
    sort(&mut events);
    events
}

fn sort(events: &mut [Event]) {
    events.sort_by(|a, b| (a.host_str(), a.service_str()).cmp(&(b.host_str(), b.service_str())));
}

/// A rule file written into `dir`, and a data directory beside it.
fn rules_and_data(dir: &Path, rules: &str) -> (PathBuf, PathBuf) {
    let path = dir.join("rules.vigil");
    std::fs::write(&path, rules).unwrap();
    (path, dir.join("data"))
}

fn dir_arg(dir: &Path) -> &str {
    dir.to_str().expect("UTF-8 temp path")
}

/// Every field kind, times with microseconds, TTLs long enough to outlive the test.
fn sample(now: i64) -> Vec<Event> {
    let mut events = vec![
        Event {
            host: Some("web1".into()),
            service: Some("http req".into()),
            state: Some("ok".into()),
            time: now + 123,
            description: Some("requests per second".into()),
            tags: vec!["web".into(), "prod".into()],
            metric: Some(Metric::Int(-42)),
            ttl: Some(3600.5),
            attributes: vec![("env".into(), "prod".into()), ("rack".into(), "r7".into())],
        },
        Event {
            host: Some("web1".into()),
            service: Some("cpu".into()),
            state: Some("warning".into()),
            time: now - 7,
            metric: Some(Metric::Float(0.875)),
            ttl: Some(3600.0),
            ..Event::default()
        },
        Event {
            host: Some("db1".into()),
            service: Some("no metric".into()),
            time: now,
            ..Event::default()
        },
    ];
    sort(&mut events);
    events
}

#[test]
fn sigterm_writes_a_snapshot_that_the_next_start_loads() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--data-dir", dir_arg(dir.path()), "--default-ttl", "3600"];
    let events = sample(SystemClock.now());

    let mut v = Vigil::start(&args);
    send(&v, &events);
    assert_eq!(query(&v, "true"), events);
    let status = v.terminate();
    assert!(status.success(), "exit status {status}:\n{}", v.logs());
    assert!(
        v.wait_for_log("Wrote the index snapshot.", VISIBLE_TIMEOUT),
        "{}",
        v.logs()
    );
    drop(v);

    let v = Vigil::start(&args);
    assert!(
        v.logs().contains("Loaded the index snapshot."),
        "{}",
        v.logs()
    );
    assert_eq!(query(&v, "true"), events, "every field intact");
}

#[test]
fn kill_9_keeps_what_the_last_periodic_snapshot_held() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--data-dir",
        dir_arg(dir.path()),
        "--default-ttl",
        "3600",
        "--snapshot-interval",
        "500ms",
    ];
    let events = sample(SystemClock.now());

    let mut v = Vigil::start(&args);
    send(&v, &events);
    let held = wait_until(VISIBLE_TIMEOUT, || {
        let mut held = snapshot::read(dir.path()).ok()??;
        sort(&mut held);
        (held == events).then_some(held)
    });
    assert!(
        held.is_some(),
        "no periodic snapshot with the events:\n{}",
        v.logs()
    );
    v.kill9();
    drop(v);

    let v = Vigil::start(&args);
    assert_eq!(query(&v, "true"), events);
}

#[test]
fn an_entry_that_ran_out_while_down_gets_one_more_ttl_then_expires_through_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    // A re-indexed event in state `expired` would delete its key: change the state.
    let (rules, data) = rules_and_data(
        dir.path(),
        r#"streams {
  index
  expired { with(service: "saw expired", state: "seen", ttl: 3600) { index } }
}
"#,
    );
    let args = [
        "--data-dir",
        dir_arg(&data),
        "--rules",
        dir_arg(&rules),
        "--default-ttl",
        "3600",
    ];
    let now = SystemClock.now();
    let ttl = 3.0;
    let heartbeat = |host: &str, ttl: Option<f32>| Event {
        host: Some(host.into()),
        service: Some("heartbeat".into()),
        state: Some("ok".into()),
        time: now,
        ttl,
        ..Event::default()
    };
    // db1 died during the restart, db3 reports again after it, db2 has a long TTL.
    let (dying, reporting, alive) = (
        heartbeat("db1", Some(ttl)),
        heartbeat("db3", Some(ttl)),
        heartbeat("db2", None),
    );

    let mut v = Vigil::start(&args);
    send(&v, &[dying.clone(), reporting.clone(), alive.clone()]);
    assert!(v.terminate().success(), "{}", v.logs());
    let held = snapshot::read(&data).unwrap().expect("a snapshot");
    assert!(
        held.contains(&dying) && held.contains(&reporting),
        "expired before the snapshot; the test needs a longer TTL: {held:?}"
    );
    drop(v);

    // Down until the TTL has passed.
    let deadline = now + (f64::from(ttl) * MICROS_PER_SEC as f64) as i64;
    while SystemClock.now() <= deadline + 200_000 {
        std::thread::sleep(Duration::from_millis(100));
    }

    let started = SystemClock.now();
    let v = Vigil::start(&args);
    let reported = Event {
        time: SystemClock.now(),
        ttl: Some(3600.0),
        ..reporting
    };
    send(&v, std::slice::from_ref(&reported));
    let seen = wait_until(VISIBLE_TIMEOUT, || {
        let seen = query(&v, r#"service = "saw expired""#);
        (!seen.is_empty()).then_some(seen)
    })
    .unwrap_or_else(|| panic!("the rules never saw the expiry:\n{}", v.logs()));
    assert_eq!(seen.len(), 1, "only db1, which did not report: {seen:?}");
    assert_eq!(
        (seen[0].host_str(), seen[0].state.as_deref()),
        ("db1", Some("seen"))
    );
    let one_ttl_after_start = started + (f64::from(ttl) * MICROS_PER_SEC as f64) as i64;
    assert!(
        seen[0].time > one_ttl_after_start,
        "expired a TTL after the restart, not at its first tick: {} <= {one_ttl_after_start}",
        seen[0].time
    );
    let mut heartbeats = query(&v, r#"service = "heartbeat""#);
    sort(&mut heartbeats);
    assert_eq!(heartbeats, vec![alive, reported]);
}

/// Waits until the file at `path` has been rewritten twice from now, so the
/// second write started after everything done before the call.
fn wait_for_two_rewrites(path: &Path, v: &Vigil) {
    let modified = || std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut seen = vec![modified()];
    let rewritten = wait_until(VISIBLE_TIMEOUT, || {
        let now = modified();
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        (seen.len() > 2).then_some(())
    });
    assert!(
        rewritten.is_some(),
        "{} not rewritten twice:\n{}",
        path.display(),
        v.logs()
    );
}

#[test]
fn a_window_keeps_its_events_across_sigterm_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (rules, data) = rules_and_data(
        dir.path(),
        r#"streams {
  where service = "request" {
    fixed_event_window(3) { count { with(service: "requests per 3", ttl: 3600) { index } } }
  }
}
"#,
    );
    let args = [
        "--data-dir",
        dir_arg(&data),
        "--rules",
        dir_arg(&rules),
        "--snapshot-interval",
        "200ms",
    ];
    let request = || Event {
        host: Some("web1".into()),
        service: Some("request".into()),
        time: SystemClock.now(),
        ttl: Some(3600.0),
        ..Event::default()
    };
    let counted = |v: &Vigil| query(v, r#"service = "requests per 3""#);

    let mut v = Vigil::start(&args);
    send(&v, &[request()]);
    assert!(v.terminate().success(), "{}", v.logs());
    assert!(v.logs().contains("Wrote the stream state."), "{}", v.logs());
    drop(v);

    let mut v = Vigil::start(&args);
    assert!(
        v.logs()
            .contains("Restored the stream state of the last run."),
        "{}",
        v.logs()
    );
    send(&v, &[request()]);
    assert_eq!(counted(&v), vec![], "two events of three");
    wait_for_two_rewrites(&data.join("streams.state"), &v);
    v.kill9();
    drop(v);

    let v = Vigil::start(&args);
    send(&v, &[request()]);
    let counted = counted(&v);
    assert_eq!(
        counted.len(),
        1,
        "one from each life closes the window:\n{}",
        v.logs()
    );
    assert_eq!(counted[0].metric, Some(Metric::Int(3)));
}

#[test]
fn a_corrupted_snapshot_is_reported_kept_aside_and_vigil_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    snapshot::write(dir.path(), &sample(SystemClock.now())).unwrap();
    let path = dir.path().join(snapshot::FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let state = dir.path().join("streams.state");
    std::fs::write(&state, b"not a stream state").unwrap();

    let args = ["--data-dir", dir_arg(dir.path())];
    let mut v = Vigil::start(&args);
    let logs = v.logs();
    assert!(
        logs.contains("Ignoring the unreadable index snapshot")
            && logs.contains("checksum mismatch"),
        "{logs}"
    );
    assert!(logs.contains("Ignoring the saved stream state"), "{logs}");
    assert_eq!(query(&v, "true"), vec![]);
    // Kept aside for a look (or a newer vigil's, after a downgrade): the
    // next write would have destroyed them.
    let aside = |path: &Path| {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".unreadable");
        std::fs::read(PathBuf::from(aside)).unwrap_or_default()
    };
    assert_eq!(aside(&path), bytes);
    assert_eq!(aside(&state), b"not a stream state");

    // It carries on as usual and replaces the bad snapshot on shutdown.
    let event = Event {
        host: Some("after".into()),
        service: Some("corruption".into()),
        time: SystemClock.now(),
        ttl: Some(3600.0),
        ..Event::default()
    };
    send(&v, std::slice::from_ref(&event));
    assert!(v.terminate().success(), "{}", v.logs());
    assert_eq!(snapshot::read(dir.path()).unwrap(), Some(vec![event]));
}

/// A crash in the middle of a write leaves its temporary file, which may be
/// large (a snapshot's) on a disk already short of room: the next start
/// removes vigil's, and only vigil's.
#[test]
fn temporary_files_an_interrupted_write_left_are_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let ours = [
        "index.snapshot.tmp",
        "streams.state.tmp",
        "pagerduty-oncall.json.tmp",
    ];
    for name in ours.iter().chain(&["notes.tmp"]) {
        std::fs::write(dir.path().join(name), b"cut short").unwrap();
    }
    let v = Vigil::start(&["--data-dir", dir_arg(dir.path())]);
    for name in ours {
        assert!(!dir.path().join(name).exists(), "{name} left: {}", v.logs());
    }
    assert!(dir.path().join("notes.tmp").exists(), "not vigil's");
}

/// A `SIGHUP` while vigil still loads its snapshot (a reload sent right
/// after a restart) does not kill it: the rules are reloaded once running.
#[test]
fn a_sighup_while_starting_reloads_once_running() {
    let dir = tempfile::tempdir().unwrap();
    let (rules, data) = rules_and_data(dir.path(), "streams {\n  index\n}\n");
    let now = SystemClock.now();
    let many: Vec<Event> = (0..200_000)
        .map(|i| Event {
            host: Some(format!("h{i}")),
            service: Some("load".into()),
            time: now,
            ttl: Some(3600.0),
            ..Event::default()
        })
        .collect();
    std::fs::create_dir_all(&data).unwrap();
    snapshot::write(&data, &many).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"));
    cmd.args(["run", "--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--log-format", "json", "--rules", dir_arg(&rules)])
        .args(["--data-dir", dir_arg(&data)])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let mut vigil = common::Logging::spawn(cmd);
    let minute = Duration::from_secs(60);
    // Logged before the snapshot is loaded, once the rules are read.
    assert!(vigil.wait_for("stream state", minute), "{}", vigil.seen);
    let pid = vigil.child.id().to_string();
    common::run_ok("kill", &["-HUP", &pid], VISIBLE_TIMEOUT);
    // Either first: the reload may come before `listening` is logged.
    let reloaded = vigil.wait_for("Rules reloaded.", minute);
    let listening = vigil.wait_for("listening", minute);
    let alive = vigil.child.try_wait().unwrap().is_none();
    let _ = vigil.child.kill();
    let status = vigil.child.wait().unwrap();
    assert!(reloaded && listening && alive, "{status}: {}", vigil.seen);
}

#[test]
fn no_snapshot_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--data-dir", dir_arg(&data), "--no-snapshot"];
    let mut v = Vigil::start(&args);
    send(&v, &sample(SystemClock.now()));
    assert!(v.terminate().success(), "{}", v.logs());
    assert!(!data.exists(), "--no-snapshot created {}", data.display());
}

/// Two vigils on one directory would overwrite each other's snapshot, and a
/// crash could leave it interleaved: the second is refused, naming the first.
#[test]
fn a_second_vigil_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut first = Vigil::start(&["--data-dir", dir_arg(&data)]);
    let (code, stderr) = common::run_refused(&["--data-dir", dir_arg(&data)], VISIBLE_TIMEOUT);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} is in use by another vigil (pid {}): give each its own --data-dir",
            data.display(),
            first.pid()
        )),
        "{stderr}"
    );
    assert!(first.terminate().success(), "{}", first.logs());
    let mut again = Vigil::start(&["--data-dir", dir_arg(&data)]);
    assert!(again.terminate().success(), "free once the first has gone");
}

/// A `--data-dir` that names a file, or runs through one, is refused with
/// both paths named, not a bare "File exists" or "Not a directory".
#[test]
fn a_data_dir_where_a_file_is_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    std::fs::write(&file, "not a directory").unwrap();
    for data in [file.clone(), file.join("sub")] {
        let (code, stderr) = common::run_refused(&["--data-dir", dir_arg(&data)], VISIBLE_TIMEOUT);
        assert_eq!(code, Some(1), "{stderr}");
        let said = format!(
            "cannot make {} a directory: {} is a file, not a directory",
            data.display(),
            file.display()
        );
        assert!(stderr.contains("taking --data-dir"), "{stderr}");
        assert!(stderr.contains(&said), "{stderr}");
    }
}

/// A FIFO where the stream state file goes: vigil's start blocks reading it
/// until the test writes into it, holding vigil between binding its ports and
/// serving them for as long as the test needs.
fn state_fifo(data: &Path) -> PathBuf {
    std::fs::create_dir_all(data).unwrap();
    let fifo = data.join("streams.state");
    common::run_ok("mkfifo", &[dir_arg(&fifo)], VISIBLE_TIMEOUT);
    fifo
}

/// The ports are bound before the saved state is read, so an agent that
/// connects during a long restore waits in the kernel's queue and is served
/// once the state is in, rather than refused.
#[test]
fn an_agent_connecting_while_the_saved_state_loads_is_served_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (rules, data) = rules_and_data(dir.path(), "streams {\n  index\n}\n");
    let fifo = state_fifo(&data);
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"));
    cmd.args(["run", "--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(["--log-format", "json", "--rules", dir_arg(&rules)])
        .args(["--data-dir", dir_arg(&data), "--self-metrics-interval", "0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let mut vigil = common::Logging::spawn(cmd);
    let minute = Duration::from_secs(60);
    assert!(
        vigil.wait_for("Bound the listeners", minute),
        "{}",
        vigil.seen
    );
    let bound = (vigil.seen.lines())
        .find(|line| line.contains("Bound the listeners"))
        .and_then(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .and_then(|line| line["fields"]["tcp"].as_str()?.parse().ok());
    let tcp: std::net::SocketAddr = bound.unwrap_or_else(|| panic!("no tcp in {}", vigil.seen));
    // Connected and sent while vigil waits on the FIFO: the kernel queues both.
    let mut agent = std::net::TcpStream::connect(tcp).expect("connects while loading");
    let event = Event {
        host: Some("early".into()),
        service: Some("agent".into()),
        time: SystemClock.now(),
        ttl: Some(3600.0),
        ..Event::default()
    };
    let msg = Msg {
        events: vec![to_pb(&event)],
        ..Msg::default()
    };
    let body = msg.encode_to_vec();
    agent.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    agent.write_all(&body).unwrap();
    // Lets vigil go on, with an empty (so refused and set aside) stream state.
    std::fs::write(&fifo, b"").unwrap();
    agent.set_read_timeout(Some(minute)).unwrap();
    let mut len = [0; 4];
    agent.read_exact(&mut len).expect("an answer once served");
    let mut reply = vec![0; u32::from_be_bytes(len) as usize];
    agent.read_exact(&mut reply).unwrap();
    let reply = Msg::decode(&reply[..]).unwrap();
    let listening = vigil.wait_for("listening", minute);
    let found = block_on(async {
        let mut client = Client::connect(tcp).await?;
        client.query(r#"host = "early""#).await
    });
    let _ = vigil.child.kill();
    vigil.child.wait().unwrap();
    assert_eq!(reply.ok, Some(true), "{reply:?}");
    assert!(listening, "{}", vigil.seen);
    let found = found.unwrap_or_else(|e| panic!("{e}: {}", vigil.seen));
    assert_eq!(found, [event], "{}", vigil.seen);
}

/// A port in use fails at once, before a saved state of any size is read
/// (here one that would never finish: a FIFO nobody writes).
#[test]
fn a_port_in_use_fails_before_the_saved_state_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    state_fifo(&data);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let grpc = taken.local_addr().unwrap().to_string();
    // gRPC is bound last of all.
    let args = ["--data-dir", dir_arg(&data), "--grpc", &grpc];
    let (code, stderr) = common::run_refused(&args, Duration::from_secs(60));
    assert_eq!(code, Some(1), "{stderr}");
    let expected = format!("--grpc {grpc}: Address already in use");
    assert!(stderr.contains(&expected), "{expected} in {stderr}");
}

/// `name`'s value in `GET /metrics` of `v`.
fn metric(v: &Vigil, name: &str) -> u64 {
    block_on(common::metric(v.http.expect("HTTP on"), name))
}

/// A data directory that stops taking writes (a full disk; here a directory
/// where the snapshot's temporary file goes) is counted at every write, but
/// logged once until a write succeeds again, which is logged too: a full
/// disk must not fill the log a line per `--snapshot-interval`.
#[test]
fn a_periodic_write_failing_again_and_again_is_logged_once_until_one_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let v = Vigil::start(&["--data-dir", dir_arg(&data), "--snapshot-interval", "10ms"]);
    let taken = data.join("index.snapshot.tmp");
    std::fs::create_dir_all(taken.join("taken")).unwrap();
    let failed = |n| (metric(&v, "vigil_state_write_failures_total") >= n).then_some(());
    assert!(
        wait_until(VISIBLE_TIMEOUT, || failed(5)).is_some(),
        "{}",
        v.logs()
    );
    let logs = v.logs();
    assert_eq!(
        logs.matches("Periodic index snapshot failed").count(),
        1,
        "{logs}"
    );
    std::fs::remove_dir_all(&taken).unwrap();
    assert!(
        v.wait_for_log("Wrote the index snapshot again", VISIBLE_TIMEOUT),
        "{}",
        v.logs()
    );
}

/// A second SIGTERM while the shutdown waits on a downstream that takes
/// nothing (a forward output waits 5 s for it) ends vigil at once, with
/// status 1 and a line saying what it abandons; the snapshot written
/// before it is whole, and the next start loads it.
#[test]
fn a_second_sigterm_ends_the_shutdown_at_once_and_the_state_written_loads() {
    let dir = tempfile::tempdir().unwrap();
    // Accepts (through the kernel's backlog) and never reads nor answers.
    let downstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = downstream.local_addr().unwrap().port();
    let rules = format!(
        "output next = forward(host: \"127.0.0.1\", port: {port})\nstreams {{\n  index\n  next\n}}\n"
    );
    let (rules, data) = rules_and_data(dir.path(), &rules);
    let args = [
        "--rules",
        dir_arg(&rules),
        "--data-dir",
        dir_arg(&data),
        "--default-ttl",
        "3600",
    ];
    let events = sample(SystemClock.now());

    let mut v = Vigil::start(&args);
    send(&v, &events);
    v.signal("TERM");
    assert!(
        v.wait_for_log("Wrote the stream state.", VISIBLE_TIMEOUT),
        "{}",
        v.logs()
    );
    v.signal("TERM");
    let status = v.wait_for_exit(VISIBLE_TIMEOUT);
    assert_eq!(status.code(), Some(1), "{}", v.logs());
    let line = v.log_line("Second signal during the shutdown: exiting now.");
    assert!(line.contains("\"signal\":\"SIGTERM\""), "{line}");
    assert!(line.contains("events outputs have not delivered"), "{line}");
    assert!(!v.logs().contains("Stopped."), "{}", v.logs());
    drop(v);

    let v = Vigil::start(&args);
    assert_eq!(query(&v, "true"), events, "the final snapshot loads");
}
