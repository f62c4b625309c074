//! Publishing a build: from the `file://` staging cache Nix wrote (signed narinfos, NARs,
//! listings) and the build log, to the store URI the edges read (`--store-uri`).
//!
//! The one rule: **a narinfo never appears before its NAR.** NARs, listings, logs and
//! `nix-cache-info` go first; narinfos last. Every file lands by a rename from a temporary
//! file in the same directory, so a reader never sees half a file, and a crash leaves only
//! a stray temporary file (never a narinfo without its NAR).
//!
//! [`StoreUri`] is the seam for other stores: `file://` is here; `s3://` goes through
//! [`crate::store::publish_to`] (uploads in the same order, each narinfo after its NAR and
//! after the narinfos of its references), the staging side unchanged.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Where built outputs go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUri {
    /// A directory served as a binary cache (`file:///DIR`).
    File(PathBuf),
    /// A bucket, as Nix writes its URL (`s3://BUCKET?region=…&endpoint=…`).
    S3(String),
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("store URI {uri:?}: {reason}")]
    BadUri { uri: String, reason: &'static str },
    #[error("publishing {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("publishing to {uri}: {err}")]
    Store {
        uri: String,
        err: crate::store::StoreError,
    },
}

impl StoreUri {
    pub fn parse(uri: &str) -> Result<StoreUri, PublishError> {
        let bad = |reason| PublishError::BadUri {
            uri: uri.to_owned(),
            reason,
        };
        if uri.starts_with("s3://") {
            // Checked now, so that a bad URL stops the builder at start-up.
            crate::upstream::s3::S3Url::parse(uri).map_err(|_| bad("not a valid s3:// URL"))?;
            return Ok(StoreUri::S3(uri.to_owned()));
        }
        let path = uri
            .strip_prefix("file://")
            .ok_or_else(|| bad("only file:///DIR and s3://BUCKET?… are supported"))?;
        if !path.starts_with('/') {
            return Err(bad("a file:// URI needs an absolute path"));
        }
        if path.contains(['?', '#']) {
            return Err(bad("no query or fragment"));
        }
        Ok(StoreUri::File(PathBuf::from(path)))
    }
}

impl std::fmt::Display for StoreUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreUri::File(p) => write!(f, "file://{}", p.display()),
            StoreUri::S3(uri) => f.write_str(uri),
        }
    }
}

/// Publishes the staging cache `staging` (as `nix copy --to file://…` wrote it, plus
/// `log/<drv basename>`) to `store`: everything but narinfos first, narinfos last.
pub async fn publish(store: &StoreUri, staging: &Path) -> Result<(), PublishError> {
    match store {
        StoreUri::File(dir) => {
            let (dir, staging) = (dir.clone(), staging.to_owned());
            tokio::task::spawn_blocking(move || publish_dir(&dir, &staging))
                .await
                .map_err(|e| PublishError::Io {
                    path: "the staging cache".into(),
                    err: std::io::Error::other(e.to_string()),
                })?
        }
        StoreUri::S3(uri) => {
            // On a blocking thread of its own, driven by the runtime's handle: the upload's
            // future is not provably `Send` (its stream closures), so it cannot be part of
            // the build task's.
            let (uri, staging) = (uri.clone(), staging.to_owned());
            let handle = tokio::runtime::Handle::current();
            let shown = uri.clone();
            tokio::task::spawn_blocking(move || {
                handle.block_on(crate::store::publish_to(&staging, &uri))
            })
            .await
            .map_err(|e| PublishError::Io {
                path: "the staging cache".into(),
                err: std::io::Error::other(e.to_string()),
            })?
            .map(drop)
            .map_err(|err| PublishError::Store { uri: shown, err })
        }
    }
}

