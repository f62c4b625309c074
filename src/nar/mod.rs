//! The NAR format: a strict streaming reader, a small writer (used by tests and benchmarks),
//! and a listing of a NAR's tree (the same shape as a binary cache's `.ls` file).
//!
//! Nothing here knows about HTTP or caches: the reader takes any [`std::io::BufRead`].
//!
//! ```text
//! nar       = str("nix-archive-1") obj
//! obj       = str("(") str("type") ( regular | symlink | directory ) str(")")
//! regular   = str("regular") [ str("executable") str("") ] str("contents") str(DATA)
//! symlink   = str("symlink") str("target") str(TARGET)
//! directory = str("directory") { str("entry") str("(") str("name") str(NAME) str("node") obj str(")") }
//! str(s)    = u64 little-endian length, the bytes, zero padding to a multiple of 8
//! ```

pub mod listing;
pub mod ls;
pub mod reader;
pub mod wire;
pub mod writer;

#[cfg(test)]
mod tests;

pub use listing::{Listing, Node};
pub use reader::{read_nar, NarError, Visitor};
