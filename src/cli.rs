//! Command-line definitions (clap). Each command's help says what it is for
//! and gives an example, because `--help` is the first manual people read.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::agent::IdGrant;
use crate::spiffe_id::{SpiffeId, TrustDomain};

#[derive(Debug, Parser)]
#[command(
    name = "spiffe-tunnel",
    version,
    about = "Zero-trust mTLS tunnels between nodes, authorized by SPIFFE ID",
    long_about = "spiffe-tunnel runs beside a SPIRE agent on every node. Inbound tunnels accept mTLS \
and forward plain TCP to a local app; outbound tunnels accept plain TCP from a local app and \
dial a remote inbound over mTLS. A connection goes through only when the peer's X509-SVID \
verifies against the bundle of its trust domain and its SPIFFE ID is allowed by the tunnel's policy.\n\n\
Start with `spiffe-tunnel check -c tunnel.toml`, then `spiffe-tunnel run -c tunnel.toml`.",
    after_help = "Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.\n\
Logging: RUST_LOG sets the filter (default \"info\"), e.g. RUST_LOG=spiffe_tunnel=debug."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every tunnel in a config file (the daemon).
    ///
    /// SIGHUP reloads the config and policy files, all or nothing (a bad one
    /// is refused and the running config stays); SIGTERM or SIGINT stop
    /// accepting, let live connections finish for up to drain_timeout, and
    /// exit; SIGUSR2 upgrades in place: the binary now at this process's path
    /// starts with its listening sockets, and once it is ready this process
    /// stops accepting, drains and exits 0 (if it fails, this one serves on).
    /// A tunnel with listen = "systemd:NAME" takes the socket systemd passed
    /// under that name (socket activation).
    ///
    /// Example: spiffe-tunnel run -c /etc/spiffe-tunnel/tunnel.toml --pid-file /run/spiffe-tunnel.pid
    Run(RunArgs),

    /// Upgrade a running daemon in place and wait until the new process serves.
    ///
    /// Sends SIGUSR2 to the pid in FILE (the --pid-file of `run`) and waits
    /// for the new process to rewrite FILE, which it does once it is ready.
    /// Exits 0 with both pids, or 1 when no new process is ready in time:
    /// then the old one is still serving and its log says why.
    ///
    /// Example: spiffe-tunnel upgrade --pid-file /run/spiffe-tunnel.pid
    Upgrade(UpgradeArgs),

    /// Validate a config file and its policy and identity files, and print what would run.
    ///
    /// Exits 0 when everything is valid and 2 otherwise, naming the file,
    /// line and key at fault (like `nginx -t`).
    ///
    /// Example: spiffe-tunnel check -c tunnel.toml
    Check(CheckArgs),

    /// Verify an X.509-SVID chain offline against trust bundles.
    ///
    /// Prints the SPIFFE ID and exits 0 when the chain is a valid X509-SVID
    /// that chains to the bundle of its own trust domain; prints the reason
    /// and exits 1 otherwise.
    ///
    /// Example: spiffe-tunnel verify --bundle example.org=bundle.pem svid.pem
    Verify(VerifyArgs),

    /// Serve a development SPIFFE Workload API with its own CA, for demos and tests (NOT for production).
    ///
    /// A stand-in for a SPIRE agent on one machine: it makes its own CA for
    /// the trust domain, issues an X509-SVID for each --id the way SPIRE
    /// issues them, renews each SVID at half its lifetime and pushes the new
    /// ones to every connected client, and rotates the CA with overlap (the
    /// next CA joins the bundle at half the CA's life and starts signing at
    /// three quarters). Callers are told apart by their unix uid only; there
    /// is no other attestation and the CA key is not protected.
    ///
    /// Point clients at it with --socket or SPIFFE_ENDPOINT_SOCKET. Stop it
    /// with Ctrl-C or SIGTERM; the socket file is removed on exit.
    ///
    /// Like SPIRE (tests/conformance.rs checks both): each --id is one SVID,
    /// as a registration entry is, so a caller matched by two --id of one
    /// SPIFFE ID gets two SVIDs with that ID; a federated bundle goes only to
    /// callers holding an ID that federates with it (--federates-with, as
    /// -federatesWith); PermissionDenied "no identity issued" and
    /// InvalidArgument for a missing security header, with SPIRE's messages.
    ///
    /// Where it differs from SPIRE:
    ///   - SVID order: command-line order, so the first --id a caller may
    ///     have is its default; SPIRE orders by entry ID (random), so pick an
    ///     SVID by ID (svid = ...) and not by position.
    ///   - Renewal: at half the life from issue (--ttl / 2), so TTLs of a
    ///     second or two work; SPIRE renews once less than half of
    ///     NotBefore..NotAfter is left, with NotBefore 10 s in the past,
    ///     that is (TTL - 10 s) / 2 after issue.
    ///   - CA rotation runs by itself on --ca-ttl (next CA at 1/2, signing at
    ///     3/4); SPIRE's is driven by its ca_ttl or `localauthority x509`.
    ///   - No hints, no JWT-SVIDs, callers told apart by uid only.
    ///
    /// Example:
    ///   spiffe-tunnel dev-agent --socket /tmp/dev-agent/api.sock \
    ///     --trust-domain example.org \
    ///     --id spiffe://example.org/web --id uid:1000=spiffe://example.org/api \
    ///     --ttl 30s --ca-ttl 10m
    #[command(verbatim_doc_comment)]
    DevAgent(DevAgentArgs),

    /// Write SVIDs, keys and bundles to files for HAProxy, nginx, stunnel and friends.
    ///
    /// `svid fetch` writes once and exits; `svid watch` keeps the files
    /// current across every rotation and can push new certificates into a
    /// running HAProxy through its runtime API.
    #[command(subcommand)]
    Svid(SvidCommand),

    /// Show what a running spiffe-tunnel is doing, from its admin endpoint.
    ///
    /// Reads /status from the admin endpoint (the [admin] listen address of
    /// the config given with -c, or --admin) and prints it for a person:
    /// readiness, our SVIDs and their expiry, trust bundles, the Workload
    /// API connection, each tunnel with its live connections and last
    /// refusal, and the last reload. --json prints the raw document.
    ///
    /// Example: spiffe-tunnel status -c /etc/spiffe-tunnel/tunnel.toml
    Status(StatusArgs),

    /// Show the whole system on this machine in under a minute, no SPIRE needed.
    ///
    /// Starts a development Workload API (playing the SPIRE agent), a small
    /// backend, and an inbound and an outbound tunnel end, each with its own
    /// SPIFFE ID. It sends requests through and prints which SPIFFE ID each
    /// end verified, waits for the SVIDs to rotate and shows traffic going on
    /// with the new ones, and shows a caller whose ID is not allowed being
    /// refused. Everything runs on loopback and is cleaned up at the end.
    ///
    /// Example: spiffe-tunnel demo
    Demo(DemoArgs),
}

