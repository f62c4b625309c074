//! A cache's `.ls` listing, as served (plain or compressed JSON), through decoding, parsing
//! and the check against NarSize.
//!
//! Properties, for every listing that parses and whose offsets agree with its tree: the NAR
//! size it implies is the one NarSize it is accepted with (one byte more or less is refused);
//! every file it places lies inside that NAR; and serialising its tree (file contents as
//! zeros) gives a NAR of exactly that size that the NAR reader accepts, whose listing is this
//! one with every `narOffset` filled in. The last makes the listing's rules (names, targets,
//! depth, entries) drift-proof against the reader's.

use serde_json::{Map, Value};

use crate::nar::listing::ListingBuilder;
use crate::nar::writer::{write_nar, Entry};
use crate::nar::{ls, read_nar, Listing, Node};

/// Largest NAR the check rebuilds from an accepted listing (its files written out as
/// zeros): above every seed's, and small enough to keep each execution fast.
const MAX_REBUILT_NAR: u64 = 1 << 20;

pub fn check(data: &[u8]) {
    let Ok(json) = ls::decode(data) else {
        return;
    };
    let Ok(listing) = ls::parse(&json) else {
        return;
    };
    let size = match ls::nar_size_of(&listing) {
        Ok(size) => size,
        Err(e) => {
            assert!(
                matches!(
                    e,
                    ls::LsError::OffsetMismatch { .. } | ls::LsError::TooLarge
                ),
                "{e:?}"
            );
            return;
        }
    };
    assert_eq!(ls::parse_served(data, size).as_ref(), Ok(&listing));
    for wrong in [size.checked_sub(1), size.checked_add(1)]
        .into_iter()
        .flatten()
    {
        assert!(
            matches!(
                ls::parse_served(data, wrong),
                Err(ls::LsError::SizeMismatch { .. })
            ),
            "accepted with NarSize {wrong}, implied {size}"
        );
    }
    files_within(&listing.root, size);
    if size <= MAX_REBUILT_NAR {
        let nar = write_nar(&entry_of(&listing.root));
        assert_eq!(
            nar.len() as u64,
            size,
            "the implied size is the serialised size"
        );
        let mut builder = ListingBuilder::new();
        let read = read_nar(nar.as_slice(), Some(size), &mut builder);
        assert!(
            matches!(read, Ok(n) if n == size),
            "the reader refuses the NAR of an accepted listing: {read:?}"
        );
        let rebuilt = builder.finish().expect("a valid NAR has a root");
        agrees(&listing.root, &rebuilt.root);
    }
}

/// Every file's contents lie within a NAR of `nar_size` bytes: the listed ones end in it,
/// and all of them together fit in it.
fn files_within(node: &Node, nar_size: u64) {
    fn walk(node: &Node, nar_size: u64, total: &mut u64) {
        match node {
            Node::Regular {
                size, nar_offset, ..
            } => {
                if let Some(offset) = nar_offset {
                    assert!(
                        offset.checked_add(*size).is_some_and(|end| end <= nar_size),
                        "a file of {size} bytes at {offset} ends past a NAR of {nar_size}"
                    );
                }
                *total = total
                    .checked_add(*size)
                    .filter(|t| *t <= nar_size)
                    .unwrap_or_else(|| panic!("files larger than a NAR of {nar_size}"));
            }
            Node::Symlink { .. } => {}
            Node::Directory { entries } => {
                for child in entries.values() {
                    walk(child, nar_size, total);
                }
            }
        }
    }
    walk(node, nar_size, &mut 0);
}

/// The tree `node` describes, with every file's contents zeros of its size.
fn entry_of(node: &Node) -> Entry {
    match node {
        Node::Regular {
            size, executable, ..
        } => Entry::File {
            executable: *executable,
            contents: vec![0; usize::try_from(*size).expect("bounded by MAX_REBUILT_NAR")],
        },
        Node::Symlink { target } => Entry::symlink(target.clone()),
        Node::Directory { entries } => Entry::Directory(
            entries
                .iter()
                .map(|(name, child)| (name.clone(), entry_of(child)))
                .collect(),
        ),
    }
}

/// `listed` is `read` where it gives offsets, and `read` with offsets left out elsewhere.
fn agrees(listed: &Node, read: &Node) {
    match (listed, read) {
        (
            Node::Regular {
                size,
                executable,
                nar_offset,
            },
            Node::Regular {
                size: read_size,
                executable: read_executable,
                nar_offset: Some(read_offset),
            },
        ) => {
            assert_eq!((size, executable), (read_size, read_executable));
            if let Some(offset) = nar_offset {
                assert_eq!(offset, read_offset);
            }
        }
        (Node::Directory { entries }, Node::Directory { entries: read }) => {
            assert!(entries.keys().eq(read.keys()), "entries differ");
            for (child, read_child) in entries.values().zip(read.values()) {
                agrees(child, read_child);
            }
        }
        (listed, read) => assert_eq!(listed, read),
    }
}

/// `listing` as a cache's `.ls` JSON, the way Nix writes it (`executable` only when true,
/// `narOffset` when known); `None` when a name or target is not UTF-8, which JSON cannot
/// hold.
pub fn to_json(listing: &Listing) -> Option<Vec<u8>> {
    fn node(n: &Node) -> Option<Value> {
        let mut o = Map::new();
        match n {
            Node::Regular {
                size,
                executable,
                nar_offset,
            } => {
                o.insert("type".into(), "regular".into());
                o.insert("size".into(), (*size).into());
                if *executable {
                    o.insert("executable".into(), true.into());
                }
                if let Some(offset) = nar_offset {
                    o.insert("narOffset".into(), (*offset).into());
                }
            }
            Node::Symlink { target } => {
                o.insert("type".into(), "symlink".into());
                let target = std::str::from_utf8(target).ok()?;
                o.insert("target".into(), target.into());
            }
            Node::Directory { entries } => {
                o.insert("type".into(), "directory".into());
                let mut e = Map::new();
                for (name, child) in entries {
                    e.insert(std::str::from_utf8(name).ok()?.to_owned(), node(child)?);
                }
                o.insert("entries".into(), Value::Object(e));
            }
        }
        Some(Value::Object(o))
    }
    let mut file = Map::new();
    file.insert("version".into(), 1.into());
    file.insert("root".into(), node(&listing.root)?);
    serde_json::to_vec(&Value::Object(file)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_keeps_the_properties() {
        let mut accepted = 0;
        for (name, bytes) in super::super::seeds("ls") {
            println!("{name}");
            check(&bytes);
            let listing = ls::decode(&bytes).ok().and_then(|j| ls::parse(&j).ok());
            accepted += usize::from(listing.is_some_and(|l| ls::nar_size_of(&l).is_ok()));
        }
        assert!(
            accepted >= 10,
            "only {accepted} seeds are accepted listings"
        );
    }
}
