//! `binplz builder`: the one process that runs Nix. It turns "known but not built" into
//! builds, at a cost bounded by configuration, and remembers how each one ended.
//!
//! ```text
//!  POST /builds {drv_path, client} ─► named by a loaded index? ─► client's hourly limit
//!     ─► state (SQLite): queued ─► scheduler: --max-parallel, monthly budget
//!     ─► nix: nix-store --realise (limits, log captured) ─► classify failure
//!     ─► NAR sizes ─► nix copy to a signed file:// staging cache (+ log/<drv>)
//!     ─► publish: NARs, listings, logs, then narinfos ─► state: built
//! ```
//!
//! | module | owns |
//! |---|---|
//! | [`state`] | the SQLite database: queue, attempts, failures, budgets |
//! | [`nix`] | running Nix and classifying its failures |
//! | [`publish`] | staging cache → store URI, narinfo last |
//! | [`http`] | the HTTP API, metrics and health |
//! | [`page`] | the operator page |
//! | [`cli`] | `binplz builder`'s options |
//!
//! The edge (`src/server/`) never imports this module: it speaks the HTTP API.

pub mod cli;
pub mod http;
pub mod nix;
pub mod page;
pub mod publish;
pub mod state;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;

use crate::index::Index;
use crate::server::indexes::Indexes;
use publish::StoreUri;
use state::{Build, Requested, State, StateError};

/// Most tries of a build that keeps failing transiently (Hydra's number).
pub const MAX_TRIES: u32 = 5;

/// How a build failed, with Hydra's classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// The builder failed (Nix exit status 100).
    Failed,
    /// A dependency failed; the failure names it.
    DependencyFailed,
    /// `--timeout` or `--max-silent-time` (exit status 101).
    TimedOut,
    /// More log than `--max-log-size`.
    LogLimitExceeded,
    /// An output's NAR is larger than `--max-nar-size`.
    NarSizeLimitExceeded,
    /// A fixed-output derivation's hash did not match (exit status 102).
    HashMismatch,
    /// Anything else: retried at 60 s·3^(n−1), at most [`MAX_TRIES`] tries.
    Transient,
    /// Not built by decision: not in an index, a client over its limit, or cancelled.
    Refused,
}

impl FailureClass {
    pub const ALL: [FailureClass; 8] = [
        FailureClass::Failed,
        FailureClass::DependencyFailed,
        FailureClass::TimedOut,
        FailureClass::LogLimitExceeded,
        FailureClass::NarSizeLimitExceeded,
        FailureClass::HashMismatch,
        FailureClass::Transient,
        FailureClass::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Failed => "failed",
            FailureClass::DependencyFailed => "dependency_failed",
            FailureClass::TimedOut => "timed_out",
            FailureClass::LogLimitExceeded => "log_limit_exceeded",
            FailureClass::NarSizeLimitExceeded => "nar_size_limit_exceeded",
            FailureClass::HashMismatch => "hash_mismatch",
            FailureClass::Transient => "transient",
            FailureClass::Refused => "refused",
        }
    }

    pub fn parse(s: &str) -> Option<FailureClass> {
        FailureClass::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// How a build ended badly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub class: FailureClass,
    /// Never retried by itself.
    pub permanent: bool,
    /// One line for people.
    pub reason: String,
    /// The dependency that failed (`DependencyFailed` only).
    pub dependency: Option<String>,
}

/// The validated configuration of `binplz builder`.
#[derive(Debug, Clone)]
pub struct Config {
    pub indexes: Vec<PathBuf>,
    pub max_index_size: u64,
    pub index_poll: Duration,
    pub store: StoreUri,
    pub secret_key_file: PathBuf,
    pub state_dir: PathBuf,
    pub max_parallel: usize,
    pub timeout: Duration,
    pub max_silent_time: Duration,
    pub max_log_size: u64,
    pub max_nar_size: u64,
    pub cores: u32,
    /// Build seconds a month.
    pub monthly_budget: f64,
    pub per_client_builds: u32,
    /// The first transient retry's delay (60 s); the n-th waits this × 3^(n−1).
    pub retry_delay: Duration,
    /// `None`: read-only (no retry or cancel).
    pub operator_token: Option<OperatorToken>,
}

