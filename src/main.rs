//! The `vigil` command: `run` the server, `send` an event, `query` the index.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use vigil::answers::{self, Answers};
use vigil::client::{Client, ClientError};
use vigil::clock::{Clock, Micros, SharedClock, SystemClock};
use vigil::cluster::{Cluster, ClusterConfig};
use vigil::event::{Event, Metric};
use vigil::forwarded::{TrustedProxies, TrustedProxy};
use vigil::frame::FrameError;
use vigil::grpc::{Grpc, GrpcLimits};
use vigil::http::{HttpConfig, HttpServer};
use vigil::index::{DEFAULT_TTL_SECS, Index, IndexConfig};
use vigil::limits::Limits;
use vigil::outputs::Kept;
use vigil::rules::engine::Rules;
use vigil::rules::junit::Junit;
use vigil::rules::reload::{Outputs, Reloader};
use vigil::rules::{
    self, DEFAULT_RULES, DEFAULT_RULES_NAME, EnvPolicy, RuleText, persist, testing,
};
use vigil::selfmetrics::{self, Emitter, Histogram, Telemetry, TimedStreams};
use vigil::server::{Server, ServerConfig};
use vigil::snapshot::{self, Snapshots};
use vigil::stats::Stats;
use vigil::streams::Streams;
use vigil::tls::{self, TlsListener};
use vigil::{budget, pubsub};
use vigil::{json, tcp, udp};

/// glibc's malloc and free were a third of ingest's time in a profile
/// (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "vigil",
    version,
    about = "A Riemann-compatible stream event processor"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: Riemann protocol over TCP and UDP, index with TTL expiry.
    Run(Box<RunArgs>),
    /// Send one event over TCP and wait for the server's acknowledgement.
    Send(SendArgs),
    /// Check rule files: prints every error as FILE:LINE:COL with the source line (every syntax error first; the rest once the file parses; of either, the first 20, then where the rest start); exit 1 if any.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run the `test "…" { … }` blocks of rule files on a virtual clock; exit 1 if any fails.
    Test {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Also write the results to FILE as a JUnit XML report for CI: a
        /// suite per rule file, a case per test.
        #[arg(long, value_name = "FILE")]
        junit: Option<PathBuf>,
    },
    /// Query the index; prints one JSON event per line.
    Query {
        /// A Riemann query, e.g. 'service =~ "cpu%" and metric > 0.9'.
        #[arg(allow_hyphen_values = true)]
        query: String,
        /// Server address.
        #[arg(default_value = "127.0.0.1:5555")]
        addr: String,
        /// Give up (exit 1) when connecting and the answer take longer.
        #[arg(long, default_value = "10s", value_parser = parse_interval)]
        timeout: Duration,
        /// Largest answer read, in bytes (the server's default 100 000 results
        /// of large events can pass 16 MiB).
        #[arg(long, default_value_t = DEFAULT_MAX_ANSWER, value_parser = parse_positive)]
        max_answer: usize,
        #[command(flatten)]
        tls: ClientTlsArgs,
    },
}

/// TLS for `send` and `query`, to a server's `--tls` port.
#[derive(clap::Args)]
struct ClientTlsArgs {
    /// Connect over TLS, trusting the CA certificates in this PEM file.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a server run with --tls-ca.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry; by default the host of the address.
    #[arg(long, requires = "tls_ca")]
    tls_name: Option<String>,
}

