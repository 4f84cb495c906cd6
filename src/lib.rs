//! spiffe-tunnel: zero-trust mTLS tunnels between nodes, authorized by SPIFFE ID.
//!
//! Data flows one way: identity sources → [`identity::IdentityStore`] →
//! TLS configs ([`tls`]) → tunnels ([`proxy`]). The binary in `main.rs` only
//! parses the command line and dispatches to [`commands`].
#![forbid(unsafe_code)]

pub mod config;
pub mod identity;
pub mod policy;
pub mod spiffe_id;
pub mod tls;
