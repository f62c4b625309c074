//! `binplz bench`, run as a process on the fixtures' NARs and caches (file:// and over
//! HTTP from the fake upstream) and on a generated NAR: every figure of `--json` present
//! and positive, recompression verified against the signed NarHash, a tampered cache
//! sample reported as failing verification and not timed, bad input files refused with one
//! clear line. No figure is compared with a speed.

use std::path::Path;
use std::process::{Command, Output};

use binplz::error::ErrorKind;
use rstest::rstest;
use serde_json::Value;

use crate::support::cli::{assert_failure, assert_success, binplz, run, stderr};
use crate::support::{
    self, cache_dir, copy_cache, fixture_nar_path, fixture_narinfo, narinfo_field, narinfo_path,
    paths, remove_field, FakeUpstream, Key,
};

/// `binplz bench` measuring once per cell, without waiting for a quiet machine.
fn bench() -> Command {
    let mut cmd = binplz();
    cmd.args(["bench", "--runs", "1", "--quiet-wait", "0"]);
    cmd
}

fn with_test_key(cmd: &mut Command) -> &mut Command {
    cmd.args(["--trusted-public-key", &Key::test().public()])
}

fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// The fixture NAR (compressed as in `cache`) of `store_path`.
fn fixture_nar_file(cache: &str, store_path: &str) -> std::path::PathBuf {
    cache_dir(cache).join(fixture_nar_path(cache, store_path))
}

fn signed_nar_hash(cache: &str, store_path: &str) -> String {
    narinfo_field(&fixture_narinfo(cache, store_path), "NarHash").expect("a NarHash")
}

#[track_caller]
fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

fn rows(report: &Value) -> &Vec<Value> {
    report["rows"].as_array().expect("rows")
}

#[track_caller]
fn positive(v: &Value, key: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"));
    assert!(x > 0.0 && x.is_finite(), "{key} = {x} in {v}");
    x
}

/// Every figure of a row is there, and positive where it measures something.
#[track_caller]
fn assert_complete(row: &Value) {
    for key in [
        "nar_bytes",
        "compressed_bytes",
        "compression_ratio",
        "runs",
        "extract_mb_s",
        "extract_compressed_mb_s",
        "decode_mb_s",
        "hash_mb_s",
        "limit_mb_s",
        "extract_over_limit",
    ] {
        positive(row, key);
    }
    for key in ["spread", "others_cpu"] {
        let x = row[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} in {row}"));
        assert!((0.0..=1.0).contains(&x) || key == "spread", "{key} = {x}");
    }
    for memory in ["extract_memory", "decode_memory", "hash_memory"] {
        positive(&row[memory], "peak_rss_bytes");
        assert!(row[memory]["added_rss_bytes"].is_u64(), "{memory} in {row}");
    }
    // The pass cannot beat the slower of its two halves by much, nor be absurdly slow.
    let ratio = positive(row, "extract_over_limit");
    assert!(ratio < 3.0, "extract/limit = {ratio} in {row}");
    let limit = positive(row, "limit_mb_s");
    assert!(limit <= positive(row, "hash_mb_s") + 1e-9, "{row}");
    let compression = positive(row, "compression_ratio");
    match row["codec"].as_str() {
        Some("none") => assert_eq!(compression, 1.0, "{row}"),
        // The fixtures' NARs and generated ones all shrink, and by no absurd factor.
        _ => assert!(compression > 1.0 && compression < 100.0, "{row}"),
    }
    assert!(row["nar_hash"]
        .as_str()
        .is_some_and(|h| h.starts_with("sha256:")));
}

