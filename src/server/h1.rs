//! HTTP/1 `GET` and `HEAD` requests without a body, answered by binplz itself so that a
//! file body goes from the page cache (disk tier) or a sealed memory file (memory tier) to
//! the socket with `sendfile(2)`. hyper writes bodies from this process's memory only: with
//! it, copying each body into the kernel took a quarter of the machine's CPU time when
//! serving 1 MB files, and nginx, which uses `sendfile`, served half as many again.
//!
//! Everything else goes to hyper, on the same connection, with the bytes read so far:
//! other methods, requests with a body, `Expect` or `Upgrade`, HTTP/2. Once hyper has a
//! connection it keeps it, so whatever this module does not take is answered exactly as
//! before. A head hyper would refuse with a bodiless 400, 414 or 431 of its own (one that
//! httparse, hyper's parser, refuses, a body whose length is unclear, a head too large) is
//! refused here instead, with the error script every other error has (see [`Refusal`]).
//!
//! ```text
//!  read a head (header read timeout, shutdown) ─► httparse ─► plain GET or HEAD?
//!     yes ─► App::handle ─► head + bytes in one write, or head (MSG_MORE) + sendfile
//!            (write timeout per stall) ─► keep-alive? next head : close
//!     refused (as hyper would) ─► the error script ─► close
//!     no  ─► hyper (HTTP/1 or HTTP/2) with the bytes read so far
//! ```

use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Uri, Version,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::body::{Body, Chunks, Out};
use super::io::EscapeTargets;
use super::metrics::Metrics;
use super::App;
use crate::cache::disk::{in_page_cache, read_at_cached};

/// Largest request head accepted. curl's and browsers' heads are well under 1 KiB, and
/// nginx refuses lines over 8 KiB; a larger head is refused with 431 (414 when its request
/// line alone is larger). hyper's own limit (about 400 KiB) would let a connection hold
/// six times as much, and answer with an empty body.
pub const MAX_HEAD: usize = 64 << 10;
/// Most header fields parsed on the fast path; a request with more is parsed again with
/// hyper's limit, [`HYPER_MAX_HEADERS`].
const MAX_HEADERS: usize = 64;
/// hyper's limit on header fields (its default): a request with more is refused with 431.
const HYPER_MAX_HEADERS: usize = 100;
/// hyper's limit on a request target's length (414 beyond; `http::Uri` allows no more).
const MAX_TARGET: usize = u16::MAX as usize - 1;
/// The start of the HTTP/2 connection preface, which httparse refuses (as version 2.0).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// After a refusal, most bytes still read (and dropped) before the connection closes, and
/// for how long: closing with the client's bytes unread resets the connection, and the
/// client may then lose the answer before reading it.
const LINGER_BYTES: usize = 1 << 20;
const LINGER_TIME: Duration = Duration::from_secs(2);
/// Read at a time while waiting for a head.
const READ_CHUNK: usize = 4096;
/// Bodies up to this size are copied behind the head and sent in one write; larger ones
/// are written from where they are held.
const COALESCE_MAX: usize = 16 << 10;
/// Bytes of a file sent after one check that the page cache holds them (see [`send_file`]).
const SEND_WINDOW: u64 = 2 << 20;
/// Most bytes read from a file at a time where it is read rather than sent.
const READ_MAX: usize = 128 << 10;

/// How a connection's time here ended.
pub enum Outcome {
    /// Closed (by either side, a timeout, an error or shutdown).
    Closed,
    /// A request this module does not take: hyper answers it and the rest of the
    /// connection, reading these bytes first.
    Handoff(Bytes),
}

/// A request head, parsed and taken apart into owned values.
pub(crate) struct Head {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) keep_alive: bool,
}

// Returned once per request and moved once: boxing the head would be an allocation each.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Parsed {
    /// More bytes needed.
    Partial,
    /// Not a plain `GET` or `HEAD`, and nothing hyper would refuse: hyper's.
    Other,
    /// Not HTTP as httparse reads it (which may change once the target is escaped).
    Invalid,
    /// Refused here, as hyper would refuse it (but with the error script).
    Refused(Refusal),
    /// A head of `len` bytes.
    Plain(Head, usize),
}

