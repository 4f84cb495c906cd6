//! The data plane: listeners, per-connection tasks, and the byte copy.
//!
//! Every connection follows one path, in this order: admission (the
//! tunnel's connection limit and a valid SVID of ours), the TLS handshake
//! with SPIFFE verification, authorization of the peer's ID, and only then
//! the connection to the plain side and the copy. [`Tunnel`] holds what the
//! two directions share; [`inbound`] and [`outbound`] hold what differs.

pub mod balance;
pub mod caller;
pub mod closing;
pub mod conn_span;
pub mod copy;
pub mod inbound;
pub mod mux;
pub mod outbound;
pub mod proxy_protocol;
pub mod read_ahead;
pub mod refusal_log;
pub mod registry;
pub mod send_queue;

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
use crate::metrics::{ConnEnd, ConnResult, TunnelKind, TunnelMetrics};
use crate::policy::Policy;
use crate::tls::resolver::SvidResolver;
use crate::tls::verify::{
    authorize, authorize_session, to_unix_time, verify_svid_chain, PeerRole, VerifiedPeer,
    VerifyError,
};
use conn_span::ConnSpan;
use copy::CopyEnd;
use registry::{CloseReason, Closer, ConnectionRegistry, Registration};
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
    /// Keeps a flood of refusals from flooding the log.
    refusal_log: refusal_log::RefusalLog,
    /// One info line per connection when set.
    pub access_log: bool,
}

/// Everything a tunnel needs from the process around it.
#[derive(Debug, Clone)]
pub struct TunnelContext {
    pub store: Arc<IdentityStore>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub registry: Arc<ConnectionRegistry>,
    /// The Delegated Identity API, when an admin socket is known: needed
    /// by outbounds with `present = "caller"`.
    pub delegated: Option<Arc<crate::identity::delegated::DelegatedIdentities>>,
}

impl Tunnel {
    pub fn new(
        name: &str,
        kind: TunnelKind,
        settings: TunnelSettings,
        svid: crate::identity::SvidSelector,
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
            refusal_log: refusal_log::RefusalLog::new(name, kind.as_str()),
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

    /// A place under the tunnel's connection limit for one more tunnelled
    /// connection (a stream of a multiplexed connection), if there is one.
    pub fn try_permit(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.limit).try_acquire_owned().ok()
    }

    /// Registers a new connection; the returned closer closes it.
    pub fn register(&self, client: SocketAddr) -> (Registration, Closer) {
        let close = Closer::under(&self.close_all);
        let registration = self
            .registry
            .register(&self.name, self.kind, client, close.clone());
        (registration, close)
    }

