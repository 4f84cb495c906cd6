#![allow(dead_code)]
//! The Go peers of the interop tests, as child processes: `gospiffe-peer`
//! (go-spiffe v2.9.0, the SPIFFE reference library; `tests/peers`) and
//! ghostunnel (`tests/peers/ghostunnel`). scripts/test builds both and says
//! where through `GOSPIFFE_PEER_BIN` and `GHOSTUNNEL_BIN`; without those the
//! paths scripts/test uses are tried. A missing program fails the test with
//! one line saying why (the build error scripts/test saved, if any): these
//! tests are never skipped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncBufReadExt;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A program scripts/test builds: `env` if set, else `fallback`; panics
/// with the saved build error (or how to build it) when it is not there.
fn built_program(env: &str, fallback: PathBuf, error_file: PathBuf, what: &str) -> PathBuf {
    let path = std::env::var_os(env).map_or(fallback, PathBuf::from);
    if path.is_file() {
        return path;
    }
    let why = std::fs::read_to_string(&error_file)
        .ok()
        .and_then(|text| text.lines().last().map(str::to_string))
        .unwrap_or_else(|| "scripts/test builds it, and recorded no build error".into());
    panic!("{what} is missing at {} ({env}): {why}", path.display());
}

/// The gospiffe-peer program (go-spiffe v2.9.0).
pub fn gospiffe_peer() -> PathBuf {
    let dir = repo().join("target/peers");
    built_program(
        "GOSPIFFE_PEER_BIN",
        dir.join("bin/gospiffe-peer"),
        dir.join("gospiffe-peer-error.txt"),
        "gospiffe-peer (go-spiffe v2.9.0, tests/peers)",
    )
}

/// The ghostunnel version pinned in tests/peers/ghostunnel/go.mod.
pub fn ghostunnel_version() -> String {
    let go_mod = std::fs::read_to_string(repo().join("tests/peers/ghostunnel/go.mod"))
        .expect("read tests/peers/ghostunnel/go.mod");
    go_mod
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("github.com/ghostunnel/ghostunnel"))
                .then(|| words.next().map(str::to_string))
                .flatten()
        })
        .expect("ghostunnel's version in tests/peers/ghostunnel/go.mod")
}

/// The ghostunnel binary.
pub fn ghostunnel() -> PathBuf {
    let dir = repo()
        .join("target/peers/ghostunnel")
        .join(ghostunnel_version());
    built_program(
        "GHOSTUNNEL_BIN",
        dir.join("bin/ghostunnel"),
        dir.join("build-error.txt"),
        "ghostunnel (tests/peers/ghostunnel)",
    )
}

/// Whether one line of `log` holds every needle.
pub fn has_line(log: &str, needles: &[&str]) -> bool {
    log.lines().any(|l| needles.iter().all(|n| l.contains(n)))
}

