//! SVIDs for the proxies people already run, and those proxies against
//! spiffe-tunnel, every piece a real process over real sockets:
//!
//! * `svid watch` pushing each rotation into a running HAProxy through its
//!   runtime API: the certificate HAProxy presents changes, CA rotation
//!   included, while its pid stays the same;
//! * the mixed sidecar pairs, both ways: a spiffe-tunnel outbound into an
//!   HAProxy mTLS frontend, and an HAProxy `server ... ssl crt` line into a
//!   spiffe-tunnel inbound, with traffic across rotations of both ends;
//! * the classic two-node sidecar with HAProxy on both ends;
//! * what HAProxy does not check (the SPIFFE ID, the trust domain of the
//!   CA, the X509-SVID rules; `verifyhost` cannot name a SPIFFE ID) and
//!   spiffe-tunnel does, side by side;
//! * `openssl s_client` and `curl` against spiffe-tunnel's ends;
//! * readers polling `svid watch`'s files through 50 rotations never see a
//!   partial file, a key beside a certificate it does not match, or a wrong
//!   file mode.
//!
//! HAProxy runs the configs in `examples/haproxy/` (ports and paths
//! substituted), so the configs the docs show are the ones proven here.
//! HAProxy, openssl, curl and socat are required: without them a test
//! fails and says how to install them (`scripts/test` does).

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::agent::DevAgent;
use common::certs::{dns_san, uri_san, Ca, DnType, Leaf};
use common::haproxy::{example_config, HaProxy};
use common::harness::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls_pki_types::pem::PemObject;
use spiffe_tunnel::identity::Svid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "example.org";
const HAPROXY_ID: &str = "spiffe://example.org/haproxy";
const CLIENT: &str = "spiffe://example.org/client";
const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";
const INTRUDER: &str = "spiffe://example.org/intruder";

/// What the HTTP backend puts in every answer.
const BODY: &str = "hello from the backend";
const REQUEST: &[u8] = b"GET / HTTP/1.0\r\nHost: backend\r\n\r\n";

// ------------------------------------------------------------ processes

/// The dev agent of trust domain [`TD`] on `dir/<name>.sock`.
async fn dev_agent(dir: &Path, name: &str, args: &[&str]) -> DevAgent {
    DevAgent::start(dir, &dir.join(format!("{name}.sock")), TD, args).await
}

/// `spiffe-tunnel svid watch` for one SPIFFE ID: the SPIRE-named files in
/// `dir`, chain plus key in `cert` (HAProxy's `crt`), every bundle in
/// `ca_file`.
struct Watch {
    daemon: Daemon,
    dir: PathBuf,
    cert: PathBuf,
    ca_file: PathBuf,
}

impl Watch {
    /// Starts it and returns once `cert` and `ca_file` exist (so HAProxy
    /// can be started on them). Pushes into the HAProxy whose stats socket
    /// is `admin`, if given.
    /// With `admin`, HAProxy's master CLI is taken to be [`master_of`]
    /// it, as [`start_haproxy`] starts HAProxy.
    async fn start(
        dir: &Path,
        name: &str,
        agent: &DevAgent,
        id: &str,
        admin: Option<&Path>,
    ) -> Self {
        let master = admin.map(master_of);
        Self::start_with(dir, name, agent, id, admin, master.as_deref()).await
    }

    /// [`Watch::start`], also given HAProxy's master CLI
    /// (`--haproxy-master-socket`).
    async fn start_with(
        dir: &Path,
        name: &str,
        agent: &DevAgent,
        id: &str,
        admin: Option<&Path>,
        master: Option<&Path>,
    ) -> Self {
        let out = dir.join(name);
        let cert = dir.join(format!("{name}.pem"));
        let ca_file = dir.join(format!("{name}-bundle.pem"));
        let address = agent.address();
        let mut args = vec![
            "svid",
            "watch",
            "--write",
            out.to_str().unwrap(),
            "--socket",
            &address,
            "--id",
            id,
            "--haproxy-cert",
            cert.to_str().unwrap(),
            "--haproxy-ca-file",
            ca_file.to_str().unwrap(),
        ];
        if let Some(admin) = admin {
            args.extend(["--haproxy-socket", admin.to_str().unwrap()]);
        }
        if let Some(master) = master {
            args.extend(["--haproxy-master-socket", master.to_str().unwrap()]);
        }
        let daemon = Daemon::spawn(&args, dir, &[]);
        let (c, a) = (cert.clone(), ca_file.clone());
        wait_until(
            "svid watch's first files",
            Duration::from_secs(20),
            move || c.exists() && a.exists(),
        )
        .await;
        Self {
            daemon,
            dir: out,
            cert,
            ca_file,
        }
    }

    /// Successful pushes into HAProxy so far.
    fn pushes(&self) -> usize {
        self.daemon
            .log()
            .matches("HAProxy now presents the new SVID")
            .count()
    }

    /// The serials `svid watch` wrote, normalised.
    fn written_serials(&self) -> BTreeSet<String> {
        self.daemon
            .log()
            .lines()
            .filter(|l| l.contains("SVIDs written"))
            .filter_map(|l| l.split("(serial ").nth(1))
            .filter_map(|s| s.split(')').next())
            .map(norm_serial)
            .collect()
    }
}

/// A tiny HTTP/1.0 server on loopback: answers every request with 200 and
/// [`BODY`], then closes; counts the connections it accepts.
struct HttpBackend {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
}

impl HttpBackend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepts);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    let read_head = async {
                        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return false,
                                Ok(k) => request.extend_from_slice(&buf[..k]),
                            }
                        }
                        true
                    };
                    if !matches!(
                        tokio::time::timeout(Duration::from_secs(10), read_head).await,
                        Ok(true)
                    ) {
                        return;
                    }
                    let body = format!("{BODY}, request {n}\n");
                    let answer = format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Self { addr, accepts }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

/// The master CLI of the HAProxy whose stats socket is `admin`.
fn master_of(admin: &Path) -> PathBuf {
    admin.with_extension("master.sock")
}

/// HAProxy on `config`, master-worker as Debian runs it, its master CLI at
/// [`master_of`] `admin`: HAProxy before 3.0 takes SVIDs without a DNS
/// name only by a reload (see the README), which `svid watch` does there.
fn start_haproxy(dir: &Path, name: &str, config: &str, admin: &Path) -> HaProxy {
    HaProxy::start_master_worker_in(None, dir, name, config, admin, &master_of(admin))
}

// ------------------------------------------------------------ configs

/// `examples/haproxy/server-side.cfg`: mTLS on `listen`, plain to `app`.
fn server_side_config(admin: &Path, watch: &Watch, listen: SocketAddr, app: SocketAddr) -> String {
    example_config(
        "server-side.cfg",
        &[
            ("/run/haproxy/admin.sock", admin.to_str().unwrap()),
            ("/etc/haproxy/svid.pem", watch.cert.to_str().unwrap()),
            ("/etc/haproxy/bundle.pem", watch.ca_file.to_str().unwrap()),
            ("0.0.0.0:8443", &listen.to_string()),
            ("127.0.0.1:3000", &app.to_string()),
        ],
    )
}

