//! Counters of what vigil itself did: what arrived, what was refused and why.
//! Lock-free atomics bumped on the hot path; read by logs (and later the
//! Prometheus endpoint and self-metric events).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        impl Stats {
            /// Every counter by name, for logging and exposition.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$( (stringify!($name), self.$name.load(Ordering::Relaxed)), )*]
            }
        }
    };
}

counters! {
    /// TCP connections accepted since start.
    tcp_connections,
    /// TCP connections open now.
    tcp_connections_open,
    /// `Msg` frames read over TCP.
    tcp_messages,
    /// Events received over TCP.
    tcp_events,
    /// Datagrams received over UDP.
    udp_datagrams,
    /// Events received over UDP.
    udp_events,
    /// Frames or datagrams whose protobuf did not decode.
    decode_errors,
    /// TCP length prefixes over the maximum frame size (connection closed).
    frames_oversized,
    /// TCP connections that closed in the middle of a frame.
    frames_truncated,
    /// UDP datagrams over the maximum datagram size, dropped.
    udp_oversized,
    /// Queries answered.
    queries,
    /// Queries refused because they did not parse.
    query_errors,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn incr(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    pub fn decr(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
