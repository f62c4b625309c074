//! Tests of the NAR reader, writer and listing: a table of malformed archives (one per rule
//! the reader enforces), valid archives at every limit, round trips of random trees, and
//! archives written by real Nix (the fixtures).

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use proptest::prelude::*;
use rstest::rstest;

use super::listing::{Listing, ListingBuilder, Node};
use super::reader::{read_nar, FileMeta, NarError, Visitor};
use super::wire;
use super::writer::{write_nar, write_str, Entry};

// ---------------------------------------------------------------------------------------
// Building archives, valid or not
// ---------------------------------------------------------------------------------------

/// Raw NAR bytes, built string by string so any rule can be broken on purpose.
#[derive(Debug, Clone, Default)]
struct Nar(Vec<u8>);

impl Nar {
    /// Nothing yet, not even the magic.
    fn raw() -> Self {
        Self::default()
    }
    /// The magic, ready for the root node.
    fn magic() -> Self {
        Self::raw().s(wire::MAGIC)
    }
    /// One NAR string.
    fn s(mut self, s: &[u8]) -> Self {
        write_str(&mut self.0, s);
        self
    }
    /// Several NAR strings.
    fn ss(self, strs: &[&[u8]]) -> Self {
        strs.iter().fold(self, |nar, s| nar.s(s))
    }
    /// A bare length prefix, with nothing after it.
    fn len(mut self, len: u64) -> Self {
        self.0.extend_from_slice(&len.to_le_bytes());
        self
    }
    /// Bytes outside the string framing.
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// A string whose last padding byte is not zero (`s.len()` must not be a multiple of 8).
    fn bad_pad(mut self, s: &[u8]) -> Self {
        assert_ne!(
            s.len() % 8,
            0,
            "a string without padding cannot have bad padding"
        );
        write_str(&mut self.0, s);
        if let Some(last) = self.0.last_mut() {
            *last = 1;
        }
        self
    }
    /// The start of a node: `( type`.
    fn node(self) -> Self {
        self.ss(&[b"(", b"type"])
    }
    /// A complete regular file node.
    fn file(self, contents: &[u8]) -> Self {
        self.node().ss(&[b"regular", b"contents", contents, b")"])
    }
    /// The start of a directory entry, up to and including `node`.
    fn entry(self, name: &[u8]) -> Self {
        self.ss(&[b"entry", b"(", b"name", name, b"node"])
    }
    /// A directory holding one empty file called `name`, where the name may break the rules.
    fn dir_with(name: &[u8]) -> Self {
        Self::magic()
            .node()
            .s(b"directory")
            .entry(name)
            .file(b"")
            .ss(&[b")", b")"])
    }
    /// Drops the last `n` bytes.
    fn cut(mut self, n: usize) -> Self {
        self.0.truncate(self.0.len().saturating_sub(n));
        self
    }
}

impl From<&Entry> for Nar {
    fn from(root: &Entry) -> Self {
        Nar(write_nar(root))
    }
}

/// A directory with `entries` in exactly the order given (not sorted).
fn dir_in_order<'a>(entries: impl IntoIterator<Item = (&'a [u8], Entry)>) -> Entry {
    Entry::Directory(entries.into_iter().map(|(n, e)| (n.to_vec(), e)).collect())
}

/// `leaf` at the end of `depth` nested directories, each called `d`.
fn nested(depth: usize, leaf: Entry) -> Entry {
    (0..depth).fold(leaf, |inner, _| Entry::dir([("d", inner)]))
}

/// `n` empty files in the root directory, in sorted order.
fn flat_dir(n: usize) -> Entry {
    Entry::dir((0..n).map(|i| (format!("f{i:06}"), Entry::file(""))))
}

// ---------------------------------------------------------------------------------------
// Visitors
// ---------------------------------------------------------------------------------------

/// Rebuilds the tree the reader reports, reading every file in full, and keeps each file's
/// metadata in archive order.
#[derive(Debug, Default)]
struct Recorder {
    root: Option<Entry>,
    files: Vec<(Vec<Vec<u8>>, FileMeta, Vec<u8>)>,
}

impl Recorder {
    fn insert(&mut self, path: &[Vec<u8>], entry: Entry) -> io::Result<()> {
        let Some((last, parents)) = path.split_last() else {
            self.root = Some(entry);
            return Ok(());
        };
        let mut cur = self.root.as_mut();
        for name in parents {
            cur = match cur {
                Some(Entry::Directory(entries)) => {
                    entries.iter_mut().find(|(n, _)| n == name).map(|(_, e)| e)
                }
                _ => None,
            };
        }
        match cur {
            Some(Entry::Directory(entries)) => {
                entries.push((last.clone(), entry));
                Ok(())
            }
            _ => Err(io::Error::other("entry reported before its directory")),
        }
    }
}

impl Visitor for Recorder {
    fn directory(&mut self, path: &[Vec<u8>]) -> io::Result<()> {
        self.insert(path, Entry::Directory(Vec::new()))
    }
    fn symlink(&mut self, path: &[Vec<u8>], target: &[u8]) -> io::Result<()> {
        self.insert(path, Entry::symlink(target))
    }
    fn file(
        &mut self,
        path: &[Vec<u8>],
        meta: FileMeta,
        contents: &mut dyn BufRead,
    ) -> io::Result<()> {
        let mut data = Vec::new();
        contents.read_to_end(&mut data)?;
        self.files.push((path.to_vec(), meta, data.clone()));
        self.insert(
            path,
            Entry::File {
                executable: meta.executable,
                contents: data,
            },
        )
    }
}

/// Reads `bytes` only to validate them.
fn check(bytes: &[u8]) -> Result<u64, NarError> {
    read_nar(bytes, None, &mut ())
}

