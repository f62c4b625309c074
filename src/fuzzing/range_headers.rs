//! `Range`, `If-Range` and `If-None-Match` against a file's length and `ETag`
//! ([`crate::server::conditional::decide`]): any input decides without a panic, and the
//! answer keeps the rules a resumed download relies on.
//!
//! Input: text lines. The first is the file's size in decimal; each other line is a header
//! field, its first byte naming it (`r` Range, `i` If-Range, `n` If-None-Match; other
//! lines are skipped) and the rest its value. Fields repeat as lines repeat. The file's
//! `ETag` is [`ETAG`].

use http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::server::conditional::{content_range, decide, Answer};

/// The `ETag` of the file every input asks about (that of `fixtures/prebuilt/hello`).
pub const ETAG: &str = "\"8169d3c32f774fa5791a490dfde2302ff597b0204e4dd4d7cd5b616b1076b814\"";

pub fn check(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let Some(size) = lines
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
        .and_then(|l| l.trim().parse::<u64>().ok())
    else {
        return;
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let name = match line.first() {
            Some(b'r') => header::RANGE,
            Some(b'i') => header::IF_RANGE,
            Some(b'n') => header::IF_NONE_MATCH,
            _ => continue,
        };
        // Bytes no header can hold (a CR, say) never reach the server as a value.
        if let Ok(value) = HeaderValue::from_bytes(&line[1..]) {
            headers.append(name, value);
        }
    }
    let answer = decide(&headers, size, ETAG);
    let values =
        |name: &HeaderName| -> Vec<&HeaderValue> { headers.get_all(name).iter().collect() };
    let (ranges, if_ranges, none_matches) = (
        values(&header::RANGE),
        values(&header::IF_RANGE),
        values(&header::IF_NONE_MATCH),
    );
    // Strong comparison: one field, exactly the tag (spaces around it aside).
    let if_range_ok = match if_ranges.as_slice() {
        [] => true,
        [v] => v.to_str().is_ok_and(|v| v.trim() == ETAG),
        _ => false,
    };
    match answer {
        Answer::NotModified => assert!(
            none_matches.iter().any(|v| v
                .to_str()
                .is_ok_and(|v| v.trim() == "*" || v.contains(ETAG))),
            "304 without an If-None-Match naming the ETag: {headers:?}"
        ),
        Answer::Part { start, len } => {
            assert!(len > 0, "an empty 206: {headers:?}");
            let end = start.checked_add(len);
            assert!(
                end.is_some_and(|end| end <= size),
                "206 for {start}+{len} of a {size}-byte file: {headers:?}"
            );
            assert_eq!(ranges.len(), 1, "206 without one Range: {headers:?}");
            assert!(if_range_ok, "206 despite If-Range: {headers:?}");
            let range = ranges[0].to_str().unwrap_or_default();
            assert!(range.contains("bytes="), "206 for {range:?}");
            let cr = content_range(start, len, size);
            assert_eq!(
                cr,
                format!("bytes {start}-{}/{size}", start + len - 1),
                "Content-Range"
            );
        }
        Answer::Unsatisfiable => {
            assert_eq!(ranges.len(), 1, "416 without one Range: {headers:?}");
            assert!(if_range_ok, "416 despite If-Range: {headers:?}");
        }
        Answer::Whole => {}
    }
    // Whatever the ranges say, a non-matching If-Range gets the whole file (or a 304).
    if !if_range_ok {
        assert!(
            matches!(answer, Answer::Whole | Answer::NotModified),
            "{answer:?} despite If-Range: {headers:?}"
        );
    }
    // And a matching If-Range changes nothing: the answer is the one without it.
    if !if_ranges.is_empty() && if_range_ok {
        let mut without = headers.clone();
        without.remove(header::IF_RANGE);
        assert_eq!(decide(&without, size, ETAG), answer, "{headers:?}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_committed_seed_keeps_the_properties() {
        for (name, bytes) in super::super::seeds("range_headers") {
            println!("{name}");
            super::check(&bytes);
        }
    }
}
