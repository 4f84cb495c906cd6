#![allow(dead_code)]
//! Nodes as Linux network namespaces, for multi-node system tests.
//!
//! # Layout
//!
//! ```text
//!          namespace "<id>-sw"                      (one per Lan)
//!   ┌────────────── br0 (bridge) ──────────────┐
//!   p1              p2               p3   ...     veth ends in the switch
//!   │               │                │
//!  eth0 10.77.0.1  eth0 10.77.0.2   eth0 10.77.0.3   one namespace per node,
//!  "<id>-node1"    "<id>-node2"     "<id>-node3"     each with its own `lo`
//! ```
//!
//! `<id>` is `stnt-<pid>-<counter>`, so parallel tests and parallel test
//! processes never share a name. Every link is created directly inside the
//! namespaces (`ip -n SW link add pN type veth peer name eth0 netns NODE`):
//! the root namespace gets no interface, no address and no route, so the
//! test range 10.77.0.0/24 exists only inside namespaces the test made, and
//! every Lan can use the same addresses without colliding with another.
//!
//! # Processes and traffic
//!
//! Everything that talks runs *inside* a node, started with
//! `ip netns exec NODE …` (which execs the program, so the child's pid is
//! the program's): the dev agent, the tunnel daemon, the application (a
//! small Python echo server that logs every accept, so tests can count
//! them) and the application's client (a long-running Python process that
//! takes one JSON request per line on stdin, such as a round trip through
//! a tunnel or an HTTP GET of the admin endpoint, and answers one JSON line
//! on stdout). The test process itself sends no packet anywhere: it only
//! reads log files and talks to the clients over pipes. So each node is
//! exactly the sidecar picture, with ports on `127.0.0.1` private to the
//! node (every node can use the same port numbers), and node-to-node
//! traffic crossing the bridge. A node's link is cut by setting its switch
//! port down (`Node::link_down`), which drops its frames like a pulled cable.
//! Unix sockets (the Workload API) live in the shared file system, which
//! `ip netns exec` leaves visible.
//!
//! # Teardown
//!
//! Drop does it, also while a test unwinds from a panic: a [`Proc`] kills
//! and reaps its process (and prints the tail of its log when the test is
//! panicking); a [`Node`] kills whatever still runs in its namespace,
//! deletes its switch port and its namespace; a [`Lan`] deletes the switch
//! namespace. Namespaces left behind by a test process that was killed
//! (its pid no longer exists) are removed when the next `Lan` is created.
//!
//! Needs root and iproute2 (`ip`), and python3. Set
//! `SPIFFE_TUNNEL_SKIP_NETNS=1` to skip these tests on machines without them;
//! otherwise a missing prerequisite fails the test with the reason.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{mpsc, Once, OnceLock};
use std::time::{Duration, Instant};

/// Every namespace this harness creates starts with this.
pub const PREFIX: &str = "stnt";
/// The node addresses: 10.77.0.N/24, N = 1, 2, … in the order nodes are added.
pub const SUBNET: [u8; 3] = [10, 77, 0];

/// The spiffe-tunnel binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_spiffe-tunnel")
}

/// Runs `ip ARGS`; the error is its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2 installed?): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip_ok(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("{e}");
    }
}

/// Kills every process in namespace `ns`, then deletes the namespace.
fn remove_netns(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill")
                .args(["-KILL", pid])
                .stderr(Stdio::null())
                .status();
        }
    }
    let _ = ip(&["netns", "del", ns]);
}

/// Removes namespaces with our prefix whose test process no longer exists.
fn cleanup_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let own = std::process::id();
    let prefix = format!("{PREFIX}-");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != own && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("netns: removing {name}, left behind by test process {pid}");
            remove_netns(name);
        }
    }
}

/// Whether to run: true when namespaces can be made; false (with a note on
/// stderr) when `SPIFFE_TUNNEL_SKIP_NETNS=1` asks to skip; panics with the
/// reason otherwise.
pub fn available() -> bool {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let check = CHECK.get_or_init(|| {
        python()?;
        let probe = format!("{PREFIX}-{}-probe", std::process::id());
        ip(&["netns", "add", &probe])?;
        let _ = ip(&["netns", "del", &probe]);
        Ok(())
    });
    match check {
        Ok(()) => true,
        Err(e) if std::env::var("SPIFFE_TUNNEL_SKIP_NETNS").as_deref() == Ok("1") => {
            eprintln!("netns tests skipped (SPIFFE_TUNNEL_SKIP_NETNS=1): {e}");
            false
        }
        Err(e) => panic!(
            "network namespace tests need root, iproute2 and python3: {e}\n\
             (set SPIFFE_TUNNEL_SKIP_NETNS=1 to skip them)"
        ),
    }
}