/// Reads `bytes` into a [`Recorder`], asserting the reader's own invariants on the way.
fn record(bytes: &[u8], max_size: Option<u64>) -> Result<Recorder, NarError> {
    let mut rec = Recorder::default();
    let n = read_nar(bytes, max_size, &mut rec)?;
    assert_eq!(n, bytes.len() as u64, "read_nar returns the NAR's length");
    for (path, meta, data) in &rec.files {
        assert_eq!(meta.size, data.len() as u64, "{path:?}: size");
        let start = usize::try_from(meta.offset).expect("offset fits");
        assert_eq!(
            &bytes[start..start + data.len()],
            data.as_slice(),
            "{path:?}: the offset points at the contents"
        );
    }
    Ok(rec)
}

/// The listing Nix would write for `entry`, with file offsets taken from `offsets` in order.
fn listing_node(entry: &Entry, offsets: &mut impl Iterator<Item = u64>) -> Node {
    match entry {
        Entry::File {
            executable,
            contents,
        } => Node::Regular {
            size: contents.len() as u64,
            executable: *executable,
            nar_offset: offsets.next(),
        },
        Entry::Symlink { target } => Node::Symlink {
            target: target.clone(),
        },
        Entry::Directory(entries) => Node::Directory {
            entries: entries
                .iter()
                .map(|(name, child)| (name.clone(), listing_node(child, offsets)))
                .collect(),
        },
    }
}

fn listing_of(bytes: &[u8]) -> Result<Listing, NarError> {
    let mut builder = ListingBuilder::new();
    read_nar(bytes, None, &mut builder)?;
    Ok(builder.finish().expect("a NAR always has a root"))
}

/// A source that hands out one byte per `read`.
struct Trickle<'a>(&'a [u8]);

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.0.len()).min(1);
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// A source that fails every other `read` with `Interrupted`, as a signal would.
struct Interrupting<'a> {
    data: &'a [u8],
    interrupt: bool,
}

impl Read for Interrupting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::ErrorKind::Interrupted.into());
        }
        self.data.read(buf)
    }
}

// ---------------------------------------------------------------------------------------
// Malformed archives: one case per rule
// ---------------------------------------------------------------------------------------

/// A matcher for one [`NarError`] variant (and optionally its fields).
macro_rules! is {
    ($p:pat) => {
        |e: &NarError| matches!(e, $p)
    };
}

