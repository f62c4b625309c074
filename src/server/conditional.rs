//! What a file request's `If-None-Match`, `Range` and `If-Range` ask for, decided against
//! the file's length and strong `ETag` (RFC 9110 §13.2.2, §13.1.5, §14.2), apart from the
//! response so that the fuzz target can check every answer.
//!
//! ```text
//!  If-None-Match matches (weakly) ─► 304
//!  no Range, or not one byte range ─► 200, the whole file
//!  If-Range present, not the current ETag (strongly) ─► 200, the whole file
//!  the range starts past the end ─► 416
//!  otherwise ─► 206, the range cut to the file
//! ```
//!
//! `If-Range` guards a resumed download: a client continuing a file it has the head of
//! sends the validator of that head, and must get the whole new file when the program
//! changed since (an index update), never the new file's tail behind the old head. File
//! responses carry no `Last-Modified`, so a date in `If-Range` never matches.

use http::{header, HeaderMap, HeaderValue};

/// What to send for a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 304: the client's copy is current.
    NotModified,
    /// 200 with the whole file.
    Whole,
    /// 206 with `len` bytes from `start`: never empty, and inside the file.
    Part { start: u64, len: u64 },
    /// 416: the one range asked for starts at or past the end of the file.
    Unsatisfiable,
}

/// The answer to a request with `headers` for a file of `size` bytes whose `ETag` is
/// `etag` (a quoted strong entity tag, `"…"`).
pub fn decide(headers: &HeaderMap, size: u64, etag: &str) -> Answer {
    if none_match(headers, etag) {
        return Answer::NotModified;
    }
    let mut ranges = headers.get_all(header::RANGE).iter();
    let range = match (ranges.next(), ranges.next()) {
        (Some(r), None) => r,
        // None, or several fields: not one range we serve.
        _ => return Answer::Whole,
    };
    if headers.contains_key(header::IF_RANGE) && !if_range_matches(headers, etag) {
        return Answer::Whole;
    }
    match range.to_str().map(|r| parse_range(r, size)) {
        Ok(Range::Bytes(start, end)) => Answer::Part {
            start,
            len: end - start + 1,
        },
        Ok(Range::Unsatisfiable) => Answer::Unsatisfiable,
        Ok(Range::Ignore) | Err(_) => Answer::Whole,
    }
}

/// `Content-Range` of a 206 for `len` bytes from `start` of `size`.
pub fn content_range(start: u64, len: u64, size: u64) -> String {
    format!(
        "bytes {start}-{}/{size}",
        start.saturating_add(len.saturating_sub(1))
    )
}

/// `Content-Range` of a 416 for a file of `size` bytes.
pub fn unsatisfied_range(size: u64) -> String {
    format!("bytes */{size}")
}

/// Whether `If-None-Match` (every field of it) names `etag`, compared weakly (a `W/` tag
/// matches too), or is `*`.
fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.trim() == "*"
                || v.split(',').any(|t| {
                    let t = t.trim();
                    t.strip_prefix("W/").unwrap_or(t) == etag
                })
        })
}

/// Whether `If-Range` is exactly one field holding `etag`, compared strongly: a weak tag
/// (`W/"…"`), a date (there is no `Last-Modified` to match), another tag, a list or
/// anything unreadable is not a match.
fn if_range_matches(headers: &HeaderMap, etag: &str) -> bool {
    let mut fields = headers.get_all(header::IF_RANGE).iter();
    match (fields.next(), fields.next()) {
        (Some(v), None) => strong_match(v, etag),
        _ => false,
    }
}

fn strong_match(v: &HeaderValue, etag: &str) -> bool {
    v.to_str().is_ok_and(|v| v.trim() == etag)
}

/// A `Range` value as far as binplz serves it.
enum Range {
    /// Not a single byte range we serve: send the whole file.
    Ignore,
    Unsatisfiable,
    /// Inclusive bounds, inside the file.
    Bytes(u64, u64),
}

/// Parses a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range (RFC 9110 §14.1.2); several
/// ranges, other units and anything malformed get the whole file.
fn parse_range(v: &str, size: u64) -> Range {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Range::Ignore;
    };
    if spec.contains(',') {
        return Range::Ignore;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return Range::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    let last = size.checked_sub(1);
    match (number(a), number(b), a.is_empty(), b.is_empty()) {
        // `-n`: the last n bytes; none asked for, or none there, cannot be satisfied.
        (None, Some(n), true, false) => match last {
            Some(last) if n > 0 => Range::Bytes(size.saturating_sub(n), last),
            _ => Range::Unsatisfiable,
        },
        // `a-`: from a to the end.
        (Some(s), None, false, true) => match last {
            Some(last) if s <= last => Range::Bytes(s, last),
            _ => Range::Unsatisfiable,
        },
        // `a-b`, cut to the end.
        (Some(s), Some(e), false, false) if s <= e => match last {
            Some(last) if s <= last => Range::Bytes(s, e.min(last)),
            _ => Range::Unsatisfiable,
        },
        _ => Range::Ignore,
    }
}

