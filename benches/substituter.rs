//! `cargo bench --bench substituter`: a 100 MB NAR through `binplz serve` as a substituter,
//! next to the same file straight from nginx.
//!
//! ```text
//!  inputs   one store path holding a 100 MB file: its NAR, uncompressed and zstd -3,
//!           with signed narinfos                     (target/bench-inputs/substituter/)
//!  nginx    sendfile, 2 workers: the binary cache at /cache/
//!  cold     a fresh binplz (--upstream http://127.0.0.1:<nginx>/cache, empty cache dir):
//!           GET /nar/… through it vs GET /cache/nar/… from nginx: head (first byte) and
//!           last byte, median of BINPLZ_BENCH_COLD_RUNS (default 3)
//!  warm     the same binplz again (its disk cache) vs nginx, median of as many runs
//! ```
//!
//! Goals: cold throughput at least 0.9x nginx's and the first byte within 10 ms of
//! nginx's; warm at least 0.8x. Throughput counts the bytes sent (the file as the cache
//! holds it). Both servers, the client and binplz's upstream fetch share the machine's
//! cores. Needs Debian's `nginx-light`. MB = 10^6 bytes.

#[allow(dead_code)]
mod inputs;

#[allow(dead_code)]
#[path = "serve/http.rs"]
mod http;
#[allow(dead_code)]
#[path = "serve/procs.rs"]
mod procs;
#[allow(dead_code)]
#[path = "serve/store.rs"]
mod store;

use std::error::Error;
use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use binplz::nar::writer::{write_nar, Entry};
use binplz::narinfo::{self, SecretKey, Trust};
use nix_derivation::StorePath;
use sha2::{Digest, Sha256};

type BenchResult<T> = Result<T, Box<dyn Error>>;

const SIZE: usize = 100_000_000;
const KEY_SEED: [u8; 32] = [0x73; 32];

/// One published NAR: the node's name for it and nginx's.
struct Nar {
    label: &'static str,
    hash_part: String,
    upstream_path: String,
    file_len: u64,
}

fn key() -> BenchResult<SecretKey> {
    let signing = ed25519_dalek::SigningKey::from_bytes(&KEY_SEED);
    let encoded = base64::engine::general_purpose::STANDARD.encode(signing.to_keypair_bytes());
    Ok(SecretKey::parse(&format!(
        "binplz-bench-subst-1:{encoded}"
    ))?)
}

fn nix32_sha(bytes: &[u8]) -> String {
    binplz::hash::nix32(&Sha256::digest(bytes))
}

