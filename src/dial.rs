//! Outbound TCP connections (carbon, forwarding, the client).
//!
//! On loopback, connecting to a port nothing listens on can succeed: when the
//! kernel picks that same port as the source, the socket opens to itself
//! (TCP simultaneous open) and swallows every write. An output retrying a dead
//! local peer would then count its points as delivered, so such a connection
//! is refused like the dead port it stands for.

use std::io;

use tokio::net::{TcpStream, ToSocketAddrs};

/// Connects to `addr`, refusing a connection to itself.
pub async fn connect(addr: impl ToSocketAddrs) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    refuse_self_connection(&stream)?;
    Ok(stream)
}

fn refuse_self_connection(stream: &TcpStream) -> io::Result<()> {
    let local = stream.local_addr()?;
    if local == stream.peer_addr()? {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("{local} answered as itself: nothing listens there"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpSocket;

    use super::*;

    /// The self-connection made on purpose: bound to a port, then connected
    /// to that same port.
    #[tokio::test]
    async fn a_socket_connected_to_itself_is_refused() {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap();
        let stream = socket.connect(port).await.expect("simultaneous open");
        assert_eq!(stream.peer_addr().unwrap(), port);
        let error = refuse_self_connection(&stream).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
        assert!(error.to_string().contains("answered as itself"), "{error}");
    }

    #[tokio::test]
    async fn a_listening_peer_is_connected() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = connect(listener.local_addr().unwrap()).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), listener.local_addr().unwrap());
    }
}
