//! The bodies of vigil's fuzz targets, one function per `fuzz_targets/*.rs`.
//!
//! Each must never panic on any input except where it asserts a property of vigil
//! (an assertion failure is a bug found). This file uses only vigil's public API
//! and crates vigil itself depends on (`bytes`, `prost`, `tokio-util`), so the main
//! crate's `tests/fuzz_corpus.rs` compiles this very file (`#[path]`) and replays
//! every committed `fuzz/corpus/<target>/` file through the same checks on stable
//! Rust, without cargo-fuzz: keep it free of anything else.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use prost::Message;
use tokio_util::codec::Decoder;
use vigil::clock::{Clock, MICROS_PER_SEC, ManualClock};
use vigil::event::{Event, Metric};
use vigil::graphite_in::{line_text, parse_line};
use vigil::http::read_event_line;
use vigil::index::{DEFAULT_TTL_SECS, Index, IndexConfig};
use vigil::json::{iso8601, to_json};
use vigil::limits::Limits;
use vigil::proto::{self, Msg, PbEvent};
use vigil::query::Query;
use vigil::rules::engine::Rules;
use vigil::rules::testing::Recorder;
use vigil::rules::{self, EnvPolicy, RuleText, persist};
use vigil::streams::Streams;
use vigil::wire;

/// The frame limit the frame decoder target runs with.
pub const MAX_FRAME: usize = 1 << 20;

/// The arrival time stamped on events that carry none.
const NOW: i64 = 1_700_000_000_123_456;

/// What one simulated connection read: frames in order, then how it ended.
#[derive(Debug, PartialEq)]
struct Read {
    frames: Vec<Vec<u8>>,
    /// `None`: clean EOF on a frame boundary. `Some(text)`: the framing error
    /// `Framed` would have returned (oversized frame, or EOF mid-frame).
    error: Option<String>,
}

/// Feeds `data` to the TCP codec `chunk` bytes at a time, as `Framed` does: decode
/// until it wants more, read more, and at EOF `decode_eof` until it is done. A
/// framing error ends the connection.
fn read_frames(data: &[u8], chunk: usize) -> Read {
    let mut codec = vigil::tcp::codec(MAX_FRAME);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX_FRAME, "frame over the limit");
                    frames.push(frame.to_vec());
                }
                Ok(None) => break,
                Err(e) => {
                    return Read {
                        frames,
                        error: Some(e.to_string()),
                    };
                }
            }
        }
    }
    loop {
        match codec.decode_eof(&mut buf) {
            Ok(Some(frame)) => frames.push(frame.to_vec()),
            Ok(None) => {
                return Read {
                    frames,
                    error: None,
                };
            }
            Err(e) => {
                return Read {
                    frames,
                    error: Some(e.to_string()),
                };
            }
        }
    }
}

/// Target `frame_decoder`: arbitrary bytes from a TCP peer, through the framing,
/// then each frame as ingest takes it (`wire::decode_msg` into a reused buffer,
/// checked against prost, the query parsed), and each frame also as the body of
/// a gRPC `Msg`. Framing must not depend on how TCP segmented the bytes.
pub fn frame_decoder(data: &[u8]) {
    let whole = read_frames(data, data.len());
    let bytewise = read_frames(data, 1);
    assert_eq!(whole, bytewise, "framing depends on segmentation");
    let consumed: usize = whole.frames.iter().map(|f| 4 + f.len()).sum();
    assert!(consumed <= data.len());
    if whole.error.is_none() {
        // Anything left over at EOF is a truncated frame and must be reported,
        // including a lone length prefix (tokio-util's `LengthDelimitedCodec`
        // took those 4 bytes out of the buffer and called it a clean EOF:
        // corpus/frame_decoder/eof-after-length-prefix.frame).
        assert_eq!(consumed, data.len(), "clean EOF left bytes unread");
    }
    // One reused buffer, as a connection keeps one.
    let mut events = Vec::new();
    for frame in whole.frames {
        ingest_frame(&frame, &mut events);
        grpc_msg(&frame);
    }
}

