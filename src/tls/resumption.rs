//! TLS 1.3 session resumption, bounded so that it never outlives what it
//! stands for.
//!
//! A resumed handshake skips the certificate exchange and both signatures,
//! which is most of what a new tunnelled connection costs. What it must not
//! skip is the SPIFFE check: a resumed session carries the peer chain of its
//! original full handshake, so [`authorize_session`] verifies that chain
//! again against the bundles of *now* and authorizes its ID against the
//! policy of *now* on every connection, resumed or not. On top of that, the
//! rules here keep tickets from outliving the identities they were made for:
//!
//! * **Server side** ([`TicketIssuer`]): tickets are stateless (encrypted,
//!   nothing kept per session) under a key that is replaced whenever our
//!   identity changes (a new SVID or any bundle change), so no ticket
//!   survives a rotation or a trust change. Each ticket also carries its own
//!   expiry, which we check on decryption (rustls itself would accept any
//!   ticket its key can open): at most [`MAX_TICKET_LIFETIME`], and at most
//!   half of what is left of our own SVID's validity. With SVIDs rotated at
//!   half-life, the peer's certificate inside a ticket is then still valid
//!   whenever the ticket is.
//! * **Client side** ([`ClientResumption`]): tickets are kept per upstream
//!   address (two upstreams on one host must not swap tickets), dropped when
//!   our identity changes (a ticket binds the client certificate we showed),
//!   and used at most [`MAX_TICKET_LIFETIME`] after they arrived, whatever
//!   lifetime the server announced. The outbound forgets an upstream's
//!   tickets and does a full handshake when a resumed session fails
//!   verification (say the server's old certificate expired meanwhile).
//!
//! TLS 1.2 sessions are not resumed on the client side; TLS 1.2 clients of
//! an inbound may resume with tickets under the same rules.
//!
//! A resumed session issues new tickets that carry the certificates of the
//! session's first full handshake, so a client that keeps resuming keeps
//! the server certificate it saw then, and the server keeps the client's.
//! The key change at every identity change of ours ends such a chain at the
//! latest one rotation later; until then the re-verification on every
//! connection refuses a chain whose certificate expired (and an outbound
//! then retries with a full handshake, as above).
//!
//! [`authorize_session`]: super::verify::authorize_session

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::server::ProducesTickets;
use rustls::{ClientConfig, NamedGroup};
use rustls_pki_types::ServerName;
use tracing::warn;

use crate::identity::{IdentityStore, SvidSelector};

/// The longest a session ticket is accepted (server) or offered (client).
/// Resumption pays off for peers that reconnect often; minutes are plenty,
/// and a short bound keeps a ticket's reach small.
pub const MAX_TICKET_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// Tickets kept per upstream address on the client side. Each connection
/// takes one and its handshake brings one back, a round trip later: the
/// pool must hold one per connection started within that round trip, so
/// it is sized for bursts of many concurrent connections (with 32, wrk's
/// 64 connections in lockstep made one handshake in seven a full one). It
/// only fills that far when such bursts happen, at about 2 KiB a ticket.
const TICKETS_PER_UPSTREAM: usize = 256;

/// Upstream addresses with their own session cache; past this, the caches
/// are dropped and rebuilt (addresses churn only with DNS changes).
const MAX_UPSTREAM_CACHES: usize = 1024;

/// Seconds since the Unix epoch, now.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Issues and opens the session tickets of an inbound tunnel.
pub struct TicketIssuer {
    store: Arc<IdentityStore>,
    svid: SvidSelector,
    /// The ticket key of the current identity generation.
    key: ArcSwap<TicketKey>,
    /// Serialises key replacement, so one identity change makes one key.
    replacing: Mutex<()>,
}

struct TicketKey {
    generation: u64,
    ticketer: Arc<dyn ProducesTickets>,
}

/// Why no ticket key could be made (the system's random source failed).
#[derive(Debug, thiserror::Error)]
#[error("cannot create a session ticket key: {0}")]
pub struct TicketKeyError(#[from] rustls::Error);

impl std::fmt::Debug for TicketIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketIssuer")
            .field("generation", &self.key.load().generation)
            .finish_non_exhaustive()
    }
}

