//! Single-flight: concurrent requests for the same key share one piece of work.
//!
//! The work runs in its own task, so a client that hangs up does not cancel it for the
//! others (or waste what was already fetched). Its result, success or error, goes to
//! everyone who asked while it ran; nothing is remembered afterwards, so an error is never
//! cached by accident.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

pub struct SingleFlight<K, V> {
    flights: Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            flights: Arc::default(),
        }
    }
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` for `key` unless a run is already under way, and returns its result.
    /// `lost` is returned if the work task panicked or was cancelled.
    pub async fn run<F>(&self, key: K, work: F, lost: V) -> V
    where
        F: Future<Output = V> + Send + 'static,
    {
        let mut rx = {
            let Ok(mut flights) = self.flights.lock() else {
                return lost;
            };
            match flights.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(key.clone(), rx.clone());
                    let flights = self.flights.clone();
                    tokio::spawn(async move {
                        let v = work.await;
                        // Remove the flight before publishing, so a request arriving after
                        // the result starts a new flight rather than seeing a stale one.
                        if let Ok(mut f) = flights.lock() {
                            f.remove(&key);
                        }
                        let _ = tx.send(Some(v));
                    });
                    rx
                }
            }
        };
        let result = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        result.unwrap_or(lost)
    }

    /// Flights under way.
    pub fn len(&self) -> usize {
        self.flights.lock().map_or(0, |f| f.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_later_ones_start_another() {
        let sf: Arc<SingleFlight<&'static str, Result<u32, String>>> =
            Arc::new(SingleFlight::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let (go_tx, go_rx) = watch::channel(false);
        let mut handles = Vec::new();
        for _ in 0..50 {
            let (sf, runs, mut go) = (sf.clone(), runs.clone(), go_rx.clone());
            handles.push(tokio::spawn(async move {
                sf.run(
                    "k",
                    async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let _ = go.wait_for(|g| *g).await;
                        Err::<u32, _>("boom".to_string())
                    },
                    Err("lost".into()),
                )
                .await
            }));
        }
        // Let every caller join before the work finishes.
        while sf.is_empty() {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        go_tx.send(true).expect("send");
        for h in handles {
            assert_eq!(h.await.expect("join"), Err("boom".to_string()));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // The error was not kept: the next call runs again.
        let v = sf.run("k", async { Ok(7) }, Err("lost".into())).await;
        assert_eq!(v, Ok(7));
        assert!(sf.is_empty());
    }
}
