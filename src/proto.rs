//! The gRPC APIs we speak, generated at build time (see `build.rs`): the
//! SPIFFE Workload API (messages, client and server, from
//! `proto/workload.proto`) at the top level, and SPIRE's Delegated Identity
//! API of the agent's admin socket under [`spire`], from the files vendored
//! from spire-api-sdk under `proto/spire`.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

include!(concat!(env!("OUT_DIR"), "/_.rs"));

/// The header every Workload API request must carry; servers refuse
/// requests without it so that browsers and SSRF cannot reach the API.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// SPIRE's packages, nested as prost's generated paths expect.
pub mod spire {
    pub mod api {
        pub mod types {
            include!(concat!(env!("OUT_DIR"), "/spire.api.types.rs"));
        }
        pub mod agent {
            pub mod delegatedidentity {
                pub mod v1 {
                    include!(concat!(
                        env!("OUT_DIR"),
                        "/spire.api.agent.delegatedidentity.v1.rs"
                    ));
                }
            }
        }
    }
}
