#![allow(dead_code)]
//! Real SPIRE for integration tests: a `spire-server` and `spire-agent`
//! v1.13.3 (built from source by `scripts/test`) started in temporary
//! folders on free ports, driven with their own CLIs the way an operator
//! drives them.
//!
//! # What a test gets
//!
//! ```ignore
//! let spire = Spire::start(ServerConfig::default(), AgentConfig::default()).await;
//! let entry = spire.create_entry(&spire.entry(WEB).uid(0).x509_ttl(30)).await;
//! spire.agent.wait_for_ids(0, &[WEB], Duration::from_secs(30)).await;
//! // ... spiffe-tunnel with socket = spire.agent.address() ...
//! spire.server.delete_entry(&entry).await;
//! ```
//!
//! - [`SpireServer`]: SQLite datastore, `join_token` node attestation, an
//!   in-memory or `disk` KeyManager, short TTLs ([`ServerConfig`]), optional
//!   `disk` UpstreamAuthority, and room for extra HCL (federation blocks, a
//!   bundle endpoint) for tests that need more. Entries, join tokens,
//!   bundles (PEM, SPIFFE format, `bundle set` for a federated one) and the
//!   local X.509 authority (`prepare`, `activate`, `taint`, `revoke`) go
//!   through the `spire-server` CLI. It can be stopped and started again on
//!   the same port with the same data.
//!
//! Federation, for example: two servers with their own `trust_domain`, each
//! given `server_hcl` like
//!
//! ```text
//! federation {
//!     bundle_endpoint { address = "127.0.0.1" port = PORT }
//!     federates_with "partner.org" {
//!         bundle_endpoint_url = "https://127.0.0.1:OTHER_PORT"
//!         bundle_endpoint_profile "https_spiffe" {
//!             endpoint_spiffe_id = "spiffe://partner.org/spire/server"
//!         }
//!     }
//! }
//! ```
//!
//! then each other's bundle with [`SpireServer::set_federated_bundle`],
//! and entries with [`Entry::federates_with`].
//! - [`SpireAgent`]: attested once with a join token, KeyManager `disk` so a
//!   restarted agent keeps its node identity, the `unix` workload attestor,
//!   the Workload API on a socket under the agent's own folder
//!   ([`SpireAgent::address`]). It can be killed and restarted.
//! - [`Spire`]: one server and one agent, with [`Spire::entry`] building
//!   entries parented to that agent.
//! - Several nodes: a server or an agent can run inside a network namespace
//!   (`ServerConfig::netns`, `AgentConfig::netns`, see `netns.rs`): it is
//!   started with `ip netns exec`, binds or dials the node's address, and
//!   its sockets stay in the shared file system, so the CLIs and the tests
//!   reach them from anywhere. Two federated servers: `spire_federation.rs`.
//! - Processes of other users: [`command_as`] runs a program under another
//!   uid (tests run as root; uid 0 is the tunnel's own, [`OTHER_UID`] and up
//!   are free for "other workloads"); [`TestUser`] makes a named user for
//!   `unix:user` selectors and removes it on drop.
//!
//! # Waiting and teardown
//!
//! Every wait polls a condition with a deadline (the CLI's `healthcheck`,
//! `spire-agent api fetch` showing an ID, a log line) and fails with what it
//! last saw. Every process is killed and reaped on drop, also while a test
//! panics (its log tail is then printed), and is started through `setpriv
//! --pdeathsig KILL` so that even a test process killed outright takes its
//! SPIRE processes with it. Each server and agent lives in its own short
//! temporary folder under /tmp (Unix socket paths are limited to 108 bytes),
//! removed on drop.
//!
//! # Speed
//!
//! SPIRE's own defaults reload the server's entry cache every 5 s and sync
//! the agent every 5 s, so a new entry takes up to ten seconds to reach a
//! workload. The harness sets both to 1 s (`experimental` options) unless a
//! test asks otherwise; propagation then takes two to three seconds.
//!
//! # When SPIRE is missing
//!
//! The binaries come from `SPIRE_BIN_DIR` (set by `scripts/test`), else
//! `target/spire/1.13.3/bin` in the repository. When they are not there the
//! test fails with one line saying why (the build's own error, if
//! `scripts/test` recorded one); it is never skipped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The SPIRE release the tests run against.
pub const SPIRE_VERSION: &str = "1.13.3";

