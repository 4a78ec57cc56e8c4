//! `cargo bench --bench baseguard -- [flags]`: runs `benches/baseguard_bench.py`.
//!
//! The harness itself is the Python driver (standard library only); this
//! `harness = false` target only hands it the baseguard binary that cargo just
//! built for the bench profile (`CARGO_BIN_EXE_baseguard`) and passes the flags
//! through. See `benches/README.md`.
//!
//! `cargo test --all-targets` also builds and runs bench targets, but without
//! `--bench`: then this exits at once so the benchmark never runs as a test.

use std::process::{Command, ExitCode};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/baseguard_bench.py");

fn main() -> ExitCode {
    let mut bench_mode = false;
    let mut args = Vec::new();
    for arg in std::env::args_os().skip(1) {
        if arg == "--bench" {
            bench_mode = true;
        } else {
            args.push(arg);
        }
    }
    if !bench_mode {
        println!(
            "baseguard bench: not run under `cargo test`; use `cargo bench --bench baseguard`"
        );
        return ExitCode::SUCCESS;
    }
    let python = ["/usr/bin/python3", "python3"]
        .into_iter()
        .find(|p| Command::new(p).arg("--version").output().is_ok());
    let Some(python) = python else {
        eprintln!(
            "baseguard bench: python3 not found; install it with:\n    apt-get install -y python3"
        );
        return ExitCode::from(2);
    };
    let status = Command::new(python)
        .arg(SCRIPT)
        .args(args)
        .env("BASEGUARD_BENCH_CARGO_BIN", env!("CARGO_BIN_EXE_baseguard"))
        .status();
    match status {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => {
            eprintln!("baseguard bench: driver failed: {s}");
            ExitCode::from(u8::try_from(s.code().unwrap_or(1)).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("baseguard bench: cannot run {python} {SCRIPT}: {e}");
            ExitCode::from(2)
        }
    }
}
