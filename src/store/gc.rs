//! `binplz gc`: the storage bound of the operator's cache.
//!
//! Kept: the closure (through narinfo `References`) of every store path the last K loaded
//! indexes name, and of every store path uploaded within the grace period (builds in
//! flight, which no index names yet), with their NARs, listings and logs. Everything else
//! in `nar/`, `*.ls` and `*.narinfo` that is older than the grace period goes, and the
//! `log/` files of the store paths that go; a log no narinfo names as its `Deriver` (a
//! failed build's, whose URL the builder hands out) stays.
//! Then, with a size bound, the least recently built of what is left goes too, oldest
//! first, until the store fits, but never the closure of what the newest index names, and
//! never a path that a path left in the store refers to (its referrers go first).
//!
//! A store path is deleted narinfo first, then its NAR, listing and log: a reader that
//! finds the narinfo always finds the NAR, just as while publishing. A NAR, listing or log
//! written again since the listing (a publication running now) is left alone; with a grace
//! period of 0, a publication that skipped a file as already there can still lose it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime};

use futures_util::stream::{self, StreamExt, TryStreamExt};

use super::{Fault, Object, Store, StoreError};
use crate::index::Index;
use crate::upstream::MAX_NARINFO_SIZE;

/// Narinfos read at once.
const NARINFO_READS: usize = 16;

/// Objects deleted at once.
const DELETES: usize = 16;

pub struct GcOptions {
    /// The loaded indexes; only the `keep_revisions` newest (by creation time) count.
    pub indexes: Vec<Index>,
    /// How many of the newest indexes count; `None`: all of them.
    pub keep_revisions: Option<usize>,
    /// Anything uploaded within this long ago is kept.
    pub grace: Duration,
    /// Delete the least recently built until the store holds at most this many bytes.
    pub max_size: Option<u64>,
    /// Delete for real; otherwise only report.
    pub delete: bool,
    /// The time "now" is, for the grace period.
    pub now: SystemTime,
    /// Called with each key just before it is read (narinfos) or deleted; an `Err` stops
    /// the collection there. For tests and operators' drills.
    pub fault: Option<Fault>,
}

impl std::fmt::Debug for GcOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcOptions")
            .field("indexes", &self.indexes.len())
            .field("keep_revisions", &self.keep_revisions)
            .field("grace", &self.grace)
            .field("max_size", &self.max_size)
            .field("delete", &self.delete)
            .field("now", &self.now)
            .field("fault", &self.fault.is_some())
            .finish()
    }
}

/// One object to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doomed {
    pub key: String,
    pub size: u64,
}

/// What gc found (and, with `delete`, did).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// In deletion order: each store path's narinfo before its other files.
    pub doomed: Vec<Doomed>,
    /// Store paths whose narinfo is deleted.
    pub paths_deleted: usize,
    pub bytes_freed: u64,
    pub paths_kept: usize,
    pub bytes_kept: u64,
    /// Bytes over `max_size` that could not be freed: the newest index's closure alone
    /// is larger.
    pub over_max_size: u64,
}

/// One store path as the store holds it.
#[derive(Debug)]
struct Entry {
    narinfo: Object,
    nar: Option<String>,
    references: Vec<String>,
    deriver: Option<String>,
}

/// The 32-character hash part of a store path or a store path's base name.
fn hash_of(path: &str) -> Option<&str> {
    let base = path.strip_prefix("/nix/store/").unwrap_or(path);
    let hash = base.get(..32)?;
    hash.chars()
        .all(|c| c.is_ascii_alphanumeric())
        .then_some(hash)
}

fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// What gc needs of the narinfo `o`, whose body is `bytes`.
fn entry(o: &Object, bytes: &[u8]) -> Entry {
    let text = String::from_utf8_lossy(bytes);
    let nar = field(&text, "URL").map(|u| u.split('?').next().unwrap_or(u).to_owned());
    let references = field(&text, "References")
        .unwrap_or("")
        .split_whitespace()
        .filter_map(hash_of)
        .map(str::to_owned)
        .collect();
    let deriver = field(&text, "Deriver")
        .filter(|d| *d != "unknown-deriver")
        .map(|d| d.rsplit('/').next().unwrap_or(d).to_owned());
    Entry {
        narinfo: o.clone(),
        nar,
        references,
        deriver,
    }
}

