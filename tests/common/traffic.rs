#![allow(dead_code)]
//! Traffic through a tunnel while something happens to it (rotations, an
//! agent restart, a CA rotation): new connections back to back, and
//! long-lived connections that echo a ping on demand, with every failure
//! kept for the assertion message.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::harness::roundtrip;

/// A connection kept open through an echo target, pinged on demand.
pub struct Pinger(TcpStream, u32);

impl Pinger {
    pub async fn open(addr: SocketAddr) -> Self {
        let mut p = Pinger(TcpStream::connect(addr).await.unwrap(), 0);
        p.ping().await.expect("first ping");
        p
    }

    /// One message and its echo, within 5 s.
    pub async fn ping(&mut self) -> std::io::Result<()> {
        self.1 += 1;
        let msg = format!("ping {:08}", self.1);
        self.0.write_all(msg.as_bytes()).await?;
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), self.0.read_exact(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no echo"))??;
        if buf != msg.as_bytes() {
            return Err(std::io::Error::other(format!(
                "echo {:?} for {msg:?}",
                String::from_utf8_lossy(&buf)
            )));
        }
        Ok(())
    }

    /// True when the tunnel closed the connection (EOF or reset) within
    /// `timeout`, without sending anything.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(timeout, self.0.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// Runs new connections back to back (and pings the long-lived one) until
/// `done` holds; returns (connections, failures).
pub async fn traffic_until(
    addr: SocketAddr,
    pinger: &mut Pinger,
    deadline: Duration,
    done: impl FnMut() -> bool,
) -> (usize, Vec<String>) {
    traffic_until_paced(addr, pinger, deadline, Duration::ZERO, done).await
}

/// Like [`traffic_until`], with a pause between connections, for runs long
/// enough that back-to-back handshakes would only burn the shared CPU.
pub async fn traffic_until_paced(
    addr: SocketAddr,
    pinger: &mut Pinger,
    deadline: Duration,
    pace: Duration,
    mut done: impl FnMut() -> bool,
) -> (usize, Vec<String>) {
    let start = Instant::now();
    let mut count = 0;
    let mut failures = Vec::new();
    while !done() {
        assert!(
            start.elapsed() < deadline,
            "condition not reached within {deadline:?} ({count} connections, failures {failures:?})"
        );
        let msg = format!("conn {count}");
        match roundtrip(addr, msg.as_bytes()).await {
            Ok(answer) if answer == msg.as_bytes() => {}
            Ok(answer) => {
                failures.push(format!("{msg}: got {:?}", String::from_utf8_lossy(&answer)))
            }
            Err(e) => failures.push(format!("{msg}: {e}")),
        }
        if let Err(e) = pinger.ping().await {
            failures.push(format!("long-lived connection: {e}"));
        }
        count += 1;
        if !pace.is_zero() {
            tokio::time::sleep(pace).await;
        }
    }
    (count, failures)
}

/// When each connection began, and how it went.
type Outcomes = Arc<Mutex<Vec<(Instant, Result<(), String>)>>>;

/// New connections through `addr` in the background, one every `every`,
/// each a round trip through an echo target, until stopped.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    log: Outcomes,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    pub fn start(addr: SocketAddr, every: Duration) -> Self {
        Self::start_with(every, move |n| async move {
            let msg = format!("conn {n}");
            match roundtrip(addr, msg.as_bytes()).await {
                Ok(answer) if answer == msg.as_bytes() => Ok(()),
                Ok(answer) => Err(format!("{msg}: got {:?}", String::from_utf8_lossy(&answer))),
                Err(e) => Err(format!("{msg}: {e}")),
            }
        })
    }

    /// Like [`Traffic::start`], each connection made by the blocking call
    /// `connect(n)` (run on tokio's blocking pool): for clients that live
    /// elsewhere, like the one inside a network namespace (`netns.rs`).
    pub fn start_blocking<F>(every: Duration, connect: F) -> Self
    where
        F: FnMut(u64) -> Result<(), String> + Send + 'static,
    {
        let connect = Arc::new(Mutex::new(connect));
        Self::start_with(every, move |n| {
            let connect = Arc::clone(&connect);
            async move {
                tokio::task::spawn_blocking(move || (connect.lock().unwrap())(n))
                    .await
                    .unwrap_or_else(|e| Err(format!("conn {n}: the client panicked: {e}")))
            }
        })
    }

    fn start_with<F, Fut>(every: Duration, mut connect: F) -> Self
    where
        F: FnMut(u64) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Outcomes = Arc::default();
        let (stop2, log2) = (Arc::clone(&stop), Arc::clone(&log));
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !stop2.load(Ordering::Relaxed) {
                n += 1;
                let at = Instant::now();
                let result = connect(n).await;
                log2.lock().unwrap().push((at, result));
                tokio::time::sleep(every).await;
            }
        });
        Self { stop, log, task }
    }

    /// Connections tried so far.
    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Connections that succeeded so far.
    pub fn ok(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| r.is_ok())
            .count()
    }

    /// When the first failed connection began, and why it failed.
    pub fn first_failure(&self) -> Option<(Instant, String)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .find_map(|(at, r)| r.clone().err().map(|e| (*at, e)))
    }

    /// The failures so far.
    pub fn failures(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, r)| r.clone().err())
            .collect()
    }

    /// Waits until `n` more connections succeeded than now.
    pub async fn wait_more_ok(&self, n: usize, timeout: Duration) {
        let want = self.ok() + n;
        let deadline = Instant::now() + timeout;
        while self.ok() < want {
            assert!(
                Instant::now() < deadline,
                "traffic: fewer than {n} connections succeeded within {timeout:?} (failures: {:?})",
                self.failures()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for 5 more successes, stops, and fails the test if anything
    /// failed (`what`: "connections", "requests"); returns how many were
    /// tried.
    pub async fn finish_clean(self, what: &str) -> usize {
        self.wait_more_ok(5, Duration::from_secs(10)).await;
        let (count, failures, _) = self.stop().await;
        assert!(
            failures.is_empty(),
            "{} of {count} {what} failed: {failures:?}",
            failures.len()
        );
        count
    }

    /// Stops and returns (tried, failures, the longest run of time with
    /// failures only: from the first failure after a success to the next
    /// success).
    pub async fn stop(self) -> (usize, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let log = self.log.lock().unwrap();
        let mut longest = Duration::ZERO;
        let mut failing_since: Option<Instant> = None;
        for (at, result) in log.iter() {
            match (result, failing_since) {
                (Err(_), None) => failing_since = Some(*at),
                (Ok(()), Some(since)) => {
                    longest = longest.max(at.duration_since(since));
                    failing_since = None;
                }
                _ => {}
            }
        }
        if let (Some(since), Some((last, _))) = (failing_since, log.last()) {
            longest = longest.max(last.duration_since(since));
        }
        let failures = log.iter().filter_map(|(_, r)| r.clone().err()).collect();
        (log.len(), failures, longest)
    }
}
