//! Deadlines for whole fetches, whatever the transport.
//!
//! A transport's own timeouts bound each wait (connect, first byte, the pause between two
//! chunks); an upstream that answers just often enough passes all of them and can hold a
//! fetch for good. These bound the sum:
//!
//! ```text
//!  narinfo, nix-cache-info: every attempt, backoff, headers and body ≤ `narinfo`
//!  NAR: opening (attempts included) and the whole body   ≤ `nar_base` + NarSize / `min_rate`
//!  every NAR and listing body: each `rate_window` of waiting on the upstream brings
//!                              at least `min_rate` × `rate_window` bytes
//! ```
//!
//! The rate is measured over time spent waiting for the upstream only: while the decoder
//! is busy and the body is not read, the upstream is not to blame.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{Body, BoxFuture, UpstreamError};

/// The longest any NAR fetch is given, whatever its NarSize says: no useful transfer takes
/// a week, and it keeps the deadline's instant from overflowing.
const MAX_NAR_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Deadlines and the minimum rate, validated (see [`Deadlines::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadlines {
    narinfo: Duration,
    min_rate: u64,
    rate_window: Duration,
    nar_base: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            // A narinfo is a few hundred bytes: a cache that cannot give one in 10 s is
            // failing, and the client is better told so than kept waiting.
            narinfo: Duration::from_secs(10),
            // 32 KiB/s: slower than that, a 100 MB NAR would take most of an hour.
            min_rate: 32 << 10,
            // Long enough to ride out a TCP retransmission or two.
            rate_window: Duration::from_secs(30),
            // Opening the NAR (its attempts and backoff) before the rate can count.
            nar_base: Duration::from_secs(60),
        }
    }
}

/// Why a [`Deadlines`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeadlinesError {
    #[error("the {0} must be longer than zero")]
    Zero(&'static str),
    #[error("the {what} must be at most {MAX_NAR_DEADLINE:?}")]
    TooLong { what: &'static str },
}

impl Deadlines {
    /// `narinfo`: a narinfo's whole fetch. `min_rate` (bytes per second) over each
    /// `rate_window`: NAR and listing bodies. `nar_base`: added to NarSize / `min_rate` for
    /// a NAR's whole fetch. None may be zero.
    pub fn new(
        narinfo: Duration,
        min_rate: u64,
        rate_window: Duration,
        nar_base: Duration,
    ) -> Result<Deadlines, DeadlinesError> {
        if narinfo.is_zero() {
            return Err(DeadlinesError::Zero("narinfo timeout"));
        }
        if min_rate == 0 {
            return Err(DeadlinesError::Zero("minimum rate"));
        }
        if rate_window.is_zero() {
            return Err(DeadlinesError::Zero("rate window"));
        }
        if nar_base.is_zero() {
            return Err(DeadlinesError::Zero("NAR timeout"));
        }
        for (what, d) in [
            ("narinfo timeout", narinfo),
            ("rate window", rate_window),
            ("NAR timeout", nar_base),
        ] {
            if d > MAX_NAR_DEADLINE {
                return Err(DeadlinesError::TooLong { what });
            }
        }
        Ok(Deadlines {
            narinfo,
            min_rate,
            rate_window,
            nar_base,
        })
    }

    /// The whole fetch of a narinfo (or `nix-cache-info`), retries included.
    pub fn narinfo(&self) -> Duration {
        self.narinfo
    }

    /// The whole fetch of a NAR of `nar_size` bytes: `nar_base` + `nar_size` / `min_rate`,
    /// at most [`MAX_NAR_DEADLINE`].
    pub fn nar(&self, nar_size: u64) -> Duration {
        self.nar_base
            .saturating_add(Duration::from_secs(nar_size / self.min_rate))
            .min(MAX_NAR_DEADLINE)
    }

    pub fn min_rate(&self) -> u64 {
        self.min_rate
    }

    pub(super) fn floor(&self) -> RateFloor {
        RateFloor {
            min_rate: self.min_rate,
            window: self.rate_window,
            waited: Duration::ZERO,
            bytes: 0,
        }
    }
}

/// The minimum rate over one window of waiting: pure bookkeeping, the caller says how long
/// each wait took.
#[derive(Debug, Clone)]
pub(super) struct RateFloor {
    min_rate: u64,
    window: Duration,
    /// Time spent waiting in this window so far.
    waited: Duration,
    /// Bytes received in this window so far.
    bytes: u64,
}

/// A window that closed with too few bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TooSlow {
    pub bytes: u64,
    pub window: Duration,
}

impl RateFloor {
    /// Waiting time left in this window.
    pub fn left(&self) -> Duration {
        self.window.saturating_sub(self.waited)
    }

    /// Counts `bytes` that took `waited` to arrive. When that closes the window, checks it
    /// brought at least the minimum rate and starts the next.
    pub fn record(&mut self, waited: Duration, bytes: u64) -> Result<(), TooSlow> {
        self.waited = self.waited.saturating_add(waited);
        self.bytes = self.bytes.saturating_add(bytes);
        if self.waited < self.window {
            return Ok(());
        }
        // Rounded up: a window too short for one byte at the minimum rate still needs
        // one, so that a silent window always fails.
        let wanted = (u128::from(self.min_rate) * self.waited.as_nanos()).div_ceil(1_000_000_000);
        if u128::from(self.bytes) < wanted {
            return Err(TooSlow {
                bytes: self.bytes,
                window: self.waited,
            });
        }
        self.waited = Duration::ZERO;
        self.bytes = 0;
        Ok(())
    }
}

/// A body held to a [`RateFloor`] and, optionally, a deadline for the whole fetch.
pub(super) struct Paced {
    pub inner: Box<dyn Body>,
    pub url: String,
    pub floor: RateFloor,
    pub min_rate: u64,
    /// The end of the whole fetch, and how long it was given.
    pub deadline: Option<(Instant, Duration)>,
}

impl Body for Paced {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, UpstreamError>> {
        Box::pin(async move {
            loop {
                let start = Instant::now();
                let window_end = start + self.floor.left();
                let until = match self.deadline {
                    Some((end, _)) => window_end.min(end),
                    None => window_end,
                };
                // Dropping a pending `next_chunk` at the end of a window loses nothing:
                // the transports' reads keep what has not been returned yet.
                let got = match tokio::time::timeout_at(until, self.inner.next_chunk()).await {
                    Ok(Ok(Some(chunk))) => Some(chunk),
                    Ok(end_or_error) => return end_or_error,
                    Err(_) => None,
                };
                let bytes = got.as_ref().map_or(0, |c| c.len() as u64);
                if let Err(slow) = self.floor.record(start.elapsed(), bytes) {
                    return Err(UpstreamError::TooSlow {
                        url: self.url.clone(),
                        bytes: slow.bytes,
                        window: slow.window,
                        min_rate: self.min_rate,
                    });
                }
                if got.is_some() {
                    return Ok(got);
                }
                if let Some((end, limit)) = self.deadline {
                    if Instant::now() >= end {
                        return Err(UpstreamError::Deadline {
                            url: self.url.clone(),
                            what: "NAR",
                            limit,
                        });
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floor(min_rate: u64, window_ms: u64) -> RateFloor {
        Deadlines::new(
            Duration::from_secs(1),
            min_rate,
            Duration::from_millis(window_ms),
            Duration::from_secs(1),
        )
        .expect("valid deadlines")
        .floor()
    }

    #[test]
    fn a_drip_that_never_pauses_long_fails_when_its_window_closes() {
        // 200 bytes a second against a floor of 1000 over one second.
        let mut f = floor(1000, 1000);
        for _ in 0..3 {
            assert_eq!(f.record(Duration::from_millis(250), 50), Ok(()));
        }
        assert_eq!(
            f.record(Duration::from_millis(250), 50),
            Err(TooSlow {
                bytes: 200,
                window: Duration::from_secs(1)
            })
        );
    }

    #[test]
    fn a_window_at_the_rate_passes_and_the_next_starts_afresh() {
        let mut f = floor(1000, 1000);
        assert_eq!(f.record(Duration::from_millis(500), 600), Ok(()));
        assert_eq!(f.left(), Duration::from_millis(500));
        assert_eq!(f.record(Duration::from_millis(500), 400), Ok(()));
        assert_eq!(f.left(), Duration::from_secs(1));
        // Nothing carries over: the next window needs its own bytes.
        assert!(f.record(Duration::from_secs(1), 999).is_err());
    }

    #[test]
    fn silence_through_a_whole_window_fails() {
        let mut f = floor(1, 1000);
        assert!(f.record(Duration::from_secs(1), 0).is_err());
        // Even when the window is too short for one byte at the minimum rate.
        let mut f = floor(1, 200);
        assert!(f.record(Duration::from_millis(200), 0).is_err());
        let mut f = floor(1, 200);
        assert_eq!(f.record(Duration::from_millis(200), 1), Ok(()));
    }

    /// A body that sends `chunk` bytes every `every`, for ever.
    struct Steady {
        chunk: usize,
        every: Duration,
    }

    impl Body for Steady {
        fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, UpstreamError>> {
            Box::pin(async move {
                tokio::time::sleep(self.every).await;
                Ok(Some(Bytes::from(vec![0u8; self.chunk])))
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_the_rate_still_ends_at_the_whole_fetch_deadline() {
        // 1000 bytes a second, well over the floor of 100, for ever; the fetch may take 5 s.
        let limit = Duration::from_secs(5);
        let start = Instant::now();
        let mut body = Paced {
            inner: Box::new(Steady {
                chunk: 100,
                every: Duration::from_millis(100),
            }),
            url: "http://cache/nar/x".into(),
            floor: floor(100, 1000),
            min_rate: 100,
            deadline: Some((start + limit, limit)),
        };
        let mut received = 0;
        let err = loop {
            match body.next_chunk().await {
                Ok(Some(chunk)) => received += chunk.len(),
                Ok(None) => panic!("the body ended"),
                Err(e) => break e,
            }
        };
        assert!(
            matches!(err, UpstreamError::Deadline { what: "NAR", .. }),
            "{err:?}"
        );
        assert_eq!(start.elapsed(), limit);
        assert!(received >= 4900, "{received} bytes before the deadline");
    }

    #[test]
    fn the_nar_deadline_grows_with_nar_size() {
        let d = Deadlines::new(
            Duration::from_secs(1),
            1000,
            Duration::from_secs(1),
            Duration::from_secs(60),
        )
        .expect("valid deadlines");
        assert_eq!(d.nar(0), Duration::from_secs(60));
        assert_eq!(d.nar(10_000), Duration::from_secs(70));
        assert_eq!(d.nar(u64::MAX), MAX_NAR_DEADLINE);
    }

    #[test]
    fn zero_deadlines_and_rates_are_refused() {
        let s = Duration::from_secs(1);
        assert!(Deadlines::new(Duration::ZERO, 1, s, s).is_err());
        assert!(Deadlines::new(s, 0, s, s).is_err());
        assert!(Deadlines::new(s, 1, Duration::ZERO, s).is_err());
        assert!(Deadlines::new(s, 1, s, Duration::ZERO).is_err());
        let long = MAX_NAR_DEADLINE + s;
        assert!(Deadlines::new(long, 1, s, s).is_err());
        assert!(Deadlines::new(s, 1, long, s).is_err());
        assert!(Deadlines::new(s, 1, s, long).is_err());
    }
}
