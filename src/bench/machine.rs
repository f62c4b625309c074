//! The machine the benchmark runs on: how busy the rest of it is, what CPU it has, and
//! this process's memory.
//!
//! A two-stage pipeline needs both cores: a compiler or a load test running beside it
//! takes one of them and halves the pipeline's speed while barely touching the
//! single-threaded references, so the ratios mean nothing. The benchmark waits for the
//! machine to be quiet before each measurement, records how much CPU other processes used
//! during it (from `/proc/stat` minus this process's own time), and measures again when
//! that was too much.

use std::time::{Duration, Instant};

/// Linux reports CPU time in clock ticks of 1/100 s (`USER_HZ`) on every architecture
/// the benchmark runs on.
const TICKS_PER_SEC: f64 = 100.0;

/// Others' CPU use above which the machine does not count as quiet, as a share of all cores.
pub const QUIET: f64 = 0.05;

/// CPU time used so far by the whole machine and by this process, in ticks.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    at: Instant,
    machine: u64,
    own: u64,
}

impl Snapshot {
    pub fn now() -> Option<Snapshot> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
        let f: Vec<u64> = cpu
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
        let machine = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| f.get(i)).sum();
        let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let rest = own_stat.rsplit_once(')')?.1;
        let g: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line; `rest` starts at field 3.
        let own = g.get(11)?.parse::<u64>().ok()? + g.get(12)?.parse::<u64>().ok()?;
        Some(Snapshot {
            at: Instant::now(),
            machine,
            own,
        })
    }

    /// Share of all cores other processes used since `self`.
    pub fn others_since(self, cores: usize) -> f64 {
        let Some(now) = Snapshot::now() else {
            return 0.0;
        };
        let wall =
            now.at.duration_since(self.at).as_secs_f64() * TICKS_PER_SEC * cores.max(1) as f64;
        let others = now
            .machine
            .saturating_sub(self.machine)
            .saturating_sub(now.own.saturating_sub(self.own));
        if wall <= 0.0 {
            0.0
        } else {
            (others as f64 / wall).min(1.0)
        }
    }
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Waits until other processes use less than [`QUIET`] of the machine over half a second,
/// for at most `limit`. Returns whether it got quiet.
pub fn wait_quiet(limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let Some(before) = Snapshot::now() else {
            return true;
        };
        std::thread::sleep(Duration::from_millis(500));
        if before.others_since(cores()) < QUIET {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

/// The CPU's model name, as `/proc/cpuinfo` gives it.
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == "model name")
        .map(|(_, v)| v.trim().to_owned())
}

/// This process's resident set size now and its peak since start or the last
/// [`reset_peak_rss`], in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Rss {
    pub current: u64,
    pub peak: u64,
}

pub fn rss() -> Option<Rss> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let n = line[key.len()..].trim().trim_end_matches("kB").trim();
        n.parse::<u64>().ok().map(|k| k * 1024)
    };
    Some(Rss {
        current: kib("VmRSS:")?,
        peak: kib("VmHWM:")?,
    })
}

/// Sets the peak RSS (`VmHWM`) back to the current RSS, so that the next reading is the
/// peak of what ran in between (Linux 4.0+: `5` written to `/proc/self/clear_refs`).
/// Returns whether the kernel took it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
