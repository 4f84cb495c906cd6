//! spiffe-tunnel against a real SPIRE (spire-server and spire-agent
//! v1.13.3, built from source by scripts/test): every tunnel end is a
//! `spiffe-tunnel run` process with `source = "workload_api"` on the real
//! agent's socket, its identity from registration entries made with the
//! `spire-server` CLI, as an operator makes them.
//!
//! Each test starts its own server and agent (tests/common/spire.rs).
//! SVID lifetimes are short so rotations happen within seconds: SPIRE
//! backdates NotBefore by 10 s and renews at about half the lifetime, so
//! `-x509SVIDTTL 30` rotates every 10 s or so.

mod common;

use std::time::{Duration, Instant};

use common::harness::{roundtrip, Target, TargetMode};
use common::spire::{AgentConfig, ServerConfig, Spire, TestUser, OTHER_UID};
use common::traffic::{traffic_until_paced, Pinger, Traffic};
use common::workload_tunnel::{TunnelEnd, TunnelPair as Pair, API, API_UID, ISSUE, WEB};

/// A workload no entry matches.
const STRANGER_UID: u32 = OTHER_UID + 2;

/// Two tunnel ends, each a process of its own uid with its own entry
/// (`unix:uid`), carry traffic; each verified the other's SPIRE-issued
/// SVID; a workload with no entry gets PermissionDenied and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_pair_with_an_entry_each() {
    let spire = Spire::start(ServerConfig::default(), AgentConfig::default()).await;
    let pair = Pair::start(&spire, None).await;
    for i in 0..5 {
        pair.roundtrip(&format!("hello {i} through SPIRE"))
            .await
            .expect("round trip");
    }
    assert_eq!(pair.target.accepts(), 5);
    assert_eq!(pair.api.ids().await, [API]);
    assert_eq!(pair.web.ids().await, [WEB]);
    // Each end names the peer it verified.
    pair.api
        .daemon
        .wait_log(&format!("peer={WEB}"), 5, Duration::from_secs(5))
        .await;
    pair.web
        .daemon
        .wait_log(&format!("peer={API}"), 5, Duration::from_secs(5))
        .await;
    // The bundle each end holds is SPIRE's.
    let spire_cas = spire
        .server
        .bundle_pem()
        .await
        .matches("BEGIN CERTIFICATE")
        .count();
    assert_eq!(pair.api.ca_count("example.org").await, spire_cas as u64);

    // A workload with no entry: SPIRE answers PermissionDenied, and the
    // tunnel says so and gives up after its startup timeout.
    let socket = spire.agent.address();
    let mut stranger = TunnelEnd::spawn(&socket, STRANGER_UID, Duration::from_secs(3), |listen| {
        format!(
            "[[inbound]]\nname = \"x\"\nlisten = \"{listen}\"\ntarget = \"{}\"\nallow = [\"{WEB}\"]\n",
            pair.target.addr
        )
    });
    let code = stranger.daemon.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, Some(1), "{}", stranger.daemon.log());
    let log = stranger.daemon.log();
    for needle in [
        "PermissionDenied",
        "no identity issued",
        "Workload API issued no identity to this process",
        "is there a registration entry for this process?",
    ] {
        assert!(log.contains(needle), "{needle:?} not in:\n{log}");
    }
    assert!(
        spire.agent.log().contains("No identity issued"),
        "the agent logs the refusal too"
    );
}

/// SVIDs of 30 s rotate every 10 s or so; new connections and one
/// long-lived connection run across at least three rotations of each end
/// without a single failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_traffic() {
    let spire = Spire::start(ServerConfig::default(), AgentConfig::default()).await;
    let pair = Pair::start(&spire, Some(30)).await;
    let started = Instant::now();
    let mut pinger = Pinger::open(pair.web.listen).await;
    let (count, failures) = traffic_until_paced(
        pair.web.listen,
        &mut pinger,
        Duration::from_secs(120),
        Duration::from_millis(25),
        || {
            let (api, web) = pair.rotations();
            api >= 3 && web >= 3
        },
    )
    .await;
    assert!(
        failures.is_empty(),
        "{} of {count} failed: {failures:?}",
        failures.len()
    );
    assert!(count > 100, "only {count} connections");
    assert_eq!(pair.target.accepts(), count + 1);
    eprintln!(
        "3 rotations of each end in {:?}, {count} connections, 0 failures",
        started.elapsed()
    );
}

