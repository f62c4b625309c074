//! A connection with a write timeout: hyper has none, so a client that stops reading would
//! otherwise hold its connection (and the file being sent) forever.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

pub struct WriteTimeout<T> {
    inner: T,
    timeout: Duration,
    /// Made on the first write that has to wait, then reset for each later one: a fresh
    /// timer per pending write was an allocation each time.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Whether the deadline is counting: from a write left pending until one makes progress.
    armed: bool,
}

impl<T> WriteTimeout<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        WriteTimeout {
            inner,
            timeout,
            deadline: None,
            armed: false,
        }
    }

    /// Passes a write's result through; a write still pending arms the deadline, and one
    /// that made progress disarms it.
    fn guard<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match poll {
            Poll::Pending => match self.pending(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
            ready => {
                self.armed = false;
                ready
            }
        }
    }

    fn pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let now = tokio::time::Instant::now();
        // A timeout too long to add to now is as good as none: thirty years then.
        let at = now
            .checked_add(self.timeout)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30));
        let deadline = match (&mut self.deadline, self.armed) {
            (Some(d), true) => d,
            (Some(d), false) => {
                d.as_mut().reset(at);
                d
            }
            (slot @ None, _) => slot.insert(Box::pin(tokio::time::sleep_until(at))),
        };
        self.armed = true;
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

use std::future::Future;

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Bytes httparse takes in a request target but `http::Uri` (and so hyper) refuses: `<`,
/// `>`, `` ` ``, DEL, every non-ASCII byte, and `"` (refused in a query, though not in a
/// path). curl sends them as typed, so `curl host/a\`b -o tree` would get a 400 for a
/// malformed request. Escaped, they reach the router, whose 400 says what is wrong.
fn needs_escape(b: u8) -> bool {
    matches!(b, b'<' | b'>' | b'`' | b'"' | 0x7f..=0xff)
}

/// Where the escaper is in the HTTP/1 byte stream it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The method, up to the first space; `seen` counts its bytes so far.
    Method { seen: usize },
    /// The request target, up to the next space or line end.
    Target,
    /// The rest of the head; `newlines` counts line ends in a row (two end it).
    Head { newlines: u8 },
    /// Bytes passed on untouched from here on: an HTTP/2 connection, a request with a body
    /// (whose end this does not track), or anything it does not understand.
    Off,
}

/// Percent-encodes [`needs_escape`] bytes in the request targets of HTTP/1 requests without
/// a body; everything else passes through unchanged. It keeps no request bytes back: it
/// only remembers the start of the current header line, up to [`LINE_PREFIX`] bytes.
#[derive(Debug)]
pub struct TargetEscaper {
    place: Place,
    /// The current request is a GET or HEAD with no header announcing a body, so the next
    /// request starts where its head ends.
    bodiless: bool,
    method: [u8; 8],
    line: [u8; LINE_PREFIX],
    line_len: usize,
}

/// Bytes of a header line kept to recognise `content-length:` and `transfer-encoding:`.
const LINE_PREFIX: usize = 18;

impl Default for TargetEscaper {
    fn default() -> Self {
        TargetEscaper {
            place: Place::Method { seen: 0 },
            bodiless: false,
            method: [0; 8],
            line: [0; LINE_PREFIX],
            line_len: 0,
        }
    }
}

impl TargetEscaper {
    /// Whether everything from here on passes through untouched.
    pub fn is_off(&self) -> bool {
        self.place == Place::Off
    }

