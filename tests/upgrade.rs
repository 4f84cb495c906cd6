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
    let drain = Duration::from_secs(2);
    let node = Node::start(&tmp.path().join("node"), &ca, target.addr, "2s").await;
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
    let ready = |pid: u32| {
        format!("READY=1\nSTATUS=serving 1 inbound and 1 outbound tunnel(s)\nMAINPID={pid}")
    };
    assert_eq!(node.notifications(), [ready(pid)]);

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
        // systemd follows the new process; the old one says nothing more
        // (no STOPPING=1: the service is not stopping).
        assert_eq!(node.notifications(), [ready(new)], "upgrade {round}");
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

/// The last log line that contains `needle`.
fn last_line(log: &str, needle: &str) -> String {
    log.lines()
        .rfind(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"))
        .to_string()
}

/// A bad config, a binary that cannot run, one that is not ours: each
/// upgrade fails, the old process serves on without losing a connection,
/// and says why. Then the real binary again, through `spiffe-tunnel upgrade`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upgrades_leave_the_old_process_serving() {
    become_subreaper();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let node = Node::start(&tmp.path().join("node"), &ca, target.addr, "1s").await;
    let pid = node.pid().unwrap();
    let load = Load::start(node.out_addr, 2);
    let mut served = 0;
    let mut still_serving = |failures: usize| {
        assert_eq!(node.pid(), Some(pid), "after failure {failures}");
        assert!(running(pid));
        assert_eq!(serving_pids(node.in_addr.port()), [pid]);
        served += 1;
    };

    // 1. The config is invalid now: the new process says where, and exits 2.
    let good = std::fs::read_to_string(&node.config).unwrap();
    let bad = node.config_text(
        "[[inbound]]\nname = \"broken\"\nlisten = \"nowhere\"\ntarget = \"127.0.0.1:1\"\nallow = [\"spiffe://example.org/x\"]\n",
    );
    let line = bad.lines().position(|l| l.contains("nowhere")).unwrap() + 1;
    std::fs::write(&node.config, &bad).unwrap();
    signal(pid, "USR2");
    node.wait_log("upgrade failed", 1).await;
    let failure = last_line(&node.log(), "upgrade failed");
    assert!(
        failure.contains(&format!("tunnel.toml:{line}: inbound[1].listen"))
            && failure.contains("exit status: 2"),
        "{failure}"
    );
    still_serving(1);
    std::fs::write(&node.config, &good).unwrap();

    // 2. The binary at our path is not executable.
    std::fs::set_permissions(
        &node.exe,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    signal(pid, "USR2");
    node.wait_log("upgrade failed", 2).await;
    let failure = last_line(&node.log(), "upgrade failed");
    assert!(failure.contains("Permission denied"), "{failure}");
    still_serving(2);

    // 3. Something else is there now, which exits at once.
    let script = tmp.path().join("not-spiffe-tunnel");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'I am not spiffe-tunnel' >&2\nexit 3\n",
    )
    .unwrap();
    replace_binary(&node.exe, &script);
    signal(pid, "USR2");
    node.wait_log("upgrade failed", 3).await;
    let failure = last_line(&node.log(), "upgrade failed");
    assert!(failure.contains("exit status: 3"), "{failure}");
    still_serving(3);
    let metrics = probe::metrics(node.admin).await;
    let upgrades = |result: &str| {
        probe::sample(
            &metrics,
            &format!("spiffe_tunnel_upgrades_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!(
        (upgrades("failed"), upgrades("ok")),
        (3.0, 0.0),
        "{metrics}"
    );

    // 4. The real binary again: `upgrade` waits for the new process.
    replace_binary(&node.exe, std::path::Path::new(binary()));
    let before = load.attempts();
    let out = std::process::Command::new(binary())
        .args(["upgrade", "--pid-file", node.pid_file.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = node.pid().unwrap();
    assert!(
        new != pid && text.contains(&format!("{pid} handed over to {new}")),
        "{text}"
    );
    assert_eq!(wait_exit(pid, Duration::from_secs(10)).await, Some(0));
    load.wait_attempts(before + 100, Duration::from_secs(30))
        .await;
    let (attempted, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{attempted} attempted, failed: {failures:?}"
    );
    assert_eq!(served, 3);
    signal(new, "TERM");
    assert_eq!(wait_exit(new, Duration::from_secs(10)).await, Some(0));
}

/// The pid in a "new_pid=N" field of the last line with `needle`.
fn logged_pid(log: &str, needle: &str) -> u32 {
    let line = last_line(log, needle);
    line.split("new_pid=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no new_pid in {line:?}"))
}

/// Waits until `pid` is gone; its exit code when it was reaped here,
/// `None` when its own parent reaped it.
async fn wait_gone(pid: u32, timeout: Duration) -> Option<i32> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let deadline = Instant::now() + timeout;
    loop {
        match waitpid(
            nix::unistd::Pid::from_raw(pid as i32),
            Some(WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::Exited(_, code)) => return Some(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => panic!("process {pid} killed by {signal}"),
            _ if !running(pid) => return None,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} still runs after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGTERM while the new process is still starting stops both; SIGTERM to
/// both after the hand-over lets each drain its own connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_upgrade_drains_both_and_nothing_hangs() {
    become_subreaper();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;

    // Before ready: the new process waits for a Workload API nobody serves.
    let node = Node::start(&tmp.path().join("a"), &ca, target.addr, "5s").await;
    let pid = node.pid().unwrap();
    let stuck = node.config_text("").replace(
        FILE_IDENTITY.trim_start_matches("[identity]\n"),
        &format!(
            "source = \"workload_api\"\nsocket = \"unix://{}\"\nstartup_timeout = \"60s\"\n",
            node.dir.join("nobody.sock").display()
        ),
    );
    std::fs::write(&node.config, stuck).unwrap();
    let live = long_lived(node.out_addr, Some(Duration::from_secs(1))).await;
    signal(pid, "USR2");
    node.wait_log("upgrade: started the new process", 1).await;
    let child = logged_pid(&node.log(), "upgrade: started the new process");
    signal(pid, "USR2");
    node.wait_log("an upgrade is already under way", 1).await;
    // The new process has its listeners and waits for an identity.
    node.wait_log("waiting for SVIDs from the Workload API", 1)
        .await;
    let stopping = Instant::now();
    signal(pid, "TERM");
    assert_eq!(wait_exit(pid, Duration::from_secs(10)).await, Some(0));
    let code = wait_gone(child, Duration::from_secs(5)).await;
    assert!(matches!(code, Some(0) | None), "new process: {code:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "{:?}",
        stopping.elapsed()
    );
    assert!(
        live.await.unwrap().cut_at.is_none(),
        "the live connection was cut"
    );
    assert!(
        node.log().contains("stopped during start-up"),
        "{}",
        node.log()
    );

    // After the hand-over: each process drains what it holds.
    let node = Node::start(&tmp.path().join("b"), &ca, target.addr, "5s").await;
    let old = node.pid().unwrap();
    // The old one finishes first, so the new one is ours to reap (were it
    // first, the old process would reap it).
    let on_old = long_lived(node.out_addr, Some(Duration::from_millis(1000))).await;
    signal(old, "USR2");
    let new = node.wait_pid(Some(old)).await;
    let on_new = long_lived(node.out_addr, Some(Duration::from_millis(2000))).await;
    let stopping = Instant::now();
    signal(new, "TERM");
    signal(old, "TERM");
    assert_eq!(wait_exit(old, Duration::from_secs(10)).await, Some(0));
    // Ours to reap now, unless it ended first and the old process reaped
    // it (a loaded machine can reorder them): then its log line tells.
    let code = wait_gone(new, Duration::from_secs(10)).await;
    assert!(matches!(code, Some(0) | None), "new process: {code:?}");
    node.wait_log("drained: every connection finished", 2).await;
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "{:?}",
        stopping.elapsed()
    );
    assert!(
        on_old.await.unwrap().cut_at.is_none(),
        "cut on the old process"
    );
    assert!(
        on_new.await.unwrap().cut_at.is_none(),
        "cut on the new process"
    );
}

const API: &str = "spiffe://example.org/api";
const WEB: &str = "spiffe://example.org/web";
const DRAIN: &str = "[defaults]\ndrain_timeout = \"5s\"\n";

fn inbound_on(listen: &str, target: std::net::SocketAddr) -> String {
    format!("[[inbound]]\nname = \"api\"\nlisten = \"{listen}\"\ntarget = \"{target}\"\nallow = [\"{WEB}\"]\n")
}

/// systemd's own launcher: it binds, waits for the first connection and
/// then starts the daemon with the socket, as a `.socket` unit does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activation_by_systemd_socket_activate() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let web = ca.leaf(WEB);
    let client = || raw_client_config(Some((&web.chain_pem, &web.key_pem)));
    let activate = |dir: &std::path::Path, addr: std::net::SocketAddr, config: &std::path::Path| {
        Daemon::spawn_exe(
            std::path::Path::new("systemd-socket-activate"),
            &[
                &format!("--listen={addr}"),
                "--fdname=web-in",
                "-E",
                "RUST_LOG",
                binary(),
                "run",
                "-c",
                config.to_str().unwrap(),
            ],
            dir,
            &[],
        )
    };

    let dir = tmp.path().join("ok");
    let config = write_config(
        &dir,
        &ca,
        API,
        &format!("{DRAIN}{}", inbound_on("systemd:web-in", target.addr)),
    );
    let check = std::process::Command::new(binary())
        .args(["check", "-c", config.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success() && text.contains("mTLS on systemd:web-in"),
        "{text}"
    );
    let addr = free_addr();
    let daemon = activate(&dir, addr, &config);
    // The first connection waits in the socket's queue while the daemon starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    let answer = loop {
        match raw_tls_roundtrip(addr, client(), b"activated").await {
            Ok(answer) => break answer,
            Err(e) if Instant::now() < deadline => {
                // systemd-socket-activate may not be listening yet.
                assert!(e.kind() == std::io::ErrorKind::ConnectionRefused, "{e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}\n{}", daemon.log()),
        }
    };
    assert_eq!(answer, b"activated");
    daemon
        .wait_log("listen=systemd:web-in", 1, Duration::from_secs(5))
        .await;

    // A tunnel on IP:port takes the passed socket bound to that address,
    // so one .socket unit can serve a config that names no systemd socket.
    let dir = tmp.path().join("by-address");
    let addr = free_addr();
    let config = write_config(
        &dir,
        &ca,
        API,
        &format!("{DRAIN}{}", inbound_on(&addr.to_string(), target.addr)),
    );
    let by_address = activate(&dir, addr, &config);
    let deadline = Instant::now() + Duration::from_secs(10);
    while raw_tls_roundtrip(addr, client(), b"by address")
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "{}", by_address.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !by_address.log().contains("used by no tunnel"),
        "{}",
        by_address.log()
    );

    // A name systemd did not pass: the error names the tunnel, the name
    // and what was passed, and the exit code says configuration (2).
    let dir = tmp.path().join("missing");
    let config = write_config(
        &dir,
        &ca,
        API,
        &format!("{DRAIN}{}", inbound_on("systemd:nope", target.addr)),
    );
    let addr = free_addr();
    let mut daemon = activate(&dir, addr, &config);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).await, Some(2));
    let error = last_line(&daemon.log(), "nope");
    assert!(
        error.contains("inbound tunnel \"api\"") && error.contains("passed: \"web-in\""),
        "{error}"
    );
}

