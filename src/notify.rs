//! systemd service notifications (the `sd_notify` protocol), without
//! libsystemd.
//!
//! Under `Type=notify` systemd starts `run`, passes the address of its
//! notification socket in `NOTIFY_SOCKET`, and waits for `READY=1` before it
//! starts the units ordered after ours. Telling it `RELOADING=1` on SIGHUP and
//! `STOPPING=1` on SIGTERM lets `systemctl status` and dependent units see
//! what the daemon is doing, and `STATUS=` puts a human line in
//! `systemctl status`. This module owns only the wire protocol: one text
//! datagram per notification, `KEY=VALUE` lines, sent from an unbound
//! `AF_UNIX` datagram socket to the path in `NOTIFY_SOCKET` (or to the
//! abstract name after `@`). The protocol is documented as stable by systemd,
//! so it needs neither libsystemd nor `unsafe` code; `vsock:` addresses
//! (systemd 254+, for VMs) are not supported and are reported once.
//!
//! `RELOADING=1` carries `MONOTONIC_USEC=` (the sender's `CLOCK_MONOTONIC`
//! time, read through `nix`'s safe `clock_gettime`). `Type=notify-reload`
//! (systemd 253+) needs it to tell the reload it asked for from an older
//! one; older systemd and `Type=notify` ignore it. The unit in
//! `deploy/systemd/` stays `Type=notify` (see its comments and
//! docs/operations.md for why and for the `notify-reload` drop-in).
//!
//! Why ours and not the `sd-notify` crate (0.5): that crate `connect()`s to
//! `NOTIFY_SOCKET` as a filesystem path, so an `@abstract` address (which
//! systemd and container managers hand out) is taken as a file called `@...`
//! and never reached; it reads the environment and opens a new socket on
//! every call, has no send timeout, and passes a `STATUS=` with a newline
//! through, which would smuggle another assignment. Its `MONOTONIC_USEC`
//! helper is one `clock_gettime` call that `nix` (already a dependency) gives
//! us without `unsafe`. What is left here is ~100 lines of a protocol
//! systemd documents as stable.
//!
//! Notifications are best effort: a daemon that cannot reach systemd keeps
//! serving. The first failed send is logged at warn, later ones at debug, so
//! a broken socket cannot flood the log.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{debug, warn};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// How long one send may block. systemd drains its socket continuously and
/// gives it a large buffer, so a send takes microseconds; the bound only
/// keeps a wedged service manager from stalling the caller.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a notification socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` is neither an absolute path nor `@abstract-name`.
    #[error(
        "NOTIFY_SOCKET {0:?} is not supported (expected an absolute socket path or @abstract-name)"
    )]
    Unsupported(String),
    /// The address could not be turned into a socket address (too long, NUL byte).
    #[error("NOTIFY_SOCKET {address:?}: {source}")]
    Address {
        address: String,
        #[source]
        source: io::Error,
    },
    /// The local datagram socket could not be created.
    #[error("cannot create a socket for NOTIFY_SOCKET {address:?}: {source}")]
    Socket {
        address: String,
        #[source]
        source: io::Error,
    },
}

/// Where `NOTIFY_SOCKET` points, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddress {
    /// A socket file, `/run/systemd/notify` for system services.
    Path(PathBuf),
    /// A Linux abstract socket: `@name` in the variable, `name` here.
    Abstract(Vec<u8>),
}

impl NotifyAddress {
    /// Parses the value of `NOTIFY_SOCKET` the way `sd_notify` does: an
    /// absolute path, or `@` followed by an abstract socket name.
    pub fn parse(value: &std::ffi::OsStr) -> Result<Self, NotifyError> {
        let bytes = value.as_bytes();
        match bytes.first() {
            Some(b'/') => Ok(NotifyAddress::Path(PathBuf::from(value))),
            Some(b'@') if bytes.len() > 1 => Ok(NotifyAddress::Abstract(bytes[1..].to_vec())),
            _ => Err(NotifyError::Unsupported(
                value.to_string_lossy().into_owned(),
            )),
        }
    }

    fn socket_addr(&self) -> io::Result<SocketAddr> {
        match self {
            NotifyAddress::Path(path) => SocketAddr::from_pathname(path),
            NotifyAddress::Abstract(name) => abstract_addr(name),
        }
    }
}

impl std::fmt::Display for NotifyAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotifyAddress::Path(path) => write!(f, "{}", path.display()),
            NotifyAddress::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract unix sockets exist only on Linux",
    ))
}

