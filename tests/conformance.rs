//! One conformance suite for what a Workload API client sees, run against
//! both the dev agent and a real SPIRE (v1.13.3) with the same test bodies
//! (`against_both_servers!` instantiates each body once per server, in the
//! modules `dev_agent` and `spire`). Setup and the two servers are in
//! `common/api_under_test.rs`.
//!
//! Covered: the response shape (fields, hint, chains and bundles as
//! concatenated DER), the security header, PermissionDenied for a caller
//! with no registration, two SVIDs with one SPIFFE ID, rotation at half
//! life pushed on an open stream, the CA rotation order (the next CA in the
//! bundle before it signs), and federated bundles only for registrations
//! that federate.
//!
//! Where the two servers follow different rules on purpose, the rule lives
//! in `ApiUnderTest` and docs/dev-agent.md says so: SVID
//! order, the renewal moment.

mod common;

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use common::api_under_test::{
    bundle_set, fetch_as, next, signed_by, split_der, ApiUnderTest, Caller, Kind, Registration,
    Setup, WorkloadClient,
};
use common::certs::Ca;
use common::spire::OTHER_UID;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;
use spiffe_tunnel::identity::x509svid::{check_leaf, check_signer};
use spiffe_tunnel::identity::Svid;
use spiffe_tunnel::proto::{X509BundlesRequest, X509svidRequest, SECURITY_HEADER};
use spiffe_tunnel::tls::verify::{to_unix_time, verify_svid_chain, PeerRole};
use tonic::Code;

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";
const TD_ID: &str = "spiffe://example.org";

against_both_servers!(
    response_shape,
    security_header,
    permission_denied_without_a_registration,
    two_registrations_of_one_id_give_two_svids,
    rotation_at_half_life,
    ca_rotation_publishes_the_next_ca_before_it_signs,
    federated_bundles_only_for_registrations_that_federate,
);

/// The server with these registrations and nothing else.
async fn serving(kind: Kind, registrations: Vec<Registration>) -> ApiUnderTest {
    ApiUnderTest::start(
        kind,
        Setup {
            registrations,
            ..Setup::default()
        },
    )
    .await
}

