//! The `binplz extract` command, run as a process against the fake upstream, `file://`
//! fixture caches and local NARs: what it writes, its one-line errors, its exit statuses,
//! and that a failure leaves no file behind.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use binplz::error::ErrorKind;
use rstest::rstest;

use crate::support::cli::{assert_failure, assert_success, binplz, run, stderr};
use crate::support::{
    self, assert_dir_empty, dir_entries, fixture_nar_path, fixture_narinfo, narinfo_field,
    narinfo_path, paths, prebuilt, remove_field, FakeUpstream, Fault, Key,
};

/// `binplz extract --upstream URL --trusted-public-key <test key> STORE_PATH PATH`.
fn extract_from(upstream: &str, store_path: &str, path: &str) -> Command {
    let mut cmd = binplz();
    cmd.args(["extract", "--upstream", upstream])
        .args(["--trusted-public-key", &Key::test().public()])
        .args([store_path, path]);
    cmd
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

#[track_caller]
fn assert_is_executable_hello(file: &Path) {
    let bytes = std::fs::read(file).expect("reading the output");
    assert_eq!(bytes, prebuilt("hello"));
    let mode = std::fs::metadata(file).expect("stat").permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "mode {mode:o}");
}

fn cache() -> FakeUpstream {
    FakeUpstream::serve(support::cache_dir("cache"))
}

// ─── Success ───────────────────────────────────────────────────────────────────────────

#[test]
fn extract_to_a_file_writes_an_executable_copy_of_the_program() {
    let up = cache();
    let dir = tempdir();
    let out_file = dir.path().join("hello");
    let out = run(extract_from(&up.url(), paths::HELLO, "bin/hello")
        .arg("-o")
        .arg(&out_file));
    assert_success(&out);
    assert_is_executable_hello(&out_file);
    assert_eq!(dir_entries(dir.path()), ["hello"]);
    assert!(out.stdout.is_empty());
    let summary = stderr(&out);
    assert!(summary.contains("static ELF"), "{summary}");
    assert!(summary.contains("13376 bytes"), "{summary}");
}

#[test]
fn extract_to_stdout_writes_the_program_and_leaves_no_temp_file() {
    let up = cache();
    let tmp = tempdir();
    let out = run(extract_from(&up.url(), paths::LINKS, "bin/hello-abs").env("TMPDIR", tmp.path()));
    assert_success(&out);
    assert_eq!(out.stdout, prebuilt("hello"));
    assert_dir_empty(tmp.path());
    assert_eq!(up.hits(&narinfo_path(paths::HELLO)), 1);
}

#[rstest]
#[case::zstd("cache")]
#[case::xz("cache-xz")]
#[case::none("cache-none")]
fn extract_from_a_file_upstream(#[case] cache: &str) {
    let dir = tempdir();
    let out_file = dir.path().join("hello");
    let url = format!("file://{}", support::cache_dir(cache).display());
    let out = run(extract_from(&url, paths::HELLO, "bin/hello")
        .arg("-o")
        .arg(&out_file));
    assert_success(&out);
    assert_is_executable_hello(&out_file);
}

#[test]
fn extract_tries_upstreams_in_order() {
    let first = FakeUpstream::serve(support::cache_dir("cache-xz"));
    first.set_fault(&narinfo_path(paths::HELLO), Fault::NotFound);
    let second = cache();
    let dir = tempdir();
    let out_file = dir.path().join("hello");
    let out = run(binplz()
        .args([
            "extract",
            "--upstream",
            &first.url(),
            "--upstream",
            &second.url(),
        ])
        .args(["--trusted-public-key", &Key::test().public()])
        .args([paths::HELLO, "bin/hello", "-o"])
        .arg(&out_file));
    assert_success(&out);
    assert_is_executable_hello(&out_file);
    assert_eq!(first.hits(&narinfo_path(paths::HELLO)), 1);
    assert_eq!(second.hits(&fixture_nar_path("cache", paths::HELLO)), 1);
}

