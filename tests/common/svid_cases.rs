#![allow(dead_code)]
//! The certificate chains of the verifier tests, as data: each case is a
//! chain (leaf first), the trust bundles it is checked against, and what
//! the SPIFFE X509-SVID spec says of it, with the rule.
//!
//! `tests/verifier.rs` asserts spiffe-tunnel's precise answer for each case;
//! `tests/go_spiffe.rs` exports every case as PEM ([`SvidCase::write_pem`])
//! and runs it through go-spiffe's `x509svid.Verify` and `spiffe-tunnel
//! verify`, so both tests see the very same chains. A chain and its controls
//! come from one scenario function, because they share CAs.
//!
//! Every case is judged at the time it is made: certificates that must be
//! expired or not yet valid are made so, rather than checked at a shifted
//! clock, since neither command line takes a time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use spiffe_tunnel::identity::{BundleSet, TrustBundle};
use spiffe_tunnel::spiffe_id::parse_trust_domain;

pub use super::certs::KeySpec;
use super::certs::{
    self, bundle_set, dns_san, uri_san, BasicConstraints, Ca, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, Leaf,
};

pub const TD: &str = "example.org";
pub const WEB: &str = "spiffe://example.org/web";

/// What the SPIFFE X509-SVID spec (standards/X509-SVID.md) says of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    /// Nothing in the spec refuses it: a conforming X509-SVID that chains
    /// to its trust domain's bundle. (The spec says nothing of key sizes,
    /// curves or signature hashes; spiffe-tunnel's own rules refuse weak
    /// ones, and so may any validator.)
    Valid,
    /// The spec requires a validator to refuse it (section 5, or RFC 5280
    /// path validation, which section 5.1 makes mandatory). The rule is
    /// quoted.
    MustReject(&'static str),
    /// The certificate breaks a MUST the spec puts on issuers (section 4),
    /// which section 5 does not ask validators to check: a validator may
    /// accept or refuse it.
    NonConforming(&'static str),
}

/// One chain and the bundles it is verified against.
#[derive(Debug, Clone)]
pub struct SvidCase {
    /// Unique, file-name safe; `scenario/variant` where a scenario has
    /// several chains.
    pub name: String,
    /// The SPIFFE ID the leaf was made for (as given, even if invalid).
    pub id: String,
    /// Leaf first, then what the peer sends after it.
    pub chain: Vec<CertificateDer<'static>>,
    pub bundles: Vec<Bundle>,
    pub spec: Spec,
}

/// The CA certificates of one trust domain.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub trust_domain: String,
    pub certs: Vec<CertificateDer<'static>>,
}

impl Bundle {
    /// The bundle holding the roots of `cas`, all of `trust_domain`.
    pub fn of(trust_domain: &str, cas: &[&Ca]) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            certs: cas.iter().map(|ca| ca.root_der().clone()).collect(),
        }
    }

    /// The bundle of `ca`'s trust domain holding its root.
    pub fn root_of(ca: &Ca) -> Self {
        Self::of(&ca.trust_domain, &[ca])
    }
}

impl SvidCase {
    pub fn new(name: &str, leaf: &Leaf, bundles: Vec<Bundle>, spec: Spec) -> Self {
        Self {
            name: name.to_string(),
            id: leaf.id.clone(),
            chain: leaf.chain_der.clone(),
            bundles,
            spec,
        }
    }

    /// The same case with the chain replaced.
    pub fn with_chain(
        mut self,
        name: &str,
        chain: Vec<CertificateDer<'static>>,
        spec: Spec,
    ) -> Self {
        self.name = name.to_string();
        self.chain = chain;
        self.spec = spec;
        self
    }

    pub fn bundle_set(&self) -> BundleSet {
        bundle_set(self.bundles.iter().map(|b| {
            let td = parse_trust_domain(&b.trust_domain).expect("trust domain");
            TrustBundle::new(td, b.certs.clone()).expect("trust bundle")
        }))
    }

