#![allow(dead_code)]
//! `spiffe-tunnel dev-agent` as a child process on a Unix socket: the
//! Workload API most tests that need rotating SVIDs run against (the real
//! SPIRE harness is in [`super::spire`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::harness::Daemon;

/// A running dev agent; killed (SIGKILL, no goodbye on its streams) when
/// dropped.
pub struct DevAgent {
    pub daemon: Daemon,
    pub socket: PathBuf,
}

impl DevAgent {
    /// Starts `dev-agent --socket socket --trust-domain td args...`, logging
    /// into `dir`, and returns once it serves.
    pub async fn start(dir: &Path, socket: &Path, trust_domain: &str, args: &[&str]) -> Self {
        let mut all = vec![
            "dev-agent",
            "--socket",
            socket.to_str().unwrap(),
            "--trust-domain",
            trust_domain,
        ];
        all.extend_from_slice(args);
        let daemon = Daemon::spawn(&all, dir, &[]);
        daemon
            .wait_log("dev agent serving", 1, Duration::from_secs(20))
            .await;
        Self {
            daemon,
            socket: socket.to_path_buf(),
        }
    }

    /// The socket as a Workload API address (`unix://...`).
    pub fn address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// An `[identity]` table taking SVIDs from this agent.
    pub fn identity_toml(&self) -> String {
        super::node::workload_api_identity(&self.socket)
    }
}
