//! The inbound side of multiplexing: an authorized TLS connection that
//! chose ALPN `spiffe-tunnel-h2` becomes an HTTP/2 server whose every CONNECT stream is
//! one tunnelled connection to the inbound's target.
//!
//! Each stream passes its own checks, in this order, before the target
//! hears of it: a place under the tunnel's `max_connections` (503), a
//! CONNECT (405, or 400 with no authority), for an authority this inbound
//! serves, that is its `target` or the address the client dialled (421),
//! from a peer the policy in force *now* allows (403; the peer is the TLS
//! connection's, verified at its handshake), and a target that answers
//! (502). Only then is it answered 200 and carried like a direct
//! connection (PROXY header, copy, limits, closing). Every refusal is
//! logged with its reason in the stream's span and counted twice: under
//! `spiffe_tunnel_connections_total{result}` like a direct refusal, and
//! under `spiffe_tunnel_mux_streams_refused_total{reason}`.
//!
//! The connection's limits are h2's, configured in [`super::server_builder`]:
//! at most `max_streams_per_connection` streams at once (more are refused
//! with REFUSED_STREAM before they reach us), a bounded header list, and a
//! connection error for a peer that makes h2 reset streams in a flood.
//! The connection ends with its registry entry: a revocation or drain
//! closes it and every stream on it; the tunnel stopping sends GOAWAY and
//! lets its streams finish; with no stream for `idle_timeout` it is closed
//! too.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tracing::{debug, Instrument};

use super::stream::H2Stream;
use super::{server_builder, REFUSAL_HEADER};
use crate::config::Target;
use crate::metrics::{ConnResult, StreamRefusal};
use crate::proxy::conn_span::ConnSpan;
use crate::proxy::inbound::Inbound;
use crate::proxy::registry::Closer;
use crate::tls::verify::{authorize, VerifiedPeer};

/// What every stream of one connection shares.
pub struct Conn {
    pub peer: VerifiedPeer,
    /// The connection's closer; each stream's is a child of it.
    pub close: Closer,
    /// The PROXY v2 header, the same for every stream (it names the TLS
    /// connection's addresses and the peer).
    pub proxy_header: Option<Arc<[u8]>>,
    pub client: SocketAddr,
    /// The address the client dialled.
    pub local: SocketAddr,
}

/// Serves the streams of one multiplexed connection until it ends.
pub async fn serve<IO>(inbound: &Arc<Inbound>, tls: IO, conn: Conn, span: &ConnSpan<'_>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let t = &inbound.tunnel;
    let builder = server_builder(inbound.config.max_streams_per_connection);
    // The client preface and SETTINGS come right after the TLS handshake.
    let handshake = tokio::time::timeout(t.settings.handshake_timeout, builder.handshake(tls));
    let mut h2 = match handshake.await {
        Ok(Ok(h2)) => h2,
        Ok(Err(e)) => {
            t.refuse(
                span,
                ConnResult::handshake_error,
                &format_args!("HTTP/2 handshake failed: {e}"),
            );
            return;
        }
        Err(_) => {
            t.refuse(
                span,
                ConnResult::handshake_error,
                &format_args!(
                    "no HTTP/2 preface within {:?} of the TLS handshake",
                    t.settings.handshake_timeout
                ),
            );
            return;
        }
    };
    t.metrics.mux.connections.inc();
    t.metrics.mux.opened.inc();
    let conn = Arc::new(conn);
    let streams = Arc::new(Streams::default());
    let mut carried = 0u64;
    let mut stopping = false;
    let mut idle_since = tokio::time::Instant::now();
    let idle_timeout = t.settings.idle_timeout;
    let why = loop {
        let idle_check = tokio::time::sleep_until(idle_since + idle_timeout);
        let next = tokio::select! {
            biased;
            () = conn.close.token().cancelled() => break "closed by spiffe-tunnel (revoked or drained)",
            () = t.stop_accepting.cancelled(), if !stopping => {
                // No new streams; those open finish, then accept ends.
                stopping = true;
                h2.graceful_shutdown();
                continue;
            }
            () = streams.ended.notified() => {
                idle_since = tokio::time::Instant::now();
                continue;
            }
            () = idle_check => {
                if streams.open.load(Ordering::Acquire) == 0 {
                    h2.graceful_shutdown();
                }
                idle_since = tokio::time::Instant::now();
                continue;
            }
            next = h2.accept() => next,
        };
        match next {
            Some(Ok((request, respond))) => {
                carried += 1;
                streams.open.fetch_add(1, Ordering::AcqRel);
                let stream = Stream {
                    inbound: Arc::clone(inbound),
                    conn: Arc::clone(&conn),
                    close: conn.close.child(),
                    streams: Arc::clone(&streams),
                };
                t.connections.spawn(stream.run(request, respond));
            }
            Some(Err(e)) => {
                debug!(error = %e, "multiplexed connection failed");
                break "failed";
            }
            None => break "closed",
        }
    };
    span.in_scope(|| debug!(why, streams = carried, "multiplexed connection ended"));
    t.metrics.mux.connections.dec();
    t.metrics.mux.streams_per_connection.observe(carried as f64);
}

/// The streams of one connection that are open now.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    /// Woken when a stream ends.
    ended: Notify,
}

/// One CONNECT stream.
struct Stream {
    inbound: Arc<Inbound>,
    conn: Arc<Conn>,
    close: Closer,
    streams: Arc<Streams>,
}

