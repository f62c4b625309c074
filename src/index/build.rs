//! `binplz index build`: from evaluations and the binary cache to an index file.
//!
//! ```text
//!  eval files ─► attributes ─► unique output store paths ─► (≤ jobs at once, with retries)
//!                                  narinfo (verified) ─► .ls listing checked against NarSize,
//!                                                        or a verified walk of the NAR
//!                                  bin/* ─► resolve symlinks (into signed references too)
//!            ─► candidates per (system, program), best first ─► index file (atomic)
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix_derivation::StorePath;
use tokio::sync::{Mutex, Semaphore};

use super::eval::{self, EvalAttr};
use super::format::ProgramEntry;
use super::{Candidate, EvalFailure, Metadata, NotBuilt, ProgramName};
use crate::error::ErrorKind;
use crate::extract::{ExtractError, Extractor, ListingSource};
use crate::nar::{Listing, Node};
use crate::narinfo::VerifiedNarInfo;
use crate::resolve::{self, RelPath, Target, Walked};

/// Attempts per output for transient failures (the HTTP client retries requests on top).
const ATTEMPTS: u32 = 2;

/// An evaluation to read: a file, or bytes already in memory (the built-in demo).
#[derive(Debug, Clone)]
pub enum EvalInput {
    File(PathBuf),
    Bytes { name: String, bytes: &'static [u8] },
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub evals: Vec<EvalInput>,
    pub revision: Option<String>,
    pub jobs: usize,
    /// Draw a progress line on standard error (when it is a terminal).
    pub progress: bool,
}

/// What a build did, for its closing summary.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub attributes: usize,
    pub outputs: usize,
    pub programs: usize,
    pub not_built: usize,
    /// Outputs that could not be scanned (upstream or verification failures).
    pub failures: usize,
    pub eval_failures: usize,
    pub bad_lines: usize,
    pub from_listing: usize,
    pub from_nar: usize,
    pub listings_rejected: usize,
    pub skipped_links: usize,
    /// `bin/` entries leading into a referenced store path that could not be listed (not
    /// in the cache, or failing verification): their programs are left out.
    pub failed_links: usize,
}

/// The built index, ready for [`super::format::write`].
#[derive(Debug, Default)]
pub struct Built {
    pub meta: Metadata,
    pub programs: Vec<ProgramEntry>,
    pub not_built: Vec<NotBuilt>,
    pub failures: Vec<EvalFailure>,
    pub summary: Summary,
    /// `file:line: reason` of evaluation lines that were skipped (`file: attr: reason` for
    /// entries of a nix-env document).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
    #[error("nothing usable was read from the evaluation files")]
    NothingUsable,
}

/// A program found in an output.
#[derive(Debug, Clone)]
struct Found {
    name: String,
    store_path: String,
    path: String,
    size: u64,
    nar_offset: Option<u64>,
}

enum Scan {
    Programs(Vec<Found>),
    NotBuilt,
    Failed(String),
}

#[derive(Default)]
struct Counters {
    done: AtomicUsize,
    programs: AtomicUsize,
    not_built: AtomicUsize,
    failed: AtomicUsize,
}

struct Scanner {
    extractor: Extractor,
    /// Listings of store paths that symlinks in `bin/` lead into, fetched once.
    refs: Mutex<HashMap<StorePath, Arc<(VerifiedNarInfo, Listing)>>>,
    skipped_links: AtomicUsize,
    failed_links: AtomicUsize,
}

