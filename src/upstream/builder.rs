//! The client of `binplz builder`'s HTTP API, as an edge node uses it: ask for a
//! derivation to be built (`POST /builds`) and read the answer, the build's state document.
//!
//! The edge knows the builder only through this contract (JSON over HTTP), never through
//! its code: the two run as separate processes, usually on separate machines. Every answer
//! is bounded (time and size) and parsed strictly into typed values; anything else is a
//! [`BuilderError`] the edge turns into a 503 its clients retry.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use super::http::{connector, error_chain, Connector};

/// Largest answer read from the builder. A state document is a few hundred bytes (one
/// failure reason, a few outputs); anything this large is not one.
pub const MAX_ANSWER_SIZE: usize = 64 << 10;

/// What the builder says of a build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Building,
    Built,
    Failed,
    Refused,
}

impl State {
    /// The state's name in the API, for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Building => "building",
            State::Built => "built",
            State::Failed => "failed",
            State::Refused => "refused",
        }
    }

    pub const ALL: [State; 5] = [
        State::Queued,
        State::Building,
        State::Built,
        State::Failed,
        State::Refused,
    ];
}

/// Why a build failed, or was refused.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BuildFailure {
    /// `failed`, `dependency_failed`, `timed_out`, `log_limit_exceeded`,
    /// `nar_size_limit_exceeded`, `hash_mismatch`, `transient` or `refused`; kept as text so
    /// that a class added to the builder later still reaches the user.
    pub class: String,
    #[serde(default)]
    pub permanent: bool,
    #[serde(default)]
    pub reason: String,
    pub dependency: Option<String>,
    /// The log's path on the builder (`/builds/<drv>/log`).
    pub log: Option<String>,
}

/// The builder's state document for one derivation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BuildStatus {
    pub drv_path: String,
    pub state: State,
    /// Queued only: builds ahead of this one (0: next to start).
    pub position: Option<u64>,
    pub attempts: Option<u32>,
    /// Output name → store path.
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    pub failure: Option<BuildFailure>,
    /// A transient failure's next try, in Unix seconds.
    pub retry_at: Option<u64>,
    /// Why a queued build is held back.
    pub waiting: Option<String>,
}

/// The answer to one question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: BuildStatus,
    /// The builder's `Retry-After`, when it sent one (a refusal over a client's limit).
    pub retry_after: Option<Duration>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BuilderError {
    #[error("invalid builder URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("cannot reach the builder at {url}: {err}")]
    Unreachable { url: String, err: String },
    #[error("the builder at {url} did not answer within {limit:?}")]
    TimedOut { url: String, limit: Duration },
    #[error("the builder at {url} answered HTTP {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("the builder at {url} answered more than {MAX_ANSWER_SIZE} bytes")]
    TooLarge { url: String },
    #[error("the builder at {url} answered something that is not a state document: {err}")]
    BadAnswer { url: String, err: String },
    #[error("the builder at {url} answered for {got}, not {asked}")]
    WrongDerivation {
        url: String,
        asked: String,
        got: String,
    },
}

/// `binplz builder`'s API at one URL.
#[derive(Debug, Clone)]
pub struct BuilderClient {
    /// Without a trailing `/`.
    url: String,
    client: Client<Connector, Full<Bytes>>,
    timeout: Duration,
}

#[derive(serde::Serialize)]
struct Ask<'a> {
    drv_path: &'a str,
    client: &'a str,
}

