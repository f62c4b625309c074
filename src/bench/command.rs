//! `binplz bench`: its options, and the run from inputs to the table or JSON.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;

use super::inputs::{self, Input, Order};
use super::measure::Runs;
use super::recompress::{self, Setting};
use super::{nix, Plan, Report};
use crate::error::ErrorKind;
use crate::extract::{self, Extractor};
use crate::resolve::RelPath;
use crate::upstream::{self, Cache, ClientConfig};

/// Timed rounds per cell without `--runs`: as many as fit in this time, within bounds.
const DEFAULT_RUNS: Runs = Runs {
    budget: Duration::from_secs(6),
    min: 5,
    max: 101,
};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A NAR file to measure, compressed or not (the codec from its first bytes, or a
    /// `.br` name). May repeat.
    #[arg(
        long = "nar",
        value_name = "FILE",
        env = "BINPLZ_BENCH_NAR",
        value_delimiter = ' '
    )]
    nars: Vec<PathBuf>,

    /// A binary cache to sample: file:///path, http:// or https://. Signatures and
    /// NarHash are checked as for any extraction. May repeat.
    #[arg(
        long = "cache",
        value_name = "URL",
        env = "BINPLZ_BENCH_CACHE",
        value_delimiter = ' '
    )]
    caches: Vec<String>,

    /// Store paths to sample from the caches, instead of listing them (an http(s) cache
    /// cannot be listed). May repeat.
    #[arg(
        long = "store-path",
        value_name = "PATH",
        env = "BINPLZ_BENCH_STORE_PATH",
        value_delimiter = ' '
    )]
    store_paths: Vec<String>,

    /// Store paths measured per cache: the largest NARs first, or a random sample with
    /// --seed.
    #[arg(
        long,
        value_name = "N",
        env = "BINPLZ_BENCH_SAMPLE",
        default_value_t = 3
    )]
    sample: usize,

    /// Sample at random, the same sample for the same seed.
    #[arg(long, value_name = "SEED", env = "BINPLZ_BENCH_SEED")]
    seed: Option<u64>,

    #[command(flatten)]
    trust: crate::cli::TrustArgs,

    /// Generated NARs of ELF-like content of these sizes (MB = 10^6 bytes, K and G too),
    /// e.g. 7M,100M.
    #[arg(long, value_name = "SIZES", env = "BINPLZ_BENCH_GENERATE", value_delimiter = ',', value_parser = parse_size)]
    generate: Vec<u64>,

    /// Recompress every NAR at these settings first (codec:level; zstd, xz, bzip2, none),
    /// e.g. zstd:3,zstd:19,xz:6,none. Default: NAR files and cache samples as found,
    /// generated NARs at zstd:19,xz:6,none.
    #[arg(long, value_name = "LIST", env = "BINPLZ_BENCH_CODECS", value_delimiter = ',', value_parser = Setting::parse)]
    codecs: Vec<Setting>,

    /// Timed rounds per input and codec. Default: as many as fit in 6 s, 5 to 101.
    #[arg(long, value_name = "N", env = "BINPLZ_BENCH_RUNS", value_parser = clap::value_parser!(u16).range(1..=1000))]
    runs: Option<u16>,

    /// Print one JSON object (the machine, every figure) instead of a table.
    #[arg(long)]
    json: bool,

    /// Also time `nix nar cat` on each input (needs nix, GNU time and the codec's command).
    #[arg(long, env = "BINPLZ_BENCH_COMPARE_NIX")]
    compare_nix: bool,

    /// Seconds to wait for other processes to go quiet before each measurement (0: do not
    /// wait). How much CPU they took anyway is reported.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "BINPLZ_BENCH_QUIET_WAIT",
        default_value_t = 60
    )]
    quiet_wait: u64,

    /// Measure one run's memory on the --nar file and print it (a child of `binplz bench`).
    #[arg(long, value_name = "KIND", hide = true, requires = "nars")]
    memory_probe: Option<super::memory::Kind>,

    /// With --memory-probe: the file the pass keeps.
    #[arg(long, value_name = "PATH", hide = true, requires = "memory_probe")]
    memory_probe_wanted: Option<String>,

    /// Largest NAR measured (bytes; K, M, G, T are powers of 1000): it is held in memory.
    #[arg(long, value_name = "BYTES", env = "BINPLZ_BENCH_MAX_NAR_SIZE", default_value = "4G", value_parser = parse_size)]
    max_nar_size: u64,
}

