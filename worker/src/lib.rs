//! Ballast's data plane: the roles `ballast-worker` runs and what they share —
//! the wire format, membership Leases, health endpoints, dependency probes
//! (also used by the operator) and logging.
#![forbid(unsafe_code)]

pub mod health;
pub mod membership;
pub mod probe;
pub mod roles;
pub mod routing;
pub mod shedding;
pub mod telemetry;

/// gRPC messages and services of `proto/ballast.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod wire {
    tonic::include_proto!("ballast.v1");
}
