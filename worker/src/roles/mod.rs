//! The roles `ballast-worker` runs, one module each, each exposing `run(config, deps, shutdown)`.

pub mod intake;
pub mod slave;
