//! Moving bytes both ways between the two ends of a tunnel.
//!
//! This module owns the copy loop of every connection once it is
//! authorized: [`pipe`] reads from each side and writes to the other in one
//! future (no extra tasks), handles half-close (when one side finishes
//! sending, the other side's write half is flushed and shut down: a TCP
//! FIN, or a TLS close_notify, and the opposite direction keeps flowing
//! until it finishes too), counts the bytes, ends idle connections and
//! those past their lifetime, and stops on cancellation (drain,
//! revocation), which wins over any data ready to move.
//!
//! A read that fails (a TLS peer that left without close_notify, a reset)
//! ends the copy only after what was read before it is written out and
//! flushed: every byte that arrived in an authenticated record reaches the
//! other side. What the sockets then do is [`super::closing`]'s business.
//!
//! Buffers are lazy. Most connections a sidecar carries are idle most of
//! the time (pooled HTTP keep-alive, gRPC channels waiting for the next
//! call), so a buffer held for a connection's whole life costs memory per
//! idle connection, which is the number that decides how many connections a
//! node can hold. Here a direction takes its [`BUFFER_SIZE`] buffer only
//! when it is about to read and gives it back as soon as a read would block
//! with nothing left to write; while bulk data keeps flowing the buffer is
//! kept, so there is no allocation per read. An idle connection holds no
//! copy buffer at all. [`buffers_in_use`] counts the buffers alive in the
//! process (copy buffers and [`super::read_ahead`] buffers).
//!
//! The byte and activity counters are plain atomics touched once per read.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Buffer per direction, while data moves. A direction keeps reading into
/// it while its source has data ready (up to four full TLS records) and
/// then writes it in one call: on a stream, one `send` and one wake-up of
/// the receiving process per 64 KiB instead of per 16 KiB record, which is
/// what a loopback transfer between processes mostly pays for.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// How many buffers one direction moves in one poll at most before it
/// yields. tokio's own I/O types (sockets, duplex pipes) already return
/// `Pending` when the task's cooperative budget runs out, but a stream
/// that is always ready without consulting the budget (an in-memory
/// reader, a wrapper of our own) would otherwise keep the loop spinning,
/// starving the other direction, the idle timer, the cancellation, and
/// every other task on the worker thread. 32 × 16 KiB = 512 KiB per turn
/// keeps the per-poll overhead negligible.
const CHUNKS_PER_POLL: usize = 32;

/// Copy and read-ahead buffers alive in the process right now.
static BUFFERS_IN_USE: AtomicUsize = AtomicUsize::new(0);

/// How many copy buffers ([`BUFFER_SIZE`]) and read-ahead buffers
/// ([`super::read_ahead::READ_AHEAD`]) exist in the process right now. Idle
/// connections hold none, so this follows the connections that are moving
/// data, not the connections that are open.
pub fn buffers_in_use() -> usize {
    BUFFERS_IN_USE.load(Ordering::Relaxed)
}

/// A byte buffer that counts itself in [`buffers_in_use`], and in its
/// owner's own counter when there is one, for as long as it exists.
pub(crate) struct Buffer<'t> {
    /// Always allocated with the full capacity up front; reads fill the
    /// spare capacity without zeroing it first.
    pub(crate) bytes: Vec<u8>,
    tally: Option<&'t AtomicUsize>,
}