/// The absolute path of python3 (a pyenv shim would cost a shell per start).
fn python() -> Result<&'static str, String> {
    static PATH: OnceLock<Result<String, String>> = OnceLock::new();
    PATH.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .map_err(|e| format!("cannot run python3: {e}"))?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !path.is_empty() {
            Ok(path)
        } else {
            Err("python3 did not say where it lives".to_string())
        }
    })
    .as_deref()
    .map_err(Clone::clone)
}

/// Where each node's tunnel serves its admin endpoint (every node has its
/// own `127.0.0.1`, so the same address in all of them).
pub const ADMIN: &str = "127.0.0.1:9901";

/// Polls `condition` every 20 ms until it holds; panics after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A switch (a bridge in its own namespace) that nodes plug into, and the
/// folder for their configs, sockets and logs.
pub struct Lan {
    id: String,
    sw: String,
    hosts: AtomicU8,
    dir: tempfile::TempDir,
}

impl Lan {
    pub fn new() -> Lan {
        static CLEANUP: Once = Once::new();
        CLEANUP.call_once(cleanup_stale);
        static N: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{PREFIX}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let sw = format!("{id}-sw");
        ip_ok(&["netns", "add", &sw]);
        // From here on Drop removes it, whatever fails next.
        let lan = Lan {
            id,
            sw,
            hosts: AtomicU8::new(0),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        ip_ok(&["-n", &lan.sw, "link", "set", "lo", "up"]);
        // STP off (the default) and no forward delay: a port forwards as
        // soon as it is up, also after `link_up`.
        ip_ok(&[
            "-n",
            &lan.sw,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "forward_delay",
            "0",
        ]);
        ip_ok(&["-n", &lan.sw, "link", "set", "br0", "up"]);
        lan
    }

    /// The folder for this test's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A new node `name` (its namespace, `lo` up, `eth0` on the bridge
    /// with the next address).
    pub fn node(&self, name: &str) -> Node {
        let host = self.hosts.fetch_add(1, Ordering::Relaxed) + 1;
        assert!(host < 255, "too many nodes");
        let ns = format!("{}-{name}", self.id);
        ip_ok(&["netns", "add", &ns]);
        let node = Node {
            name: name.to_string(),
            ns,
            ip: Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], host),
            sw: self.sw.clone(),
            port: format!("p{host}"),
            dir: self.dir.path().to_path_buf(),
        };
        let ns = node.ns.as_str();
        let port = node.port.as_str();
        let cidr = format!("{}/24", node.ip);
        ip_ok(&["-n", ns, "link", "set", "lo", "up"]);
        ip_ok(&[
            "-n", &self.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ]);
        ip_ok(&["-n", &self.sw, "link", "set", port, "master", "br0"]);
        ip_ok(&["-n", &self.sw, "link", "set", port, "up"]);
        ip_ok(&["-n", ns, "addr", "add", &cidr, "dev", "eth0"]);
        ip_ok(&["-n", ns, "link", "set", "eth0", "up"]);
        node
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        remove_netns(&self.sw);
        if std::thread::panicking() {
            // Keep the configs and logs for a look after the failure.
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("netns: test files kept in {}", kept.display());
        }
    }
}

/// One node: a network namespace with an address on the Lan.
pub struct Node {
    /// The name the test gave it ("node1").
    pub name: String,
    /// The namespace's full name.
    pub ns: String,
    pub ip: Ipv4Addr,
    sw: String,
    port: String,
    dir: PathBuf,
}

