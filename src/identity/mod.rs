//! Where our identity lives: the SVIDs we present and the trust bundles we
//! verify peers against.
//!
//! An [`Identity`] is an immutable snapshot, validated as a whole before it
//! is published. The [`IdentityStore`] holds the current one behind
//! `arc-swap`, so a TLS handshake reads it with one atomic load and no lock,
//! and it tells subscribers (status, revocation) when a new one arrives.
//! Sources ([`files`], later the Workload API) build snapshots and publish
//! them; nothing else writes to the store.

pub mod caller;
pub mod delegated;
pub mod files;
pub mod workload_api;
pub mod x509svid;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor};
use tokio::sync::watch;

use crate::spiffe_id::{SpiffeId, TrustDomain};
use x509svid::SvidRuleError;

/// Why an SVID or bundle could not be loaded. Each variant says which part
/// of the input is wrong, because an operator fixes files, not stack traces.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: no PEM certificate found")]
    NoCertificates { what: String },
    #[error("{what}: bad PEM: {reason}")]
    BadPem { what: String, reason: String },
    #[error("{what}: no PKCS#8 private key found ({reason})")]
    BadKey { what: String, reason: String },
    #[error("private key does not match the leaf certificate of {id}")]
    KeyMismatch { id: String },
    #[error("leaf certificate is not a valid X509-SVID: {0}")]
    Leaf(#[source] SvidRuleError),
    #[error("certificate {index} of the SVID chain is not a valid signing certificate: {source}")]
    Signer {
        index: usize,
        #[source]
        source: SvidRuleError,
    },
    #[error("SVID {id} expired at {not_after}")]
    Expired { id: String, not_after: String },
    #[error("SVID {id} does not chain to the bundle of its own trust domain: {reason}")]
    Untrusted { id: String, reason: String },
    #[error(
        "bundle for {trust_domain}: certificate {index} is unusable as a trust anchor: {reason}"
    )]
    BadAnchor {
        trust_domain: String,
        index: usize,
        reason: String,
    },
    #[error("the identity has no SVID")]
    NoSvid,
    /// Time cures this one: the SVID becomes usable at `not_before` (the
    /// issuer's clock runs ahead of ours).
    #[error("SVID {id} is not valid before {} (the issuer's clock is ahead of ours)", crate::timefmt::rfc3339(*.not_before))]
    NotYetValid { id: String, not_before: SystemTime },
}

impl IdentityError {
    /// When waiting would make this error go away, the moment to look
    /// again; `None` for errors only new input can cure.
    pub fn retry_at(&self) -> Option<SystemTime> {
        match self {
            IdentityError::NotYetValid { not_before, .. } => Some(*not_before),
            _ => None,
        }
    }
}

