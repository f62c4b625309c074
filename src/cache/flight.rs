//! Single-flight: concurrent requests for the same key share one piece of work.
//!
//! The work runs in its own task, so a client that hangs up does not cancel it for the
//! others (or waste what was already fetched). Its result, success or error, goes to
//! everyone who asked while it ran; nothing is remembered afterwards, so an error is never
//! cached by accident.
//!
//! Work may hand back a tail with its result: what is left to do once the result is out
//! (the server keeps extracted files while their first responses are already being sent).
//! The flight stays registered until its tail is done, and whoever asks meanwhile waits for
//! that and is told [`Joined::Finished`], so that it looks again where the tail keeps
//! things instead of starting the work a second time.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// What is left of a piece of work after its result is published.
pub type Tail = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a caller of [`SingleFlight::join`] gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined<V> {
    /// The result of the run the caller started or waited for.
    Ran(V),
    /// The caller came after the result of a run was out, and that run's tail is now done.
    Finished,
}

type Flights<K, V> = Arc<Mutex<HashMap<K, watch::Receiver<Option<V>>>>>;

pub struct SingleFlight<K, V> {
    flights: Flights<K, V>,
    /// Runs not yet done, tails included.
    active: Arc<watch::Sender<usize>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight {
            flights: Arc::default(),
            active: Arc::new(watch::Sender::new(0)),
        }
    }
}

/// Held by a run's task, with the sender of its result: whatever way the task ends (panic
/// and cancellation included), its key is removed, unless a new run holds it by then, and
/// only then is the sender dropped, which wakes whoever waits for the run's end.
struct Running<K: Eq + Hash, V> {
    key: K,
    tx: watch::Sender<Option<V>>,
    mine: watch::Receiver<Option<V>>,
    flights: Flights<K, V>,
    active: Arc<watch::Sender<usize>>,
}

impl<K: Eq + Hash, V> Running<K, V> {
    fn remove(&self) {
        if let Ok(mut f) = self.flights.lock() {
            if f.get(&self.key)
                .is_some_and(|rx| rx.same_channel(&self.mine))
            {
                f.remove(&self.key);
            }
        }
    }

    fn publish(&self, v: V) {
        let _ = self.tx.send(Some(v));
    }
}

impl<K: Eq + Hash, V> Drop for Running<K, V> {
    fn drop(&mut self) {
        self.remove();
        self.active.send_modify(|n| *n = n.saturating_sub(1));
        // `tx` is dropped after this, with the other fields.
    }
}

/// How a caller takes part in a run.
enum Role<K: Eq + Hash, V> {
    /// Starts it.
    Lead(Running<K, V>),
    /// Waits for its result.
    Wait,
    /// Came after its result: waits for its tail.
    Late,
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
        match self
            .join(key, async { (work.await, None) }, lost.clone())
            .await
        {
            Joined::Ran(v) => v,
            // Without tails, nobody is told Finished.
            Joined::Finished => lost,
        }
    }

    /// [`SingleFlight::run`] for work that may leave a [`Tail`] after its result.
    pub async fn join<F>(&self, key: K, work: F, lost: V) -> Joined<V>
    where
        F: Future<Output = (V, Option<Tail>)> + Send + 'static,
    {
        let (mut rx, role) = {
            let Ok(mut flights) = self.flights.lock() else {
                return Joined::Ran(lost);
            };
            match flights.get(&key) {
                // Its result is out already: its tail is under way.
                Some(rx) if rx.borrow().is_some() => (rx.clone(), Role::Late),
                Some(rx) => (rx.clone(), Role::Wait),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(key.clone(), rx.clone());
                    self.active.send_modify(|n| *n += 1);
                    let running = Running {
                        key,
                        tx,
                        mine: rx.clone(),
                        flights: self.flights.clone(),
                        active: self.active.clone(),
                    };
                    (rx, Role::Lead(running))
                }
            }
        };
        match role {
            // Spawned outside the lock: a task dropped at once (its runtime shutting down)
            // takes the lock again to remove its key.
            Role::Lead(running) => {
                tokio::spawn(async move {
                    let (v, tail) = work.await;
                    match tail {
                        None => {
                            // Removed before publishing, so a request arriving after the
                            // result starts a new run rather than seeing this one.
                            running.remove();
                            running.publish(v);
                        }
                        Some(tail) => {
                            running.publish(v);
                            tail.await;
                        }
                    }
                });
            }
            Role::Wait => {}
            Role::Late => {
                // The sender goes when the run's task ends, tail and all.
                while rx.changed().await.is_ok() {}
                return Joined::Finished;
            }
        }
        let result = match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            Err(_) => None,
        };
        Joined::Ran(result.unwrap_or(lost))
    }

    /// Flights under way.
    pub fn len(&self) -> usize {
        self.flights.lock().map_or(0, |f| f.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until no run is under way, tails included.
    pub async fn idle(&self) {
        let _ = self.active.subscribe().wait_for(|n| *n == 0).await;
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

    #[tokio::test]
    async fn callers_during_a_tail_wait_for_it_and_are_told_it_finished() {
        let sf: Arc<SingleFlight<&'static str, u32>> = Arc::new(SingleFlight::default());
        let (tail_go, mut tail_wait) = watch::channel(false);
        let (tail_done_tx, tail_done) = watch::channel(false);
        let work = async move {
            let tail: Tail = Box::pin(async move {
                let _ = tail_wait.wait_for(|g| *g).await;
                let _ = tail_done_tx.send(true);
            });
            (7, Some(tail))
        };
        // The caller that ran the work has its result while the tail is still to do.
        assert_eq!(sf.join("k", work, 0).await, Joined::Ran(7));
        assert_eq!(sf.len(), 1, "the flight is gone before its tail is done");

        let late = tokio::spawn({
            let sf = sf.clone();
            async move {
                let never = async { panic!("a second run started during the tail") };
                sf.join("k", never, 0).await
            }
        });
        let idle = tokio::spawn({
            let sf = sf.clone();
            async move { sf.idle().await }
        });
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!late.is_finished() && !idle.is_finished());
        tail_go.send(true).expect("send");
        assert_eq!(late.await.expect("join"), Joined::Finished);
        assert!(
            *tail_done.borrow(),
            "told Finished before the tail was done"
        );
        idle.await.expect("join");
        assert!(sf.is_empty());
        // Done: the next call runs again.
        assert_eq!(sf.run("k", async { 8 }, 0).await, 8);
    }

    #[tokio::test]
    async fn a_run_that_panics_is_lost_and_forgotten() {
        let sf: SingleFlight<&'static str, u32> = SingleFlight::default();
        let v = sf.run("k", async { panic!("boom") }, 99).await;
        assert_eq!(v, 99);
        assert!(sf.is_empty());
        sf.idle().await;
        assert_eq!(sf.run("k", async { 1 }, 99).await, 1);
    }
}
