//! The tamper-evident audit trail: one JSON record per `CreateCertificate`
//! decision, issued or refused, in hash-chained files.
//!
//! This module owns the record format ([`record`]), the writer thread and its
//! files (`writer`: batching, fsync, rotation by size, retention, resuming
//! the chain after a restart, the periodic anchor log line), the storage seam
//! tests use to simulate a full disk ([`storage`]), the audit metrics, and
//! the offline check behind `meshsign audit verify` ([`mod@verify`]).
//!
//! Request tasks never touch the disk: they hand a [`Decision`] to the
//! writer thread over a bounded queue. With `on_failure: refuse` an issuing
//! request first reserves a queue slot ([`AuditLog::reserve`]; refused with
//! `UNAVAILABLE` before signing when the queue is full or the writer is
//! failing), then waits for its record to be written (and, with `fsync:
//! batch`, synced) before the certificate is returned; if that write fails
//! the certificate is discarded and the caller gets `UNAVAILABLE`. With
//! `on_failure: count` nothing waits: a record that cannot be queued or
//! written is counted in `meshsign_audit_records_lost_total{reason}` and the
//! count is written into the trail as a `lost` record once writing works.
//! Refusals are always recorded without waiting; refusals of callers that
//! did not authenticate have a budget per second (a flood needs no
//! credentials), over which they are counted as lost (`over_budget`).

pub mod record;
pub mod storage;
pub mod verify;
mod writer;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::SystemTime;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rustls_pki_types::CertificateDer;
use tokio::sync::oneshot;

use crate::auth::{AuthSource, PodInfo};
use crate::config::{AuditConfig, AuditOnFailure};
use crate::logging::LineBudget;

pub use storage::{AuditFile, AuditStorage, FileSystem};
pub use verify::{verify, VerifyOptions, VerifyReport};

/// Why the audit trail could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit directory {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("audit directory {} is in use by another meshsign process", dir.display())]
    Locked { dir: PathBuf },
    #[error("audit file {}: cannot continue the hash chain: {reason} (verify the directory with `meshsign audit verify`, then move it aside to start a new trail)", file.display())]
    Resume { file: PathBuf, reason: String },
    #[error("audit metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("audit writer thread: {0}")]
    Thread(String),
}

/// Why an issuing request was refused for the audit trail's sake
/// (`on_failure: refuse`). The caller gets `UNAVAILABLE`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditUnavailable {
    #[error("the audit queue is full ({0} records waiting)")]
    QueueFull(usize),
    #[error("the audit writer is failing (disk full or I/O error)")]
    WriterFailing,
    #[error("the audit record could not be written; the certificate was discarded")]
    WriteFailed,
}

/// One decision, as the request saw it. Never holds a token or a key.
#[derive(Debug)]
pub struct Decision {
    pub time: SystemTime,
    pub outcome: Outcome,
    pub code: tonic::Code,
    /// The internal reason of a refusal (scrubbed, see [`record::scrub_reason`]).
    pub reason: Option<String>,
    /// The authenticated caller's SPIFFE ID.
    pub caller: Option<String>,
    pub auth: Option<AuthSource>,
    pub pod: Option<PodInfo>,
    pub remote: Option<SocketAddr>,
    /// The identity asked for: the impersonated one, or the CSR's.
    pub requested: Option<String>,
    /// Asked with `ImpersonatedIdentity` (ztunnel).
    pub impersonated: bool,
}

/// Issued (with the leaf) or refused.
#[derive(Debug)]
pub enum Outcome {
    Issued { leaf: CertificateDer<'static> },
    Refused,
}

/// Counters and gauges of the trail.
#[derive(Debug, Clone)]
pub(crate) struct AuditMetrics {
    pub written: IntCounter,
    pub bytes: IntCounter,
    pub lost: IntCounterVec,
    pub file: IntGauge,
    pub last_sequence: IntGauge,
    pub healthy: IntGauge,
}

impl AuditMetrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        fn reg<M: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            m: M,
        ) -> Result<M, prometheus::Error> {
            registry.register(Box::new(m.clone()))?;
            Ok(m)
        }
        Ok(Self {
            written: reg(
                registry,
                IntCounter::new(
                    "meshsign_audit_records_written_total",
                    "Audit records written (decisions, file headers and lost-record notes).",
                )?,
            )?,
            bytes: reg(
                registry,
                IntCounter::new(
                    "meshsign_audit_bytes_written_total",
                    "Bytes written to audit files.",
                )?,
            )?,
            lost: reg(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "meshsign_audit_records_lost_total",
                        "Decision records not written, by reason (queue_full, write_error, \
                         over_budget, writer_stopped).",
                    ),
                    &["reason"],
                )?,
            )?,
            file: reg(
                registry,
                IntGauge::new(
                    "meshsign_audit_current_file",
                    "Index of the audit file being written (audit-<index>.jsonl).",
                )?,
            )?,
            last_sequence: reg(
                registry,
                IntGauge::new(
                    "meshsign_audit_last_sequence",
                    "Sequence number of the newest audit record written.",
                )?,
            )?,
            healthy: reg(
                registry,
                IntGauge::new(
                    "meshsign_audit_writer_healthy",
                    "1 while the last audit write succeeded, 0 while writes fail.",
                )?,
            )?,
        })
    }
}

