//! `svid fetch` and `svid watch`: SVIDs on disk for the proxies people
//! already run (HAProxy, nginx, stunnel), replacing the cron job around
//! `spire-agent api fetch x509 -write` and spiffe-helper.
//!
//! Both stream from the Workload API like the tunnel does, validate each
//! response as a whole (the same checks as the tunnel's own identity), and
//! write it with SPIRE's file names through [`files`], atomically. `watch`
//! then runs the configured follow-ups: a command, a signal to a process,
//! and a push into a running HAProxy ([`pusher`] decides what to send,
//! [`haproxy`] speaks its runtime API).

pub mod files;
pub mod haproxy;
mod pusher;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::identity::workload_api::{identity_from_response, request, ApiAddress, MAX_BACKOFF};
use crate::identity::Identity;
use crate::proto::{X509svidRequest, X509svidResponse};
use crate::spiffe_id::SpiffeId;
use files::{FileSpec, CERT_MODE, KEY_MODE};
use haproxy::HaproxyTarget;

/// Why fetching or writing SVIDs failed.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("{0}")]
    Api(#[from] crate::identity::workload_api::WorkloadApiError),
    #[error("the Workload API at {address} issued no identity to this process ({message}); is there a registration entry for it?")]
    NoIdentity { address: String, message: String },
    #[error("no usable answer from the Workload API at {address} within {timeout}: {last_error}")]
    Timeout {
        address: String,
        timeout: String,
        last_error: String,
    },
    #[error("the Workload API response has no SVID for {0}")]
    NoSuchSvid(String),
    #[error("writing: {0}")]
    Write(#[from] files::WriteError),
}

impl HelperError {
    pub fn exit_code(&self) -> u8 {
        match self {
            HelperError::Api(crate::identity::workload_api::WorkloadApiError::BadAddress(_)) => 2,
            _ => 1,
        }
    }
}

/// What `svid fetch` / `svid watch` do.
#[derive(Debug, Clone)]
pub struct HelperOptions {
    pub dir: PathBuf,
    pub socket: Option<String>,
    /// Only this SVID (written as `svid.0.*`); default: all of them.
    pub id: Option<SpiffeId>,
    /// A shell command run after each update.
    pub exec: Option<String>,
    /// A signal name (HUP, USR1, ...) and the pid file of who gets it.
    pub signal: Option<(String, PathBuf)>,
    pub haproxy: Option<HaproxyTarget>,
    /// Stop after the first update (`fetch`).
    pub once: bool,
    /// `fetch`: how long to keep trying for a first answer.
    pub timeout: Duration,
}

/// The files of one update, and what HAProxy gets.
struct Rendered {
    files: Vec<FileSpec>,
    summary: String,
    haproxy_cert: Option<String>,
    haproxy_ca: String,
}

/// PEM blocks as SPIRE and OpenSSL write them: LF line endings and no
/// blank line between blocks (`pem::encode_many` uses CRLF and separates
/// blocks with an empty line, which would end an HAProxy runtime API
/// payload early for anyone piping these files into the stats socket).
fn pem_of(tag: &str, ders: impl IntoIterator<Item = Vec<u8>>) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    ders.into_iter()
        .map(|d| pem::encode_config(&pem::Pem::new(tag, d), config))
        .collect()
}

