//! What `binplz bench` measures: NAR files, samples of a binary cache, generated NARs.
//!
//! Every input is held in memory twice, as found (compressed) and as its NAR, so that the
//! measurements time binplz's work and not the disk or the network. A NAR file is decoded
//! and walked once strictly before anything is timed; a cache sample goes through the
//! same checks as any extraction (signed narinfo, StorePath, NAR URL confined to the
//! cache, NarHash and NarSize over a strict walk), and one that fails them is reported as
//! failing verification, never timed.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix_derivation::{StoreDir, StorePath};
use nix_narinfo::NarInfo;

use super::generate::{self, Rng};
use super::recompress::SharedReader;
use crate::codec::{Codec, CodecError};
use crate::error::ErrorKind;
use crate::extract::{ExtractError, Extractor};
use crate::nar::listing::Node;
use crate::nar::Listing;
use crate::pipeline::{list_nar, Expected, PipelineError};
use crate::resolve::RelPath;
use crate::upstream::Cache;

/// Narinfos read to rank a cache's paths by NarSize: the sample is the largest of these.
pub const MAX_RANKED: usize = 10_000;

/// One input, checked and in memory.
pub struct Input {
    /// A file name, a store path, or `100MB (generated)`.
    pub label: String,
    pub kind: InputKind,
    pub nar: Arc<[u8]>,
    pub nar_hash: [u8; 32],
    /// The file the verified pass keeps: `bin/hello` in generated NARs, the largest
    /// regular file in others.
    pub wanted: RelPath,
    pub wanted_size: u64,
    /// The NAR as it was found, and its codec (none for generated NARs).
    pub found: Option<(Codec, Arc<[u8]>)>,
    /// For generated NARs: the name under which their compressed forms are kept.
    pub keep_stem: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    File,
    Cache,
    Generated,
}

/// An input that could not be measured, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub input: String,
    /// The error's class, as binplz's exit statuses name them (`verification failed`).
    pub kind: String,
    pub error: String,
    #[serde(skip)]
    pub error_kind: ErrorKind,
}

impl Failure {
    fn new(input: String, error_kind: ErrorKind, error: String) -> Failure {
        Failure {
            input,
            kind: error_kind.to_string(),
            error,
            error_kind,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {}: {err}", path.display())]
    Read { path: PathBuf, err: io::Error },
    #[error("{}: {err}", path.display())]
    Codec { path: PathBuf, err: CodecError },
    #[error("{}: not a valid NAR: {err}", path.display())]
    Nar { path: PathBuf, err: PipelineError },
    #[error("{}: the NAR holds no regular file", path.display())]
    NoFile { path: PathBuf },
    #[error("{}: the NAR is larger than --max-nar-size ({limit} bytes)", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{url}: cannot list its narinfos over HTTP; name store paths with --store-path")]
    CannotList { url: String },
    #[error("cannot list {}: {err}", path.display())]
    List { path: PathBuf, err: io::Error },
}

/// Why a cache sample was not measured.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error(transparent)]
    Extract(#[from] ExtractError),
    #[error("{store_path}: NarSize {nar_size} is larger than --max-nar-size ({limit} bytes)")]
    TooLarge {
        store_path: String,
        nar_size: u64,
        limit: u64,
    },
    #[error("{store_path}: the NAR holds no regular file")]
    NoFile { store_path: String },
    #[error("{store_path}: {what} failed: {err}")]
    Local {
        store_path: String,
        what: &'static str,
        err: String,
    },
}

impl SampleError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SampleError::Extract(e) => e.kind(),
            SampleError::TooLarge { .. } | SampleError::NoFile { .. } => ErrorKind::Refused,
            SampleError::Local { .. } => ErrorKind::Internal,
        }
    }
}

