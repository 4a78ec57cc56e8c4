//! The one module with `unsafe` code and raw syscalls, behind a small safe API.
//!
//! Everything here takes borrowed descriptors and Rust strings and returns
//! `io::Result`, so the rest of the crate is plain safe Rust. Directory-relative
//! (`*at`) calls are used throughout so that the daemon never resolves a path
//! string from the root of the host: every name is one component under a
//! descriptor it already holds.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

pub use libc::stat as Stat;

pub mod uring;

/// Result of a raw syscall returning -1 on error.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A single path component or relative path as a C string. Interior NULs are
/// rejected with `EINVAL` (the kernel never sends them, but be safe).
pub fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

const EMPTY: &CStr = c"";

/// `/proc/self/fd/N`: the magic link that reopens an `O_PATH` descriptor.
pub fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    // A decimal number never contains NUL.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

fn owned(fd: libc::c_int) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open-style syscall and is
    // owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// `openat(dirfd, name, flags | O_CLOEXEC, mode)`.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: valid C string and descriptor; the result is checked.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    Ok(owned(fd))
}

/// Open the directory `path` as `O_PATH`, resolving every component (symlinks
/// included, absolute ones too) as if `root` were `/` (`RESOLVE_IN_ROOT`):
/// whatever `path` says, the result is `root` or below it.
pub fn open_dir_in_root(root: BorrowedFd<'_>, path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: `open_how` is plain integers; all-zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid descriptor, C string and `open_how` of the size passed; the
    // result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    Ok(owned(cvt(fd as libc::c_int)?))
}

/// Open a path (used once at start-up for the backing directory).
pub fn open_path(path: &std::path::Path, flags: i32) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: as above.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) })?;
    Ok(owned(fd))
}

/// Reopen an `O_PATH` descriptor with real access flags through
/// `/proc/self/fd/N` (permission checks apply to the current fsuid/fsgid).
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let p = proc_fd_path(fd);
    let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW);
    // SAFETY: valid C string; result checked.
    let fd = cvt(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) })?;
    Ok(owned(fd))
}

/// `fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW)`.
pub fn statat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
    let mut st = MaybeUninit::<Stat>::uninit();
    // SAFETY: `st` is a valid out-pointer; it is initialised on success.
    cvt(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so the buffer is filled.
    Ok(unsafe { st.assume_init() })
}

/// `fstat` of any descriptor, `O_PATH` included.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let mut st = MaybeUninit::<Stat>::uninit();
    // SAFETY: as in `statat`; AT_EMPTY_PATH works on O_PATH descriptors.
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: success means initialised.
    Ok(unsafe { st.assume_init() })
}

/// Forward a close-time flush to the file behind `fd` without closing it:
/// close a duplicate (as libfuse's passthrough_hp does). Shared filesystems
/// (NFS, GlusterFS, CephFS) write back and report write errors in their
/// `->flush`, which only `close` reaches; that is their close-to-open
/// guarantee. The daemon holds no POSIX locks of its own (only OFD locks),
/// so the lock release that `close` also does removes nothing.
pub fn flush_fd(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor; the result is checked.
    let dup = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `dup` was just created here and is owned by nobody else; it is
    // closed exactly once.
    match cvt(unsafe { libc::close(dup) }) {
        // On Linux the descriptor is gone even on EINTR; the flush ran.
        Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
        r => r.map(|_| ()),
    }
}

