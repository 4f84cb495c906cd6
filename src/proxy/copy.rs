//! Moving bytes both ways between the two ends of a tunnel.
//!
//! tokio's `copy_bidirectional` does the copying, half-close included: when
//! one side finishes sending, the other side's write half is shut down (a
//! TCP FIN, or a TLS close_notify) and the opposite direction keeps flowing
//! until it finishes too. Around it this module adds what a proxy needs: byte
//! counts, an idle timeout, and cancellation for drain and revocation. The
//! byte and activity counters are plain atomics touched once per read.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Buffer per direction. One TLS record carries at most 16 KiB of data, so
/// this moves a whole record per read without splitting it.
pub const BUFFER_SIZE: usize = 16 * 1024;

/// Why a copy ended.
#[derive(Debug)]
pub enum CopyEnd {
    /// Both directions finished cleanly.
    Done,
    /// Nothing moved for the idle timeout.
    Idle,
    /// Cancelled from outside (drain deadline, revocation).
    Cancelled,
    /// A socket failed (reset, broken pipe).
    Failed(io::Error),
}

/// Bytes moved, per direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    pub client_to_server: u64,
    pub server_to_client: u64,
}

/// Copies between `client` and `server` until both directions finish, the
/// connection is idle for `idle_timeout`, or `cancel` fires.
pub async fn pipe<C, S>(
    client: &mut C,
    server: &mut S,
    idle_timeout: Duration,
    cancel: &CancellationToken,
) -> (Transferred, CopyEnd)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
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
    let copy = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut server,
        BUFFER_SIZE,
        BUFFER_SIZE,
    );
    tokio::pin!(copy);

    // A timeout too long for the clock means "never".
    let far = |from: Instant| {
        from.checked_add(idle_timeout)
            .unwrap_or_else(|| from + Duration::from_secs(86400 * 365 * 30))
    };
    let mut deadline = far(start);
    let end = loop {
        tokio::select! {
            result = &mut copy => break match result {
                Ok(_) => CopyEnd::Done,
                Err(e) => CopyEnd::Failed(e),
            },
            () = tokio::time::sleep_until(deadline) => {
                let last = activity.last();
                if Instant::now().saturating_duration_since(last) >= idle_timeout {
                    break CopyEnd::Idle;
                }
                deadline = far(last);
            }
            () = cancel.cancelled() => break CopyEnd::Cancelled,
        }
    };
    let transferred = Transferred {
        client_to_server: from_client.load(Ordering::Relaxed),
        server_to_client: from_server.load(Ordering::Relaxed),
    };
    (transferred, end)
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

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
}
