//! Identity from the SPIFFE Workload API: a streaming client of the local
//! SPIRE agent (or any Workload API server) with a reconnecting supervisor.
//!
//! Built directly on a tonic client generated from `proto/workload.proto`
//! rather than on the `spiffe` crate's `X509Source`: the supervisor needs to
//! tell the gRPC status codes apart (PermissionDenied withdraws the identity,
//! InvalidArgument is a misconfiguration, anything else keeps the cached SVID
//! until it expires), to validate a response as a whole before publishing
//! it, and to report its state to metrics and `/status`. Owning the loop
//! makes each of those a few lines instead of a fight with an abstraction.
//!
//! Every response replaces the whole identity: our SVIDs (the first is the
//! default), our trust domain's bundle, and the federated bundles, so a
//! federated trust domain that disappears from a response is dropped.
//!
//! What real SPIRE sends, and this client therefore accepts: several SVIDs
//! with one SPIFFE ID (one per matching entry), each with the entry's
//! `hint`, in entry-ID order (stable, but meaningless); a federated trust
//! domain with only JWT keys as an empty X.509 bundle; federated bundles
//! only for entries with `-federatesWith`. A response refused for a reason
//! that time cures (an SVID not yet valid because the server's clock runs
//! ahead) is checked again when it would become valid, not only when the
//! next message comes, which may be half an SVID lifetime later.
//!
//! A connection whose peer silently went away (a half-open TCP connection
//! to an agent on another host, a frozen agent) would otherwise wait for
//! the next message for ever while the SVID runs out; [`Keepalive`] makes
//! it fail, so the supervisor reconnects.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use tracing::{debug, error, info, warn};

use super::{
    split_der_certificates, BundleSet, Identity, IdentityError, IdentityStore, Svid, TrustBundle,
};
use crate::metrics::Metrics;
use crate::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use crate::proto::{X509svidRequest, X509svidResponse, SECURITY_HEADER};
use crate::spiffe_id::{self, TrustDomain};

/// The address used when neither `--socket`, the config nor
/// `SPIFFE_ENDPOINT_SOCKET` name one: SPIRE's default agent socket.
pub const DEFAULT_ADDRESS: &str = "unix:///tmp/spire-agent/public/api.sock";

/// The environment variable of the SPIFFE Workload Endpoint spec.
pub const ENDPOINT_ENV: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Longest wait between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait after "no identity issued": SPIRE's agent syncs with its
/// server every 5 s by default, so asking more often would rarely change
/// the answer, and asking less often would add to the time a re-created
/// entry (or an SVID re-signed after a CA taint) takes to be served.
pub const WITHDRAWN_MAX_BACKOFF: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// How long after a refused response's "valid from" it is checked again,
/// so the check falls after that second has begun.
const RETRY_MARGIN: Duration = Duration::from_millis(50);

/// How a Workload API connection notices that its peer is gone.
///
/// HTTP/2 PINGs (both transports) go no more often than every 5 minutes
/// by default: SPIRE's agent, like every grpc-go server, allows a client
/// one PING per 5 minutes and answers more with GOAWAY `too_many_pings`.
/// A PING is sent only after that long without any frame from the agent,
/// and one unanswered for `http2_timeout` closes the connection. Over
/// `tcp://`, TCP keepalive probes an idle connection sooner, and
/// `TCP_USER_TIMEOUT` aborts one whose sent data (a PING among it) is not
/// acknowledged, so a dead host is noticed within about a minute of the
/// last sign of life when idle, and `http2_timeout` after a PING at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// An HTTP/2 PING after this long without a frame from the agent.
    pub http2_interval: Duration,
    /// A PING not answered within this closes the connection.
    pub http2_timeout: Duration,
    /// `tcp://` only: TCP keepalive probes after this long idle...
    pub tcp_idle: Duration,
    /// ...every this long...
    pub tcp_interval: Duration,
    /// ...and the connection is dead after this many unanswered.
    pub tcp_probes: u32,
    /// `tcp://` only: sent data unacknowledged for this long aborts the
    /// connection (`TCP_USER_TIMEOUT`).
    pub tcp_user_timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            http2_interval: Duration::from_secs(5 * 60),
            http2_timeout: Duration::from_secs(20),
            tcp_idle: Duration::from_secs(30),
            tcp_interval: Duration::from_secs(10),
            tcp_probes: 3,
            tcp_user_timeout: Duration::from_secs(60),
        }
    }
}

