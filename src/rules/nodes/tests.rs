//! Unit tests of the stream stages: small rule sources compiled and run on the
//! virtual clock of [`Bench`], asserting exactly what reaches the output `out`.

use std::sync::atomic::Ordering;

use crate::clock::{Clock, Micros, secs_to_micros};
use crate::event::{Event, Metric};
use crate::rules::engine::MAX_REINJECT_ROUNDS;
use crate::rules::parser::parse;
use crate::rules::testing::{Bench, TEST_EPOCH};
use crate::streams::Streams;

/// Fresh rules with one output, `out`, around the given streams.
fn bench(streams: &str) -> Bench {
    let src = format!("output out = forward(host: \"x\")\nstreams {{\n{streams}\n}}");
    let file = parse(&src).unwrap_or_else(|e| panic!("{e:?}"));
    Bench::new(&file).unwrap_or_else(|e| panic!("{e:?}"))
}

/// The bench's rules reloaded to `streams`, as a SIGHUP does.
fn reload_to(b: &Bench, streams: &str) {
    let src = format!("output out = forward(host: \"x\")\nstreams {{\n{streams}\n}}");
    let file = parse(&src).unwrap_or_else(|e| panic!("{e:?}"));
    let compiled = crate::rules::compile::compile(&file, crate::rules::EnvPolicy::Lenient)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let outputs = b.recorders.iter().map(|(_, r)| r.clone() as _).collect();
    b.rules
        .replace(&b.rules.reload_turn(), compiled.roots, None, outputs);
}

/// `secs` after the start of the test.
fn at(secs: f64) -> Micros {
    TEST_EPOCH + secs_to_micros(secs)
}

/// An event stamped with the bench's current time.
fn ev(b: &Bench, host: &str, service: &str) -> Event {
    Event {
        host: Some(host.to_owned()),
        service: Some(service.to_owned()),
        time: b.clock.now(),
        ..Event::default()
    }
}

fn with_metric(mut e: Event, m: Metric) -> Event {
    e.metric = Some(m);
    e
}

fn with_state(mut e: Event, state: &str) -> Event {
    e.state = Some(state.to_owned());
    e
}

fn with_ttl(mut e: Event, ttl: f32) -> Event {
    e.ttl = Some(ttl);
    e
}

/// An event of host `h`, service `s`, with the integer metric `m`.
fn int_ev(b: &Bench, m: i64) -> Event {
    with_metric(ev(b, "h", "s"), Metric::Int(m))
}

fn metric_ev(b: &Bench, service: &str, m: f64) -> Event {
    with_metric(ev(b, "h", service), float_or_int(m))
}

fn float_or_int(m: f64) -> Metric {
    if m.fract() == 0.0 {
        Metric::Int(m as i64)
    } else {
        Metric::Float(m)
    }
}

fn send(b: &Bench, e: Event) {
    b.rules.process(&[e]);
}

fn out(b: &Bench) -> Vec<Event> {
    b.seen_by("out")
}

/// The metrics `out` received, in order (`None` for events without one).
fn out_metrics(b: &Bench) -> Vec<Option<Metric>> {
    out(b).iter().map(|e| e.metric).collect()
}

fn out_f64(b: &Bench) -> Vec<f64> {
    out(b)
        .iter()
        .map(|e| e.metric.expect("event without metric").as_f64())
        .collect()
}

fn out_states(b: &Bench) -> Vec<Option<String>> {
    out(b).iter().map(|e| e.state.clone()).collect()
}

fn out_descriptions(b: &Bench) -> Vec<(String, Option<String>)> {
    out(b)
        .iter()
        .map(|e| (e.service_str().to_owned(), e.description.clone()))
        .collect()
}

// ---- rate ------------------------------------------------------------------

#[test]
fn rate_reports_sum_per_second_then_zero_then_stops_after_expiry() {
    let b = bench("rate(5s) { out }");
    for i in 1..=10 {
        b.advance_to(at(0.4 * f64::from(i - 1)));
        send(&b, with_ttl(metric_ev(&b, "req", f64::from(i)), 8.0));
    }
    b.advance_to(at(4.9));
    assert!(out(&b).is_empty(), "nothing before the first 5 s pass");

    b.advance_to(at(5.0));
    let seen = out(&b);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].metric, Some(Metric::Float(11.0)));
    assert_eq!(seen[0].time, at(5.0));
    assert_eq!(seen[0].service.as_deref(), Some("req"));
    assert_eq!(
        seen[0].ttl,
        Some(13.0),
        "the latest event's ttl (8 s) plus dt"
    );

    // The latest event (t=3.6 s, ttl 8 s) lives until 11.6 s: 0 at 10 s, then stop.
    b.advance_to(at(30.0));
    let seen = out(&b);
    assert_eq!(
        out_metrics(&b),
        vec![Some(Metric::Float(11.0)), Some(Metric::Float(0.0))]
    );
    assert_eq!(seen[1].time, at(10.0));
}

/// An event timed a year ahead (or in milliseconds) stops the rate as the
/// index would expire it: its TTL plus the 5 minutes allowed after it came.
#[test]
fn rate_stops_for_an_event_timed_far_ahead_as_the_index_expires_it() {
    let b = bench("rate(10s) { out }");
    let mut ahead = with_ttl(metric_ev(&b, "req", 10.0), 20.0);
    ahead.time = at(365.0 * 86_400.0);
    send(&b, ahead);
    b.advance_to(at(3_600.0));
    // Alive until 320 s: windows ending at 10 s … 320 s, the last one 0.
    assert_eq!(out(&b).len(), 32);
    assert_eq!(out(&b).last().unwrap().time, at(320.0));
}

/// As a window's sum: a NaN or infinite metric makes its period's rate NaN
/// or infinite (Riemann's too), and the next period starts from 0.
#[test]
fn a_nan_or_infinite_metric_spoils_only_its_rates_period() {
    let b = bench("rate(5s) { out }");
    let send_at = |t, m| {
        b.advance_to(at(t));
        send(&b, with_metric(ev(&b, "h", "s"), Metric::Float(m)));
    };
    send_at(0.0, 1.0);
    send_at(1.0, f64::NAN);
    send_at(6.0, 10.0);
    send_at(11.0, f64::INFINITY);
    b.advance_to(at(20.0));
    let metrics = out_f64(&b);
    assert!(metrics[0].is_nan(), "{metrics:?}");
    assert_eq!(metrics[1..], [2.0, f64::INFINITY, 0.0]);
}

#[test]
fn rate_reports_a_window_whose_latest_event_expired_before_it_closed() {
    // Two events with a 2 s TTL in a 10 s window: the window's sum is still
    // reported once (as Riemann's timer would), then the series stops.
    let b = bench("rate(10s) { out }");
    send(&b, with_ttl(metric_ev(&b, "req", 2.0), 2.0));
    b.advance_to(at(1.0));
    send(&b, with_ttl(metric_ev(&b, "req", 3.0), 2.0));
    b.advance_to(at(40.0));
    assert_eq!(out_metrics(&b), vec![Some(Metric::Float(0.5))]);
    assert_eq!(out(&b)[0].time, at(10.0));
}

/// A stall of the process (a VM paused for an hour, the clock stepped
/// ahead between two ticks) is no silence of the series: nothing could
/// come meanwhile. As after a restart, the period it began in is reported
/// once, with its true end and living its TTL plus `dt` from the report,
/// then the rate goes on at its pace from there: not a 0 for each period
/// missed, 16 of them at once.
#[test]
fn a_rate_reports_once_after_a_stall_then_at_its_pace() {
    let b = bench("rate(10s) { out }");
    send(&b, with_ttl(metric_ev(&b, "req", 20.0), 7_200.0));
    b.clock.set(at(3_600.0));
    b.rules.tick_scheduled();
    let reported: Vec<_> = out(&b).iter().map(|e| (e.time, e.metric, e.ttl)).collect();
    let lives = 7_200.0 + 10.0 + 3_590.0;
    assert_eq!(
        reported,
        [(at(10.0), Some(Metric::Float(2.0)), Some(lives))],
        "once"
    );
    b.advance_to(at(3_630.0));
    let times: Vec<Micros> = out(&b).iter().map(|e| e.time).collect();
    assert_eq!(times, [at(10.0), at(3_610.0), at(3_620.0), at(3_630.0)]);
}

/// A stall is one still when a batch ran before the timer's tick at the
/// resume (the queued events of another series): the rate and the fill
/// not yet reached by that batch report none of its periods either.
#[test]
fn a_stall_seen_by_a_batch_first_is_one_for_the_tick_after() {
    let b = bench(
        r#"where service = "a" { rate(10s) { out } }
           where service = "f" { fill_in(10s, {service: "gap"}) { out } }"#,
    );
    send(&b, with_ttl(metric_ev(&b, "a", 20.0), 7_200.0));
    send(&b, with_ttl(ev(&b, "h", "f"), 7_200.0));
    b.clock.set(at(3_600.0));
    send(&b, ev(&b, "h", "other"));
    b.clock.set(at(3_600.05));
    b.rules.tick_scheduled();
    let seen: Vec<_> = (out(&b).iter())
        .map(|e| (e.service.clone().unwrap_or_default(), e.time))
        .collect();
    let expected = [("f", 0.0), ("a", 10.0)].map(|(service, secs)| (service.to_owned(), at(secs)));
    assert_eq!(seen, expected, "once, no fill");
}

/// A timer late while vigil ran its batches (a reload holding the timer,
/// a tick that ran long, a busy machine) is no stall: the series was
/// silent meanwhile, and each period gets its report, 0 where nothing came,
/// and `fill_in` its fills, none swallowed.
#[test]
fn a_late_tick_while_batches_ran_swallows_no_report_nor_fill() {
    let b = bench(
        r#"where service = "a" { rate(200ms) { out } }
           where service = "f" { fill_in(200ms, {service: "gap"}) { out } }"#,
    );
    send(&b, with_ttl(metric_ev(&b, "a", 1.0), 60.0));
    send(&b, with_ttl(ev(&b, "h", "f"), 60.0));
    b.advance_to(at(0.2));
    // The timer held from 0.2 s to 0.7 s; batches of another series ran.
    for secs in [0.3, 0.4, 0.5, 0.6] {
        b.clock.set(at(secs));
        send(&b, ev(&b, "h", "other"));
    }
    b.clock.set(at(0.7));
    b.rules.tick_scheduled();
    let seen: Vec<_> = (out(&b).iter())
        .map(|e| (e.service.clone().unwrap_or_default(), e.time))
        .collect();
    let expected = [
        ("f", 0.0),
        ("a", 0.2),
        ("gap", 0.2),
        ("a", 0.4),
        ("a", 0.6),
        ("gap", 0.4),
        ("gap", 0.6),
    ]
    .map(|(service, secs)| (service.to_owned(), at(secs)));
    assert_eq!(seen, expected);
}

/// A `dt` shorter than the timer's tick is no stall: each period that
/// ended between two ticks is reported at the next, 0 where nothing came.
#[test]
fn a_rate_shorter_than_the_tick_reports_each_period() {
    let b = bench("rate(20ms) { out }");
    send(&b, with_ttl(metric_ev(&b, "req", 1.0), 60.0));
    b.advance_to(at(0.1));
    assert_eq!(out_f64(&b), [50.0, 0.0, 0.0, 0.0, 0.0]);
}

/// An event closes the windows due when it arrives, with no timer tick
/// between (the clock set, not advanced): one arriving a microsecond before
/// the end is counted in the window, one arriving exactly at the end first
/// reports the window and then starts the next.
#[test]
fn an_event_at_a_windows_end_reports_it_before_being_counted() {
    let b = bench("rate(5s) { out }");
    send(&b, metric_ev(&b, "req", 1.0));
    b.clock.set(at(5.0) - 1);
    send(&b, metric_ev(&b, "req", 2.0));
    assert!(out(&b).is_empty(), "the window is still open");
    b.clock.set(at(5.0));
    send(&b, metric_ev(&b, "req", 4.0));
    assert_eq!(out_f64(&b), [0.6], "1 + 2 over 5 s, reported on the event");
    assert_eq!(out(&b)[0].time, at(5.0));
    b.advance_to(at(10.0));
    assert_eq!(out_f64(&b), [0.6, 0.8], "the 4 in the next window");
}

// ---- where / split -----------------------------------------------------------

#[test]
fn where_sends_matches_to_its_body_and_the_rest_to_else() {
    let b = bench(
        r#"where service = "a" { with(description: "then") { out } } else { with(description: "else") { out } }"#,
    );
    send(&b, ev(&b, "h", "a"));
    send(&b, ev(&b, "h", "b"));
    send(&b, ev(&b, "h", "a"));
    assert_eq!(
        out_descriptions(&b),
        vec![
            ("a".into(), Some("then".into())),
            ("b".into(), Some("else".into())),
            ("a".into(), Some("then".into())),
        ]
    );
}

#[test]
fn split_first_matching_clause_wins_with_default() {
    let b = bench(
        r#"split {
             when metric <= 5 { with(state: "ok") { out } }
             when metric <= 60 { with(state: "warning") { out } }
             when metric > 60 { with(state: "critical") { out } }
             else { with(state: "unknown") { out } }
           }"#,
    );
    for m in [0.5, 5.0, 5.5, 60.0, 60.5, 1000.0] {
        send(&b, metric_ev(&b, "clock offset", m));
    }
    send(&b, ev(&b, "h", "clock offset")); // no metric: no clause matches
    let states: Vec<_> = out_states(&b).into_iter().map(Option::unwrap).collect();
    assert_eq!(
        states,
        [
            "ok", "ok", "warning", "warning", "critical", "critical", "unknown"
        ]
    );
}

// ---- with / default ----------------------------------------------------------