impl<'t> Buffer<'t> {
    pub(crate) fn new(capacity: usize, tally: Option<&'t AtomicUsize>) -> Self {
        BUFFERS_IN_USE.fetch_add(1, Ordering::Relaxed);
        if let Some(tally) = tally {
            tally.fetch_add(1, Ordering::Relaxed);
        }
        Self {
            bytes: Vec::with_capacity(capacity),
            tally,
        }
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        BUFFERS_IN_USE.fetch_sub(1, Ordering::Relaxed);
        if let Some(tally) = self.tally {
            tally.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why a copy ended.
#[derive(Debug)]
pub enum CopyEnd {
    /// Both directions finished cleanly.
    Done,
    /// Nothing moved for the idle timeout.
    Idle,
    /// The connection reached the end of its lifetime.
    Lifetime,
    /// Cancelled from outside (drain deadline, revocation).
    Cancelled,
    /// A socket failed (reset, broken pipe, a TLS stream cut without
    /// close_notify), after everything read before was written.
    Failed(io::Error),
}

/// When a copy gives up on its own.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Ends the copy when nothing moved for this long.
    pub idle_timeout: Duration,
    /// Ends the copy at this time, whatever moves.
    pub end_at: Option<Instant>,
}

impl From<Duration> for Limits {
    /// An idle timeout and no lifetime.
    fn from(idle_timeout: Duration) -> Self {
        Self {
            idle_timeout,
            end_at: None,
        }
    }
}

/// Bytes moved, per direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_server: u64,
    pub server_to_client: u64,
}

/// Copies between `client` and `server` until both directions finish, a
/// limit is reached, or `cancel` fires.
pub async fn pipe<C, S>(
    client: &mut C,
    server: &mut S,
    limits: impl Into<Limits>,
    cancel: &CancellationToken,
) -> (Transferred, CopyEnd)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    pipe_counted(client, server, limits.into(), cancel, None).await
}

/// [`pipe`], with this pipe's buffers also counted in `tally`.
async fn pipe_counted<C, S>(
    client: &mut C,
    server: &mut S,
    limits: Limits,
    cancel: &CancellationToken,
    tally: Option<&AtomicUsize>,
) -> (Transferred, CopyEnd)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Limits {
        idle_timeout,
        end_at,
    } = limits;
    let start = Instant::now();
    let activity = Activity {
        start,
        last_ms: AtomicU64::new(0),
    };
    let from_client = AtomicU64::new(0);
    let from_server = AtomicU64::new(0);
    let mut client = Metered {
        inner: client,
        read: &from_client,
        activity: &activity,
    };
    let mut server = Metered {
        inner: server,
        read: &from_server,
        activity: &activity,
    };
    let mut to_server = Direction::new(tally);
    let mut to_client = Direction::new(tally);
    // Both directions in one future: each poll gives both a turn, and the
    // copy is done when both are.
    let copy = poll_fn(|cx| {
        let up = to_server.poll_copy(cx, &mut client, &mut server)?;
        let down = to_client.poll_copy(cx, &mut server, &mut client)?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok::<(), io::Error>(()))
        } else {
            Poll::Pending
        }
    });
    let mut copy = pin!(copy);

    // A timeout too long for the clock means "never".
    let far = |from: Instant| {
        from.checked_add(idle_timeout)
            .unwrap_or_else(|| from + Duration::from_secs(86400 * 365 * 30))
    };
    let mut deadline = far(start);
    let lifetime = async {
        match end_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let mut lifetime = pin!(lifetime);
    let end = loop {
        // Biased, cancellation first: a revoked connection must not move
        // one more burst because its data happened to be ready too.
        tokio::select! {
            biased;
            () = cancel.cancelled() => break CopyEnd::Cancelled,
            () = &mut lifetime => break CopyEnd::Lifetime,
            result = &mut copy => break match result {
                Ok(()) => CopyEnd::Done,
                Err(e) => CopyEnd::Failed(e),
            },
            () = tokio::time::sleep_until(deadline) => {
                let last = activity.last();
                if Instant::now().saturating_duration_since(last) >= idle_timeout {
                    break CopyEnd::Idle;
                }
                deadline = far(last);
            }
        }
    };
    let transferred = Transferred {
        client_to_server: from_client.load(Ordering::Relaxed),
        server_to_client: from_server.load(Ordering::Relaxed),
    };
    (transferred, end)
}

/// Where one direction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading and writing.
    Copying,
    /// The source ended: flushing and shutting down the destination.
    Closing,
    /// The destination is shut down; nothing more to do.
    Finished,
}

