#![allow(dead_code)]
//! A `spiffe-tunnel run` process fed by a Workload API socket (a real SPIRE
//! agent or the dev agent), with its own config folder, listen port and
//! admin port: one tunnel end, as an operator runs it.
//!
//! ```ignore
//! let api = TunnelEnd::inbound(&agent.address(), API_UID, target.addr, &[WEB], "").await;
//! let web = TunnelEnd::outbound(&agent.address(), WEB_UID, api.listen, &[API], "").await;
//! roundtrip(web.listen, b"hello").await?;
//! ```
//!
//! `uid` is the uid the process runs as, which is what the unix workload
//! attestor sees (0 is the test's own). The config folder is readable by
//! every uid, so any uid can run it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::harness::{free_addr, roundtrip, serials_in_use, Daemon, Target, TargetMode};
use super::probe;
use super::spire::{Spire, OTHER_UID};

pub const WEB: &str = "spiffe://example.org/web";
pub const API: &str = "spiffe://example.org/api";

/// The uids the two ends of a [`TunnelPair`] run as, each with its own entry.
pub const API_UID: u32 = OTHER_UID;
pub const WEB_UID: u32 = OTHER_UID + 1;

/// Long enough for a new entry to reach a workload (server cache reload
/// and agent sync, 1 s each in the harness, then the signing round trip).
pub const ISSUE: Duration = Duration::from_secs(30);

/// One tunnel end.
pub struct TunnelEnd {
    pub daemon: Daemon,
    /// Where the tunnel listens (mTLS for an inbound, plain for an outbound).
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    // Dropped after the daemon (field order), which logs into it.
    dir: tempfile::TempDir,
}

/// Config text of the `[identity]` (with `identity_extra` lines) and
/// `[admin]` sections.
fn header(
    socket: &str,
    admin: SocketAddr,
    startup_timeout: Duration,
    identity_extra: &str,
) -> String {
    format!(
        "[identity]\nsource = \"workload_api\"\nsocket = \"{socket}\"\nstartup_timeout = \"{}ms\"\n{identity_extra}\n[admin]\nlisten = \"{admin}\"\n\n",
        startup_timeout.as_millis()
    )
}

