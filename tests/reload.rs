//! Hot reload. In-process on a virtual clock: unchanged stages keep their
//! state (asserted by value), changed ones start fresh, a broken file keeps the
//! running rules and is counted, the index survives. Then the real binary:
//! `SIGHUP` swaps in an edited file and refuses a broken one.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::{
    CMD_TIMEOUT, VISIBLE_TIMEOUT, Vigil, parse_event_array, run_ok, str_field, wait_until,
};
use vigil::clock::{Clock, ManualClock, SharedClock, secs_to_micros};
use vigil::event::{Event, Metric};
use vigil::index::{Index, IndexConfig};
use vigil::outputs::{OutputSink, OutputSpec};
use vigil::rules::engine::Rules;
use vigil::rules::testing::{Recorder, TEST_EPOCH, advance};
use vigil::rules::{self, EnvPolicy, reload};
use vigil::streams::Streams;

const NAME: &str = "reload.vigil";

/// A rule file with one output, `out`, around the given streams.
fn file(streams: &str) -> String {
    format!("output out = forward(host: \"127.0.0.1\")\nstreams {{\n{streams}\n}}\n")
}

/// Recorders for `outputs`, in their order: `out` for the output of that
/// name, `others` for the rest.
fn sinks(
    outputs: &[OutputSpec],
    out: &Arc<Recorder>,
    others: &Arc<Recorder>,
) -> Vec<Arc<dyn OutputSink>> {
    outputs
        .iter()
        .map(|o| {
            let recorder = if o.name == "out" { out } else { others };
            recorder.clone() as Arc<dyn OutputSink>
        })
        .collect()
}

/// Rules running on a virtual clock, `out` recorded across reloads, and
/// every other output into `others`.
struct Live {
    clock: Arc<ManualClock>,
    index: Arc<Index>,
    rules: Rules,
    out: Arc<Recorder>,
    others: Arc<Recorder>,
}

impl Live {
    fn start(streams: &str) -> Live {
        Self::start_source(&file(streams))
    }

    fn start_source(source: &str) -> Live {
        let (_, compiled) =
            rules::load(NAME, source, EnvPolicy::Strict).unwrap_or_else(|e| panic!("{e}"));
        let clock = Arc::new(ManualClock::new(TEST_EPOCH));
        let index = Arc::new(Index::new(IndexConfig::default()));
        let shared: SharedClock = clock.clone();
        let (out, others) = (Arc::default(), Arc::default());
        let sinks = sinks(&compiled.outputs, &out, &others);
        let rules = Rules::new(compiled.roots, None, sinks, index.clone(), shared);
        Live {
            clock,
            index,
            rules,
            out,
            others,
        }
    }

