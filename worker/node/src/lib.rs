//! What every Ballast process runs, the operator and each worker role alike:
//! its leader and membership Leases, its `/healthz`, `/readyz` and `/metrics`
//! endpoints, its logs, and the probes of the dependencies it uses (the
//! operator probes with the data plane's own clients).
#![forbid(unsafe_code)]

pub mod connect;
pub mod health;
pub mod leader;
pub mod master_report;
pub mod membership;
pub mod probe;
pub mod secret;
pub mod telemetry;
