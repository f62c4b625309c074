//! Programs the index knows but the cache does not have yet, on an edge started with
//! `--builder URL`: the edge asks `binplz builder` to build the derivation and tells the
//! client what is happening, until the outputs are in the cache and the program is served
//! like any other.
//!
//! ```text
//!  GET /tree ─► index: NotBuilt { store_path, drv_path }
//!     ─► Builder::ask: answers kept `answer_ttl`, one question per derivation at a time
//!          (moka: a herd of requests is one POST /builds)
//!     ─► queued / building / transient failure ─► 503, Retry-After, "tree is being built: 2
//!                                                  builds ahead of it" + the curl that waits
//!        built ─► the caller serves bin/tree from the output (narinfo + NAR from the upstreams)
//!        failed for good ─► 424: class, reason, log URL   refused ─► 429 (client limit) / 422
//!        builder down or broken ─► 503 with Retry-After (never remembered)
//! ```
//!
//! Programs the index says are built never come here: the builder can neither slow them
//! down nor take them down.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Args;

use super::Failure;
use crate::error::ErrorKind;
use crate::upstream::builder::{Answer, BuilderClient, BuilderError, State};

/// Longest `Retry-After` given for a build that waits for its next try.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How many times the suggested `curl` command retries.
const CURL_RETRIES: u32 = 30;

/// `binplz serve`'s options for building on demand.
#[derive(Debug, Clone, Args)]
pub struct BuilderArgs {
    /// A `binplz builder` to ask for programs that are not built yet (http:// or https://).
    /// Without it, such programs are answered 503 until the index says they are built.
    /// List the builder's store among the --upstream caches and its key among the trusted
    /// keys, so that what it builds is served.
    #[arg(long = "builder", value_name = "URL", env = "BINPLZ_BUILDER")]
    pub url: Option<String>,

    /// Longest a question to the builder may take (e.g. 5s, 500ms).
    #[arg(long, value_name = "DURATION", env = "BINPLZ_BUILDER_TIMEOUT", default_value = "5s", value_parser = crate::cli::parse_duration)]
    pub builder_timeout: Duration,

    /// How long the builder's answer about a derivation is kept: requests in that time get
    /// the same answer without asking again.
    #[arg(long, value_name = "DURATION", env = "BINPLZ_BUILDER_ANSWER_TTL", default_value = "3s", value_parser = crate::cli::parse_duration)]
    pub builder_answer_ttl: Duration,

    /// The Retry-After sent while a program is being built.
    #[arg(long, value_name = "DURATION", env = "BINPLZ_BUILDER_RETRY_AFTER", default_value = "20s", value_parser = crate::cli::parse_duration)]
    pub builder_retry_after: Duration,

    /// The builder's address as users can reach it, for links to build logs [default: the
    /// --builder URL].
    #[arg(long, value_name = "URL", env = "BINPLZ_BUILDER_PUBLIC_URL")]
    pub builder_public_url: Option<String>,
}

impl BuilderArgs {
    /// The settings, when a builder was given.
    pub fn settings(&self) -> Option<BuilderSettings> {
        let url = self.url.clone()?;
        Some(BuilderSettings {
            public_url: self
                .builder_public_url
                .clone()
                .unwrap_or_else(|| url.clone()),
            url,
            timeout: self.builder_timeout,
            answer_ttl: self.builder_answer_ttl,
            retry_after: self.builder_retry_after,
        })
    }
}

/// Where the builder is and how the edge talks to it.
#[derive(Debug, Clone)]
pub struct BuilderSettings {
    pub url: String,
    /// The builder's URL as users reach it (log links).
    pub public_url: String,
    pub timeout: Duration,
    pub answer_ttl: Duration,
    /// `Retry-After` while a build is queued or running (at least one second is sent).
    pub retry_after: Duration,
}

/// The builder, as one edge node asks it.
pub(super) struct Builder {
    client: BuilderClient,
    settings: BuilderSettings,
    /// The last answer per derivation; concurrent misses share one question.
    answers: moka::future::Cache<String, Answer>,
    metrics: BuilderMetrics,
}

/// Counters of questions to the builder.
#[derive(Debug, Default)]
struct BuilderMetrics {
    /// Answers, by the state they gave.
    answered: [AtomicU64; State::ALL.len()],
    errors: AtomicU64,
}

impl BuilderMetrics {
    fn answered_total(&self) -> u64 {
        self.answered
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }
}

/// What a not-built program's request gets from the builder's answer.
pub(super) enum Verdict {
    /// Built: serve the program from its output.
    Built,
    /// Not (yet) servable: the error to answer with.
    Wait(Failure),
}

impl Builder {
    pub(super) fn new(settings: BuilderSettings) -> Result<Builder, String> {
        let client =
            BuilderClient::new(&settings.url, settings.timeout).map_err(|e| e.to_string())?;
        let answers = moka::future::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(settings.answer_ttl)
            .build();
        Ok(Builder {
            client,
            settings,
            answers,
            metrics: BuilderMetrics::default(),
        })
    }