/// The sorted SPIFFE IDs of a `fetch` answer.
fn fetched_ids(answer: &Value) -> Vec<String> {
    let mut ids: Vec<String> = answer["svids"]
        .as_array()
        .map(|svids| {
            svids
                .iter()
                .map(|s| s["spiffe_id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

fn keys(map: &Value) -> Vec<String> {
    let mut keys: Vec<String> = map
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

// ---------------------------------------------------------------------------

/// Every field of `X509SVIDResponse` and `X509BundlesResponse` as a client
/// reads it: chains and bundles are concatenated DER, the key is PKCS#8 DER
/// of the leaf's key, each SVID chains to the bundle sent with it, hint is
/// empty without one in the registration, and the bundles stream holds our
/// trust domain's bundle under `spiffe://example.org`, the same bytes.
async fn response_shape(kind: Kind) {
    let api = serving(
        kind,
        vec![Registration::uid(WEB, 0), Registration::uid(API, 0)],
    )
    .await;
    let mut client = WorkloadClient::connect(api.socket()).await;
    let response = next(
        &mut client.x509_svids().await.unwrap(),
        Duration::from_secs(10),
    )
    .await;

    let mut ids: Vec<&str> = response
        .svids
        .iter()
        .map(|s| s.spiffe_id.as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, [API, WEB]);
    assert!(response.crl.is_empty());
    assert!(response.federated_bundles.is_empty());
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    for svid in &response.svids {
        assert_eq!(svid.hint, "", "no hint was registered");
        let chain = split_der(&svid.x509_svid);
        let facts = check_leaf(&chain[0]).expect("the leaf passes the X509-SVID rules");
        assert_eq!(facts.id.to_string(), svid.spiffe_id);
        for signer in &chain[1..] {
            check_signer(signer).expect("an intermediate is a signing certificate");
        }
        // The key is PKCS#8 DER of the leaf's public key.
        let parsed = Svid::from_der(
            chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.x509_svid_key.clone())),
            &provider,
        )
        .expect("key and chain belong together");
        assert_eq!(parsed.id.to_string(), svid.spiffe_id);
        let bundle = split_der(&svid.bundle);
        assert!(!bundle.is_empty());
        for ca in &bundle {
            check_signer(ca).expect("the bundle holds CA certificates");
        }
        let peer = verify_svid_chain(
            &chain,
            &bundle_set(bundle),
            to_unix_time(SystemTime::now()),
            PeerRole::Any,
        )
        .expect("the chain verifies against the bundle sent with it");
        assert_eq!(peer.id.to_string(), svid.spiffe_id);
        assert_eq!(svid.bundle, response.svids[0].bundle, "one bundle for all");
    }

    let bundles = next(
        &mut client.x509_bundles().await.unwrap(),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(bundles.bundles.keys().collect::<Vec<_>>(), [TD_ID]);
    assert_eq!(bundles.bundles[TD_ID], response.svids[0].bundle);
    assert!(bundles.crl.is_empty());

    // Another client sees the same through go-spiffe's generated client.
    let fetched = fetch_as(&api, 0, "x509svid").await;
    assert_eq!(fetched_ids(&fetched), [API, WEB]);
}

/// Without `workload.spiffe.io: true`, or with another value, both X.509
/// RPCs fail with InvalidArgument and SPIRE's message.
async fn security_header(kind: Kind) {
    let api = serving(kind, vec![Registration::uid(WEB, 0)]).await;
    let mut client = WorkloadClient::connect(api.socket()).await;
    let status = client
        .0
        .fetch_x509svid(tonic::Request::new(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), "security header missing from request");
    let status = client
        .0
        .fetch_x509_bundles(tonic::Request::new(X509BundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), "security header missing from request");
    let mut wrong = tonic::Request::new(X509svidRequest {});
    wrong
        .metadata_mut()
        .insert(SECURITY_HEADER, "false".parse().unwrap());
    let status = client.0.fetch_x509svid(wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

/// A caller no registration matches gets PermissionDenied "no identity
/// issued", for its bundles too (SPIRE's default, without
/// `allow_unauthenticated_verifiers`); a registered one is served.
async fn permission_denied_without_a_registration(kind: Kind) {
    let api = serving(kind, vec![Registration::uid(WEB, 0)]).await;
    let stranger = OTHER_UID + 7;
    for rpc in ["x509svid", "x509bundles"] {
        let answer = fetch_as(&api, stranger, rpc).await;
        assert_eq!(answer["code"], "PermissionDenied", "{rpc}: {answer}");
        assert_eq!(answer["message"], "no identity issued", "{rpc}: {answer}");
    }
    let answer = fetch_as(&api, 0, "x509svid").await;
    assert_eq!(fetched_ids(&answer), [WEB], "{answer}");
}

/// Two registrations of one SPIFFE ID that both match the caller (SPIRE:
/// `unix:uid:0` and `unix:user:root`) give it two SVIDs with that ID, each
/// with its own key.
async fn two_registrations_of_one_id_give_two_svids(kind: Kind) {
    let api = ApiUnderTest::start(
        kind,
        Setup {
            registrations: vec![
                Registration::uid(WEB, 0),
                Registration {
                    id: WEB.into(),
                    caller: Caller::RootByName,
                    federates_with: None,
                },
            ],
            ..Setup::default()
        },
    )
    .await;
    let mut client = WorkloadClient::connect(api.socket()).await;
    // SPIRE may send the first entry's SVID before the second one's.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut stream = client.x509_svids().await.unwrap();
    let response = loop {
        let response = next(&mut stream, Duration::from_secs(30)).await;
        if response.svids.len() >= 2 || tokio::time::Instant::now() > deadline {
            break response;
        }
    };
    let ids: Vec<&str> = response
        .svids
        .iter()
        .map(|s| s.spiffe_id.as_str())
        .collect();
    assert_eq!(ids, [WEB, WEB]);
    assert_ne!(response.svids[0].x509_svid, response.svids[1].x509_svid);
    assert_ne!(
        response.svids[0].x509_svid_key,
        response.svids[1].x509_svid_key
    );
}

/// An open stream gets a new SVID, with a new key, at the server's renewal
/// moment for the SVID it holds ([`ApiUnderTest::renewal_due`]), without
/// asking again; twice.
async fn rotation_at_half_life(kind: Kind) {
    let api = ApiUnderTest::start(
        kind,
        Setup {
            registrations: vec![Registration::uid(WEB, 0)],
            short_svids: true,
            ..Setup::default()
        },
    )
    .await;
    let mut client = WorkloadClient::connect(api.socket()).await;
    let mut stream = client.x509_svids().await.unwrap();
    let ttl = ApiUnderTest::short_ttl(kind);
    let mut current = next(&mut stream, ttl).await;
    for rotation in 1..=2 {
        let leaf = split_der(&current.svids[0].x509_svid).remove(0);
        let facts = check_leaf(&leaf).unwrap();
        let due = api.renewal_due(facts.not_before, facts.not_after);
        let renewed = loop {
            let response = next(&mut stream, ttl * 2).await;
            if response.svids[0].x509_svid != current.svids[0].x509_svid {
                break response;
            }
        };
        let arrived = SystemTime::now();
        let early = due.duration_since(arrived).unwrap_or_default();
        let late = arrived.duration_since(due).unwrap_or_default();
        println!(
            "{kind:?} rotation {rotation}: {} s SVID renewed {early:?} early / {late:?} late",
            facts.not_after - facts.not_before
        );
        assert!(
            early < Duration::from_millis(1200) && late < api.renewal_slack(),
            "rotation {rotation}: the new SVID came {early:?} early / {late:?} late \
             against the renewal moment of the old one"
        );
        assert_ne!(
            renewed.svids[0].x509_svid_key,
            current.svids[0].x509_svid_key
        );
        current = renewed;
    }
}

/// Through a CA rotation every response's leaf is signed by a CA that an
/// earlier (or the same) response had in its bundle, the next CA appears in
/// the bundle while the old one still signs, and once the new one signs the
/// old one is still in the bundle for the SVIDs it signed.
async fn ca_rotation_publishes_the_next_ca_before_it_signs(kind: Kind) {
    let mut api = ApiUnderTest::start(
        kind,
        Setup {
            registrations: vec![Registration::uid(WEB, 0)],
            ca_rotation: true,
            ..Setup::default()
        },
    )
    .await;
    let mut client = WorkloadClient::connect(api.socket()).await;
    let mut stream = client.x509_svids().await.unwrap();
    let first = next(&mut stream, Duration::from_secs(10)).await;
    let first_bundle = split_der(&first.svids[0].bundle);
    let old_signer = first_bundle
        .iter()
        .find(|ca| signed_by(&split_der(&first.svids[0].x509_svid)[0], ca))
        .expect("the first leaf is signed by a CA of its bundle")
        .clone();
    let mut seen: HashSet<Vec<u8>> = first_bundle.iter().map(|c| c.to_vec()).collect();

    api.prepare_ca().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut announced = false;
    let mut activated = false;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(!left.is_zero(), "the CA rotation did not complete in time");
        let response = next(&mut stream, left).await;
        let svid = &response.svids[0];
        let bundle = split_der(&svid.bundle);
        let leaf = split_der(&svid.x509_svid).remove(0);
        let signer = bundle
            .iter()
            .find(|ca| signed_by(&leaf, ca))
            .expect("the leaf's CA is in the bundle sent with it")
            .clone();
        assert!(
            seen.contains(signer.as_ref()),
            "an SVID signed by a CA no earlier response had in its bundle"
        );
        if !announced && bundle.iter().any(|ca| !seen.contains(ca.as_ref())) {
            announced = true;
            assert_eq!(
                signer, old_signer,
                "the response announcing the next CA carries an SVID of the old one"
            );
        }
        for ca in &bundle {
            seen.insert(ca.to_vec());
        }
        if announced && !activated {
            api.activate_ca().await;
            activated = true;
        }
        if signer != old_signer {
            assert!(announced, "a new CA signed before it was announced");
            assert!(
                bundle.contains(&old_signer),
                "the old CA left the bundle as soon as the new one signed"
            );
            break;
        }
    }
}

/// A federated bundle reaches only callers whose registration federates
/// with its trust domain (`-federatesWith`), in FetchX509SVID and in
/// FetchX509Bundles; other callers get their own trust domain's only.
async fn federated_bundles_only_for_registrations_that_federate(kind: Kind) {
    let partner = Ca::new("partner.org");
    let other = OTHER_UID + 8;
    let api = ApiUnderTest::start(
        kind,
        Setup {
            registrations: vec![
                Registration::uid(WEB, 0).federating("partner.org"),
                Registration::uid(API, other),
            ],
            federated: vec![("partner.org".into(), partner.cert_pem().to_string())],
            ..Setup::default()
        },
    )
    .await;
    let mut client = WorkloadClient::connect(api.socket()).await;
    let mut stream = client.x509_svids().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let response = loop {
        let response = next(&mut stream, Duration::from_secs(30)).await;
        if !response.federated_bundles.is_empty() || tokio::time::Instant::now() > deadline {
            break response;
        }
    };
    assert_eq!(
        response.federated_bundles.keys().collect::<Vec<_>>(),
        ["spiffe://partner.org"]
    );
    assert_eq!(
        split_der(&response.federated_bundles["spiffe://partner.org"]),
        [partner.cert_der().clone()]
    );
    let bundles = next(
        &mut client.x509_bundles().await.unwrap(),
        Duration::from_secs(10),
    )
    .await;
    let mut got: Vec<&String> = bundles.bundles.keys().collect();
    got.sort();
    assert_eq!(got, [TD_ID, "spiffe://partner.org"]);

    let svids = fetch_as(&api, other, "x509svid").await;
    assert_eq!(fetched_ids(&svids), [API], "{svids}");
    assert!(
        keys(&svids["federated_bundles"]).is_empty(),
        "a caller whose registration does not federate got {svids}"
    );
    let bundles = fetch_as(&api, other, "x509bundles").await;
    assert_eq!(keys(&bundles["bundles"]), [TD_ID], "{bundles}");
}
