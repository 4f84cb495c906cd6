//! Multiplexed tunnels (`multiplex = true`, issue 17) over real sockets and
//! real processes: an outbound daemon as `web` carrying each local
//! connection as an HTTP/2 CONNECT stream over pooled mTLS connections to
//! an inbound daemon as `api`, next to direct outbounds on the same
//! inbound port; and hostile HTTP/2 clients (the `h2` crate's, and raw
//! frames where h2 would refuse to misbehave) over real mTLS connections.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::certs::{Ca, Leaf};
use common::harness::*;
use common::node::{inbound, outbound, FileNode};
use common::probe::{metrics, sample};
use common::traffic::{traffic_until, Pinger};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";

fn mux_series(name: &str, tunnel: &str, kind: &str) -> String {
    format!("{name}{{tunnel=\"{tunnel}\",kind=\"{kind}\"}}")
}

fn refused_series(tunnel: &str, reason: &str) -> String {
    format!(
        "spiffe_tunnel_mux_streams_refused_total{{tunnel=\"{tunnel}\",kind=\"inbound\",reason=\"{reason}\"}}"
    )
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// An inbound node (as `api`) and an outbound node (as `web`), each a
/// daemon with its own files.
struct Nodes {
    _dir: tempfile::TempDir,
    _ca: Ca,
    server: FileNode,
    client: FileNode,
}

impl Nodes {
    /// `inbounds`/`outbounds` are the TOML of each node's tunnels.
    async fn start(inbounds: &str, outbounds: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("example.org");
        let server = FileNode::start(&dir.path().join("in"), &ca.leaf(API), "", inbounds).await;
        let client = FileNode::start(&dir.path().join("out"), &ca.leaf(WEB), "", outbounds).await;
        Self {
            _dir: dir,
            _ca: ca,
            server,
            client,
        }
    }
}

/// A mTLS client config for `leaf` that offers ALPN `h2`.
fn h2_config(leaf: &Leaf) -> Arc<rustls::ClientConfig> {
    let mut config =
        rustls::ClientConfig::clone(&raw_client_config(Some((&leaf.chain_pem, &leaf.key_pem))));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

async fn tls_to(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("spiffe-tunnel.test").unwrap(), tcp)
        .await
        .unwrap()
}

/// An h2 client connection as `leaf` to `addr`, driven on its own task.
async fn h2_client(addr: SocketAddr, leaf: &Leaf) -> h2::client::SendRequest<Bytes> {
    let tls = tls_to(addr, h2_config(leaf)).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    client
}

fn connect_request(authority: &str) -> http::Request<()> {
    http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap()
}

/// A target that records what each connection sent and whether it has
/// closed, and echoes.
#[derive(Clone, Default)]
struct Recorder {
    addr: Option<SocketAddr>,
    accepts: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let me = Self {
            addr: Some(listener.local_addr().unwrap()),
            ..Self::default()
        };
        let shared = me.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                shared.accepts.fetch_add(1, Ordering::SeqCst);
                shared.open.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                shared.received.lock().unwrap().extend_from_slice(&buf[..n]);
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    shared.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        me
    }

    fn addr(&self) -> SocketAddr {
        self.addr.unwrap()
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

// ---------------------------------------------------------------------------
// Mixed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_and_multiplexed_outbounds_share_one_inbound_port() {
    let target = Target::start(TargetMode::Echo).await;
    let api = free_addr();
    let (direct, mux) = (free_addr(), free_addr());
    let nodes = Nodes::start(
        &inbound(
            "api",
            api,
            target.addr.to_string(),
            &format!("\"{WEB}\""),
            "access_log = true",
        ),
        &(outbound("direct", direct, api, &format!("\"{API}\""), "")
            + &outbound("mux", mux, api, &format!("\"{API}\""), "multiplex = true")),
    )
    .await;
    for i in 0..5u8 {
        let msg = pattern(1000, i);
        assert_eq!(roundtrip(direct, &msg).await.unwrap(), msg, "direct {i}");
        assert_eq!(roundtrip(mux, &msg).await.unwrap(), msg, "multiplexed {i}");
    }
    assert_eq!(target.accepts(), 10);
    nodes
        .server
        .daemon
        .wait_log("connection closed", 10, Duration::from_secs(10))
        .await;
    let log = nodes.server.daemon.log();
    let closed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("spiffe_tunnel::access"))
        .collect();
    let count = |flag: &str| closed.iter().filter(|l| l.contains(flag)).count();
    assert_eq!(count("multiplexed=true"), 5, "{log}");
    assert_eq!(count("multiplexed=false"), 5, "{log}");
    // Five streams, one pooled connection: one handshake for all of them.
    let m = metrics(nodes.server.admin).await;
    let opened = mux_series(
        "spiffe_tunnel_mux_connections_opened_total",
        "api",
        "inbound",
    );
    assert_eq!(sample(&m, &opened), 1.0, "{m}");
    let m = metrics(nodes.client.admin).await;
    let opened = mux_series(
        "spiffe_tunnel_mux_connections_opened_total",
        "mux",
        "outbound",
    );
    assert_eq!(sample(&m, &opened), 1.0, "{m}");
    let pooled = mux_series("spiffe_tunnel_mux_connections", "mux", "outbound");
    assert_eq!(sample(&m, &pooled), 1.0, "{m}");
    let direct_opened = mux_series(
        "spiffe_tunnel_mux_connections_opened_total",
        "direct",
        "outbound",
    );
    assert_eq!(sample(&m, &direct_opened), 0.0, "{m}");
}

