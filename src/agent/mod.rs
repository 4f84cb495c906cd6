//! `spiffe-tunnel dev-agent`: an embedded SPIFFE Workload API server with its
//! own CA, for development, demos and tests. Not for production: it
//! attests callers by uid only and keeps its CA key in memory or in a plain
//! file.
//!
//! It behaves like a SPIRE agent as far as a Workload API client can tell:
//! SPIRE-shaped X509-SVIDs, rotation at half life pushed on open streams,
//! SPIRE-style CA rotation with overlap, the security header, SPIRE's error
//! statuses and messages, one SVID per `--id` (as SPIRE sends one per
//! matching entry, two entries with one SPIFFE ID included), and federated
//! bundles only for callers holding an ID that federates with them (as
//! SPIRE's `-federatesWith`). That is what makes it a faithful stand-in for
//! the tests of our own client and for `spiffe-tunnel demo`;
//! `tests/conformance.rs` runs the same checks against it and real SPIRE.
//! Where it still differs from SPIRE (SVID order, renewal time, hints), the
//! `dev-agent --help` text and `docs/dev-agent.md` say how.
//!
//! Files:
//! * `mod.rs` (this file) — configuration, errors, and the [`DevAgent`]
//!   handle used by the CLI command, the demo and tests.
//! * `ca.rs` — the CA and the SVID template.
//! * `ca_dir.rs` — `--ca-dir`: the CA on disk, shared between agents.
//! * `rotation.rs` — the rotation rules and the task that applies them.
//! * `server.rs` — the gRPC service and its Unix socket.
//! * `admin_api.rs` — SPIRE's Delegated Identity API on `--admin-socket`.
//! * `uds_authority.rs` — lets clients that send the socket path as the
//!   HTTP/2 `:authority` (gRPC C-core: Python, C++; Java) be served.

mod admin_api;
pub(crate) mod ca;
mod ca_dir;
mod rotation;
mod server;
mod uds_authority;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::identity::{IdentityError, TrustBundle};
use crate::spiffe_id::{parse_trust_domain, parse_workload_id, IdError, SpiffeId, TrustDomain};
use ca_dir::CaDir;
use rotation::{Authority, Setup, Snapshot};
use server::{Grant, SocketFile, WorkloadApi};

/// SVID lifetime unless `--ttl` says otherwise (SPIRE's default).
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// CA lifetime unless `--ca-ttl` says otherwise (SPIRE's default).
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(24 * 3600);

