//! The PROXY protocol v2 header an inbound tunnel sends its target, checked
//! by two parsers that share nothing with the encoder: the spec-written
//! decoder in `common::pp2` (every field and TLV, round trip, truncation) and
//! a real HAProxy with `accept-proxy`, which must report exactly the
//! addresses we encoded and refuse a corrupted header.
//!
//! HAProxy is required, not optional: without it this test fails and says
//! how to install it (`scripts/test` installs the Debian package).

mod common;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pp2::{self, Family, Transport};
use spiffe_tunnel::proxy::proxy_protocol::ProxyHeader;

// The spec's numbers, written out here rather than taken from the encoder,
// so a wrong constant there fails here.
const PP2_TYPE_SSL: u8 = 0x20;
const PP2_SUBTYPE_SSL_VERSION: u8 = 0x21;
const PP2_SUBTYPE_SSL_CIPHER: u8 = 0x23;
const PP2_TYPE_SPIFFE_ID: u8 = 0xE0;
const CLIENT_SSL_CERT_CONN: u8 = 0x01 | 0x02;

const WEB: &str = "spiffe://example.org/web";

/// A SPIFFE ID of exactly `len` bytes (the spec allows up to 2048).
fn long_id(len: usize) -> String {
    let prefix = "spiffe://example.org/";
    let mut id = String::from(prefix);
    while id.len() < len {
        id.push_str(if id.len() + 4 < len { "seg/" } else { "x" });
    }
    id
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// What a receiver should see for one side of a header with these two
/// addresses: IPv4 stays IPv4 only when both sides are IPv4.
fn as_sent(this: SocketAddr, other: SocketAddr) -> SocketAddr {
    match (this, other) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => this,
        _ => {
            let ip = match this.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            SocketAddr::from((ip, this.port()))
        }
    }
}

/// Port 0 is left out: HAProxy's `src_port` treats it as "no port" and
/// prints nothing, and no TCP connection has it.
const ADDRESS_PAIRS: &[(&str, &str)] = &[
    ("192.0.2.10:51000", "198.51.100.7:8443"),
    ("0.0.0.0:1", "255.255.255.255:65535"),
    ("127.0.0.1:1", "127.0.0.1:2"),
    ("[2001:db8::1]:40000", "[2001:db8::2]:443"),
    ("[::]:1", "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"),
    ("[fe80::1%7]:5", "[::1]:6"), // the scope id does not travel
    ("192.0.2.10:1000", "[2001:db8::2]:443"),
    ("[2001:db8::1]:1000", "192.0.2.20:443"),
    ("[::ffff:192.0.2.1]:7", "[::ffff:192.0.2.2]:8"),
];

