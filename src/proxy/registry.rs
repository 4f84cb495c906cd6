//! The live connections of the whole process: who is connected to which
//! tunnel, as which SPIFFE ID, since when.
//!
//! It exists so that a connection can be found again after it started:
//! `/status` lists them, drain counts them, and a policy reload or bundle
//! change closes those whose peer is no longer allowed. A connection
//! registers as soon as it is accepted, before its handshake, and leaves
//! when its task ends (the guard's drop), so none can slip between a
//! reload and the scan that follows it.
//!
//! Every new connection takes the lock three times (register, peer,
//! leave), so nothing slow happens under it: an entry is shared
//! ([`Arc`]), so a [`ConnectionRegistry::snapshot`] for `/status` copies
//! one pointer per connection and renders after the lock is released, and
//! what a connection records is built before the lock is taken.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::metrics::TunnelKind;
use crate::tls::verify::VerifiedPeer;

/// One live connection, as shown to operators.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub id: u64,
    pub tunnel: String,
    pub kind: TunnelKind,
    pub client: SocketAddr,
    pub since: SystemTime,
    /// Set once the peer is authorized.
    pub peer: Option<VerifiedPeer>,
    /// The peer's chain as it sent it, to re-verify when bundles change.
    pub peer_chain: Option<Arc<[CertificateDer<'static>]>>,
}

#[derive(Debug)]
struct Entry {
    info: Arc<ConnectionInfo>,
    close: Closer,
}

/// Why spiffe-tunnel closed a connection from outside its copy loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its tunnel closed every connection it still had: the drain
    /// deadline of a shutdown, or of a tunnel a reload removed.
    Drained,
    /// A reload or a bundle change no longer allows its peer.
    Revoked,
}

/// Closes one connection and says why. The token is a child of its
/// tunnel's `close_all`, so a connection closed that way never had a
/// reason stored: it was drained. Every other closer stores its reason
/// before cancelling, so the copy that wakes on the cancellation reads
/// the right one.
#[derive(Debug, Clone)]
pub struct Closer {
    token: CancellationToken,
    reason: Arc<AtomicU8>,
    /// When the connection was accepted (its age counts from here).
    opened: tokio::time::Instant,
}

/// No reason stored: closed (if at all) by the tunnel's `close_all`.
const NO_REASON: u8 = 0;
const REVOKED: u8 = 1;

impl Closer {
    /// A closer under `parent` (a tunnel's `close_all`).
    pub fn under(parent: &CancellationToken) -> Self {
        Self {
            token: parent.child_token(),
            reason: Arc::new(AtomicU8::new(NO_REASON)),
            opened: tokio::time::Instant::now(),
        }
    }

    /// The closer of one stream of a multiplexed connection: closed with
    /// the connection, for the connection's reason (a revocation of the
    /// connection is one of each of its streams), and on its own at drain.
    pub fn child(&self) -> Self {
        Self {
            token: self.token.child_token(),
            reason: Arc::clone(&self.reason),
            opened: tokio::time::Instant::now(),
        }
    }

    /// When the connection was accepted.
    pub fn opened(&self) -> tokio::time::Instant {
        self.opened
    }

    /// Closes the connection for `reason`. The first reason stays.
    pub fn close(&self, reason: CloseReason) {
        let code = match reason {
            CloseReason::Drained => NO_REASON,
            CloseReason::Revoked => REVOKED,
        };
        let _ = self
            .reason
            .compare_exchange(NO_REASON, code, Ordering::AcqRel, Ordering::Acquire);
        self.token.cancel();
    }

    /// The token the copy loop waits on.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Why the connection was closed, once it is.
    pub fn reason(&self) -> CloseReason {
        match self.reason.load(Ordering::Acquire) {
            REVOKED => CloseReason::Revoked,
            _ => CloseReason::Drained,
        }
    }
}

/// Every live connection of the process.
#[derive(Debug, Default)]
pub struct ConnectionRegistry {
    next_id: AtomicU64,
    entries: Mutex<HashMap<u64, Entry>>,
}

