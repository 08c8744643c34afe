//! Smoke tests: one per server of the local stack, each through the client crate Ballast uses.
//!
//! They need the stack (`make stack-up`, or just `make test`) and fail, never
//! skip, when a server is absent.

mod elasticsearch;
mod kafka;
mod kube_api;
mod mysql;
mod redis;

use std::time::{SystemTime, UNIX_EPOCH};

/// A name no earlier run used, so reruns against a long-lived stack never collide.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("{prefix}-{}-{nanos}", ballast_e2e::run_id())
}