    pub fn leaf_der(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// Writes `chain.pem` and one `bundle-TD.pem` per trust domain into
    /// `dir`; returns the chain file and the `--bundle TD=FILE` arguments
    /// both `verify` commands take.
    pub fn write_pem(&self, dir: &Path) -> (PathBuf, Vec<String>) {
        std::fs::create_dir_all(dir).expect("create the case folder");
        let chain = dir.join("chain.pem");
        std::fs::write(&chain, pem_certs(&self.chain)).expect("write chain.pem");
        let bundles = self
            .bundles
            .iter()
            .map(|bundle| {
                let td = &bundle.trust_domain;
                let file = dir.join(format!("bundle-{td}.pem"));
                std::fs::write(&file, pem_certs(&bundle.certs)).expect("write a bundle");
                format!("{td}={}", file.display())
            })
            .collect();
        (chain, bundles)
    }
}

/// Certificates as concatenated PEM.
pub fn pem_certs(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
        .collect()
}

/// Finds a scenario's variant by the part of its name after the `/`.
pub fn variant<'a>(cases: &'a [SvidCase], suffix: &str) -> &'a SvidCase {
    cases
        .iter()
        .find(|c| c.name.rsplit('/').next() == Some(suffix))
        .unwrap_or_else(|| panic!("no case ending in {suffix:?}"))
}

// Rules, quoted from the X509-SVID spec (and RFC 5280 where 5.1 points).
const R_PATH: &str = "5.1: RFC 5280 path validation to the trust domain's bundle";
const R_VALIDITY: &str = "5.1: RFC 5280 6.1.3(a)(2), the certificate is within its validity";
const R_SIGNER_CA: &str = "5.1/4.1: RFC 5280 6.1.4(k), signing certificates have cA=true";
const R_SIGNER_KCS: &str = "5.1/4.3: RFC 5280 6.1.4(n), signing certificates set keyCertSign";
const R_PATH_LEN: &str = "5.1: RFC 5280 6.1.4(m), pathLenConstraint";
const R_BUNDLE_TD: &str =
    "5.1: the bundle is that of the trust domain in the leaf's SPIFFE ID (SPIFFE Trust Domain and Bundle 4.2)";
const R_LEAF_CA: &str = "5.2: the validator MUST ensure that cA is false";
const R_LEAF_KCS: &str = "5.2: the validator MUST ensure that keyCertSign and cRLSign are not set";
const R_ONE_URI: &str = "2: exactly one URI SAN; validators MUST reject more than one";
const R_NO_URI: &str = "2: an X509-SVID MUST contain exactly one URI SAN (the SPIFFE ID)";
const R_SCHEME: &str = "5.2: the validator MUST ensure the scheme is spiffe";
const R_NON_ROOT: &str = "5.2/3.1: the validator MUST ensure the SPIFFE ID has a non-root path";
const R_TD_CHARS: &str =
    "5.2 via SPIFFE-ID 2.1: trust domain names are lower case letters, digits, '.', '-', '_'";
const R_DOT_SEGMENT: &str = "5.2 via SPIFFE-ID 2.2: path segments MUST NOT be '.' or '..'";
const R_PORT: &str = "5.2 via SPIFFE-ID 2.1: the trust domain MUST NOT include a port";
const R_MALFORMED: &str = "5.1: a certificate that is not valid DER cannot be path validated";
const R_KU_PRESENT: &str = "4.3: the key usage extension MUST be set on all SVIDs";
const R_KU_DS: &str = "4.3: leaf SVIDs MUST set digitalSignature";
const R_KU_CRITICAL: &str = "4.3: the key usage extension MUST be marked critical";
const R_EKU: &str =
    "4.4: when the EKU extension is included, serverAuth and clientAuth MUST be set";

use Spec::{MustReject, NonConforming, Valid};

fn one(name: &str, ca: &Ca, leaf: &Leaf, spec: Spec) -> SvidCase {
    SvidCase::new(name, leaf, vec![Bundle::root_of(ca)], spec)
}

