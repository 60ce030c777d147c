//! vigil: a Riemann-compatible stream event processor.
//!
//! # Layout
//! Data flows one way: **ingest → event → streams (rules) → index / outputs**;
//! a query reads the index.
//!
//! - [`event`]: the one core `Event` type.
//! - [`clock`]: injected time, so expiry (and later windows and rates) run on a virtual clock in tests.
//! - [`proto`]: the Riemann protobuf schema and conversions at the edge.
//! - [`frame`]: the Riemann TCP framing (length prefix), growing only as bytes arrive.
//! - [`tcp`], [`udp`]: the Riemann transports (framing, accept loop, connection limits, datagrams).
//! - [`tls`]: TLS for the TCP transport (certificates from PEM, optional client certificates).
//! - [`grpc`]: the gRPC API (`proto/vigil.proto`): send, query, subscribe; its `Msg` kept encoded for the Riemann decoder.
//! - [`graphite_in`]: Graphite's plaintext lines in (`--graphite`, TCP and UDP), as Riemann's `graphite-server` takes them.
//! - [`ingest`]: what a decoded `Msg` means, shared by both transports.
//! - [`streams`]: the pipeline interface every batch of events goes through.
//! - [`index`]: the latest event per `(host, service)`, with TTL expiry.
//! - [`pubsub`]: live subscriptions to what the index stores and expires.
//! - [`event_queue`]: the queue of an output, bounded in events and bytes.
//! - [`query`]: Riemann's query language, compiled to a predicate.
//! - [`rules`]: the rule language: parser, compiler, stream stages, `vigil check`/`vigil test`.
//! - [`outputs`]: pager, graph, push and forward outputs behind bounded queues.
//! - [`cluster`]: scale-out over NATS JetStream: sharded ingest, shard leases, query fan-out.
//! - [`server`]: starts and stops the tasks above.
//! - [`snapshot`]: the index (and, through [`rules::persist`], the stream state) saved to disk and loaded again across restarts.
//! - [`client`]: a small Riemann TCP client.
//! - [`json`]: Riemann's JSON form of an event.
//! - [`limits`]: what one message may carry, checked alike on every ingest transport.
//! - [`stats`]: counters of what vigil itself did.
//! - [`selfmetrics`]: vigil's own numbers: rule latency, one sample for `/metrics`, self-metric events.
//! - [`http`]: the HTTP surface: index queries, WebSocket/SSE subscriptions, `POST /events`, `/metrics`, `/health`.
//! - [`budget`]: the memory large messages may hold while they arrive, shared by every transport.
//! - [`answers`]: the memory query answers may hold while their askers read them, shared by every transport.
//! - [`forwarded`]: who a client is behind a trusted reverse proxy (`--trusted-proxy`, `X-Forwarded-For`).
//! - [`bounded`]: bounds on HTTP and gRPC connections: how many, and how long a peer may leave writes unread.
//! - [`unread`]: HTTP/2 answers a client leaves unread on one stream while it reads the connection, dropped.
//! - [`files`]: files an operator names, read only when regular and within a size.
//! - [`blocking`]: long work (index scans, snapshot writes, the expiry tick) kept off the async workers.

pub mod answers;
pub mod blocking;
pub mod bounded;
pub mod budget;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod dial;
pub mod event;
pub mod event_queue;
pub mod files;
pub mod forwarded;
pub mod frame;
pub mod graphite_in;
pub mod grpc;
pub mod http;
pub mod index;
pub mod ingest;
pub mod json;
pub mod limits;
pub mod outputs;
pub mod proto;
pub mod pubsub;
pub mod query;
pub mod rules;
pub mod selfmetrics;
pub mod server;
pub mod snapshot;
pub mod stats;
pub mod streams;
pub mod tcp;
pub mod tls;
pub mod udp;
pub mod unread;
pub mod wire;

#[cfg(test)]
mod test_rng;
