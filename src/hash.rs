//! Digest spellings used by Nix and by binplz's own output.

use nix_derivation::NixHash;

/// Nix's base-32 spelling of a digest (as in `sha256:<nix32>`).
pub fn nix32(digest: &[u8]) -> String {
    nix_derivation::nixbase32::encode(digest)
}

/// Lower-case hexadecimal, as `sha256sum` prints it.
pub fn hex(digest: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(digest.len() * 2);
    for b in digest {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

/// Parses a SHA-256 hash in any of Nix's spellings (`sha256:<nix32|hex|base64>` or SRI).
pub fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    match NixHash::parse(s).ok()? {
        NixHash::Sha256(d) => Some(d),
        _ => None,
    }
}
