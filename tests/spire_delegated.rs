//! `present = "caller"` against real SPIRE: every local workload speaks to
//! remote nodes as itself, through one tunnel process that is the agent's
//! authorized delegate on its admin socket (SPIRE's Delegated Identity API).
//!
//! The setup of every test: an agent with `admin_socket_path` and
//! `authorized_delegates = ["spiffe://example.org/tunnel"]`; the outbound
//! tunnel runs as root with that entry (`unix:uid:0`); an inbound end of
//! its own uid with its own entry; users made with `useradd`, each with an
//! entry of its own, whose clients are processes of those users (this test
//! binary run again, see tests/common/callers.rs). The inbound puts the
//! client's SPIFFE ID in a PROXY v2 header; the target checks it against
//! the uid each client wrote first.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::callers::{CallerRun, IdTarget};
use common::harness::free_addr;
use common::spire::{short_temp_dir, AgentConfig, ServerConfig, Spire, TestUser};
use common::workload_tunnel::{TunnelEnd, API, API_UID, ISSUE};

const TUNNEL: &str = "spiffe://example.org/tunnel";
const A: &str = "spiffe://example.org/billing";
const B: &str = "spiffe://example.org/reports";

#[test]
fn caller_process() {
    common::callers::child_main()
}

/// A SPIRE server and agent whose admin socket lets the tunnel delegate.
struct Delegation {
    spire: Spire,
    admin_dir: tempfile::TempDir,
}

impl Delegation {
    async fn start() -> Self {
        // SPIRE refuses an admin socket next to the Workload API socket.
        let admin_dir = short_temp_dir("sadm");
        let admin = admin_dir.path().join("admin.sock");
        let agent = AgentConfig {
            agent_hcl: format!(
                "    admin_socket_path = \"{}\"\n    authorized_delegates = [\"{TUNNEL}\"]\n",
                admin.display()
            ),
            ..AgentConfig::default()
        };
        let spire = Spire::start(ServerConfig::default(), agent).await;
        spire.create_entry(&spire.entry(TUNNEL).uid(0)).await;
        spire.create_entry(&spire.entry(API).uid(API_UID)).await;
        spire.agent.wait_for_ids(0, &[TUNNEL], ISSUE).await;
        spire.agent.wait_for_ids(API_UID, &[API], ISSUE).await;
        Self { spire, admin_dir }
    }

    fn admin_socket(&self) -> String {
        format!(
            "unix://{}",
            self.admin_dir.path().join("admin.sock").display()
        )
    }

    /// A user with an entry for `id` (x509 TTL `ttl` seconds).
    async fn user(&self, id: &str, ttl: Option<u64>) -> TestUser {
        let user = TestUser::create();
        let mut entry = self.spire.entry(id).uid(user.uid);
        if let Some(ttl) = ttl {
            entry = entry.x509_ttl(ttl);
        }
        self.spire.create_entry(&entry).await;
        self.spire.agent.wait_for_ids(user.uid, &[id], ISSUE).await;
        user
    }

    /// The inbound end: "only_a" lets in A only, "both" A and B; both send
    /// PROXY v2 to `target`. Returns the end and the "both" address.
    async fn inbound(&self, target: &IdTarget) -> (TunnelEnd, std::net::SocketAddr) {
        let both = free_addr();
        let target = target.addr;
        let end = TunnelEnd::spawn(
            &self.spire.agent.address(),
            API_UID,
            Duration::from_secs(30),
            |listen| {
                format!(
                    "[[inbound]]\nname = \"only_a\"\nlisten = \"{listen}\"\ntarget = \"{target}\"\nallow = [\"{A}\"]\nproxy_protocol = true\naccess_log = true\n\n\
                     [[inbound]]\nname = \"both\"\nlisten = \"{both}\"\ntarget = \"{target}\"\nallow = [\"{A}\", \"{B}\"]\nproxy_protocol = true\n"
                )
            },
        );
        end.daemon.wait_running().await;
        (end, both)
    }