/// One of our X509-SVIDs, ready for rustls: the chain and key are parsed
/// and paired once here, never during a handshake.
#[derive(Debug)]
pub struct Svid {
    pub id: SpiffeId,
    /// The Workload API's hint (a SPIRE entry's `-hint`), if any: tells
    /// apart SVIDs a tunnel may choose between with `svid_hint`.
    pub hint: Option<String>,
    pub certified_key: Arc<CertifiedKey>,
    /// Serial number, lower-case hex.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Svid {
    /// Builds an SVID from a DER chain (leaf first) and its private key,
    /// checking that the key matches the leaf and that every certificate
    /// follows the X509-SVID rules.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: &CryptoProvider,
    ) -> Result<Self, IdentityError> {
        let leaf = chain.first().ok_or_else(|| IdentityError::NoCertificates {
            what: "SVID chain".into(),
        })?;
        let facts = x509svid::check_leaf(leaf).map_err(IdentityError::Leaf)?;
        for (index, signer) in chain.iter().enumerate().skip(1) {
            x509svid::check_signer(signer)
                .map_err(|source| IdentityError::Signer { index, source })?;
        }
        let certified_key = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => IdentityError::KeyMismatch {
                id: facts.id.to_string(),
            },
            other => IdentityError::BadKey {
                what: "SVID key".into(),
                reason: other.to_string(),
            },
        })?;
        Ok(Self {
            id: facts.id,
            hint: None,
            certified_key: Arc::new(certified_key),
            serial: facts.serial,
            not_before: unix_to_system(facts.not_before),
            not_after: unix_to_system(facts.not_after),
        })
    }

    /// Builds an SVID from PEM text: a chain (leaf first) and a PKCS#8 key.
    pub fn from_pem(
        chain_pem: &[u8],
        key_pem: &[u8],
        provider: &CryptoProvider,
    ) -> Result<Self, IdentityError> {
        let chain = certs_from_pem(chain_pem, "SVID certificate")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| IdentityError::BadKey {
            what: "SVID key".into(),
            reason: e.to_string(),
        })?;
        if !matches!(key, PrivateKeyDer::Pkcs8(_)) {
            return Err(IdentityError::BadKey {
                what: "SVID key".into(),
                reason: "the key is not PKCS#8 (convert it with `openssl pkcs8 -topk8 -nocrypt`)"
                    .into(),
            });
        }
        Self::from_der(chain, key, provider)
    }

    /// The chain as sent to peers, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified_key.cert
    }

    /// Sets the Workload API's hint; an empty one means none.
    pub fn with_hint(mut self, hint: String) -> Self {
        self.hint = Some(hint).filter(|h| !h.is_empty());
        self
    }

    /// True when `other` would show a peer exactly what this one shows:
    /// the same ID, the same chain bytes and the same key.
    pub fn presents_the_same_as(&self, other: &Svid) -> bool {
        let (mine, theirs) = (&self.certified_key, &other.certified_key);
        self.id == other.id
            && mine.cert == theirs.cert
            && mine.key.algorithm() == theirs.key.algorithm()
            && match (mine.key.public_key(), theirs.key.public_key()) {
                (Some(a), Some(b)) => a == b,
                // A key that cannot show its public half is compared by
                // identity only: assume it changed unless it is the same key.
                _ => Arc::ptr_eq(&mine.key, &theirs.key),
            }
    }

    /// True while `now` is inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// Which of our SVIDs a tunnel presents: the one with this SPIFFE ID
/// (`svid`), the one with this Workload API hint (`svid_hint`), the one
/// with both, or, with neither, the default (the first in the response).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SvidSelector {
    pub id: Option<SpiffeId>,
    pub hint: Option<String>,
}

impl SvidSelector {
    pub fn by_id(id: SpiffeId) -> Self {
        Self {
            id: Some(id),
            hint: None,
        }
    }

    /// True when nothing is asked for: the default SVID is taken.
    pub fn is_default(&self) -> bool {
        self.id.is_none() && self.hint.is_none()
    }

    pub fn matches(&self, svid: &Svid) -> bool {
        self.id.as_ref().is_none_or(|id| *id == svid.id)
            && self
                .hint
                .as_ref()
                .is_none_or(|hint| svid.hint.as_ref() == Some(hint))
    }
}

impl std::fmt::Display for SvidSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.id, &self.hint) {
            (None, None) => f.write_str("the default SVID (the first the source sends)"),
            (Some(id), None) => write!(f, "{id}"),
            (None, Some(hint)) => write!(f, "the SVID with hint {hint:?}"),
            (Some(id), Some(hint)) => write!(f, "{id} with hint {hint:?}"),
        }
    }
}

