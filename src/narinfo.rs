//! Deciding whether a narinfo can be trusted, with Nix's rules.
//!
//! A narinfo counts only if its `StorePath` is the one asked for (hash *and* name) and one of
//! its signatures verifies, with a trusted key, over Nix's fingerprint
//! `1;<path>;<narHash>;<narSize>;<sorted refs>` (built by `nix-narinfo` from parsed values).
//! `URL`, `Compression`, `FileHash` and `FileSize` are not signed: they are treated as
//! hints and checked against the bytes.

use base64::Engine as _;
use ed25519_dalek::Signer as _;
use nix_derivation::{NixHash, StoreDir, StorePath};
use nix_narinfo::{NarInfo, NixSignature, TrustedPublicKey};

use crate::codec::{Codec, CodecError};

/// The key of cache.nixos.org, trusted when no key is configured (as in Nix).
pub const CACHE_NIXOS_ORG_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// Which signatures count.
#[derive(Debug, Clone)]
pub struct Trust {
    keys: Vec<TrustedPublicKey>,
    require_sigs: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyConfigError {
    #[error("invalid trusted public key {key:?}: {err}")]
    Invalid { key: String, err: String },
    #[error("trusted public key name {0:?} is given twice")]
    Duplicate(String),
}

impl Trust {
    /// Parses `NAME:BASE64` keys, refusing malformed keys and duplicate names.
    pub fn new<S: AsRef<str>>(keys: &[S], require_sigs: bool) -> Result<Trust, KeyConfigError> {
        let mut parsed: Vec<TrustedPublicKey> = Vec::new();
        for k in keys {
            let k = k.as_ref();
            let key = TrustedPublicKey::parse(k).map_err(|e| KeyConfigError::Invalid {
                key: k.to_owned(),
                err: e.to_string(),
            })?;
            if parsed.iter().any(|p| p.name == key.name) {
                return Err(KeyConfigError::Duplicate(key.name));
            }
            parsed.push(key);
        }
        Ok(Trust {
            keys: parsed,
            require_sigs,
        })
    }