impl ClientTlsArgs {
    /// `None` without --tls-ca: plain TCP.
    fn load(&self, addr: &str) -> anyhow::Result<Option<tls::ClientTls>> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
        let name = (self.tls_name.as_deref()).unwrap_or(host.trim_matches(['[', ']']));
        let identity = (self.tls_cert.as_deref()).zip(self.tls_key.as_deref());
        Ok(Some(tls::ClientTls::load(name, ca, identity)?))
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Rule file; SIGHUP re-reads it. Without it, the embedded rules/default.vigil runs (index every event).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// TCP listen address (Riemann protocol).
    #[arg(long, default_value = "127.0.0.1:5555")]
    tcp: SocketAddr,
    /// UDP listen address; defaults to the address and port TCP bound.
    #[arg(long)]
    udp: Option<SocketAddr>,
    /// Largest TCP frame accepted, in bytes; a larger length prefix closes the connection.
    #[arg(long, default_value_t = tcp::DEFAULT_MAX_FRAME, value_parser = parse_positive)]
    max_frame: usize,
    /// Largest UDP datagram accepted, in bytes.
    #[arg(long, default_value_t = udp::DEFAULT_MAX_DATAGRAM, value_parser = parse_positive)]
    max_datagram: usize,
    /// Most connections open at once on each listener: Riemann TCP (plain and TLS together), HTTP,
    /// the SSE listener, gRPC, Graphite; more are closed at once, counted.
    #[arg(long, default_value_t = tcp::DEFAULT_MAX_CONNECTIONS, value_parser = parse_positive)]
    max_connections: usize,
    /// Most bytes that messages over 64 KiB (TCP frames, POST /events bodies, gRPC Msgs) may hold
    /// at once while they arrive, all connections together; one that would go over is read on
    /// only once others have arrived (counted). Smaller messages never wait.
    #[arg(long, default_value_t = budget::DEFAULT_MAX, value_parser = parse_positive)]
    max_message_memory: usize,
    /// Most bytes of events all live subscribers' queues (WebSocket, SSE, gRPC) and their
    /// unsent snapshots may hold together; over it, the subscribers furthest behind are
    /// disconnected, and a new one whose snapshot does not fit is refused (counted).
    #[arg(long, default_value_t = pubsub::DEFAULT_MAX_HELD, value_parser = parse_positive)]
    max_subscriber_memory: usize,
    /// Percent of a core that all live subscriptions' queries may take from ingest together
    /// (1 to 100); over it, the subscriptions of the client whose queries cost the most are
    /// disconnected, then the next client's, until the rest are within it.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u8).range(1..=100))]
    subscription_share: u8,
    /// Most bytes that query answers over 64 KiB (Riemann TCP, GET /index, gRPC Query) may hold
    /// at once until their askers have read them, all connections together; one that would go
    /// over is refused as busy, to be asked again (counted). Smaller answers are never refused.
    #[arg(long, default_value_t = answers::DEFAULT_MAX, value_parser = parse_positive)]
    max_answer_memory: usize,
    /// Close a Riemann TCP connection whose begun frame is not complete within this long, or a
    /// Graphite one whose begun line has not ended
    /// (slowloris; an idle one is kept, probed by TCP keepalive after this long idle); also
    /// bounds TLS handshakes and writing replies, how long an
    /// HTTP or gRPC client may read nothing of a response or subscription, send nothing after
    /// connecting, take over an HTTP/1 request head or a posted body, or leave an HTTP/2
    /// keepalive ping unanswered (e.g. 60s).
    #[arg(long, default_value = "60s", value_parser = parse_interval)]
    read_timeout: Duration,
    /// Refuse (whole, with an error reply) a Msg with more events than this.
    #[arg(long, default_value_t = Limits::DEFAULT.max_events, value_parser = parse_positive)]
    max_events_per_msg: usize,
    /// Refuse a Msg with an event carrying more tags than this.
    #[arg(long, default_value_t = Limits::DEFAULT.max_tags)]
    max_tags: usize,
    /// Refuse a Msg with an event carrying more attributes than this.
    #[arg(long, default_value_t = Limits::DEFAULT.max_attributes)]
    max_attributes: usize,
    /// Refuse a Msg with a string (host, service, state, description, tag, attribute, query)
    /// longer than this many bytes, and a Graphite line with so long a path.
    #[arg(long, default_value_t = Limits::DEFAULT.max_string, value_parser = parse_positive)]
    max_string: usize,
    /// TLS listen address (Riemann's TLS port); TLS is on when --tls-cert and --tls-key are
    /// given, and --tls needs them.
    #[arg(long, default_value = tls::DEFAULT_ADDR, requires_all = ["tls_cert", "tls_key"])]
    tls: SocketAddr,
    /// Server certificate chain (PEM) for TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM): TLS clients must present a certificate signed by one.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// TTL in seconds for events that carry none.
    #[arg(long, default_value_t = DEFAULT_TTL_SECS, value_parser = parse_ttl)]
    default_ttl: f64,
    /// How often timers run: index expiry and time-based rule stages (e.g. 100ms, 1s).
    #[arg(long, default_value = "100ms", value_parser = parse_tick)]
    tick: Duration,
    /// Refuse new index keys beyond this many entries (counted); unbounded by default.
    #[arg(long, value_parser = parse_positive)]
    max_index: Option<usize>,
    /// Refuse (with an error naming this flag) a query that matches more index
    /// entries than this, over TCP, HTTP and gRPC: an answer is held whole
    /// until its asker has read it.
    #[arg(long, default_value_t = 100_000, value_parser = parse_positive)]
    max_query_results: usize,
    /// Stop (with an error naming this flag) a query still scanning the index
    /// after this long, over TCP, HTTP and gRPC: a scan of a million entries
    /// takes a fifth of a second, but a query of thousands of terms costs
    /// that many times more, and only one scan per core runs at once.
    #[arg(long, default_value = "10s", value_parser = parse_interval)]
    query_timeout: Duration,
    /// Let the kernel back vigil's memory with transparent huge pages: a full
    /// index is ~10 % faster, but a fresh huge page can stall the thread that
    /// first touches it for tens of milliseconds while the index grows
    /// (BENCHMARKS.md, "Huge pages"). Off by default.
    #[arg(long)]
    huge_pages: bool,
    /// Where the index snapshot, the rules' stream state and the pagers' open incidents and
    /// undelivered pages are kept (created if missing); one vigil at a time.
    #[arg(long, default_value = "vigil-data")]
    data_dir: PathBuf,
    /// Keep nothing across restarts: neither load nor write the index snapshot, the stream state
    /// or the pagers' files (open incidents and undelivered pages are then in memory only).
    #[arg(long, conflicts_with = "snapshot_interval")]
    no_snapshot: bool,
    /// How long after one index snapshot the next is written, bounding what a crash loses (e.g. 30s, 5m).
    #[arg(long, default_value = "30s", value_parser = parse_interval)]
    snapshot_interval: Duration,
    /// HTTP listen address: GET /index (JSON, WebSocket, SSE), POST /events, /metrics, /health.
    #[arg(long, default_value = vigil::http::DEFAULT_ADDR)]
    http: SocketAddr,
    /// Serve no HTTP (--sse still starts its own listener).
    #[arg(long, conflicts_with = "http")]
    no_http: bool,
    /// Also serve SSE subscriptions (GET /index?query=…) on this address, like Riemann's port 5558.
    #[arg(long)]
    sse: Option<SocketAddr>,
    /// Bearer token every HTTP endpoint but /health requires (WebSocket clients may pass ?token=).
    #[arg(long, env = "VIGIL_HTTP_TOKEN", hide_env_values = true, value_parser = parse_token)]
    http_token: Option<String>,
    /// A reverse proxy (an address, or a network of proxies only, e.g. 10.0.9.0/29; repeatable)
    /// whose X-Forwarded-For names the client that live subscriptions are charged to and cut
    /// with, over HTTP and gRPC. Every address it covers is believed: name no clients' network.
    #[arg(long, value_name = "IP or CIDR")]
    trusted_proxy: Vec<TrustedProxy>,
    /// How often vigil sends its own metrics through the rules as events (0 disables).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    self_metrics_interval: Duration,
    /// `host` of the self-metric events; defaults to this machine's hostname.
    #[arg(long)]
    node_name: Option<String>,
    /// Graphite plaintext listen address, TCP and UDP (`path value timestamp` lines, like
    /// Riemann's graphite-server, port 2003 there); off unless given.
    #[arg(long)]
    graphite: Option<SocketAddr>,
    /// gRPC listen address (proto/vigil.proto: send, query, subscribe); off unless given.
    /// --max-frame also bounds each gRPC message.
    #[arg(long)]
    grpc: Option<SocketAddr>,
    /// Run as one node of a cluster coordinated through this NATS JetStream server
    /// (e.g. nats://127.0.0.1:4222; src/cluster/README.md). Snapshots are off: JetStream keeps the events.
    #[arg(long, requires = "node_id")]
    cluster: Option<String>,
    /// This node's id, unique among the cluster's live nodes.
    #[arg(long, requires = "cluster")]
    node_id: Option<String>,
    /// Shards hosts are spread over; every node of a cluster must use the same number.
    #[arg(long, default_value_t = 64, value_parser = parse_positive, requires = "cluster")]
    shards: usize,
    /// How long JetStream keeps events; must cover the longest TTL or window in the rules.
    #[arg(long, default_value = "1h", value_parser = parse_interval, requires = "cluster")]
    cluster_retention: Duration,
    /// How long this node's shard leases count as held after their last renewal; the server lets
    /// them lapse (so survivors take over) after the longest any node of the cluster started with.
    #[arg(long, default_value = "6s", value_parser = parse_interval, requires = "cluster")]
    cluster_lease_ttl: Duration,
    /// How often leases are renewed and shards rebalanced; well under --cluster-lease-ttl.
    #[arg(long, default_value = "2s", value_parser = parse_interval, requires = "cluster")]
    cluster_renew: Duration,
}

