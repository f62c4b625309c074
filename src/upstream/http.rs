//! `http://` and `https://` caches, through hyper-util's pooled client and rustls.
//!
//! hyper has no timeouts of its own: connect, first byte and every body read each get one
//! here. Connection errors, timeouts, 429 and 5xx are retried with exponential backoff and
//! jitter (`Retry-After` as a floor), 404 and 403 never: they mean "not in this cache".

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{Body, BoxFuture, CachePath, ClientConfig, Fetched, Upstream, UpstreamError};

pub(super) type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

#[derive(Debug)]
pub struct HttpUpstream {
    url: String,
    client: Client<Connector, Empty<Bytes>>,
    config: ClientConfig,
}

impl HttpUpstream {
    pub fn new(url: &str, config: ClientConfig) -> Result<Self, UpstreamError> {
        if url.parse::<http::Uri>().is_err() {
            return Err(UpstreamError::InvalidUrl {
                url: url.to_owned(),
                reason: "not a valid URL",
            });
        }
        let https = connector(config.connect_timeout).ok_or_else(|| UpstreamError::InvalidUrl {
            url: url.to_owned(),
            reason: "no TLS protocol version available",
        })?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(HttpUpstream {
            url: url.to_owned(),
            client,
            config,
        })
    }

    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self.config.backoff.saturating_mul(1u32 << attempt.min(16));
        // Up to 25% jitter, so a fleet of edge nodes does not retry in lockstep.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let jitter = exp.mul_f64(f64::from(nanos % 1000) / 4000.0);
        (exp + jitter)
            .max(retry_after.unwrap_or_default())
            .min(self.config.max_backoff)
    }
}

/// The connector for http:// and https:// URLs, with `connect_timeout`; `None` if rustls
/// has no protocol version to offer.
pub(super) fn connector(connect_timeout: Duration) -> Option<Connector> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    // The provider is named: with object_store in the build, rustls has both ring and
    // aws-lc-rs compiled in and will not pick one by itself (it panics).
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .ok()?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Some(https)
}

enum Attempt {
    Done(Result<Option<Fetched>, UpstreamError>),
    Retry(UpstreamError, Option<Duration>),
}

impl Upstream for HttpUpstream {
    fn url(&self) -> &str {
        &self.url
    }

    fn get<'a>(
        &'a self,
        path: &'a CachePath,
    ) -> BoxFuture<'a, Result<Option<Fetched>, UpstreamError>> {
        Box::pin(async move {
            let url = format!("{}/{path}", self.url);
            let mut attempt = 0;
            loop {
                let (err, retry_after) = match self.attempt(&url).await {
                    Attempt::Done(r) => return r,
                    Attempt::Retry(err, retry_after) => (err, retry_after),
                };
                if attempt >= self.config.retries {
                    return Err(err);
                }
                let wait = self.backoff(attempt, retry_after);
                tracing::debug!(%url, %err, ?wait, attempt, "retrying upstream request");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        })
    }
}

impl HttpUpstream {
    async fn attempt(&self, url: &str) -> Attempt {
        let req = match Request::get(url)
            .header(
                header::USER_AGENT,
                concat!("binplz/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
        {
            Ok(r) => r,
            Err(_) => {
                return Attempt::Done(Err(UpstreamError::InvalidUrl {
                    url: url.to_owned(),
                    reason: "not a valid URL",
                }))
            }
        };
        let resp =
            match tokio::time::timeout(self.config.first_byte_timeout, self.client.request(req))
                .await
            {
                Err(_) => {
                    return Attempt::Retry(
                        UpstreamError::Timeout {
                            url: url.to_owned(),
                            phase: "response",
                        },
                        None,
                    )
                }
                Ok(Err(e)) => {
                    let err = if e.is_connect() {
                        UpstreamError::Connect {
                            url: url.to_owned(),
                            err: error_chain(&e),
                        }
                    } else {
                        UpstreamError::Body {
                            url: url.to_owned(),
                            err: error_chain(&e),
                        }
                    };
                    return Attempt::Retry(err, None);
                }
                Ok(Ok(resp)) => resp,
            };
        let status = resp.status();
        if status.is_success() {
            let len = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok());
            let body = HttpBody {
                body: resp.into_body(),
                url: url.to_owned(),
                read_timeout: self.config.read_timeout,
            };
            return Attempt::Done(Ok(Some(Fetched {
                len,
                body: Box::new(body),
            })));
        }
        let err = UpstreamError::Status {
            url: url.to_owned(),
            status: status.as_u16(),
        };
        match status {
            StatusCode::NOT_FOUND | StatusCode::FORBIDDEN | StatusCode::GONE => {
                Attempt::Done(Ok(None))
            }
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = resp
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                Attempt::Retry(err, retry_after)
            }
            _ => Attempt::Done(Err(err)),
        }
    }
}

struct HttpBody {
    body: Incoming,
    url: String,
    read_timeout: Duration,
}

impl Body for HttpBody {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, UpstreamError>> {
        Box::pin(async move {
            loop {
                let frame = match tokio::time::timeout(self.read_timeout, self.body.frame()).await {
                    Err(_) => {
                        return Err(UpstreamError::Timeout {
                            url: self.url.clone(),
                            phase: "next bytes",
                        })
                    }
                    Ok(None) => return Ok(None),
                    Ok(Some(Err(e))) => {
                        return Err(UpstreamError::Body {
                            url: self.url.clone(),
                            err: error_chain(&e),
                        })
                    }
                    Ok(Some(Ok(frame))) => frame,
                };
                if let Ok(data) = frame.into_data() {
                    if !data.is_empty() {
                        return Ok(Some(data));
                    }
                }
            }
        })
    }
}

/// An error with its causes, one line.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
