//! `binplz serve --builder URL`: programs the index knows but the cache does not have are
//! asked of the builder (here the stand-in of `support::builder`, speaking the API over a
//! real socket), and served once built from a real `file://` cache made from the fixtures.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use binplz::index::NotBuilt;
use binplz::server::building::BuilderSettings;
use binplz::server::respond::SHELL_SCRIPT;
use binplz::server::{Config, IndexSource};
use binplz::upstream::{self, Deadlines};
use tempfile::TempDir;

use crate::support::builder::{build_path, FakeBuilder, Script};
use crate::support::server::{client_config, fixture_index, Client, Reply, Server, Setup};
use crate::support::{copy_cache, drv_paths, fixture_nar_path, hash_part, paths, prebuilt};

const HELLO_DRV: &str = drv_paths::HELLO;

/// The fixture index with `hello` not built (its derivation known), and `nosuch`, a name
/// the same unbuilt output is said to provide but does not.
async fn index_with_hello_not_built() -> IndexSource {
    let mut index = fixture_index().await.without("hello");
    for program in ["hello", "nosuch"] {
        index.not_built.push(NotBuilt {
            system: "x86_64-linux".into(),
            program: program.into(),
            attr: program.into(),
            store_path: paths::HELLO.into(),
            drv_path: Some(HELLO_DRV.into()),
        });
    }
    index.meta.not_built = index.not_built.len() as u64;
    index.source()
}

/// The files of `hello-1.0` in a `nix copy` cache: narinfo, listing, NAR.
fn hello_files() -> [String; 3] {
    let hash = hash_part(paths::HELLO);
    [
        format!("{hash}.narinfo"),
        format!("{hash}.ls"),
        fixture_nar_path("cache", paths::HELLO),
    ]
}

/// The builder's store: the fixture cache without `hello-1.0`, until [`publish_hello`].
fn builder_store() -> TempDir {
    let dir = TempDir::new().expect("a temporary directory");
    copy_cache("cache", dir.path());
    for f in hello_files() {
        std::fs::remove_file(dir.path().join(&f)).unwrap_or_else(|e| panic!("removing {f}: {e}"));
    }
    dir
}

/// Puts `hello-1.0` into the store as a builder does: NAR and listing first, narinfo last.
fn publish_hello(store: &Path) {
    let from = crate::support::cache_dir("cache");
    for f in hello_files().iter().rev() {
        std::fs::copy(from.join(f), store.join(f)).unwrap_or_else(|e| panic!("copying {f}: {e}"));
    }
}

/// How long the edge keeps the builder's answers in a test.
enum Ttl {
    /// Long: a test sees one question however many requests.
    Long,
    /// Short: every request asks again, so a test sees each new state.
    Short,
}

/// An edge in front of `builder` (none: as without `--builder`), with the builder's store
/// as its upstream; Retry-After 1 s while building.
struct Edge {
    server: Server,
    store: TempDir,
    _disk: TempDir,
}

async fn edge(builder: Option<&str>, ttl: Ttl) -> Edge {
    let store = builder_store();
    let disk = TempDir::new().expect("a temporary directory");
    let url = format!("file://{}", store.path().display());
    let upstream = upstream::open(&url, &client_config()).expect("a file:// upstream");
    let config = Config {
        // Fifty requests at once from one address.
        max_per_client: 200,
        builder: builder.map(|url| BuilderSettings {
            url: url.to_owned(),
            public_url: url.to_owned(),
            timeout: Duration::from_secs(10),
            answer_ttl: match ttl {
                Ttl::Long => Duration::from_secs(600),
                Ttl::Short => Duration::from_millis(1),
            },
            retry_after: Duration::from_secs(1),
        }),
        ..Config::default()
    };
    let setup = Setup {
        config,
        upstreams: vec![upstream],
        deadlines: Deadlines::default(),
        indexes: vec![index_with_hello_not_built().await],
        cache_dir: disk.path().to_owned(),
        disk_bytes: 64 << 20,
        memory_bytes: 16 << 20,
        threads: 1,
        spill_dir: None,
    };
    Edge {
        server: Server::start(setup).await,
        store,
        _disk: disk,
    }
}