/// `examples/haproxy/client-side.cfg`: plain on `listen`, mTLS to `remote`.
fn client_side_config(
    admin: &Path,
    watch: &Watch,
    listen: SocketAddr,
    remote: SocketAddr,
) -> String {
    example_config(
        "client-side.cfg",
        &[
            ("/run/haproxy/admin.sock", admin.to_str().unwrap()),
            ("/etc/haproxy/svid.pem", watch.cert.to_str().unwrap()),
            ("/etc/haproxy/bundle.pem", watch.ca_file.to_str().unwrap()),
            ("127.0.0.1:8080", &listen.to_string()),
            ("10.0.0.2:8443", &remote.to_string()),
        ],
    )
}

fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Starts `spiffe-tunnel run` on `config` (written to `dir/<name>.toml`)
/// and waits until it listens.
async fn tunnel(dir: &Path, name: &str, config: String) -> Daemon {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let daemon = Daemon::run(&path);
    daemon.wait_running().await;
    daemon
}

fn inbound_toml(
    identity: &str,
    listen: SocketAddr,
    target: SocketAddr,
    svid: Option<&str>,
    allow: &[&str],
) -> String {
    let svid = svid
        .map(|s| format!("svid = \"{s}\"\n"))
        .unwrap_or_default();
    format!(
        "{identity}[[inbound]]\nname = \"in\"\nlisten = \"{listen}\"\ntarget = \"{target}\"\n{svid}allow = {}\n",
        toml_list(allow)
    )
}

fn outbound_toml(
    identity: &str,
    listen: SocketAddr,
    upstream: SocketAddr,
    svid: Option<&str>,
    allow: &[&str],
) -> String {
    let svid = svid
        .map(|s| format!("svid = \"{s}\"\n"))
        .unwrap_or_default();
    format!(
        "{identity}[[outbound]]\nname = \"out\"\nlisten = \"{listen}\"\nupstreams = [\"{upstream}\"]\n{svid}allow = {}\n",
        toml_list(allow)
    )
}

/// A file identity (`source = "files"`) for `leaf` in `dir/<name>/`.
fn files_identity(dir: &Path, name: &str, leaf: &Leaf, bundles: &[(&str, &str)]) -> String {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    let files = leaf.write_files(&sub);
    let mut toml = format!(
        "[identity]\nsource = \"files\"\ncert = {:?}\nkey = {:?}\n[identity.bundles]\n",
        files.svid.to_str().unwrap(),
        files.key.to_str().unwrap()
    );
    for (td, pem) in bundles {
        let path = sub.join(format!("{td}.bundle.pem"));
        std::fs::write(&path, pem).unwrap();
        toml.push_str(&format!("{td:?} = {:?}\n", path.to_str().unwrap()));
    }
    toml
}

// ------------------------------------------------------------ clients

fn check_answer(raw: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(raw);
    if text.starts_with("HTTP/1.0 200 OK") && text.contains(BODY) {
        Ok(())
    } else {
        Err(format!("unexpected answer {text:?}"))
    }
}

/// One HTTP/1.0 request over plain TCP; the answer must come from the
/// backend.
async fn plain_get(addr: SocketAddr) -> Result<(), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(REQUEST).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(answer)) => check_answer(&answer),
        Ok(Err(e)) => Err(format!("{addr}: {e}")),
        Err(_) => Err(format!("{addr}: no answer within 10 s")),
    }
}

/// One HTTP/1.0 request over mTLS presenting `chain_pem`/`key_pem` (the
/// server's certificate is not verified: the point is what it presents
/// and what it does with ours). Returns the chain the server presented.
async fn tls_get(
    addr: SocketAddr,
    chain_pem: &str,
    key_pem: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    tls_get_with(addr, raw_client_config(Some((chain_pem, key_pem)))).await
}

/// [`tls_get`] with a client config of the caller's (say, one that
/// presents no certificate).
async fn tls_get_with(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let exchange = async {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = ServerName::try_from("server.test").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        let presented: Vec<CertificateDer<'static>> = tls
            .get_ref()
            .1
            .peer_certificates()
            .unwrap_or_default()
            .iter()
            .map(|c| c.clone().into_owned())
            .collect();
        tls.write_all(REQUEST).await?;
        tls.flush().await?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                // A close without close_notify after a whole answer is fine.
                Err(e) if !answer.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    break
                }
                Err(e) => return Err(e),
            }
        }
        Ok((presented, answer))
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok((presented, answer))) => check_answer(&answer).map(|()| presented),
        Ok(Err(e)) => Err(format!("{addr}: {e}")),
        Err(_) => Err(format!("{addr}: no answer within 10 s")),
    }
}

/// The SVID in an `svid watch` folder, read the consistent way: resolve
/// `..data` once, read both files from the version it names.
fn read_svid_dir(dir: &Path) -> (String, String) {
    let data = std::fs::canonicalize(dir.join("..data")).unwrap();
    (
        std::fs::read_to_string(data.join("svid.0.pem")).unwrap(),
        std::fs::read_to_string(data.join("svid.0.key")).unwrap(),
    )
}

/// Sends requests one after another until `done` holds; returns how many
/// were sent and the failures. Fails the test after `deadline`.
async fn traffic_until<F, Fut>(
    what: &str,
    deadline: Duration,
    mut request: F,
    mut done: impl FnMut() -> bool,
) -> (usize, Vec<String>)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    let mut count = 0;
    let mut failures = Vec::new();
    while !done() {
        assert!(
            start.elapsed() < deadline,
            "{what}: not reached within {deadline:?} ({count} requests, failures: {failures:?})"
        );
        if let Err(e) = request().await {
            failures.push(e);
        }
        count += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    (count, failures)
}

// ------------------------------------------------------------ certificates

/// Lower-case hex without leading zeros: how serials are compared here
/// (HAProxy, the watch log and DER each spell them a little differently).
fn norm_serial(serial: &str) -> String {
    serial
        .trim()
        .replace(':', "")
        .to_lowercase()
        .trim_start_matches('0')
        .to_string()
}

/// Serial, issuer and the URI SANs of a certificate.
fn cert_facts(der: &[u8]) -> (String, String, Vec<String>) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
    let serial: String = cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let uris = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    (norm_serial(&serial), cert.issuer().to_string(), uris)
}

/// NotAfter of the first certificate in a PEM file.
fn not_after(pem_file: &Path) -> SystemTime {
    let pem = std::fs::read(pem_file).unwrap();
    let der = CertificateDer::pem_slice_iter(&pem)
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let secs = cert.validity().not_after.timestamp();
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap())
}

