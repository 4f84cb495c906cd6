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
//!
//! What an attacker can make it hold: nothing. The verifier callback runs
//! before the peer has proved it holds the key (CertificateVerify) and
//! before the policy, so it only looks chains up; a chain is remembered by
//! [`super::verify::Admission::remember`] once the handshake completed and
//! the tunnel admitted the peer. An entry keeps the leaf (the key) and a
//! SHA-256 of the intermediates as presented, never their bytes, so extra
//! certificates a peer pads its chain with cost nothing here; and the cache
//! is bounded by bytes as well as entries. The price: a full handshake
//! whose chain is not remembered yet is verified twice, in the handshake
//! and again at admission (against the identity of then, whose result is
//! what gets remembered), once per peer leaf and identity snapshot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use aws_lc_rs::digest;
use rustls_pki_types::{CertificateDer, UnixTime};

use super::verify::{PeerRole, VerifiedPeer};
use crate::identity::Identity;

/// Chains kept at most; past this the cache starts over. Each entry is a
/// peer certificate (a workload), so this covers large fleets.
const MAX_ENTRIES: usize = 4096;

/// Bytes kept at most (leaves plus what each entry costs besides), past
/// which the cache starts over: 4 MiB, room for [`MAX_ENTRIES`] SVIDs of
/// about 1 KiB (SPIRE's P-256 leaves are 600 to 900 bytes).
const MAX_BYTES: usize = 4 << 20;

/// A leaf larger than this is never remembered (it is verified each time):
/// no SVID comes near it, and one peer must not take a large share of
/// [`MAX_BYTES`] and so empty the cache for everybody else.
const MAX_LEAF_BYTES: usize = 16 << 10;

/// What an entry costs besides its leaf: the map slot, the digest, the
/// peer (its SPIFFE ID and serial are counted apart).
const ENTRY_OVERHEAD: usize = 128;

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
    /// What the entries cost, as [`entry_bytes`] counts it.
    bytes: usize,
}

