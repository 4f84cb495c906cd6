//! spiffe-tunnel against a real SPIRE (spire-server and spire-agent
//! v1.13.3, built from source by scripts/test): every tunnel end is a
//! `spiffe-tunnel run` process with `source = "workload_api"` on the real
//! agent's socket, its identity from registration entries made with the
//! `spire-server` CLI, as an operator makes them.
//!
//! Each test starts its own server and agent (tests/common/spire.rs).
//! SVID lifetimes are short so rotations happen within seconds: SPIRE
//! backdates NotBefore by 10 s and renews at about half the lifetime, so
//! `-x509SVIDTTL 30` rotates every 10 s or so.

mod common;

use std::time::Duration;

use common::spire::{AgentConfig, ServerConfig, Spire, OTHER_UID};
use common::workload_tunnel::{TunnelEnd, TunnelPair as Pair, API, WEB};

/// A workload no entry matches.
const STRANGER_UID: u32 = OTHER_UID + 2;

/// Two tunnel ends, each a process of its own uid with its own entry
/// (`unix:uid`), carry traffic; each verified the other's SPIRE-issued
/// SVID; a workload with no entry gets PermissionDenied and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_pair_with_an_entry_each() {
    let spire = Spire::start(ServerConfig::default(), AgentConfig::default()).await;
    let pair = Pair::start(&spire, None).await;
    for i in 0..5 {
        pair.roundtrip(&format!("hello {i} through SPIRE"))
            .await
            .expect("round trip");
    }
    assert_eq!(pair.target.accepts(), 5);
    assert_eq!(pair.api.ids().await, [API]);
    assert_eq!(pair.web.ids().await, [WEB]);
    // Each end names the peer it verified.
    pair.api
        .daemon
        .wait_log(&format!("peer={WEB}"), 5, Duration::from_secs(5))
        .await;
    pair.web
        .daemon
        .wait_log(&format!("peer={API}"), 5, Duration::from_secs(5))
        .await;
    // The bundle each end holds is SPIRE's.
    let spire_cas = spire
        .server
        .bundle_pem()
        .await
        .matches("BEGIN CERTIFICATE")
        .count();
    assert_eq!(pair.api.ca_count("example.org").await, spire_cas as u64);

    // A workload with no entry: SPIRE answers PermissionDenied, and the
    // tunnel says so and gives up after its startup timeout.
    let socket = spire.agent.address();
    let mut stranger = TunnelEnd::spawn(&socket, STRANGER_UID, Duration::from_secs(3), |listen| {
        format!(
            "[[inbound]]\nname = \"x\"\nlisten = \"{listen}\"\ntarget = \"{}\"\nallow = [\"{WEB}\"]\n",
            pair.target.addr
        )
    });
    let code = stranger.daemon.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(code, Some(1), "{}", stranger.daemon.log());
    let log = stranger.daemon.log();
    for needle in [
        "PermissionDenied",
        "no identity issued",
        "Workload API issued no identity to this process",
        "is there a registration entry for this process?",
    ] {
        assert!(log.contains(needle), "{needle:?} not in:\n{log}");
    }
    assert!(
        spire.agent.log().contains("No identity issued"),
        "the agent logs the refusal too"
    );
}
