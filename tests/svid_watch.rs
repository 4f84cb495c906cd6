//! `svid watch` follow-ups over real processes: `--exec` runs after each
//! update with `$SVID_DIR`, `--signal` reaches the process in `--pid-file`,
//! and `svid fetch` explains an agent that is not there.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::harness::*;

fn agent(dir: &Path) -> (Daemon, String) {
    let socket = dir.join("agent.sock");
    let daemon = Daemon::spawn(
        &[
            "dev-agent",
            "--socket",
            socket.to_str().unwrap(),
            "--trust-domain",
            "example.org",
            "--id",
            "spiffe://example.org/web",
            "--ttl",
            "2s",
        ],
        dir,
        &[],
    );
    (daemon, format!("unix://{}", socket.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_signal_follow_every_update() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, socket) = agent(dir.path());
    let socket_path = dir.path().join("agent.sock");
    wait_until("the agent socket", Duration::from_secs(20), || {
        socket_path.exists()
    })
    .await;

    // A process that counts the SIGHUPs it gets, with a pid file.
    let counter = dir.path().join("hups");
    let mut target = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "n=0; trap 'n=$((n+1)); echo $n > {}' HUP; while true; do sleep 0.05; done",
            counter.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid_file = dir.path().join("target.pid");
    std::fs::write(&pid_file, target.id().to_string()).unwrap();

    let out = dir.path().join("svid");
    let marker = dir.path().join("exec-ran");
    let watch = Daemon::spawn(
        &[
            "svid",
            "watch",
            "--write",
            out.to_str().unwrap(),
            "--socket",
            &socket,
            "--exec",
            &format!("ls \"$SVID_DIR\" >> {}", marker.display()),
            "--signal",
            "HUP",
            "--pid-file",
            pid_file.to_str().unwrap(),
        ],
        dir.path(),
        &[],
    );
    // Two rotations at a 2 s TTL: at least three updates.
    wait_until("three updates signalled", Duration::from_secs(20), || {
        std::fs::read_to_string(&counter)
            .ok()
            .and_then(|n| n.trim().parse::<u32>().ok())
            .is_some_and(|n| n >= 3)
    })
    .await;
    let ran = std::fs::read_to_string(&marker).unwrap();
    assert!(ran.matches("svid.0.pem").count() >= 3, "{ran}");
    let log = watch.log();
    assert!(log.contains("--exec command succeeded"), "{log}");
    assert!(log.contains("signal sent"), "{log}");
    let _ = target.kill();
    let _ = target.wait();
}

#[test]
fn fetch_says_clearly_when_no_agent_answers() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["svid", "fetch", "--write"])
        .arg(dir.path().join("out"))
        .args([
            "--socket",
            "unix:///nonexistent/agent.sock",
            "--timeout",
            "1s",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no usable answer from the Workload API"),
        "{stderr}"
    );
    assert!(!dir.path().join("out").join("svid.0.pem").exists());

    let out = Command::new(binary())
        .args([
            "svid",
            "fetch",
            "--write",
            "/tmp/x",
            "--socket",
            "http://nope",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