/// Why a request is refused before it is parsed whole: each is a status hyper answers with
/// an empty body, which `sh` runs as a script that succeeds and says nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not HTTP/1 as hyper reads it, even with its target escaped; or a body whose length
    /// is unclear (a bad `Content-Length`, `Transfer-Encoding` not ending in `chunked`).
    Malformed,
    /// A request line over [`MAX_HEAD`], or a target over [`MAX_TARGET`].
    TargetTooLong,
    /// A head over [`MAX_HEAD`], or with more than [`HYPER_MAX_HEADERS`] fields.
    HeadTooLarge,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::Malformed => StatusCode::BAD_REQUEST,
            Refusal::TargetTooLong => StatusCode::URI_TOO_LONG,
            Refusal::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }

    /// What the client is told (never any of its bytes).
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed request",
            Refusal::TargetTooLong => "request target too long",
            Refusal::HeadTooLarge => "request head too large",
        }
    }
}

/// Parses the head at the start of `buf`. Values are slices of `buf`'s bytes, not copies.
pub(crate) fn parse(buf: &BytesMut) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        Ok(httparse::Status::Partial) => return Parsed::Refused(too_large(buf)),
        Err(httparse::Error::TooManyHeaders) => return handoff(buf),
        Err(_) if is_h2_preface(buf) => return Parsed::Other,
        Err(_) => return Parsed::Invalid,
    };
    let method = match req.method {
        Some("GET") => Method::GET,
        Some("HEAD") => Method::HEAD,
        _ => return handoff(buf),
    };
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return handoff(buf),
    };
    let Some(path) = req.path.filter(|p| p.starts_with('/')) else {
        return handoff(buf);
    };
    // Where each slice lies in `buf`, so the frozen head can be sliced without copies.
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let at = (s.as_ptr() as usize).wrapping_sub(base);
        at..at + s.len()
    };
    let bytes = Bytes::copy_from_slice(&buf[..len]);
    let Ok(uri) = Uri::from_maybe_shared(bytes.slice(span(path.as_bytes()))) else {
        return handoff(buf);
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let (mut close, mut keep) = (false, false);
    for field in req.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            return handoff(buf);
        };
        if [
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::EXPECT,
            header::UPGRADE,
        ]
        .contains(&name)
        {
            return handoff(buf);
        }
        let Ok(value) = HeaderValue::from_maybe_shared(bytes.slice(span(field.value))) else {
            return handoff(buf);
        };
        if name == header::CONNECTION {
            for token in field.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                close |= token.eq_ignore_ascii_case(b"close");
                keep |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        headers.append(name, value);
    }
    let keep_alive = !close && (version == Version::HTTP_11 || keep);
    let head = Head {
        method,
        uri,
        version,
        headers,
        keep_alive,
    };
    Parsed::Plain(head, len)
}

/// A request [`parse`] does not take, checked as hyper checks it: what hyper would refuse
/// with an empty body is refused here, and the rest is hyper's. Parsed again, with hyper's
/// limit on header fields: only the request that hands a connection over pays for it.
#[cold]
fn handoff(buf: &[u8]) -> Parsed {
    let mut fields = vec![httparse::EMPTY_HEADER; HYPER_MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        Ok(httparse::Status::Partial) => return Parsed::Refused(too_large(buf)),
        Err(httparse::Error::TooManyHeaders) => return Parsed::Refused(Refusal::HeadTooLarge),
        Err(_) if is_h2_preface(buf) => return Parsed::Other,
        Err(_) => return Parsed::Invalid,
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Invalid;
    };
    if target.len() > MAX_TARGET {
        return Parsed::Refused(Refusal::TargetTooLong);
    }
    // What hyper cannot take apart is invalid (a target with a byte `http::Uri` refuses
    // may parse once escaped).
    if Method::from_bytes(method.as_bytes()).is_err() || Uri::try_from(target).is_err() {
        return Parsed::Invalid;
    }
    // The body's length as hyper reads it (RFC 9112, 6.3): a `Transfer-Encoding` (in
    // HTTP/1.1 only) must end in `chunked`, the last one deciding, and makes any
    // `Content-Length` after it moot; a `Content-Length` before it must still be digits,
    // and equal to any other.
    let mut chunked = None;
    let mut length = None;
    for field in req.headers.iter() {
        if HeaderName::from_bytes(field.name.as_bytes()).is_err() {
            return Parsed::Invalid;
        }
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            if version == 0 {
                return Parsed::Refused(Refusal::Malformed);
            }
            let last = field
                .value
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or_default();
            chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if field.name.eq_ignore_ascii_case("content-length") && chunked.is_none() {
            let n = digits(field.value);
            if n.is_none() || length.is_some_and(|l| Some(l) != n) {
                return Parsed::Refused(Refusal::Malformed);
            }
            length = n;
        }
    }
    if chunked == Some(false) {
        return Parsed::Refused(Refusal::Malformed);
    }
    Parsed::Other
}

