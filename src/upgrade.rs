//! Upgrades in place (SIGUSR2): the binary now at our own path is started
//! with our listening sockets, and once it is ready we stop accepting.
//!
//! The old process ([`Upgrader`]) records its executable's path at
//! start-up, as `/proc/self/exe` names it then. Starting that path later
//! runs what is on disk now, the new version after a package upgrade;
//! executing `/proc/self/exe` itself would run the old, unlinked inode. The
//! child gets the same arguments and environment, every listening socket
//! at descriptors 3.. (`LISTEN_FDS`, `LISTEN_FDNAMES`: see [`crate::listen`])
//! and one end of a unix socket pair, the readiness socket.
//!
//! On the readiness socket the child writes text lines: `log LINE` for
//! each log line it writes to its stderr until it is ready (so the old
//! process can quote the last ones if the child fails; the child's stderr
//! is the old process's own, so nothing breaks when the old process exits),
//! then `ready PID`. Nothing secret goes over it: session ticket keys are
//! not handed over, so a client resuming a session of the old process gets
//! a full handshake from the new one.
//!
//! Until `ready` arrives the old process accepts as before; the child has
//! claimed the sockets but starts accepting only once it holds an
//! identity, just before it says ready. A child that exits or says nothing
//! within the deadline is a failed upgrade: the old process logs its exit
//! status and last lines, counts it, and carries on.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use tokio::io::AsyncBufReadExt;

use crate::listen::{FIRST_FD, READY_FD_ENV, READY_NAME, UPGRADE_PARENT_ENV};

/// How many of the child's last log lines a failure report quotes.
const LAST_LINES: usize = 8;
/// How long a child told to stop may take before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Why a new process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot start {}: {source}", .exe.display())]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot pass the listening sockets: {0}")]
    Sockets(String),
}

/// What the old process needs to start its successor.
#[derive(Debug, Clone)]
pub struct Upgrader {
    exe: PathBuf,
    args: Vec<OsString>,
}

impl Upgrader {
    /// Records this process's executable path and arguments. Call it at
    /// start-up, while `/proc/self/exe` still names the path (after a
    /// package upgrade replaces the file, it reads "PATH (deleted)").
    pub fn from_current_process() -> Self {
        let exe = std::fs::read_link("/proc/self/exe")
            .or_else(|_| std::env::current_exe())
            .map(|path| strip_deleted(&path))
            .unwrap_or_else(|_| PathBuf::from(std::env::args_os().next().unwrap_or_default()));
        Self {
            exe,
            args: std::env::args_os().skip(1).collect(),
        }
    }

    /// The path a SIGUSR2 starts.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// Starts the new process with `sockets` (name, descriptor) at 3...
    pub fn spawn(&self, sockets: Vec<(String, OwnedFd)>) -> Result<Child, UpgradeError> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| UpgradeError::Sockets(e.to_string()))?;
        let ready_fd = FIRST_FD + sockets.len() as i32;
        let mut names: Vec<String> = Vec::new();
        let mut mappings = Vec::new();
        for (i, (name, fd)) in sockets.into_iter().enumerate() {
            names.push(name);
            mappings.push(FdMapping {
                parent_fd: fd,
                child_fd: FIRST_FD + i as i32,
            });
        }
        names.push(READY_NAME.to_string());
        mappings.push(FdMapping {
            parent_fd: OwnedFd::from(theirs),
            child_fd: ready_fd,
        });
        let mut command = std::process::Command::new(&self.exe);
        command
            .args(&self.args)
            .env("LISTEN_FDS", names.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .env(READY_FD_ENV, ready_fd.to_string())
            .env(UPGRADE_PARENT_ENV, std::process::id().to_string())
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null());
        command
            .fd_mappings(mappings)
            .map_err(|e| UpgradeError::Sockets(e.to_string()))?;
        // The command holds our copies of the descriptors; dropping it
        // after the spawn closes them here (the child has its own).
        let process = tokio::process::Command::from(command)
            .spawn()
            .map_err(|source| UpgradeError::Spawn {
                exe: self.exe.clone(),
                source,
            })?;
        let pid = process.id().unwrap_or_default();
        ours.set_nonblocking(true)
            .map_err(|e| UpgradeError::Sockets(e.to_string()))?;
        let ready = tokio::net::UnixStream::from_std(ours)
            .map_err(|e| UpgradeError::Sockets(e.to_string()))?;
        Ok(Child {
            process,
            pid,
            ready,
        })
    }
}

/// `/proc/self/exe` of a process whose file was replaced reads
/// "PATH (deleted)"; the path is what we want.
fn strip_deleted(path: &Path) -> PathBuf {
    let text = path.as_os_str().to_string_lossy();
    match text.strip_suffix(" (deleted)") {
        Some(stripped) => PathBuf::from(stripped),
        None => path.to_path_buf(),
    }
}

/// A started successor, not yet ready.
#[derive(Debug)]
pub struct Child {
    process: tokio::process::Child,
    pid: u32,
    ready: tokio::net::UnixStream,
}

