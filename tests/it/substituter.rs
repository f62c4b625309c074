//! The node as a Nix substituter, tested with the real Nix client (Debian's `nix-bin`)
//! against the fixture caches served by a fake upstream on loopback.
//!
//! Nix runs in a blocking thread, so the server (on the test's runtime) keeps answering;
//! each run gets its own `XDG_CACHE_HOME`, so Nix's own narinfo cache never answers for
//! the node.

use std::path::Path;
use std::process::{Command, Output};

use binplz::narinfo::SecretKey;
use binplz::server::{CacheConfig, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::paths::{BUSYBOX, HELLO, LINKS, SCRIPTS};
use crate::support::server::{fixture_index, Gate, Gated, Server, Setup};
use crate::support::{
    cache_dir, dir_entries, fixture_nar_path, fixture_narinfo, hash_part, narinfo_path,
    publish_bytes, set_field, FakeUpstream, Fault, Key,
};
use binplz::nar::writer::{write_nar, Entry};

/// Runs Nix with `args` (plus the settings every run needs) on a blocking thread.
async fn nix(program: &str, args: Vec<String>, home: &Path) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(&args)
        .env(
            "NIX_CONFIG",
            "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\n\
             substituters =\nnarinfo-cache-negative-ttl = 0\n",
        )
        .env("XDG_CACHE_HOME", home.join("xdg-cache"))
        .env("HOME", home);
    tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("the nix thread")
        .unwrap_or_else(|e| panic!("running {program} (is nix-bin installed?): {e}"))
}

/// `nix copy --from URL --to local?root=ROOT PATHS`, trusting `key` only.
async fn nix_copy(url: &str, root: &Path, key: &str, paths: &[&str], home: &Path) -> Output {
    let mut args: Vec<String> = vec![
        "copy".into(),
        "--from".into(),
        url.into(),
        "--to".into(),
        format!("local?root={}", root.display()),
        "--option".into(),
        "trusted-public-keys".into(),
        key.into(),
    ];
    args.extend(paths.iter().map(|p| p.to_string()));
    nix("nix", args, home).await
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "nix failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn failed(out: &Output) {
    assert!(
        !out.status.success(),
        "nix succeeded: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_store(root: &Path, path: &str) -> bool {
    root.join(path.trim_start_matches('/')).exists()
}

fn test_key() -> String {
    Key::test().public()
}

/// The node's URL.
fn url(server: &Server) -> String {
    format!("http://{}", server.client.addr)
}

/// The disk cache holds no key and no content file.
fn assert_cache_empty(cache: &Path) {
    assert!(
        dir_entries(&cache.join("keys")).is_empty(),
        "keys kept: {:?}",
        dir_entries(&cache.join("keys"))
    );
    for shard in dir_entries(&cache.join("files")) {
        let files = dir_entries(&cache.join("files").join(&shard));
        assert!(files.is_empty(), "content kept in {shard}: {files:?}");
    }
}

/// The NAR URL the node gives `store_path` in its narinfo.
async fn node_nar_url(server: &Server, store_path: &str) -> String {
    let reply = server.get(&format!("/{}", narinfo_path(store_path))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let url = reply
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("URL: ").map(str::to_owned))
        .expect("a URL line");
    format!("/{url}")
}

/// `GET target` on a raw connection, read to its end whatever happens: the status line,
/// the announced `Content-Length`, and how many body bytes came.
async fn raw_get(server: &Server, target: &str) -> (String, Option<usize>, usize) {
    let mut stream = tokio::net::TcpStream::connect(server.client.addr)
        .await
        .expect("connect");
    let req = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("request");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw);
    let split = text.find("\r\n\r\n").expect("a response head");
    let status = text.lines().next().unwrap_or_default().to_owned();
    let len = text[..split].lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("content-length: ")
            .and_then(|v| v.trim().parse().ok())
    });
    (status, len, raw.len() - split - 4)
}

