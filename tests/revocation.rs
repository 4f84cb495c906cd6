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
            &target.to_string(),
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
