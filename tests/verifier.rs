//! Peer chain verification against the SPIFFE X509-SVID rules and the
//! trust bundle of the peer's own trust domain (`tls::verify`), plus the
//! rule checks it relies on (`identity::x509svid`) and `Svid::from_pem`.
//!
//! Every refusal test asserts the precise error, and most carry a positive
//! control built the same way minus the one defect, so a test cannot pass
//! because the fixture is broken in some other way.
//!
//! The chains are data, in `common/svid_cases.rs`: `tests/go_spiffe.rs`
//! runs the very same cases through go-spiffe's verifier and compares.

mod common;

use std::time::Duration;

use common::certs::{self, bundle_set, Ca, Leaf};
use common::svid_cases::{self as cases, variant, KeySpec, Spec, SvidCase};
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe_tunnel::identity::x509svid::{check_leaf, check_signer, SvidRuleError};
use spiffe_tunnel::identity::{BundleSet, IdentityError, Svid};
use spiffe_tunnel::spiffe_id::IdError;
use spiffe_tunnel::tls::verify::{verify_svid_chain, PeerRole, VerifiedPeer, VerifyError};
use x509_parser::prelude::{FromDer, X509Certificate};

const TD: &str = cases::TD;
const WEB: &str = cases::WEB;
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

fn verify_case(case: &SvidCase, role: PeerRole) -> Result<VerifiedPeer, VerifyError> {
    verify_case_at(case, UnixTime::now(), role)
}

fn verify_case_at(
    case: &SvidCase,
    now: UnixTime,
    role: PeerRole,
) -> Result<VerifiedPeer, VerifyError> {
    verify_svid_chain(&case.chain, &case.bundle_set(), now, role)
}

/// Verifies a case for every role and requires success with its own ID.
fn assert_case_verifies(case: &SvidCase) {
    assert_eq!(case.spec, Spec::Valid, "{}", case.name);
    for role in ALL_ROLES {
        match verify_case(case, role) {
            Ok(peer) => assert_eq!(peer.id.to_string(), case.id, "{}: {role:?}", case.name),
            Err(e) => panic!("{} refused for {role:?}: {e}", case.name),
        }
    }
}

