//! `binplz serve` when its disk cache cannot write: a full file system, a read-only one,
//! the cache directory removed while serving. Every verified file is still served, the
//! failures are counted by cause, `/-/readyz` says the node is degraded, and serving
//! recovers when the disk does.
//!
//! Full and read-only file systems are real: a small tmpfs mounted for the test (root
//! only; a test that cannot mount one says so and passes without checking anything).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use crate::support::server::{Reply, Server, Setup};
use crate::support::{self, dir_entries, prebuilt, FakeUpstream};

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

/// A tmpfs mounted on a temp dir for as long as this lives; unmounted when dropped, also
/// when the test fails.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it), or says why it cannot.
    fn mount(size: &str) -> Option<Tmpfs> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        let dir = tempdir();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs { dir }),
            other => {
                eprintln!("skipped: cannot mount a tmpfs: {other:?}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `mount -o remount,OPTS`.
    fn remount(&self, opts: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(self.path())
            .status()
            .expect("running mount");
        assert!(status.success(), "remount,{opts} failed");
    }

    /// Fills the file system with one file (until it is full); returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).expect("creating the filler");
        let chunk = vec![0u8; 1 << 20];
        loop {
            if let Err(e) = f.write_all(&chunk) {
                assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
                break;
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily, so that a file still open (a failed test's server) cannot keep it.
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// A server on the fixture index with its disk cache in `cache_dir`, no memory tier (so
/// that only the disk can answer a second request without the upstream), and `spill` as
/// its spill directory.
async fn start(up: &FakeUpstream, cache_dir: &Path, spill: &Path) -> Server {
    let mut setup = Setup::fixture(up, cache_dir).await;
    setup.memory_bytes = 0;
    setup.spill_dir = Some(spill.to_owned());
    Server::start(setup).await
}

#[track_caller]
fn assert_serves(r: &Reply, program: &str, tier: &str) {
    assert_eq!(r.status, 200, "{program}: {}", r.text());
    assert!(r.body == prebuilt(program), "the body is not {program}");
    assert_eq!(r.header("x-binplz-cache"), Some(tier), "{program}");
}

async fn metric(server: &Server, name: &str) -> f64 {
    let r = server.get("/-/metrics").await;
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Whether `program`'s content is in the disk cache under `cache_dir`.
fn on_disk(cache_dir: &Path, program: &str) -> bool {
    let name = binplz::hash::hex(&support::sha256(&prebuilt(program)));
    cache_dir
        .join("files")
        .join(&name[..2])
        .join(&name)
        .is_file()
}

#[tokio::test]
async fn a_full_cache_file_system_evicts_and_still_serves_every_miss() {
    let Some(fs) = Tmpfs::mount("22m") else {
        return;
    };
    let (up, spill) = (FakeUpstream::serve(support::cache_dir("cache")), tempdir());
    let cache_dir = fs.path().join("cache");
    let server = start(&up, &cache_dir, spill.path()).await;
    assert_serves(&server.get("/hello").await, "hello", "upstream");
    server.app.settled().await;
    assert!(on_disk(&cache_dir, "hello"));

    let filler = fs.fill();
    for program in ["goodbye", "multi-tool"] {
        assert_serves(
            &server.get(&format!("/{program}")).await,
            program,
            "upstream",
        );
    }
    server.app.settled().await;
    let full = r#"binplz_disk_cache_write_failures_total{cause="full"}"#;
    assert!(metric(&server, full).await >= 1.0, "not counted");
    assert!(!on_disk(&cache_dir, "hello"), "nothing was evicted");
    assert_serves(&server.get("/hello").await, "hello", "upstream");

    // Space comes back: files are kept again, and the node is no longer degraded.
    std::fs::remove_file(filler).expect("removing the filler");
    assert_serves(&server.get("/dyn").await, "dyn", "upstream");
    server.app.settled().await;
    assert!(on_disk(&cache_dir, "dyn"), "not kept once there was room");
    assert_serves(&server.get("/dyn").await, "dyn", "disk");
    assert_eq!(server.get("/-/readyz").await.text(), "ready\n");
    assert_eq!(dir_entries(spill.path()), Vec::<String>::new());
    server.stop().await;
}

#[tokio::test]
async fn a_read_only_cache_file_system_serves_misses_and_is_degraded_until_writable() {
    let Some(fs) = Tmpfs::mount("22m") else {
        return;
    };
    let (up, spill) = (FakeUpstream::serve(support::cache_dir("cache")), tempdir());
    let cache_dir = fs.path().join("cache");
    let server = start(&up, &cache_dir, spill.path()).await;
    assert_serves(&server.get("/hello").await, "hello", "upstream");
    server.app.settled().await;

    fs.remount("ro");
    assert_serves(&server.get("/goodbye").await, "goodbye", "upstream");
    assert_serves(&server.get("/hello").await, "hello", "disk");
    server.app.settled().await;
    let ready = server.get("/-/readyz").await;
    assert_eq!(ready.status, 200, "a degraded node still serves");
    let text = ready.text();
    assert!(text.starts_with("ready, degraded: "), "{text}");
    assert!(text.contains("read-only"), "{text}");
    let cause = r#"{cause="read_only"}"#;
    let failures = format!("binplz_disk_cache_write_failures_total{cause}");
    assert!(metric(&server, &failures).await >= 1.0);
    let degraded = format!("binplz_disk_cache_degraded{cause}");
    assert_eq!(metric(&server, &degraded).await, 1.0);
    assert!(metric(&server, "binplz_disk_cache_keep_errors_total").await >= 1.0);
    assert_serves(&server.get("/goodbye").await, "goodbye", "upstream");

    fs.remount("rw");
    assert_serves(&server.get("/dyn").await, "dyn", "upstream");
    server.app.settled().await;
    assert_eq!(server.get("/-/readyz").await.text(), "ready\n");
    assert_eq!(metric(&server, &degraded).await, 0.0);
    assert_serves(&server.get("/dyn").await, "dyn", "disk");
    assert_eq!(dir_entries(spill.path()), Vec::<String>::new());
    server.stop().await;
}

#[tokio::test]
async fn a_cache_directory_removed_while_serving_is_made_again() {
    let (up, spill, dir) = (
        FakeUpstream::serve(support::cache_dir("cache")),
        tempdir(),
        tempdir(),
    );
    let cache_dir = dir.path().join("cache");
    let server = start(&up, &cache_dir, spill.path()).await;
    assert_serves(&server.get("/hello").await, "hello", "upstream");
    server.app.settled().await;

    std::fs::remove_dir_all(&cache_dir).expect("removing the cache directory");
    assert_serves(&server.get("/hello").await, "hello", "upstream");
    assert_serves(&server.get("/goodbye").await, "goodbye", "upstream");
    server.app.settled().await;
    assert!(on_disk(&cache_dir, "hello") && on_disk(&cache_dir, "goodbye"));
    assert_serves(&server.get("/goodbye").await, "goodbye", "disk");
    assert_eq!(server.get("/-/readyz").await.text(), "ready\n");
    server.stop().await;
}

#[tokio::test]
async fn a_cached_file_that_cannot_be_opened_is_fetched_again_not_a_500() {
    let (up, spill, dir) = (
        FakeUpstream::serve(support::cache_dir("cache")),
        tempdir(),
        tempdir(),
    );
    let cache_dir = dir.path().join("cache");
    let server = start(&up, &cache_dir, spill.path()).await;
    assert_serves(&server.get("/hello").await, "hello", "upstream");
    server.app.settled().await;

    // Opening the kept file now fails with ENOTDIR, not "not found".
    std::fs::remove_dir_all(&cache_dir).expect("removing the cache directory");
    std::fs::write(&cache_dir, b"x").expect("a plain file in its place");
    for _ in 0..2 {
        assert_serves(&server.get("/hello").await, "hello", "upstream");
    }
    server.app.settled().await;
    server.stop().await;
}
