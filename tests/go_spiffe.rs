//! go-spiffe v2.9.0, the SPIFFE reference library, as a peer
//! (`tests/peers`, built by scripts/test):
//!
//! * the verifiers side by side: every chain of `tests/verifier.rs`
//!   (`common/svid_cases.rs`) through go-spiffe's `x509svid.Verify` and
//!   `spiffe-tunnel verify`, with the table of known disagreements and the
//!   X509-SVID rule that decides each;
//! * spiffe-tunnel's outbound against a go-spiffe `spiffetls` server, and a
//!   go-spiffe client against spiffe-tunnel's inbound, both fed by the same
//!   Workload API, with each side's authorizer refusing a peer in turn:
//!   against the dev agent and against real SPIRE (`dev_agent::*`,
//!   `spire::*`), the same bodies.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::api_under_test::{ApiUnderTest, Kind, Registration, Setup};
use common::harness::*;
use common::peers::{go_client, gospiffe_peer, wait_line, GoAuthorizer, GoServer};
use common::svid_cases::{self, Spec, SvidCase};

// ---------------------------------------------------------------------------
// The verifiers side by side

/// Which verifier accepts a chain the other refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnlyAccepts {
    GoSpiffe,
    SpiffeTunnel,
}

/// Every case where the two verifiers disagree, with the rule that decides
/// it. A disagreement missing here fails the test, and so does an entry
/// here that no longer disagrees.
const KNOWN_DISAGREEMENTS: &[(&str, OnlyAccepts, &str)] = &[
    (
        "leaf-with-a-root-id",
        OnlyAccepts::GoSpiffe,
        "X509-SVID 5.2 and 3.1: the validator MUST ensure the SPIFFE ID has a non-root path; \
         go-spiffe's x509svid.Verify takes spiffe://example.org as the leaf's ID",
    ),
    (
        "leaf-without-digital-signature",
        OnlyAccepts::GoSpiffe,
        "X509-SVID 4.3: leaf SVIDs MUST set digitalSignature (a rule on the issuer that section 5 \
         does not ask validators to check; spiffe-tunnel checks it, go-spiffe does not)",
    ),
    (
        "leaf-without-key-usage",
        OnlyAccepts::GoSpiffe,
        "X509-SVID 4.3: the key usage extension MUST be set on all SVIDs (an issuer rule; \
         spiffe-tunnel checks it, go-spiffe does not)",
    ),
    (
        "code-signing-only-leaf",
        OnlyAccepts::GoSpiffe,
        "X509-SVID 4.4: when the EKU extension is present, serverAuth and clientAuth MUST be set; \
         spiffe-tunnel wants at least one of them for `verify` (the one of its role in a \
         handshake), go-spiffe verifies with ExtKeyUsageAny",
    ),
    (
        "rsa-1024-leaf",
        OnlyAccepts::GoSpiffe,
        "the spec is silent on key sizes; spiffe-tunnel refuses RSA under 2048 bits \
         (DESIGN.md: no weak keys), Go accepts 1024",
    ),
    (
        "leaf-on-curve/secp224r1",
        OnlyAccepts::GoSpiffe,
        "the spec is silent on curves; spiffe-tunnel takes P-256, P-384 and P-521 only \
         (what rustls can use), Go parses P-224",
    ),
    (
        "root-path-length-exceeded",
        OnlyAccepts::SpiffeTunnel,
        "RFC 5280 6.1.1(d), which X509-SVID 5.1 makes the rule: path validation takes a trust \
         anchor's name and key, not the constraints in its certificate (RFC 5937 makes them \
         optional); Go applies the root's pathLenConstraint, webpki does not",
    ),
];

/// What one verifier said of a chain.
#[derive(Debug)]
struct Verdict {
    accepted: bool,
    /// The SPIFFE ID, or the reason it was refused.
    said: String,
}

