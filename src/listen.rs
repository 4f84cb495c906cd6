//! Where listening sockets come from: passed to us when the process
//! started, or bound here.
//!
//! Two kinds of parent pass listening sockets, by one convention (systemd's
//! `sd_listen_fds`): file descriptors from 3 on, their count in
//! `LISTEN_FDS`, a name for each in `LISTEN_FDNAMES` (colon-separated),
//! and `LISTEN_PID` naming the process they are meant for.
//!
//! - systemd socket activation: a `.socket` unit holds the sockets and
//!   passes them, each named by its `FileDescriptorName=`; a tunnel with
//!   `listen = "systemd:NAME"` takes the one named NAME.
//! - an upgrade (SIGUSR2, see [`crate::upgrade`]): the previous process
//!   passes every socket it listens on, a tunnel's own socket under
//!   `KIND/NAME` (`inbound/api`), the admin socket under
//!   `spiffe-tunnel/admin`, and a socket it got from systemd under the name
//!   systemd gave it. Here a tunnel that listens on `IP:port` takes the
//!   passed socket bound to that address, whatever its name, so a renamed
//!   tunnel or the admin endpoint keeps its port too; the name decides
//!   only for port 0, which the previous process bound to a port of the
//!   kernel's choosing.
//!
//! A socket no tunnel claims is closed once every tunnel has claimed its
//! own: an inherited socket that nobody accepts from would leave
//! connections waiting in its queue.
//!
//! The previous process cannot know its child's pid before the child runs,
//! and setting `LISTEN_PID` between fork and exec needs unsafe code, so an
//! upgrade leaves `LISTEN_PID` unset and sets `SPIFFE_TUNNEL_UPGRADE_PARENT`
//! to its own pid; sockets are taken only when that is our parent. Taking
//! ownership of a descriptor number is done by the `listenfd` crate, which
//! checks that the number is a stream socket of the right family first;
//! `socket2` then checks it listens. No unsafe code here.

use std::net::SocketAddr;
use std::os::unix::net::UnixStream;

use tokio::net::TcpListener;

use crate::config::ListenAddress;

/// Set by an upgrading process to its own pid, instead of `LISTEN_PID`.
pub const UPGRADE_PARENT_ENV: &str = "SPIFFE_TUNNEL_UPGRADE_PARENT";
/// The descriptor number of the readiness socket of an upgrade.
pub const READY_FD_ENV: &str = "SPIFFE_TUNNEL_READY_FD";
/// The name of the admin endpoint's socket in an upgrade.
pub const ADMIN_NAME: &str = "spiffe-tunnel/admin";
/// The name of the readiness socket in an upgrade.
pub const READY_NAME: &str = "spiffe-tunnel/ready";
/// The first passed descriptor, `SD_LISTEN_FDS_START`.
pub const FIRST_FD: i32 = 3;

/// Whether `name` is one that upgrades use for our own sockets, which a
/// `systemd:NAME` listen address may therefore not take.
pub fn is_reserved_name(name: &str) -> bool {
    ["inbound/", "outbound/", "spiffe-tunnel/"]
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// Who a listening socket is for, in messages and hand-over names.
#[derive(Debug, Clone, Copy)]
pub enum Owner<'a> {
    Tunnel { kind: &'a str, name: &'a str },
    Admin,
}

impl Owner<'_> {
    /// The name the socket is passed under in an upgrade, when we bound it.
    pub fn upgrade_name(&self) -> String {
        match self {
            Owner::Tunnel { kind, name } => format!("{kind}/{name}"),
            Owner::Admin => ADMIN_NAME.to_string(),
        }
    }
}

impl std::fmt::Display for Owner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Tunnel { kind, name } => write!(f, "{kind} tunnel {name:?}"),
            Owner::Admin => f.write_str("admin endpoint"),
        }
    }
}

/// Why a listening socket could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{owner}: cannot listen on {addr}: {source}")]
    Bind {
        owner: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{owner}: listen = \"systemd:{name}\", but no socket named {name:?} was passed at start-up ({passed})")]
    NotPassed {
        owner: String,
        name: String,
        passed: String,
    },
    #[error("{owner}: the socket passed as {name:?} cannot be used: {reason}")]
    Unusable {
        owner: String,
        name: String,
        reason: String,
    },
}