// ---------------------------------------------------------------------------
// Good chains

pub fn leaf_under_root() -> SvidCase {
    let ca = Ca::new(TD);
    one("leaf-under-root", &ca, &ca.leaf(WEB), Valid)
}

pub fn leaf_via_intermediate() -> (SvidCase, Ca) {
    let root = Ca::new(TD);
    let intermediate = root.intermediate();
    let leaf = intermediate.leaf("spiffe://example.org/ns/prod/sa/api");
    (
        one("leaf-via-intermediate", &root, &leaf, Valid),
        intermediate,
    )
}

pub fn leaf_via_two_intermediates() -> SvidCase {
    let root = Ca::new(TD);
    let leaf = root.intermediate().intermediate().leaf(WEB);
    one("leaf-via-two-intermediates", &root, &leaf, Valid)
}

/// `sent`: the leaf with its intermediate; `bare`: the intermediate left out.
pub fn intermediate_not_sent() -> Vec<SvidCase> {
    let root = Ca::new(TD);
    let leaf = root.intermediate().leaf(WEB);
    let sent = one("intermediate-not-sent/sent", &root, &leaf, Valid);
    let bare = sent.clone().with_chain(
        "intermediate-not-sent/bare",
        leaf.chain_der[..1].to_vec(),
        MustReject(R_PATH),
    );
    vec![sent, bare]
}

pub fn leaf_with_key(name: &str, key: KeySpec) -> SvidCase {
    let ca = Ca::new(TD);
    one(name, &ca, &ca.leaf_builder(WEB).key(key).build(), Valid)
}

/// Old and new root both in the bundle, as during a CA rotation; a third
/// root of the same domain is not.
pub fn rotating_bundle() -> Vec<SvidCase> {
    let old = Ca::new(TD);
    let new = Ca::new(TD);
    let bundles = vec![Bundle::of(TD, &[&old, &new])];
    let stranger = Ca::new(TD);
    vec![
        SvidCase::new(
            "rotating-bundle/old-ca",
            &old.leaf(WEB),
            bundles.clone(),
            Valid,
        ),
        SvidCase::new(
            "rotating-bundle/new-ca",
            &new.leaf(WEB),
            bundles.clone(),
            Valid,
        ),
        SvidCase::new(
            "rotating-bundle/new-ca-intermediate",
            &new.intermediate().leaf(WEB),
            bundles.clone(),
            Valid,
        ),
        SvidCase::new(
            "rotating-bundle/stranger",
            &stranger.leaf(WEB),
            bundles,
            MustReject(R_PATH),
        ),
    ]
}

// ---------------------------------------------------------------------------
// Leaf basic constraints and key usage

pub fn leaf_is_ca() -> SvidCase {
    let ca = Ca::new(TD);
    let leaf = ca
        .leaf_builder(WEB)
        .basic_constraints(IsCa::Ca(BasicConstraints::Unconstrained))
        .key_usages(vec![KeyUsagePurpose::DigitalSignature])
        .build();
    one("leaf-is-ca", &ca, &leaf, MustReject(R_LEAF_CA))
}

/// CA:false implied by leaving basicConstraints out (RFC 5280: cA
/// DEFAULT FALSE).
pub fn leaf_without_basic_constraints() -> SvidCase {
    let ca = Ca::new(TD);
    let leaf = ca.leaf_builder(WEB).basic_constraints(IsCa::NoCa).build();
    one("leaf-without-basic-constraints", &ca, &leaf, Valid)
}

pub fn leaf_with_key_usages(name: &str, usages: Vec<KeyUsagePurpose>, spec: Spec) -> SvidCase {
    let ca = Ca::new(TD);
    one(
        name,
        &ca,
        &ca.leaf_builder(WEB).key_usages(usages).build(),
        spec,
    )
}

pub fn leaf_without_digital_signature() -> SvidCase {
    leaf_with_key_usages(
        "leaf-without-digital-signature",
        vec![
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ],
        NonConforming(R_KU_DS),
    )
}