#[test]
fn with_sets_removes_and_replaces_fields() {
    let b = bench(
        r#"with(state: "critical", description: null, tags: ["a", "b"], team: "ops", metric: 7, ttl: 30, old: null) { out }"#,
    );
    let mut e = with_state(metric_ev(&b, "disk", 1.5), "ok");
    e.description = Some("was here".into());
    e.tags = vec!["x".into()];
    e.attributes = vec![("old".into(), "1".into()), ("keep".into(), "2".into())];
    send(&b, e);
    let seen = out(&b);
    assert_eq!(seen.len(), 1);
    let e = &seen[0];
    assert_eq!(e.state.as_deref(), Some("critical"));
    assert_eq!(e.description, None);
    assert_eq!(e.tags, vec!["a".to_owned(), "b".to_owned()]);
    assert_eq!(e.attribute("team"), Some("ops"));
    assert_eq!(e.attribute("old"), None);
    assert_eq!(e.attribute("keep"), Some("2"));
    assert_eq!(e.metric, Some(Metric::Int(7)));
    assert_eq!(e.ttl, Some(30.0));
    assert_eq!(e.host.as_deref(), Some("h"));
    assert_eq!(e.service.as_deref(), Some("disk"));
}

#[test]
fn default_fills_only_missing_fields() {
    let b = bench(r#"default(state: "ok", ttl: 60, metric: 1, tags: ["d"], team: "ops") { out }"#);
    let mut full = with_ttl(with_state(metric_ev(&b, "full", 5.0), "critical"), 10.0);
    full.tags = vec!["t".into()];
    full.set_attribute("team", "dev".into());
    send(&b, full);
    send(&b, ev(&b, "h", "empty"));
    let seen = out(&b);
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].state.as_deref(), Some("critical"));
    assert_eq!(seen[0].ttl, Some(10.0));
    assert_eq!(seen[0].metric, Some(Metric::Int(5)));
    assert_eq!(seen[0].tags, vec!["t".to_owned()]);
    assert_eq!(seen[0].attribute("team"), Some("dev"));
    assert_eq!(seen[1].state.as_deref(), Some("ok"));
    assert_eq!(seen[1].ttl, Some(60.0));
    assert_eq!(seen[1].metric, Some(Metric::Int(1)));
    assert_eq!(seen[1].tags, vec!["d".to_owned()]);
    assert_eq!(seen[1].attribute("team"), Some("ops"));
}

// ---- by ----------------------------------------------------------------------

#[test]
fn by_keeps_independent_state_per_key() {
    let b = bench("by(host) { fixed_event_window(2) { count { out } } }");
    send(&b, ev(&b, "a", "s"));
    send(&b, ev(&b, "b", "s"));
    assert!(out(&b).is_empty(), "one event per host: no window is full");
    send(&b, ev(&b, "a", "s"));
    send(&b, ev(&b, "b", "s"));
    let seen: Vec<_> = out(&b)
        .iter()
        .map(|e| (e.host_str().to_owned(), e.metric))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("a".into(), Some(Metric::Int(2))),
            ("b".into(), Some(Metric::Int(2)))
        ]
    );
}

#[test]
fn by_two_fields_groups_on_both() {
    let b = bench("by(host, service) { fixed_event_window(2) { count { out } } }");
    send(&b, ev(&b, "a", "x"));
    send(&b, ev(&b, "a", "y"));
    send(&b, ev(&b, "b", "x"));
    send(&b, ev(&b, "a", "x"));
    send(&b, ev(&b, "a", "y"));
    let seen: Vec<_> = out(&b)
        .iter()
        .map(|e| {
            (
                e.host_str().to_owned(),
                e.service_str().to_owned(),
                e.metric,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("a".into(), "x".into(), Some(Metric::Int(2))),
            ("a".into(), "y".into(), Some(Metric::Int(2))),
        ]
    );
}

#[test]
fn every_timer_inside_by_fires_on_time_in_each_group() {
    // A `by` ticks only the groups whose stages said they have something due.
    let b = bench(
        r#"by(host) {
  stable(2s) { with(service: "stable") { out } }
  fixed_time_window(3s) { count { with(service: "window") { out } } }
  coalesce(4s) { count { with(service: "coalesce") { out } } }
  rate(5s) { with(service: "rate") { out } }
  percentiles(6s, [0.5]) { with(service: "percentiles") { out } }
  by(service) { rate(7s) { with(service: "nested rate") { out } } }
}"#,
    );
    let event =
        |b: &Bench, host: &str| with_ttl(with_metric(ev(b, host, "s"), Metric::Int(1)), 60.0);
    send(&b, event(&b, "a"));
    b.advance_to(at(0.5));
    send(&b, event(&b, "b"));
    // (seconds, service, host) of each output, when it first reached `out`.
    let mut fired = Vec::new();
    for tenth in 6..=76 {
        let seen = out(&b).len();
        b.advance_to(at(f64::from(tenth) / 10.0));
        for e in &out(&b)[seen..] {
            fired.push((tenth, e.service_str().to_owned(), e.host_str().to_owned()));
        }
    }
    let expected: Vec<_> = [
        (20, "stable", "a"),
        (25, "stable", "b"),
        (30, "window", "a"),
        (35, "window", "b"),
        (40, "coalesce", "a"),
        (45, "coalesce", "b"),
        (50, "rate", "a"),
        (55, "rate", "b"),
        (60, "percentiles", "a"),
        (65, "percentiles", "b"),
        (70, "nested rate", "a"),
        (75, "nested rate", "b"),
    ]
    .into_iter()
    .map(|(t, s, h)| (t, s.to_owned(), h.to_owned()))
    .collect();
    assert_eq!(fired, expected);
}

#[test]
fn every_timer_asks_for_the_tick_it_fires_on() {
    // Virtual time skips to the earliest tick a stage asked for, so a tick
    // that emits must have been asked for by the tick before it.
    let b = bench(
        r#"stable(2s) { with(service: "stable") { out } }
fixed_time_window(3s) { count { with(service: "window") { out } } }
coalesce(4s) { count { with(service: "coalesce") { out } } }
rate(5s) { with(service: "rate") { out } }
percentiles(6s, [0.5]) { with(service: "percentiles") { out } }
by(host) { rate(7s) { with(service: "rate by host") { out } } }
moving_time_window(1s) { count { with(service: "moving") { out } } }"#,
    );
    for host in ["a", "b"] {
        send(
            &b,
            with_ttl(with_metric(ev(&b, host, "s"), Metric::Int(1)), 60.0),
        );
    }
    let mut asked = Micros::MIN;
    let mut fired = Vec::new();
    for tenth in 1..=80 {
        let now = at(f64::from(tenth) / 10.0);
        b.clock.set(now);
        let seen = out(&b).len();
        let next = b.rules.tick_scheduled().unwrap_or(Micros::MAX);
        for e in &out(&b)[seen..] {
            let service = e.service_str().to_owned();
            assert!(asked <= now, "{service} fired at {tenth} tenths unasked");
            fired.push((tenth, service));
        }
        asked = next;
    }
    let services: Vec<(i32, &str)> = fired.iter().map(|(t, s)| (*t, s.as_str())).collect();
    assert_eq!(
        services,
        [
            (20, "stable"),
            (20, "stable"),
            (30, "window"),
            (40, "coalesce"),
            (50, "rate"),
            (60, "percentiles"),
            (70, "rate by host"),
            (70, "rate by host"),
            (80, "coalesce"),
        ]
    );
}

#[test]
fn advance_runs_only_the_steps_with_something_due() {
    let b = bench(
        r#"index
where state = "expired" { with(service: "expired") { out } }
rate(5s) { with(service: "rate") { out } }"#,
    );
    send(
        &b,
        with_ttl(with_metric(ev(&b, "a", "s"), Metric::Int(10)), 12.0),
    );
    let steps = b.advance_to(at(365.0 * 86_400.0));
    let fired: Vec<(String, Micros)> = out(&b)
        .iter()
        .map(|e| (e.service_str().to_owned(), e.time - TEST_EPOCH))
        .collect();
    let secs = |s: f64| secs_to_micros(s);
    assert_eq!(
        fired,
        [
            ("rate".to_owned(), secs(5.0)),
            ("rate".to_owned(), secs(10.0)),
            // Not at 15 s: the series expired in that window and sent nothing.
            ("expired".to_owned(), secs(12.1)),
        ]
    );
    // The first step, one per output, and the last.
    assert_eq!(steps, 6, "a year of 100 ms steps is 315 360 000");
}

#[test]
fn a_timer_in_a_nested_by_reaches_the_outer_by() {
    let b = bench("by(host) { by(service) { rate(3s) { out } } }");
    send(
        &b,
        with_ttl(with_metric(ev(&b, "a", "s"), Metric::Int(6)), 60.0),
    );
    b.advance_to(at(2.9));
    assert!(out(&b).is_empty());
    b.advance_to(at(3.0));
    assert_eq!(out_f64(&b), vec![2.0], "6 over 3 s, on time");
}

#[test]
fn by_frees_idle_groups_after_their_ttl() {
    // A fresh group has no memory of the previous state, so `changed` passes again.
    let b = bench("by(host) { changed(state) { out } }");
    let ok = |b: &Bench, host: &str| with_ttl(with_state(ev(b, host, "s"), "ok"), 10.0);
    send(&b, ok(&b, "a")); // passes: first
    b.advance_to(at(1.0));
    send(&b, ok(&b, "a")); // same state: group alive until 11 s
    send(&b, ok(&b, "b")); // another group: passes
    b.advance_to(at(10.5));
    send(&b, ok(&b, "a")); // still alive (and now until 20.5 s)
    b.advance_to(at(21.0));
    send(&b, ok(&b, "a")); // group was freed: passes again
    let seen: Vec<_> = out(&b)
        .iter()
        .map(|e| (e.host_str().to_owned(), e.time))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("a".into(), at(0.0)),
            ("b".into(), at(1.0)),
            ("a".into(), at(21.0))
        ]
    );
}

/// A flood of distinct keys makes no more groups than `--max-index` allows
/// entries: events of new keys pass the `by` by (counted), those of keys
/// it holds run as ever, and a freed group makes room.
#[test]
fn by_holds_at_most_max_index_groups() {
    let src = "output out = forward(host: \"x\")\nstreams {\n by(host) { out }\n}";
    let file = parse(src).unwrap();
    let config = crate::index::IndexConfig {
        max_entries: Some(3),
        ..crate::index::IndexConfig::default()
    };
    let b = Bench::with_index(&file, config).unwrap();
    let at_ttl = |b: &Bench, host: &str| with_ttl(ev(b, host, "s"), 10.0);
    for host in ["h0", "h1", "h2", "h3", "h4", "h0"] {
        send(&b, at_ttl(&b, host));
    }
    let hosts =
        |b: &Bench| -> Vec<String> { out(b).iter().map(|e| e.host_str().to_owned()).collect() };
    assert_eq!(hosts(&b), ["h0", "h1", "h2", "h0"]);
    assert_eq!(b.rules.stats.by_refused.load(Ordering::Relaxed), 2);
    b.advance_to(at(11.0));
    send(&b, at_ttl(&b, "h9"));
    assert_eq!(
        hosts(&b).last().map(String::as_str),
        Some("h9"),
        "room again"
    );
}

#[test]
fn by_frees_a_group_and_its_window_state() {
    let b = bench("by(host) { fixed_event_window(2) { count { out } } }");
    send(&b, with_ttl(ev(&b, "a", "s"), 5.0));
    b.advance_to(at(6.0)); // freed at 5.1 s, half-full window with it
    send(&b, with_ttl(ev(&b, "a", "s"), 5.0));
    assert!(out(&b).is_empty(), "the window restarted in a fresh group");
    send(&b, with_ttl(ev(&b, "a", "s"), 5.0));
    assert_eq!(out_metrics(&b), vec![Some(Metric::Int(2))]);
}

#[test]
fn by_keeps_a_group_alive_for_its_longest_window() {
    // TTL 1 s, but the group must live until its 10 s window has closed.
    let b = bench("by(host) { fixed_time_window(10s) { count { out } } }");
    send(&b, with_ttl(ev(&b, "a", "s"), 1.0));
    b.advance_to(at(20.0));
    assert_eq!(out_metrics(&b), vec![Some(Metric::Int(1))]);
}

#[test]
fn by_closes_a_due_window_before_freeing_its_group() {
    // The server's timer ticks independently of arrivals: a tick just after the
    // group's free time is also the first after its window's end. The window
    // must be emitted, not freed with the group.
    let b = bench("by(host) { fixed_time_window(10s) { count { out } } }");
    send(&b, with_ttl(ev(&b, "a", "s"), 1.0));
    b.clock.set(at(9.95));
    b.rules.tick();
    assert!(out(&b).is_empty());
    b.clock.set(at(10.05));
    b.rules.tick();
    assert_eq!(out_metrics(&b), vec![Some(Metric::Int(1))]);
    // ...and the group is gone afterwards: a new event starts a new window.
    b.clock.set(at(10.15));
    b.rules.tick();
    send(&b, with_ttl(ev(&b, "a", "s"), 1.0));
    b.advance_to(at(20.1));
    assert_eq!(
        out(&b).len(),
        1,
        "the window started at 10.15 s has not closed yet"
    );
    b.advance_to(at(20.2));
    assert_eq!(
        out_metrics(&b),
        vec![Some(Metric::Int(1)), Some(Metric::Int(1))]
    );
}

#[test]
fn a_virtual_clock_frees_a_group_when_the_servers_timer_would() {
    // The group lives the TTL its `by` sees (5 s); the rate inside goes by
    // the 300 s it is given. The server's timer frees the group on its first
    // tick after 5 s, so the rate's 6 s report never comes: `vigil test`
    // must not make it either.
    let b = bench("by(host) { with(ttl: 300) { rate(2s) { out } } }");
    send(
        &b,
        with_ttl(with_metric(ev(&b, "a", "s"), Metric::Int(10)), 5.0),
    );
    b.advance_to(at(20.0));
    let times: Vec<Micros> = out(&b).iter().map(|e| e.time).collect();
    assert_eq!(times, vec![at(2.0), at(4.0)]);
}

