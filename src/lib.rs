//! multiclip: multimodal, multi-label classification on frozen vision-language backbones.
//!
//! Data flows one way: [`data`] -> [`backbone`] -> cache -> heads -> [`model`] -> train ->
//! evaluate / predict -> report. Stage 1 (`extract`) runs a frozen backbone once and writes a
//! memory-mapped cache; stage 2 trains small heads on that cache many times; a trained checkpoint
//! is a [`model::Model`] that scores inputs on its own, and [`classify`] puts it back on its live
//! backbone to label raw images and captions without a cache. [`spec`] is the grammar of
//! backbone, head and loss specs. The CLI (`src/main.rs`, `src/cli/`) and the HTTP server
//! (`src/serve/`) are thin layers on top.

pub mod backbone;
pub mod bf16_gemm;
pub mod cache;
pub mod classify;
pub mod data;
pub mod evaluate;
pub mod extract;
pub mod files;
pub mod heads;
pub mod labelled;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod parallel;
pub mod predict;
pub mod report;
pub mod runtime;
pub mod spec;
pub mod submission;
pub mod sweep;
pub mod tensor_ops;
pub mod train;
