//! `binplz serve`: the HTTP edge node.
//!
//! ```text
//!  accept (connection cap) ─► a serving thread ─► h1: plain GET/HEAD ─► handle() ─► sendfile
//!                                                  └ anything else ─► hyper ─► handle()
//!  handle(): routes::parse ─► typed request ─► index lookup ─► Files: memory ─► disk ─► single-flight
//!     extraction (upstream permits) ─► response with provenance, Range, ETag
//!  body sent (or given up on) ─► access log line with the bytes sent (access)
//!  Nix binary cache routes (nix-cache-info, narinfo, nar, ls, log) ─► substituter
//! ```
//!
//! [`run`] takes a bound listener and a shutdown future, so tests run the server in-process
//! on `127.0.0.1:0`; `main` wires signals to [`run_threads`], which spreads connections
//! over threads. All state lives in one [`App`] handle, shared by the threads.

mod access;
pub mod body;
pub mod building;
pub mod conditional;
pub(crate) mod h1;
pub mod indexes;
pub(crate) mod io;
pub mod metrics;
pub(crate) mod page;
pub mod respond;
pub mod routes;
pub mod substituter;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use self::access::{Access, Logged};
use self::body::Body;
use self::building::{Builder, BuilderSettings, Verdict};
use self::conditional::Answer;
use self::indexes::Indexes;
use self::metrics::Metrics;
use self::respond::*;
use self::routes::{ProgramRequest, Route, RouteError};
use crate::cache::files::{Content, Files, Hit};
use crate::cache::health::WriteFailure;
use crate::cache::scrub;
use crate::error::ErrorKind;
use crate::extract::{ExtractError, Extractor, Siblings};

/// Most bytes of sibling files kept from one NAR besides the requested one.
const SIBLINGS_BUDGET: u64 = 256 << 20;
use crate::index::Lookup;
use crate::resolve::RelPath;

pub use indexes::IndexSource;
pub use substituter::CacheConfig;

/// Provenance header names, built once: inserting by `&str` parses the name and allocates
/// a copy of it on every request.
const H_NIX_STORE_PATH: HeaderName = HeaderName::from_static(X_NIX_STORE_PATH);
const H_NIX_ATTR: HeaderName = HeaderName::from_static(X_NIX_ATTR);
const H_NIXPKGS_REVISION: HeaderName = HeaderName::from_static(X_NIXPKGS_REVISION);
const H_BINPLZ_SHA256: HeaderName = HeaderName::from_static(X_BINPLZ_SHA256);
const H_BINPLZ_LINKAGE: HeaderName = HeaderName::from_static(X_BINPLZ_LINKAGE);
const H_BINPLZ_CANDIDATES: HeaderName = HeaderName::from_static(X_BINPLZ_CANDIDATES);
const H_BINPLZ_CACHE: HeaderName = HeaderName::from_static(X_BINPLZ_CACHE);
/// Headers of a file response: those [`file_response`] sets, then the provenance ones.
const FILE_HEADERS: usize = 7;
const PROVENANCE_HEADERS: usize = 8;

/// Validated server settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub default_system: String,
    pub max_file_size: u64,
    /// Upstream extractions running at once; more wait, and past `max_queued` get a 503.
    pub max_upstream_fetches: usize,
    pub max_queued_fetches: usize,
    /// Longest an extraction waits for one of the `max_upstream_fetches` slots before its
    /// requests get a 503 with `Retry-After`.
    pub upstream_queue_timeout: Duration,
    /// Requests in progress per client address.
    pub max_per_client: usize,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// Longest a response write may wait on a client that does not read.
    pub write_timeout: Duration,
    /// How long shutdown waits for responses in progress.
    pub shutdown_grace: Duration,
    /// How long an unknown program (or a path missing upstream) is remembered.
    pub negative_ttl: Duration,
    /// How often index files are checked for changes.
    pub index_poll: Duration,
    /// Largest index file read, at start-up and at reloads.
    pub max_index_size: u64,
    /// Least time between two readiness probes of the upstream (see `/-/readyz`).
    pub ready_probe_interval: Duration,
    /// How long the scrubber takes to re-hash the whole disk cache; `None`: no scrubber.
    pub disk_scrub_period: Option<Duration>,
    /// The Nix binary cache routes' settings.
    pub cache: CacheConfig,
    /// The builder to ask for programs that are not built yet; `None`: they are 503s.
    pub builder: Option<BuilderSettings>,
    /// Every connection goes to hyper from its first byte, binplz's own HTTP/1 path
    /// ([`h1`]) unused: for tests that check both paths answer alike. Not an option; read
    /// once per connection.
    #[doc(hidden)]
    pub hyper_only: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default_system: "x86_64-linux".into(),
            max_file_size: 1 << 30,
            max_upstream_fetches: 16,
            max_queued_fetches: 256,
            upstream_queue_timeout: Duration::from_secs(10),
            max_per_client: 32,
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(30),
            index_poll: Duration::from_secs(5),
            max_index_size: crate::index::format::DEFAULT_MAX_INDEX_SIZE,
            ready_probe_interval: Duration::from_secs(5),
            disk_scrub_period: Some(crate::cache::scrub::DEFAULT_PERIOD),
            cache: CacheConfig::default(),
            builder: None,
            hyper_only: false,
        }
    }
}

/// The server's state: cheap to clone.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    indexes: Indexes,
    extractor: Extractor,
    files: Files,
    metrics: Metrics,
    /// Shared with NAR downloads, which hold one for as long as they run.
    upstream_permits: Arc<Semaphore>,
    queued: AtomicU64,
    clients: ClientSlots,
    /// Open connections, over all serving threads.
    connections: Arc<Semaphore>,
    /// Answers remembered for a short while: unknown names (with their suggestions) and
    /// store paths the upstream does not have. Upstream failures are never remembered.
    negative: moka::future::Cache<String, (ErrorKind, String)>,
    /// When the upstream last answered or failed, for `/-/readyz`.
    readiness: Readiness,
    /// Makes concurrent `/-/readyz` requests share one probe.
    probe: tokio::sync::Mutex<()>,
    /// The Nix binary cache routes: narinfos, NARs, listings and logs.
    subst: substituter::State,
    /// Whether index files were given: without, the node is a substituter only.
    has_indexes: bool,
    /// The builder asked for programs not built yet (`--builder`).
    builder: Option<Builder>,
}

