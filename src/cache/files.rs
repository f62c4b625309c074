//! The file tiers in front of the upstream: memory (moka, weighted by bytes), then the
//! disk cache, then one single-flight extraction per `(store path, path)`.
//!
//! ```text
//!  get(store path, path) ─► memory ─► hit
//!                       └──► disk key map ─► disk file (checked) ─► hit (and into memory,
//!                                                                    if it fits there)
//!                       └─ miss ─► single flight ─► extract (verified) ─► hit, from the temp file
//!                                                   └─ then, as the flight's tail: the wanted
//!                                                      file into memory, all into the disk cache
//! ```
//!
//! Extractions are written to the disk cache's temp directory, so that keeping a file is a
//! rename. While the cache cannot write there (full, read-only, removed), they go to a
//! spill directory instead, and the flight's tail copies them in once it can again.
//!
//! The memory tier holds a small file as bytes and a larger one as a sealed memory file
//! (`memfd`): bytes go out with the response head in one write, while a memory file can be
//! handed to the socket with `sendfile`, without a copy through this process. Its seals
//! make it unwritable by anyone, this process included, for as long as it exists.

use std::any::Any;
use std::fs::File;
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustix::fs::{MemfdFlags, SealFlags};
use sha2::{Digest, Sha256};
use tempfile::TempPath;

use super::disk::{DiskCache, KeyMeta, Marked, Stored};
use super::flight::{Joined, SingleFlight, Tail};
use super::health::WriteFailure;
use crate::error::ErrorKind;
use crate::extract::{ExtractError, Extracted};
use crate::pipeline::PipelineError;

/// Calls `fetch` (a cloneable `Fn`) for one attempt.
fn fetch_once<F, Fut>(fetch: &F, tmp: PathBuf) -> Fut
where
    F: Fn(PathBuf) -> Fut,
{
    fetch(tmp)
}

/// What a hit holds.
#[derive(Clone)]
pub enum Content {
    /// A small file's bytes.
    Memory(Bytes),
    /// A file in the disk cache, or a sealed memory file: either way checked, and read
    /// with positioned reads only, so one open file serves any number of responses.
    File(Arc<File>),
}

pub struct Hit {
    pub meta: Arc<KeyMeta>,
    pub content: Content,
    /// Where it came from: `memory`, `disk` or `upstream`.
    pub tier: &'static str,
    /// For a file held in memory, a slot that lives as long as it is held: the caller keeps
    /// there what it derives from the file alone (the server, its response headers), so
    /// that each hit does not derive it again.
    pub memo: Option<Memo>,
}

/// See [`Hit::memo`].
pub type Memo = Arc<OnceLock<Box<dyn Any + Send + Sync>>>;

/// Files at most this large are read from the disk cache on the calling thread, in one
/// read, when the page cache holds them: that costs a few microseconds, less than handing
/// the work to a blocking thread and back (which cost two thirds of the disk tier's requests
/// per second on 1 KB files), and the re-hash of such a file after a restart is as short.
/// One the page cache lacks is read on a blocking thread, as larger files are opened: the
/// calling thread serves other connections, which would wait for the disk with it.
const INLINE_READ_MAX: u64 = 64 << 10;

/// What a held file costs besides its bytes and key, counted against the memory budget: its
/// metadata and what the server keeps in its memo (two header maps, about 3 KiB). Without
/// it, many small files would take several times the configured size.
const HELD_OVERHEAD: usize = 4 << 10;

/// A memory hit marks the file's disk entry as used at most this often: often enough that a
/// file in use is never the disk's oldest, rarely enough that hits stay off the disk's lock.
const DISK_USE_EVERY: Duration = Duration::from_secs(60);

/// A file kept in memory, with its key's metadata, so that a memory hit needs neither the
/// disk cache's key map nor its lock.
struct Held {
    meta: Arc<KeyMeta>,
    content: Content,
    memo: Memo,
    /// When ([`uptime`] seconds) a hit next marks the disk entry as used. A file is held
    /// just after a disk use (a read, or being kept), so the first is a period away.
    next_disk_use: AtomicU64,
}

impl Held {
    fn new(meta: Arc<KeyMeta>, content: Content, memo: Memo) -> Held {
        Held {
            meta,
            content,
            memo,
            next_disk_use: AtomicU64::new(uptime() + DISK_USE_EVERY.as_secs()),
        }
    }

