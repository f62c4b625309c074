//! `file:///path` caches: a directory laid out like any binary cache.

use std::io;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;

use super::{Body, BoxFuture, CachePath, Fetched, Upstream, UpstreamError};

const READ_CHUNK: usize = 256 << 10;

#[derive(Debug)]
pub struct FileUpstream {
    url: String,
    root: PathBuf,
}

impl FileUpstream {
    pub fn new(url: &str, root: PathBuf) -> Self {
        FileUpstream {
            url: url.to_owned(),
            root,
        }
    }
}

impl Upstream for FileUpstream {
    fn url(&self) -> &str {
        &self.url
    }

    fn get<'a>(
        &'a self,
        path: &'a CachePath,
    ) -> BoxFuture<'a, Result<Option<Fetched>, UpstreamError>> {
        Box::pin(async move {
            // CachePath has no `..`, absolute or empty segments, so this stays under root.
            let full = self.root.join(path.path());
            let err = |e: io::Error| UpstreamError::Io {
                url: format!("{}/{path}", self.url),
                err: e.to_string(),
            };
            let file = match tokio::fs::File::open(&full).await {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(err(e)),
            };
            let meta = file.metadata().await.map_err(err)?;
            if !meta.is_file() {
                return Ok(None);
            }
            Ok(Some(Fetched {
                len: Some(meta.len()),
                body: Box::new(FileBody {
                    file,
                    url: format!("{}/{path}", self.url),
                }),
            }))
        })
    }
}

struct FileBody {
    file: tokio::fs::File,
    url: String,
}

impl Body for FileBody {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, UpstreamError>> {
        Box::pin(async move {
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            let n = self
                .file
                .read_buf(&mut buf)
                .await
                .map_err(|e| UpstreamError::Io {
                    url: self.url.clone(),
                    err: e.to_string(),
                })?;
            Ok((n > 0).then(|| buf.freeze()))
        })
    }
}
