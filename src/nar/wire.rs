//! The NAR wire format's tokens and limits, each limit named and justified.

/// The magic string every NAR starts with.
pub const MAGIC: &[u8] = b"nix-archive-1";

pub const TOK_OPEN: &[u8] = b"(";
pub const TOK_CLOSE: &[u8] = b")";
pub const TOK_TYPE: &[u8] = b"type";
pub const TOK_REGULAR: &[u8] = b"regular";
pub const TOK_SYMLINK: &[u8] = b"symlink";
pub const TOK_DIRECTORY: &[u8] = b"directory";
pub const TOK_EXECUTABLE: &[u8] = b"executable";
pub const TOK_CONTENTS: &[u8] = b"contents";
pub const TOK_TARGET: &[u8] = b"target";
pub const TOK_ENTRY: &[u8] = b"entry";
pub const TOK_NAME: &[u8] = b"name";
pub const TOK_NODE: &[u8] = b"node";

/// The longest token of the grammar (`"nix-archive-1"`): any longer length prefix where a
/// token is expected is an error, detected before reading (let alone allocating) the bytes.
pub const MAX_TOKEN_LEN: u64 = 13;

/// Linux's `NAME_MAX`: no file system Nix unpacks onto can hold a longer name.
pub const MAX_NAME_LEN: u64 = 255;

/// Linux's `PATH_MAX` less the terminating NUL: `symlink(2)` refuses longer targets.
pub const MAX_TARGET_LEN: u64 = 4095;

/// Nesting limit. Nix's own store paths never come close; unbounded recursion on hostile
/// input is a stack overflow (a 2026 CVE in another NAR reader).
pub const MAX_DEPTH: usize = 64;

/// Every string is padded with zeros to a multiple of this.
pub const ALIGN: u64 = 8;

/// Padding needed after `len` bytes of string data.
pub const fn padding(len: u64) -> u64 {
    (ALIGN - len % ALIGN) % ALIGN
}
