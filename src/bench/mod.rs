//! The NAR-extraction benchmark, shared by `binplz bench` and `cargo bench --bench extract`.
//!
//! ```text
//!  inputs: --nar FILE ─┐  (codec from magic bytes; decoded, walked strictly)
//!          --cache URL ─┼─► Input: NAR + NarHash + the file to keep  ─► failures reported,
//!          --generate ──┘  (cache: signed narinfo, NarHash checked)       never timed
//!     ─► per codec setting: recompress (checked to round-trip) or as found
//!     ─► wait for a quiet machine ─► measure: verified pass, decode-only, SHA-256-only,
//!        peak RSS ─► [nix nar cat] ─► Row ─► table or JSON
//! ```
//!
//! On two cores the verified pass can at best run at the slower of decoding and hashing,
//! so `limit = min(decode, hash)` (just `hash` for uncompressed NARs, which have no
//! decoding to do) and `extract / limit` says how close the pass gets. Throughput is MB
//! (10^6 bytes) of uncompressed NAR per second; the same time over the compressed bytes
//! gives the rate at which an edge node consumes its download.

pub mod command;
pub mod generate;
pub mod inputs;
pub mod machine;
pub mod measure;
pub mod memory;
pub mod nix;
pub mod recompress;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use inputs::{Input, InputKind};
use measure::{Case, Cell, MeasureError, Runs};
use memory::{Memory, MemoryError};
use nix::{NixError, NixFigures};
use recompress::Setting;

use crate::codec::Codec;

/// Goals: the pass within 5 % of its limit for the codecs caches use today, within 10 %
/// of hashing alone for uncompressed NARs.
pub const GOAL_COMPRESSED: f64 = 0.95;
pub const GOAL_NONE: f64 = 0.90;

/// What generated NARs are compressed with when no `--codecs` is given: what caches write.
pub const DEFAULT_GENERATED: [Setting; 3] = [Setting::ZSTD_19, Setting::XZ_6, Setting::NONE];

/// How to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Recompress every input at these settings; empty: measure each NAR as found
    /// (generated ones at [`DEFAULT_GENERATED`]).
    pub settings: Vec<Setting>,
    pub runs: Runs,
    /// How long to wait for other processes to go quiet before each measurement.
    pub quiet_wait: Duration,
    /// Runs of `nix nar cat` per cell, when comparing.
    pub compare_nix: Option<usize>,
    /// Where compressed forms of generated NARs are kept between runs.
    pub keep_dir: Option<PathBuf>,
    /// The binplz executable that measures peak memory in a fresh process (see
    /// [`memory`]); without one, memory is not measured.
    pub memory_probe: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{input} {setting}: compressing failed: {err}")]
    Compress {
        input: String,
        setting: Setting,
        err: std::io::Error,
    },
    #[error("{input} {setting}: {err}")]
    Measure {
        input: String,
        setting: Setting,
        err: MeasureError,
    },
    #[error("{input} {setting}: {err}")]
    Nix {
        input: String,
        setting: Setting,
        err: NixError,
    },
    #[error("{input} {setting}: {err}")]
    Memory {
        input: String,
        setting: Setting,
        err: MemoryError,
    },
    #[error("cannot write a temp file: {0}")]
    TempDir(std::io::Error),
}

/// Every figure of one input at one setting.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    pub input: String,
    pub kind: InputKind,
    /// `zstd:19`, or the bare codec for a NAR measured as found.
    pub codec: String,
    /// Whether the NAR was recompressed for this row (`--codecs`).
    pub recompressed: bool,
    /// The file the verified pass kept.
    pub wanted: String,
    /// The NarHash every pass of this row verified (`sha256:` and Nix's base-32).
    pub nar_hash: String,
    pub nar_bytes: u64,
    pub compressed_bytes: u64,
    /// NAR bytes per compressed byte.
    pub compression_ratio: f64,
    pub runs: usize,
    /// The verified pass, MB of NAR per second.
    pub extract_mb_s: f64,
    /// The verified pass, MB of compressed input per second.
    pub extract_compressed_mb_s: f64,
    pub decode_mb_s: f64,
    pub hash_mb_s: f64,
    pub limit_mb_s: f64,
    pub extract_over_limit: f64,
    /// Interquartile range over the median of the pass's runs.
    pub spread: f64,
    /// Share of all cores other processes used during the measurement.
    pub others_cpu: f64,
    pub goal: Option<f64>,
    /// Peak memory of each measure, each in a fresh process.
    pub extract_memory: Option<Memory>,
    pub decode_memory: Option<Memory>,
    pub hash_memory: Option<Memory>,
    pub nix: Option<NixFigures>,
}

impl Row {
    pub fn met_goal(&self) -> Option<bool> {
        self.goal.map(|g| self.extract_over_limit >= g)
    }
}

/// The whole benchmark: the machine, every row, every input that failed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub binplz_version: &'static str,
    /// `/proc/cpuinfo`'s model name, or the architecture where it has none.
    pub cpu_model: String,
    pub cores: usize,
    pub rows: Vec<Row>,
    pub failures: Vec<inputs::Failure>,
    /// The most CPU other processes took during any measurement.
    pub others_cpu_max: f64,
    pub seconds: f64,
}

