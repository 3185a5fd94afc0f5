//! Helpers of the `gateway` benchmark. Kept in a folder without `main.rs` so that Cargo does
//! not take them for benchmarks of their own.

pub mod device;
pub mod node;
pub mod report;
