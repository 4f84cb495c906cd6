//! Identity from PEM files on disk: an SVID chain, its PKCS#8 key and one
//! bundle per trust domain, reloaded when any of them changes.
//!
//! Changes are found by polling file metadata once a second rather than by
//! inotify: certificate rotators replace files by rename, Kubernetes swaps a
//! `..data` symlink, and editors write in place; a stat poll sees all of
//! these the same way, costs next to nothing, and needs no extra crate.
//! A candidate is validated as a whole before it is published; a broken or
//! half-written set is logged once and the last good identity stays.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use tracing::{info, warn};

use super::{BundleSet, Identity, IdentityError, IdentityStore, Svid, TrustBundle};
use crate::spiffe_id::TrustDomain;

/// The files that make up a file identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileIdentity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundles: BTreeMap<TrustDomain, PathBuf>,
}

impl FileIdentity {
    /// Reads and validates every file into one identity snapshot.
    pub fn load(&self, provider: &CryptoProvider) -> Result<Identity, IdentityError> {
        let cert = read(&self.cert)?;
        let key = read(&self.key)?;
        let svid = Svid::from_pem(&cert, &key, provider).map_err(|e| annotate(e, &self.cert))?;
        let mut bundles = BundleSet::new();
        for (trust_domain, path) in &self.bundles {
            let pem = read(path)?;
            let bundle =
                TrustBundle::from_pem(trust_domain.clone(), &pem).map_err(|e| annotate(e, path))?;
            bundles.insert(bundle);
        }
        Identity::new(vec![svid], bundles, SystemTime::now())
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        [self.cert.as_path(), self.key.as_path()]
            .into_iter()
            .chain(self.bundles.values().map(PathBuf::as_path))
    }

    /// What the files look like now; any difference means "reload".
    fn fingerprint(&self) -> Vec<Option<(SystemTime, u64, u64)>> {
        use std::os::unix::fs::MetadataExt;
        self.paths()
            .map(|p| {
                std::fs::metadata(p).ok().map(|m| {
                    (
                        m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                        m.len(),
                        m.ino(),
                    )
                })
            })
            .collect()
    }

    /// Polls the files every `interval` and publishes each new valid
    /// identity. Runs until the store is dropped by everyone else.
    pub async fn watch(
        self,
        store: Arc<IdentityStore>,
        provider: Arc<CryptoProvider>,
        metrics: Arc<crate::metrics::Metrics>,
        interval: Duration,
    ) {
        let mut seen = self.fingerprint();
        // The file state last refused, so a broken set that stays broken
        // is retried every tick but logged and counted once.
        let mut refused: Option<Vec<Option<(SystemTime, u64, u64)>>> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if Arc::strong_count(&store) == 1 {
                return;
            }
            let now = self.fingerprint();
            if now == seen {
                continue;
            }
            match self.load(&provider) {
                Ok(identity) => {
                    seen = now;
                    let was_refused = refused.take().is_some();
                    // Files touched or rewritten with the same content
                    // (the same chains, keys and bundles) are not a
                    // rotation; anything else is published, so a state
                    // marked seen here is either published or identical.
                    if store
                        .load()
                        .is_some_and(|current| current.same_as(&identity))
                    {
                        if was_refused {
                            info!("identity files are valid again; the identity is unchanged");
                        }
                        continue;
                    }
                    let svid = identity
                        .default_svid()
                        .map(|s| (s.id.to_string(), s.serial.clone()));
                    store.publish(identity);
                    metrics.identity_update(true);
                    if let Some((id, serial)) = svid {
                        info!(spiffe_id = %id, serial = %serial, "identity files reloaded");
                    }
                }
                Err(e) => {
                    // Keep `seen` unchanged so the next tick retries: a
                    // rotator may still be writing the second file.
                    if refused.as_ref() != Some(&now) {
                        warn!(error = %e, "identity files changed but are not valid; keeping the current identity");
                        metrics.identity_update(false);
                        refused = Some(now);
                    }
                }
            }
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Io {
        what: path.display().to_string(),
        source,
    })
}

/// Prefixes an error with the file it came from.
fn annotate(e: IdentityError, path: &Path) -> IdentityError {
    match e {
        IdentityError::BadPem { what, reason } => IdentityError::BadPem {
            what: format!("{} ({what})", path.display()),
            reason,
        },
        IdentityError::NoCertificates { what } => IdentityError::NoCertificates {
            what: format!("{} ({what})", path.display()),
        },
        other => other,
    }
}