/// The filesystem type (`f_type`, a magic number) of the filesystem holding `fd`.
pub fn fs_magic(fd: BorrowedFd<'_>) -> io::Result<i64> {
    let mut st = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: valid out-pointer; fstatfs accepts O_PATH descriptors.
    cvt(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: success means initialised.
    #[allow(clippy::unnecessary_cast)] // f_type is not i64 on every target
    Ok(unsafe { st.assume_init() }.f_type as i64)
}

/// `f_type` of every FUSE filesystem.
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Filesystems whose locks the kernel itself manages: a blocking lock
/// request that is interrupted is dequeued and never granted later. (A FUSE
/// or network filesystem may grant it afterwards: GlusterFS does.)
pub fn locks_are_local(magic: i64) -> bool {
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    const TMPFS: i64 = 0x0102_1994;
    const F2FS: i64 = 0xF2F5_2010;
    matches!(magic, EXT4 | XFS | BTRFS | TMPFS | F2FS)
}

/// `fstatfs`-backed statvfs of the filesystem holding `fd`.
pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: valid out-pointer; fstatvfs accepts O_PATH descriptors.
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: success means initialised.
    Ok(unsafe { st.assume_init() })
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: valid arguments; result checked.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    // SAFETY: valid arguments; result checked.
    cvt(unsafe {
        libc::mknodat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode as libc::mode_t,
            rdev as libc::dev_t,
        )
    })?;
    Ok(())
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid arguments; result checked.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
    Ok(())
}

/// `readlinkat(fd, "")` on an `O_PATH` descriptor of a symlink.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: buffer pointer and length describe `buf`.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: valid arguments; result checked.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })?;
    Ok(())
}

/// `renameat2` (flags: RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT).
pub fn renameat2(
    olddir: BorrowedFd<'_>,
    old: &CStr,
    newdir: BorrowedFd<'_>,
    new: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid arguments; result checked.
    cvt(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            old.as_ptr(),
            newdir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    })?;
    Ok(())
}

/// Make a new name for the inode behind `fd` (an `O_PATH` descriptor) without
/// needing its old name: `linkat` through `/proc/self/fd/N`.
pub fn link_fd(fd: BorrowedFd<'_>, newdir: BorrowedFd<'_>, new: &CStr) -> io::Result<()> {
    let p = proc_fd_path(fd);
    // SAFETY: valid arguments; result checked.
    cvt(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            p.as_ptr(),
            newdir.as_raw_fd(),
            new.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })?;
    Ok(())
}

/// `linkat(olddir, old, newdir, new, 0)`: hard link by name.
pub fn linkat(
    olddir: BorrowedFd<'_>,
    old: &CStr,
    newdir: BorrowedFd<'_>,
    new: &CStr,
) -> io::Result<()> {
    // SAFETY: valid arguments; result checked.
    cvt(unsafe {
        libc::linkat(
            olddir.as_raw_fd(),
            old.as_ptr(),
            newdir.as_raw_fd(),
            new.as_ptr(),
            0,
        )
    })?;
    Ok(())
}

/// chmod of the inode behind an `O_PATH` descriptor (not for symlinks).
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let p = proc_fd_path(fd);
    // SAFETY: valid arguments; result checked.
    cvt(unsafe { libc::chmod(p.as_ptr(), mode as libc::mode_t) })?;
    Ok(())
}

/// chown of the inode behind any descriptor (`u32::MAX` leaves a field as is).
pub fn chown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid arguments; AT_EMPTY_PATH works with O_PATH descriptors.
    cvt(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(())
}

/// `truncate` of the inode behind an `O_PATH` descriptor (permission-checked).
pub fn truncate_fd_path(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let p = proc_fd_path(fd);
    // SAFETY: valid arguments; result checked.
    cvt(unsafe { libc::truncate(p.as_ptr(), size as libc::off_t) })?;
    Ok(())
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    // SAFETY: valid arguments; result checked.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) })?;
    Ok(())
}

/// A time for [`utimens`]: left alone, set to now, or set to a value.
#[derive(Clone, Copy, Debug)]
pub enum TimeSpec {
    Omit,
    Now,
    Set(i64, i64),
}

impl TimeSpec {
    fn raw(self) -> libc::timespec {
        match self {
            TimeSpec::Omit => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            TimeSpec::Now => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            TimeSpec::Set(s, ns) => libc::timespec {
                tv_sec: s,
                tv_nsec: ns,
            },
        }
    }
}

