//! Pushing new certificates into a running HAProxy through its runtime API
//! (the stats socket), so it presents each new SVID without a reload.
//!
//! A certificate update is a transaction: `set ssl cert FILE <<` with the
//! new PEM (chain and key), then `commit ssl cert FILE`; a CA file the same
//! with `set/commit ssl ca-file`. FILE must be the path HAProxy loaded at
//! start (a `crt` on a `bind` or `server` line, or a `ca-file`): HAProxy
//! knows certificates by that name. On any refusal the transaction is
//! aborted so the next attempt starts clean. Each command uses its own
//! connection, the socket's non-interactive mode.
//!
//! This module also owns what the pusher needs to know before it commits a
//! CA file: HAProxy's version (`show info`), the CA certificates HAProxy
//! holds (`show ssl ca-file FILE`, by SHA-1 fingerprint, as HAProxy lists
//! them), and the master CLI's `reload`. HAProxy before 3.3.0 has bug
//! #3165: a `commit ssl ca-file` rebuilds every TLS context that uses the
//! CA file but leaves the new contexts out of their certificate's list, so
//! later `commit ssl cert`s answer "Success!" without changing what
//! HAProxy presents, and free the certificate those contexts still point
//! to; the next `commit ssl ca-file` then dereferences it and HAProxy dies
//! (SIGSEGV). [`Version::has_ca_commit_bug`] says which versions.
//!
//! HAProxy before 3.0 has a worse one: it rebuilds a `bind` line's TLS
//! context on a commit but applies the line's settings (`verify required`,
//! `ca-file`, `ssl-min-ver`, ...) only to contexts reached through an SNI
//! name, and a certificate with neither a CN nor a DNS name has none (an
//! X509-SVID from SPIRE has neither by default). After one `commit ssl
//! cert` of such a certificate, that `bind` line accepts any client, with
//! or without a certificate. [`Version::drops_bind_settings_of_nameless`]
//! and [`has_sni_name`] say when; the pusher then reloads instead.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Where and what to update in HAProxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HaproxyTarget {
    /// The stats socket (`stats socket PATH level admin`); without one the
    /// files are written but nothing is pushed.
    pub socket: Option<PathBuf>,
    /// The master CLI (`haproxy -W -S PATH`; Debian's unit has
    /// `/run/haproxy-master.sock`): where a new CA goes on an HAProxy whose
    /// runtime CA updates are broken, as a `reload`.
    pub master_socket: Option<PathBuf>,
    /// The `crt` file, as named in HAProxy's config: chain plus key.
    pub cert: PathBuf,
    /// The `ca-file`, as named in HAProxy's config: the trust bundle.
    pub ca_file: Option<PathBuf>,
}

/// Why an update did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    #[error("HAProxy runtime API at {socket} is not reachable ({source}); is HAProxy running with `stats socket {socket} level admin`?")]
    Unreachable {
        socket: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HAProxy does not know {kind} {file:?}: it must appear in its config exactly so (as `crt {file}` or `ca-file {file}`); HAProxy said: {answer}")]
    Unknown {
        kind: &'static str,
        file: String,
        answer: String,
    },
    #[error("HAProxy refused `{command}` (transaction aborted): {answer}")]
    Refused { command: String, answer: String },
    #[error(
        "HAProxy is busy with another certificate operation and did not take `{command}`: {answer}"
    )]
    Busy { command: String, answer: String },
    #[error("HAProxy {version} cannot take a new CA file at runtime: `commit ssl ca-file` makes it stop applying certificate updates and crash at the next CA update (HAProxy bug #3165, fixed in 3.3.0). The new bundle is written to {file:?}, and HAProxy keeps the CAs it has until it is reloaded: reload it (`systemctl reload haproxy`), or give `--haproxy-master-socket` (HAProxy run with `-W -S PATH`) so that svid watch reloads it itself")]
    CaNeedsReload { version: String, file: String },
    #[error("HAProxy {version} cannot take this SVID at runtime: it has no DNS name (nor CN), and a `commit ssl cert` of such a certificate makes HAProxy before 3.0 drop the settings of a `bind` line that uses it, `verify required` included, so that line would let in any client. The new SVID is written to {file:?} and HAProxy keeps presenting the one it has: give `--haproxy-master-socket` (HAProxy run with `-W -S PATH`) so that svid watch reloads HAProxy for each new SVID, or reload it yourself (`systemctl reload haproxy`), or use HAProxy 3.0 or later")]
    CertNeedsReload { version: String, file: String },
    #[error("HAProxy's master CLI at {master} took `reload`, but no new worker holding the new files answered on {socket} within {waited:?} (a config error keeps the old worker: see HAProxy's log, and `show proc` on the master CLI counts failed reloads); last seen: {last}")]
    ReloadFailed {
        master: String,
        socket: String,
        waited: Duration,
        last: String,
    },
    #[error("HAProxy's `{command}` answer has no {what}: {answer}")]
    Unparsable {
        command: String,
        what: &'static str,
        answer: String,
    },
}