    /// Whether this hit should mark the disk entry as used.
    fn disk_use_due(&self) -> bool {
        uptime() >= self.next_disk_use.load(Ordering::Relaxed)
    }

    /// The disk entry was marked as used: the next mark is a period away.
    fn disk_used(&self) {
        let next = uptime() + DISK_USE_EVERY.as_secs();
        self.next_disk_use.store(next, Ordering::Relaxed);
    }
}

/// Whole seconds since the memory tier was first used.
fn uptime() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// The memory tier's key: `store path \0 path` (`\0` occurs in neither).
fn memory_key(store_path: &str, path: &str) -> String {
    let mut k = String::with_capacity(store_path.len() + 1 + path.len());
    k.push_str(store_path);
    k.push('\0');
    k.push_str(path);
    k
}

/// How [`load`] takes a file from the disk cache.
#[derive(Clone, Copy)]
enum Load {
    /// Read whole into memory; unless `may_wait`, only from the page cache (see
    /// [`DiskCache::read_all`]); hashed whatever the file's state says if `rehash`.
    Whole {
        may_wait: bool,
        rehash: bool,
    },
    Open,
}

/// The content of `sha` from the disk cache. `None` if it is not there (or was dropped as
/// corrupt).
fn load(disk: &DiskCache, sha: &[u8; 32], how: Load) -> io::Result<Option<Content>> {
    Ok(if let Load::Whole { may_wait, rehash } = how {
        disk.read_all_checked(sha, may_wait, rehash)?
            .map(|v| Content::Memory(Bytes::from(v)))
    } else {
        disk.open_file(sha)?.map(|f| Content::File(Arc::new(f)))
    })
}

/// Chunk copied at a time into a memory file.
const SEAL_CHUNK: usize = 256 << 10;

/// `size` bytes of the checked `file` copied into a sealed memory file, hashed again on the
/// way so that the copy is known to be `sha` whatever happened to the disk file after its
/// check. `Ok(None)` if it is not (the caller drops the disk copy); an error if no memory
/// file can be made (no `memfd` on this kernel, or out of descriptors).
fn seal(file: &File, size: u64, sha: &[u8; 32]) -> io::Result<Option<File>> {
    let fd = rustix::fs::memfd_create(
        "binplz-file",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    let mut mem = File::from(fd);
    mem.set_len(size)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; SEAL_CHUNK];
    let mut at = 0u64;
    while at < size {
        let n = usize::try_from(size - at)
            .unwrap_or(SEAL_CHUNK)
            .min(SEAL_CHUNK);
        let chunk = &mut buf[..n];
        file.read_exact_at(chunk, at)?;
        hasher.update(&*chunk);
        mem.write_all(chunk)?;
        at += n as u64;
    }
    if <[u8; 32]>::from(hasher.finalize()) != *sha {
        return Ok(None);
    }
    rustix::fs::fcntl_add_seals(
        &mem,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )?;
    Ok(Some(mem))
}

/// A failed flight carries the path it was started for: its error may be about that file
/// alone, and not about the other files of the store path that callers were waiting for.
type FlightResult = Result<Arc<Vec<(Arc<KeyMeta>, Arc<File>)>>, (String, Arc<ExtractError>)>;

/// Flights a caller starts or joins before giving up.
const MAX_FLIGHTS: usize = 3;

pub struct Files {
    /// Keyed by `(store path, path)`, weighted by bytes. The same content under two keys is
    /// held twice; that is rare (a file copied between store paths) and keeps a hit to one
    /// lookup.
    memory: moka::future::Cache<String, Arc<Held>>,
    /// Files larger than this stay on disk only, so one large file cannot flush the rest.
    memory_item_max: u64,
    disk: Arc<DiskCache>,
    /// Keyed by store path: one NAR download serves every file wanted from it meanwhile.
    flights: SingleFlight<String, FlightResult>,
    /// Extracted files that were served but could not be kept on disk.
    keep_errors: Arc<AtomicU64>,
    /// Where extractions are written while the disk cache cannot take them.
    spill_dir: PathBuf,
    disk_waits: AtomicU64,
}

