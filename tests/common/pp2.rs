#![allow(dead_code)]
//! An independent PROXY protocol v2 decoder, written from the spec
//! (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>, section
//! 2.2) and sharing nothing with the encoder in `src/proxy/proxy_protocol.rs`,
//! so a misreading of the spec in one does not hide in the other.
//!
//! It is strict where the spec says "must": an unknown version, command or
//! family, an address block shorter than its family needs, a TLV running past
//! the header, a short `PP2_TYPE_SSL`, or a wrong `PP2_TYPE_CRC32C` are all
//! errors, and so is any truncation. It never panics on any input.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::ops::Range;

const SIG: &[u8; 12] = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A";
const PP2_TYPE_CRC32C: u8 = 0x03;
const PP2_TYPE_SSL: u8 = 0x20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Health checks and the like: the receiver uses the real endpoints.
    Local,
    Proxy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Unspec,
    Inet,
    Inet6,
    Unix,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Unspec,
    Stream,
    Dgram,
}

/// The content of a `PP2_TYPE_SSL` TLV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ssl {
    pub client: u8,
    pub verify: u32,
    pub subs: Vec<(u8, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub command: Command,
    pub family: Family,
    pub transport: Transport,
    /// `None` for LOCAL (the spec says to discard the addresses) and for
    /// UNSPEC and UNIX.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
    /// Source and destination paths of AF_UNIX, NUL padding removed.
    pub unix: Option<(Vec<u8>, Vec<u8>)>,
    /// Every top-level TLV in order, `PP2_TYPE_SSL` included (raw).
    pub tlvs: Vec<(u8, Vec<u8>)>,
    /// The `PP2_TYPE_SSL` TLV, decoded.
    pub ssl: Option<Ssl>,
    /// Header bytes: what follows belongs to the proxied connection.
    pub consumed: usize,
}

impl Decoded {
    /// The value of the first top-level TLV of `kind`.
    pub fn tlv(&self, kind: u8) -> Option<&[u8]> {
        self.tlvs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }

    /// The value of the first sub-TLV of `kind` inside `PP2_TYPE_SSL`.
    pub fn ssl_sub(&self, kind: u8) -> Option<&[u8]> {
        self.ssl
            .as_ref()?
            .subs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_slice())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Fewer bytes than the header needs.
    Truncated {
        need: usize,
        have: usize,
    },
    BadSignature,
    BadVersion(u8),
    BadCommand(u8),
    BadFamily(u8),
    /// The length leaves less than the family's address block.
    AddressBlockTooShort {
        family: Family,
        len: usize,
    },
    /// A TLV header or value runs past the end of its enclosing block.
    TlvOverrun {
        offset: usize,
    },
    /// `PP2_TYPE_SSL` shorter than its 5 fixed bytes.
    SslTooShort(usize),
    DuplicateSsl,
    BadCrc32cLength(usize),
    Crc32cMismatch {
        sent: u32,
        computed: u32,
    },
}

