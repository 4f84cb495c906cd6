//! The PROXY protocol v2 header an inbound tunnel with `proxy_protocol = true`
//! writes to its target, once per authorized connection and before any byte
//! of the client's.
//!
//! The target sees a plain TCP connection from us; the header tells it who is
//! really on the other side: the original source and destination addresses of
//! the TLS connection, that the connection was TLS with a verified client
//! certificate (`PP2_TYPE_SSL`), and the peer's SPIFFE ID in a TLV of its own
//! ([`PP2_TYPE_SPIFFE_ID`]), so the target can make its own decisions by
//! workload identity. The format is HAProxy's
//! <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>, understood
//! by HAProxy (`accept-proxy`), nginx, Envoy and most proxy libraries.
//!
//! This module only encodes; it never reads a header, so it holds no parser
//! (the integration tests carry an independent decoder in
//! `tests/common/pp2.rs`). The header is built in one allocation of exactly
//! its size, since the data path writes it once per connection.
//!
//! Why ours and not the `ppp` crate's v2 `Builder` (2.3): the builder
//! writes only the fixed part and the addresses for us. `PP2_TYPE_SSL` has
//! sub-TLVs, which ppp leaves to the caller byte by byte (its own nested-TLV
//! example pushes the type, a `u16` length and the body as separate
//! payloads), so the hardest part stays hand-written either way; a mixed
//! IPv4/IPv6 pair becomes `Addresses::Unspecified` (no addresses at all), so
//! the IPv4-mapped fallback below stays too; and every step returns an
//! `io::Result` for length overflows that [`MAX_VALUE_LEN`] already rules
//! out at compile time, which the per-connection path would have to map
//! to an error that cannot happen. The code saved (signature, family byte,
//! length, four address fields) is about what the glue would cost.
//!
//! Layout written (all integers big-endian):
//!
//! ```text
//! signature   \r\n\r\n\0\r\nQUIT\n                        12 bytes
//! ver/cmd     0x21  (version 2, PROXY)                       1
//! family      0x11 TCP over IPv4 | 0x21 TCP over IPv6        1
//! length      bytes that follow                              2
//! addresses   src ip, dst ip, src port, dst port             12 | 36
//! TLV 0x20    PP2_TYPE_SSL: client = 0x03, verify = 0 (u32),
//!               sub-TLV 0x21 PP2_SUBTYPE_SSL_VERSION ("TLSv1.3")
//!               sub-TLV 0x23 PP2_SUBTYPE_SSL_CIPHER (if known)
//! TLV 0xE0    PP2_TYPE_SPIFFE_ID: the peer's SPIFFE ID, UTF-8
//! ```
//!
//! No `PP2_TYPE_CRC32C`: the header travels over a local TCP or loopback
//! connection that already carries a checksum, the spec makes the TLV
//! optional, and computing it would cost a pass over every header for
//! nothing a receiver needs.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2 (high nibble), command PROXY (low nibble).
const VERSION_2_PROXY: u8 = 0x21;
/// AF_INET (high nibble), SOCK_STREAM (low nibble).
const TCP_OVER_IPV4: u8 = 0x11;
/// AF_INET6 (high nibble), SOCK_STREAM (low nibble).
const TCP_OVER_IPV6: u8 = 0x21;

/// TLV type of the TLS information, with sub-TLVs inside.
pub const PP2_TYPE_SSL: u8 = 0x20;
/// Sub-TLV of [`PP2_TYPE_SSL`]: the TLS version, as OpenSSL names it ("TLSv1.3").
pub const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
/// Sub-TLV of [`PP2_TYPE_SSL`]: the cipher suite, as OpenSSL names it.
pub const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
/// `client` bit: the client connected over TLS.
pub const PP2_CLIENT_SSL: u8 = 0x01;
/// `client` bit: the client presented a certificate on this connection.
/// (`PP2_CLIENT_CERT_SESS`, 0x04, is never set: we do not resume sessions.)
pub const PP2_CLIENT_CERT_CONN: u8 = 0x02;
/// TLV type carrying the peer's SPIFFE ID (UTF-8 URI), from the range the
/// spec reserves for custom use (0xE0-0xEF).
pub const PP2_TYPE_SPIFFE_ID: u8 = 0xE0;

