//! baseguard: a passthrough FUSE filesystem that guards Nova's `_base/` image cache.
//!
//! Layout (the FUSE adapter is thin; everything else is plain Rust):
//! - [`sys`]: the only module with `unsafe` and raw syscalls, behind a safe API.
//! - [`inode`]: the inode store (backing `(dev, ino)`, file handles, bounded descriptors).
//! - [`creds`]: per-thread caller credentials (fsuid, fsgid, groups).
//! - [`fs`]: the passthrough filesystem as a plain Rust type.
//! - [`fuse`]: the thin `fuser` adapter.
//! - [`stats`]: request counters.
//! - [`guard`]: the policy deciding which paths are protected (globs, no I/O).
//! - [`quarantine`]: the on-disk quarantine store (stash, list, restore, purge).
//! - [`qcow2`]: defensive qcow2 header parsing (backing file name and format).
//! - [`heal`]: the daemon's shared reference index (restore on access, keep on expiry).
//! - [`refs`]: the reference index: which `_base` files instance disks' backing chains use.
//! - [`space`]: what the quarantine holds on disk (allocated, hard links once) and free space.
//! - [`floor`]: the free-space floor (`min_free=`): purge the oldest unreferenced entries.
//! - [`cmd`]: the `baseguard` subcommands.
//! - [`config`]: the node-local configuration file (`/etc/baseguard/baseguard.toml`).
//! - [`audit`]: the audit trail of restores and purges (`list --history`).
//! - [`metrics`]: Prometheus text format metrics and the daemons' run files.
//! - [`mountopts`]: fstab-style `-o` option parsing and `parse_duration`.
//! - [`mountinfo`]: `/proc/self/mountinfo` parsing.
//! - [`policy`]: the shared policy (retention, free-space floor) stored with the quarantine.
//! - [`daemon`]: detaching `baseguard mount` with a READY/ERROR startup handshake.
//! - [`logging`]: tracing to stderr, a log file or syslog, with `log` bridged.
//! - [`docgen`]: shell completions and man pages from the clap command.

pub mod audit;
pub mod bdi;
pub mod cmd;
pub mod config;
pub mod creds;
pub mod daemon;
pub mod docgen;
pub mod floor;
pub mod fs;
pub mod fuse;
pub mod guard;
pub mod heal;
pub mod inode;
pub mod lockwait;
pub mod logging;
pub mod metrics;
pub mod mountinfo;
pub mod mountopts;
pub mod policy;
pub mod qcow2;
pub mod quarantine;
pub mod refs;
pub mod session;
pub mod space;
pub mod stats;
pub mod sys;