impl HaproxyError {
    /// Worth retrying later (HAProxy may be starting or restarting, or
    /// busy with another certificate operation).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HaproxyError::Unreachable { .. } | HaproxyError::Busy { .. }
        )
    }
}

/// HAProxy refuses certificate commands while another one holds its
/// certificate lock ("Operations on certificates are currently locked!",
/// e.g. during a commit or a `show ssl cert`), and allows one transaction
/// at a time ("The ongoing transaction is about ..."): both pass.
fn is_busy(lower_answer: &str) -> bool {
    lower_answer.contains("currently locked")
        || lower_answer.contains("ongoing transaction is about")
}

/// Sends one command and returns HAProxy's whole answer.
async fn command(socket: &Path, text: &str) -> Result<String, HaproxyError> {
    let unreachable = |source| HaproxyError::Unreachable {
        socket: socket.display().to_string(),
        source,
    };
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await?;
        stream.write_all(text.as_bytes()).await?;
        stream.shutdown().await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(answer)) => Ok(answer.trim().to_string()),
        Ok(Err(e)) => Err(unreachable(e)),
        Err(_) => Err(unreachable(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer within 10 s",
        ))),
    }
}

/// HAProxy's release, as `show info` gives it (`Version: 2.6.12-1+deb12u4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    /// `2.6.12-1+deb12u4` -> 2.6.12; `3.3-dev5` -> 3.3.0; `None` when it
    /// does not start with `MAJOR.MINOR`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('.');
        let number = |part: Option<&str>| -> Option<u32> {
            let digits: String = part?.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        let major = number(parts.next())?;
        let minor = number(parts.next())?;
        Some(Version {
            major,
            minor,
            patch: number(parts.next()).unwrap_or(0),
        })
    }

    /// Whether `commit ssl ca-file` leaves HAProxy broken (bug #3165). The
    /// fix is in 3.3.0; it was to be backported to the stable branches,
    /// but which of their releases carry it cannot be told from here, so
    /// every release before 3.3 counts as affected: for one that has the
    /// fix this costs a reload where a commit would do, never a crash.
    pub fn has_ca_commit_bug(&self) -> bool {
        (self.major, self.minor) < (3, 3)
    }

    /// Whether a runtime certificate commit leaves a `bind` line without
    /// its settings when the certificate has no SNI name (fixed in 3.0 by
    /// "generate '*' SNI filters for default certificates", 0bf9d122a).
    pub fn drops_bind_settings_of_nameless(&self) -> bool {
        (self.major, self.minor) < (3, 0)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Who answers on the stats socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// The process serving the stats socket (the worker, in master-worker
    /// mode): it changes when HAProxy is reloaded.
    pub pid: u32,
    /// The release as HAProxy spells it.
    pub version_text: String,
    /// `None` when the release is not in a form we know.
    pub version: Option<Version>,
}