pub fn leaf_with_key_cert_sign() -> SvidCase {
    leaf_with_key_usages(
        "leaf-with-key-cert-sign",
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ],
        MustReject(R_LEAF_KCS),
    )
}

pub fn leaf_with_crl_sign() -> SvidCase {
    leaf_with_key_usages(
        "leaf-with-crl-sign",
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign],
        MustReject(R_LEAF_KCS),
    )
}

pub fn leaf_without_key_usage() -> SvidCase {
    leaf_with_key_usages(
        "leaf-without-key-usage",
        vec![],
        NonConforming(R_KU_PRESENT),
    )
}

/// keyUsage present with digitalSignature, but not marked critical
/// (openssl makes it; rcgen always marks it critical).
pub fn leaf_with_non_critical_key_usage() -> SvidCase {
    let ca = Ca::new(TD);
    let leaf = ca.leaf_signed_by_openssl_with_key_usage(
        WEB,
        "sha256",
        "keyUsage = digitalSignature, keyEncipherment, keyAgreement",
    );
    one(
        "leaf-with-non-critical-key-usage",
        &ca,
        &leaf,
        NonConforming(R_KU_CRITICAL),
    )
}

// ---------------------------------------------------------------------------
// The SPIFFE ID in the URI SAN

pub fn leaf_with_sans(name: &str, sans: Vec<certs::SanType>, spec: Spec) -> SvidCase {
    let ca = Ca::new(TD);
    one(name, &ca, &ca.leaf_builder(WEB).sans(sans).build(), spec)
}

pub fn leaf_with_only_a_dns_san() -> SvidCase {
    leaf_with_sans(
        "leaf-with-only-a-dns-san",
        vec![dns_san("web.example.org")],
        MustReject(R_NO_URI),
    )
}

pub fn leaf_without_any_san() -> SvidCase {
    leaf_with_sans("leaf-without-any-san", vec![], MustReject(R_NO_URI))
}

pub fn leaf_with_dns_and_uri_sans() -> SvidCase {
    leaf_with_sans(
        "leaf-with-dns-and-uri-sans",
        vec![dns_san("web.example.org"), uri_san(WEB)],
        Valid,
    )
}

pub fn leaf_with_two_uri_sans() -> SvidCase {
    leaf_with_sans(
        "leaf-with-two-uri-sans",
        vec![uri_san(WEB), uri_san("spiffe://example.org/db")],
        MustReject(R_ONE_URI),
    )
}

/// A leaf whose one URI SAN is `uri` (not necessarily a SPIFFE ID).
pub fn leaf_with_uri(name: &str, uri: &str, spec: Spec) -> SvidCase {
    let ca = Ca::new(TD);
    one(name, &ca, &ca.leaf(uri), spec)
}

pub fn leaf_with_an_https_uri() -> SvidCase {
    leaf_with_uri(
        "leaf-with-an-https-uri",
        "https://example.org/web",
        MustReject(R_SCHEME),
    )
}

pub fn leaf_with_a_root_id() -> SvidCase {
    leaf_with_uri(
        "leaf-with-a-root-id",
        "spiffe://example.org",
        MustReject(R_NON_ROOT),
    )
}

pub fn leaf_with_an_upper_case_trust_domain() -> SvidCase {
    leaf_with_uri(
        "leaf-with-an-upper-case-trust-domain",
        "spiffe://Example.org/web",
        MustReject(R_TD_CHARS),
    )
}

pub fn leaf_with_a_dot_segment() -> SvidCase {
    leaf_with_uri(
        "leaf-with-a-dot-segment",
        "spiffe://example.org/ns/../web",
        MustReject(R_DOT_SEGMENT),
    )
}

pub fn leaf_with_a_port() -> SvidCase {
    leaf_with_uri(
        "leaf-with-a-port",
        "spiffe://example.org:8443/web",
        MustReject(R_PORT),
    )
}

// ---------------------------------------------------------------------------
// Which bundle vouches for the peer

