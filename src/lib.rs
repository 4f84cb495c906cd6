//! spiffe-tunnel: zero-trust mTLS tunnels between nodes, authorized by SPIFFE ID.
//!
//! Data flows one way: identity sources ([`identity::files`],
//! [`identity::workload_api`]) → [`identity::IdentityStore`] → TLS configs
//! ([`tls`]) → tunnels ([`proxy`]). [`config`] and [`policy`] describe what
//! to run; [`runtime`] wires it together for `run`; [`commands`] holds the
//! one-shot commands; [`agent`] is the development Workload API server and
//! [`demo`] the guided tour built on it; [`proto`] is the generated
//! Workload API. The binary in `main.rs` only parses the command line
//! ([`cli`]) and dispatches.
#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod cli;
pub mod commands;
pub mod config;
pub mod demo;
pub mod helper;
pub mod identity;
pub mod listen;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod proto;
pub mod proxy;
pub mod runtime;
pub mod spiffe_id;
pub mod timefmt;
pub mod tls;
pub mod upgrade;
mod write_through;
