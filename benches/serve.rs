//! `cargo bench --bench serve`: `binplz serve` next to nginx serving the same files, and a
//! cold miss next to the decoder alone.
//!
//! ```text
//!  inputs   bin/f1k, bin/f1m, bin/f10m, bin/f100m (ELF-like) ─► zstd -19 NARs, signed
//!           narinfos, nix-eval-jobs lines ─► index          (target/bench-inputs/serve/)
//!  nginx    sendfile, 2 workers: the raw files at /, the binary cache at /cache/
//!  binplz   memory: --memory-cache-size 1G      ─┐ upstream http://127.0.0.1:<nginx>/cache,
//!           disk:   --memory-cache-size 0       ─┘ each with an empty --cache-dir
//!  control  hyper alone from memory, in this process: content-type only / binplz's head
//!  load     wrk -t2 -c64 -d10s × {nginx, memory, disk, control ×2} × {1 KB, 1 MB, 10 MB}
//!           ─► req/s, ratios to nginx
//!  cold     fresh binplz, GET /f100m: request to last byte (median of 3)
//!           vs Codec::Zstd decode ─► io::sink of the same .nar.zst (median of 3),
//!           and the ceiling verify-before-serve sets: decode / (decode + head to last byte)
//! ```
//!
//! Goals: the memory tier at least 1.2x nginx's requests per second for 1 KB and 0.8x for
//! 1 MB and 10 MB; the disk tier at least 0.7x for each; a cold miss at least 0.85x the
//! decoder's throughput. Cold-miss throughput counts bytes of uncompressed NAR (NarSize /
//! time) for both sides, though only `bin/f100m` is sent to the client. MB = 10^6 bytes.
//!
//! The control is the reference figures' "naive hyper from memory" (1.2–1.5x nginx for
//! 1 KB there), measured in the same run, once as the reference ran it and once sending the
//! head binplz sends for the same file: it shows what the provenance headers cost on this
//! machine, apart from how binplz serves them. It has no goal.
//!
//! All servers, wrk and the benchmark share the machine's cores, as in the reference
//! figures. Without nginx the comparison is skipped and binplz fetches from the cache as
//! `file://`; without wrk the load part is skipped.
//!
//! Environment:
//! - `BINPLZ_BENCH_DURATION=3s` wrk's duration per cell (default `10s`)
//! - `BINPLZ_BENCH_CONNECTIONS=64`, `BINPLZ_BENCH_THREADS=2` wrk's `-c` and `-t`
//! - `BINPLZ_BENCH_FILES=f1k,f1m` the files loaded by wrk (default `f1k,f1m,f10m`; empty:
//!   no load part)
//! - `BINPLZ_BENCH_ROUNDS=3` repeat the load part (default 1) and report medians: with
//!   wrk and two server processes on two cores, single runs vary by ±25 %
//! - `BINPLZ_BENCH_COLD_RUNS=3` cold misses and decodes timed (0: no cold part)
//! - `BINPLZ_BENCH_BIN=path/to/binplz` serve with another build, to compare two builds

// Shared with the extract benchmark, which uses all of it.
#[allow(dead_code)]
mod inputs;

#[path = "serve/baseline.rs"]
mod baseline;
#[path = "serve/http.rs"]
mod http;
#[path = "serve/procs.rs"]
mod procs;
#[path = "serve/store.rs"]
mod store;

use std::error::Error;
use std::io;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use binplz::codec::Codec;
use sha2::{Digest, Sha256};

use procs::{Server, Tier};
use store::{Spec, Store};

type BenchResult<T> = Result<T, Box<dyn Error>>;

/// Requests per second relative to nginx, per file.
const GOAL_MEMORY_SMALL: f64 = 1.2;
const GOAL_MEMORY_LARGE: f64 = 0.8;
const GOAL_DISK: f64 = 0.7;
/// Cold-miss NAR throughput relative to decoding alone.
const GOAL_COLD: f64 = 0.85;

const LOAD_FILES: [Spec; 3] = [store::F1K, store::F1M, store::F10M];
const COLD_FILE: Spec = store::F100M;

struct Settings {
    duration: String,
    connections: u32,
    threads: u32,
    files: Vec<Spec>,
    rounds: usize,
    cold_runs: usize,
}

