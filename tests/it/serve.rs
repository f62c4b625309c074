//! `binplz serve` in-process against a fake binary cache: every route, the headers of a
//! served file, single-flight under a herd, the disk cache across restarts, every error
//! status with its `sh` body, index reloads, the per-client limit, graceful shutdown, and
//! the real binary serving its built-in demo.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use binplz::server::{Config, IndexSource};
use binplz::upstream::{ClientConfig, Deadlines};
use rstest::rstest;
use tempfile::TempDir;

use crate::support::server::{
    client_config, fixture_index, http_upstream, Gate, Gated, Pending, Reply, Server, Setup,
};
use crate::support::{
    self, dir_entries, fixture_nar_path, narinfo_path, paths, prebuilt, FakeUpstream, Fault,
};

const SHELL_SCRIPT: &str = "text/x-shellscript; charset=utf-8";

/// The programs that also provide `hello`, as `X-Binplz-Candidates` lists them: best first
/// (`hello-too` names it as its `mainProgram`), then by attribute length.
const HELLO_CANDIDATES: &str = "hello-too, links, nonexec, tree-dup";

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

fn cache() -> FakeUpstream {
    FakeUpstream::serve(support::cache_dir("cache"))
}

fn hex_sha256(bytes: &[u8]) -> String {
    binplz::hash::hex(&support::sha256(bytes))
}

/// A server on the fixture index and the disk cache in `cache_dir`, with the default
/// settings.
async fn start_default(up: &FakeUpstream, cache_dir: &Path) -> Server {
    Server::start(Setup::fixture(up, cache_dir).await).await
}

#[track_caller]
fn assert_serves(r: &Reply, program: &str) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == prebuilt(program), "the body is not {program}");
}

/// An error response: `status`, and a body that is a `sh` script printing `binplz: …`
/// with `reason` in it to stderr, exiting non-zero, and doing nothing else.
#[track_caller]
fn assert_error_script(r: &Reply, status: u16, reason: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some(SHELL_SCRIPT));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let dir = tempdir();
    let script = dir.path().join("program");
    std::fs::write(&script, &r.body).expect("writing the script");
    let out = Command::new("sh")
        .arg(&script)
        .current_dir(dir.path())
        .output()
        .expect("running sh");
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "the script exited with {}",
        out.status
    );
    assert!(out.stdout.is_empty(), "the script printed to stdout");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("binplz: "), "{err}");
    assert!(err.contains(reason), "{reason:?} is not in {err:?}");
    assert_eq!(
        dir_entries(dir.path()),
        ["program"],
        "the script made files"
    );
}

/// `name value` lines of the Prometheus exposition (comments left out).
fn metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

async fn metric(server: &Server, name: &str) -> f64 {
    let r = server.get("/-/metrics").await;
    assert_eq!(r.status, 200);
    metrics(&r.text()).get(name).copied().unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn home_page_is_text_for_curl_and_html_for_browsers() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server.get("/").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let text = r.text();
    assert!(text.contains("/PROGRAM.sha256"), "{text}");
    assert!(text.contains("Nixpkgs revision fixture"), "{text}");
    assert!(!text.contains('<'), "{text}");

    let r = server
        .request(
            "GET",
            "/",
            &[("Accept", "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let html = r.text();
    assert!(html.starts_with("<!doctype html>"), "{html}");
    assert!(html.contains("action=\"/-/search\""), "{html}");
    assert_eq!(up.total_hits(), 0);
}

#[tokio::test]
async fn program_is_served_verified_with_its_provenance_headers() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let hello = prebuilt("hello");
    let sha = hex_sha256(&hello);
    let r = server.get("/hello").await;
    assert_serves(&r, "hello");
    let expected = [
        ("content-length", hello.len().to_string()),
        ("content-type", "application/octet-stream".to_owned()),
        (
            "content-disposition",
            "attachment; filename=\"hello\"".into(),
        ),
        ("etag", format!("\"{sha}\"")),
        ("accept-ranges", "bytes".into()),
        ("cache-control", "public, max-age=300".into()),
        ("x-nix-store-path", paths::HELLO.into()),
        ("x-nix-attr", "hello".into()),
        ("x-nixpkgs-revision", "fixture".into()),
        ("x-binplz-sha256", sha.clone()),
        ("x-binplz-linkage", "static".into()),
        ("x-binplz-candidates", HELLO_CANDIDATES.into()),
        ("x-binplz-cache", "upstream".into()),
    ];
    for (name, value) in &expected {
        assert_eq!(r.header(name), Some(value.as_str()), "{name}");
    }
    let again = server.get("/hello").await;
    assert_serves(&again, "hello");
    assert_eq!(again.header("x-binplz-cache"), Some("memory"));
    assert_eq!(again.header("etag"), r.header("etag"));
}

#[tokio::test]
async fn program_provided_by_one_attribute_has_no_candidates_header() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server.get("/goodbye").await;
    assert_serves(&r, "goodbye");
    assert_eq!(r.header("x-nix-attr"), Some("goodbye"));
    assert_eq!(r.header("x-binplz-candidates"), None);
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"goodbye\"")
    );
}

#[rstest]
#[case::static_elf("/hello", "static")]
#[case::portable_script("/portable-script", "script")]
#[case::dynamic_with_a_system_interpreter("/dyn", "dynamic")]
#[tokio::test]
async fn linkage_header_tells_static_script_and_dynamic_apart(
    #[case] target: &str,
    #[case] linkage: &str,
) {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server.get(target).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-binplz-linkage"), Some(linkage));
    assert_eq!(
        r.header("x-binplz-sha256"),
        Some(hex_sha256(&r.body).as_str())
    );
}

#[rstest]
#[case::attribute_named_like_the_program("/tree-dup/hello", "tree-dup", "hello")]
#[case::attribute_with_other_content("/hello-too/hello", "hello-too", "goodbye")]
#[case::relative_symlink("/links/hello-rel", "links", "hello")]
#[case::multi_output_package("/multi/multi-tool", "multi", "multi-tool")]
#[tokio::test]
async fn attribute_route_serves_that_attribute(
    #[case] target: &str,
    #[case] attr: &str,
    #[case] contents: &str,
) {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server.get(target).await;
    assert_serves(&r, contents);
    assert_eq!(r.header("x-nix-attr"), Some(attr));
}

#[tokio::test]
async fn program_not_in_the_named_attribute_is_404() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server.get("/goodbye/hello").await;
    assert_error_script(&r, 404, "unknown program hello in goodbye");
    assert_eq!(up.total_hits(), 0);
}

#[rstest]
#[case::nix_double("/x86_64-linux/hello")]
#[case::uname("/x86_64/hello")]
#[case::debian("/amd64/hello")]
#[case::with_attribute("/x86_64-linux/tree-dup/hello")]
#[case::uname_with_attribute("/amd64/links/hello-rel")]
#[tokio::test]
async fn system_route_accepts_every_spelling_of_the_system(#[case] target: &str) {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    assert_serves(&server.get(target).await, "hello");
}

#[tokio::test]
async fn system_missing_from_the_index_is_404() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    for target in [
        "/aarch64/hello",
        "/arm64/hello",
        "/aarch64-linux/hello/hello",
    ] {
        let r = server.get(target).await;
        assert_error_script(&r, 404, "unknown program hello");
        assert!(r.text().contains("aarch64-linux"), "{target}: {}", r.text());
    }
    assert_error_script(
        &server.get("/sparc64/hello/hello").await,
        400,
        "unknown system",
    );
    assert_eq!(up.total_hits(), 0);
}

#[tokio::test]
async fn sha256_route_prints_the_digest_as_sha256sum_does() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server.get("/hello.sha256").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let sha = hex_sha256(&prebuilt("hello"));
    assert_eq!(r.text(), format!("{sha}  hello\n"));
    assert_eq!(r.header("x-binplz-sha256"), Some(sha.as_str()));
    // `sha256sum -c` accepts the line for the downloaded file.
    let files = tempdir();
    std::fs::write(files.path().join("hello"), prebuilt("hello")).expect("writing hello");
    std::fs::write(files.path().join("hello.sha256"), &r.body).expect("writing the sum");
    let check = Command::new("sha256sum")
        .args(["-c", "hello.sha256"])
        .current_dir(files.path())
        .output()
        .expect("running sha256sum");
    assert!(check.status.success(), "{check:?}");
    assert_error_script(
        &server.get("/helo.sha256").await,
        404,
        "unknown program helo",
    );
}

/// Two loaded indexes: `old` without `goodbye`, and the newer `new`.
async fn two_revisions() -> Vec<IndexSource> {
    let fixture = fixture_index().await;
    vec![
        fixture
            .clone()
            .revision("old", 1_000)
            .without("goodbye")
            .source(),
        fixture.revision("new", 2_000).source(),
    ]
}

#[tokio::test]
async fn rev_query_selects_an_older_loaded_index_and_is_cached_for_good() {
    let up = cache();
    let dir = tempdir();
    let server = Server::start(Setup::new(&up, two_revisions().await, dir.path())).await;

    let r = server.get("/hello").await;
    assert_serves(&r, "hello");
    assert_eq!(r.header("x-nixpkgs-revision"), Some("new"));
    assert_eq!(r.header("cache-control"), Some("public, max-age=300"));

    let r = server.get("/hello?rev=old").await;
    assert_serves(&r, "hello");
    assert_eq!(r.header("x-nixpkgs-revision"), Some("old"));
    assert_eq!(
        r.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );

    assert_serves(&server.get("/goodbye").await, "goodbye");
    assert_error_script(
        &server.get("/goodbye?rev=old").await,
        404,
        "unknown program goodbye",
    );
    assert_error_script(
        &server.get("/hello?rev=nope").await,
        404,
        "unknown revision nope",
    );
    assert_error_script(
        &server.get("/hello?rev=../x").await,
        400,
        "invalid revision",
    );
    let r = server.get("/hello.sha256?rev=old").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-nixpkgs-revision"), Some("old"));
}

#[tokio::test]
async fn health_is_always_ok_and_readiness_follows_the_upstream() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server.get("/-/healthz").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    let r = server.get("/-/readyz").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ready\n"));

    let nar = fixture_nar_path("cache", paths::HELLO);
    up.set_fault(&nar, Fault::status(500));
    assert_eq!(server.get("/hello").await.status, 502);
    let r = server.get("/-/readyz").await;
    assert_error_script(&r, 503, "binplz: not ready: the upstream failed");
    assert_eq!(server.get("/-/healthz").await.status, 200);

    up.clear_fault(&nar);
    assert_serves(&server.get("/hello").await, "hello");
    assert_eq!(server.get("/-/readyz").await.status, 200);
}

