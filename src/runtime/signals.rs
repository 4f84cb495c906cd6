//! What `run` does on each signal: SIGHUP reloads, SIGTERM/SIGINT drain,
//! SIGUSR2 upgrades in place.
//!
//! An upgrade runs beside the signal loop: the old process serves as usual
//! until its successor says ready (see [`crate::upgrade`]). Then it hands
//! over: its admin endpoint stops at once (the successor serves the same
//! socket), its tunnels stop accepting (the successor accepts from the
//! same sockets, so a connection in their queues is the successor's), and
//! it drains its own live connections as on SIGTERM and exits 0. While an
//! upgrade is under way a second SIGUSR2 is ignored and a SIGHUP waits for
//! its outcome; SIGTERM stops the successor and drains this process.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

use super::{Daemon, RunError};
use crate::config::IdentityConfig;
use crate::notify::Notifier;
use crate::upgrade::{self, Upgrader};

/// How long a successor with a file identity may take to be ready; with
/// the Workload API, its `startup_timeout` plus this.
const UPGRADE_SLACK: Duration = Duration::from_secs(15);

/// The signals `run` handles, installed before start-up.
pub struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
    upgrade: Signal,
}

impl Signals {
    pub fn install() -> Result<Self, RunError> {
        let on = |kind| signal(kind).map_err(RunError::Signals);
        Ok(Self {
            hangup: on(SignalKind::hangup())?,
            terminate: on(SignalKind::terminate())?,
            interrupt: on(SignalKind::interrupt())?,
            upgrade: on(SignalKind::user_defined2())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    pub async fn stop(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {},
            _ = self.interrupt.recv() => {},
        }
    }
}

/// An upgrade under way: the successor's pid and its readiness.
type Pending = (
    u32,
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<u32, String>> + Send>>,
);

impl Daemon {
    /// Serves until SIGTERM/SIGINT or a successor is ready, then drains.
    pub async fn wait_for_signals(
        mut self,
        mut signals: Signals,
        notifier: Option<Notifier>,
        upgrader: Upgrader,
    ) -> Result<(), RunError> {
        let mut pending: Option<Pending> = None;
        let mut reload_waits = false;
        let handed_over = loop {
            tokio::select! {
                _ = signals.hangup.recv() => {
                    if pending.is_some() {
                        info!("SIGHUP during an upgrade: the reload waits for its outcome");
                        reload_waits = true;
                    } else {
                        self.notified_reload(notifier.as_ref()).await;
                    }
                }
                _ = signals.upgrade.recv() => {
                    if let Some((pid, _)) = &pending {
                        warn!(new_pid = pid, "SIGUSR2 ignored: an upgrade is already under way");
                        continue;
                    }
                    match self.start_upgrade(&upgrader) {
                        Ok(started) => pending = Some(started),
                        Err(reason) => self.upgrade_failed(&reason),
                    }
                }
                outcome = async {
                    match pending.as_mut() {
                        Some((_, ready)) => ready.await,
                        None => std::future::pending().await,
                    }
                }, if pending.is_some() => {
                    pending = None;
                    match outcome {
                        Ok(pid) => {
                            self.metrics.upgrade(true);
                            info!(new_pid = pid, "upgrade: the new process is ready; this one stops accepting and drains");
                            if reload_waits {
                                warn!("the SIGHUP that came during the upgrade is not applied here: the new process read the config when it started; send it SIGHUP if the config changed since");
                            }
                            break true;
                        }
                        Err(reason) => {
                            self.upgrade_failed(&reason);
                            if std::mem::take(&mut reload_waits) {
                                self.notified_reload(notifier.as_ref()).await;
                            }
                        }
                    }
                }
                _ = signals.terminate.recv() => break false,
                _ = signals.interrupt.recv() => break false,
            }
        };
        if let Some((pid, _)) = pending.take() {
            warn!(
                new_pid = pid,
                "stopping during an upgrade: the new process is told to stop too"
            );
            upgrade::terminate(pid);
        }
        if handed_over {
            // The successor serves the admin socket from now on.
            if let Some((task, _)) = self.admin.take() {
                task.abort();
            }
        } else if let Some(n) = &notifier {
            // Not after a hand-over: systemd follows the new process now.
            n.stopping();
        }
        if handed_over {
            // systemd's stop signals every process of the unit: to one
            // that drains after a hand-over, the first SIGTERM is no
            // reason to cut what it drains.
            self.drain(async move {
                signals.stop().await;
                info!("already draining after an upgrade; a second signal closes the remaining connections now");
                signals.stop().await;
            })
            .await;
        } else {
            self.drain(signals.stop()).await;
        }
        Ok(())
    }

    async fn notified_reload(&mut self, notifier: Option<&Notifier>) {
        if let Some(n) = notifier {
            n.reloading();
        }
        self.reload().await;
        if let Some(n) = notifier {
            n.reloaded(&self.status_line());
        }
    }

    /// Starts the successor with every listening socket we hold.
    fn start_upgrade(&self, upgrader: &Upgrader) -> Result<Pending, String> {
        let mut sockets = Vec::new();
        for running in &self.running {
            let Some(listener) = &running.listener else {
                continue;
            };
            let fd = listener.as_fd().try_clone_to_owned().map_err(|e| {
                format!(
                    "cannot pass the socket of {}: {e}",
                    running.entry.config.owner()
                )
            })?;
            sockets.push((running.entry.config.handover_name(), fd));
        }
        if let Some((_, admin)) = &self.admin {
            let fd = admin
                .try_clone()
                .map_err(|e| format!("cannot pass the admin socket: {e}"))?;
            sockets.push((crate::listen::ADMIN_NAME.to_string(), fd));
        }
        let passed = sockets.len();
        let child = upgrader.spawn(sockets).map_err(|e| e.to_string())?;
        let pid = child.pid();
        info!(
            new_pid = pid,
            exe = %upgrader.exe().display(),
            sockets = passed,
            "upgrade: started the new process; serving on until it is ready"
        );
        let timeout = match &self.config.identity {
            IdentityConfig::WorkloadApi {
                startup_timeout, ..
            } => *startup_timeout + UPGRADE_SLACK,
            IdentityConfig::Files(_) => UPGRADE_SLACK,
        };
        Ok((pid, Box::pin(child.wait_ready(timeout))))
    }

    fn upgrade_failed(&self, reason: &str) {
        self.metrics.upgrade(false);
        error!(reason, "upgrade failed; this process keeps serving");
    }

    /// Stops accepting, lets live connections finish for up to the longest
    /// `drain_timeout`, then closes the rest. `second_signal` closes them
    /// at once.
    pub async fn drain(mut self, second_signal: impl std::future::Future<Output = ()>) {
        self.shared.draining.store(true, Ordering::Relaxed);
        for r in &mut self.running {
            r.stop_accepting().await;
            // Our reference to the socket goes too, so the port closes.
            r.listener = None;
        }
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
