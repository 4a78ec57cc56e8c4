#!/usr/bin/env python3
"""Compare the two layouts in a few seconds (not a test; root; short loops).

  instances layout: baseguard over the whole instances directory
  _base layout:     baseguard over _base alone, instance disks in the parent

For each, with native ext4 as the reference, it times (median per operation):
  - a protected unlink in _base (quarantine: record written and fsynced, rename),
  - a first lookup (stat of a name not yet in the kernel's cache) in _base,
  - a first lookup of a file in an instance directory,
  - open + fstat + close of an instance disk,
  - 4 KiB preads of an instance disk (warm page cache),
  - a 256 MiB base image read whole in 1 MiB blocks, cold and warm.

Each layout also runs with --no-passthrough (what a kernel before 6.9 gives).

Usage: benches/layouts.py [--baseguard target/release/baseguard] [-n 200]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

UUID = "6f1c2a8e-3b9d-4c4e-9a52-0c1d2e3f4a5b"


def mounted(mp):
    with open("/proc/self/mountinfo") as f:
        return any(l.split(" ")[4] == mp and " - fuse.baseguard " in l for l in f)


def mount(binary, backing, mp, extra):
    p = subprocess.Popen(
        [binary, "mount", "--foreground", *extra, backing, mp],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t = time.time()
    while not mounted(mp):
        if p.poll() is not None or time.time() - t > 15:
            raise SystemExit(f"mount of {mp} failed")
        time.sleep(0.02)
    return p


def unmount(p, mp):
    subprocess.run(["umount", mp], check=False)
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()


def each(n, f):
    out = []
    for i in range(n):
        t = time.perf_counter_ns()
        f(i)
        out.append(time.perf_counter_ns() - t)
    return statistics.median(out) / 1000.0


def workload(inst, n):
    """inst: the instances directory as Nova sees it."""
    base = os.path.join(inst, "_base")
    d = os.path.join(inst, UUID)
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        with open(os.path.join(base, f"u{i}"), "wb") as f:
            f.write(b"x" * 4096)
        open(os.path.join(base, f"l{i}"), "wb").close()
        open(os.path.join(d, f"l{i}"), "wb").close()
    with open(os.path.join(base, "image"), "wb") as f:
        for _ in range(BASE_IMAGE >> 20):
            f.write(os.urandom(1 << 20))
    disk = os.path.join(d, "disk")
    with open(disk, "wb") as f:
        f.write(os.urandom(64 << 20))
    time.sleep(1.2)  # let the kernel's 1 s name cache expire
    r = {}
    r["protected unlink in _base"] = each(n, lambda i: os.remove(os.path.join(base, f"u{i}")))
    r["first lookup in _base"] = each(n, lambda i: os.stat(os.path.join(base, f"l{i}")))
    r["first lookup in an instance dir"] = each(n, lambda i: os.stat(os.path.join(d, f"l{i}")))

    def ofc(_):
        fd = os.open(disk, os.O_RDWR)
        os.fstat(fd)
        os.close(fd)

    r["open+fstat+close of a disk"] = each(n, ofc)
    fd = os.open(disk, os.O_RDONLY)
    blocks = (64 << 20) // 4096
    for off in range(0, 64 << 20, 1 << 20):
        os.pread(fd, 1 << 20, off)
    r["4 KiB pread of a disk (warm)"] = each(
        n * 20, lambda i: os.pread(fd, 4096, ((i * 7919) % blocks) * 4096)
    )
    os.close(fd)
    # A base image read whole in 1 MiB blocks (as qemu-img convert or a
    # booting VM reads it), caches dropped, then again: per MiB.
    img = os.path.join(base, "image")
    r["1 MiB of a base image, read cold"] = read_whole(img, drop=True)
    r["1 MiB of a base image, read warm"] = min(read_whole(img, drop=False) for _ in range(3))
    return r


BASE_IMAGE = 256 << 20


def read_whole(path, drop):
    """Microseconds per MiB to read `path` sequentially in 1 MiB blocks."""
    if drop:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    fd = os.open(path, os.O_RDONLY)
    t = time.perf_counter_ns()
    n = 0
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        n += len(b)
    dt = time.perf_counter_ns() - t
    os.close(fd)
    return dt / 1000.0 / max(1, n >> 20)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseguard", default="target/release/baseguard")
    ap.add_argument("-n", type=int, default=200)
    a = ap.parse_args()
    binary = os.path.abspath(a.baseguard)
    cols = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as t:

        def fresh(name):
            inst = os.path.join(t, name)
            os.makedirs(os.path.join(inst, "_base"))
            return inst

        inst = fresh("native")
        cols["native"] = workload(inst, a.n)
        # baseguard over the instances directory (over itself).
        for name, extra in [("instances layout", []), ("instances, no passthrough", ["--no-passthrough"])]:
            inst = fresh(name.replace(" ", "_").replace(",", ""))
            p = mount(binary, inst, inst, extra)
            try:
                cols[name] = workload(inst, a.n)
            finally:
                unmount(p, inst)
        # baseguard over _base alone (over itself).
        for name, extra in [("_base layout", []), ("_base, no passthrough", ["--no-passthrough"])]:
            inst = fresh(name.replace(" ", "_").replace(",", ""))
            base = os.path.join(inst, "_base")
            p = mount(binary, base, base, extra)
            try:
                cols[name] = workload(inst, a.n)
            finally:
                unmount(p, base)
    names = list(cols)
    print("| median per operation (µs) | " + " | ".join(names) + " |")
    print("|---|" + "--:|" * len(names))
    for row in cols["native"]:
        print(f"| {row} | " + " | ".join(f"{cols[c][row]:.1f}" for c in names) + " |")


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root")
    main()
