//! Upstream selection for an outbound tunnel: which address to dial next.
//!
//! An outbound may list several upstreams, each an IP literal or a host
//! name. This module owns everything between that list and a connected TCP
//! stream: resolving names (and re-resolving them, since the addresses
//! behind a name move), tracking the health of every resolved endpoint,
//! picking one per connection (power of two choices or round robin), and
//! retrying once elsewhere when the pick does not answer, so one dead node
//! costs a client nothing. It lives apart from `outbound.rs` because none
//! of it has to do with TLS or policy, and because its timing rules
//! (backoff, fallback, re-resolution) are easier to test on their own over
//! plain sockets.
//!
//! The per-connection path takes no lock: the endpoint list is an
//! [`ArcSwap`] snapshot and each endpoint's load and health are atomics.
//! The only locks are short ones on state changes (an ejection, a recovery,
//! a finished DNS lookup), and none is held across an `.await`.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Balance, BalanceSettings};

/// Ejection after the first failure; doubles with each further one.
const BASE_BACKOFF: Duration = Duration::from_secs(1);
/// A dead endpoint is still retried this often, so a recovery is noticed
/// without active health checks.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// getaddrinfo has its own timeouts, but they can add up to far longer than
/// anyone should wait for one round of re-resolution.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);
/// `tokio::time::interval` refuses a zero period, and a near-zero one would
/// spin; configuration validates intervals, this keeps a bad one harmless.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Why [`Balancer::connect`] could not produce a connection.
#[derive(Debug, thiserror::Error)]
pub enum BalanceError {
    /// No upstream has an address yet (every name failed to resolve).
    #[error("no upstream address known: {0}")]
    NoEndpoints(String),
    /// Every endpoint tried refused, was unreachable, or timed out.
    #[error("every upstream tried failed: {0}")]
    AllFailed(String),
}

/// One endpoint as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    /// The configured `host:port` this address came from.
    pub upstream: String,
    pub addr: SocketAddr,
    /// Not currently ejected (it may still be on probation after failures).
    pub healthy: bool,
    /// Connections to it right now, including connects in progress.
    pub active: usize,
    /// How much longer it stays ejected.
    pub ejected_for: Option<Duration>,
    pub consecutive_failures: u32,
}

/// Picks and dials upstream endpoints for one outbound tunnel.
pub struct Balancer {
    tunnel: Arc<str>,
    balance: Balance,
    resolve_interval: Duration,
    health_check_interval: Option<Duration>,
    connect_timeout: Duration,
    targets: Vec<Target>,
    /// Last known addresses per target, indexed like `targets`. The lock
    /// also serialises rebuilding `endpoints`, so two merges cannot lose
    /// each other's endpoints.
    resolved: Mutex<Vec<TargetState>>,
    /// What connections pick from; replaced whole on every re-resolution.
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// Round-robin position; wrapping is harmless.
    next: AtomicUsize,
    /// Single flight for resolution: a burst of connections arriving before
    /// the first lookup finished must not each start their own.
    resolving: AtomicBool,
    /// Counts finished resolution rounds, to wake those waiting on one.
    resolutions: watch::Sender<u64>,
    started: AtomicBool,
}

/// One configured upstream entry.
struct Target {
    /// As configured: `host:port`, or `[v6]:port`.
    name: Arc<str>,
    /// Set for IP literals, which never need a lookup.
    literal: Option<SocketAddr>,
}

#[derive(Default)]
struct TargetState {
    addrs: Vec<SocketAddr>,
    /// Why lookups of this name fail, while they do. Being set is what
    /// limits the warning to once per failure streak.
    error: Option<String>,
}

/// One resolved address and its live state. Connections hold it through
/// [`Upstream`], so it outlives its removal from the list by re-resolution
/// and their counts still land somewhere harmless.
struct Endpoint {
    tunnel: Arc<str>,
    upstream: Arc<str>,
    addr: SocketAddr,
    /// `upstream`, plus the address when the name alone does not say it.
    label: String,
    active: AtomicUsize,
    failures: AtomicU32,
    /// When the ejection ends, in nanoseconds since [`epoch`]; 0 when the
    /// endpoint was never ejected or has recovered.
    ejected_until: AtomicU64,
    /// Set when the last failure was a TLS handshake cut off by the
    /// endpoint (it accepts TCP but does not serve, e.g. its SVID expired):
    /// then a TCP health check proves nothing, and only a completed
    /// handshake ends the ejection.
    handshake_failed: AtomicBool,
    /// Taken only to change health, so each transition is decided, and
    /// logged, exactly once even when failures race.
    transition: Mutex<()>,
}

