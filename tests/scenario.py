#!/usr/bin/env python3
"""Transparency scenario: performs every passthrough operation under ROOT and
prints one line per step with its result or errno name. The same script runs
on a native directory and through a baseguard mount; the outputs must match.
Nothing printed may depend on where ROOT is (no inode numbers or times)."""
import ctypes, errno, fcntl, hashlib, os, stat, sys

root = sys.argv[1]
os.chdir(root)
libc = ctypes.CDLL(None, use_errno=True)
out = []


def say(step, value):
    out.append(f"{step}: {value}")


def attempt(step, fn):
    try:
        r = fn()
        say(step, "ok" if r is None else r)
    except OSError as e:
        say(step, errno.errorcode.get(e.errno, str(e.errno)))


def st(p, follow=False):
    s = os.stat(p) if follow else os.lstat(p)
    return f"{stat.filemode(s.st_mode)} size={s.st_size} nlink={s.st_nlink} uid={s.st_uid} gid={s.st_gid}"


def digest(p):
    with open(p, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:12]


def fallocate(path, mode, off, length):
    fd = os.open(path, os.O_RDWR)
    try:
        if libc.fallocate(fd, ctypes.c_int(mode), ctypes.c_long(off), ctypes.c_long(length)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def segments(path):
    """Data segments as SEEK_DATA/SEEK_HOLE see them."""
    fd = os.open(path, os.O_RDONLY)
    segs, off, size = [], 0, os.fstat(fd).st_size
    try:
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            h = os.lseek(fd, d, os.SEEK_HOLE)
            segs.append((d, h))
            off = h
        try:
            os.lseek(fd, size + 1, os.SEEK_DATA)
        except OSError as e:
            segs.append(errno.errorcode[e.errno])
    finally:
        os.close(fd)
    return segs


# --- create / open flags ---
attempt("create", lambda: os.close(os.open("a", os.O_CREAT | os.O_WRONLY, 0o640)))
attempt("create-excl-again", lambda: os.open("a", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640))
attempt("stat-a", lambda: st("a"))
with open("a", "wb") as f:
    f.write(b"hello world\n" * 1000)
attempt("digest-a", lambda: digest("a"))
fd = os.open("a", os.O_WRONLY | os.O_APPEND)
os.write(fd, b"tail")
os.close(fd)
attempt("append-size", lambda: os.stat("a").st_size)
fd = os.open("a", os.O_RDWR | os.O_TRUNC)
os.write(fd, b"short")
os.close(fd)
attempt("trunc-open", lambda: (os.stat("a").st_size, digest("a")))
attempt("open-missing", lambda: os.open("missing", os.O_RDONLY))
attempt("open-dir-for-write", lambda: os.open(".", os.O_WRONLY))
attempt("pread-pwrite", lambda: (os.pwrite(os.open("a", os.O_RDWR), b"XY", 1), os.pread(os.open("a", os.O_RDONLY), 5, 0)))

# --- O_DIRECT ---
def direct():
    fd = os.open("direct", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
    buf = ctypes.create_string_buffer(8192 + 4096)
    addr = (ctypes.addressof(buf) + 4095) & ~4095
    mv = (ctypes.c_char * 8192).from_address(addr)
    ctypes.memset(addr, 0x5A, 8192)
    n = os.pwritev(fd, [memoryview(mv)], 4096)
    os.close(fd)
    return n, digest("direct"), os.stat("direct").st_size
attempt("o_direct", direct)

# --- metadata ---
attempt("chmod", lambda: (os.chmod("a", 0o600), st("a"))[1])
attempt("utime-set", lambda: (os.utime("a", ns=(1_000_000_123, 2_000_000_456)), os.stat("a").st_mtime_ns, os.stat("a").st_atime_ns)[1:])
def omit():
    # UTIME_OMIT on atime, explicit mtime (utimensat with UTIME_OMIT)
    class TS(ctypes.Structure):
        _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
    times = (TS * 2)(TS(0, (1 << 30) - 2), TS(3_000_000, 7))
    if libc.utimensat(-100, b"a", times, 0) != 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    s = os.stat("a")
    return s.st_atime_ns, s.st_mtime_ns
attempt("utime-omit", omit)
def now():
    class TS(ctypes.Structure):
        _fields_ = [("s", ctypes.c_long), ("ns", ctypes.c_long)]
    times = (TS * 2)(TS(0, (1 << 30) - 1), TS(0, (1 << 30) - 1))
    if libc.utimensat(-100, b"a", times, 0) != 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
    import time
    return abs(os.stat("a").st_mtime - time.time()) < 5
attempt("utime-now", now)
attempt("truncate-grow", lambda: (os.truncate("a", 100000), os.stat("a").st_size)[1])
attempt("truncate-shrink", lambda: (os.truncate("a", 3), digest("a"))[1])
attempt("chown-self", lambda: os.chown("a", os.getuid(), os.getgid()))
attempt("chown-other", lambda: os.chown("a", 12345, 12345) if os.getuid() != 0 else os.chown("a", 0, 0))
attempt("access-rw", lambda: os.access("a", os.R_OK | os.W_OK))
attempt("access-x", lambda: os.access("a", os.X_OK))

# --- directories ---
attempt("mkdir", lambda: os.mkdir("d", 0o750))
attempt("mkdir-again", lambda: os.mkdir("d"))
attempt("stat-d", lambda: st("d"))
attempt("create-in-d", lambda: open("d/f", "w").write("x"))
attempt("rmdir-nonempty", lambda: os.rmdir("d"))
attempt("unlink-dir", lambda: os.unlink("d"))
attempt("rmdir-file", lambda: os.rmdir("a"))
attempt("listdir", lambda: sorted(os.listdir(".")))
attempt("listdir-d", lambda: sorted(os.listdir("d")))
def many():
    os.mkdir("many")
    for i in range(300):
        open(f"many/file-{i:04d}", "w").close()
    names = sorted(os.listdir("many"))
    return len(names), names[0], names[-1]
attempt("listdir-300", many)
def listing_with_attrs():
    # readdir followed by stat of every entry (served from READDIRPLUS).
    with os.scandir(".") as it:
        return sorted((e.name, st(e.name)) for e in it)
attempt("scandir-stat", listing_with_attrs)
attempt("fsyncdir", lambda: os.fsync(os.open("d", os.O_RDONLY | os.O_DIRECTORY)))

# --- links ---
attempt("symlink", lambda: os.symlink("a", "sl"))
attempt("readlink", lambda: os.readlink("sl"))
attempt("stat-sl", lambda: st("sl"))
attempt("stat-through-sl", lambda: st("sl", follow=True))
attempt("symlink-dangling", lambda: (os.symlink("nowhere", "dangle"), os.path.exists("dangle"))[1])
attempt("link", lambda: os.link("a", "hl"))
attempt("link-exists", lambda: os.link("a", "hl"))
attempt("link-inode-shared", lambda: (os.stat("a").st_ino == os.stat("hl").st_ino, os.stat("a").st_nlink))
attempt("mkfifo", lambda: (os.mkfifo("fifo", 0o644), st("fifo"))[1])
attempt("mknod-reg", lambda: (os.mknod("node", 0o644 | stat.S_IFREG), st("node"))[1])

# --- rename ---
open("r1", "w").write("one")
open("r2", "w").write("two")
attempt("rename", lambda: os.rename("r1", "r3"))
attempt("rename-missing", lambda: os.rename("r1", "r4"))
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
def renameat2(a, b, flags):
    if libc.renameat2(-100, a.encode(), -100, b.encode(), flags) != 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
attempt("rename-noreplace-exists", lambda: renameat2("r3", "r2", RENAME_NOREPLACE))
attempt("rename-noreplace", lambda: renameat2("r3", "r5", RENAME_NOREPLACE))
attempt("rename-exchange", lambda: (renameat2("r5", "r2", RENAME_EXCHANGE), open("r2").read(), open("r5").read())[1:])
attempt("rename-over", lambda: (os.rename("r5", "r2"), open("r2").read(), os.path.exists("r5"))[1:])
attempt("rename-dir-over-file", lambda: os.rename("d", "r2"))
attempt("rename-into-own-child", lambda: os.rename("d", "d/sub"))

# --- unlink ---
attempt("unlink", lambda: os.unlink("r2"))
attempt("unlink-missing", lambda: os.unlink("r2"))
attempt("stat-unlinked", lambda: os.stat("r2"))

# --- xattrs ---
attempt("setxattr-user", lambda: os.setxattr("a", "user.k", b"v1"))
attempt("getxattr-user", lambda: os.getxattr("a", "user.k"))
attempt("getxattr-missing", lambda: os.getxattr("a", "user.none"))
attempt("setxattr-create-exists", lambda: os.setxattr("a", "user.k", b"v2", os.XATTR_CREATE))
attempt("setxattr-replace-missing", lambda: os.setxattr("a", "user.none", b"v2", os.XATTR_REPLACE))
attempt("setxattr-trusted", lambda: os.setxattr("a", "trusted.libvirt.security.dac", b"+107:+107"))
attempt("getxattr-trusted", lambda: os.getxattr("a", "trusted.libvirt.security.dac"))
attempt("listxattr", lambda: sorted(x for x in os.listxattr("a") if not x.startswith("security.")))
attempt("removexattr", lambda: os.removexattr("a", "user.k"))
attempt("removexattr-missing", lambda: os.removexattr("a", "user.k"))
attempt("big-xattr", lambda: (os.setxattr("a", "user.big", b"z" * 3000), len(os.getxattr("a", "user.big")))[1])

# --- sparse files, fallocate, lseek ---
def sparse():
    fd = os.open("sparse", os.O_CREAT | os.O_RDWR, 0o644)
    os.ftruncate(fd, 64 << 20)
    os.pwrite(fd, b"D" * 8192, 8 << 20)
    os.pwrite(fd, b"E" * 4096, 40 << 20)
    os.fsync(fd)
    os.close(fd)
    return segments("sparse")
attempt("sparse-segments", sparse)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 0x10
attempt("fallocate-keep-size", lambda: (fallocate("sparse", FALLOC_FL_KEEP_SIZE, 64 << 20, 1 << 20), os.stat("sparse").st_size)[1])
attempt("fallocate-punch", lambda: (fallocate("sparse", FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8 << 20, 4096), segments("sparse"))[1])
attempt("fallocate-zero-range", lambda: (fallocate("sparse", FALLOC_FL_ZERO_RANGE, 40 << 20, 4096), digest("sparse"))[1])
attempt("fallocate-grow", lambda: (fallocate("sparse", 0, 0, 70 << 20), os.stat("sparse").st_size)[1])
attempt("fallocate-bad-mode", lambda: fallocate("sparse", FALLOC_FL_PUNCH_HOLE, 0, 4096))

# --- copy_file_range ---
def cfr():
    a = os.open("sparse", os.O_RDONLY)
    b = os.open("copy", os.O_CREAT | os.O_WRONLY, 0o644)
    n = os.copy_file_range(a, b, 1 << 20, 8 << 20, 0)
    os.close(a); os.close(b)
    return n, digest("copy")
attempt("copy_file_range", cfr)

# --- locks (single process: must not conflict with itself) ---
def locks():
    fd = os.open("a", os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    fcntl.lockf(fd, fcntl.LOCK_UN, 10, 0)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
attempt("locks-self", locks)

# --- statfs ---
attempt("statvfs", lambda: (lambda s: (s.f_bsize, s.f_frsize, s.f_blocks, s.f_namemax))(os.statvfs(".")))

# --- mmap ---
def mm():
    import mmap
    with open("a", "r+b") as f:
        m = mmap.mmap(f.fileno(), 0)
        m[0:1] = b"M"
        m.flush()
        m.close()
    return digest("a")
attempt("mmap", mm)

print("\n".join(out))
