//! Arbitrary bytes as a narinfo, through binplz's trust check and the parser under it; the
//! properties are in `binplz::fuzzing::narinfo`, so `cargo test` checks them on the seeds too.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| binplz::fuzzing::narinfo::check(data));
