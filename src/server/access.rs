//! The access log line and the served-bytes metric of a response, written once its body
//! has been sent or given up on, so that `bytes=` counts the body bytes that went to the
//! socket, not those the response promised: a client that leaves after 1 MB of a 10 MB
//! file is logged with about 1 MB.
//!
//! ```text
//!  App::handle ─► (response, Access) ─┬─ h1: respond() counts what the socket took ─► finish
//!                                     └─ hyper: Logged counts the frames hyper takes ─► finish
//!                                        at the end of the body, or when hyper drops it
//! ```
//!
//! On hyper's connections a frame counts once hyper takes it from the body: it may still be
//! in hyper's buffers (or, for HTTP/2, waiting for the client's flow-control window) when a
//! client leaves, so the count can exceed what was written by up to those buffers. binplz's
//! own path counts what each write or `sendfile` call reports.

use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Uri};
use hyper::body::{Frame, SizeHint};

use super::body::Body;
use super::metrics::Metrics;
use super::App;

/// What the access log says of one request, waiting for the count of bytes sent.
pub struct Access {
    pub method: Method,
    /// The request target, for its path (a clone shares the request's bytes).
    pub uri: Uri,
    pub status: u16,
    /// The cache tier that answered, for a file.
    pub tier: Option<&'static str>,
    pub client: IpAddr,
    pub start: Instant,
    /// Whether the body is a served file's, counted in `binplz_bytes_served_total`.
    pub file_bytes: bool,
}

impl Access {
    /// Logs the request with `sent` body bytes, and counts them for a file.
    pub fn finish(self, sent: u64, metrics: &Metrics) {
        if self.file_bytes {
            metrics.bytes(sent);
        }
        // Milliseconds to the microsecond: a number in JSON, `0.123` in text.
        let ms = (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        let tier = self.tier.unwrap_or("-");
        tracing::info!(target: "binplz::access", method = %self.method, path = %self.uri.path(), status = self.status, bytes = sent, ms, cache = %tier, client = %self.client);
    }
}

/// A response body for hyper that counts the data it gives hyper and finishes its
/// [`Access`] at its end, or when hyper drops it first (the client left, or the
/// connection failed).
pub struct Logged {
    body: Body,
    sent: u64,
    access: Option<Access>,
    app: App,
}

impl Logged {
    pub fn new(body: Body, access: Access, app: App) -> Logged {
        Logged {
            body,
            sent: 0,
            access: Some(access),
            app,
        }
    }

    fn finish(&mut self) {
        if let Some(access) = self.access.take() {
            access.finish(self.sent, self.app.metrics());
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.finish();
    }
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
            }
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
