//! The passthrough filesystem as a plain Rust type: every operation takes the
//! caller and node ids and returns a value or an errno. No FUSE types here;
//! [`crate::fuse`] adapts this to `fuser`.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::creds::{Caller, Credentials};
use crate::guard::LiveGuard;
use crate::heal::{QuarantinedPaths, References};
use crate::inode::{Inode, InodeStore, ROOT_ID};
use crate::quarantine::{Quarantine, VersionChoice, Who, Why, pick_version};
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
    /// The guard's state for this handle: [`UNGUARDED`], [`GUARDED`] (a
    /// protected file opened for writing: its contents are copied into the
    /// quarantine before the first write that destroys bytes, and every
    /// write checks that the file is still where the kernel found it) or
    /// [`COPIED`] (the copy is made). A guarded handle must not use kernel
    /// passthrough where avoidable, so that its writes are seen.
    pub guard: AtomicU8,
    /// Writes through this handle must reach the daemon: an unprivileged
    /// writer of a set-user-ID or set-group-ID file, whose writes clear
    /// those bits (kernel passthrough writes with the daemon's
    /// credentials, which would keep them).
    /// (Cleared once a write has dropped the bits.)
    pub kills_privs: AtomicBool,
    /// A `close` of it was seen (FLUSH): its release may be on its way.
    pub flushed: AtomicBool,
}

/// How long a file renamed or linked to a protected name waits for the
/// release of handles that were closed but not yet released, before it is
/// copied as a file still open for writing.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A handle the guard does not watch.
pub const UNGUARDED: u8 = 0;
/// A handle of a protected file, opened for writing, not yet copied.
pub const GUARDED: u8 = 1;
/// A handle of a protected file whose contents are held in the quarantine.
pub const COPIED: u8 = 2;

impl OpenFile {
    /// Does the guard watch this handle?
    pub fn guarded(&self) -> bool {
        self.guard.load(Ordering::Relaxed) != UNGUARDED
    }
}

impl OpenFile {
    /// An open file; `guard` its state for the guard ([`UNGUARDED`]...).
    pub fn new(file: File, inode: u64, flags: i32, guard: u8) -> OpenFile {
        let kills_privs = flags & libc::O_ACCMODE != libc::O_RDONLY
            && sys::fstat(file.as_fd()).is_ok_and(|st| {
                st.st_mode & libc::S_ISUID != 0
                    || st.st_mode & (libc::S_ISGID | libc::S_IXGRP)
                        == (libc::S_ISGID | libc::S_IXGRP)
            });
        OpenFile {
            file,
            inode,
            flags,
            guard: AtomicU8::new(guard),
            kills_privs: AtomicBool::new(kills_privs),
            flushed: AtomicBool::new(false),
        }
    }

    /// Opened with `O_DIRECT`.
    pub fn direct(&self) -> bool {
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
    /// The directory's node id and descriptor.
    dir: DirRef,
    /// The directory opened for reading by whoever opened the handle.
    list: OwnedFd,
    /// The snapshot, and whether a pass over it has started (so that a later
    /// read at offset 0 is a rewind and re-reads the directory).
    state: Mutex<(bool, Arc<Vec<DirEntry>>)>,
}

/// Where an inode's extended attributes are reached.
enum XattrTarget {
    Fd(Arc<OwnedFd>),
    /// A symlink: its directory and name.
    Link(Arc<OwnedFd>, CString),
}

/// A directory being read: its node id and descriptor.
#[derive(Clone)]
pub struct DirRef {
    pub id: u64,
    pub fd: Arc<OwnedFd>,
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

/// One side of a rename: the directory's node id and descriptor, the name.
struct Name<'a> {
    parent: u64,
    name: &'a OsStr,
    fd: &'a OwnedFd,
    c: &'a CStr,
}

impl Name<'_> {
    /// `renameat2` of this name to `to` with `flags`, as the errno.
    fn rename_to(&self, to: &Name<'_>, flags: u32) -> std::result::Result<(), i32> {
        sys::renameat2(self.fd.as_fd(), self.c, to.fd.as_fd(), to.c, flags)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
    }
}

/// Options of the passthrough core.
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Cap on cached `O_PATH` descriptors.
    pub fd_cache: usize,
    /// The daemon's open-file limit: cached descriptors give way to open
    /// files as it nears, and a warning is logged.
    pub nofile: u64,
    /// Never use `RENAME_EXCHANGE`/`RENAME_NOREPLACE` (as over NFS).
    pub no_exchange: bool,
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
    protection: Option<Protection>,
    aliases: Aliases,
    nofile: u64,
    no_exchange: bool,
    /// When the descriptor warning was last logged (seconds since start).
    fd_warned: AtomicU64,
    started: std::time::Instant,
    pub stats: Stats,
}

/// What the guard protects and where protected files go instead of away.
pub struct Protection {
    /// This node's globs and the shared policy's (swapped in by the daemon).
    pub guard: Arc<LiveGuard>,
    pub quarantine: Arc<Quarantine>,
    /// Restore on access: quarantined files an instance disk still uses.
    pub heal: Option<Arc<References>>,
    /// The quarantine's entries by path, for restore on access.
    pub quarantined: QuarantinedPaths,
    /// The mountpoint: an absolute symlink below it leads into the mount.
    /// (One to the backing path leaves the mount, unless the mount is over
    /// it.)
    pub mountpoint: PathBuf,
}

/// Directories that a symlink with a protected name leads to (a `_base` that
/// is a symlink to another directory of the share): the kernel follows the
/// symlink itself and then asks for the target's entries by the target's own
/// names, never naming `_base`. Known by identity, each with the protected
/// name it stands for; never forgotten (a retargeted symlink leaves the old
/// directory protected too: more protection, never less).
#[derive(Default)]
struct Aliases {
    dirs: parking_lot::RwLock<std::collections::HashMap<(u64, u64), PathBuf>>,
    /// Symlinks that leave the mount (by identity), with the target they had
    /// when that was logged.
    left: Mutex<std::collections::HashMap<(u64, u64), Vec<u8>>>,
    /// The times of the root, and of every other directory holding a name a
    /// glob spells out, when those names were last looked at (another node
    /// may make `_base` a symlink at any time).
    stamps: Mutex<Option<(TimeStamp, Vec<TimeStamp>)>>,
    /// Those other directories (`nova` for `nova/_base/**`), below the root.
    spelled_parents: Mutex<Vec<PathBuf>>,
}

/// A directory's modification and change times (seconds, nanoseconds).
type TimeStamp = (i64, i64, i64, i64);

/// The directories a glob spells out, outermost first: its leading literal
/// names that have more of the glob below them (`nova`, `_base` of
/// `nova/_base/**`; nothing from `*/x`).
fn spelled_dirs(glob: &str) -> Vec<&str> {
    let segs: Vec<&str> = glob
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    segs.iter()
        .take(segs.len().saturating_sub(1))
        .take_while(|c| !c.contains(['*', '?', '[', '{', '\\']) && **c != "..")
        .copied()
        .collect()
}

/// Is `rel` a directory that some glob spells out ([`spelled_dirs`])?
fn spelled_out(globs: &[String], rel: &Path) -> bool {
    let want: Vec<&[u8]> = rel.iter().map(|c| c.as_bytes()).collect();
    globs.iter().any(|g| {
        let dirs = spelled_dirs(g);
        !want.is_empty()
            && dirs.len() >= want.len()
            && dirs.iter().zip(&want).all(|(d, w)| d.as_bytes() == *w)
    })
}

fn cstr(name: &OsStr) -> Result<CString> {
    Ok(sys::cstr(name)?)
}

const ALIGN: usize = 4096;

/// The kernel's `__FMODE_EXEC` in an open request's flags: the open of a
/// program by `execve`.
const FMODE_EXEC: i32 = 0x20;

/// A buffer whose payload starts at an `ALIGN`-aligned address (for O_DIRECT).
/// Were the last change's times at least 2 s ago? A stamp taken sooner may
/// not tell a later change apart where timestamps are coarse (an NFS server's
/// filesystem ticking in milliseconds): such a stamp is never matched, so
/// what the kernel cached then is not kept.
fn settled(st: &Stat) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    now.saturating_sub(st.st_mtime.max(st.st_ctime)) >= 2
}

/// An inode's size and times, hashed, so that the kernel keeps what it
/// cached of it while they stay the same: its listing (a directory) or its
/// pages (a file). Equal stamps mean unchanged (timestamps are fine-grained
/// once someone has read them); 0 while the last change is too recent to
/// tell a later one apart (see [`settled`]), never equal to a stamp kept.
fn stamp(st: &Stat) -> u64 {
    if !settled(st) {
        return 0;
    }
    [
        st.st_ino as i64,
        st.st_size,
        st.st_mtime,
        st.st_mtime_nsec,
        st.st_ctime,
        st.st_ctime_nsec,
    ]
    .iter()
    .fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        (h ^ *v as u64).wrapping_mul(0x100_0000_01b3)
    })
    .max(1)
}

