//! Helpers shared by the integration tests.

pub mod certs;
pub mod harness;
