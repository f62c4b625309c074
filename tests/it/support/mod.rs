//! Shared test support: where the fixtures are, the store paths they hold, signing keys,
//! narinfo editing, synthetic store paths, and the fake binary cache in [`upstream`].

pub mod builder;
pub mod builds;
pub mod cli;
pub mod s3;
pub mod sign;
pub mod upstream;
pub mod webdriver;

use std::path::{Path, PathBuf};

use binplz::nar::writer::{write_nar, Entry};
use nix_derivation::StorePath;
use sha2::{Digest, Sha256};

pub use sign::{narinfo_field, remove_field, set_field, Key};
pub use upstream::{FakeUpstream, Fault};

/// Store paths of `fixtures/manifest.json` (checked against it by a test).
pub mod paths {
    pub const HELLO: &str = "/nix/store/ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d-hello-1.0";
    pub const GOODBYE: &str = "/nix/store/z9y818yk8b0ybiz3b92lavnzvkra3i0m-goodbye-1.0";
    pub const LINKS: &str = "/nix/store/fr4l0hfh1lp5pd5df98fgz2m3jczb119-links-1.0";
    pub const BINLINK: &str = "/nix/store/jvksbhb5nrgranvingm4hm16y9lzcfbx-binlink-1.0";
    pub const MULTI_BIN: &str = "/nix/store/35383awm6lh2kgm1l52g8f7y9kc9vp2y-multi-1.0-bin";
    pub const MULTI_OUT: &str = "/nix/store/lkmbw8hmrm4bmwgdb5bir4b0pahzw838-multi-1.0";
    pub const NONEXEC: &str = "/nix/store/3jzfs2gn4mqfk4pjv6q3c7f0cqq9xjmk-nonexec-1.0";
    pub const SCRIPTS: &str = "/nix/store/p41bw9xj91zqbihqlyg115ir9ss8jaxw-scripts-1.0";
    pub const DYNAMIC: &str = "/nix/store/giakv7srabf3w354msr6ia9vihf2zpaa-dynamic-1.0";
    pub const BUSYBOX: &str = "/nix/store/zpya58m9bxib49ddjq6jdk22xiy6219w-busybox";
    pub const NOTBUILT: &str = "/nix/store/yc128hj8cdrb7jqlfp6izkjgnjym0l5g-notbuilt-1.0";
    /// The interpreter `dynamic`'s `bin/dyn-store` asks for (it does not exist anywhere).
    pub const FAKE_INTERPRETER: &str =
        "/nix/store/ylm3qg2h7mq8ib8cbaxz9gjqd6vqhcz8-glibc-2.40/lib/ld-linux-x86-64.so.2";
}

/// Derivations of `fixtures/manifest.json`'s `drv_paths` (checked against it by a test).
pub mod drv_paths {
    pub const HELLO: &str = "/nix/store/xc1rp0dgaw8xwlkc5akmjbj4r87fi5wm-hello-1.0.drv";
    pub const NOTBUILT: &str = "/nix/store/c77mmj5fqcg0zx82k2hfbpi0bz887lw8-notbuilt-1.0.drv";
}

/// The fixture caches holding `hello`, one per compression Nix can write.
pub const CODEC_CACHES: [&str; 6] = [
    "cache",
    "cache-xz",
    "cache-bzip2",
    "cache-none",
    "cache-br",
    "cache-gzip",
];

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A fixture cache directory (`cache`, `cache-xz`, …).
pub fn cache_dir(cache: &str) -> PathBuf {
    fixtures().join(cache)
}

/// A program of `fixtures/prebuilt/`, as it was put into the store.
pub fn prebuilt(name: &str) -> Vec<u8> {
    let path = fixtures().join("prebuilt").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// `sha256:<nix32>`, the spelling Nix writes into narinfos.
pub fn nix_sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", binplz::hash::nix32(&sha256(bytes)))
}

/// The 32-character hash part of an absolute store path.
pub fn hash_part(store_path: &str) -> &str {
    let base = store_path.strip_prefix("/nix/store/").unwrap_or(store_path);
    &base[..32]
}

/// The cache path of a store path's narinfo: `<hash>.narinfo`.
pub fn narinfo_path(store_path: &str) -> String {
    format!("{}.narinfo", hash_part(store_path))
}