    /// The delegate: outbound "only_a" and "both" with present = "caller",
    /// as root. Returns the end and the "both" listen address.
    async fn outbound(
        &self,
        only_a: std::net::SocketAddr,
        both: std::net::SocketAddr,
        extra: &str,
    ) -> (TunnelEnd, std::net::SocketAddr) {
        let both_listen = free_addr();
        let end = TunnelEnd::spawn_with(
            &self.spire.agent.address(),
            0,
            Duration::from_secs(30),
            &format!("admin_socket = \"{}\"\n{extra}", self.admin_socket()),
            |listen| {
                format!(
                    "[[outbound]]\nname = \"only_a\"\nlisten = \"{listen}\"\nupstreams = [\"{only_a}\"]\nallow = [\"{API}\"]\npresent = \"caller\"\naccess_log = true\n\n\
                     [[outbound]]\nname = \"both\"\nlisten = \"{both_listen}\"\nupstreams = [\"{both}\"]\nallow = [\"{API}\"]\npresent = \"caller\"\n"
                )
            },
        );
        end.daemon.wait_running().await;
        (end, both_listen)
    }
}

fn expected(pairs: &[(&TestUser, &str)]) -> HashMap<u32, String> {
    pairs
        .iter()
        .map(|(u, id)| (u.uid, id.to_string()))
        .collect()
}

/// The remote inbound authorizes each local workload, not the node: its
/// policy allows A only, so A's connections go through as A and B's are
/// refused there, with B's ID in the inbound's log. Also: the outbound
/// logs and /status name each caller's uid, pid and SPIFFE ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_remote_end_authorizes_each_local_workload() {
    let d = Delegation::start().await;
    let a = d.user(A, None).await;
    let b = d.user(B, None).await;
    let target = IdTarget::start(expected(&[(&a, A), (&b, B)])).await;
    let (inbound, both) = d.inbound(&target).await;
    let (outbound, _) = d.outbound(inbound.listen, both, "").await;

    let report = CallerRun::count(outbound.listen, a.uid, 5).run().await;
    assert_eq!((report.ok, report.failed), (5, 0), "{:?}", report.errors);
    assert_eq!(target.seen(A), 5);

    let report = CallerRun::count(outbound.listen, b.uid, 3).run().await;
    assert_eq!((report.ok, report.failed), (0, 3), "B must be refused");
    assert_eq!(target.seen(B), 0, "no byte of B reached the target");
    inbound
        .daemon
        .wait_log(
            &format!("peer {B} is not allowed"),
            1,
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(target.mismatches(), 0);

    // The delegate's access log names the caller; /status lists the
    // subscriptions (the caller processes have exited by now, and are
    // kept until caller_idle_timeout).
    let log = outbound.daemon.log();
    assert!(log.contains(&format!("caller_uid={}", a.uid)), "{log}");
    assert!(log.contains(&format!("caller_id={A}")), "{log}");
    assert!(log.contains("caller_pid="), "{log}");
    let status = outbound.status().await;
    let subs = status["delegated"]["subscriptions"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        subs.iter()
            .any(|s| s["uid"] == a.uid && s["spiffe_id"] == A),
        "{subs:?}"
    );
    let metrics = outbound.metrics().await;
    assert!(
        common::probe::sample(
            &metrics,
            "spiffe_tunnel_delegated_fetches_total{result=\"ok\"}"
        ) >= 2.0,
        "{metrics}"
    );
}

