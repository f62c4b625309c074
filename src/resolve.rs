//! Resolving a path inside a store path, following symlinks with the extractor's rules.
//!
//! - Relative symlinks are followed inside the output; a `..` above its root is refused.
//! - An absolute symlink into `/nix/store/<ref>/…` leaves this NAR: the caller follows it
//!   only when `<ref>` is one of the signed references (and then fetches and verifies it).
//! - Any other absolute target, a loop, more than [`MAX_SYMLINK_HOPS`] hops or a dangling
//!   target is an error. The final node must be a regular file.

use std::collections::HashSet;
use std::fmt;

use nix_derivation::StorePath;

use crate::nar::{Listing, Node};

/// Symlinks followed for one request, across store paths. Linux's `MAXSYMLINKS` is 40;
/// nothing in `bin/` legitimately needs more than a few.
pub const MAX_SYMLINK_HOPS: usize = 16;

const STORE_DIR: &[u8] = b"/nix/store/";

/// A path inside a store path, as entry names. Displayed with `/` separators.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct RelPath(pub Vec<Vec<u8>>);

impl RelPath {
    /// Splits on `/`, dropping empty and `.` components. `..` is kept (resolution decides).
    pub fn parse(s: &[u8]) -> RelPath {
        RelPath(
            s.split(|&b| b == b'/')
                .filter(|c| !c.is_empty() && *c != b".")
                .map(<[u8]>::to_vec)
                .collect(),
        )
    }

    /// The last component, if any (the file name).
    pub fn file_name(&self) -> Option<&[u8]> {
        self.0.last().map(Vec::as_slice)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let joined = self.0.join(&b'/');
        f.write_str(&String::from_utf8_lossy(&joined))
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}

/// Where a path leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A regular file in this NAR.
    File {
        path: RelPath,
        size: u64,
        executable: bool,
    },
    /// Into another store path: `rest` is to be resolved there.
    StorePath {
        store_path: StorePath,
        rest: RelPath,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("{path} does not exist")]
    NotFound { path: RelPath },
    #[error("{path} is a directory, not a file")]
    IsADirectory { path: RelPath },
    #[error("{path} is a file, not a directory")]
    NotADirectory { path: RelPath },
    #[error("symlink {link} -> {target} escapes the store path")]
    Escapes { link: RelPath, target: String },
    #[error("symlink {link} -> {target} points outside /nix/store")]
    OutsideStore { link: RelPath, target: String },
    #[error(
        "symlink {link} -> {target} points into {store_path}, which is not a signed reference"
    )]
    NotAReference {
        link: RelPath,
        target: String,
        store_path: String,
    },
    #[error("symlink {link} is part of a loop")]
    Loop { link: RelPath },
    #[error("more than {MAX_SYMLINK_HOPS} symlinks to follow")]
    TooManyHops,
}

/// Resolves `path` in `listing` to a regular file, counting followed symlinks in `hops`
/// (shared across store paths by the caller).
pub fn resolve(
    listing: &Listing,
    path: &RelPath,
    hops: &mut usize,
) -> Result<Target, ResolveError> {
    match walk(listing, path, hops)? {
        Walked::Directory(path) => Err(ResolveError::IsADirectory { path }),
        Walked::Target(t) => Ok(t),
    }
}

/// Where [`walk`] ends: a file or another store path, or a directory of this NAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walked {
    Target(Target),
    Directory(RelPath),
}