/// Digits only: `str::parse` also takes a leading `+`, which a range may not have.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ETAG: &str = "\"5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03\"";

    fn answer(fields: &[(&str, &str)], size: u64) -> Answer {
        let mut h = HeaderMap::new();
        for (name, value) in fields {
            h.append(
                header::HeaderName::from_bytes(name.as_bytes()).expect("a name"),
                HeaderValue::from_str(value).expect("a value"),
            );
        }
        decide(&h, size, ETAG)
    }

    fn part(start: u64, len: u64) -> Answer {
        Answer::Part { start, len }
    }

    #[rstest::rstest]
    #[case::a_slice("bytes=100-199", part(100, 100))]
    #[case::the_first_byte("bytes=0-0", part(0, 1))]
    #[case::the_last_bytes("bytes=-16", part(984, 16))]
    #[case::more_last_bytes_than_there_are("bytes=-5000", part(0, 1000))]
    #[case::to_the_end("bytes=990-", part(990, 10))]
    #[case::cut_to_the_end("bytes=990-5000", part(990, 10))]
    #[case::spaces_around(" bytes= 1 - 2 ", part(1, 2))]
    #[case::from_the_end("bytes=1000-", Answer::Unsatisfiable)]
    #[case::no_bytes("bytes=-0", Answer::Unsatisfiable)]
    #[case::backwards("bytes=5-2", Answer::Whole)]
    #[case::another_unit("items=0-1", Answer::Whole)]
    #[case::several_ranges("bytes=0-1,5-6", Answer::Whole)]
    #[case::a_sign("bytes=+5-", Answer::Whole)]
    #[case::nothing("bytes=-", Answer::Whole)]
    #[case::too_large_a_number("bytes=99999999999999999999-", Answer::Whole)]
    fn one_byte_range_is_served_cut_to_the_file(#[case] range: &str, #[case] want: Answer) {
        assert_eq!(answer(&[("range", range)], 1000), want, "{range}");
    }

    #[test]
    fn an_empty_file_has_no_range_to_give() {
        for range in ["bytes=0-", "bytes=0-0", "bytes=-1"] {
            assert_eq!(
                answer(&[("range", range)], 0),
                Answer::Unsatisfiable,
                "{range}"
            );
        }
    }

    #[test]
    fn if_range_with_the_current_etag_gives_the_range() {
        for if_range in [ETAG.to_owned(), format!(" {ETAG} ")] {
            assert_eq!(
                answer(&[("range", "bytes=10-"), ("if-range", &if_range)], 1000),
                part(10, 990)
            );
        }
        assert_eq!(
            answer(&[("range", "bytes=1000-"), ("if-range", ETAG)], 1000),
            Answer::Unsatisfiable
        );
    }

    #[rstest::rstest]
    #[case::another_etag("\"0000\"")]
    #[case::the_etag_made_weak(&format!("W/{ETAG}"))]
    #[case::a_date("Wed, 21 Oct 2015 07:28:00 GMT")]
    #[case::a_list_with_the_etag(&format!("\"x\", {ETAG}"))]
    #[case::the_etag_unquoted(ETAG.trim_matches('"'))]
    #[case::empty("")]
    #[case::garbage("not a validator")]
    fn if_range_without_the_current_etag_gives_the_whole_file(#[case] if_range: &str) {
        for range in ["bytes=10-", "bytes=1000000-", "bytes=-1"] {
            assert_eq!(
                answer(&[("range", range), ("if-range", if_range)], 1000),
                Answer::Whole,
                "{range} if {if_range}"
            );
        }
    }

    #[test]
    fn two_if_range_fields_never_match() {
        let fields = [
            ("range", "bytes=10-"),
            ("if-range", ETAG),
            ("if-range", ETAG),
        ];
        assert_eq!(answer(&fields, 1000), Answer::Whole);
    }

    #[test]
    fn an_if_range_that_is_not_text_never_matches() {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_static("bytes=10-"));
        h.insert(
            header::IF_RANGE,
            HeaderValue::from_bytes(b"\"\xff\"").expect("obs-text is a valid value"),
        );
        assert_eq!(decide(&h, 1000, ETAG), Answer::Whole);
    }

    #[test]
    fn if_range_without_range_changes_nothing() {
        assert_eq!(answer(&[("if-range", "\"other\"")], 1000), Answer::Whole);
        assert_eq!(answer(&[("if-range", ETAG)], 1000), Answer::Whole);
    }

    #[test]
    fn two_range_fields_get_the_whole_file() {
        let fields = [("range", "bytes=0-1"), ("range", "bytes=5-6")];
        assert_eq!(answer(&fields, 1000), Answer::Whole);
    }

    #[test]
    fn if_none_match_compares_weakly_over_every_field_and_comes_first() {
        for fields in [
            vec![("if-none-match", ETAG.to_owned())],
            vec![("if-none-match", format!("W/{ETAG}"))],
            vec![("if-none-match", format!("\"x\", {ETAG}"))],
            vec![
                ("if-none-match", "\"x\"".to_owned()),
                ("if-none-match", ETAG.to_owned()),
            ],
            vec![("if-none-match", "*".to_owned())],
            vec![
                ("if-none-match", ETAG.to_owned()),
                ("range", "bytes=0-1".to_owned()),
            ],
        ] {
            let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
            assert_eq!(answer(&fields, 1000), Answer::NotModified, "{fields:?}");
        }
        assert_eq!(
            answer(&[("if-none-match", "\"other\"")], 1000),
            Answer::Whole
        );
    }

    #[test]
    fn content_ranges_name_inclusive_bounds() {
        assert_eq!(content_range(0, 1, 10), "bytes 0-0/10");
        assert_eq!(content_range(3, 7, 10), "bytes 3-9/10");
        assert_eq!(unsatisfied_range(10), "bytes */10");
    }
}
