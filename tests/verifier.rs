//! Peer chain verification against the SPIFFE X509-SVID rules and the
//! trust bundle of the peer's own trust domain (`tls::verify`), plus the
//! rule checks it relies on (`identity::x509svid`) and `Svid::from_pem`.
//!
//! Every refusal test asserts the precise error, and most carry a positive
//! control built the same way minus the one defect, so a test cannot pass
//! because the fixture is broken in some other way.

#[path = "common/certs.rs"]
mod certs;

use std::time::Duration;

use certs::{
    bundle_set, dns_san, trust_bundle, uri_san, Ca, ExtendedKeyUsagePurpose, IsCa, KeySpec,
    KeyUsagePurpose, Leaf,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe_tunnel::identity::x509svid::{check_leaf, check_signer, SvidRuleError};
use spiffe_tunnel::identity::{BundleSet, IdentityError, Svid};
use spiffe_tunnel::spiffe_id::IdError;
use spiffe_tunnel::tls::verify::{verify_svid_chain, PeerRole, VerifiedPeer, VerifyError};
use x509_parser::prelude::{FromDer, X509Certificate};

const TD: &str = "example.org";
const WEB: &str = "spiffe://example.org/web";
const ALL_ROLES: [PeerRole; 3] = [PeerRole::Client, PeerRole::Server, PeerRole::Any];

fn verify_at(
    leaf: &Leaf,
    bundles: &BundleSet,
    now: UnixTime,
    role: PeerRole,
) -> Result<VerifiedPeer, VerifyError> {
    verify_svid_chain(&leaf.chain_der, bundles, now, role)
}

fn verify(leaf: &Leaf, bundles: &BundleSet, role: PeerRole) -> Result<VerifiedPeer, VerifyError> {
    verify_at(leaf, bundles, UnixTime::now(), role)
}

/// Verifies for every role and requires success with the leaf's own ID.
fn assert_verifies(leaf: &Leaf, bundles: &BundleSet) {
    for role in ALL_ROLES {
        match verify(leaf, bundles, role) {
            Ok(peer) => assert_eq!(peer.id.to_string(), leaf.id, "{role:?}"),
            Err(e) => panic!("{} refused for {role:?}: {e}", leaf.id),
        }
    }
}

/// The SVID-rule error of a leaf refused by `check_leaf` (any role).
fn leaf_rule_error(leaf: &Leaf, bundles: &BundleSet) -> SvidRuleError {
    let mut errors = ALL_ROLES
        .iter()
        .map(|&role| match verify(leaf, bundles, role) {
            Err(VerifyError::Leaf(e)) => e,
            other => panic!("expected VerifyError::Leaf for {role:?}, got {other:?}"),
        });
    let first = errors.next().unwrap();
    for other in errors {
        assert_eq!(other, first, "the leaf rules do not depend on the role");
    }
    first
}

/// The reason of an `Untrusted` refusal, after checking its ID and domain.
fn untrusted_reason(result: Result<VerifiedPeer, VerifyError>, id: &str, td: &str) -> String {
    match result {
        Err(VerifyError::Untrusted {
            id: got_id,
            trust_domain,
            reason,
        }) => {
            assert_eq!(got_id, id);
            assert_eq!(trust_domain, td);
            reason
        }
        other => panic!("expected VerifyError::Untrusted, got {other:?}"),
    }
}

fn subject_raw(der: &CertificateDer<'_>) -> Vec<u8> {
    let (_, cert) = X509Certificate::from_der(der).expect("parse certificate");
    cert.subject().as_raw().to_vec()
}

fn spki_algorithm(der: &CertificateDer<'_>) -> String {
    let (_, cert) = X509Certificate::from_der(der).expect("parse certificate");
    cert.public_key().algorithm.algorithm.to_id_string()
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

// ---------------------------------------------------------------------------
// Good chains

#[test]
fn good_leaf_directly_under_root_verifies_for_every_role() {
    let ca = Ca::new(TD);
    let leaf = ca.leaf(WEB);
    assert_eq!(leaf.chain_der.len(), 1);
    let bundles = ca.bundle_set();
    assert_verifies(&leaf, &bundles);

    let peer = verify(&leaf, &bundles, PeerRole::Client).unwrap();
    let facts = check_leaf(leaf.leaf_der()).unwrap();
    assert_eq!(peer.id.trust_domain().as_str(), TD);
    assert_eq!(peer.id.path(), "/web");
    assert_eq!(peer.serial, facts.serial);
    assert_eq!(peer.not_after, facts.not_after);
}

#[test]
fn good_leaf_via_intermediate_verifies_for_every_role() {
    let root = Ca::new(TD);
    let intermediate = root.intermediate();
    let leaf = intermediate.leaf("spiffe://example.org/ns/prod/sa/api");
    assert_eq!(leaf.chain_der.len(), 2);
    assert_eq!(&leaf.chain_der[1], intermediate.cert_der());
    assert_verifies(&leaf, &root.bundle_set());
}

#[test]
fn good_leaf_via_two_intermediates_verifies() {
    let root = Ca::new(TD);
    let leaf = root.intermediate().intermediate().leaf(WEB);
    assert_eq!(leaf.chain_der.len(), 3);
    assert_verifies(&leaf, &root.bundle_set());
}

#[test]
fn leaf_via_intermediate_without_the_intermediate_is_untrusted() {
    let root = Ca::new(TD);
    let leaf = root.intermediate().leaf(WEB);
    let bare = Leaf {
        chain_der: leaf.chain_der[..1].to_vec(),
        ..leaf.clone()
    };
    assert_verifies(&leaf, &root.bundle_set());
    untrusted_reason(verify(&bare, &root.bundle_set(), PeerRole::Any), WEB, TD);
}

#[test]
fn rsa_2048_leaf_is_accepted() {
    let ca = Ca::new(TD);
    let leaf = ca.leaf_builder(WEB).key(KeySpec::Rsa(2048)).build();
    assert_eq!(spki_algorithm(leaf.leaf_der()), "1.2.840.113549.1.1.1");
    assert_verifies(&leaf, &ca.bundle_set());
}

#[test]
fn p384_and_ed25519_leaves_are_accepted() {
    let ca = Ca::new(TD);
    for key in [KeySpec::EcdsaP384, KeySpec::Ed25519] {
        let leaf = ca.leaf_builder(WEB).key(key).build();
        assert_verifies(&leaf, &ca.bundle_set());
    }
}

#[test]
fn either_ca_of_a_rotating_bundle_verifies_its_leaves() {
    let old = Ca::new(TD);
    let new = Ca::new(TD);
    let bundles = bundle_set([trust_bundle(TD, &[&old, &new])]);
    assert_verifies(&old.leaf(WEB), &bundles);
    assert_verifies(&new.leaf(WEB), &bundles);
    assert_verifies(&new.intermediate().leaf(WEB), &bundles);

    // Control: a third CA of the same domain is not in the bundle.
    let stranger = Ca::new(TD);
    untrusted_reason(
        verify(&stranger.leaf(WEB), &bundles, PeerRole::Any),
        WEB,
        TD,
    );
}

// ---------------------------------------------------------------------------
// Leaf basic constraints and key usage

#[test]
fn leaf_that_is_a_ca_is_refused() {
    let ca = Ca::new(TD);
    let leaf = ca
        .leaf_builder(WEB)
        .basic_constraints(IsCa::Ca(certs::BasicConstraints::Unconstrained))
        .key_usages(vec![KeyUsagePurpose::DigitalSignature])
        .build();
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::LeafIsCa
    );
}

#[test]
fn leaf_without_basic_constraints_is_accepted() {
    // CA:false may be implied by leaving the extension out.
    let ca = Ca::new(TD);
    let leaf = ca.leaf_builder(WEB).basic_constraints(IsCa::NoCa).build();
    assert_verifies(&leaf, &ca.bundle_set());
}

#[test]
fn leaf_without_digital_signature_is_refused() {
    let ca = Ca::new(TD);
    let leaf = ca
        .leaf_builder(WEB)
        .key_usages(vec![
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ])
        .build();
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::LeafNoDigitalSignature
    );
}

