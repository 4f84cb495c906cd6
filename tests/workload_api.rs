//! The Workload API identity source against a scripted agent, over a real
//! Unix socket, with the daemon as a real process: what it does with bad
//! responses, federated bundles, PermissionDenied, InvalidArgument, an
//! agent that never answers, and an SVID that expires while the agent is
//! gone.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::certs::{Ca, IsCa, Leaf};
use common::fake_api::{svid_entry, FakeWorkloadApi, Reply};
use common::harness::*;
use spiffe_tunnel::proto::X509svidResponse;
use tonic::Code;

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";

fn response(leaf: &Leaf, ca: &Ca) -> X509svidResponse {
    X509svidResponse {
        svids: vec![svid_entry(leaf, std::slice::from_ref(ca.root_der()))],
        ..Default::default()
    }
}

/// An inbound tunnel fed by the Workload API at `socket`.
fn inbound_config(
    dir: &Path,
    socket: &str,
    listen: std::net::SocketAddr,
    target: &Target,
    allow: &str,
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join("tunnel.toml");
    std::fs::write(
        &path,
        format!(
            "[identity]\nsource = \"workload_api\"\nsocket = \"{socket}\"\n{extra}\n\
             [[inbound]]\nname = \"api\"\nlisten = \"{listen}\"\ntarget = \"{}\"\nallow = [{allow}]\n",
            target.addr
        ),
    )
    .unwrap();
    path
}

async fn call(addr: std::net::SocketAddr, leaf: &Leaf) -> std::io::Result<Vec<u8>> {
    raw_tls_roundtrip(
        addr,
        raw_client_config(Some((&leaf.chain_pem, &leaf.key_pem))),
        b"ping",
    )
    .await
}

struct Setup {
    _dir: tempfile::TempDir,
    ca: Ca,
    fake: FakeWorkloadApi,
    target: Target,
    listen: std::net::SocketAddr,
    daemon: Daemon,
    client: Leaf,
}