/// A `Content-Length` value as hyper reads it: digits only, no sign, no list, and at most
/// hyper's largest length (two below `u64::MAX`, which it keeps for its own use).
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    let mut n = 0u64;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    (n <= u64::MAX - 2).then_some(n)
}

/// Which limit an unfinished head of [`MAX_HEAD`] bytes broke: its request line's (the
/// blank lines allowed before it aside), or the whole head's.
fn too_large(buf: &[u8]) -> Refusal {
    let start = buf
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(buf.len());
    if buf[start..].contains(&b'\n') {
        Refusal::HeadTooLarge
    } else {
        Refusal::TargetTooLong
    }
}

/// Whether `buf` is (the start of) the HTTP/2 connection preface: hyper's to answer.
fn is_h2_preface(buf: &[u8]) -> bool {
    let n = buf.len().min(H2_PREFACE.len());
    buf[..n] == H2_PREFACE[..n]
}

/// Per-connection settings.
pub struct Limits {
    pub header_read_timeout: Duration,
    pub write_timeout: Duration,
}

/// Serves plain requests on `io` until the connection closes or a request is hyper's.
/// `shutdown` turning true closes the connection when it is between responses.
pub async fn serve(
    io: &mut EscapeTargets<TcpStream>,
    app: &App,
    peer: SocketAddr,
    limits: &Limits,
    shutdown: &mut watch::Receiver<bool>,
) -> Outcome {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut scratch = Scratch {
        out: Vec::with_capacity(1024),
        date: Date::default(),
    };
    loop {
        // Timed from when a request is awaited, as hyper does: an idle keep-alive
        // connection is closed after the same time as a slow head. Set by the first read
        // that has to wait: most find their bytes there, and need no clock.
        let mut deadline = None;
        let (head, len) = loop {
            let refused = match parse(&buf) {
                Parsed::Plain(head, len) => break (head, len),
                // A byte httparse refuses in the target, as curl sends `` ` `` or `<`:
                // escaped (see `io::TargetEscaper`), this request and the rest of the
                // connection parse, and the name gets binplz's own 400.
                Parsed::Invalid if !io.is_escaping() => {
                    io.escape(&mut buf);
                    continue;
                }
                // Still not HTTP, or something else hyper would answer with an empty
                // 400, 414 or 431, which runs as a script that succeeds: the error script
                // instead, and the connection closes (where its next request starts is
                // unknown).
                Parsed::Invalid => Some(Refusal::Malformed),
                Parsed::Refused(why) => Some(why),
                Parsed::Other => {
                    io.escape(&mut buf);
                    return Outcome::Handoff(buf.freeze());
                }
                Parsed::Partial => None,
            };
            if let Some(why) = refused {
                refuse(io, app, peer, &buf, why, &mut scratch, limits).await;
                return Outcome::Closed;
            }
            if stopping(shutdown) {
                return Outcome::Closed;
            }
            buf.reserve(READ_CHUNK);
            let mut read = std::pin::pin!(io.read_buf(&mut buf));
            let read = match std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    let at = *deadline
                        .get_or_insert_with(|| Instant::now() + limits.header_read_timeout);
                    tokio::select! {
                        biased;
                        r = read.as_mut() => r,
                        () = tokio::time::sleep_until(at) => return Outcome::Closed,
                        () = stopped(shutdown) => return Outcome::Closed,
                    }
                }
            };
            if !matches!(read, Ok(n) if n > 0) {
                return Outcome::Closed;
            }
        };
        let _ = buf.split_to(len);
        let (resp, access) = app
            .handle(&head.method, &head.uri, head.version, &head.headers, peer)
            .await;
        let keep_alive = head.keep_alive && !stopping(shutdown);
        let stream = io.get_ref();
        let mut sent = 0;
        let responded = respond(
            stream,
            &head,
            resp,
            keep_alive,
            &mut scratch,
            limits,
            app.metrics(),
            &mut sent,
        )
        .await;
        access.finish(sent, app.metrics());
        match responded {
            Ok(()) if keep_alive => {}
            Ok(()) => {
                let _ = io.shutdown().await;
                return Outcome::Closed;
            }
            Err(e) => {
                tracing::debug!(err = %e, %peer, "response not sent whole; connection closed");
                return Outcome::Closed;
            }
        }
    }
}

