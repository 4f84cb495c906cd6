//! The TOML config file: its schema, its defaults, and validation whose every
//! error names the file, the line and the key.
//!
//! Parsing happens in two steps. Serde reads the file into `Raw*` structs
//! that mirror the syntax (unknown keys are errors, values keep their byte
//! spans); [`Config::parse`] then resolves relative paths against the config
//! file's folder, applies `[defaults]` and validates every value, so a
//! [`Config`] that exists is one that can run. Policy files are read
//! separately, by [`PolicySpec::load`] (see [`Config::load_policies`]), so
//! that SIGHUP can re-read them without re-reading the config.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::identity::files::FileIdentity;
use crate::identity::SvidSelector;
use crate::policy::{self, Policy, PolicyError, Rule};
use crate::spiffe_id;

/// A config file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: {key}{}{message}", if .key.is_empty() { "" } else { ": " })]
    Invalid {
        file: String,
        line: usize,
        key: String,
        message: String,
    },
    #[error("{0}")]
    Policy(#[from] PolicyError),
}

/// Which TLS versions a tunnel speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinTls {
    /// TLS 1.3 only: the default.
    Tls13,
    /// TLS 1.2 and 1.3, only when a tunnel asks for it.
    Tls12,
}

/// Limits and timeouts of one tunnel, after `[defaults]` are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSettings {
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub drain_timeout: Duration,
    pub min_tls: MinTls,
    /// TLS 1.3 session resumption (bounded tickets; every resumed session
    /// is verified and authorized again).
    pub session_resumption: bool,
    /// Connections older than this are closed (unset: no bound).
    pub max_connection_lifetime: Option<Duration>,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(3600),
            max_connections: 10_000,
            drain_timeout: Duration::from_secs(30),
            min_tls: MinTls::Tls13,
            session_resumption: true,
            max_connection_lifetime: None,
        }
    }
}

/// Where a tunnel's allowed peers come from: inline `allow` entries plus an
/// optional policy file, combined into one [`Policy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    pub inline: Vec<Rule>,
    pub file: Option<PathBuf>,
}

impl PolicySpec {
    /// Reads the policy file (if any) and compiles it with the inline rules.
    pub fn load(&self) -> Result<Policy, PolicyError> {
        let mut rules = self.inline.clone();
        if let Some(file) = &self.file {
            rules.extend(policy::load_file(file)?);
        }
        Ok(Policy::compile(rules))
    }
}

/// Where an inbound tunnel delivers plain traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port`, resolved on each connect.
    Tcp(String),
    /// `unix:/path/to.sock`.
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(addr) => f.write_str(addr),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Where a tunnel listens. More kinds (a unix socket for outbounds) may
/// join; every place that binds or names a listener matches on this.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddress {
    /// `IP:port`: bound at start-up, or taken over from the process this
    /// one upgrades.
    Tcp(SocketAddr),
    /// `systemd:NAME`: the socket the service manager passed under that
    /// name (`FileDescriptorName=` of the `.socket` unit).
    Systemd(String),
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Tcp(addr) => write!(f, "{addr}"),
            ListenAddress::Systemd(name) => write!(f, "systemd:{name}"),
        }
    }
}

/// mTLS in, plain out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundConfig {
    pub name: String,
    pub listen: ListenAddress,
    pub target: Target,
    pub policy: PolicySpec,
    /// Which of our SVIDs to present (`svid`, `svid_hint`).
    pub svid: SvidSelector,
    pub proxy_protocol: bool,
    /// One log line per connection at info level (peer, bytes, duration, result).
    pub access_log: bool,
    pub settings: TunnelSettings,
    /// Streams one multiplexed (ALPN `spiffe-tunnel-h2`) client connection may carry at
    /// once: the HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` we announce.
    pub max_streams_per_connection: u32,
}

/// The pool of an outbound with `multiplex = true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MuxSettings {
    /// Streams per pooled connection; at the bound a new one is dialled.
    pub max_streams_per_connection: u32,
    /// A pooled connection with no stream for this long is closed.
    pub pool_idle_timeout: Duration,
    /// The `:authority` of each CONNECT; `None`: the upstream address
    /// dialled (which the inbound accepts, as it accepts its own target).
    pub authority: Option<String>,
}

/// Streams per multiplexed connection unless a tunnel says otherwise.
pub const DEFAULT_MAX_STREAMS: u32 = 100;
/// The most streams per connection a tunnel may allow.
pub const MAX_STREAMS_LIMIT: u32 = 10_000;

impl Default for MuxSettings {
    fn default() -> Self {
        Self {
            max_streams_per_connection: DEFAULT_MAX_STREAMS,
            pool_idle_timeout: Duration::from_secs(60),
            authority: None,
        }
    }
}

/// How an outbound picks among its upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    /// Power of two choices: of two random healthy upstreams, the one with
    /// fewer active connections. The default.
    #[default]
    P2c,
    /// Each healthy upstream in turn.
    RoundRobin,
}

/// Upstream selection and health checking of an outbound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalanceSettings {
    pub balance: Balance,
    /// How often host names in `upstreams` are resolved again.
    pub resolve_interval: Duration,
    /// Active health checks (a TCP connect) at this interval; `None` means
    /// passive checks only (failed connects eject an upstream for a while).
    pub health_check_interval: Option<Duration>,
}

impl Default for BalanceSettings {
    fn default() -> Self {
        Self {
            balance: Balance::P2c,
            resolve_interval: Duration::from_secs(30),
            health_check_interval: None,
        }
    }
}

/// Plain in, mTLS out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundConfig {
    pub name: String,
    pub listen: ListenAddress,
    /// `host:port` each; tried in turn.
    pub upstreams: Vec<String>,
    pub policy: PolicySpec,
    pub svid: SvidSelector,
    pub balance: BalanceSettings,
    /// Whose SVID the dial presents: ours, or the connecting process's.
    pub present: Present,
    /// One log line per connection at info level (peer, bytes, duration, result).
    pub access_log: bool,
    pub settings: TunnelSettings,
    /// `multiplex = true`: HTTP/2 CONNECT streams over pooled connections.
    pub multiplex: Option<MuxSettings>,
}

/// Whose SVID an outbound presents to its upstreams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Present {
    /// The tunnel's own SVID (`svid`/`svid_hint` choose which). The default.
    #[default]
    Own,
    /// The SVID of the local process that opened the connection, from
    /// SPIRE's Delegated Identity API (`[identity] admin_socket`).
    Caller,
}

/// `[identity]` keys of the Delegated Identity API, used by outbounds with
/// `present = "caller"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegatedConfig {
    /// The SPIRE agent's admin socket (`unix:///path`); `None` means
    /// `SPIRE_ADMIN_ENDPOINT_SOCKET`.
    pub admin_socket: Option<String>,
    /// Live per-caller subscriptions at most; a new caller past this is
    /// refused.
    pub max_callers: usize,
    /// How long a caller's subscription is kept after its last connection
    /// ended.
    pub caller_idle_timeout: Duration,
}

impl Default for DelegatedConfig {
    fn default() -> Self {
        Self {
            admin_socket: None,
            max_callers: 256,
            caller_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Where our SVIDs and bundles come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityConfig {
    Files(FileIdentity),
    WorkloadApi {
        /// `unix:///path` or `tcp://ip:port`; `None` means the environment
        /// or the default socket.
        socket: Option<String>,
        startup_timeout: Duration,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
}

/// `[log]`: the log filter (`RUST_LOG` syntax). `RUST_LOG` in the
/// environment wins over it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogConfig {
    pub filter: Option<String>,
}

/// A validated config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub identity: IdentityConfig,
    pub delegated: DelegatedConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub inbound: Vec<InboundConfig>,
    pub outbound: Vec<OutboundConfig>,
}

// ---- the syntax, as serde sees it ------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    identity: RawIdentity,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    defaults: RawSettings,
    #[serde(default)]
    inbound: Vec<RawInbound>,
    #[serde(default)]
    outbound: Vec<RawOutbound>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawSource {
    WorkloadApi,
    Files,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    source: Spanned<RawSource>,
    socket: Option<Spanned<String>>,
    startup_timeout: Option<Spanned<String>>,
    admin_socket: Option<Spanned<String>>,
    max_callers: Option<Spanned<i64>>,
    caller_idle_timeout: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    bundles: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    filter: Option<Spanned<String>>,
}

/// Keys valid both in `[defaults]` and in each tunnel.
#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    handshake_timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    drain_timeout: Option<Spanned<String>>,
    min_tls: Option<Spanned<String>>,
    session_resumption: Option<bool>,
    max_connection_lifetime: Option<Spanned<String>>,
}

// serde's `flatten` cannot be combined with `deny_unknown_fields`, so the
// tunnel tables repeat the settings keys and hand them over as RawSettings.
macro_rules! tunnel_table {
    ($name:ident { $($field:ident : $ty:ty,)* }) => {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct $name {
            name: Spanned<String>,
            listen: Spanned<String>,
            allow: Option<Spanned<Vec<Spanned<String>>>>,
            policy: Option<Spanned<String>>,
            svid: Option<Spanned<String>>,
            svid_hint: Option<Spanned<String>>,
            handshake_timeout: Option<Spanned<String>>,
            connect_timeout: Option<Spanned<String>>,
            idle_timeout: Option<Spanned<String>>,
            max_connections: Option<Spanned<i64>>,
            drain_timeout: Option<Spanned<String>>,
            min_tls: Option<Spanned<String>>,
            session_resumption: Option<bool>,
            max_connection_lifetime: Option<Spanned<String>>,
            $($field: $ty,)*
        }

        impl $name {
            fn settings(&self) -> RawSettings {
                RawSettings {
                    handshake_timeout: self.handshake_timeout.clone(),
                    connect_timeout: self.connect_timeout.clone(),
                    idle_timeout: self.idle_timeout.clone(),
                    max_connections: self.max_connections.clone(),
                    drain_timeout: self.drain_timeout.clone(),
                    min_tls: self.min_tls.clone(),
                    session_resumption: self.session_resumption,
                    max_connection_lifetime: self.max_connection_lifetime.clone(),
                }
            }
        }
    };
}

tunnel_table!(RawInbound {
    target: Spanned<String>,
    proxy_protocol: Option<bool>,
    access_log: Option<bool>,
    max_streams_per_connection: Option<Spanned<i64>>,
});

tunnel_table!(RawOutbound {
    upstreams: Spanned<Vec<Spanned<String>>>,
    balance: Option<Spanned<String>>,
    resolve_interval: Option<Spanned<String>>,
    health_check_interval: Option<Spanned<String>>,
    present: Option<Spanned<String>>,
    access_log: Option<bool>,
    multiplex: Option<Spanned<bool>>,
    max_streams_per_connection: Option<Spanned<i64>>,
    pool_idle_timeout: Option<Spanned<String>>,
    authority: Option<Spanned<String>>,
});

// ---- validation ------------------------------------------------------------

/// Turns byte spans into line numbers and builds located errors.
struct Locator<'a> {
    file: String,
    text: &'a str,
}

impl Locator<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn error(
        &self,
        span: &Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.clone(),
            line: self.line(span),
            key: key.into(),
            message: message.into(),
        }
    }
}

impl Config {
    /// Reads, parses and validates a config file, including its policy files.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses config text as if read from `path` (relative paths in it are
    /// relative to `path`'s folder).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let at = Locator {
            file: path.display().to_string(),
            text,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            at.error(&span, "", e.message().trim().to_string())
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let resolve = |p: &str| -> PathBuf {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };

