//! Who opened a connection to an outbound with `present = "caller"`: the
//! local user, and the process when it can be found, as the kernel tells
//! it. Never what the client says about itself.
//!
//! - A TCP connection must come from loopback. The kernel's sock_diag
//!   lookup of the exact 4-tuple of the client's own socket (its address
//!   is our peer, its peer is our local address) gives the socket's owner
//!   uid and its inode. The process is the one with a descriptor for that
//!   inode (`/proc/PID/fd/* -> socket:[INODE]`), looked for among the
//!   owner's processes, those that connected recently first; reading other
//!   users' descriptors needs root (or CAP_SYS_PTRACE), so without it the
//!   caller is known by uid only.
//! - A unix connection: SO_PEERCRED, the credentials the kernel recorded
//!   when the client called connect().
//!
//! A connection from another host, or one whose owner cannot be found (the
//! client closed its socket before we asked), is refused by the caller of
//! this module; it never falls back to our own identity.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, PoisonError};

use super::send_queue::SendQueueProbe;
use crate::identity::delegated::{Caller, ProcessId};

/// Processes remembered per uid, as the first places to look for the next
/// connection of that user.
const RECENT_PER_UID: usize = 8;
/// Users with remembered processes at most.
const RECENT_UIDS: usize = 1024;

/// Why a connection's caller is unknown.
#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    #[error("the connection comes from {0}, not from this host: present = \"caller\" serves local processes only")]
    Remote(SocketAddr),
    #[error("no local socket {peer} -> {local} found (the client closed it, or it lives in another network namespace)")]
    NotFound { peer: SocketAddr, local: SocketAddr },
    #[error("cannot ask the kernel who owns the client socket: {0}")]
    Lookup(#[source] io::Error),
    #[error("cannot read the peer credentials of the unix connection: {0}")]
    PeerCred(#[source] io::Error),
}

/// Finds the callers of one outbound's connections.
#[derive(Debug, Default)]
pub struct CallerFinder {
    /// Per uid, pids that owned a caller socket lately, newest first.
    recent: Mutex<HashMap<u32, Vec<i32>>>,
}

impl CallerFinder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The owner of the loopback TCP connection whose client end is `peer`
    /// and whose accepted end (ours) is `local`. Blocking: run it off the
    /// async workers.
    pub fn tcp(&self, peer: SocketAddr, local: SocketAddr) -> Result<Caller, CallerError> {
        if !peer.ip().is_loopback() {
            return Err(CallerError::Remote(peer));
        }
        let mut probe = SendQueueProbe::new().map_err(CallerError::Lookup)?;
        // The client's socket: its own address is our peer.
        let found = probe
            .lookup(peer, local)
            .map_err(CallerError::Lookup)?
            // Only a socket that still has its file tells its owner: once
            // the client closed it (TIME_WAIT, or orphaned while closing)
            // the kernel reports inode 0 and uid 0, which must never pass
            // for root.
            .filter(|s| {
                s.inode != 0
                    && s.socket_id.source_address == peer.ip()
                    && s.socket_id.destination_address == local.ip()
                    && s.socket_id.source_port == peer.port()
            })
            .ok_or(CallerError::NotFound { peer, local })?;
        let uid = found.uid;
        let process = self.process_of_socket(uid, found.inode);
        Ok(Caller { uid, process })
    }

    /// The caller of a unix connection, from SO_PEERCRED.
    pub fn unix(stream: &tokio::net::UnixStream) -> Result<Caller, CallerError> {
        let cred = stream.peer_cred().map_err(CallerError::PeerCred)?;
        Ok(Caller {
            uid: cred.uid(),
            process: cred.pid().filter(|&p| p > 0).and_then(ProcessId::read),
        })
    }

    /// The process of `uid` holding the socket `inode`, if one can be seen.
    fn process_of_socket(&self, uid: u32, inode: u32) -> Option<ProcessId> {
        let target = format!("socket:[{inode}]");
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&uid)
            .cloned()
            .unwrap_or_default();
        let pid = recent
            .iter()
            .copied()
            .find(|&pid| holds(pid, &target))
            .or_else(|| {
                std::fs::read_dir("/proc")
                    .ok()?
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                    .filter(|pid| !recent.contains(pid))
                    .filter(|pid| {
                        std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == uid)
                    })
                    .find(|&pid| holds(pid, &target))
            })?;
        let process = ProcessId::read(pid)?;
        // Check again: the descriptor was seen before the start time was
        // read, and the pid might have changed hands in between.
        if !holds(pid, &target) {
            return None;
        }
        self.remember(uid, pid);
        Some(process)
    }

    fn remember(&self, uid: u32, pid: i32) {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() >= RECENT_UIDS && !recent.contains_key(&uid) {
            recent.clear();
        }
        let pids = recent.entry(uid).or_default();
        pids.retain(|&p| p != pid);
        pids.insert(0, pid);
        pids.truncate(RECENT_PER_UID);
    }
}

/// Whether process `pid` has a descriptor whose link reads `target`.
fn holds(pid: i32, target: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loopback_client_is_this_process_and_its_user() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, peer) = listener.accept().await.unwrap();
        let local = server.local_addr().unwrap();
        let finder = CallerFinder::new();
        let caller = finder.tcp(peer, local).unwrap();
        assert_eq!(caller.uid, nix_uid());
        // The tests run as root here, so the process is always visible.
        if caller.uid == 0 {
            assert_eq!(caller.pid(), Some(std::process::id() as i32));
        }
        // Once the client is gone, the lookup finds nothing (never our
        // own listener or accepted socket standing in for it).
        drop(client);
        drop(server);
        let mut gone = false;
        for _ in 0..200 {
            if matches!(finder.tcp(peer, local), Err(CallerError::NotFound { .. })) {
                gone = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(gone, "a closed client socket must not be found");
    }

    #[test]
    fn a_remote_peer_is_refused_without_a_lookup() {
        let finder = CallerFinder::new();
        let err = finder
            .tcp(
                "10.1.2.3:40000".parse().unwrap(),
                "10.1.2.4:8080".parse().unwrap(),
            )
            .unwrap_err();
        assert!(matches!(err, CallerError::Remote(_)), "{err}");
    }

    #[tokio::test]
    async fn a_unix_client_is_known_by_its_peer_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let caller = CallerFinder::unix(&server).unwrap();
        assert_eq!(caller.uid, nix_uid());
        assert_eq!(caller.pid(), Some(std::process::id() as i32));
    }

    fn nix_uid() -> u32 {
        std::fs::metadata("/proc/self").unwrap().uid()
    }
}