/// The serials of every certificate in a PEM file.
fn pem_serials(pem_file: &Path) -> BTreeSet<String> {
    let pem = std::fs::read(pem_file).unwrap();
    CertificateDer::pem_slice_iter(&pem)
        .map(|der| cert_facts(&der.unwrap()).0)
        .collect()
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

// ============================================================ the tests

/// `svid watch` pushes every rotation into a running HAProxy, run
/// master-worker as Debian's haproxy.service does: the serial HAProxy
/// presents on its `bind ... ssl crt` line changes at least three times, a
/// CA rotation included (the new CA reaches HAProxy's `ca-file` before any
/// client presents an SVID it signed), no connection fails, and the
/// master is the same process throughout. On HAProxy 3.3 and later
/// everything goes in through the runtime API. Before, what a runtime
/// commit would break (a new CA before 3.3, bug #3165; before 3.0 also an
/// SVID without a DNS name, which would turn `verify required` off: see
/// the tests above) goes in by a `reload` on the master CLI, and nothing
/// else does: each new worker is counted against the reloads logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_presents_each_new_svid_and_takes_each_new_ca_keeping_its_pid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // SVIDs live 3 s (renewed every 1.5-2 s); the CA lives 8 s: the next CA
    // joins the bundle at 4 s and signs from 6 s.
    let agent = dev_agent(
        d,
        "agent",
        &[
            "--id", HAPROXY_ID, "--id", CLIENT, "--ttl", "3s", "--ca-ttl", "8s",
        ],
    )
    .await;
    let admin = d.join("admin.sock");
    let master = d.join("master.sock");
    let watch = Watch::start_with(
        d,
        "haproxy",
        &agent,
        HAPROXY_ID,
        Some(&admin),
        Some(&master),
    )
    .await;
    // The test client's SVID, kept current by a second watch.
    let client = Watch::start(d, "client", &agent, CLIENT, None).await;
    let backend = HttpBackend::start().await;
    let listen = free_addr();
    let mut haproxy = HaProxy::start_master_worker_in(
        None,
        d,
        "haproxy",
        &server_side_config(&admin, &watch, listen, backend.addr),
        &admin,
        &master,
    );
    let pid = haproxy.pid();
    assert_eq!(haproxy.master_pid(), pid);
    let version = haproxy.version();
    let affected = haproxy.has_ca_commit_bug();
    let workers = Mutex::new(vec![haproxy.reported_pid()]);
    let first_cas = pem_serials(&watch.ca_file);
    assert_eq!(
        haproxy.ca_file_serials(&watch.ca_file),
        Some(first_cas.clone())
    );

    // (serial, issuer) of what HAProxy presented, each change once.
    let presented: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    let client_issuers: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let (count, failures) = traffic_until(
        "HAProxy presenting 3 new SVIDs and a new CA",
        Duration::from_secs(30),
        || async {
            let (chain, key) = read_svid_dir(&client.dir);
            let ours = CertificateDer::pem_slice_iter(chain.as_bytes())
                .next()
                .unwrap()
                .unwrap();
            let server_chain = tls_get(listen, &chain, &key).await?;
            let leaf = server_chain.first().ok_or("HAProxy sent no certificate")?;
            let (serial, issuer, uris) = cert_facts(leaf);
            if uris != [HAPROXY_ID] {
                return Err(format!("HAProxy presented {uris:?}"));
            }
            client_issuers.lock().unwrap().insert(cert_facts(&ours).1);
            if let Some(worker) = haproxy.try_reported_pid() {
                let mut workers = workers.lock().unwrap();
                if workers.last() != Some(&worker) {
                    workers.push(worker);
                }
            }
            let mut presented = presented.lock().unwrap();
            if presented.last().map(|p| &p.0) != Some(&serial) {
                presented.push((serial, issuer));
            }
            Ok(())
        },
        || {
            let presented = presented.lock().unwrap();
            let issuers: BTreeSet<_> = presented.iter().map(|p| &p.1).collect();
            presented.len() >= 4 && issuers.len() >= 2 && client_issuers.lock().unwrap().len() >= 2
        },
    )
    .await;
    assert!(
        failures.is_empty(),
        "{} of {count} connections failed: {failures:?}",
        failures.len()
    );
    let presented = presented.into_inner().unwrap();

    // The same HAProxy master all along; a new worker only where HAProxy
    // cannot take the update at runtime: a new CA before 3.3, and before
    // 3.0 also an SVID without a DNS name (the dev agent's have none).
    assert!(haproxy.is_running(), "HAProxy exited:\n{}", haproxy.log());
    assert_eq!(haproxy.master_pid(), pid);
    // A reload may be under way as the traffic stops (its worker up, its
    // log line not yet written, or the other way round): wait, with a
    // deadline, until the workers seen and the reloads logged agree.
    let mut workers = workers.into_inner().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (log, reloads) = loop {
        if let Some(worker) = haproxy.try_reported_pid() {
            if workers.last() != Some(&worker) {
                workers.push(worker);
            }
        }
        let log = watch.daemon.log();
        let reloads = log
            .matches("HAProxy reloaded through its master CLI")
            .count();
        if workers.len() - 1 == reloads || Instant::now() > deadline {
            break (log, reloads);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(workers.len() - 1, reloads, "workers {workers:?}; {log}");
    if affected {
        assert!(
            reloads >= 1,
            "HAProxy {version} took a new CA without a reload: {log}"
        );
    } else {
        assert_eq!(reloads, 0, "HAProxy {version} was reloaded: {log}");
    }
    // Never a CA commit where it breaks HAProxy.
    assert_eq!(
        log.contains("ca_file_committed=true"),
        !affected,
        "HAProxy {version}: {log}"
    );
    // Everything it presented came from svid watch, and watch says so.
    let written = watch.written_serials();
    for (serial, _) in &presented {
        assert!(
            written.contains(serial),
            "HAProxy presented {serial}, which svid watch never wrote ({written:?})"
        );
    }
    assert!(
        agent.daemon.log().contains("activated the next CA"),
        "{}",
        agent.daemon.log()
    );
    // HAProxy's committed `ca-file` follows the bundle on disk.
    wait_until(
        "HAProxy's ca-file to hold the new bundle",
        Duration::from_secs(10),
        || {
            let on_disk = pem_serials(&watch.ca_file);
            on_disk != first_cas && haproxy.ca_file_serials(&watch.ca_file) == Some(on_disk)
        },
    )
    .await;
    // What docs/haproxy-nginx-stunnel.md tells operators to look at, the way it says to.
    let socat = which("socat", "apt-get install socat");
    let mut show = tokio::process::Command::new(socat);
    show.arg("stdio")
        .arg(format!("unix-connect:{}", admin.display()));
    let command = format!("show ssl cert {}\n", watch.cert.display());
    let (ok, out, err) = run(show, command.as_bytes()).await;
    assert!(
        ok && out.contains("Serial: ") && out.contains("notAfter: "),
        "{out}\n{err}"
    );
    assert!(watch.pushes() >= 3, "{}", watch.daemon.log());
    let log = watch.daemon.log();
    assert!(!log.contains("HAProxy update failed"), "{log}");
    assert!(!log.contains("HAProxy update incomplete"), "{log}");
    eprintln!(
        "HAProxy {version} (master pid {pid}) presented {} serials from {} CAs over {count} \
         connections, none failed; {} pushes, {reloads} reloads (workers {workers:?})",
        presented.len(),
        presented
            .iter()
            .map(|p| &p.1)
            .collect::<BTreeSet<_>>()
            .len(),
        watch.pushes()
    );
}

/// HAProxy bug #3165 (fixed in 3.3.0) on the HAProxy installed here, step
/// by step through its runtime API, as `svid watch` used to drive it: a
/// `commit ssl ca-file` (even of the CAs HAProxy already has) rebuilds the
/// frontend's TLS context but leaves the new context out of the
/// certificate's list; a `commit ssl cert` then answers "Success!" and
/// `show ssl cert` shows the new certificate, yet HAProxy keeps presenting
/// the old one, and the certificate the context points to is freed; the
/// next `commit ssl ca-file` walks into it and HAProxy (usually) dies of
/// SIGSEGV.
/// On a release with the fix the same steps present the new certificate
/// and HAProxy lives. This is why `svid watch` never commits a CA file at
/// runtime on HAProxy before 3.3 (the tests below show what it does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_before_3_3_breaks_at_a_runtime_ca_commit_then_crashes_at_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, next_ca) = (Ca::new(TD), Ca::new(TD));
    // With a DNS name, unlike SPIRE's SVIDs by default: HAProxy 2.6 sets a
    // `bind` line's verification up again on a rebuild only for a
    // certificate that has a name (or a crt-list SNI filter), and only
    // such a context is linked to the CA file (see the README).
    let named = || {
        ca.leaf_builder(HAPROXY_ID)
            .sans(vec![uri_san(HAPROXY_ID), dns_san("haproxy.test")])
            .build()
    };
    let (first, second) = (named(), named());
    let client = ca.leaf(CLIENT);
    let (cert, ca_file, admin) = (
        d.join("svid.pem"),
        d.join("bundle.pem"),
        d.join("admin.sock"),
    );
    let pem_of = |leaf: &Leaf| format!("{}{}", leaf.chain_pem, leaf.key_pem);
    std::fs::write(&cert, pem_of(&first)).unwrap();
    std::fs::write(&ca_file, ca.bundle_pem()).unwrap();
    let backend = HttpBackend::start().await;
    let listen = free_addr();
    let config = example_config(
        "server-side.cfg",
        &[
            ("/run/haproxy/admin.sock", admin.to_str().unwrap()),
            ("/etc/haproxy/svid.pem", cert.to_str().unwrap()),
            ("/etc/haproxy/bundle.pem", ca_file.to_str().unwrap()),
            ("0.0.0.0:8443", &listen.to_string()),
            ("127.0.0.1:3000", &backend.addr.to_string()),
        ],
    );
    let mut haproxy = HaProxy::start(d, "haproxy", &config, &admin);
    let version = haproxy.version();
    let affected = haproxy.has_ca_commit_bug();
    let serial = |leaf: &Leaf| cert_facts(&leaf.chain_der[0]).0;
    let presented = || async {
        let chain = tls_get(listen, &client.chain_pem, &client.key_pem).await?;
        Ok::<_, String>(cert_facts(chain.first().ok_or("no certificate")?).0)
    };
    assert_eq!(presented().await, Ok(serial(&first)));

    // 1. A CA commit of the very CAs HAProxy read at start.
    let answer = haproxy.set_and_commit("ca-file", &ca_file, ca.bundle_pem());
    assert!(
        answer.as_ref().is_ok_and(|a| a.contains("Success")),
        "{answer:?}"
    );
    // 2. A certificate commit: accepted, and HAProxy's store has it...
    let answer = haproxy.set_and_commit("cert", &cert, &pem_of(&second));
    assert!(
        answer.as_ref().is_ok_and(|a| a.contains("Success")),
        "{answer:?}"
    );
    assert_eq!(haproxy.cert_serial(&cert), Some(serial(&second)));
    // ...but with the bug no TLS context was rebuilt (no dot after
    // "Committing FILE": one per context) and the old one is presented.
    let answer = answer.unwrap();
    let rebuilt = answer
        .lines()
        .next()
        .and_then(|l| l.strip_prefix(&format!("Committing {}", cert.display())))
        .map_or(0, |dots| dots.matches('.').count());
    let now = presented().await;
    if affected {
        assert_eq!(rebuilt, 0, "HAProxy {version} rebuilt a context: {answer}");
        assert_eq!(
            now,
            Ok(serial(&first)),
            "HAProxy {version} presents the new certificate"
        );
    } else {
        assert_eq!(now, Ok(serial(&second)), "HAProxy {version}");
    }
    // 3. The next CA commit, a CA rotation's.
    let both = format!("{}{}", ca.bundle_pem(), next_ca.bundle_pem());
    let answer = haproxy.set_and_commit("ca-file", &ca_file, &both);
    if affected {
        // A use-after-free: it crashes only when the freed memory was
        // reused, which it usually is (5 of 5 runs by hand) but not
        // always. Steps 1 and 2 are the deterministic proof; here, a
        // HAProxy that no longer answers must have died of the SIGSEGV.
        if haproxy.try_cli("show info").is_ok() {
            eprintln!("HAProxy {version}: CA commit, certificate commit (\"Success!\", still presenting the old one), CA commit: survived this time");
        } else {
            wait_until(
                "HAProxy to die at the second CA commit",
                Duration::from_secs(10),
                || haproxy.exit_status().is_some(),
            )
            .await;
            let status = haproxy.exit_status().unwrap();
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                status.signal(),
                Some(11),
                "HAProxy {version} ended {status} ({answer:?})"
            );
            eprintln!("HAProxy {version}: CA commit, certificate commit (\"Success!\", still presenting the old one), CA commit: {status}");
        }
    } else {
        assert!(
            answer.as_ref().is_ok_and(|a| a.contains("Success")),
            "{answer:?}"
        );
        assert!(
            haproxy.is_running(),
            "HAProxy {version}:\n{}",
            haproxy.log()
        );
    }
}

