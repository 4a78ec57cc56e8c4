//! baseguard: a passthrough FUSE filesystem that guards Nova's `_base/` image cache.
//!
//! Layout (the FUSE adapter is thin; everything else is plain Rust):
//! - [`sys`]: the only module with `unsafe` and raw syscalls, behind a safe API.

/// Detaching `baseguard mount` by re-executing itself, with a READY/ERROR startup handshake.
pub mod daemon;
/// Shell completions and man pages generated from the clap command (`baseguard gen-docs`).
pub mod docgen;
/// tracing setup for stderr, a log file or syslog (`/dev/log`), with the `log` crate bridged.
pub mod logging;
/// fstab-style `-o` option parsing, and `parse_duration` for `--retain`.
pub mod mountopts;