/// A fixture cache's narinfo for `store_path`, as text.
pub fn fixture_narinfo(cache: &str, store_path: &str) -> String {
    let path = cache_dir(cache).join(narinfo_path(store_path));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The cache path of the NAR a fixture narinfo names (its `URL`).
pub fn fixture_nar_path(cache: &str, store_path: &str) -> String {
    narinfo_field(&fixture_narinfo(cache, store_path), "URL")
        .unwrap_or_else(|| panic!("{cache}: the narinfo of {store_path} has no URL"))
}

/// The bytes of the (compressed) NAR a fixture narinfo names.
pub fn fixture_nar(cache: &str, store_path: &str) -> Vec<u8> {
    let path = cache_dir(cache).join(fixture_nar_path(cache, store_path));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub fn store_path(s: &str) -> StorePath {
    binplz::extract::parse_store_path(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// The names in a directory, sorted.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
            e.file_name().to_string_lossy().into_owned()
        })
        .collect();
    names.sort();
    names
}

#[track_caller]
pub fn assert_dir_empty(dir: &Path) {
    let left = dir_entries(dir);
    assert!(left.is_empty(), "{} still holds {left:?}", dir.display());
}

/// Copies a fixture cache (one level of subdirectories, as `nix copy` writes them) into
/// `dest`, so a test can change files a `file://` upstream reads.
pub fn copy_cache(cache: &str, dest: &Path) {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("creating {}: {e}", to.display()));
        for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
            let entry = entry.unwrap_or_else(|e| panic!("{}: {e}", from.display()));
            let (src, dst) = (entry.path(), to.join(entry.file_name()));
            if src.is_dir() {
                copy_dir(&src, &dst);
            } else {
                std::fs::copy(&src, &dst)
                    .unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
            }
        }
    }
    copy_dir(&cache_dir(cache), dest);
}

/// A store path that exists nowhere but in a test: the hash part is derived from `name`.
pub fn synthetic_store_path(name: &str) -> StorePath {
    let digest: [u8; 20] = sha256(name.as_bytes())[..20]
        .try_into()
        .expect("20 bytes of a 32-byte digest");
    StorePath::from_parts(digest, name).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A store path made by a test and published, signed, in a [`FakeUpstream`].
#[derive(Debug, Clone)]
pub struct Published {
    /// Absolute store path.
    pub store_path: String,
    /// The NAR's path in the cache.
    pub nar_path: String,
    /// The signed narinfo as served.
    pub narinfo: String,
}

/// Builds the narinfo (unsigned) of a NAR served at `url` as `file` (the compressed bytes).
pub fn narinfo_text(
    store_path: &str,
    url: &str,
    compression: &str,
    nar: &[u8],
    file: &[u8],
) -> String {
    format!(
        "StorePath: {store_path}\nURL: {url}\nCompression: {compression}\n\
         FileHash: {}\nFileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: \n",
        nix_sha256(file),
        file.len(),
        nix_sha256(nar),
        nar.len(),
    )
}

/// Serialises `root`, compresses it with zstd, and publishes it under a synthetic store path
/// named `name`, signed with the test key.
pub fn publish_tree(up: &FakeUpstream, name: &str, root: &Entry) -> Published {
    let nar = write_nar(root);
    let file = zstd::stream::encode_all(nar.as_slice(), 3).expect("zstd into memory");
    publish_bytes(up, name, &nar, &file, "zstd", true)
}

/// Publishes `file` as the NAR of a synthetic store path whose narinfo claims `nar` (its
/// NarHash and NarSize), with `FileHash`/`FileSize` only when `hints` is set.
pub fn publish_bytes(
    up: &FakeUpstream,
    name: &str,
    nar: &[u8],
    file: &[u8],
    compression: &str,
    hints: bool,
) -> Published {
    let store_path = synthetic_store_path(name).to_absolute_path();
    let ext = match compression {
        "zstd" => ".zst",
        "xz" => ".xz",
        "bzip2" => ".bz2",
        _ => "",
    };
    let nar_path = format!("nar/{}.nar{ext}", binplz::hash::nix32(&sha256(file)));
    let mut text = narinfo_text(&store_path, &nar_path, compression, nar, file);
    if !hints {
        text = remove_field(&remove_field(&text, "FileHash"), "FileSize");
    }
    let narinfo = Key::test().sign(&text);
    up.put(&nar_path, file.to_vec());
    up.put(&narinfo_path(&store_path), narinfo.clone().into_bytes());
    Published {
        store_path,
        nar_path,
        narinfo,
    }
}

pub mod server;
