//! Hardening against what an attacker, a careless rotator or a bad network
//! does to a running daemon, each over real sockets and real processes:
//! an identity update that keeps the serial, a replayed leaf padded with
//! junk CAs, a flood of refused connections, an admin endpoint polled
//! without limit, and a Workload API connection that silently stops
//! forwarding.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::certs::Ca;
use common::harness::*;
use common::node::{inbound, FileNode};
use common::probe::{metrics, sample};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls_pki_types::pem::PemObject;

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";

/// The files of an SVID rewritten with the same serial but a new key
/// (hence a new leaf) are published: the daemon presents the new
/// certificate. Comparing serials alone dropped such an update and, since
/// the watcher had marked the files seen, never looked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_with_the_same_serial_and_a_new_key_is_published() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let listen = free_addr();
    let serial = [0x5e, 0x71, 0xa1];
    let first = ca.leaf_builder(API).serial(&serial).build();
    let node = FileNode::start(
        tmp.path(),
        &first,
        "",
        &inbound("api", listen, target.addr, &format!("{WEB:?}"), ""),
    )
    .await;
    let web = ca.leaf(WEB);
    let client = raw_client_config(Some((&web.chain_pem, &web.key_pem)));
    assert_eq!(
        presented_cert(listen, client.clone()).await,
        first.leaf_der().to_vec()
    );

    let second = ca.leaf_builder(API).serial(&serial).build();
    assert_ne!(first.leaf_der(), second.leaf_der());
    std::fs::write(node.dir.join("svid.key"), &second.key_pem).unwrap();
    std::fs::write(node.dir.join("svid.pem"), &second.chain_pem).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if presented_cert(listen, client.clone()).await == second.leaf_der().to_vec() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new key and certificate were never presented:\n{}",
            node.daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.daemon
        .wait_log("identity files reloaded", 1, Duration::from_secs(5))
        .await;
}

/// A client presenting `chain` signed for with `key_pem`, which need not
/// belong to it: a replayed leaf, as anyone who has seen a peer's
/// certificate can send.
fn client_presenting(
    chain: Vec<CertificateDer<'static>>,
    key_pem: &str,
) -> Arc<rustls::ClientConfig> {
    #[derive(Debug)]
    struct Present(Arc<rustls::sign::CertifiedKey>);
    impl rustls::client::ResolvesClientCert for Present {
        fn resolve(
            &self,
            _: &[&[u8]],
            _: &[rustls::SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(Arc::clone(&self.0))
        }
        fn has_certs(&self) -> bool {
            true
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = provider
        .key_provider
        .load_private_key(PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap())
        .unwrap();
    let algorithms = provider.signature_verification_algorithms;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(algorithms)))
        .with_client_cert_resolver(Arc::new(Present(Arc::new(
            rustls::sign::CertifiedKey::new(chain, key),
        ))));
    Arc::new(config)
}

/// `(chains, bytes)` the daemon remembers as verified.
async fn remembered(admin: std::net::SocketAddr) -> (f64, f64) {
    let text = metrics(admin).await;
    (
        sample(&text, "spiffe_tunnel_verified_chains"),
        sample(&text, "spiffe_tunnel_verified_chains_bytes"),
    )
}

/// The chain cache holds only what admitted peers proved: a leaf replayed
/// without its key and padded with junk CAs (which passes the certificate
/// check, since the padding is valid CAs) leaves nothing, nor does a peer
/// the policy refuses; an admitted peer that pads its chain costs its leaf
/// and no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_cache_keeps_only_admitted_peers_and_never_their_padding() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let listen = free_addr();
    let node = FileNode::start(
        tmp.path(),
        &ca.leaf(API),
        "",
        &inbound(
            "api",
            listen,
            target.addr.to_string(),
            &format!("{WEB:?}"),
            "",
        ),
    )
    .await;
    assert_eq!(remembered(node.admin).await, (0.0, 0.0));
    let junk: Vec<CertificateDer<'static>> = (0..20)
        .map(|i| Ca::new(&format!("junk{i}.example")).root_der().clone())
        .collect();
    let padding: usize = junk.iter().map(|c| c.len()).sum();
    let padded = |leaf: &common::certs::Leaf| {
        let mut chain = leaf.chain_der.clone();
        chain.extend(junk.iter().cloned());
        chain
    };

    // Web's certificate, replayed by someone without its key.
    let web = ca.leaf(WEB);
    let mallory = ca.leaf("spiffe://example.org/mallory");
    let replay = client_presenting(padded(&web), &mallory.key_pem);
    assert!(raw_tls_roundtrip(listen, replay, b"ping").await.is_err());
    // A peer the policy refuses, with its own key.
    let other = ca.leaf("spiffe://example.org/other");
    let denied = client_presenting(padded(&other), &other.key_pem);
    assert!(raw_tls_roundtrip(listen, denied, b"ping").await.is_err());
    assert_eq!(target.accepts(), 0);
    assert_eq!(
        remembered(node.admin).await,
        (0.0, 0.0),
        "a chain was remembered before its peer was admitted"
    );

    // Web itself, padding its chain the same way: admitted and remembered
    // by its leaf, without the padding.
    let client = client_presenting(padded(&web), &web.key_pem);
    for _ in 0..3 {
        assert_eq!(
            raw_tls_roundtrip(listen, client.clone(), b"ping")
                .await
                .unwrap(),
            b"ping"
        );
    }
    let (chains, bytes) = remembered(node.admin).await;
    assert_eq!(chains, 1.0);
    let leaf = web.leaf_der().len() as f64;
    assert!(
        bytes >= leaf && bytes < leaf + 512.0,
        "{bytes} bytes remembered for a {leaf}-byte leaf padded with {padding} bytes"
    );
}

