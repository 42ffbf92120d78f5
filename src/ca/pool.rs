//! Dedicated signing threads for slow (RSA) keys.
//!
//! An RSA-2048 signature costs ~250 µs of CPU: too long for the async reactor,
//! which must keep accepting, handshaking and answering everyone else. One
//! signer thread per core drains a shared queue. Under load a signer finds the
//! next job already queued, so there is no thread hand-off per certificate
//! (as `spawn_blocking` per request would cost), and parallelism is bounded by
//! the number of threads. A job whose caller has gone away is skipped.
//!
//! The queue is bounded: past `max_queued` waiting jobs a request is refused
//! at once with [`SignError::Overloaded`] (`RESOURCE_EXHAUSTED`, which
//! istio-agent retries with backoff) instead of waiting behind a backlog it
//! would time out in anyway.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use rustls_pki_types::CertificateDer;
use tokio::sync::oneshot;

use super::{Ca, SignError};

type Job = Box<dyn FnOnce(&Ca) -> Result<CertificateDer<'static>, SignError> + Send>;

struct Queued {
    ca: Arc<Ca>,
    job: Job,
    reply: oneshot::Sender<Result<CertificateDer<'static>, SignError>>,
}

/// A fixed set of signer threads.
#[derive(Debug)]
pub struct SigningPool {
    queue: mpsc::Sender<Queued>,
    /// Jobs sent and not yet taken by a signer thread.
    queued: Arc<AtomicUsize>,
    max_queued: usize,
}

impl SigningPool {
    /// Starts `threads` signer threads (at least one) sharing a queue of at
    /// most `max_queued` waiting jobs.
    pub fn new(threads: usize, max_queued: usize) -> std::io::Result<SigningPool> {
        let (tx, rx) = mpsc::channel::<Queued>();
        let rx = Arc::new(Mutex::new(rx));
        let queued = Arc::new(AtomicUsize::new(0));
        for i in 0..threads.max(1) {
            let (rx, depth) = (rx.clone(), queued.clone());
            std::thread::Builder::new()
                .name(format!("meshsign-signer-{i}"))
                .spawn(move || loop {
                    // Holding the lock only while taking one job.
                    let next = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    let Ok(queued) = next else { return };
                    depth.fetch_sub(1, Ordering::AcqRel);
                    if queued.reply.is_closed() {
                        continue; // the request was cancelled: don't burn a signature on it
                    }
                    let result = (queued.job)(&queued.ca);
                    let _ = queued.reply.send(result);
                })?;
        }
        Ok(SigningPool {
            queue: tx,
            queued,
            max_queued: max_queued.max(1),
        })
    }

    /// Jobs waiting for a signer thread now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Runs `job` with `ca` on a signer thread.
    pub async fn sign(
        &self,
        ca: Arc<Ca>,
        job: impl FnOnce(&Ca) -> Result<CertificateDer<'static>, SignError> + Send + 'static,
    ) -> Result<CertificateDer<'static>, SignError> {
        let waiting = self.queued.fetch_add(1, Ordering::AcqRel);
        if waiting >= self.max_queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SignError::Overloaded { queued: waiting });
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Queued {
                ca,
                job: Box::new(job),
                reply,
            })
            .map_err(|_| {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                SignError::Signature("signing pool stopped".into())
            })?;
        answer
            .await
            .map_err(|_| SignError::Signature("signing pool dropped the job".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    fn sample_ca() -> Arc<Ca> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/istio-samples");
        Arc::new(Ca::load(&dir, time::OffsetDateTime::now_utc()).expect("sample CA"))
    }

    #[tokio::test]
    async fn cancelled_jobs_are_skipped() {
        let pool = Arc::new(SigningPool::new(1, 16).unwrap());
        let ca = sample_ca();
        // Occupy the only signer thread.
        let (p, c) = (pool.clone(), ca.clone());
        let busy = tokio::spawn(async move {
            p.sign(c, |_| {
                std::thread::sleep(Duration::from_millis(300));
                Err(SignError::Serial)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let (p, c) = (pool.clone(), ca.clone());
        // Queue a second job, then give up on it while the first still runs.
        let second = tokio::spawn(async move {
            p.sign(c, move |_| {
                flag.store(true, Ordering::SeqCst);
                Err(SignError::Serial)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        second.abort();
        assert!(busy.await.unwrap().is_err());
        // A later job still runs, after the cancelled one was skipped.
        let done = pool.sign(ca, |_| Err(SignError::EmptyValidity)).await;
        assert!(matches!(done, Err(SignError::EmptyValidity)));
        assert!(
            !ran.load(Ordering::SeqCst),
            "cancelled job must not be signed"
        );
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_recovers() {
        let pool = Arc::new(SigningPool::new(1, 2).unwrap());
        let ca = sample_ca();
        let gate = Arc::new(std::sync::Barrier::new(2));
        // One job runs (blocked on the gate), two wait: the queue is full.
        let mut held = Vec::new();
        let running = Arc::new(AtomicBool::new(false));
        {
            let (p, c, g, r) = (pool.clone(), ca.clone(), gate.clone(), running.clone());
            held.push(tokio::spawn(async move {
                p.sign(c, move |_| {
                    r.store(true, Ordering::SeqCst);
                    g.wait();
                    Err(SignError::Serial)
                })
                .await
            }));
        }
        for _ in 0..400 {
            if running.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(running.load(Ordering::SeqCst), "the first job never ran");
        assert_eq!(pool.queued(), 0);
        for _ in 0..2 {
            let (p, c) = (pool.clone(), ca.clone());
            held.push(tokio::spawn(async move {
                p.sign(c, |_| Err(SignError::Serial)).await
            }));
        }
        eventually_queued(&pool, 2).await;
        let refused = pool.sign(ca.clone(), |_| Err(SignError::Serial)).await;
        assert!(
            matches!(refused, Err(SignError::Overloaded { queued: 2 })),
            "{refused:?}"
        );
        gate.wait();
        for h in held {
            assert!(matches!(h.await.unwrap(), Err(SignError::Serial)));
        }
        assert_eq!(pool.queued(), 0);
        let again = pool.sign(ca, |_| Err(SignError::EmptyValidity)).await;
        assert!(matches!(again, Err(SignError::EmptyValidity)));
    }

    async fn eventually_queued(pool: &SigningPool, n: usize) {
        for _ in 0..200 {
            if pool.queued() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("queue never reached {n} (at {})", pool.queued());
    }
}
