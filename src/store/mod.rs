//! Writing to and cleaning the operator's own binary cache: the store that the builder
//! fills and the edges read, on S3 (`s3://…`, as Nix writes the URL) or in a directory
//! (`file:///…`).
//!
//! Both sit behind `object_store`'s one trait (list, read, write, delete): S3 through its
//! S3 client, directories through its local store, whose writes go to a temporary file
//! renamed into place, so a reader never sees half a file.
//!
//! ```text
//!  nix copy --to file://STAGING ─► publish: nix-cache-info (once), NARs, .ls, logs,
//!                                          then each narinfo ─► STORE ◄── edges read
//!  indexes ─► gc: closures of what they name (+ grace) kept ─► narinfo, then NAR, .ls, log deleted
//! ```

pub mod command;
pub mod gc;
pub mod publish;

use std::path::Path;
use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;

use crate::error::ErrorKind;
use crate::upstream::s3::{classify, S3Url};
use crate::upstream::{ClientConfig, S3Cause, UpstreamError};

pub use gc::{gc, GcOptions, GcReport};
pub use publish::{publish, publish_to, Fault, PublishOptions, Published};

/// Size of each part of a multipart upload (S3 wants at least 5 MiB but for the last).
const PART_SIZE: usize = 8 << 20;

/// Parts uploaded at once by one multipart upload.
const PART_CONCURRENCY: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store URI {uri:?}: {reason}")]
    InvalidUri { uri: String, reason: &'static str },
    #[error(transparent)]
    Open(#[from] UpstreamError),
    #[error("{url}/{key}: {cause}")]
    Remote {
        url: String,
        key: String,
        cause: S3Cause,
    },
    #[error("{path}: {err}")]
    Local { path: String, err: std::io::Error },
    #[error("{path}: not a name a binary cache holds")]
    BadName { path: String },
    #[error("stopped before {key}: {reason}")]
    Interrupted { key: String, reason: String },
    #[error("{key} names the NAR {nar:?}, which is neither staged nor in {url}")]
    MissingNar {
        key: String,
        nar: String,
        url: String,
    },
    #[error("{key}: not a usable narinfo: {reason}")]
    BadNarInfo { key: String, reason: &'static str },
    #[error("index {path}: {err}")]
    Index { path: String, err: String },
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::InvalidUri { .. }
            | StoreError::Open(_)
            | StoreError::BadName { .. }
            | StoreError::MissingNar { .. }
            | StoreError::Index { .. } => ErrorKind::BadRequest,
            StoreError::Remote { .. } | StoreError::BadNarInfo { .. } => ErrorKind::UpstreamBroken,
            StoreError::Local { .. } | StoreError::Interrupted { .. } => ErrorKind::Internal,
        }
    }
}

/// One object in a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub key: String,
    pub size: u64,
    /// Last modified, in seconds since the Unix epoch: when it was uploaded.
    pub modified: i64,
}

/// A binary cache that binplz writes: S3 or a directory.
#[derive(Debug, Clone)]
pub struct Store {
    /// `s3://BUCKET` or `file:///DIR`, for messages.
    url: String,
    inner: Arc<dyn ObjectStore>,
    /// Whether a missing bucket must be looked for (S3 only).
    s3: bool,
}

impl Store {
    /// Opens `s3://BUCKET?…` (credentials as for reading, see `upstream::s3`) or
    /// `file:///DIR` (created if missing).
    pub fn open(uri: &str, config: &ClientConfig) -> Result<Store, StoreError> {
        let uri = uri.trim_end_matches('/');
        if uri.starts_with("s3://") {
            let parsed = S3Url::parse(uri)?;
            let client = parsed.client(config)?;
            return Ok(Store {
                url: format!("s3://{}", parsed.bucket),
                inner: Arc::new(client),
                s3: true,
            });
        }
        let Some(dir) = uri.strip_prefix("file://").filter(|d| d.starts_with('/')) else {
            return Err(StoreError::InvalidUri {
                uri: uri.to_owned(),
                reason: "expected s3://BUCKET or file:///DIR",
            });
        };
        let local = |err| StoreError::Local {
            path: dir.to_owned(),
            err,
        };
        std::fs::create_dir_all(dir).map_err(local)?;
        let fs = LocalFileSystem::new_with_prefix(dir).map_err(|e| StoreError::Remote {
            url: uri.to_owned(),
            key: String::new(),
            cause: S3Cause::Request { err: e.to_string() },
        })?;
        Ok(Store {
            url: uri.to_owned(),
            inner: Arc::new(fs),
            s3: false,
        })
    }