/// HAProxy before 3.0, `bind ... crt FILE ... verify required`, and a
/// certificate with no DNS name nor CN (as SPIRE issues them by default):
/// one runtime `commit ssl cert` and that line lets in a client without
/// any certificate, and one whose certificate no CA in `ca-file` signed.
/// This is why `svid watch` never commits such a certificate at runtime
/// into HAProxy before 3.0 (the test after this one). With a DNS name the
/// line keeps its settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_before_3_0_lets_anyone_in_after_a_runtime_commit_of_a_nameless_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(TD);
    let (first, second) = (ca.leaf(HAPROXY_ID), ca.leaf(HAPROXY_ID));
    let client = ca.leaf(CLIENT);
    let stranger = Ca::new(TD).leaf(INTRUDER);
    let (cert, ca_file, admin) = (
        d.join("svid.pem"),
        d.join("bundle.pem"),
        d.join("admin.sock"),
    );
    let pem_of = |leaf: &Leaf| format!("{}{}", leaf.chain_pem, leaf.key_pem);
    std::fs::write(&cert, pem_of(&first)).unwrap();
    std::fs::write(&ca_file, ca.bundle_pem()).unwrap();
    let backend = HttpBackend::start().await;
    let listen = free_addr();
    let config = example_config(
        "server-side.cfg",
        &[
            ("/run/haproxy/admin.sock", admin.to_str().unwrap()),
            ("/etc/haproxy/svid.pem", cert.to_str().unwrap()),
            ("/etc/haproxy/bundle.pem", ca_file.to_str().unwrap()),
            ("0.0.0.0:8443", &listen.to_string()),
            ("127.0.0.1:3000", &backend.addr.to_string()),
        ],
    );
    let haproxy = HaProxy::start(d, "haproxy", &config, &admin);
    let version = haproxy.version();
    // Before 3.0 (the '*' SNI filter for default certificates, 0bf9d122a).
    let old = haproxy.release() < (3, 0);
    let lets_in = |leaf: Option<&Leaf>| {
        let pair = leaf.map(|l| (l.chain_pem.clone(), l.key_pem.clone()));
        async move {
            let config = raw_client_config(pair.as_ref().map(|(c, k)| (c.as_str(), k.as_str())));
            tls_get_with(listen, config).await.is_ok()
        }
    };
    assert!(lets_in(Some(&client)).await);
    assert!(
        !lets_in(None).await,
        "HAProxy {version} let in a client without a certificate"
    );
    assert!(!lets_in(Some(&stranger)).await);
    let answer = haproxy.set_and_commit("cert", &cert, &pem_of(&second));
    assert!(
        answer.as_ref().is_ok_and(|a| a.contains("Success")),
        "{answer:?}"
    );
    assert!(lets_in(Some(&client)).await);
    if old {
        assert!(
            lets_in(None).await,
            "HAProxy {version} kept verify required"
        );
        assert!(
            lets_in(Some(&stranger)).await,
            "HAProxy {version} kept its ca-file"
        );
        eprintln!("HAProxy {version}: after one commit of a certificate without a DNS name, `verify required` is gone");
    } else {
        assert!(
            !lets_in(None).await,
            "HAProxy {version} let in a client without a certificate"
        );
        assert!(
            !lets_in(Some(&stranger)).await,
            "HAProxy {version} let in a stranger"
        );
    }
}

