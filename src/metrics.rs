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
    /// `present = "caller"`: refused because the connecting process could
    /// not be identified (remote, or no owner found) or holds no SVID of
    /// its own (no entry, too many callers, admin API refused).
    caller_refused,
}

/// How an authorized connection ended, for
/// `spiffe_tunnel_connections_closed_total{end}`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ConnEnd {
    /// Both sides finished sending.
    done,
    /// The TLS peer closed without close_notify: what it sent was
    /// delivered, then the plain side was reset.
    truncated,
    /// A side reset the connection (or the pipe broke).
    reset,
    /// Nothing moved for `idle_timeout`.
    idle,
    /// A reload or a bundle change no longer allows the peer.
    revoked,
    /// Closed at a drain deadline (shutdown, or its tunnel removed).
    drained,
    /// Older than `max_connection_lifetime`.
    lifetime,
    /// Any other failure (a TLS error, a refused write).
    error,
}

impl ConnEnd {
    pub const ALL: [ConnEnd; 8] = [
        ConnEnd::done,
        ConnEnd::truncated,
        ConnEnd::reset,
        ConnEnd::idle,
        ConnEnd::revoked,
        ConnEnd::drained,
        ConnEnd::lifetime,
        ConnEnd::error,
    ];
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
struct EndLabels {
    tunnel: String,
    kind: TunnelKind,
    end: ConnEnd,
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

/// Why a stream of a multiplexed connection was refused, for
/// `spiffe_tunnel_mux_streams_refused_total{reason}`.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StreamRefusal {
    /// The CONNECT named an authority the inbound does not serve.
    authority,
    /// The peer's SPIFFE ID is not allowed by the policy in force.
    denied,
    /// The tunnel is at `max_connections`.
    over_limit,
    /// The target could not be reached.
    upstream_error,
    /// Not a CONNECT, or a malformed one.
    bad_request,
    /// The connection was at its stream bound (REFUSED_STREAM).
    stream_limit,
}

impl StreamRefusal {
    pub const ALL: [StreamRefusal; 6] = [
        StreamRefusal::authority,
        StreamRefusal::denied,
        StreamRefusal::over_limit,
        StreamRefusal::upstream_error,
        StreamRefusal::bad_request,
        StreamRefusal::stream_limit,
    ];
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    tunnel: String,
    kind: TunnelKind,
    reason: StreamRefusal,
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
    closed: Family<EndLabels, Counter>,
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
    /// Admin connections refused for being over the admin endpoint's limit.
    pub admin_refused: Counter,
    /// The process's cache of verified chains, read when encoding.
    verified_chains: Gauge,
    verified_chain_bytes: Gauge,
    mux_connections: Family<TunnelLabels, Gauge>,
    mux_opened: Family<TunnelLabels, Counter>,
    mux_streams: Family<TunnelLabels, Gauge>,
    mux_streams_per_connection: Family<TunnelLabels, Histogram>,
    mux_refused: Family<RefusalLabels, Counter>,
    delegated_fetches: Family<ResultLabels, Counter>,
    /// Live per-caller subscriptions of the Delegated Identity API.
    pub delegated_subscriptions: Gauge,
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
        let closed = Family::<EndLabels, Counter>::default();
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
        let verified_chains = Gauge::default();
        let admin_refused = Counter::default();
        let verified_chain_bytes = Gauge::default();
        let mux_connections = Family::<TunnelLabels, Gauge>::default();
        let mux_opened = Family::<TunnelLabels, Counter>::default();
        let mux_streams = Family::<TunnelLabels, Gauge>::default();
        let mux_streams_per_connection = Family::<TunnelLabels, Histogram>::new_with_constructor(
            streams_histogram as fn() -> Histogram,
        );
        let mux_refused = Family::<RefusalLabels, Counter>::default();
        let delegated_fetches = Family::<ResultLabels, Counter>::default();
        let delegated_subscriptions = Gauge::default();

