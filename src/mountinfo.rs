//! `/proc/self/mountinfo` (proc(5)): the one parser of the crate.

use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::sys;

/// One mount, the parts baseguard uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// The mount id (first field; `mnt_id:` in `/proc/PID/fdinfo/FD`).
    pub id: u64,
    /// Mount point, unescaped.
    pub mountpoint: PathBuf,
    /// Filesystem type, e.g. `fuse.baseguard`.
    pub fstype: String,
    /// The source field: for baseguard, the backing directory.
    pub source: String,
    /// `major:minor` of the filesystem (for a FUSE mount, its connection's
    /// device, which names its entries in `/sys/fs/fuse/connections` and
    /// `/sys/class/bdi`).
    pub dev: String,
}

/// Decode mountinfo's octal escapes (`\040` is a space).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse mountinfo text, in order (later lines are mounted on top).
pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let id = left.split(' ').next()?.parse().ok()?;
            let dev = left.split(' ').nth(2)?.to_string();
            let mountpoint = PathBuf::from(unescape(left.split(' ').nth(4)?));
            let mut r = right.split(' ');
            let fstype = r.next()?.to_string();
            let source = unescape(r.next()?);
            Some(MountInfo {
                id,
                mountpoint,
                fstype,
                source,
                dev,
            })
        })
        .collect()
}

/// The mounts of this process's namespace.
pub fn read() -> io::Result<Vec<MountInfo>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The topmost mount at exactly `path` in `mounts`.
pub fn topmost<'a>(mounts: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    mounts.iter().rev().find(|m| m.mountpoint == path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_escapes_optional_fields_and_stacking() {
        let t = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                 40 22 0:50 / /mnt/with\\040space rw,nosuid - fuse.baseguard /srv/nova\\040nfs rw,user_id=0\n\
                 41 40 0:51 / /mnt/with\\040space rw master:3 shared:7 - fuse.baseguard /other rw\n";
        let m = parse(t);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(m[1].source, "/srv/nova nfs");
        assert_eq!(m[1].id, 40);
        let top = topmost(&m, Path::new("/mnt/with space")).unwrap();
        assert_eq!(top.source, "/other");
        assert_eq!(topmost(&m, Path::new("/")).unwrap().fstype, "ext4");
        assert!(topmost(&m, Path::new("/nope")).is_none());
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }
}

// ---- who holds a mount, and unmounting without detaching -------------------

/// A process that keeps a mount busy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
    /// What it holds: an open file's path, or `cwd PATH`.
    pub what: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {} ({}) {}", self.pid, self.comm, self.what)
    }
}

/// The processes holding files open on the mount with id `mount_id` (from
/// `/proc/PID/fdinfo`, exact), or with their working directory under `mp`
/// (by path). This process is left out.
pub fn holders(mount_id: u64, mp: &Path) -> Vec<Holder> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let base = p.path();
        let comm = std::fs::read_to_string(base.join("comm"))
            .map(|s| s.trim_end().to_string())
            .unwrap_or_default();
        if let Ok(cwd) = std::fs::read_link(base.join("cwd")) {
            if cwd.starts_with(mp) {
                out.push(Holder {
                    pid,
                    comm: comm.clone(),
                    what: format!("cwd {}", cwd.display()),
                });
            }
        }
        let Ok(fds) = std::fs::read_dir(base.join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            let on_mount = info
                .lines()
                .find_map(|l| l.strip_prefix("mnt_id:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                == Some(mount_id);
            if on_mount {
                let what = std::fs::read_link(base.join("fd").join(fd.file_name()))
                    .map(|t| t.display().to_string())
                    .unwrap_or_else(|_| "an open file".into());
                out.push(Holder {
                    pid,
                    comm: comm.clone(),
                    what,
                });
            }
        }
    }
    out
}

/// The topmost mount exactly at `mp` (not resolved: a dead mountpoint
/// cannot be stat'ed).
pub fn mount_at(mp: &Path) -> Option<MountInfo> {
    let ms = read().ok()?;
    topmost(&ms, mp).cloned()
}

/// "pid 12 (qemu) /x/disk; pid 13 (...) ..." (the first few).
pub fn describe_holders(h: &[Holder]) -> String {
    let mut s: Vec<String> = h.iter().take(8).map(|h| h.to_string()).collect();
    if h.len() > 8 {
        s.push(format!("and {} more", h.len() - 8));
    }
    s.join("; ")
}

/// What `unmount_unless_busy` did.
#[derive(Debug)]
pub enum Unmount {
    Done,
    /// Files are open on the mount: it stays.
    Busy(Vec<Holder>),
    Failed(std::io::Error),
}

/// Unmount `mp` unless something uses it; never detaches lazily, so the
/// directory underneath never shows while files are open through the mount.
pub fn unmount_unless_busy(mp: &Path) -> Unmount {
    match sys::umount(mp) {
        Ok(()) => Unmount::Done,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let h = match mount_at(mp) {
                Some(m) => holders(m.id, mp),
                None => Vec::new(),
            };
            Unmount::Busy(h)
        }
        Err(e) => Unmount::Failed(e),
    }
}
