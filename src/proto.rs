//! The SPIFFE Workload API messages, client and server, generated at build
//! time from `proto/workload.proto` (see `build.rs`).
#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!(concat!(env!("OUT_DIR"), "/_.rs"));

/// The header every Workload API request must carry; servers refuse
/// requests without it so that browsers and SSRF cannot reach the API.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
