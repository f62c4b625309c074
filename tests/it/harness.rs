//! The test support itself: it agrees with the fixtures it describes, and the fake
//! upstream answers as its fault modes say (checked with a raw HTTP/1.1 client, so these
//! tests do not depend on binplz's own client).

use std::io::{Read, Write};
use std::net::TcpStream;

use binplz::narinfo::{self, Trust};

use crate::support::{
    self, drv_paths, fixture_narinfo, narinfo_field, narinfo_path, paths, FakeUpstream, Fault, Key,
};

#[test]
fn store_path_constants_match_the_manifest() {
    let manifest = std::fs::read_to_string(support::fixtures().join("manifest.json"))
        .expect("reading fixtures/manifest.json");
    for path in [
        paths::HELLO,
        paths::GOODBYE,
        paths::LINKS,
        paths::BINLINK,
        paths::MULTI_BIN,
        paths::MULTI_OUT,
        paths::NONEXEC,
        paths::SCRIPTS,
        paths::DYNAMIC,
        paths::BUSYBOX,
        paths::NOTBUILT,
        paths::FAKE_INTERPRETER,
        drv_paths::HELLO,
        drv_paths::NOTBUILT,
    ] {
        assert!(
            manifest.contains(&format!("\"{path}\"")),
            "{path} is not in manifest.json"
        );
    }
}

#[test]
fn test_key_is_the_fixtures_public_key() {
    let public = std::fs::read_to_string(support::fixtures().join("keys/binplz-test-1.public"))
        .expect("reading the public key");
    assert_eq!(Key::test().public(), public.trim());
    assert_eq!(Key::test().name(), "binplz-test-1");
    assert_ne!(Key::unknown().public(), Key::test().public());
}

#[test]
fn resigning_a_fixture_narinfo_reproduces_nix_signature() {
    // ed25519 signatures are deterministic: the same fingerprint and key give Nix's bytes.
    for cache in support::CODEC_CACHES {
        let original = fixture_narinfo(cache, paths::HELLO);
        let resigned = Key::test().sign(&original);
        assert_eq!(
            narinfo_field(&resigned, "Sig"),
            narinfo_field(&original, "Sig"),
            "{cache}"
        );
    }
    let links = fixture_narinfo("cache", paths::LINKS);
    assert_eq!(Key::test().sign(&links), links);
}

#[test]
fn published_store_path_is_signed_with_the_test_key() {
    let up = FakeUpstream::empty();
    let published = support::publish_tree(
        &up,
        "published-1.0",
        &binplz::nar::writer::Entry::file(b"x".to_vec()),
    );
    let trust = Trust::new(&[Key::test().public()], true).expect("the test key parses");
    let info = narinfo::verify(
        published.narinfo.as_bytes(),
        &support::store_path(&published.store_path),
        &trust,
    )
    .expect("the published narinfo verifies");
    assert_eq!(info.url(), published.nar_path);
    assert!(up.contents(&published.nar_path).is_some());
}

/// One raw request: the status, the headers (lower-cased names) and the body.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn raw_request(up: &FakeUpstream, method: &str, path: &str) -> Raw {
    let addr = up.url().trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&addr).expect("connecting to the fake upstream");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("sending the request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("reading the response");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Raw {
        status,
        headers,
        body: response[split + 4..].to_vec(),
    }
}

#[test]
fn fake_upstream_serves_the_directory_and_counts_hits_per_path() {
    let up = FakeUpstream::serve(support::cache_dir("cache"));
    let r = raw_request(&up, "GET", "/nix-cache-info");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"StoreDir: /nix/store\n");
    let info = narinfo_path(paths::HELLO);
    let r = raw_request(&up, "GET", &format!("/{info}?ignored=1"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/x-nix-narinfo"));
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        fixture_narinfo("cache", paths::HELLO)
    );
    assert_eq!(raw_request(&up, "GET", "/nar/nope.nar").status, 404);
    assert_eq!(raw_request(&up, "GET", "/../Cargo.toml").status, 404);
    assert_eq!(up.hits("nix-cache-info"), 1);
    assert_eq!(up.hits(&info), 1);
    assert_eq!(up.hits("/nar/nope.nar"), 1);
    assert_eq!(up.total_hits(), 4);
}

