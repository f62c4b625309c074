//! Whole NARs, kept for Nix clients (and for program requests): fetched once from the
//! upstream however many ask, written to a temp file in the disk cache as they arrive,
//! verified on the way, and kept in the disk cache only if NarHash and NarSize (and the
//! FileSize and FileHash hints) check out.
//!
//! ```text
//!  upstream body ─► channel ─► writer thread ─► temp file (+ SHA-256 of the file, its
//!                                                  │        length: the Progress readers follow)
//!                                                  ▼
//!                  decode thread: the file as it grows ─► codec ─► hash thread: NarHash,
//!                                                                  NarSize, strict reader
//!  verified ─► keep (fsync, rename under the file's SHA-256, key `(store path, /nar/<name>)`)
//!           ─► Progress::Done          anything else ─► Progress::Failed, nothing kept
//! ```
//!
//! A [`Flight`] is shared by every reader of one NAR while it is fetched: readers follow the
//! temp file as it grows (one open file, positioned reads) and end cleanly only once
//! [`Progress::Done`] says the whole NAR was verified; on [`Progress::Failed`] they must cut
//! their transfer. The fetch runs in its own task: a reader going away does not stop it.
//! Files are kept under their content's SHA-256 and found by a key made from the verified
//! narinfo, never from what a client sent.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tempfile::TempPath;
use tokio::sync::{watch, OwnedSemaphorePermit};

use super::disk::{DiskCache, KeyMeta};
use crate::codec::Codec;
use crate::error::ErrorKind;
use crate::extract::ExtractError;
use crate::narinfo::{self, VerifiedNarInfo};
use crate::pipeline::{self, Expected};
use crate::upstream::{Cache, UpstreamError};

/// Upstream chunks buffered between the body and the decode thread.
const BODY_CHANNEL_DEPTH: usize = 32;

/// Bytes written between two progress updates. Upstream chunks are often a few KiB: a
/// wake-up of every reader for each one cost more than the copying.
const PROGRESS_STEP: u64 = 128 << 10;

/// The linkage recorded in the key of a kept NAR (key files name a verdict for files).
pub const NAR_LINKAGE: &str = "nar";

/// Where one NAR's fetch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for the upstream to answer.
    Opening,
    /// `have` bytes of the file written; `len` is its length when the upstream announced it
    /// (or the narinfo's FileSize did).
    Growing { have: u64, len: Option<u64> },
    /// Verified: the file is whole, `size` bytes with this SHA-256 (the file's own: two
    /// upstreams may compress one NAR differently).
    Done { size: u64, sha256: [u8; 32] },
    /// The fetch failed: `early` when before any byte was written (a reader may still
    /// answer with an error status), otherwise every byte a reader sent is void.
    Failed { early: bool, kind: ErrorKind },
}

impl Progress {
    pub fn is_final(self) -> bool {
        matches!(self, Progress::Done { .. } | Progress::Failed { .. })
    }
}

/// One NAR being fetched.
#[derive(Debug)]
pub struct Flight {
    /// The temp file, open for reading (the same file once kept under its new name).
    pub file: Arc<File>,
    progress: watch::Sender<Progress>,
}

impl Flight {
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }
}

/// Fetches under way, by disk cache key.
type Flights = Arc<Mutex<HashMap<(String, String), Arc<Flight>>>>;

/// The NARs kept in a disk cache and those being fetched.
#[derive(Debug)]
pub struct Nars {
    disk: Arc<DiskCache>,
    flights: Flights,
}

/// The disk cache key of the NAR of `info`: its store path, and `/nar/<file name>` (a path
/// no file inside a store path has, since those are relative).
pub fn key(info: &VerifiedNarInfo) -> (String, String) {
    (
        info.store_path().to_absolute_path(),
        format!("/nar/{}", narinfo::nar_file_name(info)),
    )
}

impl Nars {
    pub fn new(disk: Arc<DiskCache>) -> Nars {
        Nars {
            disk,
            flights: Arc::default(),
        }
    }

