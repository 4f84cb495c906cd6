//! The `run` command: the daemon that serves every tunnel in a config file.
//!
//! Start-up wires the one-way flow: the identity source publishes into the
//! store, each tunnel gets TLS configs that read from the store and its own
//! policy, and listeners are bound. Then it waits for signals. SIGHUP
//! re-reads the whole config: tunnels are added, removed or changed, every
//! policy is reloaded, and live connections whose peer is no longer allowed
//! are closed; a bad config is refused and the running one stays.
//! SIGTERM/SIGINT drain and exit.
//!
//! What the admin endpoint shows lives in [`Shared`], which the daemon
//! updates and the endpoint only reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError, IdentityConfig, InboundConfig, OutboundConfig};
use crate::identity::workload_api::{
    wait_for_first_identity, ApiAddress, ApiHealth, WorkloadApiSource,
};
use crate::identity::{BundleSet, IdentityError, IdentityStore};
use crate::metrics::{Metrics, TunnelKind};
use crate::notify::Notifier;
use crate::policy::{Policy, PolicyError};
use crate::proxy::balance::Balancer;
use crate::proxy::inbound::Inbound;
use crate::proxy::outbound::Outbound;
use crate::proxy::registry::ConnectionRegistry;
use crate::proxy::{Tunnel, TunnelContext};
use crate::tls::config::{client_config, server_config, TlsConfigError, TlsSettings};
use crate::tls::verify::{authorize, verify_svid_chain, PeerRole};

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
    #[error("{kind} tunnel {tunnel:?}: cannot listen on {addr}: {source}")]
    Bind {
        kind: TunnelKind,
        tunnel: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin endpoint: cannot listen on {addr}: {source}")]
    AdminBind {
        addr: SocketAddr,
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
            _ => 1,
        }
    }
}