/// Why the Workload API could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadApiError {
    #[error("{0:?} is not a Workload API address (use unix:///path/to/api.sock or tcp://IP:port)")]
    BadAddress(String),
    #[error("cannot connect to the Workload API at {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("Workload API at {address} answered {code:?}: {message}")]
    Status {
        address: String,
        code: Code,
        message: String,
    },
    #[error("the Workload API stream from {address} ended")]
    StreamEnded { address: String },
    #[error("invalid Workload API response: {0}")]
    Response(#[from] ResponseError),
}

/// Why one `X509SVIDResponse` was refused. The previous identity stays.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    #[error("the response holds no SVID")]
    NoSvids,
    #[error("SVID {index}: field {field} is empty")]
    EmptyField { index: usize, field: &'static str },
    #[error("SVID {index}: {reason}")]
    BadSvid { index: usize, reason: String },
    #[error("SVID {index}: spiffe_id {claimed:?} does not match the certificate's {actual}")]
    IdMismatch {
        index: usize,
        claimed: String,
        actual: String,
    },
    #[error("bundle of {trust_domain}: {reason}")]
    BadBundle {
        trust_domain: String,
        reason: String,
    },
    #[error("federated bundle key {key:?}: {reason}")]
    BadFederatedKey { key: String, reason: String },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

impl ResponseError {
    /// When the same response would be worth checking again (it was
    /// refused for a reason time cures, like an SVID not valid yet).
    pub fn retry_at(&self) -> Option<SystemTime> {
        match self {
            ResponseError::Identity(e) => e.retry_at(),
            _ => None,
        }
    }
}

/// Where the Workload API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAddress {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for ApiAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApiAddress::Unix(path) => write!(f, "unix://{}", path.display()),
            ApiAddress::Tcp(addr) => write!(f, "tcp://{addr}"),
        }
    }
}

impl ApiAddress {
    /// Parses `unix:///path`, `unix:/path` or `tcp://IP:port`, the forms of
    /// the SPIFFE Workload Endpoint spec.
    pub fn parse(s: &str) -> Result<Self, WorkloadApiError> {
        let bad = || WorkloadApiError::BadAddress(s.to_string());
        if let Some(rest) = s.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(bad());
            }
            return Ok(ApiAddress::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            return rest.parse().map(ApiAddress::Tcp).map_err(|_| bad());
        }
        Err(bad())
    }

    /// The address to use: `--socket`, then the config, then
    /// `SPIFFE_ENDPOINT_SOCKET`, then SPIRE's default socket.
    pub fn choose(cli: Option<&str>, config: Option<&str>) -> Result<Self, WorkloadApiError> {
        let env = std::env::var(ENDPOINT_ENV).ok().filter(|v| !v.is_empty());
        let chosen = cli
            .or(config)
            .map(str::to_string)
            .or(env)
            .unwrap_or_else(|| DEFAULT_ADDRESS.to_string());
        Self::parse(&chosen)
    }

    /// Opens a gRPC channel to the Workload API, with the default
    /// [`Keepalive`].
    pub async fn connect(&self) -> Result<SpiffeWorkloadApiClient<Channel>, WorkloadApiError> {
        self.connect_with(Keepalive::default()).await
    }

    /// Opens a gRPC channel to the Workload API that fails when the peer
    /// stops answering, as `keepalive` says.
    pub async fn connect_with(
        &self,
        keepalive: Keepalive,
    ) -> Result<SpiffeWorkloadApiClient<Channel>, WorkloadApiError> {
        Ok(SpiffeWorkloadApiClient::new(self.channel(keepalive).await?))
    }

    /// Opens a gRPC channel to this address (the Workload API, or the
    /// SPIRE agent's admin API) that fails when the peer stops answering,
    /// as `keepalive` says.
    pub async fn channel(&self, keepalive: Keepalive) -> Result<Channel, WorkloadApiError> {
        let failed = |reason: String| WorkloadApiError::Connect {
            address: self.to_string(),
            reason,
        };
        let endpoint = |uri: String| {
            Endpoint::from_shared(uri).map(|e| {
                e.http2_keep_alive_interval(keepalive.http2_interval)
                    .keep_alive_timeout(keepalive.http2_timeout)
                    // The stream is always open, so PINGs never go out
                    // "while idle" (without a stream), which grpc-go
                    // servers also refuse by default.
                    .keep_alive_while_idle(false)
            })
        };
        let channel = match self {
            ApiAddress::Unix(path) => {
                let path = path.clone();
                // The URI is required by tonic but unused: the connector
                // below always dials the socket.
                endpoint("http://localhost".into())
                    .map_err(|e| failed(e.to_string()))?
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                        }
                    }))
                    .await
            }
            ApiAddress::Tcp(addr) => {
                let addr = *addr;
                endpoint(format!("http://{addr}"))
                    .map_err(|e| failed(e.to_string()))?
                    .connect_with_connector(tower::service_fn(move |_| async move {
                        let stream = tokio::net::TcpStream::connect(addr).await?;
                        tcp_keepalive(&stream, &keepalive)?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }))
                    .await
            }
        }
        .map_err(|e| failed(source_chain(&e)))?;
        Ok(channel)
    }
}

