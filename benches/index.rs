//! `cargo bench --bench index`: load time and lookup rate of a generated index of one
//! million programs. Goals on a 2-core machine: load < 0.5 s, lookups > 5 million/s.
//!
//! The index is generated deterministically (100,000 store paths with ten programs each,
//! one program in five provided by a second attribute too) and written to
//! `target/bench-inputs/index-1m.bin` once; later runs reuse it.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use binplz::index::format::{self, ProgramEntry};
use binplz::index::{Candidate, Index, Lookup, Metadata};

const PROGRAMS: usize = 1_000_000;
const PER_PATH: usize = 10;
const SYSTEM: &str = "x86_64-linux";

/// A small deterministic generator (SplitMix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn name(i: usize) -> String {
    const SYL: [&str; 16] = [
        "ba", "ke", "ri", "to", "mu", "zen", "gr", "ep", "lo", "xi", "fa", "do", "sh", "ul", "tr",
        "ee",
    ];
    let mut s = String::new();
    let mut n = i;
    loop {
        s.push_str(SYL[n % 16]);
        n /= 16;
        if n == 0 {
            break;
        }
    }
    s
}

fn store_path(rng: &mut Rng, attr: &str) -> String {
    const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let hash: String = (0..32)
        .map(|_| NIX32[(rng.next() % 32) as usize] as char)
        .collect();
    format!("/nix/store/{hash}-{attr}-1.0")
}

fn generate(path: &std::path::Path) {
    let mut rng = Rng(42);
    let mut programs = Vec::with_capacity(PROGRAMS);
    let mut sp = String::new();
    let mut attr = String::new();
    for i in 0..PROGRAMS {
        if i % PER_PATH == 0 {
            attr = format!("pkg-{}", name(i / PER_PATH));
            sp = store_path(&mut rng, &attr);
        }
        let program = name(i);
        let cand = |attr: &str, sp: &str| Candidate {
            attr: attr.to_owned(),
            attr_path_len: 1,
            main_program: None,
            output: "out".into(),
            output_path: sp.to_owned(),
            store_path: sp.to_owned(),
            path: format!("bin/{program}"),
            size: 1000 + i as u64,
            executable: true,
            sha256: None,
            nar_offset: Some(4096),
        };
        let mut candidates = vec![cand(&attr, &sp)];
        if i % 5 == 0 {
            candidates.push(cand(
                "busybox",
                "/nix/store/00000000000000000000000000000000-busybox-1.36",
            ));
        }
        programs.push(ProgramEntry {
            system: SYSTEM.into(),
            program,
            candidates,
        });
    }
    let meta = Metadata {
        revision: Some("bench".into()),
        systems: vec![SYSTEM.into()],
        programs: PROGRAMS as u64,
        ..Metadata::default()
    };
    format::write(path, &meta, &programs, &[], &[]).expect("write index");
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-inputs");
    std::fs::create_dir_all(&dir).expect("bench dir");
    let path = dir.join("index-1m.bin");
    if !path.exists() {
        let t = Instant::now();
        generate(&path);
        println!("generated {} in {:.2?}", path.display(), t.elapsed());
    }
    let size = std::fs::metadata(&path).expect("index").len();

    // Load: best and median of several runs (the file is in the page cache after the first).
    let mut loads: Vec<Duration> = (0..7)
        .map(|_| {
            let t = Instant::now();
            black_box(Index::load(&path, format::DEFAULT_MAX_INDEX_SIZE).expect("load"));
            t.elapsed()
        })
        .collect();
    loads.sort();
    let index = Index::load(&path, format::DEFAULT_MAX_INDEX_SIZE).expect("load");
    assert_eq!(index.len(), PROGRAMS);

    // Check the input before timing: every 1000th program resolves to its own file.
    for i in (0..PROGRAMS).step_by(1000) {
        let Lookup::Found(found) = index.resolve(SYSTEM, &name(i), None) else {
            panic!("{} missing", name(i))
        };
        assert_eq!(found.chosen().path, format!("bin/{}", name(i)));
    }

    // Lookups: a shuffled mix of hits (90%) and misses (10%).
    let mut rng = Rng(7);
    let keys: Vec<String> = (0..1_000_000)
        .map(|_| {
            let i = (rng.next() % PROGRAMS as u64) as usize;
            if rng.next() % 10 == 0 {
                format!("{}-missing", name(i))
            } else {
                name(i)
            }
        })
        .collect();
    // Resolving alone (what decides the response), and resolving plus decoding the chosen
    // candidate's record and strings (what a response then reads).
    let measure = |decode: bool| {
        let mut rates = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let mut acc = 0usize;
            for k in &keys {
                match index.resolve(SYSTEM, k, None) {
                    Lookup::Found(c) if decode => acc += c.chosen().store_path.len(),
                    Lookup::Found(c) => acc += c.len(),
                    _ => {}
                }
            }
            black_box(acc);
            rates.push(keys.len() as f64 / t.elapsed().as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let rate = measure(false);
    let rate_decoded = measure(true);
    let load = loads[loads.len() / 2];
    println!("index: {PROGRAMS} programs, {:.1} MB", size as f64 / 1e6);
    println!(
        "load:   median {:.3} s (best {:.3} s)   goal < 0.5 s   {}",
        load.as_secs_f64(),
        loads[0].as_secs_f64(),
        if load.as_secs_f64() < 0.5 {
            "ok"
        } else {
            "MISSED"
        }
    );
    println!(
        "lookup: median {:.2} million/s (random keys, 90% hits)   goal > 5 million/s   {}",
        rate / 1e6,
        if rate > 5e6 { "ok" } else { "MISSED" }
    );
    println!(
        "lookup + decoding the chosen candidate: median {:.2} million/s",
        rate_decoded / 1e6
    );
}
