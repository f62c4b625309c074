//! The disk cache: verified files kept by content hash, bounded in bytes, evicted LRU.
//!
//! ```text
//!  DIR/files/ab/abcdef…  content, named by the lower-case hex SHA-256 the extractor verified
//!  DIR/keys/0123…        one small JSON file per (store path, path), named by the hex
//!                        SHA-256 of `store_path \0 path`: which content, size, executable
//!                        bit, linkage
//!  DIR/tmp/              files being written; renamed into files/ or keys/ once durable
//! ```
//!
//! A key map that survives restarts means a restarted node serves from disk without
//! asking the upstream anything. Identical content under different keys is stored once.
//!
//! Nothing found on disk at start-up is trusted: names that are not ours are deleted, keys
//! whose JSON is bad or whose content is missing are deleted, and every content file is
//! re-hashed the first time it is opened after start-up (its size is checked on every open).
//! Each open also compares the file's ctime and inode with those it had when it was last
//! hashed or written: a file changed in place since is hashed again before it is served.
//! A bad entry is dropped with its keys and reported as a miss, so the caller fetches again.
//! Bit rot changes bytes and leaves that state alone: [`DiskCache::scrub_next`] re-hashes
//! files whatever their state says, a file at a time, for the scrubber (`cache::scrub`).
//!
//! Writes that fail are counted by cause in [`Health`]; a full file system evicts least
//! recently used entries and the keep is tried again, and directories removed under a
//! running cache are made again.
//!
//! Content files are never written once kept, not even their times: the order of use that
//! a restart recovers is kept in the key files' mtimes, refreshed at most once a minute
//! per key ([`DiskCache::mark_used`]), or the content's own mtime (when it was written).
//!
//! One mutex guards the in-memory index *and* every change to names on disk (rename in,
//! unlink), so the two always agree. The slow parts (fsync of file data, re-hashing,
//! reading) run outside it. The API is synchronous: the server calls it from
//! `spawn_blocking`, but for reads of small files (see `cache::files`), which cost less than
//! the hand-off.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tempfile::{NamedTempFile, TempPath};
use tracing::{debug, info, warn};

use super::health::{Health, WriteFailure};
use crate::hash::hex;
use crate::nar::wire::{MAX_DEPTH, MAX_NAME_LEN};

/// The default `--disk-cache-size`: 10 GiB.
pub const DEFAULT_CAPACITY: u64 = 10 << 30;

/// Largest key file written or read. A key holds a store path (at most 211 bytes) and a
/// path of at most `MAX_DEPTH` names of `MAX_NAME_LEN` bytes; JSON escaping can turn one
/// byte into six (`\u0000`). Anything larger on disk was not written by us.
const KEY_FILE_MAX: u64 = 1024 + 6 * (MAX_DEPTH as u64) * (MAX_NAME_LEN + 1);

/// A use refreshes its key file's mtime (the last use a restart recovers) at most this often
/// per key, so a hot file does not cost an inode write on every request. Content files are
/// never written after they are kept: their state is what tells a change (see [`Stamp`]).
const MTIME_REFRESH: Duration = Duration::from_secs(60);

/// On a full file system, a keep evicts at least this share of the capacity (1/64: 160 MiB
/// of the default 10 GiB) before it tries again: enough room for several files of a
/// usual size, so that the next misses do not each evict and fail once, while a disk
/// filled by something else costs the cache little of what it holds.
pub const FULL_EVICT_SHARE: u64 = 64;

/// Read size when re-hashing a content file.
const HASH_CHUNK: usize = 64 * 1024;

/// A SHA-256 digest: of a file's content, or of a key.
type Digest32 = [u8; 32];

/// What the cache knows about one `(store path, path)`: the fields of its key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMeta {
    pub store_path: String,
    pub path: String,
    /// SHA-256 of the content, as verified by the extractor.
    pub sha256: [u8; 32],
    pub size: u64,
    pub executable: bool,
    /// The portability verdict's short name (`static`, `dynamic`, `script`, `other`).
    pub linkage: String,
}

/// What [`DiskCache::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The content was written; `evicted` entries were removed to make room for it.
    Written { evicted: usize },
    /// Identical content was already on disk; only the key was recorded.
    Shared,
    /// Larger than the whole capacity: neither the content nor the key was kept.
    TooLarge,
}

impl Stored {
    /// Whether the file can now be found by its key.
    pub fn is_stored(self) -> bool {
        match self {
            Stored::Written { .. } | Stored::Shared => true,
            Stored::TooLarge => false,
        }
    }
}

/// The key file's JSON.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    store_path: String,
    path: String,
    sha256: String,
    size: u64,
    executable: bool,
    linkage: String,
}

impl KeyFile {
    fn from_meta(meta: &KeyMeta) -> KeyFile {
        KeyFile {
            store_path: meta.store_path.clone(),
            path: meta.path.clone(),
            sha256: hex(&meta.sha256),
            size: meta.size,
            executable: meta.executable,
            linkage: meta.linkage.clone(),
        }
    }

    fn into_meta(self) -> Option<KeyMeta> {
        Some(KeyMeta {
            sha256: parse_hex32(&self.sha256)?,
            store_path: self.store_path,
            path: self.path,
            size: self.size,
            executable: self.executable,
            linkage: self.linkage,
        })
    }
}

/// The paths under the cache directory.
#[derive(Debug)]
struct Layout {
    files: PathBuf,
    keys: PathBuf,
    tmp: PathBuf,
}

impl Layout {
    fn shard(&self, sha: &Digest32) -> PathBuf {
        self.files.join(hex(&sha[..1]))
    }

    fn content(&self, sha: &Digest32) -> PathBuf {
        self.shard(sha).join(hex(sha))
    }

    fn key(&self, id: &Digest32) -> PathBuf {
        self.keys.join(hex(id))
    }
}

#[derive(Debug)]
struct Entry {
    size: u64,
    /// Position in [`Index::lru`].
    last_use: u64,
    /// Unique per insertion, so a check that ran outside the lock only drops the entry it
    /// checked, not one inserted again meanwhile.
    generation: u64,
    /// The file's state when this process last hashed it or wrote it: `None` until then.
    /// An open that finds the file in another state hashes it again.
    verified: Option<Stamp>,
    /// Ids of the keys naming this content.
    keys: Vec<Digest32>,
}

/// The in-memory index. Invariants: `lru` holds exactly one `(last_use, sha)` per entry,
/// `bytes` is the sum of entry sizes, and every key names an entry that lists it.
#[derive(Debug, Default)]
struct Index {
    /// In hash order, which is the order a scrub pass visits them in.
    entries: BTreeMap<Digest32, Entry>,
    /// Least recently used first.
    lru: BTreeMap<u64, Digest32>,
    keys: HashMap<Digest32, KeyMeta>,
    bytes: u64,
    /// Source of `last_use` and `generation` values.
    clock: u64,
    /// When each key file's mtime was last set (by writing it, or marking a use).
    marked: HashMap<Digest32, SystemTime>,
}

impl Index {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn add(&mut self, sha: Digest32, size: u64, verified: Option<Stamp>) {
        let t = self.tick();
        self.lru.insert(t, sha);
        self.bytes = self.bytes.saturating_add(size);
        self.entries.insert(
            sha,
            Entry {
                size,
                last_use: t,
                generation: t,
                verified,
                keys: Vec::new(),
            },
        );
    }

    /// Makes `sha` the most recently used entry; false if there is no such entry.
    fn touch(&mut self, sha: &Digest32) -> bool {
        let t = self.tick();
        let Some(e) = self.entries.get_mut(sha) else {
            return false;
        };
        self.lru.remove(&e.last_use);
        e.last_use = t;
        self.lru.insert(t, *sha);
        true
    }

    /// Points key `id` at `meta.sha256`, detaching it from the content it named before.
    fn set_key(&mut self, id: Digest32, meta: KeyMeta) {
        if let Some(old) = self.keys.get(&id) {
            if old.sha256 != meta.sha256 {
                if let Some(e) = self.entries.get_mut(&old.sha256) {
                    e.keys.retain(|k| *k != id);
                }
            }
        }
        if let Some(e) = self.entries.get_mut(&meta.sha256) {
            if !e.keys.contains(&id) {
                e.keys.push(id);
            }
        }
        self.keys.insert(id, meta);
    }