/// Runs a response body with `sh`: its exit status and what it wrote to stderr.
fn run_script(r: &Reply) -> (Option<i32>, String) {
    assert_eq!(r.header("content-type"), Some(SHELL_SCRIPT), "{}", r.text());
    let dir = TempDir::new().expect("a temporary directory");
    let script = dir.path().join("program");
    std::fs::write(&script, &r.body).expect("writing the script");
    let out = Command::new("sh")
        .arg(&script)
        .current_dir(dir.path())
        .output()
        .expect("running sh");
    assert!(out.stdout.is_empty(), "the script printed to stdout");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `done` every few milliseconds until it holds, failing after 30 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "still waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A port nothing listens on.
fn closed_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
    let addr = l.local_addr().expect("the listener's address");
    drop(l);
    format!("http://{addr}")
}

#[tokio::test]
async fn fifty_requests_for_a_program_not_built_ask_the_builder_once() {
    let builder = FakeBuilder::start();
    builder.set(HELLO_DRV, Script::queued(2));
    let edge = edge(Some(&builder.url()), Ttl::Long).await;
    builder.hold();
    let client = edge.server.client;
    let requests: Vec<_> = (0..50)
        .map(|_| tokio::spawn(async move { client.get("/hello").await }))
        .collect();
    // Every request is in the edge, waiting on the one question the builder holds.
    builder.held(1).await;
    let metrics = edge.server.app.metrics();
    until("50 requests in progress", || metrics.in_progress() >= 50).await;
    builder.release();
    for r in requests {
        let r = r.await.expect("the request task");
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.text().contains("2 builds ahead of it"), "{}", r.text());
    }
    // The answer is kept: a later request does not ask again either.
    assert_eq!(edge.server.get("/hello").await.status, 503);
    assert_eq!(builder.asked(HELLO_DRV), 1);
    assert_eq!(builder.client_of(HELLO_DRV).as_deref(), Some("127.0.0.1"));
    assert_eq!(builder.bad_requests(), 0);
    let m = edge.server.get("/-/metrics").await.text();
    assert!(
        m.contains("binplz_builder_questions_total{result=\"answered\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("binplz_builder_answers_total{state=\"queued\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("binplz_requests_total{route=\"program\",status=\"503\"} 51\n"),
        "{m}"
    );
}

#[tokio::test]
async fn while_a_program_builds_the_503_script_says_where_it_is_and_how_to_wait() {
    let builder = FakeBuilder::start();
    let edge = edge(Some(&builder.url()), Ttl::Short).await;
    let addr = edge.server.client.addr;
    let wait =
        format!("binplz: to wait for it: curl --retry 30 -fsSL http://{addr}/hello -o hello\n");
    let cases = [
        (
            Script::queued(2),
            "binplz: hello is being built: 2 builds ahead of it\n",
        ),
        (
            Script::queued(0),
            "binplz: hello is being built: next in line\n",
        ),
        (
            Script::Queued {
                position: 5,
                waiting: Some("the monthly build budget (100 h) is spent".into()),
            },
            "binplz: hello is waiting to be built: the monthly build budget (100 h) is spent\n",
        ),
        (Script::Building, "binplz: hello is being built now\n"),
    ];
    for (script, said) in cases {
        builder.set(HELLO_DRV, script.clone());
        let r = edge.server.get("/hello").await;
        assert_eq!(r.status, 503, "{script:?}: {}", r.text());
        assert_eq!(r.header("retry-after"), Some("1"), "{script:?}");
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let (code, err) = run_script(&r);
        assert_eq!(code, Some(1));
        assert_eq!(err, format!("{said}{wait}"), "{script:?}");
    }
    // The sha256 route waits for the same build.
    let r = edge.server.get("/hello.sha256").await;
    assert_eq!(r.status, 503, "{}", r.text());
}

#[tokio::test]
async fn curl_retrying_through_the_edge_ends_with_the_built_programs_exact_bytes() {
    let builder = FakeBuilder::start();
    builder.set(HELLO_DRV, Script::queued(1));
    let edge = edge(Some(&builder.url()), Ttl::Short).await;
    let out = TempDir::new().expect("a temporary directory");
    let file = out.path().join("hello");
    let url = format!("http://{}/hello", edge.server.client.addr);
    let mut curl = Command::new("curl")
        .args(["--retry", "30", "-fsSL", &url, "-o"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running curl");
    until("curl's first request", || builder.asked(HELLO_DRV) >= 1).await;
    builder.set(HELLO_DRV, Script::Building);
    let asked = builder.asked(HELLO_DRV);
    until("curl retrying", || builder.asked(HELLO_DRV) > asked).await;
    publish_hello(edge.store.path());
    builder.set(HELLO_DRV, Script::built(paths::HELLO));
    let mut status = None;
    until("curl to finish", || {
        status = curl.try_wait().expect("waiting for curl");
        status.is_some()
    })
    .await;
    let mut err = String::new();
    if let Some(mut e) = curl.stderr.take() {
        std::io::Read::read_to_string(&mut e, &mut err).expect("curl's stderr");
    }
    assert!(status.is_some_and(|s| s.success()), "curl failed: {err}");
    let got = std::fs::read(&file).expect("curl's output");
    assert!(got == prebuilt("hello"), "not hello's bytes");
    // Once built, it is served as any file, from the edge's cache.
    let r = edge.server.get("/hello").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-nix-store-path"), Some(paths::HELLO));
    assert_eq!(r.header("x-nix-attr"), Some("hello"));
    assert!(r.body == prebuilt("hello"));
    let r = edge.server.get("/hello.sha256").await;
    assert_eq!(r.status, 200);
    assert!(r.text().ends_with("  hello\n"), "{}", r.text());
}

#[tokio::test]
async fn a_build_failed_for_good_is_a_status_curl_does_not_retry_with_class_reason_and_log() {
    let builder = FakeBuilder::start();
    let reason = "builder for '/nix/store/…-hello-1.0.drv' failed with exit code 1";
    builder.set(HELLO_DRV, Script::failed("failed", reason));
    builder.set_log(HELLO_DRV, "hello: compiling\nerror: it broke\n");
    let edge = edge(Some(&builder.url()), Ttl::Short).await;
    let r = edge.server.get("/hello").await;
    assert_eq!(r.status, 424, "{}", r.text());
    assert_eq!(r.header("retry-after"), None);
    let log_url = format!("{}{}/log", builder.url(), build_path(HELLO_DRV));
    let (code, err) = run_script(&r);
    assert_eq!(code, Some(1));
    assert_eq!(
        err,
        format!("binplz: hello failed to build (failed): {reason}\nbinplz: build log: {log_url}\n")
    );
    // The log is where the body says.
    let addr = builder
        .url()
        .trim_start_matches("http://")
        .parse()
        .expect("an address");
    let log = Client { addr }
        .get(&format!("{}/log", build_path(HELLO_DRV)))
        .await;
    assert_eq!(
        (log.status, log.text().as_str()),
        (200, "hello: compiling\nerror: it broke\n")
    );
    // A real curl told to retry asks once: the edge asked the builder once more.
    let asked = builder.asked(HELLO_DRV);
    let url = format!("http://{}/hello", edge.server.client.addr);
    // Off the runtime, which serves the edge.
    let curl = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["--retry", "5", "-fsS", &url, "-o", "/dev/null"])
            .output()
            .expect("running curl")
    })
    .await
    .expect("the curl task");
    assert_eq!(curl.status.code(), Some(22), "curl: {curl:?}");
    assert_eq!(builder.asked(HELLO_DRV), asked + 1);

    // A dependency's failure names it.
    builder.set(
        HELLO_DRV,
        Script::Failed {
            class: "dependency_failed".into(),
            permanent: true,
            reason: "a dependency failed to build".into(),
            retry_at: None,
        },
    );
    let r = edge.server.get("/hello").await;
    assert_eq!(r.status, 424);
    assert!(r
        .text()
        .contains("(dependency_failed): a dependency failed to build"));
}