/// The operator's secret; never printed.
#[derive(Clone)]
pub struct OperatorToken(String);

impl OperatorToken {
    pub fn new(token: String) -> OperatorToken {
        OperatorToken(token)
    }

    /// Compares in time independent of where the first difference is.
    pub fn matches(&self, given: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), given.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperatorToken(…)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuilderError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{0}")]
    Index(String),
}

/// A request's answer, before it becomes JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Existing(Build),
    Queued(Build),
    /// No loaded index names the derivation.
    NotInIndex,
    /// The client's hourly limit is spent; seconds until it may ask again.
    OverClientLimit {
        retry_after: u64,
    },
}

/// The derivations some loaded index names, and those indexes (to see when one changed).
#[derive(Default)]
struct Allowed {
    indexes: Vec<Arc<Index>>,
    drvs: HashSet<String>,
}

/// The builder: configuration, state, indexes and the scheduler's wake-up. Cheap to clone.
#[derive(Clone)]
pub struct Builder {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    state: State,
    indexes: Indexes,
    /// Derivations the loaded indexes name, with the indexes they were read from.
    allowed: RwLock<Allowed>,
    wake: Notify,
    /// Running builds: derivation → (started, cancel).
    running: std::sync::Mutex<BTreeMap<String, (Instant, Arc<Notify>)>>,
    started: Instant,
}

/// Now, in Unix seconds (what is stored and shown).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The base name of a store path (`…/abc-hello.drv` → `abc-hello.drv`).
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A derivation path as the API accepts it: `/nix/store/<32 nix32 chars>-<name>.drv`.
pub fn parse_drv_path(s: &str) -> Option<&str> {
    let base = s.strip_prefix("/nix/store/")?;
    nix_derivation::StorePath::from_basename(base.as_bytes()).ok()?;
    (base.ends_with(".drv") && base.len() > 37).then_some(s)
}

impl Builder {
    /// Opens the state, loads the indexes and prepares the directories under the state
    /// directory.
    pub fn open(config: Config) -> Result<Builder, BuilderError> {
        for sub in ["", "logs", "staging", "roots"] {
            let dir = config.state_dir.join(sub);
            std::fs::create_dir_all(&dir).map_err(|err| BuilderError::Io {
                path: dir.display().to_string(),
                err,
            })?;
        }
        if let StoreUri::File(store_dir) = &config.store {
            std::fs::create_dir_all(store_dir).map_err(|err| BuilderError::Io {
                path: store_dir.display().to_string(),
                err,
            })?;
        }
        let state = State::open(&config.state_dir)?;
        let sources = config
            .indexes
            .iter()
            .cloned()
            .map(crate::server::IndexSource::File)
            .collect();
        let indexes = Indexes::load(sources, config.max_index_size).map_err(BuilderError::Index)?;
        let builder = Builder {
            inner: Arc::new(Inner {
                config,
                state,
                indexes,
                allowed: RwLock::new(Allowed::default()),
                wake: Notify::new(),
                running: std::sync::Mutex::new(BTreeMap::new()),
                started: Instant::now(),
            }),
        };
        builder.refresh_allowed();
        Ok(builder)
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn state(&self) -> &State {
        &self.inner.state
    }

    /// Re-reads the set of allowed derivations when an index was replaced.
    fn refresh_allowed(&self) {
        let now = self.inner.indexes.all();
        let same = match self.inner.allowed.read() {
            Ok(a) => {
                a.indexes.len() == now.len()
                    && a.indexes.iter().zip(&now).all(|(x, y)| Arc::ptr_eq(x, y))
            }
            Err(_) => false,
        };
        if same {
            return;
        }
        let drvs: HashSet<String> = now
            .iter()
            .flat_map(|i| i.drv_paths().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        tracing::info!(derivations = drvs.len(), "derivations the indexes name");
        if let Ok(mut a) = self.inner.allowed.write() {
            *a = Allowed { indexes: now, drvs };
        }
    }

    /// Reloads changed index files (as `serve` does) and the allowed derivations.
    pub async fn reload_indexes(&self, force: bool) {
        let b = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            b.inner.indexes.reload(force);
            b.refresh_allowed();
        })
        .await;
    }