#[test]
fn leaf_with_key_cert_sign_is_refused() {
    let ca = Ca::new(TD);
    let leaf = ca
        .leaf_builder(WEB)
        .key_usages(vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ])
        .build();
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::LeafKeyCertSign
    );
}

#[test]
fn leaf_with_crl_sign_is_refused() {
    let ca = Ca::new(TD);
    let leaf = ca
        .leaf_builder(WEB)
        .key_usages(vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ])
        .build();
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::LeafCrlSign
    );
}

#[test]
fn leaf_without_key_usage_extension_is_refused() {
    let ca = Ca::new(TD);
    let leaf = ca.leaf_builder(WEB).key_usages(vec![]).build();
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::LeafNoKeyUsage
    );
}

// ---------------------------------------------------------------------------
// The SPIFFE ID in the URI SAN

#[test]
fn leaf_with_only_a_dns_san_is_refused() {
    let ca = Ca::new(TD);
    let leaf = ca
        .leaf_builder(WEB)
        .sans(vec![dns_san("web.example.org")])
        .build();
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::NoUriSan
    );
}

#[test]
fn leaf_without_any_san_is_refused() {
    let ca = Ca::new(TD);
    let leaf = ca.leaf_builder(WEB).sans(vec![]).build();
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::NoUriSan
    );
}

