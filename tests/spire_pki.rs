//! spiffe-tunnel against real SPIRE with other PKI shapes: an upstream CA
//! made with openssl (SPIRE's `disk` UpstreamAuthority), one with a URI
//! name constraint, and the key types SPIRE offers for workload SVIDs and
//! for its CA.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::spire::{AgentConfig, ServerConfig, Spire, UpstreamDisk};
use common::workload_tunnel::{TunnelEnd, TunnelPair, API, API_UID, ISSUE, WEB};

/// A self-signed P-256 root made with openssl in `dir`, with `extra`
/// `-addext` values. Returns (cert, key) paths.
fn openssl_root(
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    let mut command = Command::new("openssl");
    command.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/O=spiffe-tunnel tests/CN={name}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
    ]);
    command.arg(&key).arg("-out").arg(&cert);
    for e in extra {
        command.args(["-addext", e]);
    }
    let out = command.output().expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

fn pem_count(pem: &str) -> usize {
    pem.matches("BEGIN CERTIFICATE").count()
}

/// SPIRE's CA as an intermediate under an openssl root: workloads get
/// leaf + intermediate, the bundle holds the root alone, and a tunnel pair
/// verifies each other both ways through that chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_ca_from_disk_chains_leaf_and_intermediate_to_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let (root, key) = openssl_root(dir.path(), "upstream-root", &[]);
    let config = ServerConfig {
        upstream: Some(UpstreamDisk {
            cert: root.clone(),
            key,
            bundle: None,
        }),
        ..ServerConfig::default()
    };
    let spire = Spire::start(config, AgentConfig::default()).await;
    let bundle = spire.server.bundle_pem().await;
    let root_pem = std::fs::read_to_string(&root).unwrap();
    assert_eq!(pem_count(&bundle), 1, "{bundle}");
    assert_eq!(
        bundle.trim(),
        root_pem.trim(),
        "the bundle is the upstream root"
    );

    let pair = TunnelPair::start(&spire, None).await;
    // What the agent hands out: a chain of two below the root.
    let out = tempfile::tempdir().unwrap();
    let (chain, fetched_bundle) = fetch_chain_as(&spire, API_UID, out.path()).await;
    assert_eq!(
        pem_count(&chain),
        2,
        "leaf + SPIRE's intermediate:\n{chain}"
    );
    assert_eq!(
        fetched_bundle.trim(),
        root_pem.trim(),
        "bundle.0.pem is the root"
    );

    pair.roundtrip("through an upstream-rooted chain")
        .await
        .expect("round trip");
    // The other way round: an outbound as api to an inbound as web.
    let web_in = TunnelEnd::inbound(
        &spire.agent.address(),
        common::workload_tunnel::WEB_UID,
        pair.target.addr,
        &[API],
        "",
    )
    .await;
    let api_out =
        TunnelEnd::outbound(&spire.agent.address(), API_UID, web_in.listen, &[WEB], "").await;
    let got = common::harness::roundtrip(api_out.listen, b"reverse")
        .await
        .unwrap();
    assert_eq!(got, b"reverse");
}

/// `spire-agent api fetch x509 -write DIR` as `uid`: (svid.0.pem, bundle.0.pem).
async fn fetch_chain_as(spire: &Spire, uid: u32, dir: &Path) -> (String, String) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut command =
        common::spire::tokio_command_as(common::spire::bin_dir().join("spire-agent"), uid);
    command
        .args(["api", "fetch", "x509", "-socketPath"])
        .arg(&spire.agent.socket)
        .arg("-write")
        .arg(dir);
    let out = command.output().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        std::fs::read_to_string(dir.join("svid.0.pem")).unwrap(),
        std::fs::read_to_string(dir.join("bundle.0.pem")).unwrap(),
    )
}

