//! The passthrough filesystem as a plain Rust type: every operation takes the
//! caller and node ids and returns a value or an errno. No FUSE types here;
//! [`crate::fuse`] adapts this to `fuser`.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::creds::{Caller, Credentials};
use crate::guard::Guard;
use crate::heal::{QuarantinedPaths, References};
use crate::inode::{Inode, InodeStore, ROOT_ID};
use crate::quarantine::{Quarantine, Who, Why};
use crate::stats::{Op, Stats};
use crate::sys::{self, LockRange, Stat, TimeSpec, XattrReply};

/// An errno. Every failure is reported to the kernel as the backing
/// filesystem's own errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl From<io::Error> for Errno {
    fn from(e: io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

pub type Result<T> = std::result::Result<T, Errno>;

/// An open regular file: the daemon's own descriptor of the backing file,
/// used for whatever does not go through kernel passthrough (lseek,
/// fallocate, fsync, locks, copy_file_range, and data when passthrough is off).
#[derive(Debug)]
pub struct OpenFile {
    pub file: File,
    pub inode: u64,
    pub flags: i32,
}

impl OpenFile {
    fn direct(&self) -> bool {
        self.flags & libc::O_DIRECT != 0
    }
}

/// One entry of a directory snapshot.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: u32,
    pub name: OsString,
}

struct OpenDir {
    fd: Arc<OwnedFd>,
    /// The snapshot, and whether a pass over it has started (so that a later
    /// read at offset 0 is a rewind and re-reads the directory).
    state: Mutex<(bool, Arc<Vec<DirEntry>>)>,
}

/// Attribute changes requested by `setattr`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSpec>,
    pub mtime: Option<TimeSpec>,
}

/// The quarantine directory, which the mount must never show or touch.
#[derive(Clone, Debug)]
pub struct Hidden {
    pub dev: u64,
    pub ino: u64,
    /// Its name in its parent directory (only names equal to it need a
    /// check before they are created or replaced).
    pub name: OsString,
}

/// Options of the passthrough core.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Cap on cached `O_PATH` descriptors.
    pub fd_cache: usize,
}

/// The passthrough filesystem over one backing directory.
pub struct Passthrough {
    inodes: InodeStore,
    creds: Credentials,
    files: DashMap<u64, Arc<OpenFile>>,
    dirs: DashMap<u64, Arc<OpenDir>>,
    next_fh: AtomicU64,
    /// Lock descriptors, one open file description per (handle, lock owner),
    /// so that POSIX, OFD and flock locks of different owners conflict on the
    /// backing filesystem as they would natively, across every mount of it.
    locks: DashMap<(u64, u64), Arc<OwnedFd>>,
    hidden: Mutex<Vec<Hidden>>,
    root_path: PathBuf,
    protection: Option<Protection>,
    pub stats: Stats,
}

/// What the guard protects and where protected files go instead of away.
pub struct Protection {
    pub guard: Guard,
    pub quarantine: Arc<Quarantine>,
    /// Restore on access: quarantined files an instance disk still uses.
    pub heal: Option<Arc<References>>,
    /// The quarantine's entries by path, for restore on access.
    pub quarantined: QuarantinedPaths,
}

fn cstr(name: &OsStr) -> Result<CString> {
    Ok(sys::cstr(name)?)
}

const ALIGN: usize = 4096;

