//! The `run` command: the daemon that serves every tunnel in a config file.
//!
//! Start-up wires the one-way flow: the identity source publishes into the
//! store, each tunnel gets TLS configs that read from the store and its own
//! policy, and listeners are bound ([`launch`]). Then it waits for signals.
//! SIGHUP re-reads the whole config ([`reload`]): tunnels are added,
//! removed or changed, every policy is reloaded, and live connections whose
//! peer is no longer allowed are closed; a bad config is refused and the
//! running one stays. SIGTERM/SIGINT drain and exit.
//!
//! What the admin endpoint shows lives in [`Shared`], which the daemon
//! updates and the endpoint only reads.

use std::os::fd::AsFd;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{
    Config, ConfigError, IdentityConfig, InboundConfig, ListenAddress, OutboundConfig,
};
use crate::identity::delegated::DelegatedIdentities;
use crate::identity::workload_api::{
    wait_for_first_identity, ApiAddress, ApiHealth, WorkloadApiSource,
};
use crate::identity::{BundleSet, Identity, IdentityError, IdentityStore, SvidSelector};
use crate::listen::{Inherited, ListenError, Owner};
use crate::metrics::{Metrics, TunnelKind};
use crate::notify::Notifier;
use crate::policy::{Policy, PolicyError};
use crate::proxy::balance::Balancer;
use crate::proxy::registry::ConnectionRegistry;
use crate::proxy::{Tunnel, TunnelContext};
use crate::tls::config::TlsConfigError;
use crate::tls::verify::{verify_svid_chain, PeerRole};
use crate::upgrade::{PidFile, Readiness, Upgrader};
use launch::Running;
use signals::Signals;

mod launch;
mod reload;
mod signals;

/// How often the file identity source looks at its files.
const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("--pid-file {}: {source}", .path.display())]
    PidFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("{0}")]
    Startup(String),
}

impl RunError {
    /// Exit code per the contract: 2 for configuration, 1 for runtime.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Config(_) | RunError::Policy(_) => 2,
            RunError::Listen(e) if e.is_config() => 2,
            _ => 1,
        }
    }
}

/// Options of `spiffe-tunnel run`.
#[derive(Debug)]
pub struct RunOptions {
    pub config: PathBuf,
    /// `--socket`: overrides the Workload API address of the config.
    pub socket: Option<String>,
    /// `--pid-file`: written when ready, by each process after an upgrade.
    pub pid_file: Option<PidFile>,
    /// The sockets passed to us (systemd, or the process we upgrade).
    pub inherited: Inherited,
    /// Tells the process we upgrade that we are ready.
    pub readiness: Readiness,
}

/// One tunnel's config, whichever its direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelConfig {
    Inbound(InboundConfig),
    Outbound(OutboundConfig),
}

impl TunnelConfig {
    pub fn kind(&self) -> TunnelKind {
        match self {
            TunnelConfig::Inbound(_) => TunnelKind::inbound,
            TunnelConfig::Outbound(_) => TunnelKind::outbound,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            TunnelConfig::Inbound(c) => &c.name,
            TunnelConfig::Outbound(c) => &c.name,
        }
    }

    pub fn listen(&self) -> &ListenAddress {
        match self {
            TunnelConfig::Inbound(c) => &c.listen,
            TunnelConfig::Outbound(c) => &c.listen,
        }
    }