/// utimensat on the inode behind an `O_PATH` descriptor, through
/// `/proc/self/fd/N` (symlinks: the link itself is not followed).
pub fn utimens_fd(fd: BorrowedFd<'_>, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let p = proc_fd_path(fd);
    let times = [atime.raw(), mtime.raw()];
    // SAFETY: valid path and a two-element array, as the call requires.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) })?;
    Ok(())
}

/// `faccessat2(fd, "", mode, AT_EMPTY_PATH | AT_EACCESS)`: access check with
/// the thread's fsuid/fsgid and groups.
pub fn access_fd(fd: BorrowedFd<'_>, mode: i32) -> io::Result<()> {
    // SAFETY: raw syscall with valid arguments; result checked.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_faccessat2,
            fd.as_raw_fd(),
            EMPTY.as_ptr(),
            mode,
            libc::AT_EMPTY_PATH | libc::AT_EACCESS,
        )
    })?;
    Ok(())
}

fn xattr_path(fd: BorrowedFd<'_>) -> CString {
    proc_fd_path(fd)
}

/// What a get/listxattr call gives back: with a zero-size request, the size
/// needed; otherwise the bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum XattrReply {
    Size(usize),
    Data(Vec<u8>),
}

fn xattr_reply(mut buf: Vec<u8>, size: usize, n: isize) -> io::Result<XattrReply> {
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if size == 0 {
        return Ok(XattrReply::Size(n as usize));
    }
    buf.truncate(n as usize);
    Ok(XattrReply::Data(buf))
}

fn buf_ptr(buf: &mut [u8]) -> *mut libc::c_void {
    if buf.is_empty() {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    }
}

/// getxattr of the inode behind a descriptor.
pub fn getxattr_fd(fd: BorrowedFd<'_>, name: &CStr, size: usize) -> io::Result<XattrReply> {
    let p = xattr_path(fd);
    let mut buf = vec![0u8; size];
    // SAFETY: buffer pointer/length describe `buf` (null with size 0).
    let n = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), buf_ptr(&mut buf), size) };
    xattr_reply(buf, size, n)
}

/// listxattr of the inode behind a descriptor.
pub fn listxattr_fd(fd: BorrowedFd<'_>, size: usize) -> io::Result<XattrReply> {
    let p = xattr_path(fd);
    let mut buf = vec![0u8; size];
    // SAFETY: buffer pointer/length describe `buf` (null with size 0).
    let n = unsafe { libc::listxattr(p.as_ptr(), buf_ptr(&mut buf).cast(), size) };
    xattr_reply(buf, size, n)
}

pub fn setxattr_fd(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let p = xattr_path(fd);
    // SAFETY: value pointer/length describe `value`.
    cvt(unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })?;
    Ok(())
}

pub fn removexattr_fd(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let p = xattr_path(fd);
    // SAFETY: valid C strings.
    cvt(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) })?;
    Ok(())
}

/// `/proc/self/fd/<dir>/<name>`: a path whose last component is not
/// followed by the `l*xattr` calls, so a symlink's own attributes are
/// reached through its directory (its `O_PATH` descriptor cannot be used).
fn entry_path(dir: BorrowedFd<'_>, name: &CStr) -> CString {
    let mut p = proc_fd_path(dir).into_bytes();
    p.push(b'/');
    p.extend_from_slice(name.to_bytes());
    // Neither part contains NUL.
    CString::new(p).unwrap_or_default()
}

/// getxattr of the entry `dir/name` itself (a symlink is not followed).
pub fn lgetxattr_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    attr: &CStr,
    size: usize,
) -> io::Result<XattrReply> {
    let p = entry_path(dir, name);
    let mut buf = vec![0u8; size];
    // SAFETY: buffer pointer/length describe `buf` (null with size 0).
    let n = unsafe { libc::lgetxattr(p.as_ptr(), attr.as_ptr(), buf_ptr(&mut buf), size) };
    xattr_reply(buf, size, n)
}