/// Plans (and with `opts.delete` does) a collection of `store`.
pub async fn gc(store: &Store, opts: GcOptions) -> Result<GcReport, StoreError> {
    let objects = store.list().await?;
    let by_key: HashMap<&str, &Object> = objects.iter().map(|o| (o.key.as_str(), o)).collect();
    let narinfo_objects = objects
        .iter()
        .filter_map(|o| Some((o.key.strip_suffix(".narinfo")?, o)))
        .filter(|(hash, _)| !hash.contains('/'));
    // Narinfos are read a few at a time: a bucket holds one per store path, and each is a
    // round trip. Each is parsed into its entry as it arrives, so only the narinfos being
    // read are held, never all of them.
    let opts_ref = &opts;
    let entries: BTreeMap<String, Entry> = stream::iter(narinfo_objects)
        .map(|(hash, o)| async move {
            fault(opts_ref, &o.key)?;
            let bytes = store.read_small(&o.key, MAX_NARINFO_SIZE as u64).await?;
            // None: deleted since the listing.
            Ok::<_, StoreError>(bytes.map(|b| (hash.to_owned(), entry(o, &b))))
        })
        .buffer_unordered(NARINFO_READS)
        .try_filter_map(|e| async move { Ok(e) })
        .try_collect()
        .await?;

    let now = opts
        .now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let grace = i64::try_from(opts.grace.as_secs()).unwrap_or(i64::MAX);
    let young = |o: &Object| o.modified > now.saturating_sub(grace);

    let mut indexes: Vec<&Index> = opts.indexes.iter().collect();
    indexes.sort_by_key(|i| std::cmp::Reverse(i.metadata().created));
    indexes.truncate(opts.keep_revisions.unwrap_or(usize::MAX));
    let roots_of = |index: &Index| -> Vec<String> {
        index
            .store_paths()
            .filter_map(hash_of)
            .map(str::to_owned)
            .collect()
    };
    let protected = closure(
        &entries,
        indexes.first().map(|i| roots_of(i)).unwrap_or_default(),
    );
    let mut roots: Vec<String> = indexes.iter().flat_map(|i| roots_of(i)).collect();
    roots.extend(
        entries
            .iter()
            .filter(|(_, e)| young(&e.narinfo))
            .map(|(h, _)| h.clone()),
    );
    let kept = closure(&entries, roots);

    // The files each kept store path needs.
    let files_of = |hash: &str, e: &Entry| -> Vec<String> {
        let mut files = vec![e.narinfo.key.clone(), format!("{hash}.ls")];
        files.extend(e.nar.clone());
        files.extend(e.deriver.as_ref().map(|d| format!("log/{d}")));
        files
    };
    // How many kept store paths need each file (a NAR or a build log may be shared).
    let mut needed: HashMap<String, usize> = HashMap::new();
    for h in &kept {
        if let Some(e) = entries.get(h) {
            for f in files_of(h, e) {
                *needed.entry(f).or_default() += 1;
            }
        }
    }
    // Logs some narinfo names: the others are failed builds' (no narinfo ever names them).
    let derived_logs: HashSet<String> = entries
        .values()
        .filter_map(|e| e.deriver.as_ref())
        .map(|d| format!("log/{d}"))
        .collect();
    let collectable = |key: &str| {
        key.starts_with("nar/")
            || derived_logs.contains(key)
            || (!key.contains('/') && (key.ends_with(".narinfo") || key.ends_with(".ls")))
    };
    let mut doomed_keys: HashSet<String> = objects
        .iter()
        .filter(|o| collectable(&o.key) && !young(o) && !needed.contains_key(&o.key))
        .map(|o| o.key.clone())
        .collect();

    let mut over_max_size = 0;
    if let Some(max) = opts.max_size {
        let mut total: u64 = objects
            .iter()
            .filter(|o| !doomed_keys.contains(&o.key))
            .map(|o| o.size)
            .sum();
        // How many surviving store paths refer to each one: a path goes only once nothing
        // left needs it, or a kept narinfo would name a missing reference and Nix could
        // not substitute it.
        let surviving = |h: &String| kept.contains(h) && entries.contains_key(h);
        let mut referrers: HashMap<&str, usize> = HashMap::new();
        for (hash, e) in entries.iter().filter(|(h, _)| surviving(h)) {
            for r in e.references.iter().filter(|r| *r != hash) {
                *referrers.entry(r.as_str()).or_default() += 1;
            }
        }
        let candidate = |h: &str| kept.contains(h) && !protected.contains(h);
        // Least recently built first among those: the narinfo is uploaded last, so its
        // time is the build's.
        let mut ready: BinaryHeap<Reverse<(i64, &str)>> = entries
            .iter()
            .filter(|(h, _)| candidate(h) && !referrers.contains_key(h.as_str()))
            .map(|(h, e)| Reverse((e.narinfo.modified, h.as_str())))
            .collect();
        while let Some(Reverse((_, hash))) = ready.pop() {
            if total <= max {
                break;
            }
            let Some(e) = entries.get(hash) else {
                continue;
            };
            for r in e.references.iter().filter(|r| *r != hash) {
                if let Some(n) = referrers.get_mut(r.as_str()) {
                    *n -= 1;
                    if *n == 0 {
                        referrers.remove(r.as_str());
                        if let Some(re) = entries.get(r).filter(|_| candidate(r)) {
                            ready.push(Reverse((re.narinfo.modified, r.as_str())));
                        }
                    }
                }
            }
            for key in files_of(hash, e) {
                let Some(n) = needed.get_mut(&key) else {
                    continue;
                };
                *n -= 1;
                if *n == 0 {
                    needed.remove(&key);
                    if let Some(o) = by_key.get(key.as_str()) {
                        if doomed_keys.insert(key) {
                            total = total.saturating_sub(o.size);
                        }
                    }
                }
            }
        }
        over_max_size = total.saturating_sub(max);
    }

    // Deletion order: every doomed narinfo first, then the other files.
    let mut doomed: Vec<Doomed> = doomed_keys
        .iter()
        .filter_map(|k| by_key.get(k.as_str()))
        .map(|o| Doomed {
            key: o.key.clone(),
            size: o.size,
        })
        .collect();
    doomed.sort_by_key(|d| (!d.key.ends_with(".narinfo"), d.key.clone()));
    let mut report = GcReport {
        paths_deleted: doomed
            .iter()
            .filter(|d| d.key.ends_with(".narinfo"))
            .count(),
        bytes_freed: doomed.iter().map(|d| d.size).sum(),
        // Saturating: a narinfo deleted between the listing and its reading is doomed
        // without being an entry.
        paths_kept: entries.len().saturating_sub(
            doomed
                .iter()
                .filter(|d| d.key.ends_with(".narinfo"))
                .count(),
        ),
        bytes_kept: objects
            .iter()
            .filter(|o| !doomed_keys.contains(&o.key))
            .map(|o| o.size)
            .sum(),
        over_max_size,
        doomed,
    };
    if opts.delete {
        // Every narinfo is gone before any NAR, listing or log goes.
        let (narinfos, rest): (Vec<&Doomed>, Vec<&Doomed>) = report
            .doomed
            .iter()
            .partition(|d| d.key.ends_with(".narinfo"));
        stream::iter(narinfos)
            .map(|d| async {
                fault(&opts, &d.key)?;
                store.delete(&d.key).await
            })
            .buffer_unordered(DELETES)
            .try_collect::<Vec<()>>()
            .await?;
        // A NAR, listing or log uploaded again since the listing belongs to a publication
        // running now (which found it already there, or sent it again after a narinfo
        // named it): it stays, for a later collection to judge.
        let left: HashSet<String> = stream::iter(rest)
            .map(|d| async {
                let listed = by_key.get(d.key.as_str()).map(|o| o.modified);
                let now = store.modified(&d.key).await?;
                if now.is_some() && now > listed {
                    return Ok(Some(d.key.clone()));
                }
                fault(&opts, &d.key)?;
                store.delete(&d.key).await.map(|()| None)
            })
            .buffer_unordered(DELETES)
            .try_filter_map(|left| async move { Ok(left) })
            .try_collect()
            .await?;
        // The report says what was done: what was left alone is kept.
        for d in report.doomed.iter().filter(|d| left.contains(&d.key)) {
            report.bytes_freed = report.bytes_freed.saturating_sub(d.size);
            report.bytes_kept += d.size;
        }
        report.doomed.retain(|d| !left.contains(&d.key));
    }
    Ok(report)
}

