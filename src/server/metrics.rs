//! Prometheus metrics, written by hand: a few counters and one histogram.
//!
//! Every request counts itself, so the counters a request touches are atomics in fixed
//! tables: a mutex there is taken by every worker thread for every request, and under load
//! the contention on it cost more than building the response.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the extraction latency histogram.
const BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The routes requests are counted by.
pub const ROUTES: [&str; 13] = [
    "home",
    "healthz",
    "readyz",
    "metrics",
    "search",
    "program",
    "sha256",
    "nix-cache-info",
    "narinfo",
    "nar",
    "ls",
    "log",
    "other",
];
/// The statuses the server answers with; any other is counted in `other_requests`.
const STATUSES: [u16; 14] = [
    200, 206, 304, 400, 404, 405, 416, 422, 424, 429, 500, 502, 503, 504,
];
/// The tiers files are served from.
pub const TIERS: [&str; 3] = ["disk", "memory", "upstream"];

#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[AtomicU64; STATUSES.len()]; ROUTES.len()],
    /// Requests whose route or status is not in the tables above.
    other_requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    hits: [AtomicU64; TIERS.len()],
    upstream_ok: AtomicU64,
    upstream_failed: AtomicU64,
    bytes_served: AtomicU64,
    in_progress: AtomicU64,
    verification_failures: AtomicU64,
    disk_waits: Arc<AtomicU64>,
    extraction: Mutex<Histogram>,
}

/// See [`Metrics::begin`].
pub struct InProgress<'a>(&'a AtomicU64);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        let r = ROUTES.iter().position(|n| *n == route);
        let s = STATUSES.iter().position(|n| *n == status);
        match (r, s) {
            (Some(r), Some(s)) => {
                self.requests[r][s].fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                if let Ok(mut m) = self.other_requests.lock() {
                    *m.entry((route, status)).or_default() += 1;
                }
            }
        }
    }

    /// A file served from `tier`: one of [`TIERS`].
    pub fn hit(&self, tier: &'static str) {
        if let Some(i) = TIERS.iter().position(|t| *t == tier) {
            self.hits[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn upstream_fetch(&self, ok: bool) {
        let c = if ok {
            &self.upstream_ok
        } else {
            &self.upstream_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a request as in progress until the guard is dropped.
    pub fn begin(&self) -> InProgress<'_> {
        self.in_progress.fetch_add(1, Ordering::Relaxed);
        InProgress(&self.in_progress)
    }

    /// Requests being answered (their handlers running; not bodies being sent).
    pub fn in_progress(&self) -> u64 {
        self.in_progress.load(Ordering::Relaxed)
    }

    pub fn bytes(&self, n: u64) {
        self.bytes_served.fetch_add(n, Ordering::Relaxed);
    }

    pub fn verification_failure(&self) {
        self.verification_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A file's bytes about to be sent read on a blocking thread, the page cache not
    /// holding them.
    pub fn disk_wait(&self) {
        self.disk_waits.fetch_add(1, Ordering::Relaxed);
    }

    /// The counter of [`Metrics::disk_wait`], for a body to count its own.
    pub fn disk_wait_counter(&self) -> Arc<AtomicU64> {
        self.disk_waits.clone()
    }

    pub fn disk_waits(&self) -> u64 {
        self.disk_waits.load(Ordering::Relaxed)
    }

    pub fn extraction(&self, d: Duration) {
        if let Ok(mut h) = self.extraction.lock() {
            let s = d.as_secs_f64();
            for (i, b) in BUCKETS.iter().enumerate() {
                if s <= *b {
                    h.counts[i] += 1;
                }
            }
            h.count += 1;
            h.sum += s;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, extra: &[(&str, &str, u64)]) -> String {
        let mut s = String::new();
        s.push_str("# HELP binplz_requests_total HTTP requests by route and status.\n# TYPE binplz_requests_total counter\n");
        let mut counts: BTreeMap<(&str, u16), u64> = BTreeMap::new();
        for (r, route) in ROUTES.iter().enumerate() {
            for (i, status) in STATUSES.iter().enumerate() {
                let n = self.requests[r][i].load(Ordering::Relaxed);
                if n > 0 {
                    counts.insert((route, *status), n);
                }
            }
        }
        if let Ok(m) = self.other_requests.lock() {
            counts.extend(m.iter().map(|(k, v)| (*k, *v)));
        }
        for ((route, status), n) in &counts {
            let _ = writeln!(
                s,
                "binplz_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        s.push_str("# HELP binplz_cache_hits_total Files served, by the tier they came from.\n# TYPE binplz_cache_hits_total counter\n");
        for (tier, n) in TIERS.iter().zip(&self.hits) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                let _ = writeln!(s, "binplz_cache_hits_total{{tier=\"{tier}\"}} {n}");
            }
        }
        s.push_str("# HELP binplz_upstream_fetches_total Extractions from the upstream cache.\n# TYPE binplz_upstream_fetches_total counter\n");
        let _ = writeln!(
            s,
            "binplz_upstream_fetches_total{{result=\"ok\"}} {}",
            self.upstream_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "binplz_upstream_fetches_total{{result=\"error\"}} {}",
            self.upstream_failed.load(Ordering::Relaxed)
        );
        s.push_str("# HELP binplz_bytes_served_total Body bytes of served files sent to clients.\n# TYPE binplz_bytes_served_total counter\n");
        let _ = writeln!(
            s,
            "binplz_bytes_served_total {}",
            self.bytes_served.load(Ordering::Relaxed)
        );
        s.push_str("# HELP binplz_verification_failures_total Narinfos or NARs that failed verification.\n# TYPE binplz_verification_failures_total counter\n");
        let _ = writeln!(
            s,
            "binplz_verification_failures_total {}",
            self.verification_failures.load(Ordering::Relaxed)
        );
        s.push_str("# HELP binplz_extraction_seconds Time to fetch, verify and extract a file.\n# TYPE binplz_extraction_seconds histogram\n");
        if let Ok(h) = self.extraction.lock() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "binplz_extraction_seconds_bucket{{le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                s,
                "binplz_extraction_seconds_bucket{{le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(s, "binplz_extraction_seconds_sum {}", h.sum);
            let _ = writeln!(s, "binplz_extraction_seconds_count {}", h.count);
        }
        let _ = writeln!(
            s,
            "# HELP binplz_requests_in_progress Requests being answered.\n# TYPE binplz_requests_in_progress gauge\nbinplz_requests_in_progress {}",
            self.in_progress()
        );
        for (name, help, value) in extra {
            // Counters end in `_total`; the rest are gauges.
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        s
    }
}

/// Appends one metric with a value per label value (a counter if its name ends in
/// `_total`, else a gauge).
pub fn render_labelled<const N: usize>(
    s: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: [(&str, u64); N],
) {
    let kind = if name.ends_with("_total") {
        "counter"
    } else {
        "gauge"
    };
    let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (value_of_label, n) in values {
        let _ = writeln!(s, "{name}{{{label}=\"{value_of_label}\"}} {n}");
    }
}
