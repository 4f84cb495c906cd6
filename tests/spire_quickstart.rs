//! The SPIRE quickstart as a user runs it: `scripts/spire-quickstart.sh`
//! against the SPIRE binaries scripts/test built, ending with a request
//! through both tunnel ends, then Ctrl-C; and the shipped
//! `spire-config/*.conf` surviving an agent and a server restart.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::spire::{bin_dir, short_temp_dir, spire_bin, SpireProcess};
use tokio::io::{AsyncBufReadExt, BufReader};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The steps of docs/spire.md ("The quickstart"): run the script with SPIRE_SERVER and SPIRE_AGENT
/// set, see the answer of the request it sends through the tunnels, press
/// Ctrl-C, and nothing it started is left running. The test gives it its
/// own work folder and agent socket, and runs it in a network namespace of
/// its own (`unshare --net`, loopback only), so neither its files nor the
/// fixed ports the docs give can collide with anything else running on
/// the machine, a second run of this test included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_script_ends_with_a_request_through_the_tunnel() {
    let bins = bin_dir();
    let root = short_temp_dir("spq");
    let work = root.path().join("q");
    let agent_socket = root.path().join("agent.sock");
    // unshare and both bash levels exec: the pid is the script's.
    let mut script = tokio::process::Command::new("unshare")
        .args([
            "--net",
            "bash",
            "-c",
            "ip link set lo up && exec bash \"$0\"",
        ])
        .arg(Path::new(REPO).join("scripts/spire-quickstart.sh"))
        .current_dir(REPO)
        .env("SPIRE_SERVER", bins.join("spire-server"))
        .env("SPIRE_AGENT", bins.join("spire-agent"))
        .env("SPIFFE_TUNNEL", common::harness::binary())
        .env("QUICKSTART_DIR", &work)
        .env("QUICKSTART_AGENT_SOCKET", &agent_socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run scripts/spire-quickstart.sh (needs root for unshare --net, and iproute2)");
    let pid = script.id().unwrap();
    let mut stdout = BufReader::new(script.stdout.take().unwrap()).lines();
    let started = Instant::now();
    let mut seen = Vec::new();
    let answered = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(line)) = stdout.next_line().await {
            let done = line.contains("hello through spiffe-tunnel and SPIRE");
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    if !answered {
        let _ = script.start_kill();
        let out = script.wait_with_output().await.unwrap();
        panic!(
            "no answer through the tunnel; stdout:\n{}\nstderr:\n{}\nlogs in {}:\n{}",
            seen.join("\n"),
            String::from_utf8_lossy(&out.stderr),
            work.display(),
            logs(&work)
        );
    }
    eprintln!(
        "quickstart answered after {:?}:\n{}",
        started.elapsed(),
        seen.join("\n")
    );
    stdout.next_line().await.ok();

    // Ctrl-C: the script's trap stops everything it started (SPIRE, the
    // backend and both tunnel ends, all named by their paths here).
    let running = processes_mentioning(root.path());
    assert!(
        running.len() >= 5,
        "the script's processes are not where this test looks: {running:?}"
    );
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), script.wait())
        .await
        .expect("the script did not stop on Ctrl-C")
        .unwrap();
    eprintln!("after Ctrl-C the script exited with {exit}");
    let left = processes_mentioning(root.path());
    assert!(left.is_empty(), "still running after Ctrl-C: {left:?}");
}

