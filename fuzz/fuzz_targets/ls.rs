//! Arbitrary bytes as a served `.ls` listing (plain or compressed JSON), through decoding,
//! parsing and the NarSize check; the properties are in `binplz::fuzzing::ls`, so
//! `cargo test` checks them on the seeds too.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| binplz::fuzzing::ls::check(data));
