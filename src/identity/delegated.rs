//! SVIDs of the local processes that connect to an outbound with
//! `present = "caller"`, from SPIRE's Delegated Identity API on the agent's
//! admin socket.
//!
//! SPIRE answers this API only to an *authorized delegate*: a caller whose
//! own attested identity is listed in the agent's `authorized_delegates`.
//! Such a delegate may then subscribe to the X509-SVIDs of another process,
//! named by its pid (the agent attests it, as it would attest the process
//! itself on the Workload API) or by selectors (`unix:uid:N`, trusted as
//! given). This module owns those subscriptions:
//!
//! - one per distinct caller ([`CallerKey`]: a process, by pid and start
//!   time so that a recycled pid is another caller; or a uid when no pid is
//!   known), shared by all of that caller's connections;
//! - kept while the caller has connections, and for `caller_idle_timeout`
//!   after its last one ended, then closed;
//! - at most `max_callers` of them: a new caller past the bound is refused
//!   (never served with anyone else's SVID, nor with ours);
//! - each holding the caller's SVIDs in an [`IdentityStore`] of its own,
//!   validated against *our* trust bundles (from our own Workload API
//!   stream) before it is published, so TLS configs built on it rotate the
//!   same way ours do: new handshakes use the new SVID, live connections
//!   are untouched.
//!
//! What SPIRE answers, and how it is taken: PermissionDenied (the tunnel is
//! not an authorized delegate, or the pid attested to nothing) withdraws
//! the caller's SVIDs; an answer with no SVID (no entry matches the caller)
//! too; any other failure keeps the last SVIDs until they expire and
//! reconnects with backoff. Each change of refusal reason is logged once per
//! caller, with its pid and uid; every answer is counted in
//! `spiffe_tunnel_delegated_fetches_total{result}`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tonic::Code;
use tracing::{debug, info, warn};

pub use super::caller::{Caller, CallerKey, CallerResolver, ProcessId};
use super::workload_api::{jittered, ApiAddress, Keepalive, WITHDRAWN_MAX_BACKOFF};
use super::{BundleSet, Identity, IdentityStore, Svid};
use crate::metrics::Metrics;
use crate::proto::spire::api::agent::delegatedidentity::v1 as api;
use crate::spiffe_id;

/// The environment variable that names the admin socket when the config
/// does not (as SPIRE's own tooling names it).
pub const ADMIN_ENV: &str = "SPIRE_ADMIN_ENDPOINT_SOCKET";

const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// Why a caller gets no SVID.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DelegatedError {
    #[error("{caller}: {max} callers already hold delegated subscriptions (max_callers); new callers are refused until one has been idle for caller_idle_timeout")]
    TooManyCallers { caller: String, max: usize },
    #[error("{caller}: SPIRE gave no SVID for it: {reason}")]
    Refused { caller: String, reason: String },
    #[error("{caller}: no answer from SPIRE's admin API within {waited:?}")]
    Timeout { caller: String, waited: Duration },
    #[error("{caller}: its SVID expired and SPIRE sent no new one")]
    Expired { caller: String },
}

/// Where a subscription stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// No answer yet.
    Pending,
    /// The caller's SVIDs are in its store.
    Ready,
    /// SPIRE gives this caller nothing, for this reason.
    Refused(String),
}

/// The live subscription of one caller.
#[derive(Debug)]
pub struct Subscription {
    pub key: CallerKey,
    /// The caller's SVIDs (and our bundles at the time they came).
    pub store: Arc<IdentityStore>,
    state: watch::Sender<State>,
    /// Connections holding a [`Lease`].
    leases: AtomicUsize,
    last_release: Mutex<Instant>,
    task: Mutex<Option<AbortHandle>>,
}

impl Subscription {
    /// The caller's default SVID while it is valid.
    pub fn current(&self) -> Option<Arc<Svid>> {
        let identity = self.store.load()?;
        let svid = identity.default_svid()?;
        svid.is_valid_at(SystemTime::now())
            .then(|| Arc::clone(svid))
    }

    fn idle_for(&self, now: Instant) -> Option<Duration> {
        (self.leases.load(Ordering::Acquire) == 0).then(|| {
            now.saturating_duration_since(
                *self
                    .last_release
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            )
        })
    }