/// A launcher that holds the sockets (as systemd's .socket unit does)
/// and starts the daemon with them at fds 3.., LISTEN_PID set by the shell
/// that then becomes the daemon.
fn launch(
    dir: &std::path::Path,
    config: &std::path::Path,
    sockets: &[(&str, &std::net::TcpListener)],
) -> Daemon {
    use command_fds::{CommandFdExt, FdMapping};
    use std::os::fd::AsFd;
    let mut command = std::process::Command::new("sh");
    command
        .args([
            "-c",
            "LISTEN_PID=$$ exec \"$@\"",
            "sh",
            binary(),
            "run",
            "-c",
        ])
        .arg(config)
        .env("LISTEN_FDS", sockets.len().to_string())
        .env(
            "LISTEN_FDNAMES",
            sockets
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(":"),
        );
    let mappings = sockets
        .iter()
        .enumerate()
        .map(|(i, (_, socket))| FdMapping {
            parent_fd: socket.as_fd().try_clone_to_owned().unwrap(),
            child_fd: 3 + i as i32,
        })
        .collect();
    command.fd_mappings(mappings).unwrap();
    Daemon::spawn_command(command, dir)
}

/// `systemctl restart` of a socket-activated daemon: the launcher holds
/// the socket, the process is stopped and started again, connections wait
/// in the kernel meanwhile and are served; then an upgrade of the
/// activated process passes the systemd socket on under its own name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_under_socket_activation_drops_no_connection() {
    become_subreaper();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let in_addr = socket.local_addr().unwrap();
    let dir = tmp.path().join("activated");
    let config = write_config(
        &dir,
        &ca,
        API,
        &format!("{DRAIN}{}", inbound_on("systemd:api", target.addr)),
    );
    let out_addr = free_addr();
    let client_config = write_config(
        &tmp.path().join("client"),
        &ca,
        WEB,
        &format!("{DRAIN}[[outbound]]\nname = \"api\"\nlisten = \"{out_addr}\"\nupstreams = [\"{in_addr}\"]\nallow = [\"{API}\"]\n"),
    );
    let client = Daemon::run(&client_config);
    client.wait_running().await;

    let mut server = launch(&dir, &config, &[("api", &socket)]);
    server.wait_running().await;
    let load = Load::start(out_addr, 2);
    for restart in 1..=2 {
        load.wait_attempts(restart * 150, Duration::from_secs(30))
            .await;
        server.signal("TERM");
        assert_eq!(server.wait_exit(Duration::from_secs(10)).await, Some(0));
        // Stopped: nothing accepts, yet connections wait in the queue.
        server = launch(&dir, &config, &[("api", &socket)]);
        server.wait_running().await;
    }
    // A reload that replaces the tunnel hands the systemd socket over to
    // the new tunnel (it could not be had again otherwise).
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}access_log = true\n")).unwrap();
    server.signal("HUP");
    server
        .wait_log("1 replaced, 0 added, 0 removed", 1, Duration::from_secs(10))
        .await;
    load.wait_attempts(load.attempts() + 100, Duration::from_secs(30))
        .await;
    // The activated process upgrades: the new one finds "api" passed on.
    let pid = server.pid();
    server.signal("USR2");
    server
        .wait_log(
            "upgrade: the new process is ready",
            1,
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(server.wait_exit(Duration::from_secs(10)).await, Some(0));
    let new = logged_pid(&server.log(), "upgrade: the new process is ready");
    assert_ne!(new, pid);
    load.wait_attempts(load.attempts() + 100, Duration::from_secs(30))
        .await;
    let (attempted, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{attempted} attempted; failed: {failures:?}"
    );
    drop(socket);
    signal(new, "TERM");
    assert_eq!(wait_exit(new, Duration::from_secs(10)).await, Some(0));
}
