//! Building with real Nix in tests: derivations made of the static busybox (each with a
//! nonce, so runs and parallel tests never share outputs in `/nix/store`), an index that
//! names them as not built, and `binplz builder` run as its own process.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use binplz::index::{format, Metadata, NotBuilt};
use tempfile::TempDir;

use super::server::{Client, Reply};

/// What Nix needs here: single-user, no sandbox, no build users, nothing substituted.
pub const NIX_CONFIG: &str =
    "experimental-features = nix-command\nsandbox = false\nbuild-users-group =\nsubstituters =";
pub const SYSTEM: &str = "x86_64-linux";

/// A nonce unique to this process and call.
pub fn nonce() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{t}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Derivations instantiated from `(name, builder script)` pairs. A script may use
/// `${other}` for another derivation of the set (a dependency).
pub struct Derivations {
    /// Holds the expression and its busybox while the derivations are used.
    _dir: TempDir,
    /// Name → `.drv` path.
    pub drvs: BTreeMap<String, String>,
    /// Name → `out` path.
    pub outs: BTreeMap<String, String>,
}

impl Derivations {
    pub fn new(specs: &[(&str, &str)]) -> Derivations {
        let dir = tempfile::tempdir().expect("tempdir");
        let bb = dir.path().join("bb");
        std::fs::create_dir(&bb).expect("mkdir");
        std::fs::copy("/bin/busybox", bb.join("busybox")).expect("static busybox at /bin/busybox");
        std::os::unix::fs::symlink("busybox", bb.join("sh")).expect("symlink");
        let nonce = nonce();
        let mut nix = format!(
            "let\n  bb = builtins.path {{ path = ./bb; name = \"busybox\"; }};\n  \
             mk = name: script: derivation {{ inherit name; nonce = \"{nonce}\"; \
             system = \"{SYSTEM}\"; builder = \"${{bb}}/sh\"; args = [ \"-e\" \"-c\" script ]; }};\n\
             in rec {{\n"
        );
        for (name, script) in specs {
            // Quoted, so that a name Nix allows in a store path but not as an identifier
            // (`a?b=c`) is an attribute too.
            nix.push_str(&format!("  \"{name}\" = mk \"{name}\" ''{script}'';\n"));
        }
        nix.push_str("}\n");
        let file = dir.path().join("default.nix");
        std::fs::write(&file, nix).expect("write default.nix");
        let mut drvs = BTreeMap::new();
        let mut outs = BTreeMap::new();
        for (name, _) in specs {
            let out = nix_cmd("nix-instantiate")
                .arg(&file)
                .args(["-A", name])
                .output()
                .expect("running nix-instantiate");
            assert!(
                out.status.success(),
                "nix-instantiate: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let drv = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let outputs = binplz::builder::nix::outputs_of(&drv).expect("reads the .drv");
            outs.insert(name.to_string(), outputs["out"].clone());
            drvs.insert(name.to_string(), drv);
        }
        Derivations {
            _dir: dir,
            drvs,
            outs,
        }
    }

    pub fn drv(&self, name: &str) -> &str {
        &self.drvs[name]
    }

    /// The Nix expression the derivations come from (an attribute set of them).
    pub fn expression(&self) -> PathBuf {
        self._dir.path().join("default.nix")
    }

    /// An index naming every derivation as a not-built program of its name.
    pub fn write_index(&self, path: &Path) {
        let not_built: Vec<NotBuilt> = self
            .drvs
            .iter()
            .map(|(name, drv)| NotBuilt {
                system: SYSTEM.into(),
                program: name.clone(),
                attr: name.clone(),
                store_path: self.outs[name].clone(),
                drv_path: Some(drv.clone()),
            })
            .collect();
        let meta = Metadata {
            revision: Some("builds".into()),
            systems: vec![SYSTEM.into()],
            not_built: not_built.len() as u64,
            ..Metadata::default()
        };
        format::write(path, &meta, &[], &not_built, &[]).expect("writes the index");
    }
}

/// A Nix command with this module's configuration.
pub fn nix_cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("NIX_CONFIG", NIX_CONFIG);
    c
}