    fn stop(&self) {
        if let Some(task) = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

/// A connection's hold on its caller's subscription: while any lease is
/// alive the subscription stays.
#[derive(Debug)]
pub struct Lease {
    pub subscription: Arc<Subscription>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        *self
            .subscription
            .last_release
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.subscription.leases.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One subscription as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionStatus {
    pub caller: String,
    pub uid: u32,
    pub pid: Option<i32>,
    /// `pending`, `ready` or `refused`.
    pub state: &'static str,
    pub reason: Option<String>,
    pub spiffe_id: Option<String>,
    pub serial: Option<String>,
    pub not_after: Option<String>,
    pub connections: usize,
}

/// Every caller's subscription, for the outbounds of one process.
#[derive(Debug)]
pub struct DelegatedIdentities {
    address: ApiAddress,
    /// Our own identity: its bundles validate the callers' SVIDs.
    own: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    provider: Arc<CryptoProvider>,
    max_callers: usize,
    idle_timeout: Duration,
    callers: Mutex<HashMap<CallerKey, Arc<Subscription>>>,
}

impl DelegatedIdentities {
    pub fn new(
        admin_socket: PathBuf,
        own: Arc<IdentityStore>,
        metrics: Arc<Metrics>,
        max_callers: usize,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            address: ApiAddress::Unix(admin_socket),
            own,
            metrics,
            provider: crate::tls::config::provider(),
            max_callers,
            idle_timeout,
            callers: Mutex::new(HashMap::new()),
        })
    }

    /// The admin socket: the config's, else `SPIRE_ADMIN_ENDPOINT_SOCKET`.
    pub fn choose_address(config: Option<&str>) -> Option<Result<PathBuf, String>> {
        let env = std::env::var(ADMIN_ENV).ok().filter(|v| !v.is_empty());
        let chosen = config.map(str::to_string).or(env)?;
        Some(match ApiAddress::parse(&chosen) {
            Ok(ApiAddress::Unix(path)) => Ok(path),
            _ => Err(format!(
                "{chosen:?} is not a SPIRE agent admin socket; use unix:///path/to/admin.sock"
            )),
        })
    }

    /// The caller's SVIDs, once SPIRE has answered (waiting up to `wait`
    /// for a new caller's first answer).
    pub async fn acquire(
        self: &Arc<Self>,
        caller: Caller,
        wait: Duration,
    ) -> Result<Lease, DelegatedError> {
        let key = caller.key();
        let lease = self.lease(key)?;
        let subscription = &lease.subscription;
        let mut state = subscription.state.subscribe();
        let answered = tokio::time::timeout(wait, state.wait_for(|s| *s != State::Pending)).await;
        let state = match answered {
            Ok(Ok(state)) => state.clone(),
            Ok(Err(_)) | Err(_) => {
                return Err(DelegatedError::Timeout {
                    caller: key.to_string(),
                    waited: wait,
                })
            }
        };
        match state {
            State::Refused(reason) => Err(DelegatedError::Refused {
                caller: key.to_string(),
                reason,
            }),
            State::Ready | State::Pending => match subscription.current() {
                Some(_) => Ok(lease),
                None => Err(DelegatedError::Expired {
                    caller: key.to_string(),
                }),
            },
        }
    }

    /// The caller's subscription, made if new and there is room.
    fn lease(self: &Arc<Self>, key: CallerKey) -> Result<Lease, DelegatedError> {
        let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = callers.get(&key) {
            existing.leases.fetch_add(1, Ordering::AcqRel);
            return Ok(Lease {
                subscription: Arc::clone(existing),
            });
        }
        if callers.len() >= self.max_callers {
            self.sweep(&mut callers);
        }
        if callers.len() >= self.max_callers {
            self.metrics.delegated_fetch("over_limit");
            return Err(DelegatedError::TooManyCallers {
                caller: key.to_string(),
                max: self.max_callers,
            });
        }
        let subscription = Arc::new(Subscription {
            key,
            store: IdentityStore::new(),
            state: watch::Sender::new(State::Pending),
            leases: AtomicUsize::new(1),
            last_release: Mutex::new(Instant::now()),
            task: Mutex::new(None),
        });
        let task = tokio::spawn(Arc::clone(self).subscribe(Arc::clone(&subscription)));
        *subscription
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(task.abort_handle());
        callers.insert(key, Arc::clone(&subscription));
        self.metrics
            .delegated_subscriptions
            .set(callers.len() as i64);
        debug!(caller = %key, "delegated subscription opened");
        Ok(Lease { subscription })
    }

    /// Closes the subscriptions idle for longer than `caller_idle_timeout`.
    fn sweep(&self, callers: &mut HashMap<CallerKey, Arc<Subscription>>) {
        let now = Instant::now();
        callers.retain(|key, subscription| {
            let idle = subscription
                .idle_for(now)
                .is_some_and(|idle| idle >= self.idle_timeout);
            if idle {
                subscription.stop();
                debug!(caller = %key, "delegated subscription closed after caller_idle_timeout");
            }
            !idle
        });
        self.metrics
            .delegated_subscriptions
            .set(callers.len() as i64);
    }

    /// Closes idle subscriptions every so often, until the process ends.
    pub async fn run_sweeper(self: Arc<Self>) {
        let every = (self.idle_timeout / 2).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            let mut callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
            self.sweep(&mut callers);
        }
    }