/// listxattr of the entry `dir/name` itself.
pub fn llistxattr_at(dir: BorrowedFd<'_>, name: &CStr, size: usize) -> io::Result<XattrReply> {
    let p = entry_path(dir, name);
    let mut buf = vec![0u8; size];
    // SAFETY: buffer pointer/length describe `buf` (null with size 0).
    let n = unsafe { libc::llistxattr(p.as_ptr(), buf_ptr(&mut buf).cast(), size) };
    xattr_reply(buf, size, n)
}

/// setxattr of the entry `dir/name` itself.
pub fn lsetxattr_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    attr: &CStr,
    value: &[u8],
    flags: i32,
) -> io::Result<()> {
    let p = entry_path(dir, name);
    // SAFETY: value pointer/length describe `value`.
    cvt(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            attr.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })?;
    Ok(())
}

/// removexattr of the entry `dir/name` itself.
pub fn lremovexattr_at(dir: BorrowedFd<'_>, name: &CStr, attr: &CStr) -> io::Result<()> {
    let p = entry_path(dir, name);
    // SAFETY: valid C strings.
    cvt(unsafe { libc::lremovexattr(p.as_ptr(), attr.as_ptr()) })?;
    Ok(())
}

/// Does the directory behind `fd` carry a default POSIX ACL?
pub fn has_default_acl(fd: BorrowedFd<'_>) -> bool {
    let p = xattr_path(fd);
    // SAFETY: valid C strings; a zero-size query writes nothing.
    let n = unsafe {
        libc::getxattr(
            p.as_ptr(),
            c"system.posix_acl_default".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    n > 0
}

/// One entry read from a directory descriptor.
pub struct RawDirEntry {
    pub ino: u64,
    /// `DT_*` (`DT_UNKNOWN` where the filesystem does not say).
    pub kind: u8,
    pub name: std::ffi::OsString,
}

/// Every entry of the directory open at `fd` (`O_RDONLY|O_DIRECTORY`), read
/// from its start with `getdents64`; `.` and `..` are left out. The
/// descriptor's position moves, so it must be this caller's alone.
pub fn read_dir_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<RawDirEntry>> {
    use std::os::unix::ffi::OsStringExt;
    lseek(fd, 0, libc::SEEK_SET)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: the buffer is valid for `buf.len()` bytes and the kernel
        // writes at most that many; the result is checked.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(out);
        }
        // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
        let mut at = 0usize;
        let end = n as usize;
        while at + 19 <= end {
            let rec = &buf[at..end];
            let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or_default());
            let reclen = u16::from_ne_bytes(rec[16..18].try_into().unwrap_or_default()) as usize;
            if reclen < 19 || reclen > rec.len() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let kind = rec[18];
            let raw = &rec[19..reclen];
            let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
            if name != b"." && name != b".." {
                out.push(RawDirEntry {
                    ino,
                    kind,
                    name: std::ffi::OsString::from_vec(name.to_vec()),
                });
            }
            at += reclen;
        }
    }
}

pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on a valid descriptor.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: i64, len: i64) -> io::Result<()> {
    // SAFETY: plain syscall on a valid descriptor.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) })?;
    Ok(())
}

pub fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: i64,
    fd_out: BorrowedFd<'_>,
    off_out: i64,
    len: usize,
    flags: u32,
) -> io::Result<usize> {
    let mut oi = off_in;
    let mut oo = off_out;
    // SAFETY: the offset pointers are to locals that outlive the call.
    let n = unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            &mut oi,
            fd_out.as_raw_fd(),
            &mut oo,
            len,
            flags,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The `FICLONE` ioctl: share all blocks of `src` with `dst` (reflink).
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> io::Result<()> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    // SAFETY: FICLONE takes the source descriptor as its argument.
    cvt(unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) })?;
    Ok(())
}

