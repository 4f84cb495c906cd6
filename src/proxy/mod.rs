//! The data plane: listeners, per-connection tasks, and the byte copy.
//!
//! Every connection follows one path, in this order: admission (the
//! tunnel's connection limit and a valid SVID of ours), the TLS handshake
//! with SPIFFE verification, authorization of the peer's ID, and only then
//! the connection to the plain side and the copy. [`Tunnel`] holds what the
//! two directions share; [`inbound`] and [`outbound`] hold what differs.

pub mod balance;
pub mod conn_span;
pub mod copy;
pub mod inbound;
pub mod outbound;
pub mod proxy_protocol;
pub mod read_ahead;
pub mod registry;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::TunnelSettings;
use crate::identity::IdentityStore;
use crate::metrics::{ConnResult, TunnelKind, TunnelMetrics};
use crate::policy::Policy;
use crate::tls::resolver::SvidResolver;
use crate::tls::verify::{
    authorize, authorize_session, to_unix_time, verify_svid_chain, PeerRole, VerifiedPeer,
    VerifyError,
};
use conn_span::ConnSpan;
use copy::CopyEnd;
use registry::{ConnectionRegistry, Registration};
use rustls_pki_types::CertificateDer;
use std::time::SystemTime;
use tokio::io::{AsyncRead, AsyncWrite};

/// What every connection of one tunnel shares.
#[derive(Debug)]
pub struct Tunnel {
    pub name: String,
    pub kind: TunnelKind,
    pub settings: TunnelSettings,
    pub store: Arc<IdentityStore>,
    pub policy: Arc<ArcSwap<Policy>>,
    pub metrics: TunnelMetrics,
    /// Our certificate source, to refuse early when we hold no valid SVID.
    pub resolver: SvidResolver,
    limit: Arc<Semaphore>,
    /// Live connection tasks, waited for on drain.
    pub connections: TaskTracker,
    /// Stops the accept loop.
    pub stop_accepting: CancellationToken,
    /// Closes every live connection (drain deadline).
    pub close_all: CancellationToken,
    /// Where each connection registers while it lives.
    pub registry: Arc<ConnectionRegistry>,
    /// The reason of the most recent refusal, for `/status` and the demo.
    last_refusal: ArcSwapOption<String>,
    /// One info line per connection when set.
    pub access_log: bool,
}

/// Everything a tunnel needs from the process around it.
#[derive(Debug, Clone)]
pub struct TunnelContext {
    pub store: Arc<IdentityStore>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub registry: Arc<ConnectionRegistry>,
}

impl Tunnel {
    pub fn new(
        name: &str,
        kind: TunnelKind,
        settings: TunnelSettings,
        svid: Option<crate::spiffe_id::SpiffeId>,
        policy: Arc<ArcSwap<Policy>>,
        ctx: &TunnelContext,
    ) -> Self {
        Self {
            name: name.to_string(),
            kind,
            limit: Arc::new(Semaphore::new(settings.max_connections)),
            settings,
            store: Arc::clone(&ctx.store),
            policy,
            metrics: ctx.metrics.tunnel(name, kind),
            resolver: SvidResolver::new(Arc::clone(&ctx.store), svid),
            connections: TaskTracker::new(),
            stop_accepting: CancellationToken::new(),
            close_all: CancellationToken::new(),
            registry: Arc::clone(&ctx.registry),
            last_refusal: ArcSwapOption::empty(),
            access_log: false,
        }
    }

    /// Turns the per-connection access log on or off.
    pub fn with_access_log(mut self, on: bool) -> Self {
        self.access_log = on;
        self
    }

    /// The reason of the most recent refused connection, if any.
    pub fn last_refusal(&self) -> Option<Arc<String>> {
        self.last_refusal.load_full()
    }

    /// Registers a new connection; the returned token closes it.
    pub fn register(&self, client: SocketAddr) -> (Registration, CancellationToken) {
        let close = self.close_all.child_token();
        let registration = self
            .registry
            .register(&self.name, self.kind, client, close.clone());
        (registration, close)
    }

    /// Counts a refused connection and logs its reason, once, in the
    /// connection's span.
    pub fn refuse(&self, span: &ConnSpan<'_>, result: ConnResult, reason: &dyn std::fmt::Display) {
        self.metrics.count(result);
        let reason = reason.to_string();
        span.in_scope(|| info!(result = ?result, reason = %reason, "connection refused"));
        self.last_refusal.store(Some(Arc::new(reason)));
    }