#[test]
fn fake_upstream_puts_and_overrides_and_clears_faults() {
    let up = FakeUpstream::serve(support::cache_dir("cache"));
    up.put("extra/file", b"in memory".to_vec());
    assert_eq!(raw_request(&up, "GET", "/extra/file").body, b"in memory");
    up.set_fault(
        "nix-cache-info",
        Fault::override_with("StoreDir: /gnu/store\n"),
    );
    assert_eq!(
        raw_request(&up, "GET", "/nix-cache-info").body,
        b"StoreDir: /gnu/store\n"
    );
    up.set_fault("nix-cache-info", Fault::NotFound);
    assert_eq!(raw_request(&up, "GET", "/nix-cache-info").status, 404);
    up.clear_fault("nix-cache-info");
    assert_eq!(raw_request(&up, "GET", "/nix-cache-info").status, 200);
    assert_eq!(up.hits("nix-cache-info"), 3);
}

#[test]
fn fake_upstream_status_fault_can_end_after_some_requests() {
    let up = FakeUpstream::serve(support::cache_dir("cache"));
    up.set_fault(
        "nix-cache-info",
        Fault::status_first(503, 2).with_retry_after(0),
    );
    let r = raw_request(&up, "GET", "/nix-cache-info");
    assert_eq!((r.status, r.header("retry-after")), (503, Some("0")));
    assert_eq!(raw_request(&up, "GET", "/nix-cache-info").status, 503);
    assert_eq!(raw_request(&up, "GET", "/nix-cache-info").status, 200);
    up.set_fault_after("nix-cache-info", 1, Fault::status(500));
    assert_eq!(raw_request(&up, "GET", "/nix-cache-info").status, 200);
    assert_eq!(raw_request(&up, "GET", "/nix-cache-info").status, 500);
    assert_eq!(raw_request(&up, "GET", "/nix-cache-info").status, 500);
}

#[test]
fn fake_upstream_truncates_and_flips_bytes_with_a_matching_length() {
    let up = FakeUpstream::serve(support::cache_dir("cache"));
    let nar = support::fixture_nar_path("cache", paths::HELLO);
    let full = support::fixture_nar("cache", paths::HELLO);
    up.set_fault(&nar, Fault::Truncate(100));
    let r = raw_request(&up, "GET", &format!("/{nar}"));
    assert_eq!(r.body, full[..100]);
    assert_eq!(r.header("content-length"), Some("100"));
    up.set_fault(&nar, Fault::FlipByte(7));
    let r = raw_request(&up, "GET", &format!("/{nar}"));
    assert_eq!(r.body.len(), full.len());
    let differ: Vec<usize> = (0..full.len()).filter(|&i| r.body[i] != full[i]).collect();
    assert_eq!(differ, [7]);
    let r = raw_request(&up, "HEAD", &format!("/{nar}"));
    assert_eq!(
        r.header("content-length"),
        Some(full.len().to_string().as_str())
    );
    assert!(r.body.is_empty());
}

#[test]
fn fake_upstream_reset_sends_the_head_and_part_of_the_body_then_closes() {
    let up = FakeUpstream::serve(support::cache_dir("cache"));
    let nar = support::fixture_nar_path("cache", paths::HELLO);
    let full = support::fixture_nar("cache", paths::HELLO);
    up.set_fault(&nar, Fault::ResetAfter(300));
    let r = raw_request(&up, "GET", &format!("/{nar}"));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(full.len().to_string().as_str())
    );
    assert_eq!(r.body, full[..300]);
}

#[test]
fn fake_upstream_drip_sends_the_whole_file_in_small_pieces() {
    let up = FakeUpstream::serve(support::cache_dir("cache"));
    let nar = support::fixture_nar_path("cache", paths::HELLO);
    let full = support::fixture_nar("cache", paths::HELLO);
    up.set_fault(
        &nar,
        Fault::Drip {
            bytes: 256,
            every: std::time::Duration::from_millis(1),
        },
    );
    let r = raw_request(&up, "GET", &format!("/{nar}"));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(full.len().to_string().as_str())
    );
    assert_eq!(r.body, full);
}