    /// Drops an entry, its keys and their files.
    fn remove(&mut self, layout: &Layout, sha: &Digest32) -> Option<Entry> {
        let entry = self.entries.remove(sha)?;
        self.lru.remove(&entry.last_use);
        self.bytes = self.bytes.saturating_sub(entry.size);
        for id in &entry.keys {
            self.keys.remove(id);
            self.marked.remove(id);
            remove_quietly(&layout.key(id));
        }
        remove_quietly(&layout.content(sha));
        Some(entry)
    }

    /// Orders the entries by `last_use`, oldest (or unknown) first.
    fn order_by(&mut self, last_use: &HashMap<Digest32, SystemTime>) {
        let mut order: Vec<(SystemTime, Digest32)> = self
            .entries
            .keys()
            .map(|sha| {
                (
                    last_use.get(sha).copied().unwrap_or(SystemTime::UNIX_EPOCH),
                    *sha,
                )
            })
            .collect();
        order.sort_unstable();
        for (_, sha) in order {
            self.touch(&sha);
        }
    }

    /// Evicts least recently used entries until `incoming` more bytes fit in `capacity`.
    fn make_room(&mut self, layout: &Layout, incoming: u64, capacity: u64) -> usize {
        let mut evicted = 0;
        while self.bytes.saturating_add(incoming) > capacity {
            let Some((&t, &sha)) = self.lru.first_key_value() else {
                break;
            };
            match self.remove(layout, &sha) {
                Some(e) => {
                    debug!(
                        sha256 = %hex(&sha),
                        size = e.size,
                        keys = e.keys.len(),
                        "disk cache evicted"
                    );
                    evicted += 1;
                }
                // Only if the invariant were broken; without this the loop would not end.
                None => {
                    self.lru.remove(&t);
                }
            }
        }
        evicted
    }
}

/// What an open needs to know about an entry, read under the lock and checked outside it.
#[derive(Clone, Copy)]
struct Ticket {
    size: u64,
    generation: u64,
    verified: Option<Stamp>,
}

/// One state of a content file. Writing to it, truncating it, or changing its mode or times
/// through the file system moves its ctime (which no caller can set back); replacing it
/// changes the inode. This process does none of these to a content file once it is kept.
/// On kernels with coarse timestamps (before 6.13), a write in the same clock tick as the
/// state was read leaves the ctime as it was: only a writer racing this process could do
/// that, and it could as well write while a response is being sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Stamp {
    fn of(md: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            ino: md.ino(),
            ctime: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
        }
    }
}

/// What [`DiskCache::mark_used`] did.
#[derive(Debug)]
pub enum Marked {
    /// Nothing: the lock was busy.
    Busy,
    /// Marked in the index (or there is no such key).
    Done,
    /// Marked in the index; the key file's mtime is due too. A metadata write, which can
    /// wait on the file system's journal: [`KeyMark::write`] it off the serving thread.
    KeyFile(KeyMark),
}

/// A key file's mtime to set, as a use.
#[derive(Debug)]
pub struct KeyMark {
    path: PathBuf,
    at: SystemTime,
}

impl KeyMark {
    pub fn write(self) {
        if let Err(e) = File::open(&self.path).and_then(|f| f.set_modified(self.at)) {
            debug!(key = %self.path.display(), err = %e, "could not mark a disk cache key used");
        }
    }
}

/// A content-addressed, size-bounded, LRU disk cache of verified files. See the module doc.
pub struct DiskCache {
    dir: PathBuf,
    layout: Layout,
    capacity: u64,
    index: Mutex<Index>,
    health: Health,
    scrub: ScrubCounters,
}

/// What scrubbing found, and what reads found (see [`DiskCache::scrub_next`]).
#[derive(Debug, Default)]
struct ScrubCounters {
    files: AtomicU64,
    bytes: AtomicU64,
    /// Content dropped by a scrub: changed since it was kept, or unreadable.
    corrupt_scrub: AtomicU64,
    /// Content dropped by a read that re-hashed it.
    corrupt_read: AtomicU64,
}

/// Totals since start-up of [`DiskCache::scrub_next`] and of the checks made by reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScrubStats {
    /// Files and bytes scrubbed.
    pub files: u64,
    pub bytes: u64,
    /// Files dropped by a scrub: their content no longer hashed to their name, or could
    /// not be read.
    pub corrupt_scrub: u64,
    /// Files dropped by a read (after a restart, a change of state, or on their way into
    /// memory) whose content no longer hashed to their name.
    pub corrupt_read: u64,
}

/// One file checked by [`DiskCache::scrub_next`].
#[derive(Debug, Clone, Copy)]
pub struct Scrubbed {
    /// Its name: the next call goes on after it.
    pub sha256: [u8; 32],
    /// Bytes read to check it.
    pub bytes: u64,
    /// Whether it was kept (it still hashes to its name) or dropped.
    pub ok: bool,
}

impl fmt::Debug for DiskCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (entries, bytes) = self.stats();
        f.debug_struct("DiskCache")
            .field("dir", &self.dir)
            .field("capacity", &self.capacity)
            .field("entries", &entries)
            .field("bytes", &bytes)
            .finish()
    }
}

impl DiskCache {
    /// Opens (creating if need be) the cache in `dir`, holding at most `capacity` bytes of
    /// content: removes stale temp files, re-indexes content and keys, drops what is not
    /// ours or not consistent, and evicts down to `capacity`.
    pub fn open(dir: impl Into<PathBuf>, capacity: u64) -> io::Result<DiskCache> {
        let dir = dir.into();
        let layout = Layout {
            files: dir.join("files"),
            keys: dir.join("keys"),
            tmp: dir.join("tmp"),
        };
        for d in [&layout.files, &layout.keys, &layout.tmp] {
            fs::create_dir_all(d)?;
        }
        let stale = clear_tmp(&layout.tmp)?;
        let mut index = Index::default();
        let mut last_use = scan_files(&layout, &mut index)?;
        let dropped_keys = scan_keys(&layout, &mut index, &mut last_use)?;
        index.order_by(&last_use);
        let evicted = index.make_room(&layout, 0, capacity);
        info!(
            dir = %dir.display(),
            entries = index.entries.len(),
            keys = index.keys.len(),
            bytes = index.bytes,
            capacity,
            stale_temp_files = stale,
            dropped_keys,
            evicted,
            "disk cache opened"
        );
        Ok(DiskCache {
            dir,
            layout,
            capacity,
            index: Mutex::new(index),
            health: Health::default(),
            scrub: ScrubCounters::default(),
        })
    }

    /// Where callers create the temp files they hand to [`DiskCache::insert`]: on the same
    /// file system as the cache, so keeping a file is a rename.
    pub fn tmp_dir(&self) -> &Path {
        &self.layout.tmp
    }

    /// The capacity in bytes of content.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// `(entries, bytes)`: content files held and their total size.
    pub fn stats(&self) -> (usize, u64) {
        let index = self.lock();
        (index.entries.len(), index.bytes)
    }

    /// The metadata recorded for `(store_path, path)`. Does not count as a use; opening the
    /// content does.
    pub fn lookup(&self, store_path: &str, path: &str) -> Option<KeyMeta> {
        let id = key_id(store_path, path);
        let index = self.lock();
        index
            .keys
            .get(&id)
            .filter(|m| m.store_path == store_path && m.path == path)
            .cloned()
    }

    /// Keeps `file` as the content of `meta.sha256` and records `meta` under its key,
    /// evicting least recently used entries to make room.
    ///
    /// `file` must be complete, its content must hash to `meta.sha256` (it is trusted, not
    /// re-hashed) and it must have been created in [`DiskCache::tmp_dir`]. A file larger
    /// than the capacity is not kept ([`Stored::TooLarge`]).
    pub fn insert(&self, file: NamedTempFile, meta: KeyMeta) -> io::Result<Stored> {
        let (file, path) = file.into_parts();
        self.insert_parts(&file, path, meta)
    }

