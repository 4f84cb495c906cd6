//! spiffe-tunnel against real SPIRE deployments bigger than one server and
//! one agent (spire-server and spire-agent v1.13.3, built from source by
//! scripts/test):
//!
//! - federation: two trust domains, each its own server and agent, whose
//!   servers exchange bundles through their bundle endpoints; a CA
//!   rotation on one side reaches the other side's tunnel by itself;
//! - several nodes in network namespaces, as in production: the server in
//!   a namespace of its own, an agent per node attested with the node's
//!   join token;
//! - HAProxy sidecars on two nodes fed by `svid watch` from their agents.
//!
//! The three tests are independent and mostly wait on SPIRE's own clocks
//! (bundle refreshes, SVID lifetimes), so they run side by side.

mod common;

use std::time::{Duration, Instant};

use common::haproxy::{example_config, HaProxy};
use common::harness::{roundtrip, Target, TargetMode};
use common::netns::{Node, Proc as NodeProc, ADMIN};
use common::probe::{conn_series, sample};
use common::spire::{AgentConfig, ServerConfig, OTHER_UID};
use common::spire_federation::{jwt_keys_only, Federation};
use common::spire_nodes::SpireCluster;
use common::traffic::Traffic;
use common::workload_tunnel::{TunnelEnd, API_UID, ISSUE, WEB, WEB_UID};

// ------------------------------------------------------------ federation

const PARTNER_TD: &str = "spiffe://partner.org";
const PARTNER_API: &str = "spiffe://partner.org/api";
/// A workload of example.org that federates with partner.org but whose ID
/// partner.org's policy does not name.
const INTRUDER: &str = "spiffe://example.org/intruder";
const INTRUDER_UID: u32 = OTHER_UID + 2;
/// A workload of example.org whose entry has no `-federatesWith`.
const LONER: &str = "spiffe://example.org/loner";
const LONER_UID: u32 = OTHER_UID + 3;
/// A workload of example.org that also federates with a trust domain that
/// has JWT keys only.
const AUDIT: &str = "spiffe://example.org/audit";
const AUDIT_UID: u32 = OTHER_UID + 4;
const JWT_ONLY_TD: &str = "spiffe://jwt-only.org";

