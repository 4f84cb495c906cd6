//! A mutual TLS 1.3 handshake in memory, with the configs the tunnel ends
//! use (`tls::config::client_config` / `server_config`: SPIFFE
//! verification and authorization in both directions), so the CPU cost of
//! one new tunnelled connection's handshake (both sides, no sockets) can be
//! read directly: new connections per second on N cores are bounded by
//! about N / (this time + the proxies' other per-connection work).
//!
//! Two cases: a full handshake (the client config without a session
//! cache), and a resumed one (the outbound's per-upstream session cache,
//! `tls::resumption::ClientResumption`, against the inbound's bounded
//! ticket issuer). rustls runs no certificate verifier on resumption; the
//! tunnel adds one `verify_svid_chain` (see the verify bench) per resumed
//! connection to re-check the peer, which this bench does not include.
//!
//! Run: `cargo bench --bench handshake`

#[path = "../tests/common/certs.rs"]
mod certs;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, Criterion};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, ServerName};
use spiffe_tunnel::config::MinTls;
use spiffe_tunnel::identity::{Identity, IdentityStore, Svid, SvidSelector};
use spiffe_tunnel::policy::{parse_rule, Policy};
use spiffe_tunnel::spiffe_id::{self, SpiffeId};
use spiffe_tunnel::tls::config::{client_config, provider, server_config, TlsSettings};
use spiffe_tunnel::tls::resumption::ClientResumption;

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";

fn id(s: &str) -> SpiffeId {
    spiffe_id::parse(s).expect("SPIFFE ID")
}

fn policy(allow: &str) -> Arc<ArcSwap<Policy>> {
    let rule = parse_rule(allow).expect("rule").expect("rule");
    Arc::new(ArcSwap::from_pointee(Policy::compile([rule])))
}

/// One store holding both SVIDs, as one process fed by the dev agent.
fn store() -> Arc<IdentityStore> {
    let ca = certs::Ca::new("example.org");
    let provider = provider();
    let svids = [WEB, API]
        .iter()
        .map(|who| {
            let leaf = ca.leaf(who);
            let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key");
            Svid::from_der(leaf.chain_der.clone(), key, &provider).expect("SVID")
        })
        .collect();
    let store = IdentityStore::new();
    store.publish(Identity::new(svids, ca.bundle_set(), SystemTime::now()).expect("identity"));
    store
}

fn settings(store: &Arc<IdentityStore>, ours: &str, allow: &str) -> TlsSettings {
    TlsSettings {
        store: Arc::clone(store),
        policy: policy(allow),
        svid: SvidSelector::by_id(id(ours)),
        min_tls: MinTls::Tls13,
        session_resumption: true,
    }
}

/// Drives a handshake between the two configs in memory, including the
/// server's post-handshake session ticket when it sends one.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> ClientConnection {
    let name = ServerName::IpAddress(IpAddr::from([127, 0, 0, 1]).into());
    let mut c = ClientConnection::new(Arc::clone(client), name).expect("client");
    let mut s = ServerConnection::new(Arc::clone(server)).expect("server");
    let mut wire = Vec::with_capacity(8192);
    for _ in 0..16 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return c;
        }
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).expect("client write");
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).expect("server read");
            s.process_new_packets().expect("server handshake");
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).expect("server write");
        }
        let mut rd = &wire[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).expect("client read");
            c.process_new_packets().expect("client handshake");
        }
    }
    panic!("the handshake did not finish");
}

fn bench_handshake(c: &mut Criterion) {
    let store = store();
    let client = client_config(&settings(&store, WEB, API)).expect("client config");
    let server = server_config(&settings(&store, API, WEB)).expect("server config");
    let sessions = ClientResumption::new(Arc::clone(&client), Arc::clone(&store), true);
    let resuming_client = sessions.config_for("127.0.0.1:8443".parse().expect("address"));
    let tunnel = (client, Arc::clone(&server));
    let resuming = (resuming_client, server);
    let mut group = c.benchmark_group("mtls13_handshake");
    for (name, (client, server), expect) in [
        ("full", &tunnel, HandshakeKind::Full),
        ("resumed", &resuming, HandshakeKind::Resumed),
    ] {
        handshake(client, server); // primes the session cache when there is one
        let done = handshake(client, server);
        eprintln!(
            "{name}: {:?} handshake, {:?}, key exchange {:?}",
            done.handshake_kind(),
            done.negotiated_cipher_suite().map(|s| s.suite()),
            done.negotiated_key_exchange_group().map(|g| g.name())
        );
        assert_eq!(done.handshake_kind(), Some(expect), "{name}");
        group.bench_function(name, |b| b.iter(|| handshake(client, server)));
    }
    group.finish();
}

criterion_group!(benches, bench_handshake);
criterion_main!(benches);