impl Report {
    pub fn new() -> Report {
        Report {
            binplz_version: env!("CARGO_PKG_VERSION"),
            cpu_model: machine::cpu_model().unwrap_or_else(|| std::env::consts::ARCH.to_owned()),
            cores: machine::cores(),
            rows: Vec::new(),
            failures: Vec::new(),
            others_cpu_max: 0.0,
            seconds: 0.0,
        }
    }
}

impl Default for Report {
    fn default() -> Self {
        Report::new()
    }
}

/// The settings `input` is measured at.
pub fn settings_for(input: &Input, plan: &Plan) -> Vec<Setting> {
    if !plan.settings.is_empty() {
        return plan.settings.clone();
    }
    match &input.found {
        Some((codec, _)) => vec![Setting::found(*codec)],
        None => DEFAULT_GENERATED.to_vec(),
    }
}

/// Measures `input` at every setting of `plan`, calling `step` before each (with what it
/// is about to do) and `done` after.
pub fn measure_input(
    input: &Input,
    plan: &Plan,
    mut step: impl FnMut(&str),
    mut done: impl FnMut(),
) -> Result<Vec<Row>, BenchError> {
    let tmp = tempfile::tempdir().map_err(BenchError::TempDir)?;
    let mut rows = Vec::new();
    for setting in settings_for(input, plan) {
        let label = &input.label;
        let (data, recompressed) = match (&input.found, plan.settings.is_empty()) {
            (Some((_, data)), true) => (data.clone(), false),
            _ => {
                step(&format!("{label}: compressing at {setting}"));
                let keep = match (&plan.keep_dir, &input.keep_stem) {
                    (Some(dir), Some(stem)) => Some((dir.as_path(), stem.as_str())),
                    _ => None,
                };
                let data = recompress::compressed(&input.nar, &input.nar_hash, setting, keep)
                    .map_err(|err| BenchError::Compress {
                        input: label.clone(),
                        setting,
                        err,
                    })?;
                (data, input.found.is_some())
            }
        };
        step(&format!("{label} {setting}: measuring"));
        let case = Case {
            nar: &input.nar,
            nar_hash: input.nar_hash,
            wanted: &input.wanted,
            wanted_size: input.wanted_size,
            codec: setting.codec,
            data: &data,
        };
        let (cell, others) =
            measure::while_quiet(plan.quiet_wait, || case.measure(plan.runs, tmp.path())).map_err(
                |err| BenchError::Measure {
                    input: label.clone(),
                    setting,
                    err,
                },
            )?;
        // The file the child processes read, named so that its codec is known.
        let file = tmp.path().join(format!("input.{}", setting.suffix()));
        std::fs::write(&file, &data[..]).map_err(BenchError::TempDir)?;
        let memory = match &plan.memory_probe {
            Some(exe) => {
                step(&format!("{label} {setting}: peak memory"));
                let one = |kind| {
                    memory::measure(exe, kind, &file, &input.wanted).map_err(|err| {
                        BenchError::Memory {
                            input: label.clone(),
                            setting,
                            err,
                        }
                    })
                };
                Some([
                    one(memory::Kind::Extract)?,
                    one(memory::Kind::Decode)?,
                    one(memory::Kind::Hash)?,
                ])
            }
            None => None,
        };
        let nix = match plan.compare_nix {
            Some(runs) => {
                step(&format!("{label} {setting}: nix nar cat"));
                Some(
                    nix::nar_cat(
                        setting.codec,
                        &file,
                        input.nar.len() as u64,
                        &input.wanted,
                        input.wanted_size,
                        runs,
                        tmp.path(),
                    )
                    .map_err(|err| BenchError::Nix {
                        input: label.clone(),
                        setting,
                        err,
                    })?,
                )
            }
            None => None,
        };
        let _ = std::fs::remove_file(&file);
        let mut row = row(input, setting, recompressed, &data, &cell, others);
        if let Some([extract, decode, hash]) = memory {
            row.extract_memory = Some(extract);
            row.decode_memory = Some(decode);
            row.hash_memory = Some(hash);
        }
        row.nix = nix;
        rows.push(row);
        done();
    }
    Ok(rows)
}

