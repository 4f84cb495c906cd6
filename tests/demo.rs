//! `spiffe-tunnel demo`, the README's first command, run as a user would.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn demo_tells_the_whole_story_and_exits_zero() {
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_spiffe-tunnel"))
        .arg("demo")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the demo");
    let pid = child.id();
    let out = child.wait_with_output().expect("wait for the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for expected in [
        "inbound verified the client:  spiffe://demo.example/web",
        "outbound verified the server: spiffe://demo.example/api",
        "new connections use the new SVIDs",
        "the connection opened before the rotation still works",
        "refused by the inbound: peer spiffe://demo.example/intruder is not allowed",
        "the backend saw 0 connections from it",
        "Cleaned up.",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the demo took {:?}",
        started.elapsed()
    );
    // Its private folder (named after its pid) is gone.
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("spiffe-tunnel-demo-{pid}-"))
        })
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}