/// TCP keepalive and `TCP_USER_TIMEOUT` on a connection to the agent.
fn tcp_keepalive(stream: &tokio::net::TcpStream, keepalive: &Keepalive) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(keepalive.tcp_idle)
            .with_interval(keepalive.tcp_interval)
            .with_retries(keepalive.tcp_probes),
    )?;
    socket.set_tcp_user_timeout(Some(keepalive.tcp_user_timeout))
}

/// A request with the header every Workload API server requires.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

/// Turns one `X509SVIDResponse` into a validated identity, or says exactly
/// why it cannot be used.
pub fn identity_from_response(
    response: X509svidResponse,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<Identity, ResponseError> {
    if response.svids.is_empty() {
        return Err(ResponseError::NoSvids);
    }
    let mut svids = Vec::with_capacity(response.svids.len());
    let mut bundles = BundleSet::new();
    for (index, entry) in response.svids.into_iter().enumerate() {
        // The spec: every field but `hint` is required; a message with a
        // default value must be discarded.
        for (field, empty) in [
            ("spiffe_id", entry.spiffe_id.is_empty()),
            ("x509_svid", entry.x509_svid.is_empty()),
            ("x509_svid_key", entry.x509_svid_key.is_empty()),
            ("bundle", entry.bundle.is_empty()),
        ] {
            if empty {
                return Err(ResponseError::EmptyField { index, field });
            }
        }
        let chain = split_der_certificates(&entry.x509_svid)
            .map_err(|reason| ResponseError::BadSvid { index, reason })?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(entry.x509_svid_key));
        let svid = Svid::from_der(chain, key, provider)
            .map_err(|e| ResponseError::BadSvid {
                index,
                reason: e.to_string(),
            })?
            .with_hint(entry.hint);
        let claimed =
            spiffe_id::parse_workload_id(&entry.spiffe_id).map_err(|e| ResponseError::BadSvid {
                index,
                reason: format!("spiffe_id {:?}: {e}", entry.spiffe_id),
            })?;
        if claimed != svid.id {
            return Err(ResponseError::IdMismatch {
                index,
                claimed: entry.spiffe_id,
                actual: svid.id.to_string(),
            });
        }
        let trust_domain = svid.id.trust_domain().clone();
        if bundles.get(&trust_domain).is_none() {
            bundles.insert(bundle_from_der(trust_domain, &entry.bundle)?);
        }
        svids.push(svid);
    }
    for (key, der) in response.federated_bundles {
        let trust_domain = federated_trust_domain(&key)?;
        // Our own trust domain's bundle comes with the SVIDs and wins.
        if bundles.get(&trust_domain).is_some() {
            continue;
        }
        // SPIRE sends a federated trust domain that has only JWT keys as
        // an empty X.509 bundle: a domain with no X.509 authorities, not a
        // broken response.
        if der.is_empty() {
            bundles.insert(TrustBundle::without_x509_authorities(trust_domain));
        } else {
            bundles.insert(bundle_from_der(trust_domain, &der)?);
        }
    }
    Ok(Identity::new(svids, bundles, now)?)
}

