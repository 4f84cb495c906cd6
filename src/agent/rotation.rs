//! The dev agent's clockwork: which CAs are trusted and which one signs,
//! which SVIDs are current, and when each of them changes.
//!
//! [`Authority`] is a plain state machine driven by explicit times, so it
//! can be tested without sleeping; [`run`] is the task that sleeps until
//! the next event and publishes each new [`Snapshot`] on a `watch` channel
//! that every client stream follows.
//!
//! CA rotation, the SPIRE way, with one agent-wide rule for each step:
//!
//! * **Prepare** at half the active CA's life (measured from issuance to
//!   NotAfter): make the next CA and add it to the bundle at once, so every
//!   client and peer learns to trust it before it signs anything.
//! * **Activate** at three quarters of the active CA's life: the next CA
//!   becomes the signer and every SVID is re-issued from it. SPIRE activates
//!   later (5/6); 3/4 leaves the prepared CA a longer head start in the
//!   bundle and the old CA a quarter of its life for the SVIDs it signed.
//! * **SVIDs never outlive their CA**: NotAfter is capped at the signing
//!   CA's NotAfter (as SPIRE does). Since the old CA stops signing at 3/4,
//!   an SVID gets at least a quarter of the CA lifetime; `--ca-ttl` of at
//!   least 4 × `--ttl` therefore always yields full-length SVIDs, and a
//!   shorter one only trims SVIDs issued near a rotation. Each SVID is
//!   renewed at half of its actual (possibly trimmed) life, hence always
//!   before its CA expires.
//! * **Retire**: the old CA stays in the bundle until its NotAfter, because
//!   SVIDs it signed may still be presented until then, and is then dropped.
//!
//! If the process was asleep past several of these points (a suspended
//! laptop), one step applies them all in order; a client then sees the new
//! CA and the SVIDs it signed in the same message, which still verifies.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ca::{Ca, IssuedSvid};
use super::ca_dir::CaDir;
use super::AgentError;
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// Longest single sleep. Certificate times are wall-clock time while tokio
/// sleeps on the monotonic clock, which stops during suspend; waking at
/// least this often bounds how late an event can be after a suspend or a
/// clock step.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Pause before trying again after a failed step (e.g. key generation).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Everything a client stream needs, immutable once published.
#[derive(Debug)]
pub(crate) struct Snapshot {
    /// One SVID per distinct SPIFFE ID, in command-line order.
    pub(crate) svids: Vec<Arc<IssuedSvid>>,
    /// Changes whenever an SVID is re-issued, index for index with `svids`:
    /// streams compare these to skip messages that would repeat themselves.
    pub(crate) generations: Vec<u64>,
    /// Concatenated DER of our trust domain's CA certificates.
    pub(crate) bundle_der: Arc<Vec<u8>>,
    pub(crate) bundle_pem: String,
    /// Changes whenever the set of CAs in our bundle changes.
    pub(crate) bundle_version: u64,
    /// `spiffe://<td>` of our trust domain: the key of our bundle.
    pub(crate) trust_domain_id: String,
    /// Federated bundles: `spiffe://<td>` and concatenated DER.
    pub(crate) federated: Arc<Vec<(String, Vec<u8>)>>,
}

/// The CAs and SVIDs of the agent, and the rules that rotate them.
#[derive(Debug)]
pub(crate) struct Authority {
    trust_domain: TrustDomain,
    ids: Vec<SpiffeId>,
    ttl: Duration,
    ca_ttl: Duration,
    ca_dir: Option<CaDir>,
    /// Our bundle, oldest CA first; holds the active, the next and any
    /// retired CA that has not expired yet.
    bundle: Vec<Arc<Ca>>,
    active: Arc<Ca>,
    next: Option<Arc<Ca>>,
    svids: Vec<Arc<IssuedSvid>>,
    generations: Vec<u64>,
    generation_counter: u64,
    bundle_version: u64,
    federated: Arc<Vec<(String, Vec<u8>)>>,
}