/// The first uid for processes that are "another workload" (not the
/// tunnel's uid 0). No user needs to exist for `unix:uid` selectors.
pub const OTHER_UID: u32 = 50001;

/// Where `spire-server` and `spire-agent` are, or a panic with one line
/// saying why they are not.
pub fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("SPIRE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/spire/{SPIRE_VERSION}/bin"))
        });
    for bin in ["spire-server", "spire-agent"] {
        if !dir.join(bin).is_file() {
            let recorded = dir
                .parent()
                .map(|d| d.join("build-error.txt"))
                .and_then(|f| std::fs::read_to_string(f).ok())
                .map(|s| s.trim().to_string());
            panic!(
                "SPIRE v{SPIRE_VERSION} is not available: {} missing ({}); scripts/test builds it from the Go module proxy",
                dir.join(bin).display(),
                recorded.unwrap_or_else(|| "no build was recorded".into())
            );
        }
    }
    dir
}

/// `spire-server` or `spire-agent`.
pub fn spire_bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A short, unique temporary folder, readable by other uids (workloads of
/// other users must reach the agent socket inside it).
pub fn short_temp_dir(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .expect("create a temporary folder");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod the temporary folder");
    dir
}

/// A Command for `program` that runs under `uid` (and gid `uid`, no
/// supplementary groups): "another workload" for the unix attestor.
pub fn command_as(program: impl AsRef<std::ffi::OsStr>, uid: u32) -> Command {
    let mut command = Command::new(program);
    command.uid(uid).gid(uid);
    command
}

/// Same, for tokio.
pub fn tokio_command_as(program: impl AsRef<std::ffi::OsStr>, uid: u32) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command.uid(uid).gid(uid);
    command
}

