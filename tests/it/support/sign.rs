//! Signing keys and narinfo editing, for narinfos that must be re-signed after a change.
//!
//! Only `StorePath`, `NarHash`, `NarSize` and `References` are signed (Nix's fingerprint);
//! editing `URL`, `Compression`, `FileHash` or `FileSize` needs no new signature.

use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey};
use nix_derivation::StoreDir;
use nix_narinfo::NarInfo;

use super::fixtures;

/// A named ed25519 signing key, as Nix uses them (`name:base64`).
#[derive(Debug, Clone)]
pub struct Key {
    name: String,
    key: SigningKey,
}

impl Key {
    /// The fixtures' key, `binplz-test-1`, read from `fixtures/keys/binplz-test-1.secret`
    /// (Nix's format: the name, then base64 of the 32-byte seed and the 32-byte public key).
    pub fn test() -> Key {
        let path = fixtures().join("keys/binplz-test-1.secret");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let (name, encoded) = text
            .trim()
            .split_once(':')
            .expect("a Nix secret key is NAME:BASE64");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("the secret key is base64");
        let bytes: [u8; 64] = bytes
            .try_into()
            .expect("a Nix secret key is 64 bytes: seed and public key");
        let key = SigningKey::from_keypair_bytes(&bytes).expect("seed and public key agree");
        Key {
            name: name.to_owned(),
            key,
        }
    }

    /// A key nobody trusts (fixed seed, so runs are reproducible).
    pub fn unknown() -> Key {
        Key {
            name: "binplz-unknown-1".to_owned(),
            key: SigningKey::from_bytes(&[0x5a; 32]),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key as `--trusted-public-key` takes it: `name:base64`.
    pub fn public(&self) -> String {
        let b64 =
            base64::engine::general_purpose::STANDARD.encode(self.key.verifying_key().as_bytes());
        format!("{}:{b64}", self.name)
    }

    /// Replaces every `Sig` line of `narinfo` with one signature by this key.
    pub fn sign(&self, narinfo: &str) -> String {
        self.add_signature(&remove_field(narinfo, "Sig"))
    }

    /// Appends a `Sig` line: this key's signature over the narinfo's fingerprint (built by
    /// `nix-narinfo` from the parsed values, as a verifier builds it).
    pub fn add_signature(&self, narinfo: &str) -> String {
        let store_dir = StoreDir::default();
        let info = NarInfo::parse_in(&store_dir, narinfo.as_bytes())
            .unwrap_or_else(|e| panic!("cannot sign an invalid narinfo: {e}\n{narinfo}"));
        let sig = self.key.sign(info.fingerprint(&store_dir).as_bytes());
        let b64 = base64::engine::general_purpose::STANDARD.encode(sig.to_bytes());
        let mut out = narinfo.to_owned();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("Sig: {}:{b64}\n", self.name));
        out
    }
}

/// The value of the first `name:` line, without the separating space.
pub fn narinfo_field(narinfo: &str, name: &str) -> Option<String> {
    narinfo.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        (n == name).then(|| v.trim_start().to_owned())
    })
}

/// Sets `name: value`, replacing every existing `name` line (or appending one).
pub fn set_field(narinfo: &str, name: &str, value: &str) -> String {
    let mut out = String::new();
    let mut done = false;
    for line in narinfo.lines() {
        if line.split_once(':').is_some_and(|(n, _)| n == name) {
            if !done {
                out.push_str(&format!("{name}: {value}\n"));
                done = true;
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !done {
        out.push_str(&format!("{name}: {value}\n"));
    }
    out
}

/// Removes every `name` line.
pub fn remove_field(narinfo: &str, name: &str) -> String {
    narinfo
        .lines()
        .filter(|line| line.split_once(':').is_none_or(|(n, _)| n != name))
        .flat_map(|line| [line, "\n"])
        .collect()
}