#[derive(Debug)]
struct Entry {
    /// SHA-256 over the intermediates as the peer presented them (each
    /// one's length, then its bytes): the same chain, without keeping it.
    intermediates: [u8; 32],
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

/// The digest an entry keeps of a chain's intermediates. Each length goes
/// first, so no two different lists of certificates hash the same bytes.
fn intermediates_digest(intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut context = digest::Context::new(&digest::SHA256);
    for cert in intermediates {
        context.update(&(cert.len() as u64).to_be_bytes());
        context.update(cert.as_ref());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// What one entry costs against [`MAX_BYTES`].
fn entry_bytes(leaf: &[u8], peer: &VerifiedPeer) -> usize {
    let id = peer.id.trust_domain().as_str().len() + peer.id.path().len();
    leaf.len() + id + peer.serial.len() + ENTRY_OVERHEAD
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
            && entry.valid_from <= now
            && now <= entry.valid_until
            && entry.intermediates == intermediates_digest(intermediates);
        hit.then(|| entry.peer.clone())
    }

    /// Remembers a chain that verified under `identity` and whose peer was
    /// then admitted; `valid_from` and `valid_until` bound every
    /// certificate in it.
    pub fn insert(
        &self,
        identity: &Arc<Identity>,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        role: PeerRole,
        peer: &VerifiedPeer,
        (valid_from, valid_until): (i64, i64),
    ) {
        if leaf.len() > MAX_LEAF_BYTES {
            return;
        }
        let cost = entry_bytes(leaf, peer);
        let entry = Entry {
            intermediates: intermediates_digest(intermediates),
            role,
            peer: peer.clone(),
            valid_from,
            valid_until,
        };
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let same = state
            .identity
            .as_ref()
            .is_some_and(|kept| Arc::ptr_eq(kept, identity));
        if !same {
            state.entries.clear();
            state.bytes = 0;
            state.identity = Some(Arc::clone(identity));
        }
        if let Some(old) = state.entries.remove(leaf.as_ref()) {
            state.bytes -= entry_bytes(leaf, &old.peer);
        }
        if state.entries.len() >= MAX_ENTRIES || state.bytes + cost > MAX_BYTES {
            state.entries.clear();
            state.bytes = 0;
        }
        state.bytes += cost;
        state.entries.insert(leaf.as_ref().into(), entry);
    }

    /// How many chains are remembered and what they cost in bytes.
    pub fn usage(&self) -> (usize, usize) {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (state.entries.len(), state.bytes)
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

    /// A leaf padded with certificates that are not on its path: every
    /// padding certificate is a valid CA (so verification passes and the
    /// old code remembered all of it), none is needed.
    fn padded_chain(ca: &Ca, id: &str, junk: usize) -> Vec<CertificateDer<'static>> {
        let leaf = ca
            .issue(
                &parse_workload_id(id).unwrap(),
                SystemTime::now(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let mut chain = vec![leaf.cert];
        for i in 0..junk {
            let td = parse_trust_domain(&format!("junk{i}.example")).unwrap();
            let other = Ca::generate(&td, SystemTime::now(), Duration::from_secs(86400)).unwrap();
            chain.push(other.der.clone());
        }
        chain
    }

    fn remembered(
        identity: &Arc<Identity>,
        chain: &[CertificateDer<'static>],
        role: PeerRole,
    ) -> bool {
        let (leaf, intermediates) = chain.split_first().unwrap();
        super::super::verify::cached(identity, leaf, intermediates, role)
    }

    #[test]
    fn padding_costs_nothing_and_the_same_padding_still_hits() {
        let leaf = CertificateDer::from(vec![7u8; 900]);
        let junk: Vec<CertificateDer<'static>> = (0..30u8)
            .map(|i| CertificateDer::from(vec![i; 2000]))
            .collect();
        let td = parse_trust_domain("example.org").unwrap();
        let ca = Ca::generate(&td, SystemTime::now(), Duration::from_secs(86400)).unwrap();
        let snapshot = Arc::new(identity(&ca));
        let cache = ChainCache::default();
        cache.insert(&snapshot, &leaf, &junk, PeerRole::Client, &peer(), (0, 9));
        let (entries, bytes) = cache.usage();
        assert_eq!(entries, 1);
        assert_eq!(bytes, entry_bytes(&leaf, &peer()), "60 KB of padding kept");
        assert!(bytes < 1200, "{bytes}");
        let get = |inter: &[CertificateDer<'_>]| {
            cache.get(&snapshot, &leaf, inter, PeerRole::Client, at(5))
        };
        assert_eq!(get(&junk), Some(peer()));
        assert_eq!(get(&junk[1..]), None);
        assert_eq!(get(&[]), None);
        // The same leaf again (any padding) replaces its entry.
        cache.insert(&snapshot, &leaf, &[], PeerRole::Client, &peer(), (0, 9));
        assert_eq!(cache.usage(), (1, entry_bytes(&leaf, &peer())));
    }

    #[test]
    fn the_cache_is_bounded_by_bytes_as_well_as_entries() {
        let td = parse_trust_domain("example.org").unwrap();
        let ca = Ca::generate(&td, SystemTime::now(), Duration::from_secs(86400)).unwrap();
        let snapshot = Arc::new(identity(&ca));
        let cache = ChainCache::default();
        // 10 KiB leaves: 4096 of them would be 40 MiB.
        for i in 0..1200u32 {
            let mut der = vec![0u8; 10 << 10];
            der[..4].copy_from_slice(&i.to_be_bytes());
            let leaf = CertificateDer::from(der);
            cache.insert(&snapshot, &leaf, &[], PeerRole::Client, &peer(), (0, 9));
            let (entries, bytes) = cache.usage();
            assert!(bytes <= MAX_BYTES, "{bytes} bytes after {i}");
            assert!(entries <= MAX_ENTRIES);
            assert!(
                cache
                    .get(&snapshot, &leaf, &[], PeerRole::Client, at(5))
                    .is_some(),
                "the newest entry is kept"
            );
        }
        // Small leaves: bounded by entries.
        for i in 0..(MAX_ENTRIES as u32 + 10) {
            let leaf = CertificateDer::from(i.to_be_bytes().to_vec());
            cache.insert(&snapshot, &leaf, &[], PeerRole::Client, &peer(), (0, 9));
            assert!(cache.usage().0 <= MAX_ENTRIES);
        }
        // A leaf no SVID comes near is not kept at all.
        let huge = CertificateDer::from(vec![1u8; MAX_LEAF_BYTES + 1]);
        let before = cache.usage();
        cache.insert(&snapshot, &huge, &[], PeerRole::Client, &peer(), (0, 9));
        assert_eq!(cache.usage(), before);
        assert_eq!(
            cache.get(&snapshot, &huge, &[], PeerRole::Client, at(5)),
            None
        );
    }

    /// The verifier callback runs before the peer proved it holds the key
    /// and before the policy: a replayed leaf (anyone's, padded with junk
    /// CAs) that passes it must leave nothing behind.
    #[test]
    fn the_verifier_callback_remembers_nothing() {
        use crate::identity::IdentityStore;
        use crate::policy::{parse_rule, Policy};
        use crate::tls::verify::SpiffeVerifier;
        use rustls::server::danger::ClientCertVerifier;

        let td = parse_trust_domain("example.org").unwrap();
        let ca = Ca::generate(&td, SystemTime::now(), Duration::from_secs(86400)).unwrap();
        let store = Arc::new(IdentityStore::new());
        store.publish(identity(&ca));
        let snapshot = store.load().unwrap();
        let policy = Arc::new(arc_swap::ArcSwap::from_pointee(Policy::compile([
            parse_rule("spiffe://example.org/web").unwrap().unwrap(),
        ])));
        let verifier = SpiffeVerifier::new(Arc::clone(&store), policy, PeerRole::Client);
        let now = crate::tls::verify::to_unix_time(SystemTime::now());

        let replayed = padded_chain(&ca, "spiffe://example.org/web", 8);
        let (leaf, intermediates) = replayed.split_first().unwrap();
        verifier
            .verify_client_cert(leaf, intermediates, now)
            .expect("the chain itself verifies");
        assert!(!remembered(&snapshot, &replayed, PeerRole::Client));

        // Refused by the policy: not remembered either.
        let other = padded_chain(&ca, "spiffe://example.org/other", 2);
        let (leaf, intermediates) = other.split_first().unwrap();
        let refused = verifier
            .verify_client_cert(leaf, intermediates, now)
            .unwrap_err();
        assert!(
            crate::tls::verify::VerifyError::from_rustls(&refused).is_some_and(|e| e.is_denial()),
            "{refused}"
        );
        assert!(!remembered(&snapshot, &other, PeerRole::Client));
    }

    #[test]
    fn only_an_admitted_peer_is_remembered() {
        use crate::identity::IdentityStore;
        use crate::policy::{parse_rule, Policy};
        use crate::tls::verify::authorize_session;

        let td = parse_trust_domain("example.org").unwrap();
        let ca = Ca::generate(&td, SystemTime::now(), Duration::from_secs(86400)).unwrap();
        let store = IdentityStore::new();
        store.publish(identity(&ca));
        let snapshot = store.load().unwrap();
        let policy = Policy::compile([parse_rule("spiffe://example.org/web").unwrap().unwrap()]);

        let denied = padded_chain(&ca, "spiffe://example.org/other", 1);
        let refused =
            authorize_session(Some(&denied), &store, &policy, PeerRole::Client).unwrap_err();
        assert!(refused.is_denial(), "{refused}");
        assert!(!remembered(&snapshot, &denied, PeerRole::Client));

        let allowed = padded_chain(&ca, "spiffe://example.org/web", 1);
        let admission =
            authorize_session(Some(&allowed), &store, &policy, PeerRole::Client).unwrap();
        assert!(
            !remembered(&snapshot, &allowed, PeerRole::Client),
            "remembered before the tunnel admitted it"
        );
        // Another snapshot meanwhile: nothing is remembered for the old one.
        store.publish(identity(&ca));
        admission.remember(&allowed, &store);
        assert!(!remembered(&snapshot, &allowed, PeerRole::Client));
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
            authorize_session(Some(chain), &store, &policy, PeerRole::Client).map(|admission| {
                admission.remember(chain, &store);
                admission.peer
            })
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