    /// Appends `input`, escaped where it belongs, to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for (i, &b) in input.iter().enumerate() {
            match self.place {
                Place::Off => {
                    out.extend_from_slice(&input[i..]);
                    return;
                }
                Place::Method { seen } => {
                    out.push(b);
                    if b == b' ' && seen > 0 {
                        let m = &self.method[..seen];
                        self.bodiless = m == b"GET" || m == b"HEAD";
                        self.place = Place::Target;
                    } else if seen == 0 && (b == b'\r' || b == b'\n') {
                        // Blank lines before a request line are allowed.
                    } else if b.is_ascii_uppercase() && seen < self.method.len() {
                        self.method[seen] = b;
                        self.place = Place::Method { seen: seen + 1 };
                    } else {
                        self.place = Place::Off;
                    }
                }
                Place::Target => {
                    if needs_escape(b) {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        out.extend_from_slice(&[
                            b'%',
                            HEX[usize::from(b >> 4)],
                            HEX[usize::from(b & 15)],
                        ]);
                    } else {
                        out.push(b);
                        if matches!(b, b' ' | b'\r' | b'\n') {
                            self.place = Place::Head {
                                newlines: u8::from(b == b'\n'),
                            };
                            self.line_len = 0;
                        }
                    }
                }
                Place::Head { newlines } => {
                    out.push(b);
                    match b {
                        b'\r' => {}
                        b'\n' => {
                            if newlines >= 1 {
                                // The head ended: the next request, if its request had
                                // no body.
                                self.place = if self.bodiless {
                                    Place::Method { seen: 0 }
                                } else {
                                    Place::Off
                                };
                            } else {
                                self.place = Place::Head { newlines: 1 };
                            }
                            self.line_len = 0;
                        }
                        _ => {
                            self.place = Place::Head { newlines: 0 };
                            if self.line_len < LINE_PREFIX {
                                self.line[self.line_len] = b.to_ascii_lowercase();
                                self.line_len += 1;
                                let line = &self.line[..self.line_len];
                                if line == b"content-length:" || line == b"transfer-encoding:" {
                                    self.bodiless = false;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A connection whose reads go through a [`TargetEscaper`]; writes pass through.
pub struct EscapeTargets<T> {
    inner: T,
    escaper: TargetEscaper,
    /// False until [`EscapeTargets::escape`] for a [`EscapeTargets::deferred`] one.
    escaping: bool,
    /// Where raw bytes are read to before escaping.
    raw: Box<[u8]>,
    /// Escaped bytes that did not fit the caller's buffer yet.
    pending: Vec<u8>,
    pos: usize,
}

/// Bytes read from the socket at a time while escaping (request heads are small).
const ESCAPE_READ: usize = 4096;

impl<T> EscapeTargets<T> {
    pub fn new(inner: T) -> Self {
        EscapeTargets {
            inner,
            escaper: TargetEscaper::default(),
            escaping: true,
            raw: Box::default(),
            pending: Vec::new(),
            pos: 0,
        }
    }

    /// Reads pass through untouched until [`EscapeTargets::escape`] is called: for a reader
    /// that parses requests itself and escapes only when a head does not parse.
    pub fn deferred(inner: T) -> Self {
        EscapeTargets {
            escaping: false,
            ..EscapeTargets::new(inner)
        }
    }

    /// Escapes from here on, starting with `read`: bytes read from this connection and not
    /// yet consumed, which must start at a request's start (or be the first bytes). Does
    /// nothing once escaping.
    pub fn escape(&mut self, read: &mut bytes::BytesMut) {
        if self.escaping {
            return;
        }
        self.escaping = true;
        let mut out = Vec::with_capacity(read.len() + 16);
        self.escaper.push(read, &mut out);
        read.clear();
        read.extend_from_slice(&out);
    }

    pub fn is_escaping(&self) -> bool {
        self.escaping
    }

    /// The connection, for writes that bypass this wrapper (writes are not escaped).
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

/// A connection whose first reads return bytes already read from it: what binplz's own
/// HTTP/1 reader took before handing the connection to hyper. Writes pass through.
pub struct Prefixed<T> {
    read: bytes::Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(read: bytes::Bytes, inner: T) -> Self {
        Prefixed { read, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read.split_to(n));
        Poll::Ready(Ok(()))
    }
}

/// `AsyncWrite` straight through to `inner`, for wrappers that change only what is read.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<T: AsyncWrite + Unpin> AsyncWrite for $wrapper<T> {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

write_through!(Prefixed);
write_through!(EscapeTargets);

impl<T: AsyncRead + Unpin> AsyncRead for EscapeTargets<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos == this.pending.len() {
            if !this.escaping || this.escaper.is_off() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // Zeroed once per connection: zeroing a fresh buffer for every read cost
            // more than the rest of the escaping.
            if this.raw.is_empty() {
                this.raw = vec![0u8; ESCAPE_READ].into_boxed_slice();
            }
            let mut raw_buf = ReadBuf::new(&mut this.raw);
            match Pin::new(&mut this.inner).poll_read(cx, &mut raw_buf) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            this.pending.clear();
            this.pos = 0;
            this.escaper.push(raw_buf.filled(), &mut this.pending);
        }
        let n = (this.pending.len() - this.pos).min(buf.remaining());
        buf.put_slice(&this.pending[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_times_out() {
        // A 1-byte duplex pipe nobody reads: the second write blocks.
        let (a, _b) = tokio::io::duplex(1);
        let mut w = WriteTimeout::new(a, Duration::from_secs(5));
        let err = w.write_all(b"xy").await.expect_err("must time out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn each_stall_gets_the_whole_timeout_again() {
        let (a, mut b) = tokio::io::duplex(1);
        let mut w = WriteTimeout::new(a, Duration::from_secs(5));
        // Stalls of 4 s each, under the timeout, with progress in between.
        let reader = tokio::spawn(async move {
            let mut byte = [0u8; 1];
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                tokio::io::AsyncReadExt::read_exact(&mut b, &mut byte).await?;
            }
            Ok::<_, io::Error>(b)
        });
        w.write_all(b"abcd").await.expect("no stall reaches 5 s");
        let _b = reader.await.expect("join").expect("read");
        // Nobody reads any more: the next stall times out.
        let err = w.write_all(b"ef").await.expect_err("must time out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reading_peer_never_times_out() {
        let (a, mut b) = tokio::io::duplex(1);
        let reader = tokio::spawn(async move {
            let mut v = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut b, &mut v)
                .await
                .map(|_| v)
        });
        let mut w = WriteTimeout::new(a, Duration::from_secs(5));
        w.write_all(&[7u8; 64]).await.expect("written");
        w.shutdown().await.expect("shutdown");
        drop(w);
        assert_eq!(reader.await.expect("join").expect("read"), vec![7u8; 64]);
    }

    fn escaped(chunks: &[&[u8]]) -> Vec<u8> {
        let mut e = TargetEscaper::default();
        let mut out = Vec::new();
        for c in chunks {
            e.push(c, &mut out);
        }
        out
    }

    #[test]
    fn refused_bytes_in_targets_are_escaped_and_nothing_else_changes() {
        let input: &[u8] = b"GET /a`b<c>\xc3\xa9 HTTP/1.1\r\nHost: x`y\r\nUser-Agent: <z>\r\n\r\n\
                             HEAD /x`?q=\x7f HTTP/1.1\r\nHost: x\r\n\r\n";
        let want: &[u8] =
            b"GET /a%60b%3Cc%3E%C3%A9 HTTP/1.1\r\nHost: x`y\r\nUser-Agent: <z>\r\n\r\n\
                            HEAD /x%60?q=%7F HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(escaped(&[input]), want);
        // However the bytes arrive.
        for split in 0..input.len() {
            let (a, b) = input.split_at(split);
            assert_eq!(escaped(&[a, b]), want, "split at {split}");
        }
        let bytewise: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(escaped(&bytewise), want);
    }

    #[test]
    fn a_quote_in_a_query_is_escaped_for_http_uri() {
        let out = escaped(&[b"GET /a?q=\"x\" HTTP/1.1\r\n\r\n"]);
        assert_eq!(out, b"GET /a?q=%22x%22 HTTP/1.1\r\n\r\n");
        let target = &out[4..out.iter().skip(4).position(|&b| b == b' ').unwrap_or(0) + 4];
        assert!(http::Uri::try_from(target).is_ok());
    }

    #[rstest::rstest]
    #[case::a_body_by_length(
        b"GET /a HTTP/1.1\r\nContent-Length: 3\r\n\r\n`x`GET /`b HTTP/1.1\r\n\r\n"
    )]
    #[case::a_chunked_body(
        b"GET /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n1\r\n`\r\n0\r\n\r\n"
    )]
    #[case::another_method(b"POST /a HTTP/1.1\r\n\r\nGET /`b HTTP/1.1\r\n\r\n")]
    #[case::the_http2_preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04`<>\xff")]
    #[case::garbage(b"\x16\x03\x01\x02\x00\x01\x00 `<>\xff")]
    fn after_a_body_or_an_unknown_start_everything_passes_through(#[case] input: &[u8]) {
        let out = escaped(&[input]);
        assert_eq!(out, input);
    }

    #[tokio::test]
    async fn a_deferred_reader_passes_bytes_through_until_told_to_escape() {
        use tokio::io::AsyncReadExt;
        let (mut a, b) = tokio::io::duplex(256);
        a.write_all(b"GET /`a HTTP/1.1\r\n").await.expect("write");
        let mut r = EscapeTargets::deferred(b);
        let mut buf = bytes::BytesMut::new();
        r.read_buf(&mut buf).await.expect("read");
        assert_eq!(&buf[..], b"GET /`a HTTP/1.1\r\n");
        assert!(!r.is_escaping());
        r.escape(&mut buf);
        assert!(r.is_escaping());
        assert_eq!(&buf[..], b"GET /%60a HTTP/1.1\r\n");
        // The escaper goes on where the bytes it was given ended.
        a.write_all(b"Host: `\r\n\r\nGET /<b HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        drop(a);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.expect("read");
        assert_eq!(rest, b"Host: `\r\n\r\nGET /%3Cb HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn the_reader_escapes_across_small_caller_buffers() {
        use tokio::io::AsyncReadExt;
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b"GET /\xff\xff\xff\xff HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        drop(a);
        let mut r = EscapeTargets::new(b);
        let mut out = Vec::new();
        let mut small = [0u8; 5];
        loop {
            let n = r.read(&mut small).await.expect("read");
            if n == 0 {
                break;
            }
            out.extend_from_slice(&small[..n]);
        }
        assert_eq!(out, b"GET /%FF%FF%FF%FF HTTP/1.1\r\n\r\n");
    }
}