/// Without the master CLI, `svid watch` commits nothing into an HAProxy
/// before 3.0 that could leave it open or broken: SVIDs without a DNS name
/// are refused (an error says why and what to do), and so is a new CA;
/// HAProxy keeps presenting the SVID it started with, keeps refusing a
/// client without a certificate, and stays up. (On 3.0 to 3.2 the SVIDs go
/// in at runtime and only the CA is refused; on 3.3 both go in.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_master_cli_nothing_unsafe_is_committed_into_an_old_haproxy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = dev_agent(
        d,
        "agent",
        &["--id", HAPROXY_ID, "--ttl", "3s", "--ca-ttl", "8s"],
    )
    .await;
    let admin = d.join("admin.sock");
    let watch = Watch::start_with(d, "haproxy", &agent, HAPROXY_ID, Some(&admin), None).await;
    let backend = HttpBackend::start().await;
    let listen = free_addr();
    let mut haproxy = HaProxy::start(
        d,
        "haproxy",
        &server_side_config(&admin, &watch, listen, backend.addr),
        &admin,
    );
    let pid = haproxy.pid();
    let version = haproxy.version();
    let first_serial = presented_by(listen).await.map(|leaf| cert_facts(&leaf).0);
    assert!(first_serial.is_some());
    let first_cas = haproxy.ca_file_serials(&watch.ca_file).unwrap();
    // Past a CA change (the agent adds the next CA 4 s in), with pushes
    // (or refusals) after it.
    wait_until(
        "svid watch to handle a new CA",
        Duration::from_secs(30),
        || {
            let prepared = agent.daemon.log().contains("prepared the next CA");
            let log = watch.daemon.log();
            let handled = log.matches("HAProxy update refused").count()
                + log.matches("HAProxy update incomplete").count()
                + log.matches("HAProxy now presents").count();
            prepared && handled >= 6
        },
    )
    .await;
    let log = watch.daemon.log();
    assert!(
        haproxy.is_running(),
        "HAProxy {version} died: {:?}",
        haproxy.exit_status()
    );
    assert_eq!(haproxy.reported_pid(), pid);
    if haproxy.has_ca_commit_bug() {
        assert!(!log.contains("ca_file_committed=true"), "{log}");
        assert_eq!(haproxy.ca_file_serials(&watch.ca_file), Some(first_cas));
    }
    if log.contains("new SVID not committed at runtime") {
        assert!(log.contains("would let in any client"), "{log}");
        assert_eq!(
            presented_by(listen).await.map(|leaf| cert_facts(&leaf).0),
            first_serial
        );
    }
    // Whatever went in, HAProxy still wants a client certificate.
    let config = raw_client_config(None);
    assert!(
        tls_get_with(listen, config).await.is_err(),
        "HAProxy {version} let in a client without a certificate"
    );
    eprintln!("HAProxy {version}: nothing unsafe committed, pid {pid} unchanged, verify kept");
}

/// The leaf HAProxy's `bind` at `addr` presents, read with `openssl
/// s_client` and no client certificate; `None` when it presents none.
async fn presented_by(addr: SocketAddr) -> Option<CertificateDer<'static>> {
    let openssl = which("openssl", "apt-get install openssl");
    let mut command = tokio::process::Command::new(openssl);
    command.args(["s_client", "-connect", &addr.to_string(), "-tls1_3"]);
    let (_, out, _) = run(command, b"").await;
    CertificateDer::pem_slice_iter(out.as_bytes())
        .next()
        .and_then(Result::ok)
}

/// Mixed sidecars, one way: app → spiffe-tunnel outbound (as `web`) →
/// HAProxy's mTLS frontend (as `haproxy`, fed by `svid watch`) → backend.
/// The outbound verifies HAProxy's SVID and authorizes its SPIFFE ID;
/// HAProxy checks the outbound's chain. Requests keep succeeding while
/// both ends rotate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_tunnel_outbound_into_haproxy_frontend_across_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = dev_agent(
        d,
        "agent",
        &["--id", HAPROXY_ID, "--id", WEB, "--ttl", "3s"],
    )
    .await;
    let admin = d.join("admin.sock");
    let watch = Watch::start(d, "haproxy", &agent, HAPROXY_ID, Some(&admin)).await;
    let backend = HttpBackend::start().await;
    let haproxy_addr = free_addr();
    let haproxy = start_haproxy(
        d,
        "haproxy",
        &server_side_config(&admin, &watch, haproxy_addr, backend.addr),
        &admin,
    );
    let first_expiry = not_after(&watch.cert);
    let outbound_addr = free_addr();
    let outbound = tunnel(
        d,
        "outbound",
        outbound_toml(
            &agent.identity_toml(),
            outbound_addr,
            haproxy_addr,
            Some(WEB),
            &[HAPROXY_ID],
        ),
    )
    .await;

    let mut serials = BTreeSet::new();
    let (count, failures) = traffic_until(
        "2 rotations of HAProxy's SVID",
        Duration::from_secs(30),
        || plain_get(outbound_addr),
        || {
            serials.extend(haproxy.cert_serial(&watch.cert));
            serials.len() >= 3 && SystemTime::now() > first_expiry
        },
    )
    .await;
    assert!(
        failures.is_empty(),
        "{} of {count} requests failed: {failures:?}",
        failures.len()
    );
    // One backend connection per request: nothing was retried or lost.
    assert_eq!(backend.accepts(), count);
    let log = outbound.log();
    assert!(!log.contains("connection refused"), "{log}");
    assert!(watch.pushes() >= 2, "{}", watch.daemon.log());
    eprintln!(
        "{count} requests through outbound -> HAProxy across {} HAProxy SVIDs, none failed",
        serials.len()
    );
}

