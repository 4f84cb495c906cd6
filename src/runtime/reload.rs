//! SIGHUP: applying a new config to the running daemon, all or nothing,
//! and closing every connection that the new config no longer allows.
//!
//! A reload runs in two phases. The first reads the config and each
//! policy file once (the rules that were checked are the rules that are
//! served) and prepares every tunnel to be started: its listener bound, or
//! taken over from the tunnel it replaces when the address stays, and its
//! TLS config built. Any error there refuses the whole reload and leaves
//! the running tunnels untouched. The second phase cannot fail: it stores
//! the new policies, swaps the accept loops, and revokes.
//!
//! Revocation covers every generation of a tunnel. A tunnel that a reload
//! replaces (same kind and name) hands its policy cell to its replacement,
//! so its live connections, which finish in the background, and its
//! handshakes in flight are judged by the new policy; a tunnel that a
//! reload removes has no policy left in force, so its connections are
//! closed at once and its handshakes in flight refused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tracing::warn;

use super::launch::{self, PolicyCell, Prepared, Running};
use super::{log_revocations, Daemon, TunnelConfig, TunnelEntry};
use crate::config::{Config, ListenAddress};
use crate::metrics::TunnelKind;
use crate::policy::Policy;
use crate::proxy::registry::ConnectionRegistry;
use crate::proxy::Tunnel;
use crate::tls::verify::authorize;

/// A tunnel's identity across reloads.
type Key = (TunnelKind, String);

fn key(config: &TunnelConfig) -> Key {
    (config.kind(), config.name().to_string())
}

/// What a reload does with one tunnel of the new config.
enum Step {
    /// Same config but perhaps for its policy: keeps its listener, accept
    /// loop and connections; index into the running tunnels.
    Keep(usize, Box<TunnelConfig>, Policy),
    /// Starts `Prepared`; when it replaces the running tunnel at the
    /// index, that tunnel's policy cell gets the policy.
    Start(Option<(usize, Policy)>, Prepared),
}

impl Daemon {
    pub(super) async fn try_reload(&mut self) -> Result<String, String> {
        let new = Config::load(&self.config.path).map_err(|e| e.to_string())?;
        let wanted = TunnelConfig::all(&new);
        let policies = wanted
            .iter()
            .map(TunnelConfig::load_policy)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let steps = self.prepare(wanted, policies).await?;

        let mut notes = Vec::new();
        if new.identity != self.config.identity {
            notes.push("[identity] changes take effect at the next restart");
        }
        if new.admin != self.config.admin {
            notes.push("[admin] changes take effect at the next restart");
        }
        if new.log != self.config.log {
            notes.push("[log] changes take effect at the next restart");
        }
        for note in notes {
            warn!("{note}");
        }
        let summary = self.apply(steps).await;
        self.config = new;
        Ok(summary)
    }

    /// Phase one: decides each tunnel's fate and prepares every tunnel to
    /// start, touching nothing that runs.
    async fn prepare(
        &mut self,
        wanted: Vec<TunnelConfig>,
        policies: Vec<Policy>,
    ) -> Result<Vec<Step>, String> {
        let index: HashMap<Key, usize> = self
            .running
            .iter()
            .enumerate()
            .map(|(i, r)| (key(&r.entry.config), i))
            .collect();
        let kept: HashSet<usize> = wanted
            .iter()
            .filter_map(|config| {
                let i = *index.get(&key(config))?;
                same_but_policy(&self.running[i].entry.config, config).then_some(i)
            })
            .collect();
        // The sockets of the tunnels that stop, for a new tunnel on the
        // same address to take over.
        let mut handover: HashMap<ListenAddress, Arc<TcpListener>> = self
            .running
            .iter()
            .enumerate()
            .filter(|(i, _)| !kept.contains(i))
            .filter_map(|(_, r)| {
                let listener = Arc::clone(r.listener.as_ref()?);
                Some((r.entry.config.listen().clone(), listener))
            })
            .collect();
        let mut steps = Vec::new();
        for (config, policy) in wanted.into_iter().zip(policies) {
            let previous = index.get(&key(&config)).copied();
            if let Some(i) = previous.filter(|i| kept.contains(i)) {
                steps.push(Step::Keep(i, Box::new(config), policy));
                continue;
            }
            let (cell, replaces): (PolicyCell, _) = match previous {
                Some(i) => (
                    Arc::clone(&self.running[i].entry.tunnel.policy),
                    Some((i, policy)),
                ),
                None => (Arc::new(ArcSwap::from_pointee(policy)), None),
            };
            let listener = match handover.remove(config.listen()) {
                Some(listener) => listener,
                None => Arc::new(
                    self.inherited
                        .acquire(config.listen(), config.owner())
                        .await
                        .map_err(|e| e.to_string())?,
                ),
            };
            let prepared =
                launch::prepare(config, cell, listener, &self.ctx).map_err(|e| e.to_string())?;
            steps.push(Step::Start(replaces, prepared));
        }
        Ok(steps)
    }

