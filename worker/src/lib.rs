//! Ballast's data plane: the roles `ballast-worker` runs and the dependency
//! clients they share (also used by the operator's health probes).
#![forbid(unsafe_code)]

pub mod probe;