pub async fn build(
    extractor: Extractor,
    upstreams: Vec<String>,
    opts: BuildOptions,
) -> Result<Built, BuildError> {
    let mut built = Built::default();
    let mut attrs: Vec<EvalAttr> = Vec::new();
    for input in &opts.evals {
        let (read, name) = match input {
            EvalInput::File(path) => (eval::read(path)?, path.display().to_string()),
            EvalInput::Bytes { name, bytes } => (eval::read_from(*bytes, name)?, name.clone()),
        };
        for (line, reason) in &read.bad_lines {
            built.warnings.push(match line {
                0 => format!("{name}: {reason}"),
                _ => format!("{name}:{line}: {reason}"),
            });
        }
        built.summary.bad_lines += read.bad_lines.len();
        attrs.extend(read.attrs);
        built.failures.extend(read.failures);
    }
    if attrs.is_empty() && built.failures.is_empty() {
        return Err(BuildError::NothingUsable);
    }
    built.summary.attributes = attrs.len();
    built.summary.eval_failures = built.failures.len();

    // Each store path once, however many attributes share it.
    let outputs: BTreeSet<&str> = attrs
        .iter()
        .flat_map(|a| a.outputs.values().map(String::as_str))
        .collect();
    built.summary.outputs = outputs.len();
    let scanner = Arc::new(Scanner {
        extractor,
        refs: Mutex::default(),
        skipped_links: AtomicUsize::new(0),
        failed_links: AtomicUsize::new(0),
    });
    let counters = Arc::new(Counters::default());
    let semaphore = Arc::new(Semaphore::new(opts.jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for out in &outputs {
        let (scanner, counters, semaphore) = (scanner.clone(), counters.clone(), semaphore.clone());
        let out = (*out).to_owned();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            let result = scanner.scan_with_retries(&out).await;
            match &result.0 {
                Scan::Programs(p) => counters.programs.fetch_add(p.len(), Ordering::Relaxed),
                Scan::NotBuilt => counters.not_built.fetch_add(1, Ordering::Relaxed),
                Scan::Failed(_) => counters.failed.fetch_add(1, Ordering::Relaxed),
            };
            counters.done.fetch_add(1, Ordering::Relaxed);
            (out, result)
        });
    }
    let progress = (opts.progress && std::io::stderr().is_terminal()).then(|| {
        let bar = progress_bar(outputs.len(), attrs.len());
        let (counters, shown) = (counters.clone(), bar.clone());
        let attributes = attrs.len();
        let task = tokio::spawn(async move {
            loop {
                draw(&shown, &counters, attributes);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        (bar, task)
    });
    let mut scans: HashMap<String, Scan> = HashMap::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((out, (scan, source))) => {
                match source {
                    Some(ListingSource::Ls) => built.summary.from_listing += 1,
                    Some(ListingSource::Nar { ls_rejected }) => {
                        built.summary.from_nar += 1;
                        built.summary.listings_rejected += usize::from(ls_rejected.is_some());
                    }
                    None => {}
                }
                if let Scan::Failed(reason) = &scan {
                    tracing::warn!(store_path = %out, %reason, "output not indexed");
                }
                scans.insert(out, scan);
            }
            Err(e) => tracing::error!(err = %e, "scan task failed"),
        }
    }
    if let Some((bar, task)) = progress {
        task.abort();
        draw(&bar, &counters, built.summary.attributes);
        bar.finish();
        eprintln!();
    }
    built.summary.skipped_links = scanner.skipped_links.load(Ordering::Relaxed);
    built.summary.failed_links = scanner.failed_links.load(Ordering::Relaxed);
    assemble(&mut built, &attrs, &scans);
    let systems: BTreeSet<&str> = attrs.iter().map(|a| a.system.as_str()).collect();
    built.meta = Metadata {
        revision: opts.revision,
        systems: systems.into_iter().map(str::to_owned).collect(),
        created: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        upstreams,
        attributes: built.summary.attributes as u64,
        outputs: built.summary.outputs as u64,
        programs: built.summary.programs as u64,
        not_built: built.summary.not_built as u64,
        failures: (built.summary.failures + built.summary.eval_failures) as u64,
    };
    Ok(built)
}

/// A progress bar on standard error: listings fetched of all outputs, their rate and the
/// time left.
fn progress_bar(outputs: usize, attributes: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(outputs as u64);
    let style = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:24}] {pos}/{len} listings, {per_sec}, ETA {eta}  {wide_msg}",
    )
    .map(|s| s.progress_chars("=> "));
    if let Ok(style) = style {
        bar.set_style(style);
    }
    bar.set_message(format!("{attributes} attributes read"));
    bar
}

fn draw(bar: &indicatif::ProgressBar, c: &Counters, attributes: usize) {
    bar.set_position(c.done.load(Ordering::Relaxed) as u64);
    bar.set_message(format!(
        "{attributes} attributes · {} programs · {} not built · {} failed",
        c.programs.load(Ordering::Relaxed),
        c.not_built.load(Ordering::Relaxed),
        c.failed.load(Ordering::Relaxed),
    ));
}