// ---------------------------------------------------------------------------
// Data

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_mib_each_way_and_half_close_both_ways_over_streams() {
    let echo = Target::start(TargetMode::Echo).await;
    let count = Target::start(TargetMode::CountThenReply).await;
    let greet = Target::start(TargetMode::Greet).await;
    let (api_echo, api_count, api_greet) = (free_addr(), free_addr(), free_addr());
    let (out_echo, out_count, out_greet) = (free_addr(), free_addr(), free_addr());
    let allow_web = format!("\"{WEB}\"");
    let allow_api = format!("\"{API}\"");
    let _nodes = Nodes::start(
        &(inbound("echo", api_echo, echo.addr.to_string(), &allow_web, "")
            + &inbound("count", api_count, count.addr.to_string(), &allow_web, "")
            + &inbound("greet", api_greet, greet.addr.to_string(), &allow_web, "")),
        &(outbound("echo", out_echo, api_echo, &allow_api, "multiplex = true")
            + &outbound(
                "count",
                out_count,
                api_count,
                &allow_api,
                "multiplex = true",
            )
            + &outbound(
                "greet",
                out_greet,
                api_greet,
                &allow_api,
                "multiplex = true",
            )),
    )
    .await;

    // 32 MiB up and the same back down, concurrently, on one stream.
    let data = pattern(32 << 20, 7);
    let stream = TcpStream::connect(out_echo).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sent = data.clone();
    let writing = tokio::spawn(async move {
        writer.write_all(&sent).await.unwrap();
        writer.shutdown().await.unwrap();
    });
    let mut echoed = Vec::with_capacity(data.len());
    tokio::time::timeout(Duration::from_secs(120), reader.read_to_end(&mut echoed))
        .await
        .expect("echo finished in time")
        .unwrap();
    writing.await.unwrap();
    assert_eq!(echoed.len(), data.len(), "byte count");
    assert!(echoed == data, "echoed bytes differ from the bytes sent");

    // Client → target closes first (END_STREAM up); the target answers
    // after its EOF, and its close comes back down as END_STREAM.
    let answer = roundtrip(out_count, &pattern(100_000, 1)).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&answer), "got 100000 bytes");

    // The target speaks first and keeps echoing after the client closed.
    let mut stream = TcpStream::connect(out_greet).await.unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"hello from target\n");
    stream.write_all(b"ping").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, b"ping");
}