/// Writes the cache: `nix-cache-info`, both NARs and their signed narinfos.
fn prepare(cache: &PathBuf, key: &SecretKey) -> BenchResult<Vec<Nar>> {
    let _ = fs::remove_dir_all(cache);
    fs::create_dir_all(cache.join("nar"))?;
    fs::write(
        cache.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
    )?;
    // Deterministic and not very compressible, as a binary is.
    let mut contents = vec![0u8; SIZE];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in contents.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 56) as u8 & 0x3f;
    }
    let nar = write_nar(&Entry::dir([(
        "bin",
        Entry::dir([("big", Entry::executable(contents))]),
    )]));
    let mut out = Vec::new();
    for (label, name, compression, ext) in [
        ("none", "big-none-1.0", "none", ""),
        ("zstd -3", "big-zstd-1.0", "zstd", ".zst"),
    ] {
        let file = match compression {
            "zstd" => zstd::stream::encode_all(nar.as_slice(), 3)?,
            _ => nar.clone(),
        };
        let digest: [u8; 20] = Sha256::digest(name.as_bytes())[..20].try_into()?;
        let sp = StorePath::from_parts(digest, name)?;
        let store_path = sp.to_absolute_path();
        let url = format!("nar/{}.nar{ext}", nix32_sha(&file));
        fs::write(cache.join(&url), &file)?;
        let text = format!(
            "StorePath: {store_path}\nURL: {url}\nCompression: {compression}\n\
             FileHash: sha256:{}\nFileSize: {}\nNarHash: sha256:{}\nNarSize: {}\nReferences: \n",
            nix32_sha(&file),
            file.len(),
            nix32_sha(&nar),
            nar.len(),
        );
        let hash_part = store_path["/nix/store/".len()..][..32].to_owned();
        let unsigned = narinfo::verify(text.as_bytes(), &sp, &Trust::new::<&str>(&[], false)?)?;
        let signed = narinfo::rewrite(&unsigned, &url, Some(key))?;
        fs::write(cache.join(format!("{hash_part}.narinfo")), &signed)?;
        out.push(Nar {
            label,
            hash_part,
            upstream_path: url,
            file_len: file.len() as u64,
        });
    }
    Ok(out)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("substituter bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> BenchResult<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let runs: usize = std::env::var("BINPLZ_BENCH_COLD_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let Some(nginx_bin) = procs::find_nginx() else {
        eprintln!("nginx not found: skipped");
        return Ok(());
    };
    let root = inputs::cache_dir().join("substituter");
    let key = key()?;
    let cache = root.join("cache");
    let nars = prepare(&cache, &key)?;
    let files = root.join("files");
    fs::create_dir_all(&files)?;
    let store = store::Store {
        files,
        cache,
        index: root.join("unused.index"),
        public_key: key.public(),
        published: Vec::new(),
    };
    let nginx = procs::nginx(&nginx_bin, &store)?;
    let upstream = format!("http://127.0.0.1:{}/cache", nginx.port);
    println!("| NAR | file | nginx first byte | binplz cold first byte | nginx MB/s | binplz cold MB/s | ratio (≥ 0.9) | binplz warm MB/s | ratio (≥ 0.8) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut body = Vec::with_capacity(SIZE + (1 << 20));
    for nar in &nars {
        let up_path = format!("/cache/{}", nar.upstream_path);
        let (mut ng_head, mut ng_all, mut cold_head, mut cold_all, mut warm_all) =
            (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let r = http::get(nginx.port, &up_path, &mut body)?;
            ng_head.push(r.head);
            ng_all.push(r.elapsed);
            let node = procs::binplz_substituter("binplz", &store.public_key, &upstream)?;
            let info = http::get(node.port, &format!("/{}.narinfo", nar.hash_part), &mut body)?;
            if info.status != 200 {
                return Err(format!("narinfo: status {}", info.status).into());
            }
            // The node's own name for the NAR, from the narinfo it serves.
            let node_path = String::from_utf8_lossy(&body)
                .lines()
                .find_map(|l| l.strip_prefix("URL: ").map(|u| format!("/{u}")))
                .ok_or("no URL in the node's narinfo")?;
            let r = http::get(node.port, &node_path, &mut body)?;
            if r.status != 200 || body.len() as u64 != nar.file_len {
                return Err(format!("cold NAR: status {}, {} bytes", r.status, body.len()).into());
            }
            cold_head.push(r.head);
            cold_all.push(r.elapsed);
            let r = http::get(node.port, &node_path, &mut body)?;
            if r.status != 200 || body.len() as u64 != nar.file_len {
                return Err(format!("warm NAR: status {}", r.status).into());
            }
            warm_all.push(r.elapsed);
            node.stop();
        }
        let (ng, cold, warm) = (median(ng_all), median(cold_all), median(warm_all));
        println!(
            "| {} | {:.1} MB | {:.2} ms | {:.2} ms | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} |",
            nar.label,
            nar.file_len as f64 / 1e6,
            median(ng_head).as_secs_f64() * 1e3,
            median(cold_head).as_secs_f64() * 1e3,
            mbps(nar.file_len, ng),
            mbps(nar.file_len, cold),
            ng.as_secs_f64() / cold.as_secs_f64(),
            mbps(nar.file_len, warm),
            ng.as_secs_f64() / warm.as_secs_f64(),
        );
    }
    Ok(())
}
