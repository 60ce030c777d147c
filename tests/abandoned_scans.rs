//! A scan whose WebSocket asker closed the connection right after the
//! upgrade is stopped, against the real binary. (A Riemann TCP asker's is
//! not: one that closed looks the same as one that only closed its side for
//! writing and still reads its answers, see README.)

mod common;

use std::time::Duration;

use common::Vigil;
use vigil::client::Client;
use vigil::clock::{Clock, SystemClock};
use vigil::event::Event;

/// Far longer than a scan takes: a scan that ends is abandoned, not timed out.
const QUERY_TIMEOUT: &str = "600s";

/// Entries in the index, each tested against every term of [`costly`].
const ENTRIES: usize = 200_000;

/// Terms of the query whose asker leaves: a scan of seconds (about 5 s in a
/// release build, more in a debug one), so one that is not stopped runs
/// well past [`NOTICED_WITHIN`].
const COSTLY_TERMS: usize = 2_000;

/// Ample for the scan to have begun after the upgrade, far less than it takes.
const SCAN_STARTED: Duration = Duration::from_secs(1);

/// Far less than the scan of [`COSTLY_TERMS`] takes, yet ample for noticing
/// the asker left.
const NOTICED_WITHIN: Duration = Duration::from_secs(2);

/// `terms` terms no entry matches, each tested on every entry, then one that
/// `web7` matches.
fn costly(terms: usize) -> String {
    let terms: Vec<String> = (0..terms).map(|i| format!("metric={i}")).collect();
    terms.join(" or ") + r#" or host = "web7""#
}

async fn fill(v: &Vigil) {
    let mut client = Client::connect(v.tcp).await.unwrap();
    let hosts: Vec<usize> = (0..ENTRIES).collect();
    for hosts in hosts.chunks(10_000) {
        let events: Vec<Event> = (hosts.iter())
            .map(|i| Event {
                host: Some(format!("web{i}")),
                service: Some("cpu".into()),
                time: SystemClock.now(),
                ttl: Some(600.0),
                ..Event::default()
            })
            .collect();
        client.send(&events).await.unwrap();
    }
}

/// Waits until one scan was abandoned: a scan that ran in full would count
/// nothing, and take far longer.
async fn wait_abandoned(v: &Vigil) {
    let http = v.http.unwrap();
    let waited = tokio::time::timeout(NOTICED_WITHIN, async {
        while common::metric(http, "vigil_index_scans_abandoned_total").await == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "no scan abandoned; {}", v.logs());
    assert_eq!(
        common::metric(http, "vigil_index_scans_timed_out_total").await,
        0
    );
}

/// Another connection is still answered.
async fn still_answers(v: &Vigil) {
    let mut client = Client::connect(v.tcp).await.unwrap();
    let asked = tokio::time::timeout(NOTICED_WITHIN, client.query(r#"host = "web7""#));
    let found = asked.await.expect("answered in time").unwrap();
    assert_eq!(found.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scan_whose_websocket_asker_left_after_the_upgrade_is_abandoned() {
    let v = Vigil::start(&["--query-timeout", QUERY_TIMEOUT]);
    fill(&v).await;
    let url = reqwest::Url::parse_with_params(
        &format!("ws://{}/index", v.http.unwrap()),
        [("query", costly(COSTLY_TERMS))],
    )
    .unwrap();
    let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .expect("websocket handshake");
    // Left once its scan runs (seconds long): one dropped while still
    // waiting for its turn never began, and counts as no abandoned scan.
    tokio::time::sleep(SCAN_STARTED).await;
    drop(ws);
    wait_abandoned(&v).await;
    still_answers(&v).await;
}
