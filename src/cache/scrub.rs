//! The scrubber: re-hashes every disk cache file once per period, at a bounded rate, and
//! drops those that no longer match their name.
//!
//! A read re-hashes a file only when its state (ctime, inode) moved since it was last
//! checked, or after a restart. Bit rot (a failing disk, a bad controller) changes bytes
//! without changing that state, and such a file would be served with its old `ETag` for as
//! long as the process runs. Only reading it again finds that, so this reads them all, in
//! the background:
//!
//! ```text
//!  a minute after start-up ─►
//!  pass: DiskCache::scrub_next (hash order, blocking thread) ─► sleep in proportion to
//!        the bytes read ─► … ─► pass done ─► sleep until the period is over ─► next pass
//! ```

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::disk::DiskCache;

/// The default time a pass over the whole cache takes: a day.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(24 * 60 * 60);

/// How long after start-up the first pass begins: start-up re-checks what it must itself,
/// and the first requests (and a start-up's own reads of files it re-hashes) come first,
/// so the scrubber's reads do not race them for the disk or the page cache.
pub const START_DELAY: Duration = Duration::from_secs(60);

/// Most bytes re-hashed per second, whatever the period and the cache's size: SHA-256
/// runs at about 1.2 GB/s on one core here, so 32 MiB/s is under 3 % of a core, and
/// 2.7 TiB a day. A larger cache just takes longer than the period.
pub const MAX_RATE: u64 = 32 << 20;

/// How long to wait after re-hashing `bytes` of a pass over `total` bytes that should take
/// `period`: that share of the period, and never less than [`MAX_RATE`] allows.
pub fn pace(bytes: u64, total: u64, period: Duration) -> Duration {
    let share = period.as_nanos() * u128::from(bytes) / u128::from(total.max(1));
    let floor = u128::from(bytes) * 1_000_000_000 / u128::from(MAX_RATE);
    Duration::from_nanos(u64::try_from(share.max(floor)).unwrap_or(u64::MAX))
}

/// Scrubs `disk` forever from [`START_DELAY`] on, a pass per `period` (see the module doc). Each pass is paced by
/// the bytes the cache held when it started; files kept during a pass are visited if
/// their hash comes after the point reached (they were checked when written anyway).
pub async fn run(disk: Arc<DiskCache>, period: Duration) {
    tokio::time::sleep(START_DELAY).await;
    loop {
        let start = Instant::now();
        let total = disk.stats().1;
        let mut after = None;
        loop {
            let d = disk.clone();
            let step = tokio::task::spawn_blocking(move || d.scrub_next(after.as_ref())).await;
            match step {
                Ok(Some(checked)) => {
                    after = Some(checked.sha256);
                    tokio::time::sleep(pace(checked.bytes, total, period)).await;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(err = %e, "scrub step failed");
                    break;
                }
            }
        }
        let stats = disk.scrub_stats();
        tracing::debug!(
            files = stats.files,
            bytes = stats.bytes,
            corrupt = stats.corrupt_scrub,
            "disk cache scrub pass done"
        );
        tokio::time::sleep_until(start + period).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_pass_is_spread_over_its_period_but_never_faster_than_the_rate_cap() {
        let day = DEFAULT_PERIOD;
        // A quarter of the bytes, a quarter of the day.
        assert_eq!(pace(250, 1000, day), day / 4);
        // 10 GiB in a day is far under the cap: the period decides.
        let ten_g = 10u64 << 30;
        assert_eq!(pace(1 << 20, ten_g, day), day / 10240);
        // A pass that would need more than the cap is slowed to it.
        assert_eq!(
            pace(MAX_RATE, MAX_RATE, Duration::from_millis(1)),
            Duration::from_secs(1)
        );
        assert_eq!(pace(0, 0, day), Duration::ZERO);
        assert_eq!(pace(5, 0, Duration::ZERO), Duration::from_nanos(149));
    }

    #[tokio::test(start_paused = true)]
    async fn the_scrubber_paces_a_pass_over_its_period_and_drops_rotten_files() {
        use crate::cache::disk::tests::{put, rot, SP};
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(DiskCache::open(dir.path(), 1 << 20).unwrap());
        let metas: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .map(|p| put(&disk, p, &[p.as_bytes()[0]; 1000]).0)
            .collect();
        rot(&disk, &metas[2]);
        let period = Duration::from_secs(400);
        let start = Instant::now() + START_DELAY;
        let task = tokio::spawn(run(disk.clone(), period));
        tokio::time::sleep_until(start - Duration::from_secs(1)).await;
        assert_eq!(
            disk.scrub_stats().files,
            0,
            "nothing before the start delay"
        );
        // Time is paused: it moves only when every task waits, by as much as the next
        // timer needs. Each file of a quarter of the bytes is followed by a quarter of
        // the period.
        tokio::time::sleep_until(start + Duration::from_secs(150)).await;
        assert_eq!(disk.scrub_stats().files, 2);
        tokio::time::sleep_until(start + Duration::from_secs(390)).await;
        let stats = disk.scrub_stats();
        assert_eq!(
            (stats.files, stats.bytes, stats.corrupt_scrub),
            (4, 4000, 1)
        );
        assert_eq!(disk.lookup(SP, &metas[2].path), None);
        // The next pass starts when the period is over, with the three files left.
        tokio::time::sleep_until(start + Duration::from_secs(410)).await;
        assert_eq!(disk.scrub_stats().files, 5);
        task.abort();
    }
}
