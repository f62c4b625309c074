//! The one response body type: nothing, bytes in memory, or a file range streamed from disk.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};

/// Chunk read from disk per frame. Measured with `cargo bench --bench serve` (disk tier,
/// 1 MB files): 128 KiB serves as many requests as 512 KiB, and holds a quarter of the
/// memory per connection in flight.
const FILE_CHUNK: usize = 128 << 10;
/// Chunks read ahead of the socket.
const READ_AHEAD: usize = 4;

pub struct Body {
    kind: Kind,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    File {
        rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
        remaining: u64,
    },
}

impl Body {
    pub fn empty() -> Body {
        Body { kind: Kind::Empty }
    }

    /// `len` bytes of `file` from `offset`, read on a blocking thread ahead of the socket.
    /// The body moves the descriptor's offset: nothing else may read through it.
    pub fn file(mut file: File, offset: u64, len: u64) -> Body {
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = file.seek(io::SeekFrom::Start(offset)) {
                let _ = tx.blocking_send(Err(e));
                return;
            }
            let mut left = len;
            while left > 0 {
                let n = left.min(FILE_CHUNK as u64);
                let res = read_chunk(&mut file, n);
                let failed = res.is_err();
                if tx.blocking_send(res).is_err() || failed {
                    return; // the client went away, or the read failed (reported)
                }
                left -= n;
            }
        });
        Body {
            kind: Kind::File { rx, remaining: len },
        }
    }
}

/// Reads exactly `n` bytes. `read_to_end` fills the vector's spare capacity without
/// zeroing it first: zeroing each chunk cost a fifth of the disk tier's throughput on 1 MB
/// files.
fn read_chunk(file: &mut File, n: u64) -> io::Result<Bytes> {
    let mut buf = Vec::with_capacity(usize::try_from(n).unwrap_or(FILE_CHUNK));
    file.take(n).read_to_end(&mut buf)?;
    if buf.len() as u64 != n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "file ended early",
        ));
    }
    Ok(Bytes::from(buf))
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Body {
        Body {
            kind: Kind::Full(Some(b)),
        }
    }
}

impl From<String> for Body {
    fn from(s: String) -> Body {
        Body::from(Bytes::from(s))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut self.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::File { rx, remaining } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(Ok(b))) => {
                        *remaining = remaining.saturating_sub(b.len() as u64);
                        Poll::Ready(Some(Ok(Frame::data(b))))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(None) => Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file ended early",
                    )))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::File { remaining, .. } => *remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::File { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}
