//! One HTTP/2 CONNECT stream as a byte stream: [`H2Stream`] makes a
//! stream's `SendStream`/`RecvStream` pair an `AsyncRead + AsyncWrite`, so
//! the copy loop, its limits and its closing rules ([`crate::proxy::copy`],
//! [`crate::proxy::closing`]) serve multiplexed connections unchanged.
//!
//! The mapping, HBONE's: DATA frames carry the raw bytes, END_STREAM is a
//! half-close (a TCP FIN on the plain side), and a failure is signalled
//! only *after* the bytes before it: a stream whose plain side failed ends
//! with a trailer [`ABORT_HEADER`] instead of a RST_STREAM, because h2
//! discards whatever DATA is still queued when a stream is reset, and no
//! byte the tunnel received may be dropped. The reader of such a stream
//! gets every byte, then a `ConnectionReset`, and resets its plain side in
//! turn, as it would for a direct connection that was cut.
//!
//! Flow control: received bytes are released back to the peer's window as
//! the copy takes them, so a slow plain reader holds the sender back by at
//! most one window plus one copy buffer, and no more is buffered here.
//! Writes ask h2 for capacity first and never hand it more than it granted,
//! so a stream's send buffer stays within its window too.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::proxy::closing;

/// The trailer that ends a stream whose plain side failed: the peer
/// delivers everything before it, then resets its plain side.
pub const ABORT_HEADER: &str = "spiffe-tunnel-abort";

/// The largest chunk handed to h2 in one write: one DATA frame's worth of
/// capacity requests per 64 KiB copy buffer.
const MAX_WRITE: usize = 64 * 1024;

/// A CONNECT stream carrying raw bytes both ways.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    pending: Bytes,
    /// Our END_STREAM (or abort trailer) is queued.
    send_done: bool,
    /// The peer's END_STREAM arrived (or the stream failed).
    recv_done: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            send_done: false,
            recv_done: false,
        }
    }

    /// Ends the stream after a copy: a direction still open is ended with
    /// the abort trailer (the copy stopped before it finished: a failure,
    /// an idle timeout, a revocation), then the peer gets up to `patience`
    /// to end its side, so that what we queued is sent before the stream's
    /// handles go (h2 resets a stream dropped while open, which discards
    /// its queued data). `closed` cuts the wait short.
    pub async fn finish(mut self, patience: Duration, closed: &CancellationToken) {
        if !self.send_done {
            self.abort();
        }
        if self.recv_done {
            return;
        }
        let drain = std::future::poll_fn(|cx| loop {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                }
                Some(Err(_)) | None => return Poll::Ready(()),
            }
        });
        tokio::select! {
            () = closed.cancelled() => {}
            _ = tokio::time::timeout(patience, drain) => {}
        }
        self.recv_done = true;
    }

    /// Ends our direction with the abort trailer.
    fn abort(&mut self) {
        let mut trailers = http::HeaderMap::new();
        trailers.insert(ABORT_HEADER, http::HeaderValue::from_static("1"));
        if self.send.send_trailers(trailers).is_err() {
            // The stream is gone already (reset by the peer, or its
            // connection closed): nothing left to tell.
            self.send.send_reset(Reason::CANCEL);
        }
        self.send_done = true;
    }

    /// What the stream's end after its last DATA frame means: a clean end
    /// of stream, or the peer's abort.
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let trailers = ready!(self.recv.poll_trailers(cx));
        self.recv_done = true;
        match trailers {
            Ok(Some(t)) if t.contains_key(ABORT_HEADER) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the far side's connection was cut (everything it sent was delivered)",
            ))),
            Ok(_) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

/// An h2 error as the copy loop sorts errors: a peer's reset or GOAWAY is
/// a reset; a broken TLS connection keeps its I/O kind (a truncation stays
/// `UnexpectedEof`).
pub fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 connection failed"));
    }
    match e.reason() {
        Some(reason) if e.is_remote() || e.is_go_away() => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset by the peer ({reason})"),
        ),
        Some(reason) => io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("stream closed ({reason})"),
        ),
        None => io::Error::other(e.to_string()),
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // Released as the copy takes it: the window tracks what
                // the plain side has yet to absorb.
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => {
                    this.recv_done = true;
                    return Poll::Ready(Err(to_io(e)));
                }
                None => return this.poll_end(cx),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if this.send_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = buf.len().min(MAX_WRITE);
        this.send.reserve_capacity(want);
        loop {
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(granted)) => {
                    let n = granted.min(want);
                    this.send
                        .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                        .map_err(to_io)?;
                    return Poll::Ready(Ok(n));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the stream was closed",
                    )))
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames out as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.send_done {
            this.send_done = true;
            this.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl closing::Socket for H2Stream {
    fn tcp(&self) -> Option<&tokio::net::TcpStream> {
        // Its TCP socket is the connection's, shared with other streams:
        // nothing of it is this stream's to wait on or reset.
        None
    }
}