#[test]
fn leaf_with_a_dns_san_beside_its_uri_san_is_accepted() {
    let ca = Ca::new(TD);
    let leaf = ca
        .leaf_builder(WEB)
        .sans(vec![dns_san("web.example.org"), uri_san(WEB)])
        .build();
    assert_verifies(&leaf, &ca.bundle_set());
}

#[test]
fn leaf_with_two_uri_sans_is_refused() {
    let ca = Ca::new(TD);
    let leaf = ca
        .leaf_builder(WEB)
        .uri_sans(&[WEB, "spiffe://example.org/db"])
        .build();
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::ManyUriSans(2)
    );
}

#[test]
fn leaf_with_an_https_uri_san_is_refused() {
    let ca = Ca::new(TD);
    let uri = "https://example.org/web";
    let leaf = ca.leaf_builder(uri).build();
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::BadId {
            uri: uri.into(),
            reason: IdError::Scheme
        }
    );
}

#[test]
fn leaf_with_a_root_id_is_refused() {
    let ca = Ca::new(TD);
    let uri = "spiffe://example.org";
    let leaf = ca.leaf_builder(uri).build();
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::BadId {
            uri: uri.into(),
            reason: IdError::RootId(uri.into())
        }
    );
}

#[test]
fn leaf_with_an_upper_case_trust_domain_is_refused() {
    let ca = Ca::new(TD);
    let uri = "spiffe://Example.org/web";
    let leaf = ca.leaf_builder(uri).build();
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::BadId {
            uri: uri.into(),
            reason: IdError::UpperCaseTrustDomain
        }
    );
}

// ---------------------------------------------------------------------------
// Which bundle vouches for the peer

#[test]
fn ca_of_one_trust_domain_cannot_vouch_for_another() {
    let ca_a = Ca::new("example.org");
    let ca_b = Ca::new("other.org");
    let bundles = bundle_set([ca_a.trust_bundle(), ca_b.trust_bundle()]);
    let id_b = "spiffe://other.org/web";

    // Controls: each CA vouches for its own domain in this bundle set.
    assert_verifies(&ca_a.leaf(WEB), &bundles);
    assert_verifies(&ca_b.leaf(id_b), &bundles);

    let forged = ca_a.leaf(id_b);
    for role in ALL_ROLES {
        untrusted_reason(verify(&forged, &bundles, role), id_b, "other.org");
    }
}

