//! The index file: one self-describing, versioned, checksummed file, usable as loaded.
//!
//! ```text
//!  0  "BINPLZIX"            magic
//!  8  u32 version, u32 0
//! 16  u64 metadata length, metadata (JSON), zero padding to 8
//!     section table: SECTIONS × (u64 offset, u64 length)
//!     strings      UTF-8 bytes, referenced as (u32 offset, u32 length); interned
//!     programs     the hash table itself: a power of two ≥ 2 × programs of SLOT bytes:
//!                  kind (0 = empty), hash fingerprint, system, name, first, count, and
//!                  the name inline when it fits (most do), all in one cache line
//!     candidates   CANDIDATE_REC bytes each, sorted best first within a program
//!     not built    NOT_BUILT_REC bytes each: attr, store path, derivation
//!     failures     FAILURE_REC bytes each: system, attr, message
//! end-32  SHA-256 of everything before it
//! ```
//!
//! All integers are little-endian. Loading reads the file, checks the checksum, the magic,
//! the version and every offset once; lookups then hash `(system, program)` and probe the
//! table (linear probing, load ≤ 0.5). A hit usually costs one cache miss for the slot and
//! one for the chosen candidate, whatever the index size.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::names::{Names, NamesCost};
use super::{Candidate, EvalFailure, Metadata, NotBuilt};

const MAGIC: &[u8; 8] = b"BINPLZIX";
/// Bumped on any incompatible change; a binary reads only its own version. Version 2 added
/// each output's derivation (`drvPath`) to candidates and not-built records.
pub const VERSION: u32 = 2;
const SECTIONS: usize = 5;
const S_STRINGS: usize = 0;
const S_PROGRAMS: usize = 1;
const S_CANDIDATES: usize = 2;
const S_NOT_BUILT: usize = 3;
const S_FAILURES: usize = 4;
/// One slot of the program table: a cache line.
const SLOT: usize = 64;
/// Names up to this long are stored in the slot, so a lookup compares them without
/// touching the strings section.
const INLINE_NAME: usize = 31;
const CANDIDATE_REC: usize = 112;
const NOT_BUILT_REC: usize = 24;
const FAILURE_REC: usize = 24;
const KIND_EMPTY: u32 = 0;
const KIND_BUILT: u32 = 1;
const KIND_NOT_BUILT: u32 = 2;
const FLAG_EXECUTABLE: u32 = 1;
const FLAG_SHA256: u32 = 2;
const FLAG_NAR_OFFSET: u32 = 4;
/// Largest metadata block accepted.
const MAX_METADATA: u64 = 1 << 20;
/// Files from this size on have their checksum computed on a second thread while the
/// records are checked; below it, a thread costs more than it saves.
const PARALLEL_CHECKSUM_FROM: usize = 4 << 20;
/// Largest index file read unless configured otherwise: well above the 290 MB of a
/// generated index of a million programs (`cargo bench --bench index`), so a real index
/// has room to grow, while a wrong path (a device, a huge file) cannot take the memory
/// of the node that loads it. The file is held in memory whole, beside the index it
/// replaces during a reload.
pub const DEFAULT_MAX_INDEX_SIZE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot read index {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("index {path} is {kind}, not a regular file")]
    NotAFile { path: String, kind: &'static str },
    /// `size` is the file's size, or `limit + 1` when the file grew while it was read.
    #[error("index {path} is larger than the limit of {limit} bytes (--max-index-size)")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("{path} is not a binplz index")]
    NotAnIndex { path: String },
    #[error(
        "{path} is index format version {found}; this binplz reads version {VERSION}: \
         rebuild it with `binplz index build`"
    )]
    Version { path: String, found: u32 },
    #[error("{path} is corrupt or truncated: {what}")]
    Corrupt { path: String, what: &'static str },
}

/// A program as the writer takes it: everything for one `(system, program)` key.
#[derive(Debug, Clone)]
pub struct ProgramEntry {
    pub system: String,
    pub program: String,
    /// Best first.
    pub candidates: Vec<Candidate>,
}

