//! Compressing a NAR as a binary cache would (`--codecs zstd:19,xz:6,none`), and keeping
//! the compressed forms of generated NARs between runs.
//!
//! zstd is written as Nix 2.35+ writes it, in independent 16 MiB frames, which also lets
//! the frames be compressed on all cores. Every compressed form is decoded again with
//! binplz's own decoder and must give back exactly the NAR it came from (same length and
//! SHA-256, hence the same NarHash) before it is measured or kept.

use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::codec::Codec;

/// Nix 2.35+ writes zstd NARs as independent frames of this size.
const ZSTD_FRAME: usize = 16 << 20;

/// How a NAR is compressed for a measurement: a codec and its level. `level` is `None`
/// for `none` and for a NAR measured as it was found (whatever level made it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub codec: Codec,
    pub level: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("unknown codec {0:?}: expected zstd, xz, bzip2 or none, with an optional :LEVEL")]
    Codec(String),
    #[error("{codec} level {level:?}: expected {min} to {max}")]
    Level {
        codec: &'static str,
        level: String,
        min: u32,
        max: u32,
    },
}

impl Setting {
    /// What cache.nixos.org writes for new paths.
    pub const ZSTD_19: Setting = Setting {
        codec: Codec::Zstd,
        level: Some(19),
    };
    /// What cache.nixos.org wrote for older paths (single-block xz preset 6).
    pub const XZ_6: Setting = Setting {
        codec: Codec::Xz,
        level: Some(6),
    };
    /// Nix's old default.
    pub const BZIP2_9: Setting = Setting {
        codec: Codec::Bzip2,
        level: Some(9),
    };
    pub const NONE: Setting = Setting {
        codec: Codec::None,
        level: None,
    };

    /// A NAR measured as it was found, compressed with `codec` at an unknown level.
    pub fn found(codec: Codec) -> Setting {
        Setting { codec, level: None }
    }

    /// Parses `zstd:3`, `xz:6`, `bzip2:9`, `none`; a codec alone gets the level binary
    /// caches use (zstd 19, xz 6, bzip2 9).
    pub fn parse(s: &str) -> Result<Setting, SettingError> {
        let s = s.trim();
        let (name, level) = match s.split_once(':') {
            Some((n, l)) => (n, Some(l)),
            None => (s, None),
        };
        let (default, min, max) = match name {
            "none" if level.is_none() => return Ok(Setting::NONE),
            "zstd" => (Setting::ZSTD_19, 1, 22),
            "xz" => (Setting::XZ_6, 0, 9),
            "bzip2" => (Setting::BZIP2_9, 1, 9),
            _ => return Err(SettingError::Codec(s.to_owned())),
        };
        let Some(level) = level else {
            return Ok(default);
        };
        match level.parse::<u32>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Setting {
                codec: default.codec,
                level: Some(n),
            }),
            _ => Err(SettingError::Level {
                codec: default.codec.as_str(),
                level: level.to_owned(),
                min,
                max,
            }),
        }
    }

    /// Compresses `nar` at this setting. `none` returns the NAR itself.
    pub fn compress(self, nar: &Arc<[u8]>) -> io::Result<Arc<[u8]>> {
        let level = self.level.unwrap_or(0);
        let out = match self.codec {
            Codec::None => return Ok(nar.clone()),
            Codec::Zstd => {
                let frames: Vec<&[u8]> = nar.chunks(ZSTD_FRAME).collect();
                let level = i32::try_from(level).map_err(io::Error::other)?;
                on_all_cores(&frames, |frame| zstd::bulk::compress(frame, level))?.concat()
            }
            Codec::Xz => {
                let mut enc = liblzma::write::XzEncoder::new(Vec::new(), level);
                enc.write_all(nar)?;
                enc.finish()?
            }
            Codec::Bzip2 => {
                let mut enc =
                    bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::new(level));
                enc.write_all(nar)?;
                enc.finish()?
            }
            Codec::Gzip | Codec::Brotli => {
                return Err(io::Error::other(format!("no encoder for {}", self.codec)))
            }
        };
        Ok(out.into())
    }

    /// The file name suffix of a NAR compressed at this setting.
    pub fn suffix(self) -> &'static str {
        match self.codec {
            Codec::None => "nar",
            Codec::Zstd => "nar.zst",
            Codec::Xz => "nar.xz",
            Codec::Bzip2 => "nar.bz2",
            Codec::Gzip => "nar.gz",
            Codec::Brotli => "nar.br",
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.level {
            Some(l) => write!(f, "{}:{l}", self.codec),
            None => write!(f, "{}", self.codec),
        }
    }
}

