//! Write coalescing for a server connection: what the HTTP/2 layer writes
//! for an answer reaches TLS and the socket as one record and one system call,
//! instead of one per flush.
//!
//! Why: h2 flushes after every DATA frame of 256 bytes or more and again at
//! the end of each pass, so a unary gRPC answer (HEADERS + DATA, then the
//! trailers) costs two TLS records and two `writev`s, and on loopback each of
//! those also runs the receiver's TCP work and wakes it. Here every other
//! flush is *deferred*: the first flush leaves the bytes in [`Coalesce`]'s
//! buffer (and wakes the connection task, as a guarantee), the next one writes
//! everything. For one answer in a pass that is exactly one write, at the end
//! of the same pass, so no latency is added; several answers in one pass go
//! out roughly two at a time. A flush still deferred when the pass ends is
//! written at the start of the next pass, which h2 always begins by reading.
//! (Deferring *every* flush to the next pass batched more, but that pass can
//! come only after every task queued meanwhile, and the half-saturation p99
//! went from 3.5 to 5-11 ms; see `bench/README.md`.)
//!
//! Bounds, so that deferring can never stall, spin or bloat:
//! - the self-wake guarantees a next pass, so deferred bytes always leave;
//! - once the socket has pushed back, flushes are real (they return `Pending`
//!   with the socket's waker registered) until it drains;
//! - a buffer over [`HIGH_WATER`] is written at once;
//! - all connections together may hold at most [`DEFERRED_BUDGET`] bytes of
//!   deferred buffers; beyond that a flush is real;
//! - a drained buffer is freed, so an idle connection holds none.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A buffer this full is written at once.
pub const HIGH_WATER: usize = 64 * 1024;
/// Buffer capacity all connections together may hold in deferred flushes.
pub const DEFERRED_BUDGET: usize = 2 * 1024 * 1024;
/// A burst's first allocation: one answer with a P-256 chain fits.
const INITIAL_CAPACITY: usize = 4 * 1024;

/// Capacity currently held by deferred buffers, process-wide.
static DEFERRED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// An I/O object whose writes are buffered and written out in bursts.
#[derive(Debug)]
pub struct Coalesce<T> {
    inner: T,
    out: BytesMut,
    /// Capacity this connection counts against [`DEFERRED_BUDGET`]; non-zero
    /// exactly while a flush is deferred.
    deferred: usize,
    /// The last real write could not finish (the socket pushed back).
    blocked: bool,
}

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            out: BytesMut::new(),
            deferred: 0,
            blocked: false,
        }
    }

    fn release_deferral(&mut self) {
        if self.deferred != 0 {
            DEFERRED_BYTES.fetch_sub(self.deferred, Ordering::Relaxed);
            self.deferred = 0;
        }
    }

    /// Counts the buffer against the budget; false if it does not fit.
    fn try_defer(&mut self) -> bool {
        let cap = self.out.capacity().max(1);
        let before = DEFERRED_BYTES.fetch_add(cap, Ordering::Relaxed);
        if before + cap > DEFERRED_BUDGET {
            DEFERRED_BYTES.fetch_sub(cap, Ordering::Relaxed);
            return false;
        }
        self.deferred = cap;
        true
    }
}