    /// The kept NAR of `info`, its length and its SHA-256, checked as every disk cache read
    /// is. Blocking: a file not checked since start-up is hashed whole first.
    pub fn kept(&self, info: &VerifiedNarInfo) -> io::Result<Option<(File, u64, [u8; 32])>> {
        let (store_path, path) = key(info);
        let Some(meta) = self.disk.lookup(&store_path, &path) else {
            return Ok(None);
        };
        Ok(self
            .disk
            .open_file(&meta.sha256)?
            .map(|f| (f, meta.size, meta.sha256)))
    }

    /// The fetch of the NAR of `info` under way, if there is one.
    pub fn under_way(&self, info: &VerifiedNarInfo) -> Option<Arc<Flight>> {
        self.flights.lock().ok()?.get(&key(info)).cloned()
    }

    /// Whether the NAR file of `info` could be kept: one larger than the whole disk cache
    /// would fill the disk while it is fetched, and then not be kept. Without FileSize,
    /// NarSize stands in (compression does not make a NAR larger).
    pub fn fits(&self, info: &VerifiedNarInfo) -> bool {
        info.file_size.unwrap_or(info.nar_size) <= self.disk.capacity()
    }

    /// The fetch of the NAR of `info` from `cache`: the one under way, or a new one, which
    /// holds `permit` (an upstream fetch slot) until it ends, whoever still reads it.
    pub fn fetch(
        &self,
        cache: &Cache,
        info: &VerifiedNarInfo,
        permit: OwnedSemaphorePermit,
    ) -> io::Result<Arc<Flight>> {
        let key = key(info);
        let mut flights = self
            .flights
            .lock()
            .map_err(|_| io::Error::other("NAR flights lock poisoned"))?;
        if let Some(f) = flights.get(&key) {
            return Ok(f.clone());
        }
        self.disk.ensure_dirs()?;
        let tmp = tempfile::NamedTempFile::new_in(self.disk.tmp_dir())?;
        let reader = tmp.reopen()?;
        let (file, path) = tmp.into_parts();
        let flight = Arc::new(Flight {
            file: Arc::new(reader),
            progress: watch::Sender::new(Progress::Opening),
        });
        flights.insert(key.clone(), flight.clone());
        drop(flights);
        let ended = Ended {
            key,
            flight: flight.clone(),
            flights: self.flights.clone(),
        };
        let job = Job {
            disk: self.disk.clone(),
            cache: cache.clone(),
            info: info.clone(),
            file,
            path,
        };
        tokio::spawn(async move {
            let outcome = job.run(&ended.flight).await;
            ended.finish(outcome);
            drop(permit);
        });
        Ok(flight)
    }

    /// Fetches under way.
    pub fn in_flight(&self) -> usize {
        self.flights.lock().map_or(0, |f| f.len())
    }
}

/// Ends a flight whatever way its task ends: its final progress set (a task that panicked
/// or was cancelled counts as failed), then its key removed, so that later readers find
/// the kept file in the disk cache.
struct Ended {
    key: (String, String),
    flight: Arc<Flight>,
    flights: Flights,
}

impl Ended {
    fn finish(&self, outcome: Result<(u64, [u8; 32]), (bool, ExtractError)>) {
        let progress = match outcome {
            Ok((size, sha256)) => Progress::Done { size, sha256 },
            Err((early, e)) => {
                tracing::warn!(store_path = %self.key.0, err = %e, "NAR not kept");
                // A narinfo whose NAR the upstream lacks: the path is not to be had here,
                // and Nix tries its next substituter after a 404.
                let kind = match e {
                    ExtractError::NarMissing { .. } => ErrorKind::NotInCache,
                    _ => e.kind(),
                };
                Progress::Failed { early, kind }
            }
        };
        self.flight.progress.send_replace(progress);
    }
}

