//! How a connection's sockets close when its copy ends in a failure: the
//! TLS peer left without close_notify (a truncation), a side reset, or an
//! error.
//!
//! Two rules meet here. No byte the tunnel received may be lost: the copy
//! has already written out everything it read, but the kernel may still
//! hold much of it in the socket's send queue, and a reset throws that
//! queue away. And the plain side must learn that the stream was cut,
//! which on TCP only a reset says: a FIN would make a cut-off response look
//! complete. So the tunnel first waits until the send queues of its TCP
//! sockets are empty (every byte acknowledged by the peer's kernel, where
//! a reset no longer reaches it: the app reads it all, then sees
//! `ECONNRESET`), and only then resets the plain side.
//!
//! The wait is bounded: it goes on while the queues keep draining, ends
//! when nothing drained for the tunnel's `idle_timeout` (the same patience
//! an open connection gets), and ends at once when the connection is closed
//! from outside (revocation, drain deadline). A Unix socket hands what is
//! written straight to the reader's queue, so it has nothing to wait for,
//! and no reset to send.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;
use tokio_rustls::{client, server};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::read_ahead::ReadAhead;
use super::send_queue::SendQueueProbe;

/// The first pause between two looks at the queues; it doubles up to
/// [`LONGEST_PAUSE`]. A loopback app drains a queue in microseconds, a
/// slow one in seconds.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const LONGEST_PAUSE: Duration = Duration::from_millis(50);

/// How long to wait when the kernel cannot be asked about send queues (no
/// sock_diag in this kernel or sandbox): long enough for a local app to
/// take what is queued, short enough not to hold a dead connection.
const BLIND_WAIT: Duration = Duration::from_secs(2);

/// The TCP socket under one side of a tunnel connection, if it has one.
pub trait Socket {
    fn tcp(&self) -> Option<&TcpStream>;
}

impl Socket for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Socket for UnixStream {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl Socket for server::TlsStream<ReadAhead<TcpStream>> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.get_ref().0.get_ref())
    }
}

impl Socket for client::TlsStream<ReadAhead<TcpStream>> {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self.get_ref().0.get_ref())
    }
}

/// Waits until what was written to `tls` and `plain` is delivered (see
/// the module doc for the bounds), then resets `plain`.
pub async fn deliver_then_reset(
    plain: &impl Socket,
    tls: &impl Socket,
    patience: Duration,
    closed: &CancellationToken,
) {
    let sockets: Vec<(SocketAddr, SocketAddr)> = [plain.tcp(), tls.tcp()]
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s.local_addr().ok()?, s.peer_addr().ok()?)))
        .collect();
    tokio::select! {
        biased;
        () = closed.cancelled() => debug!("closed while delivering the last bytes"),
        () = delivered(&sockets, patience) => {}
    }
    if let Some(tcp) = plain.tcp() {
        let _ = tcp.set_zero_linger();
    }
}

/// Returns once every socket in `sockets` has an empty send queue (or is
/// gone), or nothing drained for `patience`.
async fn delivered(sockets: &[(SocketAddr, SocketAddr)], patience: Duration) {
    if sockets.is_empty() {
        return;
    }
    let mut probe = match SendQueueProbe::new() {
        Ok(probe) => probe,
        Err(e) => {
            debug!(error = %e, wait = ?BLIND_WAIT, "cannot read socket send queues; waiting a fixed time instead");
            tokio::time::sleep(BLIND_WAIT).await;
            return;
        }
    };
    let mut pause = FIRST_PAUSE;
    let mut least = u64::MAX;
    let mut progress_at = Instant::now();
    loop {
        let mut queued = 0u64;
        for &(local, peer) in sockets {
            match probe.unacknowledged(local, peer) {
                Ok(Some(n)) => queued += u64::from(n),
                Ok(None) => {}
                Err(e) => {
                    debug!(error = %e, wait = ?BLIND_WAIT, "cannot read a socket send queue; waiting a fixed time instead");
                    tokio::time::sleep(BLIND_WAIT).await;
                    return;
                }
            }
        }
        if queued == 0 {
            return;
        }
        if queued < least {
            least = queued;
            progress_at = Instant::now();
        } else if progress_at.elapsed() >= patience {
            debug!(queued, "the reader stopped taking data; resetting anyway");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}
