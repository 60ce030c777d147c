//! Riemann-protocol load generator, and a null sink to measure the machine's
//! limit in the same run.
//!
//!     cargo run --release --example loadgen -- tcp --conns 2 --batch 100 --window 8 --keys 100000 --secs 10 127.0.0.1:5555
//!     cargo run --release --example loadgen -- latency --secs 60 127.0.0.1:5555
//!     cargo run --release --example loadgen -- latency --secs 60 --spikes 1000 127.0.0.1:5555
//!     cargo run --release --example loadgen -- udp --batch 10 --secs 10 127.0.0.1:5555
//!     cargo run --release --example loadgen -- stall --secs 60
//!     cargo run --release --example loadgen -- memory --mb 16
//!     cargo run --release --example loadgen -- null-sink 127.0.0.1:5599
//!     cargo run --release --example loadgen -- null-sink --reply-batch 12 127.0.0.1:5599
//!     cargo run --release --example loadgen -- null-sink --reply-batch 12 --decode 127.0.0.1:5599
//!
//! Messages are encoded once before the run and cycled, so the generator
//! spends its time on the socket, not on protobuf.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, Subcommand};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;

use vigil::proto::{Attribute, Msg, PbEvent};

#[derive(Parser)]
#[command(about = "Riemann-protocol load generator")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Pipelined TCP load; reports acked events per second.
    Tcp(Load),
    /// One event per Msg, one in flight; reports latency percentiles.
    Latency {
        #[arg(long, default_value_t = 10)]
        secs: u64,
        #[arg(long, default_value_t = 1000)]
        keys: usize,
        /// Also print when (Unix time) each round trip over this many microseconds
        /// happened, to correlate stalls with the server's periodic work.
        #[arg(long)]
        spikes: Option<u64>,
        addr: SocketAddr,
    },
    /// UDP datagrams of `batch` events as fast as the socket takes them; reports sent.
    Udp(Load),
    /// A thread that only reads the clock; reports its longest gap. No server's
    /// latency max on this machine can be below the stalls it shows.
    Stall {
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
    /// Random reads that each wait for the one before, over `mb` MiB:
    /// what one cache miss costs on this machine (an index update for a key
    /// that fell out of the cache pays at least one).
    Memory {
        #[arg(long, default_value_t = 16)]
        mb: usize,
    },
    /// Acks every frame without decoding it: the machine's limit for the same load.
    NullSink {
        /// Frames answered with one write at most; vigil's own by default.
        #[arg(long, default_value_t = vigil::tcp::MAX_BATCH_FRAMES)]
        reply_batch: usize,
        /// CPU work per frame, in nanoseconds of a calibrated arithmetic loop
        /// that touches no memory: how much a server may spend per message.
        #[arg(long, default_value_t = 0)]
        work_ns: u64,
        /// Decode each frame with vigil's decoder (into a reused buffer, as
        /// vigil does) before acking it: the least work any server must do
        /// per message, without rules or index.
        #[arg(long)]
        decode: bool,
        addr: SocketAddr,
    },
}

#[derive(clap::Args, Clone)]
struct Load {
    /// Connections (TCP) or sockets (UDP).
    #[arg(long, default_value_t = 1)]
    conns: usize,
    /// Events per Msg.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Messages in flight per connection (TCP).
    #[arg(long, default_value_t = 8)]
    window: usize,
    /// Distinct (host, service) keys.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Events per second across all connections (TCP); 0 sends as fast as acks allow.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// The events' TTL in seconds (short, to make the index expire them all at once).
    #[arg(long, default_value_t = DEFAULT_TTL)]
    ttl: f32,
    addr: SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // The null sink runs on a runtime shaped like vigil's (a worker per
    // core); the load generator keeps to one worker.
    if !matches!(cli.mode, Mode::NullSink { .. }) {
        runtime.worker_threads(1);
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async {
        match cli.mode {
            Mode::Tcp(load) => tcp(load).await,
            Mode::Latency {
                secs,
                keys,
                spikes,
                addr,
            } => latency(secs, keys, spikes, addr).await,
            Mode::Udp(load) => udp(load).await,
            Mode::NullSink {
                reply_batch,
                work_ns,
                decode,
                addr,
            } => null_sink(reply_batch, work_ns, decode, addr).await,
            // Blocks this thread, which nothing else needs meanwhile.
            Mode::Stall { secs } => {
                stall(secs);
                Ok(())
            }
            Mode::Memory { mb } => {
                memory(mb);
                Ok(())
            }
        }
    })
}