fn bundle_from_der(trust_domain: TrustDomain, der: &[u8]) -> Result<TrustBundle, ResponseError> {
    let bad = |reason: String| ResponseError::BadBundle {
        trust_domain: trust_domain.to_string(),
        reason,
    };
    let certs = split_der_certificates(der).map_err(bad)?;
    TrustBundle::new(trust_domain.clone(), certs).map_err(|e| bad(e.to_string()))
}

/// Federated bundles are keyed by trust domain SPIFFE ID
/// (`spiffe://partner.org`); a bare name is accepted as well.
fn federated_trust_domain(key: &str) -> Result<TrustDomain, ResponseError> {
    let bad = |reason: String| ResponseError::BadFederatedKey {
        key: key.to_string(),
        reason,
    };
    match key.strip_prefix("spiffe://") {
        Some(rest) => {
            let id = spiffe_id::parse(key).map_err(|e| bad(e.to_string()))?;
            if !id.path().is_empty() || rest.contains('/') {
                return Err(bad("must name a trust domain, not a workload".into()));
            }
            Ok(id.trust_domain().clone())
        }
        None => spiffe_id::parse_trust_domain(key).map_err(|e| bad(e.to_string())),
    }
}

/// What the supervisor knows about its connection, for metrics and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiHealth {
    /// True while a stream is open and has delivered a message.
    pub connected: bool,
    /// The last problem, if any (cleared by the next good message).
    pub last_error: Option<String>,
    /// When the last valid identity arrived.
    pub last_update: Option<SystemTime>,
}

/// The supervised Workload API client: connects, streams, validates and
/// publishes, and reconnects with backoff for as long as the process runs.
pub struct WorkloadApiSource {
    address: ApiAddress,
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    provider: Arc<CryptoProvider>,
    health: watch::Sender<ApiHealth>,
    keepalive: Keepalive,
}

/// How one stream ended, deciding what the supervisor does next.
enum StreamEnd {
    /// Transport trouble: keep the identity, retry with backoff.
    Retry(String),
    /// PermissionDenied: we have no identity any more.
    Withdrawn(String),
    /// InvalidArgument: the request or the setup is wrong; retry slowly.
    Misconfigured(String),
}