/// Lays a validated response out with SPIRE's names: `svid.N.pem` (chain,
/// leaf first), `svid.N.key` (PKCS#8), `bundle.N.pem` (the bundle of SVID
/// N's trust domain) and `federated_bundle.<td>.pem`.
fn render(
    response: &X509svidResponse,
    identity: &Identity,
    only: Option<&SpiffeId>,
) -> Result<Rendered, HelperError> {
    let chosen: Vec<usize> = match only {
        Some(id) => vec![identity
            .svids
            .iter()
            .position(|s| &s.id == id)
            .ok_or_else(|| HelperError::NoSuchSvid(id.to_string()))?],
        None => (0..identity.svids.len()).collect(),
    };
    let mut files = Vec::new();
    let mut names = Vec::new();
    let mut haproxy_cert = None;
    for (n, &i) in chosen.iter().enumerate() {
        let svid = &identity.svids[i];
        let chain = pem_of("CERTIFICATE", svid.chain().iter().map(|c| c.to_vec()));
        let key = pem_of("PRIVATE KEY", [response.svids[i].x509_svid_key.clone()]);
        let bundle = identity
            .bundles
            .get(svid.id.trust_domain())
            .map(|b| pem_of("CERTIFICATE", b.certs.iter().map(|c| c.to_vec())))
            .unwrap_or_default();
        if n == 0 {
            haproxy_cert = Some(format!("{chain}{key}"));
        }
        files.push(FileSpec {
            name: format!("svid.{n}.pem"),
            contents: chain.into_bytes(),
            mode: CERT_MODE,
        });
        files.push(FileSpec {
            name: format!("svid.{n}.key"),
            contents: key.into_bytes(),
            mode: KEY_MODE,
        });
        files.push(FileSpec {
            name: format!("bundle.{n}.pem"),
            contents: bundle.into_bytes(),
            mode: CERT_MODE,
        });
        names.push(format!("{} (serial {})", svid.id, svid.serial));
    }
    let own: Vec<_> = chosen
        .iter()
        .map(|&i| identity.svids[i].id.trust_domain().clone())
        .collect();
    let mut haproxy_ca = String::new();
    for bundle in identity.bundles.iter() {
        let pem = pem_of("CERTIFICATE", bundle.certs.iter().map(|c| c.to_vec()));
        haproxy_ca.push_str(&pem);
        if !own.contains(&bundle.trust_domain) {
            files.push(FileSpec {
                name: format!("federated_bundle.{}.pem", bundle.trust_domain),
                contents: pem.into_bytes(),
                mode: CERT_MODE,
            });
        }
    }
    Ok(Rendered {
        files,
        summary: names.join(", "),
        haproxy_cert,
        haproxy_ca,
    })
}

/// `svid fetch`: one update, then exit.
pub async fn fetch(options: HelperOptions) -> Result<(), HelperError> {
    run(HelperOptions {
        once: true,
        ..options
    })
    .await
}