/// Signature, ver/cmd, family and the length field.
const FIXED_LEN: usize = 16;
/// Type and the two length bytes of a TLV.
const TLV_HEADER_LEN: usize = 3;
/// `client` (u8) and `verify` (u32) before the sub-TLVs of [`PP2_TYPE_SSL`].
const SSL_FIXED_LEN: usize = 5;
/// Two IPv4 addresses and two ports.
const IPV4_BLOCK_LEN: usize = 12;
/// Two IPv6 addresses and two ports.
const IPV6_BLOCK_LEN: usize = 36;

/// The longest value put in one TLV; a longer one is left out, not cut.
///
/// Every length in the header is a `u16`. A SPIFFE ID is at most 2048 bytes
/// (the verifier refuses longer ones) and TLS version and cipher names are a
/// few dozen, so this never bites in practice; it is what makes an overflow
/// impossible whatever the caller passes. A value is omitted rather than
/// truncated because a truncated SPIFFE ID may well be another, valid one
/// (`spiffe://td/admin-readonly` → `spiffe://td/admin`).
pub const MAX_VALUE_LEN: usize = 4096;

/// The largest header [`ProxyHeader::encode`] can produce.
const MAX_HEADER_LEN: usize = FIXED_LEN
    + IPV6_BLOCK_LEN
    + TLV_HEADER_LEN
    + SSL_FIXED_LEN
    + 2 * (TLV_HEADER_LEN + MAX_VALUE_LEN)
    + TLV_HEADER_LEN
    + MAX_VALUE_LEN;
// Every length field fits a u16, so the conversions below never saturate.
const _: () = assert!(MAX_HEADER_LEN - FIXED_LEN <= u16::MAX as usize);

/// What one header says about one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader<'a> {
    /// The TLS client's address (the peer tunnel).
    pub source: SocketAddr,
    /// The address the TLS client connected to (our listener).
    pub destination: SocketAddr,
    /// The negotiated TLS version, named as OpenSSL does ("TLSv1.3");
    /// [`tls_version_name`] converts from rustls.
    pub tls_version: &'a str,
    /// The negotiated cipher suite, named as OpenSSL does
    /// ("TLS_AES_128_GCM_SHA256"); [`cipher_name`] converts from rustls.
    pub cipher: Option<&'a str>,
    /// The peer's verified and authorized SPIFFE ID.
    pub spiffe_id: &'a str,
}