/// A connection to the service manager's notification socket.
///
/// Cheap to call from async code: each notification is one non-fragmented
/// datagram on a local socket. `Notifier` is `Send + Sync`; share it with an
/// `Arc` if several tasks notify.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    target: SocketAddr,
    address: NotifyAddress,
    warned: AtomicBool,
}

impl Notifier {
    /// The notifier systemd asked for, or `None` when `NOTIFY_SOCKET` is
    /// unset or empty (not started by systemd, or not `Type=notify`). An
    /// address that cannot be used is logged at warn and also gives `None`:
    /// the daemon runs the same either way.
    pub fn from_env() -> Option<Notifier> {
        from_env_value(std::env::var_os(NOTIFY_SOCKET))
    }

    /// A notifier for a socket file, whatever the environment says (tests,
    /// or an embedding program that knows its supervisor's socket).
    pub fn for_path(path: impl AsRef<Path>) -> Result<Notifier, NotifyError> {
        Self::for_address(NotifyAddress::Path(path.as_ref().to_path_buf()))
    }

    /// A notifier for a parsed `NOTIFY_SOCKET` address.
    pub fn for_address(address: NotifyAddress) -> Result<Notifier, NotifyError> {
        let target = address
            .socket_addr()
            .map_err(|source| NotifyError::Address {
                address: address.to_string(),
                source,
            })?;
        let socket = UnixDatagram::unbound()
            .and_then(|s| s.set_write_timeout(Some(SEND_TIMEOUT)).map(|()| s))
            .map_err(|source| NotifyError::Socket {
                address: address.to_string(),
                source,
            })?;
        Ok(Notifier {
            socket,
            target,
            address,
            warned: AtomicBool::new(false),
        })
    }

    /// Where notifications go.
    pub fn address(&self) -> &NotifyAddress {
        &self.address
    }

    /// Startup is complete: listeners are bound and an SVID is held.
    /// `MAINPID` names this process, so systemd tracks the right PID even
    /// when `run` was started through a wrapper.
    pub fn ready(&self, status: &str) {
        self.send(&format!(
            "READY=1\nSTATUS={}\nMAINPID={}",
            one_line(status),
            std::process::id()
        ));
    }

    /// A reload (SIGHUP) has started; [`Notifier::reloaded`] must follow.
    /// `MONOTONIC_USEC=` lets `Type=notify-reload` match this to the signal
    /// it sent; if the clock cannot be read (it always can on Linux) the
    /// plain `RELOADING=1` still serves `Type=notify`.
    pub fn reloading(&self) {
        match monotonic_usec() {
            Some(usec) => self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}")),
            None => self.send("RELOADING=1"),
        };
    }

    /// The reload finished, whether the new config was taken or refused
    /// (a refused reload leaves the old config running, which is ready).
    pub fn reloaded(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// Shutdown has begun (SIGTERM/SIGINT): draining live connections.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// A free-form status line for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// Sends one notification; failures are logged (once at warn) and
    /// otherwise ignored. Returns whether the datagram went out.
    fn send(&self, message: &str) -> bool {
        match self.socket.send_to_addr(message.as_bytes(), &self.target) {
            Ok(_) => true,
            Err(e) => {
                if self.warned.swap(true, Ordering::Relaxed) {
                    debug!(socket = %self.address, error = %e, "systemd notification not delivered");
                } else {
                    warn!(
                        socket = %self.address,
                        error = %e,
                        "cannot notify systemd; carrying on without it (further failures are logged at debug)"
                    );
                }
                false
            }
        }
    }
}

