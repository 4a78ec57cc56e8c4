//! The audit trail: who restored or purged which quarantined file, and when.
//!
//! A restore or purge removes the record, so without a trail "who restored
//! it, and when?" has no answer. Each event is one small JSON file,
//! `<q>/history/<time>-<host>-<pid>-<n>.json`, written once and never
//! modified, so nodes sharing the quarantine never contend for one file (no
//! append races on NFS). Events older than [`KEEP`] are removed by the
//! daemons' sweep. `baseguard list --history` shows them.

use std::ffi::{CString, OsStr};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::quarantine::{Entry, Quarantine, Who};
use crate::sys;

/// The directory inside the quarantine.
pub const DIR: &str = "history";
/// How long events are kept.
pub const KEEP: Duration = Duration::from_secs(90 * 86400);

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `restored` or `purged`.
    pub action: String,
    /// Seconds since the epoch.
    pub at: u64,
    /// The entry.
    pub id: String,
    /// Its original path (lossy if not UTF-8).
    pub path: String,
    /// Its recorded size.
    pub size: u64,
    /// Where it was restored to (relative to the backing root), for restores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
    /// Why, when not asked for by a person (`expired`, `below min_free`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who did it (process, uid, host).
    pub who: Who,
}

fn history_fd(q: &Quarantine, create: bool) -> io::Result<std::os::fd::OwnedFd> {
    let name = CString::new(DIR).unwrap_or_default();
    if create {
        match sys::mkdirat(q.dir_fd(), &name, 0o700) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    sys::openat(
        q.dir_fd(),
        &name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// Record one event. Failures are logged, never fatal: the operation itself
/// already happened and its log line carries the same facts.
pub fn record(
    q: &Quarantine,
    action: &str,
    e: &Entry,
    who: &Who,
    dest: Option<&Path>,
    reason: Option<&str>,
) {
    static N: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let ev = Event {
        action: action.into(),
        at: now.as_secs(),
        id: e.id.clone(),
        path: e.path.clone(),
        size: e.size,
        dest: dest.map(|d| d.to_string_lossy().into_owned()),
        reason: reason.map(str::to_string),
        who: who.clone(),
    };
    let r = (|| -> io::Result<()> {
        let dir = history_fd(q, true)?;
        let host: String = sys::hostname()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(24)
            .collect();
        let name = format!(
            "{:010}.{:09}-{host}-{}-{}.json",
            now.as_secs(),
            now.subsec_nanos(),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let c = CString::new(name).unwrap_or_default();
        let fd = sys::openat(
            dir.as_fd(),
            &c,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        )?;
        let mut f = std::fs::File::from(fd);
        f.write_all(&serde_json::to_vec(&ev).map_err(io::Error::other)?)?;
        f.write_all(b"\n")
    })();
    if let Err(err) = r {
        tracing::warn!(id = %e.id, action, error = %err, "cannot write the audit trail");
    }
}

/// Every recorded event, oldest first.
pub fn read(q: &Quarantine) -> io::Result<Vec<Event>> {
    let dir = match history_fd(q, false) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let p = sys::proc_fd_path(dir.as_fd());
    let mut out = Vec::new();
    for de in std::fs::read_dir(Path::new(OsStr::from_bytes(p.as_bytes())))? {
        let de = de?;
        if !de.file_name().as_bytes().ends_with(b".json") {
            continue;
        }
        let Ok(b) = std::fs::read(de.path()) else {
            continue;
        };
        if let Ok(ev) = serde_json::from_slice::<Event>(&b) {
            out.push((de.file_name(), ev));
        }
    }
    // Names start with the time to the nanosecond.
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out.into_iter().map(|(_, e)| e).collect())
}

/// Remove events older than [`KEEP`] (the daemons' sweep).
pub fn trim(q: &Quarantine) {
    let Ok(dir) = history_fd(q, false) else {
        return;
    };
    let cutoff = crate::quarantine::unix_now().saturating_sub(KEEP.as_secs());
    let p = sys::proc_fd_path(dir.as_fd());
    let Ok(rd) = std::fs::read_dir(Path::new(OsStr::from_bytes(p.as_bytes()))) else {
        return;
    };
    for de in rd.flatten() {
        let n = de.file_name();
        let secs: Option<u64> = n
            .to_str()
            .and_then(|s| s.split('.').next())
            .and_then(|s| s.parse().ok());
        if secs.is_some_and(|s| s < cutoff)
            && let Ok(c) = CString::new(n.as_bytes())
        {
            let _ = sys::unlinkat(dir.as_fd(), &c, 0);
        }
    }
}

/// Counts of events by action (for metrics).
pub fn counts(events: &[Event]) -> (u64, u64) {
    let restored = events.iter().filter(|e| e.action == "restored").count() as u64;
    let purged = events.iter().filter(|e| e.action == "purged").count() as u64;
    (restored, purged)
}