impl ProxyHeader<'_> {
    /// The complete header, in one allocation of exactly its length.
    pub fn encode(&self) -> Vec<u8> {
        let version = fitting(self.tls_version);
        let cipher = self.cipher.and_then(fitting);
        let spiffe_id = fitting(self.spiffe_id);

        let (family, address_len) = match (self.source, self.destination) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => (TCP_OVER_IPV4, IPV4_BLOCK_LEN),
            _ => (TCP_OVER_IPV6, IPV6_BLOCK_LEN),
        };
        let ssl_value_len = SSL_FIXED_LEN + tlv_len(version) + tlv_len(cipher);
        let body_len = address_len + TLV_HEADER_LEN + ssl_value_len + tlv_len(spiffe_id);

        let mut out = Vec::with_capacity(FIXED_LEN + body_len);
        out.extend_from_slice(&SIGNATURE);
        out.push(VERSION_2_PROXY);
        out.push(family);
        out.extend_from_slice(&be16(body_len));

        if family == TCP_OVER_IPV4 {
            out.extend_from_slice(&ipv4_octets(self.source.ip()));
            out.extend_from_slice(&ipv4_octets(self.destination.ip()));
        } else {
            // Both addresses of one header share one family. When only one
            // side is IPv4 (a dual-stack listener reached over IPv4 while the
            // other end is IPv6, or the reverse), it travels as its
            // IPv4-mapped IPv6 address (::ffff:a.b.c.d, RFC 4291 2.5.5.2):
            // the same address as the kernel itself reports it on a
            // dual-stack socket, and every receiver parses it as IPv6.
            out.extend_from_slice(&ipv6(self.source.ip()).octets());
            out.extend_from_slice(&ipv6(self.destination.ip()).octets());
        }
        out.extend_from_slice(&self.source.port().to_be_bytes());
        out.extend_from_slice(&self.destination.port().to_be_bytes());

        out.push(PP2_TYPE_SSL);
        out.extend_from_slice(&be16(ssl_value_len));
        out.push(PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN);
        // verify: 0 means the client certificate was presented and verified.
        out.extend_from_slice(&0u32.to_be_bytes());
        put_tlv(&mut out, PP2_SUBTYPE_SSL_VERSION, version);
        put_tlv(&mut out, PP2_SUBTYPE_SSL_CIPHER, cipher);

        put_tlv(&mut out, PP2_TYPE_SPIFFE_ID, spiffe_id);
        out
    }
}

/// OpenSSL's name of a TLS version, as HAProxy and nginx report it.
pub fn tls_version_name(version: rustls::ProtocolVersion) -> Option<&'static str> {
    match version {
        rustls::ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
        rustls::ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
        _ => None,
    }
}

/// OpenSSL's name of a cipher suite rustls can negotiate, as HAProxy and
/// nginx report it (TLS 1.3 suites carry their IANA names there).
pub fn cipher_name(suite: rustls::CipherSuite) -> Option<&'static str> {
    use rustls::CipherSuite as S;
    Some(match suite {
        S::TLS13_AES_128_GCM_SHA256 => "TLS_AES_128_GCM_SHA256",
        S::TLS13_AES_256_GCM_SHA384 => "TLS_AES_256_GCM_SHA384",
        S::TLS13_CHACHA20_POLY1305_SHA256 => "TLS_CHACHA20_POLY1305_SHA256",
        S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
        S::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => "ECDHE-ECDSA-AES256-GCM-SHA384",
        S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-ECDSA-CHACHA20-POLY1305",
        S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => "ECDHE-RSA-AES128-GCM-SHA256",
        S::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => "ECDHE-RSA-AES256-GCM-SHA384",
        S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256 => "ECDHE-RSA-CHACHA20-POLY1305",
        _ => return None,
    })
}

/// The value's bytes, or `None` when it is too long for a TLV of ours.
fn fitting(value: &str) -> Option<&[u8]> {
    (value.len() <= MAX_VALUE_LEN).then_some(value.as_bytes())
}

/// The encoded size of a TLV holding `value` (nothing when it is left out).
fn tlv_len(value: Option<&[u8]>) -> usize {
    value.map_or(0, |v| TLV_HEADER_LEN + v.len())
}

fn put_tlv(out: &mut Vec<u8>, kind: u8, value: Option<&[u8]>) {
    if let Some(value) = value {
        out.push(kind);
        out.extend_from_slice(&be16(value.len()));
        out.extend_from_slice(value);
    }
}

/// A length as the header's big-endian u16. [`MAX_VALUE_LEN`] keeps every
/// length in range (checked at compile time above); saturating instead of
/// panicking is only the belt to those braces.
fn be16(n: usize) -> [u8; 2] {
    u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes()
}

fn ipv4_octets(ip: IpAddr) -> [u8; 4] {
    match ip {
        IpAddr::V4(v4) => v4.octets(),
        // Only called when both addresses are IPv4.
        IpAddr::V6(_) => [0; 4],
    }
}

