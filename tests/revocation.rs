//! When live connections are closed, and when they are not, over real
//! sockets and a real daemon: a revocation that lands while the inbound is
//! still dialling its target, a CA that leaves the bundle because it
//! expired (nothing is closed) next to one removed while still valid (its
//! connections are), and `max_connection_lifetime`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::certs::Ca;
use common::harness::*;
use common::node::{inbound, FileNode};
use common::probe::{metrics, sample, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";

fn closed_series(tunnel: &str, end: &str) -> String {
    format!("spiffe_tunnel_connections_closed_total{{tunnel=\"{tunnel}\",kind=\"inbound\",end=\"{end}\"}}")
}

/// A listener whose accept queue is full, so that a new connection to it
/// hangs in SYN_SENT (the kernel drops its SYN) until the test accepts.
/// Returns the listener and the local addresses of the fillers.
async fn full_listener() -> (TcpListener, Vec<TcpStream>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("filling the accept queue: {e}"),
            Err(_) => break,
        }
        assert!(fillers.len() < 64, "the accept queue never filled");
    }
    (listener, fillers)
}

/// Accepts for `period` and returns what every connection that is not one
/// of `fillers` sent.
async fn accept_strangers(
    listener: &TcpListener,
    fillers: &[TcpStream],
    period: Duration,
) -> Vec<Vec<u8>> {
    let ours: Vec<SocketAddr> = fillers.iter().map(|f| f.local_addr().unwrap()).collect();
    let mut strangers = Vec::new();
    let deadline = tokio::time::Instant::now() + period;
    while let Ok(Ok((mut s, from))) = tokio::time::timeout_at(deadline, listener.accept()).await {
        if ours.contains(&from) {
            continue;
        }
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut got)).await;
        strangers.push(got);
    }
    strangers
}

/// A revocation while the inbound waits for its target to accept: the
/// dial is abandoned, and the target receives nothing, not even the PROXY
/// header that used to be written without looking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_revoked_while_its_target_is_dialled_sends_the_target_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let (listener, fillers) = full_listener().await;
    let target = listener.local_addr().unwrap();
    let listen = free_addr();
    let dir = tmp.path().join("node");
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("web.policy");
    std::fs::write(&policy, format!("{WEB}\n")).unwrap();
    let node = FileNode::start(
        &dir,
        &ca.leaf(API),
        "",
        &inbound(
            "api",
            listen,
            target,
            "",
            "policy = \"web.policy\"\nproxy_protocol = true\nconnect_timeout = \"20s\"",
        ),
    )
    .await;

    let web = ca.leaf(WEB);
    let config = raw_client_config(Some((&web.chain_pem, &web.key_pem)));
    let tcp = TcpStream::connect(listen).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls_pki_types::ServerName::try_from("spiffe-tunnel.test").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls.write_all(b"must never reach the target").await.unwrap();
    tls.flush().await.unwrap();
    // Admitted, and now dialling a target that does not accept.
    let admitted = Instant::now() + Duration::from_secs(10);
    while status(node.admin).await["tunnels"][0]["peers"]
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        assert!(Instant::now() < admitted, "the client was never admitted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    std::fs::write(&policy, "spiffe://example.org/someone-else\n").unwrap();
    node.daemon.signal("HUP");
    node.daemon
        .wait_log("live connection revoked", 1, Duration::from_secs(10))
        .await;
    node.daemon
        .wait_log(
            "connection closed while the target was dialled",
            1,
            Duration::from_secs(5),
        )
        .await;
    // The target accepts again: a dial still under way would complete at
    // its next SYN (1 s) and send the PROXY header.
    let strangers = accept_strangers(&listener, &fillers, Duration::from_millis(1500)).await;
    let total: usize = strangers.iter().map(Vec::len).sum();
    assert_eq!(total, 0, "the target received {total} bytes: {strangers:?}");
    let m = metrics(node.admin).await;
    assert_eq!(sample(&m, &closed_series("api", "revoked")), 1.0, "{m}");
}

/// A raw mTLS connection through an inbound with an echo target.
struct Echo(tokio_rustls::client::TlsStream<TcpStream>);