thread_local! {
    /// Each serving thread's buffer for file data, reused from request to
    /// request (no allocation, zeroing or page faults per read).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest buffer a thread keeps between requests (a read is at most
/// the kernel's 1 MiB `max_pages`); anything larger is allocated per call.
const SCRATCH_KEPT: usize = (1 << 20) + ALIGN;

/// Run `f` on a buffer of `len` bytes, aligned to `ALIGN` when `aligned`
/// (for `O_DIRECT`). Its contents are whatever an earlier request left.
fn with_scratch<R>(len: usize, aligned: bool, f: impl FnOnce(&mut [u8]) -> R) -> R {
    fn run<R>(v: &mut Vec<u8>, len: usize, aligned: bool, f: impl FnOnce(&mut [u8]) -> R) -> R {
        if v.len() < len + ALIGN {
            v.resize(len + ALIGN, 0);
        }
        let start = if aligned {
            (ALIGN - (v.as_ptr() as usize % ALIGN)) % ALIGN
        } else {
            0
        };
        f(&mut v[start..start + len])
    }
    if len + ALIGN > SCRATCH_KEPT {
        return run(&mut Vec::new(), len, aligned, f);
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => run(&mut v, len, aligned, f),
        Err(_) => run(&mut Vec::new(), len, aligned, f),
    })
}

impl Passthrough {
    /// Serve the directory behind `root` (an `O_PATH|O_DIRECTORY` descriptor
    /// opened before mounting, so the mount may cover the same path).
    pub fn new(root: OwnedFd, opts: FsOptions) -> io::Result<Passthrough> {
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
            protection: None,
            aliases: Aliases::default(),
            nofile: opts.nofile,
            no_exchange: opts.no_exchange,
            fd_warned: AtomicU64::new(0),
            started: std::time::Instant::now(),
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
        self.note_root_aliases();
    }

    pub fn protection(&self) -> Option<&Protection> {
        self.protection.as_ref()
    }

    /// The guard's view of the name `parent/name`: its path below the root
    /// as the kernel named it (the names the kernel used for `parent` and
    /// its ancestors, never a path read back from the backing filesystem)
    /// and whether it is protected. A name under a directory that was ever
    /// reached through a protected name stays protected (sticky). When the
    /// chain of names is broken the guard cannot decide: `EIO`, never a
    /// silent pass.
    fn guard_name(&self, parent: u64, name: &OsStr) -> Result<Option<(&Protection, PathBuf)>> {
        let Some(p) = self.protection.as_ref() else {
            return Ok(None);
        };
        let (dir, sticky) = match self.inodes.dir_path(parent) {
            Some(dir) => (dir, self.inodes.under_protected(parent)),
            // Reached without names (a decoded file handle): by identity.
            None => match self.walk_up(parent) {
                Some(dir) => (dir, false),
                None => {
                    tracing::warn!(
                        parent,
                        name = ?name,
                        "the guard cannot tell where this directory is; refusing"
                    );
                    return Err(Errno(libc::EIO));
                }
            },
        };
        let rel = dir.join(name);
        if p.guard.protects(&rel) || sticky {
            return Ok(Some((p, rel)));
        }
        self.refresh_root_aliases();
        if self
            .aliased(parent, name)
            .is_some_and(|v| p.guard.protects(&v))
        {
            Ok(Some((p, rel)))
        } else {
            Ok(None)
        }
    }

    /// Is the name protected? (For recording lookups: a broken chain counts
    /// as protected.)
    fn name_protected(&self, parent: u64, name: &OsStr) -> bool {
        !matches!(self.guard_name(parent, name), Ok(None))
    }