/// Certificate times have one-second resolution; shorter lifetimes cannot
/// be represented.
const MIN_TTL: Duration = Duration::from_secs(1);
/// With activation at 3/4 of the CA's life, this leaves the old CA at least
/// one second for the SVIDs it signed.
const MIN_CA_TTL: Duration = Duration::from_secs(4);
/// Far enough for any test, near enough that dates never overflow.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How long shutdown waits for open connections to close before it stops
/// waiting (streams are ended first, so this is only for stuck clients).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the dev agent cannot start or run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("bad --id {arg:?}: {source}")]
    BadId {
        arg: String,
        #[source]
        source: IdError,
    },
    #[error("bad --id {arg:?}: {reason}")]
    BadGrant { arg: String, reason: String },
    #[error("--id {id} is not in the agent's trust domain {trust_domain} (an agent issues SVIDs of its own trust domain only)")]
    ForeignId { id: String, trust_domain: String },
    #[error("give at least one --id: the SPIFFE ID to issue")]
    NoIds,
    #[error("bad --socket {arg:?}: {reason}")]
    BadSocketArg { arg: String, reason: String },
    #[error("bad {what}: {reason}")]
    BadTtl { what: &'static str, reason: String },
    #[error("bad --federate {arg:?}: {reason}")]
    BadFederateArg { arg: String, reason: String },
    #[error("--federate {trust_domain}={path}: cannot read the bundle: {source}")]
    FederateRead {
        trust_domain: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--federate {trust_domain}={path}: {source}")]
    FederateBundle {
        trust_domain: String,
        path: PathBuf,
        #[source]
        source: IdentityError,
    },
    #[error("--federate {0}: {1}")]
    FederateConflict(String, &'static str),
    #[error("bad --federates-with {arg:?}: {reason}")]
    BadFederatesWith { arg: String, reason: String },
    #[error("--federate {0}: no --federates-with SPIFFE_ID={0} names it; like SPIRE, the dev agent gives a federated bundle only to callers holding an ID that federates with its trust domain")]
    FederatedToNobody(String),
    #[error("--ca-dir {path}: {reason}")]
    CaDir { path: PathBuf, reason: String },
    #[error("socket {path}: {what}: {source}")]
    Socket {
        path: PathBuf,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot make a certificate: {0}")]
    Certificate(String),
    #[error("the system random number generator failed")]
    Random,
    #[error("a certificate date is out of range")]
    TimeOutOfRange,
    #[error("the Workload API server failed: {0}")]
    Server(#[from] tonic::transport::Error),
    #[error("cannot listen for signals: {0}")]
    Signals(#[source] std::io::Error),
}

impl AgentError {
    /// True for mistakes in the arguments or the files they name, which
    /// the user must fix, as opposed to failures at run time.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::BadId { .. }
                | Self::BadGrant { .. }
                | Self::ForeignId { .. }
                | Self::NoIds
                | Self::BadSocketArg { .. }
                | Self::BadTtl { .. }
                | Self::BadFederateArg { .. }
                | Self::FederateRead { .. }
                | Self::FederateBundle { .. }
                | Self::FederateConflict(..)
                | Self::BadFederatesWith { .. }
                | Self::FederatedToNobody(..)
                | Self::CaDir { .. }
        )
    }

    /// The process exit code for this error: 2 for usage, 1 for runtime.
    pub fn exit_code(&self) -> u8 {
        if self.is_usage() {
            crate::commands::EXIT_USAGE
        } else {
            crate::commands::EXIT_FAILURE
        }
    }
}

/// One `--id`: a SPIFFE ID, for every caller or only for one unix uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdGrant {
    /// `None`: every caller gets it.
    pub uid: Option<u32>,
    pub id: SpiffeId,
}

impl IdGrant {
    /// An identity for every caller.
    pub fn everyone(id: SpiffeId) -> Self {
        Self { uid: None, id }
    }
}

impl FromStr for IdGrant {
    type Err = AgentError;

    /// `spiffe://td/path` or `uid:N=spiffe://td/path`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (uid, id) = match s.strip_prefix("uid:") {
            Some(rest) => {
                let (uid, id) = rest.split_once('=').ok_or_else(|| AgentError::BadGrant {
                    arg: s.to_string(),
                    reason: "expected uid:N=spiffe://trust-domain/path".into(),
                })?;
                let uid = uid.parse::<u32>().map_err(|_| AgentError::BadGrant {
                    arg: s.to_string(),
                    reason: format!("{uid:?} is not a numeric unix uid"),
                })?;
                (Some(uid), id)
            }
            None => (None, s),
        };
        let id = parse_workload_id(id).map_err(|source| AgentError::BadId {
            arg: s.to_string(),
            source,
        })?;
        Ok(Self { uid, id })
    }
}

impl fmt::Display for IdGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.uid {
            Some(uid) => write!(f, "uid:{uid}={}", self.id),
            None => write!(f, "{}", self.id),
        }
    }
}

