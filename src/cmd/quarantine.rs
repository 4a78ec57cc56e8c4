//! quarantine CLI