/// `localauthority x509 prepare` and `activate` under traffic: no failed
/// handshake. Then `taint`: SPIRE's agent drops every SVID the old CA
/// signed at once and, until the replacements are signed (within one agent
/// sync), answers "no identity issued", so the tunnels withdraw their
/// identity and refuse new connections for that moment; the test measures
/// it. Then `revoke`: the old CA leaves the bundle, a live connection whose
/// peers hold certificates of the old CA is closed (as docs/spire.md says of
/// a CA dropped from the bundle), and one made after the taint lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_prepare_activate_taint_revoke() {
    let spire = Spire::start(ServerConfig::default(), AgentConfig::default()).await;
    let pair = Pair::start(&spire, Some(60)).await;
    let server = &spire.server;
    let mut old_chain_conn = Pinger::open(pair.web.listen).await;
    let traffic = Traffic::start(pair.web.listen, Duration::from_millis(20));
    let old = server
        .x509_authorities()
        .await
        .active
        .expect("an active CA");

    let prepared = server.prepare_x509_authority().await;
    for end in [&pair.api, &pair.web] {
        wait_ca_count(end, 2).await;
    }
    traffic.wait_more_ok(5, Duration::from_secs(10)).await;
    server.activate_x509_authority(&prepared).await;
    let authorities = server.x509_authorities().await;
    assert_eq!(authorities.active.map(|a| a.id), Some(prepared.clone()));
    assert_eq!(authorities.old.map(|a| a.id), Some(old.id.clone()));
    traffic.wait_more_ok(10, Duration::from_secs(10)).await;
    let (count, failures, _) = traffic.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {count} connections failed during prepare and activate: {failures:?}",
        failures.len()
    );

    // Taint: the agent replaces both SVIDs at once (they were signed by
    // the old CA), well before their half-life.
    let traffic = Traffic::start(pair.web.listen, Duration::from_millis(20));
    traffic.wait_more_ok(5, Duration::from_secs(10)).await;
    let (api_before, web_before) = pair.rotations();
    server.taint_x509_authority(&old.id).await;
    wait_until(
        "both ends to get SVIDs of the new CA",
        Duration::from_secs(30),
        || {
            let (api, web) = pair.rotations();
            api > api_before && web > web_before
        },
    )
    .await;
    for end in [&pair.api, &pair.web] {
        wait_ready(end, ISSUE).await;
    }
    traffic.wait_more_ok(10, Duration::from_secs(10)).await;
    let (count, failures, window) = traffic.stop().await;
    eprintln!(
        "taint: {} of {count} connections refused, for at most {window:?}",
        failures.len()
    );
    assert!(
        window < Duration::from_secs(5),
        "refused for {window:?} after the taint: {failures:?}"
    );

    // Revoke: the old CA leaves SPIRE's bundle and the tunnels' bundles.
    let traffic = Traffic::start(pair.web.listen, Duration::from_millis(20));
    let mut new_chain_conn = Pinger::open(pair.web.listen).await;
    server
        .revoke_x509_authority(&old.id)
        .await
        .expect("revoke the tainted authority");
    assert_eq!(
        server
            .bundle_pem()
            .await
            .matches("BEGIN CERTIFICATE")
            .count(),
        1
    );
    for end in [&pair.api, &pair.web] {
        wait_ca_count(end, 1).await;
    }
    assert!(
        old_chain_conn.closed_within(Duration::from_secs(10)).await,
        "a connection whose peers hold old-CA certificates outlived the revocation"
    );
    let revoked_logged = pair.api.daemon.log().contains("live connection revoked")
        || pair.web.daemon.log().contains("live connection revoked");
    assert!(revoked_logged, "no revocation logged");
    new_chain_conn
        .ping()
        .await
        .expect("a connection of new-CA certificates");
    traffic.wait_more_ok(10, Duration::from_secs(10)).await;
    let (count, failures, _) = traffic.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {count} new connections failed across the revocation: {failures:?}",
        failures.len()
    );
}

async fn wait_ca_count(end: &TunnelEnd, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = end.ca_count("example.org").await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the tunnel trusts {got} CAs, not {want}:\n{}",
            end.daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    common::harness::wait_until(what, timeout, &mut condition).await;
}