impl Child {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the child says ready (its pid), or fails: it exited,
    /// closed the socket, or said nothing for `timeout` (then it is
    /// stopped). The error says why, with the child's last log lines.
    pub async fn wait_ready(mut self, timeout: Duration) -> Result<u32, String> {
        let mut lines = tokio::io::BufReader::new(&mut self.ready).lines();
        let mut last: VecDeque<String> = VecDeque::new();
        let read = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(text) = line.strip_prefix("log ") {
                    if last.len() == LAST_LINES {
                        last.pop_front();
                    }
                    last.push_back(text.trim_end().to_string());
                } else if let Some(pid) = line.strip_prefix("ready ") {
                    return Some(pid.trim().parse::<u32>().unwrap_or(self.pid));
                }
            }
            None
        };
        let outcome = tokio::time::timeout(timeout, read).await;
        let why = match outcome {
            Ok(Some(pid)) => return Ok(pid),
            Ok(None) => match tokio::time::timeout(STOP_GRACE, self.process.wait()).await {
                Ok(Ok(status)) => format!("it exited before it was ready ({status})"),
                Ok(Err(e)) => format!("it closed its readiness socket; waiting for it failed: {e}"),
                Err(_) => {
                    terminate(self.pid);
                    "it closed its readiness socket without saying ready; stopped".to_string()
                }
            },
            Err(_) => {
                terminate(self.pid);
                let status = match tokio::time::timeout(STOP_GRACE, self.process.wait()).await {
                    Ok(Ok(status)) => status.to_string(),
                    _ => {
                        let _ = self.process.start_kill();
                        "killed".to_string()
                    }
                };
                format!("it was not ready within {timeout:?}; stopped ({status})")
            }
        };
        let quoted = if last.is_empty() {
            "it logged nothing".to_string()
        } else {
            format!("its last log lines: {}", Vec::from(last).join(" | "))
        };
        Err(format!("new process {}: {why}; {quoted}", self.pid))
    }
}

/// Asks a process to stop (SIGTERM).
pub fn terminate(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}

/// The child's side of the readiness socket: a copy of every log line
/// until ready, then `ready PID`. Cloned into the log writer.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<Mutex<Option<UnixStream>>>);

impl Readiness {
    /// `socket` is the readiness socket the old process passed, if any.
    pub fn new(socket: Option<UnixStream>) -> Self {
        if let Some(socket) = &socket {
            // A stalled old process must not stall our logging.
            let _ = socket.set_write_timeout(Some(Duration::from_secs(1)));
        }
        Self(Arc::new(Mutex::new(socket)))
    }

    fn socket(&self) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the old process we are ready, and stops copying log lines.
    pub fn ready(&self) {
        if let Some(mut socket) = self.socket().take() {
            let _ = writeln!(socket, "ready {}", std::process::id());
        }
    }

    fn copy(&self, buf: &[u8]) {
        let mut socket = self.socket();
        if let Some(s) = socket.as_mut() {
            let text = String::from_utf8_lossy(buf);
            for line in text.lines() {
                if writeln!(s, "log {line}").is_err() {
                    *socket = None;
                    return;
                }
            }
        }
    }
}

/// The log writer of `run`: stderr, and a copy for the old process while
/// an upgrade waits for us.
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Readiness {
    type Writer = LogWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LogWriter(self)
    }
}

pub struct LogWriter<'a>(&'a Readiness);

impl std::io::Write for LogWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.copy(buf);
        std::io::stderr().write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.0.copy(buf);
        std::io::stderr().write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// `run --pid-file`: the pid of the process that serves, across upgrades.
#[derive(Debug, Clone)]
pub struct PidFile(pub PathBuf);

impl PidFile {
    /// Writes our pid atomically (a temporary file renamed over it), so a
    /// reader sees the old pid or the new one, never a partial file.
    pub fn write(&self) -> std::io::Result<()> {
        let mut tmp = self.0.clone().into_os_string();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
        std::fs::rename(&tmp, &self.0).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }

    /// The pid it holds, if it holds one.
    pub fn read(path: &Path) -> Option<u32> {
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    }

    /// Removes the file if it still holds our pid (after an upgrade it
    /// holds the new process's).
    pub fn remove_if_ours(&self) {
        if Self::read(&self.0) == Some(std::process::id()) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_binary_is_started_from_its_path() {
        assert_eq!(
            strip_deleted(Path::new("/usr/bin/spiffe-tunnel (deleted)")),
            PathBuf::from("/usr/bin/spiffe-tunnel")
        );
        assert_eq!(
            strip_deleted(Path::new("/usr/bin/spiffe-tunnel")),
            PathBuf::from("/usr/bin/spiffe-tunnel")
        );
    }

    #[test]
    fn the_pid_file_follows_the_process_that_serves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.pid");
        let file = PidFile(path.clone());
        file.write().unwrap();
        assert_eq!(PidFile::read(&path), Some(std::process::id()));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Another process took over: ours is not removed.
        std::fs::write(&path, "1\n").unwrap();
        file.remove_if_ours();
        assert!(path.exists());
        file.write().unwrap();
        file.remove_if_ours();
        assert!(!path.exists());
    }

    #[test]
    fn log_lines_are_copied_until_ready() {
        use std::io::{BufRead, BufReader};
        let (ours, theirs) = UnixStream::pair().unwrap();
        let readiness = Readiness::new(Some(theirs));
        readiness.copy(b"first line\nsecond\n");
        readiness.ready();
        readiness.copy(b"after ready\n");
        let lines: Vec<String> = BufReader::new(ours).lines().map(Result::unwrap).collect();
        assert_eq!(
            lines,
            [
                "log first line".to_string(),
                "log second".to_string(),
                format!("ready {}", std::process::id())
            ]
        );
    }
}