        let identity = resolve_identity(&raw.identity, &at, &resolve)?;
        let delegated = resolve_delegated(&raw.identity, &at)?;
        let admin = AdminConfig {
            listen: raw
                .admin
                .listen
                .as_ref()
                .map(|l| parse_listen(l, "admin.listen", &at))
                .transpose()?,
        };
        let defaults = apply_settings(&TunnelSettings::default(), &raw.defaults, "defaults", &at)?;

        if raw.inbound.is_empty() && raw.outbound.is_empty() {
            return Err(at.error(
                &(0..0),
                "",
                "no tunnels: add at least one [[inbound]] or [[outbound]] table",
            ));
        }

        let mut listens: HashSet<ListenAddress> =
            admin.listen.into_iter().map(ListenAddress::Tcp).collect();
        let mut check_listen = |addr: &ListenAddress, span: &Range<usize>, key: &str| {
            if listens.insert(addr.clone()) {
                Ok(())
            } else {
                Err(at.error(
                    span,
                    key,
                    format!("address {addr} is already used by another listener"),
                ))
            }
        };

        let mut inbound = Vec::new();
        let mut names = HashSet::new();
        for (i, t) in raw.inbound.iter().enumerate() {
            let key = |k: &str| format!("inbound[{i}].{k}");
            let name = tunnel_name(&t.name, &key("name"), &mut names, &at)?;
            let listen = parse_tunnel_listen(&t.listen, &key("listen"), &at)?;
            check_listen(&listen, &t.listen.span(), &key("listen"))?;
            let target = parse_target(&t.target, &key("target"), &at, &resolve)?;
            let policy = policy_spec(
                t.allow.as_ref(),
                t.policy.as_ref(),
                &t.name.span(),
                &key(""),
                &name,
                &at,
                &resolve,
            )?;
            inbound.push(InboundConfig {
                name,
                listen,
                target,
                policy,
                svid: parse_svid(t.svid.as_ref(), t.svid_hint.as_ref(), &identity, &key, &at)?,
                proxy_protocol: t.proxy_protocol.unwrap_or(false),
                access_log: t.access_log.unwrap_or(false),
                settings: apply_settings(
                    &defaults,
                    &t.settings(),
                    key("").trim_end_matches('.'),
                    &at,
                )?,
                max_streams_per_connection: t
                    .max_streams_per_connection
                    .as_ref()
                    .map(|v| stream_bound(v, &key("max_streams_per_connection"), &at))
                    .transpose()?
                    .unwrap_or(DEFAULT_MAX_STREAMS),
            });
        }

        let mut outbound = Vec::new();
        let mut names = HashSet::new();
        for (i, t) in raw.outbound.iter().enumerate() {
            let key = |k: &str| format!("outbound[{i}].{k}");
            let name = tunnel_name(&t.name, &key("name"), &mut names, &at)?;
            let listen = parse_tunnel_listen(&t.listen, &key("listen"), &at)?;
            check_listen(&listen, &t.listen.span(), &key("listen"))?;
            if t.upstreams.get_ref().is_empty() {
                return Err(at.error(
                    &t.upstreams.span(),
                    key("upstreams"),
                    "needs at least one \"host:port\"",
                ));
            }
            let mut upstreams = Vec::new();
            for (j, u) in t.upstreams.get_ref().iter().enumerate() {
                upstreams.push(parse_host_port(
                    u,
                    &format!("outbound[{i}].upstreams[{j}]"),
                    &at,
                )?);
            }
            let policy = policy_spec(
                t.allow.as_ref(),
                t.policy.as_ref(),
                &t.name.span(),
                &key(""),
                &name,
                &at,
                &resolve,
            )?;
            let balance = BalanceSettings {
                balance: match &t.balance {
                    None => Balance::default(),
                    Some(b) => match b.get_ref().as_str() {
                        "p2c" => Balance::P2c,
                        "round_robin" => Balance::RoundRobin,
                        other => {
                            return Err(at.error(
                                &b.span(),
                                key("balance"),
                                format!("{other:?} is not a balancing method; use \"p2c\" (default) or \"round_robin\""),
                            ))
                        }
                    },
                },
                resolve_interval: t
                    .resolve_interval
                    .as_ref()
                    .map(|v| positive_duration(v, &key("resolve_interval"), &at))
                    .transpose()?
                    .unwrap_or(BalanceSettings::default().resolve_interval),
                health_check_interval: t
                    .health_check_interval
                    .as_ref()
                    .map(|v| positive_duration(v, &key("health_check_interval"), &at))
                    .transpose()?,
            };
            let present = parse_present(t, &key, &at)?;
            if let (Present::Caller, ListenAddress::Tcp(addr)) = (present, &listen) {
                if !addr.ip().is_loopback() {
                    return Err(at.error(
                        &t.listen.span(),
                        key("listen"),
                        format!("present = \"caller\" serves local processes only: listen on loopback (127.0.0.1:{}), not {addr}", addr.port()),
                    ));
                }
            }
            outbound.push(OutboundConfig {
                name,
                listen,
                upstreams,
                policy,
                svid: parse_svid(t.svid.as_ref(), t.svid_hint.as_ref(), &identity, &key, &at)?,
                balance,
                present,
                access_log: t.access_log.unwrap_or(false),
                settings: apply_settings(
                    &defaults,
                    &t.settings(),
                    key("").trim_end_matches('.'),
                    &at,
                )?,
                multiplex: mux_settings(t, &key, &at)?,
            });
        }

        let log = LogConfig {
            filter: match &raw.log.filter {
                Some(f) => {
                    let filter = normalize_log_filter(f.get_ref());
                    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&filter) {
                        return Err(at.error(
                            &f.span(),
                            "log.filter",
                            format!("not a log filter: {e}"),
                        ));
                    }
                    Some(filter)
                }
                None => None,
            },
        };
        Ok(Config {
            path: path.to_path_buf(),
            identity,
            delegated,
            admin,
            log,
            inbound,
            outbound,
        })
    }

    /// Loads every tunnel's policy (inbound tunnels in order, then outbound
    /// ones), so a missing or malformed policy file is caught early.
    pub fn load_policies(&self) -> Result<Vec<Policy>, PolicyError> {
        self.inbound
            .iter()
            .map(|t| &t.policy)
            .chain(self.outbound.iter().map(|t| &t.policy))
            .map(PolicySpec::load)
            .collect()
    }
}

fn resolve_identity(
    raw: &RawIdentity,
    at: &Locator<'_>,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<IdentityConfig, ConfigError> {
    match *raw.source.get_ref() {
        RawSource::Files => {
            if let Some(socket) = &raw.socket {
                return Err(at.error(
                    &socket.span(),
                    "identity.socket",
                    "only used with source = \"workload_api\"",
                ));
            }
            let cert = raw.cert.as_ref().ok_or_else(|| {
                at.error(
                    &raw.source.span(),
                    "identity.cert",
                    "source = \"files\" needs cert = \"svid.pem\" (the chain, leaf first)",
                )
            })?;
            let key = raw.key.as_ref().ok_or_else(|| {
                at.error(
                    &raw.source.span(),
                    "identity.key",
                    "source = \"files\" needs key = \"svid.key\" (PKCS#8 PEM)",
                )
            })?;
            let bundles = raw.bundles.as_ref().ok_or_else(|| {
                at.error(&raw.source.span(), "identity.bundles", "source = \"files\" needs an [identity.bundles] table: \"trust.domain\" = \"bundle.pem\"")
            })?;
            if bundles.get_ref().is_empty() {
                return Err(at.error(
                    &bundles.span(),
                    "identity.bundles",
                    "needs at least one trust domain",
                ));
            }
            let mut resolved = BTreeMap::new();
            for (td, file) in bundles.get_ref() {
                let trust_domain = spiffe_id::parse_trust_domain(td).map_err(|e| {
                    at.error(
                        &file.span(),
                        format!("identity.bundles.\"{td}\""),
                        e.to_string(),
                    )
                })?;
                resolved.insert(trust_domain, resolve(file.get_ref()));
            }
            Ok(IdentityConfig::Files(FileIdentity {
                cert: resolve(cert.get_ref()),
                key: resolve(key.get_ref()),
                bundles: resolved,
            }))
        }
        RawSource::WorkloadApi => {
            for (value, name) in [(&raw.cert, "cert"), (&raw.key, "key")] {
                if let Some(v) = value {
                    return Err(at.error(
                        &v.span(),
                        format!("identity.{name}"),
                        "only used with source = \"files\"",
                    ));
                }
            }
            if let Some(b) = &raw.bundles {
                return Err(at.error(
                    &b.span(),
                    "identity.bundles",
                    "only used with source = \"files\"",
                ));
            }
            let socket = match &raw.socket {
                Some(s) => {
                    let value = s.get_ref();
                    if let Err(e) = crate::identity::workload_api::ApiAddress::parse(value) {
                        return Err(at.error(&s.span(), "identity.socket", e.to_string()));
                    }
                    Some(value.clone())
                }
                None => None,
            };
            let startup_timeout = match &raw.startup_timeout {
                Some(v) => positive_duration(v, "identity.startup_timeout", at)?,
                None => Duration::from_secs(30),
            };
            Ok(IdentityConfig::WorkloadApi {
                socket,
                startup_timeout,
            })
        }
    }
}

/// `present` of an outbound. `svid`/`svid_hint` choose among our own
/// SVIDs, so they make no sense with the caller's.
fn parse_present(
    t: &RawOutbound,
    key: &dyn Fn(&str) -> String,
    at: &Locator<'_>,
) -> Result<Present, ConfigError> {
    let Some(value) = &t.present else {
        return Ok(Present::Own);
    };
    let present = match value.get_ref().as_str() {
        "own" => Present::Own,
        "caller" => Present::Caller,
        other => {
            return Err(at.error(
                &value.span(),
                key("present"),
                format!(
                    "{other:?} is not whose SVID to present; use \"own\" (default) or \"caller\""
                ),
            ))
        }
    };
    if present == Present::Caller {
        if let Some(m) = t.multiplex.as_ref().filter(|m| *m.get_ref()) {
            return Err(at.error(
                &m.span(),
                key("multiplex"),
                "present = \"caller\" and multiplex = true cannot be combined yet: a pooled connection carries one SVID, and each caller must present its own",
            ));
        }
        if let Some(s) = t.svid.as_ref().or(t.svid_hint.as_ref()) {
            return Err(at.error(
                &s.span(),
                key("svid"),
                "svid and svid_hint choose among our own SVIDs; with present = \"caller\" the caller's SVID is presented",
            ));
        }
    }
    Ok(present)
}

fn resolve_delegated(raw: &RawIdentity, at: &Locator<'_>) -> Result<DelegatedConfig, ConfigError> {
    let mut delegated = DelegatedConfig::default();
    if let Some(s) = &raw.admin_socket {
        let value = s.get_ref();
        match crate::identity::workload_api::ApiAddress::parse(value) {
            Ok(crate::identity::workload_api::ApiAddress::Unix(_)) => {}
            _ => {
                return Err(at.error(
                    &s.span(),
                    "identity.admin_socket",
                    format!(
                    "{value:?} is not a SPIRE agent admin socket; use unix:///path/to/admin.sock"
                ),
                ))
            }
        }
        delegated.admin_socket = Some(value.clone());
    }
    if let Some(n) = &raw.max_callers {
        delegated.max_callers = usize::try_from(*n.get_ref())
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                at.error(
                    &n.span(),
                    "identity.max_callers",
                    "must be a positive number",
                )
            })?;
    }
    if let Some(v) = &raw.caller_idle_timeout {
        delegated.caller_idle_timeout = positive_duration(v, "identity.caller_idle_timeout", at)?;
    }
    Ok(delegated)
}

