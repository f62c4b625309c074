//! The index file: one self-describing, versioned, checksummed file, usable as loaded.
//!
//! ```text
//!  0  "BINPLZIX"            magic
//!  8  u32 version, u32 0
//! 16  u64 metadata length, metadata (JSON), zero padding to 8
//!     section table: SECTIONS × (u64 offset, u64 length)
//!     strings      UTF-8 bytes, referenced as (u32 offset, u32 length); interned
//!     programs     PROGRAM_REC bytes each: system, name, first, count, kind
//!     candidates   CANDIDATE_REC bytes each, sorted best first within a program
//!     not built    NOT_BUILT_REC bytes each: attr, store path
//!     table        u32 slots, a power of two ≥ 2 × programs: program index + 1, 0 = empty
//!     failures     FAILURE_REC bytes each: system, attr, message
//! end-32  SHA-256 of everything before it
//! ```
//!
//! All integers are little-endian. Loading reads the file, checks the checksum, the magic,
//! the version and every offset once; lookups then hash `(system, program)` and probe the
//! table (linear probing, load ≤ 0.5), so they cost O(1) whatever the index size.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{Candidate, EvalFailure, Metadata, NotBuilt};

const MAGIC: &[u8; 8] = b"BINPLZIX";
/// Bumped on any incompatible change; older binaries refuse newer files.
pub const VERSION: u32 = 1;
const SECTIONS: usize = 6;
const S_STRINGS: usize = 0;
const S_PROGRAMS: usize = 1;
const S_CANDIDATES: usize = 2;
const S_NOT_BUILT: usize = 3;
const S_TABLE: usize = 4;
const S_FAILURES: usize = 5;
const PROGRAM_REC: usize = 32;
const CANDIDATE_REC: usize = 104;
const NOT_BUILT_REC: usize = 16;
const FAILURE_REC: usize = 24;
const KIND_BUILT: u32 = 0;
const KIND_NOT_BUILT: u32 = 1;
const FLAG_EXECUTABLE: u32 = 1;
const FLAG_SHA256: u32 = 2;
const FLAG_NAR_OFFSET: u32 = 4;
/// Largest metadata block accepted.
const MAX_METADATA: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot read index {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{path} is not a binplz index")]
    NotAnIndex { path: String },
    #[error("{path} is index format version {found}; this binplz reads version {VERSION}")]
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
    let mut tmp = tempfile::Builder::new().prefix(".binplz-index-").tempfile_in(dir)?;
    tmp.write_all(&bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
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
                let o = u32::try_from(self.bytes.len()).map_err(|_| std::io::Error::other("index strings exceed 4 GiB"))?;
                self.bytes.extend_from_slice(s.as_bytes());
                self.seen.insert(s.to_owned(), o);
                o
            }
        };
        let len = u32::try_from(s.len()).map_err(|_| std::io::Error::other("string too long"))?;
        let mut r = [0u8; 8];
        r[..4].copy_from_slice(&off.to_le_bytes());
        r[4..].copy_from_slice(&len.to_le_bytes());
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

