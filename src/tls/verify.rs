//! SPIFFE peer verification: the X509-SVID chain check rustls runs in every
//! full handshake, in both directions, and the same check offline for the
//! `verify` command.
//!
//! A chain is trusted only through the bundle of the trust domain named in
//! the peer's own SPIFFE ID; a CA of one trust domain can never vouch for
//! another, and no bundle means no trust. Path building and signature checks
//! are rustls-webpki's (well reviewed, constant budget, no panics on hostile
//! input); the SPIFFE-specific rules it does not know come from
//! [`crate::identity::x509svid`]. The peer is then authorized against the
//! tunnel's policy, so a refused peer fails the handshake itself.

use std::sync::{Arc, LazyLock};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::chain_cache::ChainCache;
use crate::identity::x509svid::{self, SvidRuleError};
use crate::identity::{BundleSet, Identity, IdentityStore};
use crate::policy::{Decision, Policy};
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Which end of a connection the peer is; selects the extended key usage
/// the leaf must allow when it has an EKU extension at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is a TLS client (we are an inbound tunnel).
    Client,
    /// The peer is a TLS server (we are an outbound tunnel).
    Server,
    /// Either, as for `spiffe-tunnel verify`.
    Any,
}

/// Why a peer was refused. Carried inside the rustls error so the proxy can
/// log the precise reason once and count it under the right label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("peer sent no certificate")]
    NoCertificate,
    #[error("peer leaf is not a valid X509-SVID: {0}")]
    Leaf(#[source] SvidRuleError),
    #[error("peer chain certificate {index} is not a valid signing certificate: {source}")]
    Signer {
        index: usize,
        #[source]
        source: SvidRuleError,
    },
    #[error("no trust bundle for trust domain {trust_domain:?} of peer {id} (from SPIRE the likely cause is a registration entry without `-federatesWith spiffe://{trust_domain}`: SPIRE sends a federated bundle only to workloads whose entry names it; with source = \"files\", an [identity.bundles] line is missing)")]
    NoBundle { id: String, trust_domain: String },
    #[error("trust domain {trust_domain:?} of peer {id} has no X.509 authorities (its bundle holds only JWT keys), so no X509-SVID of it can be verified")]
    NoX509Authorities { id: String, trust_domain: String },
    #[error("peer {id} does not chain to the bundle of {trust_domain}: {reason}")]
    Untrusted {
        id: String,
        trust_domain: String,
        reason: String,
    },
    #[error("we hold no identity (no SVID and no bundles), so no peer can be verified")]
    NoIdentity,
    #[error("peer {id} is not allowed by the policy of this tunnel{}", match .rule { Some(r) => format!(" (denied by rule {r:?})"), None => " (no rule matches)".to_string() })]
    NotAllowed { id: String, rule: Option<String> },
}

impl VerifyError {
    /// The peer's SPIFFE ID, when it got far enough to have one.
    pub fn peer_id(&self) -> Option<&str> {
        match self {
            Self::NoBundle { id, .. }
            | Self::NoX509Authorities { id, .. }
            | Self::Untrusted { id, .. }
            | Self::NotAllowed { id, .. } => Some(id),
            _ => None,
        }
    }

    /// Authorization refusals, as opposed to authentication failures.
    pub fn is_denial(&self) -> bool {
        matches!(self, Self::NotAllowed { .. })
    }

    /// Finds our error inside a rustls error, if it is one of ours.
    pub fn from_rustls(err: &rustls::Error) -> Option<&VerifyError> {
        match err {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                inner.downcast_ref::<VerifyError>()
            }
            _ => None,
        }
    }

    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// A peer whose chain verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPeer {
    pub id: SpiffeId,
    pub serial: String,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
}

/// Verifies an X509-SVID chain (leaf first) against the bundle of the trust
/// domain in the leaf's SPIFFE ID, at time `now`.
pub fn verify_svid_chain(
    chain: &[CertificateDer<'_>],
    bundles: &BundleSet,
    now: UnixTime,
    role: PeerRole,
) -> Result<VerifiedPeer, VerifyError> {
    let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::NoCertificate)?;
    verify_parts(leaf, intermediates, bundles, now, role).map(|(peer, _)| peer)
}

/// Chains verified recently, shared by every tunnel of the process (the
/// result does not depend on the tunnel; its policy is applied apart).
static VERIFIED_CHAINS: LazyLock<ChainCache> = LazyLock::new(ChainCache::default);

/// How many verified chains the process remembers, and their bytes (for
/// `/metrics`).
pub fn remembered_chains() -> (usize, usize) {
    VERIFIED_CHAINS.usage()
}

/// [`verify_svid_chain`] against `identity`'s bundles, reusing the result
/// of an earlier verification of the same chain bytes under the same
/// identity snapshot while every certificate in it is still within its
/// validity (see [`super::chain_cache`]). Only looks up: the window comes
/// back when the chain was verified now, for [`Admission::remember`].
fn verify_cached(
    identity: &Arc<Identity>,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    role: PeerRole,
) -> Result<(VerifiedPeer, Option<(i64, i64)>), VerifyError> {
    if let Some(peer) = VERIFIED_CHAINS.get(identity, leaf, intermediates, role, now) {
        return Ok((peer, None));
    }
    let (peer, window) = verify_parts(leaf, intermediates, &identity.bundles, now, role)?;
    Ok((peer, Some(window)))
}

