//! Remembers peer chains that passed verification, so a peer that connects
//! again (resumed or full handshake) is not verified from scratch.
//!
//! Verifying a chain is one signature check per link (about 50 µs for a
//! P-256 SVID), the largest CPU cost of a resumed connection after the key
//! exchange. Its result depends only on the exact chain bytes, the role
//! (client or server key usage), our bundles, and the time; so a success is
//! kept with the time window in which it holds (the intersection of the
//! validity periods of every certificate in the chain) and reused for the
//! same bytes and role while our identity snapshot is the same one. Any
//! identity change (a new SVID of ours or any bundle change) empties the
//! cache, failures are never kept, and authorization against the policy is
//! not part of it: it runs on every connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use rustls_pki_types::{CertificateDer, UnixTime};

use super::verify::{PeerRole, VerifiedPeer};
use crate::identity::Identity;

/// Chains kept at most; past this the cache starts over. Each entry is a
/// peer certificate (a workload), so this covers large fleets.
const MAX_ENTRIES: usize = 4096;

/// Verified chains for one identity snapshot.
#[derive(Debug, Default)]
pub struct ChainCache {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The snapshot whose bundles verified the entries. Holding it (not a
    /// pointer or a number) makes "same snapshot" exact.
    identity: Option<Arc<Identity>>,
    /// By leaf certificate bytes.
    entries: HashMap<Box<[u8]>, Entry>,
}

#[derive(Debug)]
struct Entry {
    intermediates: Vec<CertificateDer<'static>>,
    role: PeerRole,
    peer: VerifiedPeer,
    /// Seconds since the Unix epoch within which the result holds.
    valid_from: i64,
    valid_until: i64,
}

/// Seconds since the epoch as webpki compares them.
fn secs(now: UnixTime) -> i64 {
    i64::try_from(now.as_secs()).unwrap_or(i64::MAX)
}

impl ChainCache {
    /// The remembered result for this chain, if it was verified under
    /// `identity` for `role` and `now` is inside its window.
    pub fn get(
        &self,
        identity: &Arc<Identity>,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        role: PeerRole,
        now: UnixTime,
    ) -> Option<VerifiedPeer> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state
            .identity
            .as_ref()
            .is_some_and(|kept| Arc::ptr_eq(kept, identity))
        {
            return None;
        }
        let entry = state.entries.get(leaf.as_ref())?;
        let now = secs(now);
        let hit = entry.role == role
            && entry.intermediates.as_slice() == intermediates
            && entry.valid_from <= now
            && now <= entry.valid_until;
        hit.then(|| entry.peer.clone())
    }

    /// Remembers a chain that just verified under `identity`; `valid_from`
    /// and `valid_until` bound every certificate in it.
    pub fn insert(
        &self,
        identity: &Arc<Identity>,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        role: PeerRole,
        peer: &VerifiedPeer,
        (valid_from, valid_until): (i64, i64),
    ) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let same = state
            .identity
            .as_ref()
            .is_some_and(|kept| Arc::ptr_eq(kept, identity));
        if !same || state.entries.len() >= MAX_ENTRIES {
            state.entries.clear();
            state.identity = Some(Arc::clone(identity));
        }
        state.entries.insert(
            leaf.as_ref().into(),
            Entry {
                intermediates: intermediates
                    .iter()
                    .map(|c| c.clone().into_owned())
                    .collect(),
                role,
                peer: peer.clone(),
                valid_from,
                valid_until,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entries
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::ca::Ca;
    use crate::spiffe_id::{parse_trust_domain, parse_workload_id};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    fn identity(ca: &Ca) -> Identity {
        ca.identity_for("spiffe://example.org/api", Duration::from_secs(3600))
    }

    fn at(secs: i64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs.try_into().unwrap()))
    }

    fn peer() -> VerifiedPeer {
        VerifiedPeer {
            id: parse_workload_id("spiffe://example.org/web").unwrap(),
            serial: "01".into(),
            not_after: 2000,
        }
    }