impl ListenError {
    /// A missing or unusable passed socket is a configuration error: the
    /// config and the unit do not match, and restarting cannot fix it.
    pub fn is_config(&self) -> bool {
        !matches!(self, ListenError::Bind { .. })
    }
}

/// One passed descriptor.
#[derive(Debug)]
struct Passed {
    fd: i32,
    name: String,
    /// `None` once claimed or closed.
    listener: Option<std::net::TcpListener>,
    local: Option<SocketAddr>,
}

/// The sockets passed to this process, until claimed.
#[derive(Debug, Default)]
pub struct Inherited {
    passed: Vec<Passed>,
    ready: Option<UnixStream>,
    from_upgrade: bool,
    /// What taking them found worth saying, for the log once it is set up.
    pub notes: Vec<String>,
}

impl Inherited {
    /// Nothing passed: every listener is bound.
    pub fn none() -> Self {
        Self::default()
    }

    /// Takes the sockets passed in the environment and removes the
    /// variables, so no process we start sees them. Call it at the start
    /// of `main`, before any other thread runs: it edits the environment.
    pub fn from_env() -> Self {
        let var = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        let count = var("LISTEN_FDS");
        let pid = var("LISTEN_PID");
        let names = var("LISTEN_FDNAMES");
        let parent = var(UPGRADE_PARENT_ENV);
        let ready_fd = var(READY_FD_ENV).and_then(|v| v.parse::<i32>().ok());
        let mut inherited = Self::default();
        let for_us = match (&pid, &parent) {
            (Some(pid), _) => pid.parse::<u32>().ok() == Some(std::process::id()),
            (None, Some(parent)) => {
                inherited.from_upgrade =
                    parent.parse::<u32>().ok() == Some(std::os::unix::process::parent_id());
                inherited.from_upgrade
            }
            (None, None) => false,
        };
        if count.is_some() && !for_us {
            inherited.notes.push(format!(
                "LISTEN_FDS is set but the sockets are not meant for this process (LISTEN_PID {}, {UPGRADE_PARENT_ENV} {}): ignored",
                pid.as_deref().unwrap_or("unset"),
                parent.as_deref().unwrap_or("unset"),
            ));
        }
        if count.is_some() && for_us {
            // listenfd takes LISTEN_FDS and LISTEN_PID out of the environment.
            let mut fds = listenfd::ListenFd::from_env();
            let names: Vec<&str> = names.as_deref().unwrap_or("").split(':').collect();
            for index in 0..fds.len() {
                let fd = FIRST_FD + index as i32;
                let name = names.get(index).copied().unwrap_or("unknown").to_string();
                if Some(fd) == ready_fd && inherited.from_upgrade {
                    inherited.ready = take_stream(&mut fds, index);
                    continue;
                }
                match take_listener(&mut fds, index) {
                    Ok(listener) => {
                        let local = listener.local_addr().ok();
                        inherited.passed.push(Passed {
                            fd,
                            name,
                            listener: Some(listener),
                            local,
                        });
                    }
                    Err(reason) => inherited.notes.push(format!(
                        "passed socket {name:?} (fd {fd}) is ignored: {reason}"
                    )),
                }
            }
        }
        for key in [
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            UPGRADE_PARENT_ENV,
            READY_FD_ENV,
        ] {
            std::env::remove_var(key);
        }
        inherited
    }

    /// Whether the sockets came from a previous spiffe-tunnel process.
    pub fn from_upgrade(&self) -> bool {
        self.from_upgrade
    }

    /// The readiness socket of an upgrade, once.
    pub fn take_ready(&mut self) -> Option<UnixStream> {
        self.ready.take()
    }

    /// The names of every socket passed at start-up, for messages.
    fn names(&self) -> String {
        if self.passed.is_empty() {
            "none was: LISTEN_FDS was not set for this process".to_string()
        } else {
            let names: Vec<String> = self
                .passed
                .iter()
                .map(|p| format!("{:?}", p.name))
                .collect();
            format!("passed: {}", names.join(", "))
        }
    }

