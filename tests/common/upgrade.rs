#![allow(dead_code)]
//! Upgrades and restarts seen from outside: a copy of the binary that a
//! test may swap, a node that serves both tunnel kinds in one process and
//! writes a pid file, client load that counts every connection, long-lived
//! connections that note when they were cut, and the processes an upgrade
//! leaves behind (reaped here, the test being their subreaper).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::certs::Ca;
use super::harness::{binary, free_addr, roundtrip, Daemon};

/// The SPIFFE ID of the node: presented and allowed by both tunnels.
pub const NODE: &str = "spiffe://example.org/node";

/// Copies the binary under test to `dir/bin/spiffe-tunnel`, where an
/// upgrade finds it (and a test can replace it).
pub fn install(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("spiffe-tunnel");
    replace_binary(&exe, Path::new(binary()));
    exe
}

/// Puts `source` at `exe` the way a package manager does: a new file
/// renamed over the old one (a running binary cannot be written to).
pub fn replace_binary(exe: &Path, source: &Path) {
    let tmp = exe.with_extension("new");
    std::fs::copy(source, &tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, exe).unwrap();
}

/// Orphans of our children (the old process exits, its successor stays)
/// become our children, so their exit status can be read.
pub fn become_subreaper() {
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
}

/// The exit code of `pid`, a child or (as subreaper) an adopted orphan;
/// `None` when a signal ended it.
pub async fn wait_exit(pid: u32, timeout: Duration) -> Option<i32> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let deadline = Instant::now() + timeout;
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Some(code),
            Ok(WaitStatus::Signaled(..)) => return None,
            Ok(_) => {}
            Err(e) => panic!("waitpid({pid}): {e}"),
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} did not exit within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `pid` is running (not gone, not a zombie).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit(") ").next().unwrap_or("");
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

/// The pids holding the listening TCP socket of `port` on loopback.
pub fn serving_pids(port: u16) -> Vec<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let Some(local) = fields.get(1) else { continue };
            let listening = fields.get(3) == Some(&"0A");
            let local_port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if listening && local_port == Some(port) {
                inodes.push(format!("socket:[{}]", fields[9]));
            }
        }
    }
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_ok_and(|target| inodes.iter().any(|i| target.to_string_lossy() == *i))
        });
        if holds {
            pids.push(pid);
        }
    }
    pids
}

/// One process serving an outbound "api" that dials its own inbound
/// "api" in front of an echo target: a connection to `out_addr` crosses
/// both tunnel kinds. Run from `exe` with a pid file.
pub struct Node {
    pub dir: PathBuf,
    pub exe: PathBuf,
    pub config: PathBuf,
    pub pid_file: PathBuf,
    pub admin: SocketAddr,
    pub in_addr: SocketAddr,
    pub out_addr: SocketAddr,
    pub target: SocketAddr,
    pub drain: &'static str,
    /// The first process; later ones are found through the pid file.
    pub first: Daemon,
    /// A stand-in for systemd's notification socket (`NOTIFY_SOCKET`).
    pub notify: std::os::unix::net::UnixDatagram,
}

impl Node {
    pub async fn start(dir: &Path, ca: &Ca, target: SocketAddr, drain: &'static str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        ca.leaf(NODE).write_files(dir);
        let exe = install(dir);
        let (config, pid_file) = (dir.join("tunnel.toml"), dir.join("spiffe-tunnel.pid"));
        let (admin, in_addr, out_addr) = (free_addr(), free_addr(), free_addr());
        std::fs::write(
            &config,
            config_text(admin, drain, in_addr, out_addr, target, ""),
        )
        .unwrap();
        let run = [
            "run",
            "-c",
            config.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
        ];
        let notify_path = dir.join("notify.sock");
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        notify.set_nonblocking(true).unwrap();
        let first = Daemon::spawn_exe(
            &exe,
            &run,
            dir,
            &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
        );
        let node = Node {
            dir: dir.to_path_buf(),
            exe,
            config,
            pid_file,
            admin,
            in_addr,
            out_addr,
            target,
            drain,
            first,
            notify,
        };
        node.first.wait_running().await;
        node.wait_pid(None).await;
        node
    }

    /// The config, with `extra` appended.
    pub fn config_text(&self, extra: &str) -> String {
        config_text(
            self.admin,
            self.drain,
            self.in_addr,
            self.out_addr,
            self.target,
            extra,
        )
    }

    /// The pid the pid file names now.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits until the pid file names a running process other than `old`.
    pub async fn wait_pid(&self, old: Option<u32>) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(pid) = self.pid().filter(|p| Some(*p) != old && running(*p)) {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "no new pid in {} (still {old:?}); log:\n{}",
                self.pid_file.display(),
                self.first.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The notifications sent to "systemd" since the last call.
    pub fn notifications(&self) -> Vec<String> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.notify.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got
    }

