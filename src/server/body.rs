//! The one response body type: nothing, bytes in memory, a range of a file (in the disk
//! cache, or a sealed memory file), or chunks of known total length from a channel (a NAR
//! passed on while it is fetched). hyper streams it by frames; binplz's own HTTP/1 path
//! ([`super::h1`]) takes it apart with [`Body::into_out`] and sends a file with `sendfile`.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};

use crate::cache::disk::read_at_cached;

/// Chunk read from disk per frame: large enough that a 1 MB file takes a few reads, small
/// enough that a connection in flight holds little memory.
const FILE_CHUNK: usize = 128 << 10;

pub struct Body {
    kind: Kind,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    File {
        file: Arc<File>,
        /// Where the next read starts.
        offset: u64,
        remaining: u64,
        /// A read on a blocking thread, under way.
        reading: Option<tokio::task::JoinHandle<io::Result<Bytes>>>,
        /// Counts such reads.
        waits: Arc<AtomicU64>,
    },
    Channel(Chunks),
}

/// Chunks that add up to `len` bytes unless an error comes first: the sender ends with
/// one rather than with a short body, so that the connection is cut, never ended cleanly.
pub struct Chunks {
    pub rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    pub len: u64,
}

/// A body taken apart, for a writer that sends each kind its own way.
pub enum Out {
    Empty,
    Bytes(Bytes),
    /// `len` bytes of `file` from `offset`.
    File {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
    Channel(Chunks),
}

impl Body {
    pub fn empty() -> Body {
        Body { kind: Kind::Empty }
    }

    /// `len` bytes of `file` from `offset`, read chunk by chunk as the socket takes them.
    /// Reads are positioned (`pread`), so one open file can serve many bodies at once.
    ///
    /// What the page cache holds is read on the serving thread, as nginx does: a chunk
    /// costs a copy of a few microseconds there, while handing every chunk over from a
    /// blocking thread cost more than the read (the disk tier served about half as many
    /// 1 MB files per second). A chunk the page cache lacks is read on a blocking thread,
    /// counted in `waits`, so that this thread's other connections do not wait for the
    /// disk with it.
    pub fn file(file: Arc<File>, offset: u64, len: u64, waits: Arc<AtomicU64>) -> Body {
        Body {
            kind: Kind::File {
                file,
                offset,
                remaining: len,
                reading: None,
                waits,
            },
        }
    }

    /// `chunks`, sent as they come.
    pub fn channel(chunks: Chunks) -> Body {
        Body {
            kind: Kind::Channel(chunks),
        }
    }

