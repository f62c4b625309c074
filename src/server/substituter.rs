//! The Nix binary cache routes: this node as a substituter in front of its upstreams.
//!
//! ```text
//!  /nix-cache-info ─► StoreDir, WantMassQuery, Priority
//!  /<hash>.narinfo ─► narinfo cache (positive, and negative for a short while; one fetch
//!                     per hash at a time) ─► upstreams in order ─► signature + StorePath
//!                     checked ─► URL rewritten to nar/<hash>-<NarHash>.nar<ext>, re-signed
//!                     with --sign-key-file ─► text/x-nix-narinfo       (else 404, reason logged)
//!  /nar/<hash>-<NarHash>.nar<ext> ─► the checked narinfo again (its NarHash must be the
//!                     one named) ─► disk cache (Range) ─► or the one fetch under way
//!                     (cache::nars), followed as it grows; the last byte only once the
//!                     whole NAR is verified, a cut connection if it is not
//!  /<hash>.ls, /log/<drv> ─► passed through from the first upstream that has them, cached
//! ```
//!
//! A failure of the upstream is a 502 or 504, never a 500: Nix gives up on a cache that
//! answers 500, while it tries its next substituter after a 404. Bytes of a NAR leave
//! before the whole NAR is verified (the first byte does not wait for the last): a Nix
//! client hashes every NAR itself, and the transfer of one that fails here is cut, so the
//! client never sees a complete body for it.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use super::body::{Body, Chunks};
use super::conditional::{self, Answer};
use super::respond::{
    text, APPLICATION_JSON, NIX_CACHE_INFO, NIX_NAR, NIX_NARINFO, RETRY_AFTER_SECS, TEXT_PLAIN,
};
use super::routes::{CacheRequest, HashPart, NarName};
use super::App;
use crate::cache::disk::DiskCache;
use crate::cache::nars::{Flight, Nars, Progress};
use crate::error::ErrorKind;
use crate::extract::{ExtractError, Extractor};
use crate::narinfo::{self, SecretKey, VerifiedNarInfo};
use crate::upstream::{Cache, CachePath};

/// How long a checked narinfo is remembered. A store path's narinfo changes only when
/// its upstream re-signs or collects it.
const NARINFO_TTL: Duration = Duration::from_secs(600);

/// Bytes of narinfos remembered (found or not). Most are a few hundred bytes, but one
/// with many references or long unknown fields may be up to the 64 KiB fetch cap.
const NARINFO_BYTES: u64 = 64 << 20;

/// What a remembered narinfo costs beyond its text: the cache entry and the parsed
/// values' allocations.
const NARINFO_OVERHEAD: usize = 512;

/// Largest `.ls` listing passed through (one of a large package is a few MiB).
const MAX_LISTING: usize = 32 << 20;

/// Largest build log passed through.
const MAX_LOG: usize = 64 << 20;

/// Bytes of listings and logs kept in memory.
const SIDE_FILES_BYTES: u64 = 128 << 20;

/// Bytes read from a growing NAR at a time.
const FOLLOW_CHUNK: u64 = 256 << 10;

/// Chunks buffered per response ahead of the socket.
const FOLLOW_DEPTH: usize = 4;

/// Longest a reader waits for a fetch to move before it gives up on it. A backstop: the
/// fetch's own deadlines (a minimum rate over 30 s) end a stalled upstream sooner, so this
/// only frees the client's slot if a fetch ever stops without saying so.
const FOLLOW_IDLE: Duration = Duration::from_secs(120);

/// The substituter's settings.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// `Priority` in `nix-cache-info` (lower is preferred by Nix).
    pub priority: u32,
    /// This node's key: every narinfo it serves gets its signature.
    pub sign_key: Option<SecretKey>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            priority: 40,
            sign_key: None,
        }
    }
}

