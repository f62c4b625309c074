//! Whether the disk cache can write: failures counted by cause, one log line per cause,
//! and the degraded state `/-/readyz` reports.
//!
//! A node whose cache directory is full, read-only or gone still serves: verified files go
//! out from their temp files (in the spill directory, see `cache::files`) and from memory.
//! What it loses is the disk tier, so every miss of a file memory does not hold costs an
//! upstream download again. That is worth an operator's attention, not a restart, so it is
//! reported rather than fatal; the next write that works ends it.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

/// Why a write to the disk cache failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailure {
    /// No space (or quota) left on its file system.
    Full,
    /// Its file system is read-only, or writes are not permitted.
    ReadOnly,
    /// The cache directory (or one of its parts) is gone, or something else took its place.
    Missing,
    /// Anything else (an I/O error, say).
    Other,
}

impl WriteFailure {
    pub const ALL: [WriteFailure; 4] = [
        WriteFailure::Full,
        WriteFailure::ReadOnly,
        WriteFailure::Missing,
        WriteFailure::Other,
    ];

    /// The cause of a failed write.
    pub fn of(e: &io::Error) -> WriteFailure {
        match e.kind() {
            io::ErrorKind::StorageFull => WriteFailure::Full,
            io::ErrorKind::ReadOnlyFilesystem | io::ErrorKind::PermissionDenied => {
                WriteFailure::ReadOnly
            }
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => WriteFailure::Missing,
            _ if e.raw_os_error() == Some(rustix::io::Errno::DQUOT.raw_os_error()) => {
                WriteFailure::Full
            }
            _ => WriteFailure::Other,
        }
    }

    /// Its label in metrics.
    pub fn label(self) -> &'static str {
        match self {
            WriteFailure::Full => "full",
            WriteFailure::ReadOnly => "read_only",
            WriteFailure::Missing => "missing",
            WriteFailure::Other => "other",
        }
    }

    /// What it means, for people.
    pub fn describe(self) -> &'static str {
        match self {
            WriteFailure::Full => "its file system is full",
            WriteFailure::ReadOnly => "its file system is read-only",
            WriteFailure::Missing => "its directory is missing",
            WriteFailure::Other => "writing to it fails",
        }
    }

    fn index(self) -> usize {
        match self {
            WriteFailure::Full => 0,
            WriteFailure::ReadOnly => 1,
            WriteFailure::Missing => 2,
            WriteFailure::Other => 3,
        }
    }
}

/// The disk cache cannot write, since a while.
#[derive(Debug, Clone)]
pub struct Degraded {
    pub cause: WriteFailure,
    /// Time since the first failure of this cause with no write working since.
    pub since: Duration,
    /// The last failure's error.
    pub error: String,
}

/// A cause already logged is logged again at most this often: on a disk filled by
/// something else, each keep can free room for one file and the next miss fail again,
/// and one line per miss would bury everything else in the log.
const LOG_EVERY: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Episode {
    cause: WriteFailure,
    since: Instant,
    error: String,
    /// Its start was logged, so its end is too.
    logged: bool,
}

#[derive(Debug, Default)]
struct State {
    /// Set from a failure until the next write that works.
    episode: Option<Episode>,
    /// When each cause was last logged.
    logged_at: [Option<Instant>; WriteFailure::ALL.len()],
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct Health {
    failures: [AtomicU64; WriteFailure::ALL.len()],
    state: Mutex<State>,
}

impl Health {
    /// Counts a failed write and returns its cause. Logged when the cause is new (the
    /// first failure, or another cause than the last one) and was not logged in the last
    /// [`LOG_EVERY`]; repeats are not, since every miss would log them again while the
    /// disk stays as it is.
    pub fn failed(&self, what: &'static str, e: &io::Error) -> WriteFailure {
        let cause = WriteFailure::of(e);
        self.failures[cause.index()].fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *state;
        match state.episode.as_mut() {
            Some(ep) if ep.cause == cause => {
                ep.error = e.to_string();
                debug!(what, cause = cause.label(), err = %e, "disk cache write failed again");
            }
            _ => {
                let last = &mut state.logged_at[cause.index()];
                let log = last.is_none_or(|t| t.elapsed() >= LOG_EVERY);
                if log {
                    *last = Some(Instant::now());
                    warn!(
                        what,
                        cause = cause.label(),
                        err = %e,
                        "the disk cache cannot write: {}; serving without keeping files on disk",
                        cause.describe()
                    );
                } else {
                    debug!(what, cause = cause.label(), err = %e, "disk cache write failed");
                }
                state.episode = Some(Episode {
                    cause,
                    since: Instant::now(),
                    error: e.to_string(),
                    logged: log,
                });
            }
        }
        cause
    }

    /// A write worked: ends a degraded state, if any.
    pub fn ok(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(ep) = state.episode.take() {
            if ep.logged {
                info!(
                    cause = ep.cause.label(),
                    after_s = ep.since.elapsed().as_secs(),
                    "the disk cache writes again"
                );
            }
        }
    }

    /// Whether the last write failed, and why.
    pub fn degraded(&self) -> Option<Degraded> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.episode.as_ref().map(|ep| Degraded {
            cause: ep.cause,
            since: ep.since.elapsed(),
            error: ep.error.clone(),
        })
    }

    /// Failed writes of one cause since start-up.
    pub fn failures(&self, cause: WriteFailure) -> u64 {
        self.failures[cause.index()].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::io::Errno;

    fn os(e: Errno) -> io::Error {
        io::Error::from_raw_os_error(e.raw_os_error())
    }

    #[test]
    fn write_errors_are_told_apart_by_cause() {
        for (e, cause) in [
            (Errno::NOSPC, WriteFailure::Full),
            (Errno::DQUOT, WriteFailure::Full),
            (Errno::ROFS, WriteFailure::ReadOnly),
            (Errno::ACCESS, WriteFailure::ReadOnly),
            (Errno::NOENT, WriteFailure::Missing),
            (Errno::NOTDIR, WriteFailure::Missing),
            (Errno::IO, WriteFailure::Other),
        ] {
            assert_eq!(WriteFailure::of(&os(e)), cause, "{e:?}");
        }
        // As tempfile reports them: the kind kept, the OS error wrapped.
        let wrapped = io::Error::new(io::ErrorKind::StorageFull, "at path /x");
        assert_eq!(WriteFailure::of(&wrapped), WriteFailure::Full);
    }

    #[test]
    fn a_failure_degrades_until_a_write_works_and_every_one_is_counted() {
        let h = Health::default();
        assert!(h.degraded().is_none());
        h.failed("test", &os(Errno::NOSPC));
        h.failed("test", &os(Errno::NOSPC));
        h.failed("test", &os(Errno::ROFS));
        let d = h.degraded().expect("degraded");
        assert_eq!(d.cause, WriteFailure::ReadOnly);
        assert_eq!(h.failures(WriteFailure::Full), 2);
        assert_eq!(h.failures(WriteFailure::ReadOnly), 1);
        assert_eq!(h.failures(WriteFailure::Missing), 0);
        h.ok();
        assert!(h.degraded().is_none());
        assert_eq!(h.failures(WriteFailure::Full), 2, "counts stay");
    }
}
