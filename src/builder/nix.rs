//! Running Nix: `nix-store --realise` under the configured limits with its log captured,
//! the classification of what went wrong (from the exit status and the log, as Hydra does),
//! the outputs' NAR sizes, and `nix copy` of the outputs into a signed `file://` staging
//! cache.
//!
//! ```text
//!  exit 0 ─► built                       exit 101 ─► timed_out (or silent too long)
//!  exit 100 ─► failed, or dependency_failed when the builder that failed is another's
//!  exit 102 ─► hash_mismatch             exit 1 + "killed after writing more than" ─► log_limit_exceeded
//!  anything else (exit 1, killed by a signal, nix-store missing) ─► transient
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix_derivation::{Derivation, StorePath};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use super::{Failure, FailureClass};

/// Largest `.drv` file read to learn the outputs: real ones are a few KiB, the largest in
/// Nixpkgs well under a MiB.
const MAX_DRV_SIZE: u64 = 4 << 20;
/// Log bytes kept beyond `max-build-log-size`: Nix's own messages around the builder's.
const LOG_SLACK: u64 = 64 << 10;
/// Largest `nix path-info --json` or `nix-store` standard output read.
const MAX_STDOUT: u64 = 4 << 20;

/// The limits one realisation runs under.
#[derive(Debug, Clone)]
pub struct Limits {
    pub timeout: Duration,
    pub max_silent_time: Duration,
    pub max_log_size: u64,
    /// `--cores` (0: all).
    pub cores: u32,
    /// Directory of the GC roots that keep outputs alive until they are copied out.
    pub roots: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("cannot run {program}: {err}")]
    Spawn {
        program: &'static str,
        err: std::io::Error,
    },
    #[error("{program} failed ({status}): {last_line}")]
    Failed {
        program: &'static str,
        status: String,
        last_line: String,
    },
    #[error("{program} printed something unexpected: {what}")]
    Output { program: &'static str, what: String },
    #[error("cannot read the derivation {drv}: {what}")]
    Derivation { drv: String, what: String },
}

/// What `nix-store --realise` did.
#[derive(Debug)]
pub struct Realised {
    /// Output paths, in the order Nix printed them (empty on failure).
    pub paths: Vec<String>,
    /// The exit code, or `None` when it was killed by a signal.
    pub code: Option<i32>,
    /// Standard error: Nix's messages and the builder's output.
    pub log: Vec<u8>,
}

/// The outputs a derivation declares (name → store path), read from the `.drv` file.
pub fn outputs_of(drv_path: &str) -> Result<BTreeMap<String, String>, NixError> {
    let err = |what: String| NixError::Derivation {
        drv: drv_path.to_owned(),
        what,
    };
    let sp = StorePath::from_absolute_path(drv_path.as_bytes()).map_err(|e| err(e.to_string()))?;
    let name = sp
        .name()
        .strip_suffix(".drv")
        .ok_or_else(|| err("not a .drv".into()))?;
    let file = std::fs::File::open(drv_path).map_err(|e| err(e.to_string()))?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_DRV_SIZE + 1), &mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > MAX_DRV_SIZE {
        return Err(err(format!("larger than {MAX_DRV_SIZE} bytes")));
    }
    let drv = Derivation::from_aterm_bytes(&bytes, name).map_err(|e| err(e.to_string()))?;
    let outputs = drv.resolved_outputs().map_err(|e| err(e.to_string()))?;
    Ok(outputs
        .into_iter()
        .filter_map(|(name, o)| Some((name, o.path?.to_absolute_path())))
        .collect())
}

/// Reads a child's standard output (up to `MAX_STDOUT`) and standard error (up to
/// `err_limit`) as it runs, so that neither pipe fills and stalls it.
fn outputs(
    child: &mut tokio::process::Child,
    err_limit: u64,
) -> (
    impl std::future::Future<Output = Vec<u8>>,
    impl std::future::Future<Output = Vec<u8>>,
) {
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let out = async move {
        match stdout {
            Some(s) => read_bounded(s, MAX_STDOUT).await,
            None => Vec::new(),
        }
    };
    let err = async move {
        match stderr {
            Some(s) => read_bounded(s, err_limit).await,
            None => Vec::new(),
        }
    };
    (out, err)
}

