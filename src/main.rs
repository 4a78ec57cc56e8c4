use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use baseguard::cmd::check::CheckArgs;
use baseguard::cmd::health::UmountArgs;
use baseguard::cmd::mount::MountArgs;
use baseguard::cmd::quarantine::{ListArgs, PurgeArgs, RestoreArgs, ShowArgs, StatusArgs};
use baseguard::cmd::upgrade::UpgradeArgs;

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
    /// Mount BACKING at MOUNTPOINT (detaches once it answers; -f to stay).
    Mount(MountArgs),
    Umount(UmountArgs),
    List(ListArgs),
    Show(ShowArgs),
    Restore(RestoreArgs),
    Purge(PurgeArgs),
    Status(StatusArgs),
    Check(CheckArgs),
    Upgrade(UpgradeArgs),
    /// Write the man pages and shell completions into DIR.
    #[command(hide = true)]
    GenDocs {
        dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Mount(a) => a.run(),
        Cmd::Umount(a) => a.run(),
        Cmd::List(a) => a.run(),
        Cmd::Show(a) => a.run(),
        Cmd::Restore(a) => a.run(),
        Cmd::Purge(a) => a.run(),
        Cmd::Status(a) => a.run(),
        Cmd::Check(a) => a.run(),
        Cmd::Upgrade(a) => a.run(),
        Cmd::GenDocs { dir } => {
            match baseguard::docgen::write_completions_and_man(Cli::command(), &dir) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("baseguard: cannot write docs to {}: {e}", dir.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}