#[test]
fn no_require_sigs_accepts_an_unsigned_narinfo() {
    let up = cache();
    let unsigned = remove_field(&fixture_narinfo("cache", paths::HELLO), "Sig");
    up.set_fault(&narinfo_path(paths::HELLO), Fault::override_with(unsigned));
    let dir = tempdir();
    let out_file = dir.path().join("hello");
    let out = run(extract_from(&up.url(), paths::HELLO, "bin/hello")
        .arg("--no-require-sigs")
        .arg("-o")
        .arg(&out_file));
    assert_success(&out);
    assert_is_executable_hello(&out_file);
}

#[test]
fn non_executable_file_is_written_without_execute_permission() {
    let up = cache();
    let dir = tempdir();
    let out_file = dir.path().join("readme");
    let out = run(extract_from(&up.url(), paths::NONEXEC, "bin/readme")
        .arg("-o")
        .arg(&out_file));
    assert_success(&out);
    let mode = std::fs::metadata(&out_file)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644, "mode {mode:o}");
}

/// A fixture cache's NAR file for hello, and its NarHash.
fn local_nar(cache: &str) -> (std::path::PathBuf, String) {
    let file = support::cache_dir(cache).join(fixture_nar_path(cache, paths::HELLO));
    let hash = narinfo_field(&fixture_narinfo(cache, paths::HELLO), "NarHash").expect("NarHash");
    (file, hash)
}

#[rstest]
#[case::zstd("cache", false)]
#[case::zstd_with_hash("cache", true)]
#[case::xz("cache-xz", false)]
#[case::xz_with_hash("cache-xz", true)]
#[case::uncompressed("cache-none", false)]
#[case::uncompressed_with_hash("cache-none", true)]
#[case::brotli_with_hash("cache-br", true)]
#[case::gzip_with_hash("cache-gzip", true)]
fn extract_from_a_local_nar(#[case] cache: &str, #[case] with_hash: bool) {
    let (nar, hash) = local_nar(cache);
    let dir = tempdir();
    let out_file = dir.path().join("hello");
    let mut cmd = binplz();
    cmd.args(["extract", "--nar"]).arg(&nar);
    if with_hash {
        cmd.args(["--nar-hash", &hash]);
    }
    let out = run(cmd.args(["bin/hello", "-o"]).arg(&out_file));
    assert_success(&out);
    assert_is_executable_hello(&out_file);
    assert_eq!(dir_entries(dir.path()), ["hello"]);
}

#[test]
fn local_nar_link_to_an_earlier_file_takes_a_second_pass() {
    let nar = support::cache_dir("cache").join(fixture_nar_path("cache", paths::LINKS));
    let dir = tempdir();
    let out_file = dir.path().join("hello");
    let out = run(binplz()
        .args(["extract", "--nar"])
        .arg(&nar)
        .args(["bin/hello-rel", "-o"])
        .arg(&out_file));
    assert_success(&out);
    assert_is_executable_hello(&out_file);
    assert_eq!(dir_entries(dir.path()), ["hello"]);
}

#[test]
fn local_nar_hash_may_be_given_in_sri_form() {
    let (nar, _) = local_nar("cache-none");
    let digest = support::sha256(&std::fs::read(&nar).expect("reading the NAR"));
    let sri = format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    );
    let dir = tempdir();
    let out_file = dir.path().join("hello");
    let out = run(binplz()
        .args(["extract", "--nar"])
        .arg(&nar)
        .args(["--nar-hash", &sri, "bin/hello", "-o"])
        .arg(&out_file));
    assert_success(&out);
    assert_is_executable_hello(&out_file);
}

// ─── Failures: one line, the documented status, nothing left behind ─────────────────────

/// Runs `cmd -o DIR/out` in a fresh directory and checks the failure left it empty.
#[track_caller]
fn assert_fails_leaving_nothing(cmd: &mut Command, kind: ErrorKind) -> String {
    let dir = tempdir();
    let out = run(cmd.arg("-o").arg(dir.path().join("out")));
    let line = assert_failure(&out, kind);
    assert_dir_empty(dir.path());
    line
}