    /// Who its listener is for, in messages and upgrade hand-over names.
    pub fn owner(&self) -> Owner<'_> {
        Owner::Tunnel {
            kind: self.kind().as_str(),
            name: self.name(),
        }
    }

    /// The name its socket is passed under in an upgrade: the systemd
    /// name it came with, or `KIND/NAME`.
    pub fn handover_name(&self) -> String {
        match self.listen() {
            ListenAddress::Systemd(name) => name.clone(),
            ListenAddress::Tcp(_) => self.owner().upgrade_name(),
        }
    }

    /// Which of our SVIDs it presents.
    pub fn svid(&self) -> &SvidSelector {
        match self {
            TunnelConfig::Inbound(c) => &c.svid,
            TunnelConfig::Outbound(c) => &c.svid,
        }
    }

    fn load_policy(&self) -> Result<Policy, PolicyError> {
        match self {
            TunnelConfig::Inbound(c) => c.policy.load(),
            TunnelConfig::Outbound(c) => c.policy.load(),
        }
    }

    fn all(config: &Config) -> Vec<TunnelConfig> {
        config
            .inbound
            .iter()
            .cloned()
            .map(TunnelConfig::Inbound)
            .chain(config.outbound.iter().cloned().map(TunnelConfig::Outbound))
            .collect()
    }
}

/// A serving tunnel as the admin endpoint sees it.
#[derive(Debug)]
pub struct TunnelEntry {
    pub config: TunnelConfig,
    pub tunnel: Arc<Tunnel>,
    /// An outbound's upstream balancer, for `/status`.
    pub balancer: Option<Arc<Balancer>>,
    /// True from the bind until the accept loop ends.
    pub listening: Arc<AtomicBool>,
}

/// The outcome of the last SIGHUP.
#[derive(Debug, Clone)]
pub struct ReloadRecord {
    pub at: SystemTime,
    pub ok: bool,
    pub message: String,
}

/// What the daemon shares with the admin endpoint: read-only there.
#[derive(Debug)]
pub struct Shared {
    pub config_path: PathBuf,
    pub store: Arc<IdentityStore>,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<ConnectionRegistry>,
    pub tunnels: ArcSwap<Vec<Arc<TunnelEntry>>>,
    pub draining: AtomicBool,
    pub last_reload: ArcSwapOption<ReloadRecord>,
    /// Where identities come from, for `/status`.
    pub identity_source: String,
    /// The Workload API connection state, when that is the source.
    pub api_health: Option<watch::Receiver<ApiHealth>>,
    /// The callers' subscriptions (`present = "caller"`), for `/status`.
    pub delegated: Option<Arc<DelegatedIdentities>>,
    pub started: SystemTime,
}