impl Files {
    pub fn new(disk: DiskCache, memory_bytes: u64) -> Files {
        let memory = moka::future::Cache::builder()
            .max_capacity(memory_bytes)
            .weigher(|k: &String, v: &Arc<Held>| {
                let size = usize::try_from(v.meta.size).unwrap_or(usize::MAX);
                u32::try_from(size.saturating_add(k.len() + HELD_OVERHEAD)).unwrap_or(u32::MAX)
            })
            .build();
        Files {
            memory,
            memory_item_max: (memory_bytes / 8).min(64 << 20),
            disk: Arc::new(disk),
            flights: SingleFlight::default(),
            keep_errors: Arc::default(),
            spill_dir: std::env::temp_dir(),
            disk_waits: AtomicU64::new(0),
        }
    }

    /// Extracts into `dir` while the disk cache cannot write (the default is the system's
    /// temp directory, `$TMPDIR`). Best on another file system than the cache's.
    pub fn with_spill_dir(mut self, dir: PathBuf) -> Files {
        self.spill_dir = dir;
        self
    }

    pub fn disk(&self) -> &DiskCache {
        &self.disk
    }

    /// The disk cache, for a task that outlives a borrow (the scrubber).
    pub fn disk_handle(&self) -> Arc<DiskCache> {
        self.disk.clone()
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory.weighted_size()
    }

    /// Small files read from disk on a blocking thread, the page cache not holding them.
    pub fn disk_waits(&self) -> u64 {
        self.disk_waits.load(Ordering::Relaxed)
    }

    /// Extracted files served but not kept on disk for an error (not for their size).
    pub fn keep_errors(&self) -> u64 {
        self.keep_errors.load(Ordering::Relaxed)
    }

    /// Marks `(store_path, path)` as used on disk (see [`DiskCache::mark_used`]), writing a
    /// key file's mtime on a blocking thread. False if the disk cache's lock was busy.
    fn mark_used(&self, store_path: &str, path: &str) -> bool {
        match self.disk.mark_used(store_path, path) {
            Marked::Busy => false,
            Marked::Done => true,
            Marked::KeyFile(mark) => {
                tokio::task::spawn_blocking(move || mark.write());
                true
            }
        }
    }

