//! Verifying a peer's X509-SVID chain: what every full handshake runs once
//! per direction (`SpiffeVerifier` calls `verify_svid_chain`), split into the
//! SPIFFE leaf rules (x509-parser) and the whole check (rules + webpki path
//! building and signature verification).
//!
//! Run: `cargo bench --bench verify`

#[path = "../tests/common/certs.rs"]
mod certs;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use spiffe_tunnel::identity::x509svid;
use spiffe_tunnel::tls::verify::{to_unix_time, verify_svid_chain, PeerRole};

const WEB: &str = "spiffe://example.org/web";

fn bench_verify(c: &mut Criterion) {
    let ca = certs::Ca::new("example.org");
    let bundles = ca.bundle_set();
    let direct = ca.leaf(WEB);
    let mid = ca.intermediate();
    let via_intermediate = mid.leaf(WEB);
    let now = to_unix_time(std::time::SystemTime::now());

    for (name, leaf) in [
        ("leaf_root", &direct),
        ("leaf_intermediate_root", &via_intermediate),
    ] {
        let chain = leaf.chain_der.clone();
        let peer =
            verify_svid_chain(&chain, &bundles, now, PeerRole::Client).expect("chain verifies");
        assert_eq!(peer.id.to_string(), WEB);
        c.bench_function(&format!("verify_svid_chain/{name}"), |b| {
            b.iter(|| {
                verify_svid_chain(
                    black_box(&chain),
                    black_box(&bundles),
                    now,
                    PeerRole::Client,
                )
                .expect("chain verifies")
            })
        });
    }

    // The X509-SVID leaf rules alone (parse + SAN/KU/BC checks), the part
    // that is ours rather than webpki's.
    let leaf_der = direct.leaf_der().clone();
    c.bench_function("x509svid_check_leaf", |b| {
        b.iter(|| x509svid::check_leaf(black_box(&leaf_der)).expect("valid leaf"))
    });
}

criterion_group!(benches, bench_verify);
criterion_main!(benches);