impl WorkloadApiSource {
    pub fn new(address: ApiAddress, store: Arc<IdentityStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            address,
            store,
            metrics,
            provider: crate::tls::config::provider(),
            health: watch::Sender::new(ApiHealth::default()),
            keepalive: Keepalive::default(),
        }
    }

    /// Other keepalive intervals than the defaults. For tests, which
    /// cannot wait 5 minutes for a PING; against SPIRE keep the default.
    pub fn with_keepalive(mut self, keepalive: Keepalive) -> Self {
        self.keepalive = keepalive;
        self
    }

    /// A receiver of the connection state.
    pub fn health(&self) -> watch::Receiver<ApiHealth> {
        self.health.subscribe()
    }

    /// Runs until the process ends.
    pub async fn run(self) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let (end, got_message) = self.stream_once().await;
            self.metrics.workload_api_up.set(0);
            if got_message {
                backoff = FIRST_BACKOFF;
            }
            let (reason, wait) = match end {
                StreamEnd::Retry(reason) => {
                    let still = match self.store.load().and_then(|i| i.earliest_expiry()) {
                        Some(expiry) if expiry > SystemTime::now() => format!(
                            "keeping the current SVID until it expires at {}",
                            crate::timefmt::rfc3339(expiry)
                        ),
                        Some(_) => {
                            "the current SVID has expired: new connections are refused".into()
                        }
                        None => "no identity yet".into(),
                    };
                    warn!(address = %self.address, error = %reason, retry_in = ?backoff, "Workload API unavailable; {still}");
                    (reason, backoff)
                }
                StreamEnd::Withdrawn(reason) => {
                    if self.store.load().is_some() {
                        self.store.withdraw();
                    }
                    // The answer can change at any moment (an entry made
                    // again, an SVID re-signed after a CA taint), and asking
                    // the local agent is cheap: ask at least this often.
                    let wait = backoff.min(WITHDRAWN_MAX_BACKOFF);
                    error!(address = %self.address, error = %reason, retry_in = ?wait, "Workload API issued no identity to this process: identity withdrawn, new connections are refused (is there a registration entry for it?)");
                    (reason, wait)
                }
                StreamEnd::Misconfigured(reason) => {
                    error!(address = %self.address, error = %reason, retry_in = ?MAX_BACKOFF, "Workload API refused the request as invalid; this is a misconfiguration, retrying slowly");
                    (reason, MAX_BACKOFF)
                }
            };
            self.health.send_modify(|h| {
                h.connected = false;
                h.last_error = Some(reason);
            });
            tokio::time::sleep(jittered(wait)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection and stream, until it fails. Returns how it ended and
    /// whether any message arrived (which resets the backoff).
    async fn stream_once(&self) -> (StreamEnd, bool) {
        let mut client = match self.address.connect_with(self.keepalive).await {
            Ok(client) => client,
            Err(e) => return (StreamEnd::Retry(e.to_string()), false),
        };
        let mut stream = match client.fetch_x509svid(request(X509svidRequest {})).await {
            Ok(response) => response.into_inner(),
            Err(status) => return (self.classify(status), false),
        };
        let mut got_message = false;
        // A refused response that time will cure, and when to try it again:
        // the agent may not send anything new for half an SVID lifetime.
        let mut pending: Option<(X509svidResponse, SystemTime)> = None;
        loop {
            let retry_in = pending.as_ref().map(|(_, at)| {
                at.duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .saturating_add(RETRY_MARGIN)
            });
            let message = tokio::select! {
                message = stream.message() => message,
                () = tokio::time::sleep(retry_in.unwrap_or_default()), if retry_in.is_some() => {
                    if let Some((response, _)) = pending.take() {
                        debug!("checking the refused Workload API response again");
                        pending = self.accept(response);
                    }
                    continue;
                }
            };
            match message {
                Ok(Some(response)) => {
                    got_message = true;
                    self.metrics.workload_api_up.set(1);
                    pending = self.accept(response);
                }
                Ok(None) => {
                    let end = WorkloadApiError::StreamEnded {
                        address: self.address.to_string(),
                    };
                    return (StreamEnd::Retry(end.to_string()), got_message);
                }
                Err(status) => return (self.classify(status), got_message),
            }
        }
    }

    /// Validates and publishes one response; a bad one is logged and the
    /// current identity stays. A response refused for a reason time cures
    /// comes back with the moment to check it again.
    fn accept(&self, response: X509svidResponse) -> Option<(X509svidResponse, SystemTime)> {
        // Kept only in case it must be checked again (a few KB).
        let copy = response.clone();
        match identity_from_response(response, &self.provider, SystemTime::now()) {
            Ok(identity) => {
                debug!(
                    svids = identity.svids.len(),
                    bundles = identity.bundles.len(),
                    "Workload API update"
                );
                // A reconnect re-sends what we hold: not a rotation.
                if !self
                    .store
                    .load()
                    .is_some_and(|current| current.same_as(&identity))
                {
                    self.store.publish(identity);
                    self.metrics.identity_update(true);
                }
                self.health.send_modify(|h| {
                    h.connected = true;
                    h.last_error = None;
                    h.last_update = Some(SystemTime::now());
                });
                None
            }
            Err(e) => {
                self.metrics.identity_update(false);
                let retry_at = e.retry_at();
                match retry_at {
                    Some(at) => {
                        error!(address = %self.address, error = %e, retry_at = %crate::timefmt::rfc3339(at), "Workload API response refused; keeping the current identity and checking this response again then")
                    }
                    None => {
                        error!(address = %self.address, error = %e, "Workload API response refused; keeping the current identity")
                    }
                }
                self.health.send_modify(|h| {
                    h.connected = true;
                    h.last_error = Some(format!("response refused: {e}"));
                });
                retry_at.map(|at| (copy, at))
            }
        }
    }

    fn classify(&self, status: tonic::Status) -> StreamEnd {
        let described = WorkloadApiError::Status {
            address: self.address.to_string(),
            code: status.code(),
            message: status.message().to_string(),
        }
        .to_string();
        match status.code() {
            Code::PermissionDenied => StreamEnd::Withdrawn(described),
            Code::InvalidArgument => StreamEnd::Misconfigured(described),
            _ => StreamEnd::Retry(described),
        }
    }
}

