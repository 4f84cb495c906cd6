//! Inbound tunnels: mTLS in, plain out.
//!
//! Accept TLS → verify the client's X509-SVID → authorize its SPIFFE ID →
//! only then connect to the target → copy both ways. A refused peer never
//! causes a connection to the target, so not one of its bytes reaches it.
//!
//! A client that offers ALPN `spiffe-tunnel-h2` gets a multiplexed connection instead,
//! whose streams [`super::mux::server`] serves; the rules are the same for
//! each stream. The TLS config is chosen from the ClientHello, so a client
//! offering other protocols (or none) is served directly, as before.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls::HandshakeKind;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::{server::TlsStream, LazyConfigAcceptor};
use tracing::{debug, Instrument};

use super::closing;
use super::conn_span::ConnSpan;
use super::proxy_protocol::{cipher_name, tls_version_name, ProxyHeader};
use super::read_ahead::ReadAhead;
use super::registry::{Closer, Registration};
use super::{classify_handshake_error, mux, Tunnel};
use crate::config::{InboundConfig, Target};
use crate::metrics::ConnResult;
use crate::tls::verify::{PeerRole, VerifiedPeer};

/// One inbound tunnel.
pub struct Inbound {
    pub tunnel: Arc<Tunnel>,
    pub config: InboundConfig,
    /// For direct clients: no ALPN.
    direct: Arc<rustls::ServerConfig>,
    /// For clients offering `h2`: the same, choosing `h2`.
    multiplexed: Arc<rustls::ServerConfig>,
}

impl Inbound {
    pub fn new(tunnel: Arc<Tunnel>, config: InboundConfig, tls: Arc<rustls::ServerConfig>) -> Self {
        let mut multiplexed = rustls::ServerConfig::clone(&tls);
        multiplexed.alpn_protocols = vec![mux::ALPN_MUX.to_vec()];
        Self {
            tunnel,
            config,
            direct: tls,
            multiplexed: Arc::new(multiplexed),
        }
    }