/// A connection's claim on an endpoint: counts as active until dropped.
pub struct Upstream {
    endpoint: Arc<Endpoint>,
    reported: AtomicBool,
}

impl Balancer {
    /// A balancer over `upstreams`. IP literals are usable at once; host
    /// names get addresses from the first resolution, which [`start`] runs
    /// immediately and [`connect`] awaits if it finds nothing to pick.
    ///
    /// [`start`]: Balancer::start
    /// [`connect`]: Balancer::connect
    pub fn new(
        tunnel: &str,
        upstreams: &[String],
        settings: &BalanceSettings,
        connect_timeout: Duration,
    ) -> Arc<Self> {
        let tunnel: Arc<str> = Arc::from(tunnel);
        let targets: Vec<Target> = upstreams
            .iter()
            .map(|u| Target {
                name: Arc::from(u.as_str()),
                literal: u.parse().ok(),
            })
            .collect();
        let states = targets
            .iter()
            .map(|t| TargetState {
                addrs: t.literal.into_iter().collect(),
                error: None,
            })
            .collect();
        let (resolutions, _) = watch::channel(0);
        let balancer = Self {
            tunnel,
            balance: settings.balance,
            resolve_interval: settings.resolve_interval.max(MIN_INTERVAL),
            health_check_interval: settings.health_check_interval.map(|i| i.max(MIN_INTERVAL)),
            connect_timeout,
            targets,
            resolved: Mutex::new(states),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
            resolving: AtomicBool::new(false),
            resolutions,
            started: AtomicBool::new(false),
        };
        balancer.apply_resolution(Vec::new());
        Arc::new(balancer)
    }

