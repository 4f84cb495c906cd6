#![allow(dead_code)]
//! A TCP hop the test controls: it forwards each connection to a Unix
//! socket until the test turns the connections open so far into a
//! blackhole, where every byte is read and dropped and nothing is ever
//! answered, but no socket is closed, as a host that vanished (or a
//! firewall that started dropping) looks from the other end. Connections
//! opened after that flow again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};
use tokio::sync::watch;

pub struct BlackholeRelay {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Connections numbered below this are blackholed.
    below: watch::Sender<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackholeRelay {
    /// Listens on a loopback port and forwards to the Unix socket `to`.
    pub async fn start(to: PathBuf) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (below, watching) = watch::channel(0usize);
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let number = counter.fetch_add(1, Ordering::SeqCst);
                let to = to.clone();
                let watching = watching.clone();
                tokio::spawn(async move {
                    let Ok(unix) = UnixStream::connect(&to).await else {
                        return;
                    };
                    relay(number, tcp, unix, watching).await;
                });
            }
        });
        Self {
            addr,
            accepted,
            below,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Every connection accepted so far stops forwarding, silently.
    pub fn blackhole_open_connections(&self) {
        self.below.send_replace(self.accepted());
    }
}

impl Drop for BlackholeRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies both ways until connection `number` is blackholed, then reads
/// and drops whatever arrives, for as long as the sockets stay open.
async fn relay(
    number: usize,
    tcp: tokio::net::TcpStream,
    unix: UnixStream,
    mut below: watch::Receiver<usize>,
) {
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let (mut unix_read, mut unix_write) = unix.into_split();
    let mut up = [0u8; 16 << 10];
    let mut down = [0u8; 16 << 10];
    loop {
        if *below.borrow_and_update() > number {
            break;
        }
        tokio::select! {
            changed = below.changed() => if changed.is_err() { return },
            n = tcp_read.read(&mut up) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if unix_write.write_all(&up[..n]).await.is_err() { return },
            },
            n = unix_read.read(&mut down) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if tcp_write.write_all(&down[..n]).await.is_err() { return },
            },
        }
    }
    // The blackhole: the client's bytes are taken (so its kernel sees them
    // acknowledged) and dropped; the server's are never passed on.
    let _keep_open = (unix_read, unix_write, tcp_write);
    loop {
        match tcp_read.read(&mut up).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
