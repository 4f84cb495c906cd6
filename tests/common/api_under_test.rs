#![allow(dead_code)]
//! A Workload API server under test, behind one interface, for the
//! conformance suite (`tests/conformance.rs`): the dev agent
//! (`spiffe-tunnel dev-agent`, in process) or a real SPIRE server and agent
//! (`common/spire.rs`). A test body describes what it needs ([`Setup`]:
//! which caller gets which ID, federation, short lifetimes) and triggers
//! what only one of them must be told to do (a CA rotation); it then sees
//! both servers through the same raw Workload API clients:
//!
//! * [`WorkloadClient`]: tonic in this process, so as uid 0 (tests run as
//!   root);
//! * [`fetch_as`]: `gospiffe-peer fetch`, one raw gRPC call as another uid.
//!
//! Where the two servers follow different documented rules (when an SVID is
//! renewed), [`ApiUnderTest::renewal_due`] holds each rule, so the body stays
//! the same and the difference is written down once.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rustls_pki_types::CertificateDer;
use serde_json::Value;
use spiffe_tunnel::agent::{DevAgent, DevAgentConfig, IdGrant};
use spiffe_tunnel::identity::{BundleSet, TrustBundle};
use spiffe_tunnel::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use spiffe_tunnel::proto::{
    X509BundlesRequest, X509BundlesResponse, X509svidRequest, X509svidResponse, SECURITY_HEADER,
};
use spiffe_tunnel::spiffe_id::parse_trust_domain;
use spiffe_tunnel::tls::verify::{to_unix_time, verify_svid_chain, PeerRole};
use tonic::transport::Channel;
use tonic::Streaming;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::peers::gospiffe_peer;
use super::spire::{tokio_command_as, AgentConfig, ServerConfig, Spire};

pub const TD: &str = "example.org";

/// Instantiates each `async fn NAME(kind: Kind)` body once per server, as
/// `dev_agent::NAME` and `spire::NAME`.
#[macro_export]
macro_rules! against_both_servers {
    ($($body:ident),* $(,)?) => {
        mod dev_agent {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $body() {
                    super::$body($crate::common::api_under_test::Kind::DevAgent).await;
                }
            )*
        }
        mod spire {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $body() {
                    super::$body($crate::common::api_under_test::Kind::Spire).await;
                }
            )*
        }
    };
}

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    DevAgent,
    Spire,
}

/// How a registration picks its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Processes of this uid (SPIRE `unix:uid:N`, dev agent `uid:N=`).
    Uid(u32),
    /// uid 0 matched another way: SPIRE `unix:user:root`; the dev agent's
    /// unprefixed `--id` (every caller, uid 0 among them).
    RootByName,
}

/// One registration: SPIRE's entry, the dev agent's `--id`.
#[derive(Debug, Clone)]
pub struct Registration {
    pub id: String,
    pub caller: Caller,
    /// A trust domain name whose federated bundle this registration brings
    /// (SPIRE `-federatesWith`, dev agent `--federates-with`).
    pub federates_with: Option<String>,
}

impl Registration {
    pub fn uid(id: &str, uid: u32) -> Self {
        Self {
            id: id.to_string(),
            caller: Caller::Uid(uid),
            federates_with: None,
        }
    }

    pub fn federating(mut self, trust_domain: &str) -> Self {
        self.federates_with = Some(trust_domain.to_string());
        self
    }
}

/// What a body needs from the server.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    pub registrations: Vec<Registration>,
    /// Federated trust domains the server knows, with their CA PEM.
    pub federated: Vec<(String, String)>,
    /// SVIDs that rotate within seconds ([`ApiUnderTest::short_ttl`]).
    pub short_svids: bool,
    /// A CA rotation the body will run through ([`ApiUnderTest::prepare_ca`]).
    pub ca_rotation: bool,
    /// Serve the Delegated Identity API on [`ApiUnderTest::admin_socket`]
    /// to holders of these IDs (SPIRE `authorized_delegates`, dev agent
    /// `--authorized-delegate`); empty: no admin socket.
    pub delegates: Vec<String>,
}

