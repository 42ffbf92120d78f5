//! Read turns for a server connection: each connection hands the HTTP/2
//! layer at most [`READ_TURN`] bytes before its task goes to the back of the
//! workers' queue, so a client that keeps its socket full cannot keep a
//! worker to itself.
//!
//! Why: h2 reads frames for as long as its socket has data (tokio's
//! cooperative budget stops it only after 128 reads, up to a couple of
//! megabytes of TLS records to decrypt and frame), and every call on every
//! other connection waits behind that pass. A client sending bodies as fast
//! as flow control lets it (held partial bodies, oversized messages, a flood
//! of refused requests with large bodies) made each of its passes
//! milliseconds long, and a legitimate renewal queued behind a few of them
//! waited ten times its usual time. With a turn of [`READ_TURN`] bytes, a
//! pass costs tens of microseconds, whatever the client sends; a legitimate
//! request (at most `max_request_bytes`, 32 KiB by default) takes one or two
//! turns.
//!
//! The end of a turn is a `Pending` read with the task woken at once (the
//! same as `tokio::task::yield_now`): the connection's other work in the
//! pass (writes, timers) goes on, and its next pass starts where this one
//! stopped. A read that finds no data ends the turn too.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes one connection may read in a turn.
pub const READ_TURN: usize = 32 * 1024;

/// An I/O object whose reads are taken in turns of at most [`READ_TURN`]
/// bytes (the read that crosses the mark completes; the next one yields).
#[derive(Debug)]
pub struct FairRead<T> {
    inner: T,
    /// Bytes read since the turn began.
    turn: usize,
}

impl<T> FairRead<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, turn: 0 }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FairRead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.turn >= READ_TURN {
            this.turn = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &read {
            Poll::Ready(Ok(())) => this.turn += buf.filled().len() - before,
            Poll::Pending => this.turn = 0,
            Poll::Ready(Err(_)) => {}
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FairRead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::test_waker::CountingWaker;
    use std::sync::Arc;

    /// Always has `chunk` bytes to give.
    struct Firehose {
        chunk: usize,
    }

    impl AsyncRead for Firehose {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.chunk.min(buf.remaining());
            buf.put_slice(&vec![0u8; n]);
            Poll::Ready(Ok(()))
        }
    }

    /// Reads until the first `Pending`; returns the bytes read.
    fn one_pass(r: &mut FairRead<Firehose>, cx: &mut Context<'_>) -> usize {
        let mut total = 0;
        loop {
            let mut storage = [0u8; 8192];
            let mut buf = ReadBuf::new(&mut storage);
            match Pin::new(&mut *r).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => total += buf.filled().len(),
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => return total,
            }
            assert!(total < 10 * READ_TURN, "the turn never ended");
        }
    }

    #[test]
    fn a_client_that_never_stops_sending_gets_turns_and_is_woken_for_the_next() {
        let wakes = Arc::new(CountingWaker::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut r = FairRead::new(Firehose { chunk: 5000 });
        for pass in 1..=3 {
            let n = one_pass(&mut r, &mut cx);
            // The read that crosses the mark completes; no more after it.
            assert!(
                (READ_TURN..READ_TURN + 5000).contains(&n),
                "pass {pass}: {n}"
            );
            // Pending without a wake would stall the connection for ever.
            assert_eq!(wakes.count(), pass);
        }
    }

    /// Has data every other read.
    struct Trickle {
        next_empty: bool,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.next_empty = !this.next_empty;
            if this.next_empty {
                buf.put_slice(&[1u8; 1000]);
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn a_read_that_finds_no_data_starts_a_new_turn() {
        let wakes = Arc::new(CountingWaker::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut r = FairRead::new(Trickle { next_empty: false });
        // Far more than a turn in total, never a forced yield: each pass
        // ends by itself.
        for _ in 0..(4 * READ_TURN / 1000) {
            let mut storage = [0u8; 2048];
            let mut buf = ReadBuf::new(&mut storage);
            assert!(Pin::new(&mut r).poll_read(&mut cx, &mut buf).is_ready());
            let mut buf = ReadBuf::new(&mut storage);
            assert!(Pin::new(&mut r).poll_read(&mut cx, &mut buf).is_pending());
        }
        assert_eq!(wakes.count(), 0);
    }
}