    /// Counts a refused connection and logs its reason, once, in the
    /// connection's span; past a few lines a second per result, the line
    /// is left to a summary (see [`refusal_log`]).
    pub fn refuse(&self, span: &ConnSpan<'_>, result: ConnResult, reason: &dyn std::fmt::Display) {
        self.metrics.count(result);
        let reason = reason.to_string();
        if self.refusal_log.allow(result, &reason) {
            span.in_scope(|| info!(result = ?result, reason = %reason, "connection refused"));
        }
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
    /// sees the change. Only a peer admitted here has its chain remembered
    /// as verified (see [`crate::tls::chain_cache`]).
    pub fn admit(
        &self,
        peer_chain: Option<&[CertificateDer<'static>]>,
        generation_before: u64,
        registration: &Registration,
        role: PeerRole,
    ) -> Result<VerifiedPeer, VerifyError> {
        let policy = self.policy.load_full();
        let admission = authorize_session(peer_chain, &self.store, &policy, role)?;
        let chain = peer_chain.unwrap_or_default();
        registration.set_peer(admission.peer.clone(), chain);
        let current = self.policy.load_full();
        if !Arc::ptr_eq(&policy, &current) {
            authorize(&current, &admission.peer.id)?;
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
        admission.remember(chain, &self.store);
        Ok(admission.peer)
    }

    /// Copies between the two ends of an authorized connection until it
    /// ends, then closes it the way its end calls for (see
    /// [`closing`]: after a failure, what was written is delivered and the
    /// plain side reset), with the metrics and the closing log line (the
    /// access log when the tunnel has one, else a debug line).
    pub async fn carry<C, S>(
        &self,
        client: &mut C,
        server: &mut S,
        peer: &VerifiedPeer,
        close: &Closer,
    ) -> (copy::Transferred, CopyEnd)
    where
        C: AsyncRead + AsyncWrite + Unpin + closing::Socket,
        S: AsyncRead + AsyncWrite + Unpin + closing::Socket,
    {
        self.metrics.count(ConnResult::ok);
        self.metrics.active.inc();
        let started = std::time::Instant::now();
        let limits = copy::Limits {
            idle_timeout: self.settings.idle_timeout,
            end_at: self
                .settings
                .max_connection_lifetime
                .and_then(|life| close.opened().checked_add(life)),
        };
        let (moved, copy_end) = copy::pipe(client, server, limits, close.token()).await;
        self.metrics.active.dec();
        self.metrics.client_to_server.inc_by(moved.client_to_server);
        self.metrics.server_to_client.inc_by(moved.server_to_client);
        let end = conn_end(&copy_end, close);
        if matches!(end, ConnEnd::truncated | ConnEnd::reset | ConnEnd::error) {
            let patience = self.settings.idle_timeout;
            match self.kind {
                TunnelKind::inbound => {
                    closing::deliver_then_reset(server, client, patience, close.token()).await;
                }
                TunnelKind::outbound => {
                    closing::deliver_then_reset(client, server, patience, close.token()).await;
                }
            }
        }
        self.metrics.count_end(end);
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let how = describe_end(end, &copy_end);
        if self.access_log {
            info!(
                target: "spiffe_tunnel::access",
                peer = %peer.id,
                peer_serial = %peer.serial,
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
        (moved, copy_end)
    }

    /// Ends an authorized connection that was closed (revoked, drained)
    /// before anything was forwarded: counted under its end, logged at
    /// debug (the revocation itself was logged by whoever revoked it).
    pub fn end_unforwarded(&self, close: &Closer, when: &str) {
        let end = match close.reason() {
            CloseReason::Revoked => ConnEnd::revoked,
            CloseReason::Drained => ConnEnd::drained,
        };
        self.metrics.count_end(end);
        tracing::debug!(end = ?end, "connection closed {when}; the target received nothing");
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

/// How a copy's end is counted: a cancellation by its reason, a failure
/// by what failed.
fn conn_end(end: &CopyEnd, close: &Closer) -> ConnEnd {
    match end {
        CopyEnd::Done => ConnEnd::done,
        CopyEnd::Idle => ConnEnd::idle,
        CopyEnd::Lifetime => ConnEnd::lifetime,
        CopyEnd::Cancelled => match close.reason() {
            CloseReason::Revoked => ConnEnd::revoked,
            CloseReason::Drained => ConnEnd::drained,
        },
        // tokio-rustls reports a peer that closed its socket without
        // close_notify (or in the middle of a record) as an unexpected
        // end of file; a plain socket reports end of stream as a read of
        // zero bytes, never as this error.
        CopyEnd::Failed(e) if e.kind() == io::ErrorKind::UnexpectedEof => ConnEnd::truncated,
        CopyEnd::Failed(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ) =>
        {
            ConnEnd::reset
        }
        CopyEnd::Failed(_) => ConnEnd::error,
    }
}

/// The `end` of a connection's closing line.
fn describe_end(end: ConnEnd, copy_end: &CopyEnd) -> String {
    let error = match copy_end {
        CopyEnd::Failed(e) => e.to_string(),
        _ => String::new(),
    };
    match end {
        ConnEnd::done => "done".into(),
        ConnEnd::idle => "idle timeout".into(),
        ConnEnd::lifetime => "max_connection_lifetime reached".into(),
        ConnEnd::revoked => {
            "revoked: a reload or trust bundle change no longer allows the peer".into()
        }
        ConnEnd::drained => "closed by spiffe-tunnel (drain deadline or tunnel removed)".into(),
        ConnEnd::truncated => format!(
            "truncated ({error}): everything received was delivered, then the plain side was reset"
        ),
        ConnEnd::reset => format!("reset: {error}"),
        ConnEnd::error => format!("error: {error}"),
    }
}

/// The rustls error inside an I/O error from tokio-rustls, if any.
pub fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// Sorts a failed TLS handshake into a result label and a readable reason,
/// and records the peer's SPIFFE ID in the connection's span when the peer
/// Whether an upstream cut our TLS handshake off (closed or reset the
/// socket) rather than refusing it with an alert: an upstream on its way
/// down, so the dial may be retried on another one.
pub fn handshake_cut_off(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
    )
}

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