    /// What is left to send.
    pub fn into_out(self) -> Out {
        match self.kind {
            Kind::Channel(c) => Out::Channel(c),
            Kind::Empty | Kind::Full(None) => Out::Empty,
            Kind::Full(Some(b)) => Out::Bytes(b),
            Kind::File { remaining: 0, .. } => Out::Empty,
            // A read under way has not moved `offset`: its bytes go out again from there.
            Kind::File {
                file,
                offset,
                remaining,
                ..
            } => Out::File {
                file,
                offset,
                len: remaining,
            },
        }
    }
}

/// Reads exactly `n` bytes (at most [`FILE_CHUNK`]) at `offset`; a file that ends first is an
/// error, never a short body.
fn read_chunk(file: &File, offset: u64, n: u64) -> io::Result<Bytes> {
    let n = usize::try_from(n).unwrap_or(FILE_CHUNK).min(FILE_CHUNK);
    let mut buf = vec![0u8; n];
    file.read_exact_at(&mut buf, offset)?;
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
            Kind::Channel(c) => match std::task::ready!(c.rx.poll_recv(cx)) {
                Some(Ok(b)) => {
                    c.len = c.len.saturating_sub(b.len() as u64);
                    Poll::Ready(Some(Ok(Frame::data(b))))
                }
                Some(Err(e)) => Poll::Ready(Some(Err(e))),
                None if c.len == 0 => Poll::Ready(None),
                None => Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "body ended early",
                )))),
            },
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::File {
                file,
                offset,
                remaining,
                reading,
                waits,
            } => {
                if *remaining == 0 {
                    return Poll::Ready(None);
                }
                let n = (*remaining).min(FILE_CHUNK as u64);
                let read = match reading {
                    Some(task) => {
                        let done = std::task::ready!(Pin::new(task).poll(cx));
                        *reading = None;
                        done.unwrap_or_else(|e| Err(io::Error::other(e)))
                    }
                    None => {
                        // At most FILE_CHUNK.
                        let mut buf = vec![0u8; n as usize];
                        match read_at_cached(file, &mut buf, *offset) {
                            Ok(Some(got)) => {
                                buf.truncate(got);
                                Ok(Bytes::from(buf))
                            }
                            Ok(None) => {
                                waits.fetch_add(1, Ordering::Relaxed);
                                let (file, at) = (file.clone(), *offset);
                                let mut task =
                                    tokio::task::spawn_blocking(move || read_chunk(&file, at, n));
                                // Polled once, so that its end wakes this body.
                                match Pin::new(&mut task).poll(cx) {
                                    Poll::Pending => {
                                        *reading = Some(task);
                                        return Poll::Pending;
                                    }
                                    Poll::Ready(r) => {
                                        r.unwrap_or_else(|e| Err(io::Error::other(e)))
                                    }
                                }
                            }
                            Err(e) => Err(e),
                        }
                    }
                };
                match read {
                    Ok(b) if b.is_empty() => {
                        *remaining = 0;
                        Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "file ended early",
                        ))))
                    }
                    Ok(b) => {
                        *remaining -= b.len() as u64;
                        *offset += b.len() as u64;
                        Poll::Ready(Some(Ok(Frame::data(b))))
                    }
                    Err(e) => {
                        *remaining = 0;
                        Poll::Ready(Some(Err(e)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.is_none(),
            Kind::File { remaining, .. } => *remaining == 0,
            // Only the channel's end says the body is over.
            Kind::Channel(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::File { remaining, .. } => SizeHint::with_exact(*remaining),
            Kind::Channel(c) => SizeHint::with_exact(c.len),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use http_body_util::BodyExt;
    use std::io::Write;

    /// Bytes that differ at every offset that matters here.
    pub(in crate::server) fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    pub(in crate::server) fn file_with(bytes: &[u8]) -> Arc<File> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        Arc::new(f)
    }

    /// A file on the disk the sources are on, written out and dropped from the page cache;
    /// `None` where the file system keeps it there (tmpfs) or cannot tell (no
    /// `RWF_NOWAIT`), so that the tests that need one cannot run.
    pub(in crate::server) fn evicted_file_with(bytes: &[u8]) -> Option<Arc<File>> {
        let mut file = tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        file.write_all(bytes).unwrap();
        let evict = |file: &File| {
            file.sync_all().unwrap();
            rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        };
        evict(&file);
        if crate::cache::disk::in_page_cache(&file, 0).unwrap() {
            eprintln!("skipped: this file system keeps files in the page cache");
            return None;
        }
        // That check started reading the file in: read it all, then drop it again.
        file.read_exact_at(&mut vec![0u8; bytes.len()], 0).unwrap();
        evict(&file);
        Some(Arc::new(file))
    }

    #[tokio::test]
    async fn a_file_range_is_streamed_in_chunks_and_exactly() {
        let bytes = pattern(3 * FILE_CHUNK + 1000);
        for (offset, len) in [
            (0, bytes.len()),
            (1, FILE_CHUNK),
            (FILE_CHUNK - 1, FILE_CHUNK + 2),
            (bytes.len() - 1, 1),
            (5, 0),
        ] {
            let body = Body::file(file_with(&bytes), offset as u64, len as u64, Arc::default());
            assert_eq!(
                hyper::body::Body::size_hint(&body).exact(),
                Some(len as u64)
            );
            let got = body.collect().await.unwrap().to_bytes();
            assert!(got == bytes[offset..offset + len], "{offset}+{len}");
        }
    }

    #[tokio::test]
    async fn chunks_the_page_cache_lacks_are_read_off_the_serving_thread() {
        let bytes = pattern(3 * FILE_CHUNK + 1000);
        let Some(file) = evicted_file_with(&bytes) else {
            return;
        };
        let waits = Arc::new(AtomicU64::new(0));
        let len = bytes.len() as u64;
        let body = Body::file(file.clone(), 0, len, waits.clone());
        let got = body.collect().await.unwrap().to_bytes();
        assert!(got == bytes);
        let from_disk = waits.load(Ordering::Relaxed);
        assert!(from_disk >= 1, "{from_disk} reads off the serving thread");
        let body = Body::file(file, 0, len, waits.clone());
        let got = body.collect().await.unwrap().to_bytes();
        assert!(got == bytes);
        assert_eq!(waits.load(Ordering::Relaxed), from_disk, "now cached");
    }

    #[tokio::test]
    async fn a_file_shorter_than_promised_is_an_error_not_a_short_body() {
        let bytes = pattern(FILE_CHUNK + 10);
        let body = Body::file(file_with(&bytes), 0, bytes.len() as u64 + 1, Arc::default());
        let err = body.collect().await.expect_err("must fail");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