/// [`Notifier::from_env`] on a given value of `NOTIFY_SOCKET`.
fn from_env_value(value: Option<OsString>) -> Option<Notifier> {
    let value = value.filter(|v| !v.is_empty())?;
    match NotifyAddress::parse(&value).and_then(Notifier::for_address) {
        Ok(notifier) => Some(notifier),
        Err(e) => {
            warn!(error = %e, "systemd notifications disabled");
            None
        }
    }
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares
/// `MONOTONIC_USEC=` against.
fn monotonic_usec() -> Option<u128> {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .ok()
        .map(|t| Duration::from(t).as_micros())
}

/// A status must stay on one line: a newline would start another
/// `KEY=VALUE` assignment in the datagram.
fn one_line(status: &str) -> String {
    status.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    /// A fake service manager: a bound datagram socket in a private folder.
    struct FakeSystemd {
        _dir: tempfile::TempDir,
        path: PathBuf,
        socket: UnixDatagram,
    }

    impl FakeSystemd {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("notify.sock");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            FakeSystemd {
                _dir: dir,
                path,
                socket,
            }
        }

        fn recv(&self) -> String {
            let mut buf = [0u8; 4096];
            let n = self.socket.recv(&mut buf).unwrap();
            String::from_utf8(buf[..n].to_vec()).unwrap()
        }
    }

    #[test]
    fn sends_the_exact_datagrams() {
        let systemd = FakeSystemd::new();
        let notifier = Notifier::for_path(&systemd.path).unwrap();

        notifier.ready("serving 2 tunnels");
        assert_eq!(
            systemd.recv(),
            format!(
                "READY=1\nSTATUS=serving 2 tunnels\nMAINPID={}",
                std::process::id()
            )
        );
        let before = monotonic_usec().unwrap();
        notifier.reloading();
        let reloading = systemd.recv();
        let after = monotonic_usec().unwrap();
        let usec: u128 = reloading
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap_or_else(|| panic!("unexpected reloading datagram {reloading:?}"))
            .parse()
            .unwrap();
        assert!(
            (before..=after).contains(&usec),
            "MONOTONIC_USEC={usec} is not CLOCK_MONOTONIC (between {before} and {after})"
        );
        notifier.reloaded("reloaded: 3 tunnels");
        assert_eq!(systemd.recv(), "READY=1\nSTATUS=reloaded: 3 tunnels");
        notifier.status("waiting for an SVID");
        assert_eq!(systemd.recv(), "STATUS=waiting for an SVID");
        notifier.stopping();
        assert_eq!(systemd.recv(), "STOPPING=1");
    }

    #[test]
    fn a_status_cannot_smuggle_another_assignment() {
        let systemd = FakeSystemd::new();
        let notifier = Notifier::for_path(&systemd.path).unwrap();
        notifier.status("bad\nREADY=1\r\nx");
        assert_eq!(systemd.recv(), "STATUS=bad READY=1  x");
    }

    #[test]
    fn a_missing_socket_is_ignored_and_warned_about_once() {
        let dir = tempfile::tempdir().unwrap();
        let notifier = Notifier::for_path(dir.path().join("nobody-listens.sock")).unwrap();
        assert!(!notifier.warned.load(Ordering::Relaxed));
        assert!(!notifier.send("READY=1"));
        assert!(notifier.warned.load(Ordering::Relaxed));
        // Later failures neither panic nor reset the flag.
        notifier.ready("x");
        notifier.stopping();
        assert!(notifier.warned.load(Ordering::Relaxed));
    }

    #[test]
    fn parses_paths_and_abstract_names() {
        assert_eq!(
            NotifyAddress::parse(OsStr::new("/run/systemd/notify")).unwrap(),
            NotifyAddress::Path(PathBuf::from("/run/systemd/notify"))
        );
        assert_eq!(
            NotifyAddress::parse(OsStr::new("@/org/freedesktop/systemd1/notify/42")).unwrap(),
            NotifyAddress::Abstract(b"/org/freedesktop/systemd1/notify/42".to_vec())
        );
        for bad in ["", "@", "relative/notify.sock", "vsock:2:1234"] {
            assert!(
                matches!(
                    NotifyAddress::parse(OsStr::new(bad)),
                    Err(NotifyError::Unsupported(_))
                ),
                "{bad:?} should be refused"
            );
        }
        assert_eq!(NotifyAddress::Abstract(b"x/y".to_vec()).to_string(), "@x/y");
    }

    #[test]
    fn environment_values() {
        assert!(from_env_value(None).is_none());
        assert!(from_env_value(Some(OsString::new())).is_none());
        assert!(from_env_value(Some("not/absolute".into())).is_none());
        let long = format!("/{}", "x".repeat(200)); // longer than sun_path
        assert!(from_env_value(Some(long.into())).is_none());
        let notifier = from_env_value(Some("/run/systemd/notify".into())).unwrap();
        assert_eq!(
            notifier.address(),
            &NotifyAddress::Path(PathBuf::from("/run/systemd/notify"))
        );
        let notifier = from_env_value(Some("@systemd-notify".into())).unwrap();
        assert_eq!(
            notifier.address(),
            &NotifyAddress::Abstract(b"systemd-notify".to_vec())
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("spiffe-tunnel-notify-test-{}", std::process::id());
        let systemd =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        systemd
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let notifier = from_env_value(Some(format!("@{name}").into())).unwrap();
        notifier.stopping();
        let mut buf = [0u8; 64];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