    /// The builder's state for `drv_path`: remembered for `answer_ttl`, or asked once for
    /// every request waiting on it. Errors are not remembered.
    async fn ask(&self, drv_path: &str, client: IpAddr) -> Result<Answer, Arc<BuilderError>> {
        let m = &self.metrics;
        self.answers
            .try_get_with(drv_path.to_owned(), async {
                let answer = self.client.ask(drv_path, &client.to_string()).await;
                match &answer {
                    Ok(a) => {
                        let i = State::ALL.iter().position(|s| *s == a.status.state);
                        if let Some(i) = i {
                            m.answered[i].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        m.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                answer
            })
            .await
    }

    /// Asks the builder about `drv_path` (which builds `store_path`, providing `program`)
    /// for a request to `url` from `client`.
    pub(super) async fn verdict(
        &self,
        drv_path: &str,
        client: IpAddr,
        program: &str,
        url: &str,
    ) -> Verdict {
        let answer = match self.ask(drv_path, client).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(drv_path, err = %e, "the builder did not answer");
                return Verdict::Wait(self.waiting(
                    ErrorKind::NotBuilt,
                    format!(
                        "{program} is not built yet, and the builder cannot be asked right now"
                    ),
                    self.settings.retry_after,
                    url,
                    program,
                ));
            }
        };
        let status = &answer.status;
        let retry = self.settings.retry_after;
        match status.state {
            State::Built => Verdict::Built,
            State::Queued => {
                let msg = match (&status.waiting, status.position) {
                    (Some(why), _) => format!("{program} is waiting to be built: {why}"),
                    (None, Some(0) | None) => format!("{program} is being built: next in line"),
                    (None, Some(1)) => format!("{program} is being built: 1 build ahead of it"),
                    (None, Some(n)) => format!("{program} is being built: {n} builds ahead of it"),
                };
                Verdict::Wait(self.waiting(ErrorKind::NotBuilt, msg, retry, url, program))
            }
            State::Building => Verdict::Wait(self.waiting(
                ErrorKind::NotBuilt,
                format!("{program} is being built now"),
                retry,
                url,
                program,
            )),
            State::Failed => self.failed(&answer, program, url),
            State::Refused => {
                let reason = status
                    .failure
                    .as_ref()
                    .map_or("no reason given", |f| f.reason.as_str());
                match answer.retry_after {
                    // Over the client's limit of new builds: it may ask again later.
                    Some(after) => Verdict::Wait(self.waiting(
                        ErrorKind::RateLimited,
                        format!("{program} is not built, and this address may start no more builds for now: {reason}"),
                        after,
                        url,
                        program,
                    )),
                    None => Verdict::Wait(Failure::new(
                        ErrorKind::Refused,
                        format!("{program} is not built, and the builder will not build it: {reason}"),
                    )),
                }
            }
        }
    }

    /// A failed build: transient ones wait for their next try, permanent ones say why.
    fn failed(&self, answer: &Answer, program: &str, url: &str) -> Verdict {
        let status = &answer.status;
        let Some(f) = &status.failure else {
            return Verdict::Wait(Failure::new(
                ErrorKind::BuildFailed,
                format!("{program} failed to build"),
            ));
        };
        if let (false, Some(at)) = (f.permanent, status.retry_at) {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let wait = Duration::from_secs(at.saturating_sub(now))
                .clamp(self.settings.retry_after, MAX_RETRY_AFTER);
            return Verdict::Wait(self.waiting(
                ErrorKind::NotBuilt,
                format!(
                    "{program} is not built: its build failed ({}: {}) and will be tried again in {}s",
                    f.class,
                    f.reason,
                    wait.as_secs()
                ),
                wait,
                url,
                program,
            ));
        }
        let mut lines = vec![format!(
            "{program} failed to build ({}): {}",
            f.class, f.reason
        )];
        if let Some(dep) = &f.dependency {
            lines.push(format!("the dependency that failed: {dep}"));
        }
        if let Some(log) = &f.log {
            let base = self.settings.public_url.trim_end_matches('/');
            let sep = if log.starts_with('/') { "" } else { "/" };
            lines.push(format!("build log: {base}{sep}{log}"));
        }
        Verdict::Wait(Failure::lines(ErrorKind::BuildFailed, lines, None))
    }

    /// A failure the client should retry after `after`, with the command that does so.
    fn waiting(
        &self,
        kind: ErrorKind,
        msg: String,
        after: Duration,
        url: &str,
        program: &str,
    ) -> Failure {
        let after = after.max(Duration::from_secs(1));
        let wait = format!("to wait for it: curl --retry {CURL_RETRIES} -fsSL {url} -o {program}");
        Failure::lines(kind, vec![msg, wait], Some(after))
    }

    /// Lines for `/-/metrics`.
    pub(super) fn render_metrics(&self, body: &mut String) {
        let m = &self.metrics;
        super::metrics::render_labelled(
            body,
            "binplz_builder_questions_total",
            "Questions sent to the builder (POST /builds), by whether it answered with a state or failed to (unreachable, timed out, a wrong answer).",
            "result",
            [
                ("answered", m.answered_total()),
                ("error", m.errors.load(Ordering::Relaxed)),
            ],
        );
        let mut by_state = [("", 0u64); State::ALL.len()];
        for (slot, (state, n)) in by_state.iter_mut().zip(State::ALL.iter().zip(&m.answered)) {
            *slot = (state.label(), n.load(Ordering::Relaxed));
        }
        super::metrics::render_labelled(
            body,
            "binplz_builder_answers_total",
            "The builder's answers, by the build's state.",
            "state",
            by_state,
        );
    }
}

/// What a request for a program built on demand gets when serving the built output failed:
/// a missing program says so; the rest as for any file.
pub(super) fn after_built(f: Failure, program: &str, store_path: &str) -> Failure {
    match f.kind {
        ErrorKind::UnknownProgram => Failure::new(
            ErrorKind::UnknownProgram,
            format!("{program} was built, but {store_path} has no bin/{program}"),
        ),
        _ => f,
    }
}