#[test]
fn json_has_every_figure_for_nar_files_caches_and_generated_nars() {
    let out = run(with_test_key(&mut bench())
        .arg("--nar")
        .arg(fixture_nar_file("cache", paths::HELLO))
        .arg("--nar")
        .arg(fixture_nar_file("cache-bzip2", paths::HELLO))
        .args(["--cache", &file_url(&cache_dir("cache")), "--sample", "2"])
        .args(["--generate", "0.2M", "--json"]));
    assert_success(&out);
    // Not a terminal: no progress bar, no escape codes.
    assert!(
        !stderr(&out).contains('\r') && !stderr(&out).contains('\u{1b}'),
        "{}",
        stderr(&out)
    );
    let report = json(&out);
    assert_eq!(report["binplz_version"], env!("CARGO_PKG_VERSION"));
    positive(&report, "cores");
    positive(&report, "seconds");
    assert!(report["cpu_model"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(report["failures"], Value::Array(Vec::new()));
    let rows = rows(&report);
    for row in rows {
        assert_complete(row);
        assert_eq!(row["recompressed"], false);
    }
    let codecs: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap_or(""),
                r["codec"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        codecs,
        [
            ("file", "zstd"),
            ("file", "bzip2"),
            ("generated", "zstd:19"),
            ("generated", "xz:6"),
            ("generated", "none"),
            ("cache", "zstd"),
            ("cache", "zstd"),
        ]
    );
    // The file NARs are hello's, as its signed NarHash says.
    let hello = signed_nar_hash("cache", paths::HELLO);
    for row in &rows[..2] {
        assert_eq!(row["nar_hash"], hello.as_str(), "{row}");
        assert_eq!(row["wanted"], "bin/hello");
    }
    // The file:// sample is the largest NARs first.
    let sizes: Vec<u64> = rows[5..7]
        .iter()
        .map(|r| r["nar_bytes"].as_u64().unwrap_or(0))
        .collect();
    assert!(sizes[0] >= sizes[1], "{sizes:?}");
    assert_eq!(rows[5]["input"], paths::BUSYBOX);
}

#[test]
fn a_cache_over_http_is_sampled_by_store_path() {
    let up = FakeUpstream::serve(cache_dir("cache-xz"));
    let out = run(with_test_key(&mut bench()).args([
        "--cache",
        &up.url(),
        "--store-path",
        paths::HELLO,
        "--json",
    ]));
    assert_success(&out);
    let report = json(&out);
    let rows = rows(&report);
    assert_eq!(rows.len(), 1, "{report}");
    assert_complete(&rows[0]);
    assert_eq!(rows[0]["input"], paths::HELLO);
    assert_eq!(rows[0]["codec"], "xz");
    assert_eq!(
        rows[0]["nar_hash"],
        signed_nar_hash("cache-xz", paths::HELLO).as_str()
    );
    assert_eq!(
        up.hits(&narinfo_path(paths::HELLO)),
        2,
        "ranked, then verified"
    );

    // Without store paths, an HTTP cache cannot be listed: one clear error.
    let out = run(with_test_key(&mut bench()).args(["--cache", &up.url()]));
    let line = assert_failure(&out, ErrorKind::BadRequest);
    assert!(line.contains("--store-path"), "{line}");
}

#[test]
fn recompression_round_trips_to_the_signed_nar_hash() {
    let out = run(bench()
        .arg("--nar")
        .arg(fixture_nar_file("cache-xz", paths::HELLO))
        .args(["--codecs", "zstd:3,zstd:19,xz:0,bzip2:1,none", "--json"]));
    assert_success(&out);
    let report = json(&out);
    let rows = rows(&report);
    let codecs: Vec<&str> = rows
        .iter()
        .map(|r| r["codec"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(codecs, ["zstd:3", "zstd:19", "xz:0", "bzip2:1", "none"]);
    let hello = signed_nar_hash("cache-xz", paths::HELLO);
    for row in rows {
        assert_complete(row);
        assert_eq!(row["recompressed"], true);
        assert_eq!(row["nar_hash"], hello.as_str(), "{row}");
    }
    // Level 19 is no larger than level 3 on the same NAR.
    let size = |i: usize| rows[i]["compressed_bytes"].as_u64().unwrap_or(0);
    assert!(size(1) <= size(0), "{} > {}", size(1), size(0));
}

#[test]
fn a_random_sample_is_the_same_for_the_same_seed() {
    let sample = |seed: &str| {
        let out = run(with_test_key(&mut bench())
            .args(["--cache", &file_url(&cache_dir("cache")), "--sample", "3"])
            .args(["--seed", seed, "--json"]));
        assert_success(&out);
        let inputs: Vec<String> = rows(&json(&out))
            .iter()
            .map(|r| r["input"].as_str().unwrap_or("").to_owned())
            .collect();
        assert_eq!(inputs.len(), 3);
        inputs
    };
    assert_eq!(sample("7"), sample("7"));
}

#[test]
fn a_tampered_cache_sample_is_reported_as_failing_verification_and_not_timed() {
    let dir = tempfile::tempdir().expect("a temp dir");
    copy_cache("cache", dir.path());
    // hello's NAR replaced by goodbye's: a valid zstd NAR, under a signed narinfo that
    // names another NarHash. FileSize and FileHash are unsigned and would give the swap
    // away first: without them only NarHash can.
    let narinfo = fixture_narinfo("cache", paths::HELLO);
    let narinfo = remove_field(&remove_field(&narinfo, "FileSize"), "FileHash");
    std::fs::write(dir.path().join(narinfo_path(paths::HELLO)), narinfo).expect("a narinfo");
    std::fs::copy(
        fixture_nar_file("cache", paths::GOODBYE),
        dir.path().join(fixture_nar_path("cache", paths::HELLO)),
    )
    .expect("replacing the NAR");
    let out = run(with_test_key(&mut bench())
        .args(["--cache", &file_url(dir.path())])
        .args(["--store-path", paths::HELLO, "--store-path", paths::GOODBYE])
        .args(["--sample", "2", "--json"]));
    assert_eq!(
        out.status.code(),
        Some(i32::from(ErrorKind::VerificationFailed.exit_code())),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("NarHash mismatch"),
        "{}",
        stderr(&out)
    );
    let report = json(&out);
    let failures = report["failures"].as_array().expect("failures");
    assert_eq!(failures.len(), 1, "{report}");
    assert_eq!(failures[0]["input"], paths::HELLO);
    assert_eq!(failures[0]["kind"], "verification failed");
    assert!(failures[0]["error"]
        .as_str()
        .is_some_and(|e| e.contains("NarHash mismatch")));
    let rows = rows(&report);
    assert_eq!(rows.len(), 1, "{report}");
    assert_eq!(rows[0]["input"], paths::GOODBYE);
    assert_complete(&rows[0]);
}

#[test]
fn an_unsigned_sample_fails_verification() {
    // The fixtures' key is not cache.nixos.org's: every narinfo is untrusted.
    let out = run(bench()
        .args(["--cache", &file_url(&cache_dir("cache"))])
        .args(["--store-path", paths::HELLO, "--json"]));
    assert_eq!(
        out.status.code(),
        Some(i32::from(ErrorKind::VerificationFailed.exit_code())),
        "{}",
        stderr(&out)
    );
    let report = json(&out);
    assert_eq!(rows(&report).len(), 0);
    assert_eq!(report["failures"][0]["kind"], "verification failed");
}

/// A file in a temp dir holding `bytes`.
fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("writing the input");
    path
}

#[rstest]
#[case::not_a_nar("garbage.nar", b"hello, world".to_vec(), "cannot tell the compression")]
#[case::empty("empty.nar", Vec::new(), "cannot tell the compression")]
#[case::truncated(
    "short.nar.zst",
    support::fixture_nar("cache", paths::HELLO)[..200].to_vec(),
    "not a valid NAR"
)]
#[case::zstd_of_something_else(
    "text.nar.zst",
    zstd::encode_all(&b"not an archive at all"[..], 3).expect("zstd"),
    "not a valid NAR"
)]
fn bad_input_files_give_one_clear_error(
    #[case] name: &str,
    #[case] bytes: Vec<u8>,
    #[case] expected: &str,
) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = file_with(dir.path(), name, &bytes);
    let out = run(bench().arg("--nar").arg(&path));
    let line = assert_failure(&out, ErrorKind::BadRequest);
    assert!(line.contains(name) && line.contains(expected), "{line}");
}

