use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use baseguard::cmd::check::CheckArgs;
use baseguard::cmd::health::UmountArgs;
use baseguard::cmd::metrics::MetricsArgs;
use baseguard::cmd::mount::MountArgs;
use baseguard::cmd::policy::PolicyArgs;
use baseguard::cmd::quarantine::{ListArgs, PurgeArgs, RestoreArgs, ShowArgs, StatusArgs};
use baseguard::cmd::upgrade::UpgradeArgs;

/// baseguard stands guard over Nova's shared instances directory: every
/// operation passes through to the real directory at native speed, but a
/// deletion under _base/ becomes a move into a quarantine, listed and restored
/// with this command.
#[derive(Parser)]
#[command(name = "baseguard", version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("BASEGUARD_COMMIT"), ")"), propagate_version = true, after_help = baseguard::cmd::text::EXIT_HELP)]
struct Cli {
    /// Node-local defaults from FILE (TOML) [default: $BASEGUARD_CONFIG, else
    /// /etc/baseguard/baseguard.toml if it exists].
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount BACKING at MOUNTPOINT (detaches once it answers; -f to stay).
    Mount(Box<MountArgs>),
    Umount(UmountArgs),
    List(ListArgs),
    Show(ShowArgs),
    Restore(RestoreArgs),
    Purge(PurgeArgs),
    Status(StatusArgs),
    Check(CheckArgs),
    Upgrade(UpgradeArgs),
    Policy(PolicyArgs),
    Metrics(MetricsArgs),
    /// Write the man pages and shell completions into DIR.
    #[command(hide = true)]
    GenDocs {
        dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    // The subcommand: the first word that is neither an option nor the value
    // of `--config FILE`.
    let daemon = {
        let mut it = std::env::args_os().skip(1);
        let mut sub = None;
        while let Some(a) = it.next() {
            if a == "--config" {
                it.next();
            } else if !a.to_string_lossy().starts_with('-') {
                sub = Some(a);
                break;
            }
        }
        sub.is_some_and(|a| a == "mount")
    };
    if !daemon {
        // `baseguard list | head`: end quietly, as ls does, instead of a
        // panic on the next write to the closed pipe.
        baseguard::sys::default_sigpipe();
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(match e.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                    if !e.use_stderr() =>
                {
                    0
                }
                // mount(8)'s convention for a helper: 1 is a usage error.
                _ if daemon => 1,
                _ => baseguard::cmd::text::exit::USAGE,
            });
        }
    };
    // The configuration file: a mount's serving process gets what its
    // supervisor read (never a file edited since); everything else reads it.
    let loaded = match &cli.cmd {
        Cmd::Mount(a) if a.config_json.is_some() => {
            baseguard::config::Config::from_json(a.config_json.as_deref().unwrap_or_default())
        }
        _ => baseguard::config::Config::load(cli.config.as_deref()),
    };
    match loaded {
        Ok(c) => baseguard::config::install(c),
        Err(msg) => {
            eprintln!("baseguard: {msg}");
            // mount(8)'s convention for a helper: 1; the commands: a usage error.
            return ExitCode::from(if daemon {
                1
            } else {
                baseguard::cmd::text::exit::USAGE
            });
        }
    }
    let compact = match &cli.cmd {
        Cmd::List(a) => a.compact,
        Cmd::Show(a) => a.compact,
        Cmd::Purge(a) => a.compact,
        Cmd::Status(a) => a.compact,
        Cmd::Check(a) => a.compact,
        Cmd::Policy(a) => a.compact,
        _ => false,
    };
    baseguard::cmd::text::set_json_style(compact);
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
        Cmd::Policy(a) => a.run(),
        Cmd::Metrics(a) => a.run(),
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
