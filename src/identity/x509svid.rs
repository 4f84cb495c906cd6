//! The X509-SVID rules: what makes a certificate a valid SVID leaf or SVID
//! signing certificate, independent of any trust bundle.
//!
//! These checks are the part of the SPIFFE X509-SVID spec that generic X.509
//! path validation (rustls-webpki, used in `tls::verify`) does not do: it
//! ignores key usage and knows nothing of URI SANs. Both our own SVIDs
//! (before they are published) and every peer chain go through here, so a
//! certificate we would refuse from a peer is never presented by us either.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::spiffe_id::{self, SpiffeId};

/// Smallest RSA modulus accepted anywhere in a chain.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a certificate breaks the X509-SVID rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidRuleError {
    #[error("certificate is not valid DER: {0}")]
    Malformed(String),
    #[error("leaf has no URI SAN, so it carries no SPIFFE ID")]
    NoUriSan,
    #[error("leaf has {0} URI SANs; an X509-SVID has exactly one")]
    ManyUriSans(usize),
    #[error("leaf URI SAN {uri:?} is not a workload SPIFFE ID: {reason}")]
    BadId {
        uri: String,
        reason: spiffe_id::IdError,
    },
    #[error("leaf is a CA certificate (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("leaf has no key usage extension (an X509-SVID needs digitalSignature)")]
    LeafNoKeyUsage,
    #[error("leaf key usage lacks digitalSignature")]
    LeafNoDigitalSignature,
    #[error("leaf key usage has keyCertSign, which only signing certificates may have")]
    LeafKeyCertSign,
    #[error("leaf key usage has cRLSign, which only signing certificates may have")]
    LeafCrlSign,
    #[error("signing certificate {subject:?} is not a CA (basicConstraints cA is not true)")]
    SignerNotCa { subject: String },
    #[error("signing certificate {subject:?} lacks keyCertSign in its key usage")]
    SignerNoKeyCertSign { subject: String },
    #[error("{which} has a weak key: RSA {bits} bits (at least {MIN_RSA_BITS} required)")]
    WeakRsaKey { which: String, bits: usize },
    #[error("{which} has an unsupported public key type ({oid})")]
    UnsupportedKey { which: String, oid: String },
    #[error("{which} is signed with {algorithm}, which is refused as weak")]
    WeakSignature {
        which: String,
        algorithm: &'static str,
    },
}

/// Facts about a leaf that passed the rules, for logs and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFacts {
    pub id: SpiffeId,
    /// Serial number as lower-case hex with colons stripped, as SPIRE logs it.
    pub serial: String,
    /// Validity bounds in seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

/// Checks a leaf against the X509-SVID rules and returns its SPIFFE ID.
pub fn check_leaf(der: &[u8]) -> Result<LeafFacts, SvidRuleError> {
    let cert = parse(der)?;
    let id = leaf_spiffe_id(&cert)?;

    let is_ca = cert
        .basic_constraints()
        .map_err(|e| SvidRuleError::Malformed(e.to_string()))?
        .is_some_and(|bc| bc.value.ca);
    if is_ca {
        return Err(SvidRuleError::LeafIsCa);
    }
    let key_usage = cert
        .key_usage()
        .map_err(|e| SvidRuleError::Malformed(e.to_string()))?
        .ok_or(SvidRuleError::LeafNoKeyUsage)?;
    let ku = key_usage.value;
    if !ku.digital_signature() {
        return Err(SvidRuleError::LeafNoDigitalSignature);
    }
    if ku.key_cert_sign() {
        return Err(SvidRuleError::LeafKeyCertSign);
    }
    if ku.crl_sign() {
        return Err(SvidRuleError::LeafCrlSign);
    }
    check_strength(&cert, "leaf")?;

    Ok(LeafFacts {
        id,
        serial: serial_hex(cert.tbs_certificate.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// Validity bounds of a certificate, in seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// Checks a certificate that signs others in an SVID chain (an intermediate):
/// it must be a CA with keyCertSign, and its key and signature must be strong.
/// Returns its validity bounds.
pub fn check_signer(der: &[u8]) -> Result<Validity, SvidRuleError> {
    let cert = parse(der)?;
    let validity = Validity {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    };
    let subject = cert.subject().to_string();
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| SvidRuleError::Malformed(e.to_string()))?
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(SvidRuleError::SignerNotCa { subject });
    }
    let can_sign = cert
        .key_usage()
        .map_err(|e| SvidRuleError::Malformed(e.to_string()))?
        .is_some_and(|ku| ku.value.key_cert_sign());
    if !can_sign {
        return Err(SvidRuleError::SignerNoKeyCertSign { subject });
    }
    check_strength(&cert, &format!("signing certificate {subject:?}"))?;
    Ok(validity)
}

/// The URI name constraints of a certificate, as "permitted URI:x" or
/// "excluded URI:x" (empty when it has none or does not parse).
pub fn uri_name_constraints(der: &[u8]) -> Vec<String> {
    let Ok(cert) = parse(der) else {
        return Vec::new();
    };
    let Ok(Some(constraints)) = cert.name_constraints() else {
        return Vec::new();
    };
    let nc = constraints.value;
    let mut out = Vec::new();
    for (kind, subtrees) in [
        ("permitted", &nc.permitted_subtrees),
        ("excluded", &nc.excluded_subtrees),
    ] {
        for subtree in subtrees.iter().flatten() {
            if let GeneralName::URI(uri) = subtree.base {
                out.push(format!("{kind} URI:{uri}"));
            }
        }
    }
    out
}

/// The SPIFFE ID of a leaf, with the one-URI-SAN rule applied.
fn leaf_spiffe_id(cert: &X509Certificate<'_>) -> Result<SpiffeId, SvidRuleError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidRuleError::Malformed(e.to_string()))?;
    let mut uris = san
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        });
    let uri = uris.next().ok_or(SvidRuleError::NoUriSan)?;
    let extra = uris.count();
    if extra > 0 {
        return Err(SvidRuleError::ManyUriSans(extra + 1));
    }
    spiffe_id::parse_workload_id(uri).map_err(|reason| SvidRuleError::BadId {
        uri: uri.to_string(),
        reason,
    })
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SvidRuleError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(SvidRuleError::Malformed(
            "trailing bytes after the certificate".into(),
        )),
        Err(e) => Err(SvidRuleError::Malformed(e.to_string())),
    }
}

