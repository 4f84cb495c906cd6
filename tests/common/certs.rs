#![allow(dead_code)]
//! Test certificate factory: SPIRE-shaped CAs, intermediates and X509-SVIDs.
//!
//! ```ignore
//! let ca = Ca::new("example.org");
//! let leaf = ca.leaf("spiffe://example.org/web");          // SPIRE-like SVID
//! let odd = ca.leaf_builder("spiffe://example.org/web")    // customised SVID
//!     .key_usages(vec![KeyUsagePurpose::KeyEncipherment])
//!     .build();
//! let mid = ca.intermediate();                             // chain: leaf, mid
//! let bundles = ca.bundle_set();                           // or ca.trust_bundle()
//! leaf.write_files(dir);                                   // svid.pem, svid.key, bundle.pem
//! ```
//!
//! Everything is generated with rcgen except what rcgen cannot make (RSA keys
//! other than 2048/3072/4096 bits, SHA-1 signatures): those use the `openssl`
//! command line tool, run in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    SanType,
};
use rcgen::{Issuer, KeyPair, RsaKeySize, SerialNumber, SubjectPublicKeyInfo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use spiffe_tunnel::identity::{BundleSet, TrustBundle};
use spiffe_tunnel::spiffe_id::parse_trust_domain;

/// Default lifetime of a leaf, as SPIRE's default X509-SVID TTL.
pub const LEAF_TTL: Duration = Duration::from_secs(3600);
/// Default lifetime of a CA, either side of now.
pub const CA_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Serial numbers unique within a test binary (rcgen would otherwise derive
/// them from the subject key).
fn next_serial() -> SerialNumber {
    static NEXT: AtomicU64 = AtomicU64::new(0x1000);
    SerialNumber::from(NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Now, rounded down to whole seconds (certificate times have no fractions).
pub fn now() -> SystemTime {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// `now() + ahead` as webpki's time type.
pub fn unix_time_in(ahead: Duration) -> UnixTime {
    UnixTime::since_unix_epoch((now() + ahead).duration_since(UNIX_EPOCH).unwrap())
}

/// `now() - back` as webpki's time type.
pub fn unix_time_ago(back: Duration) -> UnixTime {
    UnixTime::since_unix_epoch((now() - back).duration_since(UNIX_EPOCH).unwrap())
}

/// Sets a certificate's validity window (whole seconds, after 1970).
pub fn set_validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) {
    let since_epoch = |t: SystemTime| {
        let d = t.duration_since(UNIX_EPOCH).expect("validity before 1970");
        Duration::from_secs(d.as_secs())
    };
    params.not_before = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(not_before);
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + since_epoch(not_after);
}

/// The kind of key a certificate's subject gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySpec {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
    /// RSA of this many bits; 2048, 3072 and 4096 come from rcgen, any other
    /// size from `openssl genpkey`.
    Rsa(u32),
}

/// A freshly generated subject key: the public half for the certificate and
/// the private half as PKCS#8 PEM.
pub struct SubjectKey {
    public: PublicHalf,
    pub key_pem: String,
}

enum PublicHalf {
    /// A key rcgen holds (and could sign with).
    Pair(KeyPair),
    /// Only the public key, for keys rcgen cannot load (e.g. RSA-1024).
    Spki(SubjectPublicKeyInfo),
}

impl SubjectKey {
    pub fn generate(spec: KeySpec) -> Self {
        let pair = match spec {
            KeySpec::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeySpec::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384),
            KeySpec::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519),
            KeySpec::Rsa(2048) => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)
            }
            KeySpec::Rsa(3072) => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_3072)
            }
            KeySpec::Rsa(4096) => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_4096)
            }
            KeySpec::Rsa(bits) => return Self::openssl_rsa(bits),
        }
        .expect("generate key");
        Self {
            key_pem: pair.serialize_pem(),
            public: PublicHalf::Pair(pair),
        }
    }

    /// An RSA key of any size, made by `openssl genpkey` (PKCS#8 output).
    pub fn openssl_rsa(bits: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key.pem");
        openssl(
            dir.path(),
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                &format!("rsa_keygen_bits:{bits}"),
                "-out",
                path_str(&key),
            ],
        );
        let pub_pem = openssl(dir.path(), &["pkey", "-in", path_str(&key), "-pubout"]);
        let spki = SubjectPublicKeyInfo::from_pem(std::str::from_utf8(&pub_pem).unwrap())
            .expect("parse openssl public key");
        Self {
            key_pem: std::fs::read_to_string(&key).unwrap(),
            public: PublicHalf::Spki(spki),
        }
    }

    fn sign_cert(
        &self,
        params: &CertificateParams,
        issuer: &Issuer<'_, KeyPair>,
    ) -> rcgen::Certificate {
        match &self.public {
            PublicHalf::Pair(pair) => params.signed_by(pair, issuer),
            PublicHalf::Spki(spki) => params.signed_by(spki, issuer),
        }
        .expect("sign certificate")
    }
}