impl Stream {
    async fn run(self, request: Request<RecvStream>, respond: SendResponse<Bytes>) {
        let t = &self.inbound.tunnel;
        let live = t.access_log || tracing::enabled!(tracing::Level::DEBUG);
        let mut span = ConnSpan::new(live, &t.name, "inbound", self.conn.client);
        span.set_peer(&self.conn.peer.id);
        span.set_multiplexed(true);
        let live = span.live();
        self.carry(request, respond, &span).instrument(live).await;
        self.streams.open.fetch_sub(1, Ordering::AcqRel);
        self.streams.ended.notify_one();
    }

    async fn carry(
        &self,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        span: &ConnSpan<'_>,
    ) {
        let inbound = &self.inbound;
        let t = &inbound.tunnel;
        let refuse = |respond: &mut SendResponse<Bytes>,
                      status: StatusCode,
                      stream: StreamRefusal,
                      result: ConnResult,
                      why: String| {
            let _ = respond.send_response(refusal(status, &why), true);
            t.metrics.mux.refuse(stream);
            t.refuse(span, result, &why);
        };
        let Some(_permit) = t.try_permit() else {
            let why = format!("max_connections ({}) reached", t.settings.max_connections);
            return refuse(
                &mut respond,
                StatusCode::SERVICE_UNAVAILABLE,
                StreamRefusal::over_limit,
                ConnResult::over_limit,
                why,
            );
        };
        if request.method() != Method::CONNECT {
            let why = format!("{} stream: only CONNECT is served", request.method());
            return refuse(
                &mut respond,
                StatusCode::METHOD_NOT_ALLOWED,
                StreamRefusal::bad_request,
                ConnResult::handshake_error,
                why,
            );
        }
        let Some(authority) = request.uri().authority().map(|a| a.as_str().to_string()) else {
            return refuse(
                &mut respond,
                StatusCode::BAD_REQUEST,
                StreamRefusal::bad_request,
                ConnResult::handshake_error,
                "CONNECT without an authority".into(),
            );
        };
        if !serves(&inbound.config.target, self.conn.local, &authority) {
            let why = format!(
                "CONNECT for {:?}: this inbound serves only its target {} (or {}, the address dialled)",
                printable(&authority),
                inbound.config.target,
                self.conn.local
            );
            return refuse(
                &mut respond,
                StatusCode::MISDIRECTED_REQUEST,
                StreamRefusal::authority,
                ConnResult::denied,
                why,
            );
        }
        // The policy in force now, not the one of the handshake. A reload
        // that lands after this check closes the connection, and with it
        // this stream (its closer is the connection's child).
        if let Err(e) = authorize(&t.policy.load(), &self.conn.peer.id) {
            return refuse(
                &mut respond,
                StatusCode::FORBIDDEN,
                StreamRefusal::denied,
                ConnResult::denied,
                e.to_string(),
            );
        }
        if self.close.is_closed() {
            t.end_unforwarded(&self.close, "before the target was dialled");
            return;
        }
        let dialled = match inbound.dial_target(&self.close).await {
            Ok(dialled) => dialled,
            Err(Some(why)) => {
                return refuse(
                    &mut respond,
                    StatusCode::BAD_GATEWAY,
                    StreamRefusal::upstream_error,
                    ConnResult::upstream_error,
                    why,
                )
            }
            Err(None) => return,
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(e) => {
                debug!(error = %e, "the stream went before it was answered");
                return;
            }
        };
        let mut stream = H2Stream::new(send, request.into_body());
        t.metrics.mux.streams.inc();
        inbound
            .forward_to(
                &mut stream,
                dialled,
                self.conn.proxy_header.as_deref(),
                &self.conn.peer,
                &self.close,
                span,
            )
            .await;
        t.metrics.mux.streams.dec();
        stream
            .finish(t.settings.idle_timeout, self.close.token())
            .await;
    }
}

/// Whether `authority` names what this inbound serves: its target as
/// configured, or the address the client dialled to reach it.
fn serves(target: &Target, local: SocketAddr, authority: &str) -> bool {
    if let Target::Tcp(addr) = target {
        if addr.eq_ignore_ascii_case(authority) {
            return true;
        }
    }
    authority
        .parse::<SocketAddr>()
        .is_ok_and(|asked| asked == local)
}

/// A refused CONNECT's answer, with the reason in a header.
fn refusal(status: StatusCode, why: &str) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(&printable(why)) {
        response.headers_mut().insert(REFUSAL_HEADER, value);
    }
    response
}

/// `text` fit for a header value and a log line: printable ASCII, at
/// most 300 characters (an authority comes from the peer).
fn printable(text: &str) -> String {
    text.chars()
        .take(300)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inbound_serves_its_target_and_the_address_dialled_only() {
        let local: SocketAddr = "10.0.0.2:8443".parse().unwrap();
        let target = Target::Tcp("app.local:3000".into());
        assert!(serves(&target, local, "app.local:3000"));
        assert!(serves(&target, local, "APP.local:3000"));
        assert!(serves(&target, local, "10.0.0.2:8443"));
        assert!(!serves(&target, local, "10.0.0.2:22"));
        assert!(!serves(&target, local, "app.local:3001"));
        assert!(!serves(&target, local, "metadata.internal:80"));
        let unix = Target::Unix("/run/app.sock".into());
        assert!(serves(&unix, local, "10.0.0.2:8443"));
        assert!(!serves(&unix, local, "unix:/run/app.sock"));
    }

    #[test]
    fn refusal_reasons_are_printable_and_bounded() {
        assert_eq!(printable("a\r\nb\u{0}é"), "a??b??");
        assert_eq!(printable(&"x".repeat(1000)).len(), 300);
    }
}
