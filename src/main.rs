use std::process::ExitCode;

use baseguard::cmd::quarantine::{ListArgs, PurgeArgs, RestoreArgs, ShowArgs, StatusArgs};
use clap::{Parser, Subcommand};

/// baseguard: deletions under Nova's _base/ go to a quarantine instead.
#[derive(Parser)]
#[command(name = "baseguard", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    List(ListArgs),
    Show(ShowArgs),
    Restore(RestoreArgs),
    Purge(PurgeArgs),
    Status(StatusArgs),
}

fn main() -> ExitCode {
    // Single-threaded until a command runs: the quarantine commands may need
    // to unshare their mount namespace first thing.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::List(a) => a.run(),
        Cmd::Show(a) => a.run(),
        Cmd::Restore(a) => a.run(),
        Cmd::Purge(a) => a.run(),
        Cmd::Status(a) => a.run(),
    }
}