/// A signing authority of a trust domain: a self-signed root (`Ca::new`) or
/// an intermediate under one (`ca.intermediate()`).
pub struct Ca {
    pub trust_domain: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// What a leaf signed by this CA sends after itself: this CA when it is
    /// an intermediate, then the intermediates above it. Empty for a root.
    chain_tail: Vec<(CertificateDer<'static>, String)>,
    /// The root this CA chains to (itself for a root): the bundle.
    root_der: CertificateDer<'static>,
    root_pem: String,
}

/// Parameters of a SPIRE-like CA: CA:true, keyCertSign + cRLSign, subject
/// C=US O=SPIFFE (plus a CN for intermediates), URI SAN of the trust domain.
pub fn ca_params(trust_domain: &str, common_name: Option<&str>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CountryName, "US");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "SPIFFE");
    if let Some(cn) = common_name {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))];
    params.serial_number = Some(next_serial());
    let now = now();
    set_validity(&mut params, now - CA_TTL, now + CA_TTL);
    params
}

/// Parameters of a SPIRE-like X509-SVID leaf for `id`: CA:false, critical
/// KU digitalSignature + keyEncipherment + keyAgreement, EKU serverAuth +
/// clientAuth, subject C=US O=SPIRE, one URI SAN, valid for [`LEAF_TTL`].
pub fn leaf_params(id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CountryName, "US");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "SPIRE");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyAgreement,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.subject_alt_names = vec![uri_san(id)];
    params.serial_number = Some(next_serial());
    let now = now();
    set_validity(&mut params, now, now + LEAF_TTL);
    params
}

/// A URI SAN (panics on non-IA5 text, which no test should use).
pub fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.try_into().expect("URI SAN must be IA5"))
}

/// A DNS SAN.
pub fn dns_san(name: &str) -> SanType {
    SanType::DnsName(name.try_into().expect("DNS SAN must be IA5"))
}

impl Ca {
    /// A P-256 root CA for `trust_domain`, SPIRE-like.
    pub fn new(trust_domain: &str) -> Self {
        Self::new_with(trust_domain, |_| {})
    }