/// The CA certificates of one trust domain, with the trust anchors rustls
/// needs built once when the bundle arrives.
#[derive(Debug)]
pub struct TrustBundle {
    pub trust_domain: TrustDomain,
    pub certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// A trust domain we know but whose bundle holds no X.509 authority:
    /// SPIRE federates such a domain (only JWT keys) as an empty bundle.
    /// No peer of it can be verified, and the refusal says why.
    pub fn without_x509_authorities(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            certs: Vec::new(),
            anchors: Vec::new(),
        }
    }

    pub fn new(
        trust_domain: TrustDomain,
        certs: Vec<CertificateDer<'static>>,
    ) -> Result<Self, IdentityError> {
        if certs.is_empty() {
            return Err(IdentityError::NoCertificates {
                what: format!("bundle for {trust_domain}"),
            });
        }
        let anchors = certs
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| IdentityError::BadAnchor {
                        trust_domain: trust_domain.to_string(),
                        index,
                        reason: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            trust_domain,
            certs,
            anchors,
        })
    }

    pub fn from_pem(trust_domain: TrustDomain, pem: &[u8]) -> Result<Self, IdentityError> {
        let certs = certs_from_pem(pem, &format!("bundle for {trust_domain}"))?;
        Self::new(trust_domain, certs)
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

/// Trust bundles by trust domain: ours and the federated ones.
#[derive(Debug, Clone, Default)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, Arc<TrustBundle>>,
}

impl BundleSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// True when both sets trust exactly the same CAs for the same trust
    /// domains (so nothing verified under one can fail under the other).
    pub fn same_trust(&self, other: &BundleSet) -> bool {
        self.bundles.len() == other.bundles.len()
            && self
                .bundles
                .iter()
                .zip(other.bundles.iter())
                .all(|((a_td, a), (b_td, b))| a_td == b_td && a.certs == b.certs)
    }

    /// What live connections are re-judged against after the bundles
    /// changed from `previous` to these: these, plus every CA that left a
    /// trust domain we still hold only because it had expired by `now`.
    ///
    /// A CA's natural expiry is not distrust: SPIRE drops a CA from the
    /// bundle once it expired, and a connection authenticated through it
    /// was valid when it began (the same reason a peer certificate that
    /// expires during a connection does not end it). Distrust is a CA
    /// removed while still valid, or a whole trust domain removed: those
    /// stay out, so their connections no longer verify.
    pub fn with_expired_from(&self, previous: &BundleSet, now: SystemTime) -> BundleSet {
        let now = i64::try_from(now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
            .unwrap_or(i64::MAX);
        let expired = |der: &CertificateDer<'_>| {
            // A CA we cannot read is not known to have expired: distrust.
            x509svid::check_signer(der).is_ok_and(|v| v.not_after <= now)
        };
        let mut judged = self.clone();
        for (td, now_held) in &self.bundles {
            let Some(before) = previous.bundles.get(td) else {
                continue;
            };
            let departed: Vec<_> = before
                .certs
                .iter()
                .filter(|c| !now_held.certs.contains(c) && expired(c))
                .cloned()
                .collect();
            if departed.is_empty() {
                continue;
            }
            let mut certs = now_held.certs.clone();
            certs.extend(departed);
            // Every certificate already made a usable anchor once.
            if let Ok(bundle) = TrustBundle::new(td.clone(), certs) {
                judged.insert(bundle);
            }
        }
        judged
    }

    /// Adds a bundle, replacing any earlier one for the same trust domain.
    pub fn insert(&mut self, bundle: TrustBundle) {
        self.bundles
            .insert(bundle.trust_domain.clone(), Arc::new(bundle));
    }

    pub fn get(&self, trust_domain: &TrustDomain) -> Option<&TrustBundle> {
        self.bundles.get(trust_domain).map(Arc::as_ref)
    }

    pub fn iter(&self) -> impl Iterator<Item = &TrustBundle> {
        self.bundles.values().map(Arc::as_ref)
    }

    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

/// One complete, validated view of who we are and whom we trust.
#[derive(Debug)]
pub struct Identity {
    /// Our SVIDs; the first is the default one.
    pub svids: Vec<Arc<Svid>>,
    pub bundles: BundleSet,
}

