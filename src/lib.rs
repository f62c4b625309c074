//! binplz: any program in a Nix binary cache, served as one verified file.
//!
//! ```text
//!  GET /tree ─► server::routes (typed request) ─► index (program → store path, file)
//!     ─► cache::files: memory ─► disk ─► single flight per store path
//!     ─► extract: upstream narinfo ─► narinfo (signature, StorePath) ─► NAR stream
//!          ─► pipeline: codec (thread 1) ─► SHA-256 + nar::reader (thread 2) ─► temp file
//!          ─► NarHash/NarSize verified ─► resolve (symlinks) ─► verdict (portability)
//!     ─► server::respond: the file with its provenance, or an error as an sh script
//!
//!  GET /<hash>.narinfo, /nar/… ─► server::substituter ─► narinfo (checked, rewritten)
//!     ─► cache::nars: disk ─► one fetch per NAR, written and verified as it streams
//! ```
//!
//! Formats know nothing of HTTP, transports nothing of formats:
//!
//! | module | owns |
//! |---|---|
//! | [`nar`] | the NAR grammar: strict streaming reader, writer, listings (`.ls`) |
//! | [`codec`] | decompressors with bounded memory |
//! | [`narinfo`] | trust: which narinfos count |
//! | [`resolve`] | following symlinks inside (and out of) a store path |
//! | [`verdict`] | will the file run outside Nix? |
//! | [`pipeline`] | one verified pass over a NAR on two threads |
//! | [`upstream`] | fetching from binary caches (http, https, file, s3); the builder's API client |
//! | [`extract`] | narinfo + NAR + resolution + verdict: one verified file |
//! | [`index`] | evaluations → the program index file, and lookups in it |
//! | [`cache`] | keeping extracted files and whole NARs: disk, memory, single flight |
//! | [`server`] | HTTP: routes (programs, and the Nix binary cache ones), responses, limits, metrics |
//! | [`store`] | the operator's own cache (S3 or a directory): publishing to it, `gc` |
//! | [`bench`] | the NAR-extraction benchmark (`binplz bench`, `cargo bench --bench extract`) |
//! | [`builder`] | `binplz builder`: builds on demand, with budgets and failure memory |
//! | [`demo`] | the built-in demo cache |
//! | [`error`] | the error taxonomy the CLI and the server share |
//! | [`cli`] | the command line |

pub mod bench;
pub mod builder;
pub mod cache;
pub mod cli;
pub mod codec;
pub mod demo;
pub mod error;
pub mod extract;
/// The fuzz targets' properties, so that `cargo test` checks them on the committed seeds.
#[doc(hidden)]
pub mod fuzzing;
pub mod hash;
pub mod index;
pub mod nar;
pub mod narinfo;
pub mod pipeline;
pub mod resolve;
pub mod server;
pub mod store;
pub mod upstream;
pub mod verdict;
