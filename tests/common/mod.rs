//! Shared harness for vigil's integration tests.
//!
//! Every test starts its own `vigil run` on ephemeral ports (`Vigil::start`),
//! drives real peers through `run_cmd` (which always has a hard timeout), and
//! polls for conditions with `wait_until` (never asserting on elapsed time).
//!
//! Each test binary uses a subset of these helpers.
#![allow(dead_code)]

pub mod inproc;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// How long `Vigil::start` waits for the `listening` log line.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Default bound for a single peer command (send / query).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// Default bound for polling until an event becomes visible.
pub const VISIBLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many log lines of the server are kept for failure messages.
const LOG_KEEP: usize = 300;

type LogRing = Arc<Mutex<VecDeque<String>>>;

fn push_line(ring: &LogRing, line: String) {
    let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
    if ring.len() == LOG_KEEP {
        ring.pop_front();
    }
    ring.push_back(line);
}

/// A running `vigil run` child process. Killed (and reaped) on drop.
pub struct Vigil {
    child: Child,
    pub tcp: SocketAddr,
    pub udp: SocketAddr,
    /// Set when started with `--grpc`.
    pub grpc: Option<SocketAddr>,
    /// Set when started with `--graphite` (TCP and UDP).
    pub graphite: Option<SocketAddr>,
    /// The HTTP listener (an ephemeral port unless the test chose one); `None` with `--no-http`.
    pub http: Option<SocketAddr>,
    log: LogRing,
    /// The threads reading stdout and stderr: joined once the child exits,
    /// so its last lines are in `log` before a test reads it.
    drains: Vec<thread::JoinHandle<()>>,
}

/// The addresses a `listening` log line announces.
struct Listening {
    tcp: SocketAddr,
    udp: SocketAddr,
    grpc: Option<SocketAddr>,
    graphite: Option<SocketAddr>,
    http: Option<SocketAddr>,
}

impl Vigil {
    /// Start `vigil run --tcp 127.0.0.1:0 --log-format json EXTRA_ARGS...` and
    /// wait until it logs `listening`. Panics (with the stderr seen so far)
    /// when it does not within `START_TIMEOUT` or when it exits early.
    pub fn start(extra_args: &[&str]) -> Vigil {
        Self::start_with_env(extra_args, &[])
    }