/// Over `tcp://`, a Workload API connection whose far end silently stops
/// answering (no FIN, no RST: a vanished host) is noticed by its HTTP/2
/// PING going unanswered, and the stream reconnects; without keepalive it
/// waited for the next message for ever while the SVID ran out. The
/// intervals are the test's (the default PING interval is 5 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_workload_api_connection_is_noticed_and_reconnected() {
    use common::blackhole::BlackholeRelay;
    use common::fake_api::{svid_entry, FakeWorkloadApi, Reply};
    use spiffe_tunnel::identity::workload_api::{ApiAddress, Keepalive, WorkloadApiSource};
    use spiffe_tunnel::identity::IdentityStore;
    use spiffe_tunnel::metrics::Metrics;
    use spiffe_tunnel::proto::X509svidResponse;

    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let svids = X509svidResponse {
        svids: vec![svid_entry(
            &ca.leaf(API),
            std::slice::from_ref(ca.root_der()),
        )],
        ..Default::default()
    };
    let agent = FakeWorkloadApi::start(tmp.path(), Reply::Svids(svids)).await;
    let relay = BlackholeRelay::start(agent.socket.clone()).await;
    let store = Arc::new(IdentityStore::new());
    let keepalive = Keepalive {
        http2_interval: Duration::from_millis(500),
        http2_timeout: Duration::from_millis(500),
        tcp_idle: Duration::from_secs(1),
        tcp_interval: Duration::from_secs(1),
        tcp_probes: 2,
        tcp_user_timeout: Duration::from_secs(3),
    };
    let source = WorkloadApiSource::new(
        ApiAddress::Tcp(relay.addr),
        Arc::clone(&store),
        Arc::new(Metrics::new()),
    )
    .with_keepalive(keepalive);
    let health = source.health();
    let running = tokio::spawn(source.run());
    let connected = |want: bool| {
        let mut health = health.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(10),
                health.wait_for(|h| h.connected == want),
            )
            .await
            .map(|_| ())
        }
    };
    connected(true)
        .await
        .expect("the first stream never delivered");
    assert!(store.load().is_some());
    assert_eq!(relay.accepted(), 1);

    relay.blackhole_open_connections();
    connected(false)
        .await
        .expect("a blackholed connection was never noticed");
    let why = health.borrow().last_error.clone().unwrap();
    connected(true)
        .await
        .expect("no new stream after the dead one was noticed");
    assert!(relay.accepted() >= 2);
    assert!(
        store.load().is_some(),
        "the identity stays across the outage"
    );
    running.abort();
    eprintln!("noticed: {why}");
}

