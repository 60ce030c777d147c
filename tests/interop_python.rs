//! Interop with the real Python client from PyPI (`riemann-client==7.0.0`,
//! installed once into a venv at `target/interop/py-venv`): send over TCP and
//! UDP with its CLI, query with its `query` subcommand, assert on the fields.
//!
//! Its CLI: `riemann-client -H HOST -P PORT -T tcp|udp send -s SERVICE -S STATE
//! -h HOST -m METRIC -l TTL -t TAG -a k=v -d DESC` (note `-s`/`-S` are the
//! reverse of the C CLI); `send` echoes the event as pretty JSON, `query Q`
//! prints a pretty JSON array. It sends metrics as `metric_f` only and no time.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use serde_json::Value;

const PY_PACKAGE: &str = "riemann-client==7.0.0";

/// `<target>/interop/py-venv` (CARGO_TARGET_TMPDIR is `<target>/tmp`).
fn venv_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("interop")
        .join("py-venv")
}

/// Create the venv and install the client once; returns the CLI's path.
fn python_cli() -> &'static Path {
    static CLI: OnceLock<PathBuf> = OnceLock::new();
    CLI.get_or_init(|| {
        let dir = venv_dir();
        let cli = dir.join("bin").join("riemann-client");
        let marker = dir.join(".vigil-ready");
        if marker.is_file() && std::fs::read_to_string(&marker).ok().as_deref() == Some(PY_PACKAGE) && cli.is_file() {
            return cli;
        }
        require_peer("python3");
        // A half-made venv from an interrupted run is rebuilt from scratch.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.parent().unwrap()).expect("create target/interop");
        let d = dir.to_str().expect("utf-8 path");
        let out = run_cmd("python3", &["-m", "venv", d], Duration::from_secs(180));
        assert!(
            out.status.success(),
            "python3 -m venv {d} failed (on Debian it needs python3-venv: run scripts/test, which installs the interop peers)\n{}",
            show(&out)
        );
        let pip = dir.join("bin").join("pip");
        let mut cmd = Command::new(&pip);
        cmd.args(["install", "--disable-pip-version-check", "--no-input", "-q", PY_PACKAGE]);
        cmd.env("PIP_NO_INPUT", "1");
        let out = run_command(cmd, Duration::from_secs(400));
        expect_success(&format!("{} install {PY_PACKAGE}", pip.display()), &out);
        assert!(cli.is_file(), "pip installed {PY_PACKAGE} but {} is missing", cli.display());
        std::fs::write(&marker, PY_PACKAGE).expect("write venv marker");
        cli
    })
}

fn py(v_host: &str, port: &str, transport: &str, rest: &[&str]) -> String {
    let cli = python_cli();
    let mut args = vec!["-H", v_host, "-P", port, "-T", transport];
    if transport == "tcp" {
        // (`--timeout cannot be used with the UDP transport`)
        args.extend_from_slice(&["-I", "5"]);
    }
    args.extend_from_slice(rest);
    let mut cmd = Command::new(cli);
    cmd.args(&args);
    let desc = describe(&cmd);
    let out = run_command(cmd, CMD_TIMEOUT);
    expect_success(&desc, &out)
}

fn py_query(v: &Vigil, query: &str) -> Vec<Value> {
    let stdout = py(&v.host_str(), &v.port_str(), "tcp", &["query", query]);
    parse_event_array(&stdout)
        .unwrap_or_else(|e| panic!("python query printed unparsable output ({e}):\n{stdout}"))
}

#[allow(clippy::too_many_arguments)]
fn py_send(
    host: &str,
    port: &str,
    transport: &str,
    service: &str,
    state: &str,
    metric: &str,
    ttl: &str,
    desc: &str,
) -> Value {
    let stdout = py(
        host,
        port,
        transport,
        &[
            "send",
            "-s",
            service,
            "-S",
            state,
            "-h",
            "py-host",
            "-m",
            metric,
            "-l",
            ttl,
            "-t",
            "t1",
            "-t",
            "t2",
            "-a",
            "env=prod",
            "-a",
            "lang=python",
            "-d",
            desc,
        ],
    );
    // `send` echoes the event it sent as JSON.
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("python send echoed unparsable JSON ({e}):\n{stdout}"))
}

fn assert_py_event(ev: &Value, service: &str, state: &str, metric: f64, ttl: f64, desc: &str) {
    assert_eq!(str_field(ev, "host"), Some("py-host"), "{ev}");
    assert_eq!(str_field(ev, "service"), Some(service), "{ev}");
    assert_eq!(str_field(ev, "state"), Some(state), "{ev}");
    assert_eq!(str_field(ev, "description"), Some(desc), "{ev}");
    assert_metric(ev, metric);
    assert_eq!(tags(ev), vec!["t1".to_string(), "t2".to_string()], "{ev}");
    assert_eq!(num_field(ev, "ttl"), Some(ttl), "{ev}");
    assert_eq!(attr(ev, "env"), Some("prod"), "{ev}");
    assert_eq!(attr(ev, "lang"), Some("python"), "{ev}");
}

#[test]
fn python_tcp_send_and_query() {
    let v = Vigil::start(&[]);
    let (h, p) = (v.host_str(), v.port_str());

    let echoed = py_send(&h, &p, "tcp", "py tcp", "ok", "1.5", "30", "from python");
    assert_eq!(
        echoed["metric_f"].as_f64(),
        Some(1.5),
        "python echo: {echoed}"
    );
    py_send(
        &h,
        &p,
        "tcp",
        "py tcp other",
        "critical",
        "-0.25",
        "60",
        "another",
    );

    let events = py_query(&v, "service = \"py tcp\"");
    assert_eq!(events.len(), 1, "{events:?}");
    assert_py_event(&events[0], "py tcp", "ok", 1.5, 30.0, "from python");
    // No time was sent: the server stamped one.
    assert_time_is_recent(&events[0]);

    let events = py_query(&v, "host = \"py-host\"");
    assert_eq!(events.len(), 2, "{events:?}");
    assert_py_event(
        by_service(&events, "py tcp other"),
        "py tcp other",
        "critical",
        -0.25,
        60.0,
        "another",
    );

    // The C client sees the same event.
    require_peer("riemann-client");
    let c = c_query(&v, "service = \"py tcp\"");
    assert_eq!(c.len(), 1, "{c:?}");
    assert_py_event(&c[0], "py tcp", "ok", 1.5, 30.0, "from python");
}

#[test]
fn python_udp_send_tcp_query() {
    let v = Vigil::start(&[]);
    py_send(
        &v.udp.ip().to_string(),
        &v.udp_port_str(),
        "udp",
        "py udp",
        "warning",
        "8",
        "45",
        "udp from python",
    );
    let mut last = Vec::new();
    let events = wait_until(VISIBLE_TIMEOUT, || {
        last = py_query(&v, "service = \"py udp\"");
        (!last.is_empty()).then(|| last.clone())
    })
    .unwrap_or_else(|| panic!("event sent over UDP never became visible; last: {last:?}"));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_py_event(
        &events[0],
        "py udp",
        "warning",
        8.0,
        45.0,
        "udp from python",
    );
}