/// Two domains' roots in the bundle set; A's root signs an ID of B.
pub fn cross_domain() -> Vec<SvidCase> {
    let ca_a = Ca::new("example.org");
    let ca_b = Ca::new("other.org");
    let bundles = vec![Bundle::root_of(&ca_a), Bundle::root_of(&ca_b)];
    let id_b = "spiffe://other.org/web";
    vec![
        SvidCase::new(
            "cross-domain/a-own",
            &ca_a.leaf(WEB),
            bundles.clone(),
            Valid,
        ),
        SvidCase::new(
            "cross-domain/b-own",
            &ca_b.leaf(id_b),
            bundles.clone(),
            Valid,
        ),
        SvidCase::new(
            "cross-domain/a-signs-b",
            &ca_a.leaf(id_b),
            bundles,
            MustReject(R_BUNDLE_TD),
        ),
    ]
}

/// A's intermediate and root sent along with a leaf for B's domain.
pub fn foreign_ca_as_intermediate() -> Vec<SvidCase> {
    let root_a = Ca::new("example.org");
    let ca_b = Ca::new("other.org");
    let bundles = vec![Bundle::root_of(&root_a), Bundle::root_of(&ca_b)];
    let intermediate_a = root_a.intermediate();
    let mut forged = intermediate_a.leaf("spiffe://other.org/web");
    forged.chain_der.push(root_a.cert_der().clone());
    vec![
        SvidCase::new(
            "foreign-ca-as-intermediate/control",
            &intermediate_a.leaf(WEB),
            bundles.clone(),
            Valid,
        ),
        SvidCase::new(
            "foreign-ca-as-intermediate/forged",
            &forged,
            bundles,
            MustReject(R_BUNDLE_TD),
        ),
    ]
}

/// The bundle set has example.org only; the leaf is of unknown.org.
pub fn trust_domain_without_bundle() -> SvidCase {
    let ca = Ca::new(TD);
    one(
        "trust-domain-without-bundle",
        &ca,
        &ca.leaf("spiffe://unknown.org/web"),
        MustReject(R_BUNDLE_TD),
    )
}

/// A root with the trusted root's subject and key type, but another key.
pub fn rogue_ca() -> (Vec<SvidCase>, Ca, Ca) {
    let trusted = Ca::new(TD);
    let rogue = Ca::new(TD);
    let bundles = vec![Bundle::root_of(&trusted)];
    let forged = rogue.leaf(WEB);
    let mut with_root = forged.clone();
    with_root.chain_der.push(rogue.cert_der().clone());
    let cases = vec![
        SvidCase::new(
            "rogue-ca/control",
            &trusted.leaf(WEB),
            bundles.clone(),
            Valid,
        ),
        SvidCase::new(
            "rogue-ca/forged",
            &forged,
            bundles.clone(),
            MustReject(R_PATH),
        ),
        SvidCase::new(
            "rogue-ca/forged-with-root",
            &with_root,
            bundles,
            MustReject(R_PATH),
        ),
    ];
    (cases, trusted, rogue)
}

// ---------------------------------------------------------------------------
// Validity period

pub fn leaf_built_expired() -> SvidCase {
    let ca = Ca::new(TD);
    let now = certs::now();
    let leaf = ca
        .leaf_builder(WEB)
        .validity(
            now - Duration::from_secs(7200),
            now - Duration::from_secs(3600),
        )
        .build();
    one("leaf-built-expired", &ca, &leaf, MustReject(R_VALIDITY))
}

pub fn leaf_built_not_yet_valid() -> SvidCase {
    let ca = Ca::new(TD);
    let now = certs::now();
    let leaf = ca
        .leaf_builder(WEB)
        .validity(
            now + Duration::from_secs(3600),
            now + Duration::from_secs(7200),
        )
        .build();
    one(
        "leaf-built-not-yet-valid",
        &ca,
        &leaf,
        MustReject(R_VALIDITY),
    )
}

// ---------------------------------------------------------------------------
// Signing certificates