/// Turns scans into candidates grouped by `(system, program)`, best first.
fn assemble(built: &mut Built, attrs: &[EvalAttr], scans: &HashMap<String, Scan>) {
    let mut groups: BTreeMap<(String, String), Vec<Candidate>> = BTreeMap::new();
    // With the rank of the attribute it came from, so several not-built providers of one
    // name are chosen between as built ones are.
    let mut not_built: BTreeMap<(String, String), (NotBuiltRank, NotBuilt)> = BTreeMap::new();
    for attr in attrs {
        let mut any_built = false;
        let mut missing: Option<&str> = None;
        for (output, store_path) in &attr.outputs {
            match scans.get(store_path) {
                Some(Scan::Programs(found)) => {
                    any_built = true;
                    for f in found {
                        let key = (attr.system.clone(), f.name.clone());
                        groups.entry(key).or_default().push(Candidate {
                            attr: attr.attr.clone(),
                            attr_path_len: attr.attr_path_len,
                            main_program: attr.main_program.clone(),
                            output: output.clone(),
                            output_path: store_path.clone(),
                            store_path: f.store_path.clone(),
                            path: f.path.clone(),
                            size: f.size,
                            executable: true,
                            sha256: None,
                            nar_offset: f.nar_offset,
                            drv_path: attr.drv_path.clone(),
                        });
                    }
                }
                Some(Scan::NotBuilt) => {
                    if missing.is_none() || output == "bin" {
                        missing = Some(store_path);
                    }
                }
                Some(Scan::Failed(_)) | None => {}
            }
        }
        if let (false, Some(store_path)) = (any_built, missing) {
            // What a user would type for it: its name, and its declared main program.
            let last = attr.attr.rsplit('.').next().unwrap_or(&attr.attr);
            for name in [Some(last), attr.main_program.as_deref()]
                .into_iter()
                .flatten()
            {
                if ProgramName::parse(name).is_none() {
                    continue;
                }
                let nb = NotBuilt {
                    system: attr.system.clone(),
                    program: name.to_owned(),
                    attr: attr.attr.clone(),
                    store_path: store_path.to_owned(),
                    drv_path: attr.drv_path.clone(),
                };
                let key = (nb.system.clone(), nb.program.clone());
                let rank = not_built_rank(attr, name);
                match not_built.get(&key) {
                    Some((old, _)) if *old <= rank => {}
                    _ => {
                        not_built.insert(key, (rank, nb));
                    }
                }
            }
        }
    }
    built.summary.not_built = scans
        .values()
        .filter(|s| matches!(s, Scan::NotBuilt))
        .count();
    built.summary.failures = scans
        .values()
        .filter(|s| matches!(s, Scan::Failed(_)))
        .count();
    for ((system, program), mut candidates) in groups {
        candidates.sort_by(|a, b| a.rank(&program).cmp(&b.rank(&program)));
        // One candidate per attribute: its preferred output (bin before out).
        let mut seen = BTreeSet::new();
        candidates.retain(|c| seen.insert(c.attr.clone()));
        built.summary.programs += 1;
        built.programs.push(ProgramEntry {
            system,
            program,
            candidates,
        });
    }
    built.not_built = not_built.into_values().map(|(_, nb)| nb).collect();
}

/// [`Candidate::rank`]'s attribute part, for attributes with no candidate to rank.
type NotBuiltRank = (bool, bool, u32, usize, String);

fn not_built_rank(attr: &EvalAttr, program: &str) -> NotBuiltRank {
    (
        attr.attr != program,
        attr.main_program.as_deref() != Some(program),
        attr.attr_path_len,
        attr.attr.len(),
        attr.attr.clone(),
    )
}

impl Scanner {
    async fn scan_with_retries(&self, out: &str) -> (Scan, Option<ListingSource>) {
        let Ok(store_path) = crate::extract::parse_store_path(out) else {
            return (Scan::Failed(format!("invalid store path {out:?}")), None);
        };
        let mut attempt = 1;
        loop {
            match self.scan(&store_path).await {
                Ok((found, source)) => return (Scan::Programs(found), Some(source)),
                Err(e) if e.kind() == ErrorKind::NotInCache => return (Scan::NotBuilt, None),
                Err(e)
                    if attempt < ATTEMPTS
                        && matches!(e.kind(), ErrorKind::UpstreamBroken | ErrorKind::TimedOut) =>
                {
                    tracing::debug!(%store_path, err = %e, "retrying output");
                    attempt += 1;
                }
                Err(e) => return (Scan::Failed(e.to_string()), None),
            }
        }
    }