/// A and B open thousands of interleaved connections at full speed while
/// their SVIDs (15 s TTL) rotate at least three times each: every
/// connection arrives with its own caller's SPIFFE ID (0 mismatches), and
/// none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_are_never_confused_across_rotations() {
    let d = Delegation::start().await;
    let a = d.user(A, Some(15)).await;
    let b = d.user(B, Some(15)).await;
    let target = IdTarget::start(expected(&[(&a, A), (&b, B)])).await;
    let (inbound, both) = d.inbound(&target).await;
    let (outbound, both_listen) = d.outbound(inbound.listen, both, "").await;

    let stop_dir = tempfile::tempdir().unwrap();
    let stop = stop_dir.path().join("stop");
    let (caller_a, caller_b) = (
        CallerRun::until(both_listen, a.uid, &stop, 4),
        CallerRun::until(both_listen, b.uid, &stop, 4),
    );
    let (run_a, run_b) = (caller_a.run(), caller_b.run());
    let watch = async {
        // Each caller's serials, as the delegate's /status shows them.
        let mut serials: HashMap<String, Vec<String>> = HashMap::new();
        let started = Instant::now();
        loop {
            let status = outbound.status().await;
            for s in status["delegated"]["subscriptions"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let (Some(id), Some(serial)) = (s["spiffe_id"].as_str(), s["serial"].as_str()) {
                    let seen = serials.entry(id.to_string()).or_default();
                    if !seen.iter().any(|x| x == serial) {
                        seen.push(serial.to_string());
                    }
                }
            }
            let rotations = |id: &str| serials.get(id).map_or(0, |s| s.len().saturating_sub(1));
            if rotations(A) >= 3 && rotations(B) >= 3 && target.checked() >= 2000 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(110),
                "rotations so far: {serials:?}, {} connections",
                target.checked()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        std::fs::write(&stop, b"").unwrap();
        serials
    };
    let (ra, rb, serials) = tokio::join!(run_a, run_b, watch);
    let total = ra.ok + rb.ok;
    eprintln!(
        "no-confusion: A {} ok {} failed, B {} ok {} failed, {} checked, {} mismatches, serials {serials:?}",
        ra.ok,
        ra.failed,
        rb.ok,
        rb.failed,
        target.checked(),
        target.mismatches()
    );
    assert_eq!(
        target.mismatches(),
        0,
        "{:?}",
        target.mismatch_log.lock().unwrap()
    );
    assert_eq!(
        (ra.failed, rb.failed),
        (0, 0),
        "{:?} {:?}",
        ra.errors,
        rb.errors
    );
    assert!(total >= 2000, "only {total} connections");
    assert_eq!(target.seen(A), ra.ok);
    assert_eq!(target.seen(B), rb.ok);
}

/// Refusals: a user with no entry is refused by the delegate itself, with
/// a log line naming its uid and pid and the reason, counted; a process
/// that is not an authorized delegate gets SPIRE's PermissionDenied on the
/// admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_an_entry_and_non_delegates_are_refused() {
    let d = Delegation::start().await;
    let a = d.user(A, None).await;
    let stranger = TestUser::create();
    let target = IdTarget::start(expected(&[(&a, A)])).await;
    let (inbound, both) = d.inbound(&target).await;
    let (outbound, _) = d.outbound(inbound.listen, both, "").await;

    let report = CallerRun::count(outbound.listen, stranger.uid, 3)
        .run()
        .await;
    assert_eq!((report.ok, report.failed), (0, 3));
    assert_eq!(target.checked(), 0, "nothing reached the target");
    outbound
        .daemon
        .wait_log(
            "no registration entry matches it",
            1,
            Duration::from_secs(10),
        )
        .await;
    let log = outbound.daemon.log();
    let refusal = log
        .lines()
        .find(|l| l.contains("caller refused") && l.contains(&format!("uid={}", stranger.uid)))
        .unwrap_or_else(|| panic!("no refusal line for uid {}:\n{log}", stranger.uid));
    assert!(refusal.contains("pid="), "{refusal}");
    // Logged once per caller, not per connection.
    assert_eq!(
        log.matches("caller refused: SPIRE gives it no SVID")
            .count(),
        1,
        "{log}"
    );
    let metrics = outbound.metrics().await;
    assert!(
        common::probe::sample(
            &metrics,
            "spiffe_tunnel_delegated_fetches_total{result=\"no_entry\"}"
        ) >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        common::probe::sample(
            &metrics,
            "spiffe_tunnel_connections_total{tunnel=\"only_a\",kind=\"outbound\",result=\"caller_refused\"}"
        ),
        3.0,
        "{metrics}"
    );

    // A workload that holds an SVID (A) but is no authorized delegate.
    // SPIRE's admin socket is closed to other users by its file mode...
    let socket = d.admin_dir.path().join("admin.sock");
    let answer = common::callers::admin_probe(&socket, a.uid).await;
    eprintln!("a non-delegate on SPIRE's admin socket: {answer}");
    assert!(
        answer.contains("Permission denied (os error 13)"),
        "{answer}"
    );
    // ... and when the file mode lets it in, the API refuses it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let answer = common::callers::admin_probe(&socket, a.uid).await;
    eprintln!("SPIRE's answer to a non-delegate: {answer}");
    assert!(
        answer.contains("PermissionDenied")
            && answer.contains("caller not configured as an authorized delegate"),
        "{answer}"
    );
}