/// Whether the process remembers this chain as verified under `identity`.
#[cfg(test)]
pub(crate) fn cached(
    identity: &Arc<Identity>,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    role: PeerRole,
) -> bool {
    VERIFIED_CHAINS
        .get(
            identity,
            leaf,
            intermediates,
            role,
            to_unix_time(SystemTime::now()),
        )
        .is_some()
}

fn verify_parts(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundles: &BundleSet,
    now: UnixTime,
    role: PeerRole,
) -> Result<(VerifiedPeer, (i64, i64)), VerifyError> {
    let facts = x509svid::check_leaf(leaf).map_err(VerifyError::Leaf)?;
    // Where this result holds: inside every certificate's validity.
    let mut window = (facts.not_before, facts.not_after);
    for (i, signer) in intermediates.iter().enumerate() {
        let validity = x509svid::check_signer(signer).map_err(|source| VerifyError::Signer {
            index: i + 1,
            source,
        })?;
        window = (
            window.0.max(validity.not_before),
            window.1.min(validity.not_after),
        );
    }
    let trust_domain: &TrustDomain = facts.id.trust_domain();
    let bundle = bundles
        .get(trust_domain)
        .ok_or_else(|| VerifyError::NoBundle {
            id: facts.id.to_string(),
            trust_domain: trust_domain.to_string(),
        })?;
    if bundle.anchors().is_empty() {
        return Err(VerifyError::NoX509Authorities {
            id: facts.id.to_string(),
            trust_domain: trust_domain.to_string(),
        });
    }

    let untrusted = |reason: String| VerifyError::Untrusted {
        id: facts.id.to_string(),
        trust_domain: trust_domain.to_string(),
        reason,
    };
    let end_entity = webpki::EndEntityCert::try_from(leaf).map_err(|e| untrusted(describe(&e)))?;
    let check = |usage: webpki::KeyUsage| {
        end_entity
            .verify_for_usage(
                signature_algorithms().all,
                bundle.anchors(),
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map(|_path| ())
    };
    match role {
        PeerRole::Client => check(webpki::KeyUsage::client_auth()),
        PeerRole::Server => check(webpki::KeyUsage::server_auth()),
        // Offline: accept a leaf usable for either end.
        PeerRole::Any => check(webpki::KeyUsage::server_auth())
            .or_else(|_| check(webpki::KeyUsage::client_auth())),
    }
    .map_err(|e| match e {
        webpki::Error::NameConstraintViolation => {
            untrusted(describe_name_constraint_violation(intermediates, bundle))
        }
        other => untrusted(describe(&other)),
    })?;
    let peer = VerifiedPeer {
        id: facts.id,
        serial: facts.serial,
        not_after: facts.not_after,
    };
    Ok((peer, window))
}

/// Why a chain broke a name constraint. rustls-webpki does not process
/// URI name constraints: it refuses every URI SAN under a CA that has one,
/// which is every X509-SVID. The SPIFFE spec suggests such constraints, so
/// an operator who followed it deserves to hear exactly that.
fn describe_name_constraint_violation(
    intermediates: &[CertificateDer<'_>],
    bundle: &crate::identity::TrustBundle,
) -> String {
    let with_uri = intermediates
        .iter()
        .chain(bundle.certs.iter())
        .find_map(|der| {
            let uris = x509svid::uri_name_constraints(der);
            (!uris.is_empty()).then_some(uris)
        });
    match with_uri {
        Some(uris) => format!(
            "a CA of the chain has a URI name constraint ({}); rustls-webpki does not process URI name constraints and refuses every SPIFFE ID under such a CA, so issue SVIDs from a CA without them",
            uris.join(", ")
        ),
        None => describe(&webpki::Error::NameConstraintViolation),
    }
}

/// A readable reason for a webpki error.
fn describe(e: &webpki::Error) -> String {
    use webpki::Error as E;
    match e {
        E::UnknownIssuer => {
            "issuer is not in the trust bundle (unknown CA or bad signature)".into()
        }
        E::CertExpired { .. } => "certificate has expired".into(),
        E::CertNotValidYet { .. } => "certificate is not valid yet".into(),
        E::CaUsedAsEndEntity => "leaf is a CA certificate".into(),
        E::EndEntityUsedAsCa => "a signing certificate in the chain is not a CA".into(),
        E::InvalidSignatureForPublicKey => "signature does not verify".into(),
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            "signature algorithm is refused (weak or unsupported)".into()
        }
        E::RequiredEkuNotFoundContext(_) => {
            "extended key usage does not allow this role (serverAuth/clientAuth)".into()
        }
        E::PathLenConstraintViolated => "path length constraint violated".into(),
        E::NameConstraintViolation => "name constraints of a CA are violated".into(),
        other => format!("{other:?}"),
    }
}

/// The signature algorithms we accept: aws-lc-rs's set, which has no SHA-1
/// and no RSA below 2048 bits.
pub fn signature_algorithms() -> &'static WebPkiSupportedAlgorithms {
    static ALGORITHMS: LazyLock<WebPkiSupportedAlgorithms> = LazyLock::new(|| {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
    });
    &ALGORITHMS
}

