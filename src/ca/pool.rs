//! Dedicated signing threads for slow (RSA) keys.
//!
//! An RSA-2048 signature costs ~250 µs of CPU: too long for the async reactor,
//! which must keep accepting, handshaking and answering everyone else. One
//! signer thread per core drains a shared queue. Under load a signer finds the
//! next job already queued, so there is no thread hand-off per certificate
//! (as `spawn_blocking` per request would cost), and parallelism is bounded by
//! the number of threads. A job whose caller has gone away is skipped.

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
}

impl SigningPool {
    /// Starts `threads` signer threads (at least one).
    pub fn new(threads: usize) -> std::io::Result<SigningPool> {
        let (tx, rx) = mpsc::channel::<Queued>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("meshsign-signer-{i}"))
                .spawn(move || loop {
                    // Holding the lock only while taking one job.
                    let next = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    let Ok(queued) = next else { return };
                    if queued.reply.is_closed() {
                        continue; // the request was cancelled: don't burn a signature on it
                    }
                    let result = (queued.job)(&queued.ca);
                    let _ = queued.reply.send(result);
                })?;
        }
        Ok(SigningPool { queue: tx })
    }

    /// Runs `job` with `ca` on a signer thread.
    pub async fn sign(
        &self,
        ca: Arc<Ca>,
        job: impl FnOnce(&Ca) -> Result<CertificateDer<'static>, SignError> + Send + 'static,
    ) -> Result<CertificateDer<'static>, SignError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Queued {
                ca,
                job: Box::new(job),
                reply,
            })
            .map_err(|_| SignError::Signature("signing pool stopped".into()))?;
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
        let pool = Arc::new(SigningPool::new(1).unwrap());
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
}