#[rstest]
// The magic.
#[case::empty_input(Nar::raw(), is!(NarError::UnexpectedEof { offset: 0 }))]
#[case::magic_only(Nar::magic(), is!(NarError::UnexpectedEof { offset: 24 }))]
#[case::bad_magic(Nar::raw().s(b"nix-archive-2").file(b""), is!(NarError::BadMagic))]
#[case::magic_too_short(Nar::raw().s(b"nix-archive").file(b""), is!(NarError::BadMagic))]
#[case::magic_too_long(Nar::raw().s(b"nix-archive-12").file(b""), is!(NarError::BadMagic))]
#[case::magic_is_a_huge_length(Nar::raw().len(u64::MAX), is!(NarError::BadMagic))]
#[case::nonzero_padding_in_magic(
    Nar::raw().bad_pad(wire::MAGIC).file(b""),
    is!(NarError::NonZeroPadding { offset: 21 })
)]
// Tokens.
#[case::nonzero_padding_in_token(
    Nar::magic().bad_pad(b"(").ss(&[b"type", b"regular", b"contents", b"", b")"]),
    is!(NarError::NonZeroPadding { offset: 33 })
)]
#[case::token_length_over_max(
    Nar::magic().s(b"((((((((((((((").file(b""),
    is!(NarError::TokenTooLong { offset: 24, len: 14 })
)]
#[case::token_length_u64_max(
    Nar::magic().len(u64::MAX),
    is!(NarError::TokenTooLong { offset: 24, len: u64::MAX })
)]
#[case::missing_node_open_paren(
    Nar::magic().ss(&[b"type", b"regular", b"contents", b"", b")"]),
    is!(NarError::UnexpectedToken { offset: 24, expected: "(" })
)]
#[case::missing_type_token(
    Nar::magic().ss(&[b"(", b"regular", b"contents", b"", b")"]),
    is!(NarError::UnexpectedToken { expected: "type", .. })
)]
#[case::unknown_type(
    Nar::magic().node().ss(&[b"fifo", b")"]),
    is!(NarError::UnknownType { offset: 56 })
)]
#[case::type_is_another_token(
    Nar::magic().node().ss(&[b"entry", b")"]),
    is!(NarError::UnknownType { .. })
)]
#[case::type_token_too_long(
    Nar::magic().node().ss(&[b"character-device", b")"]),
    is!(NarError::TokenTooLong { len: 16, .. })
)]
// Regular files.
#[case::missing_contents_token(
    Nar::magic().node().ss(&[b"regular", b"hello", b")"]),
    is!(NarError::UnexpectedToken { expected: "executable or contents", .. })
)]
#[case::regular_closed_without_contents(
    Nar::magic().node().ss(&[b"regular", b")"]),
    is!(NarError::UnexpectedToken { expected: "executable or contents", .. })
)]
#[case::executable_marker_not_empty(
    Nar::magic().node().ss(&[b"regular", b"executable", b"x", b"contents", b"", b")"]),
    is!(NarError::UnexpectedToken { expected: "\"\" after executable", .. })
)]
#[case::executable_marker_missing_empty_string(
    Nar::magic().node().ss(&[b"regular", b"executable", b"contents", b"", b")"]),
    is!(NarError::UnexpectedToken { expected: "\"\" after executable", .. })
)]
#[case::executable_without_contents_token(
    Nar::magic().node().ss(&[b"regular", b"executable", b"", b"hello", b")"]),
    is!(NarError::UnexpectedToken { expected: "contents", .. })
)]
#[case::executable_after_contents(
    Nar::magic().node().ss(&[b"regular", b"contents", b"", b"executable", b"", b")"]),
    is!(NarError::UnexpectedToken { expected: ")", .. })
)]
#[case::nonzero_padding_after_skipped_contents(
    Nar::magic().node().ss(&[b"regular", b"contents"]).bad_pad(b"abc").s(b")"),
    is!(NarError::NonZeroPadding { offset: 99 })
)]
#[case::file_size_u64_max(
    Nar::magic().node().ss(&[b"regular", b"contents"]).len(u64::MAX),
    is!(NarError::TooLarge { offset: 88, len: u64::MAX, .. })
)]
// Symlinks.
#[case::missing_target_token(
    Nar::magic().node().ss(&[b"symlink", b"/x", b")"]),
    is!(NarError::UnexpectedToken { expected: "target", .. })
)]
#[case::symlink_with_contents(
    Nar::magic().node().ss(&[b"symlink", b"contents", b"x", b")"]),
    is!(NarError::UnexpectedToken { expected: "target", .. })
)]
#[case::empty_symlink_target(
    Nar::from(&Entry::symlink("")),
    is!(NarError::EmptyTarget { offset: 88 })
)]
#[case::symlink_target_with_nul(
    Nar::from(&Entry::symlink("a\0b")),
    is!(NarError::TargetWithNul { offset: 88 })
)]
#[case::symlink_target_too_long_4096(
    Nar::from(&Entry::symlink(vec![b'a'; 4096])),
    is!(NarError::TargetTooLong { offset: 88, len: 4096 })
)]
#[case::target_length_u64_max(
    Nar::magic().node().ss(&[b"symlink", b"target"]).len(u64::MAX),
    is!(NarError::TargetTooLong { len: u64::MAX, .. })
)]
#[case::nonzero_padding_in_target(
    Nar::magic().node().ss(&[b"symlink", b"target"]).bad_pad(b"/x").s(b")"),
    is!(NarError::NonZeroPadding { .. })
)]
#[case::symlink_not_closed(
    Nar::magic().node().ss(&[b"symlink", b"target", b"/x", b"target"]),
    is!(NarError::UnexpectedToken { expected: ")", .. })
)]
// Directories.
#[case::unexpected_token_in_directory(
    Nar::magic().node().ss(&[b"directory", b"name", b"a", b")"]),
    is!(NarError::UnexpectedToken { expected: "entry or )", .. })
)]
#[case::entry_without_open_paren(
    Nar::magic().node().ss(&[b"directory", b"entry", b"name", b"a", b"node"]).file(b""),
    is!(NarError::UnexpectedToken { expected: "(", .. })
)]
#[case::entry_without_name_token(
    Nar::magic().node().ss(&[b"directory", b"entry", b"(", b"node"]).file(b""),
    is!(NarError::UnexpectedToken { expected: "name", .. })
)]
#[case::missing_node_token(
    Nar::magic().node().ss(&[b"directory", b"entry", b"(", b"name", b"a"]).file(b""),
    is!(NarError::UnexpectedToken { expected: "node", .. })
)]
#[case::entry_not_closed(
    Nar::magic().node().s(b"directory").entry(b"a").file(b"").entry(b"b").file(b"").s(b")"),
    is!(NarError::UnexpectedToken { expected: ")", .. })
)]
#[case::entries_unsorted(
    Nar::from(&dir_in_order([(&b"b"[..], Entry::file("")), (b"a", Entry::file(""))])),
    is!(NarError::EntriesNotSorted { .. })
)]
#[case::entries_sorted_ignoring_case(
    Nar::from(&dir_in_order([(&b"a"[..], Entry::file("")), (b"B", Entry::file(""))])),
    is!(NarError::EntriesNotSorted { .. })
)]
#[case::entry_after_a_longer_name_it_prefixes(
    Nar::from(&dir_in_order([(&b"ab"[..], Entry::file("")), (b"a", Entry::file(""))])),
    is!(NarError::EntriesNotSorted { .. })
)]
#[case::duplicate_entry(
    Nar::from(&dir_in_order([(&b"a"[..], Entry::file("1")), (b"a", Entry::file("2"))])),
    is!(NarError::DuplicateEntry { .. })
)]
#[case::symlink_then_same_named_directory(
    Nar::from(&dir_in_order([
        (&b"a"[..], Entry::symlink("/etc")),
        (b"a", Entry::dir([("passwd", Entry::file("x"))])),
    ])),
    is!(NarError::DuplicateEntry { .. })
)]
#[case::duplicate_entry_in_subdirectory(
    Nar::from(&Entry::dir([(
        "sub",
        dir_in_order([(&b"x"[..], Entry::file("")), (b"x", Entry::file(""))]),
    )])),
    is!(NarError::DuplicateEntry { .. })
)]
#[case::empty_name(Nar::dir_with(b""), is!(NarError::EmptyName { offset: 128 }))]
#[case::name_dot(Nar::dir_with(b"."), is!(NarError::DotName { offset: 128 }))]
#[case::name_dotdot(Nar::dir_with(b".."), is!(NarError::DotName { offset: 128 }))]
#[case::name_with_slash(Nar::dir_with(b"a/b"), is!(NarError::NameWithSlash { offset: 128 }))]
#[case::name_is_a_slash(Nar::dir_with(b"/"), is!(NarError::NameWithSlash { .. }))]
#[case::name_with_nul(Nar::dir_with(b"a\0b"), is!(NarError::NameWithNul { offset: 128 }))]
#[case::name_too_long_256(
    Nar::dir_with(&[b'a'; 256]),
    is!(NarError::NameTooLong { offset: 128, len: 256 })
)]
#[case::name_length_u64_max(
    Nar::magic().node().s(b"directory").ss(&[b"entry", b"(", b"name"]).len(u64::MAX),
    is!(NarError::NameTooLong { offset: 128, len: u64::MAX })
)]
#[case::nonzero_padding_in_name(
    Nar::magic().node().ss(&[b"directory", b"entry", b"(", b"name"]).bad_pad(b"a")
        .s(b"node").file(b"").ss(&[b")", b")"]),
    is!(NarError::NonZeroPadding { offset: 137 })
)]
#[case::depth_65(Nar::from(&nested(65, Entry::file(""))), is!(NarError::TooDeep { .. }))]
#[case::depth_65_empty_directory(
    Nar::from(&nested(65, Entry::dir::<&str>([]))),
    is!(NarError::TooDeep { .. })
)]
// Truncation.
#[case::truncated_in_length_prefix(
    Nar::magic().bytes(&[1, 0, 0, 0]),
    is!(NarError::UnexpectedEof { offset: 24 })
)]
#[case::truncated_in_token(Nar::magic().len(1), is!(NarError::UnexpectedEof { offset: 32 }))]
#[case::truncated_in_padding(
    Nar::magic().len(1).bytes(b"(\0\0\0"),
    is!(NarError::UnexpectedEof { offset: 33 })
)]
#[case::truncated_in_contents(
    Nar::magic().node().ss(&[b"regular", b"contents"]).len(100).bytes(&[7; 10]),
    is!(NarError::UnexpectedEof { offset: 106 })
)]
#[case::truncated_in_skipped_padding(
    Nar::magic().node().ss(&[b"regular", b"contents"]).len(3).bytes(b"abc\0"),
    is!(NarError::UnexpectedEof { .. })
)]
#[case::truncated_before_close(
    Nar::from(&Entry::file("hello")).cut(16),
    is!(NarError::UnexpectedEof { .. })
)]
#[case::truncated_before_directory_close(
    Nar::from(&Entry::dir([("a", Entry::file(""))])).cut(16),
    is!(NarError::UnexpectedEof { .. })
)]
// After the root.
#[case::trailing_data_after_root(
    Nar::from(&Entry::file("hello")).s(b"("),
    is!(NarError::TrailingData { offset: 120 })
)]
#[case::trailing_zero_bytes(
    Nar::from(&Entry::file("hello")).bytes(&[0; 8]),
    is!(NarError::TrailingData { offset: 120 })
)]
#[case::trailing_single_byte(
    Nar::from(&Entry::symlink("x")).bytes(&[0]),
    is!(NarError::TrailingData { .. })
)]
#[case::second_root_node(
    Nar::from(&Entry::file("hello")).file(b"again"),
    is!(NarError::TrailingData { offset: 120 })
)]
fn rejects_malformed_nar(#[case] nar: Nar, #[case] expected: fn(&NarError) -> bool) {
    let err = check(&nar.0).expect_err("the NAR is malformed");
    assert!(expected(&err), "unexpected error: {err:?}");
    assert!(err.is_malformed(), "{err:?} is the bytes' fault");
    // The same verdict through a visitor that builds a listing, and through a tiny buffer.
    let err = listing_of(&nar.0).expect_err("the NAR is malformed");
    assert!(expected(&err), "with a listing: {err:?}");
    let err = read_nar(BufReader::with_capacity(1, nar.0.as_slice()), None, &mut ())
        .expect_err("the NAR is malformed");
    assert!(expected(&err), "one byte at a time: {err:?}");
}

