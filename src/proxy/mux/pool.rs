//! The outbound's pool of multiplexed connections.
//!
//! A connection is keyed by the upstream address it went to and by the
//! SVID we presented on it (the `Arc` of its certified key, which the
//! identity source makes anew for every SVID): a stream is only ever put
//! on a connection made with the SVID we hold *now*, so nothing is shared
//! across identities and, after a rotation, old connections take no new
//! stream. Each connection carries at most `max_streams_per_connection`
//! streams (or fewer, if the peer announces a lower limit); at the bound a
//! stream gets a new connection. A connection leaves the pool when it has
//! no stream and is idle for `pool_idle_timeout`, made with an SVID we no
//! longer present, or its tunnel stops; a revocation or drain closes it at
//! once with all its streams.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::debug;

use crate::proxy::registry::Closer;
use crate::proxy::Tunnel;
use crate::tls::verify::VerifiedPeer;

/// How often an idle connection looks whether it should close, at most.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long a connection that leaves the pool gets to say goodbye
/// (GOAWAY, close_notify) before it is dropped.
const GOODBYE: Duration = Duration::from_secs(1);

/// The pooled connections of one outbound.
#[derive(Default)]
pub struct Pool {
    conns: Mutex<Vec<Arc<PooledConn>>>,
}

/// One pooled connection, as streams see it.
pub struct PooledConn {
    pub addr: SocketAddr,
    /// The configured upstream name it came from.
    pub upstream: String,
    /// The SVID we presented on it.
    pub svid: Arc<CertifiedKey>,
    pub peer: VerifiedPeer,
    pub chain: Arc<[CertificateDer<'static>]>,
    /// Its registry entry's closer: a revocation or drain fires it.
    pub closer: Closer,
    /// Taken when the connection leaves the pool, so h2 can close it.
    sender: Mutex<Option<h2::client::SendRequest<Bytes>>>,
    bound: usize,
    active: AtomicUsize,
    carried: AtomicU64,
    /// Set when it leaves the pool: it takes no more streams.
    retired: AtomicBool,
    /// Woken when its last stream ends.
    idle: Notify,
}

/// A stream's claim on a connection: counted until dropped.
pub struct StreamSlot {
    pub conn: Arc<PooledConn>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn.idle.notify_one();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is one push, remove or swap.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PooledConn {
    /// The handle to open a stream with; `None` once retired.
    pub fn sender(&self) -> Option<h2::client::SendRequest<Bytes>> {
        lock(&self.sender).clone()
    }

    /// How many streams it may carry at once: our bound, or the peer's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` when lower.
    fn capacity(&self) -> usize {
        let peer = lock(&self.sender)
            .as_ref()
            .map_or(0, |s| s.current_max_send_streams());
        self.bound.min(peer)
    }

    fn usable(&self, svid: &Arc<CertifiedKey>) -> bool {
        !self.retired.load(Ordering::Acquire)
            && !self.closer.is_closed()
            && Arc::ptr_eq(&self.svid, svid)
    }

    /// Streams open on it now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

impl Pool {
    /// A slot on the least busy usable connection made with `svid`
    /// (to `addr` when given), if one has room.
    pub fn claim(&self, svid: &Arc<CertifiedKey>, addr: Option<SocketAddr>) -> Option<StreamSlot> {
        let conns = lock(&self.conns);
        let best = conns
            .iter()
            .filter(|c| c.usable(svid) && addr.is_none_or(|a| a == c.addr))
            .filter(|c| c.active() < c.capacity())
            .min_by_key(|c| c.active())?;
        // Under the pool lock, so two claims cannot both take the last
        // slot, and a retirement (also under it) sees every claim.
        best.active.fetch_add(1, Ordering::AcqRel);
        best.carried.fetch_add(1, Ordering::Relaxed);
        Some(StreamSlot {
            conn: Arc::clone(best),
        })
    }

    /// Adds a connection just made for a stream, with that stream's slot
    /// already taken.
    #[allow(clippy::too_many_arguments)]
    pub fn insert(
        &self,
        addr: SocketAddr,
        upstream: String,
        svid: Arc<CertifiedKey>,
        peer: VerifiedPeer,
        chain: Arc<[CertificateDer<'static>]>,
        closer: Closer,
        sender: h2::client::SendRequest<Bytes>,
        bound: usize,
    ) -> StreamSlot {
        let conn = Arc::new(PooledConn {
            addr,
            upstream,
            svid,
            peer,
            chain,
            closer,
            sender: Mutex::new(Some(sender)),
            bound,
            active: AtomicUsize::new(1),
            carried: AtomicU64::new(1),
            retired: AtomicBool::new(false),
            idle: Notify::new(),
        });
        lock(&self.conns).push(Arc::clone(&conn));
        StreamSlot { conn }
    }

    /// Takes `conn` out of the pool if it has no stream; returns whether
    /// it did (then no stream can ever be claimed on it).
    fn retire_if_unused(&self, conn: &Arc<PooledConn>) -> bool {
        let mut conns = lock(&self.conns);
        if conn.active() > 0 {
            return false;
        }
        self.remove(&mut conns, conn);
        true
    }

    fn remove(&self, conns: &mut Vec<Arc<PooledConn>>, conn: &Arc<PooledConn>) {
        conn.retired.store(true, Ordering::Release);
        conns.retain(|c| !Arc::ptr_eq(c, conn));
        lock(&conn.sender).take();
    }

    /// Takes `conn` out of the pool whatever it carries (it closed).
    fn retire(&self, conn: &Arc<PooledConn>) {
        let mut conns = lock(&self.conns);
        self.remove(&mut conns, conn);
    }

    /// Connections in the pool now.
    pub fn len(&self) -> usize {
        lock(&self.conns).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drives one pooled connection until it closes: revoked or drained (at
/// once, with its streams), closed by the peer, or retired when it has no
/// stream and is idle, made with an SVID we no longer present, or its
/// tunnel stops accepting. `keep` (its registry entry, its claim on the
/// balancer's endpoint) lives as long as the connection.
pub async fn run<F, K>(
    pool: Arc<Pool>,
    conn: Arc<PooledConn>,
    connection: F,
    tunnel: Arc<Tunnel>,
    idle_timeout: Duration,
    keep: K,
) where
    F: std::future::Future<Output = Result<(), h2::Error>> + Send,
    K: Send,
{
    let mux = &tunnel.metrics.mux;
    mux.connections.inc();
    mux.opened.inc();
    let mut connection = std::pin::pin!(connection);
    let mut idle_since = Instant::now();
    let why = loop {
        let check = tokio::time::sleep(CHECK_EVERY.min(idle_timeout));
        tokio::select! {
            biased;
            () = conn.closer.token().cancelled() => {
                pool.retire(&conn);
                break "closed by spiffe-tunnel (revoked or drained)";
            }
            result = &mut connection => {
                pool.retire(&conn);
                match result {
                    Ok(()) => break "closed by the peer",
                    Err(e) => {
                        debug!(upstream = %conn.upstream, error = %e, "multiplexed connection failed");
                        break "failed";
                    }
                }
            }
            () = conn.idle.notified() => idle_since = Instant::now(),
            () = check => {}
        }
        if conn.active() > 0 {
            continue;
        }
        let stale = tunnel
            .resolver
            .current()
            .is_none_or(|now| !Arc::ptr_eq(&now, &conn.svid));
        let stopping = tunnel.stop_accepting.is_cancelled();
        let idle = idle_since.elapsed() >= idle_timeout;
        if (stale || stopping || idle) && pool.retire_if_unused(&conn) {
            // No handle is left to open a stream: h2 sends GOAWAY and
            // closes the TLS connection.
            let _ = tokio::time::timeout(GOODBYE, &mut connection).await;
            break if stale {
                "made with an SVID we no longer present"
            } else if stopping {
                "tunnel stopped"
            } else {
                "idle"
            };
        }
    };
    debug!(upstream = %conn.upstream, why, streams = conn.carried.load(Ordering::Relaxed), "multiplexed connection closed");
    mux.connections.dec();
    mux.streams_per_connection
        .observe(conn.carried.load(Ordering::Relaxed) as f64);
    drop(keep);
}
