//! The loaded indexes: one per revision, reloaded when their files change.
//!
//! The newest index (by creation time) answers requests without `?rev=`; older ones stay
//! reachable with `?rev=<revision>`. A file that changed on disk is loaded again; if the
//! new file is bad (corrupt, not a regular file, over the size limit), the old index keeps
//! serving and the error is logged.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use crate::index::Index;

/// Where an index comes from.
pub enum IndexSource {
    File(PathBuf),
    /// Built in memory (the demo).
    Memory(Box<Index>),
}

struct Entry {
    path: Option<PathBuf>,
    stamp: Option<(SystemTime, u64)>,
    index: Arc<Index>,
}

pub struct Indexes {
    entries: RwLock<Vec<Entry>>,
    /// Largest index file read (`--max-index-size`).
    max_size: u64,
}

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Indexes {
    /// Loads every source, files of at most `max_size` bytes; any failure is an error (at
    /// start-up nothing serves yet).
    pub fn load(sources: Vec<IndexSource>, max_size: u64) -> Result<Indexes, String> {
        let mut entries = Vec::new();
        for s in sources {
            entries.push(match s {
                IndexSource::File(path) => {
                    let st = stamp(&path);
                    let index = Index::load(&path, max_size).map_err(|e| e.to_string())?;
                    Entry {
                        path: Some(path),
                        stamp: st,
                        index: Arc::new(index),
                    }
                }
                IndexSource::Memory(index) => Entry {
                    path: None,
                    stamp: None,
                    index: Arc::new(*index),
                },
            });
        }
        Ok(Indexes {
            entries: RwLock::new(entries),
            max_size,
        })
    }

    /// The newest index.
    pub fn current(&self) -> Option<Arc<Index>> {
        let entries = self.entries.read().ok()?;
        entries
            .iter()
            .max_by_key(|e| e.index.metadata().created)
            .map(|e| e.index.clone())
    }

    /// Every loaded index, in the order of the sources.
    pub fn all(&self) -> Vec<Arc<Index>> {
        self.entries
            .read()
            .map(|entries| entries.iter().map(|e| e.index.clone()).collect())
            .unwrap_or_default()
    }

    /// The index of a given Nixpkgs revision.
    pub fn by_revision(&self, rev: &str) -> Option<Arc<Index>> {
        let entries = self.entries.read().ok()?;
        entries
            .iter()
            .find(|e| e.index.metadata().revision.as_deref() == Some(rev))
            .map(|e| e.index.clone())
    }

    /// Reloads the files whose size or modification time changed (all files if `force`).
    pub fn reload(&self, force: bool) {
        let changed: Vec<(usize, PathBuf)> = match self.entries.read() {
            Ok(entries) => entries
                .iter()
                .enumerate()
                .filter_map(|(i, e)| {
                    let path = e.path.as_ref()?;
                    (force || stamp(path) != e.stamp).then(|| (i, path.clone()))
                })
                .collect(),
            Err(_) => return,
        };
        for (i, path) in changed {
            let st = stamp(&path);
            tracing::info!(path = %path.display(), "reloading index");
            match Index::load(&path, self.max_size) {
                Ok(index) => {
                    tracing::info!(path = %path.display(), programs = index.len(), revision = ?index.metadata().revision, "index reloaded");
                    if let Ok(mut entries) = self.entries.write() {
                        if let Some(e) = entries.get_mut(i) {
                            e.index = Arc::new(index);
                            e.stamp = st;
                        }
                    }
                }
                Err(err) => {
                    tracing::error!(path = %path.display(), %err, "new index refused; the old one keeps serving");
                    // Remember the stamp so a bad file is not re-read every poll.
                    if let Ok(mut entries) = self.entries.write() {
                        if let Some(e) = entries.get_mut(i) {
                            e.stamp = st;
                        }
                    }
                }
            }
        }
    }
}