/// How long an upstream failure with no success since keeps `/-/readyz` unready, and how
/// long a success counts as the upstream being reachable without a probe.
const UNREADY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// Longest a readiness probe waits for the upstream.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// When the upstream last answered and failed, as milliseconds since `origin` on the
/// monotonic clock (0: not yet). Wall-clock times here would keep a node unready for as
/// long as a step back of the clock.
struct Readiness {
    origin: tokio::time::Instant,
    /// The last successful upstream fetch or probe.
    ok_at: AtomicU64,
    /// The last upstream failure or timeout, of a fetch or a probe.
    err_at: AtomicU64,
    /// The last failure of a real fetch (not a probe).
    fetch_err_at: AtomicU64,
    /// The start of the last readiness probe.
    probed_at: AtomicU64,
}

impl Readiness {
    fn new() -> Readiness {
        Readiness {
            origin: tokio::time::Instant::now(),
            ok_at: AtomicU64::new(0),
            err_at: AtomicU64::new(0),
            fetch_err_at: AtomicU64::new(0),
            probed_at: AtomicU64::new(0),
        }
    }

    /// Now, as milliseconds since `origin`, plus one so that 0 stays "not yet".
    fn now(&self) -> u64 {
        let ms = self.origin.elapsed().as_millis();
        u64::try_from(ms).unwrap_or(u64::MAX).saturating_add(1)
    }

    fn ok(&self) {
        self.ok_at.store(self.now(), Ordering::Relaxed);
    }

    /// A failure; `fetch` when a real fetch failed, not a probe.
    fn failed(&self, fetch: bool) {
        let now = self.now();
        self.err_at.store(now, Ordering::Relaxed);
        if fetch {
            self.fetch_err_at.store(now, Ordering::Relaxed);
        }
    }

    /// How long ago `at` was, when it was less than [`UNREADY_AFTER_FAILURE`] ago.
    fn within(&self, at: u64) -> Option<Duration> {
        let ago = Duration::from_millis(self.now().saturating_sub(at));
        (at != 0 && ago < UNREADY_AFTER_FAILURE).then_some(ago)
    }

    /// A success in the last minute, with no failure since.
    fn fresh_ok(&self) -> bool {
        let ok_at = self.ok_at.load(Ordering::Relaxed);
        ok_at >= self.err_at.load(Ordering::Relaxed) && self.within(ok_at).is_some()
    }

    /// How long ago a failure (of a fetch only, with `fetch_only`) was, when it was in the
    /// last minute with no success since.
    fn unanswered(&self, fetch_only: bool) -> Option<Duration> {
        let err_at = if fetch_only {
            &self.fetch_err_at
        } else {
            &self.err_at
        };
        let err_at = err_at.load(Ordering::Relaxed);
        if err_at > self.ok_at.load(Ordering::Relaxed) {
            self.within(err_at)
        } else {
            None
        }
    }

    /// Whether a probe may start now (none in the last `interval`); if so, counts it as
    /// started, so that a check given up on by its caller mid-probe does not let the next
    /// one probe at once.
    fn start_probe(&self, interval: Duration) -> bool {
        let now = self.now();
        let last = self.probed_at.load(Ordering::Relaxed);
        let since = Duration::from_millis(now.saturating_sub(last));
        if last != 0 && since < interval {
            return false;
        }
        self.probed_at.store(now, Ordering::Relaxed);
        true
    }
}

/// What went wrong with one request; `kind` decides the status.
#[derive(Debug, Clone)]
struct Failure {
    kind: ErrorKind,
    message: String,
    /// Lines said after `message` (what to do about it).
    more: Vec<String>,
    /// `Retry-After` instead of the kind's usual one.
    retry_after: Option<Duration>,
}

impl Failure {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
            more: Vec::new(),
            retry_after: None,
        }
    }

    /// A failure saying `lines` (the first is its message), with its own `Retry-After`.
    fn lines(kind: ErrorKind, lines: Vec<String>, retry_after: Option<Duration>) -> Failure {
        let mut lines = lines.into_iter();
        Failure {
            kind,
            message: lines.next().unwrap_or_default(),
            more: lines.collect(),
            retry_after,
        }
    }

    /// The error response.
    fn response(&self, head: bool) -> Response<Body> {
        let lines: Vec<&str> = std::iter::once(self.message.as_str())
            .chain(self.more.iter().map(String::as_str))
            .collect();
        let mut resp = error_lines(self.kind, &lines, head);
        if let Some(after) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs()));
        }
        resp
    }
}

