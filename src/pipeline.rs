//! One verified pass over a NAR: decode, hash, parse, and keep one file.
//!
//! ```text
//!   source (file, or HTTP body via a channel)
//!      │
//!      ▼  decode thread: codec ─► take(NarSize + 1) ─► 256 KiB chunks
//!   bounded channel (CHANNEL_DEPTH chunks)
//!      │
//!      ▼  this thread: SHA-256 + byte count ─► strict NAR reader ─► visitor
//!                                                 ├─ listing of the whole tree
//!                                                 └─ the wanted file ─► temp file (+ its SHA-256)
//! ```
//!
//! Decoding and hashing are the two costs (parsing is negligible), so they get a thread
//! each: on two cores the pass runs at the speed of the slower one. Both are synchronous
//! codecs and must stay off the async reactor. Nothing is trusted until [`run_pass`]
//! returns: the caller gets the temp file only after NarHash and NarSize matched.

use std::collections::HashSet;
use std::io::{self, BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use sha2::{Digest, Sha256};

use crate::codec::Codec;
use crate::nar::listing::{ListingBuilder, TooManyEntries};
use crate::nar::reader::{FileMeta, Visitor};
use crate::nar::{read_nar, Listing, NarError};
use crate::resolve::RelPath;

/// Size of the decoded chunks handed from the decode thread to the hash thread.
const CHUNK: usize = 256 << 10;
/// Chunks in flight between the threads (4 MiB): enough to absorb the hash thread's
/// slower stretch while it also writes the wanted file out.
const CHANNEL_DEPTH: usize = 16;

/// What the NAR must be, from a verified narinfo (or `--nar-hash` for a local file).
#[derive(Debug, Clone, Copy, Default)]
pub struct Expected {
    pub nar_hash: Option<[u8; 32]>,
    pub nar_size: Option<u64>,
}

/// The wanted file, in a temp file, verified with the whole NAR.
#[derive(Debug)]
pub struct Captured {
    pub path: RelPath,
    pub file: tempfile::NamedTempFile,
    pub size: u64,
    pub executable: bool,
    /// The file's SHA-256, when the pass computed it (see [`Siblings`]).
    pub sha256: Option<[u8; 32]>,
}

/// The SHA-256 of a file, read from the start. Used on captured files whose pass did not
/// hash them (outside the server's mode, see [`Siblings`]), after their NAR was verified,
/// while their bytes are still in the page cache.
pub fn sha256_of(file: &std::fs::File) -> io::Result<[u8; 32]> {
    use std::os::unix::fs::FileExt;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    loop {
        let n = match file.read_at(&mut buf, pos) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hasher.finalize().into())
}

#[derive(Debug)]
pub struct PassResult {
    pub listing: Listing,
    pub captured: Option<Captured>,
    /// Sibling files kept along the way (see [`Siblings`]).
    pub extras: Vec<Captured>,
    pub nar_hash: [u8; 32],
    pub nar_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Reading the (compressed) input failed: network or disk, not the bytes.
    #[error("reading the NAR failed: {0}")]
    Source(io::Error),
    #[error("{codec} decompression failed: {err}")]
    Decode { codec: Codec, err: io::Error },
    #[error("the NAR is longer than its NarSize of {limit} bytes")]
    TooLong { limit: u64 },
    #[error(transparent)]
    Nar(NarError),
    #[error("NarSize mismatch: expected {expected} bytes, got {got}")]
    SizeMismatch { expected: u64, got: u64 },
    /// More entries than a listing holds ([`crate::nar::listing::MAX_LISTING_ENTRIES`]).
    #[error("{0}")]
    TooManyEntries(TooManyEntries),
    #[error("NarHash mismatch: expected sha256:{expected}, got sha256:{got}")]
    HashMismatch { expected: String, got: String },
    /// Writing the output or keeping the listing failed.
    #[error("{0}")]
    Local(io::Error),
    /// A temp file for a wanted file could not be created or written in `dir`: the local
    /// disk's fault, not the NAR's. Told apart so that a server can write elsewhere.
    #[error("cannot write a temp file in {}: {err}", dir.display())]
    TempFile { dir: PathBuf, err: io::Error },
}

/// Marks an error of a temp file being written, so it survives the trip through the NAR
/// reader as an `io::Error` (of the same kind) and becomes [`PipelineError::TempFile`].
#[derive(Debug)]
struct TempFileError {
    dir: PathBuf,
    err: io::Error,
}
impl std::fmt::Display for TempFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.err.fmt(f)
    }
}
impl std::error::Error for TempFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.err)
    }
}

