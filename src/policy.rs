//! The shared policy: one retention time and one free-space floor for every
//! node that shares a quarantine, stored with it (`<q>/policy.json`).
//!
//! Nodes mount with their own `retain=`/`min_free=` options; those are
//! proposals. The first node to mount writes the policy. Later, a node whose
//! `retain=` is longer raises the stored retention (retention is never
//! shortened by a mount option: the longest wins), and a node whose `retain=`
//! is shorter logs the conflict and applies the stored one. Only an explicit
//! `baseguard policy set` may shorten it (it marks the policy `explicit`, and
//! mount options then no longer raise it either). Every daemon re-reads the
//! file before each sweep, and the commands (`list`, `status`, `purge`,
//! `show`) use it instead of a default of their own.
//!
//! The file is replaced atomically (temporary file, fsync, rename), so a
//! reader sees the old or the new policy, never a torn one.

use std::ffi::CString;
use std::fmt;
use std::io::{self, Read, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::guard::Guard;
use crate::quarantine::{Quarantine, unix_now};
use crate::sys;

/// The policy file's name inside the quarantine directory.
pub const FILE: &str = "policy.json";

/// How long quarantined files are kept when nobody said otherwise.
pub const DEFAULT_RETAIN: Duration = Duration::from_secs(14 * 86400);

/// A free-space floor: a share of the filesystem or a number of bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MinFree {
    Percent(f64),
    Bytes(u64),
}

