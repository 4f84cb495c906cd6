//! Multiplexed tunnels: many tunnelled connections as HTTP/2 CONNECT
//! streams over one mTLS connection between two nodes (HBONE's shape).
//!
//! A direct tunnelled connection costs two TCP handshakes and a TLS
//! handshake between the nodes; a stream on a pooled connection costs one
//! round trip of HEADERS. An outbound with `multiplex = true` keeps a
//! [`pool::Pool`] of such connections per upstream and per SVID it
//! presents; every inbound accepts them on its usual port, told apart from
//! direct clients by ALPN (`spiffe-tunnel-h2`, HTTP/2 under a name of its own; a client offering nothing, or anything
//! else, is served directly as before).
//!
//! Security holds per stream, not only per connection:
//! * the peer's identity is the TLS connection's, verified and authorized
//!   at its handshake like any direct connection's;
//! * each stream is authorized again against the policy in force when it
//!   opens ([`server`] on the inbound, [`client`] on the outbound), and
//!   the inbound serves a CONNECT only for its own target;
//! * the connection is in the [`crate::proxy::registry`] like a direct one,
//!   so a reload or bundle change that stops allowing the peer closes it
//!   and every stream on it (each stream's close is a child of it);
//! * the pool never opens a stream on a connection made with an SVID
//!   other than the one we hold now: after a rotation old connections
//!   take no new streams and close once their streams end.
//!
//! The byte stream of one CONNECT is [`stream::H2Stream`]; it plugs into
//! the same copy loop as direct connections.

pub mod client;
pub mod pool;
pub mod server;
pub mod stream;

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

/// The ALPN protocol of a multiplexed connection: HTTP/2, under a name of
/// its own. An inbound serves both modes on one port, so plain `h2` cannot
/// be the switch: curl, browsers and gRPC clients that reach an inbound
/// directly offer `h2` for their own end-to-end HTTP/2, and must get the
/// direct tunnel, not our CONNECT endpoint.
pub const ALPN_MUX: &[u8] = b"spiffe-tunnel-h2";

/// The HTTP/2 receive window of one stream. One stream must move bulk
/// data at full speed: on loopback a window of this size keeps the sender
/// from waiting on WINDOW_UPDATEs. It is credit, not memory: a stream only
/// buffers this much when its plain side stops reading.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// The receive window of a whole connection, shared by its streams: a few
/// streams at full speed at once.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// What h2 buffers per stream for sending beyond the window; the writer
/// waits for capacity above it.
pub const SEND_BUFFER: usize = 1024 * 1024;

/// DATA frames up to this size: fewer frames per 64 KiB copy buffer.
pub const MAX_FRAME: u32 = 64 * 1024;

/// Refused streams a peer may cause in a row before the connection is
/// closed (h2's defence against rapid-reset floods).
pub const MAX_PENDING_RESETS: usize = 64;

/// The header on a refused CONNECT's response that says why.
pub const REFUSAL_HEADER: &str = "spiffe-tunnel-refusal";

/// Presents exactly one certificate: the SVID a pooled connection is made
/// with, so the pool knows which SVID each of its connections carries.
#[derive(Debug)]
pub struct PinnedSvid(pub Arc<CertifiedKey>);

impl ResolvesClientCert for PinnedSvid {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The server side's h2 settings for an inbound that allows `max_streams`
/// streams per connection.
pub fn server_builder(max_streams: u32) -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(max_streams)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(MAX_PENDING_RESETS))
        // A CONNECT carries one :authority and a few headers.
        .max_header_list_size(16 * 1024);
    builder
}

/// The client side's h2 settings.
pub fn client_builder() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_header_list_size(16 * 1024)
        .enable_push(false);
    builder
}