#[derive(Debug, Subcommand)]
pub enum SvidCommand {
    /// Fetch the SVIDs once from the Workload API and write them to DIR.
    ///
    /// Files use SPIRE's names: svid.0.pem (chain, leaf first), svid.0.key
    /// (PKCS#8, mode 0600), bundle.0.pem, svid.N.* for more SVIDs and
    /// federated_bundle.<td>.pem per federated trust domain. Every name is
    /// a symlink into DIR/..data, swapped atomically as a whole.
    ///
    /// Example: spiffe-tunnel svid fetch --write /etc/haproxy/svid
    Fetch(SvidFetchArgs),

    /// Keep DIR current: rewrite the files on every rotation, then run a
    /// command, signal a process, or push into HAProxy.
    ///
    /// Reconnects to the Workload API with backoff, like the tunnel; the
    /// files on disk stay as they are while it is unavailable.
    ///
    /// Example (HAProxy, reloaded only where it must be):
    ///   spiffe-tunnel svid watch --write /etc/haproxy/svid \
    ///     --haproxy-socket /run/haproxy/admin.sock \
    ///     --haproxy-master-socket /run/haproxy-master.sock \
    ///     --haproxy-cert /etc/haproxy/svid.pem --haproxy-ca-file /etc/haproxy/bundle.pem
    #[command(verbatim_doc_comment)]
    Watch(SvidWatchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct SvidFetchArgs {
    /// The folder to write into (created if missing).
    #[arg(long = "write", value_name = "DIR")]
    pub dir: PathBuf,

    /// Workload API address (default: SPIFFE_ENDPOINT_SOCKET, then
    /// unix:///tmp/spire-agent/public/api.sock).
    #[arg(long, value_name = "ADDR")]
    pub socket: Option<String>,

    /// Write only this SVID (as svid.0.*).
    #[arg(long, value_name = "SPIFFE_ID")]
    pub id: Option<String>,

    /// Also write FILE as chain plus key, the form of an HAProxy `crt` line.
    #[arg(long, value_name = "FILE")]
    pub haproxy_cert: Option<PathBuf>,

    /// Also write FILE with every trust bundle, for an HAProxy `ca-file`.
    #[arg(long, value_name = "FILE")]
    pub haproxy_ca_file: Option<PathBuf>,

    /// Give up after this long without an answer.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct SvidWatchArgs {
    #[command(flatten)]
    pub fetch: SvidFetchArgs,

    /// A shell command to run after each update (its exit status is logged;
    /// $SVID_DIR is the folder).
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,

    /// A signal (HUP, USR1, ...) to send after each update to the process
    /// whose pid is in --pid-file.
    #[arg(long, value_name = "SIG", requires = "pid_file")]
    pub signal: Option<String>,

    /// The pid file of the process to signal.
    #[arg(long, value_name = "FILE", requires = "signal")]
    pub pid_file: Option<PathBuf>,

    /// HAProxy's stats socket (`stats socket PATH level admin`): each new
    /// SVID is pushed with `set ssl cert` / `commit ssl cert`, and each
    /// bundle that differs from what HAProxy holds with `set ssl ca-file` /
    /// `commit ssl ca-file`, so HAProxy presents it without a reload.
    /// What HAProxy cannot take at runtime without breaking is refused
    /// with an error saying to reload, unless --haproxy-master-socket is
    /// given: a new CA file before 3.3 (bug #3165: it stops applying
    /// certificates, then crashes), and before 3.0 an SVID with no DNS
    /// name nor CN, as SPIRE issues them (the commit turns a bind line's
    /// `verify required` off).
    #[arg(long, value_name = "PATH", requires = "haproxy_cert")]
    pub haproxy_socket: Option<PathBuf>,

    /// HAProxy's master CLI (`haproxy -W -S PATH`; Debian's haproxy.service
    /// has /run/haproxy-master.sock): what HAProxy cannot take at runtime
    /// (see --haproxy-socket) goes in by a `reload` here, once the files
    /// are written. The master keeps its pid; a new worker takes the
    /// listeners over.
    #[arg(long, value_name = "PATH", requires = "haproxy_socket")]
    pub haproxy_master_socket: Option<PathBuf>,

    /// Stop after the first update, like `svid fetch`.
    #[arg(long)]
    pub once: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The config file of the running daemon (its [admin] listen is used).
    #[arg(
        short,
        long,
        value_name = "FILE",
        conflicts_with = "admin",
        required_unless_present = "admin"
    )]
    pub config: Option<PathBuf>,