impl TicketIssuer {
    pub fn new(store: Arc<IdentityStore>, svid: SvidSelector) -> Result<Self, TicketKeyError> {
        let key = TicketKey {
            generation: store.generation(),
            ticketer: rustls::crypto::aws_lc_rs::Ticketer::new()?,
        };
        Ok(Self {
            store,
            svid,
            key: ArcSwap::from_pointee(key),
            replacing: Mutex::new(()),
        })
    }

    /// The key for the current identity, made anew after an identity change.
    /// `None` only if a new key cannot be made, and then no ticket is issued
    /// or accepted: connections fall back to full handshakes.
    fn current_key(&self) -> Option<Arc<TicketKey>> {
        let generation = self.store.generation();
        let key = self.key.load_full();
        if key.generation == generation {
            return Some(key);
        }
        let _one_at_a_time = self
            .replacing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = self.key.load_full();
        if key.generation == generation {
            return Some(key);
        }
        match rustls::crypto::aws_lc_rs::Ticketer::new() {
            Ok(ticketer) => {
                let fresh = Arc::new(TicketKey {
                    generation,
                    ticketer,
                });
                self.key.store(Arc::clone(&fresh));
                Some(fresh)
            }
            Err(e) => {
                warn!(error = %e, "cannot make a new session ticket key; resumption is off until one can be made");
                None
            }
        }
    }

    /// Seconds a ticket issued now may be used: the cap, or half of what is
    /// left of our SVID's validity if that is shorter; 0 means no ticket.
    fn lifetime_secs(&self) -> u64 {
        let left = self
            .store
            .load()
            .and_then(|identity| {
                let svid = identity.svid(&self.svid)?;
                svid.not_after.duration_since(SystemTime::now()).ok()
            })
            .unwrap_or_default();
        (left / 2).min(MAX_TICKET_LIFETIME).as_secs()
    }
}

impl TicketIssuer {
    /// Opens a ticket at `now` (Unix seconds): `None` if it is not ours, not
    /// of our current identity, or expired.
    fn open_at(&self, cipher: &[u8], now: u64) -> Option<Vec<u8>> {
        let key = self.current_key()?;
        let mut opened = key.ticketer.decrypt(cipher)?;
        let expiry = opened.get(..EXPIRY_LEN)?;
        let expiry = u64::from_be_bytes(expiry.try_into().ok()?);
        if now >= expiry {
            return None;
        }
        opened.drain(..EXPIRY_LEN);
        Some(opened)
    }
}

/// A ticket is the inner ticketer's encryption of
/// `expiry (8 bytes, big-endian Unix seconds) || rustls session state`.
const EXPIRY_LEN: usize = 8;

impl ProducesTickets for TicketIssuer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.lifetime_secs()).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let lifetime = self.lifetime_secs();
        if lifetime == 0 {
            return None;
        }
        let key = self.current_key()?;
        let mut sealed = Vec::with_capacity(EXPIRY_LEN + plain.len());
        sealed.extend_from_slice(&(unix_now() + lifetime).to_be_bytes());
        sealed.extend_from_slice(plain);
        key.ticketer.encrypt(&sealed)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_at(cipher, unix_now())
    }
}

/// The client configs of an outbound tunnel, one per upstream address so
/// that each upstream has its own tickets.
#[derive(Debug)]
pub struct ClientResumption {
    /// The config everything but the session cache comes from.
    base: Arc<ClientConfig>,
    store: Arc<IdentityStore>,
    enabled: bool,
    per_upstream: ArcSwap<HashMap<SocketAddr, Upstream>>,
}

#[derive(Debug, Clone)]
struct Upstream {
    config: Arc<ClientConfig>,
    tickets: Arc<TicketCache>,
}

impl ClientResumption {
    /// `base` must have resumption disabled; with `enabled` false every
    /// connection uses it as is and never resumes.
    pub fn new(base: Arc<ClientConfig>, store: Arc<IdentityStore>, enabled: bool) -> Self {
        Self {
            base,
            store,
            enabled,
            per_upstream: ArcSwap::from_pointee(HashMap::new()),
        }
    }

