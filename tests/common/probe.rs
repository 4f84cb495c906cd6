#![allow(dead_code)]
//! Looking at a running daemon from the outside, the way an operator
//! would: its admin endpoint (`/metrics`, `/status`), its open file and
//! memory use from `/proc`, its log for panics; and a summary block that a
//! test prints and leaves in `target/tmp/summary-*.txt` for the suite's
//! reader.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw HTTP/1.0 GET with a deadline; returns (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let fetch = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .unwrap_or_else(|_| panic!("admin {addr}{path}: no answer within 10 s"))
        .unwrap_or_else(|e| panic!("admin {addr}{path}: {e}"));
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("admin {addr}{path}: not HTTP: {raw:?}"));
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// The Prometheus text of `/metrics`.
pub async fn metrics(admin: SocketAddr) -> String {
    let (code, body) = http_get(admin, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    body
}

/// The `/status` document.
pub async fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http_get(admin, "/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The value of the sample whose series is exactly `series` (name and
/// label set as exposed), or 0 when there is none.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The series name of one `spiffe_tunnel_connections_total` result.
pub fn conn_series(tunnel: &str, kind: &str, result: &str) -> String {
    format!("spiffe_tunnel_connections_total{{tunnel=\"{tunnel}\",kind=\"{kind}\",result=\"{result}\"}}")
}

/// Every result label of `spiffe_tunnel_connections_total`.
pub const RESULTS: [&str; 6] = [
    "ok",
    "denied",
    "handshake_error",
    "upstream_error",
    "over_limit",
    "no_identity",
];

/// `spiffe_tunnel_connections_total` of one tunnel, per result label.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ConnCounts(pub [f64; 6]);

impl ConnCounts {
    pub fn read(metrics: &str, tunnel: &str, kind: &str) -> Self {
        let mut counts = [0.0; 6];
        for (slot, result) in counts.iter_mut().zip(RESULTS) {
            *slot = sample(metrics, &conn_series(tunnel, kind, result));
        }
        Self(counts)
    }

    pub fn get(&self, result: &str) -> f64 {
        let i = RESULTS.iter().position(|r| *r == result).unwrap();
        self.0[i]
    }

    /// `self - earlier`, per label.
    pub fn since(&self, earlier: &Self) -> Self {
        let mut d = self.0;
        for (x, e) in d.iter_mut().zip(earlier.0) {
            *x -= e;
        }
        Self(d)
    }

    /// "ok=3 handshake_error=12", the non-zero labels only.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = RESULTS
            .iter()
            .zip(self.0)
            .filter(|(_, v)| *v != 0.0)
            .map(|(r, v)| format!("{r}={v}"))
            .collect();
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(" ")
        }
    }
}

/// One tunnel's live connections as `/status` counts them (permits of the
/// connection limit in use: handshakes in progress included).
pub async fn active_connections(admin: SocketAddr, tunnel: &str) -> u64 {
    let status = status(admin).await;
    status["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == tunnel)
        .unwrap_or_else(|| panic!("no tunnel {tunnel} in /status: {status}"))["active_connections"]
        .as_u64()
        .unwrap()
}

/// Polls `/status` until `tunnel` has exactly `want` live connections.
pub async fn wait_active(admin: SocketAddr, tunnel: &str, want: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let now = active_connections(admin, tunnel).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tunnel {tunnel}: {now} live connections, not {want}, after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls `/metrics` until `series` reaches at least `want`; returns it.
pub async fn wait_metric(admin: SocketAddr, series: &str, want: f64, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let m = metrics(admin).await;
        let v = sample(&m, series);
        if v >= want {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {v}, not >= {want}, after {timeout:?}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Open file descriptors and resident memory of a process.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub fds: usize,
    pub rss_kib: u64,
}

impl Usage {
    pub fn of(pid: u32) -> Self {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
            .count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS in /proc/PID/status");
        Self { fds, rss_kib }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} fds, RSS {:.1} MiB",
            self.fds,
            self.rss_kib as f64 / 1024.0
        )
    }
}

/// How far resource use may stay above its baseline once a fault is over.
///
/// File descriptors: every connection holds one or two, so a leak of one
/// per failure shows at once over the hundreds of failures a test causes;
/// 5 allows for what a process may open lazily (a log file rotated, the
/// resolver, an agent socket reconnected). Memory: freed memory is not
/// always handed back to the kernel (glibc keeps per-thread arenas and
/// fragments), so RSS after a burst may sit a few MiB above where it
/// started without any leak; 20 MiB is far above that, and far below what
/// leaking the per-connection state (two 16 KiB copy buffers plus a rustls
/// session each) of the thousands of connections in these tests would cost.
pub const FD_SLACK: usize = 5;
pub const RSS_SLACK_KIB: u64 = 20 * 1024;

/// Waits (up to `timeout`) for the process's fds to come back within
/// [`FD_SLACK`] of `baseline`; returns the use it settled at, or the last
/// seen when they never did, for [`assert_near_baseline`] to judge after
/// the summary is out.
pub async fn settle_usage(pid: u32, baseline: Usage, timeout: Duration) -> Usage {
    let deadline = Instant::now() + timeout;
    loop {
        let now = Usage::of(pid);
        if now.fds <= baseline.fds + FD_SLACK || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fds within [`FD_SLACK`] and RSS within [`RSS_SLACK_KIB`] of `baseline`.
pub fn assert_near_baseline(what: &str, pid: u32, baseline: Usage, after: Usage) {
    assert!(
        after.fds <= baseline.fds + FD_SLACK,
        "{what} (pid {pid}): {} open fds once the fault was over, baseline {} (+{FD_SLACK} allowed): fd leak\n{}",
        after.fds,
        baseline.fds,
        fd_listing(pid)
    );
    assert!(
        after.rss_kib <= baseline.rss_kib + RSS_SLACK_KIB,
        "{what} (pid {pid}): RSS {} KiB once the fault was over, baseline {} KiB (+{RSS_SLACK_KIB} KiB allowed)",
        after.rss_kib,
        baseline.rss_kib
    );
}

/// [`settle_usage`] then [`assert_near_baseline`].
pub async fn wait_back_to_baseline(pid: u32, baseline: Usage, timeout: Duration) -> Usage {
    let settled = settle_usage(pid, baseline, timeout).await;
    assert_near_baseline("daemon", pid, baseline, settled);
    settled
}

/// What a process's fds point at, for a leak report.
pub fn fd_listing(pid: u32) -> String {
    let mut out = String::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in dir.flatten() {
            let target = std::fs::read_link(entry.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let _ = writeln!(out, "  {} -> {target}", entry.file_name().to_string_lossy());
        }
    }
    out
}

/// Lines of a daemon log that report a panic.
pub fn panic_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("panicked")).collect()
}

/// A summary block: printed past the test harness's output capture (so it
/// shows in a passing run) and written to `target/tmp/summary-NAME.txt`.
pub struct Summary {
    name: String,
    text: String,
}

impl Summary {
    pub fn new(name: &str, title: &str) -> Self {
        Self {
            name: name.to_string(),
            text: format!("==== {title} ====\n"),
        }
    }

    pub fn line(&mut self, line: impl AsRef<str>) {
        self.text.push_str("  ");
        self.text.push_str(line.as_ref());
        self.text.push('\n');
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Prints the block and leaves it in a file. Call before the final
    /// assertions, so a failing run shows its figures too.
    pub fn emit(&self) {
        use std::io::Write;
        let _ = std::io::stderr().write_all(self.text.as_bytes());
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::write(dir.join(format!("summary-{}.txt", self.name)), &self.text);
    }
}