/// Two SPIRE servers, example.org and partner.org, federated through their
/// bundle endpoints (`https_spiffe`), bootstrapped with `bundle show` /
/// `bundle set -format spiffe` as the SPIRE docs say, then left alone:
///
/// - a workload of example.org whose entry federates with partner.org
///   reaches partner.org's inbound, each end verifying the other against
///   the bundle SPIRE delivered for the other's trust domain;
/// - partner.org's policy names example.org/web only: example.org/intruder
///   (also federated) is refused there, before the target hears of it;
/// - an entry without `-federatesWith` gets no partner.org bundle from
///   SPIRE, and its tunnel's refusal of the partner says that is the
///   likely cause;
/// - a trust domain with JWT keys only arrives as an empty X.509 bundle:
///   accepted, a domain with no X.509 authorities;
/// - a CA rotation on partner.org (`localauthority x509 prepare`,
///   `activate`, `taint`, `revoke`) reaches example.org's tunnel through
///   the servers' own bundle refreshes, while traffic runs with 0
///   failures: the new CA arrives before it signs, the old one leaves
///   after nothing it signed is in use, and the tunnel never restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federation_between_two_spire_servers() {
    let started = Instant::now();
    let domain = |td: &str| ServerConfig {
        trust_domain: td.into(),
        ..ServerConfig::default()
    };
    let fed = Federation::start(
        (domain("example.org"), AgentConfig::default()),
        (domain("partner.org"), AgentConfig::default()),
    )
    .await;
    let (a, b) = (&fed.a, &fed.b);
    // A trust domain that publishes JWT keys only, added by hand.
    let jwt_only = jwt_keys_only(&b.server.bundle_spiffe().await);
    a.server.set_federated_bundle(JWT_ONLY_TD, &jwt_only).await;

    // Short SVIDs on partner.org, so a taint is acted on within seconds.
    b.create_entry(
        &b.entry(PARTNER_API)
            .uid(API_UID)
            .x509_ttl(30)
            .federates_with("spiffe://example.org"),
    )
    .await;
    for (id, uid, federates) in [
        (WEB, WEB_UID, &[PARTNER_TD][..]),
        (INTRUDER, INTRUDER_UID, &[PARTNER_TD][..]),
        (LONER, LONER_UID, &[][..]),
        (AUDIT, AUDIT_UID, &[PARTNER_TD, JWT_ONLY_TD][..]),
    ] {
        let mut entry = a.entry(id).uid(uid);
        for td in federates {
            entry = entry.federates_with(td);
        }
        a.create_entry(&entry).await;
    }
    b.agent.wait_for_ids(API_UID, &[PARTNER_API], ISSUE).await;
    for (id, uid) in [(WEB, WEB_UID), (INTRUDER, INTRUDER_UID), (LONER, LONER_UID)] {
        a.agent.wait_for_ids(uid, &[id], ISSUE).await;
    }
    // (`spire-agent api fetch` itself cannot show AUDIT's identity: SPIRE's
    // own client refuses the empty bundle, "no certificates in bundle for
    // federated domain"; the tunnel below shows it arrives.)

    let target = Target::start(TargetMode::Echo).await;
    let api = TunnelEnd::inbound(
        &b.agent.address(),
        API_UID,
        target.addr,
        &[WEB, AUDIT],
        "access_log = true",
    )
    .await;
    let socket_a = a.agent.address();
    let outbound = |uid| {
        TunnelEnd::outbound(
            &socket_a,
            uid,
            api.listen,
            &[PARTNER_API],
            "access_log = true",
        )
    };
    let (web, intruder, loner) = tokio::join!(
        outbound(WEB_UID),
        outbound(INTRUDER_UID),
        outbound(LONER_UID)
    );

    // Each side holds the other's bundle, as SPIRE delivered it.
    assert_eq!(web.ca_count("partner.org").await, 1);
    assert_eq!(api.ca_count("example.org").await, 1);
    assert_eq!(loner.ca_count("partner.org").await, 0);
    echo(web.listen, "hello partner")
        .await
        .expect("web -> partner api");
    api.daemon
        .wait_log(&format!("peer={WEB}"), 1, Duration::from_secs(5))
        .await;
    web.daemon
        .wait_log(&format!("peer={PARTNER_API}"), 1, Duration::from_secs(5))
        .await;

    // A federated peer that partner.org's policy does not name.
    let accepts = target.accepts();
    assert!(echo(intruder.listen, "let me in").await.is_err());
    api.daemon
        .wait_log(
            &format!("peer {INTRUDER} is not allowed by the policy"),
            1,
            Duration::from_secs(5),
        )
        .await;
    // An entry without -federatesWith: no partner.org bundle.
    assert!(echo(loner.listen, "hello?").await.is_err());
    loner
        .daemon
        .wait_log(
            &format!("no trust bundle for trust domain \"partner.org\" of peer {PARTNER_API}"),
            1,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(
        target.accepts(),
        accepts,
        "a refused peer reached the target"
    );

    // CA rotation on partner.org, under traffic from example.org.
    let traffic = Traffic::start(web.listen, Duration::from_millis(100));
    let old = b
        .server
        .x509_authorities()
        .await
        .active
        .expect("an active authority");
    let rotation = Instant::now();
    let new = b.server.prepare_x509_authority().await;
    // example.org's server fetches partner.org's bundle by itself; the
    // agent passes it on; the tunnel trusts both CAs.
    wait_ca_count(&web, "partner.org", 2, Duration::from_secs(100)).await;
    let arrived = rotation.elapsed();
    b.server.activate_x509_authority(&new).await;
    // prepare and activate cost no connection. A taint makes partner.org's
    // agent drop the SVIDs the old CA signed at once and answer "no
    // identity issued" until their replacements are signed (docs/spire.md,
    // "Rotation"): refusals for that moment are SPIRE's, so the
    // traffic is judged in two runs, one before the taint and one after.
    let count_before_taint = traffic.finish_clean("connections before the taint").await;
    b.server.taint_x509_authority(&old.id).await;
    // partner.org's agent replaces the SVID the tainted CA signed.
    let serials = api.serials_seen(PARTNER_API).len();
    common::spire::wait_for(
        "the partner's SVID re-signed after the taint",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async {
            if api.serials_seen(PARTNER_API).len() > serials {
                Ok(())
            } else {
                Err("not yet".to_string())
            }
        },
    )
    .await;
    let traffic = Traffic::start(web.listen, Duration::from_millis(100));
    traffic.wait_more_ok(5, Duration::from_secs(10)).await;
    b.server
        .revoke_x509_authority(&old.id)
        .await
        .unwrap_or_else(|e| panic!("revoke: {e}"));
    let revoked = Instant::now();
    wait_ca_count(&web, "partner.org", 1, Duration::from_secs(40)).await;
    let left = revoked.elapsed();
    let count = count_before_taint + traffic.finish_clean("connections after the taint").await;
    assert_eq!(
        web.daemon.log().matches("spiffe-tunnel is running").count(),
        1,
        "the tunnel restarted"
    );
    eprintln!(
        "federation: {count} connections across partner.org's CA rotation (taint excepted), none failed; \
         the new CA reached example.org's tunnel {arrived:?} after prepare, the revoked one \
         left it {left:?} after revoke; example.org's server refreshed partner.org's bundle \
         {} times; whole test {:?}",
        a.server.bundle_refreshes("partner.org"),
        started.elapsed()
    );
    // The refusal of the partner by the entry without -federatesWith says
    // that this is the likely cause.
    assert!(
        loner
            .daemon
            .log()
            .contains("-federatesWith spiffe://partner.org"),
        "the refusal does not name the likely cause:\n{}",
        loner.daemon.log()
    );

    // The JWT-only domain (its own workload): an empty X.509 bundle, taken as a domain with
    // no X.509 authorities; the rest of the response is used.
    let audit = outbound(AUDIT_UID).await;
    let status = audit.status().await;
    let bundles = status["identity"]["bundles"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        bundles
            .iter()
            .any(|b| b["trust_domain"] == "jwt-only.org" && b["ca_count"] == 0),
        "jwt-only.org is not a domain without X.509 authorities: {bundles:?}"
    );
    echo(audit.listen, "hello from audit")
        .await
        .expect("audit -> partner api");
}

