//! `binplz builder`: queue throughput (distinct-derivation requests accepted a second, state
//! look-ups a second, over HTTP with keep-alive) and the builder's own overhead on a trivial
//! derivation (POST → built, minus the same `nix-store --realise` + `nix copy` by hand).
//!
//! `cargo bench --bench builder`; `BINPLZ_BENCH_SKIP_NIX=1` measures the queue only.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use binplz::builder::publish::StoreUri;
use binplz::builder::{Builder, Config};
use binplz::index::{format, Metadata, NotBuilt};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const NIX_CONFIG: &str =
    "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =";
const POSTS: usize = 20_000;
const LOOKUPS: usize = 50_000;
const CONNECTIONS: usize = 32;
const TRIVIAL_RUNS: usize = 5;

fn drv(i: usize) -> String {
    format!("/nix/store/{:0>32}-bench-{i}.drv", i % 100_000_000)
}

fn config(dir: &Path, index: &Path, budget_hours: f64) -> Config {
    Config {
        indexes: vec![index.to_owned()],
        max_index_size: 1 << 30,
        index_poll: Duration::from_secs(3600),
        store: StoreUri::File(dir.join("store")),
        secret_key_file: Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/keys/binplz-test-1.secret"),
        state_dir: dir.join("state"),
        max_parallel: 1,
        timeout: Duration::from_secs(600),
        max_silent_time: Duration::from_secs(600),
        max_log_size: 1 << 20,
        max_nar_size: 1 << 30,
        cores: 1,
        monthly_budget: budget_hours * 3600.0,
        per_client_builds: u32::MAX,
        retry_delay: Duration::from_secs(60),
        operator_token: None,
    }
}

fn write_index(path: &Path, drvs: &[(String, String)]) {
    let not_built: Vec<NotBuilt> = drvs
        .iter()
        .enumerate()
        .map(|(i, (drv, out))| NotBuilt {
            system: "x86_64-linux".into(),
            program: format!("p{i}"),
            attr: format!("p{i}"),
            store_path: out.clone(),
            drv_path: Some(drv.clone()),
        })
        .collect();
    format::write(path, &Metadata::default(), &[], &not_built, &[]).expect("index");
}

async fn start(cfg: Config) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let builder = Builder::open(cfg).expect("builder opens");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(binplz::builder::run(listener, builder, async {
        let _ = rx.await;
    }));
    (addr, tx)
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn request(c: &HttpClient, method: &str, url: &str, body: String) -> u16 {
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = c.request(req).await.expect("response");
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    status
}

/// Runs `n` requests made by `make(i)` over `CONNECTIONS` keep-alive connections; returns
/// requests a second and the statuses seen.
async fn hammer(
    c: &HttpClient,
    n: usize,
    make: impl Fn(usize) -> (&'static str, String, String) + Send + Sync + 'static,
) -> (f64, Vec<u16>) {
    let make = Arc::new(make);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..CONNECTIONS {
        let (c, make) = (c.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for i in (w..n).step_by(CONNECTIONS) {
                let (m, url, body) = make(i);
                statuses.push(request(&c, m, &url, body).await);
            }
            statuses
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    (n as f64 / t.elapsed().as_secs_f64(), all)
}

async fn queue_throughput() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dir.path().join("index");
    let drvs: Vec<(String, String)> = (0..POSTS)
        .map(|i| (drv(i), format!("/nix/store/{:0>32}-bench-{i}", i)))
        .collect();
    write_index(&index, &drvs);
    // A budget of 0 hours: everything stays queued, no Nix runs.
    let (addr, stop) = start(config(dir.path(), &index, 0.0)).await;
    let c: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONNECTIONS)
        .build_http();
    let base = format!("http://{addr}");
    let b = base.clone();
    let (posts, statuses) = hammer(&c, POSTS, move |i| {
        let body = serde_json::json!({"drv_path": drv(i), "client": "192.0.2.1"}).to_string();
        ("POST", format!("{b}/builds"), body)
    })
    .await;
    assert!(statuses.iter().all(|s| *s == 202), "all accepted");
    let b = base.clone();
    let (lookups, statuses) = hammer(&c, LOOKUPS, move |i| {
        let d = drv(i % POSTS);
        let base_name = d.rsplit('/').next().unwrap_or_default().to_owned();
        ("GET", format!("{b}/builds/{base_name}"), String::new())
    })
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "all found");
    println!(
        "queue: {POSTS} distinct POST /builds accepted at {posts:.0}/s; \
         {LOOKUPS} GET /builds/<drv> at {lookups:.0}/s ({CONNECTIONS} keep-alive connections)"
    );
    let _ = stop.send(());
}

