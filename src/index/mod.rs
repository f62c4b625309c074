//! The program index: from a program name (and optionally an attribute and a system) to the
//! store path and file that provide it.
//!
//! A nightly job builds it ([`build`]) from a Nixpkgs evaluation ([`eval`]) and the binary
//! cache's listings; edge nodes load it ([`Index::load`]) and answer lookups in O(1) from
//! the file's own hash table ([`format`](mod@format)), without deserialising a million records.

pub mod build;
pub mod eval;
pub mod format;
pub mod names;

use std::fmt;

pub use format::{Index, IndexError, Lookup};

/// Most bytes a program name may have: longer names are not commands anyone types.
pub const MAX_PROGRAM_NAME: usize = 128;

/// A program name as it may appear in a URL and on disk: 1 to 128 bytes of
/// `[A-Za-z0-9._+-]`, not starting with `.` or `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProgramName(String);

impl ProgramName {
    pub fn parse(s: &str) -> Option<ProgramName> {
        let ok = !s.is_empty()
            && s.len() <= MAX_PROGRAM_NAME
            && !s.starts_with('.')
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b));
        ok.then(|| ProgramName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProgramName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One way to get a program: an attribute's output and the file in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub attr: String,
    /// Number of components of the attribute path (`python3Packages.black` has 2).
    pub attr_path_len: u32,
    pub main_program: Option<String>,
    /// The output's name (`out`, `bin`, …) and store path.
    pub output: String,
    pub output_path: String,
    /// Where the file is: the output itself, or a referenced store path its symlink leads to.
    pub store_path: String,
    /// The file inside `store_path`, after resolving symlinks.
    pub path: String,
    pub size: u64,
    pub executable: bool,
    /// The file's SHA-256, when the builder read the NAR (optional, for later use).
    pub sha256: Option<[u8; 32]>,
    /// Offset of the file's contents in the uncompressed NAR, when known.
    pub nar_offset: Option<u64>,
    /// The derivation that builds `output_path`, when the evaluation gave it.
    pub drv_path: Option<String>,
}

impl Candidate {
    /// Order of preference for `program`: the attribute named like the program, then the one
    /// whose `meta.mainProgram` is it, then the shortest attribute path, then lexicographic
    /// order; within one attribute the `bin` output before `out` before the others.
    pub fn rank<'a>(&'a self, program: &str) -> impl Ord + 'a {
        let output_rank = match self.output.as_str() {
            "bin" => 0,
            "out" => 1,
            _ => 2,
        };
        (
            self.attr != program,
            self.main_program.as_deref() != Some(program),
            self.attr_path_len,
            self.attr.len(),
            self.attr.as_str(),
            output_rank,
            self.output.as_str(),
        )
    }
}

/// An attribute output that is not in the cache yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotBuilt {
    pub system: String,
    /// The name a user would ask for: the attribute's last component or its `mainProgram`.
    pub program: String,
    pub attr: String,
    pub store_path: String,
    /// The derivation that builds `store_path` (what a builder is asked to build), when the
    /// evaluation gave it.
    pub drv_path: Option<String>,
}

/// An attribute that failed to evaluate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalFailure {
    pub system: String,
    pub attr: String,
    pub message: String,
}

/// What an index file says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Metadata {
    pub revision: Option<String>,
    pub systems: Vec<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub upstreams: Vec<String>,
    pub attributes: u64,
    pub outputs: u64,
    pub programs: u64,
    pub not_built: u64,
    pub failures: u64,
}