/// Parses `100M`, `0.3M`, `512K`, `2G` or a number of bytes; powers of 1000, as the
/// tables' MB are.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches(['B', 'b']);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1e3),
        Some((i, 'M' | 'm')) => (&t[..i], 1e6),
        Some((i, 'G' | 'g')) => (&t[..i], 1e9),
        Some((i, 'T' | 't')) => (&t[..i], 1e12),
        _ => (t, 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 && n * mult >= 1.0 && n * mult < 1e15 => {
            Ok((n * mult).round() as u64)
        }
        _ => Err(format!(
            "invalid size {s:?}: expected bytes, or a number with K, M, G or T"
        )),
    }
}

type CommandError = (ErrorKind, String);

fn bad(msg: String) -> CommandError {
    (ErrorKind::BadRequest, msg)
}

/// Runs `binplz bench`.
pub fn run_bench(args: BenchArgs) -> Result<(), CommandError> {
    if let (Some(kind), [file]) = (args.memory_probe, args.nars.as_slice()) {
        let wanted = RelPath::parse(args.memory_probe_wanted.as_deref().unwrap_or("").as_bytes());
        let memory = super::memory::probe(kind, file, &wanted)
            .map_err(|e| (ErrorKind::Internal, e.to_string()))?;
        let json =
            serde_json::to_string(&memory).map_err(|e| (ErrorKind::Internal, e.to_string()))?;
        println!("{json}");
        return Ok(());
    }
    if args.nars.is_empty() && args.caches.is_empty() && args.generate.is_empty() {
        return Err(bad(
            "nothing to measure: give --nar FILE, --cache URL or --generate SIZES".into(),
        ));
    }
    if !args.store_paths.is_empty() && args.caches.is_empty() {
        return Err(bad("--store-path needs a --cache to fetch it from".into()));
    }
    let store_paths = args
        .store_paths
        .iter()
        .map(|p| extract::parse_store_path(p).map_err(|e| bad(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let plan = Plan {
        settings: args.codecs.clone(),
        runs: args
            .runs
            .map_or(DEFAULT_RUNS, |n| Runs::exactly(usize::from(n))),
        quiet_wait: Duration::from_secs(args.quiet_wait),
        compare_nix: args.compare_nix.then_some(3),
        keep_dir: Some(recompress::default_keep_dir()),
        memory_probe: std::env::current_exe().ok(),
    };
    if args.compare_nix {
        let codecs: Vec<_> = plan.settings.iter().map(|s| s.codec).collect();
        nix::check_tools(&codecs).map_err(|e| bad(e.to_string()))?;
    }
    let caches = args
        .caches
        .iter()
        .map(|url| open_cache(url, &args))
        .collect::<Result<Vec<_>, _>>()?;

    let started = Instant::now();
    let progress = Progress::new();
    // Cells (an input at one setting) to measure, known before the inputs are read so that
    // the time left can be told from the start.
    let per_found = plan.settings.len().max(1);
    let per_generated = match plan.settings.len() {
        0 => super::DEFAULT_GENERATED.len(),
        n => n,
    };
    progress.add(
        (args.nars.len() + caches.len() * args.sample) * per_found
            + args.generate.len() * per_generated,
    );
    let mut report = Report::new();
    // Files first, all of them: a bad file is an error before anything is measured.
    let mut files = Vec::new();
    for path in &args.nars {
        progress.message(&format!("reading {}", path.display()));
        files.push(inputs::from_file(path, args.max_nar_size).map_err(|e| bad(e.to_string()))?);
    }
    for input in files {
        measure(&input, &plan, &progress, &mut report)?;
    }
    for &size in &args.generate {
        progress.message(&format!("generating {}", inputs::Size(size)));
        let input = inputs::generated(size);
        measure(&input, &plan, &progress, &mut report)?;
    }
    if !caches.is_empty() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| (ErrorKind::Internal, e.to_string()))?;
        let order = args.seed.map_or(Order::Largest, Order::Random);
        for (extractor, cache) in &caches {
            progress.message(&format!("sampling {}", cache.url()));
            let sampled = rt
                .block_on(inputs::sample_cache(
                    extractor,
                    cache,
                    &store_paths,
                    args.sample,
                    order,
                    args.max_nar_size,
                ))
                .map_err(|e| bad(e.to_string()))?;
            let mut measured = 0;
            for sample in sampled {
                match sample {
                    Ok(input) => {
                        measure(&input, &plan, &progress, &mut report)?;
                        measured += 1;
                    }
                    Err(failure) => report.failures.push(failure),
                }
            }
            // Fewer paths than --sample, or some failed: their cells will not come.
            progress.remove(args.sample.saturating_sub(measured) * per_found);
        }
    }
    progress.finish();
    report.seconds = started.elapsed().as_secs_f64();
    report.others_cpu_max = report.rows.iter().map(|r| r.others_cpu).fold(0.0, f64::max);
    if args.json {
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| (ErrorKind::Internal, e.to_string()))?;
        println!("{json}");
    } else {
        print!("{}", super::table(&report));
    }
    match report.failures.as_slice() {
        [] => Ok(()),
        [first, ..] => Err((
            first.error_kind,
            format!(
                "{} of the inputs could not be measured; the first: {}: {}",
                report.failures.len(),
                first.input,
                first.error
            ),
        )),
    }
}

