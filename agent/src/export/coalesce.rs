//! A TCP stream for the gRPC channel whose writes are handed to a writer task, so that what the
//! HTTP/2 stack writes in one turn goes to the kernel in one `write` instead of one per frame.
//!
//! Why: h2 writes every DATA frame (at most the collector's 16 KiB frame size) with its own
//! `writev` and flushes after each one. A 512-span batch is ~300 KiB, so ~18 system calls, and on
//! loopback each one wakes the collector, which preempts the agent at once (the agent runs
//! `SCHED_IDLE` while it keeps up, `sched.rs`): two context switches per frame. Here, the frames
//! of one poll of the connection collect in a buffer, and the writer task — scheduled after that
//! poll, on the same runtime thread — writes them out together (`cargo xtask bench`: see
//! docs/performance.md).
//!
//! Flow: `poll_write` appends to the buffer (up to [`LIMIT`]; past it the caller waits until the
//! writer takes the buffer) and wakes the writer; `poll_flush` only reports a write error, since
//! the writer sends everything it is given without waiting for more; `poll_shutdown` waits until
//! the writer has sent everything and shut the socket's write side down. A write error (or a
//! buffer the peer does not take within 30 s) is kept and returned to every later write, flush and
//! shutdown. At most 2 × [`LIMIT`] bytes are held (one buffer being written, one filling). Reads
//! go straight to the socket.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;

/// At most this many bytes wait for the writer; a write beyond it waits.
pub const LIMIT: usize = 256 << 10;

/// A write of one buffer (≤ [`LIMIT`]) that does not complete within this fails the connection
/// (h2 then reconnects), so a dropped stream's writer never waits on a dead peer for TCP's own,
/// much longer, timeout.
const WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Default)]
struct State {
    /// Bytes accepted and not yet taken by the writer.
    buf: Vec<u8>,
    /// The first write error (kind and text; `io::Error` is not `Clone`).
    error: Option<(io::ErrorKind, String)>,
    /// No more writes: the writer sends what is left, then shuts the write side down.
    closing: bool,
    /// The writer has finished (after `closing`, or after an error).
    done: bool,
    /// A caller waiting for room in `buf` or for `done`.
    waiter: Option<Waker>,
}

impl State {
    fn err(&self) -> Option<io::Error> {
        self.error.as_ref().map(|(k, m)| io::Error::new(*k, m.clone()))
    }

    fn wake(&mut self) {
        if let Some(w) = self.waiter.take() {
            w.wake();
        }
    }
}

struct Shared {
    state: Mutex<State>,
    kick: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: go on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// See the module documentation. Must be created inside a Tokio runtime (it spawns the writer).
pub struct CoalescingStream {
    read: OwnedReadHalf,
    shared: Arc<Shared>,
}

impl CoalescingStream {
    pub fn new(stream: TcpStream) -> CoalescingStream {
        let (read, write) = stream.into_split();
        let shared = Arc::new(Shared { state: Mutex::new(State::default()), kick: Notify::new() });
        tokio::spawn(writer(write, shared.clone()));
        CoalescingStream { read, shared }
    }

    fn accept(&self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        if let Some(e) = st.err() {
            return Poll::Ready(Err(e));
        }
        if st.closing {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown")));
        }
        let room = LIMIT.saturating_sub(st.buf.len());
        if room == 0 {
            st.waiter = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(room - n);
            st.buf.extend_from_slice(&b[..take]);
            n += take;
            if n == room {
                break;
            }
        }
        drop(st);
        if n > 0 {
            self.shared.kick.notify_one();
        }
        Poll::Ready(Ok(n))
    }
}

/// Sends whatever the stream accepted, one buffer at a time, until shutdown or an error.
async fn writer(mut sock: OwnedWriteHalf, shared: Arc<Shared>) {
    let mut out: Vec<u8> = Vec::new();
    loop {
        let shut = {
            let mut st = shared.lock();
            if !st.buf.is_empty() {
                std::mem::swap(&mut st.buf, &mut out);
                // Room again for a caller that waited.
                st.wake();
            }
            out.is_empty() && st.closing
        };
        if shut {
            let _ = sock.shutdown().await;
            let mut st = shared.lock();
            st.done = true;
            st.wake();
            return;
        }
        if out.is_empty() {
            shared.kick.notified().await;
            continue;
        }
        let sent = match tokio::time::timeout(WRITE_TIMEOUT, sock.write_all(&out)).await {
            Ok(r) => r,
            Err(_) => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "a write to the collector did not complete within 30 s"))
            }
        };
        if let Err(e) = sent {
            let mut st = shared.lock();
            st.error = Some((e.kind(), e.to_string()));
            st.done = true;
            st.buf.clear();
            st.wake();
            return;
        }
        out.clear();
    }
}

impl Drop for CoalescingStream {
    fn drop(&mut self) {
        // The writer sends what is left and ends.
        self.shared.lock().closing = true;
        self.shared.kick.notify_one();
    }
}

impl AsyncRead for CoalescingStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl AsyncWrite for CoalescingStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.accept(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.accept(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Everything accepted is on its way: the writer never holds bytes back.
        match self.shared.lock().err() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.shared.lock();
        if st.done {
            return Poll::Ready(st.err().map_or(Ok(()), Err));
        }
        st.closing = true;
        st.waiter = Some(cx.waker().clone());
        drop(st);
        self.shared.kick.notify_one();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (CoalescingStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (CoalescingStream::new(c.unwrap()), s.unwrap().0)
    }

    /// Many small writes arrive whole and in order, more than LIMIT in all (the caller waits
    /// for room), and shutdown ends the peer's stream after the last byte.
    #[tokio::test]
    async fn writes_arrive_in_order_and_shutdown_ends_the_stream() {
        let (mut c, mut s) = pair().await;
        let total = 3 * LIMIT + 12_345;
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        for chunk in data.chunks(16_393) {
            // A frame header and its payload, as h2 writes them.
            let (h, p) = chunk.split_at(9.min(chunk.len()));
            let mut bufs = [io::IoSlice::new(h), io::IoSlice::new(p)];
            let mut bufs = &mut bufs[..];
            while !bufs.is_empty() {
                let n = c.write_vectored(bufs).await.unwrap();
                io::IoSlice::advance_slices(&mut bufs, n);
            }
            c.flush().await.unwrap();
        }
        c.shutdown().await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), reader).await.unwrap().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes reordered or changed");
    }

    /// Reads go straight to the socket, both ways work on one stream.
    #[tokio::test]
    async fn reads_pass_through() {
        let (mut c, mut s) = pair().await;
        c.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
        s.write_all(b"pong").await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"pong");
    }

    /// A peer that went away: the error reaches the writer's caller instead of being lost.
    #[tokio::test]
    async fn a_write_error_is_returned() {
        let (mut c, s) = pair().await;
        drop(s);
        let chunk = vec![7u8; 64 << 10];
        let mut failed = None;
        for _ in 0..200 {
            match c.write_all(&chunk).await.and(c.flush().await) {
                Ok(()) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let e = failed.expect("writes to a closed peer must fail");
        assert!(
            matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset),
            "unexpected error {e:?}"
        );
        assert!(c.shutdown().await.is_err());
    }
}