    /// The TLS handshake, with the config the ClientHello asks for.
    async fn accept_tls(
        &self,
        io: ReadAhead<TcpStream>,
    ) -> std::io::Result<TlsStream<ReadAhead<TcpStream>>> {
        let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io).await?;
        let wants_mux = start
            .client_hello()
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == mux::ALPN_MUX));
        let config = if wants_mux {
            &self.multiplexed
        } else {
            &self.direct
        };
        start.into_stream(Arc::clone(config)).await
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
        tcp: TcpStream,
        client: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) {
        let live = self.tunnel.access_log || tracing::enabled!(tracing::Level::DEBUG);
        let mut span = ConnSpan::new(live, &self.tunnel.name, "inbound", client);
        let (registration, close) = self.tunnel.register(client);
        let live = span.live();
        self.connection(tcp, permit, &registration, &close, &mut span)
            .instrument(live)
            .await;
    }

    async fn connection(
        self: &Arc<Self>,
        tcp: TcpStream,
        _permit: OwnedSemaphorePermit,
        registration: &Registration,
        close: &Closer,
        span: &mut ConnSpan<'_>,
    ) {
        let t = &self.tunnel;
        if t.resolver.current().is_none() {
            t.refuse(
                span,
                ConnResult::no_identity,
                &"we hold no valid SVID to present",
            );
            return;
        }

        // A connection closed before its first byte is a TCP health check
        // or a port probe, not a failed handshake: let it go quietly
        // rather than log and count it as a refusal.
        let deadline = tokio::time::Instant::now() + t.settings.handshake_timeout;
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                debug!("closed before sending anything (a TCP health check?)");
                return;
            }
            Ok(Ok(_)) => {}
            Err(_) => {
                t.refuse(
                    span,
                    ConnResult::handshake_error,
                    &format_args!(
                        "handshake timed out after {:?} (the client sent nothing)",
                        t.settings.handshake_timeout
                    ),
                );
                return;
            }
        }
        // Identity changes after this point are re-checked in `admit`.
        let generation = t.store.generation();
        let started = Instant::now();
        let handshake =
            tokio::time::timeout_at(deadline, self.accept_tls(ReadAhead::new(tcp))).await;
        t.metrics
            .handshake_seconds
            .observe(started.elapsed().as_secs_f64());
        let mut tls = match handshake {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let (result, reason) = classify_handshake_error(&e, span);
                t.refuse(span, result, &reason);
                return;
            }
            Err(_) => {
                t.refuse(
                    span,
                    ConnResult::handshake_error,
                    &format_args!(
                        "handshake timed out after {:?}",
                        t.settings.handshake_timeout
                    ),
                );
                return;
            }
        };

        let (_, session) = tls.get_ref();
        let resumed = session.handshake_kind() == Some(HandshakeKind::Resumed);
        t.metrics.count_handshake(resumed);
        let peer = match t.admit(
            session.peer_certificates(),
            generation,
            registration,
            PeerRole::Client,
        ) {
            Ok(peer) => peer,
            Err(e) => {
                let result = if e.is_denial() {
                    ConnResult::denied
                } else {
                    ConnResult::handshake_error
                };
                t.refuse(span, result, &e);
                return;
            }
        };
        span.set_peer(&peer.id);
        debug!(resumed, "peer authorized");
        let proxy_header = self.config.proxy_protocol.then(|| {
            let (socket, session) = tls.get_ref();
            let tcp = socket.get_ref();
            let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
            ProxyHeader {
                source: tcp.peer_addr().unwrap_or(unknown),
                destination: tcp.local_addr().unwrap_or(unknown),
                tls_version: session
                    .protocol_version()
                    .and_then(tls_version_name)
                    .unwrap_or("TLSv1.3"),
                cipher: session
                    .negotiated_cipher_suite()
                    .and_then(|s| cipher_name(s.suite())),
                spiffe_id: &peer.id.to_string(),
            }
            .encode()
        });

        let multiplexed = tls.get_ref().1.alpn_protocol() == Some(mux::ALPN_MUX);
        span.set_multiplexed(multiplexed);
        if multiplexed {
            let (socket, _) = tls.get_ref();
            let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
            let local = socket.get_ref().local_addr().unwrap_or(unknown);
            let client = socket.get_ref().peer_addr().unwrap_or(unknown);
            let conn = mux::server::Conn {
                peer,
                close: close.clone(),
                proxy_header: proxy_header.map(Arc::from),
                client,
                local,
            };
            return mux::server::serve(self, tls, conn, span).await;
        }

        // Authorized: now, and only now, the target hears of this peer,
        // unless it was revoked since (a reload or bundle change that
        // landed after `admit`): then the target never hears of it.
        let header = proxy_header.as_deref();
        if close.is_closed() {
            t.end_unforwarded(close, "before the target was dialled");
            return;
        }
        match self.dial_target(close).await {
            Ok(dialled) => {
                self.forward_to(&mut tls, dialled, header, &peer, close, span)
                    .await
            }
            Err(Some(failed)) => t.refuse(span, ConnResult::upstream_error, &failed),
            Err(None) => {}
        }
    }

    /// Dials the target. A connect may take up to `connect_timeout`; a
    /// revocation in the meantime abandons it (counted here: `Err(None)`).
    /// `Err(Some(reason))`: the target could not be reached.
    pub(crate) async fn dial_target(&self, close: &Closer) -> Result<Dialled, Option<String>> {
        let t = &self.tunnel;
        let timeout = t.settings.connect_timeout;
        let dial = async {
            match &self.config.target {
                Target::Tcp(addr) => TcpStream::connect(addr.as_str()).await.map(Dialled::Tcp),
                Target::Unix(path) => UnixStream::connect(path).await.map(Dialled::Unix),
            }
        };
        let dialled = tokio::select! {
            biased;
            () = close.token().cancelled() => {
                t.end_unforwarded(close, "while the target was dialled");
                return Err(None);
            }
            dialled = tokio::time::timeout(timeout, dial) => dialled,
        };
        let failed = match dialled {
            Ok(Ok(Dialled::Tcp(target))) => {
                let _ = target.set_nodelay(true);
                return Ok(Dialled::Tcp(target));
            }
            Ok(Ok(dialled)) => return Ok(dialled),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connect timed out".to_string(),
        };
        Err(Some(format!("target {}: {failed}", self.config.target)))
    }

    /// [`Self::forward`] to whichever kind of target was dialled.
    pub(crate) async fn forward_to<C>(
        &self,
        client: &mut C,
        dialled: Dialled,
        proxy_header: Option<&[u8]>,
        peer: &VerifiedPeer,
        close: &Closer,
        span: &ConnSpan<'_>,
    ) where
        C: AsyncRead + AsyncWrite + Unpin + closing::Socket,
    {
        match dialled {
            Dialled::Tcp(target) => {
                self.forward(client, target, proxy_header, peer, close, span)
                    .await
            }
            Dialled::Unix(target) => {
                self.forward(client, target, proxy_header, peer, close, span)
                    .await
            }
        }
    }

    /// Sends the PROXY v2 header (if any) ahead of the client's bytes,
    /// then carries the connection.
    async fn forward<C, S>(
        &self,
        client: &mut C,
        mut target: S,
        proxy_header: Option<&[u8]>,
        peer: &VerifiedPeer,
        close: &Closer,
        span: &ConnSpan<'_>,
    ) where
        C: AsyncRead + AsyncWrite + Unpin + closing::Socket,
        S: AsyncRead + AsyncWrite + Unpin + closing::Socket,
    {
        // The last moment before the target's first byte.
        if close.is_closed() {
            self.tunnel
                .end_unforwarded(close, "before the first byte reached the target");
            return;
        }
        if let Some(header) = proxy_header {
            if let Err(e) = target.write_all(header).await {
                self.tunnel.refuse(
                    span,
                    ConnResult::upstream_error,
                    &format_args!("target closed before the PROXY header was written: {e}"),
                );
                return;
            }
        }
        // If the client's side breaks off, `carry` resets the target once
        // it has taken every byte: the app sees a reset, not a clean end of
        // stream it could take for a complete request.
        self.tunnel.carry(client, &mut target, peer, close).await;
    }
}

/// A connected target.
pub(crate) enum Dialled {
    Tcp(TcpStream),
    Unix(UnixStream),
}
