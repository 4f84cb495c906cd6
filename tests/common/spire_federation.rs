#![allow(dead_code)]
//! Two real SPIRE servers federated with each other, the way the SPIRE
//! docs tell an operator to do it: each server serves its bundle on a
//! bundle endpoint (`https_spiffe` profile) and names the other in
//! `federates_with`; the relationship is bootstrapped once by hand with
//! `spire-server bundle show -format spiffe` on one side and `bundle set
//! -format spiffe` on the other; from then on each server fetches the
//! other's bundle from its endpoint by itself.
//!
//! ```ignore
//! let fed = Federation::start(
//!     (ServerConfig { trust_domain: "example.org".into(), ..Default::default() }, AgentConfig::default()),
//!     (ServerConfig { trust_domain: "partner.org".into(), ..Default::default() }, AgentConfig::default()),
//! ).await;
//! fed.a.create_entry(&fed.a.entry(WEB).uid(0).federates_with("spiffe://partner.org")).await;
//! ```
//!
//! # How often bundles move
//!
//! SPIRE refreshes a federated bundle every quarter of the refresh hint the
//! other side's endpoint serves, and never uses a hint under one minute
//! (`bundleutil.MinimumRefreshHint`), so `refresh_hint = "1m"` (set here)
//! means a poll every 15 s. A server's very first poll happens as it starts,
//! before the bootstrap could give it the other side's bundle, so it fails
//! ("local copy of bundle not found") and the next one comes a minute
//! later: the first automatic refresh is about 60 s after the server
//! started, and every 15 s after that. [`SpireServer::wait_bundle_refreshes`]
//! waits for them by the server's log line "Bundle refreshed".

use std::time::Duration;

use serde_json::Value;

use super::harness::free_port;
use super::spire::{wait_for, AgentConfig, ServerConfig, Spire, SpireAgent, SpireServer};

/// What the bundle endpoint serves as its refresh hint: SPIRE's minimum.
pub const REFRESH_HINT: &str = "1m";

/// The `federation { }` block for a server whose bundle endpoint listens
/// on `address:port` and which federates with each `(trust domain, bundle
/// endpoint URL)` in `others` over the `https_spiffe` profile (the other
/// server's own SVID, `spiffe://TD/spire/server`, authenticates it).
pub fn federation_hcl(address: &str, port: u16, others: &[(&str, &str)]) -> String {
    let mut text = format!(
        "    federation {{\n        bundle_endpoint {{\n            address = \"{address}\"\n            port = {port}\n            refresh_hint = \"{REFRESH_HINT}\"\n            profile \"https_spiffe\" {{}}\n        }}\n"
    );
    for (trust_domain, url) in others {
        text.push_str(&format!(
            "        federates_with \"{trust_domain}\" {{\n            bundle_endpoint_url = \"{url}\"\n            bundle_endpoint_profile \"https_spiffe\" {{\n                endpoint_spiffe_id = \"spiffe://{trust_domain}/spire/server\"\n            }}\n        }}\n"
        ));
    }
    text.push_str("    }\n");
    text
}

/// Two trust domains, each with its own server and agent, federated both
/// ways and bootstrapped.
pub struct Federation {
    pub a: Spire,
    pub b: Spire,
}

impl Federation {
    /// Starts both servers at once with bundle endpoints on free loopback
    /// ports and `federates_with` each other (added to any `server_hcl`
    /// they already have), bootstraps each with the other's bundle, then
    /// starts both agents.
    pub async fn start(a: (ServerConfig, AgentConfig), b: (ServerConfig, AgentConfig)) -> Self {
        let started = std::time::Instant::now();
        let (mut server_a, agent_a) = a;
        let (mut server_b, agent_b) = b;
        let (port_a, port_b) = (free_port(), free_port());
        let url = |port: u16| format!("https://127.0.0.1:{port}");
        server_a.server_hcl.push_str(&federation_hcl(
            "127.0.0.1",
            port_a,
            &[(&server_b.trust_domain, &url(port_b))],
        ));
        server_b.server_hcl.push_str(&federation_hcl(
            "127.0.0.1",
            port_b,
            &[(&server_a.trust_domain, &url(port_a))],
        ));
        let (server_a, server_b) =
            tokio::join!(SpireServer::start(server_a), SpireServer::start(server_b));
        server_a
            .set_federated_bundle(&server_b.trust_domain_id(), &server_b.bundle_spiffe().await)
            .await;
        server_b
            .set_federated_bundle(&server_a.trust_domain_id(), &server_a.bundle_spiffe().await)
            .await;
        let (agent_a, agent_b) = tokio::join!(
            SpireAgent::start(&server_a, agent_a),
            SpireAgent::start(&server_b, agent_b)
        );
        let startup = started.elapsed();
        eprintln!("two federated SPIRE servers and their agents healthy in {startup:?}");
        Self {
            a: Spire {
                agent: agent_a,
                server: server_a,
                startup,
            },
            b: Spire {
                agent: agent_b,
                server: server_b,
                startup,
            },
        }
    }
}

/// What the federation tests need of a server, on top of `spire.rs`.
impl SpireServer {
    /// How many X.509 authorities this server holds for the federated
    /// `trust_domain_id` (`bundle list -id`).
    pub async fn federated_ca_count(&self, trust_domain_id: &str) -> usize {
        let json = self
            .cli_json(&["bundle", "list", "-id", trust_domain_id])
            .await;
        json["x509_authorities"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0)
    }

    /// How many times this server has fetched `trust_domain`'s bundle from
    /// its bundle endpoint ("Bundle refreshed" in the log).
    pub fn bundle_refreshes(&self, trust_domain: &str) -> usize {
        let needle = format!("trust_domain={trust_domain}");
        self.log()
            .lines()
            .filter(|l| l.contains("msg=\"Bundle refreshed\"") && l.contains(&needle))
            .count()
    }

    /// Waits until the server has fetched `trust_domain`'s bundle at least
    /// `count` times in all.
    pub async fn wait_bundle_refreshes(&self, trust_domain: &str, count: usize, timeout: Duration) {
        wait_for(
            &format!("{count} refreshes of the {trust_domain} bundle"),
            timeout,
            Duration::from_millis(200),
            || async {
                let seen = self.bundle_refreshes(trust_domain);
                if seen >= count {
                    Ok(())
                } else {
                    Err(format!("{seen} so far"))
                }
            },
        )
        .await
    }
}

/// `spiffe_bundle` (a SPIFFE bundle, JWKS) with its X.509 authorities
/// taken out: what a trust domain that federates JWT-SVIDs only looks like.
pub fn jwt_keys_only(spiffe_bundle: &str) -> String {
    let mut json: Value = serde_json::from_str(spiffe_bundle)
        .unwrap_or_else(|e| panic!("not a SPIFFE bundle ({e}): {spiffe_bundle}"));
    let keys = json["keys"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("no keys in {spiffe_bundle}"));
    keys.retain(|k| k["use"] == "jwt-svid");
    assert!(!keys.is_empty(), "no JWT key in {spiffe_bundle}");
    json.to_string()
}