/// `vigil query`'s default bound on an answer: far over what the default
/// `--max-query-results` of ordinary events makes, still a bound.
const DEFAULT_MAX_ANSWER: usize = 1 << 30;

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        parsed => parsed.map_err(|e| e.to_string()),
    }
}

/// An empty token matches no credential: every endpoint but /health would answer 401.
fn parse_token(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("--http-token must not be empty: unset it to serve without a token".to_owned());
    }
    Ok(s.to_owned())
}

/// Zero, negative or NaN, every event would expire at the next tick.
fn parse_ttl(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(ttl) if ttl.is_finite() && ttl > 0.0 => Ok(ttl),
        Ok(_) => Err("must be a number of seconds over 0 (e.g. 60)".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// Shorter, the timers would run back to back and spend a core doing it.
fn parse_tick(s: &str) -> Result<Duration, String> {
    match parse_interval(s)? {
        tick if tick < Duration::from_millis(1) => Err("must be at least 1ms".to_owned()),
        tick => Ok(tick),
    }
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be longer than zero".to_owned()),
        d => Ok(d),
    }
}

/// Ten years is never in practice; much longer, a deadline `now` plus the
/// duration overflows the clock, and the task computing it panics (a
/// `--snapshot-interval` of 300000000000y stopped the snapshots, and the
/// final one).
const LONGEST_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d > LONGEST_DURATION => Err("must be at most 10 years (3650d)".to_owned()),
        parsed => parsed.map_err(|e| e.to_string()),
    }
}

