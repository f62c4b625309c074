//! Keeping extracted files: a content-addressed disk cache, a memory tier in front of it,
//! and single-flight so a herd of requests costs one upstream transfer.

pub mod disk;
pub mod files;
pub mod flight;
pub mod health;