/// The agent is killed mid-traffic: the tunnels keep serving on their
/// cached SVIDs; once it is back they reconnect and take the new SVIDs the
/// restarted agent issues (it kept its node identity: KeyManager `disk`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_mid_traffic() {
    let mut spire = Spire::start(ServerConfig::default(), AgentConfig::default()).await;
    let pair = Pair::start(&spire, Some(120)).await;
    let traffic = Traffic::start(pair.web.listen, Duration::from_millis(30));
    let mut pinger = Pinger::open(pair.web.listen).await;
    traffic.wait_more_ok(5, Duration::from_secs(10)).await;
    let (api_serial, web_serial) = (pair.api.serials(API).await, pair.web.serials(WEB).await);

    spire.agent.kill();
    for end in [&pair.api, &pair.web] {
        end.daemon
            .wait_log("Workload API unavailable", 1, Duration::from_secs(10))
            .await;
    }
    traffic.wait_more_ok(20, Duration::from_secs(10)).await;
    pinger
        .ping()
        .await
        .expect("long-lived connection while the agent is down");

    spire.agent.start_again().await;
    assert!(
        spire.agent.log().contains("SVID loaded"),
        "the restarted agent re-attested instead of loading its SVID:\n{}",
        spire.agent.log()
    );
    wait_until(
        "both ends to take the restarted agent's SVIDs",
        Duration::from_secs(40),
        || pair.api.serials_seen(API).len() >= 2 && pair.web.serials_seen(WEB).len() >= 2,
    )
    .await;
    assert_ne!(pair.api.serials(API).await, api_serial);
    assert_ne!(pair.web.serials(WEB).await, web_serial);
    traffic.wait_more_ok(5, Duration::from_secs(10)).await;
    pinger
        .ping()
        .await
        .expect("long-lived connection after the restart");
    let (count, failures, _) = traffic.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {count} failed: {failures:?}",
        failures.len()
    );
}

/// The server goes away for longer than the SVIDs live: the agent cannot
/// renew them, the tunnels serve until they expire, then refuse new
/// connections and say why on /readyz; when the server is back, service
/// returns without touching the tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_past_expiry_then_back() {
    let mut spire = Spire::start(ServerConfig::default(), AgentConfig::default()).await;
    let pair = Pair::start(&spire, Some(20)).await;
    pair.roundtrip("before").await.expect("round trip");

    spire.server.stop();
    // Both SVIDs expire at most 20 s after they were issued.
    for end in [&pair.api, &pair.web] {
        end.daemon
            .wait_log(
                "our SVID expired and no new one arrived",
                1,
                Duration::from_secs(40),
            )
            .await;
    }
    let accepts = pair.target.accepts();
    assert!(pair.roundtrip("after expiry").await.is_err());
    assert_eq!(pair.target.accepts(), accepts, "a byte reached the target");
    for end in [&pair.api, &pair.web] {
        let (code, body) = end.readyz().await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("holds no valid SVID"), "{body}");
    }

    spire.server.start_again().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = pair.api.readyz().await.0 == 200 && pair.web.readyz().await.0 == 200;
        if ready && pair.roundtrip("back").await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "service did not come back; agent log:\n{}",
            spire.agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Entries come and go: a deleted entry withdraws the identity, a
/// re-created one brings it back without a restart, and a delete followed
/// at once by a re-create under traffic refuses connections only for as
/// long as SPIRE itself has no entry to issue from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_deleted_and_recreated() {
    let spire = Spire::start(ServerConfig::default(), AgentConfig::default()).await;
    let mut pair = Pair::start(&spire, None).await;
    pair.roundtrip("hello").await.expect("round trip");

    spire.server.delete_entry(&pair.api_entry).await;
    pair.api
        .daemon
        .wait_log("identity withdrawn", 1, ISSUE)
        .await;
    let (code, body) = pair.api.readyz().await;
    assert_eq!(code, 503, "{body}");
    let accepts = pair.target.accepts();
    assert!(pair.roundtrip("withdrawn").await.is_err());
    assert_eq!(pair.target.accepts(), accepts);

    pair.api_entry = spire.create_entry(&spire.entry(API).uid(API_UID)).await;
    let back = Instant::now();
    wait_ready(&pair.api, ISSUE).await;
    pair.roundtrip("back")
        .await
        .expect("round trip after re-create");
    eprintln!("re-created entry served again after {:?}", back.elapsed());

    // Under traffic: delete and re-create at once.
    let traffic = Traffic::start(pair.web.listen, Duration::from_millis(20));
    traffic.wait_more_ok(5, Duration::from_secs(10)).await;
    let started = Instant::now();
    spire.server.delete_entry(&pair.api_entry).await;
    pair.api_entry = spire.create_entry(&spire.entry(API).uid(API_UID)).await;
    // Wait until the change has gone through, and traffic flows again.
    spire.agent.wait_for_ids(API_UID, &[API], ISSUE).await;
    wait_until("the identity to change", ISSUE, || {
        pair.api.serials_seen(API).len() >= 3
            || pair.api.daemon.log().matches("identity withdrawn").count() >= 2
    })
    .await;
    wait_ready(&pair.api, ISSUE).await;
    traffic.wait_more_ok(10, Duration::from_secs(20)).await;
    let (count, failures, window) = traffic.stop().await;
    eprintln!(
        "delete + re-create under traffic: {} of {count} connections refused, longest refusal window {window:?}, all over in {:?}",
        failures.len(),
        started.elapsed()
    );
    assert!(
        window < Duration::from_secs(8),
        "connections were refused for {window:?}: {failures:?}"
    );
}