/// Waits until `end` trusts `count` CAs for `trust_domain`.
async fn wait_ca_count(end: &TunnelEnd, trust_domain: &str, count: u64, timeout: Duration) {
    common::spire::wait_for(
        &format!("{count} CAs of {trust_domain} in the tunnel"),
        timeout,
        Duration::from_millis(250),
        || async {
            let seen = end.ca_count(trust_domain).await;
            if seen == count {
                Ok(())
            } else {
                Err(format!("{seen} CAs"))
            }
        },
    )
    .await
}

/// One round trip through an echo target behind `addr`: Ok when the echo
/// came back whole, else what happened.
async fn echo(addr: std::net::SocketAddr, msg: &str) -> Result<(), String> {
    match roundtrip(addr, msg.as_bytes()).await {
        Ok(answer) if answer == msg.as_bytes() => Ok(()),
        Ok(answer) if answer.is_empty() => Err("closed without an answer".into()),
        Ok(answer) => Err(format!("answer {:?}", String::from_utf8_lossy(&answer))),
        Err(e) => Err(e.to_string()),
    }
}

// ------------------------------------------------------------ several nodes

const API: &str = "spiffe://example.org/api";
/// The workload of node 3, which node 2's policy does not name.
const BATCH: &str = "spiffe://example.org/batch";
/// Ports, the same in every node (each has its own `127.0.0.1`).
const APP_PORT: u16 = 3000;
const INBOUND_PORT: u16 = 8443;
const OUTBOUND: &str = "127.0.0.1:8080";
/// `-x509SVIDTTL` on the nodes: renewed about every 5 s (SPIRE backdates
/// NotBefore by 10 s and renews at half the lifetime), so an agent cut off
/// from the server serves its last SVID for 15 to 20 s more.
const NODE_SVID_TTL: u64 = 20;

