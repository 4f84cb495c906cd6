//! The admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics`, `/status`.
//!
//! It only reads what the daemon shares ([`Shared`]): it can never change
//! the data plane. Served with hyper's HTTP/1 server (already in the
//! dependency tree through tonic) rather than a web framework: four fixed
//! routes need no router. Bind it to loopback or a management network; it
//! has no authentication, like HAProxy's stats page or Envoy's admin port.
//!
//! It must not slow the data plane down however it is polled: at most
//! [`MAX_CONNECTIONS`] connections are served at once (more are answered
//! 503 and closed at once, counted and logged rate-limited), and `/status`
//! copies what it shows of the connection registry under its lock (a
//! pointer per connection) and renders it after letting go.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::metrics::ConnResult;
use crate::proxy::refusal_log::RefusalLog;
use crate::runtime::{unix_seconds, Shared, TunnelConfig};

/// Admin connections served at once. A scraper, a health checker and a
/// person need a few; a local client opening more only wants CPU the
/// tunnels need.
pub const MAX_CONNECTIONS: usize = 16;

/// What a connection over [`MAX_CONNECTIONS`] is told before it is closed.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 32\r\nConnection: close\r\n\r\ntoo many admin connections open\n";

/// Serves the admin endpoint until the task is aborted.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let refusals = RefusalLog::new("admin", "admin");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "admin endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            shared.metrics.admin_refused.inc();
            let reason = format!("{MAX_CONNECTIONS} admin connections are open already");
            if refusals.allow(ConnResult::over_limit, &reason) {
                warn!(client = %peer, reason = %reason, "admin connection refused");
            }
            // One write that cannot block (a fresh socket's send buffer
            // is empty), then the socket closes.
            let _ = stream.try_write(BUSY);
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request| {
                let response = route(&shared, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // A client that never finishes its request line is cut off.
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                debug!(client = %peer, error = %e, "admin connection ended");
            }
        });
    }
}

fn route(shared: &Shared, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match shared.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(reasons) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready:\n- {}\n", reasons.join("\n- ")),
            ),
        },
        "/metrics" => with_type(
            StatusCode::OK,
            shared.metrics.encode(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
        "/status" => with_type(
            StatusCode::OK,
            serde_json::to_string_pretty(&status(shared)).unwrap_or_default() + "\n",
            "application/json",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics or /status\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, body, "text/plain; charset=utf-8")
}

fn with_type(
    status: StatusCode,
    body: String,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn rfc3339(t: SystemTime) -> String {
    crate::timefmt::rfc3339(t)
}

/// The `/status` document.
pub fn status(shared: &Shared) -> Value {
    let identity = shared.store.load();
    let now = SystemTime::now();
    let svids: Vec<Value> = identity
        .iter()
        .flat_map(|i| i.svids.iter())
        .map(|s| {
            json!({
                "spiffe_id": s.id.to_string(),
                "serial": s.serial,
                "not_before": rfc3339(s.not_before),
                "not_after": rfc3339(s.not_after),
                "expires_in_seconds": unix_seconds(s.not_after) - unix_seconds(now),
                "valid": s.is_valid_at(now),
            })
        })
        .collect();
    let bundles: Vec<Value> = identity
        .iter()
        .flat_map(|i| i.bundles.iter())
        .map(|b| json!({ "trust_domain": b.trust_domain.to_string(), "ca_count": b.certs.len() }))
        .collect();
    let connections = shared.registry.snapshot();
    let tunnels: Vec<Value> = shared
        .tunnels
        .load()
        .iter()
        .map(|entry| {
            let t = &entry.tunnel;
            let mut v = json!({
                "name": t.name,
                "kind": t.kind_name(),
                "listen": entry.config.listen().to_string(),
                "listening": entry.listening.load(Ordering::Relaxed),
                "active_connections": t.active_connections(),
                "max_connections": t.settings.max_connections,
                "policy_rules": t.policy.load().len(),
                "last_refusal": t.last_refusal().map(|r| r.to_string()),
            });
            match &entry.config {
                TunnelConfig::Inbound(c) => {
                    v["target"] = json!(c.target.to_string());
                    v["proxy_protocol"] = json!(c.proxy_protocol);
                }
                TunnelConfig::Outbound(c) => {
                    v["upstreams"] = json!(c.upstreams);
                    v["endpoints"] = json!(entry
                        .balancer
                        .iter()
                        .flat_map(|b| b.snapshot())
                        .map(|e| json!({
                            "upstream": e.upstream,
                            "addr": e.addr.to_string(),
                            "healthy": e.healthy,
                            "active": e.active,
                            "ejected_for_ms": e.ejected_for.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                            "consecutive_failures": e.consecutive_failures,
                        }))
                        .collect::<Vec<_>>());
                }
            }
            v["peers"] = json!(connections
                .iter()
                .filter(|c| c.tunnel == t.name && c.kind == t.kind)
                .filter_map(|c| c.peer.as_ref().map(|p| (c, p)))
                .map(|(c, p)| json!({
                    "client": c.client.to_string(),
                    "peer_id": p.id.to_string(),
                    "peer_serial": p.serial,
                    "since": rfc3339(c.since),
                }))
                .collect::<Vec<_>>());
            v
        })
        .collect();
    let workload_api = shared.api_health.as_ref().map(|health| {
        let h = health.borrow();
        json!({
            "connected": h.connected,
            "last_error": h.last_error,
            "last_update": h.last_update.map(rfc3339),
        })
    });
    let last_reload = shared.last_reload.load_full().map(|r| {
        json!({ "at": rfc3339(r.at), "result": if r.ok { "ok" } else { "error" }, "message": r.message })
    });
    let readiness = shared.readiness();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "config": shared.config_path.display().to_string(),
        "started": rfc3339(shared.started),
        "ready": readiness.is_ok(),
        "not_ready_reasons": readiness.err().unwrap_or_default(),
        "draining": shared.draining.load(Ordering::Relaxed),
        "identity": {
            "source": shared.identity_source,
            "svids": svids,
            "bundles": bundles,
        },
        "workload_api": workload_api,
        "delegated": shared.delegated.as_ref().map(|d| json!({ "subscriptions": d.status() })),
        "tunnels": tunnels,
        "last_reload": last_reload,
    })
}
