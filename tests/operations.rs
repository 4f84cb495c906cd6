//! Operating a running daemon, over real sockets and signals: the admin
//! endpoint (every route, a metrics scrape whose counters move), `status`,
//! revocation of live connections by a policy reload, a refused bad reload,
//! tunnels added and removed by SIGHUP while another tunnel's connection
//! stays up, drain under load, and the per-connection access log.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::certs::Ca;
use common::harness::*;
use common::node::{inbound, only, Node};
use common::pair::{Pair, API, WEB};
use common::probe::{http_get as get, sample};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A file-identity node presenting `id`, in `dir`, running `tunnels`.
async fn node(dir: &std::path::Path, ca: &Ca, id: &str, tunnels: &str) -> Node {
    Node::start(dir, &ca.leaf(id), "", tunnels).await
}

/// An open connection through a tunnel that echoes on demand.
struct Live(TcpStream);

impl Live {
    async fn open(addr: SocketAddr) -> Self {
        let mut live = Live(TcpStream::connect(addr).await.unwrap());
        assert!(live.echo("hello").await, "the connection did not come up");
        live
    }

    /// True when the message comes back; false when the connection is gone.
    async fn echo(&mut self, msg: &str) -> bool {
        if self.0.write_all(msg.as_bytes()).await.is_err() {
            return false;
        }
        let mut buf = vec![0u8; msg.len()];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.0.read_exact(&mut buf)).await,
            Ok(Ok(_)) if buf == msg.as_bytes()
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_metrics_and_status() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let Pair {
        server,
        client,
        in_addr,
        out_addr,
        ..
    } = Pair::files(&ca, target.addr)
        .inbound_extra("access_log = true")
        .start(tmp.path())
        .await;

    assert_eq!(get(server.admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(server.admin, "/readyz").await.0, 200);
    assert_eq!(get(server.admin, "/nope").await.0, 404);

    let before = get(server.admin, "/metrics").await.1;
    for name in [
        "spiffe_tunnel_connections_total",
        "spiffe_tunnel_connections_active",
        "spiffe_tunnel_bytes_total",
        "spiffe_tunnel_handshake_duration_seconds",
        "spiffe_tunnel_svid_expiry_timestamp_seconds",
        "spiffe_tunnel_svid_rotations_total",
        "spiffe_tunnel_workload_api_up",
        "spiffe_tunnel_policy_reloads_total",
    ] {
        assert!(
            before.contains(&format!("# TYPE {name}"))
                || before.contains(&format!("# TYPE {}", name.trim_end_matches("_total"))),
            "{name} missing:\n{before}"
        );
    }
    let ok = "spiffe_tunnel_connections_total{tunnel=\"api\",kind=\"inbound\",result=\"ok\"}";
    let denied =
        "spiffe_tunnel_connections_total{tunnel=\"api\",kind=\"inbound\",result=\"denied\"}";
    let bytes_in =
        "spiffe_tunnel_bytes_total{tunnel=\"api\",kind=\"inbound\",direction=\"client_to_server\"}";

    let mut live = Live::open(out_addr).await;
    assert_eq!(roundtrip(out_addr, b"12345").await.unwrap(), b"12345");
    let intruder = ca.leaf("spiffe://example.org/intruder");
    assert!(raw_tls_roundtrip(
        in_addr,
        raw_client_config(Some((&intruder.chain_pem, &intruder.key_pem))),
        b"x"
    )
    .await
    .is_err());
    server
        .daemon
        .wait_log("connection refused", 1, Duration::from_secs(5))
        .await;
    server
        .daemon
        .wait_log("spiffe_tunnel::access", 1, Duration::from_secs(5))
        .await;

    let after = get(server.admin, "/metrics").await.1;
    assert!(sample(&after, ok) >= sample(&before, ok) + 2.0, "{after}");
    assert_eq!(
        sample(&after, denied),
        sample(&before, denied) + 1.0,
        "{after}"
    );
    assert!(
        sample(&after, bytes_in) >= sample(&before, bytes_in) + 5.0,
        "{after}"
    );
    assert_eq!(
        sample(
            &after,
            "spiffe_tunnel_connections_active{tunnel=\"api\",kind=\"inbound\"}"
        ),
        1.0,
        "{after}"
    );
    let expiry = sample(
        &after,
        &format!("spiffe_tunnel_svid_expiry_timestamp_seconds{{spiffe_id=\"{API}\"}}"),
    );
    assert!(expiry > 1.7e9, "{after}");

    let (code, body) = get(server.admin, "/status").await;
    assert_eq!(code, 200);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["ready"], true);
    assert_eq!(status["identity"]["svids"][0]["spiffe_id"], API);
    assert_eq!(
        status["identity"]["bundles"][0]["trust_domain"],
        "example.org"
    );
    assert_eq!(status["identity"]["bundles"][0]["ca_count"], 1);
    let tunnel = &status["tunnels"][0];
    assert_eq!(tunnel["kind"], "inbound");
    assert_eq!(tunnel["listen"], in_addr.to_string());
    assert_eq!(tunnel["target"], target.addr.to_string());
    assert_eq!(tunnel["active_connections"], 1);
    assert_eq!(tunnel["peers"][0]["peer_id"], WEB);
    assert!(tunnel["last_refusal"]
        .as_str()
        .unwrap()
        .contains("intruder"));