/// A substituter-only node (no index) in front of `up`.
async fn node(up: &FakeUpstream, dir: &Path) -> Server {
    Server::start(Setup::new(up, vec![], &dir.join("cache"))).await
}

#[tokio::test]
async fn nix_copy_fetches_a_closure_through_the_node_and_again_with_the_upstream_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let server = node(&up, dir.path()).await;
    let info = server.get("/nix-cache-info").await;
    assert_eq!(info.status, 200);
    assert!(
        info.text().contains("StoreDir: /nix/store\n"),
        "{}",
        info.text()
    );
    assert!(info.text().contains("Priority: 40\n"));

    let root = dir.path().join("root1");
    let out = nix_copy(&url(&server), &root, &test_key(), &[SCRIPTS], dir.path()).await;
    ok(&out);
    // `scripts` references busybox: the closure came along.
    assert!(in_store(&root, SCRIPTS) && in_store(&root, BUSYBOX));
    for p in [SCRIPTS, BUSYBOX] {
        assert_eq!(up.hits(&fixture_nar_path("cache", p)), 1, "{p}");
    }

    drop(up);
    let root = dir.path().join("root2");
    let out = nix_copy(&url(&server), &root, &test_key(), &[SCRIPTS], dir.path()).await;
    ok(&out);
    assert!(in_store(&root, SCRIPTS) && in_store(&root, BUSYBOX));
}

#[tokio::test]
async fn nix_store_realise_substitutes_from_the_node_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let server = node(&up, dir.path()).await;
    let store = dir.path().join("store");
    let args = vec![
        "--store".into(),
        store.display().to_string(),
        "--realise".into(),
        LINKS.into(),
        "--option".into(),
        "substituters".into(),
        url(&server),
        "--option".into(),
        "trusted-public-keys".into(),
        test_key(),
    ];
    let out = nix("nix-store", args, dir.path()).await;
    ok(&out);
    assert!(in_store(&store, LINKS) && in_store(&store, HELLO));
}

#[tokio::test]
async fn clients_may_trust_only_the_nodes_own_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let out = nix(
        "nix",
        vec![
            "key".into(),
            "generate-secret".into(),
            "--key-name".into(),
            "edge-1".into(),
        ],
        dir.path(),
    )
    .await;
    ok(&out);
    let key = SecretKey::parse(&String::from_utf8_lossy(&out.stdout)).expect("Nix's secret key");
    let public = key.public();
    let config = Config {
        cache: CacheConfig {
            sign_key: Some(key),
            ..CacheConfig::default()
        },
        ..Config::default()
    };
    let server =
        Server::start(Setup::new(&up, vec![], &dir.path().join("cache")).config(config)).await;
    let narinfo = server
        .get(&format!("/{}", narinfo_path(SCRIPTS)))
        .await
        .text();
    assert!(narinfo.contains("Sig: edge-1:"), "{narinfo}");
    assert!(narinfo.contains("Sig: binplz-test-1:"), "{narinfo}");

    let root = dir.path().join("root");
    let out = nix_copy(&url(&server), &root, &public, &[SCRIPTS], dir.path()).await;
    ok(&out);
    assert!(in_store(&root, SCRIPTS) && in_store(&root, BUSYBOX));
}

/// A tampered upstream (narinfo or NAR at `path` replaced by `fault`) makes `nix copy` of
/// `hello` fail, and leaves nothing in the node's disk cache.
async fn tampered(path: &str, fault: Fault) {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    up.set_fault(path, fault);
    let server = node(&up, dir.path()).await;
    let root = dir.path().join("root");
    let out = nix_copy(&url(&server), &root, &test_key(), &[HELLO], dir.path()).await;
    failed(&out);
    assert!(!in_store(&root, HELLO));
    assert_cache_empty(&dir.path().join("cache"));
}

