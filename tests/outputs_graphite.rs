//! The Graphite output against the real carbon-cache (Debian graphite-carbon):
//! events sent with riemann-client go through a rule file's `graphite` output
//! and are read back from carbon's whisper files with `whisper-fetch`.

mod common;

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/carbon");
/// Hard bound on each carbon-cache, even if this test process dies first.
const CARBON_SECS: &str = "120";
/// Carbon listens after ~0.5 s; leave room for a loaded machine.
const CARBON_START: Duration = Duration::from_secs(20);
/// Carbon writes a point ~1 s after it arrives; vigil may first wait out a
/// reconnect backoff (at most 5 s).
const POINT_TIMEOUT: Duration = Duration::from_secs(30);

/// A port held for carbon: bound (never listening) with address and port
/// reuse, which carbon's own listeners set too, so carbon can bind it while
/// no other socket, nor a connection's source port, can take it first.
fn reserved_port() -> (tokio::net::TcpSocket, u16) {
    let holder = tokio::net::TcpSocket::new_v4().unwrap();
    holder.set_reuseaddr(true).unwrap();
    holder.set_reuseport(true).unwrap();
    holder.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = holder.local_addr().unwrap().port();
    (holder, port)
}

/// One carbon-cache, with its config and storage in `dir`. Stopped on drop.
struct Carbon {
    dir: PathBuf,
    line_port: u16,
    child: Option<Child>,
    /// Held for carbon's whole life, restarts included.
    _ports: [tokio::net::TcpSocket; 3],
}

impl Carbon {
    fn start(dir: &Path) -> Carbon {
        require_peer("carbon-cache");
        require_peer("timeout");
        let conf = dir.join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        let (line, line_port) = reserved_port();
        let (pickle, pickle_port) = reserved_port();
        let (query, query_port) = reserved_port();
        let template = std::fs::read_to_string(Path::new(FIXTURES).join("carbon.conf.in")).unwrap();
        let rendered = template
            .replace("@DIR@", dir.to_str().expect("utf-8 temp dir"))
            .replace("@LINE_PORT@", &line_port.to_string())
            .replace("@PICKLE_PORT@", &pickle_port.to_string())
            .replace("@QUERY_PORT@", &query_port.to_string());
        std::fs::write(conf.join("carbon.conf"), rendered).unwrap();
        for file in ["storage-schemas.conf", "storage-aggregation.conf"] {
            std::fs::copy(Path::new(FIXTURES).join(file), conf.join(file)).unwrap();
        }
        let mut carbon = Carbon {
            dir: dir.to_owned(),
            line_port,
            child: None,
            _ports: [line, pickle, query],
        };
        carbon.spawn();
        carbon
    }

    /// Runs carbon in the foreground under `timeout`, logging to a file, and
    /// waits until its line port accepts.
    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("carbon.log"))
            .unwrap();
        let config = format!("--config={}", self.dir.join("conf/carbon.conf").display());
        let child = Command::new("timeout")
            .args([
                "-k",
                "5",
                CARBON_SECS,
                "carbon-cache",
                &config,
                "--debug",
                "start",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn timeout carbon-cache");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.line_port));
        let up = wait_until(CARBON_START, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        });
        assert!(
            up.is_some(),
            "carbon did not listen within {CARBON_START:?}\n{}",
            self.log()
        );
    }

    /// Stops carbon with SIGTERM (forwarded by `timeout`), so it writes its
    /// cache out; SIGKILL if it takes too long.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let exited = wait_until(Duration::from_secs(10), || child.try_wait().ok().flatten());
        if exited.is_none() {
            let _ = child.kill();
        }
        let _ = child.wait();
    }

    fn whisper(&self, path: &str) -> PathBuf {
        self.dir.join("storage/whisper").join(format!("{path}.wsp"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("carbon.log")).unwrap_or_default()
    }

    /// Polls `whisper-fetch` until the metric at `path` (dotted) has a value
    /// since `from`; returns the values found.
    fn values(&self, path: &str, from: f64) -> Vec<f64> {
        require_peer("whisper-fetch");
        let file = self.whisper(&path.replace('.', "/"));
        let from = format!("--from={}", from as i64 - 5);
        let found = wait_until(POINT_TIMEOUT, || {
            if !file.is_file() {
                return None;
            }
            let out = run_ok(
                "whisper-fetch",
                &[&from, file.to_str().unwrap()],
                CMD_TIMEOUT,
            );
            let values = parse_fetch(&out);
            (!values.is_empty()).then_some(values)
        });
        found.unwrap_or_else(|| {
            panic!(
                "no value for {path} within {POINT_TIMEOUT:?}\ncarbon log:\n{}",
                self.log()
            )
        })
    }
}

