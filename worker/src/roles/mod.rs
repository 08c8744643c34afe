//! The roles `ballast-worker` runs, one module each, each exposing `run(config, deps, shutdown)`.

pub mod collector;
pub mod intake;
pub mod master;
pub mod member;
pub mod nightly;
pub mod query;
pub mod replicator;
pub mod slave;
pub mod startup;

/// The roles `ballast-worker` has, as its subcommands name them (a test of the
/// binary keeps the two equal; the operator runs no workload for any other).
pub const NAMES: [&str; 8] = [
    "collector",
    "intake",
    "master",
    "member",
    "nightly",
    "query",
    "replicator",
    "slave",
];

/// What a role talks to besides its own servers.
#[derive(Clone)]
pub struct Deps {
    /// The Kubernetes API: pipeline, policy, published modes, membership.
    pub client: kube::Client,
}