    fn reload(&self, streams: &str) {
        self.reload_source(&file(streams))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn reload_source(&self, source: &str) -> Result<(), String> {
        let compiled = reload::prepare(&self.rules.stats, NAME, source, EnvPolicy::Strict)?;
        let sinks = sinks(&compiled.outputs, &self.out, &self.others);
        self.rules
            .replace(&self.rules.reload_turn(), compiled.roots, None, sinks);
        Ok(())
    }

    /// Moves virtual time to `secs` after the start in timer steps, as the
    /// server's timer would.
    fn advance_to(&self, secs: f64) {
        let target = TEST_EPOCH + secs_to_micros(secs);
        advance(&self.clock, &self.index, &self.rules, target);
    }

    fn send(&self, host: &str, metric: Option<f64>, state: Option<&str>) {
        self.rules.process(&[Event {
            host: Some(host.to_owned()),
            service: Some("svc".to_owned()),
            state: state.map(str::to_owned),
            metric: metric.map(Metric::Float),
            time: self.clock.now(),
            ..Event::default()
        }]);
    }

    fn out(&self) -> Vec<Event> {
        self.out.events.lock().clone()
    }

    fn out_metrics(&self) -> Vec<f64> {
        self.out()
            .iter()
            .map(|e| e.metric.expect("metric").as_f64())
            .collect()
    }

    fn out_hosts(&self) -> Vec<String> {
        self.out().iter().map(|e| e.host_str().to_owned()).collect()
    }
}

#[test]
fn an_unchanged_rate_keeps_its_partial_sum() {
    let live = Live::start("  rate(5s) { out }");
    live.send("h", Some(10.0), None);
    live.advance_to(1.0);
    live.send("h", Some(20.0), None);
    live.advance_to(1.5);
    // Same rate at the same place; a comment and a new stage after it.
    live.reload("  # per second\n  rate(5s) { out }\n  index");
    live.advance_to(2.0);
    live.send("h", Some(5.0), None);
    live.advance_to(5.0);
    assert_eq!(live.out_metrics(), vec![(10.0 + 20.0 + 5.0) / 5.0]);
    assert_eq!(live.rules.stats.reloads.load(Ordering::Relaxed), 1);
}

#[test]
fn a_changed_rate_starts_fresh() {
    let live = Live::start("  rate(5s) { out }");
    live.send("h", Some(10.0), None);
    live.send("h", Some(20.0), None);
    live.advance_to(1.5);
    live.reload("  rate(10s) { out }");
    live.advance_to(2.0);
    live.send("h", Some(5.0), None);
    live.advance_to(6.0);
    assert_eq!(
        live.out_metrics(),
        Vec::<f64>::new(),
        "the old window is gone"
    );
    live.advance_to(12.0);
    assert_eq!(live.out_metrics(), vec![5.0 / 10.0]);
}

#[test]
fn a_broken_file_keeps_the_running_rules_and_is_counted() {
    let live = Live::start("  with(state: \"old\") { out }");
    let broken = file("  with(state: \"new\") { out }\n  wth(state: \"x\") { index }");
    let diagnostics = live.reload_source(&broken).unwrap_err();
    assert!(
        diagnostics.starts_with("reload.vigil:4:3: unknown stream `wth`\n"),
        "{diagnostics}"
    );
    assert!(
        diagnostics.contains("\n      wth(state: \"x\") { index }\n      ^^^"),
        "{diagnostics}"
    );
    assert_eq!(live.rules.stats.reload_failures.load(Ordering::Relaxed), 1);
    assert_eq!(live.rules.stats.reloads.load(Ordering::Relaxed), 0);

    live.send("h", None, None);
    assert_eq!(live.out()[0].state.as_deref(), Some("old"));

    live.reload("  with(state: \"new\") { out }");
    live.send("h", None, None);
    assert_eq!(live.out()[1].state.as_deref(), Some("new"));
}

#[test]
fn the_index_survives_a_reload() {
    let live = Live::start("  index");
    live.send("a", Some(1.0), None);
    live.send("b", Some(2.0), None);
    live.reload("  drop");
    live.send("c", Some(3.0), None);
    let mut hosts: Vec<_> = live
        .index
        .query(&vigil::query::Query::parse("true").unwrap())
        .unwrap()
        .iter()
        .map(|e| e.host_str().to_owned())
        .collect();
    hosts.sort();
    assert_eq!(hosts, ["a", "b"], "kept, and the new rules drop `c`");
}

#[test]
fn by_groups_keep_their_changed_state() {
    let live = Live::start("  by(host) { changed(state) { out } }");
    live.send("a", None, Some("ok"));
    live.send("b", None, Some("ok"));
    assert_eq!(live.out_hosts(), ["a", "b"]);
    // An edit inside the `by` block keeps the groups and their unchanged stages.
    live.reload("  by(host) {\n    changed(state) { out }\n    index\n  }");
    live.send("a", None, Some("ok"));
    live.send("b", None, Some("ok"));
    assert_eq!(live.out_hosts(), ["a", "b"], "repeats do not fire again");
    live.send("a", None, Some("critical"));
    live.send("c", None, Some("ok"));
    assert_eq!(live.out_hosts(), ["a", "b", "a", "c"]);
}

/// Riemann's `counter` and `runs` start again from nothing at every reload:
/// a count goes back to zero, a run of criticals must begin again.
#[test]
fn a_counter_and_a_run_keep_their_state_over_a_reload_unless_changed() {
    let live = Live::start("  counter { out }\n  runs(3, state) { index }");
    live.send("h", Some(2.0), Some("critical"));
    live.send("h", Some(3.0), Some("critical"));
    live.reload("  # edited\n  counter { out }\n  runs(3, state) { index }");
    live.send("h", Some(4.0), Some("critical"));
    assert_eq!(live.out_metrics(), vec![2.0, 5.0, 9.0], "the count goes on");
    assert_eq!(
        live.index.len(),
        1,
        "the third critical in a row, two of them before the reload"
    );

    live.reload("  counter(100) { out }\n  runs(2, state) { index }");
    live.send("h", Some(1.0), Some("ok"));
    assert_eq!(
        live.out_metrics(),
        vec![2.0, 5.0, 9.0, 101.0],
        "a new start"
    );
}

#[test]
fn an_unchanged_by_keeps_its_groups_and_sends_to_its_outputs_by_name() {
    let by = "streams {\n  by(host) { changed(state) { out } }\n}\n";
    let other = "output other = forward(host: \"127.0.0.1\")\n";
    let out = "output out = forward(host: \"127.0.0.1\")\n";
    let live = Live::start_source(&format!("{out}{by}"));
    live.send("a", None, Some("ok"));
    live.send("b", None, Some("ok"));
    // The same text, twice: the groups are handed over as they are.
    live.reload_source(&format!("{out}{by}")).unwrap();
    live.reload_source(&format!("{out}{by}")).unwrap();
    live.send("a", None, Some("ok"));
    assert_eq!(live.out_hosts(), ["a", "b"], "a repeat does not fire again");
    // The same block, but `out` is now the second output: the groups'
    // stages must send to `out` still, not to the first output.
    live.reload_source(&format!("{other}{out}{by}")).unwrap();
    live.send("a", None, Some("ok"));
    live.send("b", None, Some("critical"));
    assert_eq!(live.out_hosts(), ["a", "b", "b"]);
    assert!(live.others.events.lock().is_empty());
}

#[test]
fn a_time_window_keeps_its_events_and_a_new_fold_gets_them() {
    let live = Live::start("  fixed_time_window(10s) { count { out } }");
    live.send("h", Some(1.0), None);
    live.send("h", Some(2.0), None);
    live.advance_to(3.0);
    live.reload("  fixed_time_window(10s) {\n    count { out }\n    sum { out }\n  }");
    live.send("h", Some(4.0), None);
    live.advance_to(10.0);
    assert_eq!(live.out_metrics(), vec![3.0, 7.0]);
}

// ---------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------

fn vigil(args: &[&str]) -> String {
    run_ok(env!("CARGO_BIN_EXE_vigil"), args, CMD_TIMEOUT)
}

fn hangup(v: &Vigil) {
    run_ok("kill", &["-HUP", &v.pid().to_string()], CMD_TIMEOUT);
}

/// Sends an event for `service`, then returns its state as the index has it.
fn send_and_query(v: &Vigil, service: &str) -> Option<String> {
    let addr = v.tcp.to_string();
    vigil(&[
        "send",
        "--host",
        "h",
        "--service",
        service,
        "--state",
        "ok",
        &addr,
    ]);
    let query = format!("service = \"{service}\"");
    let events = parse_event_array(&vigil(&["query", &query, &addr])).expect("query prints JSON");
    events
        .first()
        .and_then(|e| str_field(e, "state"))
        .map(str::to_owned)
}

fn wait_for_log(v: &Vigil, text: &str) {
    wait_until(VISIBLE_TIMEOUT, || v.logs().contains(text).then_some(()))
        .unwrap_or_else(|| panic!("no `{text}` in the log:\n{}", v.logs()));
}

fn write(path: &Path, source: &str) {
    std::fs::write(path, source).expect("write the rule file");
}

#[test]
fn sighup_reloads_the_rule_file_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rules.vigil");
    let path_str = path.to_str().expect("utf-8 path");
    write(&path, "streams {\n  index\n}\n");
    let mut v = Vigil::start(&["--rules", path_str, "--no-snapshot"]);
    assert_eq!(send_and_query(&v, "before").as_deref(), Some("ok"));

