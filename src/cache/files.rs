//! The file tiers in front of the upstream: memory (moka, weighted by bytes), then the
//! disk cache, then one single-flight extraction per `(store path, path)`.
//!
//! ```text
//!  get(store path, path) ─► memory ─► hit
//!                       └──► disk key map ─► disk file (checked) ─► hit (and into memory,
//!                                                                    if it fits there)
//!                       └─ miss ─► single flight ─► extract (verified) ─► disk insert ─► again
//! ```
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
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use rustix::fs::{MemfdFlags, SealFlags};
use sha2::{Digest, Sha256};

use super::disk::{DiskCache, KeyMeta};
use super::flight::SingleFlight;
use crate::error::ErrorKind;
use crate::extract::{ExtractError, Extracted};

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
/// read: from the page cache that costs a few microseconds, less than handing the work to a
/// blocking thread and back (which cost two thirds of the disk tier's requests per second on
/// 1 KB files), and the re-hash of such a file after a restart is as short. Larger files are
/// opened on a blocking thread.
const INLINE_READ_MAX: u64 = 64 << 10;

/// What a held file costs besides its bytes and key, counted against the memory budget: its
/// metadata and what the server keeps in its memo (two header maps, about 3 KiB). Without
/// it, many small files would take several times the configured size.
const HELD_OVERHEAD: usize = 4 << 10;

/// A file kept in memory, with its key's metadata, so that a memory hit needs neither the
/// disk cache's key map nor its lock.
struct Held {
    meta: Arc<KeyMeta>,
    content: Content,
    memo: Memo,
}

/// The memory tier's key: `store path \0 path` (`\0` occurs in neither).
fn memory_key(store_path: &str, path: &str) -> String {
    let mut k = String::with_capacity(store_path.len() + 1 + path.len());
    k.push_str(store_path);
    k.push('\0');
    k.push_str(path);
    k
}

/// The content of `sha` from the disk cache: read `whole` into memory, or opened. `None`
/// if it is not there (or was dropped as corrupt).
fn load(disk: &DiskCache, sha: &[u8; 32], whole: bool) -> io::Result<Option<Content>> {
    Ok(if whole {
        disk.read_all(sha)?.map(|v| Content::Memory(Bytes::from(v)))
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
type FlightResult = Result<(), (String, Arc<ExtractError>)>;

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
        }
    }

    pub fn disk(&self) -> &DiskCache {
        &self.disk
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory.weighted_size()
    }

    /// The file for `(store_path, path)` if a tier holds it, without any upstream fetch.
    pub async fn cached(&self, store_path: &str, path: &str) -> std::io::Result<Option<Hit>> {
        let key = memory_key(store_path, path);
        if let Some(held) = self.memory.get(&key).await {
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
            load(&self.disk, &sha, true)?.map(|c| (c, to_memory))
        } else {
            let (disk, size) = (self.disk.clone(), meta.size);
            tokio::task::spawn_blocking(move || -> io::Result<_> {
                let Some(Content::File(file)) = load(&disk, &sha, false)? else {
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
        let memo = held.then(Memo::default);
        if let Some(memo) = &memo {
            let held = Held {
                meta: meta.clone(),
                content: content.clone(),
                memo: memo.clone(),
            };
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
        if let Some(hit) = self.cached(store_path, path).await.map_err(local)? {
            return Ok(hit);
        }
        for _ in 0..MAX_FLIGHTS {
            let work = fetch_once(&fetch, self.disk.tmp_dir().to_owned());
            let disk = self.disk.clone();
            let (sp, p) = (store_path.to_owned(), path.to_owned());
            let flight = async move {
                // A flight that ended between our cache check and this one starting has
                // already kept the file: do not download it again.
                if disk.lookup(&sp, &p).is_some() {
                    return Ok(());
                }
                let failed = |e: ExtractError| (p.clone(), Arc::new(e));
                let (wanted, extras) = work.await.map_err(failed)?;
                let kept = (sp, p.clone());
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    // The wanted file under the key it was asked by (its path before any
                    // symlink into another store path); siblings under their own.
                    let mut all = vec![(kept.0, kept.1, wanted)];
                    all.extend(extras.into_iter().filter_map(|e| {
                        let sp = e.store_path.as_ref()?.to_absolute_path();
                        Some((sp, e.path.to_string(), e))
                    }));
                    for (store_path, path, e) in all {
                        let meta = KeyMeta {
                            store_path,
                            path,
                            sha256: e.sha256()?,
                            size: e.size,
                            executable: e.executable,
                            linkage: e.linkage.kind().to_owned(),
                        };
                        disk.insert(e.file, meta)?;
                    }
                    Ok(())
                })
                .await
                .map_err(|e| failed(ExtractError::Local(std::io::Error::other(e))))?
                .map_err(|e| failed(ExtractError::Local(e)))?;
                Ok(())
            };
            let lost = Err((
                path.to_owned(),
                Arc::new(ExtractError::Local(std::io::Error::other(
                    "extraction task lost",
                ))),
            ));
            match self.flights.run(store_path.to_owned(), flight, lost).await {
                Ok(()) => {}
                // Another caller's file is missing or refused: that says nothing about
                // ours, which that flight did not keep. Fetch it in a flight of our own.
                Err((for_path, e))
                    if for_path != path
                        && matches!(e.kind(), ErrorKind::UnknownProgram | ErrorKind::Refused) => {}
                Err((_, e)) => return Err(e),
            }
            if let Some(mut hit) = self.cached(store_path, path).await.map_err(local)? {
                hit.tier = "upstream";
                return Ok(hit);
            }
        }
        Err(local(std::io::Error::other(
            "the extracted file could not be kept (larger than the disk cache?)",
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use sha2::{Digest, Sha256};
    use std::io::Write;

    const SP: &str = "/nix/store/ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d-hello-1.0";

    fn keep(disk: &DiskCache, path: &str, bytes: &[u8]) -> KeyMeta {
        let mut tmp = tempfile::NamedTempFile::new_in(disk.tmp_dir()).unwrap();
        tmp.write_all(bytes).unwrap();
        let meta = KeyMeta {
            store_path: SP.to_owned(),
            path: path.to_owned(),
            sha256: Sha256::digest(bytes).into(),
            size: bytes.len() as u64,
            executable: true,
            linkage: "static".to_owned(),
        };
        assert!(disk.insert(tmp, meta.clone()).unwrap().is_stored());
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
}
