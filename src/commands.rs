//! The one-shot commands: `check` and `verify`. Each returns the process
//! exit code and prints for a person, not for a log collector.

use std::path::Path;
use std::time::SystemTime;

use crate::config::{Config, IdentityConfig, MinTls, PolicySpec, TunnelSettings};
use crate::identity::{certs_from_pem, BundleSet, TrustBundle};
use crate::spiffe_id;
use crate::tls::verify::{to_unix_time, verify_svid_chain, PeerRole};

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: runtime failure (and an invalid chain for `verify`).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_USAGE: u8 = 2;

/// `spiffe-tunnel check -c FILE`.
pub fn check(path: &Path) -> u8 {
    match check_report(path) {
        Ok(report) => {
            print!("{report}");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!("{}: configuration is NOT valid", path.display());
            EXIT_USAGE
        }
    }
}

/// Validates everything `run` would load and describes it.
pub fn check_report(path: &Path) -> Result<String, String> {
    use std::fmt::Write;
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let mut out = String::new();
    let _ = writeln!(out, "{}: configuration is valid", path.display());
    match &config.identity {
        IdentityConfig::Files(files) => {
            let identity = files
                .load(&crate::tls::config::provider())
                .map_err(|e| format!("identity files: {e}"))?;
            let _ = writeln!(
                out,
                "identity: files, cert {} and key {}",
                files.cert.display(),
                files.key.display()
            );
            for svid in &identity.svids {
                let _ = writeln!(
                    out,
                    "  SVID {} (serial {}, expires {})",
                    svid.id,
                    svid.serial,
                    humantime::format_rfc3339_seconds(svid.not_after)
                );
            }
            for (td, file) in &files.bundles {
                let count = identity.bundles.get(td).map_or(0, |b| b.certs.len());
                let _ = writeln!(
                    out,
                    "  bundle {td}: {} ({count} CA certificate(s))",
                    file.display()
                );
            }
        }
        IdentityConfig::WorkloadApi {
            socket,
            startup_timeout,
        } => {
            let _ = writeln!(
                out,
                "identity: SPIFFE Workload API at {} (startup timeout {})",
                socket.as_deref().unwrap_or(
                    "$SPIFFE_ENDPOINT_SOCKET or unix:///tmp/spire-agent/public/api.sock"
                ),
                humantime::format_duration(*startup_timeout)
            );
        }
    }
    if let Some(admin) = config.admin.listen {
        let _ = writeln!(out, "admin: {admin}");
    }
    for t in &config.inbound {
        let rules = policy_summary(&t.policy)?;
        let _ = writeln!(
            out,
            "inbound {:?}: mTLS on {} -> plain to {}",
            t.name, t.listen, t.target
        );
        let _ = writeln!(
            out,
            "  presents {}; allows {rules}",
            svid_name(t.svid.as_ref())
        );
        let _ = writeln!(
            out,
            "  {}{}",
            settings_summary(&t.settings),
            if t.proxy_protocol {
                "; PROXY v2 to target"
            } else {
                ""
            }
        );
    }
    for t in &config.outbound {
        let rules = policy_summary(&t.policy)?;
        let _ = writeln!(
            out,
            "outbound {:?}: plain on {} -> mTLS to {}",
            t.name,
            t.listen,
            t.upstreams.join(", ")
        );
        let _ = writeln!(
            out,
            "  presents {}; accepts servers by {rules}",
            svid_name(t.svid.as_ref())
        );
        let _ = writeln!(out, "  {}", settings_summary(&t.settings));
    }
    Ok(out)
}

fn svid_name(svid: Option<&spiffe_id::SpiffeId>) -> String {
    svid.map_or_else(|| "the default SVID".to_string(), |id| id.to_string())
}

fn policy_summary(spec: &PolicySpec) -> Result<String, String> {
    let policy = spec.load().map_err(|e| e.to_string())?;
    let mut s = format!("{} rule(s)", policy.len());
    if let Some(file) = &spec.file {
        s.push_str(&format!(
            " ({} inline, rest from {})",
            spec.inline.len(),
            file.display()
        ));
    }
    Ok(s)
}

fn settings_summary(s: &TunnelSettings) -> String {
    format!(
        "TLS {}; handshake timeout {}, connect timeout {}, idle timeout {}, max {} connections, drain {}",
        match s.min_tls {
            MinTls::Tls13 => "1.3 only",
            MinTls::Tls12 => "1.2 and 1.3",
        },
        humantime::format_duration(s.handshake_timeout),
        humantime::format_duration(s.connect_timeout),
        humantime::format_duration(s.idle_timeout),
        s.max_connections,
        humantime::format_duration(s.drain_timeout),
    )
}

/// `spiffe-tunnel verify --bundle TD=FILE... CHAIN.pem`.
pub fn verify(bundle_args: &[String], chain_path: &Path) -> u8 {
    let mut bundles = BundleSet::new();
    for arg in bundle_args {
        let Some((td, file)) = arg.split_once('=') else {
            eprintln!("--bundle {arg:?}: expected TRUST_DOMAIN=FILE, like example.org=bundle.pem");
            return EXIT_USAGE;
        };
        let trust_domain = match spiffe_id::parse_trust_domain(td) {
            Ok(td) => td,
            Err(e) => {
                eprintln!("--bundle {arg:?}: {e}");
                return EXIT_USAGE;
            }
        };
        let bundle = std::fs::read(file)
            .map_err(|e| e.to_string())
            .and_then(|pem| TrustBundle::from_pem(trust_domain, &pem).map_err(|e| e.to_string()));
        match bundle {
            Ok(b) => bundles.insert(b),
            Err(e) => {
                eprintln!("--bundle {arg:?}: {file}: {e}");
                return EXIT_USAGE;
            }
        }
    }
    let chain = match std::fs::read(chain_path)
        .map_err(|e| e.to_string())
        .and_then(|pem| certs_from_pem(&pem, "chain").map_err(|e| e.to_string()))
    {
        Ok(chain) => chain,
        Err(e) => {
            eprintln!("{}: {e}", chain_path.display());
            return EXIT_USAGE;
        }
    };
    match verify_svid_chain(
        &chain,
        &bundles,
        to_unix_time(SystemTime::now()),
        PeerRole::Any,
    ) {
        Ok(peer) => {
            println!("{}", peer.id);
            eprintln!(
                "valid X509-SVID: serial {}, expires {}",
                peer.serial,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH
                        + std::time::Duration::from_secs(peer.not_after.max(0) as u64)
                )
            );
            EXIT_OK
        }
        Err(e) => {
            println!("invalid: {e}");
            EXIT_FAILURE
        }
    }
}