    /// A P-256 root CA whose parameters `customise` may change first.
    pub fn new_with(trust_domain: &str, customise: impl FnOnce(&mut CertificateParams)) -> Self {
        let mut params = ca_params(trust_domain, None);
        customise(&mut params);
        let key = KeyPair::generate().expect("generate CA key");
        let cert = params.self_signed(&key).expect("self-sign CA");
        let (der, pem) = (cert.der().clone(), cert.pem());
        Self {
            trust_domain: trust_domain.to_string(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
            chain_tail: Vec::new(),
            root_der: der.clone(),
            root_pem: pem.clone(),
            cert_der: der,
            cert_pem: pem,
        }
    }

    /// A P-256 intermediate CA signed by this one, SPIRE-like.
    pub fn intermediate(&self) -> Self {
        self.intermediate_with(|_| {})
    }

    /// An intermediate whose parameters `customise` may change first (to
    /// make it a non-CA, drop keyCertSign, ...).
    pub fn intermediate_with(&self, customise: impl FnOnce(&mut CertificateParams)) -> Self {
        static N: AtomicU64 = AtomicU64::new(1);
        let cn = format!(
            "{} intermediate {}",
            self.trust_domain,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let mut params = ca_params(&self.trust_domain, Some(&cn));
        customise(&mut params);
        let key = KeyPair::generate().expect("generate intermediate key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign intermediate");
        let (der, pem) = (cert.der().clone(), cert.pem());
        let mut chain_tail = vec![(der.clone(), pem.clone())];
        chain_tail.extend(self.chain_tail.iter().cloned());
        Self {
            trust_domain: self.trust_domain.clone(),
            key_pem: key.serialize_pem(),
            issuer: Issuer::new(params, key),
            chain_tail,
            root_der: self.root_der.clone(),
            root_pem: self.root_pem.clone(),
            cert_der: der,
            cert_pem: pem,
        }
    }

    /// A SPIRE-like P-256 X509-SVID for `id`, signed by this CA.
    pub fn leaf(&self, id: &str) -> Leaf {
        self.leaf_builder(id).build()
    }

    /// A leaf for `id` to customise before [`LeafBuilder::build`].
    pub fn leaf_builder(&self, id: &str) -> LeafBuilder<'_> {
        LeafBuilder {
            ca: self,
            id: id.to_string(),
            params: leaf_params(id),
            key: KeySpec::EcdsaP256,
        }
    }

    /// A SPIRE-like P-256 leaf for `id` signed by this CA with the `openssl`
    /// tool using `digest` (e.g. "sha1", "sha256"): for signature algorithms
    /// rcgen refuses to make.
    pub fn leaf_signed_by_openssl(&self, id: &str, digest: &str) -> Leaf {
        let key = SubjectKey::generate(KeySpec::EcdsaP256);
        self.leaf_signed_by_openssl_with_key(id, digest, &key.key_pem)
    }

    /// Like [`Ca::leaf_signed_by_openssl`] for a given subject key (any key
    /// openssl reads, e.g. from [`openssl_ec_key_pem`]).
    pub fn leaf_signed_by_openssl_with_key(&self, id: &str, digest: &str, key_pem: &str) -> Leaf {
        self.openssl_leaf(id, digest, key_pem, SPIRE_KEY_USAGE)
    }

    /// Like [`Ca::leaf_signed_by_openssl`] with another `keyUsage = ...`
    /// line of openssl's extension syntax (e.g. one not marked critical).
    pub fn leaf_signed_by_openssl_with_key_usage(
        &self,
        id: &str,
        digest: &str,
        key_usage: &str,
    ) -> Leaf {
        let key = SubjectKey::generate(KeySpec::EcdsaP256);
        self.openssl_leaf(id, digest, &key.key_pem, key_usage)
    }

    fn openssl_leaf(&self, id: &str, digest: &str, key_pem: &str, key_usage: &str) -> Leaf {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |name: &str| dir.path().join(name);
        std::fs::write(p("ca.pem"), &self.cert_pem).unwrap();
        std::fs::write(p("ca.key"), &self.key_pem).unwrap();
        std::fs::write(p("leaf.key"), key_pem).unwrap();
        std::fs::write(
            p("ext.cnf"),
            format!(
                "[v3]\n\
                 basicConstraints = critical, CA:FALSE\n\
                 {key_usage}\n\
                 extendedKeyUsage = serverAuth, clientAuth\n\
                 subjectAltName = URI:{id}\n"
            ),
        )
        .unwrap();
        openssl(
            dir.path(),
            &[
                "req",
                "-new",
                "-key",
                "leaf.key",
                "-subj",
                "/C=US/O=SPIRE",
                "-out",
                "leaf.csr",
            ],
        );
        openssl(
            dir.path(),
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &next_serial_hex(),
                "-days",
                "1",
                &format!("-{digest}"),
                "-extfile",
                "ext.cnf",
                "-extensions",
                "v3",
                "-out",
                "leaf.pem",
            ],
        );
        let leaf_pem = std::fs::read_to_string(p("leaf.pem")).unwrap();
        let leaf_der =
            CertificateDer::from_pem_slice(leaf_pem.as_bytes()).expect("openssl leaf PEM");
        self.assemble(id, leaf_der, leaf_pem, key_pem.to_string())
    }

    fn assemble(
        &self,
        id: &str,
        der: CertificateDer<'static>,
        pem: String,
        key_pem: String,
    ) -> Leaf {
        let mut chain_der = vec![der];
        let mut chain_pem = pem;
        for (der, pem) in &self.chain_tail {
            chain_der.push(der.clone());
            chain_pem.push_str(pem);
        }
        Leaf {
            id: id.to_string(),
            chain_der,
            chain_pem,
            key_pem,
            bundle_pem: self.root_pem.clone(),
        }
    }

    /// This CA's own certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// This CA's private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The root this CA chains to (itself for a root).
    pub fn root_der(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    /// The trust bundle PEM: the root.
    pub fn bundle_pem(&self) -> &str {
        &self.root_pem
    }

    /// The trust bundle of this CA's trust domain, holding its root.
    pub fn trust_bundle(&self) -> TrustBundle {
        trust_bundle(&self.trust_domain, &[self])
    }

    /// A bundle set holding only [`Ca::trust_bundle`].
    pub fn bundle_set(&self) -> BundleSet {
        bundle_set([self.trust_bundle()])
    }

    /// Writes the bundle as `bundle.pem` in `dir`.
    pub fn write_bundle(&self, dir: &Path) -> PathBuf {
        let path = dir.join("bundle.pem");
        std::fs::write(&path, &self.root_pem).expect("write bundle.pem");
        path
    }
}

/// The key usage line of a SPIRE-like leaf, in openssl's extension syntax.
const SPIRE_KEY_USAGE: &str =
    "keyUsage = critical, digitalSignature, keyEncipherment, keyAgreement";

fn next_serial_hex() -> String {
    format!("0x{}", hex(&next_serial().to_bytes()))
}

/// Lower-case hex, no separators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A bundle for `trust_domain` holding the roots of `cas` (e.g. two roots
/// during a CA rotation overlap).
pub fn trust_bundle(trust_domain: &str, cas: &[&Ca]) -> TrustBundle {
    let td = parse_trust_domain(trust_domain).expect("trust domain");
    let certs = cas.iter().map(|ca| ca.root_der.clone()).collect();
    TrustBundle::new(td, certs).expect("trust bundle")
}

/// A bundle set from bundles.
pub fn bundle_set(bundles: impl IntoIterator<Item = TrustBundle>) -> BundleSet {
    let mut set = BundleSet::new();
    for bundle in bundles {
        set.insert(bundle);
    }
    set
}

/// Customises a leaf before it is signed. Starts from [`leaf_params`].
pub struct LeafBuilder<'a> {
    ca: &'a Ca,
    id: String,
    params: CertificateParams,
    key: KeySpec,
}

