//! `spiffe-tunnel demo`: the whole system on one machine, as a short story.
//!
//! It starts the dev agent (playing the SPIRE agent), a plain backend, an
//! inbound and an outbound tunnel end fed by the agent over the Workload
//! API, pushes traffic through, waits for an SVID rotation and shows traffic
//! continuing with the new certificates, then shows a caller whose SPIFFE ID
//! is not allowed being refused. Everything runs in this process on
//! loopback, in a private temporary folder, and is torn down at the end.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::agent::{DevAgent, DevAgentConfig, IdGrant};
use crate::config::Config;
use crate::runtime::{Daemon, RunError};
use crate::spiffe_id;

/// SVID lifetime in the demo: short, so a rotation happens within seconds.
const DEMO_TTL: Duration = Duration::from_secs(6);
const TRUST_DOMAIN: &str = "demo.example";
const WEB: &str = "spiffe://demo.example/web";
const API: &str = "spiffe://demo.example/api";
const INTRUDER: &str = "spiffe://demo.example/intruder";

/// Why the demo could not finish.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot create a temporary folder: {0}")]
    TempDir(#[source] std::io::Error),
    #[error("dev agent: {0}")]
    Agent(#[from] crate::agent::AgentError),
    #[error("a tunnel end: {0}")]
    Tunnel(#[from] RunError),
    #[error("demo config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("backend: {0}")]
    Backend(#[source] std::io::Error),
    #[error("{0}")]
    Failed(String),
}

/// Options of `spiffe-tunnel demo`.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Leave everything running at the end and explain how to poke it.
    pub keep: bool,
}

/// Runs the demo, printing the story to stdout.
pub async fn run(options: DemoOptions) -> Result<(), DemoError> {
    let started = Instant::now();
    let dir = TempDir::new()?;
    println!("spiffe-tunnel demo: two tunnel ends, a SPIFFE Workload API and a backend, all on this machine.\n");

    // 1. The agent.
    let agent = DevAgent::start(DevAgentConfig {
        socket: dir.path().join("agent.sock"),
        trust_domain: spiffe_id::parse_trust_domain(TRUST_DOMAIN)
            .map_err(|e| DemoError::Failed(e.to_string()))?,
        ids: [WEB, API, INTRUDER]
            .iter()
            .map(|id| {
                id.parse::<IdGrant>()
                    .map_err(|e| DemoError::Failed(e.to_string()))
            })
            .collect::<Result<_, _>>()?,
        ttl: DEMO_TTL,
        ca_ttl: Duration::from_secs(24 * 3600),
        federate: Vec::new(),
        federates_with: Vec::new(),
        ca_dir: None,
        admin_socket: None,
        authorized_delegates: Vec::new(),
    })
    .await?;
    step(
        1,
        "A development Workload API starts, playing the SPIRE agent.",
    );
    detail(&format!(
        "socket {}, trust domain {TRUST_DOMAIN}",
        agent.socket_path().display()
    ));
    detail(&format!(
        "it issues {WEB}, {API} and {INTRUDER}; each SVID lives {}s and is renewed at half-life",
        DEMO_TTL.as_secs()
    ));

    // 2. The backend.
    let backend = Backend::start().await?;
    step(2, "A plain TCP backend (the app being protected) listens.");
    detail(&format!(
        "{} answers each line with \"backend got: <line>\"",
        backend.addr
    ));

    // 3. The tunnel ends.
    let socket = format!("unix://{}", agent.socket_path().display());
    let inbound_addr = free_loopback_addr().await?;
    let outbound_addr = free_loopback_addr().await?;
    let intruder_addr = free_loopback_addr().await?;
    let inbound = start_end(
        dir.path(),
        "inbound",
        &format!(
            "[[inbound]]\nname = \"api\"\nlisten = \"{inbound_addr}\"\ntarget = \"{}\"\nsvid = \"{API}\"\nallow = [\"{WEB}\"]\n",
            backend.addr
        ),
        &socket,
    )
    .await?;
    let outbound = start_end(
        dir.path(),
        "outbound",
        &format!(
            "[[outbound]]\nname = \"api\"\nlisten = \"{outbound_addr}\"\nupstreams = [\"{inbound_addr}\"]\nsvid = \"{WEB}\"\nallow = [\"{API}\"]\n"
        ),
        &socket,
    )
    .await?;
    step(
        3,
        "Two tunnel ends start, each with its own SPIFFE ID from the agent.",
    );
    detail(&format!("inbound  \"api\" on {inbound_addr}: presents {API}, lets in only {WEB}, forwards to the backend"));
    detail(&format!(
        "outbound \"api\" on {outbound_addr}: presents {WEB}, talks only to a server that is {API}"
    ));

    // 4. Traffic.
    step(
        4,
        "Requests go app -> outbound -> mTLS (TLS 1.3) -> inbound -> backend:",
    );
    let before = exchange_and_observe(outbound_addr, "hello", &inbound, &outbound).await?;
    print_exchange(&before);
    let mut long_lived = LongLived::open(outbound_addr).await?;
    detail("a long-lived connection is opened too, and left open");

    // 5. Rotation.
    step(
        5,
        "Waiting for the agent to rotate the SVIDs (no restart, no reload)...",
    );
    let rotation = wait_for_rotation(&inbound, &outbound, &before, DEMO_TTL * 2).await?;
    detail(&format!("rotated after {:.1}s", rotation.as_secs_f64()));
    let after = exchange_and_observe(outbound_addr, "hello again", &inbound, &outbound).await?;
    print_exchange(&after);
    if after.server_serial == before.server_serial || after.client_serial == before.client_serial {
        return Err(DemoError::Failed(
            "the new connection did not use the rotated SVIDs".into(),
        ));
    }
    detail("new connections use the new SVIDs (new serials above)");
    let reply = long_lived.ping("still there?").await?;
    detail(&format!(
        "the connection opened before the rotation still works: {reply:?}"
    ));

    // 6. A caller that is not allowed.
    step(
        6,
        &format!("A caller presenting {INTRUDER} tries the same inbound:"),
    );
    let intruder = start_end(
        dir.path(),
        "intruder",
        &format!(
            "[[outbound]]\nname = \"api\"\nlisten = \"{intruder_addr}\"\nupstreams = [\"{inbound_addr}\"]\nsvid = \"{INTRUDER}\"\nallow = [\"{API}\"]\n"
        ),
        &socket,
    )
    .await?;
    let backend_accepts = backend.accepts();
    let refused = matches!(request(intruder_addr, "let me in").await, Err(_) | Ok(None));
    let inbound_tunnel = inbound
        .tunnels()
        .next()
        .ok_or_else(|| DemoError::Failed("no inbound tunnel".into()))?;
    let reason = wait_for(Duration::from_secs(5), || inbound_tunnel.last_refusal()).await;
    match (refused, reason) {
        (true, Some(reason)) => {
            detail(&format!("refused by the inbound: {reason}"));
            detail(&format!(
                "the backend saw {} connections from it (it is only dialled after authorization)",
                backend.accepts() - backend_accepts
            ));
        }
        _ => return Err(DemoError::Failed("the intruder was not refused".into())),
    }
    if backend.accepts() != backend_accepts {
        return Err(DemoError::Failed(
            "the refused caller reached the backend".into(),
        ));
    }

    if options.keep {
        println!("\nEverything keeps running (Ctrl-C to stop). Poke it:");
        println!(
            "  printf 'hi\\n' | nc -q1 {} {}   # through the tunnel (or any TCP client)",
            outbound_addr.ip(),
            outbound_addr.port()
        );
        println!(
            "  printf 'hi\\n' | nc -q1 {} {}   # as the intruder: refused",
            intruder_addr.ip(),
            intruder_addr.port()
        );
        println!("  RUST_LOG=info spiffe-tunnel demo --keep         # to watch every connection and rotation");
        println!("  tunnel configs are in {}", dir.path().display());
        let _ = tokio::signal::ctrl_c().await;
    }

    drop(long_lived);
    drop(intruder);
    drop(outbound);
    drop(inbound);
    agent.shutdown().await;
    println!(
        "\nDone in {:.1}s: mutual TLS with SPIFFE IDs, live rotation, and a refused caller. Cleaned up.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn step(n: u32, text: &str) {
    println!("{n}. {text}");
}

fn detail(text: &str) {
    println!("   {text}");
}

/// Starts one tunnel end in this process from a config written to `dir`.
async fn start_end(
    dir: &Path,
    name: &str,
    tunnels: &str,
    socket: &str,
) -> Result<Daemon, DemoError> {
    let path = dir.join(format!("{name}.toml"));
    let text = format!("[identity]\nsource = \"workload_api\"\nsocket = \"{socket}\"\nstartup_timeout = \"10s\"\n\n{tunnels}");
    std::fs::write(&path, &text)
        .map_err(|e| DemoError::Failed(format!("{}: {e}", path.display())))?;
    let config = Config::parse(&text, &path)?;
    Ok(Daemon::start(config, None).await?)
}

/// What one request showed: the reply and who verified whom.
struct Exchange {
    request: String,
    reply: String,
    client_id: String,
    client_serial: String,
    server_id: String,
    server_serial: String,
}

fn print_exchange(e: &Exchange) {
    detail(&format!(
        "sent {:?}, backend replied {:?}",
        e.request, e.reply
    ));
    detail(&format!(
        "  inbound verified the client:  {} (serial {})",
        e.client_id, e.client_serial
    ));
    detail(&format!(
        "  outbound verified the server: {} (serial {})",
        e.server_id, e.server_serial
    ));
}

/// Sends one line through the outbound and, while the connection is still
/// open, reads from both ends' connection registries which peer each one
/// authorized.
async fn exchange_and_observe(
    outbound_addr: SocketAddr,
    line: &str,
    inbound: &Daemon,
    outbound: &Daemon,
) -> Result<Exchange, DemoError> {
    let mut stream = TcpStream::connect(outbound_addr)
        .await
        .map_err(DemoError::Backend)?;
    stream
        .write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(DemoError::Backend)?;
    let mut reader = BufReader::new(&mut stream);
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut reply))
        .await
        .map_err(|_| DemoError::Failed("no reply through the tunnel".into()))?
        .map_err(DemoError::Backend)?;
    if reply.is_empty() {
        return Err(DemoError::Failed(
            "the tunnel closed the connection without a reply".into(),
        ));
    }
    let newest_peer = |daemon: &Daemon| {
        daemon
            .registry
            .snapshot()
            .into_iter()
            .filter_map(|c| c.peer.clone())
            .next_back()
    };
    let client =
        newest_peer(inbound).ok_or_else(|| DemoError::Failed("inbound shows no peer".into()))?;
    let server =
        newest_peer(outbound).ok_or_else(|| DemoError::Failed("outbound shows no peer".into()))?;
    Ok(Exchange {
        request: line.to_string(),
        reply: reply.trim_end().to_string(),
        client_id: client.id.to_string(),
        client_serial: client.serial,
        server_id: server.id.to_string(),
        server_serial: server.serial,
    })
}

/// Waits until both ends present SVIDs with serials other than `before`'s.
async fn wait_for_rotation(
    inbound: &Daemon,
    outbound: &Daemon,
    before: &Exchange,
    timeout: Duration,
) -> Result<Duration, DemoError> {
    let start = Instant::now();
    let serial = |daemon: &Daemon, id: &str| {
        daemon.store.load().and_then(|identity| {
            identity
                .svids
                .iter()
                .find(|s| s.id.to_string() == id)
                .map(|s| s.serial.clone())
        })
    };
    let rotated = wait_for(timeout, || {
        let api = serial(inbound, API)?;
        let web = serial(outbound, WEB)?;
        (api != before.server_serial && web != before.client_serial).then_some(())
    })
    .await;
    match rotated {
        Some(()) => Ok(start.elapsed()),
        None => Err(DemoError::Failed(format!(
            "no rotation within {}s",
            timeout.as_secs()
        ))),
    }
}

/// Polls `check` every 50 ms until it yields something or `timeout` passes.
async fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request on a fresh connection: `Ok(None)` when the tunnel closed it
/// without an answer.
async fn request(addr: SocketAddr, line: &str) -> Result<Option<String>, std::io::Error> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(format!("{line}\n").as_bytes()).await?;
    let mut reply = String::new();
    match tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut reply)).await {
        Ok(Ok(_)) if !reply.is_empty() => Ok(Some(reply)),
        Ok(Ok(_)) => Ok(None),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(None),
    }
}