#[rstest]
#[case::zstd("cache")]
#[case::uncompressed("cache-none")]
fn local_nar_with_a_wrong_hash_fails_verification(#[case] cache: &str) {
    let (nar, _) = local_nar(cache);
    let wrong = support::nix_sha256(b"not the NAR");
    assert_fails_leaving_nothing(
        binplz()
            .args(["extract", "--nar"])
            .arg(&nar)
            .args(["--nar-hash", &wrong, "bin/hello"]),
        ErrorKind::VerificationFailed,
    );
}

#[test]
fn invalid_nar_hash_is_a_bad_request() {
    let (nar, _) = local_nar("cache");
    assert_fails_leaving_nothing(
        binplz().args(["extract", "--nar"]).arg(&nar).args([
            "--nar-hash",
            "sha256:nope",
            "bin/hello",
        ]),
        ErrorKind::BadRequest,
    );
}

#[test]
fn missing_local_nar_is_a_bad_request_naming_the_file() {
    let dir = tempdir();
    let missing = dir.path().join("missing.nar.zst");
    let out = run(binplz()
        .args(["extract", "--nar"])
        .arg(&missing)
        .arg("bin/hello"));
    assert_failure(&out, ErrorKind::BadRequest);
    assert!(
        stderr(&out).contains(&missing.display().to_string()),
        "{}",
        stderr(&out)
    );
}

#[test]
fn local_file_that_is_no_nar_is_a_bad_request() {
    let not_a_nar = support::cache_dir("cache").join(narinfo_path(paths::HELLO));
    assert_fails_leaving_nothing(
        binplz()
            .args(["extract", "--nar"])
            .arg(&not_a_nar)
            .arg("bin/hello"),
        ErrorKind::BadRequest,
    );
}

#[test]
fn truncated_local_nar_fails_verification() {
    let dir = tempdir();
    let nar = support::fixture_nar("cache-none", paths::HELLO);
    let truncated = dir.path().join("truncated.nar");
    std::fs::write(&truncated, &nar[..5000]).expect("writing the truncated NAR");
    let out_dir = tempdir();
    let out = run(binplz()
        .args(["extract", "--nar"])
        .arg(&truncated)
        .args(["bin/hello", "-o"])
        .arg(out_dir.path().join("hello")));
    assert_failure(&out, ErrorKind::VerificationFailed);
    assert_dir_empty(out_dir.path());
}

#[test]
fn local_nar_link_into_another_store_path_is_refused() {
    let nar = support::cache_dir("cache").join(fixture_nar_path("cache", paths::LINKS));
    assert_fails_leaving_nothing(
        binplz()
            .args(["extract", "--nar"])
            .arg(&nar)
            .arg("bin/hello-abs"),
        ErrorKind::Refused,
    );
}

#[test]
fn store_path_in_no_upstream_exits_not_in_cache() {
    let up = cache();
    assert_fails_leaving_nothing(
        &mut extract_from(&up.url(), paths::NOTBUILT, "bin/notbuilt"),
        ErrorKind::NotInCache,
    );
}

#[test]
fn missing_program_exits_unknown_program() {
    let up = cache();
    assert_fails_leaving_nothing(
        &mut extract_from(&up.url(), paths::HELLO, "bin/nope"),
        ErrorKind::UnknownProgram,
    );
}

#[test]
fn escaping_symlink_exits_refused() {
    let up = cache();
    assert_fails_leaving_nothing(
        &mut extract_from(&up.url(), paths::LINKS, "bin/escape"),
        ErrorKind::Refused,
    );
}

#[test]
fn nix_store_script_exits_refused_unless_allowed() {
    let up = cache();
    assert_fails_leaving_nothing(
        &mut extract_from(&up.url(), paths::SCRIPTS, "bin/store-script"),
        ErrorKind::Refused,
    );
    let dir = tempdir();
    let out_file = dir.path().join("store-script");
    let out = run(extract_from(&up.url(), paths::SCRIPTS, "bin/store-script")
        .arg("--allow-nix-store-deps")
        .arg("-o")
        .arg(&out_file));
    assert_success(&out);
    assert_eq!(dir_entries(dir.path()), ["store-script"]);
}

