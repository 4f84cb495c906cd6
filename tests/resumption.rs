//! TLS session resumption keeps every security property of a full
//! handshake: a resumed session is verified and authorized again on every
//! connection (a policy that stops allowing the peer refuses it, a client
//! certificate that expired since the ticket was issued is refused), and
//! no ticket survives a rotation of the server's SVID. Real processes,
//! real sockets; the handshake counters on `/metrics` show which kind of
//! handshake each connection made.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::certs::Ca;
use common::harness::*;
use common::probe::{metrics, sample, wait_metric};

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";
const WAIT: Duration = Duration::from_secs(10);

fn handshakes(kind: &str, mode: &str) -> String {
    format!("spiffe_tunnel_handshakes_total{{tunnel=\"api\",kind=\"{kind}\",mode=\"{mode}\"}}")
}

fn connections(kind: &str, result: &str) -> String {
    format!("spiffe_tunnel_connections_total{{tunnel=\"api\",kind=\"{kind}\",result=\"{result}\"}}")
}

struct Node {
    dir: PathBuf,
    daemon: Daemon,
    admin: SocketAddr,
}

/// A daemon presenting `id` from files, with an admin endpoint.
async fn node(dir: &Path, ca: &Ca, id: &str, tunnels: &str) -> Node {
    std::fs::create_dir_all(dir).unwrap();
    ca.leaf(id).write_files(dir);
    let admin = free_addr();
    let config = dir.join("tunnel.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\nsource = \"files\"\ncert = \"svid.pem\"\nkey = \"svid.key\"\n\
             [identity.bundles]\n\"example.org\" = \"bundle.pem\"\n\
             [admin]\nlisten = \"{admin}\"\n{tunnels}"
        ),
    )
    .unwrap();
    let daemon = Daemon::run(&config);
    daemon.wait_running().await;
    Node {
        dir: dir.to_path_buf(),
        daemon,
        admin,
    }
}

/// An inbound node (as `api`, allowing what `policy` says) in front of an
/// echo target, and an outbound node (as `web`) in front of it.
struct Pair {
    _tmp: tempfile::TempDir,
    ca: Ca,
    target: Target,
    policy: PathBuf,
    server: Node,
    client: Node,
    inbound_addr: SocketAddr,
    outbound_addr: SocketAddr,
}

impl Pair {
    async fn start() -> Self {
        Self::start_with("").await
    }

    /// With `server_tables` (TOML) ahead of the inbound's tunnel.
    async fn start_with(server_tables: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let ca = Ca::new("example.org");
        let target = Target::start(TargetMode::Echo).await;
        let (in_addr, out_addr) = (free_addr(), free_addr());
        let policy = tmp.path().join("api.policy");
        std::fs::write(&policy, format!("{WEB}\n")).unwrap();
        let server = node(
            &tmp.path().join("in"),
            &ca,
            API,
            &format!(
                "{server_tables}[[inbound]]\nname = \"api\"\nlisten = \"{in_addr}\"\ntarget = \"{}\"\npolicy = {:?}\n",
                target.addr,
                policy.display().to_string()
            ),
        )
        .await;
        let client = node(
            &tmp.path().join("out"),
            &ca,
            WEB,
            &format!(
                "[[outbound]]\nname = \"api\"\nlisten = \"{out_addr}\"\nupstreams = [\"{in_addr}\"]\nallow = [\"{API}\"]\n"
            ),
        )
        .await;
        Self {
            _tmp: tmp,
            ca,
            target,
            policy,
            server,
            client,
            inbound_addr: in_addr,
            outbound_addr: out_addr,
        }
    }