/// A NAR holding a single file of 100 bytes, whose contents start at byte 96.
fn hundred_byte_file() -> Nar {
    Nar::from(&Entry::file(vec![b'x'; 100]))
}

#[rstest]
#[case::file_size_past_nar_size(
    hundred_byte_file(),
    96 + 50,
    is!(NarError::TooLarge { offset: 88, len: 100, limit: 146 })
)]
#[case::padding_past_nar_size(
    Nar::from(&Entry::file(vec![b'x'; 99])),
    96 + 100,
    is!(NarError::TooLarge { offset: 88, len: 99, .. })
)]
#[case::name_past_nar_size(
    Nar::dir_with(&[b'a'; 200]),
    200,
    is!(NarError::TooLarge { offset: 128, len: 200, .. })
)]
#[case::target_past_nar_size(
    Nar::from(&Entry::symlink(vec![b'a'; 200])),
    200,
    is!(NarError::TooLarge { offset: 88, len: 200, .. })
)]
#[case::closing_token_past_nar_size(
    hundred_byte_file(),
    hundred_byte_file().0.len() as u64 - 1,
    is!(NarError::TooLarge { offset: 209, limit: 215, .. })
)]
#[case::magic_past_nar_size(hundred_byte_file(), 0, is!(NarError::TooLarge { offset: 0, .. }))]
fn rejects_nar_longer_than_max_size(
    #[case] nar: Nar,
    #[case] max_size: u64,
    #[case] expected: fn(&NarError) -> bool,
) {
    let err = read_nar(nar.0.as_slice(), Some(max_size), &mut ()).expect_err("too long");
    assert!(expected(&err), "unexpected error: {err:?}");
    let len = nar.0.len() as u64;
    assert_eq!(
        read_nar(nar.0.as_slice(), Some(len), &mut ()).ok(),
        Some(len)
    );
}

// ---------------------------------------------------------------------------------------
// Valid archives at the limits
// ---------------------------------------------------------------------------------------

