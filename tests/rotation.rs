//! Live rotation with the dev agent as the Workload API, every piece a real
//! process: SVIDs rotating every second under continuous traffic, a
//! long-lived connection across every rotation, the agent killed and
//! restarted, a CA rotation, and an identity the agent does not issue.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::harness::*;
use common::traffic::{traffic_until, Pinger};

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";

struct Agent {
    daemon: Daemon,
    socket: PathBuf,
}

fn start_agent(dir: &Path, args: &[&str]) -> Agent {
    let socket = dir.join("agent.sock");
    let _ = std::fs::remove_file(&socket);
    let mut all = vec![
        "dev-agent",
        "--socket",
        socket.to_str().unwrap(),
        "--trust-domain",
        "example.org",
    ];
    all.extend_from_slice(args);
    let daemon = Daemon::spawn(&all, dir, &[]);
    Agent { daemon, socket }
}

async fn wait_socket(agent: &Agent) {
    let socket = agent.socket.clone();
    wait_until("the agent socket", Duration::from_secs(20), move || {
        socket.exists()
    })
    .await;
}

/// An inbound (as api) and an outbound (as web) tunnel process fed by the
/// agent at `socket`, in front of an echo target.
struct Ends {
    target: Target,
    outbound_addr: SocketAddr,
    inbound: Daemon,
    outbound: Daemon,
}

async fn start_ends(dir: &Path, socket: &Path) -> Ends {
    let target = Target::start(TargetMode::Echo).await;
    let inbound_addr = free_addr();
    let outbound_addr = free_addr();
    let identity = format!(
        "[identity]\nsource = \"workload_api\"\nsocket = \"unix://{}\"\nstartup_timeout = \"20s\"\n",
        socket.display()
    );
    let inbound_config = dir.join("inbound.toml");
    std::fs::write(
        &inbound_config,
        format!(
            "{identity}[[inbound]]\nname = \"api\"\nlisten = \"{inbound_addr}\"\ntarget = \"{}\"\nsvid = \"{API}\"\nallow = [\"{WEB}\"]\n",
            target.addr
        ),
    )
    .unwrap();
    let outbound_config = dir.join("outbound.toml");
    std::fs::write(
        &outbound_config,
        format!(
            "{identity}[[outbound]]\nname = \"api\"\nlisten = \"{outbound_addr}\"\nupstreams = [\"{inbound_addr}\"]\nsvid = \"{WEB}\"\nallow = [\"{API}\"]\n"
        ),
    )
    .unwrap();
    let inbound = Daemon::run(&inbound_config);
    let outbound = Daemon::run(&outbound_config);
    inbound.wait_running().await;
    outbound.wait_running().await;
    Ends {
        target,
        outbound_addr,
        inbound,
        outbound,
    }
}

