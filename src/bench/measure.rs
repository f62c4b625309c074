//! Timing one input at one compression: binplz's verified pass against its two parts.
//!
//! ```text
//!   extract  run_pass: decode thread ─► channel ─► SHA-256 + NAR parse + keep one file
//!   decode   Codec::decoder ─► io::copy ─► io::sink()         (one core)
//!   hash     SHA-256 over the uncompressed NAR, in memory      (one core)
//! ```
//!
//! The three are interleaved, round after round, so that a busy machine disturbs them
//! alike; each figure is the median of the rounds. Every timed run checks its result (the
//! pass verifies NarHash and NarSize and must keep the wanted file at its size; decoding
//! must give NarSize bytes; hashing the NarHash), so a wrong input is an error, never a
//! figure. Peak memory is measured apart, in a fresh process (see [`super::memory`]).

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::machine;
use super::recompress::SharedReader;
use crate::codec::Codec;
use crate::pipeline::{run_pass, Expected, PipelineError};
use crate::resolve::RelPath;

/// Others' CPU use above which a measurement is taken again, at most this many times in all.
const ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("the verified pass failed: {0}")]
    Pass(#[from] PipelineError),
    #[error("the verified pass kept {got:?} ({size} bytes), not {wanted} ({wanted_size} bytes)")]
    WrongFile {
        wanted: RelPath,
        wanted_size: u64,
        got: Option<String>,
        size: u64,
    },
    #[error("{codec} decoding gave {got} bytes, not the NAR's {expected}")]
    WrongLength {
        codec: Codec,
        expected: u64,
        got: u64,
    },
    #[error("{codec} decoding failed: {err}")]
    Decode { codec: Codec, err: io::Error },
    #[error("the NAR's SHA-256 changed between runs")]
    HashChanged,
}

/// How many timed rounds a cell gets: as many as fit in `budget`, within bounds.
#[derive(Debug, Clone, Copy)]
pub struct Runs {
    pub budget: Duration,
    pub min: usize,
    pub max: usize,
}

impl Runs {
    /// Exactly `n` rounds (made odd, so the median is one of them).
    pub fn exactly(n: usize) -> Runs {
        Runs {
            budget: Duration::ZERO,
            min: n.max(1),
            max: n.max(1),
        }
    }

    fn for_estimate(self, one: Duration) -> usize {
        let fit = (self.budget.as_secs_f64() / one.as_secs_f64().max(1e-9)) as usize;
        fit.clamp(self.min, self.max) | 1
    }
}

/// Timings of one measure, in run order.
#[derive(Debug, Default, Clone)]
pub struct Samples(pub Vec<Duration>);

impl Samples {
    fn sorted(&self) -> Vec<Duration> {
        let mut v = self.0.clone();
        v.sort();
        v
    }

    pub fn median(&self) -> Duration {
        let v = self.sorted();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }

    /// Interquartile range over the median: how noisy the runs were.
    pub fn spread(&self) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return 0.0;
        }
        let q = |p: usize| v[(v.len() - 1) * p / 4].as_secs_f64();
        (q(3) - q(1)) / self.median().as_secs_f64().max(1e-12)
    }
}

/// What one cell's measurement gave.
#[derive(Debug, Default, Clone)]
pub struct Cell {
    pub extract: Samples,
    pub decode: Samples,
    pub hash: Samples,
}

/// One input at one compression, ready to be measured.
pub struct Case<'a> {
    pub nar: &'a Arc<[u8]>,
    pub nar_hash: [u8; 32],
    pub wanted: &'a RelPath,
    pub wanted_size: u64,
    pub codec: Codec,
    pub data: &'a Arc<[u8]>,
}

impl Case<'_> {
    fn extract(&self, tmp: &Path) -> Result<Duration, MeasureError> {
        let source = SharedReader::new(self.data.clone());
        let expected = Expected {
            nar_hash: Some(self.nar_hash),
            nar_size: Some(self.nar.len() as u64),
        };
        let t = Instant::now();
        let pass = run_pass(source, self.codec, expected, self.wanted, tmp)?;
        let elapsed = t.elapsed();
        match &pass.captured {
            Some(c) if c.path == *self.wanted && c.size == self.wanted_size => Ok(elapsed),
            other => Err(MeasureError::WrongFile {
                wanted: self.wanted.clone(),
                wanted_size: self.wanted_size,
                got: other.as_ref().map(|c| c.path.to_string()),
                size: other.as_ref().map_or(0, |c| c.size),
            }),
        }
    }

    fn decode(&self) -> Result<Duration, MeasureError> {
        let codec = self.codec;
        let decode_err = |err| MeasureError::Decode { codec, err };
        let source = SharedReader::new(self.data.clone());
        let t = Instant::now();
        let copied = io::copy(
            &mut codec.decoder(source).map_err(decode_err)?,
            &mut io::sink(),
        )
        .map_err(decode_err)?;
        let elapsed = t.elapsed();
        let expected = self.nar.len() as u64;
        if copied != expected {
            return Err(MeasureError::WrongLength {
                codec,
                expected,
                got: copied,
            });
        }
        Ok(elapsed)
    }

    fn hash(&self) -> Result<Duration, MeasureError> {
        let t = Instant::now();
        let digest: [u8; 32] = Sha256::digest(&self.nar[..]).into();
        let elapsed = t.elapsed();
        if digest != self.nar_hash {
            return Err(MeasureError::HashChanged);
        }
        Ok(elapsed)
    }

    /// Times the three measures: one checked warm-up round, which also tells how long a
    /// round takes, then as many rounds as `runs` allows.
    pub fn measure(&self, runs: Runs, tmp: &Path) -> Result<Cell, MeasureError> {
        let count = runs.for_estimate(self.extract(tmp)? + self.decode()? + self.hash()?);
        let mut cell = Cell::default();
        for _ in 0..count {
            cell.hash.0.push(self.hash()?);
            cell.decode.0.push(self.decode()?);
            cell.extract.0.push(self.extract(tmp)?);
        }
        Ok(cell)
    }
}

/// Runs `f` once the machine is quiet (waiting at most `quiet_wait`, not at all when it is
/// zero), again if others got busy meanwhile; returns the quietest attempt and the share
/// of the machine others used during it.
pub fn while_quiet<T, E>(
    quiet_wait: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<(T, f64), E> {
    let mut attempt = || -> Result<(T, f64), E> {
        if !quiet_wait.is_zero() && !machine::wait_quiet(quiet_wait) {
            tracing::warn!(
                waited_s = quiet_wait.as_secs(),
                "the machine is still busy: measuring anyway"
            );
        }
        let before = machine::Snapshot::now();
        let value = f()?;
        let others = before.map_or(0.0, |b| b.others_since(machine::cores()));
        Ok((value, others))
    };
    let mut best = attempt()?;
    for _ in 1..ATTEMPTS {
        if best.1 < machine::QUIET || quiet_wait.is_zero() {
            break;
        }
        let next = attempt()?;
        if next.1 < best.1 {
            best = next;
        }
    }
    Ok(best)
}
