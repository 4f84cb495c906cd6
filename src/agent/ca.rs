//! The dev agent's certificate authority and the X509-SVID template.
//!
//! This file owns every certificate the agent makes: the self-signed root CA
//! of the trust domain and the workload SVIDs it signs. Both follow SPIRE's
//! own templates (`pkg/server/credtemplate` in SPIRE), because the point of
//! the dev agent is that software tested against it behaves the same against
//! a real SPIRE agent:
//!
//! * CA: subject C=US, O=SPIFFE plus a serialNumber attribute equal to the
//!   certificate serial (SPIRE does this so that successive CAs have distinct
//!   subjects), URI SAN `spiffe://<td>`, CA:true and keyCertSign + cRLSign,
//!   both critical.
//! * SVID: subject C=US, O=SPIRE, exactly one URI SAN, CA:false, critical key
//!   usage digitalSignature + keyEncipherment + keyAgreement, EKU serverAuth +
//!   clientAuth, subject and authority key identifiers, a fresh P-256 key.
//! * Both: a random 128-bit serial and NotBefore backdated by 10 s for clock
//!   skew (SPIRE's `NotBeforeCushion`); an SVID never outlives its CA.
//!
//! Times are whole seconds in a certificate, so NotAfter is rounded up and
//! NotBefore down: a certificate is never shorter-lived than asked for.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use super::AgentError;
use crate::identity::x509svid;
use crate::spiffe_id::{SpiffeId, TrustDomain};

/// How far NotBefore is set into the past, for peers whose clocks lag ours.
pub(crate) const BACKDATE: Duration = Duration::from_secs(10);

/// OID of the X.520 serialNumber attribute (2.5.4.5).
const OID_SERIAL_NUMBER: [u64; 4] = [2, 5, 4, 5];

/// A signing CA of our trust domain: its certificate and key.
pub(crate) struct Ca {
    pub(crate) der: CertificateDer<'static>,
    /// Lower-case hex, no leading zero bytes (as `openssl x509 -serial`).
    pub(crate) serial: String,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs and panic messages.
        f.debug_struct("Ca")
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Why a stored CA cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LoadError {
    #[error("the private key does not belong to the certificate")]
    KeyMismatch,
    #[error("{0}")]
    Invalid(String),
}

/// One issued X509-SVID with its key and the times that drive its rotation.
#[derive(Debug)]
pub(crate) struct IssuedSvid {
    pub(crate) id: SpiffeId,
    /// The leaf; our CAs are roots, so the chain sent is the leaf alone.
    pub(crate) cert: CertificateDer<'static>,
    /// PKCS#8 DER, as the Workload API sends it.
    pub(crate) key_pkcs8: Vec<u8>,
    pub(crate) serial: String,
    pub(crate) not_after: SystemTime,
    /// Half-way between issuance and `not_after`: the backdate is for
    /// clock skew, not lifetime, and counting it would make a 2 s SVID
    /// "half expired" the moment it is born.
    pub(crate) renew_at: SystemTime,
    /// Serial of the CA that signed it.
    pub(crate) signer: String,
}

impl Ca {
    /// For tests elsewhere in the crate: an identity holding one fresh SVID
    /// for `id` (valid for `ttl`) and this CA as the bundle of its trust
    /// domain.
    #[cfg(test)]
    pub(crate) fn identity_for(&self, id: &str, ttl: Duration) -> crate::identity::Identity {
        use crate::identity::{BundleSet, Identity, Svid, TrustBundle};
        use rustls_pki_types::PrivatePkcs8KeyDer;
        let id = crate::spiffe_id::parse_workload_id(id).unwrap();
        let issued = self.issue(&id, SystemTime::now(), ttl).unwrap();
        let svid = Svid::from_der(
            vec![issued.cert.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.key_pkcs8.clone())),
            &rustls::crypto::aws_lc_rs::default_provider(),
        )
        .unwrap();
        let mut bundles = BundleSet::new();
        bundles
            .insert(TrustBundle::new(id.trust_domain().clone(), vec![self.der.clone()]).unwrap());
        Identity::new(vec![svid], bundles, SystemTime::now()).unwrap()
    }

