//! `baseguard check`: every instance disk's backing chain, and the state of
//! each link: present, in the quarantine (restorable), or missing (lost).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::Serialize;

use crate::cmd::quarantine::{Location, init_logging, open_quarantine, resolve_backing};
use crate::cmd::text::{exit, print_json, quote};
use crate::quarantine::{Quarantine, Who};
use crate::refs::{LinkState, RefIndex, Scan};

/// `baseguard check`.
#[derive(clap::Args, Debug)]
#[command(
    about = "Check every instance disk's backing chain",
    long_about = "For every instance disk (<uuid>/disk, disk.local, disk.eph*, disk.swap, *.rescue, \
<uuid>_resize/, snapshots/*/*.delta) follow its qcow2 backing chain and report each link: \
present, quarantined (restorable, with the id), or missing (lost). A link is called lost \
only when the quarantine could be read and does not hold it.",
    after_help = "Examples:\n  baseguard check\n  baseguard check --json | jq '.problems'\n  baseguard check --restore\n\nDIR defaults to /var/lib/nova/instances (a baseguard mountpoint or its backing directory).\n\nExit status: 0 every link present; 1 a link is quarantined (restorable: 'baseguard check --restore'); 2 a link is missing and not in the quarantine (lost); 3 could not check (not root, not a baseguard directory, unreadable quarantine or disks)."
)]
pub struct CheckArgs {
    #[command(flatten)]
    pub loc: Location,
    /// Print JSON (for monitoring).
    #[arg(long)]
    pub json: bool,
    /// Restore every quarantined file that a disk needs (newest entry).
    #[arg(long)]
    pub restore: bool,
}

/// The state of one link as `check` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "state")]
pub enum LinkReport {
    Present,
    Quarantined { id: String },
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

fn classify(scan: &Scan, q: Option<&Quarantine>) -> Vec<DiskReport> {
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
                        LinkState::Missing => match q.and_then(|q| q.latest_for(&l.path)) {
                            Some(e) => LinkReport::Quarantined { id: e.id },
                            None => LinkReport::Missing,
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
                LinkReport::Quarantined { .. } | LinkReport::Missing
            )
        })
        .count()
}

impl CheckArgs {
    pub fn run(&self) -> ExitCode {
        init_logging();
        let b = match resolve_backing(&self.loc.dir) {
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
        let root = PathBuf::from(format!("/proc/self/fd/{}", b.fd.as_raw_fd()));
        let mut index = RefIndex::new(vec![b.dir.clone(), b.path.clone()]);
        let scan = |index: &mut RefIndex| {
            index.scan(&root).map_err(|e| {
                eprintln!("baseguard: cannot scan {}: {e}", b.path.display());
                ExitCode::from(exit::CANNOT)
            })
        };
        let mut report = match scan(&mut index) {
            Ok(s) => classify(&s, q.as_ref()),
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
                        Ok(s) => classify(&s, Some(q)),
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
        } else if problems > 0 {
            ExitCode::from(exit::ATTENTION)
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
