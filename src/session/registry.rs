//! Where a running supervisor says who it is: one JSON file per supervisor in the run
//! directory (`/run/baseguard`, or `$BASEGUARD_RUN_DIR`), next to its control socket.
//! `baseguard status` reads them; `baseguard upgrade` finds the control socket there.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a supervisor publishes about its mount.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub mountpoint: PathBuf,
    pub backing: PathBuf,
    pub supervisor_pid: u32,
    /// 0 while no serving process runs.
    pub server_pid: u32,
    /// When the current serving process started (seconds since the epoch).
    pub server_started: u64,
    /// Serving processes started after a death (not counting upgrades).
    pub restarts: u64,
    /// Serving processes started in all (the first is 1).
    pub generation: u64,
    /// Hand-overs done by `baseguard upgrade`.
    pub upgrades: u64,
    /// The binary the current serving process runs.
    pub binary: PathBuf,
    /// The control socket (`baseguard upgrade`).
    pub control: PathBuf,
}

/// The run directory.
pub fn run_dir() -> PathBuf {
    std::env::var_os("BASEGUARD_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/baseguard"))
}

/// Prefix of a supervisor's files in the run directory (other parts of baseguard keep
/// files there too).
const PREFIX: &str = "session-";

pub fn entry_path(dir: &Path, supervisor_pid: u32) -> PathBuf {
    dir.join(format!("{PREFIX}{supervisor_pid}.json"))
}

pub fn control_path(dir: &Path, supervisor_pid: u32) -> PathBuf {
    dir.join(format!("{PREFIX}{supervisor_pid}.sock"))
}

/// Publish (atomically replace) a supervisor's entry.
pub fn write(dir: &Path, e: &Entry) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let path = entry_path(dir, e.supervisor_pid);
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(e).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}

/// Remove a supervisor's entry and socket.
pub fn remove(dir: &Path, supervisor_pid: u32) {
    let _ = std::fs::remove_file(entry_path(dir, supervisor_pid));
    let _ = std::fs::remove_file(control_path(dir, supervisor_pid));
}

fn alive(pid: u32) -> bool {
    // A zombie still has /proc/PID; look at its state letter.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let after = s.rsplit_once(") ").map(|x| x.1).unwrap_or("");
            !after.starts_with('Z')
        })
        .unwrap_or(false)
}

/// Every published entry whose supervisor still runs (the files of one that was killed
/// are removed on the way).
pub fn list() -> Vec<Entry> {
    let dir = run_dir();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<Entry> = rd
        .flatten()
        .map(|d| d.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(PREFIX) && name.ends_with(".json")
        })
        .filter_map(|p| std::fs::read(p).ok())
        .filter_map(|b| serde_json::from_slice::<Entry>(&b).ok())
        .filter(|e| {
            let live = alive(e.supervisor_pid);
            if !live {
                remove(&dir, e.supervisor_pid);
            }
            live
        })
        .collect();
    out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
    out
}

/// The live supervisor of `mountpoint`, if any.
pub fn find(mountpoint: &Path) -> Option<Entry> {
    let m = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    list().into_iter().find(|e| e.mountpoint == m)
}

/// The session fields `baseguard status --json` shows for a mount: `supervisor_pid`,
/// `server_pid`, `alive` (the serving process runs), `server_started`, `restarts`,
/// `upgrades`. `None` when no supervisor is published for it.
pub fn status_json(mountpoint: &Path) -> Option<serde_json::Value> {
    let e = find(mountpoint)?;
    Some(serde_json::json!({
        "supervisor_pid": e.supervisor_pid,
        "server_pid": e.server_pid,
        "alive": e.server_pid != 0 && alive(e.server_pid),
        "server_started": e.server_started,
        "restarts": e.restarts,
        "upgrades": e.upgrades,
    }))
}

/// Add [`status_json`]'s fields to a mount's object in `baseguard status --json` (nothing
/// when no supervisor is published for it).
pub fn add_status_fields(v: &mut serde_json::Value, mountpoint: &Path) {
    if let (Some(o), Some(serde_json::Value::Object(extra))) =
        (v.as_object_mut(), status_json(mountpoint))
    {
        o.extend(extra);
    }
}