/// `vigil.Msg` as prost would generate it.
#[derive(Clone, PartialEq, prost::Message)]
struct GeneratedGrpcMsg {
    #[prost(message, repeated, tag = "1")]
    events: Vec<PbEvent>,
}

/// The same bytes as the body of a gRPC `Msg`, which the server keeps encoded
/// and decodes with the wire decoder: accepted with the same events as
/// prost's generated decoding would give, or refused by both.
fn grpc_msg(body: &[u8]) {
    let reference = GeneratedGrpcMsg::decode(body).map(|msg| {
        let events = msg.events.into_iter();
        events.map(|pb| proto::from_pb(pb, NOW)).collect::<Vec<_>>()
    });
    let mut events = Vec::new();
    let ours = vigil::grpc::Msg::decode(body)
        .map_err(|e| e.to_string())
        .and_then(|msg| (msg.decode_into(NOW, &UNLIMITED, &mut events)).map_err(|e| e.to_string()));
    match (ours, reference) {
        (Ok(()), Ok(expected)) => {
            assert_eq!(events.len(), expected.len(), "event count");
            for (a, b) in events.iter().zip(&expected) {
                assert_same_event(a, b);
            }
        }
        (Err(_), Err(_)) => {}
        (ours, reference) => panic!(
            "gRPC Msg and prost disagree: {ours:?} vs {:?}",
            reference.map(|_| ())
        ),
    }
}

/// No limits: what the wire decoder accepts must be exactly what prost accepts.
const UNLIMITED: Limits = Limits {
    max_events: usize::MAX,
    max_tags: usize::MAX,
    max_attributes: usize::MAX,
    max_string: usize::MAX,
};

/// A frame as ingest decodes it (`wire::decode_msg` into a reused buffer),
/// checked against prost + `from_pb`: both accept with the same events and
/// query, or both refuse. With the default limits the decoder may refuse
/// more, never decode differently.
fn ingest_frame(frame: &[u8], events: &mut Vec<Event>) {
    let reference = Msg::decode(frame).map(|msg| {
        let events: Vec<Event> = msg
            .events
            .into_iter()
            .map(|pb| proto::from_pb(pb, NOW))
            .collect();
        (events, msg.query.map(|q| q.string.unwrap_or_default()))
    });
    let ours = wire::decode_msg(frame, NOW, &UNLIMITED, events);
    match (ours, reference) {
        (Ok(request), Ok((expected, query))) => {
            assert_eq!(events.len(), expected.len(), "event count");
            for (a, b) in events.iter().zip(&expected) {
                assert_same_event(a, b);
            }
            assert_eq!(request.query, query, "query");
            if let Some(query) = request.query {
                let _ = Query::parse(&query);
            }
            let mut limited = Vec::new();
            if wire::decode_msg(frame, NOW, &Limits::DEFAULT, &mut limited).is_ok() {
                assert_eq!(limited.len(), events.len(), "limits changed the decoding");
            }
        }
        (Err(e), Err(_)) => {
            // The reply ingest sends back must itself be a valid Msg.
            let reply = proto::error_reply(format!("invalid message: {e}"));
            let back = Msg::decode(reply).expect("error_reply decodes");
            assert_eq!(back.ok, Some(false));
        }
        (ours, reference) => panic!(
            "wire decoder and prost disagree: {:?} vs {:?}",
            ours.map(|_| ()),
            reference.map(|_| ())
        ),
    }
}

/// Field-by-field equality with floats compared by bits, so NaN round-trips count.
fn assert_same_event(a: &Event, b: &Event) {
    assert_eq!(a.host, b.host);
    assert_eq!(a.service, b.service);
    assert_eq!(a.state, b.state);
    assert_eq!(a.time, b.time);
    assert_eq!(a.description, b.description);
    assert_eq!(a.tags, b.tags);
    let bits = |m: Option<Metric>| {
        m.map(|m| match m {
            Metric::Int(i) => (0, i as u64),
            Metric::Float(f) => (1, f.to_bits()),
        })
    };
    assert_eq!(
        bits(a.metric),
        bits(b.metric),
        "{:?} vs {:?}",
        a.metric,
        b.metric
    );
    assert_eq!(a.ttl.map(f32::to_bits), b.ttl.map(f32::to_bits), "ttl");
    assert_eq!(a.attributes, b.attributes);
}