#[test]
fn round_trip_through_an_independent_decoder() {
    let ids = [
        WEB.to_string(),
        "spiffe://td/é".to_string(),
        long_id(200),
        long_id(2047),
        long_id(2048),
    ];
    let ciphers = [
        None,
        Some("TLS_AES_256_GCM_SHA384"),
        Some("ECDHE-ECDSA-AES128-GCM-SHA256"),
    ];
    let mut checked = 0;
    for (source, destination) in ADDRESS_PAIRS {
        let (source, destination) = (addr(source), addr(destination));
        for id in &ids {
            for cipher in ciphers {
                for version in ["TLSv1.3", "TLSv1.2"] {
                    let header = ProxyHeader {
                        source,
                        destination,
                        tls_version: version,
                        cipher,
                        spiffe_id: id,
                    };
                    let what = format!("{header:?}");
                    let encoded = header.encode();
                    let mut stream = encoded.clone();
                    stream.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");

                    let d = pp2::decode(&stream).unwrap_or_else(|e| panic!("{what}: {e:?}"));
                    assert_eq!(d.consumed, encoded.len(), "{what}");
                    assert_eq!(d.command, pp2::Command::Proxy, "{what}");
                    assert_eq!(d.transport, Transport::Stream, "{what}");
                    let family = match (source, destination) {
                        (SocketAddr::V4(_), SocketAddr::V4(_)) => Family::Inet,
                        _ => Family::Inet6,
                    };
                    assert_eq!(d.family, family, "{what}");
                    assert_eq!(d.source, Some(as_sent(source, destination)), "{what}");
                    assert_eq!(d.destination, Some(as_sent(destination, source)), "{what}");
                    assert_eq!(d.unix, None);

                    let kinds: Vec<u8> = d.tlvs.iter().map(|(k, _)| *k).collect();
                    assert_eq!(kinds, [PP2_TYPE_SSL, PP2_TYPE_SPIFFE_ID], "{what}");
                    assert_eq!(d.tlv(PP2_TYPE_SPIFFE_ID), Some(id.as_bytes()), "{what}");
                    let ssl = d.ssl.as_ref().expect("PP2_TYPE_SSL decoded");
                    assert_eq!(ssl.client, CLIENT_SSL_CERT_CONN, "{what}");
                    assert_eq!(ssl.verify, 0, "{what}");
                    let mut subs = vec![(PP2_SUBTYPE_SSL_VERSION, version.as_bytes().to_vec())];
                    if let Some(c) = cipher {
                        subs.push((PP2_SUBTYPE_SSL_CIPHER, c.as_bytes().to_vec()));
                    }
                    assert_eq!(ssl.subs, subs, "{what}");

                    for cut in 0..encoded.len() {
                        assert!(
                            pp2::decode(&encoded[..cut]).is_err(),
                            "{what}: a {cut}-byte prefix of {} decoded",
                            encoded.len()
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, ADDRESS_PAIRS.len() * ids.len() * ciphers.len() * 2);
}

/// The decoder itself, on headers assembled by hand from the spec: if it
/// were lenient or wrong, the round trip above would prove little.
#[test]
fn the_test_decoder_follows_the_spec() {
    const SIG: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
    let build = |ver_cmd: u8, fam: u8, body: &[u8]| {
        let mut h = SIG.to_vec();
        h.extend_from_slice(&[ver_cmd, fam]);
        h.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        h.extend_from_slice(body);
        h
    };
    let v4_block = [10, 0, 0, 1, 10, 0, 0, 2, 0x01, 0x00, 0x00, 0x50];

    // LOCAL: the addresses are discarded.
    let d = pp2::decode(&build(0x20, 0x11, &v4_block)).unwrap();
    assert_eq!((d.command, d.source), (pp2::Command::Local, None));
    // UNSPEC: nothing but the length is read.
    let d = pp2::decode(&build(0x20, 0x00, &[1, 2, 3])).unwrap();
    assert_eq!((d.family, d.consumed), (Family::Unspec, 19));
    // PROXY over IPv4, then a NOOP TLV and a custom one.
    let mut body = v4_block.to_vec();
    body.extend_from_slice(&[0x04, 0, 0, 0xE5, 0, 2, b'h', b'i']);
    let d = pp2::decode(&build(0x21, 0x11, &body)).unwrap();
    assert_eq!(d.source, Some(addr("10.0.0.1:256")));
    assert_eq!(d.destination, Some(addr("10.0.0.2:80")));
    assert_eq!(d.tlvs, [(0x04, vec![]), (0xE5, b"hi".to_vec())]);
    // UNIX: two 108-byte NUL-padded paths.
    let mut unix = [0u8; 216];
    unix[..9].copy_from_slice(b"/run/a.so");
    unix[108..117].copy_from_slice(b"/run/b.so");
    let d = pp2::decode(&build(0x21, 0x31, &unix)).unwrap();
    assert_eq!(d.unix, Some((b"/run/a.so".to_vec(), b"/run/b.so".to_vec())));
    // CRC32C: the checksum of the header with the field zeroed.
    assert_eq!(pp2::crc32c(b"123456789"), 0xE306_9283);
    let mut body = v4_block.to_vec();
    body.extend_from_slice(&[0x03, 0, 4, 0, 0, 0, 0]);
    let mut with_crc = build(0x21, 0x11, &body);
    let crc = pp2::crc32c(&with_crc).to_be_bytes();
    let at = with_crc.len() - 4;
    with_crc[at..].copy_from_slice(&crc);
    assert!(pp2::decode(&with_crc).is_ok());
    with_crc[20] ^= 1;
    assert!(matches!(
        pp2::decode(&with_crc),
        Err(pp2::Error::Crc32cMismatch { .. })
    ));

    // Refused: what the spec says receivers must refuse.
    let refused = [
        build(0x11, 0x11, &v4_block),       // version 1 in binary form
        build(0x22, 0x11, &v4_block),       // unknown command
        build(0x21, 0x41, &v4_block),       // unknown family
        build(0x21, 0x13, &v4_block),       // unknown transport
        build(0x21, 0x11, &v4_block[..11]), // address block too short
        build(0x21, 0x21, &v4_block),       // IPv6 needs 36 bytes
        build(0x21, 0x11, &[&v4_block[..], &[0xE0, 0, 3, b'a']].concat()), // TLV overrun
        build(0x21, 0x11, &[&v4_block[..], &[0xE0, 0]].concat()), // short TLV header
        build(
            0x21,
            0x11,
            &[&v4_block[..], &[0x20, 0, 4, 1, 0, 0, 0]].concat(),
        ), // short SSL
        build(
            0x21,
            0x11,
            &[&v4_block[..], &[0x20, 0, 8, 1, 0, 0, 0, 0, 0x21, 0, 9]].concat(),
        ), // sub-TLV overrun
    ];
    for (i, header) in refused.iter().enumerate() {
        assert!(pp2::decode(header).is_err(), "case {i} decoded: {header:?}");
    }
    let mut bad_sig = build(0x21, 0x11, &v4_block);
    bad_sig[6] = b'X';
    assert_eq!(pp2::decode(&bad_sig), Err(pp2::Error::BadSignature));

    // No input makes it panic.
    let valid = ProxyHeader {
        source: addr("192.0.2.1:1"),
        destination: addr("[2001:db8::1]:2"),
        tls_version: "TLSv1.3",
        cipher: Some("TLS_AES_128_GCM_SHA256"),
        spiffe_id: WEB,
    }
    .encode();
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..20_000 {
        let mut bytes = valid.clone();
        for _ in 0..rng.usize(1..4) {
            let at = rng.usize(12..bytes.len());
            bytes[at] = rng.u8(..);
        }
        let _ = pp2::decode(&bytes);
    }
}

// ---------------------------------------------------------------- HAProxy

/// The haproxy binary: `$HAPROXY`, then `PATH`, then Debian's `/usr/sbin`
/// (not on a non-root user's PATH). Fails the test when there is none.
fn haproxy_binary() -> PathBuf {
    if let Some(explicit) = std::env::var_os("HAPROXY") {
        let explicit = PathBuf::from(explicit);
        assert!(
            explicit.is_file(),
            "$HAPROXY is {}, which is not a file",
            explicit.display()
        );
        return explicit;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "haproxy not found on PATH (nor in /usr/sbin): the PROXY v2 test needs a real \
                 parser. Install it (`apt-get install haproxy`; scripts/test does) or point \
                 $HAPROXY at the binary."
            )
        })
}

/// Whether this HAProxy knows the sample fetch `fetch` (it validates a
/// config using it). `fc_pp_tlv` came in 2.9; Debian bookworm has 2.6.
fn haproxy_knows(bin: &Path, dir: &Path, fetch: &str) -> bool {
    let cfg = dir.join("probe.cfg");
    std::fs::write(
        &cfg,
        format!(
            "defaults\n  mode http\n  timeout client 5s\n  timeout connect 5s\n  \
             timeout server 5s\nfrontend probe\n  bind 127.0.0.1:0\n  \
             http-request return status 200 lf-string \"%[{fetch}]\"\n"
        ),
    )
    .unwrap();
    Command::new(bin)
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A port on a loopback address, free right now; `None` when the address
/// cannot be bound (no IPv6 on this machine).
fn free_port_on(ip: IpAddr) -> Option<SocketAddr> {
    TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()).ok()
}

/// A foreground HAProxy that answers every request with the addresses it
/// took from the PROXY header; killed when dropped.
struct HaProxy {
    child: Child,
    log: PathBuf,
    listeners: Vec<SocketAddr>,
    /// Whether responses carry the SPIFFE ID TLV as a third field.
    tlv_fetch: bool,
    /// The config and log, removed after HAProxy is gone.
    _dir: Option<tempfile::TempDir>,
}

impl HaProxy {
    fn start() -> Self {
        let bin = haproxy_binary();
        let dir = tempfile::tempdir().unwrap();
        let tlv_fetch = haproxy_knows(&bin, dir.path(), "fc_pp_tlv(224)");
        if !tlv_fetch {
            eprintln!(
                "note: this HAProxy has no fc_pp_tlv sample fetch (added in 2.9), so it checks \
                 the addresses and the header's framing; the TLVs are checked by the test decoder"
            );
        }
        let format = if tlv_fetch {
            r"%[src]:%[src_port] %[dst]:%[dst_port] %[fc_pp_tlv(224)]\n"
        } else {
            r"%[src]:%[src_port] %[dst]:%[dst_port]\n"
        };
        let mut last_log = String::new();
        // A port free a moment ago may be taken by the time HAProxy binds
        // it: then try again with new ports.
        for _attempt in 0..3 {
            let mut listeners =
                vec![free_port_on(IpAddr::from([127, 0, 0, 1])).expect("bind on 127.0.0.1")];
            listeners.extend(free_port_on(IpAddr::from(Ipv6Addr::LOCALHOST)));
            let binds: String = listeners
                .iter()
                .map(|a| format!("  bind {a} accept-proxy\n"))
                .collect();
            let cfg = dir.path().join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n  maxconn 100\n\
                     defaults\n  mode http\n  timeout connect 5s\n  timeout client 5s\n  \
                     timeout server 5s\n\
                     frontend pp2\n{binds}  \
                     http-request return status 200 content-type text/plain lf-string \"{format}\"\n"
                ),
            )
            .unwrap();
            let log = dir.path().join("haproxy.log");
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new(&bin)
                .arg("-db")
                .arg("-f")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            let mut haproxy = HaProxy {
                child,
                log,
                listeners,
                tlv_fetch,
                _dir: None,
            };
            if haproxy.wait_ready(Duration::from_secs(10)) {
                haproxy._dir = Some(dir);
                return haproxy;
            }
            last_log = haproxy.log_text();
            // Dropping `haproxy` kills it, if it still runs.
        }
        panic!("HAProxy did not start listening; its output:\n{last_log}");
    }

    /// Polls every listener with a connect until all accept, HAProxy exits,
    /// or `timeout` passes.
    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                eprintln!("HAProxy exited ({status}):\n{}", self.log_text());
                return false;
            }
            if self
                .listeners
                .iter()
                .all(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok())
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What happened to one connection.
#[derive(Debug)]
enum Outcome {
    /// HAProxy answered 200 with this body.
    Ok(String),
    /// HAProxy closed (or reset) the connection without a 200.
    Refused(Vec<u8>),
}

/// Sends `header` and an HTTP/1.0 request on a new connection to `to`, reads
/// until HAProxy closes it.
fn exchange(to: SocketAddr, header: &[u8]) -> Outcome {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to HAProxy at {to}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut request = header.to_vec();
    request.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
    if let Err(e) = stream.write_all(&request) {
        // Closed on us while we were still writing: that is a refusal.
        return Outcome::Refused(format!("write failed: {e}").into_bytes());
    }
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            panic!("HAProxy at {to} neither answered nor closed within 10s")
        }
        Err(_) => return Outcome::Refused(response), // reset
    }
    let text = String::from_utf8_lossy(&response);
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Outcome::Ok(body.to_string()),
        _ => Outcome::Refused(response),
    }
}