    /// The config to connect to `addr` with. Made once per address; after
    /// that this is one atomic load and a map lookup.
    pub fn config_for(&self, addr: SocketAddr) -> Arc<ClientConfig> {
        if !self.enabled {
            return Arc::clone(&self.base);
        }
        if let Some(upstream) = self.per_upstream.load().get(&addr) {
            return Arc::clone(&upstream.config);
        }
        let made = self.upstream();
        let mut chosen = made.clone();
        self.per_upstream.rcu(|caches| {
            let mut caches = if caches.len() >= MAX_UPSTREAM_CACHES {
                HashMap::new()
            } else {
                HashMap::clone(caches)
            };
            chosen = caches.entry(addr).or_insert_with(|| made.clone()).clone();
            caches
        });
        chosen.config
    }

    /// Drops every ticket for `addr`, so the next connection there does a
    /// full handshake.
    pub fn forget(&self, addr: SocketAddr) {
        if let Some(upstream) = self.per_upstream.load().get(&addr) {
            upstream.tickets.clear();
        }
    }

    fn upstream(&self) -> Upstream {
        let tickets = Arc::new(TicketCache::new(Arc::clone(&self.store)));
        let mut config = ClientConfig::clone(&self.base);
        config.resumption = rustls::client::Resumption::store(tickets.clone())
            .tls12_resumption(rustls::client::Tls12Resumption::Disabled);
        Upstream {
            config: Arc::new(config),
            tickets,
        }
    }
}

/// The tickets of one upstream, valid for one identity generation.
#[derive(Debug)]
struct TicketCache {
    store: Arc<IdentityStore>,
    inner: Mutex<Tickets>,
}

#[derive(Debug, Default)]
struct Tickets {
    generation: u64,
    /// Oldest first, with when each arrived.
    tls13: VecDeque<(Tls13ClientSessionValue, Instant)>,
    kx_hint: Option<NamedGroup>,
}

impl TicketCache {
    fn new(store: Arc<IdentityStore>) -> Self {
        Self {
            inner: Mutex::new(Tickets {
                generation: store.generation(),
                ..Tickets::default()
            }),
            store,
        }
    }

    /// The tickets, emptied first if our identity changed since they came.
    fn current(&self) -> std::sync::MutexGuard<'_, Tickets> {
        let mut tickets = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let generation = self.store.generation();
        if tickets.generation != generation {
            tickets.tls13.clear();
            tickets.generation = generation;
        }
        tickets
    }

    fn clear(&self) {
        self.current().tls13.clear();
    }
}

impl ClientSessionStore for TicketCache {
    fn set_kx_hint(&self, _server_name: ServerName<'static>, group: NamedGroup) {
        self.current().kx_hint = Some(group);
    }