    /// A fresh P-256 root CA for `trust_domain`, valid for `ttl` from `now`.
    pub(crate) fn generate(
        trust_domain: &TrustDomain,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<Self, AgentError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_error)?;
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "US");
        dn.push(DnType::OrganizationName, "SPIFFE");
        dn.push(
            DnType::CustomDnType(OID_SERIAL_NUMBER.to_vec()),
            DnValue::PrintableString(
                u128_decimal(&serial)
                    .as_str()
                    .try_into()
                    .map_err(cert_error)?,
            ),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![uri_san(&format!("spiffe://{trust_domain}"))?];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let not_before = floor_secs(now).checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH);
        let not_after = ceil_secs(now.checked_add(ttl).ok_or(AgentError::TimeOutOfRange)?);
        set_validity(&mut params, not_before, not_after)?;
        let cert = params.self_signed(&key).map_err(cert_error)?;
        Ok(Self {
            der: cert.der().clone(),
            serial: hex_without_leading_zeros(&serial),
            not_before,
            not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from PEM: one certificate and its PKCS#8 key. The error
    /// does not name files; the caller knows which they were.
    pub(crate) fn from_pem(
        trust_domain: &TrustDomain,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, LoadError> {
        Self::from_pem_inner(trust_domain, cert_pem, key_pem)
            .map_err(|e| e.unwrap_or(LoadError::KeyMismatch))
    }

    /// `Err(None)` is a key mismatch; `Err(Some(reason))` anything else.
    fn from_pem_inner(
        trust_domain: &TrustDomain,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, Option<LoadError>> {
        let invalid = |s: String| Some(LoadError::Invalid(s));
        let der = CertificateDer::from_pem_slice(cert_pem)
            .map_err(|e| invalid(format!("no PEM certificate ({e})")))?;
        let key = match PrivateKeyDer::from_pem_slice(key_pem) {
            Ok(PrivateKeyDer::Pkcs8(key)) => key,
            Ok(_) => {
                return Err(invalid(
                    "the key is not PKCS#8 (convert it with `openssl pkcs8 -topk8 -nocrypt`)"
                        .into(),
                ))
            }
            Err(e) => return Err(invalid(format!("no PEM private key ({e})"))),
        };
        let key =
            KeyPair::try_from(&key).map_err(|e| invalid(format!("unusable private key: {e}")))?;
        x509svid::check_signer(&der).map_err(|e| invalid(format!("not a usable CA: {e}")))?;
        let cert = match X509Certificate::from_der(&der) {
            Ok((_, cert)) => cert,
            Err(e) => return Err(invalid(format!("bad certificate: {e}"))),
        };
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(None);
        }
        if let Some(uri) = ca_uri_san(&cert).map_err(invalid)? {
            let expected = format!("spiffe://{trust_domain}");
            if uri != expected {
                return Err(invalid(format!(
                    "the CA is for {uri}, not for this agent's trust domain {expected}"
                )));
            }
        }
        let not_before = unix_secs(cert.validity().not_before.timestamp()).map_err(invalid)?;
        let not_after = unix_secs(cert.validity().not_after.timestamp()).map_err(invalid)?;
        let serial = hex_without_leading_zeros(cert.tbs_certificate.raw_serial());
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| invalid(format!("unusable CA: {e}")))?;
        Ok(Self {
            der,
            serial,
            not_before,
            not_after,
            issuer,
        })
    }

    pub(crate) fn cert_pem(&self) -> String {
        pem_encode("CERTIFICATE", &self.der)
    }

    /// The key as PKCS#8 PEM, for `--ca-dir`.
    pub(crate) fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// When the CA was made: NotBefore plus the backdate (SPIRE measures
    /// CA life from issuance). Never past NotAfter, whatever a loaded
    /// certificate says.
    pub(crate) fn issued_at(&self) -> SystemTime {
        (self.not_before + BACKDATE).min(self.not_after)
    }

    fn at_fraction(&self, numerator: u32, denominator: u32) -> SystemTime {
        let issued = self.issued_at();
        let life = self.not_after.duration_since(issued).unwrap_or_default();
        issued + life * numerator / denominator
    }

    /// Half-way through its life: time to prepare the next CA.
    pub(crate) fn prepare_at(&self) -> SystemTime {
        self.at_fraction(1, 2)
    }

    /// Three quarters through its life: time to hand signing to the next CA.
    pub(crate) fn activate_at(&self) -> SystemTime {
        self.at_fraction(3, 4)
    }

    /// Issues an X509-SVID for `id`, valid for `ttl` from `now` but never
    /// beyond this CA's own NotAfter (SPIRE caps it the same way).
    pub(crate) fn issue(
        &self,
        id: &SpiffeId,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<IssuedSvid, AgentError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_error)?;
        let serial = random_serial()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "US");
        dn.push(DnType::OrganizationName, "SPIRE");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        // rcgen always marks key usage critical, as SPIRE's SVIDs have it.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
            KeyUsagePurpose::KeyAgreement,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![uri_san(&id.to_string())?];
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let not_before = floor_secs(now).checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH);
        let wanted = ceil_secs(now.checked_add(ttl).ok_or(AgentError::TimeOutOfRange)?);
        let not_after = wanted.min(self.not_after);
        set_validity(&mut params, not_before, not_after)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_error)?;
        let life = not_after.duration_since(now).unwrap_or_default();
        Ok(IssuedSvid {
            id: id.clone(),
            cert: cert.der().clone(),
            key_pkcs8: key.serialize_der(),
            serial: hex_without_leading_zeros(&serial),
            not_after,
            renew_at: now + life / 2,
            signer: self.serial.clone(),
        })
    }
}

