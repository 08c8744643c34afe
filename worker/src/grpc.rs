//! The data plane's gRPC transport: one server configuration for every role's
//! service, served on a listener bound beforehand (so that a role knows, and
//! can advertise in its Lease, the port it got even when it asked for port 0).

/// Flow-control window of one call: a batch of a thousand events (~100 KiB)
/// fits, so it is not held back waiting for window updates mid-message.
const STREAM_WINDOW: u32 = 1 << 20;

/// Flow-control window of one connection, shared by its concurrent calls.
const CONNECTION_WINDOW: u32 = 4 << 20;

/// The server every role builds its gRPC service on.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
}

/// The accepted connections of `listener`, as tonic's `serve_with_incoming*`
/// takes them, with Nagle's algorithm off: a reply is a few small frames, and
/// holding one back for the peer's delayed ACK stalls the caller's next batch.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.and_then(|(stream, _)| {
            stream.set_nodelay(true)?;
            Ok(stream)
        });
        Some((accepted, listener))
    })
}