impl LeafBuilder<'_> {
    /// Replaces all SANs.
    pub fn sans(mut self, sans: Vec<SanType>) -> Self {
        self.params.subject_alt_names = sans;
        self
    }

    /// Replaces all SANs with these URI SANs.
    pub fn uri_sans(self, uris: &[&str]) -> Self {
        self.sans(uris.iter().map(|u| uri_san(u)).collect())
    }

    /// Sets basicConstraints (`IsCa::NoCa` leaves the extension out).
    pub fn basic_constraints(mut self, is_ca: IsCa) -> Self {
        self.params.is_ca = is_ca;
        self
    }

    /// Replaces the key usages; empty leaves the extension out.
    pub fn key_usages(mut self, usages: Vec<KeyUsagePurpose>) -> Self {
        self.params.key_usages = usages;
        self
    }

    /// Replaces the extended key usages; empty leaves the extension out.
    pub fn extended_key_usages(mut self, usages: Vec<ExtendedKeyUsagePurpose>) -> Self {
        self.params.extended_key_usages = usages;
        self
    }

    /// Sets the validity window.
    pub fn validity(mut self, not_before: SystemTime, not_after: SystemTime) -> Self {
        set_validity(&mut self.params, not_before, not_after);
        self
    }

    /// Sets the serial number (big-endian bytes).
    pub fn serial(mut self, serial: &[u8]) -> Self {
        self.params.serial_number = Some(SerialNumber::from_slice(serial));
        self
    }

    /// Sets the subject key type (P-256 by default).
    pub fn key(mut self, key: KeySpec) -> Self {
        self.key = key;
        self
    }

    /// Any other change to the parameters.
    pub fn params(mut self, customise: impl FnOnce(&mut CertificateParams)) -> Self {
        customise(&mut self.params);
        self
    }

    /// Signs the leaf with the CA.
    pub fn build(self) -> Leaf {
        let key = SubjectKey::generate(self.key);
        let cert = key.sign_cert(&self.params, &self.ca.issuer);
        self.ca
            .assemble(&self.id, cert.der().clone(), cert.pem(), key.key_pem)
    }
}

/// An X509-SVID: the chain as a peer sends it and its key.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The SPIFFE ID it was made for (as given, even if not a valid ID).
    pub id: String,
    /// Leaf first, then the intermediates up to (not including) the root.
    pub chain_der: Vec<CertificateDer<'static>>,
    /// The same chain as concatenated PEM.
    pub chain_pem: String,
    /// The leaf's private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The root of the issuing CA, PEM.
    pub bundle_pem: String,
}

/// Paths written by [`Leaf::write_files`].
#[derive(Debug, Clone)]
pub struct SvidFiles {
    pub svid: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

impl Leaf {
    /// The leaf certificate alone.
    pub fn leaf_der(&self) -> &CertificateDer<'static> {
        &self.chain_der[0]
    }

    /// Writes `svid.pem` (chain), `svid.key` and `bundle.pem` into `dir`.
    pub fn write_files(&self, dir: &Path) -> SvidFiles {
        let files = SvidFiles {
            svid: dir.join("svid.pem"),
            key: dir.join("svid.key"),
            bundle: dir.join("bundle.pem"),
        };
        std::fs::write(&files.svid, &self.chain_pem).expect("write svid.pem");
        std::fs::write(&files.key, &self.key_pem).expect("write svid.key");
        std::fs::write(&files.bundle, &self.bundle_pem).expect("write bundle.pem");
        files
    }
}

/// Runs `openssl` in `dir`; panics with its stderr if it fails. Returns stdout.
pub fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run the openssl command line tool");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A PKCS#8 PEM EC key on a named curve of openssl's (`openssl ecparam
/// -list_curves`), including curves rcgen and rustls do not support.
pub fn openssl_ec_key_pem(curve: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    openssl(
        dir.path(),
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            &format!("ec_paramgen_curve:{curve}"),
            "-pkeyopt",
            "ec_param_enc:named_curve",
            "-out",
            "key.pem",
        ],
    );
    std::fs::read_to_string(dir.path().join("key.pem")).unwrap()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}