/// Like [`resolve`], but a directory is a valid end (used to list `bin/`).
pub fn walk(listing: &Listing, path: &RelPath, hops: &mut usize) -> Result<Walked, ResolveError> {
    // `cur` always names a directory (or the root); `todo` holds the components still to walk,
    // reversed so the next one is at the end.
    let mut cur: Vec<Vec<u8>> = Vec::new();
    let mut todo: Vec<Vec<u8>> = path.0.iter().rev().cloned().collect();
    let mut seen: HashSet<Vec<Vec<u8>>> = HashSet::new();
    // The root itself may be a file or a symlink when the path is empty.
    let mut at_root = true;
    loop {
        let node_path: Vec<Vec<u8>>;
        if at_root && todo.is_empty() {
            node_path = Vec::new();
        } else if let Some(c) = todo.pop() {
            if c == b".." {
                if cur.pop().is_none() {
                    return Err(ResolveError::Escapes {
                        link: path.clone(),
                        target: path.to_string(),
                    });
                }
                continue;
            }
            let mut p = cur.clone();
            p.push(c);
            node_path = p;
        } else {
            return Ok(Walked::Directory(RelPath(cur)));
        }
        at_root = false;
        let Some(node) = listing.get(&node_path) else {
            return Err(ResolveError::NotFound {
                path: RelPath(node_path),
            });
        };
        match node {
            Node::Directory { .. } => cur = node_path,
            Node::Regular {
                size, executable, ..
            } => {
                if !todo.is_empty() {
                    return Err(ResolveError::NotADirectory {
                        path: RelPath(node_path),
                    });
                }
                return Ok(Walked::Target(Target::File {
                    path: RelPath(node_path),
                    size: *size,
                    executable: *executable,
                }));
            }
            Node::Symlink { target } => {
                let link = RelPath(node_path.clone());
                if !seen.insert(node_path.clone()) {
                    return Err(ResolveError::Loop { link });
                }
                *hops += 1;
                if *hops > MAX_SYMLINK_HOPS {
                    return Err(ResolveError::TooManyHops);
                }
                let shown = String::from_utf8_lossy(target).into_owned();
                if let Some(rest) = target.strip_prefix(STORE_DIR) {
                    let mut parts = RelPath::parse(rest).0;
                    if parts.is_empty() {
                        return Err(ResolveError::OutsideStore {
                            link,
                            target: shown,
                        });
                    }
                    let base = parts.remove(0);
                    let Ok(store_path) = StorePath::from_basename(&base) else {
                        return Err(ResolveError::OutsideStore {
                            link,
                            target: shown,
                        });
                    };
                    parts.extend(todo.into_iter().rev());
                    return Ok(Walked::Target(Target::StorePath {
                        store_path,
                        rest: RelPath(parts),
                    }));
                }
                if target.starts_with(b"/") {
                    return Err(ResolveError::OutsideStore {
                        link,
                        target: shown,
                    });
                }
                // Relative: walk the target from the link's directory, then what was left.
                let mut link_dir = node_path;
                link_dir.pop();
                if is_escape(&link_dir, target) {
                    return Err(ResolveError::Escapes {
                        link,
                        target: shown,
                    });
                }
                cur = link_dir;
                todo.extend(RelPath::parse(target).0.into_iter().rev());
                if node_path_is_root(&cur) && todo.is_empty() {
                    at_root = true;
                }
            }
        }
    }
}

fn node_path_is_root(p: &[Vec<u8>]) -> bool {
    p.is_empty()
}