/// Mixed sidecars, the other way: app → HAProxy's `server ... ssl crt ...
/// ca-file ... verify required` line (as `haproxy`, fed by `svid watch`) →
/// spiffe-tunnel inbound (as `api`, allowing only `haproxy`) → backend.
/// Traffic goes on past the expiry of HAProxy's first SVID, so HAProxy
/// must be presenting the rotated ones on its server line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_server_line_into_spiffe_tunnel_inbound_across_rotations() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = dev_agent(
        d,
        "agent",
        &["--id", HAPROXY_ID, "--id", API, "--ttl", "3s"],
    )
    .await;
    let backend = HttpBackend::start().await;
    let inbound_addr = free_addr();
    let inbound = tunnel(
        d,
        "inbound",
        inbound_toml(
            &agent.identity_toml(),
            inbound_addr,
            backend.addr,
            Some(API),
            &[HAPROXY_ID],
        ),
    )
    .await;
    let admin = d.join("admin.sock");
    let watch = Watch::start(d, "haproxy", &agent, HAPROXY_ID, Some(&admin)).await;
    let first_expiry = not_after(&watch.cert);
    let local = free_addr();
    let haproxy = start_haproxy(
        d,
        "haproxy",
        &client_side_config(&admin, &watch, local, inbound_addr),
        &admin,
    );

    let mut serials = BTreeSet::new();
    let (count, failures) = traffic_until(
        "2 rotations of HAProxy's SVID, past the first one's expiry",
        Duration::from_secs(30),
        || plain_get(local),
        || {
            serials.extend(haproxy.cert_serial(&watch.cert));
            serials.len() >= 3
                && SystemTime::now() > first_expiry + Duration::from_millis(500)
                && inbound.log().matches("SVID in use").count() >= 3
        },
    )
    .await;
    assert!(
        failures.is_empty(),
        "{} of {count} requests failed: {failures:?}",
        failures.len()
    );
    assert_eq!(backend.accepts(), count);
    let log = inbound.log();
    assert!(!log.contains("connection refused"), "{log}");
    assert!(
        log.matches("peer authorized").count() >= count && log.contains(HAPROXY_ID),
        "{log}"
    );
    eprintln!(
        "{count} requests through HAProxy -> inbound across {} HAProxy SVIDs, none failed",
        serials.len()
    );
}

/// The classic two-node sidecar with HAProxy on both ends, each fed by its
/// own `svid watch` for its own SPIFFE ID: app → HAProxy (client side, as
/// `web`) → mTLS → HAProxy (server side, as `api`) → backend, across
/// rotations of both. (The mixed pairs are the two tests above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_haproxy_sidecars_fed_by_svid_watch() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = dev_agent(d, "agent", &["--id", WEB, "--id", API, "--ttl", "3s"]).await;
    let backend = HttpBackend::start().await;

    let api_admin = d.join("api-admin.sock");
    let api_watch = Watch::start(d, "api", &agent, API, Some(&api_admin)).await;
    let mtls_addr = free_addr();
    let api_haproxy = start_haproxy(
        d,
        "haproxy-api",
        &server_side_config(&api_admin, &api_watch, mtls_addr, backend.addr),
        &api_admin,
    );
    let web_admin = d.join("web-admin.sock");
    let web_watch = Watch::start(d, "web", &agent, WEB, Some(&web_admin)).await;
    let local = free_addr();
    let web_haproxy = start_haproxy(
        d,
        "haproxy-web",
        &client_side_config(&web_admin, &web_watch, local, mtls_addr),
        &web_admin,
    );
    let expiry = not_after(&api_watch.cert).max(not_after(&web_watch.cert));

    let (mut api_serials, mut web_serials) = (BTreeSet::new(), BTreeSet::new());
    let (count, failures) = traffic_until(
        "2 rotations on both HAProxies",
        Duration::from_secs(30),
        || plain_get(local),
        || {
            api_serials.extend(api_haproxy.cert_serial(&api_watch.cert));
            web_serials.extend(web_haproxy.cert_serial(&web_watch.cert));
            api_serials.len() >= 3
                && web_serials.len() >= 3
                && SystemTime::now() > expiry + Duration::from_millis(500)
        },
    )
    .await;
    assert!(
        failures.is_empty(),
        "{} of {count} requests failed: {failures:?}",
        failures.len()
    );
    assert_eq!(backend.accepts(), count);
    eprintln!(
        "{count} requests through two HAProxy sidecars across {} + {} SVIDs, none failed",
        web_serials.len(),
        api_serials.len()
    );
}

/// What docs/haproxy-nginx-stunnel.md says HAProxy does not check, shown: its `verify
/// required` frontend lets in any certificate that chains to any CA in its
/// `ca-file`, whatever the SPIFFE ID, whichever trust domain's CA signed
/// it, and whether or not it is an X509-SVID at all; spiffe-tunnel's
/// inbound, with the same CAs, refuses all three. On the client side,
/// HAProxy's `server` line checks no name, and `verifyhost` cannot name a
/// SPIFFE ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_checks_the_chain_but_not_the_spiffe_id() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ours = Ca::new(TD);
    // A subject of its own, as real CAs have: OpenSSL picks issuers by name.
    let partner = Ca::new_with("partner.org", |params| {
        params
            .distinguished_name
            .push(DnType::CommonName, "partner.org CA");
    });
    let server = ours.leaf(API);

    // HAProxy, as the docs configure it, trusting both trust domains.
    let admin = d.join("admin.sock");
    let cert = d.join("haproxy.pem");
    std::fs::write(&cert, format!("{}{}", server.chain_pem, server.key_pem)).unwrap();
    let ca_file = d.join("bundle.pem");
    std::fs::write(
        &ca_file,
        format!("{}{}", ours.bundle_pem(), partner.bundle_pem()),
    )
    .unwrap();
    let haproxy_backend = HttpBackend::start().await;
    let haproxy_addr = free_addr();
    let config = example_config(
        "server-side.cfg",
        &[
            ("/run/haproxy/admin.sock", admin.to_str().unwrap()),
            ("/etc/haproxy/svid.pem", cert.to_str().unwrap()),
            ("/etc/haproxy/bundle.pem", ca_file.to_str().unwrap()),
            ("0.0.0.0:8443", &haproxy_addr.to_string()),
            ("127.0.0.1:3000", &haproxy_backend.addr.to_string()),
        ],
    );
    let _haproxy = HaProxy::start(d, "haproxy", &config, &admin);

    // spiffe-tunnel with the same SVID and both bundles, allowing `web`.
    let tunnel_backend = HttpBackend::start().await;
    let inbound_addr = free_addr();
    let identity = files_identity(
        d,
        "inbound",
        &server,
        &[
            (TD, ours.bundle_pem()),
            ("partner.org", partner.bundle_pem()),
        ],
    );
    let inbound = tunnel(
        d,
        "inbound",
        inbound_toml(&identity, inbound_addr, tunnel_backend.addr, None, &[WEB]),
    )
    .await;

    let web = ours.leaf(WEB);
    let clients = [
        ("another workload's SVID", ours.leaf(INTRUDER)),
        ("`web` signed by partner.org's CA", partner.leaf(WEB)),
        (
            "a certificate with no SPIFFE ID",
            ours.leaf_builder(WEB)
                .sans(vec![dns_san("web.example.org")])
                .build(),
        ),
    ];
    // The allowed client gets through both.
    tls_get(haproxy_addr, &web.chain_pem, &web.key_pem)
        .await
        .expect("HAProxy, web");
    tls_get(inbound_addr, &web.chain_pem, &web.key_pem)
        .await
        .expect("inbound, web");
    for (what, leaf) in &clients {
        tls_get(haproxy_addr, &leaf.chain_pem, &leaf.key_pem)
            .await
            .unwrap_or_else(|e| {
                panic!("HAProxy refused {what}, which it was expected to accept: {e}")
            });
        let refused = tls_get(inbound_addr, &leaf.chain_pem, &leaf.key_pem).await;
        assert!(refused.is_err(), "spiffe-tunnel let {what} through");
    }
    assert_eq!(haproxy_backend.accepts(), 1 + clients.len());
    assert_eq!(
        tunnel_backend.accepts(),
        1,
        "a refused client reached the backend"
    );
    let log = inbound.log();
    assert!(
        log.contains(&format!("peer {INTRUDER} is not allowed")),
        "{log}"
    );

    // HAProxy as the client: its `server` line checks the server's chain
    // and no name (the inbound above presents `api`, and any SVID from
    // either CA would do). `verifyhost` compares DNS names and the subject
    // CN only, so the server's SPIFFE ID cannot be required with it: it
    // refuses the very SVID it names.
    let web_cert = d.join("web.pem");
    std::fs::write(&web_cert, format!("{}{}", web.chain_pem, web.key_pem)).unwrap();
    let client_side = |name: &str, extra: &str| {
        let admin = d.join(format!("{name}.sock"));
        let listen = free_addr();
        let config = example_config(
            "client-side.cfg",
            &[
                ("/run/haproxy/admin.sock", admin.to_str().unwrap()),
                ("/etc/haproxy/svid.pem", web_cert.to_str().unwrap()),
                ("/etc/haproxy/bundle.pem", ca_file.to_str().unwrap()),
                ("127.0.0.1:8080", &listen.to_string()),
                ("10.0.0.2:8443", &inbound_addr.to_string()),
                ("verify required", &format!("verify required{extra}")),
            ],
        );
        (HaProxy::start(d, name, &config, &admin), listen)
    };
    let (_plain, plain_listen) = client_side("client", "");
    let (_named, named_listen) = client_side("client-verifyhost", &format!(" verifyhost {API}"));
    plain_get(plain_listen)
        .await
        .expect("HAProxy's server line to the inbound");
    assert_eq!(tunnel_backend.accepts(), 2);
    let refused = plain_get(named_listen).await;
    assert!(
        refused.is_err(),
        "HAProxy matched `verifyhost {API}` against an SVID"
    );
    assert_eq!(tunnel_backend.accepts(), 2);
}

