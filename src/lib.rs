//! baseguard: a passthrough FUSE filesystem that guards Nova's `_base/` image cache.
//!
//! Layout (the FUSE adapter is thin; everything else is plain Rust):
//! - [`sys`]: the only module with `unsafe` and raw syscalls, behind a safe API.

/// fstab-style `-o` option parsing, and `parse_duration` for `--retain`.
pub mod mountopts;