    /// A store over an S3 client configured by the caller (explicit credentials, say):
    /// `bucket` is for messages and missing-bucket checks.
    pub fn with_s3_client(bucket: &str, client: object_store::aws::AmazonS3) -> Store {
        Store {
            url: format!("s3://{bucket}"),
            inner: Arc::new(client),
            s3: true,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn remote(&self, key: &str, e: &object_store::Error) -> StoreError {
        let cause = match classify(e) {
            Ok(()) => S3Cause::Request { err: e.to_string() },
            Err(cause) => cause,
        };
        StoreError::Remote {
            url: self.url.clone(),
            key: key.to_owned(),
            cause,
        }
    }

    /// Fails unless the bucket exists and can be listed (S3 answers a GET or PUT in a
    /// missing bucket confusingly, and some S3-compatible servers not at all).
    pub async fn check(&self) -> Result<(), StoreError> {
        if !self.s3 {
            return Ok(());
        }
        let prefix = ObjectPath::from("nix-cache-info");
        match self.inner.list_with_delimiter(Some(&prefix)).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Err(StoreError::Remote {
                url: self.url.clone(),
                key: "nix-cache-info".to_owned(),
                cause: S3Cause::NoSuchBucket,
            }),
            Err(e) => Err(self.remote("nix-cache-info", &e)),
        }
    }

    /// Everything the store holds.
    pub async fn list(&self) -> Result<Vec<Object>, StoreError> {
        self.check().await?;
        let metas: Vec<object_store::ObjectMeta> = self
            .inner
            .list(None)
            .try_collect()
            .await
            // `*`: the whole listing, in messages.
            .map_err(|e| self.remote("*", &e))?;
        Ok(metas
            .into_iter()
            .map(|m| Object {
                key: m.location.to_string(),
                size: m.size,
                modified: m.last_modified.timestamp(),
            })
            .collect())
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.inner.head(&ObjectPath::from(key)).await {
            Ok(_) => Ok(true),
            Err(e) => match classify(&e) {
                Ok(()) => Ok(false),
                Err(cause) => Err(StoreError::Remote {
                    url: self.url.clone(),
                    key: key.to_owned(),
                    cause,
                }),
            },
        }
    }

    /// When `key` was last written (seconds since the Unix epoch); `None` when it does not
    /// exist.
    pub async fn modified(&self, key: &str) -> Result<Option<i64>, StoreError> {
        match self.inner.head(&ObjectPath::from(key)).await {
            Ok(meta) => Ok(Some(meta.last_modified.timestamp())),
            Err(e) => match classify(&e) {
                Ok(()) => Ok(None),
                Err(_) => Err(self.remote(key, &e)),
            },
        }
    }

    /// Reads a small object whole (a narinfo); `None` when it does not exist.
    pub async fn read_small(&self, key: &str, limit: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let result = match self.inner.get(&ObjectPath::from(key)).await {
            Ok(r) => r,
            Err(e) => {
                return match classify(&e) {
                    Ok(()) => Ok(None),
                    Err(_) => Err(self.remote(key, &e)),
                }
            }
        };
        if result.meta.size > limit {
            return Err(StoreError::BadNarInfo {
                key: key.to_owned(),
                reason: "too large",
            });
        }
        let bytes = result.bytes().await.map_err(|e| self.remote(key, &e))?;
        Ok(Some(bytes.to_vec()))
    }

    /// Writes `bytes` to `key`.
    pub async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.inner
            .put(&ObjectPath::from(key), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.remote(key, &e))
    }

    /// Uploads the local file `from` to `key`: in one request up to `multipart_threshold`
    /// bytes, in parts of [`PART_SIZE`] above (never the whole file in memory). Returns its
    /// size.
    pub async fn upload(
        &self,
        key: &str,
        from: &Path,
        multipart_threshold: u64,
    ) -> Result<u64, StoreError> {
        let local = |err| StoreError::Local {
            path: from.display().to_string(),
            err,
        };
        let mut file = tokio::fs::File::open(from).await.map_err(local)?;
        let size = file.metadata().await.map_err(local)?.len();
        if size <= multipart_threshold {
            let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            file.read_to_end(&mut bytes).await.map_err(local)?;
            self.put_bytes(key, bytes).await?;
            return Ok(size);
        }
        let location = ObjectPath::from(key);
        let upload = self
            .inner
            .put_multipart(&location)
            .await
            .map_err(|e| self.remote(key, &e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut buf = vec![0u8; PART_SIZE];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(local(e));
                }
            };
            if let Err(e) = writer.wait_for_capacity(PART_CONCURRENCY).await {
                let _ = writer.abort().await;
                return Err(self.remote(key, &e));
            }
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(|e| self.remote(key, &e))?;
        Ok(size)
    }

    /// Deletes `key`; one already gone is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.inner.delete(&ObjectPath::from(key)).await {
            Ok(()) => Ok(()),
            Err(e) => match classify(&e) {
                Ok(()) => Ok(()),
                Err(_) => Err(self.remote(key, &e)),
            },
        }
    }
}