#[tokio::test]
async fn readiness_probes_an_upstream_nothing_was_fetched_from() {
    let up = cache();
    let dir = tempdir();
    let setup = Setup::fixture(&up, dir.path()).await.config(Config {
        ready_probe_interval: Duration::ZERO,
        ..Config::default()
    });
    let server = Server::start(setup).await;
    up.set_fault("nix-cache-info", Fault::status(503));
    let r = server.get("/-/readyz").await;
    assert_error_script(&r, 503, "binplz: not ready: the upstream failed");
    let probes = up.hits("nix-cache-info");
    assert!(probes >= 1);

    // A cache without nix-cache-info still answers, as Nix accepts.
    up.set_fault("nix-cache-info", Fault::NotFound);
    let r = server.get("/-/readyz").await;
    assert_eq!((r.status, r.text().as_str()), (200, "ready\n"));
    // A success in the last minute needs no probe.
    let probes = up.hits("nix-cache-info");
    assert_eq!(server.get("/-/readyz").await.status, 200);
    assert_eq!(up.hits("nix-cache-info"), probes);

    // A fetch that failed is not overruled by a probe that would succeed.
    let nar = fixture_nar_path("cache", paths::HELLO);
    up.set_fault(&nar, Fault::status(500));
    assert_eq!(server.get("/hello").await.status, 502);
    let probes = up.hits("nix-cache-info");
    assert_eq!(server.get("/-/readyz").await.status, 503);
    assert_eq!(up.hits("nix-cache-info"), probes);
}

#[tokio::test]
async fn without_an_index_the_node_is_a_substituter_ready_when_the_upstream_answers() {
    let up = cache();
    let dir = tempdir();
    let server = Server::start(Setup::new(&up, Vec::new(), dir.path())).await;
    assert_eq!(server.get("/-/healthz").await.status, 200);
    let r = server.get("/-/readyz").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // No index will ever load: a program request is a 404, not a 503 to retry for ever.
    let r = server.get("/hello").await;
    assert_error_script(&r, 404, "this node serves no programs");
    assert!(r.header("retry-after").is_none());
}

#[tokio::test]
async fn metrics_count_requests_cache_tiers_upstream_fetches_and_bytes() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server.get("/-/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let before = metrics(&r.text());
    assert_eq!(before.get("binplz_bytes_served_total"), Some(&0.0));
    assert_eq!(
        before.get("binplz_upstream_fetches_total{result=\"ok\"}"),
        Some(&0.0)
    );

    assert_serves(&server.get("/hello").await, "hello");
    assert_serves(&server.get("/hello").await, "hello");
    assert_eq!(server.get("/helo").await.status, 404);
    let head = server.request("HEAD", "/hello", &[]).await;
    assert_eq!(head.status, 200);
    // The disk copy is made after the first response.
    server.app.settled().await;

    let after = metrics(&server.get("/-/metrics").await.text());
    let get = |name: &str| after.get(name).copied().unwrap_or(0.0);
    assert_eq!(
        get("binplz_requests_total{route=\"program\",status=\"200\"}"),
        3.0
    );
    assert_eq!(
        get("binplz_requests_total{route=\"program\",status=\"404\"}"),
        1.0
    );
    assert_eq!(
        get("binplz_requests_total{route=\"metrics\",status=\"200\"}"),
        1.0
    );
    assert_eq!(get("binplz_cache_hits_total{tier=\"upstream\"}"), 1.0);
    assert_eq!(get("binplz_cache_hits_total{tier=\"memory\"}"), 2.0);
    assert_eq!(get("binplz_upstream_fetches_total{result=\"ok\"}"), 1.0);
    assert_eq!(get("binplz_upstream_fetches_total{result=\"error\"}"), 0.0);
    assert_eq!(get("binplz_extraction_seconds_count"), 1.0);
    // Two bodies sent; the HEAD sent none.
    let hello_len = prebuilt("hello").len() as f64;
    assert_eq!(get("binplz_bytes_served_total"), 2.0 * hello_len);
    assert!(get("binplz_disk_cache_entries") >= 1.0);
    assert!(get("binplz_disk_cache_bytes") >= hello_len);
    // The metrics request itself is the one in progress.
    assert_eq!(get("binplz_requests_in_progress"), 1.0);
}

#[tokio::test]
async fn search_answers_in_text_and_in_json() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server.get("/-/search?q=hello").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    let text = r.text();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"hello\thello"),
        "exact match first: {text}"
    );
    for line in ["hello-rel\tlinks", "hello-up\tlinks", "hello-abs\tlinks"] {
        assert!(lines.contains(&line), "{line:?} missing from {text}");
    }
    assert!(!text.contains("goodbye"), "{text}");

    let r = server
        .request(
            "GET",
            "/-/search?q=HELLO",
            &[("Accept", "application/json")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("search JSON parses");
    let results = v.as_array().expect("a JSON array");
    assert_eq!(
        results.first(),
        Some(&serde_json::json!({
            "program": "hello", "attr": "hello", "store_path": paths::HELLO
        }))
    );
    assert_eq!(results.len(), lines.len());

    let r = server.get("/-/search?q=zzz-nothing").await;
    assert_eq!(r.text(), "no matching programs\n");
    let r = server
        .request("GET", "/-/search?q=zzz", &[("Accept", "application/json")])
        .await;
    assert_eq!(r.text(), "[]\n");
    assert_eq!(server.get("/-/search?q=%zz").await.status, 400);
    assert_error_script(&server.get("/-/nope").await, 404, "binplz: no such page");
    assert_eq!(up.total_hits(), 0);
}

#[rstest]
#[case::post("POST", "/hello")]
#[case::put("PUT", "/hello")]
#[case::delete("DELETE", "/-/healthz")]
#[case::options("OPTIONS", "/")]
#[tokio::test]
async fn methods_other_than_get_and_head_are_not_allowed(
    #[case] method: &str,
    #[case] target: &str,
) {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server
        .request(method, target, &[("Content-Length", "0")])
        .await;
    assert_error_script(&r, 405, "binplz: only GET and HEAD are allowed");
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(up.total_hits(), 0);
}

// ---------------------------------------------------------------------------------------
// Ranges, conditional requests, HEAD
// ---------------------------------------------------------------------------------------

/// Memory cache sizes: large enough that hello is served from memory, or so small that it
/// is streamed from its file in the disk cache.
const IN_MEMORY: u64 = 16 << 20;
const FROM_DISK: u64 = 1024;

#[rstest]
#[case::in_memory(IN_MEMORY)]
#[case::from_a_disk_file(FROM_DISK)]
#[tokio::test]
async fn range_request_gets_its_slice_and_content_range(#[case] memory_bytes: u64) {
    let up = cache();
    let dir = tempdir();
    let mut setup = Setup::fixture(&up, dir.path()).await;
    setup.memory_bytes = memory_bytes;
    let server = Server::start(setup).await;
    let hello = prebuilt("hello");
    let size = hello.len();
    // Cold, then warm: both tiers answer ranges.
    for _ in 0..2 {
        for (range, start, end) in [
            ("bytes=100-199", 100, 199),
            ("bytes=0-0", 0, 0),
            ("bytes=-16", size - 16, size - 1),
            ("bytes=13000-", 13000, size - 1),
            ("bytes=13000-999999", 13000, size - 1),
        ] {
            let r = server.request("GET", "/hello", &[("Range", range)]).await;
            assert_eq!(r.status, 206, "{range}");
            assert_eq!(
                r.header("content-range"),
                Some(format!("bytes {start}-{end}/{size}").as_str()),
                "{range}"
            );
            assert!(r.body == hello[start..=end], "{range}: wrong slice");
        }
    }
    let tier = server.get("/hello").await;
    assert_serves(&tier, "hello");
    let expected_tier = if memory_bytes == IN_MEMORY {
        "memory"
    } else {
        "disk"
    };
    assert_eq!(tier.header("x-binplz-cache"), Some(expected_tier));
}

#[tokio::test]
async fn unsatisfiable_range_is_416_with_the_script_and_a_malformed_one_gets_the_whole_file() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let size = prebuilt("hello").len();
    for range in [format!("bytes={size}-"), "bytes=-0".to_owned()] {
        let r = server.request("GET", "/hello", &[("Range", &range)]).await;
        assert_error_script(&r, 416, "the range is outside the file");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes */{size}").as_str())
        );
    }
    for range in ["bytes=5-2", "items=0-1", "bytes=0-1,5-6"] {
        let r = server.request("GET", "/hello", &[("Range", range)]).await;
        assert_serves(&r, "hello");
    }
}

#[tokio::test]
async fn if_none_match_with_the_etag_is_304_without_a_body() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let etag = format!("\"{}\"", hex_sha256(&prebuilt("hello")));
    for value in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"x\", {etag}"),
        "*".into(),
    ] {
        let r = server
            .request("GET", "/hello", &[("If-None-Match", &value)])
            .await;
        assert_eq!(r.status, 304, "{value}");
        assert!(r.body.is_empty());
        assert_eq!(r.header("etag"), Some(etag.as_str()));
    }
    let r = server
        .request("GET", "/hello", &[("If-None-Match", "\"other\"")])
        .await;
    assert_serves(&r, "hello");
}

/// A resumed download names the copy it has the head of in `If-Range`: only the current
/// file's strong `ETag` gets the range; anything else (an older build's ETag after an index
/// update, a weak one, a date, as no `Last-Modified` is sent) gets the whole file, on
/// binplz's own HTTP/1 path and on hyper's (HTTP/2) alike.
#[tokio::test]
async fn if_range_gives_the_range_only_for_the_current_etag_on_both_connection_paths() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let hello = prebuilt("hello");
    let size = hello.len();
    let etag = format!("\"{}\"", hex_sha256(&hello));
    let older = format!("\"{}\"", hex_sha256(&prebuilt("goodbye")));
    let h2 = H2::connect(&server).await;
    for (if_range, range, partial) in [
        (etag.as_str(), "bytes=1000-", true),
        (older.as_str(), "bytes=1000-", false),
        (older.as_str(), "bytes=1000000-", false),
        (&format!("W/{etag}"), "bytes=1000-", false),
        ("Wed, 21 Oct 2015 07:28:00 GMT", "bytes=1000-", false),
        ("\"x\"", "bytes=-1", false),
    ] {
        let headers = [("Range", range), ("If-Range", if_range)];
        let h1 = server.request("GET", "/hello", &headers).await;
        let h2 = h2.request("/hello", &headers).await;
        for (path, r) in [("h1", &h1), ("h2", &h2)] {
            let what = format!("{path}: {range} if {if_range}");
            if partial {
                assert_eq!(r.status, 206, "{what}");
                assert_eq!(
                    r.header("content-range"),
                    Some(format!("bytes 1000-{}/{size}", size - 1).as_str()),
                    "{what}"
                );
                assert!(r.body == hello[1000..], "{what}: wrong slice");
            } else {
                assert_eq!(r.status, 200, "{what}");
                assert_eq!(r.header("content-range"), None, "{what}");
                assert!(r.body == hello, "{what}: not the whole file");
            }
        }
    }
    assert_eq!(server.get("/hello").await.header("last-modified"), None);
}