enum Backend {
    Dev(DevAgent),
    Spire(Box<Spire>),
}

/// A running server, torn down on drop.
pub struct ApiUnderTest {
    pub kind: Kind,
    backend: Backend,
    socket: PathBuf,
    admin_socket: PathBuf,
    prepared: Option<String>,
    // Last: the dev agent's socket and bundle files live here.
    dir: tempfile::TempDir,
}

impl ApiUnderTest {
    /// SVID lifetime for [`Setup::short_svids`]. SPIRE renews when less
    /// than half of NotBefore..NotAfter is left and backdates NotBefore by
    /// 10 s, so its lifetime must be well over 10 s; the dev agent renews at
    /// half of the life from issue and takes TTLs of a second or two.
    pub fn short_ttl(kind: Kind) -> Duration {
        match kind {
            Kind::DevAgent => Duration::from_secs(2),
            Kind::Spire => Duration::from_secs(20),
        }
    }

    /// Starts the server with `setup` and waits until every registration
    /// has reached the Workload API.
    pub async fn start(kind: Kind, setup: Setup) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("wlapi")
            .tempdir_in("/tmp")
            .expect("temporary folder");
        match kind {
            Kind::DevAgent => Self::start_dev(dir, setup).await,
            Kind::Spire => Self::start_spire(dir, setup).await,
        }
    }

    async fn start_dev(dir: tempfile::TempDir, setup: Setup) -> Self {
        let socket = dir.path().join("agent.sock");
        let grants = setup
            .registrations
            .iter()
            .map(|r| {
                let grant = match r.caller {
                    Caller::Uid(uid) => format!("uid:{uid}={}", r.id),
                    Caller::RootByName => r.id.clone(),
                };
                grant.parse::<IdGrant>().expect("a dev agent --id")
            })
            .collect();
        let mut config =
            DevAgentConfig::new(socket.clone(), parse_trust_domain(TD).unwrap(), grants);
        if setup.short_svids {
            config.ttl = Self::short_ttl(Kind::DevAgent);
        }
        if setup.ca_rotation {
            // Its CA rotates by itself: next CA at 4 s, signing at 6 s.
            config.ttl = Duration::from_secs(1);
            config.ca_ttl = Duration::from_secs(8);
        }
        for (td, pem) in &setup.federated {
            let file = dir.path().join(format!("{td}.pem"));
            std::fs::write(&file, pem).unwrap();
            config
                .federate
                .push((parse_trust_domain(td).unwrap(), file));
        }
        for r in &setup.registrations {
            if let Some(td) = &r.federates_with {
                let pair = (r.id.parse().unwrap(), parse_trust_domain(td).unwrap());
                if !config.federates_with.contains(&pair) {
                    config.federates_with.push(pair);
                }
            }
        }
        let admin_socket = dir.path().join("admin").join("admin.sock");
        if !setup.delegates.is_empty() {
            config.admin_socket = Some(admin_socket.clone());
            config.authorized_delegates =
                setup.delegates.iter().map(|d| d.parse().unwrap()).collect();
        }
        let agent = DevAgent::start(config).await.expect("start the dev agent");
        Self {
            kind: Kind::DevAgent,
            backend: Backend::Dev(agent),
            socket,
            admin_socket,
            prepared: None,
            dir,
        }
    }

    async fn start_spire(dir: tempfile::TempDir, setup: Setup) -> Self {
        // SPIRE refuses an admin socket in the Workload API socket's folder.
        let admin_socket = dir.path().join("admin.sock");
        let mut agent = AgentConfig::default();
        if !setup.delegates.is_empty() {
            let delegates: Vec<String> =
                setup.delegates.iter().map(|d| format!("\"{d}\"")).collect();
            agent.agent_hcl = format!(
                "    admin_socket_path = \"{}\"\n    authorized_delegates = [{}]\n",
                admin_socket.display(),
                delegates.join(", ")
            );
        }
        let spire = Spire::start(ServerConfig::default(), agent).await;
        for (td, pem) in &setup.federated {
            let file = dir.path().join(format!("{td}.pem"));
            std::fs::write(&file, pem).unwrap();
            let id = format!("spiffe://{td}");
            spire
                .server
                .cli(&[
                    "bundle",
                    "set",
                    "-format",
                    "pem",
                    "-id",
                    &id,
                    "-path",
                    file.to_str().unwrap(),
                ])
                .await
                .unwrap_or_else(|e| panic!("spire-server bundle set {id}: {e}"));
        }
        let ttl = setup
            .short_svids
            .then(|| Self::short_ttl(Kind::Spire).as_secs());
        for r in &setup.registrations {
            let mut entry = spire.entry(&r.id);
            entry = match r.caller {
                Caller::Uid(uid) => entry.uid(uid),
                Caller::RootByName => entry.user("root"),
            };
            if let Some(ttl) = ttl.or(setup.ca_rotation.then_some(20)) {
                entry = entry.x509_ttl(ttl);
            }
            if let Some(td) = &r.federates_with {
                entry = entry.federates_with(&format!("spiffe://{td}"));
            }
            spire.create_entry(&entry).await;
        }
        let mut by_uid: Vec<(u32, Vec<&str>)> = Vec::new();
        for r in &setup.registrations {
            let uid = match r.caller {
                Caller::Uid(uid) => uid,
                Caller::RootByName => 0,
            };
            match by_uid.iter_mut().find(|(u, _)| *u == uid) {
                Some((_, ids)) => ids.push(&r.id),
                None => by_uid.push((uid, vec![&r.id])),
            }
        }
        for (uid, ids) in by_uid {
            spire
                .agent
                .wait_for_ids(uid, &ids, Duration::from_secs(30))
                .await;
        }
        let socket = PathBuf::from(
            spire
                .agent
                .address()
                .strip_prefix("unix://")
                .expect("a unix:// address"),
        );
        Self {
            kind: Kind::Spire,
            backend: Backend::Spire(Box::new(spire)),
            socket,
            admin_socket,
            prepared: None,
            dir,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The Delegated Identity API, with [`Setup::delegates`].
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    pub fn address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// When this server renews an SVID valid from `not_before` to
    /// `not_after` (whole seconds since the epoch).
    ///
    /// * SPIRE v1.13.3 (`rotationutil.shouldRotateByHalf`): once less than
    ///   half of NotAfter - NotBefore is left, checked every sync (1 s in
    ///   the harness). NotBefore is backdated by 10 s, so an SVID of TTL T
    ///   is renewed (T - 10) / 2 after it was issued.
    /// * The dev agent: at half of the life from issue (NotBefore + 10 s)
    ///   to NotAfter, T / 2 after issue, so that a TTL of 2 s works.
    pub fn renewal_due(&self, not_before: i64, not_after: i64) -> SystemTime {
        let at = |secs: f64| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(secs);
        let (nb, na) = (not_before as f64, not_after as f64);
        match self.kind {
            Kind::Spire => at(nb + (na - nb) / 2.0),
            Kind::DevAgent => at(nb + 10.0 + (na - nb - 10.0) / 2.0),
        }
    }

    /// How late after [`renewal_due`](Self::renewal_due) a new SVID may
    /// arrive: the agent's sync interval and the signing round trip.
    pub fn renewal_slack(&self) -> Duration {
        match self.kind {
            Kind::Spire => Duration::from_millis(2500),
            Kind::DevAgent => Duration::from_millis(700),
        }
    }

    /// Starts a CA rotation: a next CA goes into the bundle, signing
    /// nothing yet. SPIRE: `localauthority x509 prepare`. The dev agent
    /// does it by itself at half its CA's life ([`Setup::ca_rotation`]).
    pub async fn prepare_ca(&mut self) {
        if let Backend::Spire(spire) = &self.backend {
            self.prepared = Some(spire.server.prepare_x509_authority().await);
        }
    }

    /// Lets the next CA sign. SPIRE: `localauthority x509 activate`; the
    /// dev agent does it by itself at three quarters of its CA's life.
    pub async fn activate_ca(&mut self) {
        if let (Backend::Spire(spire), Some(id)) = (&self.backend, self.prepared.take()) {
            spire.server.activate_x509_authority(&id).await;
        }
    }

    /// The SPIRE processes, for tests that need more than this interface.
    pub fn spire(&self) -> Option<&Spire> {
        match &self.backend {
            Backend::Spire(spire) => Some(spire),
            Backend::Dev(_) => None,
        }
    }
}

/// A raw Workload API client in this process (uid 0).
pub struct WorkloadClient(pub SpiffeWorkloadApiClient<Channel>);

impl WorkloadClient {
    pub async fn connect(socket: &Path) -> Self {
        let path = socket.to_path_buf();
        let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .expect("connect to the Workload API");
        Self(SpiffeWorkloadApiClient::new(channel))
    }

    pub async fn x509_svids(&mut self) -> Result<Streaming<X509svidResponse>, tonic::Status> {
        self.0
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn x509_bundles(&mut self) -> Result<Streaming<X509BundlesResponse>, tonic::Status> {
        self.0
            .fetch_x509_bundles(with_header(X509BundlesRequest {}))
            .await
            .map(tonic::Response::into_inner)
    }
}

/// A request with `workload.spiffe.io: true`.
pub fn with_header<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(SECURITY_HEADER, "true".parse().unwrap());
    request
}

/// The next message of a stream, failing the test at `within`.
pub async fn next<T>(stream: &mut Streaming<T>, within: Duration) -> T {
    tokio::time::timeout(within, stream.message())
        .await
        .expect("no message before the deadline")
        .expect("stream error")
        .expect("stream ended")
}

/// Splits concatenated DER certificates (the Workload API's encoding of
/// chains and bundles); panics on anything else.
pub fn split_der(mut bytes: &[u8]) -> Vec<CertificateDer<'static>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, _) = X509Certificate::from_der(bytes).expect("concatenated DER certificates");
        out.push(CertificateDer::from(
            bytes[..bytes.len() - rest.len()].to_vec(),
        ));
        bytes = rest;
    }
    out
}

