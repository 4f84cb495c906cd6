//! The outbound side of multiplexing: a local connection becomes one
//! CONNECT stream on a pooled connection, dialled when the pool has no
//! room for it.
//!
//! A pooled connection is made the way a direct one is (the balancer's
//! pick, health and retry; the TLS handshake with SPIFFE verification;
//! `Tunnel::admit` with its registry entry), plus ALPN `spiffe-tunnel-h2` and our SVID
//! pinned ([`super::PinnedSvid`]) so the pool knows which SVID it carries.
//! Each stream then authorizes the server's ID again against the policy in
//! force, and nothing is read from the local client until the inbound has
//! answered the CONNECT with 200 (it has authorized us and reached its
//! target). A stream the inbound refuses because its connection was full
//! (REFUSED_STREAM) or gone is retried once, safely: nothing was read yet.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::sign::CertifiedKey;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::pool::{self, Pool, StreamSlot};
use super::stream::H2Stream;
use super::{client_builder, PinnedSvid, ALPN_MUX, REFUSAL_HEADER};
use crate::config::MuxSettings;
use crate::metrics::{ConnResult, StreamRefusal};
use crate::proxy::classify_handshake_error;
use crate::proxy::conn_span::ConnSpan;
use crate::proxy::outbound::{server_name, Outbound};
use crate::proxy::read_ahead::ReadAhead;
use crate::proxy::registry::{CloseReason, Closer, Registration};
use crate::tls::verify::{authorize, PeerRole};

/// Why a stream could not be had.
#[derive(Debug)]
struct Refusal {
    result: ConnResult,
    stream: Option<StreamRefusal>,
    reason: String,
}

impl Refusal {
    fn new(result: ConnResult, reason: impl Into<String>) -> Self {
        Self {
            result,
            stream: None,
            reason: reason.into(),
        }
    }
}

/// What opening a stream on a connection came to.
enum Open {
    Ready(H2Stream),
    /// The connection could not take it (full, closing, gone): another may.
    Retry(String),
    Refused(Refusal),
}

/// The multiplexing half of an outbound with `multiplex = true`.
pub struct MuxClient {
    pool: Arc<Pool>,
    /// The outbound's client config (verifier, versions).
    base: Arc<ClientConfig>,
    settings: MuxSettings,
    /// The config for the SVID we present now, made once per SVID.
    pinned: Mutex<Option<(Arc<CertifiedKey>, Arc<ClientConfig>)>>,
    /// Held while a connection is dialled.
    dialling: tokio::sync::Mutex<()>,
}

impl MuxClient {
    pub fn new(base: Arc<ClientConfig>, settings: MuxSettings) -> Self {
        Self {
            pool: Arc::new(Pool::default()),
            base,
            settings,
            pinned: Mutex::new(None),
            dialling: tokio::sync::Mutex::new(()),
        }
    }

    /// Pooled connections now.
    pub fn pooled(&self) -> usize {
        self.pool.len()
    }

    /// Carries one local connection as a stream, from the pool's choice of
    /// connection to the stream's end.
    pub async fn carry(
        &self,
        out: &Outbound,
        mut client: TcpStream,
        registration: &Registration,
        close: &Closer,
        span: &mut ConnSpan<'_>,
    ) {
        let t = &out.tunnel;
        let Some(svid) = t.resolver.current() else {
            t.refuse(
                span,
                ConnResult::no_identity,
                &"we hold no valid SVID to present",
            );
            return;
        };
        let mut attempts_left = 2;
        let (mut stream, slot) = loop {
            attempts_left -= 1;
            let addr = out.balancer.peek();
            let slot = match self.pool.claim(&svid, addr) {
                Some(slot) => slot,
                None => {
                    // One dial at a time: a burst of streams that finds the
                    // pool full waits for the connection the first of them
                    // makes, instead of each making its own.
                    let _dialling = self.dialling.lock().await;
                    match self.pool.claim(&svid, addr) {
                        Some(slot) => slot,
                        None => match self.dial(out, &svid, span).await {
                            Ok(slot) => slot,
                            Err(refusal) => return self.refuse(out, span, refusal),
                        },
                    }
                }
            };
            let conn = Arc::clone(&slot.conn);
            span.set_upstream(conn.addr);
            span.set_peer(&conn.peer.id);
            // Recorded first, checked second: a reload that lands in
            // between either finds this stream in the registry or is seen
            // here (as in `Tunnel::admit`).
            registration.set_peer(conn.peer.clone(), &conn.chain);
            if let Err(e) = authorize(&t.policy.load(), &conn.peer.id) {
                conn.closer.close(CloseReason::Revoked);
                let reason = format!("upstream {}: {e}", conn.upstream);
                return self.refuse(out, span, Refusal::new(ConnResult::denied, reason));
            }
            match self.open(out, &slot).await {
                Open::Ready(stream) => break (stream, slot),
                Open::Retry(why) if attempts_left > 0 => {
                    debug!(upstream = %conn.upstream, why, "stream not opened; trying another connection");
                }
                Open::Retry(why) => {
                    // In TLS 1.3 a server refuses our certificate after our
                    // side of the handshake is done: the connection then
                    // fails at its first use.
                    let reason = format!(
                        "upstream {}: {why} (twice; when it repeats, check that the upstream's policy allows our SPIFFE ID)",
                        conn.upstream
                    );
                    return self.refuse(
                        out,
                        span,
                        Refusal::new(ConnResult::upstream_error, reason),
                    );
                }
                Open::Refused(refusal) => return self.refuse(out, span, refusal),
            }
        };
        if close.is_closed() {
            t.end_unforwarded(close, "before the stream carried a byte");
            stream.finish(Duration::ZERO, close.token()).await;
            return;
        }
        let peer = slot.conn.peer.clone();
        t.metrics.mux.streams.inc();
        t.carry(&mut client, &mut stream, &peer, close).await;
        t.metrics.mux.streams.dec();
        stream.finish(t.settings.idle_timeout, close.token()).await;
        drop(slot);
    }

