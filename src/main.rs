//! The binary: parse the command line, set up logging, dispatch.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use spiffe_tunnel::cli::{Cli, Command, LogFormat};
use spiffe_tunnel::{commands, runtime};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let code = match cli.command {
        Command::Check(args) => commands::check(&args.config),
        Command::Verify(args) => commands::verify(&args.bundles, &args.chain),
        Command::Run(args) => run(args),
    };
    ExitCode::from(code)
}

fn run(args: spiffe_tunnel::cli::RunArgs) -> u8 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return commands::EXIT_FAILURE;
        }
    };
    let options = runtime::RunOptions {
        config: args.config,
        socket: args.socket,
    };
    match runtime.block_on(runtime::run(options)) {
        Ok(()) => commands::EXIT_OK,
        Err(e) => {
            let error = anyhow::Error::from(e);
            tracing::error!("{error:#}");
            error
                .downcast_ref::<runtime::RunError>()
                .map_or(commands::EXIT_FAILURE, runtime::RunError::exit_code)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for people at a terminal, never into journald or files.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