#[test]
fn foreign_ca_sent_as_intermediate_cannot_vouch_for_another_domain() {
    let root_a = Ca::new("example.org");
    let ca_b = Ca::new("other.org");
    let bundles = bundle_set([root_a.trust_bundle(), ca_b.trust_bundle()]);
    let id_b = "spiffe://other.org/web";

    let intermediate_a = root_a.intermediate();
    assert_verifies(&intermediate_a.leaf(WEB), &bundles);

    // The chain carries A's intermediate and A's root, all valid signers.
    let mut forged = intermediate_a.leaf(id_b);
    forged.chain_der.push(root_a.cert_der().clone());
    untrusted_reason(verify(&forged, &bundles, PeerRole::Any), id_b, "other.org");
}

#[test]
fn id_of_a_trust_domain_without_bundle_is_refused() {
    let ca = Ca::new(TD);
    let leaf = ca.leaf("spiffe://unknown.org/web");
    for role in ALL_ROLES {
        assert_eq!(
            verify(&leaf, &ca.bundle_set(), role),
            Err(VerifyError::NoBundle {
                id: "spiffe://unknown.org/web".into(),
                trust_domain: "unknown.org".into(),
            })
        );
    }
}

#[test]
fn no_bundles_at_all_is_no_bundle() {
    let ca = Ca::new(TD);
    assert!(matches!(
        verify(&ca.leaf(WEB), &BundleSet::new(), PeerRole::Any),
        Err(VerifyError::NoBundle { trust_domain, .. }) if trust_domain == TD
    ));
}

#[test]
fn rogue_ca_with_the_trusted_subject_is_untrusted() {
    let trusted = Ca::new(TD);
    let rogue = Ca::new(TD);
    // Same name and key type; only the key differs.
    assert_eq!(
        subject_raw(trusted.cert_der()),
        subject_raw(rogue.cert_der())
    );
    assert_eq!(
        spki_algorithm(trusted.cert_der()),
        spki_algorithm(rogue.cert_der())
    );
    assert_ne!(trusted.cert_der(), rogue.cert_der());

    let bundles = trusted.bundle_set();
    assert_verifies(&trusted.leaf(WEB), &bundles);
    let forged = rogue.leaf(WEB);
    for role in ALL_ROLES {
        untrusted_reason(verify(&forged, &bundles, role), WEB, TD);
    }
    // Sending the rogue root along does not help.
    let mut with_root = forged.clone();
    with_root.chain_der.push(rogue.cert_der().clone());
    untrusted_reason(verify(&with_root, &bundles, PeerRole::Any), WEB, TD);
}

// ---------------------------------------------------------------------------
// Validity period

#[test]
fn expired_leaf_is_refused() {
    let ca = Ca::new(TD);
    let leaf = ca.leaf(WEB);
    let bundles = ca.bundle_set();
    // Control: valid until LEAF_TTL from now.
    let almost = certs::unix_time_in(certs::LEAF_TTL - Duration::from_secs(60));
    assert!(verify_at(&leaf, &bundles, almost, PeerRole::Any).is_ok());

    let later = certs::unix_time_in(certs::LEAF_TTL + Duration::from_secs(60));
    for role in ALL_ROLES {
        let reason = untrusted_reason(verify_at(&leaf, &bundles, later, role), WEB, TD);
        assert!(reason.contains("expired"), "{reason}");
    }
}

#[test]
fn not_yet_valid_leaf_is_refused() {
    let ca = Ca::new(TD);
    let leaf = ca.leaf(WEB);
    let bundles = ca.bundle_set();
    let earlier = certs::unix_time_ago(Duration::from_secs(600));
    for role in ALL_ROLES {
        let reason = untrusted_reason(verify_at(&leaf, &bundles, earlier, role), WEB, TD);
        assert!(reason.contains("not valid yet"), "{reason}");
    }
}