/// `show info`: the pid and release of the process on the stats socket.
pub async fn info(socket: &Path) -> Result<Info, HaproxyError> {
    let answer = command(socket, "show info\n").await?;
    let field = |name: &str| {
        answer
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let unparsable = |what| HaproxyError::Unparsable {
        command: "show info".into(),
        what,
        answer: answer.clone(),
    };
    let pid = field("Pid:")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| unparsable("Pid"))?;
    let version_text = field("Version:").ok_or_else(|| unparsable("Version"))?;
    Ok(Info {
        pid,
        version: Version::parse(&version_text),
        version_text,
    })
}

/// The SHA-1 fingerprints (upper-case hex, as HAProxy prints them) of the
/// CA certificates HAProxy holds for the `ca-file` `file`.
pub async fn ca_file_fingerprints(
    socket: &Path,
    file: &Path,
) -> Result<BTreeSet<String>, HaproxyError> {
    let name = file.display().to_string();
    let show = format!("show ssl ca-file {name}");
    let answer = command(socket, &format!("{show}\n")).await?;
    let lower = answer.to_lowercase();
    if is_busy(&lower) {
        return Err(HaproxyError::Busy {
            command: show,
            answer,
        });
    }
    let fingerprints: BTreeSet<String> = answer
        .lines()
        .filter_map(|l| l.trim().strip_prefix("SHA1 FingerPrint:"))
        .map(|f| f.trim().to_uppercase())
        .collect();
    if fingerprints.is_empty() {
        if lower.contains("not found") || lower.contains("unknown") || lower.contains("can't") {
            return Err(HaproxyError::Unknown {
                kind: "CA file",
                file: name,
                answer,
            });
        }
        return Err(HaproxyError::Unparsable {
            command: show,
            what: "SHA1 FingerPrint",
            answer,
        });
    }
    Ok(fingerprints)
}

/// The SHA-1 fingerprints of the certificates in `pem`, spelled as
/// [`ca_file_fingerprints`] gets them from HAProxy.
pub fn pem_fingerprints(pem: &str) -> BTreeSet<String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|der| {
            let digest =
                aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &der);
            digest.as_ref().iter().map(|b| format!("{b:02X}")).collect()
        })
        .collect()
}

/// Whether HAProxy finds an SNI name in the leaf (the first certificate of
/// `pem`): a DNS name, or a CN. Unparsable counts as none.
pub fn has_sni_name(pem: &str) -> bool {
    use rustls_pki_types::pem::PemObject;
    use x509_parser::extensions::GeneralName;
    let Some(Ok(der)) = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).next()
    else {
        return false;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
        return false;
    };
    let dns = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value
                .general_names
                .iter()
                .any(|n| matches!(n, GeneralName::DNSName(_)))
        });
    dns || cert.subject().iter_common_name().next().is_some()
}

/// The serial (upper-case hex, no leading zeros) of the certificate
/// HAProxy holds for `file` (`show ssl cert FILE`).
pub async fn cert_serial(socket: &Path, file: &Path) -> Result<String, HaproxyError> {
    let show = format!("show ssl cert {}", file.display());
    let answer = command(socket, &format!("{show}\n")).await?;
    if is_busy(&answer.to_lowercase()) {
        return Err(HaproxyError::Busy {
            command: show,
            answer,
        });
    }
    answer
        .lines()
        .find_map(|l| l.strip_prefix("Serial:"))
        .map(|s| normal_serial(s.trim()))
        .ok_or(HaproxyError::Unparsable {
            command: show,
            what: "Serial",
            answer,
        })
}

/// The serial of the leaf of `pem`, spelled as [`cert_serial`] gets it.
pub fn pem_serial(pem: &str) -> Option<String> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let hex: String = cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    Some(normal_serial(&hex))
}

fn normal_serial(hex: &str) -> String {
    hex.replace(':', "")
        .to_uppercase()
        .trim_start_matches('0')
        .to_string()
}

