//! Log output: formatted lines go to stderr in batches rather than one
//! `write` per line.
//!
//! Every issued certificate is logged (the audit trail), so at thousands of
//! certificates per second a system call per line is a measurable share of a
//! CPU core. Lines at INFO and below are appended to a buffer that is written
//! when it passes [`BATCH_BYTES`] or at least every [`MAX_DELAY`] by a small
//! flusher thread; a WARN or ERROR line is written at once, together with
//! everything before it, so order is kept and problems are never held back.
//! [`LogSink::flush`] is called before the process exits.
//!
//! Times are written as RFC 3339 ([`Rfc3339`]), and optional fields are
//! recorded only when present (`remote = remote.map(tracing::field::display)`),
//! never as `Some(..)`.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use time::OffsetDateTime;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

/// A batch this large is written at once.
pub const BATCH_BYTES: usize = 32 * 1024;
/// The longest an INFO line waits in the buffer.
pub const MAX_DELAY: Duration = Duration::from_millis(100);

/// Writes one batch of formatted lines.
type Output = Box<dyn Fn(&[u8]) + Send + Sync>;

/// Where log lines go: a buffer in front of a writer (stderr in the binary).
pub struct LogSink {
    buf: Mutex<Vec<u8>>,
    out: Output,
}

impl std::fmt::Debug for LogSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSink").finish_non_exhaustive()
    }
}

impl LogSink {
    /// A sink writing to `out`; nothing flushes it on a timer.
    pub fn new(out: impl Fn(&[u8]) + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            buf: Mutex::new(Vec::with_capacity(BATCH_BYTES)),
            out: Box::new(out),
        })
    }

    /// The process-wide sink for stderr, with its flusher thread (started once).
    pub fn stderr() -> Arc<Self> {
        static STDERR: OnceLock<Arc<LogSink>> = OnceLock::new();
        STDERR
            .get_or_init(|| {
                let sink = Self::new(|bytes| {
                    // Nowhere to report a failing stderr.
                    let _ = io::stderr().lock().write_all(bytes);
                });
                let weak = Arc::downgrade(&sink);
                let _ = std::thread::Builder::new()
                    .name("log-flush".into())
                    .spawn(move || flush_periodically(weak));
                sink
            })
            .clone()
    }

    /// Appends one formatted line; writes the batch if `urgent` or full.
    pub fn append(&self, line: &[u8], urgent: bool) {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        buf.extend_from_slice(line);
        if urgent || buf.len() >= BATCH_BYTES {
            (self.out)(&buf);
            buf.clear();
        }
    }

    /// Writes whatever is buffered.
    pub fn flush(&self) {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        if !buf.is_empty() {
            (self.out)(&buf);
            buf.clear();
        }
    }
}

/// A time as RFC 3339, in UTC, to the second (`2036-11-26T01:51:24Z`): how
/// every time is written in logs, command output and error messages
/// (`OffsetDateTime`'s own `Display` writes `2036-11-26 1:51:24.0 +00:00:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub OffsetDateTime);

impl Rfc3339 {
    /// A time given as seconds since the Unix epoch (a JWT's `exp`).
    pub fn unix(seconds: u64) -> UnixTime {
        UnixTime(seconds)
    }
}

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let utc = self.0.to_offset(time::UtcOffset::UTC);
        let whole = utc.replace_nanosecond(0).unwrap_or(utc);
        match whole.format(&time::format_description::well_known::Rfc3339) {
            Ok(s) => f.write_str(&s),
            // RFC 3339 has four-digit years only.
            Err(_) => write!(f, "{}", self.0),
        }
    }
}

/// Seconds since the Unix epoch, displayed as RFC 3339 ([`Rfc3339::unix`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixTime(pub u64);

impl std::fmt::Display for UnixTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = i64::try_from(self.0)
            .ok()
            .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok());
        match t {
            Some(t) => Rfc3339(t).fmt(f),
            None => write!(f, "{} (Unix time)", self.0),
        }
    }
}

fn flush_periodically(sink: Weak<LogSink>) {
    loop {
        std::thread::sleep(MAX_DELAY);
        match sink.upgrade() {
            Some(sink) => sink.flush(),
            None => return,
        }
    }
}

/// The writer `tracing-subscriber` formats one event into.
#[derive(Debug)]
pub struct LineWriter<'a> {
    sink: &'a LogSink,
    urgent: bool,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sink.append(buf, self.urgent);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hands `tracing-subscriber` a writer per event, urgent from WARN up.
#[derive(Debug, Clone)]
pub struct BatchedWriter(pub Arc<LogSink>);

