//! What the quarantine really holds on disk, measured from its data files
//! (never from the records, whose sizes can be stale or corrupt), and how
//! full the backing filesystem is.
//!
//! Sizes come from `fstatat` of each `entries/<id>.data`: the apparent size
//! (`st_size`) and the allocated bytes (`st_blocks * 512`, what `du` shows).
//! A file held under several ids (hard links: a rename-out keeps a link) is
//! counted once in the totals.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::quarantine::{Quarantine, valid_id};
use crate::sys;

/// One data file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileUse {
    /// `st_size`.
    pub size: u64,
    /// `st_blocks * 512`.
    pub allocated: u64,
    /// `(st_dev, st_ino)`: several ids may share one file.
    pub inode: (u64, u64),
}

/// The quarantine's data files.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    /// By entry id.
    pub by_id: HashMap<String, FileUse>,
    /// Sum of apparent sizes, each file once.
    pub apparent: u64,
    /// Sum of allocated bytes, each file once.
    pub allocated: u64,
}

impl Usage {
    /// Measure every `<id>.data` in the quarantine.
    pub fn measure(q: &Quarantine) -> io::Result<Usage> {
        let entries = sys::openat(
            q.dir_fd(),
            c"entries",
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        let p = sys::proc_fd_path(entries.as_fd());
        let mut u = Usage::default();
        let mut seen = HashSet::new();
        for de in std::fs::read_dir(Path::new(OsStr::from_bytes(p.as_bytes())))? {
            let name = de?.file_name();
            let Some(id) = name.as_bytes().strip_suffix(b".data") else {
                continue;
            };
            let Ok(id) = std::str::from_utf8(id) else {
                continue;
            };
            if !valid_id(id) {
                continue;
            }
            let Ok(c) = CString::new(name.as_bytes()) else {
                continue;
            };
            let Ok(st) = sys::statat(entries.as_fd(), &c) else {
                continue; // restored or purged meanwhile
            };
            let f = FileUse {
                size: st.st_size.max(0) as u64,
                allocated: (st.st_blocks.max(0) as u64).saturating_mul(512),
                inode: (st.st_dev, st.st_ino),
            };
            if seen.insert(f.inode) {
                u.apparent = u.apparent.saturating_add(f.size);
                u.allocated = u.allocated.saturating_add(f.allocated);
            }
            u.by_id.insert(id.to_string(), f);
        }
        Ok(u)
    }
}

/// Size and free space of a filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FsSpace {
    /// Bytes in the filesystem.
    pub total: u64,
    /// Bytes available to unprivileged users (`f_bavail`), what a VM's
    /// writes can count on.
    pub available: u64,
}

impl FsSpace {
    /// `statvfs` of the filesystem holding `fd`.
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<FsSpace> {
        let v = sys::fstatvfs(fd)?;
        let frsize = if v.f_frsize > 0 {
            v.f_frsize
        } else {
            v.f_bsize
        };
        Ok(FsSpace {
            total: (v.f_blocks).saturating_mul(frsize),
            available: (v.f_bavail).saturating_mul(frsize),
        })
    }

    /// `part` as a percentage of the filesystem (0 when its size is unknown).
    pub fn percent(&self, part: u64) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            part as f64 * 100.0 / self.total as f64
        }
    }
}