        // prometheus-client appends `_total` to counters itself.
        registry.register(
            "spiffe_tunnel_connections",
            "Connections accepted, by how they ended up",
            connections.clone(),
        );
        registry.register(
            "spiffe_tunnel_connections_closed",
            "Authorized connections that ended, by how they ended",
            closed.clone(),
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
            "Expiry (Unix time) of each SVID we hold; of the first to expire when several carry one SPIFFE ID",
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
            "spiffe_tunnel_delegated_fetches",
            "Answers of SPIRE's Delegated Identity API for callers of present = \"caller\" outbounds, by result (ok: SVIDs received; no_entry: an answer with no SVID; denied: PermissionDenied; error: any other failure; over_limit: a new caller refused at max_callers)",
            delegated_fetches.clone(),
        );
        for result in DELEGATED_RESULTS {
            delegated_fetches.get_or_create_owned(&ResultLabels { result });
        }
        registry.register(
            "spiffe_tunnel_delegated_subscriptions",
            "Live per-caller subscriptions to SPIRE's Delegated Identity API",
            delegated_subscriptions.clone(),
        );
        registry.register(
            "spiffe_tunnel_connections_revoked",
            "Live connections closed because a reload or bundle change no longer allows their peer",
            revoked.clone(),
        );
        registry.register(
            "spiffe_tunnel_admin_connections_refused",
            "Admin endpoint connections refused because as many as it serves at once were open",
            admin_refused.clone(),
        );
        registry.register(
            "spiffe_tunnel_verified_chains",
            "Peer chains remembered as verified (of admitted peers only), for the current identity snapshot",
            verified_chains.clone(),
        );
        registry.register(
            "spiffe_tunnel_verified_chains_bytes",
            "What the remembered verified chains cost in memory, bounded at 4 MiB",
            verified_chain_bytes.clone(),
        );
        registry.register(
            "spiffe_tunnel_mux_connections",
            "Multiplexed (HTTP/2) mTLS connections open: pooled ones of an outbound, accepted ones of an inbound",
            mux_connections.clone(),
        );
        registry.register(
            "spiffe_tunnel_mux_connections_opened",
            "Multiplexed mTLS connections established",
            mux_opened.clone(),
        );
        registry.register(
            "spiffe_tunnel_mux_streams_active",
            "Tunnelled connections carried as streams of multiplexed connections right now",
            mux_streams.clone(),
        );
        registry.register(
            "spiffe_tunnel_mux_streams_per_connection",
            "Streams a multiplexed connection carried in its life, observed when it closes",
            mux_streams_per_connection.clone(),
        );
        registry.register(
            "spiffe_tunnel_mux_streams_refused",
            "Streams of multiplexed connections refused, by reason",
            mux_refused.clone(),
        );
        Self {
            mux_connections,
            mux_opened,
            mux_streams,
            mux_streams_per_connection,
            mux_refused,
            registry,
            connections,
            closed,
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
            admin_refused,
            verified_chains,
            verified_chain_bytes,
            delegated_fetches,
            delegated_subscriptions,
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
        let closed = ConnEnd::ALL.map(|end| {
            self.closed.get_or_create_owned(&EndLabels {
                tunnel: name.to_string(),
                kind,
                end,
            })
        });
        TunnelMetrics {
            closed,
            ok: result(ConnResult::ok),
            denied: result(ConnResult::denied),
            handshake_error: result(ConnResult::handshake_error),
            upstream_error: result(ConnResult::upstream_error),
            over_limit: result(ConnResult::over_limit),
            no_identity: result(ConnResult::no_identity),
            caller_refused: result(ConnResult::caller_refused),
            active: self.active.get_or_create_owned(&labels),
            client_to_server: bytes(Direction::client_to_server),
            server_to_client: bytes(Direction::server_to_client),
            handshake_seconds: self.handshake_seconds.get_or_create_owned(&labels),
            revoked: self.revoked.get_or_create_owned(&labels),
            full_handshakes: handshakes(HandshakeMode::full),
            resumed_handshakes: handshakes(HandshakeMode::resumed),
            mux: MuxMetrics {
                connections: self.mux_connections.get_or_create_owned(&labels),
                opened: self.mux_opened.get_or_create_owned(&labels),
                streams: self.mux_streams.get_or_create_owned(&labels),
                streams_per_connection: self
                    .mux_streams_per_connection
                    .get_or_create_owned(&labels),
                refused: StreamRefusal::ALL.map(|reason| {
                    self.mux_refused.get_or_create_owned(&RefusalLabels {
                        tunnel: name.to_string(),
                        kind,
                        reason,
                    })
                }),
            },
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

    /// One answer (or failure) of the Delegated Identity API; `result` is
    /// one of [`DELEGATED_RESULTS`].
    pub fn delegated_fetch(&self, result: &'static str) {
        self.delegated_fetches
            .get_or_create(&ResultLabels { result })
            .inc();
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
        let (chains, bytes) = crate::tls::verify::remembered_chains();
        self.verified_chains
            .set(i64::try_from(chains).unwrap_or(i64::MAX));
        self.verified_chain_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The results of `spiffe_tunnel_delegated_fetches_total`.
pub const DELEGATED_RESULTS: [&str; 5] = ["ok", "no_entry", "denied", "error", "over_limit"];

fn handshake_histogram() -> Histogram {
    // 0.5 ms .. ~8 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 15))
}

fn streams_histogram() -> Histogram {
    // 1 .. ~16k streams over a connection's life
    Histogram::new(exponential_buckets(1.0, 4.0, 8))
}

/// The multiplexing series of one tunnel.
#[derive(Debug, Clone)]
pub struct MuxMetrics {
    pub connections: Gauge,
    pub opened: Counter,
    pub streams: Gauge,
    pub streams_per_connection: Histogram,
    /// By [`StreamRefusal::ALL`] order.
    refused: [Counter; StreamRefusal::ALL.len()],
}

impl MuxMetrics {
    /// Counts a refused stream.
    pub fn refuse(&self, reason: StreamRefusal) {
        if let Some(counter) = self.refused.get(reason as usize) {
            counter.inc();
        }
    }
}

/// The pre-resolved series of one tunnel.
#[derive(Debug, Clone)]
pub struct TunnelMetrics {
    /// By [`ConnEnd::ALL`] order.
    closed: [Counter; ConnEnd::ALL.len()],
    ok: Counter,
    denied: Counter,
    handshake_error: Counter,
    upstream_error: Counter,
    over_limit: Counter,
    no_identity: Counter,
    caller_refused: Counter,
    pub active: Gauge,
    pub client_to_server: Counter,
    pub server_to_client: Counter,
    pub handshake_seconds: Histogram,
    pub revoked: Counter,
    full_handshakes: Counter,
    resumed_handshakes: Counter,
    pub mux: MuxMetrics,
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
            ConnResult::caller_refused => &self.caller_refused,
        }
        .inc();
    }

    /// Counts an authorized connection that ended.
    pub fn count_end(&self, end: ConnEnd) {
        // `ALL` lists the variants in declaration order (a test checks).
        if let Some(counter) = self.closed.get(end as usize) {
            counter.inc();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_is_counted_under_its_own_label() {
        for (i, end) in ConnEnd::ALL.iter().enumerate() {
            assert_eq!(*end as usize, i, "ConnEnd::ALL is out of order");
        }
        for (i, reason) in StreamRefusal::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "StreamRefusal::ALL is out of order");
        }
        let metrics = Metrics::new();
        let tunnel = metrics.tunnel("api", TunnelKind::inbound);
        tunnel.count_end(ConnEnd::truncated);
        tunnel.count_end(ConnEnd::truncated);
        tunnel.count_end(ConnEnd::revoked);
        let text = metrics.encode();
        let series = |end: &str| {
            format!("spiffe_tunnel_connections_closed_total{{tunnel=\"api\",kind=\"inbound\",end=\"{end}\"}} ")
        };
        assert!(text.contains(&(series("truncated") + "2")), "{text}");
        assert!(text.contains(&(series("revoked") + "1")), "{text}");
        // Every end is exposed from the start, at zero.
        assert!(text.contains(&(series("done") + "0")), "{text}");
        assert!(text.contains(&(series("error") + "0")), "{text}");
    }
}