impl ConnectionRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<u64, Entry>> {
        // A panic while holding this lock cannot leave the map
        // inconsistent (every update is one insert or remove).
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a just-accepted connection. `close` is what ends its copy
    /// loop.
    pub fn register(
        self: &Arc<Self>,
        tunnel: &str,
        kind: TunnelKind,
        client: SocketAddr,
        close: Closer,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = ConnectionInfo {
            id,
            tunnel: tunnel.to_string(),
            kind,
            client,
            since: SystemTime::now(),
            peer: None,
            peer_chain: None,
        };
        let info = Arc::new(info);
        self.entries().insert(id, Entry { info, close });
        Registration {
            registry: Arc::clone(self),
            id,
        }
    }

    /// A snapshot of every live connection, in the order they came. Under
    /// the lock it copies pointers only.
    pub fn snapshot(&self) -> Vec<Arc<ConnectionInfo>> {
        let mut list: Vec<_> = {
            let entries = self.entries();
            entries.values().map(|e| Arc::clone(&e.info)).collect()
        };
        list.sort_by_key(|c| c.id);
        list
    }

    /// Closes every authorized connection for which `keep` says no, and
    /// returns how many were closed.
    pub fn close_where(&self, mut keep: impl FnMut(&ConnectionInfo) -> bool) -> usize {
        self.revoke_where(|info| {
            if keep(info) {
                None
            } else {
                Some(String::new())
            }
        })
        .len()
    }

    /// Closes every authorized connection for which `reason` gives a
    /// reason, and returns the closed connections with their reasons.
    /// `reason` runs under the registry lock: keep it quick and never
    /// await in it.
    pub fn revoke_where(
        &self,
        mut reason: impl FnMut(&ConnectionInfo) -> Option<String>,
    ) -> Vec<(ConnectionInfo, String)> {
        let entries = self.entries();
        let mut closed = Vec::new();
        for entry in entries.values() {
            if entry.info.peer.is_none() || entry.close.is_closed() {
                continue;
            }
            if let Some(why) = reason(&entry.info) {
                entry.close.close(CloseReason::Revoked);
                closed.push((ConnectionInfo::clone(&entry.info), why));
            }
        }
        closed
    }
}

/// A connection's place in the registry; leaving it removes the entry.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<ConnectionRegistry>,
    id: u64,
}

impl Registration {
    /// Records the authorized peer and the chain it presented.
    pub fn set_peer(&self, peer: VerifiedPeer, chain: &[CertificateDer<'static>]) {
        // The copy of the chain is made before the lock is taken.
        let chain: Arc<[CertificateDer<'static>]> = chain.into();
        if let Some(entry) = self.registry.entries().get_mut(&self.id) {
            // In place, unless a snapshot holds the entry right now.
            let info = Arc::make_mut(&mut entry.info);
            info.peer = Some(peer);
            info.peer_chain = Some(chain);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Freed (its chain, its strings) after the lock is released.
        let entry = self.registry.entries().remove(&self.id);
        drop(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str) -> VerifiedPeer {
        VerifiedPeer {
            id: crate::spiffe_id::parse(id).unwrap(),
            serial: "01".into(),
            not_after: 0,
        }
    }

    #[test]
    fn registers_closes_and_forgets() {
        let registry = ConnectionRegistry::new();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let all = CancellationToken::new();
        let (a_token, b_token, c_token) = (
            Closer::under(&all),
            Closer::under(&all),
            Closer::under(&all),
        );
        let a = registry.register("api", TunnelKind::inbound, addr, a_token.clone());
        let b = registry.register("api", TunnelKind::inbound, addr, b_token.clone());
        let _pending = registry.register("api", TunnelKind::inbound, addr, c_token.clone());
        a.set_peer(peer("spiffe://example.org/web"), &[]);
        b.set_peer(peer("spiffe://example.org/old"), &[]);
        assert_eq!(registry.snapshot().len(), 3);

        let closed = registry.close_where(|c| c.peer.as_ref().unwrap().id.path() == "/web");
        assert_eq!(closed, 1);
        assert!(!a_token.is_closed() && b_token.is_closed());
        assert_eq!(b_token.reason(), CloseReason::Revoked);
        // Not yet authorized: left to its own authorization check.
        assert!(!c_token.is_closed());
        // Closed by the tunnel: drained; a revoked one stays revoked.
        all.cancel();
        assert!(a_token.is_closed());
        assert_eq!(a_token.reason(), CloseReason::Drained);
        assert_eq!(b_token.reason(), CloseReason::Revoked);

        drop(a);
        drop(b);
        assert_eq!(registry.snapshot().len(), 1);
    }
}