impl MinFree {
    /// `40%`, `12.5%`, `10G`, `500M`, `2T`, `1048576` (binary units: K, M, G,
    /// T, with or without `iB`).
    pub fn parse(s: &str) -> Result<MinFree, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{t}` is not a percentage (write e.g. 10%)"))?;
            if !(0.0..100.0).contains(&v) {
                return Err(format!("`{t}` must be at least 0% and below 100%"));
            }
            return Ok(MinFree::Percent(v));
        }
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "`{t}` is neither a percentage nor a size (write e.g. 10% or 20G)"
            ));
        }
        let (num, unit) = t.split_at(digits);
        let n: u64 = num.parse().map_err(|_| format!("`{t}` is too large"))?;
        let shift = match unit.trim().trim_end_matches("iB").trim_end_matches('B') {
            "" => 0,
            "K" | "k" => 10,
            "M" => 20,
            "G" => 30,
            "T" => 40,
            _ => {
                return Err(format!(
                    "`{t}` has an unknown unit (use K, M, G or T, or a percentage)"
                ));
            }
        };
        n.checked_mul(1u64 << shift)
            .map(MinFree::Bytes)
            .ok_or_else(|| format!("`{t}` is too large"))
    }

    /// The floor in bytes on a filesystem of `total` bytes.
    pub fn bytes(&self, total: u64) -> u64 {
        match *self {
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
            MinFree::Bytes(b) => b,
        }
    }
}

impl fmt::Display for MinFree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MinFree::Percent(p) => write!(f, "{p}%"),
            MinFree::Bytes(b) => write!(f, "{b}"),
        }
    }
}

impl Serialize for MinFree {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MinFree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MinFree, D::Error> {
        let s = String::deserialize(d)?;
        MinFree::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The stored policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub version: u32,
    /// Keep quarantined files at least this many seconds.
    pub retain_secs: u64,
    /// Purge the oldest unreferenced entries while the backing filesystem
    /// has less free space than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free: Option<MinFree>,
    /// Protected on every node, in addition to each node's own `protect=`
    /// (globs relative to the mount root, as the mount options'). Only
    /// `baseguard policy set` changes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protect: Vec<String>,
    /// Narrow the shared `protect` globs (Nova's download temporaries, say).
    /// They never let through what a node's own globs protect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<String>,
    /// Set with `baseguard policy set` (mount options no longer change it).
    #[serde(default)]
    pub explicit: bool,
    /// Who wrote it last: `host` (`mount` or `policy set`).
    #[serde(default)]
    pub set_by: String,
    /// When, in seconds since the epoch.
    #[serde(default)]
    pub set_at: u64,
}

impl Policy {
    /// A policy with this retention and floor, written by this host now.
    pub fn new(retain: Duration, min_free: Option<MinFree>, by: &str) -> Policy {
        Policy {
            version: 1,
            retain_secs: retain.as_secs(),
            min_free,
            protect: Vec::new(),
            ignore: Vec::new(),
            explicit: false,
            set_by: format!("{} ({by})", sys::hostname()),
            set_at: unix_now(),
        }
    }

    pub fn retain(&self) -> Duration {
        Duration::from_secs(self.retain_secs)
    }

    /// The shared globs as a guard layer (see [`crate::guard::LiveGuard`]).
    pub fn shared_guard(&self) -> Result<Guard, String> {
        Guard::new(&self.protect, &self.ignore)
            .map_err(|e| format!("the shared policy's globs are invalid: {e}"))
    }

    /// What changed in the shared globs from `old` to `self`, if anything:
    /// `Some((reduced, sentence))`. Less protection is a protect glob gone
    /// or an ignore glob added.
    pub fn glob_change(&self, old: &Policy) -> Option<(bool, String)> {
        let gone = |a: &[String], b: &[String]| -> Vec<String> {
            a.iter().filter(|g| !b.contains(g)).cloned().collect()
        };
        let (p_gone, p_new) = (
            gone(&old.protect, &self.protect),
            gone(&self.protect, &old.protect),
        );
        let (i_gone, i_new) = (
            gone(&old.ignore, &self.ignore),
            gone(&self.ignore, &old.ignore),
        );
        if p_gone.is_empty() && p_new.is_empty() && i_gone.is_empty() && i_new.is_empty() {
            return None;
        }
        let mut parts = Vec::new();
        if !p_new.is_empty() {
            parts.push(format!("now protected: {}", p_new.join(" ")));
        }
        if !i_gone.is_empty() {
            parts.push(format!("no longer ignored: {}", i_gone.join(" ")));
        }
        if !p_gone.is_empty() {
            parts.push(format!("no longer protected: {}", p_gone.join(" ")));
        }
        if !i_new.is_empty() {
            parts.push(format!("now ignored: {}", i_new.join(" ")));
        }
        let reduced = !p_gone.is_empty() || !i_new.is_empty();
        Some((reduced, parts.join("; ")))
    }

    /// The stored policy, `None` if there is none yet.
    pub fn read(q: &Quarantine) -> io::Result<Option<Policy>> {
        let name = CString::new(FILE).unwrap_or_default();
        let fd = match sys::openat(q.dir_fd(), &name, libc::O_RDONLY | libc::O_NOFOLLOW, 0) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut s = String::new();
        let mut f = std::fs::File::from(fd);
        f.read_to_string(&mut s)?;
        serde_json::from_str(&s)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{FILE}: {e}")))
    }

    /// Replace the stored policy atomically.
    pub fn write(&self, q: &Quarantine) -> io::Result<()> {
        let tmp = format!(".{FILE}.{}-{}", sys::hostname(), std::process::id());
        let tmp_c = CString::new(tmp.clone()).unwrap_or_default();
        let fd = sys::openat(
            q.dir_fd(),
            &tmp_c,
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NOFOLLOW,
            0o600,
        )?;
        let mut f = std::fs::File::from(fd);
        let body = serde_json::to_string_pretty(self).map_err(io::Error::other)? + "\n";
        let r = f.write_all(body.as_bytes()).and_then(|_| f.sync_all());
        if let Err(e) = r {
            let _ = sys::unlinkat(q.dir_fd(), &tmp_c, 0);
            return Err(e);
        }
        let name = CString::new(FILE).unwrap_or_default();
        sys::renameat2(q.dir_fd(), &tmp_c, q.dir_fd(), &name, 0).inspect_err(|_| {
            let _ = sys::unlinkat(q.dir_fd(), &tmp_c, 0);
        })
    }
}

/// What a node's own options do to the stored policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Reconciled {
    /// The policy now in force (and stored, unless storing failed).
    pub policy: Policy,
    /// Sentences for the log: conflicts and changes.
    pub notes: Vec<Note>,
}

/// One thing worth logging about the policy.
#[derive(Clone, Debug, PartialEq)]
pub enum Note {
    /// No policy was stored: this node's became it.
    Created,
    /// This node's longer retention raised the stored one.
    Raised { from: Duration, to: Duration },
    /// This node asked for a shorter retention; the stored one applies.
    Conflict { mine: Duration, stored: Duration },
    /// This node's min_free differs from the stored one, which applies.
    FloorConflict {
        mine: MinFree,
        stored: Option<MinFree>,
    },
    /// The policy could not be stored (the node applies it anyway).
    WriteFailed(String),
    /// This node ignores globs the shared policy does not: what the shared
    /// policy protects stays protected here.
    IgnoreConflict { globs: Vec<String> },
}

/// This node's ignore globs that the shared policy, which protects
/// something, does not have (a conflict: they cannot let through what the
/// shared policy protects).
pub fn ignore_conflict(node_ignore: &[&str], p: &Policy) -> Option<Note> {
    if p.protect.is_empty() {
        return None;
    }
    let globs: Vec<String> = node_ignore
        .iter()
        .filter(|g| !p.ignore.iter().any(|s| s == *g))
        .map(|g| g.to_string())
        .collect();
    (!globs.is_empty()).then_some(Note::IgnoreConflict { globs })
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = crate::mountopts::format_duration;
        match self {
            Note::Created => write!(
                f,
                "no shared policy yet: this node's options are now the shared policy"
            ),
            Note::Raised { from, to } => write!(
                f,
                "this node's retain={} is longer than the shared policy's {}: the shared retention is raised to {} for every node",
                d(*to),
                d(*from),
                d(*to)
            ),
            Note::Conflict { mine, stored } => write!(
                f,
                "POLICY CONFLICT: this node was mounted with retain={} but the shared policy keeps files {}; retention is never shortened by a mount option, so {} applies (change it for every node with 'baseguard policy set --retain')",
                d(*mine),
                d(*stored),
                d(*stored)
            ),
            Note::FloorConflict { mine, stored } => write!(
                f,
                "POLICY CONFLICT: this node was mounted with min_free={mine} but the shared policy has {}; the shared one applies (change it with 'baseguard policy set --min-free')",
                stored
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "none".into())
            ),
            Note::WriteFailed(e) => write!(f, "cannot store the shared policy: {e}"),
            Note::IgnoreConflict { globs } => write!(
                f,
                "POLICY CONFLICT: this node ignores {} but the shared policy does not; what the shared policy protects stays protected on this node (add them for every node with 'baseguard policy set --ignore GLOB')",
                globs.join(" ")
            ),
        }
    }
}

/// What a daemon's options in effect (`key=value`, as `status` shows them)
/// ask for that the shared policy `p` does not apply: one sentence each.
pub fn conflicts_of(options: &[String], p: &Policy) -> Vec<String> {
    let mut out = Vec::new();
    let value = |k: &str| {
        options
            .iter()
            .filter_map(|o| o.strip_prefix(k)?.strip_prefix('='))
            .next_back()
    };
    if let Some(r) = value("retain")
        && let Ok(mine) = crate::mountopts::parse_duration(r)
        && mine != p.retain()
        && (mine < p.retain() || p.explicit)
    {
        out.push(format!(
            "retain={r} is not applied: the shared policy keeps files {}",
            crate::mountopts::format_duration(p.retain())
        ));
    }
    if let Some(m) = value("min_free")
        && let Ok(mine) = MinFree::parse(m)
        && p.min_free != Some(mine)
    {
        out.push(format!(
            "min_free={m} is not applied: the shared policy has {}",
            p.min_free.map_or("none".to_string(), |s| s.to_string())
        ));
    }
    let ignores: Vec<&str> = options
        .iter()
        .filter_map(|o| o.strip_prefix("ignore="))
        .collect();
    if let Some(Note::IgnoreConflict { globs }) = ignore_conflict(&ignores, p) {
        out.push(format!(
            "ignore={} does not let through what the shared policy protects",
            globs.join(",ignore=")
        ));
    }
    out
}

/// Merge this node's options into the stored policy (see the module docs):
/// the longest retention wins unless the policy was set explicitly.
/// `stored` is what [`Policy::read`] returned.
pub fn reconcile(
    stored: Option<Policy>,
    retain: Option<Duration>,
    min_free: Option<MinFree>,
) -> (Policy, Vec<Note>, bool) {
    let mut notes = Vec::new();
    let Some(mut p) = stored else {
        notes.push(Note::Created);
        return (
            Policy::new(retain.unwrap_or(DEFAULT_RETAIN), min_free, "mount"),
            notes,
            true,
        );
    };
    let mut changed = false;
    if let Some(mine) = retain {
        if mine > p.retain() && !p.explicit {
            notes.push(Note::Raised {
                from: p.retain(),
                to: mine,
            });
            p.retain_secs = mine.as_secs();
            changed = true;
        } else if mine != p.retain() {
            notes.push(Note::Conflict {
                mine,
                stored: p.retain(),
            });
        }
    }
    if let Some(mine) = min_free {
        if p.min_free.is_none() && !p.explicit {
            p.min_free = Some(mine);
            changed = true;
        } else if p.min_free != Some(mine) {
            notes.push(Note::FloorConflict {
                mine,
                stored: p.min_free,
            });
        }
    }
    if changed {
        let n = Policy::new(p.retain(), p.min_free, "mount");
        p.set_by = n.set_by;
        p.set_at = n.set_at;
    }
    (p, notes, changed)
}

/// Read, merge and (if it changed) store the policy for a mounting node.
pub fn reconcile_stored(
    q: &Quarantine,
    retain: Option<Duration>,
    min_free: Option<MinFree>,
) -> Reconciled {
    let stored = match Policy::read(q) {
        Ok(p) => p,
        Err(e) => {
            // An unreadable policy is replaced (it could only shorten
            // nothing: a fresh one starts from this node's options).
            tracing::warn!(error = %e, "the shared policy is unreadable; writing a new one");
            None
        }
    };
    let (policy, mut notes, changed) = reconcile(stored, retain, min_free);
    if changed && let Err(e) = policy.write(q) {
        notes.push(Note::WriteFailed(e.to_string()));
    }
    Reconciled { policy, notes }
}

/// The retention the commands apply: `--retain` if given, else the stored
/// policy's, else the default.
pub fn retain_for_cli(q: Option<&Quarantine>, arg: Option<Duration>) -> Duration {
    arg.or_else(|| {
        q.and_then(|q| Policy::read(q).ok().flatten())
            .map(|p| p.retain())
    })
    .unwrap_or(DEFAULT_RETAIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_free_parses() {
        assert_eq!(MinFree::parse("40%").unwrap(), MinFree::Percent(40.0));
        assert_eq!(MinFree::parse("10G").unwrap(), MinFree::Bytes(10 << 30));
        assert_eq!(MinFree::parse("512MiB").unwrap(), MinFree::Bytes(512 << 20));
        assert_eq!(MinFree::parse("4096").unwrap(), MinFree::Bytes(4096));
        assert!(MinFree::parse("100%").is_err());
        assert!(MinFree::parse("lots").is_err());
        assert!(MinFree::parse("3X").is_err());
        assert_eq!(MinFree::Percent(40.0).bytes(1000), 400);
    }

    #[test]
    fn shared_globs_union_and_conflicts() {
        let mut p = Policy::new(DEFAULT_RETAIN, None, "test");
        // No shared protection: a node's ignore= conflicts with nothing.
        assert_eq!(ignore_conflict(&["_base/*.part"], &p), None);
        let before = p.clone();
        p.protect = vec!["_base/**".into()];
        p.ignore = vec!["_base/*.part".into()];
        assert_eq!(
            ignore_conflict(&["_base/*.part", "_base/*.converted"], &p),
            Some(Note::IgnoreConflict {
                globs: vec!["_base/*.converted".into()]
            })
        );
        // More protection, then less.
        let (reduced, what) = p.glob_change(&before).unwrap();
        assert!(!reduced || what.contains("now ignored"), "{what}");
        let mut less = p.clone();
        less.protect.clear();
        let (reduced, what) = less.glob_change(&p).unwrap();
        assert!(reduced, "{what}");
        assert!(what.contains("no longer protected: _base/**"), "{what}");
        assert_eq!(p.glob_change(&p), None);
        // A node's guard and the shared one: either protects.
        let node = Guard::new(&["_base/**".into()], &["_base/*.tmp".into()]).unwrap();
        let live = crate::guard::LiveGuard::new(node);
        let tmp = std::path::Path::new("_base/x.tmp");
        let snap = std::path::Path::new("snapshots/s");
        assert!(!live.protects(tmp) && !live.protects(snap));
        live.set_shared(Guard::new(&["**".into()], &["**/*.part".into()]).unwrap());
        assert!(live.protects(tmp) && live.protects(snap));
        // The shared ignore never lets through what the node protects.
        assert!(live.protects(std::path::Path::new("_base/x.part")));
        assert!(!live.protects(std::path::Path::new("other/x.part")));
        live.set_shared(Guard::none());
        assert!(!live.protects(snap));
    }

    #[test]
    fn conflicts_seen_from_status() {
        let mut p = Policy::new(Duration::from_secs(3600), None, "t");
        let o = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(conflicts_of(&o(&["retain=2h", "threads=8"]), &p).is_empty());
        let c = conflicts_of(&o(&["retain=2s", "min_free=10%"]), &p);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(c[0].contains("retain=2s is not applied"), "{c:?}");
        p.explicit = true;
        assert_eq!(conflicts_of(&o(&["retain=2h"]), &p).len(), 1);
        p.protect = vec!["**".into()];
        let c = conflicts_of(&o(&["ignore=*.part"]), &p);
        assert!(c[0].starts_with("ignore=*.part does not"), "{c:?}");
    }

    #[test]
    fn longest_retention_wins() {
        let h = Duration::from_secs(3600);
        let (p, n, w) = reconcile(None, Some(h), None);
        assert_eq!((p.retain(), w), (h, true));
        assert_eq!(n, vec![Note::Created]);
        // A shorter node: conflict, stored applies.
        let (p2, n, w) = reconcile(Some(p.clone()), Some(Duration::from_secs(2)), None);
        assert_eq!((p2.retain(), w), (h, false));
        assert!(matches!(n[0], Note::Conflict { .. }));
        // A longer node raises it.
        let (p3, n, w) = reconcile(Some(p.clone()), Some(2 * h), None);
        assert_eq!((p3.retain(), w), (2 * h, true));
        assert!(matches!(n[0], Note::Raised { .. }));
        // Explicit: nobody raises it.
        let mut e = p;
        e.explicit = true;
        let (p4, _, w) = reconcile(Some(e), Some(2 * h), None);
        assert_eq!((p4.retain(), w), (h, false));
    }
}
