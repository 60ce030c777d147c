//! TLS on the Riemann TCP protocol: a test CA, server and client certificates
//! made here with rcgen; a rustls client (tokio-rustls) sends and queries
//! in-process; client certificates are enforced with a client CA; a stalled
//! handshake is cut off; and riemann-c-client (`-G`) talks to the real binary.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_util::codec::Framed;

use vigil::client::Client;
use vigil::clock::{ManualClock, SharedClock};
use vigil::index::{Index, IndexConfig};
use vigil::proto::{Msg, PbEvent, PbQuery};
use vigil::server::{Server, ServerConfig};
use vigil::stats::Stats;
use vigil::streams::IndexEverything;
use vigil::tcp;
use vigil::tls::{self, TlsListener};

const WAIT: Duration = Duration::from_secs(10);
/// The in-process servers' clock, which never moves: microseconds since the epoch.
const NOW: i64 = 1_700_000_000_000_000;

/// PEM files of one test PKI, in a temporary directory.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    /// Signed by `ca`.
    client: (CertificateDer<'static>, PrivateKeyDer<'static>),
    /// Signed by another CA.
    rogue_client: (CertificateDer<'static>, PrivateKeyDer<'static>),
    /// The client's files, for riemann-client.
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf certificate signed by `issuer`: its DER and its key.
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (rcgen::Certificate, KeyPair) {
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert, key)
}

