//! `Range`, `If-Range` and `If-None-Match` against a file's length and `ETag`; the
//! properties are in `binplz::fuzzing::range_headers`.
//!
//! ```sh
//! cargo +nightly fuzz run range_headers corpus/range_headers seeds/range_headers
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| binplz::fuzzing::range_headers::check(data));