#[test]
fn a_nan_ttl_is_the_default_ttl_for_the_stages_as_for_the_index() {
    let b = bench(
        r#"where service = "c" { changed_state { out } }
        where service = "r" { rate(10s) { out } }"#,
    );
    let nan = |b: &Bench, service: &str| {
        let mut e = with_state(ev(b, "h", service), "critical");
        e.ttl = Some(f32::NAN);
        e.metric = Some(Metric::Int(10));
        e
    };
    send(&b, nan(&b, "c"));
    send(&b, nan(&b, "r"));
    b.advance_to(at(30.0));
    send(&b, nan(&b, "c"));
    let seen: Vec<(String, f64)> = out(&b)
        .iter()
        .map(|e| (e.service_str().to_owned(), e.metric.unwrap().as_f64()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("c".to_owned(), 10.0),
            ("r".to_owned(), 1.0),
            ("r".to_owned(), 0.0),
            ("r".to_owned(), 0.0),
        ],
        "the same state 30 s later is no transition, and the rate reports \
         0 while the series lives its default 60 s"
    );
}

// ---- changed -----------------------------------------------------------------

#[test]
fn changed_passes_only_transitions() {
    let b = bench("changed(state) { out }");
    send(&b, ev(&b, "h", "s")); // no state: like Riemann's nil init, not a change
    for state in ["ok", "ok", "critical", "critical", "ok"] {
        send(&b, with_state(ev(&b, "h", "s"), state));
    }
    send(&b, ev(&b, "h", "s")); // state removed: a change
    assert_eq!(
        out_states(&b),
        vec![
            Some("ok".into()),
            Some("critical".into()),
            Some("ok".into()),
            None
        ]
    );
}

