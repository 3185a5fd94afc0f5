//! Helpers of the benchmarks. Kept in a folder without `main.rs` so that Cargo does not take
//! them for benchmarks of their own.
// Each benchmark compiles this whole folder but uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod device;
pub mod ingest;
pub mod node;
pub mod opts;
pub mod redis;
pub mod report;