    /// The admin endpoint address, like 127.0.0.1:9901.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,

    /// Print the raw JSON document instead.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Leave everything running at the end and print how to poke it (Ctrl-C stops).
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The config file (TOML).
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,

    /// Workload API address, overriding the config and SPIFFE_ENDPOINT_SOCKET
    /// (unix:///path/to/api.sock or tcp://IP:port).
    #[arg(long, value_name = "ADDR")]
    pub socket: Option<String>,

    /// Write the pid here (atomically) once serving; after an upgrade the
    /// new process rewrites it, so `kill -USR2 $(cat FILE)` keeps working.
    /// Removed on exit if it still holds this process's pid.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// The pid file of the running daemon (`run --pid-file`).
    #[arg(long, value_name = "FILE")]
    pub pid_file: PathBuf,

    /// How long to wait for the new process to be ready.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The config file (TOML).
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A trust bundle: the trust domain name, '=', and a PEM file of its CA
    /// certificates. Repeat for federated trust domains.
    #[arg(long = "bundle", value_name = "TD=FILE", required = true)]
    pub bundles: Vec<String>,

    /// The chain to verify: PEM certificates, leaf first.
    #[arg(value_name = "CHAIN.pem")]
    pub chain: PathBuf,
}

#[derive(Debug, Args)]
pub struct DevAgentArgs {
    /// The Unix socket to serve on: a path, unix:///path or unix:/path.
    /// Its directory is created if missing, a stale socket is replaced, and
    /// the socket is world-accessible (0777) like SPIRE's public socket.
    #[arg(long, value_name = "PATH", value_parser = crate::agent::parse_socket_path)]
    pub socket: PathBuf,