fn temp_file_error(dir: &Path, err: io::Error) -> io::Error {
    let kind = err.kind();
    io::Error::new(
        kind,
        TempFileError {
            dir: dir.to_owned(),
            err,
        },
    )
}

/// Marks an error as coming from the input source, so it survives the trip through a
/// decoder and the NAR reader as an `io::Error` and is still told apart at the end.
#[derive(Debug)]
pub struct SourceError(pub io::Error);
impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[derive(Debug)]
struct DecodeError(io::Error);
impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::error::Error for DecodeError {}

#[derive(Debug)]
struct TooLongError;
impl std::fmt::Display for TooLongError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NAR longer than NarSize")
    }
}
impl std::error::Error for TooLongError {}

/// Tags every error of the source as a [`SourceError`].
struct Tagged<R>(R);
impl<R: Read> Read for Tagged<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            if e.get_ref().is_some_and(|i| i.is::<SourceError>()) {
                e
            } else {
                io::Error::other(SourceError(e))
            }
        })
    }
}

/// Runs one pass over a NAR read from `source` (compressed with `codec`), keeping the file
/// at `wanted` (following relative symlinks met on the way) in a temp file in `tmp_dir`.
pub fn run_pass<R: Read + Send + 'static>(
    source: R,
    codec: Codec,
    expected: Expected,
    wanted: &RelPath,
    tmp_dir: &Path,
) -> Result<PassResult, PipelineError> {
    run(source, codec, expected, Some(wanted), None, tmp_dir)
}

/// Which other files a pass keeps besides the wanted one, so that requests for other
/// programs of the same store path need no second download: the executables directly in
/// `dir` (normally `bin`) and the targets of relative symlinks there that come later in
/// the archive, each at most `max_each` bytes and `max_total` in all. This is the server's
/// mode, and there the kept files are also hashed during the pass: the server needs their
/// SHA-256 (their name in the disk cache) before it can answer, and reading them back
/// afterwards would delay the first byte more than the pass slows down.
#[derive(Debug, Clone)]
pub struct Siblings {
    pub dir: Vec<u8>,
    pub max_each: u64,
    pub max_total: u64,
}

/// [`run_pass`], also keeping `siblings`.
pub fn run_pass_with_siblings<R: Read + Send + 'static>(
    source: R,
    codec: Codec,
    expected: Expected,
    wanted: &RelPath,
    siblings: Option<&Siblings>,
    tmp_dir: &Path,
) -> Result<PassResult, PipelineError> {
    run(source, codec, expected, Some(wanted), siblings, tmp_dir)
}

/// A verified pass that only lists the NAR (for the index builder): no file is kept.
pub fn list_nar<R: Read + Send + 'static>(
    source: R,
    codec: Codec,
    expected: Expected,
) -> Result<PassResult, PipelineError> {
    run(source, codec, expected, None, None, Path::new("."))
}

