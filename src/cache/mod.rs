//! Keeping extracted files: a content-addressed disk cache, a memory tier in front of it,
//! and single-flight so a herd of requests costs one upstream transfer; the disk cache's
//! health (writes that fail) and its scrubber (bit rot); whole NARs kept for Nix clients
//! in the same disk cache (`nars`).

pub mod disk;
pub mod files;
pub mod flight;
pub mod health;
pub mod nars;
pub mod scrub;
