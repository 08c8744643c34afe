//! Ballast's data plane: the roles `ballast-worker` runs and what they share:
//! the wire format, the compute engine, the KV store and result stores. What
//! the operator shares with it (Leases, health endpoints, probes, logging) is
//! in `ballast-node`, re-exported here.
#![forbid(unsafe_code)]

pub use ballast_node::{connect, health, leader, master_report, membership, probe, secret, telemetry};

pub mod auth;
pub mod cold;
pub mod compute;
pub mod es;
pub mod grpc;
pub mod kv;
pub mod members;
pub mod modes;
pub mod results;
pub mod roles;
pub mod routing;
pub mod shedding;

/// gRPC messages and services of `proto/ballast.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod wire {
    tonic::include_proto!("ballast.v1");
}

impl wire::ChangeEvent {
    /// An insert of a row with `columns` (a JSON object) into `table`, for `merchant`, at `time_ms`.
    pub fn insert(
        id: impl Into<String>,
        merchant: impl Into<String>,
        table: impl Into<String>,
        time_ms: i64,
        columns: Vec<u8>,
    ) -> Self {
        Self {
            event_id: id.into(),
            merchant_id: merchant.into(),
            table: table.into(),
            op: wire::Operation::Insert.into(),
            event_time_ms: time_ms,
            columns,
        }
    }
}
