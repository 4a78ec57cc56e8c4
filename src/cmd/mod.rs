//! The `baseguard` subcommands.
pub mod check;
pub mod health;
pub mod metrics;
pub mod mount;
pub mod policy;
pub mod quarantine;
pub mod text;
pub mod upgrade;