/// Converts wall-clock time for webpki.
pub fn to_unix_time(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// The rustls verifier for one tunnel: authenticates the peer's X509-SVID
/// against the current bundles and authorizes its ID against the tunnel's
/// current policy. Both are read through atomic loads, so rotations and
/// policy reloads apply to the next handshake without rebuilding configs.
#[derive(Debug)]
pub struct SpiffeVerifier {
    store: Arc<IdentityStore>,
    policy: Arc<ArcSwap<Policy>>,
    role: PeerRole,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeVerifier {
    pub fn new(store: Arc<IdentityStore>, policy: Arc<ArcSwap<Policy>>, role: PeerRole) -> Self {
        Self {
            store,
            policy,
            role,
            algorithms: *signature_algorithms(),
        }
    }

    fn verify(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let identity = self
            .store
            .load()
            .ok_or_else(|| VerifyError::NoIdentity.into_rustls())?;
        // Looked up, never remembered: the peer has not proved it holds
        // the key yet, and may still be refused.
        let (peer, _) = verify_cached(&identity, leaf, intermediates, now, self.role)
            .map_err(VerifyError::into_rustls)?;
        authorize(&self.policy.load(), &peer.id).map_err(VerifyError::into_rustls)
    }
}

/// Applies a policy to a verified peer ID.
pub fn authorize(policy: &Policy, id: &SpiffeId) -> Result<(), VerifyError> {
    match policy.decide(id) {
        Decision::Allowed(_) => Ok(()),
        Decision::Denied(rule) => Err(VerifyError::NotAllowed {
            id: id.to_string(),
            rule: Some(format!("deny {rule}")),
        }),
        Decision::NoMatch => Err(VerifyError::NotAllowed {
            id: id.to_string(),
            rule: None,
        }),
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // SPIFFE peers pick their SVID by identity, not by CA name hints.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // SPIFFE authenticates the server by its SPIFFE ID, not its DNS name.
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A peer [`authorize_session`] let through, and what it takes to remember
/// its chain once the tunnel has admitted the connection.
#[derive(Debug)]
pub struct Admission {
    pub peer: VerifiedPeer,
    role: PeerRole,
    /// The snapshot that verified the chain just now and the window in
    /// which that holds; none when the chain was found remembered.
    verified: Option<(Arc<Identity>, (i64, i64))>,
}

impl Admission {
    /// Remembers `chain` (the one given to [`authorize_session`]) as
    /// verified, so the peer's next handshakes skip its signature checks.
    /// Call it only once the connection is admitted: the handshake is
    /// complete (the peer proved its key) and nothing refused it since.
    /// Nothing is remembered when `store` moved on to another snapshot
    /// meanwhile: the cache holds results for the current one only.
    pub fn remember(&self, chain: &[CertificateDer<'_>], store: &IdentityStore) {
        let (Some((identity, window)), Some((leaf, intermediates))) =
            (&self.verified, chain.split_first())
        else {
            return;
        };
        if !store
            .load()
            .is_some_and(|current| Arc::ptr_eq(&current, identity))
        {
            return;
        }
        VERIFIED_CHAINS.insert(
            identity,
            leaf,
            intermediates,
            self.role,
            &self.peer,
            *window,
        );
    }
}

/// Authorizes an established session, full or resumed, before any byte is
/// forwarded. rustls runs the certificate verifier only on full handshakes;
/// a resumed session carries the peer chain from its original handshake.
/// Either way the chain is verified here against the bundles of *now*
/// (found remembered if it was verified under them before, verified again
/// otherwise, which covers a resumed session and a bundle change that
/// landed mid-handshake) and the ID checked against the policy of *now*
/// (which covers a policy reload that landed mid-handshake).
pub fn authorize_session(
    peer_chain: Option<&[CertificateDer<'static>]>,
    store: &IdentityStore,
    policy: &Policy,
    role: PeerRole,
) -> Result<Admission, VerifyError> {
    let chain = peer_chain
        .filter(|c| !c.is_empty())
        .ok_or(VerifyError::NoCertificate)?;
    let identity = store.load().ok_or(VerifyError::NoIdentity)?;
    let (leaf, intermediates) = chain.split_first().ok_or(VerifyError::NoCertificate)?;
    let (peer, window) = verify_cached(
        &identity,
        leaf,
        intermediates,
        to_unix_time(SystemTime::now()),
        role,
    )?;
    authorize(policy, &peer.id)?;
    Ok(Admission {
        peer,
        role,
        verified: window.map(|window| (identity, window)),
    })
}
