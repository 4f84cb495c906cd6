#![allow(dead_code)]
//! Real SPIRE across several nodes, as in production: a `spire-server` in a
//! network namespace of its own, and on every node (a namespace of
//! `netns.rs`, joined by one bridge) a `spire-agent` attested with that
//! node's own join token, dialing the server across the bridge.
//!
//! ```text
//!  "spire" 10.77.0.1        "node1" 10.77.0.2        "node2" 10.77.0.3
//!  spire-server :PORT  ◄──  spire-agent (node1)      spire-agent (node2)
//!                           spiffe-tunnel, app ...   spiffe-tunnel, app ...
//! ```
//!
//! Each agent's join token carries the alias `spiffe://TD/node/NAME`, so a
//! registration entry names the node its workload runs on
//! ([`SpireCluster::entry`]): the same uid on another node gets nothing.
//! Everything in a node runs as root, so the entries select `unix:uid:0`
//! and the node tells workloads apart. The agents' Workload API sockets
//! live in the shared file system ([`SpireCluster::socket`]).
//!
//! Drop order is agents, server, nodes, switch: every SPIRE process is
//! killed before its namespace goes.

use super::netns::{Lan, Node};
use super::spire::{AgentConfig, Entry, ServerConfig, SpireAgent, SpireServer};

pub struct SpireCluster {
    // Field order is drop order.
    /// One per node, in the order of `nodes`.
    pub agents: Vec<SpireAgent>,
    pub server: SpireServer,
    pub nodes: Vec<Node>,
    /// The server's own node ("spire", the first address on the Lan).
    pub server_node: Node,
    pub lan: Lan,
}

impl SpireCluster {
    /// A Lan, the server in node "spire" (`server`'s `bind_address` and
    /// `netns` are set here), then a node per name with its agent
    /// (`agent` for each, with the node's namespace and alias), the agents
    /// started at once.
    pub async fn start(names: &[&str], server: ServerConfig, agent: AgentConfig) -> Self {
        let started = std::time::Instant::now();
        let lan = Lan::new();
        let server_node = lan.node("spire");
        let server = SpireServer::start(ServerConfig {
            bind_address: server_node.ip.to_string(),
            netns: Some(server_node.ns.clone()),
            ..server
        })
        .await;
        let nodes: Vec<Node> = names.iter().map(|name| lan.node(name)).collect();
        let trust_domain = server.config.trust_domain.clone();
        let agents = futures_util::future::join_all(nodes.iter().map(|node| {
            SpireAgent::start(
                &server,
                AgentConfig {
                    netns: Some(node.ns.clone()),
                    node_alias: Some(format!("spiffe://{trust_domain}/node/{}", node.name)),
                    ..agent.clone()
                },
            )
        }))
        .await;
        eprintln!(
            "SPIRE server and {} node agents in namespaces healthy in {:?}",
            agents.len(),
            started.elapsed()
        );
        Self {
            agents,
            server,
            nodes,
            server_node,
            lan,
        }
    }

    /// An entry for `spiffe_id` on node `i` (parented to its alias),
    /// selecting root's processes there.
    pub fn entry(&self, i: usize, spiffe_id: &str) -> Entry {
        Entry::new(spiffe_id, &self.agents[i].parent_id()).uid(0)
    }

    /// Node `i`'s Workload API address.
    pub fn socket(&self, i: usize) -> String {
        self.agents[i].address()
    }
}