pub fn intermediate_not_a_ca() -> SvidCase {
    let root = Ca::new(TD);
    let leaf = root
        .intermediate_with(|p| p.is_ca = IsCa::ExplicitNoCa)
        .leaf(WEB);
    one(
        "intermediate-not-a-ca",
        &root,
        &leaf,
        MustReject(R_SIGNER_CA),
    )
}

pub fn intermediate_without_key_cert_sign() -> SvidCase {
    let root = Ca::new(TD);
    let leaf = root
        .intermediate_with(|p| {
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign]
        })
        .leaf(WEB);
    one(
        "intermediate-without-key-cert-sign",
        &root,
        &leaf,
        MustReject(R_SIGNER_KCS),
    )
}

/// The upper of two intermediates lacks keyCertSign.
pub fn bad_second_intermediate() -> SvidCase {
    let root = Ca::new(TD);
    let leaf = root
        .intermediate_with(|p| p.key_usages = vec![KeyUsagePurpose::CrlSign])
        .intermediate()
        .leaf(WEB);
    one(
        "bad-second-intermediate",
        &root,
        &leaf,
        MustReject(R_SIGNER_KCS),
    )
}

/// An intermediate with pathLenConstraint 0 that signed another
/// intermediate.
pub fn path_length_exceeded() -> SvidCase {
    let root = Ca::new(TD);
    let leaf = root
        .intermediate_with(|p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)))
        .intermediate()
        .leaf(WEB);
    one("path-length-exceeded", &root, &leaf, MustReject(R_PATH_LEN))
}

/// The root itself says pathLenConstraint 0, and an intermediate follows.
/// RFC 5280 path validation takes only the trust anchor's name and key
/// (6.1.1(d)); constraints in its certificate are optional (RFC 5937).
pub fn root_path_length_exceeded() -> SvidCase {
    let root = Ca::new_with(TD, |p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)));
    let leaf = root.intermediate().leaf(WEB);
    one("root-path-length-exceeded", &root, &leaf, Valid)
}

// ---------------------------------------------------------------------------
// Key and signature strength: the spec is silent; spiffe-tunnel's own
// rules (DESIGN.md: no weak keys or signatures) refuse some.

pub fn rsa_1024_leaf() -> SvidCase {
    leaf_with_key("rsa-1024-leaf", KeySpec::Rsa(1024))
}

/// SHA-256 control and SHA-1 signature, both signed by openssl.
pub fn openssl_signed_leaves() -> Vec<SvidCase> {
    let ca = Ca::new(TD);
    vec![
        one(
            "openssl-signed/sha256",
            &ca,
            &ca.leaf_signed_by_openssl(WEB, "sha256"),
            Valid,
        ),
        one(
            "openssl-signed/sha1",
            &ca,
            &ca.leaf_signed_by_openssl(WEB, "sha1"),
            Valid,
        ),
    ]
}

