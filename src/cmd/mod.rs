//! The `baseguard` subcommands.
pub mod check;
pub mod metrics;
pub mod mount;
pub mod policy;
pub mod quarantine;
pub mod text;