const DEFAULT_TTL: f32 = 300.0;

/// Pre-encoded Msg bodies covering `keys` distinct keys, `batch` events each.
fn messages(batch: usize, keys: usize, ttl: f32) -> Vec<Bytes> {
    // Enough messages to touch every key, within ~2 M pre-encoded events.
    let per_cycle = keys
        .div_ceil(batch)
        .clamp(1, (2_000_000 / batch.max(1)).max(1));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    (0..per_cycle)
        .map(|m| {
            let events = (0..batch)
                .map(|i| {
                    let key = (m * batch + i) % keys.max(1);
                    PbEvent {
                        host: Some(format!("host{}", key / 10)),
                        service: Some(format!("service {}", key % 10)),
                        state: Some("ok".into()),
                        time_micros: Some(now),
                        ttl: Some(ttl),
                        tags: vec!["load".into()],
                        metric_d: Some(key as f64),
                        attributes: vec![Attribute {
                            key: "gen".into(),
                            value: Some("loadgen".into()),
                        }],
                        ..PbEvent::default()
                    }
                })
                .collect();
            Msg {
                events,
                ..Msg::default()
            }
            .encode_to_vec()
            .into()
        })
        .collect()
}

fn framed(body: &Bytes) -> Bytes {
    let mut out = BytesMut::with_capacity(4 + body.len());
    out.put_u32(body.len() as u32);
    out.put_slice(body);
    out.freeze()
}

