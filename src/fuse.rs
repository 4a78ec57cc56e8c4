//! The thin `fuser` adapter: decode a request, call [`Passthrough`], encode
//! the reply. The only state here is FUSE-specific: the kernel passthrough
//! backing ids (one per inode while any handle is open), and, for the
//! restartable session ([`crate::session`]), the hand-over of every handle to
//! the supervisor before the kernel hears of it.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use dashmap::mapref::one::RefMut;
use fuser::{
    AccessFlags, BackingId, CopyFileRangeFlags, Errno as FErrno, FileAttr, FileHandle, FileType,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, Notifier, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLock, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};

use crate::creds::Caller;
use crate::fs::{Errno, OpenFile, Passthrough, SetAttr};
use crate::inode::Inode;
use crate::lockwait::LockWaits;
use crate::session::custody::Custody;
use crate::stats::Op;
use crate::sys::{LockRange, Stat, TimeSpec, XattrReply};

/// How long the kernel may cache names and attributes. Short, because other
/// compute nodes change the shared directory behind our back (as NFS's own
/// attribute cache does).
const TTL: Duration = Duration::from_secs(1);

/// Kernel passthrough backing ids by inode, with the number of open handles using each.
pub type BackingTable = DashMap<u64, (BackingId, usize)>;

/// What the session layer ([`crate::session`]) shares with the adapter.
#[derive(Default)]
pub struct Handover {
    /// The supervisor's keeper of handles (a restartable session only).
    pub custody: OnceLock<Arc<Custody>>,
    /// Closed when this server hands the session over.
    pub gate: OnceLock<Arc<fuser::Gate>>,
    /// Kernel passthrough was negotiated (set at INIT, or restored on a resume).
    pub passthrough: AtomicBool,
    /// The backing ids (adopted from the previous server on a resume).
    pub backing: BackingTable,
    /// Set once the session exists: tells the kernel when an attribute it
    /// caches changed behind its back (a write that cleared set-ID bits).
    pub notifier: OnceLock<Notifier>,
    /// Ask the kernel for FUSE-over-io_uring at INIT (`transport=uring`).
    pub want_uring: AtomicBool,
    /// FUSE-over-io_uring was negotiated (set at INIT, or restored on a resume): the
    /// kernel waits for ring entries on every CPU queue before it sends a request.
    pub uring: AtomicBool,
}

/// The adapter.
pub struct FuseAdapter {
    fs: Arc<Passthrough>,
    passthrough: bool,
    shared: Arc<Handover>,
    lock_waits: Arc<LockWaits>,
    /// File data this daemon serves is spliced into replies (cleared, once,
    /// if the backing filesystem or the kernel refuses).
    splice: std::sync::atomic::AtomicBool,
}

impl FuseAdapter {
    pub fn new(fs: Arc<Passthrough>, passthrough: bool) -> FuseAdapter {
        Self::with_handover(fs, passthrough, Arc::default())
    }

    /// An adapter sharing `shared` with the session layer; `passthrough` is what to ask the
    /// kernel for at INIT (a resumed session sets `shared.passthrough` itself).
    pub fn with_handover(
        fs: Arc<Passthrough>,
        passthrough: bool,
        shared: Arc<Handover>,
    ) -> FuseAdapter {
        shared.passthrough.store(passthrough, Ordering::Relaxed);
        FuseAdapter {
            fs,
            passthrough,
            shared,
            lock_waits: Arc::new(LockWaits::new()),
            splice: std::sync::atomic::AtomicBool::new(true),
        }
    }

    fn custody(&self) -> Option<&Custody> {
        self.shared.custody.get().map(|c| &**c)
    }

    fn passthrough(&self) -> bool {
        self.shared.passthrough.load(Ordering::Relaxed)
    }
}

/// A request the kernel hands out again after a serving process died with it
/// (`FUSE_NOTIFY_RESEND` marks its unique id): it may have been carried out already.
fn resent(req: &Request) -> bool {
    req.unique().0 & (1 << 63) != 0
}