async fn read_bounded(mut r: impl AsyncRead + Unpin, limit: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                // Keep reading past the limit (so the writer never blocks), keep nothing.
                let room = (limit as usize).saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// How long Nix has to stop its builders after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Realises `drv_path` with `nix-store` (found on `PATH`) under `limits`. When `cancel`
/// resolves first, nix-store gets SIGTERM (it then kills its builders) and, if still there
/// after a grace period, SIGKILL.
pub async fn realise(
    drv_path: &str,
    limits: &Limits,
    cancel: impl std::future::Future<Output = ()>,
) -> Result<Realised, NixError> {
    let mut cmd = Command::new("nix-store");
    cmd.arg("--realise")
        .arg(drv_path)
        .arg("--timeout")
        .arg(limits.timeout.as_secs().max(1).to_string())
        .arg("--max-silent-time")
        .arg(limits.max_silent_time.as_secs().max(1).to_string())
        .args(["--option", "max-build-log-size"])
        .arg(limits.max_log_size.to_string())
        .arg("--cores")
        .arg(limits.cores.to_string())
        // Outputs must stay in the store until they are copied out.
        .arg("--add-root")
        .arg(gc_root(&limits.roots, drv_path))
        .arg("--indirect")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let mut child = cmd.spawn().map_err(|err| NixError::Spawn {
        program: "nix-store",
        err,
    })?;
    let (out, err) = outputs(&mut child, limits.max_log_size + LOG_SLACK);
    let pid = child.id();
    let wait = async {
        tokio::pin!(cancel);
        tokio::select! {
            s = child.wait() => s,
            () = &mut cancel => {
                if let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                }
                match tokio::time::timeout(STOP_GRACE, child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = child.start_kill();
                        child.wait().await
                    }
                }
            }
        }
    };
    let (out, log, status) = tokio::join!(out, err, wait);
    let status = status.map_err(|err| NixError::Spawn {
        program: "nix-store",
        err,
    })?;
    // With --add-root, nix-store prints the roots (links to the outputs), not the outputs.
    let paths = if status.success() {
        String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| match l.starts_with("/nix/store/") {
                true => Some(l.to_owned()),
                false => std::fs::read_link(l)
                    .ok()
                    .and_then(|t| t.to_str().map(str::to_owned))
                    .filter(|t| t.starts_with("/nix/store/")),
            })
            .collect()
    } else {
        Vec::new()
    };
    Ok(Realised {
        paths,
        code: status.code(),
        log,
    })
}

/// Where `nix-store --add-root` keeps `drv_path`'s outputs alive until they are published:
/// one link per derivation in `roots` (Nix adds `-<output>` for outputs other than `out`).
fn gc_root(roots: &Path, drv_path: &str) -> PathBuf {
    let base = drv_path.rsplit('/').next().unwrap_or(drv_path);
    roots.join(base.trim_end_matches(".drv"))
}

