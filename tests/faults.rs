//! Fault injection under load, every piece a real process over real
//! sockets: the Workload API agent killed and restarted every two seconds,
//! a backend that flaps, a hundred SIGHUPs in a row (and a storm of a
//! hundred more), a file identity replaced with garbage and then with a
//! good file, and an upstream that resets connections mid-stream.
//!
//! Each test keeps traffic running through the fault and then checks:
//! - no panic in any daemon log;
//! - no stuck task: every tunnel is back to 0 live connections, and on
//!   SIGTERM the drain finds every connection finished and the daemon exits
//!   0 well within its drain timeout;
//! - open fds and RSS back near their baseline (see `probe::FD_SLACK` and
//!   `probe::RSS_SLACK_KIB` for the slack and why);
//! - every failure counted in `/metrics` under the right `result` label,
//!   and nothing counted that did not happen.
//!
//! Each prints a summary (and leaves it in `target/tmp/summary-faults-*.txt`).

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent::DevAgent;
use common::certs::Ca;
use common::harness::*;
use common::node::{inbound, only, Node};
use common::pair::{Pair, API, WEB};
use common::probe::*;
use common::targets::{FlappingTarget, ResetTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// The `drain_timeout` every [`Node`] runs with.
const DRAIN: Duration = Duration::from_secs(5);

/// What `finish` found.
struct Finish {
    after: Usage,
    panics: Vec<String>,
    exit: Option<i32>,
    drained: bool,
    stopped_in: Duration,
}

/// The end of a fault test for one daemon: live connections back to 0,
/// resources settled, log free of panics, SIGTERM drains and exits.
/// Nothing is asserted here, so the summary can go out first.
async fn finish(node: &mut Node, tunnels: &[&str], baseline: Usage) -> Finish {
    for t in tunnels {
        wait_active(node.admin, t, 0, Duration::from_secs(10)).await;
    }
    let after = settle_usage(node.pid(), baseline, Duration::from_secs(10)).await;
    let stopping = Instant::now();
    node.daemon.signal("TERM");
    let exit = node.daemon.wait_exit(DRAIN + Duration::from_secs(5)).await;
    let stopped_in = stopping.elapsed();
    let log = node.daemon.log();
    Finish {
        after,
        panics: panic_lines(&log).into_iter().map(String::from).collect(),
        exit,
        drained: log.contains("drained: every connection finished"),
        stopped_in,
    }
}

impl Finish {
    fn describe(&self, baseline: Usage) -> String {
        format!(
            "before {}, after {}; panics {}; SIGTERM: exit {:?} in {:.2} s{}",
            baseline.describe(),
            self.after.describe(),
            self.panics.len(),
            self.exit,
            self.stopped_in.as_secs_f64(),
            if self.drained {
                ", every connection finished"
            } else {
                ", NOT drained cleanly"
            }
        )
    }

    fn assert_clean(&self, what: &str, pid: u32, baseline: Usage) {
        assert!(self.panics.is_empty(), "{what} panicked: {:?}", self.panics);
        assert_near_baseline(what, pid, baseline, self.after);
        assert_eq!(self.exit, Some(0), "{what}: exit code on SIGTERM");
        assert!(
            self.drained,
            "{what}: the drain did not find every connection finished (a stuck task?)"
        );
        assert!(
            self.stopped_in < DRAIN,
            "{what}: took {:?} to stop",
            self.stopped_in
        );
    }
}

// ---------------------------------------------------------------------------
// Traffic

/// Loops of requests running until stopped; each request is a fresh
/// connection.
struct Traffic {
    stop: Arc<AtomicBool>,
    loops: Vec<JoinHandle<(usize, Vec<String>)>>,
}

/// What a traffic run saw.
#[derive(Debug, Default)]
struct Served {
    ok: usize,
    failures: Vec<String>,
}

impl Served {
    fn attempts(&self) -> usize {
        self.ok + self.failures.len()
    }
}

impl Traffic {
    fn start<F, Fut>(loops: usize, request: F) -> Self
    where
        F: Fn(u64) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let loops = (0..loops as u64)
            .map(|l| {
                let (stop, request) = (Arc::clone(&stop), request.clone());
                tokio::spawn(async move {
                    let (mut ok, mut failures) = (0, Vec::new());
                    let mut n = l * 1_000_000;
                    while !stop.load(Ordering::SeqCst) {
                        n += 1;
                        match request(n).await {
                            Ok(()) => ok += 1,
                            Err(e) => failures.push(format!("request {n}: {e}")),
                        }
                        // Leave the two shared cores some room.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    (ok, failures)
                })
            })
            .collect();
        Self { stop, loops }
    }

    async fn stop(self) -> Served {
        self.stop.store(true, Ordering::SeqCst);
        let mut served = Served::default();
        for l in self.loops {
            let (ok, failures) = l.await.unwrap();
            served.ok += ok;
            served.failures.extend(failures);
        }
        served
    }
}

/// One echo round trip over mTLS as `config`'s peer.
async fn tls_request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    n: u64,
) -> Result<(), String> {
    let msg = format!("request {n:08}\n");
    match raw_tls_roundtrip(addr, config, msg.as_bytes()).await {
        Ok(answer) if answer == msg.as_bytes() => Ok(()),
        Ok(answer) => Err(format!("answer {:?}", String::from_utf8_lossy(&answer))),
        Err(e) => Err(e.to_string()),
    }
}