#[test]
fn corrupt_nar_exits_verification_failed() {
    let up = FakeUpstream::serve(support::cache_dir("cache-none"));
    let nar = fixture_nar_path("cache-none", paths::HELLO);
    up.set_fault(&nar, Fault::FlipByte(5000));
    assert_fails_leaving_nothing(
        &mut extract_from(&up.url(), paths::HELLO, "bin/hello"),
        ErrorKind::VerificationFailed,
    );
}

#[test]
fn narinfo_signed_by_an_untrusted_key_exits_verification_failed() {
    let up = cache();
    // No --trusted-public-key: only cache.nixos.org's key is trusted.
    assert_fails_leaving_nothing(
        binplz()
            .args(["extract", "--upstream", &up.url()])
            .args([paths::HELLO, "bin/hello"]),
        ErrorKind::VerificationFailed,
    );
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::HELLO)), 0);
}

#[test]
fn upstream_answering_wrongly_exits_upstream_broken() {
    let up = cache();
    up.set_fault(&narinfo_path(paths::HELLO), Fault::status(400));
    assert_fails_leaving_nothing(
        &mut extract_from(&up.url(), paths::HELLO, "bin/hello"),
        ErrorKind::UpstreamBroken,
    );
}

#[test]
fn narinfo_that_never_comes_exits_timed_out_at_the_narinfo_deadline() {
    let up = cache();
    up.set_fault(&narinfo_path(paths::HELLO), Fault::NoAnswer);
    let line = assert_fails_leaving_nothing(
        extract_from(&up.url(), paths::HELLO, "bin/hello")
            .args(["--upstream-narinfo-timeout", "300ms"]),
        ErrorKind::TimedOut,
    );
    assert!(
        line.contains("narinfo was not fetched within 300ms"),
        "{line}"
    );
}

#[test]
fn nar_dripping_under_the_minimum_rate_exits_timed_out() {
    let up = cache();
    up.set_fault(
        &fixture_nar_path("cache", paths::HELLO),
        Fault::Drip {
            bytes: 1,
            every: std::time::Duration::from_millis(50),
        },
    );
    let line = assert_fails_leaving_nothing(
        extract_from(&up.url(), paths::HELLO, "bin/hello").args([
            "--upstream-min-rate",
            "1K",
            "--upstream-rate-window",
            "200ms",
        ]),
        ErrorKind::TimedOut,
    );
    assert!(line.contains("under the minimum of 1024 bytes/s"), "{line}");
}

#[rstest]
#[case::zero_rate(&["--upstream-min-rate", "0"])]
#[case::zero_window(&["--upstream-rate-window", "0s"])]
#[case::zero_narinfo_timeout(&["--upstream-narinfo-timeout", "0ms"])]
#[case::no_unit(&["--upstream-nar-timeout", "1h"])]
fn unusable_upstream_deadlines_are_refused_before_any_request(#[case] args: &[&str]) {
    let up = cache();
    let out = run(extract_from(&up.url(), paths::HELLO, "bin/hello").args(args));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(up.total_hits(), 0);
}

#[rstest]
#[case::not_a_store_path("hello")]
#[case::path_inside_a_store_path("/nix/store/ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d-hello-1.0/bin")]
#[case::bad_hash("/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-hello-1.0")]
fn invalid_store_path_exits_bad_request_before_any_request(#[case] store_path: &str) {
    let up = cache();
    assert_fails_leaving_nothing(
        &mut extract_from(&up.url(), store_path, "bin/hello"),
        ErrorKind::BadRequest,
    );
    assert_eq!(up.total_hits(), 0);
}

#[test]
fn failed_extraction_leaves_an_existing_output_untouched() {
    let up = cache();
    up.set_fault(&narinfo_path(paths::HELLO), Fault::NotFound);
    let dir = tempdir();
    let out_file = dir.path().join("hello");
    std::fs::write(&out_file, b"previous contents").expect("writing the old output");
    let out = run(extract_from(&up.url(), paths::HELLO, "bin/hello")
        .arg("-o")
        .arg(&out_file));
    assert_failure(&out, ErrorKind::NotInCache);
    assert_eq!(
        std::fs::read(&out_file).expect("reading the old output"),
        b"previous contents"
    );
    assert_eq!(dir_entries(dir.path()), ["hello"]);
}
