//! Extracting one verified file from a store path in an upstream cache (or a local NAR).
//!
//! ```text
//!  narinfo (≤ 64 KiB) ─► StorePath + signature check ─► NAR URL confined to the cache
//!      │
//!      ▼ async body ─► FileSize / FileHash hints ─► channel ─► pipeline::run_pass (2 threads)
//!      │
//!      ▼ NarHash + NarSize verified ─► resolve PATH in the listing ─┬─ file captured: done
//!                                                                 ├─ captured elsewhere: 2nd pass
//!                                                                 └─ /nix/store/<ref>/…: next path
//!      ▼
//!  portability verdict (refuse `/nix/store` run-time needs unless allowed)
//! ```

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use nix_derivation::StorePath;
use sha2::{Digest, Sha256};

use crate::codec::{Codec, CodecError};
use crate::error::ErrorKind;
use crate::nar::{ls, Listing};
use crate::narinfo::{self, NarInfoError, Trust, VerifiedNarInfo};
pub use crate::pipeline::Siblings;
use crate::pipeline::{self, Captured, Expected, PassResult, PipelineError};
use crate::resolve::{self, RelPath, ResolveError, Target};
use crate::upstream::{Cache, CachePath, UpstreamError};
use crate::verdict::{self, Linkage};

/// Async chunks buffered between the HTTP body and the decode thread (chunks are usually
/// 16–64 KiB, so this is at most a few MiB).
const BODY_CHANNEL_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("invalid store path {input:?}: expected /nix/store/<hash>-<name> or <hash>-<name>")]
    BadStorePath { input: String },
    #[error("{store_path} is not in any cache (tried {tried})")]
    NotInCache { store_path: String, tried: String },
    #[error("{cache}: the narinfo of {store_path} names a NAR the cache does not have")]
    NarMissing { cache: String, store_path: String },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    NarInfo(#[from] NarInfoError),
    #[error("{0}")]
    Codec(#[from] CodecError),
    #[error("{store_path}: {err}")]
    Pipeline {
        store_path: String,
        err: PipelineError,
    },
    #[error("{store_path}: the compressed NAR is larger than its FileSize of {limit} bytes")]
    FileSizeExceeded { store_path: String, limit: u64 },
    #[error("{store_path}: FileHash mismatch: expected sha256:{expected}, got sha256:{got}")]
    FileHashMismatch {
        store_path: String,
        expected: String,
        got: String,
    },
    #[error("{store_path}: data after the end of the compressed NAR")]
    TrailingData { store_path: String },
    #[error("{store_path}: {err}")]
    Resolve {
        store_path: String,
        err: ResolveError,
    },
    #[error("{store_path}: {path} leads to {target}, which is not one of its signed references")]
    NotAReference {
        store_path: String,
        path: RelPath,
        target: String,
    },
    #[error("{path} leads into {target}, which cannot be followed in a local NAR")]
    LocalReference { path: RelPath, target: String },
    #[error("{store_path}/{path} needs /nix/store at run time: {reason} (use --allow-nix-store-deps to extract it anyway)")]
    NeedsNixStore {
        store_path: String,
        path: RelPath,
        reason: String,
        linkage: Box<Linkage>,
    },
    #[error("cannot read {}: {err}", path.display())]
    NarFile { path: PathBuf, err: io::Error },
    #[error("{queued} upstream fetches are already waiting for a slot")]
    QueueFull { queued: usize },
    #[error("no upstream fetch slot came free within {waited:?}")]
    SlotWait { waited: std::time::Duration },
    #[error("{0}")]
    Local(#[from] io::Error),
}

impl ExtractError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ExtractError::BadStorePath { .. } => ErrorKind::BadRequest,
            ExtractError::NotInCache { .. } => ErrorKind::NotInCache,
            ExtractError::NarMissing { .. } => ErrorKind::UpstreamBroken,
            ExtractError::Upstream(e) => upstream_kind(e),
            ExtractError::NarInfo(
                NarInfoError::Parse(_)
                | NarInfoError::ControlCharacter { .. }
                | NarInfoError::NotSha256 { .. },
            ) => ErrorKind::UpstreamBroken,
            ExtractError::NarInfo(NarInfoError::Codec { .. }) => ErrorKind::UpstreamBroken,
            ExtractError::NarInfo(
                NarInfoError::WrongStorePath { .. }
                | NarInfoError::Unsigned { .. }
                | NarInfoError::UntrustedKeys { .. }
                | NarInfoError::BadSignature { .. },
            ) => ErrorKind::VerificationFailed,
            ExtractError::Codec(_) => ErrorKind::BadRequest,
            ExtractError::Pipeline { err, .. } => match err {
                PipelineError::Source(io) => match source_error(io) {
                    Some(FeedError::Upstream(e)) => upstream_kind(e),
                    Some(_) => ErrorKind::VerificationFailed,
                    None => ErrorKind::UpstreamBroken,
                },
                PipelineError::Local(_) | PipelineError::TempFile { .. } => ErrorKind::Internal,
                PipelineError::TooManyEntries(_) => ErrorKind::Refused,
                PipelineError::Decode { .. }
                | PipelineError::TooLong { .. }
                | PipelineError::Nar(_)
                | PipelineError::SizeMismatch { .. }
                | PipelineError::HashMismatch { .. } => ErrorKind::VerificationFailed,
            },
            ExtractError::FileSizeExceeded { .. }
            | ExtractError::FileHashMismatch { .. }
            | ExtractError::TrailingData { .. } => ErrorKind::VerificationFailed,
            ExtractError::Resolve { err, .. } => match err {
                ResolveError::NotFound { .. }
                | ResolveError::IsADirectory { .. }
                | ResolveError::NotADirectory { .. } => ErrorKind::UnknownProgram,
                ResolveError::Escapes { .. }
                | ResolveError::OutsideStore { .. }
                | ResolveError::NotAReference { .. }
                | ResolveError::Loop { .. }
                | ResolveError::TooManyHops => ErrorKind::Refused,
            },
            ExtractError::NotAReference { .. } | ExtractError::LocalReference { .. } => {
                ErrorKind::Refused
            }
            ExtractError::NeedsNixStore { .. } => ErrorKind::Refused,
            ExtractError::NarFile { .. } => ErrorKind::BadRequest,
            ExtractError::QueueFull { .. } | ExtractError::SlotWait { .. } => ErrorKind::Overloaded,
            ExtractError::Local(_) => ErrorKind::Internal,
        }
    }
}

