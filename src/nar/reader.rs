//! A strict, streaming NAR reader.
//!
//! The reader walks the archive once, in order, and tells a [`Visitor`] about every node.
//! File contents are handed to the visitor as a bounded [`BufRead`]; whatever it does not
//! read is skipped without being buffered, so memory stays constant whatever the NAR holds.
//!
//! Every rule Nix, snix and harmonia enforce between them is enforced here, each failure a
//! distinct [`NarError`] variant naming the rule and the byte offset: exact tokens, zero
//! padding (also after skipped contents), entries strictly sorted (which also rejects
//! duplicates), valid entry names, bounded symlink targets and depth, file sizes within the
//! expected NAR size, and nothing after the root node. Every length prefix is checked
//! against its limit before anything is read or allocated.

use std::io::{self, BufRead, Read};

use super::wire::{self, padding};

/// What went wrong while reading a NAR. Offsets count bytes from the start of the NAR.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    /// The source (or the visitor) failed; NAR content was not at fault.
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("NAR ends early at byte {offset}")]
    UnexpectedEof { offset: u64 },
    #[error("not a NAR: the magic string \"nix-archive-1\" is missing")]
    BadMagic,
    #[error("malformed NAR at byte {offset}: expected {expected:?}")]
    UnexpectedToken { offset: u64, expected: &'static str },
    #[error(
        "malformed NAR at byte {offset}: a token of {len} bytes is longer than any in the grammar"
    )]
    TokenTooLong { offset: u64, len: u64 },
    #[error("malformed NAR at byte {offset}: padding is not zero")]
    NonZeroPadding { offset: u64 },
    #[error("malformed NAR at byte {offset}: unknown node type")]
    UnknownType { offset: u64 },
    #[error("malformed NAR at byte {offset}: directory entries are not sorted")]
    EntriesNotSorted { offset: u64 },
    #[error("malformed NAR at byte {offset}: duplicate directory entry")]
    DuplicateEntry { offset: u64 },
    #[error("malformed NAR at byte {offset}: empty entry name")]
    EmptyName { offset: u64 },
    #[error("malformed NAR at byte {offset}: entry name \".\" or \"..\"")]
    DotName { offset: u64 },
    #[error("malformed NAR at byte {offset}: entry name contains '/'")]
    NameWithSlash { offset: u64 },
    #[error("malformed NAR at byte {offset}: entry name contains NUL")]
    NameWithNul { offset: u64 },
    #[error("malformed NAR at byte {offset}: entry name of {len} bytes exceeds {max}", max = wire::MAX_NAME_LEN)]
    NameTooLong { offset: u64, len: u64 },
    #[error("malformed NAR at byte {offset}: empty symlink target")]
    EmptyTarget { offset: u64 },
    #[error("malformed NAR at byte {offset}: symlink target contains NUL")]
    TargetWithNul { offset: u64 },
    #[error("malformed NAR at byte {offset}: symlink target of {len} bytes exceeds {max}", max = wire::MAX_TARGET_LEN)]
    TargetTooLong { offset: u64, len: u64 },
    #[error("malformed NAR at byte {offset}: nesting deeper than {max}", max = wire::MAX_DEPTH)]
    TooDeep { offset: u64 },
    #[error("malformed NAR at byte {offset}: a length of {len} bytes runs past the NAR's size of {limit}")]
    TooLarge { offset: u64, len: u64, limit: u64 },
    #[error("malformed NAR: data after the end of the archive at byte {offset}")]
    TrailingData { offset: u64 },
}

impl NarError {
    /// Whether this is a failure of the bytes themselves (rather than of the source or sink).
    pub fn is_malformed(&self) -> bool {
        !matches!(self, NarError::Io(_))
    }
}

/// Where a regular file sits in the NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    pub executable: bool,
    pub size: u64,
    /// Offset of the first content byte in the uncompressed NAR (the `.ls` `narOffset`).
    pub offset: u64,
}

/// Receives the nodes of a NAR in archive order. `path` holds the entry names from the root
/// (empty for the root node itself). Errors returned by a visitor stop the walk.
pub trait Visitor {
    fn directory(&mut self, path: &[Vec<u8>]) -> io::Result<()> {
        let _ = path;
        Ok(())
    }
    fn symlink(&mut self, path: &[Vec<u8>], target: &[u8]) -> io::Result<()> {
        let _ = (path, target);
        Ok(())
    }
    /// `contents` yields exactly `meta.size` bytes; what the visitor leaves unread is skipped.
    fn file(
        &mut self,
        path: &[Vec<u8>],
        meta: FileMeta,
        contents: &mut dyn BufRead,
    ) -> io::Result<()> {
        let _ = (path, meta, contents);
        Ok(())
    }
}

/// A visitor that only validates.
impl Visitor for () {}