/// Serialises an index and writes it atomically (temp file in the same directory, fsync,
/// rename, fsync of the directory) so a crash never leaves a half-written index in place.
pub fn write(
    path: &Path,
    meta: &Metadata,
    programs: &[ProgramEntry],
    not_built: &[NotBuilt],
    failures: &[EvalFailure],
) -> std::io::Result<()> {
    let bytes = encode(meta, programs, not_built, failures)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".binplz-index-")
        .tempfile_in(dir)?;
    tmp.write_all(&bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Builds an index in memory (the built-in demo), as [`write`](fn@write) would write it.
pub fn to_index(
    meta: &Metadata,
    programs: &[ProgramEntry],
    not_built: &[NotBuilt],
    failures: &[EvalFailure],
) -> Result<Index, IndexError> {
    let bytes = encode(meta, programs, not_built, failures).map_err(|err| IndexError::Io {
        path: "(memory)".into(),
        err,
    })?;
    Index::from_bytes(bytes, "(memory)")
}

#[derive(Default)]
struct Strings {
    bytes: Vec<u8>,
    seen: HashMap<String, u32>,
}

impl Strings {
    fn add(&mut self, s: &str) -> std::io::Result<[u8; 8]> {
        let off = match self.seen.get(s) {
            Some(&o) => o,
            None => {
                let o = u32_of(self.bytes.len())?;
                self.bytes.extend_from_slice(s.as_bytes());
                self.seen.insert(s.to_owned(), o);
                o
            }
        };
        let mut r = [0u8; 8];
        r[..4].copy_from_slice(&off.to_le_bytes());
        r[4..].copy_from_slice(&u32_of(s.len())?.to_le_bytes());
        Ok(r)
    }
}

fn u32_of(n: usize) -> std::io::Result<u32> {
    u32::try_from(n).map_err(|_| std::io::Error::other("index too large"))
}

/// FNV-1a over `system`, a separator and `program`: fast, and stable across versions.
fn key_hash(system: &[u8], program: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in system.iter().chain(&[0xff]).chain(program) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A slot's fingerprint: the hash's high half (the low half picks the slot).
fn fingerprint(hash: u64) -> u32 {
    (hash >> 32) as u32
}

struct Slot {
    hash: u64,
    kind: u32,
    system: [u8; 8],
    name: [u8; 8],
    first: u32,
    count: u32,
    program: String,
}

fn encode(
    meta: &Metadata,
    programs: &[ProgramEntry],
    not_built: &[NotBuilt],
    failures: &[EvalFailure],
) -> std::io::Result<Vec<u8>> {
    let mut strings = Strings::default();
    let mut slots: Vec<Slot> = Vec::new();
    let mut cand_recs = Vec::new();
    let mut keys: HashSet<(&str, &str)> = HashSet::new();
    let mut n_cands = 0usize;
    for p in programs {
        if p.candidates.is_empty() || !keys.insert((&p.system, &p.program)) {
            continue;
        }
        slots.push(Slot {
            hash: key_hash(p.system.as_bytes(), p.program.as_bytes()),
            kind: KIND_BUILT,
            system: strings.add(&p.system)?,
            name: strings.add(&p.program)?,
            first: u32_of(n_cands)?,
            count: u32_of(p.candidates.len())?,
            program: p.program.clone(),
        });
        for c in &p.candidates {
            n_cands += 1;
            for s in [&c.attr, &c.output, &c.output_path, &c.store_path, &c.path] {
                cand_recs.extend_from_slice(&strings.add(s)?);
            }
            cand_recs.extend_from_slice(&strings.add(c.main_program.as_deref().unwrap_or(""))?);
            cand_recs.extend_from_slice(&c.size.to_le_bytes());
            cand_recs.extend_from_slice(&c.nar_offset.unwrap_or(0).to_le_bytes());
            let mut flags = 0;
            if c.executable {
                flags |= FLAG_EXECUTABLE;
            }
            if c.sha256.is_some() {
                flags |= FLAG_SHA256;
            }
            if c.nar_offset.is_some() {
                flags |= FLAG_NAR_OFFSET;
            }
            cand_recs.extend_from_slice(&flags.to_le_bytes());
            cand_recs.extend_from_slice(&c.attr_path_len.to_le_bytes());
            cand_recs.extend_from_slice(&c.sha256.unwrap_or([0; 32]));
            cand_recs.extend_from_slice(&strings.add(c.drv_path.as_deref().unwrap_or(""))?);
        }
    }
    // A not-built entry becomes a program of its own kind, unless a built program has
    // the same name (what is built wins).
    let mut nb_recs = Vec::new();
    for (i, nb) in not_built.iter().enumerate() {
        nb_recs.extend_from_slice(&strings.add(&nb.attr)?);
        nb_recs.extend_from_slice(&strings.add(&nb.store_path)?);
        nb_recs.extend_from_slice(&strings.add(nb.drv_path.as_deref().unwrap_or(""))?);
        if !keys.insert((&nb.system, &nb.program)) {
            continue;
        }
        slots.push(Slot {
            hash: key_hash(nb.system.as_bytes(), nb.program.as_bytes()),
            kind: KIND_NOT_BUILT,
            system: strings.add(&nb.system)?,
            name: strings.add(&nb.program)?,
            first: u32_of(i)?,
            count: 1,
            program: nb.program.clone(),
        });
    }
    let n_slots = (slots.len() * 2).next_power_of_two().max(8);
    let mut table = vec![0u8; n_slots * SLOT];
    for s in &slots {
        let mut at = s.hash as usize & (n_slots - 1);
        while table[at * SLOT] != 0 {
            at = (at + 1) & (n_slots - 1);
        }
        let rec = &mut table[at * SLOT..(at + 1) * SLOT];
        rec[0..4].copy_from_slice(&s.kind.to_le_bytes());
        rec[4..8].copy_from_slice(&fingerprint(s.hash).to_le_bytes());
        rec[8..16].copy_from_slice(&s.system);
        rec[16..24].copy_from_slice(&s.name);
        rec[24..28].copy_from_slice(&s.first.to_le_bytes());
        rec[28..32].copy_from_slice(&s.count.to_le_bytes());
        if s.program.len() <= INLINE_NAME {
            rec[32] = s.program.len() as u8;
            rec[33..33 + s.program.len()].copy_from_slice(s.program.as_bytes());
        }
    }
    let mut fail_recs = Vec::new();
    for f in failures {
        fail_recs.extend_from_slice(&strings.add(&f.system)?);
        fail_recs.extend_from_slice(&strings.add(&f.attr)?);
        fail_recs.extend_from_slice(&strings.add(&f.message)?);
    }

    let meta_json = serde_json::to_vec(meta).map_err(std::io::Error::other)?;
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(meta_json.len() as u64).to_le_bytes());
    out.extend_from_slice(&meta_json);
    pad8(&mut out);
    let table_at = out.len();
    out.resize(table_at + SECTIONS * 16, 0);
    let sections = [strings.bytes, table, cand_recs, nb_recs, fail_recs];
    for (i, s) in sections.iter().enumerate() {
        let off = out.len() as u64;
        out.extend_from_slice(s);
        pad8(&mut out);
        let at = table_at + i * 16;
        out[at..at + 8].copy_from_slice(&off.to_le_bytes());
        out[at + 8..at + 16].copy_from_slice(&(s.len() as u64).to_le_bytes());
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    Ok(out)
}

fn pad8(v: &mut Vec<u8>) {
    v.resize(v.len().next_multiple_of(8), 0);
}

/// A loaded index.
#[derive(Debug)]
pub struct Index {
    bytes: Vec<u8>,
    /// The strings section, checked to be UTF-8 once at load.
    strings: String,
    meta: Metadata,
    sections: [(usize, usize); SECTIONS],
    n_programs: usize,
    n_candidates: usize,
    n_not_built: usize,
    n_failures: usize,
    slots: usize,
    /// The program names arranged for suggestions and search, built at load.
    names: Names,
}

/// A candidate as stored in the index.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Found<'a> {
    pub attr: &'a str,
    pub output: &'a str,
    pub output_path: &'a str,
    pub store_path: &'a str,
    pub path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub main_program: Option<&'a str>,
    /// The derivation that builds `output_path`, when the evaluation gave it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drv_path: Option<&'a str>,
    pub size: u64,
    pub executable: bool,
    #[serde(skip)]
    pub sha256: Option<[u8; 32]>,
    #[serde(skip)]
    pub nar_offset: Option<u64>,
}

/// The answer to a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The chosen candidate first, then the others.
    Found(Candidates<'a>),
    /// Known, but its store path is not in the cache yet; `drv_path` is the derivation a
    /// builder would build, when the evaluation gave it.
    NotBuilt {
        attr: &'a str,
        store_path: &'a str,
        drv_path: Option<&'a str>,
    },
    /// Nothing by that name (or not from that attribute). [`Index::suggest`] finds close
    /// names; it scans the index, so it is not done here.
    Unknown,
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn rd_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// Reads the index file at `path`: a regular file of at most `max_size` bytes, whatever
/// the path turns out to be. Opened with `O_NONBLOCK`, as opening a FIFO for reading
/// otherwise waits in open(2) for a writer that may never come; the opened descriptor is
/// then checked, not the path, so a file swapped in between cannot slip past. At most
/// `max_size + 1` bytes are read, so a file that grows while it is read (or lies in its
/// size) is still refused without reading it all.
fn read_bounded(path: &Path, max_size: u64) -> Result<Vec<u8>, IndexError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let name = || path.display().to_string();
    let io = |err| IndexError::Io { path: name(), err };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(IndexError::NotAFile { path: name(), kind });
    }
    let too_large = |size| IndexError::TooLarge {
        path: name(),
        size,
        limit: max_size,
    };
    if meta.len() > max_size {
        return Err(too_large(meta.len()));
    }
    // Bounded by `max_size` above; the capacity only saves regrowing.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(max_size.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max_size {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

impl Index {
    /// Reads and validates an index file of at most `max_size` bytes. Anything but a
    /// regular file (a FIFO, a device, a directory), a larger file, and a corrupt or
    /// truncated one are refused.
    pub fn load(path: &Path, max_size: u64) -> Result<Index, IndexError> {
        let bytes = read_bounded(path, max_size)?;
        Index::from_bytes(bytes, &path.display().to_string())
    }

    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<Index, IndexError> {
        let corrupt = |what| IndexError::Corrupt {
            path: name.to_owned(),
            what,
        };
        if bytes.get(..8) != Some(MAGIC.as_slice()) {
            return Err(IndexError::NotAnIndex {
                path: name.to_owned(),
            });
        }
        if bytes.len() < 24 {
            return Err(corrupt("too short"));
        }
        let version = rd_u32(&bytes, 8);
        if version != VERSION {
            return Err(IndexError::Version {
                path: name.to_owned(),
                found: version,
            });
        }
        if bytes.len() < 24 + 32 {
            return Err(corrupt("too short"));
        }
        let body = bytes.len() - 32;
        let checksum_ok =
            |bytes: &[u8]| Sha256::digest(&bytes[..body]).as_slice() == &bytes[body..];
        if bytes.len() < PARALLEL_CHECKSUM_FROM {
            if !checksum_ok(&bytes) {
                return Err(corrupt("checksum mismatch"));
            }
            let mut index = Index::parse(bytes, body, name)?;
            let (programs, names) = index.check_and_arrange().map_err(corrupt)?;
            index.n_programs = programs;
            index.names = names;
            return Ok(index);
        }
        // A large file: its checksum (a quarter of a second for 290 MB) is computed on a
        // second thread while this one checks every record and arranges the names; nothing
        // of it is used unless the checksum matches.
        let mut index = Index::parse(bytes, body, name)?;
        let (sum_ok, arranged) = std::thread::scope(|scope| {
            let bytes = index.bytes.as_slice();
            let sum = std::thread::Builder::new()
                .name("binplz-index-sum".into())
                .spawn_scoped(scope, move || checksum_ok(bytes));
            let arranged = index.check_and_arrange();
            let sum_ok = match sum {
                Ok(handle) => handle.join().unwrap_or(false),
                // No thread to be had: compute it here.
                Err(_) => checksum_ok(bytes),
            };
            (sum_ok, arranged)
        });
        if !sum_ok {
            return Err(corrupt("checksum mismatch"));
        }
        let (programs, names) = arranged.map_err(corrupt)?;
        index.n_programs = programs;
        index.names = names;
        Ok(index)
    }

    /// The header, section table and strings of a file whose magic and version were
    /// checked; records are checked by [`Index::check_and_arrange`].
    fn parse(bytes: Vec<u8>, body: usize, name: &str) -> Result<Index, IndexError> {
        let corrupt = |what| IndexError::Corrupt {
            path: name.to_owned(),
            what,
        };
        let meta_len = rd_u64(&bytes, 16);
        if meta_len > MAX_METADATA {
            return Err(corrupt("metadata too large"));
        }
        let meta_end = 24 + meta_len as usize;
        let meta: Metadata = bytes
            .get(24..meta_end)
            .and_then(|m| serde_json::from_slice(m).ok())
            .ok_or_else(|| corrupt("bad metadata"))?;
        let table_at = meta_end.next_multiple_of(8);
        let first_section = table_at + SECTIONS * 16;
        if first_section > body {
            return Err(corrupt("section table"));
        }
        let mut sections = [(0usize, 0usize); SECTIONS];
        for (i, s) in sections.iter_mut().enumerate() {
            let off = rd_u64(&bytes, table_at + i * 16);
            let len = rd_u64(&bytes, table_at + i * 16 + 8);
            match off.checked_add(len) {
                Some(end) if off >= first_section as u64 && end <= body as u64 => {
                    *s = (off as usize, len as usize)
                }
                _ => return Err(corrupt("section bounds")),
            }
        }
        let count = |s: usize, rec: usize| {
            let len = sections[s].1;
            if len % rec == 0 {
                Ok(len / rec)
            } else {
                Err(corrupt("section length"))
            }
        };
        let slots = count(S_PROGRAMS, SLOT)?;
        let n_candidates = count(S_CANDIDATES, CANDIDATE_REC)?;
        let n_not_built = count(S_NOT_BUILT, NOT_BUILT_REC)?;
        let n_failures = count(S_FAILURES, FAILURE_REC)?;
        if !slots.is_power_of_two() {
            return Err(corrupt("hash table size"));
        }
        let (off, len) = sections[S_STRINGS];
        let strings = std::str::from_utf8(&bytes[off..off + len])
            .map_err(|_| corrupt("strings are not UTF-8"))?
            .to_owned();
        Ok(Index {
            bytes,
            strings,
            meta,
            sections,
            n_programs: 0,
            n_candidates,
            n_not_built,
            n_failures,
            slots,
            names: Names::default(),
        })
    }

    /// Checks every record ([`Index::validate`]) and arranges the names for suggestions
    /// and search: here, on the thread that loads the index, so no request pays for it.
    fn check_and_arrange(&self) -> Result<(usize, Names), &'static str> {
        let programs = self.validate()?;
        // Names come from the slots where they are inline (most are), and a system is
        // looked up only when its reference changes: the slots are read in order, while
        // the strings they point to would be a cache miss each.
        let mut system: ([u8; 8], &str) = ([0xff; 8], "");
        let names = Names::build((0..self.slots).filter_map(|i| {
            let r = self.slot(i);
            if rd_u32(r, 0) == KIND_EMPTY {
                return None;
            }
            let slot = u32::try_from(i).ok()?;
            let reference: [u8; 8] = r[8..16].try_into().ok()?;
            if reference != system.0 {
                system = (reference, self.str_at(r, 8));
            }
            let inline = usize::from(r[32]);
            let name = match r.get(33..33 + inline) {
                // Checked at load to equal the name in the strings section.
                Some(b) if inline > 0 => std::str::from_utf8(b).ok()?,
                _ => self.str_at(r, 16),
            };
            Some((slot, system.1, name))
        }));
        Ok((programs, names))
    }

    /// Checks every reference once, so lookups never meet an out-of-range offset; returns
    /// the number of programs.
    fn validate(&self) -> Result<usize, &'static str> {
        let strings = self.strings.as_str();
        let str_ok = |rec: &[u8], at: usize| {
            let off = rd_u32(rec, at) as usize;
            let len = rd_u32(rec, at + 4) as usize;
            off.checked_add(len).is_some_and(|e| e <= strings.len())
                && strings.is_char_boundary(off)
                && strings.is_char_boundary(off + len)
        };
        let mut programs = 0;
        for i in 0..self.slots {
            let r = self.slot(i);
            let (first, n) = (rd_u32(r, 24) as usize, rd_u32(r, 28) as usize);
            let limit = match rd_u32(r, 0) {
                KIND_EMPTY => continue,
                KIND_BUILT => self.n_candidates,
                KIND_NOT_BUILT => self.n_not_built,
                _ => return Err("unknown program kind"),
            };
            programs += 1;
            let inline = r[32] as usize;
            if !str_ok(r, 8)
                || !str_ok(r, 16)
                || n == 0
                || first.checked_add(n).is_none_or(|e| e > limit)
                || inline > INLINE_NAME
                || (inline > 0 && r.get(33..33 + inline) != Some(self.str_at(r, 16).as_bytes()))
            {
                return Err("program record");
            }
        }
        if programs * 2 > self.slots {
            return Err("hash table too full");
        }
        for i in 0..self.n_candidates {
            let r = self.record(S_CANDIDATES, CANDIDATE_REC, i);
            if !(0..6).all(|k| str_ok(r, k * 8)) || !str_ok(r, 104) {
                return Err("candidate record");
            }
        }
        for i in 0..self.n_not_built {
            let r = self.record(S_NOT_BUILT, NOT_BUILT_REC, i);
            if !(0..3).all(|k| str_ok(r, k * 8)) {
                return Err("not-built record");
            }
        }
        for i in 0..self.n_failures {
            let r = self.record(S_FAILURES, FAILURE_REC, i);
            if !(0..3).all(|k| str_ok(r, k * 8)) {
                return Err("failure record");
            }
        }
        Ok(programs)
    }

    fn section(&self, s: usize) -> &[u8] {
        let (off, len) = self.sections[s];
        self.bytes.get(off..off + len).unwrap_or_default()
    }

    fn record(&self, s: usize, size: usize, i: usize) -> &[u8] {
        self.section(s)
            .get(i * size..(i + 1) * size)
            .unwrap_or_default()
    }

    /// Slot `i` of the program table (always SLOT bytes; zeros if out of range).
    fn slot(&self, i: usize) -> &[u8; SLOT] {
        const EMPTY: [u8; SLOT] = [0; SLOT];
        self.record(S_PROGRAMS, SLOT, i)
            .try_into()
            .unwrap_or(&EMPTY)
    }

    fn str_at(&self, rec: &[u8], at: usize) -> &str {
        let off = rd_u32(rec, at) as usize;
        let len = rd_u32(rec, at + 4) as usize;
        // Offsets and boundaries were checked at load; `get` keeps this panic-free anyway.
        self.strings.get(off..off + len).unwrap_or_default()
    }

    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// Number of distinct `(system, program)` keys, including not-built ones.
    pub fn len(&self) -> usize {
        self.n_programs
    }

    pub fn is_empty(&self) -> bool {
        self.n_programs == 0
    }

    fn find(&self, system: &str, program: &str) -> Option<&[u8; SLOT]> {
        let mask = self.slots - 1;
        let h = key_hash(system.as_bytes(), program.as_bytes());
        let fp = fingerprint(h);
        let mut at = h as usize & mask;
        // The table is at most half full, so a probe ends at an empty slot.
        for _ in 0..self.slots {
            let r = self.slot(at);
            if rd_u32(r, 0) == KIND_EMPTY {
                return None;
            }
            if rd_u32(r, 4) == fp {
                let inline = r[32] as usize;
                let name_matches = if inline > 0 {
                    &r[33..33 + inline.min(INLINE_NAME)] == program.as_bytes()
                } else {
                    self.str_at(r, 16) == program
                };
                if name_matches && self.str_at(r, 8) == system {
                    return Some(r);
                }
            }
            at = (at + 1) & mask;
        }
        None
    }

    fn candidate(&self, i: usize) -> Found<'_> {
        let r = self.record(S_CANDIDATES, CANDIDATE_REC, i);
        let flags = rd_u32(r, 64);
        let main = self.str_at(r, 40);
        let drv = self.str_at(r, 104);
        Found {
            attr: self.str_at(r, 0),
            output: self.str_at(r, 8),
            output_path: self.str_at(r, 16),
            store_path: self.str_at(r, 24),
            path: self.str_at(r, 32),
            main_program: (!main.is_empty()).then_some(main),
            drv_path: (!drv.is_empty()).then_some(drv),
            size: rd_u64(r, 48),
            nar_offset: (flags & FLAG_NAR_OFFSET != 0).then(|| rd_u64(r, 56)),
            executable: flags & FLAG_EXECUTABLE != 0,
            sha256: (flags & FLAG_SHA256 != 0)
                .then(|| r.get(72..104).and_then(|s| s.try_into().ok()))
                .flatten(),
        }
    }

    /// Resolves `program` for `system`, optionally from one attribute only.
    pub fn resolve(&self, system: &str, program: &str, attr: Option<&str>) -> Lookup<'_> {
        let Some(r) = self.find(system, program) else {
            return Lookup::Unknown;
        };
        let (first, n) = (rd_u32(r, 24) as usize, rd_u32(r, 28) as usize);
        if rd_u32(r, 0) == KIND_NOT_BUILT {
            let nb = self.record(S_NOT_BUILT, NOT_BUILT_REC, first);
            let attr_name = self.str_at(nb, 0);
            if attr.is_some_and(|a| a != attr_name) {
                return Lookup::Unknown;
            }
            let drv = self.str_at(nb, 16);
            return Lookup::NotBuilt {
                attr: attr_name,
                store_path: self.str_at(nb, 8),
                drv_path: (!drv.is_empty()).then_some(drv),
            };
        }
        let chosen = match attr {
            None => first,
            Some(a) => {
                let attr_of = |i| self.str_at(self.record(S_CANDIDATES, CANDIDATE_REC, i), 0);
                match (first..first + n).find(|&i| attr_of(i) == a) {
                    Some(i) => i,
                    None => return Lookup::Unknown,
                }
            }
        };
        Lookup::Found(Candidates {
            index: self,
            first,
            n,
            chosen,
        })
    }

    /// Every `(system, program)` key, in table order.
    pub fn programs(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        (0..self.slots)
            .map(|i| self.slot(i))
            .filter(|r| rd_u32(*r, 0) != KIND_EMPTY)
            .map(|r| (self.str_at(r, 8), self.str_at(r, 16)))
    }

    /// Every store path the index names: each candidate's output and the store path its
    /// file is in, and each output not built yet (so that a build in flight counts).
    /// Repeats are not removed.
    pub fn store_paths(&self) -> impl Iterator<Item = &str> + '_ {
        let candidates = (0..self.n_candidates).flat_map(|i| {
            let r = self.record(S_CANDIDATES, CANDIDATE_REC, i);
            [self.str_at(r, 16), self.str_at(r, 24)]
        });
        let not_built = (0..self.n_not_built)
            .map(|i| self.str_at(self.record(S_NOT_BUILT, NOT_BUILT_REC, i), 8));
        candidates.chain(not_built)
    }

    /// Every derivation the index names (of built and not-built outputs), with repeats.
    pub fn drv_paths(&self) -> impl Iterator<Item = &str> + '_ {
        let candidates = (0..self.n_candidates)
            .map(|i| self.str_at(self.record(S_CANDIDATES, CANDIDATE_REC, i), 104));
        let not_built = (0..self.n_not_built)
            .map(|i| self.str_at(self.record(S_NOT_BUILT, NOT_BUILT_REC, i), 16));
        candidates.chain(not_built).filter(|d| !d.is_empty())
    }

    /// Evaluation failures recorded at build time.
    pub fn failures(&self) -> impl Iterator<Item = EvalFailure> + '_ {
        (0..self.n_failures).map(|i| {
            let r = self.record(S_FAILURES, FAILURE_REC, i);
            EvalFailure {
                system: self.str_at(r, 0).to_owned(),
                attr: self.str_at(r, 8).to_owned(),
                message: self.str_at(r, 16).to_owned(),
            }
        })
    }

    /// Up to five known names close to `program` (small edit distance, or a prefix), from
    /// the names arranged at load: no scan of every name.
    pub fn suggest(&self, system: &str, program: &str) -> Vec<String> {
        self.names.suggest(system, program, |slot| {
            self.str_at(self.slot(slot as usize), 16)
        })
    }

    /// Up to `limit` built programs whose names contain `query` (in any case): equal
    /// names first, then those starting with it, then the rest; shorter names first
    /// within each.
    pub fn search(&self, system: &str, query: &str, limit: usize) -> Vec<&str> {
        let built = |slot: u32| rd_u32(self.slot(slot as usize), 0) == KIND_BUILT;
        self.names
            .search(system, query, limit, built)
            .into_iter()
            .map(|slot| self.str_at(self.slot(slot as usize), 16))
            .collect()
    }

    /// What the name structures for suggestions and search cost at load.
    pub fn names_cost(&self) -> NamesCost {
        self.names.cost()
    }
}

