//! Strict SPIFFE ID parsing, shared by the verifier, the policy and the config.
//!
//! The `spiffe` crate's [`SpiffeId`] does the grammar (allowed characters, no
//! empty or dot segments, no trailing slash), but it is lenient where a
//! security boundary should not be: it lower-cases an upper-case scheme or
//! trust domain and it does not bound the length. Two spellings of one
//! identity would let a policy written for one miss the other, so here an ID
//! is accepted only in its canonical form, exactly as go-spiffe and SPIRE
//! accept it, and never longer than the 2048 bytes the SPIFFE-ID spec asks
//! every implementation to support.

pub use spiffe::{SpiffeId, TrustDomain};

/// Longest SPIFFE ID accepted, in bytes, including `spiffe://`.
pub const MAX_ID_LEN: usize = 2048;

const SCHEME_PREFIX: &str = "spiffe://";

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("not a SPIFFE ID: it must start with \"spiffe://\" in lower case")]
    Scheme,
    #[error("SPIFFE ID is {0} bytes long, more than the {MAX_ID_LEN} allowed")]
    TooLong(usize),
    #[error("trust domain must be lower case (SPIFFE IDs have one canonical spelling)")]
    UpperCaseTrustDomain,
    #[error("trust domain is missing")]
    MissingTrustDomain,
    #[error("an X509-SVID needs a workload path; \"{0}\" names only the trust domain")]
    RootId(String),
    #[error("invalid SPIFFE ID: {0}")]
    Grammar(String),
}

/// Parses a SPIFFE ID that must be in canonical form.
pub fn parse(s: &str) -> Result<SpiffeId, IdError> {
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(s.len()));
    }
    let rest = s.strip_prefix(SCHEME_PREFIX).ok_or(IdError::Scheme)?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if authority.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(IdError::UpperCaseTrustDomain);
    }
    SpiffeId::new(s).map_err(|e| IdError::Grammar(e.to_string()))
}

/// Parses the SPIFFE ID of a workload: canonical and with a non-root path,
/// as the X509-SVID spec requires of a leaf certificate.
pub fn parse_workload_id(s: &str) -> Result<SpiffeId, IdError> {
    let id = parse(s)?;
    if id.path().is_empty() {
        return Err(IdError::RootId(s.to_string()));
    }
    Ok(id)
}

/// Parses a trust domain name (`example.org`), canonical form only.
pub fn parse_trust_domain(s: &str) -> Result<TrustDomain, IdError> {
    if s.is_empty() {
        return Err(IdError::MissingTrustDomain);
    }
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(IdError::UpperCaseTrustDomain);
    }
    if s.contains('/') || s.contains(':') {
        return Err(IdError::Grammar(format!(
            "\"{s}\" is not a trust domain name (give the name alone, like example.org)"
        )));
    }
    TrustDomain::new(s).map_err(|e| IdError::Grammar(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_canonical_ids() {
        let id = parse("spiffe://example.org/ns/prod/sa/web").unwrap();
        assert_eq!(id.trust_domain().as_str(), "example.org");
        assert_eq!(id.path(), "/ns/prod/sa/web");
        assert!(parse("spiffe://example.org").is_ok());
        assert!(parse("spiffe://a-b_c.d9/Path_With.Mixed-Case").is_ok());
    }

    #[test]
    fn refuses_upper_case_scheme_and_trust_domain() {
        assert_eq!(parse("SPIFFE://example.org/a"), Err(IdError::Scheme));
        assert_eq!(
            parse("spiffe://Example.org/a"),
            Err(IdError::UpperCaseTrustDomain)
        );
        assert_eq!(
            parse_trust_domain("EXAMPLE.org"),
            Err(IdError::UpperCaseTrustDomain)
        );
    }

    #[test]
    fn refuses_other_schemes_and_missing_parts() {
        for s in [
            "https://example.org/a",
            "spiffe:/example.org/a",
            "example.org/a",
            "",
            "spiffe://",
            "spiffe:///a",
        ] {
            assert!(parse(s).is_err(), "{s} accepted");
        }
    }

    #[test]
    fn refuses_bad_paths() {
        for s in [
            "spiffe://example.org/a%20b",
            "spiffe://example.org/%2e%2e",
            "spiffe://example.org/a/./b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/",
            "spiffe://example.org/",
            "spiffe://example.org/a?x=1",
            "spiffe://example.org/a#frag",
            "spiffe://user@example.org/a",
            "spiffe://example.org:8443/a",
            "spiffe://example.org/caf\u{e9}",
        ] {
            assert!(parse(s).is_err(), "{s} accepted");
        }
    }

    #[test]
    fn length_limit_is_2048_bytes() {
        let prefix = "spiffe://example.org/";
        let ok = format!("{prefix}{}", "a".repeat(MAX_ID_LEN - prefix.len()));
        assert_eq!(ok.len(), 2048);
        assert!(parse(&ok).is_ok());
        let long = format!("{ok}b");
        assert_eq!(parse(&long), Err(IdError::TooLong(2049)));
    }

    #[test]
    fn workload_ids_need_a_path() {
        assert!(matches!(
            parse_workload_id("spiffe://example.org"),
            Err(IdError::RootId(_))
        ));
        assert!(parse_workload_id("spiffe://example.org/w").is_ok());
    }
}