/// One echo round trip in plain TCP (through an outbound).
async fn plain_request(addr: SocketAddr, n: u64) -> Result<(), String> {
    let msg = format!("request {n:08}\n");
    match roundtrip(addr, msg.as_bytes()).await {
        Ok(answer) if answer == msg.as_bytes() => Ok(()),
        Ok(answer) => Err(format!("answer {:?}", String::from_utf8_lossy(&answer))),
        Err(e) => Err(e.to_string()),
    }
}

/// A connection held open across the fault that echoes a ping on demand.
struct LongLived<S> {
    stream: S,
    pings: u32,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> LongLived<S> {
    async fn ping(&mut self) -> Result<(), String> {
        self.pings += 1;
        let msg = format!("ping {:06}", self.pings);
        self.stream
            .write_all(msg.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        self.stream.flush().await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), self.stream.read_exact(&mut buf))
            .await
            .map_err(|_| "no echo within 5 s".to_string())?
            .map_err(|e| e.to_string())?;
        if buf == msg.as_bytes() {
            Ok(())
        } else {
            Err(format!("echo {:?}", String::from_utf8_lossy(&buf)))
        }
    }
}

async fn long_lived_plain(addr: SocketAddr) -> LongLived<TcpStream> {
    let mut l = LongLived {
        stream: TcpStream::connect(addr).await.unwrap(),
        pings: 0,
    };
    l.ping().await.expect("first ping");
    l
}

async fn long_lived_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> LongLived<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls_pki_types::ServerName::try_from("spiffe-tunnel.test").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut l = LongLived {
        stream: tls,
        pings: 0,
    };
    l.ping().await.expect("first ping");
    l
}

fn web_client(ca: &Ca) -> Arc<rustls::ClientConfig> {
    let web = ca.leaf(WEB);
    raw_client_config(Some((&web.chain_pem, &web.key_pem)))
}

fn first_failures(failures: &[String]) -> Vec<&String> {
    failures.iter().take(5).collect()
}

// ---------------------------------------------------------------------------
// The agent killed and restarted every two seconds

async fn start_agent(dir: &Path, socket: &Path, ca_dir: &Path) -> DevAgent {
    let args = ["--id", WEB, "--id", API, "--ttl", "60s", "--ca-dir"];
    let mut args = args.to_vec();
    args.push(ca_dir.to_str().unwrap());
    DevAgent::start(dir, socket, "example.org", &args).await
}

const API_UP: &str = "spiffe_tunnel_workload_api_up";
const UPDATES_OK: &str = "spiffe_tunnel_identity_updates_total{result=\"ok\"}";
const UPDATES_REJECTED: &str = "spiffe_tunnel_identity_updates_total{result=\"rejected\"}";