fn run<R: Read + Send + 'static>(
    source: R,
    codec: Codec,
    expected: Expected,
    wanted: Option<&RelPath>,
    siblings: Option<&Siblings>,
    tmp_dir: &Path,
) -> Result<PassResult, PipelineError> {
    // One byte more than NarSize is enough to tell "too long" without decoding a bomb.
    let cap = expected.nar_size.map(|s| s.saturating_add(1));
    // Every codec, `none` included, gets a reading/decoding thread: reading the source
    // then overlaps with hashing and parsing.
    let input = {
        {
            let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(CHANNEL_DEPTH);
            let (recycle_tx, recycle_rx) = mpsc::channel::<Vec<u8>>();
            // Detached on purpose: if the hash side stops early it drops the receiver, and
            // the decode thread ends at its next send instead of being waited for.
            std::thread::Builder::new()
                .name("binplz-decode".into())
                .spawn(move || decode_thread(Tagged(source), codec, cap, tx, recycle_rx))
                .map_err(PipelineError::Local)?;
            HashedInput::channel(rx, recycle_tx, cap)
        }
    };
    let mut visitor = PassVisitor {
        listing: ListingBuilder::new(),
        guess: wanted.cloned(),
        captured: None,
        siblings: siblings.map(|s| SiblingState {
            budget: s.max_total,
            config: s.clone(),
            targets: HashSet::new(),
        }),
        extras: Vec::new(),
        tmp_dir,
    };
    let mut input = input;
    let read = read_nar(&mut input, expected.nar_size, &mut visitor);
    let (hash, count) = input.finish();
    if let Err(e) = read {
        return Err(classify(e, codec, expected));
    }
    if let Some(size) = expected.nar_size {
        if count != size {
            return Err(PipelineError::SizeMismatch {
                expected: size,
                got: count,
            });
        }
    }
    if let Some(want) = expected.nar_hash {
        if want != hash {
            return Err(PipelineError::HashMismatch {
                expected: crate::hash::nix32(&want),
                got: crate::hash::nix32(&hash),
            });
        }
    }
    let listing = visitor
        .listing
        .finish()
        .ok_or_else(|| PipelineError::Local(io::Error::other("empty NAR listing")))?;
    Ok(PassResult {
        listing,
        captured: visitor.captured,
        extras: visitor.extras,
        nar_hash: hash,
        nar_size: count,
    })
}

fn classify(e: NarError, codec: Codec, expected: Expected) -> PipelineError {
    let NarError::Io(io) = e else {
        return PipelineError::Nar(e);
    };
    let Some(inner) = io.get_ref() else {
        return PipelineError::Local(io);
    };
    if inner.is::<SourceError>() {
        let src = io
            .into_inner()
            .and_then(|b| b.downcast::<SourceError>().ok());
        return match src {
            Some(s) => PipelineError::Source(s.0),
            None => PipelineError::Local(io::Error::other("source error")),
        };
    }
    if inner.is::<TempFileError>() {
        return match io.into_inner().map(|b| b.downcast::<TempFileError>()) {
            Some(Ok(t)) => PipelineError::TempFile {
                dir: t.dir,
                err: t.err,
            },
            _ => PipelineError::Local(io::Error::other("temp file error")),
        };
    }
    if let Some(t) = inner.downcast_ref::<TooManyEntries>() {
        return PipelineError::TooManyEntries(TooManyEntries { limit: t.limit });
    }
    if inner.is::<TooLongError>() {
        return PipelineError::TooLong {
            limit: expected.nar_size.unwrap_or(0),
        };
    }
    if inner.is::<DecodeError>() {
        let err = io
            .into_inner()
            .and_then(|b| b.downcast::<DecodeError>().ok())
            .map_or_else(|| io::Error::other("decoder failed"), |d| d.0);
        return PipelineError::Decode { codec, err };
    }
    PipelineError::Local(io)
}