/// What the agent starts from.
pub(crate) struct Setup {
    pub(crate) trust_domain: TrustDomain,
    /// Distinct IDs, in command-line order.
    pub(crate) ids: Vec<SpiffeId>,
    pub(crate) ttl: Duration,
    pub(crate) ca_ttl: Duration,
    pub(crate) ca_dir: Option<CaDir>,
    pub(crate) active: Ca,
    pub(crate) next: Option<Ca>,
    pub(crate) federated: Vec<(String, Vec<u8>)>,
}

impl Authority {
    /// Builds the authority and issues the first SVIDs as of `now` (which
    /// may also prepare or activate CAs, if a stored CA is far into its life).
    pub(crate) fn new(setup: Setup, now: SystemTime) -> Result<Self, AgentError> {
        let active = Arc::new(setup.active);
        let next = setup.next.map(Arc::new);
        let mut bundle = vec![Arc::clone(&active)];
        bundle.extend(next.iter().cloned());
        let mut authority = Self {
            trust_domain: setup.trust_domain,
            ids: setup.ids,
            ttl: setup.ttl,
            ca_ttl: setup.ca_ttl,
            ca_dir: setup.ca_dir,
            bundle,
            active,
            next,
            svids: Vec::new(),
            generations: Vec::new(),
            generation_counter: 0,
            bundle_version: 0,
            federated: Arc::new(setup.federated),
        };
        authority.step(now)?;
        Ok(authority)
    }

    /// Applies every event due at `now`. Returns whether anything changed.
    pub(crate) fn step(&mut self, now: SystemTime) -> Result<bool, AgentError> {
        let mut changed = false;
        // Bounded: each pass either prepares or activates, and a fresh CA
        // is never due for either immediately.
        for _ in 0..4 {
            if self.next.is_none() && now >= self.active.prepare_at() {
                self.prepare(now)?;
                changed = true;
            }
            if self.next.is_some() && now >= self.active.activate_at() {
                self.activate();
                changed = true;
                continue;
            }
            break;
        }
        // After activation, so that a CA retired by this very step is
        // dropped too if it has already expired.
        changed |= self.drop_expired_cas(now);
        changed |= self.renew_due(now)?;
        Ok(changed)
    }

    fn drop_expired_cas(&mut self, now: SystemTime) -> bool {
        let active = Arc::clone(&self.active);
        let next = self.next.clone();
        let before = self.bundle.len();
        self.bundle.retain(|ca| {
            let keep = Arc::ptr_eq(ca, &active)
                || next.as_ref().is_some_and(|n| Arc::ptr_eq(ca, n))
                || ca.not_after > now;
            if !keep {
                tracing::info!(
                    serial = %ca.serial,
                    expired = %crate::timefmt::rfc3339(ca.not_after),
                    "dropped the retired CA from the bundle: it has expired"
                );
            }
            keep
        });
        let changed = self.bundle.len() != before;
        if changed {
            self.bundle_version += 1;
        }
        changed
    }

    fn prepare(&mut self, now: SystemTime) -> Result<(), AgentError> {
        let mut next = Ca::generate(&self.trust_domain, now, self.ca_ttl)?;
        if let Some(dir) = &self.ca_dir {
            next = dir.publish_next(next, &self.active, now);
        }
        tracing::info!(
            serial = %next.serial,
            expires = %crate::timefmt::rfc3339(next.not_after),
            activates = %crate::timefmt::rfc3339(self.active.activate_at()),
            "prepared the next CA and added it to the bundle; it signs nothing yet"
        );
        let next = Arc::new(next);
        self.bundle.push(Arc::clone(&next));
        self.next = Some(next);
        self.bundle_version += 1;
        Ok(())
    }

    fn activate(&mut self) {
        let Some(next) = self.next.take() else {
            return;
        };
        tracing::info!(
            serial = %next.serial,
            previous = %self.active.serial,
            previous_expires = %crate::timefmt::rfc3339(self.active.not_after),
            "activated the next CA; the previous one stays in the bundle until it expires"
        );
        if let Some(dir) = &self.ca_dir {
            dir.activated(&next);
        }
        self.active = next;
    }

