//! The binary: parse the command line, set up logging, dispatch.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use spiffe_tunnel::cli::{Cli, Command, LogFormat};
use spiffe_tunnel::listen::Inherited;
use spiffe_tunnel::upgrade::{PidFile, Readiness};
use spiffe_tunnel::{agent, commands, demo, runtime};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any other thread starts: this takes the sockets passed to
    // `run` (socket activation, or the process it upgrades) and clears
    // their variables from the environment.
    let mut inherited = matches!(cli.command, Command::Run(_)).then(Inherited::from_env);
    let readiness = Readiness::new(inherited.as_mut().and_then(Inherited::take_ready));
    // The demo tells its story on stdout; its logs would only interrupt it.
    // `run` takes its filter from the config's [log] table (RUST_LOG wins).
    let default_filter = match &cli.command {
        Command::Demo(_) => "error".to_string(),
        Command::Run(args) => spiffe_tunnel::config::Config::load(&args.config)
            .ok()
            .and_then(|c| c.log.filter)
            .unwrap_or_else(|| "info".to_string()),
        _ => "info".to_string(),
    };
    init_logging(cli.log_format, &default_filter, readiness.clone());
    let code = match cli.command {
        Command::Check(args) => commands::check(&args.config),
        Command::Verify(args) => commands::verify(&args.bundles, &args.chain),
        Command::Run(args) => block_on(run(args, inherited.unwrap_or_default(), readiness)),
        Command::Upgrade(args) => commands::upgrade(&args.pid_file, args.timeout),
        Command::DevAgent(args) => block_on(dev_agent(args)),
        Command::Demo(args) => block_on(demo(args)),
        Command::Svid(command) => block_on(svid(command)),
        Command::Status(args) => {
            commands::status(args.config.as_deref(), args.admin.as_deref(), args.json)
        }
    };
    ExitCode::from(code)
}

/// Runs an async command on a multi-thread runtime sized to the cores.
fn block_on(command: impl std::future::Future<Output = u8>) -> u8 {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(command),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            commands::EXIT_FAILURE
        }
    }
}

async fn run(args: spiffe_tunnel::cli::RunArgs, inherited: Inherited, readiness: Readiness) -> u8 {
    let options = runtime::RunOptions {
        config: args.config,
        socket: args.socket,
        pid_file: args.pid_file.map(PidFile),
        inherited,
        readiness,
    };
    match runtime::run(options).await {
        Ok(()) => commands::EXIT_OK,
        Err(e) => {
            let code = e.exit_code();
            tracing::error!("{:#}", anyhow::Error::from(e));
            code
        }
    }
}

async fn dev_agent(args: spiffe_tunnel::cli::DevAgentArgs) -> u8 {
    match agent::run(args.into()).await {
        Ok(()) => commands::EXIT_OK,
        Err(e) => {
            tracing::error!("{e}");
            e.exit_code()
        }
    }
}

async fn svid(command: spiffe_tunnel::cli::SvidCommand) -> u8 {
    use spiffe_tunnel::cli::SvidCommand;
    use spiffe_tunnel::helper::{self, haproxy::HaproxyTarget, HelperOptions};
    let (fetch, watch) = match command {
        SvidCommand::Fetch(fetch) => (fetch, None),
        SvidCommand::Watch(watch) => (watch.fetch.clone(), Some(watch)),
    };
    let id = match fetch
        .id
        .as_deref()
        .map(spiffe_tunnel::spiffe_id::parse_workload_id)
    {
        Some(Err(e)) => {
            eprintln!("--id: {e}");
            return commands::EXIT_USAGE;
        }
        Some(Ok(id)) => Some(id),
        None => None,
    };
    let haproxy = fetch.haproxy_cert.clone().map(|cert| HaproxyTarget {
        socket: watch.as_ref().and_then(|w| w.haproxy_socket.clone()),
        master_socket: watch.as_ref().and_then(|w| w.haproxy_master_socket.clone()),
        cert,
        ca_file: fetch.haproxy_ca_file.clone(),
    });
    let once = watch.as_ref().is_none_or(|w| w.once);
    let options = HelperOptions {
        dir: fetch.dir,
        socket: fetch.socket,
        id,
        exec: watch.as_ref().and_then(|w| w.exec.clone()),
        signal: watch
            .as_ref()
            .and_then(|w| w.signal.clone().zip(w.pid_file.clone())),
        haproxy,
        once,
        timeout: fetch.timeout,
    };
    let result = if once {
        helper::fetch(options).await
    } else {
        helper::run(options).await
    };
    match result {
        Ok(()) => commands::EXIT_OK,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

async fn demo(args: spiffe_tunnel::cli::DemoArgs) -> u8 {
    match demo::run(demo::DemoOptions { keep: args.keep }).await {
        Ok(()) => commands::EXIT_OK,
        Err(e) => {
            eprintln!("demo failed: {:#}", anyhow::Error::from(e));
            commands::EXIT_FAILURE
        }
    }
}

/// Logs go to stderr; `run` started by an upgrade also copies them to the
/// previous process until it is ready (see `upgrade::Readiness`).
fn init_logging(format: LogFormat, default_filter: &str, writer: Readiness) {
    // Filters are normalized first: see config::normalize_log_filter.
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .map(|f| spiffe_tunnel::config::normalize_log_filter(&f))
        .and_then(|f| EnvFilter::try_new(f).ok());
    let filter = from_env.unwrap_or_else(|| {
        EnvFilter::try_new(spiffe_tunnel::config::normalize_log_filter(default_filter))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        // Colour only for people at a terminal, never into journald or files.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