    /// The live subscriptions, for `/status`.
    pub fn status(&self) -> Vec<SubscriptionStatus> {
        let callers = self.callers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<_> = callers
            .values()
            .map(|s| {
                let (uid, pid) = match s.key {
                    CallerKey::Process { process, uid } => (uid, Some(process.pid)),
                    CallerKey::Uid(uid) => (uid, None),
                };
                let (state, reason) = match &*s.state.borrow() {
                    State::Pending => ("pending", None),
                    State::Ready => ("ready", None),
                    State::Refused(reason) => ("refused", Some(reason.clone())),
                };
                let svid = s.current();
                SubscriptionStatus {
                    caller: s.key.to_string(),
                    uid,
                    pid,
                    state,
                    reason,
                    spiffe_id: svid.as_ref().map(|v| v.id.to_string()),
                    serial: svid.as_ref().map(|v| v.serial.clone()),
                    not_after: svid.as_ref().map(|v| crate::timefmt::rfc3339(v.not_after)),
                    connections: s.leases.load(Ordering::Acquire),
                }
            })
            .collect();
        out.sort_by(|a, b| a.caller.cmp(&b.caller));
        out
    }

    /// The stream of one caller's SVIDs, reconnected with backoff until
    /// the subscription is closed (the task is aborted).
    async fn subscribe(self: Arc<Self>, subscription: Arc<Subscription>) {
        let key = subscription.key;
        let mut backoff = FIRST_BACKOFF;
        loop {
            if let CallerKey::Process { process, .. } = key {
                // SPIRE attests the pid once, when the stream starts; the
                // delegate must not ask again for a pid that now belongs to
                // another process.
                if !process.still_running() {
                    self.set_state(
                        &subscription,
                        State::Refused("the process has exited".into()),
                    );
                    subscription.store.withdraw();
                    return;
                }
            }
            let ended = self.stream_once(&subscription).await;
            let (result, refusal, retry_max) = match &ended {
                StreamEnd::Status(status) if status.code() == Code::PermissionDenied => (
                    "denied",
                    Some(format!(
                        "the admin API answered PermissionDenied: {}",
                        status.message()
                    )),
                    WITHDRAWN_MAX_BACKOFF,
                ),
                StreamEnd::Status(status) => (
                    "error",
                    caller_fault(status).then(|| {
                        format!(
                            "the admin API answered {:?}: {}",
                            status.code(),
                            status.message()
                        )
                    }),
                    WITHDRAWN_MAX_BACKOFF,
                ),
                StreamEnd::Failed(_) | StreamEnd::Ended => {
                    ("error", None, super::workload_api::MAX_BACKOFF)
                }
                StreamEnd::Healthy => {
                    backoff = FIRST_BACKOFF;
                    ("", None, super::workload_api::MAX_BACKOFF)
                }
            };
            if !result.is_empty() {
                self.metrics.delegated_fetch(result);
            }
            match refusal {
                Some(reason) => {
                    subscription.store.withdraw();
                    self.set_state(&subscription, State::Refused(reason));
                }
                None => {
                    let reason = match &ended {
                        StreamEnd::Status(s) => format!("{:?}: {}", s.code(), s.message()),
                        StreamEnd::Failed(e) => e.clone(),
                        _ => "the stream ended".into(),
                    };
                    // An outage keeps the SVIDs we have until they expire;
                    // a caller that has none yet is told why.
                    if subscription.current().is_none() {
                        self.set_state(
                            &subscription,
                            State::Refused(format!("the admin API cannot be used: {reason}")),
                        );
                    } else {
                        debug!(caller = %key, reason, "delegated stream interrupted; keeping the caller's SVID");
                    }
                }
            }
            tokio::time::sleep(jittered(backoff)).await;
            backoff = (backoff * 2).min(retry_max);
        }
    }

