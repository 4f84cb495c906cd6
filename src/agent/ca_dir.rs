//! `--ca-dir`: the dev agent's CA kept on disk, so that a restarted agent
//! keeps its trust domain's CA and several agents (one per node in a
//! multi-node test) can share one CA and stay in step across rotations.
//!
//! Layout of the directory:
//!
//! * `ca.pem`, `ca.key` — the active CA (certificate, PKCS#8 key, 0600).
//! * `next-ca.pem` — the CA prepared at half the active CA's life and not
//!   yet signing: certificate and key in one file so it appears in a single
//!   atomic step (mode 0600).
//!
//! Agents sharing the directory compute rotation times from the same
//! certificate, so they prepare the next CA at the same moment. The first to
//! publish `next-ca.pem` wins (a hard link fails if the name exists, which a
//! rename would not) and the others adopt its CA; at activation each writes
//! the same `ca.pem`/`ca.key`. Creating the very first CA uses the same
//! trick on `ca.key`. Retired CAs are not stored: an agent restarted during
//! an overlap only serves the active and next CAs.
//!
//! Writes are small and rare (once per CA rotation), so they use blocking
//! `std::fs` calls rather than a blocking-pool round trip.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use super::ca::{Ca, LoadError};
use super::AgentError;
use crate::spiffe_id::TrustDomain;

const ACTIVE_CERT: &str = "ca.pem";
const ACTIVE_KEY: &str = "ca.key";
const NEXT: &str = "next-ca.pem";

/// How long to wait for another agent that is in the middle of writing the
/// first CA into the directory.
const CREATION_WAIT: Duration = Duration::from_secs(5);
const CREATION_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub(crate) struct CaDir {
    path: PathBuf,
    trust_domain: TrustDomain,
}

/// What reading the active CA found.
enum Found {
    Nothing,
    Ca(Box<Ca>),
    /// Possibly another agent mid-write: worth another look shortly.
    Transient(String),
    Bad(String),
}

