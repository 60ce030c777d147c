//! A scan whose asker left is stopped, against the real binary: over Riemann
//! TCP once the asker closes its connection, over a WebSocket once it closes
//! after the upgrade; and a pipelining TCP client, whose next frames arrive
//! while its scan runs, is not taken for one that left.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::Vigil;
use common::inproc::frame;
use vigil::client::Client;
use vigil::clock::{Clock, SystemClock};
use vigil::event::Event;
use vigil::proto::{Msg, PbEvent, PbQuery};

/// Far longer than a scan takes: a scan that ends is abandoned, not timed out.
const QUERY_TIMEOUT: &str = "600s";

/// Entries in the index, each tested against every term of [`costly`].
const ENTRIES: usize = 200_000;

/// Terms of the query whose asker leaves: a scan of seconds (about 5 s in a
/// release build, more in a debug one), so one that is not stopped runs
/// well past [`NOTICED_WITHIN`].
const COSTLY_TERMS: usize = 2_000;

/// Terms of the pipelining asker's query: a scan long enough (under a second
/// in a release build) for its next frame to wait unread meanwhile.
const PIPELINED_TERMS: usize = 300;

/// Far less than the scan of [`COSTLY_TERMS`] takes, yet ample for noticing
/// the asker left (checked every 100 ms).
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

fn query_frame(text: &str) -> Vec<u8> {
    let msg = Msg {
        query: Some(PbQuery {
            string: Some(text.into()),
        }),
        ..Msg::default()
    };
    frame(&msg.encode_to_vec())
}

fn event_frame(host: &str) -> Vec<u8> {
    let msg = Msg {
        events: vec![PbEvent {
            host: Some(host.into()),
            service: Some("cpu".into()),
            ttl: Some(600.0),
            ..PbEvent::default()
        }],
        ..Msg::default()
    };
    frame(&msg.encode_to_vec())
}

async fn read_reply(stream: &mut TcpStream) -> Msg {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.expect("reply length");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).await.expect("reply body");
    Msg::decode(body.as_slice()).expect("reply decodes")
}

/// `name`'s value in `GET /metrics`.
async fn metric(http: SocketAddr, name: &str) -> u64 {
    let text = common::metrics_text(http).await;
    let line = text.lines().find(|l| l.split(' ').next() == Some(name));
    let value = line.and_then(|l| l.split(' ').nth(1));
    value
        .unwrap_or_else(|| panic!("{name} in {text}"))
        .parse()
        .unwrap()
}

/// Waits until one scan was abandoned: a scan that ran in full would count
/// nothing, and take far longer.
async fn wait_abandoned(v: &Vigil) {
    let http = v.http.unwrap();
    let waited = tokio::time::timeout(NOTICED_WITHIN, async {
        while metric(http, "vigil_index_scans_abandoned_total").await == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "no scan abandoned; {}", v.logs());
    assert_eq!(metric(http, "vigil_index_scans_timed_out_total").await, 0);
}

/// Another connection is still answered.
async fn still_answers(v: &Vigil) {
    let mut client = Client::connect(v.tcp).await.unwrap();
    let asked = tokio::time::timeout(NOTICED_WITHIN, client.query(r#"host = "web7""#));
    let found = asked.await.expect("answered in time").unwrap();
    assert_eq!(found.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scan_whose_tcp_asker_closed_the_connection_is_abandoned() {
    let v = Vigil::start(&["--query-timeout", QUERY_TIMEOUT]);
    fill(&v).await;
    let mut asker = TcpStream::connect(v.tcp).await.unwrap();
    asker
        .write_all(&query_frame(&costly(COSTLY_TERMS)))
        .await
        .unwrap();
    drop(asker);
    wait_abandoned(&v).await;
    still_answers(&v).await;
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
    drop(ws);
    wait_abandoned(&v).await;
    still_answers(&v).await;
}

/// The event frame comes while the scan runs, and waits unread in the
/// socket: data, not a close.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipelining_asker_gets_its_answer_then_the_next_reply() {
    let v = Vigil::start(&["--query-timeout", QUERY_TIMEOUT]);
    fill(&v).await;
    let mut asker = TcpStream::connect(v.tcp).await.unwrap();
    asker
        .write_all(&query_frame(&costly(PIPELINED_TERMS)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    asker.write_all(&event_frame("after")).await.unwrap();
    let answer = read_reply(&mut asker).await;
    assert_eq!(
        (answer.ok, answer.events.len()),
        (Some(true), 1),
        "{answer:?}"
    );
    let ack = read_reply(&mut asker).await;
    assert_eq!((ack.ok, ack.events.len()), (Some(true), 0), "{ack:?}");
    let http = v.http.unwrap();
    assert_eq!(metric(http, "vigil_index_scans_abandoned_total").await, 0);
    let mut client = Client::connect(v.tcp).await.unwrap();
    let found = client.query(r#"host = "after""#).await.unwrap();
    assert_eq!(found.len(), 1, "the frame after the query was handled");
}
