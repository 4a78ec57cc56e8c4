//! The `baseguard` subcommands.
pub mod check;
pub mod health;
pub mod mount;
pub mod quarantine;
pub mod upgrade;
