//! The Workload API as the dev agent serves it: the gRPC service, caller
//! identification, and the Unix socket it listens on.
//!
//! Behaviour follows SPIRE's agent, since that is what clients will meet in
//! production:
//!
//! * every RPC without `workload.spiffe.io: true` metadata fails with
//!   `InvalidArgument` "security header missing from request";
//! * the caller is identified by the uid the kernel reports for the socket
//!   peer (SO_PEERCRED); a caller entitled to no identity gets
//!   `PermissionDenied` "no identity issued", on `FetchX509Bundles` too
//!   (SPIRE's default, without `allow_unauthenticated_verifiers`);
//! * streams send the current state at once and again on every change that
//!   concerns the caller; bundles are keyed by `spiffe://<td>`;
//! * a federated bundle goes only to a caller holding an ID that federates
//!   with its trust domain (SPIRE's `-federatesWith`), in both
//!   `FetchX509SVID` and `FetchX509Bundles`;
//! * JWT-SVIDs are not implemented and say so.
//!
//! Each stream is one task following the agent's `watch` channel. The task
//! ends when the client goes away (its receiver is dropped), when the agent
//! shuts down, or when the rotation task is gone, so clients that come and
//! go leave nothing behind and a slow client only ever delays itself.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::rotation::Snapshot;
use super::uds_authority::FixedAuthority;
use super::AgentError;
use crate::proto::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use crate::proto::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse, SECURITY_HEADER,
};

/// One `--id`: who may have the SVID at `svid` (index into the snapshot),
/// and the federated bundles (keys `spiffe://<td>`) that come with it.
#[derive(Debug, Clone)]
pub(crate) struct Grant {
    pub(crate) uid: Option<u32>,
    pub(crate) svid: usize,
    pub(crate) federated: Vec<String>,
}

/// The gRPC service. Cheap to clone: everything is shared.
#[derive(Clone)]
pub(crate) struct WorkloadApi {
    pub(crate) state: watch::Receiver<Arc<Snapshot>>,
    pub(crate) grants: Arc<[Grant]>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) streams: TaskTracker,
    pub(crate) open_streams: Arc<AtomicUsize>,
}

pub(crate) type Stream<T> = ReceiverStream<Result<T, Status>>;

/// Counts a live stream task for as long as it exists.
struct OpenStream(Arc<AtomicUsize>);

impl OpenStream {
    fn new(counter: Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    // SPIRE wants exactly one value, and it must be "true".
    let mut values = request.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(value), None) if value.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

pub(crate) fn caller_uid<T>(request: &Request<T>) -> Option<u32> {
    request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .map(|cred| cred.uid())
}

impl WorkloadApi {
    /// The SVID indexes `uid` may have, in command-line order, each once.
    pub(crate) fn entitled(&self, uid: Option<u32>) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for grant in self.grants.iter() {
            let allowed = grant.uid.is_none() || grant.uid == uid;
            if allowed && !out.contains(&grant.svid) {
                out.push(grant.svid);
            }
        }
        out
    }

    /// The federated bundle keys `uid` may have: those its IDs federate
    /// with, each once.
    pub(crate) fn federated_for(&self, uid: Option<u32>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for grant in self.grants.iter() {
            if grant.uid.is_none() || grant.uid == uid {
                for key in &grant.federated {
                    if !out.contains(key) {
                        out.push(key.clone());
                    }
                }
            }
        }
        out
    }

    /// The caller's SVID indexes and federated bundle keys, or
    /// PermissionDenied for a caller with no identity.
    fn entitled_or_denied<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(Vec<usize>, Vec<String>), Status> {
        let uid = caller_uid(request);
        let entitled = self.entitled(uid);
        if entitled.is_empty() {
            tracing::debug!(?uid, "refused a caller with no identity");
            return Err(Status::permission_denied("no identity issued"));
        }
        Ok((entitled, self.federated_for(uid)))
    }