impl Settings {
    fn from_env() -> BenchResult<Settings> {
        let var = |name: &str| std::env::var(name).ok().map(|v| v.trim().to_owned());
        let number = |name: &str, default: u32| -> BenchResult<u32> {
            match var(name).filter(|v| !v.is_empty()) {
                None => Ok(default),
                Some(v) => v
                    .parse()
                    .map_err(|_| format!("{name}={v:?}: expected a number").into()),
            }
        };
        let duration = var("BINPLZ_BENCH_DURATION")
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "10s".to_owned());
        if !duration
            .trim_end_matches(['s', 'm', 'h'])
            .parse::<u32>()
            .is_ok_and(|n| n > 0)
        {
            return Err(format!("BINPLZ_BENCH_DURATION={duration:?}: expected e.g. 3s").into());
        }
        let files = match var("BINPLZ_BENCH_FILES") {
            None => LOAD_FILES.to_vec(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|name| {
                    LOAD_FILES
                        .iter()
                        .find(|s| s.name == name)
                        .copied()
                        .ok_or_else(|| format!("BINPLZ_BENCH_FILES: unknown file {name:?}"))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Settings {
            duration,
            connections: number("BINPLZ_BENCH_CONNECTIONS", 64)?.max(1),
            threads: number("BINPLZ_BENCH_THREADS", 2)?.max(1),
            files,
            rounds: number("BINPLZ_BENCH_ROUNDS", 1)?.max(1) as usize,
            cold_runs: number("BINPLZ_BENCH_COLD_RUNS", 3)? as usize,
        })
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench serve: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> BenchResult<()> {
    let settings = Settings::from_env()?;
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("binplz serve vs. nginx ({cores} cores, load {})", loadavg());
    println!("binplz: {}", procs::binplz_bin().display());

    if settings.files.is_empty() && settings.cold_runs == 0 {
        println!("nothing to measure: BINPLZ_BENCH_FILES is empty and BINPLZ_BENCH_COLD_RUNS=0");
        return Ok(());
    }
    // Every file, whatever is measured: the store is also for serving by hand.
    let mut specs = LOAD_FILES.to_vec();
    specs.push(COLD_FILE);
    let store = store::prepare(&specs)?;
    eprintln!(
        "inputs ready and checked in {:.1} s ({})",
        started.elapsed().as_secs_f64(),
        store::root().display()
    );

    let nginx = match procs::find_nginx() {
        Some(bin) => Some(procs::nginx(&bin, &store)?),
        None => {
            println!(
                "nginx not found: skipping the comparison (Debian: apt-get install -y nginx-light); \
                 binplz reads the cache as file://"
            );
            None
        }
    };
    let upstream = match &nginx {
        Some(n) => format!("http://127.0.0.1:{}/cache", n.port),
        None => format!("file://{}", store.cache.display()),
    };

    let mut missed = Vec::new();
    if settings.files.is_empty() {
        println!("no files to load (BINPLZ_BENCH_FILES is empty)");
    } else if !http::wrk_available() {
        println!("wrk not found: skipping the load part (Debian: apt-get install -y wrk)");
    } else {
        load(&settings, &store, nginx.as_ref(), &upstream, &mut missed)?;
    }
    if settings.cold_runs > 0 {
        cold(&settings, &store, &upstream, &mut missed)?;
    }
    drop(nginx);

    println!();
    if missed.is_empty() {
        println!("all goals met");
    } else {
        println!("goals missed: {}", missed.join(", "));
    }
    println!(
        "load at the end: {}; total {:.0} s",
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Requests per second of each server for one file in one round.
#[derive(Clone, Copy)]
struct Round {
    nginx: Option<f64>,
    memory: f64,
    disk: f64,
    /// The control (see `baseline`): hyper alone, and hyper sending binplz's head.
    hyper: f64,
    hyper_head: f64,
}

/// Requests per second of nginx, both binplz tiers and the hyper control, per file.
fn load(
    settings: &Settings,
    store: &Store,
    nginx: Option<&Server>,
    upstream: &str,
    missed: &mut Vec<String>,
) -> BenchResult<()> {
    let memory = procs::binplz("binplz-memory", Tier::Memory, store, upstream)?;
    let disk = procs::binplz("binplz-disk", Tier::Disk, store, upstream)?;
    let mut controls = Vec::new();
    for spec in &settings.files {
        let published = store.get(spec.name)?;
        if let Some(n) = nginx {
            check((n.name, n.port), spec, &published.sha256, None)?;
        }
        // The first request fetches from the upstream; the second must be a hit.
        check(
            (memory.name, memory.port),
            spec,
            &published.sha256,
            Some("upstream"),
        )?;
        let (hit, body) = check(
            (memory.name, memory.port),
            spec,
            &published.sha256,
            Some("memory"),
        )?;
        check(
            (disk.name, disk.port),
            spec,
            &published.sha256,
            Some("upstream"),
        )?;
        check(
            (disk.name, disk.port),
            spec,
            &published.sha256,
            Some("disk"),
        )?;
        let octet = [(
            "content-type".to_owned(),
            "application/octet-stream".to_owned(),
        )];
        let body = bytes::Bytes::from(body);
        let hyper = baseline::start("hyper", body.clone(), &octet)?;
        let hyper_head = baseline::start("hyper-head", body, &hit.headers)?;
        // Head sizes as wrk gets them: without the `connection: close` these checks ask for.
        let mut sizes = [0; 2];
        for (size, b) in sizes.iter_mut().zip([&hyper, &hyper_head]) {
            let r = check((b.name, b.port), spec, &published.sha256, None)?.0;
            let connection = r
                .header("connection")
                .map_or(0, |v| "connection: \r\n".len() + v.len());
            *size = r.head_len - connection;
        }
        controls.push((hyper, hyper_head, sizes));
    }

    let (t, c, d) = (settings.threads, settings.connections, &settings.duration);
    let rounds = settings.rounds;
    println!();
    println!(
        "load: wrk -t{t} -c{c} -d{d} --timeout 10s http://127.0.0.1:PORT/<file>, keep-alive, \
         loopback; {rounds} round(s), each file on every server in turn"
    );
    println!(
        "binplz: BINPLZ_LOG=warn, --max-per-client 1024; memory = --memory-cache-size 1G, \
         disk = --memory-cache-size 0"
    );
    println!("r/s: median of the rounds; ratio: median of the rounds' server/nginx ratios");
    let mut notes = Vec::new();
    let mut samples: Vec<Vec<Round>> = vec![Vec::new(); settings.files.len()];
    for _ in 0..rounds {
        for ((spec, cell), (hyper, hyper_head, _)) in
            settings.files.iter().zip(&mut samples).zip(&controls)
        {
            let path = format!("/{}", spec.name);
            let mut run = |name: &str, port: u16| -> BenchResult<f64> {
                let l = http::wrk(port, &path, t, c, d)?;
                if l.non_2xx > 0 || l.socket_errors > 0 {
                    notes.push(format!(
                        "{name} {}: {} non-2xx responses, {} socket errors of {} requests",
                        spec.label, l.non_2xx, l.socket_errors, l.requests
                    ));
                }
                Ok(l.requests_per_sec)
            };
            // In turn, so a change in the machine's load disturbs all of them alike.
            let nginx = nginx.map(|n| run(n.name, n.port)).transpose()?;
            cell.push(Round {
                nginx,
                memory: run(memory.name, memory.port)?,
                disk: run(disk.name, disk.port)?,
                hyper: run(hyper.name, hyper.port)?,
                hyper_head: run(hyper_head.name, hyper_head.port)?,
            });
        }
    }

    println!();
    println!(
        "{:>6} {:>11} {:>11} {:>6}  {:<13} {:>11} {:>6}  {:<13}",
        "file", "nginx r/s", "memory r/s", "ratio", "goal", "disk r/s", "ratio", "goal"
    );
    let mut spreads = Vec::new();
    let mut control_rows = Vec::new();
    for ((spec, cell), (_, _, sizes)) in settings.files.iter().zip(&samples).zip(&controls) {
        let mem_goal = if spec.size <= 1_000 {
            GOAL_MEMORY_SMALL
        } else {
            GOAL_MEMORY_LARGE
        };
        let base: Option<Vec<f64>> = cell.iter().map(|r| r.nginx).collect();
        let ratios = |pick: fn(&Round) -> f64| -> Option<Vec<f64>> {
            let base = base.as_ref()?;
            Some(
                cell.iter()
                    .zip(base)
                    .map(|(r, b)| pick(r) / b.max(1e-9))
                    .collect(),
            )
        };
        let ratio = |rs: &Option<Vec<f64>>| {
            rs.as_deref()
                .map_or("-".to_owned(), |v| format!("{}x", shown(median_f64(v))))
        };
        let mut verdict = |tier: &str, rs: &Option<Vec<f64>>, goal: f64| match rs {
            None => "-".to_owned(),
            Some(v) if median_f64(v) >= goal => format!(">= {goal:.2} ok"),
            Some(_) => {
                missed.push(format!("{tier} {}", spec.label));
                format!(">= {goal:.2} MISSED")
            }
        };
        let (mrs, drs) = (ratios(|r| r.memory), ratios(|r| r.disk));
        let (mv, dv) = (
            verdict("memory", &mrs, mem_goal),
            verdict("disk", &drs, GOAL_DISK),
        );
        let show = |v: &Option<Vec<f64>>| {
            v.iter()
                .flatten()
                .map(|x| shown(*x))
                .collect::<Vec<_>>()
                .join(" ")
        };
        spreads.push(format!(
            "{}: memory {}; disk {}",
            spec.label,
            show(&mrs),
            show(&drs)
        ));
        let rps = |pick: fn(&Round) -> f64| median_f64(&cell.iter().map(pick).collect::<Vec<_>>());
        println!(
            "{:>6} {:>11} {:>11.0} {:>6}  {:<13} {:>11.0} {:>6}  {:<13}",
            spec.label,
            base.as_deref()
                .map_or("-".to_owned(), |b| format!("{:.0}", median_f64(b))),
            rps(|r| r.memory),
            ratio(&mrs),
            mv,
            rps(|r| r.disk),
            ratio(&drs),
            dv,
        );
        control_rows.push(format!(
            "{:>6} {:>11.0} {:>6} {:>14.0} {:>6}   {:>4} / {:>4} bytes",
            spec.label,
            rps(|r| r.hyper),
            ratio(&ratios(|r| r.hyper)),
            rps(|r| r.hyper_head),
            ratio(&ratios(|r| r.hyper_head)),
            sizes[0],
            sizes[1],
        ));
    }
    println!();
    println!(
        "control, not a goal: hyper alone from memory (the reference's \"naive hyper\"), \
         with content-type only and with binplz's head for the file"
    );
    println!(
        "{:>6} {:>11} {:>6} {:>14} {:>6}   head: hyper / binplz",
        "file", "hyper r/s", "ratio", "+ head r/s", "ratio"
    );
    for row in control_rows {
        println!("{row}");
    }
    if rounds > 1 && nginx.is_some() {
        println!("ratios per round:");
        for s in spreads {
            println!("  {s}");
        }
    }
    for n in notes {
        println!("  note: {n}");
    }
    memory.stop();
    disk.stop();
    Ok(())
}

/// Fetches a file, checks its bytes and (for binplz) which tier answered.
/// Returns the response and its body.
fn check(
    (name, port): (&str, u16),
    spec: &Spec,
    sha256: &[u8; 32],
    tier: Option<&str>,
) -> BenchResult<(http::Response, Vec<u8>)> {
    let mut body = Vec::new();
    let r = http::get(port, &format!("/{}", spec.name), &mut body)?;
    let got: [u8; 32] = Sha256::digest(&body).into();
    if r.status != 200 || body.len() as u64 != spec.size || got != *sha256 {
        return Err(format!(
            "{} /{}: status {}, {} bytes, sha256 {}: not the published file",
            name,
            spec.name,
            r.status,
            body.len(),
            binplz::hash::hex(&got)
        )
        .into());
    }
    if let Some(want) = tier {
        let answered = r.header("x-binplz-cache").unwrap_or("(none)");
        if answered != want {
            return Err(format!(
                "{name} /{}: answered from {answered}, expected {want}",
                spec.name
            )
            .into());
        }
    }
    Ok((r, body))
}

/// A cold miss of the 100 MB file through a fresh binplz, against decoding alone.
fn cold(
    settings: &Settings,
    store: &Store,
    upstream: &str,
    missed: &mut Vec<String>,
) -> BenchResult<()> {
    let published = store.get(COLD_FILE.name)?;
    let nar_size = published.nar_size;
    let compressed = std::fs::read(&published.nar_zst)?;
    // Grown and touched once, so the timed reads only copy into it.
    let mut body = vec![1u8; COLD_FILE.size as usize];
    let path = format!("/{}", COLD_FILE.name);

    println!();
    println!(
        "cold miss: GET {path} ({} bytes) on a fresh binplz with an empty cache, upstream {}",
        COLD_FILE.size,
        if upstream.starts_with("http") {
            "nginx /cache/"
        } else {
            "file://"
        }
    );
    println!(
        "NAR {nar_size} bytes, zstd -19 {} bytes ({:.2}x); MB/s = NarSize / time; median of {}",
        compressed.len(),
        nar_size as f64 / compressed.len() as f64,
        settings.cold_runs
    );
    println!(
        "extract = the server's own binplz_extraction_seconds (fetch, decode, verify, write a \
         temp file); head = request to response head; cold = request to last byte"
    );
    println!();
    println!(
        "{:>4} {:>10} {:>9} {:>9} {:>9} {:>10} {:>11}",
        "run", "extract ms", "head ms", "cold ms", "cold MB/s", "decode ms", "decode MB/s"
    );
    let mb_s = |d: Duration| nar_size as f64 / d.as_secs_f64() / 1e6;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (mut extracts, mut heads, mut colds, mut decodes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=settings.cold_runs {
        // Alternated, so a change in the machine's load disturbs both alike.
        let server = procs::binplz("binplz-cold", Tier::Memory, store, upstream)?;
        let r = http::get(server.port, &path, &mut body)?;
        let tier = r.header("x-binplz-cache").unwrap_or("(none)").to_owned();
        let extract = extraction_time(&server)?;
        server.stop();
        let got: [u8; 32] = Sha256::digest(&body).into();
        if r.status != 200 || got != published.sha256 || tier != "upstream" {
            return Err(format!(
                "cold {path}: status {}, {} bytes from {tier}: not the published file fetched \
                 from the upstream",
                r.status,
                body.len()
            )
            .into());
        }
        let decode = decode_once(&compressed, nar_size)?;
        println!(
            "{run:>4} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>10.0} {:>11.0}",
            ms(extract),
            ms(r.head),
            ms(r.elapsed),
            mb_s(r.elapsed),
            ms(decode),
            mb_s(decode)
        );
        extracts.push(extract);
        heads.push(r.head);
        colds.push(r.elapsed);
        decodes.push(decode);
    }
    let e = median(&mut extracts);
    let (h, c, d) = (median(&mut heads), median(&mut colds), median(&mut decodes));
    let ratio = mb_s(c) / mb_s(d);
    let verdict = if ratio >= GOAL_COLD {
        format!(">= {GOAL_COLD} ok")
    } else {
        missed.push("cold miss".to_owned());
        format!(">= {GOAL_COLD} MISSED")
    };
    println!(
        "{:>4} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>10.0} {:>11.0}   cold/decode {}x  {verdict}",
        "med",
        ms(e),
        ms(h),
        ms(c),
        mb_s(c),
        ms(d),
        mb_s(d),
        shown(ratio)
    );
    // Nothing is sent before the whole NAR is verified, so even a miss that cost nothing
    // but decoding would still have to send the file after it.
    let send = c.saturating_sub(h);
    println!(
        "ceiling: decoding alone, then sending the verified file ({:.0} ms from head to last \
         byte): {}x",
        ms(send),
        shown(d.as_secs_f64() / (d + send).as_secs_f64())
    );
    Ok(())
}

/// The server's total extraction time so far, from its metrics.
fn extraction_time(server: &Server) -> BenchResult<Duration> {
    let mut body = Vec::new();
    let r = http::get(server.port, "/-/metrics", &mut body)?;
    let text = String::from_utf8_lossy(&body);
    let sum = text
        .lines()
        .find_map(|l| l.strip_prefix("binplz_extraction_seconds_sum "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|_| r.status == 200)
        .ok_or("no binplz_extraction_seconds_sum in /-/metrics")?;
    Ok(Duration::from_secs_f64(sum))
}

/// Decodes `compressed` with the library's decoder into a sink: the cold miss's ceiling.
fn decode_once(compressed: &[u8], nar_size: u64) -> BenchResult<Duration> {
    let start = Instant::now();
    let mut decoder = Codec::Zstd.decoder(compressed)?;
    let n = io::copy(&mut decoder, &mut io::sink())?;
    let elapsed = start.elapsed();
    if n != nar_size {
        return Err(format!("decoded {n} bytes, NarSize is {nar_size}").into());
    }
    Ok(elapsed)
}

/// A ratio with two decimals, cut rather than rounded, so that one shown as the goal met it.
fn shown(ratio: f64) -> String {
    format!("{:.2}", (ratio * 100.0).floor() / 100.0)
}

fn median_f64(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".to_owned())
}
