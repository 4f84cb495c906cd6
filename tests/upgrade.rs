//! Upgrades in place (SIGUSR2) and socket activation, with real processes
//! and real sockets: connections are counted through every hand-over, and
//! the processes each upgrade leaves are reaped here (this test binary is
//! their subreaper) so their exit codes can be checked.

mod common;

use std::time::{Duration, Instant};

use common::certs::Ca;
use common::harness::*;
use common::probe::{self, Summary, Usage};
use common::upgrade::*;

/// Three upgrades in a row under a client loop through both tunnel kinds
/// of one process, with long-lived connections on each old process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_under_load_drop_no_connection() {
    become_subreaper();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let drain = Duration::from_secs(3);
    let node = Node::start(&tmp.path().join("node"), &ca, target.addr, "3s").await;
    let started = Instant::now();
    for i in 0..50 {
        let msg = format!("warm-up {i}");
        assert_eq!(
            roundtrip(node.out_addr, msg.as_bytes()).await.unwrap(),
            msg.as_bytes()
        );
    }
    let mut pid = node.pid().unwrap();
    let baseline = Usage::of(pid);

    let load = Load::start(node.out_addr, 4);
    let (mut finite, mut outliving) = (Vec::new(), Vec::new());
    let mut pids = vec![pid];
    for round in 1..=3 {
        load.wait_attempts(round * 500, Duration::from_secs(60))
            .await;
        // On the process about to be replaced: three that end by
        // themselves during its drain, one that outlives drain_timeout.
        for _ in 0..3 {
            finite.push(long_lived(node.out_addr, Some(Duration::from_millis(1500))).await);
        }
        outliving.push(long_lived(node.out_addr, None).await);
        signal(pid, "USR2");
        let signalled = Instant::now();
        let new = node.wait_pid(Some(pid)).await;
        assert_eq!(
            wait_exit(pid, drain + Duration::from_secs(10)).await,
            Some(0),
            "old process {pid} (upgrade {round})"
        );
        let outlived = outliving.pop().unwrap().await.unwrap();
        let cut = outlived.cut_at.expect("cut by the drain timeout");
        assert!(
            cut.duration_since(signalled) >= drain - Duration::from_millis(300),
            "upgrade {round}: a long-lived connection was cut {:?} after SIGUSR2, before drain_timeout",
            cut.duration_since(signalled)
        );
        outliving.push(tokio::spawn(async move { outlived }));
        for port in [node.in_addr.port(), node.out_addr.port(), node.admin.port()] {
            assert_eq!(
                serving_pids(port),
                [new],
                "port {port} after upgrade {round}"
            );
        }
        pid = new;
        pids.push(pid);
    }
    load.wait_attempts(2000, Duration::from_secs(60)).await;
    let (attempted, failures) = load.stop().await;
    let mut kept = 0;
    for lived in finite {
        let lived = lived.await.unwrap();
        assert!(
            lived.cut_at.is_none(),
            "a long-lived connection was cut: {lived:?}"
        );
        kept += 1;
    }
    let settled = probe::settle_usage(pid, baseline, Duration::from_secs(10)).await;
    let mut summary = Summary::new("upgrade", "upgrades in place under load (tests/upgrade.rs)");
    summary.line(format!(
        "upgrades: 3 (pids {pids:?}), each old process exited 0"
    ));
    summary.line(format!(
        "connections attempted: {attempted}, failed: {}",
        failures.len()
    ));
    summary.line(format!(
        "long-lived: {kept} kept to their own end, 3 kept until drain_timeout ({drain:?}) and then closed"
    ));
    summary.line(format!(
        "final process: {} (baseline {}); {:.1} s",
        settled.describe(),
        baseline.describe(),
        started.elapsed().as_secs_f64()
    ));
    summary.emit();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(attempted >= 2000);
    probe::assert_near_baseline("final process", pid, baseline, settled);
    signal(pid, "TERM");
    assert_eq!(wait_exit(pid, Duration::from_secs(10)).await, Some(0));
    assert!(probe::panic_lines(&node.log()).is_empty(), "{}", node.log());
}
