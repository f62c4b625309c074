//! Arbitrary bytes through the NAR reader and the listing builder: any outcome but a panic,
//! a hang or an out-of-memory abort is fine.
//!
//! ```sh
//! cargo +nightly fuzz run nar_reader
//! ```

#![no_main]

use binplz::nar::listing::ListingBuilder;
use binplz::nar::{read_nar, NarError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Unbounded, as for a NAR whose size is unknown: every length prefix must still be
    // judged before anything is allocated for it.
    let mut listing = ListingBuilder::new();
    let unbounded = read_nar(data, None, &mut listing);
    check(data, &unbounded);
    if let Ok(len) = unbounded {
        assert!(listing.finish().is_some(), "a valid NAR has a root");
        // A bound of exactly the length accepts it; one byte less refuses it.
        assert_eq!(read_nar(data, Some(len), &mut ()).ok(), Some(len));
        if let Some(short) = len.checked_sub(1) {
            assert!(matches!(
                read_nar(data, Some(short), &mut ()),
                Err(NarError::TooLarge { .. })
            ));
        }
    }
    // Bounded by the input's own length, as the pipeline reads with the narinfo's NarSize.
    let bounded = read_nar(data, Some(data.len() as u64), &mut ());
    check(data, &bounded);
});

fn check(data: &[u8], result: &Result<u64, NarError>) {
    match result {
        Ok(len) => assert_eq!(*len, data.len() as u64, "a valid NAR is the whole input"),
        // Reading from a byte slice cannot fail: every error is the bytes' fault.
        Err(e) => assert!(e.is_malformed(), "{e:?}"),
    }
}
