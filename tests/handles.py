"""File handles through a filesystem: name_to_handle_at, the caches
dropped, then open_by_handle_at (as xfstests 426/467/477 do).
Usage: handles.py DIR   (prints what it found; the same natively)."""
import ctypes, os, sys

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100


class FH(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint), ("type", ctypes.c_int), ("h", ctypes.c_ubyte * 128)]


def handle(path):
    fh = FH()
    fh.bytes = 128
    mnt = ctypes.c_int()
    if libc.name_to_handle_at(AT_FDCWD, path.encode(), ctypes.byref(fh), ctypes.byref(mnt), 0) != 0:
        raise OSError(ctypes.get_errno(), "name_to_handle_at " + path)
    return fh


def open_by(mfd, fh, flags):
    fd = libc.open_by_handle_at(mfd, ctypes.byref(fh), flags)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "open_by_handle_at")
    return fd


root = sys.argv[1]
d = os.path.join(root, "hd")
os.makedirs(os.path.join(d, "sub"))
with open(os.path.join(d, "sub", "f"), "w") as f:
    f.write("handle-data")
hf, hdir = handle(os.path.join(d, "sub", "f")), handle(os.path.join(d, "sub"))
mfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
os.sync()
with open("/proc/sys/vm/drop_caches", "w") as f:
    f.write("3")
fd = open_by(mfd, hf, os.O_RDONLY)
print("file:", os.read(fd, 100).decode())
os.close(fd)
fd = open_by(mfd, hdir, os.O_RDONLY | os.O_DIRECTORY)
print("dir:", sorted(os.listdir(fd)))
print("parent:", os.stat("..", dir_fd=fd).st_ino == os.stat(d).st_ino)
os.close(fd)