impl<T> Drop for Coalesce<T> {
    fn drop(&mut self) {
        self.release_deferral();
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes the whole buffer to `inner` and flushes it.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.release_deferral();
        while !self.out.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.out.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.blocked = true;
                    return Poll::Pending;
                }
            }
        }
        self.blocked = false;
        // Free the memory between bursts.
        self.out = BytesMut::new();
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    /// Drains first when the buffer is full; sizes a fresh buffer for a
    /// whole answer so a burst does not grow it step by step.
    fn make_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        if self.out.len() >= HIGH_WATER {
            ready!(self.drain(cx))?;
        }
        if self.out.capacity() == 0 {
            self.out.reserve(len.max(INITIAL_CAPACITY));
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.deferred != 0 {
            // A new pass: write out what the last one left. If the socket
            // pushes back, its waker is registered and reading goes on.
            if let Poll::Ready(Err(e)) = this.drain(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.make_room(cx, buf.len()))?;
        this.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        ready!(this.make_room(cx, len))?;
        for b in bufs {
            this.out.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    /// Vectored writes are copied into the buffer, so h2 may hand over large
    /// DATA frames without copying them into its own buffer first.
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.out.is_empty() {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        if this.deferred != 0 || this.blocked || this.out.len() >= HIGH_WATER || !this.try_defer() {
            return this.drain(cx);
        }
        cx.waker().wake_by_ref();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::test_waker::CountingWaker;
    use std::sync::Arc;
    use std::task::Waker;

    /// An I/O object that records each write; reads never have data.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        /// When false, writes return `Pending` (a full socket).
        writable: bool,
        shut: bool,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if !this.writable {
                return Poll::Pending;
            }
            this.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    fn writable() -> Coalesce<Recorder> {
        Coalesce::new(Recorder {
            writable: true,
            ..Default::default()
        })
    }

    fn write(c: &mut Coalesce<Recorder>, cx: &mut Context<'_>, bytes: &[u8]) {
        assert!(matches!(
            Pin::new(c).poll_write(cx, bytes),
            Poll::Ready(Ok(n)) if n == bytes.len()
        ));
    }

    fn flush(c: &mut Coalesce<Recorder>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(c).poll_flush(cx)
    }

    fn read(c: &mut Coalesce<Recorder>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut space = [0u8; 16];
        Pin::new(c).poll_read(cx, &mut ReadBuf::new(&mut space))
    }

    #[test]
    fn one_answer_is_one_write_in_the_same_pass() {
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut c = writable();

        // h2's pass for one answer: HEADERS + DATA, flush, trailers, flush.
        write(&mut c, &mut cx, b"headers+data");
        assert!(flush(&mut c, &mut cx).is_ready());
        assert!(c.inner.writes.is_empty(), "the first flush is deferred");
        write(&mut c, &mut cx, b"trailers");
        assert!(flush(&mut c, &mut cx).is_ready());
        assert_eq!(c.inner.writes, vec![b"headers+datatrailers".to_vec()]);
        assert_eq!(c.inner.flushes, 1);
        assert_eq!(c.out.capacity(), 0, "a drained buffer is freed");

        // Nothing pending: flush and read go straight through, no wake.
        let wakes = counter.count();
        assert!(flush(&mut c, &mut cx).is_ready());
        assert!(read(&mut c, &mut cx).is_pending());
        assert_eq!(counter.count(), wakes);
        assert_eq!(c.inner.writes.len(), 1);
    }

    #[test]
    fn a_flush_left_deferred_goes_out_at_the_next_read() {
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut c = writable();

        write(&mut c, &mut cx, b"settings");
        assert!(flush(&mut c, &mut cx).is_ready());
        assert!(c.inner.writes.is_empty());
        assert_eq!(counter.count(), 1, "the task woke itself");

        // The next pass starts with a read: the buffer goes out first.
        assert!(read(&mut c, &mut cx).is_pending());
        assert_eq!(c.inner.writes, vec![b"settings".to_vec()]);
        assert_eq!(c.deferred, 0);
    }

    #[test]
    fn a_full_socket_makes_flushes_real_and_pending() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut c = Coalesce::new(Recorder::default()); // not writable

        write(&mut c, &mut cx, b"one");
        assert!(flush(&mut c, &mut cx).is_ready(), "first flush is deferred");
        assert!(read(&mut c, &mut cx).is_pending());
        assert!(c.blocked, "the drain at the read met a full socket");

        // Now flushes must wait for the socket instead of pretending.
        write(&mut c, &mut cx, b"two");
        assert!(flush(&mut c, &mut cx).is_pending());
        assert!(flush(&mut c, &mut cx).is_pending());

        c.inner.writable = true;
        assert!(flush(&mut c, &mut cx).is_ready());
        assert_eq!(c.inner.writes, vec![b"onetwo".to_vec()]);
        assert!(!c.blocked);
    }

    #[test]
    fn a_large_buffer_is_written_without_deferring() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut c = writable();
        let big = vec![7u8; HIGH_WATER];
        write(&mut c, &mut cx, &big);
        assert!(flush(&mut c, &mut cx).is_ready());
        assert_eq!(c.inner.writes.len(), 1);
        // A write beyond the high-water mark drains before buffering more.
        write(&mut c, &mut cx, &big);
        write(&mut c, &mut cx, b"x");
        assert_eq!(c.inner.writes.len(), 2);
    }

    #[test]
    fn shutdown_writes_what_is_buffered_first() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut c = writable();
        write(&mut c, &mut cx, b"goaway");
        assert!(flush(&mut c, &mut cx).is_ready());
        assert!(Pin::new(&mut c).poll_shutdown(&mut cx).is_ready());
        assert_eq!(c.inner.writes, vec![b"goaway".to_vec()]);
        assert!(c.inner.shut);
    }

    #[test]
    fn deferred_buffers_share_one_budget() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        // More connections than the budget allows to defer at once.
        let n = DEFERRED_BUDGET / INITIAL_CAPACITY + 8;
        let mut conns: Vec<_> = (0..n).map(|_| writable()).collect();
        for c in &mut conns {
            write(c, &mut cx, b"answer");
            assert!(flush(c, &mut cx).is_ready());
        }
        let written_at_once = conns.iter().filter(|c| !c.inner.writes.is_empty()).count();
        assert!(
            written_at_once >= 8,
            "only {written_at_once} of {n} wrote at once"
        );
        assert!(written_at_once < n, "none deferred");
        // Dropping deferred connections returns their share.
        let held = DEFERRED_BYTES.load(Ordering::SeqCst);
        let deferred: usize = conns.iter().map(|c| c.deferred).sum();
        assert!(held >= deferred);
        assert!(deferred > DEFERRED_BUDGET / 2);
        drop(conns);
        // Other tests may defer a little meanwhile; far less than was returned.
        let slack = 16 * INITIAL_CAPACITY;
        assert!(DEFERRED_BYTES.load(Ordering::SeqCst) <= held - deferred + slack);
    }
}
