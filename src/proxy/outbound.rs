//! Outbound tunnels: plain in, mTLS out.
//!
//! Accept a plain connection → dial an upstream → TLS with our SVID → verify
//! the server's X509-SVID and authorize its SPIFFE ID → copy both ways. The
//! local client's bytes are not read until the server is authorized.
//! With `multiplex = true` the connection is a stream on a pooled
//! connection instead ([`super::mux::client`]), under the same rules.
//!
//! With `present = "caller"` the TLS presents the SVID of the local process
//! that connected instead of ours ([`crate::identity::delegated`]; the
//! caller is found by [`super::caller`]). Each caller gets its own client
//! configs and session tickets, made once per caller: a ticket binds the
//! client certificate of its first handshake, so sharing tickets between
//! callers would let one caller's connection resume as another. The chain
//! cache of the verifier stays shared: it remembers *server* chains, whose
//! verification depends on nothing about the caller.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use rustls::HandshakeKind;
use rustls_pki_types::{DnsName, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn, Instrument};

use super::balance::Balancer;
use super::caller::CallerFinder;
use super::conn_span::ConnSpan;
use super::copy::CopyEnd;
use super::mux::client::MuxClient;
use super::read_ahead::ReadAhead;
use super::registry::{Closer, Registration};
use super::{classify_handshake_error, rustls_error, Tunnel};
use crate::config::{OutboundConfig, Present};
use crate::identity::delegated::{
    CallerKey, CallerResolver, DelegatedIdentities, Lease, Subscription,
};
use crate::metrics::ConnResult;
use crate::tls::resumption::ClientResumption;
use crate::tls::verify::PeerRole;

/// One outbound tunnel.
pub struct Outbound {
    pub tunnel: Arc<Tunnel>,
    pub config: OutboundConfig,
    /// The TLS config per upstream address, each with its own tickets.
    sessions: ClientResumption,
    /// Picks and health-checks the upstreams.
    pub balancer: Arc<Balancer>,
    /// The pool of multiplexed connections, with `multiplex = true`.
    pub mux: Option<MuxClient>,
    /// `present = "caller"`: where the callers' SVIDs come from.
    callers: Option<CallerTls>,
}

/// The per-caller TLS of an outbound with `present = "caller"`.
struct CallerTls {
    delegated: Arc<DelegatedIdentities>,
    finder: Arc<CallerFinder>,
    /// Everything but the client certificate and the tickets.
    base: Arc<rustls::ClientConfig>,
    /// Per caller, made at its first connection and dropped with its
    /// subscription.
    sessions: Mutex<HashMap<CallerKey, CallerSessions>>,
}

/// One caller's sessions, with the subscription they were made for.
type CallerSessions = (Weak<Subscription>, Arc<ClientResumption>);

impl CallerTls {
    /// The caller's client configs: its own SVID, its own tickets.
    fn sessions_for(&self, lease: &Lease, resumption: bool) -> Arc<ClientResumption> {
        let subscription = &lease.subscription;
        let mut all = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((owner, sessions)) = all.get(&subscription.key) {
            if owner
                .upgrade()
                .is_some_and(|owner| Arc::ptr_eq(&owner, subscription))
            {
                return Arc::clone(sessions);
            }
        }
        // The subscriptions of callers gone for good are dropped here.
        all.retain(|_, (owner, _)| owner.strong_count() > 0);
        let mut config = rustls::ClientConfig::clone(&self.base);
        config.client_auth_cert_resolver =
            Arc::new(CallerResolver::new(Arc::clone(&subscription.store)));
        let sessions = Arc::new(ClientResumption::new(
            Arc::new(config),
            Arc::clone(&subscription.store),
            resumption,
        ));
        all.insert(
            subscription.key,
            (Arc::downgrade(subscription), Arc::clone(&sessions)),
        );
        sessions
    }
}

impl Outbound {
    /// `delegated` is required with `present = "caller"`.
    pub fn new(
        tunnel: Arc<Tunnel>,
        config: OutboundConfig,
        tls: Arc<rustls::ClientConfig>,
        balancer: Arc<Balancer>,
        delegated: Option<Arc<DelegatedIdentities>>,
    ) -> Self {
        let mux = config
            .multiplex
            .clone()
            .map(|settings| MuxClient::new(Arc::clone(&tls), settings));
        let callers = match (config.present, delegated) {
            (Present::Caller, Some(delegated)) => Some(CallerTls {
                delegated,
                finder: Arc::new(CallerFinder::new()),
                base: Arc::clone(&tls),
                sessions: Mutex::new(HashMap::new()),
            }),
            _ => None,
        };
        let sessions = ClientResumption::new(
            tls,
            Arc::clone(&tunnel.store),
            config.settings.session_resumption,
        );
        Self {
            tunnel,
            config,
            sessions,
            balancer,
            mux,
            callers,
        }
    }

