//! Command-line definitions (clap). Each command's help says what it is for
//! and gives an example, because `--help` is the first manual people read.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// SIGHUP reloads the policy files (a bad one is refused and the current
    /// policy stays); SIGTERM or SIGINT stop accepting, let live connections
    /// finish for up to drain_timeout, and exit.
    ///
    /// Example: spiffe-tunnel run -c /etc/spiffe-tunnel/tunnel.toml
    Run(RunArgs),

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