    /// Spawns the re-resolution task and (if configured) the active
    /// health-check task; both end when `stop` is cancelled, or when the
    /// balancer itself is dropped. Calling it again does nothing.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!(tunnel = %self.tunnel, "balancer started outside a tokio runtime; no re-resolution or health checks");
            return;
        };
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        // With only IP literals there is nothing to re-resolve.
        if self.targets.iter().any(|t| t.literal.is_none()) {
            runtime.spawn(resolve_loop(
                Arc::downgrade(self),
                self.resolve_interval,
                stop.clone(),
            ));
        }
        if let Some(every) = self.health_check_interval {
            let probe_timeout = self.connect_timeout.min(every);
            runtime.spawn(health_loop(
                Arc::downgrade(self),
                every,
                probe_timeout,
                stop,
            ));
        }
    }

    /// Picks an endpoint and connects; if that connect fails (refused,
    /// unreachable, or `connect_timeout`), the endpoint is ejected and ONE
    /// retry goes to a different endpoint (if any) before the error is
    /// returned. The returned guard counts the connection as active on that
    /// endpoint until dropped.
    ///
    /// When every endpoint is ejected, the one whose ejection ends soonest
    /// is tried anyway: it may have recovered, and a try costs one connect
    /// timeout at worst, while refusing outright is a certain failure.
    pub async fn connect(&self) -> Result<(TcpStream, Upstream), BalanceError> {
        let mut list = self.endpoints.load_full();
        if list.is_empty() && self.targets.iter().any(|t| t.literal.is_none()) {
            // A client should not wait on DNS longer than on a connect.
            let _ = tokio::time::timeout(self.connect_timeout, self.refresh()).await;
            list = self.endpoints.load_full();
        }
        if list.is_empty() {
            return Err(BalanceError::NoEndpoints(self.unresolved_reason()));
        }
        let mut failures = Vec::with_capacity(2);
        let mut failed: Option<Arc<Endpoint>> = None;
        for _attempt in 0..2 {
            let Some((endpoint, was_ejected)) = self.pick(&list, failed.as_ref()) else {
                break;
            };
            // Counted from the pick on, so concurrent picks see the load
            // of connects still in progress.
            let guard = Upstream::new(endpoint);
            match dial(guard.endpoint.addr, self.connect_timeout).await {
                Ok(stream) => {
                    // Handshakes and small requests must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    // Healthy again only once the caller's TLS handshake
                    // completes (`Upstream::report_success`): an endpoint
                    // that accepts TCP and then drops every handshake must
                    // stay ejected.
                    if !guard.endpoint.handshake_failed.load(Ordering::Relaxed) {
                        guard.endpoint.mark_success();
                    }
                    return Ok((stream, guard));
                }
                Err(e) => {
                    if e.is_upstreams_fault() {
                        // A pick made knowingly while ejected (the fallback)
                        // extends the ejection; any other failure landing
                        // while ejected was in flight when the first one
                        // ejected it, and must not inflate the backoff.
                        guard.endpoint.mark_failure(&e.to_string(), was_ejected);
                    }
                    failures.push(format!("{}: {e}", guard.endpoint.label));
                    failed = Some(Arc::clone(&guard.endpoint));
                }
            }
        }
        if failures.is_empty() {
            failures.push("no endpoint could be picked".to_string());
        }
        Err(BalanceError::AllFailed(failures.join("; ")))
    }

    /// The address [`connect`] would most likely dial now (the same
    /// pick, without dialling), for a pool that reuses connections to it.
    ///
    /// [`connect`]: Balancer::connect
    pub fn peek(&self) -> Option<SocketAddr> {
        let list = self.endpoints.load();
        self.pick(&list, None).map(|(endpoint, _)| endpoint.addr)
    }

    /// For /status: every endpoint with its state.
    pub fn snapshot(&self) -> Vec<EndpointStatus> {
        let now = now_nanos();
        self.endpoints
            .load()
            .iter()
            .map(|e| {
                let ejected_for = e.ejected_for(now);
                EndpointStatus {
                    upstream: e.upstream.to_string(),
                    addr: e.addr,
                    healthy: ejected_for.is_none(),
                    active: e.active.load(Ordering::Relaxed),
                    ejected_for,
                    consecutive_failures: e.failures.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Chooses among the endpoints not ejected and not `exclude`; the bool
    /// says the choice was the all-ejected fallback.
    fn pick(
        &self,
        list: &[Arc<Endpoint>],
        exclude: Option<&Arc<Endpoint>>,
    ) -> Option<(Arc<Endpoint>, bool)> {
        let now = now_nanos();
        let eligible = |e: &&Arc<Endpoint>| exclude.is_none_or(|x| !Arc::ptr_eq(x, e));
        let healthy: Vec<&Arc<Endpoint>> = list
            .iter()
            .filter(eligible)
            .filter(|e| e.ejected_for(now).is_none())
            .collect();
        let chosen = match healthy.len() {
            0 => {
                let soonest = list
                    .iter()
                    .filter(eligible)
                    .min_by_key(|e| e.ejected_until.load(Ordering::Relaxed))?;
                debug!(tunnel = %self.tunnel, upstream = %soonest.label, "every upstream is ejected; trying the one whose ejection ends soonest");
                return Some((Arc::clone(soonest), true));
            }
            1 => healthy[0],
            n => match self.balance {
                Balance::P2c => {
                    let i = fastrand::usize(..n);
                    let mut j = fastrand::usize(..n - 1);
                    if j >= i {
                        j += 1;
                    }
                    let (a, b) = (healthy[i], healthy[j]);
                    if b.active.load(Ordering::Relaxed) < a.active.load(Ordering::Relaxed) {
                        b
                    } else {
                        a
                    }
                }
                Balance::RoundRobin => healthy[self.next.fetch_add(1, Ordering::Relaxed) % n],
            },
        };
        Some((Arc::clone(chosen), false))
    }

    /// Resolves every host name once, or waits for the round already
    /// running, then merges the result into the endpoint list.
    async fn refresh(&self) {
        // Subscribe before checking the flag: a round finishing in between
        // then still wakes us.
        let mut finished = self.resolutions.subscribe();
        if self.resolving.swap(true, Ordering::AcqRel) {
            let _ = finished.changed().await;
            return;
        }
        // Clears the flag and wakes waiters even if this future is dropped
        // mid-lookup (a client that went away), so nobody waits forever.
        let _flight = InFlight(self);
        let results = self.lookup_all().await;
        self.apply_resolution(results);
    }

    async fn lookup_all(&self) -> Vec<(usize, Result<Vec<SocketAddr>, String>)> {
        let mut lookups = JoinSet::new();
        for (i, target) in self.targets.iter().enumerate() {
            if target.literal.is_some() {
                continue;
            }
            let name = target.name.to_string();
            lookups.spawn(async move {
                let result =
                    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(name)).await
                    {
                        Ok(Ok(addrs)) => Ok(addrs.collect()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("lookup timed out after {LOOKUP_TIMEOUT:?}")),
                    };
                (i, result)
            });
        }
        let mut results = Vec::with_capacity(lookups.len());
        while let Some(joined) = lookups.join_next().await {
            // A lookup task that died is treated as "no news": the name
            // keeps its previous addresses until the next round.
            if let Ok(result) = joined {
                results.push(result);
            }
        }
        results
    }

    /// Records lookup results (target index, addresses or error) and
    /// rebuilds the endpoint list as the union of every target's last known
    /// addresses. Endpoints that remain keep their state; a failed lookup
    /// keeps the name's previous addresses.
    fn apply_resolution(&self, results: Vec<(usize, Result<Vec<SocketAddr>, String>)>) {
        let mut states = lock(&self.resolved);
        for (i, result) in results {
            let (Some(target), Some(state)) = (self.targets.get(i), states.get_mut(i)) else {
                continue;
            };
            let result = result.and_then(|addrs| {
                if addrs.is_empty() {
                    Err("the name has no addresses".to_string())
                } else {
                    Ok(addrs)
                }
            });
            match result {
                Ok(mut addrs) => {
                    let mut seen = HashSet::new();
                    addrs.retain(|a| seen.insert(*a));
                    if state.error.take().is_some() {
                        info!(tunnel = %self.tunnel, upstream = %target.name, addrs = ?addrs, "upstream resolves again");
                    }
                    state.addrs = addrs;
                }
                Err(e) => {
                    if state.error.is_none() {
                        warn!(tunnel = %self.tunnel, upstream = %target.name, error = %e, kept = ?state.addrs, "upstream lookup failed; keeping its previous addresses");
                    }
                    state.error = Some(e);
                }
            }
        }

        let current = self.endpoints.load();
        let mut next = Vec::new();
        let mut seen = HashSet::new();
        for (target, state) in self.targets.iter().zip(states.iter()) {
            for addr in &state.addrs {
                // The same address under two entries is one endpoint, named
                // after the first entry, so its load is counted once.
                if !seen.insert(*addr) {
                    continue;
                }
                let kept = current
                    .iter()
                    .find(|e| e.addr == *addr && e.upstream == target.name)
                    .cloned();
                next.push(
                    kept.unwrap_or_else(|| {
                        Arc::new(Endpoint::new(&self.tunnel, &target.name, *addr))
                    }),
                );
            }
        }
        let added: Vec<&str> = next
            .iter()
            .filter(|n| !current.iter().any(|c| Arc::ptr_eq(c, n)))
            .map(|e| e.label.as_str())
            .collect();
        let removed: Vec<&str> = current
            .iter()
            .filter(|c| !next.iter().any(|n| Arc::ptr_eq(c, n)))
            .map(|e| e.label.as_str())
            .collect();
        if !added.is_empty() || !removed.is_empty() {
            info!(tunnel = %self.tunnel, added = ?added, removed = ?removed, "upstream endpoints changed");
        }
        drop(current);
        self.endpoints.store(Arc::new(next));
    }

    fn unresolved_reason(&self) -> String {
        let states = lock(&self.resolved);
        if self.targets.is_empty() {
            return "no upstreams configured".to_string();
        }
        self.targets
            .iter()
            .zip(states.iter())
            .map(|(t, s)| match &s.error {
                Some(e) => format!("{}: {e}", t.name),
                None => format!("{}: not resolved yet", t.name),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("tunnel", &self.tunnel)
            .field("balance", &self.balance)
            .field(
                "upstreams",
                &self.targets.iter().map(|t| &*t.name).collect::<Vec<_>>(),
            )
            .field("endpoints", &self.endpoints.load().len())
            .finish_non_exhaustive()
    }
}

/// Marks a resolution round finished when dropped.
struct InFlight<'a>(&'a Balancer);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // Clear before notifying: a waiter woken by the notification that
        // finds the list still empty must be able to start its own round.
        self.0.resolving.store(false, Ordering::Release);
        self.0.resolutions.send_modify(|n| *n = n.wrapping_add(1));
    }
}

async fn resolve_loop(balancer: Weak<Balancer>, every: Duration, stop: CancellationToken) {
    loop {
        // Holding only a weak reference between rounds lets a tunnel that
        // was removed without cancelling `stop` still free its balancer.
        let Some(b) = balancer.upgrade() else { return };
        tokio::select! {
            () = stop.cancelled() => return,
            () = b.refresh() => {}
        }
        drop(b);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

async fn health_loop(
    balancer: Weak<Balancer>,
    every: Duration,
    probe_timeout: Duration,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(list) = balancer.upgrade().map(|b| b.endpoints.load_full()) else {
            return;
        };
        let mut probes = JoinSet::new();
        for endpoint in list.iter() {
            let endpoint = Arc::clone(endpoint);
            probes.spawn(async move {
                match dial(endpoint.addr, probe_timeout).await {
                    // A TCP connect cannot vouch for an endpoint that
                    // failed TLS handshakes; only a real handshake can.
                    Ok(_) if endpoint.handshake_failed.load(Ordering::Relaxed) => {}
                    Ok(_) => endpoint.mark_success(),
                    Err(e) if e.is_upstreams_fault() => {
                        // A check is a deliberate attempt, so it extends an
                        // ejection; a later successful check ends it at once.
                        endpoint.mark_failure(&format!("health check: {e}"), true);
                    }
                    Err(e) => {
                        debug!(upstream = %endpoint.label, error = %e, "health check could not run")
                    }
                }
            });
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = async { while probes.join_next().await.is_some() {} } => {}
        }
    }
}

impl Endpoint {
    fn new(tunnel: &Arc<str>, upstream: &Arc<str>, addr: SocketAddr) -> Self {
        let label = if **upstream == *addr.to_string() {
            upstream.to_string()
        } else {
            format!("{upstream} ({addr})")
        };
        Self {
            tunnel: Arc::clone(tunnel),
            upstream: Arc::clone(upstream),
            addr,
            label,
            active: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            handshake_failed: AtomicBool::new(false),
            transition: Mutex::new(()),
        }
    }

    fn ejected_for(&self, now: u64) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Ejects for the backoff of the failure streak. With `extend` false a
    /// failure while already ejected is ignored (see [`Balancer::connect`]).
    fn mark_failure(&self, reason: &str, extend: bool) {
        let _transition = lock(&self.transition);
        let now = now_nanos();
        if !extend && self.ejected_for(now).is_some() {
            debug!(tunnel = %self.tunnel, upstream = %self.label, reason, "upstream failed while already ejected");
            return;
        }
        let failures = self.failures.load(Ordering::Relaxed).saturating_add(1);
        self.failures.store(failures, Ordering::Relaxed);
        let backoff = backoff(failures);
        let until = now.saturating_add(nanos(backoff));
        self.ejected_until.fetch_max(until, Ordering::Relaxed);
        if failures == 1 {
            info!(tunnel = %self.tunnel, upstream = %self.label, reason, ?backoff, "upstream ejected");
        } else {
            debug!(tunnel = %self.tunnel, upstream = %self.label, reason, ?backoff, failures, "upstream still failing");
        }
    }

    fn mark_success(&self) {
        // The common case, a healthy endpoint, must stay lock-free.
        if self.failures.load(Ordering::Relaxed) == 0
            && self.ejected_until.load(Ordering::Relaxed) == 0
        {
            return;
        }
        let _transition = lock(&self.transition);
        let failures = self.failures.swap(0, Ordering::Relaxed);
        self.ejected_until.store(0, Ordering::Relaxed);
        if failures > 0 {
            info!(tunnel = %self.tunnel, upstream = %self.label, after_failures = failures, "upstream healthy again");
        }
    }
}

impl Upstream {
    fn new(endpoint: Arc<Endpoint>) -> Self {
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        Self {
            endpoint,
            reported: AtomicBool::new(false),
        }
    }

    /// The configured `host:port` this connection's address came from.
    pub fn name(&self) -> &str {
        &self.endpoint.upstream
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.addr
    }

    /// Ejects the endpoint after a failure that is its fault although the
    /// TCP connect succeeded (a reset or EOF during the TLS handshake).
    /// Reporting the same connection twice counts once.
    pub fn report_failure(&self) {
        if !self.reported.swap(true, Ordering::Relaxed) {
            self.endpoint
                .handshake_failed
                .store(true, Ordering::Relaxed);
            self.endpoint
                .mark_failure("failed during the TLS handshake", false);
        }
    }

    /// Records a completed TLS handshake: the endpoint serves, whatever
    /// failed before.
    pub fn report_success(&self) {
        if self
            .endpoint
            .handshake_failed
            .swap(false, Ordering::Relaxed)
        {
            self.endpoint.mark_success();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name())
            .field("addr", &self.addr())
            .finish()
    }
}

/// Why a dial failed.
#[derive(Debug)]
enum DialError {
    Io(io::Error),
    TimedOut(Duration),
}

impl DialError {
    /// Local resource exhaustion says nothing about the upstream; ejecting
    /// for it would empty the pool exactly when the process is struggling.
    fn is_upstreams_fault(&self) -> bool {
        match self {
            DialError::TimedOut(_) => true,
            DialError::Io(e) => {
                let local_kind = matches!(
                    e.kind(),
                    io::ErrorKind::AddrNotAvailable | io::ErrorKind::OutOfMemory
                );
                // ENFILE and EMFILE: the same numbers on Linux and the BSDs,
                // and std has no ErrorKind for them.
                let local_errno = cfg!(unix) && matches!(e.raw_os_error(), Some(23 | 24));
                !(local_kind || local_errno)
            }
        }
    }
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::Io(e) => e.fmt(f),
            DialError::TimedOut(after) => write!(f, "connect timed out after {after:?}"),
        }
    }
}