    /// Phase two: puts the prepared tunnels in place of the old ones and
    /// revokes what the new policies no longer allow. Returns the summary.
    async fn apply(&mut self, steps: Vec<Step>) -> String {
        let mut old: Vec<Option<Running>> = self.running.drain(..).map(Some).collect();
        let (mut kept, mut replaced, mut added) = (0, 0, 0);
        // Policies first, then the registry scans below: a handshake that
        // `Tunnel::admit`s meanwhile either sees the new policy or is
        // registered in time for the scan.
        let mut next = Vec::new();
        let mut retiring = Vec::new();
        for step in steps {
            match step {
                Step::Keep(i, config, policy) => {
                    let mut running = old[i].take().expect("each tunnel is matched once");
                    running.entry.tunnel.policy.store(Arc::new(policy));
                    if running.entry.config != *config {
                        running.entry = Arc::new(TunnelEntry {
                            config: *config,
                            tunnel: Arc::clone(&running.entry.tunnel),
                            balancer: running.entry.balancer.clone(),
                            listening: Arc::clone(&running.entry.listening),
                        });
                    }
                    kept += 1;
                    next.push(Next::Running(running));
                }
                Step::Start(replaces, prepared) => {
                    if let Some((i, policy)) = replaces {
                        let running = old[i].take().expect("each tunnel is matched once");
                        running.entry.tunnel.policy.store(Arc::new(policy));
                        retiring.push(running);
                        replaced += 1;
                    } else {
                        added += 1;
                    }
                    next.push(Next::Prepared(prepared));
                }
            }
        }
        let mut removed: Vec<Running> = old.into_iter().flatten().collect();
        for running in &removed {
            // No policy is left in force for it: deny everyone.
            running
                .entry
                .tunnel
                .policy
                .store(Arc::new(Policy::compile([])));
        }
        // Old accept loops stop before their sockets' new owners accept.
        for running in retiring.iter_mut().chain(removed.iter_mut()) {
            running.stop_accepting().await;
        }
        self.running = next
            .into_iter()
            .map(|step| match step {
                Next::Running(running) => running,
                Next::Prepared(prepared) => prepared.launch(),
            })
            .collect();
        self.shared.tunnels.store(Arc::new(
            self.running.iter().map(|r| Arc::clone(&r.entry)).collect(),
        ));

        let mut revoked = 0;
        for running in &self.running {
            revoked += revoke_disallowed(&self.registry, &running.entry.tunnel);
        }
        for running in &removed {
            revoked += revoke_removed(&self.registry, &running.entry.tunnel);
        }
        let removed_count = removed.len();
        for running in retiring.into_iter().chain(removed) {
            running.retire();
        }
        format!(
            "{kept} tunnel(s) kept, {replaced} replaced, {added} added, {removed_count} removed; {revoked} live connection(s) revoked"
        )
    }
}

/// A tunnel of the new config in `apply`: still running, or to be started.
enum Next {
    Running(Running),
    Prepared(Prepared),
}

/// Whether two configs of one tunnel differ at most in their policy,
/// which a running tunnel takes without a restart.
fn same_but_policy(running: &TunnelConfig, new: &TunnelConfig) -> bool {
    match (running, new) {
        (TunnelConfig::Inbound(a), TunnelConfig::Inbound(b)) => {
            let mut b = b.clone();
            b.policy = a.policy.clone();
            *a == b
        }
        (TunnelConfig::Outbound(a), TunnelConfig::Outbound(b)) => {
            let mut b = b.clone();
            b.policy = a.policy.clone();
            *a == b
        }
        _ => false,
    }
}

/// Closes the live connections of `tunnel`'s kind and name (of this and
/// of earlier, retired generations) whose peer its policy no longer
/// allows; returns how many.
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

/// Closes every live connection of a tunnel that the reload removed.
fn revoke_removed(registry: &ConnectionRegistry, tunnel: &Tunnel) -> usize {
    let closed = registry.revoke_where(|conn| {
        (conn.tunnel == tunnel.name && conn.kind == tunnel.kind)
            .then(|| "tunnel removed by reload: no policy allows it any more".to_string())
    });
    log_revocations(&closed, tunnel, "policy reload");
    closed.len()
}
