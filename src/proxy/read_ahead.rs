//! One large socket read serving many small ones, under rustls.
//!
//! rustls reads the socket into its record deframer buffer, which it
//! grows by 4 KiB before a read and shrinks back to 4 KiB whenever it is
//! empty. Every message that arrives on a quiet connection is thus read in
//! 4 KiB slices: a 16 KiB TLS record costs five `recv` system calls (a test
//! below measures exactly that), and in a continuous stream it still takes
//! about one call per record. [`ReadAhead`] sits between the TCP socket and
//! tokio-rustls: it reads up to [`READ_AHEAD`] bytes in one call into a
//! buffer of its own and serves rustls's small reads from it, so one socket
//! read brings in a whole message, or several records of a stream.
//!
//! The memory rule is the one of the copy buffers (see [`super::copy`]):
//! the buffer exists only while data is moving, so an idle connection holds
//! none. It is taken when a read has to go to the socket, and given back
//! when it is drained and
//!
//! - the next socket read would block (the connection went quiet), or
//! - the read that filled it was short: the socket had no more to give at
//!   that moment. This also frees it when nobody will read again, as after
//!   rustls has seen the peer's close_notify (a half-closed connection), or
//!   while the copy above waits on a slow destination.
//!
//! A buffer filled to the brim is kept when drained, since more is most
//! likely waiting: a bulk transfer does not allocate per read. End of
//! stream and errors free it too. Live buffers are counted in
//! [`super::copy::buffers_in_use`].
//!
//! Reading ahead only pays when data is streaming. For small messages
//! (requests and responses of a few hundred bytes, the keep-alive case) a
//! read-ahead buffer would be allocated and freed for every message, and
//! measured slower than reading straight into rustls. So the reader adapts:
//! it reads straight into the caller's buffer until such a read fills it
//! completely (more was waiting than the caller could take: bulk data),
//! then reads ahead until a read comes back short or the socket goes quiet.
//!
//! Writes pass straight through: rustls already hands the socket whole
//! records.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::copy::Buffer;

/// How much one socket read asks for: close to four full TLS records (a
/// record is at most 16 KiB of data plus header and tag), in one system
/// call instead of up to sixteen.
pub const READ_AHEAD: usize = 64 * 1024;

/// A reader that fills a [`READ_AHEAD`] buffer from `T` in one read and
/// serves smaller reads from it. Bytes come out exactly as `T` gave them:
/// never reordered, dropped or duplicated; end of stream and errors are
/// reported once everything read before them has been delivered.
pub struct ReadAhead<T> {
    inner: T,
    /// Read from `inner` and not yet handed out: `bytes[pos..]`. `None`
    /// while idle.
    buf: Option<Buffer<'static>>,
    pos: usize,
    /// Data is streaming: read ahead. Off until a direct read fills the
    /// caller's buffer; off again after a short fill (so while `buf` holds
    /// bytes, this says whether its fill was full) or a quiet socket.
    bulk: bool,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: None,
            pos: 0,
            bulk: false,
        }
    }

    /// The wrapped stream, for its addresses and socket options. Reading
    /// from it directly would skip the bytes buffered here.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// The wrapped stream. Reading from it directly would skip the bytes
    /// buffered here.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Bytes read from the stream and not handed out yet.
    fn buffered(&self) -> &[u8] {
        match &self.buf {
            Some(buf) => &buf.bytes[self.pos..],
            None => &[],
        }
    }

    /// Hands out up to `out.remaining()` buffered bytes. A drained buffer
    /// goes at once when its fill was short; a full one is kept for the
    /// next read, which most likely brings more (and frees it if not).
    fn serve(&mut self, out: &mut ReadBuf<'_>) {
        let Some(buf) = self.buf.as_mut() else {
            return;
        };
        let n = out.remaining().min(buf.bytes.len() - self.pos);
        out.put_slice(&buf.bytes[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == buf.bytes.len() {
            self.pos = 0;
            if !self.bulk {
                self.buf = None;
            } else {
                buf.bytes.clear();
            }
        }
    }

    #[cfg(test)]
    fn holds_buffer(&self) -> bool {
        self.buf.is_some()
    }
}

impl<T: fmt::Debug> fmt::Debug for ReadAhead<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadAhead")
            .field("inner", &self.inner)
            .field("buffered", &self.buffered().len())
            .finish()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if !this.buffered().is_empty() {
            this.serve(out);
            return Poll::Ready(Ok(()));
        }
        // Nothing buffered. A caller that asks for as much as a read-ahead
        // would bring gets it directly, without a copy.
        if out.remaining() >= READ_AHEAD {
            this.buf = None;
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        // Not streaming (yet): straight to the caller, no buffer of ours.
        if !this.bulk {
            this.buf = None;
            let (before, wanted) = (out.filled().len(), out.remaining());
            let poll = Pin::new(&mut this.inner).poll_read(cx, out);
            if let Poll::Ready(Ok(())) = poll {
                this.bulk = out.filled().len() - before == wanted;
            }
            return poll;
        }
        let buf = this
            .buf
            .get_or_insert_with(|| Buffer::new(READ_AHEAD, None));
        // The buffer is empty with its full capacity: `read_buf` reads into
        // that capacity without zeroing it first. The future holds no state
        // of its own, so building it anew on each poll is fine.
        match pin!(this.inner.read_buf(&mut buf.bytes)).poll(cx) {
            Poll::Ready(Ok(0)) => {
                // End of stream: nothing more is coming to buffer.
                this.buf = None;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(n)) => {
                this.bulk = n == READ_AHEAD;
                this.serve(out);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                this.buf = None;
                Poll::Ready(Err(e))
            }
            Poll::Pending => {
                // Drained and the socket is empty: idle, so the memory
                // goes. (A pending read put nothing into the buffer.)
                this.buf = None;
                this.bulk = false;
                Poll::Pending
            }
        }
    }
}