/// The candidates for a program, read from the index only when asked for.
#[derive(Debug, Clone, Copy)]
pub struct Candidates<'a> {
    index: &'a Index,
    first: usize,
    n: usize,
    chosen: usize,
}

impl PartialEq for Candidates<'_> {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self.index, other.index)
            && (self.first, self.n, self.chosen) == (other.first, other.n, other.chosen)
    }
}

impl Eq for Candidates<'_> {}

impl<'a> Candidates<'a> {
    /// The chosen candidate: the default, or the one of the requested attribute.
    pub fn chosen(&self) -> Found<'a> {
        self.index.candidate(self.chosen)
    }

    /// How many attributes provide the program.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The chosen candidate, then the others in order of preference.
    pub fn iter(&self) -> impl Iterator<Item = Found<'a>> + 'a {
        let (index, chosen) = (self.index, self.chosen);
        std::iter::once(chosen)
            .chain((self.first..self.first + self.n).filter(move |&i| i != chosen))
            .map(move |i| index.candidate(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(attr: &str, output: &str, main: Option<&str>) -> Candidate {
        Candidate {
            attr: attr.into(),
            attr_path_len: attr.split('.').count() as u32,
            main_program: main.map(Into::into),
            output: output.into(),
            output_path: format!("/nix/store/{:0>32}-{attr}", attr.len()),
            store_path: format!("/nix/store/{:0>32}-{attr}", attr.len()),
            path: "bin/x".into(),
            size: 42,
            executable: true,
            sha256: Some([7; 32]),
            nar_offset: None,
            drv_path: Some(format!("/nix/store/{:0>32}-{attr}.drv", attr.len())),
        }
    }

    fn sample() -> Vec<u8> {
        let programs = vec![
            ProgramEntry {
                system: "x86_64-linux".into(),
                program: "tree".into(),
                candidates: vec![cand("tree", "out", None), cand("busybox", "out", None)],
            },
            ProgramEntry {
                system: "aarch64-linux".into(),
                program: "tree".into(),
                candidates: vec![cand("tree", "out", None)],
            },
            ProgramEntry {
                system: "x86_64-linux".into(),
                program: "rg".into(),
                candidates: vec![cand("ripgrep", "out", Some("rg"))],
            },
        ];
        let not_built = vec![
            NotBuilt {
                system: "x86_64-linux".into(),
                program: "fd".into(),
                attr: "fd".into(),
                store_path: "/nix/store/x-fd".into(),
                drv_path: Some("/nix/store/x-fd.drv".into()),
            },
            // Shadowed by a built program of the same name.
            NotBuilt {
                system: "x86_64-linux".into(),
                program: "tree".into(),
                attr: "tree2".into(),
                store_path: "/nix/store/x-tree2".into(),
                drv_path: None,
            },
        ];
        let failures = vec![EvalFailure {
            system: "x86_64-linux".into(),
            attr: "broken".into(),
            message: "boom".into(),
        }];
        let meta = Metadata {
            revision: Some("abc".into()),
            systems: vec!["x86_64-linux".into()],
            ..Metadata::default()
        };
        encode(&meta, &programs, &not_built, &failures).expect("encodes")
    }

    #[test]
    fn lookups_find_built_not_built_and_unknown_programs() {
        let index = Index::from_bytes(sample(), "test").expect("loads");
        assert_eq!(index.metadata().revision.as_deref(), Some("abc"));
        let Lookup::Found(found) = index.resolve("x86_64-linux", "tree", None) else {
            panic!("tree")
        };
        assert_eq!(
            found.iter().map(|c| c.attr).collect::<Vec<_>>(),
            ["tree", "busybox"]
        );
        assert_eq!(found.chosen().sha256, Some([7; 32]));
        assert_eq!(
            found.chosen().drv_path,
            Some(format!("/nix/store/{:0>32}-tree.drv", 4).as_str())
        );
        assert_eq!(found.chosen().size, 42);
        let Lookup::Found(found) = index.resolve("x86_64-linux", "tree", Some("busybox")) else {
            panic!("attr")
        };
        assert_eq!(found.chosen().attr, "busybox");
        assert_eq!(
            index.resolve("x86_64-linux", "tree", Some("nope")),
            Lookup::Unknown
        );
        assert_eq!(
            index.resolve("x86_64-linux", "fd", None),
            Lookup::NotBuilt {
                attr: "fd",
                store_path: "/nix/store/x-fd",
                drv_path: Some("/nix/store/x-fd.drv"),
            }
        );
        assert_eq!(index.resolve("x86_64-linux", "tre", None), Lookup::Unknown);
        assert_eq!(index.suggest("x86_64-linux", "tre"), ["tree"]);
        assert!(matches!(
            index.resolve("riscv64-linux", "tree", None),
            Lookup::Unknown { .. }
        ));
        assert_eq!(index.failures().count(), 1);
        let mut drvs: Vec<&str> = index.drv_paths().collect();
        drvs.sort_unstable();
        drvs.dedup();
        assert_eq!(
            drvs,
            [
                "/nix/store/00000000000000000000000000000004-tree.drv",
                "/nix/store/00000000000000000000000000000007-busybox.drv",
                "/nix/store/00000000000000000000000000000007-ripgrep.drv",
                "/nix/store/x-fd.drv",
            ]
        );
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        let bytes = sample();
        for cut in [0, 7, 8, 23, 24, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                Index::from_bytes(bytes[..cut].to_vec(), "t").is_err(),
                "cut at {cut}"
            );
        }
        for at in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[at] ^= 0x10;
            assert!(Index::from_bytes(b, "t").is_err(), "flip at {at}");
        }
    }

    #[test]
    fn a_large_index_checked_on_two_threads_loads_and_a_flip_is_refused() {
        let programs: Vec<ProgramEntry> = (0..20_000)
            .map(|i| ProgramEntry {
                system: "x86_64-linux".into(),
                program: format!("prog{i}"),
                candidates: vec![cand(&format!("attr{i}"), "out", None)],
            })
            .collect();
        let bytes = encode(&Metadata::default(), &programs, &[], &[]).expect("encodes");
        assert!(
            bytes.len() >= PARALLEL_CHECKSUM_FROM,
            "{} bytes",
            bytes.len()
        );
        let index = Index::from_bytes(bytes.clone(), "large").expect("loads");
        assert_eq!(index.len(), 20_000);
        assert_eq!(index.suggest("x86_64-linux", "prog1999x")[0], "prog1999");
        for at in [
            100,
            bytes.len() / 3,
            bytes.len() / 2,
            bytes.len() - 40,
            bytes.len() - 1,
        ] {
            let mut b = bytes.clone();
            b[at] ^= 0x04;
            assert!(
                matches!(Index::from_bytes(b, "t"), Err(IndexError::Corrupt { .. })),
                "flip at {at}"
            );
        }
    }

    #[test]
    fn another_version_is_refused_with_its_number_and_a_rebuild_hint() {
        for found in [1, 9] {
            let mut b = sample();
            b[8] = found as u8;
            let err = Index::from_bytes(b, "t").expect_err("refused");
            assert!(
                matches!(err, IndexError::Version { found: f, .. } if f == found),
                "{err}"
            );
            assert!(err.to_string().contains("rebuild it"), "{err}");
        }
        assert!(matches!(
            Index::from_bytes(b"hello world, not an index".to_vec(), "t"),
            Err(IndexError::NotAnIndex { .. })
        ));
    }

    #[test]
    fn writing_is_atomic_and_loads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("index.bin");
        write(&path, &Metadata::default(), &[], &[], &[]).expect("writes");
        let index = Index::load(&path, DEFAULT_MAX_INDEX_SIZE).expect("loads");
        assert!(index.is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("dir").count(),
            1,
            "no temp file left"
        );
    }
}
