//! The one error taxonomy the command line and the server share.
//!
//! Every layer has its own error type with structured context; each of them says which
//! [`ErrorKind`] it is, and only the edges (the CLI's exit codes, the server's statuses)
//! turn kinds into something else, each with one exhaustive `match`.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request itself is malformed (a bad store path, path or program name).
    BadRequest,
    /// Nothing by that name: not in the index, or not in the store path.
    UnknownProgram,
    /// Known, but its store path has not been built yet.
    NotBuilt,
    /// No configured cache has the store path.
    NotInCache,
    /// Refused on purpose: the file needs `/nix/store` at run time, or a symlink leads
    /// somewhere binplz will not follow.
    Refused,
    /// The upstream answered wrongly: bad status, broken transfer, unusable narinfo.
    UpstreamBroken,
    /// The bytes do not match what was signed: NarHash, NarSize, signature, NAR grammar.
    VerificationFailed,
    /// The upstream was too slow.
    TimedOut,
    /// binplz is at one of its limits.
    Overloaded,
    /// The build that would make it failed for good (until an operator retries it).
    BuildFailed,
    /// The client asked for more new builds than it may start in an hour.
    RateLimited,
    /// A local failure (disk, a bug).
    Internal,
}

impl ErrorKind {
    /// The command line's exit status for this kind.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Internal => 1,
            ErrorKind::BadRequest => 2,
            ErrorKind::UnknownProgram => 3,
            ErrorKind::NotBuilt => 4,
            ErrorKind::NotInCache => 4,
            ErrorKind::Refused => 5,
            ErrorKind::UpstreamBroken => 6,
            ErrorKind::VerificationFailed => 7,
            ErrorKind::TimedOut => 8,
            ErrorKind::Overloaded => 9,
            ErrorKind::BuildFailed => 10,
            ErrorKind::RateLimited => 11,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::BadRequest => "bad request",
            ErrorKind::UnknownProgram => "not found",
            ErrorKind::NotBuilt => "not built yet",
            ErrorKind::NotInCache => "not in any cache",
            ErrorKind::Refused => "refused",
            ErrorKind::UpstreamBroken => "upstream error",
            ErrorKind::VerificationFailed => "verification failed",
            ErrorKind::TimedOut => "upstream timed out",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::BuildFailed => "build failed",
            ErrorKind::RateLimited => "too many builds",
            ErrorKind::Internal => "internal error",
        })
    }
}