async fn tcp(load: Load) -> anyhow::Result<()> {
    let frames: Arc<Vec<Bytes>> = Arc::new(
        messages(load.batch, load.keys, load.ttl)
            .iter()
            .map(framed)
            .collect(),
    );
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..load.conns {
        let stream = TcpStream::connect(load.addr).await?;
        stream.set_nodelay(true)?;
        // A paced connection sends one Msg per period.
        let period = (load.rate > 0).then(|| {
            let msgs_per_sec = load.rate as f64 / (load.batch * load.conns) as f64;
            Duration::from_secs_f64(1.0 / msgs_per_sec)
        });
        tasks.push(tokio::spawn(connection(
            stream,
            frames.clone(),
            c,
            load.window,
            period,
            Replies {
                acked: acked.clone(),
                refused: refused.clone(),
            },
            stop.clone(),
        )));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(load.secs)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let msgs = acked.load(Ordering::Relaxed);
    let events = msgs * load.batch as u64;
    println!(
        "tcp conns={} batch={} window={} keys={}: {} events acked in {:.1} s = {:.0} events/s ({:.0} msgs/s)",
        load.conns,
        load.batch,
        load.window,
        load.keys,
        events,
        elapsed,
        events as f64 / elapsed,
        msgs as f64 / elapsed
    );
    for t in tasks {
        t.abort();
    }
    // Not in the rate: a server that answers with errors is not keeping up.
    let refused = refused.load(Ordering::Relaxed);
    if refused > 0 {
        println!(
            "{refused} msgs refused ({} events): answered with an error, not counted above",
            refused * load.batch as u64
        );
    }
    Ok(())
}

/// What a connection's replies said, counted.
struct Replies {
    acked: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
}

/// Keeps `window` frames in flight: the writer waits for permits, the reader
/// returns one per reply.
async fn connection(
    stream: TcpStream,
    frames: Arc<Vec<Bytes>>,
    offset: usize,
    window: usize,
    period: Option<Duration>,
    replies: Replies,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let permits = Arc::new(Semaphore::new(window));
    let reader_permits = permits.clone();
    let reader = tokio::spawn(async move {
        let mut read = BufReader::with_capacity(64 * 1024, read);
        loop {
            let len = read.read_u32().await? as usize;
            let mut body = vec![0u8; len];
            read.read_exact(&mut body).await?;
            // An ack is always these two bytes; anything else carries an error.
            let counter = if body == vigil::proto::ACK_BODY {
                &replies.acked
            } else {
                &replies.refused
            };
            counter.fetch_add(1, Ordering::Relaxed);
            reader_permits.add_permits(1);
        }
        #[allow(unreachable_code)]
        Ok::<_, std::io::Error>(())
    });
    let mut next = offset;
    let mut out = BytesMut::new();
    let mut pace = period.map(tokio::time::interval);
    while !stop.load(Ordering::Relaxed) {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        permits.acquire().await?.forget();
        // Unpaced, write every frame the window allows in one go.
        let mut n = 1;
        while pace.is_none()
            && let Ok(p) = permits.try_acquire()
        {
            p.forget();
            n += 1;
        }
        for _ in 0..n {
            out.extend_from_slice(&frames[next % frames.len()]);
            next += 1;
        }
        write.write_all(&out).await?;
        out.clear();
    }
    reader.abort();
    Ok(())
}

async fn latency(
    secs: u64,
    keys: usize,
    spikes: Option<u64>,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let frames: Vec<Bytes> = messages(1, keys, DEFAULT_TTL).iter().map(framed).collect();
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut reply = vec![0u8; 64];
    let mut i = 0;
    // Printed after the run, so the printing does not cause spikes of its own.
    let mut slow = Vec::new();
    while Instant::now() < deadline {
        let sent = Instant::now();
        stream.write_all(&frames[i % frames.len()]).await?;
        let len = stream.read_u32().await? as usize;
        if len > reply.len() {
            reply.resize(len, 0);
        }
        stream.read_exact(&mut reply[..len]).await?;
        let micros = sent.elapsed().as_micros().max(1) as u64;
        hist.record(micros)?;
        if spikes.is_some_and(|over| micros > over) {
            slow.push((std::time::SystemTime::now(), micros));
        }
        i += 1;
    }
    for (at, micros) in slow {
        let at = at.duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
        println!("spike: {micros}us ending at {at:.6}");
    }
    println!(
        "latency over {secs} s, {} requests: p50={}us p99={}us p99.9={}us max={}us",
        hist.len(),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
    Ok(())
}

/// Spins on the clock for `secs`: any gap between two reads is time the
/// machine (scheduler, interrupts, hypervisor) took this thread off its core.
fn stall(secs: u64) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let (mut last, mut longest) = (start, Duration::ZERO);
    let (mut over_1ms, mut over_5ms) = (0, 0);
    while last < deadline {
        let now = Instant::now();
        let gap = now - last;
        longest = longest.max(gap);
        over_1ms += u32::from(gap >= Duration::from_millis(1));
        over_5ms += u32::from(gap >= Duration::from_millis(5));
        last = now;
    }
    println!(
        "stall over {secs} s: longest gap {}us; gaps >= 1 ms: {over_1ms}, >= 5 ms: {over_5ms}",
        longest.as_micros()
    );
}

/// A pointer chase: one cache line per slot, the slots linked in one random
/// cycle, so every read's address comes from the read before and no two
/// overlap. The time per read is the latency of the level `mb` spills to.
fn memory(mb: usize) {
    use rand::seq::SliceRandom;

    #[derive(Clone, Copy)]
    #[repr(align(64))]
    struct Line {
        next: usize,
    }
    let slots = (mb * 1024 * 1024 / size_of::<Line>()).max(2);
    let mut order: Vec<usize> = (0..slots).collect();
    order.shuffle(&mut rand::rng());
    let mut lines = vec![Line { next: 0 }; slots];
    for pair in order.windows(2) {
        lines[pair[0]].next = pair[1];
    }
    lines[order[slots - 1]].next = order[0];
    const READS: u32 = 20_000_000;
    let mut at = order[0];
    // Once round the cycle first, so the timed reads find what a warm process would.
    for _ in 0..slots {
        at = lines[at].next;
    }
    let start = Instant::now();
    for _ in 0..READS {
        at = lines[at].next;
    }
    let per_read = start.elapsed() / READS;
    std::hint::black_box(at);
    println!("memory over {mb} MiB: {per_read:?} per dependent read");
}

async fn udp(load: Load) -> anyhow::Result<()> {
    let bodies = messages(load.batch, load.keys, load.ttl);
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..load.conns {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(load.addr).await?;
        let (bodies, sent, stop) = (bodies.clone(), sent.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                if socket.send(&bodies[i % bodies.len()]).await.is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(load.secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let datagrams = sent.load(Ordering::Relaxed);
    println!(
        "udp sockets={} batch={}: {} datagrams = {} events sent in {} s = {:.0} events/s",
        load.conns,
        load.batch,
        datagrams,
        datagrams * load.batch as u64,
        load.secs,
        (datagrams * load.batch as u64) as f64 / load.secs as f64
    );
    Ok(())
}

/// vigil's TCP connection handler minus the ingest: the same framing, the
/// same batching of buffered frames (at most `reply_batch`) and one flush per
/// batch, each frame acked without being decoded. The gap between the two is
/// what decoding, the rules and the index cost.
async fn null_sink(
    reply_batch: usize,
    work_ns: u64,
    decode: bool,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let work = Work::calibrated(work_ns);
    println!(
        "null sink listening on {}; {} loop rounds of work per frame",
        listener.local_addr()?,
        work.rounds
    );
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let mut framed = Framed::new(stream, vigil::tcp::codec(vigil::tcp::DEFAULT_MAX_FRAME));
            let mut events = Vec::new();
            let limits = vigil::limits::Limits::DEFAULT;
            let mut failed = false;
            let mut decoded = |frame: &[u8]| {
                if decode
                    && let Err(e) = vigil::wire::decode_msg(frame, 0, &limits, &mut events)
                    && !std::mem::replace(&mut failed, true)
                {
                    // Acked all the same (this is a yardstick), but said once.
                    eprintln!("null sink: a frame did not decode: {e}");
                }
            };
            while let Some(Ok(frame)) = framed.next().await {
                decoded(&frame);
                let mut frames = 1;
                while frames < reply_batch
                    && let Some(Some(Ok(frame))) = framed.next().now_or_never()
                {
                    decoded(&frame);
                    frames += 1;
                }
                work.run(frames);
                for _ in 0..frames {
                    if framed.feed(vigil::proto::ack()).await.is_err() {
                        return;
                    }
                }
                if SinkExt::<Bytes>::flush(&mut framed).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// A fixed amount of CPU work per frame: rounds of a dependent arithmetic
/// chain, calibrated at start so one frame's rounds take `ns` nanoseconds.
#[derive(Clone, Copy)]
struct Work {
    rounds: u64,
}

impl Work {
    fn calibrated(ns: u64) -> Work {
        if ns == 0 {
            return Work { rounds: 0 };
        }
        const PROBE: u64 = 50_000_000;
        // The fastest of a few probes: the machine's stalls only ever add time.
        let fastest = (0..5)
            .map(|_| {
                let start = Instant::now();
                spin(PROBE);
                start.elapsed()
            })
            .min()
            .expect("five probes");
        let per_round_ns = fastest.as_nanos() as f64 / PROBE as f64;
        Work {
            rounds: (ns as f64 / per_round_ns).round() as u64,
        }
    }

    fn run(self, frames: usize) {
        spin(self.rounds * frames as u64);
    }
}

fn spin(rounds: u64) {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    for _ in 0..rounds {
        x = x.rotate_left(5) ^ x.wrapping_mul(31);
    }
    std::hint::black_box(x);
}