fn row(
    input: &Input,
    setting: Setting,
    recompressed: bool,
    data: &Arc<[u8]>,
    cell: &Cell,
    others: f64,
) -> Row {
    let n = input.nar.len() as f64;
    let mb_s = |d: Duration| n / d.as_secs_f64().max(1e-9) / 1e6;
    let extract = mb_s(cell.extract.median());
    let decode = mb_s(cell.decode.median());
    let hash = mb_s(cell.hash.median());
    // Uncompressed NARs have no decoding to do: hashing alone bounds them.
    let limit = match setting.codec {
        Codec::None => hash,
        _ => decode.min(hash),
    };
    let goal = match setting.codec {
        Codec::Zstd | Codec::Xz => Some(GOAL_COMPRESSED),
        Codec::None => Some(GOAL_NONE),
        _ => None,
    };
    Row {
        input: input.label.clone(),
        kind: input.kind,
        codec: setting.to_string(),
        recompressed,
        wanted: input.wanted.to_string(),
        nar_hash: format!("sha256:{}", crate::hash::nix32(&input.nar_hash)),
        nar_bytes: input.nar.len() as u64,
        compressed_bytes: data.len() as u64,
        compression_ratio: n / (data.len() as f64).max(1.0),
        runs: cell.extract.0.len(),
        extract_mb_s: extract,
        extract_compressed_mb_s: extract * data.len() as f64 / n.max(1.0),
        decode_mb_s: decode,
        hash_mb_s: hash,
        limit_mb_s: limit,
        extract_over_limit: extract / limit.max(1e-9),
        spread: cell.extract.spread(),
        others_cpu: others,
        goal,
        extract_memory: None,
        decode_memory: None,
        hash_memory: None,
        nix: None,
    }
}

/// The report as a table for a terminal.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "binplz {} NAR extraction on {} ({} cores)",
        report.binplz_version, report.cpu_model, report.cores
    );
    let nix = report.rows.iter().any(|r| r.nix.is_some());
    let mut head = format!(
        "{:<28} {:>8} {:>8} {:>8} {:>6} {:>4} {:>8} {:>7} {:>7} {:>6} {:>6} {:>7} {:>6} {:>6} {:>6}",
        "input",
        "codec",
        "NAR MB",
        "file MB",
        "ratio",
        "runs",
        "extract",
        "(file)",
        "decode",
        "hash",
        "limit",
        "x/limit",
        "spread",
        "others",
        "RSS MB",
    );
    if nix {
        head.push_str(&format!(" {:>8} {:>7}", "nix MB/s", "nix RSS"));
    }
    head.push_str("  goal");
    let _ = writeln!(out, "{head}");
    let mb = |b: u64| b as f64 / 1e6;
    for r in &report.rows {
        let decode = match r.codec.as_str() {
            "none" => "-".to_owned(),
            _ => format!("{:.0}", r.decode_mb_s),
        };
        let mut line = format!(
            "{:<28} {:>8} {:>8.2} {:>8.2} {:>5.2}x {:>4} {:>8.0} {:>7.0} {:>7} {:>6.0} {:>6.0} {:>7.3} {:>5.1}% {:>5.1}% {:>6}",
            shorten(&r.input, 28),
            r.codec,
            mb(r.nar_bytes),
            mb(r.compressed_bytes),
            r.compression_ratio,
            r.runs,
            r.extract_mb_s,
            r.extract_compressed_mb_s,
            decode,
            r.hash_mb_s,
            r.limit_mb_s,
            r.extract_over_limit,
            r.spread * 100.0,
            r.others_cpu * 100.0,
            r.extract_memory
                .map_or("-".to_owned(), |m| format!("{:.1}", mb(m.peak_rss_bytes))),
        );
        if nix {
            match &r.nix {
                Some(n) => {
                    line.push_str(&format!(" {:>8.0} {:>6.0}M", n.mb_s, mb(n.peak_rss_bytes)))
                }
                None => line.push_str(&format!(" {:>8} {:>7}", "-", "-")),
            }
        }
        match (r.goal, r.met_goal()) {
            (Some(g), Some(true)) => line.push_str(&format!("  ok (>= {g})")),
            (Some(g), _) => line.push_str(&format!("  MISSED (< {g})")),
            (None, _) => line.push_str("  (reported only)"),
        }
        let _ = writeln!(out, "{line}");
    }
    for f in &report.failures {
        let _ = writeln!(
            out,
            "{:<28} FAILED: {}: {}",
            shorten(&f.input, 28),
            f.kind,
            f.error
        );
    }
    let _ = writeln!(
        out,
        "MB/s of NAR (10^6 bytes), median of `runs`; (file) = the same pass in MB/s of the \
         compressed file; limit = min(decode, hash), or hash for none; RSS MB = peak RSS of \
         a binplz process doing the pass alone, streaming the file; others = CPU share other processes took (at most {:.1}%); {:.0} s",
        report.others_cpu_max * 100.0,
        report.seconds
    );
    out
}

/// `s` in at most `width` characters: without `/nix/store/`, and when still too long, its
/// start (a store path's hash) and its end (its name) around an ellipsis.
fn shorten(s: &str, width: usize) -> String {
    let s = s.strip_prefix("/nix/store/").unwrap_or(s);
    let n = s.chars().count();
    if n <= width || width < 12 {
        return s.to_owned();
    }
    let head: String = s.chars().take(8).collect();
    let tail: String = s.chars().skip(n - (width - 9)).collect();
    format!("{head}…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_store_paths_keep_their_hash_start_and_name() {
        assert_eq!(shorten("/nix/store/abc-x", 28), "abc-x");
        let long = "/nix/store/zpya58m9bxib49ddjq6jdk22xiy6219w-busybox";
        let short = shorten(long, 28);
        assert_eq!(short.chars().count(), 28);
        assert!(
            short.starts_with("zpya58m9…") && short.ends_with("-busybox"),
            "{short}"
        );
    }
}