fn encode(meta: &Metadata, programs: &[ProgramEntry], not_built: &[NotBuilt], failures: &[EvalFailure]) -> std::io::Result<Vec<u8>> {
    let mut strings = Strings::default();
    let mut prog_recs = Vec::new();
    let mut cand_recs = Vec::new();
    let mut nb_recs = Vec::new();
    let mut keys: Vec<(String, String)> = Vec::new();
    let mut n_cands = 0usize;
    for p in programs {
        prog_recs.extend_from_slice(&strings.add(&p.system)?);
        prog_recs.extend_from_slice(&strings.add(&p.program)?);
        prog_recs.extend_from_slice(&u32_of(n_cands)?.to_le_bytes());
        prog_recs.extend_from_slice(&u32_of(p.candidates.len())?.to_le_bytes());
        prog_recs.extend_from_slice(&KIND_BUILT.to_le_bytes());
        prog_recs.extend_from_slice(&0u32.to_le_bytes());
        keys.push((p.system.clone(), p.program.clone()));
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
        }
    }
    // Not-built entries whose name no built program has become programs of their own kind.
    let built: std::collections::HashSet<(String, String)> = keys.iter().cloned().collect();
    let mut nb_keys = std::collections::HashSet::new();
    for (i, nb) in not_built.iter().enumerate() {
        nb_recs.extend_from_slice(&strings.add(&nb.attr)?);
        nb_recs.extend_from_slice(&strings.add(&nb.store_path)?);
        let key = (nb.system.clone(), nb.program.clone());
        if built.contains(&key) || !nb_keys.insert(key.clone()) {
            continue;
        }
        prog_recs.extend_from_slice(&strings.add(&nb.system)?);
        prog_recs.extend_from_slice(&strings.add(&nb.program)?);
        prog_recs.extend_from_slice(&u32_of(i)?.to_le_bytes());
        prog_recs.extend_from_slice(&1u32.to_le_bytes());
        prog_recs.extend_from_slice(&KIND_NOT_BUILT.to_le_bytes());
        prog_recs.extend_from_slice(&0u32.to_le_bytes());
        keys.push(key);
    }
    let slots = (keys.len() * 2).next_power_of_two().max(8);
    let mut table = vec![0u32; slots];
    for (i, (system, program)) in keys.iter().enumerate() {
        let mut at = key_hash(system.as_bytes(), program.as_bytes()) as usize & (slots - 1);
        while table[at] != 0 {
            at = (at + 1) & (slots - 1);
        }
        table[at] = u32_of(i + 1)?;
    }
    let mut fail_recs = Vec::new();
    for f in failures {
        fail_recs.extend_from_slice(&strings.add(&f.system)?);
        fail_recs.extend_from_slice(&strings.add(&f.attr)?);
        fail_recs.extend_from_slice(&strings.add(&f.message)?);
    }
    let table_bytes: Vec<u8> = table.iter().flat_map(|s| s.to_le_bytes()).collect();

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
    let sections = [strings.bytes, prog_recs, cand_recs, nb_recs, table_bytes, fail_recs];
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
    meta: Metadata,
    sections: [(usize, usize); SECTIONS],
    n_programs: usize,
    n_candidates: usize,
    n_not_built: usize,
    n_failures: usize,
    slots: usize,
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
    Found(Vec<Found<'a>>),
    /// Known, but its store path is not in the cache yet.
    NotBuilt { attr: &'a str, store_path: &'a str },
    /// Nothing by that name (or not from that attribute): up to five close names.
    Unknown { suggestions: Vec<String> },
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).and_then(|s| s.try_into().ok()).map_or(0, u32::from_le_bytes)
}

fn rd_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).and_then(|s| s.try_into().ok()).map_or(0, u64::from_le_bytes)
}

impl Index {
    /// Reads and validates an index file. A corrupt or truncated file is refused.
    pub fn load(path: &Path) -> Result<Index, IndexError> {
        let bytes = std::fs::read(path).map_err(|err| IndexError::Io { path: path.display().to_string(), err })?;
        Index::from_bytes(bytes, &path.display().to_string())
    }

