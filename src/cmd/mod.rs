//! The `baseguard` subcommands.
pub mod mount;
pub mod quarantine;
