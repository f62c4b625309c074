//! A stand-in for `binplz builder`: its HTTP API (the contract an edge's `--builder` speaks)
//! over a real socket on `127.0.0.1:0`, with answers a test scripts and counters of what
//! it was asked.
//!
//! ```text
//!  FakeBuilder (handle: url, asked, set, hold/release, set_log)
//!      │ Arc<State>: scripted state per derivation, questions counted, a gate
//!      ▼
//!  own thread + current-thread tokio runtime ─► hyper http1
//!      POST /builds ─► count ─► [held at the gate] ─► the scripted state (queued, position 0,
//!                      unless scripted) as the state document, with the API's status
//!      GET /builds/<drv> ─► the same document   GET /builds/<drv>/log ─► the log set
//! ```
//!
//! It builds nothing: a test makes a build "built" by placing its outputs in the cache the
//! edge reads and then scripting [`Script::Built`]. The handle is a plain struct with
//! [`FakeBuilder::url`], as a running real builder would be, so tests can swap one for the
//! other. Dropping it stops the server and drops every connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::watch;

/// What the builder says of one derivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Script {
    Queued {
        position: u64,
        /// Why the build is held back, if it is.
        waiting: Option<String>,
    },
    Building,
    /// Built: the outputs (name → store path) are in the builder's store.
    Built {
        outputs: Vec<(String, String)>,
    },
    Failed {
        class: String,
        permanent: bool,
        reason: String,
        /// The next try of a transient failure (Unix seconds).
        retry_at: Option<u64>,
    },
    /// Refused: 429 with `Retry-After` when `retry_after` is set, else 403.
    Refused {
        reason: String,
        retry_after: Option<u32>,
    },
    /// Not the API: this status with a plain-text body (a broken builder or proxy).
    Broken(u16),
}

impl Script {
    pub fn queued(position: u64) -> Script {
        Script::Queued {
            position,
            waiting: None,
        }
    }

    pub fn built(output: &str) -> Script {
        Script::Built {
            outputs: vec![("out".to_owned(), output.to_owned())],
        }
    }

