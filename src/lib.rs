//! baseguard: a passthrough FUSE filesystem that guards Nova's `_base/` image cache.
//!
//! Layout (the FUSE adapter is thin; everything else is plain Rust):
//! - [`sys`]: the only module with `unsafe` and raw syscalls, behind a safe API.
//! - [`qcow2`]: defensive qcow2 header parsing (backing file name and format).
//! - [`refs`]: the reference index: which `_base` files instance disks' backing chains use.

pub mod qcow2;
pub mod refs;