async fn setup(allow: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let fake = FakeWorkloadApi::start(dir.path(), Reply::Svids(response(&ca.leaf(API), &ca))).await;
    let target = Target::start(TargetMode::Echo).await;
    let listen = free_addr();
    let config = inbound_config(dir.path(), &fake.address(), listen, &target, allow, "");
    let daemon = Daemon::run(&config);
    daemon.wait_running().await;
    let client = ca.leaf(WEB);
    Setup {
        _dir: dir,
        ca,
        fake,
        target,
        listen,
        daemon,
        client,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_responses_are_refused_and_the_last_good_identity_stays() {
    let s = setup(&format!("{WEB:?}")).await;
    assert_eq!(call(s.listen, &s.client).await.unwrap(), b"ping");

    let good = response(&s.ca.leaf(API), &s.ca);
    let other = s.ca.leaf(API);
    let ca_leaf =
        s.ca.leaf_builder(API)
            .basic_constraints(IsCa::Ca(common::certs::BasicConstraints::Unconstrained))
            .build();
    let mut bad_cases: Vec<(&str, X509svidResponse)> = Vec::new();
    bad_cases.push(("empty svids", X509svidResponse::default()));
    let mut r = good.clone();
    r.svids[0].x509_svid = b"this is not DER".to_vec();
    bad_cases.push(("bad DER", r));
    let mut r = good.clone();
    r.svids[0].x509_svid_key = common::fake_api::key_der(&other.key_pem);
    bad_cases.push(("a key that does not match", r));
    bad_cases.push(("a leaf that breaks the rules", response(&ca_leaf, &s.ca)));
    let mut r = good.clone();
    r.svids[0].spiffe_id = "spiffe://example.org/someone-else".into();
    bad_cases.push(("spiffe_id not matching the certificate", r));
    let mut r = good.clone();
    r.svids[0].bundle = Vec::new();
    bad_cases.push(("empty bundle", r));

    for (i, (what, bad)) in bad_cases.into_iter().enumerate() {
        s.fake.set(Reply::Svids(bad));
        s.daemon
            .wait_log(
                "Workload API response refused",
                i + 1,
                Duration::from_secs(10),
            )
            .await;
        assert_eq!(
            call(s.listen, &s.client).await.unwrap_or_default(),
            b"ping",
            "after {what}"
        );
    }
    assert_eq!(
        s.daemon.log().matches("SVID in use").count(),
        1,
        "the identity changed"
    );

    // A good response is taken again.
    s.fake.set(Reply::Svids(good));
    s.daemon
        .wait_log("SVID in use", 2, Duration::from_secs(10))
        .await;
    assert_eq!(call(s.listen, &s.client).await.unwrap(), b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundles_are_added_and_removed() {
    let s = setup(&format!("{WEB:?}, \"spiffe://partner.org/**\"")).await;
    let partner_ca = Ca::new("partner.org");
    let partner = partner_ca.leaf("spiffe://partner.org/billing");
    assert!(
        call(s.listen, &partner).await.is_err(),
        "no bundle for partner.org yet"
    );

    let mut with_partner = response(&s.ca.leaf(API), &s.ca);
    with_partner.federated_bundles.insert(
        "spiffe://partner.org".into(),
        partner_ca.root_der().to_vec(),
    );
    s.fake.set(Reply::Svids(with_partner));
    s.daemon
        .wait_log("SVID in use", 2, Duration::from_secs(10))
        .await;
    assert_eq!(call(s.listen, &partner).await.unwrap(), b"ping");

    // A response without it removes it.
    s.fake.set(Reply::Svids(response(&s.ca.leaf(API), &s.ca)));
    s.daemon
        .wait_log("SVID in use", 3, Duration::from_secs(10))
        .await;
    let accepts = s.target.accepts();
    assert!(
        call(s.listen, &partner).await.is_err(),
        "partner.org still trusted"
    );
    s.daemon
        .wait_log(
            "no trust bundle for trust domain \"partner.org\"",
            2,
            Duration::from_secs(10),
        )
        .await;
    // SPIRE sends a federated bundle only to entries that federate with
    // it: the refusal names the likely cause.
    s.daemon
        .wait_log(
            "-federatesWith spiffe://partner.org",
            2,
            Duration::from_secs(5),
        )
        .await;
    assert_eq!(s.target.accepts(), accepts);
    assert_eq!(call(s.listen, &s.client).await.unwrap(), b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permission_denied_withdraws_the_identity_until_one_is_issued_again() {
    let s = setup(&format!("{WEB:?}")).await;
    assert_eq!(call(s.listen, &s.client).await.unwrap(), b"ping");

    s.fake.set(Reply::Fail(
        Code::PermissionDenied,
        "no identity issued".into(),
    ));
    s.daemon
        .wait_log("identity withdrawn", 1, Duration::from_secs(10))
        .await;
    let accepts = s.target.accepts();
    assert!(
        call(s.listen, &s.client).await.is_err(),
        "served without an identity"
    );
    s.daemon
        .wait_log("result=no_identity", 1, Duration::from_secs(10))
        .await;
    assert_eq!(s.target.accepts(), accepts);

    // It keeps asking, at least every 5 s however long the answer stays
    // no (an entry made again, or an SVID re-signed after a CA taint, is
    // then picked up within SPIRE's own 5 s sync), instead of backing off
    // to 30 s like for an agent that is down.
    const DENIED: &str = "Workload API issued no identity to this process";
    s.daemon.wait_log(DENIED, 6, Duration::from_secs(30)).await;
    let waits: Vec<Duration> = s
        .daemon
        .log()
        .lines()
        .filter(|l| l.contains(DENIED))
        .filter_map(|l| {
            l.split("retry_in=")
                .nth(1)?
                .split_whitespace()
                .next()
                .map(debug_duration)
        })
        .collect();
    assert!(
        waits.iter().all(|w| *w <= Duration::from_secs(5)),
        "waits after PermissionDenied: {waits:?}"
    );

    let back = std::time::Instant::now();
    s.fake.set(Reply::Svids(response(&s.ca.leaf(API), &s.ca)));
    s.daemon
        .wait_log("SVID in use", 2, Duration::from_secs(15))
        .await;
    assert!(
        back.elapsed() < Duration::from_millis(5500),
        "{:?}",
        back.elapsed()
    );
    assert_eq!(call(s.listen, &s.client).await.unwrap(), b"ping");
}

/// A Duration as `{:?}` prints it ("200ms", "3.2s").
fn debug_duration(text: &str) -> Duration {
    if let Some(ms) = text.strip_suffix("ms") {
        Duration::from_secs_f64(ms.parse::<f64>().unwrap() / 1000.0)
    } else {
        Duration::from_secs_f64(text.strip_suffix('s').unwrap().parse().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_argument_is_reported_as_misconfiguration_and_keeps_the_identity() {
    let s = setup(&format!("{WEB:?}")).await;
    s.fake.set(Reply::Fail(
        Code::InvalidArgument,
        "security header missing from request".into(),
    ));
    s.daemon
        .wait_log("misconfiguration", 1, Duration::from_secs(10))
        .await;
    assert_eq!(call(s.listen, &s.client).await.unwrap(), b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_timeout_bounds_the_wait_for_the_first_svid() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeWorkloadApi::start(dir.path(), Reply::Silent).await;
    let target = Target::start(TargetMode::Echo).await;
    let config = inbound_config(
        dir.path(),
        &fake.address(),
        free_addr(),
        &target,
        &format!("{WEB:?}"),
        "startup_timeout = \"1s\"",
    );
    let mut daemon = Daemon::run(&config);
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).await, Some(1));
    assert!(
        daemon.log().contains("no SVID from the Workload API"),
        "{}",
        daemon.log()
    );

    // Nobody listening at all: the same, with the connection error.
    drop(fake);
    let mut daemon = Daemon::run(&config);
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).await, Some(1));
    assert!(
        daemon.log().contains("cannot connect to the Workload API"),
        "{}",
        daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_outage_keeps_the_svid_until_it_expires_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let now = SystemTime::now();
    let short = ca
        .leaf_builder(API)
        .validity(now - Duration::from_secs(10), now + Duration::from_secs(4))
        .build();
    let fake = FakeWorkloadApi::start(dir.path(), Reply::Svids(response(&short, &ca))).await;
    let target = Target::start(TargetMode::Echo).await;
    let listen = free_addr();
    let config = inbound_config(
        dir.path(),
        &fake.address(),
        listen,
        &target,
        &format!("{WEB:?}"),
        "",
    );
    let daemon = Daemon::run(&config);
    daemon.wait_running().await;
    let client = ca.leaf(WEB);

    // The agent goes away: the cached SVID keeps serving.
    drop(fake);
    daemon
        .wait_log("Workload API unavailable", 1, Duration::from_secs(10))
        .await;
    assert_eq!(call(listen, &client).await.unwrap(), b"ping");

    // Past its expiry it is never presented: new connections are refused.
    daemon
        .wait_log(
            "our SVID expired and no new one arrived",
            1,
            Duration::from_secs(15),
        )
        .await;
    let accepts = target.accepts();
    assert!(
        call(listen, &client).await.is_err(),
        "served with an expired SVID"
    );
    daemon
        .wait_log("result=no_identity", 1, Duration::from_secs(5))
        .await;
    assert_eq!(target.accepts(), accepts);
}

/// SPIRE federates a trust domain that has only JWT keys as an empty X.509
/// bundle. It used to refuse the whole response, so the process never got
/// an identity; it is a domain with no X.509 authorities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_federated_bundle_is_a_domain_without_x509_authorities() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let mut reply = response(&ca.leaf(API), &ca);
    reply
        .federated_bundles
        .insert("spiffe://jwt-only.org".into(), Vec::new());
    let fake = FakeWorkloadApi::start(dir.path(), Reply::Svids(reply)).await;
    let target = Target::start(TargetMode::Echo).await;
    let listen = free_addr();
    let admin = free_addr();
    let config = inbound_config(
        dir.path(),
        &fake.address(),
        listen,
        &target,
        &format!("{WEB:?}, \"spiffe://jwt-only.org/**\""),
        &format!("startup_timeout = \"5s\"\n[admin]\nlisten = \"{admin}\""),
    );
    let daemon = Daemon::run(&config);
    daemon.wait_running().await;
    assert_eq!(call(listen, &ca.leaf(WEB)).await.unwrap(), b"ping");
    let status = common::probe::status(admin).await;
    let bundles = status["identity"]["bundles"].as_array().unwrap().clone();
    assert!(
        bundles
            .iter()
            .any(|b| b["trust_domain"] == "jwt-only.org" && b["ca_count"] == 0),
        "{bundles:?}"
    );

    // A peer claiming that domain cannot be verified, and the log says why.
    let rogue = Ca::new("jwt-only.org").leaf("spiffe://jwt-only.org/app");
    let accepts = target.accepts();
    assert!(call(listen, &rogue).await.is_err());
    daemon
        .wait_log("has no X.509 authorities", 1, Duration::from_secs(5))
        .await;
    assert_eq!(target.accepts(), accepts);
}

/// An SVID that is not valid yet (the issuer's clock runs ahead) is
/// refused, and the same response is checked again when it becomes valid,
/// without waiting for the next message (which may be half an SVID lifetime
/// away: here it never comes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_not_yet_valid_is_checked_again_on_a_timer() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let now = SystemTime::now();
    let ahead = ca
        .leaf_builder(API)
        .validity(
            now + Duration::from_secs(3),
            now + Duration::from_secs(3600),
        )
        .build();
    let fake = FakeWorkloadApi::start(dir.path(), Reply::Svids(response(&ahead, &ca))).await;
    let target = Target::start(TargetMode::Echo).await;
    let listen = free_addr();
    let config = inbound_config(
        dir.path(),
        &fake.address(),
        listen,
        &target,
        &format!("{WEB:?}"),
        "startup_timeout = \"15s\"",
    );
    let started = std::time::Instant::now();
    let daemon = Daemon::run(&config);
    daemon
        .wait_log("is not valid before", 1, Duration::from_secs(10))
        .await;
    daemon.wait_running().await;
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(8),
        "took {waited:?} to accept an SVID valid 3 s after start"
    );
    assert_eq!(call(listen, &ca.leaf(WEB)).await.unwrap(), b"ping");
    drop(fake);
}

/// Two SVIDs with hints: `svid_hint` picks one, alone or with `svid`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_hint_picks_the_svid_with_that_hint() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let (first, second) = (ca.leaf(API), ca.leaf(API));
    let mut reply = response(&first, &ca);
    reply.svids[0].hint = "internal".into();
    let mut other = svid_entry(&second, std::slice::from_ref(ca.root_der()));
    other.hint = "external".into();
    reply.svids.push(other);
    let fake = FakeWorkloadApi::start(dir.path(), Reply::Svids(reply)).await;
    let target = Target::start(TargetMode::Echo).await;
    for (hint, leaf) in [("internal", &first), ("external", &second)] {
        let listen = free_addr();
        let sub = dir.path().join(hint);
        std::fs::create_dir(&sub).unwrap();
        let config = inbound_config(
            &sub,
            &fake.address(),
            listen,
            &target,
            &format!("{WEB:?}"),
            "",
        );
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "allow = [",
            &format!("svid = \"{API}\"\nsvid_hint = \"{hint}\"\nallow = ["),
        );
        std::fs::write(&config, text).unwrap();
        let daemon = Daemon::run(&config);
        daemon.wait_running().await;
        let presented = presented_leaf(listen, &ca.leaf(WEB)).await;
        assert!(
            presented == *leaf.leaf_der(),
            "svid_hint = {hint:?} presented another SVID"
        );
    }
}

/// The leaf certificate the server at `addr` presents.
async fn presented_leaf(
    addr: std::net::SocketAddr,
    client: &Leaf,
) -> rustls_pki_types::CertificateDer<'static> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(raw_client_config(Some((
        &client.chain_pem,
        &client.key_pem,
    ))));
    let name = rustls_pki_types::ServerName::try_from("spiffe-tunnel.test").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// Two SVIDs with one ID (two SPIRE entries): the expiry gauge of that ID
