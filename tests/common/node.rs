#![allow(dead_code)]
//! One `spiffe-tunnel run` process with an admin endpoint, the setup most
//! single-daemon tests need: its folder, config, admin address and log, and
//! the TOML of the tunnels it runs. Its identity comes from files (a
//! [`Leaf`] written into its folder) or from a Workload API socket; the
//! [`Pair`](super::pair::Pair) builder starts two of them facing each other.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::certs::Leaf;
use super::harness::{free_addr, Daemon};

/// A running daemon and what a test needs to talk to it or reconfigure it.
pub struct Node {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub admin: SocketAddr,
    pub daemon: Daemon,
    /// The `[identity]` tables, kept so that a rewritten config keeps them.
    identity: String,
}

/// The name most tests know it by: a node with a file identity.
pub type FileNode = Node;

/// The `[identity]` tables of a file identity as [`Leaf::write_files`]
/// lays it out.
pub const FILES_IDENTITY: &str =
    "[identity]\nsource = \"files\"\ncert = \"svid.pem\"\nkey = \"svid.key\"\n\
     [identity.bundles]\n\"example.org\" = \"bundle.pem\"\n";

/// The `[identity]` table of a Workload API identity at `socket`.
pub fn workload_api_identity(socket: &Path) -> String {
    format!(
        "[identity]\nsource = \"workload_api\"\nsocket = \"unix://{}\"\nstartup_timeout = \"20s\"\n",
        socket.display()
    )
}

impl Node {
    /// Writes `leaf`'s files into `dir` and starts a daemon running
    /// `tunnels` (TOML); `defaults` holds more `[defaults]` keys.
    pub async fn start(dir: &Path, leaf: &Leaf, defaults: &str, tunnels: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        leaf.write_files(dir);
        Self::with_identity(dir, FILES_IDENTITY, defaults, tunnels).await
    }

    /// A daemon in `dir` taking its SVIDs from the Workload API at `socket`.
    pub async fn workload_api(dir: &Path, socket: &Path, defaults: &str, tunnels: &str) -> Self {
        Self::with_identity(dir, &workload_api_identity(socket), defaults, tunnels).await
    }

    /// A daemon in `dir` with the given `[identity]` tables.
    pub async fn with_identity(dir: &Path, identity: &str, defaults: &str, tunnels: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let admin = free_addr();
        let config = dir.join("tunnel.toml");
        std::fs::write(&config, config_text(identity, admin, defaults, tunnels)).unwrap();
        let daemon = Daemon::run(&config);
        daemon.wait_running().await;
        Self {
            dir: dir.to_path_buf(),
            config,
            admin,
            daemon,
            identity: identity.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// A scrape of its `/metrics`.
    pub async fn metrics(&self) -> String {
        super::probe::metrics(self.admin).await
    }

    /// Rewrites the config with other tunnels (same identity and admin),
    /// without telling the daemon.
    pub fn write_config(&self, defaults: &str, tunnels: &str) {
        std::fs::write(
            &self.config,
            config_text(&self.identity, self.admin, defaults, tunnels),
        )
        .unwrap();
    }

    /// Rewrites the config with other tunnels (same identity and admin)
    /// and reloads it with SIGHUP, waiting for the reload's log line.
    pub async fn reload(&self, defaults: &str, tunnels: &str) {
        let before = self.daemon.log().matches("reloaded: ").count();
        self.write_config(defaults, tunnels);
        self.daemon.signal("HUP");
        self.daemon
            .wait_log("reloaded: ", before + 1, Duration::from_secs(10))
            .await;
    }
}

fn config_text(identity: &str, admin: SocketAddr, defaults: &str, tunnels: &str) -> String {
    format!(
        "{identity}[admin]\nlisten = \"{admin}\"\n[defaults]\ndrain_timeout = \"5s\"\n{defaults}\n{tunnels}"
    )
}

/// The TOML of an inbound tunnel; `allow` is the inside of the list.
pub fn inbound(
    name: &str,
    listen: SocketAddr,
    target: impl Display,
    allow: &str,
    extra: &str,
) -> String {
    format!(
        "[[inbound]]\nname = \"{name}\"\nlisten = \"{listen}\"\ntarget = \"{target}\"\nallow = [{allow}]\n{extra}\n"
    )
}

/// The TOML of an outbound tunnel; `allow` is the inside of the list.
pub fn outbound(
    name: &str,
    listen: SocketAddr,
    upstream: impl Display,
    allow: &str,
    extra: &str,
) -> String {
    format!(
        "[[outbound]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstreams = [\"{upstream}\"]\nallow = [{allow}]\n{extra}\n"
    )
}

/// The inside of an `allow` list naming exactly `id`.
pub fn only(id: &str) -> String {
    format!("{id:?}")
}