/// Target `proto_roundtrip`: a `Msg` body → vigil events → `events_reply` →
/// decoded again. Everything vigil keeps of an event must survive, the arrival
/// time must no longer matter (the time travelled), and encoding is deterministic.
pub fn proto_roundtrip(data: &[u8]) {
    let Ok(msg) = Msg::decode(data) else {
        return;
    };
    let events: Vec<Event> = msg
        .events
        .into_iter()
        .map(|pb| proto::from_pb(pb, NOW))
        .collect();
    let reply = proto::events_reply(&events);
    let again = Msg::decode(reply.clone()).expect("events_reply must decode");
    assert_eq!(again.ok, Some(true));
    assert_eq!(again.events.len(), events.len());
    let back: Vec<Event> = again
        .events
        .into_iter()
        .map(|pb| proto::from_pb(pb, NOW + 1))
        .collect();
    for (a, b) in events.iter().zip(&back) {
        // An attribute given twice goes out once, with the value queries read.
        let read = Event {
            attributes: last_of_each(&a.attributes),
            ..a.clone()
        };
        assert_same_event(&read, b);
        // One event on its own, through `to_pb` and the wire, too.
        let single =
            PbEvent::decode(proto::to_pb(a).encode_to_vec().as_slice()).expect("to_pb must decode");
        assert_same_event(&read, &proto::from_pb(single, NOW - 1));
    }
    assert_eq!(
        proto::events_reply(&back),
        reply,
        "encoding is not deterministic"
    );
}

/// The last value of each key, in order: what [`Event::attribute`] reads.
fn last_of_each(attributes: &[(String, String)]) -> Vec<(String, String)> {
    let mut kept: Vec<(String, String)> = Vec::new();
    for (key, value) in attributes.iter().rev() {
        if !kept.iter().any(|(k, _)| k == key) {
            kept.push((key.clone(), value.clone()));
        }
    }
    kept.reverse();
    kept
}

/// Events the query target evaluates every parsed query against.
fn sample_events() -> Vec<Event> {
    vec![
        Event::default(),
        Event {
            host: Some("web-1".into()),
            service: Some("cpu user".into()),
            state: Some("ok".into()),
            time: 1_500_000,
            description: Some("all \"good\"\n".into()),
            tags: vec!["prod".into(), "tag with space".into()],
            metric: Some(Metric::Float(0.5)),
            ttl: Some(60.0),
            attributes: vec![("env".into(), "staging".into()), ("n".into(), "3".into())],
        },
        Event {
            host: Some(String::new()),
            service: Some("ü%_\\.*".into()),
            state: Some("critical".into()),
            time: i64::MIN,
            description: None,
            tags: vec![String::new()],
            metric: Some(Metric::Float(f64::NAN)),
            ttl: Some(f32::INFINITY),
            attributes: vec![(String::new(), String::new()), ("a".into(), "1".into())],
        },
        Event {
            time: i64::MAX,
            metric: Some(Metric::Int(i64::MAX)),
            ttl: Some(-1.0),
            ..Event::default()
        },
    ]
}

