//! Upstream Nix binary caches: where narinfos and NARs come from.
//!
//! Every transport sits behind one small trait, [`Upstream`] (`get(path)` → a byte stream,
//! or `None` when the cache does not have it): http(s), file and S3 alike, and extraction
//! knows none of them. [`Cache`] adds what every transport shares: the `nix-cache-info` check,
//! the size-capped narinfo fetch, confining a narinfo's unsigned `URL` to the cache, and
//! the [`Deadlines`] that bound whole fetches (see `deadline`).
//!
//! [`builder`] is the client of `binplz builder`'s API, which an edge asks for what no
//! cache has yet.

pub mod builder;
mod deadline;
mod file;
mod http;
pub mod s3;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
// tokio's clock is the monotonic one, and tests can pause and advance it.
use tokio::time::Instant;

pub use deadline::{Deadlines, DeadlinesError};
pub use file::FileUpstream;
pub use http::HttpUpstream;
pub use s3::{S3Cause, S3Upstream};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Largest narinfo accepted. Real ones are well under 4 KiB even with hundreds of
/// references; anything bigger is not a narinfo.
pub const MAX_NARINFO_SIZE: usize = 64 << 10;

/// Largest `nix-cache-info` accepted.
const MAX_CACHE_INFO_SIZE: usize = 4 << 10;

/// The store directory binplz serves from; a cache built for another cannot be used.
pub const STORE_DIR: &str = "/nix/store";

/// A path relative to a cache's root, checked so it can neither climb out of the cache
/// (`..`) nor smuggle in another URL. May carry a query string (`nar/x.nar?hash=…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePath {
    path: String,
    query: Option<String>,
}

impl CachePath {
    pub fn parse(s: &str) -> Result<CachePath, UpstreamError> {
        let bad = |reason: &'static str| UpstreamError::InvalidUrl {
            url: s.to_owned(),
            reason,
        };
        let (path, query) = match s.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (s, None),
        };
        if path.is_empty() || path.starts_with('/') {
            return Err(bad("not a relative path"));
        }
        let ok_char = |c: char| c.is_ascii_alphanumeric() || "-._+=~,@".contains(c);
        for seg in path.split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(bad("empty or dot segment"));
            }
            if !seg.chars().all(ok_char) {
                return Err(bad("unexpected character"));
            }
        }
        if let Some(q) = query {
            if !q
                .chars()
                .all(|c| ok_char(c) || c == '&' || c == '/' || c == '%')
            {
                return Err(bad("unexpected character in query"));
            }
        }
        Ok(CachePath {
            path: path.to_owned(),
            query: query.map(str::to_owned),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }
}

impl fmt::Display for CachePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.query {
            Some(q) => write!(f, "{}?{q}", self.path),
            None => f.write_str(&self.path),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid upstream URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("narinfo URL {url:?} points outside the cache {cache}")]
    ForeignUrl { url: String, cache: String },
    #[error("cannot connect to {url}: {err}")]
    Connect { url: String, err: String },
    #[error("{url}: timed out waiting for the {phase}")]
    Timeout { url: String, phase: &'static str },
    #[error("{url}: the {what} was not fetched within {limit:?}")]
    Deadline {
        url: String,
        what: &'static str,
        limit: Duration,
    },
    #[error("{url}: {bytes} bytes in {window:?}, under the minimum of {min_rate} bytes/s")]
    TooSlow {
        url: String,
        bytes: u64,
        window: Duration,
        min_rate: u64,
    },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: the transfer failed: {err}")]
    Body { url: String, err: String },
    #[error("{url}: larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: {err}")]
    Io { url: String, err: String },
    #[error("{url}: the cache is for store {found:?}, not {STORE_DIR}")]
    StoreDir { url: String, found: String },
    #[error("s3://{bucket}/{key}: {cause}")]
    S3 {
        bucket: String,
        key: String,
        cause: S3Cause,
    },
    #[error("{url}: {err}")]
    S3Config { url: String, err: String },
}

impl UpstreamError {
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            UpstreamError::Timeout { .. }
                | UpstreamError::Deadline { .. }
                | UpstreamError::TooSlow { .. }
        )
    }
}

/// A response body, read chunk by chunk.
pub trait Body: Send {
    /// The next chunk, or `None` at the end.
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, UpstreamError>>;
}

/// A successful fetch.
pub struct Fetched {
    /// The length announced by the cache, when it did.
    pub len: Option<u64>,
    pub body: Box<dyn Body>,
}

/// One transport to one binary cache.
pub trait Upstream: Send + Sync + fmt::Debug {
    /// The cache's base URL, for messages.
    fn url(&self) -> &str;
    /// Fetches `path`. `Ok(None)` means the cache does not have it (404, or 403 as S3 says).
    fn get<'a>(
        &'a self,
        path: &'a CachePath,
    ) -> BoxFuture<'a, Result<Option<Fetched>, UpstreamError>>;
}

