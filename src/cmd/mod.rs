//! Command-line subcommands.
pub mod quarantine;