    /// Like `start`, with extra environment variables (e.g. secrets a rule
    /// file reads with `env("…")`).
    pub fn start_with_env(extra_args: &[&str], envs: &[(&str, &str)]) -> Vigil {
        let bin = env!("CARGO_BIN_EXE_vigil");
        let mut args: Vec<&str> = vec!["run", "--tcp", "127.0.0.1:0", "--log-format", "json"];
        // Tests run in the source tree: never share its default `vigil-data`.
        if !extra_args
            .iter()
            .any(|a| *a == "--data-dir" || *a == "--no-snapshot")
        {
            args.push("--no-snapshot");
        }
        // Never the fixed default port (tests run in parallel), and no
        // self-metric events in the index unless a test asks for them.
        if !extra_args
            .iter()
            .any(|a| *a == "--http" || *a == "--no-http")
        {
            args.extend(["--http", "127.0.0.1:0"]);
        }
        if !extra_args.contains(&"--self-metrics-interval") {
            args.extend(["--self-metrics-interval", "0"]);
        }
        args.extend_from_slice(extra_args);
        let mut child = Command::new(bin)
            .args(&args)
            .env("NO_COLOR", "1")
            .envs(envs.iter().copied())
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {bin} {args:?}: {e}"));

        let log: LogRing = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let stderr: ChildStderr = child.stderr.take().expect("stderr piped");
        let stdout: ChildStdout = child.stdout.take().expect("stdout piped");

        // Drain stderr for the whole life of the child, so the pipe never fills.
        let mut drains = Vec::new();
        {
            let log = log.clone();
            let drain = thread::Builder::new()
                .name("vigil-stderr".into())
                .spawn(move || {
                    let mut reader = BufReader::new(stderr);
                    let mut buf = Vec::new();
                    loop {
                        buf.clear();
                        match reader.read_until(b'\n', &mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                                push_line(&log, line.clone());
                                // The receiver goes away once started; ignore.
                                let _ = tx.send(line);
                            }
                        }
                    }
                })
                .expect("spawn stderr drain thread");
            drains.push(drain);
        }
        // Drain stdout too (it should be quiet, but never let it block the child).
        {
            let log = log.clone();
            let drain = thread::Builder::new()
                .name("vigil-stdout".into())
                .spawn(move || {
                    let reader = BufReader::new(stdout);
                    for line in reader.split(b'\n') {
                        match line {
                            Ok(l) => {
                                push_line(&log, format!("[stdout] {}", String::from_utf8_lossy(&l)))
                            }
                            Err(_) => break,
                        }
                    }
                })
                .expect("spawn stdout drain thread");
            drains.push(drain);
        }

        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = Vec::new();
        let listening = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => match parse_listening(&line) {
                    Some(Ok(listening)) => break listening,
                    Some(Err(msg)) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!("{msg}\nstderr so far:\n{}", seen.join("\n"));
                    }
                    None => seen.push(line),
                },
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let status = child.wait();
                    panic!(
                        "vigil did not log `listening` within {START_TIMEOUT:?} (args {args:?}, status {status:?}); stderr so far:\n{}",
                        seen.join("\n")
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // stderr closed: the child exited (or closed stderr) before listening.
                    let status = wait_with_timeout(&mut child, Duration::from_secs(5));
                    panic!(
                        "vigil exited before logging `listening` (args {args:?}, status {status:?}); stderr:\n{}",
                        seen.join("\n")
                    );
                }
            }
        };
        Vigil {
            child,
            tcp: listening.tcp,
            udp: listening.udp,
            grpc: listening.grpc,
            graphite: listening.graphite,
            http: listening.http,
            log,
            drains,
        }
    }

    /// The server's process id, e.g. to send it a signal.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The TCP port (UDP uses the same one unless `--udp` was given).
    pub fn port(&self) -> u16 {
        self.tcp.port()
    }

    /// The TCP port as a string, handy for command lines.
    pub fn port_str(&self) -> String {
        self.tcp.port().to_string()
    }

    /// The UDP port as a string.
    pub fn udp_port_str(&self) -> String {
        self.udp.port().to_string()
    }

    /// The IP the TCP listener is bound to, as a string.
    pub fn host_str(&self) -> String {
        self.tcp.ip().to_string()
    }

    /// The last lines the server wrote (stderr, plus stdout prefixed).
    pub fn logs(&self) -> String {
        let ring = self.log.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Send SIGTERM and wait (up to 30 s) for the process to exit; its status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_for_exit(Duration::from_secs(30))
    }

    /// Send signal `name` (`TERM`, `INT`, `HUP`…) to the server.
    pub fn signal(&self, name: &str) {
        let pid = self.pid().to_string();
        run_ok("kill", &[&format!("-{name}"), &pid], CMD_TIMEOUT);
    }

    /// Wait (up to `timeout`) for the process to exit, and read its last
    /// lines; its status. Panics with the log when it does not exit.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.read_to_the_end();
                    return status;
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => panic!(
                    "vigil did not exit within {timeout:?}; last log lines:\n{}",
                    self.logs()
                ),
                Err(e) => panic!("cannot wait for vigil: {e}"),
            }
        }
    }

    /// SIGKILL (no shutdown at all) and reap.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL vigil");
        self.child.wait().expect("reap vigil");
        self.read_to_the_end();
    }

    /// Once the child has exited: waits for its last lines to be read.
    fn read_to_the_end(&mut self) {
        for drain in self.drains.drain(..) {
            let _ = drain.join();
        }
    }

    /// The first log line containing `needle`; panics with the log when
    /// none does.
    pub fn log_line(&self, needle: &str) -> String {
        let logs = self.logs();
        let line = logs.lines().find(|l| l.contains(needle));
        line.map(str::to_owned)
            .unwrap_or_else(|| panic!("no line holds {needle:?}:\n{logs}"))
    }

    /// Poll (up to `timeout`) until a log line contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.logs().contains(needle).then_some(())).is_some()
    }

    /// Panic (with the server's log) when the server process has exited.
    pub fn assert_alive(&mut self) {
        match self.child.try_wait() {
            Ok(None) => {}
            Ok(Some(status)) => panic!(
                "vigil exited unexpectedly ({status}); last log lines:\n{}",
                self.logs()
            ),
            Err(e) => panic!("cannot check vigil's status: {e}"),
        }
    }
}