    /// Would destroying the bytes of `inode` (truncate, overwrite, punch)
    /// lose a protected file's contents? Its path for the quarantine record
    /// if so. A file reached through a protected name must still be at one
    /// of those names: if it is not (another node quarantined, replaced or
    /// moved it), the caller holds a stale reference: `ESTALE`, as NFS
    /// answers for a file another client removed. A file with other hard
    /// links the guard has not seen is copied too (one of them may be
    /// protected).
    fn guard_inode(&self, inode: &Inode, st: &Stat) -> Result<Option<(&Protection, PathBuf)>> {
        let Some(p) = self.protection.as_ref() else {
            return Ok(None);
        };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(None);
        }
        if inode.was_protected() {
            return match self.protected_place(inode)? {
                Some(rel) => Ok(Some((p, rel))),
                // Gone from its protected names but still at another one (a
                // hard link): a live file whose bytes the quarantine may
                // share; copied first, under the name it is at.
                None => match self.live_place(inode)? {
                    Some(rel) => Ok(Some((p, rel))),
                    None => Err(Errno(libc::ESTALE)),
                },
            };
        }
        if st.st_nlink > 1 {
            if let Some((parent, name)) = inode.names().into_iter().next() {
                if let Some(dir) = self.inodes.dir_path(parent) {
                    return Ok(Some((p, dir.join(name))));
                }
            }
            tracing::warn!(
                ino = st.st_ino,
                nlink = st.st_nlink,
                "a multiply linked file the guard cannot place; refusing"
            );
            return Err(Errno(libc::EIO));
        }
        Ok(None)
    }

    /// One protected name at which `inode` still is (checked by identity
    /// against the backing directory), as a path below the root.
    fn protected_place(&self, inode: &Inode) -> Result<Option<PathBuf>> {
        self.place_among(inode, inode.protected_names())
    }

    /// One unprotected name the guard saw `inode` at (a hard link's) at
    /// which it still is (asked after [`Self::protected_place`] found none).
    fn live_place(&self, inode: &Inode) -> Result<Option<PathBuf>> {
        self.place_among(inode, inode.other_names())
    }

    fn place_among(&self, inode: &Inode, names: Vec<(u64, OsString)>) -> Result<Option<PathBuf>> {
        self.creds.become_daemon();
        for (parent, name) in names {
            let Ok((_, pfd)) = self.inode_fd(parent) else {
                continue;
            };
            let Ok(c) = cstr(&name) else { continue };
            match sys::statat(pfd.as_fd(), &c) {
                Ok(st) if st.st_dev == inode.dev && st.st_ino == inode.ino => {
                    if let Some(dir) = self.inodes.dir_path(parent) {
                        return Ok(Some(dir.join(name)));
                    }
                }
                _ => {}
            }
        }
        Ok(None)
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
        if name.as_bytes() == b"." {
            // The kernel decoding a file handle given out through the mount
            // (export support): the node itself, brought back if forgotten.
            self.creds.become_daemon();
            let inode = self.inodes.lookup_id(parent).map_err(Errno::from)?;
            let st = sys::fstat(self.fd(&inode)?.as_fd())?;
            return Ok((inode, st));
        }
        let (_, pfd) = self.inode_fd(parent)?;
        if name.as_bytes() == b".." {
            return self.lookup_parent(parent, &pfd);
        }
        self.creds.become_caller(caller);
        match self.lookup_at(parent, &pfd, name) {
            Err(Errno(libc::ENOENT)) if self.heal(caller, parent, name) => {
                self.creds.become_caller(caller);
                self.lookup_at(parent, &pfd, name)
            }
            r => r,
        }
    }

    /// `..` of a directory (export support: the kernel reconnecting a
    /// directory it decoded from a file handle). Never above the root.
    fn lookup_parent(&self, id: u64, fd: &OwnedFd) -> Result<(Arc<Inode>, Stat)> {
        self.creds.become_daemon();
        let root = self.inodes.root();
        if id == ROOT_ID {
            return Ok((root, sys::fstat(fd.as_fd())?));
        }
        let up = sys::openat(fd.as_fd(), c"..", libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let st = sys::fstat(up.as_fd())?;
        if (st.st_dev, st.st_ino) == (root.dev, root.ino) {
            return Ok((root, st));
        }
        Ok((self.inodes.lookup_fd(up, &st, None)?, st))
    }

    /// The path below the root of a directory the kernel reached without a
    /// name (decoded from a file handle), found by identity: up through
    /// `..`, each name the entry of its parent with that inode number, until
    /// a directory whose path is known. `None` if it is not below the root.
    fn walk_up(&self, id: u64) -> Option<PathBuf> {
        self.creds.become_daemon();
        let inode = self.inode(id).ok()?;
        let mut fd = self.fd(&inode).ok()?;
        let mut st = sys::fstat(fd.as_fd()).ok()?;
        let mut names: Vec<OsString> = Vec::new();
        for _ in 0..256 {
            let up =
                Arc::new(sys::openat(fd.as_fd(), c"..", libc::O_PATH | libc::O_DIRECTORY, 0).ok()?);
            let ust = sys::fstat(up.as_fd()).ok()?;
            if (ust.st_dev, ust.st_ino) == (st.st_dev, st.st_ino) {
                return None; // the filesystem's root: not below ours
            }
            let dir = std::fs::read_dir(format!("/proc/self/fd/{}", up.as_raw_fd())).ok()?;
            let name = dir
                .flatten()
                .find(|e| e.ino() == st.st_ino)
                .map(|e| e.file_name())?;
            names.push(name);
            let known = self
                .inodes
                .peek(&ust)
                .and_then(|i| self.inodes.dir_path(i.id));
            let root = self.inodes.root();
            if let Some(base) =
                known.or(((ust.st_dev, ust.st_ino) == (root.dev, root.ino)).then(PathBuf::new))
            {
                return Some(names.iter().rev().fold(base, |p, n| p.join(n)));
            }
            fd = up;
            st = ust;
        }
        None
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
        let held = p.quarantined.held(&p.quarantine, name, || {
            rel = self.inodes.dir_path(parent).map(|d| d.join(name));
            rel.clone()
        });
        if held.is_empty() {
            return false;
        }
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
        // Not simply the newest entry: the version the disks were made on
        // (never the empty file a truncation left when the copy is held).
        let times: Vec<_> = disks
            .iter()
            .filter_map(|d| p.quarantine.disk_time(d))
            .collect();
        let entry = match pick_version(&held, &times) {
            VersionChoice::One(e) => *e,
            VersionChoice::Nothing => return false,
            VersionChoice::Ambiguous(v) => {
                let ids: Vec<&str> = v.iter().map(|e| e.id.as_str()).collect();
                tracing::warn!(
                    path = %rel.display(),
                    disk = %disks[0].display(),
                    ids = %ids.join(" "),
                    "not restored: the quarantine holds several versions and which one the disk was created on cannot be told; restore one with 'baseguard restore ID'"
                );
                return false;
            }
        };
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

    /// Look up `name` in directory `parent` (descriptor `pfd`) and record
    /// where the kernel reached the inode (for the guard).
    fn lookup_at(&self, parent: u64, pfd: &OwnedFd, name: &OsStr) -> Result<(Arc<Inode>, Stat)> {
        let (inode, st) = self.lookup_name(parent, pfd, name)?;
        self.reached(&inode, &st, parent, name);
        if inode.kind == libc::S_IFLNK {
            self.note_alias(pfd, parent, name);
        }
        Ok((inode, st))
    }

    /// The path a name below an aliased directory stands for (`_base/x` for
    /// `cache/x` when `_base` is a symlink to `cache`), if it is below one.
    fn aliased(&self, parent: u64, name: &OsStr) -> Option<PathBuf> {
        let dirs = self.aliases.dirs.read();
        if dirs.is_empty() {
            return None;
        }
        let mut below = vec![name.to_os_string()];
        let mut at = parent;
        for _ in 0..4096 {
            let inode = self.inodes.get(at)?;
            if let Some(prefix) = dirs.get(&(inode.dev, inode.ino)) {
                let mut v = prefix.clone();
                v.extend(below.iter().rev());
                return Some(v);
            }
            if at == ROOT_ID {
                return None;
            }
            let (up, n) = inode.dir_name()?;
            below.push(n);
            at = up;
        }
        None
    }

    /// The symlink `parent/name` (in the directory `pfd`): if files below its
    /// name may be protected, the directory it leads to inside this mount is
    /// protected as that name. Resolved with the daemon's credentials (a
    /// caller who may not search the way there must not leave it unknown),
    /// inside the mount only; the thread's credentials are kept.
    fn note_alias(&self, pfd: &OwnedFd, parent: u64, name: &OsStr) {
        if self.protection.is_none() {
            return;
        }
        let Some(dir) = self.inodes.dir_path(parent) else {
            return;
        };
        self.creds
            .as_daemon(|| self.note_alias_as_daemon(pfd, &dir, name));
    }

    /// [`Self::note_alias`] for the directory `pfd` at `dir` below the root.
    fn note_alias_as_daemon(&self, pfd: &OwnedFd, dir: &Path, name: &OsStr) {
        let Some(p) = self.protection.as_ref() else {
            return;
        };
        let rel = dir.join(name);
        // Only a name a protect glob spells out as a directory (`_base` of
        // `_base/**`): a symlink a user drops *into* `_base` is a protected
        // file, and must not make its target protected.
        if !spelled_out(&p.guard.protect_globs(), &rel) {
            return;
        }
        let Ok(c) = cstr(name) else { return };
        let Ok(link) = sys::openat(pfd.as_fd(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0) else {
            return;
        };
        let (Ok(lst), Ok(target)) = (sys::fstat(link.as_fd()), sys::readlink_fd(link.as_fd()))
        else {
            return;
        };
        if lst.st_mode & libc::S_IFMT != libc::S_IFLNK {
            return;
        }
        let t = Path::new(OsStr::from_bytes(&target));
        let inside = if t.is_absolute() {
            t.strip_prefix(&p.mountpoint).ok().map(Path::to_path_buf)
        } else {
            Some(dir.join(t))
        };
        // Resolved every time (the directory it names may have been made
        // anew); only the warning for one that leaves is said once.
        let Some(inside) = inside else {
            let key = (lst.st_dev, lst.st_ino);
            if self
                .aliases
                .left
                .lock()
                .insert(key, target.clone())
                .as_ref()
                != Some(&target)
            {
                tracing::warn!(
                    path = %rel.display(),
                    target = %t.display(),
                    "a protected name is a symlink that leaves this mount: deletions there do not go through baseguard (mount baseguard over the target too)"
                );
            }
            return;
        };
        let root = self.root_fd();
        // Not a directory (yet): nothing below it; the next lookup tries again.
        let Ok(st) =
            sys::open_dir_in_root(root.as_fd(), &inside).and_then(|d| sys::fstat(d.as_fd()))
        else {
            return;
        };
        let new = self
            .aliases
            .dirs
            .write()
            .insert((st.st_dev, st.st_ino), rel.clone())
            .is_none();
        if new {
            tracing::info!(
                path = %rel.display(),
                target = %inside.display(),
                "a protected name is a symlink: the directory it leads to is protected as that name"
            );
        }
    }

    /// Look at the names the globs spell out again if a directory holding
    /// one changed since (another node may have made `_base` a symlink): one
    /// `fstat` of the root when nothing did (the default `_base/**`), one
    /// more open and `fstat` for each deeper such directory. A change too
    /// recent to tell a later one apart (see [`settled`]) is looked at again
    /// next time.
    fn refresh_root_aliases(&self) {
        let root = self.root_fd();
        let Ok(st) = sys::fstat(root.as_fd()) else {
            return;
        };
        let stamp = |st: &Stat| -> TimeStamp {
            (st.st_mtime, st.st_mtime_nsec, st.st_ctime, st.st_ctime_nsec)
        };
        let mut calm = settled(&st);
        // (No allocation for the default `_base/**`: no deeper directory.)
        let parents = self.aliases.spelled_parents.lock().clone();
        let mut deeper = Vec::new();
        for dir in &parents {
            match sys::open_dir_in_root(root.as_fd(), dir).and_then(|d| sys::fstat(d.as_fd())) {
                Ok(st) => {
                    deeper.push(stamp(&st));
                    calm &= settled(&st);
                }
                Err(_) => deeper.push((0, 0, 0, 0)),
            }
        }
        let now = (stamp(&st), deeper);
        if self.aliases.stamps.lock().as_ref() == Some(&now) {
            return;
        }
        self.note_root_aliases();
        if calm {
            *self.aliases.stamps.lock() = Some(now);
        }
    }

    /// At start, and whenever the root changed: every directory a protect
    /// glob spells out (`_base` of `_base/**`, `nova` and `nova/_base` of
    /// `nova/_base/**`) that is a symlink is followed, since files may be
    /// reached through the target's own names before anything looks the
    /// symlink up (or, after a restart, while the kernel still holds it).
    fn note_root_aliases(&self) {
        let Some(p) = self.protection.as_ref() else {
            return;
        };
        let root = self.root_fd();
        // Every directory a glob spells out (`nova`, `nova/_base` of
        // `nova/_base/**`), each looked at in the directory above it.
        let mut spelled: Vec<PathBuf> = Vec::new();
        for g in p.guard.protect_globs() {
            let mut at = PathBuf::new();
            for seg in spelled_dirs(&g) {
                at.push(seg);
                if !spelled.contains(&at) {
                    spelled.push(at.clone());
                }
            }
        }
        let parents: Vec<PathBuf> = spelled
            .iter()
            .filter_map(|r| r.parent())
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .fold(Vec::new(), |mut v, d| {
                if !v.contains(&d) {
                    v.push(d);
                }
                v
            });
        *self.aliases.spelled_parents.lock() = parents;
        self.creds.as_daemon(|| {
            for rel in &spelled {
                let (Some(name), Some(dir)) = (rel.file_name(), rel.parent()) else {
                    continue;
                };
                let opened;
                let pfd: &OwnedFd = if dir.as_os_str().is_empty() {
                    &root
                } else {
                    match sys::open_dir_in_root(root.as_fd(), dir) {
                        Ok(fd) => {
                            opened = fd;
                            &opened
                        }
                        Err(_) => continue,
                    }
                };
                self.note_alias_as_daemon(pfd, dir, name);
            }
        });
    }

    /// Record that the kernel reached `inode` as `parent/name`.
    fn reached(&self, inode: &Inode, st: &Stat, parent: u64, name: &OsStr) {
        if self.protection.is_none() {
            if inode.kind == libc::S_IFLNK {
                inode.reached(parent, name, false, false);
            }
            return;
        }
        let protected = self.name_protected(parent, name);
        inode.reached(parent, name, protected, st.st_nlink > 1);
    }

    /// Look up `name` in the directory `parent` (whose descriptor is `pfd`).
    fn lookup_name(&self, parent: u64, pfd: &OwnedFd, name: &OsStr) -> Result<(Arc<Inode>, Stat)> {
        let c = cstr(name)?;
        let st = sys::statat(pfd.as_fd(), &c)?;
        if self.is_hidden(&st) {
            return Err(Errno(libc::ENOENT));
        }
        // The handle tells a known inode from a new file that got a reused
        // inode number (another node deleted the old one). A new inode keeps
        // its handle only (no descriptor until one is needed; that one is
        // checked against these (dev, ino)).
        if self.inodes.handles_for(st.st_dev) {
            if let Ok(h) = sys::name_to_handle_at(pfd.as_fd(), &c) {
                return Ok((self.inodes.lookup_handle(h, &st)?, st));
            }
        } else if let Some(inode) = self.inodes.known_at(&st, parent, name) {
            return Ok((inode, st));
        }
        let fd = sys::openat(pfd.as_fd(), &c, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let st = sys::fstat(fd.as_fd())?;
        let inode = self.inodes.lookup_fd(fd, &st, Some((parent, name)))?;
        Ok((inode, st))
    }

    /// The inode of a file just created through `file` (no walk by name
    /// where the filesystem gives handles).
    fn lookup_created(
        &self,
        parent: u64,
        pfd: &OwnedFd,
        name: &OsStr,
        file: &File,
    ) -> Result<(Arc<Inode>, Stat)> {
        let st = sys::fstat(file.as_fd())?;
        let (inode, st) = match self
            .inodes
            .handles_for(st.st_dev)
            .then(|| sys::name_to_handle(file.as_fd()).ok())
            .flatten()
        {
            Some(h) => (self.inodes.lookup_handle(h, &st)?, st),
            None => return self.lookup_at(parent, pfd, name),
        };
        self.reached(&inode, &st, parent, name);
        Ok((inode, st))
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
        let nothing = a.mode.is_none()
            && a.uid.is_none()
            && a.gid.is_none()
            && a.size.is_none()
            && a.atime.is_none()
            && a.mtime.is_none();
        // A setattr of nothing is `chown(f, -1, -1)` (which changes the
        // ctime natively) or the kernel's request to remove privileges before
        // a fallocate or copy_file_range by an unprivileged writer: the two
        // look the same. It is passed on as that chown, whose EPERM (a
        // non-owner's, on a set-ID file) is not an error: the operation that
        // follows runs as the caller and clears the bits itself.
        if nothing {
            match sys::chown_fd(fd.as_fd(), u32::MAX, u32::MAX) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                r => r?,
            }
        }
        if a.uid.is_some() || a.gid.is_some() {
            sys::chown_fd(
                fd.as_fd(),
                a.uid.unwrap_or(u32::MAX),
                a.gid.unwrap_or(u32::MAX),
            )?;
        }
        if let Some(size) = a.size {
            let st = sys::fstat(fd.as_fd())?;
            if size < st.st_size as u64 {
                match &open {
                    Some(f) => self.preserve_handle(caller, f, Why::Truncate)?,
                    None => {
                        self.preserve(caller, &inode, fd.as_fd(), Why::Truncate)?;
                    }
                }
            }
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

    /// Before something destroys bytes of `inode` (a truncation, an
    /// overwrite, a punched hole): if it is a protected file, copy it into
    /// the quarantine first (a reflink where the filesystem can). Empty
    /// files hold nothing to keep. A stale reference to a protected file
    /// that is no longer where the kernel found it: `ESTALE`.
    /// Returns whether the file is protected (then later writes through
    /// the same handle need no new copy).
    fn preserve(
        &self,
        caller: Caller,
        inode: &Inode,
        fd: BorrowedFd<'_>,
        why: Why,
    ) -> Result<bool> {
        if self.protection.is_none() {
            return Ok(false);
        }
        self.creds.become_daemon();
        let st = sys::fstat(fd)?;
        let Some((p, rel)) = self.guard_inode(inode, &st)? else {
            return Ok(false);
        };
        // No allocated block, no byte to keep (an empty or all-hole file,
        // such as one `qemu-img create` just made).
        if st.st_blocks == 0 {
            return Ok(true);
        }
        // Only callers allowed to write the file may cause a copy.
        self.creds.become_caller(caller);
        sys::access_fd(fd, libc::W_OK)?;
        self.creds.become_daemon();
        let who = Who::from_pid(caller.pid, caller.uid, caller.gid);
        p.quarantine.stash_copy(fd, &rel, &who, why)?;
        self.stats.count(Op::Quarantined);
        Ok(true)
    }

    /// Before a destructive operation through an open handle: a handle of
    /// a protected file that already made its copy only checks that the
    /// file is still where the kernel found it; any other handle preserves
    /// the file first (it may have become protected since it was opened).
    fn preserve_handle(&self, caller: Caller, f: &OpenFile, why: Why) -> Result<()> {
        if self.protection.is_none() {
            return Ok(());
        }
        let inode = self.inode(f.inode)?;
        if f.guard.load(Ordering::Relaxed) == COPIED {
            self.creds.become_daemon();
            return match self.protected_place(&inode)? {
                Some(_) => Ok(()),
                None if !inode.was_protected() => Ok(()),
                None if self.live_place(&inode)?.is_some() => Ok(()),
                None => Err(Errno(libc::ESTALE)),
            };
        }
        if self.preserve(caller, &inode, f.file.as_fd(), why)? {
            f.guard.store(COPIED, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The kernel will pass this handle's writes straight to the backing
    /// file (it passes the inode through already): a guarded handle copies
    /// the file now, since no write will be seen here.
    pub fn unseen_writes(&self, caller: Caller, f: &OpenFile) -> Result<()> {
        if f.guard.load(Ordering::Relaxed) != GUARDED {
            return Ok(());
        }
        self.preserve_handle(caller, f, Why::Overwrite)
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
        self.lookup_at(parent, &pfd, name)
    }

    /// The mode to create with: the kernel leaves the umask to the
    /// filesystem (FUSE_DONT_MASK, for POSIX ACLs), and the backing
    /// filesystem applies a default ACL of the parent itself; without one,
    /// the caller's umask applies.
    fn masked(&self, pfd: &OwnedFd, mode: u32, umask: u32) -> u32 {
        if umask & 0o777 == 0 || sys::has_default_acl(pfd.as_fd()) {
            mode
        } else {
            mode & !(umask & 0o777)
        }
    }

    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<(Arc<Inode>, Stat)> {
        self.stats.count(Op::Mknod);
        self.make_node(caller, parent, name, |p, c| {
            sys::mknodat(p.as_fd(), c, self.masked(p, mode, umask), rdev as u64)
        })
    }

    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
    ) -> Result<(Arc<Inode>, Stat)> {
        self.stats.count(Op::Mkdir);
        self.make_node(caller, parent, name, |p, c| {
            sys::mkdirat(p.as_fd(), c, self.masked(p, mode, umask))
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
        let (inode, fd) = self.inode_fd(id)?;
        // (A new name the guard cannot place refuses nothing here: a link
        // destroys no bytes, and the new name is judged when it is used.)
        let kept = match self.guard_name(newparent, newname) {
            Ok(Some((p, rel))) if !inode.was_protected() => {
                self.copy_for_open_writers(caller, &inode, p, &rel)?
            }
            _ => Vec::new(),
        };
        let r = self.make_node(caller, newparent, newname, |p, c| {
            sys::link_fd(fd.as_fd(), p.as_fd(), c)
        });
        if r.is_err() {
            self.drop_kept(&kept);
        }
        r
    }

    /// A regular file about to get a protected name (`rel`) while this node
    /// has it open for writing: those writes may never reach the daemon
    /// (kernel passthrough), so the bytes it holds now are copied into the
    /// quarantine first (returned, to drop if the operation fails), and the
    /// handles count as copied.
    fn copy_for_open_writers<'p>(
        &self,
        caller: Caller,
        inode: &Inode,
        p: &'p Protection,
        rel: &Path,
    ) -> Result<Vec<(String, &'p Protection)>> {
        if inode.kind != libc::S_IFREG {
            return Ok(Vec::new());
        }
        let writers = || -> Vec<Arc<OpenFile>> {
            self.files
                .iter()
                .filter(|f| {
                    f.inode == inode.id
                        && f.flags & libc::O_ACCMODE != libc::O_RDONLY
                        && f.guard.load(Ordering::Relaxed) == UNGUARDED
                })
                .map(|f| Arc::clone(f.value()))
                .collect()
        };
        let mut open = writers();
        // Closed already, their release not in yet (the kernel sends it after
        // `close` returns: a download renamed into place right after it was
        // closed): wait a little for it rather than copy a whole image.
        let wait = std::time::Instant::now();
        while !open.is_empty()
            && open.iter().all(|f| f.flushed.load(Ordering::Relaxed))
            && wait.elapsed() < RELEASE_WAIT
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
            open = writers();
        }
        if open.is_empty() {
            return Ok(Vec::new());
        }
        let writers = open;
        self.creds.become_daemon();
        let fd = self.fd(inode)?;
        if sys::fstat(fd.as_fd())?.st_blocks == 0 {
            return Ok(Vec::new());
        }
        let ro = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_NOFOLLOW)?;
        let who = Who::from_pid(caller.pid, caller.uid, caller.gid);
        let e = p
            .quarantine
            .stash_copy(ro.as_fd(), rel, &who, Why::Overwrite)?;
        self.stats.count(Op::Quarantined);
        for f in writers {
            f.guard.store(COPIED, Ordering::Relaxed);
        }
        Ok(vec![(e.id, p)])
    }

    pub fn unlink(&self, caller: Caller, parent: u64, name: &OsStr) -> Result<()> {
        self.stats.count(Op::Unlink);
        let (_, pfd) = self.inode_fd(parent)?;
        let c = cstr(name)?;
        if self.protection.is_some() {
            self.creds.become_daemon();
            let st = sys::statat(pfd.as_fd(), &c)?;
            if let Some((p, rel)) = self.guard_removal(parent, name, &st)? {
                self.may_remove(caller, &pfd, &st)?;
                self.creds.become_daemon();
                let who = Who::from_pid(caller.pid, caller.uid, caller.gid);
                p.quarantine
                    .stash_rename(pfd.as_fd(), &c, &rel, &who, Why::Unlink)?;
                self.stats.count(Op::Quarantined);
                self.left(&st, parent, name);
                return Ok(());
            }
        }
        self.creds.become_caller(caller);
        self.check_not_hidden(&pfd, &c)?;
        sys::unlinkat(pfd.as_fd(), &c, 0)?;
        Ok(())
    }

    /// Would removing the name `parent/name` (whose attributes are `st`)
    /// lose a protected file? Its path for the record if so: a protected
    /// name, or the last name of a file that was ever reached through a
    /// protected one. Directories and special files hold no bytes to keep.
    fn guard_removal(
        &self,
        parent: u64,
        name: &OsStr,
        st: &Stat,
    ) -> Result<Option<(&Protection, PathBuf)>> {
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFREG && kind != libc::S_IFLNK {
            return Ok(None);
        }
        if let Some(hit) = self.guard_name(parent, name)? {
            return Ok(Some(hit));
        }
        let sticky = st.st_nlink <= 1 && self.inodes.peek(st).is_some_and(|i| i.was_protected());
        match (
            sticky,
            self.protection.as_ref(),
            self.inodes.dir_path(parent),
        ) {
            (false, _, _) | (_, None, _) => Ok(None),
            (true, Some(p), Some(dir)) => Ok(Some((p, dir.join(name)))),
            (true, Some(_), None) => Err(Errno(libc::EIO)),
        }
    }

    /// The name `parent/name` of the inode `st` is gone.
    fn left(&self, st: &Stat, parent: u64, name: &OsStr) {
        if let Some(inode) = self.inodes.peek(st) {
            inode.left(parent, name);
        }
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
        self.rename_guarded(caller, parent, name, newparent, newname, flags)?;
        self.renamed(parent, name, newparent, newname);
        Ok(())
    }

    /// [`Self::rename`], with the guard's part.
    fn rename_guarded(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let (_, pfd) = self.inode_fd(parent)?;
        let (_, npfd) = self.inode_fd(newparent)?;
        let (c, nc) = (cstr(name)?, cstr(newname)?);
        self.creds.become_caller(caller);
        self.check_not_hidden(&pfd, &c)?;
        self.check_not_hidden(&npfd, &nc)?;
        if self.protection.is_none() {
            sys::renameat2(pfd.as_fd(), &c, npfd.as_fd(), &nc, flags)?;
            return Ok(());
        }
        let from = Name {
            parent,
            name,
            fd: &pfd,
            c: &c,
        };
        let to = Name {
            parent: newparent,
            name: newname,
            fd: &npfd,
            c: &nc,
        };
        self.creds.become_daemon();
        let src = sys::statat(pfd.as_fd(), &c)?;
        let dst = match sys::statat(npfd.as_fd(), &nc) {
            Ok(st) => Some(st),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(e.into()),
        };
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let same = dst.is_some_and(|d| (d.st_dev, d.st_ino) == (src.st_dev, src.st_ino));
        // What leaves protection keeps a link in the quarantine first (a
        // directory that could hold protected files may not leave: EXDEV,
        // so that mv(1) copies and then deletes file by file, each deletion
        // guarded).
        let mut kept = Vec::new();
        if !same {
            kept.extend(self.guard_move(caller, &from, &to, &src)?);
            if let (true, Some(d)) = (exchange, &dst) {
                match self.guard_move(caller, &to, &from, d) {
                    Ok(k) => kept.extend(k),
                    Err(e) => {
                        self.drop_kept(&kept);
                        return Err(e);
                    }
                }
            }
        }
        let src_dir = src.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let replaced = match (&dst, exchange || noreplace || same || src_dir) {
            (Some(d), false) => self.guard_removal(newparent, newname, d)?,
            _ => None,
        };
        let target = self.guard_name(newparent, newname)?;
        let target_protected = target.is_some();
        // A file open for writing that gets a protected name: copied first.
        if let Some((p, rel)) = &target
            && !exchange
            && !same
            // (A source the guard cannot place counts as unprotected: a copy
            // too many, never one too few.)
            && !matches!(self.guard_name(parent, name), Ok(Some(_)))
            && let Some(inode) = self.inodes.peek(&src)
            && !inode.was_protected()
        {
            match self.copy_for_open_writers(caller, &inode, p, rel) {
                Ok(k) => kept.extend(k),
                Err(e) => {
                    self.drop_kept(&kept);
                    return Err(e);
                }
            }
        }
        let r = match replaced {
            Some((p, rel)) => self.replace_protected(caller, p, &rel, &from, &to),
            // A protected name that is absent must still be absent when
            // the rename lands (another node may be restoring it).
            None if dst.is_none() && target_protected && !exchange && !noreplace => {
                match self.guard_name(newparent, newname)? {
                    Some((p, rel)) => self.replace_protected(caller, p, &rel, &from, &to),
                    None => Err(Errno(libc::EIO)),
                }
            }
            None => {
                self.creds.become_caller(caller);
                sys::renameat2(pfd.as_fd(), &c, npfd.as_fd(), &nc, flags).map_err(Errno::from)
            }
        };
        if r.is_err() {
            self.drop_kept(&kept);
        }
        r?;
        // The names moved. A symlink renamed to a protected name is followed
        // now: the kernel keeps its entry and never looks it up again.
        if src.st_mode & libc::S_IFMT == libc::S_IFLNK {
            self.note_alias(&npfd, newparent, newname);
        }
        if exchange && dst.is_some_and(|d| d.st_mode & libc::S_IFMT == libc::S_IFLNK) {
            self.note_alias(&pfd, parent, name);
        }
        self.left(&src, parent, name);
        if let Some(inode) = self.inodes.peek(&src) {
            inode.reached(newparent, newname, target_protected, src.st_nlink > 1);
        }
        if let Some(d) = &dst {
            self.left(d, newparent, newname);
            if exchange && let Some(inode) = self.inodes.peek(d) {
                let prot = self.name_protected(parent, name);
                inode.reached(parent, name, prot, d.st_nlink > 1);
            }
        }
        Ok(())
    }

    /// The file `st` at `from` is about to be renamed to `to`. If that takes
    /// a protected file out of protection, keep a link of it in the
    /// quarantine first (returned, to drop if the rename fails); a
    /// directory that may hold protected files cannot leave (`EXDEV`).
    fn guard_move(
        &self,
        caller: Caller,
        from: &Name<'_>,
        to: &Name<'_>,
        st: &Stat,
    ) -> Result<Vec<(String, &Protection)>> {
        let Some(p) = self.protection.as_ref() else {
            return Ok(Vec::new());
        };
        if self.guard_name(to.parent, to.name)?.is_some() {
            return Ok(Vec::new());
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let (Some(fdir), Some(tdir)) = (
                self.inodes.dir_path(from.parent),
                self.inodes.dir_path(to.parent),
            ) else {
                return Err(Errno(libc::EIO));
            };
            let sticky = self.inodes.under_protected(from.parent)
                || self.inodes.peek(st).is_some_and(|i| i.was_protected());
            let from_may = sticky
                || p.guard.may_protect_below(&fdir.join(from.name))
                || self
                    .aliased(from.parent, from.name)
                    .is_some_and(|v| p.guard.may_protect_below(&v));
            if from_may && !p.guard.may_protect_below(&tdir.join(to.name)) {
                return Err(Errno(libc::EXDEV));
            }
            return Ok(Vec::new());
        }
        let Some((p, rel)) = self.guard_removal(from.parent, from.name, st)? else {
            return Ok(Vec::new());
        };
        self.may_remove(caller, from.fd, st)?;
        self.creds.become_daemon();
        let who = Who::from_pid(caller.pid, caller.uid, caller.gid);
        let e = p
            .quarantine
            .stash_link(from.fd.as_fd(), from.c, &rel, &who, Why::RenameOut)?;
        self.stats.count(Op::Quarantined);
        Ok(vec![(e.id, p)])
    }

    /// Links kept for a rename that did not happen are not needed.
    fn drop_kept(&self, kept: &[(String, &Protection)]) {
        self.creds.become_daemon();
        for (id, p) in kept {
            let _ = p.quarantine.purge(id);
        }
    }

    /// Rename `from` over the protected name `to` (path `rel`) so that
    /// whatever `to` holds when the rename lands is kept: atomically with
    /// `RENAME_EXCHANGE` (the displaced file then moves from the source
    /// name into the quarantine), else, where the filesystem has no
    /// exchange (NFS, GlusterFS), under a lock every node takes.
    fn replace_protected(
        &self,
        caller: Caller,
        p: &Protection,
        rel: &Path,
        from: &Name<'_>,
        to: &Name<'_>,
    ) -> Result<()> {
        let who = Who::from_pid(caller.pid, caller.uid, caller.gid);
        if self.no_exchange {
            return self.replace_locked(caller, p, rel, from, to, &who);
        }
        for _ in 0..64 {
            self.creds.become_daemon();
            if let Ok(d) = sys::statat(to.fd.as_fd(), to.c) {
                self.may_remove(caller, to.fd, &d)?;
            }
            self.creds.become_caller(caller);
            match from.rename_to(to, libc::RENAME_EXCHANGE) {
                Ok(()) => {
                    self.creds.become_daemon();
                    return match p.quarantine.stash_rename(
                        from.fd.as_fd(),
                        from.c,
                        rel,
                        &who,
                        Why::RenameOver,
                    ) {
                        Ok(_) => {
                            self.stats.count(Op::Quarantined);
                            Ok(())
                        }
                        Err(e) => {
                            // Put both back; the rename fails as a whole.
                            self.creds.become_caller(caller);
                            let _ = from.rename_to(to, libc::RENAME_EXCHANGE);
                            Err(e.into())
                        }
                    };
                }
                Err(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                    return self.replace_locked(caller, p, rel, from, to, &who);
                }
                Err(libc::ENOENT) => {
                    // One side is gone. The source: what rename says. The
                    // target: place the source unless a version arrives.
                    self.creds.become_daemon();
                    sys::statat(from.fd.as_fd(), from.c)?;
                    self.creds.become_caller(caller);
                    match from.rename_to(to, libc::RENAME_NOREPLACE) {
                        Ok(()) => return Ok(()),
                        Err(libc::EEXIST) => continue,
                        Err(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                            return self.replace_locked(caller, p, rel, from, to, &who);
                        }
                        Err(e) => return Err(Errno(e)),
                    }
                }
                Err(e) => return Err(Errno(e)),
            }
        }
        tracing::warn!(path = %rel.display(), "the target kept changing under a rename; giving up");
        Err(Errno(libc::EBUSY))
    }

    /// [`Self::replace_protected`] without `RENAME_EXCHANGE`: every node's
    /// link-then-rename of this name runs under one lock in the shared
    /// quarantine, so no version is replaced between the two steps.
    fn replace_locked(
        &self,
        caller: Caller,
        p: &Protection,
        rel: &Path,
        from: &Name<'_>,
        to: &Name<'_>,
        who: &Who,
    ) -> Result<()> {
        self.creds.become_daemon();
        let _lock = p.quarantine.lock_name(rel)?;
        let mut kept = None;
        match sys::statat(to.fd.as_fd(), to.c) {
            Ok(d) if d.st_mode & libc::S_IFMT != libc::S_IFDIR => {
                self.may_remove(caller, to.fd, &d)?;
                self.creds.become_daemon();
                let e = p
                    .quarantine
                    .stash_link(to.fd.as_fd(), to.c, rel, who, Why::RenameOver)?;
                self.stats.count(Op::Quarantined);
                kept = Some(e.id);
            }
            _ => {}
        }
        self.creds.become_caller(caller);
        let r = from.rename_to(to, 0);
        if let (Err(_), Some(id)) = (&r, kept) {
            self.creds.become_daemon();
            let _ = p.quarantine.purge(&id);
        }
        r.map_err(Errno)
    }

    // ---- files -------------------------------------------------------------

    fn register_file(&self, file: File, inode: u64, flags: i32, guard: u8) -> (u64, Arc<OpenFile>) {
        let fh = self.new_fh();
        let f = Arc::new(OpenFile::new(file, inode, flags, guard));
        self.files.insert(fh, Arc::clone(&f));
        self.mind_descriptors();
        (fh, f)
    }

    /// Without kernel passthrough: may the kernel keep the page cache it
    /// has for this file (`FOPEN_KEEP_CACHE`)? Yes when it is opened for
    /// reading and its size and times are what they were at the last open
    /// (base images are read-mostly); a writer clears the stamp, and the
    /// kernel drops cached pages itself when it sees the size or mtime
    /// change (`FUSE_AUTO_INVAL_DATA`).
    pub fn keep_cache(&self, f: &OpenFile) -> bool {
        let Some(inode) = self.inodes.get(f.inode) else {
            return false;
        };
        if f.flags & libc::O_ACCMODE != libc::O_RDONLY {
            inode.data_stamp.store(0, Ordering::Relaxed);
            return false;
        }
        let Ok(st) = sys::fstat(f.file.as_fd()) else {
            return false;
        };
        let stamp = stamp(&st);
        inode.data_stamp.swap(stamp, Ordering::Relaxed) == stamp && stamp != 0
    }

    /// Open files come first: past 3/4 of the open-file limit, cached
    /// descriptors give way (one descriptor per open file), and past 9/10 a
    /// warning is logged (at most once a minute).
    fn mind_descriptors(&self) {
        let open = (self.files.len() + self.locks.len() + self.dirs.len()) as u64;
        let cached = self.inodes.cached() as u64;
        let soft = self.nofile * 3 / 4;
        if open + cached > soft {
            self.inodes
                .shrink_cache(soft.saturating_sub(open).max(16) as usize);
        }
        if open > self.nofile * 9 / 10 {
            let now = self.started.elapsed().as_secs() + 60;
            let last = self.fd_warned.load(Ordering::Relaxed);
            if now >= last + 60
                && self
                    .fd_warned
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    open_files = open,
                    limit = self.nofile,
                    "the daemon is near its open-file limit; new opens may fail with EMFILE (raise LimitNOFILE or the hard limit)"
                );
            }
        }
    }

    /// Open flags for the daemon's own descriptor.
    fn open_flags(flags: i32) -> i32 {
        flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_TRUNC | FMODE_EXEC)
    }

    pub fn open(&self, caller: Caller, id: u64, flags: i32) -> Result<(u64, Arc<OpenFile>)> {
        self.stats.count(Op::Open);
        let (inode, fd) = self.inode_fd(id)?;
        let guard = self.guard_open(&inode, fd.as_fd(), flags)?;
        self.creds.become_caller(caller);
        if flags & FMODE_EXEC != 0 {
            // execve: the caller needs execute permission, not read (a mode
            // 0711 program runs); the daemon reads it on the kernel's behalf.
            sys::access_fd(fd.as_fd(), libc::X_OK)?;
            self.creds.become_daemon();
        }
        let file = File::from(sys::reopen(
            fd.as_fd(),
            Self::open_flags(flags) | libc::O_NOFOLLOW,
        )?);
        Ok(self.register_file(file, id, flags & !FMODE_EXEC, guard))
    }

    /// Before opening a regular file: a reference to a protected file that
    /// is no longer at a protected name the kernel used is stale (another
    /// node quarantined, replaced or moved it): `ESTALE`, so the kernel looks
    /// the name up again. A protected file opened for writing gets a
    /// guarded handle (its first destructive write copies it first).
    fn guard_open(&self, inode: &Inode, fd: BorrowedFd<'_>, flags: i32) -> Result<u8> {
        if self.protection.is_none() || inode.kind != libc::S_IFREG {
            return Ok(UNGUARDED);
        }
        if inode.was_protected() {
            self.creds.become_daemon();
            if self.protected_place(inode)?.is_none() && self.live_place(inode)?.is_none() {
                return Err(Errno(libc::ESTALE));
            }
        }
        if flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Ok(UNGUARDED);
        }
        self.creds.become_daemon();
        let st = sys::fstat(fd)?;
        Ok(match self.guard_inode(inode, &st)? {
            Some(_) => GUARDED,
            None => UNGUARDED,
        })
    }

    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(Arc<Inode>, Stat, u64, Arc<OpenFile>)> {
        self.stats.count(Op::Create);
        let (_, pfd) = self.inode_fd(parent)?;
        let c = cstr(name)?;
        self.creds.become_caller(caller);
        self.check_not_hidden(&pfd, &c)?;
        let mode = self.masked(&pfd, mode, umask);
        // O_TRUNC is applied after the guard has seen the file: the name
        // may exist by now (another node made it) and be protected.
        let fd = sys::openat(
            pfd.as_fd(),
            &c,
            (flags & !(libc::O_NOCTTY | libc::O_TRUNC)) | libc::O_CREAT | libc::O_NOFOLLOW,
            mode,
        )?;
        let file = File::from(fd);
        let (inode, st) = self.lookup_created(parent, &pfd, name, &file)?;
        // An existing file opened for writing: as `open`.
        let mut guard = if st.st_size > 0 {
            self.guard_open(&inode, file.as_fd(), flags)?
        } else {
            UNGUARDED
        };
        let st = if flags & libc::O_TRUNC != 0 && st.st_size > 0 {
            if self.preserve(caller, &inode, file.as_fd(), Why::Truncate)? {
                guard = COPIED;
            }
            self.creds.become_caller(caller);
            sys::ftruncate(file.as_fd(), 0)?;
            sys::fstat(file.as_fd())?
        } else {
            st
        };
        let (fh, f) = self.register_file(file, inode.id, flags & !libc::O_CREAT, guard);
        Ok((inode, st, fh, f))
    }

    /// A read answered without [`Self::read`] (spliced): count it.
    pub fn count_read(&self, bytes: usize) {
        self.stats.count(Op::Read);
        self.stats.add(Op::ReadBytes, bytes as u64);
        self.stats.add(Op::SplicedBytes, bytes as u64);
    }

    /// Read up to `size` bytes at `offset` and hand them to `reply` (from
    /// this thread's buffer, so without a copy of its own).
    pub fn read<R>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        reply: impl FnOnce(&[u8]) -> R,
    ) -> Result<R> {
        self.stats.count(Op::Read);
        let f = self.file(fh)?;
        let direct = f.direct();
        with_scratch(size as usize, direct, |buf| {
            let mut done = 0usize;
            while done < buf.len() {
                match f.file.read_at(&mut buf[done..], offset + done as u64) {
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
                if direct {
                    break;
                }
            }
            self.stats.add(Op::ReadBytes, done as u64);
            Ok(reply(&buf[..done]))
        })
    }

    pub fn write(
        &self,
        caller: Caller,
        fh: u64,
        offset: u64,
        data: &[u8],
        kill_suid: bool,
    ) -> Result<(u32, bool)> {
        self.stats.count(Op::Write);
        let f = self.file(fh)?;
        if f.guarded() {
            // Appending destroys nothing; anything else copies first.
            let st = sys::fstat(f.file.as_fd())?;
            if offset < st.st_size as u64 || f.guard.load(Ordering::Relaxed) == COPIED {
                self.preserve_handle(caller, &f, Why::Overwrite)?;
            }
        }
        let n = if f.direct() {
            with_scratch(data.len(), true, |buf| {
                buf.copy_from_slice(data);
                f.file.write_at(buf, offset)
            })?
        } else {
            f.file.write_at(data, offset)?
        };
        // A write by a caller without CAP_FSETID clears set-user-ID, and
        // set-group-ID where group execute is set (as the kernel does);
        // returns whether the mode changed (the kernel's copy is stale): the
        // bits were set at open and are gone now (the backing filesystem
        // clears them itself when this thread has the caller's fsuid), or
        // they were set since and are cleared here. One fstat, only for a
        // caller without CAP_FSETID.
        let mut killed = false;
        if kill_suid {
            let st = sys::fstat(f.file.as_fd())?;
            let mut drop = st.st_mode & libc::S_ISUID;
            if st.st_mode & libc::S_IXGRP != 0 {
                drop |= st.st_mode & libc::S_ISGID;
            }
            let cleared_here =
                drop != 0 && sys::chmod_fd(f.file.as_fd(), st.st_mode & 0o7777 & !drop).is_ok();
            let had_at_open = f.kills_privs.swap(false, Ordering::Relaxed);
            killed = cleared_here || had_at_open;
        }
        self.stats.add(Op::WriteBytes, n as u64);
        Ok((n as u32, killed))
    }

    /// A `close` of the file through the mount: the backing filesystem's
    /// own flush runs (write-back and errors on NFS, GlusterFS, CephFS:
    /// close-to-open), and the closing owner's POSIX locks are dropped.
    /// Returns whether the handle could write: then the kernel's cached
    /// times may be stale (writes through `mmap` with kernel passthrough
    /// change the backing file without a request).
    pub fn flush(&self, fh: u64, lock_owner: u64) -> Result<bool> {
        self.stats.count(Op::Flush);
        // close() drops the caller's POSIX locks on this file: drop the lock
        // description of that owner (OFD and flock owners are the file, not
        // the process, and are kept until release).
        self.locks.remove(&(fh, lock_owner));
        let f = self.file(fh)?;
        f.flushed.store(true, Ordering::Relaxed);
        sys::flush_fd(f.file.as_fd())?;
        Ok(f.flags & libc::O_ACCMODE != libc::O_RDONLY)
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

    pub fn fallocate(
        &self,
        caller: Caller,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<()> {
        self.stats.count(Op::Fallocate);
        let f = self.file(fh)?;
        let destroys = libc::FALLOC_FL_PUNCH_HOLE
            | libc::FALLOC_FL_ZERO_RANGE
            | libc::FALLOC_FL_COLLAPSE_RANGE
            | libc::FALLOC_FL_INSERT_RANGE;
        if mode & destroys != 0 {
            self.preserve_handle(caller, &f, Why::Overwrite)?;
        }
        // As the caller (the guard may have switched to the daemon): an
        // unprivileged caller's fallocate clears the set-ID bits.
        self.creds.become_caller(caller);
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
        caller: Caller,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
        flags: u32,
    ) -> Result<u32> {
        self.stats.count(Op::CopyFileRange);
        let (fi, fo) = (self.file(fh_in)?, self.file(fh_out)?);
        if fo.guarded() {
            self.preserve_handle(caller, &fo, Why::Overwrite)?;
        }
        let len = len.min(u32::MAX as u64 & !0xfff) as usize;
        // As the caller, as fallocate.
        self.creds.become_caller(caller);
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

    /// How a blocking lock wait is done on the backing filesystem (see
    /// [`crate::lockwait`]).
    pub fn lock_wait_mode(&self, fh: u64) -> crate::lockwait::WaitMode {
        let local = self
            .file(fh)
            .ok()
            .and_then(|f| sys::fs_magic(f.file.as_fd()).ok())
            .is_some_and(sys::locks_are_local);
        if local {
            crate::lockwait::WaitMode::Blocking
        } else {
            crate::lockwait::WaitMode::Poll
        }
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

    /// The directory's entries as they are now, read through `list` (the
    /// handle's own descriptor). Records the directory's stamp first: the
    /// kernel's cache of this listing (`FOPEN_CACHE_DIR`) is only as new as
    /// that, so a later open keeps it only if the stamp is still the same.
    fn snapshot(&self, id: u64, list: &OwnedFd) -> Result<Vec<DirEntry>> {
        let st = sys::fstat(list.as_fd())?;
        if let Some(inode) = self.inodes.get(id) {
            inode.data_stamp.store(stamp(&st), Ordering::Relaxed);
        }
        let mut out = vec![
            DirEntry {
                ino: st.st_ino,
                kind: libc::S_IFDIR,
                name: ".".into(),
            },
            DirEntry {
                ino: sys::statat(list.as_fd(), c"..")
                    .map(|s| s.st_ino)
                    .unwrap_or(1),
                kind: libc::S_IFDIR,
                name: "..".into(),
            },
        ];
        for e in sys::read_dir_fd(list.as_fd())? {
            if self.is_hidden_ino(e.ino) {
                if let Ok(st) = sys::statat(list.as_fd(), &cstr(&e.name)?) {
                    if self.is_hidden(&st) {
                        continue;
                    }
                }
            }
            let kind = match e.kind {
                libc::DT_DIR => libc::S_IFDIR,
                libc::DT_LNK => libc::S_IFLNK,
                libc::DT_FIFO => libc::S_IFIFO,
                libc::DT_SOCK => libc::S_IFSOCK,
                libc::DT_CHR => libc::S_IFCHR,
                libc::DT_BLK => libc::S_IFBLK,
                libc::DT_REG => libc::S_IFREG,
                // The filesystem did not say (some do not): ask the inode.
                _ => match sys::statat(list.as_fd(), &cstr(&e.name)?) {
                    Ok(st) => st.st_mode & libc::S_IFMT,
                    Err(_) => continue,
                },
            };
            out.push(DirEntry {
                ino: e.ino,
                kind,
                name: e.name,
            });
        }
        Ok(out)
    }

    /// Open directory `id` for reading, as the caller (the open checks read
    /// permission, as a real directory stream's does). The listing itself is
    /// read at the first `readdir`: a directory the kernel lists from its own
    /// cache costs no more than this open. Returns the handle and whether
    /// the kernel may keep its cached listing (`FOPEN_KEEP_CACHE`): yes when
    /// the directory's size and times are what they were when that listing
    /// was read, so another node's change is seen at the next open.
    pub fn opendir(&self, caller: Caller, id: u64) -> Result<(u64, bool)> {
        self.stats.count(Op::Opendir);
        let (inode, fd) = self.inode_fd(id)?;
        self.creds.become_caller(caller);
        let list = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
        let keep = sys::fstat(list.as_fd())
            .map(|st| {
                let s = stamp(&st);
                s != 0 && s == inode.data_stamp.load(Ordering::Relaxed)
            })
            .unwrap_or(false);
        let fh = self.new_fh();
        self.dirs.insert(
            fh,
            Arc::new(OpenDir {
                dir: DirRef { id, fd },
                list,
                state: Mutex::new((false, Arc::new(Vec::new()))),
            }),
        );
        Ok((fh, keep))
    }

    /// Entries from `offset` on (offset = index of the next entry). The
    /// first read takes the snapshot; offset 0 after that (rewinddir) takes
    /// a fresh one.
    pub fn readdir(&self, _caller: Caller, fh: u64, offset: u64) -> Result<Arc<Vec<DirEntry>>> {
        self.stats.count(Op::Readdir);
        let d = self
            .dirs
            .get(&fh)
            .map(|d| Arc::clone(&d))
            .ok_or(Errno(libc::EBADF))?;
        let mut state = d.state.lock();
        if !state.0 || offset == 0 {
            // Read through the handle's own descriptor: its permission was
            // checked when it was opened.
            self.creds.become_daemon();
            state.1 = Arc::new(self.snapshot(d.dir.id, &d.list)?);
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
    ) -> Result<(Arc<Vec<DirEntry>>, DirRef)> {
        let entries = self.readdir(caller, fh, offset)?;
        let d = self
            .dirs
            .get(&fh)
            .map(|d| Arc::clone(&d))
            .ok_or(Errno(libc::EBADF))?;
        Ok((entries, d.dir.clone()))
    }

    /// Look up one entry of a readdirplus reply. "." and ".." are only
    /// stat'ed: the kernel takes no reference on them.
    pub fn readdirplus_entry(
        &self,
        caller: Caller,
        dir: &DirRef,
        name: &OsStr,
    ) -> Result<(Option<Arc<Inode>>, Stat)> {
        self.creds.become_caller(caller);
        if name == "." || name == ".." {
            return Ok((None, sys::statat(dir.fd.as_fd(), &cstr(name)?)?));
        }
        let (inode, st) = self.lookup_at(dir.id, &dir.fd, name)?;
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
            d.dir.fd.as_fd(),
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

    /// Where the xattr calls for inode `id` go, with the caller's
    /// credentials: its own descriptor, or for a symlink (whose `O_PATH`
    /// descriptor cannot be used without following it) its directory and
    /// name, checked to still be that symlink.
    fn xattr_target(&self, caller: Caller, id: u64) -> Result<XattrTarget> {
        let (inode, fd) = self.inode_fd(id)?;
        let target = match inode.link_name() {
            None if inode.kind == libc::S_IFLNK => return Err(Errno(libc::EOPNOTSUPP)),
            None => XattrTarget::Fd(fd),
            Some((parent, name)) => {
                let (_, pfd) = self.inode_fd(parent)?;
                let c = cstr(&name)?;
                let st = sys::statat(pfd.as_fd(), &c)?;
                if (st.st_dev, st.st_ino) != (inode.dev, inode.ino) {
                    return Err(Errno(libc::ESTALE));
                }
                XattrTarget::Link(pfd, c)
            }
        };
        self.creds.become_caller(caller);
        Ok(target)
    }

    pub fn getxattr(&self, caller: Caller, id: u64, name: &OsStr, size: u32) -> Result<XattrReply> {
        self.stats.count(Op::Getxattr);
        let attr = cstr(name)?;
        Ok(match self.xattr_target(caller, id)? {
            XattrTarget::Fd(fd) => sys::getxattr_fd(fd.as_fd(), &attr, size as usize)?,
            XattrTarget::Link(d, n) => sys::lgetxattr_at(d.as_fd(), &n, &attr, size as usize)?,
        })
    }

    pub fn listxattr(&self, caller: Caller, id: u64, size: u32) -> Result<XattrReply> {
        self.stats.count(Op::Listxattr);
        Ok(match self.xattr_target(caller, id)? {
            XattrTarget::Fd(fd) => sys::listxattr_fd(fd.as_fd(), size as usize)?,
            XattrTarget::Link(d, n) => sys::llistxattr_at(d.as_fd(), &n, size as usize)?,
        })
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
        let attr = cstr(name)?;
        match self.xattr_target(caller, id)? {
            XattrTarget::Fd(fd) => sys::setxattr_fd(fd.as_fd(), &attr, value, flags)?,
            XattrTarget::Link(d, n) => sys::lsetxattr_at(d.as_fd(), &n, &attr, value, flags)?,
        }
        Ok(())
    }

    pub fn removexattr(&self, caller: Caller, id: u64, name: &OsStr) -> Result<()> {
        self.stats.count(Op::Removexattr);
        let attr = cstr(name)?;
        match self.xattr_target(caller, id)? {
            XattrTarget::Fd(fd) => sys::removexattr_fd(fd.as_fd(), &attr)?,
            XattrTarget::Link(d, n) => sys::lremovexattr_at(d.as_fd(), &n, &attr)?,
        }
        Ok(())
    }

    /// Switch this thread back to the daemon's credentials.
    pub fn as_daemon(&self) {
        self.creds.become_daemon();
    }

    /// After a rename through the mount: where inodes are kept by name (no
    /// durable handles), the moved inodes are now known by their new names.
    fn renamed(&self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr) {
        if self.inodes.uses_handles() {
            return;
        }
        self.creds.become_daemon();
        for (dir, n) in [(newparent, newname), (parent, name)] {
            let Ok((_, dfd)) = self.inode_fd(dir) else {
                continue;
            };
            if let Ok(st) = cstr(n).and_then(|c| Ok(sys::statat(dfd.as_fd(), &c)?)) {
                self.inodes.moved(&st, dir, n);
            }
        }
    }

    /// The inode number shown for node `id` with backing attributes `st`.
    pub fn shown_ino(&self, id: u64, st: &Stat) -> u64 {
        self.inodes.shown_ino(id, st)
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
                let fd = d.dir.fd.as_fd().try_clone_to_owned().ok()?;
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
                // The guard's state of the handle is not kept: a write
                // handle of a protected file starts guarded again (its next
                // destructive write copies the file first).
                let guard = match self.inode(inode) {
                    Ok(i) if flags & libc::O_ACCMODE != libc::O_RDONLY => {
                        self.guard_open(&i, file.as_fd(), flags).unwrap_or(GUARDED)
                    }
                    _ => UNGUARDED,
                };
                self.files
                    .insert(fh, Arc::new(OpenFile::new(file, inode, flags, guard)));
                fh
            }
            Handle::Dir { fh } => {
                let st = sys::fstat(fd.as_fd())?;
                let id = self.learn(&fd, &st)?;
                let list = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
                let fd = Arc::new(fd);
                let entries = self.snapshot(id, &list)?;
                let state = Mutex::new((true, Arc::new(entries)));
                let dir = DirRef { id, fd };
                self.dirs.insert(fh, Arc::new(OpenDir { dir, list, state }));
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
        // Known by its handle: the record is that handle (what the inode
        // store itself reopens it by), made without a syscall. Lookups and
        // READDIRPLUS entries export every new node, so this is most of them.
        if let Some(h) = inode.handle() {
            let rec = InodeRecord {
                id,
                dev: inode.dev,
                ino: inode.ino,
                kind: inode.kind,
                handle: Some(h.to_parts()),
            };
            return Some((rec, None));
        }
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
        // Without a handle only a descriptor names the node again. The
        // supervisor keeps those of directories (few, and what paths go
        // through); files on such a filesystem (GlusterFS) are not kept: the
        // keeper's descriptors must stay bounded, and the kernel looks a
        // file up again by its path after a restart.
        let fd = match rec.handle {
            None if inode.is_dir() => Some(fd),
            _ => None,
        };
        if rec.handle.is_none() && fd.is_none() {
            return None;
        }
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
        Ok(self.inodes.lookup_fd(fd, &st, None)?.id)
    }

    /// Make the inode behind `fd` known (one lookup), for a handle taken over.
    fn learn(&self, fd: &OwnedFd, st: &Stat) -> Result<u64> {
        if let Some(i) = self.inodes.known(st) {
            return Ok(i.id);
        }
        let path = sys::reopen(fd.as_fd(), libc::O_PATH)?;
        Ok(self.inodes.lookup_fd(path, st, None)?.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spelled_dirs_are_the_leading_literal_directories() {
        assert_eq!(spelled_dirs("_base/**"), vec!["_base"]);
        assert_eq!(spelled_dirs("nova/_base/**"), vec!["nova", "_base"]);
        assert_eq!(spelled_dirs("/./nova/_base/*.img"), vec!["nova", "_base"]);
        assert_eq!(spelled_dirs("a/*/b/**"), vec!["a"]);
        assert!(spelled_dirs("**").is_empty());
        assert!(
            spelled_dirs("_base").is_empty(),
            "a file glob names no directory"
        );
        let globs = vec!["nova/_base/**".to_string()];
        assert!(spelled_out(&globs, Path::new("nova")));
        assert!(spelled_out(&globs, Path::new("nova/_base")));
        assert!(
            !spelled_out(&globs, Path::new("nova/_base/x")),
            "a name inside"
        );
        assert!(!spelled_out(&globs, Path::new("_base")));
        assert!(!spelled_out(&globs, Path::new("")));
    }
}
