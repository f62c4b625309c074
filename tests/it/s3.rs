//! The operator's cache on S3 (a real `s3s-fs` checking signatures) and in a directory:
//! publishing a staging cache, serving and extracting from the bucket, clear failures for
//! wrong credentials and missing buckets, interrupted uploads, and `binplz gc`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use binplz::error::ErrorKind;
use binplz::extract::Extractor;
use binplz::nar::writer::{write_nar, Entry};
use binplz::resolve::RelPath;
use binplz::store::{self, PublishOptions, Store, StoreError};
use binplz::upstream::{Cache, CachePath, S3Upstream, Upstream};
use tempfile::TempDir;

use crate::support::cli::{assert_failure, assert_success, binplz, run, stderr};
use crate::support::s3::{tree, NoListProxy, S3Server, SECRET_KEY};
use crate::support::server::{fixture_index, trust, FixtureIndex, Server, Setup};
use crate::support::{
    self, copy_cache, hash_part, narinfo_path, narinfo_text, paths, prebuilt, synthetic_store_path,
    Key,
};

/// A copy of the fixture cache to publish (publishing removes it).
fn staging(tmp: &TempDir) -> PathBuf {
    let dir = tmp.path().join("staging");
    copy_cache("cache", &dir);
    dir
}

/// Adds to `staging` a signed store path named `name` that no index names.
fn stage_extra(staging: &Path, name: &str) -> String {
    let nar = write_nar(&Entry::file(name.as_bytes().to_vec()));
    let file = zstd::stream::encode_all(nar.as_slice(), 3).expect("zstd into memory");
    let store_path = synthetic_store_path(name).to_absolute_path();
    let nar_path = format!(
        "nar/{}.nar.zst",
        binplz::hash::nix32(&support::sha256(&file))
    );
    let narinfo = Key::test().sign(&narinfo_text(&store_path, &nar_path, "zstd", &nar, &file));
    std::fs::create_dir_all(staging.join("nar")).expect("creating nar/");
    std::fs::write(staging.join(&nar_path), &file).expect("writing the NAR");
    std::fs::write(staging.join(narinfo_path(&store_path)), narinfo).expect("writing the narinfo");
    store_path
}

fn publish_cli(server: &S3Server, from: &Path, to: &str) {
    let out = run(server
        .env(&mut binplz())
        .args(["publish", "--from"])
        .arg(from)
        .args(["--to", to]));
    assert_success(&out);
}

fn extract_cli(
    server: &S3Server,
    secret: &str,
    url: &str,
    out_file: &Path,
) -> std::process::Output {
    run(server
        .env_with(&mut binplz(), crate::support::s3::ACCESS_KEY, secret)
        .args(["extract", "--upstream", url, "--trusted-public-key"])
        .arg(Key::test().public())
        .args([paths::HELLO, "bin/hello", "-o"])
        .arg(out_file))
}

fn s3_upstream(server: &S3Server, bucket: &str, secret: &str) -> Arc<dyn Upstream> {
    Arc::new(S3Upstream::with_client(
        bucket,
        server.client(bucket, secret),
    ))
}

#[tokio::test]
async fn the_fixture_cache_published_to_a_bucket_is_served_from_it() {
    let s3 = S3Server::start();
    let bucket = s3.bucket("cache");
    let tmp = TempDir::new().expect("a temp dir");
    let from = staging(&tmp);
    let store = Store::with_s3_client("cache", s3.client("cache", SECRET_KEY));
    // A threshold under the NARs' sizes: the larger ones go up in parts.
    let opts = PublishOptions {
        multipart_threshold: 4 << 10,
        ..PublishOptions::default()
    };
    let done = store::publish(&from, &store, &opts)
        .await
        .expect("publishing the fixture cache");
    assert!(!from.exists(), "the staging copy is removed");
    assert_eq!(tree(&bucket), tree(&support::cache_dir("cache")));
    let last_nar = done
        .uploaded
        .iter()
        .rposition(|k| !k.ends_with(".narinfo"))
        .expect("NARs were uploaded");
    let first_narinfo = done
        .uploaded
        .iter()
        .position(|k| k.ends_with(".narinfo"))
        .expect("narinfos were uploaded");
    assert!(last_nar < first_narinfo, "{:?}", done.uploaded);

    // Published again: everything is already there.
    let again = staging(&tmp);
    let done = store::publish(&again, &store, &opts)
        .await
        .expect("publishing again");
    assert!(done.uploaded.is_empty(), "{:?}", done.uploaded);

    let cache_dir = tmp.path().join("disk");
    let setup = Setup::fixture(&crate::support::FakeUpstream::empty(), &cache_dir)
        .await
        .upstream(s3_upstream(&s3, "cache", SECRET_KEY));
    let server = Server::start(setup).await;
    let r = server.get("/hello").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, prebuilt("hello"));
    let r = server.get("/goodbye").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, prebuilt("goodbye"));
    server.stop().await;
}

