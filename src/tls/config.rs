//! The rustls configs of a tunnel, built once when the tunnel starts.
//!
//! Rotation never rebuilds them: the certificate comes from
//! [`SvidResolver`] and trust and policy from [`SpiffeVerifier`], both of
//! which read the current snapshot through an atomic load at handshake time.
//! So a new SVID, bundle or policy applies to the very next handshake, a
//! handshake in flight finishes with the snapshot it started with, and live
//! connections are untouched.
//!
//! TLS 1.3 session resumption is on unless a tunnel sets
//! `session_resumption = false`; [`super::resumption`] holds the rules that
//! keep tickets shorter-lived than the identities behind them, and
//! `authorize_session` verifies and authorizes every resumed session again.
//! The client config built here never resumes by itself: outbound tunnels
//! get their per-upstream session caches from
//! [`super::resumption::ClientResumption`].

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, ServerConfig, SupportedProtocolVersion};

use super::resolver::SvidResolver;
use super::resumption::{TicketIssuer, TicketKeyError};
use super::verify::{PeerRole, SpiffeVerifier};
use crate::config::MinTls;
use crate::identity::{IdentityStore, SvidSelector};
use crate::policy::Policy;

/// Errors building a TLS config; only a broken crypto provider or random
/// source causes them.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error(transparent)]
    TicketKey(#[from] TicketKeyError),
}

/// What a tunnel end needs to build its TLS config.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub store: Arc<IdentityStore>,
    pub policy: Arc<ArcSwap<Policy>>,
    pub svid: SvidSelector,
    pub min_tls: MinTls,
    /// Whether sessions may be resumed (TLS 1.3 tickets).
    pub session_resumption: bool,
}

/// The crypto provider of the whole process: aws-lc-rs with its default
/// suites, AES-128-GCM first (then AES-256-GCM, then ChaCha20-Poly1305).
///
/// aws-lc-rs lists AES-256-GCM-SHA384 first. AES-128-GCM is as much a
/// mandatory TLS 1.3 suite, is what Go's crypto/tls prefers, and costs less
/// on both counts that matter to a proxy: four fewer AES rounds per block
/// of bulk data, and a SHA-256 key schedule and transcript (hardware
/// SHA-256 on current x86 and ARM CPUs) instead of SHA-384, which is most
/// of a resumed handshake's hashing. As a server we follow the client's
/// order, so a peer that prefers AES-256 gets it.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        let version = match suite {
            rustls::SupportedCipherSuite::Tls13(_) => 0,
            _ => 1,
        };
        (version, suite_rank(suite.suite()))
    });
    Arc::new(provider)
}

/// Preference within one TLS version: AES-128-GCM, AES-256-GCM, the rest.
fn suite_rank(suite: rustls::CipherSuite) -> u8 {
    use rustls::CipherSuite as S;
    match suite {
        S::TLS13_AES_128_GCM_SHA256
        | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        S::TLS13_AES_256_GCM_SHA384
        | S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    }
}

fn versions(min_tls: MinTls) -> &'static [&'static SupportedProtocolVersion] {
    static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
    static TLS12_AND_13: &[&SupportedProtocolVersion] =
        &[&rustls::version::TLS13, &rustls::version::TLS12];
    match min_tls {
        MinTls::Tls13 => TLS13_ONLY,
        MinTls::Tls12 => TLS12_AND_13,
    }
}

/// The server side of an inbound tunnel: client certificates are required
/// and verified as X509-SVIDs authorized by the tunnel's policy.
pub fn server_config(settings: &TlsSettings) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let verifier = SpiffeVerifier::new(
        Arc::clone(&settings.store),
        Arc::clone(&settings.policy),
        PeerRole::Client,
    );
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(settings.min_tls))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(SvidResolver::new(
            Arc::clone(&settings.store),
            settings.svid.clone(),
        )));
    // Stateless tickets only: no session state kept in memory per client.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    if settings.session_resumption {
        config.ticketer = Arc::new(TicketIssuer::new(
            Arc::clone(&settings.store),
            settings.svid.clone(),
        )?);
        // One ticket per handshake, not rustls' two: each connection uses
        // one up, and building, sending and storing a second cost about 7 %
        // of the CPU of a resumed connection (scripts/bench A/B). The
        // client keeps enough of them for its peak concurrency instead.
        config.send_tls13_tickets = 1;
    } else {
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// The client side of an outbound tunnel: the server must present an
/// X509-SVID allowed by the tunnel's policy, and we present ours. Without
/// a session cache: [`ClientResumption`] adds one per upstream.
///
/// [`ClientResumption`]: super::resumption::ClientResumption
pub fn client_config(settings: &TlsSettings) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let verifier = SpiffeVerifier::new(
        Arc::clone(&settings.store),
        Arc::clone(&settings.policy),
        PeerRole::Server,
    );
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(settings.min_tls))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(SvidResolver::new(
            Arc::clone(&settings.store),
            settings.svid.clone(),
        )));
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite as S;

    #[test]
    fn aes_128_gcm_comes_first_and_no_suite_is_lost() {
        let ours: Vec<S> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let mut default: Vec<S> = rustls::crypto::aws_lc_rs::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            ours[..3],
            [
                S::TLS13_AES_128_GCM_SHA256,
                S::TLS13_AES_256_GCM_SHA384,
                S::TLS13_CHACHA20_POLY1305_SHA256
            ]
        );
        assert_eq!(ours[3], S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256);
        let mut sorted = ours.clone();
        sorted.sort_by_key(|s| u16::from(*s));
        default.sort_by_key(|s| u16::from(*s));
        assert_eq!(sorted, default);
    }
}