fn der(pair: &(rcgen::Certificate, KeyPair)) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = PrivateKeyDer::try_from(pair.1.serialize_der()).unwrap();
    (pair.0.der().clone(), key)
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let authority = ca("vigil test CA");
        let server = leaf(
            &authority,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = leaf(&authority, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
        let rogue = leaf(
            &ca("rogue CA"),
            &["rogue"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Pki {
            ca: write("ca.pem", authority.pem()),
            server_cert: write("server.pem", server.0.pem()),
            server_key: write("server.key", server.1.serialize_pem()),
            client_cert: write("client.pem", client.0.pem()),
            client_key: write("client.key", client.1.serialize_pem()),
            client: der(&client),
            rogue_client: der(&rogue),
            _dir: dir,
        }
    }

    /// The real binary serving TLS with the server's files; with
    /// `client_ca`, requiring client certificates signed by the test CA.
    fn vigil(&self, client_ca: bool) -> common::Vigil {
        let (cert, key, ca) = (
            text(&self.server_cert),
            text(&self.server_key),
            text(&self.ca),
        );
        let mut args = vec![
            "--tls",
            "127.0.0.1:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ];
        if client_ca {
            args.extend(["--tls-ca", &ca]);
        }
        common::Vigil::start(&args)
    }

    fn listener(&self, client_ca: bool) -> TlsListener {
        let ca = client_ca.then_some(self.ca.as_path());
        let acceptor = tls::Acceptor::load(&self.server_cert, &self.server_key, ca);
        TlsListener {
            addr: "127.0.0.1:0".parse().unwrap(),
            acceptor: Arc::new(acceptor.expect("TLS config")),
        }
    }

    /// A rustls client trusting the test CA, presenting `identity` if given.
    fn connector(
        &self,
        identity: Option<&(CertificateDer<'static>, PrivateKeyDer<'static>)>,
    ) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        let ca = std::fs::read(&self.ca).unwrap();
        for cert in rustls_pem_certs(&ca) {
            roots.add(cert).unwrap();
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(vec![cert.clone()], key.clone_key())
                .unwrap(),
        };
        TlsConnector::from(Arc::new(config))
    }
}

/// A path as a command-line argument or a rule file's string.
fn text(path: &Path) -> String {
    path.to_str().expect("a UTF-8 temporary path").to_owned()
}

fn rustls_pem_certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .unwrap()
}

async fn start(tls: TlsListener, read_timeout: Duration) -> (Server, Arc<Index>) {
    let index = Arc::new(Index::new(IndexConfig::default()));
    let clock: SharedClock = Arc::new(ManualClock::new(NOW));
    let config = ServerConfig {
        tcp: "127.0.0.1:0".parse().unwrap(),
        tls: Some(tls),
        read_timeout,
        ..ServerConfig::default()
    };
    let streams = Arc::new(IndexEverything::new(index.clone()));
    let server = Server::start(config, index.clone(), streams, clock)
        .await
        .expect("server starts");
    (server, index)
}

/// One request and its reply over any stream; `None` when the server closed
/// (or reset) the connection instead of answering.
async fn call<S: AsyncRead + AsyncWrite + Unpin>(stream: S, msg: Msg) -> Option<Msg> {
    let mut framed = Framed::new(stream, tcp::codec(tcp::DEFAULT_MAX_FRAME));
    let exchange = async {
        let body = bytes::Bytes::from(msg.encode_to_vec());
        framed.send(body).await.ok()?;
        let reply = framed.next().await?.ok()?;
        Some(Msg::decode(reply.freeze()).expect("reply decodes"))
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .expect("answered or closed in time")
}

fn send_msg(host: &str, service: &str) -> Msg {
    Msg {
        events: vec![PbEvent {
            host: Some(host.into()),
            service: Some(service.into()),
            ..PbEvent::default()
        }],
        ..Msg::default()
    }
}

fn query_msg(query: &str) -> Msg {
    Msg {
        query: Some(PbQuery {
            string: Some(query.into()),
        }),
        ..Msg::default()
    }
}

/// Connects and handshakes; over TLS 1.3 a refused client certificate only
/// shows on the first read, so this succeeding proves nothing by itself.
async fn tls_connect(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// Sends one event over a fresh TLS connection; `None` when refused.
async fn tls_send(connector: &TlsConnector, addr: SocketAddr, service: &str) -> Option<Msg> {
    let stream = tls_connect(connector, addr).await.ok()?;
    call(stream, send_msg("tls", service)).await
}

async fn wait_count(stats: &Stats, pick: fn(&Stats) -> &std::sync::atomic::AtomicU64, want: u64) {
    let deadline = Instant::now() + WAIT;
    while Stats::get(pick(stats)) != want {
        assert!(
            Instant::now() < deadline,
            "counter at {} instead of {want}",
            Stats::get(pick(stats))
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rustls_client_sends_and_queries_over_tls_while_plain_tcp_keeps_working() {
    let pki = Pki::new();
    let (server, index) = start(pki.listener(false), tcp::DEFAULT_READ_TIMEOUT).await;
    let tls_addr = server.tls_addr.expect("TLS listens");
    assert_ne!(tls_addr, server.tcp_addr);

    let connector = pki.connector(None);
    let reply = tls_send(&connector, tls_addr, "secure")
        .await
        .expect("acked");
    assert_eq!(reply.ok, Some(true));
    assert!(index.get("tls", "secure").is_some());

    let stream = tls_connect(&connector, tls_addr).await.unwrap();
    let reply = call(stream, query_msg(r#"host = "tls""#)).await.unwrap();
    assert_eq!(reply.ok, Some(true));
    assert_eq!(reply.events[0].service.as_deref(), Some("secure"));

    // Plain TCP on its own port sees the same index.
    let mut plain = Client::connect(server.tcp_addr).await.unwrap();
    assert_eq!(plain.query(r#"host = "tls""#).await.unwrap().len(), 1);
    assert_eq!(Stats::get(&server.stats.tls_connections), 2);
    assert_eq!(Stats::get(&server.stats.tls_handshake_failures), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_with_a_cert_it_signed_are_served() {
    let pki = Pki::new();
    let (server, index) = start(pki.listener(true), tcp::DEFAULT_READ_TIMEOUT).await;
    let tls_addr = server.tls_addr.unwrap();

    let anonymous = tls_send(&pki.connector(None), tls_addr, "anonymous").await;
    assert!(
        anonymous.is_none(),
        "no certificate: refused, got {anonymous:?}"
    );
    let rogue = tls_send(&pki.connector(Some(&pki.rogue_client)), tls_addr, "rogue").await;
    assert!(
        rogue.is_none(),
        "another CA's certificate: refused, got {rogue:?}"
    );
    wait_count(&server.stats, |s| &s.tls_handshake_failures, 2).await;

    let signed = tls_send(&pki.connector(Some(&pki.client)), tls_addr, "signed").await;
    assert_eq!(signed.expect("served").ok, Some(true));
    assert!(index.get("tls", "signed").is_some());
    assert!(index.get("tls", "anonymous").is_none() && index.get("tls", "rogue").is_none());
    assert_eq!(Stats::get(&server.stats.tls_connections), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_plain_text_handshake_is_cut_off_and_counted() {
    let pki = Pki::new();
    let (server, _) = start(pki.listener(false), Duration::from_secs(1)).await;
    let tls_addr = server.tls_addr.unwrap();

    // Connects and says nothing: the handshake times out.
    let mut stalled = TcpStream::connect(tls_addr).await.unwrap();
    // Speaks plain Riemann to the TLS port: the handshake fails.
    let mut plain = TcpStream::connect(tls_addr).await.unwrap();
    let body = send_msg("plain", "on tls port").encode_to_vec();
    plain.write_u32(body.len() as u32).await.unwrap();
    plain.write_all(&body).await.unwrap();

    for stream in [&mut stalled, &mut plain] {
        let mut sink = Vec::new();
        let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut sink)).await;
        assert!(read.is_ok(), "the server closes the connection");
    }
    wait_count(&server.stats, |s| &s.tls_handshake_failures, 2).await;
    wait_count(&server.stats, |s| &s.tcp_connections_open, 0).await;

    let reply = tls_send(&pki.connector(None), tls_addr, "after").await;
    assert_eq!(reply.expect("served").ok, Some(true));
}

#[tokio::test]
async fn unreadable_or_mismatched_pem_files_are_reported() {
    let pki = Pki::new();
    let missing = Path::new("/nonexistent/cert.pem");
    let Err(error) = tls::acceptor(missing, &pki.server_key, None) else {
        panic!("a missing certificate file is an error");
    };
    assert!(
        format!("{error:#}").contains("/nonexistent/cert.pem"),
        "{error:#}"
    );
    // The client's key with the server's certificate.
    let Err(error) = tls::acceptor(&pki.server_cert, &pki.client_key, None) else {
        panic!("a key of another certificate is an error");
    };
    let expected = format!(
        "{}: not the private key of the certificate in {}",
        pki.client_key.display(),
        pki.server_cert.display()
    );
    assert_eq!(format!("{error:#}"), expected);
}

/// The TLS address from the real binary's `listening` line.
fn tls_addr_of(v: &common::Vigil) -> SocketAddr {
    let line = v.log_line("\"listening\"");
    let json: serde_json::Value = serde_json::from_str(&line).unwrap();
    json["fields"]["tls"]
        .as_str()
        .expect("a tls field")
        .parse()
        .unwrap()
}

/// riemann-c-client (GnuTLS) with `-G` and a client certificate, against
/// `vigil run --tls-cert --tls-key --tls-ca`.
#[test]
fn riemann_client_sends_and_queries_over_tls_with_a_client_certificate() {
    common::require_peer("riemann-client");
    let pki = Pki::new();
    let v = pki.vigil(true);
    let ca = text(&pki.ca);
    let addr = tls_addr_of(&v);
    let port = addr.port().to_string();
    let options = [
        "-G".to_owned(),
        "-o".to_owned(),
        format!("cafile={ca}"),
        "-o".to_owned(),
        format!("certfile={}", text(&pki.client_cert)),
        "-o".to_owned(),
        format!("keyfile={}", text(&pki.client_key)),
    ];
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = vec![args[0]];
        all.extend(options.iter().map(String::as_str));
        all.extend_from_slice(&args[1..]);
        all.extend(["127.0.0.1", port.as_str()]);
        common::run_ok("riemann-client", &all, common::CMD_TIMEOUT)
    };
    run(&[
        "send", "-h", "gnutls", "-S", "interop", "-s", "ok", "-d", "2.5",
    ]);
    let out = run(&["query", r#"host = "gnutls""#, "-j"]);
    let events = common::parse_event_array(&out).unwrap();
    let event = common::by_service(&events, "interop");
    common::assert_metric(event, 2.5);

    // Without a client certificate, the same client is turned away.
    let refused = common::run_cmd(
        "riemann-client",
        &[
            "send",
            "-G",
            "-o",
            &format!("cafile={ca}"),
            "-h",
            "gnutls",
            "-S",
            "anonymous",
            "127.0.0.1",
            &port,
        ],
        common::CMD_TIMEOUT,
    );
    assert!(!refused.status.success(), "{}", common::show(&refused));
}

/// A vigil (the real binary) indexing everything and forwarding it over TLS
/// to 127.0.0.1:`port` with `tls`, the forward's TLS parameters.
fn forwarding_over_tls(dir: &Path, port: u16, tls: &str) -> common::Vigil {
    let rules = dir.join(format!("forward-{port}-{}.vigil", tls.len()));
    let source = format!(
        "output next = forward(host: \"127.0.0.1\", port: {port}, {tls})\nstreams {{\n  next\n}}\n"
    );
    std::fs::write(&rules, source).unwrap();
    common::Vigil::start(&["--rules", rules.to_str().unwrap()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_output_delivers_over_tls_with_its_client_certificate() {
    let pki = Pki::new();
    let (central, index) = start(pki.listener(true), tcp::DEFAULT_READ_TIMEOUT).await;
    let port = central.tls_addr.expect("TLS listens").port();
    let identity = format!(
        "tls_cert: \"{}\", tls_key: \"{}\"",
        text(&pki.client_cert),
        text(&pki.client_key)
    );
    let dir = tempfile::tempdir().unwrap();
    let send = |edge: &common::Vigil, service: &'static str| {
        let addr = format!("127.0.0.1:{}", edge.port());
        async move {
            let mut client = Client::connect(addr).await.unwrap();
            // Of the central's time: an event left at time 0 (1970) was
            // indexed, then expired at the central's next tick (100 ms), and
            // a check that polled too late under load missed it for good.
            let event = vigil::event::Event {
                host: Some("edge".into()),
                service: Some(service.into()),
                time: NOW,
                ..Default::default()
            };
            client.send(&[event]).await.unwrap();
        }
    };
    let arrived = |service: &'static str| {
        let index = index.clone();
        async move {
            let deadline = Instant::now() + WAIT;
            while index.get("edge", service).is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            index.get("edge", service).is_some()
        }
    };

    // Checked for the host's address (the server's certificate names it).
    let tls = format!("tls_ca: \"{}\", {identity}", text(&pki.ca));
    let edge = forwarding_over_tls(dir.path(), port, &tls);
    send(&edge, "trusted").await;
    assert!(arrived("trusted").await, "{}", edge.logs());
    // It stays: the central's expiry, at its time, finds nothing due.
    assert_eq!(index.expire(NOW, |_| {}), 0, "expired on arrival");
    assert!(index.get("edge", "trusted").is_some());

    // Another name than the certificate's: nothing is delivered, and the
    // log says why.
    let tls = format!(
        "tls_ca: \"{}\", tls_name: \"elsewhere\", {identity}",
        text(&pki.ca)
    );
    let misnamed = forwarding_over_tls(dir.path(), port, &tls);
    send(&misnamed, "misnamed").await;
    assert!(
        misnamed.wait_for_log("certificate not valid for name", WAIT),
        "{}",
        misnamed.logs()
    );
    assert!(index.get("edge", "misnamed").is_none());

    // Without its certificate, the central refuses it.
    let tls = format!("tls_ca: \"{}\"", text(&pki.ca));
    let anonymous = forwarding_over_tls(dir.path(), port, &tls);
    send(&anonymous, "anonymous").await;
    let refused = "connection failed: received fatal alert: CertificateRequired";
    assert!(
        anonymous.wait_for_log(refused, WAIT),
        "{}",
        anonymous.logs()
    );
    assert!(index.get("edge", "anonymous").is_none());
}

/// The certificate the server at `addr` presents.
async fn presented(connector: &TlsConnector, addr: SocketAddr) -> CertificateDer<'static> {
    let stream = tls_connect(connector, addr).await.expect("handshake");
    let certs = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate");
    certs[0].clone().into_owned()
}

fn der_of(pem: &Path) -> CertificateDer<'static> {
    rustls_pem_certs(&std::fs::read(pem).unwrap()).remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_renews_the_listeners_certificate_and_keeps_it_when_the_files_are_bad() {
    let pki = Pki::new();
    let v = pki.vigil(false);
    let addr = tls_addr_of(&v);
    let connector = pki.connector(None);
    let first = der_of(&pki.server_cert);
    assert_eq!(presented(&connector, addr).await, first);
    let hangup = || common::run_ok("kill", &["-HUP", &v.pid().to_string()], common::CMD_TIMEOUT);

    // Renewed in place (another key, same CA): new connections get it.
    let renewed = Pki::new();
    let authority = std::fs::read(&renewed.ca).unwrap();
    std::fs::copy(&renewed.server_cert, &pki.server_cert).unwrap();
    std::fs::copy(&renewed.server_key, &pki.server_key).unwrap();
    hangup();
    assert!(v.wait_for_log("TLS files reloaded.", WAIT), "{}", v.logs());
    let second = der_of(&pki.server_cert);
    assert_ne!(first, second);
    std::fs::write(&pki.ca, authority).unwrap();
    let connector = pki.connector(None);
    assert_eq!(presented(&connector, addr).await, second);

    // A key that does not go with the certificate: refused, counted, and
    // the listener goes on with the certificate it had.
    std::fs::copy(&pki.client_key, &pki.server_key).unwrap();
    hangup();
    assert!(
        v.wait_for_log("TLS files not reloaded", WAIT),
        "{}",
        v.logs()
    );
    assert!(
        v.logs()
            .contains("not the private key of the certificate in"),
        "{}",
        v.logs()
    );
    assert_eq!(presented(&connector, addr).await, second);

    // A FIFO in place of the certificate: refused without being opened
    // (with no writer, opening it would block for good).
    std::fs::remove_file(&pki.server_cert).unwrap();
    let cert = text(&pki.server_cert);
    common::run_ok("mkfifo", &[&cert], common::CMD_TIMEOUT);
    hangup();
    let refused = format!("{cert}: not a regular file (a FIFO)");
    assert!(v.wait_for_log(&refused, WAIT), "{}", v.logs());
    assert_eq!(presented(&connector, addr).await, second);
    let metrics = common::metrics_text(v.http.expect("an HTTP listener")).await;
    assert!(
        metrics.contains("\nvigil_tls_reload_failures_total 2\n"),
        "{metrics}"
    );
}

#[test]
fn vigil_send_and_query_talk_tls_with_a_client_certificate() {
    let pki = Pki::new();
    let v = pki.vigil(true);
    let ca = text(&pki.ca);
    let addr = tls_addr_of(&v).to_string();
    let (client_cert, client_key) = (text(&pki.client_cert), text(&pki.client_key));
    let identity = [
        "--tls-ca",
        &ca,
        "--tls-cert",
        &client_cert,
        "--tls-key",
        &client_key,
    ];
    let vigil =
        |args: &[&str]| common::run_cmd(env!("CARGO_BIN_EXE_vigil"), args, common::CMD_TIMEOUT);
    let mut send = vec!["send", "--host", "cli", "--service", "over-tls", &addr];
    send.extend(identity);
    let sent = vigil(&send);
    assert!(sent.status.success(), "{}", common::show(&sent));
    let mut query = vec!["query", r#"host = "cli""#, &addr];
    query.extend(identity);
    let answer = vigil(&query);
    let text = common::expect_success("vigil query over TLS", &answer);
    assert!(text.contains(r#""service":"over-tls""#), "{text}");

    // Without a client certificate, the server turns it away, and says so.
    let anonymous = vigil(&["query", "true", &addr, "--tls-ca", &ca]);
    assert!(!anonymous.status.success());
    let said = String::from_utf8_lossy(&anonymous.stderr);
    assert_eq!(
        said.matches("CertificateRequired").count(),
        1,
        "said once: {said}"
    );

    // Plain text to the TLS port: told so, not a frame of hundreds of MB.
    let plain = vigil(&["query", "true", &addr]);
    assert!(!plain.status.success());
    let said = String::from_utf8_lossy(&plain.stderr);
    assert!(
        said.contains("the server answered in TLS: connect with TLS"),
        "{said}"
    );

    // The server warned of the first failed handshake, and why; the second,
    // within 10 s, only counted.
    let warned = "TLS handshake failed (more are logged at most every 10 s";
    assert!(v.wait_for_log(warned, WAIT), "{}", v.logs());
    let logs = v.logs();
    assert_eq!(logs.matches(warned).count(), 1, "{logs}");
    assert!(logs.contains("peer sent no certificates"), "{logs}");
}