fn fault(opts: &GcOptions, key: &str) -> Result<(), StoreError> {
    match &opts.fault {
        Some(f) => f(key).map_err(|reason| StoreError::Interrupted {
            key: key.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The hashes reachable from `roots` through `References` (roots without a narinfo are
/// kept as names, so a path being uploaded now is not lost).
fn closure(entries: &BTreeMap<String, Entry>, roots: Vec<String>) -> HashSet<String> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut queue: VecDeque<String> = roots.into();
    while let Some(hash) = queue.pop_front() {
        if !seen.insert(hash.clone()) {
            continue;
        }
        if let Some(e) = entries.get(&hash) {
            queue.extend(e.references.iter().cloned());
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_take_the_nar_key_reference_hashes_and_deriver_of_a_narinfo() {
        let o = Object {
            key: "ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d.narinfo".into(),
            size: 1,
            modified: 7,
        };
        let text = "StorePath: /nix/store/ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d-hello-1.0\n\
                    URL: nar/abc.nar.zst?hash=x\n\
                    References: ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d-hello-1.0 short \
                    zpya58m9bxib49ddjq6jdk22xiy6219w-busybox\n\
                    Deriver: xc1rp0dgaw8xwlkc5akmjbj4r87fi5wm-hello-1.0.drv\n";
        let e = entry(&o, text.as_bytes());
        assert_eq!(e.narinfo, o);
        assert_eq!(e.nar.as_deref(), Some("nar/abc.nar.zst"));
        assert_eq!(
            e.references,
            [
                "ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d",
                "zpya58m9bxib49ddjq6jdk22xiy6219w"
            ]
        );
        assert_eq!(
            e.deriver.as_deref(),
            Some("xc1rp0dgaw8xwlkc5akmjbj4r87fi5wm-hello-1.0.drv")
        );
        let unknown = entry(&o, b"URL: nar/a.nar\nDeriver: unknown-deriver\n");
        assert_eq!(unknown.deriver, None);
        assert!(unknown.references.is_empty());
    }

    #[test]
    fn hashes_come_from_full_paths_and_base_names() {
        let h = "ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d";
        assert_eq!(hash_of(&format!("/nix/store/{h}-hello-1.0")), Some(h));
        assert_eq!(hash_of(&format!("{h}-hello-1.0")), Some(h));
        assert_eq!(hash_of("short"), None);
        assert_eq!(hash_of("../../../../../../../../../../etc/passwd"), None);
    }
}
