//! The `run` command: the daemon that serves every tunnel in a config file.
//!
//! Start-up wires the one-way flow: the identity source publishes into the
//! store, each tunnel gets TLS configs that read from the store and its own
//! policy, and listeners are bound. Then it waits for signals: SIGHUP
//! reloads policy files (all or nothing; a bad file leaves every tunnel's
//! policy as it was), SIGTERM/SIGINT drain and exit.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError, IdentityConfig, PolicySpec};
use crate::identity::workload_api::{wait_for_first_identity, ApiAddress, WorkloadApiSource};
use crate::identity::{IdentityError, IdentityStore};
use crate::metrics::{Metrics, TunnelKind};
use crate::policy::PolicyError;
use crate::proxy::inbound::Inbound;
use crate::proxy::outbound::Outbound;
use crate::proxy::registry::ConnectionRegistry;
use crate::proxy::{Tunnel, TunnelContext};
use crate::tls::config::{client_config, server_config, TlsConfigError, TlsSettings};

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
        kind: &'static str,
        tunnel: String,
        addr: std::net::SocketAddr,
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

/// A started tunnel, as the signal handlers see it.
struct Running {
    tunnel: Arc<Tunnel>,
    policy_spec: PolicySpec,
}

/// Runs the daemon until SIGTERM/SIGINT and a finished drain.
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    let config = Config::load(&options.config)?;
    raise_open_files_limit();
    let daemon = Daemon::start(config, options.socket.as_deref()).await?;
    daemon.wait_for_signals().await
}