fn ipv6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "spiffe://example.org/web";

    fn header<'a>(source: &str, destination: &str, cipher: Option<&'a str>) -> ProxyHeader<'a> {
        ProxyHeader {
            source: source.parse().unwrap(),
            destination: destination.parse().unwrap(),
            tls_version: "TLSv1.3",
            cipher,
            spiffe_id: WEB,
        }
    }

    /// Splits `bytes` into (type, value) TLVs; `None` on a bad length.
    fn tlvs(mut bytes: &[u8]) -> Option<Vec<(u8, &[u8])>> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let [kind, hi, lo, rest @ ..] = bytes else {
                return None;
            };
            let len = usize::from(u16::from_be_bytes([*hi, *lo]));
            let value = rest.get(..len)?;
            out.push((*kind, value));
            bytes = &rest[len..];
        }
        Some(out)
    }

    #[test]
    fn ipv4_header_byte_for_byte() {
        let encoded = header(
            "192.0.2.10:51000",
            "198.51.100.7:8443",
            Some("TLS_AES_128_GCM_SHA256"),
        )
        .encode();
        let expected: Vec<u8> = [
            &b"\r\n\r\n\0\r\nQUIT\n"[..],
            &[0x21, 0x11],      // v2 PROXY, TCP over IPv4
            &[0x00, 82],        // 12 addresses + 43 SSL TLV + 27 SPIFFE TLV
            &[192, 0, 2, 10],   // source address
            &[198, 51, 100, 7], // destination address
            &[0xC7, 0x38],      // source port 51000
            &[0x20, 0xFB],      // destination port 8443
            &[0x20, 0x00, 40],  // PP2_TYPE_SSL, 5 + 10 + 25 bytes
            &[0x03],            // client: SSL | CERT_CONN
            &[0, 0, 0, 0],      // verify: success
            &[0x21, 0x00, 7],   // PP2_SUBTYPE_SSL_VERSION
            b"TLSv1.3",
            &[0x23, 0x00, 22], // PP2_SUBTYPE_SSL_CIPHER
            b"TLS_AES_128_GCM_SHA256",
            &[0xE0, 0x00, 24], // PP2_TYPE_SPIFFE_ID
            b"spiffe://example.org/web",
        ]
        .concat();
        assert_eq!(encoded, expected);
        assert_eq!(encoded.len(), 16 + 82);
        assert_eq!(encoded.capacity(), encoded.len(), "one exact allocation");
    }

    #[test]
    fn ipv6_header_byte_for_byte() {
        let encoded = header("[2001:db8::1]:40000", "[2001:db8::2]:443", None).encode();
        let mut expected = Vec::new();
        expected.extend_from_slice(&SIGNATURE);
        expected.extend_from_slice(&[0x21, 0x21, 0x00, 36 + 18 + 27]);
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        let mut dst = src;
        src[15] = 1;
        dst[15] = 2;
        expected.extend_from_slice(&src);
        expected.extend_from_slice(&dst);
        expected.extend_from_slice(&[0x9C, 0x40, 0x01, 0xBB]); // 40000, 443
        expected.extend_from_slice(&[0x20, 0x00, 15, 0x03, 0, 0, 0, 0, 0x21, 0x00, 7]);
        expected.extend_from_slice(b"TLSv1.3");
        expected.extend_from_slice(&[0xE0, 0x00, 24]);
        expected.extend_from_slice(WEB.as_bytes());
        assert_eq!(encoded, expected);
        assert_eq!(encoded.capacity(), encoded.len());
    }

    #[test]
    fn mixed_families_travel_as_ipv4_mapped_ipv6() {
        for (source, destination) in [
            ("192.0.2.10:1000", "[2001:db8::2]:443"),
            ("[2001:db8::1]:1000", "192.0.2.20:443"),
        ] {
            let encoded = header(source, destination, None).encode();
            assert_eq!(encoded[13], 0x21, "{source} -> {destination}: AF_INET6");
            let block = &encoded[16..16 + 36];
            let mapped = |s: &str| match s.parse::<SocketAddr>().unwrap().ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            assert_eq!(block[..16], mapped(source));
            assert_eq!(block[16..32], mapped(destination));
            assert_eq!(block[32..], [0x03, 0xE8, 0x01, 0xBB]);
        }
        // The mapped form is ::ffff:a.b.c.d.
        let encoded = header("192.0.2.10:1000", "[::1]:443", None).encode();
        assert_eq!(
            encoded[16..32],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 10]
        );
    }

    #[test]
    fn tlvs_nest_and_lengths_add_up() {
        for cipher in [None, Some("TLS_AES_256_GCM_SHA384")] {
            let encoded = header("10.0.0.1:1", "10.0.0.2:2", cipher).encode();
            let body_len = usize::from(u16::from_be_bytes([encoded[14], encoded[15]]));
            assert_eq!(encoded.len(), 16 + body_len);
            let top = tlvs(&encoded[16 + 12..]).expect("well-formed TLVs");
            let kinds: Vec<u8> = top.iter().map(|(k, _)| *k).collect();
            assert_eq!(kinds, [PP2_TYPE_SSL, PP2_TYPE_SPIFFE_ID]);
            let ssl = top[0].1;
            assert_eq!(ssl[0], PP2_CLIENT_SSL | PP2_CLIENT_CERT_CONN);
            assert_eq!(ssl[1..5], [0, 0, 0, 0]);
            let subs = tlvs(&ssl[5..]).expect("well-formed sub-TLVs");
            let mut want = vec![(PP2_SUBTYPE_SSL_VERSION, &b"TLSv1.3"[..])];
            if let Some(c) = cipher {
                want.push((PP2_SUBTYPE_SSL_CIPHER, c.as_bytes()));
            }
            assert_eq!(subs, want);
            assert_eq!(top[1].1, WEB.as_bytes());
        }
    }

    #[test]
    fn oversized_values_are_left_out_never_cut() {
        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_VALUE_LEN));
        let version = "v".repeat(70_000);
        let h = ProxyHeader {
            tls_version: &version,
            cipher: Some(&long),
            spiffe_id: &long,
            ..header("10.0.0.1:1", "10.0.0.2:2", None)
        };
        let encoded = h.encode();
        let top = tlvs(&encoded[16 + 12..]).expect("well-formed TLVs");
        assert_eq!(top, [(PP2_TYPE_SSL, &[0x03, 0, 0, 0, 0][..])]);
        assert_eq!(encoded.capacity(), encoded.len());

        // The longest values that fit are all kept, and the lengths hold.
        let max = "x".repeat(MAX_VALUE_LEN);
        let h = ProxyHeader {
            source: "[::1]:1".parse().unwrap(),
            destination: "[::1]:2".parse().unwrap(),
            tls_version: &max,
            cipher: Some(&max),
            spiffe_id: &max,
        };
        let encoded = h.encode();
        assert_eq!(encoded.len(), MAX_HEADER_LEN);
        let body_len = usize::from(u16::from_be_bytes([encoded[14], encoded[15]]));
        assert_eq!(encoded.len(), 16 + body_len);
        assert_eq!(tlvs(&encoded[16 + 36..]).map(|t| t.len()), Some(2));
    }

    #[test]
    fn rustls_names_map_to_openssl_names() {
        assert_eq!(
            tls_version_name(rustls::ProtocolVersion::TLSv1_3),
            Some("TLSv1.3")
        );
        assert_eq!(
            tls_version_name(rustls::ProtocolVersion::TLSv1_2),
            Some("TLSv1.2")
        );
        assert_eq!(tls_version_name(rustls::ProtocolVersion::SSLv3), None);
        assert_eq!(
            cipher_name(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384),
            Some("TLS_AES_256_GCM_SHA384")
        );
        // Every suite our provider can negotiate has a name.
        for suite in rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES {
            assert!(
                cipher_name(suite.suite()).is_some(),
                "no name for {:?}",
                suite.suite()
            );
        }
    }
}