/// State shared by request tasks and the writer thread.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Records queued (or reserved) and not yet taken by the writer.
    pub queued: AtomicUsize,
    pub capacity: usize,
    pub healthy: AtomicBool,
    /// Losses counted on the request side, not yet written into the trail.
    pub queue_full: AtomicU64,
    pub over_budget: AtomicU64,
    pub writer_stopped: AtomicU64,
    pub metrics: AuditMetrics,
}

pub(crate) enum Msg {
    Record(Box<Decision>, Option<oneshot::Sender<bool>>),
    /// Answered once everything queued before it is written; `true`: then
    /// log the anchor too (shutdown).
    Flush(oneshot::Sender<()>, bool),
}

/// The request side of the trail. Cheap to call from any task.
#[derive(Debug)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    on_failure: AuditOnFailure,
    /// Refusals of unauthenticated callers per second.
    budget: Option<LineBudget>,
    dir: PathBuf,
}

/// A queue slot reserved before signing (`on_failure: refuse`); released if
/// not used.
#[derive(Debug)]
pub struct Slot<'a> {
    log: &'a AuditLog,
    used: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.used {
            self.log.shared.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl AuditLog {
    /// Opens (or continues) the trail in the configured directory and starts
    /// the writer thread. The directory is read on that thread, not here.
    pub async fn start(
        config: &AuditConfig,
        state_dir: &Path,
        storage: Arc<dyn AuditStorage>,
        registry: &Registry,
    ) -> Result<AuditLog, AuditError> {
        let dir = config.dir_in(state_dir);
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            capacity: config.max_queue,
            healthy: AtomicBool::new(true),
            queue_full: AtomicU64::new(0),
            over_budget: AtomicU64::new(0),
            writer_stopped: AtomicU64::new(0),
            metrics: AuditMetrics::register(registry)?,
        });
        shared.metrics.healthy.set(1);
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let settings = writer::Settings::from_config(config, dir.clone());
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer::run(settings, storage, thread_shared, rx, ready_tx))
            .map_err(|e| AuditError::Thread(e.to_string()))?;
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(AuditError::Thread("exited while starting".into())),
        }
        let per_second = config.unauthenticated_refusals_per_second;
        Ok(AuditLog {
            tx,
            shared,
            on_failure: config.on_failure,
            budget: (per_second > 0).then(|| LineBudget::new(per_second)),
            dir,
        })
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `on_failure: refuse`: issuing waits for its record.
    pub fn refuses(&self) -> bool {
        self.on_failure == AuditOnFailure::Refuse
    }

    /// A queue slot for the record of a certificate about to be signed, if
    /// the queue has room and the writer is not failing.
    pub fn reserve(&self) -> Result<Slot<'_>, AuditUnavailable> {
        if !self.shared.healthy.load(Ordering::Acquire) {
            return Err(AuditUnavailable::WriterFailing);
        }
        self.try_slot()
            .ok_or(AuditUnavailable::QueueFull(self.shared.capacity))
    }

    fn try_slot(&self) -> Option<Slot<'_>> {
        let before = self.shared.queued.fetch_add(1, Ordering::AcqRel);
        let slot = Slot {
            log: self,
            used: false,
        };
        if before >= self.shared.capacity {
            return None; // dropping the slot gives it back
        }
        Some(slot)
    }

    /// Queues the record of `slot`'s decision. The answer is `true` once it
    /// is written (and synced, with `fsync: batch`), `false` if that failed.
    pub async fn commit(&self, mut slot: Slot<'_>, decision: Decision) -> bool {
        let (ack, done) = oneshot::channel();
        slot.used = true;
        if self
            .tx
            .send(Msg::Record(Box::new(decision), Some(ack)))
            .is_err()
        {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            self.count_lost(&self.shared.writer_stopped, "writer_stopped");
            return false;
        }
        done.await.unwrap_or(false)
    }

    /// Queues a record without waiting (refusals; issuance with
    /// `on_failure: count`). `unauthenticated`: the caller did not
    /// authenticate, so the record is subject to the budget.
    pub fn record(&self, decision: Decision, unauthenticated: bool) {
        if unauthenticated {
            if let Some(budget) = &self.budget {
                if budget
                    .admit(crate::clock::Clock::now_unix(&crate::clock::SystemClock))
                    .is_none()
                {
                    self.count_lost(&self.shared.over_budget, "over_budget");
                    return;
                }
            }
        }
        let Some(mut slot) = self.try_slot() else {
            self.count_lost(&self.shared.queue_full, "queue_full");
            return;
        };
        slot.used = true;
        if self.tx.send(Msg::Record(Box::new(decision), None)).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            self.count_lost(&self.shared.writer_stopped, "writer_stopped");
        }
    }

    fn count_lost(&self, counter: &AtomicU64, reason: &str) {
        counter.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.lost.with_label_values(&[reason]).inc();
    }

    /// Waits until every record queued before this call is written.
    pub async fn flush(&self) {
        self.flush_and(false).await
    }

    /// [`Self::flush`], then logs the anchor (at shutdown).
    pub async fn close(&self) {
        self.flush_and(true).await
    }

    async fn flush_and(&self, anchor: bool) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx, anchor)).is_ok() {
            let _ = rx.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_are_bounded_and_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::from_yaml(&format!(
            "audit: {{ dir: {:?}, max_queue: 2 }}",
            dir.path().join("a").display().to_string()
        ))
        .unwrap()
        .audit
        .unwrap();
        let log = AuditLog::start(&config, dir.path(), Arc::new(FileSystem), &Registry::new())
            .await
            .unwrap();
        let a = log.reserve().unwrap();
        let b = log.reserve().unwrap();
        assert_eq!(log.reserve().unwrap_err(), AuditUnavailable::QueueFull(2));
        drop(a);
        let c = log.reserve().unwrap();
        drop((b, c));
        assert_eq!(log.shared.queued.load(Ordering::Acquire), 0);
    }

    /// Writes fail after half their bytes and cannot be undone either.
    #[derive(Debug)]
    struct Stuck(Arc<AtomicBool>);
    struct StuckFile(Box<dyn AuditFile>, Arc<AtomicBool>);
    impl AuditStorage for Stuck {
        fn create(&self, path: &Path) -> std::io::Result<Box<dyn AuditFile>> {
            Ok(Box::new(StuckFile(
                FileSystem.create(path)?,
                self.0.clone(),
            )))
        }
        fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
            FileSystem.sync_dir(dir)
        }
    }
    impl AuditFile for StuckFile {
        fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            if self.1.load(Ordering::SeqCst) {
                self.0.write_all(&bytes[..bytes.len() * 3 / 4])?;
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            self.0.write_all(bytes)
        }
        fn sync(&mut self) -> std::io::Result<()> {
            self.0.sync()
        }
        fn truncate(&mut self, len: u64) -> std::io::Result<()> {
            if self.1.load(Ordering::SeqCst) {
                return Err(std::io::ErrorKind::Other.into());
            }
            self.0.truncate(len)
        }
    }

    fn refusal(n: usize) -> Decision {
        Decision {
            time: SystemTime::now(),
            outcome: Outcome::Refused,
            code: tonic::Code::Unauthenticated,
            reason: Some(format!("refusal {n}")),
            caller: None,
            auth: None,
            pod: None,
            remote: None,
            requested: None,
            impersonated: false,
        }
    }

    #[tokio::test]
    async fn a_write_that_cannot_be_undone_is_left_out_of_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::Config::from_yaml("audit: { on_failure: count }")
            .unwrap()
            .audit
            .unwrap();
        let stuck = Arc::new(AtomicBool::new(false));
        let log = AuditLog::start(
            &config,
            dir.path(),
            Arc::new(Stuck(stuck.clone())),
            &Registry::new(),
        )
        .await
        .unwrap();
        log.record(refusal(1), false);
        log.flush().await;
        stuck.store(true, Ordering::SeqCst);
        for n in 2..6 {
            log.record(refusal(n), false);
        }
        log.flush().await;
        assert!(!log.shared.healthy.load(Ordering::Acquire));
        stuck.store(false, Ordering::SeqCst);
        log.record(refusal(6), false);
        log.flush().await;
        assert!(log.shared.healthy.load(Ordering::Acquire));

        // The damaged file was left; the next one says where it ends.
        let audit = dir.path().join("audit");
        let second = std::fs::read_to_string(audit.join(record::file_name(2))).unwrap();
        let header: serde_json::Value =
            serde_json::from_str(second.lines().next().unwrap()).unwrap();
        let first_len = std::fs::metadata(audit.join(record::file_name(1)))
            .unwrap()
            .len();
        assert!(header["prev_bytes"].as_u64().unwrap() < first_len);
        let report = verify(&[audit], &VerifyOptions::default()).unwrap();
        assert!(report.is_intact(), "{:#?}", report.problems);
        assert_eq!(report.warnings.len(), 1, "{:#?}", report.warnings);
        assert_eq!((report.refused, report.lost), (2, 4));
    }
}