/// Reads one whole NAR from `source`, which must end right after it.
///
/// `max_size` bounds the archive (its expected NarSize, when known): no byte is read past
/// it, and a length prefix reaching past it fails before its data is read. Returns the
/// number of bytes read.
pub fn read_nar<R: BufRead, V: Visitor + ?Sized>(
    source: R,
    max_size: Option<u64>,
    visitor: &mut V,
) -> Result<u64, NarError> {
    let mut r = Reader {
        src: source,
        pos: 0,
        limit: max_size.unwrap_or(u64::MAX),
        path: Vec::new(),
    };
    match r.expect_token(wire::MAGIC, "nix-archive-1") {
        Err(NarError::UnexpectedToken { .. } | NarError::TokenTooLong { .. }) => {
            return Err(NarError::BadMagic)
        }
        other => other?,
    }
    r.node(visitor)?;
    let offset = r.pos;
    loop {
        match r.src.fill_buf() {
            Ok([]) => return Ok(r.pos),
            Ok(_) => return Err(NarError::TrailingData { offset }),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

struct Reader<R> {
    src: R,
    pos: u64,
    limit: u64,
    path: Vec<Vec<u8>>,
}

impl<R: BufRead> Reader<R> {
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), NarError> {
        // Tokens and length prefixes count against `max_size` too, so a NAR can never be
        // read (or reported) as longer than the caller allowed.
        let len = buf.len() as u64;
        if self.pos.checked_add(len).is_none_or(|end| end > self.limit) {
            return Err(NarError::TooLarge {
                offset: self.pos,
                len,
                limit: self.limit,
            });
        }
        match self.src.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(NarError::UnexpectedEof { offset: self.pos })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_padding(&mut self, len: u64) -> Result<(), NarError> {
        let pad = padding(len) as usize;
        if pad > 0 {
            let offset = self.pos;
            let mut b = [0u8; 8];
            self.read_exact(&mut b[..pad])?;
            if b[..pad].iter().any(|&x| x != 0) {
                return Err(NarError::NonZeroPadding { offset });
            }
        }
        Ok(())
    }

    /// Checks a length prefix against the NAR's remaining size before anything is read.
    fn check_len(&self, offset: u64, len: u64) -> Result<(), NarError> {
        let end = self
            .pos
            .checked_add(len)
            .and_then(|e| e.checked_add(padding(len)));
        match end {
            Some(end) if end <= self.limit => Ok(()),
            _ => Err(NarError::TooLarge {
                offset,
                len,
                limit: self.limit,
            }),
        }
    }

    /// Reads a string of at most `max` bytes into `buf`; `Ok(Some(len))` when longer, with
    /// nothing past the length prefix read.
    fn read_str_into(&mut self, max: u64, buf: &mut Vec<u8>) -> Result<Option<u64>, NarError> {
        let offset = self.pos;
        let len = self.read_u64()?;
        if len > max {
            return Ok(Some(len));
        }
        self.check_len(offset, len)?;
        buf.clear();
        buf.resize(len as usize, 0);
        self.read_exact(buf)?;
        self.read_padding(len)?;
        Ok(None)
    }

    /// Reads a token, which must be one of the grammar's (at most [`wire::MAX_TOKEN_LEN`]).
    fn read_token(&mut self) -> Result<([u8; wire::MAX_TOKEN_LEN as usize], usize), NarError> {
        let offset = self.pos;
        let len = self.read_u64()?;
        if len > wire::MAX_TOKEN_LEN {
            return Err(NarError::TokenTooLong { offset, len });
        }
        let mut b = [0u8; wire::MAX_TOKEN_LEN as usize];
        self.read_exact(&mut b[..len as usize])?;
        self.read_padding(len)?;
        Ok((b, len as usize))
    }

    fn expect_token(&mut self, token: &[u8], name: &'static str) -> Result<(), NarError> {
        let offset = self.pos;
        let (b, len) = self.read_token()?;
        if &b[..len] != token {
            return Err(NarError::UnexpectedToken {
                offset,
                expected: name,
            });
        }
        Ok(())
    }

    fn node<V: Visitor + ?Sized>(&mut self, visitor: &mut V) -> Result<(), NarError> {
        if self.path.len() > wire::MAX_DEPTH {
            return Err(NarError::TooDeep { offset: self.pos });
        }
        self.expect_token(wire::TOK_OPEN, "(")?;
        self.expect_token(wire::TOK_TYPE, "type")?;
        let offset = self.pos;
        let (b, len) = self.read_token()?;
        match &b[..len] {
            t if t == wire::TOK_REGULAR => self.regular(visitor)?,
            t if t == wire::TOK_SYMLINK => self.symlink(visitor)?,
            t if t == wire::TOK_DIRECTORY => self.directory(visitor)?,
            _ => return Err(NarError::UnknownType { offset }),
        }
        Ok(())
    }

    fn regular<V: Visitor + ?Sized>(&mut self, visitor: &mut V) -> Result<(), NarError> {
        let offset = self.pos;
        let (b, len) = self.read_token()?;
        let executable = match &b[..len] {
            t if t == wire::TOK_EXECUTABLE => {
                self.expect_token(b"", "\"\" after executable")?;
                self.expect_token(wire::TOK_CONTENTS, "contents")?;
                true
            }
            t if t == wire::TOK_CONTENTS => false,
            _ => {
                return Err(NarError::UnexpectedToken {
                    offset,
                    expected: "executable or contents",
                })
            }
        };
        let offset = self.pos;
        let size = self.read_u64()?;
        self.check_len(offset, size)?;
        let meta = FileMeta {
            executable,
            size,
            offset: self.pos,
        };
        let mut contents = Contents {
            inner: &mut self.src,
            remaining: size,
            source_ended: false,
        };
        let visited = visitor.file(&self.path, meta, &mut contents);
        let eof = |c: &Contents<'_, R>| NarError::UnexpectedEof {
            offset: meta.offset + size - c.remaining,
        };
        if let Err(e) = visited {
            // A visitor that met the early end (`read_exact` does) reports it as its own
            // I/O error; the archive is what is truncated, so say so.
            if contents.source_ended {
                return Err(eof(&contents));
            }
            return Err(e.into());
        }
        // Skip whatever the visitor left, without buffering it.
        while contents.remaining > 0 {
            let n = match contents.fill_buf() {
                Ok(buf) => buf.len(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(eof(&contents));
            }
            contents.consume(n);
        }
        self.pos += size;
        self.read_padding(size)?;
        self.expect_token(wire::TOK_CLOSE, ")")
    }

    fn symlink<V: Visitor + ?Sized>(&mut self, visitor: &mut V) -> Result<(), NarError> {
        self.expect_token(wire::TOK_TARGET, "target")?;
        let offset = self.pos;
        let mut target = Vec::new();
        if let Some(len) = self.read_str_into(wire::MAX_TARGET_LEN, &mut target)? {
            return Err(NarError::TargetTooLong { offset, len });
        }
        if target.is_empty() {
            return Err(NarError::EmptyTarget { offset });
        }
        if target.contains(&0) {
            return Err(NarError::TargetWithNul { offset });
        }
        visitor.symlink(&self.path, &target)?;
        self.expect_token(wire::TOK_CLOSE, ")")
    }

    fn directory<V: Visitor + ?Sized>(&mut self, visitor: &mut V) -> Result<(), NarError> {
        visitor.directory(&self.path)?;
        let mut prev: Option<Vec<u8>> = None;
        loop {
            let offset = self.pos;
            let (b, len) = self.read_token()?;
            match &b[..len] {
                t if t == wire::TOK_CLOSE => return Ok(()),
                t if t == wire::TOK_ENTRY => {}
                _ => {
                    return Err(NarError::UnexpectedToken {
                        offset,
                        expected: "entry or )",
                    })
                }
            }
            self.expect_token(wire::TOK_OPEN, "(")?;
            self.expect_token(wire::TOK_NAME, "name")?;
            let offset = self.pos;
            let mut name = Vec::new();
            if let Some(len) = self.read_str_into(wire::MAX_NAME_LEN, &mut name)? {
                return Err(NarError::NameTooLong { offset, len });
            }
            check_name(&name, offset)?;
            if let Some(prev) = &prev {
                match prev.as_slice().cmp(name.as_slice()) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => return Err(NarError::DuplicateEntry { offset }),
                    std::cmp::Ordering::Greater => {
                        return Err(NarError::EntriesNotSorted { offset })
                    }
                }
            }
            self.expect_token(wire::TOK_NODE, "node")?;
            self.path.push(name);
            self.node(visitor)?;
            prev = self.path.pop();
            self.expect_token(wire::TOK_CLOSE, ")")?;
        }
    }
}

fn check_name(name: &[u8], offset: u64) -> Result<(), NarError> {
    if name.is_empty() {
        Err(NarError::EmptyName { offset })
    } else if name == b"." || name == b".." {
        Err(NarError::DotName { offset })
    } else if name.contains(&b'/') {
        Err(NarError::NameWithSlash { offset })
    } else if name.contains(&0) {
        Err(NarError::NameWithNul { offset })
    } else {
        Ok(())
    }
}

/// A file's contents: exactly `remaining` bytes of the underlying source.
struct Contents<'a, R> {
    inner: &'a mut R,
    remaining: u64,
    /// The source ended before `remaining` reached zero: the NAR is truncated.
    source_ended: bool,
}

impl<R: BufRead> Read for Contents<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Contents<'_, R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.remaining == 0 {
            return Ok(&[]);
        }
        let buf = self.inner.fill_buf()?;
        if buf.is_empty() {
            self.source_ended = true;
        }
        let n = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        Ok(&buf[..n])
    }

    fn consume(&mut self, amt: usize) {
        // Never past this file, even for a visitor that over-consumes.
        let amt = amt.min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        self.inner.consume(amt);
        self.remaining -= amt as u64;
    }
}