    /// The log every process of the node writes to (they share stderr).
    pub fn log(&self) -> String {
        self.first.log()
    }

    pub async fn wait_log(&self, needle: &str, count: usize) {
        self.first
            .wait_log(needle, count, Duration::from_secs(30))
            .await;
    }
}

fn config_text(
    admin: SocketAddr,
    drain: &str,
    in_addr: SocketAddr,
    out_addr: SocketAddr,
    target: SocketAddr,
    extra: &str,
) -> String {
    file_identity(&format!(
        "[admin]\nlisten = \"{admin}\"\n[defaults]\ndrain_timeout = \"{drain}\"\n\
         [[inbound]]\nname = \"api\"\nlisten = \"{in_addr}\"\ntarget = \"{target}\"\nallow = [\"{NODE}\"]\n\
         [[outbound]]\nname = \"api\"\nlisten = \"{out_addr}\"\nupstreams = [\"{in_addr}\"]\nallow = [\"{NODE}\"]\n{extra}"
    ))
}

/// The `[identity]` tables of a files identity (`svid.pem`, `svid.key`,
/// `bundle.pem` beside the config), then `tables`.
pub const FILE_IDENTITY: &str =
    "[identity]\nsource = \"files\"\ncert = \"svid.pem\"\nkey = \"svid.key\"\n\
     [identity.bundles]\n\"example.org\" = \"bundle.pem\"\n";

pub fn file_identity(tables: &str) -> String {
    format!("{FILE_IDENTITY}{tables}")
}

/// Writes `id`'s files and a config of `tables` on them into `dir`.
pub fn write_config(dir: &Path, ca: &Ca, id: &str, tables: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    ca.leaf(id).write_files(dir);
    let config = dir.join("tunnel.toml");
    std::fs::write(&config, file_identity(tables)).unwrap();
    config
}

/// Sends a signal by name with `kill`.
pub fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Clients that open a new tunnelled connection, send a line and read it
/// back, again and again without pause, counting every attempt.
pub struct Load {
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: SocketAddr, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..workers)
            .map(|w| {
                let (stop, attempts, failures) = (
                    Arc::clone(&stop),
                    Arc::clone(&attempts),
                    Arc::clone(&failures),
                );
                tokio::spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let msg = format!("worker {w} request {i}\n");
                        i += 1;
                        attempts.fetch_add(1, Ordering::Relaxed);
                        match roundtrip(addr, msg.as_bytes()).await {
                            Ok(answer) if answer == msg.as_bytes() => {}
                            other => failures.lock().unwrap().push(format!(
                                "worker {w} request {i}: {:?}",
                                other.map(|a| String::from_utf8_lossy(&a).into_owned())
                            )),
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            attempts,
            failures,
            workers,
        }
    }

    pub fn attempts(&self) -> usize {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Waits until `more` attempts beyond `since` were made.
    pub async fn wait_attempts(&self, at_least: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.attempts() < at_least {
            assert!(
                Instant::now() < deadline,
                "only {} connections in {timeout:?}",
                self.attempts()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the clients; returns (attempted, failures).
    pub async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.attempts.load(Ordering::Relaxed), failures)
    }
}

/// How a long-lived connection ended.
#[derive(Debug)]
pub struct Lived {
    /// Echo rounds that came back.
    pub rounds: u32,
    /// When it stopped working, if it was cut before its own end.
    pub cut_at: Option<Instant>,
}

/// A connection that echoes a line every 50 ms until `lifetime` passes
/// (then it closes itself) or until it stops working.
pub async fn long_lived(addr: SocketAddr, lifetime: Option<Duration>) -> JoinHandle<Lived> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 16];
    stream.write_all(b"long-lived 0000\n").await.unwrap();
    stream.read_exact(&mut buf).await.unwrap();
    tokio::spawn(async move {
        let ends = lifetime.map(|l| Instant::now() + l);
        let mut rounds = 1;
        loop {
            if ends.is_some_and(|e| Instant::now() >= e) {
                let _ = stream.shutdown().await;
                return Lived {
                    rounds,
                    cut_at: None,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            let line = format!("long-lived {:04}\n", rounds % 10000);
            let ok = stream.write_all(line.as_bytes()).await.is_ok()
                && matches!(
                    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf)).await,
                    Ok(Ok(_)) if buf == line.as_bytes()
                );
            if !ok {
                return Lived {
                    rounds,
                    cut_at: Some(Instant::now()),
                };
            }
            rounds += 1;
        }
    })
}