impl App {
    pub fn new(
        config: Config,
        indexes: Vec<IndexSource>,
        extractor: Extractor,
        files: Files,
    ) -> Result<App, String> {
        let has_indexes = !indexes.is_empty();
        let indexes = Indexes::load(indexes, config.max_index_size)?;
        // Shared with NAR downloads, which hold one for as long as they run.
        let upstream_permits = Arc::new(Semaphore::new(config.max_upstream_fetches.max(1)));
        let subst = substituter::State::new(
            config.cache.clone(),
            files.disk_handle(),
            config.negative_ttl,
        );
        // A NAR kept for Nix clients also serves program requests, without a second
        // download.
        let extractor = extractor.with_local_nars(subst.nars().clone());
        let negative = moka::future::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(config.negative_ttl)
            .build();
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let builder = config.builder.clone().map(Builder::new).transpose()?;
        Ok(App {
            inner: Arc::new(Inner {
                upstream_permits,
                config,
                indexes,
                extractor,
                files,
                metrics: Metrics::default(),
                queued: AtomicU64::new(0),
                clients: ClientSlots::new(),
                connections,
                negative,
                readiness: Readiness::new(),
                probe: tokio::sync::Mutex::new(()),
                subst,
                has_indexes,
                builder,
            }),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Waits until no extraction is under way and every extracted file has been kept
    /// (responses go out before their files are flushed to disk).
    pub async fn settled(&self) {
        self.inner.files.settled().await;
    }

    /// Re-reads index files that changed (every file if `force`, as on SIGHUP); a bad file
    /// keeps the old index serving. Loading an index is a long synchronous read and check:
    /// it runs on a blocking thread, not on a serving one.
    pub async fn reload_indexes(&self, force: bool) {
        let app = self.clone();
        let _ = tokio::task::spawn_blocking(move || app.inner.indexes.reload(force)).await;
    }

    async fn handle(
        &self,
        method: &Method,
        uri: &http::Uri,
        version: Version,
        headers: &HeaderMap,
        peer: SocketAddr,
    ) -> (Response<Body>, Access) {
        let start = Instant::now();
        let _counted = self.inner.metrics.begin();
        let head = method == Method::HEAD;
        let path = uri.path();
        let query = uri.query();
        let (route_name, resp, tier) = if let Some(why) = host_problem(version, headers) {
            ("other", error(ErrorKind::BadRequest, why, head), None)
        } else if method != Method::GET && method != Method::HEAD {
            let mut r = error_status(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET and HEAD are allowed",
                head,
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            ("other", r, None)
        } else {
            match routes::parse(path, query) {
                Err(RouteError::NotFound) => (
                    "other",
                    error_status(StatusCode::NOT_FOUND, "no such page", head),
                    None,
                ),
                Err(RouteError::BadRequest(why)) => {
                    ("program", error(ErrorKind::BadRequest, why, head), None)
                }
                Ok(route) => self.route(route, uri, headers, head, peer).await,
            }
        };
        let status = resp.status().as_u16();
        self.inner.metrics.request(route_name, status);
        let access = Access {
            method: method.clone(),
            uri: uri.clone(),
            status,
            tier,
            client: peer.ip(),
            start,
            file_bytes: route_name == "program" && tier.is_some() && !head,
        };
        (resp, access)
    }

    /// The answer to a request refused before it is parsed whole (see [`h1::Refusal`]): a
    /// head that does not parse even with its target escaped (a tab or control byte in the
    /// name, say), or one too large. The error script, so that running what a failed
    /// download saved explains itself, as for any other bad name.
    fn refuse(&self, why: h1::Refusal, head: bool, peer: SocketAddr) -> Response<Body> {
        let status = why.status();
        self.inner.metrics.request("program", status.as_u16());
        tracing::info!(target: "binplz::access", status = status.as_u16(), client = %peer.ip(), "{}", why.message());
        error_status(status, why.message(), head)
    }

    async fn route(
        &self,
        route: Route,
        uri: &http::Uri,
        headers: &HeaderMap,
        head: bool,
        peer: SocketAddr,
    ) -> (&'static str, Response<Body>, Option<&'static str>) {
        match route {
            Route::Home => (
                "home",
                page::home(
                    self.inner.indexes.current().as_deref(),
                    &self.inner.config.default_system,
                    headers,
                    head,
                ),
                None,
            ),
            Route::Health => (
                "healthz",
                text(StatusCode::OK, TEXT_PLAIN, "ok\n".into(), head),
                None,
            ),
            Route::Ready => ("readyz", self.ready(head).await, None),
            Route::Metrics => ("metrics", self.render_metrics(head), None),
            Route::Search { query } => {
                // Counted like program requests: each one is work a client can repeat.
                let Some(_slot) = self.client_slot(peer.ip()) else {
                    return ("search", over_client_limit(head), None);
                };
                (
                    "search",
                    page::search(
                        self.inner.indexes.current().as_deref(),
                        &self.inner.config.default_system,
                        &query,
                        headers,
                        head,
                    ),
                    None,
                )
            }
            Route::Program(req) => {
                let Some(_slot) = self.client_slot(peer.ip()) else {
                    return ("program", over_client_limit(head), None);
                };
                let asked = Asked {
                    uri,
                    headers,
                    head,
                    peer: peer.ip(),
                };
                match self.program(&req, &asked, false).await {
                    Ok((resp, tier)) => ("program", resp, Some(tier)),
                    Err(f) => ("program", f.response(head), None),
                }
            }
            Route::Cache(req) => self.cache_route(req, headers, head, peer).await,
            Route::Sha256(req) => {
                let Some(_slot) = self.client_slot(peer.ip()) else {
                    return ("sha256", over_client_limit(head), None);
                };
                let asked = Asked {
                    uri,
                    headers,
                    head,
                    peer: peer.ip(),
                };
                match self.program(&req, &asked, true).await {
                    Ok((resp, tier)) => ("sha256", resp, Some(tier)),
                    Err(f) => ("sha256", f.response(head), None),
                }
            }
        }
    }

    /// Ready when an index is loaded and the upstream is reachable: it answered a fetch in
    /// the last minute, or else it answers a probe for `nix-cache-info` now (at most one
    /// probe per `ready_probe_interval`). A fetch failure in the last minute with no success
    /// since makes a load balancer look elsewhere; probes do not overrule it.
    async fn ready(&self, head: bool) -> Response<Body> {
        let inner = &self.inner;
        if inner.has_indexes && inner.indexes.current().is_none() {
            return error_status(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: no index loaded",
                head,
            );
        }
        let readiness = &inner.readiness;
        if !readiness.fresh_ok() {
            let _probing = inner.probe.lock().await;
            // A real fetch that failed in the last minute, with no success since, is not
            // overruled by a probe: the upstream may answer for nix-cache-info and still
            // fail for NARs.
            let fetch_failing = readiness.unanswered(true).is_some();
            if !readiness.fresh_ok()
                && !fetch_failing
                && readiness.start_probe(inner.config.ready_probe_interval)
            {
                let result = tokio::time::timeout(PROBE_TIMEOUT, inner.extractor.probe()).await;
                match result {
                    Ok(Ok(())) => readiness.ok(),
                    Ok(Err(e)) => {
                        tracing::warn!(err = %e, "readiness probe: the upstream failed");
                        readiness.failed(false);
                    }
                    Err(_) => {
                        tracing::warn!("readiness probe: the upstream timed out");
                        readiness.failed(false);
                    }
                }
            }
        }
        if let Some(ago) = readiness.unanswered(false) {
            let msg = format!(
                "not ready: the upstream failed {}s ago and has not answered since",
                ago.as_secs()
            );
            return error_status(StatusCode::SERVICE_UNAVAILABLE, &msg, head);
        }
        // Still ready when the disk cache cannot keep files: every verified file is served
        // (from memory or its temp file), only the disk tier is lost. A load balancer keeps
        // the node; the body says why an operator should look. The error itself (it names
        // local paths) goes to the log only: this route is as public as the others.
        let msg = match inner.files.disk().health().degraded() {
            Some(d) => format!(
                "ready, degraded: the disk cache cannot keep files: {} (for {}s)\n",
                d.cause.describe(),
                d.since.as_secs(),
            ),
            None => "ready\n".to_owned(),
        };
        text(StatusCode::OK, TEXT_PLAIN, msg, head)
    }

    fn render_metrics(&self, head: bool) -> Response<Body> {
        let disk = self.inner.files.disk().stats();
        let extra = [
            (
                "binplz_disk_cache_bytes",
                "Bytes in the disk cache.",
                disk.1,
            ),
            (
                "binplz_disk_cache_entries",
                "Files in the disk cache.",
                disk.0 as u64,
            ),
            (
                "binplz_memory_cache_bytes",
                "Bytes in the memory cache.",
                self.inner.files.memory_bytes(),
            ),
            (
                "binplz_upstream_queue",
                "Extractions waiting for an upstream permit.",
                self.inner.queued.load(Ordering::Relaxed),
            ),
            (
                "binplz_disk_cache_keep_errors_total",
                "Extracted files served but not kept in the disk cache, for an error.",
                self.inner.files.keep_errors(),
            ),
            (
                "binplz_disk_cache_scrubbed_bytes_total",
                "Bytes of disk cache files the scrubber re-hashed.",
                self.inner.files.disk().scrub_stats().bytes,
            ),
            (
                "binplz_disk_waits_total",
                "Reads of served files that would have waited (for the disk, or a lock on the file), done on a blocking thread rather than the serving thread.",
                self.inner.metrics.disk_waits() + self.inner.files.disk_waits(),
            ),
        ];
        let mut body = self.inner.metrics.render(&extra);
        let health = self.inner.files.disk().health();
        metrics::render_labelled(
            &mut body,
            "binplz_disk_cache_write_failures_total",
            "Writes to the disk cache that failed, by cause.",
            "cause",
            WriteFailure::ALL.map(|c| (c.label(), health.failures(c))),
        );
        let scrubbed = self.inner.files.disk().scrub_stats();
        metrics::render_labelled(
            &mut body,
            "binplz_disk_cache_corrupt_total",
            "Disk cache files dropped because their content no longer hashed to their name, by the check that found it: the scrubber, or a read.",
            "found_by",
            [("scrub", scrubbed.corrupt_scrub), ("read", scrubbed.corrupt_read)],
        );
        metrics::render_labelled(
            &mut body,
            "binplz_disk_cache_degraded",
            "1 while the disk cache cannot write (see /-/readyz), by cause.",
            "cause",
            WriteFailure::ALL.map(|c| {
                let now = health.degraded().is_some_and(|d| d.cause == c);
                (c.label(), u64::from(now))
            }),
        );
        if let Some(b) = &self.inner.builder {
            b.render_metrics(&mut body);
        }
        text(StatusCode::OK, PROMETHEUS, body, head)
    }

    /// Counts a request against its client's limit; `None` when the client is at it.
    fn client_slot(&self, ip: IpAddr) -> Option<ClientSlot<'_>> {
        let clients = &self.inner.clients;
        let slot = clients.acquire(ip, self.inner.config.max_per_client)?;
        Some(ClientSlot { clients, slot })
    }

    async fn program(
        &self,
        req: &ProgramRequest,
        asked: &Asked<'_>,
        sha_only: bool,
    ) -> Result<(Response<Body>, &'static str), Failure> {
        let inner = &self.inner;
        let system = req
            .system
            .as_ref()
            .map_or(inner.config.default_system.as_str(), |s| s.as_str());
        let index = match &req.rev {
            Some(rev) => inner.indexes.by_revision(rev.as_str()).ok_or_else(|| {
                Failure::new(
                    ErrorKind::UnknownProgram,
                    format!("unknown revision {}", rev.as_str()),
                )
            })?,
            None => inner
                .indexes
                .current()
                .ok_or_else(|| match inner.has_indexes {
                    true => Failure::new(ErrorKind::Overloaded, "no index loaded yet"),
                    // A substituter-only node: no index will ever load.
                    false => {
                        Failure::new(ErrorKind::UnknownProgram, "this node serves no programs")
                    }
                })?,
        };
        let program = req.program.as_str();
        let attr = req.attr.as_ref().map(|a| a.as_str());
        // The index's creation time is part of the key, so nothing remembered from an
        // index is answered once a reload has replaced it. Built only where a remembered
        // answer can apply (an unknown name, a file no tier holds), so a hit costs nothing.
        let neg_key = || {
            format!(
                "{}|{}|{system}|{}|{program}",
                index.metadata().created,
                req.rev.as_ref().map_or("", |r| r.as_str()),
                attr.unwrap_or("")
            )
        };
        let found = match index.resolve(system, program, attr) {
            Lookup::Found(c) => c,
            Lookup::NotBuilt {
                attr,
                store_path,
                drv_path,
            } => {
                let not_built = || {
                    Failure::new(
                        ErrorKind::NotBuilt,
                        format!(
                            "{program} ({attr}, {store_path}) is not built yet; try again later"
                        ),
                    )
                };
                let (Some(builder), Some(drv_path)) = (&inner.builder, drv_path) else {
                    return Err(not_built());
                };
                let target = asked.uri.path_and_query().map_or("/", |p| p.as_str());
                let url = format!("http://{}{target}", page::host(asked.headers));
                match builder.verdict(drv_path, asked.peer, program, &url).await {
                    Verdict::Wait(f) => return Err(f),
                    Verdict::Built => {}
                }
                // The index has no file for an output it saw unbuilt: the program is where
                // a program named so is, in the output's `bin/`.
                let path = format!("bin/{program}");
                let hit = self
                    .file(store_path, &path, neg_key)
                    .await
                    .map_err(|f| building::after_built(f, program, store_path))?;
                let revision = index.metadata().revision.as_deref();
                let file = Served {
                    program,
                    attr,
                    revision,
                    others: None,
                };
                return Ok(self.answer_file(&hit, &file, req, asked, sha_only));
            }
            Lookup::Unknown => {
                let neg_key = neg_key();
                if let Some((kind, message)) = inner.negative.get(&neg_key).await {
                    return Err(Failure::new(kind, message));
                }
                let suggestions = index.suggest(system, program);
                let from = attr.map(|a| format!(" in {a}")).unwrap_or_default();
                let mut msg = format!("unknown program {program}{from} for {system}");
                if !suggestions.is_empty() {
                    msg.push_str(&format!("; did you mean: {}?", suggestions.join(", ")));
                }
                inner
                    .negative
                    .insert(neg_key, (ErrorKind::UnknownProgram, msg.clone()))
                    .await;
                return Err(Failure::new(ErrorKind::UnknownProgram, msg));
            }
        };
        let chosen = found.chosen();
        if chosen.size > inner.config.max_file_size {
            return Err(Failure::new(
                ErrorKind::Refused,
                format!(
                    "{program} is {} bytes, over this server's limit of {}",
                    chosen.size, inner.config.max_file_size
                ),
            ));
        }
        let hit = self.file(chosen.store_path, chosen.path, neg_key).await?;
        let others = (found.len() > 1).then(|| {
            let others: Vec<&str> = found.iter().skip(1).map(|c| c.attr).collect();
            others.join(", ")
        });
        let file = Served {
            program,
            attr: chosen.attr,
            revision: index.metadata().revision.as_deref(),
            others,
        };
        Ok(self.answer_file(&hit, &file, req, asked, sha_only))
    }

    /// The response for a file `hit` served as `file` says, and its tier.
    fn answer_file(
        &self,
        hit: &Hit,
        file: &Served<'_>,
        req: &ProgramRequest,
        asked: &Asked<'_>,
        sha_only: bool,
    ) -> (Response<Body>, &'static str) {
        let (program, head) = (file.program, asked.head);
        let fixed = FileHeaders::of(hit, program, file.attr, file.revision);
        let mut resp = if sha_only {
            let body = format!("{}  {program}\n", fixed.sha256);
            let mut resp = text(StatusCode::OK, TEXT_PLAIN, body, head);
            let h = resp.headers_mut();
            h.reserve(PROVENANCE_HEADERS);
            for (name, value) in &fixed.provenance {
                h.insert(name, value.clone());
            }
            resp
        } else {
            file_response(hit, &fixed, asked.headers, head, &self.inner.metrics)
        };
        let status = resp.status();
        let h = resp.headers_mut();
        let mut set = |name: HeaderName, value: &str| {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        };
        if let Some(others) = &file.others {
            set(H_BINPLZ_CANDIDATES, others);
        }
        let cache_control = if req.rev.is_some() {
            "public, max-age=31536000, immutable"
        } else {
            "public, max-age=300"
        };
        h.insert(H_BINPLZ_CACHE, HeaderValue::from_static(hit.tier));
        // A 416 keeps its error's `no-store`: it is about one request's range, not the file.
        if status != StatusCode::RANGE_NOT_SATISFIABLE {
            h.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static(cache_control),
            );
        }
        self.inner.metrics.hit(hit.tier);
        (resp, hit.tier)
    }

    /// The verified file, from a cache tier or extracted once for all who ask.
    async fn file(
        &self,
        store_path: &str,
        path: &str,
        neg_key: impl FnOnce() -> String,
    ) -> Result<Hit, Failure> {
        let inner = &self.inner;
        if let Some(hit) = inner.files.cached(store_path, path).await.ok().flatten() {
            return Ok(hit);
        }
        let neg_key = neg_key();
        if let Some((kind, message)) = inner.negative.get(&neg_key).await {
            return Err(Failure::new(kind, message));
        }
        let sp = crate::extract::parse_store_path(store_path)
            .map_err(|e| Failure::new(ErrorKind::Internal, e.to_string()))?;
        let rel = RelPath::parse(path.as_bytes());
        let app = self.clone();
        let fetch = move |tmp: PathBuf| {
            let (app, sp, rel) = (app.clone(), sp.clone(), rel.clone());
            async move {
                let inner = &app.inner;
                let max_queued = inner.config.max_queued_fetches;
                if inner.queued.load(Ordering::Relaxed) >= max_queued as u64 {
                    return Err(ExtractError::QueueFull { queued: max_queued });
                }
                // Bounded, so that a request behind fetches that take long gets a 503 it
                // can retry, not a wait with no end in sight.
                let waiting = Instant::now();
                inner.queued.fetch_add(1, Ordering::Relaxed);
                let permit = tokio::time::timeout(
                    inner.config.upstream_queue_timeout,
                    inner.upstream_permits.acquire(),
                )
                .await;
                inner.queued.fetch_sub(1, Ordering::Relaxed);
                let Ok(Ok(_permit)) = permit else {
                    return Err(ExtractError::SlotWait {
                        waited: waiting.elapsed(),
                    });
                };
                let started = Instant::now();
                let siblings = Siblings {
                    dir: b"bin".to_vec(),
                    max_each: inner.config.max_file_size,
                    max_total: SIBLINGS_BUDGET,
                };
                let result = inner
                    .extractor
                    .extract_with_siblings(&sp, &rel, Some(&siblings), &tmp)
                    .await;
                inner.metrics.extraction(started.elapsed());
                inner.metrics.upstream_fetch(result.is_ok());
                match &result {
                    Ok((e, _)) if e.size > inner.config.max_file_size => {
                        return Err(ExtractError::Local(std::io::Error::other(TooLarge(e.size))));
                    }
                    Ok(_) => inner.readiness.ok(),
                    Err(e)
                        if matches!(e.kind(), ErrorKind::UpstreamBroken | ErrorKind::TimedOut) =>
                    {
                        inner.readiness.failed(true)
                    }
                    Err(e) if e.kind() == ErrorKind::VerificationFailed => {
                        inner.metrics.verification_failure()
                    }
                    Err(_) => {}
                }
                result
            }
        };
        match inner.files.get(store_path, path, fetch).await {
            Ok(hit) => Ok(hit),
            Err(e) => {
                let f = failure_of(&e, store_path);
                tracing::warn!(store_path, path, err = %e, "cannot serve");
                if f.kind == ErrorKind::NotInCache {
                    inner
                        .negative
                        .insert(neg_key, (f.kind, f.message.clone()))
                        .await;
                }
                Err(f)
            }
        }
    }
}

/// The parts of a program request that shape its answer, besides the route.
struct Asked<'a> {
    uri: &'a http::Uri,
    headers: &'a HeaderMap,
    head: bool,
    peer: IpAddr,
}

/// What a file is served as.
struct Served<'a> {
    program: &'a str,
    attr: &'a str,
    revision: Option<&'a str>,
    /// The other attributes that provide the program, for `X-Binplz-Candidates`.
    others: Option<String>,
}

