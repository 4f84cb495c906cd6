//! Prometheus metrics, with the names of the user-facing contract.
//!
//! Built on `prometheus-client` (the Prometheus project's own Rust client:
//! typed metrics, OpenMetrics text encoding). Each tunnel resolves its
//! labelled series once when it starts ([`TunnelMetrics`]), so the
//! per-connection cost is a few atomic increments and no map lookups.

use std::sync::Mutex;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// How a connection ended up, for `spiffe_tunnel_connections_total{result}`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are snake_case on the wire
pub enum ConnResult {
    /// Authorized and connected through.
    ok,
    /// The peer verified but its SPIFFE ID is not allowed.
    denied,
    /// The TLS handshake failed or timed out, or the peer's SVID is invalid.
    handshake_error,
    /// The target (inbound) or upstream (outbound) could not be reached.
    upstream_error,
    /// Refused because the tunnel is at `max_connections`.
    over_limit,
    /// Refused because we hold no valid SVID to present.
    no_identity,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    /// From the side that opened the connection towards the target.
    client_to_server,
    server_to_client,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TunnelKind {
    inbound,
    outbound,
}

impl TunnelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TunnelKind::inbound => "inbound",
            TunnelKind::outbound => "outbound",
        }
    }
}

impl std::fmt::Display for TunnelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    tunnel: String,
    kind: TunnelKind,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    tunnel: String,
    kind: TunnelKind,
    result: ConnResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    tunnel: String,
    kind: TunnelKind,
    direction: Direction,
}