impl Node {
    /// This node's address with `port`.
    pub fn addr(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.ip, port)
    }

    /// A path for this node's `file` in the test folder.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(format!("{}-{file}", self.name))
    }

    /// Runs `program args` in this node, output to the log file
    /// `<node>-<label>.log`; killed when the returned [`Proc`] is dropped.
    pub fn spawn(&self, label: &str, program: &str, args: &[&str]) -> Proc {
        let log = self.path(&format!("{label}.log"));
        let file = File::create(&log).expect("create log file");
        let child = self
            .command(program, args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {label} in {}: {e}", self.name));
        Proc {
            label: format!("{}/{label}", self.name),
            child,
            log,
        }
    }

    /// `spiffe-tunnel ARGS` in this node.
    pub fn spiffe_tunnel(&self, label: &str, args: &[&str]) -> Proc {
        self.spawn(label, binary(), args)
    }

    /// `spiffe-tunnel run` in this node on `<node>-<label>.toml`: an
    /// identity from the Workload API at `socket` (a `unix://` address:
    /// the dev agent's or a SPIRE agent's), the admin endpoint on
    /// [`ADMIN`], then `tunnels` (TOML). Returns once it says it runs.
    pub fn run_tunnel(&self, label: &str, socket: &str, tunnels: &str) -> Proc {
        let config = self.path(&format!("{label}.toml"));
        std::fs::write(
            &config,
            format!(
                "[identity]\nsource = \"workload_api\"\nsocket = \"{socket}\"\nstartup_timeout = \"20s\"\n\
                 [admin]\nlisten = \"{ADMIN}\"\n{tunnels}"
            ),
        )
        .unwrap();
        let proc = self.spiffe_tunnel(label, &["run", "-c", config.to_str().unwrap()]);
        proc.wait_log("spiffe-tunnel is running", 1, Duration::from_secs(20));
        proc
    }

    /// Starts `dev-agent` in this node on `agent.sock` for `trust_domain`,
    /// issuing `ids` (`extra`: more arguments), and waits for its socket.
    pub fn dev_agent(&self, trust_domain: &str, ids: &[&str], extra: &[&str]) -> NsAgent {
        let socket = self.path("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let mut args = vec![
            "dev-agent",
            "--socket",
            socket.to_str().unwrap(),
            "--trust-domain",
            trust_domain,
        ];
        for id in ids {
            args.extend(["--id", id]);
        }
        args.extend_from_slice(extra);
        let proc = self.spiffe_tunnel("agent", &args);
        wait_for(
            &format!("the agent socket of {}", self.name),
            Duration::from_secs(20),
            || socket.exists(),
        );
        NsAgent { proc, socket }
    }

    /// `spiffe-tunnel run` in this node (label `tunnel`) with its identity
    /// from `agent`; see [`Node::run_tunnel`].
    pub fn tunnel(&self, agent: &NsAgent, tunnels: &str) -> Proc {
        self.run_tunnel(
            "tunnel",
            &format!("unix://{}", agent.socket.display()),
            tunnels,
        )
    }

    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        cmd
    }

    /// The application: an echo server on `127.0.0.1:port` in this node
    /// that logs every connection it accepts.
    pub fn echo_app(&self, label: &str, port: u16) -> App {
        let port_arg = port.to_string();
        let proc = self.spawn(
            label,
            python().unwrap(),
            &["-u", "-c", ECHO_SERVER, "127.0.0.1", &port_arg],
        );
        proc.wait_log("listening", 1, Duration::from_secs(10));
        App { proc, port }
    }

    /// A client process in this node, for traffic and admin requests.
    pub fn client(&self) -> Client {
        self.client_named("client")
    }

    /// Another client in this node (its log is `<node>-<label>.log`), for
    /// a test that drives traffic and asks the admin endpoint at once.
    pub fn client_named(&self, label: &str) -> Client {
        let log = self.path(&format!("{label}.log"));
        let file = File::create(&log).expect("create log file");
        let mut child = self
            .command(python().unwrap(), &["-u", "-c", CLIENT])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start the client in {}: {e}", self.name));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Client {
            proc: Proc {
                label: format!("{}/{label}", self.name),
                child,
                log,
            },
            stdin,
            lines,
        }
    }

    /// Cuts this node off the Lan: its switch port goes down, so its frames
    /// are dropped (and its own `eth0` loses carrier), like a pulled cable.
    pub fn link_down(&self) {
        ip_ok(&["-n", &self.sw, "link", "set", &self.port, "down"]);
    }

    /// Plugs the cable back in.
    pub fn link_up(&self) {
        ip_ok(&["-n", &self.sw, "link", "set", &self.port, "up"]);
    }

    /// Cuts this node off from one other address only, everything else
    /// still flowing: a blackhole route for `to` in this node's namespace,
    /// so every packet it sends there is dropped (a firewall rule without
    /// a firewall).
    pub fn blackhole(&self, to: Ipv4Addr) {
        ip_ok(&[
            "-n",
            &self.ns,
            "route",
            "add",
            "blackhole",
            &format!("{to}/32"),
        ]);
    }

    /// Removes the route [`Node::blackhole`] added.
    pub fn unblackhole(&self, to: Ipv4Addr) {
        ip_ok(&[
            "-n",
            &self.ns,
            "route",
            "del",
            "blackhole",
            &format!("{to}/32"),
        ]);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        remove_netns(&self.ns);
        // Usually gone with the namespace already; the switch may be too.
        let _ = ip(&["-n", &self.sw, "link", "del", &self.port]);
    }
}

/// A dev agent in a node ([`Node::dev_agent`]), and its Workload API socket.
pub struct NsAgent {
    pub proc: Proc,
    pub socket: PathBuf,
}

