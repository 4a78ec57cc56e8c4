//! Metrics in Prometheus' text exposition format (version 0.0.4), the way
//! operators already collect node metrics: printed by `baseguard metrics`,
//! and written by each daemon to `metrics_file=` for node_exporter's textfile
//! collector.
//!
//! What a daemon counts itself (quarantined, healed, errors since it
//! started) it also publishes in its run file,
//! `/run/baseguard/counters-<pid>.json`,
//! with its mountpoint and where its log goes, so `baseguard metrics` and
//! `baseguard status` can report every mount of the host.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::quarantine::{EntryState, Quarantine};
use crate::space::{FsSpace, Usage};

/// Where daemons publish their run files.
pub const RUN_DIR: &str = "/run/baseguard";
/// Run files are `counters-<pid>.json` (other files there are not ours).
const RUN_PREFIX: &str = "counters-";

/// One metric family.
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    /// `gauge` or `counter`.
    pub kind: &'static str,
    pub samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

impl Family {
    pub fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    pub fn one(mut self, v: f64) -> Family {
        self.samples.push((Vec::new(), v));
        self
    }
}

/// Escape a label value (backslash, double quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Render families as Prometheus text: `# HELP`, `# TYPE`, samples.
pub fn render(fams: &[Family]) -> String {
    let mut out = String::new();
    for f in fams {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, v) in &f.samples {
            let l = if labels.is_empty() {
                String::new()
            } else {
                let inner: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
                    .collect();
                format!("{{{}}}", inner.join(","))
            };
            let _ = writeln!(out, "{}{l} {v}", f.name);
        }
    }
    out
}

/// What a daemon publishes about itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunFile {
    pub pid: u32,
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
    /// Where its log goes: a path, `syslog`, `journald` or `stderr`.
    pub log: String,
    /// Its request counters (`Stats::to_json`).
    pub counters: serde_json::Value,
    /// Purged by its sweeps (expiry and the free-space floor).
    #[serde(default)]
    pub purged: u64,
    /// The options in effect (`key=value`), for `status`.
    #[serde(default)]
    pub options: Vec<String>,
    /// How requests reach it: `dev` (/dev/fuse) or `uring` (FUSE-over-io_uring).
    #[serde(default)]
    pub transport: String,
}

impl RunFile {
    pub fn path(pid: u32) -> PathBuf {
        Path::new(RUN_DIR).join(format!("{RUN_PREFIX}{pid}.json"))
    }