/// A buffer whose payload starts at an `ALIGN`-aligned address (for O_DIRECT).
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl ReadBuf {
    fn new(len: usize, aligned: bool) -> ReadBuf {
        let extra = if aligned { ALIGN } else { 0 };
        let buf = vec![0u8; len + extra];
        let start = if aligned {
            (ALIGN - (buf.as_ptr() as usize % ALIGN)) % ALIGN
        } else {
            0
        };
        ReadBuf { buf, start, len }
    }

    fn space(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl Passthrough {
    /// Serve the directory behind `root` (an `O_PATH|O_DIRECTORY` descriptor
    /// opened before mounting, so the mount may cover the same path).
    pub fn new(root: OwnedFd, opts: FsOptions) -> io::Result<Passthrough> {
        let root_path = std::fs::read_link(format!("/proc/self/fd/{}", root.as_raw_fd()))?;
        // The daemon applies the umask the kernel already applied; never its own.
        sys::set_umask(0);
        Ok(Passthrough {
            inodes: InodeStore::new(root, opts.fd_cache)?,
            creds: Credentials::new(),
            files: DashMap::new(),
            dirs: DashMap::new(),
            next_fh: AtomicU64::new(1),
            locks: DashMap::new(),
            hidden: Mutex::new(Vec::new()),
            root_path,
            protection: None,
            stats: Stats::default(),
        })
    }

    /// Hide a directory (the quarantine) from the mount.
    pub fn hide(&self, h: Hidden) {
        self.hidden.lock().push(h);
    }

    /// Turn on the guard: deletions of protected files go to `quarantine`,
    /// which is hidden from the mount.
    pub fn protect(&mut self, p: Protection) {
        let (dev, ino) = p.quarantine.dir_ino();
        let name = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            p.quarantine.dir_fd().as_raw_fd()
        ))
        .ok()
        .and_then(|path| path.file_name().map(OsString::from))
        .unwrap_or_else(|| ".baseguard".into());
        self.hide(Hidden { dev, ino, name });
        self.protection = Some(p);
    }

    pub fn protection(&self) -> Option<&Protection> {
        self.protection.as_ref()
    }

    /// If `parent/name` is a protected regular file or symlink, its path
    /// relative to the backing root, the guard, and its attributes. A
    /// protected name that cannot be examined is an error, never a reason
    /// to fall back to a real deletion (another node may be restoring it).
    fn protected_entry(
        &self,
        parent: u64,
        pfd: &OwnedFd,
        c: &CStr,
        name: &OsStr,
    ) -> Result<Option<(&Protection, PathBuf, Stat)>> {
        let Some(p) = self.protection.as_ref() else {
            return Ok(None);
        };
        // The decision is made with the daemon's rights.
        self.creds.become_daemon();
        let Some(rel) = self.rel_path(parent).map(|d| d.join(name)) else {
            return Ok(None);
        };
        if !p.guard.protects(&rel) {
            return Ok(None);
        }
        let st = sys::statat(pfd.as_fd(), c)?;
        let kind = st.st_mode & libc::S_IFMT;
        Ok((kind == libc::S_IFREG || kind == libc::S_IFLNK).then_some((p, rel, st)))
    }

    /// Would the caller be allowed to remove or replace `name` in the
    /// directory `pfd`? (Write and search on the directory, and the sticky
    /// bit rule.) Checked with the caller's credentials before the daemon
    /// moves the file with its own.
    fn may_remove(&self, caller: Caller, pfd: &OwnedFd, st: &Stat) -> Result<()> {
        self.creds.become_caller(caller);
        sys::access_fd(pfd.as_fd(), libc::W_OK | libc::X_OK)?;
        let dir = sys::fstat(pfd.as_fd())?;
        if caller.uid != 0
            && dir.st_mode & libc::S_ISVTX != 0
            && caller.uid != dir.st_uid
            && caller.uid != st.st_uid
        {
            return Err(Errno(libc::EPERM));
        }
        Ok(())
    }

    fn is_hidden(&self, st: &Stat) -> bool {
        let hidden = self.hidden.lock();
        hidden
            .iter()
            .any(|h| h.dev == st.st_dev && h.ino == st.st_ino)
    }

    fn is_hidden_ino(&self, ino: u64) -> bool {
        self.hidden.lock().iter().any(|h| h.ino == ino)
    }

    pub fn root_fd(&self) -> Arc<OwnedFd> {
        self.inodes.root_fd()
    }

    pub fn inode(&self, id: u64) -> Result<Arc<Inode>> {
        self.inodes.get(id).ok_or(Errno(libc::ESTALE))
    }

    /// The inode's `O_PATH` descriptor, obtained with the daemon's rights.
    fn fd(&self, inode: &Inode) -> Result<Arc<OwnedFd>> {
        if let Some(fd) = self.inodes.cached_fd(inode) {
            return Ok(fd);
        }
        // Reopening by handle needs CAP_DAC_READ_SEARCH, which a caller's
        // fsuid drops: do it as the daemon.
        self.creds.become_daemon();
        Ok(self.inodes.fd(inode)?)
    }

    fn inode_fd(&self, id: u64) -> Result<(Arc<Inode>, Arc<OwnedFd>)> {
        let inode = self.inode(id)?;
        let fd = self.fd(&inode)?;
        Ok((inode, fd))
    }

    /// The path of a directory inode relative to the backing root, as the
    /// backing filesystem knows it now (used for the guard policy only).
    pub fn rel_path(&self, id: u64) -> Option<PathBuf> {
        if id == ROOT_ID {
            return Some(PathBuf::new());
        }
        let (_, fd) = self.inode_fd(id).ok()?;
        let p = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        let rel = p.strip_prefix(&self.root_path).ok()?;
        if rel.as_os_str().as_bytes().ends_with(b" (deleted)") {
            return None;
        }
        Some(rel.to_path_buf())
    }

    pub fn file(&self, fh: u64) -> Result<Arc<OpenFile>> {
        self.files
            .get(&fh)
            .map(|f| Arc::clone(&f))
            .ok_or(Errno(libc::EBADF))
    }

    fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    // ---- names -------------------------------------------------------------

    pub fn lookup(&self, caller: Caller, parent: u64, name: &OsStr) -> Result<(Arc<Inode>, Stat)> {
        self.stats.count(Op::Lookup);
        let (_, pfd) = self.inode_fd(parent)?;
        if parent == ROOT_ID && name.as_bytes() == b".." {
            let st = sys::fstat(pfd.as_fd())?;
            let root = self.inodes.known(&st).unwrap_or_else(|| self.inodes.root());
            return Ok((root, st));
        }
        self.creds.become_caller(caller);
        match self.lookup_at(&pfd, name) {
            Err(Errno(libc::ENOENT)) if self.heal(caller, parent, name) => {
                self.creds.become_caller(caller);
                self.lookup_at(&pfd, name)
            }
            r => r,
        }
    }

    /// Restore on access: a lookup of a protected path missed; if the
    /// quarantine holds that exact path and an instance disk's backing chain
    /// names it, put the newest entry back. Returns whether it did.
    fn heal(&self, caller: Caller, parent: u64, name: &OsStr) -> bool {
        let Some(p) = &self.protection else {
            return false;
        };
        let Some(refs) = &p.heal else {
            return false;
        };
        self.creds.become_daemon();
        // Is a file of that name quarantined? (A cached listing: one fstat
        // when nothing changed; the path is resolved only if so.) Then: is
        // that path protected, and which disks use it?
        let mut rel = None;
        let Some(entry) = p.quarantined.latest(&p.quarantine, name, || {
            rel = self.rel_path(parent).map(|d| d.join(name));
            rel.clone()
        }) else {
            return false;
        };
        let Some(rel) = rel else {
            return false;
        };
        if !p.guard.protects(&rel) {
            return false;
        }
        let disks = refs.disks_using_now(&rel);
        if disks.is_empty() {
            return false;
        }
        let who = Who::from_pid(caller.pid, caller.uid, caller.gid);
        match p.quarantine.restore(&entry.id, None, false, &who) {
            Ok(_) => {
                self.stats.count(Op::Healed);
                tracing::info!(
                    action = "heal",
                    path = %rel.display(),
                    id = %entry.id,
                    size = entry.size,
                    disk = %disks[0].display(),
                    pid = caller.pid,
                    comm = %who.comm,
                    uid = caller.uid,
                    "restored a quarantined base file that an instance disk uses"
                );
                true
            }
            Err(e) => {
                // Another node may have restored it first: look again.
                tracing::debug!(path = %rel.display(), error = %e, "heal did not restore");
                true
            }
        }
    }

    fn lookup_at(&self, pfd: &OwnedFd, name: &OsStr) -> Result<(Arc<Inode>, Stat)> {
        let c = cstr(name)?;
        let st = sys::statat(pfd.as_fd(), &c)?;
        if self.is_hidden(&st) {
            return Err(Errno(libc::ENOENT));
        }
        if let Some(inode) = self.inodes.known(&st) {
            return Ok((inode, st));
        }
        // A new inode: keep its file handle only (no descriptor until one is
        // needed; that one is checked against these (dev, ino)).
        if self.inodes.handles_for(st.st_dev) {
            if let Ok(h) = sys::name_to_handle_at(pfd.as_fd(), &c) {
                return Ok((self.inodes.lookup_handle(h, &st)?, st));
            }
        }
        let fd = sys::openat(pfd.as_fd(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let st = sys::fstat(fd.as_fd())?;
        let inode = self.inodes.lookup_fd(fd, &st)?;
        Ok((inode, st))
    }

    /// The inode of a file just created through `file` (no walk by name
    /// where the filesystem gives handles).
    fn lookup_created(
        &self,
        pfd: &OwnedFd,
        name: &OsStr,
        file: &File,
    ) -> Result<(Arc<Inode>, Stat)> {
        let st = sys::fstat(file.as_fd())?;
        if let Some(inode) = self.inodes.known(&st) {
            return Ok((inode, st));
        }
        if self.inodes.handles_for(st.st_dev) {
            if let Ok(h) = sys::name_to_handle(file.as_fd()) {
                return Ok((self.inodes.lookup_handle(h, &st)?, st));
            }
        }
        self.lookup_at(pfd, name)
    }

    pub fn forget(&self, id: u64, n: u64) {
        self.stats.count(Op::Forget);
        self.inodes.forget(id, n);
    }

    /// Refuse to create or replace a name that is the hidden quarantine.
    fn check_not_hidden(&self, pfd: &OwnedFd, c: &CStr) -> Result<()> {
        let named = self
            .hidden
            .lock()
            .iter()
            .any(|h| h.name.as_bytes() == c.to_bytes());
        if !named {
            return Ok(());
        }
        match sys::statat(pfd.as_fd(), c) {
            Ok(st) if self.is_hidden(&st) => Err(Errno(libc::EPERM)),
            _ => Ok(()),
        }
    }

    pub fn getattr(&self, id: u64, fh: Option<u64>) -> Result<Stat> {
        self.stats.count(Op::Getattr);
        if let Some(f) = fh.and_then(|fh| self.files.get(&fh).map(|f| Arc::clone(&f))) {
            return Ok(sys::fstat(f.file.as_fd())?);
        }
        let (_, fd) = self.inode_fd(id)?;
        Ok(sys::fstat(fd.as_fd())?)
    }

    pub fn setattr(&self, caller: Caller, id: u64, fh: Option<u64>, a: SetAttr) -> Result<Stat> {
        self.stats.count(Op::Setattr);
        let (inode, fd) = self.inode_fd(id)?;
        let open = fh.and_then(|fh| self.files.get(&fh).map(|f| Arc::clone(&f)));
        self.creds.become_caller(caller);
        if let Some(mode) = a.mode {
            if inode.kind == libc::S_IFLNK {
                return Err(Errno(libc::EOPNOTSUPP));
            }
            sys::chmod_fd(fd.as_fd(), mode & 0o7777)?;
        }
        if a.uid.is_some() || a.gid.is_some() {
            sys::chown_fd(
                fd.as_fd(),
                a.uid.unwrap_or(u32::MAX),
                a.gid.unwrap_or(u32::MAX),
            )?;
        }
        if let Some(size) = a.size {
            self.preserve_before_truncate(caller, id, &fd, size)?;
            self.creds.become_caller(caller);
            match &open {
                Some(f) => sys::ftruncate(f.file.as_fd(), size)?,
                None => sys::truncate_fd_path(fd.as_fd(), size)?,
            }
        }
        if a.atime.is_some() || a.mtime.is_some() {
            sys::utimens_fd(
                fd.as_fd(),
                a.atime.unwrap_or(TimeSpec::Omit),
                a.mtime.unwrap_or(TimeSpec::Omit),
            )?;
        }
        Ok(sys::fstat(fd.as_fd())?)
    }

    /// A truncate that would destroy data of a non-empty protected file:
    /// copy it into the quarantine first (reflink where the filesystem can).
    fn preserve_before_truncate(
        &self,
        caller: Caller,
        id: u64,
        fd: &OwnedFd,
        size: u64,
    ) -> Result<()> {
        let Some(p) = self.protection.as_ref() else {
            return Ok(());
        };
        let st = sys::fstat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || size >= st.st_size as u64 {
            return Ok(());
        }
        let Some(rel) = self.rel_path(id) else {
            return Ok(());
        };
        if !p.guard.protects(&rel) {
            return Ok(());
        }
        // Only callers allowed to write the file may cause a copy.
        self.creds.become_caller(caller);
        sys::access_fd(fd.as_fd(), libc::W_OK)?;
        self.creds.become_daemon();
        let who = Who::from_pid(caller.pid, caller.uid, caller.gid);
        p.quarantine
            .stash_copy(fd.as_fd(), &rel, &who, Why::Truncate)?;
        self.stats.count(Op::Quarantined);
        Ok(())
    }

    pub fn readlink(&self, id: u64) -> Result<Vec<u8>> {
        self.stats.count(Op::Readlink);
        let (_, fd) = self.inode_fd(id)?;
        Ok(sys::readlink_fd(fd.as_fd())?)
    }

    /// Make a node with `make`, then look it up.
    fn make_node(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        make: impl FnOnce(&OwnedFd, &CStr) -> io::Result<()>,
    ) -> Result<(Arc<Inode>, Stat)> {
        let (_, pfd) = self.inode_fd(parent)?;
        let c = cstr(name)?;
        self.creds.become_caller(caller);
        self.check_not_hidden(&pfd, &c)?;
        make(&pfd, &c)?;
        self.lookup_at(&pfd, name)
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Result<(Arc<Inode>, Stat)> {
        self.stats.count(Op::Mknod);
        self.make_node(caller, parent, name, |p, c| {
            sys::mknodat(p.as_fd(), c, mode, rdev as u64)
        })
    }

    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> Result<(Arc<Inode>, Stat)> {
        self.stats.count(Op::Mkdir);
        self.make_node(caller, parent, name, |p, c| {
            sys::mkdirat(p.as_fd(), c, mode)
        })
    }

    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        target: &Path,
    ) -> Result<(Arc<Inode>, Stat)> {
        self.stats.count(Op::Symlink);
        let t = cstr(target.as_os_str())?;
        self.make_node(caller, parent, name, |p, c| {
            sys::symlinkat(&t, p.as_fd(), c)
        })
    }

    pub fn link(
        &self,
        caller: Caller,
        id: u64,
        newparent: u64,
        newname: &OsStr,
    ) -> Result<(Arc<Inode>, Stat)> {
        self.stats.count(Op::Link);
        let (_, fd) = self.inode_fd(id)?;
        self.make_node(caller, newparent, newname, |p, c| {
            sys::link_fd(fd.as_fd(), p.as_fd(), c)
        })
    }

    pub fn unlink(&self, caller: Caller, parent: u64, name: &OsStr) -> Result<()> {
        self.stats.count(Op::Unlink);
        let (_, pfd) = self.inode_fd(parent)?;
        let c = cstr(name)?;
        if let Some((p, rel, st)) = self.protected_entry(parent, &pfd, &c, name)? {
            self.may_remove(caller, &pfd, &st)?;
            self.creds.become_daemon();
            let who = Who::from_pid(caller.pid, caller.uid, caller.gid);
            p.quarantine
                .stash_rename(pfd.as_fd(), &c, &rel, &who, Why::Unlink)?;
            self.stats.count(Op::Quarantined);
            return Ok(());
        }
        self.creds.become_caller(caller);
        self.check_not_hidden(&pfd, &c)?;
        sys::unlinkat(pfd.as_fd(), &c, 0)?;
        Ok(())
    }

    pub fn rmdir(&self, caller: Caller, parent: u64, name: &OsStr) -> Result<()> {
        self.stats.count(Op::Rmdir);
        let (_, pfd) = self.inode_fd(parent)?;
        let c = cstr(name)?;
        self.creds.become_caller(caller);
        self.check_not_hidden(&pfd, &c)?;
        sys::unlinkat(pfd.as_fd(), &c, libc::AT_REMOVEDIR)?;
        Ok(())
    }

    pub fn rename(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        self.stats.count(Op::Rename);
        let (_, pfd) = self.inode_fd(parent)?;
        let (_, npfd) = self.inode_fd(newparent)?;
        let (c, nc) = (cstr(name)?, cstr(newname)?);
        self.creds.become_caller(caller);
        self.check_not_hidden(&pfd, &c)?;
        self.check_not_hidden(&npfd, &nc)?;
        // Replacing a protected file: keep a hard link of it in the
        // quarantine first, so its data survives and the name never
        // disappears (the rename replaces it atomically).
        let replaces = flags & (libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) == 0;
        for attempt in 0.. {
            let (target, absent) = match self.protected_entry(newparent, &npfd, &nc, newname) {
                // No target is the common case of a rename.
                Err(Errno(libc::ENOENT)) => (None, true),
                r => (r?, false),
            };
            let kept = match target {
                Some((p, rel, st)) if replaces => {
                    let src = sys::statat(pfd.as_fd(), &c)?;
                    if (src.st_dev, src.st_ino) == (st.st_dev, st.st_ino) {
                        None
                    } else {
                        self.may_remove(caller, &npfd, &st)?;
                        self.creds.become_daemon();
                        let who = Who::from_pid(caller.pid, caller.uid, caller.gid);
                        let e = p.quarantine.stash_link(
                            npfd.as_fd(),
                            &nc,
                            &rel,
                            &who,
                            Why::RenameOver,
                        )?;
                        self.stats.count(Op::Quarantined);
                        Some((p, e.id))
                    }
                }
                _ => None,
            };
            self.creds.become_caller(caller);
            // A protected target that was absent must still be absent when
            // the rename lands (another node may be restoring it): if it
            // appeared, go round again and keep it first.
            let guard_absent = absent && replaces && attempt < 3;
            let extra = if guard_absent {
                libc::RENAME_NOREPLACE
            } else {
                0
            };
            let mut r = sys::renameat2(pfd.as_fd(), &c, npfd.as_fd(), &nc, flags | extra);
            if guard_absent {
                match r.as_ref().map_err(|e| e.raw_os_error()) {
                    Err(Some(libc::EEXIST)) => continue,
                    // No RENAME_NOREPLACE here (NFS): a plain rename.
                    Err(Some(libc::EINVAL)) => {
                        r = sys::renameat2(pfd.as_fd(), &c, npfd.as_fd(), &nc, flags)
                    }
                    _ => {}
                }
            }
            if let (Err(_), Some((p, id))) = (&r, kept) {
                // The rename did not happen: the file is still in place, so
                // the extra link is not needed.
                self.creds.become_daemon();
                let _ = p.quarantine.purge(&id);
            }
            r?;
            break;
        }
        Ok(())
    }

    // ---- files -------------------------------------------------------------

    fn register_file(&self, file: File, inode: u64, flags: i32) -> (u64, Arc<OpenFile>) {
        let fh = self.new_fh();
        let f = Arc::new(OpenFile { file, inode, flags });
        self.files.insert(fh, Arc::clone(&f));
        (fh, f)
    }

    /// Open flags for the daemon's own descriptor.
    fn open_flags(flags: i32) -> i32 {
        flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC)
    }

    pub fn open(&self, caller: Caller, id: u64, flags: i32) -> Result<(u64, Arc<OpenFile>)> {
        self.stats.count(Op::Open);
        let (_, fd) = self.inode_fd(id)?;
        self.creds.become_caller(caller);
        let file = File::from(sys::reopen(
            fd.as_fd(),
            Self::open_flags(flags) | libc::O_NOFOLLOW,
        )?);
        Ok(self.register_file(file, id, flags))
    }

    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(Arc<Inode>, Stat, u64, Arc<OpenFile>)> {
        self.stats.count(Op::Create);
        let (_, pfd) = self.inode_fd(parent)?;
        let c = cstr(name)?;
        self.creds.become_caller(caller);
        self.check_not_hidden(&pfd, &c)?;
        // O_TRUNC is applied after the guard has seen the file: the name
        // may exist by now (another node made it) and be protected.
        let fd = sys::openat(
            pfd.as_fd(),
            &c,
            (flags & !(libc::O_NOCTTY | libc::O_TRUNC)) | libc::O_CREAT | libc::O_NOFOLLOW,
            mode,
        )?;
        let file = File::from(fd);
        let (inode, st) = self.lookup_created(&pfd, name, &file)?;
        let st = if flags & libc::O_TRUNC != 0 && st.st_size > 0 {
            let ifd = self.fd(&inode)?;
            self.preserve_before_truncate(caller, inode.id, &ifd, 0)?;
            self.creds.become_caller(caller);
            sys::ftruncate(file.as_fd(), 0)?;
            sys::fstat(file.as_fd())?
        } else {
            st
        };
        let (fh, f) = self.register_file(file, inode.id, flags & !libc::O_CREAT);
        Ok((inode, st, fh, f))
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<ReadBuf> {
        self.stats.count(Op::Read);
        let f = self.file(fh)?;
        let mut buf = ReadBuf::new(size as usize, f.direct());
        let mut done = 0usize;
        let want = size as usize;
        while done < want {
            let space = &mut buf.space()[done..];
            match f.file.read_at(space, offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if done == 0 {
                        return Err(e.into());
                    }
                    break;
                }
            }
            if f.direct() {
                break;
            }
        }
        buf.len = done;
        self.stats.add(Op::ReadBytes, done as u64);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_suid: bool) -> Result<u32> {
        self.stats.count(Op::Write);
        let f = self.file(fh)?;
        let n = if f.direct() {
            let mut buf = ReadBuf::new(data.len(), true);
            buf.space().copy_from_slice(data);
            f.file.write_at(buf.data(), offset)?
        } else {
            f.file.write_at(data, offset)?
        };
        if kill_suid {
            let st = sys::fstat(f.file.as_fd())?;
            if st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
                let _ = sys::chmod_fd(
                    f.file.as_fd(),
                    st.st_mode & 0o7777 & !(libc::S_ISUID | libc::S_ISGID),
                );
            }
        }
        self.stats.add(Op::WriteBytes, n as u64);
        Ok(n as u32)
    }

    pub fn flush(&self, fh: u64, lock_owner: u64) -> Result<()> {
        self.stats.count(Op::Flush);
        // close() drops the caller's POSIX locks on this file: drop the lock
        // description of that owner (OFD and flock owners are the file, not
        // the process, and are kept until release).
        self.locks.remove(&(fh, lock_owner));
        Ok(())
    }

    pub fn release(&self, fh: u64) -> Result<Option<Arc<OpenFile>>> {
        self.stats.count(Op::Release);
        self.locks.retain(|k, _| k.0 != fh);
        Ok(self.files.remove(&fh).map(|(_, f)| f))
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        self.stats.count(Op::Fsync);
        let f = self.file(fh)?;
        if datasync {
            f.file.sync_data()?;
        } else {
            f.file.sync_all()?;
        }
        Ok(())
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        self.stats.count(Op::Fallocate);
        let f = self.file(fh)?;
        sys::fallocate(f.file.as_fd(), mode, offset as i64, length as i64)?;
        Ok(())
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        self.stats.count(Op::Lseek);
        let f = self.file(fh)?;
        Ok(sys::lseek(f.file.as_fd(), offset, whence)?)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        flags: u32,
    ) -> Result<u32> {
        self.stats.count(Op::CopyFileRange);
        let (fi, fo) = (self.file(fh_in)?, self.file(fh_out)?);
        let len = len.min(u32::MAX as u64 & !0xfff) as usize;
        let n = sys::copy_file_range(
            fi.file.as_fd(),
            off_in as i64,
            fo.file.as_fd(),
            off_out as i64,
            len,
            flags,
        )?;
        Ok(n as u32)
    }

    // ---- locks -------------------------------------------------------------

    fn lock_fd(&self, fh: u64, owner: u64, create: bool) -> Result<Option<Arc<OwnedFd>>> {
        if let Some(fd) = self.locks.get(&(fh, owner)) {
            return Ok(Some(Arc::clone(&fd)));
        }
        if !create {
            return Ok(None);
        }
        let f = self.file(fh)?;
        let acc = f.flags & libc::O_ACCMODE;
        self.creds.become_daemon();
        let fd = Arc::new(sys::reopen(f.file.as_fd(), acc)?);
        Ok(Some(Arc::clone(
            self.locks.entry((fh, owner)).or_insert(fd).value(),
        )))
    }

    pub fn getlk(&self, fh: u64, owner: u64, lock: LockRange) -> Result<LockRange> {
        self.stats.count(Op::Getlk);
        let fd = match self.lock_fd(fh, owner, false)? {
            Some(fd) => fd,
            None => {
                let f = self.file(fh)?;
                self.creds.become_daemon();
                Arc::new(sys::reopen(f.file.as_fd(), f.flags & libc::O_ACCMODE)?)
            }
        };
        Ok(sys::ofd_getlk(fd.as_fd(), &lock)?)
    }

    /// Take or release a lock; with `wait`, block until it is granted (the
    /// caller runs this off the request threads).
    pub fn setlk(&self, fh: u64, owner: u64, lock: LockRange, wait: bool) -> Result<()> {
        self.stats.count(Op::Setlk);
        let unlock = lock.typ == libc::F_UNLCK;
        let Some(fd) = self.lock_fd(fh, owner, !unlock)? else {
            return Ok(());
        };
        Ok(sys::ofd_setlk(fd.as_fd(), &lock, wait)?)
    }

    // ---- directories -------------------------------------------------------

    fn snapshot(&self, fd: &OwnedFd) -> Result<Vec<DirEntry>> {
        let st = sys::fstat(fd.as_fd())?;
        let mut out = vec![
            DirEntry {
                ino: st.st_ino,
                kind: libc::S_IFDIR,
                name: ".".into(),
            },
            DirEntry {
                ino: sys::statat(fd.as_fd(), c"..")
                    .map(|s| s.st_ino)
                    .unwrap_or(1),
                kind: libc::S_IFDIR,
                name: "..".into(),
            },
        ];
        let dir = std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        for e in dir {
            let e = e?;
            if self.is_hidden_ino(e.ino()) {
                if let Ok(st) = sys::statat(fd.as_fd(), &cstr(&e.file_name())?) {
                    if self.is_hidden(&st) {
                        continue;
                    }
                }
            }
            let kind = match e.file_type() {
                Ok(t) if t.is_dir() => libc::S_IFDIR,
                Ok(t) if t.is_symlink() => libc::S_IFLNK,
                Ok(t) if t.is_fifo() => libc::S_IFIFO,
                Ok(t) if t.is_socket() => libc::S_IFSOCK,
                Ok(t) if t.is_char_device() => libc::S_IFCHR,
                Ok(t) if t.is_block_device() => libc::S_IFBLK,
                _ => libc::S_IFREG,
            };
            out.push(DirEntry {
                ino: e.ino(),
                kind,
                name: e.file_name(),
            });
        }
        Ok(out)
    }

    pub fn opendir(&self, caller: Caller, id: u64) -> Result<u64> {
        self.stats.count(Op::Opendir);
        let (_, fd) = self.inode_fd(id)?;
        self.creds.become_caller(caller);
        let entries = self.snapshot(&fd)?;
        let fh = self.new_fh();
        self.dirs.insert(
            fh,
            Arc::new(OpenDir {
                fd,
                state: Mutex::new((false, Arc::new(entries))),
            }),
        );
        Ok(fh)
    }

    /// Entries from `offset` on (offset = index of the next entry). Offset 0
    /// after the first read (rewinddir) takes a fresh snapshot.
    pub fn readdir(&self, caller: Caller, fh: u64, offset: u64) -> Result<Arc<Vec<DirEntry>>> {
        self.stats.count(Op::Readdir);
        let d = self
            .dirs
            .get(&fh)
            .map(|d| Arc::clone(&d))
            .ok_or(Errno(libc::EBADF))?;
        let mut state = d.state.lock();
        if offset == 0 && state.0 {
            self.creds.become_caller(caller);
            state.1 = Arc::new(self.snapshot(&d.fd)?);
        }
        state.0 = true;
        Ok(Arc::clone(&state.1))
    }

    /// For readdirplus: the directory's snapshot from `offset` on (as
    /// [`Self::readdir`]) and its descriptor, so each entry can be looked up.
    pub fn readdirplus(
        &self,
        caller: Caller,
        fh: u64,
        offset: u64,
    ) -> Result<(Arc<Vec<DirEntry>>, Arc<OwnedFd>)> {
        let entries = self.readdir(caller, fh, offset)?;
        let d = self
            .dirs
            .get(&fh)
            .map(|d| Arc::clone(&d))
            .ok_or(Errno(libc::EBADF))?;
        Ok((entries, Arc::clone(&d.fd)))
    }

    /// Look up one entry of a readdirplus reply. "." and ".." are only
    /// stat'ed: the kernel takes no reference on them.
    pub fn readdirplus_entry(
        &self,
        caller: Caller,
        dir: &OwnedFd,
        name: &OsStr,
    ) -> Result<(Option<Arc<Inode>>, Stat)> {
        self.creds.become_caller(caller);
        if name == "." || name == ".." {
            return Ok((None, sys::statat(dir.as_fd(), &cstr(name)?)?));
        }
        let (inode, st) = self.lookup_at(dir, name)?;
        Ok((Some(inode), st))
    }

    pub fn releasedir(&self, fh: u64) {
        self.stats.count(Op::Releasedir);
        self.dirs.remove(&fh);
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> Result<()> {
        self.stats.count(Op::Fsyncdir);
        let d = self
            .dirs
            .get(&fh)
            .map(|d| Arc::clone(&d))
            .ok_or(Errno(libc::EBADF))?;
        let f = File::from(sys::reopen(
            d.fd.as_fd(),
            libc::O_RDONLY | libc::O_DIRECTORY,
        )?);
        if datasync {
            f.sync_data()?;
        } else {
            f.sync_all()?;
        }
        Ok(())
    }

    // ---- filesystem-wide ---------------------------------------------------

    pub fn statfs(&self, id: u64) -> Result<libc::statvfs> {
        self.stats.count(Op::Statfs);
        let (_, fd) = self.inode_fd(id).or_else(|_| self.inode_fd(ROOT_ID))?;
        Ok(sys::fstatvfs(fd.as_fd())?)
    }

    pub fn access(&self, caller: Caller, id: u64, mask: i32) -> Result<()> {
        self.stats.count(Op::Access);
        let (_, fd) = self.inode_fd(id)?;
        self.creds.become_caller(caller);
        sys::access_fd(fd.as_fd(), mask)?;
        Ok(())
    }

    // ---- xattrs --------------------------------------------------------------

    fn xattr_fd(&self, caller: Caller, id: u64) -> Result<Arc<OwnedFd>> {
        let (inode, fd) = self.inode_fd(id)?;
        // Extended attributes of a symlink cannot be reached through its
        // O_PATH descriptor without following it; report none.
        if inode.kind == libc::S_IFLNK {
            return Err(Errno(libc::ENODATA));
        }
        self.creds.become_caller(caller);
        Ok(fd)
    }

    pub fn getxattr(&self, caller: Caller, id: u64, name: &OsStr, size: u32) -> Result<XattrReply> {
        self.stats.count(Op::Getxattr);
        let fd = self.xattr_fd(caller, id)?;
        Ok(sys::getxattr_fd(fd.as_fd(), &cstr(name)?, size as usize)?)
    }

    pub fn listxattr(&self, caller: Caller, id: u64, size: u32) -> Result<XattrReply> {
        self.stats.count(Op::Listxattr);
        let fd = match self.xattr_fd(caller, id) {
            Err(Errno(libc::ENODATA)) => {
                return Ok(if size == 0 {
                    XattrReply::Size(0)
                } else {
                    XattrReply::Data(Vec::new())
                });
            }
            r => r?,
        };
        Ok(sys::listxattr_fd(fd.as_fd(), size as usize)?)
    }

    pub fn setxattr(
        &self,
        caller: Caller,
        id: u64,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> Result<()> {
        self.stats.count(Op::Setxattr);
        let fd = self.xattr_fd(caller, id).map_err(|e| {
            if e.0 == libc::ENODATA {
                Errno(libc::EPERM)
            } else {
                e
            }
        })?;
        sys::setxattr_fd(fd.as_fd(), &cstr(name)?, value, flags)?;
        Ok(())
    }

    pub fn removexattr(&self, caller: Caller, id: u64, name: &OsStr) -> Result<()> {
        self.stats.count(Op::Removexattr);
        let fd = self.xattr_fd(caller, id)?;
        sys::removexattr_fd(fd.as_fd(), &cstr(name)?)?;
        Ok(())
    }

    /// Switch this thread back to the daemon's credentials.
    pub fn as_daemon(&self) {
        self.creds.become_daemon();
    }

    /// Inodes known and descriptors held.
    pub fn inode_counts(&self) -> (usize, usize) {
        self.inodes.counts()
    }
}

// ---- hand-over to a new serving process ------------------------------------

/// An open handle the kernel holds, as a record a supervisor keeps (with the handle's
/// descriptor) so that a new serving process can take it over: the file (and its locks)
/// stays open across the hand-over.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Handle {
    File {
        fh: u64,
        inode: u64,
        flags: i32,
    },
    Dir {
        fh: u64,
    },
    /// The lock description of one lock owner of an open file.
    Lock {
        fh: u64,
        owner: u64,
    },
}

/// A node the kernel knows (by id), as a record a supervisor keeps so that a new serving
/// process can answer requests on it: its identity and file handle (or, where the backing
/// filesystem has no handles, its descriptor alongside).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InodeRecord {
    pub id: u64,
    pub dev: u64,
    pub ino: u64,
    pub kind: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<(i32, Vec<u8>)>,
}