/// "ip:port" as HAProxy prints it (IPv6 without brackets); `None` if not.
fn parse_endpoint(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.rsplit_once(':')?;
    Some(SocketAddr::from((
        ip.parse::<IpAddr>().ok()?,
        port.parse::<u16>().ok()?,
    )))
}

#[test]
fn haproxy_reads_the_addresses_we_encode() {
    let haproxy = HaProxy::start();
    let ids = [WEB.to_string(), long_id(2048)];
    let mut checked = 0;
    for &to in &haproxy.listeners {
        for (source, destination) in ADDRESS_PAIRS {
            let (source, destination) = (addr(source), addr(destination));
            for id in &ids {
                let header = ProxyHeader {
                    source,
                    destination,
                    tls_version: "TLSv1.3",
                    cipher: Some("TLS_AES_128_GCM_SHA256"),
                    spiffe_id: id,
                };
                let what = format!("{source} -> {destination} over {to}");
                let body = match exchange(to, &header.encode()) {
                    Outcome::Ok(body) => body,
                    Outcome::Refused(r) => panic!(
                        "{what}: HAProxy refused a valid header: {:?}\nHAProxy output:\n{}",
                        String::from_utf8_lossy(&r),
                        haproxy.log_text()
                    ),
                };
                let line = body
                    .strip_suffix('\n')
                    .unwrap_or_else(|| panic!("{what}: body {body:?}"));
                let fields: Vec<&str> = line.split(' ').collect();
                assert_eq!(
                    parse_endpoint(fields[0]),
                    Some(as_sent(source, destination)),
                    "{what}: {body:?}"
                );
                assert_eq!(
                    fields.get(1).and_then(|f| parse_endpoint(f)),
                    Some(as_sent(destination, source)),
                    "{what}: {body:?}"
                );
                if haproxy.tlv_fetch {
                    assert_eq!(fields.get(2), Some(&id.as_str()), "{what}: SPIFFE ID TLV");
                } else {
                    assert_eq!(fields.len(), 2, "{what}: {body:?}");
                }
                checked += 1;
            }
        }
    }
    assert_eq!(
        checked,
        haproxy.listeners.len() * ADDRESS_PAIRS.len() * ids.len()
    );
}

