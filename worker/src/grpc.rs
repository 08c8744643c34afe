//! Serving gRPC on a listener bound beforehand, so that a role knows (and can
//! advertise in its Lease) the port it got, even when it asked for port 0.

/// The accepted connections of `listener`, as tonic's `serve_with_incoming*` takes them.
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        Some((listener.accept().await.map(|(stream, _)| stream), listener))
    })
}
