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
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A stats socket answering each connection (one command each, as the
    /// runtime API's non-interactive mode) with the next scripted answer;
    /// the task returns the commands it received.
    fn fake_haproxy(
        socket: &Path,
        answers: Vec<&'static str>,
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
                "transaction created for CA /etc/haproxy/bundle.pem!\n\n",
                "Committing /etc/haproxy/bundle.pem\nSuccess!\n\n",
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
                "Can't update the certificate!\nOperations on certificates are currently locked!\n\n",
                "No ongoing transaction!\n\n",
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
                "Can't replace a certificate which is not referenced by the configuration!\nCan't update /etc/haproxy/other.pem!\n\n",
                "No ongoing transaction!\n\n",
            ],
        );
        let e = update_cert(&socket, Path::new("/etc/haproxy/other.pem"), PEM)
            .await
            .unwrap_err();
        assert!(matches!(e, HaproxyError::Unknown { .. }), "{e}");
        assert!(!e.is_transient());
    }
}
