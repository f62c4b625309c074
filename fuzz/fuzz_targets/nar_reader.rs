//! Arbitrary bytes through the NAR reader and the listing builder; the properties are in
//! `binplz::fuzzing::nar_reader`, so `cargo test` checks them on the seeds too.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| binplz::fuzzing::nar_reader::check(data));
