//! Peak memory of each measure, each in a fresh process.
//!
//! Memory is measured in a child process per measure (`binplz bench --memory-probe KIND`,
//! hidden): within the benchmark's own process the allocator keeps the pages of earlier
//! runs, so a pass would reuse them and seem to need nothing, and the inputs held in
//! memory would count. The child streams the input file, as `binplz extract --nar` does
//! and as a server streams a download (for the SHA-256-only measure it first decodes the
//! NAR into memory, as the benchmark holds it), resets its peak RSS (`VmHWM`, see
//! [`machine::reset_peak_rss`]), runs the measure once and prints its peak RSS and the
//! rise over its RSS just before: the memory the measure itself needed.

use std::io::{self, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::machine;
use crate::codec::Codec;
use crate::pipeline::{run_pass, Expected};
use crate::resolve::RelPath;

/// Peak memory of one run: the process's peak, and its rise over the RSS at the start.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Memory {
    pub peak_rss_bytes: u64,
    pub added_rss_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Extract,
    Decode,
    Hash,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Extract => "extract",
            Kind::Decode => "decode",
            Kind::Hash => "hash",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot run the memory probe {exe}: {err}")]
    Spawn { exe: String, err: io::Error },
    #[error("the {kind} memory probe failed ({status}): {stderr}")]
    Failed {
        kind: &'static str,
        status: String,
        stderr: String,
    },
    #[error("the {kind} memory probe printed no figures: {output:?}")]
    Output { kind: &'static str, output: String },
    #[error("{0}")]
    Probe(String),
}

/// Peak memory of one `kind` run on `file` (a NAR, compressed or not), in a child process
/// of `exe` (binplz).
pub fn measure(
    exe: &Path,
    kind: Kind,
    file: &Path,
    wanted: &RelPath,
) -> Result<Memory, MemoryError> {
    let out = Command::new(exe)
        .args(["bench", "--memory-probe", kind.as_str(), "--nar"])
        .arg(file)
        .arg("--memory-probe-wanted")
        .arg(wanted.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|err| MemoryError::Spawn {
            exe: exe.display().to_string(),
            err,
        })?;
    if !out.status.success() {
        return Err(MemoryError::Failed {
            kind: kind.as_str(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|_| MemoryError::Output {
        kind: kind.as_str(),
        output: String::from_utf8_lossy(&out.stdout).into_owned(),
    })
}

/// The child's side: one `kind` run on `file`, its memory printed as JSON on stdout.
pub fn probe(kind: Kind, file: &Path, wanted: &RelPath) -> Result<Memory, MemoryError> {
    let fail = |e: &dyn std::fmt::Display| MemoryError::Probe(format!("{}: {e}", file.display()));
    let open = || std::fs::File::open(file).map_err(|e| fail(&e));
    let mut head = Vec::with_capacity(32);
    io::Read::take(open()?, 32)
        .read_to_end(&mut head)
        .map_err(|e| fail(&e))?;
    let name = file.file_name().and_then(|n| n.to_str());
    let codec = Codec::sniff(&head, name).map_err(|e| fail(&e))?;
    let nar = match kind {
        Kind::Hash => {
            let mut nar = Vec::new();
            codec
                .decoder(open()?)
                .and_then(|mut d| d.read_to_end(&mut nar))
                .map_err(|e| fail(&e))?;
            nar
        }
        _ => Vec::new(),
    };
    let tmp = tempfile::tempdir().map_err(|e| fail(&e))?;
    let input = open()?;
    let reset = machine::reset_peak_rss();
    let before = machine::rss();
    match kind {
        Kind::Extract => {
            run_pass(input, codec, Expected::default(), wanted, tmp.path())
                .map_err(|e| fail(&e))?;
        }
        Kind::Decode => {
            codec
                .decoder(input)
                .and_then(|mut d| io::copy(&mut d, &mut io::sink()))
                .map_err(|e| fail(&e))?;
        }
        Kind::Hash => {
            std::hint::black_box(Sha256::digest(&nar));
        }
    }
    let after = machine::rss();
    match (reset, before, after) {
        (true, Some(before), Some(after)) => Ok(Memory {
            peak_rss_bytes: after.peak,
            added_rss_bytes: after.peak.saturating_sub(before.current),
        }),
        _ => Err(MemoryError::Probe(
            "this kernel does not report or reset peak RSS (/proc/self/status, clear_refs)".into(),
        )),
    }
}