impl Drop for Vigil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "---- vigil log (last {LOG_KEEP} lines) ----\n{}\n---- end of vigil log ----",
                self.logs()
            );
        }
    }
}

/// Parse one tracing-subscriber JSON line; return its addresses when it is the
/// `listening` line. Non-JSON lines are ignored.
fn parse_listening(line: &str) -> Option<Result<Listening, String>> {
    let v: Value = serde_json::from_str(line.trim()).ok()?;
    let fields = v.get("fields").unwrap_or(&v);
    if fields.get("message").and_then(Value::as_str) != Some("listening") {
        return None;
    }
    let addr = |key: &str| -> Option<SocketAddr> {
        let s = fields.get(key).or_else(|| v.get(key))?.as_str()?;
        // Tolerate a Debug-formatted value such as "\"127.0.0.1:1\"".
        s.trim_matches('"').parse().ok()
    };
    let Some(tcp) = addr("tcp") else {
        return Some(Err(format!(
            "`listening` line without a parsable tcp field: {line}"
        )));
    };
    let Some(udp) = addr("udp") else {
        return Some(Err(format!(
            "`listening` line without a parsable udp field: {line}"
        )));
    };
    Some(Ok(Listening {
        tcp,
        udp,
        grpc: addr("grpc"),
        graphite: addr("graphite"),
        http: addr("http"),
    }))
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                return child.wait().ok();
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Running external commands
// ---------------------------------------------------------------------------

/// A process started from `cmd` with its stderr piped, and its stderr's
/// lines as they come: for a `vigil run` that [`Vigil::start`] cannot start
/// (another environment, a wrapper, a signal while it starts).
pub struct Logging {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    pub seen: String,
}

impl Logging {
    pub fn spawn(mut cmd: Command) -> Logging {
        let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Logging {
            child,
            lines,
            seen: String::new(),
        }
    }

    /// Whether a line holding `needle` was read, so far or within `timeout`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.seen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.lines.recv_timeout(left) else {
                return false;
            };
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        true
    }
}

