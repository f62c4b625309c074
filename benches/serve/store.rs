//! The benchmark's binary cache, written as `nix copy --to file://…?compression=zstd` would:
//! one store path per served file, zstd level 19 NARs in 16 MiB frames (compressed and kept
//! by [`inputs::compressed`]), narinfos signed with a fixed-seed key, `nix-cache-info`, an
//! evaluation in `nix-eval-jobs` form and an index built from both by the library.
//!
//! ```text
//!  target/bench-inputs/serve/
//!    <name>-<NarSize>-g<gen>.nar.zst        compressed NARs kept between runs (slow to make)
//!    files/<name>                           the same files, raw: what nginx serves at /
//!    cache/                                 the binary cache: nginx serves it at /cache/
//!    eval.jsonl, index                      the evaluation and the index built from it
//!    public-key                             for `binplz serve --trusted-public-key`
//! ```
//!
//! A kept NAR is used only after it decompresses to exactly the NAR generated in this run.

use std::fs;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use binplz::codec::Codec;
use binplz::extract::Extractor;
use binplz::index::build::{self, BuildOptions, EvalInput};
use binplz::index::format;
use binplz::nar::reader::FileMeta;
use binplz::nar::writer::{write_nar, Entry};
use binplz::nar::{read_nar, Visitor};
use binplz::narinfo::Trust;
use binplz::upstream::{self, Cache, ClientConfig};
use ed25519_dalek::{Signer, SigningKey};
use nix_derivation::{StoreDir, StorePath};
use nix_narinfo::NarInfo;
use sha2::{Digest, Sha256};

use super::inputs;
use super::BenchResult;

/// The signing key: a fixed seed, so narinfos are the same on every run.
const KEY_NAME: &str = "binplz-bench-1";
const KEY_SEED: [u8; 32] = [0x62; 32];

pub const SYSTEM: &str = "x86_64-linux";
pub const REVISION: &str = "bench";

/// A file to serve: `bin/<name>` of its own store path, also the program's name.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub name: &'static str,
    pub label: &'static str,
    pub size: u64,
}

pub const F1K: Spec = Spec {
    name: "f1k",
    label: "1 KB",
    size: 1_000,
};
pub const F1M: Spec = Spec {
    name: "f1m",
    label: "1 MB",
    size: 1_000_000,
};
pub const F10M: Spec = Spec {
    name: "f10m",
    label: "10 MB",
    size: 10_000_000,
};
pub const F100M: Spec = Spec {
    name: "f100m",
    label: "100 MB",
    size: 100_000_000,
};

/// One published store path.
#[derive(Debug, Clone)]
pub struct Published {
    pub spec: Spec,
    /// SHA-256 of the served file.
    pub sha256: [u8; 32],
    pub nar_size: u64,
    /// The compressed NAR as the cache holds it.
    pub nar_zst: PathBuf,
}

/// Everything the servers are started with.
#[derive(Debug)]
pub struct Store {
    /// Raw files, named like their programs.
    pub files: PathBuf,
    /// The binary cache's root.
    pub cache: PathBuf,
    pub index: PathBuf,
    /// `name:base64`, for `--trusted-public-key`.
    pub public_key: String,
    pub published: Vec<Published>,
}

impl Store {
    pub fn get(&self, name: &str) -> BenchResult<&Published> {
        self.published
            .iter()
            .find(|p| p.spec.name == name)
            .ok_or_else(|| format!("{name} was not published").into())
    }
}

/// Where everything is generated: `target/bench-inputs/serve/`.
pub fn root() -> PathBuf {
    inputs::cache_dir().join("serve")
}

/// Writes (or reuses) the inputs for `specs`.
pub fn prepare(specs: &[Spec]) -> BenchResult<Store> {
    let root = root();
    let (files, cache) = (root.join("files"), root.join("cache"));
    // Served directories are rewritten on every run, so nothing stale is ever served.
    for dir in [&files, &cache] {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
    }
    for dir in [&files, &cache.join("nar")] {
        fs::create_dir_all(dir)?;
    }
    fs::write(
        cache.join("nix-cache-info"),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n",
    )?;
    let key = SigningKey::from_bytes(&KEY_SEED);
    let public_key = format!(
        "{KEY_NAME}:{}",
        base64::engine::general_purpose::STANDARD.encode(key.verifying_key().as_bytes())
    );

    // Every NAR first, so the missing compressed forms are made in one go on all cores.
    let mut nars = Vec::new();
    for &spec in specs {
        let content = elf_like(spec)?;
        let sha256: [u8; 32] = Sha256::digest(&content).into();
        keep(&files.join(spec.name), &content)?;
        let size = content.len() as u64;
        let bytes = write_nar(&Entry::dir([(
            "bin",
            Entry::dir([(spec.name, Entry::executable(content))]),
        )]));
        nars.push(inputs::Nar {
            // The kept file's name: `serve/<name>-<NarSize>-g<generator>.nar.zst`.
            label: format!("serve/{}", spec.name),
            sha256: Sha256::digest(&bytes).into(),
            bytes: bytes.into(),
            wanted_sha256: sha256,
            wanted_size: size,
        });
    }
    let compressed = inputs::compressed(&nars, &[Codec::Zstd])?;

    let mut published = Vec::new();
    let mut eval = String::new();
    for ((&spec, nar), row) in specs.iter().zip(&nars).zip(&compressed) {
        let zst = match row.as_slice() {
            [(Codec::Zstd, data)] => data,
            _ => return Err("inputs::compressed returned no zstd form".into()),
        };
        let store_path = store_path(spec.name)?;
        let file_hash: [u8; 32] = Sha256::digest(zst).into();
        let url = format!("nar/{}.nar.zst", binplz::hash::nix32(&file_hash));
        let nar_zst = cache.join(&url);
        keep(&nar_zst, zst)?;
        let narinfo = format!(
            "StorePath: {store_path}\nURL: {url}\nCompression: zstd\nFileHash: sha256:{}\n\
             FileSize: {}\nNarHash: sha256:{}\nNarSize: {}\nReferences: \n",
            binplz::hash::nix32(&file_hash),
            zst.len(),
            binplz::hash::nix32(&nar.sha256),
            nar.bytes.len(),
        );
        let narinfo = sign(&key, &narinfo)?;
        let hash_part = &store_path["/nix/store/".len()..][..32];
        keep(
            &cache.join(format!("{hash_part}.narinfo")),
            narinfo.as_bytes(),
        )?;

        let line = serde_json::json!({
            "attr": spec.name,
            "attrPath": [spec.name],
            "system": SYSTEM,
            "outputs": { "out": store_path },
            "meta": { "mainProgram": spec.name },
        });
        eval.push_str(&line.to_string());
        eval.push('\n');
        published.push(Published {
            spec,
            sha256: nar.wanted_sha256,
            nar_size: nar.bytes.len() as u64,
            nar_zst,
        });
    }
    keep(&root.join("public-key"), public_key.as_bytes())?;
    let eval_path = root.join("eval.jsonl");
    keep(&eval_path, eval.as_bytes())?;
    let index = root.join("index");
    build_index(&cache, &eval_path, &index, &public_key, specs.len())?;
    Ok(Store {
        files,
        cache,
        index,
        public_key,
        published,
    })
}