    #[test]
    fn a_hit_needs_the_same_bytes_role_snapshot_and_time_window() {
        let td = parse_trust_domain("example.org").unwrap();
        let ca = Ca::generate(&td, SystemTime::now(), Duration::from_secs(86400)).unwrap();
        let (snapshot, other_snapshot) = (Arc::new(identity(&ca)), Arc::new(identity(&ca)));
        let leaf = CertificateDer::from(vec![1u8, 2, 3]);
        let inter = [CertificateDer::from(vec![9u8, 9])];
        let cache = ChainCache::default();
        cache.insert(
            &snapshot,
            &leaf,
            &inter,
            PeerRole::Client,
            &peer(),
            (1000, 2000),
        );

        let get = |id: &Arc<Identity>, leaf: &[u8], inter: &[CertificateDer<'_>], role, t| {
            cache.get(id, &CertificateDer::from(leaf), inter, role, at(t))
        };
        assert_eq!(
            get(&snapshot, &[1, 2, 3], &inter, PeerRole::Client, 1500),
            Some(peer())
        );
        assert_eq!(
            get(&snapshot, &[1, 2, 3], &inter, PeerRole::Client, 1000),
            Some(peer())
        );
        assert_eq!(
            get(&snapshot, &[1, 2, 3], &inter, PeerRole::Client, 2000),
            Some(peer())
        );
        // Outside the window: expired or not yet valid.
        assert_eq!(
            get(&snapshot, &[1, 2, 3], &inter, PeerRole::Client, 2001),
            None
        );
        assert_eq!(
            get(&snapshot, &[1, 2, 3], &inter, PeerRole::Client, 999),
            None
        );
        // Another role, other bytes, other intermediates, another snapshot.
        assert_eq!(
            get(&snapshot, &[1, 2, 3], &inter, PeerRole::Server, 1500),
            None
        );
        assert_eq!(
            get(&snapshot, &[1, 2, 4], &inter, PeerRole::Client, 1500),
            None
        );
        assert_eq!(
            get(&snapshot, &[1, 2, 3], &[], PeerRole::Client, 1500),
            None
        );
        assert_eq!(
            get(&other_snapshot, &[1, 2, 3], &inter, PeerRole::Client, 1500),
            None
        );

        // A new snapshot starts the cache over.
        cache.insert(
            &other_snapshot,
            &[5u8].to_vec().into(),
            &[],
            PeerRole::Client,
            &peer(),
            (0, 9),
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(
            get(&snapshot, &[1, 2, 3], &inter, PeerRole::Client, 1500),
            None
        );
    }

    #[test]
    fn an_expired_chain_is_refused_although_it_was_remembered() {
        use crate::identity::IdentityStore;
        use crate::policy::{parse_rule, Policy};
        use crate::tls::verify::{authorize_session, PeerRole};

        let td = parse_trust_domain("example.org").unwrap();
        let ca = Ca::generate(&td, SystemTime::now(), Duration::from_secs(86400)).unwrap();
        let store = IdentityStore::new();
        store.publish(identity(&ca));
        let policy = Policy::compile([parse_rule("spiffe://example.org/web").unwrap().unwrap()]);
        // A web certificate that is valid for two more seconds.
        let web = ca
            .issue(
                &parse_workload_id("spiffe://example.org/web").unwrap(),
                SystemTime::now(),
                Duration::from_secs(2),
            )
            .unwrap();
        let chain = [web.cert.clone()];
        let resumed = |chain: &[CertificateDer<'static>]| {
            authorize_session(Some(chain), true, &store, &policy, PeerRole::Client)
        };
        let first = resumed(&chain).unwrap();
        assert_eq!(first.id.to_string(), "spiffe://example.org/web");
        assert_eq!(resumed(&chain).unwrap(), first, "remembered");
        let expired_at = UNIX_EPOCH + Duration::from_secs(u64::try_from(first.not_after).unwrap());
        while SystemTime::now() <= expired_at + Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let refused = resumed(&chain).unwrap_err();
        assert!(refused.to_string().contains("expired"), "{refused}");
    }
}
