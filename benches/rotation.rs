//! What a rotation builds: each new SVID is parsed and checked
//! (`Svid::from_der`: X509-SVID rules, key parse, key/cert match) and the
//! snapshot validated (`Identity::new`: chains to its own bundle), then
//! published with one atomic swap. The TLS configs are built once per
//! tunnel and not on rotation; building them is measured here for
//! comparison, to show what rebuilding per rotation would cost.
//!
//! Run: `cargo bench --bench rotation`

#[path = "../tests/common/certs.rs"]
mod certs;

use std::hint::black_box;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use spiffe_tunnel::config::MinTls;
use spiffe_tunnel::identity::{Identity, IdentityStore, Svid};
use spiffe_tunnel::policy::{parse_rule, Policy};
use spiffe_tunnel::tls::config::{client_config, provider, server_config, TlsSettings};

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";

fn bench_rotation(c: &mut Criterion) {
    let ca = certs::Ca::new("example.org");
    let bundles = ca.bundle_set();
    let provider = provider();
    let leaves = [ca.leaf(WEB), ca.leaf(API)];
    let key_of = |leaf: &certs::Leaf| {
        PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("PKCS#8 key")
    };

    let web = &leaves[0];
    c.bench_function("rotation/svid_from_der", |b| {
        b.iter_batched(
            || (web.chain_der.clone(), key_of(web)),
            |(chain, key)| Svid::from_der(chain, key, &provider).expect("valid SVID"),
            BatchSize::SmallInput,
        )
    });

    // A whole Workload API message's worth: two SVIDs and the bundle,
    // validated as one snapshot and published.
    let store = IdentityStore::new();
    c.bench_function("rotation/identity_two_svids_publish", |b| {
        b.iter_batched(
            || {
                leaves
                    .iter()
                    .map(|l| (l.chain_der.clone(), key_of(l)))
                    .collect::<Vec<_>>()
            },
            |parts| {
                let svids = parts
                    .into_iter()
                    .map(|(chain, key)| Svid::from_der(chain, key, &provider).expect("valid"))
                    .collect();
                let identity =
                    Identity::new(svids, bundles.clone(), SystemTime::now()).expect("valid");
                store.publish(identity);
            },
            BatchSize::SmallInput,
        )
    });

    // For comparison: the rustls configs, which are built once per tunnel.
    let policy = Policy::compile([parse_rule(WEB).expect("rule").expect("rule")]);
    let settings = TlsSettings {
        store: Arc::clone(&store),
        policy: Arc::new(ArcSwap::from_pointee(policy)),
        svid: spiffe_tunnel::identity::SvidSelector::default(),
        min_tls: MinTls::Tls13,
        session_resumption: true,
    };
    c.bench_function("tls_config/server_config", |b| {
        b.iter(|| server_config(black_box(&settings)).expect("config"))
    });
    c.bench_function("tls_config/client_config", |b| {
        b.iter(|| client_config(black_box(&settings)).expect("config"))
    });
}

criterion_group!(benches, bench_rotation);
criterion_main!(benches);
