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
}
