//! The roles `ballast-worker` runs, one module each, each exposing `run(config, deps, shutdown)`.

pub mod collector;
pub mod intake;
pub mod master;
pub mod slave;
pub mod startup;

/// What a role talks to besides its own servers.
#[derive(Clone)]
pub struct Deps {
    /// The Kubernetes API: pipeline, policy, published modes, membership.
    pub client: kube::Client,
}