#[test]
fn leaf_built_expired_is_refused_now() {
    let ca = Ca::new(TD);
    let now = certs::now();
    let leaf = ca
        .leaf_builder(WEB)
        .validity(
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .build();
    let reason = untrusted_reason(verify(&leaf, &ca.bundle_set(), PeerRole::Any), WEB, TD);
    assert!(reason.contains("expired"), "{reason}");
}

// ---------------------------------------------------------------------------
// Signing certificates

#[test]
fn intermediate_that_is_not_a_ca_is_refused() {
    let root = Ca::new(TD);
    let intermediate = root.intermediate_with(|p| p.is_ca = IsCa::ExplicitNoCa);
    let leaf = intermediate.leaf(WEB);
    for role in ALL_ROLES {
        assert!(
            matches!(
                verify(&leaf, &root.bundle_set(), role),
                Err(VerifyError::Signer {
                    index: 1,
                    source: SvidRuleError::SignerNotCa { .. }
                })
            ),
            "{role:?}"
        );
    }
}

#[test]
fn intermediate_without_key_cert_sign_is_refused() {
    let root = Ca::new(TD);
    let intermediate = root.intermediate_with(|p| {
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign]
    });
    let leaf = intermediate.leaf(WEB);
    for role in ALL_ROLES {
        assert!(
            matches!(
                verify(&leaf, &root.bundle_set(), role),
                Err(VerifyError::Signer {
                    index: 1,
                    source: SvidRuleError::SignerNoKeyCertSign { .. }
                })
            ),
            "{role:?}"
        );
    }
}

#[test]
fn bad_second_intermediate_is_reported_by_its_chain_index() {
    let root = Ca::new(TD);
    let leaf = root
        .intermediate_with(|p| p.key_usages = vec![KeyUsagePurpose::CrlSign])
        .intermediate()
        .leaf(WEB);
    assert!(matches!(
        verify(&leaf, &root.bundle_set(), PeerRole::Any),
        Err(VerifyError::Signer {
            index: 2,
            source: SvidRuleError::SignerNoKeyCertSign { .. }
        })
    ));
}

#[test]
fn check_signer_and_check_leaf_tell_cas_from_leaves() {
    let root = Ca::new(TD);
    let intermediate = root.intermediate();
    let leaf = intermediate.leaf(WEB);
    assert!(check_signer(root.cert_der()).is_ok());
    let validity = check_signer(intermediate.cert_der()).unwrap();
    assert!(validity.not_before < validity.not_after);
    assert!(matches!(
        check_signer(leaf.leaf_der()),
        Err(SvidRuleError::SignerNotCa { .. })
    ));
    assert_eq!(check_leaf(leaf.leaf_der()).unwrap().id.to_string(), WEB);
    // A CA has no workload ID in its URI SAN (spiffe://example.org).
    assert!(matches!(
        check_leaf(intermediate.cert_der()),
        Err(SvidRuleError::BadId {
            reason: IdError::RootId(_),
            ..
        })
    ));
}

// ---------------------------------------------------------------------------
// Key and signature strength

#[test]
fn rsa_1024_leaf_is_refused_as_weak() {
    let ca = Ca::new(TD);
    let leaf = ca.leaf_builder(WEB).key(KeySpec::Rsa(1024)).build();
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::WeakRsaKey {
            which: "leaf".into(),
            bits: 1024
        }
    );
}

#[test]
fn sha1_signed_leaf_is_refused_as_weak() {
    let ca = Ca::new(TD);
    // Control: the same openssl path with SHA-256 makes a good SVID.
    assert_verifies(&ca.leaf_signed_by_openssl(WEB, "sha256"), &ca.bundle_set());

    let leaf = ca.leaf_signed_by_openssl(WEB, "sha1");
    assert_eq!(
        leaf_rule_error(&leaf, &ca.bundle_set()),
        SvidRuleError::WeakSignature {
            which: "leaf".into(),
            algorithm: "ecdsa-with-SHA1"
        }
    );
}

// ---------------------------------------------------------------------------
// Extended key usage and the peer's role

#[test]
fn server_auth_only_leaf_is_a_server_not_a_client() {
    let ca = Ca::new(TD);
    let bundles = ca.bundle_set();
    let leaf = ca
        .leaf_builder(WEB)
        .extended_key_usages(vec![ExtendedKeyUsagePurpose::ServerAuth])
        .build();
    assert_eq!(
        verify(&leaf, &bundles, PeerRole::Server)
            .unwrap()
            .id
            .to_string(),
        WEB
    );
    assert!(verify(&leaf, &bundles, PeerRole::Any).is_ok());
    let reason = untrusted_reason(verify(&leaf, &bundles, PeerRole::Client), WEB, TD);
    assert!(reason.contains("extended key usage"), "{reason}");
}