    /// Re-issues SVIDs that reached half their life or were signed by a CA
    /// that is no longer the active one.
    fn renew_due(&mut self, now: SystemTime) -> Result<bool, AgentError> {
        let mut changed = false;
        for index in 0..self.ids.len() {
            let due = match self.svids.get(index) {
                None => true,
                Some(svid) => now >= svid.renew_at || svid.signer != self.active.serial,
            };
            if !due {
                continue;
            }
            let Some(id) = self.ids.get(index) else {
                continue;
            };
            let svid = Arc::new(self.active.issue(id, now, self.ttl)?);
            tracing::info!(
                spiffe_id = %svid.id,
                serial = %svid.serial,
                expires = %crate::timefmt::rfc3339(svid.not_after),
                ca = %svid.signer,
                "{} X509-SVID",
                if self.svids.len() > index { "rotated" } else { "issued" }
            );
            self.generation_counter += 1;
            if index < self.svids.len() {
                self.svids[index] = svid;
                self.generations[index] = self.generation_counter;
            } else {
                self.svids.push(svid);
                self.generations.push(self.generation_counter);
            }
            changed = true;
        }
        Ok(changed)
    }

    /// When [`step`](Self::step) next has something to do.
    pub(crate) fn next_event(&self) -> SystemTime {
        let ca_event = match self.next {
            None => self.active.prepare_at(),
            Some(_) => self.active.activate_at(),
        };
        let retired = self
            .bundle
            .iter()
            .filter(|ca| !Arc::ptr_eq(ca, &self.active))
            .filter(|ca| !self.next.as_ref().is_some_and(|n| Arc::ptr_eq(ca, n)))
            .map(|ca| ca.not_after);
        let renewals = self.svids.iter().map(|s| s.renew_at);
        retired
            .chain(renewals)
            .fold(ca_event, |earliest, t| earliest.min(t))
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let bundle_der: Vec<u8> = self
            .bundle
            .iter()
            .flat_map(|ca| ca.der.iter().copied())
            .collect();
        let bundle_pem: String = self.bundle.iter().map(|ca| ca.cert_pem()).collect();
        Snapshot {
            svids: self.svids.clone(),
            generations: self.generations.clone(),
            bundle_der: Arc::new(bundle_der),
            bundle_pem,
            bundle_version: self.bundle_version,
            trust_domain_id: format!("spiffe://{}", self.trust_domain),
            federated: Arc::clone(&self.federated),
        }
    }

    #[cfg(test)]
    pub(crate) fn active_serial(&self) -> &str {
        &self.active.serial
    }

    #[cfg(test)]
    pub(crate) fn bundle_serials(&self) -> Vec<String> {
        self.bundle.iter().map(|ca| ca.serial.clone()).collect()
    }
}

/// Sleeps until the next event, applies it, publishes the new snapshot;
/// until `shutdown`. Dropping `publish` on return ends every client stream.
pub(crate) async fn run(
    mut authority: Authority,
    publish: watch::Sender<Arc<Snapshot>>,
    shutdown: CancellationToken,
) {
    let mut wait = until(authority.next_event());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = match authority.step(SystemTime::now()) {
            Ok(changed) => {
                if changed {
                    publish.send_replace(Arc::new(authority.snapshot()));
                }
                until(authority.next_event())
            }
            Err(e) => {
                tracing::error!("rotation failed, retrying in {RETRY_AFTER:?}: {e}");
                RETRY_AFTER
            }
        };
    }
}