#[test]
fn binplz_extract_and_index_build_read_a_bucket_published_by_binplz_publish() {
    let s3 = S3Server::start();
    s3.bucket("cache");
    let tmp = TempDir::new().expect("a temp dir");
    publish_cli(&s3, &staging(&tmp), &s3.url("cache"));
    let out_file = tmp.path().join("hello");
    let out = extract_cli(&s3, SECRET_KEY, &s3.url("cache"), &out_file);
    assert_success(&out);
    assert_eq!(
        std::fs::read(&out_file).expect("the extracted file"),
        prebuilt("hello")
    );

    // The index built from the bucket says what the one built from the directory says.
    let show = |upstream: &str, name: &str| {
        let idx = tmp.path().join(name);
        let mut cmd = binplz();
        s3.env(&mut cmd)
            .args(["index", "build", "--eval"])
            .arg(support::fixtures().join("eval/nix-eval-jobs.jsonl"))
            .args(["--upstream", upstream, "--trusted-public-key"])
            .arg(Key::test().public())
            .args(["--revision", "r1", "-o"])
            .arg(&idx);
        assert_success(&run(&mut cmd));
        let out = run(binplz()
            .args(["index", "show"])
            .arg(&idx)
            .args(["hello", "--json"]));
        assert_success(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let from_dir = show(
        &format!("file://{}", support::cache_dir("cache").display()),
        "dir-index",
    );
    assert!(from_dir.contains(paths::HELLO), "{from_dir}");
    assert_eq!(show(&s3.url("cache"), "s3-index"), from_dir);
}

#[test]
fn a_profile_named_in_the_url_gives_the_keys_from_the_shared_credentials_file() {
    let s3 = S3Server::start();
    s3.bucket("cache");
    let tmp = TempDir::new().expect("a temp dir");
    publish_cli(&s3, &staging(&tmp), &s3.url("cache"));
    let credentials = tmp.path().join("credentials");
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = nobody\naws_secret_access_key = wrong\n\n\
             [edge]\naws_access_key_id = {}\naws_secret_access_key = {SECRET_KEY}\n",
            crate::support::s3::ACCESS_KEY
        ),
    )
    .expect("writing the credentials file");
    let extract = |url: &str, out_file: &Path| {
        let mut cmd = binplz();
        s3.env(&mut cmd)
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
            .args(["extract", "--upstream", url, "--trusted-public-key"])
            .arg(Key::test().public())
            .args([paths::HELLO, "bin/hello", "-o"])
            .arg(out_file);
        run(&mut cmd)
    };
    let out_file = tmp.path().join("hello");
    assert_success(&extract(
        &format!("{}&profile=edge", s3.url("cache")),
        &out_file,
    ));
    assert_eq!(
        std::fs::read(&out_file).expect("the file"),
        prebuilt("hello")
    );

    // Without profile=, the default section's (wrong) keys are used.
    let line = assert_failure(
        &extract(&s3.url("cache"), &tmp.path().join("again")),
        ErrorKind::UpstreamBroken,
    );
    assert!(line.contains("access denied"), "{line}");

    // A profile the file does not have is named in the error.
    let line = assert_failure(
        &extract(
            &format!("{}&profile=nope", s3.url("cache")),
            &tmp.path().join("x"),
        ),
        ErrorKind::BadRequest,
    );
    assert!(line.contains("profile \"nope\""), "{line}");
}

#[test]
fn binplz_serve_serves_a_bucket_given_as_its_upstream() {
    let s3 = S3Server::start();
    s3.bucket("cache");
    let tmp = TempDir::new().expect("a temp dir");
    publish_cli(&s3, &staging(&tmp), &s3.url("cache"));
    let index = tmp.path().join("index");
    tokio::runtime::Runtime::new()
        .expect("a runtime")
        .block_on(fixture_index())
        .write(&index);
    let mut cmd = binplz();
    s3.env(&mut cmd)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &s3.url("cache"),
        ])
        .arg("--trusted-public-key")
        .arg(Key::test().public())
        .arg("--index")
        .arg(&index)
        .arg("--cache-dir")
        .arg(tmp.path().join("disk"));
    let running = crate::serve::Running::start(&mut cmd, "text");
    let r = crate::serve::blocking_get(running.addr, "/hello");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, prebuilt("hello"));
    running.stop();
}

/// Runs a Nix command as the builder does (single-user, no sandbox, no substituters);
/// returns its standard output.
#[track_caller]
fn nix(program: &str, args: &[&str], stdin: Option<&Path>) -> String {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env(
        "NIX_CONFIG",
        "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =",
    );
    if let Some(f) = stdin {
        cmd.stdin(std::fs::File::open(f).expect("opening the input"));
    }
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("running {program} (Debian's nix-bin; .ci/run installs it): {e}")
    });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// What a builder does, with real Nix: build a store path (the static busybox as