/// A bundle set of `certs` for example.org.
pub fn bundle_set(certs: Vec<CertificateDer<'static>>) -> BundleSet {
    let mut set = BundleSet::new();
    set.insert(TrustBundle::new(parse_trust_domain(TD).unwrap(), certs).unwrap());
    set
}

/// Whether `leaf` (of example.org) chains to exactly this CA certificate.
pub fn signed_by(leaf: &CertificateDer<'static>, ca: &CertificateDer<'static>) -> bool {
    verify_svid_chain(
        std::slice::from_ref(leaf),
        &bundle_set(vec![ca.clone()]),
        to_unix_time(SystemTime::now()),
        PeerRole::Any,
    )
    .is_ok()
}

/// One raw call (`gospiffe-peer fetch`, `rpc` = x509svid or x509bundles)
/// as `uid`: its JSON answer, a status (`code`, `message`) or the shape of
/// the first message (`svids`, `bundles`, `federated_bundles`).
pub async fn fetch_as(api: &ApiUnderTest, uid: u32, rpc: &str) -> Value {
    let out = tokio_command_as(gospiffe_peer(), uid)
        .args(["fetch", "--socket", &api.address(), "--rpc", rpc])
        .kill_on_drop(true)
        .output()
        .await
        .expect("run gospiffe-peer fetch");
    assert!(
        out.status.success(),
        "gospiffe-peer fetch as uid {uid}: {out:?}"
    );
    serde_json::from_slice(&out.stdout).expect("fetch prints JSON")
}
