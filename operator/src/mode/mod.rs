//! The mode of each dependency: a pure state machine fed by probe results.

pub mod machine;

pub use machine::{Input, Machine, Observation, Thresholds};
