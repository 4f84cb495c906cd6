//! rustls glue: peer verification ([`verify`], with [`chain_cache`]
//! remembering chains that passed), certificate selection from
//! the identity store ([`resolver`]), session resumption bounded by our
//! identities ([`resumption`]) and the per-tunnel TLS configs built from
//! them ([`config`]).

pub mod chain_cache;
pub mod config;
pub mod resolver;
pub mod resumption;
pub mod verify;