    /// Write atomically (errors are the caller's to log).
    pub fn write(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(RUN_DIR)?;
        let p = RunFile::path(self.pid);
        let tmp = p.with_extension("tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &p)
    }

    /// The run files of daemons still alive.
    pub fn all() -> Vec<RunFile> {
        let Ok(rd) = std::fs::read_dir(RUN_DIR) else {
            return Vec::new();
        };
        let mut v: Vec<RunFile> = rd
            .flatten()
            .filter(|d| {
                let n = d.file_name();
                let n = n.to_string_lossy();
                n.starts_with(RUN_PREFIX) && n.ends_with(".json")
            })
            .filter_map(|d| {
                let r = serde_json::from_slice::<RunFile>(&std::fs::read(d.path()).ok()?).ok()?;
                if Path::new(&format!("/proc/{}", r.pid)).exists() {
                    Some(r)
                } else {
                    // A daemon that was killed: its file is stale.
                    let _ = std::fs::remove_file(d.path());
                    None
                }
            })
            .collect();
        v.sort_by_key(|r| r.pid);
        v
    }
}

/// The quarantine-wide metrics (the same on every node sharing it).
pub fn quarantine_families(q: &Quarantine, near_misses: usize, retain_secs: u64) -> Vec<Family> {
    let now = SystemTime::now();
    let all = q.list_all().unwrap_or_default();
    let held: Vec<_> = all.iter().filter(|e| e.state == EntryState::Held).collect();
    let usage = Usage::measure(q).unwrap_or_default();
    let space = FsSpace::of(q.dir_fd().as_fd()).unwrap_or_default();
    let history = crate::audit::read(q).unwrap_or_default();
    let (restored, purged) = crate::audit::counts(&history);
    let oldest = held.iter().map(|e| e.age(now).as_secs()).max().unwrap_or(0);
    vec![
        Family::new(
            "baseguard_quarantine_entries",
            "gauge",
            "Files held in the quarantine.",
        )
        .one(held.len() as f64),
        Family::new(
            "baseguard_quarantine_bytes",
            "gauge",
            "Apparent size of the files held (each file once).",
        )
        .one(usage.apparent as f64),
        Family::new(
            "baseguard_quarantine_allocated_bytes",
            "gauge",
            "Disk space the files held use (st_blocks*512, each file once).",
        )
        .one(usage.allocated as f64),
        Family::new(
            "baseguard_quarantine_oldest_age_seconds",
            "gauge",
            "Age of the oldest file held.",
        )
        .one(oldest as f64),
        Family::new(
            "baseguard_filesystem_available_bytes",
            "gauge",
            "Space available on the backing filesystem.",
        )
        .one(space.available as f64),
        Family::new(
            "baseguard_retain_seconds",
            "gauge",
            "The shared retention time in force.",
        )
        .one(retain_secs as f64),
        Family::new(
            "baseguard_near_misses",
            "gauge",
            "Quarantined files an instance disk needs whose path is empty: restore them.",
        )
        .one(near_misses as f64),
        Family::new(
            "baseguard_quarantined_total",
            "counter",
            "Files ever quarantined (held, restored or purged within the 90-day audit trail).",
        )
        .one((all.len() as u64 + restored + purged) as f64),
        Family::new(
            "baseguard_restored_total",
            "counter",
            "Restores in the 90-day audit trail (by any node or command).",
        )
        .one(restored as f64),
        Family::new(
            "baseguard_purged_total",
            "counter",
            "Purges in the 90-day audit trail (expiry, free-space floor, purge command).",
        )
        .one(purged as f64),
    ]
}

/// Per-daemon metrics: up, and the counters each daemon keeps.
pub fn daemon_families(mounts: &[(PathBuf, String, bool)], runs: &[RunFile]) -> Vec<Family> {
    let mut up = Family::new(
        "baseguard_up",
        "gauge",
        "1 if the baseguard mount answers, 0 if its daemon is gone or hung.",
    );
    for (mp, backing, ok) in mounts {
        up.samples.push((
            vec![
                ("mountpoint", mp.display().to_string()),
                ("backing", backing.clone()),
            ],
            if *ok { 1.0 } else { 0.0 },
        ));
    }
    let mut fams = vec![up];
    let counters: BTreeMap<&str, (&'static str, &'static str)> = [
        (
            "quarantined",
            (
                "baseguard_daemon_quarantined_total",
                "Files this daemon quarantined since it started.",
            ),
        ),
        (
            "healed",
            (
                "baseguard_healed_total",
                "Quarantined files this daemon restored on access since it started.",
            ),
        ),
        (
            "errors",
            (
                "baseguard_errors_total",
                "Requests this daemon answered with an unexpected error since it started.",
            ),
        ),
    ]
    .into_iter()
    .collect();
    for (key, (name, help)) in counters {
        let mut f = Family::new(name, "counter", help);
        for r in runs {
            let v = r.counters.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
            f.samples.push((
                vec![("mountpoint", r.mountpoint.display().to_string())],
                v as f64,
            ));
        }
        fams.push(f);
    }
    let mut f = Family::new(
        "baseguard_daemon_purged_total",
        "counter",
        "Files this daemon's sweeps purged since it started (expiry and min_free).",
    );
    for r in runs {
        f.samples.push((
            vec![("mountpoint", r.mountpoint.display().to_string())],
            r.purged as f64,
        ));
    }
    fams.push(f);
    fams
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format() {
        let mut f = Family::new("baseguard_up", "gauge", "Up.");
        f.samples
            .push((vec![("mountpoint", "/a \"b\"\n".into())], 1.0));
        let s = render(&[f, Family::new("x_total", "counter", "X.").one(3.0)]);
        assert_eq!(
            s,
            "# HELP baseguard_up Up.\n# TYPE baseguard_up gauge\nbaseguard_up{mountpoint=\"/a \\\"b\\\"\\n\"} 1\n# HELP x_total X.\n# TYPE x_total counter\nx_total 3\n"
        );
    }
}