/// shows the one that expires first, whatever their order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_expiry_gauge_of_an_id_held_twice_is_the_earlier() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let now = SystemTime::now();
    let leaf = |hours: u64| {
        ca.leaf_builder(API)
            .validity(
                now - Duration::from_secs(10),
                now + Duration::from_secs(3600 * hours),
            )
            .build()
    };
    let (sooner, later) = (leaf(1), leaf(2));
    let mut reply = response(&sooner, &ca);
    reply
        .svids
        .push(svid_entry(&later, std::slice::from_ref(ca.root_der())));
    let fake = FakeWorkloadApi::start(dir.path(), Reply::Svids(reply)).await;
    let target = Target::start(TargetMode::Echo).await;
    let admin = free_addr();
    let config = inbound_config(
        dir.path(),
        &fake.address(),
        free_addr(),
        &target,
        &format!("{WEB:?}"),
        &format!("[admin]\nlisten = \"{admin}\""),
    );
    let daemon = Daemon::run(&config);
    daemon.wait_running().await;
    let series = format!("spiffe_tunnel_svid_expiry_timestamp_seconds{{spiffe_id=\"{API}\"}}");
    let gauge = common::probe::sample(&common::probe::metrics(admin).await, &series);
    let sooner_at = (now + Duration::from_secs(3600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(gauge as u64, sooner_at, "{series}");
}