/// Everything the dev agent needs to run.
#[derive(Debug, Clone)]
pub struct DevAgentConfig {
    /// The Unix socket to serve on.
    pub socket: PathBuf,
    pub trust_domain: TrustDomain,
    /// The identities to issue, one SVID each; the first a caller may have
    /// is its default.
    pub ids: Vec<IdGrant>,
    /// SVID lifetime; each SVID is renewed at half of it.
    pub ttl: Duration,
    /// CA lifetime; the CA rotates with overlap (see `rotation.rs`).
    pub ca_ttl: Duration,
    /// Federated trust domains and PEM files of their CA certificates.
    pub federate: Vec<(TrustDomain, PathBuf)>,
    /// Which IDs federate with which of those trust domains: a caller gets
    /// a federated bundle only when one of its IDs federates with it.
    pub federates_with: Vec<(SpiffeId, TrustDomain)>,
    /// Where to keep the CA across restarts, shared by agents using it.
    pub ca_dir: Option<PathBuf>,
    /// Where to serve SPIRE's Delegated Identity API, if anywhere.
    pub admin_socket: Option<PathBuf>,
    /// The IDs whose holders may use the admin API (SPIRE's
    /// `authorized_delegates`).
    pub authorized_delegates: Vec<SpiffeId>,
}