#[tokio::test]
async fn head_sends_the_headers_of_get_without_a_body() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let get = server.get("/hello").await;
    let head = server.request("HEAD", "/hello", &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    for name in [
        "content-length",
        "content-type",
        "etag",
        "x-nix-store-path",
        "x-binplz-sha256",
    ] {
        assert_eq!(head.header(name), get.header(name), "{name}");
    }
    let head = server.request("HEAD", "/helo", &[]).await;
    assert_eq!(head.status, 404);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-type"), Some(SHELL_SCRIPT));
}

// ---------------------------------------------------------------------------------------
// Single flight
// ---------------------------------------------------------------------------------------

/// A server whose upstream holds `path` at `gate`, with room for `per_client` requests
/// from the test at once.
async fn gated(
    up: &FakeUpstream,
    dir: &Path,
    path: &str,
    gate: &Gate,
    per_client: usize,
) -> Server {
    let setup = gated_setup(up, dir, path, gate).await.config(Config {
        max_per_client: per_client,
        ..Config::default()
    });
    Server::start(setup).await
}

/// The fixture setup with its upstream behind `gate` for `path`.
async fn gated_setup(up: &FakeUpstream, dir: &Path, path: &str, gate: &Gate) -> Setup {
    Setup::fixture(up, dir).await.upstream(Gated::wrap(
        http_upstream(up, &client_config()),
        path,
        gate,
    ))
}

/// Sends a request for each target: the first, whose download then waits at `gate`, and
/// the others once it does. Returns when the server has taken up all of them.
async fn behind_gate<const N: usize>(
    server: &Server,
    gate: &Gate,
    targets: [&str; N],
) -> [Pending; N] {
    let mut pending = Vec::with_capacity(N);
    for (i, target) in targets.iter().enumerate() {
        pending.push(
            server
                .client
                .send("GET", target, &[])
                .await
                .expect("sending"),
        );
        if i == 0 {
            gate.arrivals(1).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.app.metrics().in_progress() < N as u64 {
        assert!(Instant::now() < deadline, "the requests never all arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pending
        .try_into()
        .unwrap_or_else(|_| unreachable!("one pending reply per target"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn herd_for_a_cold_program_costs_one_narinfo_and_one_nar_fetch() {
    const HERD: usize = 200;
    let up = cache();
    let dir = tempdir();
    let nar = fixture_nar_path("cache", paths::HELLO);
    let gate = Gate::default();
    let server = gated(&up, dir.path(), &nar, &gate, HERD).await;
    // Every request is on the wire before the NAR is let through.
    let mut pending = Vec::with_capacity(HERD);
    for _ in 0..HERD {
        let p = server
            .client
            .send("GET", "/hello", &[])
            .await
            .expect("sending a request");
        pending.push(tokio::spawn(p.reply()));
    }
    gate.arrivals(1).await;
    gate.open();
    let hello = prebuilt("hello");
    for p in pending {
        let r = p.await.expect("the reader task").expect("a reply");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.body == hello, "a body differs");
    }
    assert_eq!(gate.arrived(), 1);
    assert_eq!(up.hits(&narinfo_path(paths::HELLO)), 1);
    assert_eq!(up.hits(&nar), 1);
    assert_eq!(up.hits("nix-cache-info"), 1);
}

#[tokio::test]
async fn programs_of_one_store_path_asked_together_share_one_nar_download() {
    let up = cache();
    let dir = tempdir();
    let nar = fixture_nar_path("cache", paths::LINKS);
    let gate = Gate::default();
    let server = gated(&up, dir.path(), &nar, &gate, 32).await;
    let both = behind_gate(&server, &gate, ["/links/hello-rel", "/links/hello"]).await;
    gate.open();
    for pending in both {
        let r = pending.reply().await.expect("a reply");
        assert_serves(&r, "hello");
        assert_eq!(r.header("x-nix-store-path"), Some(paths::LINKS));
        assert_eq!(r.header("x-nix-attr"), Some("links"));
    }
    assert_eq!(up.hits(&narinfo_path(paths::LINKS)), 1);
    assert_eq!(up.hits(&nar), 1);
}

#[tokio::test]
async fn program_sharing_a_download_with_a_refused_one_is_still_served() {
    let up = cache();
    let dir = tempdir();
    let nar = fixture_nar_path("cache", paths::DYNAMIC);
    let gate = Gate::default();
    let server = gated(&up, dir.path(), &nar, &gate, 32).await;
    // `dyn-store` starts the download of `dynamic`; `dyn` joins it.
    let [refused, served] = behind_gate(&server, &gate, ["/dyn-store", "/dyn"]).await;
    gate.open();
    assert_error_script(
        &refused.reply().await.expect("a reply"),
        422,
        "needs /nix/store",
    );
    let r = served.reply().await.expect("a reply");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == prebuilt("dyn"));
    assert_eq!(r.header("x-binplz-linkage"), Some("dynamic"));
}

// ---------------------------------------------------------------------------------------
// Disk cache across restarts
// ---------------------------------------------------------------------------------------

/// The content files under the disk cache's `files/`.
fn content_files(cache_dir: &Path) -> Vec<PathBuf> {
    let files = cache_dir.join("files");
    let mut out = Vec::new();
    for shard in dir_entries(&files) {
        for name in dir_entries(&files.join(&shard)) {
            out.push(files.join(&shard).join(name));
        }
    }
    out
}

#[tokio::test]
async fn restarted_node_serves_from_disk_without_asking_the_upstream() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    assert_serves(&server.get("/hello").await, "hello");
    server.stop().await;
    let hits = up.total_hits();
    assert!(hits > 0);

    let server = start_default(&up, dir.path()).await;
    let r = server.get("/hello").await;
    assert_serves(&r, "hello");
    assert_eq!(r.header("x-binplz-cache"), Some("disk"));
    assert_eq!(r.header("x-nix-store-path"), Some(paths::HELLO));
    assert_eq!(r.header("x-binplz-linkage"), Some("static"));
    assert_eq!(
        up.total_hits(),
        hits,
        "the restarted node asked the upstream"
    );
}

#[tokio::test]
async fn a_file_larger_than_the_disk_cache_is_served_and_fetched_again_next_time() {
    let up = cache();
    let dir = tempdir();
    let mut setup = Setup::fixture(&up, dir.path()).await;
    setup.disk_bytes = 4096;
    setup.memory_bytes = 0;
    assert!(prebuilt("hello").len() > 4096);
    let server = Server::start(setup).await;
    let nar = fixture_nar_path("cache", paths::HELLO);
    for fetches in 1..=2 {
        let r = server.get("/hello").await;
        assert_serves(&r, "hello");
        assert_eq!(r.header("x-binplz-cache"), Some("upstream"));
        assert_eq!(up.hits(&nar), fetches);
    }
    server.app.settled().await;
    // Too large is not an error.
    let errors = metric(&server, "binplz_disk_cache_keep_errors_total").await;
    assert_eq!(errors, 0.0);
    server.stop().await;
    let hello_sha = hex_sha256(&prebuilt("hello"));
    assert!(
        !content_files(dir.path())
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == hello_sha.as_str())),
        "kept on disk beyond the cache's size"
    );
}

#[tokio::test]
async fn a_file_the_disk_cannot_keep_is_served_and_held_in_memory() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    // Content files can no longer be written: `files` is not a directory any more.
    let files = dir.path().join("files");
    std::fs::remove_dir_all(&files).expect("removing files/");
    std::fs::write(&files, b"").expect("writing a file in its place");
    let r = server.get("/hello").await;
    assert_serves(&r, "hello");
    assert_eq!(r.header("x-binplz-cache"), Some("upstream"));
    let again = server.get("/hello").await;
    assert_serves(&again, "hello");
    assert_eq!(again.header("x-binplz-cache"), Some("memory"));
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::HELLO)), 1);
    server.app.settled().await;
    let errors = metric(&server, "binplz_disk_cache_keep_errors_total").await;
    assert!(errors >= 1.0, "the failure to keep was not counted");
    server.stop().await;
}

#[tokio::test]
async fn corrupted_disk_entry_is_detected_and_fetched_again() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    assert_serves(&server.get("/hello").await, "hello");
    server.stop().await;
    let nar = fixture_nar_path("cache", paths::HELLO);
    assert_eq!(up.hits(&nar), 1);

    let hello_sha = hex_sha256(&prebuilt("hello"));
    let content = content_files(dir.path())
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == hello_sha.as_str()))
        .expect("hello's content file is in the disk cache");
    let mut bytes = std::fs::read(&content).expect("reading the content file");
    bytes[4096] ^= 0x01;
    std::fs::write(&content, &bytes).expect("corrupting the content file");

    let server = start_default(&up, dir.path()).await;
    let r = server.get("/hello").await;
    assert_serves(&r, "hello");
    assert_eq!(r.header("x-binplz-cache"), Some("upstream"));
    assert_eq!(up.hits(&nar), 2, "the corrupt entry was not fetched again");
    let again = server.get("/hello").await;
    assert_serves(&again, "hello");
    assert_eq!(up.hits(&nar), 2);
}

// ---------------------------------------------------------------------------------------
// Errors: status, sh body, what is remembered
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hostile_names_are_400_and_their_scripts_execute_nothing() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    for target in [
        "/x;reboot",
        "/x;touch${IFS}pwned",
        "/$(id)",
        "/$(touch${IFS}pwned)",
        "/%60touch%20pwned%60",
        "/%24(touch%20pwned)",
        "/..",
        "/../../etc/passwd",
        "/hello/..",
        "/.hidden",
        "/-rf",
        "/x'pwned",
        "/x%27;touch%20pwned;%27",
        "/a/b/c/d",
        "/x%0atouch%20pwned",
        // Bytes the HTTP parser refuses in a URI, as curl sends them: escaped before it
        // sees them, so they get binplz's own answer too.
        "/`touch${IFS}pwned`",
        "/<pwned>",
        "/pwned\u{7f}",
        "/héllo",
    ] {
        let r = server.get(target).await;
        assert_error_script(&r, 400, "binplz: ");
        assert!(!r.text().contains("pwned"), "{target}: the name is echoed");
    }
    assert_eq!(up.total_hits(), 0, "a hostile name reached the upstream");
}

/// A name is percent-decoded once, as curl and browsers may encode it, then checked as
/// typed; escapes a name cannot hold, and broken ones, are 400 scripts.
#[tokio::test]
async fn percent_encoded_names_are_served_and_bad_escapes_are_400_scripts() {
    let up = cache();
    let dir = tempdir();
    let index = fixture_index().await.with_alias("g++", "hello");
    let server = Server::start(Setup::new(&up, vec![index.source()], dir.path())).await;
    let h2 = H2::connect(&server).await;
    for target in [
        "/%68ello",
        "/g%2B%2B",
        "/g++",
        "/x86%5F64-linux/hell%6F",
        "/hello?rev=fix%74ure",
    ] {
        assert_serves(&server.get(target).await, "hello");
        assert_serves(&h2.request(target, &[]).await, "hello");
    }
    for (target, reason) in [
        ("/hello%2Fx", "an encoded / or NUL in the path"),
        ("/hello-too%2Fhello", "an encoded / or NUL in the path"),
        ("/hello%00", "an encoded / or NUL in the path"),
        ("/%2e%2e/hello", "invalid attribute name"),
        ("/%2568ello", "invalid program name"),
        ("/%zzello", "malformed percent-encoding"),
        ("/hello%", "malformed percent-encoding"),
        ("/%ffhello", "not UTF-8"),
        ("/hello?rev=%zz", "malformed query string"),
        ("/-/search?q=%", "malformed query string"),
    ] {
        assert_error_script(&server.get(target).await, 400, reason);
    }
}

