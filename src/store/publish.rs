//! Publishing a staging cache (what `nix copy --to file://STAGING?secret-key=…` wrote) to
//! the store, in an order that keeps every reader safe.
//!
//! A narinfo is what makes a store path visible, so it goes last: `nix-cache-info` first
//! (only if the store has none), then NARs, `.ls` listings, `log/*` and any other file,
//! then each narinfo, once the NAR it names is in the store, after the narinfos of its
//! references. An upload that stops
//! half-way (a crash, a network failure) leaves NARs nobody names, which `gc` deletes
//! later, and never a narinfo without its NAR. Files the store already holds are skipped
//! (binary cache files are content- or store-path-addressed: same name, same content);
//! each narinfo's NAR is looked for once more just before the narinfo goes up, and sent
//! again if a concurrent `gc` deleted it meanwhile.
//! Once everything is in the store the staging files are removed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::stream::{self, StreamExt, TryStreamExt};

use super::{Store, StoreError};
use crate::upstream::{CachePath, MAX_NARINFO_SIZE};

/// Files larger than this go up in parts (Nix's own S3 uploads use multipart from 5 MiB).
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 16 << 20;

/// Files uploaded at once (each large one also sends its parts a few at a time).
const UPLOADS: usize = 4;

/// What `nix-cache-info` says when the staging cache has none.
const CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";

/// Called with each key just before it is uploaded; an `Err` stops the publication there,
/// as a crash would. For tests and operators' drills.
pub type Fault = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
pub struct PublishOptions {
    /// Files above this many bytes are uploaded in parts.
    pub multipart_threshold: u64,
    /// Remove the staging files once they are all in the store.
    pub remove_staged: bool,
    pub fault: Option<Fault>,
}

impl Default for PublishOptions {
    fn default() -> Self {
        PublishOptions {
            multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
            remove_staged: true,
            fault: None,
        }
    }
}

impl std::fmt::Debug for PublishOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishOptions")
            .field("multipart_threshold", &self.multipart_threshold)
            .field("remove_staged", &self.remove_staged)
            .field("fault", &self.fault.is_some())
            .finish()
    }
}

/// What a publication did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Published {
    /// Keys uploaded, in upload order.
    pub uploaded: Vec<String>,
    /// Keys the store already held.
    pub skipped: Vec<String>,
    /// Bytes uploaded.
    pub bytes: u64,
}

impl Published {
    fn record(&mut self, key: &str, uploaded: Option<u64>) {
        match uploaded {
            Some(bytes) => {
                self.uploaded.push(key.to_owned());
                self.bytes += bytes;
            }
            None => self.skipped.push(key.to_owned()),
        }
    }
}