impl RunArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_events: self.max_events_per_msg,
            max_tags: self.max_tags,
            max_attributes: self.max_attributes,
            max_string: self.max_string,
        }
    }

    fn cluster_config(&self) -> Option<ClusterConfig> {
        Some(ClusterConfig {
            url: self.cluster.clone()?,
            node_id: self.node_id.clone()?,
            shards: u32::try_from(self.shards).unwrap_or(u32::MAX),
            retention: self.cluster_retention,
            lease_ttl: self.cluster_lease_ttl,
            renew: self.cluster_renew,
            query_timeout: Duration::from_secs(2),
        })
    }

    fn tls_listener(&self) -> anyhow::Result<Option<TlsListener>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let acceptor = tls::Acceptor::load(cert, key, self.tls_ca.as_deref())?;
        Ok(Some(TlsListener {
            addr: self.tls,
            acceptor: Arc::new(acceptor),
        }))
    }
}

#[derive(clap::Args)]
struct SendArgs {
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    service: Option<String>,
    #[arg(long)]
    state: Option<String>,
    /// An integer is sent as an integer metric, anything else as a float.
    #[arg(long, allow_negative_numbers = true, value_parser = parse_metric)]
    metric: Option<Metric>,
    /// Comma-separated tags.
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
    /// Seconds.
    #[arg(long, allow_negative_numbers = true)]
    ttl: Option<f32>,
    #[arg(long)]
    description: Option<String>,
    /// An attribute as key=value; repeatable.
    #[arg(long = "attr", value_parser = parse_attr)]
    attributes: Vec<(String, String)>,
    /// Server address.
    #[arg(default_value = "127.0.0.1:5555")]
    addr: String,
    /// Give up (exit 1) when connecting and the server's ack take longer.
    #[arg(long, default_value = "10s", value_parser = parse_interval)]
    timeout: Duration,
    #[command(flatten)]
    tls: ClientTlsArgs,
}

fn parse_attr(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got `{s}`"))
}

fn parse_metric(s: &str) -> Result<Metric, String> {
    if let Ok(i) = s.parse::<i64>() {
        return Ok(Metric::Int(i));
    }
    s.parse::<f64>()
        .map(Metric::Float)
        .map_err(|_| "not a number".to_owned())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::try_parse().unwrap_or_else(|refused| {
        // One JSON object per line was asked for: a command line refused too.
        if refused.use_stderr() && asks_for_json_logs(std::env::args()) {
            init_logging(LogFormat::Json);
            let error = refused.to_string();
            tracing::error!(error = error.trim_end(), "Command line refused.");
            std::process::exit(refused.exit_code());
        }
        refused.exit()
    });
    let format = cli.log_format;
    init_logging(format);
    let Err(error) = command(cli) else {
        return std::process::ExitCode::SUCCESS;
    };
    match format {
        LogFormat::Human => eprintln!("Error: {error:?}"),
        // One JSON object per line for the log collector, this one too.
        LogFormat::Json => tracing::error!(error = format!("{error:#}"), "Exiting on an error."),
    }
    std::process::ExitCode::FAILURE
}

/// Whether `args` hold `--log-format json` (or `=json`), read without clap,
/// which refused them.
fn asks_for_json_logs(args: impl Iterator<Item = String>) -> bool {
    let args: Vec<String> = args.collect();
    let json = |pair: &[String]| pair[0] == "--log-format" && pair[1] == "json";
    args.iter().any(|a| a == "--log-format=json") || args.windows(2).any(json)
}

fn command(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(*args).await,
            Command::Send(args) => send(args).await,
            Command::Query {
                query,
                addr,
                timeout,
                max_answer,
                tls,
            } => query_cmd(&query, &addr, timeout, max_answer, &tls).await,
            Command::Check { files } => exit_with(check(&files)),
            Command::Test { files, junit } => {
                let (report, ok, results) = test(&files);
                if let Some(path) = junit {
                    std::fs::write(&path, results.to_xml()).with_context(|| {
                        format!("writing the JUnit report to {}", path.display())
                    })?;
                }
                exit_with((report, ok))
            }
        }
    })
}

