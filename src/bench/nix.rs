//! `--compare-nix`: the same extraction done Nix's way, `nix nar cat`, timed as a process.
//!
//! Nix cannot read a compressed NAR, so it is fed by the codec's own command, as one would
//! do by hand: `zstd -dc FILE | nix nar cat /dev/stdin /bin/hello > OUT` (`nix nar cat
//! FILE …` for an uncompressed NAR). Nix reads the whole NAR into memory first and checks
//! no hash. Wall time is taken around the process; its memory is the largest resident set
//! of any process of the pipeline (normally `nix`), as GNU `time` reports it (`%M`): a
//! process per measurement is the only way to see another program's peak memory.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::codec::Codec;
use crate::resolve::RelPath;

/// Where GNU time is installed on Debian (package `time`).
const GNU_TIME: &str = "/usr/bin/time";

/// Figures for one `nix nar cat` cell.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct NixFigures {
    pub runs: usize,
    /// Median wall time of one extraction.
    pub seconds: f64,
    /// MB of NAR per second at that time.
    pub mb_s: f64,
    /// The largest peak RSS of a pipeline process over the runs.
    pub peak_rss_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("--compare-nix needs {tool} (on Debian: apt-get install {package})")]
    Missing {
        tool: &'static str,
        package: &'static str,
    },
    #[error("--compare-nix cannot feed a {0} NAR to nix")]
    Codec(Codec),
    #[error("nix nar cat failed ({status}): {stderr}")]
    Failed { status: String, stderr: String },
    #[error("nix nar cat wrote {got} bytes, not the {expected} of {path}")]
    WrongOutput {
        path: RelPath,
        expected: u64,
        got: u64,
    },
    #[error("cannot read GNU time's report: {0:?}")]
    TimeReport(String),
    #[error("--compare-nix: {what}: {err}")]
    Io { what: &'static str, err: io::Error },
}

/// Checks that `nix`, GNU time and the decoder for each of `codecs` are installed.
pub fn check_tools(codecs: &[Codec]) -> Result<(), NixError> {
    if !Path::new(GNU_TIME).is_file() {
        return Err(NixError::Missing {
            tool: GNU_TIME,
            package: "time",
        });
    }
    if !on_path("nix") {
        return Err(NixError::Missing {
            tool: "nix",
            package: "nix-bin",
        });
    }
    for &codec in codecs {
        if let Some((tool, package)) = decoder(codec)? {
            if !on_path(tool) {
                return Err(NixError::Missing { tool, package });
            }
        }
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// The command that decodes `codec` to standard output with `-dc`, and its Debian package.
fn decoder(codec: Codec) -> Result<Option<(&'static str, &'static str)>, NixError> {
    match codec {
        Codec::None => Ok(None),
        Codec::Zstd => Ok(Some(("zstd", "zstd"))),
        Codec::Xz => Ok(Some(("xz", "xz-utils"))),
        Codec::Bzip2 => Ok(Some(("bzip2", "bzip2"))),
        Codec::Gzip => Ok(Some(("gzip", "gzip"))),
        Codec::Brotli => Err(NixError::Codec(codec)),
    }
}

/// Times `nix nar cat` extracting `wanted` from `input` (compressed with `codec`), `runs`
/// times, writing in `tmp`.
pub fn nar_cat(
    codec: Codec,
    input: &Path,
    nar_bytes: u64,
    wanted: &RelPath,
    wanted_size: u64,
    runs: usize,
    tmp: &Path,
) -> Result<NixFigures, NixError> {
    let io_err = |what| move |err| NixError::Io { what, err };
    let output = tmp.join("nix-output");
    let report = tmp.join("nix-time");
    let script = match decoder(codec)? {
        Some((tool, _)) => format!("{tool} -dc < \"$1\" | nix --extra-experimental-features nix-command nar cat /dev/stdin \"$2\" > \"$3\""),
        None => "nix --extra-experimental-features nix-command nar cat \"$1\" \"$2\" > \"$3\"".to_owned(),
    };
    let path = format!("/{wanted}");
    let mut times = Vec::new();
    let mut peak = 0u64;
    for _ in 0..runs.max(1) {
        let _ = std::fs::remove_file(&output);
        let mut cmd = Command::new(GNU_TIME);
        cmd.args(["-f", "%M", "-o"])
            .arg(&report)
            .args(["sh", "-c", &script, "sh"])
            .arg(input)
            .arg(&path)
            .arg(&output)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let t = Instant::now();
        let out = cmd.output().map_err(io_err("running nix"))?;
        let elapsed = t.elapsed();
        if !out.status.success() {
            return Err(NixError::Failed {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        let got = std::fs::metadata(&output).map_or(0, |m| m.len());
        if got != wanted_size {
            return Err(NixError::WrongOutput {
                path: wanted.clone(),
                expected: wanted_size,
                got,
            });
        }
        peak = peak.max(read_report(&report)?);
        times.push(elapsed);
    }
    let _ = std::fs::remove_file(&output);
    times.sort();
    let median = times
        .get(times.len() / 2)
        .copied()
        .unwrap_or(Duration::ZERO);
    let seconds = median.as_secs_f64();
    Ok(NixFigures {
        runs: times.len(),
        seconds,
        mb_s: nar_bytes as f64 / seconds.max(1e-9) / 1e6,
        peak_rss_bytes: peak,
    })
}

/// GNU time's `%M`: the peak RSS in KiB, on the report's last line.
fn read_report(path: &PathBuf) -> Result<u64, NixError> {
    let text = std::fs::read_to_string(path).map_err(|err| NixError::Io {
        what: "reading GNU time's report",
        err,
    })?;
    text.lines()
        .last()
        .and_then(|l| l.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or(NixError::TimeReport(text))
}