fn quoted(ids: &[&str]) -> String {
    ids.iter()
        .map(|id| format!("\"{id}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

impl TunnelEnd {
    /// Writes a config whose tunnel section is `body(listen)` and starts
    /// the process as `uid`, without waiting for it.
    pub fn spawn(
        socket: &str,
        uid: u32,
        startup_timeout: Duration,
        body: impl FnOnce(SocketAddr) -> String,
    ) -> Self {
        Self::spawn_with(socket, uid, startup_timeout, "", body)
    }

    /// [`TunnelEnd::spawn`] with more lines in `[identity]`
    /// (`admin_socket = ...`).
    pub fn spawn_with(
        socket: &str,
        uid: u32,
        startup_timeout: Duration,
        identity_extra: &str,
        body: impl FnOnce(SocketAddr) -> String,
    ) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("ste")
            .tempdir()
            .expect("temporary folder");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let listen = free_addr();
        let admin = free_addr();
        let config = dir.path().join("tunnel.toml");
        std::fs::write(
            &config,
            format!(
                "{}{}",
                header(socket, admin, startup_timeout, identity_extra),
                body(listen)
            ),
        )
        .unwrap();
        let daemon = Daemon::run_as(&config, uid);
        Self {
            daemon,
            listen,
            admin,
            config,
            dir,
        }
    }

    /// An inbound named "api" in front of `target`, letting in `allow`;
    /// `extra` is more TOML for the tunnel (`svid = ...`, `access_log`).
    pub async fn inbound(
        socket: &str,
        uid: u32,
        target: SocketAddr,
        allow: &[&str],
        extra: &str,
    ) -> Self {
        let end = Self::spawn(socket, uid, Duration::from_secs(30), |listen| {
            format!(
                "[[inbound]]\nname = \"api\"\nlisten = \"{listen}\"\ntarget = \"{target}\"\nallow = [{}]\n{extra}\n",
                quoted(allow)
            )
        });
        end.daemon.wait_running().await;
        end
    }

    /// An outbound named "api" to `upstream`, accepting servers in `allow`.
    pub async fn outbound(
        socket: &str,
        uid: u32,
        upstream: SocketAddr,
        allow: &[&str],
        extra: &str,
    ) -> Self {
        let end = Self::spawn(socket, uid, Duration::from_secs(30), |listen| {
            format!(
                "[[outbound]]\nname = \"api\"\nlisten = \"{listen}\"\nupstreams = [\"{upstream}\"]\nallow = [{}]\n{extra}\n",
                quoted(allow)
            )
        });
        end.daemon.wait_running().await;
        end
    }

    pub async fn status(&self) -> Value {
        probe::status(self.admin).await
    }

    /// `/readyz`: status code and body.
    pub async fn readyz(&self) -> (u16, String) {
        probe::http_get(self.admin, "/readyz").await
    }

    pub async fn metrics(&self) -> String {
        probe::metrics(self.admin).await
    }

    /// How many CA certificates this end trusts for `trust_domain`.
    pub async fn ca_count(&self, trust_domain: &str) -> u64 {
        let status = self.status().await;
        status["identity"]["bundles"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["trust_domain"] == trust_domain)
            .and_then(|b| b["ca_count"].as_u64())
            .unwrap_or(0)
    }

    /// Every serial this end has logged as "SVID in use" for `id`, in
    /// order, repeats collapsed: one more entry per rotation.
    pub fn serials_seen(&self, id: &str) -> Vec<String> {
        serials_in_use(&self.daemon.log(), id)
    }

    /// The serials of our SVIDs with `id` now, from `/status`.
    pub async fn serials(&self, id: &str) -> Vec<String> {
        let status = self.status().await;
        status["identity"]["svids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["spiffe_id"] == id)
            .filter_map(|s| s["serial"].as_str().map(str::to_string))
            .collect()
    }

    /// The SPIFFE IDs of our SVIDs, from `/status`.
    pub async fn ids(&self) -> Vec<String> {
        let status = self.status().await;
        status["identity"]["svids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["spiffe_id"].as_str().map(str::to_string))
            .collect()
    }
}

/// An inbound (api, as `API_UID`) and an outbound (web, as `WEB_UID`) fed
/// by one agent, each with its own entry, in front of an echo target.
pub struct TunnelPair {
    pub target: Target,
    pub api: TunnelEnd,
    pub web: TunnelEnd,
    pub api_entry: String,
    pub web_entry: String,
}

impl TunnelPair {
    pub async fn start(spire: &Spire, ttl: Option<u64>) -> Self {
        let entry = |id: &str, uid: u32| {
            let e = spire.entry(id).uid(uid);
            match ttl {
                Some(ttl) => e.x509_ttl(ttl),
                None => e,
            }
        };
        let api_entry = spire.create_entry(&entry(API, API_UID)).await;
        let web_entry = spire.create_entry(&entry(WEB, WEB_UID)).await;
        spire.agent.wait_for_ids(API_UID, &[API], ISSUE).await;
        spire.agent.wait_for_ids(WEB_UID, &[WEB], ISSUE).await;
        let target = Target::start(TargetMode::Echo).await;
        let socket = spire.agent.address();
        let api =
            TunnelEnd::inbound(&socket, API_UID, target.addr, &[WEB], "access_log = true").await;
        let web =
            TunnelEnd::outbound(&socket, WEB_UID, api.listen, &[API], "access_log = true").await;
        Self {
            target,
            api,
            web,
            api_entry,
            web_entry,
        }
    }

    pub async fn roundtrip(&self, msg: &str) -> Result<(), String> {
        match roundtrip(self.web.listen, msg.as_bytes()).await {
            Ok(got) if got == msg.as_bytes() => Ok(()),
            Ok(got) => Err(format!("echo {:?}", String::from_utf8_lossy(&got))),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Rotations seen so far: (api, web).
    pub fn rotations(&self) -> (usize, usize) {
        (
            self.api.serials_seen(API).len().saturating_sub(1),
            self.web.serials_seen(WEB).len().saturating_sub(1),
        )
    }
}