/// Independent TLS stacks against spiffe-tunnel: `openssl s_client` with an
/// allowed SVID gets the backend's answer and one with a disallowed ID gets
/// nothing (the backend never sees it); `curl --cert --key --cacert` to an
/// inbound whose SVID also carries the DNS SAN `localhost` (so curl's host
/// name check passes), and plain `curl` through an outbound → inbound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_and_curl_against_spiffe_tunnel() {
    let curl = which("curl", "apt-get install curl");
    let openssl = which("openssl", "apt-get install openssl");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(TD);
    // An X509-SVID may carry DNS SANs beside its one URI SAN.
    let api = ca
        .leaf_builder(API)
        .sans(vec![uri_san(API), dns_san("localhost")])
        .build();
    let backend = HttpBackend::start().await;
    let inbound_addr = free_addr();
    let inbound = tunnel(
        d,
        "inbound",
        inbound_toml(
            &files_identity(d, "api", &api, &[(TD, ca.bundle_pem())]),
            inbound_addr,
            backend.addr,
            None,
            &[WEB],
        ),
    )
    .await;
    let outbound_addr = free_addr();
    let web = ca.leaf(WEB);
    let _outbound = tunnel(
        d,
        "outbound",
        outbound_toml(
            &files_identity(d, "web", &web, &[(TD, ca.bundle_pem())]),
            outbound_addr,
            inbound_addr,
            None,
            &[API],
        ),
    )
    .await;
    let client_files = |name: &str, leaf: &Leaf| {
        let sub = d.join(format!("client-{name}"));
        std::fs::create_dir_all(&sub).unwrap();
        leaf.write_files(&sub)
    };
    let web_files = client_files("web", &web);
    let intruder_files = client_files("intruder", &ca.leaf(INTRUDER));
    let port = inbound_addr.port().to_string();
    let connect = inbound_addr.to_string();

    // openssl s_client, checking the inbound's SVID and its name too.
    let s_client = |files: &common::certs::SvidFiles| {
        let mut command = tokio::process::Command::new(&openssl);
        command.args(["s_client", "-connect", &connect, "-servername", "localhost"]);
        command.args([
            "-verify_hostname",
            "localhost",
            "-verify_return_error",
            "-ign_eof",
        ]);
        command
            .arg("-cert")
            .arg(&files.svid)
            .arg("-key")
            .arg(&files.key);
        command.arg("-CAfile").arg(&files.bundle);
        command
    };
    let (ok, out, err) = run(s_client(&web_files), REQUEST).await;
    assert!(
        ok && out.contains(BODY),
        "openssl s_client as web:\n{out}\n{err}"
    );
    assert_eq!(backend.accepts(), 1);

    let (_, out, err) = run(s_client(&intruder_files), REQUEST).await;
    assert!(
        !out.contains(BODY),
        "openssl s_client as intruder got through:\n{out}\n{err}"
    );
    inbound
        .wait_log(
            &format!("peer {INTRUDER} is not allowed"),
            1,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(backend.accepts(), 1, "a refused client reached the backend");

    // curl with a client SVID, checking the server's name and chain.
    let url = format!("https://localhost:{port}/");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let curl_tls = |files: &common::certs::SvidFiles| {
        let mut command = tokio::process::Command::new(&curl);
        command.args(["--silent", "--show-error", "--fail", "--max-time", "10"]);
        command.args(["--resolve", &resolve]);
        command
            .arg("--cert")
            .arg(&files.svid)
            .arg("--key")
            .arg(&files.key);
        command.arg("--cacert").arg(&files.bundle).arg(&url);
        command
    };
    let (ok, out, err) = run(curl_tls(&web_files), b"").await;
    assert!(ok && out.contains(BODY), "curl as web:\n{out}\n{err}");
    assert_eq!(backend.accepts(), 2);
    let (ok, out, err) = run(curl_tls(&intruder_files), b"").await;
    assert!(
        !ok && !out.contains(BODY),
        "curl as intruder got through:\n{out}\n{err}"
    );
    assert_eq!(backend.accepts(), 2, "a refused client reached the backend");

    // Plain curl through outbound -> inbound.
    let mut command = tokio::process::Command::new(&curl);
    command.args(["--silent", "--show-error", "--fail", "--max-time", "10"]);
    command.arg(format!("http://{outbound_addr}/"));
    let (ok, out, err) = run(command, b"").await;
    assert!(
        ok && out.contains(BODY),
        "curl through the outbound:\n{out}\n{err}"
    );
    assert_eq!(backend.accepts(), 3);
}

/// A tool the test drives, found on PATH; fails the test with an install
/// hint when missing.
fn which(tool: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{tool} not found on PATH: this test drives it. Install it (`{install}`; scripts/test does).")
        })
}