#[rstest]
#[case::single_file(Entry::file("hello"))]
#[case::empty_file(Entry::file(""))]
#[case::executable_file(Entry::executable("#!/bin/sh\n"))]
#[case::empty_executable(Entry::executable(""))]
#[case::contents_without_padding(Entry::file("12345678abcdefgh"))]
#[case::symlink_root(Entry::symlink("/nix/store/x"))]
#[case::target_of_one_byte(Entry::symlink("."))]
#[case::target_of_4095_bytes(Entry::symlink(vec![b'a'; 4095]))]
#[case::target_escaping_upwards(Entry::symlink("../../../etc/passwd"))]
#[case::empty_directory(Entry::dir::<&str>([]))]
#[case::name_of_255_bytes(Entry::dir([(vec![b'n'; 255], Entry::file("x"))]))]
#[case::depth_64(nested(64, Entry::file("deep")))]
#[case::depth_64_empty_directory(nested(64, Entry::dir::<&str>([])))]
#[case::names_with_any_other_bytes(Entry::dir([
    (&b"..."[..], Entry::file("")),
    (b".hidden", Entry::file("")),
    (b"a.", Entry::file("")),
    (b" \t\n", Entry::file("")),
    (b"\xff\xfe", Entry::file("")),
    (b"\x01", Entry::file("")),
]))]
#[case::names_sorted_by_bytes(dir_in_order([
    (&b"B"[..], Entry::file("")),
    (b"a", Entry::file("")),
    (b"a0", Entry::file("")),
    (b"ab", Entry::file("")),
    (b"b", Entry::file("")),
]))]
#[case::store_path_shape(Entry::dir([
    ("bin", Entry::dir([
        ("hello", Entry::executable(vec![0x7f; 1000])),
        ("hi", Entry::symlink("hello")),
    ])),
    ("lib", Entry::symlink("../other/lib")),
    ("share", Entry::dir([("doc", Entry::dir([("README", Entry::file("read me"))]))])),
]))]
fn accepts_valid_nar(#[case] root: Entry) {
    let bytes = write_nar(&root);
    let rec = record(&bytes, Some(bytes.len() as u64)).expect("valid NAR");
    assert_eq!(rec.root.as_ref(), Some(&root));

    let listing = listing_of(&bytes).expect("valid NAR");
    let offsets = rec.files.iter().map(|(_, meta, _)| meta.offset);
    assert_eq!(listing.root, listing_node(&root, &mut offsets.into_iter()));

    let slow = BufReader::with_capacity(1, Trickle(&bytes));
    assert_eq!(read_nar(slow, None, &mut ()).ok(), Some(bytes.len() as u64));
}

// ---------------------------------------------------------------------------------------
// Random trees
// ---------------------------------------------------------------------------------------

/// Valid entry names: mostly short names over a few bytes (so siblings share prefixes and
/// sort in interesting ways), sometimes any bytes up to the 255-byte limit.
fn entry_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(prop::sample::select(b"ab.-B".to_vec()), 1..4),
        1 => prop::collection::vec(any::<u8>(), 1..=wire::MAX_NAME_LEN as usize).prop_map(
            |mut name| {
                for b in &mut name {
                    if *b == 0 || *b == b'/' {
                        *b = b'_';
                    }
                }
                name
            }
        ),
    ]
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn symlink_target() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::collection::vec(1u8..=255, 1..40),
        1 => prop::collection::vec(1u8..=255, 1..=wire::MAX_TARGET_LEN as usize),
    ]
}

fn tree() -> impl Strategy<Value = Entry> {
    let leaf = prop_oneof![
        (any::<bool>(), prop::collection::vec(any::<u8>(), 0..100)).prop_map(
            |(executable, contents)| Entry::File {
                executable,
                contents
            }
        ),
        symlink_target().prop_map(|target| Entry::Symlink { target }),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop::collection::btree_map(entry_name(), inner, 0..6)
            .prop_map(|entries| Entry::Directory(entries.into_iter().collect()))
    })
}