/// The base name of a store path.
pub fn base(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The committed test signing key (`fixtures/keys/`).
pub fn secret_key() -> PathBuf {
    super::fixtures().join("keys/binplz-test-1.secret")
}

/// `binplz builder`, running: its address, directories and log lines.
pub struct BuilderProcess {
    child: Child,
    pub addr: SocketAddr,
    lines: std::sync::mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

/// Where one builder keeps everything: `state/`, `store/`, `index`, `token`.
pub struct BuilderDirs {
    pub root: TempDir,
}

impl BuilderDirs {
    pub fn new() -> BuilderDirs {
        BuilderDirs {
            root: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn index(&self) -> PathBuf {
        self.root.path().join("index")
    }

    pub fn store(&self) -> PathBuf {
        self.root.path().join("store")
    }

    pub fn state(&self) -> PathBuf {
        self.root.path().join("state")
    }

    /// Writes an operator token file and returns its path.
    pub fn token(&self, token: &str) -> PathBuf {
        let p = self.root.path().join("token");
        std::fs::write(&p, format!("{token}\n")).expect("write token");
        p
    }
}

impl BuilderProcess {
    /// Starts `binplz builder` on `dirs` with `extra` options; `path_first` goes first on
    /// its `PATH` (a wrapper of `nix-store`, say).
    pub fn start(dirs: &BuilderDirs, extra: &[&str], path_first: Option<&Path>) -> BuilderProcess {
        let store = format!("file://{}", dirs.store().display());
        BuilderProcess::start_to(dirs, &store, extra, path_first, |_| {})
    }

    /// Starts `binplz builder` publishing to `store_uri`; `setup` adds to its command (its
    /// environment, say).
    pub fn start_to(
        dirs: &BuilderDirs,
        store_uri: &str,
        extra: &[&str],
        path_first: Option<&Path>,
        setup: impl FnOnce(&mut Command),
    ) -> BuilderProcess {
        let mut cmd = super::cli::binplz();
        setup(&mut cmd);
        cmd.arg("builder")
            .args(["--listen", "127.0.0.1:0", "--index"])
            .arg(dirs.index())
            .args(["--store-uri", store_uri])
            .arg("--secret-key-file")
            .arg(secret_key())
            .arg("--state-dir")
            .arg(dirs.state())
            .args(["--index-poll", "200ms"])
            .args(extra)
            .env("NIX_CONFIG", NIX_CONFIG)
            .env("BINPLZ_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(first) = path_first {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", first.display()));
        }
        let mut child = cmd.spawn().expect("starting binplz builder");
        let lines = crate::support::cli::stderr_lines(&mut child);
        let mut p = BuilderProcess {
            child,
            addr: ([0, 0, 0, 0], 0).into(),
            lines,
            seen: Vec::new(),
        };
        let line = p
            .wait_for(|l| l.contains("listening"))
            .unwrap_or_else(|| panic!("the builder did not listen: {:#?}", p.seen));
        p.addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .parse()
            .expect("a socket address");
        p
    }

    /// The next line logged that `pred` accepts, within 10 s.
    pub fn wait_for(&mut self, pred: impl Fn(&str) -> bool) -> Option<String> {
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

    pub fn client(&self) -> Client {
        Client { addr: self.addr }
    }

    /// SIGKILL: no chance to record anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BuilderProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The API's calls, with JSON bodies parsed.
pub struct Api {
    pub client: Client,
}

impl Api {
    pub fn of(p: &BuilderProcess) -> Api {
        Api { client: p.client() }
    }

    pub async fn post(&self, drv: &str, client: &str) -> (Reply, serde_json::Value) {
        let body = serde_json::json!({ "drv_path": drv, "client": client }).to_string();
        let r = self
            .client
            .send_body(
                "POST",
                "/builds",
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .await
            .expect("POST /builds")
            .reply()
            .await
            .expect("a reply");
        let v = json_of(&r);
        (r, v)
    }

    pub async fn get(&self, drv: &str) -> (Reply, serde_json::Value) {
        let r = self.client.get(&format!("/builds/{}", base(drv))).await;
        let v = json_of(&r);
        (r, v)
    }

    /// `POST /builds/<drv>/<action>` with `token` as the bearer, if any.
    pub async fn operator(
        &self,
        drv: &str,
        action: &str,
        token: Option<&str>,
    ) -> (Reply, serde_json::Value) {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        let r = self
            .client
            .request("POST", &format!("/builds/{}/{action}", base(drv)), &headers)
            .await;
        let v = json_of(&r);
        (r, v)
    }

    /// Polls the build's state until `pred` holds; panics after `limit`.
    pub async fn wait_until(
        &self,
        drv: &str,
        limit: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let (_, v) = self.get(drv).await;
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "gave up waiting; last state {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn json_of(r: &Reply) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null)
}
