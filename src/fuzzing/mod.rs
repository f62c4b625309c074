//! The properties the fuzz targets in `fuzz/` check, one module per target.
//!
//! They live in the library, not in the targets, so that `cargo test` (which runs on stable,
//! without libFuzzer) checks them on every committed seed in `fuzz/seeds/<target>/` too. Each
//! module's `check` panics only when a property is broken; any input is otherwise fine.
//! Not an API: hidden from the docs, and free to change with the targets.

pub mod range_headers;
pub mod request_head;