fn measure(
    input: &Input,
    plan: &Plan,
    progress: &Progress,
    report: &mut Report,
) -> Result<(), CommandError> {
    let rows = super::measure_input(
        input,
        plan,
        |what| progress.message(what),
        || progress.done(),
    )
    .map_err(|e| (ErrorKind::Internal, e.to_string()))?;
    report.rows.extend(rows);
    Ok(())
}

fn open_cache(url: &str, args: &BenchArgs) -> Result<(Extractor, Cache), CommandError> {
    let trust = args.trust.trust().map_err(bad)?;
    let cache =
        Cache::new(upstream::open(url, &ClientConfig::default()).map_err(|e| bad(e.to_string()))?);
    Ok((Extractor::new(vec![cache.clone()], trust, true), cache))
}

/// A progress bar on standard error, drawn only when it is a terminal: what runs, how
/// many cells are done, and the time left.
struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    fn new() -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:24}] {pos}/{len} cells, ETA {eta}  {wide_msg}",
        )
        .map(|s| s.progress_chars("=> "));
        if let Ok(style) = style {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress(Some(bar))
    }

    fn message(&self, what: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(what.to_owned());
        }
    }

    fn add(&self, cells: usize) {
        if let Some(bar) = &self.0 {
            bar.inc_length(cells as u64);
        }
    }

    fn remove(&self, cells: usize) {
        if let Some(bar) = &self.0 {
            let len = bar.length().unwrap_or(0);
            bar.set_length(len.saturating_sub(cells as u64).max(bar.position()));
        }
    }

    fn done(&self) {
        if let Some(bar) = &self.0 {
            bar.inc(1);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_powers_of_1000() {
        assert_eq!(parse_size("100M"), Ok(100_000_000));
        assert_eq!(parse_size("0.3M"), Ok(300_000));
        assert_eq!(parse_size("512K"), Ok(512_000));
        assert_eq!(parse_size("4G"), Ok(4_000_000_000));
        assert_eq!(parse_size("100MB"), Ok(100_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "M", "-1M", "0", "1e400M", "abc", "0.0000001K"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