proptest! {
    #[test]
    fn random_trees_round_trip(root in tree()) {
        let bytes = write_nar(&root);
        let rec = record(&bytes, Some(bytes.len() as u64)).expect("valid NAR");
        prop_assert_eq!(rec.root.as_ref(), Some(&root));

        let listing = listing_of(&bytes).expect("valid NAR");
        let mut offsets = rec.files.iter().map(|(_, meta, _)| meta.offset);
        prop_assert_eq!(&listing.root, &listing_node(&root, &mut offsets));
        for (path, meta, _) in &rec.files {
            let found = listing.get(path);
            let is_that_file = matches!(
                found,
                Some(Node::Regular { size, nar_offset: Some(o), .. })
                    if *size == meta.size && *o == meta.offset
            );
            prop_assert!(is_that_file, "{:?}: {:?}", path, found);
        }
    }

    #[test]
    fn random_trees_read_one_byte_at_a_time(root in tree()) {
        let bytes = write_nar(&root);
        let mut rec = Recorder::default();
        let slow = BufReader::with_capacity(1, Trickle(&bytes));
        prop_assert_eq!(read_nar(slow, None, &mut rec).ok(), Some(bytes.len() as u64));
        prop_assert_eq!(rec.root, Some(root));
    }

    #[test]
    fn every_truncation_is_an_unexpected_eof(
        root in tree(),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = write_nar(&root);
        let cut = cut.index(bytes.len());
        let err = check(&bytes[..cut]).expect_err("truncated");
        let at_or_before_the_cut =
            matches!(err, NarError::UnexpectedEof { offset } if offset <= cut as u64);
        prop_assert!(at_or_before_the_cut, "{:?}", err);
    }

    #[test]
    fn a_max_size_short_by_any_amount_is_refused(root in tree(), short in 1u64..64) {
        let bytes = write_nar(&root);
        let max = (bytes.len() as u64).saturating_sub(short);
        let err = read_nar(bytes.as_slice(), Some(max), &mut ()).expect_err("too long");
        prop_assert!(matches!(err, NarError::TooLarge { limit, .. } if limit == max), "{:?}", err);
    }

    #[test]
    fn corrupted_nars_fail_cleanly(
        root in tree(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        // Any outcome but a panic or a hang is fine: a flip inside contents is still valid.
        let mut bytes = write_nar(&root);
        let i = at.index(bytes.len());
        bytes[i] ^= xor;
        let _ = listing_of(&bytes);
    }
}

// ---------------------------------------------------------------------------------------
// Hostile lengths, sources and visitors
// ---------------------------------------------------------------------------------------

#[test]
fn hostile_length_prefixes_fail_before_any_allocation() {
    // Allocating any of these lengths would abort the test process, so a returned error
    // shows the length was judged before its bytes were read or a buffer was sized.
    const HUGE: u64 = 1 << 60;
    let name = Nar::magic()
        .node()
        .ss(&[b"directory", b"entry", b"(", b"name"])
        .len(HUGE);
    assert!(matches!(
        check(&name.0),
        Err(NarError::NameTooLong { len: HUGE, .. })
    ));
    let target = Nar::magic().node().ss(&[b"symlink", b"target"]).len(HUGE);
    assert!(matches!(
        check(&target.0),
        Err(NarError::TargetTooLong { len: HUGE, .. })
    ));
    let token = Nar::magic().node().len(HUGE);
    assert!(matches!(
        check(&token.0),
        Err(NarError::TokenTooLong { len: HUGE, .. })
    ));
    // File contents are streamed, never buffered: without a size bound the claim stands
    // until the source runs dry, with one it is refused up front.
    let file = Nar::magic()
        .node()
        .ss(&[b"regular", b"contents"])
        .len(HUGE)
        .bytes(b"short");
    let mut builder = ListingBuilder::new();
    assert!(matches!(
        read_nar(file.0.as_slice(), None, &mut builder),
        Err(NarError::UnexpectedEof { offset: 101 })
    ));
    assert!(matches!(
        read_nar(file.0.as_slice(), Some(1 << 30), &mut ()),
        Err(NarError::TooLarge { len: HUGE, .. })
    ));
}

#[test]
fn a_source_returning_one_byte_per_read_is_enough() {
    let root = Entry::dir([
        ("big", Entry::executable(vec![0xab; 10_000])),
        ("link", Entry::symlink("big")),
        ("sub", Entry::dir([("empty", Entry::file(""))])),
    ]);
    let bytes = write_nar(&root);
    let mut rec = Recorder::default();
    let slow = BufReader::with_capacity(1, Trickle(&bytes));
    assert_eq!(
        read_nar(slow, Some(bytes.len() as u64), &mut rec).ok(),
        Some(bytes.len() as u64)
    );
    assert_eq!(rec.root, Some(root.clone()));
    // The same when the visitor skips the contents instead of reading them.
    let slow = BufReader::with_capacity(1, Trickle(&bytes));
    let mut builder = ListingBuilder::new();
    assert_eq!(
        read_nar(slow, None, &mut builder).ok(),
        Some(bytes.len() as u64)
    );
    assert_eq!(builder.finish(), listing_of(&bytes).ok());
}

#[test]
fn interrupted_reads_are_retried() {
    let root = Entry::dir([
        ("a", Entry::file(vec![1; 5000])),
        ("b", Entry::symlink("a")),
    ]);
    let bytes = write_nar(&root);
    for visitor_reads in [false, true] {
        let source = BufReader::with_capacity(
            64,
            Interrupting {
                data: &bytes,
                interrupt: false,
            },
        );
        let result = if visitor_reads {
            read_nar(source, None, &mut Recorder::default())
        } else {
            read_nar(source, None, &mut ListingBuilder::new())
        };
        assert_eq!(result.ok(), Some(bytes.len() as u64), "{visitor_reads}");
    }
}

#[test]
fn source_errors_are_not_blamed_on_the_nar() {
    struct Failing<'a>(&'a [u8]);
    impl Read for Failing<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone"));
            }
            self.0.read(buf)
        }
    }
    let bytes = write_nar(&Entry::dir([("a", Entry::file(vec![1; 1000]))]));
    for cut in [0, 30, 200, bytes.len() - 1] {
        let source = BufReader::with_capacity(16, Failing(&bytes[..cut]));
        let err = read_nar(source, None, &mut ()).expect_err("the source fails");
        assert!(
            matches!(&err, NarError::Io(e) if e.kind() == io::ErrorKind::ConnectionReset),
            "cut at {cut}: {err:?}"
        );
        assert!(!err.is_malformed());
    }
}

#[test]
fn visitor_errors_stop_the_walk() {
    struct NoSymlinks(usize);
    impl Visitor for NoSymlinks {
        fn symlink(&mut self, _: &[Vec<u8>], _: &[u8]) -> io::Result<()> {
            Err(io::Error::other("no symlinks here"))
        }
        fn file(&mut self, _: &[Vec<u8>], _: FileMeta, _: &mut dyn BufRead) -> io::Result<()> {
            self.0 += 1;
            Ok(())
        }
    }
    let bytes = write_nar(&Entry::dir([
        ("a", Entry::file("")),
        ("b", Entry::symlink("a")),
        ("c", Entry::file("")),
    ]));
    let mut visitor = NoSymlinks(0);
    let err = read_nar(bytes.as_slice(), None, &mut visitor).expect_err("refused");
    assert!(
        matches!(err, NarError::Io(_)) && !err.is_malformed(),
        "{err:?}"
    );
    assert_eq!(visitor.0, 1, "nothing after the failing node is visited");
}