    /// Accepts connections until `stop_accepting` fires, handing each one
    /// that fits under the connection limit to `handle` on its own task.
    pub async fn accept_loop<F, Fut>(self: &Arc<Self>, listener: &TcpListener, handle: F)
    where
        F: Fn(TcpStream, SocketAddr, OwnedSemaphorePermit) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        loop {
            let accepted = tokio::select! {
                () = self.stop_accepting.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, addr)) => match Arc::clone(&self.limit).try_acquire_owned() {
                    Ok(permit) => {
                        // Small writes (handshakes, RPCs) must not wait for Nagle.
                        let _ = stream.set_nodelay(true);
                        self.connections.spawn(handle(stream, addr, permit));
                    }
                    Err(_) => {
                        let span = ConnSpan::new(false, &self.name, self.kind_name(), addr);
                        self.refuse(
                            &span,
                            ConnResult::over_limit,
                            &format_args!(
                                "max_connections ({}) reached",
                                self.settings.max_connections
                            ),
                        );
                    }
                },
                Err(e) => {
                    // Out of file descriptors and the like: these pass, so
                    // back off briefly instead of spinning.
                    warn!(tunnel = %self.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Authorizes an established session and records its peer in the
    /// registry, closing the race with a concurrent reload: a reload stores
    /// the new policy or identity first and then scans the registry, while
    /// this records the peer first and then looks whether anything changed
    /// since it was checked; so either the scan sees this connection or this
    /// sees the change.
    pub fn admit(
        &self,
        peer_chain: Option<&[CertificateDer<'static>]>,
        resumed: bool,
        generation_before: u64,
        registration: &Registration,
        role: PeerRole,
    ) -> Result<VerifiedPeer, VerifyError> {
        let policy = self.policy.load_full();
        let peer = authorize_session(peer_chain, resumed, &self.store, &policy, role)?;
        let chain = peer_chain.unwrap_or_default();
        registration.set_peer(peer.clone(), chain);
        let current = self.policy.load_full();
        if !Arc::ptr_eq(&policy, &current) {
            authorize(&current, &peer.id)?;
        }
        if self.store.generation() != generation_before {
            let identity = self.store.load().ok_or(VerifyError::NoIdentity)?;
            verify_svid_chain(
                chain,
                &identity.bundles,
                to_unix_time(SystemTime::now()),
                role,
            )?;
        }
        Ok(peer)
    }

    /// Copies between the two ends of an authorized connection until it
    /// ends, with the metrics and the closing log line (the access log when
    /// the tunnel has one, else a debug line).
    pub async fn carry<C, S>(
        &self,
        client: &mut C,
        server: &mut S,
        peer: &VerifiedPeer,
        close: &CancellationToken,
    ) -> (copy::Transferred, CopyEnd)
    where
        C: AsyncRead + AsyncWrite + Unpin,
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.metrics.count(ConnResult::ok);
        self.metrics.active.inc();
        let started = std::time::Instant::now();
        let (moved, end) = copy::pipe(client, server, self.settings.idle_timeout, close).await;
        self.metrics.active.dec();
        self.metrics.client_to_server.inc_by(moved.client_to_server);
        self.metrics.server_to_client.inc_by(moved.server_to_client);
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let how = match &end {
            CopyEnd::Done => "done".to_string(),
            CopyEnd::Idle => "idle timeout".to_string(),
            CopyEnd::Cancelled => {
                "closed by spiffe-tunnel (revoked, drained or removed)".to_string()
            }
            CopyEnd::Failed(e) => format!("error: {e}"),
        };
        if self.access_log {
            info!(
                target: "spiffe_tunnel::access",
                peer = %peer.id,
                sent = moved.client_to_server,
                received = moved.server_to_client,
                duration_ms,
                end = %how,
                "connection closed"
            );
        } else {
            tracing::debug!(
                sent = moved.client_to_server,
                received = moved.server_to_client,
                duration_ms,
                end = %how,
                "connection closed"
            );
        }
        (moved, end)
    }

    /// "inbound" or "outbound", for messages.
    pub fn kind_name(&self) -> &'static str {
        self.kind.as_str()
    }

    /// Live connections right now.
    pub fn active_connections(&self) -> usize {
        self.settings.max_connections - self.limit.available_permits()
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
pub fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// Sorts a failed TLS handshake into a result label and a readable reason,
/// and records the peer's SPIFFE ID in the connection's span when the peer
/// got far enough to show one.
pub fn classify_handshake_error(e: &io::Error, span: &mut ConnSpan<'_>) -> (ConnResult, String) {
    let verify_error = rustls_error(e).and_then(VerifyError::from_rustls);
    if let Some(id) = verify_error.and_then(VerifyError::peer_id) {
        span.set_peer_id(id);
    }
    match rustls_error(e) {
        Some(err) => match verify_error {
            Some(v) if v.is_denial() => (ConnResult::denied, v.to_string()),
            Some(v) => (ConnResult::handshake_error, v.to_string()),
            None => (ConnResult::handshake_error, describe_rustls(err)),
        },
        None if e.kind() == io::ErrorKind::UnexpectedEof => (
            ConnResult::handshake_error,
            "peer closed the connection during the handshake".to_string(),
        ),
        None => (ConnResult::handshake_error, e.to_string()),
    }
}

fn describe_rustls(err: &rustls::Error) -> String {
    match err {
        rustls::Error::NoCertificatesPresented => {
            "peer presented no certificate (mTLS requires an X509-SVID)".to_string()
        }
        rustls::Error::AlertReceived(alert) => {
            format!("peer sent alert {alert:?} (it refused us or our certificate)")
        }
        rustls::Error::PeerIncompatible(p) => format!("peer is incompatible: {p:?}"),
        other => other.to_string(),
    }
}
