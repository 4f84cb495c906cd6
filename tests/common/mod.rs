//! Helpers shared by the integration tests.

pub mod agent;
pub mod api_under_test;
pub mod blackhole;
pub mod callers;
pub mod certs;
pub mod fake_api;
pub mod haproxy;
pub mod harness;
pub mod netns;
pub mod node;
pub mod pair;
pub mod peers;
pub mod pp2;
pub mod probe;
pub mod spire;
pub mod spire_federation;
pub mod spire_nodes;
pub mod svid_cases;
pub mod targets;
pub mod traffic;
pub mod upgrade;
pub mod workload_tunnel;