/// Runs `program args` to completion; `Ok(stdout)` on exit 0, else
/// `Err` with the exit status and both outputs.
async fn run_tool(mut command: tokio::process::Command) -> Result<String, String> {
    let described = format!("{:?}", command.as_std());
    let out = command
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{described}: cannot run: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{described}: {}\nstdout: {stdout}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A SPIRE process with its log file (stdout and stderr); killed and
/// reaped on drop. [`SpireServer`] and [`SpireAgent`] hold one each; tests
/// that run SPIRE with configs of their own (the shipped ones) use it
/// directly.
pub struct SpireProcess {
    name: String,
    child: Child,
    log: PathBuf,
}

impl SpireProcess {
    /// Starts `program args` (in the current directory).
    pub fn spawn(name: &str, program: &Path, args: &[&str], log: PathBuf) -> Self {
        Self::spawn_in(name, program, args, log, None)
    }

    /// Starts `program args` in `cwd` (SPIRE resolves relative paths of a
    /// config against its working directory).
    pub fn spawn_in(
        name: &str,
        program: &Path,
        args: &[&str],
        log: PathBuf,
        cwd: Option<&Path>,
    ) -> Self {
        let file = File::create(&log).expect("create a log file");
        let err = file.try_clone().expect("clone the log file");
        // setpriv execs the program (same pid) with PR_SET_PDEATHSIG: if
        // the test process dies without unwinding, SPIRE dies with it.
        let setpriv = Path::new("/usr/bin/setpriv");
        let mut command = if setpriv.exists() {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// [`SpireProcess::spawn`] inside network namespace `netns`, if given:
    /// `ip netns exec NS program args`, which execs the program (same pid,
    /// and the parent-death signal set before it still applies).
    fn spawn_in_netns(
        netns: Option<&str>,
        name: &str,
        program: &Path,
        args: &[&str],
        log: PathBuf,
    ) -> Self {
        let Some(netns) = netns else {
            return Self::spawn(name, program, args, log);
        };
        let program = program.to_str().expect("a UTF-8 path");
        let mut all = vec!["netns", "exec", netns, program];
        all.extend_from_slice(args);
        Self::spawn(name, Path::new("ip"), &all, log)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until `spire-server|spire-agent healthcheck -socketPath
    /// socket` passes; panics with the log if the process exits first or
    /// `timeout` passes.
    pub async fn wait_healthy(&mut self, program: &Path, socket: &Path, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                panic!("{} exited ({status}); log:\n{}", self.name, self.log());
            }
            if socket.exists() && healthcheck(program, socket).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not healthy within {timeout:?}; log:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `program healthcheck -socketPath socket` (spire-server or spire-agent).
pub async fn healthcheck(program: &Path, socket: &Path) -> Result<String, String> {
    let mut command = tokio::process::Command::new(program);
    command.args(["healthcheck", "-socketPath"]).arg(socket);
    run_tool(command).await
}

impl Drop for SpireProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "---- last lines of the {} log {} ----",
                self.name,
                self.log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Waits until `check` returns `Ok`, polling every `every`, up to
/// `timeout`; panics with the last error.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, every: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// A duration as SPIRE's config wants it ("90s").
fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The `disk` UpstreamAuthority: SPIRE's CA becomes an intermediate signed
/// by this key and certificate. With `bundle` unset, `cert` is a
/// self-signed root and is what goes into the trust bundle; otherwise
/// `cert` chains up to the roots in `bundle`.
#[derive(Debug, Clone)]
pub struct UpstreamDisk {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: Option<PathBuf>,
}

/// How a server is configured. `Default` is one trust domain
/// `example.org`, a 1 h CA, 1 min SVIDs, 1 h agent SVIDs (an agent whose own
/// SVID expires must re-attest, and a join token works only once), the
/// `memory` KeyManager, and a 1 s entry cache reload.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub trust_domain: String,
    pub ca_ttl: Duration,
    pub default_x509_svid_ttl: Duration,
    pub agent_ttl: Duration,
    /// `ca_key_type`: rsa-2048, rsa-4096, ec-p256 (SPIRE's default), ec-p384.
    pub ca_key_type: Option<String>,
    /// KeyManager `disk` instead of `memory`: the CA keys survive a restart.
    pub disk_keys: bool,
    pub upstream: Option<UpstreamDisk>,
    /// `experimental.cache_reload_interval`.
    pub cache_reload_interval: Duration,
    /// More HCL inside `server { }`: `federation { ... }`, `ca_subject`, ...
    pub server_hcl: String,
    /// More plugin blocks inside `plugins { }`.
    pub plugins_hcl: String,
    pub log_level: String,
    /// Where the server listens for agents (`bind_address`), and where
    /// agents dial it unless they say otherwise.
    pub bind_address: String,
    /// A network namespace to run in (a node of `netns.rs`); `None`: the
    /// test's own.
    pub netns: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            trust_domain: "example.org".into(),
            ca_ttl: Duration::from_secs(3600),
            default_x509_svid_ttl: Duration::from_secs(60),
            agent_ttl: Duration::from_secs(3600),
            ca_key_type: None,
            disk_keys: true,
            upstream: None,
            cache_reload_interval: Duration::from_secs(1),
            server_hcl: String::new(),
            plugins_hcl: String::new(),
            log_level: "INFO".into(),
            bind_address: "127.0.0.1".into(),
            netns: None,
        }
    }
}

/// How an agent is configured. `Default`: ec-p256 workload keys, a 1 s
/// sync interval, INFO logs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `workload_x509_svid_key_type`: rsa-2048 or ec-p256.
    pub workload_key_type: Option<String>,
    /// `experimental.sync_interval`.
    pub sync_interval: Duration,
    /// More HCL inside `agent { }`.
    pub agent_hcl: String,
    pub log_level: String,
    /// Registered as an alias of the agent (`token generate -spiffeID`),
    /// e.g. `spiffe://example.org/node/n1`, so entries can name the node.
    pub node_alias: Option<String>,
    /// The server's address as this agent dials it; `None`: the server's
    /// `bind_address`.
    pub server_address: Option<String>,
    /// A network namespace to run in (a node of `netns.rs`).
    pub netns: Option<String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            workload_key_type: None,
            sync_interval: Duration::from_secs(1),
            agent_hcl: String::new(),
            log_level: "INFO".into(),
            node_alias: None,
            server_address: None,
            netns: None,
        }
    }
}

/// A registration entry to create with `spire-server entry create`.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub spiffe_id: String,
    pub parent_id: String,
    pub selectors: Vec<String>,
    /// `-x509SVIDTTL`, seconds.
    pub x509_ttl: Option<u64>,
    pub hint: Option<String>,
    pub federates_with: Vec<String>,
    pub dns: Vec<String>,
}