    /// The trust domain to issue SVIDs in, e.g. example.org.
    #[arg(long, value_name = "TD", value_parser = crate::spiffe_id::parse_trust_domain)]
    pub trust_domain: TrustDomain,

    /// A SPIFFE ID to issue, in the trust domain: one SVID per --id, like
    /// one SPIRE entry. Repeat for more; the first a caller may have is its
    /// default SVID. Prefix uid:N= to give the ID only to callers running as
    /// unix uid N (e.g. uid:1000=spiffe://example.org/api); IDs without a
    /// prefix go to every caller. A caller entitled to no ID gets
    /// PermissionDenied "no identity issued". The same --id twice is refused.
    #[arg(long = "id", value_name = "[uid:N=]SPIFFE_ID", required = true)]
    pub ids: Vec<IdGrant>,

    /// Lifetime of each X509-SVID (e.g. 30s, 5m, 1h); it is renewed at half.
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,

    /// Lifetime of each CA. A CA shares the bundle with its successor from
    /// half its life, hands signing over at three quarters, and leaves the
    /// bundle when it expires. SVIDs never outlive their CA, so use at least
    /// 4 x --ttl for full-length SVIDs.
    #[arg(long, value_name = "DUR", default_value = "24h", value_parser = humantime::parse_duration)]
    pub ca_ttl: Duration,

    /// Also serve the CA certificates of a federated trust domain, read once
    /// at start from a PEM file. Repeatable. Like SPIRE, the agent sends it
    /// only to callers holding an ID that federates with that trust domain
    /// (--federates-with), so each --federate needs one.
    #[arg(long = "federate", value_name = "TD=BUNDLE.pem", value_parser = crate::agent::parse_federate)]
    pub federate: Vec<(TrustDomain, PathBuf)>,

    /// Callers holding SPIFFE_ID also get the federated bundle of TD (given
    /// with --federate), as a SPIRE entry with -federatesWith spiffe://TD.
    /// Repeatable.
    #[arg(long = "federates-with", value_name = "SPIFFE_ID=TD", value_parser = crate::agent::parse_federates_with)]
    pub federates_with: Vec<(SpiffeId, TrustDomain)>,

    /// Keep the CA in this directory (ca.pem, ca.key as PKCS#8 with mode
    /// 0600, next-ca.pem during a rotation) and reuse it on the next start,
    /// so a restarted agent keeps its trust domain's CA and several agents
    /// can share one CA, for example in a multi-node test. Created if
    /// missing. Without it the CA lives in memory only.
    #[arg(long, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,

    /// Also serve SPIRE's Delegated Identity API (the agent admin API) on
    /// this Unix socket, for `present = "caller"` outbounds. Like SPIRE, it
    /// answers only callers holding an --authorized-delegate ID; they may
    /// subscribe to the SVIDs of another process by pid (attested to its
    /// uid) or by `unix:uid:N` selectors, matched against the uid:N= grants.
    #[arg(long, value_name = "PATH", value_parser = crate::agent::parse_socket_path)]
    pub admin_socket: Option<PathBuf>,

    /// A SPIFFE ID whose holders may use --admin-socket (SPIRE's
    /// `authorized_delegates`). Repeatable.
    #[arg(long = "authorized-delegate", value_name = "SPIFFE_ID", value_parser = crate::spiffe_id::parse_workload_id)]
    pub authorized_delegates: Vec<SpiffeId>,
}
