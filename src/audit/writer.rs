//! The writer thread: the only code that touches audit files.
//!
//! It takes what is queued (up to [`MAX_BATCH`] records at a time), gives
//! each record its sequence number and the hash of the record before it,
//! appends the batch with one write and, with `fsync: batch`, one
//! `fdatasync`, then answers the requests waiting for it (group commit;
//! under concurrency it first waits [`LINGER`] for more, see `gather`).
//!
//! Files: `audit-<index>.jsonl`, index from 1. Each process start begins a
//! new file; a file is closed and the next begun before a record would grow
//! it past `max_file_bytes` (a file always holds its header and at least one
//! record). The first line of every file is a `file` record chained to the
//! last record of the file before, naming its own index and the length the
//! previous file had when it was closed. With `max_files` the oldest files
//! are deleted once a new one is begun.
//!
//! A failed write (a full disk) is undone (`ftruncate` back to the last
//! complete record; if even that fails, the next write begins a new file
//! whose header says where the old one ends); its records are counted as
//! lost and the writer is "failing" until a write succeeds again. It retries
//! every second by writing the `lost` record that accounts for them.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use super::record::{self, Body, Header, Lost, FORMAT_VERSION, GENESIS};
use super::storage::{AuditFile, AuditStorage};
use super::{AuditError, Decision, Msg, Shared};
use crate::config::{AuditConfig, AuditFsync};

/// Records taken from the queue for one write at most.
const MAX_BATCH: usize = 4096;
/// How often the thread wakes without records (anchor, retry, lost notes).
const TICK: Duration = Duration::from_secs(1);
/// A failing writer logs at most this often.
const ERROR_LOG_EVERY: Duration = Duration::from_secs(60);
/// The longest a batch waits for more records before its sync.
const LINGER: Duration = Duration::from_millis(1);
/// Read from the end of the last file to find its last record at start.
const TAIL_BYTES: u64 = 1 << 20;

/// What the thread needs from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    dir: PathBuf,
    max_file_bytes: u64,
    max_files: u64,
    fsync: AuditFsync,
    anchor_interval: Duration,
    /// `on_failure: count`: nobody waits for a batch, so it may linger.
    linger_always: bool,
}

impl Settings {
    pub fn from_config(c: &AuditConfig, dir: PathBuf) -> Self {
        Self {
            dir,
            max_file_bytes: c.max_file_bytes,
            max_files: c.max_files,
            fsync: c.fsync,
            anchor_interval: c.anchor_interval,
            linger_always: c.on_failure == crate::config::AuditOnFailure::Count,
        }
    }
}

/// The file being appended to.
struct Current {
    index: u64,
    file: Box<dyn AuditFile>,
    /// Bytes written and kept (complete records).
    committed: u64,
    /// Records in it (header included).
    records: u64,
    /// A failed write could not be undone: begin a new file.
    poisoned: bool,
    header: Header,
}

/// A batch being assembled for the current file.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    next_seq: u64,
    last_hash: [u8; 32],
    records: u64,
    decisions: u64,
    acks: Vec<oneshot::Sender<bool>>,
    /// The losses a `lost` record in this batch accounts for.
    lost: Option<Lost>,
}

struct Writer {
    s: Settings,
    storage: Arc<dyn AuditStorage>,
    shared: Arc<Shared>,
    /// Held for the thread's life: one writer per directory.
    _lock: Option<fs::File>,
    next_seq: u64,
    last_hash: [u8; 32],
    current: Option<Current>,
    next_index: u64,
    oldest_index: u64,
    /// Length of the last file closed, for the next header.
    closed_bytes: u64,
    next_reason: &'static str,
    /// Losses not yet written into the trail.
    unreported: Lost,
    healthy: bool,
    last_error_log: Option<Instant>,
    anchored: Option<u64>,
    last_anchor: Instant,
    /// Records in the last batch taken.
    last_batch: usize,
}