/// Decodes the v2 header at the start of `input`.
pub fn decode(input: &[u8]) -> Result<Decoded, Error> {
    let fixed = input.get(..16).ok_or(Error::Truncated {
        need: 16,
        have: input.len(),
    })?;
    if fixed[..12] != SIG[..] {
        return Err(Error::BadSignature);
    }
    let ver_cmd = fixed[12];
    if ver_cmd >> 4 != 2 {
        return Err(Error::BadVersion(ver_cmd));
    }
    let command = match ver_cmd & 0x0F {
        0 => Command::Local,
        1 => Command::Proxy,
        _ => return Err(Error::BadCommand(ver_cmd)),
    };
    let fam = fixed[13];
    let (family, transport) = match fam {
        0x00 => (Family::Unspec, Transport::Unspec),
        0x11 => (Family::Inet, Transport::Stream),
        0x12 => (Family::Inet, Transport::Dgram),
        0x21 => (Family::Inet6, Transport::Stream),
        0x22 => (Family::Inet6, Transport::Dgram),
        0x31 => (Family::Unix, Transport::Stream),
        0x32 => (Family::Unix, Transport::Dgram),
        _ => return Err(Error::BadFamily(fam)),
    };
    let len = usize::from(fixed[14]) << 8 | usize::from(fixed[15]);
    let total = 16 + len;
    let block = input.get(16..total).ok_or(Error::Truncated {
        need: total,
        have: input.len(),
    })?;

    let address_len = match family {
        // No address information; the spec tells receivers to ignore the
        // block, so its bytes are not read as TLVs either (as HAProxy does).
        Family::Unspec => {
            return Ok(Decoded {
                command,
                family,
                transport,
                source: None,
                destination: None,
                unix: None,
                tlvs: Vec::new(),
                ssl: None,
                consumed: total,
            });
        }
        Family::Inet => 12,
        Family::Inet6 => 36,
        Family::Unix => 216,
    };
    let addresses = block
        .get(..address_len)
        .ok_or(Error::AddressBlockTooShort { family, len })?;
    let (mut source, mut destination, mut unix) = (None, None, None);
    match family {
        Family::Inet => {
            let ip = |at: usize| {
                Ipv4Addr::new(
                    addresses[at],
                    addresses[at + 1],
                    addresses[at + 2],
                    addresses[at + 3],
                )
            };
            source = Some(SocketAddr::from((ip(0), port(addresses, 8))));
            destination = Some(SocketAddr::from((ip(4), port(addresses, 10))));
        }
        Family::Inet6 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&addresses[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            source = Some(SocketAddr::V6(SocketAddrV6::new(
                ip(0),
                port(addresses, 32),
                0,
                0,
            )));
            destination = Some(SocketAddr::V6(SocketAddrV6::new(
                ip(16),
                port(addresses, 34),
                0,
                0,
            )));
        }
        Family::Unix => {
            let path = |raw: &[u8]| raw.split(|b| *b == 0).next().unwrap_or(&[]).to_vec();
            unix = Some((path(&addresses[..108]), path(&addresses[108..216])));
        }
        Family::Unspec => {}
    }
    if command == Command::Local {
        source = None;
        destination = None;
        unix = None;
    }

    let tlv_start = 16 + address_len;
    let mut tlvs = Vec::new();
    let mut ssl = None;
    for (kind, range) in tlv_ranges(&input[tlv_start..total], tlv_start)? {
        let value = &input[range.clone()];
        match kind {
            PP2_TYPE_SSL => {
                if ssl.is_some() {
                    return Err(Error::DuplicateSsl);
                }
                if value.len() < 5 {
                    return Err(Error::SslTooShort(value.len()));
                }
                let subs = tlv_ranges(&value[5..], range.start + 5)?
                    .into_iter()
                    .map(|(k, r)| (k, input[r].to_vec()))
                    .collect();
                ssl = Some(Ssl {
                    client: value[0],
                    verify: u32::from_be_bytes([value[1], value[2], value[3], value[4]]),
                    subs,
                });
            }
            PP2_TYPE_CRC32C => check_crc32c(&input[..total], range.clone())?,
            _ => {}
        }
        tlvs.push((kind, value.to_vec()));
    }

    Ok(Decoded {
        command,
        family,
        transport,
        source,
        destination,
        unix,
        tlvs,
        ssl,
        consumed: total,
    })
}

fn port(block: &[u8], at: usize) -> u16 {
    u16::from(block[at]) << 8 | u16::from(block[at + 1])
}

/// Splits `block` into TLVs: each one's type and the range of its value,
/// as offsets from the start of the header (`block` starts at `base`).
fn tlv_ranges(block: &[u8], base: usize) -> Result<Vec<(u8, Range<usize>)>, Error> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < block.len() {
        let (kind, len) = match block[at..] {
            [kind, hi, lo, ..] => (kind, usize::from(hi) << 8 | usize::from(lo)),
            _ => return Err(Error::TlvOverrun { offset: base + at }),
        };
        let end = at + 3 + len;
        if end > block.len() {
            return Err(Error::TlvOverrun { offset: base + at });
        }
        out.push((kind, base + at + 3..base + end));
        at = end;
    }
    Ok(out)
}

/// The spec: the checksum covers the whole header with the checksum field
/// itself set to zero.
fn check_crc32c(header: &[u8], field: Range<usize>) -> Result<(), Error> {
    let sent: [u8; 4] = header[field.clone()]
        .try_into()
        .map_err(|_| Error::BadCrc32cLength(field.len()))?;
    let sent = u32::from_be_bytes(sent);
    let mut zeroed = header.to_vec();
    zeroed[field].fill(0);
    let computed = crc32c(&zeroed);
    if computed == sent {
        Ok(())
    } else {
        Err(Error::Crc32cMismatch { sent, computed })
    }
}

/// CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, bit by bit.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