fn apply_settings(
    base: &TunnelSettings,
    raw: &RawSettings,
    table: &str,
    at: &Locator<'_>,
) -> Result<TunnelSettings, ConfigError> {
    let mut s = base.clone();
    // `base` is already valid, so checking each value where it is written
    // checks the result and reports the line that set it.
    for (value, field, key) in [
        (
            &raw.handshake_timeout,
            &mut s.handshake_timeout,
            "handshake_timeout",
        ),
        (
            &raw.connect_timeout,
            &mut s.connect_timeout,
            "connect_timeout",
        ),
        (&raw.idle_timeout, &mut s.idle_timeout, "idle_timeout"),
    ] {
        if let Some(v) = value {
            *field = positive_duration(v, &format!("{table}.{key}"), at)?;
        }
    }
    if let Some(v) = &raw.drain_timeout {
        // Zero is fine here: close live connections at once on SIGTERM.
        s.drain_timeout = duration(v, &format!("{table}.drain_timeout"), at)?;
    }
    if let Some(v) = &raw.max_connections {
        s.max_connections = usize::try_from(*v.get_ref())
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(|| {
                at.error(
                    &v.span(),
                    format!("{table}.max_connections"),
                    "must be at least 1",
                )
            })?;
    }
    if let Some(v) = &raw.min_tls {
        s.min_tls = match v.get_ref().as_str() {
            "1.3" => MinTls::Tls13,
            "1.2" => MinTls::Tls12,
            other => {
                return Err(at.error(
                    &v.span(),
                    format!("{table}.min_tls"),
                    format!("{other:?} is not a TLS version; use \"1.3\" (default) or \"1.2\""),
                ))
            }
        };
    }
    if let Some(on) = raw.session_resumption {
        s.session_resumption = on;
    }
    if let Some(v) = &raw.max_connection_lifetime {
        s.max_connection_lifetime = Some(positive_duration(
            v,
            &format!("{table}.max_connection_lifetime"),
            at,
        )?);
    }
    Ok(s)
}

/// A humantime duration (`"30s"`, `"500ms"`, `"1h"`).
/// A log filter with each directive trimmed. tracing-subscriber 0.3.23
/// panics on a directive that starts with whitespace and holds a non-ASCII
/// character (it slices the untrimmed text with indices of the trimmed
/// one), so filters from the config or `RUST_LOG` pass through here first.
pub fn normalize_log_filter(filter: &str) -> String {
    filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

/// Longest duration accepted for any key: far beyond any sensible timeout,
/// and short enough that "now + it" always fits in a clock reading.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

fn duration(value: &Spanned<String>, key: &str, at: &Locator<'_>) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(value.get_ref()).map_err(|e| {
        at.error(
            &value.span(),
            key,
            format!(
                "{:?} is not a duration ({e}); write it like \"500ms\", \"30s\" or \"1h\"",
                value.get_ref()
            ),
        )
    })?;
    if d > MAX_DURATION {
        return Err(at.error(
            &value.span(),
            key,
            format!("{:?} is longer than the 10 years allowed", value.get_ref()),
        ));
    }
    Ok(d)
}

/// A stream bound per connection: 1 to [`MAX_STREAMS_LIMIT`].
fn stream_bound(value: &Spanned<i64>, key: &str, at: &Locator<'_>) -> Result<u32, ConfigError> {
    u32::try_from(*value.get_ref())
        .ok()
        .filter(|n| (1..=MAX_STREAMS_LIMIT).contains(n))
        .ok_or_else(|| {
            at.error(
                &value.span(),
                key,
                format!("must be between 1 and {MAX_STREAMS_LIMIT}"),
            )
        })
}

/// The pool of an outbound: `None` unless `multiplex = true`, and then
/// its knobs; a knob without `multiplex = true` is an error, since it
/// would silently do nothing.
fn mux_settings(
    t: &RawOutbound,
    key: &dyn Fn(&str) -> String,
    at: &Locator<'_>,
) -> Result<Option<MuxSettings>, ConfigError> {
    let on = t.multiplex.as_ref().is_some_and(|m| *m.get_ref());
    if !on {
        let knobs = [
            t.max_streams_per_connection.as_ref().map(Spanned::span),
            t.pool_idle_timeout.as_ref().map(Spanned::span),
            t.authority.as_ref().map(Spanned::span),
        ];
        let names = [
            "max_streams_per_connection",
            "pool_idle_timeout",
            "authority",
        ];
        for (span, name) in knobs.iter().zip(names) {
            if let Some(span) = span {
                return Err(at.error(span, key(name), "only used with multiplex = true"));
            }
        }
        return Ok(None);
    }
    let mut mux = MuxSettings::default();
    if let Some(v) = &t.max_streams_per_connection {
        mux.max_streams_per_connection = stream_bound(v, &key("max_streams_per_connection"), at)?;
    }
    if let Some(v) = &t.pool_idle_timeout {
        mux.pool_idle_timeout = positive_duration(v, &key("pool_idle_timeout"), at)?;
    }
    if let Some(v) = &t.authority {
        let text = v.get_ref();
        let valid = text
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
            && text.parse::<http::uri::Authority>().is_ok();
        if !valid {
            return Err(at.error(
                &v.span(),
                key("authority"),
                format!("{text:?} is not a \"host:port\" authority"),
            ));
        }
        mux.authority = Some(text.clone());
    }
    Ok(Some(mux))
}

/// A duration that must not be zero.
fn positive_duration(
    value: &Spanned<String>,
    key: &str,
    at: &Locator<'_>,
) -> Result<Duration, ConfigError> {
    let d = duration(value, key, at)?;
    if d.is_zero() {
        return Err(at.error(&value.span(), key, "must be longer than zero"));
    }
    Ok(d)
}

fn tunnel_name(
    name: &Spanned<String>,
    key: &str,
    seen: &mut HashSet<String>,
    at: &Locator<'_>,
) -> Result<String, ConfigError> {
    let value = name.get_ref();
    let ok = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(at.error(
            &name.span(),
            key,
            format!("{value:?} is not a tunnel name (1-64 letters, digits, '-', '_' or '.')"),
        ));
    }
    if !seen.insert(value.clone()) {
        return Err(at.error(
            &name.span(),
            key,
            format!("another tunnel of this kind is already named {value:?}"),
        ));
    }
    Ok(value.clone())
}

fn parse_listen(
    value: &Spanned<String>,
    key: &str,
    at: &Locator<'_>,
) -> Result<SocketAddr, ConfigError> {
    value.get_ref().parse().map_err(|_| {
        at.error(&value.span(), key, format!("{:?} is not a listen address (expected IP:port, like \"0.0.0.0:8443\" or \"[::1]:8443\"{})", value.get_ref(), if key == "admin.listen" { "" } else { ", or systemd:NAME" }))
    })
}

/// A tunnel's `listen`: `IP:port` or `systemd:NAME`.
fn parse_tunnel_listen(
    value: &Spanned<String>,
    key: &str,
    at: &Locator<'_>,
) -> Result<ListenAddress, ConfigError> {
    let Some(name) = value.get_ref().strip_prefix("systemd:") else {
        return parse_listen(value, key, at).map(ListenAddress::Tcp);
    };
    // systemd's rule for FileDescriptorName=: printable ASCII but ':', at
    // most 255 characters.
    let valid = !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
    if !valid {
        return Err(at.error(
            &value.span(),
            key,
            format!("{name:?} is not a systemd socket name (1-255 printable ASCII characters, no ':', as in FileDescriptorName=)"),
        ));
    }
    if crate::listen::is_reserved_name(name) {
        return Err(at.error(
            &value.span(),
            key,
            format!("systemd socket names starting with inbound/, outbound/ or spiffe-tunnel/ are reserved for upgrades; rename FileDescriptorName={name}"),
        ));
    }
    Ok(ListenAddress::Systemd(name.to_string()))
}

fn parse_host_port(
    value: &Spanned<String>,
    key: &str,
    at: &Locator<'_>,
) -> Result<String, ConfigError> {
    let v = value.get_ref();
    let valid = match v.rsplit_once(':') {
        // An IPv6 address needs brackets, or its last group would pass for the port.
        Some((host, port)) => {
            let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                Some(inner) => inner.parse::<std::net::Ipv6Addr>().is_ok(),
                None => !host.is_empty() && !host.contains(':'),
            };
            host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    };
    if !valid {
        return Err(at.error(
            &value.span(),
            key,
            format!("{v:?} is not \"host:port\" (IPv6 goes in brackets: \"[::1]:8443\")"),
        ));
    }
    Ok(v.clone())
}

fn parse_target(
    value: &Spanned<String>,
    key: &str,
    at: &Locator<'_>,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<Target, ConfigError> {
    match value.get_ref().strip_prefix("unix:") {
        Some("") => Err(at.error(
            &value.span(),
            key,
            "unix: needs a socket path, like \"unix:/run/app.sock\"",
        )),
        Some(path) => Ok(Target::Unix(resolve(path))),
        None => parse_host_port(value, key, at).map(Target::Tcp),
    }
}

/// A tunnel's `svid` (a SPIFFE ID) and `svid_hint` (a Workload API hint,
/// which only the Workload API gives).
fn parse_svid(
    id: Option<&Spanned<String>>,
    hint: Option<&Spanned<String>>,
    identity: &IdentityConfig,
    key: &dyn Fn(&str) -> String,
    at: &Locator<'_>,
) -> Result<SvidSelector, ConfigError> {
    let id = id
        .map(|v| {
            spiffe_id::parse_workload_id(v.get_ref())
                .map_err(|e| at.error(&v.span(), key("svid"), e.to_string()))
        })
        .transpose()?;
    let hint = hint
        .map(|h| {
            if h.get_ref().is_empty() {
                return Err(at.error(&h.span(), key("svid_hint"), "must not be empty"));
            }
            if matches!(identity, IdentityConfig::Files(_)) {
                return Err(at.error(
                    &h.span(),
                    key("svid_hint"),
                    "hints come from the Workload API (a SPIRE entry's -hint); it needs source = \"workload_api\"",
                ));
            }
            Ok(h.get_ref().clone())
        })
        .transpose()?;
    Ok(SvidSelector { id, hint })
}

fn policy_spec(
    allow: Option<&Spanned<Vec<Spanned<String>>>>,
    file: Option<&Spanned<String>>,
    tunnel_span: &Range<usize>,
    key_prefix: &str,
    tunnel: &str,
    at: &Locator<'_>,
    resolve: &dyn Fn(&str) -> PathBuf,
) -> Result<PolicySpec, ConfigError> {
    let mut inline = Vec::new();
    let entries = allow.map(|a| a.get_ref().as_slice()).unwrap_or_default();
    for (i, entry) in entries.iter().enumerate() {
        match policy::parse_rule(entry.get_ref()) {
            Ok(Some(rule)) => inline.push(rule),
            Ok(None) => {}
            Err(reason) => {
                return Err(at.error(&entry.span(), format!("{key_prefix}allow[{i}]"), reason))
            }
        }
    }
    let file = file.map(|f| resolve(f.get_ref()));
    if inline.is_empty() && file.is_none() {
        // Point at the (empty) allow list if there is one, else at the name.
        let span = allow.map_or_else(|| tunnel_span.clone(), |a| a.span());
        return Err(at.error(
            &span,
            format!("{key_prefix}allow"),
            format!("tunnel {tunnel:?} would allow nobody: add allow = [\"spiffe://...\"] or policy = \"file\""),
        ));
    }
    Ok(PolicySpec { inline, file })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Decision, Effect};
    use crate::spiffe_id::SpiffeId;

    /// Where the test configs pretend to live.
    const FILE: &str = "/etc/spiffe-tunnel/tunnel.toml";
    const DIR: &str = "/etc/spiffe-tunnel";

    const WORKLOAD_API: &str = "[identity]\nsource = \"workload_api\"\n";

    /// The example from DESIGN.md, verbatim.
    const EXAMPLE: &str = r#"[identity]
