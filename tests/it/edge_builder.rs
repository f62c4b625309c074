//! An edge (`binplz serve --builder`, in-process) in front of a real `binplz builder`
//! (its own process, real Nix): busybox derivations with a unique nonce, evaluated with
//! `nix-env -qaP --json --out-path --drv-path` and indexed with `binplz index build`
//! against the builder's (empty) store, so every program starts "not built".

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use binplz::server::building::BuilderSettings;
use binplz::server::{Config, IndexSource};
use binplz::upstream::{self, Deadlines};
use tempfile::TempDir;

use crate::support::builds::{base, nix_cmd, Api, BuilderDirs, BuilderProcess, Derivations};
use crate::support::cli::{binplz, run};
use crate::support::server::{client_config, Reply, Server, Setup};

/// Long enough for a trivial build on a busy machine.
const BUILD: Duration = Duration::from_secs(120);

const TOOL: (&str, &str) = (
    "edgetool",
    "echo building edgetool; mkdir -p $out/bin; printf '#!/bin/sh\\necho edge ok\\n' > $out/bin/edgetool; chmod 0555 $out/bin/edgetool",
);
const BROKEN: (&str, &str) = ("edgebroken", "echo about to fail; exit 1");

/// Evaluates `drvs` with `nix-env` and indexes the listing against the builder's store
/// (`binplz index build`), into the builder's index file.
fn index_from_nix_env(drvs: &Derivations, dirs: &BuilderDirs) {
    std::fs::create_dir_all(dirs.store()).expect("the store directory");
    let listing = dirs.root.path().join("nix-env.json");
    let out = nix_cmd("nix-env")
        .arg("-f")
        .arg(drvs.expression())
        .args(["-qaP", "--json", "--out-path", "--drv-path"])
        .output()
        .expect("running nix-env");
    assert!(
        out.status.success(),
        "nix-env: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nix 2.8's `--json` leaves out `drvPath` even with `--drv-path` (newer Nix prints
    // it): add each derivation's, as `nix-instantiate` gave it.
    let mut json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nix-env's JSON");
    for (attr, drv) in &drvs.drvs {
        json[attr.as_str()]["drvPath"] = serde_json::json!(drv);
    }
    std::fs::write(&listing, json.to_string()).expect("writing the listing");
    let indexed = run(binplz()
        .args(["index", "build", "--eval"])
        .arg(&listing)
        .arg("--upstream")
        .arg(format!("file://{}", dirs.store().display()))
        .args(["--revision", "edge-builds", "-o"])
        .arg(dirs.index()));
    assert!(
        indexed.status.success(),
        "binplz index build: {}",
        String::from_utf8_lossy(&indexed.stderr)
    );
}

/// The derivations, indexed, and the builder running on them.
fn builder_for(specs: &[(&str, &str)]) -> (Derivations, BuilderDirs, BuilderProcess) {
    let drvs = Derivations::new(specs);
    let dirs = BuilderDirs::new();
    index_from_nix_env(&drvs, &dirs);
    let p = BuilderProcess::start(&dirs, &[], None);
    (drvs, dirs, p)
}

/// An edge serving the builder's index from the builder's store, asking the builder.
async fn edge(dirs: &BuilderDirs, builder: &BuilderProcess, cache: &Path) -> Server {
    let store = format!("file://{}", dirs.store().display());
    let url = format!("http://{}", builder.addr);
    let config = Config {
        max_per_client: 200,
        builder: Some(BuilderSettings {
            public_url: url.clone(),
            url,
            timeout: Duration::from_secs(10),
            answer_ttl: Duration::from_millis(200),
            retry_after: Duration::from_secs(1),
        }),
        ..Config::default()
    };
    Server::start(Setup {
        config,
        upstreams: vec![upstream::open(&store, &client_config()).expect("a file:// upstream")],
        deadlines: Deadlines::default(),
        indexes: vec![IndexSource::File(dirs.index())],
        cache_dir: cache.to_owned(),
        disk_bytes: 64 << 20,
        memory_bytes: 16 << 20,
        threads: 1,
        spill_dir: None,
    })
    .await
}

/// Asks the edge for `target` until the answer is not a 503, within [`BUILD`].
async fn until_not_503(edge: &Server, target: &str) -> Reply {
    let deadline = Instant::now() + BUILD;
    loop {
        let r = edge.get(target).await;
        if r.status != 503 {
            return r;
        }
        assert!(Instant::now() < deadline, "still 503: {}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_edge_requests_are_one_build_and_curl_retry_gets_the_built_bytes() {
    let (drvs, dirs, p) = builder_for(&[TOOL]);
    let cache = TempDir::new().expect("a temporary directory");
    let edge = edge(&dirs, &p, cache.path()).await;
    let drv = drvs.drv("edgetool");

    let requests: Vec<_> = (0..50)
        .map(|_| {
            let client = edge.client;
            tokio::spawn(async move { client.get("/edgetool").await })
        })
        .collect();
    for r in requests {
        let r = r.await.expect("the request task");
        assert!(matches!(r.status, 503 | 200), "{}: {}", r.status, r.text());
    }

    // curl waits by itself, as the 503 says, and ends with the built file's bytes.
    let out = TempDir::new().expect("a temporary directory");
    let file = out.path().join("edgetool");
    let url = format!("http://{}/edgetool", edge.client.addr);
    let target = file.clone();
    let curl = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["--retry", "60", "-fsSL", &url, "-o"])
            .arg(&target)
            .output()
            .expect("running curl")
    })
    .await
    .expect("the curl task");
    assert!(
        curl.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&curl.stderr)
    );
    let built = Path::new(&drvs.outs["edgetool"]).join("bin/edgetool");
    let expected = std::fs::read(&built).expect("the built program in the store");
    assert_eq!(std::fs::read(&file).expect("curl's output"), expected);
    assert_eq!(expected, b"#!/bin/sh\necho edge ok\n");

    // One build, however many requests.
    let (_, v) = Api::of(&p).get(drv).await;
    assert_eq!(v["state"], "built", "{v}");
    assert_eq!(v["attempts"], 1, "{v}");
    let m = edge.get("/-/metrics").await.text();
    assert!(
        m.contains("binplz_builder_answers_total{state=\"built\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_build_through_the_edge_names_its_log_which_the_builder_serves() {
    let (drvs, dirs, p) = builder_for(&[BROKEN]);
    let cache = TempDir::new().expect("a temporary directory");
    let edge = edge(&dirs, &p, cache.path()).await;
    let drv = drvs.drv("edgebroken");
    let r = until_not_503(&edge, "/edgebroken").await;
    assert_eq!(r.status, 424, "{}", r.text());
    let log_url = format!("http://{}/builds/{}/log", p.addr, base(drv));
    let text = r.text();
    assert!(
        text.contains("edgebroken failed to build (failed)"),
        "{text}"
    );
    assert!(text.contains(&format!("build log: {log_url}")), "{text}");
    let log = p.client().get(&format!("/builds/{}/log", base(drv))).await;
    assert_eq!(log.status, 200);
    assert!(log.text().contains("about to fail"), "{}", log.text());
    // Asked again, it stays failed: not built again.
    assert_eq!(edge.get("/edgebroken").await.status, 424);
    let (_, v) = Api::of(&p).get(drv).await;
    assert_eq!(v["attempts"], 1, "{v}");
}
