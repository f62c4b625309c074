//! The extractor against a fake binary cache: every fixture package's edge cases, every
//! codec, and every way an upstream can fail or lie. Each failure must end in the right
//! error kind and leave nothing behind in the temp directory.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use binplz::error::ErrorKind;
use binplz::extract::{ExtractError, Extracted, Extractor};
use binplz::nar::writer::{write_nar, Entry};
use binplz::narinfo::{NarInfoError, Trust};
use binplz::pipeline::PipelineError;
use binplz::resolve::{RelPath, ResolveError};
use binplz::upstream::{self, Cache, ClientConfig, Deadlines, UpstreamError};
use binplz::verdict::Linkage;
use rstest::rstest;
use tempfile::TempDir;

use crate::support::{
    self, assert_dir_empty, dir_entries, fixture_nar, fixture_nar_path, fixture_narinfo,
    narinfo_field, narinfo_path, paths, prebuilt, remove_field, set_field, FakeUpstream, Fault,
    Key,
};

/// Further attempts after a 5xx in these tests (the default is 3, with longer backoff).
const RETRIES: u32 = 2;

/// Short timeouts and backoff, so fault tests stay fast. The first-byte timeout is never
/// what a test waits for, so it keeps a margin for a loaded machine.
fn client_config() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(2),
        first_byte_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_millis(300),
        retries: RETRIES,
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(10),
    }
}

fn trust() -> Trust {
    Trust::new(&[Key::test().public()], true).expect("the test key parses")
}

fn extractor_for_urls(urls: &[String], trust: Trust, allow_store_deps: bool) -> Extractor {
    let caches = urls
        .iter()
        .map(|url| {
            upstream::open(url, &client_config())
                .map(Cache::new)
                .unwrap_or_else(|e| panic!("{url}: {e}"))
        })
        .collect();
    Extractor::new(caches, trust, allow_store_deps)
}

fn extractor_with(upstreams: &[&FakeUpstream], trust: Trust, allow_store_deps: bool) -> Extractor {
    let urls: Vec<String> = upstreams.iter().map(|up| up.url()).collect();
    extractor_for_urls(&urls, trust, allow_store_deps)
}

fn extractor(upstreams: &[&FakeUpstream]) -> Extractor {
    extractor_with(upstreams, trust(), false)
}

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

async fn extract(
    ex: &Extractor,
    store_path: &str,
    path: &str,
    dir: &Path,
) -> Result<Extracted, ExtractError> {
    ex.extract(
        &support::store_path(store_path),
        &RelPath::parse(path.as_bytes()),
        dir,
    )
    .await
}

/// Extracts and expects success.
async fn extract_ok(ex: &Extractor, store_path: &str, path: &str, dir: &Path) -> Extracted {
    match extract(ex, store_path, path, dir).await {
        Ok(x) => x,
        Err(e) => panic!("extracting {store_path} {path}: {e} ({e:?})"),
    }
}

/// Extracts and expects an error of `kind`; the temp dir must be left empty.
async fn extract_err(
    ex: &Extractor,
    store_path: &str,
    path: &str,
    kind: ErrorKind,
) -> ExtractError {
    let dir = tempdir();
    let err = match extract(ex, store_path, path, dir.path()).await {
        Ok(x) => panic!("extracting {store_path} {path} succeeded: {x:?}"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), kind, "{err} ({err:?})");
    assert_dir_empty(dir.path());
    err
}

fn contents(x: &Extracted) -> Vec<u8> {
    std::fs::read(x.file.path()).expect("reading the extracted file")
}

#[track_caller]
fn assert_is_prebuilt(x: &Extracted, name: &str) {
    let want = prebuilt(name);
    assert_eq!(contents(x), want, "{} is not prebuilt/{name}", x.path);
    assert_eq!(x.sha256().expect("hashing"), support::sha256(&want));
    assert_eq!(x.size, want.len() as u64);
    assert!(x.executable, "{} is not executable", x.path);
}

/// The narinfo of `store_path` in `up`, as it would be served.
fn served_narinfo(up: &FakeUpstream, store_path: &str) -> String {
    let bytes = up
        .contents(&narinfo_path(store_path))
        .unwrap_or_else(|| panic!("{store_path} has no narinfo"));
    String::from_utf8(bytes.to_vec()).expect("narinfos are text")
}

/// Serves `narinfo` in place of `store_path`'s.
fn override_narinfo(up: &FakeUpstream, store_path: &str, narinfo: String) {
    up.set_fault(&narinfo_path(store_path), Fault::override_with(narinfo));
}

/// The zstd cache with all packages.
fn cache() -> FakeUpstream {
    FakeUpstream::serve(support::cache_dir("cache"))
}

// ─── Every codec ────────────────────────────────────────────────────────────────────────

#[rstest]
#[case::zstd("cache")]
#[case::xz("cache-xz")]
#[case::bzip2("cache-bzip2")]
#[case::none("cache-none")]
#[case::brotli("cache-br")]
#[case::gzip("cache-gzip")]
#[tokio::test]
async fn extracts_hello_verified_from_every_codec(#[case] cache: &str) {
    let up = FakeUpstream::serve(support::cache_dir(cache));
    let dir = tempdir();
    let x = extract_ok(&extractor(&[&up]), paths::HELLO, "bin/hello", dir.path()).await;
    assert_is_prebuilt(&x, "hello");
    assert_eq!(x.linkage, Linkage::Static);
    assert_eq!(x.path.to_string(), "bin/hello");
    assert_eq!(x.store_path, Some(support::store_path(paths::HELLO)));
    assert_eq!(up.hits(&narinfo_path(paths::HELLO)), 1);
    assert_eq!(up.hits(&fixture_nar_path(cache, paths::HELLO)), 1);
    // The file waits in the temp dir, under a temp name, until the caller moves it.
    let left = dir_entries(dir.path());
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].starts_with(".binplz-") && left[0].ends_with(".tmp"));
    drop(x);
    assert_dir_empty(dir.path());
}

#[tokio::test]
async fn missing_compression_field_means_bzip2() {
    let up = FakeUpstream::serve(support::cache_dir("cache-bzip2"));
    let narinfo = remove_field(&fixture_narinfo("cache-bzip2", paths::HELLO), "Compression");
    override_narinfo(&up, paths::HELLO, narinfo);
    let dir = tempdir();
    let x = extract_ok(&extractor(&[&up]), paths::HELLO, "bin/hello", dir.path()).await;
    assert_is_prebuilt(&x, "hello");
}

// ─── The fixture packages' edge cases ──────────────────────────────────────────────────

