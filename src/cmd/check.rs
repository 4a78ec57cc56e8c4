//! `baseguard check`: every instance disk's backing chain, and the state of
//! each link: present, in the quarantine (restorable), or missing (lost).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use crate::cmd::health;
use crate::cmd::quarantine::{Location, init_logging, open_quarantine, resolve_location};
use crate::cmd::text::{exit, print_json, quote};
use crate::quarantine::{Quarantine, VersionChoice, Who};
use crate::refs::{LinkState, RefIndex, Scan};

/// `baseguard check`.
#[derive(clap::Args, Debug)]
#[command(
    about = "Check every instance disk's backing chain",
    long_about = "For every instance disk (<uuid>/disk, disk.local, disk.eph*, disk.swap, *.rescue, \
<uuid>_resize/, snapshots/*/*.delta) follow its qcow2 backing chain and report each link: \
present, quarantined (restorable, with the id), or missing (lost). A link is called lost \
only when the quarantine could be read and does not hold it. The baseguard daemon for DIR is \
probed too (2 seconds); a dead or hung one is reported, and the chains are still checked on \
the backing directory.",
    after_help = "Examples:\n  baseguard check\n  baseguard check --json | jq '.problems'\n  baseguard check --restore\n  baseguard check --dir /var/lib/nova/instances/_base\n\nDIR defaults to /var/lib/nova/instances (a baseguard mountpoint or its backing directory; \
with baseguard over _base alone, its mountpoint or the instances directory above it, whose disks \
are then read directly, never through the mount).\n\nExit status: 0 every link present; 1 a link is quarantined (restorable: 'baseguard check --restore'), or DIR's daemon is not running; 2 a link is missing and not in the quarantine (lost); 3 could not check (not root, not a baseguard directory, unreadable quarantine or disks)."
)]
pub struct CheckArgs {
    #[command(flatten)]
    pub loc: Location,
    /// Print JSON (for monitoring).
    #[arg(long)]
    pub json: bool,
    #[arg(long, requires = "json", help = crate::cmd::text::COMPACT_HELP)]
    pub compact: bool,
    /// Restore every quarantined file that a disk needs: the version the
    /// disk was created on (never one it cannot tell; see the README).
    #[arg(long)]
    pub restore: bool,
}

/// The state of one link as `check` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "state")]
pub enum LinkReport {
    Present,
    Quarantined {
        id: String,
    },
    /// Several different versions are held and which one the disk was
    /// created on cannot be told: nothing is restored automatically.
    Ambiguous {
        ids: Vec<String>,
    },
    Missing,
    External,
}

#[derive(Debug, Serialize)]
struct LinkOut {
    path: PathBuf,
    #[serde(flatten)]
    state: LinkReport,
}

#[derive(Debug, Serialize)]
struct DiskReport {
    disk: PathBuf,
    chain: Vec<LinkOut>,
}

/// `rel` (relative to the instances directory) as the quarantine records
/// it: relative to the guarded directory `prefix` (empty, or `_base` in the
/// `_base`-only layout); `None` if it is outside it.
fn in_guarded(prefix: &Path, rel: &Path) -> Option<PathBuf> {
    rel.strip_prefix(prefix)
        .ok()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
}

fn classify(scan: &Scan, q: Option<&Quarantine>, prefix: &Path) -> Vec<DiskReport> {
    scan.disks
        .iter()
        .filter(|d| !d.chain.is_empty())
        .map(|d| DiskReport {
            disk: d.disk.clone(),
            chain: d
                .chain
                .iter()
                .map(|l| {
                    let state = match l.state {
                        LinkState::Present => LinkReport::Present,
                        LinkState::External => LinkReport::External,
                        LinkState::Missing => match q.and_then(|q| {
                            let rel = in_guarded(prefix, &l.path)?;
                            Some(q.version_for(&rel, std::slice::from_ref(&d.disk)))
                        }) {
                            Some(Ok(VersionChoice::One(e))) => LinkReport::Quarantined { id: e.id },
                            Some(Ok(VersionChoice::Ambiguous(v))) => LinkReport::Ambiguous {
                                ids: v.into_iter().map(|e| e.id).collect(),
                            },
                            _ => LinkReport::Missing,
                        },
                    };
                    LinkOut {
                        path: l.path.clone(),
                        state,
                    }
                })
                .collect(),
        })
        .collect()
}

fn missing(r: &[DiskReport]) -> usize {
    r.iter()
        .flat_map(|d| &d.chain)
        .filter(|l| matches!(l.state, LinkReport::Missing))
        .count()
}

fn bad(r: &[DiskReport]) -> usize {
    r.iter()
        .flat_map(|d| &d.chain)
        .filter(|l| {
            matches!(
                l.state,
                LinkReport::Quarantined { .. } | LinkReport::Ambiguous { .. } | LinkReport::Missing
            )
        })
        .count()
}