async fn wait_ready(end: &TunnelEnd, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while end.readyz().await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready within {timeout:?}:\n{}",
            end.daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One process with several SVIDs, all from real entries for uid 0:
/// - two IDs: each tunnel's `svid =` picks its own;
/// - entries with `-hint`: `svid_hint` picks by hint (and `check` says so);
/// - no `svid`: a warning names the SVID taken and how to choose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_svids_for_one_process_chosen_by_id_or_hint() {
    let spire = Spire::start(ServerConfig::default(), AgentConfig::default()).await;
    spire
        .create_entry(&spire.entry(WEB).uid(0).hint("web"))
        .await;
    spire
        .create_entry(&spire.entry(API).uid(0).hint("api"))
        .await;
    spire.agent.wait_for_ids(0, &[WEB, API], ISSUE).await;

    let target = Target::start(TargetMode::Echo).await;
    let socket = spire.agent.address();
    // By ID, and by hint.
    let api = TunnelEnd::inbound(
        &socket,
        0,
        target.addr,
        &[WEB],
        &format!("svid = \"{API}\"\naccess_log = true"),
    )
    .await;
    let web = TunnelEnd::outbound(&socket, 0, api.listen, &[API], "svid_hint = \"web\"").await;
    roundtrip(web.listen, b"by id and by hint")
        .await
        .expect("round trip");
    api.daemon
        .wait_log(&format!("peer={WEB}"), 1, Duration::from_secs(5))
        .await;
    let check = std::process::Command::new(common::harness::binary())
        .args(["check", "-c", web.config.to_str().unwrap()])
        .output()
        .unwrap();
    let check = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.contains("presents the SVID with hint \"web\""),
        "{check}"
    );

    // No choice: a warning says which one was taken and how to choose.
    let unchosen = TunnelEnd::outbound(&socket, 0, api.listen, &[API], "").await;
    unchosen
        .daemon
        .wait_log("several SVIDs and no `svid` set", 1, Duration::from_secs(5))
        .await;
    let log = unchosen.daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("several SVIDs and no `svid` set"))
        .unwrap();
    eprintln!("{line}");
    assert!(line.contains("presenting=spiffe://example.org/"), "{line}");
    assert!(line.contains("svid_hint"), "{line}");
}

/// Two entries with the *same* SPIFFE ID for one process (one by
/// `unix:uid`, one by `unix:user`): SPIRE sends two SVIDs with one ID.
/// The process used to refuse the whole response (`DuplicateSvid`) and
/// never got an identity; it takes both and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_entries_with_one_spiffe_id() {
    const BILLING: &str = "spiffe://example.org/billing";
    let spire = Spire::start(ServerConfig::default(), AgentConfig::default()).await;
    let user = TestUser::create();
    spire
        .create_entry(&spire.entry(BILLING).uid(user.uid))
        .await;
    spire
        .create_entry(&spire.entry(BILLING).user(&user.name))
        .await;
    spire.create_entry(&spire.entry(WEB).uid(0)).await;
    let billing = spire.agent.wait_for_ids(user.uid, &[BILLING], ISSUE).await;
    wait_for_two(&spire, user.uid, BILLING, billing).await;
    spire.agent.wait_for_ids(0, &[WEB], ISSUE).await;

    let target = Target::start(TargetMode::Echo).await;
    let socket = spire.agent.address();
    let billing = TunnelEnd::inbound(&socket, user.uid, target.addr, &[WEB], "").await;
    assert_eq!(billing.ids().await, [BILLING, BILLING]);
    // The expiry gauge of that ID shows the SVID that expires first.
    let status = billing.status().await;
    let first_expiry = status["identity"]["svids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let t = humantime::parse_rfc3339(s["not_after"].as_str().unwrap()).unwrap();
            t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
        })
        .min()
        .unwrap();
    let series = format!("spiffe_tunnel_svid_expiry_timestamp_seconds{{spiffe_id=\"{BILLING}\"}}");
    let gauge = common::probe::sample(&billing.metrics().await, &series);
    assert_eq!(gauge as u64, first_expiry, "{series}");
    let web = TunnelEnd::outbound(&socket, 0, billing.listen, &[BILLING], "").await;
    roundtrip(web.listen, b"to billing")
        .await
        .expect("round trip to the process with two SVIDs of one ID");
}

