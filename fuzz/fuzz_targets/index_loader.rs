//! Arbitrary bytes as an index file: refused or loaded, and lookups on a loaded one never
//! panic (see `binplz::fuzzing::index_loader`).
//!
//! ```sh
//! cargo +nightly fuzz run index_loader corpus/index_loader seeds/index_loader
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| binplz::fuzzing::index_loader::check(data));