#[tokio::test]
async fn an_escaped_request_keeps_its_connection_for_the_next_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let mut conn = tokio::net::TcpStream::connect(server.client.addr)
        .await
        .expect("connecting");
    conn.write_all(
        b"GET /a`b HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("sending two requests");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)
        .await
        .expect("reading both answers");
    let text = String::from_utf8_lossy(&raw);
    let second = text
        .find("HTTP/1.1 200")
        .expect("the second request was answered");
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text[..second].contains("invalid program name"));
    assert!(
        raw.ends_with(&prebuilt("hello")),
        "the second body is hello"
    );
}

#[tokio::test]
async fn unknown_program_is_404_with_suggestions_and_asks_no_upstream() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server.get("/helo").await;
    assert_error_script(&r, 404, "unknown program helo for x86_64-linux");
    assert_error_script(&r, 404, "did you mean: hello");
    // Remembered for a while: the same answer again.
    let again = server.get("/helo").await;
    assert_eq!(again.body, r.body);
    // Evaluated but not a program, and not in the evaluation at all.
    assert_error_script(&server.get("/readme").await, 404, "unknown program readme");
    assert_error_script(&server.get("/broken").await, 404, "unknown program broken");
    assert_eq!(up.total_hits(), 0);
}

#[rstest]
#[case::script_for_a_store_interpreter("/store-script", &format!("{}/sh", paths::BUSYBOX))]
#[case::dynamic_with_a_store_interpreter("/dyn-store", paths::FAKE_INTERPRETER)]
#[tokio::test]
async fn program_needing_the_nix_store_is_422_naming_what_it_needs(
    #[case] target: &str,
    #[case] needs: &str,
) {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server.get(target).await;
    assert_error_script(&r, 422, "needs /nix/store at run time");
    assert_error_script(&r, 422, needs);
}

#[tokio::test]
async fn a_program_over_max_file_size_is_422_before_any_download_or_after_it_if_the_index_said_less(
) {
    let fixture = fixture_index().await;
    // The same index saying `hello` is 10 bytes (an older build, or a wrong listing).
    let mut understated = fixture.clone();
    for entry in understated
        .programs
        .iter_mut()
        .filter(|p| p.program == "hello")
    {
        for c in &mut entry.candidates {
            c.size = 10;
        }
    }
    let hello_len = prebuilt("hello").len();
    for (index, reason, downloads) in [
        (
            fixture,
            format!("hello is {hello_len} bytes, over this server's limit of 1000"),
            0,
        ),
        (
            understated,
            format!("the file is {hello_len} bytes, over this server's limit"),
            1,
        ),
    ] {
        let up = cache();
        let dir = tempdir();
        let setup = Setup::new(&up, vec![index.source()], dir.path()).config(Config {
            max_file_size: 1000,
            ..Config::default()
        });
        let server = Server::start(setup).await;
        assert_error_script(&server.get("/hello").await, 422, &reason);
        assert_eq!(up.hits(&narinfo_path(paths::HELLO)), downloads);
        server.app.settled().await;
        let kept = metric(&server, "binplz_disk_cache_entries").await;
        assert_eq!(kept, 0.0, "a refused file is not kept");
    }
}

#[tokio::test]
async fn a_full_upstream_queue_is_503_with_retry_after_and_not_remembered() {
    let up = cache();
    let dir = tempdir();
    let nar = fixture_nar_path("cache", paths::HELLO);
    let gate = Gate::default();
    // One fetch at a time, one waiting.
    let setup = gated_setup(&up, dir.path(), &nar, &gate)
        .await
        .config(Config {
            max_upstream_fetches: 1,
            max_queued_fetches: 1,
            ..Config::default()
        });
    let server = Server::start(setup).await;
    let [running, waiting] = behind_gate(&server, &gate, ["/hello", "/goodbye"]).await;
    let r = server.get("/portable-script").await;
    assert_error_script(&r, 503, "too many downloads in progress; try again shortly");
    assert_eq!(r.header("retry-after"), Some("60"));
    gate.open();
    assert_serves(&running.reply().await.expect("a reply"), "hello");
    assert_serves(&waiting.reply().await.expect("a reply"), "goodbye");
    let r = server.get("/portable-script").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn a_request_waiting_too_long_for_an_upstream_slot_is_503_and_not_remembered() {
    let up = cache();
    let dir = tempdir();
    let nar = fixture_nar_path("cache", paths::HELLO);
    let gate = Gate::default();
    // One fetch at a time, held at the gate; another waits at most 200 ms for its slot.
    let setup = gated_setup(&up, dir.path(), &nar, &gate)
        .await
        .config(Config {
            max_upstream_fetches: 1,
            upstream_queue_timeout: Duration::from_millis(200),
            ..Config::default()
        });
    let server = Server::start(setup).await;
    let running = server
        .client
        .send("GET", "/hello", &[])
        .await
        .expect("sending");
    gate.arrivals(1).await;
    let r = tokio::time::timeout(Duration::from_secs(60), server.get("/goodbye"))
        .await
        .expect("the request waiting for a slot was never answered");
    assert_error_script(&r, 503, "too many downloads in progress; try again shortly");
    assert_eq!(r.header("retry-after"), Some("60"));
    gate.open();
    assert_serves(&running.reply().await.expect("a reply"), "hello");
    assert_serves(&server.get("/goodbye").await, "goodbye");
}

#[tokio::test]
async fn not_built_program_is_503_with_retry_after() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = server.get("/notbuilt").await;
    assert_error_script(&r, 503, "not built yet");
    assert!(r.text().contains(paths::NOTBUILT), "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("60"));
    assert_eq!(
        up.total_hits(),
        0,
        "a path known not to be built was fetched"
    );
}

#[tokio::test]
async fn store_path_missing_upstream_is_503_and_remembered_briefly() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let narinfo = narinfo_path(paths::GOODBYE);
    up.set_fault(&narinfo, Fault::NotFound);
    let r = server.get("/goodbye").await;
    assert_error_script(&r, 503, "not in the binary cache yet");
    assert_eq!(r.header("retry-after"), Some("60"));
    assert_eq!(up.hits(&narinfo), 1);
    up.clear_fault(&narinfo);
    let r = server.get("/goodbye").await;
    assert_error_script(&r, 503, "not in the binary cache yet");
    assert_eq!(up.hits(&narinfo), 1, "the missing path was asked for again");
}

#[tokio::test]
async fn corrupted_nar_is_502_and_the_next_request_tries_again() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let nar = fixture_nar_path("cache", paths::HELLO);
    up.set_fault(&nar, Fault::FlipByte(200));
    let r = server.get("/hello").await;
    assert_error_script(&r, 502, "failed verification");
    assert!(
        !r.text().contains("FileHash") && !r.text().contains(&up.url()),
        "upstream details leaked: {}",
        r.text()
    );
    let failures = metric(&server, "binplz_verification_failures_total").await;
    assert_eq!(failures, 1.0);
    up.clear_fault(&nar);
    assert_serves(&server.get("/hello").await, "hello");
    assert_eq!(up.hits(&nar), 2);
}

#[tokio::test]
async fn upstream_failing_with_500_is_502_and_not_remembered() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let nar = fixture_nar_path("cache", paths::HELLO);
    up.set_fault(&nar, Fault::status(500));
    let r = server.get("/hello").await;
    assert_error_script(&r, 502, "the upstream binary cache failed");
    up.clear_fault(&nar);
    assert_serves(&server.get("/hello").await, "hello");
}

#[tokio::test]
async fn stalled_upstream_is_504_and_not_remembered() {
    let up = cache();
    let dir = tempdir();
    let quick = ClientConfig {
        read_timeout: Duration::from_millis(200),
        retries: 0,
        ..client_config()
    };
    let setup = Setup::fixture(&up, dir.path())
        .await
        .upstream(http_upstream(&up, &quick));
    let server = Server::start(setup).await;
    let nar = fixture_nar_path("cache", paths::HELLO);
    up.set_fault(&nar, Fault::StallAfterHeaders);
    let r = server.get("/hello").await;
    assert_error_script(&r, 504, "timed out");
    up.clear_fault(&nar);
    assert_serves(&server.get("/hello").await, "hello");
}

/// Transport timeouts far longer than any test waits, and deadlines of 300 ms (narinfo;
/// NAR besides its size at 1000 bytes a second, averaged over 200 ms): only the deadlines
/// can end a fetch.
async fn patient_with_short_deadlines(up: &FakeUpstream, dir: &Path, config: Config) -> Server {
    let patient = ClientConfig {
        first_byte_timeout: Duration::from_secs(600),
        read_timeout: Duration::from_secs(600),
        ..client_config()
    };
    let mut setup = Setup::fixture(up, dir)
        .await
        .upstream(http_upstream(up, &patient))
        .config(config);
    setup.deadlines = Deadlines::new(
        Duration::from_millis(300),
        1000,
        Duration::from_millis(200),
        Duration::from_millis(300),
    )
    .expect("valid deadlines");
    Server::start(setup).await
}

#[tokio::test]
async fn narinfo_that_never_comes_is_504_at_its_deadline() {
    let up = cache();
    let dir = tempdir();
    let server = patient_with_short_deadlines(&up, dir.path(), Config::default()).await;
    up.set_fault(&narinfo_path(paths::HELLO), Fault::NoAnswer);
    let r = tokio::time::timeout(Duration::from_secs(60), server.get("/hello"))
        .await
        .expect("the request was never answered");
    assert_error_script(&r, 504, "timed out");
    up.clear_fault(&narinfo_path(paths::HELLO));
    assert_serves(&server.get("/hello").await, "hello");
}

