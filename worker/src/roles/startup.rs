//! What every role does first: read its pipeline and that pipeline's policy,
//! and bind its listeners (port 0 picks a free one).

use std::net::SocketAddr;

use ballast_crds::{AnalyticsPipeline, DegradationPolicy};
use kube::api::Api;

/// Why a role could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The pipeline or its policy could not be read.
    #[error("reading {what}: {source}")]
    Read {
        /// What was read.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The pipeline `name` in `namespace` and the DegradationPolicy it names.
pub async fn pipeline(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(AnalyticsPipeline, DegradationPolicy), StartupError> {
    let read = |what: String| move |source| StartupError::Read { what, source };
    let aps: Api<AnalyticsPipeline> = Api::namespaced(client.clone(), namespace);
    let ap = aps
        .get(name)
        .await
        .map_err(read(format!("AnalyticsPipeline {name}")))?;
    let dps: Api<DegradationPolicy> = Api::namespaced(client.clone(), namespace);
    let policy = &ap.spec.policy_ref.name;
    let dp = dps
        .get(policy)
        .await
        .map_err(read(format!("DegradationPolicy {policy}")))?;
    Ok((ap, dp))
}

/// Binds `addr`; returns the listener and the port it got.
pub async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, u16), StartupError> {
    let bind = |source| StartupError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
    let port = listener.local_addr().map_err(bind)?.port();
    Ok((listener, port))
}

/// A bind error for `addr`.
pub fn bind_error(addr: SocketAddr) -> impl Fn(std::io::Error) -> StartupError {
    move |source| StartupError::Bind { addr, source }
}