/// Metrics are compared as numbers, as queries compare them: an integer
/// and a float of the same value (two clients, `metric_sint64` and
/// `metric_d`) and -0.0 and 0.0 are no change; a NaN after a NaN is none
/// either. `runs` counts them as one value alike.
#[test]
fn changed_and_runs_compare_metrics_as_numbers() {
    let metrics = [
        Metric::Int(0),
        Metric::Float(-0.0),
        Metric::Float(0.0),
        Metric::Int(1),
        Metric::Float(1.0),
        Metric::Float(f64::NAN),
        Metric::Float(f64::NAN),
        Metric::Int(2),
    ];
    let passed = |streams: &str| {
        let b = bench(streams);
        for (i, m) in metrics.iter().enumerate() {
            send(&b, with_metric(ev(&b, "h", &i.to_string()), *m));
        }
        out(&b)
            .iter()
            .map(|e| e.service_str().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(passed("changed(metric) { out }"), ["0", "3", "5", "7"]);
    assert_eq!(passed("runs(2, metric) { out }"), ["1", "2", "4", "6"]);
}

#[test]
fn changed_state_is_per_host_and_service() {
    let b = bench("changed_state { out }");
    let e =
        |b: &Bench, host: &str, service: &str, state: &str| with_state(ev(b, host, service), state);
    send(&b, e(&b, "a", "s", "ok")); // first of a/s
    send(&b, e(&b, "b", "s", "ok")); // first of b/s
    send(&b, e(&b, "a", "s", "ok"));
    send(&b, e(&b, "b", "s", "critical")); // b/s changed
    send(&b, e(&b, "a", "t", "ok")); // first of a/t
    send(&b, e(&b, "a", "s", "critical")); // a/s changed
    send(&b, e(&b, "a", "t", "ok"));
    let seen: Vec<_> = out(&b)
        .iter()
        .map(|e| {
            format!(
                "{}/{}={}",
                e.host_str(),
                e.service_str(),
                e.state.as_deref().unwrap()
            )
        })
        .collect();
    assert_eq!(
        seen,
        ["a/s=ok", "b/s=ok", "b/s=critical", "a/t=ok", "a/s=critical"]
    );
}

// ---- counter -------------------------------------------------------------------

fn tagged(mut e: Event, tag: &str) -> Event {
    e.tags.push(tag.to_owned());
    e
}

#[test]
fn counter_sums_metrics_exactly_and_a_reset_sets_it() {
    let b = bench("counter { out }");
    const BIG: i64 = (1 << 53) + 1;
    send(&b, int_ev(&b, BIG));
    send(&b, int_ev(&b, 2));
    send(&b, ev(&b, "h", "s")); // no metric: passes as it came
    send(&b, tagged(int_ev(&b, 10), "reset"));
    send(&b, with_metric(ev(&b, "h", "s"), Metric::Float(0.5)));
    send(&b, int_ev(&b, 1));
    assert_eq!(
        out_metrics(&b),
        vec![
            Some(Metric::Int(BIG)),
            Some(Metric::Int(BIG + 2)),
            None,
            Some(Metric::Int(10)),
            Some(Metric::Float(10.5)),
            Some(Metric::Float(11.5)),
        ]
    );
    let tags: Vec<_> = out(&b).into_iter().map(|e| e.tags).collect();
    assert_eq!(tags[3], vec!["reset".to_owned()], "the reset passes on");
}

#[test]
fn counter_starts_at_its_initial_value_and_counts_per_by_group() {
    let b = bench("by(host) { counter(500) { out } }");
    for host in ["a", "b", "a"] {
        send(&b, with_metric(ev(&b, host, "s"), Metric::Int(1)));
    }
    let seen: Vec<_> = out(&b)
        .iter()
        .map(|e| (e.host_str().to_owned(), e.metric))
        .collect();
    assert_eq!(
        seen,
        [
            ("a".to_owned(), Some(Metric::Int(501))),
            ("b".to_owned(), Some(Metric::Int(501))),
            ("a".to_owned(), Some(Metric::Int(502))),
        ]
    );
}

/// As Riemann's `+`: a NaN metric makes the count NaN, until a reset. An
/// `expired` notice carries no metric and passes as it came.
#[test]
fn counter_is_nan_after_a_nan_until_a_reset_and_passes_expired_notices() {
    let b = bench("counter { out }");
    send(&b, int_ev(&b, 1));
    send(&b, with_metric(ev(&b, "h", "s"), Metric::Float(f64::NAN)));
    send(&b, int_ev(&b, 1));
    send(&b, with_state(ev(&b, "h", "s"), "expired"));
    send(&b, tagged(int_ev(&b, 0), "reset"));
    send(&b, int_ev(&b, 1));
    let metrics = out_metrics(&b);
    assert_eq!(metrics[0], Some(Metric::Int(1)));
    assert!(matches!(metrics[1], Some(Metric::Float(m)) if m.is_nan()));
    assert!(matches!(metrics[2], Some(Metric::Float(m)) if m.is_nan()));
    assert_eq!(
        metrics[3..],
        [None, Some(Metric::Int(0)), Some(Metric::Int(1))]
    );
    assert_eq!(out_states(&b)[3].as_deref(), Some("expired"));
}

/// A `by` frees a group idle past its events' TTL (Riemann keeps every
/// group for ever): the count of a series that went silent starts again.
#[test]
fn a_counter_in_a_freed_by_group_starts_again() {
    let b = bench("by(host) { counter(100) { out } }");
    let one = |b: &Bench| with_ttl(with_metric(ev(b, "a", "s"), Metric::Int(1)), 10.0);
    send(&b, one(&b));
    b.advance_to(at(5.0));
    send(&b, one(&b)); // alive until 15 s
    b.advance_to(at(16.0));
    send(&b, one(&b));
    assert_eq!(
        out_metrics(&b),
        vec![
            Some(Metric::Int(101)),
            Some(Metric::Int(102)),
            Some(Metric::Int(101))
        ]
    );
}

// ---- runs ----------------------------------------------------------------------

#[test]
fn runs_passes_once_the_last_n_events_agree_and_while_they_go_on() {
    let b = bench("runs(3, state) { out }");
    for (i, state) in [
        "critical", "critical", "ok", "critical", "critical", "critical", "critical", "ok",
    ]
    .iter()
    .enumerate()
    {
        let mut e = with_state(ev(&b, "h", "s"), state);
        e.metric = Some(Metric::Int(i as i64));
        send(&b, e);
    }
    assert_eq!(
        out_metrics(&b),
        vec![Some(Metric::Int(5)), Some(Metric::Int(6))],
        "the third critical in a row and the fourth"
    );
}

/// Events without the field agree with one another, as Riemann's nils do;
/// an `expired` notice breaks a run of another state. A run of one passes
/// every event.
#[test]
fn runs_of_a_missing_field_count_and_an_expiry_breaks_a_run() {
    let b = bench("runs(2, state) { out }");
    send(&b, ev(&b, "h", "1"));
    send(&b, ev(&b, "h", "2"));
    send(&b, with_state(ev(&b, "h", "3"), "critical"));
    send(&b, with_state(ev(&b, "h", "4"), "expired"));
    send(&b, with_state(ev(&b, "h", "5"), "critical"));
    send(&b, with_state(ev(&b, "h", "6"), "critical"));
    let services: Vec<_> = out(&b).iter().map(|e| e.service_str().to_owned()).collect();
    assert_eq!(services, ["2", "6"]);

    let b = bench("runs(1) { out }");
    for state in ["ok", "critical", "ok"] {
        send(&b, with_state(ev(&b, "h", "s"), state));
    }
    assert_eq!(out(&b).len(), 3);
}

#[test]
fn runs_are_per_by_group() {
    let b = bench("by(host) { runs(2, state) { out } }");
    for host in ["a", "b", "a", "b", "b"] {
        send(&b, with_state(ev(&b, host, "s"), "critical"));
    }
    let hosts: Vec<_> = out(&b).iter().map(|e| e.host_str().to_owned()).collect();
    assert_eq!(hosts, ["a", "b", "b"]);
}

// ---- throttle ----------------------------------------------------------------

#[test]
fn throttle_passes_n_per_window() {
    let b = bench("throttle(2, 10s) { out }");
    for t in [0.0, 1.0, 2.0, 9.9, 10.0, 11.0, 12.0, 19.9, 20.0] {
        b.advance_to(at(t));
        send(&b, metric_ev(&b, "s", t));
    }
    assert_eq!(out_f64(&b), vec![0.0, 1.0, 10.0, 11.0, 20.0]);
}

// ---- filters and edits -------------------------------------------------------

#[test]
fn expired_and_not_expired_split_on_state() {
    let b = bench(
        r#"expired { with(description: "E") { out } }
           not_expired { with(description: "N") { out } }"#,
    );
    send(&b, with_state(ev(&b, "h", "a"), "expired"));
    send(&b, with_state(ev(&b, "h", "b"), "ok"));
    send(&b, ev(&b, "h", "c"));
    assert_eq!(
        out_descriptions(&b),
        vec![
            ("a".into(), Some("E".into())),
            ("b".into(), Some("N".into())),
            ("c".into(), Some("N".into())),
        ]
    );
}

#[test]
fn over_is_strict_and_needs_a_metric() {
    let b = bench("over(5) { out }");
    for m in [4.0, 5.0, 5.5, 6.0] {
        send(&b, metric_ev(&b, "s", m));
    }
    send(&b, ev(&b, "h", "s"));
    assert_eq!(out_f64(&b), vec![5.5, 6.0]);
}

#[test]
fn under_is_strict_and_needs_a_metric() {
    let b = bench("under(5) { out }");
    for m in [-1.0, 4.5, 5.0, 6.0] {
        send(&b, metric_ev(&b, "s", m));
    }
    send(&b, ev(&b, "h", "s"));
    assert_eq!(out_f64(&b), vec![-1.0, 4.5]);
}

#[test]
fn within_is_inclusive() {
    let b = bench("within(1, 3) { out }");
    for m in [0.9, 1.0, 2.0, 3.0, 3.1] {
        send(&b, metric_ev(&b, "s", m));
    }
    send(&b, ev(&b, "h", "s"));
    assert_eq!(out_f64(&b), vec![1.0, 2.0, 3.0]);
}

#[test]
fn scale_keeps_integers_integral_and_floats_float() {
    let b = bench("scale(2) { out }");
    send(&b, int_ev(&b, 3));
    send(&b, with_metric(ev(&b, "h", "s"), Metric::Float(1.5)));
    send(&b, int_ev(&b, i64::MAX));
    send(&b, ev(&b, "h", "s"));
    assert_eq!(
        out_metrics(&b),
        vec![
            Some(Metric::Int(6)),
            Some(Metric::Float(3.0)),
            Some(Metric::Float(i64::MAX as f64 * 2.0)),
            None,
        ]
    );

    let b = bench("scale(0.5) { out }");
    send(&b, int_ev(&b, 3));
    assert_eq!(out_metrics(&b), vec![Some(Metric::Float(1.5))]);
}

#[test]
fn tag_adds_missing_tags_once() {
    let b = bench(r#"tag("x") { out }"#);
    let mut tagged = ev(&b, "h", "s");
    tagged.tags = vec!["y".into()];
    send(&b, tagged.clone());
    tagged.tags = vec!["x".into()];
    send(&b, tagged);
    let tags: Vec<_> = out(&b).into_iter().map(|e| e.tags).collect();
    assert_eq!(
        tags,
        vec![vec!["y".to_owned(), "x".to_owned()], vec!["x".to_owned()]]
    );

    let b = bench(r#"tag(["a", "b"]) { out }"#);
    send(&b, ev(&b, "h", "s"));
    assert_eq!(out(&b)[0].tags, vec!["a".to_owned(), "b".to_owned()]);
}

#[test]
fn untag_removes_every_copy_of_each_tag_and_keeps_the_rest() {
    let b = bench(r#"untag(["x", "y"]) { out }"#);
    let mut tagged = ev(&b, "h", "s");
    tagged.tags = vec!["x".into(), "keep".into(), "x".into(), "y".into()];
    send(&b, tagged);
    let mut untouched = ev(&b, "h", "s");
    untouched.tags = vec!["keep".into()];
    send(&b, untouched);
    send(&b, ev(&b, "h", "s"));
    let tags: Vec<_> = out(&b).into_iter().map(|e| e.tags).collect();
    assert_eq!(
        tags,
        vec![vec!["keep".to_owned()], vec!["keep".to_owned()], vec![]]
    );

    let b = bench(r#"untag("x") { out }"#);
    let mut tagged = ev(&b, "h", "s");
    tagged.tags = vec!["x".into(), "y".into()];
    send(&b, tagged);
    assert_eq!(out(&b)[0].tags, vec!["y".to_owned()]);
}

/// The services of what `out` received, in order.
fn out_services(b: &Bench) -> Vec<String> {
    out(b).iter().map(|e| e.service_str().to_owned()).collect()
}

/// An event of service `s` carrying `tags`.
fn tagged_ev(b: &Bench, s: &str, tags: &[&str]) -> Event {
    let mut e = ev(b, "h", s);
    e.tags = tags.iter().map(|t| (*t).to_owned()).collect();
    e
}

/// As Riemann's: `tagged` is `tagged-all`, every tag present; `tagged_any`
/// passes an event with any of them; `else` takes the rest.
#[test]
fn tagged_passes_events_with_every_tag_and_tagged_any_with_one() {
    let streams = r#"tagged("a", "b") { out }
        tagged_all(["a", "b"]) { out }
        tagged_any(["a"], "b") { where host = "none" { out } } else { out }
        tagged("a") { drop } else { out }"#;
    let b = bench(streams);
    send(&b, tagged_ev(&b, "ab", &["b", "x", "a"]));
    send(&b, tagged_ev(&b, "a", &["a"]));
    send(&b, tagged_ev(&b, "b", &["b"]));
    send(&b, tagged_ev(&b, "none", &[]));
    send(&b, tagged_ev(&b, "prefix", &["ab"]));
    assert_eq!(
        out_services(&b),
        ["ab", "ab", "b", "none", "none", "prefix", "prefix"]
    );
}

/// The tags may be given as the keyword `tags`, as `tag` and `untag` take
/// theirs: the same test as given by position.
#[test]
fn tagged_takes_its_tags_by_keyword_as_tag_does() {
    let streams = r#"tagged(tags: ["a", "b"]) { out }
        tagged_any(tags: "b") { out }
        tagged_all(tags: ["x"]) { drop } else { out }"#;
    let b = bench(streams);
    send(&b, tagged_ev(&b, "ab", &["b", "a"]));
    send(&b, tagged_ev(&b, "a", &["a"]));
    send(&b, tagged_ev(&b, "x", &["x"]));
    assert_eq!(out_services(&b), ["ab", "ab", "ab", "a"]);
}

/// `tagged(…)` is the stage `where tagged … { }` compiles to: a reload
/// from one to the other keeps the state below it, as of an unchanged
/// `where`.
#[test]
fn tagged_is_the_where_it_stands_for_so_a_reload_keeps_the_state_below() {
    let b = bench(r#"where tagged "a" and tagged "b" { counter { out } }"#);
    send(
        &b,
        with_metric(tagged_ev(&b, "s", &["a", "b"]), Metric::Int(2)),
    );
    reload_to(&b, r#"tagged("a", "b") { counter { out } }"#);
    send(
        &b,
        with_metric(tagged_ev(&b, "s", &["a", "b"]), Metric::Int(3)),
    );
    reload_to(&b, r#"tagged_any("a", "b") { counter { out } }"#);
    send(
        &b,
        with_metric(tagged_ev(&b, "s", &["a", "b"]), Metric::Int(4)),
    );
    reload_to(&b, r#"where tagged "a" or tagged "b" { counter { out } }"#);
    send(
        &b,
        with_metric(tagged_ev(&b, "s", &["a", "b"]), Metric::Int(5)),
    );
    let kept = [2, 5, 4, 9].map(|m| Some(Metric::Int(m)));
    assert_eq!(out_metrics(&b), kept, "the `and` kept, the `or` anew, kept");
}

#[test]
fn drop_ends_the_event() {
    let b = bench(r#"where service = "a" { drop } else { out }"#);
    send(&b, ev(&b, "h", "a"));
    send(&b, ev(&b, "h", "b"));
    let services: Vec<_> = out(&b).iter().map(|e| e.service_str().to_owned()).collect();
    assert_eq!(services, ["b"]);
}

#[test]
fn reinject_goes_back_to_the_top() {
    let b = bench(
        r#"where service = "a" { with(service: "b") { reinject } }
           where service = "b" { out }"#,
    );
    send(&b, with_metric(ev(&b, "h", "a"), Metric::Int(1)));
    send(&b, with_metric(ev(&b, "h", "b"), Metric::Int(2)));
    let seen: Vec<_> = out(&b)
        .iter()
        .map(|e| (e.service_str().to_owned(), e.metric))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("b".into(), Some(Metric::Int(1))),
            ("b".into(), Some(Metric::Int(2)))
        ]
    );
    assert_eq!(b.rules.stats.reinject_overflow.load(Ordering::Relaxed), 0);
}

#[test]
fn a_reinject_loop_terminates_and_is_counted() {
    let b = bench("out\nreinject");
    send(&b, ev(&b, "h", "loop"));
    // Once on arrival, then once per allowed round; what is left is dropped.
    assert_eq!(out(&b).len(), 1 + MAX_REINJECT_ROUNDS);
    assert_eq!(b.rules.stats.reinject_overflow.load(Ordering::Relaxed), 1);
    send(&b, ev(&b, "h", "loop"));
    assert_eq!(b.rules.stats.reinject_overflow.load(Ordering::Relaxed), 2);
}

#[test]
fn a_reinject_that_doubles_events_stops_at_the_budget() {
    // Each event reinjected twice: 2, 4, 8, … events a round, 131 070 in 16
    // rounds without a budget. The budget is 16 × the first round's 2.
    let b = bench("out\nreinject\nreinject");
    send(&b, ev(&b, "h", "fan"));
    assert_eq!(out(&b).len(), 1 + 32, "the event, then 2 + 4 + 8 + 16 + 2");
    let dropped = b.rules.stats.reinject_overflow.load(Ordering::Relaxed);
    assert_eq!(
        dropped,
        30 + 4,
        "the rest of the fifth round, and what the run part made"
    );
}

#[test]
fn a_chain_of_reinjects_over_a_batch_runs_every_round() {
    // Each event renamed and reinjected once a round: the budget never bites.
    let b = bench(
        r#"where service =~ "%" and not service = "s16" { out }
split {
  when service = "s0" { with(service: "s1") { reinject } }
  when service = "s1" { with(service: "s2") { reinject } }
  when service = "s2" { with(service: "s3") { reinject } }
  when service = "s3" { with(service: "s4") { reinject } }
  when service = "s4" { with(service: "s5") { reinject } }
  when service = "s5" { with(service: "s6") { reinject } }
  when service = "s6" { with(service: "s7") { reinject } }
  when service = "s7" { with(service: "s8") { reinject } }
  when service = "s8" { with(service: "s9") { reinject } }
  when service = "s9" { with(service: "s10") { reinject } }
  when service = "s10" { with(service: "s11") { reinject } }
  when service = "s11" { with(service: "s12") { reinject } }
  when service = "s12" { with(service: "s13") { reinject } }
  when service = "s13" { with(service: "s14") { reinject } }
  when service = "s14" { with(service: "s15") { reinject } }
  when service = "s15" { with(service: "s16") { reinject } }
}"#,
    );
    let batch: Vec<Event> = (0..10).map(|i| ev(&b, &format!("h{i}"), "s0")).collect();
    b.rules.process(&batch);
    assert_eq!(out(&b).len(), 10 * 16, "s0 … s15 of each event");
    assert_eq!(b.rules.stats.reinject_overflow.load(Ordering::Relaxed), 0);
}

// ---- windows -----------------------------------------------------------------

#[test]
fn fixed_time_window_is_closed_by_the_timer() {
    let b = bench("fixed_time_window(10s) { sum { out } }");
    for (t, m) in [(0.0, 1.0), (3.0, 2.0), (9.9, 3.0)] {
        b.advance_to(at(t));
        send(&b, metric_ev(&b, "s", m));
    }
    b.advance_to(at(9.95));
    assert!(out(&b).is_empty());
    b.advance_to(at(10.0)); // no event comes: the tick closes the window
    assert_eq!(out_metrics(&b), vec![Some(Metric::Int(6))]);

    // Idle: the next window starts with the next event.
    b.advance_to(at(12.0));
    send(&b, metric_ev(&b, "s", 5.0));
    b.advance_to(at(21.9));
    assert_eq!(out(&b).len(), 1);
    b.advance_to(at(22.0));
    assert_eq!(
        out_metrics(&b),
        vec![Some(Metric::Int(6)), Some(Metric::Int(5))]
    );
    b.advance_to(at(60.0));
    assert_eq!(out(&b).len(), 2, "no empty windows are emitted");
}

/// Riemann's `median` is the event at rank n/2 of the metrics sorted (the
/// earliest of equals), itself; its `std-dev` the population's.
#[test]
fn a_fixed_window_folds_the_median_event_and_the_standard_deviation() {
    let b = bench("fixed_time_window(10s) { median { out } std_dev { out } }");
    for (t, m) in [2, 4, 4, 4, 5, 5, 7, 9].into_iter().enumerate() {
        b.advance_to(at(t as f64));
        send(&b, metric_ev(&b, "s", m as f64));
    }
    b.advance_to(at(10.0));
    let seen = out(&b);
    assert_eq!(
        out_metrics(&b),
        [Some(Metric::Int(5)), Some(Metric::Float(2.0))]
    );
    assert_eq!(seen[0].time, at(4.0), "the first 5, itself");
    assert_eq!(seen[1].time, at(7.0), "on the latest event");
}

#[test]
fn a_moving_window_folds_the_median_of_what_it_holds_on_every_event() {
    let b = bench("moving_event_window(3) { median { out } }");
    for m in [5, 1, 3, 9, 8] {
        send(&b, int_ev(&b, m));
    }
    let medians = [5, 5, 3, 3, 8].map(|m| Some(Metric::Int(m)));
    assert_eq!(out_metrics(&b), medians);
}

/// The squares of metrics near 1e200 pass f64's range: a fixed window's
/// standard deviation (Welford's) was infinite, a moving window's (two
/// passes, past 1e150) NaN.
#[test]
fn the_standard_deviation_of_metrics_near_1e200_is_finite() {
    for rules in [
        "fixed_time_window(10s) { std_dev { out } }",
        "moving_event_window(4) { std_dev { out } }",
    ] {
        let b = bench(rules);
        for m in [1e-300, 1e200, 5.0, -1e200] {
            send(&b, with_metric(ev(&b, "h", "s"), Metric::Float(m)));
        }
        b.advance_to(at(10.0));
        let last = *out_f64(&b).last().unwrap();
        let expected = 1e200 / 2f64.sqrt();
        assert!(
            (last - expected).abs() <= 1e-12 * expected,
            "{rules}: {last}"
        );
    }
}

/// Each `by` group's window has its own median and deviations.
#[test]
fn a_by_groups_windows_fold_their_own_spread() {
    let b = bench("by(host) { moving_time_window(10s) { std_dev { out } } }");
    for (host, m) in [("a", 1.0), ("b", 100.0), ("a", 3.0), ("b", 100.0)] {
        send(&b, with_metric(ev(&b, host, "s"), float_or_int(m)));
    }
    assert_eq!(out_f64(&b), [0.0, 0.0, 1.0, 0.0]);
}

/// Riemann's `(rollup 3 1 f)` of five events: three pass at once, the
/// other two at the end of the second, when the timer ends it; that flush is
/// one of the next second's three.
#[test]
fn rollup_passes_n_at_once_and_the_rest_when_the_interval_ends() {
    let b = bench("rollup(3, 1s) { out }");
    for (t, m) in [(0.0, 1), (0.1, 2), (0.2, 3), (0.3, 4), (0.4, 5)] {
        b.advance_to(at(t));
        send(&b, int_ev(&b, m));
    }
    let metrics = |ms: &[i64]| ms.iter().map(|m| Some(Metric::Int(*m))).collect::<Vec<_>>();
    assert_eq!(out_metrics(&b), metrics(&[1, 2, 3]));
    b.advance_to(at(0.99));
    assert_eq!(out(&b).len(), 3);
    b.advance_to(at(1.0));
    assert_eq!(out_metrics(&b), metrics(&[1, 2, 3, 4, 5]));
    for (t, m) in [(1.1, 6), (1.2, 7), (1.3, 8)] {
        b.advance_to(at(t));
        send(&b, int_ev(&b, m));
    }
    assert_eq!(
        out_metrics(&b),
        metrics(&[1, 2, 3, 4, 5, 6, 7]),
        "8 is held"
    );
    b.advance_to(at(2.0));
    assert_eq!(out_metrics(&b), metrics(&[1, 2, 3, 4, 5, 6, 7, 8]));
    b.advance_to(at(10.0));
    assert_eq!(out(&b).len(), 8, "an empty flush passes nothing");
    send(&b, int_ev(&b, 9));
    assert_eq!(out(&b).len(), 9, "idle: a new second with all three");
}

/// A reload that keeps a rollup as it was keeps its held events and count.
#[test]
fn a_reload_keeps_an_unchanged_rollups_held_events() {
    let b = bench("rollup(1, 10s) { out }");
    for m in [1, 2, 3] {
        send(&b, int_ev(&b, m));
    }
    reload_to(&b, "  rollup(1, 10s) { out }\n  tag(\"new\") { drop }");
    send(&b, int_ev(&b, 4));
    assert_eq!(out(&b).len(), 1, "still one in these 10 s");
    b.advance_to(at(10.0));
    let passed = [1, 2, 3, 4].map(|m| Some(Metric::Int(m)));
    assert_eq!(out_metrics(&b), passed);
}

#[test]
fn a_full_window_lets_the_oldest_go_and_counts_each() {
    use crate::rules::nodes::WINDOW_MAX;
    let b = bench(
        r#"where service = "m" { moving_time_window(10s) { count { where metric >= 100000 { out } } } }
           where service = "f" { fixed_time_window(10s) { count { out } } }
           where service != "m" and service != "f" { coalesce(10s) { count { out } } }"#,
    );
    let batch = |service: &str| -> Vec<Event> {
        (0..WINDOW_MAX + 3)
            .map(|i| with_metric(ev(&b, "h", service), Metric::Int(i as i64)))
            .collect()
    };
    b.rules.process(&batch("m"));
    let overflow = || b.rules.stats.window_overflow.load(Ordering::Relaxed);
    assert_eq!(overflow(), 3, "the moving window let three events go");
    assert_eq!(
        out_f64(&b),
        vec![WINDOW_MAX as f64; 4],
        "it held what it could"
    );
    b.rules.process(&batch("f"));
    assert_eq!(
        overflow(),
        3,
        "a fixed window holds no events: none to let go"
    );
    let series: Vec<Event> = (0..WINDOW_MAX + 2)
        .map(|i| ev(&b, "h", &format!("s{i}")))
        .collect();
    b.rules.process(&series);
    assert_eq!(overflow(), 3 + 2, "then two series left out");
    b.advance_to(at(10.0));
    assert_eq!(
        out_f64(&b)[4..],
        [(WINDOW_MAX + 3) as f64, WINDOW_MAX as f64],
        "the fixed window counted every event, coalesce what it could hold"
    );
    assert_eq!(overflow(), 5, "closing the windows drops nothing more");
}

#[test]
fn moving_time_window_counts_the_last_interval() {
    let b = bench("moving_time_window(10s) { count { out } }");
    for t in [0.0, 5.0, 9.9, 10.0, 15.5, 30.0] {
        b.advance_to(at(t));
        send(&b, ev(&b, "h", "s"));
    }
    let counts: Vec<_> = out_f64(&b);
    // At 10 s the event of 0 s is exactly 10 s old and drops out.
    assert_eq!(counts, vec![1.0, 2.0, 3.0, 3.0, 3.0, 1.0]);
}

/// Riemann's `minimum` and `maximum` keep an event whose metric is `<=`
/// (`>=`) the one kept: of equal metrics, the latest event, in every kind
/// of window.
#[test]
fn min_and_max_of_equal_metrics_are_the_latest_event() {
    use super::FoldKind;
    use super::window::fold;
    for window in ["fixed_event_window(4)", "moving_event_window(4)"] {
        let b = bench(&format!("{window} {{ min {{ out }} max {{ out }} }}"));
        for (host, m) in [("a", 1), ("b", 1), ("c", 2), ("d", 2)] {
            send(&b, with_metric(ev(&b, host, "s"), Metric::Int(m)));
        }
        let hosts: Vec<String> = out(&b).iter().map(|e| e.host_str().to_owned()).collect();
        // The last two: the window of four, folded once it is full.
        assert_eq!(hosts[hosts.len() - 2..], ["b", "d"], "{window}: {hosts:?}");
    }
    let events = [("a", 1), ("b", 1), ("c", 2), ("d", 2)].map(|(host, m)| Event {
        host: Some(host.into()),
        metric: Some(Metric::Int(m)),
        ..Event::default()
    });
    let picked = |kind| fold(kind, events.iter()).unwrap().host_str().to_owned();
    assert_eq!(
        (picked(FoldKind::Min), picked(FoldKind::Max)),
        ("b".into(), "d".into())
    );
}

#[test]
fn fixed_event_window_means_every_n_events() {
    let b = bench("fixed_event_window(3) { mean { out } }");
    for m in [1.0, 2.0, 3.0, 4.0, 5.0] {
        send(&b, metric_ev(&b, "s", m));
    }
    // Integers, whose count divides their sum: an integer, as Riemann's.
    assert_eq!(out_metrics(&b), vec![Some(Metric::Int(2))]);
    send(&b, metric_ev(&b, "s", 9.0));
    assert_eq!(
        out_metrics(&b),
        vec![Some(Metric::Int(2)), Some(Metric::Int(6))]
    );
}

/// The reported case: Riemann adds integer metrics as integers, so a sum
/// of counters past 2^53 keeps its last digit, as `max` does.
#[test]
fn a_sum_of_integers_past_2_53_keeps_its_last_digit() {
    const BIG: i64 = (1 << 53) + 1;
    for window in ["fixed_event_window(2)", "moving_event_window(2)"] {
        let b = bench(&format!("{window} {{ sum {{ out }} max {{ out }} }}"));
        for m in [BIG, 0] {
            send(&b, int_ev(&b, m));
        }
        let last_two = out_metrics(&b).split_off(out(&b).len() - 2);
        assert_eq!(last_two, [Some(Metric::Int(BIG)); 2], "{window}");
    }
}

/// A moving window keeps the queues of only the extremes it folds: one
/// that takes over a window that folded none returns the extremes of the
/// events it took over.
#[test]
fn a_reload_adding_min_to_a_moving_window_returns_the_least_held_event() {
    let b = bench("moving_event_window(3) { mean { drop } }");
    for m in [5, 1, 3] {
        send(&b, int_ev(&b, m));
    }
    reload_to(&b, "moving_event_window(3) { mean { drop } min { out } }");
    send(&b, int_ev(&b, 4));
    assert_eq!(out_metrics(&b), vec![Some(Metric::Int(1))]);
}

#[test]
fn moving_event_window_max_returns_the_largest_event() {
    let b = bench("moving_event_window(2) { max { out } }");
    for (m, d) in [(5, "five"), (1, "one"), (3, "three"), (2, "two")] {
        let mut e = int_ev(&b, m);
        e.description = Some(d.into());
        send(&b, e);
    }
    let seen: Vec<_> = out(&b)
        .iter()
        .map(|e| (e.metric, e.description.clone().unwrap()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (Some(Metric::Int(5)), "five".into()),
            (Some(Metric::Int(5)), "five".into()),
            (Some(Metric::Int(3)), "three".into()),
            (Some(Metric::Int(3)), "three".into()),
        ]
    );
}

#[test]
fn min_returns_the_smallest_event_ignoring_missing_metrics() {
    let b = bench("fixed_event_window(3) { min { out } }");
    send(&b, metric_ev(&b, "four", 4.0));
    send(&b, metric_ev(&b, "two", 2.0));
    send(&b, metric_ev(&b, "seven", 7.0));
    send(&b, ev(&b, "h", "none"));
    send(&b, metric_ev(&b, "three", 3.0));
    send(&b, metric_ev(&b, "five", 5.0));
    let seen: Vec<_> = out(&b)
        .iter()
        .map(|e| (e.service_str().to_owned(), e.metric))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("two".into(), Some(Metric::Int(2))),
            ("three".into(), Some(Metric::Int(3)))
        ]
    );
}

#[test]
fn coalesce_emits_latest_per_series_and_forgets_expired_ones() {
    let b = bench("coalesce(5s) { count { out } }");
    send(&b, with_ttl(ev(&b, "a", "x"), 60.0));
    send(&b, with_ttl(ev(&b, "b", "x"), 60.0));
    b.advance_to(at(1.0));
    send(&b, with_ttl(ev(&b, "a", "x"), 60.0)); // replaces a/x
    b.advance_to(at(10.0));
    b.advance_to(at(11.0));
    send(&b, with_state(ev(&b, "c", "x"), "expired"));
    b.advance_to(at(20.0));
    b.advance_to(at(21.0));
    send(&b, with_ttl(ev(&b, "d", "x"), 2.0)); // expired by TTL at 23 s
    b.advance_to(at(30.0));
    // 5, 10: a, b. 15: a, b, c (expired: emitted once). 20: a, b.
    // 25: a, b, d (TTL ran out: emitted once). 30: a, b.
    assert_eq!(out_f64(&b), vec![2.0, 2.0, 3.0, 2.0, 3.0, 2.0]);
}

/// An event timed a year ahead (or in milliseconds) is held as the index
/// would hold it: its TTL plus the 5 minutes allowed after it came, not for
/// ever; it is emitted with its time as sent.
#[test]
fn coalesce_forgets_an_event_timed_far_ahead_as_the_index_expires_it() {
    let b = bench("coalesce(5s) { count { out } }");
    let mut ahead = with_ttl(ev(&b, "a", "x"), 10.0);
    ahead.time = at(365.0 * 86_400.0);
    send(&b, ahead);
    b.advance_to(at(3_600.0));
    // Held until 310 s: periods ending at 5 s … 315 s (emitted once more
    // after its deadline, as a TTL that ran out).
    assert_eq!(out(&b).len(), 63);
    assert!(out(&b).iter().all(|e| e.time == at(365.0 * 86_400.0)));
}

#[test]
fn percentiles_use_nearest_rank() {
    let b = bench("percentiles(10s, [0.5, 0.95, 0.99]) { out }");
    for i in 0..100 {
        // A permutation of 1..=100, so the stage has to sort.
        send(&b, metric_ev(&b, "lat", f64::from((i * 37) % 100 + 1)));
    }
    b.advance_to(at(9.9));
    assert!(out(&b).is_empty());
    b.advance_to(at(10.0));
    let seen: Vec<_> = out(&b)
        .iter()
        .map(|e| (e.service_str().to_owned(), e.metric, e.time))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("lat 0.5".into(), Some(Metric::Float(51.0)), at(10.0)),
            ("lat 0.95".into(), Some(Metric::Float(96.0)), at(10.0)),
            ("lat 0.99".into(), Some(Metric::Float(100.0)), at(10.0)),
        ]
    );
    b.advance_to(at(30.0));
    assert_eq!(out(&b).len(), 3, "an empty interval emits nothing");
}

// ---- ewma / ddt --------------------------------------------------------------

#[test]
fn ewma_timeless_weighs_each_event_by_r() {
    let b = bench("ewma_timeless(0.5) { out }");
    for m in [10.0, 20.0, 30.0] {
        send(&b, metric_ev(&b, "s", m));
    }
    send(&b, ev(&b, "h", "s")); // no metric: skipped
    assert_eq!(out_f64(&b), vec![10.0, 15.0, 22.5]);
}

#[test]
fn ewma_weighs_by_event_time_and_halflife() {
    let b = bench("ewma(10s) { out }");
    // All arrive now; only their own times differ.
    let mut e = metric_ev(&b, "s", 10.0);
    send(&b, e.clone());
    e.metric = Some(Metric::Int(20));
    e.time = at(10.0); // one half-life: weight 0.5
    send(&b, e.clone());
    e.metric = Some(Metric::Int(35));
    e.time = at(30.0); // two half-lives: weight 0.75
    send(&b, e);
    assert_eq!(out_f64(&b), vec![10.0, 15.0, 30.0]);
}

/// A NaN or infinite metric passes as it came and leaves the average as it
/// was: Riemann's stays NaN (or infinite) for ever after one, and an
/// alert on it goes silent for good, where `counter` has a reset.
#[test]
fn an_ewma_passes_a_nan_or_infinite_metric_and_goes_on_without_it() {
    let b = bench("ewma_timeless(0.5) { out }");
    for m in [10.0, f64::NAN, 30.0, f64::INFINITY, 30.0] {
        send(&b, with_metric(ev(&b, "h", "s"), Metric::Float(m)));
    }
    let metrics = out_f64(&b);
    assert!(metrics[1].is_nan(), "{metrics:?}");
    assert_eq!(
        [metrics[0], metrics[2], metrics[3], metrics[4]],
        [10.0, 20.0, f64::INFINITY, 25.0]
    );

    let b = bench("ewma(10s) { out }");
    let mut e = metric_ev(&b, "s", 10.0);
    send(&b, e.clone());
    e.metric = Some(Metric::Float(f64::NAN));
    e.time = at(5.0);
    send(&b, e.clone());
    e.metric = Some(Metric::Int(20));
    e.time = at(10.0); // one half-life after the 10, the NaN not counted
    send(&b, e);
    let metrics = out_f64(&b);
    assert!(metrics[1].is_nan(), "{metrics:?}");
    assert_eq!([metrics[0], metrics[2]], [10.0, 15.0]);
}

#[test]
fn ddt_is_the_change_per_second_of_event_time() {
    let b = bench("ddt { out }");
    let mut e = metric_ev(&b, "counter", 100.0);
    send(&b, e.clone()); // primes only
    assert!(out(&b).is_empty());
    e.metric = Some(Metric::Int(160));
    e.time = at(10.0);
    send(&b, e.clone());
    e.metric = Some(Metric::Int(175));
    e.time = at(15.0);
    send(&b, e.clone());
    assert_eq!(
        out_metrics(&b),
        vec![Some(Metric::Float(6.0)), Some(Metric::Float(3.0))]
    );
}

/// As Riemann's: an event older than the one before it gives the slope
/// between the two, and one of the same time nothing.
#[test]
fn ddt_of_an_event_older_than_the_one_before_is_the_slope_back_to_it() {
    let b = bench("ddt { out }");
    let mut e = metric_ev(&b, "counter", 175.0);
    e.time = at(15.0);
    send(&b, e.clone());
    e.metric = Some(Metric::Int(160));
    e.time = at(10.0);
    send(&b, e.clone());
    e.metric = Some(Metric::Int(999));
    send(&b, e.clone());
    e.metric = Some(Metric::Int(1009));
    e.time = at(20.0);
    send(&b, e);
    assert_eq!(
        out_metrics(&b),
        vec![Some(Metric::Float(3.0)), Some(Metric::Float(1.0))]
    );
}

// ---- predict_linear ------------------------------------------------------------

/// An event of host `h` at `secs` after the start (its own time), metric `m`.
fn point(b: &Bench, secs: f64, m: Metric) -> Event {
    let mut e = with_metric(ev(b, "h", "s"), m);
    e.time = at(secs);
    e
}

/// y = 2t + 1 sampled at t = 0..4 (epoch seconds, integer metrics): each
/// prediction is the line's value 10 s after the latest event, a float.
#[test]
fn predict_linear_reads_the_fitted_line_s_after_the_latest_event() {
    let b = bench("predict_linear(5, 10s) { out }");
    for t in 0..5 {
        send(
            &b,
            point(&b, f64::from(t), Metric::Int(2 * i64::from(t) + 1)),
        );
    }
    let expected = (1..5).map(|t| Some(Metric::Float(f64::from(2 * (t + 10) + 1))));
    assert_eq!(out_metrics(&b), expected.collect::<Vec<_>>());
    assert_eq!(
        out(&b)[3].time,
        at(4.0),
        "the latest event, its time as sent"
    );
}

/// An event that comes late (older than one already in the window) is
/// read at its own time, as Riemann's reads `(:time (last events))`, the
/// event that came: the event emitted carries its own time, and a metric
/// for `s` after it, not after the latest time the window holds. The
/// window is the last `n` to come, whatever their times: the first one
/// leaves, the late one stays.
#[test]
fn predict_linear_reads_a_late_event_s_after_its_own_time() {
    let b = bench("predict_linear(3, 1s) { out }");
    for (t, m) in [(0, 0), (10, 10), (5, 5), (11, 11)] {
        send(&b, point(&b, f64::from(t), Metric::Int(m)));
    }
    // Every point on y = t: read 1 s after 10, after 5 (late), after 11.
    assert_eq!(out_f64(&b), vec![11.0, 6.0, 12.0]);
    let times: Vec<_> = out(&b).iter().map(|e| e.time).collect();
    assert_eq!(times, [at(10.0), at(5.0), at(11.0)]);
}

/// The window is the last `n` events: the oldest leaves it.
#[test]
fn predict_linear_fits_only_the_last_n_events() {
    let b = bench("predict_linear(2, 1s) { out }");
    for (t, m) in [(0, 0), (1, 10), (2, 10)] {
        send(&b, point(&b, f64::from(t), Metric::Int(m)));
    }
    // (0, 0), (1, 10): slope 10; then (1, 10), (2, 10): flat.
    assert_eq!(out_f64(&b), vec![20.0, 10.0]);
}

/// Events of one time give no slope (Riemann's divides by zero): nothing
/// is emitted until the window holds two times. An event without a metric
/// (an `expired` notice) or with a NaN or infinite one is no point and
/// emits nothing: it would have spoilt the next `n` predictions.
#[test]
fn predict_linear_skips_equal_times_and_metrics_that_are_no_points() {
    let b = bench("predict_linear(3, 10s) { out }");
    send(&b, point(&b, 0.0, Metric::Int(1)));
    send(&b, point(&b, 0.0, Metric::Int(1)));
    assert!(out(&b).is_empty(), "two events of one time: no slope");
    for m in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        send(&b, point(&b, 3.0, Metric::Float(m)));
    }
    send(&b, with_state(ev(&b, "h", "s"), "expired"));
    assert!(out(&b).is_empty(), "{:?}", out(&b));
    // (0, 1), (0, 1), (3, 7): y = 2t + 1, read at 13 s.
    send(&b, point(&b, 3.0, Metric::Int(7)));
    assert_eq!(out_metrics(&b), vec![Some(Metric::Float(27.0))]);
}

/// At epoch times (1.7e9 s) a point 1/64 s apart is exact: so is the
/// prediction, to the last bit. Sums of the times' squares (~2.9e18) keep
/// nothing of so small a spread.
#[test]
fn predict_linear_is_exact_at_epoch_times_a_fraction_of_a_second_apart() {
    let b = bench("predict_linear(5, 93.75ms) { out }");
    for k in 0..5 {
        let mut e = point(&b, 0.0, Metric::Int(2 * k + 1));
        e.time = TEST_EPOCH + k * 15_625;
        send(&b, e);
    }
    // y = 128 x + 1 (x in seconds from the first): 6/64 s after x = 4/64.
    assert_eq!(out_f64(&b).last(), Some(&21.0));
}

/// Each `by` group fits its own series.
#[test]
fn predict_linear_fits_each_by_group_apart() {
    let b = bench("by(host) { predict_linear(2, 1s) { out } }");
    for (t, host, m) in [(0, "a", 0), (0, "b", 100), (1, "a", 1), (1, "b", 90)] {
        let mut e = point(&b, f64::from(t), Metric::Int(m));
        e.host = Some(host.into());
        send(&b, e);
    }
    let seen: Vec<_> = out(&b)
        .iter()
        .map(|e| (e.host_str().to_owned(), e.metric))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("a".into(), Some(Metric::Float(2.0))),
            ("b".into(), Some(Metric::Float(80.0)))
        ]
    );
}

/// `s` is how far ahead the line is read, not a span the stage waits
/// through: a `by` group idle past its events' TTL is freed, and its window
/// starts again, however far ahead it predicts.
#[test]
fn a_by_group_of_predict_linear_is_freed_after_its_ttl_not_its_horizon() {
    let b = bench("by(host) { predict_linear(2, 1h) { out } }");
    send(&b, with_ttl(point(&b, 0.0, Metric::Int(0)), 10.0));
    b.advance_to(at(11.0));
    send(&b, with_ttl(point(&b, 11.0, Metric::Int(11)), 10.0));
    assert_eq!(
        out_f64(&b),
        Vec::<f64>::new(),
        "a fresh window of one point"
    );
}

/// Unlike `predict_linear`'s `s`, an `ewma`'s half-life is how long its
/// past counts, as a moving time window's `dt` is: a `by` group lives that
/// long after its last event, past a shorter TTL, so a series back within
/// it goes on from its average (half of it after one half-life).
#[test]
fn a_by_group_of_ewma_lives_its_half_life_as_a_moving_windows_dt() {
    let b = bench("by(host) { ewma(20s) { out } }");
    send(&b, with_ttl(point(&b, 0.0, Metric::Int(0)), 10.0));
    b.advance_to(at(20.0));
    send(&b, with_ttl(point(&b, 20.0, Metric::Int(8)), 10.0));
    assert_eq!(out_f64(&b), vec![0.0, 4.0], "half the average before");
}

/// An unchanged `predict_linear` keeps its points across a reload; one
/// whose `n` changed starts empty.
#[test]
fn a_reload_keeps_an_unchanged_predict_linears_points() {
    let b = bench("predict_linear(3, 1s) { out }");
    send(&b, point(&b, 0.0, Metric::Int(0)));
    reload_to(&b, "predict_linear(3, 1s) { out }\n  tag(\"new\") { drop }");
    send(&b, point(&b, 1.0, Metric::Int(1)));
    assert_eq!(out_f64(&b), vec![2.0], "the point from before the reload");
    reload_to(&b, "predict_linear(4, 1s) { out }");
    send(&b, point(&b, 2.0, Metric::Int(5)));
    assert_eq!(out_f64(&b), vec![2.0], "a changed stage starts empty");
}

/// The README's example: `fs-usage` predicted 30 minutes ahead per host
/// pages once the line passes 95.
#[test]
fn predict_linear_pages_a_disk_filling_within_half_an_hour() {
    let b = bench(
        "where service = \"fs-usage\" { by(host) { predict_linear(10, 30m) { \
         where metric > 95 { with(state: \"critical\") { out } } } } }",
    );
    for (t, m) in [(0, 49.0), (64, 50.0), (128, 54.0)] {
        let mut e = metric_ev(&b, "fs-usage", m);
        e.time = at(f64::from(t));
        send(&b, e);
    }
    // 49, 50: 1/64 a second, 78.125 half an hour on, not paged. With 54:
    // 5/128 a second through the mean (64, 51): 51 + 5/128 × 1864.
    let seen = out(&b);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].state.as_deref(), Some("critical"));
    assert_eq!(seen[0].metric, Some(Metric::Float(123.8125)));
}

