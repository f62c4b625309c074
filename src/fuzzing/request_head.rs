//! Arbitrary bytes as the start of an HTTP/1 connection, through binplz's own head parser
//! (`server::h1`) and the request-target escaper (`server::io`): no panic, and
//!
//! - the escaper's output does not depend on how the bytes arrive, and escaping twice is
//!   escaping once;
//! - after escaping, a head httparse accepts with a path for its target is never refused
//!   for it: every byte `http::Uri` refuses is escaped (for the methods the escaper
//!   follows);
//! - a head binplz takes itself means the same once escaped: the same method, version,
//!   headers and connection handling, and the same target once percent-decoded;
//! - a taken head is self-contained (its bytes alone parse to it), and the size limits
//!   refuse only what reaches them.

use bytes::BytesMut;

use crate::server::h1::{self, Parsed, Refusal, MAX_HEAD};
use crate::server::io::TargetEscaper;

/// Checks every property on `data`; panics when one is broken.
pub fn check(data: &[u8]) {
    let whole = escape(&[data]);
    for split in [
        1,
        data.len() / 3,
        data.len() / 2,
        data.len().saturating_sub(1),
    ] {
        let (a, b) = data.split_at(split.min(data.len()));
        assert_eq!(escape(&[a, b]), whole, "split at {split}");
    }
    let bytewise: Vec<&[u8]> = data.chunks(1).collect();
    assert_eq!(escape(&bytewise), whole, "byte by byte");
    assert_eq!(escape(&[&whole]), whole, "escaping twice changed the bytes");

    let raw = h1::parse(&BytesMut::from(data));
    let escaped = h1::parse(&BytesMut::from(&whole[..]));
    check_limits(data, &raw);
    check_limits(&whole, &escaped);
    if follows(data) && httparse_takes_an_origin_form(&whole) {
        assert!(
            !matches!(escaped, Parsed::Invalid),
            "an escaped head httparse accepts is refused: {:?}",
            String::from_utf8_lossy(&whole)
        );
    }
    if let Parsed::Plain(head, _) = &raw {
        let Parsed::Plain(again, _) = &escaped else {
            panic!("a taken head is not taken once escaped");
        };
        assert_eq!(head.method, again.method);
        assert_eq!(head.version, again.version);
        assert_eq!(head.headers, again.headers);
        assert_eq!(head.keep_alive, again.keep_alive);
        assert_eq!(
            percent_decoded(head.uri.to_string().as_bytes()),
            percent_decoded(again.uri.to_string().as_bytes()),
            "escaping changed what the target means"
        );
    }
}

/// What [`h1::parse`] answers on its own bytes: limits only where they are reached, and a
/// taken head that parses alone to the same length.
fn check_limits(data: &[u8], parsed: &Parsed) {
    match parsed {
        Parsed::Partial => assert!(data.len() < MAX_HEAD, "partial past the limit"),
        Parsed::Refused(Refusal::TargetTooLong) => {
            assert!(data.len() >= MAX_HEAD, "414 under the limit")
        }
        Parsed::Plain(head, len) => {
            assert!(*len <= data.len());
            assert!(head.uri.path().starts_with('/'));
            match h1::parse(&BytesMut::from(&data[..*len])) {
                Parsed::Plain(_, again) => assert_eq!(again, *len),
                _ => panic!("a taken head does not parse alone"),
            }
        }
        Parsed::Other | Parsed::Invalid | Parsed::Refused(_) => {}
    }
}

fn escape(chunks: &[&[u8]]) -> Vec<u8> {
    let mut escaper = TargetEscaper::default();
    let mut out = Vec::new();
    for chunk in chunks {
        escaper.push(chunk, &mut out);
    }
    out
}

/// Whether the escaper follows this connection's first request: a method of one to eight
/// capital letters after any blank lines (others pass through untouched, by design).
fn follows(data: &[u8]) -> bool {
    let start = data
        .iter()
        .position(|b| !matches!(b, b'\r' | b'\n'))
        .unwrap_or(data.len());
    let method = data[start..]
        .split(|&b| b == b' ')
        .next()
        .unwrap_or_default();
    (1..=8).contains(&method.len()) && method.iter().all(u8::is_ascii_uppercase)
}

/// Whether httparse, with hyper's limit on fields, reads a whole head at the start, with a
/// target that is a path (`*` and absolute URLs are hyper's to judge, escaped or not).
fn httparse_takes_an_origin_form(data: &[u8]) -> bool {
    let mut fields = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut fields);
    matches!(req.parse(data), Ok(httparse::Status::Complete(_)))
        && req.path.is_some_and(|p| p.starts_with('/'))
}

/// Percent-decodes `s`, leaving a `%` not followed by two hex digits as it is.
fn percent_decoded(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let pair = (
            s.get(i + 1).copied().and_then(hex),
            s.get(i + 2).copied().and_then(hex),
        );
        match (s[i], pair) {
            (b'%', (Some(h), Some(l))) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_committed_seeds_keep_every_property() {
        for (name, bytes) in super::super::seeds("request_head") {
            println!("{name}");
            super::check(&bytes);
        }
    }
}
