//! Background loops under supervision.
//!
//! meshsign keeps several loops running beside the request path: the CA
//! reload watch, JWKS refreshes, the serving certificate's renewal, the
//! health self-test, the pod watches and the root publisher. A loop that
//! panicked or returned used to be gone without a trace, freezing what it
//! kept fresh. [`spawn`] runs each one as a task of its own and, when it
//! ends for any reason, logs it at ERROR, counts it in
//! `meshsign_background_restarts_total{task}` and starts it again, after a
//! pause that doubles from 1 s to 60 s while it keeps failing (and resets
//! once it has run for a minute).
//!
//! A loop that belongs to something a configuration reload can remove (a
//! JWT issuer's refresh) is started with [`spawn_until`]: it ends, quietly
//! and for good, when its owner drops the [`Retire`] handle.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;

/// Longest pause between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A run this long counts as healthy: the next failure starts the backoff over.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs `make()` as a supervised task named `task` (see the module docs).
/// `restarts` counts the restarts.
pub fn spawn<F, Fut>(
    task: &'static str,
    restarts: prometheus::IntCounter,
    make: F,
) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    spawn_with_backoff(task, restarts, Duration::from_secs(1), make)
}

/// Ends a loop started with [`spawn_until`] when dropped.
#[derive(Debug)]
pub struct Retire(#[allow(dead_code)] tokio::sync::watch::Sender<()>);

/// [`spawn`], until the returned [`Retire`] is dropped: then the loop is
/// stopped (wherever it is waiting) and not restarted.
pub fn spawn_until<F, Fut>(task: &'static str, restarts: prometheus::IntCounter, make: F) -> Retire
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::watch::channel(());
    supervisor(task, restarts, Duration::from_secs(1), Some(rx), make);
    Retire(tx)
}

/// [`spawn`] with the first pause chosen (tests).
pub fn spawn_with_backoff<F, Fut>(
    task: &'static str,
    restarts: prometheus::IntCounter,
    first_backoff: Duration,
    make: F,
) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    supervisor(task, restarts, first_backoff, None, make)
}

fn supervisor<F, Fut>(
    task: &'static str,
    restarts: prometheus::IntCounter,
    first_backoff: Duration,
    mut retired: Option<tokio::sync::watch::Receiver<()>>,
    make: F,
) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        // Resolves once the owner dropped its `Retire` (never without one).
        async fn retirement(retired: &mut Option<tokio::sync::watch::Receiver<()>>) {
            match retired {
                Some(rx) => while rx.changed().await.is_ok() {},
                None => std::future::pending().await,
            }
        }
        let mut backoff = first_backoff;
        loop {
            let started = tokio::time::Instant::now();
            let mut run = tokio::spawn(make());
            let ended = tokio::select! {
                ended = &mut run => ended,
                _ = retirement(&mut retired) => {
                    run.abort();
                    return;
                }
            };
            match ended {
                Ok(()) => tracing::error!(task, "background task returned; restarting it"),
                Err(e) if e.is_panic() => {
                    let panic = e.into_panic();
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic".into());
                    tracing::error!(task, panic = %why, "background task panicked; restarting it");
                }
                // Cancelled: the runtime is shutting down.
                Err(_) => return,
            }
            restarts.inc();
            if started.elapsed() >= HEALTHY_RUN {
                backoff = first_backoff;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = retirement(&mut retired) => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_panicking_loop_is_restarted_and_counted() {
        let runs = Arc::new(AtomicUsize::new(0));
        let restarts = prometheus::IntCounter::new("r", "r").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let r = runs.clone();
        let handle = spawn_with_backoff(
            "test",
            restarts.clone(),
            Duration::from_millis(10),
            move || {
                let (r, tx) = (r.clone(), tx.clone());
                async move {
                    match r.fetch_add(1, Ordering::SeqCst) {
                        0 => panic!("first run fails"),
                        1 => {} // returns: also restarted
                        _ => {
                            let _ = tx.send(());
                            std::future::pending::<()>().await
                        }
                    }
                }
            },
        );
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("third run started")
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(restarts.get(), 2);
        handle.abort();
    }

    #[tokio::test]
    async fn a_retired_loop_is_stopped_and_not_restarted() {
        // The loop holds this; it is dropped when the loop's task ends.
        let alive = Arc::new(());
        let restarts = prometheus::IntCounter::new("r", "r").unwrap();
        let held = alive.clone();
        let retire = spawn_until("test", restarts.clone(), move || {
            let held = held.clone();
            async move {
                let _held = held;
                std::future::pending::<()>().await
            }
        });
        // Running: the closure's copy and the task's copy.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(Arc::strong_count(&alive), 3);
        drop(retire);
        let stopped = async {
            // The task's copy and then the closure's (the supervisor ends).
            while Arc::strong_count(&alive) > 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), stopped)
            .await
            .expect("the retired loop and its supervisor end");
        assert_eq!(restarts.get(), 0, "retiring is not a restart");
    }
}
