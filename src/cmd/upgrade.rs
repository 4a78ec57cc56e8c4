//! `baseguard upgrade MOUNTPOINT`: hand a live mount to a serving process started from a
//! new binary, with no request lost and no handle closed.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::session::supervisor;

/// Hand a live mount to a new serving process (e.g. after installing a new baseguard),
/// under load: open files, locks and requests in flight carry over.
#[derive(Args, Debug, Clone)]
#[command(after_help = "\
Examples:
  baseguard upgrade /var/lib/nova/instances
  baseguard upgrade /var/lib/nova/instances --binary /usr/local/bin/baseguard.new")]
pub struct UpgradeArgs {
    /// The baseguard mountpoint.
    pub mountpoint: PathBuf,
    /// The binary to serve from [default: this baseguard binary].
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

impl UpgradeArgs {
    pub fn run(self) -> ExitCode {
        let binary = match self
            .binary
            .clone()
            .map(Ok)
            .unwrap_or_else(std::env::current_exe)
        {
            Ok(b) => std::fs::canonicalize(&b).unwrap_or(b),
            Err(e) => {
                eprintln!("baseguard: cannot find the baseguard binary: {e}");
                return ExitCode::FAILURE;
            }
        };
        match supervisor::upgrade(&self.mountpoint, &binary) {
            Ok(pid) => {
                println!(
                    "{} is served by {} (pid {pid})",
                    self.mountpoint.display(),
                    binary.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "baseguard: upgrade of {} failed: {e}",
                    self.mountpoint.display()
                );
                ExitCode::FAILURE
            }
        }
    }
}
