//! A fake Nix binary cache over HTTP, in-process on `127.0.0.1:0`, with per-path hit
//! counters and fault modes.
//!
//! ```text
//!  FakeUpstream (handle: url, hits, set_fault, put)
//!      │ Arc<State>: files put in memory, faults, hit counters (std Mutex: usable from
//!      │             sync tests, async tests and the server alike)
//!      ▼
//!  own thread + current-thread tokio runtime ─► accept loop ─► one task per connection
//!      (hyper 1 http1)      ─► GET path ─► count hit ─► fault? ─► memory, else the directory
//! ```
//!
//! The server runs on its own thread so it keeps answering while a test blocks (running
//! the CLI with `std::process::Command`, say). The listener is bound before the handle is
//! returned, so a client may connect at once: no waiting for readiness. Dropping the handle
//! stops the server and drops every connection, stalled ones included.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// What a path answers instead of its normal contents. Faults stay until cleared, except
/// [`Fault::Status`] with `first`, which answers normally once it has been used up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 404, whether the file exists or not.
    NotFound,
    /// This status with an empty body: for the first `first` requests (every request when
    /// `None`), then the normal answer. `retry_after` adds `Retry-After: <seconds>`.
    Status {
        code: u16,
        first: Option<u32>,
        retry_after: Option<u32>,
    },
    /// Headers with the full `Content-Length`, the first `n` bytes of the body, then the
    /// connection is dropped.
    ResetAfter(usize),
    /// Headers (full `Content-Length`), then nothing, ever.
    StallAfterHeaders,
    /// Headers (full `Content-Length`), then `bytes` bytes of the body every `every`: no
    /// pause long enough for a read timeout, yet a body that takes practically forever.
    Drip { bytes: usize, every: Duration },
    /// The request is read and never answered: no status line, no headers, ever.
    NoAnswer,
    /// Only the first `n` bytes, with a `Content-Length` that matches them.
    Truncate(usize),
    /// The file with the byte at this offset inverted.
    FlipByte(usize),
    /// These bytes instead of the file (which need not exist).
    Override(Bytes),
}

impl Fault {
    /// `code` for every request.
    pub fn status(code: u16) -> Fault {
        Fault::Status {
            code,
            first: None,
            retry_after: None,
        }
    }

    /// `code` for the first `n` requests, then the normal answer.
    pub fn status_first(code: u16, n: u32) -> Fault {
        Fault::Status {
            code,
            first: Some(n),
            retry_after: None,
        }
    }

    /// The same status fault, with `Retry-After: <seconds>`.
    pub fn with_retry_after(self, seconds: u32) -> Fault {
        match self {
            Fault::Status { code, first, .. } => Fault::Status {
                code,
                first,
                retry_after: Some(seconds),
            },
            other => panic!("Retry-After only goes with a status fault, not {other:?}"),
        }
    }

    /// [`Fault::Override`] from anything that becomes bytes (a `String`, a `Vec<u8>`, …).
    pub fn override_with(bytes: impl Into<Bytes>) -> Fault {
        Fault::Override(bytes.into())
    }
}

#[derive(Debug)]
struct ActiveFault {
    fault: Fault,
    /// Requests still answered normally before the fault starts.
    skip: u32,
    /// Requests this fault has answered (for `Status { first: Some(_) }`).
    used: u32,
}

#[derive(Debug, Default)]
struct Inner {
    files: HashMap<String, Bytes>,
    faults: HashMap<String, ActiveFault>,
    hits: HashMap<String, u64>,
}

#[derive(Debug)]
struct State {
    root: Option<PathBuf>,
    inner: Mutex<Inner>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not hide the server's state from the others.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake cache. See the module documentation.
#[derive(Debug)]
pub struct FakeUpstream {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeUpstream {
    /// Serves the binary cache in `root` (a directory laid out as `nix copy` writes it).
    pub fn serve(root: impl Into<PathBuf>) -> FakeUpstream {
        Self::start(Some(root.into()))
    }

    /// Serves only what is [`put`](Self::put) into it.
    pub fn empty() -> FakeUpstream {
        Self::start(None)
    }

