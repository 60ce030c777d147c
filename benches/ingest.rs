//! The ingest path per `Msg`: framing + protobuf decode, then decode + rules
//! (`rules/bench.vigil`) + index, for 100-event and 1-event messages over
//! 100 000 distinct keys — everything a TCP connection does but the syscalls.
//! Decoding a 1-event `Msg` alone (vigil's decoder and prost's) is the least
//! work any server must do per message of the 1-event scenario.

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use tokio_util::codec::Decoder;

use vigil::ingest::Transport;
use vigil::limits::Limits;
use vigil::proto::Msg;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod workload;

use workload::{KEYS, bench_rules_ingest, msg};

fn ingest(c: &mut Criterion) {
    let mut group = c.benchmark_group("ingest");
    group.throughput(Throughput::Elements(100));
    let body = msg(0, 100);
    let mut framed = BytesMut::new();
    framed.put_u32(body.len() as u32);
    framed.put_slice(&body);
    let framed = framed.freeze();
    group.bench_function("frame_and_decode_100", |b| {
        let mut codec = vigil::tcp::codec(vigil::tcp::DEFAULT_MAX_FRAME);
        b.iter(|| {
            let mut buf = BytesMut::from(&framed[..]);
            let frame = codec.decode(&mut buf).unwrap().unwrap();
            Msg::decode(frame.freeze()).unwrap()
        })
    });

    group.throughput(Throughput::Elements(1));
    let bodies: Vec<Bytes> = (0..KEYS).step_by(7).map(|k| msg(k, 1)).collect();
    let mut next = 0;
    let mut events = Vec::new();
    group.bench_function("decode_1", |b| {
        b.iter(|| {
            next = (next + 1) % bodies.len();
            vigil::wire::decode_msg(&bodies[next], 0, &Limits::DEFAULT, &mut events).unwrap()
        })
    });
    group.bench_function("prost_decode_1", |b| {
        b.iter(|| {
            next = (next + 1) % bodies.len();
            Msg::decode(&bodies[next][..]).unwrap()
        })
    });

    for n in [100, 1] {
        let (clock, ingest) = bench_rules_ingest();
        // Fill the index first, so updates hit existing keys as in steady state.
        for first in (0..KEYS).step_by(100) {
            ingest.handle_frame(&msg(first, 100), Transport::Tcp, &mut Vec::new());
        }
        let bodies: Vec<Bytes> = (0..KEYS / n.max(100) * 100 / n)
            .take(10_000)
            .map(|i| msg(i * n * 7 % KEYS, n))
            .collect();
        let mut next = 0;
        let mut events = Vec::new();
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("bench_rules_{n}"), |b| {
            b.iter_batched(
                || {
                    next = (next + 1) % bodies.len();
                    bodies[next].clone()
                },
                |body| {
                    clock.advance(1);
                    ingest.handle_frame(&body, Transport::Tcp, &mut events)
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