/// Transparent huge pages on or off for the whole process from now on (see
/// `--huge-pages`; set either way, as the flag is inherited from the parent).
/// Off, the memory the index grows into comes in 4 KiB pages, each quick to
/// fault in.
fn huge_pages(on: bool) {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::thread::disable_transparent_huge_pages(!on) {
        tracing::warn!(%error, on, "Could not set the transparent huge pages of this process.");
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Colour codes are noise in a file or a journal. On a terminal,
    // tracing-subscriber's own choice stands: none with NO_COLOR set.
    let builder = if std::io::stderr().is_terminal() {
        builder
    } else {
        builder.with_ansi(false)
    };
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // A lease renewed no sooner than it lapses lets survivors take the
    // node's shards at every round.
    if args.cluster_renew >= args.cluster_lease_ttl {
        anyhow::bail!(
            "--cluster-renew {} must be shorter than --cluster-lease-ttl {}: shorten it, to a third for example",
            humantime::format_duration(args.cluster_renew),
            humantime::format_duration(args.cluster_lease_ttl)
        );
    }
    // First of all: until a handler is installed, a SIGHUP (a reload sent
    // right after a restart) kills the process, and loading a large snapshot
    // takes a while. Reloads wait until the rules are running.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    huge_pages(args.huge_pages);
    if let Some(limit) = raise_open_files_limit()
        && limit < args.max_connections as u64 + SPARE_DESCRIPTORS
    {
        tracing::warn!(
            limit,
            max_connections = args.max_connections,
            "The open files limit is below --max-connections: a listener would run out of \
             descriptors before reaching it, and accepts then fail (logged, retried every \
             100 ms). Raise the hard limit (ulimit -Hn, systemd's LimitNOFILE) or lower \
             --max-connections."
        );
    }
    let (name, source) = match &args.rules {
        Some(path) => (path.display().to_string(), read(path)?),
        None => (DEFAULT_RULES_NAME.to_owned(), DEFAULT_RULES.to_owned()),
    };
    let (_, compiled) = rules::load(&name, &source, EnvPolicy::Strict)
        .map_err(|rendered| anyhow!("{rendered}\n{name}: the rules have errors; not starting"))?;
    rules::log_warnings(&compiled, &name, &source);
    let clock: SharedClock = Arc::new(SystemClock);
    let stats = Arc::new(Stats::default());
    let index = Arc::new(Index::new(IndexConfig {
        default_ttl: args.default_ttl,
        max_entries: args.max_index,
        max_query_results: Some(args.max_query_results),
        max_subscriber_memory: args.max_subscriber_memory,
        subscription_share: pubsub::WINDOW * u32::from(args.subscription_share) / 100,
        query_timeout: Some(args.query_timeout),
        answers: Answers::new(args.max_answer_memory, stats.clone()),
    }));
    let cluster_config = args.cluster_config();
    // In a cluster JetStream is the durable state: a snapshot would bring back
    // hosts, stream state and incidents of shards this node may no longer own.
    let keep_state = !args.no_snapshot && cluster_config.is_none();
    let text = Arc::new(RuleText { name, text: source });
    let started = clock.now();
    // Held until vigil exits: no second vigil may write this directory.
    let _data_dir = keep_state
        .then(|| snapshot::claim(&args.data_dir))
        .transpose()
        .context("taking --data-dir (--no-snapshot disables snapshots)")?;
    // Every port is taken before the saved state loads, which takes seconds
    // when it is large: a port in use fails now, and an agent connecting
    // meanwhile waits in the kernel's queue rather than being refused.
    let tls = args.tls_listener().context("setting up TLS")?;
    let tls_files = tls.as_ref().map(|tls| tls.acceptor.clone());
    let mut config = ServerConfig {
        stats: stats.clone(),
        cluster: None,
        tcp: args.tcp,
        udp: args.udp,
        max_frame: args.max_frame,
        max_datagram: args.max_datagram,
        max_connections: args.max_connections,
        max_message_memory: args.max_message_memory,
        read_timeout: args.read_timeout,
        limits: args.limits(),
        tls,
        graphite: args.graphite,
        tick: args.tick,
        resume_after_stalls: true,
    };
    let mut http_config = HttpConfig {
        addr: (!args.no_http).then_some(args.http),
        sse: args.sse,
        token: args.http_token.clone(),
        trusted_proxies: TrustedProxies::new(args.trusted_proxy.clone()),
        per_message: args.limits(),
        max_connections: args.max_connections,
        write_timeout: args.read_timeout,
        read_timeout: args.read_timeout,
        ..HttpConfig::default()
    };
    let bound = Server::bind(&config)
        .await
        .context("starting the listeners")?;
    let http_bound = HttpServer::bind(&http_config)
        .await
        .context("starting the HTTP listeners")?;
    let grpc_bound = match args.grpc {
        Some(addr) => Some(
            Grpc::bind(addr)
                .await
                .context("starting the gRPC listener")?,
        ),
        None => None,
    };
    if keep_state {
        tracing::info!(
            tcp = %bound.tcp_addr,
            data_dir = %args.data_dir.display(),
            "Bound the listeners; loading the saved state, then serving."
        );
        snapshot::remove_leftovers(&args.data_dir);
        persist::restore(
            &compiled.roots,
            &text,
            &args.data_dir,
            started,
            args.default_ttl,
        );
    }
    // The pagers' open incidents are kept beside the index snapshot.
    let kept = if keep_state {
        Kept::in_dir(args.data_dir.clone(), stats.clone())
    } else {
        Kept::default()
    };
    let kept = if cluster_config.is_some() {
        kept.in_cluster()
    } else {
        kept
    };
    let outputs_shutdown = CancellationToken::new();
    let pages_held = kept.holds();
    let outputs = Outputs::start(&compiled.outputs, kept, outputs_shutdown.clone());
    let streams = Arc::new(
        Rules::new(
            compiled.roots,
            Some(text.clone()),
            outputs.sinks(),
            index.clone(),
            clock.clone(),
        )
        .with_tick(Micros::try_from(args.tick.as_micros()).unwrap_or(Micros::MAX)),
    );
    // Loaded before the server starts: each entry lives at least one TTL
    // from now, then expires through the rules unless its agent reports.
    let snapshots = if keep_state {
        Some(
            Snapshots::start(
                index.clone(),
                Some(streams.clone()),
                args.data_dir.clone(),
                args.snapshot_interval,
                started,
                stats.clone(),
            )
            .context("preparing --data-dir (--no-snapshot disables snapshots)")?,
        )
    } else {
        None
    };
    let reloader = Arc::new(Reloader::new(args.rules.clone(), streams.clone(), outputs));
    // Every batch is timed, whichever transport brought it: /metrics reports it.
    let latency = Arc::new(Histogram::default());
    let rules = streams;
    let streams: Arc<dyn Streams> = Arc::new(TimedStreams::new(rules.clone(), latency.clone()));
    let hangups = on_sighup(hangups, reloader.clone(), tls_files, stats.clone());
    let cluster = match cluster_config {
        Some(config) => Some(
            Cluster::start(
                config,
                index.clone(),
                streams.clone(),
                clock.clone(),
                pages_held,
            )
            .await
            .context("joining the cluster")?,
        ),
        None => None,
    };
    let (cluster, cluster_tasks) = cluster.unzip();
    config.cluster = cluster.clone();
    let fenced = cluster.clone();
    // Installed before `listening`: until then SIGTERM would kill vigil outright,
    // skipping the shutdown (and its snapshot).
    let mut signals =
        ShutdownSignals::install().context("installing the SIGTERM/SIGINT handlers")?;
    let server = Server::serve(bound, config, index.clone(), streams.clone(), clock.clone());
    let telemetry = Arc::new(Telemetry {
        stats: stats.clone(),
        index: index.clone(),
        subscribers: match &cluster {
            Some(cluster) => cluster.feed().clone(),
            None => index.pubsub().clone(),
        },
        rules,
        reloader: reloader.clone(),
        latency,
        started: Instant::now(),
        cluster: cluster.clone(),
    });
    http_config.cluster = cluster.clone();
    http_config.memory = Some(server.memory.clone());
    let http = HttpServer::serve(
        http_bound,
        http_config,
        telemetry.clone(),
        streams.clone(),
        clock.clone(),
    )
    .context("starting the HTTP listeners")?;
    let stop_self_metrics = CancellationToken::new();
    let interval = args.self_metrics_interval;
    let self_metrics = (!interval.is_zero()).then(|| {
        let host = args.node_name.clone().unwrap_or_else(selfmetrics::hostname);
        let emitter = Emitter::new(host, interval, clock.now(), telemetry.sample());
        tokio::spawn(selfmetrics::run(
            telemetry,
            streams.clone(),
            clock.clone(),
            emitter,
            interval,
            stop_self_metrics.clone(),
        ))
    });
    let grpc = match grpc_bound {
        Some(listener) => Some(
            Grpc::serve(
                listener,
                GrpcLimits {
                    max_message: args.max_frame,
                    per_message: args.limits(),
                    max_connections: args.max_connections,
                    write_timeout: args.read_timeout,
                    read_timeout: args.read_timeout,
                    memory: Some(server.memory.clone()),
                    trusted_proxies: TrustedProxies::new(args.trusted_proxy.clone()),
                },
                index.clone(),
                streams.clone(),
                clock,
                stats.clone(),
                cluster,
            )
            .context("starting the gRPC listener")?,
        ),
        None => None,
    };
    tracing::info!(
        tcp = %server.tcp_addr,
        udp = %server.udp_addr,
        http = http.addr.map(tracing::field::display),
        sse = http.sse_addr.map(tracing::field::display),
        tls = server.tls_addr.map(tracing::field::display),
        graphite = server.graphite_addr.map(tracing::field::display),
        grpc = grpc.as_ref().map(|g| tracing::field::display(g.addr)),
        rules = %text.name,
        "listening"
    );
    // A node whose id another process took over stops as if told to, and
    // exits as one refused at start does.
    let stepped_down = async {
        match &fenced {
            Some(cluster) => cluster.stepped_down().await.to_string(),
            None => std::future::pending().await,
        }
    };
    let (signal, taken_over) = tokio::select! {
        signal = signals.next() => (signal, None),
        why = stepped_down => ("none: its node id was taken over", Some(why)),
    };
    tracing::info!(signal, "Shutting down; a second signal exits at once.");
    let stopping = Stopping::Draining {
        then_writes: snapshots.is_some(),
    };
    let stopping = Arc::new(std::sync::Mutex::new(stopping));
    let second = on_second_signal(signals, stopping.clone());
    let now = |doing| *stopping.lock().unwrap_or_else(|e| e.into_inner()) = doing;
    stop_self_metrics.cancel();
    if let Some(task) = self_metrics {
        let _ = task.await;
    }
    // As an HTTP client: a subscriber or a client still taking its answer
    // gets 2 s more, so the index snapshot is not held back by it.
    let grpc_shutdown = async {
        if let Some(grpc) = grpc {
            grpc.shutdown(Duration::from_secs(2)).await;
        }
    };
    // Every listener stops accepting at once: one still draining must not
    // keep another taking events.
    tokio::join!(
        http.shutdown(Duration::from_secs(10)),
        server.shutdown(Duration::from_secs(10)),
        grpc_shutdown
    );
    // Ingest has stopped: hand this node's shards to the others.
    if let Some(tasks) = cluster_tasks {
        now(Stopping::HandingOver);
        tasks.shutdown(Duration::from_secs(10)).await;
    }
    // Ingest and the timers have stopped: the index is final.
    now(Stopping::Writing);
    let snapshot = match snapshots {
        Some(snapshots) => snapshots.finish().await.map(drop),
        None => Ok(()),
    };
    // Outputs deliver what is already queued, within the same grace period.
    hangups.abort();
    outputs_shutdown.cancel();
    now(Stopping::Delivering);
    let outputs = reloader.finish_outputs(Duration::from_secs(10)).await;
    second.abort();
    let outputs: Vec<String> = outputs.iter().map(ToString::to_string).collect();
    let outputs = outputs.join("; ");
    let counters: Vec<String> = (stats.snapshot().iter())
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    let counters = counters.join(" ");
    tracing::info!(%counters, %outputs, "Stopped.");
    // Everything is written and delivered: what is left is memory, which the
    // process's exit gives back at once. Freed here, the index and every
    // `by` group's stages went one allocation at a time: 14 s after the line
    // above at 700 k groups. These hold the rules and the index (the rules
    // hold it too) whatever else let go of them first.
    std::mem::forget((index, reloader, streams));
    snapshot.context("writing the index snapshot and the stream state")?;
    match taken_over {
        Some(why) => Err(anyhow::anyhow!(why)).context("stepped down from the cluster"),
        None => Ok(()),
    }
}

/// Raises the soft limit on open files to the hard one, as a server that
/// holds many connections should: the soft limit is often 1 024 where the
/// hard one is far higher, and each HTTP and gRPC connection takes two
/// descriptors (its socket, and the duplicate its watch for a vanished peer
/// holds). The limit now, `None` when unlimited or off Linux.
fn raise_open_files_limit() -> Option<u64> {
    #[cfg(target_os = "linux")]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        // An unlimited hard limit is not one a soft limit may take.
        let (soft, hard) = (limit.current?, limit.maximum?);
        if soft >= hard {
            return Some(soft);
        }
        let raised = Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::debug!(from = soft, to = hard, "Raised the open files limit.");
                Some(hard)
            }
            Err(error) => {
                tracing::warn!(%error, "Could not raise the open files limit.");
                Some(soft)
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Descriptors vigil needs besides its connections' (listeners, files,
/// the runtime's own), with room to spare.
const SPARE_DESCRIPTORS: u64 = 64;

/// Reloads on every `SIGHUP` of `hangups` from now on (one received
/// before, once): the rule file, then the TLS listener's files.
fn on_sighup(
    mut hangups: tokio::signal::unix::Signal,
    rules: Arc<Reloader>,
    tls: Option<Arc<tls::Acceptor>>,
    stats: Arc<Stats>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            // Logged and counted inside; the old rules keep running.
            let _ = rules.reload().await;
            let Some(tls) = &tls else { continue };
            // Files on a hung mount must not hold a worker.
            let reloading = tls.clone();
            let reloaded = tokio::task::spawn_blocking(move || reloading.reload()).await;
            let certificate = tls.cert_path().display();
            // Not run: the runtime is shutting down.
            let Ok(reloaded) = reloaded else { return };
            match reloaded {
                Ok(()) => tracing::info!(%certificate, "TLS files reloaded."),
                Err(error) => {
                    Stats::incr(&stats.tls_reload_failures);
                    tracing::error!(%certificate, %error, "TLS files not reloaded; the listener keeps the certificate it had.");
                }
            }
        }
    })
}

