//! What `svid watch` sends a running HAProxy on each update, and in which
//! order, so that HAProxy presents the new SVID and trusts the new bundle
//! without ever being sent a sequence that breaks it (see [`haproxy`] for
//! the two HAProxy bugs this works around).
//!
//! Each update: the certificate is committed (`set/commit ssl cert`),
//! unless HAProxy is older than 3.0 and the SVID has no DNS name nor CN
//! (SPIRE's default), where that commit would leave a `bind` line letting
//! in any client: then the new SVID goes in by a master-worker `reload`,
//! or, without the master CLI, is refused with an error that says so. The
//! CA file is sent only when the bundle differs from what HAProxy holds
//! (`show ssl ca-file`, by fingerprint), which is never the case on the
//! first push after HAProxy read the file at start. A real CA change is
//! committed at runtime only on HAProxy 3.3 and later; before, one `commit
//! ssl ca-file` silently freezes the certificate HAProxy presents and sets
//! up a crash at the next CA commit, so the change goes in by a `reload`,
//! or is refused likewise. Retried with backoff until it goes through or
//! a newer update replaces it.

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
    /// HAProxy was reloaded through its master CLI: a new worker read
    /// both files from disk.
    Reloaded {
        old_pid: u32,
        new_pid: u32,
        why: &'static str,
    },
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
                    if let Pushed::Reloaded {
                        old_pid,
                        new_pid,
                        why,
                    } = pushed
                    {
                        info!(socket = %socket.display(), old_worker = old_pid, new_worker = new_pid, why,
                            "HAProxy reloaded through its master CLI");
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
                Err(e @ HaproxyError::CertNeedsReload { .. }) => {
                    error!(error = %e, retry_in = ?backoff, "HAProxy update refused: new SVID not committed at runtime");
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
    // An unknown release string counts as the oldest: a reload never hurts.
    let version = before.version;
    let cert_commit_safe = haproxy::has_sni_name(cert)
        || version.is_some_and(|v| !v.drops_bind_settings_of_nameless());
    let ca_commit_safe = version.is_some_and(|v| !v.has_ca_commit_bug());
    let mut reload_for = None;
    let mut cert_pending = false;
    if cert_commit_safe {
        // With no runtime CA commit in this worker's life (none is made
        // where it is broken), every TLS context using the certificate is
        // in its list and is rebuilt.
        haproxy::update_cert(socket, &target.cert, cert).await?;
    } else if haproxy::cert_serial(socket, &target.cert).await?
        != haproxy::pem_serial(cert).unwrap_or_default()
    {
        cert_pending = true;
        reload_for = Some("a new SVID without a DNS name: a runtime commit would drop a bind line's verify (HAProxy before 3.0)");
    }
    let mut ca_wanted = None;
    let mut ca_committed = false;
    if let Some(ca_file) = &target.ca_file {
        let wanted = haproxy::pem_fingerprints(ca);
        if haproxy::ca_file_fingerprints(socket, ca_file).await? != wanted {
            if ca_commit_safe {
                haproxy::update_ca_file(socket, ca_file, ca).await?;
                ca_committed = true;
            } else {
                reload_for.get_or_insert(
                    "a new CA: runtime CA updates break HAProxy before 3.3 (bug #3165)",
                );
                ca_wanted = Some((ca_file.as_path(), wanted));
            }
        }
    }
    let Some(why) = reload_for else {
        return Ok(if ca_committed {
            Pushed::CertAndCa
        } else {
            Pushed::Cert
        });
    };
    let Some(master) = &target.master_socket else {
        let version = before.version_text;
        return Err(if !cert_pending {
            HaproxyError::CaNeedsReload {
                version,
                file: target
                    .ca_file
                    .as_ref()
                    .map(|f| f.display().to_string())
                    .unwrap_or_default(),
            }
        } else {
            HaproxyError::CertNeedsReload {
                version,
                file: target.cert.display().to_string(),
            }
        });
    };
    let ca_check = ca_wanted.as_ref().map(|(file, wanted)| (*file, wanted));
    let new_pid = haproxy::reload(master, socket, before.pid, ca_check).await?;
    Ok(Pushed::Reloaded {
        old_pid: before.pid,
        new_pid,
        why,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::helper::haproxy::tests::fake_haproxy;

    fn spiffe_only() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://example.org/web".try_into().unwrap(),
        )];
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), format!("{}{}", cert.pem(), key.serialize_pem()))
    }

    fn target(socket: &std::path::Path, master: Option<PathBuf>) -> HaproxyTarget {
        HaproxyTarget {
            socket: Some(socket.to_path_buf()),
            master_socket: master,
            cert: "/etc/haproxy/svid.pem".into(),
            ca_file: Some("/etc/haproxy/bundle.pem".into()),
        }
    }

    fn ca_answer(pem: &str) -> String {
        let lines: String = haproxy::pem_fingerprints(pem)
            .iter()
            .map(|f| format!("Certificate #1:\nSHA1 FingerPrint: {f}\n"))
            .collect();
        format!("Filename: /etc/haproxy/bundle.pem\nStatus: Used\n{lines}\n")
    }

    #[tokio::test]
    async fn an_unchanged_bundle_is_not_committed() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let (ca, cert) = spiffe_only();
        let server = fake_haproxy(
            &socket,
            vec![
                "Name: HAProxy\nVersion: 3.3.0\nPid: 42\n".into(),
                "Transaction created for certificate /etc/haproxy/svid.pem!\n".into(),
                "Committing /etc/haproxy/svid.pem.\nSuccess!\n".into(),
                ca_answer(&ca),
            ],
        );
        let pushed = push(&socket, &target(&socket, None), &cert, &ca)
            .await
            .unwrap();
        assert_eq!(pushed, Pushed::Cert);
        let commands = server.await.unwrap();
        assert!(commands[3].starts_with("show ssl ca-file"), "{commands:?}");
    }

    #[tokio::test]
    async fn haproxy_2_6_gets_no_commit_of_a_nameless_svid_nor_of_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let (_, cert) = spiffe_only();
        let (other_ca, _) = spiffe_only();
        let server = fake_haproxy(
            &socket,
            vec![
                "Name: HAProxy\nVersion: 2.6.12-1+deb12u4\nPid: 42\n".into(),
                "Filename: /etc/haproxy/svid.pem\nSerial: 01\n".into(),
                ca_answer(&other_ca),
            ],
        );
        let e = push(&socket, &target(&socket, None), &cert, &cert)
            .await
            .unwrap_err();
        assert!(matches!(e, HaproxyError::CertNeedsReload { .. }), "{e}");
        let commands = server.await.unwrap();
        assert!(
            commands
                .iter()
                .all(|c| !c.starts_with("set ") && !c.starts_with("commit ")),
            "{commands:?}"
        );
    }
}