/// `size` bytes of ELF-like content: the main program of a generated package
/// ([`inputs::generate`]), whose size is 36 % of the package's NAR.
fn elf_like(spec: Spec) -> BenchResult<Vec<u8>> {
    let target = (spec.size * 100).div_ceil(36);
    let package = inputs::generate(spec.name, target);
    let wanted: Vec<Vec<u8>> = inputs::WANTED
        .split('/')
        .map(|s| s.as_bytes().to_vec())
        .collect();
    let mut grab = Grab {
        wanted,
        found: None,
    };
    read_nar(io::BufReader::new(&package.bytes[..]), None, &mut grab)?;
    let content = grab
        .found
        .ok_or_else(|| format!("the generated package has no {}", inputs::WANTED))?;
    if content.len() as u64 != spec.size || Sha256::digest(&content)[..] != package.wanted_sha256 {
        return Err(format!(
            "{}: generated {} bytes, expected {}",
            spec.name,
            content.len(),
            spec.size
        )
        .into());
    }
    Ok(content)
}

/// Copies out the contents of one file of a NAR.
struct Grab {
    wanted: Vec<Vec<u8>>,
    found: Option<Vec<u8>>,
}

impl Visitor for Grab {
    fn file(
        &mut self,
        path: &[Vec<u8>],
        meta: FileMeta,
        contents: &mut dyn BufRead,
    ) -> io::Result<()> {
        if path == self.wanted.as_slice() {
            let mut buf = Vec::with_capacity(usize::try_from(meta.size).unwrap_or(0));
            contents.read_to_end(&mut buf)?;
            self.found = Some(buf);
        }
        Ok(())
    }
}

/// A store path whose hash part is derived from `name`.
fn store_path(name: &str) -> BenchResult<String> {
    let digest: [u8; 32] = Sha256::digest(format!("binplz-bench-{name}")).into();
    let mut hash = [0u8; 20];
    hash.copy_from_slice(&digest[..20]);
    let path = StorePath::from_parts(hash, &format!("{name}-1.0"))?;
    Ok(path.to_absolute_path())
}

/// Appends a `Sig` line over the narinfo's fingerprint, built by `nix-narinfo` from the
/// parsed values as a verifier builds it.
fn sign(key: &SigningKey, narinfo: &str) -> BenchResult<String> {
    let store_dir = StoreDir::default();
    let info = NarInfo::parse_in(&store_dir, narinfo.as_bytes())
        .map_err(|e| format!("generated an invalid narinfo: {e}"))?;
    let sig = key.sign(info.fingerprint(&store_dir).as_bytes());
    let b64 = base64::engine::general_purpose::STANDARD.encode(sig.to_bytes());
    Ok(format!("{narinfo}Sig: {KEY_NAME}:{b64}\n"))
}

/// Builds the index as `binplz index build` does, reading the cache as `file://`.
fn build_index(
    cache: &Path,
    eval: &Path,
    out: &Path,
    public_key: &str,
    expected: usize,
) -> BenchResult<()> {
    let url = format!("file://{}", cache.display());
    let upstream = upstream::open(&url, &ClientConfig::default())?;
    let trust = Trust::new(&[public_key], true)?;
    let extractor = Extractor::new(vec![Cache::new(upstream)], trust, true);
    let opts = BuildOptions {
        evals: vec![EvalInput::File(eval.to_owned())],
        revision: Some(REVISION.to_owned()),
        jobs: 4,
        progress: false,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let built = rt.block_on(build::build(extractor, vec![url], opts))?;
    let s = &built.summary;
    if s.programs != expected || s.failures != 0 || s.not_built != 0 {
        return Err(format!(
            "the index holds {} programs of {expected}: {s:?}",
            s.programs
        )
        .into());
    }
    format::write(
        out,
        &built.meta,
        &built.programs,
        &built.not_built,
        &built.failures,
    )?;
    Ok(())
}

/// Writes a file whole or not at all.
fn keep(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(data)?;
    // The raw files and the cache are read by nginx's workers, which may run as another
    // user: temp files are created private.
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