/// The substituter's options of `binplz serve`.
#[derive(Debug, clap::Args)]
pub struct SubstituterArgs {
    /// `Priority` this node announces in `nix-cache-info` (lower is preferred by Nix).
    #[arg(long, value_name = "N", env = "BINPLZ_PRIORITY", default_value_t = 40)]
    priority: u32,

    /// A Nix secret key (`nix key generate-secret`): every narinfo served gets this node's
    /// signature too, so that clients may trust only its public key.
    #[arg(long, value_name = "FILE", env = "BINPLZ_SIGN_KEY_FILE")]
    sign_key_file: Option<std::path::PathBuf>,
}

impl SubstituterArgs {
    /// The settings, the key read and checked.
    pub fn config(&self) -> Result<CacheConfig, String> {
        let sign_key = match &self.sign_key_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                let key =
                    SecretKey::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                Some(key)
            }
            None => None,
        };
        Ok(CacheConfig {
            priority: self.priority,
            sign_key,
        })
    }
}

/// A narinfo that checked out, and the upstream it came from.
struct Checked {
    cache: Cache,
    info: VerifiedNarInfo,
}

/// A remembered narinfo lookup.
#[derive(Clone)]
enum Lookup {
    Found(Arc<Checked>),
    /// No upstream has it, or none that verifies: why, for the log.
    Missing(Arc<str>),
}

/// Found narinfos live [`NARINFO_TTL`], missing ones the negative TTL.
struct Expiry {
    negative: Duration,
}

impl moka::Expiry<String, Lookup> for Expiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Lookup,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(match value {
            Lookup::Found(_) => NARINFO_TTL,
            Lookup::Missing(_) => self.negative,
        })
    }
}

/// The memory a remembered lookup of `hash` takes, about: the parsed narinfo holds each
/// field of its text about twice (a value and its parts).
fn narinfo_weight(hash: &str, lookup: &Lookup) -> u32 {
    let text = match lookup {
        Lookup::Found(c) => 2 * c.info.info.to_canonical_bytes().len(),
        Lookup::Missing(why) => why.len(),
    };
    u32::try_from(hash.len() + text + NARINFO_OVERHEAD).unwrap_or(u32::MAX)
}

/// The substituter's state, part of [`App`].
pub(super) struct State {
    config: CacheConfig,
    nars: Arc<Nars>,
    narinfos: moka::future::Cache<String, Lookup>,
    side_files: moka::future::Cache<String, Option<Bytes>>,
}

impl State {
    pub(super) fn new(config: CacheConfig, disk: Arc<DiskCache>, negative: Duration) -> State {
        State {
            config,
            nars: Arc::new(Nars::new(disk)),
            narinfos: moka::future::Cache::builder()
                .max_capacity(NARINFO_BYTES)
                .weigher(|hash: &String, lookup: &Lookup| narinfo_weight(hash, lookup))
                .expire_after(Expiry { negative })
                .build(),
            side_files: moka::future::Cache::builder()
                .max_capacity(SIDE_FILES_BYTES)
                .weigher(|k: &String, v: &Option<Bytes>| {
                    let len = k.len() + v.as_ref().map_or(0, Bytes::len);
                    u32::try_from(len).unwrap_or(u32::MAX)
                })
                .time_to_live(NARINFO_TTL)
                .build(),
        }
    }

    pub(super) fn nars(&self) -> &Arc<Nars> {
        &self.nars
    }
}

/// What went wrong, as the status a Nix client acts on. No wildcard: a new kind needs a
/// decision. Missing and unverifiable paths are 404s (the next substituter is tried).
fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::UnknownProgram
        | ErrorKind::NotInCache
        | ErrorKind::VerificationFailed
        | ErrorKind::Refused
        | ErrorKind::BuildFailed => StatusCode::NOT_FOUND,
        ErrorKind::NotBuilt | ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorKind::UpstreamBroken => StatusCode::BAD_GATEWAY,
        ErrorKind::TimedOut => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn failure(kind: ErrorKind, message: &str, head: bool) -> Response<Body> {
    let status = status_of(kind);
    let mut resp = text(status, TEXT_PLAIN, format!("{message}\n"), head);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
    }
    resp
}