/// Answers a refused request (whose bytes start `buf`) with the error script, then closes
/// the connection, reading what the client still sends for a while first (see
/// [`LINGER_BYTES`]).
async fn refuse(
    io: &mut EscapeTargets<TcpStream>,
    app: &App,
    peer: SocketAddr,
    buf: &[u8],
    why: Refusal,
    scratch: &mut Scratch,
    limits: &Limits,
) {
    // A `HEAD` gets no body; a version that is not 1.0 is answered as 1.1, as hyper does.
    let head = Head {
        method: if buf.starts_with(b"HEAD ") {
            Method::HEAD
        } else {
            Method::GET
        },
        uri: Uri::from_static("/"),
        version: Version::HTTP_11,
        headers: HeaderMap::new(),
        keep_alive: false,
    };
    let resp = app.refuse(why, head.method == Method::HEAD, peer);
    let sent = respond(
        io.get_ref(),
        &head,
        resp,
        false,
        scratch,
        limits,
        app.metrics(),
        &mut 0,
    )
    .await;
    if sent.is_err() || io.shutdown().await.is_err() {
        return;
    }
    let mut drop_buf = vec![0u8; READ_CHUNK];
    let mut dropped = 0;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while dropped < LINGER_BYTES {
            match io.read(&mut drop_buf).await {
                Ok(n) if n > 0 => dropped += n,
                _ => break,
            }
        }
    })
    .await;
}

fn stopping(shutdown: &watch::Receiver<bool>) -> bool {
    *shutdown.borrow()
}

/// Resolves once `shutdown` is true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Writes `resp` for a request with `head`, adding to `sent` the body bytes the socket
/// took (also when the response fails part way).
// The connection's state, passed apart: bundling it would only rename the arguments.
#[allow(clippy::too_many_arguments)]
async fn respond(
    stream: &TcpStream,
    head: &Head,
    resp: Response<Body>,
    keep_alive: bool,
    scratch: &mut Scratch,
    limits: &Limits,
    metrics: &Metrics,
    sent: &mut u64,
) -> io::Result<()> {
    let Scratch { out, date } = scratch;
    let (parts, body) = resp.into_parts();
    let status = parts.status;
    // No body for HEAD, or with these statuses (RFC 9110, 6.4.1).
    let bodiless = head.method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let body = if bodiless {
        Out::Empty
    } else {
        body.into_out()
    };
    let size = match &body {
        Out::Empty => 0,
        Out::Bytes(b) => b.len() as u64,
        Out::File { len, .. } => *len,
        Out::Channel(c) => c.len,
    };
    let declared = parts.headers.get(header::CONTENT_LENGTH);
    let declared_size = declared.and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if !bodiless && declared.is_some() && declared_size != Some(size) {
        return Err(io::Error::other("Content-Length differs from the body"));
    }
    out.clear();
    out.extend_from_slice(if head.version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let no_length = status.is_informational() || status == StatusCode::NO_CONTENT;
    if declared.is_none() && !no_length && status != StatusCode::NOT_MODIFIED {
        out.extend_from_slice(b"content-length: ");
        let _ = write!(out, "{size}\r\n");
    }
    if !parts.headers.contains_key(header::DATE) {
        field(out, b"date", date.now().as_bytes());
    }
    match (keep_alive, head.version) {
        (false, _) => field(out, b"connection", b"close"),
        (true, Version::HTTP_10) => field(out, b"connection", b"keep-alive"),
        (true, _) => {}
    }
    out.extend_from_slice(b"\r\n");
    let t = limits.write_timeout;
    // Bytes written, the head's included; the head's are taken off at the end.
    let head_len = out.len() as u64;
    let mut written = 0;
    let result = match body {
        Out::Empty => write_all(stream, &mut [IoSlice::new(out)], t, &mut written).await,
        Out::Bytes(b) if b.len() <= COALESCE_MAX => {
            out.extend_from_slice(&b);
            write_all(stream, &mut [IoSlice::new(out)], t, &mut written).await
        }
        Out::Bytes(b) => {
            let bufs = &mut [IoSlice::new(out), IoSlice::new(&b)];
            write_all(stream, bufs, t, &mut written).await
        }
        Out::File { file, offset, len } if len <= COALESCE_MAX as u64 => {
            let at = out.len();
            out.resize(at + len as usize, 0);
            match read_without_waiting(&file, offset, &mut out[at..], metrics).await {
                Ok(()) => write_all(stream, &mut [IoSlice::new(out)], t, &mut written).await,
                Err(e) => Err(e),
            }
        }
        Out::File { file, offset, len } => match send_more(stream, out, t).await {
            Ok(()) => {
                written = head_len;
                send_file(stream, &file, offset, len, t, metrics, &mut written).await
            }
            Err(e) => Err(e),
        },
        Out::Channel(c) => match send_more(stream, out, t).await {
            Ok(()) => {
                written = head_len;
                send_chunks(stream, c, t, &mut written).await
            }
            Err(e) => Err(e),
        },
    };
    *sent += written.saturating_sub(head_len);
    result
}

/// Sends `chunks` as they come. An error from the channel, or an end before its length, is
/// an error here: the caller closes the connection, so the client sees a cut transfer.
async fn send_chunks(
    stream: &TcpStream,
    mut chunks: Chunks,
    t: Duration,
    written: &mut u64,
) -> io::Result<()> {
    while let Some(chunk) = chunks.rx.recv().await {
        let chunk = chunk?;
        if chunk.len() as u64 > chunks.len {
            return Err(io::Error::other("body longer than announced"));
        }
        chunks.len -= chunk.len() as u64;
        write_all(stream, &mut [IoSlice::new(&chunk)], t, written).await?;
    }
    if chunks.len != 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "body ended early",
        ));
    }
    Ok(())
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What a connection reuses from one response to the next.
struct Scratch {
    /// The response head, and a small body behind it.
    out: Vec<u8>,
    date: Date,
}