impl Entry {
    pub fn new(spiffe_id: &str, parent_id: &str) -> Self {
        Self {
            spiffe_id: spiffe_id.into(),
            parent_id: parent_id.into(),
            ..Default::default()
        }
    }

    /// Adds a selector, like `unix:uid:0` or `unix:user:alice`.
    pub fn selector(mut self, selector: &str) -> Self {
        self.selectors.push(selector.into());
        self
    }

    pub fn uid(self, uid: u32) -> Self {
        self.selector(&format!("unix:uid:{uid}"))
    }

    pub fn user(self, name: &str) -> Self {
        self.selector(&format!("unix:user:{name}"))
    }

    pub fn x509_ttl(mut self, seconds: u64) -> Self {
        self.x509_ttl = Some(seconds);
        self
    }

    pub fn hint(mut self, hint: &str) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// `-federatesWith spiffe://TD`.
    pub fn federates_with(mut self, trust_domain_id: &str) -> Self {
        self.federates_with.push(trust_domain_id.into());
        self
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "entry".into(),
            "create".into(),
            "-output".into(),
            "json".into(),
            "-spiffeID".into(),
            self.spiffe_id.clone(),
            "-parentID".into(),
            self.parent_id.clone(),
        ];
        for s in &self.selectors {
            args.extend(["-selector".into(), s.clone()]);
        }
        if let Some(ttl) = self.x509_ttl {
            args.extend(["-x509SVIDTTL".into(), ttl.to_string()]);
        }
        if let Some(hint) = &self.hint {
            args.extend(["-hint".into(), hint.clone()]);
        }
        for td in &self.federates_with {
            args.extend(["-federatesWith".into(), td.clone()]);
        }
        for dns in &self.dns {
            args.extend(["-dns".into(), dns.clone()]);
        }
        args
    }
}

/// One X.509 authority of the server's local CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub id: String,
    pub expires_at: i64,
}

/// `localauthority x509 show`: the active, prepared and old authorities.
#[derive(Debug, Clone, Default)]
pub struct Authorities {
    pub active: Option<Authority>,
    pub prepared: Option<Authority>,
    pub old: Option<Authority>,
}

/// A running (or stopped) `spire-server`.
pub struct SpireServer {
    pub config: ServerConfig,
    dir: tempfile::TempDir,
    pub port: u16,
    pub socket: PathBuf,
    config_file: PathBuf,
    proc: Option<SpireProcess>,
    starts: usize,
}

impl SpireServer {
    /// Starts a server and waits until its healthcheck passes.
    pub async fn start(config: ServerConfig) -> Self {
        let dir = short_temp_dir("sps");
        let socket = dir.path().join("api.sock");
        let config_file = dir.path().join("server.conf");
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        let mut server = Self {
            config,
            port: 0,
            socket,
            config_file,
            dir,
            proc: None,
            starts: 0,
        };
        // A free port can be taken by someone else before SPIRE binds it;
        // try a few.
        for _ in 0..3 {
            server.port = super::harness::free_port();
            server.write_config();
            if server.launch().await.is_ok() {
                return server;
            }
        }
        let log = server.log();
        panic!("spire-server did not start after 3 attempts; log:\n{log}");
    }

    /// The folder holding its config, data, socket and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn trust_domain_id(&self) -> String {
        format!("spiffe://{}", self.config.trust_domain)
    }

    fn write_config(&self) {
        let c = &self.config;
        let data = self.dir.path().join("data");
        let key_type = c
            .ca_key_type
            .as_ref()
            .map(|k| format!("    ca_key_type = \"{k}\"\n"))
            .unwrap_or_default();
        let key_manager = if c.disk_keys {
            format!(
                "    KeyManager \"disk\" {{\n        plugin_data {{ keys_path = \"{}\" }}\n    }}\n",
                data.join("keys.json").display()
            )
        } else {
            "    KeyManager \"memory\" {\n        plugin_data {}\n    }\n".into()
        };
        let upstream = c
            .upstream
            .as_ref()
            .map(|u| {
                let bundle = u
                    .bundle
                    .as_ref()
                    .map(|b| format!("            bundle_file_path = \"{}\"\n", b.display()))
                    .unwrap_or_default();
                format!(
                    "    UpstreamAuthority \"disk\" {{\n        plugin_data {{\n            cert_file_path = \"{}\"\n            key_file_path = \"{}\"\n{bundle}        }}\n    }}\n",
                    u.cert.display(),
                    u.key.display(),
                )
            })
            .unwrap_or_default();
        let text = format!(
            r#"server {{
    bind_address = "{bind}"
    bind_port = "{port}"
    socket_path = "{socket}"
    trust_domain = "{td}"
    data_dir = "{data}"
    log_level = "{log_level}"
    ca_ttl = "{ca_ttl}"
    default_x509_svid_ttl = "{svid_ttl}"
    agent_ttl = "{agent_ttl}"
{key_type}    experimental {{
        cache_reload_interval = "{reload}"
    }}
{server_hcl}
}}