fn not_found(head: bool) -> Response<Body> {
    failure(ErrorKind::NotInCache, "not in this cache", head)
}

/// Whether an upstream error means the path is simply not to be had (remembered for the
/// negative TTL), rather than the upstream failing (never remembered). A narinfo this node
/// cannot use (a compression it does not decode, a hash it does not check, one it cannot
/// parse) is missing too: Nix then tries its next substituter, which a 502 would not do.
fn is_missing(e: &ExtractError) -> bool {
    matches!(e, ExtractError::NarInfo(_))
        || matches!(
            e.kind(),
            ErrorKind::NotInCache | ErrorKind::VerificationFailed | ErrorKind::BadRequest
        )
}

/// The NAR name this node gives the NAR of `info` (see [`NarName`]).
pub fn nar_url(info: &VerifiedNarInfo) -> String {
    let base = info.store_path().to_basename();
    let hash = base.get(..narinfo::HASH_PART_LEN).unwrap_or_default();
    format!("nar/{hash}-{}", narinfo::nar_file_name(info))
}

impl App {
    pub(super) async fn cache_route(
        &self,
        req: CacheRequest,
        headers: &HeaderMap,
        head: bool,
        peer: std::net::SocketAddr,
    ) -> (&'static str, Response<Body>, Option<&'static str>) {
        let route = match &req {
            CacheRequest::Info => "nix-cache-info",
            CacheRequest::NarInfo(_) => "narinfo",
            CacheRequest::Listing(_) => "ls",
            CacheRequest::Nar(_) => "nar",
            CacheRequest::Log(_) => "log",
        };
        // Every request but the tiny `nix-cache-info` counts against its client's limit.
        let _slot = match req {
            CacheRequest::Info => None,
            _ => match self.client_slot(peer.ip()) {
                Some(slot) => Some(slot),
                None => {
                    let msg = "too many requests in progress from this address";
                    return (route, failure(ErrorKind::Overloaded, msg, head), None);
                }
            },
        };
        let (resp, tier) = match req {
            CacheRequest::Info => (self.cache_info(head), None),
            CacheRequest::NarInfo(hash) => (self.narinfo_response(&hash, head).await, None),
            CacheRequest::Nar(name) => self.nar_response(&name, headers, head).await,
            CacheRequest::Listing(hash) => {
                let path = format!("{}.ls", hash.as_str());
                let r = self
                    .side_file(&path, MAX_LISTING, APPLICATION_JSON, head)
                    .await;
                (r, None)
            }
            CacheRequest::Log(drv) => {
                let path = format!("log/{drv}");
                (self.side_file(&path, MAX_LOG, TEXT_PLAIN, head).await, None)
            }
        };
        (route, resp, tier)
    }

    fn cache_info(&self, head: bool) -> Response<Body> {
        let body = format!(
            "StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n",
            crate::upstream::STORE_DIR,
            self.inner.subst.config.priority
        );
        text(StatusCode::OK, NIX_CACHE_INFO, body, head)
    }