    fn is_allowed(&self, drv_path: &str) -> bool {
        self.inner
            .allowed
            .read()
            .map(|a| a.drvs.contains(drv_path))
            .unwrap_or(false)
    }

    /// `POST /builds`.
    pub fn request(&self, drv_path: &str, client: &str) -> Result<Answer, BuilderError> {
        if let Some(b) = self.inner.state.get(drv_path)? {
            return Ok(Answer::Existing(b));
        }
        if !self.is_allowed(drv_path) {
            return Ok(Answer::NotInIndex);
        }
        let c = &self.inner.config;
        Ok(
            match self
                .inner
                .state
                .request(drv_path, client, c.per_client_builds, unix_now())?
            {
                Requested::Existing(b) => Answer::Existing(b),
                Requested::New(b) => {
                    self.inner.wake.notify_one();
                    Answer::Queued(b)
                }
                Requested::OverClientLimit => Answer::OverClientLimit { retry_after: 3600 },
            },
        )
    }

    /// Why queued builds are held back, if they are.
    pub fn waiting(&self) -> Result<Option<String>, BuilderError> {
        let budget = self.inner.config.monthly_budget;
        let used = self.inner.state.used_seconds(unix_now())?;
        Ok((used >= budget).then(|| {
            format!(
                "the monthly build budget ({} h) is spent",
                trim_float(budget / 3600.0)
            )
        }))
    }