    fn take(&mut self, pick: impl Fn(&Passed) -> bool) -> Option<std::net::TcpListener> {
        self.passed
            .iter_mut()
            .find(|p| p.listener.is_some() && pick(p))
            .and_then(|p| p.listener.take())
    }

    /// Takes the socket for `address`: the passed one when there is one,
    /// else (`IP:port`) a newly bound one.
    pub async fn acquire(
        &mut self,
        address: &ListenAddress,
        owner: Owner<'_>,
    ) -> Result<TcpListener, ListenError> {
        let unusable = |reason| ListenError::Unusable {
            owner: owner.to_string(),
            name: address.to_string(),
            reason,
        };
        match address {
            ListenAddress::Systemd(name) => {
                let passed =
                    self.take(|p| p.name == *name)
                        .ok_or_else(|| ListenError::NotPassed {
                            owner: owner.to_string(),
                            name: name.clone(),
                            passed: self.names(),
                        })?;
                adopt(passed).map_err(unusable)
            }
            ListenAddress::Tcp(addr) => {
                let upgrade_name = owner.upgrade_name();
                let passed = self.take(|p| {
                    p.local == Some(*addr)
                        || (addr.port() == 0
                            && p.name == upgrade_name
                            && p.local.map(|l| l.ip()) == Some(addr.ip()))
                });
                match passed {
                    Some(passed) => adopt(passed).map_err(unusable),
                    None => TcpListener::bind(addr)
                        .await
                        .map_err(|source| ListenError::Bind {
                            owner: owner.to_string(),
                            addr: *addr,
                            source,
                        }),
                }
            }
        }
    }

    /// Closes every passed socket that no one claimed; returns a line for
    /// each, for the log.
    pub fn close_unclaimed(&mut self) -> Vec<String> {
        let mut closed = Vec::new();
        for p in &mut self.passed {
            if p.listener.take().is_some() {
                let at = p.local.map_or_else(String::new, |a| format!(" on {a}"));
                closed.push(format!(
                    "passed socket {:?} (fd {}{at}) is used by no tunnel; closed",
                    p.name, p.fd
                ));
            }
        }
        if let Some(ready) = self.ready.take() {
            drop(ready);
        }
        closed
    }
}

/// Makes a passed socket ours: it must be listening, and non-blocking for
/// tokio.
fn adopt(listener: std::net::TcpListener) -> Result<TcpListener, String> {
    let socket = socket2::Socket::from(listener);
    match socket.is_listener() {
        Ok(true) => {}
        Ok(false) => {
            return Err(
                "it is not listening (a unit with Accept=yes passes connections, not listeners)"
                    .to_string(),
            )
        }
        Err(e) => return Err(e.to_string()),
    }
    let listener = std::net::TcpListener::from(socket);
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    TcpListener::from_std(listener).map_err(|e| e.to_string())
}

/// Takes a passed TCP socket. Another kind of socket is taken too and
/// dropped (closed), so it does not linger unused.
fn take_listener(
    fds: &mut listenfd::ListenFd,
    index: usize,
) -> Result<std::net::TcpListener, String> {
    match fds.take_tcp_listener(index) {
        Ok(Some(listener)) => Ok(listener),
        Ok(None) => Err("already taken".to_string()),
        Err(tcp_error) => {
            if let Ok(Some(_)) = fds.take_unix_listener(index) {
                return Err("it is a unix socket; only TCP listeners are supported".to_string());
            }
            if let Ok(Some(_)) = fds.take_udp_socket(index) {
                return Err("it is a UDP socket; only TCP listeners are supported".to_string());
            }
            Err(tcp_error.to_string())
        }
    }
}

/// Takes the readiness socket of an upgrade: a connected unix stream
/// socket. listenfd checks family and type (which a listener and a
/// connected socket share); the descriptor is then used as a stream.
fn take_stream(fds: &mut listenfd::ListenFd, index: usize) -> Option<UnixStream> {
    let socket = fds.take_unix_listener(index).ok()??;
    Some(UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}