    /// Spawns the task behind one stream. `key` says what the caller has
    /// seen: a message goes out only when it changes.
    pub(crate) fn spawn_stream<T, K>(
        &self,
        key: impl Fn(&Snapshot) -> K + Send + 'static,
        message: impl Fn(&Snapshot) -> T + Send + 'static,
    ) -> Stream<T>
    where
        T: Send + 'static,
        K: PartialEq + Send + 'static,
    {
        // One slot: a client that does not read holds up only itself, and
        // it gets the newest state when it reads again.
        let (tx, rx) = mpsc::channel(1);
        let mut state = self.state.clone();
        let shutdown = self.shutdown.clone();
        let open = OpenStream::new(Arc::clone(&self.open_streams));
        self.streams.spawn(async move {
            let _open = open;
            let mut sent: Option<K> = None;
            loop {
                // Cloning the Arc releases the watch's read lock at once.
                let snapshot = Arc::clone(&state.borrow_and_update());
                let current = key(&snapshot);
                if sent.as_ref() != Some(&current) {
                    tokio::select! {
                        result = tx.send(Ok(message(&snapshot))) => {
                            if result.is_err() {
                                return; // client gone
                            }
                        }
                        () = shutdown.cancelled() => break,
                    }
                    sent = Some(current);
                }
                tokio::select! {
                    changed = state.changed() => {
                        if changed.is_err() {
                            break; // rotation task gone: the agent is stopping
                        }
                    }
                    () = tx.closed() => return,
                    () = shutdown.cancelled() => break,
                }
            }
            // Say why the stream ends, if the client has room to hear it.
            let _ = tx.try_send(Err(Status::unavailable("the dev agent is shutting down")));
        });
        ReceiverStream::new(rx)
    }
}

/// The federated bundles among `keys`.
pub(crate) fn federated_bundles(
    snapshot: &Snapshot,
    keys: &[String],
) -> std::collections::HashMap<String, Vec<u8>> {
    snapshot
        .federated
        .iter()
        .filter(|(key, _)| keys.contains(key))
        .cloned()
        .collect()
}

fn x509_svid_response(
    snapshot: &Snapshot,
    entitled: &[usize],
    federated: &[String],
) -> X509svidResponse {
    let svids = entitled
        .iter()
        .filter_map(|&i| snapshot.svids.get(i))
        .map(|svid| X509svid {
            spiffe_id: svid.id.to_string(),
            x509_svid: svid.cert.to_vec(),
            x509_svid_key: svid.key_pkcs8.clone(),
            bundle: snapshot.bundle_der.as_ref().clone(),
            hint: String::new(),
        })
        .collect();
    X509svidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles: federated_bundles(snapshot, federated),
    }
}

fn x509_bundles_response(snapshot: &Snapshot, federated: &[String]) -> X509BundlesResponse {
    let mut bundles = federated_bundles(snapshot, federated);
    bundles.insert(
        snapshot.trust_domain_id.clone(),
        snapshot.bundle_der.as_ref().clone(),
    );
    X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    }
}

const JWT_UNSUPPORTED: &str = "JWT-SVIDs are not supported by the dev agent";

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented(JWT_UNSUPPORTED))
    }

    type FetchJWTBundlesStream = Stream<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented(JWT_UNSUPPORTED))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        Err(Status::unimplemented(JWT_UNSUPPORTED))
    }

    type FetchX509SVIDStream = Stream<X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        let (entitled, federated) = self.entitled_or_denied(&request)?;
        let for_key = entitled.clone();
        let stream = self.spawn_stream(
            move |s| {
                let generations: Vec<u64> = for_key
                    .iter()
                    .filter_map(|&i| s.generations.get(i).copied())
                    .collect();
                (generations, s.bundle_version)
            },
            move |s| x509_svid_response(s, &entitled, &federated),
        );
        Ok(Response::new(stream))
    }

    type FetchX509BundlesStream = Stream<X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        let (_, federated) = self.entitled_or_denied(&request)?;
        let stream = self.spawn_stream(
            |s| s.bundle_version,
            move |s| x509_bundles_response(s, &federated),
        );
        Ok(Response::new(stream))
    }
}

/// Identifies the socket file we created, so that we never remove one that
/// somebody else put at the same path later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketFile {
    dev: u64,
    ino: u64,
}