#[tokio::test]
async fn a_transient_failure_waits_for_its_next_try() {
    let builder = FakeBuilder::start();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    builder.set(
        HELLO_DRV,
        Script::Failed {
            class: "transient".into(),
            permanent: false,
            reason: "the Nix daemon is unreachable".into(),
            retry_at: Some(now + 180),
        },
    );
    let edge = edge(Some(&builder.url()), Ttl::Short).await;
    let r = edge.server.get("/hello").await;
    assert_eq!(r.status, 503, "{}", r.text());
    let after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((170..=180).contains(&after), "Retry-After: {after}");
    let (_, err) = run_script(&r);
    assert!(
        err.starts_with("binplz: hello is not built: its build failed (transient: the Nix daemon is unreachable) and will be tried again in "),
        "{err}"
    );
}

#[tokio::test]
async fn refusals_are_429_with_the_builders_retry_after_or_422() {
    let builder = FakeBuilder::start();
    builder.set(
        HELLO_DRV,
        Script::Refused {
            reason: "this address started 10 builds in the last hour".into(),
            retry_after: Some(120),
        },
    );
    let edge = edge(Some(&builder.url()), Ttl::Short).await;
    let r = edge.server.get("/hello").await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("120"));
    let (_, err) = run_script(&r);
    assert!(
        err.starts_with("binplz: hello is not built, and this address may start no more builds for now: this address started 10 builds in the last hour\n"),
        "{err}"
    );
    builder.set(
        HELLO_DRV,
        Script::Refused {
            reason: "no loaded index names this derivation".into(),
            retry_after: None,
        },
    );
    let r = edge.server.get("/hello").await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("no loaded index names this derivation"));
}