#[test]
fn a_visitor_meeting_truncated_contents_sees_an_unexpected_eof() {
    // A visitor using `read_exact` turns the early end into its own I/O error; the reader
    // still reports the truncation as the NAR's fault, at the right offset.
    struct Exact;
    impl Visitor for Exact {
        fn file(
            &mut self,
            _: &[Vec<u8>],
            meta: FileMeta,
            contents: &mut dyn BufRead,
        ) -> io::Result<()> {
            let mut buf = vec![0; usize::try_from(meta.size).map_err(io::Error::other)?];
            contents.read_exact(&mut buf)
        }
    }
    let nar = Nar::magic()
        .node()
        .ss(&[b"regular", b"contents"])
        .len(100)
        .bytes(&[7; 10]);
    let err = read_nar(nar.0.as_slice(), None, &mut Exact).expect_err("truncated");
    assert!(
        matches!(err, NarError::UnexpectedEof { offset: 106 }),
        "{err:?}"
    );
}

#[test]
fn contents_a_visitor_leaves_unread_are_skipped() {
    struct Peek(Vec<Vec<u8>>);
    impl Visitor for Peek {
        fn file(&mut self, _: &[Vec<u8>], _: FileMeta, c: &mut dyn BufRead) -> io::Result<()> {
            let mut head = [0; 3];
            let n = c.read(&mut head)?;
            self.0.push(head[..n].to_vec());
            Ok(())
        }
    }
    let bytes = write_nar(&Entry::dir([
        ("a", Entry::file("abcdefghijk")),
        ("b", Entry::file("")),
        ("c", Entry::file("xyz")),
    ]));
    let mut peek = Peek(Vec::new());
    assert_eq!(
        read_nar(
            BufReader::with_capacity(4, bytes.as_slice()),
            None,
            &mut peek
        )
        .ok(),
        Some(bytes.len() as u64)
    );
    assert_eq!(peek.0, [b"abc".to_vec(), Vec::new(), b"xyz".to_vec()]);
}

#[test]
fn contents_never_yield_more_than_the_file() {
    // A visitor that reads to the end must stop at the file's last byte, even when the
    // source's buffer already holds the rest of the archive.
    let bytes = write_nar(&Entry::dir([
        ("a", Entry::file("first")),
        ("b", Entry::file("second")),
    ]));
    let rec = record(&bytes, None).expect("valid NAR");
    let contents: Vec<_> = rec.files.iter().map(|(_, _, c)| c.as_slice()).collect();
    assert_eq!(contents, [&b"first"[..], b"second"]);
}

#[test]
fn file_offsets_match_the_nar_layout() {
    // magic (24) + "(" "type" "regular" "contents" (4 x 16) + the length (8).
    let bytes = write_nar(&Entry::file("hello"));
    let rec = record(&bytes, None).expect("valid NAR");
    let (_, meta, _) = &rec.files[0];
    assert_eq!(
        *meta,
        FileMeta {
            executable: false,
            size: 5,
            offset: 96
        }
    );
    // The executable marker adds two strings ("executable" and "") before the contents.
    let bytes = write_nar(&Entry::executable("hello"));
    let rec = record(&bytes, None).expect("valid NAR");
    assert_eq!(rec.files[0].1.offset, 96 + 24 + 8);
}

// ---------------------------------------------------------------------------------------
// Listings
// ---------------------------------------------------------------------------------------

fn names(path: &[&str]) -> Vec<Vec<u8>> {
    path.iter().map(|n| n.as_bytes().to_vec()).collect()
}

#[test]
fn listing_describes_the_tree() {
    let root = Entry::dir([
        (
            "bin",
            Entry::dir([
                ("hello", Entry::executable("ELF")),
                ("hi", Entry::symlink("hello")),
            ]),
        ),
        ("README", Entry::file("")),
    ]);
    let bytes = write_nar(&root);
    let listing = listing_of(&bytes).expect("valid NAR");
    let rec = record(&bytes, None).expect("valid NAR");
    let offset = |want: &[&str]| {
        rec.files
            .iter()
            .find(|(p, _, _)| *p == names(want))
            .map(|(_, meta, _)| meta.offset)
    };
    let expected = Node::Directory {
        entries: BTreeMap::from([
            (
                b"README".to_vec(),
                Node::Regular {
                    size: 0,
                    executable: false,
                    nar_offset: offset(&["README"]),
                },
            ),
            (
                b"bin".to_vec(),
                Node::Directory {
                    entries: BTreeMap::from([
                        (
                            b"hello".to_vec(),
                            Node::Regular {
                                size: 3,
                                executable: true,
                                nar_offset: offset(&["bin", "hello"]),
                            },
                        ),
                        (
                            b"hi".to_vec(),
                            Node::Symlink {
                                target: b"hello".to_vec(),
                            },
                        ),
                    ]),
                },
            ),
        ]),
    };
    assert!(offset(&["README"]).is_some() && offset(&["bin", "hello"]).is_some());
    assert_eq!(listing.root, expected);
}