impl Shared {
    /// `Ok` when every listener is bound, each tunnel holds a valid SVID
    /// to present and we are not draining; otherwise the reasons.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if self.draining.load(Ordering::Relaxed) {
            reasons.push("draining: not accepting new connections".to_string());
        }
        if self.store.load().is_none() {
            reasons.push("no identity: no SVID has been received, or it was withdrawn".to_string());
        }
        for entry in self.tunnels.load().iter() {
            let t = &entry.tunnel;
            if !entry.listening.load(Ordering::Relaxed) {
                reasons.push(format!(
                    "{} tunnel {:?} is not listening on {}",
                    t.kind_name(),
                    t.name,
                    entry.config.listen()
                ));
            }
            if t.resolver.current().is_none() {
                reasons.push(format!(
                    "{} tunnel {:?} holds no valid SVID to present (expired or not issued)",
                    t.kind_name(),
                    t.name
                ));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT (or a finished upgrade) and a
/// finished drain.
pub async fn run(mut options: RunOptions) -> Result<(), RunError> {
    // First of all, so a SIGTERM during start-up stops it cleanly.
    let mut signals = Signals::install()?;
    for note in options.inherited.notes.drain(..) {
        warn!("{note}");
    }
    let upgrader = Upgrader::from_current_process();
    let config = Config::load(&options.config)?;
    raise_open_files_limit();
    let notifier = Notifier::from_env();
    let from_upgrade = options.inherited.from_upgrade();
    let start = Daemon::start_with(config, options.socket.as_deref(), options.inherited);
    let daemon = tokio::select! {
        started = start => started?,
        () = signals.stop() => {
            info!("stopped during start-up");
            return Ok(());
        }
    };
    if let Some(pid_file) = &options.pid_file {
        pid_file.write().map_err(|source| RunError::PidFile {
            path: pid_file.0.clone(),
            source,
        })?;
    }
    if let Some(n) = &notifier {
        // MAINPID= in it makes systemd follow us after an upgrade.
        n.ready(&daemon.status_line());
    }
    if from_upgrade {
        info!(
            previous = std::os::unix::process::parent_id(),
            "upgrade: ready; the previous process stops accepting"
        );
    }
    options.readiness.ready();
    let result = daemon.wait_for_signals(signals, notifier, upgrader).await;
    if let Some(pid_file) = &options.pid_file {
        pid_file.remove_if_ours();
    }
    result
}

/// Every tunnel of one config, serving, with the identity source that feeds
/// them and the admin endpoint. `run` drives one from signals; `demo` and
/// tests embed several.
pub struct Daemon {
    pub config: Config,
    pub shared: Arc<Shared>,
    pub store: Arc<IdentityStore>,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<ConnectionRegistry>,
    running: Vec<Running>,
    /// Identity source and identity watcher; ended on drop.
    tasks: Vec<JoinHandle<()>>,
    /// The admin endpoint, and its socket for an upgrade to pass on.
    admin: Option<(JoinHandle<()>, OwnedFd)>,
    /// What was passed at start-up, all claimed or closed by now: a
    /// reload can only name what is gone.
    inherited: Inherited,
    ctx: TunnelContext,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for r in &self.running {
            r.abort();
        }
        for task in &self.tasks {
            task.abort();
        }
        if let Some((task, _)) = &self.admin {
            task.abort();
        }
    }
}

impl Daemon {
    /// The running tunnels, in config order (inbound first).
    pub fn tunnels(&self) -> impl Iterator<Item = &Arc<Tunnel>> {
        self.running.iter().map(|r| &r.entry.tunnel)
    }

    /// [`Daemon::start_with`] with nothing passed: every listener bound.
    pub async fn start(config: Config, socket_override: Option<&str>) -> Result<Self, RunError> {
        Self::start_with(config, socket_override, Inherited::none()).await
    }

    /// Takes the passed sockets and binds the rest, closes the passed ones
    /// no tunnel claims, starts the identity source and waits for the first
    /// identity, and only then starts accepting: the listeners fail fast
    /// (a port in use, a socket systemd did not pass), and no connection is
    /// accepted before we can serve it.
    pub async fn start_with(
        config: Config,
        socket_override: Option<&str>,
        mut inherited: Inherited,
    ) -> Result<Self, RunError> {
        let metrics = Arc::new(Metrics::new());
        let store = IdentityStore::new();
        let registry = ConnectionRegistry::new();
        let tunnels = TunnelConfig::all(&config);
        let (listeners, admin_listener) =
            launch::acquire_listeners(&tunnels, config.admin.listen, &mut inherited).await?;
        let (mut tasks, identity_source, api_health) =
            start_identity_source(&config, socket_override, &store, &metrics).await?;
        let delegated = start_delegated(&config, &store, &metrics)?;
        if let Some(delegated) = &delegated {
            tasks.push(tokio::spawn(Arc::clone(delegated).run_sweeper()));
        }
        let ctx = TunnelContext {
            store: Arc::clone(&store),
            metrics: Arc::clone(&metrics),
            registry: Arc::clone(&registry),
            delegated: delegated.clone(),
        };
        // Every tunnel built before any starts.
        let mut prepared = Vec::new();
        for (tunnel, listener) in tunnels.into_iter().zip(listeners) {
            let policy = Arc::new(ArcSwap::from_pointee(tunnel.load_policy()?));
            prepared.push(launch::prepare(tunnel, policy, listener, &ctx)?);
        }
        let running: Vec<Running> = prepared.into_iter().map(launch::Prepared::launch).collect();
        let shared = Arc::new(Shared {
            config_path: config.path.clone(),
            store: Arc::clone(&store),
            metrics: Arc::clone(&metrics),
            registry: Arc::clone(&registry),
            tunnels: ArcSwap::from_pointee(running.iter().map(|r| Arc::clone(&r.entry)).collect()),
            draining: AtomicBool::new(false),
            last_reload: ArcSwapOption::empty(),
            identity_source,
            api_health,
            delegated,
            started: SystemTime::now(),
        });
        tasks.push(tokio::spawn(watch_identity(Arc::clone(&shared))));
        let mut admin = None;
        if let Some(listener) = admin_listener {
            let socket = listener
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| RunError::Startup(format!("admin endpoint: {e}")))?;
            if let Ok(addr) = listener.local_addr() {
                info!(listen = %addr, "admin endpoint listening (/healthz /readyz /metrics /status)");
            }
            let task = tokio::spawn(crate::admin::serve(listener, Arc::clone(&shared)));
            admin = Some((task, socket));
        }
        info!(
            config = %config.path.display(),
            inbound = config.inbound.len(),
            outbound = config.outbound.len(),
            "spiffe-tunnel is running"
        );
        Ok(Self {
            config,
            shared,
            store,
            metrics,
            registry,
            running,
            tasks,
            admin,
            inherited,
            ctx,
        })
    }

    /// One line for systemd's STATUS=.
    fn status_line(&self) -> String {
        format!(
            "serving {} inbound and {} outbound tunnel(s)",
            self.config.inbound.len(),
            self.config.outbound.len()
        )
    }

    /// SIGHUP: re-reads the config file and applies it, all or nothing
    /// (see [`reload`]). Tunnels are matched by kind and name: one whose
    /// config is unchanged but for its policy keeps its listener and live
    /// connections and gets the new policy; a changed one is replaced (its
    /// socket handed over when the address stays; its live connections
    /// that the new policy allows finish within its drain_timeout); a
    /// removed one stops and its connections are closed; a new one starts.
    /// Live connections whose peer the new policy no longer allows are
    /// closed, whichever generation of the tunnel they belong to.
    pub async fn reload(&mut self) {
        match self.try_reload().await {
            Ok(summary) => {
                info!(config = %self.config.path.display(), "reloaded: {summary}");
                self.record_reload(true, summary);
            }
            Err(message) => {
                error!(config = %self.config.path.display(), error = %message, "reload refused; the running configuration stays in force");
                self.record_reload(false, message);
            }
        }
    }

    fn record_reload(&self, ok: bool, message: String) {
        self.metrics.policy_reload(ok);
        self.shared.last_reload.store(Some(Arc::new(ReloadRecord {
            at: SystemTime::now(),
            ok,
            message,
        })));
    }
}