/// A byte-range lock as FUSE describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockRange {
    pub typ: i32,
    pub start: u64,
    /// Inclusive end; `u64::MAX` or `i64::MAX` means "to end of file".
    pub end: u64,
    pub pid: u32,
}

fn to_flock(l: &LockRange) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l.typ as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = l.start.min(i64::MAX as u64) as libc::off_t;
    fl.l_len = if l.end >= i64::MAX as u64 {
        0
    } else {
        (l.end - l.start.min(l.end) + 1) as libc::off_t
    };
    fl.l_pid = 0;
    fl
}

/// Open file description lock (F_OFD_SETLK / F_OFD_SETLKW).
pub fn ofd_setlk(fd: BorrowedFd<'_>, l: &LockRange, wait: bool) -> io::Result<()> {
    let fl = to_flock(l);
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    // SAFETY: `fl` is a valid flock for the duration of the call.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &fl) })?;
    Ok(())
}

/// F_OFD_GETLK: the first conflicting lock, or `typ == F_UNLCK`.
pub fn ofd_getlk(fd: BorrowedFd<'_>, l: &LockRange) -> io::Result<LockRange> {
    let mut fl = to_flock(l);
    // SAFETY: `fl` is a valid, writable flock.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) })?;
    let start = fl.l_start.max(0) as u64;
    let end = if fl.l_len == 0 {
        i64::MAX as u64
    } else {
        start + fl.l_len as u64 - 1
    };
    Ok(LockRange {
        typ: fl.l_type as i32,
        start,
        end,
        pid: if fl.l_pid < 0 { 0 } else { fl.l_pid as u32 },
    })
}

/// Per-thread filesystem credentials. These are raw syscalls on purpose:
/// glibc's `setgroups` changes every thread of the process.
pub fn set_thread_fsuid(uid: u32) -> u32 {
    // SAFETY: setfsuid cannot fail in a way that matters here; it returns the
    // previous fsuid.
    unsafe { libc::syscall(libc::SYS_setfsuid, uid) as u32 }
}

pub fn set_thread_fsgid(gid: u32) -> u32 {
    // SAFETY: as for setfsuid.
    unsafe { libc::syscall(libc::SYS_setfsgid, gid) as u32 }
}

pub fn set_thread_groups(groups: &[u32]) -> io::Result<()> {
    // SAFETY: pointer/length describe `groups`; raw syscall affects this thread only.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_setgroups,
            groups.len() as libc::size_t,
            groups.as_ptr(),
        )
    })?;
    Ok(())
}

/// `umask` for this thread's filesystem context (CLONE_FS is shared by all
/// threads, so the daemon sets 0 once and applies the caller's umask itself).
pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

/// An opaque kernel file handle (`name_to_handle_at`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileHandle {
    handle_type: i32,
    bytes: Box<[u8]>,
}

const MAX_HANDLE_SZ: usize = 128;

#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// `name_to_handle_at(fd, "", AT_EMPTY_PATH)`: the handle of the inode
/// behind a descriptor.
pub fn name_to_handle(fd: BorrowedFd<'_>) -> io::Result<FileHandle> {
    handle_of(fd, EMPTY, libc::AT_EMPTY_PATH)
}

/// `name_to_handle_at(dir, name, 0)`: the handle of `dir/name` itself
/// (symlinks are not followed), without opening it.
pub fn name_to_handle_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<FileHandle> {
    handle_of(dir, name, 0)
}

fn handle_of(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<FileHandle> {
    let mut raw = RawHandle {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `raw` is a file_handle with room for MAX_HANDLE_SZ bytes, and
    // `mount_id` a writable int, as name_to_handle_at(2) requires.
    cvt_long(unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut raw as *mut RawHandle,
            &mut mount_id as *mut libc::c_int,
            flags,
        )
    })?;
    let n = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok(FileHandle {
        handle_type: raw.handle_type,
        bytes: raw.f_handle[..n].into(),
    })
}