#[tokio::test]
async fn dripping_nars_are_504_and_free_their_slots_for_other_requests() {
    let up = cache();
    let dir = tempdir();
    // Two slots, both taken by NARs that drip 20 bytes a second.
    let server = patient_with_short_deadlines(
        &up,
        dir.path(),
        Config {
            max_upstream_fetches: 2,
            ..Config::default()
        },
    )
    .await;
    let drip = Fault::Drip {
        bytes: 1,
        every: Duration::from_millis(50),
    };
    for path in [paths::HELLO, paths::GOODBYE] {
        up.set_fault(&fixture_nar_path("cache", path), drip.clone());
    }
    let (hello, goodbye) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(server.get("/hello"), server.get("/goodbye"))
    })
    .await
    .expect("the dripping downloads were never ended");
    assert_error_script(&hello, 504, "timed out");
    assert_error_script(&goodbye, 504, "timed out");
    let r = server.get("/portable-script").await;
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------------------
// Index reloads
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn changed_index_file_is_served_after_a_reload() {
    let up = cache();
    let dir = tempdir();
    let index = dir.path().join("programs.idx");
    let fixture = fixture_index().await;
    fixture
        .clone()
        .revision("one", 1_000)
        .without("goodbye")
        .write(&index);
    let setup = Setup::new(
        &up,
        vec![IndexSource::File(index.clone())],
        &dir.path().join("cache"),
    );
    let server = Server::start(setup).await;
    let r = server.get("/hello").await;
    assert_eq!(r.header("x-nixpkgs-revision"), Some("one"));
    assert_eq!(server.get("/goodbye").await.status, 404);

    fixture.revision("two", 2_000).write(&index);
    server.app.reload_indexes(false).await;
    let r = server.get("/hello").await;
    assert_serves(&r, "hello");
    assert_eq!(r.header("x-nixpkgs-revision"), Some("two"));
    // The 404 given before the reload is not remembered past it.
    assert_serves(&server.get("/goodbye").await, "goodbye");
}

#[tokio::test]
async fn index_file_changed_on_disk_is_picked_up_by_the_poll() {
    let up = cache();
    let dir = tempdir();
    let index = dir.path().join("programs.idx");
    let fixture = fixture_index().await;
    fixture.clone().revision("one", 1_000).write(&index);
    let setup = Setup::new(
        &up,
        vec![IndexSource::File(index.clone())],
        &dir.path().join("cache"),
    )
    .config(Config {
        index_poll: Duration::from_millis(20),
        ..Config::default()
    });
    let server = Server::start(setup).await;
    fixture
        .revision("two", 2_000)
        .with_alias("hello-copy", "hello")
        .write(&index);
    // Search is never remembered, so it shows the reload as soon as it happens.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server
        .get("/-/search?q=hello-copy")
        .await
        .text()
        .contains("hello-copy")
    {
        assert!(Instant::now() < deadline, "the new index was never loaded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = server.get("/hello-copy").await;
    assert_serves(&r, "hello");
    assert_eq!(r.header("x-nixpkgs-revision"), Some("two"));
    assert_eq!(
        r.header("content-disposition"),
        Some("attachment; filename=\"hello-copy\"")
    );
}

#[tokio::test]
async fn garbage_index_file_leaves_the_old_index_serving() {
    let up = cache();
    let dir = tempdir();
    let index = dir.path().join("programs.idx");
    fixture_index().await.revision("one", 1_000).write(&index);
    let setup = Setup::new(
        &up,
        vec![IndexSource::File(index.clone())],
        &dir.path().join("cache"),
    );
    let server = Server::start(setup).await;
    for garbage in [&b"not an index at all"[..], b"", &[0u8; 4096][..]] {
        std::fs::write(&index, garbage).expect("overwriting the index");
        server.app.reload_indexes(true).await;
        let r = server.get("/hello").await;
        assert_serves(&r, "hello");
        assert_eq!(r.header("x-nixpkgs-revision"), Some("one"));
        assert_eq!(server.get("/-/readyz").await.status, 200);
    }
    // A good file after the bad ones is loaded.
    fixture_index().await.revision("two", 2_000).write(&index);
    server.app.reload_indexes(false).await;
    assert_eq!(
        server.get("/hello").await.header("x-nixpkgs-revision"),
        Some("two")
    );
}

// ---------------------------------------------------------------------------------------
// Limits and shutdown
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn client_over_its_concurrency_limit_gets_503_with_retry_after_for_programs_and_searches() {
    let up = cache();
    let dir = tempdir();
    let nar = fixture_nar_path("cache", paths::HELLO);
    let gate = Gate::default();
    let server = gated(&up, dir.path(), &nar, &gate, 1).await;
    let held = server
        .client
        .send("GET", "/hello", &[])
        .await
        .expect("sending");
    gate.arrivals(1).await;
    let r = server.get("/goodbye").await;
    assert_error_script(&r, 503, "too many requests from this address");
    assert_eq!(r.header("retry-after"), Some("60"));
    // Searches count as program requests do; other pages are not limited.
    let r = server.get("/-/search?q=hel").await;
    assert_error_script(&r, 503, "too many requests from this address");
    assert_eq!(server.get("/-/healthz").await.status, 200);
    gate.open();
    assert_serves(&held.reply().await.expect("a reply"), "hello");
    // The slot is free again.
    assert_serves(&server.get("/goodbye").await, "goodbye");
    let r = server.get("/-/search?q=hel").await;
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("hello\t"), "{}", r.text());
}

#[tokio::test]
async fn shutdown_finishes_responses_in_progress_and_refuses_new_connections() {
    let up = cache();
    let dir = tempdir();
    let nar = fixture_nar_path("cache", paths::HELLO);
    let gate = Gate::default();
    let mut server = gated(&up, dir.path(), &nar, &gate, 32).await;
    let in_progress = server
        .client
        .send("GET", "/hello", &[])
        .await
        .expect("sending");
    gate.arrivals(1).await;
    server.begin_shutdown().await;
    // Refused, or reset: a process another test forks inherits the listening socket until
    // its exec closes it, and a connection queued there meanwhile is reset then.
    let refused = server.client.try_request("GET", "/-/healthz", &[]).await;
    assert!(
        refused.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
        )),
        "a new connection was not refused: {refused:?}"
    );
    gate.open();
    assert_serves(&in_progress.reply().await.expect("a reply"), "hello");
    server.wait().await;
}

#[tokio::test]
async fn several_serving_threads_share_one_fetch_and_all_drain_on_shutdown() {
    const CLIENTS: usize = 24;
    let up = cache();
    let dir = tempdir();
    let nar = fixture_nar_path("cache", paths::HELLO);
    let gate = Gate::default();
    let mut setup = gated_setup(&up, dir.path(), &nar, &gate).await;
    setup.threads = 3;
    let mut server = Server::start(setup).await;
    // Connections are handed to the threads in turn; all wait on one extraction.
    let mut pending = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let p = server
            .client
            .send("GET", "/hello", &[])
            .await
            .expect("sending");
        pending.push(p);
    }
    gate.arrivals(1).await;
    // Every connection accepted (by whichever thread) and its request waiting on the fetch:
    // only then does shutdown test the drain, not the listeners' backlogs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.app.metrics().in_progress() < CLIENTS as u64 {
        assert!(Instant::now() < deadline, "the requests never all arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.begin_shutdown().await;
    gate.open();
    for p in pending {
        assert_serves(&p.reply().await.expect("a reply"), "hello");
    }
    server.wait().await;
    assert_eq!(
        up.hits(&nar),
        1,
        "one NAR fetch for every thread's requests"
    );
    assert_eq!(server.app.metrics().in_progress(), 0);
    let refused = server.client.try_request("GET", "/-/healthz", &[]).await;
    assert!(
        refused.is_err(),
        "a stopped server still answered: {refused:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------

pub(crate) fn blocking_get(addr: std::net::SocketAddr, target: &str) -> Reply {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(crate::support::server::Client { addr }.get(target))
}

/// Runs a file just written. Another test thread may fork while the file is still open for
/// writing here, and its child keeps the descriptor until it execs: the kernel then refuses
/// to run the file (ETXTBSY) for that moment.
fn run_fresh_executable(program: &Path) -> std::process::Output {
    const ETXTBSY: i32 = 26;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Command::new(program).output() {
            Err(e) if e.raw_os_error() == Some(ETXTBSY) && Instant::now() < deadline => {
                std::thread::yield_now();
            }
            result => return result.expect("running the downloaded program"),
        }
    }
}

#[test]
fn binary_refuses_to_share_a_port_another_server_listens_on() {
    // Two servers on one port would each answer some of the clients, perhaps with
    // different files (a demo next to a real node).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let addr = taken.local_addr().expect("its address").to_string();
    let dir = tempdir();
    let out = crate::support::cli::binplz()
        .args(["serve", "--listen", &addr, "--cache-dir"])
        .arg(dir.path().join("cache"))
        .env("BINPLZ_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .expect("running binplz serve");
    let err = crate::support::cli::assert_failure(&out, binplz::error::ErrorKind::Internal);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}

#[test]
fn binary_serves_its_builtin_demo_and_exits_cleanly_on_sigterm() {
    let dir = tempdir();
    let running = Running::start(
        crate::support::cli::binplz()
            .args(["serve", "--listen", "127.0.0.1:0", "--cache-dir"])
            .arg(dir.path().join("cache")),
        "text",
    );
    let addr = running.addr;
    let health = blocking_get(addr, "/-/healthz");
    assert_eq!(health.status, 200);
    let r = blocking_get(addr, "/hello");
    assert_serves(&r, "hello");
    assert_eq!(r.header("x-nixpkgs-revision"), Some("demo"));
    let program = dir.path().join("hello");
    std::fs::write(&program, &r.body).expect("writing the download");
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod +x");
    let out = run_fresh_executable(&program);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello from binplz!\n");

    running.stop();
}

/// The real binary, serving: its address, and its log lines as they come.
pub(crate) struct Running {
    child: std::process::Child,
    pub(crate) addr: std::net::SocketAddr,
    /// Every line logged so far is kept in `seen` once received.
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    /// Starts `binplz serve` with `args` and the log format `format` (`text` or `json`), and
    /// waits until it listens.
    pub(crate) fn start(cmd: &mut Command, format: &str) -> Running {
        let mut child = cmd
            .args(["--log-format", format])
            .env_remove("BINPLZ_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting binplz serve");
        let lines = crate::support::cli::stderr_lines(&mut child);
        let mut running = Running {
            child,
            addr: ([0, 0, 0, 0], 0).into(),
            lines,
            seen: Vec::new(),
        };
        let line = running
            .wait_for(|l| l.contains("listening"))
            .unwrap_or_else(|| panic!("the server did not listen: {:#?}", running.seen));
        let addr = if format == "json" {
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
            v["addr"].as_str().map(str::to_owned)
        } else {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .map(str::to_owned)
        };
        running.addr = addr
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .parse()
            .expect("a socket address");
        running
    }

    /// The next line logged that `pred` accepts, within 10 s.
    fn wait_for(&mut self, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if pred(&line) {
                return Some(line);
            }
        }
    }

    fn signal(&self, signal: &str) {
        let kill = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(kill.success());
    }

    /// Whether it exits, cleanly, within `limit` (its log ends when it does).
    fn exits_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return false,
            }
        }
        self.child.wait().is_ok_and(|s| s.success())
    }

    /// Stops it with SIGTERM, checks it exits cleanly, and returns every line it logged.
    pub(crate) fn stop(mut self) -> Vec<String> {
        self.signal("-TERM");
        assert!(self.child.wait().expect("waiting for binplz").success());
        // The rest of the log, flushed at exit at the latest.
        let rest: Vec<String> = self.lines.iter().collect();
        self.seen.extend(rest);
        std::mem::take(&mut self.seen)
    }
}

