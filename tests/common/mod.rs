//! Helpers shared by the integration tests.

pub mod certs;
pub mod fake_api;
pub mod harness;
pub mod pp2;