/// A resent removal whose name is gone was done by the server that died.
fn removed(req: &Request, r: crate::fs::Result<()>) -> crate::fs::Result<()> {
    if resent(req) {
        tracing::info!(unique = req.unique().0, ok = r.is_ok(), "resent removal");
    }
    match r {
        Err(Errno(libc::ENOENT)) if resent(req) => Ok(()),
        r => r,
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn ferr(e: Errno) -> FErrno {
    FErrno::from_i32(e.0)
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    let nsec = nsec.clamp(0, 999_999_999) as u32;
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::new(0, nsec)
    }
}

fn file_type(kind: u32) -> FileType {
    match kind {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// Attributes for the kernel. `ino` is the node id in entry replies (fuser
/// sends `attr.ino` as the node id) and [`Passthrough::shown_ino`] in
/// attribute replies, which is the same number except for the root.
fn attr(st: &Stat, ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode & libc::S_IFMT),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn timespec(t: TimeOrNow) -> TimeSpec {
    match t {
        TimeOrNow::Now => TimeSpec::Now,
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeSpec::Set(d.as_secs() as i64, d.subsec_nanos() as i64),
            Err(e) => {
                let d = e.duration();
                let (mut s, mut ns) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if ns < 0 {
                    s -= 1;
                    ns += 1_000_000_000;
                }
                TimeSpec::Set(s, ns)
            }
        },
    }
}

fn empty(reply: ReplyEmpty, r: crate::fs::Result<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(ferr(e)),
    }
}

fn xattr(reply: ReplyXattr, r: crate::fs::Result<XattrReply>) {
    match r {
        Ok(XattrReply::Size(n)) => reply.size(n as u32),
        Ok(XattrReply::Data(d)) => reply.data(&d),
        Err(e) => reply.error(ferr(e)),
    }
}

impl FuseAdapter {
    /// The kernel passthrough backing id for the file's inode, registered
    /// with `register` on the first open and shared by later ones (the
    /// kernel wants one backing file per inode). `None`: serve data here.
    fn backing(
        &self,
        f: &OpenFile,
        register: impl FnOnce(BorrowedFd<'_>) -> std::io::Result<BackingId>,
    ) -> Option<RefMut<'_, u64, (BackingId, usize)>> {
        if !self.passthrough() {
            return None;
        }
        self.fs.as_daemon();
        match self.shared.backing.entry(f.inode) {
            Entry::Occupied(mut o) => {
                o.get_mut().1 += 1;
                Some(o.into_ref())
            }
            Entry::Vacant(v) => match register(f.file.as_fd()) {
                Ok(id) => {
                    self.fs.stats.count(Op::Passthrough);
                    Some(v.insert((id, 1)))
                }
                Err(e) => {
                    tracing::debug!(inode = f.inode, error = %e, "no passthrough for this file");
                    None
                }
            },
        }
    }

    /// Open flags for a file whose data this daemon serves (no kernel
    /// passthrough): `O_DIRECT` opens bypass the page cache on this side
    /// too (no double caching), and an unchanged file opened for reading
    /// keeps the kernel's cache from earlier opens.
    fn served_flags(&self, f: &OpenFile) -> FopenFlags {
        if f.direct() {
            FopenFlags::FOPEN_DIRECT_IO
        } else if self.fs.keep_cache(f) {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        }
    }

    /// Should this open file bypass kernel passthrough? (A guarded handle,
    /// or one whose writes must clear set-ID bits, of an inode the kernel
    /// does not pass through yet: it wants every open of an inode it passes
    /// through passed through too.)
    fn unpassed(&self, f: &OpenFile) -> bool {
        (f.guarded() || f.kills_privs.load(std::sync::atomic::Ordering::Relaxed))
            && self.passthrough()
            && !self.shared.backing.contains_key(&f.inode)
    }

    fn release_backing(&self, inode: u64) {
        if let Entry::Occupied(mut o) = self.shared.backing.entry(inode) {
            o.get_mut().1 -= 1;
            if o.get().1 == 0 {
                // Closed in the kernel now: the `Del` of every file that used it has
                // gone to the supervisor already (`release` sends it first), so no new
                // server adopts an id the kernel may give to another file.
                o.remove();
            }
        }
    }
}

impl FuseAdapter {
    /// An entry reply; `fresh`: the node was just made (its number may be a reused one).
    fn entry(&self, reply: ReplyEntry, r: crate::fs::Result<(Arc<Inode>, Stat)>, fresh: bool) {
        match r {
            Ok((inode, st)) => {
                self.keep_inode(inode.id, fresh, None);
                reply.entry(&TTL, &attr(&st, inode.id), Generation(0))
            }
            Err(e) => reply.error(ferr(e)),
        }
    }

    /// Hand a node the kernel is about to learn to the supervisor.
    fn keep_inode(&self, id: u64, fresh: bool, file: Option<BorrowedFd<'_>>) {
        if let Some(c) = self.custody() {
            c.keep_inode(&self.fs, id, fresh, file);
        }
    }

    /// Hand a new open file to the supervisor before the kernel hears of it.
    fn keep_file(&self, fh: u64, backing: Option<u32>) {
        if let Some(c) = self.custody() {
            c.keep_file(&self.fs, fh, backing);
        }
    }

    /// A lock taken: hand its description to the supervisor before answering.
    fn keep_lock(&self, fh: u64, owner: u64, typ: i32, r: &crate::fs::Result<()>) {
        if let (Some(c), Ok(())) = (self.custody(), r) {
            if typ != libc::F_UNLCK {
                c.keep_lock(&self.fs, fh, owner);
            }
        }
    }

    /// A resent creation whose name exists was done by the server that died: answer with
    /// the entry.
    fn made(
        &self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        r: crate::fs::Result<(Arc<Inode>, Stat)>,
    ) -> crate::fs::Result<(Arc<Inode>, Stat)> {
        match r {
            Err(Errno(libc::EEXIST)) if resent(req) => self.fs.lookup(caller(req), parent, name),
            r => r,
        }
    }
}

impl fuser::Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let caps = config.capabilities();
        let want = InitFlags::FUSE_POSIX_LOCKS
            | InitFlags::FUSE_FLOCK_LOCKS
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_DO_READDIRPLUS
            // Attributes with a listing only when the kernel expects stats
            // after it (a bare listing costs no lookups).
            | InitFlags::FUSE_READDIRPLUS_AUTO
            // Cached pages of a file whose size or mtime changed (another
            // node wrote it) are dropped (matters without passthrough).
            | InitFlags::FUSE_AUTO_INVAL_DATA
            // The kernel checks permissions with the attributes it caches
            // (search permission along a cached path, FIFO opens) and POSIX
            // ACLs, as a local filesystem does; the backing filesystem still
            // decides too (requests run with the caller's credentials), so
            // nothing it would refuse is allowed. The umask is left to us.
            // File handles through the mount (name_to_handle_at and, after
            // the kernel dropped its caches, open_by_handle_at): lookups of
            // `.` and `..` by node id.
            | InitFlags::FUSE_EXPORT_SUPPORT
            | InitFlags::FUSE_POSIX_ACL
            | InitFlags::FUSE_DONT_MASK;
        let _ = config.add_capabilities(want & caps);
        // Large requests where the daemon serves data (1 MiB reads ahead).
        let _ = config.set_max_readahead(crate::bdi::READ_KIB << 10);
        if self.passthrough {
            let ok = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::warn!(
                    "the kernel offers no FUSE passthrough: file data goes through the daemon"
                );
                self.passthrough = false;
            }
        }
        self.shared
            .passthrough
            .store(self.passthrough, Ordering::Relaxed);
        // FUSE-over-io_uring: offered only when the module parameter allows it. The ring
        // entries' payload buffers must hold max_write: 1 MiB keeps them small.
        let uring = self.shared.want_uring.load(Ordering::Relaxed)
            && caps.contains(InitFlags::FUSE_OVER_IO_URING)
            && config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
        if uring {
            let _ = config.set_max_write(crate::session::ring::PAYLOAD as u32);
        }
        self.shared.uring.store(uring, Ordering::Relaxed);
        if let Some(c) = self.custody() {
            let v = config.kernel_abi();
            c.keep_params(crate::session::proto::Params {
                major: v.0,
                minor: v.1,
                passthrough: self.passthrough,
                uring,
            });
        }
        tracing::info!(
            passthrough = self.passthrough,
            locks = caps.contains(InitFlags::FUSE_POSIX_LOCKS),
            killpriv_v2 = caps.contains(InitFlags::FUSE_HANDLE_KILLPRIV_V2),
            "kernel session ready"
        );
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, self.fs.lookup(caller(req), parent.0, name), false);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
        if let Some(c) = self.custody() {
            if self.fs.inode(ino.0).is_err() {
                c.forget_inode(ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(st) => reply.attr(&TTL, &attr(&st, self.fs.shown_ino(ino.0, &st))),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(timespec),
            mtime: mtime.map(timespec),
        };
        match self.fs.setattr(caller(req), ino.0, fh.map(|f| f.0), a) {
            Ok(st) => reply.attr(&TTL, &attr(&st, self.fs.shown_ino(ino.0, &st))),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .fs
            .mknod(caller(req), parent.0, name, mode, umask, rdev);
        self.entry(reply, self.made(req, parent.0, name, r), true);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.fs.mkdir(caller(req), parent.0, name, mode, umask);
        self.entry(reply, self.made(req, parent.0, name, r), true);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            reply,
            removed(req, self.fs.unlink(caller(req), parent.0, name)),
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(
            reply,
            removed(req, self.fs.rmdir(caller(req), parent.0, name)),
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.fs.symlink(caller(req), parent.0, link_name, target);
        self.entry(reply, self.made(req, parent.0, link_name, r), true);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.fs.rename(
            caller(req),
            parent.0,
            name,
            newparent.0,
            newname,
            flags.bits(),
        );
        empty(reply, removed(req, r));
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.fs.link(caller(req), ino.0, newparent.0, newname);
        self.entry(reply, self.made(req, newparent.0, newname, r), false);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.open(caller(req), ino.0, flags.0) {
            // A protected file opened for writing: its writes come here, so
            // that a write after another node quarantined the file is
            // refused (unless the kernel already passes the inode through:
            // it wants every open of it passed through then).
            Ok((fh, f)) if self.unpassed(&f) => {
                self.keep_file(fh, None);
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
            }
            Ok((fh, f)) if f.guarded() && self.passthrough() => {
                if let Err(e) = self.fs.unseen_writes(caller(req), &f) {
                    let _ = self.fs.release(fh);
                    return reply.error(ferr(e));
                }
                match self.backing(&f, |fd| reply.open_backing(fd)) {
                    Some(b) => {
                        self.keep_file(fh, Some(b.0.id()));
                        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b.0)
                    }
                    None => {
                        self.keep_file(fh, None);
                        reply.opened(FileHandle(fh), FopenFlags::empty())
                    }
                }
            }
            Ok((fh, f)) => match self.backing(&f, |fd| reply.open_backing(fd)) {
                Some(b) => {
                    self.keep_file(fh, Some(b.0.id()));
                    reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b.0)
                }
                None => {
                    self.keep_file(fh, None);
                    reply.opened(FileHandle(fh), self.served_flags(&f))
                }
            },
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        // A resent exclusive create may have made the file already.
        let flags = if resent(req) {
            flags & !libc::O_EXCL
        } else {
            flags
        };
        match self
            .fs
            .create(caller(req), parent.0, name, mode, umask, flags)
        {
            Ok((inode, st, fh, f)) => {
                self.keep_inode(inode.id, true, Some(f.file.as_fd()));
                let a = attr(&st, inode.id);
                let flags = FopenFlags::empty();
                if self.unpassed(&f) {
                    self.keep_file(fh, None);
                    let direct = FopenFlags::FOPEN_DIRECT_IO;
                    return reply.created(&TTL, &a, Generation(0), FileHandle(fh), direct);
                }
                if f.guarded() && self.passthrough() {
                    if let Err(e) = self.fs.unseen_writes(caller(req), &f) {
                        let _ = self.fs.release(fh);
                        return reply.error(ferr(e));
                    }
                }
                match self.backing(&f, |fd| reply.open_backing(fd)) {
                    Some(b) => {
                        self.keep_file(fh, Some(b.0.id()));
                        let fh = FileHandle(fh);
                        reply.created_passthrough(&TTL, &a, Generation(0), fh, flags, &b.0)
                    }
                    None => {
                        self.keep_file(fh, None);
                        let served = self.served_flags(&f);
                        reply.created(&TTL, &a, Generation(0), FileHandle(fh), served)
                    }
                }
            }
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Straight from the backing file's page cache into the reply (not for
        // O_DIRECT handles, whose reads must stay uncached and aligned).
        let mut reply = reply;
        if self.splice.load(Ordering::Relaxed)
            && let Ok(f) = self.fs.file(fh.0)
            && !f.direct()
        {
            match reply.splice(f.file.as_fd(), offset, size as usize) {
                Ok(n) => return self.fs.count_read(n),
                Err((r, e)) => {
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EPERM)
                    ) && self.splice.swap(false, Ordering::Relaxed)
                    {
                        tracing::info!(error = %e, "file data is copied, not spliced, into replies");
                    }
                    reply = r;
                }
            }
        }
        let mut reply = Some(reply);
        let r = self.fs.read(fh.0, offset, size, |data| {
            if let Some(r) = reply.take() {
                r.data(data)
            }
        });
        if let (Err(e), Some(r)) = (r, reply.take()) {
            r.error(ferr(e));
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.fs.write(caller(req), fh.0, offset, data, kill) {
            Ok((n, killed)) => {
                if killed && let Some(nt) = self.shared.notifier.get() {
                    // Before the reply, so the writer's next stat is fresh;
                    // attributes only (a negative offset keeps the pages).
                    let _ = nt.inval_inode(ino, -1, 0);
                }
                reply.written(n);
            }
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let r = self.fs.flush(fh.0, lock_owner.0);
        if let Some(c) = self.custody() {
            c.forget_lock(fh.0, lock_owner.0);
        }
        if let Ok(true) = r
            && let Some(nt) = self.shared.notifier.get()
        {
            // A writer closes: its writes through `mmap` reached the backing
            // file without a request, so the times the kernel cached are
            // stale. Before the reply, so a `stat` after `close` is fresh;
            // attributes only (a negative offset keeps the pages).
            let _ = nt.inval_inode(ino, -1, 0);
        }
        empty(reply, r.map(|_| ()));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(c) = self.custody() {
            c.forget_file(fh.0);
        }
        match self.fs.release(fh.0) {
            Ok(Some(f)) => {
                if self.passthrough() {
                    self.release_backing(f.inode);
                }
                reply.ok()
            }
            Ok(None) => reply.ok(),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fs.fsync(fh.0, datasync));
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.opendir(caller(req), ino.0) {
            Ok((fh, keep)) => {
                if let Some(c) = self.custody() {
                    c.keep_dir(&self.fs, fh);
                }
                // The kernel caches listings and reads them again from its
                // cache while the directory is unchanged (checked at open).
                let flags = if keep {
                    FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::FOPEN_CACHE_DIR
                };
                reply.opened(FileHandle(fh), flags)
            }
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.fs.readdir(caller(req), fh.0, offset) {
            Ok(entries) => {
                for (i, e) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(e.ino), (i + 1) as u64, file_type(e.kind), &e.name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let c = caller(req);
        let (entries, dir) = match self.fs.readdirplus(c, fh.0, offset) {
            Ok(x) => x,
            Err(e) => return reply.error(ferr(e)),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            // An entry that vanished since the snapshot is left out.
            let Ok((inode, st)) = self.fs.readdirplus_entry(c, &dir, &e.name) else {
                continue;
            };
            let id = inode.as_ref().map_or(st.st_ino, |i| i.id);
            if reply.add(
                INodeNo(id),
                (i + 1) as u64,
                &e.name,
                &TTL,
                &attr(&st, id),
                Generation(0),
            ) {
                // Did not fit: the kernel never saw this lookup.
                if let Some(inode) = inode {
                    self.fs.forget(inode.id, 1);
                }
                break;
            }
            if let Some(inode) = &inode {
                self.keep_inode(inode.id, false, None);
            }
        }
        reply.ok()
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        if let Some(c) = self.custody() {
            c.forget_dir(fh.0);
        }
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(reply, self.fs.fsyncdir(fh.0, datasync));
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs(ino.0) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.fs.setxattr(caller(req), ino.0, name, value, flags),
        );
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr(reply, self.fs.getxattr(caller(req), ino.0, name, size));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr(reply, self.fs.listxattr(caller(req), ino.0, size));
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(reply, self.fs.removexattr(caller(req), ino.0, name));
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        empty(reply, self.fs.access(caller(req), ino.0, mask.bits()));
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let l = LockRange {
            typ,
            start,
            end,
            pid,
        };
        match self.fs.getlk(fh.0, lock_owner.0, l) {
            Ok(l) => reply.locked(l.start, l.end, l.typ, l.pid),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn setlk(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let l = LockRange {
            typ,
            start,
            end,
            pid,
        };
        let (fh, owner) = (fh.0, lock_owner.0);
        if !sleep || typ == libc::F_UNLCK {
            let r = self.fs.setlk(fh, owner, l, false);
            self.keep_lock(fh, owner, typ, &r);
            return empty(reply, r);
        }
        // A blocking lock may wait for another node for a long time: try
        // once here, and wait on a thread of its own so no request thread is
        // held up, until the lock comes or the waiting process is
        // interrupted (see `lockwait`).
        match self.fs.setlk(fh, owner, l, false) {
            Err(Errno(e)) if e == libc::EAGAIN || e == libc::EACCES => {
                let fs = Arc::clone(&self.fs);
                let shared = Arc::clone(&self.shared);
                let waits = Arc::clone(&self.lock_waits);
                let caller = req.pid();
                let mode = self.fs.lock_wait_mode(fh);
                let spawned =
                    std::thread::Builder::new()
                        .name("lock-wait".into())
                        .spawn(move || {
                            let r = waits.wait(caller, mode, |block| fs.setlk(fh, owner, l, block));
                            // Handed over meanwhile: the next server answers the
                            // resent request (the lock, if kept, is still held).
                            let gate = shared.gate.get();
                            if gate.is_some_and(|g| !g.enter()) {
                                std::mem::forget(reply);
                                return;
                            }
                            if let Some(c) = shared.custody.get() {
                                if r.is_ok() {
                                    c.keep_lock(&fs, fh, owner);
                                }
                            }
                            empty(reply, r);
                            if let Some(g) = gate {
                                g.leave();
                            }
                        });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a lock-wait thread");
                }
            }
            r => {
                self.keep_lock(fh, owner, typ, &r);
                empty(reply, r)
            }
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(FErrno::from_i32(libc::ENOTTY));
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(
            reply,
            self.fs.fallocate(caller(req), fh.0, offset, length, mode),
        );
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.fs.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(ferr(e)),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self.fs.copy_file_range(
            caller(req),
            fh_in.0,
            offset_in,
            fh_out.0,
            offset_out,
            len,
            flags.bits() as u32,
        ) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(ferr(e)),
        }
    }
}