/// A test that fails before [`Running::stop`] leaves no server behind.
impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the real binary on the demo with `format`, makes the given requests, stops it, and
/// returns every line it logged.
fn demo_log(format: &str, targets: &[&str]) -> Vec<String> {
    let dir = tempdir();
    let running = Running::start(
        crate::support::cli::binplz()
            .args(["serve", "--listen", "127.0.0.1:0", "--cache-dir"])
            .arg(dir.path().join("cache")),
        format,
    );
    for target in targets {
        blocking_get(running.addr, target);
    }
    running.stop()
}

#[test]
fn with_log_format_json_every_log_line_is_one_json_object_and_each_request_has_its_fields() {
    let log = demo_log("json", &["/hello", "/hello", "/x%22y", "/nope"]);
    let lines: Vec<serde_json::Value> = log
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access: Vec<_> = lines
        .iter()
        .filter(|v| v["target"] == "binplz::access")
        .collect();
    assert_eq!(access.len(), 4, "{log:#?}");
    let hello_len = prebuilt("hello").len() as u64;
    for (v, (path, status, cache)) in access.iter().zip([
        ("/hello", 200, "upstream"),
        ("/hello", 200, "memory"),
        ("/x%22y", 400, "-"),
        ("/nope", 404, "-"),
    ]) {
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], path);
        assert_eq!(v["status"], status);
        assert_eq!(v["cache"], cache);
        assert_eq!(v["client"], "127.0.0.1");
        assert!(v["ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{v}");
        let bytes = v["bytes"].as_u64().expect("bytes is a number");
        if status == 200 {
            assert_eq!(bytes, hello_len);
        } else {
            assert!(bytes > 0, "the error script's length: {v}");
        }
    }
}

#[test]
fn serve_takes_its_settings_from_binplz_environment_variables() {
    let dir = tempdir();
    let mut running = Running::start(
        crate::support::cli::binplz()
            .arg("serve")
            .env("BINPLZ_LISTEN", "127.0.0.1:0")
            .env("BINPLZ_CACHE_DIR", dir.path().join("cache"))
            .env("BINPLZ_MAX_FILE_SIZE", "1K"),
        "json",
    );
    let listening = running.seen.last().cloned().expect("the listening line");
    let v: serde_json::Value = serde_json::from_str(&listening).expect("a JSON log line");
    let demo_dir = dir.path().join("cache").join("demo");
    assert_eq!(v["cache_dir"], demo_dir.to_str().expect("a UTF-8 path"));
    let r = blocking_get(running.addr, "/hello");
    assert_error_script(&r, 422, "over this server's limit of 1024");
    assert!(running.wait_for(|l| l.contains("binplz::access")).is_some());
    running.stop();
}

#[test]
fn sighup_reloads_an_index_file_even_when_it_looks_unchanged() {
    let dir = tempdir();
    let index = dir.path().join("fixture.idx");
    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(fixture_index());
    first.write(&index);
    let stamp = |p: &Path| {
        let md = std::fs::metadata(p).expect("the index file");
        (md.modified().expect("an mtime"), md.len())
    };
    let before = stamp(&index);
    let mut running = Running::start(
        crate::support::cli::binplz()
            .args(["serve", "--listen", "127.0.0.1:0", "--index"])
            .arg(&index)
            .arg("--upstream")
            .arg(format!(
                "file://{}",
                crate::support::cache_dir("cache").display()
            ))
            .args([
                "--trusted-public-key",
                &crate::support::Key::test().public(),
            ])
            .arg("--cache-dir")
            .arg(dir.path().join("cache")),
        "json",
    );
    let revision = |addr| {
        let r = blocking_get(addr, "/hello");
        assert_serves(&r, "hello");
        r.header("x-nixpkgs-revision").map(str::to_owned)
    };
    assert_eq!(revision(running.addr).as_deref(), Some("fixture"));
    // Another revision of the same length, with the old mtime: the poll, which compares
    // mtime and size, does not see it.
    let created = first.meta.created;
    first.clone().revision("fixturf", created).write(&index);
    std::fs::File::options()
        .write(true)
        .open(&index)
        .and_then(|f| f.set_modified(before.0))
        .expect("setting the old mtime");
    assert_eq!(stamp(&index), before);
    running.signal("-HUP");
    let reloaded = running.wait_for(|l| l.contains("index reloaded"));
    assert!(reloaded.is_some(), "{:#?}", running.seen);
    assert_eq!(revision(running.addr).as_deref(), Some("fixturf"));
    running.stop();
}

/// `binplz serve` of the index file `index` (the fixture index, written there first) from
/// the fixture cache, with `extra` arguments.
fn serve_index_file(dir: &Path, index: &Path, extra: &[&str]) -> Running {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(fixture_index())
        .write(index);
    Running::start(
        crate::support::cli::binplz()
            .args(["serve", "--listen", "127.0.0.1:0", "--index"])
            .arg(index)
            .arg("--upstream")
            .arg(format!(
                "file://{}",
                crate::support::cache_dir("cache").display()
            ))
            .args([
                "--trusted-public-key",
                &crate::support::Key::test().public(),
            ])
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .args(extra),
        "text",
    )
}

/// Puts `make(tmp)`'s result in place of `index` by a rename, as a deploy would.
fn replace_index(index: &Path, make: impl FnOnce(&Path)) {
    let tmp = index.with_extension("new");
    make(&tmp);
    std::fs::rename(&tmp, index).expect("renaming over the index");
}

#[test]
fn a_reload_refuses_what_it_must_not_read_and_the_old_index_keeps_serving() {
    let dir = tempdir();
    let index = dir.path().join("fixture.idx");
    // Room for the fixture index, not for much more.
    let mut running = serve_index_file(dir.path(), &index, &["--max-index-size", "1M"]);
    let serves_fixture = |addr| {
        let r = blocking_get(addr, "/hello");
        assert_serves(&r, "hello");
        assert_eq!(r.header("x-nixpkgs-revision"), Some("fixture"));
    };
    serves_fixture(running.addr);
    type Make = fn(&Path);
    let cases: [(&str, Make); 3] = [
        ("is a FIFO, not a regular file", crate::index::mkfifo),
        ("is a character device, not a regular file", |p| {
            std::os::unix::fs::symlink("/dev/zero", p).expect("a symlink to /dev/zero")
        }),
        ("larger than the limit of 1048576 bytes", |p| {
            std::fs::File::create(p)
                .and_then(|f| f.set_len((1 << 20) + 1))
                .expect("a sparse file")
        }),
    ];
    for (why, make) in cases {
        replace_index(&index, make);
        running.signal("-HUP");
        let refused = running.wait_for(|l| l.contains("new index refused"));
        let refused = refused.unwrap_or_else(|| panic!("no refusal logged: {:#?}", running.seen));
        assert!(refused.contains(why), "{refused}");
        serves_fixture(running.addr);
    }
    running.stop();
}

#[test]
fn sigterm_stops_a_server_whose_index_reload_meets_a_fifo() {
    let dir = tempdir();
    let index = dir.path().join("fixture.idx");
    let mut running = serve_index_file(dir.path(), &index, &[]);
    // Nothing ever writes to this FIFO: opened as files usually are, it would never open.
    replace_index(&index, crate::index::mkfifo);
    running.signal("-HUP");
    let reloading = running.wait_for(|l| l.contains("reloading index"));
    assert!(reloading.is_some(), "{:#?}", running.seen);
    running.signal("-TERM");
    assert!(
        running.exits_within(Duration::from_secs(30)),
        "still running after SIGTERM: {:#?}",
        running.seen
    );
}

#[test]
fn the_text_log_has_one_line_per_request_with_its_fields() {
    let log = demo_log("text", &["/hello", "/nope"]);
    let access: Vec<_> = log
        .iter()
        .filter(|l| l.contains("binplz::access"))
        .collect();
    assert_eq!(access.len(), 2, "{log:#?}");
    let hello_len = prebuilt("hello").len();
    for (line, want) in access.iter().zip([
        format!("method=GET path=/hello status=200 bytes={hello_len} "),
        "method=GET path=/nope status=404 ".to_owned(),
    ]) {
        assert!(line.contains(&want), "{line}");
        assert!(line.contains(" ms="), "{line}");
        assert!(line.contains(" client=127.0.0.1"), "{line}");
    }
    assert!(access[0].contains(" cache=upstream "), "{}", access[0]);
}

// ---------------------------------------------------------------------------------------
// Connections: binplz's own HTTP/1 path, and hyper for the rest
// ---------------------------------------------------------------------------------------

/// Writes `raw` on a new connection and reads until the server closes it.
async fn exchange(server: &Server, raw: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(server.client.addr)
        .await
        .expect("connecting");
    conn.write_all(raw).await.expect("sending");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut got))
        .await
        .expect("the server closed the connection")
        .expect("reading");
    got
}

/// Consecutive responses on one connection: (status line, lower-cased head, body), bodies
/// delimited by `Content-Length` (none after a `HEAD` request, as `heads` says).
fn responses(mut raw: &[u8], heads: &[bool]) -> Vec<(String, String, Vec<u8>)> {
    let mut out = Vec::new();
    for &head_request in heads {
        let end = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("response {} is missing", out.len() + 1))
            + 4;
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let status = head.lines().next().unwrap_or_default().to_owned();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse::<usize>().expect("a length"));
        let len = if head_request { 0 } else { len };
        out.push((status, head, raw[end..end + len].to_vec()));
        raw = &raw[end + len..];
    }
    assert!(raw.is_empty(), "more bytes than the responses: {raw:?}");
    out
}

#[tokio::test]
async fn pipelined_requests_on_one_connection_are_answered_in_order() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let raw = exchange(
        &server,
        b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n\
          HEAD /goodbye HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /hello HTTP/1.1\r\nHost: x\r\nRange: bytes=1-4\r\n\r\n\
          GET /-/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let r = responses(&raw, &[false, true, false, false]);
    let hello = prebuilt("hello");
    assert_eq!(r[0].0, "http/1.1 200 ok");
    assert!(r[0].2 == hello, "the first body is hello");
    assert!(r[0].1.contains("\r\ndate: "), "{}", r[0].1);
    assert!(!r[0].1.contains("connection: close"), "{}", r[0].1);
    assert_eq!(r[1].0, "http/1.1 200 ok");
    let goodbye_len = prebuilt("goodbye").len();
    assert!(r[1]
        .1
        .contains(&format!("content-length: {goodbye_len}\r\n")));
    assert_eq!(r[2].0, "http/1.1 206 partial content");
    assert_eq!(r[2].2, hello[1..5]);
    assert_eq!(r[3].0, "http/1.1 200 ok");
    assert_eq!(r[3].2, b"ok\n");
    assert!(r[3].1.contains("connection: close"), "{}", r[3].1);
}