/// Target `query_parse`: `Query::parse` and `Query::parse_prefix` on any text.
/// Errors point inside the text; a parsed query's `Display` re-parses to the
/// same query (same text, same compiled tree, same answers); `matches` never panics.
pub fn query_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let events = sample_events();
    match Query::parse(text) {
        Ok(query) => {
            let again = Query::parse(&query.to_string()).expect("Display must re-parse");
            assert_eq!(again.as_str(), query.as_str());
            assert_eq!(format!("{again:?}"), format!("{query:?}"), "{text:?}");
            assert_eq!(again.exact_key(), query.exact_key());
            for e in &events {
                assert_eq!(again.matches(e), query.matches(e), "{text:?} on {e:?}");
            }
        }
        Err(e) => {
            assert!(text.is_char_boundary(e.offset), "{text:?}: {e:?}");
            assert!(e.offset <= text.len(), "{text:?}: {e:?}");
            assert_eq!(e.column, text[..e.offset].chars().count() + 1, "{text:?}");
        }
    }
    match Query::parse_prefix(text) {
        Ok((query, consumed)) => {
            assert!(text.is_char_boundary(consumed), "{text:?}");
            assert!(text[..consumed].contains(query.as_str()), "{text:?}");
            let again = Query::parse(query.as_str()).expect("a prefix must parse alone");
            assert_eq!(again.as_str(), query.as_str());
            for e in &events {
                assert_eq!(again.matches(e), query.matches(e), "{text:?} on {e:?}");
            }
        }
        Err(e) => assert!(text.is_char_boundary(e.offset), "{text:?}: {e:?}"),
    }
}

/// Target `event_line`: one `POST /events` line, read as the server reads it
/// (`vigil::http::read_event_line`). An accepted event keeps within the limits
/// it was read with, is accepted the same under looser ones, and its JSON form
/// (`vigil::json::to_json`, what subscribers and `GET /index` get) reads back
/// as the same event, to the millisecond its time is written with.
pub fn event_line(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let tight = Limits {
        max_events: 1,
        max_tags: 2,
        max_attributes: 2,
        max_string: 8,
    };
    let read = |line: &str, limits: &Limits| read_event_line(line, NOW, limits);
    let loose = read(line, &Limits::DEFAULT);
    if let Ok(e) = read(line, &tight) {
        assert!(
            e.tags.len() <= 2 && e.attributes.len() <= 2,
            "{line:?}: {e:?}"
        );
        let strings = [&e.host, &e.service, &e.state, &e.description];
        let mut strings = strings.into_iter().flatten().chain(&e.tags);
        assert!(strings.all(|s| s.len() <= 8), "{line:?}: {e:?}");
        let attributes = e.attributes.iter().flat_map(|(k, v)| [k, v]);
        assert!(
            attributes.into_iter().all(|s| s.len() <= 8),
            "{line:?}: {e:?}"
        );
        assert_eq!(loose.as_ref(), Ok(&e), "{line:?}");
    }
    let Ok(e) = loose else {
        return;
    };
    let json = to_json(&e).to_string();
    let again = read(&json, &Limits::DEFAULT).unwrap_or_else(|err| panic!("{json}: {err}"));
    // Written with milliseconds, and clamped to years 1970..=9999.
    assert_eq!(iso8601(again.time), iso8601(e.time), "{line:?} as {json}");
    // A TTL too large for f32 was read as infinite, which JSON cannot hold.
    let ttl = e.ttl.filter(|t| t.is_finite());
    let expected = Event {
        time: again.time,
        ttl,
        ..e
    };
    assert_eq!(again, expected, "{line:?} as {json}");
}

