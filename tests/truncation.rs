//! A TLS peer that sends N MiB and then closes its socket without
//! close_notify, as many OpenSSL- and Python-based programs do: every byte
//! still reaches the app on the plain side, and only then does the app see
//! a reset (the tunnel's way of saying that the stream was cut).
//!
//! Both tunnel kinds, in one daemon: the truncating peer is the upstream
//! server behind an outbound, or the client of an inbound. Each kind has a
//! fast and a slow reader on the plain side (the slow one keeps megabytes
//! queued in the sockets when the truncation arrives), and each truncating
//! peer is a rustls peer of the test's and a Python `ssl` one (whose
//! `close()` and `shutdown()` never send close_notify). All cases run at
//! once.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::certs::{Ca, Leaf};
use common::harness::*;
use common::node::{inbound, outbound, FileNode};
use common::probe::{metrics, sample};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";

/// What each truncating peer sends.
const SIZE: usize = 8 << 20;

/// The byte at `i` of what every peer sends: a period (251, prime) that no
/// record or buffer size divides, so a lost or repeated chunk shows.
fn byte_at(i: usize) -> u8 {
    (i % 251) as u8
}

fn payload() -> Vec<u8> {
    (0..SIZE).map(byte_at).collect()
}

#[derive(Debug, Clone, Copy)]
enum Pace {
    Fast,
    /// 32 KiB every 2 ms: about 16 MiB/s, far below what the peer sends.
    Slow,
}

/// How a plain-side reader saw its stream end.
#[derive(Debug)]
struct Seen {
    bytes: usize,
    /// The first offset whose byte is wrong, if any.
    corrupt_at: Option<usize>,
    /// `None` for a clean end of stream.
    error: Option<std::io::ErrorKind>,
}

/// Reads to the end or the first error at `pace`, checking every byte.
async fn read_all(mut stream: impl AsyncRead + Unpin, pace: Pace) -> Seen {
    let mut buf = vec![0u8; 32 * 1024];
    let mut seen = Seen {
        bytes: 0,
        corrupt_at: None,
        error: None,
    };
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => return seen,
            Ok(n) => {
                if seen.corrupt_at.is_none() {
                    seen.corrupt_at = buf[..n]
                        .iter()
                        .enumerate()
                        .find(|&(i, b)| *b != byte_at(seen.bytes + i))
                        .map(|(i, _)| seen.bytes + i);
                }
                seen.bytes += n;
            }
            Err(e) => {
                seen.error = Some(e.kind());
                return seen;
            }
        }
        if let Pace::Slow = pace {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

fn assert_whole_then_reset(case: &str, seen: &Seen) {
    assert_eq!(
        (seen.bytes, seen.corrupt_at),
        (SIZE, None),
        "{case}: {} of {SIZE} bytes arrived (first wrong byte at {:?}), then {:?}",
        seen.bytes,
        seen.corrupt_at,
        seen.error
    );
    assert_eq!(
        seen.error,
        Some(std::io::ErrorKind::ConnectionReset),
        "{case}: every byte arrived, but the stream then ended without a reset"
    );
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certified(leaf: &Leaf) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    (leaf.chain_der.clone(), key)
}

/// Sends [`SIZE`] bytes over `tls` and flushes them.
async fn send_payload(tls: &mut (impl tokio::io::AsyncWrite + Unpin)) {
    tls.write_all(&payload()).await.unwrap();
    tls.flush().await.unwrap();
}

/// Ends the TCP stream under a TLS stream with a FIN and no close_notify,
/// then reads until the tunnel closes its side (so that nothing unread
/// turns the close into a reset).
async fn truncate(mut tcp: TcpStream) {
    tcp.shutdown().await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut sink)).await;
}

/// A rustls server that truncates every connection after [`SIZE`] bytes.
async fn rustls_truncating_server(leaf: &Leaf) -> SocketAddr {
    let (chain, key) = certified(leaf);
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    send_payload(&mut tls).await;
                    truncate(tls.into_inner().0).await;
                }
            });
        }
    });
    addr
}

/// A rustls client of `addr` (an inbound) that truncates after [`SIZE`]
/// bytes.
async fn rustls_truncating_client(addr: SocketAddr, leaf: &Leaf) {
    let config = raw_client_config(Some((&leaf.chain_pem, &leaf.key_pem)));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("spiffe-tunnel.test").unwrap(), tcp)
        .await
        .unwrap();
    send_payload(&mut tls).await;
    truncate(tls.into_inner().0).await;
}