    /// The file for `(store_path, path)` if a tier holds it, without any upstream fetch.
    pub async fn cached(&self, store_path: &str, path: &str) -> std::io::Result<Option<Hit>> {
        let key = memory_key(store_path, path);
        if let Some(held) = self.memory.get(&key).await {
            if held.disk_use_due() && self.mark_used(store_path, path) {
                held.disk_used();
            }
            return Ok(Some(Hit {
                meta: held.meta.clone(),
                content: held.content.clone(),
                tier: "memory",
                memo: Some(held.memo.clone()),
            }));
        }
        let Some(meta) = self.disk.lookup(store_path, path) else {
            return Ok(None);
        };
        let meta = Arc::new(meta);
        let sha = meta.sha256;
        let to_memory = meta.size <= self.memory_item_max;
        // The content, and whether it goes to the memory tier.
        let loaded = if meta.size <= INLINE_READ_MAX {
            // A copy held in memory is served for as long as it is held, and a scrub of
            // the disk file cannot reach it: it is hashed on its way in, as larger files
            // are when copied into a memory file.
            let whole = move |may_wait| Load::Whole {
                may_wait,
                rehash: to_memory,
            };
            let here = load(&self.disk, &sha, whole(false));
            let content = match here {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.disk_waits.fetch_add(1, Ordering::Relaxed);
                    let disk = self.disk.clone();
                    tokio::task::spawn_blocking(move || load(&disk, &sha, whole(true)))
                        .await
                        .map_err(io::Error::other)??
                }
                r => r?,
            };
            content.map(|c| (c, to_memory))
        } else {
            let (disk, size) = (self.disk.clone(), meta.size);
            tokio::task::spawn_blocking(move || -> io::Result<_> {
                let Some(Content::File(file)) = load(&disk, &sha, Load::Open)? else {
                    return Ok(None);
                };
                if !to_memory {
                    return Ok(Some((Content::File(file), false)));
                }
                match seal(&file, size, &sha) {
                    Ok(Some(mem)) => Ok(Some((Content::File(Arc::new(mem)), true))),
                    Ok(None) => {
                        tracing::warn!(sha256 = %crate::hash::hex(&sha), "disk cache file changed after its check; dropped");
                        disk.remove(&sha);
                        Ok(None)
                    }
                    // Served from disk this time; the next hit tries again.
                    Err(e) => {
                        tracing::warn!(err = %e, "cannot make a memory file");
                        Ok(Some((Content::File(file), false)))
                    }
                }
            })
            .await
            .map_err(io::Error::other)??
        };
        let Some((content, held)) = loaded else {
            return Ok(None); // dropped as corrupt: the caller fetches it again
        };
        self.mark_used(store_path, path);
        let memo = held.then(Memo::default);
        if let Some(memo) = &memo {
            let held = Held::new(meta.clone(), content.clone(), memo.clone());
            self.memory.insert(key, Arc::new(held)).await;
        }
        Ok(Some(Hit {
            meta,
            content,
            tier: "disk",
            memo,
        }))
    }

    /// The file for `(store_path, path)`: from a tier, or extracted by `fetch` into the disk
    /// cache's temp directory and kept, with the sibling files `fetch` returns. Concurrent
    /// callers for the same store path share one fetch; one whose file was not among what
    /// that fetch kept starts another.
    ///
    /// The callers of a fetch are answered from its verified temp files as soon as the
    /// fetch is done: keeping them (into memory, and flushed to disk under their hash) is
    /// the flight's tail, so a response does not wait for the disk. Whoever asks during
    /// the tail waits for it and is then answered from the tier it filled. A temp file is
    /// trusted as a fresh disk-cache entry is: this process wrote it, and its SHA-256 was
    /// taken over the bytes written, in the verified pass. Its length is checked before it
    /// is served, and the wanted file is hashed again as it is copied into memory.
    pub async fn get<F, Fut>(
        &self,
        store_path: &str,
        path: &str,
        fetch: F,
    ) -> Result<Hit, Arc<ExtractError>>
    where
        F: Fn(PathBuf) -> Fut,
        Fut: Future<Output = Result<(Extracted, Vec<Extracted>), ExtractError>> + Send + 'static,
    {
        let local = |e: std::io::Error| Arc::new(ExtractError::Local(e));
        match self.cached(store_path, path).await {
            Ok(Some(hit)) => return Ok(hit),
            Ok(None) => {}
            // A disk entry that cannot be read is dropped and fetched again rather than
            // failing every request for it: while its key stays, the flight below would
            // take it as kept and answer from it again.
            Err(e) => {
                tracing::warn!(store_path, path, err = %e, "cannot read a cached file; fetching it again");
                if let Some(meta) = self.disk.lookup(store_path, path) {
                    self.disk.remove(&meta.sha256);
                }
            }
        }
        let (mut flights, mut waits) = (0, 0);
        while flights < MAX_FLIGHTS && waits < MAX_FLIGHTS {
            // Extractions go to the disk cache's temp directory, so that keeping a file is a
            // rename; while the cache cannot write (or that directory cannot be made), to
            // the spill directory, from which the tail copies files in once it can again.
            let spill_first =
                self.disk.health().degraded().is_some() || self.disk.ensure_dirs().is_err();
            let work = if spill_first {
                fetch_once(&fetch, self.spill_dir.clone())
            } else {
                fetch_once(&fetch, self.disk.tmp_dir().to_owned())
            };
            // Not started unless the first try cannot write its temp files.
            let retry = (!spill_first).then(|| fetch_once(&fetch, self.spill_dir.clone()));
            let mut keeper = Keeper {
                disk: self.disk.clone(),
                memory: self.memory.clone(),
                memory_item_max: self.memory_item_max,
                errors: self.keep_errors.clone(),
                spilled: spill_first,
            };
            let (sp, p) = (store_path.to_owned(), path.to_owned());
            let flight = async move {
                // A flight that ended between our cache check and this one starting has
                // already kept the file: do not download it again.
                if keeper.disk.lookup(&sp, &p).is_some() {
                    return (Ok(Arc::default()), None);
                }
                let failed = |e: ExtractError| (p.clone(), Arc::new(e));
                let (wanted, extras) = match work.await {
                    Ok(x) => x,
                    Err(e) => {
                        let (Some(err), Some(retry)) = (temp_file_error(&e), retry) else {
                            return (Err(failed(e)), None);
                        };
                        // The verified file could not be written where the cache keeps
                        // files: make room if it is full, and extract into the spill
                        // directory instead. This downloads the NAR again, once: later
                        // flights go there first until the cache writes again.
                        let cause = keeper.disk.health().failed("extracting a file", err);
                        if cause == WriteFailure::Full {
                            keeper.disk.free_space(0);
                        }
                        keeper.spilled = true;
                        match retry.await {
                            Ok(x) => x,
                            Err(e) => return (Err(failed(e)), None),
                        }
                    }
                };
                let asked = p.clone();
                let landings = match tokio::task::spawn_blocking(move || {
                    land(sp, asked, wanted, extras)
                })
                .await
                {
                    Ok(Ok(l)) => l,
                    Ok(Err(e)) => return (Err(failed(ExtractError::Local(e))), None),
                    Err(e) => {
                        let e = ExtractError::Local(std::io::Error::other(e));
                        return (Err(failed(e)), None);
                    }
                };
                let landed = landings
                    .iter()
                    .map(|l| (l.meta.clone(), l.file.clone()))
                    .collect::<Vec<_>>();
                let tail: Tail = Box::pin(keeper.keep(landings));
                (Ok(Arc::new(landed)), Some(tail))
            };
            let lost = Err((
                path.to_owned(),
                Arc::new(ExtractError::Local(std::io::Error::other(
                    "extraction task lost",
                ))),
            ));
            let tier = match self.flights.join(store_path.to_owned(), flight, lost).await {
                Joined::Ran(Ok(landed)) => {
                    flights += 1;
                    let ours = landed
                        .iter()
                        .find(|(m, _)| m.store_path == store_path && m.path == path);
                    if let Some((meta, file)) = ours {
                        return Ok(Hit {
                            meta: meta.clone(),
                            content: Content::File(file.clone()),
                            tier: "upstream",
                            memo: None,
                        });
                    }
                    Some("upstream")
                }
                // Another caller's file is missing or refused: that says nothing about
                // ours, which that flight did not keep. Fetch it in a flight of our own.
                Joined::Ran(Err((for_path, e)))
                    if for_path != path
                        && matches!(e.kind(), ErrorKind::UnknownProgram | ErrorKind::Refused) =>
                {
                    flights += 1;
                    Some("upstream")
                }
                Joined::Ran(Err((_, e))) => return Err(e),
                // Came during a flight's tail, which has now kept what it fetched: the
                // hit is labelled by the tier it comes from.
                Joined::Finished => {
                    waits += 1;
                    None
                }
            };
            if let Some(mut hit) = self.cached(store_path, path).await.map_err(local)? {
                if let Some(tier) = tier {
                    hit.tier = tier;
                }
                return Ok(hit);
            }
        }
        Err(local(std::io::Error::other(
            "the extracted file could not be kept (larger than the disk cache?)",
        )))
    }

    /// Waits until no extraction is under way and every extracted file has been kept.
    pub async fn settled(&self) {
        self.flights.idle().await;
    }
}

