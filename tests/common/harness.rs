#![allow(dead_code)]
//! Real processes and real sockets for integration tests: the daemon as a
//! child process, plain targets that count their accepts, a raw mTLS client
//! for peers the tunnel must refuse, and waiting on conditions with a
//! deadline instead of sleeping.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The spiffe-tunnel binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_spiffe-tunnel")
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut condition: F) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running `spiffe-tunnel` process; killed when dropped.
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `spiffe-tunnel run -c config`, logging to `config`'s folder.
    pub fn run(config: &Path) -> Self {
        Self::spawn(
            &["run", "-c", config.to_str().unwrap()],
            config.parent().unwrap(),
            &[],
        )
    }

    pub fn spawn(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::spawn_as(args, dir, env, None)
    }

    /// `spiffe-tunnel run -c config` under another uid (and gid), so a
    /// Workload API server attests it as another workload. `config` and
    /// its folder must be readable by that uid.
    pub fn run_as(config: &Path, uid: u32) -> Self {
        Self::spawn_as(
            &["run", "-c", config.to_str().unwrap()],
            config.parent().unwrap(),
            &[],
            Some(uid),
        )
    }

    pub fn spawn_as(args: &[&str], dir: &Path, env: &[(&str, &str)], uid: Option<u32>) -> Self {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(binary());
        if let Some(uid) = uid {
            command.uid(uid).gid(uid);
        }
        command.args(args).envs(env.iter().copied());
        Self::spawn_command(command, dir)
    }

    /// [`Daemon::spawn`] of the binary at `exe` (a copy a test may swap).
    pub fn spawn_exe(exe: &Path, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(exe);
        command.args(args).envs(env.iter().copied());
        Self::spawn_command(command, dir)
    }

    /// Starts `command` (a daemon, or a launcher that becomes one) with the
    /// test's log settings, logging to a new file in `dir`.
    pub fn spawn_command(mut command: Command, dir: &Path) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let log = dir.join(format!("daemon-{}.log", N.fetch_add(1, Ordering::Relaxed)));
        let file = std::fs::File::create(&log).expect("create log file");
        if !command.get_envs().any(|(k, _)| k == "RUST_LOG") {
            command.env("RUST_LOG", "spiffe_tunnel=debug,info");
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start spiffe-tunnel");
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times.
    pub async fn wait_log(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= count {
                return;
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for {count}x {needle:?} in the daemon log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the daemon says every tunnel listens. (Probing the
    /// ports instead would push a connection through the tunnel.)
    pub async fn wait_running(&self) {
        self.wait_log("spiffe-tunnel is running", 1, Duration::from_secs(20))
            .await;
    }

    /// Sends a signal by name (HUP, TERM, INT) with the `kill` command.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for child") {
                return status.code();
            }
            if Instant::now() >= deadline {
                panic!(
                    "daemon did not exit within {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- daemon log {} ----\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

/// What a test target does with each connection.
#[derive(Debug, Clone, Copy)]
pub enum TargetMode {
    /// Echo every byte back; close after the peer half-closes.
    Echo,
    /// Read to EOF, then answer "got N bytes" and close (half-close test).
    CountThenReply,
    /// Write a greeting first, then echo.
    Greet,
}

/// A plain TCP server on loopback that counts the connections it accepts.
pub struct Target {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
}

impl Target {
    pub async fn start(mode: TargetMode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepts);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    match mode {
                        TargetMode::Echo => {
                            let (mut r, mut w) = stream.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = w.shutdown().await;
                        }
                        TargetMode::Greet => {
                            let _ = stream.write_all(b"hello from target\n").await;
                            let (mut r, mut w) = stream.split();
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                            let _ = w.shutdown().await;
                        }
                        TargetMode::CountThenReply => {
                            let mut total = 0usize;
                            let mut buf = vec![0u8; 64 * 1024];
                            loop {
                                match stream.read(&mut buf).await {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => total += n,
                                }
                            }
                            let _ = stream
                                .write_all(format!("got {total} bytes").as_bytes())
                                .await;
                            let _ = stream.shutdown().await;
                        }
                    }
                });
            }
        });
        Self { addr, accepts }
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

/// Sends `msg` through a tunnel endpoint and returns what comes back before
/// the far side closes (with an echo target: `msg` itself).
pub async fn roundtrip(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(msg).await?;
    stream.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    Ok(out)
}

/// Accepts any server certificate: for test clients whose point is what
/// the *server* (our inbound) does with *their* certificate.
#[derive(Debug)]
pub struct AcceptAnyServer(pub rustls::crypto::WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A raw TLS client config presenting `chain_pem`/`key_pem` (or nothing).
pub fn raw_client_config(cert: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer(algorithms)));
    let config = match cert {
        Some((chain_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// Opens mTLS to `addr` with `config`, sends `msg`, half-closes and reads
/// the answer. Any failure (handshake refused, connection closed without an
/// answer) comes back as an error.
pub async fn raw_tls_roundtrip(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    msg: &[u8],
) -> std::io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from("spiffe-tunnel.test").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(msg).await?;
    tls.flush().await?;
    tls.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    if out.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "closed without an answer",
        ));
    }
    Ok(out)
}

/// A TLS client stopped half-way through its handshake: the server has
/// accepted the connection, sent its whole flight and waits for ours (our
/// certificate and Finished), so its verification and authorization of
/// us have not run yet. [`PausedHandshake::finish`] sends the rest.
pub struct PausedHandshake {
    tcp: std::net::TcpStream,
    conn: rustls::ClientConnection,
}

impl PausedHandshake {
    /// Connects, sends the ClientHello and reads the server's flight.
    pub fn start(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<Self> {
        use std::io::{Error, ErrorKind};
        let mut tcp = std::net::TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let name = ServerName::try_from("spiffe-tunnel.test").unwrap();
        let mut conn = rustls::ClientConnection::new(config, name).map_err(Error::other)?;
        while conn.wants_write() {
            conn.write_tls(&mut tcp)?;
        }
        // The client's second flight is queued once the server's Finished
        // is processed: stop there, before writing it.
        while !conn.wants_write() {
            if conn.read_tls(&mut tcp)? == 0 {
                return Err(Error::new(ErrorKind::UnexpectedEof, "server closed"));
            }
            conn.process_new_packets().map_err(Error::other)?;
        }
        Ok(Self { tcp, conn })
    }

    /// Sends our flight and `msg`, and returns what comes back before the
    /// server closes (an echo target answers `msg`); a refusal is an error.
    pub fn finish(mut self, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        use std::io::{Error, ErrorKind, Read, Write};
        self.conn.writer().write_all(msg)?;
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.tcp)?;
        }
        let mut got = Vec::new();
        while got.len() < msg.len() {
            if self.conn.read_tls(&mut self.tcp)? == 0 {
                break;
            }
            let state = self.conn.process_new_packets().map_err(Error::other)?;
            if state.plaintext_bytes_to_read() > 0 {
                let mut buf = vec![0u8; state.plaintext_bytes_to_read()];
                self.conn.reader().read_exact(&mut buf)?;
                got.extend_from_slice(&buf);
            }
            if state.peer_has_closed() {
                break;
            }
        }
        if got.is_empty() {
            return Err(Error::new(
                ErrorKind::ConnectionAborted,
                "closed without an answer",
            ));
        }
        Ok(got)
    }
}