/// Every tunnel of one config, serving, with the identity source that feeds
/// them. `run` drives one from signals; `demo` and tests embed several.
pub struct Daemon {
    pub config: Config,
    pub store: Arc<IdentityStore>,
    pub metrics: Arc<Metrics>,
    pub registry: Arc<ConnectionRegistry>,
    running: Vec<Running>,
    /// Identity source, identity watcher and accept loops; ended on drop.
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for r in &self.running {
            r.tunnel.stop_accepting.cancel();
            r.tunnel.close_all.cancel();
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Daemon {
    /// The running tunnels, in config order (inbound first).
    pub fn tunnels(&self) -> impl Iterator<Item = &Arc<Tunnel>> {
        self.running.iter().map(|r| &r.tunnel)
    }

    /// Starts the identity source, waits for the first identity, binds
    /// every listener and starts serving.
    pub async fn start(config: Config, socket_override: Option<&str>) -> Result<Self, RunError> {
        let metrics = Arc::new(Metrics::new());
        let store = IdentityStore::new();
        let mut tasks = start_identity_source(&config, socket_override, &store, &metrics).await?;
        tasks.push(tokio::spawn(watch_identity(
            Arc::clone(&store),
            Arc::clone(&metrics),
        )));
        let ctx = TunnelContext {
            store: Arc::clone(&store),
            metrics: Arc::clone(&metrics),
            registry: ConnectionRegistry::new(),
        };
        let (running, serving) = start_tunnels(&config, &ctx).await?;
        tasks.extend(serving);
        info!(
            config = %config.path.display(),
            inbound = config.inbound.len(),
            outbound = config.outbound.len(),
            "spiffe-tunnel is running"
        );
        Ok(Self {
            config,
            store,
            metrics,
            registry: ctx.registry,
            running,
            tasks,
        })
    }

    /// Serves until SIGTERM/SIGINT, reloading policies on SIGHUP, then drains.
    pub async fn wait_for_signals(self) -> Result<(), RunError> {
        let mut hangup = signal(SignalKind::hangup()).map_err(RunError::Signals)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
        loop {
            tokio::select! {
                _ = hangup.recv() => self.reload_policies(),
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
            }
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

    /// Re-reads every tunnel's policy; applies all of them or none.
    pub fn reload_policies(&self) {
        let loaded: Result<Vec<_>, PolicyError> =
            self.running.iter().map(|r| r.policy_spec.load()).collect();
        match loaded {
            Ok(policies) => {
                for (r, policy) in self.running.iter().zip(policies) {
                    info!(tunnel = %r.tunnel.name, rules = policy.len(), "policy reloaded");
                    r.tunnel.policy.store(Arc::new(policy));
                }
                self.metrics.policy_reload(true);
            }
            Err(e) => {
                error!(error = %e, "policy reload refused; every tunnel keeps its current policy");
                self.metrics.policy_reload(false);
            }
        }
    }

    /// Stops accepting, lets live connections finish for up to the longest
    /// `drain_timeout`, then closes the rest. `second_signal` closes them
    /// at once.
    pub async fn drain(self, second_signal: impl std::future::Future<Output = ()>) {
        let running = &self.running;
        let deadline = running
            .iter()
            .map(|r| r.tunnel.settings.drain_timeout)
            .max()
            .unwrap_or_default();
        let live: usize = running.iter().map(|r| r.tunnel.active_connections()).sum();
        info!(live_connections = live, drain_timeout = ?deadline, "draining: no new connections are accepted");
        for r in running {
            r.tunnel.stop_accepting.cancel();
            r.tunnel.connections.close();
        }
        let all_done = async {
            for r in running {
                r.tunnel.connections.wait().await;
            }
        };
        tokio::select! {
            () = all_done => info!("drained: every connection finished"),
            () = tokio::time::sleep(deadline) => warn!("drain timeout passed; closing the remaining connections"),
            () = second_signal => warn!("second signal: closing the remaining connections now"),
        }
        for r in running {
            r.tunnel.close_all.cancel();
        }
        // The copies end at their next poll; give them a moment to flush.
        let closed = async {
            for r in running {
                r.tunnel.connections.wait().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), closed).await;
    }
}

/// Starts the configured identity source and waits for the first identity.
async fn start_identity_source(
    config: &Config,
    socket_override: Option<&str>,
    store: &Arc<IdentityStore>,
    metrics: &Arc<Metrics>,
) -> Result<Vec<JoinHandle<()>>, RunError> {
    match &config.identity {
        IdentityConfig::Files(files) => {
            let provider = crate::tls::config::provider();
            let identity = files.load(&provider)?;
            store.publish(identity);
            Ok(vec![tokio::spawn(files.clone().watch(
                Arc::clone(store),
                provider,
                FILE_POLL_INTERVAL,
            ))])
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
            Ok(vec![task])
        }
    }
}

async fn start_tunnels(
    config: &Config,
    ctx: &TunnelContext,
) -> Result<(Vec<Running>, Vec<JoinHandle<()>>), RunError> {
    let mut running = Vec::new();
    let mut tasks = Vec::new();
    for inbound in &config.inbound {
        let policy = Arc::new(ArcSwap::from_pointee(inbound.policy.load()?));
        let tunnel = Arc::new(Tunnel::new(
            &inbound.name,
            TunnelKind::inbound,
            inbound.settings.clone(),
            inbound.svid.clone(),
            Arc::clone(&policy),
            ctx,
        ));
        let tls = server_config(&TlsSettings {
            store: Arc::clone(&ctx.store),
            policy,
            svid: inbound.svid.clone(),
            min_tls: inbound.settings.min_tls,
        })?;
        let listener =
            TcpListener::bind(inbound.listen)
                .await
                .map_err(|source| RunError::Bind {
                    kind: "inbound",
                    tunnel: inbound.name.clone(),
                    addr: inbound.listen,
                    source,
                })?;
        info!(tunnel = %inbound.name, listen = %inbound.listen, target = %inbound.target, "inbound tunnel listening");
        let serving = Arc::new(Inbound::new(Arc::clone(&tunnel), inbound.clone(), tls));
        tasks.push(tokio::spawn(serving.serve(listener)));
        running.push(Running {
            tunnel,
            policy_spec: inbound.policy.clone(),
        });
    }
    for outbound in &config.outbound {
        let policy = Arc::new(ArcSwap::from_pointee(outbound.policy.load()?));
        let tunnel = Arc::new(Tunnel::new(
            &outbound.name,
            TunnelKind::outbound,
            outbound.settings.clone(),
            outbound.svid.clone(),
            Arc::clone(&policy),
            ctx,
        ));
        let tls = client_config(&TlsSettings {
            store: Arc::clone(&ctx.store),
            policy,
            svid: outbound.svid.clone(),
            min_tls: outbound.settings.min_tls,
        })?;
        let listener =
            TcpListener::bind(outbound.listen)
                .await
                .map_err(|source| RunError::Bind {
                    kind: "outbound",
                    tunnel: outbound.name.clone(),
                    addr: outbound.listen,
                    source,
                })?;
        info!(tunnel = %outbound.name, listen = %outbound.listen, upstreams = ?outbound.upstreams, "outbound tunnel listening");
        let serving = Arc::new(Outbound::new(Arc::clone(&tunnel), outbound.clone(), tls));
        tasks.push(tokio::spawn(serving.serve(listener)));
        running.push(Running {
            tunnel,
            policy_spec: outbound.policy.clone(),
        });
    }
    Ok((running, tasks))
}

/// Logs every identity change, keeps the identity metrics current, and
/// says so when our SVID expires with no replacement (from then on new
/// connections are refused until one arrives).
async fn watch_identity(store: Arc<IdentityStore>, metrics: Arc<Metrics>) {
    let mut changes = store.subscribe();
    let mut first = true;
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
                        expires = %humantime::format_rfc3339_seconds(svid.not_after),
                        "SVID in use"
                    );
                }
                first = false;
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
                        expired = %humantime::format_rfc3339_seconds(expiry),
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
        .map_or(0, |d| d.as_secs() as i64)
}