fn cert_error(e: rcgen::Error) -> AgentError {
    AgentError::Certificate(e.to_string())
}

fn uri_san(uri: &str) -> Result<SanType, AgentError> {
    Ok(SanType::URI(uri.try_into().map_err(cert_error)?))
}

/// The URI SAN of a CA certificate, if it has one; more than one is refused
/// because the CA of a trust domain names exactly that trust domain.
fn ca_uri_san(cert: &X509Certificate<'_>) -> Result<Option<String>, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?;
    let uris: Vec<&str> = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Ok(None),
        [uri] => Ok(Some((*uri).to_string())),
        _ => Err(format!("the CA has {} URI SANs; expected one", uris.len())),
    }
}

/// 16 random bytes from the crypto provider's CSPRNG; never all zero (a
/// zero serial is not allowed by RFC 5280).
fn random_serial() -> Result<[u8; 16], AgentError> {
    let random = rustls::crypto::aws_lc_rs::default_provider().secure_random;
    loop {
        let mut serial = [0u8; 16];
        random.fill(&mut serial).map_err(|_| AgentError::Random)?;
        if serial.iter().any(|&b| b != 0) {
            return Ok(serial);
        }
    }
}

fn u128_decimal(bytes: &[u8; 16]) -> String {
    u128::from_be_bytes(*bytes).to_string()
}