fn nix(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("NIX_CONFIG", NIX_CONFIG);
    c
}

/// A fresh trivial derivation (unique nonce) in `dir`: its `.drv` and `out` paths.
fn trivial(dir: &Path, nonce: &str) -> (String, String) {
    let bb = dir.join("bb");
    if !bb.exists() {
        std::fs::create_dir(&bb).expect("mkdir");
        std::fs::copy("/bin/busybox", bb.join("busybox")).expect("static busybox");
        std::os::unix::fs::symlink("busybox", bb.join("sh")).expect("symlink");
    }
    let file = dir.join(format!("{nonce}.nix"));
    std::fs::write(
        &file,
        format!(
            "let bb = builtins.path {{ path = ./bb; name = \"busybox\"; }}; in derivation {{ \
             name = \"trivial\"; nonce = \"{nonce}\"; system = \"x86_64-linux\"; \
             builder = \"${{bb}}/sh\"; args = [ \"-c\" \"echo hi > $out\" ]; }}"
        ),
    )
    .expect("write");
    let out = nix("nix-instantiate")
        .arg(&file)
        .output()
        .expect("nix-instantiate");
    let drv = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let outs = binplz::builder::nix::outputs_of(&drv).expect("outputs");
    (drv, outs["out"].clone())
}

async fn overhead() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut by_builder = Vec::new();
    let mut by_hand = Vec::new();
    for run in 0..TRIVIAL_RUNS {
        // By hand: realise and copy to a signed staging cache.
        let (drv, _) = trivial(dir.path(), &format!("hand-{stamp}-{run}"));
        let t = Instant::now();
        let ok = nix("nix-store")
            .args(["--realise", &drv])
            .output()
            .expect("nix-store");
        assert!(ok.status.success());
        let out = String::from_utf8_lossy(&ok.stdout).trim().to_owned();
        let to = format!(
            "file://{}/hand-{run}?compression=zstd&secret-key={}&write-nar-listing=true",
            dir.path().display(),
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/keys/binplz-test-1.secret")
                .display()
        );
        let copied = nix("nix")
            .args(["copy", "--to", &to, &out])
            .output()
            .expect("nix copy");
        assert!(copied.status.success());
        by_hand.push(t.elapsed());

        // By the builder: POST → built.
        let sub = dir.path().join(format!("b{run}"));
        std::fs::create_dir(&sub).expect("mkdir");
        let (drv, out) = trivial(dir.path(), &format!("builder-{stamp}-{run}"));
        let index = sub.join("index");
        write_index(&index, &[(drv.clone(), out)]);
        let (addr, stop) = start(config(&sub, &index, 100.0)).await;
        let c: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let base_name = drv.rsplit('/').next().unwrap_or_default().to_owned();
        let t = Instant::now();
        let s = request(
            &c,
            "POST",
            &format!("http://{addr}/builds"),
            serde_json::json!({"drv_path": drv, "client": "x"}).to_string(),
        )
        .await;
        assert_eq!(s, 202);
        loop {
            let req = http::Request::get(format!("http://{addr}/builds/{base_name}"))
                .body(Full::new(Bytes::new()))
                .expect("req");
            let resp = c.request(req).await.expect("resp");
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
            match v["state"].as_str() {
                Some("built") => break,
                Some("failed") => panic!("{v}"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        by_builder.push(t.elapsed());
        let _ = stop.send(());
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (b, h) = (median(&mut by_builder), median(&mut by_hand));
    println!(
        "trivial derivation, median of {TRIVIAL_RUNS}: builder POST→built {:.0} ms, \
         nix-store --realise + nix copy by hand {:.0} ms, overhead {:.0} ms",
        b.as_secs_f64() * 1e3,
        h.as_secs_f64() * 1e3,
        (b.as_secs_f64() - h.as_secs_f64()) * 1e3
    );
}

fn main() {
    // For the builder's own Nix processes (set before any thread starts).
    std::env::set_var("NIX_CONFIG", NIX_CONFIG);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        queue_throughput().await;
        if std::env::var_os("BINPLZ_BENCH_SKIP_NIX").is_none() {
            overhead().await;
        }
    });
}
