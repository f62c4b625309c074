//! Deciding whether a narinfo can be trusted, with Nix's rules.
//!
//! A narinfo counts only if its `StorePath` is the one asked for (hash *and* name) and one of
//! its signatures verifies, with a trusted key, over Nix's fingerprint
//! `1;<path>;<narHash>;<narSize>;<sorted refs>` (built by `nix-narinfo` from parsed values).
//! `URL`, `Compression`, `FileHash` and `FileSize` are not signed: they are treated as
//! hints and checked against the bytes.

use nix_derivation::{NixHash, StoreDir, StorePath};
use nix_narinfo::{NarInfo, TrustedPublicKey};

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
    let store_dir = StoreDir::default();
    let info =
        NarInfo::parse_in(&store_dir, bytes).map_err(|e| NarInfoError::Parse(e.to_string()))?;
    let path = requested.to_absolute_path();
    if info.store_path() != requested {
        return Err(NarInfoError::WrongStorePath {
            expected: path,
            got: info.store_path().to_absolute_path(),
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
