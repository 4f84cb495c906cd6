//! How many bytes a TCP socket has written that its peer has not
//! acknowledged yet (what `ss` shows as Send-Q), read from the kernel's
//! sock_diag netlink interface.
//!
//! The tunnel asks when a connection ends in a failure: a reset tells the
//! app that the stream was cut, but a reset also discards whatever the
//! kernel still queues toward the app, so it may only be sent once that
//! queue is empty (see [`super::closing`]).
//!
//! Linux gives this figure three ways: the `SIOCOUTQ` ioctl, the
//! `TCP_INFO` socket option, and sock_diag. The first two take a raw
//! system call with a pointer, which this crate would have to write as
//! `unsafe` (no well-kept crate wraps either safely; nix's generic socket
//! option getter panics when the kernel's `tcp_info` is shorter than
//! libc's). sock_diag is a plain request and answer over a netlink socket,
//! built and parsed by the rust-netlink crates, and asking about one socket
//! by its addresses is a single hash lookup in the kernel however many
//! sockets the host has. `ss` uses the same interface, unprivileged.
//!
//! The same lookup, asked about the other end of a loopback connection,
//! tells [`super::caller`] which local user (and socket inode) opened it.

use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_LISTEN};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

/// "Any socket with these addresses", in a sock_diag request.
const NO_COOKIE: [u8; 8] = [0xff; 8];

/// The kernel's "no such socket".
const ENOENT: i32 = 2;

/// A netlink socket for asking about TCP sockets of this network
/// namespace. Every call is answered before `send` returns, so the socket
/// is non-blocking and a call never waits.
pub struct SendQueueProbe {
    socket: Socket,
    sequence: u32,
    buf: Vec<u8>,
}

impl SendQueueProbe {
    pub fn new() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&NetlinkAddr::new(0, 0))?;
        socket.set_non_blocking(true)?;
        Ok(Self {
            socket,
            sequence: 0,
            buf: vec![0; 8192],
        })
    }

    /// Bytes written on the TCP connection `local` → `peer` that the peer
    /// has not acknowledged yet (sent or not), or `None` when the kernel no
    /// longer has the connection (it was reset or fully closed).
    pub fn unacknowledged(
        &mut self,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> io::Result<Option<u32>> {
        Ok(self.lookup(local, peer)?.map(|found| found.send_queue))
    }

    /// What the kernel knows about the TCP socket whose own address is
    /// `local` and whose peer is `peer` (any state but listening), or
    /// `None` when this network namespace has no such socket.
    pub fn lookup(
        &mut self,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> io::Result<Option<InetResponseHeader>> {
        self.sequence = self.sequence.wrapping_add(1);
        let family = match local.ip() {
            IpAddr::V4(_) => AF_INET,
            IpAddr::V6(_) => AF_INET6,
        };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        header.sequence_number = self.sequence;
        let mut request = NetlinkMessage::new(
            header,
            SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::all(),
                socket_id: SocketId {
                    source_port: local.port(),
                    destination_port: peer.port(),
                    source_address: local.ip(),
                    destination_address: peer.ip(),
                    interface_id: 0,
                    cookie: NO_COOKIE,
                },
            })
            .into(),
        );
        request.finalize();
        let mut out = vec![0u8; request.buffer_len()];
        request.serialize(&mut out);
        self.socket.send(&out, 0)?;

        // Answers to earlier requests that timed out or failed half-way
        // may still be queued: skip anything with another sequence number.
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut rest = self.buf.get(..n).unwrap_or_default();
            while !rest.is_empty() {
                let message = NetlinkMessage::<SockDiagMessage>::deserialize(rest)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let length = usize::try_from(message.header.length).unwrap_or(0);
                if length == 0 {
                    break;
                }
                rest = rest.get(length..).unwrap_or_default();
                if message.header.sequence_number != self.sequence {
                    continue;
                }
                return match message.payload {
                    // Once the connection is gone, the kernel's lookup
                    // falls back to a listener on the same local port (our
                    // own, for an accepted socket): not this connection.
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response))
                        if response.header.state == TCP_LISTEN
                            || response.header.socket_id.destination_port != peer.port() =>
                    {
                        Ok(None)
                    }
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        Ok(Some(response.header))
                    }
                    NetlinkPayload::Error(e) => match e.code.map(|c| -c.get()) {
                        Some(ENOENT) | None => Ok(None),
                        Some(code) => Err(io::Error::from_raw_os_error(code)),
                    },
                    other => Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected sock_diag answer: {other:?}"),
                    )),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket};

    #[tokio::test]
    async fn sees_what_the_peer_has_not_read_and_nothing_once_it_has() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A small receive window, so that most of what is written below
        // cannot be acknowledged while nobody reads.
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let client = socket
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let (local, peer) = (server.local_addr().unwrap(), server.peer_addr().unwrap());
        let mut probe = SendQueueProbe::new().unwrap();
        assert_eq!(probe.unacknowledged(local, peer).unwrap(), Some(0));

        let data = vec![7u8; 4 << 20];
        let writer = tokio::spawn(async move {
            server.write_all(&data).await.unwrap();
            server
        });
        let mut queued = 0;
        for _ in 0..200 {
            queued = probe.unacknowledged(local, peer).unwrap().unwrap();
            if queued > 64 * 1024 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(queued > 64 * 1024, "only {queued} bytes queued");

        let mut client = client;
        let mut got = vec![0u8; 4 << 20];
        client.read_exact(&mut got).await.unwrap();
        let server = writer.await.unwrap();
        let mut left = u32::MAX;
        for _ in 0..200 {
            left = probe.unacknowledged(local, peer).unwrap().unwrap();
            if left == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(left, 0);

        // Reset: the kernel forgets the connection (and the listener on
        // the same port does not stand in for it).
        server.set_zero_linger().unwrap();
        drop(server);
        drop(client);
        let mut gone = Some(0);
        for _ in 0..200 {
            gone = probe.unacknowledged(local, peer).unwrap();
            if gone.is_none() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(gone, None);
    }
}