// ---------------------------------------------------------------------------
// Concurrency

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_spread_over_several_pooled_connections() {
    const STREAMS: usize = 1000;
    const BOUND: usize = 100;
    let target = Target::start(TargetMode::Echo).await;
    let api = free_addr();
    let mux = free_addr();
    let nodes = Nodes::start(
        &inbound(
            "api",
            api,
            target.addr.to_string(),
            &format!("\"{WEB}\""),
            "max_streams_per_connection = 1000",
        ),
        &outbound(
            "mux",
            mux,
            api,
            &format!("\"{API}\""),
            &format!("multiplex = true\nmax_streams_per_connection = {BOUND}"),
        ),
    )
    .await;
    // Every stream is opened and echoes once, then all are held open
    // together until the last one is in.
    let all_open = Arc::new(tokio::sync::Barrier::new(STREAMS + 1));
    let release = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        let all_open = Arc::clone(&all_open);
        let release = Arc::clone(&release);
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(mux).await?;
            let msg = format!("stream {i:05}");
            s.write_all(msg.as_bytes()).await?;
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await?;
            if back != msg.as_bytes() {
                return Err(std::io::Error::other(format!("stream {i}: wrong echo")));
            }
            let notified = release.notified();
            all_open.wait().await;
            notified.await;
            s.shutdown().await?;
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await?;
            Ok::<_, std::io::Error>(())
        }));
    }
    tokio::time::timeout(Duration::from_secs(120), all_open.wait())
        .await
        .expect("every stream opened in time");
    let m = metrics(nodes.client.admin).await;
    let active = mux_series("spiffe_tunnel_mux_streams_active", "mux", "outbound");
    let pooled = mux_series("spiffe_tunnel_mux_connections", "mux", "outbound");
    assert_eq!(sample(&m, &active), STREAMS as f64, "{m}");
    let connections = sample(&m, &pooled);
    // At the bound a stream gets a new connection, and a burst does not
    // make one per stream.
    assert!(
        connections >= (STREAMS / BOUND) as f64 && connections <= (2 * STREAMS / BOUND) as f64,
        "{connections} pooled connections for {STREAMS} streams at {BOUND} per connection\n{m}"
    );
    release.notify_waiters();
    for (i, task) in tasks.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap_or_else(|_| panic!("stream {i} did not finish"))
            .unwrap()
            .unwrap_or_else(|e| panic!("stream {i}: {e}"));
    }
    assert_eq!(target.accepts(), STREAMS);
    let m = metrics(nodes.server.admin).await;
    let ok = "spiffe_tunnel_connections_total{tunnel=\"api\",kind=\"inbound\",result=\"ok\"}";
    assert_eq!(sample(&m, ok), STREAMS as f64, "{m}");
}

// ---------------------------------------------------------------------------
// Authorization

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_id_gets_no_stream_and_a_reload_revokes_the_pooled_connection() {
    let target = Target::start(TargetMode::Echo).await;
    let api = free_addr();
    let mux = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let policy_dir = dir.path().join("in");
    std::fs::create_dir_all(&policy_dir).unwrap();
    std::fs::write(policy_dir.join("web.policy"), format!("{WEB}\n")).unwrap();
    let server = FileNode::start(
        &policy_dir,
        &ca.leaf(API),
        "",
        &inbound(
            "api",
            api,
            target.addr.to_string(),
            "",
            "policy = \"web.policy\"",
        ),
    )
    .await;
    let allow_api = format!("\"{API}\"");
    let client = FileNode::start(
        &dir.path().join("out"),
        &ca.leaf(WEB),
        "",
        &outbound("mux", mux, api, &allow_api, "multiplex = true"),
    )
    .await;
    let intruder_addr = free_addr();
    let intruder = FileNode::start(
        &dir.path().join("intruder"),
        &ca.leaf("spiffe://example.org/intruder"),
        "",
        &outbound("mux", intruder_addr, api, &allow_api, "multiplex = true"),
    )
    .await;

    // The intruder's every stream is refused; not one reaches the target.
    for _ in 0..3 {
        let got = roundtrip(intruder_addr, b"must not arrive").await;
        assert!(
            got.as_ref().map_or(true, Vec::is_empty),
            "the intruder got {got:?}"
        );
    }
    intruder
        .daemon
        .wait_log("connection refused", 3, Duration::from_secs(10))
        .await;
    assert_eq!(target.accepts(), 0);
    let m = metrics(server.admin).await;
    let denied =
        "spiffe_tunnel_connections_total{tunnel=\"api\",kind=\"inbound\",result=\"denied\"}";
    assert!(sample(&m, denied) >= 1.0, "{m}");

    // web gets through, and keeps a stream open on the pooled connection.
    let mut held = Pinger::open(mux).await;
    assert_eq!(roundtrip(mux, b"hello").await.unwrap(), b"hello");
    let accepted = target.accepts();
    assert_eq!(accepted, 2);

    // The policy stops allowing web: the pooled connection goes, with the
    // stream on it, on the inbound's side and so on the outbound's.
    std::fs::write(
        policy_dir.join("web.policy"),
        "spiffe://example.org/someone-else\n",
    )
    .unwrap();
    server.daemon.signal("HUP");
    server
        .daemon
        .wait_log("live connection revoked", 1, Duration::from_secs(10))
        .await;
    assert!(
        held.closed_within(Duration::from_secs(10)).await,
        "the stream on the revoked connection stayed open"
    );
    let m = metrics(server.admin).await;
    let open = mux_series("spiffe_tunnel_mux_connections", "api", "inbound");
    assert_eq!(sample(&m, &open), 0.0, "{m}");
    // The next stream dials afresh, and is refused at the handshake.
    let got = roundtrip(mux, b"must not arrive either").await;
    assert!(got.as_ref().map_or(true, Vec::is_empty), "got {got:?}");
    assert_eq!(target.accepts(), accepted);
    let m = metrics(server.admin).await;
    let opened = mux_series(
        "spiffe_tunnel_mux_connections_opened_total",
        "api",
        "inbound",
    );
    assert_eq!(
        sample(&m, &opened),
        1.0,
        "a second connection was accepted: {m}"
    );
    client
        .daemon
        .wait_log("connection refused", 1, Duration::from_secs(10))
        .await;
}

