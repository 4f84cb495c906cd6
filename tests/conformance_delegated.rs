//! SPIRE's Delegated Identity API (the agent's admin socket), the same test
//! bodies against the dev agent (`--admin-socket`, `--authorized-delegate`)
//! and SPIRE v1.13.3 (`admin_socket_path`, `authorized_delegates`), like
//! `conformance.rs` does for the Workload API.
//!
//! Covered: SVIDs of another workload by `unix:uid` selectors and by pid
//! (its chain, key, ID and expiry), an answer with no SVID (not an error)
//! for a subject no registration matches, InvalidArgument for a request
//! with both a pid and selectors or neither, and PermissionDenied for a
//! caller that holds an identity but is no authorized delegate.

mod common;

use std::time::Duration;

use common::api_under_test::{ApiUnderTest, Kind, Registration, Setup};
use common::spire::{command_as, OTHER_UID};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe_tunnel::identity::workload_api::ApiAddress;
use spiffe_tunnel::identity::Svid;
use spiffe_tunnel::proto::spire::api::agent::delegatedidentity::v1 as api;
use spiffe_tunnel::proto::spire::api::types::Selector;
use tonic::Code;

const TUNNEL: &str = "spiffe://example.org/tunnel";
const WEB: &str = "spiffe://example.org/web";

against_both_servers!(
    svids_of_another_workload_by_selectors_and_by_pid,
    a_request_names_a_pid_or_selectors,
    a_caller_that_is_no_delegate_is_refused,
);

type Client = api::delegated_identity_client::DelegatedIdentityClient<tonic::transport::Channel>;

async fn admin(server: &ApiUnderTest) -> Client {
    let channel = ApiAddress::Unix(server.admin_socket().to_path_buf())
        .channel(Default::default())
        .await
        .expect("connect to the admin socket");
    Client::new(channel)
}

fn by_uid(uid: u32) -> api::SubscribeToX509sviDsRequest {
    api::SubscribeToX509sviDsRequest {
        selectors: vec![Selector {
            r#type: "unix".into(),
            value: format!("uid:{uid}"),
        }],
        pid: 0,
    }
}

/// The first answer of a subscription, or its status.
async fn first(
    client: &mut Client,
    request: api::SubscribeToX509sviDsRequest,
) -> Result<api::SubscribeToX509sviDsResponse, tonic::Status> {
    let mut stream = client.subscribe_to_x509svi_ds(request).await?.into_inner();
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("an answer within 30 s")?
        .ok_or_else(|| tonic::Status::unknown("the stream ended"))
}

/// The answer holds exactly one SVID, of `id`, whose chain, key, ID and
/// expiry agree.
fn assert_one_svid(answer: &api::SubscribeToX509sviDsResponse, id: &str) {
    assert_eq!(answer.x509_svids.len(), 1, "{answer:?}");
    let with_key = &answer.x509_svids[0];
    let svid = with_key.x509_svid.as_ref().expect("x509_svid");
    let named = svid.id.as_ref().expect("id");
    assert_eq!(format!("spiffe://{}{}", named.trust_domain, named.path), id);
    // One certificate per element, each DER on its own (not concatenated).
    assert!(!svid.cert_chain.is_empty());
    let chain: Vec<CertificateDer<'static>> = svid
        .cert_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(with_key.x509_svid_key.clone()));
    let parsed = Svid::from_der(chain, key, &spiffe_tunnel::tls::config::provider())
        .expect("a valid SVID whose key matches its leaf");
    assert_eq!(parsed.id.to_string(), id);
    let not_after = parsed
        .not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(svid.expires_at, not_after);
    assert!(answer.federates_with.is_empty());
}

async fn svids_of_another_workload_by_selectors_and_by_pid(kind: Kind) {
    let server = ApiUnderTest::start(
        kind,
        Setup {
            registrations: vec![
                Registration::uid(TUNNEL, 0),
                Registration::uid(WEB, OTHER_UID),
            ],
            delegates: vec![TUNNEL.into()],
            ..Setup::default()
        },
    )
    .await;
    let mut client = admin(&server).await;

    let answer = first(&mut client, by_uid(OTHER_UID))
        .await
        .expect("by selectors");
    assert_one_svid(&answer, WEB);

    // A process of that uid, by pid: the server attests it itself.
    let mut workload = command_as("sleep", OTHER_UID).arg("30").spawn().unwrap();
    let request = api::SubscribeToX509sviDsRequest {
        selectors: Vec::new(),
        pid: workload.id() as i32,
    };
    let answer = first(&mut client, request).await;
    let _ = workload.kill();
    let _ = workload.wait();
    assert_one_svid(&answer.expect("by pid"), WEB);

    // Nobody registered: an answer with no SVID, not an error.
    let answer = first(&mut client, by_uid(OTHER_UID + 7))
        .await
        .expect("answered");
    assert!(answer.x509_svids.is_empty(), "{answer:?}");
}

async fn a_request_names_a_pid_or_selectors(kind: Kind) {
    let server = ApiUnderTest::start(
        kind,
        Setup {
            registrations: vec![Registration::uid(TUNNEL, 0)],
            delegates: vec![TUNNEL.into()],
            ..Setup::default()
        },
    )
    .await;
    let mut client = admin(&server).await;
    let mut both = by_uid(OTHER_UID);
    both.pid = std::process::id() as i32;
    let neither = api::SubscribeToX509sviDsRequest::default();
    for request in [both, neither] {
        let status = first(&mut client, request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            status.message(),
            "must provide either selectors or non-zero PID, but not both"
        );
    }
}

async fn a_caller_that_is_no_delegate_is_refused(kind: Kind) {
    let server = ApiUnderTest::start(
        kind,
        Setup {
            registrations: vec![Registration::uid(WEB, 0)],
            delegates: vec![TUNNEL.into()],
            ..Setup::default()
        },
    )
    .await;
    let mut client = admin(&server).await;
    let status = first(&mut client, by_uid(0)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(
        status.message(),
        "caller not configured as an authorized delegate"
    );
}