#[test]
fn a_missing_file_and_nothing_to_measure_are_errors() {
    let out = run(bench().args(["--nar", "/nonexistent/x.nar"]));
    let line = assert_failure(&out, ErrorKind::BadRequest);
    assert!(line.contains("cannot read /nonexistent/x.nar"), "{line}");
    let out = run(&mut bench());
    let line = assert_failure(&out, ErrorKind::BadRequest);
    assert!(line.contains("nothing to measure"), "{line}");
    let out = run(bench().args(["--generate", "1M", "--codecs", "lz4"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("unknown codec"), "{}", stderr(&out));
}

#[test]
fn compare_nix_times_nix_nar_cat_too() {
    let out = run(bench()
        .arg("--nar")
        .arg(fixture_nar_file("cache", paths::HELLO))
        .args(["--codecs", "zstd:3,none", "--compare-nix", "--json"]));
    assert_success(&out);
    let report = json(&out);
    for row in rows(&report) {
        assert_complete(row);
        let nix = &row["nix"];
        positive(nix, "seconds");
        positive(nix, "mb_s");
        positive(nix, "peak_rss_bytes");
    }
}

#[test]
fn the_table_names_every_input_and_codec() {
    let out = run(bench()
        .arg("--nar")
        .arg(fixture_nar_file("cache", paths::HELLO))
        .args(["--codecs", "xz:6,none"]));
    assert_success(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].contains("cores"), "{table}");
    assert!(
        lines[1].contains("extract") && lines[1].contains("x/limit"),
        "{table}"
    );
    assert!(
        lines[2].contains("xz:6") && lines[3].contains(" none "),
        "{table}"
    );
}
