//! The roles `ballast-worker` runs, one module each, each exposing `run(config, deps, shutdown)`.

pub mod collector;
pub mod intake;
pub mod slave;
pub mod startup;