impl Drop for Carbon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `whisper-fetch` prints `timestamp<TAB>value` per slot, `None` when empty.
fn parse_fetch(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

/// Starts vigil with a rule file that sends every event to carbon.
fn vigil_to(carbon: &Carbon, dir: &Path) -> Vigil {
    let rules = dir.join("graph.vigil");
    let text = format!(
        "output graph = graphite(host: \"127.0.0.1\", port: {})\nstreams {{ graph }}\n",
        carbon.line_port
    );
    std::fs::write(&rules, text).unwrap();
    Vigil::start(&["--rules", rules.to_str().unwrap()])
}

fn send(v: &Vigil, host: &str, service: &str, metric: &str) {
    require_peer("riemann-client");
    let (ip, port) = (v.host_str(), v.port_str());
    let args = [
        "send", "-T", "-h", host, "-S", service, "-d", metric, &ip, &port,
    ];
    run_ok("riemann-client", &args, CMD_TIMEOUT);
}

#[test]
fn events_reach_carbon_under_riemanns_path() {
    let tmp = tempfile::tempdir().unwrap();
    let carbon = Carbon::start(&tmp.path().join("carbon"));
    let mut v = vigil_to(&carbon, tmp.path());
    let start = now_secs();

    send(&v, "web1.example.com", "cpu user", "0.5");

    let values = carbon.values("com.example.web1.cpu.user", start);
    assert_eq!(values, [0.5], "one point of 0.5");
    v.assert_alive();
}

#[test]
fn points_sent_while_carbon_is_down_arrive_once_it_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let mut carbon = Carbon::start(&tmp.path().join("carbon"));
    let mut v = vigil_to(&carbon, tmp.path());
    let start = now_secs();

    // A first point proves the connection is up before the outage.
    send(&v, "web1", "before", "1");
    assert_eq!(carbon.values("web1.before", start), [1.0]);

    carbon.stop();
    // Distinct services: each point gets its own whisper file.
    for i in 1..=3 {
        send(&v, "web1", &format!("during {i}"), &format!("{i}.25"));
    }
    // Let vigil fail a few reconnects.
    std::thread::sleep(Duration::from_secs(2));
    carbon.spawn();

    for i in 1..=3 {
        let values = carbon.values(&format!("web1.during.{i}"), start);
        assert_eq!(
            values,
            [i as f64 + 0.25],
            "point {i} sent during the outage"
        );
    }
    v.assert_alive();
    let logs = v.logs();
    let count = |what: &str| logs.matches(what).count();
    assert_eq!(
        count("Carbon unreachable"),
        1,
        "one outage, logged once:\n{logs}"
    );
    assert_eq!(
        count("Carbon reachable again"),
        1,
        "recovery logged:\n{logs}"
    );
}

/// Carbon closes the connection on a line over 16 384 bytes and ignores the
/// lines after it in the same read: such a point is dropped before it is
/// written, so the points around it (one `Msg`, one write) all arrive.
#[test]
fn a_point_too_long_for_carbon_does_not_take_its_neighbours_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let carbon = Carbon::start(&tmp.path().join("carbon"));
    let mut v = vigil_to(&carbon, tmp.path());
    let start = now_secs();
    let point = |service: &str, metric: f64| vigil::event::Event {
        host: Some("web1".into()),
        service: Some(service.into()),
        metric: Some(vigil::event::Metric::Float(metric)),
        time: (start * 1e6) as i64,
        ..vigil::event::Event::default()
    };
    let events = [
        point("before", 1.0),
        point(&"x".repeat(20_000), 2.0),
        point("after", 3.0),
    ];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = vigil::client::Client::connect(v.tcp).await.unwrap();
        client.send(&events).await.unwrap();
    });

    assert_eq!(carbon.values("web1.before", start), [1.0]);
    assert_eq!(carbon.values("web1.after", start), [3.0]);
    v.assert_alive();
    let logs = v.logs();
    assert_eq!(
        logs.matches("over carbon's limit dropped").count(),
        1,
        "the drop is logged once:\n{logs}"
    );
}