#[tokio::test]
async fn an_unreachable_or_broken_builder_is_503_and_built_programs_are_unaffected() {
    let down = closed_port_url();
    let edge = edge(Some(&down), Ttl::Short).await;
    let r = edge.server.get("/hello").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    let (_, err) = run_script(&r);
    assert!(
        err.starts_with("binplz: hello is not built yet, and the builder cannot be asked right now\nbinplz: to wait for it: curl --retry 30"),
        "{err}"
    );
    let r = edge.server.get("/goodbye").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == prebuilt("goodbye"));
    let m = edge.server.get("/-/metrics").await.text();
    assert!(
        m.contains("binplz_builder_questions_total{result=\"error\"} 1\n"),
        "{m}"
    );

    let builder = FakeBuilder::start();
    for code in [500, 404, 200] {
        builder.set(HELLO_DRV, Script::Broken(code));
        let edge = self::edge(Some(&builder.url()), Ttl::Short).await;
        let r = edge.server.get("/hello").await;
        assert_eq!(r.status, 503, "{code}: {}", r.text());
        assert!(r.text().contains("the builder cannot be asked"), "{code}");
        assert_eq!(edge.server.get("/goodbye").await.status, 200);
    }
}

#[tokio::test]
async fn a_built_output_without_the_program_is_404_saying_so() {
    let builder = FakeBuilder::start();
    builder.set(HELLO_DRV, Script::built(paths::HELLO));
    let edge = edge(Some(&builder.url()), Ttl::Short).await;
    publish_hello(edge.store.path());
    let r = edge.server.get("/nosuch").await;
    assert_eq!(r.status, 404, "{}", r.text());
    let (_, err) = run_script(&r);
    assert_eq!(
        err,
        format!(
            "binplz: nosuch was built, but {} has no bin/nosuch\n",
            paths::HELLO
        )
    );
}

#[tokio::test]
async fn without_a_builder_programs_not_built_are_503_as_before_and_nothing_is_asked() {
    let builder = FakeBuilder::start();
    let edge = edge(None, Ttl::Short).await;
    publish_hello(edge.store.path());
    let r = edge.server.get("/hello").await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("60"));
    let (_, err) = run_script(&r);
    assert_eq!(
        err,
        format!(
            "binplz: hello (hello, {}) is not built yet; try again later\n",
            paths::HELLO
        )
    );
    assert_eq!(builder.total_asked(), 0);
    let m = edge.server.get("/-/metrics").await.text();
    assert!(!m.contains("binplz_builder_"), "{m}");
}