/// Runs `command` with `stdin`, within 20 s; returns (success, stdout, stderr).
async fn run(mut command: tokio::process::Command, stdin: &[u8]) -> (bool, String, String) {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("start the command");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{command:?} did not finish within 20 s"))
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// What the readers of the atomic-writes test found.
#[derive(Default)]
struct ReaderReport {
    samples: usize,
    failures: usize,
    first_failures: Vec<String>,
}

impl ReaderReport {
    fn fail(&mut self, what: String) {
        self.failures += 1;
        if self.first_failures.len() < 10 {
            self.first_failures.push(what);
        }
    }
}

fn mode(path: &Path) -> Result<u32, String> {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn expect_mode(path: &Path, want: u32) -> Result<(), String> {
    match mode(path)? {
        got if got == want => Ok(()),
        got => Err(format!("{} has mode {got:o}, not {want:o}", path.display())),
    }
}

/// Certificates in `pem`, each parsed completely; the text must end with
/// its last END line.
fn whole_certs(pem: &[u8], what: &str) -> Result<usize, String> {
    if !pem.ends_with(b"-----END CERTIFICATE-----\n") {
        return Err(format!("{what}: does not end with a whole certificate"));
    }
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: {e}"))?;
    for cert in &certs {
        match x509_parser::parse_x509_certificate(cert) {
            Ok(([], _)) => {}
            Ok(_) => return Err(format!("{what}: trailing bytes after a certificate")),
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
    Ok(certs.len())
}

/// A private key in `pem`, parsed completely and usable for signing.
fn whole_key(pem: &[u8], what: &str) -> Result<(), String> {
    if !pem.ends_with(b"-----END PRIVATE KEY-----\n") {
        return Err(format!("{what}: does not end with a whole key"));
    }
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("{what}: {e}"))?;
    provider()
        .key_provider
        .load_private_key(key)
        .map(|_| ())
        .map_err(|e| format!("{what}: {e}"))
}

/// One consistent sample of an `svid watch` folder: resolve `..data` once,
/// read the pair from that version, check that the key matches the leaf
/// (and the X509-SVID rules) and the modes. Returns the SVID's serial.
fn sample_pair(dir: &Path, provider: &rustls::crypto::CryptoProvider) -> Result<String, String> {
    let data = std::fs::canonicalize(dir.join("..data")).map_err(|e| format!("..data: {e}"))?;
    let read = |name: &str| {
        std::fs::read(data.join(name)).map_err(|e| format!("{}: {e}", data.join(name).display()))
    };
    let (chain, key, bundle) = (
        read("svid.0.pem")?,
        read("svid.0.key")?,
        read("bundle.0.pem")?,
    );
    let svid =
        Svid::from_pem(&chain, &key, provider).map_err(|e| format!("{}: {e}", data.display()))?;
    whole_certs(&bundle, "bundle.0.pem")?;
    expect_mode(&data.join("svid.0.key"), 0o600)?;
    expect_mode(&data.join("svid.0.pem"), 0o644)?;
    expect_mode(&data.join("bundle.0.pem"), 0o644)?;
    Ok(svid.serial.clone())
}

/// The combined chain-plus-key file (`--haproxy-cert`): one read holds a
/// matching pair.
fn sample_combined(file: &Path, provider: &rustls::crypto::CryptoProvider) -> Result<(), String> {
    let pem = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    Svid::from_pem(&pem, &pem, provider).map_err(|e| format!("{}: {e}", file.display()))?;
    expect_mode(file, 0o600)
}

/// One file at a time by its public name: each must be whole.
fn sample_single(dir: &Path) -> Result<(), String> {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    let chain = whole_certs(&read("svid.0.pem")?, "svid.0.pem")?;
    whole_key(&read("svid.0.key")?, "svid.0.key")?;
    let bundle = whole_certs(&read("bundle.0.pem")?, "bundle.0.pem")?;
    // The dev agent signs leaves with its root: one certificate each.
    if chain != 1 || bundle != 1 {
        return Err(format!(
            "svid.0.pem holds {chain} certificates, bundle.0.pem {bundle}"
        ));
    }
    expect_mode(&dir.join("svid.0.key"), 0o600)
}

/// Readers polling `svid watch`'s files as fast as they can through at
/// least 50 rotations never see a partial file, a key from one rotation
/// beside a certificate from another, or a wrong mode. Several agents with
/// 1 s SVIDs (the shortest the dev agent issues) rotate side by side to get
/// 50 rotations in about 15 s; each reader goes round all of their folders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_watch_writes_are_atomic_across_50_rotations() {
    const AGENTS: usize = 3;
    const ROTATIONS: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut agents = Vec::new();
    let mut watches = Vec::new();
    for k in 0..AGENTS {
        let id = format!("spiffe://{TD}/w{k}");
        let agent = dev_agent(d, &format!("agent{k}"), &["--id", &id, "--ttl", "1s"]).await;
        watches.push(Watch::start(d, &format!("w{k}"), &agent, &id, None).await);
        agents.push(agent);
    }
    let dirs: Vec<PathBuf> = watches.iter().map(|w| w.dir.clone()).collect();
    let combined: Vec<PathBuf> = watches.iter().map(|w| w.cert.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let rotations = Arc::new(AtomicUsize::new(0));

    // Reader 1: consistent pairs through ..data, and the combined file.
    let pair_reader = {
        let (dirs, stop, rotations) = (dirs.clone(), Arc::clone(&stop), Arc::clone(&rotations));
        std::thread::spawn(move || {
            let provider = provider();
            let mut report = ReaderReport::default();
            let mut serials: Vec<BTreeSet<String>> = vec![BTreeSet::new(); dirs.len()];
            while !stop.load(Ordering::Relaxed) {
                for (k, dir) in dirs.iter().enumerate() {
                    report.samples += 1;
                    match sample_pair(dir, &provider) {
                        Ok(serial) => {
                            if serials[k].insert(serial) && serials[k].len() > 1 {
                                rotations.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => report.fail(e),
                    }
                    report.samples += 1;
                    if let Err(e) = sample_combined(&combined[k], &provider) {
                        report.fail(e);
                    }
                }
            }
            report
        })
    };
    // Reader 2: each public name on its own.
    let single_reader = {
        let (dirs, stop) = (dirs.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut report = ReaderReport::default();
            while !stop.load(Ordering::Relaxed) {
                for dir in &dirs {
                    report.samples += 1;
                    if let Err(e) = sample_single(dir) {
                        report.fail(e);
                    }
                }
            }
            report
        })
    };

    let start = Instant::now();
    let deadline = Duration::from_secs(45);
    while rotations.load(Ordering::Relaxed) < ROTATIONS && start.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let pair = pair_reader.join().unwrap();
    let single = single_reader.join().unwrap();
    let seen = rotations.load(Ordering::Relaxed);
    let writes: usize = watches
        .iter()
        .map(|w| w.daemon.log().matches("SVIDs written").count())
        .sum();
    eprintln!(
        "atomic writes: {seen} rotations seen ({writes} writes by {AGENTS} watches) in {:.1?}; \
         {} pair samples, {} single-file samples",
        start.elapsed(),
        pair.samples,
        single.samples
    );
    assert!(
        seen >= ROTATIONS,
        "only {seen} rotations within {deadline:?} ({writes} writes)"
    );
    assert_eq!(
        pair.failures, 0,
        "{} of {} consistent-pair samples failed, first: {:#?}",
        pair.failures, pair.samples, pair.first_failures
    );
    assert_eq!(
        single.failures, 0,
        "{} of {} single-file samples failed, first: {:#?}",
        single.failures, single.samples, single.first_failures
    );
    // Enough samples that every version was read many times over.
    assert!(pair.samples > 10 * writes && single.samples > 10 * writes);
    for watch in &watches {
        let log = watch.daemon.log();
        assert!(!log.contains("ERROR") && !log.contains("WARN"), "{log}");
    }
    drop(agents);
}
