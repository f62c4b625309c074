//! `cargo bench --bench extract`: how close one verified extraction pass gets to the speed
//! of its slowest part, on generated NARs.
//!
//! This is `binplz bench --generate SIZES --codecs zstd:19,xz:6,bzip2:9,none`: the
//! measuring code is the library's (`binplz::bench`), so the two never drift apart. The
//! compressed inputs are kept under `target/bench-inputs/` (checked before each use).
//!
//! Environment:
//! - `BINPLZ_BENCH_SIZES=0.3,7` NAR sizes in MB (default `0.3,7,30,100`)
//! - `BINPLZ_BENCH_CODECS=zstd,none` codecs, with an optional `:LEVEL` (default
//!   `zstd,xz,bzip2,none`, at the levels caches use: zstd 19, xz 6, bzip2 9)
//! - `BINPLZ_BENCH_QUICK=1` fewer runs
//! - `BINPLZ_BENCH_QUIET_WAIT=60` seconds to wait for other processes to go quiet before
//!   each measurement (0: do not wait); the `others` column says how much CPU they took
//! - `BINPLZ_BENCH_WRITE_INPUTS=DIR` only write the inputs (`DIR/<size>MB.nar.zst`, ...)
//!   and exit, for `benches/nix-nar-cat.sh`

use std::error::Error;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

// Shared with the serve benchmark, which uses all of it.
#[allow(dead_code)]
mod inputs;

use binplz::bench::measure::Runs;
use binplz::bench::recompress::{self, Setting};
use binplz::bench::{Plan, Report};

const DEFAULT_SIZES: &str = "0.3,7,30,100";
const DEFAULT_CODECS: &str = "zstd,xz,bzip2,none";
const DEFAULT_QUIET_WAIT: Duration = Duration::from_secs(60);

type BenchResult<T> = Result<T, Box<dyn Error>>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench extract: {e}");
            ExitCode::FAILURE
        }
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn run() -> BenchResult<()> {
    let sizes = var("BINPLZ_BENCH_SIZES")
        .unwrap_or_else(|| DEFAULT_SIZES.to_owned())
        .split(',')
        .map(|s| {
            let s = s.trim().trim_end_matches("MB");
            match s.parse::<f64>() {
                Ok(mb) if mb.is_finite() && mb > 0.0 && mb <= 4000.0 => {
                    Ok((mb * 1e6).round() as u64)
                }
                _ => Err(format!("BINPLZ_BENCH_SIZES: {s:?} is not a size in MB")),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let settings = var("BINPLZ_BENCH_CODECS")
        .unwrap_or_else(|| DEFAULT_CODECS.to_owned())
        .split(',')
        .map(|c| Setting::parse(c).map_err(|e| format!("BINPLZ_BENCH_CODECS: {e}")))
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
    let quiet_wait =
        match var("BINPLZ_BENCH_QUIET_WAIT") {
            None => DEFAULT_QUIET_WAIT,
            Some(v) => Duration::from_secs(v.trim().parse().map_err(|_| {
                format!("BINPLZ_BENCH_QUIET_WAIT: {v:?} is not a number of seconds")
            })?),
        };
    if let Some(dir) = var("BINPLZ_BENCH_WRITE_INPUTS") {
        return write_inputs(Path::new(&dir), &sizes, &settings);
    }
    let plan = Plan {
        settings,
        runs,
        quiet_wait,
        compare_nix: None,
        keep_dir: Some(inputs::cache_dir()),
        memory_probe: Some(env!("CARGO_BIN_EXE_binplz").into()),
    };
    let started = Instant::now();
    let mut report = Report::new();
    for &size in &sizes {
        let input = binplz::bench::inputs::generated(size);
        eprintln!("measuring {} ...", input.label);
        report
            .rows
            .extend(binplz::bench::measure_input(&input, &plan, |_| {}, || {})?);
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.others_cpu_max = report.rows.iter().map(|r| r.others_cpu).fold(0.0, f64::max);
    print!("{}", binplz::bench::table(&report));
    let missed: Vec<String> = report
        .rows
        .iter()
        .filter(|r| r.met_goal() == Some(false))
        .map(|r| format!("{} {}", r.input, r.codec))
        .collect();
    if missed.is_empty() {
        println!("all goals met");
    } else {
        println!("goals missed: {}", missed.join(", "));
    }
    Ok(())
}

/// Writes every input to `dir` and prints what `benches/nix-nar-cat.sh` checks against.
fn write_inputs(dir: &Path, sizes: &[u64], settings: &[Setting]) -> BenchResult<()> {
    std::fs::create_dir_all(dir)?;
    for &size in sizes {
        let label = binplz::bench::inputs::Size(size).to_string();
        let nar = inputs::generate(&label, size);
        for &setting in settings {
            let keep = Some((inputs::cache_dir(), inputs::stem(&nar)));
            let keep = keep.as_ref().map(|(d, s)| (d.as_path(), s.as_str()));
            let data = recompress::compressed(&nar.bytes, &nar.sha256, setting, keep)?;
            let path = dir.join(format!("{label}.{}", setting.suffix()));
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
