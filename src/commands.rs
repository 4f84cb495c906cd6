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
                    crate::timefmt::rfc3339(svid.not_after)
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
        let _ = writeln!(out, "  presents {}; allows {rules}", t.svid);
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
        let _ = writeln!(out, "  presents {}; accepts servers by {rules}", t.svid);
        let _ = writeln!(out, "  {}", settings_summary(&t.settings));
        if let Some(mux) = &t.multiplex {
            let _ = writeln!(
                out,
                "  multiplexed: up to {} streams per pooled connection, idle connections closed after {}, CONNECT authority {}",
                mux.max_streams_per_connection,
                humantime::format_duration(mux.pool_idle_timeout),
                mux.authority.as_deref().unwrap_or("the upstream address dialled")
            );
        }
    }
    Ok(out)
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
        "TLS {}, session resumption {}; handshake timeout {}, connect timeout {}, idle timeout {}, max {} connections, drain {}",
        match s.min_tls {
            MinTls::Tls13 => "1.3 only",
            MinTls::Tls12 => "1.2 and 1.3",
        },
        if s.session_resumption { "on" } else { "off" },
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
                crate::timefmt::rfc3339(
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

/// `spiffe-tunnel status`: fetches `/status` from the admin endpoint and
/// prints it for a person (or raw with `--json`).
pub fn status(config: Option<&Path>, admin: Option<&str>, raw: bool) -> u8 {
    let address = match (admin, config) {
        (Some(a), _) => a.to_string(),
        (None, Some(path)) => match Config::load(path) {
            Ok(c) => match c.admin.listen {
                Some(addr) => addr.to_string(),
                None => {
                    eprintln!(
                        "{}: no [admin] listen address; add one or pass --admin",
                        path.display()
                    );
                    return EXIT_USAGE;
                }
            },
            Err(e) => {
                eprintln!("{e}");
                return EXIT_USAGE;
            }
        },
        (None, None) => {
            eprintln!("give -c FILE or --admin ADDR");
            return EXIT_USAGE;
        }
    };
    let body = match http_get(&address, "/status") {
        Ok(body) => body,
        Err(e) => {
            eprintln!("cannot read http://{address}/status: {e} (is spiffe-tunnel running with [admin] listen = \"{address}\"?)");
            return EXIT_FAILURE;
        }
    };
    if raw {
        print!("{body}");
        return EXIT_OK;
    }
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(doc) => {
            print!("{}", render_status(&doc));
            EXIT_OK
        }
        Err(e) => {
            eprintln!("http://{address}/status did not answer JSON: {e}");
            EXIT_FAILURE
        }
    }
}

/// A minimal HTTP/1.0 GET for the local admin endpoint.
fn http_get(address: &str, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let addr = address
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("address does not resolve")?;
    let timeout = std::time::Duration::from_secs(5);
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(head.lines().next().unwrap_or_default().to_string());
    }
    Ok(body.to_string())
}