/// Refuses RSA keys under 2048 bits, unknown key types and SHA-1/MD5
/// signatures. Path validation would refuse most of these too, but only with
/// a generic "unsupported algorithm"; an operator deserves the real reason.
fn check_strength(cert: &X509Certificate<'_>, which: &str) -> Result<(), SvidRuleError> {
    let spki = cert.public_key();
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) => {
            let bits = rsa_modulus_bits(rsa.modulus);
            if bits < MIN_RSA_BITS {
                return Err(SvidRuleError::WeakRsaKey {
                    which: which.to_string(),
                    bits,
                });
            }
        }
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|oid| oid.to_id_string())
                .unwrap_or_default();
            if !ACCEPTED_CURVES.contains(&curve.as_str()) {
                return Err(SvidRuleError::UnsupportedKey {
                    which: which.to_string(),
                    oid: format!("EC curve {curve} (only P-256, P-384 and P-521 are accepted)"),
                });
            }
        }
        // Ed25519 is fine; x509-parser reports it as Unknown.
        Ok(PublicKey::Unknown(_)) if spki.algorithm.algorithm.to_id_string() == OID_ED25519 => {}
        _ => {
            return Err(SvidRuleError::UnsupportedKey {
                which: which.to_string(),
                oid: spki.algorithm.algorithm.to_id_string(),
            })
        }
    }
    let sig_oid = cert.signature_algorithm.algorithm.to_id_string();
    if let Some(algorithm) = weak_signature_name(&sig_oid) {
        return Err(SvidRuleError::WeakSignature {
            which: which.to_string(),
            algorithm,
        });
    }
    Ok(())
}

const OID_ED25519: &str = "1.3.101.112";

/// NIST P-256, P-384 and P-521: the curves TLS 1.3 signs with.
const ACCEPTED_CURVES: [&str; 3] = ["1.2.840.10045.3.1.7", "1.3.132.0.34", "1.3.132.0.35"];

fn weak_signature_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "1.2.840.113549.1.1.4" => "md5WithRSAEncryption",
        "1.2.840.113549.1.1.5" => "sha1WithRSAEncryption",
        "1.2.840.10045.4.1" => "ecdsa-with-SHA1",
        "1.2.840.10040.4.3" => "dsa-with-sha1",
        "1.3.14.3.2.29" => "sha1WithRSASignature (OIW)",
        "1.2.840.113549.1.1.2" => "md2WithRSAEncryption",
        "1.2.840.113549.1.1.3" => "md4WithRSAEncryption",
        _ => return None,
    })
}

/// A serial number as lower-case hex without DER's leading zero bytes, the
/// way `openssl x509 -serial` prints it.
fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// Bit length of a big-endian unsigned modulus, ignoring DER's sign padding.
fn rsa_modulus_bits(modulus: &[u8]) -> usize {
    let significant = match modulus.iter().position(|&b| b != 0) {
        Some(i) => &modulus[i..],
        None => return 0,
    };
    (significant.len() - 1) * 8 + (8 - significant[0].leading_zeros() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modulus_bits_ignore_padding() {
        assert_eq!(rsa_modulus_bits(&[0x00, 0x80, 0, 0]), 24);
        assert_eq!(rsa_modulus_bits(&[0x01, 0xff]), 9);
        assert_eq!(rsa_modulus_bits(&[]), 0);
        let mut m = vec![0u8];
        m.extend(std::iter::repeat_n(0xffu8, 256));
        assert_eq!(rsa_modulus_bits(&m), 2048);
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        assert!(matches!(
            check_leaf(b"not a cert"),
            Err(SvidRuleError::Malformed(_))
        ));
        assert!(matches!(
            check_signer(&[0x30, 0x82, 0xff]),
            Err(SvidRuleError::Malformed(_))
        ));
    }
}