fn upstream_kind(e: &UpstreamError) -> ErrorKind {
    if e.is_timeout() {
        ErrorKind::TimedOut
    } else {
        ErrorKind::UpstreamBroken
    }
}

/// Parses `/nix/store/<hash>-<name>` or `<hash>-<name>` (a trailing `/` is tolerated).
pub fn parse_store_path(input: &str) -> Result<StorePath, ExtractError> {
    let base = input
        .strip_prefix("/nix/store/")
        .unwrap_or(input)
        .trim_end_matches('/');
    if base.contains('/') {
        return Err(ExtractError::BadStorePath {
            input: input.to_owned(),
        });
    }
    StorePath::from_basename(base.as_bytes()).map_err(|_| ExtractError::BadStorePath {
        input: input.to_owned(),
    })
}

/// A verified file, still in its temp file.
#[derive(Debug)]
pub struct Extracted {
    /// The store path the file is in (after following symlinks into references);
    /// `None` for a local NAR.
    pub store_path: Option<StorePath>,
    pub path: RelPath,
    pub file: tempfile::NamedTempFile,
    pub size: u64,
    pub executable: bool,
    pub linkage: Linkage,
    /// The SHA-256 when the pass computed it; [`Extracted::sha256`] reads it otherwise.
    sha256: Option<[u8; 32]>,
}

impl Extracted {
    /// The file's SHA-256, read back from the verified temp file (see
    /// [`pipeline::sha256_of`] for why it is not computed during the pass).
    pub fn sha256(&self) -> io::Result<[u8; 32]> {
        match self.sha256 {
            Some(s) => Ok(s),
            None => pipeline::sha256_of(self.file.as_file()),
        }
    }
}