/// The temp-file error of a failed extraction, if that is why it failed.
fn temp_file_error(e: &ExtractError) -> Option<&io::Error> {
    match e {
        ExtractError::Pipeline {
            err: PipelineError::TempFile { err, .. },
            ..
        } => Some(err),
        _ => None,
    }
}

/// A file a flight extracted and verified, kept by the flight's tail.
struct Landing {
    meta: Arc<KeyMeta>,
    /// Open on the temp file, and on the kept file once it is renamed.
    file: Arc<File>,
    temp: TempPath,
}

/// The wanted file (first) under the key it was asked by (its path before any symlink into
/// another store path), and the siblings under their own. Blocking: a file whose SHA-256
/// the pass did not compute is read back.
fn land(
    store_path: String,
    path: String,
    wanted: Extracted,
    extras: Vec<Extracted>,
) -> io::Result<Vec<Landing>> {
    let mut all = vec![(store_path, path, wanted)];
    all.extend(extras.into_iter().filter_map(|e| {
        let sp = e.store_path.as_ref()?.to_absolute_path();
        Some((sp, e.path.to_string(), e))
    }));
    all.into_iter()
        .map(|(store_path, path, e)| {
            let meta = KeyMeta {
                store_path,
                path,
                sha256: e.sha256()?,
                size: e.size,
                executable: e.executable,
                linkage: e.linkage.kind().to_owned(),
            };
            let (file, temp) = e.file.into_parts();
            // Served from this file before it is flushed and kept: at least its length is
            // checked first, as keeping it would.
            let len = file.metadata()?.len();
            if len != e.size {
                return Err(io::Error::other(format!(
                    "extracted {} is {len} bytes on disk, {} in the NAR",
                    meta.path, e.size
                )));
            }
            Ok(Landing {
                meta: Arc::new(meta),
                file: Arc::new(file),
                temp,
            })
        })
        .collect()
}