/// A test that fails before it stops its process does not leave it running.
impl Drop for Logging {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run `program args...` with stdin closed and a hard timeout.
/// On expiry the process is killed and the test panics with what it printed.
pub fn run_cmd(program: impl AsRef<std::ffi::OsStr>, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_command(cmd, timeout)
}

/// `vigil run` on ephemeral ports with `extra_args`, for a start that must
/// be refused: its exit code (`None` if still running at `timeout`, then
/// killed) and what it wrote to stderr.
pub fn run_refused(extra_args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vigil"));
    command
        .args(["run", "--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(extra_args)
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "0");
    let out = run_command(command, timeout);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Like `run_cmd`, for a prepared `Command` (env, cwd, ...).
pub fn run_command(mut cmd: Command, timeout: Duration) -> Output {
    let desc = describe(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| {
        panic!("cannot run {desc}: {e} (run scripts/test, which installs the interop peers)")
    });

    let out_buf = Arc::new(Mutex::new(Vec::new()));
    let err_buf = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let spawn_reader =
        |mut src: Box<dyn Read + Send>, buf: Arc<Mutex<Vec<u8>>>, done: mpsc::Sender<()>| {
            thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match src.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = done.send(());
            });
        };
    spawn_reader(
        Box::new(child.stdout.take().unwrap()),
        out_buf.clone(),
        done_tx.clone(),
    );
    spawn_reader(
        Box::new(child.stderr.take().unwrap()),
        err_buf.clone(),
        done_tx,
    );

    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Err(e) => panic!("waiting for {desc}: {e}"),
        }
    };
    // Collect the output; a grandchild holding the pipes open must not hang us.
    let grace = Instant::now() + Duration::from_secs(3);
    for _ in 0..2 {
        let left = grace.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    let stdout = out_buf.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let stderr = err_buf.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match status {
        Some(status) => Output {
            status,
            stdout,
            stderr,
        },
        None => panic!(
            "{desc} did not finish within {timeout:?}; killed it.\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// A shell-like rendering of a command, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "\"'$\\".contains(c)) {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Render an `Output` for failure messages.
pub fn show(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Panic unless the command succeeded; return its stdout as a String.
pub fn expect_success(what: &str, out: &Output) -> String {
    assert!(out.status.success(), "{what} failed\n{}", show(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run and require success; returns stdout.
pub fn run_ok(program: impl AsRef<std::ffi::OsStr>, args: &[&str], timeout: Duration) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let desc = describe(&cmd);
    let out = run_command(cmd, timeout);
    expect_success(&desc, &out)
}

/// Locate an executable: a path (contains '/') or a name looked up in PATH.
pub fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exec = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_exec(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_exec(p))
}

/// A real collectd, for `secs` seconds (`timeout -k 2` bounds it even if
/// the test panics first: collectd often ignores SIGTERM), run on the
/// config `template` with `@DIR@` its own directory (which has a `base`
/// directory in it) and `@PORT@` vigil's `port`, once `collectd -t`
/// accepts it. Its log goes to a file.
pub struct Collectd {
    pub process: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Collectd {
    pub fn start(template: &str, port: u16, secs: &str) -> Collectd {
        let collectd = find_program("collectd")
            .or_else(|| find_program("/usr/sbin/collectd"))
            .unwrap_or_else(|| {
                panic!("collectd not found: run scripts/test, which installs the interop peers")
            });
        let collectd = collectd.to_str().expect("utf-8 path").to_owned();
        require_peer("timeout");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("base")).unwrap();
        let conf = dir.path().join("collectd.conf");
        let rendered = template
            .replace("@DIR@", dir.path().to_str().expect("utf-8 temp dir"))
            .replace("@PORT@", &port.to_string());
        std::fs::write(&conf, rendered).unwrap();
        let conf = conf.to_str().unwrap();
        let out = run_cmd(&collectd, &["-t", "-C", conf], CMD_TIMEOUT);
        expect_success("collectd -t -C collectd.conf", &out);
        let log = dir.path().join("collectd.log");
        let file = std::fs::File::create(&log).unwrap();
        let process = Command::new("timeout")
            .args(["-k", "2", secs, &collectd, "-f", "-C", conf])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn timeout collectd");
        Collectd {
            process,
            log,
            _dir: dir,
        }
    }

    /// What collectd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Fail (never skip) the test when a peer program is missing.
pub fn require_peer(program: &str) -> PathBuf {
    find_program(program).unwrap_or_else(|| {
        panic!("{program} not found: run scripts/test, which installs the interop peers")
    })
}

/// Poll `f` every 100 ms until it returns `Some`, or give up after `timeout`.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---------------------------------------------------------------------------
// Querying through riemann-c-client
// ---------------------------------------------------------------------------

/// `riemann-client query QUERY -j HOST PORT`, parsed. The C client prints one
/// JSON array on one line: `[{"time":..,"state":..,"service":..,"host":..,
/// "description":..,"ttl":..,"metric_d"|"metric_f"|"metric_sint64":..,
/// "tags":[..],"attributes":{k:v}}]` (absent fields are omitted).
pub fn c_query(v: &Vigil, query: &str) -> Vec<Value> {
    require_peer("riemann-client");
    let port = v.port_str();
    let host = v.host_str();
    let args = ["query", query, "-j", host.as_str(), port.as_str()];
    let out = run_cmd("riemann-client", &args, CMD_TIMEOUT);
    let stdout = expect_success(&format!("riemann-client {args:?}"), &out);
    parse_event_array(&stdout).unwrap_or_else(|e| {
        panic!(
            "riemann-client query -j printed unparsable output ({e}):\n{}",
            show(&out)
        )
    })
}

/// Replace the non-JSON number tokens some clients print (riemann-client -j
/// prints a NaN metric as a bare `NaN`, e.g. collectd's first derive rate)
/// with `null`, leaving string contents alone.
pub fn sanitize_json_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let chars: Vec<char> = text.chars().collect();
    let (mut i, mut in_str, mut esc) = (0, false, false);
    while i < chars.len() {
        let c = chars[i];
        if in_str {
            out.push(c);
            if esc {
                esc = false;
            } else if c == '\\' {
                esc = true;
            } else if c == '"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if c == '"' {
            in_str = true;
            out.push(c);
            i += 1;
            continue;
        }
        // A word (optionally signed) outside a string.
        let start = i;
        let mut j = i;
        if (c == '-' || c == '+') && chars.get(i + 1).is_some_and(|n| n.is_ascii_alphabetic()) {
            j += 1;
        }
        if chars.get(j).is_some_and(|n| n.is_ascii_alphabetic()) {
            while chars.get(j).is_some_and(|n| n.is_ascii_alphabetic()) {
                j += 1;
            }
            let word: String = chars[start..j].iter().collect();
            let bare = word.trim_start_matches(['-', '+']).to_ascii_lowercase();
            if matches!(bare.as_str(), "nan" | "inf" | "infinity") {
                out.push_str("null");
            } else {
                out.push_str(&word);
            }
            i = j;
            continue;
        }
        out.push(c);
        i += 1;
    }
    out
}

/// Parse a JSON array of events (or a sequence of JSON values/lines).
/// Bare `NaN`/`Infinity` metrics become `null`.
pub fn parse_event_array(text: &str) -> Result<Vec<Value>, String> {
    let text = sanitize_json_numbers(text.trim());
    let text = text.as_str();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut all = Vec::new();
    for v in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
        match v.map_err(|e| e.to_string())? {
            Value::Array(items) => all.extend(items),
            obj @ Value::Object(_) => all.push(obj),
            other => return Err(format!("unexpected JSON value {other}")),
        }
    }
    Ok(all)
}

/// Poll `riemann-client query` until it returns at least one event.
pub fn c_query_until_some(v: &Vigil, query: &str, timeout: Duration) -> Vec<Value> {
    let mut last = Vec::new();
    wait_until(timeout, || {
        last = c_query(v, query);
        (!last.is_empty()).then(|| last.clone())
    })
    .unwrap_or_else(|| {
        panic!("no event matched {query:?} within {timeout:?}; last result: {last:?}")
    })
}

/// All metric values an event carries: the C/Python clients' `metric_d`,
/// `metric_f`, `metric_sint64`, or Riemann JSON's `metric`.
pub fn metric_values(ev: &Value) -> Vec<f64> {
    ["metric_sint64", "metric_d", "metric_f", "metric"]
        .iter()
        .filter_map(|k| ev.get(*k))
        .filter_map(|m| {
            m.as_f64()
                .or_else(|| m.as_str().and_then(|s| s.parse().ok()))
        })
        .collect()
}

/// Assert the event has a metric and every metric field it has equals `want`.
pub fn assert_metric(ev: &Value, want: f64) {
    let ms = metric_values(ev);
    assert!(!ms.is_empty(), "event has no metric: {ev}");
    for m in ms {
        assert!(
            (m - want).abs() <= 1e-9 * want.abs().max(1.0),
            "metric {m} != {want} in {ev}"
        );
    }
}

pub fn str_field<'a>(ev: &'a Value, key: &str) -> Option<&'a str> {
    ev.get(key).and_then(Value::as_str)
}

pub fn num_field(ev: &Value, key: &str) -> Option<f64> {
    ev.get(key).and_then(Value::as_f64)
}

/// Tags of an event as strings.
pub fn tags(ev: &Value) -> Vec<String> {
    ev.get("tags")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// An attribute of an event: `attributes` as an object (C / Python clients) or
/// a list of `{key, value}`, or a top-level key (Riemann JSON).
pub fn attr<'a>(ev: &'a Value, key: &str) -> Option<&'a str> {
    match ev.get("attributes") {
        Some(Value::Object(m)) => {
            if let Some(s) = m.get(key).and_then(Value::as_str) {
                return Some(s);
            }
        }
        Some(Value::Array(items)) => {
            for it in items {
                if it.get("key").and_then(Value::as_str) == Some(key) {
                    return it.get("value").and_then(Value::as_str);
                }
            }
        }
        _ => {}
    }
    ev.get(key).and_then(Value::as_str)
}

/// The event's time in seconds, from `time_micros` or `time` (number or ISO-ish string is not parsed).
pub fn event_time_secs(ev: &Value) -> Option<f64> {
    if let Some(us) = ev.get("time_micros").and_then(Value::as_f64) {
        return Some(us / 1e6);
    }
    ev.get("time").and_then(Value::as_f64)
}

/// Assert the time is a plausible "now" stamp (within a day of the wall
/// clock): the server stamps arrival time when the client sends none.
pub fn assert_time_is_recent(ev: &Value) {
    let t = event_time_secs(ev).unwrap_or_else(|| panic!("event has no numeric time: {ev}"));
    let now = now_secs();
    assert!(
        (t - now).abs() < 86_400.0,
        "event time {t} is not near now ({now}): {ev}"
    );
}

/// Find the single event with the given service in a list.
pub fn by_service<'a>(events: &'a [Value], service: &str) -> &'a Value {
    let found: Vec<&Value> = events
        .iter()
        .filter(|e| str_field(e, "service") == Some(service))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one event with service {service:?}, got {events:?}"
    );
    found[0]
}

