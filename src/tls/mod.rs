//! rustls glue: peer verification ([`verify`]), certificate selection from
//! the identity store ([`resolver`]) and the per-tunnel TLS configs built
//! from both ([`config`]).

pub mod config;
pub mod resolver;
pub mod verify;