// ---- stable ------------------------------------------------------------------

#[test]
fn stable_holds_until_settled_and_discards_flaps() {
    let b = bench("stable(5s) { out }");
    let e = |b: &Bench, state: &str, m: i64| {
        with_metric(with_state(ev(b, "h", "s"), state), Metric::Int(m))
    };
    for (t, m) in [(0.0, 1), (1.0, 2), (2.0, 3)] {
        b.advance_to(at(t));
        send(&b, e(&b, "ok", m));
    }
    b.advance_to(at(4.9));
    assert!(out(&b).is_empty(), "held until ok has lasted 5 s");
    b.advance_to(at(5.0)); // released by the timer
    assert_eq!(out_f64(&b), vec![1.0, 2.0, 3.0]);

    b.advance_to(at(6.0));
    send(&b, e(&b, "ok", 4)); // still stable: passes at once
    assert_eq!(out_f64(&b), vec![1.0, 2.0, 3.0, 4.0]);

    b.advance_to(at(7.0));
    send(&b, e(&b, "critical", 5)); // held
    b.advance_to(at(8.0));
    send(&b, e(&b, "ok", 6)); // flap: critical discarded, ok held from 8 s
    b.advance_to(at(12.9));
    assert_eq!(out(&b).len(), 4);
    b.advance_to(at(13.0));
    assert_eq!(out_f64(&b), vec![1.0, 2.0, 3.0, 4.0, 6.0]);
    b.advance_to(at(30.0));
    assert_eq!(out(&b).len(), 5, "the flap is never emitted");
}