/// A generated NAR of about `bytes` bytes.
pub fn generated(bytes: u64) -> Input {
    let label = format!("{}", Size(bytes));
    let nar = generate::generate(&label, bytes);
    Input {
        label: format!("{label} (generated)"),
        kind: InputKind::Generated,
        keep_stem: Some(format!(
            "{label}-{}-g{}",
            nar.bytes.len(),
            generate::GENERATOR
        )),
        nar_hash: nar.sha256,
        wanted: RelPath::parse(generate::WANTED.as_bytes()),
        wanted_size: nar.wanted_size,
        nar: nar.bytes,
        found: None,
    }
}

/// A size in MB (10^6 bytes), as the tables print it: `100MB`, `0.3MB`.
pub struct Size(pub u64);

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = self.0 as f64 / 1e6;
        if mb >= 10.0 {
            write!(f, "{mb:.0}MB")
        } else {
            write!(f, "{}MB", (mb * 10.0).round() / 10.0)
        }
    }
}

/// A NAR file, compressed or not (the codec from its first bytes, or `.br` in its name).
pub fn from_file(path: &Path, max_nar_size: u64) -> Result<Input, InputError> {
    let read_err = |err| InputError::Read {
        path: path.to_owned(),
        err,
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(io::Error::other("not a regular file")));
    }
    let data: Arc<[u8]> = std::fs::read(path).map_err(read_err)?.into();
    let name = path.file_name().and_then(|n| n.to_str());
    let codec =
        Codec::sniff(&data[..data.len().min(32)], name).map_err(|err| InputError::Codec {
            path: path.to_owned(),
            err,
        })?;
    let nar = decode_bounded(codec, &data, max_nar_size).map_err(|e| match e {
        Decoded::TooLarge => InputError::TooLarge {
            path: path.to_owned(),
            limit: max_nar_size,
        },
        Decoded::Failed(err) => InputError::Nar {
            path: path.to_owned(),
            err: PipelineError::Decode { codec, err },
        },
    })?;
    let pass = list_nar(
        SharedReader::new(nar.clone()),
        Codec::None,
        Expected::default(),
    )
    .map_err(|err| InputError::Nar {
        path: path.to_owned(),
        err,
    })?;
    let (wanted, wanted_size) = largest_file(&pass.listing).ok_or_else(|| InputError::NoFile {
        path: path.to_owned(),
    })?;
    Ok(Input {
        label: path.display().to_string(),
        kind: InputKind::File,
        nar,
        nar_hash: pass.nar_hash,
        wanted,
        wanted_size,
        found: Some((codec, data)),
        keep_stem: None,
    })
}

enum Decoded {
    TooLarge,
    Failed(io::Error),
}

