//! The tracing span of one connection: tunnel, kind, client address,
//! upstream and peer SPIFFE ID, made only when something is logged.
//!
//! A span entered for a connection's whole life costs about 5 % of a new
//! connection's CPU (its fields are formatted when it is made, and it is
//! entered and left on every poll), and at the default level nothing is
//! logged for a connection that succeeds. So unless `debug` is on for the
//! proxy or the tunnel writes an access log, a connection runs without a
//! span and [`ConnSpan::in_scope`] makes one, with the same fields, around
//! each line that is written (refusals, warnings): the output is the same
//! either way.

use std::net::SocketAddr;

use tracing::{field, info_span, Span};

use crate::spiffe_id::SpiffeId;

/// The log context of one connection.
pub struct ConnSpan<'t> {
    /// The span the connection runs in from start to end, or none.
    live: Span,
    tunnel: &'t str,
    kind: &'static str,
    client: SocketAddr,
    upstream: Option<SocketAddr>,
    peer_id: Option<String>,
}

impl<'t> ConnSpan<'t> {
    /// `live`: whether the connection runs inside its span throughout
    /// (debug lines or an access log want one); decided by the caller,
    /// where its own module's log level is known.
    pub fn new(live: bool, tunnel: &'t str, kind: &'static str, client: SocketAddr) -> Self {
        let span = if live {
            Self::make(tunnel, kind, client)
        } else {
            Span::none()
        };
        Self {
            live: span,
            tunnel,
            kind,
            client,
            upstream: None,
            peer_id: None,
        }
    }

    fn make(tunnel: &str, kind: &'static str, client: SocketAddr) -> Span {
        info_span!(
            "conn",
            tunnel = %tunnel,
            kind,
            client = %client,
            upstream = field::Empty,
            peer_id = field::Empty,
        )
    }

    /// The span to run the whole connection in (none when made lazily).
    pub fn live(&self) -> Span {
        self.live.clone()
    }

    /// The upstream this connection goes to (outbound).
    pub fn set_upstream(&mut self, upstream: SocketAddr) {
        if self.live.is_none() {
            self.upstream = Some(upstream);
        } else {
            self.live.record("upstream", field::display(upstream));
        }
    }

    /// The peer's SPIFFE ID, once its certificate has shown one.
    pub fn set_peer(&mut self, id: &SpiffeId) {
        if self.live.is_none() {
            self.peer_id = Some(id.to_string());
        } else {
            self.live.record("peer_id", field::display(id));
        }
    }

    /// The same, from its text (a refused certificate's ID).
    pub fn set_peer_id(&mut self, id: &str) {
        if self.live.is_none() {
            self.peer_id = Some(id.to_string());
        } else {
            self.live.record("peer_id", field::display(id));
        }
    }

    /// Runs `log` inside this connection's span: the live one when the
    /// connection runs in it (it is already entered), else one made now.
    pub fn in_scope<R>(&self, log: impl FnOnce() -> R) -> R {
        if !self.live.is_none() {
            return log();
        }
        let span = Self::make(self.tunnel, self.kind, self.client);
        if let Some(upstream) = self.upstream {
            span.record("upstream", field::display(upstream));
        }
        if let Some(id) = &self.peer_id {
            span.record("peer_id", field::display(id));
        }
        span.in_scope(log)
    }
}