/// Target `graphite_line`: one Graphite plaintext line (without its `\n`),
/// as the listener takes it: its text repaired where it is not UTF-8
/// (`graphite_in::line_text`), then `graphite_in::parse_line` with the
/// default limits and with a tiny `max_string`. A point accepted within the
/// tiny one has a short path and is accepted the same with the defaults;
/// trailing whitespace changes nothing; a point is a path without
/// whitespace, a metric that is not NaN and a time, nothing else; written
/// back as a line (the metric as Rust prints it, the time in seconds to the
/// microsecond) it reads back as itself.
pub fn graphite_line(data: &[u8]) {
    let (line, _) = line_text(data);
    let tight = Limits {
        max_string: 8,
        ..Limits::DEFAULT
    };
    let loose = parse_line(&line, &Limits::DEFAULT);
    if let Ok(point) = parse_line(&line, &tight) {
        let path = point.as_ref().and_then(|p| p.service.as_deref());
        assert!(path.is_none_or(|path| path.len() <= 8), "{line:?}");
        assert_eq!(loose, Ok(point), "{line:?}");
    }
    let trailing = parse_line(&format!("{line} \t\x0b\r"), &Limits::DEFAULT);
    assert_eq!(trailing, loose, "{line:?} with trailing whitespace");
    let Ok(Some(point)) = loose else {
        return;
    };
    let path = point.service.as_deref().unwrap_or_default();
    let java_space = [' ', '\t', '\n', '\x0b', '\x0c', '\r'];
    assert!(!path.is_empty() && !path.contains(java_space), "{line:?}");
    let Some(Metric::Float(metric)) = point.metric else {
        panic!("{line:?}: metric {:?}", point.metric);
    };
    assert!(!metric.is_nan(), "{line:?}");
    let rest = Event {
        service: None,
        metric: None,
        time: 0,
        ..point.clone()
    };
    assert_eq!(rest, Event::default(), "{line:?}");
    // Beyond 2^50 µs (35 years from 1970 and more) seconds as a double
    // no longer hold every microsecond.
    let micros = point.time.unsigned_abs();
    if micros >= 1 << 50 {
        return;
    }
    let sign = if point.time < 0 { "-" } else { "" };
    let secs = format!("{sign}{}.{:06}", micros / 1_000_000, micros % 1_000_000);
    let written = format!("{path} {metric} {secs}");
    let again = parse_line(&written, &Limits::DEFAULT);
    let again = again.unwrap_or_else(|e| panic!("{written:?}: {e}"));
    let again = again.unwrap_or_else(|| panic!("{written:?} dropped"));
    assert_eq!(again.service, point.service, "{written:?}");
    let bits = |point: &Event| match point.metric {
        Some(Metric::Float(metric)) => Some(metric.to_bits()),
        _ => None,
    };
    assert_eq!(bits(&again), bits(&point), "{written:?}");
    assert_eq!(again.time, point.time, "{line:?} as {written:?}");
}

/// Target `rules_load`: a rule file parsed and compiled as `vigil check` does
/// (`EnvPolicy::Lenient`). Any outcome but a panic is fine; a failure renders
/// as a non-empty message.
pub fn rules_load(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    match rules::load("fuzz.vigil", source, EnvPolicy::Lenient) {
        Ok((_file, compiled)) => {
            let warnings = rules::render_all(&compiled.warnings, "fuzz.vigil", source);
            std::hint::black_box(warnings);
        }
        Err(rendered) => assert!(!rendered.is_empty(), "an error renders as nothing"),
    }
}

/// A rule file's own `test "…"` blocks, run as `vigil test` runs them: its
/// stages on a virtual clock, fed whatever events and time jumps the file
/// says. The engine catches a stage that panics and the test reports it as a
/// failure; here it must not happen at all.
pub fn rules_run(data: &[u8]) {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((file, _compiled)) = rules::load("fuzz.vigil", source, EnvPolicy::Lenient) else {
        return;
    };
    let Ok(outcomes) = rules::testing::run_tests(&file) else {
        return;
    };
    for outcome in outcomes {
        for failure in &outcome.failures {
            assert!(!failure.starts_with("a stage failed"), "{failure}");
        }
    }
}

/// The rules [`state_restore`] restores into: every stage that keeps state,
/// on its own and inside nested `by`s.
pub const STATE_RULES: &str = r#"output out = forward(host: "x")
streams {
  index
  changed_state { out }
  rate(2s) { out }
  by(host) {
    rate(1s) { out }
    stable(1s) { out }
    throttle(2, 5s) { out }
    ewma(2s) { out }
    ewma_timeless(0.5) { out }
    ddt { out }
    changed(metric) { out }
    percentiles(3s, [0.5, 0.99]) { out }
    moving_event_window(3) { mean { out } }
    fixed_event_window(2) { sum { out } }
    moving_time_window(2s) { max { out } }
    fixed_time_window(2s) { min { out } }
    coalesce(2s) { count { out } }
    by(service) { rate(3s) { out } changed_state { out } }
  }
}
"#;