// ---- index -------------------------------------------------------------------

#[test]
fn index_stores_and_expired_entries_come_back_through_the_rules() {
    let b = bench("index\nexpired { out }");
    send(&b, with_ttl(metric_ev(&b, "disk", 42.0), 5.0));
    let indexed = b.seen_by("index");
    assert_eq!(indexed.len(), 1);
    assert_eq!(indexed[0].metric, Some(Metric::Int(42)));
    assert_eq!(indexed[0].service.as_deref(), Some("disk"));

    b.advance_to(at(5.0));
    assert!(out(&b).is_empty(), "expires strictly after its TTL");
    assert_eq!(b.seen_by("index").len(), 1);

    b.advance_to(at(5.1));
    let seen = out(&b);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].state.as_deref(), Some("expired"));
    assert_eq!(seen[0].host.as_deref(), Some("h"));
    assert_eq!(seen[0].service.as_deref(), Some("disk"));
    assert_eq!(seen[0].metric, None);
    assert_eq!(seen[0].time, at(5.1));
    assert!(
        b.seen_by("index").is_empty(),
        "the expired notice removed the entry"
    );
    b.advance_to(at(20.0));
    assert_eq!(out(&b).len(), 1);
}

/// A stall of the process (a VM paused for a minute, the clock stepped
/// ahead between two ticks) is no silence of the series: their agents
/// could not be heard meanwhile. As after a restart, an entry whose TTL
/// ran out during it lives its TTL from the resume, not expired at once
/// with every other (an `expired` page for each host, all alive); one
/// whose TTL ran out before the stall, while vigil ran, still expires.
#[test]
fn a_stall_of_the_process_expires_only_what_ran_out_before_it() {
    let b = bench("index\nexpired { out }");
    for (service, ttl) in [("before", 3.0), ("before the stall", 4.92), ("in it", 10.0)] {
        send(&b, with_ttl(ev(&b, "h", service), ttl));
    }
    b.advance_to(at(4.9));
    let watch = b.rules.stalls();
    // The tick at 4.9 s ended at 4.95 s; the next came a minute later.
    watch.seen(at(4.95));
    b.clock.set(at(60.0));
    let now = b.clock.now();
    watch.tick_starts(Some(&b.index), now);
    b.index
        .expire_batches(now, |notices| b.rules.process_expired(notices));
    b.rules.tick_scheduled();
    let expired = |b: &Bench| -> Vec<(String, Micros)> {
        (out(b).iter())
            .map(|e| (e.service.clone().unwrap_or_default(), e.time))
            .collect()
    };
    let before = [
        ("before".to_owned(), at(3.1)),
        ("before the stall".to_owned(), at(60.0)),
    ];
    assert_eq!(expired(&b), before, "at the resume");
    assert_eq!(b.index.stalls_total(), 1);
    assert_eq!(b.index.stalled_seconds_total(), 55.05);
    // Due at 10 s, 5.05 s after vigil last ran: as long after the resume.
    b.advance_to(at(65.0));
    assert_eq!(
        expired(&b).len(),
        2,
        "in it: what the stall took of its TTL"
    );
    b.advance_to(at(65.1));
    assert_eq!(expired(&b)[2], ("in it".to_owned(), at(65.1)));
}

/// A host that died is noticed however often vigil stalls: a stall gives
/// back only what it took of an entry's TTL, so an entry expires once
/// vigil ran its TTL since it was stored. Given its whole TTL again at
/// each resume, an entry whose new deadline fell in the next stall (a VM
/// paused 2 s every 5 s, a TTL of 3 s) never expired.
#[test]
fn a_dead_host_expires_however_often_vigil_stalls() {
    let b = bench("index\nexpired { out }");
    send(&b, with_ttl(ev(&b, "h", "dead"), 3.0));
    let watch = b.rules.stalls();
    // The timer's tick at `t`, as the server runs it.
    let tick = |t: f64| {
        let now = at(t);
        b.clock.set(now);
        watch.tick_starts(Some(&b.index), now);
        b.index
            .expire_batches(now, |notices| b.rules.process_expired(notices));
        b.rules.tick_scheduled();
    };
    // vigil runs 2.9 s, then stalls 2.1 s, every 5 s, for a minute.
    for cycle in 0..12 {
        let start = f64::from(cycle) * 5.0;
        for step in 0..=29 {
            tick(start + f64::from(step) / 10.0);
        }
    }
    tick(60.0);
    let expired: Vec<(String, Micros)> = (out(&b).iter())
        .map(|e| (e.service.clone().unwrap_or_default(), e.time))
        .collect();
    // Stored at 0, it ran 2.9 s, then 0.1 s after the resume at 5 s: due
    // at 5.1 s, expired by the tick after.
    assert_eq!(expired, [("dead".to_owned(), at(5.2))], "expired");
    assert_eq!(b.index.stalls_total(), 12);
}

