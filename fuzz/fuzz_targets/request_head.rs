//! Arbitrary bytes as the start of an HTTP/1 connection, through binplz's head parser and
//! request-target escaper; the properties are in `binplz::fuzzing::request_head`.
//!
//! ```sh
//! cargo +nightly fuzz run request_head corpus/request_head seeds/request_head
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| binplz::fuzzing::request_head::check(data));