/// What is wrong with a request's `Host` fields, if anything: RFC 9112 §3.2 makes an
/// HTTP/1.1 request without one, and any request with more than one, a 400. (HTTP/1.0
/// predates `Host`; HTTP/2 names the host in `:authority` instead.)
fn host_problem(version: Version, headers: &HeaderMap) -> Option<&'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Some("more than one Host header"),
        (None, _) if version == Version::HTTP_11 => Some("an HTTP/1.1 request needs a Host header"),
        _ => None,
    }
}

#[derive(Debug)]
struct TooLarge(u64);
impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the file is {} bytes, over this server's limit", self.0)
    }
}
impl std::error::Error for TooLarge {}

/// What a client is told about an extraction failure: a short message, never the
/// upstream's internals (those go to the log).
fn failure_of(e: &ExtractError, store_path: &str) -> Failure {
    if let ExtractError::Local(io) = e {
        if let Some(inner) = io.get_ref() {
            if let Some(t) = inner.downcast_ref::<TooLarge>() {
                return Failure::new(ErrorKind::Refused, t.to_string());
            }
        }
    }
    if let ExtractError::NeedsNixStore {
        store_path,
        path,
        reason,
        ..
    } = e
    {
        return Failure::new(
            ErrorKind::Refused,
            format!("{store_path}/{path} needs /nix/store at run time: {reason}"),
        );
    }
    let kind = e.kind();
    let message = match kind {
        ErrorKind::Refused => e.to_string(),
        ErrorKind::NotInCache => {
            format!("{store_path} is not in the binary cache yet; try again later")
        }
        ErrorKind::UpstreamBroken => "the upstream binary cache failed; try again later".to_owned(),
        ErrorKind::VerificationFailed => {
            format!("{store_path} failed verification against its signed hash; nothing was served")
        }
        ErrorKind::TimedOut => "the upstream binary cache timed out; try again later".to_owned(),
        ErrorKind::Overloaded => "too many downloads in progress; try again shortly".to_owned(),
        ErrorKind::UnknownProgram => format!("the file is not in {store_path}"),
        ErrorKind::BadRequest
        | ErrorKind::NotBuilt
        | ErrorKind::BuildFailed
        | ErrorKind::RateLimited
        | ErrorKind::Internal => "internal error".to_owned(),
    };
    Failure::new(kind, message)
}