/// A tick under way is vigil running, however long it takes (held by a
/// reload, ticking a million `by` groups): a batch that comes meanwhile,
/// more than a second after vigil was last seen running, found no stall,
/// and a dead host's entry that came due while the tick was held still
/// expires at the next. Taken for one, it got time back, its page late.
#[test]
fn a_batch_during_a_long_tick_is_no_stall() {
    let b = bench("index\nexpired { out }");
    let watch = b.rules.stalls();
    // vigil ran until 9 s.
    b.clock.set(at(9.0));
    watch.seen(at(9.0));
    send(&b, with_ttl(ev(&b, "h", "dead"), 1.5));
    // The timer's tick at 9.1 s expires nothing, then waits on a reload
    // until 12 s; a batch comes at 11 s.
    b.clock.set(at(9.1));
    let ticking = watch.tick_starts(Some(&b.index), at(9.1));
    b.index
        .expire_batches(at(9.1), |notices| b.rules.process_expired(notices));
    b.clock.set(at(11.0));
    send(&b, ev(&b, "h", "alive"));
    b.clock.set(at(12.0));
    b.rules.tick_scheduled();
    watch.seen(at(12.0));
    drop(ticking);
    // The next tick, at once.
    let _ticking = watch.tick_starts(Some(&b.index), at(12.0));
    b.index
        .expire_batches(at(12.0), |notices| b.rules.process_expired(notices));
    let expired: Vec<(String, Micros)> = (out(&b).iter())
        .map(|e| (e.service.clone().unwrap_or_default(), e.time))
        .collect();
    assert_eq!(expired, [("dead".to_owned(), at(12.0))], "expired");
    assert_eq!(b.index.stalls_total(), 0);
}

/// A stall gives entries time back once, however many runs saw it: the
/// batches queued during it, which run at the resume beside the tick
/// that gives it, see the same stall (vigil last seen at the same time),
/// not another to give again at the next tick, which gave an entry given
/// little (due just after vigil last ran) most of the stall again.
#[test]
fn a_stall_gives_time_back_once() {
    let b = bench("index\nexpired { out }");
    let watch = b.rules.stalls();
    b.clock.set(at(9.0));
    watch.seen(at(9.0));
    // Due 0.05 s after vigil last ran; a 10 s stall.
    let mut dead = with_ttl(ev(&b, "h", "dead"), 10.0);
    dead.time = at(-0.95);
    send(&b, dead);
    b.clock.set(at(19.0));
    let ticking = watch.tick_starts(Some(&b.index), at(19.0));
    // A batch queued during the stall, before the tick's own end.
    watch.runs(at(19.01));
    b.index
        .expire_batches(at(19.0), |notices| b.rules.process_expired(notices));
    watch.seen(at(19.02));
    drop(ticking);
    for t in [19.1, 19.2] {
        let _ticking = watch.tick_starts(Some(&b.index), at(t));
        b.index
            .expire_batches(at(t), |notices| b.rules.process_expired(notices));
        watch.seen(at(t));
    }
    let expired: Vec<(String, Micros)> = (out(&b).iter())
        .map(|e| (e.service.clone().unwrap_or_default(), e.time))
        .collect();
    assert_eq!(expired, [("dead".to_owned(), at(19.1))], "expired");
    assert_eq!(b.index.stalls_total(), 1);
}

/// vigil is stalled only when neither a tick nor a batch ran for more
/// than two ticks and a second: not when a tick ran long, which the next
/// waits for, nor when a busy machine put an idle vigil's timer off.
#[test]
fn a_stall_is_more_than_two_ticks_after_vigil_last_ran() {
    let watch = crate::index::StallWatch::new(crate::rules::testing::TICK);
    let none = (Micros::MIN, Micros::MIN);
    assert_eq!(watch.runs(at(3_600.0)), none, "the first run");
    watch.seen(at(10.0));
    assert_eq!(watch.runs(at(10.5)), none, "a timer put off half a second");
    assert_eq!(watch.runs(at(11.0)), none);
    assert_eq!(watch.runs(at(11.000_001)), (at(10.0), at(11.000_001)));
    watch.seen(at(11.1));
    assert_eq!(
        watch.runs(at(11.2)),
        (at(10.0), at(11.000_001)),
        "the latest"
    );
    // The clock stepped back a minute, then vigil stalled for 30 s.
    watch.seen(at(100.0));
    watch.seen(at(40.0));
    assert_eq!(watch.runs(at(70.0)), (at(40.0), at(70.0)), "stepped back");
}

// ---- publish -----------------------------------------------------------------

/// `publish` hands each event to its topic's subscribers only, and ends
/// the stream there: the index and the output see nothing of it.
#[test]
fn publish_reaches_its_topics_subscribers_only() {
    let b = bench("where service = \"disk\" { publish(\"alerts\") }\nelse { publish(other) }");
    let pubsub = b.index.pubsub();
    let all = || crate::query::Query::parse("true").unwrap();
    let anyone = pubsub.client(None);
    let mut alerts = anyone.subscribe_to(pubsub.topic("alerts"), all(), 10);
    let mut other = anyone.subscribe_to(pubsub.topic("other"), all(), 10);
    let mut index = pubsub.subscribe(all(), 10);
    send(&b, metric_ev(&b, "disk", 1.0));
    send(&b, metric_ev(&b, "cpu", 2.0));
    let got = alerts.try_recv().expect("published to alerts");
    assert_eq!(got.service.as_deref(), Some("disk"));
    assert!(alerts.try_recv().is_err());
    assert_eq!(other.try_recv().unwrap().service.as_deref(), Some("cpu"));
    assert!(other.try_recv().is_err());
    assert!(index.try_recv().is_err());
    assert!(b.seen_by("index").is_empty() && out(&b).is_empty());
}

/// A subscriber connected before a reload that adds the `publish` gets
/// what it publishes from then on.
#[test]
fn a_reload_adding_publish_reaches_subscribers_already_there() {
    let b = bench("out");
    let pubsub = b.index.pubsub();
    let query = crate::query::Query::parse("true").unwrap();
    let mut early = pubsub
        .client(None)
        .subscribe_to(pubsub.topic("late"), query, 10);
    send(&b, ev(&b, "h", "before"));
    assert!(early.try_recv().is_err());
    reload_to(&b, "publish(late)");
    send(&b, ev(&b, "h", "after"));
    assert_eq!(early.try_recv().unwrap().service.as_deref(), Some("after"));
}

/// A reload that adds a tap and a topic before an unchanged `by`, which
/// hands its groups over with their stages, moves the recorder slots past
/// the outputs of the stages in its block: under `vigil run`'s outputs
/// (none past them) the groups' `tap` and `publish` record nowhere, their
/// `publish` still publishes to its own topic and not to the new one, each
/// event reaches `out` once, and the group's count goes on.
#[test]
fn a_reload_adding_taps_and_topics_before_a_by_hands_its_groups_over_whole() {
    let by = "by(host) { counter { out tap(inner) publish(t) } }";
    let b = bench(&format!("where service = \"x\" {{ drop }}\n{by}"));
    let pubsub = b.index.pubsub();
    let all = || crate::query::Query::parse("true").unwrap();
    let mut t = (pubsub.client(None)).subscribe_to(pubsub.topic("t"), all(), 10);
    let mut first = (pubsub.client(None)).subscribe_to(pubsub.topic("first"), all(), 10);
    send(&b, int_ev(&b, 2));
    assert_eq!((b.published("t").len(), b.tapped("inner").len()), (1, 1));
    reload_to(
        &b,
        &format!("where service = \"x\" {{ tap(new) publish(first) }}\n{by}"),
    );
    send(&b, int_ev(&b, 3));
    send(&b, ev(&b, "x", "x"));
    // Host `x`'s event, without a metric, passes its own group's counter.
    let counted = [Some(Metric::Int(2)), Some(Metric::Int(5)), None];
    assert_eq!(out_metrics(&b), counted, "the group's count kept");
    let published: Vec<_> = std::iter::from_fn(|| t.try_recv().ok())
        .map(|e| e.metric)
        .collect();
    assert_eq!(published, counted);
    let first: Vec<_> = std::iter::from_fn(|| first.try_recv().ok())
        .map(|e| e.host.clone())
        .collect();
    assert_eq!(
        first,
        [Some("x".to_owned())],
        "only the new `publish`'s event"
    );
    assert_eq!((b.published("t").len(), b.tapped("inner").len()), (1, 1));
}

/// Where the index says topics are (a cluster's feed), `publish` publishes:
/// the topic's subscribers there get its events, none reach the index's
/// pubsub.
#[test]
fn publish_publishes_where_the_index_keeps_topics() {
    let b = bench("publish(alerts)");
    let feed = crate::pubsub::Pubsub::new();
    b.index.publish_topics_on(feed.clone());
    let all = || crate::query::Query::parse("true").unwrap();
    let mut there = feed
        .client(None)
        .subscribe_to(feed.topic("alerts"), all(), 10);
    let local = b.index.pubsub();
    let mut beside = local
        .client(None)
        .subscribe_to(local.topic("alerts"), all(), 10);
    send(&b, ev(&b, "h", "disk"));
    let got = there.try_recv().expect("published where the topics are");
    assert_eq!(got.service.as_deref(), Some("disk"));
    assert!(beside.try_recv().is_err());
}

/// Hosts that report again while a mass expiry's notices go out (on other
/// threads in vigil; here between two batches of notices): the rules see
/// them come back, and never expire after that, and the index keeps them.
#[test]
fn hosts_back_while_a_mass_expiry_goes_out_are_neither_reported_expired_nor_unindexed() {
    let b = bench("index\nexpired { out }");
    // Some hundreds per shard: each shard's notices go out in batches.
    let services: Vec<String> = (0..64 * 512).map(|i| i.to_string()).collect();
    let first: Vec<Event> = (services.iter())
        .map(|s| with_ttl(ev(&b, "h", s), 1.0))
        .collect();
    b.rules.process(&first);
    b.clock.set(at(2.0));
    let mut back: Vec<Event> = Vec::new();
    b.index.expire(at(2.0), |notices| {
        if back.is_empty() {
            let noticed: std::collections::HashSet<&str> =
                notices.iter().map(Event::service_str).collect();
            back = (services.iter())
                .filter(|s| !noticed.contains(s.as_str()))
                .map(|s| with_ttl(ev(&b, "h", s), 60.0))
                .collect();
            b.rules.process(&back);
        }
        b.rules.process(notices);
    });
    let reported: std::collections::HashSet<String> =
        out(&b).iter().map(|e| e.service_str().to_owned()).collect();
    assert!(!reported.is_empty() && !back.is_empty());
    for event in &back {
        let service = event.service_str();
        assert!(
            !reported.contains(service),
            "{service} reported expired once back"
        );
        assert!(b.index.get("h", service).is_some(), "{service} unindexed");
    }
    assert_eq!(reported.len() + back.len(), services.len());
}

#[test]
fn a_batch_is_indexed_under_each_events_own_key_even_when_a_stage_changes_it() {
    // The engine hashes each key ahead of the event to prefetch its slot and
    // hands that hash to `index`; an event changed on the way must not use it.
    let b = bench(
        r#"index
        where host = "h2" { with(service: "moved") { index } }
        default(state: "ok") { index }"#,
    );
    let batch: Vec<Event> = (0..10)
        .map(|i| ev(&b, &format!("h{i}"), &format!("s{i}")))
        .collect();
    b.rules.process(&batch);
    let mut keys: Vec<(String, String, Option<String>)> = b
        .index
        .query(&crate::query::Query::parse("true").unwrap())
        .unwrap()
        .into_iter()
        .map(|e| (e.host_str().to_owned(), e.service_str().to_owned(), e.state))
        .collect();
    keys.sort();
    let mut expected: Vec<_> = (0..10)
        .map(|i| (format!("h{i}"), format!("s{i}"), Some("ok".to_owned())))
        .collect();
    expected.push(("h2".into(), "moved".into(), None));
    expected.sort();
    assert_eq!(keys, expected);
    for i in 0..10 {
        let service = format!("s{i}");
        assert!(
            b.index.get(&format!("h{i}"), &service).is_some(),
            "{service}"
        );
    }
}

#[test]
fn a_group_whose_ttl_shrinks_is_freed_at_the_shorter_time() {
    // The group is queued to be freed 100 s on; the second event brings its
    // time forward to 6 s, which the timer must not miss.
    let b = bench("by(host) { changed(state) { out } }");
    let ok = |b: &Bench, ttl: f32| with_ttl(with_state(ev(b, "a", "s"), "ok"), ttl);
    send(&b, ok(&b, 100.0));
    b.advance_to(at(1.0));
    send(&b, ok(&b, 5.0));
    b.advance_to(at(6.5));
    send(&b, ok(&b, 5.0)); // a fresh group: passes again
    let times: Vec<Micros> = out(&b).iter().map(|e| e.time).collect();
    assert_eq!(times, vec![at(0.0), at(6.5)]);
}

#[test]
fn a_group_kept_alive_by_its_events_is_not_freed_at_its_first_time() {
    let b = bench("by(host) { changed(state) { out } }");
    let ok = |b: &Bench| with_ttl(with_state(ev(b, "a", "s"), "ok"), 5.0);
    for second in 0..30 {
        b.advance_to(at(f64::from(second)));
        send(&b, ok(&b));
    }
    assert_eq!(out(&b).len(), 1, "one group all along: {:?}", out(&b));
}

#[test]
fn every_group_due_on_a_tick_is_ticked_on_it_however_many() {
    // More groups due at once than a tick visits under one hold of a lock.
    let b = bench("by(host) { rate(1s) { out } }");
    let hosts = 900;
    for host in 0..hosts {
        let e = with_metric(ev(&b, &format!("h{host}"), "s"), Metric::Int(5));
        send(&b, with_ttl(e, 60.0));
    }
    b.advance_to(at(1.0));
    let reports = out(&b);
    assert_eq!(reports.len(), hosts);
    assert!(reports.iter().all(|e| e.time == at(1.0)), "on time");
    let mut reported: Vec<String> = reports.iter().map(|e| e.host_str().to_owned()).collect();
    reported.sort();
    reported.dedup();
    assert_eq!(reported.len(), hosts, "each group once");
    b.advance_to(at(2.0));
    assert_eq!(
        out(&b).len(),
        1_000,
        "and again a second later (as many as recorded)"
    );
}