/// Polls until `series` is exactly `want`.
async fn wait_metric_eq(admin: SocketAddr, series: &str, want: f64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let m = metrics(admin).await;
        if sample(&m, series) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} did not become {want} within {timeout:?}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_and_restarted_every_two_seconds_under_traffic() {
    const CYCLES: usize = 5;
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (socket, ca_dir) = (tmp.path().join("agent.sock"), tmp.path().join("ca"));
    let mut agent = start_agent(tmp.path(), &socket, &ca_dir).await;

    let target = Target::start(TargetMode::Echo).await;
    let Pair {
        mut server,
        mut client,
        out_addr,
        ..
    } = Pair::workload_api(&agent, target.addr)
        .start(tmp.path())
        .await;

    for n in 0..5 {
        plain_request(out_addr, n).await.unwrap();
    }
    let mut long = long_lived_plain(out_addr).await;
    let (base_in, base_out) = (Usage::of(server.pid()), Usage::of(client.pid()));
    let (m_in, m_out) = (server.metrics().await, client.metrics().await);
    let (c_in0, c_out0) = (
        ConnCounts::read(&m_in, "api", "inbound"),
        ConnCounts::read(&m_out, "api", "outbound"),
    );
    let (upd_in0, upd_out0) = (sample(&m_in, UPDATES_OK), sample(&m_out, UPDATES_OK));
    let serial0 = status(server.admin).await["identity"]["svids"][0]["serial"].clone();

    let traffic = Traffic::start(2, move |n| plain_request(out_addr, n));
    let mut long_failures = Vec::new();
    let mut outage = Vec::new();
    let mut agents_seen = 1;
    for cycle in 0..CYCLES {
        let cycle_start = Instant::now();
        let (u_in, u_out) = (
            sample(&server.metrics().await, UPDATES_OK),
            sample(&client.metrics().await, UPDATES_OK),
        );
        // SIGKILL: no goodbye on the stream.
        drop(agent);
        let killed = Instant::now();
        wait_metric_eq(server.admin, API_UP, 0.0, Duration::from_secs(5)).await;
        wait_metric_eq(client.admin, API_UP, 0.0, Duration::from_secs(5)).await;
        if let Err(e) = long.ping().await {
            long_failures.push(format!("cycle {cycle}, agent down: {e}"));
        }
        agent = start_agent(tmp.path(), &socket, &ca_dir).await;
        agents_seen += 1;
        // Both ends reconnect and take the new agent's SVIDs.
        wait_metric(
            server.admin,
            UPDATES_OK,
            u_in + 1.0,
            Duration::from_secs(10),
        )
        .await;
        wait_metric(
            client.admin,
            UPDATES_OK,
            u_out + 1.0,
            Duration::from_secs(10),
        )
        .await;
        wait_metric_eq(server.admin, API_UP, 1.0, Duration::from_secs(5)).await;
        wait_metric_eq(client.admin, API_UP, 1.0, Duration::from_secs(5)).await;
        outage.push(killed.elapsed());
        if let Err(e) = long.ping().await {
            long_failures.push(format!("cycle {cycle}, agent back: {e}"));
        }
        // Pace the kills at one every two seconds.
        if let Some(rest) = Duration::from_secs(2).checked_sub(cycle_start.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
    let served = traffic.stop().await;
    let serial1 = status(server.admin).await["identity"]["svids"][0]["serial"].clone();
    let (m_in, m_out) = (server.metrics().await, client.metrics().await);
    let c_in = ConnCounts::read(&m_in, "api", "inbound").since(&c_in0);
    let c_out = ConnCounts::read(&m_out, "api", "outbound").since(&c_out0);
    let (upd_in, upd_out) = (
        sample(&m_in, UPDATES_OK) - upd_in0,
        sample(&m_out, UPDATES_OK) - upd_out0,
    );
    let long_pings = long.pings;
    drop(long);
    let fin_in = finish(&mut server, &["api"], base_in).await;
    let fin_out = finish(&mut client, &["api"], base_out).await;
    let agent_panics = panic_lines(&agent.daemon.log()).len();

    let mut s = Summary::new(
        "faults-agent-restarts",
        "fault: the Workload API agent SIGKILLed and restarted every 2 s",
    );
    s.line(format!(
        "faults injected: {CYCLES} kills + restarts ({agents_seen} agent processes, one CA dir); outage until both ends had new SVIDs: {}",
        outage
            .iter()
            .map(|d| format!("{:.2}s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    s.line(format!(
        "connections served during the faults: {} of {} ({} failed); long-lived connection: {} pings, {} failed",
        served.ok,
        served.attempts(),
        served.failures.len(),
        long_pings,
        long_failures.len()
    ));
    s.line(format!(
        "metrics: inbound {}; outbound {}; identity updates taken: inbound +{upd_in}, outbound +{upd_out}; SVID serial {serial0} -> {serial1}",
        c_in.describe(),
        c_out.describe()
    ));
    s.line(format!("inbound daemon: {}", fin_in.describe(base_in)));
    s.line(format!("outbound daemon: {}", fin_out.describe(base_out)));
    s.line(format!("agent panics: {agent_panics}"));
    s.line(format!("took {:.1} s", started.elapsed().as_secs_f64()));
    s.emit();

    assert!(
        served.failures.is_empty() && long_failures.is_empty(),
        "traffic failed while the agent restarted: {:?} {long_failures:?}",
        first_failures(&served.failures)
    );
    assert!(served.ok > 50, "only {} requests in", served.ok);
    // Nothing failed, and the metrics say so: only `ok` moved.
    assert_eq!(
        c_in.get("ok"),
        served.ok as f64,
        "inbound: {}",
        c_in.describe()
    );
    assert_eq!(
        c_out.get("ok"),
        served.ok as f64,
        "outbound: {}",
        c_out.describe()
    );
    for result in &RESULTS[1..] {
        assert_eq!(c_in.get(result) + c_out.get(result), 0.0, "{result}");
    }
    assert!(upd_in >= CYCLES as f64 && upd_out >= CYCLES as f64);
    assert_ne!(
        serial0, serial1,
        "the ends never took a restarted agent's SVID"
    );
    assert_eq!(agent_panics, 0);
    fin_in.assert_clean("inbound daemon", server.pid(), base_in);
    fin_out.assert_clean("outbound daemon", client.pid(), base_out);
    drop(agent);
}

// ---------------------------------------------------------------------------
// The backend flaps

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_flaps_failures_are_upstream_errors_and_traffic_recovers() {
    const FLAPS: usize = 8;
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let mut target = FlappingTarget::start().await;
    let in_addr = free_addr();
    let mut node = Node::start(
        tmp.path(),
        &ca.leaf(API),
        "",
        &inbound("api", in_addr, target.addr, &only(WEB), ""),
    )
    .await;
    let config = web_client(&ca);
    for n in 0..3 {
        tls_request(in_addr, Arc::clone(&config), n).await.unwrap();
    }
    let mut long = long_lived_tls(in_addr, Arc::clone(&config)).await;
    let baseline = Usage::of(node.pid());
    let c0 = ConnCounts::read(&node.metrics().await, "api", "inbound");
    let accepts0 = target.accepts();

    let traffic = Traffic::start(2, {
        let config = Arc::clone(&config);
        move |n| tls_request(in_addr, Arc::clone(&config), n)
    });
    let mut long_failures = Vec::new();
    let mut upstream_errors_seen = Vec::new();
    for flap in 0..FLAPS {
        let before = sample(
            &node.metrics().await,
            &conn_series("api", "inbound", "upstream_error"),
        );
        target.down().await;
        // Down until the tunnel has felt it at least once.
        wait_metric(
            node.admin,
            &conn_series("api", "inbound", "upstream_error"),
            before + 1.0,
            Duration::from_secs(5),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await; // a little longer
                                                              // A connection the backend accepted before it went down is not
                                                              // touched by its listener going away.
        if let Err(e) = long.ping().await {
            long_failures.push(format!("flap {flap}: {e}"));
        }
        target.up().await;
        upstream_errors_seen.push(
            sample(
                &node.metrics().await,
                &conn_series("api", "inbound", "upstream_error"),
            ) - before,
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let during = traffic.stop().await;
    // Recovery: back to back successes once the backend is up for good.
    let mut recovered = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut recovery_failures = Vec::new();
    while recovered < 20 {
        assert!(
            Instant::now() < deadline,
            "no recovery: {recovery_failures:?}"
        );
        match tls_request(in_addr, Arc::clone(&config), 9_000_000 + recovered).await {
            Ok(()) => recovered += 1,
            Err(e) => recovery_failures.push(e),
        }
    }
    long.ping()
        .await
        .expect("the long-lived connection after the flaps");
    let long_pings = long.pings;
    drop(long);
    let c = ConnCounts::read(&node.metrics().await, "api", "inbound").since(&c0);
    let accepts = target.accepts() - accepts0;
    let fin = finish(&mut node, &["api"], baseline).await;

    let attempts = during.attempts() + 20 + recovery_failures.len();
    let failures = during.failures.len() + recovery_failures.len();
    let mut s = Summary::new(
        "faults-backend-flaps",
        "fault: the backend's listener flaps down and up",
    );
    s.line(format!(
        "faults injected: {FLAPS} flaps (down >= 200 ms, up 400 ms); upstream_error per flap: {upstream_errors_seen:?}"
    ));
    s.line(format!(
        "connections during the flaps: {} attempted, {} served, {} failed; after: 20 served in a row ({} failed first); long-lived: {} pings, {} failed",
        during.attempts(),
        during.ok,
        during.failures.len(),
        recovery_failures.len(),
        long_pings,
        long_failures.len()
    ));
    s.line(format!(
        "metrics: {} (target accepted {accepts})",
        c.describe()
    ));
    s.line(format!("daemon: {}", fin.describe(baseline)));
    s.line(format!("took {:.1} s", started.elapsed().as_secs_f64()));
    s.emit();

    assert!(long_failures.is_empty(), "{long_failures:?}");
    assert!(during.failures.len() >= FLAPS, "the flaps cost no request?");
    // Every attempt counted exactly once, as ok or upstream_error, and
    // nothing else.
    assert_eq!(
        c.get("ok") + c.get("upstream_error"),
        attempts as f64,
        "{}",
        c.describe()
    );
    assert_eq!(
        c.get("denied") + c.get("handshake_error") + c.get("over_limit") + c.get("no_identity"),
        0.0,
        "{}",
        c.describe()
    );
    // Every request served reached the backend once.
    assert_eq!(accepts, during.ok + 20, "target accepts");
    // A client failure is an upstream_error, except a connection the kernel
    // had queued for the backend when its listener closed: the tunnel's
    // connect succeeded (counted ok), the queued connection was then reset.
    // At most the two traffic loops' connections per flap.
    assert!(
        c.get("upstream_error") <= failures as f64
            && failures as f64 - c.get("upstream_error") <= (2 * FLAPS) as f64,
        "{failures} client failures, {}",
        c.describe()
    );
    fin.assert_clean("inbound daemon", node.pid(), baseline);
}

// ---------------------------------------------------------------------------
// SIGHUP 100 times in a row

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_a_hundred_times_in_a_row_during_traffic() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let in_addr = free_addr();
    std::fs::create_dir_all(tmp.path()).unwrap();
    let policy = tmp.path().join("api.policy");
    // Two policies that both allow web: each reload swaps the policy, and
    // must revoke nothing.
    let policies = [
        format!("{WEB}\n"),
        format!("{WEB}\nspiffe://example.org/ns/batch/*\ndeny spiffe://example.org/intruder\n"),
    ];
    std::fs::write(&policy, &policies[0]).unwrap();
    let mut node = Node::start(
        tmp.path(),
        &ca.leaf(API),
        "",
        &inbound(
            "api",
            in_addr,
            target.addr,
            &only(WEB),
            "policy = \"api.policy\"",
        ),
    )
    .await;
    let config = web_client(&ca);
    for n in 0..3 {
        tls_request(in_addr, Arc::clone(&config), n).await.unwrap();
    }
    let mut long = long_lived_tls(in_addr, Arc::clone(&config)).await;
    let baseline = Usage::of(node.pid());
    let m0 = node.metrics().await;
    let c0 = ConnCounts::read(&m0, "api", "inbound");
    let reload_ok = "spiffe_tunnel_policy_reloads_total{result=\"ok\"}";
    let reload_err = "spiffe_tunnel_policy_reloads_total{result=\"error\"}";
    let revoked = "spiffe_tunnel_connections_revoked_total{tunnel=\"api\",kind=\"inbound\"}";
    let (ok0, err0, rev0) = (
        sample(&m0, reload_ok),
        sample(&m0, reload_err),
        sample(&m0, revoked),
    );

    let traffic = Traffic::start(2, {
        let config = Arc::clone(&config);
        move |n| tls_request(in_addr, Arc::clone(&config), n)
    });
    let mut long_failures = Vec::new();
    // A hundred in a row, each one taken before the next (signals of one
    // kind that arrive together merge into one, so this is the only way to
    // count a hundred reloads).
    let in_a_row = Instant::now();
    for i in 1..=100 {
        std::fs::write(&policy, &policies[i % 2]).unwrap();
        node.daemon.signal("HUP");
        wait_metric(
            node.admin,
            reload_ok,
            ok0 + i as f64,
            Duration::from_secs(10),
        )
        .await;
        if i % 10 == 0 {
            if let Err(e) = long.ping().await {
                long_failures.push(format!("after reload {i}: {e}"));
            }
        }
    }
    let in_a_row = in_a_row.elapsed();
    // Then a storm: a hundred more as fast as `kill` can send them.
    let storm_at = sample(&node.metrics().await, reload_ok);
    for _ in 0..100 {
        node.daemon.signal("HUP");
    }
    wait_metric(
        node.admin,
        reload_ok,
        storm_at + 1.0,
        Duration::from_secs(10),
    )
    .await;
    for n in 0..10 {
        if let Err(e) = tls_request(in_addr, Arc::clone(&config), 8_000_000 + n).await {
            long_failures.push(format!("after the storm: {e}"));
        }
    }
    if let Err(e) = long.ping().await {
        long_failures.push(format!("after the storm: {e}"));
    }
    let served = traffic.stop().await;
    let long_pings = long.pings;
    drop(long);
    let m = node.metrics().await;
    let c = ConnCounts::read(&m, "api", "inbound").since(&c0);
    let (oks, errs, revs) = (
        sample(&m, reload_ok) - ok0,
        sample(&m, reload_err) - err0,
        sample(&m, revoked) - rev0,
    );
    let last_reload = status(node.admin).await["last_reload"]["result"].clone();
    let fin = finish(&mut node, &["api"], baseline).await;

    let mut s = Summary::new(
        "faults-sighup",
        "fault: SIGHUP 100 times in a row, then a storm of 100",
    );
    s.line(format!(
        "faults injected: 100 SIGHUPs one after another ({:.1} s, policy file swapped each time) + 100 at once; reloads counted ok +{oks} (100 + {} from the storm: signals that arrive together merge), error +{errs}; live connections revoked: {revs}",
        in_a_row.as_secs_f64(),
        oks - 100.0
    ));
    s.line(format!(
        "connections served during the reloads: {} of {} ({} failed); long-lived connection: {} pings, {} failed",
        served.ok,
        served.attempts(),
        served.failures.len(),
        long_pings,
        long_failures.len()
    ));
    s.line(format!("metrics: {}", c.describe()));
    s.line(format!("daemon: {}", fin.describe(baseline)));
    s.line(format!("took {:.1} s", started.elapsed().as_secs_f64()));
    s.emit();

    assert!(
        served.failures.is_empty() && long_failures.is_empty(),
        "{:?} {long_failures:?}",
        first_failures(&served.failures)
    );
    assert_eq!(storm_at - ok0, 100.0, "one reload per SIGHUP in a row");
    assert!((101.0..=200.0).contains(&oks), "reloads ok +{oks}");
    assert_eq!(errs, 0.0);
    assert_eq!(revs, 0.0, "a reload that still allows web revoked it");
    assert_eq!(last_reload, "ok");
    assert_eq!(c.get("ok"), (served.ok + 10) as f64, "{}", c.describe());
    for result in &RESULTS[1..] {
        assert_eq!(c.get(result), 0.0, "{result}: {}", c.describe());
    }
    fin.assert_clean("inbound daemon", node.pid(), baseline);
}

// ---------------------------------------------------------------------------
// A file identity replaced with garbage, then with a good file

/// Replaces `path` atomically (write beside, rename over), as rotators do.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_identity_replaced_with_garbage_then_a_good_file() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    let target = Target::start(TargetMode::Echo).await;
    let in_addr = free_addr();
    let first = ca.leaf(API);
    let mut node = Node::start(
        tmp.path(),
        &first,
        "",
        &inbound("api", in_addr, target.addr, &only(WEB), ""),
    )
    .await;
    let (cert, key, bundle) = (
        node.dir.join("svid.pem"),
        node.dir.join("svid.key"),
        node.dir.join("bundle.pem"),
    );
    let config = web_client(&ca);
    for n in 0..3 {
        tls_request(in_addr, Arc::clone(&config), n).await.unwrap();
    }
    let baseline = Usage::of(node.pid());
    let m0 = node.metrics().await;
    let c0 = ConnCounts::read(&m0, "api", "inbound");
    let (rej0, ok0) = (sample(&m0, UPDATES_REJECTED), sample(&m0, UPDATES_OK));
    let rotations = "spiffe_tunnel_svid_rotations_total";
    let rot0 = sample(&m0, rotations);

    let traffic = Traffic::start(2, {
        let config = Arc::clone(&config);
        move |n| tls_request(in_addr, Arc::clone(&config), n)
    });
    let refused_line = "identity files changed but are not valid";
    let reloaded_line = "identity files reloaded";
    let valid_again_line = "identity files are valid again; the identity is unchanged";
    let other_ca = Ca::new("example.org");
    let other_key = other_ca.leaf(API).key_pem;
    let foreign = other_ca.leaf(API); // valid PEM, wrong CA
    let half_pem = &first.chain_pem[..first.chain_pem.len() / 2];
    let garbage: Vec<(&str, &Path, Vec<u8>)> = vec![
        (
            "random bytes as the SVID",
            &cert,
            (0..3000).map(|_| fastrand::u8(..)).collect(),
        ),
        ("a truncated SVID PEM", &cert, half_pem.as_bytes().to_vec()),
        ("an empty SVID file", &cert, Vec::new()),
        (
            "a key that does not match the SVID",
            &key,
            other_key.into_bytes(),
        ),
        (
            "an SVID from a CA outside the bundle",
            &cert,
            foreign.chain_pem.clone().into_bytes(),
        ),
        (
            "garbage as the bundle",
            &bundle,
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
                .to_vec(),
        ),
    ];
    let originals = [
        (cert.clone(), std::fs::read(&cert).unwrap()),
        (key.clone(), std::fs::read(&key).unwrap()),
        (bundle.clone(), std::fs::read(&bundle).unwrap()),
    ];
    let mut refused_steps = Vec::new();
    let mut presented_during_garbage = Vec::new();
    for (i, (what, path, bytes)) in garbage.iter().enumerate() {
        replace(path, bytes);
        node.daemon
            .wait_log(refused_line, i + 1, Duration::from_secs(10))
            .await;
        refused_steps.push(*what);
        // Still serving, with the last good SVID.
        presented_during_garbage.push(presented_cert(in_addr, Arc::clone(&config)).await);
        // Put the good file back (the same one), so the next garbage starts
        // from a valid set.
        // Restoring the same identity is no rotation: it is only logged
        // as valid again.
        let (orig_path, orig) = originals.iter().find(|(p, _)| p == path).unwrap();
        replace(orig_path, orig);
        node.daemon
            .wait_log(valid_again_line, i + 1, Duration::from_secs(10))
            .await;
    }
    // Finally a good new SVID: key and certificate, each replaced whole.
    let second = ca.leaf(API);
    replace(&key, second.key_pem.as_bytes());
    replace(&cert, second.chain_pem.as_bytes());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if presented_cert(in_addr, Arc::clone(&config)).await == second.leaf_der().to_vec() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the good new SVID was never presented:\n{}",
            node.daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let served = traffic.stop().await;
    let m = node.metrics().await;
    let c = ConnCounts::read(&m, "api", "inbound").since(&c0);
    let (rejected, oks, rots) = (
        sample(&m, UPDATES_REJECTED) - rej0,
        sample(&m, UPDATES_OK) - ok0,
        sample(&m, rotations) - rot0,
    );
    let log = node.daemon.log();
    let refusals_logged = log.matches(refused_line).count();
    let reloads_logged = log.matches(reloaded_line).count();
    let fin = finish(&mut node, &["api"], baseline).await;

    let mut s = Summary::new(
        "faults-file-identity",
        "fault: file identity replaced with garbage, then a good file",
    );
    s.line(format!(
        "faults injected: {} garbage sets ({}), each refused and logged; then a good new SVID",
        garbage.len(),
        refused_steps.join("; ")
    ));
    s.line(format!(
        "connections served meanwhile: {} of {} ({} failed); the old SVID presented during every garbage step: {}",
        served.ok,
        served.attempts(),
        served.failures.len(),
        presented_during_garbage.iter().all(|c| *c == first.leaf_der().to_vec())
    ));
    s.line(format!(
        "log: {refusals_logged} refusals, {reloads_logged} reloads; metrics: identity_updates rejected +{rejected}, ok +{oks}; svid_rotations +{rots}; connections {}",
        c.describe()
    ));
    s.line(format!("daemon: {}", fin.describe(baseline)));
    s.line(format!("took {:.1} s", started.elapsed().as_secs_f64()));
    s.emit();

    assert!(
        served.failures.is_empty(),
        "{:?}",
        first_failures(&served.failures)
    );
    assert!(
        presented_during_garbage
            .iter()
            .all(|c| *c == first.leaf_der().to_vec()),
        "garbage changed the SVID presented"
    );
    for result in &RESULTS[1..] {
        assert_eq!(c.get(result), 0.0, "{result}: {}", c.describe());
    }
    // Only the new SVID is a rotation; restoring the same files is not.
    assert_eq!(rots, 1.0, "svid_rotations +{rots}");
    assert_eq!(reloads_logged, 1, "reloads logged");
    fin.assert_clean("inbound daemon", node.pid(), baseline);
    // The contract (docs/operations.md, Metrics): identity updates `ok` or `rejected`
    // (invalid files or Workload API responses).
    assert!(
        rejected >= garbage.len() as f64,
        "spiffe_tunnel_identity_updates_total{{result=\"rejected\"}} moved by {rejected} after {} refused file sets ({refusals_logged} refusals logged)",
        garbage.len()
    );
    assert_eq!(
        oks, 1.0,
        "spiffe_tunnel_identity_updates_total{{result=\"ok\"}} moved by {oks} after {reloads_logged} file reloads"
    );
}

// ---------------------------------------------------------------------------
// The upstream resets connections mid-stream

/// How a client saw its connection end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    /// A clean end of stream (TLS close_notify, or a TCP FIN for plain).
    Eof,
    /// TLS: the TCP connection closed without a close_notify.
    EofWithoutCloseNotify,
    /// A TCP reset.
    Reset,
    /// Any other error.
    Other,
}

fn classify(e: &std::io::Error) -> End {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => End::EofWithoutCloseNotify,
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => End::Reset,
        _ => End::Other,
    }
}

/// Writes `total` bytes (while reading whatever comes back) until the
/// tunnel ends the connection; returns how it ended and how long it took
/// from the first byte.
async fn push_until_closed<S>(stream: S, total: usize) -> Result<(End, Duration), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let started = Instant::now();
    let (mut r, mut w) = tokio::io::split(stream);
    let write = async move {
        let chunk = vec![0x5a; 8192];
        let mut sent = 0;
        while sent < total {
            if w.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        let _ = w.flush().await;
        std::future::pending::<()>().await;
    };
    let read = async move {
        let mut buf = vec![0u8; 16384];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return End::Eof,
                Ok(_) => {}
                Err(e) => return classify(&e),
            }
        }
    };
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            end = read => end,
            () = write => unreachable!(),
        }
    })
    .await
    .map_err(|_| "the tunnel did not close the client side within 10 s".to_string())?;
    Ok((end, started.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_resets_mid_stream_close_the_client_side_and_leak_nothing() {
    const EACH: usize = 20;
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("example.org");
    // Reads 4 KiB of each connection, then resets it.
    let target = ResetTarget::start(4096).await;
    let Pair {
        mut server,
        mut client,
        in_addr,
        out_addr,
        ..
    } = Pair::files(&ca, target.addr).start(tmp.path()).await;
    let config = web_client(&ca);
    // Warm up both, then the baseline.
    for _ in 0..2 {
        let tcp = TcpStream::connect(out_addr).await.unwrap();
        push_until_closed(tcp, 16 * 1024).await.unwrap();
    }
    wait_active(server.admin, "api", 0, Duration::from_secs(5)).await;
    wait_active(client.admin, "api", 0, Duration::from_secs(5)).await;
    let (base_in, base_out) = (Usage::of(server.pid()), Usage::of(client.pid()));
    let (c_in0, c_out0) = (
        ConnCounts::read(&server.metrics().await, "api", "inbound"),
        ConnCounts::read(&client.metrics().await, "api", "outbound"),
    );
    let resets0 = target.resets();
    let copy_errors = |node: &Node| {
        node.daemon
            .log()
            .lines()
            .filter(|l| l.contains("connection closed") && l.contains("end=reset"))
            .count()
    };
    let (errors_in0, errors_out0) = (copy_errors(&server), copy_errors(&client));

    // Three shapes, five at a time: mTLS straight to the inbound with a
    // short write, mTLS with a 1 MiB bulk write, and plain TCP through the
    // outbound (so the inbound's reaction travels one more hop).
    let mut ends: std::collections::BTreeMap<(&str, End), usize> = Default::default();
    let mut slowest = Duration::ZERO;
    let mut failures = Vec::new();
    for (shape, total) in [
        ("mTLS to inbound, 8 KiB", 8192),
        ("mTLS to inbound, 1 MiB", 1 << 20),
        ("plain via outbound, 1 MiB", 1 << 20),
    ] {
        for batch in 0..EACH / 5 {
            let tasks: Vec<_> = (0..5)
                .map(|_| {
                    let config = Arc::clone(&config);
                    tokio::spawn(async move {
                        if shape.starts_with("plain") {
                            let tcp = TcpStream::connect(out_addr)
                                .await
                                .map_err(|e| e.to_string())?;
                            push_until_closed(tcp, total).await
                        } else {
                            let tcp = TcpStream::connect(in_addr)
                                .await
                                .map_err(|e| e.to_string())?;
                            let tls = tokio_rustls::TlsConnector::from(config)
                                .connect(
                                    rustls_pki_types::ServerName::try_from("spiffe-tunnel.test")
                                        .unwrap(),
                                    tcp,
                                )
                                .await
                                .map_err(|e| e.to_string())?;
                            push_until_closed(tls, total).await
                        }
                    })
                })
                .collect();
            for t in tasks {
                match t.await.unwrap() {
                    Ok((end, took)) => {
                        *ends.entry((shape, end)).or_default() += 1;
                        slowest = slowest.max(took);
                    }
                    Err(e) => failures.push(format!("{shape}, batch {batch}: {e}")),
                }
            }
        }
    }
    let resets = target.resets() - resets0;
    let c_in = ConnCounts::read(&server.metrics().await, "api", "inbound").since(&c_in0);
    let c_out = ConnCounts::read(&client.metrics().await, "api", "outbound").since(&c_out0);
    let copy_errors_in = copy_errors(&server) - errors_in0;
    let copy_errors_out = copy_errors(&client) - errors_out0;
    let fin_in = finish(&mut server, &["api"], base_in).await;
    let fin_out = finish(&mut client, &["api"], base_out).await;

    let mut s = Summary::new(
        "faults-upstream-reset",
        "fault: the upstream resets connections mid-stream (SO_LINGER 0)",
    );
    s.line(format!(
        "faults injected: {resets} resets by the target after 4 KiB, {} connections in three shapes",
        3 * EACH
    ));
    for ((shape, end), n) in &ends {
        s.line(format!("  {shape}: {n} x client saw {end:?}"));
    }
    s.line(format!(
        "client side closed by the tunnel within {:.2} s at most; {} client(s) left hanging or failed otherwise",
        slowest.as_secs_f64(),
        failures.len()
    ));
    s.line(format!(
        "metrics: inbound {} ({copy_errors_in} logged as ended by a reset); outbound {} ({copy_errors_out} logged as ended by a reset)",
        c_in.describe(),
        c_out.describe()
    ));
    s.line(format!("inbound daemon: {}", fin_in.describe(base_in)));
    s.line(format!("outbound daemon: {}", fin_out.describe(base_out)));
    s.line(format!("took {:.1} s", started.elapsed().as_secs_f64()));
    s.emit();

    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(resets, 3 * EACH, "the target reset every connection");
    // The connections were set up fine (`ok`); a reset after that is not a
    // connection failure in the result labels the contract defines, and
    // nothing else may be counted.
    assert_eq!(
        c_in.get("ok"),
        (3 * EACH) as f64,
        "inbound: {}",
        c_in.describe()
    );
    assert_eq!(
        c_out.get("ok"),
        EACH as f64,
        "outbound: {}",
        c_out.describe()
    );
    for result in &RESULTS[1..] {
        assert_eq!(c_in.get(result) + c_out.get(result), 0.0, "{result}");
    }
    assert_eq!(
        copy_errors_in,
        3 * EACH,
        "each reset logged as the end of its connection"
    );
    fin_in.assert_clean("inbound daemon", server.pid(), base_in);
    fin_out.assert_clean("outbound daemon", client.pid(), base_out);
}