    // The status command renders the same document for a person.
    let out = Command::new(binary())
        .args(["status", "-c", server.config.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("READY") && text.contains(API) && text.contains(&format!("{WEB} from")),
        "{text}"
    );

    assert!(live.echo("still").await);
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reload_revokes_live_connections_and_a_bad_reload_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let pair = Pair::files(&ca, target.addr)
        .server_file("api.policy", &format!("{WEB}\n"))
        .inbound_allow("")
        .inbound_extra("policy = \"api.policy\"")
        .start(tmp.path())
        .await;
    let (server, out_addr, dir) = (&pair.server, pair.out_addr, &pair.server.dir);
    let mut live = Live::open(out_addr).await;

    // A malformed policy: refused, counted, and the live connection stays.
    std::fs::write(
        dir.join("api.policy"),
        "spiffe://example.org/web\nnot-an-id\n",
    )
    .unwrap();
    server.daemon.signal("HUP");
    server
        .daemon
        .wait_log("reload refused", 1, Duration::from_secs(10))
        .await;
    let metrics = get(server.admin, "/metrics").await.1;
    assert_eq!(
        sample(
            &metrics,
            "spiffe_tunnel_policy_reloads_total{result=\"error\"}"
        ),
        1.0,
        "{metrics}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&get(server.admin, "/status").await.1).unwrap();
    assert_eq!(status["last_reload"]["result"], "error");
    assert!(
        status["last_reload"]["message"]
            .as_str()
            .unwrap()
            .contains("api.policy:2"),
        "{status}"
    );
    assert!(live.echo("after bad reload").await);
    assert_eq!(roundtrip(out_addr, b"new").await.unwrap(), b"new");

    // A policy that no longer allows web: the live connection is closed
    // within a second, and counted.
    std::fs::write(
        dir.join("api.policy"),
        "spiffe://example.org/someone-else\n",
    )
    .unwrap();
    server.daemon.signal("HUP");
    server
        .daemon
        .wait_log("live connection revoked", 1, Duration::from_secs(5))
        .await;
    let mut closed = false;
    for _ in 0..20 {
        if !live.echo("x").await {
            closed = true;
            break;
        }
    }
    assert!(closed, "the revoked connection still carries data");
    let metrics = get(server.admin, "/metrics").await.1;
    assert_eq!(
        sample(
            &metrics,
            "spiffe_tunnel_connections_revoked_total{tunnel=\"api\",kind=\"inbound\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "spiffe_tunnel_policy_reloads_total{result=\"ok\"}"
        ),
        1.0,
        "{metrics}"
    );
    let accepts = target.accepts();
    let denied = roundtrip(out_addr, b"y").await;
    assert!(
        matches!(&denied, Ok(a) if a.is_empty()) || denied.is_err(),
        "{denied:?}"
    );
    assert_eq!(
        target.accepts(),
        accepts,
        "a denied peer reached the target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_tunnels_without_touching_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let (keep_addr, gone_addr, new_addr) = (free_addr(), free_addr(), free_addr());
    let keep = inbound("keep", keep_addr, target.addr, &format!("{WEB:?}"), "");
    let gone = inbound("gone", gone_addr, target.addr, &format!("{WEB:?}"), "");
    let server = node(&tmp.path().join("in"), &ca, API, &format!("{keep}{gone}")).await;
    let client_cert = ca.leaf(WEB);
    let config = || raw_client_config(Some((&client_cert.chain_pem, &client_cert.key_pem)));

    // A long-lived TLS connection on the tunnel that stays.
    let tcp = TcpStream::connect(keep_addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config());
    let mut kept = connector
        .connect(rustls_pki_types::ServerName::try_from("x").unwrap(), tcp)
        .await
        .unwrap();
    kept.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    kept.read_exact(&mut buf).await.unwrap();
    // And one on the tunnel that goes: no policy is left to allow it.
    let tcp = TcpStream::connect(gone_addr).await.unwrap();
    let mut doomed = connector
        .connect(rustls_pki_types::ServerName::try_from("x").unwrap(), tcp)
        .await
        .unwrap();
    doomed.write_all(b"one").await.unwrap();
    doomed.read_exact(&mut buf).await.unwrap();

    // Reload: "gone" removed, "new" added, "keep" unchanged.
    let added = inbound("new", new_addr, target.addr, &format!("{WEB:?}"), "");
    server.write_config("", &format!("{keep}{added}"));
    server.daemon.signal("HUP");
    server
        .daemon
        .wait_log(
            "1 tunnel(s) kept, 0 replaced, 1 added, 1 removed; 1 live connection(s) revoked",
            1,
            Duration::from_secs(10),
        )
        .await;
    // Closed at once, not after drain_timeout (5 s).
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), doomed.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "the removed tunnel's connection is still open: {closed:?}"
    );
    assert!(server.daemon.log().contains("tunnel removed by reload"));

    assert_eq!(
        raw_tls_roundtrip(new_addr, config(), b"new").await.unwrap(),
        b"new"
    );
    wait_until(
        "the removed tunnel's port to close",
        Duration::from_secs(5),
        || std::net::TcpStream::connect(gone_addr).is_err(),
    )
    .await;
    kept.write_all(b"two").await.unwrap();
    kept.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        &buf, b"two",
        "the unchanged tunnel's live connection was disturbed"
    );
    let status: serde_json::Value =
        serde_json::from_str(&get(server.admin, "/status").await.1).unwrap();
    let names: Vec<&str> = status["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["keep", "new"]);
    assert_eq!(status["last_reload"]["result"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_finishes_live_connections_and_exits_zero() {
    let (tmp, ca) = (tempfile::tempdir().unwrap(), Ca::new("example.org"));
    let target = Target::start(TargetMode::Echo).await;
    let mut pair = Pair::files(&ca, target.addr).start(tmp.path()).await;
    let (in_addr, out_addr) = (pair.in_addr, pair.out_addr);
    let server = &mut pair.server;

    // Twenty connections busy moving data when SIGTERM arrives.
    let mut workers = Vec::new();
    for i in 0..20 {
        workers.push(tokio::spawn(async move {
            let mut live = Live::open(out_addr).await;
            for round in 0..40 {
                if !live.echo(&format!("worker {i} round {round:03}")).await {
                    return Err(format!("worker {i} failed at round {round}"));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Ok(())
        }));
    }
    wait_until("twenty live connections", Duration::from_secs(10), || {
        server.daemon.log().matches("peer authorized").count() >= 20
    })
    .await;
    server.daemon.signal("TERM");
    server
        .daemon
        .wait_log("draining", 1, Duration::from_secs(5))
        .await;
    let (code, body) = get(server.admin, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("draining"), "{body}");
    // New connections are refused while the old ones finish their work.
    wait_until("the listener to close", Duration::from_secs(5), || {
        std::net::TcpStream::connect(in_addr).is_err()
    })
    .await;
    for w in workers {
        w.await.unwrap().unwrap();
    }
    assert_eq!(
        server.daemon.wait_exit(Duration::from_secs(10)).await,
        Some(0)
    );
    assert!(server
        .daemon
        .log()
        .contains("drained: every connection finished"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_what_is_left_and_a_second_signal_is_immediate() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let Pair {
        mut server,
        client: _client,
        out_addr,
        ..
    } = Pair::files(&ca, target.addr)
        .inbound_extra("drain_timeout = \"1s\"")
        .start(tmp.path())
        .await;
    let _idle = Live::open(out_addr).await;
    server.daemon.signal("TERM");
    assert_eq!(
        server.daemon.wait_exit(Duration::from_secs(10)).await,
        Some(0)
    );
    assert!(server.daemon.log().contains("drain timeout passed"));

    // Second signal: out at once, long before a 30 s drain_timeout.
    let mut server = node(
        &tmp.path().join("in2"),
        &ca,
        API,
        &inbound(
            "api",
            free_addr(),
            target.addr,
            &format!("{WEB:?}"),
            "drain_timeout = \"30s\"",
        ),
    )
    .await;
    let in_addr2 = {
        let status: serde_json::Value =
            serde_json::from_str(&get(server.admin, "/status").await.1).unwrap();
        status["tunnels"][0]["listen"]
            .as_str()
            .unwrap()
            .parse::<SocketAddr>()
            .unwrap()
    };
    let web = ca.leaf(WEB);
    let tcp = TcpStream::connect(in_addr2).await.unwrap();
    let _held =
        tokio_rustls::TlsConnector::from(raw_client_config(Some((&web.chain_pem, &web.key_pem))))
            .connect(rustls_pki_types::ServerName::try_from("x").unwrap(), tcp)
            .await
            .unwrap();
    server
        .daemon
        .wait_log("peer authorized", 1, Duration::from_secs(5))
        .await;
    server.daemon.signal("TERM");
    server
        .daemon
        .wait_log("draining", 1, Duration::from_secs(5))
        .await;
    server.daemon.signal("TERM");
    assert_eq!(
        server.daemon.wait_exit(Duration::from_secs(5)).await,
        Some(0)
    );
    assert!(server.daemon.log().contains("second signal"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_balances_over_live_upstreams_and_retries_past_a_dead_one() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let (target_a, target_b) = (
        Target::start(TargetMode::Echo).await,
        Target::start(TargetMode::Echo).await,
    );
    let (a, b, dead, out_addr) = (free_addr(), free_addr(), free_addr(), free_addr());
    let tunnels = format!(
        "{}{}",
        inbound("a", a, target_a.addr, &format!("{WEB:?}"), ""),
        inbound("b", b, target_b.addr, &format!("{WEB:?}"), "")
    );
    let _servers = node(&tmp.path().join("in"), &ca, API, &tunnels).await;
    let outbound = format!(
        "[[outbound]]\nname = \"api\"\nlisten = \"{out_addr}\"\nupstreams = [\"{dead}\", \"{a}\", \"{b}\"]\nallow = [\"{API}\"]\nbalance = \"round_robin\"\n"
    );
    let client = node(&tmp.path().join("out"), &ca, WEB, &outbound).await;

    // Every request succeeds: the dead upstream costs at most one retry.
    for i in 0..30 {
        let msg = format!("request {i}");
        assert_eq!(
            roundtrip(out_addr, msg.as_bytes()).await.unwrap(),
            msg.as_bytes(),
            "request {i}"
        );
    }
    // Both live upstreams got a fair share.
    let (got_a, got_b) = (target_a.accepts(), target_b.accepts());
    assert_eq!(got_a + got_b, 30);
    assert!(got_a >= 10 && got_b >= 10, "a={got_a} b={got_b}");
    // The dead one is ejected, and /status says so.
    let status: serde_json::Value =
        serde_json::from_str(&get(client.admin, "/status").await.1).unwrap();
    let endpoints = status["tunnels"][0]["endpoints"].as_array().unwrap();
    let dead_state = endpoints
        .iter()
        .find(|e| e["addr"] == dead.to_string())
        .unwrap();
    assert_eq!(dead_state["healthy"], false, "{status}");
    assert!(
        client.daemon.log().contains("retry") || client.daemon.log().contains("eject"),
        "{}",
        client.daemon.log()
    );
}

/// Rewrites a node's config with `tunnels`, sends SIGHUP and waits for the
/// `nth` reload outcome line ("reloaded:" or "reload refused") in its log.
async fn reload(node: &Node, tunnels: &str, nth: usize) -> String {
    node.write_config("", tunnels);
    node.daemon.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = node.daemon.log();
        let outcomes: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("reloaded:") || l.contains("reload refused"))
            .collect();
        if outcomes.len() >= nth {
            return outcomes[nth - 1].to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reload outcome #{nth} in the log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts refused TCP connects to `addr` until `stop` is set: a listener
/// handed over by a reload must never leave the port closed.
fn count_refusals(
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize)> {
    std::thread::spawn(move || {
        let (mut tries, mut refused) = (0, 0);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tries += 1;
            if std::net::TcpStream::connect(addr).is_err() {
                refused += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (tries, refused)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_allow_change_revokes_live_connections_of_replaced_tunnels() {
    let (tmp, ca) = (tempfile::tempdir().unwrap(), Ca::new("example.org"));
    let target = Target::start(TargetMode::Echo).await;
    let pair = Pair::files(&ca, target.addr).start(tmp.path()).await;
    let (server, client, in_addr, out_addr) =
        (&pair.server, &pair.client, pair.in_addr, pair.out_addr);
    let allow_web = format!("{WEB:?}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = count_refusals(in_addr, std::sync::Arc::clone(&stop));

    // A change that replaces the tunnel but still allows web: the live
    // connection, now on the retired tunnel, carries on.
    let mut live = Live::open(out_addr).await;
    let outcome = reload(server, &pair.inbound(&allow_web, "access_log = true"), 1).await;
    assert!(
        outcome.contains("1 replaced") && outcome.contains("0 live connection(s) revoked"),
        "{outcome}"
    );
    assert!(live.echo("still allowed").await);

    // The case: the inline allow no longer names web. The live
    // connection of the retired tunnel is closed at once, logged and counted.
    let other = "\"spiffe://example.org/someone-else\"";
    let outcome = reload(server, &pair.inbound(other, "access_log = true"), 2).await;
    assert!(
        outcome.contains("1 live connection(s) revoked"),
        "{outcome}"
    );
    assert!(
        !live.echo("revoked?").await,
        "the revoked connection still carries data"
    );
    let log = server.daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("live connection revoked"))
        .unwrap_or_else(|| panic!("no revocation line:\n{log}"));
    assert!(line.contains(WEB) && line.contains("not allowed"), "{line}");
    let metrics = get(server.admin, "/metrics").await.1;
    let revoked = |kind: &str| {
        format!("spiffe_tunnel_connections_revoked_total{{tunnel=\"api\",kind=\"{kind}\"}}")
    };
    assert_eq!(sample(&metrics, &revoked("inbound")), 1.0, "{metrics}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (tries, refused) = prober.join().unwrap();
    assert_eq!(
        refused, 0,
        "{refused} of {tries} connects refused across the reloads"
    );

    // The same on the outbound side: its allow no longer names api.
    reload(server, &pair.inbound(&allow_web, ""), 3).await;
    let mut live = Live::open(out_addr).await;
    let changed = pair.outbound(&only("spiffe://example.org/other"), "");
    let outcome = reload(client, &changed, 1).await;
    assert!(
        outcome.contains("1 live connection(s) revoked"),
        "{outcome}"
    );
    assert!(!live.echo("revoked?").await);
    let metrics = get(client.admin, "/metrics").await.1;
    assert_eq!(sample(&metrics, &revoked("outbound")), 1.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_in_flight_at_sighup_is_judged_by_the_new_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let in_addr = free_addr();
    let server = node(
        &tmp.path().join("in"),
        &ca,
        API,
        &inbound("api", in_addr, target.addr, &format!("{WEB:?}"), ""),
    )
    .await;
    let web = ca.leaf(WEB);
    let config = || raw_client_config(Some((&web.chain_pem, &web.key_pem)));
    assert_eq!(
        raw_tls_roundtrip(in_addr, config(), b"before")
            .await
            .unwrap(),
        b"before"
    );
    let accepts = target.accepts();

    // The server is waiting for our certificate when the reload lands.
    let paused = tokio::task::spawn_blocking({
        let config = config();
        move || PausedHandshake::start(in_addr, config)
    })
    .await
    .unwrap()
    .unwrap();
    let other = "\"spiffe://example.org/someone-else\"";
    let outcome = reload(&server, &inbound("api", in_addr, target.addr, other, ""), 1).await;
    assert!(outcome.contains("reloaded:"), "{outcome}");
    let finished = tokio::task::spawn_blocking(move || paused.finish(b"after"))
        .await
        .unwrap();
    assert!(
        finished.is_err(),
        "admitted under the old policy: {finished:?}"
    );
    server
        .daemon
        .wait_log("not allowed by the policy", 1, Duration::from_secs(5))
        .await;
    assert_eq!(
        target.accepts(),
        accepts,
        "the refused peer reached the target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_listener_cannot_bind_changes_nothing() {
    let (tmp, ca) = (tempfile::tempdir().unwrap(), Ca::new("example.org"));
    let target = Target::start(TargetMode::Echo).await;
    let pair = Pair::files(&ca, target.addr).start(tmp.path()).await;
    let (server, in_addr, out_addr) = (&pair.server, pair.in_addr, pair.out_addr);
    let extra_addr = free_addr();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let allow_web = format!("{WEB:?}");
    let mut live = Live::open(out_addr).await;

    // "api" moves to a port someone else holds, and "extra" is added.
    let tunnels = format!(
        "{}{}",
        inbound("extra", extra_addr, target.addr, &allow_web, ""),
        inbound("api", busy_addr, target.addr, &allow_web, ""),
    );
    let outcome = reload(server, &tunnels, 1).await;
    assert!(outcome.contains("reload refused"), "{outcome}");
    assert!(
        outcome.contains(&format!("cannot listen on {busy_addr}")),
        "{outcome}"
    );
    // Nothing of it applied: the old tunnel serves its live connection and
    // new ones, and "extra" never started.
    assert!(live.echo("still here").await);
    assert_eq!(roundtrip(out_addr, b"new").await.unwrap(), b"new");
    assert!(std::net::TcpStream::connect(extra_addr).is_err());
    let status: serde_json::Value =
        serde_json::from_str(&get(server.admin, "/status").await.1).unwrap();
    assert_eq!(status["last_reload"]["result"], "error");
    assert_eq!(status["tunnels"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["tunnels"][0]["listen"], in_addr.to_string());
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_each_policy_file_once() {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let in_addr = free_addr();
    let dir = tmp.path().join("in");
    std::fs::create_dir_all(&dir).unwrap();
    let policy_file = dir.join("api.policy");
    std::fs::write(&policy_file, format!("{WEB}\n")).unwrap();
    let policy = "policy = \"api.policy\"";
    let server = node(
        &dir,
        &ca,
        API,
        &inbound("api", in_addr, target.addr, "", policy),
    )
    .await;

    // Every read of the policy file from now on, seen by inotify; after the
    // first one the file turns malformed, as if edited in between.
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    inotify
        .add_watch(&policy_file, AddWatchFlags::IN_CLOSE_NOWRITE)
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = std::thread::spawn({
        let (stop, policy_file) = (std::sync::Arc::clone(&stop), policy_file.clone());
        move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let events = inotify.read_events().unwrap_or_default();
                for _ in events {
                    reads += 1;
                    if reads == 1 {
                        std::fs::write(&policy_file, "not-an-id\n").unwrap();
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            reads
        }
    });
    // Changing the inline rules replaces the tunnel.
    let extra = "\"spiffe://example.org/extra\"";
    let outcome = reload(
        &server,
        &inbound("api", in_addr, target.addr, extra, policy),
        1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reads = watcher.join().unwrap();
    assert!(outcome.contains("reloaded:"), "{outcome}");
    assert_eq!(reads, 1, "the reload read the policy file {reads} times");
    // What was checked is what is served: web, from the first read.
    let web = ca.leaf(WEB);
    let config = raw_client_config(Some((&web.chain_pem, &web.key_pem)));
    assert_eq!(
        raw_tls_roundtrip(in_addr, config, b"x").await.unwrap(),
        b"x"
    );
}
