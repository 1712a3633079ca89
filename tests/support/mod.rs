//! Helpers shared by the trainer's tests and benchmark.

pub mod fixture;
pub mod synthetic;
