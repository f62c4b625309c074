//! The generated inputs of the benchmarks (`binplz::bench::generate`), and their compressed
//! forms kept under `target/bench-inputs/` between runs: compressing 100 MB with zstd -19
//! or xz -6 takes about a minute. A kept file is used only after it decompresses to
//! exactly the NAR generated in this run.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use binplz::bench::generate::{generate, Nar, GENERATOR, WANTED};
use binplz::bench::recompress::{self, Setting};
use binplz::codec::Codec;

/// Where compressed inputs are kept between runs.
pub fn cache_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    target.join("bench-inputs")
}

/// The name a NAR's kept compressed forms start with.
pub fn stem(nar: &Nar) -> String {
    format!("{}-{}-g{GENERATOR}", nar.label, nar.bytes.len())
}

/// One NAR as a codec compressed it (the whole NAR when the codec is `none`).
pub type Compressed = (Codec, Arc<[u8]>);

/// The compressed forms of every NAR, at the levels caches write (zstd 19 in 16 MiB
/// frames, xz 6, bzip2 9), in the order of `codecs`, per NAR.
pub fn compressed(nars: &[Nar], codecs: &[Codec]) -> io::Result<Vec<Vec<Compressed>>> {
    let dir = cache_dir();
    nars.iter()
        .map(|nar| {
            let stem = stem(nar);
            codecs
                .iter()
                .map(|&codec| {
                    let setting = match codec {
                        Codec::Zstd => Setting::ZSTD_19,
                        Codec::Xz => Setting::XZ_6,
                        Codec::Bzip2 => Setting::BZIP2_9,
                        Codec::None => Setting::NONE,
                        other => return Err(io::Error::other(format!("no encoder for {other}"))),
                    };
                    let keep = Some((dir.as_path(), stem.as_str()));
                    recompress::compressed(&nar.bytes, &nar.sha256, setting, keep)
                        .map(|data| (codec, data))
                })
                .collect()
        })
        .collect()
}