    pub fn require_sigs(&self) -> bool {
        self.require_sigs
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarInfoError {
    #[error("invalid narinfo: {0}")]
    Parse(String),
    #[error("invalid narinfo: control character {byte:#04x} at byte {offset}")]
    ControlCharacter { offset: usize, byte: u8 },
    #[error("narinfo is for {got}, not {expected}")]
    WrongStorePath { expected: String, got: String },
    #[error("narinfo for {path} has no signature")]
    Unsigned { path: String },
    #[error("narinfo for {path} is signed only by untrusted keys ({names})")]
    UntrustedKeys { path: String, names: String },
    #[error("narinfo for {path} has an invalid signature by {names}")]
    BadSignature { path: String, names: String },
    #[error("narinfo for {path}: NarHash is not SHA-256")]
    NotSha256 { path: String },
    #[error("narinfo for {path}: {err}")]
    Codec { path: String, err: CodecError },
}

/// A narinfo that passed the checks, with what the extractor needs from it.
#[derive(Debug, Clone)]
pub struct VerifiedNarInfo {
    pub info: NarInfo,
    pub codec: Codec,
    pub nar_hash: [u8; 32],
    pub nar_size: u64,
    /// SHA-256 of the compressed file, when the cache wrote one (unsigned: a hint).
    pub file_hash: Option<[u8; 32]>,
    pub file_size: Option<u64>,
}

impl VerifiedNarInfo {
    pub fn store_path(&self) -> &StorePath {
        self.info.store_path()
    }

    pub fn url(&self) -> &str {
        self.info.url()
    }

    /// Whether `path` is one of the signed references.
    pub fn references(&self, path: &StorePath) -> bool {
        self.info.references().contains(path)
    }
}

/// Parses `bytes` and checks it against `requested` and `trust`.
pub fn verify(
    bytes: &[u8],
    requested: &StorePath,
    trust: &Trust,
) -> Result<VerifiedNarInfo, NarInfoError> {
    check(bytes, trust, |got| {
        (got != requested).then(|| requested.to_absolute_path())
    })
}

/// [`verify`] for a request that names only the store path's hash part (a substituter's
/// `<hash>.narinfo`): the `StorePath` must have exactly that hash; Nix checks the name.
pub fn verify_hash_part(
    bytes: &[u8],
    hash_part: &str,
    trust: &Trust,
) -> Result<VerifiedNarInfo, NarInfoError> {
    check(bytes, trust, |got| {
        let base = got.to_basename();
        (base.get(..HASH_PART_LEN) != Some(hash_part)).then(|| format!("{STORE_DIR}/{hash_part}-…"))
    })
}

/// Length of a store path's hash part, in nix32 characters.
pub const HASH_PART_LEN: usize = 32;

const STORE_DIR: &str = "/nix/store";

/// Parses `bytes`, then checks its store path with `wrong` (which names what was expected
/// when the path is not it) and its signatures with `trust`.
fn check(
    bytes: &[u8],
    trust: &Trust,
    wrong: impl FnOnce(&StorePath) -> Option<String>,
) -> Result<VerifiedNarInfo, NarInfoError> {
    if let Some((offset, byte)) = control_character(bytes) {
        return Err(NarInfoError::ControlCharacter { offset, byte });
    }
    let store_dir = StoreDir::default();
    let info =
        NarInfo::parse_in(&store_dir, bytes).map_err(|e| NarInfoError::Parse(e.to_string()))?;
    let path = info.store_path().to_absolute_path();
    if let Some(expected) = wrong(info.store_path()) {
        return Err(NarInfoError::WrongStorePath {
            expected,
            got: path,
        });
    }
    if trust.require_sigs && !info.has_valid_signature(&store_dir, &trust.keys) {
        let names = |trusted: bool| {
            let mut v: Vec<&str> = info
                .signatures()
                .iter()
                .map(|s| s.key_name.as_str())
                .filter(|n| trust.keys.iter().any(|k| k.name == *n) == trusted)
                .collect();
            v.dedup();
            v.join(", ")
        };
        return Err(if info.signatures().is_empty() {
            NarInfoError::Unsigned { path }
        } else if names(true).is_empty() {
            NarInfoError::UntrustedKeys {
                path,
                names: names(false),
            }
        } else {
            NarInfoError::BadSignature {
                path,
                names: names(true),
            }
        });
    }
    let NixHash::Sha256(nar_hash) = info.nar_hash() else {
        return Err(NarInfoError::NotSha256 { path });
    };
    let nar_hash = *nar_hash;
    let codec = Codec::from_narinfo(Some(info.compression().as_str())).map_err(|err| {
        NarInfoError::Codec {
            path: path.clone(),
            err,
        }
    })?;
    let file_hash = match info.file_hash() {
        Some(NixHash::Sha256(d)) => Some(*d),
        _ => None,
    };
    Ok(VerifiedNarInfo {
        nar_size: info.nar_size(),
        file_size: info.file_size(),
        codec,
        nar_hash,
        file_hash,
        info,
    })
}

/// A node's own signing key, in Nix's secret key format (`NAME:BASE64` of the 32-byte seed
/// and the 32-byte public key, as `nix key generate-secret` writes it). Its `Debug` shows
/// the name only.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretKeyError {
    #[error("a secret key is NAME:BASE64")]
    NoSeparator,
    #[error("the secret key's name is empty")]
    EmptyName,
    #[error("the secret key is not base64")]
    NotBase64,
    #[error("the secret key is {0} bytes, not 64 (seed and public key)")]
    Length(usize),
    #[error("the secret key's public half does not match its seed")]
    Mismatch,
}

impl SecretKey {
    pub fn parse(text: &str) -> Result<SecretKey, SecretKeyError> {
        let (name, encoded) = text
            .trim()
            .split_once(':')
            .ok_or(SecretKeyError::NoSeparator)?;
        if name.is_empty() {
            return Err(SecretKeyError::EmptyName);
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| SecretKeyError::NotBase64)?;
        let bytes: [u8; 64] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| SecretKeyError::Length(b.len()))?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| SecretKeyError::Mismatch)?;
        Ok(SecretKey {
            name: name.to_owned(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key clients trust, `NAME:BASE64`.
    pub fn public(&self) -> String {
        let public = self.key.verifying_key().to_bytes();
        let encoded = base64::engine::general_purpose::STANDARD.encode(public);
        format!("{}:{encoded}", self.name)
    }
}

/// The narinfo of `info` as this node serves it: every field as verified, `URL` replaced by
/// `url`, and with `key` a signature of this node's added (replacing one of the same name).
/// Written from the parsed values, so nothing of the upstream's text but what was checked
/// reaches a client.
pub fn rewrite(
    info: &VerifiedNarInfo,
    url: &str,
    key: Option<&SecretKey>,
) -> Result<Vec<u8>, NarInfoError> {
    let i = &info.info;
    let mut sigs: Vec<NixSignature> = i.signatures().to_vec();
    if let Some(key) = key {
        let fingerprint = i.fingerprint(&StoreDir::default());
        let sig = key.key.sign(fingerprint.as_bytes()).to_bytes();
        sigs.retain(|s| s.key_name != key.name);
        if let Ok(s) = NixSignature::from_bytes(key.name.clone(), &sig) {
            sigs.push(s);
        }
    }
    let built = NarInfo::builder(
        i.store_path().clone(),
        url,
        i.nar_hash().clone(),
        i.nar_size(),
    )
    .compression(i.compression().clone())
    .references(i.references().iter().cloned())
    .deriver(i.deriver().cloned())
    .signatures(sigs)
    .content_address(i.content_address().cloned())
    .file_hash(i.file_hash().cloned())
    .file_size(i.file_size())
    .build();
    built
        .map(|n| n.to_canonical_bytes())
        .map_err(|e| NarInfoError::Parse(e.to_string()))
}

/// The file name of a NAR as Nix names it in a cache: `<NarHash in nix32>.nar` and the
/// compression's extension. Names only: the bytes are what `Compression` says.
pub fn nar_file_name(info: &VerifiedNarInfo) -> String {
    let ext = match info.info.compression().as_str() {
        "none" => "",
        "xz" => ".xz",
        "zstd" => ".zst",
        "bzip2" | "" => ".bz2",
        "gzip" => ".gz",
        "br" => ".br",
        "lz4" => ".lz4",
        "lzip" => ".lzip",
        _ => ".bin",
    };
    format!("{}.nar{ext}", crate::hash::nix32(&info.nar_hash))
}

/// The first control character other than a line end (LF or CRLF), with its offset. Nix
/// writes narinfos as lines of printable text, so none is legitimate, and a stray CR means
/// different things to different parsers: the one above keeps a CR that ends a value
/// (`URL: x\r\r\n`) but drops it when the value is written back and read again.
fn control_character(bytes: &[u8]) -> Option<(usize, u8)> {
    bytes.iter().enumerate().find_map(|(i, &b)| {
        let line_end = b == b'\n' || (b == b'\r' && bytes.get(i + 1) == Some(&b'\n'));
        ((b < 0x20 || b == 0x7f) && !line_end).then_some((i, b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = include_str!("../fixtures/cache/ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d.narinfo");

    fn hello_path() -> StorePath {
        StorePath::from_basename(b"ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d-hello-1.0").expect("valid")
    }

    fn trust() -> Trust {
        Trust::new(&[crate::demo::PUBLIC_KEY.trim()], true).expect("the fixtures' key")
    }

    /// A key made the way `nix key generate-secret` writes one.
    fn node_key() -> SecretKey {
        let signing = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let encoded = base64::engine::general_purpose::STANDARD.encode(signing.to_keypair_bytes());
        SecretKey::parse(&format!("edge-1:{encoded}\n")).expect("a valid key")
    }

    #[test]
    fn a_rewritten_narinfo_keeps_what_was_signed_and_verifies_with_either_key() {
        let info = verify(HELLO.as_bytes(), &hello_path(), &trust()).expect("verifies");
        let key = node_key();
        let out = rewrite(&info, "nar/x-y.nar.zst", Some(&key)).expect("rewritten");
        let text = String::from_utf8(out).expect("text");
        assert!(text.contains("URL: nar/x-y.nar.zst\n"), "{text}");
        assert!(text.contains("FileSize: 2155\n"), "{text}");
        // The upstream's signature still holds, and so does the node's own.
        assert!(verify(text.as_bytes(), &hello_path(), &trust()).is_ok());
        let edge_only = Trust::new(&[key.public()], true).expect("the node's public key");
        assert!(verify(text.as_bytes(), &hello_path(), &edge_only).is_ok());
        assert!(verify(HELLO.as_bytes(), &hello_path(), &edge_only).is_err());
        // Asked by hash only, the narinfo must still be for that hash.
        assert!(verify_hash_part(
            text.as_bytes(),
            "ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d",
            &trust()
        )
        .is_ok());
        assert!(matches!(
            verify_hash_part(
                text.as_bytes(),
                "00000000000000000000000000000000",
                &trust()
            ),
            Err(NarInfoError::WrongStorePath { .. })
        ));
    }

    #[test]
    fn secret_keys_are_parsed_strictly_and_never_shown() {
        let key = node_key();
        assert_eq!(format!("{key:?}"), "SecretKey { name: \"edge-1\", .. }");
        assert!(matches!(
            SecretKey::parse("edge-1"),
            Err(SecretKeyError::NoSeparator)
        ));
        assert!(matches!(
            SecretKey::parse(":AAAA"),
            Err(SecretKeyError::EmptyName)
        ));
        assert!(matches!(
            SecretKey::parse("k:!!"),
            Err(SecretKeyError::NotBase64)
        ));
        assert!(matches!(
            SecretKey::parse("k:AAAA"),
            Err(SecretKeyError::Length(3))
        ));
    }

    #[test]
    fn line_ends_may_be_crlf() {
        let crlf = HELLO.replace('\n', "\r\n");
        assert!(verify(crlf.as_bytes(), &hello_path(), &trust()).is_ok());
    }

    #[test]
    fn a_carriage_return_that_ends_a_value_is_refused() {
        // Parsed, the URL would end in CR; written back and parsed again, it would not.
        let cr = HELLO.replace(".nar.zst\n", ".nar.zst\r\r\n");
        let offset = cr.find('\r').expect("a CR");
        assert_eq!(
            verify(cr.as_bytes(), &hello_path(), &trust()).map(|v| v.url().to_owned()),
            Err(NarInfoError::ControlCharacter {
                offset,
                byte: b'\r'
            })
        );
    }

    #[test]
    fn control_characters_inside_values_are_refused() {
        for (from, to) in [
            ("URL: ", "URL: \t"),
            ("Deriver: ", "Deriver: \0"),
            ("zstd", "zs\x7ftd"),
        ] {
            let bad = HELLO.replacen(from, to, 1);
            assert!(
                matches!(
                    verify(bad.as_bytes(), &hello_path(), &trust()),
                    Err(NarInfoError::ControlCharacter { .. })
                ),
                "{to:?}"
            );
        }
    }
}