/// `svid watch`: every update until stopped.
pub async fn run(options: HelperOptions) -> Result<(), HelperError> {
    let address = ApiAddress::choose(options.socket.as_deref(), None)?;
    let provider = crate::tls::config::provider();
    let (pusher, pushes) = watch::channel::<Option<pusher::Update>>(None);
    if let Some(target) = options.haproxy.as_ref().filter(|_| !options.once) {
        if let Some(socket) = &target.socket {
            tokio::spawn(pusher::push_to_haproxy(
                socket.clone(),
                target.clone(),
                pushes,
            ));
        }
    }
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        let last_error = match stream_once(&address, &options, &provider, &pusher).await {
            Ok(()) => return Ok(()),
            Err(StreamError::Fatal(e)) => return Err(e),
            Err(StreamError::NoIdentity(message)) => {
                if options.once {
                    return Err(HelperError::NoIdentity {
                        address: address.to_string(),
                        message,
                    });
                }
                error!(address = %address, error = %message, "no identity issued to this process; retrying");
                message
            }
            Err(StreamError::Retry(message, got_message)) => {
                if got_message {
                    backoff = Duration::from_millis(200);
                }
                warn!(address = %address, error = %message, retry_in = ?backoff, "Workload API unavailable; the files on disk stay as they are");
                message
            }
        };
        if options.once && started.elapsed() + backoff > options.timeout {
            return Err(HelperError::Timeout {
                address: address.to_string(),
                timeout: humantime::format_duration(options.timeout).to_string(),
                last_error,
            });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

enum StreamError {
    Fatal(HelperError),
    NoIdentity(String),
    /// Message, and whether any update arrived before the failure.
    Retry(String, bool),
}

async fn stream_once(
    address: &ApiAddress,
    options: &HelperOptions,
    provider: &rustls::crypto::CryptoProvider,
    pusher: &watch::Sender<Option<pusher::Update>>,
) -> Result<(), StreamError> {
    let mut client = address
        .connect()
        .await
        .map_err(|e| StreamError::Retry(e.to_string(), false))?;
    let classify = |status: tonic::Status, got: bool| match status.code() {
        tonic::Code::PermissionDenied => StreamError::NoIdentity(status.message().to_string()),
        code => StreamError::Retry(format!("{code:?}: {}", status.message()), got),
    };
    let mut stream = client
        .fetch_x509svid(request(X509svidRequest {}))
        .await
        .map_err(|s| classify(s, false))?
        .into_inner();
    let mut got = false;
    loop {
        let response = match stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return Err(StreamError::Retry("the stream ended".into(), got)),
            Err(status) => return Err(classify(status, got)),
        };
        got = true;
        let identity = match identity_from_response(response.clone(), provider, SystemTime::now()) {
            Ok(identity) => identity,
            Err(e) => {
                error!(error = %e, "Workload API response refused; the files on disk stay as they are");
                continue;
            }
        };
        let rendered =
            render(&response, &identity, options.id.as_ref()).map_err(StreamError::Fatal)?;
        files::write_set(&options.dir, &rendered.files)
            .map_err(|e| StreamError::Fatal(e.into()))?;
        if let (Some(target), Some(cert)) = (&options.haproxy, &rendered.haproxy_cert) {
            files::write_file(&target.cert, cert.as_bytes(), KEY_MODE)
                .map_err(|e| StreamError::Fatal(e.into()))?;
            if let Some(ca) = &target.ca_file {
                files::write_file(ca, rendered.haproxy_ca.as_bytes(), CERT_MODE)
                    .map_err(|e| StreamError::Fatal(e.into()))?;
            }
            pusher.send_replace(Some((cert.clone(), rendered.haproxy_ca.clone())));
        }
        info!(dir = %options.dir.display(), svids = %rendered.summary, "SVIDs written");
        if options.once {
            return Ok(());
        }
        after_update(options).await;
    }
}

/// Runs `--exec` and sends `--signal`, logging how each went.
async fn after_update(options: &HelperOptions) {
    if let Some(cmd) = &options.exec {
        match tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .env("SVID_DIR", &options.dir)
            .status()
            .await
        {
            Ok(status) if status.success() => info!(command = %cmd, "--exec command succeeded"),
            Ok(status) => warn!(command = %cmd, status = %status, "--exec command failed"),
            Err(e) => warn!(command = %cmd, error = %e, "--exec command could not run"),
        }
    }
    if let Some((signal, pid_file)) = &options.signal {
        match signal_pid_file(signal, pid_file).await {
            Ok(pid) => info!(signal = %signal, pid, "signal sent"),
            Err(e) => {
                warn!(signal = %signal, pid_file = %pid_file.display(), error = %e, "could not send the signal")
            }
        }
    }
}

/// Sends `signal` to the pid in `pid_file` with `kill(1)`, which keeps this
/// crate free of `unsafe`.
async fn signal_pid_file(signal: &str, pid_file: &Path) -> Result<u32, String> {
    let text = tokio::fs::read_to_string(pid_file)
        .await
        .map_err(|e| e.to_string())?;
    let pid: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a pid"))?;
    let status = tokio::process::Command::new("kill")
        .arg("-s")
        .arg(signal.trim_start_matches("SIG"))
        .arg(pid.to_string())
        .status()
        .await
        .map_err(|e| format!("kill: {e}"))?;
    if status.success() {
        Ok(pid)
    } else {
        Err(format!("kill exited with {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_files_look_like_spire_writes_them() {
        let text = pem_of("CERTIFICATE", [vec![1u8; 100], vec![2u8; 100]]);
        assert!(!text.contains('\r'), "CRLF line endings");
        assert!(!text.contains("\n\n"), "an empty line between blocks");
        assert_eq!(text.matches("-----BEGIN CERTIFICATE-----\n").count(), 2);
        assert!(text.ends_with("-----END CERTIFICATE-----\n"));
    }
}
