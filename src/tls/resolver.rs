//! Certificate selection: rustls asks, at each handshake, which certificate
//! to present, and these resolvers answer from the identity store.
//!
//! They hand out the `CertifiedKey` that the identity source built when the
//! SVID arrived, so a handshake costs one atomic load, never a PEM parse.
//! An expired SVID is never presented, even if no newer one has come yet.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::identity::{IdentityStore, SvidSelector};

/// Presents one of our SVIDs: the one `svid` selects (by ID and/or hint),
/// or the default.
#[derive(Debug)]
pub struct SvidResolver {
    store: Arc<IdentityStore>,
    svid: SvidSelector,
}

impl SvidResolver {
    pub fn new(store: Arc<IdentityStore>, svid: SvidSelector) -> Self {
        Self { store, svid }
    }

    /// The certificate to present now, if we hold a valid one.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        let identity = self.store.load()?;
        let svid = identity.svid(&self.svid)?;
        svid.is_valid_at(SystemTime::now())
            .then(|| Arc::clone(&svid.certified_key))
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}