/// `open_by_handle_at(mount_fd, handle, flags)`; needs CAP_DAC_READ_SEARCH.
pub fn open_by_handle(mount_fd: BorrowedFd<'_>, h: &FileHandle, flags: i32) -> io::Result<OwnedFd> {
    let mut raw = RawHandle {
        handle_bytes: h.bytes.len() as u32,
        handle_type: h.handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    raw.f_handle[..h.bytes.len()].copy_from_slice(&h.bytes);
    // SAFETY: `raw` is a valid file_handle; result checked.
    let fd = cvt_long(unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            &mut raw as *mut RawHandle,
            flags | libc::O_CLOEXEC,
        )
    })?;
    Ok(owned(fd as RawFd))
}

/// Raise the open-file limit as far as allowed: both limits to the
/// kernel's maximum (`fs.nr_open`, capped at 2^20) where the process may
/// raise its hard limit (root), else the soft limit to the hard one.
/// Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) })?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(1 << 20);
    if nr_open > rl.rlim_max {
        let up = libc::rlimit {
            rlim_cur: nr_open,
            rlim_max: nr_open,
        };
        // SAFETY: valid in-pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &up) } == 0 {
            return Ok(nr_open);
        }
    }
    rl.rlim_cur = rl.rlim_max;
    // SAFETY: valid in-pointer.
    cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) })?;
    Ok(rl.rlim_cur)
}

pub fn geteuid() -> u32 {
    // SAFETY: cannot fail.
    unsafe { libc::geteuid() }
}

/// The host name (for quarantine records).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: pointer/length describe `buf`.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return String::from("unknown");
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Detach-unmount a path (used by tests and the CLI's private namespace).
pub fn umount_detach(path: &std::path::Path) -> io::Result<()> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: valid C string.
    cvt(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) })?;
    Ok(())
}

/// Unmount a path, failing with EBUSY while anything still uses the mount
/// (never detaches lazily).
pub fn umount(path: &std::path::Path) -> io::Result<()> {
    let c = cstr(path.as_os_str())?;
    // SAFETY: valid C string.
    cvt(unsafe { libc::umount2(c.as_ptr(), 0) })?;
    Ok(())
}

/// Enter a private mount namespace (the calling process must be
/// single-threaded), with propagation turned off so nothing leaks back.
pub fn unshare_mount_namespace() -> io::Result<()> {
    // SAFETY: plain syscalls; results checked.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
    let root = c"/";
    // SAFETY: valid C strings and null data pointers as mount(2) allows.
    cvt(unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    Ok(())
}

/// Send a signal to a process.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall.
    cvt(unsafe { libc::kill(pid, sig) })?;
    Ok(())
}

/// `statfs` on `path`, made by a forked child process; returns once the
/// child has ended, with its result.
///
/// Once a FUSE daemon has read a request, the kernel waits for its answer
/// uninterruptibly: a thread left waiting on a daemon that took the request
/// and never answers keeps its whole process from exiting (an unreapable
/// zombie that still holds the caller's pipes). A child process bears that
/// wait instead. It holds no descriptor of the caller (all are closed) and
/// works from `/`, so an abandoned one pins nothing but the mount it probes,
/// and ends by itself once the daemon answers or the mount is aborted. The
/// caller waits with a timeout from another thread (waiting for a child is
/// interruptible).
pub fn statfs_in_child(path: &std::path::Path) -> io::Result<()> {
    // Everything the child needs, allocated before the fork.
    let path = cstr(path.as_os_str())?;
    // SAFETY: the child of a multithreaded process may only make
    // async-signal-safe calls: `statfs_child` makes raw syscalls on memory
    // allocated before the fork and leaves with `_exit`, never returning.
    let pid = cvt(unsafe { libc::fork() })?;
    if pid == 0 {
        statfs_child(&path);
    }
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child; writes `status`.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    } else {
        // Killed before it had an answer.
        Err(io::Error::from_raw_os_error(libc::EINTR))
    }
}