/// A process running in a node; killed and reaped when dropped.
pub struct Proc {
    label: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits until the log holds `needle` at least `count` times.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {count}x {needle:?} in the log of {}:\n{}",
                self.label,
                tail(&log, 60)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by name (HUP, TERM, KILL).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.label);
    }

    /// Kills the process and waits until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- {} ({}), last lines ----\n{}",
                self.label,
                self.log.display(),
                tail(&self.log(), 40)
            );
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The echo application of a node.
pub struct App {
    pub proc: Proc,
    pub port: u16,
}

impl App {
    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.proc
            .log()
            .lines()
            .filter(|l| l.starts_with("accept "))
            .count()
    }
}

/// A client process inside a node, driven over its stdin and stdout.
pub struct Client {
    proc: Proc,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

/// How long one request may take at most, in the client (socket timeouts)
/// and here (waiting for its answer, with a margin).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl Client {
    fn call(&mut self, request: serde_json::Value) -> serde_json::Value {
        let line = format!("{request}\n");
        self.stdin
            .write_all(line.as_bytes())
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("the client {} is gone: {e}", self.proc.label));
        let answer = self
            .lines
            .recv_timeout(REQUEST_TIMEOUT * 2)
            .unwrap_or_else(|e| {
                panic!(
                    "no answer from the client {} to {request}: {e}\n{}",
                    self.proc.label,
                    self.proc.log()
                )
            });
        serde_json::from_str(&answer).expect("the client answers JSON")
    }

    /// Connects to `addr` in this node, sends `msg`, half-closes and reads
    /// until the far side closes: the bytes that came back, or why not.
    pub fn roundtrip(&mut self, addr: &str, msg: &str) -> Result<String, String> {
        let answer = self.call(serde_json::json!({
            "op": "roundtrip",
            "addr": addr,
            "msg": msg,
            "timeout": REQUEST_TIMEOUT.as_secs_f64(),
        }));
        match answer["ok"].as_bool() {
            Some(true) => Ok(answer["data"].as_str().unwrap_or_default().to_string()),
            _ => Err(answer["error"].as_str().unwrap_or("?").to_string()),
        }
    }

    /// A round trip that must echo `msg`: Ok, or what went wrong.
    pub fn echo(&mut self, addr: &str, msg: &str) -> Result<(), String> {
        match self.roundtrip(addr, msg) {
            Ok(answer) if answer == msg => Ok(()),
            Ok(answer) if answer.is_empty() => Err("closed without an answer".to_string()),
            Ok(answer) => Err(format!("wrong answer {answer:?}")),
            Err(e) => Err(e),
        }
    }

    /// `GET path` over HTTP/1.0 from `addr` in this node: (status, body).
    pub fn get(&mut self, addr: &str, path: &str) -> (u16, String) {
        let answer = self.call(serde_json::json!({
            "op": "get",
            "addr": addr,
            "path": path,
            "timeout": REQUEST_TIMEOUT.as_secs_f64(),
        }));
        assert_eq!(
            answer["ok"].as_bool(),
            Some(true),
            "GET {path} from {addr} in {}: {answer}",
            self.proc.label
        );
        (
            answer["status"].as_u64().unwrap_or_default() as u16,
            answer["body"].as_str().unwrap_or_default().to_string(),
        )
    }
}

/// The value of the first sample line starting with `prefix` in a
/// Prometheus exposition (0 when there is none).
pub fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The application: echoes every connection until the peer half-closes,
/// then closes; prints `accept N` for each connection it accepts.
const ECHO_SERVER: &str = r#"
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((host, port))
server.listen(512)
print("listening", flush=True)

def serve(conn):
    with conn:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass

accepted = 0
while True:
    conn, peer = server.accept()
    accepted += 1
    print("accept %d %s:%d" % (accepted, peer[0], peer[1]), flush=True)
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// The client: one JSON request per stdin line, one JSON answer per line.
const CLIENT: &str = r#"
import json, socket, sys

def exchange(addr, data, timeout, half_close):
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.settimeout(timeout)
        conn.sendall(data)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return out
            out += chunk

for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["op"] == "roundtrip":
            out = exchange(req["addr"], req["msg"].encode(), req["timeout"], True)
            answer = {"ok": True, "data": out.decode("utf-8", "replace")}
        elif req["op"] == "get":
            raw = "GET %s HTTP/1.0\r\nHost: admin\r\n\r\n" % req["path"]
            out = exchange(req["addr"], raw.encode(), req["timeout"], False)
            head, _, body = out.decode("utf-8", "replace").partition("\r\n\r\n")
            answer = {"ok": True, "status": int(head.split()[1]), "body": body}
        else:
            answer = {"ok": False, "error": "unknown op " + req["op"]}
    except Exception as e:
        answer = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
    print(json.dumps(answer), flush=True)
"#;
