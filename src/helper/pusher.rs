//! What `svid watch` sends a running HAProxy on each update, and in which
//! order, so that HAProxy presents the new SVID and trusts the new bundle
//! without ever being sent a sequence that breaks it.
//!
//! Each update: the certificate is committed (`set/commit ssl cert`); the
//! CA file only when the bundle differs from what HAProxy holds (`show ssl
//! ca-file`, by fingerprint), which is never the case on the first push
//! after HAProxy read the file at start. A real CA change is committed at
//! runtime only on an HAProxy without bug #3165 (see [`haproxy`]); on one
//! with it, a single `commit ssl ca-file` silently freezes the certificate
//! HAProxy presents and sets up a crash at the next CA commit, so the
//! change goes in as a master-worker `reload` when the master CLI is
//! given, and is otherwise refused with an error that tells the operator
//! to reload. Retried with backoff until it goes through or a newer update
//! replaces it.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use super::haproxy::{self, HaproxyError, HaproxyTarget};
use crate::identity::workload_api::MAX_BACKOFF;

/// One update for HAProxy: the `crt` PEM (chain and key) and the `ca-file`
/// PEM (every bundle).
pub type Update = (String, String);

/// What one push did, for the log.
#[derive(Debug, PartialEq, Eq)]
enum Pushed {
    /// The certificate; the CA file was already what HAProxy holds (or
    /// there is none).
    Cert,
    /// The certificate, then the new CA file, both at runtime.
    CertAndCa,
    /// HAProxy was reloaded through its master CLI for the new CA: a new
    /// worker read both files from disk.
    Reloaded { old_pid: u32, new_pid: u32 },
}

/// Pushes each new certificate (and CA file) into HAProxy, retrying with
/// backoff while HAProxy is unreachable; a newer update replaces a pending
/// one.
pub async fn push_to_haproxy(
    socket: PathBuf,
    target: HaproxyTarget,
    mut updates: watch::Receiver<Option<Update>>,
) {
    while updates.changed().await.is_ok() {
        let Some((cert, ca)) = updates.borrow_and_update().clone() else {
            continue;
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            match push(&socket, &target, &cert, &ca).await {
                Ok(pushed) => {
                    if let Pushed::Reloaded { old_pid, new_pid } = pushed {
                        info!(socket = %socket.display(), old_worker = old_pid, new_worker = new_pid,
                            "HAProxy reloaded through its master CLI for the new CA (its runtime CA updates are broken: bug #3165)");
                    }
                    info!(socket = %socket.display(), cert = %target.cert.display(), ca_file_committed = (pushed == Pushed::CertAndCa), "HAProxy now presents the new SVID");
                    break;
                }
                Err(e) if e.is_transient() => {
                    warn!(error = %e, retry_in = ?backoff, "HAProxy update postponed");
                }
                Err(e @ HaproxyError::CaNeedsReload { .. }) => {
                    // The certificate went in; only the CA waits for the
                    // operator, checked again on each retry.
                    error!(error = %e, retry_in = ?backoff, "HAProxy update incomplete: new CA refused at runtime");
                }
                Err(e) => {
                    error!(error = %e, retry_in = ?backoff, "HAProxy update failed");
                }
            }
            // Retry later, unless a newer update arrives first.
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                changed = updates.changed() => {
                    if changed.is_err() { return; }
                    updates.mark_changed();
                    break;
                }
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

async fn push(
    socket: &std::path::Path,
    target: &HaproxyTarget,
    cert: &str,
    ca: &str,
) -> Result<Pushed, HaproxyError> {
    let before = haproxy::info(socket).await?;
    // Safe on every version: without a runtime CA commit in this worker's
    // life (we never make one where it is broken), every TLS context using
    // the certificate is in its list and is rebuilt.
    haproxy::update_cert(socket, &target.cert, cert).await?;
    let Some(ca_file) = &target.ca_file else {
        return Ok(Pushed::Cert);
    };
    let wanted = haproxy::pem_fingerprints(ca);
    if haproxy::ca_file_fingerprints(socket, ca_file).await? == wanted {
        return Ok(Pushed::Cert);
    }
    // An unknown release string counts as affected: a reload never hurts.
    if !before.version.is_none_or(|v| v.has_ca_commit_bug()) {
        haproxy::update_ca_file(socket, ca_file, ca).await?;
        return Ok(Pushed::CertAndCa);
    }
    let Some(master) = &target.master_socket else {
        return Err(HaproxyError::CaNeedsReload {
            version: before.version_text,
            file: ca_file.display().to_string(),
        });
    };
    let new_pid = haproxy::reload_for_ca(master, socket, before.pid, ca_file, &wanted).await?;
    Ok(Pushed::Reloaded {
        old_pid: before.pid,
        new_pid,
    })
}