    /// The checked narinfo of `hash`, remembered (found or missing); one upstream lookup
    /// per hash at a time. Upstream failures are errors, never remembered.
    async fn lookup(&self, hash: &HashPart) -> Result<Lookup, Arc<ExtractError>> {
        let extractor: &Extractor = &self.inner.extractor;
        let readiness = &self.inner.readiness;
        self.inner
            .subst
            .narinfos
            .try_get_with(hash.as_str().to_owned(), async {
                match extractor.narinfo_by_hash(hash.as_str()).await {
                    Ok((cache, info)) => {
                        readiness.ok();
                        // The unsigned URL is checked now: a narinfo whose NAR this node
                        // could never fetch is not offered.
                        if let Err(e) = cache.confine(info.url()) {
                            tracing::warn!(hash = hash.as_str(), err = %e, "narinfo refused");
                            return Ok(Lookup::Missing(e.to_string().into()));
                        }
                        Ok(Lookup::Found(Arc::new(Checked { cache, info })))
                    }
                    Err(e) if is_missing(&e) => {
                        readiness.ok();
                        if e.kind() != ErrorKind::NotInCache {
                            tracing::warn!(hash = hash.as_str(), err = %e, "narinfo refused");
                        }
                        Ok(Lookup::Missing(e.to_string().into()))
                    }
                    Err(e) => {
                        readiness.failed(true);
                        Err(e)
                    }
                }
            })
            .await
    }

    async fn narinfo_response(&self, hash: &HashPart, head: bool) -> Response<Body> {
        let checked = match self.lookup(hash).await {
            Ok(Lookup::Found(c)) => c,
            Ok(Lookup::Missing(why)) => {
                tracing::debug!(hash = hash.as_str(), %why, "narinfo not served");
                return not_found(head);
            }
            Err(e) => return failure(e.kind(), &e.to_string(), head),
        };
        let url = nar_url(&checked.info);
        let key = self.inner.subst.config.sign_key.as_ref();
        match narinfo::rewrite(&checked.info, &url, key) {
            Ok(bytes) => {
                let body = String::from_utf8_lossy(&bytes).into_owned();
                text(StatusCode::OK, NIX_NARINFO, body, head)
            }
            Err(e) => {
                tracing::warn!(hash = hash.as_str(), err = %e, "narinfo not rewritten");
                not_found(head)
            }
        }
    }