    /// Seconds since each running build started.
    pub fn running(&self) -> Vec<(String, Duration)> {
        self.inner
            .running
            .lock()
            .map(|r| {
                r.iter()
                    .map(|(d, (t, _))| (d.clone(), t.elapsed()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// The operator's retry.
    pub fn retry(&self, drv_path: &str) -> Result<Option<Build>, BuilderError> {
        let b = self.inner.state.retry(drv_path)?;
        self.inner.wake.notify_one();
        Ok(b)
    }

    /// The operator's cancel: a running build's Nix is stopped.
    pub fn cancel(&self, drv_path: &str) -> Result<Option<Build>, BuilderError> {
        let before = self.inner.state.cancel(drv_path, unix_now())?;
        if let Ok(r) = self.inner.running.lock() {
            if let Some((_, stop)) = r.get(drv_path) {
                stop.notify_one();
            }
        }
        Ok(match before {
            Some(_) => self.inner.state.get(drv_path)?,
            None => None,
        })
    }

    /// The log of a build, decompressed, if one was kept.
    pub fn log(&self, drv_path: &str) -> Option<Vec<u8>> {
        let file = std::fs::File::open(self.log_file(drv_path)).ok()?;
        zstd::decode_all(file).ok()
    }

    fn log_file(&self, drv_path: &str) -> PathBuf {
        // A validated derivation path's base name: no `/`, no `..`.
        self.inner
            .config
            .state_dir
            .join("logs")
            .join(format!("{}.zst", basename(drv_path)))
    }

    /// The scheduler: starts queued builds while fewer than `--max-parallel` run and the
    /// month's budget lasts; requeues transient failures when their time comes. Runs until
    /// the task is dropped.
    pub async fn schedule(self) {
        loop {
            if let Err(e) = self.start_what_can_start() {
                tracing::error!(err = %e, "scheduler");
            }
            // Woken by a request, a finished build, an operator; else by the next retry.
            let next_retry = self.inner.state.next_retry().ok().flatten();
            let sleep = next_retry
                .map(|at| Duration::from_secs(at.saturating_sub(unix_now()).max(0) as u64))
                .unwrap_or(Duration::from_secs(60))
                .clamp(Duration::from_millis(200), Duration::from_secs(60));
            tokio::select! {
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    fn start_what_can_start(&self) -> Result<(), BuilderError> {
        let now = unix_now();
        self.inner.state.requeue_due(now)?;
        loop {
            let running = self.inner.running.lock().map(|r| r.len()).unwrap_or(0);
            if running >= self.inner.config.max_parallel || self.waiting()?.is_some() {
                return Ok(());
            }
            let Some(build) = self.inner.state.start_next(unix_now())? else {
                return Ok(());
            };
            let stop = Arc::new(Notify::new());
            if let Ok(mut r) = self.inner.running.lock() {
                r.insert(build.drv_path.clone(), (Instant::now(), stop.clone()));
            }
            let b = self.clone();
            tokio::spawn(async move {
                let drv = build.drv_path.clone();
                b.run_build(build, stop).await;
                if let Ok(mut r) = b.inner.running.lock() {
                    r.remove(&drv);
                }
                b.inner.wake.notify_one();
            });
        }
    }

    /// One attempt of one build, start to end, its outcome stored.
    async fn run_build(&self, build: Build, stop: Arc<Notify>) {
        let drv = build.drv_path.clone();
        let started = Instant::now();
        tracing::info!(drv = %drv, attempt = build.attempts, "build started");
        let (outcome, log) = self.attempt(&drv, &stop).await;
        let has_log = match &log {
            Some(l) => self.keep_log(&drv, l).await,
            None => false,
        };
        let seconds = started.elapsed().as_secs_f64();
        let outcome = match outcome {
            Ok(()) => Ok(()),
            Err(mut f) => {
                let retry_at = if f.class == FailureClass::Transient {
                    if build.attempts >= MAX_TRIES {
                        f.permanent = true;
                        f.reason = format!("{} (gave up after {MAX_TRIES} tries)", f.reason);
                        None
                    } else {
                        let delay = self.inner.config.retry_delay.as_secs_f64()
                            * 3f64.powi(build.attempts.saturating_sub(1) as i32);
                        Some(unix_now() + delay.ceil() as i64)
                    }
                } else {
                    None
                };
                Err((f, retry_at))
            }
        };
        match &outcome {
            Ok(()) => tracing::info!(drv = %drv, seconds, "built"),
            Err((f, retry_at)) => {
                tracing::warn!(drv = %drv, class = f.class.as_str(), reason = %f.reason, ?retry_at, "build failed")
            }
        }
        if let Err(e) = self
            .inner
            .state
            .finish(&drv, outcome, has_log, seconds, unix_now())
        {
            tracing::error!(drv = %drv, err = %e, "cannot record a build's end");
        }
    }

    /// Realise, check sizes, copy, publish. Returns the outcome and the log.
    async fn attempt(&self, drv: &str, stop: &Notify) -> (Result<(), Failure>, Option<Vec<u8>>) {
        let c = &self.inner.config;
        let transient = |reason: String| Failure {
            class: FailureClass::Transient,
            permanent: false,
            reason,
            dependency: None,
        };
        let d = drv.to_owned();
        match tokio::task::spawn_blocking(move || nix::outputs_of(&d)).await {
            Ok(Ok(outputs)) => {
                if let Err(e) = self.inner.state.set_outputs(drv, &outputs) {
                    tracing::warn!(drv = %drv, err = %e, "cannot record outputs");
                }
            }
            Ok(Err(e)) => tracing::warn!(drv = %drv, err = %e, "outputs unknown"),
            Err(_) => {}
        }
        let limits = nix::Limits {
            timeout: c.timeout,
            max_silent_time: c.max_silent_time,
            max_log_size: c.max_log_size,
            cores: c.cores,
            roots: c.state_dir.join("roots"),
        };
        let realised = match nix::realise(drv, &limits, stop.notified()).await {
            Ok(r) => r,
            Err(e) => return (Err(transient(e.to_string())), None),
        };
        let log = Some(realised.log);
        if realised.code != Some(0) {
            let log_bytes = log.as_deref().unwrap_or_default();
            return (Err(nix::classify(drv, realised.code, log_bytes)), log);
        }
        if realised.paths.is_empty() {
            return (
                Err(transient("nix-store --realise named no output".into())),
                log,
            );
        }
        match nix::nar_sizes(&realised.paths).await {
            Ok(sizes) => {
                if let Some((path, size)) = sizes.iter().find(|(_, s)| *s > c.max_nar_size) {
                    let f = Failure {
                        class: FailureClass::NarSizeLimitExceeded,
                        permanent: true,
                        reason: format!(
                            "{path} is {size} bytes as a NAR, over the limit of {} (--max-nar-size)",
                            c.max_nar_size
                        ),
                        dependency: None,
                    };
                    return (Err(f), log);
                }
            }
            Err(e) => return (Err(transient(e.to_string())), log),
        }
        let staging = match tempfile::Builder::new()
            // Only the hash part: the directory becomes part of a `file://…?…` URL given to
            // `nix copy`, and a derivation's name may hold `?`, `&` or `=`.
            .prefix(basename(drv).get(..32).unwrap_or("build"))
            .tempdir_in(c.state_dir.join("staging"))
        {
            Ok(s) => s,
            Err(e) => return (Err(transient(format!("staging directory: {e}"))), log),
        };
        if let Err(e) = nix::copy_to(staging.path(), &c.secret_key_file, &realised.paths).await {
            return (Err(transient(e.to_string())), log);
        }
        if let Err(e) = write_staged_log(staging.path(), drv, log.as_deref().unwrap_or_default()) {
            return (Err(transient(e.to_string())), log);
        }
        if let Err(e) = publish::publish(&c.store, staging.path()).await {
            return (Err(transient(e.to_string())), log);
        }
        nix::drop_roots(&limits.roots, drv);
        (Ok(()), log)
    }

    /// Keeps the log compressed in the state directory; whether it was kept.
    async fn keep_log(&self, drv: &str, log: &[u8]) -> bool {
        let path = self.log_file(drv);
        let log = log.to_vec();
        let kept = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let bytes = zstd::encode_all(log.as_slice(), 3)?;
            let dir = path.parent().unwrap_or(Path::new("."));
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            std::io::Write::write_all(&mut tmp, &bytes)?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        })
        .await;
        match kept {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(drv = %drv, err = %e, "cannot keep a build log");
                false
            }
            Err(_) => false,
        }
    }
}

/// The build log where Nix clients look for it: `log/<drv basename>` in the cache.
fn write_staged_log(staging: &Path, drv: &str, log: &[u8]) -> std::io::Result<()> {
    let dir = staging.join("log");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(basename(drv)), log)
}

/// `1.5` for 1.5, `100` for 100.0.
pub fn trim_float(x: f64) -> String {
    let s = format!("{x:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// Serves the builder on `listener` and runs its scheduler and index poller until
/// `shutdown` resolves.
pub async fn run(
    listener: tokio::net::TcpListener,
    builder: Builder,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let scheduler = tokio::spawn(builder.clone().schedule());
    let poller = {
        let b = builder.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(b.inner.config.index_poll).await;
                b.reload_indexes(false).await;
            }
        })
    };
    let served = http::serve(listener, builder, shutdown).await;
    scheduler.abort();
    poller.abort();
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivation_paths_are_store_paths_ending_in_drv() {
        let ok = "/nix/store/xc1rp0dgaw8xwlkc5akmjbj4r87fi5wm-hello-1.0.drv";
        assert_eq!(parse_drv_path(ok), Some(ok));
        for bad in [
            "/nix/store/xc1rp0dgaw8xwlkc5akmjbj4r87fi5wm-hello-1.0",
            "/nix/store/xc1rp0dgaw8xwlkc5akmjbj4r87fi5wm-../../etc.drv",
            "/tmp/xc1rp0dgaw8xwlkc5akmjbj4r87fi5wm-hello.drv",
            "/nix/store/short-hello.drv",
            "",
        ] {
            assert_eq!(parse_drv_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn failure_classes_round_trip_through_their_names() {
        for c in FailureClass::ALL {
            assert_eq!(FailureClass::parse(c.as_str()), Some(c));
        }
    }

    #[test]
    fn the_operator_token_is_compared_whole_and_never_printed() {
        let t = OperatorToken::new("s3cret".into());
        assert!(t.matches("s3cret"));
        assert!(!t.matches("s3cre") && !t.matches("s3cret!") && !t.matches(""));
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