/// Whether a relative target climbs above the root from `dir`, judged lexically.
fn is_escape(dir: &[Vec<u8>], target: &[u8]) -> bool {
    let mut depth = dir.len() as isize;
    for c in RelPath::parse(target).0 {
        if c == b".." {
            depth -= 1;
            if depth < 0 {
                return true;
            }
        } else {
            depth += 1;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nar::listing::ListingBuilder;
    use crate::nar::read_nar;
    use crate::nar::writer::{write_nar, Entry};

    const HELLO: &str = "/nix/store/ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d-hello-1.0";

    fn listing(root: &Entry) -> Listing {
        let nar = write_nar(root);
        let mut b = ListingBuilder::new();
        read_nar(nar.as_slice(), None, &mut b).expect("valid NAR");
        b.finish().expect("root")
    }

    fn tree() -> Listing {
        listing(&Entry::dir([
            (
                "bin",
                Entry::dir([
                    ("a", Entry::symlink("b")),
                    ("abs", Entry::symlink(format!("{HELLO}/bin/hello"))),
                    ("b", Entry::symlink("../libexec/tool")),
                    ("dangling", Entry::symlink("nope")),
                    ("dir", Entry::symlink("../libexec")),
                    ("escape", Entry::symlink("../../etc/passwd")),
                    ("etc", Entry::symlink("/etc/passwd")),
                    ("loop1", Entry::symlink("loop2")),
                    ("loop2", Entry::symlink("loop1")),
                    ("plain", Entry::executable("x")),
                    ("self", Entry::symlink(".")),
                    ("storeroot", Entry::symlink("/nix/store")),
                ]),
            ),
            ("libexec", Entry::dir([("tool", Entry::executable("tool"))])),
        ]))
    }

    fn go(l: &Listing, p: &str) -> Result<Target, ResolveError> {
        resolve(l, &RelPath::parse(p.as_bytes()), &mut 0)
    }

    fn file(p: &str) -> Result<Target, ResolveError> {
        Ok(Target::File {
            path: RelPath::parse(p.as_bytes()),
            size: p.len().min(4) as u64,
            executable: true,
        })
    }

    #[test]
    fn plain_file_resolves_to_itself() {
        assert_eq!(
            go(&tree(), "bin/plain"),
            Ok(Target::File {
                path: RelPath::parse(b"bin/plain"),
                size: 1,
                executable: true
            })
        );
    }

    #[test]
    fn relative_symlinks_chain_inside_the_output() {
        assert_eq!(go(&tree(), "bin/a"), file("libexec/tool"));
        assert_eq!(go(&tree(), "bin/dir/tool"), file("libexec/tool"));
        assert_eq!(
            go(&tree(), "bin/self/plain"),
            Ok(Target::File {
                path: RelPath::parse(b"bin/plain"),
                size: 1,
                executable: true
            })
        );
    }

    #[test]
    fn absolute_store_link_leaves_the_nar_with_the_rest_of_the_path() {
        let Ok(Target::StorePath { store_path, rest }) = go(&tree(), "bin/abs") else {
            panic!("expected a store path")
        };
        assert_eq!(store_path.to_absolute_path(), HELLO);
        assert_eq!(rest, RelPath::parse(b"bin/hello"));
    }

    #[test]
    fn escaping_and_foreign_links_are_refused() {
        assert!(matches!(
            go(&tree(), "bin/escape"),
            Err(ResolveError::Escapes { .. })
        ));
        assert!(matches!(
            go(&tree(), "bin/etc"),
            Err(ResolveError::OutsideStore { .. })
        ));
        assert!(matches!(
            go(&tree(), "bin/storeroot"),
            Err(ResolveError::OutsideStore { .. })
        ));
        assert!(matches!(
            go(&tree(), "../x"),
            Err(ResolveError::Escapes { .. })
        ));
    }

    #[test]
    fn loops_dangling_links_and_directories_are_errors() {
        assert!(matches!(
            go(&tree(), "bin/loop1"),
            Err(ResolveError::Loop { .. })
        ));
        assert!(matches!(
            go(&tree(), "bin/dangling"),
            Err(ResolveError::NotFound { .. })
        ));
        assert!(matches!(
            go(&tree(), "bin/missing"),
            Err(ResolveError::NotFound { .. })
        ));
        assert!(matches!(
            go(&tree(), "bin/dir"),
            Err(ResolveError::IsADirectory { .. })
        ));
        assert!(matches!(
            go(&tree(), "bin/plain/x"),
            Err(ResolveError::NotADirectory { .. })
        ));
    }

    #[test]
    fn hop_budget_is_shared_and_bounded() {
        // A chain of 17 links exceeds the budget even without a loop.
        let mut entries: Vec<(String, Entry)> = (0..17)
            .map(|i| (format!("l{i:02}"), Entry::symlink(format!("l{:02}", i + 1))))
            .collect();
        entries.push(("l17".into(), Entry::file("end")));
        let l = listing(&Entry::dir(entries));
        assert_eq!(go(&l, "l01").map(|_| ()), Ok(()));
        assert_eq!(go(&l, "l00"), Err(ResolveError::TooManyHops));
        let mut hops = MAX_SYMLINK_HOPS;
        assert_eq!(
            resolve(&l, &RelPath::parse(b"l16"), &mut hops),
            Err(ResolveError::TooManyHops)
        );
    }

    #[test]
    fn a_single_file_nar_resolves_with_an_empty_path() {
        let l = listing(&Entry::executable("x"));
        assert!(matches!(go(&l, ""), Ok(Target::File { .. })));
        assert!(matches!(
            go(&l, "bin/x"),
            Err(ResolveError::NotFound { .. })
        ));
    }
}
