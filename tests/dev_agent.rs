//! The dev agent over its real Unix socket, with a plain tonic Workload API
//! client: the SVID template, streaming rotation, CA rotation, the security
//! header, per-uid identities, federation, the socket file, churn, and the
//! `dev-agent` command itself.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::api_under_test::{bundle_set, next, signed_by, split_der, with_header, WorkloadClient};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe_tunnel::agent::{AgentError, DevAgent, DevAgentConfig, IdGrant};
use spiffe_tunnel::identity::Svid;
use spiffe_tunnel::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use spiffe_tunnel::proto::{
    JwtsvidRequest, X509BundlesRequest, X509svidRequest, X509svidResponse, SECURITY_HEADER,
};
use spiffe_tunnel::spiffe_id::{parse_trust_domain, TrustDomain};
use spiffe_tunnel::tls::verify::{to_unix_time, verify_svid_chain, PeerRole};
use tonic::transport::Channel;
use tonic::{Code, Streaming};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

const TD: &str = "example.org";

fn td() -> TrustDomain {
    parse_trust_domain(TD).unwrap()
}

fn grant(s: &str) -> IdGrant {
    s.parse().unwrap()
}

fn config(dir: &Path, ids: &[&str]) -> DevAgentConfig {
    DevAgentConfig::new(
        dir.join("agent.sock"),
        td(),
        ids.iter().map(|s| grant(s)).collect(),
    )
}

fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

async fn client(path: &Path) -> SpiffeWorkloadApiClient<Channel> {
    WorkloadClient::connect(path).await.0
}

async fn x509_stream(client: &mut SpiffeWorkloadApiClient<Channel>) -> Streaming<X509svidResponse> {
    client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .expect("FetchX509SVID")
        .into_inner()
}

fn serial_of(der: &[u8]) -> String {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    let raw = cert.tbs_certificate.raw_serial();
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len() - 1);
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