/// `bin/greet`), sign it into a `file://` staging cache with `nix copy`, and publish that to
/// the bucket; then an index built from the bucket, and an edge serving from it.
#[test]
fn a_nix_build_published_to_a_bucket_is_indexed_and_served_from_it() {
    let s3 = S3Server::start();
    s3.bucket("cache");
    let tmp = TempDir::new().expect("a temp dir");
    let dir = tmp.path();
    std::fs::create_dir(dir.join("bb")).expect("creating bb/");
    std::fs::copy("/bin/busybox", dir.join("bb/busybox"))
        .expect("copying /bin/busybox (busybox-static; .ci/run installs it)");
    std::os::unix::fs::symlink("busybox", dir.join("bb/sh")).expect("linking sh");
    // A nonce in the environment: every run builds its own store path.
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let expr = format!(
        r#"let dir = builtins.path {{ path = {bb}; name = "s3-test-busybox"; }}; in
derivation {{
  name = "greet-1.0";
  system = "x86_64-linux";
  builder = "${{dir}}/sh";
  args = [ "-c" "${{dir}}/busybox mkdir -p $out/bin && ${{dir}}/busybox cp ${{dir}}/busybox $out/bin/greet" ];
  nonce = "{nonce}";
}}"#,
        bb = dir.join("bb").display()
    );
    std::fs::write(dir.join("greet.nix"), expr).expect("writing greet.nix");
    let drv = nix(
        "nix-instantiate",
        &[dir.join("greet.nix").to_str().expect("a UTF-8 path")],
        None,
    );
    let out = nix("nix-store", &["--realise", &drv], None);
    let secret = dir.join("secret");
    std::fs::write(
        &secret,
        nix(
            "nix",
            &["key", "generate-secret", "--key-name", "builder-1"],
            None,
        ),
    )
    .expect("writing the secret key");
    let public = nix("nix", &["key", "convert-secret-to-public"], Some(&secret));
    let staging = dir.join("staging");
    nix(
        "nix",
        &[
            "copy",
            "--to",
            &format!(
                "file://{}?compression=zstd&write-nar-listing=true&secret-key={}",
                staging.display(),
                secret.display()
            ),
            &out,
        ],
        None,
    );
    publish_cli(&s3, &staging, &s3.url("cache"));
    assert!(!staging.exists(), "the staging copy is removed");

    let eval = dir.join("eval.jsonl");
    std::fs::write(
        &eval,
        format!(
            "{}\n",
            serde_json::json!({
                "attr": "greet", "attrPath": ["greet"], "drvPath": drv, "name": "greet-1.0",
                "outputs": {"out": out}, "system": "x86_64-linux",
            })
        ),
    )
    .expect("writing the evaluation");
    let index = dir.join("index");
    let mut cmd = binplz();
    s3.env(&mut cmd)
        .args(["index", "build", "--eval"])
        .arg(&eval)
        .args([
            "--upstream",
            &s3.url("cache"),
            "--trusted-public-key",
            &public,
            "-o",
        ])
        .arg(&index);
    assert_success(&run(&mut cmd));

    let mut cmd = binplz();
    s3.env(&mut cmd)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &s3.url("cache"),
        ])
        .args(["--trusted-public-key", &public, "--index"])
        .arg(&index)
        .arg("--cache-dir")
        .arg(dir.join("disk"));
    let running = crate::serve::Running::start(&mut cmd, "text");
    let r = crate::serve::blocking_get(running.addr, "/greet");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.body,
        std::fs::read("/bin/busybox").expect("reading /bin/busybox")
    );
    running.stop();
}

#[tokio::test]
async fn wrong_credentials_fail_clearly_and_cache_nothing() {
    let s3 = S3Server::start();
    s3.bucket("cache");
    let tmp = TempDir::new().expect("a temp dir");
    let store = Store::with_s3_client("cache", s3.client("cache", SECRET_KEY));
    store::publish(&staging(&tmp), &store, &PublishOptions::default())
        .await
        .expect("publishing the fixture cache");

    let out_file = tmp.path().join("hello");
    let out = extract_cli(&s3, "not-the-secret", &s3.url("cache"), &out_file);
    let line = assert_failure(&out, ErrorKind::UpstreamBroken);
    assert!(line.contains("s3://cache/"), "{line}");
    assert!(
        line.contains("access denied (SignatureDoesNotMatch)"),
        "{line}"
    );
    // Nothing left next to where the file would have gone, not even a temp file.
    support::assert_dir_empty(tmp.path());

    let cache_dir = tmp.path().join("disk");
    let setup = Setup::fixture(&crate::support::FakeUpstream::empty(), &cache_dir)
        .await
        .upstream(s3_upstream(&s3, "cache", "not-the-secret"));
    let server = Server::start(setup).await;
    let r = server.get("/hello").await;
    assert_eq!(r.status, 502, "{}", r.text());
    server.stop().await;
    let kept: Vec<_> = tree(&cache_dir)
        .into_iter()
        .filter(|(_, bytes)| bytes == &prebuilt("hello"))
        .collect();
    assert!(kept.is_empty(), "the disk cache kept hello");

    // Publishing with the wrong secret is refused before anything is uploaded.
    let wrong = Store::with_s3_client("cache", s3.client("cache", "not-the-secret"));
    let err = store::publish(&staging(&tmp), &wrong, &PublishOptions::default())
        .await
        .expect_err("wrong credentials");
    assert!(err.to_string().contains("access denied"), "{err}");
}

#[test]
fn a_missing_bucket_is_named_not_taken_for_an_empty_cache() {
    let s3 = S3Server::start();
    let tmp = TempDir::new().expect("a temp dir");
    let out_file = tmp.path().join("hello");
    let out = extract_cli(&s3, SECRET_KEY, &s3.url("no-such-bucket"), &out_file);
    let line = assert_failure(&out, ErrorKind::UpstreamBroken);
    assert!(line.contains("s3://no-such-bucket/"), "{line}");
    assert!(line.contains("no such bucket"), "{line}");
    assert!(!out_file.exists());

    let out = run(s3
        .env(&mut binplz())
        .args(["publish", "--from"])
        .arg(staging(&tmp))
        .args(["--to", &s3.url("no-such-bucket")]));
    let line = assert_failure(&out, ErrorKind::UpstreamBroken);
    assert!(line.contains("no such bucket"), "{line}");
    assert!(
        tmp.path().join("staging").exists(),
        "the staging copy is kept"
    );
}