#[tokio::test]
async fn a_narinfo_with_a_bad_signature_fails_the_client_and_keeps_nothing() {
    let narinfo = fixture_narinfo("cache", HELLO);
    // Signed by a key nobody trusts, and the trusted signature made invalid.
    let unknown = Key::unknown().sign(&narinfo);
    tampered(&narinfo_path(HELLO), Fault::override_with(unknown)).await;
    let forged = set_field(&narinfo, "NarSize", "13857");
    tampered(&narinfo_path(HELLO), Fault::override_with(forged)).await;
}

#[tokio::test]
async fn a_swapped_narinfo_fails_the_client_and_keeps_nothing() {
    // Validly signed, for another store path.
    let other = fixture_narinfo("cache", BUSYBOX);
    tampered(&narinfo_path(HELLO), Fault::override_with(other)).await;
}

#[tokio::test]
async fn a_flipped_byte_in_a_nar_fails_the_client_and_keeps_nothing() {
    tampered(&fixture_nar_path("cache", HELLO), Fault::FlipByte(1000)).await;
}

#[tokio::test]
async fn a_nar_that_fails_verification_is_cut_never_ended_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Uncompressed: the byte flipped is in a file's contents, and only NarHash tells.
    let up = FakeUpstream::serve(cache_dir("cache-none"));
    let nar_path = fixture_nar_path("cache-none", HELLO);
    up.set_fault(&nar_path, Fault::FlipByte(5000));
    let server = node(&up, dir.path()).await;
    let nar = node_nar_url(&server, HELLO).await;
    let (status, len, body) = raw_get(&server, &nar).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let len = len.expect("a Content-Length");
    assert!(
        body < len,
        "a complete body of {body} bytes for a NAR that failed"
    );
    assert_cache_empty(&dir.path().join("cache"));
}

#[tokio::test]
async fn twenty_concurrent_clients_cause_one_upstream_fetch_per_nar() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let nar_path = fixture_nar_path("cache", BUSYBOX);
    let gate = Gate::default();
    let inner =
        crate::support::server::http_upstream(&up, &crate::support::server::client_config());
    let setup = Setup::new(&up, vec![], &dir.path().join("cache"))
        .upstream(Gated::wrap(inner, &nar_path, &gate));
    let server = Server::start(setup).await;
    let nar = node_nar_url(&server, BUSYBOX).await;
    let mut pending = Vec::new();
    for _ in 0..20 {
        pending.push(server.client.send("GET", &nar, &[]).await.expect("send"));
    }
    // Every request is in the server (waiting on the one fetch) before it may go on.
    gate.arrivals(1).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while server.app.metrics().in_progress() < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the requests never all arrived"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    gate.open();
    let expected = up.contents(&nar_path).expect("the NAR");
    for p in pending {
        let reply = p.reply().await.expect("a reply");
        assert_eq!(reply.status, 200);
        assert!(reply.body == expected.as_ref(), "a NAR that differs");
    }
    assert_eq!(up.hits(&nar_path), 1);
    assert_eq!(gate.arrived(), 1);
}

#[tokio::test]
async fn a_client_leaving_mid_nar_still_leaves_a_complete_cached_nar() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::empty();
    let contents: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let nar = write_nar(&Entry::dir([(
        "big",
        Entry::File {
            executable: false,
            contents,
        },
    )]));
    let published = publish_bytes(&up, "big-1.0", &nar, &nar, "none", true);
    let server = node(&up, dir.path()).await;
    let url = node_nar_url(&server, &published.store_path).await;

    let mut stream = tokio::net::TcpStream::connect(server.client.addr)
        .await
        .expect("connect");
    let req = format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("request");
    let mut buf = vec![0u8; 64 << 10];
    let n = stream.read(&mut buf).await.expect("the first bytes");
    assert!(n > 0);
    drop(stream);

    // The fetch goes on without the client: the NAR ends up kept, whole.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while dir_entries(&dir.path().join("cache/keys")).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the NAR was never kept"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    drop(up);
    let reply = server.get(&url).await;
    assert_eq!(reply.status, 200);
    assert!(reply.body == nar, "the kept NAR differs");
}

