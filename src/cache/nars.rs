//! Whole NARs, kept for Nix clients (and for program requests): fetched once from the
//! upstream however many ask, written to a temp file in the disk cache as they arrive,
//! verified on the way, and kept in the disk cache only if NarHash and NarSize (and the
//! FileSize and FileHash hints) check out.
//!
//! ```text
//!  upstream body ─► channel ─► decode thread: tee ─► temp file (+ SHA-256 of the file, its
//!                                              │      length: the Progress readers follow)
//!                                              ▼
//!                                    codec ─► hash thread: NarHash, NarSize, strict reader
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
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tempfile::TempPath;
use tokio::sync::watch;

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
    /// Verified: the file is whole, `size` bytes.
    Done { size: u64 },
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
    /// Upstream transfers at once (shared with the server's extractions): a fetch waits
    /// for one before it opens the NAR.
    permits: Arc<tokio::sync::Semaphore>,
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
    pub fn new(disk: Arc<DiskCache>, permits: Arc<tokio::sync::Semaphore>) -> Nars {
        Nars {
            disk,
            permits,
            flights: Arc::default(),
        }
    }

    /// The kept NAR of `info` and its length, checked as every disk cache read is. Blocking:
    /// a file not checked since start-up is hashed whole first.
    pub fn kept(&self, info: &VerifiedNarInfo) -> io::Result<Option<(File, u64)>> {
        let (store_path, path) = key(info);
        let Some(meta) = self.disk.lookup(&store_path, &path) else {
            return Ok(None);
        };
        Ok(self.disk.open_file(&meta.sha256)?.map(|f| (f, meta.size)))
    }

    /// The fetch of the NAR of `info` from `cache`: the one under way, or a new one.
    pub fn fetch(&self, cache: &Cache, info: &VerifiedNarInfo) -> io::Result<Arc<Flight>> {
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
        let permits = self.permits.clone();
        let job = Job {
            disk: self.disk.clone(),
            cache: cache.clone(),
            info: info.clone(),
            file,
            path,
        };
        tokio::spawn(async move {
            // Closed only if the server is gone: then the fetch goes ahead.
            let _permit = permits.acquire_owned().await.ok();
            let outcome = job.run(&ended.flight).await;
            ended.finish(outcome);
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
    fn finish(&self, outcome: Result<u64, (bool, ExtractError)>) {
        let progress = match outcome {
            Ok(size) => Progress::Done { size },
            Err((early, e)) => {
                tracing::warn!(store_path = %self.key.0, err = %e, "NAR not kept");
                Progress::Failed {
                    early,
                    kind: e.kind(),
                }
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

/// The decode thread's source: upstream chunks, each written to the temp file (and counted
/// in the progress readers follow) before the decoder sees it, and hashed: the file's
/// SHA-256 is its name in the disk cache. Shared, so that the fetch can look past the
/// decoder's end for trailing data, and then close the channel.
struct Tee {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
    file: File,
    progress: watch::Sender<Progress>,
    announced: Option<u64>,
    /// `None` for an uncompressed NAR: the file is the NAR, and its SHA-256 the NarHash
    /// the pass checks, so hashing it twice would only cost time.
    hasher: Option<Sha256>,
    len: u64,
    /// `len` at the last progress update.
    told: u64,
    /// The upstream body ended (cleanly) and all of it was read.
    ended: bool,
}

#[derive(Clone)]
struct SharedTee(Arc<Mutex<Tee>>);

impl Read for SharedTee {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut tee = self
            .0
            .lock()
            .map_err(|_| io::Error::other("tee lock poisoned"))?;
        tee.read_some(buf)
    }
}

impl Tee {
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => {
                    self.file.write_all(&chunk)?;
                    if let Some(h) = &mut self.hasher {
                        h.update(&chunk);
                    }
                    self.len += chunk.len() as u64;
                    let last = self.announced.is_some_and(|a| self.len >= a);
                    if self.len - self.told >= PROGRESS_STEP || last {
                        self.told = self.len;
                        self.progress.send_replace(Progress::Growing {
                            have: self.len,
                            len: self.announced,
                        });
                    }
                    self.cur = chunk;
                }
                Some(Err(e)) => return Err(e),
                None => {
                    self.ended = true;
                    self.progress.send_replace(Progress::Growing {
                        have: self.len,
                        len: self.announced,
                    });
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
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
    async fn run(self, flight: &Flight) -> Result<u64, (bool, ExtractError)> {
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
        flight.progress.send_replace(Progress::Growing {
            have: 0,
            len: announced,
        });
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(BODY_CHANNEL_DEPTH);
        let tee = SharedTee(Arc::new(Mutex::new(Tee {
            rx,
            cur: Bytes::new(),
            file: file.try_clone().map_err(|e| late(e.into()))?,
            progress: flight.progress.clone(),
            announced,
            hasher: (info.codec != Codec::None).then(Sha256::new),
            len: 0,
            told: 0,
            ended: false,
        })));
        let expected = Expected {
            nar_hash: Some(info.nar_hash),
            nar_size: Some(info.nar_size),
        };
        let codec = info.codec;
        let pass = tokio::task::spawn_blocking({
            let mut tee = tee.clone();
            move || {
                let result = pipeline::list_nar(tee.clone(), codec, expected);
                // The decoder may stop at the end of its stream: anything after it is not
                // part of this NAR, and a file with it would not be the one FileHash names.
                let mut rest = [0u8; 1];
                let trailing = result.is_ok() && !matches!(tee.read(&mut rest), Ok(0));
                // Whatever happened, the feeder must not wait on a full channel for ever.
                if let Ok(mut t) = tee.0.lock() {
                    t.rx.close();
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
        let (fed, passed) = tokio::join!(feed, pass);
        let (result, trailing) =
            passed.map_err(|e| late(io::Error::other(format!("NAR check failed: {e}")).into()))?;
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
        let (sha256, len, ended) = {
            let t = tee
                .0
                .lock()
                .map_err(|_| late(io::Error::other("tee lock poisoned").into()))?;
            let sha256: [u8; 32] = match &t.hasher {
                Some(h) => h.clone().finalize().into(),
                None => info.nar_hash,
            };
            (sha256, t.len, t.ended)
        };
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
        Ok(len)
    }
}

impl crate::extract::LocalNars for Nars {
    fn open(&self, info: &VerifiedNarInfo) -> Option<File> {
        match self.kept(info) {
            Ok(kept) => kept.map(|(f, _)| f),
            Err(e) => {
                tracing::warn!(store_path = %info.store_path(), err = %e, "kept NAR unreadable");
                None
            }
        }
    }
}
