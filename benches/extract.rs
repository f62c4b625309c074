//! `cargo bench --bench extract`: how close one verified extraction pass gets to the speed
//! of its slowest part.
//!
//! For each NAR size and codec, three things are timed on the same input, interleaved so
//! that a busy machine disturbs them alike:
//!
//! ```text
//!   extract  run_pass: decode thread ─► channel ─► SHA-256 + NAR parse + keep bin/hello
//!   decode   Codec::decoder ─► io::copy ─► io::sink()         (one core)
//!   hash     SHA-256 over the uncompressed NAR, in memory      (one core)
//! ```
//!
//! On two cores the pipeline can at best run at the slower of decode and hash, so
//! `limit = min(decode, hash)` (just `hash` for uncompressed NARs, which have no decode
//! thread). Throughput is bytes of uncompressed NAR per second, printed in MB/s
//! (MB = 10^6 bytes); each figure is the median of several runs.
//!
//! Environment:
//! - `BINPLZ_BENCH_SIZES=0.3,7` NAR sizes in MB (default `0.3,7,30,100`)
//! - `BINPLZ_BENCH_CODECS=zstd,none` codecs (default `zstd,xz,bzip2,none`)
//! - `BINPLZ_BENCH_QUICK=1` fewer runs
//! - `BINPLZ_BENCH_QUIET_WAIT=60` seconds to wait for other processes to go quiet before
//!   each measurement (0: do not wait); the `others` column says how much CPU they took
//! - `BINPLZ_BENCH_WRITE_INPUTS=DIR` only write the inputs (`DIR/<size>MB.nar.zst`, ...)
//!   and exit, for `benches/nix-nar-cat.sh`

mod inputs;
mod machine;

use std::error::Error;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use binplz::codec::Codec;
use binplz::pipeline::{run_pass, Expected};
use binplz::resolve::RelPath;
use sha2::{Digest, Sha256};

use inputs::{Compressed, Nar, SharedReader};

const DEFAULT_SIZES: &str = "0.3,7,30,100";
const DEFAULT_CODECS: &str = "zstd,xz,bzip2,none";

/// Goals: the pipeline within 5 % of its limit for the codecs caches use today, within
/// 10 % of hashing alone for uncompressed NARs.
const GOAL_COMPRESSED: f64 = 0.95;
const GOAL_NONE: f64 = 0.90;

/// Waiting for a quiet machine before each measurement, and measuring again (at most
/// `ATTEMPTS` times in all) when others used more than `machine::QUIET` of it meanwhile.
const DEFAULT_QUIET_WAIT: Duration = Duration::from_secs(60);
const ATTEMPTS: usize = 3;

type BenchResult<T> = Result<T, Box<dyn Error>>;

struct Settings {
    /// Label (`"7MB"`) and target size in bytes.
    sizes: Vec<(String, u64)>,
    codecs: Vec<Codec>,
    runs: Runs,
    /// How long to wait for other processes to go quiet before each measurement.
    quiet_wait: Duration,
    write_inputs: Option<PathBuf>,
}

/// How many timed runs a (size, codec) cell gets: as many as fit in `budget`, within bounds.
#[derive(Clone, Copy)]
struct Runs {
    budget: Duration,
    min: usize,
    max: usize,
}

impl Runs {
    fn for_estimate(self, one: Duration) -> usize {
        let fit = (self.budget.as_secs_f64() / one.as_secs_f64().max(1e-9)) as usize;
        // Odd, so the median is one of the runs.
        fit.clamp(self.min, self.max) | 1
    }
}