/// Waits until the store holds an identity, up to `timeout`, reporting the
/// supervisor's last error if it does not.
pub async fn wait_for_first_identity(
    store: &IdentityStore,
    health: &mut watch::Receiver<ApiHealth>,
    address: &ApiAddress,
    timeout: Duration,
) -> Result<(), String> {
    let mut changes = store.subscribe();
    let wait = async {
        while store.load().is_none() {
            if changes.changed().await.is_err() {
                return;
            }
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(()) if store.load().is_some() => {
            info!(address = %address, "first SVID received from the Workload API");
            Ok(())
        }
        _ => {
            let last = health.borrow_and_update().last_error.clone();
            Err(format!(
                "no SVID from the Workload API at {address} within {} ({}); is the SPIRE agent running, and is there a registration entry for this process?",
                humantime::format_duration(timeout),
                last.unwrap_or_else(|| "no answer yet".into())
            ))
        }
    }
}

/// Full jitter in the upper half: a wait between d/2 and d, so a fleet of
/// nodes restarting together does not reconnect in lock-step.
pub(crate) fn jittered(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(fastrand::f64())
}

/// An error with its sources, for log lines (tonic's top-level transport
/// error alone just says "transport error").
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(source) = next {
        // Some errors already print their source; say each thing once.
        let text = source.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = source.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_in_every_spec_form() {
        assert_eq!(
            ApiAddress::parse("unix:///run/spire/api.sock").unwrap(),
            ApiAddress::Unix("/run/spire/api.sock".into())
        );
        assert_eq!(
            ApiAddress::parse("unix:/run/spire/api.sock").unwrap(),
            ApiAddress::Unix("/run/spire/api.sock".into())
        );
        assert_eq!(
            ApiAddress::parse("tcp://127.0.0.1:8081").unwrap(),
            ApiAddress::Tcp("127.0.0.1:8081".parse().unwrap())
        );
        for bad in [
            "/run/api.sock",
            "unix:relative.sock",
            "tcp://localhost:80",
            "http://1.2.3.4:5",
            "",
        ] {
            assert!(ApiAddress::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn federated_keys_accept_ids_and_names_but_not_workloads() {
        assert_eq!(
            federated_trust_domain("spiffe://partner.org")
                .unwrap()
                .as_str(),
            "partner.org"
        );
        assert_eq!(
            federated_trust_domain("partner.org").unwrap().as_str(),
            "partner.org"
        );
        assert!(federated_trust_domain("spiffe://partner.org/web").is_err());
        assert!(federated_trust_domain("spiffe://Partner.org").is_err());
        assert!(federated_trust_domain("").is_err());
    }

    #[test]
    fn empty_and_malformed_responses_are_refused() {
        let provider = crate::tls::config::provider();
        let now = SystemTime::now();
        assert!(matches!(
            identity_from_response(X509svidResponse::default(), &provider, now),
            Err(ResponseError::NoSvids)
        ));
        let entry = crate::proto::X509svid {
            spiffe_id: "spiffe://example.org/web".into(),
            x509_svid: vec![0x30, 0x03, 1, 2, 3],
            x509_svid_key: vec![1],
            bundle: vec![],
            hint: String::new(),
        };
        let response = X509svidResponse {
            svids: vec![entry.clone()],
            ..Default::default()
        };
        assert!(matches!(
            identity_from_response(response, &provider, now),
            Err(ResponseError::EmptyField {
                field: "bundle",
                ..
            })
        ));
        let response = X509svidResponse {
            svids: vec![crate::proto::X509svid {
                bundle: vec![0x30, 0x00],
                ..entry
            }],
            ..Default::default()
        };
        assert!(matches!(
            identity_from_response(response, &provider, now),
            Err(ResponseError::BadSvid { index: 0, .. })
        ));
    }

    #[test]
    fn jitter_stays_within_the_upper_half() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(5) && d <= Duration::from_secs(10),
                "{d:?}"
            );
        }
    }
}