/// Requests in progress per client address, in a fixed table of counters indexed by a keyed
/// hash of the address: taking and releasing a slot is one atomic operation each, where a
/// map under a mutex made every worker wait on every other. Two addresses that hash alike
/// share one budget; with [`CLIENT_SLOTS`] counters and a hash key chosen at random per
/// process that is rare and cannot be aimed at, and costs at worst an early 503.
struct ClientSlots {
    counts: Box<[AtomicU32]>,
    hasher: std::hash::RandomState,
}

/// Counters in [`ClientSlots`]: 64 KiB.
const CLIENT_SLOTS: usize = 1 << 14;

impl ClientSlots {
    fn new() -> ClientSlots {
        ClientSlots {
            counts: (0..CLIENT_SLOTS).map(|_| AtomicU32::new(0)).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// The counter's index, once counted; `None` when the address is at `max`.
    fn acquire(&self, ip: IpAddr, max: usize) -> Option<usize> {
        use std::hash::BuildHasher;
        let i = (self.hasher.hash_one(ip) as usize) % CLIENT_SLOTS;
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        self.counts[i]
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| i)
    }

    fn release(&self, i: usize) {
        self.counts[i].fetch_sub(1, Ordering::AcqRel);
    }
}

/// Releases a client's request slot when dropped.
struct ClientSlot<'a> {
    clients: &'a ClientSlots,
    slot: usize,
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        self.clients.release(self.slot);
    }
}