    /// The programs in `bin/` of one output.
    async fn scan(
        &self,
        store_path: &StorePath,
    ) -> Result<(Vec<Found>, ListingSource), ExtractError> {
        let (info, listing, source) = self.extractor.listing(store_path).await?;
        let mut hops = 0;
        let bin = match resolve::walk(&listing, &RelPath::parse(b"bin"), &mut hops) {
            Ok(Walked::Directory(p)) => p,
            _ => return Ok((Vec::new(), source)),
        };
        let Some(Node::Directory { entries }) = listing.get(&bin.0) else {
            return Ok((Vec::new(), source));
        };
        let mut found = Vec::new();
        for name in entries.keys() {
            let Some(name) = std::str::from_utf8(name).ok().and_then(ProgramName::parse) else {
                continue;
            };
            let mut path = bin.clone();
            path.0.push(name.as_str().as_bytes().to_vec());
            match self.follow(store_path, &info, &listing, &path).await {
                Ok(Some((sp, p, size, nar_offset))) => found.push(Found {
                    name: name.as_str().to_owned(),
                    store_path: sp,
                    path: p,
                    size,
                    nar_offset,
                }),
                Ok(None) => {
                    self.skipped_links.fetch_add(1, Ordering::Relaxed);
                }
                // A reference the upstream failed to give: the whole output is tried again,
                // as when its own listing fails.
                Err(e) if matches!(e.kind(), ErrorKind::UpstreamBroken | ErrorKind::TimedOut) => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(%store_path, program = name.as_str(), err = %e, "program left out: its link leads into a store path that cannot be listed");
                    self.failed_links.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok((found, source))
    }

    /// Resolves `path` with the extractor's rules, into signed references too. `None` for
    /// anything that is not an executable regular file in the end; an error if a reference
    /// on the way cannot be listed.
    async fn follow(
        &self,
        store_path: &StorePath,
        info: &VerifiedNarInfo,
        listing: &Listing,
        path: &RelPath,
    ) -> Result<Option<(String, String, u64, Option<u64>)>, ExtractError> {
        let mut hops = 0;
        let mut here: Option<Arc<(VerifiedNarInfo, Listing)>> = None;
        let mut current = store_path.clone();
        let mut path = path.clone();
        loop {
            let (info, listing) = match &here {
                Some(pair) => (&pair.0, &pair.1),
                None => (info, listing),
            };
            match resolve::resolve(listing, &path, &mut hops) {
                Ok(Target::File {
                    path,
                    size,
                    executable,
                }) => {
                    if !executable {
                        return Ok(None);
                    }
                    let nar_offset = match listing.get(&path.0) {
                        Some(Node::Regular { nar_offset, .. }) => *nar_offset,
                        _ => None,
                    };
                    return Ok(Some((
                        current.to_absolute_path(),
                        path.to_string(),
                        size,
                        nar_offset,
                    )));
                }
                Ok(Target::StorePath {
                    store_path: next,
                    rest,
                }) => {
                    if !info.references(&next) {
                        return Ok(None);
                    }
                    let next_pair = self.reference(&next).await?;
                    here = Some(next_pair);
                    current = next;
                    path = rest;
                }
                Err(_) => return Ok(None),
            }
        }
    }

    /// A referenced store path's narinfo and listing, fetched once per build (failures
    /// are not kept: a later link tries again).
    async fn reference(
        &self,
        store_path: &StorePath,
    ) -> Result<Arc<(VerifiedNarInfo, Listing)>, ExtractError> {
        if let Some(hit) = self.refs.lock().await.get(store_path) {
            return Ok(hit.clone());
        }
        let (info, listing, _) = self.extractor.listing(store_path).await?;
        let pair = Arc::new((info, listing));
        self.refs
            .lock()
            .await
            .insert(store_path.clone(), pair.clone());
        Ok(pair)
    }
}