impl Drop for Ended {
    fn drop(&mut self) {
        if !self.flight.progress.borrow().is_final() {
            self.flight.progress.send_replace(Progress::Failed {
                early: false,
                kind: ErrorKind::Internal,
            });
        }
        if let Ok(mut f) = self.flights.lock() {
            f.remove(&self.key);
        }
    }
}

/// What the fetch task owns.
struct Job {
    disk: Arc<DiskCache>,
    cache: Cache,
    info: VerifiedNarInfo,
    file: File,
    path: TempPath,
}

/// What the writer has done, for the decode thread that follows the file.
#[derive(Debug, Default)]
struct Written {
    len: u64,
    /// How the upstream body ended, once it did (an error's text).
    end: Option<Result<(), String>>,
}

/// [`Written`], with a condition the writer signals after each write.
#[derive(Default)]
struct WrittenSignal {
    state: Mutex<Written>,
    changed: Condvar,
}

/// Writes upstream chunks to the temp file as fast as they come, hashing them on the way
/// (the file's SHA-256 is its name in the disk cache), and tells readers and the decode
/// thread how far it got. Apart from the decode thread so that clients get the NAR at the
/// upstream's pace, not at the pace of decoding and hashing: only the last byte waits for
/// the verdict.
struct Writer {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    file: File,
    progress: watch::Sender<Progress>,
    announced: Option<u64>,
    /// `None` for an uncompressed NAR: the file is the NAR, and its SHA-256 the NarHash
    /// the pass checks, so hashing it twice would only cost time.
    hasher: Option<Sha256>,
    written: Arc<WrittenSignal>,
    /// Set when the pass failed: nothing more is worth writing.
    cancel: Arc<AtomicBool>,
}

impl Writer {
    /// Runs until the body ends, fails or is cancelled; the file's SHA-256 when it was
    /// hashed.
    fn run(mut self) -> Option<[u8; 32]> {
        let mut len = 0u64;
        let mut told = 0u64;
        let end = loop {
            if self.cancel.load(Ordering::Relaxed) {
                break Err("cancelled".to_owned());
            }
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    if let Err(e) = self.file.write_all(&chunk) {
                        break Err(e.to_string());
                    }
                    if let Some(h) = &mut self.hasher {
                        h.update(&chunk);
                    }
                    len += chunk.len() as u64;
                    if let Ok(mut w) = self.written.state.lock() {
                        w.len = len;
                    }
                    self.written.changed.notify_all();
                    let last = self.announced.is_some_and(|a| len >= a);
                    if len - told >= PROGRESS_STEP || last {
                        told = len;
                        grow(&self.progress, len, self.announced);
                    }
                }
                Some(Err(e)) => break Err(e.to_string()),
                None => break Ok(()),
            }
        };
        grow(&self.progress, len, self.announced);
        // Closed, so that the feeder stops rather than waits on a full channel.
        self.rx.close();
        if let Ok(mut w) = self.written.state.lock() {
            w.end = Some(end);
        }
        self.written.changed.notify_all();
        self.hasher.map(|h| h.finalize().into())
    }
}

/// Tells readers the file grew. The writer may still run after the fetch ended (a pass
/// that failed early does not wait for it): a final state is never replaced, or readers
/// would wait on a fetch that is over.
fn grow(progress: &watch::Sender<Progress>, have: u64, len: Option<u64>) {
    progress.send_if_modified(|p| {
        let grows = !p.is_final();
        if grows {
            *p = Progress::Growing { have, len };
        }
        grows
    });
}

/// The decode thread's source: the temp file, read as the writer extends it. Shared, so
/// that the fetch can look past the decoder's end for trailing data.
#[derive(Clone)]
struct Follower(Arc<Mutex<FollowerState>>);

struct FollowerState {
    file: File,
    at: u64,
    written: Arc<WrittenSignal>,
}