    fn kx_hint(&self, _server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.current().kx_hint
    }

    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        _server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let mut tickets = self.current();
        if tickets.tls13.len() >= TICKETS_PER_UPSTREAM {
            tickets.tls13.pop_front();
        }
        tickets.tls13.push_back((value, Instant::now()));
    }

    fn take_tls13_ticket(
        &self,
        _server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        let mut tickets = self.current();
        // Newest first; anything older than the cap is dropped on the way.
        while let Some((ticket, arrived)) = tickets.tls13.pop_back() {
            if arrived.elapsed() < MAX_TICKET_LIFETIME {
                return Some(ticket);
            }
            tickets.tls13.clear();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::ca::Ca;
    use crate::config::MinTls;
    use crate::policy::{parse_rule, Policy};
    use crate::spiffe_id::parse_trust_domain;
    use crate::tls::config::{client_config, server_config, TlsSettings};
    use rustls::{ClientConnection, HandshakeKind, ServerConnection};

    const WEB: &str = "spiffe://example.org/web";
    const API: &str = "spiffe://example.org/api";

    fn ca() -> Ca {
        let td = parse_trust_domain("example.org").unwrap();
        Ca::generate(&td, SystemTime::now(), Duration::from_secs(86400)).unwrap()
    }

    /// Publishes a fresh SVID for `id`, valid for `ttl`, into `store`.
    fn publish(store: &IdentityStore, ca: &Ca, id: &str, ttl: Duration) {
        store.publish(ca.identity_for(id, ttl));
    }

    fn issuer_with_svid(ttl: Duration) -> (Arc<IdentityStore>, Ca, TicketIssuer) {
        let store = IdentityStore::new();
        let ca = ca();
        publish(&store, &ca, API, ttl);
        let issuer = TicketIssuer::new(Arc::clone(&store), SvidSelector::default()).unwrap();
        (store, ca, issuer)
    }

    #[test]
    fn a_ticket_opens_until_our_identity_changes() {
        let (store, ca, issuer) = issuer_with_svid(Duration::from_secs(3600));
        let ticket = issuer.encrypt(b"session state").unwrap();
        assert_eq!(issuer.decrypt(&ticket).unwrap(), b"session state");
        assert_eq!(issuer.decrypt(&ticket).unwrap(), b"session state");

        publish(&store, &ca, API, Duration::from_secs(3600));
        assert_eq!(
            issuer.decrypt(&ticket),
            None,
            "a ticket survived a rotation"
        );
        let fresh = issuer.encrypt(b"new state").unwrap();
        assert_eq!(issuer.decrypt(&fresh).unwrap(), b"new state");
    }

    #[test]
    fn a_ticket_expires_with_its_own_lifetime() {
        let (_store, _ca, issuer) = issuer_with_svid(Duration::from_secs(3600));
        let ticket = issuer.encrypt(b"state").unwrap();
        let lifetime = u64::from(issuer.lifetime());
        let key = issuer.current_key().unwrap();
        let opened = key.ticketer.decrypt(&ticket).unwrap();
        let expiry = u64::from_be_bytes(opened[..EXPIRY_LEN].try_into().unwrap());
        let now = unix_now();
        assert!(
            (now + lifetime - 1..=now + lifetime).contains(&expiry),
            "expiry {expiry}, now {now}, lifetime {lifetime}"
        );
        assert_eq!(issuer.open_at(&ticket, expiry - 1).unwrap(), b"state");
        assert_eq!(issuer.open_at(&ticket, expiry), None);
        assert_eq!(issuer.open_at(&ticket, expiry + 3600), None);
    }

    #[test]
    fn lifetime_is_half_the_svid_life_left_and_capped() {
        let (_s, _c, long) = issuer_with_svid(Duration::from_secs(3600));
        assert_eq!(long.lifetime(), 600);
        let (_s, _c, short) = issuer_with_svid(Duration::from_secs(60));
        assert!(
            (28..=30).contains(&short.lifetime()),
            "{}",
            short.lifetime()
        );

        // No SVID of ours, no ticket.
        let none = TicketIssuer::new(IdentityStore::new(), SvidSelector::default()).unwrap();
        assert_eq!(none.lifetime(), 0);
        assert_eq!(none.encrypt(b"state"), None);
    }

    #[test]
    fn foreign_and_tampered_tickets_do_not_open() {
        let (_s, _c, issuer) = issuer_with_svid(Duration::from_secs(3600));
        let (_s2, _c2, other) = issuer_with_svid(Duration::from_secs(3600));
        let mut ticket = issuer.encrypt(b"state").unwrap();
        assert_eq!(other.decrypt(&ticket), None);
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert_eq!(issuer.decrypt(&ticket), None);
        assert_eq!(issuer.decrypt(b""), None);
        assert_eq!(issuer.decrypt(&[0u8; 200]), None);
    }

    /// Two stores, like two processes: a client as web, a server as api.
    struct Ends {
        ca: Ca,
        client_store: Arc<IdentityStore>,
        sessions: ClientResumption,
        server: Arc<rustls::ServerConfig>,
    }

    fn ends() -> Ends {
        let ca = ca();
        let (client_store, server_store) = (IdentityStore::new(), IdentityStore::new());
        publish(&client_store, &ca, WEB, Duration::from_secs(3600));
        publish(&server_store, &ca, API, Duration::from_secs(3600));
        let settings = |store: &Arc<IdentityStore>, allow: &str| TlsSettings {
            store: Arc::clone(store),
            policy: Arc::new(ArcSwap::from_pointee(Policy::compile([parse_rule(allow)
                .unwrap()
                .unwrap()]))),
            svid: SvidSelector::default(),
            min_tls: MinTls::Tls13,
            session_resumption: true,
        };
        let client = client_config(&settings(&client_store, API)).unwrap();
        let server = server_config(&settings(&server_store, WEB)).unwrap();
        Ends {
            sessions: ClientResumption::new(client, Arc::clone(&client_store), true),
            ca,
            client_store,
            server,
        }
    }

    /// A handshake in memory, with the server's tickets delivered.
    fn handshake(client: &Arc<ClientConfig>, server: &Arc<rustls::ServerConfig>) -> HandshakeKind {
        finish(start(client), server)
    }

    /// A client connection whose ClientHello is written: it has taken its
    /// ticket, if there was one.
    fn start(client: &Arc<ClientConfig>) -> ClientConnection {
        let name = ServerName::try_from("api.test").unwrap();
        ClientConnection::new(Arc::clone(client), name).unwrap()
    }

    /// Completes a started handshake, with the server's tickets delivered.
    fn finish(mut c: ClientConnection, server: &Arc<rustls::ServerConfig>) -> HandshakeKind {
        let mut s = ServerConnection::new(Arc::clone(server)).unwrap();
        for _ in 0..8 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            s.read_tls(&mut &wire[..]).unwrap();
            s.process_new_packets().unwrap();
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            c.read_tls(&mut &wire[..]).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        c.handshake_kind().unwrap()
    }

    #[test]
    fn clients_resume_per_upstream_and_drop_tickets_when_their_identity_changes() {
        let ends = ends();
        let a: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1002".parse().unwrap();
        let to_a = ends.sessions.config_for(a);
        assert!(Arc::ptr_eq(&to_a, &ends.sessions.config_for(a)));
        assert_eq!(handshake(&to_a, &ends.server), HandshakeKind::Full);
        assert_eq!(handshake(&to_a, &ends.server), HandshakeKind::Resumed);
        // Another upstream has its own tickets: none yet.
        let to_b = ends.sessions.config_for(b);
        assert_eq!(handshake(&to_b, &ends.server), HandshakeKind::Full);
        assert_eq!(handshake(&to_b, &ends.server), HandshakeKind::Resumed);

        // Our SVID rotates: the tickets carry the old certificate, so they
        // go, although the server would still open them.
        publish(&ends.client_store, &ends.ca, WEB, Duration::from_secs(3600));
        assert_eq!(handshake(&to_a, &ends.server), HandshakeKind::Full);
        assert_eq!(handshake(&to_a, &ends.server), HandshakeKind::Resumed);

        assert_eq!(handshake(&to_b, &ends.server), HandshakeKind::Full);
        assert_eq!(handshake(&to_b, &ends.server), HandshakeKind::Resumed);

        // `forget` drops one upstream's tickets, not the other's.
        ends.sessions.forget(a);
        assert_eq!(handshake(&to_a, &ends.server), HandshakeKind::Full);
        assert_eq!(handshake(&to_b, &ends.server), HandshakeKind::Resumed);
    }

    /// Each handshake brings one ticket back, and the client keeps enough
    /// of them for a burst of concurrent connections: the burst after a
    /// burst of the same size resumes in full.
    #[test]
    fn one_ticket_per_handshake_and_enough_kept_for_a_burst() {
        let ends = ends();
        let to_a = ends.sessions.config_for("127.0.0.1:1001".parse().unwrap());
        assert_eq!(handshake(&to_a, &ends.server), HandshakeKind::Full);
        let (first, second) = (start(&to_a), start(&to_a));
        assert_eq!(finish(first, &ends.server), HandshakeKind::Resumed);
        assert_eq!(
            finish(second, &ends.server),
            HandshakeKind::Full,
            "more than one ticket per handshake"
        );

        // wrk's 64 connections in lockstep, and more: all start before any
        // finishes, as when every connection of a pool reconnects at once.
        for burst in [64, 200] {
            let started: Vec<_> = (0..burst).map(|_| start(&to_a)).collect();
            let kinds: Vec<_> = started
                .into_iter()
                .map(|c| finish(c, &ends.server))
                .collect();
            assert!(kinds.contains(&HandshakeKind::Full), "burst of {burst}");
            let started: Vec<_> = (0..burst).map(|_| start(&to_a)).collect();
            for c in started {
                assert_eq!(
                    finish(c, &ends.server),
                    HandshakeKind::Resumed,
                    "second burst of {burst}"
                );
            }
        }
    }

    #[test]
    fn a_disabled_client_never_resumes() {
        let ends = ends();
        let off = ClientResumption::new(
            Arc::clone(&ends.sessions.base),
            Arc::clone(&ends.client_store),
            false,
        );
        let config = off.config_for("127.0.0.1:1001".parse().unwrap());
        for _ in 0..3 {
            assert_eq!(handshake(&config, &ends.server), HandshakeKind::Full);
        }
    }
}
