//! `cargo bench --bench index`: load time and lookup rate of a generated index of one
//! million programs, and the latency of suggestions for unknown names and of searches.
//! Goals on a 2-core machine: load < 0.5 s (the name structures for suggestions and search
//! included), lookups > 5 million/s, suggestions < 1 ms and searches < 5 ms at p99.
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
            drv_path: None,
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
    // Suggestions for unknown names: typos of real names (a byte changed, dropped or
    // added) and names like none. Checked before timing: a dropped byte is suggested back.
    let typo = |rng: &mut Rng| {
        let mut n = name((rng.next() % PROGRAMS as u64) as usize).into_bytes();
        let at = (rng.next() as usize) % n.len();
        match rng.next() % 4 {
            0 => n[at] = b'q',
            1 => drop(n.remove(at)),
            2 => n.insert(at, b'w'),
            _ => n = format!("zq{}", rng.next() % 1000).into_bytes(),
        }
        String::from_utf8(n).unwrap_or_default()
    };
    for i in (1..PROGRAMS).step_by(100_000) {
        let mut n = name(i);
        n.pop();
        if !matches!(index.resolve(SYSTEM, &n, None), Lookup::Unknown) {
            continue;
        }
        let got = index.suggest(SYSTEM, &n);
        assert!(got.contains(&name(i)), "{n}: {got:?}");
    }
    let mut rng = Rng(11);
    let typos: Vec<String> = (0..20_000).map(|_| typo(&mut rng)).collect();
    let suggest = latencies(&typos, |q| index.suggest(SYSTEM, q).len());

    // Searches: prefixes and middles of real names, single letters, and misses.
    let mut rng = Rng(13);
    let queries: Vec<String> = (0..20_000)
        .map(|_| {
            let n = name((rng.next() % PROGRAMS as u64) as usize);
            let len = 1 + (rng.next() as usize) % n.len().min(6);
            let from = (rng.next() as usize) % (n.len() - len + 1);
            match rng.next() % 5 {
                0 => format!("zq{}", rng.next() % 100),
                _ => n[from..from + len].to_owned(),
            }
        })
        .collect();
    assert_eq!(
        index.search(SYSTEM, &name(4242), 50).first().copied(),
        Some(name(4242).as_str())
    );
    let search = latencies(&queries, |q| index.search(SYSTEM, q, 50).len());
    let cost = index.names_cost();

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
    println!(
        "names for suggestions and search: {:.1} MB, built in {:.3} s (part of the load)",
        cost.bytes as f64 / 1e6,
        cost.built_in.as_secs_f64()
    );
    report("suggest", &suggest, Duration::from_millis(1));
    report("search ", &search, Duration::from_millis(5));
}

/// Each query's latency, sorted.
fn latencies(queries: &[String], mut run: impl FnMut(&str) -> usize) -> Vec<Duration> {
    let mut acc = 0;
    let mut times: Vec<Duration> = queries
        .iter()
        .map(|q| {
            let t = Instant::now();
            acc += run(q);
            t.elapsed()
        })
        .collect();
    black_box(acc);
    times.sort();
    times
}

fn report(what: &str, times: &[Duration], goal: Duration) {
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    let p99 = at(0.99);
    println!(
        "{what}: {} queries, p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs   goal p99 < {} ms   {}",
        times.len(),
        at(0.5).as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        at(1.0).as_secs_f64() * 1e6,
        goal.as_millis(),
        if p99 < goal { "ok" } else { "MISSED" }
    );
}