/// Waits (10 s at most) until one line of `log()` holds every needle; the
/// failure shows the log, named `what`.
pub async fn wait_line(what: &str, log: impl Fn() -> String, needles: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !has_line(&log(), needles) {
        assert!(
            Instant::now() < deadline,
            "no line with {needles:?} in the {what} log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a go-spiffe end authorizes its peer.
#[derive(Debug, Clone)]
pub enum GoAuthorizer {
    /// `tlsconfig.AuthorizeID`.
    Id(String),
    /// `tlsconfig.AuthorizeMemberOf`.
    MemberOf(String),
}

impl GoAuthorizer {
    fn args(&self, id_flag: &str, member_flag: &str) -> [String; 2] {
        match self {
            Self::Id(id) => [id_flag.to_string(), id.clone()],
            Self::MemberOf(td) => [member_flag.to_string(), td.clone()],
        }
    }
}

/// Where a [`LoggedChild`]'s stdout goes.
#[derive(Debug, Clone, Copy)]
pub enum StdoutTo {
    /// A pipe, to read a line from ([`LoggedChild::first_line`]).
    Pipe,
    /// The log file, with stderr (ghostunnel logs on stdout).
    Log,
}

/// A child process whose stderr goes to a log file; killed when dropped.
pub struct LoggedChild {
    child: Child,
    log: PathBuf,
    name: String,
}

impl LoggedChild {
    /// Starts `command` with stderr to `dir/NAME-N.log`, and stdout as
    /// `stdout` says.
    pub fn spawn(mut command: Command, dir: &Path, name: &str, stdout: StdoutTo) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let log = dir.join(format!("{name}-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let file = std::fs::File::create(&log).expect("create a log file");
        let stdout = match stdout {
            StdoutTo::Pipe => Stdio::piped(),
            StdoutTo::Log => Stdio::from(file.try_clone().expect("share the log file")),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self {
            child,
            log,
            name: name.to_string(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the log holds `needle` `count` times.
    pub async fn wait_log(&mut self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= count {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before logging {needle:?}:\n{log}",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {count}x {needle:?} in the {} log:\n{log}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The first stdout line, within `timeout`.
    pub async fn first_line(&mut self, timeout: Duration) -> String {
        let stdout = self.child.stdout.take().expect("stdout was piped");
        let stdout = tokio::process::ChildStdout::from_std(stdout).expect("async stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        match tokio::time::timeout(timeout, lines.next_line()).await {
            Ok(Ok(Some(line))) => line,
            other => panic!(
                "{} printed no line within {timeout:?} ({other:?}); log:\n{}",
                self.name,
                self.log()
            ),
        }
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- {} log {} ----\n{}",
                self.name,
                self.log.display(),
                self.log()
            );
        }
    }
}

/// A go-spiffe mTLS server (spiffetls.ListenWithMode with
/// MTLSServerWithSource), answering one line per connection with
/// "go-spiffe OURID to PEERID: LINE". It logs "accepted PEERID" or
/// "refused: REASON" for each handshake.
pub struct GoServer {
    pub process: LoggedChild,
    pub addr: SocketAddr,
}

impl GoServer {
    /// Starts the server on a free loopback port, taking SVIDs from the
    /// Workload API at `socket` and presenting `svid`.
    pub async fn start(dir: &Path, socket: &Path, svid: &str, authorizer: &GoAuthorizer) -> Self {
        let mut command = Command::new(gospiffe_peer());
        command
            .arg("server")
            .arg("--socket")
            .arg(format!("unix://{}", socket.display()))
            .args(["--svid", svid, "--listen", "127.0.0.1:0"])
            .args(authorizer.args("--allow-id", "--allow-member-of"));
        let mut process = LoggedChild::spawn(command, dir, "gospiffe-server", StdoutTo::Pipe);
        let line = process.first_line(Duration::from_secs(30)).await;
        let addr = line
            .strip_prefix("listening ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from gospiffe-peer server: {line:?}"));
        Self { process, addr }
    }
}

/// Runs the go-spiffe client (spiffetls.DialWithMode with
/// MTLSClientWithSource): sends `message`, returns what the process did.
pub async fn go_client(
    socket: &Path,
    svid: &str,
    connect: SocketAddr,
    authorizer: &GoAuthorizer,
    message: &str,
) -> Output {
    let mut command = tokio::process::Command::new(gospiffe_peer());
    command
        .arg("client")
        .arg("--socket")
        .arg(format!("unix://{}", socket.display()))
        .args(["--svid", svid, "--connect", &connect.to_string()])
        .args(["--message", message])
        .args(authorizer.args("--expect-id", "--expect-member-of"))
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("gospiffe-peer client finished within a minute")
        .expect("run gospiffe-peer client")
}

/// A ghostunnel process with `--use-workload-api-addr`: a server (TLS in,
/// plain out) or a client (plain in, TLS out). It takes the first SVID the
/// Workload API sends (go-spiffe's default), so it runs as a uid of its own
/// with one registration.
pub struct Ghostunnel {
    pub process: LoggedChild,
    pub listen: SocketAddr,
}

impl Ghostunnel {
    /// `ghostunnel server` as `uid`, letting in clients whose URI SAN is
    /// `allow_uri`.
    pub async fn server(
        dir: &Path,
        socket: &str,
        uid: u32,
        target: SocketAddr,
        allow_uri: &str,
    ) -> Self {
        Self::start(
            dir,
            socket,
            uid,
            "server",
            target,
            &["--allow-uri", allow_uri],
        )
        .await
    }

    /// `ghostunnel client` as `uid`, accepting a server whose URI SAN is
    /// `verify_uri`.
    pub async fn client(
        dir: &Path,
        socket: &str,
        uid: u32,
        target: SocketAddr,
        verify_uri: &str,
    ) -> Self {
        Self::start(
            dir,
            socket,
            uid,
            "client",
            target,
            &["--verify-uri", verify_uri],
        )
        .await
    }

    async fn start(
        dir: &Path,
        socket: &str,
        uid: u32,
        mode: &str,
        target: SocketAddr,
        access: &[&str],
    ) -> Self {
        let listen = super::harness::free_addr();
        let mut command = super::spire::command_as(ghostunnel(), uid);
        command
            .arg(mode)
            .args(["--use-workload-api-addr", socket])
            .args(["--listen", &listen.to_string()])
            .args(["--target", &target.to_string()])
            .args(access);
        let mut process =
            LoggedChild::spawn(command, dir, &format!("ghostunnel-{mode}"), StdoutTo::Log);
        process
            .wait_log("listening for connections on", 1, Duration::from_secs(30))
            .await;
        Self { process, listen }
    }
}