/// Binds the Unix socket: creates the parent directory if needed, removes
/// a stale socket (only a socket: any other file is an error), and opens
/// the socket to every local user like SPIRE's public socket (0777), since
/// who gets what is decided per caller uid, not by file permissions.
pub(crate) fn bind(path: &Path) -> Result<(UnixListener, SocketFile), AgentError> {
    let error = |what: &str, source: io::Error| AgentError::Socket {
        path: path.to_path_buf(),
        what: what.to_string(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| error("cannot create its directory", e))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            fs::remove_file(path).map_err(|e| error("cannot remove the stale socket", e))?;
        }
        Ok(_) => {
            return Err(error(
                "refusing to replace it",
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "a file that is not a socket is in the way",
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(error("cannot inspect it", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| error("cannot bind", e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o777))
        .map_err(|e| error("cannot make it world-accessible (0777)", e))?;
    let meta = fs::symlink_metadata(path).map_err(|e| error("cannot inspect it", e))?;
    Ok((
        listener,
        SocketFile {
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Removes the socket file if it is still the one we bound.
pub(crate) fn remove_socket(path: &Path, ours: SocketFile) {
    let still_ours = fs::symlink_metadata(path).is_ok_and(|meta| {
        meta.file_type().is_socket() && meta.dev() == ours.dev && meta.ino() == ours.ino
    });
    if still_ours {
        if let Err(e) = fs::remove_file(path) {
            tracing::warn!(socket = %path.display(), "cannot remove the socket: {e}");
        }
    }
}

/// Serves the Workload API on `listener` until `shutdown`. Connections
/// go through [`FixedAuthority`] so that gRPC C-core and Java clients,
/// which send the socket path as `:authority`, are served like grpc-go's.
pub(crate) async fn serve(
    listener: UnixListener,
    api: WorkloadApi,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let incoming = UnixListenerStream::new(listener).map(|conn| conn.map(FixedAuthority::new));
    tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(api))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

/// Serves SPIRE's Delegated Identity API on `listener` until `shutdown`.
pub(crate) async fn serve_admin(
    listener: UnixListener,
    api: super::admin_api::AdminApi,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    use crate::proto::spire::api::agent::delegatedidentity::v1::delegated_identity_server::DelegatedIdentityServer;
    let incoming = UnixListenerStream::new(listener).map(|conn| conn.map(FixedAuthority::new));
    tonic::transport::Server::builder()
        .add_service(DelegatedIdentityServer::new(api))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(grants: Vec<Grant>) -> WorkloadApi {
        let (_tx, rx) = watch::channel(Arc::new(Snapshot {
            svids: Vec::new(),
            generations: Vec::new(),
            bundle_der: Arc::new(Vec::new()),
            bundle_pem: String::new(),
            bundle_version: 0,
            trust_domain_id: "spiffe://example.org".into(),
            federated: Arc::new(Vec::new()),
        }));
        WorkloadApi {
            state: rx,
            grants: grants.into(),
            shutdown: CancellationToken::new(),
            streams: TaskTracker::new(),
            open_streams: Arc::new(AtomicUsize::new(0)),
        }
    }

    #[test]
    fn entitlement_keeps_command_line_order_and_dedupes() {
        let api = api(vec![
            grant(Some(1000), 0, &[]),
            grant(None, 1, &[]),
            grant(Some(1001), 0, &["spiffe://a.org"]),
            grant(None, 0, &[]),
            grant(Some(1000), 2, &["spiffe://b.org", "spiffe://c.org"]),
            grant(Some(1000), 3, &["spiffe://b.org"]),
        ]);
        assert_eq!(api.entitled(Some(1000)), vec![0, 1, 2, 3]);
        assert_eq!(api.entitled(Some(1001)), vec![1, 0]);
        assert_eq!(api.entitled(Some(7)), vec![1, 0]);
        assert_eq!(api.entitled(None), vec![1, 0]);
        assert_eq!(
            api.federated_for(Some(1000)),
            ["spiffe://b.org", "spiffe://c.org"]
        );
        assert_eq!(api.federated_for(Some(1001)), ["spiffe://a.org"]);
        assert!(api.federated_for(Some(7)).is_empty());
    }

    fn grant(uid: Option<u32>, svid: usize, federated: &[&str]) -> Grant {
        Grant {
            uid,
            svid,
            federated: federated.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn header_must_be_exactly_true() {
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert(SECURITY_HEADER, "true".parse().unwrap());
        assert!(check_header(&ok).is_ok());

        let missing = Request::new(());
        let status = check_header(&missing).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "security header missing from request");

        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert(SECURITY_HEADER, "yes".parse().unwrap());
        assert!(check_header(&wrong).is_err());

        let mut twice = Request::new(());
        twice
            .metadata_mut()
            .append(SECURITY_HEADER, "true".parse().unwrap());
        twice
            .metadata_mut()
            .append(SECURITY_HEADER, "true".parse().unwrap());
        assert!(check_header(&twice).is_err());
    }
}