fn log_revocations(
    closed: &[(crate::proxy::registry::ConnectionInfo, String)],
    tunnel: &Tunnel,
    cause: &str,
) {
    for (conn, reason) in closed {
        tunnel.metrics.revoked.inc();
        info!(
            tunnel = %conn.tunnel,
            kind = %tunnel.kind_name(),
            client = %conn.client,
            peer_id = %conn.peer.as_ref().map(|p| p.id.to_string()).unwrap_or_default(),
            cause,
            reason = %reason,
            "live connection revoked"
        );
    }
}

type SourceStart = (
    Vec<JoinHandle<()>>,
    String,
    Option<watch::Receiver<ApiHealth>>,
);

/// The Delegated Identity API client, when an admin socket is configured
/// (or named by `SPIRE_ADMIN_ENDPOINT_SOCKET`). It connects only when a
/// caller first needs it.
fn start_delegated(
    config: &Config,
    store: &Arc<IdentityStore>,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<DelegatedIdentities>>, RunError> {
    let wanted = config
        .outbound
        .iter()
        .any(|o| o.present == crate::config::Present::Caller);
    match DelegatedIdentities::choose_address(config.delegated.admin_socket.as_deref()) {
        Some(Ok(path)) => {
            if wanted {
                info!(admin_socket = %path.display(), max_callers = config.delegated.max_callers, "presenting callers' SVIDs from SPIRE's Delegated Identity API");
            }
            Ok(Some(DelegatedIdentities::new(
                path,
                Arc::clone(store),
                Arc::clone(metrics),
                config.delegated.max_callers,
                config.delegated.caller_idle_timeout,
            )))
        }
        Some(Err(e)) => Err(RunError::Startup(e)),
        None => Ok(None),
    }
}

/// Starts the configured identity source and waits for the first identity.
async fn start_identity_source(
    config: &Config,
    socket_override: Option<&str>,
    store: &Arc<IdentityStore>,
    metrics: &Arc<Metrics>,
) -> Result<SourceStart, RunError> {
    match &config.identity {
        IdentityConfig::Files(files) => {
            let provider = crate::tls::config::provider();
            let identity = files.load(&provider)?;
            store.publish(identity);
            let task = tokio::spawn(files.clone().watch(
                Arc::clone(store),
                provider,
                Arc::clone(metrics),
                FILE_POLL_INTERVAL,
            ));
            Ok((
                vec![task],
                format!("files ({})", files.cert.display()),
                None,
            ))
        }
        IdentityConfig::WorkloadApi {
            socket,
            startup_timeout,
        } => {
            let address = ApiAddress::choose(socket_override, socket.as_deref())
                .map_err(|e| RunError::Startup(e.to_string()))?;
            info!(address = %address, "waiting for SVIDs from the Workload API");
            let source =
                WorkloadApiSource::new(address.clone(), Arc::clone(store), Arc::clone(metrics));
            let mut health = source.health();
            let task = tokio::spawn(source.run());
            if let Err(e) =
                wait_for_first_identity(store, &mut health, &address, *startup_timeout).await
            {
                task.abort();
                return Err(RunError::Startup(e));
            }
            Ok((
                vec![task],
                format!("workload_api ({address})"),
                Some(health),
            ))
        }
    }
}

/// Follows the identity store: logs every change, keeps the identity
/// metrics current, closes live connections whose peer no longer chains to
/// the new bundles, and says so when our SVID expires with no replacement
/// (from then on new connections are refused until one arrives).
async fn watch_identity(shared: Arc<Shared>) {
    let store = &shared.store;
    let metrics = &shared.metrics;
    let mut changes = store.subscribe();
    let mut first = true;
    let mut trusted: Option<BundleSet> = None;
    let mut warned_choice: Option<Vec<String>> = None;
    loop {
        let identity = store.load();
        match &identity {
            Some(identity) => {
                // Several SVIDs may share an ID (one per SPIRE entry): the
                // gauge shows the one that expires first.
                let mut expiries: std::collections::BTreeMap<String, i64> = Default::default();
                for s in &identity.svids {
                    let expiry = unix_seconds(s.not_after);
                    expiries
                        .entry(s.id.to_string())
                        .and_modify(|e| *e = (*e).min(expiry))
                        .or_insert(expiry);
                }
                metrics.set_svid_expiries(expiries);
                if !first {
                    metrics.svid_rotations.inc();
                }
                for svid in &identity.svids {
                    info!(
                        spiffe_id = %svid.id,
                        serial = %svid.serial,
                        expires = %crate::timefmt::rfc3339(svid.not_after),
                        "SVID in use"
                    );
                }
                first = false;
                warn_unchosen_svid(&shared, identity, &mut warned_choice);
                let bundles_changed = trusted
                    .as_ref()
                    .is_some_and(|previous| !previous.same_trust(&identity.bundles));
                if let (true, Some(previous)) = (bundles_changed, &trusted) {
                    // A CA that left because it expired closes nothing.
                    let judged = identity
                        .bundles
                        .with_expired_from(previous, SystemTime::now());
                    revoke_untrusted(&shared, &judged);
                }
                trusted = Some(identity.bundles.clone());
            }
            None => {
                metrics.set_svid_expiries(std::iter::empty());
                warn!("identity withdrawn: new connections are refused until an SVID arrives");
            }
        }
        let expiry = identity.as_ref().and_then(|i| i.earliest_expiry());
        let until_expiry = expiry
            .map(|e| e.duration_since(SystemTime::now()).unwrap_or_default())
            .unwrap_or(Duration::MAX);
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(until_expiry.min(Duration::from_secs(86400 * 365))) => {
                if let Some(expiry) = expiry {
                    warn!(
                        expired = %crate::timefmt::rfc3339(expiry),
                        "our SVID expired and no new one arrived: new connections are refused"
                    );
                }
                // Wait for the next change before looking again.
                if changes.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A tunnel without `svid`/`svid_hint` presents the first SVID of the
/// response, and when there are several that choice is an accident: SPIRE
/// orders them by entry ID, which means nothing. Says which one is taken
/// and how to choose, once per change of the set of SVIDs.
fn warn_unchosen_svid(shared: &Shared, identity: &Identity, warned: &mut Option<Vec<String>>) {
    let names: Vec<String> = identity
        .svids
        .iter()
        .map(|s| match &s.hint {
            Some(hint) => format!("{} (hint {hint:?})", s.id),
            None => s.id.to_string(),
        })
        .collect();
    let mut distinct = names.clone();
    distinct.sort();
    distinct.dedup();
    if distinct.len() < 2 {
        *warned = None;
        return;
    }
    if warned.as_ref() == Some(&names) {
        return;
    }
    *warned = Some(names.clone());
    let tunnels: Vec<String> = shared
        .tunnels
        .load()
        .iter()
        .filter(|entry| entry.config.svid().is_default())
        .map(|entry| format!("{} {:?}", entry.config.kind(), entry.config.name()))
        .collect();
    if tunnels.is_empty() {
        return;
    }
    warn!(
        tunnels = %tunnels.join(", "),
        presenting = %names[0],
        svids = %names.join(", "),
        "several SVIDs and no `svid` set: these tunnels present the first one the Workload API sent, whose order means nothing (SPIRE sorts by entry ID); set svid = \"spiffe://...\" (and svid_hint = \"...\" for entries with -hint) in each tunnel to choose"
    );
}

/// After a bundle change, closes live connections whose peer chain no
/// longer leads to a trusted CA (a removed federation, a CA dropped from
/// the bundle while still valid: `bundles` keeps the CAs that left because
/// they expired). Expiry is not re-judged: a peer certificate that expired
/// during a long-lived connection was valid when the connection began, and
/// rotations must not cut live connections.
fn revoke_untrusted(shared: &Shared, bundles: &BundleSet) {
    let tunnels = shared.tunnels.load();
    for entry in tunnels.iter() {
        let tunnel = &entry.tunnel;
        let role = match tunnel.kind {
            TunnelKind::inbound => PeerRole::Client,
            TunnelKind::outbound => PeerRole::Server,
        };
        let closed = shared.registry.revoke_where(|conn| {
            if conn.tunnel != tunnel.name || conn.kind != tunnel.kind {
                return None;
            }
            let (peer, chain) = (conn.peer.as_ref()?, conn.peer_chain.as_ref()?);
            let within_validity = (peer.not_after - 1).min(unix_seconds(SystemTime::now()));
            let at = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
                u64::try_from(within_validity).unwrap_or(0),
            ));
            verify_svid_chain(chain, bundles, at, role)
                .err()
                .map(|e| e.to_string())
        });
        log_revocations(&closed, tunnel, "trust bundle change");
    }
}

/// Raises the soft open-files limit to the hard limit: each tunnelled
/// connection holds two sockets, and the common soft default of 1024 would
/// cap a busy node at a few hundred connections.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => warn!(error = %e, "cannot raise the open files limit"),
    }
}

/// Seconds since the Unix epoch, for logs and status.
pub fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