    /// One subscription stream, until it fails or ends.
    async fn stream_once(&self, subscription: &Subscription) -> StreamEnd {
        let channel = match self.address.channel(Keepalive::default()).await {
            Ok(channel) => channel,
            Err(super::workload_api::WorkloadApiError::Connect { address, reason }) => {
                return StreamEnd::Failed(format!(
                    "cannot connect to SPIRE's admin API at {address}: {reason}"
                ))
            }
            Err(e) => return StreamEnd::Failed(e.to_string()),
        };
        let mut client = api::delegated_identity_client::DelegatedIdentityClient::new(channel);
        let mut stream = match client
            .subscribe_to_x509svi_ds(subscription.key.request())
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => return StreamEnd::Status(status),
        };
        let mut answered = false;
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    answered = true;
                    self.accept(subscription, response);
                }
                Ok(None) if answered => return StreamEnd::Healthy,
                Ok(None) => return StreamEnd::Ended,
                Err(status) => return StreamEnd::Status(status),
            }
        }
    }

    /// Publishes one answer for the caller, or says why not.
    fn accept(&self, subscription: &Subscription, response: api::SubscribeToX509sviDsResponse) {
        let key = subscription.key;
        if response.x509_svids.is_empty() {
            self.metrics.delegated_fetch("no_entry");
            subscription.store.withdraw();
            self.set_state(
                subscription,
                State::Refused("no registration entry matches it".into()),
            );
            return;
        }
        let bundles = self
            .own
            .load()
            .map(|own| own.bundles.clone())
            .unwrap_or_default();
        match identity_from_delegated(response, bundles, &self.provider, SystemTime::now()) {
            Ok(identity) => {
                self.metrics.delegated_fetch("ok");
                let same = subscription
                    .store
                    .load()
                    .is_some_and(|current| current.same_as(&identity));
                if !same {
                    if let Some(svid) = identity.default_svid() {
                        debug!(caller = %key, spiffe_id = %svid.id, serial = %svid.serial, "caller SVID received");
                    }
                    subscription.store.publish(identity);
                }
                self.set_state(subscription, State::Ready);
            }
            Err(reason) => {
                // Like a bad answer on our own stream: the last good SVIDs stay.
                self.metrics.delegated_fetch("error");
                warn!(caller = %key, reason, "refused an SVID of the Delegated Identity API");
                if subscription.current().is_none() {
                    self.set_state(
                        subscription,
                        State::Refused(format!("its SVID is unusable: {reason}")),
                    );
                }
            }
        }
    }

    /// Moves a subscription to `state`, logging a refusal once per reason.
    fn set_state(&self, subscription: &Subscription, state: State) {
        let key = subscription.key;
        let (uid, pid) = match key {
            CallerKey::Process { process, uid } => (uid, Some(process.pid)),
            CallerKey::Uid(uid) => (uid, None),
        };
        subscription.state.send_if_modified(|current| {
            if *current == state {
                return false;
            }
            match &state {
                State::Refused(reason) => {
                    warn!(caller = %key, uid, pid, reason = %reason, "caller refused: SPIRE gives it no SVID (present = \"caller\")");
                }
                State::Ready if matches!(current, State::Refused(_)) => {
                    info!(caller = %key, uid, pid, "caller has an SVID again");
                }
                _ => {}
            }
            *current = state.clone();
            true
        });
    }
}

/// How one stream ended.
enum StreamEnd {
    /// It ended after at least one answer: reconnect at once.
    Healthy,
    Ended,
    Status(tonic::Status),
    Failed(String),
}

/// A status that is about the caller, not an outage: the agent could not
/// attest it or was asked something it cannot answer.
fn caller_fault(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument | Code::NotFound | Code::Unauthenticated
    ) || (status.code() == Code::Internal && status.message().contains("attest"))
}

/// Turns one answer into an identity: the caller's SVIDs (the first is the
/// default) with our bundles, each SVID checked as our own are.
pub fn identity_from_delegated(
    response: api::SubscribeToX509sviDsResponse,
    bundles: BundleSet,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<Identity, String> {
    let mut svids = Vec::with_capacity(response.x509_svids.len());
    for (index, entry) in response.x509_svids.into_iter().enumerate() {
        let svid = entry
            .x509_svid
            .ok_or_else(|| format!("SVID {index}: no x509_svid"))?;
        if svid.cert_chain.is_empty() || entry.x509_svid_key.is_empty() {
            return Err(format!("SVID {index}: empty certificate chain or key"));
        }
        let chain: Vec<CertificateDer<'static>> = svid
            .cert_chain
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(entry.x509_svid_key));
        let parsed = Svid::from_der(chain, key, provider)
            .map_err(|e| format!("SVID {index}: {e}"))?
            .with_hint(svid.hint);
        if let Some(id) = svid.id {
            let claimed = format!("spiffe://{}{}", id.trust_domain, id.path);
            match spiffe_id::parse_workload_id(&claimed) {
                Ok(claimed) if claimed == parsed.id => {}
                _ => {
                    return Err(format!(
                        "SVID {index}: id {claimed:?} does not match the certificate's {}",
                        parsed.id
                    ))
                }
            }
        }
        svids.push(parsed);
    }
    Identity::new(svids, bundles, now).map_err(|e| e.to_string())
}
