//! The upstream balancer over real loopback sockets: retry past a dead
//! upstream, ejection and recovery, load spreading, and name resolution.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use spiffe_tunnel::config::{Balance, BalanceSettings};
use spiffe_tunnel::proxy::balance::{BalanceError, Balancer, EndpointStatus, Upstream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(5);

/// A listener that accepts and holds every connection, counting them.
struct Server {
    addr: SocketAddr,
    accepted: watch::Receiver<usize>,
    _held: Arc<Mutex<Vec<TcpStream>>>,
}

impl Server {
    async fn start() -> Self {
        Self::on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    fn on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let (tx, accepted) = watch::channel(0);
        let held = Arc::new(Mutex::new(Vec::new()));
        let keep = Arc::clone(&held);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                keep.lock().await.push(stream);
                tx.send_modify(|n| *n += 1);
            }
        });
        Self {
            addr,
            accepted,
            _held: held,
        }
    }

    fn name(&self) -> String {
        self.addr.to_string()
    }

    fn count(&self) -> usize {
        *self.accepted.borrow()
    }

    /// Waits until at least `n` connections were accepted.
    async fn wait_for(&self, n: usize) {
        let mut rx = self.accepted.clone();
        tokio::time::timeout(DEADLINE, rx.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("{} accepted {} of {n}", self.addr, self.count()))
            .unwrap();
    }
}

/// A loopback port with nothing listening: connects are refused.
fn dead_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn balancer(balance: Balance, upstreams: &[String], health: Option<Duration>) -> Arc<Balancer> {
    Balancer::new(
        "test",
        upstreams,
        &BalanceSettings {
            balance,
            resolve_interval: Duration::from_millis(100),
            health_check_interval: health,
        },
        Duration::from_secs(1),
    )
}

fn status(b: &Balancer, addr: SocketAddr) -> EndpointStatus {
    b.snapshot()
        .into_iter()
        .find(|s| s.addr == addr)
        .unwrap_or_else(|| panic!("{addr} not in {:?}", b.snapshot()))
}

/// Polls `cond` on the balancer's snapshot until it holds or the deadline.
async fn until(b: &Balancer, what: &str, cond: impl Fn(&[EndpointStatus]) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond(&b.snapshot()) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            b.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn skips_a_dead_upstream_without_client_visible_failure() {
    let live = Server::start().await;
    let dead = dead_port();
    let b = balancer(Balance::P2c, &[dead.to_string(), live.name()], None);
    let mut held = Vec::new();
    for _ in 0..10 {
        // Held connections load the live endpoint, so p2c prefers the
        // dead one as soon as it can: the retry is what saves the client.
        let (stream, upstream) = b.connect().await.expect("the retry reaches the live one");
        assert_eq!(upstream.addr(), live.addr);
        held.push((stream, upstream));
    }
    live.wait_for(10).await;
    let dead_status = status(&b, dead);
    assert!(!dead_status.healthy);
    assert_eq!(dead_status.consecutive_failures, 1);
    assert!(dead_status
        .ejected_for
        .is_some_and(|d| d <= Duration::from_secs(1)));
    assert_eq!(dead_status.active, 0);
    let live_status = status(&b, live.addr);
    assert!(live_status.healthy);
    assert_eq!(live_status.active, 10);
}

#[tokio::test]
async fn ejected_endpoint_is_skipped_during_backoff_and_returns_after_it() {
    let a = Server::start().await;
    let c = Server::start().await;
    let b = balancer(Balance::RoundRobin, &[a.name(), c.name()], None);

    // Round robin starts at the first endpoint.
    let (_stream, upstream) = b.connect().await.unwrap();
    assert_eq!(upstream.name(), a.name());
    upstream.report_failure();
    upstream.report_failure(); // the same connection counts once
    let ejected_at = Instant::now();
    drop(upstream);
    a.wait_for(1).await;
    assert_eq!(status(&b, a.addr).consecutive_failures, 1);

    let mut held = Vec::new();
    for _ in 0..20 {
        let (stream, upstream) = b.connect().await.unwrap();
        assert_eq!(upstream.name(), c.name(), "ejected endpoint picked");
        held.push((stream, upstream));
    }
    c.wait_for(20).await;
    assert_eq!(a.count(), 1);

    until(&b, "the backoff to end", |s| s.iter().all(|e| e.healthy)).await;
    assert!(ejected_at.elapsed() >= Duration::from_millis(900));
    // Back in rotation: two more connections reach both.
    for _ in 0..2 {
        held.push(b.connect().await.unwrap());
    }
    a.wait_for(2).await;
    // A TCP connect alone does not end a streak of handshake failures (the
    // endpoint may accept TCP and still drop every handshake); a completed
    // handshake does.
    assert_eq!(status(&b, a.addr).consecutive_failures, 1);
    for (_, upstream) in &held {
        upstream.report_success();
    }
    assert_eq!(status(&b, a.addr).consecutive_failures, 0);
}

#[tokio::test]
async fn active_health_check_ends_an_ejection_early() {
    let live = Server::start().await;
    let dead = dead_port();
    let b = balancer(
        Balance::RoundRobin,
        &[dead.to_string(), live.name()],
        Some(Duration::from_millis(50)),
    );
    let stop = CancellationToken::new();
    b.start(stop.clone());

    // Failed checks lengthen the ejection: three mean four seconds.
    until(&b, "failed health checks", |s| {
        s.iter()
            .any(|e| e.addr == dead && e.consecutive_failures >= 3)
    })
    .await;
    assert!(status(&b, dead).ejected_for.unwrap() > Duration::from_secs(2));
    let revived = Server::on(TcpListener::bind(dead).await.unwrap());
    let revived_at = Instant::now();
    until(&b, "a health check to succeed", |s| {
        s.iter().all(|e| e.healthy)
    })
    .await;
    assert!(revived_at.elapsed() < Duration::from_secs(1));
    assert_eq!(status(&b, dead).consecutive_failures, 0);

    let before = revived.count();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(b.connect().await.unwrap());
    }
    assert!(held.iter().any(|(_, u)| u.addr() == dead));
    revived.wait_for(before + 1).await;
    stop.cancel();
}