/// Which handle to export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandleKey {
    File(u64),
    Dir(u64),
    Lock(u64, u64),
}

impl Passthrough {
    /// The record and a duplicate descriptor of an open handle (to hand to a keeper).
    pub fn export_handle(&self, key: HandleKey) -> Option<(Handle, OwnedFd)> {
        match key {
            HandleKey::File(fh) => {
                let f = self.files.get(&fh)?;
                let fd = f.file.as_fd().try_clone_to_owned().ok()?;
                let h = Handle::File {
                    fh,
                    inode: f.inode,
                    flags: f.flags,
                };
                Some((h, fd))
            }
            HandleKey::Dir(fh) => {
                let d = self.dirs.get(&fh)?;
                let fd = d.fd.as_fd().try_clone_to_owned().ok()?;
                Some((Handle::Dir { fh }, fd))
            }
            HandleKey::Lock(fh, owner) => {
                let l = self.locks.get(&(fh, owner))?;
                let fd = l.as_fd().try_clone_to_owned().ok()?;
                Some((Handle::Lock { fh, owner }, fd))
            }
        }
    }

    /// Take over a handle exported by an earlier serving process, with its descriptor: the
    /// handle number stays the same (the kernel uses it), and the inode of an open file is
    /// known again. Handles numbered after it are allocated past it.
    pub fn import_handle(&self, h: Handle, fd: OwnedFd) -> Result<()> {
        self.creds.become_daemon();
        let fh = match h {
            Handle::File { fh, flags, .. } => {
                let st = sys::fstat(fd.as_fd())?;
                let inode = self.learn(&fd, &st)?;
                let file = File::from(fd);
                self.files
                    .insert(fh, Arc::new(OpenFile { file, inode, flags }));
                fh
            }
            Handle::Dir { fh } => {
                let st = sys::fstat(fd.as_fd())?;
                self.learn(&fd, &st)?;
                let fd = Arc::new(fd);
                let entries = self.snapshot(&fd)?;
                let state = Mutex::new((true, Arc::new(entries)));
                self.dirs.insert(fh, Arc::new(OpenDir { fd, state }));
                fh
            }
            Handle::Lock { fh, owner } => {
                self.locks.insert((fh, owner), Arc::new(fd));
                fh
            }
        };
        self.next_fh.fetch_max(fh + 1, Ordering::Relaxed);
        Ok(())
    }

