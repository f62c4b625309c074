//! The tree of a NAR without file contents: what a binary cache's `.ls` file describes.
//!
//! The extractor builds one while it streams a NAR (a [`ListingBuilder`] is a
//! [`Visitor`]), so symlinks can be resolved after the whole archive has been verified.

use std::collections::BTreeMap;
use std::io::{self, BufRead};

use super::reader::{FileMeta, Visitor};

/// Most nodes a listing holds. Large store paths (TeX Live, kernel headers) have a few
/// hundred thousand; at roughly 100 bytes a node this bounds a listing near 100 MiB.
pub const MAX_LISTING_ENTRIES: usize = 1 << 20;

/// A NAR with more nodes than a listing holds: the archive may be valid, but it is larger
/// than binplz unpacks.
#[derive(Debug, thiserror::Error)]
#[error("the NAR has more than {limit} entries")]
pub struct TooManyEntries {
    pub limit: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Regular {
        size: u64,
        executable: bool,
        nar_offset: Option<u64>,
    },
    Symlink {
        target: Vec<u8>,
    },
    Directory {
        entries: BTreeMap<Vec<u8>, Node>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub root: Node,
}

impl Listing {
    /// The node at `path` (entry names from the root), without following symlinks.
    pub fn get(&self, path: &[Vec<u8>]) -> Option<&Node> {
        let mut node = &self.root;
        for name in path {
            match node {
                Node::Directory { entries } => node = entries.get(name)?,
                _ => return None,
            }
        }
        Some(node)
    }
}

/// Builds a [`Listing`] from the reader's events.
#[derive(Debug)]
pub struct ListingBuilder {
    root: Option<Node>,
    count: usize,
    limit: usize,
}

impl Default for ListingBuilder {
    fn default() -> Self {
        Self::with_limit(MAX_LISTING_ENTRIES)
    }
}

impl ListingBuilder {
    /// A builder holding at most [`MAX_LISTING_ENTRIES`] nodes.
    pub fn new() -> Self {
        Self::default()
    }

    /// A builder holding at most `limit` nodes (the root included); the walk fails past it.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            root: None,
            count: 0,
            limit,
        }
    }

    fn insert(&mut self, path: &[Vec<u8>], node: Node) -> io::Result<()> {
        self.count += 1;
        if self.count > self.limit {
            let limit = self.limit;
            return Err(io::Error::other(TooManyEntries { limit }));
        }
        let Some((last, parents)) = path.split_last() else {
            self.root = Some(node);
            return Ok(());
        };
        let mut cur = self.root.as_mut();
        for name in parents {
            cur = match cur {
                Some(Node::Directory { entries }) => entries.get_mut(name),
                _ => None,
            };
        }
        match cur {
            Some(Node::Directory { entries }) => {
                entries.insert(last.clone(), node);
                Ok(())
            }
            // The reader emits parents before children, so this cannot happen for a valid walk.
            _ => Err(io::Error::other(
                "listing: entry without a parent directory",
            )),
        }
    }

    /// The finished listing, if the walk saw a root node.
    pub fn finish(self) -> Option<Listing> {
        self.root.map(|root| Listing { root })
    }
}

impl Visitor for ListingBuilder {
    fn directory(&mut self, path: &[Vec<u8>]) -> io::Result<()> {
        self.insert(
            path,
            Node::Directory {
                entries: BTreeMap::new(),
            },
        )
    }
    fn symlink(&mut self, path: &[Vec<u8>], target: &[u8]) -> io::Result<()> {
        self.insert(
            path,
            Node::Symlink {
                target: target.to_vec(),
            },
        )
    }
    fn file(&mut self, path: &[Vec<u8>], meta: FileMeta, _: &mut dyn BufRead) -> io::Result<()> {
        self.insert(
            path,
            Node::Regular {
                size: meta.size,
                executable: meta.executable,
                nar_offset: Some(meta.offset),
            },
        )
    }
}