/// Timeouts and retries for network transports.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// From sending a request to the response headers.
    pub first_byte_timeout: Duration,
    /// Longest pause between two body chunks.
    pub read_timeout: Duration,
    /// Further attempts after a connection error, timeout or 5xx (never after a 404).
    pub retries: u32,
    /// First backoff; doubled each attempt, with jitter.
    pub backoff: Duration,
    /// Longest wait between attempts, also capping `Retry-After`.
    pub max_backoff: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(30),
            retries: 3,
            backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// Opens the transport for a cache URL: `http://`, `https://`, `file:///` or `s3://`.
pub fn open(url: &str, config: &ClientConfig) -> Result<Arc<dyn Upstream>, UpstreamError> {
    let url = url.trim_end_matches('/');
    if url.starts_with("s3://") {
        Ok(Arc::new(S3Upstream::new(url, config)?))
    } else if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(UpstreamError::InvalidUrl {
                url: url.to_owned(),
                reason: "file URLs need an absolute path",
            });
        }
        Ok(Arc::new(FileUpstream::new(url, path.into())))
    } else if url.starts_with("http://") || url.starts_with("https://") {
        Ok(Arc::new(HttpUpstream::new(url, config.clone())?))
    } else {
        Err(UpstreamError::InvalidUrl {
            url: url.to_owned(),
            reason: "expected http://, https://, file:// or s3://",
        })
    }
}

/// A binary cache: a transport plus the checks every transport shares.
#[derive(Debug, Clone)]
pub struct Cache {
    inner: Arc<dyn Upstream>,
    info_checked: Arc<tokio::sync::OnceCell<()>>,
    /// Until when (milliseconds since `origin`; 0: never failed) this cache is asked last
    /// after failing, as Nix's circuit breaker sets a failing substituter aside.
    down_until: Arc<AtomicU64>,
    /// What `down_until` counts from. Monotonic: a wall clock stepped back would set the
    /// cache aside for as long as the step.
    origin: Instant,
    deadlines: Deadlines,
}

/// How long a cache that failed (after its retries) is asked after the others.
pub const CIRCUIT_BREAKER: Duration = Duration::from_secs(60);

impl Cache {
    /// A cache with the default [`Deadlines`].
    pub fn new(inner: Arc<dyn Upstream>) -> Cache {
        Cache::with_deadlines(inner, Deadlines::default())
    }

    pub fn with_deadlines(inner: Arc<dyn Upstream>, deadlines: Deadlines) -> Cache {
        Cache {
            inner,
            info_checked: Arc::default(),
            down_until: Arc::default(),
            origin: Instant::now(),
            deadlines,
        }
    }