    /// [`DiskCache::insert`] for a temp file split into its open file and its path, so that
    /// the caller can keep reading the open file (the same file, under its new name) while
    /// and after it is kept.
    ///
    /// A write that fails is counted by cause in [`DiskCache::health`]. On a full file
    /// system, least recently used entries are evicted to free the file's size (at least
    /// [`FULL_EVICT_SHARE`] of the capacity) and the keep is tried once more. The
    /// directories the cache writes to are created again if they were removed.
    pub fn insert_parts(&self, file: &File, path: TempPath, meta: KeyMeta) -> io::Result<Stored> {
        let mut path = Some(path);
        let mut retried = false;
        loop {
            match self.try_insert(file, &mut path, &meta) {
                Ok(stored) => {
                    if stored.is_stored() {
                        self.health.ok();
                    }
                    return Ok(stored);
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => return Err(e),
                Err(e) => {
                    let cause = self.health.failed("keeping a file", &e);
                    if cause != WriteFailure::Full || retried || self.free_space(meta.size) == 0 {
                        return Err(e);
                    }
                    retried = true;
                }
            }
        }
    }

    /// Copies `src` (`meta.size` bytes, hashing to `meta.sha256`) into a temp file in the
    /// cache's own temp directory and keeps it: for files extracted elsewhere while the
    /// cache could not take them (see `cache::files`).
    pub fn insert_copy(&self, src: &File, meta: KeyMeta) -> io::Result<Stored> {
        if meta.size > self.capacity {
            return Ok(Stored::TooLarge);
        }
        let copy = (|| {
            self.ensure_dirs()?;
            let mut tmp = NamedTempFile::new_in(&self.layout.tmp)?;
            let mut reader = src.try_clone()?;
            reader.seek(SeekFrom::Start(0))?;
            let copied = io::copy(&mut reader.take(meta.size), tmp.as_file_mut())?;
            if copied != meta.size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("copied {copied} of {} bytes", meta.size),
                ));
            }
            Ok(tmp)
        })();
        let tmp = match copy {
            Ok(tmp) => tmp,
            Err(e) => {
                let cause = self.health.failed("copying a file into the disk cache", &e);
                if cause == WriteFailure::Full {
                    self.free_space(meta.size);
                }
                return Err(e);
            }
        };
        let (file, path) = tmp.into_parts();
        self.insert_parts(&file, path, meta)
    }

    /// Whether writes work, and what failed (see [`Health`]).
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Makes sure the temp directory exists (creating the cache directory again if it was
    /// removed), so that extractions can be written there.
    pub fn ensure_dirs(&self) -> io::Result<()> {
        for d in [&self.layout.tmp, &self.layout.keys, &self.layout.files] {
            fs::create_dir_all(d)?;
        }
        Ok(())
    }

    /// Evicts least recently used entries to free at least `bytes` (and at least
    /// [`FULL_EVICT_SHARE`] of the capacity) on a full file system. Returns the bytes freed.
    pub fn free_space(&self, bytes: u64) -> u64 {
        let want = bytes.max(self.capacity / FULL_EVICT_SHARE).max(1);
        let mut index = self.lock();
        let before = index.bytes;
        let target = before.saturating_sub(want);
        let evicted = index.make_room(&self.layout, 0, target);
        let freed = before - index.bytes;
        drop(index);
        if evicted > 0 {
            info!(
                evicted,
                freed, "the disk cache's file system is full: evicted to make room"
            );
        }
        freed
    }

    /// One try of [`DiskCache::insert_parts`]. `path` is taken once the content is renamed
    /// into place (or found there already); a failure before that leaves it for a retry.
    fn try_insert(
        &self,
        file: &File,
        path: &mut Option<TempPath>,
        meta: &KeyMeta,
    ) -> io::Result<Stored> {
        let sha = meta.sha256;
        if meta.size > self.capacity {
            debug!(
                sha256 = %hex(&sha),
                size = meta.size,
                capacity = self.capacity,
                "larger than the disk cache; not kept"
            );
            return Ok(Stored::TooLarge);
        }
        self.ensure_dirs()?;
        let len = file.metadata()?.len();
        if len != meta.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file is {len} bytes but its metadata says {}", meta.size),
            ));
        }
        let id = key_id(&meta.store_path, &meta.path);
        let (had_content, key_current) = {
            let index = self.lock();
            (
                index.entries.contains_key(&sha),
                index.keys.get(&id) == Some(meta),
            )
        };
        // Flush data before the rename makes it visible under its hash: otherwise a power
        // loss shortly after the rename can leave the name pointing at a zero-length or
        // partly written file (ext4 and XFS delay allocation). The re-hash after restart
        // would catch that, but only by throwing the entry away.
        if !had_content {
            file.sync_all()?;
        }
        let key_tmp = if key_current {
            None
        } else {
            Some(self.key_temp(meta)?)
        };

        let mut index = self.lock();
        let stored = if index.entries.contains_key(&sha) {
            drop(path.take());
            Stored::Shared
        } else {
            let Some(temp) = path.take() else {
                // Renamed into place by an earlier try, and evicted since.
                return Err(io::Error::other("the file was evicted while it was kept"));
            };
            if had_content {
                // Evicted since we looked: rare enough to flush under the lock.
                if let Err(e) = file.sync_all() {
                    *path = Some(temp);
                    return Err(e);
                }
            }
            let evicted = index.make_room(&self.layout, meta.size, self.capacity);
            if let Err(e) = fs::create_dir_all(self.layout.shard(&sha)) {
                *path = Some(temp);
                return Err(e);
            }
            if let Err(e) = temp.persist(self.layout.content(&sha)) {
                *path = Some(e.path);
                return Err(e.error);
            }
            // After the rename, which moves the ctime.
            let stamp = file.metadata().map(|md| Stamp::of(&md)).ok();
            index.add(sha, meta.size, stamp);
            Stored::Written { evicted }
        };
        let key_written = if index.keys.get(&id) == Some(meta) {
            false
        } else {
            let tmp = match key_tmp {
                Some(t) => t,
                // Dropped since we looked: rare enough to write under the lock.
                None => self.key_temp(meta)?,
            };
            tmp.persist(self.layout.key(&id)).map_err(|e| e.error)?;
            index.set_key(id, meta.clone());
            index.marked.insert(id, SystemTime::now());
            true
        };
        index.touch(&sha);
        drop(index);

        // Make the renames themselves durable, so a key we reported as kept is still there
        // after a power loss.
        if matches!(stored, Stored::Written { .. }) {
            sync_dir(&self.layout.shard(&sha))?;
        }
        if key_written {
            sync_dir(&self.layout.keys)?;
        }
        Ok(stored)
    }

    /// Opens the content of `sha`, checked: `Ok(None)` if it is not cached, or if it was
    /// found corrupt (it is then dropped with its keys, so the caller fetches it again).
    /// Counts as a use.
    pub fn open_file(&self, sha: &[u8; 32]) -> io::Result<Option<File>> {
        let Some((ticket, mut file, stamp)) = self.open_sized(sha)? else {
            return Ok(None);
        };
        if ticket.verified != Some(stamp) {
            let (got, len) = hash_reader(&mut file)?;
            if !self.check_hash(sha, ticket, stamp, got, len) {
                return Ok(None);
            }
            file.seek(SeekFrom::Start(0))?;
        }
        self.used(sha, ticket);
        Ok(Some(file))
    }

    /// Reads the whole content of `sha`, with the same checks as [`DiskCache::open_file`].
    /// Meant for files small enough to keep in memory. Unless `may_wait`, a read that
    /// would wait for the disk (the page cache not holding the file) fails with
    /// [`io::ErrorKind::WouldBlock`] instead, and changes nothing.
    pub fn read_all(&self, sha: &[u8; 32], may_wait: bool) -> io::Result<Option<Vec<u8>>> {
        self.read_all_checked(sha, may_wait, false)
    }

    /// [`DiskCache::read_all`], hashing the bytes read even when the file's state says it
    /// was checked already: for a copy that outlives the file (held in memory), which a
    /// later scrub of the file would not reach.
    pub fn read_all_checked(
        &self,
        sha: &[u8; 32],
        may_wait: bool,
        rehash: bool,
    ) -> io::Result<Option<Vec<u8>>> {
        let Some((ticket, file, stamp)) = self.open_sized(sha)? else {
            return Ok(None);
        };
        // One byte more than expected, so growth after the size check is noticed too.
        let want = usize::try_from(ticket.size.saturating_add(1))
            .map_err(|_| io::Error::other("file too large to read whole"))?;
        let mut buf = vec![0u8; want];
        let mut len = 0;
        while len < want {
            let n = if may_wait {
                match file.read_at(&mut buf[len..], len as u64) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => r?,
                }
            } else {
                read_at_cached(&file, &mut buf[len..], len as u64)?
                    .ok_or(io::ErrorKind::WouldBlock)?
            };
            if n == 0 {
                break;
            }
            len += n;
        }
        buf.truncate(len);
        let len = len as u64;
        if len != ticket.size {
            self.drop_bad(
                sha,
                ticket,
                "changed size while being read",
                ticket.size,
                len,
            );
            return Ok(None);
        }
        if (rehash || ticket.verified != Some(stamp))
            && !self.check_hash(sha, ticket, stamp, Sha256::digest(&buf).into(), len)
        {
            return Ok(None);
        }
        self.used(sha, ticket);
        Ok(Some(buf))
    }

    /// Re-hashes the first content file in hash order after `after` (the first of all if
    /// `None`), whatever its recorded state says, and drops it with its keys if it no
    /// longer hashes to its name or cannot be read: bit rot leaves a file's ctime and
    /// inode as they were, so only reading it again finds it. `None` when no file
    /// follows: the pass is done. Visiting in hash order, a pass reaches every file held
    /// from its start to its end once, whatever is kept or evicted meanwhile. Blocking.
    pub fn scrub_next(&self, after: Option<&[u8; 32]>) -> Option<Scrubbed> {
        let (sha, ticket) = {
            let index = self.lock();
            let from: Bound<&Digest32> = after.map_or(Bound::Unbounded, Bound::Excluded);
            let (sha, e) = index
                .entries
                .range::<Digest32, _>((from, Bound::Unbounded))
                .next()?;
            let ticket = Ticket {
                size: e.size,
                generation: e.generation,
                verified: e.verified,
            };
            (*sha, ticket)
        };
        let checked = (|| -> io::Result<Option<(u64, bool)>> {
            let Some((ticket, mut file, stamp)) = self.open_sized(&sha)? else {
                return Ok(None); // dropped already: missing, or resized
            };
            // A file nobody read lately is read in for this only: the page cache is told
            // to let it go again, rather than evict what requests use for it.
            let cold = ticket.size > 0 && !in_page_cache(&file, 0).unwrap_or(true);
            let hashed = hash_reader(&mut file);
            if cold {
                let _ = rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed);
            }
            let (got, len) = hashed?;
            if got != sha && len == ticket.size {
                // Counted here, not as a read's finding.
                warn!(
                    sha256 = %hex(&sha),
                    got = %hex(&got),
                    "scrub: disk cache content does not match its hash; dropped"
                );
                if self.drop_if_current(&sha, ticket) {
                    self.scrub.corrupt_scrub.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(Some((len, false)));
            }
            Ok(Some((len, self.check_hash(&sha, ticket, stamp, got, len))))
        })();
        let (bytes, ok) = match checked {
            Ok(Some(c)) => c,
            Ok(None) => (0, false),
            Err(e) => {
                warn!(sha256 = %hex(&sha), err = %e, "scrub: disk cache content unreadable; dropped");
                if self.drop_if_current(&sha, ticket) {
                    self.scrub.corrupt_scrub.fetch_add(1, Ordering::Relaxed);
                }
                (0, false)
            }
        };
        self.scrub.files.fetch_add(1, Ordering::Relaxed);
        self.scrub.bytes.fetch_add(bytes, Ordering::Relaxed);
        Some(Scrubbed {
            sha256: sha,
            bytes,
            ok,
        })
    }

    /// See [`ScrubStats`].
    pub fn scrub_stats(&self) -> ScrubStats {
        let c = &self.scrub;
        ScrubStats {
            files: c.files.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            corrupt_scrub: c.corrupt_scrub.load(Ordering::Relaxed),
            corrupt_read: c.corrupt_read.load(Ordering::Relaxed),
        }
    }

    /// Drops the content of `sha` and its keys. Returns whether it was cached.
    pub fn remove(&self, sha: &[u8; 32]) -> bool {
        self.lock().remove(&self.layout, sha).is_some()
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // Nothing that runs under the lock panics by design; if something did, the index is
        // still usable (at worst an entry is missing), and refusing every later request would
        // be worse.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens the content file and checks its size against the index.
    fn open_sized(&self, sha: &Digest32) -> io::Result<Option<(Ticket, File, Stamp)>> {
        let ticket = {
            let index = self.lock();
            let Some(e) = index.entries.get(sha) else {
                return Ok(None);
            };
            Ticket {
                size: e.size,
                generation: e.generation,
                verified: e.verified,
            }
        };
        let file = match File::open(self.layout.content(sha)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.drop_bad(sha, ticket, "content file missing", ticket.size, 0);
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let md = file.metadata()?;
        if !md.is_file() {
            self.drop_bad(sha, ticket, "content is not a regular file", ticket.size, 0);
            return Ok(None);
        }
        if md.len() != ticket.size {
            self.drop_bad(
                sha,
                ticket,
                "content has the wrong size",
                ticket.size,
                md.len(),
            );
            return Ok(None);
        }
        Ok(Some((ticket, file, Stamp::of(&md))))
    }

    /// Compares a re-hash of the file in state `stamp` with the name; marks the entry
    /// verified in that state or drops it.
    fn check_hash(
        &self,
        sha: &Digest32,
        ticket: Ticket,
        stamp: Stamp,
        got: Digest32,
        len: u64,
    ) -> bool {
        if len != ticket.size {
            self.drop_bad(
                sha,
                ticket,
                "changed size while being hashed",
                ticket.size,
                len,
            );
            return false;
        }
        if got != *sha {
            warn!(
                sha256 = %hex(sha),
                got = %hex(&got),
                "disk cache content does not match its hash; dropped"
            );
            if self.drop_if_current(sha, ticket) {
                self.scrub.corrupt_read.fetch_add(1, Ordering::Relaxed);
            }
            return false;
        }
        if let Some(e) = self.lock().entries.get_mut(sha) {
            if e.generation == ticket.generation {
                e.verified = Some(stamp);
            }
        }
        true
    }

    fn drop_bad(
        &self,
        sha: &Digest32,
        ticket: Ticket,
        problem: &'static str,
        expected: u64,
        actual: u64,
    ) {
        // An entry evicted or replaced while we looked is not corruption, just a race.
        if self.drop_if_current(sha, ticket) {
            warn!(
                sha256 = %hex(sha),
                expected,
                actual,
                problem,
                "disk cache entry corrupt; dropped"
            );
        }
    }

    /// Drops the entry the ticket was issued for, unless it is already gone or was inserted
    /// again since. Returns whether it dropped it.
    fn drop_if_current(&self, sha: &Digest32, ticket: Ticket) -> bool {
        let mut index = self.lock();
        let current = index
            .entries
            .get(sha)
            .is_some_and(|e| e.generation == ticket.generation);
        if current {
            index.remove(&self.layout, sha);
        }
        current
    }

    /// Marks a successful open as a use.
    fn used(&self, sha: &Digest32, ticket: Ticket) {
        let mut index = self.lock();
        if index
            .entries
            .get(sha)
            .is_some_and(|e| e.generation == ticket.generation)
        {
            index.touch(sha);
        }
    }

    /// Marks the key `(store_path, path)` and its content as used: in the index, and at most
    /// once per [`MTIME_REFRESH`] per key in the key file's mtime, which is what a restart
    /// recovers the order of use from. For uses the index does not see otherwise (hits on a
    /// copy in memory) and for that mtime. Never waits: the caller is serving a request, and
    /// the order of use is kept only roughly anyway.
    pub fn mark_used(&self, store_path: &str, path: &str) -> Marked {
        let id = key_id(store_path, path);
        let mut index = match self.index.try_lock() {
            Ok(index) => index,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Marked::Busy,
        };
        let Some(sha) = index.keys.get(&id).map(|m| m.sha256) else {
            return Marked::Done;
        };
        index.touch(&sha);
        let now = SystemTime::now();
        let fresh = index
            .marked
            .get(&id)
            .is_some_and(|t| now.duration_since(*t).is_ok_and(|d| d < MTIME_REFRESH));
        if fresh {
            return Marked::Done;
        }
        index.marked.insert(id, now);
        Marked::KeyFile(KeyMark {
            path: self.layout.key(&id),
            at: now,
        })
    }

    /// Writes `meta`'s key file to a durable temp file, ready to be renamed into place.
    fn key_temp(&self, meta: &KeyMeta) -> io::Result<NamedTempFile> {
        let json = serde_json::to_vec(&KeyFile::from_meta(meta))?;
        if json.len() as u64 > KEY_FILE_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "key file would be {} bytes (limit {KEY_FILE_MAX})",
                    json.len()
                ),
            ));
        }
        let mut tmp = NamedTempFile::new_in(&self.layout.tmp)?;
        tmp.write_all(&json)?;
        // Same crash as for content: without this, a power loss after the rename can leave
        // an empty key file (harmless, it is dropped at start-up, but the key is lost).
        tmp.as_file().sync_all()?;
        Ok(tmp)
    }
}

