//! End-to-end tests of the core tunnel over real sockets and real processes:
//! an app talks plain TCP to an outbound tunnel process, which speaks mTLS to
//! an inbound tunnel process, which forwards to a target that counts its
//! accepts. Nothing here sleeps and hopes: every wait has a deadline.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::certs::{Ca, Leaf};
use common::harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";

/// Writes an identity for `leaf` into `dir` and returns the
/// `[identity]` table that uses it.
fn identity_toml(dir: &Path, leaf: &Leaf) -> String {
    std::fs::create_dir_all(dir).unwrap();
    leaf.write_files(dir);
    "[identity]\nsource = \"files\"\ncert = \"svid.pem\"\nkey = \"svid.key\"\n[identity.bundles]\n\"example.org\" = \"bundle.pem\"\n".to_string()
}

fn toml_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{i:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Two tunnel processes, like two nodes: outbound (as `web`) → inbound (as
/// `api`) → target.
struct Pair {
    dir: tempfile::TempDir,
    ca: Ca,
    target: Target,
    inbound_addr: SocketAddr,
    outbound_addr: SocketAddr,
    inbound: Daemon,
    outbound: Daemon,
}

struct PairOptions<'a> {
    inbound_allow: &'a [&'a str],
    outbound_allow: &'a [&'a str],
    server_id: &'a str,
    mode: TargetMode,
    inbound_extra: &'a str,
}

impl Default for PairOptions<'_> {
    fn default() -> Self {
        Self {
            inbound_allow: &[WEB],
            outbound_allow: &[API],
            server_id: API,
            mode: TargetMode::Echo,
            inbound_extra: "",
        }
    }
}

impl Pair {
    async fn start(options: PairOptions<'_>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("example.org");
        let target = Target::start(options.mode).await;
        let inbound_addr = free_addr();
        let outbound_addr = free_addr();

        let in_dir = dir.path().join("in");
        let mut config = identity_toml(&in_dir, &ca.leaf(options.server_id));
        config += &format!(
            "[[inbound]]\nname = \"api\"\nlisten = \"{inbound_addr}\"\ntarget = \"{}\"\nallow = {}\n{}\n",
            target.addr,
            toml_list(options.inbound_allow),
            options.inbound_extra
        );
        std::fs::write(in_dir.join("tunnel.toml"), config).unwrap();

        let out_dir = dir.path().join("out");
        let mut config = identity_toml(&out_dir, &ca.leaf(WEB));
        config += &format!(
            "[[outbound]]\nname = \"api\"\nlisten = \"{outbound_addr}\"\nupstreams = [\"{inbound_addr}\"]\nallow = {}\n",
            toml_list(options.outbound_allow)
        );
        std::fs::write(out_dir.join("tunnel.toml"), config).unwrap();

        let inbound = Daemon::run(&in_dir.join("tunnel.toml"));
        let outbound = Daemon::run(&out_dir.join("tunnel.toml"));
        inbound.wait_running().await;
        outbound.wait_running().await;
        Self {
            dir,
            ca,
            target,
            inbound_addr,
            outbound_addr,
            inbound,
            outbound,
        }
    }