#[tokio::test]
async fn p2c_splits_held_load_and_prefers_the_less_loaded() {
    let a = Server::start().await;
    let c = Server::start().await;
    let b = balancer(Balance::P2c, &[a.name(), c.name()], None);
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(b.connect().await.unwrap());
    }
    let on_a = held.iter().filter(|(_, u)| u.addr() == a.addr).count();
    assert!((12..=28).contains(&on_a), "{on_a} of 40 on one upstream");
    a.wait_for(on_a).await;
    c.wait_for(40 - on_a).await;
    assert_eq!(status(&b, a.addr).active, on_a);
    assert_eq!(status(&b, c.addr).active, 40 - on_a);

    // Close everything on `a`: new connections go there until it catches up.
    held.retain(|(_, u)| u.addr() != a.addr);
    assert_eq!(status(&b, a.addr).active, 0);
    for _ in 0..10 {
        let (stream, upstream) = b.connect().await.unwrap();
        assert_eq!(upstream.addr(), a.addr, "the busier upstream was picked");
        held.push((stream, upstream));
    }
}

#[tokio::test]
async fn round_robin_alternates_exactly() {
    let servers = [
        Server::start().await,
        Server::start().await,
        Server::start().await,
    ];
    let names: Vec<String> = servers.iter().map(Server::name).collect();
    let b = balancer(Balance::RoundRobin, &names, None);
    let mut picked = Vec::new();
    for _ in 0..9 {
        let (_stream, upstream) = b.connect().await.unwrap();
        picked.push(upstream.name().to_string());
    }
    assert_eq!(&picked[..3], &names[..]);
    assert_eq!(picked[..3], picked[3..6]);
    assert_eq!(picked[..3], picked[6..]);
}

#[tokio::test]
async fn all_dead_fails_naming_each_reason() {
    let (d1, d2) = (dead_port(), dead_port());
    let b = balancer(Balance::P2c, &[d1.to_string(), d2.to_string()], None);
    for _ in 0..2 {
        // The second round tries them although both are ejected.
        match b.connect().await {
            Err(BalanceError::AllFailed(reason)) => {
                assert!(reason.contains(&d1.to_string()), "{reason}");
                assert!(reason.contains(&d2.to_string()), "{reason}");
                assert!(reason.to_lowercase().contains("refused"), "{reason}");
            }
            other => panic!("expected AllFailed, got {other:?}"),
        }
    }
    assert!(b.snapshot().iter().all(|s| !s.healthy && s.active == 0));

    // A single upstream has nowhere to retry: one reason, no repeat.
    let b = balancer(Balance::RoundRobin, &[d1.to_string()], None);
    match b.connect().await {
        Err(e @ BalanceError::AllFailed(_)) => {
            let text = e.to_string();
            assert_eq!(text.matches(&d1.to_string()).count(), 1, "{text}");
        }
        other => panic!("expected AllFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn localhost_name_resolves_on_first_connect() {
    let v4 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = v4.local_addr().unwrap().port();
    let v4 = Server::on(v4);
    // `localhost` may also give ::1; listen there too when the host has
    // IPv6, and otherwise the retry covers it.
    let v6 = TcpListener::bind(("::1", port)).await.ok().map(Server::on);
    let name = format!("localhost:{port}");
    let b = balancer(Balance::RoundRobin, std::slice::from_ref(&name), None);
    assert!(b.snapshot().is_empty(), "names wait for resolution");

    // No `start`: the first connect resolves by itself.
    let (_stream, upstream) = b.connect().await.unwrap();
    assert_eq!(upstream.name(), name);
    assert_eq!(upstream.addr().port(), port);
    let snapshot = b.snapshot();
    assert!(
        snapshot
            .iter()
            .any(|s| s.addr == v4.addr && s.upstream == name),
        "{snapshot:?}"
    );
    match &v6 {
        Some(v6) if upstream.addr().is_ipv6() => v6.wait_for(1).await,
        _ => v4.wait_for(1).await,
    }
}

#[tokio::test]
async fn guard_counts_active_until_dropped() {
    let live = Server::start().await;
    let b = balancer(Balance::P2c, &[live.name()], None);
    let (stream, upstream): (TcpStream, Upstream) = b.connect().await.unwrap();
    let (stream2, upstream2) = b.connect().await.unwrap();
    assert_eq!(status(&b, live.addr).active, 2);
    drop(upstream);
    assert_eq!(status(&b, live.addr).active, 1);
    drop((stream, stream2, upstream2));
    let s = status(&b, live.addr);
    assert_eq!(s.active, 0);
    assert!(s.healthy);
    assert_eq!(s.ejected_for, None);
    assert_eq!(s.consecutive_failures, 0);
    assert_eq!(s.upstream, live.name());
}