/// The id of a key: SHA-256 of `store_path \0 path`. `\0` cannot occur in either, so
/// distinct pairs cannot run together.
fn key_id(store_path: &str, path: &str) -> Digest32 {
    let mut h = Sha256::new();
    h.update(store_path.as_bytes());
    h.update([0]);
    h.update(path.as_bytes());
    h.finalize().into()
}

/// Parses exactly 64 lower-case hex digits, the only names the cache writes.
fn parse_hex32(s: &str) -> Option<Digest32> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn hash_reader(r: &mut impl Read) -> io::Result<(Digest32, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut len = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((h.finalize().into(), len))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes a file the index no longer names. A failure leaves an orphan that the next
/// start-up re-indexes or deletes, so it is logged, not returned.
fn remove_quietly(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %path.display(), err = %e, "could not remove disk cache file"),
    }
}

/// Deletes a directory entry that is not ours. Directories are left alone (and logged):
/// recursive deletion on a guess is not worth the risk.
fn remove_junk(path: &Path, is_dir: bool) {
    if is_dir {
        warn!(path = %path.display(), "unexpected directory in the disk cache; left alone");
    } else {
        debug!(path = %path.display(), "removing unexpected file from the disk cache");
        remove_quietly(path);
    }
}

/// Empties `tmp/`: whatever is there was being written when the last process stopped.
fn clear_tmp(tmp: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for dent in fs::read_dir(tmp)? {
        let dent = dent?;
        let path = dent.path();
        // `file_type` does not follow symlinks, and `remove_dir_all` does not either.
        let result = if dent.file_type()?.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Ok(()) => removed += 1,
            Err(e) => warn!(path = %path.display(), err = %e, "could not remove stale temp file"),
        }
    }
    Ok(removed)
}