/// The child of [`statfs_in_child`]: exits 0 if `statfs` answered, else
/// with the errno.
fn statfs_child(path: &CStr) -> ! {
    // SAFETY: raw syscalls only (see `statfs_in_child`); errno is this
    // thread's; `st` is a local out-pointer.
    unsafe {
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        libc::chdir(c"/".as_ptr());
        let fd = libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        let mut st = MaybeUninit::<libc::statfs>::uninit();
        let code = if fd >= 0 && libc::fstatfs(fd, st.as_mut_ptr()) == 0 {
            0
        } else {
            match *libc::__errno_location() {
                e @ 1..=255 => e,
                _ => libc::EIO,
            }
        };
        libc::_exit(code)
    }
}

/// Block the given signals in this thread (and threads it spawns later) and
/// wait for one of them in a dedicated thread with [`wait_signal`].
pub fn block_signals(sigs: &[i32]) -> io::Result<()> {
    // SAFETY: sigset_t manipulation on a local set.
    unsafe {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        for &s in sigs {
            libc::sigaddset(set.as_mut_ptr(), s);
        }
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
    }
    Ok(())
}

/// Wait for one of the (blocked) signals; returns its number.
pub fn wait_signal(sigs: &[i32]) -> io::Result<i32> {
    // SAFETY: sigset_t manipulation on a local set; sigwait writes `sig`.
    unsafe {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        for &s in sigs {
            libc::sigaddset(set.as_mut_ptr(), s);
        }
        let mut sig: libc::c_int = 0;
        let r = libc::sigwait(set.as_ptr(), &mut sig);
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(sig)
    }
}

/// Point stdin, stdout and stderr at /dev/null (a detached daemon, once its
/// parent has read the READY line and gone).
pub fn redirect_stdio_to_devnull() -> io::Result<()> {
    let null = open_path(std::path::Path::new("/dev/null"), libc::O_RDWR)?;
    for target in 0..3 {
        // SAFETY: dup2 onto the standard descriptors; `null` stays valid.
        cvt(unsafe { libc::dup2(null.as_raw_fd(), target) })?;
    }
    Ok(())
}

/// The signal the daemon sends one of its own threads to end a blocking
/// syscall of that thread (a lock wait) with EINTR.
pub fn wakeup_signal() -> i32 {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_wakeup(_sig: libc::c_int) {}

/// Handle [`wakeup_signal`] by doing nothing, without `SA_RESTART`, so that
/// it interrupts the blocking syscall of the thread it is sent to.
pub fn install_wakeup_handler() -> io::Result<()> {
    let handler: extern "C" fn(libc::c_int) = on_wakeup;
    // SAFETY: a zeroed sigaction is valid; the handler is async-signal-safe
    // (it does nothing); the mask is initialised before use.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        cvt(libc::sigaction(wakeup_signal(), &sa, std::ptr::null_mut()))?;
    }
    Ok(())
}

/// Unblock `sig` in the calling thread.
pub fn unblock_signal(sig: i32) -> io::Result<()> {
    // SAFETY: sigset_t manipulation on a local set.
    unsafe {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), sig);
        let r = libc::pthread_sigmask(libc::SIG_UNBLOCK, set.as_ptr(), std::ptr::null_mut());
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
    }
    Ok(())
}

/// The calling thread's kernel thread id.
pub fn gettid() -> i32 {
    // SAFETY: cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Send `sig` to thread `tid` of this process (`tgkill`). The caller must
/// know the thread is still alive (a dead thread's id may be reused).
pub fn signal_own_thread(tid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscalls; the result is checked.
    cvt_long(unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, sig) })?;
    Ok(())
}

// ---- the restartable session (src/session/) ---------------------------------

/// A connected pair of `AF_UNIX` `SOCK_SEQPACKET` sockets (message boundaries kept, EOF when
/// the peer closes), close-on-exec.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    Ok((owned(fds[0]), owned(fds[1])))
}