    /// Connects until the client side reports a resumed handshake (the
    /// first connection is a full one that brings the tickets).
    async fn until_resumed(&self) {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            assert_eq!(
                roundtrip(self.outbound_addr, b"ping").await.unwrap(),
                b"ping"
            );
            let m = metrics(self.client.admin).await;
            if sample(&m, &handshakes("outbound", "resumed")) >= 1.0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no resumed handshake after {WAIT:?}:\n{m}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_sessions_are_authorized_against_the_policy_of_now() {
    let pair = Pair::start().await;
    pair.until_resumed().await;
    wait_metric(
        pair.server.admin,
        &handshakes("inbound", "resumed"),
        1.0,
        WAIT,
    )
    .await;

    // The policy stops allowing web. The client still holds tickets, and
    // the server's ticket key has not changed (a policy is not an
    // identity), so the next connection resumes: and is refused all the
    // same, before the target hears of it.
    std::fs::write(
        &pair.policy,
        "deny spiffe://example.org/web\nspiffe://example.org/**\n",
    )
    .unwrap();
    pair.server.daemon.signal("HUP");
    pair.server.daemon.wait_log("reloaded: ", 1, WAIT).await;
    let before = metrics(pair.server.admin).await;
    let resumed_before = sample(&before, &handshakes("inbound", "resumed"));
    let denied_before = sample(&before, &connections("inbound", "denied"));
    let accepts = pair.target.accepts();

    let answer = roundtrip(pair.outbound_addr, b"let me in").await;
    assert!(
        matches!(&answer, Ok(a) if a.is_empty()) || answer.is_err(),
        "{answer:?}"
    );
    wait_metric(
        pair.server.admin,
        &connections("inbound", "denied"),
        denied_before + 1.0,
        WAIT,
    )
    .await;
    let after = metrics(pair.server.admin).await;
    assert_eq!(
        sample(&after, &handshakes("inbound", "resumed")),
        resumed_before + 1.0,
        "the refused connection should have been a resumed one:\n{after}"
    );
    assert_eq!(
        pair.target.accepts(),
        accepts,
        "a denied peer reached the target"
    );
    pair.server
        .daemon
        .wait_log("denied by rule \"deny spiffe://example.org/web\"", 1, WAIT)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_that_expired_after_its_ticket_is_refused() {
    let pair = Pair::start().await;
    let in_addr = pair.inbound_addr;

    // Any TLS client that caches sessions (here plain rustls), with a web
    // certificate that expires in a few seconds.
    let not_after = SystemTime::now() + Duration::from_secs(3);
    let short = pair
        .ca
        .leaf_builder(WEB)
        .validity(SystemTime::now() - Duration::from_secs(60), not_after)
        .build();
    let config = raw_client_config(Some((&short.chain_pem, &short.key_pem)));

    assert_eq!(
        raw_tls_roundtrip(in_addr, config.clone(), b"one")
            .await
            .unwrap(),
        b"one"
    );
    // While the certificate is valid, resumption works for it.
    assert_eq!(
        raw_tls_roundtrip(in_addr, config.clone(), b"two")
            .await
            .unwrap(),
        b"two"
    );
    wait_metric(
        pair.server.admin,
        &handshakes("inbound", "resumed"),
        1.0,
        WAIT,
    )
    .await;
    let accepts = pair.target.accepts();

    wait_until("the client certificate to expire", WAIT, || {
        SystemTime::now() > not_after + Duration::from_secs(1)
    })
    .await;
    let refused = raw_tls_roundtrip(in_addr, config, b"three").await;
    assert!(
        refused.is_err(),
        "an expired certificate got through: {refused:?}"
    );
    wait_metric(
        pair.server.admin,
        &connections("inbound", "handshake_error"),
        1.0,
        WAIT,
    )
    .await;
    let m = metrics(pair.server.admin).await;
    assert_eq!(
        sample(&m, &handshakes("inbound", "resumed")),
        2.0,
        "the refused connection should have been a resumed one:\n{m}"
    );
    assert_eq!(
        pair.target.accepts(),
        accepts,
        "an expired peer reached the target"
    );
    pair.server.daemon.wait_log("expired", 1, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ticket_survives_a_rotation_of_the_server_svid() {
    let pair = Pair::start().await;
    pair.until_resumed().await;
    let before = metrics(pair.server.admin).await;
    let full = sample(&before, &handshakes("inbound", "full"));
    let resumed = sample(&before, &handshakes("inbound", "resumed"));

    // A new SVID for the server, as a rotation would bring.
    pair.ca.leaf(API).write_files(&pair.server.dir);
    wait_metric(
        pair.server.admin,
        "spiffe_tunnel_svid_rotations_total",
        1.0,
        WAIT,
    )
    .await;

    // The client still offers a ticket, but the server's ticket key went
    // with the old SVID: a full handshake, and it works.
    assert_eq!(
        roundtrip(pair.outbound_addr, b"after").await.unwrap(),
        b"after"
    );
    let m = wait_metric(
        pair.server.admin,
        &handshakes("inbound", "full"),
        full + 1.0,
        WAIT,
    )
    .await;
    assert_eq!(m, full + 1.0);
    let m = metrics(pair.server.admin).await;
    assert_eq!(
        sample(&m, &handshakes("inbound", "resumed")),
        resumed,
        "{m}"
    );

    // And the tickets of the new key resume again.
    pair.until_resumed().await;
    wait_metric(
        pair.server.admin,
        &handshakes("inbound", "resumed"),
        resumed + 1.0,
        WAIT,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_resumption_can_be_turned_off() {
    let pair = Pair::start_with("[defaults]\nsession_resumption = false\n").await;
    let (out_addr, server, client) = (pair.outbound_addr, &pair.server, &pair.client);
    for _ in 0..4 {
        assert_eq!(roundtrip(out_addr, b"x").await.unwrap(), b"x");
    }
    let m = wait_metric(server.admin, &handshakes("inbound", "full"), 4.0, WAIT).await;
    assert_eq!(m, 4.0);
    let m = metrics(server.admin).await;
    assert_eq!(sample(&m, &handshakes("inbound", "resumed")), 0.0, "{m}");
    let m = metrics(client.admin).await;
    assert_eq!(sample(&m, &handshakes("outbound", "resumed")), 0.0, "{m}");
}
