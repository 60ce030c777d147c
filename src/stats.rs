//! Counters of what vigil itself did: what arrived, what was refused and why.
//! Lock-free atomics bumped on the hot path; read by logs (and later the
//! Prometheus endpoint and self-metric events).

use std::sync::atomic::{AtomicU64, Ordering};

/// A struct of counters (`AtomicU64`s) named `$stats`, with every counter
/// by name ([`Stats::snapshot`]) and its doc comment as help
/// ([`Stats::help`]), so exposition needs no change for a new one.
macro_rules! counters {
    ($(#[$meta:meta])* $stats:ident { $( $(#[doc = $doc:literal])* $name:ident ),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Default)]
        pub struct $stats {
            $( $(#[doc = $doc])* pub $name: ::std::sync::atomic::AtomicU64, )*
        }

        impl $stats {
            /// Every counter by name, for logging and exposition.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                use ::std::sync::atomic::Ordering::Relaxed;
                vec![$( (stringify!($name), self.$name.load(Relaxed)), )*]
            }

            /// What counter `name` counts: its doc comment, on one line
            /// (empty for an unknown name).
            pub fn help(name: &str) -> String {
                let doc: &str = match name {
                    $( stringify!($name) => concat!($($doc, "\n"),*), )*
                    _ => "",
                };
                doc.split_whitespace().collect::<Vec<_>>().join(" ")
            }
        }
    };
}
pub(crate) use counters;

counters! {
    /// What arrived and what was refused, by transport.
    Stats {
    /// TCP connections accepted since start.
    tcp_connections,
    /// TCP connections open now.
    tcp_connections_open,
    /// TCP connections refused (accepted and closed at once) over `--max-connections`.
    tcp_connections_refused,
    /// TCP connections closed for not completing a frame within `--read-timeout`.
    tcp_read_timeouts,
    /// TCP connections closed because replies could not be written within `--read-timeout`.
    tcp_write_timeouts,
    /// TLS handshakes completed (these connections count in `tcp_connections` too).
    tls_connections,
    /// TLS handshakes that failed or did not finish within `--read-timeout`.
    tls_handshake_failures,
    /// `SIGHUP`s whose TLS files (`--tls-cert`, `--tls-key`, `--tls-ca`) did
    /// not load; the listener kept the certificate it had.
    tls_reload_failures,
    /// `Msg` frames read over TCP.
    tcp_messages,
    /// Events received over TCP.
    tcp_events,
    /// Datagrams received over UDP.
    udp_datagrams,
    /// Events received over UDP.
    udp_events,
    /// `Msg`s received over gRPC (`Send` and `SendBatch`).
    grpc_messages,
    /// Events received over gRPC.
    grpc_events,
    /// Messages (frames, `POST /events` bodies, gRPC `Msg`s) whose events a
    /// cluster node could not store in JetStream: refused, for the sender to
    /// send again.
    cluster_not_stored,
    /// Cluster query questions from other nodes refused at once because
    /// this node already had 1 024 waiting behind the one it was answering.
    cluster_queries_refused_waiting,
    /// Cluster queries refused because this node got no scan turn in time:
    /// within the cluster query timeout for its own part of a query it
    /// asked, a fifth less for its answer to another node's.
    cluster_queries_refused_no_turn,
    /// Frames, datagrams, gRPC `Msg`s or gRPC query requests whose protobuf
    /// did not decode.
    decode_errors,
    /// Strings (host, service, state, description, tag, attribute, query)
    /// that were not UTF-8, taken with each invalid byte replaced by `?`
    /// (Riemann takes them too), so the rest of their message is not lost.
    strings_repaired,
    /// TCP length prefixes over the maximum frame size (connection closed).
    frames_oversized,
    /// TCP connections that closed in the middle of a frame.
    frames_truncated,
    /// UDP datagrams over the maximum datagram size, dropped.
    udp_oversized,
    /// UDP datagrams the kernel dropped before vigil read them (the socket's
    /// receive buffer was full), as Linux counts them; read every second.
    udp_receive_drops,
    /// `Msg`s (TCP, UDP, gRPC) and `POST /events` requests refused for more
    /// events than `--max-events-per-msg`.
    msgs_over_max_events,
    /// `Msg`s and `POST /events` lines refused for an event with more tags than `--max-tags`.
    msgs_over_max_tags,
    /// `Msg`s and `POST /events` lines refused for an event with more
    /// attributes than `--max-attributes`.
    msgs_over_max_attributes,
    /// `Msg`s, `POST /events` lines, Graphite lines (their path) and HTTP or
    /// gRPC queries refused for a string longer than `--max-string`.
    msgs_over_max_string,
    /// Graphite (`--graphite`) TCP connections accepted since start.
    graphite_connections,
    /// Graphite TCP connections open now.
    graphite_connections_open,
    /// Graphite TCP connections refused (accepted and closed at once) over
    /// `--max-connections`.
    graphite_connections_refused,
    /// Graphite TCP connections closed for not ending a line begun within
    /// `--read-timeout`.
    graphite_read_timeouts,
    /// Points (lines that became events) received over Graphite, TCP and UDP.
    graphite_events,
    /// Graphite points dropped because a cluster node could not store them
    /// in JetStream (a line has no ack to refuse it with).
    graphite_events_dropped,
    /// Graphite lines refused as malformed: too many fields, a blank path,
    /// no value or timestamp, or one that is not a number.
    graphite_lines_invalid,
    /// Graphite lines dropped for a `nan` value, as Riemann and carbon drop them.
    graphite_lines_nan,
    /// Graphite lines over 16 KiB (carbon's limit), dropped as they arrived.
    graphite_lines_oversized,
    /// Graphite TCP connections that closed in the middle of a line (its
    /// start dropped, as carbon and Riemann drop it).
    graphite_lines_truncated,
    /// Graphite UDP datagrams the kernel dropped before vigil read them
    /// (the socket's receive buffer was full), as Linux counts them; read
    /// every second.
    graphite_udp_receive_drops,
    /// Queries asked (subscriptions' included) within `--max-string`;
    /// `query_errors` of them were refused.
    queries,
    /// Queries refused: they did not parse, matched more index entries than
    /// `--max-query-results`, or scanned for longer than `--query-timeout`.
    query_errors,
    /// Events accepted by `POST /events`.
    http_events,
    /// `POST /events` lines refused (bad JSON or a field of the wrong type).
    http_event_errors,
    /// HTTP requests refused for a missing or wrong bearer token.
    http_unauthorized,
    /// HTTP connections refused (accepted and closed at once) over `--max-connections`.
    http_connections_refused,
    /// HTTP connections (responses, WebSocket and SSE subscribers) closed because
    /// the client read nothing for `--read-timeout`.
    http_write_timeouts,
    /// HTTP/1 connections closed because the peer acknowledged nothing for
    /// twice `--read-timeout`: it vanished (host down, link cut). An HTTP/2
    /// peer's unanswered keepalive ping closes it sooner, uncounted.
    http_peers_vanished,
    /// HTTP connections closed because a request (its head, or a posted body)
    /// did not arrive within `--read-timeout`, idle keep-alive ones included.
    http_read_timeouts,
    /// HTTP/2 responses (and SSE subscriptions) on the HTTP listeners whose
    /// client, while reading its connection, took nothing of them for
    /// `--read-timeout`, and query answers over 64 KiB (HTTP/1 too) not
    /// taken whole within it: dropped, their stream reset.
    http_responses_unread,
    /// WebSocket subscribers closed for sending more messages between two
    /// pings than a subscriber has reason to (a ping flood).
    http_websocket_floods,
    /// gRPC connections refused (accepted and closed at once) over `--max-connections`.
    grpc_connections_refused,
    /// gRPC connections closed because the client read nothing for `--read-timeout`.
    grpc_write_timeouts,
    /// gRPC responses (and subscriptions, and `Send` streams' acks) whose
    /// client, while reading its connection, took nothing of them for
    /// `--read-timeout`, and `Query` answers over 64 KiB not taken whole
    /// within it: dropped, their stream reset.
    grpc_responses_unread,
    /// gRPC connections closed because the client sent nothing within
    /// `--read-timeout` of connecting.
    grpc_read_timeouts,
    /// Writes of `--data-dir` files that failed (a full disk, say): the index
    /// snapshot, the stream state, a pager's incidents. The file written
    /// last stays; the log says which and why.
    state_write_failures,
    /// WebSocket, SSE and gRPC subscriptions opened.
    subscriptions,
    /// Subscriptions refused because their snapshot did not fit in
    /// `--max-subscriber-memory` beside what subscribers held, or because
    /// their query was found too costly for a live subscription within the
    /// last minute (those also counted as `vigil_subscriptions_refused_costly_total`).
    subscriptions_refused,
    /// Messages over 64 KiB (TCP frames, `POST /events` bodies, gRPC `Msg`s)
    /// that waited for room in `--max-message-memory` before being read on.
    messages_waited_for_memory,
    /// Messages over 64 KiB that, once they had room in `--max-message-memory`,
    /// fell behind the pace that brings them in within `--read-timeout` (a
    /// stalled sender: 5 s after getting it, 1 s while other messages wait
    /// for room), and gave it back: the TCP connection closed, the gRPC call
    /// failed, `POST /events` got `408`.
    messages_too_slow,
    /// Bytes of `--max-message-memory` that large messages hold now (a gauge).
    message_bytes_held,
    /// Query answers over 64 KiB (TCP, `GET /index`, gRPC `Query`) refused
    /// as busy because the answers being sent filled `--max-answer-memory`.
    answers_refused_busy,
    /// Bytes of `--max-answer-memory` that query answers hold now, from
    /// their scan until their askers have read them (a gauge).
    answer_bytes_held,
    }
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn incr(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    pub fn decr(counter: &AtomicU64) {
        Self::sub(counter, 1);
    }

    /// For a gauge: what was added is taken away again.
    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    /// For a count kept elsewhere (the kernel's), copied in.
    pub fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
