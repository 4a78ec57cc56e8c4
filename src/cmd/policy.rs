//! `baseguard policy [set]`: the policy shared by every node of a quarantine.

use std::process::ExitCode;
use std::time::Duration;

use crate::cmd::quarantine::{Location, init_logging, open_quarantine, resolve_location};
use crate::cmd::text::{self, exit, print_json, visible};
use crate::guard::Guard;
use crate::mountopts::{format_duration, parse_duration};
use crate::policy::{DEFAULT_RETAIN, MinFree, Policy};
use crate::quarantine::fmt_utc;

/// `baseguard policy`.
#[derive(clap::Args, Debug)]
#[command(
    about = "Show or set the policy every node applies (retention, free-space floor, protect/ignore globs)",
    long_about = "Show or set the policy stored with the shared quarantine (QUARANTINE/policy.json). \
Every node applies it, and so do list, status and purge. A node mounted with a longer retain= raises \
the retention for everyone; a shorter one never lowers it (the node logs a POLICY CONFLICT). Only \
'baseguard policy set' may lower it. Shared protect globs protect on every node in addition to each \
node's own protect=; a node's ignore= never lets through what the shared globs protect (the node \
logs a POLICY CONFLICT). Daemons re-read the policy every 2 s: more protection applies at once, \
less is logged as PROTECTION REDUCED.",
    after_help = "Examples:\n  baseguard policy\n  baseguard policy set --retain 30d\n  baseguard policy set --min-free 15%\n  baseguard policy set --no-min-free\n  baseguard policy set --protect '_base/**' --ignore '_base/*.part' --ignore '_base/*.converted'\n  baseguard policy set --clear-protect --clear-ignore\n\nExit status: 0 shown or set; 3 could not read or write the quarantine."
)]
pub struct PolicyArgs {
    #[command(flatten)]
    pub loc: Location,
    /// Print JSON ({"version": 1, "policy": {...}}).
    #[arg(long)]
    pub json: bool,
    #[arg(long, requires = "json", help = crate::cmd::text::COMPACT_HELP)]
    pub compact: bool,
    #[command(subcommand)]
    pub set: Option<PolicyCmd>,
}

#[derive(clap::Subcommand, Debug)]
pub enum PolicyCmd {
    /// Change the shared policy (applies to every node within one sweep).
    Set(SetArgs),
}

/// `baseguard policy set`.
#[derive(clap::Args, Debug)]
pub struct SetArgs {
    /// Keep quarantined files at least this long (30m, 12h, 14d, 2w).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub retain: Option<Duration>,
    /// Free-space floor (10%, 20G).
    #[arg(long, value_name = "N%|SIZE", value_parser = MinFree::parse, conflicts_with = "no_min_free")]
    pub min_free: Option<MinFree>,
    /// Remove the free-space floor.
    #[arg(long)]
    pub no_min_free: bool,
    /// Protect paths matching GLOB on every node, in addition to each node's
    /// own protect= (relative to the mount root, as protect= is). Repeatable;
    /// adds to the shared list.
    #[arg(long, value_name = "GLOB")]
    pub protect: Vec<String>,
    /// Let through deletions of paths matching GLOB that only the shared
    /// protect globs protect (never what a node's own protect= protects).
    /// Repeatable; adds to the shared list.
    #[arg(long, value_name = "GLOB")]
    pub ignore: Vec<String>,
    /// Empty the shared protect list first (less protection: every daemon
    /// logs it as PROTECTION REDUCED).
    #[arg(long)]
    pub clear_protect: bool,
    /// Empty the shared ignore list first.
    #[arg(long)]
    pub clear_ignore: bool,
}

/// `list` after `clear`, with `add` appended (each glob once).
fn merged(list: &[String], clear: bool, add: &[String]) -> Vec<String> {
    let mut v: Vec<String> = if clear { Vec::new() } else { list.to_vec() };
    for g in add {
        if !v.contains(g) {
            v.push(g.clone());
        }
    }
    v
}

/// The stored list of globs, empty if no policy is stored.
fn old_globs(stored: &Option<Policy>, f: fn(&Policy) -> &Vec<String>) -> &[String] {
    stored.as_ref().map(|p| f(p).as_slice()).unwrap_or(&[])
}