/// A root with a URI name constraint for the trust domain, as the SPIFFE
/// X509-SVID spec suggests. SPIRE (Go's crypto/x509) issues under it;
/// rustls-webpki does not process URI name constraints and would refuse
/// every SVID under it, so spiffe-tunnel refuses the Workload API response
/// when it arrives, with a message naming that reason, and never starts
/// serving with an identity its peers' verifiers would refuse too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_root_with_a_uri_name_constraint_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (root, key) = openssl_root(
        dir.path(),
        "constrained-root",
        &["nameConstraints=critical,permitted;URI:example.org"],
    );
    let config = ServerConfig {
        upstream: Some(UpstreamDisk {
            cert: root,
            key,
            bundle: None,
        }),
        ..ServerConfig::default()
    };
    let spire = Spire::start(config, AgentConfig::default()).await;
    spire.create_entry(&spire.entry(API).uid(API_UID)).await;
    // SPIRE itself issues.
    spire.agent.wait_for_ids(API_UID, &[API], ISSUE).await;

    let target = common::harness::Target::start(common::harness::TargetMode::Echo).await;
    let mut end = TunnelEnd::spawn(
        &spire.agent.address(),
        API_UID,
        Duration::from_secs(5),
        |listen| {
            format!(
            "[[inbound]]\nname = \"api\"\nlisten = \"{listen}\"\ntarget = \"{}\"\nallow = [\"{WEB}\"]\n",
            target.addr
        )
        },
    );
    assert_eq!(end.daemon.wait_exit(Duration::from_secs(20)).await, Some(1));
    let log = end.daemon.log();
    let refusal = log
        .lines()
        .find(|l| l.contains("Workload API response refused"))
        .unwrap_or_else(|| panic!("no refusal in:\n{log}"));
    eprintln!("{refusal}");
    assert!(
        log.contains("URI name constraint (permitted URI:example.org)"),
        "{log}"
    );
    assert!(
        log.contains("rustls-webpki does not process URI name constraints"),
        "{log}"
    );
}

/// The key types SPIRE offers, all at once (three servers): RSA-2048
/// workload keys, and an RSA-4096 and an EC P-384 CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_types_rsa_workload_keys_and_rsa_4096_and_p384_cas() {
    let rsa_workloads = async {
        let agent = AgentConfig {
            workload_key_type: Some("rsa-2048".into()),
            ..AgentConfig::default()
        };
        run_pair("workload rsa-2048", ServerConfig::default(), agent).await
    };
    let rsa_ca = async {
        let server = ServerConfig {
            ca_key_type: Some("rsa-4096".into()),
            ..ServerConfig::default()
        };
        run_pair("CA rsa-4096", server, AgentConfig::default()).await
    };
    let p384_ca = async {
        let server = ServerConfig {
            ca_key_type: Some("ec-p384".into()),
            ..ServerConfig::default()
        };
        run_pair("CA ec-p384", server, AgentConfig::default()).await
    };
    let (a, b, c) = tokio::join!(rsa_workloads, rsa_ca, p384_ca);
    assert_eq!(
        a.0, "RSA 2048",
        "workload key with workload_x509_svid_key_type = rsa-2048"
    );
    assert_eq!(b.1, "RSA 4096", "CA key with ca_key_type = rsa-4096");
    assert_eq!(c.1, "EC 384", "CA key with ca_key_type = ec-p384");
}

/// A tunnel pair on its own SPIRE; returns the keys of the workload SVID
/// and of the CA, as `key_of` names them.
async fn run_pair(what: &str, server: ServerConfig, agent: AgentConfig) -> (String, String) {
    let spire = Spire::start(server, agent).await;
    let pair = TunnelPair::start(&spire, None).await;
    pair.roundtrip(what)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let dir = tempfile::tempdir().unwrap();
    let (chain, bundle) = fetch_chain_as(&spire, API_UID, dir.path()).await;
    (key_of(&chain), key_of(&bundle))
}

/// "RSA 2048", "EC P-384", ... of the first certificate in `pem`.
fn key_of(pem: &str) -> String {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    match cert.public_key().parsed().unwrap() {
        x509_parser::public_key::PublicKey::RSA(rsa) => format!("RSA {}", rsa.key_size()),
        x509_parser::public_key::PublicKey::EC(ec) => format!("EC {}", ec.key_size()),
        _ => "other".into(),
    }
}