#[test]
fn client_auth_only_leaf_is_a_client_not_a_server() {
    let ca = Ca::new(TD);
    let bundles = ca.bundle_set();
    let leaf = ca
        .leaf_builder(WEB)
        .extended_key_usages(vec![ExtendedKeyUsagePurpose::ClientAuth])
        .build();
    assert_eq!(
        verify(&leaf, &bundles, PeerRole::Client)
            .unwrap()
            .id
            .to_string(),
        WEB
    );
    assert!(verify(&leaf, &bundles, PeerRole::Any).is_ok());
    let reason = untrusted_reason(verify(&leaf, &bundles, PeerRole::Server), WEB, TD);
    assert!(reason.contains("extended key usage"), "{reason}");
}

#[test]
fn leaf_with_an_unrelated_eku_is_refused_for_every_role() {
    let ca = Ca::new(TD);
    let leaf = ca
        .leaf_builder(WEB)
        .extended_key_usages(vec![ExtendedKeyUsagePurpose::CodeSigning])
        .build();
    for role in ALL_ROLES {
        let reason = untrusted_reason(verify(&leaf, &ca.bundle_set(), role), WEB, TD);
        assert!(reason.contains("extended key usage"), "{role:?}: {reason}");
    }
}

#[test]
fn leaf_without_eku_extension_is_accepted_for_every_role() {
    // The EKU is checked only when the leaf has the extension.
    let ca = Ca::new(TD);
    let leaf = ca.leaf_builder(WEB).extended_key_usages(vec![]).build();
    assert_verifies(&leaf, &ca.bundle_set());
}

// ---------------------------------------------------------------------------
// Degenerate input

#[test]
fn empty_chain_is_no_certificate() {
    let ca = Ca::new(TD);
    for role in ALL_ROLES {
        assert_eq!(
            verify_svid_chain(&[], &ca.bundle_set(), UnixTime::now(), role),
            Err(VerifyError::NoCertificate)
        );
    }
}

#[test]
fn garbage_leaf_is_malformed() {
    let ca = Ca::new(TD);
    let garbage = CertificateDer::from(b"\x30\x82\x01\x00 definitely not a certificate".to_vec());
    assert!(matches!(
        verify_svid_chain(&[garbage], &ca.bundle_set(), UnixTime::now(), PeerRole::Any),
        Err(VerifyError::Leaf(SvidRuleError::Malformed(_)))
    ));
}

#[test]
fn leaf_with_trailing_bytes_is_malformed() {
    let ca = Ca::new(TD);
    let leaf = ca.leaf(WEB);
    let mut bytes = leaf.leaf_der().to_vec();
    bytes.push(0);
    assert!(matches!(
        verify_svid_chain(
            &[CertificateDer::from(bytes)],
            &ca.bundle_set(),
            UnixTime::now(),
            PeerRole::Any
        ),
        Err(VerifyError::Leaf(SvidRuleError::Malformed(_)))
    ));
}

#[test]
fn garbage_intermediate_is_a_malformed_signer() {
    let root = Ca::new(TD);
    let mut leaf = root.intermediate().leaf(WEB);
    leaf.chain_der[1] = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    assert!(matches!(
        verify(&leaf, &root.bundle_set(), PeerRole::Any),
        Err(VerifyError::Signer {
            index: 1,
            source: SvidRuleError::Malformed(_)
        })
    ));
}

// ---------------------------------------------------------------------------
// Our own SVID from PEM

