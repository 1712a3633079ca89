//! Helpers shared by the trainer's tests and benchmark.

pub mod synthetic;