impl CaDir {
    pub(crate) fn new(path: PathBuf, trust_domain: TrustDomain) -> Self {
        Self { path, trust_domain }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn error(&self, reason: impl Into<String>) -> AgentError {
        AgentError::CaDir {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The CAs to start with: the stored active CA (or a new one, stored),
    /// and a stored next CA if one is waiting.
    pub(crate) async fn initial(
        &self,
        now: SystemTime,
        ca_ttl: Duration,
    ) -> Result<(Ca, Option<Ca>), AgentError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.path)
            .map_err(|e| self.error(format!("cannot create the directory: {e}")))?;
        let active = match self.load_active_waiting().await? {
            Some(ca) if ca.not_after > now => {
                tracing::info!(
                    dir = %self.path.display(),
                    serial = %ca.serial,
                    expires = %crate::timefmt::rfc3339(ca.not_after),
                    "loaded the CA from --ca-dir"
                );
                ca
            }
            Some(expired) => {
                let ca = Ca::generate(&self.trust_domain, now, ca_ttl)?;
                tracing::warn!(
                    dir = %self.path.display(),
                    old_serial = %expired.serial,
                    serial = %ca.serial,
                    "the CA in --ca-dir has expired; replaced it with a new one"
                );
                self.replace_active(&ca)
                    .map_err(|e| self.error(format!("cannot write the new CA: {e}")))?;
                ca
            }
            None => {
                let ca = self
                    .create_active(Ca::generate(&self.trust_domain, now, ca_ttl)?)
                    .await?;
                tracing::info!(
                    dir = %self.path.display(),
                    serial = %ca.serial,
                    "stored the CA in --ca-dir for later runs"
                );
                ca
            }
        };
        let next = self.load_next(&active, now);
        Ok((active, next))
    }

    fn load_active(&self) -> Found {
        let cert = read_optional(&self.file(ACTIVE_CERT));
        let key = read_optional(&self.file(ACTIVE_KEY));
        match (cert, key) {
            (Err(e), _) => Found::Bad(format!("cannot read {ACTIVE_CERT}: {e}")),
            (_, Err(e)) => Found::Bad(format!("cannot read {ACTIVE_KEY}: {e}")),
            (Ok(None), Ok(None)) => Found::Nothing,
            // The key is written first, by whoever creates the CA.
            (Ok(None), Ok(Some(_))) => Found::Transient(format!(
                "{ACTIVE_KEY} exists but {ACTIVE_CERT} does not (remove {ACTIVE_KEY} \
                 to start afresh)"
            )),
            (Ok(Some(_)), Ok(None)) => {
                Found::Bad(format!("{ACTIVE_CERT} exists but {ACTIVE_KEY} does not"))
            }
            (Ok(Some(cert)), Ok(Some(key))) => {
                match Ca::from_pem(&self.trust_domain, &cert, &key) {
                    Ok(ca) => Found::Ca(Box::new(ca)),
                    // Another agent may be replacing the pair right now.
                    Err(reason @ LoadError::KeyMismatch) => {
                        Found::Transient(format!("{ACTIVE_CERT} and {ACTIVE_KEY}: {reason}"))
                    }
                    Err(reason) => Found::Bad(format!("{ACTIVE_CERT} and {ACTIVE_KEY}: {reason}")),
                }
            }
        }
    }

    async fn load_active_waiting(&self) -> Result<Option<Ca>, AgentError> {
        let deadline = tokio::time::Instant::now() + CREATION_WAIT;
        loop {
            match self.load_active() {
                Found::Nothing => return Ok(None),
                Found::Ca(ca) => return Ok(Some(*ca)),
                Found::Bad(reason) => return Err(self.error(reason)),
                Found::Transient(reason) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(self.error(reason));
                    }
                    tokio::time::sleep(CREATION_POLL).await;
                }
            }
        }
    }

    /// Stores `ca` as the first CA of the directory, unless another agent
    /// got there first, in which case its CA is returned instead.
    async fn create_active(&self, ca: Ca) -> Result<Ca, AgentError> {
        let key_path = self.file(ACTIVE_KEY);
        let linked = publish_exclusive(&key_path, ca.key_pem().as_bytes())
            .map_err(|e| self.error(format!("cannot write {ACTIVE_KEY}: {e}")))?;
        if !linked {
            return self.load_active_waiting().await?.ok_or_else(|| {
                self.error(format!(
                    "{ACTIVE_KEY} vanished while another agent wrote it"
                ))
            });
        }
        write_atomic(&self.file(ACTIVE_CERT), ca.cert_pem().as_bytes(), 0o644)
            .map_err(|e| self.error(format!("cannot write {ACTIVE_CERT}: {e}")))?;
        Ok(ca)
    }

    /// Makes `ca` the stored active CA. The key goes first so that a reader
    /// never pairs a new certificate with an old key for long.
    pub(crate) fn replace_active(&self, ca: &Ca) -> io::Result<()> {
        write_atomic(&self.file(ACTIVE_KEY), ca.key_pem().as_bytes(), 0o600)?;
        write_atomic(&self.file(ACTIVE_CERT), ca.cert_pem().as_bytes(), 0o644)
    }

    /// The stored next CA, when it is usable as the successor of `active`.
    /// A stale one (not outliving `active`) is removed; a broken one is
    /// reported and ignored.
    pub(crate) fn load_next(&self, active: &Ca, now: SystemTime) -> Option<Ca> {
        let path = self.file(NEXT);
        let pem = match read_optional(&path) {
            Ok(Some(pem)) => pem,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(file = %path.display(), "cannot read the stored next CA: {e}");
                return None;
            }
        };
        match Ca::from_pem(&self.trust_domain, &pem, &pem) {
            Ok(next) if next.not_after > active.not_after && next.not_after > now => Some(next),
            Ok(_) => {
                // It can never succeed the active CA; clear it so that a
                // fresh one can be published.
                let _ = fs::remove_file(&path);
                None
            }
            Err(reason) => {
                tracing::warn!(file = %path.display(), "ignoring the stored next CA: {reason}");
                None
            }
        }
    }

    /// Publishes `candidate` as the next CA for every agent sharing the
    /// directory, or adopts the one another agent published first. Disk
    /// trouble is logged and the candidate used anyway: rotation must not
    /// stop because a directory became read-only.
    pub(crate) fn publish_next(&self, candidate: Ca, active: &Ca, now: SystemTime) -> Ca {
        let path = self.file(NEXT);
        let mut bytes = candidate.cert_pem().into_bytes();
        bytes.extend_from_slice(candidate.key_pem().as_bytes());
        for _ in 0..2 {
            if let Some(shared) = self.load_next(active, now) {
                tracing::info!(
                    serial = %shared.serial,
                    "adopted the next CA another agent published in --ca-dir"
                );
                return shared;
            }
            match publish_exclusive(&path, &bytes) {
                Ok(true) => return candidate,
                // Someone published between our look and our link.
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(file = %path.display(), "cannot store the next CA: {e}");
                    return candidate;
                }
            }
        }
        candidate
    }

    /// After `activated` became the active CA: stores it as such and
    /// removes it from `next-ca.pem`.
    pub(crate) fn activated(&self, activated: &Ca) {
        if let Err(e) = self.replace_active(activated) {
            tracing::warn!(dir = %self.path.display(), "cannot store the new active CA: {e}");
        }
        let path = self.file(NEXT);
        if let Ok(Some(pem)) = read_optional(&path) {
            let same = rustls_pki_types::pem::PemObject::from_pem_slice(&pem)
                .is_ok_and(|der: rustls_pki_types::CertificateDer<'_>| der == activated.der);
            if same {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

fn read_optional(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// A temporary name next to `path`, unique within this host.
fn temp_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Replaces `path` with `bytes` so that readers see the old or the new
/// content, never a mix.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = write_new(&tmp, bytes, mode).and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` with `bytes` (mode 0600) only if nothing is there yet;
/// `Ok(false)` when another writer got there first. The content is complete
/// before the name appears, unlike `create_new` on the final name.
fn publish_exclusive(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let tmp = temp_path(path);
    write_new(&tmp, bytes, 0o600)?;
    let linked = match fs::hard_link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    };
    let _ = fs::remove_file(&tmp);
    linked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe_id::parse_trust_domain;
    use std::os::unix::fs::PermissionsExt;

    fn td() -> TrustDomain {
        parse_trust_domain("example.org").unwrap()
    }

    const TTL: Duration = Duration::from_secs(600);

    #[tokio::test]
    async fn creates_then_reuses_the_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ca");
        let dir = CaDir::new(path.clone(), td());
        let now = SystemTime::now();
        let (first, next) = dir.initial(now, TTL).await.unwrap();
        assert!(next.is_none());
        let key_mode = fs::metadata(path.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        assert!(path.join("ca.pem").exists());
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&path).unwrap().count(), 2);

        let again = CaDir::new(path, td());
        let (second, _) = again.initial(SystemTime::now(), TTL).await.unwrap();
        assert_eq!(first.der, second.der);
    }

    #[tokio::test]
    async fn an_expired_ca_is_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CaDir::new(tmp.path().to_path_buf(), td());
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        let old = Ca::generate(&td(), long_ago, Duration::from_secs(60)).unwrap();
        dir.replace_active(&old).unwrap();
        let (ca, _) = dir.initial(SystemTime::now(), TTL).await.unwrap();
        assert_ne!(ca.der, old.der);
        let stored = fs::read(tmp.path().join("ca.pem")).unwrap();
        assert_eq!(stored, ca.cert_pem().into_bytes());
    }

    #[tokio::test]
    async fn broken_files_are_usage_errors() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("ca.pem"), "junk").unwrap();
        let dir = CaDir::new(tmp.path().to_path_buf(), td());
        let err = dir.initial(SystemTime::now(), TTL).await.unwrap_err();
        assert!(err.is_usage(), "{err}");
        assert!(err.to_string().contains("ca.key"), "{err}");

        fs::write(tmp.path().join("ca.key"), "junk").unwrap();
        let err = dir.initial(SystemTime::now(), TTL).await.unwrap_err();
        assert!(err.is_usage(), "{err}");
    }

    #[tokio::test]
    async fn agents_sharing_a_dir_agree_on_the_next_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let a = CaDir::new(tmp.path().to_path_buf(), td());
        let b = CaDir::new(tmp.path().to_path_buf(), td());
        let now = SystemTime::now();
        let (active_a, _) = a.initial(now, TTL).await.unwrap();
        let (active_b, _) = b.initial(now, TTL).await.unwrap();
        assert_eq!(active_a.der, active_b.der);

        let later = now + Duration::from_secs(300);
        let next_a = a.publish_next(Ca::generate(&td(), later, TTL).unwrap(), &active_a, later);
        let next_b = b.publish_next(Ca::generate(&td(), later, TTL).unwrap(), &active_b, later);
        assert_eq!(
            next_a.der, next_b.der,
            "the second agent adopts the first one's CA"
        );

        // A restarted agent finds it too.
        let c = CaDir::new(tmp.path().to_path_buf(), td());
        let (_, next_c) = c.initial(later, TTL).await.unwrap();
        assert_eq!(next_c.map(|n| n.der), Some(next_a.der.clone()));

        a.activated(&next_a);
        b.activated(&next_b);
        assert!(!tmp.path().join("next-ca.pem").exists());
        let (active_c, none) = c.initial(later, TTL).await.unwrap();
        assert_eq!(active_c.der, next_a.der);
        assert!(none.is_none());
    }
}