impl CheckArgs {
    pub fn run(&self) -> ExitCode {
        init_logging();
        let b = match resolve_location(&self.loc) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("baseguard: {e}");
                return ExitCode::from(exit::CANNOT);
            }
        };
        // A quarantine we cannot read would turn every restorable link
        // into a false "lost": refuse instead.
        let q: Option<Quarantine> = match open_quarantine(&b, &self.loc) {
            Ok(q) => q,
            Err(e) => {
                eprintln!("baseguard: {e}");
                return ExitCode::from(exit::CANNOT);
            }
        };
        // A dead or hung daemon is reported (and the exit status says so),
        // but the chains are still checked, on the backing directory.
        let dead = match b.health.as_ref().and_then(|h| h.problem()) {
            Some(p) => {
                eprintln!("baseguard: {p}");
                true
            }
            None => false,
        };
        let layout = match b.layout() {
            Ok(l) => l,
            Err(e) => {
                eprintln!("baseguard: {e}");
                return ExitCode::from(exit::CANNOT);
            }
        };
        let backing_root = PathBuf::from(format!("/proc/self/fd/{}", b.fd.as_raw_fd()));
        let mut index = RefIndex::new(b.prefixes());
        // In the `_base`-only layout the chains are followed from the
        // instances directory, with `_base` read through the backing
        // descriptor (never through a mount).
        let (root, prefix) = match &layout {
            Some(l) => {
                index.map_dir(l.name.clone(), backing_root);
                (
                    PathBuf::from(format!("/proc/self/fd/{}", l.instances.as_raw_fd())),
                    l.name.clone(),
                )
            }
            None => (backing_root, PathBuf::new()),
        };
        let scan = |index: &mut RefIndex| {
            index.scan(&root).map_err(|e| {
                eprintln!("baseguard: cannot scan {}: {e}", b.path.display());
                ExitCode::from(exit::CANNOT)
            })
        };
        let mut report = match scan(&mut index) {
            Ok(s) => classify(&s, q.as_ref(), &prefix),
            Err(c) => return c,
        };
        let mut restored = Vec::new();
        if self.restore {
            if let Some(q) = &q {
                // A restored link may reveal the next link of a longer chain.
                for _ in 0..crate::refs::MAX_CHAIN_DEPTH {
                    let ids: Vec<(PathBuf, String)> = report
                        .iter()
                        .flat_map(|d| &d.chain)
                        .filter_map(|l| match &l.state {
                            LinkReport::Quarantined { id } => Some((l.path.clone(), id.clone())),
                            _ => None,
                        })
                        .collect();
                    if ids.is_empty() {
                        break;
                    }
                    for (path, id) in ids {
                        if restored.iter().any(|(p, _)| p == &path) {
                            continue;
                        }
                        match q.restore(&id, None, false, &Who::current()) {
                            Ok(_) => restored.push((path, id)),
                            Err(e) => eprintln!("baseguard: cannot restore {id}: {e}"),
                        }
                    }
                    report = match scan(&mut index) {
                        Ok(s) => classify(&s, Some(q), &prefix),
                        Err(c) => return c,
                    };
                }
            }
        }
        let problems = bad(&report);
        let lost = missing(&report);
        if self.json {
            let v = serde_json::json!({
                "disks": report,
                "problems": problems,
                "lost": lost,
                "restored": restored.iter().map(|(p, id)| serde_json::json!({"path": p, "id": id})).collect::<Vec<_>>(),
            });
            print_json(v);
        } else {
            print_table(&report, &restored);
        }
        if lost > 0 {
            ExitCode::from(exit::LOSS)
        } else if problems > 0 || dead {
            ExitCode::from(if dead {
                health::EXIT_DEAD
            } else {
                exit::ATTENTION
            })
        } else {
            ExitCode::SUCCESS
        }
    }
}

fn print_table(report: &[DiskReport], restored: &[(PathBuf, String)]) {
    for (p, id) in restored {
        println!("restored {id} to {}", quote(p.as_os_str()));
    }
    let show = |p: &Path| quote(p.as_os_str());
    for d in report {
        for (i, l) in d.chain.iter().enumerate() {
            let (p, state) = (
                &l.path,
                match &l.state {
                    LinkReport::Present => "present".to_string(),
                    LinkReport::External => {
                        "external (outside the instances directory)".to_string()
                    }
                    LinkReport::Quarantined { id } => {
                        format!("QUARANTINED, restorable: baseguard restore {id}")
                    }
                    LinkReport::Ambiguous { ids } => format!(
                        "QUARANTINED, several versions; which one the disk was created on cannot be told, \
                         so none is restored automatically: choose with baseguard restore ID (one of {})",
                        ids.join(", ")
                    ),
                    LinkReport::Missing => "MISSING (lost)".to_string(),
                },
            );
            let disk = if i == 0 { show(&d.disk) } else { String::new() };
            println!("{disk:<48} {:<56} {state}", show(p));
        }
    }
    let n = bad(report);
    let disks = report.len();
    if n == 0 {
        println!("{disks} disk(s) with backing files: every link present");
    } else {
        println!("{disks} disk(s) with backing files: {n} link(s) not present");
    }
}