#[tokio::test]
async fn a_nar_fetched_for_nix_copy_also_serves_the_program() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let setup = Setup::new(
        &up,
        vec![fixture_index().await.source()],
        &dir.path().join("cache"),
    );
    let server = Server::start(setup).await;
    let root = dir.path().join("root");
    ok(&nix_copy(&url(&server), &root, &test_key(), &[HELLO], dir.path()).await);
    let nar_path = fixture_nar_path("cache", HELLO);
    assert_eq!(up.hits(&nar_path), 1);
    let reply = server.get("/hello").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.body, crate::support::prebuilt("hello"));
    assert_eq!(up.hits(&nar_path), 1, "the program was fetched again");
}

#[tokio::test]
async fn head_does_not_pull_the_nar_and_a_kept_nar_serves_ranges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let server = node(&up, dir.path()).await;
    let nar = node_nar_url(&server, HELLO).await;
    let nar_path = fixture_nar_path("cache", HELLO);
    let head = server.request("HEAD", &nar, &[]).await;
    assert_eq!(head.status, 200);
    let expected = up.contents(&nar_path).expect("the NAR");
    assert_eq!(
        head.header("content-length"),
        Some(expected.len().to_string().as_str())
    );
    assert_eq!(up.hits(&nar_path), 0);

    assert_eq!(server.get(&nar).await.body, expected.as_ref());
    let part = server
        .request("GET", &nar, &[("Range", "bytes=10-19")])
        .await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, &expected[10..20]);
    assert_eq!(up.hits(&nar_path), 1);
}

#[tokio::test]
async fn a_narinfo_the_upstream_lacks_is_a_404_remembered_for_a_while() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let server = node(&up, dir.path()).await;
    let missing = "00000000000000000000000000000000.narinfo";
    assert_eq!(server.get(&format!("/{missing}")).await.status, 404);
    assert_eq!(server.get(&format!("/{missing}")).await.status, 404);
    assert_eq!(up.hits(missing), 1);
    // A NAR name that is not the one of the checked narinfo.
    let hash = hash_part(HELLO);
    let wrong = format!("/nar/{hash}-{}.nar.zst", "0".repeat(52));
    assert_eq!(server.get(&wrong).await.status, 404);
}

#[tokio::test]
async fn upstream_urls_are_opaque_paths_and_foreign_ones_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let narinfo = fixture_narinfo("cache", HELLO);
    let nar = up
        .contents(&fixture_nar_path("cache", HELLO))
        .expect("the NAR");
    // As harmonia and nix-serve write them: a query naming the store path.
    let odd = format!("nar/{}-x.nar?hash={}", "1".repeat(52), hash_part(HELLO));
    up.put(&format!("nar/{}-x.nar", "1".repeat(52)), nar);
    up.put(
        &narinfo_path(HELLO),
        set_field(&narinfo, "URL", &odd).into_bytes(),
    );
    let server = node(&up, dir.path()).await;
    let root = dir.path().join("root");
    ok(&nix_copy(&url(&server), &root, &test_key(), &[HELLO], dir.path()).await);

    // An absolute URL elsewhere is never fetched: the narinfo is not offered.
    let busybox = fixture_narinfo("cache", BUSYBOX);
    let foreign = set_field(&busybox, "URL", "http://169.254.169.254/latest/meta-data");
    up.put(&narinfo_path(BUSYBOX), foreign.into_bytes());
    let reply = server.get(&format!("/{}", narinfo_path(BUSYBOX))).await;
    assert_eq!(reply.status, 404);
}