impl Identity {
    /// Validates a candidate snapshot: at least one SVID, nothing expired
    /// or not yet valid, and each SVID chains to its own trust domain's
    /// bundle when we hold one (a certificate from the wrong CA is a broken
    /// deployment, and peers would refuse it anyway). Several SVIDs may
    /// carry the same SPIFFE ID: SPIRE issues one per matching entry, and
    /// two entries (say one by uid, one by user name) may name one ID.
    pub fn new(
        svids: Vec<Svid>,
        bundles: BundleSet,
        now: SystemTime,
    ) -> Result<Self, IdentityError> {
        if svids.is_empty() {
            return Err(IdentityError::NoSvid);
        }
        for svid in &svids {
            if now < svid.not_before {
                return Err(IdentityError::NotYetValid {
                    id: svid.id.to_string(),
                    not_before: svid.not_before,
                });
            }
            if now >= svid.not_after {
                return Err(IdentityError::Expired {
                    id: svid.id.to_string(),
                    not_after: crate::timefmt::rfc3339(svid.not_after),
                });
            }
            if bundles.get(svid.id.trust_domain()).is_some() {
                crate::tls::verify::verify_svid_chain(
                    svid.chain(),
                    &bundles,
                    crate::tls::verify::to_unix_time(now),
                    crate::tls::verify::PeerRole::Any,
                )
                .map_err(|e| IdentityError::Untrusted {
                    id: svid.id.to_string(),
                    reason: e.to_string(),
                })?;
            }
        }
        Ok(Self {
            svids: svids.into_iter().map(Arc::new).collect(),
            bundles,
        })
    }

    pub fn default_svid(&self) -> Option<&Arc<Svid>> {
        self.svids.first()
    }

    /// The SVID to present: the first that `selector` matches (the
    /// default one when it asks for nothing).
    pub fn svid(&self, selector: &SvidSelector) -> Option<&Arc<Svid>> {
        self.svids.iter().find(|s| selector.matches(s))
    }

    /// True when both present the same SVIDs (the same chains, byte for
    /// byte, with the same keys) and trust the same CAs: publishing `other`
    /// would change nothing. The serial alone is not enough: an issuer may
    /// re-send a certificate with a missing intermediate added, or a
    /// rotator may pair the same certificate with another key.
    pub fn same_as(&self, other: &Identity) -> bool {
        self.svids.len() == other.svids.len()
            && self
                .svids
                .iter()
                .zip(&other.svids)
                .all(|(a, b)| a.presents_the_same_as(b) && a.hint == b.hint)
            && self.bundles.same_trust(&other.bundles)
    }

    /// The earliest expiry among our SVIDs.
    pub fn earliest_expiry(&self) -> Option<SystemTime> {
        self.svids.iter().map(|s| s.not_after).min()
    }
}

/// The current identity, swapped atomically, with change notification.
#[derive(Debug)]
pub struct IdentityStore {
    current: ArcSwapOption<Identity>,
    generation: watch::Sender<u64>,
}

impl Default for IdentityStore {
    fn default() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            generation: watch::Sender::new(0),
        }
    }
}

impl IdentityStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Makes `identity` the current one for every new handshake.
    pub fn publish(&self, identity: Identity) {
        self.current.store(Some(Arc::new(identity)));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Drops the identity: no SVID is presented and no peer verifies until
    /// a new one is published.
    pub fn withdraw(&self) {
        self.current.store(None);
        self.generation.send_modify(|g| *g += 1);
    }

    /// The current snapshot, if any. One atomic load; no lock.
    pub fn load(&self) -> Option<Arc<Identity>> {
        self.current.load_full()
    }

    /// A receiver that sees a new value on every publish or withdraw.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// How many times the identity changed: compare two readings to know
    /// whether anything was published in between.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }
}