/// The `/status` document as text for a terminal.
pub fn render_status(doc: &serde_json::Value) -> String {
    use std::fmt::Write;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "spiffe-tunnel {} ({}), up since {}",
        s(&doc["version"]),
        s(&doc["config"]),
        s(&doc["started"])
    );
    if doc["ready"].as_bool() == Some(true) {
        let _ = writeln!(out, "READY");
    } else {
        let _ = writeln!(out, "NOT READY:");
        for reason in doc["not_ready_reasons"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "  - {}", s(reason));
        }
    }
    let identity = &doc["identity"];
    let _ = writeln!(out, "\nidentity from {}", s(&identity["source"]));
    if let Some(api) = doc["workload_api"].as_object() {
        let connected = api.get("connected").and_then(|v| v.as_bool()) == Some(true);
        let _ = writeln!(
            out,
            "  Workload API: {}{}",
            if connected {
                "connected"
            } else {
                "disconnected"
            },
            api.get("last_error")
                .and_then(|e| e.as_str())
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        );
    }
    for svid in identity["svids"].as_array().into_iter().flatten() {
        let secs = svid["expires_in_seconds"].as_i64().unwrap_or(0);
        let left = if secs > 0 {
            format!(
                "expires in {}",
                humantime::format_duration(std::time::Duration::from_secs(secs.unsigned_abs()))
            )
        } else {
            "EXPIRED".to_string()
        };
        let _ = writeln!(
            out,
            "  SVID {} serial {} ({left}, at {})",
            s(&svid["spiffe_id"]),
            s(&svid["serial"]),
            s(&svid["not_after"])
        );
    }
    let bundles: Vec<String> = identity["bundles"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            format!(
                "{} ({} CA)",
                s(&b["trust_domain"]),
                b["ca_count"].as_u64().unwrap_or(0)
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "  trusts {}",
        if bundles.is_empty() {
            "nothing".to_string()
        } else {
            bundles.join(", ")
        }
    );
    let _ = writeln!(out, "\ntunnels");
    for t in doc["tunnels"].as_array().into_iter().flatten() {
        let to = t["target"].as_str().map(str::to_string).unwrap_or_else(|| {
            t["upstreams"]
                .as_array()
                .into_iter()
                .flatten()
                .map(&s)
                .collect::<Vec<_>>()
                .join(", ")
        });
        let _ = writeln!(
            out,
            "  {} {:?} {} -> {}: {} active / {} max, {} policy rule(s){}",
            s(&t["kind"]),
            s(&t["name"]),
            s(&t["listen"]),
            to,
            t["active_connections"].as_u64().unwrap_or(0),
            t["max_connections"].as_u64().unwrap_or(0),
            t["policy_rules"].as_u64().unwrap_or(0),
            if t["listening"].as_bool() == Some(false) {
                ", NOT LISTENING"
            } else {
                ""
            },
        );
        for p in t["peers"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "      {} from {} since {}",
                s(&p["peer_id"]),
                s(&p["client"]),
                s(&p["since"])
            );
        }
        if let Some(refusal) = t["last_refusal"].as_str() {
            let _ = writeln!(out, "      last refusal: {refusal}");
        }
    }
    if let Some(r) = doc["last_reload"].as_object() {
        let _ = writeln!(
            out,
            "\nlast reload at {}: {} ({})",
            r.get("at").map(&s).unwrap_or_default(),
            r.get("result").map(&s).unwrap_or_default(),
            r.get("message").map(&s).unwrap_or_default()
        );
    }
    out
}

/// `spiffe-tunnel upgrade`: SIGUSR2 to the pid in `pid_file`, then waits
/// until a new process has rewritten the file (it does so once ready).
pub fn upgrade(pid_file: &Path, timeout: std::time::Duration) -> u8 {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let Some(old) = crate::upgrade::PidFile::read(pid_file) else {
        eprintln!(
            "{}: no pid in it (is spiffe-tunnel running with --pid-file {}?)",
            pid_file.display(),
            pid_file.display()
        );
        return EXIT_FAILURE;
    };
    let alive = |pid: u32| i32::try_from(pid).is_ok_and(|p| kill(Pid::from_raw(p), None).is_ok());
    if let Err(e) = i32::try_from(old)
        .map_err(|_| nix::Error::EINVAL)
        .and_then(|p| kill(Pid::from_raw(p), Signal::SIGUSR2))
    {
        eprintln!("cannot signal process {old}: {e}");
        return EXIT_FAILURE;
    }
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        match crate::upgrade::PidFile::read(pid_file) {
            Some(new) if new != old && alive(new) => {
                println!("upgraded: process {old} handed over to {new}, which is serving; {old} drains and exits");
                return EXIT_OK;
            }
            _ if !alive(old) => {
                eprintln!("process {old} exited and no new process took over");
                return EXIT_FAILURE;
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
    eprintln!(
        "no new process was ready within {}; process {old} keeps serving (its log says why the upgrade failed)",
        humantime::format_duration(timeout)
    );
    EXIT_FAILURE
}