plugins {{
    DataStore "sql" {{
        plugin_data {{
            database_type = "sqlite3"
            connection_string = "{data}/datastore.sqlite3"
        }}
    }}
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
{key_manager}{upstream}{plugins_hcl}
}}
"#,
            bind = c.bind_address,
            port = self.port,
            socket = self.socket.display(),
            td = c.trust_domain,
            data = data.display(),
            log_level = c.log_level,
            ca_ttl = go_duration(c.ca_ttl),
            svid_ttl = go_duration(c.default_x509_svid_ttl),
            agent_ttl = go_duration(c.agent_ttl),
            reload = go_duration(c.cache_reload_interval),
            server_hcl = c.server_hcl,
            plugins_hcl = c.plugins_hcl,
        );
        std::fs::write(&self.config_file, text).expect("write server.conf");
    }

    /// The server's config file as written (for tests that show it).
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config_file).unwrap_or_default()
    }

    /// Starts the process and waits for the healthcheck; `Err` with the
    /// log when it exits first (a taken port, a bad config).
    async fn launch(&mut self) -> Result<(), String> {
        let _ = std::fs::remove_file(&self.socket);
        self.starts += 1;
        let log = self.dir.path().join(format!("server-{}.log", self.starts));
        let config = self.config_file.to_str().unwrap().to_string();
        let mut proc = SpireProcess::spawn_in_netns(
            self.config.netns.as_deref(),
            "spire-server",
            &spire_bin("spire-server"),
            &["run", "-config", &config],
            log,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = proc.exited() {
                return Err(format!("spire-server exited ({status}):\n{}", proc.log()));
            }
            if self.socket.exists() && self.healthcheck().await.is_ok() {
                self.proc = Some(proc);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = proc.log();
                drop(proc);
                panic!("spire-server not healthy within 60 s; log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn healthcheck(&self) -> Result<String, String> {
        healthcheck(&spire_bin("spire-server"), &self.socket).await
    }

    /// Everything the server logged since its last start.
    pub fn log(&self) -> String {
        self.proc
            .as_ref()
            .map(SpireProcess::log)
            .unwrap_or_default()
    }

    /// Kills the server (SIGKILL: no graceful anything).
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts a stopped server again, same port and data.
    pub async fn start_again(&mut self) {
        assert!(self.proc.is_none(), "the server is running");
        if let Err(e) = self.launch().await {
            panic!("spire-server did not start again: {e}");
        }
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// `spire-server ARGS -socketPath SOCKET`: stdout, or the error.
    pub async fn cli(&self, args: &[&str]) -> Result<String, String> {
        let mut command = tokio::process::Command::new(spire_bin("spire-server"));
        command.args(args).arg("-socketPath").arg(&self.socket);
        run_tool(command).await
    }

    /// `cli` with `-output json`, parsed; panics on failure.
    pub async fn cli_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-output", "json"]);
        let out = self
            .cli(&all)
            .await
            .unwrap_or_else(|e| panic!("spire-server failed: {e}"));
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("spire-server output is not JSON ({e}): {out}"))
    }

    /// A join token for one agent; with `alias`, an entry that makes the
    /// agent also `alias` (the `-spiffeID` step of docs/spire.md, "Several nodes").
    pub async fn join_token(&self, alias: Option<&str>) -> String {
        let mut args = vec!["token", "generate", "-ttl", "600"];
        if let Some(alias) = alias {
            args.extend(["-spiffeID", alias]);
        }
        let json = self.cli_json(&args).await;
        json["value"]
            .as_str()
            .unwrap_or_else(|| panic!("no token in {json}"))
            .to_string()
    }

    /// Creates an entry with the CLI; returns its entry ID.
    pub async fn create_entry(&self, entry: &Entry) -> String {
        let args = entry.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self
            .cli(&args)
            .await
            .unwrap_or_else(|e| panic!("entry create failed: {e}"));
        let json: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let result = &json["results"][0];
        let code = result["status"]["code"].as_i64().unwrap_or(-1);
        assert_eq!(code, 0, "entry create refused: {result}");
        result["entry"]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no entry id in {json}"))
            .to_string()
    }

    pub async fn delete_entry(&self, entry_id: &str) {
        let json = self
            .cli_json(&["entry", "delete", "-entryID", entry_id])
            .await;
        let code = json["results"][0]["status"]["code"].as_i64().unwrap_or(-1);
        assert_eq!(code, 0, "entry delete refused: {json}");
    }

    /// The trust bundle (X.509 authorities) as PEM, `bundle show`.
    pub async fn bundle_pem(&self) -> String {
        self.cli(&["bundle", "show", "-format", "pem"])
            .await
            .unwrap_or_else(|e| panic!("bundle show failed: {e}"))
    }

    /// The trust bundle in SPIFFE format (a JWKS), what another server
    /// takes with [`SpireServer::set_federated_bundle`].
    pub async fn bundle_spiffe(&self) -> String {
        self.cli(&["bundle", "show", "-format", "spiffe"])
            .await
            .unwrap_or_else(|e| panic!("bundle show failed: {e}"))
    }

    /// `bundle set -format spiffe -id TD`: trusts another trust domain's
    /// bundle (`spiffe_bundle` as [`SpireServer::bundle_spiffe`] gives it),
    /// as an operator bootstraps federation before the bundle endpoint
    /// takes over.
    pub async fn set_federated_bundle(&self, trust_domain_id: &str, spiffe_bundle: &str) {
        let file = self.dir.path().join(format!(
            "federated-{}.json",
            trust_domain_id.trim_start_matches("spiffe://")
        ));
        std::fs::write(&file, spiffe_bundle).unwrap();
        let path = file.to_str().unwrap().to_string();
        self.cli(&[
            "bundle",
            "set",
            "-format",
            "spiffe",
            "-id",
            trust_domain_id,
            "-path",
            &path,
        ])
        .await
        .unwrap_or_else(|e| panic!("bundle set failed: {e}"));
    }

    /// `localauthority x509 show`.
    pub async fn x509_authorities(&self) -> Authorities {
        let json = self.cli_json(&["localauthority", "x509", "show"]).await;
        let get = |slot: &str| {
            let a = &json[slot];
            a["authority_id"].as_str().map(|id| Authority {
                id: id.to_string(),
                expires_at: a["expires_at"]
                    .as_i64()
                    .or_else(|| a["expires_at"].as_str().and_then(|s| s.parse().ok()))
                    .unwrap_or(0),
            })
        };
        Authorities {
            active: get("active"),
            prepared: get("prepared"),
            old: get("old"),
        }
    }

    /// `localauthority x509 prepare`: a new authority, published in the
    /// bundle, not yet signing. Returns its ID.
    pub async fn prepare_x509_authority(&self) -> String {
        let json = self.cli_json(&["localauthority", "x509", "prepare"]).await;
        json["prepared_authority"]["authority_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no prepared authority in {json}"))
            .to_string()
    }

    /// `localauthority x509 activate`: the prepared authority signs from
    /// now on; the previous one becomes "old".
    pub async fn activate_x509_authority(&self, id: &str) {
        self.cli_json(&["localauthority", "x509", "activate", "-authorityID", id])
            .await;
    }

    /// `localauthority x509 taint`: agents replace every SVID it signed.
    pub async fn taint_x509_authority(&self, id: &str) {
        self.cli_json(&["localauthority", "x509", "taint", "-authorityID", id])
            .await;
    }

    /// `localauthority x509 revoke`: the authority leaves the bundle.
    pub async fn revoke_x509_authority(&self, id: &str) -> Result<String, String> {
        self.cli(&[
            "localauthority",
            "x509",
            "revoke",
            "-authorityID",
            id,
            "-output",
            "json",
        ])
        .await
    }
}