impl BuilderClient {
    /// A client for the builder at `url` (`http://` or `https://`); each question, from
    /// connecting to the end of the answer, takes at most `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<BuilderClient, BuilderError> {
        let invalid = |reason| BuilderError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let uri: http::Uri = url.parse().map_err(|_| invalid("not a valid URL"))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(invalid("not an http:// or https:// URL"));
        }
        let https = connector(timeout).ok_or(invalid("no TLS protocol version available"))?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(BuilderClient {
            url: url.trim_end_matches('/').to_owned(),
            client,
            timeout,
        })
    }

    /// The builder's URL, without a trailing `/`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `POST /builds`: asks for `drv_path` to be built for `client` (an address) and
    /// returns the build's state, whether it was new, known or refused.
    pub async fn ask(&self, drv_path: &str, client: &str) -> Result<Answer, BuilderError> {
        let url = format!("{}/builds", self.url);
        let body =
            serde_json::to_vec(&Ask { drv_path, client }).map_err(|e| BuilderError::BadAnswer {
                url: url.clone(),
                err: e.to_string(),
            })?;
        let req = Request::post(&url)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("binplz/", env!("CARGO_PKG_VERSION")),
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| BuilderError::InvalidUrl {
                url: url.clone(),
                reason: "not a valid URL",
            })?;
        let (status, retry_after, bytes) =
            match tokio::time::timeout(self.timeout, self.exchange(&url, req)).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(BuilderError::TimedOut {
                        url,
                        limit: self.timeout,
                    })
                }
            };
        let parsed = serde_json::from_slice::<BuildStatus>(&bytes);
        let status = match (status, parsed) {
            // Refusals (403, 429) carry the state document too.
            (
                StatusCode::OK
                | StatusCode::ACCEPTED
                | StatusCode::FORBIDDEN
                | StatusCode::TOO_MANY_REQUESTS,
                Ok(doc),
            ) => doc,
            (StatusCode::OK | StatusCode::ACCEPTED, Err(e)) => {
                return Err(BuilderError::BadAnswer {
                    url,
                    err: e.to_string(),
                })
            }
            (status, _) => {
                return Err(BuilderError::Status {
                    url,
                    status: status.as_u16(),
                    message: error_message(&bytes),
                })
            }
        };
        if status.drv_path != drv_path {
            return Err(BuilderError::WrongDerivation {
                url,
                asked: drv_path.to_owned(),
                got: status.drv_path,
            });
        }
        Ok(Answer {
            status,
            retry_after,
        })
    }

    /// Sends `req` and reads the whole answer (at most [`MAX_ANSWER_SIZE`] bytes).
    async fn exchange(
        &self,
        url: &str,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Option<Duration>, Bytes), BuilderError> {
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| BuilderError::Unreachable {
                url: url.to_owned(),
                err: error_chain(&e),
            })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = Limited::new(resp.into_body(), MAX_ANSWER_SIZE)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    BuilderError::TooLarge {
                        url: url.to_owned(),
                    }
                } else {
                    BuilderError::Unreachable {
                        url: url.to_owned(),
                        err: e.to_string(),
                    }
                }
            })?;
        Ok((status, retry_after, body.to_bytes()))
    }
}

/// The `error` of a builder's `{"error": …}` answer, or the start of whatever it sent.
fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorDoc {
        error: String,
    }
    match serde_json::from_slice::<ErrorDoc>(body) {
        Ok(d) => d.error,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_document_with_every_field_parses() {
        let doc = br#"{"drv_path":"/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-hello.drv","state":"failed",
            "attempts":2,"outputs":{"out":"/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-hello"},
            "failure":{"class":"dependency_failed","permanent":true,"reason":"a dependency failed",
            "dependency":"/nix/store/cccccccccccccccccccccccccccccccc-dep.drv","log":"/builds/x/log"},
            "retry_at":1796000000,"some_later_field":1}"#;
        let s: BuildStatus = serde_json::from_slice(doc).expect("parses");
        assert_eq!(s.state, State::Failed);
        assert_eq!(s.attempts, Some(2));
        let f = s.failure.expect("a failure");
        assert_eq!(f.class, "dependency_failed");
        assert!(f.permanent);
        assert_eq!(f.log.as_deref(), Some("/builds/x/log"));
        assert_eq!(s.retry_at, Some(1796000000));
    }

    #[test]
    fn a_minimal_queued_document_parses_and_an_unknown_state_does_not() {
        let s: BuildStatus = serde_json::from_slice(
            br#"{"drv_path":"/nix/store/x.drv","state":"queued","position":0}"#,
        )
        .expect("parses");
        assert_eq!((s.state, s.position), (State::Queued, Some(0)));
        assert!(s.outputs.is_empty());
        assert!(
            serde_json::from_slice::<BuildStatus>(br#"{"drv_path":"x","state":"exploded"}"#)
                .is_err()
        );
    }

    #[test]
    fn only_http_urls_are_builders() {
        for bad in ["file:///tmp/x", "localhost:9000", "", "http://"] {
            assert!(
                BuilderClient::new(bad, Duration::from_secs(1)).is_err(),
                "{bad}"
            );
        }
        let c = BuilderClient::new("http://127.0.0.1:9/", Duration::from_secs(1)).expect("ok");
        assert_eq!(c.url(), "http://127.0.0.1:9");
    }
}