#[tokio::test]
async fn an_upload_interrupted_after_the_nars_leaves_no_narinfo() {
    let s3 = S3Server::start();
    let bucket = s3.bucket("cache");
    let tmp = TempDir::new().expect("a temp dir");
    let from = staging(&tmp);
    let store = Store::with_s3_client("cache", s3.client("cache", SECRET_KEY));
    let opts = PublishOptions {
        fault: Some(Arc::new(|key: &str| {
            if key.ends_with(".narinfo") {
                Err("the builder was killed".to_owned())
            } else {
                Ok(())
            }
        })),
        ..PublishOptions::default()
    };
    let err = store::publish(&from, &store, &opts)
        .await
        .expect_err("the fault stops the upload");
    assert!(matches!(err, StoreError::Interrupted { .. }), "{err}");
    let held = tree(&bucket);
    assert!(
        held.iter().any(|(k, _)| k.starts_with("nar/")),
        "no NAR uploaded"
    );
    let narinfos: Vec<_> = held
        .iter()
        .filter(|(k, _)| k.ends_with(".narinfo"))
        .collect();
    assert!(narinfos.is_empty(), "{narinfos:?}");
    assert!(
        from.exists(),
        "the staging copy is kept for the next attempt"
    );

    // An edge sees nothing (not a broken path), and the next attempt completes.
    let out_file = tmp.path().join("hello");
    let out = extract_cli(&s3, SECRET_KEY, &s3.url("cache"), &out_file);
    assert_failure(&out, ErrorKind::NotInCache);
    store::publish(&from, &store, &PublishOptions::default())
        .await
        .expect("publishing again");
    assert_eq!(tree(&bucket), tree(&support::cache_dir("cache")));
}

#[tokio::test]
async fn a_narinfo_whose_nar_is_nowhere_is_not_published() {
    let tmp = TempDir::new().expect("a temp dir");
    let from = tmp.path().join("staging");
    let extra = stage_extra(&from, "lonely-1.0");
    for nar in std::fs::read_dir(from.join("nar")).expect("listing nar/") {
        std::fs::remove_file(nar.expect("an entry").path()).expect("removing the NAR");
    }
    let dir = tmp.path().join("store");
    let store = Store::open(
        &format!("file://{}", dir.display()),
        &binplz::upstream::ClientConfig::default(),
    )
    .expect("a directory store");
    let err = store::publish(&from, &store, &PublishOptions::default())
        .await
        .expect_err("the NAR is missing");
    assert!(matches!(err, StoreError::MissingNar { .. }), "{err}");
    assert!(!has(&dir, &narinfo_path(&extra)));
    assert!(
        from.join(narinfo_path(&extra)).exists(),
        "the staging copy is kept"
    );
}

/// Where a gc test keeps its store: a bucket, or a directory.
enum Target {
    S3(S3Server),
    File(PathBuf),
}

impl Target {
    fn uri(&self) -> String {
        match self {
            Target::S3(s) => s.url("cache"),
            Target::File(dir) => format!("file://{}", dir.display()),
        }
    }

    fn dir(&self) -> PathBuf {
        match self {
            Target::S3(s) => s.bucket_dir("cache"),
            Target::File(dir) => dir.clone(),
        }
    }

    fn cmd(&self) -> std::process::Command {
        let mut cmd = binplz();
        if let Target::S3(s) = self {
            s.env(&mut cmd);
        }
        cmd
    }

    fn new(kind: &str, tmp: &TempDir) -> Target {
        match kind {
            "s3" => {
                let s = S3Server::start();
                s.bucket("cache");
                Target::S3(s)
            }
            _ => Target::File(tmp.path().join("store")),
        }
    }

    /// Publishes the fixture cache plus `extras`, all built `age` ago.
    fn fill(&self, tmp: &TempDir, extras: &[&str], age: Duration) -> Vec<String> {
        let from = staging(tmp);
        let extra = extras.iter().map(|e| stage_extra(&from, e)).collect();
        let out = run(self
            .cmd()
            .args(["publish", "--from"])
            .arg(&from)
            .args(["--to", &self.uri()]));
        assert_success(&out);
        backdate(&self.dir(), age);
        extra
    }