/// The log files the script wrote, for a failure message.
fn logs(work: &Path) -> String {
    let mut out = String::new();
    for name in ["server.log", "agent.log", "inbound.log", "outbound.log"] {
        let text = std::fs::read_to_string(work.join(name)).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        out.push_str(&format!("--- {name}\n"));
        for line in tail.iter().rev() {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Pids whose command line mentions `path`.
fn processes_mentioning(path: &Path) -> Vec<(u32, String)> {
    let needle = path.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// The shipped configs, run the way the script runs them (from a work
/// folder, the sockets and the port given on the command line): a killed
/// agent comes back without a new join token, because its KeyManager is
/// `disk` (with `memory` it would have to attest again, and its join
/// token is spent), and a killed server comes back with the same CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_configs_survive_an_agent_and_a_server_restart() {
    let root = short_temp_dir("spc");
    let work = root.path();
    // As the script does: the configs' relative data paths under the
    // working directory.
    std::fs::create_dir_all(work.join("server/data")).unwrap();
    std::fs::create_dir_all(work.join("agent/data")).unwrap();
    let server_socket = work.join("server.sock");
    let agent_socket = work.join("agent.sock");
    let port = common::harness::free_port().to_string();
    let server_conf = format!("{REPO}/spire-config/server.conf");
    let agent_conf = format!("{REPO}/spire-config/agent.conf");
    let (server_bin, agent_bin) = (spire_bin("spire-server"), spire_bin("spire-agent"));
    let server_socket_arg = server_socket.to_str().unwrap().to_string();
    let agent_socket_arg = agent_socket.to_str().unwrap().to_string();
    let start_server = |n: usize| {
        SpireProcess::spawn_in(
            "spire-server",
            &server_bin,
            &[
                "run",
                "-config",
                &server_conf,
                "-socketPath",
                &server_socket_arg,
                "-serverPort",
                &port,
            ],
            work.join(format!("server-{n}.log")),
            Some(work),
        )
    };
    let mut server = start_server(1);
    server
        .wait_healthy(&server_bin, &server_socket, Duration::from_secs(30))
        .await;
    let cli = |args: &[&str]| {
        let mut command = tokio::process::Command::new(&server_bin);
        command.args(args).arg("-socketPath").arg(&server_socket);
        async move {
            let out = command.output().await.unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let node = "spiffe://example.org/node/restarts";
    let token_out = cli(&["token", "generate", "-spiffeID", node]).await;
    let token = token_out
        .split_whitespace()
        .nth(1)
        .expect("Token: VALUE")
        .to_string();
    cli(&[
        "entry",
        "create",
        "-parentID",
        node,
        "-spiffeID",
        "spiffe://example.org/web",
        "-selector",
        "unix:uid:0",
    ])
    .await;
    let bundle_before = cli(&["bundle", "show"]).await;

    let start_agent = |n: usize, token: Option<&str>| {
        let mut args = vec![
            "run",
            "-config",
            &agent_conf,
            "-socketPath",
            &agent_socket_arg,
            "-serverPort",
            &port,
        ];
        if let Some(token) = token {
            args.extend(["-joinToken", token]);
        }
        SpireProcess::spawn_in(
            "spire-agent",
            &agent_bin,
            &args,
            work.join(format!("agent-{n}.log")),
            Some(work),
        )
    };
    let mut agent = start_agent(1, Some(&token));
    agent
        .wait_healthy(&agent_bin, &agent_socket, Duration::from_secs(30))
        .await;
    wait_svid(&agent_bin, &agent_socket, "spiffe://example.org/web").await;

    // The agent restarts as a service manager restarts it: same config,
    // no new token.
    agent.kill();
    let mut agent = start_agent(2, None);
    agent
        .wait_healthy(&agent_bin, &agent_socket, Duration::from_secs(30))
        .await;
    assert!(
        agent.log().contains("SVID loaded"),
        "the agent did not keep its node identity:\n{}",
        agent.log()
    );
    wait_svid(&agent_bin, &agent_socket, "spiffe://example.org/web").await;

    // And the server: the same CA afterwards (KeyManager disk).
    server.kill();
    let mut server = start_server(2);
    server
        .wait_healthy(&server_bin, &server_socket, Duration::from_secs(30))
        .await;
    assert_eq!(cli(&["bundle", "show"]).await, bundle_before);
}

/// Waits until `spire-agent api fetch x509` shows `id`.
async fn wait_svid(agent_bin: &Path, socket: &Path, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = tokio::process::Command::new(agent_bin)
            .args(["api", "fetch", "x509", "-timeout", "3s", "-socketPath"])
            .arg(socket)
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains(id) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no SVID {id}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