impl Drop for SpireServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running (or stopped) `spire-agent`, attested to one server.
pub struct SpireAgent {
    pub config: AgentConfig,
    dir: tempfile::TempDir,
    pub socket: PathBuf,
    config_file: PathBuf,
    /// The agent's own SPIFFE ID (`spiffe://TD/spire/agent/join_token/...`).
    pub spiffe_id: String,
    trust_domain: String,
    join_token: String,
    proc: Option<SpireProcess>,
    starts: usize,
}

impl SpireAgent {
    /// Generates a join token on `server`, writes the agent's config
    /// (trusting the server's current bundle), starts it and waits until
    /// it is attested and healthy.
    pub async fn start(server: &SpireServer, config: AgentConfig) -> Self {
        let dir = short_temp_dir("spa");
        let socket = dir.path().join("api.sock");
        let config_file = dir.path().join("agent.conf");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let bundle = dir.path().join("bootstrap.pem");
        std::fs::write(&bundle, server.bundle_pem().await).unwrap();
        let key_type = config
            .workload_key_type
            .as_ref()
            .map(|k| format!("    workload_x509_svid_key_type = \"{k}\"\n"))
            .unwrap_or_default();
        let text = format!(
            r#"agent {{
    data_dir = "{data}"
    log_level = "{log_level}"
    server_address = "{server_address}"
    server_port = "{port}"
    socket_path = "{socket}"
    trust_bundle_path = "{bundle}"
    trust_domain = "{td}"
{key_type}    experimental {{
        sync_interval = "{sync}"
    }}
{agent_hcl}
}}

plugins {{
    NodeAttestor "join_token" {{
        plugin_data {{}}
    }}
    KeyManager "disk" {{
        plugin_data {{ directory = "{data}" }}
    }}
    WorkloadAttestor "unix" {{
        plugin_data {{}}
    }}
}}
"#,
            data = data.display(),
            log_level = config.log_level,
            server_address = config
                .server_address
                .as_deref()
                .unwrap_or(&server.config.bind_address),
            port = server.port,
            socket = socket.display(),
            bundle = bundle.display(),
            td = server.config.trust_domain,
            sync = go_duration(config.sync_interval),
            agent_hcl = config.agent_hcl,
        );
        std::fs::write(&config_file, text).expect("write agent.conf");
        let join_token = server.join_token(config.node_alias.as_deref()).await;
        let spiffe_id = format!(
            "spiffe://{}/spire/agent/join_token/{join_token}",
            server.config.trust_domain
        );
        let mut agent = Self {
            config,
            dir,
            socket,
            config_file,
            spiffe_id,
            trust_domain: server.config.trust_domain.clone(),
            join_token,
            proc: None,
            starts: 0,
        };
        agent.launch().await;
        agent
    }

    /// The Workload API address for `[identity] socket`.
    pub fn address(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The ID to parent entries to: the node alias if there is one.
    pub fn parent_id(&self) -> String {
        self.config
            .node_alias
            .clone()
            .unwrap_or_else(|| self.spiffe_id.clone())
    }

    /// The first start uses the join token; later ones (restarts) rely on
    /// the SVID and key the `disk` KeyManager kept, as in production.
    async fn launch(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        self.starts += 1;
        let log = self.dir.path().join(format!("agent-{}.log", self.starts));
        let config = self.config_file.to_str().unwrap().to_string();
        let mut args = vec!["run", "-config", config.as_str()];
        if self.starts == 1 {
            args.extend(["-joinToken", self.join_token.as_str()]);
        }
        let mut proc = SpireProcess::spawn_in_netns(
            self.config.netns.as_deref(),
            "spire-agent",
            &spire_bin("spire-agent"),
            &args,
            log,
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = proc.exited() {
                panic!("spire-agent exited ({status}); log:\n{}", proc.log());
            }
            if self.socket.exists() && self.healthcheck().await.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                let log = proc.log();
                drop(proc);
                panic!("spire-agent not healthy within 60 s; log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.proc = Some(proc);
    }

    async fn healthcheck(&self) -> Result<String, String> {
        healthcheck(&spire_bin("spire-agent"), &self.socket).await
    }

    /// Everything the agent logged since its last start.
    pub fn log(&self) -> String {
        self.proc
            .as_ref()
            .map(SpireProcess::log)
            .unwrap_or_default()
    }

    /// Kills the agent (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }

    /// Starts a killed agent again (no join token: it reuses its node SVID).
    pub async fn start_again(&mut self) {
        assert!(self.proc.is_none(), "the agent is running");
        self.launch().await;
    }

    /// Kills and starts again.
    pub async fn restart(&mut self) {
        self.kill();
        self.start_again().await;
    }

    /// `spire-agent api fetch x509` as `uid`: stdout, or the error (for a
    /// workload without an entry: "no identity issued").
    pub async fn fetch_x509_as(&self, uid: u32) -> Result<String, String> {
        let mut command = tokio_command_as(spire_bin("spire-agent"), uid);
        command
            .args(["api", "fetch", "x509", "-timeout", "3s", "-socketPath"])
            .arg(&self.socket);
        run_tool(command).await
    }

    /// Waits until a workload of `uid` is issued every ID in `ids`.
    /// (`spire-agent api fetch` is go-spiffe inside: it refuses a response
    /// with an empty federated X.509 bundle, which SPIRE sends for a
    /// JWT-only trust domain, so this cannot see such a workload's SVIDs.)
    pub async fn wait_for_ids(&self, uid: u32, ids: &[&str], timeout: Duration) -> String {
        wait_for(
            &format!("uid {uid} to get {ids:?} from the agent"),
            timeout,
            Duration::from_millis(250),
            || async {
                let out = self.fetch_x509_as(uid).await?;
                match ids.iter().find(|id| !has_id(&out, id)) {
                    None => Ok(out),
                    Some(missing) => Err(format!("{missing} not issued yet:\n{out}")),
                }
            },
        )
        .await
    }

    /// Waits until a workload of `uid` gets none of `ids` (or no identity).
    pub async fn wait_without_ids(&self, uid: u32, ids: &[&str], timeout: Duration) {
        wait_for(
            &format!("uid {uid} to lose {ids:?}"),
            timeout,
            Duration::from_millis(250),
            || async {
                match self.fetch_x509_as(uid).await {
                    Err(_) => Ok(()),
                    Ok(out) if ids.iter().all(|id| !has_id(&out, id)) => Ok(()),
                    Ok(out) => Err(format!("still issued:\n{out}")),
                }
            },
        )
        .await
    }

    /// Waits until the agent's log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(
            &format!("{needle:?} in the agent log"),
            timeout,
            Duration::from_millis(100),
            || async {
                if self.log().contains(needle) {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            },
        )
        .await
    }
}

/// True when `spire-agent api fetch x509` output lists exactly `id` (the
/// line "SPIFFE ID:\t\tspiffe://..." ends with it).
fn has_id(fetch_output: &str, id: &str) -> bool {
    fetch_output.lines().any(|l| {
        l.trim_start().starts_with("SPIFFE ID:") && l.split_whitespace().last() == Some(id)
    })
}

impl Drop for SpireAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One server and one agent: the usual single-node setup.
pub struct Spire {
    // Field order is drop order: the agent goes first.
    pub agent: SpireAgent,
    pub server: SpireServer,
    /// How long the server and the agent took to become healthy.
    pub startup: Duration,
}

impl Spire {
    pub async fn start(server: ServerConfig, agent: AgentConfig) -> Self {
        let started = Instant::now();
        let server = SpireServer::start(server).await;
        let agent = SpireAgent::start(&server, agent).await;
        let startup = started.elapsed();
        eprintln!("SPIRE server and agent healthy in {startup:?}");
        Self {
            agent,
            server,
            startup,
        }
    }

    /// An entry for `spiffe_id` parented to this agent (add selectors).
    pub fn entry(&self, spiffe_id: &str) -> Entry {
        Entry::new(spiffe_id, &self.agent.parent_id())
    }

    pub async fn create_entry(&self, entry: &Entry) -> String {
        self.server.create_entry(entry).await
    }

    pub fn trust_domain(&self) -> &str {
        &self.server.config.trust_domain
    }
}

/// A local user made with `useradd` for `unix:user` selectors; removed
/// with `userdel` on drop.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
}

impl TestUser {
    pub fn create() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "st{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                &name,
            ])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run useradd (tests need root and the passwd package): {e}")
            });
        assert!(
            out.status.success(),
            "useradd {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = Command::new("id")
            .args(["-u", &name])
            .output()
            .expect("run id");
        let uid = String::from_utf8_lossy(&id.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("id -u {name}: {e}"));
        Self { name, uid }
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}