    write(
        &path,
        "streams {\n  with(state: \"reloaded\") { index }\n}\n",
    );
    hangup(&v);
    wait_for_log(&v, "Rules reloaded.");
    assert_eq!(send_and_query(&v, "after").as_deref(), Some("reloaded"));

    write(&path, "streams {\n  with(state: \"broken\" { index }\n}\n");
    hangup(&v);
    wait_for_log(&v, "Reload rejected");
    v.assert_alive();
    let diagnostic = format!("{path_str}:2:24: expected `,` or `)` in the argument list");
    assert!(
        v.logs().contains(&diagnostic),
        "no `{diagnostic}` in:\n{}",
        v.logs()
    );
    assert_eq!(send_and_query(&v, "still").as_deref(), Some("reloaded"));
}

/// A rule path that leads to something that is not a file: `/dev/zero`
/// would be read without end, a FIFO with no writer would block on open.
/// Both are refused as the reload, and the running rules go on.
#[test]
fn a_rule_path_to_a_device_or_a_fifo_is_refused_and_the_server_goes_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = dir.path().join("good.vigil");
    write(&good, "streams {\n  index\n}\n");
    let path = dir.path().join("rules.vigil");
    std::os::unix::fs::symlink(&good, &path).unwrap();
    let path_str = path.to_str().expect("utf-8 path");
    let mut v = Vigil::start(&["--rules", path_str, "--no-snapshot"]);

    let fifo = dir.path().join("fifo.vigil");
    run_ok("mkfifo", &[fifo.to_str().unwrap()], CMD_TIMEOUT);
    for (target, kind) in [
        (Path::new("/dev/zero"), "character device"),
        (fifo.as_path(), "FIFO"),
    ] {
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(target, &path).unwrap();
        hangup(&v);
        let refusal = format!("{path_str}: cannot read: not a regular file (a {kind})");
        wait_for_log(&v, &refusal);
        v.assert_alive();
        assert_eq!(send_and_query(&v, kind).as_deref(), Some("ok"));
    }
    // `check` says the same, at once.
    let out = common::run_cmd(
        env!("CARGO_BIN_EXE_vigil"),
        &["check", fifo.to_str().unwrap()],
        CMD_TIMEOUT,
    );
    assert!(!out.status.success());
    let expected = format!(
        "{}: cannot read: not a regular file (a FIFO)\n",
        fifo.display()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

/// `vigil_output_<counter>{output="fwd"}` as `/metrics` has it now.
fn fwd_counter(runtime: &tokio::runtime::Runtime, v: &Vigil, counter: &str) -> u64 {
    let text = runtime.block_on(common::metrics_text(v.http.expect("an HTTP listener")));
    let prefix = format!("vigil_output_{counter}{{output=\"fwd\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
        .parse()
        .unwrap()
}

/// A reload moves a forward output from a dead downstream to a live one:
/// the old declaration's backlog stays in the counters while it waits, the
/// new one delivers at once, and the old one gives its backlog up (counted)
/// once the dead downstream has taken nothing for 5 s, and ends.
#[test]
fn a_replaced_forwards_backlog_is_counted_until_it_gives_it_up() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let live = Vigil::start(&[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rules.vigil");
    let rules = |port: u16| {
        format!("output fwd = forward(host: \"127.0.0.1\", port: {port})\nstreams {{\n  fwd\n}}\n")
    };
    write(&path, &rules(dead_port));
    let mut v = Vigil::start(&["--rules", path.to_str().unwrap()]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let send = |host: &str, n: usize| {
        runtime.block_on(async {
            let mut client = vigil::client::Client::connect(v.tcp).await.unwrap();
            let events: Vec<Event> = (0..n)
                .map(|i| Event {
                    host: Some(host.to_owned()),
                    service: Some(format!("s{i}")),
                    time: (common::now_secs() * 1e6) as i64,
                    ttl: Some(600.0),
                    ..Event::default()
                })
                .collect();
            client.send(&events).await.unwrap();
        })
    };
    send("old", 3000);
    let identity = |v: &Vigil| {
        let c = |name| fwd_counter(&runtime, v, name);
        let (accepted, delivered, dropped) = (
            c("accepted_total"),
            c("delivered_total"),
            c("dropped_total"),
        );
        let (queued, in_flight) = (c("queued"), c("in_flight"));
        assert_eq!(
            accepted,
            delivered + dropped + queued + in_flight,
            "accepted {accepted}, delivered {delivered}, dropped {dropped}, queued {queued}, in flight {in_flight}"
        );
        (accepted, delivered, dropped)
    };
    assert_eq!(identity(&v), (3000, 0, 0));

    write(&path, &rules(live.port()));
    hangup(&v);
    wait_for_log(&v, "Rules reloaded.");
    assert_eq!(
        identity(&v),
        (3000, 0, 0),
        "the old backlog is still counted"
    );
    send("new", 10);
    wait_for_log(&v, "Downstream took nothing for 5s as the output stopped");
    wait_for_log(&v, "Output replaced or removed by a reload: it settled");
    let settled = v.log_line("Output replaced or removed");
    assert!(settled.contains(r#""held":3000"#), "{settled}");
    wait_until(VISIBLE_TIMEOUT, || {
        (identity(&v) == (3010, 10, 3000)).then_some(())
    })
    .unwrap_or_else(|| panic!("counters: {:?}", identity(&v)));
    let forwarded = vigil(&["query", "true", &live.tcp.to_string()]);
    let hosts: Vec<_> = parse_event_array(&forwarded)
        .unwrap()
        .iter()
        .map(|e| str_field(e, "host").unwrap().to_owned())
        .collect();
    assert_eq!(hosts, vec!["new"; 10], "only the new events, once");

    // Stopping with the downstream gone: what it could not take is counted
    // dropped, and vigil does not wait for it past the grace.
    let mut live = live;
    live.terminate();
    send("late", 5);
    v.terminate();
    assert!(
        v.logs()
            .contains(r#""outputs":"fwd: accepted 3015, delivered 10, dropped 3005, skipped 0""#),
        "{}",
        v.logs()
    );
}

/// An output that holds the batch delivering its first event until released.
struct Gate {
    entered: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl OutputSink for Gate {
    fn push(&self, _: Event) {
        let entered = self.entered.lock().unwrap().take();
        if let Some(entered) = entered {
            entered.send(()).unwrap();
            let release = self.release.lock().unwrap().take().unwrap();
            release.recv().unwrap();
        }
    }
}

#[test]
fn a_batch_running_while_a_reload_moves_the_state_is_not_lost_to_the_new_rules() {
    let source = "output out = forward(host: \"127.0.0.1\")\n\
                  output gate = forward(host: \"127.0.0.2\")\n\
                  streams {\n  where host = \"gate\" { gate }\n  by(host) { changed(state) { out } }\n}\n";
    let load = || rules::load(NAME, source, EnvPolicy::Strict).unwrap().1;
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let gate = Arc::new(Gate {
        entered: std::sync::Mutex::new(Some(entered_tx)),
        release: std::sync::Mutex::new(Some(release_rx)),
    });
    let out = Arc::new(Recorder::default());
    let sinks = || -> Vec<Arc<dyn OutputSink>> { vec![out.clone(), gate.clone()] };
    let clock: SharedClock = Arc::new(ManualClock::new(TEST_EPOCH));
    let index = Arc::new(Index::new(IndexConfig::default()));
    let rules = Arc::new(Rules::new(load().roots, None, sinks(), index, clock));
    let event = |host: &str, state: &str| Event {
        host: Some(host.to_owned()),
        service: Some("svc".to_owned()),
        state: Some(state.to_owned()),
        time: TEST_EPOCH,
        ..Event::default()
    };
    rules.process(&[event("a", "ok")]);

    // A batch held in `gate`, its second event (a's transition) not run yet.
    let batch = [event("gate", "ok"), event("a", "critical")];
    let running = std::thread::spawn({
        let rules = rules.clone();
        move || rules.process(&batch)
    });
    entered.recv().unwrap();
    let (reloaded_tx, reloaded) = std::sync::mpsc::channel();
    let reloading = std::thread::spawn({
        let (rules, roots, sinks) = (rules.clone(), load().roots, sinks());
        move || {
            rules.replace(&rules.reload_turn(), roots, None, sinks);
            reloaded_tx.send(()).unwrap();
        }
    });
    // The reload waits for the batch; one that moved the state meanwhile is
    // done by now (and the batch then changes the old rules alone).
    let waited = reloaded.recv_timeout(std::time::Duration::from_millis(300));
    release.send(()).unwrap();
    running.join().unwrap();
    reloading.join().unwrap();

    // The new rules know a is critical: a repeat is not a transition.
    rules.process(&[event("a", "critical"), event("a", "ok")]);
    let seen: Vec<(String, String)> = (out.events.lock().iter())
        .filter(|e| e.host_str() == "a")
        .map(|e| (e.host_str().to_owned(), e.state.clone().unwrap()))
        .collect();
    let a = |state: &str| ("a".to_owned(), state.to_owned());
    assert_eq!(seen, [a("ok"), a("critical"), a("ok")]);
    assert!(
        waited.is_err(),
        "the reload did not wait for the running batch"
    );
}