impl DevAgentConfig {
    /// A configuration with the default lifetimes, no federation and an
    /// in-memory CA.
    pub fn new(socket: PathBuf, trust_domain: TrustDomain, ids: Vec<IdGrant>) -> Self {
        Self {
            socket,
            trust_domain,
            ids,
            ttl: DEFAULT_TTL,
            ca_ttl: DEFAULT_CA_TTL,
            federate: Vec::new(),
            federates_with: Vec::new(),
            ca_dir: None,
            admin_socket: None,
            authorized_delegates: Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), AgentError> {
        if self.ids.is_empty() {
            return Err(AgentError::NoIds);
        }
        for (i, grant) in self.ids.iter().enumerate() {
            if self.ids[..i].contains(grant) {
                return Err(AgentError::BadGrant {
                    arg: grant.to_string(),
                    reason: "given twice (SPIRE refuses a second entry with the same SPIFFE ID \
                             and selectors, too)"
                        .into(),
                });
            }
            if grant.id.trust_domain() != &self.trust_domain {
                return Err(AgentError::ForeignId {
                    id: grant.id.to_string(),
                    trust_domain: self.trust_domain.to_string(),
                });
            }
            if grant.id.path().is_empty() {
                return Err(AgentError::BadId {
                    arg: grant.to_string(),
                    source: IdError::RootId(grant.id.to_string()),
                });
            }
        }
        if !self.authorized_delegates.is_empty() && self.admin_socket.is_none() {
            return Err(AgentError::BadGrant {
                arg: "--authorized-delegate".into(),
                reason: "needs --admin-socket, where delegates call".into(),
            });
        }
        if self.admin_socket.is_some() && self.admin_socket.as_ref() == Some(&self.socket) {
            return Err(AgentError::BadSocketArg {
                arg: self.socket.display().to_string(),
                reason: "--admin-socket must differ from --socket".into(),
            });
        }
        check_ttl("--ttl", self.ttl, MIN_TTL)?;
        check_ttl("--ca-ttl", self.ca_ttl, MIN_CA_TTL)?;
        for (i, (td, _)) in self.federate.iter().enumerate() {
            if td == &self.trust_domain {
                return Err(AgentError::FederateConflict(
                    td.to_string(),
                    "that is the agent's own trust domain",
                ));
            }
            if self.federate[..i].iter().any(|(other, _)| other == td) {
                return Err(AgentError::FederateConflict(
                    td.to_string(),
                    "given more than once",
                ));
            }
            if !self.federates_with.iter().any(|(_, with)| with == td) {
                return Err(AgentError::FederatedToNobody(td.to_string()));
            }
        }
        for (i, (id, td)) in self.federates_with.iter().enumerate() {
            let arg = format!("{id}={td}");
            let bad = |reason: String| AgentError::BadFederatesWith {
                arg: arg.clone(),
                reason,
            };
            if !self.ids.iter().any(|grant| &grant.id == id) {
                return Err(bad(format!("no --id issues {id}")));
            }
            if !self.federate.iter().any(|(known, _)| known == td) {
                return Err(bad(format!(
                    "no --federate {td}=BUNDLE.pem gives the agent that bundle"
                )));
            }
            if self.federates_with[..i].contains(&(id.clone(), td.clone())) {
                return Err(bad("given more than once".into()));
            }
        }
        Ok(())
    }

    /// The SPIFFE ID of each SVID to issue (one per `--id`, in
    /// command-line order, so an ID given for two callers gets two SVIDs,
    /// as SPIRE issues one per entry), and which caller may have which.
    fn ids_and_grants(&self) -> (Vec<SpiffeId>, Vec<Grant>) {
        let ids = self.ids.iter().map(|grant| grant.id.clone()).collect();
        let grants = self
            .ids
            .iter()
            .enumerate()
            .map(|(svid, grant)| Grant {
                uid: grant.uid,
                svid,
                federated: self
                    .federates_with
                    .iter()
                    .filter(|(id, _)| id == &grant.id)
                    .map(|(_, td)| format!("spiffe://{td}"))
                    .collect(),
            })
            .collect();
        (ids, grants)
    }
}

impl From<crate::cli::DevAgentArgs> for DevAgentConfig {
    fn from(args: crate::cli::DevAgentArgs) -> Self {
        Self {
            socket: args.socket,
            trust_domain: args.trust_domain,
            ids: args.ids,
            ttl: args.ttl,
            ca_ttl: args.ca_ttl,
            federate: args.federate,
            federates_with: args.federates_with,
            ca_dir: args.ca_dir,
            admin_socket: args.admin_socket,
            authorized_delegates: args.authorized_delegates,
        }
    }
}

fn check_ttl(what: &'static str, ttl: Duration, min: Duration) -> Result<(), AgentError> {
    if ttl < min {
        return Err(AgentError::BadTtl {
            what,
            reason: format!(
                "{} is too short; the minimum is {}",
                humantime::format_duration(ttl),
                humantime::format_duration(min)
            ),
        });
    }
    if ttl > MAX_TTL {
        return Err(AgentError::BadTtl {
            what,
            reason: format!(
                "{} is too long; the maximum is {}",
                humantime::format_duration(ttl),
                humantime::format_duration(MAX_TTL)
            ),
        });
    }
    Ok(())
}

/// Parses `--socket`: a path, `unix:///abs/path` or `unix:/abs/path`.
pub fn parse_socket_path(s: &str) -> Result<PathBuf, AgentError> {
    let bad = |reason: &str| AgentError::BadSocketArg {
        arg: s.to_string(),
        reason: reason.to_string(),
    };
    let path = if let Some(rest) = s.strip_prefix("unix://") {
        if !rest.starts_with('/') {
            return Err(bad(
                "a unix:// address needs an absolute path (unix:///path/to/api.sock)",
            ));
        }
        rest
    } else if let Some(rest) = s.strip_prefix("unix:") {
        if !rest.starts_with('/') {
            return Err(bad(
                "a unix: address needs an absolute path (unix:/path/to/api.sock)",
            ));
        }
        rest
    } else if s.contains("://") {
        return Err(bad("the dev agent serves on a Unix socket only"));
    } else {
        s
    };
    if path.is_empty() {
        return Err(bad("the path is empty"));
    }
    Ok(PathBuf::from(path))
}

/// Parses `--federate TD=BUNDLE.pem`.
pub fn parse_federate(s: &str) -> Result<(TrustDomain, PathBuf), AgentError> {
    let (td, path) = s
        .split_once('=')
        .ok_or_else(|| AgentError::BadFederateArg {
            arg: s.to_string(),
            reason: "expected TRUST_DOMAIN=BUNDLE.pem".into(),
        })?;
    let td = parse_trust_domain(td).map_err(|e| AgentError::BadFederateArg {
        arg: s.to_string(),
        reason: e.to_string(),
    })?;
    if path.is_empty() {
        return Err(AgentError::BadFederateArg {
            arg: s.to_string(),
            reason: "the bundle file is missing after '='".into(),
        });
    }
    Ok((td, PathBuf::from(path)))
}

/// Parses `--federates-with SPIFFE_ID=TD`.
pub fn parse_federates_with(s: &str) -> Result<(SpiffeId, TrustDomain), AgentError> {
    let bad = |reason: String| AgentError::BadFederatesWith {
        arg: s.to_string(),
        reason,
    };
    let (id, td) = s
        .split_once('=')
        .ok_or_else(|| bad("expected SPIFFE_ID=TRUST_DOMAIN".into()))?;
    let id = parse_workload_id(id).map_err(|e| bad(e.to_string()))?;
    let td = parse_trust_domain(td).map_err(|e| bad(e.to_string()))?;
    Ok((id, td))
}

/// Reads each federated bundle once, validating it as a set of trust
/// anchors so a bad file fails at start rather than in some client.
fn load_federated(config: &DevAgentConfig) -> Result<Vec<(String, Vec<u8>)>, AgentError> {
    config
        .federate
        .iter()
        .map(|(td, path)| {
            let pem = std::fs::read(path).map_err(|source| AgentError::FederateRead {
                trust_domain: td.to_string(),
                path: path.clone(),
                source,
            })?;
            let bundle = TrustBundle::from_pem(td.clone(), &pem).map_err(|source| {
                AgentError::FederateBundle {
                    trust_domain: td.to_string(),
                    path: path.clone(),
                    source,
                }
            })?;
            let der = bundle
                .certs
                .iter()
                .flat_map(|c| c.iter().copied())
                .collect();
            Ok((format!("spiffe://{td}"), der))
        })
        .collect()
}

/// The admin socket's path, file and server task.
type AdminSocket = (
    PathBuf,
    SocketFile,
    JoinHandle<Result<(), tonic::transport::Error>>,
);

/// A running dev agent. Dropping it stops it too, without waiting.
pub struct DevAgent {
    socket: PathBuf,
    socket_file: SocketFile,
    state: watch::Receiver<Arc<Snapshot>>,
    shutdown: CancellationToken,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    rotation: Option<JoinHandle<()>>,
    streams: TaskTracker,
    open_streams: Arc<AtomicUsize>,
    /// The admin socket and its server, with `--admin-socket`.
    admin: Option<AdminSocket>,
    /// Set once the socket file is gone, so `Drop` leaves it alone.
    stopped: bool,
}

impl fmt::Debug for DevAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevAgent")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl DevAgent {
    /// Validates the configuration, sets up the CA, issues the SVIDs and
    /// binds the socket. The agent is serving when this returns.
    pub async fn start(config: DevAgentConfig) -> Result<DevAgent, AgentError> {
        config.validate()?;
        if config.ca_ttl < config.ttl * 4 {
            tracing::warn!(
                "--ca-ttl {} is under 4 x --ttl {}: SVIDs issued shortly before a CA \
                 rotation will be shorter than --ttl",
                humantime::format_duration(config.ca_ttl),
                humantime::format_duration(config.ttl)
            );
        }
        let federated = load_federated(&config)?;
        let now = SystemTime::now();
        let ca_dir = config
            .ca_dir
            .clone()
            .map(|dir| CaDir::new(dir, config.trust_domain.clone()));
        let (active, next) = match &ca_dir {
            Some(dir) => dir.initial(now, config.ca_ttl).await?,
            None => (
                ca::Ca::generate(&config.trust_domain, now, config.ca_ttl)?,
                None,
            ),
        };
        tracing::info!(
            serial = %active.serial,
            expires = %crate::timefmt::rfc3339(active.not_after),
            "CA of {} is active",
            config.trust_domain
        );
        let (ids, grants) = config.ids_and_grants();
        let authority = Authority::new(
            Setup {
                trust_domain: config.trust_domain.clone(),
                ids,
                ttl: config.ttl,
                ca_ttl: config.ca_ttl,
                ca_dir,
                active,
                next,
                federated,
            },
            now,
        )?;
        let (publish, state) = watch::channel(Arc::new(authority.snapshot()));
        let (listener, socket_file) = server::bind(&config.socket)?;

        let shutdown = CancellationToken::new();
        let rotation = tokio::spawn(rotation::run(authority, publish, shutdown.clone()));
        let streams = TaskTracker::new();
        let open_streams = Arc::new(AtomicUsize::new(0));
        let api = WorkloadApi {
            state: state.clone(),
            grants: grants.into(),
            shutdown: shutdown.clone(),
            streams: streams.clone(),
            open_streams: Arc::clone(&open_streams),
        };
        let admin = match &config.admin_socket {
            Some(path) => {
                let (listener, file) = server::bind(path)?;
                let admin = admin_api::AdminApi {
                    workload: api.clone(),
                    delegates: config.authorized_delegates.clone().into(),
                };
                let task = tokio::spawn(server::serve_admin(listener, admin, shutdown.clone()));
                Some((path.clone(), file, task))
            }
            None => None,
        };
        let server = tokio::spawn(server::serve(listener, api, shutdown.clone()));
        Ok(DevAgent {
            admin,
            socket: config.socket,
            socket_file,
            state,
            shutdown,
            server: Some(server),
            rotation: Some(rotation),
            streams,
            open_streams,
            stopped: false,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The current CA certificates of our trust domain, PEM, oldest first.
    pub fn bundle_pem(&self) -> String {
        self.state.borrow().bundle_pem.clone()
    }

    /// The SPIFFE ID of each SVID the agent issues (one per `--id`, in
    /// command-line order) with the serial of the current one: lower-case
    /// hex, no leading zeros.
    pub fn current_serials(&self) -> Vec<(SpiffeId, String)> {
        self.state
            .borrow()
            .svids
            .iter()
            .map(|svid| (svid.id.clone(), svid.serial.clone()))
            .collect()
    }

    /// How many client streams are open right now (for tests and logs).
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Relaxed)
    }

    /// Stops serving: ends every stream (clients see `Unavailable`), waits
    /// for connections to close (up to a few seconds), removes the socket.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(rotation) = self.rotation.take() {
            let _ = rotation.await;
        }
        self.streams.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.streams.wait())
            .await
            .is_err()
        {
            tracing::warn!("some Workload API streams did not end in time");
        }
        if let Some(mut server) = self.server.take() {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!("the Workload API server failed: {e}"),
                Ok(Err(e)) => tracing::warn!("the Workload API server task failed: {e}"),
                Err(_) => {
                    tracing::warn!("clients kept connections open; closing the server anyway");
                    server.abort();
                }
            }
        }
        server::remove_socket(&self.socket, self.socket_file);
        if let Some((path, file, task)) = self.admin.take() {
            task.abort();
            server::remove_socket(&path, file);
        }
        self.stopped = true;
        tracing::info!(socket = %self.socket.display(), "dev agent stopped");
    }

    /// Resolves if the server stops on its own, which only a failure does.
    async fn server_failed(&mut self) -> AgentError {
        let Some(server) = self.server.as_mut() else {
            return std::future::pending().await;
        };
        let result = server.await;
        self.server = None;
        match result {
            Ok(Err(e)) => AgentError::Server(e),
            // Stopping without being asked, or a panic: both are failures.
            _ => AgentError::Socket {
                path: self.socket.clone(),
                what: "serving".into(),
                source: std::io::Error::other("the Workload API server stopped unexpectedly"),
            },
        }
    }
}

