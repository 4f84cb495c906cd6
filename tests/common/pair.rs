#![allow(dead_code)]
//! Two tunnel ends facing each other, the setup of most end-to-end tests:
//! a server node whose inbound "api" (presenting [`API`], allowing [`WEB`])
//! stands in front of a target, and a client node whose outbound "api"
//! (presenting [`WEB`], allowing [`API`]) dials it. The identities come
//! from files ([`Pair::files`]) or from a Workload API ([`Pair::workload_api`]);
//! the target is the test's own, so any kind of target fits.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::Path;

use super::agent::DevAgent;
use super::certs::Ca;
use super::harness::free_addr;
use super::node::{inbound, only, outbound, Node};

pub const WEB: &str = "spiffe://example.org/web";
pub const API: &str = "spiffe://example.org/api";

enum Source<'a> {
    Files(&'a Ca),
    WorkloadApi(&'a Path),
}

/// What a [`Pair`] will be; [`PairBuilder::start`] starts it.
pub struct PairBuilder<'a> {
    source: Source<'a>,
    target: String,
    defaults: String,
    inbound_allow: String,
    inbound_extra: String,
    outbound_allow: String,
    outbound_extra: String,
    server_files: Vec<(String, String)>,
}

/// Both nodes and the two tunnel addresses.
pub struct Pair {
    pub server: Node,
    pub client: Node,
    /// Where the server's inbound listens (mTLS).
    pub in_addr: SocketAddr,
    /// Where the client's outbound listens (plain).
    pub out_addr: SocketAddr,
    target: String,
    svid_keys: bool,
}

impl Pair {
    /// File identities issued by `ca`, in front of `target`.
    pub fn files(ca: &Ca, target: impl Display) -> PairBuilder<'_> {
        PairBuilder::new(Source::Files(ca), target)
    }

    /// Identities from `agent` (which must issue [`API`] and [`WEB`]), each
    /// tunnel choosing its SVID with `svid =`.
    pub fn workload_api(agent: &DevAgent, target: impl Display) -> PairBuilder<'_> {
        PairBuilder::new(Source::WorkloadApi(&agent.socket), target)
    }

    /// The server's inbound "api" with other `allow` and `extra` keys.
    pub fn inbound(&self, allow: &str, extra: &str) -> String {
        let extra = self.svid(API, extra);
        inbound("api", self.in_addr, &self.target, allow, &extra)
    }

    /// The client's outbound "api" with other `allow` and `extra` keys.
    pub fn outbound(&self, allow: &str, extra: &str) -> String {
        let extra = self.svid(WEB, extra);
        outbound("api", self.out_addr, self.in_addr, allow, &extra)
    }

    fn svid(&self, id: &str, extra: &str) -> String {
        svid_extra(self.svid_keys, id, extra)
    }
}

fn svid_extra(svid_keys: bool, id: &str, extra: &str) -> String {
    if svid_keys {
        format!("svid = \"{id}\"\n{extra}")
    } else {
        extra.to_string()
    }
}

impl<'a> PairBuilder<'a> {
    fn new(source: Source<'a>, target: impl Display) -> Self {
        Self {
            source,
            target: target.to_string(),
            defaults: String::new(),
            inbound_allow: only(WEB),
            inbound_extra: String::new(),
            outbound_allow: only(API),
            outbound_extra: String::new(),
            server_files: Vec::new(),
        }
    }

    /// More `[defaults]` keys for both nodes.
    pub fn defaults(mut self, keys: &str) -> Self {
        self.defaults = keys.to_string();
        self
    }

    /// The inside of the inbound's `allow` list (default: [`WEB`]).
    pub fn inbound_allow(mut self, allow: &str) -> Self {
        self.inbound_allow = allow.to_string();
        self
    }

    /// More keys of the inbound.
    pub fn inbound_extra(mut self, keys: &str) -> Self {
        self.inbound_extra = keys.to_string();
        self
    }

    /// The inside of the outbound's `allow` list (default: [`API`]).
    pub fn outbound_allow(mut self, allow: &str) -> Self {
        self.outbound_allow = allow.to_string();
        self
    }

    /// More keys of the outbound.
    pub fn outbound_extra(mut self, keys: &str) -> Self {
        self.outbound_extra = keys.to_string();
        self
    }

    /// A file written into the server's folder before it starts (a policy
    /// file the inbound names, say).
    pub fn server_file(mut self, name: &str, contents: &str) -> Self {
        self.server_files
            .push((name.to_string(), contents.to_string()));
        self
    }

    /// Starts the server in `dir/in`, then the client in `dir/out`.
    pub async fn start(self, dir: &Path) -> Pair {
        let (in_addr, out_addr) = (free_addr(), free_addr());
        let (server_dir, client_dir) = (dir.join("in"), dir.join("out"));
        std::fs::create_dir_all(&server_dir).unwrap();
        for (name, contents) in &self.server_files {
            std::fs::write(server_dir.join(name), contents).unwrap();
        }
        let svid_keys = matches!(self.source, Source::WorkloadApi(_));
        let server_tunnels = inbound(
            "api",
            in_addr,
            &self.target,
            &self.inbound_allow,
            &svid_extra(svid_keys, API, &self.inbound_extra),
        );
        let client_tunnels = outbound(
            "api",
            out_addr,
            in_addr,
            &self.outbound_allow,
            &svid_extra(svid_keys, WEB, &self.outbound_extra),
        );
        let (server, client) = match self.source {
            Source::Files(ca) => (
                Node::start(&server_dir, &ca.leaf(API), &self.defaults, &server_tunnels).await,
                Node::start(&client_dir, &ca.leaf(WEB), &self.defaults, &client_tunnels).await,
            ),
            Source::WorkloadApi(socket) => (
                Node::workload_api(&server_dir, socket, &self.defaults, &server_tunnels).await,
                Node::workload_api(&client_dir, socket, &self.defaults, &client_tunnels).await,
            ),
        };
        Pair {
            server,
            client,
            in_addr,
            out_addr,
            target: self.target,
            svid_keys,
        }
    }
}