/// Extracts files from store paths in a list of caches, tried in order.
#[derive(Debug, Clone)]
pub struct Extractor {
    caches: Vec<Cache>,
    trust: Trust,
    allow_nix_store_deps: bool,
    /// Whole NARs kept locally (the server's, for Nix clients), read instead of fetching.
    local_nars: Option<Arc<dyn LocalNars>>,
}

/// Whole NARs kept on this machine, verified when kept.
pub trait LocalNars: Send + Sync + std::fmt::Debug {
    /// The kept NAR of `info` (compressed as its narinfo says), if there is one. Blocking.
    fn open(&self, info: &VerifiedNarInfo) -> Option<std::fs::File>;
}

/// What went wrong in the async feeder, carried through the pipeline as an `io::Error`.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error(transparent)]
    Upstream(UpstreamError),
    #[error("larger than FileSize")]
    FileSize { limit: u64 },
    #[error("FileHash mismatch")]
    FileHash { expected: [u8; 32], got: [u8; 32] },
}

fn source_error(io: &io::Error) -> Option<&FeedError> {
    let mut cur: &(dyn std::error::Error + 'static) = io.get_ref()?;
    loop {
        if let Some(f) = cur.downcast_ref::<FeedError>() {
            return Some(f);
        }
        cur = cur.source()?;
    }
}

impl Extractor {
    pub fn new(caches: Vec<Cache>, trust: Trust, allow_nix_store_deps: bool) -> Self {
        Extractor {
            caches,
            trust,
            allow_nix_store_deps,
            local_nars: None,
        }
    }

    /// Reads NARs from `local` when it has them, before asking an upstream.
    pub fn with_local_nars(mut self, local: Arc<dyn LocalNars>) -> Self {
        self.local_nars = Some(local);
        self
    }

    /// Fetches and verifies the narinfo of `store_path` from the first cache that has it.
    pub async fn narinfo(
        &self,
        store_path: &StorePath,
    ) -> Result<(Cache, VerifiedNarInfo), ExtractError> {
        let base = store_path.to_basename();
        self.find_narinfo(&base[..32], &store_path.to_absolute_path(), |bytes| {
            narinfo::verify(bytes, store_path, &self.trust)
        })
        .await
    }

    /// [`Extractor::narinfo`] for a store path known only by its hash part (as a Nix
    /// client asks a substituter): the narinfo's `StorePath` must have that hash.
    pub async fn narinfo_by_hash(
        &self,
        hash_part: &str,
    ) -> Result<(Cache, VerifiedNarInfo), ExtractError> {
        let described = format!("{}/{hash_part}-…", crate::upstream::STORE_DIR);
        self.find_narinfo(hash_part, &described, |bytes| {
            narinfo::verify_hash_part(bytes, hash_part, &self.trust)
        })
        .await
    }

    /// Fetches `path` (a side file: a listing, a build log) whole from the first cache that
    /// has it, caches that failed recently last; `None` when none has it. At most `limit`
    /// bytes.
    pub async fn side_file(
        &self,
        path: &CachePath,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, ExtractError> {
        let mut first_error = None;
        let (up, down): (Vec<&Cache>, Vec<&Cache>) = self.caches.iter().partition(|c| !c.is_down());
        for cache in up.into_iter().chain(down) {
            match cache.get_whole(path, limit).await {
                Ok(Some(bytes)) => return Ok(Some(bytes)),
                Ok(None) => {}
                Err(e) => {
                    first_error.get_or_insert(ExtractError::Upstream(e));
                }
            }
        }
        first_error.map_or(Ok(None), Err)
    }

    async fn find_narinfo(
        &self,
        hash_part: &str,
        described: &str,
        verify: impl Fn(&[u8]) -> Result<VerifiedNarInfo, narinfo::NarInfoError>,
    ) -> Result<(Cache, VerifiedNarInfo), ExtractError> {
        let store_path = described;
        // As Nix does with substituters: a cache that fails (or serves a narinfo that does
        // not verify) does not stop the search; its error is reported only if no other
        // cache has the path.
        let mut first_error: Option<ExtractError> = None;
        // Caches that failed recently are asked last: another cache that has the path
        // answers without waiting on them, and "not in any cache" is said only when every
        // cache said so (a cache that is down cannot, and its error is the answer).
        let (up, down): (Vec<&Cache>, Vec<&Cache>) = self.caches.iter().partition(|c| !c.is_down());
        for cache in up.into_iter().chain(down) {
            let error = match cache.narinfo(hash_part).await {
                Ok(Some(bytes)) => match verify(&bytes) {
                    Ok(info) => return Ok((cache.clone(), info)),
                    Err(e) => ExtractError::NarInfo(e),
                },
                Ok(None) => {
                    tracing::debug!(cache = cache.url(), %store_path, "not in this cache");
                    continue;
                }
                Err(e) => {
                    if !matches!(
                        e,
                        UpstreamError::StoreDir { .. } | UpstreamError::TooLarge { .. }
                    ) {
                        cache.mark_down();
                    }
                    ExtractError::Upstream(e)
                }
            };
            if self.caches.len() > 1 {
                tracing::warn!(cache = cache.url(), %store_path, err = %error, "cache failed; trying the next");
            }
            first_error.get_or_insert(error);
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        Err(ExtractError::NotInCache {
            store_path: store_path.to_owned(),
            tried: self
                .caches
                .iter()
                .map(Cache::url)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Asks each cache, in order, for `nix-cache-info` until one answers (a 404 is an
    /// answer: Nix accepts caches without the file). The error is the last cache's.
    pub async fn probe(&self) -> Result<(), UpstreamError> {
        let mut last = None;
        for cache in &self.caches {
            match cache.probe().await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        last.map_or(Ok(()), Err)
    }

    /// Extracts `path` from `store_path` into a temp file in `tmp_dir`. Nothing is returned
    /// before every NAR involved has been verified.
    pub async fn extract(
        &self,
        store_path: &StorePath,
        path: &RelPath,
        tmp_dir: &Path,
    ) -> Result<Extracted, ExtractError> {
        self.extract_with_siblings(store_path, path, None, tmp_dir)
            .await
            .map(|(e, _)| e)
    }

    /// [`Extractor::extract`], also keeping the `siblings` of the first NAR read (see
    /// [`Siblings`]): verified with it, and only those that run without `/nix/store`.
    pub async fn extract_with_siblings(
        &self,
        store_path: &StorePath,
        path: &RelPath,
        siblings: Option<&Siblings>,
        tmp_dir: &Path,
    ) -> Result<(Extracted, Vec<Extracted>), ExtractError> {
        let mut hops = 0;
        let first = store_path.clone();
        let mut store_path = store_path.clone();
        let mut path = path.clone();
        let mut extras = Vec::new();
        loop {
            let (cache, info) = self.narinfo(&store_path).await?;
            let sib = if store_path == first { siblings } else { None };
            let mut pass = self.pass(&cache, &info, Some(&path), sib, tmp_dir).await?;
            for c in pass.extras.drain(..) {
                // A sibling is a bonus: one that cannot be served is simply not kept.
                if let Ok(e) = finish(Some(store_path.clone()), String::new(), c, false) {
                    extras.push(e);
                }
            }
            let name = store_path.to_absolute_path();
            match resolve::resolve(&pass.listing, &path, &mut hops) {
                Err(err) => {
                    return Err(ExtractError::Resolve {
                        store_path: name,
                        err,
                    })
                }
                Ok(Target::File { path: found, .. }) => {
                    let captured = match pass.captured {
                        Some(c) if c.path == found => c,
                        // The file came before the symlink that leads to it: a second,
                        // independently verified pass for exactly that file.
                        _ => {
                            let again = self
                                .pass(&cache, &info, Some(&found), None, tmp_dir)
                                .await?;
                            captured_at(again, &found, &name)?
                        }
                    };
                    return Ok((self.finish(store_path, captured)?, extras));
                }
                Ok(Target::StorePath {
                    store_path: next,
                    rest,
                }) => {
                    if !info.references(&next) {
                        return Err(ExtractError::NotAReference {
                            store_path: name,
                            path,
                            target: next.to_absolute_path(),
                        });
                    }
                    store_path = next;
                    path = rest;
                }
            }
        }
    }

    fn finish(&self, store_path: StorePath, captured: Captured) -> Result<Extracted, ExtractError> {
        let name = store_path.to_absolute_path();
        finish(Some(store_path), name, captured, self.allow_nix_store_deps)
    }

    /// The tree of `store_path`: from the cache's `.ls` listing when it has one that agrees
    /// with the signed NarSize, otherwise from a verified walk of the NAR itself.
    pub async fn listing(
        &self,
        store_path: &StorePath,
    ) -> Result<(VerifiedNarInfo, Listing, ListingSource), ExtractError> {
        let (cache, info) = self.narinfo(store_path).await?;
        let rejected = match fetch_ls(&cache, &info).await {
            Ok(Some(listing)) => return Ok((info, listing, ListingSource::Ls)),
            Ok(None) => None,
            Err(reason) => {
                tracing::warn!(%store_path, %reason, "listing rejected, walking the NAR");
                Some(reason)
            }
        };
        let pass = self.pass(&cache, &info, None, None, Path::new(".")).await?;
        Ok((
            info,
            pass.listing,
            ListingSource::Nar {
                ls_rejected: rejected,
            },
        ))
    }

    /// One verified pass over the NAR of `info`, from `cache`, keeping the file at `wanted`
    /// (or, without one, only listing the NAR).
    async fn pass(
        &self,
        cache: &Cache,
        info: &VerifiedNarInfo,
        wanted: Option<&RelPath>,
        siblings: Option<&Siblings>,
        tmp_dir: &Path,
    ) -> Result<PassResult, ExtractError> {
        let store_path = info.store_path().to_absolute_path();
        if let Some(local) = &self.local_nars {
            let (local, i) = (local.clone(), info.clone());
            let expected = Expected {
                nar_hash: Some(info.nar_hash),
                nar_size: Some(info.nar_size),
            };
            let (codec, wanted, dir) = (info.codec, wanted.cloned(), tmp_dir.to_owned());
            let siblings = siblings.cloned();
            // Verified again as it is read: the pass checks NarHash whatever the source.
            let pass = tokio::task::spawn_blocking(move || {
                let file = local.open(&i)?;
                Some(match wanted {
                    Some(wanted) => pipeline::run_pass_with_siblings(
                        file,
                        codec,
                        expected,
                        &wanted,
                        siblings.as_ref(),
                        &dir,
                    ),
                    None => pipeline::list_nar(file, codec, expected),
                })
            })
            .await
            .map_err(|e| io::Error::other(format!("extraction thread failed: {e}")))?;
            match pass {
                Some(Ok(pass)) => return Ok(pass),
                Some(Err(err)) => {
                    tracing::warn!(%store_path, %err, "kept NAR failed; fetching it again");
                }
                None => {}
            }
        }
        let Some(mut fetched) = cache.nar(info.url(), info.nar_size).await? else {
            return Err(ExtractError::NarMissing {
                cache: cache.url().to_owned(),
                store_path,
            });
        };
        if let (Some(len), Some(limit)) = (fetched.len, info.file_size) {
            if len > limit {
                return Err(ExtractError::FileSizeExceeded { store_path, limit });
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(BODY_CHANNEL_DEPTH);
        let expected = Expected {
            nar_hash: Some(info.nar_hash),
            nar_size: Some(info.nar_size),
        };
        let (codec, wanted, dir) = (info.codec, wanted.cloned(), tmp_dir.to_owned());
        let siblings = siblings.cloned();
        let pass = tokio::task::spawn_blocking(move || {
            let source = ChannelReader {
                rx,
                cur: Bytes::new(),
            };
            match wanted {
                Some(wanted) => pipeline::run_pass_with_siblings(
                    source,
                    codec,
                    expected,
                    &wanted,
                    siblings.as_ref(),
                    &dir,
                ),
                None => pipeline::list_nar(source, codec, expected),
            }
        });
        let (file_size, file_hash) = (info.file_size, info.file_hash);
        let feed = async move {
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            loop {
                let err = match fetched.body.next_chunk().await {
                    Ok(Some(chunk)) => {
                        total += chunk.len() as u64;
                        if file_size.is_some_and(|l| total > l) {
                            FeedError::FileSize {
                                limit: file_size.unwrap_or_default(),
                            }
                        } else {
                            if file_hash.is_some() {
                                hasher.update(&chunk);
                            }
                            if tx.send(Ok(chunk)).await.is_err() {
                                return Err(None); // the pass stopped reading
                            }
                            continue;
                        }
                    }
                    Ok(None) => match file_hash {
                        Some(expected) => {
                            let got: [u8; 32] = hasher.finalize().into();
                            if got == expected {
                                return Ok(());
                            }
                            FeedError::FileHash { expected, got }
                        }
                        None => return Ok(()),
                    },
                    Err(e) => FeedError::Upstream(e),
                };
                // Tell the pass (so it stops) and the caller (so it reports this error).
                let report = match &err {
                    FeedError::Upstream(e) => FeedError::Upstream(e.clone()),
                    FeedError::FileSize { limit } => FeedError::FileSize { limit: *limit },
                    FeedError::FileHash { expected, got } => FeedError::FileHash {
                        expected: *expected,
                        got: *got,
                    },
                };
                let _ = tx.send(Err(io::Error::other(report))).await;
                return Err(Some(err));
            }
        };
        tokio::pin!(feed);
        tokio::pin!(pass);
        let mut fed = None;
        let result = loop {
            tokio::select! {
                r = &mut pass => break r,
                r = &mut feed, if fed.is_none() => fed = Some(r),
            }
        };
        let result =
            result.map_err(|e| io::Error::other(format!("extraction thread failed: {e}")))?;
        let pass = match result {
            Ok(pass) => pass,
            // A feed error is the cause; the pipeline only saw its echo.
            Err(err) => {
                if let Some(Err(Some(feed_err))) = fed {
                    return Err(feed_error(store_path, feed_err));
                }
                return Err(ExtractError::Pipeline { store_path, err });
            }
        };
        // The pass is verified; the body must also have ended cleanly, within its hints.
        let fed = match fed {
            Some(f) => f,
            None => feed.await,
        };
        match fed {
            Ok(()) => Ok(pass),
            Err(None) => Err(ExtractError::TrailingData { store_path }),
            Err(Some(e)) => Err(feed_error(store_path, e)),
        }
    }
}

fn feed_error(store_path: String, e: FeedError) -> ExtractError {
    match e {
        FeedError::Upstream(e) => ExtractError::Upstream(e),
        FeedError::FileSize { limit } => ExtractError::FileSizeExceeded { store_path, limit },
        FeedError::FileHash { expected, got } => ExtractError::FileHashMismatch {
            store_path,
            expected: crate::hash::nix32(&expected),
            got: crate::hash::nix32(&got),
        },
    }
}

fn captured_at(
    pass: PassResult,
    found: &RelPath,
    store_path: &str,
) -> Result<Captured, ExtractError> {
    match pass.captured {
        Some(c) if c.path == *found => Ok(c),
        _ => Err(ExtractError::Resolve {
            store_path: store_path.to_owned(),
            err: ResolveError::NotFound {
                path: found.clone(),
            },
        }),
    }
}

fn finish(
    store_path: Option<StorePath>,
    name: String,
    captured: Captured,
    allow_nix_store_deps: bool,
) -> Result<Extracted, ExtractError> {
    let mut file = captured.file;
    let linkage = verdict::inspect(file.as_file_mut())?;
    if !allow_nix_store_deps {
        if let Some(reason) = linkage.needs_nix_store() {
            return Err(ExtractError::NeedsNixStore {
                store_path: name,
                path: captured.path,
                reason,
                linkage: Box::new(linkage),
            });
        }
    }
    Ok(Extracted {
        store_path,
        path: captured.path,
        file,
        size: captured.size,
        executable: captured.executable,
        linkage,
        sha256: captured.sha256,
    })
}

/// Extracts `path` from a local NAR file (compressed or not; the codec is detected).
/// `nar_hash` is checked when given. Symlinks into other store paths cannot be followed.
pub fn extract_local(
    nar: &Path,
    nar_hash: Option<[u8; 32]>,
    path: &RelPath,
    tmp_dir: &Path,
    allow_nix_store_deps: bool,
) -> Result<Extracted, ExtractError> {
    let open = |wanted: &RelPath| -> Result<PassResult, ExtractError> {
        let unreadable = |err| ExtractError::NarFile {
            path: nar.to_owned(),
            err,
        };
        let mut file = std::fs::File::open(nar).map_err(unreadable)?;
        let mut head = [0u8; 32];
        let n = read_up_to(&mut file, &mut head).map_err(unreadable)?;
        let codec = Codec::sniff(&head[..n], nar.file_name().and_then(|n| n.to_str()))?;
        let file = io::Cursor::new(head[..n].to_vec()).chain(file);
        let expected = Expected {
            nar_hash,
            nar_size: None,
        };
        pipeline::run_pass(file, codec, expected, wanted, tmp_dir).map_err(|err| match err {
            // Reading the local file failed: the file's fault, not an upstream's.
            PipelineError::Source(err) => ExtractError::NarFile {
                path: nar.to_owned(),
                err,
            },
            err => ExtractError::Pipeline {
                store_path: nar.display().to_string(),
                err,
            },
        })
    };
    let pass = open(path)?;
    let name = nar.display().to_string();
    let mut hops = 0;
    let captured = match resolve::resolve(&pass.listing, path, &mut hops) {
        Err(err) => {
            return Err(ExtractError::Resolve {
                store_path: name,
                err,
            })
        }
        Ok(Target::StorePath { store_path, rest }) => {
            return Err(ExtractError::LocalReference {
                path: path.clone(),
                target: format!("{}/{rest}", store_path.to_absolute_path()),
            })
        }
        Ok(Target::File { path: found, .. }) => match pass.captured {
            Some(c) if c.path == found => c,
            _ => captured_at(open(&found)?, &found, &name)?,
        },
    };
    finish(None, name, captured, allow_nix_store_deps)
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Where a store path's listing came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListingSource {
    /// The cache's `.ls` file, checked against the signed NarSize.
    Ls,
    /// A verified walk of the NAR; `ls_rejected` says why a listing was not used.
    Nar { ls_rejected: Option<String> },
}

/// Fetches, decompresses, parses and checks `<hash>.ls`. `Ok(None)`: the cache has none.
async fn fetch_ls(cache: &Cache, info: &VerifiedNarInfo) -> Result<Option<Listing>, String> {
    let hash = &info.store_path().to_basename()[..32];
    let path = CachePath::parse(&format!("{hash}.ls")).map_err(|e| e.to_string())?;
    let Some(mut fetched) = cache.get(&path).await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let mut body = Vec::new();
    while let Some(chunk) = fetched.body.next_chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > ls::MAX_LS_SIZE {
            return Err(format!("larger than {} bytes", ls::MAX_LS_SIZE));
        }
        body.extend_from_slice(&chunk);
    }
    let nar_size = info.nar_size;
    let parsed = tokio::task::spawn_blocking(move || -> Result<Listing, String> {
        ls::parse_served(&body, nar_size).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?;
    parsed.map(Some)
}

/// The decode thread's view of the async body: a blocking `Read` over the channel.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.cur = chunk?,
                None => return Ok(0),
            }
        }
        let n = self.cur.len().min(buf.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}

/// Where extracted files are written before they are moved into place: the output
/// file's directory, so the final rename never crosses file systems.
pub fn temp_dir_for(output: Option<&Path>) -> PathBuf {
    match output.and_then(Path::parent) {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        Some(_) => PathBuf::from("."),
        None => std::env::temp_dir(),
    }
}