#[tokio::test]
async fn http_1_0_closes_after_a_response_unless_asked_to_keep_alive() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    // Closed after one response: the second request is never answered.
    let raw = exchange(
        &server,
        b"GET /-/healthz HTTP/1.0\r\n\r\nGET /-/healthz HTTP/1.0\r\n\r\n",
    )
    .await;
    let r = responses(&raw, &[false]);
    assert_eq!(r[0].0, "http/1.0 200 ok");
    assert!(r[0].1.contains("connection: close"), "{}", r[0].1);
    let raw = exchange(
        &server,
        b"GET /-/healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\
          GET /hello HTTP/1.0\r\n\r\n",
    )
    .await;
    let r = responses(&raw, &[false, false]);
    assert!(r[0].1.contains("connection: keep-alive"), "{}", r[0].1);
    assert!(r[1].2 == prebuilt("hello"));
}

/// A response of [`responses`] as a [`Reply`].
fn reply_of((status, head, body): &(String, String, Vec<u8>)) -> Reply {
    Reply {
        status: status
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a status in {status:?}")),
        headers: head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect(),
        body: body.clone(),
    }
}

/// RFC 9112 §3.2, on binplz's own path and hyper's (a request with a body goes to hyper).
#[rstest]
#[case::no_host(b"GET /hello HTTP/1.1\r\n\r\n", "needs a Host header")]
#[case::two_hosts(
    b"GET /hello HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "more than one Host"
)]
#[case::two_hosts_in_http_1_0(
    b"GET /hello HTTP/1.0\r\nHost: x\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    "more than one Host"
)]
#[case::no_host_on_hyper(
    b"GET /hello HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    "needs a Host header"
)]
#[case::two_hosts_on_hyper(
    b"GET /hello HTTP/1.1\r\nHost: x\r\nHost: y\r\nContent-Length: 0\r\n\r\n",
    "more than one Host"
)]
#[tokio::test]
async fn http_1_1_without_a_host_or_any_request_with_two_gets_the_400_script(
    #[case] bad: &[u8],
    #[case] reason: &str,
) {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    // The connection goes on: the next request is answered.
    let raw = [
        bad,
        b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ]
    .concat();
    let r = responses(&exchange(&server, &raw).await, &[false, false]);
    assert_error_script(&reply_of(&r[0]), 400, reason);
    assert_serves(&reply_of(&r[1]), "hello");
}

#[tokio::test]
async fn http_1_0_and_http_2_need_no_host() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let r = responses(
        &exchange(&server, b"GET /hello HTTP/1.0\r\n\r\n").await,
        &[false],
    );
    assert_serves(&reply_of(&r[0]), "hello");
    // hyper's HTTP/2 client sends the host as `:authority`, never as a `Host` field.
    let r = H2::connect(&server).await.request("/hello", &[]).await;
    assert_serves(&r, "hello");
}

