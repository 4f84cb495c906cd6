//! SPIRE's Delegated Identity API as the dev agent serves it on
//! `--admin-socket`, so that `present = "caller"` can be shown and tested
//! without SPIRE.
//!
//! It follows SPIRE v1.13's handler (`pkg/agent/api/delegatedidentity/v1`):
//!
//! * the caller of the admin socket is identified by its uid (SO_PEERCRED)
//!   like a Workload API caller; with no identity it gets PermissionDenied
//!   "no identity issued", and with identities of which none is an
//!   `--authorized-delegate`, PermissionDenied "caller not configured as an
//!   authorized delegate";
//! * `SubscribeToX509SVIDs` takes a pid or selectors, never both nor
//!   neither (InvalidArgument "must provide either selectors or non-zero
//!   PID, but not both"); a pid is attested to its effective uid (what
//!   SPIRE's unix attestor reports as `unix:uid`), selectors are trusted as
//!   given and `unix:uid:N` ones are what the dev agent's uid grants match;
//!   the stream answers at once and again on every rotation, and a subject
//!   entitled to nothing gets answers with no SVID (SPIRE's answer when no
//!   entry matches), not an error;
//! * `SubscribeToX509Bundles` streams every bundle the agent holds;
//! * JWT methods are not implemented and say so.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tonic::{Request, Response, Status};

use super::rotation::Snapshot;
use super::server::{caller_uid, federated_bundles, Stream, WorkloadApi};
use crate::proto::spire::api::agent::delegatedidentity::v1 as api;
use crate::proto::spire::api::types::{Spiffeid, X509svid};
use crate::spiffe_id::SpiffeId;
use api::delegated_identity_server::DelegatedIdentity;

const JWT_UNSUPPORTED: &str = "JWT-SVIDs are not supported by the dev agent";

/// The admin API service: the Workload API's grants and state, and who may
/// act as a delegate.
#[derive(Clone)]
pub(crate) struct AdminApi {
    pub(crate) workload: WorkloadApi,
    pub(crate) delegates: Arc<[SpiffeId]>,
}

/// Whom a subscription is for.
#[derive(Debug, PartialEq, Eq)]
enum Subject {
    /// The uids named by `unix:uid:N` selectors, or the pid's uid; none
    /// when the selectors name none or the pid is gone.
    Uids(Vec<u32>),
}

impl AdminApi {
    /// SPIRE's `isCallerAuthorized`.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let uid = caller_uid(request);
        let entitled = self.workload.entitled(uid);
        if entitled.is_empty() {
            tracing::debug!(?uid, "admin API: refused a caller with no identity");
            return Err(Status::permission_denied("no identity issued"));
        }
        let snapshot = Arc::clone(&self.workload.state.borrow());
        let delegate = entitled
            .iter()
            .filter_map(|&i| snapshot.svids.get(i))
            .any(|svid| self.delegates.contains(&svid.id));
        if !delegate {
            tracing::info!(
                ?uid,
                "admin API: permission denied; caller not configured as an authorized delegate"
            );
            return Err(Status::permission_denied(
                "caller not configured as an authorized delegate",
            ));
        }
        Ok(())
    }

    /// The SVID indexes and federated bundle keys of the subject.
    fn entitlement(&self, subject: &Subject) -> (Vec<usize>, Vec<String>) {
        let Subject::Uids(uids) = subject;
        let mut svids: Vec<usize> = Vec::new();
        let mut federated: Vec<String> = Vec::new();
        // A subject with no uid still matches the grants for everyone,
        // as any caller of the Workload API does.
        let candidates: Vec<Option<u32>> = if uids.is_empty() {
            vec![None]
        } else {
            uids.iter().copied().map(Some).collect()
        };
        for uid in candidates {
            for i in self.workload.entitled(uid) {
                if !svids.contains(&i) {
                    svids.push(i);
                }
            }
            for key in self.workload.federated_for(uid) {
                if !federated.contains(&key) {
                    federated.push(key);
                }
            }
        }
        (svids, federated)
    }
}

/// SPIRE's `constructValidSelectorsFromReq`, for the dev agent's grants.
fn subject(request: &api::SubscribeToX509sviDsRequest) -> Result<Option<Subject>, Status> {
    let has_selectors = !request.selectors.is_empty();
    if has_selectors == (request.pid != 0) {
        return Err(Status::invalid_argument(
            "must provide either selectors or non-zero PID, but not both",
        ));
    }
    if has_selectors {
        let mut uids = Vec::new();
        for selector in &request.selectors {
            if selector.r#type.is_empty() || selector.value.is_empty() {
                return Err(Status::invalid_argument(
                    "could not parse provided selectors",
                ));
            }
            if selector.r#type == "unix" {
                if let Some(uid) = selector
                    .value
                    .strip_prefix("uid:")
                    .and_then(|n| n.parse().ok())
                {
                    uids.push(uid);
                }
            }
        }
        // The dev agent's grants are by uid: selectors that name none
        // match no grant (as SPIRE's entries with other selectors would not).
        if uids.is_empty() {
            return Ok(None);
        }
        return Ok(Some(Subject::Uids(uids)));
    }
    Ok(effective_uid(request.pid).map(|uid| Subject::Uids(vec![uid])))
}

