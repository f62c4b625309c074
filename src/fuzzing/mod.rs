//! The properties the fuzz targets in `fuzz/` check, kept in the library so that
//! `cargo test` (on stable, without libFuzzer) checks them on the committed seeds in
//! `fuzz/seeds/` too. Each module has one `check(data)` that panics only when a property
//! is broken; the fuzz target is a one-line call to it. Not part of binplz's API.

pub mod request_head;