    pub fn from_bytes(bytes: Vec<u8>, name: &str) -> Result<Index, IndexError> {
        let corrupt = |what| IndexError::Corrupt { path: name.to_owned(), what };
        if bytes.len() < 24 || &bytes[..8] != MAGIC {
            return Err(IndexError::NotAnIndex { path: name.to_owned() });
        }
        let version = rd_u32(&bytes, 8);
        if version != VERSION {
            return Err(IndexError::Version { path: name.to_owned(), found: version });
        }
        if bytes.len() < 24 + 32 {
            return Err(corrupt("too short"));
        }
        let body = bytes.len() - 32;
        if Sha256::digest(&bytes[..body]).as_slice() != &bytes[body..] {
            return Err(corrupt("checksum mismatch"));
        }
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
        let mut sections = [(0usize, 0usize); SECTIONS];
        for (i, s) in sections.iter_mut().enumerate() {
            let off = rd_u64(&bytes, table_at + i * 16);
            let len = rd_u64(&bytes, table_at + i * 16 + 8);
            let end = off.checked_add(len).ok_or_else(|| corrupt("section bounds"))?;
            if table_at + SECTIONS * 16 > body || end > body as u64 || off < (table_at + SECTIONS * 16) as u64 {
                return Err(corrupt("section bounds"));
            }
            *s = (off as usize, len as usize);
        }
        let count = |s: usize, rec: usize| {
            let len = sections[s].1;
            if len % rec == 0 {
                Ok(len / rec)
            } else {
                Err(corrupt("section length"))
            }
        };
        let n_programs = count(S_PROGRAMS, PROGRAM_REC)?;
        let n_candidates = count(S_CANDIDATES, CANDIDATE_REC)?;
        let n_not_built = count(S_NOT_BUILT, NOT_BUILT_REC)?;
        let n_failures = count(S_FAILURES, FAILURE_REC)?;
        let slots = count(S_TABLE, 4)?;
        if !slots.is_power_of_two() || slots < n_programs * 2 {
            return Err(corrupt("hash table size"));
        }
        let index = Index { bytes, meta, sections, n_programs, n_candidates, n_not_built, n_failures, slots };
        index.validate().map_err(corrupt)?;
        Ok(index)
    }

