//! Helpers shared by the integration tests.

pub mod certs;
pub mod fake_api;
pub mod haproxy;
pub mod harness;
pub mod netns;
pub mod pp2;
pub mod probe;
pub mod spire;
pub mod spire_federation;
pub mod spire_nodes;
pub mod targets;
pub mod traffic;
pub mod workload_tunnel;