#[tokio::test]
async fn programs_named_like_the_cache_routes_are_still_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let index = fixture_index()
        .await
        .with_alias("nar", "hello")
        .with_alias("log", "hello")
        .with_alias("nix-cache-info", "hello");
    let setup = Setup::new(&up, vec![index.source()], &dir.path().join("cache"));
    let server = Server::start(setup).await;
    let hello = crate::support::prebuilt("hello");
    for target in [
        "/nar",
        "/log",
        "/x86_64-linux/nix-cache-info",
        "/nar.sha256",
    ] {
        let reply = server.get(target).await;
        assert_eq!(reply.status, 200, "{target}: {}", reply.text());
        if !target.ends_with(".sha256") {
            assert_eq!(reply.body, hello, "{target}");
        }
    }
    // The exact shapes are the cache's.
    let info = server.get("/nix-cache-info").await;
    assert!(
        info.text().starts_with("StoreDir: /nix/store\n"),
        "{}",
        info.text()
    );
    let narinfo = server.get(&format!("/{}", narinfo_path(HELLO))).await;
    assert_eq!(narinfo.header("content-type"), Some("text/x-nix-narinfo"));
}

#[test]
fn signing_narinfos_whose_signatures_are_not_checked_is_refused_at_start_up() {
    use crate::support::cli::{assert_failure, binplz};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = binplz()
        .args(["serve", "--listen", "127.0.0.1:0", "--upstream"])
        .arg(format!("file://{}", cache_dir("cache").display()))
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--sign-key-file")
        .arg(crate::support::fixtures().join("keys/binplz-test-1.secret"))
        .arg("--no-require-sigs")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running binplz");
    // A server that started would run until killed: give it a deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().expect("waiting on binplz").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("binplz's output");
    let line = assert_failure(&out, binplz::error::ErrorKind::BadRequest);
    assert!(line.contains("--no-require-sigs"), "{line}");
}

#[tokio::test]
async fn a_log_name_cannot_smuggle_a_query_to_the_upstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let hash = hash_part(HELLO);
    let other = format!("log/{hash}-a");
    up.put(&other, b"another object's bytes".to_vec());
    let server = node(&up, dir.path()).await;
    let reply = server.get(&format!("/log/{hash}-a%3Fb=c.drv")).await;
    assert_ne!(reply.status, 200, "{}", reply.text());
    assert!(!reply.text().contains("another object"), "{}", reply.text());
    assert_eq!(up.hits(&other), 0);
}

#[tokio::test]
async fn a_narinfo_the_node_cannot_use_is_a_404_remembered_for_a_while() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    // Compression is not signed: the signature still checks out.
    let narinfo = set_field(&fixture_narinfo("cache", HELLO), "Compression", "lz4");
    up.put(&narinfo_path(HELLO), narinfo.into_bytes());
    let server = node(&up, dir.path()).await;
    for _ in 0..2 {
        let reply = server.get(&format!("/{}", narinfo_path(HELLO))).await;
        assert_eq!(reply.status, 404, "{}", reply.text());
    }
    assert_eq!(up.hits(&narinfo_path(HELLO)), 1);
}

#[tokio::test]
async fn a_nar_the_upstream_lacks_is_a_404() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    up.set_fault(&fixture_nar_path("cache", HELLO), Fault::NotFound);
    let server = node(&up, dir.path()).await;
    let nar = node_nar_url(&server, HELLO).await;
    let reply = server.get(&nar).await;
    assert_eq!(reply.status, 404, "{}", reply.text());
}

#[tokio::test]
async fn a_nar_fetch_without_room_for_its_temp_file_is_a_503_with_retry_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let server = node(&up, dir.path()).await;
    let nar = node_nar_url(&server, HELLO).await;
    // No temp file can be made where the temp directory was.
    let tmp = dir.path().join("cache/tmp");
    std::fs::remove_dir_all(&tmp).expect("removing the temp directory");
    std::fs::write(&tmp, b"").expect("a file in its place");
    let reply = server.get(&nar).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.header("retry-after").is_some());
}