/// Indexes `files/<ab>/<abcdef…>`. Returns each content's mtime (when it was written).
fn scan_files(layout: &Layout, index: &mut Index) -> io::Result<HashMap<Digest32, SystemTime>> {
    let mut written = HashMap::new();
    for shard in fs::read_dir(&layout.files)? {
        let shard = shard?;
        let shard_path = shard.path();
        let shard_is_dir = shard.file_type()?.is_dir();
        let prefix = shard.file_name().to_str().map(str::to_owned);
        let prefix = match prefix {
            Some(p) if shard_is_dir && p.len() == 2 && p.bytes().all(is_lower_hex) => p,
            _ => {
                remove_junk(&shard_path, shard_is_dir);
                continue;
            }
        };
        for dent in fs::read_dir(&shard_path)? {
            let dent = dent?;
            let path = dent.path();
            let ft = dent.file_type()?;
            let sha = dent
                .file_name()
                .to_str()
                .filter(|n| n.starts_with(prefix.as_str()))
                .and_then(parse_hex32);
            let (Some(sha), true) = (sha, ft.is_file()) else {
                remove_junk(&path, ft.is_dir());
                continue;
            };
            let md = dent.metadata()?;
            let mtime = md.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            index.add(sha, md.len(), None);
            written.insert(sha, mtime);
        }
    }
    Ok(written)
}

/// Loads `keys/*`, deleting keys that are unreadable, misnamed, or name missing content, and
/// moves each content's `last_use` up to its newest key's mtime (its last marked use).
/// Returns how many keys were deleted.
fn scan_keys(
    layout: &Layout,
    index: &mut Index,
    last_use: &mut HashMap<Digest32, SystemTime>,
) -> io::Result<usize> {
    let mut dropped = 0;
    for dent in fs::read_dir(&layout.keys)? {
        let dent = dent?;
        let path = dent.path();
        let ft = dent.file_type()?;
        let id = dent.file_name().to_str().and_then(parse_hex32);
        let (Some(id), true) = (id, ft.is_file()) else {
            remove_junk(&path, ft.is_dir());
            continue;
        };
        match read_key(&path) {
            Ok(meta) if key_id(&meta.store_path, &meta.path) != id => {
                warn!(path = %path.display(), "disk cache key file is misnamed; dropped");
            }
            Ok(meta) => match index.entries.get(&meta.sha256) {
                Some(e) if e.size == meta.size => {
                    if let Ok(t) = dent.metadata().and_then(|m| m.modified()) {
                        let at = last_use.entry(meta.sha256).or_insert(t);
                        *at = (*at).max(t);
                    }
                    index.set_key(id, meta);
                    continue;
                }
                Some(e) => warn!(
                    path = %path.display(),
                    sha256 = %hex(&meta.sha256),
                    expected = meta.size,
                    actual = e.size,
                    "disk cache key disagrees with its content's size; dropped"
                ),
                None => debug!(
                    path = %path.display(),
                    sha256 = %hex(&meta.sha256),
                    "disk cache key names missing content; dropped"
                ),
            },
            Err(e) => {
                warn!(path = %path.display(), err = %e, "disk cache key file unreadable; dropped");
            }
        }
        remove_quietly(&path);
        dropped += 1;
    }
    Ok(dropped)
}

fn read_key(path: &Path) -> io::Result<KeyMeta> {
    let mut buf = Vec::new();
    File::open(path)?
        .take(KEY_FILE_MAX + 1)
        .read_to_end(&mut buf)?;
    if buf.len() as u64 > KEY_FILE_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {KEY_FILE_MAX} bytes"),
        ));
    }
    let key: KeyFile = serde_json::from_slice(&buf)?;
    key.into_meta()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "sha256 is not 64 hex digits"))
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// What a read that must not wait for the disk got.
enum NoWait {
    Read(usize),
    /// The page cache lacks the first byte (or a lock on the file is held).
    WouldWait,
    /// The file cannot tell: a memory file, or a file system without `RWF_NOWAIT`.
    CannotTell,
}

/// A `preadv2` with `RWF_NOWAIT`, which also starts reading in what it lacks.
fn read_no_wait(file: &File, buf: &mut [u8], at: u64) -> io::Result<NoWait> {
    use rustix::io::{preadv2, Errno, ReadWriteFlags};
    loop {
        let mut bufs = [io::IoSliceMut::new(&mut *buf)];
        return match preadv2(file, &mut bufs, at, ReadWriteFlags::NOWAIT) {
            Ok(n) => Ok(NoWait::Read(n)),
            Err(Errno::AGAIN) => Ok(NoWait::WouldWait),
            Err(Errno::INTR) => continue,
            Err(Errno::OPNOTSUPP | Errno::NOSYS) => Ok(NoWait::CannotTell),
            Err(e) => Err(e.into()),
        };
    }
}

/// Whether the page cache holds the byte of `file` at `at`. A file that cannot tell
/// counts as held: it is a memory file, or on a file system whose reads this cannot keep
/// from waiting anyway.
pub fn in_page_cache(file: &File, at: u64) -> io::Result<bool> {
    Ok(!matches!(
        read_no_wait(file, &mut [0u8], at)?,
        NoWait::WouldWait
    ))
}