impl<'a> MakeWriter<'a> for BatchedWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            sink: &self.0,
            urgent: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        LineWriter {
            sink: &self.0,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

/// A budget for lines that strangers can cause (refused requests): at most
/// `per_second` lines in each second; the rest are suppressed and counted,
/// and the next line let through reports how many were. A token-less flood
/// then costs a bounded amount of log, and no worker waits on writing it.
#[derive(Debug)]
pub struct LineBudget {
    per_second: u32,
    /// `(second, lines let through in it)`, packed: second << 32 | count.
    window: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LineBudget {
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// At `now_unix`: `Some(n)` to log the line (after `n` suppressed since
    /// the last one logged), `None` to suppress it.
    pub fn admit(&self, now_unix: u64) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let second = now_unix & 0xffff_ffff;
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let (window, count) = (current >> 32, current & 0xffff_ffff);
            let next = if window != second {
                (second << 32) | 1
            } else if count < u64::from(self.per_second) {
                current + 1
            } else {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn line_budget_lets_a_burst_through_and_counts_the_rest() {
        let budget = super::LineBudget::new(3);
        let t = 1_800_000_000;
        assert_eq!(budget.admit(t), Some(0));
        assert_eq!(budget.admit(t), Some(0));
        assert_eq!(budget.admit(t), Some(0));
        for _ in 0..10 {
            assert_eq!(budget.admit(t), None);
        }
        // The next second: logged again, reporting the 10 suppressed.
        assert_eq!(budget.admit(t + 1), Some(10));
        assert_eq!(budget.admit(t + 1), Some(0));
    }

    use super::*;

    type Writes = Arc<Mutex<Vec<Vec<u8>>>>;

    fn recording() -> (Arc<LogSink>, Writes) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let w = writes.clone();
        let sink = LogSink::new(move |b| w.lock().unwrap().push(b.to_vec()));
        (sink, writes)
    }

    #[test]
    fn info_lines_are_batched_until_flush() {
        let (sink, writes) = recording();
        sink.append(b"one\n", false);
        sink.append(b"two\n", false);
        assert!(writes.lock().unwrap().is_empty());
        sink.flush();
        assert_eq!(*writes.lock().unwrap(), vec![b"one\ntwo\n".to_vec()]);
        sink.flush();
        assert_eq!(
            writes.lock().unwrap().len(),
            1,
            "an empty flush writes nothing"
        );
    }

    #[test]
    fn urgent_line_writes_everything_before_it_in_order() {
        let (sink, writes) = recording();
        sink.append(b"info\n", false);
        sink.append(b"warn\n", true);
        assert_eq!(*writes.lock().unwrap(), vec![b"info\nwarn\n".to_vec()]);
    }

    #[test]
    fn a_full_batch_is_written_without_waiting() {
        let (sink, writes) = recording();
        let line = vec![b'x'; 1000];
        for _ in 0..(BATCH_BYTES / 1000) {
            sink.append(&line, false);
        }
        assert!(writes.lock().unwrap().is_empty());
        sink.append(&line, false);
        let w = writes.lock().unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].len(), (BATCH_BYTES / 1000 + 1) * 1000);
    }

    #[test]
    fn writer_is_urgent_from_warn_up() {
        use tracing_subscriber::layer::SubscriberExt;
        let (sink, writes) = recording();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(BatchedWriter(sink.clone()))
                .with_ansi(false),
        );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("first");
            assert!(writes.lock().unwrap().is_empty());
            tracing::warn!("second");
        });
        let w = writes.lock().unwrap();
        assert_eq!(w.len(), 1);
        let text = String::from_utf8_lossy(&w[0]);
        let (first, second) = (text.find("first"), text.find("second"));
        assert!(
            first.is_some() && second.is_some() && first < second,
            "{text}"
        );
    }

    #[test]
    fn times_are_rfc3339_to_the_second() {
        let t = OffsetDateTime::from_unix_timestamp(2_111_277_084).unwrap()
            + time::Duration::milliseconds(250);
        assert_eq!(Rfc3339(t).to_string(), "2036-11-26T01:51:24Z");
        let east = t.to_offset(time::UtcOffset::from_hms(2, 0, 0).unwrap());
        assert_eq!(Rfc3339(east).to_string(), "2036-11-26T01:51:24Z");
        assert_eq!(Rfc3339::unix(0).to_string(), "1970-01-01T00:00:00Z");
        assert_eq!(
            Rfc3339::unix(u64::MAX).to_string(),
            format!("{} (Unix time)", u64::MAX)
        );
    }

    #[test]
    fn optional_fields_are_logged_without_some() {
        use tracing_subscriber::layer::SubscriberExt;
        let (sink, writes) = recording();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(BatchedWriter(sink.clone()))
                .with_ansi(false),
        );
        let remote: Option<std::net::SocketAddr> = Some(([127, 0, 0, 1], 4242).into());
        let none: Option<std::net::SocketAddr> = None;
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(remote = remote.map(tracing::field::display), "known");
            tracing::warn!(remote = none.map(tracing::field::display), "unknown");
        });
        let text = writes
            .lock()
            .unwrap()
            .iter()
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect::<String>();
        assert!(text.contains("known remote=127.0.0.1:4242"), "{text}");
        assert!(!text.contains("Some("), "{text}");
        assert!(!text.contains("unknown remote"), "{text}");
    }
}