#[test]
fn listing_get_walks_names_without_following_symlinks() {
    let root = Entry::dir([
        (
            "bin",
            Entry::dir([
                ("hello", Entry::executable("ELF")),
                ("hi", Entry::symlink("hello")),
            ]),
        ),
        ("lib", Entry::symlink("bin")),
    ]);
    let listing = listing_of(&write_nar(&root)).expect("valid NAR");
    assert_eq!(listing.get(&[]), Some(&listing.root));
    assert!(matches!(
        listing.get(&names(&["bin"])),
        Some(Node::Directory { entries }) if entries.len() == 2
    ));
    assert!(matches!(
        listing.get(&names(&["bin", "hello"])),
        Some(Node::Regular {
            size: 3,
            executable: true,
            ..
        })
    ));
    assert!(matches!(
        listing.get(&names(&["bin", "hi"])),
        Some(Node::Symlink { target }) if target == b"hello"
    ));
    assert_eq!(listing.get(&names(&["missing"])), None);
    assert_eq!(listing.get(&names(&["bin", "hello", "x"])), None);
    assert_eq!(listing.get(&names(&["lib", "hello"])), None);

    let single = listing_of(&write_nar(&Entry::file("x"))).expect("valid NAR");
    assert!(matches!(single.get(&[]), Some(Node::Regular { .. })));
    assert_eq!(single.get(&names(&["x"])), None);
}

#[test]
fn listing_entry_cap_counts_every_node() {
    // The root and three files: four nodes.
    let bytes = write_nar(&flat_dir(3));
    let mut builder = ListingBuilder::with_limit(4);
    assert_eq!(
        read_nar(bytes.as_slice(), None, &mut builder).ok(),
        Some(bytes.len() as u64)
    );
    assert!(builder.finish().is_some());

    let mut builder = ListingBuilder::with_limit(3);
    let err = read_nar(bytes.as_slice(), None, &mut builder).expect_err("over the cap");
    assert!(
        matches!(&err, NarError::Io(e) if e.to_string().contains("more than 3 entries")),
        "{err:?}"
    );

    // Deep trees count as much as wide ones.
    let bytes = write_nar(&nested(10, Entry::file("")));
    let mut builder = ListingBuilder::with_limit(10);
    assert!(read_nar(bytes.as_slice(), None, &mut builder).is_err());
}

#[test]
fn listing_builder_default_cap_holds_ordinary_trees() {
    let bytes = write_nar(&flat_dir(1000));
    let listing = listing_of(&bytes).expect("well under the cap");
    assert!(matches!(listing.root, Node::Directory { entries } if entries.len() == 1000));
}

// ---------------------------------------------------------------------------------------
// Archives written by Nix
// ---------------------------------------------------------------------------------------

/// A `.ls` listing's node, as the reader's [`Node`].
fn node_from_json(v: &serde_json::Value) -> Node {
    let field = |k: &str| v.get(k).unwrap_or_else(|| panic!("missing {k} in {v}"));
    match field("type").as_str() {
        Some("directory") => Node::Directory {
            entries: field("entries")
                .as_object()
                .expect("entries is an object")
                .iter()
                .map(|(name, child)| (name.as_bytes().to_vec(), node_from_json(child)))
                .collect(),
        },
        Some("regular") => Node::Regular {
            size: field("size").as_u64().expect("size is a number"),
            executable: v
                .get("executable")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            nar_offset: v.get("narOffset").and_then(serde_json::Value::as_u64),
        },
        Some("symlink") => Node::Symlink {
            target: field("target")
                .as_str()
                .expect("target is a string")
                .as_bytes()
                .to_vec(),
        },
        other => panic!("unknown node type {other:?}"),
    }
}

/// The tree a listing and the NAR's file contents describe (for re-serialising).
fn entry_from(node: &Node, path: &mut Vec<Vec<u8>>, rec: &Recorder) -> Entry {
    match node {
        Node::Regular { executable, .. } => {
            let (_, _, contents) = rec
                .files
                .iter()
                .find(|(p, _, _)| p == path)
                .expect("every listed file was visited");
            Entry::File {
                executable: *executable,
                contents: contents.clone(),
            }
        }
        Node::Symlink { target } => Entry::symlink(target.clone()),
        Node::Directory { entries } => Entry::Directory(
            entries
                .iter()
                .map(|(name, child)| {
                    path.push(name.clone());
                    let entry = entry_from(child, path, rec);
                    path.pop();
                    (name.clone(), entry)
                })
                .collect(),
        ),
    }
}

#[test]
fn nars_written_by_nix_match_their_listings_and_our_writer() {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/cache");
    let mut seen = 0;
    for narinfo in std::fs::read_dir(&cache).expect("fixtures/cache") {
        let narinfo = narinfo.expect("directory entry").path();
        if narinfo.extension().and_then(|e| e.to_str()) != Some("narinfo") {
            continue;
        }
        let text = std::fs::read_to_string(&narinfo).expect("narinfo");
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
                .unwrap_or_else(|| panic!("{key} in {}", narinfo.display()))
        };
        if !field("URL").ends_with(".zst") {
            continue;
        }
        let compressed = std::fs::read(cache.join(field("URL"))).expect("NAR file");
        let bytes = zstd::decode_all(compressed.as_slice()).expect("zstd");
        let nar_size: u64 = field("NarSize").parse().expect("NarSize");
        assert_eq!(bytes.len() as u64, nar_size);

        let rec = record(&bytes, Some(nar_size)).expect("Nix writes valid NARs");
        let listing = listing_of(&bytes).expect("Nix writes valid NARs");
        let ls = narinfo.with_extension("ls");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&ls).expect(".ls file")).expect("JSON");
        assert_eq!(
            listing.root,
            node_from_json(&json["root"]),
            "{}",
            ls.display()
        );
        // Our writer produces Nix's bytes for the same tree.
        let tree = entry_from(&listing.root, &mut Vec::new(), &rec);
        assert!(write_nar(&tree) == bytes, "{}", narinfo.display());
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} fixture NARs found");
}