/// The stages whose state came with version 5, restored from the same
/// inputs as [`STATE_RULES`]: added there, they would move that rule file's
/// entries and leave the committed corpus, grown against it, refused at
/// their first entry.
pub const STATE_RULES_V5: &str = r#"output out = forward(host: "x")
streams {
  by(host) {
    counter { out }
    runs(2, state) { out }
    rollup(1, 2s) { out }
    fixed_event_window(3) { median { out } std_dev { out } }
  }
}
"#;

/// The stages whose state came after [`STATE_RULES_V5`]'s (`fill_in`,
/// `fill_in_last`, `apdex`, a `batch` window), restored from the same
/// inputs: appended there, they would leave its seed refused at its end.
pub const STATE_RULES_FILL: &str = r#"output out = forward(host: "x")
streams {
  by(host) {
    fill_in(1s, {service: "gap", metric: 0}) { out }
    fill_in_last(2s, {state: "gap"}) { out }
    apdex(2s, satisfied: "metric < 1", tolerated: "metric < 5") { out }
    batch(2, 3s) { sum { out } median { out } }
  }
}
"#;

/// A stream state file with `data` between its version and its checksum,
/// where vigil writes the rule text and the stages' entries; the checksum is
/// made to fit, so the fuzzer reaches what a file that passed it could hold.
/// The file is restored into [`STATE_RULES`] as at start (it may be
/// refused), then those rules run from whatever was restored: ticks, and
/// events of the series the file's groups may name. Nothing may panic.
/// Each input goes through both encodings: as version 1 (CBOR, as versions
/// 1 and 2 wrote it) and as version 3 (postcard); and as version 5 into
/// [`STATE_RULES_V5`] and [`STATE_RULES_FILL`].
pub fn state_restore(data: &[u8]) {
    for version in [1u32, 3] {
        restore_state_file(version, STATE_RULES, data);
    }
    restore_state_file(5, STATE_RULES_V5, data);
    restore_state_file(5, STATE_RULES_FILL, data);
}

fn restore_state_file(version: u32, rules_text: &str, data: &[u8]) {
    let mut file = b"VIGILSTS".to_vec();
    file.extend_from_slice(&version.to_le_bytes());
    file.extend_from_slice(data);
    let checksum = crc32fast::hash(&file);
    file.extend_from_slice(&checksum.to_le_bytes());
    let text = RuleText {
        name: "state.vigil".to_owned(),
        text: rules_text.to_owned(),
    };
    let (_, compiled) =
        rules::load(&text.name, &text.text, EnvPolicy::Lenient).expect("state rules compile");
    let _ = persist::restore_bytes(&compiled.roots, &text, &file, NOW, DEFAULT_TTL_SECS);
    let clock = Arc::new(ManualClock::new(NOW));
    let index = Arc::new(Index::new(IndexConfig::default()));
    let rules = Rules::new(
        compiled.roots,
        Some(Arc::new(text)),
        vec![Arc::new(Recorder::default())],
        index.clone(),
        clock.clone(),
    );
    let event = |host: &str, metric: i64, state: &str| Event {
        host: Some(host.to_owned()),
        service: Some("s".to_owned()),
        state: Some(state.to_owned()),
        metric: Some(Metric::Int(metric)),
        time: clock.now(),
        ttl: Some(60.0),
        ..Event::default()
    };
    for (later, state) in [(0, "ok"), (1, "critical"), (86_400, "ok")] {
        clock.set(NOW + later * MICROS_PER_SEC);
        // As the server's expiry tick: each batch checked and run alone.
        index.expire_batches(clock.now(), |notices| rules.process_expired(notices));
        rules.tick();
        rules.process(&[event("a", later, state), event("b", -later, state)]);
    }
    let failed = rules.stats.errors.load(Ordering::Relaxed);
    assert_eq!(failed, 0, "a stage panicked on restored state");
}
