//! A minimal Riemann TCP client, plain or TLS: send events, run queries. Used
//! by the `send` and `query` subcommands and the `forward` output (and by
//! tests and tools).

use std::io;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::ToSocketAddrs;
use tokio_util::codec::Framed;

use crate::dial;
use crate::event::Event;
use crate::frame::{FrameCodec, FrameError};
use crate::proto::{self, Msg, PbQuery};
use crate::tcp;
use crate::tls::ClientTls;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Not a `source`: the text says it, and a chain printed (`anyhow`)
    /// would say it again, and its own cause a third time.
    #[error("connection failed: {0}")]
    Io(io::Error),
    #[error("server closed the connection before replying")]
    Closed,
    #[error("bad reply framing: {0}")]
    Frame(FrameError),
    #[error("undecodable reply: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("server error: {0}")]
    Server(String),
    #[error("the server answered in TLS: connect with TLS (--tls-ca; tls_ca for a forward)")]
    SpeaksTls,
    #[error(
        "the server answered in HTTP: this is an HTTP port (vigil's is --http); Riemann's protocol is on --tcp (5555)"
    )]
    SpeaksHttp,
}

/// What a client talks over: TCP, or TLS over TCP.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<FrameError> for ClientError {
    /// A failed read or write is the connection's (over TLS: an alert, the
    /// server refusing the client's certificate), not the reply's framing.
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => ClientError::Io(e),
            other => ClientError::Frame(other),
        }
    }
}

pub struct Client {
    framed: Framed<Box<dyn Connection>, FrameCodec>,
}

impl Client {
    /// A client that reads replies of up to the server's default `--max-frame`.
    pub async fn connect(addr: impl ToSocketAddrs) -> Result<Self, ClientError> {
        Self::connect_with(addr, None, tcp::DEFAULT_MAX_FRAME).await
    }

    /// A client over TLS with `tls` (plain TCP without), reading replies of
    /// up to `max_reply` bytes: a query's answer is as large as what it
    /// matched, which no frame limit bounds. A failed handshake (the
    /// server's certificate not trusted, or not for the name) is a
    /// connection error.
    pub async fn connect_with(
        addr: impl ToSocketAddrs,
        tls: Option<&ClientTls>,
        max_reply: usize,
    ) -> Result<Self, ClientError> {
        let socket = dial::connect(addr).await?;
        socket.set_nodelay(true)?;
        let connection: Box<dyn Connection> = match tls {
            Some(tls) => Box::new(tls.connect(socket).await?),
            None => Box::new(socket),
        };
        Ok(Self {
            framed: Framed::new(connection, tcp::codec(max_reply)),
        })
    }

    pub async fn send(&mut self, events: &[Event]) -> Result<(), ClientError> {
        self.call(Msg {
            events: events.iter().map(proto::to_pb).collect(),
            ..Msg::default()
        })
        .await
        .map(drop)
    }

    pub async fn query(&mut self, query: &str) -> Result<Vec<Event>, ClientError> {
        let reply = self
            .call(Msg {
                query: Some(PbQuery {
                    string: Some(query.to_owned()),
                }),
                ..Msg::default()
            })
            .await?;
        // Replies always carry times, so "now" is never used here.
        Ok(reply
            .events
            .into_iter()
            .map(|e| proto::from_pb(e, 0))
            .collect())
    }

    /// Whether what came back starts as a TLS record (an alert or a
    /// handshake, version 3.x): a TLS port's answer to plain text, which read
    /// as a length is hundreds of megabytes.
    fn answered_in_tls(&self) -> bool {
        matches!(
            self.framed.read_buffer().get(..2),
            Some([0x15 | 0x16, 0x03])
        )
    }

    /// Whether what came back starts as an HTTP response (an HTTP server's
    /// 400 to the frame), which read as a length is over a gigabyte.
    fn answered_in_http(&self) -> bool {
        self.framed.read_buffer().starts_with(b"HTTP")
    }

    async fn call(&mut self, msg: Msg) -> Result<Msg, ClientError> {
        self.framed.send(Bytes::from(msg.encode_to_vec())).await?;
        let frame = match self.framed.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(_)) if self.answered_in_tls() => return Err(ClientError::SpeaksTls),
            Some(Err(_)) if self.answered_in_http() => return Err(ClientError::SpeaksHttp),
            Some(Err(e)) => return Err(e.into()),
            None => return Err(ClientError::Closed),
        };
        let reply = Msg::decode(frame.freeze())?;
        if reply.ok == Some(true) {
            Ok(reply)
        } else {
            Err(ClientError::Server(reply.error.unwrap_or_default()))
        }
    }
}