/// Reads into `buf` from `file` at `at` only what the page cache holds: `Ok(None)` if even
/// the first byte is not there (and reading it in has started). A file that cannot tell
/// is read as by `pread`.
pub fn read_at_cached(file: &File, buf: &mut [u8], at: u64) -> io::Result<Option<usize>> {
    match read_no_wait(file, buf, at)? {
        NoWait::Read(n) => Ok(Some(n)),
        NoWait::WouldWait => Ok(None),
        NoWait::CannotTell => loop {
            match file.read_at(buf, at) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r.map(Some),
            }
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::fs::OpenOptions;

    pub(crate) const SP: &str = "/nix/store/ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d-hello-1.0";

    fn meta(store_path: &str, path: &str, bytes: &[u8]) -> KeyMeta {
        KeyMeta {
            store_path: store_path.to_owned(),
            path: path.to_owned(),
            sha256: Sha256::digest(bytes).into(),
            size: bytes.len() as u64,
            executable: true,
            linkage: "static".to_owned(),
        }
    }

    /// Keeps `bytes` as `SP`'s `path`.
    pub(crate) fn put(cache: &DiskCache, path: &str, bytes: &[u8]) -> (KeyMeta, Stored) {
        put_at(cache, SP, path, bytes)
    }

    fn put_at(cache: &DiskCache, sp: &str, path: &str, bytes: &[u8]) -> (KeyMeta, Stored) {
        let mut tmp = NamedTempFile::new_in(cache.tmp_dir()).unwrap();
        tmp.write_all(bytes).unwrap();
        let m = meta(sp, path, bytes);
        let stored = cache.insert(tmp, m.clone()).unwrap();
        (m, stored)
    }

    fn content(cache: &DiskCache, m: &KeyMeta) -> PathBuf {
        cache.layout.content(&m.sha256)
    }

    /// Makes `m` look last used at `secs` to a restart: its content written then, and its
    /// key last marked then.
    fn set_last_use(cache: &DiskCache, m: &KeyMeta, secs: u64) {
        set_mtime(&content(cache, m), secs);
        set_mtime(&cache.layout.key(&key_id(&m.store_path, &m.path)), secs);
    }

    fn set_mtime(path: &Path, secs: u64) {
        let f = File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap();
    }

    fn count_files(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<DiskCache>();
    }

    #[test]
    fn inserted_file_is_found_by_key_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let (m, stored) = put(&cache, "bin/hello", b"hello world");
        assert_eq!(stored, Stored::Written { evicted: 0 });
        assert!(stored.is_stored());
        assert_eq!(cache.lookup(SP, "bin/hello"), Some(m.clone()));
        assert_eq!(cache.lookup(SP, "bin/other"), None);
        let mut f = cache.open_file(&m.sha256).unwrap().unwrap();
        let mut s = Vec::new();
        f.read_to_end(&mut s).unwrap();
        assert_eq!(s, b"hello world");
        assert_eq!(
            cache.read_all(&m.sha256, true).unwrap().unwrap(),
            b"hello world"
        );
        assert_eq!(cache.stats(), (1, 11));
        let name = content(&cache, &m);
        assert_eq!(
            name.file_name().unwrap().to_str().unwrap(),
            hex(&m.sha256),
            "content is named by its hash"
        );
        assert_eq!(
            count_files(cache.tmp_dir()),
            0,
            "temp files were renamed away"
        );
    }

    #[test]
    fn identical_content_under_two_keys_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let other = "/nix/store/00000000000000000000000000000000-other";
        let (a, s1) = put(&cache, "bin/a", b"same bytes");
        let (b, s2) = put_at(&cache, other, "bin/b", b"same bytes");
        assert_eq!(s1, Stored::Written { evicted: 0 });
        assert_eq!(s2, Stored::Shared);
        assert_eq!(cache.stats(), (1, 10));
        assert_eq!(cache.lookup(SP, "bin/a"), Some(a));
        assert_eq!(cache.lookup(other, "bin/b"), Some(b.clone()));
        assert_eq!(count_files(&cache.layout.keys), 2);
        assert_eq!(count_files(cache.tmp_dir()), 0);
        // Dropping the content drops every key naming it.
        assert!(cache.remove(&b.sha256));
        assert_eq!(cache.lookup(SP, "bin/a"), None);
        assert_eq!(cache.lookup(other, "bin/b"), None);
        assert_eq!(count_files(&cache.layout.keys), 0);
        assert_eq!(cache.stats(), (0, 0));
        assert!(!cache.remove(&b.sha256));
    }

    #[test]
    fn eviction_takes_the_least_recently_opened_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 30).unwrap();
        let (a, _) = put(&cache, "a", &[b'a'; 10]);
        let (b, _) = put(&cache, "b", &[b'b'; 10]);
        let (c, _) = put(&cache, "c", &[b'c'; 10]);
        // `a` is the oldest insert, but opening it makes `b` the least recently used.
        assert!(cache.open_file(&a.sha256).unwrap().is_some());
        let (d, stored) = put(&cache, "d", &[b'd'; 10]);
        assert_eq!(stored, Stored::Written { evicted: 1 });
        assert_eq!(cache.lookup(SP, "b"), None);
        assert!(!content(&cache, &b).exists());
        assert!(cache.open_file(&b.sha256).unwrap().is_none());
        for m in [&a, &c, &d] {
            assert!(cache.lookup(SP, &m.path).is_some(), "{} kept", m.path);
        }
        assert_eq!(cache.stats(), (3, 30));
        // read_all counts as a use too: now `a` is the oldest use.
        assert!(cache.read_all(&c.sha256, true).unwrap().is_some());
        assert!(cache.read_all(&d.sha256, true).unwrap().is_some());
        let (_, stored) = put(&cache, "e", &[b'e'; 20]);
        assert_eq!(stored, Stored::Written { evicted: 2 });
        assert_eq!(cache.lookup(SP, "a"), None);
        assert_eq!(cache.lookup(SP, "c"), None);
        assert!(cache.lookup(SP, "d").is_some());
        assert_eq!(count_files(&cache.layout.keys), 2);
    }

    #[test]
    fn file_larger_than_the_capacity_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 8).unwrap();
        let (small, _) = put(&cache, "small", b"1234");
        let (big, stored) = put(&cache, "big", b"123456789");
        assert_eq!(stored, Stored::TooLarge);
        assert!(!stored.is_stored());
        assert_eq!(cache.lookup(SP, "big"), None);
        assert!(cache.open_file(&big.sha256).unwrap().is_none());
        assert!(
            cache.lookup(SP, &small.path).is_some(),
            "nothing evicted for it"
        );
        assert_eq!(count_files(cache.tmp_dir()), 0, "its temp file is gone");
    }

    #[test]
    fn insert_rejects_a_file_whose_size_disagrees_with_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let mut tmp = NamedTempFile::new_in(cache.tmp_dir()).unwrap();
        tmp.write_all(b"abc").unwrap();
        let mut m = meta(SP, "x", b"abc");
        m.size = 2;
        let err = cache.insert(tmp, m).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(cache.stats(), (0, 0));
    }

    #[test]
    fn a_key_can_be_repointed_at_new_content() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let (old, _) = put(&cache, "bin/x", b"old");
        let (new, _) = put(&cache, "bin/x", b"new!");
        assert_eq!(cache.lookup(SP, "bin/x"), Some(new));
        // The old content no longer owns the key: dropping it leaves the key alone.
        assert!(cache.remove(&old.sha256));
        assert!(cache.lookup(SP, "bin/x").is_some());
        drop(cache);
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            cache
                .read_all(&cache.lookup(SP, "bin/x").unwrap().sha256, true)
                .unwrap()
                .unwrap(),
            b"new!"
        );
    }

    /// Overwrites the start of `m`'s content file in place, keeping its size.
    fn scribble(cache: &DiskCache, m: &KeyMeta, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        let path = content(cache, m);
        let before = Stamp::of(&fs::metadata(&path).unwrap());
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        // Until the write shows in the file's state: with coarse timestamps, a write in the
        // same clock tick as the last check leaves the ctime as it was.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            f.write_all_at(bytes, 0).unwrap();
            if Stamp::of(&fs::metadata(&path).unwrap()) != before {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the ctime never moved"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Bit rot: flips a bit of `m`'s content and makes the recorded state the file's new
    /// one, as a disk changing bytes under the file system leaves it (no ctime moved).
    pub(crate) fn rot(cache: &DiskCache, m: &KeyMeta) {
        let path = content(cache, m);
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] ^= 0x04;
        scribble(cache, m, &bytes);
        let stamp = Stamp::of(&fs::metadata(&path).unwrap());
        cache.lock().entries.get_mut(&m.sha256).unwrap().verified = Some(stamp);
    }

    #[test]
    fn a_scrub_pass_finds_bit_rot_that_reads_do_not_see_and_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let (a, _) = put(&cache, "bin/a", b"alpha");
        let (b, _) = put(&cache, "bin/b", b"bravo!");
        let (c, _) = put(&cache, "bin/c", b"charlie");
        rot(&cache, &b);
        // What a read trusts: the state is as checked, so the bytes are served unchecked.
        let mut served = Vec::new();
        cache
            .open_file(&b.sha256)
            .unwrap()
            .unwrap()
            .read_to_end(&mut served)
            .unwrap();
        assert_ne!(served, b"bravo!");

        let mut after = None;
        let mut seen = Vec::new();
        while let Some(s) = cache.scrub_next(after.as_ref()) {
            seen.push((s.sha256, s.ok));
            after = Some(s.sha256);
        }
        let mut expected = vec![(a.sha256, true), (b.sha256, false), (c.sha256, true)];
        expected.sort();
        assert_eq!(seen, expected, "each file once, in hash order");
        assert!(cache.open_file(&b.sha256).unwrap().is_none());
        assert_eq!(cache.lookup(SP, "bin/b"), None, "its key went with it");
        assert!(!content(&cache, &b).exists());
        assert!(cache.lookup(SP, "bin/a").is_some() && cache.lookup(SP, "bin/c").is_some());
        let stats = cache.scrub_stats();
        assert_eq!((stats.files, stats.bytes), (3, 18));
        assert_eq!((stats.corrupt_scrub, stats.corrupt_read), (1, 0));
    }

    #[test]
    fn content_that_cannot_be_read_is_dropped_by_a_scrub() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let (a, _) = put(&cache, "bin/a", b"alpha");
        // A directory where the file was: it opens, and reading it fails.
        let path = content(&cache, &a);
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        let s = cache.scrub_next(None).unwrap();
        assert!(!s.ok);
        assert_eq!(cache.lookup(SP, "bin/a"), None);
        assert!(cache.scrub_next(Some(&s.sha256)).is_none());
    }

    /// A tmpfs of `size` mounted on a temp dir while this lives (root only).
    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        fn mount(size: &str) -> Option<Tmpfs> {
            if !rustix::process::geteuid().is_root() {
                eprintln!("skipped: mounting a tmpfs needs root");
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status();
            match status {
                Ok(s) if s.success() => Some(Tmpfs(dir)),
                other => {
                    eprintln!("skipped: cannot mount a tmpfs: {other:?}");
                    None
                }
            }
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn a_keep_on_a_full_file_system_evicts_the_oldest_and_tries_again() {
        let Some(fs) = Tmpfs::mount("1m") else {
            return;
        };
        // 1/64 of the capacity is less than the file: its size is what is freed.
        let cache = DiskCache::open(fs.0.path().join("cache"), 4 << 20).unwrap();
        let (old, _) = put(&cache, "bin/old", &[1u8; 100_000]);
        let (kept, _) = put(&cache, "bin/kept", &[2u8; 100_000]);
        // The new file is written; then something else fills the file system, so that
        // its key file cannot be.
        let bytes = vec![3u8; 100_000];
        let mut tmp = NamedTempFile::new_in(cache.tmp_dir()).unwrap();
        tmp.write_all(&bytes).unwrap();
        let mut filler = File::create(fs.0.path().join("filler")).unwrap();
        while filler.write_all(&[0u8; 4096]).is_ok() {}
        let m = meta(SP, "bin/new", &bytes);
        let stored = cache.insert(tmp, m.clone()).unwrap();
        assert!(stored.is_stored(), "{stored:?}");
        assert_eq!(cache.lookup(SP, "bin/new"), Some(m));
        assert_eq!(cache.lookup(SP, "bin/old"), None, "the oldest was evicted");
        assert!(!content(&cache, &old).exists());
        assert!(
            cache.lookup(SP, &kept.path).is_some(),
            "only as much as needed"
        );
        assert_eq!(cache.health().failures(WriteFailure::Full), 1);
        assert!(cache.health().degraded().is_none(), "the retry worked");
    }

    #[test]
    fn a_file_changed_in_place_after_its_check_is_dropped_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        // Checked when written, and (after a restart) when first read.
        let (written, _) = {
            let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
            put(&cache, "bin/a", b"alpha")
        };
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let (fresh, _) = put(&cache, "bin/b", b"bravo");
        for (m, read_whole) in [(&written, true), (&fresh, false)] {
            let read = |cache: &DiskCache| {
                if read_whole {
                    cache.read_all(&m.sha256, true).unwrap()
                } else {
                    cache.open_file(&m.sha256).unwrap().map(|mut f| {
                        let mut v = Vec::new();
                        f.read_to_end(&mut v).unwrap();
                        v
                    })
                }
            };
            let good = read(&cache).unwrap();
            assert_eq!(read(&cache).unwrap(), good, "served again unchanged");
            let mut bad = good.clone();
            bad[0] ^= 0x20;
            scribble(&cache, m, &bad);
            assert_eq!(read(&cache), None, "{} served changed", m.path);
            assert_eq!(cache.lookup(SP, &m.path), None, "{} kept", m.path);
        }
    }

    #[test]
    fn restart_serves_files_and_keys_from_disk_without_inserts() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
            let (a, _) = put(&cache, "bin/a", b"alpha");
            let (b, _) = put(&cache, "lib/b", b"bravo!");
            (a, b)
        };
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(cache.stats(), (2, 11));
        assert_eq!(cache.lookup(SP, "bin/a"), Some(a.clone()));
        assert_eq!(cache.lookup(SP, "lib/b"), Some(b.clone()));
        assert_eq!(cache.read_all(&a.sha256, true).unwrap().unwrap(), b"alpha");
        let mut s = String::new();
        cache
            .open_file(&b.sha256)
            .unwrap()
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "bravo!", "the re-hash left the file at its start");
        // Verified once, it stays verified and servable.
        assert!(cache.open_file(&b.sha256).unwrap().is_some());
    }

    #[test]
    fn restart_recovers_use_order_from_content_and_key_mtimes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = {
            let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
            let (a, _) = put(&cache, "a", &[1; 10]);
            let (b, _) = put(&cache, "b", &[2; 10]);
            let (c, _) = put(&cache, "c", &[3; 10]);
            // `a` was written first and used last (its key marked since).
            set_last_use(&cache, &a, 500);
            set_mtime(&cache.layout.key(&key_id(SP, "a")), 3_000);
            set_last_use(&cache, &b, 1_000);
            set_last_use(&cache, &c, 2_000);
            (a, b, c)
        };
        let cache = DiskCache::open(dir.path(), 30).unwrap();
        let (_, stored) = put(&cache, "d", &[4; 10]);
        assert_eq!(stored, Stored::Written { evicted: 1 });
        assert_eq!(cache.lookup(SP, "b"), None, "oldest mtime goes first");
        assert!(cache.lookup(SP, &a.path).is_some());
        assert!(cache.lookup(SP, &c.path).is_some());
        assert!(!content(&cache, &b).exists());
    }

    #[test]
    fn a_use_refreshes_its_key_files_mtime_and_never_writes_the_content_file() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let (a, _) = put(&cache, "a", b"aaa");
        let (key, data) = (cache.layout.key(&key_id(SP, "a")), content(&cache, &a));
        // An old content mtime, as after a restart a day later: not something to refresh.
        set_mtime(&data, 1_000);
        let state = Stamp::of(&fs::metadata(&data).unwrap());
        let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        // The key was written just now: a use marks the index only.
        set_mtime(&key, 1_000);
        assert!(matches!(cache.mark_used(SP, "a"), Marked::Done));
        assert_eq!(mtime(&key), old);
        // A period later, the key file is due too.
        cache.lock().marked.insert(key_id(SP, "a"), old);
        let Marked::KeyFile(mark) = cache.mark_used(SP, "a") else {
            panic!("the key file's mtime is due");
        };
        mark.write();
        assert!(mtime(&key) > SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000));
        assert!(matches!(cache.mark_used(SP, "a"), Marked::Done));
        assert!(matches!(cache.mark_used(SP, "no-such-key"), Marked::Done));
        // Busy: nothing marked, nothing waited for.
        let held = cache.lock();
        assert!(matches!(cache.mark_used(SP, "a"), Marked::Busy));
        drop(held);
        // Opens (the first hashes the file again: its mtime was set from outside) and uses
        // leave the content file as it was.
        assert!(cache.open_file(&a.sha256).unwrap().is_some());
        assert!(cache.read_all(&a.sha256, true).unwrap().is_some());
        assert_eq!(mtime(&data), old);
        assert_eq!(Stamp::of(&fs::metadata(&data).unwrap()), state);
    }

    #[test]
    fn capacity_is_enforced_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = {
            let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
            let (a, _) = put(&cache, "a", &[1; 10]);
            let (b, _) = put(&cache, "b", &[2; 10]);
            let (c, _) = put(&cache, "c", &[3; 10]);
            set_last_use(&cache, &a, 1_000);
            set_last_use(&cache, &b, 3_000);
            set_last_use(&cache, &c, 2_000);
            (a, b, c)
        };
        let cache = DiskCache::open(dir.path(), 15).unwrap();
        assert_eq!(cache.stats(), (1, 10));
        assert!(
            cache.lookup(SP, &b.path).is_some(),
            "most recently used kept"
        );
        for m in [&a, &c] {
            assert_eq!(cache.lookup(SP, &m.path), None);
            assert!(!content(&cache, m).exists());
        }
        assert_eq!(count_files(&cache.layout.keys), 1);
        drop(cache);
        let cache = DiskCache::open(dir.path(), 0).unwrap();
        assert_eq!(cache.stats(), (0, 0));
        assert_eq!(count_files(&cache.layout.keys), 0);
    }

    #[test]
    fn stale_temp_files_are_removed_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let tmp = cache.tmp_dir().to_owned();
        fs::write(tmp.join(".tmpAbC123"), b"half written").unwrap();
        fs::create_dir(tmp.join("leftover")).unwrap();
        fs::write(tmp.join("leftover/x"), b"x").unwrap();
        drop(cache);
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(count_files(cache.tmp_dir()), 0);
        assert_eq!(cache.stats(), (0, 0));
    }

    #[test]
    fn flipped_byte_is_caught_on_first_open_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let m = {
            let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
            let (m, _) = put(&cache, "bin/a", b"precious bytes");
            let path = content(&cache, &m);
            let mut bytes = fs::read(&path).unwrap();
            bytes[3] ^= 0x20;
            fs::write(&path, bytes).unwrap();
            m
        };
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert!(
            cache.lookup(SP, "bin/a").is_some(),
            "same size: only a re-hash can tell"
        );
        assert!(cache.open_file(&m.sha256).unwrap().is_none());
        assert_eq!(cache.lookup(SP, "bin/a"), None, "its key went with it");
        assert!(!content(&cache, &m).exists());
        assert_eq!(count_files(&cache.layout.keys), 0);
        assert_eq!(cache.stats(), (0, 0));
    }

    #[test]
    fn flipped_byte_is_caught_by_read_all_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let m = {
            let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
            let (m, _) = put(&cache, "bin/a", b"precious bytes");
            let path = content(&cache, &m);
            let mut bytes = fs::read(&path).unwrap();
            bytes[0] ^= 1;
            fs::write(&path, bytes).unwrap();
            m
        };
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert!(cache.read_all(&m.sha256, true).unwrap().is_none());
        assert_eq!(cache.lookup(SP, "bin/a"), None);
        assert_eq!(cache.stats(), (0, 0));
    }

    #[test]
    fn truncated_entry_is_dropped_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let m = {
            let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
            let (m, _) = put(&cache, "bin/a", b"precious bytes");
            let f = OpenOptions::new()
                .write(true)
                .open(content(&cache, &m))
                .unwrap();
            f.set_len(4).unwrap();
            m
        };
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        // The key disagrees with the file's size, so it is dropped at start-up; the content
        // is dropped on its first open.
        assert_eq!(cache.lookup(SP, "bin/a"), None);
        assert!(cache.open_file(&m.sha256).unwrap().is_none());
        assert!(!content(&cache, &m).exists());
        assert_eq!(count_files(&cache.layout.keys), 0);
        assert_eq!(cache.stats(), (0, 0));
    }

    #[test]
    fn size_change_is_caught_without_restart() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let (a, _) = put(&cache, "bin/a", b"precious bytes");
        let (b, _) = put(&cache, "bin/b", b"other bytes");
        let mut f = OpenOptions::new()
            .append(true)
            .open(content(&cache, &a))
            .unwrap();
        f.write_all(b"!").unwrap();
        OpenOptions::new()
            .write(true)
            .open(content(&cache, &b))
            .unwrap()
            .set_len(3)
            .unwrap();
        assert!(cache.open_file(&a.sha256).unwrap().is_none());
        assert!(cache.read_all(&b.sha256, true).unwrap().is_none());
        assert_eq!(cache.lookup(SP, "bin/a"), None);
        assert_eq!(cache.lookup(SP, "bin/b"), None);
        assert_eq!(cache.stats(), (0, 0));
        assert_eq!(count_files(&cache.layout.keys), 0);
    }

    #[test]
    fn deleted_content_is_a_miss_and_drops_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let (a, _) = put(&cache, "bin/a", b"here today");
        fs::remove_file(content(&cache, &a)).unwrap();
        assert!(cache.open_file(&a.sha256).unwrap().is_none());
        assert_eq!(cache.lookup(SP, "bin/a"), None);
        assert_eq!(cache.stats(), (0, 0));
    }

    #[test]
    fn keys_naming_missing_content_are_dropped_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
            let (a, _) = put(&cache, "bin/a", b"gone soon");
            put(&cache, "bin/b", b"staying");
            fs::remove_file(content(&cache, &a)).unwrap();
        }
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(cache.lookup(SP, "bin/a"), None);
        assert!(cache.lookup(SP, "bin/b").is_some());
        assert_eq!(count_files(&cache.layout.keys), 1);
    }

    #[test]
    fn invalid_keys_and_junk_names_are_removed_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let (good, keys, files) = {
            let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
            let (good, _) = put(&cache, "bin/good", b"good");
            put(&cache, "bin/bad", b"bad");
            fs::write(
                cache.layout.key(&key_id(SP, "bin/bad")),
                b"{\"store_path\": ",
            )
            .unwrap();
            (good, cache.layout.keys.clone(), cache.layout.files.clone())
        };
        let shard = files.join(hex(&good.sha256[..1]));
        let upper = hex(&good.sha256).to_uppercase();
        // Junk: not hex, upper-case hex, wrong shard, a symlink, a stray file in files/.
        fs::write(keys.join("not-a-key.json"), b"{}").unwrap();
        fs::write(keys.join(&upper), b"{}").unwrap();
        fs::write(shard.join("README"), b"hi").unwrap();
        fs::write(shard.join(&upper), b"good").unwrap();
        let wrong_shard = files.join(if hex(&good.sha256[..1]) == "00" {
            "01"
        } else {
            "00"
        });
        fs::create_dir_all(&wrong_shard).unwrap();
        fs::write(wrong_shard.join(hex(&good.sha256)), b"good").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", shard.join(hex(&[7u8; 32]))).unwrap();
        fs::write(files.join("stray"), b"x").unwrap();
        // A key file named for a different key: must not shadow the real one.
        let forged = key_id(SP, "bin/forged");
        fs::copy(
            keys.join(hex(&key_id(SP, "bin/good"))),
            keys.join(hex(&forged)),
        )
        .unwrap();

        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(cache.lookup(SP, "bin/good"), Some(good.clone()));
        assert_eq!(cache.lookup(SP, "bin/bad"), None);
        assert_eq!(cache.lookup(SP, "bin/forged"), None);
        assert_eq!(count_files(&keys), 1, "only the good key is left");
        let mut names: Vec<String> = fs::read_dir(&shard)
            .unwrap()
            .map(|d| d.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut expected = vec![hex(&good.sha256)];
        // The content of the bad key may share the shard; it is still valid content.
        let bad_sha: Digest32 = Sha256::digest(b"bad").into();
        if bad_sha[0] == good.sha256[0] {
            expected.push(hex(&bad_sha));
            expected.sort();
        }
        assert_eq!(names, expected);
        assert_eq!(count_files(&wrong_shard), 0);
        assert!(!files.join("stray").exists());
        assert_eq!(cache.stats().0, 2, "good and bad content, nothing else");
        assert_eq!(
            cache.read_all(&good.sha256, true).unwrap().unwrap(),
            b"good"
        );
    }

    #[test]
    fn key_with_a_malformed_hash_is_dropped_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let keys = {
            let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
            let (m, _) = put(&cache, "bin/a", b"aaa");
            let path = cache.layout.key(&key_id(SP, "bin/a"));
            let mut kf = KeyFile::from_meta(&m);
            kf.sha256 = "../../../etc/passwd".into();
            fs::write(path, serde_json::to_vec(&kf).unwrap()).unwrap();
            cache.layout.keys.clone()
        };
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(cache.lookup(SP, "bin/a"), None);
        assert_eq!(count_files(&keys), 0);
    }

    #[test]
    fn parse_hex32_takes_only_64_lower_case_hex_digits() {
        let h = hex(&[0xab; 32]);
        assert_eq!(parse_hex32(&h), Some([0xab; 32]));
        assert_eq!(parse_hex32(&h.to_uppercase()), None);
        assert_eq!(parse_hex32(&h[1..]), None);
        assert_eq!(parse_hex32(&format!("{h}0")), None);
        assert_eq!(parse_hex32(&format!("{}g", &h[1..])), None);
        assert_eq!(parse_hex32(""), None);
    }

    #[test]
    fn key_ids_separate_store_path_from_path() {
        assert_ne!(key_id("/nix/store/a", "b/c"), key_id("/nix/store/a/b", "c"));
    }
}