impl Drop for DevAgent {
    fn drop(&mut self) {
        if !self.stopped {
            self.shutdown.cancel();
            if let Some(server) = &self.server {
                server.abort();
            }
            server::remove_socket(&self.socket, self.socket_file);
            if let Some((path, file, task)) = &self.admin {
                task.abort();
                server::remove_socket(path, *file);
            }
        }
    }
}

/// The `dev-agent` command: start, say what is served, run until SIGINT or
/// SIGTERM, then shut down cleanly.
pub async fn run(config: DevAgentConfig) -> Result<(), AgentError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;

    let ids: Vec<String> = config.ids.iter().map(ToString::to_string).collect();
    let trust_domain = config.trust_domain.to_string();
    let (ttl, ca_ttl) = (config.ttl, config.ca_ttl);
    let ca_dir = config.ca_dir.clone();
    let mut agent = DevAgent::start(config).await?;
    tracing::info!(
        socket = %format!("unix://{}", agent.socket_path().display()),
        trust_domain = %trust_domain,
        ids = %ids.join(", "),
        ttl = %humantime::format_duration(ttl),
        ca_ttl = %humantime::format_duration(ca_ttl),
        ca_dir = %ca_dir.as_deref().map_or_else(|| "(in memory)".into(), |d| d.display().to_string()),
        "dev agent serving the Workload API (for development and tests, not production)"
    );
    let failure = tokio::select! {
        _ = sigint.recv() => None,
        _ = sigterm.recv() => None,
        e = agent.server_failed() => Some(e),
    };
    if failure.is_none() {
        tracing::info!("signal received, shutting down");
    }
    agent.shutdown().await;
    failure.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        parse_trust_domain("example.org").unwrap()
    }

    #[test]
    fn id_grants_parse() {
        let g: IdGrant = "spiffe://example.org/web".parse().unwrap();
        assert_eq!(g.uid, None);
        assert_eq!(g.id.to_string(), "spiffe://example.org/web");
        let g: IdGrant = "uid:1000=spiffe://example.org/api".parse().unwrap();
        assert_eq!(g.uid, Some(1000));
        assert_eq!(g.to_string(), "uid:1000=spiffe://example.org/api");
        for bad in [
            "uid:abc=spiffe://example.org/a",
            "uid:-1=spiffe://example.org/a",
            "uid:1000",
            "uid:1000=",
            "spiffe://example.org",
            "spiffe://Example.org/a",
            "example.org/a",
            "",
        ] {
            let err = bad.parse::<IdGrant>().unwrap_err();
            assert!(err.is_usage(), "{bad}: {err}");
        }
    }

    #[test]
    fn socket_paths_parse() {
        assert_eq!(
            parse_socket_path("/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            parse_socket_path("rel/a.sock").unwrap(),
            PathBuf::from("rel/a.sock")
        );
        assert_eq!(
            parse_socket_path("unix:///tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        assert_eq!(
            parse_socket_path("unix:/tmp/a.sock").unwrap(),
            PathBuf::from("/tmp/a.sock")
        );
        for bad in ["unix://tmp/a.sock", "unix:a.sock", "tcp://127.0.0.1:1", ""] {
            assert!(parse_socket_path(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn federate_args_parse() {
        let (td, path) = parse_federate("partner.org=/b.pem").unwrap();
        assert_eq!(td.to_string(), "partner.org");
        assert_eq!(path, PathBuf::from("/b.pem"));
        for bad in ["partner.org", "=x.pem", "partner.org=", "Partner.org=x"] {
            assert!(parse_federate(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn config_validation() {
        let id = |s: &str| s.parse::<IdGrant>().unwrap();
        let base = DevAgentConfig::new(
            "/tmp/x.sock".into(),
            td(),
            vec![id("spiffe://example.org/a")],
        );
        assert!(base.validate().is_ok());

        let mut c = base.clone();
        c.ids.clear();
        assert!(matches!(c.validate(), Err(AgentError::NoIds)));

        let mut c = base.clone();
        c.ids.push(id("spiffe://other.org/a"));
        assert!(matches!(c.validate(), Err(AgentError::ForeignId { .. })));

        let mut c = base.clone();
        c.ttl = Duration::from_millis(500);
        assert!(matches!(c.validate(), Err(AgentError::BadTtl { .. })));

        let mut c = base.clone();
        c.ca_ttl = Duration::from_secs(2);
        assert!(matches!(c.validate(), Err(AgentError::BadTtl { .. })));

        let mut c = base.clone();
        c.ttl = Duration::from_secs(u64::MAX / 4);
        assert!(c.validate().is_err());

        let mut c = base.clone();
        c.federate.push((td(), "/b.pem".into()));
        assert!(matches!(
            c.validate(),
            Err(AgentError::FederateConflict(..))
        ));

        let mut c = base.clone();
        let partner = parse_trust_domain("partner.org").unwrap();
        c.federate.push((partner.clone(), "/a.pem".into()));
        c.federate.push((partner.clone(), "/b.pem".into()));
        c.federates_with
            .push(("spiffe://example.org/a".parse().unwrap(), partner));
        assert!(matches!(
            c.validate(),
            Err(AgentError::FederateConflict(..))
        ));
    }

    #[test]
    fn each_id_gets_its_own_svid_and_its_federations() {
        let id = |s: &str| s.parse::<IdGrant>().unwrap();
        let mut c = DevAgentConfig::new(
            "/tmp/x.sock".into(),
            td(),
            vec![
                id("uid:1000=spiffe://example.org/a"),
                id("spiffe://example.org/b"),
                id("uid:1001=spiffe://example.org/a"),
            ],
        );
        let partner = parse_trust_domain("partner.org").unwrap();
        c.federate.push((partner.clone(), "/p.pem".into()));
        c.federates_with
            .push(("spiffe://example.org/a".parse().unwrap(), partner));
        assert!(c.validate().is_ok());
        let (ids, grants) = c.ids_and_grants();
        let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
        assert_eq!(
            ids,
            [
                "spiffe://example.org/a",
                "spiffe://example.org/b",
                "spiffe://example.org/a"
            ]
        );
        let pairs: Vec<_> = grants
            .iter()
            .map(|g| (g.uid, g.svid, g.federated.clone()))
            .collect();
        let fed = vec!["spiffe://partner.org".to_string()];
        assert_eq!(
            pairs,
            vec![
                (Some(1000), 0, fed.clone()),
                (None, 1, vec![]),
                (Some(1001), 2, fed)
            ]
        );
    }

    #[test]
    fn federation_and_duplicate_grants_are_validated() {
        let id = |s: &str| s.parse::<IdGrant>().unwrap();
        let base = DevAgentConfig::new(
            "/tmp/x.sock".into(),
            td(),
            vec![id("spiffe://example.org/a")],
        );
        let partner = parse_trust_domain("partner.org").unwrap();
        let a: SpiffeId = "spiffe://example.org/a".parse().unwrap();

        let mut c = base.clone();
        c.ids.push(id("spiffe://example.org/a"));
        assert!(matches!(c.validate(), Err(AgentError::BadGrant { .. })));
        // The same ID for two callers is two entries, not a duplicate.
        let mut c = base.clone();
        c.ids.push(id("uid:7=spiffe://example.org/a"));
        assert!(c.validate().is_ok());

        let mut c = base.clone();
        c.federate.push((partner.clone(), "/p.pem".into()));
        let err = c.validate().unwrap_err();
        assert!(matches!(err, AgentError::FederatedToNobody(_)), "{err}");
        assert!(err.is_usage());

        let mut c = base.clone();
        c.federates_with.push((a.clone(), partner.clone()));
        assert!(matches!(
            c.validate(),
            Err(AgentError::BadFederatesWith { .. })
        ));

        let mut c = base.clone();
        c.federate.push((partner.clone(), "/p.pem".into()));
        c.federates_with.push((
            "spiffe://example.org/nobody".parse().unwrap(),
            partner.clone(),
        ));
        assert!(matches!(
            c.validate(),
            Err(AgentError::FederatedToNobody(_) | AgentError::BadFederatesWith { .. })
        ));

        let mut c = base.clone();
        c.federate.push((partner.clone(), "/p.pem".into()));
        c.federates_with.push((a.clone(), partner.clone()));
        assert!(c.validate().is_ok());
        c.federates_with.push((a, partner));
        assert!(matches!(
            c.validate(),
            Err(AgentError::BadFederatesWith { .. })
        ));

        assert!(parse_federates_with("spiffe://example.org/a=partner.org").is_ok());
        for bad in [
            "spiffe://example.org/a",
            "spiffe://example.org=partner.org",
            "spiffe://example.org/a=Partner.org",
            "=partner.org",
        ] {
            assert!(parse_federates_with(bad).is_err(), "{bad} accepted");
        }
    }
}
