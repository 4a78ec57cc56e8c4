//! baseguard: a passthrough FUSE filesystem that guards Nova's `_base/` image cache.
//!
//! Layout (the FUSE adapter is thin; everything else is plain Rust):
//! - [`sys`]: the only module with `unsafe` and raw syscalls, behind a safe API.
pub mod cmd;
pub mod creds;
pub mod fs;
pub mod fuse;
pub mod inode;
pub mod stats;
pub mod sys;
