//! Prometheus metrics, written by hand: a few counters and one histogram.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the extraction latency histogram.
const BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    hits: Mutex<BTreeMap<&'static str, u64>>,
    upstream_ok: AtomicU64,
    upstream_failed: AtomicU64,
    bytes_served: AtomicU64,
    verification_failures: AtomicU64,
    extraction: Mutex<Histogram>,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, status)).or_default() += 1;
        }
    }

    /// A file served from `tier`: `memory`, `disk` or `upstream`.
    pub fn hit(&self, tier: &'static str) {
        if let Ok(mut m) = self.hits.lock() {
            *m.entry(tier).or_default() += 1;
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

    pub fn bytes(&self, n: u64) {
        self.bytes_served.fetch_add(n, Ordering::Relaxed);
    }

    pub fn verification_failure(&self) {
        self.verification_failures.fetch_add(1, Ordering::Relaxed);
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
        if let Ok(m) = self.requests.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(
                    s,
                    "binplz_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        s.push_str("# HELP binplz_cache_hits_total Files served, by the tier they came from.\n# TYPE binplz_cache_hits_total counter\n");
        if let Ok(m) = self.hits.lock() {
            for (tier, n) in m.iter() {
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
        s.push_str("# HELP binplz_bytes_served_total Response body bytes of served files.\n# TYPE binplz_bytes_served_total counter\n");
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
        for (name, help, value) in extra {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        s
    }
}