fn decode_thread<R: Read + Send>(
    source: R,
    codec: Codec,
    cap: Option<u64>,
    tx: mpsc::SyncSender<io::Result<Vec<u8>>>,
    recycle: mpsc::Receiver<Vec<u8>>,
) {
    let decoder = match codec.decoder(source) {
        Ok(d) => d,
        Err(e) => {
            let _ = tx.send(Err(io::Error::other(DecodeError(e))));
            return;
        }
    };
    let mut decoder = decoder.take(cap.unwrap_or(u64::MAX));
    loop {
        let mut buf = recycle
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        buf.resize(CHUNK, 0);
        let mut filled = 0;
        let res = loop {
            match decoder.read(&mut buf[filled..]) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    filled += n;
                    if filled == buf.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        buf.truncate(filled);
        if filled > 0 && tx.send(Ok(buf)).is_err() {
            return;
        }
        match res {
            Ok(()) if filled == 0 => return, // end of stream: dropping tx signals it
            Ok(()) => {}
            Err(e) => {
                let tagged = if e.get_ref().is_some_and(|i| i.is::<SourceError>()) {
                    e
                } else {
                    io::Error::other(DecodeError(e))
                };
                let _ = tx.send(Err(tagged));
                return;
            }
        }
    }
}

/// The hash side's input: hashes and counts every byte as it arrives, then hands the bytes
/// to the NAR reader without another copy.
struct HashedInput {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    recycle: mpsc::Sender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    hasher: Sha256,
    count: u64,
    cap: Option<u64>,
}

impl HashedInput {
    fn channel(
        rx: mpsc::Receiver<io::Result<Vec<u8>>>,
        recycle: mpsc::Sender<Vec<u8>>,
        cap: Option<u64>,
    ) -> Self {
        Self {
            rx,
            recycle,
            cur: Vec::new(),
            pos: 0,
            hasher: Sha256::new(),
            count: 0,
            cap,
        }
    }
    fn finish(self) -> ([u8; 32], u64) {
        (self.hasher.finalize().into(), self.count)
    }
}

impl Read for HashedInput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for HashedInput {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos == self.cur.len() {
            let next = match self.rx.recv() {
                Ok(chunk) => chunk?,
                Err(_) => Vec::new(), // decode thread finished: end of stream
            };
            let old = std::mem::replace(&mut self.cur, next);
            let _ = self.recycle.send(old);
            self.pos = 0;
            self.hasher.update(&self.cur);
            self.count += self.cur.len() as u64;
            if let Some(cap) = self.cap {
                if self.count >= cap {
                    return Err(io::Error::other(TooLongError));
                }
            }
        }
        Ok(&self.cur[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        self.pos = (self.pos + amt).min(self.cur.len());
    }
}

/// Builds the listing and keeps the wanted file.
struct PassVisitor<'a> {
    listing: ListingBuilder,
    /// Where the wanted file is thought to be, updated when a relative symlink on the way
    /// is met before its target (archive order is sorted, so targets often come later).
    guess: Option<RelPath>,
    captured: Option<Captured>,
    siblings: Option<SiblingState>,
    extras: Vec<Captured>,
    tmp_dir: &'a Path,
}

struct SiblingState {
    config: Siblings,
    budget: u64,
    /// Where relative symlinks in the directory point, for targets still to come.
    targets: HashSet<Vec<Vec<u8>>>,
}

/// `target` resolved lexically from `dir`; `None` if it climbs above the root.
fn join_relative(dir: &[Vec<u8>], target: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = dir.to_vec();
    for c in RelPath::parse(target).0 {
        if c == b".." {
            out.pop()?;
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// Copies a file's contents into a new temp file in `dir`, hashing them on the way.
fn capture(
    dir: &Path,
    path: &[Vec<u8>],
    meta: FileMeta,
    contents: &mut dyn BufRead,
    hash: bool,
) -> io::Result<Captured> {
    let mut hasher = hash.then(Sha256::new);
    let mut file = tempfile::Builder::new()
        .prefix(".binplz-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| temp_file_error(dir, e))?;
    loop {
        let buf = contents.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        if let Some(h) = &mut hasher {
            h.update(buf);
        }
        file.write_all(buf).map_err(|e| temp_file_error(dir, e))?;
        let n = buf.len();
        contents.consume(n);
    }
    Ok(Captured {
        path: RelPath(path.to_vec()),
        file,
        size: meta.size,
        executable: meta.executable,
        sha256: hasher.map(|h| h.finalize().into()),
    })
}

impl Visitor for PassVisitor<'_> {
    fn directory(&mut self, path: &[Vec<u8>]) -> io::Result<()> {
        self.listing.directory(path)
    }

    fn symlink(&mut self, path: &[Vec<u8>], target: &[u8]) -> io::Result<()> {
        self.listing.symlink(path, target)?;
        if let Some(sib) = &mut self.siblings {
            if let [dir, _] = path {
                if *dir == sib.config.dir && !target.starts_with(b"/") {
                    if let Some(t) = join_relative(&path[..1], target) {
                        sib.targets.insert(t);
                    }
                }
            }
        }
        let Some(guess) = self.guess.as_ref().map(|g| &g.0) else {
            return Ok(());
        };
        if !target.starts_with(b"/") && path.len() <= guess.len() && guess[..path.len()] == *path {
            let mut next: Vec<Vec<u8>> = path[..path.len().saturating_sub(1)].to_vec();
            let mut ok = !path.is_empty();
            for c in RelPath::parse(target)
                .0
                .into_iter()
                .chain(guess[path.len()..].iter().cloned())
            {
                if c == b".." {
                    ok &= next.pop().is_some();
                } else {
                    next.push(c);
                }
            }
            if ok {
                self.guess = Some(RelPath(next));
            }
        }
        Ok(())
    }

    fn file(
        &mut self,
        path: &[Vec<u8>],
        meta: FileMeta,
        contents: &mut dyn BufRead,
    ) -> io::Result<()> {
        self.listing.file(path, meta, contents)?;
        if self.captured.is_none() && self.guess.as_ref().is_some_and(|g| path == g.0.as_slice()) {
            let hash = self.siblings.is_some();
            self.captured = Some(capture(self.tmp_dir, path, meta, contents, hash)?);
            return Ok(());
        }
        if let Some(sib) = &mut self.siblings {
            let in_dir = matches!(path, [dir, _] if *dir == sib.config.dir);
            if meta.executable
                && (in_dir || sib.targets.contains(path))
                && meta.size <= sib.config.max_each
                && meta.size <= sib.budget
            {
                sib.budget -= meta.size;
                self.extras
                    .push(capture(self.tmp_dir, path, meta, contents, true)?);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nar::writer::{write_nar, Entry};

    fn nar() -> Vec<u8> {
        write_nar(&Entry::dir([
            (
                "bin",
                Entry::dir([("tool", Entry::symlink("../libexec/tool"))]),
            ),
            (
                "libexec",
                Entry::dir([("tool", Entry::executable(vec![42u8; 100_000]))]),
            ),
        ]))
    }

    #[test]
    fn a_nar_over_the_listing_cap_is_refused_not_an_internal_error() {
        let over = NarError::Io(io::Error::other(TooManyEntries { limit: 3 }));
        let err = classify(over, Codec::None, Expected::default());
        assert!(
            matches!(&err, PipelineError::TooManyEntries(t) if t.limit == 3),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "the NAR has more than 3 entries");
        let e = crate::extract::ExtractError::Pipeline {
            store_path: "/nix/store/x".into(),
            err,
        };
        assert_eq!(e.kind(), crate::error::ErrorKind::Refused);
    }

    fn expected(nar: &[u8]) -> Expected {
        Expected {
            nar_hash: Some(Sha256::digest(nar).into()),
            nar_size: Some(nar.len() as u64),
        }
    }

    fn run(data: Vec<u8>, codec: Codec, exp: Expected) -> Result<PassResult, PipelineError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = run_pass(
            io::Cursor::new(data),
            codec,
            exp,
            &RelPath::parse(b"bin/tool"),
            dir.path(),
        );
        if r.is_err() {
            assert_eq!(
                std::fs::read_dir(dir.path()).expect("dir").count(),
                0,
                "temp file left behind"
            );
        }
        r
    }

    #[test]
    fn wanted_file_is_captured_through_a_symlink_met_first() {
        let nar = nar();
        for codec in [Codec::None, Codec::Zstd] {
            let data = if codec == Codec::Zstd {
                zstd::encode_all(nar.as_slice(), 3).expect("zstd")
            } else {
                nar.clone()
            };
            let pass = run(data, codec, expected(&nar)).expect("verified");
            let mut c = pass.captured.expect("captured");
            std::io::Seek::rewind(c.file.as_file_mut()).expect("rewind");
            assert_eq!(c.path, RelPath::parse(b"libexec/tool"));
            assert!(c.executable);
            // The directory is gone, but the open temp file is still readable.
            let mut bytes = Vec::new();
            c.file.as_file().read_to_end(&mut bytes).expect("read");
            assert_eq!(bytes, vec![42u8; 100_000]);
            assert_eq!(pass.nar_size, nar.len() as u64);
        }
    }

    #[test]
    fn a_temp_file_that_cannot_be_made_is_a_temp_file_error_naming_its_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let gone = dir.path().join("gone");
        let nar = nar();
        let err = run_pass(
            io::Cursor::new(nar.clone()),
            Codec::None,
            expected(&nar),
            &RelPath::parse(b"bin/tool"),
            &gone,
        )
        .expect_err("no directory to write in");
        assert!(
            matches!(&err, PipelineError::TempFile { dir, err }
                if *dir == gone && err.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        let e = crate::extract::ExtractError::Pipeline {
            store_path: "/nix/store/x".into(),
            err,
        };
        assert_eq!(e.kind(), crate::error::ErrorKind::Internal);
    }

    #[test]
    fn hash_and_size_mismatches_are_refused() {
        let nar = nar();
        let mut exp = expected(&nar);
        exp.nar_hash = Some([0; 32]);
        assert!(matches!(
            run(nar.clone(), Codec::None, exp),
            Err(PipelineError::HashMismatch { .. })
        ));
        let mut exp = expected(&nar);
        exp.nar_size = Some(nar.len() as u64 + 8);
        assert!(matches!(
            run(nar.clone(), Codec::None, exp),
            Err(PipelineError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn a_decompression_bomb_stops_at_nar_size_plus_one() {
        // 64 MiB of zeros behind a valid NAR prefix, claiming to be a 1 KiB NAR.
        let mut data = nar();
        data.resize(64 << 20, 0);
        let bomb = zstd::encode_all(data.as_slice(), 3).expect("zstd");
        assert!(bomb.len() < 1 << 20);
        let exp = Expected {
            nar_hash: None,
            nar_size: Some(1024),
        };
        let r = run(bomb, Codec::Zstd, exp);
        assert!(
            matches!(
                r,
                Err(PipelineError::TooLong { limit: 1024 }) | Err(PipelineError::Nar(_))
            ),
            "{r:?}"
        );
    }

    #[test]
    fn data_after_the_nar_is_refused() {
        let mut data = nar();
        data.extend_from_slice(&[0; 8]);
        let r = run(data, Codec::None, Expected::default());
        assert!(
            matches!(r, Err(PipelineError::Nar(NarError::TrailingData { .. }))),
            "{r:?}"
        );
    }

    #[test]
    fn corrupt_compressed_data_is_a_decode_error() {
        let mut data = zstd::encode_all(nar().as_slice(), 3).expect("zstd");
        let mid = data.len() / 2;
        data[mid] ^= 0xff;
        data.truncate(data.len() - 4);
        let r = run(data, Codec::Zstd, Expected::default());
        assert!(
            matches!(r, Err(PipelineError::Decode { .. } | PipelineError::Nar(_))),
            "{r:?}"
        );
    }

    #[test]
    fn source_errors_are_told_apart_from_the_bytes() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"))
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for codec in [Codec::None, Codec::Xz] {
            let r = run_pass(
                Failing,
                codec,
                Expected::default(),
                &RelPath::default(),
                dir.path(),
            );
            assert!(
                matches!(&r, Err(PipelineError::Source(e)) if e.kind() == io::ErrorKind::ConnectionReset),
                "{r:?}"
            );
        }
    }
}
