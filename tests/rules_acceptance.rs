//! The rule language's acceptance example (`rules/rabbitmq.vigil`, seed config
//! of a real Riemann deployment) run by the real binary and driven by the real
//! `riemann-client`: a backlog of 500 turns `rabbitmq backlog` critical in the
//! index, a backlog of 10 turns it ok, and the rate stream indexes
//! `vigil events/s`.

mod common;

use common::*;

const BACKLOG: &str = "curl json-rabbitmq/gauge-queue totals-messages";

fn send_backlog(v: &Vigil, metric: &str) {
    let port = v.port_str();
    let host = v.host_str();
    let args = [
        "send",
        "-T",
        "-h",
        "rmq1",
        "-S",
        BACKLOG,
        "-i",
        metric,
        host.as_str(),
        port.as_str(),
    ];
    run_ok("riemann-client", &args, CMD_TIMEOUT);
}

fn backlog_state(v: &Vigil) -> Option<(String, f64)> {
    let found = c_query(v, r#"host = "rmq1" and service = "rabbitmq backlog""#);
    let event = found.first()?;
    Some((
        str_field(event, "state")?.to_owned(),
        *metric_values(event).first()?,
    ))
}

#[test]
fn backlog_pages_critical_then_ok_and_the_rate_is_indexed() {
    require_peer("riemann-client");
    let v = Vigil::start_with_env(
        &["--rules", "rules/rabbitmq.vigil"],
        &[("VIGIL_PAGERDUTY_KEY", "test-routing-key")],
    );

    send_backlog(&v, "500");
    let state = wait_until(VISIBLE_TIMEOUT, || {
        backlog_state(&v).filter(|(s, _)| s == "critical")
    });
    assert_eq!(state, Some(("critical".to_owned(), 500.0)), "{}", v.logs());
    let entry = c_query(&v, r#"service = "rabbitmq backlog""#);
    assert_eq!(num_field(&entry[0], "ttl"), Some(120.0), "with(ttl: 120)");
    assert_eq!(tags(&entry[0]), vec!["notify".to_owned()]);

    send_backlog(&v, "10");
    let state = wait_until(VISIBLE_TIMEOUT, || {
        backlog_state(&v).filter(|(s, _)| s == "ok")
    });
    assert_eq!(state, Some(("ok".to_owned(), 10.0)), "{}", v.logs());

    // rate(5s) over the two backlog samples (and the reinjected backlog
    // events): emitted by the timer within about 5 s of the first event.
    let rate = wait_until(std::time::Duration::from_secs(15), || {
        c_query(&v, r#"host = "vigil" and service = "vigil events/s""#)
            .into_iter()
            .next()
    })
    .unwrap_or_else(|| panic!("no `vigil events/s` event was indexed\n{}", v.logs()));
    // 500 + 500 (reinjected) + 10 + 10 (reinjected) over 5 s, if both samples
    // fell in the first window; the timer may split them across two windows.
    let metric = metric_values(&rate)[0];
    assert!(
        [204.0, 200.0, 4.0].contains(&metric),
        "rate metric {metric} is not a sum of the samples per second"
    );
    assert!(tags(&rate).is_empty(), "with(tags: [])");
}