    /// Serves the listener until the tunnel stops accepting.
    pub async fn serve(self: Arc<Self>, listener: Arc<TcpListener>) {
        let tunnel = Arc::clone(&self.tunnel);
        tunnel
            .accept_loop(&listener, move |stream, addr, permit| {
                Arc::clone(&self).handle(stream, addr, permit)
            })
            .await;
    }

    async fn handle(
        self: Arc<Self>,
        client: TcpStream,
        addr: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let live = self.tunnel.access_log || tracing::enabled!(tracing::Level::DEBUG);
        let mut span = ConnSpan::new(live, &self.tunnel.name, "outbound", addr);
        let (registration, close) = self.tunnel.register(addr);
        let live = span.live();
        self.connection(client, permit, &registration, &close, &mut span)
            .instrument(live)
            .await;
    }

    async fn connection(
        &self,
        mut client: TcpStream,
        _permit: OwnedSemaphorePermit,
        registration: &Registration,
        close: &Closer,
        span: &mut ConnSpan<'_>,
    ) {
        let t = &self.tunnel;
        // With present = "caller", the caller's SVID and its own sessions;
        // the lease keeps its subscription for as long as the connection.
        // (Config refuses present = "caller" together with multiplex.)
        let (sessions, _lease) = match &self.callers {
            Some(callers) => match self.caller_sessions(callers, &client, span).await {
                Some((sessions, lease)) => (sessions, Some(lease)),
                None => return,
            },
            None => {
                if t.resolver.current().is_none() {
                    t.refuse(
                        span,
                        ConnResult::no_identity,
                        &"we hold no valid SVID to present",
                    );
                    return;
                }
                (None, None)
            }
        };
        span.set_multiplexed(self.mux.is_some());
        if let Some(mux) = &self.mux {
            return mux.carry(self, client, registration, close, span).await;
        }
        let sessions = sessions.as_deref().unwrap_or(&self.sessions);
        // Identity changes after this point are re-checked in `admit`.
        let generation = t.store.generation();
        // The balancer retries a failed connect once on another upstream;
        // a handshake the upstream cuts off (it accepts TCP but cannot
        // serve, e.g. its own SVID expired) gets one more try elsewhere
        // too, and so does a resumed session that no longer verifies (it
        // carries the server's certificate of its first handshake), this
        // time with a full handshake. All are safe: nothing was read from
        // the client yet.
        let mut attempts_left = 2;
        let (mut tls, chosen, peer) = loop {
            attempts_left -= 1;
            let (upstream_tcp, chosen) = match self.balancer.connect().await {
                Ok(found) => found,
                Err(reason) => {
                    t.refuse(span, ConnResult::upstream_error, &reason);
                    return;
                }
            };
            let upstream = chosen.name().to_string();
            span.set_upstream(chosen.addr());
            let started = Instant::now();
            let handshake = tokio::time::timeout(
                t.settings.handshake_timeout,
                TlsConnector::from(sessions.config_for(chosen.addr()))
                    .connect(server_name(&upstream), ReadAhead::new(upstream_tcp)),
            )
            .await;
            t.metrics
                .handshake_seconds
                .observe(started.elapsed().as_secs_f64());
            match handshake {
                Ok(Ok(tls)) => {
                    chosen.report_success();
                    let (_, session) = tls.get_ref();
                    let resumed = session.handshake_kind() == Some(HandshakeKind::Resumed);
                    t.metrics.count_handshake(resumed);
                    match t.admit(
                        session.peer_certificates(),
                        generation,
                        registration,
                        PeerRole::Server,
                    ) {
                        Ok(peer) => {
                            debug!(resumed, "peer authorized");
                            break (tls, chosen, peer);
                        }
                        Err(e) if resumed && attempts_left > 0 => {
                            debug!(upstream = %upstream, error = %e, "resumed session no longer verifies; full handshake");
                            sessions.forget(chosen.addr());
                            continue;
                        }
                        Err(e) => {
                            let result = if e.is_denial() {
                                ConnResult::denied
                            } else {
                                ConnResult::handshake_error
                            };
                            t.refuse(span, result, &format_args!("upstream {upstream}: {e}"));
                            return;
                        }
                    }
                }
                Ok(Err(e)) => {
                    if super::handshake_cut_off(&e) {
                        chosen.report_failure();
                        if attempts_left > 0 {
                            debug!(upstream = %upstream, error = %e, "upstream cut the handshake off; trying another");
                            continue;
                        }
                    }
                    let (result, reason) = classify_handshake_error(&e, span);
                    t.refuse(span, result, &format_args!("upstream {upstream}: {reason}"));
                    return;
                }
                Err(_) => {
                    t.refuse(
                        span,
                        ConnResult::handshake_error,
                        &format_args!(
                            "upstream {upstream}: handshake timed out after {:?}",
                            t.settings.handshake_timeout
                        ),
                    );
                    return;
                }
            }
        };
        let _in_use = &chosen;
        span.set_peer(&peer.id);

        // If the far side breaks off, `carry` resets the app's connection
        // once it has taken every byte: the app sees a reset, not a clean
        // end of stream it could take for a complete response.
        let (moved, end) = t.carry(&mut client, &mut tls, &peer, close).await;
        // In TLS 1.3 the server checks our certificate after our side of the
        // handshake is done, so its refusal arrives as the first read.
        if let (CopyEnd::Failed(e), 0) = (&end, moved.server_to_client) {
            let alert = match rustls_error(e) {
                Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
                _ => refusal_left_unread(&mut tls).await,
            };
            if let Some(alert) = alert {
                span.in_scope(|| warn!(alert = ?alert, "upstream refused our SVID (check its policy allows our SPIFFE ID)"));
            }
        }
    }
}