/// The effective uid of a process, as SPIRE's unix attestor reads it.
fn effective_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn svids_response(
    snapshot: &Snapshot,
    entitled: &[usize],
    federated: &[String],
) -> api::SubscribeToX509sviDsResponse {
    let x509_svids = entitled
        .iter()
        .filter_map(|&i| snapshot.svids.get(i))
        .map(|svid| api::X509svidWithKey {
            x509_svid: Some(X509svid {
                cert_chain: vec![svid.cert.to_vec()],
                id: Some(Spiffeid {
                    trust_domain: svid.id.trust_domain().to_string(),
                    path: svid.id.path().to_string(),
                }),
                expires_at: svid
                    .not_after
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
                hint: String::new(),
            }),
            x509_svid_key: svid.key_pkcs8.clone(),
        })
        .collect();
    let mut federates_with = federated.to_vec();
    federates_with.sort();
    api::SubscribeToX509sviDsResponse {
        x509_svids,
        federates_with,
    }
}

#[tonic::async_trait]
impl DelegatedIdentity for AdminApi {
    type SubscribeToX509SVIDsStream = Stream<api::SubscribeToX509sviDsResponse>;

    async fn subscribe_to_x509svi_ds(
        &self,
        request: Request<api::SubscribeToX509sviDsRequest>,
    ) -> Result<Response<Self::SubscribeToX509SVIDsStream>, Status> {
        self.authorize(&request)?;
        let (entitled, federated) = match subject(request.get_ref())? {
            Some(subject) => self.entitlement(&subject),
            None => (Vec::new(), Vec::new()),
        };
        let for_key = entitled.clone();
        let stream = self.workload.spawn_stream(
            move |s| {
                let generations: Vec<u64> = for_key
                    .iter()
                    .filter_map(|&i| s.generations.get(i).copied())
                    .collect();
                (generations, s.bundle_version)
            },
            move |s| svids_response(s, &entitled, &federated),
        );
        Ok(Response::new(stream))
    }

    type SubscribeToX509BundlesStream = Stream<api::SubscribeToX509BundlesResponse>;

    async fn subscribe_to_x509_bundles(
        &self,
        request: Request<api::SubscribeToX509BundlesRequest>,
    ) -> Result<Response<Self::SubscribeToX509BundlesStream>, Status> {
        self.authorize(&request)?;
        let stream = self.workload.spawn_stream(
            |s| s.bundle_version,
            |s| {
                let keys: Vec<String> = s.federated.iter().map(|(k, _)| k.clone()).collect();
                let mut ca_certificates: HashMap<String, Vec<u8>> = federated_bundles(s, &keys);
                ca_certificates.insert(s.trust_domain_id.clone(), s.bundle_der.as_ref().clone());
                api::SubscribeToX509BundlesResponse { ca_certificates }
            },
        );
        Ok(Response::new(stream))
    }

    async fn fetch_jwtsvi_ds(
        &self,
        request: Request<api::FetchJwtsviDsRequest>,
    ) -> Result<Response<api::FetchJwtsviDsResponse>, Status> {
        self.authorize(&request)?;
        Err(Status::unimplemented(JWT_UNSUPPORTED))
    }

    type SubscribeToJWTBundlesStream = Stream<api::SubscribeToJwtBundlesResponse>;

    async fn subscribe_to_jwt_bundles(
        &self,
        request: Request<api::SubscribeToJwtBundlesRequest>,
    ) -> Result<Response<Self::SubscribeToJWTBundlesStream>, Status> {
        self.authorize(&request)?;
        Err(Status::unimplemented(JWT_UNSUPPORTED))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::spire::api::types::Selector;

    fn request(pid: i32, selectors: &[(&str, &str)]) -> api::SubscribeToX509sviDsRequest {
        api::SubscribeToX509sviDsRequest {
            pid,
            selectors: selectors
                .iter()
                .map(|(t, v)| Selector {
                    r#type: t.to_string(),
                    value: v.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn a_request_names_a_pid_or_selectors_never_both_nor_neither() {
        for bad in [request(0, &[]), request(7, &[("unix", "uid:1")])] {
            let status = subject(&bad).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert_eq!(
                status.message(),
                "must provide either selectors or non-zero PID, but not both"
            );
        }
        assert_eq!(
            subject(&request(0, &[("unix", "uid:1000"), ("unix", "gid:5")])).unwrap(),
            Some(Subject::Uids(vec![1000]))
        );
        assert_eq!(subject(&request(0, &[("k8s", "ns:x")])).unwrap(), None);
        let me = std::process::id() as i32;
        let my_uid = effective_uid(me).unwrap();
        assert_eq!(
            subject(&request(me, &[])).unwrap(),
            Some(Subject::Uids(vec![my_uid]))
        );
        assert_eq!(subject(&request(i32::MAX, &[])).unwrap(), None);
    }
}