impl Echo {
    async fn open(addr: SocketAddr, leaf: &common::certs::Leaf) -> Self {
        let config = raw_client_config(Some((&leaf.chain_pem, &leaf.key_pem)));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(
                rustls_pki_types::ServerName::try_from("spiffe-tunnel.test").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let mut echo = Self(tls);
        assert!(echo.works().await, "the connection did not come up");
        echo
    }

    /// True when a message comes back; false once the tunnel closed it.
    async fn works(&mut self) -> bool {
        let msg = b"ping";
        if self.0.write_all(msg).await.is_err() || self.0.flush().await.is_err() {
            return false;
        }
        let mut buf = [0u8; 4];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.0.read_exact(&mut buf)).await,
            Ok(Ok(_)) if &buf == msg
        )
    }

    /// Waits until the tunnel closes the connection; returns how long.
    async fn closed_within(&mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(limit, self.0.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => {}
                Err(_) => panic!("the connection was not closed within {limit:?}"),
            }
        }
    }
}

/// Two CAs leave the bundle at once: one because it expired, one while
/// still valid. Only the connection through the valid one is revoked; the
/// other lives on (it used to be cut too, as if its CA were distrusted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_expired_closes_nothing_and_a_removed_valid_one_revokes() {
    use common::certs::{now, set_validity};
    let tmp = tempfile::tempdir().unwrap();
    let ours = Ca::new("example.org");
    let start = now();
    let expires = start + Duration::from_secs(3);
    let short = Ca::new_with("example.org", |p| {
        set_validity(p, start - Duration::from_secs(60), expires)
    });
    let removed = Ca::new("example.org");
    let echo = Target::start(TargetMode::Echo).await;
    let listen = free_addr();
    let node = FileNode::start(
        &tmp.path().join("node"),
        &ours.leaf(API),
        "",
        &inbound("api", listen, echo.addr, &format!("{WEB:?}"), ""),
    )
    .await;
    let bundle = node.dir.join("bundle.pem");
    std::fs::write(
        &bundle,
        [ours.bundle_pem(), short.bundle_pem(), removed.bundle_pem()].concat(),
    )
    .unwrap();
    node.daemon
        .wait_log("identity files reloaded", 1, Duration::from_secs(10))
        .await;

    let through_short = short
        .leaf_builder(WEB)
        .validity(start - Duration::from_secs(60), expires)
        .build();
    let mut expiring = Echo::open(listen, &through_short).await;
    let mut distrusted = Echo::open(listen, &removed.leaf(WEB)).await;

    // Once the short CA has expired, both leave the bundle.
    while now() <= expires + Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(expiring.works().await);
    std::fs::write(&bundle, ours.bundle_pem()).unwrap();
    node.daemon
        .wait_log("live connection revoked", 1, Duration::from_secs(10))
        .await;
    distrusted.closed_within(Duration::from_secs(5)).await;
    assert!(
        expiring.works().await,
        "the connection through the CA that expired was closed:\n{}",
        node.daemon.log()
    );
    let m = metrics(node.admin).await;
    assert_eq!(sample(&m, &closed_series("api", "revoked")), 1.0, "{m}");
    assert_eq!(
        node.daemon.log().matches("live connection revoked").count(),
        1
    );
}

/// `max_connection_lifetime` in `[defaults]` closes a connection that is
/// still busy once it is older than that, and counts it as `lifetime`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_older_than_max_connection_lifetime_are_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let echo = Target::start(TargetMode::Echo).await;
    let listen = free_addr();
    let node = FileNode::start(
        &tmp.path().join("node"),
        &ca.leaf(API),
        "max_connection_lifetime = \"1500ms\"",
        &inbound("api", listen, echo.addr, &format!("{WEB:?}"), ""),
    )
    .await;
    let web = ca.leaf(WEB);
    let mut conn = Echo::open(listen, &web).await;
    let opened = Instant::now();
    // Busy until the end: it is its age, not idleness, that closes it.
    while conn.works().await {
        assert!(
            opened.elapsed() < Duration::from_secs(10),
            "still open after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let age = opened.elapsed();
    assert!(
        age >= Duration::from_millis(1400),
        "closed after only {age:?}"
    );
    let m = metrics(node.admin).await;
    assert_eq!(sample(&m, &closed_series("api", "lifetime")), 1.0, "{m}");
}
