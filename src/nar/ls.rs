//! Binary caches' `.ls` listings (`<hash>.ls`, written with `write-nar-listing=true`).
//!
//! A listing is not signed. It is parsed with the NAR reader's own limits, then checked
//! against the signed NarSize: a NAR's size follows exactly from its tree (names, targets,
//! file sizes, executable bits), and so does every file's `narOffset`. A listing whose
//! implied size or offsets differ from the signed values disagrees with the NAR, and the
//! caller walks the NAR itself instead.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;

use serde::Deserialize;

use super::listing::{Listing, Node, MAX_LISTING_ENTRIES};
use super::wire::{self, padding};
use crate::codec::Codec;

/// Largest listing accepted, after decompression. A listing costs roughly 60 bytes a node,
/// so this is above the largest NAR binplz would list.
pub const MAX_LS_SIZE: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LsError {
    #[error("invalid .ls listing: {0}")]
    Json(String),
    #[error("cannot decompress .ls listing ({codec}): {err}")]
    Decompress { codec: Codec, err: String },
    #[error("unsupported .ls version {0}")]
    Version(u64),
    #[error("invalid .ls listing: bad entry name {0:?}")]
    BadName(String),
    #[error("invalid .ls listing: bad symlink target {0:?}")]
    BadTarget(String),
    #[error("invalid .ls listing: deeper than {max}", max = wire::MAX_DEPTH)]
    TooDeep,
    #[error("invalid .ls listing: more than {MAX_LISTING_ENTRIES} entries")]
    TooManyEntries,
    #[error(".ls listing implies a NAR of more than 2^64 bytes")]
    TooLarge,
    #[error(".ls listing implies a NAR of {implied} bytes, but NarSize is {nar_size}")]
    SizeMismatch { implied: u64, nar_size: u64 },
    #[error(".ls listing gives {path} narOffset {listed}, but the tree puts it at {implied}")]
    OffsetMismatch {
        path: String,
        listed: u64,
        implied: u64,
    },
}

#[derive(Deserialize)]
struct LsFile {
    version: u64,
    root: LsNode,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum LsNode {
    Regular {
        size: u64,
        #[serde(default)]
        executable: bool,
        #[serde(rename = "narOffset")]
        nar_offset: Option<u64>,
    },
    Symlink {
        target: String,
    },
    Directory {
        entries: BTreeMap<String, LsNode>,
    },
}

/// A listing's JSON from the body a cache served. Listings are sometimes served compressed
/// without `Content-Encoding`, so the codec is sniffed from the magic; cache.nixos.org's are
/// brotli, which has no magic, so brotli is what is left when nothing else matches. The
/// output is capped one byte past [`MAX_LS_SIZE`], so a decompression bomb costs no more
/// memory than a listing [`parse`] refuses.
pub fn decode(body: &[u8]) -> Result<Cow<'_, [u8]>, LsError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'{') {
        return Ok(Cow::Borrowed(body));
    }
    let codec = Codec::sniff(body, None).unwrap_or(Codec::Brotli);
    let mut out = Vec::new();
    codec
        .decoder(body)
        .and_then(|d| d.take(MAX_LS_SIZE as u64 + 1).read_to_end(&mut out))
        .map_err(|e| LsError::Decompress {
            codec,
            err: e.to_string(),
        })?;
    Ok(Cow::Owned(out))
}

/// A listing as a cache serves it: [`decode`]d, [`parse`]d and [`check_against`] the
/// signed `nar_size`.
pub fn parse_served(body: &[u8], nar_size: u64) -> Result<Listing, LsError> {
    let listing = parse(&decode(body)?)?;
    check_against(&listing, nar_size)?;
    Ok(listing)
}

/// Parses a `.ls` document (already decompressed) into a [`Listing`].
pub fn parse(bytes: &[u8]) -> Result<Listing, LsError> {
    if bytes.len() > MAX_LS_SIZE {
        return Err(LsError::Json(format!("larger than {MAX_LS_SIZE} bytes")));
    }
    // The scan bounds the parser's recursion (and so its stack) by the deepest listing the
    // NAR reader's depth limit allows; serde_json's own limit (128) is just below that.
    if json_depth_exceeds(bytes, MAX_JSON_DEPTH) {
        return Err(LsError::TooDeep);
    }
    let json = |e: serde_json::Error| LsError::Json(e.to_string());
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.disable_recursion_limit();
    let file = LsFile::deserialize(&mut de).map_err(json)?;
    de.end().map_err(json)?;
    if file.version != 1 {
        return Err(LsError::Version(file.version));
    }
    let mut count = 0;
    let root = convert(file.root, 0, &mut count)?;
    Ok(Listing { root })
}