fn until(deadline: SystemTime) -> Duration {
    deadline
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .min(MAX_SLEEP)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe_id::{parse_trust_domain, parse_workload_id};
    use std::time::UNIX_EPOCH;

    fn authority(now: SystemTime, ttl: u64, ca_ttl: u64) -> Authority {
        let td = parse_trust_domain("example.org").unwrap();
        let active = Ca::generate(&td, now, Duration::from_secs(ca_ttl)).unwrap();
        Authority::new(
            Setup {
                trust_domain: td,
                ids: vec![
                    parse_workload_id("spiffe://example.org/a").unwrap(),
                    parse_workload_id("spiffe://example.org/b").unwrap(),
                ],
                ttl: Duration::from_secs(ttl),
                ca_ttl: Duration::from_secs(ca_ttl),
                ca_dir: None,
                active,
                next: None,
                federated: Vec::new(),
            },
            now,
        )
        .unwrap()
    }

    fn start() -> SystemTime {
        // A whole second, so the thresholds below are exact.
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn svids_renew_at_half_their_life_with_new_keys() {
        let t0 = start();
        let mut a = authority(t0, 10, 1000);
        let first = a.snapshot();
        assert_eq!(first.svids.len(), 2);
        assert_eq!(a.next_event(), t0 + Duration::from_secs(5));
        assert!(!a.step(t0 + Duration::from_secs(4)).unwrap());
        assert!(a.step(t0 + Duration::from_secs(5)).unwrap());
        let second = a.snapshot();
        for (old, new) in first.svids.iter().zip(&second.svids) {
            assert_ne!(old.serial, new.serial);
            assert_ne!(old.key_pkcs8, new.key_pkcs8);
            assert_eq!(old.id, new.id);
        }
        assert_ne!(first.generations, second.generations);
        assert_eq!(first.bundle_version, second.bundle_version);
    }

    #[test]
    fn ca_rotation_prepares_then_activates_then_drops() {
        let t0 = start();
        // CA life 8 s: prepare at 4 s, activate at 6 s, expire at 8 s.
        let mut a = authority(t0, 1, 8);
        let first_ca = a.active_serial().to_string();
        let mut seen_in_bundle_at: Option<SystemTime> = None;
        let mut new_ca = None;
        let mut t = t0;
        while t < t0 + Duration::from_secs(20) {
            t += Duration::from_millis(250);
            a.step(t).unwrap();
            let bundle = a.bundle_serials();
            for svid in &a.snapshot().svids {
                assert!(
                    bundle.contains(&svid.signer),
                    "SVID signed by a CA missing from the bundle"
                );
                assert!(svid.not_after <= t + Duration::from_secs(2));
                if svid.signer != first_ca {
                    let seen = seen_in_bundle_at.expect("signed before it was in the bundle");
                    assert!(seen < t, "new CA signed in the same step it was added");
                }
            }
            if seen_in_bundle_at.is_none() && bundle.len() == 2 {
                seen_in_bundle_at = Some(t);
                new_ca = bundle.last().cloned();
                assert!(t >= t0 + Duration::from_secs(4));
                assert_eq!(a.active_serial(), first_ca);
            }
            if t == t0 + Duration::from_secs(6) {
                assert_eq!(Some(a.active_serial().to_string()), new_ca);
                assert!(bundle.contains(&first_ca), "old CA dropped too early");
            }
            if t == t0 + Duration::from_millis(8250) {
                assert!(!bundle.contains(&first_ca), "old CA kept after expiry");
            }
        }
        assert_ne!(a.active_serial(), first_ca);
    }

    #[test]
    fn svids_never_outlive_their_ca() {
        let t0 = start();
        // SVID ttl far beyond the CA's life.
        let a = authority(t0, 3600, 20);
        for svid in &a.snapshot().svids {
            assert_eq!(svid.not_after, t0 + Duration::from_secs(20));
            assert_eq!(svid.renew_at, t0 + Duration::from_secs(10));
        }
    }

    #[test]
    fn a_long_sleep_catches_up_in_one_step() {
        let t0 = start();
        let mut a = authority(t0, 1, 8);
        let first_ca = a.active_serial().to_string();
        // Way past activation and expiry of the first CA.
        assert!(a.step(t0 + Duration::from_secs(9)).unwrap());
        assert_ne!(a.active_serial(), first_ca);
        assert!(!a.bundle_serials().contains(&first_ca));
        let active = a.active_serial().to_string();
        for svid in &a.snapshot().svids {
            assert_eq!(svid.signer, active);
        }
    }

    #[test]
    fn next_event_is_the_earliest_pending_one() {
        let t0 = start();
        let a = authority(t0, 100, 40);
        // SVIDs renew at 20 s (capped at CA end 40 s → 40/2), CA prepares at 20 s.
        assert_eq!(a.next_event(), t0 + Duration::from_secs(20));
        let b = authority(t0, 4, 400);
        assert_eq!(b.next_event(), t0 + Duration::from_secs(2));
    }
}