/// Runs `f` on every item, on as many threads as there are cores; results in item order.
fn on_all_cores<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> io::Result<R> + Sync,
) -> io::Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<io::Result<R>>>> =
        Mutex::new((0..items.len()).map(|_| None).collect());
    let workers = super::machine::cores().min(items.len()).max(1);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = f(item);
                if let Ok(mut slots) = results.lock() {
                    slots[i] = Some(r);
                }
            });
        }
    });
    let slots = results
        .into_inner()
        .map_err(|_| io::Error::other("a compression worker panicked"))?;
    slots
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(io::Error::other("a compression job did not run"))))
        .collect()
}

/// Decodes `data` with binplz's own decoder: its length and SHA-256.
pub fn decoded_digest(codec: Codec, data: &Arc<[u8]>) -> io::Result<(u64, [u8; 32])> {
    let mut decoder = codec.decoder(SharedReader::new(data.clone()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut len = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hasher.finalize().into()))
}

/// Whether `data` decodes to exactly the NAR of `nar_len` bytes and SHA-256 `nar_hash`.
pub fn round_trips(codec: Codec, data: &Arc<[u8]>, nar_len: u64, nar_hash: &[u8; 32]) -> bool {
    decoded_digest(codec, data).is_ok_and(|(len, hash)| len == nar_len && hash == *nar_hash)
}

/// `nar` compressed at `setting`, checked to round-trip. With `keep` (a directory and a
/// file name stem naming the NAR uniquely, for generated NARs), a compressed form kept
/// there by an earlier run is used when it still round-trips, and a new one is kept.
pub fn compressed(
    nar: &Arc<[u8]>,
    nar_hash: &[u8; 32],
    setting: Setting,
    keep: Option<(&Path, &str)>,
) -> io::Result<Arc<[u8]>> {
    let n = nar.len() as u64;
    let path = keep.map(|(dir, stem)| dir.join(format!("{stem}-{setting}.{}", setting.suffix())));
    if setting.codec != Codec::None {
        if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
            let bytes: Arc<[u8]> = bytes.into();
            // A stale or damaged file is simply made again.
            if round_trips(setting.codec, &bytes, n, nar_hash) {
                return Ok(bytes);
            }
        }
    }
    let data = setting.compress(nar)?;
    if !round_trips(setting.codec, &data, n, nar_hash) {
        return Err(io::Error::other(format!(
            "{setting}: the compressed NAR does not decode to the original"
        )));
    }
    if let (Some(path), true) = (path, setting.codec != Codec::None) {
        // Keeping is only a saving for the next run: failing to keep is not an error.
        let _ = keep_file(&path, &data);
    }
    Ok(data)
}

/// Writes a kept input whole or not at all, so an interrupted run leaves no half file
/// that a later run would have to reject.
fn keep_file(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(data)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Where `binplz bench` keeps the compressed forms of generated NARs.
pub fn default_keep_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".cache"))
        })
        .unwrap_or_else(std::env::temp_dir);
    base.join("binplz").join("bench-inputs")
}

/// Reads a shared in-memory buffer, so every run can own its source (`run_pass` needs a
/// `'static` one) without copying the input.
pub struct SharedReader {
    data: Arc<[u8]>,
    pos: usize,
}

impl SharedReader {
    pub fn new(data: Arc<[u8]>) -> Self {
        SharedReader { data, pos: 0 }
    }
}

impl Read for SharedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = &self.data[self.pos..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_with_or_without_a_level() {
        assert_eq!(Setting::parse("zstd"), Ok(Setting::ZSTD_19));
        assert_eq!(Setting::parse(" xz:6 "), Ok(Setting::XZ_6));
        assert_eq!(Setting::parse("none"), Ok(Setting::NONE));
        assert_eq!(
            Setting::parse("zstd:3").map(|s| s.to_string()),
            Ok("zstd:3".into())
        );
        for bad in [
            "", "lz4", "zstd:0", "zstd:23", "xz:10", "none:1", "zstd:x", "zstd:",
        ] {
            assert!(Setting::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_setting_round_trips() {
        let nar = crate::bench::generate::generate("t", 40_000);
        for s in ["zstd:1", "xz:0", "bzip2:1", "none"] {
            let setting = Setting::parse(s).expect("a valid setting");
            let data = compressed(&nar.bytes, &nar.sha256, setting, None).expect("compressing");
            assert!(round_trips(
                setting.codec,
                &data,
                nar.bytes.len() as u64,
                &nar.sha256
            ));
        }
    }
}