    fn in_dir(&self) -> PathBuf {
        self.dir.path().join("in")
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_mib_each_way_arrive_intact() {
    let pair = Pair::start(PairOptions::default()).await;
    let data = pattern(32 << 20, 7);
    let stream = TcpStream::connect(pair.outbound_addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sent = data.clone();
    let writing = tokio::spawn(async move {
        writer.write_all(&sent).await.unwrap();
        writer.shutdown().await.unwrap();
    });
    let mut echoed = Vec::with_capacity(data.len());
    tokio::time::timeout(Duration::from_secs(120), reader.read_to_end(&mut echoed))
        .await
        .expect("echo finished in time")
        .unwrap();
    writing.await.unwrap();
    assert_eq!(echoed.len(), data.len(), "byte count");
    assert!(echoed == data, "echoed bytes differ from the bytes sent");
    assert_eq!(pair.target.accepts(), 1);
    pair.outbound
        .wait_log("connection closed", 1, Duration::from_secs(10))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_works_in_both_directions() {
    let pair = Pair::start(PairOptions {
        mode: TargetMode::CountThenReply,
        ..Default::default()
    })
    .await;
    // Client → target direction closes first; the target still answers
    // after seeing EOF, and its own close reaches the client.
    let answer = roundtrip(pair.outbound_addr, &pattern(100_000, 1))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&answer), "got 100000 bytes");

    // Target → client closes first: the target greets, and keeps echoing
    // after the client has read the greeting.
    let pair = Pair::start(PairOptions {
        mode: TargetMode::Greet,
        ..Default::default()
    })
    .await;
    let mut stream = TcpStream::connect(pair.outbound_addr).await.unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"hello from target\n");
    stream.write_all(b"ping").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_clients_never_reach_the_target() {
    let pair = Pair::start(PairOptions::default()).await;
    let good = pair.ca.leaf(WEB);

    // Sanity: the allowed identity gets through with the raw client too.
    let ok = raw_tls_roundtrip(
        pair.inbound_addr,
        raw_client_config(Some((&good.chain_pem, &good.key_pem))),
        b"hi",
    )
    .await
    .expect("the allowed peer gets through");
    assert_eq!(ok, b"hi");
    assert_eq!(pair.target.accepts(), 1);

    let other_ca = Ca::new("example.org");
    let intruder = pair.ca.leaf("spiffe://example.org/intruder");
    let foreign = Ca::new("evil.org").leaf("spiffe://evil.org/web");
    let forged = other_ca.leaf(WEB);
    let expired = pair
        .ca
        .leaf_builder(WEB)
        .validity(
            std::time::SystemTime::now() - Duration::from_secs(7200),
            std::time::SystemTime::now() - Duration::from_secs(3600),
        )
        .build();
    let cases: Vec<(&str, Option<(&str, &str)>)> = vec![
        (
            "an ID the policy does not allow",
            Some((&intruder.chain_pem, &intruder.key_pem)),
        ),
        (
            "a trust domain with no bundle",
            Some((&foreign.chain_pem, &foreign.key_pem)),
        ),
        (
            "the right ID from an untrusted CA",
            Some((&forged.chain_pem, &forged.key_pem)),
        ),
        (
            "an expired SVID",
            Some((&expired.chain_pem, &expired.key_pem)),
        ),
        ("no client certificate", None),
    ];
    for (what, cert) in cases {
        let result = raw_tls_roundtrip(pair.inbound_addr, raw_client_config(cert), b"secret").await;
        assert!(result.is_err(), "{what}: got through: {result:?}");
    }
    // Plain bytes that are not TLS at all.
    let mut plain = TcpStream::connect(pair.inbound_addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut sink)).await;

    pair.inbound
        .wait_log("connection refused", 6, Duration::from_secs(10))
        .await;
    assert_eq!(
        pair.target.accepts(),
        1,
        "a refused peer caused a connection to the target"
    );
    let log = pair.inbound.log();
    assert!(
        log.contains("spiffe://example.org/intruder is not allowed by the policy"),
        "{log}"
    );
    assert!(
        log.contains("no trust bundle for trust domain \"evil.org\""),
        "{log}"
    );
    assert!(log.contains("result=denied"), "{log}");
    assert!(log.contains("result=handshake_error"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_refuses_a_server_whose_id_is_not_allowed() {
    let pair = Pair::start(PairOptions {
        server_id: "spiffe://example.org/impostor",
        ..Default::default()
    })
    .await;
    let result = roundtrip(pair.outbound_addr, b"secret").await;
    assert!(
        matches!(&result, Ok(answer) if answer.is_empty()) || result.is_err(),
        "the client got an answer from a server that is not allowed: {result:?}"
    );
    pair.outbound
        .wait_log(
            "spiffe://example.org/impostor is not allowed",
            1,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(pair.target.accepts(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_reload_changes_who_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("api.policy");
    std::fs::write(&policy, format!("# who may call the api\n{WEB}\n")).unwrap();
    let pair = Pair::start(PairOptions {
        inbound_allow: &[],
        inbound_extra: &format!("policy = {:?}", policy.display().to_string()),
        ..Default::default()
    })
    .await;
    assert_eq!(roundtrip(pair.outbound_addr, b"one").await.unwrap(), b"one");

    // A broken policy is refused, and the old one stays in force.
    std::fs::write(&policy, format!("{WEB}\nspiffe://Example.org/bad\n")).unwrap();
    pair.inbound.signal("HUP");
    pair.inbound
        .wait_log("reload refused", 1, Duration::from_secs(10))
        .await;
    assert!(
        pair.inbound.log().contains("api.policy:2"),
        "{}",
        pair.inbound.log()
    );
    assert_eq!(roundtrip(pair.outbound_addr, b"two").await.unwrap(), b"two");

    // The new policy applies to the very next connection, resumed or not
    // (tests/resumption.rs shows a resumed one being refused).
    // Now web is denied and nothing more reaches the target.
    std::fs::write(
        &policy,
        "deny spiffe://example.org/web\nspiffe://example.org/**\n",
    )
    .unwrap();
    pair.inbound.signal("HUP");
    pair.inbound
        .wait_log("reloaded: ", 1, Duration::from_secs(10))
        .await;
    let accepts_before = pair.target.accepts();
    let result = roundtrip(pair.outbound_addr, b"three").await;
    assert!(
        matches!(&result, Ok(a) if a.is_empty()) || result.is_err(),
        "{result:?}"
    );
    pair.inbound
        .wait_log(
            "denied by rule \"deny spiffe://example.org/web\"",
            1,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(pair.target.accepts(), accepts_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_identity_files_are_picked_up_and_garbage_is_refused() {
    let pair = Pair::start(PairOptions::default()).await;
    assert_eq!(roundtrip(pair.outbound_addr, b"a").await.unwrap(), b"a");

    // Garbage in the cert file: refused, the current identity stays.
    std::fs::write(pair.in_dir().join("svid.pem"), "not a certificate").unwrap();
    pair.inbound
        .wait_log(
            "identity files changed but are not valid",
            1,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(roundtrip(pair.outbound_addr, b"b").await.unwrap(), b"b");

    // A new valid SVID is picked up without a restart.
    let new_leaf = pair.ca.leaf(API);
    std::fs::write(pair.in_dir().join("svid.key"), &new_leaf.key_pem).unwrap();
    std::fs::write(pair.in_dir().join("svid.pem"), &new_leaf.chain_pem).unwrap();
    pair.inbound
        .wait_log("identity files reloaded", 1, Duration::from_secs(10))
        .await;
    assert_eq!(roundtrip(pair.outbound_addr, b"c").await.unwrap(), b"c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_and_connection_limit_apply() {
    let pair = Pair::start(PairOptions {
        inbound_extra: "handshake_timeout = \"1s\"\nmax_connections = 2",
        ..Default::default()
    })
    .await;
    // A silent client is cut off by the handshake timeout.
    let mut silent = TcpStream::connect(pair.inbound_addr).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    pair.inbound
        .wait_log("handshake timed out", 1, Duration::from_secs(5))
        .await;

    // Two live connections fill the limit; the third is closed at once.
    let mut live = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(pair.outbound_addr).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).await.unwrap();
        live.push(s);
    }
    let third = roundtrip(pair.outbound_addr, b"y").await;
    assert!(
        matches!(&third, Ok(a) if a.is_empty()) || third.is_err(),
        "{third:?}"
    );
    pair.inbound
        .wait_log("max_connections (2) reached", 1, Duration::from_secs(5))
        .await;

    // Closing one frees a slot.
    drop(live.pop());
    let mut ok = false;
    for _ in 0..50 {
        if roundtrip(pair.outbound_addr, b"z")
            .await
            .is_ok_and(|a| a == b"z")
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the limit never freed up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let mut pair = Pair::start(PairOptions::default()).await;
    let mut live = TcpStream::connect(pair.outbound_addr).await.unwrap();
    live.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    live.read_exact(&mut buf).await.unwrap();

    pair.inbound.signal("TERM");
    pair.inbound
        .wait_log("draining", 1, Duration::from_secs(5))
        .await;
    // The live connection still works during the drain...
    live.write_all(b"during").await.unwrap();
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    // ...new ones are not accepted...
    wait_until(
        "the inbound listener to close",
        Duration::from_secs(5),
        || std::net::TcpStream::connect(pair.inbound_addr).is_err(),
    )
    .await;
    // ...and once it finishes the process exits 0.
    live.shutdown().await.unwrap();
    let mut rest = Vec::new();
    live.read_to_end(&mut rest).await.unwrap();
    assert_eq!(
        pair.inbound.wait_exit(Duration::from_secs(10)).await,
        Some(0)
    );
}

fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_a_valid_config_and_refuses_a_malformed_policy_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let mut config = identity_toml(dir.path(), &ca.leaf(API));
    config += "[[inbound]]\nname = \"api\"\nlisten = \"127.0.0.1:18443\"\ntarget = \"127.0.0.1:3000\"\npolicy = \"api.policy\"\n";
    let config_path = dir.path().join("tunnel.toml");
    std::fs::write(&config_path, &config).unwrap();
    let policy = dir.path().join("api.policy");

    std::fs::write(
        &policy,
        "spiffe://example.org/web\nspiffe://example.org/ns/*/sa/**\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run_cli(&["check", "-c", config_path.to_str().unwrap()]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    assert!(stdout.contains("SVID spiffe://example.org/api"), "{stdout}");
    assert!(stdout.contains("2 rule(s)"), "{stdout}");
    assert!(
        stdout.contains("TLS 1.3 only, session resumption on"),
        "{stdout}"
    );

    std::fs::write(
        &policy,
        "# ok\nspiffe://example.org/web\nspiffe://example.org/web-*\n",
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["check", "-c", config_path.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("api.policy:3"), "{stderr}");

    // Config errors name the file, the line and the key.
    std::fs::write(
        &config_path,
        config.replace("listen = \"127.0.0.1:18443\"", "listen = \"nowhere\""),
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["check", "-c", config_path.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("tunnel.toml:9: inbound[0].listen"),
        "{stderr}"
    );

    std::fs::write(&config_path, format!("{config}colour = \"blue\"\n")).unwrap();
    let (code, _, stderr) = run_cli(&["check", "-c", config_path.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("tunnel.toml:12") && stderr.contains("colour"),
        "{stderr}"
    );
}

#[test]
fn verify_command_prints_the_id_or_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let files = ca.leaf(WEB).write_files(dir.path());
    let bundle = format!("example.org={}", files.bundle.display());
    let (code, stdout, stderr) =
        run_cli(&["verify", "--bundle", &bundle, files.svid.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.trim(), WEB);

    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue = Ca::new("example.org")
        .leaf(WEB)
        .write_files(rogue_dir.path());
    let (code, stdout, _) = run_cli(&["verify", "--bundle", &bundle, rogue.svid.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(stdout.starts_with("invalid:"), "{stdout}");

    let (code, _, stderr) = run_cli(&[
        "verify",
        "--bundle",
        "no-equals-sign",
        rogue.svid.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
}
