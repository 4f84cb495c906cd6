//! Starting and stopping one tunnel, in two steps so that a reload or a
//! start-up can be all or nothing.
//!
//! [`prepare`] does everything that can fail (the TLS config, the tunnel's
//! state) around a listener that is already bound, and starts nothing;
//! [`Prepared::launch`] cannot fail and starts the accept loop. A reload
//! prepares every new tunnel before it touches a running one, so a bind
//! or config error leaves the running tunnels exactly as they were.
//!
//! The listening socket is shared (`Arc`), not owned by the accept loop:
//! when a reload replaces a tunnel and the listen address stays, the old
//! accept loop stops and the new one accepts from the same socket, so the
//! port is never closed and connections that arrive in between wait in
//! its queue.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

use super::{RunError, TunnelConfig, TunnelEntry};
use crate::config::ListenAddress;
use crate::listen::{Inherited, Owner};
use crate::metrics::TunnelKind;
use crate::policy::Policy;
use crate::proxy::balance::Balancer;
use crate::proxy::inbound::Inbound;
use crate::proxy::outbound::Outbound;
use crate::proxy::{Tunnel, TunnelContext};
use crate::tls::config::{client_config, server_config, TlsSettings};

/// One tunnel's policy, shared by every generation of the tunnel of that
/// kind and name: a tunnel that a reload replaces keeps the cell, so its
/// live connections and handshakes in flight are judged by the policy in
/// force, never by the one they started with.
pub type PolicyCell = Arc<ArcSwap<Policy>>;

/// A started tunnel and the task accepting its connections.
pub struct Running {
    pub entry: Arc<TunnelEntry>,
    accept_task: JoinHandle<()>,
    /// Kept here (the accept loop holds another reference) so a reload can
    /// hand the socket to the tunnel that replaces this one.
    pub listener: Option<Arc<TcpListener>>,
}

/// A tunnel ready to serve: its listener bound, nothing started.
pub struct Prepared {
    entry: Arc<TunnelEntry>,
    serve: Serve,
    listener: Arc<TcpListener>,
}

enum Serve {
    Inbound(Arc<Inbound>),
    Outbound(Arc<Outbound>, Arc<Balancer>),
}

/// Builds a tunnel around `listener` with the policy in `policy`.
pub fn prepare(
    config: TunnelConfig,
    policy: PolicyCell,
    listener: Arc<TcpListener>,
    ctx: &TunnelContext,
) -> Result<Prepared, RunError> {
    let (name, kind, settings, svid, access_log) = match &config {
        TunnelConfig::Inbound(c) => (
            &c.name,
            TunnelKind::inbound,
            &c.settings,
            &c.svid,
            c.access_log,
        ),
        TunnelConfig::Outbound(c) => (
            &c.name,
            TunnelKind::outbound,
            &c.settings,
            &c.svid,
            c.access_log,
        ),
    };
    let tunnel = Arc::new(
        Tunnel::new(
            name,
            kind,
            settings.clone(),
            svid.clone(),
            Arc::clone(&policy),
            ctx,
        )
        .with_access_log(access_log),
    );
    let tls = TlsSettings {
        store: Arc::clone(&ctx.store),
        policy,
        svid: svid.clone(),
        min_tls: settings.min_tls,
        session_resumption: settings.session_resumption,
    };
    let (serve, balancer) = match &config {
        TunnelConfig::Inbound(inbound) => {
            let tls = server_config(&tls)?;
            let serving = Inbound::new(Arc::clone(&tunnel), inbound.clone(), tls);
            (Serve::Inbound(Arc::new(serving)), None)
        }
        TunnelConfig::Outbound(outbound) => {
            if outbound.present == crate::config::Present::Caller && ctx.delegated.is_none() {
                return Err(RunError::Startup(format!(
                    "outbound {:?}: present = \"caller\" needs SPIRE's admin socket: set [identity] admin_socket or {}",
                    outbound.name,
                    crate::identity::delegated::ADMIN_ENV
                )));
            }
            let tls = client_config(&tls)?;
            let upstreams = Balancer::new(
                &outbound.name,
                &outbound.upstreams,
                &outbound.balance,
                outbound.settings.connect_timeout,
            );
            let serving = Outbound::new(
                Arc::clone(&tunnel),
                outbound.clone(),
                tls,
                Arc::clone(&upstreams),
                ctx.delegated.clone(),
            );
            (
                Serve::Outbound(Arc::new(serving), Arc::clone(&upstreams)),
                Some(upstreams),
            )
        }
    };
    Ok(Prepared {
        entry: Arc::new(TunnelEntry {
            config,
            tunnel,
            balancer,
            listening: Arc::new(AtomicBool::new(false)),
        }),
        serve,
        listener,
    })
}

