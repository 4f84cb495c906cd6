//! The tracing span of one connection: tunnel, kind, client address,
//! upstream and peer SPIFFE ID (and, for `present = "caller"`, the local
//! caller's uid, pid and SPIFFE ID), made only when something is logged.
//!
//! A span entered for a connection's whole life costs a few per cent of
//! new connections/s (its fields are formatted when it is made, and it is
//! entered and left on every poll; 2 to 5 % in A/B runs), and at the
//! default level nothing is
//! logged for a connection that succeeds. So unless `debug` is on for the
//! proxy or the tunnel writes an access log, a connection runs without a
//! span and [`ConnSpan::in_scope`] makes one, with the same fields, around
//! each line that is written (refusals, warnings): the output is the same
//! either way.
//!
//! `multiplexed` says whether the tunnelled connection is a stream of a
//! pooled HTTP/2 connection (`true`) or has a TLS connection of its own.

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
    multiplexed: Option<bool>,
    caller: Option<CallerFields>,
}

/// Who the local caller is (`present = "caller"`).
#[derive(Debug, Clone, Default)]
struct CallerFields {
    uid: u32,
    pid: Option<i32>,
    id: Option<String>,
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
            multiplexed: None,
            caller: None,
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
            multiplexed = field::Empty,
            caller_uid = field::Empty,
            caller_pid = field::Empty,
            caller_id = field::Empty,
        )
    }

    /// The local process this connection is from (`present = "caller"`).
    pub fn set_caller(&mut self, uid: u32, pid: Option<i32>) {
        let fields = self.caller.get_or_insert_with(CallerFields::default);
        fields.uid = uid;
        fields.pid = pid;
        if !self.live.is_none() {
            // Recording a field twice would show it twice.
            self.live.record("caller_uid", uid);
            if let Some(pid) = pid {
                self.live.record("caller_pid", pid);
            }
        }
    }

    /// The SPIFFE ID presented on the caller's behalf.
    pub fn set_caller_id(&mut self, id: &SpiffeId) {
        let fields = self.caller.get_or_insert_with(CallerFields::default);
        fields.id = Some(id.to_string());
        if !self.live.is_none() {
            self.live.record("caller_id", field::display(id));
        }
    }

    fn record_caller(span: &Span, fields: &CallerFields) {
        span.record("caller_uid", fields.uid);
        if let Some(pid) = fields.pid {
            span.record("caller_pid", pid);
        }
        if let Some(id) = &fields.id {
            span.record("caller_id", field::display(id));
        }
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

    /// Whether this connection is a stream of a multiplexed connection.
    pub fn set_multiplexed(&mut self, multiplexed: bool) {
        if self.live.is_none() {
            self.multiplexed = Some(multiplexed);
        } else {
            self.live.record("multiplexed", multiplexed);
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
        if let Some(multiplexed) = self.multiplexed {
            span.record("multiplexed", multiplexed);
        }
        if let Some(caller) = &self.caller {
            Self::record_caller(&span, caller);
        }
        span.in_scope(log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// Everything written to it, shared with the test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line `log` writes about a connection whose span is `live` or
    /// made lazily, without its timestamp.
    fn line_with(live: bool) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let client: SocketAddr = "127.0.0.1:4000".parse().unwrap();
            let mut span = ConnSpan::new(live, "web", "outbound", client);
            let _entered = span.live().entered();
            span.set_upstream("127.0.0.1:8443".parse().unwrap());
            span.set_peer_id("spiffe://example.org/api");
            span.set_multiplexed(true);
            span.set_caller(1001, Some(4242));
            span.set_caller_id(&crate::spiffe_id::parse("spiffe://example.org/billing").unwrap());
            span.in_scope(|| tracing::info!(result = "denied", "connection refused"));
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn a_line_carries_the_same_fields_whether_the_span_is_live_or_lazy() {
        let lazy = line_with(false);
        assert_eq!(lazy, line_with(true));
        for field in [
            "conn{tunnel=web kind=\"outbound\" client=127.0.0.1:4000 upstream=127.0.0.1:8443 peer_id=spiffe://example.org/api multiplexed=true caller_uid=1001 caller_pid=4242 caller_id=spiffe://example.org/billing}",
            "connection refused result=\"denied\"",
        ] {
            assert!(lazy.contains(field), "{field} missing in {lazy}");
        }
    }

    #[test]
    fn without_a_line_no_span_is_made() {
        let client: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let mut span = ConnSpan::new(false, "web", "inbound", client);
        span.set_peer_id("spiffe://example.org/web");
        assert!(span.live().is_none());
    }
}