/// The serials an end has logged as "SVID in use" for `id`, in order.
fn serials(daemon: &Daemon, id: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for line in daemon
        .log()
        .lines()
        .filter(|l| l.contains("SVID in use") && l.contains(id))
    {
        if let Some(serial) = line
            .split("serial=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
        {
            if seen.last().map(String::as_str) != Some(serial) {
                seen.push(serial.to_string());
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_never_fail_across_rotations_and_a_long_lived_one_survives() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(dir.path(), &["--id", WEB, "--id", API, "--ttl", "2s"]);
    wait_socket(&agent).await;
    let ends = start_ends(dir.path(), &agent.socket).await;
    let mut pinger = Pinger::open(ends.outbound_addr).await;

    let (count, failures) = traffic_until(
        ends.outbound_addr,
        &mut pinger,
        Duration::from_secs(30),
        || serials(&ends.inbound, API).len() >= 4 && serials(&ends.outbound, WEB).len() >= 4,
    )
    .await;
    assert!(
        failures.is_empty(),
        "{} of {count} failed: {failures:?}",
        failures.len()
    );
    assert!(count > 10, "only {count} connections");
    // Every connection was served by the same target, through the tunnel.
    assert_eq!(ends.target.accepts(), count + 1);
    let log = ends.inbound.log();
    assert!(!log.contains("connection refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_keeps_traffic_on_the_cached_svid_then_picks_up_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca_arg = ca_dir.to_str().unwrap().to_string();
    let args = [
        "--id", WEB, "--id", API, "--ttl", "20s", "--ca-dir", &ca_arg,
    ];
    let agent = start_agent(dir.path(), &args);
    wait_socket(&agent).await;
    let ends = start_ends(dir.path(), &agent.socket).await;
    let mut pinger = Pinger::open(ends.outbound_addr).await;
    let first = serials(&ends.inbound, API);

    // The agent dies: both ends notice, and keep serving on the cached SVID.
    drop(agent);
    ends.inbound
        .wait_log("Workload API unavailable", 1, Duration::from_secs(10))
        .await;
    let (_, failures) = traffic_until(ends.outbound_addr, &mut pinger, Duration::from_secs(10), {
        let mut n = 0;
        move || {
            n += 1;
            n > 5
        }
    })
    .await;
    assert!(failures.is_empty(), "{failures:?}");

    // A new agent with the same CA: the ends reconnect and take its SVIDs.
    let agent = start_agent(dir.path(), &args);
    wait_socket(&agent).await;
    let (_, failures) = traffic_until(
        ends.outbound_addr,
        &mut pinger,
        Duration::from_secs(40),
        || {
            serials(&ends.inbound, API).len() > first.len()
                && serials(&ends.outbound, WEB).len() >= 2
        },
    )
    .await;
    assert!(failures.is_empty(), "{failures:?}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_fails_no_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_agent(
        dir.path(),
        &["--id", WEB, "--id", API, "--ttl", "1s", "--ca-ttl", "8s"],
    );
    wait_socket(&agent).await;
    let ends = start_ends(dir.path(), &agent.socket).await;
    let mut pinger = Pinger::open(ends.outbound_addr).await;
    let activations = || agent.daemon.log().matches("activated").count();
    let (count, failures) = traffic_until(
        ends.outbound_addr,
        &mut pinger,
        Duration::from_secs(30),
        || activations() >= 1,
    )
    .await;
    // Keep going a little after the switch, with SVIDs from the new CA.
    let rotations_at_switch = serials(&ends.inbound, API).len();
    let (more, more_failures) = traffic_until(
        ends.outbound_addr,
        &mut pinger,
        Duration::from_secs(15),
        || serials(&ends.inbound, API).len() >= rotations_at_switch + 2,
    )
    .await;
    assert!(
        failures.is_empty() && more_failures.is_empty(),
        "{failures:?} {more_failures:?}"
    );
    assert!(count + more > 10);
    assert!(
        !ends.inbound.log().contains("connection refused"),
        "{}",
        ends.inbound.log()
    );
    assert!(
        !ends.outbound.log().contains("connection refused"),
        "{}",
        ends.outbound.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_the_agent_does_not_issue_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    // Only uid 4242 gets an identity; this test does not run as 4242.
    let agent = start_agent(dir.path(), &["--id", "uid:4242=spiffe://example.org/web"]);
    wait_socket(&agent).await;
    let config = dir.path().join("t.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\nsource = \"workload_api\"\nsocket = \"unix://{}\"\nstartup_timeout = \"2s\"\n[[inbound]]\nname = \"a\"\nlisten = \"{}\"\ntarget = \"127.0.0.1:9\"\nallow = [\"{WEB}\"]\n",
            agent.socket.display(),
            free_addr()
        ),
    )
    .unwrap();
    let mut daemon = Daemon::run(&config);
    assert_eq!(daemon.wait_exit(Duration::from_secs(15)).await, Some(1));
    let log = daemon.log();
    assert!(log.contains("no identity issued"), "{log}");
    assert!(log.contains("PermissionDenied"), "{log}");
}