/// `passes`: a link met before its target needs one pass; a target met first (`hello`
/// sorts before `hello-rel`) needs a second, verified again.
#[rstest]
#[case::plain("bin/hello", "bin/hello", 1)]
#[case::relative_link_after_its_target("bin/hello-rel", "bin/hello", 2)]
#[case::upward_link("bin/hello-up", "libexec/real-hello", 1)]
#[case::through_a_directory_link("bin/dir-link/real-hello", "libexec/real-hello", 1)]
#[tokio::test]
async fn follows_symlinks_inside_the_store_path(
    #[case] path: &str,
    #[case] found: &str,
    #[case] passes: u64,
) {
    let up = cache();
    let dir = tempdir();
    let x = extract_ok(&extractor(&[&up]), paths::LINKS, path, dir.path()).await;
    assert_is_prebuilt(&x, "hello");
    assert_eq!(x.path.to_string(), found);
    assert_eq!(x.store_path, Some(support::store_path(paths::LINKS)));
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::LINKS)), passes);
    assert_eq!(up.hits(&narinfo_path(paths::HELLO)), 0);
}

#[tokio::test]
async fn link_into_a_signed_reference_fetches_and_verifies_that_path_too() {
    let up = cache();
    let dir = tempdir();
    let x = extract_ok(
        &extractor(&[&up]),
        paths::LINKS,
        "bin/hello-abs",
        dir.path(),
    )
    .await;
    assert_is_prebuilt(&x, "hello");
    assert_eq!(x.store_path, Some(support::store_path(paths::HELLO)));
    assert_eq!(x.path.to_string(), "bin/hello");
    assert_eq!(up.hits(&narinfo_path(paths::LINKS)), 1);
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::LINKS)), 1);
    assert_eq!(up.hits(&narinfo_path(paths::HELLO)), 1);
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::HELLO)), 1);
}

#[tokio::test]
async fn link_into_a_reference_is_refused_when_that_path_fails_verification() {
    let up = cache();
    // hello's NAR is corrupt: the link from `links` must not paper over it.
    up.set_fault(
        &fixture_nar_path("cache", paths::HELLO),
        Fault::Override(fixture_nar("cache-xz", paths::HELLO).into()),
    );
    extract_err(
        &extractor(&[&up]),
        paths::LINKS,
        "bin/hello-abs",
        ErrorKind::VerificationFailed,
    )
    .await;
}

