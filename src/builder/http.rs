//! The builder's HTTP API (JSON over hyper): build requests, states, logs, the operator's
//! retry and cancel, the operator page, metrics and health. The contract is the one edges
//! (`binplz serve --builder URL`) rely on; README.md, "Building on demand", documents it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::state::{Build, Phase};
use super::{basename, parse_drv_path, unix_now, Answer, Builder, BuilderError, FailureClass};

/// Largest `POST /builds` body: a derivation path and an address fit in a few hundred bytes.
const MAX_BODY: usize = 16 << 10;
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 4096;
/// Time for a client to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to finish responses in progress at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    respond(status, JSON, v.to_string())
}

fn error(status: StatusCode, msg: &str) -> Resp {
    json_resp(status, &json!({ "error": msg }))
}

fn internal(e: &BuilderError) -> Resp {
    tracing::error!(err = %e, "builder request failed");
    error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

/// The state document of a stored build.
pub fn document(builder: &Builder, b: &Build) -> Result<Value, BuilderError> {
    let mut doc = json!({
        "drv_path": b.drv_path,
        "state": b.phase.as_str(),
        "attempts": b.attempts,
    });
    if !b.outputs.is_empty() {
        doc["outputs"] = json!(b.outputs);
    }
    if b.phase == Phase::Queued {
        doc["position"] = json!(builder.state().position(b.seq)?);
        if let Some(why) = builder.waiting()? {
            doc["waiting"] = json!(why);
        }
    }
    if let (Phase::Failed, Some(f)) = (b.phase, &b.failure) {
        let mut failure = json!({
            "class": f.class.as_str(),
            "permanent": f.permanent,
            "reason": f.reason,
        });
        if let Some(d) = &f.dependency {
            failure["dependency"] = json!(d);
        }
        if b.has_log {
            failure["log"] = json!(format!("/builds/{}/log", basename(&b.drv_path)));
        }
        doc["failure"] = failure;
        if let Some(at) = b.retry_at {
            doc["retry_at"] = json!(at);
        }
    }
    Ok(doc)
}

/// The document of a request that was refused (not stored).
fn refused(drv_path: &str, reason: &str) -> Value {
    json!({
        "drv_path": drv_path,
        "state": "refused",
        "attempts": 0,
        "failure": {
            "class": FailureClass::Refused.as_str(),
            "permanent": true,
            "reason": reason,
        },
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildRequest {
    drv_path: String,
    client: String,
}

async fn post_build(builder: &Builder, body: Incoming) -> Resp {
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "body unreadable or too large"),
    };
    let req: BuildRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("expected {{\"drv_path\": …, \"client\": …}}: {e}"),
            )
        }
    };
    let Some(drv) = parse_drv_path(&req.drv_path) else {
        return error(
            StatusCode::BAD_REQUEST,
            "drv_path is not a store path ending in .drv",
        );
    };
    if req.client.is_empty() || req.client.len() > 256 {
        return error(StatusCode::BAD_REQUEST, "client must be 1 to 256 bytes");
    }
    let answer = match builder.request(drv, &req.client) {
        Ok(a) => a,
        Err(e) => return internal(&e),
    };
    let (status, build) = match answer {
        Answer::Existing(b) => (StatusCode::OK, b),
        Answer::Queued(b) => (StatusCode::ACCEPTED, b),
        Answer::NotInIndex => {
            return json_resp(
                StatusCode::FORBIDDEN,
                &refused(drv, "no loaded index names this derivation"),
            )
        }
        Answer::OverClientLimit { retry_after } => {
            let limit = builder.config().per_client_builds;
            let mut r = json_resp(
                StatusCode::TOO_MANY_REQUESTS,
                &refused(
                    drv,
                    &format!("this client has started its {limit} new builds of the hour"),
                ),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            return r;
        }
    };
    match document(builder, &build) {
        Ok(doc) => json_resp(status, &doc),
        Err(e) => internal(&e),
    }
}

/// `Ok` when the request carries the operator token; else the response to give.
fn authorise(builder: &Builder, headers: &HeaderMap) -> Result<(), Box<Resp>> {
    let Some(token) = &builder.config().operator_token else {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "read-only: this builder has no --operator-token-file",
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if token.matches(g.trim()) => Ok(()),
        _ => {
            let mut r = error(StatusCode::UNAUTHORIZED, "operator token required");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"binplz builder\""),
            );
            Err(Box::new(r))
        }
    }
}