/// The SVID-rule error of a case refused by `check_leaf` (any role).
fn case_rule_error(case: &SvidCase) -> SvidRuleError {
    let mut errors = ALL_ROLES.iter().map(|&role| match verify_case(case, role) {
        Err(VerifyError::Leaf(e)) => e,
        other => panic!(
            "{}: expected VerifyError::Leaf for {role:?}, got {other:?}",
            case.name
        ),
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
    let case = cases::leaf_under_root();
    assert_eq!(case.chain.len(), 1);
    assert_case_verifies(&case);

    let peer = verify_case(&case, PeerRole::Client).unwrap();
    let facts = check_leaf(case.leaf_der()).unwrap();
    assert_eq!(peer.id.trust_domain().as_str(), TD);
    assert_eq!(peer.id.path(), "/web");
    assert_eq!(peer.serial, facts.serial);
    assert_eq!(peer.not_after, facts.not_after);
}

#[test]
fn good_leaf_via_intermediate_verifies_for_every_role() {
    let (case, intermediate) = cases::leaf_via_intermediate();
    assert_eq!(case.chain.len(), 2);
    assert_eq!(&case.chain[1], intermediate.cert_der());
    assert_case_verifies(&case);
}

#[test]
fn good_leaf_via_two_intermediates_verifies() {
    let case = cases::leaf_via_two_intermediates();
    assert_eq!(case.chain.len(), 3);
    assert_case_verifies(&case);
}

#[test]
fn leaf_via_intermediate_without_the_intermediate_is_untrusted() {
    let cases = cases::intermediate_not_sent();
    assert_case_verifies(variant(&cases, "sent"));
    let bare = variant(&cases, "bare");
    assert_eq!(bare.chain.len(), 1);
    untrusted_reason(verify_case(bare, PeerRole::Any), WEB, TD);
}

#[test]
fn rsa_2048_leaf_is_accepted() {
    let case = cases::leaf_with_key("rsa-2048-leaf", KeySpec::Rsa(2048));
    assert_eq!(spki_algorithm(case.leaf_der()), "1.2.840.113549.1.1.1");
    assert_case_verifies(&case);
}

#[test]
fn p384_and_ed25519_leaves_are_accepted() {
    for key in [KeySpec::EcdsaP384, KeySpec::Ed25519] {
        assert_case_verifies(&cases::leaf_with_key("leaf", key));
    }
}

#[test]
fn either_ca_of_a_rotating_bundle_verifies_its_leaves() {
    let cases = cases::rotating_bundle();
    for name in ["old-ca", "new-ca", "new-ca-intermediate"] {
        assert_case_verifies(variant(&cases, name));
    }
    // Control: a third CA of the same domain is not in the bundle.
    untrusted_reason(
        verify_case(variant(&cases, "stranger"), PeerRole::Any),
        WEB,
        TD,
    );
}

// ---------------------------------------------------------------------------
// Leaf basic constraints and key usage

#[test]
fn leaf_that_is_a_ca_is_refused() {
    assert_eq!(
        case_rule_error(&cases::leaf_is_ca()),
        SvidRuleError::LeafIsCa
    );
}

#[test]
fn leaf_without_basic_constraints_is_accepted() {
    // CA:false may be implied by leaving the extension out.
    assert_case_verifies(&cases::leaf_without_basic_constraints());
}

#[test]
fn leaf_without_digital_signature_is_refused() {
    assert_eq!(
        case_rule_error(&cases::leaf_without_digital_signature()),
        SvidRuleError::LeafNoDigitalSignature
    );
}

#[test]
fn leaf_with_key_cert_sign_is_refused() {
    assert_eq!(
        case_rule_error(&cases::leaf_with_key_cert_sign()),
        SvidRuleError::LeafKeyCertSign
    );
}

#[test]
fn leaf_with_crl_sign_is_refused() {
    assert_eq!(
        case_rule_error(&cases::leaf_with_crl_sign()),
        SvidRuleError::LeafCrlSign
    );
}

#[test]
fn leaf_without_key_usage_extension_is_refused() {
    assert_eq!(
        case_rule_error(&cases::leaf_without_key_usage()),
        SvidRuleError::LeafNoKeyUsage
    );
}

#[test]
fn leaf_with_a_key_usage_not_marked_critical_is_accepted() {
    // X509-SVID 4.3 asks issuers to mark it critical; validators are not
    // asked to check, and neither spiffe-tunnel nor go-spiffe does.
    let case = cases::leaf_with_non_critical_key_usage();
    let (_, cert) = X509Certificate::from_der(case.leaf_der()).unwrap();
    let ku = cert.key_usage().unwrap().expect("key usage");
    assert!(!ku.critical && ku.value.digital_signature());
    for role in ALL_ROLES {
        assert_eq!(verify_case(&case, role).unwrap().id.to_string(), WEB);
    }
}

// ---------------------------------------------------------------------------
// The SPIFFE ID in the URI SAN

#[test]
fn leaf_with_only_a_dns_san_is_refused() {
    assert_eq!(
        case_rule_error(&cases::leaf_with_only_a_dns_san()),
        SvidRuleError::NoUriSan
    );
}

#[test]
fn leaf_without_any_san_is_refused() {
    assert_eq!(
        case_rule_error(&cases::leaf_without_any_san()),
        SvidRuleError::NoUriSan
    );
}

#[test]
fn leaf_with_a_dns_san_beside_its_uri_san_is_accepted() {
    assert_case_verifies(&cases::leaf_with_dns_and_uri_sans());
}

#[test]
fn leaf_with_two_uri_sans_is_refused() {
    assert_eq!(
        case_rule_error(&cases::leaf_with_two_uri_sans()),
        SvidRuleError::ManyUriSans(2)
    );
}

/// The `BadId` reason of a leaf refused for its URI SAN.
fn bad_id_reason(case: &SvidCase) -> IdError {
    match case_rule_error(case) {
        SvidRuleError::BadId { uri, reason } => {
            assert_eq!(uri, case.id);
            reason
        }
        other => panic!("{}: expected BadId, got {other:?}", case.name),
    }
}

#[test]
fn leaf_with_an_https_uri_san_is_refused() {
    assert_eq!(
        bad_id_reason(&cases::leaf_with_an_https_uri()),
        IdError::Scheme
    );
}

#[test]
fn leaf_with_a_root_id_is_refused() {
    let case = cases::leaf_with_a_root_id();
    assert_eq!(bad_id_reason(&case), IdError::RootId(case.id.clone()));
}

#[test]
fn leaf_with_an_upper_case_trust_domain_is_refused() {
    assert_eq!(
        bad_id_reason(&cases::leaf_with_an_upper_case_trust_domain()),
        IdError::UpperCaseTrustDomain
    );
}

#[test]
fn leaf_with_a_dot_segment_or_a_port_is_refused() {
    for case in [cases::leaf_with_a_dot_segment(), cases::leaf_with_a_port()] {
        let reason = bad_id_reason(&case);
        assert!(
            spiffe_tunnel::spiffe_id::parse_workload_id(&case.id).is_err_and(|e| e == reason),
            "{}: {reason:?}",
            case.name
        );
    }
}

// ---------------------------------------------------------------------------
// Which bundle vouches for the peer

#[test]
fn ca_of_one_trust_domain_cannot_vouch_for_another() {
    let cases = cases::cross_domain();
    // Controls: each CA vouches for its own domain in this bundle set.
    assert_case_verifies(variant(&cases, "a-own"));
    assert_case_verifies(variant(&cases, "b-own"));

    let forged = variant(&cases, "a-signs-b");
    for role in ALL_ROLES {
        untrusted_reason(
            verify_case(forged, role),
            "spiffe://other.org/web",
            "other.org",
        );
    }
}

#[test]
fn foreign_ca_sent_as_intermediate_cannot_vouch_for_another_domain() {
    let cases = cases::foreign_ca_as_intermediate();
    assert_case_verifies(variant(&cases, "control"));
    // The chain carries A's intermediate and A's root, all valid signers.
    let forged = variant(&cases, "forged");
    assert_eq!(forged.chain.len(), 3);
    untrusted_reason(
        verify_case(forged, PeerRole::Any),
        "spiffe://other.org/web",
        "other.org",
    );
}

#[test]
fn id_of_a_trust_domain_without_bundle_is_refused() {
    let case = cases::trust_domain_without_bundle();
    for role in ALL_ROLES {
        assert_eq!(
            verify_case(&case, role),
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
    let (cases, trusted, rogue) = cases::rogue_ca();
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

    assert_case_verifies(variant(&cases, "control"));
    for role in ALL_ROLES {
        untrusted_reason(verify_case(variant(&cases, "forged"), role), WEB, TD);
    }
    // Sending the rogue root along does not help.
    let with_root = variant(&cases, "forged-with-root");
    assert_eq!(&with_root.chain[1], rogue.cert_der());
    untrusted_reason(verify_case(with_root, PeerRole::Any), WEB, TD);
}

// ---------------------------------------------------------------------------
// Validity period

#[test]
fn expired_leaf_is_refused() {
    let case = cases::leaf_under_root();
    // Control: valid until LEAF_TTL from now.
    let almost = certs::unix_time_in(certs::LEAF_TTL - Duration::from_secs(60));
    assert!(verify_case_at(&case, almost, PeerRole::Any).is_ok());

    let later = certs::unix_time_in(certs::LEAF_TTL + Duration::from_secs(60));
    for role in ALL_ROLES {
        let reason = untrusted_reason(verify_case_at(&case, later, role), WEB, TD);
        assert!(reason.contains("expired"), "{reason}");
    }
}

#[test]
fn not_yet_valid_leaf_is_refused() {
    let case = cases::leaf_under_root();
    let earlier = certs::unix_time_ago(Duration::from_secs(600));
    for role in ALL_ROLES {
        let reason = untrusted_reason(verify_case_at(&case, earlier, role), WEB, TD);
        assert!(reason.contains("not valid yet"), "{reason}");
    }
    // Made to start in an hour, it is refused now.
    let reason = untrusted_reason(
        verify_case(&cases::leaf_built_not_yet_valid(), PeerRole::Any),
        WEB,
        TD,
    );
    assert!(reason.contains("not valid yet"), "{reason}");
}

#[test]
fn leaf_built_expired_is_refused_now() {
    let reason = untrusted_reason(
        verify_case(&cases::leaf_built_expired(), PeerRole::Any),
        WEB,
        TD,
    );
    assert!(reason.contains("expired"), "{reason}");
}

// ---------------------------------------------------------------------------
// Signing certificates

#[test]
fn intermediate_that_is_not_a_ca_is_refused() {
    let case = cases::intermediate_not_a_ca();
    for role in ALL_ROLES {
        assert!(
            matches!(
                verify_case(&case, role),
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
    let case = cases::intermediate_without_key_cert_sign();
    for role in ALL_ROLES {
        assert!(
            matches!(
                verify_case(&case, role),
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
    assert!(matches!(
        verify_case(&cases::bad_second_intermediate(), PeerRole::Any),
        Err(VerifyError::Signer {
            index: 2,
            source: SvidRuleError::SignerNoKeyCertSign { .. }
        })
    ));
}

#[test]
fn a_path_longer_than_the_roots_path_length_is_refused() {
    let case = cases::path_length_exceeded();
    let reason = untrusted_reason(verify_case(&case, PeerRole::Any), WEB, TD);
    assert!(reason.contains("path length"), "{reason}");
}

#[test]
fn a_path_length_in_the_root_certificate_is_not_enforced() {
    // The bundle's roots are trust anchors: name and key. webpki, like RFC
    // 5280 6.1.1, does not apply the constraints of their certificates.
    assert_case_verifies(&cases::root_path_length_exceeded());
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
    assert_eq!(
        case_rule_error(&cases::rsa_1024_leaf()),
        SvidRuleError::WeakRsaKey {
            which: "leaf".into(),
            bits: 1024
        }
    );
}

#[test]
fn sha1_signed_leaf_is_refused_as_weak() {
    let cases = cases::openssl_signed_leaves();
    // Control: the same openssl path with SHA-256 makes a good SVID.
    assert_case_verifies(variant(&cases, "sha256"));
    assert_eq!(
        case_rule_error(variant(&cases, "sha1")),
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
    let case = cases::server_auth_only_leaf();
    assert_eq!(
        verify_case(&case, PeerRole::Server).unwrap().id.to_string(),
        WEB
    );
    assert!(verify_case(&case, PeerRole::Any).is_ok());
    let reason = untrusted_reason(verify_case(&case, PeerRole::Client), WEB, TD);
    assert!(reason.contains("extended key usage"), "{reason}");
}

#[test]
fn client_auth_only_leaf_is_a_client_not_a_server() {
    let case = cases::client_auth_only_leaf();
    assert_eq!(
        verify_case(&case, PeerRole::Client).unwrap().id.to_string(),
        WEB
    );
    assert!(verify_case(&case, PeerRole::Any).is_ok());
    let reason = untrusted_reason(verify_case(&case, PeerRole::Server), WEB, TD);
    assert!(reason.contains("extended key usage"), "{reason}");
}

#[test]
fn leaf_with_an_unrelated_eku_is_refused_for_every_role() {
    let case = cases::code_signing_only_leaf();
    for role in ALL_ROLES {
        let reason = untrusted_reason(verify_case(&case, role), WEB, TD);
        assert!(reason.contains("extended key usage"), "{role:?}: {reason}");
    }
}

#[test]
fn leaf_without_eku_extension_is_accepted_for_every_role() {
    // The EKU is checked only when the leaf has the extension.
    assert_case_verifies(&cases::leaf_without_eku());
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
    assert!(matches!(
        verify_case(&cases::garbage_leaf(), PeerRole::Any),
        Err(VerifyError::Leaf(SvidRuleError::Malformed(_)))
    ));
}

#[test]
fn leaf_with_trailing_bytes_is_malformed() {
    assert!(matches!(
        verify_case(&cases::leaf_with_trailing_bytes(), PeerRole::Any),
        Err(VerifyError::Leaf(SvidRuleError::Malformed(_)))
    ));
}

#[test]
fn garbage_intermediate_is_a_malformed_signer() {
    assert!(matches!(
        verify_case(&cases::garbage_intermediate(), PeerRole::Any),
        Err(VerifyError::Signer {
            index: 1,
            source: SvidRuleError::Malformed(_)
        })
    ));
}

// ---------------------------------------------------------------------------
// Every case against its spec verdict

#[test]
fn no_case_the_spec_refuses_is_accepted() {
    for case in cases::all() {
        if let Spec::MustReject(rule) = case.spec {
            for role in ALL_ROLES {
                if let Ok(peer) = verify_case(&case, role) {
                    panic!(
                        "{} accepted as {} for {role:?}; the spec refuses it ({rule})",
                        case.name, peer.id
                    );
                }
            }
        }
    }
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
    let cases = cases::leaves_on_curves();
    // Control: the same openssl path with P-256 verifies.
    assert_case_verifies(variant(&cases, "prime256v1"));
    for curve in ["prime192v1", "secp224r1", "secp256k1"] {
        let result = verify_case(variant(&cases, curve), PeerRole::Any);
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