/// Lower-case hex without leading zero bytes, matching how
/// `identity::x509svid` reports serials.
pub(crate) fn hex_without_leading_zeros(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

fn floor_secs(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn ceil_secs(t: SystemTime) -> SystemTime {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs() + u64::from(since.subsec_nanos() > 0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn unix_secs(secs: i64) -> Result<SystemTime, String> {
    u64::try_from(secs)
        .ok()
        .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .ok_or_else(|| "validity dates before 1970 are not supported".to_string())
}

/// Sets a certificate's validity window. rcgen's date type comes from the
/// `time` crate, which is not a dependency of ours to name, so the values
/// are built in place and their type inferred.
fn set_validity(
    params: &mut CertificateParams,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<(), AgentError> {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let since = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| Duration::from_secs(d.as_secs()))
            .map_err(|_| AgentError::TimeOutOfRange)
    };
    params.not_before = epoch
        .checked_add(
            since(not_before)?
                .try_into()
                .map_err(|_| AgentError::TimeOutOfRange)?,
        )
        .ok_or(AgentError::TimeOutOfRange)?;
    params.not_after = epoch
        .checked_add(
            since(not_after)?
                .try_into()
                .map_err(|_| AgentError::TimeOutOfRange)?,
        )
        .ok_or(AgentError::TimeOutOfRange)?;
    Ok(())
}

/// PEM text of one DER object (RFC 7468: base64, 64 columns), with LF line
/// endings as SPIRE and OpenSSL write it.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new(label, der), config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{BundleSet, Svid, TrustBundle};
    use crate::spiffe_id::{parse_trust_domain, parse_workload_id};
    use crate::tls::verify::{to_unix_time, verify_svid_chain, PeerRole};
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use x509_parser::oid_registry;

    fn td() -> TrustDomain {
        parse_trust_domain("example.org").unwrap()
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        let (rest, cert) = X509Certificate::from_der(der).unwrap();
        assert!(rest.is_empty());
        cert
    }

    fn svid_from(issued: &IssuedSvid) -> Result<Svid, crate::identity::IdentityError> {
        Svid::from_der(
            vec![issued.cert.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.key_pkcs8.clone())),
            &rustls::crypto::aws_lc_rs::default_provider(),
        )
    }

    #[test]
    fn svid_passes_our_own_rules_and_chains_to_the_ca() {
        let now = SystemTime::now();
        let ca = Ca::generate(&td(), now, Duration::from_secs(3600)).unwrap();
        let id = parse_workload_id("spiffe://example.org/web").unwrap();
        let issued = ca.issue(&id, now, Duration::from_secs(60)).unwrap();
        let svid = svid_from(&issued).expect("our SVID must pass our own X509-SVID rules");
        assert_eq!(svid.id, id);
        assert_eq!(svid.serial, issued.serial);

        let mut bundles = BundleSet::new();
        bundles.insert(TrustBundle::new(td(), vec![ca.der.clone()]).unwrap());
        let peer = verify_svid_chain(
            std::slice::from_ref(&issued.cert),
            &bundles,
            to_unix_time(now),
            PeerRole::Any,
        )
        .unwrap();
        assert_eq!(peer.id, id);
    }

    #[test]
    fn svid_template_is_spires() {
        let now = SystemTime::now();
        let ca = Ca::generate(&td(), now, Duration::from_secs(3600)).unwrap();
        let id = parse_workload_id("spiffe://example.org/ns/prod/web").unwrap();
        let issued = ca.issue(&id, now, Duration::from_secs(120)).unwrap();
        let cert = parse(&issued.cert);

        assert_eq!(cert.subject().to_string(), "C=US, O=SPIRE");
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.digital_signature());
        assert!(ku.value.key_encipherment());
        assert!(ku.value.key_agreement());
        assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(!bc.value.ca);
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://example.org/ns/prod/web")]
        );
        let has = |oid| cert.extensions().iter().any(|e| e.oid == oid);
        assert!(has(oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER));
        assert!(has(oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER));
        assert_eq!(
            cert.signature_algorithm.algorithm,
            oid_registry::OID_SIG_ECDSA_WITH_SHA256
        );

        let now_secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert_eq!(cert.validity().not_before.timestamp(), now_secs - 10);
        let not_after = cert.validity().not_after.timestamp();
        assert!((now_secs + 120..=now_secs + 121).contains(&not_after));

        let raw = cert.tbs_certificate.raw_serial();
        let significant = raw.iter().skip_while(|&&b| b == 0).count();
        assert!(
            (1..=16).contains(&significant),
            "serial has {significant} bytes"
        );
        assert_eq!(hex_without_leading_zeros(raw), issued.serial);
    }

    #[test]
    fn every_svid_has_a_new_key_and_serial() {
        let now = SystemTime::now();
        let ca = Ca::generate(&td(), now, Duration::from_secs(3600)).unwrap();
        let id = parse_workload_id("spiffe://example.org/web").unwrap();
        let a = ca.issue(&id, now, Duration::from_secs(60)).unwrap();
        let b = ca.issue(&id, now, Duration::from_secs(60)).unwrap();
        assert_ne!(a.serial, b.serial);
        assert_ne!(a.key_pkcs8, b.key_pkcs8);
    }

    #[test]
    fn ca_template_is_spires() {
        let now = SystemTime::now();
        let ca = Ca::generate(&td(), now, Duration::from_secs(7200)).unwrap();
        let cert = parse(&ca.der);
        let subject = cert.subject().to_string();
        assert!(subject.starts_with("C=US, O=SPIFFE"), "{subject}");
        let serial_attr = cert
            .subject()
            .iter_attributes()
            .find(|a| a.attr_type().to_id_string() == "2.5.4.5")
            .and_then(|a| a.as_str().ok())
            .unwrap()
            .to_string();
        assert_eq!(serial_attr, cert.serial.to_str_radix(10));
        let bc = cert.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        let ku = cert.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://example.org")]
        );
        x509svid::check_signer(&ca.der).unwrap();
        assert!(matches!(
            cert.public_key().parsed(),
            Ok(x509_parser::public_key::PublicKey::EC(_))
        ));
        let life = ca.not_after.duration_since(ca.not_before).unwrap();
        assert!(life >= Duration::from_secs(7210) && life <= Duration::from_secs(7211));
        // Thresholds are measured from issuance, not from the backdated NotBefore.
        assert!(ca.prepare_at() >= now + Duration::from_secs(3599));
        assert!(ca.activate_at() >= now + Duration::from_secs(5399));
    }

    #[test]
    fn svid_is_capped_at_the_ca_expiry() {
        let now = SystemTime::now();
        let ca = Ca::generate(&td(), now, Duration::from_secs(30)).unwrap();
        let id = parse_workload_id("spiffe://example.org/web").unwrap();
        let issued = ca.issue(&id, now, Duration::from_secs(3600)).unwrap();
        assert_eq!(issued.not_after, ca.not_after);
        let cert = parse(&issued.cert);
        assert_eq!(
            cert.validity().not_after.timestamp(),
            ca.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
        );
    }

    #[test]
    fn ca_round_trips_through_pem() {
        let now = SystemTime::now();
        let ca = Ca::generate(&td(), now, Duration::from_secs(600)).unwrap();
        let loaded =
            Ca::from_pem(&td(), ca.cert_pem().as_bytes(), ca.key_pem().as_bytes()).unwrap();
        assert_eq!(loaded.der, ca.der);
        assert_eq!(loaded.serial, ca.serial);
        assert_eq!(loaded.not_after, ca.not_after);
        assert_eq!(loaded.not_before, ca.not_before);
        // A loaded CA signs SVIDs that chain to it.
        let id = parse_workload_id("spiffe://example.org/web").unwrap();
        let issued = loaded.issue(&id, now, Duration::from_secs(60)).unwrap();
        svid_from(&issued).unwrap();
        let mut bundles = BundleSet::new();
        bundles.insert(TrustBundle::new(td(), vec![ca.der.clone()]).unwrap());
        verify_svid_chain(&[issued.cert], &bundles, to_unix_time(now), PeerRole::Any).unwrap();
    }

    #[test]
    fn loading_refuses_wrong_keys_and_foreign_cas() {
        let now = SystemTime::now();
        let a = Ca::generate(&td(), now, Duration::from_secs(600)).unwrap();
        let b = Ca::generate(&td(), now, Duration::from_secs(600)).unwrap();
        assert_eq!(
            Ca::from_pem(&td(), a.cert_pem().as_bytes(), b.key_pem().as_bytes()).unwrap_err(),
            LoadError::KeyMismatch
        );
        let other = parse_trust_domain("other.org").unwrap();
        let err = Ca::from_pem(&other, a.cert_pem().as_bytes(), a.key_pem().as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("spiffe://example.org"), "{err}");
        assert!(Ca::from_pem(&td(), b"junk", a.key_pem().as_bytes()).is_err());
        assert!(Ca::from_pem(&td(), a.cert_pem().as_bytes(), b"junk").is_err());
        // A leaf is not a CA.
        let id = parse_workload_id("spiffe://example.org/web").unwrap();
        let leaf = a.issue(&id, now, Duration::from_secs(60)).unwrap();
        let leaf_pem = pem_encode("CERTIFICATE", &leaf.cert);
        let key_pem = pem_encode("PRIVATE KEY", &leaf.key_pkcs8);
        let err = Ca::from_pem(&td(), leaf_pem.as_bytes(), key_pem.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("not a usable CA"), "{err}");
    }

    #[test]
    fn pem_encoding_round_trips() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 1000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &data);
            if len == 0 {
                continue; // an empty body is not a certificate anyone parses
            }
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
            assert_eq!(back.as_ref(), data.as_slice(), "length {len}");
            assert!(pem.lines().all(|l| l.len() <= 64 || l.starts_with("-----")));
        }
        assert_eq!(
            pem_encode("CERTIFICATE", b"abcd"),
            "-----BEGIN CERTIFICATE-----\nYWJjZA==\n-----END CERTIFICATE-----\n"
        );
    }

    #[test]
    fn serial_hex_strips_leading_zero_bytes() {
        assert_eq!(hex_without_leading_zeros(&[0, 0, 0x0a, 0xff]), "0aff");
        assert_eq!(hex_without_leading_zeros(&[0]), "00");
        assert_eq!(hex_without_leading_zeros(&[0x80, 1]), "8001");
    }
}