impl PolicyArgs {
    pub fn run(&self) -> ExitCode {
        init_logging();
        let b = match resolve_location(&self.loc) {
            Ok(b) => b,
            Err(e) => return text::fail_with(exit::CANNOT, e),
        };
        let q = match open_quarantine(&b, &self.loc) {
            Ok(Some(q)) => q,
            Ok(None) => {
                return text::fail_with(exit::CANNOT, "this baseguard mount keeps no quarantine");
            }
            Err(e) => return text::fail_with(exit::CANNOT, e),
        };
        let stored = match Policy::read(&q) {
            Ok(p) => p,
            Err(e) => {
                return text::fail_with(
                    exit::CANNOT,
                    format!(
                        "cannot read the shared policy: {e}; fix or remove that file (each running daemon writes back the policy it applies within a few seconds)"
                    ),
                );
            }
        };
        let policy = if let Some(PolicyCmd::Set(s)) = &self.set {
            if s.retain.is_none()
                && s.min_free.is_none()
                && !s.no_min_free
                && s.protect.is_empty()
                && s.ignore.is_empty()
                && !s.clear_protect
                && !s.clear_ignore
            {
                return text::fail_with(
                    exit::USAGE,
                    "nothing to set: give --retain, --min-free, --no-min-free, --protect, --ignore, --clear-protect or --clear-ignore",
                );
            }
            let protect = merged(
                old_globs(&stored, |p| &p.protect),
                s.clear_protect,
                &s.protect,
            );
            let ignore = merged(old_globs(&stored, |p| &p.ignore), s.clear_ignore, &s.ignore);
            if let Err(e) = Guard::new(&protect, &ignore) {
                return text::fail_with(exit::USAGE, e);
            }
            let old = stored.clone();
            let mut p = Policy::new(
                s.retain
                    .or(old.as_ref().map(Policy::retain))
                    .unwrap_or(DEFAULT_RETAIN),
                if s.no_min_free {
                    None
                } else {
                    s.min_free.or(old.as_ref().and_then(|p| p.min_free))
                },
                "policy set",
            );
            p.explicit = true;
            p.protect = protect;
            p.ignore = ignore;
            if let Err(e) = p.write(&q) {
                return text::fail_with(exit::CANNOT, format!("cannot store the policy: {e}"));
            }
            let before = old
                .clone()
                .unwrap_or_else(|| Policy::new(p.retain(), None, ""));
            if let Some((reduced, what)) = p.glob_change(&before) {
                if reduced {
                    eprintln!(
                        "baseguard: PROTECTION REDUCED for every node ({what}); every daemon applies it within a few seconds and logs it"
                    );
                    tracing::warn!(
                        uid = crate::sys::geteuid(),
                        "shared protection reduced: {what}"
                    );
                } else {
                    tracing::info!(
                        uid = crate::sys::geteuid(),
                        "shared protection changed: {what}"
                    );
                }
            }
            tracing::info!(
                retain_secs = p.retain_secs,
                min_free = %p.min_free.map(|m| m.to_string()).unwrap_or_else(|| "none".into()),
                uid = crate::sys::geteuid(),
                "shared policy set"
            );
            Some(p)
        } else {
            stored
        };
        if self.json {
            print_json(serde_json::json!({ "policy": policy }));
            return ExitCode::SUCCESS;
        }
        match policy {
            None => println!(
                "No shared policy stored yet (the first node to mount writes one); retain {} assumed.",
                format_duration(DEFAULT_RETAIN)
            ),
            Some(p) => {
                println!("retain:     {}", format_duration(p.retain()));
                println!(
                    "min_free:   {}",
                    p.min_free
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| "none".into())
                );
                let globs = |v: &[String]| {
                    if v.is_empty() {
                        "none".to_string()
                    } else {
                        v.iter()
                            .map(|g| text::quote_str(g))
                            .collect::<Vec<_>>()
                            .join(" ")
                    }
                };
                println!(
                    "protect:    {} (on every node, with each node's own)",
                    globs(&p.protect)
                );
                println!(
                    "ignore:     {} (narrows the shared protect only)",
                    globs(&p.ignore)
                );
                println!(
                    "set by:     {}{} at {}",
                    visible(&p.set_by),
                    if p.explicit { ", explicitly" } else { "" },
                    fmt_utc(p.set_at)
                );
            }
        }
        ExitCode::SUCCESS
    }
}