source = "workload_api"                 # or "files"
socket = "unix:///tmp/spire-agent/public/api.sock"
startup_timeout = "30s"                 # waiting for the first SVID

# source = "files"                      # static or externally rotated PEM files, reloaded on change
# cert = "certs/svid.pem"               # chain, leaf first
# key = "certs/svid.key"                # PKCS#8 PEM
# [identity.bundles]                    # trust bundle per trust domain
# "example.org" = "certs/bundle.pem"
# "partner.org" = "certs/partner.pem"

[admin]
listen = "127.0.0.1:9901"

[defaults]                              # every tunnel inherits these; a tunnel may set any of them itself
handshake_timeout = "10s"
connect_timeout = "5s"
idle_timeout = "1h"
max_connections = 10000
drain_timeout = "30s"

[[inbound]]                             # mTLS in, plain out
name = "api"
listen = "0.0.0.0:8443"
target = "127.0.0.1:3000"               # or "unix:/run/app.sock"
allow = ["spiffe://example.org/web"]    # client IDs let in
policy = "policies/api.policy"          # more patterns, from a file (optional)
svid = "spiffe://example.org/api"       # which of our SVIDs to present (optional: default SVID)
proxy_protocol = true                   # PROXY v2 header to target carrying the peer SPIFFE ID