/// Uploads the staging cache in `staging` to `store` (see the module documentation for
/// the order and guarantees), then removes the staging files unless told not to. This is
/// what `binplz builder` calls after `nix copy` into its staging directory, and what
/// `binplz publish --from DIR --to URI` runs.
pub async fn publish(
    staging: &Path,
    store: &Store,
    opts: &PublishOptions,
) -> Result<Published, StoreError> {
    let files = staged_files(staging)?;
    store.check().await?;
    let (narinfos, mut data): (Vec<_>, Vec<_>) = files.iter().partition(|(key, _)| is_narinfo(key));
    // NARs first, then listings, logs and the rest: the order readers need is only
    // "all of these before any narinfo"; this one makes a partial upload cheapest to redo.
    data.sort_by_key(|(key, _)| (!key.starts_with("nar/"), key.clone()));
    let mut done = Published::default();
    let staged_info = data.iter().position(|(k, _)| k == "nix-cache-info");
    let info = staged_info.map(|i| data.remove(i));
    if !store.exists("nix-cache-info").await? {
        fault(opts, "nix-cache-info")?;
        match info {
            Some((key, path)) => {
                done.bytes += store.upload(key, path, opts.multipart_threshold).await?;
            }
            None => {
                store
                    .put_bytes("nix-cache-info", CACHE_INFO.as_bytes().to_vec())
                    .await?;
                done.bytes += CACHE_INFO.len() as u64;
            }
        }
        done.uploaded.push("nix-cache-info".to_owned());
    } else {
        done.skipped.push("nix-cache-info".to_owned());
    }
    // A few at a time; every one of them ends before the first narinfo starts.
    let sent: Vec<(&str, Option<u64>)> = stream::iter(&data)
        .map(|(key, path)| async move {
            Ok::<_, StoreError>((key.as_str(), send(store, key, path, opts).await?))
        })
        .buffer_unordered(UPLOADS)
        .try_collect()
        .await?;
    for (key, bytes) in sent {
        done.record(key, bytes);
    }
    let mut texts = Vec::with_capacity(narinfos.len());
    for (key, path) in narinfos {
        let text = std::fs::read(path).map_err(|err| StoreError::Local {
            path: path.display().to_string(),
            err,
        })?;
        texts.push((key, path, text));
    }
    for (key, path, text) in references_first(texts) {
        let nar = nar_key(key, &text)?;
        if store.exists(key).await? {
            done.record(key, None);
            continue;
        }
        fault(opts, key)?;
        // Looked for again right before the narinfo goes up: a `gc` running now may have
        // deleted a NAR that was skipped above as already there.
        if !store.exists(&nar).await? {
            let Some((_, nar_path)) = files.iter().find(|(k, _)| *k == nar) else {
                return Err(StoreError::MissingNar {
                    key: key.clone(),
                    nar,
                    url: store.url().to_owned(),
                });
            };
            let bytes = store
                .upload(&nar, nar_path, opts.multipart_threshold)
                .await?;
            done.record(&nar, Some(bytes));
        }
        let bytes = store.upload(key, path, opts.multipart_threshold).await?;
        done.record(key, Some(bytes));
    }
    if opts.remove_staged {
        remove_staged(staging, &files)?;
    }
    Ok(done)
}

/// [`publish`] to the store at `uri` (`s3://…` or `file:///…`) with the default options and
/// client settings: the one call a builder needs after `nix copy` into `staging`.
pub async fn publish_to(staging: &Path, uri: &str) -> Result<Published, StoreError> {
    let store = Store::open(uri, &crate::upstream::ClientConfig::default())?;
    publish(staging, &store, &PublishOptions::default()).await
}

