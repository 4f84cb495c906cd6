#![allow(dead_code)]
//! One `spiffe-tunnel run` process with a file identity and an admin
//! endpoint, the setup most single-daemon tests need: its folder, config,
//! admin address and log, and the TOML of the tunnels it runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::certs::Leaf;
use super::harness::{free_addr, Daemon};

/// A daemon with `svid.pem`, `svid.key` and `bundle.pem` in its folder.
pub struct FileNode {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub admin: SocketAddr,
    pub daemon: Daemon,
}

impl FileNode {
    /// Writes `leaf`'s files into `dir` and starts a daemon running
    /// `tunnels` (TOML); `defaults` holds more `[defaults]` keys.
    pub async fn start(dir: &Path, leaf: &Leaf, defaults: &str, tunnels: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        leaf.write_files(dir);
        let admin = free_addr();
        let config = dir.join("tunnel.toml");
        std::fs::write(&config, config_text(admin, defaults, tunnels)).unwrap();
        let daemon = Daemon::run(&config);
        daemon.wait_running().await;
        Self {
            dir: dir.to_path_buf(),
            config,
            admin,
            daemon,
        }
    }

    /// Rewrites the config with other tunnels (same identity and admin)
    /// and reloads it with SIGHUP, waiting for the reload's log line.
    pub async fn reload(&self, defaults: &str, tunnels: &str) {
        let before = self.daemon.log().matches("reloaded: ").count();
        std::fs::write(&self.config, config_text(self.admin, defaults, tunnels)).unwrap();
        self.daemon.signal("HUP");
        self.daemon
            .wait_log("reloaded: ", before + 1, Duration::from_secs(10))
            .await;
    }
}

fn config_text(admin: SocketAddr, defaults: &str, tunnels: &str) -> String {
    format!(
        "[identity]\nsource = \"files\"\ncert = \"svid.pem\"\nkey = \"svid.key\"\n\
         [identity.bundles]\n\"example.org\" = \"bundle.pem\"\n\
         [admin]\nlisten = \"{admin}\"\n[defaults]\ndrain_timeout = \"5s\"\n{defaults}\n{tunnels}"
    )
}

/// The TOML of an inbound tunnel; `allow` is the inside of the list.
pub fn inbound(name: &str, listen: SocketAddr, target: &str, allow: &str, extra: &str) -> String {
    format!(
        "[[inbound]]\nname = \"{name}\"\nlisten = \"{listen}\"\ntarget = \"{target}\"\nallow = [{allow}]\n{extra}\n"
    )
}

/// The TOML of an outbound tunnel; `allow` is the inside of the list.
pub fn outbound(
    name: &str,
    listen: SocketAddr,
    upstream: SocketAddr,
    allow: &str,
    extra: &str,
) -> String {
    format!(
        "[[outbound]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstreams = [\"{upstream}\"]\nallow = [{allow}]\n{extra}\n"
    )
}