/// Waits until `spire-agent api fetch` shows `id` twice for `uid`.
async fn wait_for_two(spire: &Spire, uid: u32, id: &str, mut out: String) {
    let deadline = Instant::now() + ISSUE;
    while out.matches(id).count() < 2 {
        assert!(Instant::now() < deadline, "one SVID only:\n{out}");
        tokio::time::sleep(Duration::from_millis(250)).await;
        out = spire.agent.fetch_x509_as(uid).await.unwrap_or_default();
    }
}

/// Federated bundles as SPIRE hands them out, with a federated trust
/// domain set by `bundle set` (the two-server federation is elsewhere):
/// - one that publishes only JWT keys arrives as an empty X.509 bundle,
///   which used to refuse every response; it is a domain with no X.509
///   authorities now;
/// - a bundle goes only to workloads whose entry has `-federatesWith`: a
///   peer of that domain is refused, saying so, until such an entry
///   exists, and let in after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundles_only_with_federates_with() {
    let spire = Spire::start(ServerConfig::default(), AgentConfig::default()).await;
    // jwt-only.org: our own JWKS with the X.509 authorities taken out.
    let mut jwks: serde_json::Value =
        serde_json::from_str(&spire.server.bundle_spiffe().await).unwrap();
    jwks["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["use"] == "jwt-svid");
    assert!(!jwks["keys"].as_array().unwrap().is_empty(), "{jwks}");
    spire
        .server
        .set_federated_bundle("spiffe://jwt-only.org", &jwks.to_string())
        .await;
    let partner = common::certs::Ca::new("partner.org");
    let pem = spire.server.dir().join("partner.pem");
    std::fs::write(&pem, partner.cert_pem()).unwrap();
    spire
        .server
        .cli(&[
            "bundle",
            "set",
            "-id",
            "spiffe://partner.org",
            "-path",
            pem.to_str().unwrap(),
        ])
        .await
        .expect("bundle set partner.org");

    spire
        .create_entry(
            &spire
                .entry(API)
                .uid(API_UID)
                .federates_with("spiffe://jwt-only.org"),
        )
        .await;
    // (`spire-agent api fetch x509` itself cannot show it: go-spiffe, which
    // it is built on, refuses the whole response: "no certificates in
    // bundle for federated domain". The tunnel waits for its first SVID.)
    let target = Target::start(TargetMode::Echo).await;
    let allow = [WEB, "spiffe://partner.org/**", "spiffe://jwt-only.org/**"];
    let api = TunnelEnd::inbound(
        &spire.agent.address(),
        API_UID,
        target.addr,
        &allow,
        &format!("svid = \"{API}\""),
    )
    .await;
    assert_eq!(api.ca_count("jwt-only.org").await, 0);
    assert_eq!(api.ca_count("partner.org").await, 0);

    // No entry federates with partner.org yet: refused, and why.
    let billing = partner.leaf("spiffe://partner.org/billing");
    let client = common::harness::raw_client_config(Some((&billing.chain_pem, &billing.key_pem)));
    let accepts = target.accepts();
    assert!(
        common::harness::raw_tls_roundtrip(api.listen, client.clone(), b"x")
            .await
            .is_err()
    );
    api.daemon
        .wait_log(
            "-federatesWith spiffe://partner.org",
            1,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(target.accepts(), accepts);

    // An entry of this process that federates with it brings the bundle.
    spire
        .create_entry(
            &spire
                .entry("spiffe://example.org/api-partners")
                .uid(API_UID)
                .federates_with("spiffe://partner.org"),
        )
        .await;
    wait_ca_count_of(&api, "partner.org", 1).await;
    let got = common::harness::raw_tls_roundtrip(api.listen, client, b"federated")
        .await
        .expect("a partner.org peer once an entry federates with it");
    assert_eq!(got, b"federated");
}

async fn wait_ca_count_of(end: &TunnelEnd, trust_domain: &str, want: u64) {
    let deadline = Instant::now() + ISSUE;
    while end.ca_count(trust_domain).await != want {
        assert!(
            Instant::now() < deadline,
            "no {want} CA(s) for {trust_domain}:\n{}",
            end.daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