// ---------------------------------------------------------------------------
// Rotation

/// The (timestamp, serial) of each new SVID a daemon logged for `id`.
fn rotations(log: &str, id: &str) -> Vec<(String, String)> {
    let needle = format!("spiffe_id={id} ");
    let mut seen: Vec<(String, String)> = Vec::new();
    for line in log
        .lines()
        .filter(|l| l.contains("SVID in use") && l.contains(&needle))
    {
        let stamp = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        if let Some(serial) = line
            .split("serial=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
        {
            if seen.last().map(|(_, s)| s.as_str()) != Some(serial) {
                seen.push((stamp, serial.to_string()));
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rotation_no_stream_opens_on_a_connection_of_an_older_svid() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let agent = Daemon::spawn(
        &[
            "dev-agent",
            "--socket",
            socket.to_str().unwrap(),
            "--trust-domain",
            "example.org",
            "--id",
            WEB,
            "--id",
            API,
            "--ttl",
            "2s",
        ],
        dir.path(),
        &[],
    );
    let path = socket.clone();
    wait_until("the agent socket", Duration::from_secs(20), move || {
        path.exists()
    })
    .await;
    let target = Target::start(TargetMode::Echo).await;
    let api = free_addr();
    let mux = free_addr();
    let identity = format!(
        "[identity]\nsource = \"workload_api\"\nsocket = \"unix://{}\"\nstartup_timeout = \"20s\"\n",
        socket.display()
    );
    let in_config = dir.path().join("inbound.toml");
    std::fs::write(
        &in_config,
        format!(
            "{identity}[[inbound]]\nname = \"api\"\nlisten = \"{api}\"\ntarget = \"{}\"\nsvid = \"{API}\"\nallow = [\"{WEB}\"]\naccess_log = true\n",
            target.addr
        ),
    )
    .unwrap();
    let out_config = dir.path().join("outbound.toml");
    std::fs::write(
        &out_config,
        format!(
            "{identity}[[outbound]]\nname = \"api\"\nlisten = \"{mux}\"\nupstreams = [\"{api}\"]\nsvid = \"{WEB}\"\nallow = [\"{API}\"]\nmultiplex = true\n"
        ),
    )
    .unwrap();
    let inbound = Daemon::run(&in_config);
    let outbound = Daemon::run(&out_config);
    inbound.wait_running().await;
    outbound.wait_running().await;

    let mut pinger = Pinger::open(mux).await;
    let (count, failures) = traffic_until(mux, &mut pinger, Duration::from_secs(40), || {
        rotations(&outbound.log(), WEB).len() >= 5
    })
    .await;
    assert!(
        failures.is_empty(),
        "{} of {count} failed: {failures:?}",
        failures.len()
    );
    assert!(count > 20, "only {count} connections");
    drop(pinger);

    // Each stream's access log line names the serial of the SVID the
    // outbound presented on its connection; at the stream's end it must
    // be the outbound's newest or the one before (a stream lasts
    // milliseconds, a rotation about a second).
    let published = rotations(&outbound.log(), WEB);
    inbound
        .wait_log("connection closed", count, Duration::from_secs(10))
        .await;
    let log = inbound.log();
    let mut checked = 0;
    let mut serials_seen = std::collections::BTreeSet::new();
    for line in log
        .lines()
        .filter(|l| l.contains("spiffe_tunnel::access") && l.contains("multiplexed=true"))
    {
        let stamp = line.split_whitespace().next().unwrap();
        let serial = line
            .split("peer_serial=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no peer_serial in {line}"));
        let newest = published
            .iter()
            .rposition(|(at, _)| at.as_str() <= stamp)
            .unwrap_or(0);
        let used = published
            .iter()
            .position(|(_, s)| s == serial)
            .unwrap_or_else(|| panic!("serial {serial} was never the outbound's: {published:?}"));
        assert!(
            used + 1 >= newest,
            "a stream ending at {stamp} ran on a connection made with serial #{used} ({serial}) \
             while #{newest} was in use: {published:?}"
        );
        serials_seen.insert(serial.to_string());
        checked += 1;
    }
    assert!(
        checked >= count,
        "{checked} stream lines for {count} connections"
    );
    assert!(
        serials_seen.len() >= 3,
        "streams used only {serials_seen:?}: the pool did not follow the rotations"
    );
    drop(agent);
}

// ---------------------------------------------------------------------------
// Hostile input

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A HEADERS block of literal fields (no indexing, no Huffman).
fn literal_headers(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// Reads frames for `period` and returns (type, stream, payload) of each.
async fn read_frames<S: tokio::io::AsyncRead + Unpin>(
    io: &mut S,
    period: Duration,
) -> Vec<(u8, u32, Vec<u8>)> {
    let mut frames = Vec::new();
    let deadline = tokio::time::Instant::now() + period;
    loop {
        let mut head = [0u8; 9];
        match tokio::time::timeout_at(deadline, io.read_exact(&mut head)).await {
            Ok(Ok(_)) => {}
            _ => return frames,
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        if tokio::time::timeout_at(deadline, io.read_exact(&mut payload))
            .await
            .is_err()
        {
            return frames;
        }
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        frames.push((head[3], stream, payload));
    }
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const REFUSED_STREAM: u32 = 0x7;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_streams_are_refused_or_cut_and_never_reach_the_target() {
    const LIMIT: usize = 4;
    let target = Recorder::start().await;
    let api = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let server = FileNode::start(
        &dir.path().join("in"),
        &ca.leaf(API),
        "",
        &inbound(
            "api",
            api,
            target.addr().to_string(),
            &format!("\"{WEB}\""),
            &format!("max_streams_per_connection = {LIMIT}\nidle_timeout = \"1s\"\nhandshake_timeout = \"2s\""),
        ),
    )
    .await;
    let web = ca.leaf(WEB);
    let authority = target.addr().to_string();

    // A CONNECT for anything but the target: 421, with the reason.
    let client = h2_client(api, &web).await;
    for other in ["169.254.169.254:80", "127.0.0.1:22", "example.org:443"] {
        let mut client = client.clone().ready().await.unwrap();
        let (response, _send) = client.send_request(connect_request(other), false).unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            response.status(),
            http::StatusCode::MISDIRECTED_REQUEST,
            "{other}"
        );
        let why = response.headers()["spiffe-tunnel-refusal"]
            .to_str()
            .unwrap();
        assert!(why.contains("serves only its target"), "{why}");
    }
    // Not a CONNECT: 405.
    let mut ready = client.clone().ready().await.unwrap();
    let get = http::Request::builder()
        .uri(format!("https://{authority}/"))
        .body(())
        .unwrap();
    let (response, _send) = ready.send_request(get, true).unwrap();
    assert_eq!(
        response.await.unwrap().status(),
        http::StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(target.accepts(), 0, "a refused stream reached the target");
    let m = metrics(server.admin).await;
    assert_eq!(sample(&m, &refused_series("api", "authority")), 3.0, "{m}");
    assert_eq!(
        sample(&m, &refused_series("api", "bad_request")),
        1.0,
        "{m}"
    );

    // A stream that never sends END_STREAM (nor anything after its first
    // bytes) is cut at idle_timeout, and so is its target connection.
    let mut ready = client.clone().ready().await.unwrap();
    let (response, mut send) = ready
        .send_request(connect_request(&authority), false)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    send.send_data(Bytes::from_static(b"hello"), false).unwrap();
    let mut body = response.into_body();
    let echoed = tokio::time::timeout(Duration::from_secs(5), body.data())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&echoed[..], b"hello");
    let _ = body.flow_control().release_capacity(echoed.len());
    let cut = tokio::time::timeout(Duration::from_secs(8), async {
        while let Some(Ok(d)) = body.data().await {
            let _ = body.flow_control().release_capacity(d.len());
        }
    })
    .await;
    assert!(cut.is_ok(), "a silent stream was not cut at idle_timeout");
    wait_until(
        "the target connection closed",
        Duration::from_secs(5),
        || target.open() == 0,
    )
    .await;
    assert_eq!(target.accepts(), 1);
    drop(client);

    // A flood of streams beyond the limit, in raw frames (h2's own client
    // would hold them back): those past the limit are refused with
    // REFUSED_STREAM and never reach the target.
    let mut tls = tls_to(api, h2_config(&web)).await;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let frames = read_frames(&mut tls, Duration::from_millis(500)).await;
    assert!(frames.iter().any(|(t, _, _)| *t == SETTINGS), "{frames:?}");
    tls.write_all(&frame(SETTINGS, 0x1, 0, &[])).await.unwrap();
    let flood = LIMIT + 6;
    let block = literal_headers(&[(":method", "CONNECT"), (":authority", &authority)]);
    let mut burst = Vec::new();
    for i in 0..flood as u32 {
        burst.extend(frame(HEADERS, 0x4, 1 + 2 * i, &block));
    }
    tls.write_all(&burst).await.unwrap();
    tls.flush().await.unwrap();
    let frames = read_frames(&mut tls, Duration::from_secs(3)).await;
    let refused: Vec<u32> = frames
        .iter()
        .filter(|(t, _, p)| {
            *t == RST_STREAM
                && p.len() == 4
                && u32::from_be_bytes([p[0], p[1], p[2], p[3]]) == REFUSED_STREAM
        })
        .map(|(_, s, _)| *s)
        .collect();
    // Streams answered (200, and later their trailers when idle_timeout
    // cuts them): at most the limit.
    let answered = frames
        .iter()
        .filter(|(t, s, _)| *t == HEADERS && *s > 0)
        .map(|(_, s, _)| *s)
        .collect::<std::collections::BTreeSet<u32>>()
        .len();
    assert!(
        answered <= LIMIT,
        "{answered} streams answered over a limit of {LIMIT}: {frames:?}"
    );
    assert!(
        refused.len() >= flood - LIMIT,
        "only {} of {} streams over the limit were refused: {frames:?}",
        refused.len(),
        flood - LIMIT
    );
    assert!(
        target.accepts() <= 1 + LIMIT,
        "{} target connections for a limit of {LIMIT}",
        target.accepts()
    );
    drop(tls);

    // A client that chooses h2 and then never sends the HTTP/2 preface
    // is cut at the handshake timeout.
    let mut silent = tls_to(api, h2_config(&web)).await;
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(8), silent.read_to_end(&mut sink)).await;
    assert!(ended.is_ok(), "a client without an HTTP/2 preface was kept");
    server
        .daemon
        .wait_log("no HTTP/2 preface", 1, Duration::from_secs(5))
        .await;
    assert!(target.received.lock().unwrap().as_slice() == b"hello");
}