async fn wait_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn svids_follow_spires_template_and_verify_against_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let agent = DevAgent::start(config(
        dir.path(),
        &["spiffe://example.org/web", "spiffe://example.org/api"],
    ))
    .await
    .unwrap();
    let mut client = client(agent.socket_path()).await;
    let mut stream = x509_stream(&mut client).await;
    let response = next(&mut stream, Duration::from_secs(5)).await;
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    let ids: Vec<&str> = response
        .svids
        .iter()
        .map(|s| s.spiffe_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/web", "spiffe://example.org/api"]
    );
    assert!(response.federated_bundles.is_empty());

    let serials = agent.current_serials();
    for (svid, (id, serial)) in response.svids.iter().zip(&serials) {
        assert_eq!(svid.spiffe_id, id.to_string());
        let chain = split_der(&svid.x509_svid);
        assert_eq!(
            chain.len(),
            1,
            "the chain is the leaf alone: our CA is the root"
        );
        let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();

        assert_eq!(leaf.subject().to_string(), "C=US, O=SPIRE");
        let ku = leaf.key_usage().unwrap().expect("key usage");
        assert!(ku.critical, "key usage must be critical");
        assert!(ku.value.digital_signature());
        assert!(ku.value.key_encipherment());
        assert!(ku.value.key_agreement());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = leaf.extended_key_usage().unwrap().expect("EKU").value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(
            !leaf
                .basic_constraints()
                .unwrap()
                .expect("basic constraints")
                .value
                .ca
        );
        let sans = &leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert_eq!(sans, &vec![GeneralName::URI(svid.spiffe_id.as_str())]);
        let not_before = leaf.validity().not_before.timestamp();
        assert!(
            (now_secs - 13..=now_secs - 8).contains(&not_before),
            "NotBefore {not_before} is not now-10s ({now_secs})"
        );
        assert_eq!(&serial_of(&chain[0]), serial);

        // Our own client rules accept it, key included.
        let parsed = Svid::from_der(
            chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.x509_svid_key.clone())),
            &rustls::crypto::aws_lc_rs::default_provider(),
        )
        .expect("the SVID passes our own X509-SVID rules");
        assert_eq!(parsed.id, *id);

        // And it chains to the bundle that came with it.
        let bundle = split_der(&svid.bundle);
        assert_eq!(bundle.len(), 1);
        let peer = verify_svid_chain(
            &chain,
            &bundle_set(bundle),
            to_unix_time(SystemTime::now()),
            PeerRole::Any,
        )
        .expect("chain verifies against the bundle");
        assert_eq!(peer.id, *id);
    }
    // bundle_pem() is the same bundle.
    let from_pem =
        spiffe_tunnel::identity::certs_from_pem(agent.bundle_pem().as_bytes(), "bundle").unwrap();
    assert_eq!(from_pem, split_der(&response.svids[0].bundle));

    // JWT is honestly unimplemented.
    let status = client
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["x".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);

    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_gets_each_rotation_at_half_life() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["spiffe://example.org/web"]);
    cfg.ttl = Duration::from_secs(2);
    let agent = DevAgent::start(cfg).await.unwrap();
    let mut client = client(agent.socket_path()).await;
    let mut stream = x509_stream(&mut client).await;

    let first = next(&mut stream, Duration::from_secs(5)).await;
    let received = tokio::time::Instant::now();
    let first_serial = serial_of(&split_der(&first.svids[0].x509_svid)[0]);
    // Renewal comes at half of the 2-3 s the SVID has left: 1-1.5 s.
    let second = next(&mut stream, Duration::from_secs(4)).await;
    let elapsed = received.elapsed();
    let second_serial = serial_of(&split_der(&second.svids[0].x509_svid)[0]);
    assert_ne!(
        first_serial, second_serial,
        "a new response carries a new SVID"
    );
    assert_ne!(first.svids[0].x509_svid_key, second.svids[0].x509_svid_key);
    assert!(
        elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(2),
        "rotation after {elapsed:?}, expected about half of the 2 s ttl"
    );
    assert_eq!(
        agent.current_serials()[0].1,
        second_serial,
        "current_serials follows the rotation"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_without_the_security_header_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = DevAgent::start(config(dir.path(), &["spiffe://example.org/web"]))
        .await
        .unwrap();
    let mut client = client(agent.socket_path()).await;

    let status = client
        .fetch_x509svid(tonic::Request::new(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "security header missing from request");

    let status = client
        .fetch_x509_bundles(tonic::Request::new(X509BundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let mut wrong = tonic::Request::new(X509svidRequest {});
    wrong
        .metadata_mut()
        .insert(SECURITY_HEADER, "false".parse().unwrap());
    let status = client.fetch_x509svid(wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let status = client
        .fetch_jwtsvid(tonic::Request::new(JwtsvidRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "header is checked first"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_with_no_identity_is_denied() {
    let dir = tempfile::tempdir().unwrap();
    let other = my_uid().wrapping_add(1);
    let agent = DevAgent::start(config(
        dir.path(),
        &[&format!("uid:{other}=spiffe://example.org/web")],
    ))
    .await
    .unwrap();
    let mut client = client(agent.socket_path()).await;
    let status = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(status.message(), "no identity issued");

    // As SPIRE without allow_unauthenticated_verifiers: no bundles either.
    let status = client
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn uid_qualified_ids_go_to_that_uid_in_command_line_order() {
    let dir = tempfile::tempdir().unwrap();
    let me = my_uid();
    let other = me.wrapping_add(1);
    let agent = DevAgent::start(config(
        dir.path(),
        &[
            &format!("uid:{other}=spiffe://example.org/not-mine"),
            &format!("uid:{me}=spiffe://example.org/mine"),
            "spiffe://example.org/everyone",
        ],
    ))
    .await
    .unwrap();
    let mut client = client(agent.socket_path()).await;
    let mut stream = x509_stream(&mut client).await;
    let response = next(&mut stream, Duration::from_secs(5)).await;
    let ids: Vec<&str> = response
        .svids
        .iter()
        .map(|s| s.spiffe_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/mine", "spiffe://example.org/everyone"],
        "default first, the other uid's ID absent"
    );
    agent.shutdown().await;
}

/// A second agent, a handy source of a real CA for the partner domain, and
/// its bundle written to `dir/partner.pem`.
async fn partner_agent(dir: &Path) -> (DevAgent, PathBuf) {
    let partner = DevAgent::start(DevAgentConfig::new(
        dir.join("partner.sock"),
        parse_trust_domain("partner.org").unwrap(),
        vec![grant("spiffe://partner.org/db")],
    ))
    .await
    .unwrap();
    let pem = dir.join("partner.pem");
    std::fs::write(&pem, partner.bundle_pem()).unwrap();
    (partner, pem)
}

#[tokio::test(flavor = "multi_thread")]
async fn federated_bundles_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (partner, partner_pem) = partner_agent(dir.path()).await;
    let partner_der: Vec<u8> =
        spiffe_tunnel::identity::certs_from_pem(partner.bundle_pem().as_bytes(), "partner")
            .unwrap()
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect();

    let mut cfg = config(dir.path(), &["spiffe://example.org/web"]);
    cfg.federate = vec![(parse_trust_domain("partner.org").unwrap(), partner_pem)];
    cfg.federates_with = vec![(
        "spiffe://example.org/web".parse().unwrap(),
        parse_trust_domain("partner.org").unwrap(),
    )];
    let agent = DevAgent::start(cfg).await.unwrap();
    let mut client = client(agent.socket_path()).await;

    let mut svids = x509_stream(&mut client).await;
    let response = next(&mut svids, Duration::from_secs(5)).await;
    assert_eq!(
        response.federated_bundles.keys().collect::<Vec<_>>(),
        ["spiffe://partner.org"]
    );
    assert_eq!(
        response.federated_bundles["spiffe://partner.org"],
        partner_der
    );

    let mut bundles = client
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let response_bundles = next(&mut bundles, Duration::from_secs(5)).await;
    let mut keys: Vec<&String> = response_bundles.bundles.keys().collect();
    keys.sort();
    assert_eq!(keys, ["spiffe://example.org", "spiffe://partner.org"]);
    assert_eq!(
        response_bundles.bundles["spiffe://partner.org"],
        partner_der
    );
    assert_eq!(
        response_bundles.bundles["spiffe://example.org"],
        response.svids[0].bundle
    );

    agent.shutdown().await;
    partner.shutdown().await;
}

/// As SPIRE: a federated bundle goes only to callers holding an ID whose
/// entry federates with it (`-federatesWith`), not to every caller.
#[tokio::test(flavor = "multi_thread")]
async fn federated_bundles_go_only_to_callers_whose_ids_federate() {
    let dir = tempfile::tempdir().unwrap();
    let (partner, partner_pem) = partner_agent(dir.path()).await;
    let me = my_uid();
    let other = me.wrapping_add(1);

    // We hold web; only the other uid's db federates with partner.org.
    let mut cfg = config(
        dir.path(),
        &[
            &format!("uid:{me}=spiffe://example.org/web"),
            &format!("uid:{other}=spiffe://example.org/db"),
        ],
    );
    cfg.federate = vec![(parse_trust_domain("partner.org").unwrap(), partner_pem)];
    cfg.federates_with = vec![(
        "spiffe://example.org/db".parse().unwrap(),
        parse_trust_domain("partner.org").unwrap(),
    )];
    let agent = DevAgent::start(cfg.clone()).await.unwrap();
    let mut api = client(agent.socket_path()).await;
    let response = next(&mut x509_stream(&mut api).await, Duration::from_secs(5)).await;
    assert_eq!(response.svids.len(), 1);
    assert!(
        response.federated_bundles.is_empty(),
        "a caller whose IDs do not federate got {:?}",
        response.federated_bundles.keys().collect::<Vec<_>>()
    );
    let mut bundles = api
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let keys: Vec<String> = next(&mut bundles, Duration::from_secs(5))
        .await
        .bundles
        .into_keys()
        .collect();
    assert_eq!(keys, ["spiffe://example.org"]);
    agent.shutdown().await;

    // Once our web federates too, we get it.
    cfg.federates_with.push((
        "spiffe://example.org/web".parse().unwrap(),
        parse_trust_domain("partner.org").unwrap(),
    ));
    let agent = DevAgent::start(cfg).await.unwrap();
    let mut api = client(agent.socket_path()).await;
    let response = next(&mut x509_stream(&mut api).await, Duration::from_secs(5)).await;
    assert_eq!(
        response.federated_bundles.keys().collect::<Vec<_>>(),
        ["spiffe://partner.org"]
    );
    agent.shutdown().await;
    partner.shutdown().await;
}

/// As SPIRE with two entries of one SPIFFE ID that both match the caller
/// (one by uid, one for everyone): two SVIDs, one ID, each its own key.
#[tokio::test(flavor = "multi_thread")]
async fn two_grants_of_one_id_give_two_svids() {
    let dir = tempfile::tempdir().unwrap();
    let me = my_uid();
    let agent = DevAgent::start(config(
        dir.path(),
        &[
            &format!("uid:{me}=spiffe://example.org/web"),
            "spiffe://example.org/web",
        ],
    ))
    .await
    .unwrap();
    let mut client = client(agent.socket_path()).await;
    let response = next(&mut x509_stream(&mut client).await, Duration::from_secs(5)).await;
    let ids: Vec<&str> = response
        .svids
        .iter()
        .map(|s| s.spiffe_id.as_str())
        .collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/web", "spiffe://example.org/web"]
    );
    let serial = |i: usize| serial_of(&split_der(&response.svids[i].x509_svid)[0]);
    assert_ne!(serial(0), serial(1));
    assert_ne!(
        response.svids[0].x509_svid_key,
        response.svids[1].x509_svid_key
    );
    assert_eq!(agent.current_serials().len(), 2);
    agent.shutdown().await;

    // The very same grant twice is refused, as SPIRE refuses a duplicate
    // entry.
    let err = DevAgent::start(config(
        dir.path(),
        &["spiffe://example.org/web", "spiffe://example.org/web"],
    ))
    .await
    .unwrap_err();
    assert!(err.is_usage(), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_federated_bundle_files_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["spiffe://example.org/web"]);
    cfg.federate = vec![(
        parse_trust_domain("partner.org").unwrap(),
        dir.path().join("missing.pem"),
    )];
    cfg.federates_with = vec![(
        "spiffe://example.org/web".parse().unwrap(),
        parse_trust_domain("partner.org").unwrap(),
    )];
    let err = DevAgent::start(cfg.clone()).await.unwrap_err();
    assert!(matches!(err, AgentError::FederateRead { .. }), "{err}");
    assert_eq!(err.exit_code(), 2);

    std::fs::write(dir.path().join("junk.pem"), "not a bundle").unwrap();
    cfg.federate[0].1 = dir.path().join("junk.pem");
    let err = DevAgent::start(cfg).await.unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(
        !dir.path().join("agent.sock").exists(),
        "no socket left by a failed start"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_socket_is_world_accessible_replaces_stale_ones_and_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("not/yet/there/api.sock");
    // A stale socket from an earlier run: bound, then its listener gone.
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());

    let mut cfg = config(dir.path(), &["spiffe://example.org/web"]);
    cfg.socket = socket.clone();
    let agent = DevAgent::start(cfg.clone()).await.unwrap();
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o777);

    // An open stream is ended by shutdown, not left hanging.
    let mut client = client(&socket).await;
    let mut stream = x509_stream(&mut client).await;
    next(&mut stream, Duration::from_secs(5)).await;
    tokio::time::timeout(Duration::from_secs(8), agent.shutdown())
        .await
        .expect("shutdown finishes");
    assert!(!socket.exists(), "socket removed on shutdown");
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("the stream ends after shutdown");
    match end {
        Ok(None) => {}
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(Some(_)) => panic!("a message after shutdown"),
    }

    // A regular file in the way is not ours to delete.
    std::fs::write(&socket, "precious").unwrap();
    let err = DevAgent::start(cfg).await.unwrap_err();
    assert_eq!(err.exit_code(), 1, "{err}");
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "precious");
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_and_unix_url_socket_arguments_work() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("url.sock");
    let mut cfg = config(dir.path(), &["spiffe://example.org/web"]);
    cfg.socket =
        spiffe_tunnel::agent::parse_socket_path(&format!("unix://{}", socket.display())).unwrap();
    let agent = DevAgent::start(cfg).await.unwrap();
    assert_eq!(agent.socket_path(), socket);
    let mut client = client(&socket).await;
    next(&mut x509_stream(&mut client).await, Duration::from_secs(5)).await;
    agent.shutdown().await;
}

/// CA rotation with ttl 1 s and ca-ttl 8 s, past where
/// `tests/conformance.rs` (the next CA announced before it signs, the same
/// for SPIRE) stops: the old CA leaves the bundle once it expires (8 s),
/// and not before the new one signs.
#[tokio::test(flavor = "multi_thread")]
async fn the_old_ca_leaves_the_bundle_when_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &["spiffe://example.org/web"]);
    cfg.ttl = Duration::from_secs(1);
    cfg.ca_ttl = Duration::from_secs(8);
    let agent = DevAgent::start(cfg).await.unwrap();
    let started = std::time::Instant::now();
    let mut client = client(agent.socket_path()).await;
    let mut stream = x509_stream(&mut client).await;
    let first = next(&mut stream, Duration::from_secs(5)).await;
    let first_ca = split_der(&first.svids[0].bundle).remove(0);
    let (_, cert) = X509Certificate::from_der(&first_ca).unwrap();
    let expires = UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp() as u64);

    let mut new_ca_signed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(13);
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(!remaining.is_zero(), "the old CA never left the bundle");
        let response = next(&mut stream, remaining).await;
        let bundle = split_der(&response.svids[0].bundle);
        let leaf = split_der(&response.svids[0].x509_svid).remove(0);
        new_ca_signed |= !signed_by(&leaf, &first_ca);
        if !bundle.contains(&first_ca) {
            assert!(new_ca_signed, "old CA dropped before the new one signed");
            assert!(
                SystemTime::now() + Duration::from_millis(500) >= expires,
                "the old CA left the bundle {:?} before it expired",
                expires
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
            );
            break;
        }
    }
    assert!(started.elapsed() >= Duration::from_secs(6));
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_coming_and_going_leave_the_agent_serving() {
    let dir = tempfile::tempdir().unwrap();
    let agent = DevAgent::start(config(dir.path(), &["spiffe://example.org/web"]))
        .await
        .unwrap();
    let socket: PathBuf = agent.socket_path().to_path_buf();

    let mut tasks = Vec::new();
    for i in 0..50 {
        let socket = socket.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = client(&socket).await;
            let mut stream = x509_stream(&mut client).await;
            // Half read their first message, half leave without reading.
            if i % 2 == 0 {
                next(&mut stream, Duration::from_secs(5)).await;
            }
            // Dropping client and stream here closes the connection.
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("client finished")
            .expect("client did not panic");
    }
    wait_until("every stream task to end", Duration::from_secs(5), || {
        agent.open_streams() == 0
    })
    .await;

    // Still serving.
    let mut client = client(&socket).await;
    let mut stream = x509_stream(&mut client).await;
    let response = next(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(response.svids.len(), 1);
    assert_eq!(agent.open_streams(), 1);
    drop(stream);
    drop(client);
    wait_until(
        "the last stream task to end",
        Duration::from_secs(5),
        || agent.open_streams() == 0,
    )
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_dir_survives_restarts_and_is_shared() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let mut cfg = config(dir.path(), &["spiffe://example.org/web"]);
    cfg.ca_dir = Some(ca_dir.clone());

    let first = DevAgent::start(cfg.clone()).await.unwrap();
    let bundle = first.bundle_pem();
    first.shutdown().await;
    assert_eq!(
        std::fs::metadata(ca_dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let restarted = DevAgent::start(cfg.clone()).await.unwrap();
    assert_eq!(restarted.bundle_pem(), bundle, "same CA after a restart");

    let mut other = cfg.clone();
    other.socket = dir.path().join("node2.sock");
    let node2 = DevAgent::start(other).await.unwrap();
    assert_eq!(
        node2.bundle_pem(),
        bundle,
        "agents sharing --ca-dir share the CA"
    );

    restarted.shutdown().await;
    node2.shutdown().await;
}

// The command itself, as a process.

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_spiffe-tunnel"))
}

#[test]
fn help_explains_what_it_is_for() {
    let out = bin().args(["dev-agent", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "NOT for production",
        "--socket",
        "--trust-domain",
        "--id",
        "uid:",
        "--ttl",
        "--ca-ttl",
        "--federate",
        "--federates-with",
        "--ca-dir",
        "Where it differs from SPIRE",
        "SVID order",
        "Example",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}

#[test]
fn bad_arguments_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("a.sock");
    let socket = socket.to_str().unwrap();
    let cases: Vec<Vec<String>> = vec![
        vec![
            "--trust-domain",
            "example.org",
            "--id",
            "spiffe://example.org",
        ],
        vec![
            "--trust-domain",
            "Example.org",
            "--id",
            "spiffe://example.org/a",
        ],
        vec![
            "--trust-domain",
            "example.org",
            "--id",
            "spiffe://other.org/a",
        ],
        vec![
            "--trust-domain",
            "example.org",
            "--id",
            "uid:x=spiffe://example.org/a",
        ],
        vec![
            "--trust-domain",
            "example.org",
            "--id",
            "spiffe://example.org/a",
            "--ttl",
            "soon",
        ],
        vec![
            "--trust-domain",
            "example.org",
            "--id",
            "spiffe://example.org/a",
            "--federate",
            "partner.org=/nonexistent/bundle.pem",
        ],
        vec!["--trust-domain", "example.org"],
        // A federated bundle nobody's ID federates with.
        vec![
            "--trust-domain",
            "example.org",
            "--id",
            "spiffe://example.org/a",
            "--federate",
            "partner.org=/etc/hostname",
        ],
        vec![
            "--trust-domain",
            "example.org",
            "--id",
            "spiffe://example.org/a",
            "--federates-with",
            "spiffe://example.org/a=partner.org",
        ],
        vec![
            "--trust-domain",
            "example.org",
            "--id",
            "spiffe://example.org/a",
            "--id",
            "spiffe://example.org/a",
        ],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(String::from).collect())
    .collect();
    for args in cases {
        let out = bin()
            .args(["dev-agent", "--socket", socket])
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(!Path::new(socket).exists());
    }
}

#[test]
fn cannot_bind_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    // The socket's parent is a regular file.
    let out = bin()
        .args(["dev-agent", "--socket"])
        .arg(file.join("api.sock"))
        .args([
            "--trust-domain",
            "example.org",
            "--id",
            "spiffe://example.org/a",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_command_serves_until_sigterm_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cli.sock");
    let mut child = bin()
        .args(["dev-agent", "--socket"])
        .arg(format!("unix://{}", socket.display()))
        .args([
            "--trust-domain",
            "example.org",
            "--id",
            "spiffe://example.org/web",
            "--ttl",
            "30s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the socket", Duration::from_secs(10), || socket.exists()).await;
    let mut client = client(&socket).await;
    let response = next(&mut x509_stream(&mut client).await, Duration::from_secs(5)).await;
    assert_eq!(response.svids[0].spiffe_id, "spiffe://example.org/web");

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "dev-agent did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!socket.exists(), "socket removed on exit");
    assert!(stderr.contains("spiffe://example.org/web"), "{stderr}");
}