/// `data` decoded whole, refusing more than `max` bytes of NAR.
fn decode_bounded(codec: Codec, data: &Arc<[u8]>, max: u64) -> Result<Arc<[u8]>, Decoded> {
    let decoder = codec
        .decoder(SharedReader::new(data.clone()))
        .map_err(Decoded::Failed)?;
    let mut out = Vec::new();
    decoder
        .take(max.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(Decoded::Failed)?;
    if out.len() as u64 > max {
        return Err(Decoded::TooLarge);
    }
    Ok(out.into())
}

/// The largest regular file of a listing (the first one in NAR order among equals).
fn largest_file(listing: &Listing) -> Option<(RelPath, u64)> {
    fn walk(node: &Node, at: &mut Vec<Vec<u8>>, best: &mut Option<(RelPath, u64)>) {
        match node {
            Node::Regular { size, .. } => {
                if best.as_ref().is_none_or(|(_, s)| size > s) {
                    *best = Some((RelPath(at.clone()), *size));
                }
            }
            Node::Symlink { .. } => {}
            Node::Directory { entries } => {
                for (name, child) in entries {
                    at.push(name.clone());
                    walk(child, at, best);
                    at.pop();
                }
            }
        }
    }
    let mut best = None;
    walk(&listing.root, &mut Vec::new(), &mut best);
    // A NAR that is one regular file has it at the root: an empty path.
    best
}

/// Which of a cache's paths to measure.
#[derive(Debug, Clone, Copy)]
pub enum Order {
    /// The largest NarSize first.
    Largest,
    /// A random sample, the same for the same seed.
    Random(u64),
}

/// Samples `n` store paths of the one cache of `extractor` (`cache`): those named in
/// `store_paths`, or else every narinfo of a `file://` cache. Each sampled path is
/// fetched and verified; one that fails is a [`Failure`], not an input.
pub async fn sample_cache(
    extractor: &Extractor,
    cache: &Cache,
    store_paths: &[StorePath],
    n: usize,
    order: Order,
    max_nar_size: u64,
) -> Result<Vec<Result<Input, Failure>>, InputError> {
    let mut hashes: Vec<String> = if store_paths.is_empty() {
        list_file_cache(cache.url())?
    } else {
        store_paths
            .iter()
            .map(|p| p.to_basename()[..32].to_owned())
            .collect()
    };
    hashes.sort();
    hashes.dedup();
    // A random sample needs only its own narinfos; the largest NARs need the NarSize of
    // every candidate, so at most MAX_RANKED are read.
    let ranked = match order {
        Order::Largest => MAX_RANKED,
        Order::Random(seed) => {
            let mut rng = Rng::new(seed);
            for i in (1..hashes.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                hashes.swap(i, j);
            }
            n
        }
    };
    let mut out = Vec::new();
    let mut candidates: Vec<(StorePath, u64)> = Vec::new();
    for hash in hashes.iter().take(ranked) {
        // Read only to choose the sample: each chosen path is fetched again and verified.
        match unverified(cache, hash).await {
            Ok(found) => candidates.push(found),
            Err((kind, error)) => out.push(Err(Failure::new(
                format!("{}/{hash}.narinfo", cache.url()),
                kind,
                error,
            ))),
        }
    }
    if let Order::Largest = order {
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    }
    for (store_path, _) in candidates.into_iter().take(n) {
        let label = store_path.to_absolute_path();
        out.push(
            fetch_verified(extractor, &store_path, max_nar_size)
                .await
                .map_err(|e| Failure::new(label, e.kind(), e.to_string())),
        );
    }
    Ok(out)
}

/// The hash parts of every narinfo in a `file://` cache, sorted.
fn list_file_cache(url: &str) -> Result<Vec<String>, InputError> {
    let Some(root) = url.strip_prefix("file://") else {
        return Err(InputError::CannotList {
            url: url.to_owned(),
        });
    };
    let root = Path::new(root);
    let list_err = |err| InputError::List {
        path: root.to_owned(),
        err,
    };
    let mut hashes = Vec::new();
    for entry in std::fs::read_dir(root).map_err(list_err)? {
        let name = entry.map_err(list_err)?.file_name();
        if let Some(hash) = name.to_str().and_then(|n| n.strip_suffix(".narinfo")) {
            if hash.len() == 32 && hash.bytes().all(|b| b.is_ascii_alphanumeric()) {
                hashes.push(hash.to_owned());
            }
        }
    }
    hashes.sort();
    Ok(hashes)
}

/// The store path and NarSize a narinfo claims, before any check.
async fn unverified(cache: &Cache, hash: &str) -> Result<(StorePath, u64), (ErrorKind, String)> {
    let broken = |e: &dyn std::fmt::Display| (ErrorKind::UpstreamBroken, e.to_string());
    let bytes = cache
        .narinfo(hash)
        .await
        .map_err(|e| broken(&e))?
        .ok_or_else(|| (ErrorKind::NotInCache, "not in the cache".to_owned()))?;
    let info = NarInfo::parse_in(&StoreDir::default(), &bytes).map_err(|e| broken(&e))?;
    Ok((info.store_path().clone(), info.nar_size()))
}

/// Largest compressed NAR accepted for a NarSize of `n`: incompressible data grows a
/// little in every codec, never to twice its size.
fn max_compressed(nar_size: u64) -> u64 {
    nar_size.saturating_mul(2).saturating_add(1 << 20)
}

/// The NAR of `store_path`, through the same checks as an extraction.
pub async fn fetch_verified(
    extractor: &Extractor,
    store_path: &StorePath,
    max_nar_size: u64,
) -> Result<Input, SampleError> {
    let label = store_path.to_absolute_path();
    let (cache, info) = extractor.narinfo(store_path).await?;
    if info.nar_size > max_nar_size {
        return Err(SampleError::TooLarge {
            store_path: label,
            nar_size: info.nar_size,
            limit: max_nar_size,
        });
    }
    let Some(mut fetched) = cache
        .nar(info.url(), info.nar_size)
        .await
        .map_err(ExtractError::from)?
    else {
        return Err(ExtractError::NarMissing {
            cache: cache.url().to_owned(),
            store_path: label,
        }
        .into());
    };
    let limit = info.file_size.unwrap_or(max_compressed(info.nar_size));
    let mut data = Vec::new();
    while let Some(chunk) = fetched
        .body
        .next_chunk()
        .await
        .map_err(ExtractError::from)?
    {
        if (data.len() + chunk.len()) as u64 > limit {
            return Err(ExtractError::FileSizeExceeded {
                store_path: label,
                limit,
            }
            .into());
        }
        data.extend_from_slice(&chunk);
    }
    let data: Arc<[u8]> = data.into();
    let expected = Expected {
        nar_hash: Some(info.nar_hash),
        nar_size: Some(info.nar_size),
    };
    let codec = info.codec;
    let (data, pass, nar) = tokio::task::spawn_blocking(move || {
        let pass = list_nar(SharedReader::new(data.clone()), codec, expected);
        let nar = pass
            .as_ref()
            .ok()
            .map(|_| decode_bounded(codec, &data, info.nar_size));
        (data, pass, nar)
    })
    .await
    .map_err(|e| SampleError::Local {
        store_path: label.clone(),
        what: "the verifying thread",
        err: e.to_string(),
    })?;
    let pass = pass.map_err(|err| ExtractError::Pipeline {
        store_path: label.clone(),
        err,
    })?;
    let nar = match nar {
        Some(Ok(nar)) => nar,
        // The pass above decoded the same bytes to NarSize, so this is not the cache's fault.
        _ => {
            return Err(SampleError::Local {
                store_path: label,
                what: "decoding the verified NAR again",
                err: "it did not give NarSize bytes".into(),
            })
        }
    };
    let (wanted, wanted_size) = largest_file(&pass.listing).ok_or_else(|| SampleError::NoFile {
        store_path: label.clone(),
    })?;
    Ok(Input {
        label,
        kind: InputKind::Cache,
        nar,
        nar_hash: pass.nar_hash,
        wanted,
        wanted_size,
        found: Some((codec, data)),
        keep_stem: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn the_file_kept_is_the_largest_regular_one() {
        use crate::nar::writer::{write_nar, Entry};
        let nar: Arc<[u8]> = write_nar(&Entry::dir([
            ("a", Entry::file(vec![0u8; 10])),
            (
                "bin",
                Entry::dir([
                    ("big", Entry::executable(vec![1u8; 30])),
                    ("link", Entry::symlink("big")),
                ]),
            ),
            ("z", Entry::file(vec![2u8; 30])),
        ]))
        .into();
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("t.nar");
        std::fs::write(&path, &nar[..]).expect("writing");
        let input = from_file(&path, 1 << 20).expect("a valid NAR");
        assert_eq!(input.wanted.to_string(), "bin/big");
        assert_eq!(input.wanted_size, 30);
        assert_eq!(
            input.nar_hash,
            <[u8; 32]>::from(sha2::Sha256::digest(&nar[..]))
        );
        assert!(matches!(
            from_file(&path, 10),
            Err(InputError::TooLarge { limit: 10, .. })
        ));
    }

    #[test]
    fn sizes_print_in_mb() {
        assert_eq!(Size(100_000_000).to_string(), "100MB");
        assert_eq!(Size(300_000).to_string(), "0.3MB");
        assert_eq!(Size(7_000_000).to_string(), "7MB");
    }
}
