//! The servers under test, as child processes that are stopped when their guard is dropped
//! (also while a panic unwinds), and their temp directories removed after them.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::http;
use super::store::Store;
use super::BenchResult;

/// How long a server may take to answer its first request.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A running child process, stopped on drop.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl Proc {
    /// Starts `cmd` with its output going to `log`.
    fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> BenchResult<Proc> {
        let out = fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
            stopped: false,
        })
    }

    /// An error if the process has exited, with the end of its output.
    fn check_running(&mut self) -> BenchResult<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => {
                self.stopped = true;
                Err(format!(
                    "{} exited ({status}); its output:\n{}",
                    self.name,
                    tail(&self.log)
                )
                .into())
            }
        }
    }

    /// Polls `path` on `port` until it answers 200, within [`READY_TIMEOUT`].
    fn wait_ready(&mut self, port: u16, path: &str) -> BenchResult<()> {
        let start = Instant::now();
        loop {
            self.check_running()?;
            if let Ok(r) = http::get(port, path, &mut Vec::new()) {
                if r.status == 200 {
                    return Ok(());
                }
            }
            if start.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "{} did not answer {path} within {READY_TIMEOUT:?}; its output:\n{}",
                    self.name,
                    tail(&self.log)
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (nginx's master then stops its workers; binplz finishes its responses),
    /// SIGKILL if it is still running after [`STOP_TIMEOUT`].
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let termed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let start = Instant::now();
        while termed && start.elapsed() < STOP_TIMEOUT {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{} did not stop after SIGTERM; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A loopback port nothing listens on (the server binds it a moment later).
fn free_port() -> BenchResult<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// A server on a loopback port; its process stops before its directory is removed.
pub struct Server {
    pub name: &'static str,
    pub port: u16,
    proc: Proc,
    /// Removed when the server is dropped, after `proc` has stopped.
    _dir: tempfile::TempDir,
}

impl Server {
    /// Stops the process now (dropping does the same).
    pub fn stop(mut self) {
        self.proc.stop();
    }
}

/// Where nginx is, if it is installed (`/usr/sbin` is not on every user's `PATH`).
pub fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// nginx as it is tuned to serve static files: sendfile, two workers, no access log.
pub fn nginx(bin: &Path, store: &Store) -> BenchResult<Server> {
    let dir = tempfile::Builder::new()
        .prefix("binplz-bench-nginx")
        .tempdir()?;
    let port = free_port()?;
    let d = dir.path().display();
    // Run as root, nginx would switch its workers to `nobody`; keep them as we are.
    let user = if is_root() { "user root;" } else { "" };
    let conf = format!(
        "daemon off;\n\
         worker_processes 2;\n\
         {user}\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
           sendfile on;\n\
           tcp_nopush on;\n\
           tcp_nodelay on;\n\
           access_log off;\n\
           log_not_found off;\n\
           keepalive_requests 100000;\n\
           keepalive_timeout 65;\n\
           types {{ }}\n\
           default_type application/octet-stream;\n\
           client_body_temp_path {d}/body;\n\
           proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi;\n\
           scgi_temp_path {d}/scgi;\n\
           server {{\n\
             listen 127.0.0.1:{port};\n\
             location / {{ root {files}; }}\n\
             location /cache/ {{ alias {cache}/; }}\n\
           }}\n\
         }}\n",
        files = store.files.display(),
        cache = store.cache.display(),
    );
    let conf_path = dir.path().join("nginx.conf");
    fs::write(&conf_path, conf)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.path().join("error.log"));
    let mut proc = Proc::spawn("nginx", cmd, dir.path().join("stderr.log"))?;
    proc.wait_ready(port, "/cache/nix-cache-info")?;
    Ok(Server {
        name: "nginx",
        port,
        proc,
        _dir: dir,
    })
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// How a binplz instance keeps files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// A memory cache large enough for every benchmarked file.
    Memory,
    /// `--memory-cache-size 0`: every hit is read from the disk cache.
    Disk,
}

/// The binplz under test: this build's, or `BINPLZ_BENCH_BIN` (to compare two builds).
pub fn binplz_bin() -> PathBuf {
    std::env::var_os("BINPLZ_BENCH_BIN")
        .filter(|v| !v.is_empty())
        .map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_binplz")),
            PathBuf::from,
        )
}

/// `binplz serve --upstream URL` alone: a substituter-only node with an empty cache
/// directory of its own. For `benches/substituter.rs`.
#[allow(dead_code)]
pub fn binplz_substituter(
    name: &'static str,
    public_key: &str,
    upstream: &str,
) -> BenchResult<Server> {
    let dir = tempfile::Builder::new()
        .prefix("binplz-bench-subst")
        .tempdir()?;
    let port = free_port()?;
    let mut cmd = Command::new(binplz_bin());
    cmd.arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--upstream")
        .arg(upstream)
        .arg("--trusted-public-key")
        .arg(public_key)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .env("BINPLZ_LOG", "warn");
    let mut proc = Proc::spawn(name, cmd, dir.path().join("stderr.log"))?;
    proc.wait_ready(port, "/nix-cache-info")?;
    Ok(Server {
        name,
        port,
        proc,
        _dir: dir,
    })
}

/// `binplz serve` (the bench-profile build) with an empty cache directory of its own.
pub fn binplz(
    name: &'static str,
    tier: Tier,
    store: &Store,
    upstream: &str,
) -> BenchResult<Server> {
    let dir = tempfile::Builder::new()
        .prefix("binplz-bench-serve")
        .tempdir()?;
    let port = free_port()?;
    let memory = match tier {
        Tier::Memory => "1G",
        Tier::Disk => "0",
    };
    let mut cmd = Command::new(binplz_bin());
    cmd.arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--upstream")
        .arg(upstream)
        .arg("--trusted-public-key")
        .arg(&store.public_key)
        .arg("--index")
        .arg(&store.index)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--memory-cache-size")
        .arg(memory)
        // wrk's connections all come from 127.0.0.1: the per-client limit (32 by default)
        // would answer 503 to some of them.
        .arg("--max-per-client")
        .arg("1024")
        .env("BINPLZ_LOG", "warn");
    let mut proc = Proc::spawn(name, cmd, dir.path().join("stderr.log"))?;
    proc.wait_ready(port, "/-/healthz")?;
    Ok(Server {
        name,
        port,
        proc,
        _dir: dir,
    })
}