    fn gc(&self, index: &[&Path], args: &[&str]) -> String {
        let mut cmd = self.cmd();
        cmd.args(["gc", "--store-uri", &self.uri()]);
        for i in index {
            cmd.arg("--index").arg(i);
        }
        let out = run(cmd.args(args));
        assert_success(&out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Sets every file's modification time (S3's last-modified, for s3s-fs) `age` back.
fn backdate(dir: &Path, age: Duration) {
    let when = SystemTime::now() - age;
    for (rel, _) in tree(dir) {
        let f = std::fs::File::options()
            .write(true)
            .open(dir.join(&rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
        f.set_modified(when)
            .unwrap_or_else(|e| panic!("{rel}: {e}"));
    }
}

/// Extracts every program of `index` from the store at `dir` (read as a directory).
async fn every_program_extracts(index: &FixtureIndex, dir: &Path) {
    let cache = binplz::upstream::open(
        &format!("file://{}", dir.display()),
        &binplz::upstream::ClientConfig::default(),
    )
    .expect("the store opens");
    let extractor = Extractor::new(vec![Cache::new(cache)], trust(), true);
    let tmp = TempDir::new().expect("a temp dir");
    for p in &index.programs {
        for c in &p.candidates {
            let sp = support::store_path(&c.store_path);
            extractor
                .extract(&sp, &RelPath::parse(c.path.as_bytes()), tmp.path())
                .await
                .unwrap_or_else(|e| panic!("{} ({}): {e}", p.program, c.store_path));
        }
    }
}

fn has(dir: &Path, key: &str) -> bool {
    dir.join(key).exists()
}

#[rstest::rstest]
#[case::s3("s3")]
#[case::file("file")]
#[tokio::test]
async fn gc_keeps_every_path_the_index_needs_and_deletes_the_rest(#[case] kind: &str) {
    let tmp = TempDir::new().expect("a temp dir");
    let target = Target::new(kind, &tmp);
    let index = fixture_index().await;
    let index_file = tmp.path().join("index");
    index.write(&index_file);
    let extras = target.fill(
        &tmp,
        &["orphan-1.0", "orphan-2.0"],
        Duration::from_secs(3 * 86400),
    );
    let dir = target.dir();
    let before = tree(&dir);

    // A dry run names the orphans' files and deletes nothing.
    let dry = target.gc(&[&index_file], &[]);
    for e in &extras {
        assert!(
            dry.contains(&format!(
                "would delete {}/{}",
                target_url(&target),
                narinfo_path(e)
            )),
            "{dry}"
        );
    }
    assert!(!dry.contains(hash_part(paths::HELLO)), "{dry}");
    assert_eq!(tree(&dir), before);

    // Within the grace period nothing goes.
    let young = target.gc(&[&index_file], &["--grace", "4d", "--delete"]);
    assert!(young.starts_with("0 store paths, 0 files"), "{young}");

    let out = target.gc(&[&index_file], &["--delete"]);
    assert!(out.starts_with("deleted "), "{out}");
    for e in &extras {
        assert!(!has(&dir, &narinfo_path(e)), "{e} is still there");
    }
    let left: Vec<String> = tree(&dir).into_iter().map(|(k, _)| k).collect();
    assert!(left.iter().all(|k| !k.contains("orphan")), "{left:?}");
    // busybox is named by no index, but scripts refers to it.
    assert!(has(&dir, &narinfo_path(paths::BUSYBOX)));
    every_program_extracts(&index, &dir).await;
}

fn target_url(target: &Target) -> String {
    match target {
        Target::S3(_) => "s3://cache".to_owned(),
        Target::File(dir) => format!("file://{}", dir.display()),
    }
}

fn store_bytes(dir: &Path) -> u64 {
    tree(dir).iter().map(|(_, b)| b.len() as u64).sum()
}

#[rstest::rstest]
#[case::s3("s3")]
#[case::file("file")]
#[tokio::test]
async fn gc_max_size_deletes_the_least_recently_built_but_never_the_newest_index(
    #[case] kind: &str,
) {
    let tmp = TempDir::new().expect("a temp dir");
    let target = Target::new(kind, &tmp);
    let old = fixture_index().await.revision("old", 1_000);
    let new = fixture_index()
        .await
        .revision("new", 2_000)
        .without("goodbye");
    let (old_file, new_file) = (tmp.path().join("old"), tmp.path().join("new"));
    old.write(&old_file);
    new.write(&new_file);
    target.fill(&tmp, &[], Duration::from_secs(3 * 86400));
    let dir = target.dir();
    // goodbye was built long before everything else.
    let goodbye = narinfo_path(paths::GOODBYE);
    let f = std::fs::File::options()
        .write(true)
        .open(dir.join(&goodbye))
        .expect("goodbye's narinfo");
    f.set_modified(SystemTime::now() - Duration::from_secs(30 * 86400))
        .expect("backdating");

    // What neither revision needs goes first; then, without a bound, nothing more.
    target.gc(&[&old_file, &new_file], &["--delete"]);
    let all = target.gc(&[&old_file, &new_file], &["--delete"]);
    assert!(all.starts_with("0 store paths"), "{all}");
    let total = store_bytes(&dir);
    let narinfos = |dir: &Path| {
        tree(dir)
            .iter()
            .filter(|(k, _)| k.ends_with(".narinfo"))
            .count()
    };
    let paths_before = narinfos(&dir);

    // One byte less than all: the least recently built (goodbye) goes first, and only it.
    let bound = (total - 1).to_string();
    let out = target.gc(&[&old_file, &new_file], &["--max-size", &bound, "--delete"]);
    assert!(out.contains(&goodbye), "{out}");
    assert!(!has(&dir, &goodbye));
    assert!(store_bytes(&dir) < total);
    every_program_extracts(&new, &dir).await;
    assert_eq!(narinfos(&dir), paths_before - 1, "only goodbye went");

    // A bound nothing can meet: all but the newest index's closure goes, with a warning.
    let mut cmd = target.cmd();
    cmd.args(["gc", "--store-uri", &target.uri(), "--index"])
        .arg(&old_file)
        .arg("--index")
        .arg(&new_file)
        .args(["--max-size", "1", "--delete"]);
    let out = run(&mut cmd);
    assert_success(&out);
    assert!(stderr(&out).contains("over --max-size"), "{}", stderr(&out));
    every_program_extracts(&new, &dir).await;

    // Only the newest revision counts with --keep-revisions 1.
    let kept = target.gc(&[&old_file, &new_file], &["--keep-revisions", "1"]);
    assert!(kept.starts_with("0 store paths"), "{kept}");
}

/// Every narinfo left in the store at `dir` names only references the store still holds
/// (what Nix needs to substitute it).
fn assert_references_present(dir: &Path) {
    for (key, bytes) in tree(dir) {
        if !key.ends_with(".narinfo") {
            continue;
        }
        let text = String::from_utf8_lossy(&bytes);
        let refs = text
            .lines()
            .find_map(|l| l.strip_prefix("References:"))
            .unwrap_or("");
        for r in refs.split_whitespace() {
            assert!(
                has(dir, &format!("{}.narinfo", &r[..32])),
                "{key} names {r}, which is gone"
            );
        }
    }
}

#[rstest::rstest]
#[case::s3("s3")]
#[case::file("file")]
#[tokio::test]
async fn gc_max_size_never_deletes_a_dependency_of_a_path_it_keeps(#[case] kind: &str) {
    let tmp = TempDir::new().expect("a temp dir");
    let target = Target::new(kind, &tmp);
    let old = fixture_index().await.revision("old", 1_000);
    let new = fixture_index()
        .await
        .revision("new", 2_000)
        .without("store-script")
        .without("portable-script");
    assert!(
        new.programs
            .iter()
            .all(|p| p.candidates.iter().all(|c| c.store_path != paths::SCRIPTS)),
        "the new index still names scripts"
    );
    let (old_file, new_file) = (tmp.path().join("old"), tmp.path().join("new"));
    old.write(&old_file);
    new.write(&new_file);
    target.fill(&tmp, &[], Duration::from_secs(3 * 86400));
    let dir = target.dir();
    // scripts was built before everything else but busybox, which only scripts needs.
    let busybox = narinfo_path(paths::BUSYBOX);
    for (key, days) in [(&busybox, 30), (&narinfo_path(paths::SCRIPTS), 20)] {
        std::fs::File::options()
            .write(true)
            .open(dir.join(key))
            .expect("a narinfo")
            .set_modified(SystemTime::now() - Duration::from_secs(days * 86400))
            .expect("backdating");
    }
    // What neither revision needs goes first.
    target.gc(&[&old_file, &new_file], &["--delete"]);
    let total = store_bytes(&dir);

    // One byte less than all: scripts goes first (busybox is still needed by it), which
    // is enough.
    let bound = (total - 1).to_string();
    let out = target.gc(&[&old_file, &new_file], &["--max-size", &bound, "--delete"]);
    assert!(out.contains(&narinfo_path(paths::SCRIPTS)), "{out}");
    assert!(!has(&dir, &narinfo_path(paths::SCRIPTS)));
    assert!(has(&dir, &busybox), "{out}");
    assert_references_present(&dir);
    every_program_extracts(&new, &dir).await;

    // With a bound only deleting both meets, both go, and nothing left names a missing path.
    let out = target.gc(&[&old_file, &new_file], &["--max-size", "1", "--delete"]);
    assert!(out.contains(&busybox), "{out}");
    assert_references_present(&dir);
    every_program_extracts(&new, &dir).await;
}

impl Target {
    /// The store, opened in-process.
    fn store(&self) -> Store {
        match self {
            Target::S3(s) => Store::with_s3_client("cache", s.client("cache", SECRET_KEY)),
            Target::File(_) => Store::open(&self.uri(), &binplz::upstream::ClientConfig::default())
                .expect("the store opens"),
        }
    }
}

#[rstest::rstest]
#[case::s3("s3")]
#[case::file("file")]
#[tokio::test]
async fn publish_sends_a_nar_again_when_gc_deleted_it_during_the_upload(#[case] kind: &str) {
    let tmp = TempDir::new().expect("a temp dir");
    let target = Target::new(kind, &tmp);
    let store = target.store();
    store::publish(&staging(&tmp), &store, &PublishOptions::default())
        .await
        .expect("publishing the fixture cache");
    let dir = target.dir();
    // A gc deleting hello has removed its narinfo and listing, not yet its NAR; the next
    // publication finds the NAR there, and the gc deletes it just before the narinfo goes up.
    let hello = narinfo_path(paths::HELLO);
    let nar = support::fixture_nar_path("cache", paths::HELLO);
    std::fs::remove_file(dir.join(&hello)).expect("removing the narinfo");
    std::fs::remove_file(dir.join(format!("{}.ls", hash_part(paths::HELLO))))
        .expect("removing the listing");
    let nar_file = dir.join(&nar);
    let opts = PublishOptions {
        fault: Some(Arc::new(move |key: &str| {
            if key.ends_with(".narinfo") {
                std::fs::remove_file(&nar_file).map_err(|e| e.to_string())?;
            }
            Ok(())
        })),
        ..PublishOptions::default()
    };
    let done = store::publish(&staging(&tmp), &store, &opts)
        .await
        .expect("publishing again");
    assert!(done.uploaded.contains(&nar), "{:?}", done.uploaded);
    assert!(done.uploaded.contains(&hello), "{:?}", done.uploaded);
    assert_eq!(tree(&dir), tree(&support::cache_dir("cache")));
    every_program_extracts(&fixture_index().await, &dir).await;
}

#[rstest::rstest]
#[case::s3("s3")]
#[case::file("file")]
#[tokio::test]
async fn gc_leaves_a_nar_written_again_since_its_listing(#[case] kind: &str) {
    let tmp = TempDir::new().expect("a temp dir");
    let target = Target::new(kind, &tmp);
    let index_file = tmp.path().join("index");
    fixture_index().await.write(&index_file);
    let orphan = target.fill(&tmp, &["orphan-1.0"], Duration::from_secs(3 * 86400))[0].clone();
    let dir = target.dir();
    let orphan_narinfo = narinfo_path(&orphan);
    let text = std::fs::read_to_string(dir.join(&orphan_narinfo)).expect("the orphan's narinfo");
    let nar = text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("a URL")
        .to_owned();
    // A publication sends the orphan's NAR again after gc listed the store (its narinfo is
    // next), while gc deletes the orphan.
    let nar_file = dir.join(&nar);
    let key = orphan_narinfo.clone();
    let opts = store::GcOptions {
        indexes: vec![binplz::index::Index::load(&index_file, 1 << 30).expect("the index")],
        keep_revisions: None,
        grace: Duration::from_secs(86400),
        max_size: None,
        delete: true,
        now: SystemTime::now(),
        fault: Some(Arc::new(move |k: &str| {
            if k == key {
                let bytes = std::fs::read(&nar_file).map_err(|e| e.to_string())?;
                std::fs::write(&nar_file, bytes).map_err(|e| e.to_string())?;
            }
            Ok(())
        })),
    };
    let report = store::gc(&target.store(), opts).await.expect("gc");
    assert!(!has(&dir, &orphan_narinfo));
    assert!(has(&dir, &nar), "the NAR written again was deleted");
    // The report names what was deleted, not what was left alone.
    assert!(
        report.doomed.iter().any(|d| d.key == orphan_narinfo),
        "{:?}",
        report.doomed
    );
    assert!(
        report.doomed.iter().all(|d| d.key != nar),
        "{:?}",
        report.doomed
    );
}

#[rstest::rstest]
#[case::s3("s3")]
#[case::file("file")]
#[tokio::test]
async fn publish_uploads_each_narinfo_after_those_of_its_references(#[case] kind: &str) {
    let tmp = TempDir::new().expect("a temp dir");
    let target = Target::new(kind, &tmp);
    let done = store::publish(&staging(&tmp), &target.store(), &PublishOptions::default())
        .await
        .expect("publishing the fixture cache");
    let at = |store_path: &str| {
        let key = narinfo_path(store_path);
        done.uploaded
            .iter()
            .position(|k| *k == key)
            .unwrap_or_else(|| panic!("{key} was not uploaded: {:?}", done.uploaded))
    };
    // In hash order, links and scripts would come before what they refer to.
    assert!(at(paths::HELLO) < at(paths::LINKS), "{:?}", done.uploaded);
    assert!(
        at(paths::BUSYBOX) < at(paths::SCRIPTS),
        "{:?}",
        done.uploaded
    );
    assert_eq!(tree(&target.dir()), tree(&support::cache_dir("cache")));
}

#[tokio::test]
async fn a_missing_key_denied_for_want_of_list_permission_is_a_miss_once_credentials_work() {
    let s3 = S3Server::start();
    s3.bucket("cache");
    s3.bucket("empty");
    let tmp = TempDir::new().expect("a temp dir");
    let store = Store::with_s3_client("cache", s3.client("cache", SECRET_KEY));
    store::publish(&staging(&tmp), &store, &PublishOptions::default())
        .await
        .expect("publishing the fixture cache");
    // Read access only: a missing key is 403 AccessDenied, as AWS answers it.
    let proxy = NoListProxy::start(&s3);
    let missing = CachePath::parse(&format!("{}.narinfo", "0".repeat(32))).expect("a path");
    let hello = CachePath::parse(&narinfo_path(paths::HELLO)).expect("a path");

    let up = S3Upstream::with_client("cache", proxy.client("cache", SECRET_KEY));
    assert!(matches!(up.get(&hello).await, Ok(Some(_))));
    match up.get(&missing).await {
        Ok(None) => {}
        Ok(Some(_)) => panic!("a missing narinfo was found"),
        Err(e) => panic!("a missing narinfo is an error: {e}"),
    }

    // Wrong credentials stay an error, with S3's own code.
    let wrong = S3Upstream::with_client("cache", proxy.client("cache", "not-the-secret"));
    match wrong.get(&missing).await {
        Err(e) => assert!(e.to_string().contains("SignatureDoesNotMatch"), "{e}"),
        Ok(_) => panic!("wrong credentials read the bucket"),
    }
    // Without a readable nix-cache-info nothing proves the credentials: still an error.
    let empty = S3Upstream::with_client("empty", proxy.client("empty", SECRET_KEY));
    match empty.get(&missing).await {
        Err(e) => assert!(
            e.to_string().contains("access denied (AccessDenied)"),
            "{e}"
        ),
        Ok(_) => panic!("AccessDenied was taken for a miss in a bucket never read"),
    }

    // An edge serving the bucket as a substituter: a missing narinfo is a 404, not a 502,
    // and the node stays ready.
    let setup = Setup::new(
        &crate::support::FakeUpstream::empty(),
        vec![],
        &tmp.path().join("disk"),
    )
    .upstream(s3_upstream_via(&proxy));
    let server = Server::start(setup).await;
    let r = server
        .get(&format!("/{}", "0".repeat(32) + ".narinfo"))
        .await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = server
        .get(&format!("/{}", narinfo_path(paths::HELLO)))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server.get("/-/readyz").await.status, 200);
    server.stop().await;
}

fn s3_upstream_via(proxy: &NoListProxy) -> Arc<dyn Upstream> {
    Arc::new(S3Upstream::with_client(
        "cache",
        proxy.client("cache", SECRET_KEY),
    ))
}

#[rstest::rstest]
#[case::s3("s3")]
#[case::file("file")]
#[tokio::test]
async fn gc_keeps_failed_builds_logs_and_deletes_those_of_the_paths_it_deletes(#[case] kind: &str) {
    let tmp = TempDir::new().expect("a temp dir");
    let target = Target::new(kind, &tmp);
    let index = fixture_index().await.without("goodbye");
    let index_file = tmp.path().join("index");
    index.write(&index_file);
    let from = staging(&tmp);
    let logs = [
        // A failed build's: no narinfo names its derivation.
        "log/0a7vzqh1y8rrb0k2vvd6xmfzqnh9l2nq-failed-1.0.drv",
        // goodbye's, which no index needs any more.
        "log/jnaym2d17qz9jv7qfrvpmssj3dlm7fr4-goodbye-1.0.drv",
        // hello's.
        "log/xc1rp0dgaw8xwlkc5akmjbj4r87fi5wm-hello-1.0.drv",
    ];
    std::fs::create_dir_all(from.join("log")).expect("creating log/");
    for log in logs {
        std::fs::write(from.join(log), b"a build log\n").expect("writing a log");
    }
    let out = run(target
        .cmd()
        .args(["publish", "--from"])
        .arg(&from)
        .args(["--to", &target.uri()]));
    assert_success(&out);
    let dir = target.dir();
    backdate(&dir, Duration::from_secs(3 * 86400));

    let out = target.gc(&[&index_file], &["--delete"]);
    assert!(!has(&dir, &narinfo_path(paths::GOODBYE)), "{out}");
    assert!(
        has(&dir, logs[0]),
        "the failed build's log was deleted: {out}"
    );
    assert!(!has(&dir, logs[1]), "{out}");
    assert!(has(&dir, logs[2]), "{out}");
}

#[rstest::rstest]
#[case::s3("s3")]
#[case::file("file")]
#[tokio::test]
async fn gc_counts_narinfos_deleted_between_its_listing_and_their_reading(#[case] kind: &str) {
    let tmp = TempDir::new().expect("a temp dir");
    let target = Target::new(kind, &tmp);
    let index_file = tmp.path().join("index");
    fixture_index().await.write(&index_file);
    target.fill(&tmp, &[], Duration::from_secs(3 * 86400));
    let dir = target.dir();
    // Another collection deletes every narinfo as this one is about to read it.
    let gone = dir.clone();
    let opts = store::GcOptions {
        indexes: vec![binplz::index::Index::load(&index_file, 1 << 30).expect("the index")],
        keep_revisions: None,
        grace: Duration::from_secs(86400),
        max_size: None,
        delete: false,
        now: SystemTime::now(),
        fault: Some(Arc::new(move |k: &str| {
            let _ = std::fs::remove_file(gone.join(k));
            Ok(())
        })),
    };
    let report = store::gc(&target.store(), opts).await.expect("gc");
    assert_eq!(report.paths_kept, 0, "{report:?}");
}

/// The builder's `--store-uri s3://…`: what it builds lands in the bucket (its log too),
/// narinfo last, and is extracted from there with the exact bytes Nix built.
#[tokio::test(flavor = "multi_thread")]
async fn a_builders_output_goes_to_the_bucket_and_is_served_from_it() {
    use crate::support::builds::{base, Api, BuilderDirs, BuilderProcess, Derivations};
    let s3 = S3Server::start();
    s3.bucket("builds");
    let url = s3.url("builds");
    let drvs = Derivations::new(&[(
        "s3prog",
        "echo building s3prog; mkdir -p $out/bin; printf '#!/bin/sh\\necho s3\\n' > $out/bin/s3prog; chmod 0555 $out/bin/s3prog",
    )]);
    let dirs = BuilderDirs::new();
    drvs.write_index(&dirs.index());
    let p = BuilderProcess::start_to(&dirs, &url, &[], None, |cmd| {
        s3.env(cmd);
    });
    let api = Api::of(&p);
    let drv = drvs.drv("s3prog");
    let (r, v) = api.post(drv, "192.0.2.1").await;
    assert_eq!(r.status, 202, "{v}");
    let v = api
        .wait_until(drv, Duration::from_secs(120), |v| {
            matches!(v["state"].as_str(), Some("built" | "failed"))
        })
        .await;
    assert_eq!(v["state"], "built", "{v}");

    let out = &drvs.outs["s3prog"];
    let bucket = s3.bucket_dir("builds");
    assert!(bucket
        .join(format!("{}.narinfo", &base(out)[..32]))
        .exists());
    let log = std::fs::read_to_string(bucket.join("log").join(base(drv))).expect("the log");
    assert!(log.contains("building s3prog"), "{log}");
    assert!(
        !dirs
            .state()
            .join("staging")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "the staging copy is left behind"
    );

    let dir = TempDir::new().expect("tempdir");
    let got = dir.path().join("s3prog");
    let out_ = run(s3
        .env(&mut binplz())
        .args(["extract", "--upstream", &url, "--trusted-public-key"])
        .arg(Key::test().public())
        .args([out.as_str(), "bin/s3prog", "-o"])
        .arg(&got));
    assert_success(&out_);
    let built = std::fs::read(format!("{out}/bin/s3prog")).expect("the built program");
    assert_eq!(std::fs::read(&got).expect("the extracted program"), built);
}