fn fault(opts: &PublishOptions, key: &str) -> Result<(), StoreError> {
    match &opts.fault {
        Some(f) => f(key).map_err(|reason| StoreError::Interrupted {
            key: key.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Uploads one file unless the store has it: its size when uploaded.
async fn send(
    store: &Store,
    key: &str,
    path: &Path,
    opts: &PublishOptions,
) -> Result<Option<u64>, StoreError> {
    if store.exists(key).await? {
        return Ok(None);
    }
    fault(opts, key)?;
    store
        .upload(key, path, opts.multipart_threshold)
        .await
        .map(Some)
}

/// The staged narinfos in an order where each comes after those of its `References` (as
/// `nix copy` uploads), so a reader never finds a path whose references are missing; ties
/// in key order. A cycle (which Nix never writes, self-references aside) ends in key order.
fn references_first<T>(narinfos: Vec<(&String, T, Vec<u8>)>) -> Vec<(&String, T, Vec<u8>)> {
    let hash = |key: &str| key.strip_suffix(".narinfo").unwrap_or(key).to_owned();
    let staged: HashSet<String> = narinfos.iter().map(|(k, _, _)| hash(k)).collect();
    // For each staged narinfo, the staged references it waits for; and who waits for each.
    let mut waiting: Vec<usize> = Vec::with_capacity(narinfos.len());
    let mut referrers: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, (key, _, text)) in narinfos.iter().enumerate() {
        let own = hash(key);
        let refs: HashSet<String> = String::from_utf8_lossy(text)
            .lines()
            .find_map(|l| l.strip_prefix("References:"))
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|r| r.get(..32))
            .filter(|h| *h != own && staged.contains(*h))
            .map(str::to_owned)
            .collect();
        waiting.push(refs.len());
        for r in refs {
            referrers.entry(r).or_default().push(i);
        }
    }
    let mut ready: BTreeSet<(String, usize)> = narinfos
        .iter()
        .enumerate()
        .filter(|(i, _)| waiting[*i] == 0)
        .map(|(i, (k, _, _))| ((*k).clone(), i))
        .collect();
    let mut order = Vec::with_capacity(narinfos.len());
    while let Some((key, i)) = ready.pop_first() {
        order.push(i);
        for &j in referrers.get(&hash(&key)).into_iter().flatten() {
            waiting[j] -= 1;
            if waiting[j] == 0 {
                ready.insert((narinfos[j].0.clone(), j));
            }
        }
    }
    let placed: HashSet<usize> = order.iter().copied().collect();
    order.extend((0..narinfos.len()).filter(|i| !placed.contains(i)));
    let mut slots: Vec<Option<(&String, T, Vec<u8>)>> = narinfos.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

fn is_narinfo(key: &str) -> bool {
    !key.contains('/') && key.ends_with(".narinfo")
}

/// The store key of the NAR a staged narinfo names (its `URL`, relative to the cache).
fn nar_key(key: &str, text: &[u8]) -> Result<String, StoreError> {
    let bad = |reason| StoreError::BadNarInfo {
        key: key.to_owned(),
        reason,
    };
    if text.len() > MAX_NARINFO_SIZE {
        return Err(bad("too large"));
    }
    let text = std::str::from_utf8(text).map_err(|_| bad("not UTF-8"))?;
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("URL:"))
        .map(str::trim)
        .ok_or(bad("no URL"))?;
    let path = CachePath::parse(url).map_err(|_| bad("URL is not a path in the cache"))?;
    Ok(path.path().to_owned())
}

/// Every regular file under `staging`, as (key, local path), sorted by key.
fn staged_files(staging: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), StoreError> {
        let local = |err| StoreError::Local {
            path: dir.display().to_string(),
            err,
        };
        for entry in std::fs::read_dir(dir).map_err(local)? {
            let entry = entry.map_err(local)?;
            let path = entry.path();
            let kind = entry.file_type().map_err(local)?;
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                let bad = || StoreError::BadName {
                    path: path.display().to_string(),
                };
                let key = path
                    .strip_prefix(root)
                    .ok()
                    .and_then(Path::to_str)
                    .ok_or_else(bad)?
                    .to_owned();
                // The same rules as for what the edges fetch: no dot segments, no query.
                match CachePath::parse(&key) {
                    Ok(p) if p.query().is_none() => out.push((key, path)),
                    _ => return Err(bad()),
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(staging, staging, &mut out)?;
    out.sort();
    Ok(out)
}

/// Removes the published files, then the directories they leave empty (the staging
/// directory itself included).
fn remove_staged(staging: &Path, files: &[(String, PathBuf)]) -> Result<(), StoreError> {
    for (_, path) in files {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(StoreError::Local {
                    path: path.display().to_string(),
                    err,
                })
            }
        }
    }
    // Then every directory left empty, deepest first (`nix copy` also makes directories it
    // leaves empty, such as `log/`). Anything else kept there stays, and so does its
    // directory.
    fn prune(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    prune(&entry.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    prune(staging);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nar_key_is_the_narinfo_url_without_its_query() {
        let text = b"StorePath: /nix/store/x\nURL: nar/abc.nar.zst?hash=1\nNarSize: 1\n";
        assert_eq!(
            nar_key("x.narinfo", text).expect("a URL"),
            "nar/abc.nar.zst"
        );
        assert!(nar_key("x.narinfo", b"StorePath: x\n").is_err());
        assert!(nar_key("x.narinfo", b"URL: ../../etc/passwd\n").is_err());
    }
}