crate::write_through::write_through!(inner for [T: AsyncWrite + Unpin] ReadAhead<T>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::copy::tests::{random_bytes, read_randomly, write_randomly};
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Waker;
    use tokio::io::AsyncWriteExt;

    /// One step of a [`Script`]ed reader.
    enum Step {
        Data(Vec<u8>),
        Pending,
        Fail(io::ErrorKind),
    }

    /// A reader that plays its steps in order, then reports end of stream,
    /// and records how much room each read offered it.
    struct Script {
        steps: VecDeque<Step>,
        offered: Vec<usize>,
    }

    impl Script {
        fn new(steps: impl IntoIterator<Item = Step>) -> Self {
            Self {
                steps: steps.into_iter().collect(),
                offered: Vec::new(),
            }
        }
    }

    impl AsyncRead for Script {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.offered.push(buf.remaining());
            match this.steps.pop_front() {
                None => Poll::Ready(Ok(())),
                Some(Step::Pending) => Poll::Pending,
                Some(Step::Fail(kind)) => Poll::Ready(Err(kind.into())),
                Some(Step::Data(mut data)) => {
                    let n = data.len().min(buf.remaining());
                    buf.put_slice(&data[..n]);
                    if n < data.len() {
                        this.steps.push_front(Step::Data(data.split_off(n)));
                    }
                    Poll::Ready(Ok(()))
                }
            }
        }
    }

    /// One read of up to `room` bytes, polled once.
    fn read_once<T: AsyncRead + Unpin>(
        r: &mut ReadAhead<T>,
        room: usize,
    ) -> Poll<io::Result<Vec<u8>>> {
        let mut space = vec![0u8; room];
        let mut buf = ReadBuf::new(&mut space);
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(r).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().to_vec())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn data(r: Poll<io::Result<Vec<u8>>>) -> Vec<u8> {
        match r {
            Poll::Ready(Ok(bytes)) => bytes,
            other => panic!("expected data, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn random_stream_through_tiny_reads() {
        // A big pipe lets whole 64 KiB reads happen, a small one makes
        // every read short: both must deliver the same bytes in order.
        for (capacity, seed) in [(256 * 1024, 10), (1000, 20)] {
            let sent = random_bytes(seed, 2 * 1024 * 1024 + 5);
            let (mut writer, reader) = tokio::io::duplex(capacity);
            let writing = {
                let sent = sent.clone();
                tokio::spawn(
                    async move { write_randomly(&mut writer, &sent, seed + 1, 50_000).await },
                )
            };
            let mut reader = ReadAhead::new(reader);
            let got = read_randomly(&mut reader, seed + 2, 4096).await;
            writing.await.unwrap();
            assert_eq!(got.len(), sent.len(), "capacity {capacity}");
            assert!(got == sent, "bytes differ (capacity {capacity})");
            assert!(!reader.holds_buffer(), "end of stream keeps a buffer");
        }
    }

    #[test]
    fn large_reads_go_straight_to_the_caller() {
        let chunk = random_bytes(30, 100_000);
        let mut r = ReadAhead::new(Script::new([
            Step::Data(chunk.clone()),
            Step::Data(chunk.clone()),
        ]));
        let first = data(read_once(&mut r, 80_000));
        assert!(first == chunk[..80_000], "first read");
        assert!(!r.holds_buffer(), "a large read was buffered");
        let second = data(read_once(&mut r, 2 * READ_AHEAD));
        assert!(second == chunk[80_000..], "second read");
        assert!(!r.holds_buffer());
        // The inner reader saw the caller's own buffers, not ours.
        assert_eq!(r.get_ref().offered, [80_000, 2 * READ_AHEAD]);
    }

    #[test]
    fn a_large_read_after_small_ones_gets_the_buffered_bytes_first() {
        let stream = random_bytes(31, 200_000);
        let mut r = ReadAhead::new(Script::new([Step::Data(stream.clone())]));
        // The first read goes straight to the caller; it comes back full,
        // so the next one reads ahead.
        let mut got = data(read_once(&mut r, 100));
        got.extend(data(read_once(&mut r, 100)));
        assert_eq!(r.get_ref().offered, [100, READ_AHEAD], "one read-ahead");
        // The rest of the read-ahead comes first, even to a big reader...
        got.extend(data(read_once(&mut r, 2 * READ_AHEAD)));
        assert_eq!(got.len(), 100 + READ_AHEAD);
        // ...and only then the stream again, directly.
        got.extend(data(read_once(&mut r, 2 * READ_AHEAD)));
        got.extend(data(read_once(&mut r, 2 * READ_AHEAD)));
        assert!(got == stream, "bytes reordered or lost");
        assert!(
            data(read_once(&mut r, 2 * READ_AHEAD)).is_empty(),
            "end of stream"
        );
    }

    #[test]
    fn a_full_buffer_is_kept_until_the_socket_goes_quiet() {
        let stream = random_bytes(32, 4096 + READ_AHEAD * 2);
        let mut r = ReadAhead::new(Script::new([
            Step::Data(stream[..4096 + READ_AHEAD].to_vec()),
            Step::Data(stream[4096 + READ_AHEAD..].to_vec()),
            Step::Pending,
        ]));
        // A full direct read first: data is streaming.
        let mut got = data(read_once(&mut r, 4096));
        assert!(!r.holds_buffer());
        while got.len() < 4096 + READ_AHEAD {
            got.extend(data(read_once(&mut r, 4096)));
        }
        // Drained, but it was full: more is probably coming, keep it.
        assert!(r.holds_buffer());
        while got.len() < 4096 + 2 * READ_AHEAD {
            got.extend(data(read_once(&mut r, 4096)));
            assert!(r.holds_buffer(), "bulk data must not reallocate");
        }
        assert_eq!(r.get_ref().offered, [4096, READ_AHEAD, READ_AHEAD]);
        assert!(read_once(&mut r, 4096).is_pending());
        assert!(!r.holds_buffer(), "an idle reader keeps its buffer");
        assert!(got == stream);
    }

    #[test]
    fn a_short_fill_is_freed_once_drained() {
        let mut r = ReadAhead::new(Script::new([Step::Data(b"0123456789abc".to_vec())]));
        // A full direct read, so the next one reads ahead.
        assert_eq!(data(read_once(&mut r, 3)), b"012");
        assert_eq!(data(read_once(&mut r, 4)), b"3456");
        assert!(r.holds_buffer(), "bytes still waiting");
        assert_eq!(data(read_once(&mut r, 4096)), b"789abc");
        // Nothing more read from the socket, yet nothing held either.
        assert!(!r.holds_buffer());
        assert_eq!(r.get_ref().offered, [3, READ_AHEAD]);
        // And the short fill ended streaming: the next read is direct.
        assert!(data(read_once(&mut r, 4096)).is_empty(), "end of stream");
        assert_eq!(r.get_ref().offered, [3, READ_AHEAD, 4096]);
    }

    #[test]
    fn end_of_stream_and_errors_come_after_the_buffered_bytes() {
        let mut r = ReadAhead::new(Script::new([Step::Data(b"abcdefgh".to_vec())]));
        let mut got = Vec::new();
        for _ in 0..3 {
            got.extend(data(read_once(&mut r, 3)));
        }
        assert_eq!(got, b"abcdefgh");
        assert!(data(read_once(&mut r, 3)).is_empty(), "end of stream");
        assert!(data(read_once(&mut r, 3)).is_empty(), "still the end");
        assert!(!r.holds_buffer());

        let mut r = ReadAhead::new(Script::new([
            Step::Data(b"abcdefgh".to_vec()),
            Step::Fail(io::ErrorKind::ConnectionReset),
        ]));
        let mut got = Vec::new();
        for _ in 0..3 {
            got.extend(data(read_once(&mut r, 3)));
        }
        assert_eq!(got, b"abcdefgh");
        match read_once(&mut r, 3) {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
            other => panic!("expected the error, got {other:?}"),
        }
        assert!(!r.holds_buffer());
    }

    #[test]
    fn a_held_buffer_is_counted() {
        let mut r = ReadAhead::new(Script::new([Step::Data(vec![7; 100]), Step::Pending]));
        assert!(!r.holds_buffer(), "a new reader holds a buffer");
        assert_eq!(data(read_once(&mut r, 5)).len(), 5);
        assert!(!r.holds_buffer(), "a direct read took a buffer");
        assert_eq!(data(read_once(&mut r, 5)).len(), 5);
        assert!(r.holds_buffer());
        // Other tests run in parallel and hold buffers of their own; ours
        // is in the count while we hold it.
        assert!(crate::proxy::copy::buffers_in_use() >= 1);
        assert_eq!(data(read_once(&mut r, 1000)).len(), 90);
        assert!(read_once(&mut r, 10).is_pending());
        assert!(!r.holds_buffer());
    }

    // ---- a real TLS session over loopback TCP ----

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{
        CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
    };
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// Accepts any server certificate: the test is about bytes, not trust.
    #[derive(Debug)]
    struct AcceptAny(rustls::crypto::WebPkiSupportedAlgorithms);

    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(m, c, d, &self.0)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(m, c, d, &self.0)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_schemes()
        }
    }

    fn tls_pair() -> (TlsAcceptor, TlsConnector) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let algorithms = provider.signature_verification_algorithms;
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(algorithms)))
            .with_no_client_auth();
        (
            TlsAcceptor::from(Arc::new(server)),
            TlsConnector::from(Arc::new(client)),
        )
    }

    /// Counts the reads that brought data, and the bytes they brought.
    struct Counting<T> {
        inner: T,
        reads: Arc<AtomicUsize>,
        bytes: Arc<AtomicU64>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            let before = buf.filled().len();
            let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
            let n = buf.filled().len() - before;
            if n > 0 {
                this.reads.fetch_add(1, Ordering::Relaxed);
                this.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            poll
        }
    }

    crate::write_through::write_through!(inner for [T: AsyncWrite + Unpin] Counting<T>);

    /// Sends `up` from client to server and `down` back at the same time
    /// over one TLS session on loopback, and returns what each side got.
    async fn exchange<S, C>(
        server: tokio_rustls::server::TlsStream<S>,
        client: tokio_rustls::client::TlsStream<C>,
        up: Arc<Vec<u8>>,
        down: Arc<Vec<u8>>,
    ) -> (
        tokio_rustls::server::TlsStream<S>,
        Vec<u8>,
        tokio_rustls::client::TlsStream<C>,
        Vec<u8>,
    )
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut server_read, mut server_write) = tokio::io::split(server);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        // Whole 64 KiB writes: full 16 KiB records.
        let send_up = tokio::spawn(async move {
            for chunk in up.chunks(64 * 1024) {
                client_write.write_all(chunk).await.unwrap();
            }
            client_write.shutdown().await.unwrap();
            client_write
        });
        let send_down = tokio::spawn(async move {
            write_randomly(&mut server_write, &down, 41, 50_000).await;
            server_write
        });
        let got_up = tokio::spawn(async move {
            let got = read_randomly(&mut server_read, 42, 16 * 1024).await;
            (server_read, got)
        });
        let got_down = tokio::spawn(async move {
            let got = read_randomly(&mut client_read, 43, 16 * 1024).await;
            (client_read, got)
        });
        let client_write = send_up.await.unwrap();
        let server_write = send_down.await.unwrap();
        let (server_read, got_up) = got_up.await.unwrap();
        let (client_read, got_down) = got_down.await.unwrap();
        (
            server_read.unsplit(server_write),
            got_up,
            client_read.unsplit(client_write),
            got_down,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tls_round_trip_over_loopback() {
        let (acceptor, connector) = tls_pair();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(ReadAhead::new(tcp)).await.unwrap()
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let client = connector.connect(name, ReadAhead::new(tcp)).await.unwrap();
        let server = accepting.await.unwrap();
        // The socket stays reachable for its addresses and options.
        let (io, _) = server.get_ref();
        assert_eq!(io.get_ref().local_addr().unwrap(), addr);

        let up = Arc::new(random_bytes(50, 4 * 1024 * 1024 + 11));
        let down = Arc::new(random_bytes(51, 3 * 1024 * 1024 + 7));
        let (server, got_up, client, got_down) =
            exchange(server, client, Arc::clone(&up), Arc::clone(&down)).await;
        assert_eq!(got_up.len(), up.len());
        assert!(got_up == *up, "client→server bytes differ");
        assert_eq!(got_down.len(), down.len());
        assert!(got_down == *down, "server→client bytes differ");
        // rustls stops reading after the peer's close_notify; the last,
        // short read-ahead must not stay behind on the connection.
        assert!(!server.get_ref().0.holds_buffer(), "server keeps a buffer");
        assert!(!client.get_ref().0.holds_buffer(), "client keeps a buffer");
    }

    /// A TLS session whose server end reads its socket through `Counting`
    /// and then `wrap`; returns both ends and the counters (data reads,
    /// bytes).
    async fn counted_session<IO>(
        wrap: fn(Counting<TcpStream>) -> IO,
    ) -> (
        tokio_rustls::server::TlsStream<IO>,
        tokio_rustls::client::TlsStream<TcpStream>,
        Arc<AtomicUsize>,
        Arc<AtomicU64>,
    )
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (acceptor, connector) = tls_pair();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reads = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let accepting = {
            let (reads, bytes) = (Arc::clone(&reads), Arc::clone(&bytes));
            tokio::spawn(async move {
                let (inner, _) = listener.accept().await.unwrap();
                let counted = Counting {
                    inner,
                    reads,
                    bytes,
                };
                acceptor.accept(wrap(counted)).await.unwrap()
            })
        };
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let client = connector.connect(name, tcp).await.unwrap();
        let server = accepting.await.unwrap();
        (server, client, reads, bytes)
    }

    /// Sends `count` messages of 16 KiB (one full record each), each
    /// answered before the next, and returns the server's socket reads.
    async fn ping_pong<IO>(wrap: fn(Counting<TcpStream>) -> IO, count: usize) -> usize
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut server, mut client, reads, _) = counted_session(wrap).await;
        let serving = tokio::spawn(async move {
            let mut message = vec![0u8; 16 * 1024];
            for _ in 0..count {
                server.read_exact(&mut message).await.unwrap();
                server.write_all(b"k").await.unwrap();
            }
        });
        let before = reads.load(Ordering::Relaxed);
        let message = random_bytes(70, 16 * 1024);
        let mut ack = [0u8; 1];
        for _ in 0..count {
            client.write_all(&message).await.unwrap();
            client.read_exact(&mut ack).await.unwrap();
        }
        serving.await.unwrap();
        reads.load(Ordering::Relaxed) - before
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_16k_record_costs_two_socket_reads_instead_of_five() {
        let without = ping_pong(|socket| socket, 100).await;
        let with = ping_pong(ReadAhead::new, 100).await;
        // rustls alone reads a record that finds its buffer empty in 4 KiB
        // slices: five reads for 16 KiB plus header and tag.
        assert!(
            without >= 4 * 100,
            "{without} reads without read-ahead: if rustls now reads whole \
             records itself, ReadAhead may have become unnecessary"
        );
        // With it: one direct 4 KiB read that comes back full, then one
        // read-ahead for the rest of the record.
        assert!(with <= 2 * 100, "{with} reads with read-ahead");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_takes_several_records_per_socket_read() {
        let (server, client, reads, bytes) = counted_session(ReadAhead::new).await;
        let up = Arc::new(random_bytes(60, 4 * 1024 * 1024));
        let (_, got_up, _, _) = exchange(server, client, Arc::clone(&up), Arc::default()).await;
        assert!(got_up == *up, "client→server bytes differ");
        let reads = reads.load(Ordering::Relaxed) as u64;
        let bytes = bytes.load(Ordering::Relaxed);
        assert!(bytes > up.len() as u64, "TLS adds overhead");
        // Without read-ahead a stream gets about one record (16 KiB) per
        // read; with it close to READ_AHEAD on loopback.
        assert!(
            bytes / reads > 24 * 1024,
            "{reads} socket reads for {bytes} bytes: {} bytes per read",
            bytes / reads
        );
    }
}