    async fn nar_response(
        &self,
        name: &NarName,
        headers: &HeaderMap,
        head: bool,
    ) -> (Response<Body>, Option<&'static str>) {
        let checked = match self.lookup(&name.hash_part).await {
            Ok(Lookup::Found(c)) => c,
            Ok(Lookup::Missing(_)) => return (not_found(head), None),
            Err(e) => return (failure(e.kind(), &e.to_string(), head), None),
        };
        let info = &checked.info;
        // The name must be the one this node gives the NAR of the narinfo it checked.
        if nar_url(info) != format!("nar/{name}") {
            return (not_found(head), None);
        }
        let nars = self.inner.subst.nars.clone();
        let kept = {
            let (nars, info) = (nars.clone(), info.clone());
            tokio::task::spawn_blocking(move || nars.kept(&info)).await
        };
        match kept {
            Ok(Ok(Some((file, size, sha256)))) => {
                let etag = file_etag(&sha256);
                let resp = kept_response(Arc::new(file), size, &etag, headers, head, self);
                return (resp, Some("disk"));
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(err = %e, "kept NAR unreadable; fetching it again"),
            Err(e) => tracing::warn!(err = %e, "kept NAR unreadable; fetching it again"),
        }
        if head {
            // Said from the narinfo, without pulling the NAR.
            let mut resp = nar_head(info.file_size);
            if info.file_size.is_none() {
                resp.headers_mut().remove(header::CONTENT_LENGTH);
            }
            return (resp, None);
        }
        if !nars.fits(info) {
            let msg = "the NAR is larger than this node's cache";
            return (failure(ErrorKind::Refused, msg, head), None);
        }
        let fetched = match nars.under_way(info) {
            Some(f) => Ok(f),
            None => {
                // The download holds an upstream fetch slot as program requests do, for as
                // long as it runs: clients that leave cannot pile up downloads.
                let inner = &self.inner;
                let permit = tokio::time::timeout(
                    inner.config.upstream_queue_timeout,
                    inner.upstream_permits.clone().acquire_owned(),
                )
                .await;
                let Ok(Ok(permit)) = permit else {
                    let msg = "no upstream fetch slot came free";
                    return (failure(ErrorKind::Overloaded, msg, head), None);
                };
                nars.fetch(&checked.cache, info, permit)
            }
        };
        let flight = match fetched {
            Ok(f) => f,
            // No temp file (a full disk, most likely): a passing condition, worth a retry.
            Err(e) => {
                tracing::warn!(err = %e, "cannot start a NAR fetch");
                return (
                    failure(ErrorKind::Overloaded, "cannot fetch the NAR now", head),
                    None,
                );
            }
        };
        let mut progress = flight.progress();
        let state = match progress.wait_for(|p| !matches!(p, Progress::Opening)).await {
            Ok(p) => *p,
            Err(_) => Progress::Failed {
                early: true,
                kind: ErrorKind::Internal,
            },
        };
        match state {
            Progress::Growing { len: Some(len), .. } => {
                let mut resp = nar_head(Some(len));
                *resp.body_mut() = follow(flight, len);
                (resp, Some("upstream"))
            }
            // The length is not known before the end: the verified file, whole.
            Progress::Growing { len: None, .. } | Progress::Opening => {
                let done = progress.wait_for(|p| p.is_final()).await.map(|p| *p);
                match done {
                    Ok(Progress::Done { size, sha256 }) => {
                        let etag = file_etag(&sha256);
                        let resp =
                            kept_response(flight.file.clone(), size, &etag, headers, head, self);
                        (resp, Some("upstream"))
                    }
                    Ok(Progress::Failed { kind, .. }) => {
                        (failure(kind, "the NAR failed verification", head), None)
                    }
                    _ => (
                        failure(ErrorKind::Internal, "the NAR fetch ended", head),
                        None,
                    ),
                }
            }
            Progress::Done { size, sha256 } => {
                let etag = file_etag(&sha256);
                let resp = kept_response(flight.file.clone(), size, &etag, headers, head, self);
                (resp, Some("upstream"))
            }
            Progress::Failed { kind, early } => {
                if !early {
                    self.inner.metrics.verification_failure();
                }
                (failure(kind, "the NAR could not be fetched", head), None)
            }
        }
    }

    /// A listing or a log, from the memory cache or the first upstream that has it.
    async fn side_file(
        &self,
        path: &str,
        limit: usize,
        content_type: &'static str,
        head: bool,
    ) -> Response<Body> {
        let Ok(cache_path) = CachePath::parse(path) else {
            return not_found(head);
        };
        let extractor = &self.inner.extractor;
        let got = self
            .inner
            .subst
            .side_files
            .try_get_with(path.to_owned(), async {
                extractor
                    .side_file(&cache_path, limit)
                    .await
                    .map(|b| b.map(Bytes::from))
            })
            .await;
        match got {
            Ok(Some(bytes)) => {
                let mut resp = Response::new(if head {
                    Body::empty()
                } else {
                    Body::from(bytes.clone())
                });
                let h = resp.headers_mut();
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                if head {
                    h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                }
                resp
            }
            Ok(None) => not_found(head),
            Err(e) => failure(e.kind(), &e.to_string(), head),
        }
    }
}

/// The head of a NAR response of `len` bytes.
fn nar_head(len: Option<u64>) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(NIX_NAR));
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    resp
}

/// The `ETag` of a NAR file: its own SHA-256, not NarHash, which names the NAR whatever
/// compressed it (an `If-Range` resume must never splice two upstreams' files).
fn file_etag(sha256: &[u8; 32]) -> String {
    format!("\"{}\"", crate::hash::nix32(sha256))
}