    fn refuse(&self, out: &Outbound, span: &ConnSpan<'_>, refusal: Refusal) {
        if let Some(reason) = refusal.stream {
            out.tunnel.metrics.mux.refuse(reason);
        }
        out.tunnel.refuse(span, refusal.result, &refusal.reason);
    }

    /// The client config that presents `svid` and offers `spiffe-tunnel-h2`.
    fn config_for(&self, svid: &Arc<CertifiedKey>) -> Arc<ClientConfig> {
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((key, config)) = &*pinned {
            if Arc::ptr_eq(key, svid) {
                return Arc::clone(config);
            }
        }
        let mut config = ClientConfig::clone(&self.base);
        config.alpn_protocols = vec![ALPN_MUX.to_vec()];
        config.client_auth_cert_resolver = Arc::new(PinnedSvid(Arc::clone(svid)));
        // Pooled connections are long-lived: a full handshake each is
        // cheap, and no ticket outlives the SVID it was made with.
        config.resumption = rustls::client::Resumption::disabled();
        let config = Arc::new(config);
        *pinned = Some((Arc::clone(svid), Arc::clone(&config)));
        config
    }

    /// Makes a new pooled connection (the balancer's pick, retried once
    /// elsewhere when the upstream cuts the handshake off) and returns a
    /// slot on it.
    async fn dial(
        &self,
        out: &Outbound,
        svid: &Arc<CertifiedKey>,
        span: &mut ConnSpan<'_>,
    ) -> Result<StreamSlot, Refusal> {
        let t = &out.tunnel;
        let generation = t.store.generation();
        let config = self.config_for(svid);
        let mut attempts_left = 2;
        let (tls, chosen, registration, closer, peer) = loop {
            attempts_left -= 1;
            let (tcp, chosen) = out
                .balancer
                .connect()
                .await
                .map_err(|e| Refusal::new(ConnResult::upstream_error, e.to_string()))?;
            let upstream = chosen.name().to_string();
            let local = tcp
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
            let started = Instant::now();
            let handshake = tokio::time::timeout(
                t.settings.handshake_timeout,
                TlsConnector::from(Arc::clone(&config))
                    .connect(server_name(&upstream), ReadAhead::new(tcp)),
            )
            .await;
            t.metrics
                .handshake_seconds
                .observe(started.elapsed().as_secs_f64());
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    if crate::proxy::handshake_cut_off(&e) {
                        chosen.report_failure();
                        if attempts_left > 0 {
                            debug!(upstream = %upstream, error = %e, "upstream cut the handshake off; trying another");
                            continue;
                        }
                    }
                    let (result, reason) = classify_handshake_error(&e, span);
                    return Err(Refusal::new(
                        result,
                        format!("upstream {upstream}: {reason}"),
                    ));
                }
                Err(_) => {
                    return Err(Refusal::new(
                        ConnResult::handshake_error,
                        format!(
                            "upstream {upstream}: handshake timed out after {:?}",
                            t.settings.handshake_timeout
                        ),
                    ))
                }
            };
            chosen.report_success();
            t.metrics.count_handshake(false);
            let (registration, closer) = t.register(local);
            let (_, session) = tls.get_ref();
            let peer = t
                .admit(
                    session.peer_certificates(),
                    generation,
                    &registration,
                    PeerRole::Server,
                )
                .map_err(|e| {
                    let result = if e.is_denial() {
                        ConnResult::denied
                    } else {
                        ConnResult::handshake_error
                    };
                    Refusal::new(result, format!("upstream {upstream}: {e}"))
                })?;
            if session.alpn_protocol() != Some(ALPN_MUX) {
                return Err(Refusal::new(
                    ConnResult::upstream_error,
                    format!(
                        "upstream {upstream} does not accept multiplexed connections (it did not choose ALPN h2): \
                         upgrade it or set multiplex = false"
                    ),
                ));
            }
            break (tls, chosen, registration, closer, peer);
        };
        let upstream = chosen.name().to_string();
        let chain: Arc<[_]> = tls
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .into();
        let (sender, connection) = tokio::time::timeout(
            t.settings.handshake_timeout,
            client_builder().handshake(tls),
        )
        .await
        .map_err(|_| {
            Refusal::new(
                ConnResult::handshake_error,
                format!("upstream {upstream}: HTTP/2 handshake timed out"),
            )
        })?
        .map_err(|e| {
            Refusal::new(
                ConnResult::upstream_error,
                format!("upstream {upstream}: HTTP/2 handshake failed: {e}"),
            )
        })?;
        debug!(upstream = %upstream, "multiplexed connection established");
        let slot = self.pool.insert(
            chosen.addr(),
            upstream,
            Arc::clone(svid),
            peer,
            chain,
            closer,
            sender,
            self.settings.max_streams_per_connection as usize,
        );
        tokio::spawn(pool::run(
            Arc::clone(&self.pool),
            Arc::clone(&slot.conn),
            connection,
            Arc::clone(t),
            self.settings.pool_idle_timeout,
            (registration, chosen),
        ));
        Ok(slot)
    }

    /// Opens a CONNECT stream on `slot`'s connection and waits for the
    /// inbound's answer.
    async fn open(&self, out: &Outbound, slot: &StreamSlot) -> Open {
        let conn = &slot.conn;
        let Some(sender) = conn.sender() else {
            return Open::Retry("its connection is closing".into());
        };
        let authority = match &self.settings.authority {
            Some(a) => a.clone(),
            None => conn.addr.to_string(),
        };
        let request = match http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority.as_str())
            .body(())
        {
            Ok(r) => r,
            Err(e) => {
                return Open::Refused(Refusal::new(
                    ConnResult::upstream_error,
                    format!("authority {authority:?}: {e}"),
                ))
            }
        };
        let t = &out.tunnel;
        // The inbound answers once it has reached its target.
        let wait = t.settings.connect_timeout + t.settings.handshake_timeout;
        let exchange = async {
            let mut sender = sender.ready().await?;
            let (response, send) = sender.send_request(request, false)?;
            Ok::<_, h2::Error>((response.await?, send))
        };
        let (response, send) = match tokio::time::timeout(wait, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => {
                let retry = e.reason() == Some(h2::Reason::REFUSED_STREAM)
                    || e.is_go_away()
                    || e.is_io()
                    || conn.closer.is_closed();
                if retry {
                    if e.reason() == Some(h2::Reason::REFUSED_STREAM) {
                        t.metrics.mux.refuse(StreamRefusal::stream_limit);
                    }
                    return Open::Retry(e.to_string());
                }
                return Open::Refused(Refusal::new(
                    ConnResult::upstream_error,
                    format!("upstream {}: stream failed: {e}", conn.upstream),
                ));
            }
            Err(_) => {
                return Open::Refused(Refusal::new(
                    ConnResult::upstream_error,
                    format!(
                        "upstream {}: no answer to CONNECT within {wait:?}",
                        conn.upstream
                    ),
                ))
            }
        };
        let status = response.status();
        if status == http::StatusCode::OK {
            return Open::Ready(H2Stream::new(send, response.into_body()));
        }
        let why = response
            .headers()
            .get(REFUSAL_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no reason given")
            .to_string();
        let (result, stream) = match status.as_u16() {
            403 => (ConnResult::denied, StreamRefusal::denied),
            421 => (ConnResult::upstream_error, StreamRefusal::authority),
            503 => (ConnResult::upstream_error, StreamRefusal::over_limit),
            502 | 504 => (ConnResult::upstream_error, StreamRefusal::upstream_error),
            _ => (ConnResult::upstream_error, StreamRefusal::bad_request),
        };
        Open::Refused(Refusal {
            result,
            stream: Some(stream),
            reason: format!(
                "upstream {} refused the stream with {status}: {why}",
                conn.upstream
            ),
        })
    }
}