    fn start(root: Option<PathBuf>) -> FakeUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        listener
            .set_nonblocking(true)
            .expect("making the listener non-blocking");
        let addr = listener.local_addr().expect("the listener's address");
        let state = Arc::new(State {
            root,
            inner: Mutex::default(),
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server_state = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name(format!("fake-upstream-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("building the fake upstream's runtime");
                runtime.block_on(accept_loop(listener, server_state, rx));
                // Drops every connection task, stalled ones too, without waiting for them.
                runtime.shutdown_background();
            })
            .expect("spawning the fake upstream's thread");
        FakeUpstream {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// The cache's base URL, without a trailing `/`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests for `path` so far (relative to the cache root; a query is not part of it).
    pub fn hits(&self, path: &str) -> u64 {
        let key = normalize(path);
        self.state.lock().hits.get(&key).copied().unwrap_or(0)
    }

    /// Requests for any path so far.
    pub fn total_hits(&self) -> u64 {
        self.state.lock().hits.values().sum()
    }

    /// Makes `path` answer with `fault` from now on (replacing any earlier fault there).
    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.set_fault_after(path, 0, fault);
    }

    /// Lets the next `skip` requests for `path` through, then answers with `fault`.
    pub fn set_fault_after(&self, path: &str, skip: u32, fault: Fault) {
        self.state.lock().faults.insert(
            normalize(path),
            ActiveFault {
                fault,
                skip,
                used: 0,
            },
        );
    }

    pub fn clear_fault(&self, path: &str) {
        self.state.lock().faults.remove(&normalize(path));
    }

    /// Serves `bytes` at `path`, over any file of the directory.
    pub fn put(&self, path: &str, bytes: impl Into<Bytes>) {
        self.state
            .lock()
            .files
            .insert(normalize(path), bytes.into());
    }

    /// What `path` holds without faults: the bytes put there, else the directory's file.
    pub fn contents(&self, path: &str) -> Option<Bytes> {
        let key = normalize(path);
        if let Some(b) = self.state.lock().files.get(&key) {
            return Some(b.clone());
        }
        let file = file_in(self.state.root.as_deref()?, &key)?;
        std::fs::read(file).ok().map(Bytes::from)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn normalize(path: &str) -> String {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    path.trim_start_matches('/').to_owned()
}

/// The file for a cache path, if the path is plain (no `..`, no empty or `.` segments).
fn file_in(root: &Path, path: &str) -> Option<PathBuf> {
    let plain = !path.is_empty()
        && path
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    plain.then(|| root.join(path))
}

async fn accept_loop(
    listener: std::net::TcpListener,
    state: Arc<State>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => panic!("fake upstream: cannot use the listener: {e}"),
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
            // Errors here are the faults doing their job (or the client going away).
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(state: &State, req: Request<Incoming>) -> Response<FakeBody> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return empty(StatusCode::METHOD_NOT_ALLOWED);
    }
    let head = req.method() == Method::HEAD;
    let path = normalize(req.uri().path());
    let fault = {
        let mut inner = state.lock();
        *inner.hits.entry(path.clone()).or_default() += 1;
        match inner.faults.get_mut(&path) {
            Some(active) if active.skip > 0 => {
                active.skip -= 1;
                None
            }
            Some(active) => {
                let spent = match active.fault {
                    Fault::Status { first: Some(n), .. } => active.used >= n,
                    _ => false,
                };
                active.used = active.used.saturating_add(1);
                (!spent).then(|| active.fault.clone())
            }
            None => None,
        }
    };
    let contents = match &fault {
        // Dropped with the connection when the server stops.
        Some(Fault::NoAnswer) => std::future::pending().await,
        Some(Fault::NotFound) => return empty(StatusCode::NOT_FOUND),
        Some(Fault::Status {
            code, retry_after, ..
        }) => {
            let mut resp = empty(StatusCode::from_u16(*code).unwrap_or(StatusCode::IM_A_TEAPOT));
            if let Some(secs) = retry_after {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from(*secs));
            }
            return resp;
        }
        Some(Fault::Override(bytes)) => Some(bytes.clone()),
        _ => load(state, &path).await,
    };
    let Some(contents) = contents else {
        return empty(StatusCode::NOT_FOUND);
    };
    let full_len = contents.len();
    let body = match fault {
        None | Some(Fault::Override(_)) => FakeBody::Full(Some(contents)),
        Some(Fault::Truncate(n)) => FakeBody::Full(Some(contents.slice(..n.min(full_len)))),
        Some(Fault::FlipByte(offset)) => {
            let mut v = contents.to_vec();
            if let Some(b) = v.get_mut(offset) {
                *b = !*b;
            }
            FakeBody::Full(Some(Bytes::from(v)))
        }
        Some(Fault::ResetAfter(n)) => {
            FakeBody::ThenReset(ResetState::Data(contents.slice(..n.min(full_len))))
        }
        Some(Fault::StallAfterHeaders) => FakeBody::Stall,
        Some(Fault::Drip { bytes, every }) => FakeBody::Drip {
            rest: contents,
            bytes: bytes.max(1),
            every,
            next: Box::pin(tokio::time::sleep(every)),
        },
        Some(Fault::NotFound | Fault::NoAnswer | Fault::Status { .. }) => {
            unreachable!("answered above")
        }
    };
    let len = match &body {
        FakeBody::Full(Some(b)) => b.len(),
        _ => full_len,
    };
    let mut resp = Response::new(if head { FakeBody::Full(None) } else { body });
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type(&path)),
    );
    resp
}

/// The path's bytes: put in memory, else read from the directory (off the reactor).
async fn load(state: &State, path: &str) -> Option<Bytes> {
    if let Some(b) = state.lock().files.get(path) {
        return Some(b.clone());
    }
    let file = file_in(state.root.as_deref()?, path)?;
    match tokio::fs::metadata(&file).await {
        Ok(m) if m.is_file() => tokio::fs::read(&file).await.ok().map(Bytes::from),
        _ => None,
    }
}

fn content_type(path: &str) -> &'static str {
    if path.ends_with(".narinfo") {
        "text/x-nix-narinfo"
    } else if path == "nix-cache-info" {
        "text/x-nix-cache-info"
    } else {
        "application/octet-stream"
    }
}

fn empty(status: StatusCode) -> Response<FakeBody> {
    let mut resp = Response::new(FakeBody::Full(None));
    *resp.status_mut() = status;
    resp
}

/// The one body type of the fake: all at once, cut short, a drip, or never.
#[derive(Debug)]
enum FakeBody {
    Full(Option<Bytes>),
    /// `bytes` bytes of `rest` each time `next` fires, then `next` again `every` later.
    Drip {
        rest: Bytes,
        bytes: usize,
        every: Duration,
        next: Pin<Box<tokio::time::Sleep>>,
    },
    /// Sends these bytes, then fails, which makes hyper drop the connection.
    ThenReset(ResetState),
    Stall,
}

#[derive(Debug)]
enum ResetState {
    Data(Bytes),
    /// Pending once, so hyper flushes what it has written before it sees the error:
    /// otherwise the client might lose the headers and see a failed request, not a
    /// failed body.
    Flush,
    Fail,
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            FakeBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            FakeBody::Drip {
                rest,
                bytes,
                every,
                next,
            } => {
                if rest.is_empty() {
                    return Poll::Ready(None);
                }
                if next.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let deadline = next.deadline() + *every;
                next.as_mut().reset(deadline);
                let chunk = rest.split_to((*bytes).min(rest.len()));
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            FakeBody::ThenReset(state) => match std::mem::replace(state, ResetState::Fail) {
                ResetState::Data(b) => {
                    *state = ResetState::Flush;
                    if b.is_empty() {
                        cx.waker().wake_by_ref();
                        Poll::Pending
                    } else {
                        Poll::Ready(Some(Ok(Frame::data(b))))
                    }
                }
                ResetState::Flush => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                ResetState::Fail => Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "fault: connection dropped mid-body",
                )))),
            },
            // Never woken: the connection is dropped when the server stops.
            FakeBody::Stall => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            FakeBody::Full(b) => b.is_none(),
            FakeBody::Drip { rest, .. } => rest.is_empty(),
            _ => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            FakeBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            _ => SizeHint::default(),
        }
    }
}