/// Python's `ssl` sends close_notify only from `unwrap()`: `shutdown()`
/// drops the TLS state and ends the TCP stream with a FIN.
const PYTHON_PEER: &str = r#"
import socket, ssl, sys
role, cert, key, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = (bytes(range(251)) * (size // 251 + 1))[:size]
def truncate(tls):
    tls.sendall(data)
    tls.shutdown(socket.SHUT_WR)
    while tls.recv(65536):
        pass
    tls.close()
if role == "server":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        truncate(ctx.wrap_socket(conn, server_side=True))
else:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert, key)
    truncate(ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(sys.argv[5])))))
"#;

/// A Python peer process; killed when dropped.
struct Python(Child);

impl Drop for Python {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python(dir: &std::path::Path, role: &str, leaf: &Leaf, extra: &[&str]) -> Python {
    let files = dir.join(role);
    std::fs::create_dir_all(&files).unwrap();
    let files = leaf.write_files(&files);
    let child = Command::new("python3")
        .args(["-c", PYTHON_PEER, role])
        .arg(&files.svid)
        .arg(&files.key)
        .arg(SIZE.to_string())
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .expect("run python3");
    Python(child)
}

/// The port a Python server printed.
fn python_port(server: &mut Python) -> u16 {
    use std::io::BufRead;
    let out = server.0.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    line.trim().parse().expect("the Python server's port")
}

/// A plain target that reads every connection at `pace` and reports what
/// it saw.
async fn reading_target(pace: Pace) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (report, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let report = report.clone();
            tokio::spawn(async move {
                let _ = report.send(read_all(stream, pace).await);
            });
        }
    });
    (addr, seen)
}

/// The next connection end a reading target reports.
async fn next_end(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(Duration::from_secs(30), seen.recv())
        .await
        .expect("the target saw no connection end")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_byte_before_a_missing_close_notify_arrives_then_a_reset() {
    let started = std::time::Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let (api, web) = (ca.leaf(API), ca.leaf(WEB));

    // Outbound side: truncating upstream servers.
    let rustls_upstream = rustls_truncating_server(&api).await;
    let mut py_server = python(tmp.path(), "server", &api, &[]);
    let py_upstream = SocketAddr::from(([127, 0, 0, 1], python_port(&mut py_server)));
    // Inbound side: plain targets that read fast or slowly.
    let (fast_target, mut fast_seen) = reading_target(Pace::Fast).await;
    let (slow_target, mut slow_seen) = reading_target(Pace::Slow).await;

    let (out_rustls, out_python, in_fast, in_slow) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let allow_api = format!("{API:?}");
    let allow_web = format!("{WEB:?}");
    let tunnels = [
        outbound("out-rustls", out_rustls, rustls_upstream, &allow_api, ""),
        outbound("out-python", out_python, py_upstream, &allow_api, ""),
        inbound("in-fast", in_fast, fast_target, &allow_web, ""),
        inbound("in-slow", in_slow, slow_target, &allow_web, ""),
    ]
    .concat();
    let node = FileNode::start(&tmp.path().join("node"), &api, "", &tunnels).await;

    let app = |addr: SocketAddr, pace: Pace| async move {
        read_all(TcpStream::connect(addr).await.unwrap(), pace).await
    };
    let py_client = python(tmp.path(), "client", &web, &[&in_fast.port().to_string()]);
    let (out_fast, out_slow, out_py_fast, out_py_slow, (), ()) = tokio::join!(
        app(out_rustls, Pace::Fast),
        app(out_rustls, Pace::Slow),
        app(out_python, Pace::Fast),
        app(out_python, Pace::Slow),
        rustls_truncating_client(in_fast, &web),
        rustls_truncating_client(in_slow, &web),
    );
    assert_whole_then_reset("outbound, rustls upstream, fast app", &out_fast);
    assert_whole_then_reset("outbound, rustls upstream, slow app", &out_slow);
    assert_whole_then_reset("outbound, Python upstream, fast app", &out_py_fast);
    assert_whole_then_reset("outbound, Python upstream, slow app", &out_py_slow);

    // The fast target has two clients (rustls and Python): either order.
    for _ in 0..2 {
        assert_whole_then_reset("inbound, fast target", &next_end(&mut fast_seen).await);
    }
    assert_whole_then_reset("inbound, slow target", &next_end(&mut slow_seen).await);
    drop(py_client);

    let m = metrics(node.admin).await;
    for (tunnel, kind, want) in [
        ("out-rustls", "outbound", 2.0),
        ("out-python", "outbound", 2.0),
        ("in-fast", "inbound", 2.0),
        ("in-slow", "inbound", 1.0),
    ] {
        let series = format!(
            "spiffe_tunnel_connections_closed_total{{tunnel=\"{tunnel}\",kind=\"{kind}\",end=\"truncated\"}}"
        );
        assert_eq!(sample(&m, &series), want, "{series}:\n{m}");
    }
    eprintln!(
        "truncation: 8 cases of {} MiB in {:.1} s",
        SIZE >> 20,
        started.elapsed().as_secs_f64()
    );
}