/// The headers of a file's responses that depend on the file alone (and on the name it is
/// served as), built once per file held in memory and cloned for each hit: building them
/// (hex, quoting, header validation, a dozen map inserts) cost as much as the rest of a
/// memory hit.
struct FileHeaders {
    /// The file's SHA-256 in hex.
    sha256: String,
    /// `"<sha256>"`.
    etag: String,
    /// The program name, attribute and Nixpkgs revision `file` was built for.
    program: Box<str>,
    attr: Box<str>,
    revision: Option<Box<str>>,
    /// `X-Nix-Store-Path`, `X-Binplz-Sha256`, `X-Binplz-Linkage`, `X-Nix-Attr`,
    /// `X-Nixpkgs-Revision`: on every response for the file, `.sha256` ones included.
    provenance: HeaderMap,
    /// The provenance headers, then `ETag`, `Accept-Ranges`, `Content-Type` and
    /// `Content-Disposition`: a full response's start.
    file: HeaderMap,
}

impl FileHeaders {
    /// The headers for `hit` served as `program` of `attr` from `revision`: from the hit's
    /// memo when it has them for those, else built (and kept in the memo, if there is one
    /// and it is empty).
    fn of(hit: &Hit, program: &str, attr: &str, revision: Option<&str>) -> Arc<FileHeaders> {
        let build = || Arc::new(FileHeaders::build(hit, program, attr, revision));
        let Some(memo) = &hit.memo else {
            return build();
        };
        let kept = memo.get_or_init(|| Box::new(build()));
        match kept.downcast_ref::<Arc<FileHeaders>>() {
            Some(f)
                if *f.program == *program
                    && *f.attr == *attr
                    && f.revision.as_deref() == revision =>
            {
                f.clone()
            }
            _ => build(),
        }
    }