fn inbound_toml(allow: &str) -> String {
    format!(
        "[[inbound]]\nname = \"api\"\nlisten = \"0.0.0.0:{INBOUND_PORT}\"\n\
         target = \"127.0.0.1:{APP_PORT}\"\nallow = [\"{allow}\"]\naccess_log = true\n"
    )
}

fn outbound_toml(upstream: std::net::SocketAddrV4, allow: &str) -> String {
    format!(
        "[[outbound]]\nname = \"api\"\nlisten = \"{OUTBOUND}\"\nupstreams = [\"{upstream}\"]\n\
         allow = [\"{allow}\"]\naccess_log = true\n"
    )
}

/// Production's picture in network namespaces: the SPIRE server in a node
/// of its own, and on nodes 1 to 3 an agent attested with the node's own
/// join token, spiffe-tunnel and an app, every entry naming its node:
///
/// - node 1's app reaches node 2's app through both tunnels, each end
///   holding the SVID its own node's agent got for it;
/// - node 3's workload (uid 0, like node 1's) gets no `web` from its agent:
///   the entry names node 1; what it does get, `batch`, node 2's policy
///   refuses before node 2's app hears of it;
/// - node 2's agent cut off from the server (a blackhole route, so app
///   traffic still flows): traffic carries on with the SVID the agent
///   already has until it expires, not a moment less; then node 2 refuses
///   new connections and says why on `/readyz`; with the route back, the
///   agent gets a new SVID and traffic recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_in_namespaces_each_with_its_own_agent() {
    if !common::netns::available() {
        return;
    }
    let started = Instant::now();
    let cluster = SpireCluster::start(
        &["node1", "node2", "node3"],
        ServerConfig::default(),
        AgentConfig::default(),
    )
    .await;
    let (node1, node2, node3) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let server = &cluster.server;
    server
        .create_entry(&cluster.entry(0, WEB).x509_ttl(NODE_SVID_TTL))
        .await;
    server
        .create_entry(&cluster.entry(1, API).x509_ttl(NODE_SVID_TTL))
        .await;
    server.create_entry(&cluster.entry(2, BATCH)).await;
    tokio::join!(
        cluster.agents[0].wait_for_ids(0, &[WEB], ISSUE),
        cluster.agents[1].wait_for_ids(0, &[API], ISSUE),
        cluster.agents[2].wait_for_ids(0, &[BATCH], ISSUE),
    );
    // Same uid, another node: the web entry is not node 3's.
    cluster.agents[2]
        .wait_without_ids(0, &[WEB, API], Duration::from_secs(5))
        .await;

    let app = node2.echo_app("app", APP_PORT);
    let tunnel2 = node2.run_tunnel("tunnel", &cluster.socket(1), &inbound_toml(WEB));
    let upstream = node2.addr(INBOUND_PORT);
    let _tunnel1 = node1.run_tunnel("tunnel", &cluster.socket(0), &outbound_toml(upstream, API));
    let tunnel3 = node3.run_tunnel("tunnel", &cluster.socket(2), &outbound_toml(upstream, API));
    let mut client1 = node1.client();
    let mut client3 = node3.client();
    let mut admin2 = node2.client_named("admin");
    for i in 0..3 {
        client1
            .echo(OUTBOUND, &format!("hello {i}"))
            .expect("node 1 -> node 2");
    }
    assert_eq!(app.accepts(), 3);
    tunnel2.wait_log(&format!("peer={WEB}"), 3, Duration::from_secs(5));

    // Node 3: verified, then refused by node 2's policy.
    assert!(client3.echo(OUTBOUND, "let me in").is_err());
    tunnel2.wait_log(
        &format!("peer {BATCH} is not allowed by the policy"),
        1,
        Duration::from_secs(5),
    );
    // (Node 3's end sees either node 2's alert or a broken pipe, as TLS 1.3
    // lets a client finish before the server has judged its certificate.)
    tunnel3.wait_log(&format!("peer={API} "), 1, Duration::from_secs(5));
    // A broken pipe is a reset since connections are labelled by how they end.
    let log3 = tunnel3.log();
    assert!(
        log3.contains("end=reset") || log3.contains("end=error"),
        "{log3}"
    );
    let metrics = admin2.get(ADMIN, "/metrics").1;
    assert_eq!(
        sample(&metrics, &conn_series("api", "inbound", "denied")),
        1.0,
        "{metrics}"
    );
    assert_eq!(app.accepts(), 3, "node 3 reached node 2's app");

    // Node 2's agent cut off from the server, under traffic from node 1.
    let traffic = Traffic::start_blocking(Duration::from_millis(100), move |n| {
        client1.echo(OUTBOUND, &format!("conn {n}"))
    });
    traffic.wait_more_ok(3, Duration::from_secs(10)).await;
    node2.blackhole(cluster.server_node.ip);
    let cut = Instant::now();
    // (A renewal already signed may still be on its way: take stock after
    // the first status below.)
    let mut renewals = 0;
    let mut serials = 0;
    // Until node 2 says it is not ready: when its SVID expires.
    let mut expires = None;
    let not_ready = loop {
        let (code, body) = admin2.get(ADMIN, "/readyz");
        if code != 200 {
            break body;
        }
        let status: serde_json::Value =
            serde_json::from_str(&admin2.get(ADMIN, "/status").1).expect("status is JSON");
        let left = status["identity"]["svids"][0]["expires_in_seconds"]
            .as_i64()
            .expect("expires_in_seconds");
        if expires.is_none() {
            renewals = cluster.agents[1]
                .log()
                .matches("Renewing X509-SVID")
                .count();
            serials = serials_in_use(&tunnel2.log(), API);
        }
        expires = Some(Instant::now() + Duration::from_secs(left.max(0) as u64));
        assert!(
            cut.elapsed() < Duration::from_secs(NODE_SVID_TTL + 10),
            "node 2 still ready {:?} after the cut",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let not_ready_at = Instant::now();
    let expires = expires.expect("node 2 was ready after the cut");
    assert!(
        not_ready.contains("holds no valid SVID to present (expired or not issued)"),
        "{not_ready}"
    );
    // Nothing new reached node 2 while it was cut off: its agent renewed
    // nothing (it logs nothing either: its stalled connection to the
    // server just waits), and the tunnel used one SVID throughout.
    assert_eq!(
        cluster.agents[1]
            .log()
            .matches("Renewing X509-SVID")
            .count(),
        renewals,
        "node 2's agent renewed an SVID while cut off"
    );
    assert_eq!(
        serials_in_use(&tunnel2.log(), API),
        serials,
        "node 2's tunnel got a new SVID while cut off"
    );
    assert!(
        not_ready_at <= expires + Duration::from_secs(2),
        "node 2 still ready {:?} after its SVID expired",
        not_ready_at - expires
    );
    common::spire::wait_for(
        "a refused connection once node 2's SVID expired",
        Duration::from_secs(15),
        Duration::from_millis(100),
        || async {
            traffic
                .first_failure()
                .ok_or_else(|| "none yet".to_string())
        },
    )
    .await;
    let (first_failure, why) = traffic.first_failure().unwrap();
    // `expires_in_seconds` is whole seconds: allow one either way.
    assert!(
        first_failure + Duration::from_secs(1) >= expires,
        "a connection failed {:?} before node 2's SVID expired: {why}",
        expires.saturating_duration_since(first_failure)
    );
    let served = expires.saturating_duration_since(cut);
    assert!(
        served >= Duration::from_secs(NODE_SVID_TTL / 2),
        "node 2 served only {served:?} on its last SVID"
    );

    node2.unblackhole(cluster.server_node.ip);
    let restored = Instant::now();
    traffic.wait_more_ok(3, Duration::from_secs(60)).await;
    let recovery = restored.elapsed();
    let (count, failures, outage) = traffic.stop().await;
    assert_eq!(
        tunnel2.log().matches("spiffe-tunnel is running").count(),
        1,
        "node 2's tunnel restarted"
    );
    eprintln!(
        "nodes: node 2 cut off from the server served {served:?} more on its last SVID \
         until it expired, {} of {count} connections refused from then \
         until traffic recovered {recovery:?} after the route was back (outage {outage:?}; \
         first refusal: {why}); whole test {:?}",
        failures.len(),
        started.elapsed()
    );
}

/// How many SVIDs a tunnel has logged as "SVID in use" for `id` so far.
fn serials_in_use(log: &str, id: &str) -> usize {
    let needle = format!("spiffe_id={id} ");
    log.lines()
        .filter(|l| l.contains("SVID in use") && l.contains(&needle))
        .count()
}

// ------------------------------------------------------------ HAProxy

/// `spiffe-tunnel svid watch` in `node` for `id` from the agent at
/// `socket`: the SVID folder `<node>-svid`, HAProxy's `crt` file
/// `<node>-svid.pem` and `ca-file` `<node>-bundle.pem`, each rotation
/// pushed through the stats socket `<node>-admin.sock`. Returns once both
/// files exist, so HAProxy can start on them. HAProxy's master CLI
/// `<node>-master.sock` is given too, for a new CA on an HAProxy that
/// cannot take one at runtime.
fn svid_watch(node: &Node, socket: &str, id: &str) -> (NodeProc, HaproxyFiles) {
    let files = HaproxyFiles {
        cert: node.path("svid.pem"),
        ca_file: node.path("bundle.pem"),
        admin: node.path("admin.sock"),
        master: node.path("master.sock"),
    };
    let dir = node.path("svid");
    let proc = node.spiffe_tunnel(
        "watch",
        &[
            "svid",
            "watch",
            "--write",
            dir.to_str().unwrap(),
            "--socket",
            socket,
            "--id",
            id,
            "--haproxy-cert",
            files.cert.to_str().unwrap(),
            "--haproxy-ca-file",
            files.ca_file.to_str().unwrap(),
            "--haproxy-socket",
            files.admin.to_str().unwrap(),
            "--haproxy-master-socket",
            files.master.to_str().unwrap(),
        ],
    );
    common::netns::wait_for(
        &format!("svid watch's first files in {}", node.name),
        Duration::from_secs(20),
        || files.cert.exists() && files.ca_file.exists(),
    );
    (proc, files)
}

/// What one HAProxy sidecar reads and where it listens for commands.
struct HaproxyFiles {
    cert: std::path::PathBuf,
    ca_file: std::path::PathBuf,
    admin: std::path::PathBuf,
    master: std::path::PathBuf,
}

impl HaproxyFiles {
    /// The paths of `examples/haproxy/*.cfg` replaced by this node's.
    fn replacements(&self) -> [(&'static str, &str); 3] {
        [
            ("/run/haproxy/admin.sock", self.admin.to_str().unwrap()),
            ("/etc/haproxy/svid.pem", self.cert.to_str().unwrap()),
            ("/etc/haproxy/bundle.pem", self.ca_file.to_str().unwrap()),
        ]
    }
}

/// Each HAProxy with the files it reads.
type Sides<'a> = [(&'a HaProxy, &'a HaproxyFiles); 2];

/// What each of two HAProxies has presented (serial and issuer of the
/// certificate on its `crt` line), in order, repeats collapsed.
struct Presented<'a> {
    haproxies: Sides<'a>,
    sides: [Vec<(String, String)>; 2],
    deadline: Instant,
    timeout: Duration,
}

impl<'a> Presented<'a> {
    fn new(haproxies: Sides<'a>, timeout: Duration) -> Self {
        let mut presented = Self {
            haproxies,
            sides: [Vec::new(), Vec::new()],
            deadline: Instant::now() + timeout,
            timeout,
        };
        presented.look();
        assert!(
            presented.sides.iter().all(|s| !s.is_empty()),
            "HAProxy is locked"
        );
        presented
    }

    fn look(&mut self) {
        for (i, (haproxy, files)) in self.haproxies.iter().enumerate() {
            if let Some(now) = haproxy.cert_serial_and_issuer(&files.cert) {
                if self.sides[i].last() != Some(&now) {
                    self.sides[i].push(now);
                }
            }
        }
    }

    /// Keeps looking until `done(haproxies, presented)`; fails the test
    /// (with what was seen and the traffic's failures) past the deadline
    /// given to [`Presented::new`].
    async fn until(
        &mut self,
        traffic: &Traffic,
        mut done: impl FnMut(&Sides<'a>, &[Vec<(String, String)>; 2]) -> bool,
    ) {
        loop {
            self.look();
            if done(&self.haproxies, &self.sides) {
                return;
            }
            assert!(
                Instant::now() < self.deadline,
                "not done within {:?}; HAProxies presented {:?}; traffic failures {:?}",
                self.timeout,
                self.sides,
                traffic.failures()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The cron job replaced: HAProxy on two nodes (`examples/haproxy/`'s
/// client-side config on node 1, server-side on node 2), each run
/// master-worker as Debian's haproxy.service runs it and fed by `svid
/// watch` from its own node's SPIRE agent, carries mTLS traffic from node
/// 1's app to node 2's app across at least 3 SVID rotations of each and a
/// CA rotation (`localauthority x509 prepare`: the new CA reaches both
/// HAProxies' `ca-file`; then `activate`: both present SVIDs the new CA
/// signed), with 0 failed requests and both HAProxies the same processes
/// (masters) throughout.
///
/// On HAProxy 3.3 and later everything goes in through the runtime API
/// and the worker never changes. Before 3.3 a runtime CA commit breaks
/// HAProxy (bug #3165), and before 3.0 (Debian 12 has 2.6.12) so does a
/// runtime commit of an SVID without a DNS name, as SPIRE issues them: it
/// turns the `bind` line's `verify required` off (`tests/haproxy_interop.rs`
/// shows both). There those go in by a master CLI `reload`, which the
/// traffic rides through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_sidecars_fed_by_svid_watch_from_their_agents() {
    if !common::netns::available() {
        return;
    }
    let started = Instant::now();
    let cluster = SpireCluster::start(
        &["node1", "node2"],
        ServerConfig::default(),
        AgentConfig::default(),
    )
    .await;
    let (node1, node2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let server = &cluster.server;
    server
        .create_entry(&cluster.entry(0, WEB).x509_ttl(NODE_SVID_TTL))
        .await;
    server
        .create_entry(&cluster.entry(1, API).x509_ttl(NODE_SVID_TTL))
        .await;
    tokio::join!(
        cluster.agents[0].wait_for_ids(0, &[WEB], ISSUE),
        cluster.agents[1].wait_for_ids(0, &[API], ISSUE),
    );

    let app = node2.echo_app("app", APP_PORT);
    let (watch2, files2) = svid_watch(node2, &cluster.socket(1), API);
    let haproxy2 = HaProxy::start_master_worker_in(
        Some(&node2.ns),
        cluster.lan.dir(),
        "node2-haproxy",
        &example_config("server-side.cfg", &files2.replacements()),
        &files2.admin,
        &files2.master,
    );
    let (watch1, files1) = svid_watch(node1, &cluster.socket(0), WEB);
    let upstream = node2.addr(INBOUND_PORT).to_string();
    let mut replacements = files1.replacements().to_vec();
    replacements.push(("10.0.0.2:8443", &upstream));
    let haproxy1 = HaProxy::start_master_worker_in(
        Some(&node1.ns),
        cluster.lan.dir(),
        "node1-haproxy",
        &example_config("client-side.cfg", &replacements),
        &files1.admin,
        &files1.master,
    );
    let pids = [haproxy1.pid(), haproxy2.pid()];
    assert_eq!(pids, [haproxy1.master_pid(), haproxy2.master_pid()]);
    let version = haproxy1.version();
    let affected = haproxy1.has_ca_commit_bug();
    let first_workers = [haproxy1.reported_pid(), haproxy2.reported_pid()];
    let sides = [(&haproxy1, &files1), (&haproxy2, &files2)];

    let mut client = node1.client();
    client
        .echo(OUTBOUND, "hello")
        .expect("node 1 -> HAProxy -> HAProxy -> node 2");
    let traffic = Traffic::start_blocking(Duration::from_millis(50), move |n| {
        client.echo(OUTBOUND, &format!("request {n}"))
    });

    // What each HAProxy presents, and which CA signed it, as it changes.
    let mut seen = Presented::new(sides, Duration::from_secs(90));
    let old_issuer = seen.sides[0][0].1.clone();
    // A rotation first, then the CA rotation starts.
    seen.until(&traffic, |_, s| s.iter().all(|s| s.len() >= 2))
        .await;
    let new = server.prepare_x509_authority().await;
    let prepared = Instant::now();
    seen.until(&traffic, |sides, _| {
        sides
            .iter()
            .all(|(h, f)| h.ca_file_serials(&f.ca_file).is_some_and(|s| s.len() == 2))
    })
    .await;
    let in_ca_files = prepared.elapsed();
    server.activate_x509_authority(&new).await;
    let activated = Instant::now();
    // At least 3 rotations each, the last ones signed by the new CA.
    seen.until(&traffic, |_, s| {
        s.iter()
            .all(|s| s.len() >= 4 && s.last().is_some_and(|(_, issuer)| *issuer != old_issuer))
    })
    .await;
    let new_ca_presented = activated.elapsed();
    let count = traffic.finish_clean("requests").await;
    assert!(
        app.accepts() >= count,
        "{} accepts for {count} requests",
        app.accepts()
    );
    let presented = [seen.sides[0].len(), seen.sides[1].len()];
    drop(seen);
    let mut haproxies = [haproxy1, haproxy2];
    for (i, haproxy) in haproxies.iter_mut().enumerate() {
        assert!(haproxy.is_running(), "HAProxy {} exited", i + 1);
        assert_eq!(haproxy.master_pid(), pids[i], "HAProxy {} restarted", i + 1);
    }
    let log1 = watch1.log();
    let log2 = watch2.log();
    let reloads = |log: &str| {
        log.matches("HAProxy reloaded through its master CLI")
            .count()
    };
    let workers = [haproxies[0].reported_pid(), haproxies[1].reported_pid()];
    for (i, log) in [&log1, &log2].into_iter().enumerate() {
        assert!(!log.contains("HAProxy update failed"), "{log}");
        assert!(!log.contains("HAProxy update incomplete"), "{log}");
        // Before 3.3 at least the bundle change (prepare) takes a reload
        // (before 3.0 so does every SVID: SPIRE's have no DNS name); on
        // 3.3 and later none does.
        if affected {
            assert!(reloads(log) >= 1, "HAProxy {version}: {log}");
        } else {
            assert_eq!(reloads(log), 0, "HAProxy {version}: {log}");
        }
        assert_eq!(
            workers[i] != first_workers[i],
            affected,
            "HAProxy {version} {}: workers {} then {}",
            i + 1,
            first_workers[i],
            workers[i]
        );
        assert_eq!(log.contains("ca_file_committed=true"), !affected, "{log}");
    }
    let pushes = |watch: &NodeProc| {
        watch
            .log()
            .matches("HAProxy now presents the new SVID")
            .count()
    };
    eprintln!(
        "haproxy: {count} requests through two HAProxy sidecars fed by svid watch from their \
         agents, none failed; HAProxy 1 presented {} SVIDs ({} pushes), HAProxy 2 {} ({}); \
         the new CA was in both ca-files {in_ca_files:?} after prepare and presented by both \
         {new_ca_presented:?} after activate; HAProxy {version}: master pids unchanged, \
         {} and {} reloads; whole test {:?}",
        presented[0],
        pushes(&watch1),
        presented[1],
        pushes(&watch2),
        reloads(&log1),
        reloads(&log2),
        started.elapsed()
    );
}