/// Removes the GC roots of `drv_path`'s outputs (once they are published, the builder's
/// local store need not keep them).
pub fn drop_roots(roots: &Path, drv_path: &str) {
    let root = gc_root(roots, drv_path);
    let Some(prefix) = root.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(roots) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == prefix || name.starts_with(&format!("{prefix}-")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The classification of a failed realisation of `drv_path`.
pub fn classify(drv_path: &str, code: Option<i32>, log: &[u8]) -> Failure {
    let text = String::from_utf8_lossy(log);
    let culprit = failing_derivation(&text);
    let last = last_error_line(&text);
    let (class, reason) = match code {
        Some(100) => (FailureClass::Failed, last),
        Some(101) => (FailureClass::TimedOut, last),
        Some(102) => (FailureClass::HashMismatch, last),
        Some(1)
            if text.contains("bytes of log output") && text.contains("killed after writing") =>
        {
            (FailureClass::LogLimitExceeded, last)
        }
        Some(c) => (
            FailureClass::Transient,
            format!("nix-store exited with status {c}: {last}"),
        ),
        None => (
            FailureClass::Transient,
            "nix-store was killed by a signal".to_owned(),
        ),
    };
    match (class, culprit) {
        (FailureClass::Transient, _) => Failure {
            class,
            permanent: false,
            reason,
            dependency: None,
        },
        (_, Some(dep)) if dep != drv_path => Failure {
            class: FailureClass::DependencyFailed,
            permanent: true,
            reason: format!("dependency {dep} failed: {reason}"),
            dependency: Some(dep),
        },
        _ => Failure {
            class,
            permanent: true,
            reason,
            dependency: None,
        },
    }
}

/// The derivation whose build failed, from Nix's error lines.
fn failing_derivation(log: &str) -> Option<String> {
    for line in log.lines() {
        let Some(rest) = line.strip_prefix("error: ") else {
            continue;
        };
        let quoted = [
            "builder for '",
            "building of '",
            "fixed-output derivation '",
        ]
        .iter()
        .find_map(|p| rest.find(p).map(|i| &rest[i + p.len()..]));
        if let Some(q) = quoted {
            let path = q.split('\'').next().unwrap_or_default();
            let path = path.split('!').next().unwrap_or_default();
            if path.starts_with("/nix/store/") && path.ends_with(".drv") {
                return Some(path.to_owned());
            }
        }
    }
    None
}

/// The first `error:` line (the cause; later ones are consequences), or the last line.
fn last_error_line(log: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.starts_with("error: "))
        .or_else(|| log.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("no output");
    let line = line.strip_prefix("error: ").unwrap_or(line).trim();
    line.chars().take(300).collect()
}

/// NAR size of each of `paths` (`nix path-info --json`).
pub async fn nar_sizes(paths: &[String]) -> Result<Vec<(String, u64)>, NixError> {
    let out = run_nix(
        &[
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
        ],
        paths,
    )
    .await?;
    #[derive(serde::Deserialize)]
    struct Info {
        path: String,
        #[serde(rename = "narSize")]
        nar_size: u64,
    }
    let infos: Vec<Info> = serde_json::from_slice(&out).map_err(|e| NixError::Output {
        program: "nix path-info",
        what: e.to_string(),
    })?;
    Ok(infos.into_iter().map(|i| (i.path, i.nar_size)).collect())
}

/// `nix copy` of `paths` (and their closure) to a signed, zstd-compressed `file://` cache
/// with listings in `staging`.
pub async fn copy_to(staging: &Path, secret_key: &Path, paths: &[String]) -> Result<(), NixError> {
    let to = format!(
        "file://{}?compression=zstd&secret-key={}&write-nar-listing=true",
        staging.display(),
        secret_key.display()
    );
    run_nix(
        &[
            "--extra-experimental-features",
            "nix-command",
            "copy",
            "--to",
            &to,
        ],
        paths,
    )
    .await
    .map(drop)
}

async fn run_nix(args: &[&str], paths: &[String]) -> Result<Vec<u8>, NixError> {
    let mut child = Command::new("nix")
        .args(args)
        .args(paths)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| NixError::Spawn {
            program: "nix",
            err,
        })?;
    let (out, err) = outputs(&mut child, LOG_SLACK);
    let (out, err, status) = tokio::join!(out, err, child.wait());
    let status = status.map_err(|err| NixError::Spawn {
        program: "nix",
        err,
    })?;
    if !status.success() {
        return Err(NixError::Failed {
            program: "nix",
            status: status.to_string(),
            last_line: last_error_line(&String::from_utf8_lossy(&err)),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log recorded from Debian's Nix 2.8 (`fixtures/nix-realise/`).
    fn recorded(name: &str) -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/nix-realise")
                .join(format!("{name}.log")),
        )
        .expect("recorded log")
    }

    /// The derivation a recorded log was for (its first `building '…'` line's path, the
    /// last such line when dependencies were built first).
    fn drv_of(log: &[u8]) -> String {
        let text = String::from_utf8_lossy(log);
        text.lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("/nix/store/").map(|_| l.trim()))
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn builder_exit_1_is_a_permanent_failure() {
        let log = recorded("fails");
        let f = classify(&drv_of(&log), Some(100), &log);
        assert_eq!(f.class, FailureClass::Failed);
        assert!(f.permanent);
        assert!(f.reason.contains("failed with exit code 1"), "{}", f.reason);
        assert_eq!(f.dependency, None);
    }

    #[test]
    fn a_failed_dependency_is_named() {
        let log = recorded("depfails");
        let drv = drv_of(&log);
        assert!(drv.ends_with("-depfails.drv"), "{drv}");
        let f = classify(&drv, Some(100), &log);
        assert_eq!(f.class, FailureClass::DependencyFailed);
        assert!(f.permanent);
        assert_eq!(
            f.dependency.as_deref(),
            Some("/nix/store/yh2vbi7n5irlw85n6r9hpcvy9n3p2ziw-fails.drv")
        );
    }

    #[test]
    fn timeouts_and_silence_are_timed_out() {
        for name in ["sleeps", "silent"] {
            let log = recorded(name);
            let f = classify(&drv_of(&log), Some(101), &log);
            assert_eq!(f.class, FailureClass::TimedOut, "{name}");
            assert!(f.permanent);
            assert!(f.reason.contains("timed out after"), "{}", f.reason);
        }
    }

    #[test]
    fn a_log_over_the_limit_is_log_limit_exceeded_although_nix_exits_1() {
        let log = recorded("chatty");
        let f = classify(&drv_of(&log), Some(1), &log);
        assert_eq!(f.class, FailureClass::LogLimitExceeded);
        assert!(f.permanent);
    }

    #[test]
    fn a_fixed_output_hash_mismatch_is_permanent() {
        let log = recorded("hash");
        let f = classify(&drv_of(&log), Some(102), &log);
        assert_eq!(f.class, FailureClass::HashMismatch);
        assert!(f.permanent);
        assert!(f.reason.contains("hash mismatch"), "{}", f.reason);
    }

    #[test]
    fn anything_else_is_transient() {
        let log = b"error: cannot connect to daemon at '/nix/var/nix/daemon-socket/socket'\n";
        let f = classify("/nix/store/x-a.drv", Some(1), log);
        assert_eq!(f.class, FailureClass::Transient);
        assert!(!f.permanent);
        assert!(
            f.reason.contains("cannot connect to daemon"),
            "{}",
            f.reason
        );
        let f = classify("/nix/store/x-a.drv", None, b"");
        assert_eq!(f.class, FailureClass::Transient);
    }

    #[test]
    fn a_successful_log_names_no_failing_derivation() {
        assert_eq!(
            failing_derivation(&String::from_utf8_lossy(&recorded("ok"))),
            None
        );
    }
}