#[test]
fn svid_from_pem_with_a_foreign_key_is_key_mismatch() {
    let ca = Ca::new(TD);
    let leaf = ca.leaf(WEB);
    let other = ca.leaf("spiffe://example.org/other");
    match Svid::from_pem(
        leaf.chain_pem.as_bytes(),
        other.key_pem.as_bytes(),
        &provider(),
    ) {
        Err(IdentityError::KeyMismatch { id }) => assert_eq!(id, WEB),
        other => panic!("expected KeyMismatch, got {other:?}"),
    }
}

#[test]
fn svid_from_pem_with_its_key_loads() {
    let ca = Ca::new(TD);
    let now = certs::now();
    let not_after = now + Duration::from_secs(1800);
    let leaf = ca
        .intermediate()
        .leaf_builder(WEB)
        .serial(&[0x1a, 0x2b, 0x3c, 0x4d])
        .validity(now - Duration::from_secs(60), not_after)
        .build();
    let svid = Svid::from_pem(
        leaf.chain_pem.as_bytes(),
        leaf.key_pem.as_bytes(),
        &provider(),
    )
    .expect("valid SVID");
    assert_eq!(svid.id.to_string(), WEB);
    assert_eq!(svid.serial, "1a2b3c4d");
    assert_eq!(svid.not_after, not_after);
    assert_eq!(svid.not_before, now - Duration::from_secs(60));
    assert_eq!(svid.chain(), leaf.chain_der.as_slice());
    assert!(svid.is_valid_at(now));
}

#[test]
fn svid_from_pem_applies_the_leaf_rules() {
    let ca = Ca::new(TD);
    let leaf = ca.leaf_builder(WEB).key_usages(vec![]).build();
    assert!(matches!(
        Svid::from_pem(
            leaf.chain_pem.as_bytes(),
            leaf.key_pem.as_bytes(),
            &provider()
        ),
        Err(IdentityError::Leaf(SvidRuleError::LeafNoKeyUsage))
    ));
}

#[test]
fn svid_files_are_written_for_other_tests() {
    let ca = Ca::new(TD);
    let leaf = ca.intermediate().leaf(WEB);
    let dir = tempfile::tempdir().unwrap();
    let files = leaf.write_files(dir.path());
    let chain = std::fs::read(&files.svid).unwrap();
    let key = std::fs::read(&files.key).unwrap();
    let svid = Svid::from_pem(&chain, &key, &provider()).unwrap();
    assert_eq!(svid.chain().len(), 2);
    let bundle = spiffe_tunnel::identity::TrustBundle::from_pem(
        spiffe_tunnel::spiffe_id::parse_trust_domain(TD).unwrap(),
        &std::fs::read(&files.bundle).unwrap(),
    )
    .unwrap();
    assert_eq!(bundle.certs, vec![ca.cert_der().clone()]);
    let peer = verify_svid_chain(
        svid.chain(),
        &bundle_set([bundle]),
        UnixTime::now(),
        PeerRole::Any,
    );
    assert_eq!(peer.unwrap().id.to_string(), WEB);
}

#[test]
fn leaf_with_a_weak_or_unsupported_ec_curve_is_refused() {
    // webpki never looks at the leaf's own key during path validation, so
    // the curve check in the leaf rules is all that stops a P-192 or
    // secp256k1 leaf from passing verify_svid_chain (and `verify`).
    let ca = Ca::new(TD);
    // Control: the same openssl path with P-256 verifies.
    let p256 = certs::openssl_ec_key_pem("prime256v1");
    assert_verifies(
        &ca.leaf_signed_by_openssl_with_key(WEB, "sha256", &p256),
        &ca.bundle_set(),
    );
    for curve in ["prime192v1", "secp224r1", "secp256k1"] {
        let key = certs::openssl_ec_key_pem(curve);
        let leaf = ca.leaf_signed_by_openssl_with_key(WEB, "sha256", &key);
        let result = verify(&leaf, &ca.bundle_set(), PeerRole::Any);
        // Refused by the leaf rules (UnsupportedKey or a new weak-key
        // variant), not later by a generic path-validation error.
        assert!(
            matches!(
                &result,
                Err(VerifyError::Leaf(SvidRuleError::UnsupportedKey { .. }))
            ),
            "{curve} leaf: {result:?}"
        );
    }
}
