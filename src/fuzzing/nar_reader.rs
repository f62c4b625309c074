//! Arbitrary bytes through the NAR reader and the listing builder.
//!
//! Properties: reading a byte slice fails only for the bytes' fault; a valid NAR is the whole
//! input, and a bound of exactly its length accepts it while one byte less refuses it; its
//! listing has a root, passes the same check a cache's `.ls` passes against the signed
//! NarSize, and survives a round trip through the `.ls` JSON form.

use crate::nar::listing::ListingBuilder;
use crate::nar::{ls, read_nar, NarError};

pub fn check(data: &[u8]) {
    // Unbounded, as for a NAR whose size is unknown: every length prefix must still be
    // judged before anything is allocated for it.
    let mut builder = ListingBuilder::new();
    let unbounded = read_nar(data, None, &mut builder);
    check_result(data, &unbounded);
    if let Ok(len) = unbounded {
        let listing = builder.finish().expect("a valid NAR has a root");
        // A bound of exactly the length accepts it; one byte less refuses it.
        assert_eq!(read_nar(data, Some(len), &mut ()).ok(), Some(len));
        if let Some(short) = len.checked_sub(1) {
            assert!(matches!(
                read_nar(data, Some(short), &mut ()),
                Err(NarError::TooLarge { .. })
            ));
        }
        // The listing of a valid NAR is one a cache could serve for it.
        assert_eq!(ls::check_against(&listing, len), Ok(()));
        if let Some(json) = super::ls::to_json(&listing) {
            assert_eq!(
                ls::parse_served(&json, len),
                Ok(listing),
                "{}",
                String::from_utf8_lossy(&json)
            );
        }
    }
    // Bounded by the input's own length, as the pipeline reads with the narinfo's NarSize.
    let bounded = read_nar(data, Some(data.len() as u64), &mut ());
    check_result(data, &bounded);
}

fn check_result(data: &[u8], result: &Result<u64, NarError>) {
    match result {
        Ok(len) => assert_eq!(*len, data.len() as u64, "a valid NAR is the whole input"),
        // Reading from a byte slice cannot fail: every error is the bytes' fault.
        Err(e) => assert!(e.is_malformed(), "{e:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_keeps_the_properties() {
        let mut valid = 0;
        for (name, bytes) in super::super::seeds("nar_reader") {
            println!("{name}");
            check(&bytes);
            valid += usize::from(read_nar(bytes.as_slice(), None, &mut ()).is_ok());
        }
        assert!(
            valid >= 5,
            "the seeds are mostly real NARs; only {valid} are valid"
        );
    }
}