    /// Checks every reference once, so lookups never meet an out-of-range offset.
    fn validate(&self) -> Result<(), &'static str> {
        let Ok(strings) = std::str::from_utf8(self.section(S_STRINGS)) else {
            return Err("strings are not UTF-8");
        };
        let str_ok = |rec: &[u8], at: usize| {
            let off = rd_u32(rec, at) as usize;
            let len = rd_u32(rec, at + 4) as usize;
            off.checked_add(len).is_some_and(|e| e <= strings.len())
                && strings.is_char_boundary(off)
                && strings.is_char_boundary(off + len)
        };
        for i in 0..self.n_programs {
            let r = self.record(S_PROGRAMS, PROGRAM_REC, i);
            let (first, n, kind) = (rd_u32(r, 16) as usize, rd_u32(r, 20) as usize, rd_u32(r, 24));
            let limit = match kind {
                KIND_BUILT => self.n_candidates,
                KIND_NOT_BUILT => self.n_not_built,
                _ => return Err("unknown program kind"),
            };
            if !str_ok(r, 0) || !str_ok(r, 8) || first.checked_add(n).is_none_or(|e| e > limit) || n == 0 {
                return Err("program record");
            }
        }
        for i in 0..self.n_candidates {
            let r = self.record(S_CANDIDATES, CANDIDATE_REC, i);
            if !(0..6).all(|k| str_ok(r, k * 8)) {
                return Err("candidate record");
            }
        }
        for i in 0..self.n_not_built {
            let r = self.record(S_NOT_BUILT, NOT_BUILT_REC, i);
            if !str_ok(r, 0) || !str_ok(r, 8) {
                return Err("not-built record");
            }
        }
        for i in 0..self.n_failures {
            let r = self.record(S_FAILURES, FAILURE_REC, i);
            if !(0..3).all(|k| str_ok(r, k * 8)) {
                return Err("failure record");
            }
        }
        for s in 0..self.slots {
            if rd_u32(self.section(S_TABLE), s * 4) as usize > self.n_programs {
                return Err("hash table entry");
            }
        }
        Ok(())
    }

    fn section(&self, s: usize) -> &[u8] {
        let (off, len) = self.sections[s];
        self.bytes.get(off..off + len).unwrap_or_default()
    }

    fn record(&self, s: usize, size: usize, i: usize) -> &[u8] {
        self.section(s).get(i * size..(i + 1) * size).unwrap_or_default()
    }

    fn str_at(&self, rec: &[u8], at: usize) -> &str {
        let off = rd_u32(rec, at) as usize;
        let len = rd_u32(rec, at + 4) as usize;
        self.section(S_STRINGS).get(off..off + len).and_then(|b| std::str::from_utf8(b).ok()).unwrap_or_default()
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

    fn find(&self, system: &str, program: &str) -> Option<&[u8]> {
        let mask = self.slots - 1;
        let mut at = key_hash(system.as_bytes(), program.as_bytes()) as usize & mask;
        let table = self.section(S_TABLE);
        // The table is at most half full, so a probe ends at an empty slot.
        for _ in 0..self.slots {
            let slot = rd_u32(table, at * 4) as usize;
            if slot == 0 {
                return None;
            }
            let r = self.record(S_PROGRAMS, PROGRAM_REC, slot - 1);
            if self.str_at(r, 8) == program && self.str_at(r, 0) == system {
                return Some(r);
            }
            at = (at + 1) & mask;
        }
        None
    }

    fn candidate(&self, i: usize) -> Found<'_> {
        let r = self.record(S_CANDIDATES, CANDIDATE_REC, i);
        let flags = rd_u32(r, 64);
        let main = self.str_at(r, 40);
        Found {
            attr: self.str_at(r, 0),
            output: self.str_at(r, 8),
            output_path: self.str_at(r, 16),
            store_path: self.str_at(r, 24),
            path: self.str_at(r, 32),
            main_program: (!main.is_empty()).then_some(main),
            size: rd_u64(r, 48),
            nar_offset: (flags & FLAG_NAR_OFFSET != 0).then(|| rd_u64(r, 56)),
            executable: flags & FLAG_EXECUTABLE != 0,
            sha256: (flags & FLAG_SHA256 != 0).then(|| r.get(64 + 8..64 + 40).and_then(|s| s.try_into().ok())).flatten(),
        }
    }

    /// Resolves `program` for `system`, optionally from one attribute only.
    pub fn resolve(&self, system: &str, program: &str, attr: Option<&str>) -> Lookup<'_> {
        let Some(r) = self.find(system, program) else {
            return Lookup::Unknown { suggestions: self.suggest(system, program) };
        };
        let (first, n) = (rd_u32(r, 16) as usize, rd_u32(r, 20) as usize);
        if rd_u32(r, 24) == KIND_NOT_BUILT {
            let nb = self.record(S_NOT_BUILT, NOT_BUILT_REC, first);
            let attr_name = self.str_at(nb, 0);
            if attr.is_some_and(|a| a != attr_name) {
                return Lookup::Unknown { suggestions: Vec::new() };
            }
            return Lookup::NotBuilt { attr: attr_name, store_path: self.str_at(nb, 8) };
        }
        let mut all: Vec<Found<'_>> = (first..first + n).map(|i| self.candidate(i)).collect();
        if let Some(a) = attr {
            let Some(pos) = all.iter().position(|c| c.attr == a) else {
                return Lookup::Unknown { suggestions: Vec::new() };
            };
            let chosen = all.remove(pos);
            all.insert(0, chosen);
        }
        Lookup::Found(all)
    }

    /// Every `(system, program)` key, in file order.
    pub fn programs(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        (0..self.n_programs).map(|i| {
            let r = self.record(S_PROGRAMS, PROGRAM_REC, i);
            (self.str_at(r, 0), self.str_at(r, 8))
        })
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

    /// Up to five known names close to `program` (edit distance ≤ 2, or sharing a prefix).
    pub fn suggest(&self, system: &str, program: &str) -> Vec<String> {
        let mut best: Vec<(usize, &str)> = Vec::new();
        for (s, name) in self.programs() {
            if s != system || name == program {
                continue;
            }
            let d = if name.len().abs_diff(program.len()) <= 2 {
                bounded_distance(program.as_bytes(), name.as_bytes(), 2)
            } else {
                None
            };
            let d = d.or_else(|| (program.len() >= 3 && name.starts_with(program)).then_some(3));
            if let Some(d) = d {
                best.push((d, name));
            }
        }
        best.sort();
        best.dedup_by(|a, b| a.1 == b.1);
        best.into_iter().take(5).map(|(_, n)| n.to_owned()).collect()
    }
}

/// Levenshtein distance, or `None` when it exceeds `max`.
fn bounded_distance(a: &[u8], b: &[u8], max: usize) -> Option<usize> {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        let mut row_min = cur[0];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
            row_min = row_min.min(cur[j + 1]);
        }
        if row_min > max {
            return None;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    (prev[b.len()] <= max).then_some(prev[b.len()])
}