[[outbound]]                            # plain in, mTLS out
name = "api"
listen = "127.0.0.1:8080"
upstreams = ["10.0.0.2:8443", "10.0.0.3:8443"]   # balanced, health-checked
allow = ["spiffe://example.org/api"]    # server IDs accepted
"#;

    // ---- helpers -------------------------------------------------------

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(FILE))
    }

    #[track_caller]
    fn ok(text: &str) -> Config {
        parse(text).unwrap_or_else(|e| panic!("config should parse, got: {e}\n---\n{text}"))
    }

    /// Parses `text`, expecting `ConfigError::Invalid` for [`FILE`];
    /// returns (line, key, message).
    #[track_caller]
    fn invalid(text: &str) -> (usize, String, String) {
        match parse(text) {
            Err(ConfigError::Invalid {
                file,
                line,
                key,
                message,
            }) => {
                assert_eq!(file, FILE);
                (line, key, message)
            }
            Err(other) => panic!("expected ConfigError::Invalid, got {other:?}"),
            Ok(config) => panic!("expected an error, got {config:#?}\n---\n{text}"),
        }
    }

    /// The 1-based line of the only line of `text` containing `needle`.
    #[track_caller]
    fn line_of(text: &str, needle: &str) -> usize {
        let lines: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains(needle))
            .map(|(i, _)| i + 1)
            .collect();
        assert_eq!(lines.len(), 1, "{needle:?} should be on exactly one line");
        lines[0]
    }

    /// The 1-based line of the `n`th (from 0) line of `text` containing `needle`.
    #[track_caller]
    fn nth_line_of(text: &str, needle: &str, n: usize) -> usize {
        text.lines()
            .enumerate()
            .filter(|(_, l)| l.contains(needle))
            .nth(n)
            .unwrap_or_else(|| panic!("{needle:?} should be on at least {} lines", n + 1))
            .0
            + 1
    }

    /// Asserts that `text` fails on the line holding `needle`, with `key`,
    /// and a message containing `message_part`.
    #[track_caller]
    fn assert_invalid(text: &str, needle: &str, key: &str, message_part: &str) {
        let (line, got_key, message) = invalid(text);
        assert_eq!(
            (line, got_key.as_str()),
            (line_of(text, needle), key),
            "wrong location; message: {message}\n---\n{text}"
        );
        assert!(
            message.contains(message_part),
            "message {message:?} should contain {message_part:?}"
        );
    }

    /// A workload_api config with one inbound tunnel; `extra` adds lines to
    /// its table (TOML allows no repeated keys, so `extra` must not repeat
    /// name/listen/target/allow unless `base` is left out by the caller).
    fn inbound(extra: &str) -> String {
        format!(
            "{WORKLOAD_API}\n[[inbound]]\nname = \"in\"\nlisten = \"127.0.0.1:8443\"\n\
             target = \"127.0.0.1:3000\"\nallow = [\"spiffe://example.org/web\"]\n{extra}"
        )
    }

    /// A workload_api config with one outbound tunnel plus `extra` lines in it.
    fn outbound(extra: &str) -> String {
        format!(
            "{WORKLOAD_API}\n[[outbound]]\nname = \"out\"\nlisten = \"127.0.0.1:8080\"\n\
             allow = [\"spiffe://example.org/api\"]\n{extra}"
        )
    }

    fn id(s: &str) -> SpiffeId {
        spiffe_id::parse(s).unwrap()
    }

    fn allow(pattern: &str) -> Rule {
        Rule {
            effect: Effect::Allow,
            pattern: pattern.to_string(),
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    // ---- the example from DESIGN.md ------------------------------------

    #[test]
    fn design_example_parses_with_every_value() {
        let config = ok(EXAMPLE);
        assert_eq!(config.path, PathBuf::from(FILE));
        assert_eq!(
            config.identity,
            IdentityConfig::WorkloadApi {
                socket: Some("unix:///tmp/spire-agent/public/api.sock".into()),
                startup_timeout: secs(30),
            }
        );
        assert_eq!(
            config.admin.listen,
            Some("127.0.0.1:9901".parse::<SocketAddr>().unwrap())
        );
        let settings = TunnelSettings {
            handshake_timeout: secs(10),
            connect_timeout: secs(5),
            idle_timeout: secs(3600),
            max_connections: 10_000,
            drain_timeout: secs(30),
            min_tls: MinTls::Tls13,
            session_resumption: true,
            max_connection_lifetime: None,
        };

        assert_eq!(
            config.inbound,
            vec![InboundConfig {
                name: "api".into(),
                listen: ListenAddress::Tcp("0.0.0.0:8443".parse().unwrap()),
                target: Target::Tcp("127.0.0.1:3000".into()),
                policy: PolicySpec {
                    inline: vec![allow("spiffe://example.org/web")],
                    file: Some(PathBuf::from(DIR).join("policies/api.policy")),
                },
                svid: SvidSelector::by_id(id("spiffe://example.org/api")),
                proxy_protocol: true,
                access_log: false,
                settings: settings.clone(),
                max_streams_per_connection: DEFAULT_MAX_STREAMS,
            }]
        );
        assert_eq!(
            config.outbound,
            vec![OutboundConfig {
                name: "api".into(),
                listen: ListenAddress::Tcp("127.0.0.1:8080".parse().unwrap()),
                upstreams: vec!["10.0.0.2:8443".into(), "10.0.0.3:8443".into()],
                policy: PolicySpec {
                    inline: vec![allow("spiffe://example.org/api")],
                    file: None,
                },
                svid: SvidSelector::default(),
                balance: BalanceSettings::default(),
                present: Present::Own,
                access_log: false,
                settings,
                multiplex: None,
            }]
        );
    }

    #[test]
    fn present_caller_and_the_admin_socket() {
        let text = "[identity]\nsource = \"workload_api\"\nadmin_socket = \"unix:///run/spire/admin.sock\"\n\
            max_callers = 10\ncaller_idle_timeout = \"5s\"\n\
            [[outbound]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstreams = [\"h:1\"]\nallow = [\"spiffe://td/x\"]\n\
            present = \"caller\"\n";
        let config = ok(text);
        assert_eq!(config.outbound[0].present, Present::Caller);
        assert_eq!(
            config.delegated,
            DelegatedConfig {
                admin_socket: Some("unix:///run/spire/admin.sock".into()),
                max_callers: 10,
                caller_idle_timeout: Duration::from_secs(5),
            }
        );
        let own = text.replace("present = \"caller\"", "present = \"own\"");
        assert_eq!(ok(&own).outbound[0].present, Present::Own);
        for (bad, says) in [
            (
                text.replace("\"caller\"", "\"theirs\""),
                "is not whose SVID",
            ),
            (
                text.replace("127.0.0.1:1", "0.0.0.0:1"),
                "listen on loopback",
            ),
            (
                format!("{text}svid_hint = \"x\"\n"),
                "choose among our own SVIDs",
            ),
            (
                format!("{text}multiplex = true\n"),
                "cannot be combined yet",
            ),
            (
                text.replace("unix:///run/spire/admin.sock", "tcp://127.0.0.1:1"),
                "admin socket",
            ),
            (
                text.replace("max_callers = 10", "max_callers = 0"),
                "positive",
            ),
        ] {
            let err = Config::parse(&bad, Path::new("/etc/t.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn balancing_access_log_and_log_filter_keys() {
        let text = "[identity]\nsource = \"workload_api\"\n[log]\nfilter = \"info,spiffe_tunnel=debug\"\n\
            [[outbound]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstreams = [\"h:1\"]\nallow = [\"spiffe://td/x\"]\n\
            balance = \"round_robin\"\nresolve_interval = \"5s\"\nhealth_check_interval = \"2s\"\naccess_log = true\n";
        let config = ok(text);
        assert_eq!(
            config.log.filter.as_deref(),
            Some("info,spiffe_tunnel=debug")
        );
        let o = &config.outbound[0];
        assert_eq!(o.balance.balance, Balance::RoundRobin);
        assert_eq!(o.balance.resolve_interval, secs(5));
        assert_eq!(o.balance.health_check_interval, Some(secs(2)));
        assert!(o.access_log);
        let (line, key, _) = invalid(&text.replace("round_robin", "random"));
        assert_eq!((line, key.as_str()), (10, "outbound[0].balance"));
        let (line, key, _) = invalid(&text.replace("info,spiffe_tunnel=debug", "info,[[[="));
        assert_eq!((line, key.as_str()), (4, "log.filter"));
    }

    #[test]
    fn design_example_with_a_unix_target() {
        let text = EXAMPLE.replace(
            "target = \"127.0.0.1:3000\"               # or \"unix:/run/app.sock\"",
            "target = \"unix:/run/app.sock\"",
        );
        assert_ne!(text, EXAMPLE);
        let config = ok(&text);
        let target = &config.inbound[0].target;
        assert_eq!(*target, Target::Unix(PathBuf::from("/run/app.sock")));
        assert_eq!(target.to_string(), "unix:/run/app.sock");
        assert_eq!(
            Target::Tcp("127.0.0.1:3000".into()).to_string(),
            "127.0.0.1:3000"
        );
    }

    #[test]
    fn design_example_with_files_source() {
        let text = EXAMPLE
            .replace(
                "source = \"workload_api\"                 # or \"files\"\n\
                 socket = \"unix:///tmp/spire-agent/public/api.sock\"\n\
                 startup_timeout = \"30s\"                 # waiting for the first SVID\n",
                "",
            )
            .replace("# source = \"files\"", "source = \"files\"")
            .replace("# cert = ", "cert = ")
            .replace("# key = ", "key = ")
            .replace("# [identity.bundles]", "[identity.bundles]")
            .replace("# \"example.org\"", "\"example.org\"")
            .replace("# \"partner.org\"", "\"partner.org\"");
        let config = ok(&text);
        let dir = Path::new(DIR);
        let IdentityConfig::Files(files) = &config.identity else {
            panic!("expected files identity, got {:?}", config.identity);
        };
        assert_eq!(files.cert, dir.join("certs/svid.pem"));
        assert_eq!(files.key, dir.join("certs/svid.key"));
        let bundles: Vec<(String, PathBuf)> = files
            .bundles
            .iter()
            .map(|(td, p)| (td.to_string(), p.clone()))
            .collect();
        assert_eq!(
            bundles,
            vec![
                ("example.org".into(), dir.join("certs/bundle.pem")),
                ("partner.org".into(), dir.join("certs/partner.pem")),
            ]
        );
    }

    #[test]
    fn proxy_protocol_defaults_to_off_and_svid_to_none() {
        let config = ok(&inbound(""));
        assert!(!config.inbound[0].proxy_protocol);
        assert!(config.inbound[0].svid.is_default());
        assert!(config.outbound.is_empty());
        assert_eq!(config.admin, AdminConfig { listen: None });
        let config = ok(&inbound("proxy_protocol = false\n"));
        assert!(!config.inbound[0].proxy_protocol);
    }

    #[test]
    fn workload_api_defaults_and_explicit_values() {
        let config = ok(&inbound(""));
        assert_eq!(
            config.identity,
            IdentityConfig::WorkloadApi {
                socket: None,
                startup_timeout: secs(30),
            }
        );
        let text = inbound("").replace(
            WORKLOAD_API,
            "[identity]\nsource = \"workload_api\"\nsocket = \"tcp://127.0.0.1:8081\"\nstartup_timeout = \"2m 30s\"\n",
        );
        assert_eq!(
            ok(&text).identity,
            IdentityConfig::WorkloadApi {
                socket: Some("tcp://127.0.0.1:8081".into()),
                startup_timeout: secs(150),
            }
        );
    }

    // ---- defaults --------------------------------------------------------

    #[test]
    fn built_in_defaults_apply_when_nothing_is_set() {
        let text = format!(
            "{}\n[[outbound]]\nname = \"out\"\nlisten = \"127.0.0.1:8080\"\n\
             upstreams = [\"10.0.0.2:8443\"]\nallow = [\"spiffe://example.org/api\"]\n",
            inbound("")
        );
        let config = ok(&text);
        let expected = TunnelSettings {
            handshake_timeout: secs(10),
            connect_timeout: secs(5),
            idle_timeout: secs(3600),
            max_connections: 10_000,
            drain_timeout: secs(30),
            min_tls: MinTls::Tls13,
            session_resumption: true,
            max_connection_lifetime: None,
        };
        assert_eq!(TunnelSettings::default(), expected);
        assert_eq!(config.inbound[0].settings, expected);
        assert_eq!(config.outbound[0].settings, expected);
    }

    #[test]
    fn defaults_table_applies_to_every_tunnel() {
        let text = format!(
            "{WORKLOAD_API}\n[defaults]\nhandshake_timeout = \"2s\"\nconnect_timeout = \"750ms\"\n\
             idle_timeout = \"4m\"\nmax_connections = 50\ndrain_timeout = \"7s\"\nmin_tls = \"1.2\"\n\
             session_resumption = false\nmax_connection_lifetime = \"24h\"\n\
             [[inbound]]\nname = \"a\"\nlisten = \"127.0.0.1:1001\"\ntarget = \"127.0.0.1:3000\"\n\
             allow = [\"spiffe://example.org/web\"]\n\
             [[inbound]]\nname = \"b\"\nlisten = \"127.0.0.1:1002\"\ntarget = \"127.0.0.1:3001\"\n\
             allow = [\"spiffe://example.org/web\"]\n\
             [[outbound]]\nname = \"c\"\nlisten = \"127.0.0.1:1003\"\nupstreams = [\"x:1\"]\n\
             allow = [\"spiffe://example.org/api\"]\n"
        );
        let config = ok(&text);
        let expected = TunnelSettings {
            handshake_timeout: secs(2),
            connect_timeout: Duration::from_millis(750),
            idle_timeout: secs(240),
            max_connections: 50,
            drain_timeout: secs(7),
            min_tls: MinTls::Tls12,
            session_resumption: false,
            max_connection_lifetime: Some(secs(86400)),
        };
        assert_eq!(config.inbound[0].settings, expected);
        assert_eq!(config.inbound[1].settings, expected);
        assert_eq!(config.outbound[0].settings, expected);
    }

    #[test]
    fn a_tunnel_key_overrides_the_default_and_unset_keys_stay_built_in() {
        let text = format!(
            "{WORKLOAD_API}\n[defaults]\nhandshake_timeout = \"2s\"\nmax_connections = 50\nmin_tls = \"1.2\"\n\
             [[inbound]]\nname = \"a\"\nlisten = \"127.0.0.1:1001\"\ntarget = \"127.0.0.1:3000\"\n\
             allow = [\"spiffe://example.org/web\"]\nhandshake_timeout = \"500ms\"\n\
             max_connections = 7\nmin_tls = \"1.3\"\nidle_timeout = \"90s\"\nsession_resumption = false\n\
             max_connection_lifetime = \"10m\"\n\
             [[inbound]]\nname = \"b\"\nlisten = \"127.0.0.1:1002\"\ntarget = \"127.0.0.1:3001\"\n\
             allow = [\"spiffe://example.org/web\"]\n\
             [[outbound]]\nname = \"c\"\nlisten = \"127.0.0.1:1003\"\nupstreams = [\"x:1\"]\n\
             allow = [\"spiffe://example.org/api\"]\nconnect_timeout = \"1s\"\ndrain_timeout = \"0s\"\n"
        );
        let config = ok(&text);
        assert_eq!(
            config.inbound[0].settings,
            TunnelSettings {
                handshake_timeout: Duration::from_millis(500),
                connect_timeout: secs(5),
                idle_timeout: secs(90),
                max_connections: 7,
                drain_timeout: secs(30),
                min_tls: MinTls::Tls13,
                session_resumption: false,
                max_connection_lifetime: Some(secs(600)),
            }
        );
        // The tunnel's own keys do not leak into its neighbours.
        assert_eq!(
            config.inbound[1].settings,
            TunnelSettings {
                handshake_timeout: secs(2),
                connect_timeout: secs(5),
                idle_timeout: secs(3600),
                max_connections: 50,
                drain_timeout: secs(30),
                min_tls: MinTls::Tls12,
                session_resumption: true,
                max_connection_lifetime: None,
            }
        );
        assert_eq!(
            config.outbound[0].settings,
            TunnelSettings {
                handshake_timeout: secs(2),
                connect_timeout: secs(1),
                idle_timeout: secs(3600),
                max_connections: 50,
                drain_timeout: Duration::ZERO,
                min_tls: MinTls::Tls12,
                session_resumption: true,
                max_connection_lifetime: None,
            }
        );
    }

    #[test]
    fn min_tls_versions() {
        assert_eq!(
            ok(&inbound("min_tls = \"1.2\"\n")).inbound[0]
                .settings
                .min_tls,
            MinTls::Tls12
        );
        assert_eq!(
            ok(&inbound("min_tls = \"1.3\"\n")).inbound[0]
                .settings
                .min_tls,
            MinTls::Tls13
        );
        assert_eq!(
            ok(&outbound("upstreams = [\"x:1\"]\nmin_tls = \"1.2\"\n")).outbound[0]
                .settings
                .min_tls,
            MinTls::Tls12
        );
        for bad in ["1.1", "1.0", "TLSv1.3", "1.4", ""] {
            let text = inbound(&format!("min_tls = \"{bad}\"\n"));
            assert_invalid(
                &text,
                "min_tls",
                "inbound[0].min_tls",
                "is not a TLS version",
            );
        }
        let text = format!("{WORKLOAD_API}[defaults]\nmin_tls = \"1.1\"\n")
            + &inbound("").replace(WORKLOAD_API, "");
        assert_invalid(&text, "min_tls", "defaults.min_tls", "\"1.1\"");
        // A number is a type error from the TOML layer, on its line.
        let text = inbound("min_tls = 1.3\n");
        let (line, _, message) = invalid(&text);
        assert_eq!(line, line_of(&text, "min_tls"), "{message}");
    }

    // ---- paths -----------------------------------------------------------

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let text = r#"
[identity]
source = "files"
cert = "certs/svid.pem"
key = "../keys/svid.key"
[identity.bundles]
"example.org" = "bundle.pem"
"partner.org" = "/opt/bundles/partner.pem"

[[inbound]]
name = "rel"
listen = "127.0.0.1:1001"
target = "unix:run/app.sock"
policy = "policies/rel.policy"

[[inbound]]
name = "abs"
listen = "127.0.0.1:1002"
target = "unix:/run/app.sock"
policy = "/srv/policies/abs.policy"

[[outbound]]
name = "out"
listen = "127.0.0.1:1003"
upstreams = ["10.0.0.2:8443"]
policy = "out.policy"
"#;
        let config = ok(text);
        let dir = Path::new(DIR);
        let IdentityConfig::Files(files) = &config.identity else {
            panic!("expected files identity");
        };
        assert_eq!(
            files.cert,
            PathBuf::from("/etc/spiffe-tunnel/certs/svid.pem")
        );
        assert_eq!(files.key, dir.join("../keys/svid.key"));
        assert_eq!(
            files.bundles[&spiffe_id::parse_trust_domain("example.org").unwrap()],
            dir.join("bundle.pem")
        );
        assert_eq!(
            files.bundles[&spiffe_id::parse_trust_domain("partner.org").unwrap()],
            PathBuf::from("/opt/bundles/partner.pem")
        );

        let rel = &config.inbound[0];
        assert_eq!(rel.target, Target::Unix(dir.join("run/app.sock")));
        assert_eq!(rel.policy.file, Some(dir.join("policies/rel.policy")));
        assert!(rel.policy.inline.is_empty());

        let abs = &config.inbound[1];
        assert_eq!(abs.target, Target::Unix(PathBuf::from("/run/app.sock")));
        assert_eq!(
            abs.policy.file,
            Some(PathBuf::from("/srv/policies/abs.policy"))
        );

        assert_eq!(config.outbound[0].policy.file, Some(dir.join("out.policy")));
    }

    #[test]
    fn relative_config_path_keeps_relative_paths_relative_to_its_folder() {
        let text = inbound("policy = \"api.policy\"\n");
        let config = Config::parse(&text, Path::new("conf/tunnel.toml")).unwrap();
        assert_eq!(
            config.inbound[0].policy.file,
            Some(PathBuf::from("conf/api.policy"))
        );
        let config = Config::parse(&text, Path::new("tunnel.toml")).unwrap();
        assert_eq!(
            config.inbound[0].policy.file,
            Some(PathBuf::from("api.policy"))
        );
    }

    // ---- errors: syntax and unknown keys -------------------------------

    #[test]
    fn error_display_is_file_line_key_message() {
        let err = ConfigError::Invalid {
            file: "t.toml".into(),
            line: 9,
            key: "inbound[0].listen".into(),
            message: "bad".into(),
        };
        assert_eq!(err.to_string(), "t.toml:9: inbound[0].listen: bad");
        let err = ConfigError::Invalid {
            file: "t.toml".into(),
            line: 3,
            key: String::new(),
            message: "bad".into(),
        };
        assert_eq!(err.to_string(), "t.toml:3: bad");

        let text = inbound("").replace("127.0.0.1:8443", "nowhere");
        let err = parse(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{FILE}:{}: inbound[0].listen: \"nowhere\" is not a listen address \
                 (expected IP:port, like \"0.0.0.0:8443\" or \"[::1]:8443\", or systemd:NAME)",
                line_of(&text, "nowhere")
            )
        );
    }

    #[test]
    fn unknown_top_level_key() {
        let text = format!("# a comment\n\nbogus = true\n{}", inbound(""));
        let (line, key, message) = invalid(&text);
        assert_eq!(line, 3, "{message}");
        assert_eq!(key, "");
        assert!(message.contains("unknown field `bogus`"), "{message}");
    }

    #[test]
    fn unknown_key_inside_tables() {
        let text = inbound("colour = \"blue\"\n");
        let (line, key, message) = invalid(&text);
        assert_eq!(line, line_of(&text, "colour"), "{message}");
        assert_eq!(key, "");
        assert!(message.contains("unknown field `colour`"), "{message}");

        // In the second of two tunnels, on its own line.
        let text = format!(
            "{}\n[[inbound]]\nname = \"b\"\nlisten = \"127.0.0.1:2\"\ntarget = \"x:1\"\n\
             allow = [\"spiffe://example.org/b\"]\ntarget_port = 1\n",
            inbound("")
        );
        let (line, _, message) = invalid(&text);
        assert_eq!(line, line_of(&text, "target_port"), "{message}");
        assert!(message.contains("unknown field `target_port`"), "{message}");

        // An inbound-only key in an outbound table.
        let text = outbound("upstreams = [\"x:1\"]\nproxy_protocol = true\n");
        let (line, _, message) = invalid(&text);
        assert_eq!(line, line_of(&text, "proxy_protocol"), "{message}");
        assert!(
            message.contains("unknown field `proxy_protocol`"),
            "{message}"
        );

        for (table, text) in [
            (
                "defaults",
                format!("{}[defaults]\nmax_conns = 5\n", inbound("")),
            ),
            ("admin", format!("{}[admin]\nmax_conns = 5\n", inbound(""))),
            (
                "identity",
                inbound("").replace(WORKLOAD_API, &format!("{WORKLOAD_API}max_conns = 5\n")),
            ),
        ] {
            let (line, _, message) = invalid(&text);
            assert_eq!(line, line_of(&text, "max_conns"), "[{table}]: {message}");
            assert!(message.contains("unknown field `max_conns`"), "{message}");
        }
    }

    #[test]
    fn missing_identity_and_bad_source() {
        let text = inbound("").replace(WORKLOAD_API, "");
        let (_, _, message) = invalid(&text);
        assert!(message.contains("identity"), "{message}");

        let text = inbound("").replace("workload_api", "spire");
        let (line, _, message) = invalid(&text);
        assert_eq!(line, line_of(&text, "spire"), "{message}");

        let text = "[identity\nsource = \"files\"\n";
        let (line, _, _) = invalid(text);
        assert_eq!(line, 1);
    }

    // ---- errors: addresses ---------------------------------------------

    #[test]
    fn bad_listen_addresses() {
        for bad in [
            "nowhere",
            "127.0.0.1",
            "localhost:8443",
            "127.0.0.1:99999",
            ":8443",
            "::1:8443",
        ] {
            let text = inbound("").replace("127.0.0.1:8443", bad);
            assert_invalid(
                &text,
                "listen =",
                "inbound[0].listen",
                "is not a listen address",
            );
        }
        let text = outbound("upstreams = [\"x:1\"]\n").replace("127.0.0.1:8080", "0.0.0.0");
        assert_invalid(
            &text,
            "listen =",
            "outbound[0].listen",
            "is not a listen address",
        );

        let text = format!("{}\n[admin]\nlisten = \"localhost:9901\"\n", inbound(""));
        assert_invalid(
            &text,
            "localhost:9901",
            "admin.listen",
            "is not a listen address",
        );

        // IPv6 in brackets is fine.
        let config = ok(&inbound("").replace("127.0.0.1:8443", "[::1]:8443"));
        assert_eq!(
            config.inbound[0].listen,
            ListenAddress::Tcp("[::1]:8443".parse().unwrap())
        );
    }

    #[test]
    fn systemd_listen_addresses() {
        let config = ok(&inbound("").replace("127.0.0.1:8443", "systemd:api-in"));
        assert_eq!(
            config.inbound[0].listen,
            ListenAddress::Systemd("api-in".into())
        );
        assert_eq!(config.inbound[0].listen.to_string(), "systemd:api-in");
        for (bad, why) in [
            ("systemd:", "is not a systemd socket name"),
            ("systemd:a:b", "is not a systemd socket name"),
            ("systemd:a b", "is not a systemd socket name"),
            ("systemd:inbound/api", "reserved for upgrades"),
            ("systemd:spiffe-tunnel/admin", "reserved for upgrades"),
        ] {
            let text = inbound("").replace("127.0.0.1:8443", bad);
            assert_invalid(&text, "listen =", "inbound[0].listen", why);
        }
        // Two tunnels cannot take one systemd socket.
        let text = format!(
            "{}\n[[outbound]]\nname = \"b\"\nlisten = \"systemd:s\"\nupstreams = [\"x:1\"]\nallow = [\"spiffe://td/x\"]\n",
            inbound("").replace("127.0.0.1:8443", "systemd:s")
        );
        let (line, key, message) = invalid(&text);
        assert_eq!(
            (line, key.as_str()),
            (nth_line_of(&text, "listen =", 1), "outbound[0].listen")
        );
        assert!(
            message.contains("already used by another listener"),
            "{message}"
        );
    }

    #[test]
    fn bad_upstreams() {
        for bad in [
            "10.0.0.2",
            "10.0.0.2:0",
            ":8443",
            "10.0.0.2:65536",
            "10.0.0.2:https",
            "10.0.0.2:",
        ] {
            let text = outbound(&format!(
                "upstreams = [\n  \"10.0.0.1:8443\",\n  \"{bad}\",  # the bad one\n]\n"
            ));
            assert_invalid(
                &text,
                "the bad one",
                "outbound[0].upstreams[1]",
                "is not \"host:port\"",
            );
        }
        let config = ok(&outbound(
            "upstreams = [\"api.internal:8443\", \"[::1]:8443\", \"10.0.0.2:65535\"]\n",
        ));
        assert_eq!(
            config.outbound[0].upstreams,
            vec!["api.internal:8443", "[::1]:8443", "10.0.0.2:65535"]
        );
    }

    #[test]
    fn empty_or_missing_upstreams() {
        let text = outbound("upstreams = []\n");
        assert_invalid(
            &text,
            "upstreams",
            "outbound[0].upstreams",
            "needs at least one",
        );
        let text = outbound("");
        let (_, _, message) = invalid(&text);
        assert!(message.contains("missing field `upstreams`"), "{message}");
    }

    #[test]
    fn bad_targets() {
        for bad in ["127.0.0.1", "127.0.0.1:0", ":3000", "unix:"] {
            let text = inbound("").replace(
                "target = \"127.0.0.1:3000\"",
                &format!("target = \"{bad}\""),
            );
            let (line, key, message) = invalid(&text);
            assert_eq!(
                (line, key.as_str()),
                (line_of(&text, "target ="), "inbound[0].target"),
                "{bad}: {message}"
            );
        }
        let config = ok(&inbound("").replace("127.0.0.1:3000", "app.internal:3000"));
        assert_eq!(
            config.inbound[0].target,
            Target::Tcp("app.internal:3000".into())
        );
    }

    // ---- errors: names and duplicates ----------------------------------

    fn two_tunnels(first: (&str, &str, &str), second: (&str, &str, &str)) -> String {
        let table = |(kind, name, listen): (&str, &str, &str)| {
            let target = if kind == "inbound" {
                "target = \"127.0.0.1:3000\"\n"
            } else {
                "upstreams = [\"10.0.0.2:8443\"]\n"
            };
            format!(
                "[[{kind}]]\nname = \"{name}\"\nlisten = \"{listen}\"\n{target}\
                 allow = [\"spiffe://example.org/x\"]\n"
            )
        };
        format!("{WORKLOAD_API}\n{}\n{}", table(first), table(second))
    }

    #[test]
    fn duplicate_tunnel_names_within_a_kind() {
        let text = two_tunnels(
            ("inbound", "api", "127.0.0.1:1"),
            ("inbound", "api", "127.0.0.1:2"),
        );
        let (line, key, message) = invalid(&text);
        assert_eq!(
            (line, key.as_str()),
            (nth_line_of(&text, "name = \"api\"", 1), "inbound[1].name"),
            "{message}"
        );
        assert!(message.contains("already named \"api\""), "{message}");

        let text = two_tunnels(
            ("outbound", "api", "127.0.0.1:1"),
            ("outbound", "api", "127.0.0.1:2"),
        );
        let (line, key, _) = invalid(&text);
        assert_eq!(
            (line, key.as_str()),
            (nth_line_of(&text, "name = \"api\"", 1), "outbound[1].name")
        );

        // The same name for an inbound and an outbound tunnel is fine.
        let config = ok(&two_tunnels(
            ("inbound", "api", "127.0.0.1:1"),
            ("outbound", "api", "127.0.0.1:2"),
        ));
        assert_eq!(config.inbound[0].name, "api");
        assert_eq!(config.outbound[0].name, "api");
    }

    #[test]
    fn duplicate_listen_addresses() {
        for (first, second, key) in [
            ("inbound", "inbound", "inbound[1].listen"),
            ("inbound", "outbound", "outbound[0].listen"),
            ("outbound", "outbound", "outbound[1].listen"),
        ] {
            let text = two_tunnels(
                (first, "a", "127.0.0.1:8443"),
                (second, "b", "127.0.0.1:8443"),
            );
            let (line, got, message) = invalid(&text);
            assert_eq!(
                (line, got.as_str()),
                (nth_line_of(&text, "listen =", 1), key),
                "{message}"
            );
            assert!(
                message.contains("127.0.0.1:8443 is already used"),
                "{message}"
            );
        }

        // With admin.listen, which is read first.
        let text = format!("{}\n[admin]\nlisten = \"127.0.0.1:8443\"\n", inbound(""));
        let (line, key, message) = invalid(&text);
        assert_eq!(
            (line, key.as_str()),
            (nth_line_of(&text, "listen =", 0), "inbound[0].listen"),
            "{message}"
        );
        assert!(message.contains("already used"), "{message}");
        // Admin first in the file makes no difference: the tunnel is blamed.
        let text = inbound("").replace(
            WORKLOAD_API,
            &format!("{WORKLOAD_API}[admin]\nlisten = \"127.0.0.1:8443\"\n"),
        );
        let (line, key, _) = invalid(&text);
        assert_eq!(
            (line, key.as_str()),
            (nth_line_of(&text, "listen =", 1), "inbound[0].listen")
        );

        // Same port on another address, or another port, is fine.
        ok(&two_tunnels(
            ("inbound", "a", "127.0.0.1:8443"),
            ("outbound", "b", "127.0.0.2:8443"),
        ));
        ok(&format!(
            "{}\n[admin]\nlisten = \"127.0.0.1:9901\"\n",
            inbound("")
        ));
    }

    #[test]
    fn invalid_tunnel_names() {
        let long = "a".repeat(65);
        for bad in ["my api", "", long.as_str(), "api/v1", "api:1", "ä"] {
            let text = inbound("").replace("name = \"in\"", &format!("name = \"{bad}\""));
            assert_invalid(&text, "name =", "inbound[0].name", "is not a tunnel name");
            let text = outbound("upstreams = [\"x:1\"]\n")
                .replace("name = \"out\"", &format!("name = \"{bad}\""));
            assert_invalid(&text, "name =", "outbound[0].name", "is not a tunnel name");
        }
        let longest = "b".repeat(64);
        for good in ["a", "api-v1_2.prod", "API", "0", longest.as_str()] {
            let text = inbound("").replace("name = \"in\"", &format!("name = \"{good}\""));
            assert_eq!(ok(&text).inbound[0].name, good);
        }
    }

    // ---- errors: identities and policies -------------------------------

    #[test]
    fn bad_svid() {
        for (bad, part) in [
            ("spiffe://Example.org/api", "lower case"),
            ("spiffe://example.org", "needs a workload path"),
            ("spiffe://example.org/", "invalid SPIFFE ID"),
            ("https://example.org/api", "spiffe://"),
            ("SPIFFE://example.org/api", "spiffe://"),
        ] {
            let text = inbound(&format!("svid = \"{bad}\"\n"));
            assert_invalid(&text, "svid", "inbound[0].svid", part);
        }
        let text = outbound("upstreams = [\"x:1\"]\nsvid = \"spiffe://EXAMPLE.org/api\"\n");
        assert_invalid(&text, "svid", "outbound[0].svid", "lower case");
        let config = ok(&outbound(
            "upstreams = [\"x:1\"]\nsvid = \"spiffe://example.org/ns/prod/sa/api\"\n",
        ));
        assert_eq!(
            config.outbound[0].svid,
            SvidSelector::by_id(id("spiffe://example.org/ns/prod/sa/api"))
        );
    }

    #[test]
    fn svid_hint_picks_by_hint_and_needs_the_workload_api() {
        let config = ok(&inbound("svid_hint = \"internal\"\n"));
        assert_eq!(
            config.inbound[0].svid,
            SvidSelector {
                id: None,
                hint: Some("internal".into())
            }
        );
        let config = ok(&outbound(
            "upstreams = [\"x:1\"]\nsvid = \"spiffe://example.org/web\"\nsvid_hint = \"external\"\n",
        ));
        assert_eq!(
            config.outbound[0].svid,
            SvidSelector {
                id: Some(id("spiffe://example.org/web")),
                hint: Some("external".into())
            }
        );
        assert_invalid(
            &inbound("svid_hint = \"\"\n"),
            "svid_hint",
            "inbound[0].svid_hint",
            "must not be empty",
        );
        let files = files_identity(&format!("{CERT_KEY}{BUNDLES}"))
            .replace("allow = [", "svid_hint = \"internal\"\nallow = [");
        assert_invalid(
            &files,
            "svid_hint",
            "inbound[0].svid_hint",
            "source = \"workload_api\"",
        );
    }

    #[test]
    fn bad_allow_entry_names_its_index_and_line() {
        let text = inbound("").replace(
            "allow = [\"spiffe://example.org/web\"]",
            "allow = [\n    \"spiffe://example.org/web\",\n    \"spiffe://example.org/web-*\",\n]",
        );
        assert_invalid(
            &text,
            "web-*",
            "inbound[0].allow[1]",
            "a wildcard must be a whole path segment",
        );

        let text = outbound("upstreams = [\"x:1\"]\n").replace(
            "allow = [\"spiffe://example.org/api\"]",
            "allow = [\"deny spiffe://example.org/a\", \"spiffe://*.example.org/a\"]",
        );
        assert_invalid(
            &text,
            "allow",
            "outbound[0].allow[1]",
            "trust domain must be literal",
        );

        let text = inbound("").replace("spiffe://example.org/web", "spiffe://example.org");
        assert_invalid(&text, "allow", "inbound[0].allow[0]", "needs a path");
    }

    #[test]
    fn inline_allow_entries_keep_effect_and_order() {
        let text = inbound("").replace(
            "allow = [\"spiffe://example.org/web\"]",
            "allow = [\"spiffe://example.org/web\", \"deny spiffe://example.org/ns/*/legacy\", \
             \"# a comment entry is skipped\", \"allow spiffe://partner.org/**\"]",
        );
        let config = ok(&text);
        assert_eq!(
            config.inbound[0].policy,
            PolicySpec {
                inline: vec![
                    allow("spiffe://example.org/web"),
                    Rule {
                        effect: Effect::Deny,
                        pattern: "spiffe://example.org/ns/*/legacy".into()
                    },
                    allow("spiffe://partner.org/**"),
                ],
                file: None,
            }
        );
    }

    #[test]
    fn a_tunnel_must_allow_someone() {
        // Neither allow nor policy: reported at the tunnel's name.
        let text = format!(
            "{WORKLOAD_API}\n[[inbound]]\nname = \"lonely\"\nlisten = \"127.0.0.1:1\"\n\
             target = \"127.0.0.1:2\"\n"
        );
        assert_invalid(&text, "lonely", "inbound[0].allow", "would allow nobody");

        let text = format!(
            "{WORKLOAD_API}\n[[outbound]]\nname = \"lonely\"\nlisten = \"127.0.0.1:1\"\n\
             upstreams = [\"x:1\"]\n"
        );
        assert_invalid(&text, "lonely", "outbound[0].allow", "would allow nobody");

        // An empty list, or one with only comments, at the list.
        for list in ["[]", "[\"# nobody yet\", \"  \"]"] {
            let text = inbound("").replace("[\"spiffe://example.org/web\"]", list);
            assert_invalid(&text, "allow =", "inbound[0].allow", "would allow nobody");
        }

        // A policy file alone is enough (it is not read by parse).
        let text = format!(
            "{WORKLOAD_API}\n[[inbound]]\nname = \"p\"\nlisten = \"127.0.0.1:1\"\n\
             target = \"127.0.0.1:2\"\npolicy = \"p.policy\"\n"
        );
        let config = ok(&text);
        assert_eq!(
            config.inbound[0].policy,
            PolicySpec {
                inline: vec![],
                file: Some(Path::new(DIR).join("p.policy")),
            }
        );
    }

    // ---- errors: settings ------------------------------------------------

    #[test]
    fn bad_duration_strings() {
        for key in [
            "handshake_timeout",
            "connect_timeout",
            "idle_timeout",
            "drain_timeout",
            "max_connection_lifetime",
        ] {
            let text = inbound(&format!("{key} = \"5 parsecs\"\n"));
            assert_invalid(
                &text,
                "parsecs",
                &format!("inbound[0].{key}"),
                "\"5 parsecs\" is not a duration",
            );

            let text = outbound(&format!("upstreams = [\"x:1\"]\n{key} = \"soon\"\n"));
            assert_invalid(
                &text,
                "soon",
                &format!("outbound[0].{key}"),
                "is not a duration",
            );

            let text = format!("{}\n[defaults]\n{key} = \"10 s x\"\n", inbound(""));
            assert_invalid(
                &text,
                "10 s x",
                &format!("defaults.{key}"),
                "is not a duration",
            );
        }
        let text = inbound("").replace(
            WORKLOAD_API,
            &format!("{WORKLOAD_API}startup_timeout = \"5 parsecs\"\n"),
        );
        assert_invalid(
            &text,
            "parsecs",
            "identity.startup_timeout",
            "is not a duration",
        );

        // A bare number is not a duration either (the TOML layer says so).
        let text = inbound("connect_timeout = 5\n");
        let (line, _, message) = invalid(&text);
        assert_eq!(line, line_of(&text, "connect_timeout"), "{message}");
    }

    #[test]
    fn zero_timeouts_are_refused_where_they_are_written() {
        for key in ["handshake_timeout", "connect_timeout", "idle_timeout"] {
            let text = inbound(&format!("{key} = \"0s\"\n"));
            assert_invalid(
                &text,
                "0s",
                &format!("inbound[0].{key}"),
                "must be longer than zero",
            );

            let text = outbound(&format!("upstreams = [\"x:1\"]\n{key} = \"0ms\"\n"));
            assert_invalid(
                &text,
                "0ms",
                &format!("outbound[0].{key}"),
                "must be longer than zero",
            );

            let text = format!("{}\n[defaults]\n{key} = \"0s\"\n", inbound(""));
            assert_invalid(
                &text,
                "0s",
                &format!("defaults.{key}"),
                "must be longer than zero",
            );
        }
        let text = inbound("").replace(
            WORKLOAD_API,
            &format!("{WORKLOAD_API}startup_timeout = \"0s\"\n"),
        );
        assert_invalid(
            &text,
            "0s",
            "identity.startup_timeout",
            "must be longer than zero",
        );

        // drain_timeout = 0 means "close at once on SIGTERM", which is allowed.
        let config = ok(&format!(
            "{}\n[defaults]\ndrain_timeout = \"0s\"\n",
            inbound("")
        ));
        assert_eq!(config.inbound[0].settings.drain_timeout, Duration::ZERO);
    }

    #[test]
    fn multiplex_and_its_pool_knobs() {
        let base = "upstreams = [\"x:1\"]\n";
        assert_eq!(ok(&outbound(base)).outbound[0].multiplex, None);
        assert_eq!(
            ok(&outbound(&format!("{base}multiplex = false\n"))).outbound[0].multiplex,
            None
        );
        assert_eq!(
            ok(&outbound(&format!("{base}multiplex = true\n"))).outbound[0].multiplex,
            Some(MuxSettings::default())
        );
        let text = format!(
            "{base}multiplex = true\nmax_streams_per_connection = 250\npool_idle_timeout = \"5s\"\n\
             authority = \"127.0.0.1:3000\"\n"
        );
        assert_eq!(
            ok(&outbound(&text)).outbound[0].multiplex,
            Some(MuxSettings {
                max_streams_per_connection: 250,
                pool_idle_timeout: secs(5),
                authority: Some("127.0.0.1:3000".into()),
            })
        );
        for (knob, value) in [
            ("max_streams_per_connection", "5"),
            ("pool_idle_timeout", "\"5s\""),
            ("authority", "\"a:1\""),
        ] {
            let text = outbound(&format!("{base}{knob} = {value}\n"));
            assert_invalid(
                &text,
                knob,
                &format!("outbound[0].{knob}"),
                "only used with multiplex = true",
            );
        }
        for bad in ["0", "-1", "10001"] {
            let text = outbound(&format!(
                "{base}multiplex = true\nmax_streams_per_connection = {bad}\n"
            ));
            assert_invalid(
                &text,
                "max_streams_per_connection",
                "outbound[0].max_streams_per_connection",
                "between 1 and 10000",
            );
            let text = inbound(&format!("max_streams_per_connection = {bad}\n"));
            assert_invalid(
                &text,
                "max_streams_per_connection",
                "inbound[0].max_streams_per_connection",
                "between 1 and 10000",
            );
        }
        for bad in ["\"nohost\"", "\":80\"", "\"a b:80\"", "\"host:port\""] {
            let text = outbound(&format!("{base}multiplex = true\nauthority = {bad}\n"));
            assert_invalid(&text, "authority", "outbound[0].authority", "authority");
        }
        let text = outbound(&format!(
            "{base}multiplex = true\npool_idle_timeout = \"0s\"\n"
        ));
        assert_invalid(
            &text,
            "pool_idle_timeout",
            "outbound[0].pool_idle_timeout",
            "longer than zero",
        );
        assert_eq!(
            ok(&inbound("max_streams_per_connection = 7\n")).inbound[0].max_streams_per_connection,
            7
        );
    }

    #[test]
    fn max_connections_must_be_positive() {
        for bad in ["0", "-1", "-10000"] {
            let text = inbound(&format!("max_connections = {bad}\n"));
            assert_invalid(
                &text,
                "max_connections",
                "inbound[0].max_connections",
                "at least 1",
            );

            let text = outbound(&format!("upstreams = [\"x:1\"]\nmax_connections = {bad}\n"));
            assert_invalid(
                &text,
                "max_connections",
                "outbound[0].max_connections",
                "at least 1",
            );

            let text = format!("{}\n[defaults]\nmax_connections = {bad}\n", inbound(""));
            assert_invalid(
                &text,
                "max_connections",
                "defaults.max_connections",
                "at least 1",
            );
        }
        assert_eq!(
            ok(&inbound("max_connections = 1\n")).inbound[0]
                .settings
                .max_connections,
            1
        );
        // Not an integer: the TOML layer refuses it on its line.
        let text = inbound("max_connections = \"10\"\n");
        let (line, _, message) = invalid(&text);
        assert_eq!(line, line_of(&text, "max_connections"), "{message}");
    }

    // ---- errors: identity ------------------------------------------------

    fn files_identity(body: &str) -> String {
        format!(
            "[identity]\nsource = \"files\"\n{body}\n[[inbound]]\nname = \"in\"\n\
             listen = \"127.0.0.1:8443\"\ntarget = \"127.0.0.1:3000\"\n\
             allow = [\"spiffe://example.org/web\"]\n"
        )
    }

    const CERT_KEY: &str = "cert = \"svid.pem\"\nkey = \"svid.key\"\n";
    const BUNDLES: &str = "[identity.bundles]\n\"example.org\" = \"bundle.pem\"\n";

    #[test]
    fn files_source_needs_cert_key_and_bundles() {
        ok(&files_identity(&format!("{CERT_KEY}{BUNDLES}")));

        let text = files_identity(&format!("key = \"svid.key\"\n{BUNDLES}"));
        assert_invalid(&text, "source", "identity.cert", "needs cert");

        let text = files_identity(&format!("cert = \"svid.pem\"\n{BUNDLES}"));
        assert_invalid(&text, "source", "identity.key", "needs key");

        let text = files_identity(CERT_KEY);
        assert_invalid(&text, "source", "identity.bundles", "[identity.bundles]");

        let text = files_identity(&format!("{CERT_KEY}[identity.bundles]\n"));
        let (_, key, message) = invalid(&text);
        assert_eq!(key, "identity.bundles");
        assert!(message.contains("at least one trust domain"), "{message}");

        let text = files_identity(&format!(
            "{CERT_KEY}socket = \"unix:///tmp/api.sock\"\n{BUNDLES}"
        ));
        assert_invalid(&text, "socket", "identity.socket", "workload_api");
    }

    #[test]
    fn bad_trust_domain_in_bundles() {
        for (bad, part) in [
            ("Example.org", "lower case"),
            ("spiffe://example.org", "is not a trust domain name"),
            ("", "trust domain is missing"),
        ] {
            let text = files_identity(&format!(
                "{CERT_KEY}[identity.bundles]\n\"example.org\" = \"a.pem\"\n\"{bad}\" = \"b.pem\"\n"
            ));
            assert_invalid(&text, "b.pem", &format!("identity.bundles.\"{bad}\""), part);
        }
    }

    #[test]
    fn workload_api_refuses_file_keys() {
        for (line, key) in [
            ("cert = \"svid.pem\"", "identity.cert"),
            ("key = \"svid.key\"", "identity.key"),
        ] {
            let text = inbound("").replace(WORKLOAD_API, &format!("{WORKLOAD_API}{line}\n"));
            assert_invalid(&text, line, key, "only used with source = \"files\"");
        }
        let text = inbound("").replace(
            WORKLOAD_API,
            &format!("{WORKLOAD_API}bundles = {{ \"example.org\" = \"b.pem\" }}\n"),
        );
        assert_invalid(
            &text,
            "bundles",
            "identity.bundles",
            "only used with source = \"files\"",
        );
    }

    #[test]
    fn workload_api_socket_scheme() {
        for bad in [
            "http://127.0.0.1:8081",
            "/tmp/spire-agent/public/api.sock",
            "tcp:127.0.0.1:1",
            "",
        ] {
            let text =
                inbound("").replace(WORKLOAD_API, &format!("{WORKLOAD_API}socket = \"{bad}\"\n"));
            assert_invalid(
                &text,
                "socket",
                "identity.socket",
                "is not a Workload API address",
            );
        }
        for good in [
            "unix:///tmp/spire-agent/public/api.sock",
            "tcp://127.0.0.1:8081",
        ] {
            let text = inbound("").replace(
                WORKLOAD_API,
                &format!("{WORKLOAD_API}socket = \"{good}\"\n"),
            );
            let IdentityConfig::WorkloadApi { socket, .. } = ok(&text).identity else {
                panic!("expected workload_api");
            };
            assert_eq!(socket.as_deref(), Some(good));
        }
    }

    #[test]
    fn no_tunnels_at_all() {
        for text in [
            WORKLOAD_API.to_string(),
            format!("{WORKLOAD_API}\n[admin]\nlisten = \"127.0.0.1:9901\"\n[defaults]\nidle_timeout = \"1m\"\n"),
            format!("inbound = []\noutbound = []\n{WORKLOAD_API}"),
        ] {
            let (line, key, message) = invalid(&text);
            assert_eq!((line, key.as_str()), (1, ""));
            assert!(message.contains("no tunnels"), "{message}");
        }
    }

    // ---- policy files and loading --------------------------------------

    #[test]
    fn policy_spec_combines_inline_rules_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(
            dir.path().join("policies/api.policy"),
            "# who may call the api\n\nspiffe://example.org/ns/prod/*   # prod workloads\n\
             deny spiffe://example.org/ns/prod/legacy\n",
        )
        .unwrap();
        let path = dir.path().join("tunnel.toml");
        std::fs::write(&path, EXAMPLE).unwrap();

        let config = Config::load(&path).unwrap();
        assert_eq!(config.path, path);
        let spec = &config.inbound[0].policy;
        assert_eq!(spec.file, Some(dir.path().join("policies/api.policy")));

        let policy = spec.load().unwrap();
        assert_eq!(policy.len(), 3);
        assert_eq!(
            policy.decide(&id("spiffe://example.org/web")),
            Decision::Allowed("spiffe://example.org/web")
        );
        assert_eq!(
            policy.decide(&id("spiffe://example.org/ns/prod/api")),
            Decision::Allowed("spiffe://example.org/ns/prod/*")
        );
        assert_eq!(
            policy.decide(&id("spiffe://example.org/ns/prod/legacy")),
            Decision::Denied("spiffe://example.org/ns/prod/legacy")
        );
        assert!(!policy.allows(&id("spiffe://example.org/api")));
        assert!(!policy.allows(&id("spiffe://example.org/ns/prod/a/b")));

        // Inline only: no file read.
        let outbound = config.outbound[0].policy.load().unwrap();
        assert_eq!(outbound.len(), 1);
        assert!(outbound.allows(&id("spiffe://example.org/api")));
        assert!(!outbound.allows(&id("spiffe://example.org/web")));

        let all = config.load_policies().unwrap();
        assert_eq!(all.iter().map(Policy::len).collect::<Vec<_>>(), vec![3, 1]);

        // A file alone, with no inline rules.
        let spec = PolicySpec {
            inline: vec![],
            file: Some(dir.path().join("policies/api.policy")),
        };
        let policy = spec.load().unwrap();
        assert_eq!(policy.len(), 2);
        assert!(!policy.allows(&id("spiffe://example.org/web")));
    }

    #[test]
    fn a_bad_policy_file_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("api.policy");
        std::fs::write(
            &file,
            "spiffe://example.org/web\n# fine so far\nspiffe://example.org/web-*\nspiffe://example.org/x\n",
        )
        .unwrap();
        let spec = PolicySpec {
            inline: vec![allow("spiffe://example.org/api")],
            file: Some(file.clone()),
        };
        let err = spec.load().unwrap_err();
        assert_eq!(err.origin, file.display().to_string());
        assert_eq!(err.line, 3);
        assert!(err.message.contains("web-*"), "{}", err.message);
        assert!(
            err.to_string()
                .starts_with(&format!("{}:3: ", file.display())),
            "{err}"
        );

        // The same through a config and load_policies, and as a ConfigError.
        let path = dir.path().join("tunnel.toml");
        std::fs::write(&path, inbound("policy = \"api.policy\"\n")).unwrap();
        let config = Config::load(&path).unwrap();
        let err = config.load_policies().unwrap_err();
        assert_eq!((err.origin.as_str(), err.line), (file.to_str().unwrap(), 3));
        let err = ConfigError::from(err);
        assert!(matches!(err, ConfigError::Policy(_)));
        assert!(err
            .to_string()
            .starts_with(&format!("{}:3: ", file.display())));

        // A missing policy file is line 0 of that file.
        let spec = PolicySpec {
            inline: vec![],
            file: Some(dir.path().join("missing.policy")),
        };
        let err = spec.load().unwrap_err();
        assert_eq!(err.line, 0);
        assert_eq!(
            err.origin,
            dir.path().join("missing.policy").display().to_string()
        );
    }

    #[test]
    fn load_reads_the_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        match Config::load(&missing) {
            Err(ConfigError::Read { file, source }) => {
                assert_eq!(file, missing.display().to_string());
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected ConfigError::Read, got {other:?}"),
        }
        let err = Config::load(&missing).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("{}: cannot read: ", missing.display())),
            "{err}"
        );

        // Errors in a loaded file name that file.
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, inbound("max_connections = 0\n")).unwrap();
        match Config::load(&path) {
            Err(ConfigError::Invalid { file, key, .. }) => {
                assert_eq!(file, path.display().to_string());
                assert_eq!(key, "inbound[0].max_connections");
            }
            other => panic!("expected ConfigError::Invalid, got {other:?}"),
        }
    }

    #[test]
    fn ipv6_upstreams_need_brackets() {
        let dir = std::path::Path::new("/etc/st");
        let text = |upstream: &str| {
            format!(
                "[identity]\nsource = \"workload_api\"\n[[outbound]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstreams = [\"{upstream}\"]\nallow = [\"spiffe://td/x\"]\n"
            )
        };
        let ok = Config::parse(&text("[2001:db8::1]:443"), &dir.join("t.toml")).unwrap();
        assert_eq!(
            ok.outbound[0].upstreams,
            vec!["[2001:db8::1]:443".to_string()]
        );
        let err = Config::parse(&text("2001:db8::1:443"), &dir.join("t.toml")).unwrap_err();
        assert!(
            err.to_string()
                .contains("t.toml:6: outbound[0].upstreams[0]"),
            "{err}"
        );
        assert!(Config::parse(&text("[nothost]:443"), &dir.join("t.toml")).is_err());
    }
}