#[tokio::test]
async fn an_empty_nar_from_the_upstream_is_never_an_empty_200() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::empty();
    let nar = write_nar(&Entry::dir([(
        "f",
        Entry::File {
            executable: false,
            contents: b"contents".to_vec(),
        },
    )]));
    // No FileSize: only the upstream's Content-Length says how long the file is.
    let published = publish_bytes(&up, "empty-1.0", &nar, &nar, "none", false);
    up.set_fault(&published.nar_path, Fault::override_with(Vec::new()));
    let server = node(&up, dir.path()).await;
    let url = node_nar_url(&server, &published.store_path).await;
    let reply = server.get(&url).await;
    assert_ne!(reply.status, 200, "an empty NAR served");
    assert_cache_empty(&dir.path().join("cache"));
}

#[tokio::test]
async fn a_nar_download_holds_an_upstream_slot_after_its_client_left() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let busybox_nar = fixture_nar_path("cache", BUSYBOX);
    let gate = Gate::default();
    let inner =
        crate::support::server::http_upstream(&up, &crate::support::server::client_config());
    let config = Config {
        max_upstream_fetches: 1,
        upstream_queue_timeout: std::time::Duration::from_millis(100),
        ..Config::default()
    };
    let setup = Setup::new(&up, vec![], &dir.path().join("cache"))
        .upstream(Gated::wrap(inner, &busybox_nar, &gate))
        .config(config);
    let server = Server::start(setup).await;
    let busybox = node_nar_url(&server, BUSYBOX).await;
    let hello = node_nar_url(&server, HELLO).await;
    // The client leaves while the download waits on the upstream: the download goes on,
    // holding the one slot.
    let pending = server
        .client
        .send("GET", &busybox, &[])
        .await
        .expect("send");
    gate.arrivals(1).await;
    drop(pending);
    let reply = server.get(&hello).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.header("retry-after").is_some());
    assert_eq!(up.hits(&fixture_nar_path("cache", HELLO)), 0);
    // Once that download ends, its slot serves the next one.
    gate.open();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let reply = server.get(&hello).await;
        if reply.status == 200 {
            break;
        }
        assert_eq!(reply.status, 503, "{}", reply.text());
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came free"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_nar_larger_than_the_disk_cache_is_refused_before_any_download() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::serve(cache_dir("cache"));
    let mut setup = Setup::new(&up, vec![], &dir.path().join("cache"));
    // The busybox NAR file is some 900 KB.
    setup.disk_bytes = 100_000;
    let server = Server::start(setup).await;
    let nar = node_nar_url(&server, BUSYBOX).await;
    let reply = server.get(&nar).await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert_eq!(up.hits(&fixture_nar_path("cache", BUSYBOX)), 0);
}

#[tokio::test]
async fn a_resume_never_splices_two_upstreams_compressions_of_one_nar() {
    let dir = tempfile::tempdir().expect("tempdir");
    let contents: Vec<u8> = (0..64u32 << 10).map(|i| (i % 251) as u8).collect();
    let nar = write_nar(&Entry::dir([(
        "f",
        Entry::File {
            executable: false,
            contents,
        },
    )]));
    // One store path and NarHash, compressed differently by two upstreams: one NAR name.
    let (up1, up2) = (FakeUpstream::empty(), FakeUpstream::empty());
    let fast = zstd::stream::encode_all(nar.as_slice(), 1).expect("zstd");
    let small = zstd::stream::encode_all(nar.as_slice(), 19).expect("zstd");
    assert_ne!(fast, small);
    let published = publish_bytes(&up1, "twice-1.0", &nar, &fast, "zstd", true);
    publish_bytes(&up2, "twice-1.0", &nar, &small, "zstd", true);
    let node1 = Server::start(Setup::new(&up1, vec![], &dir.path().join("c1"))).await;
    let node2 = Server::start(Setup::new(&up2, vec![], &dir.path().join("c2"))).await;
    let url = node_nar_url(&node1, &published.store_path).await;
    assert_eq!(node_nar_url(&node2, &published.store_path).await, url);
    // Whole from one node (fetched, then kept), then a resume asked of the other.
    let first = node1.get(&url).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body, fast);
    let first = node1.get(&url).await;
    let etag = first.header("etag").expect("an ETag").to_owned();
    assert_eq!(node2.get(&url).await.status, 200);
    let resumed = node2
        .request("GET", &url, &[("Range", "bytes=10-"), ("If-Range", &etag)])
        .await;
    assert_eq!(resumed.status, 200, "a part of another file");
    assert_eq!(resumed.body, small);
    // The same node's own tag still resumes.
    let again = node1
        .request("GET", &url, &[("Range", "bytes=10-"), ("If-Range", &etag)])
        .await;
    assert_eq!(again.status, 206);
    assert_eq!(again.body, &fast[10..]);
}