/// The peak resident size of process `pid` (`VmHWM`), in bytes.
pub fn peak_of(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}

/// The resident size of process `pid` now (`VmRSS`), in bytes.
pub fn resident_of(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status.lines().find(|l| l.starts_with(field)).expect(field);
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// The text of `GET /metrics` on `http`.
pub async fn metrics_text(http: SocketAddr) -> String {
    let response = reqwest::get(format!("http://{http}/metrics"))
        .await
        .unwrap();
    response.text().await.unwrap()
}

/// `name`'s value in `GET /metrics` at `http`; panics, with the text, when
/// there is none.
pub async fn metric(http: SocketAddr, name: &str) -> u64 {
    let text = metrics_text(http).await;
    let line = text.lines().find(|l| l.split(' ').next() == Some(name));
    let value = line.and_then(|l| l.split(' ').nth(1));
    value
        .unwrap_or_else(|| panic!("{name} in {text}"))
        .parse()
        .unwrap()
}

/// The `i`th of a client's many distinct cheap queries, for the tests of a
/// flood of them: fifteen comparisons that hold for the agent's events,
/// then service `zzz{i}` (as many terms as a query may have and not be
/// weighed alone). Hundreds of them must take well over a quarter of a
/// core together while an agent sends, on a loaded machine too: a search
/// of the service alone did not, at times, once the ledger charged what
/// queries take.
pub fn cheap_query(i: usize) -> String {
    let mut terms: Vec<String> = (0..15).map(|j| format!(r#"host != "x{i}.{j}""#)).collect();
    terms.push(format!(r#"service = "zzz{i}""#));
    let query = terms.join(" and ");
    assert!(
        !vigil::query::Query::parse(&query).unwrap().costly(),
        "{query}"
    );
    query
}

/// An agent on `tcp` sending `agent`/`0`, `agent`/`1`, … (state `ok`, ten a
/// message, each acknowledged) until `stop`; the task returns how many it
/// sent.
pub fn agent_until(
    tcp: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    use std::sync::atomic::Ordering;
    use vigil::clock::{Clock, SystemClock};
    tokio::spawn(async move {
        let mut client = vigil::client::Client::connect(tcp)
            .await
            .expect("tcp connects");
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            let batch: Vec<vigil::event::Event> = (sent..sent + 10)
                .map(|n| vigil::event::Event {
                    host: Some("agent".into()),
                    service: Some(n.to_string()),
                    state: Some("ok".into()),
                    time: SystemClock.now(),
                    ..Default::default()
                })
                .collect();
            client.send(&batch).await.expect("events acknowledged");
            sent += 10;
        }
        sent
    })
}