/// A connection kept open across the rotation.
struct LongLived {
    reader: BufReader<TcpStream>,
}

impl LongLived {
    async fn open(addr: SocketAddr) -> Result<Self, DemoError> {
        let mut this = Self {
            reader: BufReader::new(TcpStream::connect(addr).await.map_err(DemoError::Backend)?),
        };
        this.ping("first").await?;
        Ok(this)
    }

    async fn ping(&mut self, line: &str) -> Result<String, DemoError> {
        self.reader
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(DemoError::Backend)?;
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(5), self.reader.read_line(&mut reply))
            .await
            .map_err(|_| DemoError::Failed("the long-lived connection stopped answering".into()))?
            .map_err(DemoError::Backend)?;
        if reply.is_empty() {
            return Err(DemoError::Failed(
                "the long-lived connection was closed".into(),
            ));
        }
        Ok(reply.trim_end().to_string())
    }
}

/// The demo's app: answers each line, counts connections.
struct Backend {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    async fn start() -> Result<Self, DemoError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(DemoError::Backend)?;
        let addr = listener.local_addr().map_err(DemoError::Backend)?;
        let accepts = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepts);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let mut answer = String::new();
                        let _ = writeln!(answer, "backend got: {line}");
                        if write.write_all(answer.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            accepts,
            task,
        })
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback address nobody listens on.
async fn free_loopback_addr() -> Result<SocketAddr, DemoError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::Backend)?;
    listener.local_addr().map_err(DemoError::Backend)
}

/// A private temporary folder, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, DemoError> {
        let path = std::env::temp_dir().join(format!(
            "spiffe-tunnel-demo-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir(&path).map_err(DemoError::TempDir)?;
        // Only we may use the agent socket in it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .map_err(DemoError::TempDir)?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
