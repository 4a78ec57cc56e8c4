use std::process::ExitCode;

use clap::{Parser, Subcommand};

use baseguard::cmd::mount::MountArgs;

/// baseguard stands guard over Nova's shared instances directory: every
/// operation passes through to the real directory at native speed, but a
/// deletion under _base/ becomes a move into a quarantine, listed and restored
/// with this command.
#[derive(Parser)]
#[command(name = "baseguard", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount BACKING at MOUNTPOINT (runs until unmounted).
    Mount(MountArgs),
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Mount(a) => a.run(),
    }
}