/// Parses every CERTIFICATE block of a PEM text; other blocks are ignored.
pub fn certs_from_pem(
    pem: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::BadPem {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::NoCertificates {
            what: what.to_string(),
        });
    }
    Ok(certs)
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Splits concatenated DER certificates (the Workload API's encoding of
/// chains and bundles) into one `CertificateDer` each. Only the outer
/// SEQUENCE framing is read here, by asn1-rs (x509-parser's DER layer,
/// which returns the rest of the input after each element); each
/// certificate is parsed properly by whoever uses it, so it is not parsed
/// twice.
pub fn split_der_certificates(mut der: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use x509_parser::asn1_rs::{Any, FromDer, Tag};
    let mut certs = Vec::new();
    while !der.is_empty() {
        let rest = match Any::from_der(der) {
            Ok((rest, element)) if element.tag() == Tag::Sequence => rest,
            Err(x509_parser::nom::Err::Incomplete(_)) => {
                return Err(format!("certificate {} is truncated", certs.len()))
            }
            Ok(_) | Err(_) => {
                return Err(format!("certificate {} is not a DER SEQUENCE", certs.len()))
            }
        };
        let (cert, after) = der.split_at(der.len() - rest.len());
        certs.push(CertificateDer::from(cert.to_vec()));
        der = after;
    }
    if certs.is_empty() {
        return Err("no certificates".into());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_concatenated_der() {
        let short = [0x30, 0x03, 1, 2, 3];
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend(std::iter::repeat_n(7u8, 0x80));
        let joined: Vec<u8> = short.iter().chain(long.iter()).copied().collect();
        let certs = split_der_certificates(&joined).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0].as_ref(), &short);
        assert_eq!(certs[1].as_ref(), long.as_slice());
    }

    /// SVIDs for `ids` issued at `issued` by one CA, and its bundle.
    fn issued(ids: &[&str], issued: SystemTime) -> (Vec<Svid>, BundleSet) {
        let td = crate::spiffe_id::parse_trust_domain("example.org").unwrap();
        let ca = crate::agent::ca::Ca::generate(&td, SystemTime::now(), Duration::from_secs(86400))
            .unwrap();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let svids = ids
            .iter()
            .map(|id| {
                let id = crate::spiffe_id::parse_workload_id(id).unwrap();
                let issued = ca.issue(&id, issued, Duration::from_secs(3600)).unwrap();
                let key = rustls_pki_types::PrivatePkcs8KeyDer::from(issued.key_pkcs8.clone());
                Svid::from_der(vec![issued.cert.clone()], key.into(), &provider).unwrap()
            })
            .collect();
        let mut bundles = BundleSet::new();
        bundles.insert(TrustBundle::new(td, vec![ca.der.clone()]).unwrap());
        (svids, bundles)
    }

    #[test]
    fn several_svids_with_one_id_are_one_identity_and_hints_choose() {
        const API: &str = "spiffe://example.org/api";
        let (svids, bundles) = issued(&[API, API], SystemTime::now());
        let mut svids = svids.into_iter();
        let first = svids.next().unwrap().with_hint("internal".into());
        let second = svids.next().unwrap().with_hint("external".into());
        let (first_serial, second_serial) = (first.serial.clone(), second.serial.clone());
        let identity = Identity::new(vec![first, second], bundles, SystemTime::now()).unwrap();
        let id = crate::spiffe_id::parse_workload_id(API).unwrap();
        let pick = |selector: SvidSelector| identity.svid(&selector).map(|s| s.serial.clone());
        assert_eq!(pick(SvidSelector::default()), Some(first_serial.clone()));
        assert_eq!(pick(SvidSelector::by_id(id.clone())), Some(first_serial));
        let by_hint = |hint: &str| SvidSelector {
            id: Some(id.clone()),
            hint: Some(hint.into()),
        };
        assert_eq!(pick(by_hint("external")), Some(second_serial));
        assert_eq!(pick(by_hint("nope")), None);
        let (mut plain, _) = issued(&[API], SystemTime::now());
        assert_eq!(
            plain.remove(0).with_hint(String::new()).hint,
            None,
            "an empty hint is none"
        );
    }

    #[test]
    fn an_svid_not_valid_yet_is_refused_until_its_not_before() {
        let ahead = SystemTime::now() + Duration::from_secs(60);
        let (svids, bundles) = issued(&["spiffe://example.org/web"], ahead);
        let not_before = svids[0].not_before;
        let err = Identity::new(svids, bundles, SystemTime::now()).unwrap_err();
        assert!(matches!(err, IdentityError::NotYetValid { .. }), "{err}");
        assert_eq!(err.retry_at(), Some(not_before));
        assert!(err.to_string().contains("clock is ahead"), "{err}");
        assert_eq!(IdentityError::NoSvid.retry_at(), None);
    }

    /// An identity holding one SVID with `chain` (leaf first) and `key`,
    /// and `ca` as the bundle, built without [`Identity::new`]'s checks so
    /// a chain with an extra certificate can be compared.
    fn identity_with(
        chain: Vec<CertificateDer<'static>>,
        key: &[u8],
        ca: &crate::agent::ca::Ca,
    ) -> Identity {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let key = PrivateKeyDer::Pkcs8(key.to_vec().into());
        let svid = Svid::from_der(chain, key, &provider).unwrap();
        let mut bundles = BundleSet::new();
        bundles.insert(
            TrustBundle::new(svid.id.trust_domain().clone(), vec![ca.der.clone()]).unwrap(),
        );
        Identity {
            svids: vec![Arc::new(svid)],
            bundles,
        }
    }

    #[test]
    fn an_identity_is_the_same_only_with_the_same_chain_and_key() {
        use crate::agent::ca::Ca;
        let now = SystemTime::now();
        let td = crate::spiffe_id::parse_trust_domain("example.org").unwrap();
        let ca = Ca::generate(&td, now, Duration::from_secs(3600)).unwrap();
        let id = crate::spiffe_id::parse_workload_id("spiffe://example.org/web").unwrap();
        let issued = ca.issue(&id, now, Duration::from_secs(600)).unwrap();
        let leaf_only = identity_with(vec![issued.cert.clone()], &issued.key_pkcs8, &ca);
        let again = identity_with(vec![issued.cert.clone()], &issued.key_pkcs8, &ca);
        assert!(leaf_only.same_as(&again), "the same files read twice");

        // The same leaf (so the same serial) with a certificate added to
        // the chain, as when a missing intermediate is supplied.
        let longer = identity_with(
            vec![issued.cert.clone(), ca.der.clone()],
            &issued.key_pkcs8,
            &ca,
        );
        assert_eq!(longer.svids[0].serial, leaf_only.svids[0].serial);
        assert!(!leaf_only.same_as(&longer));
        assert!(!longer.same_as(&leaf_only));

        // Another key: a new leaf. (A leaf and a key that do not match are
        // refused by `Svid::from_der`, so a key change is a leaf change.)
        let rekeyed = ca.issue(&id, now, Duration::from_secs(600)).unwrap();
        let other = identity_with(vec![rekeyed.cert.clone()], &rekeyed.key_pkcs8, &ca);
        assert!(!leaf_only.same_as(&other));
    }

    #[test]
    fn refuses_garbage_and_truncation() {
        assert!(split_der_certificates(&[]).is_err());
        assert!(split_der_certificates(&[0x31, 0x00]).is_err());
        assert!(split_der_certificates(&[0x30, 0x05, 1]).is_err());
        assert!(split_der_certificates(&[0x30, 0x85, 1, 1, 1, 1, 1]).is_err());
        assert!(split_der_certificates(&[0x30]).is_err());
        // Which certificate is wrong, and how, is in the reason.
        let good = [0x30, 0x00];
        let reason = |der: &[u8]| split_der_certificates(der).unwrap_err();
        assert_eq!(
            reason(&[&good[..], &[0x30, 0x05, 1]].concat()),
            "certificate 1 is truncated"
        );
        assert_eq!(reason(&[0x31, 0x00]), "certificate 0 is not a DER SEQUENCE");
        // Indefinite lengths are BER, not DER.
        assert_eq!(
            reason(&[0x30, 0x80, 0x00, 0x00]),
            "certificate 0 is not a DER SEQUENCE"
        );
    }
}