async fn dial(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, DialError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(DialError::Io(e)),
        Err(_) => Err(DialError::TimedOut(timeout)),
    }
}

/// 1 s, doubling per consecutive failure, at most [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BASE_BACKOFF
        .saturating_mul(1u32 << doublings)
        .min(MAX_BACKOFF)
}

/// Ejection deadlines as plain integers, so they fit in an atomic.
fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    nanos(Instant::now().saturating_duration_since(epoch))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A poisoned lock only means another thread panicked while holding it;
/// the data behind these locks stays consistent, so keep going.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(balance: Balance) -> BalanceSettings {
        BalanceSettings {
            balance,
            resolve_interval: Duration::from_secs(30),
            health_check_interval: None,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn names(b: &Balancer) -> Vec<(String, SocketAddr)> {
        b.snapshot()
            .into_iter()
            .map(|s| (s.upstream, s.addr))
            .collect()
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let secs: Vec<u64> = [0, 1, 2, 3, 4, 5, 6, 7, 40, u32::MAX]
            .iter()
            .map(|n| backoff(*n).as_secs())
            .collect();
        assert_eq!(secs, [1, 1, 2, 4, 8, 16, 30, 30, 30, 30]);
    }

    #[test]
    fn literals_are_usable_at_once_and_names_wait() {
        let b = Balancer::new(
            "t",
            &[
                "10.0.0.1:1".into(),
                "[::1]:2".into(),
                "db.internal:3".into(),
            ],
            &settings(Balance::P2c),
            Duration::from_secs(1),
        );
        assert_eq!(
            names(&b),
            [
                ("10.0.0.1:1".to_string(), addr("10.0.0.1:1")),
                ("[::1]:2".to_string(), addr("[::1]:2")),
            ]
        );
        assert!(b
            .unresolved_reason()
            .contains("db.internal:3: not resolved yet"));
    }

    #[test]
    fn resolution_keeps_state_adds_and_drops() {
        let b = Balancer::new(
            "t",
            &["10.0.0.1:1".into(), "svc:80".into()],
            &settings(Balance::P2c),
            Duration::from_secs(1),
        );
        b.apply_resolution(vec![(
            1,
            Ok(vec![addr("10.0.0.2:80"), addr("10.0.0.3:80")]),
        )]);
        let list = b.endpoints.load_full();
        assert_eq!(list.len(), 3);
        let kept = Arc::clone(&list[1]);
        let dropped = Arc::clone(&list[2]);
        let held_kept = Upstream::new(Arc::clone(&kept));
        let held_dropped = Upstream::new(Arc::clone(&dropped));
        kept.mark_failure("test", false);

        // .3 vanishes, .4 appears; .2 keeps its load and its ejection.
        b.apply_resolution(vec![(
            1,
            Ok(vec![addr("10.0.0.2:80"), addr("10.0.0.4:80")]),
        )]);
        let list = b.endpoints.load_full();
        assert!(Arc::ptr_eq(&list[1], &kept));
        assert_eq!(list[2].addr, addr("10.0.0.4:80"));
        let snap = b.snapshot();
        assert_eq!(snap[1].active, 1);
        assert_eq!(snap[1].consecutive_failures, 1);
        assert!(!snap[1].healthy);
        assert_eq!(snap.len(), 3);

        // The vanished endpoint's guard still decrements its own counter.
        drop(held_dropped);
        assert_eq!(dropped.active.load(Ordering::Relaxed), 0);
        drop(held_kept);
        assert_eq!(b.snapshot()[1].active, 0);
    }

    #[test]
    fn failed_lookup_keeps_previous_addresses() {
        let b = Balancer::new(
            "t",
            &["svc:80".into()],
            &settings(Balance::P2c),
            Duration::from_secs(1),
        );
        b.apply_resolution(vec![(0, Ok(vec![addr("10.0.0.2:80")]))]);
        b.apply_resolution(vec![(0, Err("no such host".into()))]);
        b.apply_resolution(vec![(0, Ok(Vec::new()))]);
        assert_eq!(names(&b), [("svc:80".to_string(), addr("10.0.0.2:80"))]);
        assert!(lock(&b.resolved)[0].error.is_some());
        b.apply_resolution(vec![(0, Ok(vec![addr("10.0.0.2:80")]))]);
        assert!(lock(&b.resolved)[0].error.is_none());
    }

    #[test]
    fn same_address_twice_is_one_endpoint() {
        let b = Balancer::new(
            "t",
            &["127.0.0.1:5".into(), "127.0.0.1:5".into(), "h:5".into()],
            &settings(Balance::P2c),
            Duration::from_secs(1),
        );
        b.apply_resolution(vec![(2, Ok(vec![addr("127.0.0.1:5")]))]);
        assert_eq!(
            names(&b),
            [("127.0.0.1:5".to_string(), addr("127.0.0.1:5"))]
        );
    }

    #[test]
    fn all_ejected_falls_back_to_soonest_and_excludes() {
        let b = Balancer::new(
            "t",
            &["10.0.0.1:1".into(), "10.0.0.2:1".into()],
            &settings(Balance::RoundRobin),
            Duration::from_secs(1),
        );
        let list = b.endpoints.load_full();
        list[0].mark_failure("x", false);
        list[0].mark_failure("x", true); // 2 s
        list[1].mark_failure("x", false); // 1 s
        let (picked, fallback) = b.pick(&list, None).unwrap();
        assert!(fallback);
        assert!(Arc::ptr_eq(&picked, &list[1]));
        let (picked, _) = b.pick(&list, Some(&list[1])).unwrap();
        assert!(Arc::ptr_eq(&picked, &list[0]));

        let single = &list[..1];
        assert!(b.pick(single, Some(&list[0])).is_none());
    }

    #[test]
    fn failures_in_flight_do_not_inflate_backoff() {
        let e = Endpoint::new(&Arc::from("t"), &Arc::from("h:1"), addr("10.0.0.1:1"));
        for _ in 0..10 {
            e.mark_failure("x", false);
        }
        assert_eq!(e.failures.load(Ordering::Relaxed), 1);
        e.mark_success();
        assert_eq!(e.failures.load(Ordering::Relaxed), 0);
        assert!(e.ejected_for(now_nanos()).is_none());
    }

    #[test]
    fn p2c_prefers_the_less_loaded() {
        let b = Balancer::new(
            "t",
            &[
                "10.0.0.1:1".into(),
                "10.0.0.2:1".into(),
                "10.0.0.3:1".into(),
            ],
            &settings(Balance::P2c),
            Duration::from_secs(1),
        );
        let list = b.endpoints.load_full();
        let _held: Vec<Upstream> = (0..5)
            .map(|_| Upstream::new(Arc::clone(&list[0])))
            .collect();
        // With three endpoints, the loaded one wins only if drawn twice,
        // which p2c never does: it is never picked.
        for _ in 0..200 {
            let (picked, _) = b.pick(&list, None).unwrap();
            assert!(!Arc::ptr_eq(&picked, &list[0]));
        }
    }

    #[tokio::test]
    async fn no_upstreams_is_no_endpoints() {
        let b = Balancer::new("t", &[], &settings(Balance::P2c), Duration::from_secs(1));
        match b.connect().await {
            Err(BalanceError::NoEndpoints(reason)) => assert!(reason.contains("no upstreams")),
            other => panic!("expected NoEndpoints, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn unresolvable_name_is_no_endpoints_with_reason() {
        let b = Balancer::new(
            "t",
            &["no-such-host.invalid:80".into()],
            &settings(Balance::P2c),
            Duration::from_secs(5),
        );
        match b.connect().await {
            Err(BalanceError::NoEndpoints(reason)) => {
                assert!(reason.contains("no-such-host.invalid:80"), "{reason}");
                assert!(!reason.contains("not resolved yet"), "{reason}");
            }
            other => panic!("expected NoEndpoints, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn concurrent_first_connects_share_one_lookup() {
        let b = Balancer::new(
            "t",
            &["localhost:9".into()],
            &settings(Balance::P2c),
            Duration::from_secs(5),
        );
        let rounds = b.resolutions.subscribe();
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let b = Arc::clone(&b);
                tokio::spawn(async move { b.refresh().await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert!(!b.snapshot().is_empty());
        // A task that lost the race to one round may start the next, but
        // far fewer rounds than callers run.
        assert!(*rounds.borrow() < 20, "{} rounds", *rounds.borrow());
    }

    #[tokio::test]
    async fn re_resolution_keeps_state() {
        let b = Balancer::new(
            "t",
            &["localhost:9".into()],
            &BalanceSettings {
                balance: Balance::P2c,
                resolve_interval: Duration::from_millis(30),
                health_check_interval: None,
            },
            Duration::from_secs(1),
        );
        let stop = CancellationToken::new();
        b.start(stop.clone());
        let mut rounds = b.resolutions.subscribe();
        while b.snapshot().is_empty() {
            tokio::time::timeout(Duration::from_secs(5), rounds.changed())
                .await
                .unwrap()
                .unwrap();
        }
        let first = Arc::clone(&b.endpoints.load()[0]);
        let guard = Upstream::new(Arc::clone(&first));
        guard.report_failure();
        let seen = *rounds.borrow_and_update();
        while *rounds.borrow_and_update() < seen + 3 {
            tokio::time::timeout(Duration::from_secs(5), rounds.changed())
                .await
                .unwrap()
                .unwrap();
        }
        let now = b.endpoints.load_full();
        let same = now.iter().find(|e| e.addr == first.addr).unwrap();
        assert!(Arc::ptr_eq(same, &first));
        let status = b
            .snapshot()
            .into_iter()
            .find(|s| s.addr == first.addr)
            .unwrap();
        assert_eq!(status.active, 1);
        assert_eq!(status.consecutive_failures, 1);
        stop.cancel();
    }
}