/// JSON nesting of the deepest listing the NAR reader accepts: the document's object, then
/// per level a node's object and its `entries` object, [`wire::MAX_DEPTH`] levels below the
/// root (whose entries are the deepest object).
const MAX_JSON_DEPTH: usize = 2 * wire::MAX_DEPTH + 3;

/// Whether objects and arrays in `bytes` nest deeper than `max`. Strings are skipped as the
/// JSON parser skips them, so on every prefix it reads, its nesting is the one counted here.
fn json_depth_exceeds(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn convert(node: LsNode, depth: usize, count: &mut usize) -> Result<Node, LsError> {
    *count += 1;
    if *count > MAX_LISTING_ENTRIES {
        return Err(LsError::TooManyEntries);
    }
    if depth > wire::MAX_DEPTH {
        return Err(LsError::TooDeep);
    }
    Ok(match node {
        LsNode::Regular {
            size,
            executable,
            nar_offset,
        } => Node::Regular {
            size,
            executable,
            nar_offset,
        },
        LsNode::Symlink { target } => {
            let t = target.as_bytes();
            if t.is_empty() || t.contains(&0) || t.len() as u64 > wire::MAX_TARGET_LEN {
                return Err(LsError::BadTarget(target));
            }
            Node::Symlink {
                target: target.into_bytes(),
            }
        }
        LsNode::Directory { entries } => {
            let mut out = BTreeMap::new();
            for (name, child) in entries {
                let n = name.as_bytes();
                if n.is_empty()
                    || n == b"."
                    || n == b".."
                    || n.contains(&b'/')
                    || n.contains(&0)
                    || n.len() as u64 > wire::MAX_NAME_LEN
                {
                    return Err(LsError::BadName(name));
                }
                out.insert(name.into_bytes(), convert(child, depth + 1, count)?);
            }
            Node::Directory { entries: out }
        }
    })
}

/// Bytes a NAR string of `len` bytes takes: length, data, padding.
const fn str_len(len: u64) -> u64 {
    8 + len + padding(len)
}

/// Checks `listing` against the signed NarSize: the NAR size its tree implies, and every
/// `narOffset` it gives, must be exactly what serialising that tree would produce.
pub fn check_against(listing: &Listing, nar_size: u64) -> Result<(), LsError> {
    let implied = nar_size_of(listing)?;
    if implied != nar_size {
        return Err(LsError::SizeMismatch { implied, nar_size });
    }
    Ok(())
}

/// The size of the NAR `listing` describes, after checking every `narOffset` it gives
/// against the offset its tree implies.
pub fn nar_size_of(listing: &Listing) -> Result<u64, LsError> {
    let mut pos = str_len(wire::MAGIC.len() as u64);
    let mut path = Vec::new();
    layout(&listing.root, &mut pos, &mut path)?;
    Ok(pos)
}

fn tok(t: &[u8]) -> u64 {
    str_len(t.len() as u64)
}

fn layout(node: &Node, pos: &mut u64, path: &mut Vec<Vec<u8>>) -> Result<(), LsError> {
    // Checked: sizes that each fit in u64 may not together, and a saturated sum would
    // "agree" with a NarSize of u64::MAX while placing files past it.
    let add = |pos: &mut u64, n: u64| -> Result<(), LsError> {
        *pos = pos.checked_add(n).ok_or(LsError::TooLarge)?;
        Ok(())
    };
    add(pos, tok(wire::TOK_OPEN) + tok(wire::TOK_TYPE))?;
    match node {
        Node::Regular {
            size,
            executable,
            nar_offset,
        } => {
            add(pos, tok(wire::TOK_REGULAR))?;
            if *executable {
                add(pos, tok(wire::TOK_EXECUTABLE) + tok(b""))?;
            }
            add(pos, tok(wire::TOK_CONTENTS) + 8)?;
            if let Some(listed) = nar_offset {
                if *listed != *pos {
                    let joined = path.join(&b'/');
                    return Err(LsError::OffsetMismatch {
                        path: String::from_utf8_lossy(&joined).into_owned(),
                        listed: *listed,
                        implied: *pos,
                    });
                }
            }
            add(pos, *size)?;
            add(pos, padding(*size))?;
        }
        Node::Symlink { target } => {
            add(
                pos,
                tok(wire::TOK_SYMLINK) + tok(wire::TOK_TARGET) + str_len(target.len() as u64),
            )?;
        }
        Node::Directory { entries } => {
            add(pos, tok(wire::TOK_DIRECTORY))?;
            for (name, child) in entries {
                add(
                    pos,
                    tok(wire::TOK_ENTRY) + tok(wire::TOK_OPEN) + tok(wire::TOK_NAME),
                )?;
                add(pos, str_len(name.len() as u64) + tok(wire::TOK_NODE))?;
                path.push(name.clone());
                layout(child, pos, path)?;
                path.pop();
                add(pos, tok(wire::TOK_CLOSE))?;
            }
        }
    }
    add(pos, tok(wire::TOK_CLOSE))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nar::listing::ListingBuilder;
    use crate::nar::read_nar;
    use crate::nar::writer::{write_nar, Entry};

    fn sample() -> Entry {
        Entry::dir([
            (
                "bin",
                Entry::dir([
                    ("a", Entry::executable(vec![1u8; 13])),
                    ("b", Entry::symlink("a")),
                ]),
            ),
            (
                "share",
                Entry::dir([("doc", Entry::file("readme")), ("empty", Entry::file(""))]),
            ),
        ])
    }

    #[test]
    fn implied_layout_matches_a_real_serialisation() {
        let nar = write_nar(&sample());
        let mut b = ListingBuilder::new();
        read_nar(nar.as_slice(), None, &mut b).expect("valid");
        let listing = b.finish().expect("root");
        assert_eq!(check_against(&listing, nar.len() as u64), Ok(()));
        assert!(matches!(
            check_against(&listing, nar.len() as u64 + 8),
            Err(LsError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn wrong_offsets_and_sizes_disagree() {
        let nar = write_nar(&sample());
        let json = r#"{"version":1,"root":{"type":"directory","entries":{"bin":{"type":"directory","entries":{
            "a":{"type":"regular","size":13,"executable":true,"narOffset":8},"b":{"type":"symlink","target":"a"}}},
            "share":{"type":"directory","entries":{"doc":{"type":"regular","size":6},"empty":{"type":"regular","size":0}}}}}}"#;
        let listing = parse(json.as_bytes()).expect("parses");
        assert!(matches!(
            check_against(&listing, nar.len() as u64),
            Err(LsError::OffsetMismatch { .. })
        ));
        let json = json
            .replace(r#","narOffset":8"#, "")
            .replace(r#""size":6"#, r#""size":7"#);
        let listing = parse(json.as_bytes()).expect("parses");
        // 6 and 7 bytes pad to the same length: size alone cannot tell, but 6 vs 9 can.
        assert_eq!(check_against(&listing, nar.len() as u64), Ok(()));
        let listing = parse(json.replace(r#""size":7"#, r#""size":9"#).as_bytes()).expect("parses");
        assert!(matches!(
            check_against(&listing, nar.len() as u64),
            Err(LsError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn sizes_past_u64_are_refused_even_against_the_largest_nar_size() {
        // Each size alone fits in u64; together the NAR would not. A saturating sum would
        // be u64::MAX, "agreeing" with that NarSize while the files end past it.
        let json = format!(
            r#"{{"version":1,"root":{{"type":"directory","entries":{{
                "a":{{"type":"regular","size":{big}}},"b":{{"type":"regular","size":{big}}}}}}}}}"#,
            big = u64::MAX / 2 + 1,
        );
        let listing = parse(json.as_bytes()).expect("parses");
        assert_eq!(nar_size_of(&listing), Err(LsError::TooLarge));
        assert_eq!(check_against(&listing, u64::MAX), Err(LsError::TooLarge));
    }

    #[test]
    fn the_deepest_nar_the_reader_accepts_has_a_listing_that_parses() {
        let mut tree = Entry::file("x");
        let mut json = r#"{"type":"regular","size":1}"#.to_owned();
        for _ in 0..wire::MAX_DEPTH {
            tree = Entry::dir([("d", tree)]);
            json = format!(r#"{{"type":"directory","entries":{{"d":{json}}}}}"#);
        }
        let nar = write_nar(&tree);
        read_nar(nar.as_slice(), None, &mut ()).expect("as deep as the reader allows");
        let listing = |root: &str| format!(r#"{{"version":1,"root":{root}}}"#);
        assert!(check_against(
            &parse(listing(&json).as_bytes()).expect("parses"),
            nar.len() as u64
        )
        .is_ok());
        let deeper = format!(r#"{{"type":"directory","entries":{{"d":{json}}}}}"#);
        assert_eq!(parse(listing(&deeper).as_bytes()), Err(LsError::TooDeep));
        // Refused by the scan, before the parser recurses at all.
        assert_eq!(parse(&[b'['; 1 << 20]), Err(LsError::TooDeep));
        let braces_in_names = json.replace(r#""d":"#, r#""{{{{[[[[":"#);
        assert!(parse(listing(&braces_in_names).as_bytes()).is_ok());
    }

    #[test]
    fn served_listings_are_decoded_whatever_their_compression() {
        use std::io::Write;
        let ls = include_bytes!("../../fixtures/cache/fr4l0hfh1lp5pd5df98fgz2m3jczb119.ls");
        let narinfo = include_str!("../../fixtures/cache/fr4l0hfh1lp5pd5df98fgz2m3jczb119.narinfo");
        let nar_size: u64 = narinfo
            .lines()
            .find_map(|l| l.strip_prefix("NarSize: "))
            .and_then(|s| s.parse().ok())
            .expect("NarSize");
        let plain = parse_served(ls, nar_size).expect("the plain listing");
        let mut brotli = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut brotli, 4096, 9, 22);
            w.write_all(ls).expect("brotli");
        }
        let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gzip.write_all(ls).expect("gzip");
        let served = [
            zstd::encode_all(&ls[..], 19).expect("zstd"),
            gzip.finish().expect("gzip"),
            brotli,
            [&b" \n"[..], ls].concat(),
        ];
        for body in served {
            assert_eq!(parse_served(&body, nar_size).as_ref(), Ok(&plain));
        }
        assert!(matches!(
            parse_served(b"\x28\xb5\x2f\xfd not zstd", nar_size),
            Err(LsError::Decompress {
                codec: Codec::Zstd,
                ..
            })
        ));
    }

    #[test]
    fn bad_listings_are_refused() {
        let bad = [
            r#"{"version":2,"root":{"type":"regular","size":1}}"#,
            r#"{"version":1,"root":{"type":"directory","entries":{"..":{"type":"regular","size":1}}}}"#,
            r#"{"version":1,"root":{"type":"directory","entries":{"a/b":{"type":"regular","size":1}}}}"#,
            r#"{"version":1,"root":{"type":"symlink","target":""}}"#,
            r#"{"version":1,"root":{"type":"fifo"}}"#,
            r#"not json"#,
        ];
        for b in bad {
            assert!(parse(b.as_bytes()).is_err(), "{b}");
        }
    }

    #[test]
    fn fixture_listings_agree_with_their_signed_nar_sizes() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/cache");
        let mut checked = 0;
        for e in std::fs::read_dir(dir).expect("fixtures") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "ls") {
                let listing = parse(&std::fs::read(&p).expect("read")).expect("parses");
                let narinfo =
                    std::fs::read_to_string(p.with_extension("narinfo")).expect("narinfo");
                let size: u64 = narinfo
                    .lines()
                    .find_map(|l| l.strip_prefix("NarSize: "))
                    .and_then(|s| s.parse().ok())
                    .expect("NarSize");
                assert_eq!(check_against(&listing, size), Ok(()), "{}", p.display());
                checked += 1;
            }
        }
        assert!(checked >= 10);
    }
}
