//! The file tiers in front of the upstream: memory (moka, weighted by bytes), then the
//! disk cache, then one single-flight extraction per `(store path, path)`.
//!
//! ```text
//!  get(store path, path) ─► disk key map ─► memory (by SHA-256) ─► hit
//!                                      └──► disk file (checked) ─► hit (small files also
//!                                                                   go to memory)
//!                       └─ miss ─► single flight ─► extract (verified) ─► disk insert ─► again
//! ```

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

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
pub enum Content {
    Memory(Bytes),
    Disk(std::fs::File),
}

pub struct Hit {
    pub meta: KeyMeta,
    pub content: Content,
    /// Where it came from: `memory`, `disk` or `upstream`.
    pub tier: &'static str,
}

/// A failed flight carries the path it was started for: its error may be about that file
/// alone, and not about the other files of the store path that callers were waiting for.
type FlightResult = Result<(), (String, Arc<ExtractError>)>;

/// Flights a caller starts or joins before giving up.
const MAX_FLIGHTS: usize = 3;

pub struct Files {
    memory: moka::future::Cache<[u8; 32], Bytes>,
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
            .weigher(|_k: &[u8; 32], v: &Bytes| u32::try_from(v.len()).unwrap_or(u32::MAX))
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
        let Some(meta) = self.disk.lookup(store_path, path) else {
            return Ok(None);
        };
        if let Some(bytes) = self.memory.get(&meta.sha256).await {
            return Ok(Some(Hit {
                meta,
                content: Content::Memory(bytes),
                tier: "memory",
            }));
        }
        let disk = self.disk.clone();
        let (sha, small) = (meta.sha256, meta.size <= self.memory_item_max);
        let content = tokio::task::spawn_blocking(move || -> std::io::Result<Option<Content>> {
            if small {
                Ok(disk
                    .read_all(&sha)?
                    .map(|v| Content::Memory(Bytes::from(v))))
            } else {
                Ok(disk.open_file(&sha)?.map(Content::Disk))
            }
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(match content {
            None => None, // dropped as corrupt: the caller fetches it again
            Some(Content::Memory(b)) => {
                self.memory.insert(meta.sha256, b.clone()).await;
                Some(Hit {
                    meta,
                    content: Content::Memory(b),
                    tier: "disk",
                })
            }
            Some(c) => Some(Hit {
                meta,
                content: c,
                tier: "disk",
            }),
        })
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
