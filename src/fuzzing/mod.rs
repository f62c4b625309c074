//! The properties the fuzz targets in `fuzz/` check, kept in the library so that
//! `cargo test` (which runs on stable, without `cargo fuzz`) checks them on the committed
//! seeds too, and so that a target needs nothing private. One module per target; each has
//! `check(data)`, which panics only when a property is broken.

pub mod index_loader;