    /// Milliseconds from `origin` to `now`, plus one, so that 0 stays "never".
    fn ms_at(&self, now: Instant) -> u64 {
        let ms = now.saturating_duration_since(self.origin).as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX).saturating_add(1)
    }

    /// Whether this cache failed within the last [`CIRCUIT_BREAKER`].
    pub fn is_down(&self) -> bool {
        self.down_until.load(Ordering::Relaxed) > self.ms_at(Instant::now())
    }

    /// Records a transport failure (connection, timeout, 5xx after retries).
    pub fn mark_down(&self) {
        let breaker = u64::try_from(CIRCUIT_BREAKER.as_millis()).unwrap_or(u64::MAX);
        let until = self.ms_at(Instant::now()).saturating_add(breaker);
        self.down_until.store(until, Ordering::Relaxed);
    }

    pub fn url(&self) -> &str {
        self.inner.url()
    }

    /// Reads `nix-cache-info` once and refuses a cache for another store directory.
    /// A cache without the file is accepted, as Nix does.
    pub async fn check_info(&self) -> Result<(), UpstreamError> {
        self.info_checked
            .get_or_try_init(|| async {
                let path = CachePath::parse("nix-cache-info")?;
                let Some(body) = self.get_small(&path, MAX_CACHE_INFO_SIZE).await? else {
                    return Ok(());
                };
                let text = String::from_utf8_lossy(&body);
                for line in text.lines() {
                    if let Some(dir) = line.strip_prefix("StoreDir:") {
                        let dir = dir.trim();
                        if dir != STORE_DIR {
                            return Err(UpstreamError::StoreDir {
                                url: self.url().to_owned(),
                                found: dir.to_owned(),
                            });
                        }
                    }
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// Asks for `nix-cache-info` and reads the answer whole (so the connection can be used
    /// again): `Ok` if the cache answered, with the file or a 404.
    pub async fn probe(&self) -> Result<(), UpstreamError> {
        let path = CachePath::parse("nix-cache-info")?;
        let fetch = self.get_small(&path, MAX_CACHE_INFO_SIZE);
        self.within_narinfo_deadline(&path, "nix-cache-info", fetch)
            .await
            .map(|_| ())
    }

    /// Fetches `<hash>.narinfo`; `None` when the cache does not have it. The narinfo
    /// deadline covers it all: the `nix-cache-info` check the first time, every attempt
    /// and backoff, headers and body.
    pub async fn narinfo(&self, hash_part: &str) -> Result<Option<Vec<u8>>, UpstreamError> {
        let path = CachePath::parse(&format!("{hash_part}.narinfo"))?;
        let fetch = async {
            self.check_info().await?;
            self.get_small(&path, MAX_NARINFO_SIZE).await
        };
        self.within_narinfo_deadline(&path, "narinfo", fetch).await
    }

    async fn within_narinfo_deadline<T>(
        &self,
        path: &CachePath,
        what: &'static str,
        fetch: impl Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
        let limit = self.deadlines.narinfo();
        tokio::time::timeout(limit, fetch)
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::Deadline {
                    url: format!("{}/{path}", self.url()),
                    what,
                    limit,
                })
            })
    }

    /// Opens a NAR named by a narinfo's unsigned `URL`, confined to this cache. The whole
    /// fetch, opening and body, must end within the NAR deadline for `nar_size` bytes, and
    /// the body keep to the minimum rate.
    pub async fn nar(&self, url: &str, nar_size: u64) -> Result<Option<Fetched>, UpstreamError> {
        let path = self.confine(url)?;
        let limit = self.deadlines.nar(nar_size);
        let end = Instant::now() + limit;
        let full_url = format!("{}/{path}", self.url());
        let Ok(opened) = tokio::time::timeout_at(end, self.inner.get(&path)).await else {
            return Err(UpstreamError::Deadline {
                url: full_url,
                what: "NAR",
                limit,
            });
        };
        Ok(opened?.map(|f| self.paced(f, full_url, Some((end, limit)))))
    }

    /// Fetches any path relative to the cache root: its response headers within the
    /// narinfo deadline, its body at the minimum rate.
    pub async fn get(&self, path: &CachePath) -> Result<Option<Fetched>, UpstreamError> {
        let opened = self
            .within_narinfo_deadline(path, "response", self.inner.get(path))
            .await?;
        Ok(opened.map(|f| self.paced(f, format!("{}/{path}", self.url()), None)))
    }

    fn paced(
        &self,
        fetched: Fetched,
        url: String,
        deadline: Option<(Instant, Duration)>,
    ) -> Fetched {
        Fetched {
            len: fetched.len,
            body: Box::new(deadline::Paced {
                inner: fetched.body,
                url,
                floor: self.deadlines.floor(),
                min_rate: self.deadlines.min_rate(),
                deadline,
            }),
        }
    }

    /// Turns a narinfo `URL` into a path in this cache. Relative URLs are relative to the
    /// cache root; an absolute URL must point into this very cache (same scheme, host and
    /// base path), because `URL` is not signed: anything else could be used to make binplz
    /// fetch from internal addresses.
    pub fn confine(&self, url: &str) -> Result<CachePath, UpstreamError> {
        if url.contains("://") {
            let base = format!("{}/", self.url());
            match url.strip_prefix(&base) {
                Some(rest) => CachePath::parse(rest),
                None => Err(UpstreamError::ForeignUrl {
                    url: url.to_owned(),
                    cache: self.url().to_owned(),
                }),
            }
        } else {
            CachePath::parse(url)
        }
    }

    /// Fetches `path` whole, at most `limit` bytes, within the narinfo deadline; `None`
    /// when the cache does not have it.
    pub async fn get_whole(
        &self,
        path: &CachePath,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, UpstreamError> {
        let fetch = self.get_small(path, limit);
        self.within_narinfo_deadline(path, "response", fetch).await
    }

    async fn get_small(
        &self,
        path: &CachePath,
        limit: usize,
    ) -> Result<Option<Vec<u8>>, UpstreamError> {
        let Some(mut fetched) = self.inner.get(path).await? else {
            return Ok(None);
        };
        let too_large = || UpstreamError::TooLarge {
            url: format!("{}/{path}", self.url()),
            limit: limit as u64,
        };
        if fetched.len.is_some_and(|l| l > limit as u64) {
            return Err(too_large());
        }
        let mut out = Vec::new();
        while let Some(chunk) = fetched.body.next_chunk().await? {
            if out.len() + chunk.len() > limit {
                return Err(too_large());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Cache {
        Cache::new(Arc::new(FileUpstream::new(
            "file:///nonexistent",
            "/nonexistent".into(),
        )))
    }

    /// Paused, tokio's clock moves only when told, and the wall clock barely moves at all:
    /// as after the wall clock was stepped back, only a monotonic clock says the minute
    /// is over.
    #[tokio::test(start_paused = true)]
    async fn the_circuit_breaker_counts_monotonic_time_not_the_wall_clock() {
        let cache = cache();
        assert!(!cache.is_down());
        cache.mark_down();
        assert!(cache.is_down());
        tokio::time::advance(CIRCUIT_BREAKER - Duration::from_millis(1)).await;
        assert!(cache.is_down());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!cache.is_down());
    }
}
