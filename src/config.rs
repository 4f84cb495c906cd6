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
use crate::policy::{self, Policy, PolicyError, Rule};
use crate::spiffe_id::{self, SpiffeId};

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

/// mTLS in, plain out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub target: Target,
    pub policy: PolicySpec,
    /// Which of our SVIDs to present; `None` means the default one.
    pub svid: Option<SpiffeId>,
    pub proxy_protocol: bool,
    pub settings: TunnelSettings,
}

/// Plain in, mTLS out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundConfig {
    pub name: String,
    pub listen: SocketAddr,
    /// `host:port` each; tried in turn.
    pub upstreams: Vec<String>,
    pub policy: PolicySpec,
    pub svid: Option<SpiffeId>,
    pub settings: TunnelSettings,
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

/// A validated config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub identity: IdentityConfig,
    pub admin: AdminConfig,
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
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    bundles: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
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
            handshake_timeout: Option<Spanned<String>>,
            connect_timeout: Option<Spanned<String>>,
            idle_timeout: Option<Spanned<String>>,
            max_connections: Option<Spanned<i64>>,
            drain_timeout: Option<Spanned<String>>,
            min_tls: Option<Spanned<String>>,
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
                }
            }
        }
    };
}

tunnel_table!(RawInbound {
    target: Spanned<String>,
    proxy_protocol: Option<bool>,
});

tunnel_table!(RawOutbound {
    upstreams: Spanned<Vec<Spanned<String>>>,
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

        let mut listens: HashSet<SocketAddr> = admin.listen.into_iter().collect();
        let mut check_listen = |addr: SocketAddr, span: &Range<usize>, key: &str| {
            if listens.insert(addr) {
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
            let listen = parse_listen(&t.listen, &key("listen"), &at)?;
            check_listen(listen, &t.listen.span(), &key("listen"))?;
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
                svid: parse_svid(t.svid.as_ref(), &key("svid"), &at)?,
                proxy_protocol: t.proxy_protocol.unwrap_or(false),
                settings: apply_settings(
                    &defaults,
                    &t.settings(),
                    key("").trim_end_matches('.'),
                    &at,
                )?,
            });
        }

        let mut outbound = Vec::new();
        let mut names = HashSet::new();
        for (i, t) in raw.outbound.iter().enumerate() {
            let key = |k: &str| format!("outbound[{i}].{k}");
            let name = tunnel_name(&t.name, &key("name"), &mut names, &at)?;
            let listen = parse_listen(&t.listen, &key("listen"), &at)?;
            check_listen(listen, &t.listen.span(), &key("listen"))?;
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
            outbound.push(OutboundConfig {
                name,
                listen,
                upstreams,
                policy,
                svid: parse_svid(t.svid.as_ref(), &key("svid"), &at)?,
                settings: apply_settings(
                    &defaults,
                    &t.settings(),
                    key("").trim_end_matches('.'),
                    &at,
                )?,
            });
        }

        Ok(Config {
            path: path.to_path_buf(),
            identity,
            admin,
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
                    if !(value.starts_with("unix:") || value.starts_with("tcp://")) {
                        return Err(at.error(&s.span(), "identity.socket", format!("{value:?} is not a Workload API address (use unix:///path/api.sock or tcp://IP:port)")));
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
    Ok(s)
}

/// A humantime duration (`"30s"`, `"500ms"`, `"1h"`).
fn duration(value: &Spanned<String>, key: &str, at: &Locator<'_>) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.get_ref()).map_err(|e| {
        at.error(
            &value.span(),
            key,
            format!(
                "{:?} is not a duration ({e}); write it like \"500ms\", \"30s\" or \"1h\"",
                value.get_ref()
            ),
        )
    })
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
        at.error(&value.span(), key, format!("{:?} is not a listen address (expected IP:port, like \"0.0.0.0:8443\" or \"[::1]:8443\")", value.get_ref()))
    })
}

fn parse_host_port(
    value: &Spanned<String>,
    key: &str,
    at: &Locator<'_>,
) -> Result<String, ConfigError> {
    let v = value.get_ref();
    let valid = match v.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    };
    if !valid {
        return Err(at.error(&value.span(), key, format!("{v:?} is not \"host:port\"")));
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

fn parse_svid(
    value: Option<&Spanned<String>>,
    key: &str,
    at: &Locator<'_>,
) -> Result<Option<SpiffeId>, ConfigError> {
    value
        .map(|v| {
            spiffe_id::parse_workload_id(v.get_ref())
                .map_err(|e| at.error(&v.span(), key, e.to_string()))
        })
        .transpose()
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
