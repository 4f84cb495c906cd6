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
use crate::identity::IdentityStore;
use crate::policy::Policy;
use crate::spiffe_id::SpiffeId;

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
    pub svid: Option<SpiffeId>,
    pub min_tls: MinTls,
    /// Whether sessions may be resumed (TLS 1.3 tickets).
    pub session_resumption: bool,
}

/// The crypto provider of the whole process: aws-lc-rs, default suites.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
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