#[tokio::test]
async fn link_escaping_the_store_path_is_refused() {
    let up = cache();
    let err = extract_err(
        &extractor(&[&up]),
        paths::LINKS,
        "bin/escape",
        ErrorKind::Refused,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::Resolve {
                err: ResolveError::Escapes { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn absolute_link_outside_the_store_is_refused() {
    let up = cache();
    let err = extract_err(
        &extractor(&[&up]),
        paths::LINKS,
        "bin/etc-passwd",
        ErrorKind::Refused,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::Resolve {
                err: ResolveError::OutsideStore { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn symlink_loop_is_refused() {
    let up = cache();
    let err = extract_err(
        &extractor(&[&up]),
        paths::LINKS,
        "bin/loop-a",
        ErrorKind::Refused,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::Resolve {
                err: ResolveError::Loop { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn dangling_link_is_an_unknown_program() {
    let up = cache();
    let err = extract_err(
        &extractor(&[&up]),
        paths::LINKS,
        "bin/dangling",
        ErrorKind::UnknownProgram,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::Resolve {
                err: ResolveError::NotFound { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn link_into_a_store_path_that_is_not_a_reference_is_refused_unfetched() {
    let up = cache();
    let err = extract_err(
        &extractor(&[&up]),
        paths::LINKS,
        "bin/unref",
        ErrorKind::Refused,
    )
    .await;
    assert!(matches!(err, ExtractError::NotAReference { .. }), "{err:?}");
    assert_eq!(up.hits("00000000000000000000000000000000.narinfo"), 0);
}

#[rstest]
#[case::link_to_a_directory(paths::LINKS, "bin/dir-link")]
#[case::directory(paths::LINKS, "bin")]
#[case::missing(paths::LINKS, "bin/nope")]
#[case::below_a_file(paths::LINKS, "bin/hello/x")]
#[case::program_in_the_other_output(paths::MULTI_OUT, "bin/multi-tool")]
#[tokio::test]
async fn path_that_is_not_a_file_is_an_unknown_program(
    #[case] store_path: &str,
    #[case] path: &str,
) {
    let up = cache();
    let err = extract_err(
        &extractor(&[&up]),
        store_path,
        path,
        ErrorKind::UnknownProgram,
    )
    .await;
    assert!(matches!(err, ExtractError::Resolve { .. }), "{err:?}");
}

#[tokio::test]
async fn symlinked_bin_directory_is_followed() {
    let up = cache();
    let dir = tempdir();
    let x = extract_ok(
        &extractor(&[&up]),
        paths::BINLINK,
        "bin/binlink-tool",
        dir.path(),
    )
    .await;
    assert_is_prebuilt(&x, "binlink-tool");
    assert_eq!(x.path.to_string(), "libexec/binlink-tool");
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::BINLINK)), 1);
}

#[tokio::test]
async fn program_of_a_multi_output_package_comes_from_its_bin_output() {
    let up = cache();
    let dir = tempdir();
    let x = extract_ok(
        &extractor(&[&up]),
        paths::MULTI_BIN,
        "bin/multi-tool",
        dir.path(),
    )
    .await;
    assert_is_prebuilt(&x, "multi-tool");
    assert_eq!(x.linkage, Linkage::Static);
}

#[tokio::test]
async fn non_executable_file_is_extracted_as_not_executable() {
    let up = cache();
    let dir = tempdir();
    let ex = extractor(&[&up]);
    let x = extract_ok(&ex, paths::NONEXEC, "bin/readme", dir.path()).await;
    assert!(!x.executable);
    assert_eq!(x.linkage, Linkage::Other);
    assert_eq!(x.size, contents(&x).len() as u64);
    let hello = extract_ok(&ex, paths::NONEXEC, "bin/hello", dir.path()).await;
    assert_is_prebuilt(&hello, "hello");
}

#[tokio::test]
async fn script_for_a_nix_store_interpreter_is_refused() {
    let up = cache();
    let err = extract_err(
        &extractor(&[&up]),
        paths::SCRIPTS,
        "bin/store-script",
        ErrorKind::Refused,
    )
    .await;
    let ExtractError::NeedsNixStore { linkage, .. } = err else {
        panic!("{err:?}");
    };
    assert_eq!(
        *linkage,
        Linkage::Script {
            interpreter: format!("{}/sh", paths::BUSYBOX)
        }
    );
}

#[tokio::test]
async fn script_for_a_nix_store_interpreter_is_extracted_when_allowed() {
    let up = cache();
    let dir = tempdir();
    let ex = extractor_with(&[&up], trust(), true);
    let x = extract_ok(&ex, paths::SCRIPTS, "bin/store-script", dir.path()).await;
    assert_eq!(
        x.linkage,
        Linkage::Script {
            interpreter: format!("{}/sh", paths::BUSYBOX)
        }
    );
    assert!(contents(&x).starts_with(format!("#!{}/sh", paths::BUSYBOX).as_bytes()));
}

#[tokio::test]
async fn portable_script_is_extracted() {
    let up = cache();
    let dir = tempdir();
    let x = extract_ok(
        &extractor(&[&up]),
        paths::SCRIPTS,
        "bin/portable-script",
        dir.path(),
    )
    .await;
    assert_eq!(
        x.linkage,
        Linkage::Script {
            interpreter: "/bin/sh".into()
        }
    );
    assert!(x.executable);
}

#[tokio::test]
async fn dynamic_program_with_a_nix_store_interpreter_is_refused() {
    let up = cache();
    let err = extract_err(
        &extractor(&[&up]),
        paths::DYNAMIC,
        "bin/dyn-store",
        ErrorKind::Refused,
    )
    .await;
    assert!(matches!(err, ExtractError::NeedsNixStore { .. }), "{err:?}");
}

#[tokio::test]
async fn dynamic_program_with_a_nix_store_interpreter_is_extracted_when_allowed() {
    let up = cache();
    let dir = tempdir();
    let ex = extractor_with(&[&up], trust(), true);
    let x = extract_ok(&ex, paths::DYNAMIC, "bin/dyn-store", dir.path()).await;
    assert_is_prebuilt(&x, "dyn-store");
    let Linkage::Dynamic { interpreter, .. } = &x.linkage else {
        panic!("{:?}", x.linkage);
    };
    assert_eq!(interpreter.as_deref(), Some(paths::FAKE_INTERPRETER));
}

#[tokio::test]
async fn dynamic_program_with_a_system_interpreter_is_extracted_as_dynamic() {
    let up = cache();
    let dir = tempdir();
    let x = extract_ok(&extractor(&[&up]), paths::DYNAMIC, "bin/dyn", dir.path()).await;
    assert_is_prebuilt(&x, "dyn");
    assert_eq!(x.linkage.kind(), "dynamic");
    let Linkage::Dynamic { interpreter, .. } = &x.linkage else {
        panic!("{:?}", x.linkage);
    };
    assert_eq!(interpreter.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
}

#[tokio::test]
async fn store_path_in_no_cache_is_not_in_cache() {
    let up = cache();
    let err = extract_err(
        &extractor(&[&up]),
        paths::NOTBUILT,
        "bin/notbuilt",
        ErrorKind::NotInCache,
    )
    .await;
    assert!(matches!(err, ExtractError::NotInCache { .. }), "{err:?}");
}

// ─── Synthetic store paths ─────────────────────────────────────────────────────────────

#[tokio::test]
async fn file_before_the_symlink_that_leads_to_it_takes_a_second_verified_pass() {
    let up = FakeUpstream::empty();
    // "a-tool" sorts before "bin", so the NAR holds the file before the link to it.
    let published = support::publish_tree(
        &up,
        "second-pass-1.0",
        &Entry::dir([
            ("a-tool", Entry::executable(prebuilt("hello"))),
            ("bin", Entry::dir([("tool", Entry::symlink("../a-tool"))])),
        ]),
    );
    let dir = tempdir();
    let x = extract_ok(
        &extractor(&[&up]),
        &published.store_path,
        "bin/tool",
        dir.path(),
    )
    .await;
    assert_is_prebuilt(&x, "hello");
    assert_eq!(x.path.to_string(), "a-tool");
    assert_eq!(up.hits(&published.nar_path), 2);
    assert_eq!(up.hits(&narinfo_path(&published.store_path)), 1);
    drop(x);
    assert_dir_empty(dir.path());
}

#[tokio::test]
async fn second_pass_is_verified_again() {
    let up = FakeUpstream::empty();
    let published = support::publish_tree(
        &up,
        "second-pass-corrupt-1.0",
        &Entry::dir([
            ("a-tool", Entry::executable(prebuilt("hello"))),
            ("bin", Entry::dir([("tool", Entry::symlink("../a-tool"))])),
        ]),
    );
    // The first pass is clean; the second gets a flipped byte in the middle.
    let len = up.contents(&published.nar_path).expect("published").len();
    up.set_fault_after(&published.nar_path, 1, Fault::FlipByte(len / 2));
    let dir = tempdir();
    let err = extract(
        &extractor(&[&up]),
        &published.store_path,
        "bin/tool",
        dir.path(),
    )
    .await
    .expect_err("the second pass is corrupt");
    assert_eq!(err.kind(), ErrorKind::VerificationFailed, "{err}");
    assert_eq!(up.hits(&published.nar_path), 2);
    assert_dir_empty(dir.path());
}

#[tokio::test]
async fn decompression_bomb_is_refused_after_narsize_bytes() {
    let up = FakeUpstream::empty();
    let nar = write_nar(&Entry::dir([(
        "bin",
        Entry::dir([("tool", Entry::executable(b"#!/bin/sh\necho hi\n".to_vec()))]),
    )]));
    // The real NAR, then 1 GiB of zeros: 1024 copies of one zstd frame of 1 MiB, which the
    // decoder reads as one stream. Decoding and hashing all of it would take minutes in a
    // debug build; the decoder is capped at NarSize + 1 bytes.
    let mut file = zstd::stream::encode_all(nar.as_slice(), 3).expect("zstd");
    let zeros = zstd::stream::encode_all(&vec![0u8; 1 << 20][..], 3).expect("zstd");
    for _ in 0..1024 {
        file.extend_from_slice(&zeros);
    }
    assert!(file.len() < 1 << 20, "the bomb itself is small");
    let published = support::publish_bytes(&up, "bomb-1.0", &nar, &file, "zstd", false);
    let err = extract_err(
        &extractor(&[&up]),
        &published.store_path,
        "bin/tool",
        ErrorKind::VerificationFailed,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::Pipeline {
                err: PipelineError::TooLong { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn store_path_that_is_a_single_file_is_extracted_with_an_empty_path() {
    let up = FakeUpstream::empty();
    let published =
        support::publish_tree(&up, "single-file", &Entry::executable(prebuilt("hello")));
    let dir = tempdir();
    let x = extract_ok(&extractor(&[&up]), &published.store_path, "", dir.path()).await;
    assert_is_prebuilt(&x, "hello");
    assert_eq!(x.path.to_string(), "");
}

#[tokio::test]
async fn chain_of_too_many_symlinks_is_refused() {
    let up = FakeUpstream::empty();
    // bin/l0 -> l1 -> … -> l19 -> ../tool: more hops than any real bin/ needs.
    let mut bin: Vec<(String, Entry)> = (0..20)
        .map(|i| (format!("l{i:02}"), Entry::symlink(format!("l{:02}", i + 1))))
        .collect();
    bin.push(("l20".into(), Entry::symlink("../tool")));
    let published = support::publish_tree(
        &up,
        "long-chain-1.0",
        &Entry::dir([
            ("bin", Entry::dir(bin)),
            ("tool", Entry::executable(prebuilt("hello"))),
        ]),
    );
    let err = extract_err(
        &extractor(&[&up]),
        &published.store_path,
        "bin/l00",
        ErrorKind::Refused,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::Resolve {
                err: ResolveError::TooManyHops,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn validly_signed_but_malformed_nar_fails_verification() {
    let up = FakeUpstream::empty();
    // Entries out of order: Nix never writes this, and a strict reader refuses it even
    // though the narinfo's NarHash and signature match these very bytes.
    let unsorted = Entry::Directory(vec![(
        b"bin".to_vec(),
        Entry::Directory(vec![
            (b"b".to_vec(), Entry::executable(prebuilt("hello"))),
            (b"a".to_vec(), Entry::executable(prebuilt("hello"))),
        ]),
    )]);
    let published = support::publish_tree(&up, "unsorted-1.0", &unsorted);
    let err = extract_err(
        &extractor(&[&up]),
        &published.store_path,
        "bin/a",
        ErrorKind::VerificationFailed,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::Pipeline {
                err: PipelineError::Nar(_),
                ..
            }
        ),
        "{err:?}"
    );
}

// ─── Where the narinfo comes from ──────────────────────────────────────────────────────

#[tokio::test]
async fn narinfo_missing_in_the_first_upstream_is_taken_from_the_second() {
    let first = FakeUpstream::serve(support::cache_dir("cache-xz"));
    let second = cache();
    first.set_fault(&narinfo_path(paths::HELLO), Fault::NotFound);
    let dir = tempdir();
    let x = extract_ok(
        &extractor(&[&first, &second]),
        paths::HELLO,
        "bin/hello",
        dir.path(),
    )
    .await;
    assert_is_prebuilt(&x, "hello");
    assert_eq!(first.hits(&narinfo_path(paths::HELLO)), 1);
    assert_eq!(second.hits(&narinfo_path(paths::HELLO)), 1);
    assert_eq!(first.hits(&fixture_nar_path("cache-xz", paths::HELLO)), 0);
    assert_eq!(second.hits(&fixture_nar_path("cache", paths::HELLO)), 1);
}

#[tokio::test]
async fn failing_first_upstream_falls_through_and_is_skipped_while_it_stays_down() {
    let first = cache();
    let second = cache();
    first.set_fault(&narinfo_path(paths::HELLO), Fault::status(500));
    let ex = extractor(&[&first, &second]);
    let dir = tempdir();
    let x = extract_ok(&ex, paths::HELLO, "bin/hello", dir.path()).await;
    assert_is_prebuilt(&x, "hello");
    assert!(first.hits(&narinfo_path(paths::HELLO)) >= 1);
    // The next request does not ask the failed cache at all.
    let before = first.total_hits();
    extract_ok(&ex, paths::GOODBYE, "bin/goodbye", dir.path()).await;
    assert_eq!(first.total_hits(), before);
    assert_eq!(second.hits(&narinfo_path(paths::GOODBYE)), 1);
}

#[tokio::test]
async fn a_path_the_answering_caches_lack_is_asked_of_a_down_cache_before_not_in_cache() {
    let first = cache();
    let second = cache();
    first.set_fault(&narinfo_path(paths::HELLO), Fault::status(500));
    let ex = extractor(&[&first, &second]);
    let dir = tempdir();
    extract_ok(&ex, paths::HELLO, "bin/hello", dir.path()).await;
    // `first` is down now. `second` lacks goodbye: the answer is `first`'s failure, not
    // "not in any cache", which the server would remember as if every cache had said so.
    first.set_fault(&narinfo_path(paths::GOODBYE), Fault::status(500));
    second.set_fault(&narinfo_path(paths::GOODBYE), Fault::NotFound);
    let err = extract_err(
        &ex,
        paths::GOODBYE,
        "bin/goodbye",
        ErrorKind::UpstreamBroken,
    )
    .await;
    assert!(matches!(err, ExtractError::Upstream(_)), "{err:?}");
    assert_eq!(second.hits(&narinfo_path(paths::GOODBYE)), 1);
    assert!(
        first.hits(&narinfo_path(paths::GOODBYE)) >= 1,
        "the down cache was asked"
    );
    // Back up and holding it: served from there, while it is still marked down.
    first.clear_fault(&narinfo_path(paths::GOODBYE));
    let x = extract_ok(&ex, paths::GOODBYE, "bin/goodbye", dir.path()).await;
    assert_is_prebuilt(&x, "goodbye");
    assert_eq!(second.hits(&narinfo_path(paths::GOODBYE)), 2, "asked first");
}

#[tokio::test]
async fn first_upstream_that_has_the_narinfo_wins() {
    let first = FakeUpstream::serve(support::cache_dir("cache-xz"));
    let second = cache();
    let dir = tempdir();
    extract_ok(
        &extractor(&[&first, &second]),
        paths::HELLO,
        "bin/hello",
        dir.path(),
    )
    .await;
    assert_eq!(first.hits(&fixture_nar_path("cache-xz", paths::HELLO)), 1);
    assert_eq!(second.total_hits(), 0);
}

#[tokio::test]
async fn narinfo_missing_everywhere_is_not_in_cache() {
    let first = cache();
    let second = FakeUpstream::serve(support::cache_dir("cache-none"));
    first.set_fault(&narinfo_path(paths::HELLO), Fault::NotFound);
    second.set_fault(&narinfo_path(paths::HELLO), Fault::status(404));
    let err = extract_err(
        &extractor(&[&first, &second]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::NotInCache,
    )
    .await;
    assert!(matches!(err, ExtractError::NotInCache { .. }), "{err:?}");
    assert_eq!(
        first.hits(&narinfo_path(paths::HELLO)),
        1,
        "404 is not retried"
    );
    assert_eq!(
        second.hits(&narinfo_path(paths::HELLO)),
        1,
        "404 is not retried"
    );
}

#[tokio::test]
async fn forbidden_narinfo_counts_as_missing() {
    let up = cache();
    up.set_fault(&narinfo_path(paths::HELLO), Fault::status(403));
    extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::NotInCache,
    )
    .await;
    assert_eq!(up.hits(&narinfo_path(paths::HELLO)), 1);
}

#[tokio::test]
async fn nar_missing_while_its_narinfo_exists_is_an_upstream_error() {
    let up = cache();
    up.set_fault(&fixture_nar_path("cache", paths::HELLO), Fault::NotFound);
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::UpstreamBroken,
    )
    .await;
    assert!(matches!(err, ExtractError::NarMissing { .. }), "{err:?}");
}

#[tokio::test]
async fn cache_without_nix_cache_info_is_accepted() {
    let up = cache();
    up.set_fault("nix-cache-info", Fault::NotFound);
    let dir = tempdir();
    let x = extract_ok(&extractor(&[&up]), paths::HELLO, "bin/hello", dir.path()).await;
    assert_is_prebuilt(&x, "hello");
}

#[tokio::test]
async fn nix_cache_info_is_read_once_per_cache() {
    let up = cache();
    let dir = tempdir();
    let ex = extractor(&[&up]);
    extract_ok(&ex, paths::HELLO, "bin/hello", dir.path()).await;
    extract_ok(&ex, paths::GOODBYE, "bin/goodbye", dir.path()).await;
    assert_eq!(up.hits("nix-cache-info"), 1);
}

#[tokio::test]
async fn cache_for_another_store_dir_is_refused_before_any_narinfo() {
    let up = cache();
    up.set_fault(
        "nix-cache-info",
        Fault::override_with("StoreDir: /gnu/store\n"),
    );
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::UpstreamBroken,
    )
    .await;
    assert!(
        matches!(err, ExtractError::Upstream(UpstreamError::StoreDir { .. })),
        "{err:?}"
    );
    assert_eq!(up.hits(&narinfo_path(paths::HELLO)), 0);
}

#[tokio::test]
async fn oversized_narinfo_is_refused() {
    let up = cache();
    let narinfo = fixture_narinfo("cache", paths::HELLO);
    let huge = format!("{narinfo}X-Padding: {}\n", "a".repeat(64 << 10));
    override_narinfo(&up, paths::HELLO, huge);
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::UpstreamBroken,
    )
    .await;
    assert!(
        matches!(err, ExtractError::Upstream(UpstreamError::TooLarge { .. })),
        "{err:?}"
    );
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::HELLO)), 0);
}

// ─── Transport faults ──────────────────────────────────────────────────────────────────

#[tokio::test]
async fn narinfo_500_then_ok_is_retried() {
    let up = cache();
    up.set_fault(
        &narinfo_path(paths::HELLO),
        Fault::status_first(500, 1).with_retry_after(0),
    );
    let dir = tempdir();
    let x = extract_ok(&extractor(&[&up]), paths::HELLO, "bin/hello", dir.path()).await;
    assert_is_prebuilt(&x, "hello");
    assert_eq!(up.hits(&narinfo_path(paths::HELLO)), 2);
}

#[tokio::test]
async fn nar_503_then_ok_is_retried() {
    let up = cache();
    let nar = fixture_nar_path("cache", paths::HELLO);
    up.set_fault(&nar, Fault::status_first(503, 2));
    let dir = tempdir();
    let x = extract_ok(&extractor(&[&up]), paths::HELLO, "bin/hello", dir.path()).await;
    assert_is_prebuilt(&x, "hello");
    assert_eq!(up.hits(&nar), 3);
}

#[tokio::test]
async fn narinfo_500_forever_is_an_upstream_error_after_the_retries() {
    let up = cache();
    up.set_fault(&narinfo_path(paths::HELLO), Fault::status(500));
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::UpstreamBroken,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::Upstream(UpstreamError::Status { status: 500, .. })
        ),
        "{err:?}"
    );
    assert_eq!(up.hits(&narinfo_path(paths::HELLO)), u64::from(RETRIES) + 1);
}

#[tokio::test]
async fn other_client_errors_are_not_retried() {
    let up = cache();
    up.set_fault(&narinfo_path(paths::HELLO), Fault::status(400));
    extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::UpstreamBroken,
    )
    .await;
    assert_eq!(up.hits(&narinfo_path(paths::HELLO)), 1);
}

#[tokio::test]
async fn connection_reset_mid_nar_is_an_upstream_error() {
    let up = cache();
    let nar = fixture_nar_path("cache", paths::HELLO);
    up.set_fault(&nar, Fault::ResetAfter(1000));
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::UpstreamBroken,
    )
    .await;
    assert!(
        matches!(err, ExtractError::Upstream(UpstreamError::Body { .. })),
        "{err:?}"
    );
    assert_eq!(up.hits(&nar), 1);
}

#[tokio::test]
async fn nar_stalling_after_its_headers_times_out() {
    let up = cache();
    let nar = fixture_nar_path("cache", paths::HELLO);
    up.set_fault(&nar, Fault::StallAfterHeaders);
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::TimedOut,
    )
    .await;
    assert!(
        matches!(err, ExtractError::Upstream(UpstreamError::Timeout { .. })),
        "{err:?}"
    );
}

#[tokio::test]
async fn unreachable_upstream_is_an_upstream_error() {
    // A port that was free a moment ago: connections to it are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let ex = extractor_for_urls(&[format!("http://127.0.0.1:{port}")], trust(), false);
    let dir = tempdir();
    let err = extract(&ex, paths::HELLO, "bin/hello", dir.path())
        .await
        .expect_err("nothing listens there");
    assert_eq!(err.kind(), ErrorKind::UpstreamBroken, "{err}");
    assert!(
        matches!(err, ExtractError::Upstream(UpstreamError::Connect { .. })),
        "{err:?}"
    );
    assert_dir_empty(dir.path());
}

#[tokio::test]
async fn narinfo_stalling_after_its_headers_times_out() {
    let up = cache();
    up.set_fault(&narinfo_path(paths::HELLO), Fault::StallAfterHeaders);
    extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::TimedOut,
    )
    .await;
}

/// Transport timeouts far longer than any test waits, so only the deadlines can end a
/// fetch: what these tests show.
fn patient_config() -> ClientConfig {
    ClientConfig {
        first_byte_timeout: Duration::from_secs(600),
        read_timeout: Duration::from_secs(600),
        ..client_config()
    }
}

/// A narinfo deadline of 300 ms, a NAR deadline of 300 ms plus NarSize at `min_rate`
/// bytes per second, which a NAR body must keep over each 200 ms.
fn short_deadlines(min_rate: u64) -> Deadlines {
    Deadlines::new(
        Duration::from_millis(300),
        min_rate,
        Duration::from_millis(200),
        Duration::from_millis(300),
    )
    .expect("valid deadlines")
}

fn extractor_with_deadlines(up: &FakeUpstream, deadlines: Deadlines) -> Extractor {
    let cache = upstream::open(&up.url(), &patient_config())
        .map(|u| Cache::with_deadlines(u, deadlines))
        .expect("the fake upstream's URL opens");
    Extractor::new(vec![cache], trust(), false)
}

/// Fails the test instead of hanging it when a fetch is never ended.
async fn within_a_while<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("the fetch was never ended")
}

/// The upstream error that ends extracting `bin/hello` with `ex` as timed out.
async fn hello_times_out(ex: &Extractor) -> UpstreamError {
    let fut = extract_err(ex, paths::HELLO, "bin/hello", ErrorKind::TimedOut);
    match within_a_while(fut).await {
        ExtractError::Upstream(e) => e,
        other => panic!("not an upstream error: {other:?}"),
    }
}

#[tokio::test]
async fn narinfo_that_never_answers_ends_at_the_narinfo_deadline() {
    let up = cache();
    up.set_fault(&narinfo_path(paths::HELLO), Fault::NoAnswer);
    let ex = extractor_with_deadlines(&up, short_deadlines(1));
    let err = hello_times_out(&ex).await;
    assert!(
        matches!(
            err,
            UpstreamError::Deadline {
                what: "narinfo",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn narinfo_retries_end_at_the_narinfo_deadline() {
    let up = cache();
    up.set_fault(&narinfo_path(paths::HELLO), Fault::status(503));
    // Retries alone would go on for minutes.
    let config = ClientConfig {
        retries: 10_000,
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(20),
        ..patient_config()
    };
    let cache = upstream::open(&up.url(), &config)
        .map(|u| Cache::with_deadlines(u, short_deadlines(1)))
        .expect("the fake upstream's URL opens");
    let ex = Extractor::new(vec![cache], trust(), false);
    let err = hello_times_out(&ex).await;
    assert!(
        matches!(
            err,
            UpstreamError::Deadline {
                what: "narinfo",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        up.hits(&narinfo_path(paths::HELLO)) > 1,
        "no retry was made"
    );
}

#[tokio::test]
async fn nar_that_never_answers_ends_at_the_nar_deadline() {
    let up = cache();
    up.set_fault(&fixture_nar_path("cache", paths::HELLO), Fault::NoAnswer);
    // NarSize at a byte a second would be minutes: a rate this high leaves the base alone.
    let ex = extractor_with_deadlines(&up, short_deadlines(1 << 30));
    let err = hello_times_out(&ex).await;
    assert!(
        matches!(err, UpstreamError::Deadline { what: "NAR", .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn nar_dripping_under_the_minimum_rate_times_out() {
    let up = cache();
    let nar = fixture_nar_path("cache", paths::HELLO);
    // 20 bytes a second: no pause trips a read timeout, and the 2 KiB NAR would take
    // minutes.
    up.set_fault(
        &nar,
        Fault::Drip {
            bytes: 1,
            every: Duration::from_millis(50),
        },
    );
    let ex = extractor_with_deadlines(&up, short_deadlines(1000));
    let err = hello_times_out(&ex).await;
    assert!(matches!(err, UpstreamError::TooSlow { .. }), "{err:?}");
    assert_eq!(up.hits(&nar), 1);
}

#[tokio::test]
async fn nar_silent_after_its_headers_ends_when_its_rate_window_closes() {
    let up = cache();
    up.set_fault(
        &fixture_nar_path("cache", paths::HELLO),
        Fault::StallAfterHeaders,
    );
    // The read timeout is ten minutes; a whole window without a byte is under any rate.
    let ex = extractor_with_deadlines(&up, short_deadlines(1));
    let err = hello_times_out(&ex).await;
    assert!(
        matches!(err, UpstreamError::TooSlow { bytes: 0, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn nar_dripping_above_the_minimum_rate_is_extracted() {
    let up = cache();
    let nar = fixture_nar_path("cache", paths::HELLO);
    up.set_fault(
        &nar,
        Fault::Drip {
            bytes: 512,
            every: Duration::from_millis(1),
        },
    );
    let ex = extractor_with_deadlines(&up, short_deadlines(1000));
    let dir = tempdir();
    let x = within_a_while(extract_ok(&ex, paths::HELLO, "bin/hello", dir.path())).await;
    assert_eq!(contents(&x), prebuilt("hello"));
}

#[rstest]
#[case::with_file_hash(true)]
#[case::without_file_hash(false)]
#[tokio::test]
async fn truncated_nar_fails_verification(#[case] hints: bool) {
    let up = cache();
    let nar = fixture_nar_path("cache", paths::HELLO);
    if !hints {
        let narinfo = remove_field(&fixture_narinfo("cache", paths::HELLO), "FileHash");
        override_narinfo(&up, paths::HELLO, remove_field(&narinfo, "FileSize"));
    }
    up.set_fault(&nar, Fault::Truncate(1000));
    extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
}

#[rstest]
#[case::zstd("cache")]
#[case::xz("cache-xz")]
#[case::bzip2("cache-bzip2")]
#[case::none("cache-none")]
#[case::brotli("cache-br")]
#[case::gzip("cache-gzip")]
#[tokio::test]
async fn data_after_the_compressed_nar_fails_verification(#[case] cache: &str) {
    let up = FakeUpstream::serve(support::cache_dir(cache));
    let mut nar = fixture_nar(cache, paths::HELLO);
    nar.extend_from_slice(b"data after the end of the stream");
    up.set_fault(
        &fixture_nar_path(cache, paths::HELLO),
        Fault::override_with(nar),
    );
    // Without the hints, only the decoder and the NAR reader can notice.
    let narinfo = remove_field(&fixture_narinfo(cache, paths::HELLO), "FileHash");
    override_narinfo(&up, paths::HELLO, remove_field(&narinfo, "FileSize"));
    extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
}

#[tokio::test]
async fn flipped_byte_in_the_compressed_nar_fails_verification() {
    let up = cache();
    let nar = fixture_nar_path("cache", paths::HELLO);
    let len = fixture_nar("cache", paths::HELLO).len();
    up.set_fault(&nar, Fault::FlipByte(len / 2));
    extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
}

/// Offset of hello's contents in its uncompressed NAR (`cache-none`).
fn hello_offset_in_nar() -> usize {
    let nar = fixture_nar("cache-none", paths::HELLO);
    let hello = prebuilt("hello");
    nar.windows(hello.len())
        .position(|w| w == hello.as_slice())
        .expect("the uncompressed NAR holds hello's bytes")
}

#[rstest]
#[case::with_file_hash(true)]
#[case::without_file_hash(false)]
#[tokio::test]
async fn flipped_byte_in_the_file_itself_fails_verification_and_leaves_no_file(
    #[case] file_hash: bool,
) {
    let up = FakeUpstream::serve(support::cache_dir("cache-none"));
    let nar = fixture_nar_path("cache-none", paths::HELLO);
    // Inside the very file being extracted: the NAR stays well-formed, only its hash moves.
    up.set_fault(&nar, Fault::FlipByte(hello_offset_in_nar() + 4000));
    if !file_hash {
        let narinfo = remove_field(&fixture_narinfo("cache-none", paths::HELLO), "FileHash");
        override_narinfo(&up, paths::HELLO, narinfo);
    }
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
    if !file_hash {
        assert!(
            matches!(
                err,
                ExtractError::Pipeline {
                    err: PipelineError::HashMismatch { .. },
                    ..
                }
            ),
            "{err:?}"
        );
    }
}

// ─── Lying narinfos ────────────────────────────────────────────────────────────────────

#[tokio::test]
async fn resigned_narinfo_with_a_wrong_nar_hash_fails_verification() {
    let up = cache();
    let wrong = support::nix_sha256(b"not the NAR");
    let narinfo = set_field(&fixture_narinfo("cache", paths::HELLO), "NarHash", &wrong);
    override_narinfo(&up, paths::HELLO, Key::test().sign(&narinfo));
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::Pipeline {
                err: PipelineError::HashMismatch { .. },
                ..
            }
        ),
        "{err:?}"
    );
}

#[rstest]
#[case::larger(8)]
#[case::smaller(-8)]
#[tokio::test]
async fn resigned_narinfo_with_a_wrong_nar_size_fails_verification(#[case] delta: i64) {
    let up = cache();
    let narinfo = fixture_narinfo("cache", paths::HELLO);
    let size: i64 = narinfo_field(&narinfo, "NarSize")
        .and_then(|s| s.parse().ok())
        .expect("NarSize");
    let narinfo = set_field(&narinfo, "NarSize", &(size + delta).to_string());
    override_narinfo(&up, paths::HELLO, Key::test().sign(&narinfo));
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
    assert!(matches!(err, ExtractError::Pipeline { .. }), "{err:?}");
}

#[tokio::test]
async fn unsigned_narinfo_is_refused_before_the_nar() {
    let up = cache();
    let narinfo = remove_field(&fixture_narinfo("cache", paths::HELLO), "Sig");
    override_narinfo(&up, paths::HELLO, narinfo);
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
    assert!(
        matches!(err, ExtractError::NarInfo(NarInfoError::Unsigned { .. })),
        "{err:?}"
    );
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::HELLO)), 0);
}

#[tokio::test]
async fn narinfo_signed_by_an_unknown_key_is_refused() {
    let up = cache();
    let narinfo = Key::unknown().sign(&fixture_narinfo("cache", paths::HELLO));
    override_narinfo(&up, paths::HELLO, narinfo);
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::NarInfo(NarInfoError::UntrustedKeys { .. })
        ),
        "{err:?}"
    );
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::HELLO)), 0);
}

#[tokio::test]
async fn one_trusted_signature_among_others_is_enough() {
    let up = cache();
    let narinfo = remove_field(&fixture_narinfo("cache", paths::HELLO), "Sig");
    // An unknown key's valid signature, a malformed one under the trusted name, then the
    // trusted key's: only the last counts, and the others must not mask it.
    let narinfo = Key::unknown().add_signature(&narinfo);
    let narinfo = format!("{narinfo}Sig: {}:not-base64!\n", Key::test().name());
    override_narinfo(&up, paths::HELLO, Key::test().add_signature(&narinfo));
    let dir = tempdir();
    let x = extract_ok(&extractor(&[&up]), paths::HELLO, "bin/hello", dir.path()).await;
    assert_is_prebuilt(&x, "hello");
}

#[tokio::test]
async fn malformed_signature_under_the_trusted_name_is_refused() {
    let up = cache();
    let narinfo = remove_field(&fixture_narinfo("cache", paths::HELLO), "Sig");
    let narinfo = format!("{narinfo}Sig: {}:AAAA\n", Key::test().name());
    override_narinfo(&up, paths::HELLO, narinfo);
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::NarInfo(NarInfoError::BadSignature { .. })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn narinfo_changed_after_signing_is_refused() {
    let up = cache();
    let wrong = support::nix_sha256(b"not the NAR");
    let narinfo = set_field(&fixture_narinfo("cache", paths::HELLO), "NarHash", &wrong);
    override_narinfo(&up, paths::HELLO, narinfo);
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::NarInfo(NarInfoError::BadSignature { .. })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn without_required_signatures_an_unsigned_narinfo_is_accepted() {
    let up = cache();
    let narinfo = remove_field(&fixture_narinfo("cache", paths::HELLO), "Sig");
    override_narinfo(&up, paths::HELLO, narinfo);
    let lax = Trust::new(&[Key::test().public()], false).expect("the test key parses");
    let dir = tempdir();
    let x = extract_ok(
        &extractor_with(&[&up], lax, false),
        paths::HELLO,
        "bin/hello",
        dir.path(),
    )
    .await;
    assert_is_prebuilt(&x, "hello");
}

#[tokio::test]
async fn without_required_signatures_a_wrong_nar_hash_is_still_caught() {
    let up = cache();
    let wrong = support::nix_sha256(b"not the NAR");
    let narinfo = remove_field(&fixture_narinfo("cache", paths::HELLO), "Sig");
    override_narinfo(&up, paths::HELLO, set_field(&narinfo, "NarHash", &wrong));
    let lax = Trust::new(&[Key::test().public()], false).expect("the test key parses");
    let dir = tempdir();
    let err = extract(
        &extractor_with(&[&up], lax, false),
        paths::HELLO,
        "bin/hello",
        dir.path(),
    )
    .await
    .expect_err("the NAR does not match");
    assert_eq!(err.kind(), ErrorKind::VerificationFailed, "{err}");
    assert!(
        matches!(
            err,
            ExtractError::Pipeline {
                err: PipelineError::HashMismatch { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert_dir_empty(dir.path());
}

#[tokio::test]
async fn narinfo_for_another_store_path_is_refused() {
    let up = cache();
    // goodbye's narinfo, validly signed, served as hello's.
    override_narinfo(&up, paths::HELLO, served_narinfo(&up, paths::GOODBYE));
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::NarInfo(NarInfoError::WrongStorePath { .. })
        ),
        "{err:?}"
    );
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::GOODBYE)), 0);
}

#[tokio::test]
async fn nar_url_on_another_host_is_refused_before_any_request() {
    let up = cache();
    let narinfo = set_field(
        &fixture_narinfo("cache", paths::HELLO),
        "URL",
        "http://169.254.169.254/nar/x",
    );
    override_narinfo(&up, paths::HELLO, narinfo);
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::UpstreamBroken,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::Upstream(UpstreamError::ForeignUrl { .. })
        ),
        "{err:?}"
    );
    assert_eq!(up.hits("nar/x"), 0);
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::HELLO)), 0);
}

#[rstest]
#[case::parent_segment("nar/../nar/x.nar.zst")]
#[case::leading_parent("../cache-xz/nar/x.nar.xz")]
#[case::absolute_path("/etc/passwd")]
#[tokio::test]
async fn nar_url_climbing_out_of_the_cache_is_refused_before_any_request(#[case] url: &str) {
    let up = cache();
    let narinfo = set_field(&fixture_narinfo("cache", paths::HELLO), "URL", url);
    override_narinfo(&up, paths::HELLO, narinfo);
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::UpstreamBroken,
    )
    .await;
    assert!(
        matches!(
            err,
            ExtractError::Upstream(UpstreamError::InvalidUrl { .. })
        ),
        "{err:?}"
    );
    assert_eq!(up.hits(url), 0);
    assert_eq!(up.hits("nar/x.nar.zst"), 0);
    // Only nix-cache-info and the narinfo were asked for.
    assert_eq!(up.total_hits(), 2);
}

#[rstest]
#[case::other_file_url("file:///etc/passwd")]
#[case::climbing_relative_url("../../../../../../../../etc/passwd")]
#[case::climbing_after_a_segment("nar/../../x")]
#[tokio::test]
async fn file_upstream_refuses_nar_urls_outside_its_directory(#[case] url: &str) {
    let root = tempdir();
    support::copy_cache("cache-xz", root.path());
    let info = root.path().join(narinfo_path(paths::HELLO));
    let narinfo = set_field(&fixture_narinfo("cache-xz", paths::HELLO), "URL", url);
    std::fs::write(&info, narinfo).expect("writing the narinfo");
    let ex = extractor_for_urls(
        &[format!("file://{}", root.path().display())],
        trust(),
        false,
    );
    let dir = tempdir();
    let err = extract(&ex, paths::HELLO, "bin/hello", dir.path())
        .await
        .expect_err("the URL leaves the cache");
    assert_eq!(err.kind(), ErrorKind::UpstreamBroken, "{err}");
    assert!(
        matches!(
            err,
            ExtractError::Upstream(
                UpstreamError::ForeignUrl { .. } | UpstreamError::InvalidUrl { .. }
            )
        ),
        "{err:?}"
    );
    assert_dir_empty(dir.path());
}

#[tokio::test]
async fn absolute_nar_url_into_the_same_cache_is_followed() {
    let up = cache();
    let nar = fixture_nar_path("cache", paths::HELLO);
    let narinfo = set_field(
        &fixture_narinfo("cache", paths::HELLO),
        "URL",
        &format!("{}/{nar}", up.url()),
    );
    override_narinfo(&up, paths::HELLO, narinfo);
    let dir = tempdir();
    let x = extract_ok(&extractor(&[&up]), paths::HELLO, "bin/hello", dir.path()).await;
    assert_is_prebuilt(&x, "hello");
    assert_eq!(up.hits(&nar), 1);
}

#[tokio::test]
async fn nar_url_with_a_query_is_fetched_with_it() {
    let up = cache();
    let nar = fixture_nar_path("cache", paths::HELLO);
    let narinfo = set_field(
        &fixture_narinfo("cache", paths::HELLO),
        "URL",
        &format!("{nar}?hash=ynvq1ycj6j3ghsp3m5bqmgqpsg8za96d"),
    );
    override_narinfo(&up, paths::HELLO, narinfo);
    let dir = tempdir();
    extract_ok(&extractor(&[&up]), paths::HELLO, "bin/hello", dir.path()).await;
    assert_eq!(up.hits(&nar), 1);
}

#[tokio::test]
async fn file_hash_mismatch_fails_verification() {
    let up = cache();
    let wrong = support::nix_sha256(b"not the file");
    let narinfo = set_field(&fixture_narinfo("cache", paths::HELLO), "FileHash", &wrong);
    override_narinfo(&up, paths::HELLO, narinfo);
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
    assert!(
        matches!(err, ExtractError::FileHashMismatch { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn body_larger_than_file_size_fails_verification() {
    let up = cache();
    let narinfo = set_field(&fixture_narinfo("cache", paths::HELLO), "FileSize", "100");
    override_narinfo(&up, paths::HELLO, narinfo);
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
    assert!(
        matches!(err, ExtractError::FileSizeExceeded { limit: 100, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn unknown_compression_is_refused_before_the_nar_is_downloaded() {
    let up = cache();
    let narinfo = set_field(
        &fixture_narinfo("cache", paths::HELLO),
        "Compression",
        "lz4",
    );
    override_narinfo(&up, paths::HELLO, narinfo);
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::UpstreamBroken,
    )
    .await;
    assert!(
        matches!(err, ExtractError::NarInfo(NarInfoError::Codec { .. })),
        "{err:?}"
    );
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::HELLO)), 0);
}

#[tokio::test]
async fn wrong_compression_fails_verification() {
    let up = cache();
    // Unsigned, so a cache can get it wrong: zstd bytes announced as xz.
    let narinfo = set_field(&fixture_narinfo("cache", paths::HELLO), "Compression", "xz");
    override_narinfo(&up, paths::HELLO, narinfo);
    extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::VerificationFailed,
    )
    .await;
}

/// Ways a narinfo can fail to be one; the first three keep the original text otherwise.
fn broken_narinfo(case: &str) -> String {
    let narinfo = fixture_narinfo("cache", paths::HELLO);
    match case {
        "duplicate NarHash" => {
            let hash = narinfo_field(&narinfo, "NarHash").expect("NarHash");
            format!("{narinfo}NarHash: {hash}\n")
        }
        "zero NarSize" => set_field(&narinfo, "NarSize", "0"),
        "no URL" => remove_field(&narinfo, "URL"),
        _ => "this is not a narinfo\n".to_owned(),
    }
}

#[rstest]
#[case::duplicate_field("duplicate NarHash")]
#[case::zero_nar_size("zero NarSize")]
#[case::missing_url("no URL")]
#[case::garbage("garbage")]
#[tokio::test]
async fn unparsable_narinfo_is_an_upstream_error(#[case] case: &str) {
    let up = cache();
    override_narinfo(&up, paths::HELLO, broken_narinfo(case));
    let err = extract_err(
        &extractor(&[&up]),
        paths::HELLO,
        "bin/hello",
        ErrorKind::UpstreamBroken,
    )
    .await;
    assert!(
        matches!(err, ExtractError::NarInfo(NarInfoError::Parse(_))),
        "{err:?}"
    );
    assert_eq!(up.hits(&fixture_nar_path("cache", paths::HELLO)), 0);
}

#[rstest]
#[case::hex("hex")]
#[case::sri("sri")]
#[tokio::test]
async fn nar_hash_in_another_spelling_keeps_nix_signature_valid(#[case] spelling: &str) {
    let up = cache();
    let narinfo = fixture_narinfo("cache", paths::HELLO);
    let nar_hash = narinfo_field(&narinfo, "NarHash").expect("NarHash");
    let digest = binplz::hash::parse_sha256(&nar_hash).expect("a SHA-256 NarHash");
    let respelled = match spelling {
        "hex" => format!("sha256:{}", binplz::hash::hex(&digest)),
        _ => format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(digest)
        ),
    };
    // The fingerprint is built from the parsed hash, so Nix's signature still holds.
    override_narinfo(
        &up,
        paths::HELLO,
        set_field(&narinfo, "NarHash", &respelled),
    );
    let dir = tempdir();
    let x = extract_ok(&extractor(&[&up]), paths::HELLO, "bin/hello", dir.path()).await;
    assert_is_prebuilt(&x, "hello");
}