impl Outbound {
    /// Finds the caller of `client` and its SVID, or refuses the
    /// connection saying why (it never falls back to our own SVID).
    async fn caller_sessions(
        &self,
        callers: &CallerTls,
        client: &TcpStream,
        span: &mut ConnSpan<'_>,
    ) -> Option<(Option<Arc<ClientResumption>>, Lease)> {
        let t = &self.tunnel;
        let found = match (client.peer_addr(), client.local_addr()) {
            (Ok(peer), Ok(local)) => {
                // /proc and netlink reads: off the async workers.
                let finder = Arc::clone(&callers.finder);
                tokio::task::spawn_blocking(move || finder.tcp(peer, local))
                    .await
                    .unwrap_or_else(|e| {
                        Err(super::caller::CallerError::Lookup(std::io::Error::other(e)))
                    })
            }
            (Err(e), _) | (_, Err(e)) => Err(super::caller::CallerError::Lookup(e)),
        };
        let caller = match found {
            Ok(caller) => caller,
            Err(e) => {
                t.refuse(
                    span,
                    ConnResult::caller_refused,
                    &format_args!("caller unknown: {e}"),
                );
                return None;
            }
        };
        span.set_caller(caller.uid, caller.pid());
        let lease = match callers
            .delegated
            .acquire(caller, t.settings.handshake_timeout)
            .await
        {
            Ok(lease) => lease,
            Err(e) => {
                t.refuse(span, ConnResult::caller_refused, &e);
                return None;
            }
        };
        if let Some(svid) = lease.subscription.current() {
            span.set_caller_id(&svid.id);
        }
        let sessions = callers.sessions_for(&lease, self.config.settings.session_resumption);
        Some((Some(sessions), lease))
    }
}

/// How long a failed connection is read for an alert that came before the
/// failure.
const ALERT_GRACE: Duration = Duration::from_millis(100);

/// The alert a server sent before closing, when our write failed first and
/// so the copy never read it. Servers that refuse our SVID and close at once
/// (go-spiffe's, Go's crypto/tls) leave it in the socket's receive queue:
/// the write of the app's first bytes meets the closed socket before the
/// read side gets to the alert.
async fn refusal_left_unread<S>(tls: &mut S) -> Option<rustls::AlertDescription>
where
    S: AsyncRead + Unpin,
{
    let mut scratch = [0u8; 256];
    match tokio::time::timeout(ALERT_GRACE, tls.read(&mut scratch)).await {
        Ok(Err(e)) => match rustls_error(&e) {
            Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
            _ => None,
        },
        _ => None,
    }
}

/// The TLS server name for an upstream. SPIFFE peers are authenticated by
/// SPIFFE ID, so this only feeds SNI and the session cache key.
pub(crate) fn server_name(upstream: &str) -> ServerName<'static> {
    let host = upstream
        .rsplit_once(':')
        .map_or(upstream, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ServerName::IpAddress(ip.into());
    }
    match DnsName::try_from(host.to_string()) {
        Ok(name) => ServerName::DnsName(name),
        Err(_) => ServerName::IpAddress(IpAddr::from([0, 0, 0, 0]).into()),
    }
}