impl Prepared {
    /// Starts accepting (and, for an outbound, health checks).
    pub fn launch(self) -> Running {
        let entry = self.entry;
        let listening = Arc::clone(&entry.listening);
        listening.store(true, Ordering::Relaxed);
        let listener = Arc::clone(&self.listener);
        let accept_task = match self.serve {
            Serve::Inbound(serving) => {
                if let TunnelConfig::Inbound(c) = &entry.config {
                    info!(tunnel = %c.name, listen = %c.listen, target = %c.target, "inbound tunnel listening");
                }
                tokio::spawn(serve_flagged(serving.serve(listener), listening))
            }
            Serve::Outbound(serving, upstreams) => {
                if let TunnelConfig::Outbound(c) = &entry.config {
                    info!(tunnel = %c.name, listen = %c.listen, upstreams = ?c.upstreams, "outbound tunnel listening");
                }
                // Health checks and re-resolution end with the tunnel.
                upstreams.start(entry.tunnel.stop_accepting.clone());
                tokio::spawn(serve_flagged(serving.serve(listener), listening))
            }
        };
        Running {
            entry,
            accept_task,
            listener: Some(self.listener),
        }
    }
}

impl Running {
    /// Stops the accept loop and waits for it to end; the listener stays
    /// open while `self.listener` (or a tunnel it was handed to) holds it.
    pub async fn stop_accepting(&mut self) {
        self.entry.tunnel.stop_accepting.cancel();
        (&mut self.accept_task).await.ok();
    }

    /// Ends the accept loop at once (the daemon is going away).
    pub fn abort(&self) {
        self.entry.tunnel.stop_accepting.cancel();
        self.entry.tunnel.close_all.cancel();
        self.accept_task.abort();
    }

    /// Lets the live connections of a tunnel that stopped accepting finish
    /// within its `drain_timeout` in the background, then closes the rest.
    pub fn retire(mut self) {
        self.listener = None;
        let tunnel = Arc::clone(&self.entry.tunnel);
        tunnel.connections.close();
        info!(tunnel = %tunnel.name, kind = %tunnel.kind_name(), live = tunnel.active_connections(), "tunnel stopped by reload; the live connections its policy allows may finish");
        tokio::spawn(async move {
            let drained =
                tokio::time::timeout(tunnel.settings.drain_timeout, tunnel.connections.wait())
                    .await;
            if drained.is_err() {
                tunnel.close_all.cancel();
            }
        });
    }
}

/// Runs an accept loop and clears `listening` when it ends.
async fn serve_flagged(serve: impl std::future::Future<Output = ()>, listening: Arc<AtomicBool>) {
    serve.await;
    listening.store(false, Ordering::Relaxed);
}

/// Takes each tunnel's listening socket (passed at start-up, or bound)
/// and the admin endpoint's. Sockets passed by systemd name go first, so
/// an `IP:port` tunnel matching by address cannot take one that a
/// `systemd:NAME` tunnel needs.
pub async fn acquire_listeners(
    tunnels: &[TunnelConfig],
    admin: Option<SocketAddr>,
    inherited: &mut Inherited,
) -> Result<(Vec<Arc<TcpListener>>, Option<TcpListener>), RunError> {
    let mut listeners: Vec<Option<Arc<TcpListener>>> = vec![None; tunnels.len()];
    let mut order: Vec<usize> = (0..tunnels.len()).collect();
    order.sort_by_key(|&i| !matches!(tunnels[i].listen(), ListenAddress::Systemd(_)));
    for i in order {
        let listener = inherited
            .acquire(tunnels[i].listen(), tunnels[i].owner())
            .await?;
        listeners[i] = Some(Arc::new(listener));
    }
    let admin = match admin {
        Some(addr) => Some(
            inherited
                .acquire(&ListenAddress::Tcp(addr), Owner::Admin)
                .await?,
        ),
        None => None,
    };
    Ok((listeners.into_iter().flatten().collect(), admin))
}