/// Options of `spiffe-tunnel run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    /// `--socket`: overrides the Workload API address of the config.
    pub socket: Option<String>,
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

    pub fn listen(&self) -> SocketAddr {
        match self {
            TunnelConfig::Inbound(c) => c.listen,
            TunnelConfig::Outbound(c) => c.listen,
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

/// A started tunnel and the tasks serving it.
struct Running {
    entry: Arc<TunnelEntry>,
    accept_task: JoinHandle<()>,
}

/// Runs the daemon until SIGTERM/SIGINT and a finished drain.
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    let config = Config::load(&options.config)?;
    raise_open_files_limit();
    let notifier = Notifier::from_env();
    let daemon = Daemon::start(config, options.socket.as_deref()).await?;
    if let Some(n) = &notifier {
        n.ready(&daemon.status_line());
    }
    daemon.wait_for_signals(notifier).await
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
    /// Identity source, identity watcher and admin endpoint; ended on drop.
    tasks: Vec<JoinHandle<()>>,
    ctx: TunnelContext,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for r in &self.running {
            r.entry.tunnel.stop_accepting.cancel();
            r.entry.tunnel.close_all.cancel();
            r.accept_task.abort();
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Daemon {
    /// The running tunnels, in config order (inbound first).
    pub fn tunnels(&self) -> impl Iterator<Item = &Arc<Tunnel>> {
        self.running.iter().map(|r| &r.entry.tunnel)
    }

    /// Starts the identity source, waits for the first identity, binds
    /// every listener and the admin endpoint, and starts serving.
    pub async fn start(config: Config, socket_override: Option<&str>) -> Result<Self, RunError> {
        let metrics = Arc::new(Metrics::new());
        let store = IdentityStore::new();
        let registry = ConnectionRegistry::new();
        let (mut tasks, identity_source, api_health) =
            start_identity_source(&config, socket_override, &store, &metrics).await?;
        let ctx = TunnelContext {
            store: Arc::clone(&store),
            metrics: Arc::clone(&metrics),
            registry: Arc::clone(&registry),
        };
        let mut running = Vec::new();
        for tunnel in TunnelConfig::all(&config) {
            running.push(start_tunnel(tunnel, &ctx).await?);
        }
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
            started: SystemTime::now(),
        });
        tasks.push(tokio::spawn(watch_identity(Arc::clone(&shared))));
        if let Some(addr) = config.admin.listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::AdminBind { addr, source })?;
            info!(listen = %addr, "admin endpoint listening (/healthz /readyz /metrics /status)");
            tasks.push(tokio::spawn(crate::admin::serve(
                listener,
                Arc::clone(&shared),
            )));
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

    /// Serves until SIGTERM/SIGINT, reloading on SIGHUP, then drains.
    pub async fn wait_for_signals(mut self, notifier: Option<Notifier>) -> Result<(), RunError> {
        let mut hangup = signal(SignalKind::hangup()).map_err(RunError::Signals)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
        loop {
            tokio::select! {
                _ = hangup.recv() => {
                    if let Some(n) = &notifier {
                        n.reloading();
                    }
                    self.reload().await;
                    if let Some(n) = &notifier {
                        n.reloaded(&self.status_line());
                    }
                }
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
        }
        if let Some(n) = &notifier {
            n.stopping();
        }
        self.drain(async move {
            tokio::select! {
                _ = terminate.recv() => {},
                _ = interrupt.recv() => {},
            }
        })
        .await;
        Ok(())
    }

    /// SIGHUP: re-reads the config file and applies it. Tunnels are
    /// matched by kind and name: an unchanged one keeps its listener and
    /// live connections and only gets its policy reloaded; a changed one is
    /// replaced (its live connections finish under its drain_timeout); a
    /// removed one stops; a new one starts. Live connections whose peer the
    /// new policy no longer allows are closed. Any error in the new config
    /// or its policy files refuses the whole reload.
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

    async fn try_reload(&mut self) -> Result<String, String> {
        let new = Config::load(&self.config.path).map_err(|e| e.to_string())?;
        let wanted = TunnelConfig::all(&new);
        // Load every policy before touching anything: all or nothing.
        let policies = wanted
            .iter()
            .map(TunnelConfig::load_policy)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;

        let mut notes = Vec::new();
        if new.identity != self.config.identity {
            notes.push("[identity] changes take effect at the next restart".to_string());
        }
        if new.admin != self.config.admin {
            notes.push("[admin] changes take effect at the next restart".to_string());
        }
        if new.log != self.config.log {
            notes.push("[log] changes take effect at the next restart".to_string());
        }
        for note in &notes {
            warn!("{note}");
        }

        let mut old: HashMap<(TunnelKind, String), Running> = self
            .running
            .drain(..)
            .map(|r| {
                (
                    (r.entry.config.kind(), r.entry.config.name().to_string()),
                    r,
                )
            })
            .collect();
        let (mut kept, mut replaced, mut added, mut revoked) = (0, 0, 0, 0);
        let mut failures = Vec::new();
        let mut next = Vec::new();
        for (config, policy) in wanted.into_iter().zip(policies) {
            let key = (config.kind(), config.name().to_string());
            match old.remove(&key) {
                Some(running) if running.entry.config == config => {
                    let tunnel = &running.entry.tunnel;
                    tunnel.policy.store(Arc::new(policy));
                    revoked += revoke_disallowed(&self.registry, tunnel);
                    kept += 1;
                    next.push(running);
                }
                previous => {
                    if let Some(previous) = previous {
                        retire(previous).await;
                        replaced += 1;
                    } else {
                        added += 1;
                    }
                    match start_tunnel(config, &self.ctx).await {
                        Ok(running) => {
                            running.entry.tunnel.policy.store(Arc::new(policy));
                            next.push(running);
                        }
                        Err(e) => failures.push(e.to_string()),
                    }
                }
            }
        }
        let removed = old.len();
        for (_, running) in old {
            retire(running).await;
        }
        self.running = next;
        self.shared.tunnels.store(Arc::new(
            self.running.iter().map(|r| Arc::clone(&r.entry)).collect(),
        ));
        self.config = new;
        let summary = format!(
            "{kept} tunnel(s) kept, {replaced} replaced, {added} added, {removed} removed; {revoked} live connection(s) revoked"
        );
        if failures.is_empty() {
            Ok(summary)
        } else {
            Err(format!("{summary}; but {}", failures.join("; ")))
        }
    }

    /// Stops accepting, lets live connections finish for up to the longest
    /// `drain_timeout`, then closes the rest. `second_signal` closes them
    /// at once.
    pub async fn drain(self, second_signal: impl std::future::Future<Output = ()>) {
        self.shared.draining.store(true, Ordering::Relaxed);
        let running = &self.running;
        let deadline = running
            .iter()
            .map(|r| r.entry.tunnel.settings.drain_timeout)
            .max()
            .unwrap_or_default();
        let live: usize = running
            .iter()
            .map(|r| r.entry.tunnel.active_connections())
            .sum();
        info!(live_connections = live, drain_timeout = ?deadline, "draining: no new connections are accepted");
        for r in running {
            r.entry.tunnel.stop_accepting.cancel();
            r.entry.tunnel.connections.close();
        }
        let all_done = async {
            for r in running {
                r.entry.tunnel.connections.wait().await;
            }
        };
        tokio::select! {
            () = all_done => info!("drained: every connection finished"),
            () = tokio::time::sleep(deadline) => warn!("drain timeout passed; closing the remaining connections"),
            () = second_signal => warn!("second signal: closing the remaining connections now"),
        }
        for r in running {
            r.entry.tunnel.close_all.cancel();
        }
        // The copies end at their next poll; give them a moment to flush.
        let closed = async {
            for r in running {
                r.entry.tunnel.connections.wait().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), closed).await;
    }
}

/// Stops a tunnel that a reload removed or replaced: the listener closes
/// now (so a replacement can bind the same address), and its live
/// connections get its `drain_timeout` to finish in the background.
async fn retire(running: Running) {
    let tunnel = Arc::clone(&running.entry.tunnel);
    tunnel.stop_accepting.cancel();
    tunnel.connections.close();
    let _ = running.accept_task.await;
    info!(tunnel = %tunnel.name, kind = %tunnel.kind_name(), live = tunnel.active_connections(), "tunnel stopped by reload; its live connections may finish");
    tokio::spawn(async move {
        let drained =
            tokio::time::timeout(tunnel.settings.drain_timeout, tunnel.connections.wait()).await;
        if drained.is_err() {
            tunnel.close_all.cancel();
        }
    });
}

/// Closes the live connections of `tunnel` whose peer its current policy
/// no longer allows; returns how many.
fn revoke_disallowed(registry: &ConnectionRegistry, tunnel: &Tunnel) -> usize {
    let policy = tunnel.policy.load();
    let closed = registry.revoke_where(|conn| {
        if conn.tunnel != tunnel.name || conn.kind != tunnel.kind {
            return None;
        }
        let peer = conn.peer.as_ref()?;
        authorize(&policy, &peer.id).err().map(|e| e.to_string())
    });
    log_revocations(&closed, tunnel, "policy reload");
    closed.len()
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

/// Starts one tunnel: policy, TLS config, listener, accept loop.
async fn start_tunnel(config: TunnelConfig, ctx: &TunnelContext) -> Result<Running, RunError> {
    let policy = Arc::new(ArcSwap::from_pointee(config.load_policy()?));
    let listen = config.listen();
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| RunError::Bind {
            kind: config.kind(),
            tunnel: config.name().to_string(),
            addr: listen,
            source,
        })?;
    let listening = Arc::new(AtomicBool::new(true));
    let mut balancer = None;
    let (tunnel, accept_task) = match &config {
        TunnelConfig::Inbound(inbound) => {
            let tunnel = Arc::new(
                Tunnel::new(
                    &inbound.name,
                    TunnelKind::inbound,
                    inbound.settings.clone(),
                    inbound.svid.clone(),
                    Arc::clone(&policy),
                    ctx,
                )
                .with_access_log(inbound.access_log),
            );
            let tls = server_config(&TlsSettings {
                store: Arc::clone(&ctx.store),
                policy,
                svid: inbound.svid.clone(),
                min_tls: inbound.settings.min_tls,
                session_resumption: inbound.settings.session_resumption,
            })?;
            info!(tunnel = %inbound.name, listen = %listen, target = %inbound.target, "inbound tunnel listening");
            let serving = Arc::new(Inbound::new(Arc::clone(&tunnel), inbound.clone(), tls));
            (
                tunnel,
                tokio::spawn(serve_flagged(
                    serving.serve(listener),
                    Arc::clone(&listening),
                )),
            )
        }
        TunnelConfig::Outbound(outbound) => {
            let tunnel = Arc::new(
                Tunnel::new(
                    &outbound.name,
                    TunnelKind::outbound,
                    outbound.settings.clone(),
                    outbound.svid.clone(),
                    Arc::clone(&policy),
                    ctx,
                )
                .with_access_log(outbound.access_log),
            );
            let tls = client_config(&TlsSettings {
                store: Arc::clone(&ctx.store),
                policy,
                svid: outbound.svid.clone(),
                min_tls: outbound.settings.min_tls,
                session_resumption: outbound.settings.session_resumption,
            })?;
            info!(tunnel = %outbound.name, listen = %listen, upstreams = ?outbound.upstreams, "outbound tunnel listening");
            let upstreams = Balancer::new(
                &outbound.name,
                &outbound.upstreams,
                &outbound.balance,
                outbound.settings.connect_timeout,
            );
            // Health checks and re-resolution end with the tunnel.
            upstreams.start(tunnel.stop_accepting.clone());
            balancer = Some(Arc::clone(&upstreams));
            let serving = Arc::new(Outbound::new(
                Arc::clone(&tunnel),
                outbound.clone(),
                tls,
                upstreams,
            ));
            (
                tunnel,
                tokio::spawn(serve_flagged(
                    serving.serve(listener),
                    Arc::clone(&listening),
                )),
            )
        }
    };
    Ok(Running {
        entry: Arc::new(TunnelEntry {
            config,
            tunnel,
            balancer,
            listening,
        }),
        accept_task,
    })
}

/// Runs an accept loop and clears `listening` when it ends.
async fn serve_flagged(serve: impl std::future::Future<Output = ()>, listening: Arc<AtomicBool>) {
    serve.await;
    listening.store(false, Ordering::Relaxed);
}

type SourceStart = (
    Vec<JoinHandle<()>>,
    String,
    Option<watch::Receiver<ApiHealth>>,
);

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
    loop {
        let identity = store.load();
        match &identity {
            Some(identity) => {
                metrics.set_svid_expiries(
                    identity
                        .svids
                        .iter()
                        .map(|s| (s.id.to_string(), unix_seconds(s.not_after))),
                );
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