/// Runs a `verify` command: exit 0 with the ID on stdout, or exit 1 with
/// "invalid: REASON". Anything else means the exported case is broken.
fn run_verify(program: &Path, prefix: &[&str], bundles: &[String], chain: &Path) -> Verdict {
    let mut command = Command::new(program);
    command.args(prefix);
    for bundle in bundles {
        command.args(["--bundle", bundle]);
    }
    let out = command.arg(chain).output().expect("run a verify command");
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match out.status.code() {
        Some(0) => Verdict {
            accepted: true,
            said,
        },
        Some(1) => Verdict {
            accepted: false,
            said: said.strip_prefix("invalid: ").unwrap_or(&said).to_string(),
        },
        _ => panic!(
            "{} {prefix:?} on {}: {out:?}",
            program.display(),
            chain.display()
        ),
    }
}

#[test]
fn the_verifiers_agree_or_the_spec_decides() {
    let go = gospiffe_peer();
    let tunnel = Path::new(binary());
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<SvidCase> = svid_cases::all();

    // Each case's pair of commands runs at once, eight cases at a time.
    let verdicts: Vec<(Verdict, Verdict)> = cases
        .chunks(8)
        .flat_map(|chunk| {
            std::thread::scope(|scope| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|case| {
                        let folder = dir.path().join(case.name.replace('/', "--"));
                        let (chain, bundles) = case.write_pem(&folder);
                        let go = &go;
                        scope.spawn(move || {
                            (
                                run_verify(tunnel, &["verify"], &bundles, &chain),
                                run_verify(go, &["verify"], &bundles, &chain),
                            )
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a verify thread"))
                    .collect::<Vec<_>>()
            })
        })
        .collect();

    let mut table = String::new();
    let mut failures = Vec::new();
    let mut seen_disagreements = Vec::new();
    for (case, (ours, theirs)) in cases.iter().zip(&verdicts) {
        let word = |v: &Verdict| if v.accepted { "accept" } else { "refuse" };
        table.push_str(&format!(
            "{:<40} {:<13} spiffe-tunnel {:<6} go-spiffe {:<6} | {} | {}\n",
            case.name,
            match case.spec {
                Spec::Valid => "valid",
                Spec::MustReject(_) => "must-reject",
                Spec::NonConforming(_) => "nonconforming",
            },
            word(ours),
            word(theirs),
            ours.said,
            theirs.said
        ));
        if ours.accepted && ours.said != case.id {
            failures.push(format!(
                "{}: spiffe-tunnel accepted it as {:?}, not {:?}",
                case.name, ours.said, case.id
            ));
        }
        if let Spec::MustReject(rule) = case.spec {
            if ours.accepted {
                failures.push(format!(
                    "{}: spiffe-tunnel accepts what the spec refuses ({rule})",
                    case.name
                ));
            }
        }
        if ours.accepted == theirs.accepted {
            continue;
        }
        let who = if ours.accepted {
            OnlyAccepts::SpiffeTunnel
        } else {
            OnlyAccepts::GoSpiffe
        };
        seen_disagreements.push(case.name.as_str());
        match KNOWN_DISAGREEMENTS
            .iter()
            .find(|(name, ..)| *name == case.name)
        {
            Some((_, known, _)) if *known == who => {}
            Some((_, known, _)) => failures.push(format!(
                "{}: the table says only {known:?} accepts it, but only {who:?} does",
                case.name
            )),
            None => failures.push(format!(
                "{}: unexpected disagreement, only {who:?} accepts it (spiffe-tunnel: {}; \
                 go-spiffe: {})",
                case.name, ours.said, theirs.said
            )),
        }
    }
    for (name, _, rule) in KNOWN_DISAGREEMENTS {
        if !seen_disagreements.contains(name) {
            failures.push(format!(
                "{name}: listed as a disagreement ({rule}), but the verifiers agree now"
            ));
        }
    }
    println!("{} cases:\n{table}", cases.len());
    println!("known disagreements:");
    for (name, who, rule) in KNOWN_DISAGREEMENTS {
        println!("  {name}: only {who:?} accepts; {rule}");
    }
    assert!(failures.is_empty(), "{}\n\n{table}", failures.join("\n"));
}

// ---------------------------------------------------------------------------
// spiffe-tunnel and go-spiffe, each on one end of a connection

/// The outbound end's (and the go-spiffe client's) identity.
const WEB: &str = "spiffe://example.org/web";
/// The inbound end's (and the go-spiffe server's) identity.
const API: &str = "spiffe://example.org/api";
/// An ID no one holds: what a refusing side allows instead of its peer.
const DB: &str = "spiffe://example.org/db";

against_both_servers!(
    tunnel_outbound_to_go_spiffe_servers,
    go_spiffe_clients_to_tunnel_inbound
);

/// The Workload API both sides take their SVIDs from: this process's uid
/// (both sides run as it) gets WEB and API, and each side picks its own
/// (`svid =`, `--svid`).
async fn workload_api(kind: Kind) -> ApiUnderTest {
    ApiUnderTest::start(
        kind,
        Setup {
            registrations: vec![Registration::uid(WEB, 0), Registration::uid(API, 0)],
            ..Setup::default()
        },
    )
    .await
}

fn identity_section(socket: &Path) -> String {
    format!(
        "[identity]\nsource = \"workload_api\"\nsocket = \"unix://{}\"\nstartup_timeout = \"20s\"\n",
        socket.display()
    )
}

async fn wait_tunnel_line(daemon: &Daemon, needles: &[&str]) {
    wait_line("tunnel", || daemon.log(), needles).await;
}

/// spiffe-tunnel's outbound (as WEB) to go-spiffe servers (as API): one
/// tunnel per case, all in one process.
async fn tunnel_outbound_to_go_spiffe_servers(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let agent = workload_api(kind).await;
    let socket = agent.socket();
    let mut by_id = GoServer::start(dir.path(), socket, API, &GoAuthorizer::Id(WEB.into())).await;
    let by_domain = GoServer::start(
        dir.path(),
        socket,
        API,
        &GoAuthorizer::MemberOf("example.org".into()),
    )
    .await;
    let mut refusing = GoServer::start(dir.path(), socket, API, &GoAuthorizer::Id(DB.into())).await;

    // name, upstream, what the tunnel allows
    let tunnels = [
        ("authorize-id", by_id.addr, API),
        ("authorize-member-of", by_domain.addr, API),
        ("go-refuses", refusing.addr, API),
        ("tunnel-refuses", by_id.addr, DB),
    ];
    let mut config = identity_section(socket);
    let mut listen = Vec::new();
    for (name, upstream, allow) in tunnels {
        let addr = free_addr();
        listen.push(addr);
        config.push_str(&format!(
            "[[outbound]]\nname = \"{name}\"\nlisten = \"{addr}\"\nupstreams = [\"{upstream}\"]\nsvid = \"{WEB}\"\nallow = [\"{allow}\"]\n"
        ));
    }
    let path = dir.path().join("outbound.toml");
    std::fs::write(&path, config).unwrap();
    let tunnel = Daemon::run(&path);
    tunnel.wait_running().await;

    let answers = await_in_order(listen.iter().map(|&addr| roundtrip(addr, b"ping\n"))).await;
    let expected = format!("go-spiffe {API} to {WEB}: ping\n");
    for (i, name) in ["authorize-id", "authorize-member-of"].iter().enumerate() {
        let answer = answers[i]
            .as_ref()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(String::from_utf8_lossy(answer), expected, "{name}");
    }
    for (i, name) in [(2, "go-refuses"), (3, "tunnel-refuses")] {
        assert!(
            answers[i].as_ref().map_or(true, Vec::is_empty),
            "{name}: an answer came through: {:?}",
            answers[i]
        );
    }
    let log = by_id.process.log();
    assert!(log.contains(&format!("accepted {WEB}")), "{log}");

    // go-spiffe's AuthorizeID refuses WEB; spiffe-tunnel hears the alert
    // and says what to check.
    refusing
        .process
        .wait_log(
            &format!("unexpected ID \"{WEB}\""),
            1,
            Duration::from_secs(10),
        )
        .await;
    wait_tunnel_line(&tunnel, &["tunnel=go-refuses", "upstream refused our SVID"]).await;
    // spiffe-tunnel's policy refuses API; the go-spiffe server sees the
    // handshake fail with our alert.
    wait_tunnel_line(
        &tunnel,
        &[
            "tunnel=tunnel-refuses",
            "connection refused",
            &format!("{API} is not allowed by the policy"),
        ],
    )
    .await;
    by_id
        .process
        .wait_log("refused: remote error: tls:", 1, Duration::from_secs(10))
        .await;
    drop(agent);
}

/// go-spiffe clients (as WEB) to spiffe-tunnel's inbound (as API).
async fn go_spiffe_clients_to_tunnel_inbound(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let agent = workload_api(kind).await;
    let socket = agent.socket();
    let target = Target::start(TargetMode::Echo).await;
    let allowing = free_addr();
    let refusing = free_addr();
    let mut config = identity_section(socket);
    for (name, addr, allow) in [
        ("allows-web", allowing, WEB),
        ("tunnel-refuses", refusing, DB),
    ] {
        config.push_str(&format!(
            "[[inbound]]\nname = \"{name}\"\nlisten = \"{addr}\"\ntarget = \"{}\"\nsvid = \"{API}\"\nallow = [\"{allow}\"]\n",
            target.addr
        ));
    }
    let path = dir.path().join("inbound.toml");
    std::fs::write(&path, config).unwrap();
    let tunnel = Daemon::run(&path);
    tunnel.wait_running().await;

    let by_id = GoAuthorizer::Id(API.into());
    let by_domain = GoAuthorizer::MemberOf("example.org".into());
    let refusing_authorizer = GoAuthorizer::Id(DB.into());
    let (ok_id, ok_domain, go_refuses, tunnel_refuses) = tokio::join!(
        go_client(socket, WEB, allowing, &by_id, "hello by ID"),
        go_client(socket, WEB, allowing, &by_domain, "hello by trust domain"),
        go_client(
            socket,
            WEB,
            allowing,
            &refusing_authorizer,
            "never delivered"
        ),
        go_client(socket, WEB, refusing, &by_id, "never delivered"),
    );
    for (out, message) in [
        (&ok_id, "hello by ID"),
        (&ok_domain, "hello by trust domain"),
    ] {
        assert!(out.status.success(), "{message}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{message}\n"));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("server was {API}")),
            "{out:?}"
        );
    }
    assert_eq!(
        target.accepts(),
        2,
        "only the two allowed clients reach the target"
    );

    // go-spiffe's AuthorizeID refuses API: the client says why; the tunnel
    // logs a failed handshake and nothing reaches the target.
    assert_eq!(go_refuses.status.code(), Some(1), "{go_refuses:?}");
    let stderr = String::from_utf8_lossy(&go_refuses.stderr);
    assert!(
        stderr.contains(&format!("unexpected ID \"{API}\"")),
        "{stderr}"
    );
    wait_tunnel_line(&tunnel, &["tunnel=allows-web", "connection refused"]).await;

    // spiffe-tunnel's policy refuses WEB: logged with the reason, and the
    // go-spiffe client fails on our alert.
    assert_eq!(tunnel_refuses.status.code(), Some(1), "{tunnel_refuses:?}");
    wait_tunnel_line(
        &tunnel,
        &[
            "tunnel=tunnel-refuses",
            "connection refused",
            &format!("{WEB} is not allowed by the policy"),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&tunnel_refuses.stderr);
    assert!(stderr.contains("remote error: tls:"), "{stderr}");
    assert_eq!(target.accepts(), 2, "a refused client reached the target");
    drop(agent);
}

/// Awaits every future, in order.
async fn await_in_order<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let handles: Vec<_> = futures.collect();
    let mut out = Vec::with_capacity(handles.len());
    for f in handles {
        out.push(f.await);
    }
    out
}
