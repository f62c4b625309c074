//! `binplz publish` and `binplz gc`: the command-line faces of [`super::publish`] and
//! [`super::gc`].

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::Args;

use super::{gc, publish, GcOptions, PublishOptions, Store, StoreError};
use crate::cli::{parse_bytes, runtime, CliError, IndexLimitArgs};
use crate::index::Index;
use crate::upstream::ClientConfig;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The staging cache: a directory written by `nix copy --to file://DIR?secret-key=…`.
    #[arg(long, value_name = "DIR", env = "BINPLZ_PUBLISH_FROM")]
    from: PathBuf,

    /// The store: s3://BUCKET?region=…&endpoint=…&scheme=…&profile=… or file:///DIR.
    #[arg(long, value_name = "URI", env = "BINPLZ_STORE_URI")]
    to: String,

    /// Files larger than this are uploaded in parts (bytes; K, M, G suffixes).
    #[arg(long, value_name = "BYTES", env = "BINPLZ_MULTIPART_THRESHOLD", default_value = "16M", value_parser = parse_bytes)]
    multipart_threshold: u64,

    /// Leave the staging files in place after the upload.
    #[arg(long, env = "BINPLZ_PUBLISH_KEEP_STAGING")]
    keep_staging: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// The store: s3://BUCKET?… or file:///DIR.
    #[arg(long, value_name = "URI", env = "BINPLZ_STORE_URI")]
    store_uri: String,

    /// An index whose store paths (and their closures) are kept. May repeat; required.
    #[arg(
        long = "index",
        value_name = "PATH",
        env = "BINPLZ_INDEX",
        value_delimiter = ' ',
        required = true
    )]
    indexes: Vec<PathBuf>,

    /// Only the K newest of the indexes (by creation time) count [default: all].
    #[arg(long, value_name = "K", env = "BINPLZ_GC_KEEP_REVISIONS", value_parser = clap::value_parser!(u64).range(1..))]
    keep_revisions: Option<u64>,

    /// Anything uploaded more recently than this is kept (builds in flight): 0, or a
    /// number with s, m, h or d, at least 1h. With 0, a publication running at the same
    /// time may lose a NAR it found already there.
    #[arg(long, value_name = "DURATION", env = "BINPLZ_GC_GRACE", default_value = "1d", value_parser = parse_grace)]
    grace: Duration,

    /// Then delete the least recently built until the store holds at most this many bytes
    /// (never what the newest index needs).
    #[arg(long, value_name = "BYTES", env = "BINPLZ_GC_MAX_SIZE", value_parser = parse_bytes)]
    max_size: Option<u64>,

    /// Delete; without it, only print what would be deleted.
    #[arg(long, env = "BINPLZ_GC_DELETE")]
    delete: bool,

    #[command(flatten)]
    index_limit: IndexLimitArgs,
}

/// The shortest grace period but 0: shorter ones would let gc delete files of a
/// publication still in progress (a large NAR can take that long to upload).
const MIN_GRACE: Duration = Duration::from_secs(3600);

/// Parses `0`, or a number with `s`, `m`, `h` or `d` of at least [`MIN_GRACE`].
fn parse_grace(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let err = || format!("invalid duration {s:?}: expected 0, or a number with s, m, h or d");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let unit = match s.chars().last() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        Some('d') => 86400,
        _ => return Err(err()),
    };
    s[..s.len() - 1]
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .map(Duration::from_secs)
        .ok_or_else(err)
        .and_then(|d| {
            if d < MIN_GRACE {
                Err(format!(
                    "grace period {s:?} is shorter than 1h: uploads in progress would lose files \
                     (0 turns the grace period off, knowingly)"
                ))
            } else {
                Ok(d)
            }
        })
}

fn fail(e: StoreError) -> CliError {
    (e.kind(), e.to_string())
}

pub fn run_publish(args: PublishArgs) -> Result<(), CliError> {
    let store = Store::open(&args.to, &ClientConfig::default()).map_err(fail)?;
    let opts = PublishOptions {
        multipart_threshold: args.multipart_threshold,
        remove_staged: !args.keep_staging,
        fault: None,
    };
    let done = runtime()?
        .block_on(publish(&args.from, &store, &opts))
        .map_err(fail)?;
    eprintln!(
        "binplz: published {} files ({} bytes) to {}, {} already there",
        done.uploaded.len(),
        done.bytes,
        store.url(),
        done.skipped.len()
    );
    Ok(())
}

pub fn run_gc(args: GcArgs) -> Result<(), CliError> {
    let limit = args.index_limit.bytes()?;
    let indexes = args
        .indexes
        .iter()
        .map(|p| {
            Index::load(p, limit).map_err(|e| {
                fail(StoreError::Index {
                    path: p.display().to_string(),
                    err: e.to_string(),
                })
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let store = Store::open(&args.store_uri, &ClientConfig::default()).map_err(fail)?;
    let opts = GcOptions {
        indexes,
        keep_revisions: args
            .keep_revisions
            .map(|k| usize::try_from(k).unwrap_or(usize::MAX)),
        grace: args.grace,
        max_size: args.max_size,
        delete: args.delete,
        now: SystemTime::now(),
        fault: None,
    };
    let report = runtime()?.block_on(gc(&store, opts)).map_err(fail)?;
    let verb = if args.delete {
        "deleted"
    } else {
        "would delete"
    };
    for d in &report.doomed {
        println!("{verb} {}/{} ({} bytes)", store.url(), d.key, d.size);
    }
    let freed = if args.delete { "freed" } else { "would free" };
    println!(
        "{} store paths, {} files: {} bytes {freed}; {} store paths kept, {} bytes",
        report.paths_deleted,
        report.doomed.len(),
        report.bytes_freed,
        report.paths_kept,
        report.bytes_kept
    );
    if report.over_max_size > 0 {
        eprintln!(
            "binplz: warning: still {} bytes over --max-size: the newest index needs them",
            report.over_max_size
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_periods_take_days_and_zero() {
        assert_eq!(parse_grace("0"), Ok(Duration::ZERO));
        assert_eq!(parse_grace("1d"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_grace("36h"), Ok(Duration::from_secs(36 * 3600)));
        assert_eq!(parse_grace("3600s"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_grace("60m"), Ok(Duration::from_secs(3600)));
        for bad in ["", "d", "1", "1w", "-1d", "1.5h", "90s", "59m", "0s", "0h"] {
            assert!(parse_grace(bad).is_err(), "{bad:?}");
        }
    }
}