impl Settings {
    fn from_env() -> BenchResult<Settings> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let sizes = var("BINPLZ_BENCH_SIZES")
            .unwrap_or_else(|| DEFAULT_SIZES.to_owned())
            .split(',')
            .map(|s| {
                let s = s.trim().trim_end_matches("MB");
                match s.parse::<f64>() {
                    Ok(mb) if mb.is_finite() && mb > 0.0 && mb <= 4000.0 => {
                        Ok((format!("{s}MB"), (mb * 1e6).round() as u64))
                    }
                    _ => Err(format!("BINPLZ_BENCH_SIZES: {s:?} is not a size in MB")),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let codecs = var("BINPLZ_BENCH_CODECS")
            .unwrap_or_else(|| DEFAULT_CODECS.to_owned())
            .split(',')
            .map(|c| match c.trim() {
                "zstd" => Ok(Codec::Zstd),
                "xz" => Ok(Codec::Xz),
                "bzip2" => Ok(Codec::Bzip2),
                "none" => Ok(Codec::None),
                other => Err(format!("BINPLZ_BENCH_CODECS: unknown codec {other:?}")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let quick = var("BINPLZ_BENCH_QUICK").is_some_and(|v| v != "0");
        let runs = if quick {
            Runs {
                budget: Duration::from_millis(1500),
                min: 3,
                max: 21,
            }
        } else {
            Runs {
                budget: Duration::from_secs(6),
                min: 5,
                max: 101,
            }
        };
        let quiet_wait = match var("BINPLZ_BENCH_QUIET_WAIT") {
            None => DEFAULT_QUIET_WAIT,
            Some(v) => Duration::from_secs(v.trim().parse().map_err(|_| {
                format!("BINPLZ_BENCH_QUIET_WAIT: {v:?} is not a number of seconds")
            })?),
        };
        Ok(Settings {
            sizes,
            codecs,
            runs,
            quiet_wait,
            write_inputs: var("BINPLZ_BENCH_WRITE_INPUTS").map(PathBuf::from),
        })
    }
}

/// Bytes processed in a time: the benchmark's unit. Printed as MB/s (10^6 bytes).
#[derive(Clone, Copy)]
struct Throughput {
    bytes: u64,
    time: Duration,
}

impl Throughput {
    fn bytes_per_sec(self) -> f64 {
        self.bytes as f64 / self.time.as_secs_f64()
    }
    fn mb_per_sec(self) -> f64 {
        self.bytes_per_sec() / 1e6
    }
}

/// Timings of one measure, in run order.
#[derive(Default)]
struct Samples(Vec<Duration>);

impl Samples {
    fn sorted(&self) -> Vec<Duration> {
        let mut v = self.0.clone();
        v.sort();
        v
    }
    fn median(&self) -> Duration {
        let v = self.sorted();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }
    /// Interquartile range over the median: how noisy the runs were.
    fn spread(&self) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return 0.0;
        }
        let q = |p: usize| v[(v.len() - 1) * p / 4].as_secs_f64();
        (q(3) - q(1)) / self.median().as_secs_f64().max(1e-12)
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench extract: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> BenchResult<()> {
    let settings = Settings::from_env()?;
    let started = Instant::now();
    let nars: Vec<Nar> = settings
        .sizes
        .iter()
        .map(|(label, size)| inputs::generate(label, *size))
        .collect();
    let compressed = inputs::compressed(&nars, &settings.codecs)?;
    eprintln!(
        "inputs ready and checked in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    if let Some(dir) = &settings.write_inputs {
        return write_inputs(dir, &nars, &compressed);
    }

    println!(
        "binplz extraction vs. its limit ({} cores)",
        machine::cores()
    );
    println!("MB/s = 10^6 bytes of uncompressed NAR per second, median of `runs`; spread = IQR/median of extract;");
    println!("others = CPU share (of all cores) other processes used during the measurement");
    println!("limit = min(decode, hash), or hash for none; goal: extract/limit >= {GOAL_COMPRESSED} for zstd and xz, >= {GOAL_NONE} for none");
    println!();
    println!(
        "{:>7} {:>5} {:>11} {:>6} {:>4} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6}  goal",
        "size",
        "codec",
        "nar bytes",
        "comp",
        "runs",
        "extract",
        "decode",
        "hash",
        "limit",
        "x/limit",
        "spread",
        "others"
    );
    let tmp = tempfile::tempdir()?;
    let mut missed = Vec::new();
    for (nar, row) in nars.iter().zip(&compressed) {
        for (codec, data) in row {
            let (cell, others) = while_quiet(&settings, || {
                measure(nar, *codec, data, tmp.path(), Some(settings.runs))
            })?;
            let n = nar.bytes.len() as u64;
            let tp = |d: Duration| Throughput { bytes: n, time: d };
            let (extract, decode, hash) = (
                tp(cell.extract.median()),
                tp(cell.decode.median()),
                tp(cell.hash.median()),
            );
            // Uncompressed NARs have no decode thread: hashing alone bounds them.
            let limit = match codec {
                Codec::None => hash,
                _ if decode.bytes_per_sec() < hash.bytes_per_sec() => decode,
                _ => hash,
            };
            let ratio = extract.bytes_per_sec() / limit.bytes_per_sec();
            let goal = match codec {
                Codec::Zstd | Codec::Xz => Some(GOAL_COMPRESSED),
                Codec::None => Some(GOAL_NONE),
                _ => None,
            };
            let verdict = match goal {
                Some(g) if ratio >= g => format!("ok (>= {g})"),
                Some(g) => {
                    missed.push(format!("{} {codec}", nar.label));
                    format!("MISSED (< {g})")
                }
                None => "(reported only)".to_owned(),
            };
            let decode_col = match codec {
                Codec::None => "-".to_owned(),
                _ => format!("{:.0}", decode.mb_per_sec()),
            };
            println!(
                "{:>7} {:>5} {:>11} {:>5.2}x {:>4} {:>8.0} {:>8} {:>8.0} {:>8.0} {:>7.3} {:>5.1}% {:>5.1}%  {verdict}",
                nar.label,
                codec.as_str(),
                n,
                n as f64 / data.len() as f64,
                cell.extract.0.len(),
                extract.mb_per_sec(),
                decode_col,
                hash.mb_per_sec(),
                limit.mb_per_sec(),
                ratio,
                cell.extract.spread() * 100.0,
                others * 100.0,
            );
        }
    }
    println!();
    if missed.is_empty() {
        println!("all goals met");
    } else {
        println!("goals missed: {}", missed.join(", "));
    }
    println!("total {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Runs `f` once the machine is quiet, again if others got busy meanwhile; returns the
/// quietest attempt and the share of the machine others used during it.
fn while_quiet<T>(
    settings: &Settings,
    mut f: impl FnMut() -> BenchResult<T>,
) -> BenchResult<(T, f64)> {
    let mut best: Option<(T, f64)> = None;
    for _ in 0..ATTEMPTS {
        if !settings.quiet_wait.is_zero() && !machine::wait_quiet(settings.quiet_wait) {
            eprintln!(
                "the machine is still busy after {} s: measuring anyway",
                settings.quiet_wait.as_secs()
            );
        }
        let before = machine::Snapshot::now();
        let value = f()?;
        let others = before.map_or(0.0, |b| b.others_since(machine::cores()));
        if best.as_ref().is_none_or(|(_, o)| others < *o) {
            best = Some((value, others));
        }
        if others < machine::QUIET {
            break;
        }
    }
    best.ok_or_else(|| "no attempt was made".into())
}

#[derive(Default)]
struct Cell {
    extract: Samples,
    decode: Samples,
    hash: Samples,
}

/// Times extraction, decoding and hashing of one input, interleaved: as many rounds as
/// `runs` allows after a checked warm-up round, or a single round without one (`None`).
fn measure(
    nar: &Nar,
    codec: Codec,
    data: &Arc<[u8]>,
    tmp: &Path,
    runs: Option<Runs>,
) -> BenchResult<Cell> {
    let wanted = RelPath::parse(inputs::WANTED.as_bytes());
    let expected = Expected {
        nar_hash: Some(nar.sha256),
        nar_size: Some(nar.bytes.len() as u64),
    };
    let n = nar.bytes.len() as u64;

    let extract = || -> BenchResult<Duration> {
        let source = SharedReader::new(data.clone());
        let t = Instant::now();
        let pass = run_pass(source, codec, expected, &wanted, tmp)?;
        let elapsed = t.elapsed();
        let captured = pass.captured.ok_or("run_pass did not capture bin/hello")?;
        if binplz::pipeline::sha256_of(captured.file.as_file())? != nar.wanted_sha256
            || captured.size != nar.wanted_size
            || pass.nar_size != n
        {
            return Err(format!("{} {codec}: wrong file extracted", nar.label).into());
        }
        Ok(elapsed)
    };
    let decode = || -> BenchResult<Duration> {
        let source = SharedReader::new(data.clone());
        let t = Instant::now();
        let copied = io::copy(&mut codec.decoder(source)?, &mut io::sink())?;
        let elapsed = t.elapsed();
        if copied != n {
            return Err(format!("{} {codec}: decoded {copied} bytes, not {n}", nar.label).into());
        }
        Ok(elapsed)
    };
    let hash = || -> BenchResult<Duration> {
        let t = Instant::now();
        let digest: [u8; 32] = Sha256::digest(&nar.bytes[..]).into();
        let elapsed = t.elapsed();
        if digest != nar.sha256 {
            return Err("SHA-256 changed between runs".into());
        }
        Ok(elapsed)
    };

    let count = match runs {
        // One untimed round first: checks the results, warms caches, and tells how long a
        // round takes.
        Some(runs) => runs.for_estimate(extract()? + decode()? + hash()?),
        None => 1,
    };
    let mut cell = Cell::default();
    for _ in 0..count {
        cell.hash.0.push(hash()?);
        cell.decode.0.push(decode()?);
        cell.extract.0.push(extract()?);
    }
    Ok(cell)
}

fn write_inputs(dir: &Path, nars: &[Nar], compressed: &[Vec<Compressed>]) -> BenchResult<()> {
    std::fs::create_dir_all(dir)?;
    for (nar, row) in nars.iter().zip(compressed) {
        for (codec, data) in row {
            let path = dir.join(format!("{}.{}", nar.label, inputs::suffix(*codec)));
            std::fs::write(&path, &data[..])?;
            println!(
                "{} nar_size={} nar_hash=sha256:{} wanted={} wanted_sha256={}",
                path.display(),
                nar.bytes.len(),
                binplz::hash::nix32(&nar.sha256),
                inputs::WANTED,
                binplz::hash::hex(&nar.wanted_sha256),
            );
        }
    }
    Ok(())
}
