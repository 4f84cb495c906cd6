#![allow(dead_code)]
//! Plain TCP targets for fault and hostile-input tests: an echo target that
//! records every byte it receives per connection (to prove what reached
//! it), one whose listener can be stopped and started again on the same
//! port (a flapping backend), and one that resets connections mid-stream.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

type Received = Arc<Mutex<Vec<Arc<Mutex<Vec<u8>>>>>>;

/// Echoes every byte back and keeps a copy of what each connection sent.
pub struct RecordingTarget {
    pub addr: SocketAddr,
    received: Received,
}

impl RecordingTarget {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received: Received = Arc::default();
        let all = Arc::clone(&received);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Arc::new(Mutex::new(Vec::new()));
                all.lock().unwrap().push(Arc::clone(&log));
                tokio::spawn(echo_recording(stream, log));
            }
        });
        Self { addr, received }
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// What each connection has sent so far, in accept order.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.lock().unwrap().clone())
            .collect()
    }
}

async fn echo_recording(mut stream: TcpStream, log: Arc<Mutex<Vec<u8>>>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                log.lock().unwrap().extend_from_slice(&buf[..n]);
                if stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}

/// An echo target whose listener goes down and up on one port. Going down
/// closes the listener only: connections it already accepted carry on,
/// like a backend that stops accepting during a graceful restart.
pub struct FlappingTarget {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    task: Option<JoinHandle<()>>,
}

impl FlappingTarget {
    /// Starts listening on a fresh loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut target = Self {
            addr,
            accepts: Arc::default(),
            task: None,
        };
        target.serve(listener);
        target
    }

    fn serve(&mut self, listener: TcpListener) {
        let accepts = Arc::clone(&self.accepts);
        self.task = Some(tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                accepts.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        }));
    }

    pub fn is_up(&self) -> bool {
        self.task.is_some()
    }

    /// Closes the listener; returns once the port refuses connections.
    pub async fn down(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens on the same port again (retrying while the kernel still
    /// holds it, with a deadline).
    pub async fn up(&mut self) {
        if self.task.is_some() {
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "cannot bind {} again: {e}",
                        self.addr
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        self.serve(listener);
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

/// Accepts, reads at least `after` bytes (or to EOF), then closes with
/// `SO_LINGER` 0 so the kernel sends a TCP RST instead of a FIN.
pub struct ResetTarget {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
}

impl ResetTarget {
    pub async fn start(after: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let (a, r) = (Arc::clone(&accepts), Arc::clone(&resets));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let r = Arc::clone(&r);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut got = 0;
                    while got < after {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got += n,
                        }
                    }
                    if stream.set_zero_linger().is_ok() {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                    drop(stream);
                });
            }
        });
        Self {
            addr,
            accepts,
            resets,
        }
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// Connections closed with a reset.
    pub fn resets(&self) -> usize {
        self.resets.load(Ordering::SeqCst)
    }
}
