//! A small NAR writer for tests, fuzzing seeds and benchmark inputs.
//!
//! It writes whatever tree it is given, in the order given, so tests can also build
//! archives that break the reader's rules on purpose (unsorted entries, bad names).

use super::wire::{self, padding};

/// A tree to serialise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    File {
        executable: bool,
        contents: Vec<u8>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Entries are written in the order given: sort them for a valid NAR.
    Directory(Vec<(Vec<u8>, Entry)>),
}

impl Entry {
    pub fn file(contents: impl Into<Vec<u8>>) -> Self {
        Entry::File {
            executable: false,
            contents: contents.into(),
        }
    }
    pub fn executable(contents: impl Into<Vec<u8>>) -> Self {
        Entry::File {
            executable: true,
            contents: contents.into(),
        }
    }
    pub fn symlink(target: impl Into<Vec<u8>>) -> Self {
        Entry::Symlink {
            target: target.into(),
        }
    }
    /// A directory with its entries sorted by name, as Nix writes them.
    pub fn dir<N: Into<Vec<u8>>>(entries: impl IntoIterator<Item = (N, Entry)>) -> Self {
        let mut v: Vec<(Vec<u8>, Entry)> =
            entries.into_iter().map(|(n, e)| (n.into(), e)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Entry::Directory(v)
    }
}

/// Appends one NAR string: length, bytes, zero padding.
pub fn write_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len() + padding(s.len() as u64) as usize, 0);
}

/// Serialises `root` as a complete NAR.
pub fn write_nar(root: &Entry) -> Vec<u8> {
    let mut out = Vec::new();
    write_str(&mut out, wire::MAGIC);
    write_node(&mut out, root);
    out
}

fn write_node(out: &mut Vec<u8>, node: &Entry) {
    write_str(out, wire::TOK_OPEN);
    write_str(out, wire::TOK_TYPE);
    match node {
        Entry::File {
            executable,
            contents,
        } => {
            write_str(out, wire::TOK_REGULAR);
            if *executable {
                write_str(out, wire::TOK_EXECUTABLE);
                write_str(out, b"");
            }
            write_str(out, wire::TOK_CONTENTS);
            write_str(out, contents);
        }
        Entry::Symlink { target } => {
            write_str(out, wire::TOK_SYMLINK);
            write_str(out, wire::TOK_TARGET);
            write_str(out, target);
        }
        Entry::Directory(entries) => {
            write_str(out, wire::TOK_DIRECTORY);
            for (name, child) in entries {
                write_str(out, wire::TOK_ENTRY);
                write_str(out, wire::TOK_OPEN);
                write_str(out, wire::TOK_NAME);
                write_str(out, name);
                write_str(out, wire::TOK_NODE);
                write_node(out, child);
                write_str(out, wire::TOK_CLOSE);
            }
        }
    }
    write_str(out, wire::TOK_CLOSE);
}