/// Whether a completed TLS handshake was a full one or a resumption.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum HandshakeMode {
    full,
    resumed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    tunnel: String,
    kind: TunnelKind,
    mode: HandshakeMode,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpiffeIdLabels {
    spiffe_id: String,
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    connections: Family<ConnLabels, Counter>,
    active: Family<TunnelLabels, Gauge>,
    bytes: Family<BytesLabels, Counter>,
    handshake_seconds: Family<TunnelLabels, Histogram>,
    handshakes: Family<HandshakeLabels, Counter>,
    svid_expiry: Family<SpiffeIdLabels, Gauge>,
    pub svid_rotations: Counter,
    pub workload_api_up: Gauge,
    policy_reloads: Family<ResultLabels, Counter>,
    identity_updates: Family<ResultLabels, Counter>,
    revoked: Family<TunnelLabels, Counter>,
    upgrades: Family<ResultLabels, Counter>,
    /// Serialises encoding with expiry-gauge replacement.
    expiry_lock: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connections = Family::<ConnLabels, Counter>::default();
        let active = Family::<TunnelLabels, Gauge>::default();
        let bytes = Family::<BytesLabels, Counter>::default();
        let handshake_seconds = Family::<TunnelLabels, Histogram>::new_with_constructor(
            handshake_histogram as fn() -> Histogram,
        );
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        let svid_expiry = Family::<SpiffeIdLabels, Gauge>::default();
        let svid_rotations = Counter::default();
        let workload_api_up = Gauge::default();
        let policy_reloads = Family::<ResultLabels, Counter>::default();
        let identity_updates = Family::<ResultLabels, Counter>::default();
        let revoked = Family::<TunnelLabels, Counter>::default();
        let upgrades = Family::<ResultLabels, Counter>::default();

        // prometheus-client appends `_total` to counters itself.
        registry.register(
            "spiffe_tunnel_connections",
            "Connections accepted, by how they ended up",
            connections.clone(),
        );
        registry.register(
            "spiffe_tunnel_connections_active",
            "Connections currently open",
            active.clone(),
        );
        registry.register(
            "spiffe_tunnel_bytes",
            "Bytes carried through tunnels",
            bytes.clone(),
        );
        registry.register(
            "spiffe_tunnel_handshake_duration_seconds",
            "TLS handshake duration, successful or not",
            handshake_seconds.clone(),
        );
        registry.register(
            "spiffe_tunnel_handshakes",
            "Completed TLS handshakes, full or resumed (a resumed one is still verified and authorized)",
            handshakes.clone(),
        );
        registry.register(
            "spiffe_tunnel_svid_expiry_timestamp_seconds",
            "Expiry (Unix time) of each SVID we hold",
            svid_expiry.clone(),
        );
        registry.register(
            "spiffe_tunnel_svid_rotations",
            "New SVIDs published after the first one",
            svid_rotations.clone(),
        );
        registry.register(
            "spiffe_tunnel_workload_api_up",
            "1 while the Workload API stream is connected",
            workload_api_up.clone(),
        );
        registry.register(
            "spiffe_tunnel_policy_reloads",
            "Policy and config reloads, by result",
            policy_reloads.clone(),
        );
        registry.register(
            "spiffe_tunnel_identity_updates",
            "Identity updates from the identity source, by result (ok, rejected)",
            identity_updates.clone(),
        );
        // Zero-valued series from the start, so dashboards and alerts see
        // "no failures yet" rather than "no data".
        for result in ["ok", "error"] {
            policy_reloads.get_or_create_owned(&ResultLabels { result });
        }
        for result in ["ok", "rejected"] {
            identity_updates.get_or_create_owned(&ResultLabels { result });
        }
        registry.register(
            "spiffe_tunnel_upgrades",
            "Upgrades in place (SIGUSR2) this process started, by result (ok: the new process took over; failed: it did not, and this one serves on)",
            upgrades.clone(),
        );
        for result in ["ok", "failed"] {
            upgrades.get_or_create_owned(&ResultLabels { result });
        }
        registry.register(
            "spiffe_tunnel_connections_revoked",
            "Live connections closed because a reload or bundle change no longer allows their peer",
            revoked.clone(),
        );
        Self {
            registry,
            connections,
            active,
            bytes,
            handshake_seconds,
            handshakes,
            svid_expiry,
            svid_rotations,
            workload_api_up,
            policy_reloads,
            identity_updates,
            revoked,
            upgrades,
            expiry_lock: Mutex::new(()),
        }
    }

    /// The series of one tunnel, resolved once.
    pub fn tunnel(&self, name: &str, kind: TunnelKind) -> TunnelMetrics {
        let labels = TunnelLabels {
            tunnel: name.to_string(),
            kind,
        };
        let result = |result| {
            self.connections.get_or_create_owned(&ConnLabels {
                tunnel: name.to_string(),
                kind,
                result,
            })
        };
        let bytes = |direction| {
            self.bytes.get_or_create_owned(&BytesLabels {
                tunnel: name.to_string(),
                kind,
                direction,
            })
        };
        let handshakes = |mode| {
            self.handshakes.get_or_create_owned(&HandshakeLabels {
                tunnel: name.to_string(),
                kind,
                mode,
            })
        };
        TunnelMetrics {
            ok: result(ConnResult::ok),
            denied: result(ConnResult::denied),
            handshake_error: result(ConnResult::handshake_error),
            upstream_error: result(ConnResult::upstream_error),
            over_limit: result(ConnResult::over_limit),
            no_identity: result(ConnResult::no_identity),
            active: self.active.get_or_create_owned(&labels),
            client_to_server: bytes(Direction::client_to_server),
            server_to_client: bytes(Direction::server_to_client),
            handshake_seconds: self.handshake_seconds.get_or_create_owned(&labels),
            revoked: self.revoked.get_or_create_owned(&labels),
            full_handshakes: handshakes(HandshakeMode::full),
            resumed_handshakes: handshakes(HandshakeMode::resumed),
        }
    }

    pub fn policy_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.policy_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// One upgrade in place, taken over by the new process or failed.
    pub fn upgrade(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.upgrades.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn identity_update(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.identity_updates
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Replaces the SVID expiry series with the SVIDs we hold now.
    pub fn set_svid_expiries(&self, svids: impl IntoIterator<Item = (String, i64)>) {
        let _guard = self.expiry_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.svid_expiry.clear();
        for (spiffe_id, expiry) in svids {
            self.svid_expiry
                .get_or_create(&SpiffeIdLabels { spiffe_id })
                .set(expiry);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let _guard = self.expiry_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn handshake_histogram() -> Histogram {
    // 0.5 ms .. ~8 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

/// The pre-resolved series of one tunnel.
#[derive(Debug, Clone)]
pub struct TunnelMetrics {
    ok: Counter,
    denied: Counter,
    handshake_error: Counter,
    upstream_error: Counter,
    over_limit: Counter,
    no_identity: Counter,
    pub active: Gauge,
    pub client_to_server: Counter,
    pub server_to_client: Counter,
    pub handshake_seconds: Histogram,
    pub revoked: Counter,
    full_handshakes: Counter,
    resumed_handshakes: Counter,
}

impl TunnelMetrics {
    pub fn count(&self, result: ConnResult) {
        match result {
            ConnResult::ok => &self.ok,
            ConnResult::denied => &self.denied,
            ConnResult::handshake_error => &self.handshake_error,
            ConnResult::upstream_error => &self.upstream_error,
            ConnResult::over_limit => &self.over_limit,
            ConnResult::no_identity => &self.no_identity,
        }
        .inc();
    }

    /// Counts a completed handshake.
    pub fn count_handshake(&self, resumed: bool) {
        if resumed {
            self.resumed_handshakes.inc();
        } else {
            self.full_handshakes.inc();
        }
    }
}