/// SIGTERM and SIGINT, handled from [`ShutdownSignals::install`] on.
struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The name of the next signal received.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// What the graceful shutdown is doing, so that a second signal can say
/// what ending it now abandons.
#[derive(Clone, Copy)]
enum Stopping {
    /// `then_writes`: the final index snapshot and stream state follow.
    Draining {
        then_writes: bool,
    },
    HandingOver,
    Writing,
    Delivering,
}

impl Stopping {
    fn abandons(self) -> &'static str {
        match self {
            Stopping::Draining { then_writes: true } => {
                "the connections still being read, and the final index snapshot and stream \
                 state (the next start reads the last periodic ones)"
            }
            Stopping::Draining { then_writes: false } => "the connections still being read",
            Stopping::HandingOver => {
                "handing this node's shards over (the others take them once its leases lapse)"
            }
            Stopping::Writing => {
                "the final index snapshot and stream state writes under way (the next start \
                 reads the last ones written whole and removes the temporary files)"
            }
            Stopping::Delivering => {
                "the events outputs have not delivered (lost; pages not yet delivered are \
                 sent first by the next run if written down in the pager files: all but \
                 those of the last 100 ms, up to 10 000 a pager)"
            }
        }
    }
}

/// Ends the process at once (status 1) on a second SIGTERM or SIGINT during
/// the graceful shutdown, which can take tens of seconds (a dead downstream,
/// a large index to write): Ctrl-C twice, or an operator who cannot wait.
/// Safe at any moment: every file vigil writes is replaced by a rename, so a
/// write cut short leaves the previous file whole.
fn on_second_signal(
    mut signals: ShutdownSignals,
    stopping: Arc<std::sync::Mutex<Stopping>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let signal = signals.next().await;
        let doing = *stopping.lock().unwrap_or_else(|e| e.into_inner());
        tracing::error!(
            signal,
            abandoned = doing.abandons(),
            "Second signal during the shutdown: exiting now."
        );
        std::process::exit(1);
    })
}