    fn build(hit: &Hit, program: &str, attr: &str, revision: Option<&str>) -> FileHeaders {
        let sha256 = crate::hash::hex(&hit.meta.sha256);
        let etag = ["\"", &sha256, "\""].concat();
        let mut provenance = HeaderMap::with_capacity(PROVENANCE_HEADERS);
        fn set(h: &mut HeaderMap, name: HeaderName, value: &str) {
            if let Ok(v) = HeaderValue::from_str(value) {
                h.insert(name, v);
            }
        }
        set(&mut provenance, H_NIX_STORE_PATH, &hit.meta.store_path);
        set(&mut provenance, H_BINPLZ_SHA256, &sha256);
        set(&mut provenance, H_BINPLZ_LINKAGE, &hit.meta.linkage);
        set(&mut provenance, H_NIX_ATTR, attr);
        if let Some(rev) = revision {
            set(&mut provenance, H_NIXPKGS_REVISION, rev);
        }
        // Sized for the request's own headers too: each clone keeps this index table, so
        // adding them does not rehash.
        let mut file = HeaderMap::with_capacity(FILE_HEADERS + PROVENANCE_HEADERS);
        file.extend(provenance.clone());
        set(&mut file, header::ETAG, &etag);
        file.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        file.insert(header::CONTENT_TYPE, HeaderValue::from_static(OCTET_STREAM));
        let disposition = ["attachment; filename=\"", program, "\""].concat();
        set(&mut file, header::CONTENT_DISPOSITION, &disposition);
        FileHeaders {
            sha256,
            etag,
            program: program.into(),
            attr: attr.into(),
            revision: revision.map(Into::into),
            provenance,
            file,
        }
    }
}

/// The answer to a request over its client's `max_per_client`.
fn over_client_limit(head: bool) -> Response<Body> {
    error(
        ErrorKind::Overloaded,
        "too many requests from this address at once",
        head,
    )
}

/// The 200/206/304/416 response for a file, honouring `Range`, `If-Range` and
/// `If-None-Match` (see [`conditional`]).
fn file_response(
    hit: &Hit,
    fixed: &FileHeaders,
    headers: &HeaderMap,
    head: bool,
    metrics: &Metrics,
) -> Response<Body> {
    let size = hit.meta.size;
    let mut resp = Response::new(Body::empty());
    *resp.headers_mut() = fixed.file.clone();
    let (status, start, len) = match conditional::decide(headers, size, &fixed.etag) {
        Answer::NotModified => {
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            return resp;
        }
        Answer::Unsatisfiable => {
            // The error script, as for every error: `curl -r 99999- -o tree` saves it. The
            // file's provenance and `Content-Range` stay; its type and name do not.
            let msg = format!("the range is outside the file, which is {size} bytes");
            let mut err = error_status(StatusCode::RANGE_NOT_SATISFIABLE, &msg, head);
            let h = err.headers_mut();
            for (name, value) in &fixed.provenance {
                h.insert(name, value.clone());
            }
            if let Ok(v) = HeaderValue::from_str(&fixed.etag) {
                h.insert(header::ETAG, v);
            }
            h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            if let Ok(v) = HeaderValue::from_str(&conditional::unsatisfied_range(size)) {
                h.insert(header::CONTENT_RANGE, v);
            }
            return err;
        }
        Answer::Whole => (StatusCode::OK, 0, size),
        Answer::Part { start, len } => (StatusCode::PARTIAL_CONTENT, start, len),
    };
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    // A body's length goes out from the body itself (by hyper, or `h1`); only a `HEAD`
    // response, which has none, says it here.
    if head {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&conditional::content_range(start, len, size)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    if !head {
        *resp.body_mut() = match &hit.content {
            Content::Memory(b) => {
                let (s, e) = (start as usize, (start + len) as usize);
                Body::from(b.slice(s.min(b.len())..e.min(b.len())))
            }
            Content::File(f) => Body::file(f.clone(), start, len, metrics.disk_wait_counter()),
        };
    }
    resp
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and waits up
/// to the configured grace period for responses in progress and for extracted files still
/// being kept. Everything runs on the calling runtime.
pub async fn run(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    run_threads(listener, app, 1, shutdown).await
}

/// A connection handed from the accept loop to a serving thread, with its place under the
/// connection cap.
type Handoff = (std::net::TcpStream, SocketAddr, OwnedSemaphorePermit);

/// [`run`] on `threads` threads: this task accepts and serves its share of connections,
/// and hands the others in turn to threads of their own, each with a single-threaded
/// runtime that keeps its connections from start to end. Why: with one multi-threaded
/// runtime, workers woke each other and moved tasks (and their buffers) between threads
/// for every request; threads that each keep their connections serve about a fifth more
/// small files per second (`cargo bench --bench serve`), as nginx's workers do. One
/// socket and one accept loop, not a `SO_REUSEPORT` socket per thread: such a port can be
/// shared by another process of the same user, and a second `binplz serve` started on it
/// by mistake would silently answer some of the clients. All threads share one [`App`]:
/// caches, limits and metrics are the server's, not a thread's.
///
/// When `shutdown` resolves, accepting stops and every thread drains; each thread's
/// runtime lives until all have drained, since upstream connections made on one runtime
/// serve requests from the others.
pub async fn run_threads(
    listener: TcpListener,
    app: App,
    threads: usize,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let (release_tx, release_rx) = tokio::sync::watch::channel(false);
    let keeper = app.clone();
    let mut workers = Vec::with_capacity(threads.saturating_sub(1));
    let mut drained = Vec::with_capacity(threads.saturating_sub(1));
    let mut handles = Vec::with_capacity(threads.saturating_sub(1));
    for i in 1..threads.max(1) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Handoff>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let (app, mut release) = (app.clone(), release_rx.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(
            std::thread::Builder::new()
                .name(format!("binplz-serve-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        let conns = Connections::new(app);
                        // Until the accept loop drops its sender, at shutdown.
                        while let Some((stream, peer, permit)) = rx.recv().await {
                            match TcpStream::from_std(stream) {
                                Ok(s) => conns.serve(s, peer, permit),
                                Err(e) => tracing::warn!(err = %e, "cannot take a connection"),
                            }
                        }
                        conns.drain().await;
                        let _ = done_tx.send(());
                        let _ = release.wait_for(|r| *r).await;
                    });
                })?,
        );
        workers.push(tx);
        drained.push(done_rx);
    }

    let conns = Connections::new(app.clone());
    let connections = app.inner.connections.clone();
    let poller = {
        let app = app.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(app.inner.config.index_poll).await;
                app.reload_indexes(false).await;
            }
        })
    };
    let scrubber = app
        .inner
        .config
        .disk_scrub_period
        .map(|period| tokio::spawn(scrub::run(app.inner.files.disk_handle(), period)));
    tokio::pin!(shutdown);
    let mut turn = 0usize;
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(err = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        turn = (turn + 1) % (workers.len() + 1);
        let Some(worker) = turn.checked_sub(1).and_then(|w| workers.get(w)) else {
            conns.serve(stream, peer, permit);
            continue;
        };
        match stream.into_std() {
            Ok(std_stream) => {
                if let Err(back) = worker.send((std_stream, peer, permit)) {
                    // That thread is gone (it cannot be, short of a panic): serve here.
                    let (std_stream, peer, permit) = back.0;
                    if let Ok(s) = TcpStream::from_std(std_stream) {
                        conns.serve(s, peer, permit);
                    }
                }
            }
            Err(e) => tracing::warn!(err = %e, %peer, "cannot hand a connection over"),
        }
    }
    let stopping = tokio::time::Instant::now();
    poller.abort();
    if let Some(s) = scrubber {
        s.abort();
    }
    drop(listener);
    drop(workers);
    tracing::info!("shutting down: finishing responses in progress");
    conns.drain().await;
    for done in drained {
        let _ = done.await;
    }
    // Files fetched for responses already sent may still be being kept: finish that (on
    // the runtimes that started it), so that the next start finds them.
    let deadline = stopping + keeper.inner.config.shutdown_grace;
    if tokio::time::timeout_at(deadline, keeper.settled())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; extracted files left unkept");
    }
    let _ = release_tx.send(true);
    for h in handles {
        if let Ok(Err(_)) = tokio::task::spawn_blocking(move || h.join()).await {
            tracing::error!("a serving thread panicked");
        }
    }
    Ok(())
}