/// A P-256 control, then curves spiffe-tunnel does not take.
pub fn leaves_on_curves() -> Vec<SvidCase> {
    let ca = Ca::new(TD);
    ["prime256v1", "prime192v1", "secp224r1", "secp256k1"]
        .into_iter()
        .map(|curve| {
            let key = certs::openssl_ec_key_pem(curve);
            let leaf = ca.leaf_signed_by_openssl_with_key(WEB, "sha256", &key);
            one(&format!("leaf-on-curve/{curve}"), &ca, &leaf, Valid)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Extended key usage

pub fn leaf_with_ekus(name: &str, ekus: Vec<ExtendedKeyUsagePurpose>, spec: Spec) -> SvidCase {
    let ca = Ca::new(TD);
    one(
        name,
        &ca,
        &ca.leaf_builder(WEB).extended_key_usages(ekus).build(),
        spec,
    )
}

pub fn server_auth_only_leaf() -> SvidCase {
    leaf_with_ekus(
        "server-auth-only-leaf",
        vec![ExtendedKeyUsagePurpose::ServerAuth],
        NonConforming(R_EKU),
    )
}

pub fn client_auth_only_leaf() -> SvidCase {
    leaf_with_ekus(
        "client-auth-only-leaf",
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        NonConforming(R_EKU),
    )
}

pub fn code_signing_only_leaf() -> SvidCase {
    leaf_with_ekus(
        "code-signing-only-leaf",
        vec![ExtendedKeyUsagePurpose::CodeSigning],
        NonConforming(R_EKU),
    )
}

pub fn leaf_without_eku() -> SvidCase {
    leaf_with_ekus("leaf-without-eku", vec![], Valid)
}

// ---------------------------------------------------------------------------
// Degenerate input

/// A case whose chain is `chain` as given, against example.org's bundle.
fn raw(name: &str, ca: &Ca, chain: Vec<CertificateDer<'static>>, spec: Spec) -> SvidCase {
    SvidCase {
        name: name.to_string(),
        id: WEB.to_string(),
        chain,
        bundles: vec![Bundle::root_of(ca)],
        spec,
    }
}

pub fn garbage_leaf() -> SvidCase {
    let garbage = CertificateDer::from(b"\x30\x82\x01\x00 definitely not a certificate".to_vec());
    raw(
        "garbage-leaf",
        &Ca::new(TD),
        vec![garbage],
        MustReject(R_MALFORMED),
    )
}

pub fn leaf_with_trailing_bytes() -> SvidCase {
    let ca = Ca::new(TD);
    let mut bytes = ca.leaf(WEB).leaf_der().to_vec();
    bytes.push(0);
    raw(
        "leaf-with-trailing-bytes",
        &ca,
        vec![CertificateDer::from(bytes)],
        MustReject(R_MALFORMED),
    )
}

pub fn garbage_intermediate() -> SvidCase {
    let root = Ca::new(TD);
    let mut leaf = root.intermediate().leaf(WEB);
    leaf.chain_der[1] = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    one(
        "garbage-intermediate",
        &root,
        &leaf,
        MustReject(R_MALFORMED),
    )
}

/// Every case above, each once.
pub fn all() -> Vec<SvidCase> {
    let mut cases = vec![
        leaf_under_root(),
        leaf_via_intermediate().0,
        leaf_via_two_intermediates(),
        leaf_with_key("rsa-2048-leaf", KeySpec::Rsa(2048)),
        leaf_with_key("p384-leaf", KeySpec::EcdsaP384),
        leaf_with_key("ed25519-leaf", KeySpec::Ed25519),
        leaf_is_ca(),
        leaf_without_basic_constraints(),
        leaf_without_digital_signature(),
        leaf_with_key_cert_sign(),
        leaf_with_crl_sign(),
        leaf_without_key_usage(),
        leaf_with_non_critical_key_usage(),
        leaf_with_only_a_dns_san(),
        leaf_without_any_san(),
        leaf_with_dns_and_uri_sans(),
        leaf_with_two_uri_sans(),
        leaf_with_an_https_uri(),
        leaf_with_a_root_id(),
        leaf_with_an_upper_case_trust_domain(),
        leaf_with_a_dot_segment(),
        leaf_with_a_port(),
        trust_domain_without_bundle(),
        leaf_built_expired(),
        leaf_built_not_yet_valid(),
        intermediate_not_a_ca(),
        intermediate_without_key_cert_sign(),
        bad_second_intermediate(),
        path_length_exceeded(),
        root_path_length_exceeded(),
        rsa_1024_leaf(),
        server_auth_only_leaf(),
        client_auth_only_leaf(),
        code_signing_only_leaf(),
        leaf_without_eku(),
        garbage_leaf(),
        leaf_with_trailing_bytes(),
        garbage_intermediate(),
    ];
    cases.extend(intermediate_not_sent());
    cases.extend(rotating_bundle());
    cases.extend(cross_domain());
    cases.extend(foreign_ca_as_intermediate());
    cases.extend(rogue_ca().0);
    cases.extend(openssl_signed_leaves());
    cases.extend(leaves_on_curves());
    cases
}