#[tokio::test]
async fn a_request_with_a_body_is_answered_by_hyper_and_so_is_the_rest_of_its_connection() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let raw = exchange(
        &server,
        b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nx=1&y\
          GET /goodbye HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let r = responses(&raw, &[false, false, false, false]);
    assert!(r[0].2 == prebuilt("hello"));
    assert_eq!(r[1].0, "http/1.1 405 method not allowed");
    assert!(r[1].1.contains("allow: get, head"), "{}", r[1].1);
    assert!(r[2].2 == prebuilt("goodbye"));
    assert!(r[3].2 == prebuilt("hello"));
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let tcp = tokio::net::TcpStream::connect(server.client.addr)
        .await
        .expect("connecting");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("an HTTP/2 handshake");
    tokio::spawn(conn);
    for program in ["hello", "goodbye"] {
        let req = http::Request::get(format!("http://x/{program}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("a request");
        let resp = send.send_request(req).await.expect("a response");
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("the body")
            .to_bytes();
        assert!(body == prebuilt(program), "the body is not {program}");
    }
}

/// An HTTP/2 connection with prior knowledge: requests on it are hyper's.
struct H2 {
    send: hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
}

impl H2 {
    async fn connect(server: &Server) -> H2 {
        let tcp = tokio::net::TcpStream::connect(server.client.addr)
            .await
            .expect("connecting");
        H2::handshake(tcp).await
    }

    async fn handshake(tcp: tokio::net::TcpStream) -> H2 {
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .expect("an HTTP/2 handshake");
        tokio::spawn(conn);
        H2 { send }
    }

    /// The response head, its body left to read.
    async fn head(
        &self,
        target: &str,
        headers: &[(&str, &str)],
    ) -> http::Response<hyper::body::Incoming> {
        let mut req = http::Request::get(format!("http://x{target}"));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("a request");
        let resp = self
            .send
            .clone()
            .send_request(req)
            .await
            .expect("a response");
        assert_eq!(resp.version(), http::Version::HTTP_2);
        resp
    }

    async fn request(&self, target: &str, headers: &[(&str, &str)]) -> Reply {
        let resp = self.head(target, headers).await;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("the body")
            .to_bytes()
            .to_vec();
        Reply {
            status,
            headers,
            body,
        }
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_header_read_timeout() {
    let up = cache();
    let dir = tempdir();
    let setup = Setup::fixture(&up, dir.path()).await.config(Config {
        header_read_timeout: Duration::from_millis(200),
        ..Config::default()
    });
    let server = Server::start(setup).await;
    // Answered, then closed while waiting for a next request that never comes.
    let raw = exchange(&server, b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(responses(&raw, &[false])[0].2, b"ok\n");
    // A head that never ends is not waited for either.
    let raw = exchange(&server, b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n").await;
    assert!(raw.is_empty(), "{raw:?}");
}

#[tokio::test]
async fn shutdown_closes_idle_connections_without_waiting_for_the_grace_period() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = cache();
    let dir = tempdir();
    let setup = Setup::fixture(&up, dir.path()).await.config(Config {
        shutdown_grace: Duration::from_secs(600),
        header_read_timeout: Duration::from_secs(600),
        ..Config::default()
    });
    let mut server = Server::start(setup).await;
    let mut idle = tokio::net::TcpStream::connect(server.client.addr)
        .await
        .expect("connecting");
    idle.write_all(b"GET /-/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("sending");
    let mut answer = [0u8; 512];
    let n = idle.read(&mut answer).await.expect("an answer");
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
    // Half a head: a request that has not started is not a response in progress.
    idle.write_all(b"GET /hel").await.expect("sending");
    server.begin_shutdown().await;
    tokio::time::timeout(Duration::from_secs(30), server.wait())
        .await
        .expect("shutdown waited for an idle connection");
    // Closed with nothing more sent (or reset, when the half head was still unread).
    let mut rest = Vec::new();
    match idle.read_to_end(&mut rest).await {
        Ok(_) => assert!(rest.is_empty(), "{rest:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
}

/// A file larger than what is read into memory, kept in the disk cache under `hello`'s key
/// before the server starts, so it goes out by `sendfile` from the disk or a memory file.
fn keep_large_hello(cache_dir: &Path) -> Vec<u8> {
    keep_hello_of(cache_dir, 700_001)
}

/// [`keep_large_hello`] with a file of `len` bytes.
fn keep_hello_of(cache_dir: &Path, len: u32) -> Vec<u8> {
    use binplz::cache::disk::{DiskCache, KeyMeta};
    use std::io::Write;
    let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let disk = DiskCache::open(cache_dir, 64 << 20).expect("opening the disk cache");
    let mut tmp = tempfile::NamedTempFile::new_in(disk.tmp_dir()).expect("a temp file");
    tmp.write_all(&bytes).expect("writing");
    let meta = KeyMeta {
        store_path: paths::HELLO.to_owned(),
        path: "bin/hello".to_owned(),
        sha256: support::sha256(&bytes),
        size: bytes.len() as u64,
        executable: true,
        linkage: "static".to_owned(),
    };
    assert!(disk.insert(tmp, meta).expect("inserting").is_stored());
    bytes
}

#[rstest]
#[case::from_disk(0, "disk")]
#[case::from_a_memory_file(16 << 20, "memory")]
#[tokio::test]
async fn a_large_file_is_sent_exactly_whole_and_in_ranges(
    #[case] memory_bytes: u64,
    #[case] tier: &str,
) {
    let up = cache();
    let dir = tempdir();
    let bytes = keep_large_hello(dir.path());
    let mut setup = Setup::fixture(&up, dir.path()).await;
    setup.memory_bytes = memory_bytes;
    let server = Server::start(setup).await;
    let raw = exchange(
        &server,
        b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /hello HTTP/1.1\r\nHost: x\r\nRange: bytes=131071-400000\r\n\r\n\
          GET /hello HTTP/1.1\r\nHost: x\r\nRange: bytes=-1\r\n\r\n\
          GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let r = responses(&raw, &[false, false, false, false]);
    assert!(r[0].2 == bytes, "the first body differs");
    assert_eq!(r[1].0, "http/1.1 206 partial content");
    assert!(r[1].2 == bytes[131_071..=400_000], "the range differs");
    assert_eq!(r[2].2, bytes[bytes.len() - 1..]);
    assert!(r[3].2 == bytes, "the last body differs");
    assert!(
        r[3].1.contains(&format!("x-binplz-cache: {tier}\r\n")),
        "{}",
        r[3].1
    );
    assert_eq!(up.total_hits(), 0);
}

/// Drops the file at `path` from the page cache; false where its file system keeps it
/// there (tmpfs) or cannot tell (no `RWF_NOWAIT`).
fn evict(path: &Path) -> bool {
    let file = std::fs::File::open(path).expect("opening a content file");
    let evict = || {
        // Only written-out pages leave the page cache.
        file.sync_all().expect("fsync");
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
    };
    evict();
    if binplz::cache::disk::in_page_cache(&file, 0).expect("probing") {
        return false;
    }
    // That check started reading the file in: read it all, then drop it again.
    std::io::copy(&mut &file, &mut std::io::sink()).expect("reading");
    evict();
    true
}

/// Small files are read whole, large ones sent from the file: either way, a file the page
/// cache lacks is read on a blocking thread, not on the thread serving its connection.
#[rstest]
#[case::small(false)]
#[case::large(true)]
#[tokio::test]
async fn a_disk_file_not_in_the_page_cache_is_read_off_the_serving_thread(#[case] large: bool) {
    let up = cache();
    // On the disk the sources are on: a memory file system has no page cache to leave.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("creating a temp dir");
    let bytes = if large {
        keep_large_hello(dir.path())
    } else {
        prebuilt("hello")
    };
    let mut setup = Setup::fixture(&up, dir.path()).await;
    setup.memory_bytes = 0;
    let server = Server::start(setup).await;
    let waits = || metric(&server, "binplz_disk_waits_total");
    // Fetched and kept, or hashed again as the first open after the start: through the
    // page cache. The second answer waits for the first's keeping, and is from the disk.
    for _ in 0..2 {
        let r = server.get("/hello").await;
        assert!(r.body == bytes);
    }
    assert_eq!(waits().await, 0.0);
    let fetches = up.total_hits();
    for path in content_files(dir.path()) {
        if !evict(&path) {
            eprintln!("skipped: this file system keeps files in the page cache");
            return;
        }
    }
    let r = server.get("/hello").await;
    assert!(r.body == bytes);
    assert_eq!(r.header("x-binplz-cache"), Some("disk"));
    assert_eq!(waits().await, 1.0, "reads off the serving thread");
    let r = server.get("/hello").await;
    assert!(r.body == bytes);
    assert_eq!(waits().await, 1.0, "the file is in the page cache now");
    assert_eq!(up.total_hits(), fetches);
}

#[tokio::test]
async fn a_hostile_name_between_plain_requests_gets_the_400_script_and_the_connection_goes_on() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let raw = exchange(
        &server,
        b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /`touch${IFS}pwned` HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /<x> HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /goodbye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let r = responses(&raw, &[false, false, false, false]);
    assert!(r[0].2 == prebuilt("hello"));
    for bad in &r[1..3] {
        assert_eq!(bad.0, "http/1.1 400 bad request");
        let script = String::from_utf8_lossy(&bad.2);
        assert!(script.contains("invalid program name"), "{script}");
        assert!(!script.contains("pwned"), "{script}");
    }
    assert!(r[3].2 == prebuilt("goodbye"));
}

#[rstest]
#[case::a_tab_in_the_name(b"GET /a\tb HTTP/1.1\r\nHost: x\r\n\r\n")]
#[case::a_control_byte_in_the_name(b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n")]
#[case::a_broken_header(b"GET /hello HTTP/1.1\r\nBad Name: x\r\n\r\n")]
#[tokio::test]
async fn a_get_that_is_not_http_gets_the_400_script_and_a_closed_connection(#[case] raw: &[u8]) {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let got = exchange(&server, raw).await;
    let r = responses(&got, &[false]);
    assert_eq!(r[0].0, "http/1.1 400 bad request");
    assert!(r[0].1.contains("connection: close"), "{}", r[0].1);
    let headers = r[0].1.lines().skip(1).filter_map(|l| l.split_once(':'));
    let reply = Reply {
        status: 400,
        headers: headers
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect(),
        body: r[0].2.clone(),
    };
    assert_error_script(&reply, 400, "binplz: malformed request");
    assert_eq!(up.total_hits(), 0);
}

// ---------------------------------------------------------------------------------------
// Bytes sent, as the access log and binplz_bytes_served_total count them
// ---------------------------------------------------------------------------------------

/// A file far larger than what the sockets between a server and a client that stops
/// reading can hold (a few MiB), and what such a client reads before it leaves.
const LARGE: u32 = 32 << 20;
const READ_BEFORE_LEAVING: usize = 1 << 20;

/// A connection whose receive buffer stays small, so that what the server could send
/// ahead of the client's reading is bounded.
async fn small_window_connection(server: &Server) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket
        .set_recv_buffer_size(64 << 10)
        .expect("setting the receive buffer");
    socket
        .connect(server.client.addr)
        .await
        .expect("connecting")
}

/// `binplz_bytes_served_total` of a stopped server: final once every connection ended.
fn bytes_served(app: &binplz::server::App) -> f64 {
    let text = app.metrics().render(&[]);
    metrics(&text)["binplz_bytes_served_total"]
}

#[rstest]
#[case::binplz_http1(false)]
#[case::hyper_http2(true)]
#[tokio::test]
async fn a_client_that_leaves_early_is_counted_with_what_was_sent_not_the_whole_file(
    #[case] http2: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = cache();
    let dir = tempdir();
    keep_hello_of(dir.path(), LARGE);
    let server = Server::start(Setup::fixture(&up, dir.path()).await).await;
    // Read to the end, a range and a HEAD count exactly their bodies.
    let r = server
        .request("GET", "/hello", &[("Range", "bytes=0-99")])
        .await;
    assert_eq!((r.status, r.body.len()), (206, 100));
    assert!(server.request("HEAD", "/hello", &[]).await.body.is_empty());
    let conn = small_window_connection(&server).await;
    if http2 {
        let h2 = H2::handshake(conn).await;
        let mut body = h2.head("/hello", &[]).await.into_body();
        let mut got = 0;
        while got < READ_BEFORE_LEAVING {
            let frame = http_body_util::BodyExt::frame(&mut body)
                .await
                .expect("a frame")
                .expect("the body goes on");
            got += frame.data_ref().map_or(0, |d| d.len());
        }
    } else {
        let mut conn = conn;
        conn.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("sending");
        let mut got = vec![0u8; READ_BEFORE_LEAVING];
        conn.read_exact(&mut got).await.expect("reading");
    }
    // Gone, with most of the file unread; stopping waits for the response to end.
    let app = server.app.clone();
    server.stop().await;
    let sent = bytes_served(&app) - 100.0;
    let (least, most) = (READ_BEFORE_LEAVING as f64 / 2.0, f64::from(LARGE) / 2.0);
    assert!(
        least <= sent && sent < most,
        "{sent} bytes counted as sent of {LARGE}, after the client read about {READ_BEFORE_LEAVING}"
    );
}

// ---------------------------------------------------------------------------------------
// Every error is the script, on binplz's own HTTP/1 path and on hyper's
// ---------------------------------------------------------------------------------------

/// A server on the fixture index whose connections all go to hyper (`hyper_only`), or
/// first to binplz's own HTTP/1 path.
async fn start_on_path(up: &FakeUpstream, cache_dir: &Path, hyper_only: bool) -> Server {
    let setup = Setup::fixture(up, cache_dir).await.config(Config {
        hyper_only,
        ..Config::default()
    });
    Server::start(setup).await
}

/// The one response `raw` gets on a new connection, which must close after it.
async fn sole_reply(server: &Server, raw: &[u8]) -> Reply {
    let got = exchange(server, raw).await;
    let head_request = raw.starts_with(b"HEAD ");
    let r = responses(&got, &[head_request]);
    let (status, head, body) = r.into_iter().next().expect("one response");
    let status = status
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status in {head:?}"));
    let headers = head.lines().skip(1).filter_map(|l| l.split_once(':'));
    Reply {
        status,
        headers: headers
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect(),
        body,
    }
}

#[rstest]
#[case::a_method_not_allowed(&b"DELETE /hello HTTP/1.1\r\n"[..], 405, "only GET and HEAD")]
#[case::a_method_with_a_body(&b"POST /hello HTTP/1.1\r\nContent-Length: 3\r\n"[..], 405, "only GET")]
#[case::an_unknown_page(&b"GET /-/nope HTTP/1.1\r\n"[..], 404, "no such page")]
#[case::an_unknown_program(&b"GET /nosuchprogram HTTP/1.1\r\n"[..], 404, "unknown program")]
#[case::a_hostile_name(&b"GET /x;reboot HTTP/1.1\r\n"[..], 400, "invalid program name")]
#[case::an_escaped_name(&b"GET /a`b HTTP/1.1\r\n"[..], 400, "invalid program name")]
#[case::an_unsatisfiable_range(
    &b"GET /hello HTTP/1.1\r\nRange: bytes=99999999-\r\n"[..],
    416,
    "the range is outside the file"
)]
#[tokio::test]
async fn every_error_the_app_answers_is_the_script_on_both_paths(
    #[case] head: &[u8],
    #[case] status: u16,
    #[case] reason: &str,
) {
    let up = cache();
    for hyper_only in [false, true] {
        let dir = tempdir();
        let server = start_on_path(&up, dir.path(), hyper_only).await;
        let mut raw = head.to_vec();
        raw.extend_from_slice(b"Host: x\r\nConnection: close\r\n\r\n");
        if head.starts_with(b"POST") {
            raw.extend_from_slice(b"abc");
        }
        let r = sole_reply(&server, &raw).await;
        assert_error_script(&r, status, reason);
        // A HEAD gets the same head, without the body.
        if head.starts_with(b"GET ") {
            let raw = [&b"HEAD"[..], &raw[3..]].concat();
            let h = sole_reply(&server, &raw).await;
            assert_eq!(h.status, status, "hyper only: {hyper_only}");
            assert_eq!(h.header("content-type"), Some(SHELL_SCRIPT));
            assert_eq!(h.header("content-length"), r.header("content-length"));
        }
    }
}

/// A request head of `size` bytes: one long request line, or one long header field.
fn huge_head(size: usize, in_target: bool) -> Vec<u8> {
    if in_target {
        format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(size)).into_bytes()
    } else {
        format!("GET /hello HTTP/1.1\r\nX: {}\r\n\r\n", "v".repeat(size)).into_bytes()
    }
}

#[rstest]
#[case::not_http(&b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"[..], 400, "malformed request")]
#[case::a_tab_in_a_post_target(&b"POST /a\tb HTTP/1.1\r\nContent-Length: 0\r\n\r\n"[..], 400, "malformed")]
#[case::an_unknown_version(&b"GET /hello HTTP/3.0\r\n\r\n"[..], 400, "malformed request")]
#[case::a_bad_content_length(&b"POST /hello HTTP/1.1\r\nContent-Length: 1x\r\n\r\n"[..], 400, "malformed")]
#[case::two_content_lengths(
    &b"POST /hello HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"[..],
    400,
    "malformed request"
)]
#[case::a_transfer_coding_not_chunked(
    &b"POST /hello HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
    400,
    "malformed request"
)]
#[case::a_transfer_coding_in_http_1_0(
    &b"POST /hello HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
    400,
    "malformed request"
)]
#[tokio::test]
async fn requests_hyper_would_refuse_get_the_script_and_hyper_s_status(
    #[case] raw: &[u8],
    #[case] status: u16,
    #[case] reason: &str,
) {
    let up = cache();
    let dir = tempdir();
    let server = start_on_path(&up, dir.path(), false).await;
    assert_error_script(&sole_reply(&server, raw).await, status, reason);
    // hyper alone answers with the same status (and an empty body: see the README).
    let dir = tempdir();
    let hyper = start_on_path(&up, dir.path(), true).await;
    assert_eq!(sole_reply(&hyper, raw).await.status, status);
    assert_eq!(up.total_hits(), 0);
}

#[tokio::test]
async fn heads_over_the_limit_get_414_or_431_with_the_script() {
    let up = cache();
    let dir = tempdir();
    let server = start_default(&up, dir.path()).await;
    let over = 70 << 10;
    let r = sole_reply(&server, &huge_head(over, true)).await;
    assert_error_script(&r, 414, "request target too long");
    let r = sole_reply(&server, &huge_head(over, false)).await;
    assert_error_script(&r, 431, "request head too large");
    let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
    let raw = format!("GET /hello HTTP/1.1\r\n{many}\r\n");
    let r = sole_reply(&server, raw.as_bytes()).await;
    assert_error_script(&r, 431, "request head too large");
    // Under the limits, both are served.
    let many: String = (0..98).map(|i| format!("X-{i}: v\r\n")).collect();
    let raw = format!("GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{many}\r\n");
    assert_serves(&sole_reply(&server, raw.as_bytes()).await, "hello");
    let raw = format!(
        "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX: {}\r\n\r\n",
        "v".repeat(60 << 10)
    );
    assert_serves(&sole_reply(&server, raw.as_bytes()).await, "hello");
}