/// The connections one thread serves: hyper's settings, and what shutdown waits for.
struct Connections {
    app: App,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Arc<h1::Limits>,
    /// Turns true at shutdown; every connection holds a receiver until it ends, so
    /// [`Connections::drain`] waits for the last one to be dropped.
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Connections {
    fn new(app: App) -> Connections {
        let config = &app.inner.config;
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout)
            .keep_alive(true);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(64)
            .max_pending_accept_reset_streams(Some(64))
            .max_local_error_reset_streams(Some(64));
        let limits = h1::Limits {
            header_read_timeout: config.header_read_timeout,
            write_timeout: config.write_timeout,
        };
        Connections {
            app,
            builder: Arc::new(builder),
            limits: Arc::new(limits),
            shutdown: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Serves one connection on this thread's runtime: plain `GET` and `HEAD` requests in
    /// [`h1`], the rest of the connection from the first other one in hyper. `permit` is
    /// released when it ends.
    fn serve(&self, stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit) {
        let app = self.app.clone();
        let builder = self.builder.clone();
        let limits = self.limits.clone();
        let mut shutdown = self.shutdown.subscribe();
        tokio::spawn(async move {
            let mut io = io::EscapeTargets::deferred(stream);
            let read = if app.inner.config.hyper_only {
                io.escape(&mut bytes::BytesMut::new());
                bytes::Bytes::new()
            } else {
                match h1::serve(&mut io, &app, peer, &limits, &mut shutdown).await {
                    h1::Outcome::Closed => return drop(permit),
                    h1::Outcome::Handoff(read) => read,
                }
            };
            let service = hyper::service::service_fn({
                let app = app.clone();
                move |req: http::Request<hyper::body::Incoming>| {
                    let app = app.clone();
                    async move {
                        let (resp, access) = app
                            .handle(req.method(), req.uri(), req.version(), req.headers(), peer)
                            .await;
                        let resp = resp.map(|body| Logged::new(body, access, app));
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                }
            });
            let io = TokioIo::new(io::WriteTimeout::new(
                io::Prefixed::new(read, io),
                limits.write_timeout,
            ));
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                () = h1::stopped(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(err = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }

    /// Waits up to the grace period for this thread's connections to finish.
    async fn drain(self) {
        let grace = self.app.inner.config.shutdown_grace;
        self.shutdown.send_replace(true);
        if tokio::time::timeout(grace, self.shutdown.closed())
            .await
            .is_err()
        {
            tracing::warn!("shutdown grace period over; closing remaining connections");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paused, tokio's clock moves only when told, and the wall clock barely moves: as
    /// after the wall clock was stepped back, only the monotonic clock says a minute passed.
    #[tokio::test(start_paused = true)]
    async fn an_upstream_failure_makes_the_node_unready_for_a_minute_of_monotonic_time() {
        let r = Readiness::new();
        assert_eq!(r.unanswered(false), None);
        r.failed(true);
        assert_eq!(r.unanswered(false), Some(Duration::ZERO));
        assert_eq!(r.unanswered(true), Some(Duration::ZERO));
        tokio::time::advance(UNREADY_AFTER_FAILURE - Duration::from_millis(1)).await;
        assert!(r.unanswered(false).is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(r.unanswered(false), None);
        assert_eq!(r.unanswered(true), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_counts_for_a_minute_of_monotonic_time_and_ends_unreadiness() {
        let r = Readiness::new();
        r.failed(false);
        tokio::time::advance(Duration::from_millis(10)).await;
        r.ok();
        assert_eq!(r.unanswered(false), None);
        assert!(r.fresh_ok());
        tokio::time::advance(UNREADY_AFTER_FAILURE).await;
        assert!(!r.fresh_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_probes_are_spaced_by_the_interval_on_the_monotonic_clock() {
        let r = Readiness::new();
        let interval = Duration::from_secs(5);
        assert!(r.start_probe(interval));
        assert!(!r.start_probe(interval));
        tokio::time::advance(interval).await;
        assert!(r.start_probe(interval));
    }

    #[test]
    fn a_client_gets_at_most_its_limit_of_slots_and_them_back_when_released() {
        let slots = ClientSlots::new();
        let ip: IpAddr = [192, 0, 2, 1].into();
        let held: Vec<usize> = (0..3).filter_map(|_| slots.acquire(ip, 3)).collect();
        assert_eq!(held.len(), 3);
        assert_eq!(slots.acquire(ip, 3), None);
        // Other addresses are not held back by this one (but for the rare one that shares
        // its counter).
        let others = (2..=254u8)
            .filter_map(|b| slots.acquire(IpAddr::from([192, 0, 2, b]), 3))
            .count();
        assert!(others >= 250, "only {others} other addresses got a slot");
        slots.release(held[0]);
        assert_eq!(slots.acquire(ip, 3), Some(held[0]));
    }
}
