//! The data plane's gRPC transport: one server configuration for every role's
//! service, served on a listener bound beforehand (so that a role knows, and
//! can advertise in its Lease, the port it got even when it asked for port 0),
//! and one channel constructor for every client, so that no call to a peer
//! that accepts connections and never answers can hang its caller.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

/// Flow-control window of one call: a batch of a thousand events (~100 KiB)
/// fits, so it is not held back waiting for window updates mid-message.
const STREAM_WINDOW: u32 = 1 << 20;

/// Flow-control window of one connection, shared by its concurrent calls.
const CONNECTION_WINDOW: u32 = 4 << 20;

/// Metadata key of a refusal over budget (RESOURCE_EXHAUSTED): milliseconds
/// until the budget renews. A caller that waits that long, not less, does not
/// re-offer the same events within the interval that refused them (which the
/// backup intake would count as load and shed more merchants for).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// The wait a refusal asks for, if it carries one. Pure.
pub fn retry_after(status: &tonic::Status) -> Option<std::time::Duration> {
    let millis: u64 = status
        .metadata()
        .get(RETRY_AFTER_MS)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(millis))
}

/// Longest wait for a peer to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Deadline of one call that stores or moves events (a delivery, an ingest,
/// a hand-off): ample for a batch, short enough that a hung peer is routed
/// around within a few seconds.
pub const STORE_DEADLINE: Duration = Duration::from_secs(5);

/// A channel to `address` (`host:port`), connected on first use, that gives
/// up connecting after [`CONNECT_TIMEOUT`] and fails every call still
/// unanswered after `deadline` with DEADLINE_EXCEEDED. Creating it does no I/O,
/// so it may be made under a lock.
pub fn channel(address: &str, deadline: Duration) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(deadline)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    Ok(endpoint.connect_lazy())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_carries_its_retry_delay_or_none() {
        let mut status = tonic::Status::resource_exhausted("over budget");
        assert_eq!(retry_after(&status), None);
        status.metadata_mut().insert(RETRY_AFTER_MS, 250_i64.into());
        assert_eq!(retry_after(&status), Some(std::time::Duration::from_millis(250)));
        status
            .metadata_mut()
            .insert(RETRY_AFTER_MS, "soon".parse().expect("ascii"));
        assert_eq!(retry_after(&status), None, "an unreadable value is ignored");
    }
}
