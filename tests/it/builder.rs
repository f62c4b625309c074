//! `binplz builder` with real Nix: derivations of the static busybox that succeed, fail,
//! time out, fail through a dependency or fail transiently; the builder killed and
//! restarted; refusals, budgets, the operator's token; a herd of requests for one build.

use std::time::Duration;

use crate::support::builds::{base, nix_cmd, Api, BuilderDirs, BuilderProcess, Derivations};
use crate::support::Key;

/// Long enough for a trivial build on a busy machine.
const BUILD: Duration = Duration::from_secs(120);

const OK: (&str, &str) = (
    "okprog",
    "echo building okprog; mkdir -p $out/bin; printf '#!/bin/sh\\necho ok\\n' > $out/bin/okprog; chmod 0555 $out/bin/okprog",
);
const FAILS: (&str, &str) = ("fails", "echo about to fail; exit 1");

fn state(v: &serde_json::Value) -> &str {
    v["state"].as_str().unwrap_or_default()
}

fn ended(v: &serde_json::Value) -> bool {
    matches!(state(v), "built" | "failed")
}

/// Sets up derivations, their index and a running builder.
fn start(specs: &[(&str, &str)], extra: &[&str]) -> (Derivations, BuilderDirs, BuilderProcess) {
    let drvs = Derivations::new(specs);
    let dirs = BuilderDirs::new();
    drvs.write_index(&dirs.index());
    let p = BuilderProcess::start(&dirs, extra, None);
    (drvs, dirs, p)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_successful_build_is_published_signed_with_its_log() {
    let (drvs, dirs, p) = start(&[OK], &[]);
    let api = Api::of(&p);
    let drv = drvs.drv("okprog");
    let (r, v) = api.post(drv, "192.0.2.1").await;
    assert_eq!(r.status, 202, "{v}");
    assert!(matches!(state(&v), "queued" | "building"), "{v}");
    let v = api.wait_until(drv, BUILD, ended).await;
    assert_eq!(state(&v), "built", "{v}");
    assert_eq!(v["attempts"], 1);
    let out = &drvs.outs["okprog"];
    assert_eq!(v["outputs"]["out"], out.as_str());
    assert!(v.get("failure").is_none(), "{v}");

    // In the store: a signed narinfo, its NAR, a listing, and the log where Nix looks.
    let store = dirs.store();
    let hash = &base(out)[..32];
    let narinfo = std::fs::read_to_string(store.join(format!("{hash}.narinfo"))).expect("narinfo");
    assert!(narinfo.contains(&format!("StorePath: {out}")), "{narinfo}");
    assert!(narinfo.contains("Compression: zstd"), "{narinfo}");
    assert!(narinfo.contains("Sig: binplz-test-1:"), "{narinfo}");
    assert!(store.join(format!("{hash}.ls")).exists());
    let log = std::fs::read_to_string(store.join("log").join(base(drv))).expect("log in store");
    assert!(log.contains("building okprog"), "{log}");
    let verify = nix_cmd("nix")
        .args(["store", "verify", "--store"])
        .arg(format!("file://{}", store.display()))
        .args(["--trusted-public-keys", &Key::test().public()])
        .arg(out)
        .output()
        .expect("nix store verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    let log = p.client().get(&format!("/builds/{}/log", base(drv))).await;
    assert_eq!(log.status, 200);
    assert_eq!(
        log.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert!(log.text().contains("building okprog"), "{}", log.text());

    // Asking again returns the same build, unchanged.
    let (r, again) = api.post(drv, "192.0.2.2").await;
    assert_eq!(r.status, 200);
    assert_eq!(again, v);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_builder_is_permanent_never_retried_and_its_log_served() {
    let (drvs, _dirs, p) = start(&[FAILS], &["--retry-delay", "1s"]);
    let api = Api::of(&p);
    let drv = drvs.drv("fails");
    api.post(drv, "192.0.2.1").await;
    let v = api.wait_until(drv, BUILD, ended).await;
    assert_eq!(state(&v), "failed", "{v}");
    let f = &v["failure"];
    assert_eq!(f["class"], "failed", "{v}");
    assert_eq!(f["permanent"], true);
    assert!(
        f["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("failed with exit code 1"),
        "{v}"
    );
    assert!(v.get("retry_at").is_none(), "{v}");
    let log_path = f["log"].as_str().expect("a log link");
    assert_eq!(log_path, format!("/builds/{}/log", base(drv)));
    let log = p.client().get(log_path).await;
    assert_eq!(log.status, 200);
    assert!(log.text().contains("about to fail"), "{}", log.text());
    // However often it is asked for, it is not built again.
    for _ in 0..20 {
        let (r, again) = api.post(drv, "192.0.2.9").await;
        assert_eq!(r.status, 200);
        assert_eq!(again["attempts"], 1, "{again}");
        assert_eq!(state(&again), "failed");
    }
    let metrics = p.client().get("/-/metrics").await.text();
    assert!(
        metrics.contains("binplz_builder_failed{class=\"failed\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_build_past_its_timeout_is_timed_out() {
    let (drvs, _dirs, p) = start(
        &[("sleeper", "echo sleeping; sleep 60; mkdir $out")],
        &["--timeout", "1s"],
    );
    let api = Api::of(&p);
    let drv = drvs.drv("sleeper");
    api.post(drv, "192.0.2.1").await;
    let v = api.wait_until(drv, BUILD, ended).await;
    assert_eq!(v["failure"]["class"], "timed_out", "{v}");
    assert_eq!(v["failure"]["permanent"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_dependency_is_named() {
    let (drvs, _dirs, p) = start(&[FAILS, ("needsfails", "echo ${fails}; mkdir $out")], &[]);
    let api = Api::of(&p);
    let drv = drvs.drv("needsfails");
    api.post(drv, "192.0.2.1").await;
    let v = api.wait_until(drv, BUILD, ended).await;
    let f = &v["failure"];
    assert_eq!(f["class"], "dependency_failed", "{v}");
    assert_eq!(f["dependency"], drvs.drv("fails"), "{v}");
    assert_eq!(f["permanent"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transient_failure_is_retried_and_then_builds() {
    let drvs = Derivations::new(&[OK]);
    let dirs = BuilderDirs::new();
    drvs.write_index(&dirs.index());
    // A nix-store that fails once, before any build, as an unreachable daemon would.
    let bin = dirs.root.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let marker = dirs.root.path().join("failed-once");
    let real = which("nix-store");
    let wrapper = bin.join("nix-store");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ ! -e '{m}' ]; then touch '{m}'; echo 'error: cannot connect to the daemon' >&2; exit 1; fi\nexec '{real}' \"$@\"\n",
            m = marker.display()
        ),
    )
    .expect("write wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let p = BuilderProcess::start(&dirs, &["--retry-delay", "1s"], Some(&bin));
    let api = Api::of(&p);
    let drv = drvs.drv("okprog");
    api.post(drv, "192.0.2.1").await;
    let first = api
        .wait_until(drv, BUILD, |v| state(v) == "failed" || state(v) == "built")
        .await;
    assert_eq!(first["failure"]["class"], "transient", "{first}");
    assert_eq!(first["failure"]["permanent"], false, "{first}");
    assert!(first["retry_at"].as_i64().is_some(), "{first}");
    let v = api.wait_until(drv, BUILD, |v| state(v) == "built").await;
    assert_eq!(v["attempts"], 2, "{v}");
    assert!(marker.exists());
}

fn which(program: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .expect("sh");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_builder_killed_during_a_build_finishes_it_after_a_restart() {
    let (drvs, dirs, p) = start(
        &[(
            "slow",
            "echo working; sleep 2; mkdir -p $out; echo done > $out/done",
        )],
        &[],
    );
    let api = Api::of(&p);
    let drv = drvs.drv("slow");
    api.post(drv, "192.0.2.1").await;
    api.wait_until(drv, BUILD, |v| state(v) == "building").await;
    p.kill();
    let p = BuilderProcess::start(&dirs, &[], None);
    let api = Api::of(&p);
    let (_, v) = api.get(drv).await;
    assert!(matches!(state(&v), "queued" | "building"), "{v}");
    let v = api.wait_until(drv, BUILD, ended).await;
    assert_eq!(state(&v), "built", "{v}");
    assert_eq!(v["attempts"], 2, "{v}");
    let hash = &base(&drvs.outs["slow"])[..32];
    assert!(dirs.store().join(format!("{hash}.narinfo")).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_derivation_no_index_names_is_refused_and_garbage_is_a_bad_request() {
    let (_drvs, dirs, p) = start(&[OK], &[]);
    let other = Derivations::new(&[("stranger", "mkdir $out")]);
    let api = Api::of(&p);
    let stranger = other.drv("stranger");
    let (r, v) = api.post(stranger, "192.0.2.1").await;
    assert_eq!(r.status, 403, "{v}");
    assert_eq!(state(&v), "refused");
    assert_eq!(v["failure"]["class"], "refused");
    let (r, _) = api.get(stranger).await;
    assert_eq!(r.status, 404);
    for bad in [
        "{}".to_owned(),
        "not json".to_owned(),
        serde_json::json!({"drv_path": "/etc/passwd", "client": "x"}).to_string(),
        serde_json::json!({"drv_path": drvs_out_path(&other), "client": "x"}).to_string(),
    ] {
        let r = p
            .client()
            .send_body("POST", "/builds", &[], bad.as_bytes())
            .await
            .expect("send")
            .reply()
            .await
            .expect("reply");
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert!(crate::support::builds::json_of(&r)["error"].is_string());
    }
    // Once a reloaded index names it, it is built.
    other.write_index(&dirs.index());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (r, v) = api.post(stranger, "192.0.2.1").await;
        if r.status == 202 {
            break;
        }
        assert_eq!(r.status, 403, "{v}");
        assert!(
            std::time::Instant::now() < deadline,
            "the index was not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn drvs_out_path(d: &Derivations) -> String {
    d.outs.values().next().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_over_its_hourly_limit_is_refused_with_retry_after() {
    let (drvs, _dirs, p) = start(
        &[OK, FAILS, ("third", "mkdir $out")],
        &["--per-client-builds", "1"],
    );
    let api = Api::of(&p);
    let (r, _) = api.post(drvs.drv("okprog"), "192.0.2.1").await;
    assert_eq!(r.status, 202);
    let (r, v) = api.post(drvs.drv("fails"), "192.0.2.1").await;
    assert_eq!(r.status, 429, "{v}");
    assert_eq!(r.header("retry-after"), Some("3600"));
    assert_eq!(state(&v), "refused");
    assert!(
        v["failure"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("1 new builds"),
        "{v}"
    );
    // Asking for a build already queued costs nothing; another client has its own limit.
    let (r, _) = api.post(drvs.drv("okprog"), "192.0.2.1").await;
    assert_eq!(r.status, 200);
    let (r, _) = api.post(drvs.drv("third"), "192.0.2.7").await;
    assert_eq!(r.status, 202);
}

#[tokio::test(flavor = "multi_thread")]
async fn once_the_monthly_budget_is_spent_new_builds_wait_and_say_why() {
    // 0.0002 h is 0.72 s: the first build (over a second) spends it.
    let (drvs, _dirs, p) = start(
        &[("first", "sleep 1; mkdir $out"), ("second", "mkdir $out")],
        &["--monthly-budget", "0.0002"],
    );
    let api = Api::of(&p);
    api.post(drvs.drv("first"), "192.0.2.1").await;
    let v = api.wait_until(drvs.drv("first"), BUILD, ended).await;
    assert_eq!(state(&v), "built", "{v}");
    let (r, v) = api.post(drvs.drv("second"), "192.0.2.1").await;
    assert_eq!(r.status, 202);
    assert_eq!(state(&v), "queued", "{v}");
    assert_eq!(v["position"], 0);
    assert!(
        v["waiting"]
            .as_str()
            .unwrap_or_default()
            .contains("monthly build budget"),
        "{v}"
    );
    let page = p.client().get("/").await.text();
    assert!(
        page.contains("new builds wait: the monthly build budget"),
        "{page}"
    );
    let (_, v) = api.get(drvs.drv("second")).await;
    assert_eq!(state(&v), "queued", "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_and_cancel_need_the_operator_token() {
    let drvs = Derivations::new(&[FAILS, ("sleeper", "sleep 60; mkdir $out")]);
    let dirs = BuilderDirs::new();
    drvs.write_index(&dirs.index());
    let token = "correct-horse-battery";
    let file = dirs.token(token);
    let p = BuilderProcess::start(
        &dirs,
        &[
            "--operator-token-file",
            file.to_str().expect("utf-8"),
            "--max-parallel",
            "2",
        ],
        None,
    );
    let api = Api::of(&p);
    let fails = drvs.drv("fails");
    api.post(fails, "192.0.2.1").await;
    api.wait_until(fails, BUILD, ended).await;
    for wrong in [None, Some("wrong-token-here"), Some("")] {
        let (r, _) = api.operator(fails, "retry", wrong).await;
        assert_eq!(r.status, 401, "{wrong:?}");
    }
    let (_, v) = api.get(fails).await;
    assert_eq!(state(&v), "failed");
    let (r, v) = api.operator(fails, "retry", Some(token)).await;
    assert_eq!(r.status, 200, "{v}");
    assert!(matches!(state(&v), "queued" | "building"), "{v}");
    let v = api.wait_until(fails, BUILD, ended).await;
    assert_eq!(v["attempts"], 1, "counted again from zero: {v}");

    // Cancel stops a running build.
    let sleeper = drvs.drv("sleeper");
    api.post(sleeper, "192.0.2.1").await;
    api.wait_until(sleeper, BUILD, |v| state(v) == "building")
        .await;
    let (r, _) = api.operator(sleeper, "cancel", None).await;
    assert_eq!(r.status, 401);
    let (r, v) = api.operator(sleeper, "cancel", Some(token)).await;
    assert_eq!(r.status, 200, "{v}");
    assert_eq!(state(&v), "failed", "{v}");
    assert_eq!(v["failure"]["class"], "refused");
    drop(p);

    // Without a token file, the builder is read-only.
    let p = BuilderProcess::start(&dirs, &[], None);
    let (r, _) = Api::of(&p).operator(fails, "retry", Some(token)).await;
    assert_eq!(r.status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_requests_for_one_derivation_are_one_build() {
    let (drvs, _dirs, p) = start(&[OK], &["--per-client-builds", "1"]);
    let drv = drvs.drv("okprog").to_owned();
    let body = serde_json::json!({ "drv_path": drv, "client": "192.0.2.1" }).to_string();
    let client = p.client();
    // Every request is on the wire before any reply is read.
    let mut pending = Vec::new();
    for _ in 0..1000 {
        pending.push(
            client
                .send_body("POST", "/builds", &[], body.as_bytes())
                .await
                .expect("send"),
        );
    }
    let replies = futures_join(pending).await;
    let accepted = replies.iter().filter(|s| **s == 202).count();
    let existing = replies.iter().filter(|s| **s == 200).count();
    assert_eq!((accepted, existing), (1, 999), "{replies:?}");
    let api = Api::of(&p);
    let v = api.wait_until(&drv, BUILD, ended).await;
    assert_eq!(state(&v), "built", "{v}");
    assert_eq!(v["attempts"], 1);
}

async fn futures_join(pending: Vec<crate::support::server::Pending>) -> Vec<u16> {
    let tasks: Vec<_> = pending
        .into_iter()
        .map(|p| tokio::spawn(async move { p.reply().await.map(|r| r.status) }))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("task").expect("reply"));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_page_shows_the_builds_and_its_retry_button_works_in_chromium() {
    let drvs = Derivations::new(&[
        FAILS,
        OK,
        ("sleeper", "echo sleeping; sleep 60; mkdir $out"),
        ("later", "mkdir $out"),
    ]);
    let dirs = BuilderDirs::new();
    drvs.write_index(&dirs.index());
    let token = "page-token-0123";
    let file = dirs.token(token);
    let p = BuilderProcess::start(
        &dirs,
        &["--operator-token-file", file.to_str().expect("utf-8")],
        None,
    );
    let api = Api::of(&p);
    for name in ["fails", "okprog"] {
        api.post(drvs.drv(name), "192.0.2.1").await;
        api.wait_until(drvs.drv(name), BUILD, ended).await;
    }
    // One build running, one queued behind it (one at a time).
    api.post(drvs.drv("sleeper"), "192.0.2.1").await;
    api.wait_until(drvs.drv("sleeper"), BUILD, |v| state(v) == "building")
        .await;
    let (_, later) = api.post(drvs.drv("later"), "192.0.2.1").await;
    assert_eq!(later["position"], 0, "{later}");

    let browser = crate::support::webdriver::Browser::start().await;
    browser.goto(&format!("http://{}/", p.addr)).await;
    let text = |css: &'static str| {
        let b = &browser;
        async move {
            b.eval(&format!(
                "return document.querySelector('{css}').nextElementSibling.innerText"
            ))
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
        }
    };
    let failures = text("#failures").await;
    assert!(failures.contains(base(drvs.drv("fails"))), "{failures}");
    assert!(failures.contains("failed with exit code 1"), "{failures}");
    let queue = text("#queue").await;
    assert!(queue.contains(base(drvs.drv("later"))), "{queue}");
    let built = text("#built").await;
    assert!(built.contains(&drvs.outs["okprog"]), "{built}");
    let running = browser
        .eval("return document.body.innerText")
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(running.contains(base(drvs.drv("sleeper"))), "{running}");
    assert!(running.contains("h used"), "{running}");
    let log_href = browser
        .eval("return document.querySelector('#failures + table a').getAttribute('href')")
        .await;
    assert_eq!(
        log_href,
        format!("/builds/{}/log", base(drvs.drv("fails"))).as_str()
    );

    let shots = tempfile::tempdir().expect("tempdir");
    let png = browser.screenshot().await;
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let shot = shots.path().join("builder-page.png");
    std::fs::write(&shot, &png).expect("write screenshot");
    if let Some(keep) = std::env::var_os("BINPLZ_TEST_SCREENSHOTS") {
        std::fs::copy(&shot, std::path::Path::new(&keep).join("builder-page.png"))
            .expect("keep the screenshot");
    }

    // The retry button, with the token typed into the page, queues the failure again.
    let input = browser.find("#token").await;
    browser.type_into(&input, token).await;
    browser.click(&browser.find("#save").await).await;
    let kept = browser
        .eval("return sessionStorage.getItem('binplz-operator-token')")
        .await;
    assert_eq!(kept, token);
    let retry = browser
        .find(&format!(
            "button[data-action=retry][data-drv='{}']",
            base(drvs.drv("fails"))
        ))
        .await;
    browser.click(&retry).await;
    let v = api
        .wait_until(drvs.drv("fails"), BUILD, |v| state(v) == "queued")
        .await;
    assert_eq!(v["attempts"], 0, "{v}");
    api.operator(drvs.drv("sleeper"), "cancel", Some(token))
        .await;
}

/// A derivation's name may hold `?`, `&` or `=`; its outputs are published all the same
/// (the staging cache's URL given to `nix copy` must not take them for a query).
#[tokio::test(flavor = "multi_thread")]
async fn a_derivation_whose_name_looks_like_a_query_is_published() {
    let odd = (
        "odd?x=1",
        "mkdir -p $out/bin; printf '#!/bin/sh\\necho odd\\n' > $out/bin/odd; chmod 0555 $out/bin/odd",
    );
    let (drvs, dirs, p) = start(&[odd], &[]);
    let api = Api::of(&p);
    let drv = drvs.drv("odd?x=1");
    let (r, v) = api.post(drv, "192.0.2.1").await;
    assert_eq!(r.status, 202, "{v}");
    // Watched in the store itself: the API's paths do not take such a name yet.
    let out = &drvs.outs["odd?x=1"];
    let narinfo = dirs.store().join(format!("{}.narinfo", &base(out)[..32]));
    let deadline = std::time::Instant::now() + BUILD;
    while !narinfo.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = std::fs::read_to_string(&narinfo).expect("the narinfo is published");
    assert!(text.contains("Compression: zstd"), "{text}");
}