    pub fn failed(class: &str, reason: &str) -> Script {
        Script::Failed {
            class: class.to_owned(),
            permanent: true,
            reason: reason.to_owned(),
            retry_at: None,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    scripts: HashMap<String, Script>,
    /// Derivations asked about with `POST /builds`, once each time.
    asked: HashMap<String, u64>,
    /// The last `client` each derivation was asked for.
    clients: HashMap<String, String>,
    logs: HashMap<String, String>,
    /// `POST /builds` requests that were not what the API says (bad JSON, not a `.drv`).
    bad: u64,
}

struct State {
    inner: Mutex<Inner>,
    /// (questions arrived at the gate, open). Starts open.
    gate: watch::Sender<(usize, bool)>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running stand-in builder. See the module documentation.
pub struct FakeBuilder {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeBuilder {
    pub fn start() -> FakeBuilder {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        listener
            .set_nonblocking(true)
            .expect("making the listener non-blocking");
        let addr = listener.local_addr().expect("the listener's address");
        let state = Arc::new(State {
            inner: Mutex::default(),
            gate: watch::channel((0, true)).0,
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server_state = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name(format!("fake-builder-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("building the fake builder's runtime");
                runtime.block_on(accept_loop(listener, server_state, rx));
                runtime.shutdown_background();
            })
            .expect("spawning the fake builder's thread");
        FakeBuilder {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// The builder's base URL, without a trailing `/`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `POST /builds` requests for `drv_path` so far.
    pub fn asked(&self, drv_path: &str) -> u64 {
        self.state.lock().asked.get(drv_path).copied().unwrap_or(0)
    }

    /// `POST /builds` requests for any derivation so far.
    pub fn total_asked(&self) -> u64 {
        self.state.lock().asked.values().sum()
    }

    /// The `client` of the last question about `drv_path`.
    pub fn client_of(&self, drv_path: &str) -> Option<String> {
        self.state.lock().clients.get(drv_path).cloned()
    }

    /// Questions that broke the API's rules.
    pub fn bad_requests(&self) -> u64 {
        self.state.lock().bad
    }

    /// Answers `script` for `drv_path` from now on.
    pub fn set(&self, drv_path: &str, script: Script) {
        self.state
            .lock()
            .scripts
            .insert(drv_path.to_owned(), script);
    }

    /// Serves `log` at `/builds/<drv basename>/log`.
    pub fn set_log(&self, drv_path: &str, log: &str) {
        self.state
            .lock()
            .logs
            .insert(drv_path.to_owned(), log.to_owned());
    }

    /// Holds every `POST /builds` answer until [`FakeBuilder::release`].
    pub fn hold(&self) {
        self.state.gate.send_modify(|g| *g = (0, false));
    }

    /// Waits until `n` questions are held.
    pub async fn held(&self, n: usize) {
        let mut rx = self.state.gate.subscribe();
        rx.wait_for(|(arrived, _)| *arrived >= n)
            .await
            .expect("the gate is alive");
    }

    pub fn release(&self) {
        self.state.gate.send_modify(|g| g.1 = true);
    }
}

impl Drop for FakeBuilder {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The path of a build on the builder: `/builds/<drv basename>`.
pub fn build_path(drv_path: &str) -> String {
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    format!("/builds/{base}")
}

async fn accept_loop(
    listener: std::net::TcpListener,
    state: Arc<State>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => panic!("fake builder: cannot use the listener: {e}"),
    };
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(respond(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    reply(
        status,
        "application/json",
        json!({ "error": message }).to_string(),
    )
}

/// The state document of `drv_path` as `script` says, with its status.
fn document(drv_path: &str, script: &Script, new: bool) -> Response<Full<Bytes>> {
    let mut doc = json!({ "drv_path": drv_path, "attempts": 0 });
    let mut status = if new {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let mut retry = None;
    match script {
        Script::Queued { position, waiting } => {
            doc["state"] = json!("queued");
            doc["position"] = json!(position);
            if let Some(w) = waiting {
                doc["waiting"] = json!(w);
            }
        }
        Script::Building => {
            doc["state"] = json!("building");
            doc["attempts"] = json!(1);
        }
        Script::Built { outputs } => {
            doc["state"] = json!("built");
            doc["attempts"] = json!(1);
            let outputs: serde_json::Map<String, serde_json::Value> =
                outputs.iter().map(|(n, p)| (n.clone(), json!(p))).collect();
            doc["outputs"] = serde_json::Value::Object(outputs);
        }
        Script::Failed {
            class,
            permanent,
            reason,
            retry_at,
        } => {
            doc["state"] = json!("failed");
            doc["attempts"] = json!(1);
            doc["failure"] = json!({
                "class": class,
                "permanent": permanent,
                "reason": reason,
                "log": format!("{}/log", build_path(drv_path)),
            });
            if let Some(at) = retry_at {
                doc["retry_at"] = json!(at);
            }
        }
        Script::Refused {
            reason,
            retry_after,
        } => {
            doc["state"] = json!("refused");
            doc["failure"] = json!({ "class": "refused", "permanent": true, "reason": reason });
            status = match retry_after {
                Some(_) => StatusCode::TOO_MANY_REQUESTS,
                None => StatusCode::FORBIDDEN,
            };
            retry = *retry_after;
        }
        Script::Broken(code) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return reply(status, "text/plain", "the builder is broken\n".into());
        }
    }
    let mut resp = reply(status, "application/json", doc.to_string());
    if let Some(secs) = retry {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    }
    resp
}

async fn respond(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    if req.method() == Method::POST && path == "/builds" {
        return ask(state, req).await;
    }
    if req.method() != Method::GET {
        return error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    }
    let Some(rest) = path.strip_prefix("/builds/") else {
        return error(StatusCode::NOT_FOUND, "no such page");
    };
    let (base, log) = match rest.strip_suffix("/log") {
        Some(b) => (b, true),
        None => (rest, false),
    };
    let drv_path = format!("/nix/store/{base}");
    let inner = state.lock();
    if log {
        return match inner.logs.get(&drv_path) {
            Some(l) => reply(StatusCode::OK, "text/plain; charset=utf-8", l.clone()),
            None => error(StatusCode::NOT_FOUND, "no log"),
        };
    }
    if !inner.asked.contains_key(&drv_path) {
        return error(StatusCode::NOT_FOUND, "never asked for");
    }
    let script = inner
        .scripts
        .get(&drv_path)
        .cloned()
        .unwrap_or(Script::queued(0));
    document(&drv_path, &script, false)
}

/// `POST /builds`.
async fn ask(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        drv_path: String,
        client: String,
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(StatusCode::BAD_REQUEST, "unreadable body"),
    };
    let parsed = serde_json::from_slice::<Ask>(&body).ok().filter(|a| {
        a.drv_path.starts_with("/nix/store/")
            && a.drv_path.ends_with(".drv")
            && !a.client.is_empty()
    });
    let Some(ask) = parsed else {
        state.lock().bad += 1;
        return error(StatusCode::BAD_REQUEST, "not a build request");
    };
    let new = {
        let mut inner = state.lock();
        let n = inner.asked.entry(ask.drv_path.clone()).or_default();
        *n += 1;
        let new = *n == 1;
        inner
            .clients
            .insert(ask.drv_path.clone(), ask.client.clone());
        new
    };
    let mut gate = state.gate.subscribe();
    if !gate.borrow().1 {
        state.gate.send_modify(|g| g.0 += 1);
        let _ = gate.wait_for(|(_, open)| *open).await;
    }
    let script = state
        .lock()
        .scripts
        .get(&ask.drv_path)
        .cloned()
        .unwrap_or(Script::queued(0));
    document(&ask.drv_path, &script, new)
}