/// Asks HAProxy's master to reload, then waits until a new worker (a pid
/// other than `old_pid`) answers on the stats socket, holding `wanted`
/// for the `ca-file` `ca_file` when given. The new worker reads every
/// file from disk, so it starts with the current certificate and CAs, and
/// in master-worker mode it takes the listening sockets over from the old
/// one, which finishes the connections it has.
pub async fn reload(
    master: &Path,
    socket: &Path,
    old_pid: u32,
    ca_file: Option<(&Path, &BTreeSet<String>)>,
) -> Result<u32, HaproxyError> {
    // The master execs itself at once, closing this connection without
    // an answer (2.6 reports nothing here; later releases print the
    // outcome, which the wait below judges anyway).
    command(master, "reload\n").await?;
    let waited = RELOAD_TIMEOUT;
    let deadline = tokio::time::Instant::now() + waited;
    loop {
        let last = match info(socket).await {
            Ok(now) if now.pid != old_pid => match ca_file {
                None => return Ok(now.pid),
                Some((file, wanted)) => match ca_file_fingerprints(socket, file).await {
                    Ok(held) if &held == wanted => return Ok(now.pid),
                    Ok(held) => format!("worker {} holds CAs {held:?}", now.pid),
                    Err(e) => e.to_string(),
                },
            },
            Ok(now) => format!("still the old worker {}", now.pid),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(HaproxyError::ReloadFailed {
                master: master.display().to_string(),
                socket: socket.display().to_string(),
                waited,
                last,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a new worker may take to answer after `reload`.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Replaces the certificate HAProxy loaded from `file` with `pem` (chain
/// and key) on every `bind` and `server` line that uses it.
pub async fn update_cert(socket: &Path, file: &Path, pem: &str) -> Result<(), HaproxyError> {
    transaction(socket, "cert", "certificate", file, pem).await
}

/// Replaces the CA file HAProxy loaded from `file` with `pem`.
pub async fn update_ca_file(socket: &Path, file: &Path, pem: &str) -> Result<(), HaproxyError> {
    transaction(socket, "ca-file", "CA file", file, pem).await
}

async fn transaction(
    socket: &Path,
    object: &'static str,
    kind: &'static str,
    file: &Path,
    pem: &str,
) -> Result<(), HaproxyError> {
    let name = file.display().to_string();
    // The payload ends at the first empty line, so the PEM must hold none.
    let payload: String = pem
        .lines()
        .filter(|l| !l.trim().is_empty())
        .flat_map(|l| [l, "\n"])
        .collect();
    let set = format!("set ssl {object} {name} <<\n{payload}\n");
    let answer = command(socket, &set).await?;
    // HAProxy 2.6 says "Transaction created for certificate ..." but
    // "transaction created for CA ...": compare without case.
    let lower = answer.to_lowercase();
    if !lower.contains("transaction created") && !lower.contains("transaction updated") {
        abort(socket, object, &name).await;
        if is_busy(&lower) {
            return Err(HaproxyError::Busy {
                command: format!("set ssl {object} {name}"),
                answer,
            });
        }
        if lower.contains("not referenced")
            || lower.contains("unknown")
            || lower.contains("unable to find")
            || lower.contains("doesn't exist")
        {
            return Err(HaproxyError::Unknown {
                kind,
                file: name,
                answer,
            });
        }
        return Err(HaproxyError::Refused {
            command: format!("set ssl {object} {name}"),
            answer,
        });
    }
    let commit = format!("commit ssl {object} {name}\n");
    let answer = command(socket, &commit).await?;
    if !answer.contains("Success") {
        abort(socket, object, &name).await;
        let command = commit.trim().to_string();
        if is_busy(&answer.to_lowercase()) {
            return Err(HaproxyError::Busy { command, answer });
        }
        return Err(HaproxyError::Refused { command, answer });
    }
    Ok(())
}

async fn abort(socket: &Path, object: &str, name: &str) {
    let _ = command(socket, &format!("abort ssl {object} {name}\n")).await;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A stats socket answering each connection (one command each, as the
    /// runtime API's non-interactive mode) with the next scripted answer;
    /// the task returns the commands it received.
    pub(crate) fn fake_haproxy(
        socket: &Path,
        answers: Vec<String>,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(socket).unwrap();
        tokio::spawn(async move {
            let mut commands = Vec::new();
            for answer in answers {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut command = String::new();
                stream.read_to_string(&mut command).await.unwrap();
                commands.push(command);
                stream.write_all(answer.as_bytes()).await.unwrap();
            }
            commands
        })
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\r\nAAAA\r\n-----END CERTIFICATE-----\r\n\r\n-----BEGIN CERTIFICATE-----\r\nBBBB\r\n-----END CERTIFICATE-----\r\n";

    #[tokio::test]
    async fn a_ca_file_transaction_as_haproxy_2_6_answers_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        // HAProxy 2.6's exact answers: lower-case "transaction" for CA files.
        let server = fake_haproxy(
            &socket,
            vec![
                "transaction created for CA /etc/haproxy/bundle.pem!\n\n".into(),
                "Committing /etc/haproxy/bundle.pem\nSuccess!\n\n".into(),
            ],
        );
        update_ca_file(&socket, Path::new("/etc/haproxy/bundle.pem"), PEM)
            .await
            .unwrap();
        let commands = server.await.unwrap();
        // The payload has no empty line (that would end it) and ends with one.
        assert_eq!(
            commands[0],
            "set ssl ca-file /etc/haproxy/bundle.pem <<\n-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n\n"
        );
        assert_eq!(commands[1], "commit ssl ca-file /etc/haproxy/bundle.pem\n");
    }

    #[tokio::test]
    async fn a_locked_certificate_store_is_retried_not_refused() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let server = fake_haproxy(
            &socket,
            vec![
                "Can't update the certificate!\nOperations on certificates are currently locked!\n\n".into(),
                "No ongoing transaction!\n\n".into(),
            ],
        );
        let e = update_cert(&socket, Path::new("/etc/haproxy/svid.pem"), PEM)
            .await
            .unwrap_err();
        assert!(matches!(e, HaproxyError::Busy { .. }), "{e}");
        assert!(e.is_transient());
        let commands = server.await.unwrap();
        assert_eq!(commands[1], "abort ssl cert /etc/haproxy/svid.pem\n");
    }

    #[tokio::test]
    async fn a_certificate_haproxy_does_not_know_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("admin.sock");
        let _server = fake_haproxy(
            &socket,
            vec![
                "Can't replace a certificate which is not referenced by the configuration!\nCan't update /etc/haproxy/other.pem!\n\n".into(),
                "No ongoing transaction!\n\n".into(),
            ],
        );
        let e = update_cert(&socket, Path::new("/etc/haproxy/other.pem"), PEM)
            .await
            .unwrap_err();
        assert!(matches!(e, HaproxyError::Unknown { .. }), "{e}");
        assert!(!e.is_transient());
    }

    #[test]
    fn versions_as_haproxy_spells_them() {
        let debian = Version::parse("2.6.12-1+deb12u4").unwrap();
        assert_eq!(debian.to_string(), "2.6.12");
        assert!(debian.has_ca_commit_bug() && debian.drops_bind_settings_of_nameless());
        let dev = Version::parse("3.3-dev5").unwrap();
        assert_eq!(dev.to_string(), "3.3.0");
        assert!(!dev.has_ca_commit_bug() && !dev.drops_bind_settings_of_nameless());
        let lts = Version::parse("3.0.11").unwrap();
        assert!(lts.has_ca_commit_bug() && !lts.drops_bind_settings_of_nameless());
        assert_eq!(Version::parse("unknown"), None);
    }

    #[test]
    fn a_spiffe_only_certificate_has_no_sni_name() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://example.org/web".try_into().unwrap(),
        )];
        let spiffe_only = params.self_signed(&key).unwrap().pem();
        assert!(!has_sni_name(&spiffe_only));
        params.subject_alt_names.push(rcgen::SanType::DnsName(
            "web.example.org".try_into().unwrap(),
        ));
        assert!(has_sni_name(&params.self_signed(&key).unwrap().pem()));
        let mut named = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        named
            .distinguished_name
            .push(rcgen::DnType::CommonName, "web");
        assert!(has_sni_name(&named.self_signed(&key).unwrap().pem()));
        assert!(!has_sni_name("not a certificate"));
    }
}