#[tokio::test]
async fn a_nar_failing_early_from_a_fast_upstream_ends_every_response() {
    use crate::support::{narinfo_text, sha256, synthetic_store_path};
    let dir = tempfile::tempdir().expect("tempdir");
    let big: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
    // Entry names out of order: the strict reader fails at the second name, with most of
    // the NAR still to come, much of it already buffered from a file:// upstream.
    let nar = write_nar(&Entry::Directory(vec![
        (
            b"b".to_vec(),
            Entry::File {
                executable: false,
                contents: b"b".to_vec(),
            },
        ),
        (
            b"a".to_vec(),
            Entry::File {
                executable: false,
                contents: big,
            },
        ),
    ]));
    let store_path = synthetic_store_path("unsorted-1.0").to_absolute_path();
    let nar_path = format!("nar/{}.nar", binplz::hash::nix32(&sha256(&nar)));
    let root = dir.path().join("upstream");
    std::fs::create_dir_all(root.join("nar")).expect("the upstream's nar directory");
    std::fs::write(root.join(&nar_path), &nar).expect("the NAR");
    let text = narinfo_text(&store_path, &nar_path, "none", &nar, &nar);
    std::fs::write(
        root.join(narinfo_path(&store_path)),
        Key::test().sign(&text),
    )
    .expect("the narinfo");
    let file = binplz::upstream::open(
        &format!("file://{}", root.display()),
        &crate::support::server::client_config(),
    )
    .expect("a file:// upstream");
    let up = FakeUpstream::empty();
    let setup = Setup::new(&up, vec![], &dir.path().join("cache")).upstream(file);
    let server = Server::start(setup).await;
    let url = node_nar_url(&server, &store_path).await;
    // Each request is a new fetch (a failed NAR is not kept), each a chance for the
    // failure to be overwritten by the chunks drained after it.
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(server.client.addr)
            .await
            .expect("connect");
        let req = format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.expect("request");
        let mut raw = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            stream.read_to_end(&mut raw),
        )
        .await;
        assert!(read.is_ok(), "the response never ended");
        // Bytes go out as they arrive, but the last one waits for the verdict: the body
        // is always short of the NAR's length.
        let body = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(0, |head| raw.len() - head - 4);
        assert!(body < nar.len(), "a whole body for a NAR that failed");
    }
    assert_cache_empty(&dir.path().join("cache"));
}

#[tokio::test]
async fn bytes_after_the_compressed_nar_fail_it_and_keep_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = FakeUpstream::empty();
    let nar = write_nar(&Entry::dir([("f", Entry::file(vec![7u8; 4096]))]));
    let mut file = zstd::stream::encode_all(nar.as_slice(), 3).expect("zstd");
    file.extend_from_slice(b"trailing bytes");
    // No FileSize or FileHash to catch it: only the bytes after the stream's end.
    let published = publish_bytes(&up, "trailing-1.0", &nar, &file, "zstd", false);
    let server = node(&up, dir.path()).await;
    let url = node_nar_url(&server, &published.store_path).await;
    let (status, len, body) = raw_get(&server, &url).await;
    assert!(
        !status.starts_with("HTTP/1.1 200") || len.is_some_and(|l| body < l),
        "a whole response for a NAR with trailing bytes: {status}, {body} bytes"
    );
    assert_cache_empty(&dir.path().join("cache"));
}