/// The `Date` value, formatted once a second.
#[derive(Default)]
struct Date {
    second: u64,
    text: String,
}

impl Date {
    fn now(&mut self) -> &str {
        let now = SystemTime::now();
        let second = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now);
        }
        &self.text
    }
}

/// Waits until `stream` takes bytes, for at most `timeout`: a client that stops reading
/// does not hold its connection (and the file being sent) forever.
async fn writable(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    match tokio::time::timeout(timeout, stream.writable()).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "client stopped reading",
        )),
    }
}

/// Runs the non-blocking `op` until it goes through, waiting for the socket between tries.
async fn retry<R>(
    stream: &TcpStream,
    timeout: Duration,
    mut op: impl FnMut() -> io::Result<R>,
) -> io::Result<R> {
    loop {
        match stream.try_io(Interest::WRITABLE, &mut op) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => writable(stream, timeout).await?,
            r => return r,
        }
    }
}

/// Writes every byte of `bufs`, in order, adding to `written` what the socket took.
async fn write_all(
    stream: &TcpStream,
    mut bufs: &mut [IoSlice<'_>],
    timeout: Duration,
    written: &mut u64,
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = retry(stream, timeout, || stream.try_write_vectored(bufs)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        *written += n as u64;
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

/// Writes the whole head, telling the kernel that more follows (`MSG_MORE`), so that the
/// head and the file's first bytes leave in the same segments.
async fn send_more(stream: &TcpStream, head: &[u8], timeout: Duration) -> io::Result<()> {
    let flags = rustix::net::SendFlags::MORE | rustix::net::SendFlags::NOSIGNAL;
    let mut done = 0;
    while done < head.len() {
        done += retry(stream, timeout, || {
            Ok(rustix::net::send(stream, &head[done..], flags)?)
        })
        .await?;
    }
    Ok(())
}

/// Sends `len` bytes of `file` from `offset` with `sendfile`, or by reading and writing
/// where the file's system has no `sendfile`, adding to `written` what the socket took.
/// A file that ends early is an error: the connection then closes short of its
/// `Content-Length`, which clients take as a failure.
///
/// The file goes out a window at a time, each first made sure to be in the page cache
/// ([`warm`]): `sendfile` from a file that is not would wait for the disk on this thread,
/// and with it every connection the thread serves.
async fn send_file(
    stream: &TcpStream,
    file: &Arc<File>,
    offset: u64,
    len: u64,
    timeout: Duration,
    metrics: &Metrics,
    written: &mut u64,
) -> io::Result<()> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let window_end = end.min(at.saturating_add(SEND_WINDOW));
        warm(file, at, window_end - at, metrics).await?;
        while at < window_end {
            let count = usize::try_from(window_end - at).unwrap_or(usize::MAX);
            let sent = retry(stream, timeout, || {
                let mut pos = at;
                let n = rustix::fs::sendfile(stream, file, Some(&mut pos), count)?;
                Ok(n)
            })
            .await;
            match sent {
                Ok(0) => return Err(early_end()),
                Ok(n) => {
                    at += n as u64;
                    *written += n as u64;
                }
                // Nothing sent yet, and this file cannot be sent that way.
                Err(e) if at == offset && unsupported(&e) => {
                    return copy_file(stream, file, offset, len, timeout, metrics, written).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

fn unsupported(e: &io::Error) -> bool {
    [
        rustix::io::Errno::INVAL,
        rustix::io::Errno::NOSYS,
        rustix::io::Errno::OPNOTSUPP,
    ]
    .iter()
    .any(|c| e.raw_os_error() == Some(c.raw_os_error()))
}

fn early_end() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "file ended early")
}

/// [`send_file`] by reading and writing.
async fn copy_file(
    stream: &TcpStream,
    file: &Arc<File>,
    offset: u64,
    len: u64,
    timeout: Duration,
    metrics: &Metrics,
    written: &mut u64,
) -> io::Result<()> {
    let end = offset + len;
    let mut at = offset;
    let mut buf = Vec::new();
    while at < end {
        let n = usize::try_from(end - at).unwrap_or(READ_MAX).min(READ_MAX);
        buf.resize(n, 0);
        read_without_waiting(file, at, &mut buf, metrics).await?;
        write_all(stream, &mut [IoSlice::new(&buf)], timeout, written).await?;
        at += n as u64;
    }
    Ok(())
}

/// Makes sure the page cache holds `len` bytes of `file` from `at`, reading them on a
/// blocking thread if its first or last byte is not there, and asking the kernel to read
/// the next window in meanwhile. A page between them that was dropped alone is not
/// noticed, and `sendfile` then waits for it here.
async fn warm(file: &Arc<File>, at: u64, len: u64, metrics: &Metrics) -> io::Result<()> {
    let last = at + len.saturating_sub(1);
    if in_page_cache(file, at)? && in_page_cache(file, last)? {
        return Ok(());
    }
    metrics.disk_wait();
    let file = file.clone();
    off_thread(move || {
        let mut buf = vec![0u8; READ_MAX.min(usize::try_from(len).unwrap_or(READ_MAX))];
        let mut done = 0;
        while done < len {
            let n = usize::try_from(len - done).map_or(buf.len(), |n| n.min(buf.len()));
            match file.read_at(&mut buf[..n], at + done) {
                Ok(0) => return Ok(()), // short: `sendfile` tells
                Ok(n) => done += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Only advice: the window is read already.
        let next = std::num::NonZeroU64::new(SEND_WINDOW);
        let _ = rustix::fs::fadvise(&*file, at + len, next, rustix::fs::Advice::WillNeed);
        Ok(())
    })
    .await
}

/// Fills `buf` from `file` at `offset`: what the page cache holds is read here, the rest
/// on a blocking thread. A file shorter than that is an error.
async fn read_without_waiting(
    file: &Arc<File>,
    offset: u64,
    buf: &mut [u8],
    metrics: &Metrics,
) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        match read_at_cached(file, &mut buf[done..], at)? {
            Some(0) => return Err(early_end()),
            Some(n) => done += n,
            None => {
                metrics.disk_wait();
                let file = file.clone();
                let mut rest = vec![0u8; buf.len() - done];
                let rest = off_thread(move || {
                    file.read_exact_at(&mut rest, at)
                        .map_err(eof_as_early_end)?;
                    Ok(rest)
                })
                .await?;
                buf[done..].copy_from_slice(&rest);
                return Ok(());
            }
        }
    }
    Ok(())
}

fn eof_as_early_end(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        early_end()
    } else {
        e
    }
}

/// Runs `op` on a blocking thread of the runtime.
async fn off_thread<R: Send + 'static>(
    op: impl FnOnce() -> io::Result<R> + Send + 'static,
) -> io::Result<R> {
    tokio::task::spawn_blocking(op)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::server::body::tests::{evicted_file_with, file_with, pattern};

    fn parsed(raw: &str) -> Parsed {
        parse(&BytesMut::from(raw.as_bytes()))
    }

    fn plain(raw: &str) -> (Head, usize) {
        match parsed(raw) {
            Parsed::Plain(h, n) => (h, n),
            Parsed::Partial => panic!("partial: {raw:?}"),
            Parsed::Other | Parsed::Invalid | Parsed::Refused(_) => {
                panic!("not taken: {raw:?}")
            }
        }
    }

    #[test]
    fn plain_gets_and_heads_are_taken_with_their_headers() {
        let raw = "GET /tree?rev=abc HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\nGET /next";
        let (head, len) = plain(raw);
        assert_eq!(len, raw.find("GET /next").unwrap());
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri.path(), "/tree");
        assert_eq!(head.uri.query(), Some("rev=abc"));
        assert_eq!(head.headers["range"], "bytes=0-1");
        assert!(head.keep_alive);
        let (head, _) = plain("HEAD / HTTP/1.1\r\n\r\n");
        assert_eq!(head.method, Method::HEAD);
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_header() {
        for (raw, keep) in [
            ("GET / HTTP/1.1\r\n\r\n", true),
            ("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false),
            (
                "GET / HTTP/1.1\r\nConnection: Keep-Alive, CLOSE\r\n\r\n",
                false,
            ),
            ("GET / HTTP/1.0\r\n\r\n", false),
            ("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true),
        ] {
            assert_eq!(plain(raw).0.keep_alive, keep, "{raw:?}");
        }
    }

    #[test]
    fn anything_but_a_plain_bodiless_get_or_head_is_handed_to_hyper() {
        for raw in [
            "POST / HTTP/1.1\r\n\r\n",
            "PUT / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /a b HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\u{1}b\r\n\r\n",
        ] {
            assert!(
                matches!(parsed(raw), Parsed::Other | Parsed::Invalid),
                "{raw:?}"
            );
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert!(matches!(
            parsed(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            Parsed::Other | Parsed::Invalid
        ));
        let up_to_hyper_s_limit: String = (0..HYPER_MAX_HEADERS)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        assert!(matches!(
            parsed(&format!("GET / HTTP/1.1\r\n{up_to_hyper_s_limit}\r\n")),
            Parsed::Other
        ));
    }

    #[rstest::rstest]
    #[case::a_head_over_the_limit(
        format!("GET / HTTP/1.1\r\nX: {}", "v".repeat(MAX_HEAD)),
        Refusal::HeadTooLarge
    )]
    #[case::a_request_line_over_the_limit(
        format!("\r\nGET /{}", "a".repeat(MAX_HEAD)),
        Refusal::TargetTooLong
    )]
    #[case::more_fields_than_hyper_takes(
        format!("GET / HTTP/1.1\r\n{}\r\n", "X: v\r\n".repeat(HYPER_MAX_HEADERS + 1)),
        Refusal::HeadTooLarge
    )]
    #[case::a_length_not_in_digits("POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n".into(), Refusal::Malformed)]
    #[case::a_list_of_lengths("POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n".into(), Refusal::Malformed)]
    #[case::lengths_that_differ(
        "POST / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 2\r\n\r\n".into(),
        Refusal::Malformed
    )]
    #[case::a_coding_not_ending_in_chunked(
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n".into(),
        Refusal::Malformed
    )]
    #[case::a_coding_in_http_1_0(
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
        Refusal::Malformed
    )]
    #[case::a_get_with_a_bad_length(
        "GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n".into(),
        Refusal::Malformed
    )]
    fn heads_hyper_would_refuse_are_refused_with_hyper_s_status(
        #[case] raw: String,
        #[case] why: Refusal,
    ) {
        match parsed(&raw) {
            Parsed::Refused(got) => assert_eq!(got, why),
            _ => panic!("not refused: {raw:?}"),
        }
    }

    #[rstest::rstest]
    #[case::the_http2_preface("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")]
    #[case::the_start_of_the_http2_preface("PRI * HTTP/2")]
    #[case::equal_lengths("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")]
    #[case::a_length_after_chunked(
        "POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: x\r\n\r\n"
    )]
    fn what_hyper_takes_is_handed_over(#[case] raw: &str) {
        assert!(matches!(parsed(raw), Parsed::Other), "{raw:?}");
    }

    #[test]
    fn an_unfinished_head_waits_for_more() {
        for raw in [
            "",
            "GE",
            "GET / HTTP/1.1\r\nHost: x\r\n",
            "GET / HTTP/1.1\r\n\r",
        ] {
            assert!(matches!(parsed(raw), Parsed::Partial), "{raw:?}");
        }
    }

    #[test]
    fn the_date_is_an_http_date() {
        let mut d = Date::default();
        let text = d.now().to_owned();
        assert!(httpdate::parse_http_date(&text).is_ok(), "{text}");
        assert!(text.ends_with(" GMT"));
    }

    /// A connected pair: (the server's end, the client's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (accepted.unwrap().0, client.unwrap())
    }

    fn memory_file_with(bytes: &[u8]) -> Arc<File> {
        use std::io::Write;
        let fd = rustix::fs::memfd_create("test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let mut f = File::from(fd);
        f.write_all(bytes).unwrap();
        Arc::new(f)
    }

    /// What the client end receives while `send` runs on the server end, and `send`'s result.
    async fn received<F, Fut>(send: F) -> (Vec<u8>, io::Result<()>)
    where
        F: FnOnce(TcpStream) -> Fut,
        Fut: std::future::Future<Output = io::Result<()>>,
    {
        let (server, mut client) = pair().await;
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        let result = send(server).await;
        (reader.await.unwrap(), result)
    }

    const WAIT: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn file_ranges_are_sent_exactly_from_disk_and_memory_files() {
        let bytes = pattern(3 * (256 << 10) + 17);
        let metrics = Arc::new(Metrics::default());
        for file in [file_with(&bytes), memory_file_with(&bytes)] {
            for (offset, len) in [(0, bytes.len()), (1, 100_000), (bytes.len() - 1, 1)] {
                let f = file.clone();
                let m = metrics.clone();
                let (got, r) = received(|s| async move {
                    let mut written = 0;
                    send_file(&s, &f, offset as u64, len as u64, WAIT, &m, &mut written).await?;
                    assert_eq!(written, len as u64, "counted");
                    Ok(())
                })
                .await;
                r.unwrap();
                assert!(got == bytes[offset..offset + len], "{offset}+{len}");
            }
        }
        assert_eq!(metrics.disk_waits(), 0, "both were in memory");
    }

    #[tokio::test]
    async fn only_files_the_page_cache_lacks_are_read_off_the_serving_thread() {
        // Three windows.
        let bytes = pattern(2 * SEND_WINDOW as usize + 1000);
        let Some(file) = evicted_file_with(&bytes) else {
            return;
        };
        let len = bytes.len() as u64;
        let metrics = Arc::new(Metrics::default());
        for round in ["from disk", "from the page cache"] {
            let (f, m) = (file.clone(), metrics.clone());
            let before = metrics.disk_waits();
            let (got, r) =
                received(|s| async move { send_file(&s, &f, 0, len, WAIT, &m, &mut 0).await })
                    .await;
            r.unwrap();
            assert!(got == bytes, "{round}");
            let waits = metrics.disk_waits() - before;
            if round == "from disk" {
                assert!(waits >= 1, "{round}: {waits} reads off the serving thread");
            } else {
                assert_eq!(waits, 0, "{round}");
            }
        }
    }

    #[tokio::test]
    async fn small_bodies_are_read_off_the_serving_thread_when_not_cached() {
        let bytes = pattern(3000);
        let Some(file) = evicted_file_with(&bytes) else {
            return;
        };
        let metrics = Metrics::default();
        let mut got = vec![0u8; 1000];
        read_without_waiting(&file, 5, &mut got, &metrics)
            .await
            .unwrap();
        assert!(got == bytes[5..1005]);
        assert_eq!(metrics.disk_waits(), 1);
        read_without_waiting(&file, 5, &mut got, &metrics)
            .await
            .unwrap();
        assert_eq!(metrics.disk_waits(), 1, "now cached");
        let mut more = vec![0u8; 100];
        let err = read_without_waiting(&file, 2950, &mut more, &metrics)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn copying_sends_the_same_bytes_where_sendfile_cannot() {
        // More than one read's chunk.
        let bytes = pattern(300_000);
        let file = file_with(&bytes);
        let m = Metrics::default();
        let (got, r) = received(|s| async move {
            let mut written = 0;
            copy_file(&s, &file, 3, 200_000, WAIT, &m, &mut written).await?;
            assert_eq!(written, 200_000, "counted");
            Ok(())
        })
        .await;
        r.unwrap();
        assert!(got == bytes[3..200_003]);
    }

    #[tokio::test]
    async fn a_file_shorter_than_promised_is_an_error_after_its_bytes() {
        let bytes = pattern(70_000);
        let file = file_with(&bytes);
        let m = Metrics::default();
        let (got, r) = received(|s| async move {
            let mut written = 0;
            let r = send_file(&s, &file, 0, 80_000, WAIT, &m, &mut written).await;
            assert_eq!(written, 70_000, "what was sent is counted");
            r
        })
        .await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            got == bytes,
            "the bytes there were are sent, and nothing else"
        );
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_times_the_send_out() {
        let (server, _client) = pair().await;
        let file = Arc::new(tempfile::tempfile().unwrap());
        // Sparse: far more than loopback's socket buffers hold, and nothing on disk.
        file.set_len(1 << 30).unwrap();
        let m = Metrics::default();
        let mut written = 0;
        let t = Duration::from_millis(100);
        let r = send_file(&server, &file, 0, 1 << 30, t, &m, &mut written).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(
            written > 0 && written < 1 << 30,
            "{written} bytes counted as sent to a client that read none"
        );
    }

    #[tokio::test]
    async fn heads_and_bodies_leave_in_order_in_one_or_more_writes() {
        let big = pattern(COALESCE_MAX * 4);
        let (got, r) = received(|s| {
            let big = big.clone();
            async move {
                let mut bufs = [b"head ", &b""[..], &big, b" tail"].map(IoSlice::new);
                write_all(&s, &mut bufs, WAIT, &mut 0).await?;
                send_more(&s, b"more ", WAIT).await
            }
        })
        .await;
        r.unwrap();
        let want = [&b"head "[..], &big, b" tail", b"more "].concat();
        assert!(got == want);
    }
}
