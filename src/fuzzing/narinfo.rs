//! A narinfo through binplz's trust check ([`narinfo::verify`]) and the parser under it.
//!
//! Properties, for every narinfo the parser accepts: asked for its own store path, `verify`
//! refuses it only for a non-SHA-256 NarHash or an unsupported compression, and otherwise
//! hands on exactly the parsed values; asked for another path it refuses it; re-serialised,
//! it parses to the same values (and its canonical form is a fixed point); its fingerprint is
//! Nix's `1;<path>;sha256:<nix32>;<size>;<sorted refs>`, built from those values. When it
//! verifies with the fixtures' key, so does its canonical form, and changing any signed value
//! (NarSize, NarHash, References) breaks the signature. What the parser refuses, `verify`
//! refuses as unparsable, unless it refused it first for a control character.

use nix_derivation::{NixHash, StoreDir, StorePath};
use nix_narinfo::{NarInfo, TrustedPublicKey};

use crate::codec::Codec;
use crate::demo;
use crate::hash;
use crate::narinfo::{self, NarInfoError, Trust};

pub fn check(data: &[u8]) {
    let store_dir = StoreDir::default();
    let anyone = Trust::new::<&str>(&[], false).expect("no keys is a valid configuration");
    let somewhere = store_path("00000000000000000000000000000000-a");
    if let Err(NarInfoError::ControlCharacter { offset, byte }) =
        narinfo::verify(data, &somewhere, &anyone)
    {
        assert_eq!(data.get(offset), Some(&byte));
        return;
    }
    let Ok(info) = NarInfo::parse_in(&store_dir, data) else {
        let refused = narinfo::verify(data, &somewhere, &anyone);
        assert!(
            matches!(refused, Err(NarInfoError::Parse(_))),
            "{refused:?}"
        );
        return;
    };
    let path = info.store_path();

    // Asked for another store path (another name, or another hash), it is refused.
    for other in [
        "00000000000000000000000000000000-a",
        "11111111111111111111111111111111-a",
    ] {
        let other = store_path(other);
        if other != *path {
            let refused = narinfo::verify(data, &other, &anyone);
            assert!(
                matches!(refused, Err(NarInfoError::WrongStorePath { .. })),
                "{refused:?}"
            );
        }
    }

    // Asked for its own path, without signatures required: refused only for what binplz
    // cannot use, and otherwise the parsed values, unchanged.
    let verified = match narinfo::verify(data, path, &anyone) {
        Ok(v) => v,
        Err(NarInfoError::NotSha256 { .. }) => {
            assert!(!matches!(info.nar_hash(), NixHash::Sha256(_)));
            return;
        }
        Err(NarInfoError::Codec { .. }) => {
            assert!(Codec::from_narinfo(Some(info.compression().as_str())).is_err());
            return;
        }
        Err(e) => panic!("a parsed narinfo refused for its own path: {e:?}"),
    };
    assert_eq!(verified.info, info);
    assert_eq!(verified.nar_size, info.nar_size());
    assert_eq!(NixHash::Sha256(verified.nar_hash), *info.nar_hash());
    assert_eq!(
        Ok(verified.codec),
        Codec::from_narinfo(Some(info.compression().as_str()))
    );
    assert_eq!(verified.file_size, info.file_size());
    match info.file_hash() {
        Some(NixHash::Sha256(d)) => assert_eq!(verified.file_hash, Some(*d)),
        _ => assert_eq!(verified.file_hash, None),
    }

    // Re-serialised, it says the same thing.
    let canonical = info.to_canonical_bytes();
    let again = NarInfo::parse_in(&store_dir, &canonical).unwrap_or_else(|e| {
        panic!(
            "the canonical form of an accepted narinfo is refused ({e}):\n{}",
            String::from_utf8_lossy(&canonical)
        )
    });
    assert_eq!(again, info);
    assert_eq!(again.to_canonical_bytes(), canonical);

    // The fingerprint is Nix's, from the parsed values.
    let mut refs: Vec<String> = info
        .references()
        .iter()
        .map(StorePath::to_absolute_path)
        .collect();
    refs.sort();
    let fingerprint = format!(
        "1;{};sha256:{};{};{}",
        path.to_absolute_path(),
        hash::nix32(&verified.nar_hash),
        info.nar_size(),
        refs.join(","),
    );
    assert_eq!(info.fingerprint(&store_dir), fingerprint);
    assert_eq!(again.fingerprint(&store_dir), fingerprint);

    // Signed by the fixtures' key: the signature survives re-serialisation and covers every
    // signed value.
    let key = TrustedPublicKey::parse(demo::PUBLIC_KEY.trim()).expect("the fixtures' key");
    let fixture = Trust::new(&[demo::PUBLIC_KEY.trim()], true).expect("the fixtures' key");
    if narinfo::verify(data, path, &fixture).is_err() {
        return;
    }
    assert!(info.has_valid_signature(&store_dir, std::slice::from_ref(&key)));
    if let Err(e) = narinfo::verify(&canonical, path, &fixture) {
        panic!("the canonical form of a signed narinfo does not verify: {e:?}");
    }
    let mut flipped = verified.nar_hash;
    flipped[0] ^= 1;
    let mut fewer = info.references().clone();
    if fewer.pop_first().is_none() {
        fewer.insert(path.clone());
    }
    for (what, hash, size, refs) in [
        (
            "NarSize",
            info.nar_hash().clone(),
            info.nar_size() ^ 1,
            info.references().clone(),
        ),
        (
            "NarHash",
            NixHash::Sha256(flipped),
            info.nar_size(),
            info.references().clone(),
        ),
        (
            "References",
            info.nar_hash().clone(),
            info.nar_size(),
            fewer,
        ),
    ] {
        let Ok(tampered) = NarInfo::builder(path.clone(), info.url(), hash, size)
            .references(refs)
            .signatures(info.signatures().iter().cloned())
            .build()
        else {
            continue;
        };
        assert!(
            !tampered.has_valid_signature(&store_dir, std::slice::from_ref(&key)),
            "the signature does not cover {what}"
        );
    }
}

fn store_path(basename: &str) -> StorePath {
    StorePath::from_basename(basename.as_bytes()).expect("a valid store path")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_keeps_the_properties() {
        let fixture = Trust::new(&[demo::PUBLIC_KEY.trim()], true).expect("the fixtures' key");
        let mut signed = 0;
        for (name, bytes) in super::super::seeds("narinfo") {
            println!("{name}");
            check(&bytes);
            let path =
                NarInfo::parse_in(&StoreDir::default(), &bytes).map(|i| i.store_path().clone());
            signed +=
                usize::from(path.is_ok_and(|p| narinfo::verify(&bytes, &p, &fixture).is_ok()));
        }
        assert!(
            signed >= 10,
            "only {signed} seeds verify with the fixtures' key"
        );
    }
}