/// The staging cache's files, relative to it, in publishing order.
fn files_in_order(staging: &Path) -> Result<Vec<PathBuf>, PublishError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |err| PublishError::Io { path, err }
    };
    let mut first = Vec::new();
    let mut narinfos = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let abs = staging.join(&rel);
        for entry in std::fs::read_dir(&abs).map_err(io(&abs))? {
            let entry = entry.map_err(io(&abs))?;
            let kind = entry.file_type().map_err(io(&abs))?;
            let rel = rel.join(entry.file_name());
            if kind.is_dir() {
                dirs.push(rel);
            } else if kind.is_file() {
                if rel.extension().is_some_and(|e| e == "narinfo") {
                    narinfos.push(rel);
                } else {
                    first.push(rel);
                }
            }
        }
    }
    first.sort();
    narinfos.sort();
    first.extend(narinfos);
    Ok(first)
}

fn publish_dir(dest: &Path, staging: &Path) -> Result<(), PublishError> {
    for rel in files_in_order(staging)? {
        let to = dest.join(&rel);
        let io = |err| PublishError::Io {
            path: to.display().to_string(),
            err,
        };
        // Content-addressed or signed for the same store path: what is there stays (the
        // build log is the exception, as a rebuild writes a newer one).
        let is_log = rel.starts_with("log");
        if to.exists() && !is_log {
            continue;
        }
        let parent = to.parent().unwrap_or(dest);
        std::fs::create_dir_all(parent).map_err(io)?;
        let mut from = std::fs::File::open(staging.join(&rel)).map_err(io)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".binplz-publish-")
            .tempfile_in(parent)
            .map_err(io)?;
        std::io::copy(&mut from, &mut tmp).map_err(io)?;
        tmp.flush().map_err(io)?;
        // The NAR is on disk before the narinfo that points to it is renamed in place.
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&to).map_err(|e| io(e.error))?;
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_uris_are_file_urls_with_absolute_paths_or_buckets() {
        assert_eq!(
            StoreUri::parse("file:///srv/cache").expect("ok"),
            StoreUri::File("/srv/cache".into())
        );
        let s3 = "s3://builds?region=eu-west-1";
        assert_eq!(StoreUri::parse(s3).expect("ok"), StoreUri::S3(s3.into()));
        for bad in [
            "s3://",
            "http://x/",
            "file://rel",
            "/srv/cache",
            "file:///a?b=c",
        ] {
            assert!(StoreUri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn narinfos_come_last_and_existing_files_stay() {
        let staging = tempfile::tempdir().expect("tempdir");
        let dest = tempfile::tempdir().expect("tempdir");
        let s = staging.path();
        std::fs::create_dir_all(s.join("nar")).expect("mkdir");
        std::fs::create_dir_all(s.join("log")).expect("mkdir");
        std::fs::write(s.join("aaa.narinfo"), "narinfo").expect("write");
        std::fs::write(s.join("nar/zzz.nar.zst"), "nar").expect("write");
        std::fs::write(s.join("aaa.ls"), "ls").expect("write");
        std::fs::write(s.join("log/x.drv"), "new log").expect("write");
        std::fs::write(s.join("nix-cache-info"), "StoreDir: /nix/store\n").expect("write");
        let order = files_in_order(s).expect("lists");
        assert_eq!(
            order.last().map(PathBuf::as_path),
            Some(Path::new("aaa.narinfo"))
        );
        std::fs::write(dest.path().join("nix-cache-info"), "kept").expect("write");
        std::fs::create_dir_all(dest.path().join("log")).expect("mkdir");
        std::fs::write(dest.path().join("log/x.drv"), "old log").expect("write");
        publish_dir(dest.path(), s).expect("publishes");
        let read = |p: &str| std::fs::read_to_string(dest.path().join(p)).expect("read");
        assert_eq!(read("nar/zzz.nar.zst"), "nar");
        assert_eq!(read("aaa.narinfo"), "narinfo");
        assert_eq!(read("nix-cache-info"), "kept");
        assert_eq!(read("log/x.drv"), "new log");
    }
}