    /// The record of a node the kernel knows, and its descriptor if it has no file handle.
    /// `file`: a descriptor of the node just opened (a file just created), which names it
    /// for sure; otherwise the node's cached descriptor is used, unless it is a removed file
    /// whose number a new file may have taken (`None` then: nothing sure to keep).
    pub fn export_inode(
        &self,
        id: u64,
        file: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Option<(InodeRecord, Option<OwnedFd>)> {
        if id == ROOT_ID {
            return None;
        }
        let inode = self.inodes.get(id)?;
        self.creds.become_daemon();
        let fd = match file {
            Some(f) => f.try_clone_to_owned().ok()?,
            None => {
                let fd = self.fd(&inode).ok()?;
                let st = sys::fstat(fd.as_fd()).ok()?;
                if st.st_nlink == 0 {
                    return None;
                }
                fd.as_fd().try_clone_to_owned().ok()?
            }
        };
        let st = sys::fstat(fd.as_fd()).ok()?;
        if st.st_dev != inode.dev || st.st_ino != inode.ino {
            return None;
        }
        let handle = if self.inodes.handles_for(inode.dev) {
            sys::name_to_handle(fd.as_fd()).ok()
        } else {
            None
        };
        let rec = InodeRecord {
            id,
            dev: inode.dev,
            ino: inode.ino,
            kind: inode.kind,
            handle: handle.map(|h| h.to_parts()),
        };
        let fd = match rec.handle {
            Some(_) => None,
            None => Some(fd),
        };
        Some((rec, fd))
    }

    /// Know a node again that an earlier serving process exported (one lookup: the kernel
    /// forgets it with its own count, all at once).
    pub fn import_inode(&self, rec: InodeRecord, fd: Option<OwnedFd>) -> Result<u64> {
        self.creds.become_daemon();
        let root = self.root_fd();
        let mut st = sys::fstat(root.as_fd())?;
        st.st_dev = rec.dev;
        st.st_ino = rec.ino;
        st.st_mode = rec.kind;
        if let Some(i) = self.inodes.known(&st) {
            return Ok(i.id);
        }
        // Open it now: a handle of a file removed since (whose number a new file may
        // have taken) must not come back as that number.
        let fd = match (rec.handle, fd) {
            (_, Some(fd)) => fd,
            (Some((t, b)), None) => {
                let mount_fd = sys::reopen(root.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
                let h = sys::FileHandle::from_parts(t, b);
                sys::open_by_handle(mount_fd.as_fd(), &h, libc::O_PATH | libc::O_NOFOLLOW)?
            }
            (None, None) => return Err(Errno(libc::ESTALE)),
        };
        let st = sys::fstat(fd.as_fd())?;
        if st.st_dev != rec.dev || st.st_ino != rec.ino {
            return Err(Errno(libc::ESTALE));
        }
        Ok(self.inodes.lookup_fd(fd, &st)?.id)
    }

    /// Make the inode behind `fd` known (one lookup), for a handle taken over.
    fn learn(&self, fd: &OwnedFd, st: &Stat) -> Result<u64> {
        if let Some(i) = self.inodes.known(st) {
            return Ok(i.id);
        }
        let path = sys::reopen(fd.as_fd(), libc::O_PATH)?;
        Ok(self.inodes.lookup_fd(path, st)?.id)
    }
}