#[test]
fn haproxy_refuses_a_corrupted_header() {
    let haproxy = HaProxy::start();
    let to = haproxy.listeners[0];
    let valid = ProxyHeader {
        source: addr("192.0.2.10:51000"),
        destination: addr("198.51.100.7:8443"),
        tls_version: "TLSv1.3",
        cipher: None,
        spiffe_id: WEB,
    }
    .encode();
    // The control: the untouched header is answered.
    assert!(
        matches!(exchange(to, &valid), Outcome::Ok(_)),
        "the valid header was refused"
    );

    // Offsets in `valid`: 12 ver/cmd, 14-15 length, 16-27 addresses,
    // 28 PP2_TYPE_SSL (length 29-30), 46 PP2_TYPE_SPIFFE_ID (length 47-48).
    assert_eq!((valid[28], valid[46]), (0x20, 0xE0), "layout assumed below");
    let corrupt = |what: &str, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut header = valid.clone();
        edit(&mut header);
        (what.to_string(), header)
    };
    let cases = [
        corrupt("signature", &|h| h[3] = b'X'),
        corrupt("version 3", &|h| h[12] = 0x31),
        corrupt("unknown command", &|h| h[12] = 0x2F),
        corrupt("length shorter than the IPv4 addresses", &|h| {
            h.truncate(16 + 11);
            h[14..16].copy_from_slice(&11u16.to_be_bytes());
        }),
        corrupt("SPIFFE ID TLV one byte past the end", &|h| {
            let len = u16::from_be_bytes([h[47], h[48]]) + 1;
            h[47..49].copy_from_slice(&len.to_be_bytes());
        }),
        corrupt("SSL TLV past the end", &|h| {
            h[29..31].copy_from_slice(&0x0100u16.to_be_bytes());
        }),
        corrupt("TLV header cut short", &|h| {
            h.extend_from_slice(&[0xE1, 0x00]);
            let len = u16::from_be_bytes([h[14], h[15]]) + 2;
            h[14..16].copy_from_slice(&len.to_be_bytes());
        }),
    ];
    for (what, header) in &cases {
        // Our own decoder agrees that each one is malformed.
        assert!(
            pp2::decode(header).is_err(),
            "{what}: the test decoder took it"
        );
        match exchange(to, header) {
            Outcome::Refused(_) => {}
            Outcome::Ok(body) => panic!("{what}: HAProxy accepted it and answered {body:?}"),
        }
    }
    // And it still serves good headers afterwards.
    assert!(matches!(exchange(to, &valid), Outcome::Ok(_)));
}