/// What a flight's tail needs to keep its files.
struct Keeper {
    disk: Arc<DiskCache>,
    memory: moka::future::Cache<String, Arc<Held>>,
    memory_item_max: u64,
    errors: Arc<AtomicU64>,
    /// The files were extracted into the spill directory: they are copied into the disk
    /// cache, not renamed.
    spilled: bool,
}

impl Keeper {
    /// Keeps landed files: first the wanted one (the first) in memory if it fits there, so
    /// that a request arriving while it is flushed to disk finds it; then all on disk.
    /// Siblings go to memory when they are first asked for, like any file from disk.
    async fn keep(self, mut landings: Vec<Landing>) {
        if let Some(wanted) = landings
            .first()
            .filter(|l| l.meta.size <= self.memory_item_max)
        {
            let (file, meta) = (wanted.file.clone(), wanted.meta.clone());
            let held =
                tokio::task::spawn_blocking(move || hold(&file, meta.size, &meta.sha256)).await;
            match held {
                Ok(Ok(Some(content))) => {
                    let meta = wanted.meta.clone();
                    let key = memory_key(&meta.store_path, &meta.path);
                    let held = Held::new(meta, content, Memo::default());
                    self.memory.insert(key, Arc::new(held)).await;
                }
                Ok(Ok(None)) => {
                    tracing::error!(
                        store_path = %wanted.meta.store_path,
                        path = %wanted.meta.path,
                        "an extracted file no longer hashes to what was verified; dropped"
                    );
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    landings.remove(0);
                }
                Ok(Err(e)) => tracing::warn!(err = %e, "cannot hold an extracted file in memory"),
                Err(e) => tracing::error!(err = %e, "holding an extracted file in memory failed"),
            }
        }
        let (disk, errors, spilled) = (self.disk, self.errors, self.spilled);
        let counted = errors.clone();
        let kept = tokio::task::spawn_blocking(move || {
            for l in landings {
                let meta = KeyMeta::clone(&l.meta);
                let stored = if spilled {
                    disk.insert_copy(&l.file, meta)
                } else {
                    disk.insert_parts(&l.file, l.temp, meta)
                };
                match stored {
                    Ok(Stored::TooLarge) => tracing::info!(
                        store_path = %l.meta.store_path,
                        path = %l.meta.path,
                        size = l.meta.size,
                        "larger than the disk cache: served, not kept"
                    ),
                    Ok(_) => {}
                    // Logged by the disk cache's health, once per cause.
                    Err(e) => {
                        tracing::debug!(
                            store_path = %l.meta.store_path,
                            path = %l.meta.path,
                            err = %e,
                            "cannot keep an extracted file on disk"
                        );
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
        .await;
        if let Err(e) = kept {
            tracing::error!(err = %e, "keeping extracted files on disk failed");
            errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `file`'s `size` bytes as held in memory: read whole if small, else copied into a sealed
/// memory file; hashed on the way either way. `Ok(None)` if they are not `sha`.
fn hold(file: &File, size: u64, sha: &[u8; 32]) -> io::Result<Option<Content>> {
    if size > INLINE_READ_MAX {
        return Ok(seal(file, size, sha)?.map(|m| Content::File(Arc::new(m))));
    }
    let mut bytes = vec![0u8; usize::try_from(size).map_err(io::Error::other)?];
    file.read_exact_at(&mut bytes, 0)?;
    if <[u8; 32]>::from(Sha256::digest(&bytes)) != *sha {
        return Ok(None);
    }
    Ok(Some(Content::Memory(Bytes::from(bytes))))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use sha2::{Digest, Sha256};
    use std::io::Write;

    use crate::cache::disk::tests::{put, SP};

    fn keep(disk: &DiskCache, path: &str, bytes: &[u8]) -> KeyMeta {
        let (meta, stored) = put(disk, path, bytes);
        assert!(stored.is_stored());
        meta
    }

    fn content(hit: &Hit) -> Vec<u8> {
        match &hit.content {
            Content::Memory(b) => b.to_vec(),
            Content::File(f) => {
                let mut v = vec![0u8; hit.meta.size as usize];
                f.read_exact_at(&mut v, 0).unwrap();
                v
            }
        }
    }

    #[tokio::test]
    async fn small_files_are_read_whole_and_large_ones_opened_when_memory_is_off() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(dir.path(), 64 << 20).unwrap();
        let small = vec![7u8; 1000];
        let large = vec![9u8; INLINE_READ_MAX as usize + 1];
        keep(&disk, "bin/small", &small);
        keep(&disk, "bin/large", &large);
        let files = Files::new(disk, 0);
        for _ in 0..2 {
            let hit = files.cached(SP, "bin/small").await.unwrap().unwrap();
            assert!(matches!(hit.content, Content::Memory(_)));
            assert_eq!((hit.tier, content(&hit)), ("disk", small.clone()));
            let hit = files.cached(SP, "bin/large").await.unwrap().unwrap();
            assert!(matches!(hit.content, Content::File(_)));
            assert_eq!((hit.tier, content(&hit)), ("disk", large.clone()));
        }
        assert!(files.cached(SP, "bin/other").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn memory_hits_keep_their_memo_and_skip_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(dir.path(), 64 << 20).unwrap();
        let bytes = b"#!/bin/sh\necho hi\n".to_vec();
        let meta = keep(&disk, "bin/hi", &bytes);
        let files = Files::new(disk, 16 << 20);
        let first = files.cached(SP, "bin/hi").await.unwrap().unwrap();
        assert_eq!(first.tier, "disk");
        first.memo.as_ref().unwrap().get_or_init(|| Box::new(42u32));
        // Gone from disk now: the memory tier answers alone, with the same memo.
        assert!(files.disk().remove(&meta.sha256));
        let again = files.cached(SP, "bin/hi").await.unwrap().unwrap();
        assert_eq!((again.tier, content(&again)), ("memory", bytes));
        assert_eq!(*again.meta, meta);
        let memo = again.memo.as_ref().unwrap().get().unwrap();
        assert_eq!(memo.downcast_ref::<u32>(), Some(&42));
    }

    #[tokio::test]
    async fn a_file_served_from_memory_is_not_the_first_evicted_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        // Room for two of the three files.
        let disk = DiskCache::open(dir.path(), 250).unwrap();
        let (a, b, c) = (vec![1u8; 100], vec![2u8; 100], vec![3u8; 100]);
        keep(&disk, "bin/a", &a);
        keep(&disk, "bin/b", &b);
        let files = Files::new(disk, 16 << 20);
        // Both read from disk once, so both are held; `b` was used last on disk.
        for p in ["bin/a", "bin/b"] {
            assert_eq!(files.cached(SP, p).await.unwrap().unwrap().tier, "disk");
        }
        // A period later, `a` is hit again, from memory.
        let held = files.memory.get(&memory_key(SP, "bin/a")).await.unwrap();
        held.next_disk_use.store(0, Ordering::Relaxed);
        let hit = files.cached(SP, "bin/a").await.unwrap().unwrap();
        assert_eq!(hit.tier, "memory");
        // Making room for `c` evicts `b`, the file no one asked for since.
        keep(files.disk(), "bin/c", &c);
        assert!(files.disk().lookup(SP, "bin/a").is_some(), "a was evicted");
        assert!(files.disk().lookup(SP, "bin/b").is_none(), "b was kept");
        // Within the period, hits stay off the disk: `a` ages behind `c`.
        assert!(matches!(
            files.disk().mark_used(SP, "bin/c"),
            Marked::Done | Marked::KeyFile(_)
        ));
        assert_eq!(
            files.cached(SP, "bin/a").await.unwrap().unwrap().tier,
            "memory"
        );
        keep(files.disk(), "bin/b", &b);
        assert!(files.disk().lookup(SP, "bin/a").is_none());
        assert!(files.disk().lookup(SP, "bin/c").is_some());
    }

    #[tokio::test]
    async fn a_small_file_corrupted_on_disk_before_a_restart_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let meta = {
            let disk = DiskCache::open(dir.path(), 64 << 20).unwrap();
            keep(&disk, "bin/small", &[1u8; 500])
        };
        let name = crate::hash::hex(&meta.sha256);
        let path = dir.path().join("files").join(&name[..2]).join(&name);
        std::fs::write(&path, [2u8; 500]).unwrap();
        let files = Files::new(DiskCache::open(dir.path(), 64 << 20).unwrap(), 0);
        assert!(files.cached(SP, "bin/small").await.unwrap().is_none());
        assert!(files.disk().lookup(SP, "bin/small").is_none(), "dropped");
    }

    #[tokio::test]
    async fn a_small_file_is_checked_as_it_moves_from_disk_into_memory() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(dir.path(), 64 << 20).unwrap();
        let good = keep(&disk, "bin/good", &[1u8; 500]);
        let meta = keep(&disk, "bin/small", &[2u8; 500]);
        crate::cache::disk::tests::rot(&disk, &meta);
        let files = Files::new(disk, 16 << 20);
        assert!(files.cached(SP, "bin/small").await.unwrap().is_none());
        assert!(files.disk().lookup(SP, "bin/small").is_none(), "dropped");
        assert_eq!(files.disk().scrub_stats().corrupt_read, 1);
        let hit = files.cached(SP, "bin/good").await.unwrap().unwrap();
        assert_eq!((hit.tier, content(&hit)), ("disk", vec![1u8; 500]));
        assert_eq!(*hit.meta, good);
    }

    #[tokio::test]
    async fn a_larger_file_is_held_in_a_sealed_memory_file() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(dir.path(), 64 << 20).unwrap();
        let bytes: Vec<u8> = (0..INLINE_READ_MAX as usize * 3 + 7)
            .map(|i| i as u8)
            .collect();
        let meta = keep(&disk, "bin/large", &bytes);
        let files = Files::new(disk, 64 << 20);
        let first = files.cached(SP, "bin/large").await.unwrap().unwrap();
        assert_eq!((first.tier, content(&first)), ("disk", bytes.clone()));
        // Gone from disk: the memory file answers alone.
        assert!(files.disk().remove(&meta.sha256));
        let hit = files.cached(SP, "bin/large").await.unwrap().unwrap();
        assert_eq!((hit.tier, content(&hit)), ("memory", bytes));
        let Content::File(f) = &hit.content else {
            panic!("not a memory file");
        };
        let seals = rustix::fs::fcntl_get_seals(&**f).unwrap();
        assert!(seals
            .contains(SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL));
        let err = f.write_at(b"x", 0).expect_err("a sealed file was written");
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::PERM.raw_os_error())
        );
        assert!(f.set_len(1).is_err(), "a sealed file was truncated");
    }

    #[test]
    fn a_copy_that_does_not_hash_to_its_key_is_not_sealed() {
        let bytes = vec![5u8; 100_000];
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        let sha: [u8; 32] = Sha256::digest(&bytes).into();
        assert!(seal(&file, bytes.len() as u64, &sha).unwrap().is_some());
        file.write_all_at(b"6", 99_999).unwrap();
        assert!(seal(&file, bytes.len() as u64, &sha).unwrap().is_none());
    }

    #[test]
    fn a_held_copy_is_checked_against_its_hash_small_or_large() {
        for len in [1_000usize, INLINE_READ_MAX as usize + 1] {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(&bytes).unwrap();
            let sha: [u8; 32] = Sha256::digest(&bytes).into();
            let held = hold(&file, len as u64, &sha).unwrap().expect("held");
            let got = match held {
                Content::Memory(b) => b.to_vec(),
                Content::File(f) => {
                    let mut v = vec![0u8; len];
                    f.read_exact_at(&mut v, 0).unwrap();
                    v
                }
            };
            assert!(got == bytes, "{len}: held bytes differ");
            file.write_all_at(b"\xff", 10).unwrap();
            assert!(hold(&file, len as u64, &sha).unwrap().is_none(), "{len}");
        }
    }
}
