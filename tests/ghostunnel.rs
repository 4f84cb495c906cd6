//! ghostunnel, the closest existing peer (Go, go-spiffe inside), on either
//! side of a spiffe-tunnel end, both taking SVIDs from the Workload API
//! (`ghostunnel --use-workload-api-addr`):
//!
//! * spiffe-tunnel outbound → `ghostunnel server` → target;
//! * `ghostunnel client` → spiffe-tunnel inbound → target;
//! * each side refusing the other by policy, with the refusal visible on
//!   both sides.
//!
//! Against the dev agent and against real SPIRE, the same body. ghostunnel
//! presents the first SVID the Workload API sends, so each ghostunnel runs
//! as a uid of its own with one registration; spiffe-tunnel (uid 0) holds
//! both IDs and picks with `svid =`.

mod common;

use std::time::Duration;

use common::api_under_test::{ApiUnderTest, Kind, Registration, Setup};
use common::harness::*;
use common::peers::{wait_line, Ghostunnel};
use common::spire::OTHER_UID;

/// spiffe-tunnel's outbound and ghostunnel's client.
const WEB: &str = "spiffe://example.org/web";
/// spiffe-tunnel's inbound and ghostunnel's server.
const API: &str = "spiffe://example.org/api";
/// An ID no one holds: what a refusing side allows instead of its peer.
const DB: &str = "spiffe://example.org/db";

/// ghostunnel's servers run as this uid, holding API only.
const SERVER_UID: u32 = OTHER_UID + 20;
/// ghostunnel's clients run as this uid, holding WEB only.
const CLIENT_UID: u32 = OTHER_UID + 21;

against_both_servers!(ghostunnel_on_either_side_of_spiffe_tunnel);

/// Sends `msg` and reads as many bytes back, without half-closing first:
/// ghostunnel v1.8.4 closes both directions when one ends (its copy loop
/// has no half-close), so a reply after our FIN would never come. Returns
/// what came back before the peer closed, or an error.
async fn exchange(addr: std::net::SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(msg).await?;
    let mut answer = vec![0u8; msg.len()];
    let mut got = 0;
    while got < answer.len() {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer[got..])).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => got += n,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
    answer.truncate(got);
    Ok(answer)
}

async fn ghostunnel_on_either_side_of_spiffe_tunnel(kind: Kind) {
    let dir = tempfile::tempdir().unwrap();
    let api = ApiUnderTest::start(
        kind,
        Setup {
            registrations: vec![
                Registration::uid(WEB, 0),
                Registration::uid(API, 0),
                Registration::uid(API, SERVER_UID),
                Registration::uid(WEB, CLIENT_UID),
            ],
            ..Setup::default()
        },
    )
    .await;
    let socket = api.address();
    let target = Target::start(TargetMode::Echo).await;

    let server = Ghostunnel::server(dir.path(), &socket, SERVER_UID, target.addr, WEB).await;
    let mut refusing_server =
        Ghostunnel::server(dir.path(), &socket, SERVER_UID, target.addr, DB).await;

    let inbound = free_addr();
    let refusing_inbound = free_addr();
    let outbound = free_addr();
    let to_refusing_server = free_addr();
    let config = format!(
        "[identity]\nsource = \"workload_api\"\nsocket = \"{socket}\"\nstartup_timeout = \"20s\"\n\
         [[inbound]]\nname = \"from-ghostunnel\"\nlisten = \"{inbound}\"\ntarget = \"{target}\"\nsvid = \"{API}\"\nallow = [\"{WEB}\"]\n\
         [[inbound]]\nname = \"tunnel-refuses\"\nlisten = \"{refusing_inbound}\"\ntarget = \"{target}\"\nsvid = \"{API}\"\nallow = [\"{DB}\"]\n\
         [[outbound]]\nname = \"to-ghostunnel\"\nlisten = \"{outbound}\"\nupstreams = [\"{server}\"]\nsvid = \"{WEB}\"\nallow = [\"{API}\"]\n\
         [[outbound]]\nname = \"ghostunnel-refuses\"\nlisten = \"{to_refusing_server}\"\nupstreams = [\"{refusing}\"]\nsvid = \"{WEB}\"\nallow = [\"{API}\"]\n",
        target = target.addr,
        server = server.listen,
        refusing = refusing_server.listen,
    );
    let path = dir.path().join("tunnel.toml");
    std::fs::write(&path, config).unwrap();
    let tunnel = Daemon::run(&path);
    tunnel.wait_running().await;

    let client = Ghostunnel::client(dir.path(), &socket, CLIENT_UID, inbound, API).await;
    let mut client_refused =
        Ghostunnel::client(dir.path(), &socket, CLIENT_UID, refusing_inbound, API).await;

    // Both directions carry data.
    let (through_server, through_client) = tokio::join!(
        exchange(outbound, b"spiffe-tunnel -> ghostunnel"),
        exchange(client.listen, b"ghostunnel -> spiffe-tunnel"),
    );
    assert_eq!(through_server.unwrap(), b"spiffe-tunnel -> ghostunnel");
    assert_eq!(through_client.unwrap(), b"ghostunnel -> spiffe-tunnel");
    assert_eq!(target.accepts(), 2);
    wait_line(
        "spiffe-tunnel",
        || tunnel.log(),
        &["tunnel=from-ghostunnel", "peer authorized"],
    )
    .await;

    // ghostunnel's --allow-uri refuses WEB ("unauthorized: invalid
    // principal"); spiffe-tunnel says the upstream refused our SVID.
    let (to_refuser, refused) = tokio::join!(
        exchange(to_refusing_server, b"never delivered"),
        exchange(client_refused.listen, b"never delivered"),
    );
    assert!(to_refuser.map_or(true, |a| a.is_empty()));
    assert!(refused.map_or(true, |a| a.is_empty()));
    wait_line(
        "spiffe-tunnel",
        || tunnel.log(),
        &["tunnel=ghostunnel-refuses", "upstream refused our SVID"],
    )
    .await;
    refusing_server
        .process
        .wait_log(
            "unauthorized: invalid principal",
            1,
            Duration::from_secs(10),
        )
        .await;

    // spiffe-tunnel's policy refuses WEB: logged with the reason; the
    // ghostunnel client's copy fails on our alert.
    wait_line(
        "spiffe-tunnel",
        || tunnel.log(),
        &[
            "tunnel=tunnel-refuses",
            "connection refused",
            &format!("{WEB} is not allowed by the policy"),
        ],
    )
    .await;
    client_refused
        .process
        .wait_log("remote error: tls:", 1, Duration::from_secs(10))
        .await;
    assert_eq!(target.accepts(), 2, "a refused peer reached the target");

    drop((client, client_refused, server, refusing_server, tunnel));
}
