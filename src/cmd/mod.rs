//! The `baseguard` subcommands.
pub mod mount;
