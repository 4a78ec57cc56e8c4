//! baseguard: a passthrough FUSE filesystem that guards Nova's `_base/` image cache.
//!
//! Layout (the FUSE adapter is thin; everything else is plain Rust):
//! - [`sys`]: the only module with `unsafe` and raw syscalls, behind a safe API.
//! - [`guard`]: the policy deciding which paths are protected (globs, no I/O).
//! - [`quarantine`]: the on-disk quarantine store (stash, list, restore, purge).
//! - [`cmd`]: the command-line subcommands.
pub mod cmd;
pub mod guard;
pub mod quarantine;
pub mod sys;