async fn send(args: SendArgs) -> anyhow::Result<()> {
    let event = Event {
        host: args.host,
        service: args.service,
        state: args.state,
        time: SystemClock.now(),
        description: args.description,
        tags: args.tags,
        metric: args.metric,
        ttl: args.ttl,
        attributes: args.attributes,
    };
    let tls = args.tls.load(&args.addr)?;
    within(args.timeout, &args.addr, async {
        let mut client = Client::connect_with(&args.addr, tls.as_ref(), tcp::DEFAULT_MAX_FRAME)
            .await
            .with_context(|| format!("connecting to {}", args.addr))?;
        client.send(&[event]).await?;
        Ok(())
    })
    .await
}

/// `work` against the server at `addr`, or an error once `timeout` passed: a
/// server that accepts and never answers (or a host that drops the packets)
/// must not hold a script that calls `vigil send` or `vigil query`.
async fn within<T>(
    timeout: Duration,
    addr: &str,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let after = humantime::format_duration(timeout);
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {addr} within {after} (--timeout)"))?
}

fn read(path: &Path) -> anyhow::Result<String> {
    rules::read_file(path).map_err(|e| anyhow::anyhow!(e.render(&path.display().to_string())))
}

/// `check` and `test` report through stdout and their exit code, not an error.
fn exit_with((report, ok): (String, bool)) -> anyhow::Result<()> {
    to_stdout(|out| out.write_all(report.as_bytes()))?;
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

/// Writes to stdout what `print` writes; a reader that stopped early
/// (`vigil check rules/*.vigil | head`) wanted no more, and is no error.
fn to_stdout(print: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match print(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        printed => Ok(printed?),
    }
}

/// The text of rule file `path`, or `None` with why not in `out`.
fn read_or_report(path: &Path, name: &str, out: &mut String) -> Option<String> {
    let read = rules::read_file(path);
    read.map_err(|e| _ = writeln!(out, "{}", e.render(name)))
        .ok()
}

/// What `vigil check` prints, and whether every file is free of errors.
fn check(files: &[PathBuf]) -> (String, bool) {
    let mut out = String::new();
    let mut all_ok = true;
    for path in files {
        let name = path.display().to_string();
        let Some(source) = read_or_report(path, &name, &mut out) else {
            all_ok = false;
            continue;
        };
        match rules::load(&name, &source, EnvPolicy::Lenient) {
            Ok((_, compiled)) => {
                for warning in &compiled.warnings {
                    _ = writeln!(out, "warning: {}", warning.render(&name, &source));
                }
                _ = writeln!(out, "{name}: ok");
            }
            Err(rendered) => {
                _ = writeln!(out, "{rendered}");
                all_ok = false;
            }
        }
    }
    (out, all_ok)
}

/// What `vigil test` prints, whether every test passed, and the same
/// results for `--junit`.
fn test(files: &[PathBuf]) -> (String, bool, Junit) {
    let mut out = String::new();
    let mut junit = Junit::default();
    let (mut passed, mut failed) = (0, 0);
    for path in files {
        let name = path.display().to_string();
        match test_file(path, &name) {
            Ok(outcomes) => {
                for outcome in &outcomes {
                    if outcome.passed() {
                        passed += 1;
                        _ = writeln!(out, "PASS {name}: {}", outcome.name);
                    } else {
                        failed += 1;
                        _ = writeln!(out, "FAIL {name}: {}", outcome.name);
                        out.push_str(&outcome.failure_text());
                    }
                }
                junit.tested(&name, &outcomes);
            }
            Err(diagnostics) => {
                _ = writeln!(out, "{diagnostics}");
                failed += 1;
                junit.not_loaded(&name, &diagnostics);
            }
        }
    }
    _ = writeln!(out, "{passed} passed, {failed} failed");
    (out, failed == 0, junit)
}

/// The outcome of each test of rule file `path`, or the rendered reason
/// none could run.
fn test_file(path: &Path, name: &str) -> Result<Vec<testing::Outcome>, String> {
    let source = rules::read_file(path).map_err(|e| e.render(name))?;
    let (file, _) = rules::load(name, &source, EnvPolicy::Lenient)?;
    testing::run_tests(&file).map_err(|found| rules::render_all(&found, name, &source))
}

async fn query_cmd(
    query: &str,
    addr: &str,
    timeout: Duration,
    max_answer: usize,
    tls: &ClientTlsArgs,
) -> anyhow::Result<()> {
    let tls = tls.load(addr)?;
    let found = within(timeout, addr, async {
        let mut client = Client::connect_with(addr, tls.as_ref(), max_answer)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        match client.query(query).await {
            Err(ClientError::Frame(e @ FrameError::Oversized { .. })) => Err(anyhow::anyhow!(
                "{e}: raise --max-answer, or narrow the query"
            )),
            answer => Ok(answer?),
        }
    })
    .await?;
    to_stdout(|out| (found.iter()).try_for_each(|event| writeln!(out, "{}", json::to_json(event))))
}