// ---- the header as a real inbound tunnel sends it ---------------------------

/// Starts an inbound tunnel process (identity spiffe://example.org/api,
/// allowing WEB) with `proxy_protocol = true` in front of `target`.
async fn pp2_inbound(
    dir: &Path,
    ca: &common::certs::Ca,
    target: SocketAddr,
) -> (common::harness::Daemon, SocketAddr) {
    ca.leaf("spiffe://example.org/api").write_files(dir);
    let listen = common::harness::free_addr();
    let config = dir.join("tunnel.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\nsource = \"files\"\ncert = \"svid.pem\"\nkey = \"svid.key\"\n[identity.bundles]\n\"example.org\" = \"bundle.pem\"\n\
             [[inbound]]\nname = \"api\"\nlisten = \"{listen}\"\ntarget = \"{target}\"\nallow = [\"{WEB}\"]\nproxy_protocol = true\n"
        ),
    )
    .unwrap();
    let daemon = common::harness::Daemon::run(&config);
    daemon.wait_running().await;
    (daemon, listen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_sends_the_header_before_the_first_client_byte() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = common::certs::Ca::new("example.org");
    // A target that keeps everything it receives and answers "ok".
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let received = tokio::spawn(async move {
        let (mut s, _) = target.accept().await.unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        s.write_all(b"ok").await.unwrap();
        all
    });
    let (_daemon, listen) = pp2_inbound(dir.path(), &ca, target_addr).await;
    let web = ca.leaf(WEB);
    let answer = common::harness::raw_tls_roundtrip(
        listen,
        common::harness::raw_client_config(Some((&web.chain_pem, &web.key_pem))),
        b"first client bytes",
    )
    .await
    .unwrap();
    assert_eq!(answer, b"ok");

    let all = received.await.unwrap();
    let header = pp2::decode(&all).expect("a PROXY v2 header first");
    assert_eq!(header.source.unwrap().ip(), IpAddr::from([127, 0, 0, 1]));
    assert_eq!(header.destination, Some(listen));
    assert_eq!(header.tlv(PP2_TYPE_SPIFFE_ID), Some(WEB.as_bytes()));
    assert_eq!(header.ssl.as_ref().unwrap().client, CLIENT_SSL_CERT_CONN);
    assert_eq!(header.ssl.as_ref().unwrap().verify, 0);
    assert_eq!(
        header.ssl_sub(PP2_SUBTYPE_SSL_VERSION),
        Some(&b"TLSv1.3"[..])
    );
    assert!(header.ssl_sub(PP2_SUBTYPE_SSL_CIPHER).is_some());
    assert_eq!(&all[header.consumed..], b"first client bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_accepts_the_header_from_a_real_inbound() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let haproxy = HaProxy::start();
    let frontend = haproxy.listeners[0];
    let dir = tempfile::tempdir().unwrap();
    let ca = common::certs::Ca::new("example.org");
    let (_daemon, listen) = pp2_inbound(dir.path(), &ca, frontend).await;
    let web = ca.leaf(WEB);
    let tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
    let client_addr = tcp.local_addr().unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(common::harness::raw_client_config(Some((
        &web.chain_pem,
        &web.key_pem,
    ))))
    .connect(rustls_pki_types::ServerName::try_from("x").unwrap(), tcp)
    .await
    .unwrap();
    tls.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let mut fields = body.split_whitespace();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(
        fields.next().and_then(parse_endpoint),
        Some(client_addr),
        "{text}"
    );
    assert_eq!(
        fields.next().and_then(parse_endpoint),
        Some(listen),
        "{text}"
    );
    if haproxy.tlv_fetch {
        assert_eq!(fields.next(), Some(WEB), "{text}");
    }
}