/// Wait up to `timeout` (forever if `None`) until one of `fds` is readable or its peer
/// is gone; which ones are. An interrupted wait reports none.
pub fn poll_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<std::time::Duration>,
) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|f| libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    // SAFETY: `p` is a live array of `p.len()` pollfd structures.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter().map(|x| x.revents != 0).collect())
}

/// Most descriptors one message carries.
pub const MAX_FDS_PER_MESSAGE: usize = 8;

/// Send one message on a Unix socket with descriptors attached (`SCM_RIGHTS`). The receiver
/// gets its own descriptors of the same open file descriptions.
pub fn send_with_fds(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    send_with_fds_flags(sock, data, fds, 0)
}

/// `send_with_fds` without waiting for room: `WouldBlock` when the peer's queue is full.
pub fn try_send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    send_with_fds_flags(sock, data, fds, libc::MSG_DONTWAIT)
}

fn send_with_fds_flags(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
    flags: i32,
) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // Aligned room for one SCM_RIGHTS header with up to MAX_FDS_PER_MESSAGE descriptors.
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; every pointer set below points at live local buffers
    // of the stated sizes; CMSG_* walk inside `cbuf`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !raw.is_empty() {
            let bytes = std::mem::size_of_val(raw.as_slice()) as u32;
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = libc::CMSG_SPACE(bytes) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr() as *const u8,
                libc::CMSG_DATA(c),
                bytes as usize,
            );
        }
        loop {
            let n = libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | flags);
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Receive one message (and its descriptors, close-on-exec) from a Unix socket. `Ok((0, []))`
/// is end of file on a `SOCK_SEQPACKET` socket.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_with_fds_flags(sock, buf, 0)
}

/// `recv_with_fds` without waiting: `WouldBlock` when no message is queued.
pub fn try_recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, Vec<OwnedFd>)> {
    recv_with_fds_flags(sock, buf, libc::MSG_DONTWAIT)
}

fn recv_with_fds_flags(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: i32,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: as in `send_with_fds`; the kernel writes at most `msg_controllen` bytes of
    // control data and the descriptors it installed are ours to own.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        let n = loop {
            let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags);
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                let count = len / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    let mut fd: libc::c_int = 0;
                    std::ptr::copy_nonoverlapping(
                        data.add(i * std::mem::size_of::<libc::c_int>()),
                        &mut fd as *mut libc::c_int as *mut u8,
                        std::mem::size_of::<libc::c_int>(),
                    );
                    fds.push(owned(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        Ok((n, fds))
    }
}

/// `mount(2)` of a FUSE filesystem: `data` carries `fd=N,rootmode=...` and the options.
pub fn mount_fuse(
    source: &str,
    target: &std::path::Path,
    fstype: &str,
    flags: u64,
    data: &str,
) -> io::Result<()> {
    let src = CString::new(source).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let tgt = cstr(target.as_os_str())?;
    let ty = CString::new(fstype).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let dat = CString::new(data).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid C strings.
    cvt(unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            ty.as_ptr(),
            flags as libc::c_ulong,
            dat.as_ptr() as *const libc::c_void,
        )
    })?;
    Ok(())
}

impl FileHandle {
    /// The handle's type and bytes, to be saved (a supervisor keeps them for the next
    /// serving process).
    pub fn to_parts(&self) -> (i32, Vec<u8>) {
        (self.handle_type, self.bytes.to_vec())
    }

    /// A handle saved with [`FileHandle::to_parts`]. The kernel checks it when it is used.
    pub fn from_parts(handle_type: i32, bytes: Vec<u8>) -> FileHandle {
        FileHandle {
            handle_type,
            bytes: bytes.into_boxed_slice(),
        }
    }
}

/// Restore the default action of `SIGPIPE` (terminate quietly), as `ls` and
/// `cat` have it: Rust ignores it, so a closed pipe (`baseguard list | head`)
/// would otherwise make every later write fail and `println!` panic. For the
/// short-lived commands only, never the daemon.
pub fn default_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