/// A verified NAR file of `size` bytes, honouring `Range` and `If-None-Match`.
fn kept_response(
    file: Arc<std::fs::File>,
    size: u64,
    etag: &str,
    headers: &HeaderMap,
    head: bool,
    app: &App,
) -> Response<Body> {
    let mut resp = nar_head(None);
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    let (status, start, len) = match conditional::decide(headers, size, etag) {
        Answer::NotModified => {
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            return resp;
        }
        Answer::Unsatisfiable => {
            let msg = format!("the range is outside the NAR, which is {size} bytes\n");
            let mut err = text(StatusCode::RANGE_NOT_SATISFIABLE, TEXT_PLAIN, msg, head);
            if let Ok(v) = HeaderValue::from_str(&conditional::unsatisfied_range(size)) {
                err.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return err;
        }
        Answer::Whole => (StatusCode::OK, 0, size),
        Answer::Part { start, len } => (StatusCode::PARTIAL_CONTENT, start, len),
    };
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&conditional::content_range(start, len, size)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    if head {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    } else {
        let waits = app.inner.metrics.disk_wait_counter();
        *resp.body_mut() = Body::file(file, start, len, waits);
    }
    resp
}

/// The body of a NAR still being fetched, `len` bytes: read from the flight's file as it
/// grows, all but the last byte as soon as written, the last only once the whole NAR is
/// verified. If it is not, the body ends with an error, and the connection is cut: the
/// client never sees a complete response. The reads hit the page cache (the bytes were
/// just written), so they are done on the serving thread.
fn follow(flight: Arc<Flight>, len: u64) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(FOLLOW_DEPTH);
    tokio::spawn(async move {
        let mut progress = flight.progress();
        let mut at = 0u64;
        loop {
            let p = *progress.borrow_and_update();
            let limit = match p {
                Progress::Opening => 0,
                Progress::Growing { have, .. } => have.min(len.saturating_sub(1)),
                Progress::Done { size, .. } => size.min(len),
                Progress::Failed { .. } => {
                    let _ = tx
                        .send(Err(io::Error::other("the NAR failed verification")))
                        .await;
                    return;
                }
            };
            if at < limit {
                let n = (limit - at).min(FOLLOW_CHUNK);
                let mut buf = vec![0u8; n as usize];
                if let Err(e) = flight.file.read_exact_at(&mut buf, at) {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                    return; // the client left; the fetch goes on without it
                }
                at += n;
                continue;
            }
            if let Progress::Done { .. } = p {
                return;
            }
            match tokio::time::timeout(FOLLOW_IDLE, progress.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    let _ = tx.send(Err(io::Error::other("the NAR fetch ended"))).await;
                    return;
                }
                Err(_) => {
                    let _ = tx
                        .send(Err(io::Error::other("the NAR fetch stalled")))
                        .await;
                    return;
                }
            }
        }
    });
    Body::channel(Chunks { rx, len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::narinfo::{verify_hash_part, Trust};

    const HASH: &str = "35383awm6lh2kgm1l52g8f7y9kc9vp2y";

    /// The fixture narinfo of [`HASH`] with `extra` lines, as remembered once checked.
    fn found(extra: &str) -> Lookup {
        let path = format!(
            "{}/fixtures/cache/{HASH}.narinfo",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).expect("the fixture narinfo");
        let trust = Trust::new::<&str>(&[], false).expect("no keys, no signatures checked");
        let info = verify_hash_part(format!("{text}{extra}").as_bytes(), HASH, &trust)
            .expect("the fixture narinfo checks out");
        let cache = Cache::new(Arc::new(crate::demo::DemoUpstream));
        Lookup::Found(Arc::new(Checked { cache, info }))
    }

    #[test]
    fn a_remembered_narinfo_weighs_at_least_its_text() {
        let small = narinfo_weight(HASH, &found(""));
        let padding = "x".repeat(60_000);
        let large = narinfo_weight(HASH, &found(&format!("Padding: {padding}\n")));
        assert!(large >= small + 60_000, "{small} then {large}");
        // So the cache holds about a thousand such narinfos, not a hundred thousand.
        assert!(NARINFO_BYTES / u64::from(large) < 2_000);
        let missing = Lookup::Missing("not in any cache".into());
        assert!(narinfo_weight(HASH, &missing) < small);
    }
}