impl Read for Follower {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut f = self
            .0
            .lock()
            .map_err(|_| io::Error::other("follower lock poisoned"))?;
        let written = f.written.clone();
        let mut w = written
            .state
            .lock()
            .map_err(|_| io::Error::other("writer lock poisoned"))?;
        loop {
            if f.at < w.len {
                let n = usize::try_from(w.len - f.at)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                drop(w);
                let at = f.at;
                f.file.read_exact_at(&mut buf[..n], at)?;
                f.at += n as u64;
                return Ok(n);
            }
            match &w.end {
                Some(Ok(())) => return Ok(0),
                Some(Err(e)) => return Err(io::Error::other(e.clone())),
                None => {
                    w = written
                        .changed
                        .wait(w)
                        .map_err(|_| io::Error::other("writer lock poisoned"))?;
                }
            }
        }
    }
}

/// The feeder's own failure, told apart from its echo in the pipeline.
#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error(transparent)]
    Upstream(UpstreamError),
    #[error("larger than FileSize")]
    FileSize,
}

impl Job {
    /// Fetches, writes and verifies the NAR, then keeps it: its size, or the error and
    /// whether it came before any byte was written.
    async fn run(self, flight: &Flight) -> Result<(u64, [u8; 32]), (bool, ExtractError)> {
        let Job {
            disk,
            cache,
            info,
            file,
            path,
        } = self;
        let store_path = info.store_path().to_absolute_path();
        let early = |e: ExtractError| (true, e);
        let late = |e: ExtractError| (false, e);
        let mut fetched = cache
            .nar(info.url(), info.nar_size)
            .await
            .map_err(|e| early(e.into()))?
            .ok_or_else(|| {
                early(ExtractError::NarMissing {
                    cache: cache.url().to_owned(),
                    store_path: store_path.clone(),
                })
            })?;
        if let (Some(len), Some(limit)) = (fetched.len, info.file_size) {
            if len != limit {
                return Err(early(ExtractError::FileSizeExceeded { store_path, limit }));
            }
        }
        let announced = fetched.len.or(info.file_size);
        // NarSize is never 0, so neither is a NAR file: an empty one must fail before any
        // reader answers, or a reader following it would end a clean, empty 200.
        if announced == Some(0) {
            return Err(early(ExtractError::Pipeline {
                store_path,
                err: pipeline::PipelineError::SizeMismatch {
                    expected: info.nar_size,
                    got: 0,
                },
            }));
        }
        flight.progress.send_replace(Progress::Growing {
            have: 0,
            len: announced,
        });
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(BODY_CHANNEL_DEPTH);
        let written = Arc::new(WrittenSignal::default());
        let cancel = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            rx,
            file: file.try_clone().map_err(|e| late(e.into()))?,
            progress: flight.progress.clone(),
            announced,
            hasher: (info.codec != Codec::None).then(Sha256::new),
            written: written.clone(),
            cancel: cancel.clone(),
        };
        let writer = tokio::task::spawn_blocking(move || writer.run());
        let follower = Follower(Arc::new(Mutex::new(FollowerState {
            file: flight.file.try_clone().map_err(|e| late(e.into()))?,
            at: 0,
            written: written.clone(),
        })));
        let expected = Expected {
            nar_hash: Some(info.nar_hash),
            nar_size: Some(info.nar_size),
        };
        let codec = info.codec;
        let pass = tokio::task::spawn_blocking({
            let mut follower = follower.clone();
            move || {
                let result = pipeline::list_nar(follower.clone(), codec, expected);
                // The decoder may stop at the end of its stream: anything after it is not
                // part of this NAR, and a file with it would not be the one FileHash names.
                let mut rest = [0u8; 1];
                let trailing = result.is_ok() && !matches!(follower.read(&mut rest), Ok(0));
                if result.is_err() {
                    cancel.store(true, Ordering::Relaxed);
                }
                (result, trailing)
            }
        });
        let file_size = info.file_size;
        let feed = async move {
            let mut total = 0u64;
            loop {
                let err = match fetched.body.next_chunk().await {
                    Ok(Some(chunk)) => {
                        total += chunk.len() as u64;
                        if file_size.is_some_and(|l| total > l) {
                            FeedError::FileSize
                        } else {
                            if tx.send(Ok(chunk)).await.is_err() {
                                return Ok(()); // the pass stopped reading: it says why
                            }
                            continue;
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => FeedError::Upstream(e),
                };
                let _ = tx.send(Err(io::Error::other(err.to_string()))).await;
                return Err(err);
            }
        };
        let (fed, passed, wrote) = tokio::join!(feed, pass, writer);
        let (result, trailing) =
            passed.map_err(|e| late(io::Error::other(format!("NAR check failed: {e}")).into()))?;
        let file_sha =
            wrote.map_err(|e| late(io::Error::other(format!("NAR write failed: {e}")).into()))?;
        match fed {
            Err(FeedError::Upstream(e)) => return Err(late(e.into())),
            Err(FeedError::FileSize) => {
                return Err(late(ExtractError::FileSizeExceeded {
                    store_path,
                    limit: file_size.unwrap_or_default(),
                }))
            }
            Ok(()) => {}
        }
        result.map_err(|err| {
            late(ExtractError::Pipeline {
                store_path: store_path.clone(),
                err,
            })
        })?;
        if trailing {
            return Err(late(ExtractError::TrailingData { store_path }));
        }
        let (len, ended) = match written.state.lock() {
            Ok(w) => (w.len, matches!(w.end, Some(Ok(())))),
            Err(_) => (0, false),
        };
        let sha256 = file_sha.unwrap_or(info.nar_hash);
        if !ended || announced.is_some_and(|a| a != len) {
            return Err(late(ExtractError::TrailingData { store_path }));
        }
        if let Some(expected) = info.file_hash {
            if expected != sha256 {
                return Err(late(ExtractError::FileHashMismatch {
                    store_path,
                    expected: crate::hash::nix32(&expected),
                    got: crate::hash::nix32(&sha256),
                }));
            }
        }
        let (key_store_path, key_path) = key(&info);
        let meta = KeyMeta {
            store_path: key_store_path,
            path: key_path,
            sha256,
            size: len,
            executable: false,
            linkage: NAR_LINKAGE.to_owned(),
        };
        // Kept off the reactor: fsync and rename. A NAR that cannot be kept (a full disk)
        // was still verified: its readers get it whole from the temp file they hold open.
        let kept = tokio::task::spawn_blocking(move || disk.insert_parts(&file, path, meta)).await;
        match kept {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(%store_path, err = %e, "verified NAR not kept"),
            Err(e) => tracing::warn!(%store_path, err = %e, "verified NAR not kept"),
        }
        Ok((len, sha256))
    }
}

impl crate::extract::LocalNars for Nars {
    fn open(&self, info: &VerifiedNarInfo) -> Option<File> {
        match self.kept(info) {
            Ok(kept) => kept.map(|(f, ..)| f),
            Err(e) => {
                tracing::warn!(store_path = %info.store_path(), err = %e, "kept NAR unreadable");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_written_after_the_fetch_failed_never_replaces_the_failure() {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let failed = Progress::Failed {
            early: false,
            kind: ErrorKind::VerificationFailed,
        };
        let progress = watch::Sender::new(failed);
        let mut seen = progress.subscribe();
        seen.borrow_and_update();
        let writer = Writer {
            rx,
            file: tempfile::tempfile().expect("a temp file"),
            progress: progress.clone(),
            announced: Some(8),
            hasher: Some(Sha256::new()),
            written: Arc::default(),
            cancel: Arc::default(),
        };
        tx.try_send(Ok(Bytes::from_static(b"12345678")))
            .expect("room in the channel");
        drop(tx);
        assert!(writer.run().is_some(), "the file was hashed");
        assert_eq!(*progress.borrow(), failed);
        assert!(!seen.has_changed().expect("the sender lives"));
    }
}