/// The thread's body: open, report readiness, serve the queue until every
/// sender is gone.
pub(crate) fn run(
    settings: Settings,
    storage: Arc<dyn AuditStorage>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Msg>,
    ready: oneshot::Sender<Result<(), AuditError>>,
) {
    let mut w = match Writer::open(settings, storage, shared) {
        Ok(w) => w,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    loop {
        match rx.recv_timeout(TICK) {
            Ok(first) => {
                let batch = w.gather(first, &rx);
                w.process(batch);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        w.periodic();
    }
    w.settle();
}

impl Writer {
    fn open(
        s: Settings,
        storage: Arc<dyn AuditStorage>,
        shared: Arc<Shared>,
    ) -> Result<Writer, AuditError> {
        let dir = s.dir.clone();
        let dir_err = |e: std::io::Error| AuditError::Dir {
            dir: dir.clone(),
            source: e,
        };
        create_private_dir(&s.dir).map_err(dir_err)?;
        let lock = lock_dir(&s.dir)?;
        let mut indices: Vec<u64> = fs::read_dir(&s.dir)
            .map_err(dir_err)?
            .filter_map(|e| e.ok())
            .filter_map(|e| record::parse_file_name(&e.file_name().to_string_lossy()))
            .collect();
        indices.sort_unstable();

        let mut w = Writer {
            oldest_index: indices.first().copied().unwrap_or(1),
            s,
            storage,
            shared,
            _lock: lock,
            next_seq: 0,
            last_hash: GENESIS,
            current: None,
            next_index: 1,
            closed_bytes: 0,
            next_reason: "start",
            unreported: Lost::default(),
            healthy: true,
            last_error_log: None,
            anchored: None,
            last_anchor: Instant::now(),
            last_batch: 0,
        };
        // Continue the chain from the last complete record on disk.
        while let Some(&index) = indices.last() {
            let path = w.s.dir.join(record::file_name(index));
            match last_record(&path)? {
                Tail::Empty => {
                    // Created, nothing written: nothing to lose.
                    fs::remove_file(&path).map_err(dir_err)?;
                    indices.pop();
                }
                Tail::NoCompleteRecord => {
                    let aside = path.with_extension("jsonl.torn");
                    fs::rename(&path, &aside).map_err(dir_err)?;
                    tracing::warn!(
                        file = %path.display(),
                        moved_to = %aside.display(),
                        "audit file without one complete record set aside"
                    );
                    indices.pop();
                }
                Tail::Record {
                    seq,
                    hash,
                    committed,
                    len,
                } => {
                    if committed < len {
                        tracing::warn!(
                            file = %path.display(),
                            bytes = len - committed,
                            "audit file ends with an incomplete record (a crash during a write); \
                             left in place, and the next file's header says where the chain ends"
                        );
                    }
                    w.next_seq = seq.saturating_add(1);
                    w.last_hash = hash;
                    w.next_index = index.saturating_add(1);
                    w.closed_bytes = committed;
                    tracing::info!(
                        dir = %w.s.dir.display(),
                        last_file = %path.display(),
                        last_seq = seq,
                        "audit trail continues"
                    );
                    break;
                }
            }
        }
        if indices.is_empty() {
            w.oldest_index = w.next_index;
        }
        // Begin this process's file now: a directory where no file can be
        // created (permissions, read-only) fails start-up rather than the
        // first request. A failing first write (a full disk) does not: the
        // writer starts "failing" and retries every second, as it would
        // had the disk filled up later.
        w.open_next().map_err(|e| AuditError::Dir {
            dir: w.s.dir.clone(),
            source: e,
        })?;
        let mut p = w.pending();
        if w.prepare_file(&mut p) {
            w.flush(&mut p);
        }
        Ok(w)
    }

    /// Takes what is queued after `first`. With a sync per batch, and
    /// only under concurrency (the last batch held more than one record, or
    /// requests now signing have reserved slots; with `on_failure: count`
    /// always, as nobody waits for the disk), it first sleeps [`LINGER`] so
    /// that one write and one sync cover more records (group commit).
    /// Sleeping, not waiting on the queue, so senders do not wake the
    /// thread for each record. A lone request never waits.
    fn gather(&mut self, first: Msg, rx: &mpsc::Receiver<Msg>) -> Vec<Msg> {
        let is_record = |m: &Msg| usize::from(matches!(m, Msg::Record(..)));
        let mut taken = is_record(&first);
        let mut batch = vec![first];
        let drain = |batch: &mut Vec<Msg>, taken: &mut usize| {
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => {
                        *taken += is_record(&m);
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
        };
        drain(&mut batch, &mut taken);
        let reserved = self.shared.queued.load(Ordering::Acquire) > taken;
        let linger = self.s.fsync == AuditFsync::Batch
            && batch.len() < MAX_BATCH
            && (self.s.linger_always || self.last_batch > 1 || reserved)
            && !batch.iter().any(|m| matches!(m, Msg::Flush(..)));
        if linger {
            std::thread::sleep(LINGER);
            drain(&mut batch, &mut taken);
        }
        self.shared.queued.fetch_sub(taken, Ordering::AcqRel);
        self.last_batch = taken;
        batch
    }

    fn pending(&self) -> Pending {
        Pending {
            next_seq: self.next_seq,
            last_hash: self.last_hash,
            ..Pending::default()
        }
    }

    fn reset(&self, p: &mut Pending) {
        p.bytes.clear();
        p.next_seq = self.next_seq;
        p.last_hash = self.last_hash;
        p.records = 0;
        p.decisions = 0;
        p.acks.clear();
        p.lost = None;
    }

    fn process(&mut self, batch: Vec<Msg>) {
        let mut p = self.pending();
        for msg in batch {
            match msg {
                Msg::Record(decision, ack) => {
                    self.append_decision(&mut p, &decision, ack);
                }
                Msg::Flush(done, anchor) => {
                    self.flush(&mut p);
                    if anchor {
                        self.settle();
                    }
                    let _ = done.send(());
                }
            }
        }
        self.flush(&mut p);
    }

    fn append_decision(
        &mut self,
        p: &mut Pending,
        d: &Decision,
        ack: Option<oneshot::Sender<bool>>,
    ) {
        if !self.prepare_file(p) {
            self.unwritten(ack);
            return;
        }
        self.drain_request_losses();
        if self.unreported.total() > 0 && p.lost.is_none() {
            self.push_lost(p);
        }
        let mut line = Vec::with_capacity(768);
        record::render(
            &mut line,
            p.next_seq,
            &p.last_hash,
            d.time,
            Body::Decision(d),
        );
        if self.would_overflow(p, line.len()) {
            if !self.flush(p) {
                self.unwritten(ack);
                return;
            }
            self.close_current();
            if !self.prepare_file(p) {
                self.unwritten(ack);
                return;
            }
            line.clear();
            record::render(
                &mut line,
                p.next_seq,
                &p.last_hash,
                d.time,
                Body::Decision(d),
            );
        }
        push(p, line, true, ack);
    }

    /// A record that could not even be placed in a batch.
    fn unwritten(&mut self, ack: Option<oneshot::Sender<bool>>) {
        self.unreported.write_error += 1;
        self.shared
            .metrics
            .lost
            .with_label_values(&["write_error"])
            .inc();
        if let Some(ack) = ack {
            let _ = ack.send(false);
        }
    }

    fn drain_request_losses(&mut self) {
        let s = &self.shared;
        self.unreported.queue_full += s.queue_full.swap(0, Ordering::Relaxed);
        self.unreported.over_budget += s.over_budget.swap(0, Ordering::Relaxed);
        self.unreported.writer_stopped += s.writer_stopped.swap(0, Ordering::Relaxed);
    }

    fn push_lost(&mut self, p: &mut Pending) {
        let lost = std::mem::take(&mut self.unreported);
        let mut line = Vec::with_capacity(256);
        record::render(
            &mut line,
            p.next_seq,
            &p.last_hash,
            SystemTime::now(),
            Body::Lost(&lost),
        );
        p.lost = Some(lost);
        push(p, line, false, None);
    }

    fn would_overflow(&self, p: &Pending, line_len: usize) -> bool {
        let Some(cur) = &self.current else {
            return false;
        };
        let size = cur.committed + p.bytes.len() as u64 + line_len as u64 + 1;
        size > self.s.max_file_bytes && cur.records + p.records >= 2
    }

    /// Makes sure a usable file is open, and that `p` starts with its header
    /// if nothing has been written to it yet. `false`: no file could be begun.
    fn prepare_file(&mut self, p: &mut Pending) -> bool {
        if self.current.as_ref().is_some_and(|c| c.poisoned) {
            self.close_current();
        }
        if self.current.is_none() {
            if let Err(e) = self.open_next() {
                self.note_failure(&e);
                return false;
            }
        }
        let Some(cur) = &self.current else {
            return false;
        };
        if cur.committed == 0 && p.records == 0 {
            let header = cur.header.clone();
            let mut line = Vec::with_capacity(256);
            record::render(
                &mut line,
                p.next_seq,
                &p.last_hash,
                SystemTime::now(),
                Body::Header(&header),
            );
            push(p, line, false, None);
        }
        true
    }

    fn open_next(&mut self) -> std::io::Result<()> {
        let index = self.next_index;
        let path = self.s.dir.join(record::file_name(index));
        let file = self.storage.create(&path)?;
        if let Err(e) = self.storage.sync_dir(&self.s.dir) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        self.current = Some(Current {
            index,
            file,
            committed: 0,
            records: 0,
            poisoned: false,
            header: Header {
                file: index,
                reason: self.next_reason,
                prev_bytes: self.closed_bytes,
                version: FORMAT_VERSION,
            },
        });
        self.next_index = index.saturating_add(1);
        self.shared
            .metrics
            .file
            .set(i64::try_from(index).unwrap_or(i64::MAX));
        self.retain(index);
        Ok(())
    }

    /// Deletes the oldest files beyond `max_files`.
    fn retain(&mut self, newest: u64) {
        if self.s.max_files == 0 {
            return;
        }
        while newest.saturating_sub(self.oldest_index) >= self.s.max_files {
            let path = self.s.dir.join(record::file_name(self.oldest_index));
            match fs::remove_file(&path) {
                Ok(()) => {
                    tracing::info!(file = %path.display(), "audit file removed (audit.max_files)")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot remove an old audit file")
                }
            }
            self.oldest_index += 1;
        }
    }

    fn close_current(&mut self) {
        let Some(mut cur) = self.current.take() else {
            return;
        };
        if cur.committed == 0 {
            // Not even its header was kept: remove it and reuse its index.
            let path = self.s.dir.join(record::file_name(cur.index));
            drop(cur);
            if fs::remove_file(&path).is_ok() {
                self.next_index -= 1;
                return;
            }
            self.closed_bytes = 0;
        } else {
            if self.s.fsync == AuditFsync::Rotation {
                if let Err(e) = cur.file.sync() {
                    tracing::error!(error = %e, "audit file: fsync at close failed");
                }
            }
            self.closed_bytes = cur.committed;
        }
        self.next_reason = "rotate";
    }

    /// Writes `p` to the current file. `false`: the write failed and was
    /// undone; its records are counted as lost and its waiters told so.
    fn flush(&mut self, p: &mut Pending) -> bool {
        if p.bytes.is_empty() {
            return true;
        }
        let sync = self.s.fsync == AuditFsync::Batch;
        let result = match self.current.as_mut() {
            Some(cur) => {
                cur.file
                    .write_all(&p.bytes)
                    .and_then(|()| if sync { cur.file.sync() } else { Ok(()) })
            }
            None => Err(std::io::Error::other("no audit file open")),
        };
        match result {
            Ok(()) => {
                let len = p.bytes.len() as u64;
                if let Some(cur) = self.current.as_mut() {
                    cur.committed += len;
                    cur.records += p.records;
                }
                self.next_seq = p.next_seq;
                self.last_hash = p.last_hash;
                let m = &self.shared.metrics;
                m.written.inc_by(p.records);
                m.bytes.inc_by(len);
                m.last_sequence
                    .set(i64::try_from(self.next_seq.saturating_sub(1)).unwrap_or(i64::MAX));
                if !self.healthy {
                    tracing::info!(dir = %self.s.dir.display(), "audit trail: writing again");
                    self.healthy = true;
                    self.shared.healthy.store(true, Ordering::Release);
                    m.healthy.set(1);
                }
                for ack in p.acks.drain(..) {
                    let _ = ack.send(true);
                }
                self.reset(p);
                true
            }
            Err(e) => {
                if let Some(cur) = self.current.as_mut() {
                    if cur.file.truncate(cur.committed).is_err() {
                        cur.poisoned = true;
                    }
                }
                if let Some(lost) = p.lost.take() {
                    self.unreported.add(&lost);
                }
                self.unreported.write_error += p.decisions;
                self.shared
                    .metrics
                    .lost
                    .with_label_values(&["write_error"])
                    .inc_by(p.decisions);
                self.note_failure(&e);
                for ack in p.acks.drain(..) {
                    let _ = ack.send(false);
                }
                self.reset(p);
                false
            }
        }
    }

    fn note_failure(&mut self, e: &std::io::Error) {
        let due = self
            .last_error_log
            .is_none_or(|t| t.elapsed() >= ERROR_LOG_EVERY);
        if self.healthy || due {
            tracing::error!(
                dir = %self.s.dir.display(),
                error = %e,
                "audit trail: write failed; records are lost (or, with audit.on_failure: refuse, \
                 certificates refused) until a write succeeds"
            );
            self.last_error_log = Some(Instant::now());
        }
        self.healthy = false;
        self.shared.healthy.store(false, Ordering::Release);
        self.shared.metrics.healthy.set(0);
    }

    /// Once a second: write down losses counted elsewhere (this is also
    /// the retry of a failing writer), and log the anchor when due.
    fn periodic(&mut self) {
        self.drain_request_losses();
        if self.unreported.total() > 0 || !self.healthy {
            let mut p = self.pending();
            if self.prepare_file(&mut p) {
                if self.unreported.total() > 0 {
                    self.push_lost(&mut p);
                }
                self.flush(&mut p);
            }
        }
        self.anchor(false);
    }

    /// Logs the newest record's hash: a copy outside the files that
    /// `audit verify --anchor` checks the files against.
    fn anchor(&mut self, force: bool) {
        let Some(seq) = self.next_seq.checked_sub(1) else {
            return;
        };
        if self.anchored == Some(seq) {
            return;
        }
        let due = !self.s.anchor_interval.is_zero()
            && self.last_anchor.elapsed() >= self.s.anchor_interval;
        if !(force || due) {
            return;
        }
        let file = self
            .current
            .as_ref()
            .map(|c| record::file_name(c.index))
            .unwrap_or_default();
        // `meshsign audit verify --anchor <anchor>` checks the files against it.
        tracing::info!(
            anchor = %format_args!("{seq}:{}", record::hex(&self.last_hash)),
            file = %file,
            "audit anchor"
        );
        self.anchored = Some(seq);
        self.last_anchor = Instant::now();
    }

    /// At shutdown: note what was lost, make the file durable, log the
    /// final anchor.
    fn settle(&mut self) {
        self.drain_request_losses();
        if self.unreported.total() > 0 {
            let mut p = self.pending();
            if self.prepare_file(&mut p) {
                self.push_lost(&mut p);
                self.flush(&mut p);
            }
        }
        if let Some(cur) = self.current.as_mut() {
            if cur.committed > 0 && self.s.fsync == AuditFsync::Rotation {
                let _ = cur.file.sync();
            }
        }
        self.anchor(true);
    }
}

fn push(p: &mut Pending, line: Vec<u8>, decision: bool, ack: Option<oneshot::Sender<bool>>) {
    p.last_hash = record::line_hash(&line);
    p.next_seq += 1;
    p.bytes.extend_from_slice(&line);
    p.bytes.push(b'\n');
    p.records += 1;
    if decision {
        p.decisions += 1;
    }
    if let Some(ack) = ack {
        p.acks.push(ack);
    }
}

/// The end of an existing file.
enum Tail {
    Empty,
    NoCompleteRecord,
    Record {
        seq: u64,
        hash: [u8; 32],
        /// Length up to and including the last complete record's newline.
        committed: u64,
        len: u64,
    },
}

fn last_record(path: &Path) -> Result<Tail, AuditError> {
    let err = |reason: String| AuditError::Resume {
        file: path.to_owned(),
        reason,
    };
    let mut f = fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let len = f.metadata().map_err(|e| err(e.to_string()))?.len();
    if len == 0 {
        return Ok(Tail::Empty);
    }
    let start = len.saturating_sub(TAIL_BYTES);
    f.seek(SeekFrom::Start(start))
        .map_err(|e| err(e.to_string()))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).map_err(|e| err(e.to_string()))?;
    let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
        return if start == 0 {
            Ok(Tail::NoCompleteRecord)
        } else {
            Err(err("its last record is longer than 1 MiB".into()))
        };
    };
    let line_start = match buf[..end].iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None if start == 0 => 0,
        None => return Err(err("its last record is longer than 1 MiB".into())),
    };
    let line = &buf[line_start..end];
    let parsed: record::Parsed = serde_json::from_slice(line).map_err(|e| {
        err(format!(
            "its last complete line is not an audit record: {e}"
        ))
    })?;
    Ok(Tail::Record {
        seq: parsed.seq,
        hash: record::line_hash(line),
        committed: start + end as u64 + 1,
        len,
    })
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// An exclusive `flock` on `DIR/.lock`: two processes appending to one
/// chain would break it.
fn lock_dir(dir: &Path) -> Result<Option<fs::File>, AuditError> {
    let path = dir.join(".lock");
    let mut options = fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options.open(&path).map_err(|e| AuditError::Dir {
        dir: dir.to_owned(),
        source: e,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(AuditError::Locked {
                dir: dir.to_owned(),
            });
        }
    }
    Ok(Some(file))
}
