//! multiclip: multimodal, multi-label classification on frozen vision-language backbones.
//!
//! Data flows one way: [`data`] -> [`backbone`] -> cache -> heads/train -> metrics -> predict.
//! Stage 1 (`extract`) runs a frozen backbone once and writes a memory-mapped cache; stage 2
//! trains small heads on that cache many times. The CLI (`src/main.rs`) is a thin layer on top.

pub mod backbone;
pub mod bf16_gemm;
pub mod cache;
pub mod data;
pub mod extract;
pub mod heads;
pub mod loss;
pub mod metrics;
pub mod pipeline;
pub mod predict;
pub mod report;
pub mod runtime;
pub mod train;