/// One direction of the copy: its lazy buffer and where it stands.
struct Direction<'t> {
    /// Read and not yet written: `buf.bytes[written..]`. `None` while the
    /// direction is idle.
    buf: Option<Buffer<'t>>,
    written: usize,
    /// Something was written since the destination was last flushed.
    unflushed: bool,
    /// The source ended while the buffer still held bytes to write.
    source_ended: bool,
    /// The source failed; reported once what was read before is written.
    source_failed: Option<io::Error>,
    stage: Stage,
    tally: Option<&'t AtomicUsize>,
}

impl<'t> Direction<'t> {
    fn new(tally: Option<&'t AtomicUsize>) -> Self {
        Self {
            buf: None,
            written: 0,
            unflushed: false,
            source_ended: false,
            source_failed: None,
            stage: Stage::Copying,
            tally,
        }
    }

    /// Moves what it can from `from` to `to`. `Ready(Ok)` once the
    /// destination is shut down after the source ended; `Pending` while
    /// either side is not ready (or after a turn of [`CHUNKS_PER_POLL`]
    /// buffers, with the task woken to continue).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut chunks = 0;
        loop {
            match self.stage {
                Stage::Finished => return Poll::Ready(Ok(())),
                Stage::Closing => {
                    // Data a TLS writer still holds goes out before its
                    // close_notify; a TCP socket's flush is a no-op.
                    if self.unflushed {
                        ready!(Pin::new(&mut *to).poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                    self.stage = Stage::Finished;
                    return Poll::Ready(Ok(()));
                }
                Stage::Copying => {}
            }

            // Write out what the last read brought, however many writes
            // that takes; `Pending` keeps the buffer and its position.
            if let Some(buf) = self.buf.as_mut() {
                while self.written < buf.bytes.len() {
                    let n = ready!(Pin::new(&mut *to).poll_write(cx, &buf.bytes[self.written..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "the destination accepted no bytes",
                        )));
                    }
                    self.written += n;
                    self.unflushed = true;
                }
                buf.bytes.clear();
                self.written = 0;
            }
            if self.source_ended {
                self.buf = None;
                self.stage = Stage::Closing;
                continue;
            }
            if self.source_failed.is_some() {
                // Everything read is written; out of a TLS writer too.
                if self.unflushed {
                    ready!(Pin::new(&mut *to).poll_flush(cx))?;
                    self.unflushed = false;
                }
                self.buf = None;
                if let Some(e) = self.source_failed.take() {
                    return Poll::Ready(Err(e));
                }
            }

            // The buffer is empty here, so yielding loses nothing; the
            // buffer is kept because data is flowing.
            if chunks == CHUNKS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            chunks += 1;

            let tally = self.tally;
            let buf = self
                .buf
                .get_or_insert_with(|| Buffer::new(BUFFER_SIZE, tally));
            // `read_buf` fills the spare capacity of the vector, so a fresh
            // buffer is not zeroed first. Building the future anew on each
            // poll is fine: it holds no state of its own. Reads go on while
            // the source has data ready and the buffer has room, so one
            // write carries as much as possible.
            loop {
                match pin!(from.read_buf(&mut buf.bytes)).poll(cx) {
                    Poll::Ready(Ok(0)) => {
                        // End of stream: write what is left, then close.
                        self.source_ended = true;
                        break;
                    }
                    Poll::Ready(Ok(_)) => {
                        if buf.bytes.len() == buf.bytes.capacity() {
                            break;
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        // The bytes this turn read before the failure are
                        // written first; then the error ends the copy.
                        self.source_failed = Some(e);
                        break;
                    }
                    Poll::Pending if !buf.bytes.is_empty() => break,
                    Poll::Pending => {
                        // Nothing to read and nothing left to write: the
                        // connection is (for now) idle, so the buffer goes. A
                        // pending read put nothing into it (sockets and
                        // tokio-rustls only fill the buffer when they return
                        // `Ready`). A read that is pending only because the
                        // task's cooperative budget ran out frees it too: that
                        // happens once per many buffers, and costs one
                        // allocation.
                        self.buf = None;
                        // Bytes must not sit in a TLS writer's buffer while the
                        // source is quiet.
                        if self.unflushed {
                            ready!(Pin::new(&mut *to).poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// When data last moved, in milliseconds since the copy started.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}
/// A stream that counts what is read from it and records activity.
struct Metered<'a, T> {
    inner: &'a mut T,
    read: &'a AtomicU64,
    activity: &'a Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut *this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read.fetch_add(n as u64, Ordering::Relaxed);
            this.activity.touch();
        }
        poll
    }
}

crate::write_through::write_through!(inner for ['a, T: AsyncWrite + Unpin] Metered<'a, T>);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// `len` bytes of seeded noise.
    pub(crate) fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        data
    }

    /// Writes `data` in writes of random sizes up to `max`, then shuts down.
    pub(crate) async fn write_randomly<W: AsyncWrite + Unpin>(
        w: &mut W,
        data: &[u8],
        seed: u64,
        max: usize,
    ) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut at = 0;
        while at < data.len() {
            let n = rng.usize(1..=max).min(data.len() - at);
            w.write_all(&data[at..at + n]).await.unwrap();
            at += n;
        }
        w.shutdown().await.unwrap();
    }

    /// Reads to the end in reads of random sizes up to `max`.
    pub(crate) async fn read_randomly<R: AsyncRead + Unpin>(
        r: &mut R,
        seed: u64,
        max: usize,
    ) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut out = Vec::new();
        let mut chunk = vec![0u8; max];
        loop {
            let want = rng.usize(1..=max);
            let n = r.read(&mut chunk[..want]).await.unwrap();
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&chunk[..n]);
        }
    }

    /// Waits (in real time, up to 5 s) until `condition` holds.
    pub(crate) async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (mut a_outer, mut a_inner) = tokio::io::duplex(1024);
        let (mut b_inner, mut b_outer) = tokio::io::duplex(1024);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(async move {
            pipe(&mut a_inner, &mut b_inner, Duration::from_secs(10), &cancel).await
        });
        a_outer.write_all(b"hello").await.unwrap();
        a_outer.shutdown().await.unwrap();
        let mut got = Vec::new();
        b_outer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The other direction still works after the first one closed.
        b_outer.write_all(b"world!").await.unwrap();
        b_outer.shutdown().await.unwrap();
        let mut back = Vec::new();
        a_outer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        let (t, end) = task.await.unwrap();
        assert!(matches!(end, CopyEnd::Done), "{end:?}");
        assert_eq!(
            t,
            Transferred {
                client_to_server: 5,
                server_to_client: 6
            }
        );
    }

    #[tokio::test]
    async fn server_half_close_reaches_the_client_and_the_client_keeps_sending() {
        let (mut a_outer, mut a_inner) = tokio::io::duplex(1024);
        let (mut b_inner, mut b_outer) = tokio::io::duplex(1024);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(async move {
            pipe(&mut a_inner, &mut b_inner, Duration::from_secs(10), &cancel).await
        });
        b_outer.write_all(b"banner").await.unwrap();
        b_outer.shutdown().await.unwrap();
        // The client sees the server's end of stream while the pipe is
        // still running for the other direction.
        let mut got = Vec::new();
        a_outer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"banner");
        assert!(!task.is_finished(), "the pipe ended after one direction");
        a_outer.write_all(b"request").await.unwrap();
        let mut request = [0u8; 7];
        b_outer.read_exact(&mut request).await.unwrap();
        assert_eq!(&request, b"request");
        a_outer.shutdown().await.unwrap();
        let mut rest = Vec::new();
        b_outer.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (t, end) = task.await.unwrap();
        assert!(matches!(end, CopyEnd::Done), "{end:?}");
        assert_eq!(
            t,
            Transferred {
                client_to_server: 7,
                server_to_client: 6
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_random_payloads_both_ways_at_once() {
        const UP: usize = 3 * 1024 * 1024 + 17;
        const DOWN: usize = 5 * 1024 * 1024 / 2 + 3;
        let up = Arc::new(random_bytes(1, UP));
        let down = Arc::new(random_bytes(2, DOWN));
        // Small, odd capacities: nearly every 16 KiB write is partial and
        // both sides keep hitting `Pending`.
        let (a_outer, mut a_inner) = tokio::io::duplex(1000);
        let (mut b_inner, b_outer) = tokio::io::duplex(777);
        let cancel = CancellationToken::new();
        let copy = tokio::spawn(async move {
            pipe(&mut a_inner, &mut b_inner, Duration::from_secs(30), &cancel).await
        });
        let (mut a_read, mut a_write) = tokio::io::split(a_outer);
        let (mut b_read, mut b_write) = tokio::io::split(b_outer);
        let send_up = {
            let up = Arc::clone(&up);
            tokio::spawn(async move { write_randomly(&mut a_write, &up, 3, 40_000).await })
        };
        let send_down = {
            let down = Arc::clone(&down);
            tokio::spawn(async move { write_randomly(&mut b_write, &down, 4, 40_000).await })
        };
        let got_up = tokio::spawn(async move { read_randomly(&mut b_read, 5, 30_000).await });
        let got_down = tokio::spawn(async move { read_randomly(&mut a_read, 6, 30_000).await });
        send_up.await.unwrap();
        send_down.await.unwrap();
        let got_up = got_up.await.unwrap();
        let got_down = got_down.await.unwrap();
        assert_eq!(got_up.len(), UP);
        assert!(got_up == *up, "client→server bytes differ");
        assert_eq!(got_down.len(), DOWN);
        assert!(got_down == *down, "server→client bytes differ");
        let (t, end) = copy.await.unwrap();
        assert!(matches!(end, CopyEnd::Done), "{end:?}");
        assert_eq!(
            t,
            Transferred {
                client_to_server: UP as u64,
                server_to_client: DOWN as u64
            }
        );
    }

    #[tokio::test]
    async fn an_idle_pipe_holds_no_buffers() {
        let tally = Arc::new(AtomicUsize::new(0));
        let (a_outer, mut a_inner) = tokio::io::duplex(1024);
        let (mut b_inner, b_outer) = tokio::io::duplex(1024);
        let cancel = CancellationToken::new();
        let copy = {
            let tally = Arc::clone(&tally);
            let cancel = cancel.clone();
            tokio::spawn(async move {
                pipe_counted(
                    &mut a_inner,
                    &mut b_inner,
                    Duration::from_secs(60).into(),
                    &cancel,
                    Some(&tally),
                )
                .await
            })
        };
        let (mut a_read, mut a_write) = tokio::io::split(a_outer);
        let (mut b_read, mut b_write) = tokio::io::split(b_outer);

        // Open and polled, nothing sent: no buffer.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(tally.load(Ordering::Relaxed), 0);

        // Nobody reads at the far ends yet, so each direction is stuck
        // holding a buffer of unwritten bytes.
        let up = random_bytes(7, 100_000);
        let down = random_bytes(8, 100_000);
        let send_up = {
            let up = up.clone();
            tokio::spawn(async move {
                a_write.write_all(&up).await.unwrap();
                a_write
            })
        };
        let send_down = {
            let down = down.clone();
            tokio::spawn(async move {
                b_write.write_all(&down).await.unwrap();
                b_write
            })
        };
        eventually("both directions to hold a buffer", || {
            tally.load(Ordering::Relaxed) == 2
        })
        .await;
        // The process-wide count includes this pipe's (other tests may
        // add theirs, never take ours away).
        assert!(buffers_in_use() >= 2);

        let mut got_up = vec![0u8; up.len()];
        let mut got_down = vec![0u8; down.len()];
        let (r1, r2) = tokio::join!(
            b_read.read_exact(&mut got_up),
            a_read.read_exact(&mut got_down)
        );
        r1.unwrap();
        r2.unwrap();
        assert!(got_up == up && got_down == down);
        // Keep the write halves alive: the connection stays open, idle.
        let _open = (send_up.await.unwrap(), send_down.await.unwrap());

        eventually("the idle pipe to give its buffers back", || {
            tally.load(Ordering::Relaxed) == 0
        })
        .await;
        assert!(!copy.is_finished(), "the pipe should still be running");

        cancel.cancel();
        let (t, end) = copy.await.unwrap();
        assert!(matches!(end, CopyEnd::Cancelled), "{end:?}");
        assert_eq!(t.client_to_server, 100_000);
        assert_eq!(t.server_to_client, 100_000);
        assert_eq!(tally.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_quiet_source_flushes_the_destination() {
        // A buffering writer keeps small writes until flushed, as a TLS
        // stream may: the copy must flush once the source goes quiet.
        let (mut a_outer, mut a_inner) = tokio::io::duplex(1024);
        let (b_inner, mut b_outer) = tokio::io::duplex(1024);
        let mut b_inner = tokio::io::BufWriter::new(b_inner);
        let cancel = CancellationToken::new();
        let _copy = tokio::spawn(async move {
            pipe(&mut a_inner, &mut b_inner, Duration::from_secs(10), &cancel).await
        });
        a_outer.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), b_outer.read_exact(&mut got))
            .await
            .expect("the write was never flushed")
            .unwrap();
        assert_eq!(&got, b"ping");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_end() {
        let (_a_outer, mut a_inner) = tokio::io::duplex(64);
        let (mut b_inner, _b_outer) = tokio::io::duplex(64);
        let cancel = CancellationToken::new();
        let (_, end) = pipe(&mut a_inner, &mut b_inner, Duration::from_secs(5), &cancel).await;
        assert!(matches!(end, CopyEnd::Idle), "{end:?}");
    }

    #[tokio::test]
    async fn cancellation_ends_the_copy() {
        let (_a_outer, mut a_inner) = tokio::io::duplex(64);
        let (mut b_inner, _b_outer) = tokio::io::duplex(64);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let (_, end) = pipe(&mut a_inner, &mut b_inner, Duration::from_secs(5), &cancel).await;
        assert!(matches!(end, CopyEnd::Cancelled), "{end:?}");
    }

    /// A stream for failure cases: reads return `read` (or stay pending
    /// when it is `None`), writes accept `write_len` bytes (0: none).
    struct Scripted {
        read: Option<io::ErrorKind>,
        write_len: usize,
    }

    impl AsyncRead for Scripted {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.read {
                Some(kind) => Poll::Ready(Err(kind.into())),
                None => Poll::Pending,
            }
        }
    }

    impl AsyncWrite for Scripted {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len().min(self.write_len)))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_read_error_ends_the_copy_as_failed() {
        let mut client = Scripted {
            read: Some(io::ErrorKind::ConnectionReset),
            write_len: usize::MAX,
        };
        // The server side is healthy and open; the client's error still
        // ends the whole copy.
        let (mut b_inner, _b_outer) = tokio::io::duplex(64);
        let cancel = CancellationToken::new();
        let (_, end) = tokio::time::timeout(
            Duration::from_secs(5),
            pipe(&mut client, &mut b_inner, Duration::from_secs(60), &cancel),
        )
        .await
        .expect("the copy kept running after an error");
        match end {
            CopyEnd::Failed(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    /// Reads hand out `chunks`, one per read, then fail with `kind`.
    struct ThenFail {
        chunks: std::collections::VecDeque<Vec<u8>>,
        kind: io::ErrorKind,
    }

    impl ThenFail {
        fn new(chunks: usize, size: usize, kind: io::ErrorKind) -> Self {
            Self {
                chunks: (0..chunks).map(|i| random_bytes(i as u64, size)).collect(),
                kind,
            }
        }

        fn all(&self) -> Vec<u8> {
            self.chunks.iter().flatten().copied().collect()
        }
    }

    impl AsyncRead for ThenFail {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            match this.chunks.pop_front() {
                Some(mut chunk) => {
                    let n = chunk.len().min(buf.remaining());
                    buf.put_slice(&chunk[..n]);
                    if n < chunk.len() {
                        this.chunks.push_front(chunk.split_off(n));
                    }
                    Poll::Ready(Ok(()))
                }
                None => Poll::Ready(Err(this.kind.into())),
            }
        }
    }

    impl AsyncWrite for ThenFail {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn bytes_read_before_a_failure_are_written_before_it_ends_the_copy() {
        // Ten reads that fit one buffer, then a TLS stream's "closed
        // without close_notify": the reads and the failure come in one
        // turn, and the copy used to drop the buffer with the error.
        let mut client = ThenFail::new(10, 1000, io::ErrorKind::UnexpectedEof);
        let sent = client.all();
        let (mut b_inner, mut b_outer) = tokio::io::duplex(1 << 20);
        let cancel = CancellationToken::new();
        let (t, end) = pipe(&mut client, &mut b_inner, Duration::from_secs(60), &cancel).await;
        match end {
            CopyEnd::Failed(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("expected Failed, got {other:?}"),
        }
        assert_eq!(t.client_to_server, 10_000);
        drop(b_inner);
        let mut got = Vec::new();
        b_outer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), sent.len(), "bytes lost");
        assert!(got == sent, "bytes reordered");
    }

    #[tokio::test]
    async fn a_failure_flushes_what_a_buffering_writer_holds() {
        // Small enough to stay in the BufWriter until it is flushed.
        let mut client = ThenFail::new(3, 100, io::ErrorKind::ConnectionReset);
        let sent = client.all();
        let (b_inner, mut b_outer) = tokio::io::duplex(1 << 20);
        let mut b_inner = tokio::io::BufWriter::new(b_inner);
        let cancel = CancellationToken::new();
        let (_, end) = pipe(&mut client, &mut b_inner, Duration::from_secs(60), &cancel).await;
        assert!(matches!(end, CopyEnd::Failed(_)), "{end:?}");
        let mut got = vec![0u8; sent.len()];
        tokio::time::timeout(Duration::from_secs(5), b_outer.read_exact(&mut got))
            .await
            .expect("what was read before the failure was never flushed")
            .unwrap();
        assert_eq!(got, sent);
    }

    #[test]
    fn cancellation_wins_over_data_ready_to_move() {
        // Both sides always ready: an unbiased select picks the copy first
        // about half the time and moves a burst of a cancelled connection.
        for _ in 0..50 {
            let (t, end) = on_own_thread(Duration::from_secs(20), || async {
                let cancel = CancellationToken::new();
                cancel.cancel();
                pipe(&mut Endless, &mut Endless, Duration::from_secs(60), &cancel).await
            });
            assert!(matches!(end, CopyEnd::Cancelled), "{end:?}");
            assert_eq!(t, Transferred::default(), "a cancelled copy moved data");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_ends_at_its_lifetime_before_its_idle_timeout() {
        let (_a_outer, mut a_inner) = tokio::io::duplex(64);
        let (mut b_inner, _b_outer) = tokio::io::duplex(64);
        let cancel = CancellationToken::new();
        let started = Instant::now();
        let limits = Limits {
            idle_timeout: Duration::from_secs(3600),
            end_at: Some(started + Duration::from_secs(30)),
        };
        let (_, end) = pipe(&mut a_inner, &mut b_inner, limits, &cancel).await;
        assert!(matches!(end, CopyEnd::Lifetime), "{end:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_write_error_ends_the_copy_as_failed() {
        let (mut a_outer, mut a_inner) = tokio::io::duplex(1024);
        let (mut b_inner, b_outer) = tokio::io::duplex(1024);
        // The server end is gone: writing to it is a broken pipe.
        drop(b_outer);
        let cancel = CancellationToken::new();
        let copy = tokio::spawn(async move {
            pipe(&mut a_inner, &mut b_inner, Duration::from_secs(60), &cancel).await
        });
        a_outer.write_all(b"anyone there?").await.unwrap();
        let (t, end) = tokio::time::timeout(Duration::from_secs(5), copy)
            .await
            .expect("the copy kept running after an error")
            .unwrap();
        match end {
            CopyEnd::Failed(e) => assert_eq!(e.kind(), io::ErrorKind::BrokenPipe),
            other => panic!("expected Failed, got {other:?}"),
        }
        assert_eq!(t.client_to_server, 13);
    }

    /// Runs `make()` to completion on a fresh one-thread runtime on its
    /// own thread, failing after `limit`: a copy that spins without
    /// yielding fails the test instead of hanging it.
    fn on_own_thread<F>(limit: Duration, make: impl FnOnce() -> F + Send + 'static) -> F::Output
    where
        F: Future,
        F::Output: Send + 'static,
    {
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = done.send(runtime.block_on(make()));
        });
        result
            .recv_timeout(limit)
            .expect("the copy never yielded to the runtime")
    }

    #[test]
    fn a_write_of_zero_bytes_is_an_error() {
        let end = on_own_thread(Duration::from_secs(20), || async {
            let (mut a_outer, mut a_inner) = tokio::io::duplex(1024);
            let mut server = Scripted {
                read: None,
                write_len: 0,
            };
            let cancel = CancellationToken::new();
            a_outer.write_all(b"x").await.unwrap();
            let (_, end) = pipe(&mut a_inner, &mut server, Duration::from_secs(60), &cancel).await;
            end
        });
        match end {
            CopyEnd::Failed(e) => assert_eq!(e.kind(), io::ErrorKind::WriteZero),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn partial_writes_deliver_every_byte_in_order() {
        // The server takes 3 bytes per write at most.
        struct Trickle(Vec<u8>);
        impl AsyncRead for Trickle {
            fn poll_read(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                _: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        impl AsyncWrite for Trickle {
            fn poll_write(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                let n = buf.len().min(3);
                self.get_mut().0.extend_from_slice(&buf[..n]);
                Poll::Ready(Ok(n))
            }
            fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
            fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
                Poll::Ready(Ok(()))
            }
        }
        let data = random_bytes(9, 50_000);
        let mut client: &[u8] = &data;
        let mut client = tokio::io::join(&mut client, tokio::io::sink());
        let mut server = Trickle(Vec::new());
        let cancel = CancellationToken::new();
        let (t, end) = pipe(&mut client, &mut server, Duration::from_secs(60), &cancel).await;
        assert!(matches!(end, CopyEnd::Done), "{end:?}");
        assert_eq!(t.client_to_server, 50_000);
        assert!(server.0 == data, "bytes lost or reordered");
    }

    /// Always ready both ways without consulting tokio's budget: reads
    /// fill the buffer, writes take everything.
    struct Endless;

    impl AsyncRead for Endless {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            buf.put_slice(&vec![0x5a; buf.remaining()]);
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Endless {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn always_ready_sides_starve_neither_direction_nor_the_runtime() {
        // One thread, so a copy that never yields would keep the canceller
        // from ever running.
        let (t, end) = on_own_thread(Duration::from_secs(20), || async {
            let cancel = CancellationToken::new();
            let canceller = cancel.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    tokio::task::yield_now().await;
                }
                canceller.cancel();
            });
            pipe(&mut Endless, &mut Endless, Duration::from_secs(60), &cancel).await
        });
        assert!(matches!(end, CopyEnd::Cancelled), "{end:?}");
        assert!(t.client_to_server > 0, "client→server starved");
        assert!(t.server_to_client > 0, "server→client starved");
    }
}