/// Routes one request.
pub async fn route(builder: &Builder, req: Request<Incoming>) -> Resp {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    let method = &parts.method;
    let head_or_get = *method == Method::GET || *method == Method::HEAD;
    match path {
        "/" if head_or_get => {
            return match super::page::render(builder) {
                Ok(html) => respond(StatusCode::OK, HTML, html),
                Err(e) => internal(&e),
            }
        }
        "/-/healthz" if head_or_get => return respond(StatusCode::OK, TEXT, "ok\n"),
        "/-/metrics" if head_or_get => {
            return match metrics(builder) {
                Ok(m) => respond(StatusCode::OK, PROMETHEUS, m),
                Err(e) => internal(&e),
            }
        }
        "/builds" if *method == Method::POST => return post_build(builder, body).await,
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/builds/") else {
        return error(StatusCode::NOT_FOUND, "no such route");
    };
    let (base, action) = match rest.split_once('/') {
        Some((b, a)) => (b, Some(a)),
        None => (rest, None),
    };
    let drv_path = format!("/nix/store/{base}");
    let Some(drv) = parse_drv_path(&drv_path) else {
        return error(StatusCode::BAD_REQUEST, "not a derivation's base name");
    };
    match (action, method) {
        (None, m) if m == Method::GET || m == Method::HEAD => match builder.state().get(drv) {
            Ok(Some(b)) => match document(builder, &b) {
                Ok(doc) => json_resp(StatusCode::OK, &doc),
                Err(e) => internal(&e),
            },
            Ok(None) => error(StatusCode::NOT_FOUND, "this builder was never asked for it"),
            Err(e) => internal(&e.into()),
        },
        (Some("log"), m) if m == Method::GET || m == Method::HEAD => match builder.log(drv) {
            Some(log) => respond(StatusCode::OK, TEXT, log),
            None => error(StatusCode::NOT_FOUND, "no log for this derivation"),
        },
        (Some(a @ ("retry" | "cancel")), m) if m == Method::POST => {
            if let Err(r) = authorise(builder, &parts.headers) {
                return *r;
            }
            let done = if a == "retry" {
                builder.retry(drv)
            } else {
                builder.cancel(drv)
            };
            match done {
                Ok(Some(b)) => {
                    tracing::info!(drv = %drv, action = a, "operator action");
                    match document(builder, &b) {
                        Ok(doc) => json_resp(StatusCode::OK, &doc),
                        Err(e) => internal(&e),
                    }
                }
                Ok(None) => error(StatusCode::NOT_FOUND, "this builder was never asked for it"),
                Err(e) => internal(&e),
            }
        }
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here"),
    }
}

/// Prometheus text: builds by state, failures by class, build seconds, budget.
pub fn metrics(builder: &Builder) -> Result<String, BuilderError> {
    use std::fmt::Write;
    let state = builder.state();
    let counts = state.counts()?;
    let mut out = String::new();
    let _ = writeln!(out, "# HELP binplz_builder_builds Builds by state.");
    let _ = writeln!(out, "# TYPE binplz_builder_builds gauge");
    for phase in [Phase::Queued, Phase::Building, Phase::Built, Phase::Failed] {
        let n: u64 = counts
            .iter()
            .filter(|(s, _, _)| s == phase.as_str())
            .map(|(_, _, n)| n)
            .sum();
        let _ = writeln!(
            out,
            "binplz_builder_builds{{state=\"{}\"}} {n}",
            phase.as_str()
        );
    }
    let _ = writeln!(
        out,
        "# HELP binplz_builder_failed Failed builds by failure class."
    );
    let _ = writeln!(out, "# TYPE binplz_builder_failed gauge");
    for class in FailureClass::ALL {
        let n: u64 = counts
            .iter()
            .filter(|(s, c, _)| s == "failed" && c == class.as_str())
            .map(|(_, _, n)| n)
            .sum();
        let _ = writeln!(
            out,
            "binplz_builder_failed{{class=\"{}\"}} {n}",
            class.as_str()
        );
    }
    let _ = writeln!(
        out,
        "# HELP binplz_builder_running Builds running now (Nix processes)."
    );
    let _ = writeln!(out, "# TYPE binplz_builder_running gauge");
    let _ = writeln!(out, "binplz_builder_running {}", builder.running().len());
    let _ = writeln!(
        out,
        "# HELP binplz_builder_build_seconds_total Build time used, all months."
    );
    let _ = writeln!(out, "# TYPE binplz_builder_build_seconds_total counter");
    let _ = writeln!(
        out,
        "binplz_builder_build_seconds_total {}",
        state.total_seconds()?
    );
    let _ = writeln!(
        out,
        "# HELP binplz_builder_budget_seconds Build time used this month, and the budget."
    );
    let _ = writeln!(out, "# TYPE binplz_builder_budget_seconds gauge");
    let _ = writeln!(
        out,
        "binplz_builder_budget_seconds{{kind=\"used\"}} {}",
        state.used_seconds(unix_now())?
    );
    let _ = writeln!(
        out,
        "binplz_builder_budget_seconds{{kind=\"limit\"}} {}",
        builder.config().monthly_budget
    );
    Ok(out)
}

/// Serves the API on `listener` until `shutdown` resolves, then finishes responses in
/// progress for up to a grace period.
pub async fn serve(
    listener: TcpListener,
    builder: Builder,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let http = Arc::new(http);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let (stream, peer): (_, SocketAddr) = tokio::select! {
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
        let b = builder.clone();
        let service = hyper::service::service_fn(move |req| {
            let b = b.clone();
            async move { Ok::<_, Infallible>(route(&b, req).await) }
        });
        let conn = http
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(err = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing remaining connections");
    }
    Ok(())
}