#[test]
fn the_default_http2_ping_interval_is_what_spire_allows() {
    use spiffe_tunnel::identity::workload_api::Keepalive;
    // grpc-go (and so SPIRE) answers PINGs more often than every 5
    // minutes with GOAWAY too_many_pings.
    assert!(Keepalive::default().http2_interval >= Duration::from_secs(300));
}

/// The refusals a daemon's summary lines say they left out.
fn summarized(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(" more connections: "))
        .filter_map(|l| {
            l.split("refused ")
                .nth(1)?
                .split(" more connections")
                .next()
        })
        .map(|n| n.replace(',', "").parse::<usize>().unwrap())
        .sum()
}

/// Hundreds of connections that send garbage instead of a ClientHello:
/// each is refused and counted, but the log gets a few lines and then a
/// summary, which comes after the flood has stopped and leaves no
/// refusal out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refusals_writes_a_few_lines_and_counts_every_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const FLOOD: usize = 400;
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let listen = free_addr();
    let node = FileNode::start(
        tmp.path(),
        &ca.leaf(API),
        "",
        &inbound(
            "api",
            listen,
            target.addr.to_string(),
            &format!("{WEB:?}"),
            "",
        ),
    )
    .await;
    let started = std::time::Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..FLOOD {
        flood.spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
            let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut sink)).await;
        });
        if flood.len() >= 50 {
            flood.join_next().await;
        }
    }
    flood.join_all().await;
    let series = common::probe::conn_series("api", "inbound", "handshake_error");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sample(&metrics(node.admin).await, &series) < FLOOD as f64 {
        assert!(
            std::time::Instant::now() < deadline,
            "not every refusal was counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let flood_secs = started.elapsed().as_secs() as usize;
    assert_eq!(sample(&metrics(node.admin).await, &series), FLOOD as f64);

    let lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains("connection refused"))
            .count()
    };
    let during = lines(&node.daemon.log());
    // 5 at once, then one a second.
    assert!(
        during <= 5 + flood_secs + 1,
        "{during} refusal lines for {FLOOD} refusals in {flood_secs} s"
    );
    // The summary comes although the flood is over, and adds up.
    node.daemon
        .wait_log("more connections", 1, Duration::from_secs(15))
        .await;
    let log = node.daemon.log();
    assert_eq!(
        lines(&log) + summarized(&log),
        FLOOD,
        "refusals lost from the log:\n{log}"
    );
    assert!(log.lines().count() < 40, "{log}");
    assert_eq!(target.accepts(), 0);
}

/// The admin endpoint serves 16 connections at once: with that many open
/// and idle, one more is answered 503 at once (it used to be served, so a
/// local client could open any number), counted and logged, while the
/// tunnel goes on serving; once they close, the endpoint answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_capped_and_the_tunnel_still_serves() {
    use tokio::io::AsyncReadExt;
    const CAP: usize = 16;
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let listen = free_addr();
    let node = FileNode::start(
        tmp.path(),
        &ca.leaf(API),
        "",
        &inbound(
            "api",
            listen,
            target.addr.to_string(),
            &format!("{WEB:?}"),
            "",
        ),
    )
    .await;
    let web = ca.leaf(WEB);
    let client = raw_client_config(Some((&web.chain_pem, &web.key_pem)));

    let mut idle = Vec::new();
    for _ in 0..CAP {
        idle.push(tokio::net::TcpStream::connect(node.admin).await.unwrap());
    }
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let mut extra = tokio::net::TcpStream::connect(node.admin).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), extra.read_to_end(&mut answer))
            .await
            .expect("a connection over the cap was served or left waiting")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // The data plane is not held up meanwhile.
        assert_eq!(
            raw_tls_roundtrip(listen, client.clone(), b"ping")
                .await
                .unwrap(),
            b"ping"
        );
    }
    drop(idle);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let text = loop {
        let mut probe = tokio::net::TcpStream::connect(node.admin).await.unwrap();
        let mut head = [0u8; 12];
        let _ = tokio::time::timeout(Duration::from_secs(1), probe.read(&mut head)).await;
        drop(probe);
        if &head[..] != b"HTTP/1.1 503" {
            break metrics(node.admin).await;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slots never freed up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        sample(&text, "spiffe_tunnel_admin_connections_refused_total") >= 3.0,
        "{text}"
    );
    node.daemon
        .wait_log("admin connection refused", 3, Duration::from_secs(5))
        .await;
}