/// Saving the state for a restart writes each stage's entry to a file, which
/// may wait on the disk. The stage's lock is not held meanwhile: a group's
/// events (and, behind them, every event of its `by` shard) would wait for
/// the disk with the CPU idle.
#[test]
fn a_stages_events_do_not_wait_for_its_state_being_written() {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::saved::{Saved, Saver};
    use super::{Children, Scratch};

    /// Stops in its first push of a stage's own entry until told to go on.
    struct StuckSaver {
        stuck: mpsc::Sender<()>,
        go_on: mpsc::Receiver<()>,
        once: bool,
    }
    impl Saver for StuckSaver {
        fn push(&mut self, entry: Saved) {
            if !self.once && !matches!(entry, Saved::By { .. } | Saved::Group { .. }) {
                self.once = true;
                self.stuck.send(()).unwrap();
                self.go_on.recv().unwrap();
            }
        }
    }

    let run = |roots: &Children, event: &Event| {
        roots.event(event, &mut Scratch::default().cx(TEST_EPOCH));
    };
    for stage in [
        "rate(10s) { drop }",
        "stable(10s) { drop }",
        "changed_state { drop }",
        "ewma(10s) { drop }",
        "ddt { drop }",
        "predict_linear(3, 1m) { drop }",
        "fixed_time_window(10s) { count { drop } }",
        "moving_event_window(10) { count { drop } }",
        "percentiles(10s, [0.5]) { drop }",
        "counter { drop }",
        "runs(2, state) { drop }",
    ] {
        let source = format!("streams {{\n  by(host) {{ {stage} }}\n}}\n");
        let (_, compiled) =
            crate::rules::load("t.vigil", &source, crate::rules::EnvPolicy::Lenient)
                .unwrap_or_else(|e| panic!("{stage}: {e}"));
        let roots = compiled.roots;
        let event = Event {
            host: Some("h".into()),
            service: Some("s".into()),
            state: Some("ok".into()),
            metric: Some(Metric::Int(1)),
            time: TEST_EPOCH,
            ..Event::default()
        };
        run(&roots, &event);
        let (stuck, is_stuck) = mpsc::channel();
        let (go_on, going_on) = mpsc::channel();
        let (ran, has_run) = mpsc::channel();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut saver = StuckSaver {
                    stuck,
                    go_on: going_on,
                    once: false,
                };
                roots.save(&mut saver);
            });
            is_stuck
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{stage}: {e}"));
            scope.spawn(|| {
                run(&roots, &event);
                ran.send(()).unwrap();
            });
            let waited = has_run.recv_timeout(Duration::from_secs(10));
            go_on.send(()).unwrap();
            assert!(waited.is_ok(), "{stage}: the event waited for the write");
        });
    }
}

/// Riemann's `fill-in`: every event passes; each `dt` without one brings a
/// copy of the given event, stamped with that moment, until the latest
/// event has expired; an event starts it again.
#[test]
fn fill_in_emits_its_event_in_each_gap_until_the_latest_expires() {
    let b = bench(r#"fill_in(5s, {service: "gap", metric: 0}) { out }"#);
    send(&b, with_ttl(int_ev(&b, 7), 12.0));
    b.advance_to(at(4.9));
    assert_eq!(out_metrics(&b), [Some(Metric::Int(7))], "no gap yet");
    b.advance_to(at(3.0 + 4.9));
    b.advance_to(at(20.0));
    let seen = out(&b);
    let gaps: Vec<(Option<&str>, Micros)> = seen[1..]
        .iter()
        .map(|e| (e.service.as_deref(), e.time))
        .collect();
    assert_eq!(
        gaps,
        [(Some("gap"), at(5.0)), (Some("gap"), at(10.0))],
        "at 5 s and 10 s, none past the event's expiry at 12 s"
    );
    assert_eq!(seen[1].metric, Some(Metric::Int(0)));
    assert_eq!(seen[1].host, None, "the given event, not the latest");
    b.advance_to(at(21.0));
    send(&b, with_ttl(ev(&b, "h", "s"), 60.0));
    b.advance_to(at(24.0));
    send(&b, with_ttl(ev(&b, "h", "s"), 60.0));
    b.advance_to(at(28.9));
    assert_eq!(out(&b).len(), 5, "an event puts the next fill off by 5 s");
    b.advance_to(at(31.0));
    let times: Vec<Micros> = out(&b)[5..].iter().map(|e| e.time).collect();
    assert_eq!(times, [at(29.0)]);
}

/// An `expired` event stops the filling, and passes on itself.
/// As a restart, a stall of the process is no gap in a series: nothing
/// could come meanwhile. The series has a whole `dt` from the end of the
/// stall to speak, not a fill for each `dt` missed, 16 of them at once.
#[test]
fn a_fill_in_fills_no_stall_of_the_process() {
    let b = bench(r#"fill_in(10s, {service: "gap"}) { out }"#);
    send(&b, with_ttl(ev(&b, "h", "s"), 7_200.0));
    b.clock.set(at(3_600.0));
    b.rules.tick_scheduled();
    b.advance_to(at(3_625.0));
    let times: Vec<Micros> = out(&b).iter().map(|e| e.time).collect();
    assert_eq!(times, [at(0.0), at(3_610.0), at(3_620.0)]);
}

#[test]
fn fill_in_stops_at_an_expired_event() {
    let b = bench(r#"fill_in(1s, {service: "gap"}) { out }"#);
    send(&b, ev(&b, "h", "s"));
    b.advance_to(at(2.5));
    assert_eq!(out(&b).len(), 3);
    send(&b, with_state(ev(&b, "h", "s"), "expired"));
    b.advance_to(at(10.0));
    assert_eq!(out(&b).len(), 4, "the expired event, then nothing");
}

/// Riemann's `fill-in-last`: the latest event with the given fields set
/// over it, so a `by` fills each series with its own host and service.
#[test]
fn fill_in_last_fills_each_series_with_its_latest_event() {
    let b = bench(r#"by(host) { fill_in_last(10s, {metric: 0, state: "gap"}) { out } }"#);
    send(
        &b,
        with_state(with_metric(ev(&b, "a", "s"), Metric::Int(3)), "ok"),
    );
    b.advance_to(at(5.0));
    send(&b, with_metric(ev(&b, "b", "t"), Metric::Int(4)));
    b.advance_to(at(16.0));
    let fills: Vec<String> = out(&b)[2..]
        .iter()
        .map(|e| {
            let (host, service, state) = (
                e.host_str(),
                e.service_str(),
                e.state.as_deref().unwrap_or(""),
            );
            let metric = e.metric.map(Metric::as_f64);
            format!("{host} {service} {metric:?} {state} {}", e.time - at(0.0))
        })
        .collect();
    assert_eq!(
        fills,
        ["a s Some(0.0) gap 10000000", "b t Some(0.0) gap 15000000"]
    );
}

/// A reload that keeps the stage keeps its timer; a restart its state.
#[test]
fn a_reload_keeps_an_unchanged_fill_ins_gap() {
    let b = bench(r#"fill_in_last(10s) { out }"#);
    send(&b, int_ev(&b, 1));
    b.advance_to(at(5.0));
    reload_to(&b, "fill_in_last(10s) { out }\n  tag(\"new\") { drop }");
    b.advance_to(at(10.0));
    let seen = out(&b);
    assert_eq!(seen.len(), 2, "the gap measured before the reload");
    assert_eq!(
        (seen[1].metric, seen[1].time),
        (Some(Metric::Int(1)), at(10.0))
    );
}

/// A reload that changes `dt` or the fields keeps each series' latest
/// event and when it came: one silent across the reload is filled, from
/// its latest event, at the new `dt` with the new fields.
#[test]
fn a_reload_changing_a_fill_ins_arguments_keeps_its_series() {
    let b = bench(r#"by(host) { fill_in_last(10s, {state: "gap"}) { out } }"#);
    send(&b, with_ttl(int_ev(&b, 1), 3600.0));
    b.advance_to(at(5.0));
    reload_to(
        &b,
        r#"by(host) { fill_in_last(20s, {state: "silent"}) { out } }"#,
    );
    b.advance_to(at(19.9));
    assert_eq!(out(&b).len(), 1, "the event; no fill at the old 10 s");
    b.advance_to(at(40.0));
    let fills: Vec<_> = out(&b)[1..]
        .iter()
        .map(|e| (e.host_str().to_owned(), e.state.clone(), e.metric, e.time))
        .collect();
    let fill = |t| {
        (
            "h".to_owned(),
            Some("silent".to_owned()),
            Some(Metric::Int(1)),
            at(t),
        )
    };
    assert_eq!(fills, [fill(20.0), fill(40.0)]);
}

/// A reload turning `fill_in_last` into `fill_in` keeps each series, as
/// one changing the fields does: silent across the reload, it is filled.
/// The other way it starts empty: `fill_in` keeps no latest event to fill
/// with.
#[test]
fn a_reload_from_fill_in_last_to_fill_in_keeps_its_series() {
    let b = bench(r#"by(host) { fill_in_last(10s, {state: "gap"}) { out } }"#);
    send(&b, with_ttl(int_ev(&b, 1), 3600.0));
    b.advance_to(at(5.0));
    reload_to(&b, r#"by(host) { fill_in(10s, {service: "gap"}) { out } }"#);
    b.advance_to(at(10.0));
    let fills: Vec<_> = out(&b)[1..]
        .iter()
        .map(|e| (e.service.clone(), e.metric, e.time))
        .collect();
    assert_eq!(fills, [(Some("gap".to_owned()), None, at(10.0))]);
    reload_to(
        &b,
        r#"by(host) { fill_in_last(10s, {state: "gap"}) { out } }"#,
    );
    b.advance_to(at(40.0));
    assert_eq!(out(&b).len(), 2, "no fill without a latest event");
}

/// A reload shrinking `dt` when the series has been silent longer than
/// the new one: the first fill is at the reload's tick, where the gaps the new
/// `dt` puts before it were filled at once, stamped when the old `dt`
/// said the series was not yet silent (10 s and 20 s, at 30 s).
#[test]
fn a_reload_shrinking_a_fill_ins_dt_fills_from_the_reload_on() {
    let b = bench(r#"by(host) { fill_in(60s, {service: "gap"}) { out } }"#);
    send(&b, with_ttl(int_ev(&b, 1), 3600.0));
    b.advance_to(at(30.0));
    reload_to(&b, r#"by(host) { fill_in(10s, {service: "gap"}) { out } }"#);
    b.advance_to(at(45.0));
    // At the first tick after the reload (the bench's next, 30.1 s), then
    // every 10 s.
    let times: Vec<Micros> = out(&b)[1..].iter().map(|e| e.time).collect();
    assert_eq!(times, [at(30.1), at(40.1)]);
}

/// Riemann's `apdex`: over each `dt`, (satisfied + tolerated / 2) / all,
/// on the latest event, when the `dt` ends (by the timer); expired events
/// are not counted; a whole score is an integer, as Riemann's ratio.
#[test]
fn apdex_scores_each_interval_when_it_ends() {
    let b = bench(r#"apdex(10s, satisfied: "metric < 1", tolerated: "metric < 4") { out }"#);
    for (t, m) in [(0.0, 0.5), (1.0, 2.0), (2.0, 9.0), (3.0, 0.2)] {
        b.advance_to(at(t));
        send(&b, metric_ev(&b, "latency", m));
    }
    send(&b, with_state(ev(&b, "h", "latency"), "expired"));
    // Expired by its TTL too, as Riemann's `expired?` has it.
    let stale = with_ttl(metric_ev(&b, "latency", 9.0), 1.0);
    b.advance_to(at(4.0));
    send(
        &b,
        Event {
            time: at(2.0),
            ..stale
        },
    );
    b.advance_to(at(9.9));
    assert!(out(&b).is_empty(), "the interval is not over");
    b.advance_to(at(10.0));
    let seen = out(&b);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].metric, Some(Metric::Float((2.0 + 0.5) / 4.0)));
    assert_eq!(seen[0].time, at(3.0), "the latest counted event");
    b.advance_to(at(30.0));
    assert_eq!(out(&b).len(), 1, "no events, no score");
    send(&b, metric_ev(&b, "latency", 0.1));
    b.advance_to(at(40.0));
    assert_eq!(out_metrics(&b)[1], Some(Metric::Int(1)));
}

/// A reload that keeps an apdex as it was keeps its counts so far.
#[test]
fn a_reload_keeps_an_unchanged_apdexs_counts() {
    let rule = r#"apdex(10s, satisfied: "metric < 1", tolerated: "false") { out }"#;
    let b = bench(rule);
    send(&b, metric_ev(&b, "latency", 0.5));
    reload_to(&b, &format!("{rule}\n  tag(\"new\") {{ drop }}"));
    send(&b, metric_ev(&b, "latency", 5.0));
    b.advance_to(at(10.0));
    assert_eq!(out_f64(&b), [0.5], "one of two satisfied");
}

/// Riemann's `batch(n, dt)`: a batch of `n` goes at once, what gathers
/// after it when the `dt` ends (by the timer); each to the folds.
#[test]
fn batch_folds_every_n_events_and_the_rest_when_the_interval_ends() {
    let b = bench("batch(3, 10s) { sum { out } count { out } }");
    for (t, m) in [(0.0, 1), (1.0, 2), (2.0, 3), (3.0, 4)] {
        b.advance_to(at(t));
        send(&b, int_ev(&b, m));
    }
    assert_eq!(
        out_metrics(&b),
        [Some(Metric::Int(6)), Some(Metric::Int(3))]
    );
    b.advance_to(at(9.9));
    assert_eq!(out(&b).len(), 2);
    b.advance_to(at(10.0));
    assert_eq!(out_f64(&b), [6.0, 3.0, 4.0, 1.0], "4 when the 10 s end");
    b.advance_to(at(30.0));
    assert_eq!(out(&b).len(), 4, "an empty batch folds to nothing");
}
