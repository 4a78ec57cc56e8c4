#!/usr/bin/env python3
"""baseguard benchmark harness: FUSE mount vs. the backing directory, alternately.

Runs every workload on the native backing directory and on each FUSE mount
(baseguard, plus optional peers such as bindfs), alternating sides within each
round, for several rounds, and prints a Markdown table of medians and the ratio
to native (higher is better everywhere; 1.00 = native).

Standard library only.  Must run as root (drop_caches, mounts).  See
benches/README.md for the workloads and how to reproduce.  It is a benchmark:
never run it in CI or as a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = time.monotonic()

# Nova names cached images after a SHA-1; mimic that under _base/.
BASE_NAME = "0f3c1b1c2d9e4a7e8c1b5d6f7a8b9c0d1e2f3a4b"
INSTANCE = "inst-0001"

# tool -> Debian package
TOOL_PACKAGES = {
    "fio": "fio",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "umount": "mount",
    "fusermount3": "fuse3",
    "bindfs": "bindfs",
    "sshfs": "sshfs",
}

# --peer shortcuts: NAME alone expands to this template.
PEER_SHORTCUTS = {
    "bindfs": "bindfs -f {backing} {mnt}",
    # libfuse's example with kernel passthrough (>= 3.17), and the same over
    # FUSE-over-io_uring (>= 3.18; the driver turns enable_uring on for the
    # run). `--passthrough-hp PATH` names the binary (else $PATH).
    "passthrough_hp": "{passthrough_hp} --foreground {backing} {mnt}",
    "passthrough_hp-uring": "{passthrough_hp} --foreground -o io_uring {backing} {mnt}",
}

ENABLE_URING = "/sys/module/fuse/parameters/enable_uring"

DEFAULT_BASEGUARD_TEMPLATE = "{baseguard} mount {bg_opts} {backing} {mnt}"


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def die(msg: str, code: int = 2) -> None:
    print(f"baseguard-bench: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = {"k": KIB, "m": MIB, "g": GIB, "t": 1 << 40}
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(t)


def fmt_size(n: float) -> str:
    for unit, div in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n:.0f} B"


# --------------------------------------------------------------------------
# child program: the metadata workloads run in a separate python process that
# times itself, so interpreter start-up (and its cold page faults) is excluded
# and the same code runs on every side.
CHILD = r"""
import json, os, sys, time
mode, root, n, per_dir = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ndirs = (n + per_dir - 1) // per_dir
def path(i):
    return os.path.join(root, "d%04d" % (i // per_dir), "f%06d" % i)
out = {"n": n}
if mode == "walkstat":          # readdir + stat of every entry
    t = time.perf_counter(); k = 0
    for d in sorted(os.listdir(root)):
        p = os.path.join(root, d)
        for f in os.listdir(p):
            os.stat(os.path.join(p, f)); k += 1
    out["seconds"] = time.perf_counter() - t; out["n"] = k
elif mode == "statnames":       # lookup + getattr by name, no readdir
    paths = [path(i) for i in range(n)]
    t = time.perf_counter()
    for p in paths:
        os.stat(p)
    out["seconds"] = time.perf_counter() - t
elif mode == "create":          # mkdir the dirs, create empty files
    paths = [path(i) for i in range(n)]
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    t = time.perf_counter()
    os.makedirs(root, exist_ok=True)
    for d in range(ndirs):
        os.mkdir(os.path.join(root, "d%04d" % d))
    for p in paths:
        os.close(os.open(p, flags, 0o644))
    out["seconds"] = time.perf_counter() - t
elif mode == "unlink":
    paths = [path(i) for i in range(n)]
    t = time.perf_counter()
    for p in paths:
        os.unlink(p)
    out["seconds"] = time.perf_counter() - t
elif mode == "unlinklat":       # per-file latency in ns
    paths = [path(i) for i in range(n)]
    lat = []
    pc = time.perf_counter_ns
    for p in paths:
        t = pc(); os.unlink(p); lat.append(pc() - t)
    out["lat_ns"] = lat; out["seconds"] = sum(lat) / 1e9
elif mode == "listdir":          # one listing of a flat directory, names only
    t = time.perf_counter()
    out["n"] = len(os.listdir(root))
    out["seconds"] = time.perf_counter() - t
elif mode == "listdir-warm":     # the same, after one listing not timed
    os.listdir(root)
    t = time.perf_counter()
    out["n"] = len(os.listdir(root))
    out["seconds"] = time.perf_counter() - t
elif mode == "createflat":       # n empty files in root itself
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        os.close(os.open(os.path.join(root, "f%06d" % i), os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))
    out["seconds"] = 0.0
else:
    raise SystemExit("unknown mode " + mode)
print(json.dumps(out))
"""


def run_child(mode: str, root: str, n: int, per_dir: int, timeout: float = 1800) -> dict:
    cp = subprocess.run(
        [sys.executable, "-c", CHILD, mode, root, str(n), str(per_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if cp.returncode != 0:
        raise RuntimeError(f"child {mode} {root}: rc={cp.returncode}: {cp.stderr.strip()[-400:]}")
    return json.loads(cp.stdout)


# --------------------------------------------------------------------------
# system helpers


def unescape_mountinfo(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1 : i + 4].isdigit():
            out.append(chr(int(s[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mount_table() -> list[tuple[str, str]]:
    """(mountpoint, fstype) for every mount, in mount order."""
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            lf, rf = left.split(), right.split()
            if len(lf) >= 5 and rf:
                rows.append((unescape_mountinfo(lf[4]), rf[0]))
    return rows


def fstype_at(path: str) -> str | None:
    path = os.path.realpath(path)
    found = None
    for mp, fstype in mount_table():
        if mp == path:
            found = fstype
    return found


def fs_of(path: str) -> str:
    """fstype of the filesystem containing path (longest mountpoint prefix)."""
    path = os.path.realpath(path)
    best, fstype = "", "?"
    for mp, t in mount_table():
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
            best, fstype = mp, t
    return fstype


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    return (vals[7] if len(vals) > 7 else 0), sum(vals[:8])


def proc_children(pid: int) -> list[int]:
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def proc_cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()
    # fields[0] is state (field 3); utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def write_file(path: str, size: int, seed: int = 1) -> None:
    """Write a file of `size` bytes of non-zero pseudo-random data, fsync."""
    rng = random.Random(seed)
    buf = bytearray(rng.randbytes(MIB))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        while off < size:
            n = min(MIB, size - off)
            buf[0:8] = off.to_bytes(8, "little")
            os.write(fd, buf[:n])
            off += n
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(4 * MIB):
            pass


def tool_version(cmd: list[str]) -> str:
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (cp.stdout or cp.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def ensure_tools(tools: list[str], no_install: bool) -> None:
    missing = [t for t in dict.fromkeys(tools) if shutil.which(t) is None]
    if not missing:
        return
    unknown = [t for t in missing if t not in TOOL_PACKAGES]
    if unknown:
        die(f"missing commands with no known Debian package: {' '.join(unknown)}")
    pkgs = sorted({TOOL_PACKAGES[t] for t in missing})
    line = "apt-get install -y " + " ".join(pkgs)
    if no_install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        die(f"missing {' '.join(missing)}; install with:\n    {line}")
    log(f"installing missing tools: {line}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *pkgs]
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env)
        if subprocess.run(cmd, env=env).returncode != 0:
            die(f"could not install {' '.join(pkgs)}; run:\n    apt-get update && {line}")
    still = [t for t in missing if shutil.which(t) is None]
    if still:
        die(f"still missing after install: {' '.join(still)}")


# --------------------------------------------------------------------------
# sides: native directory and FUSE mounts


@dataclass
class Side:
    name: str
    root: str  # where the workloads run
    backing: str  # the directory on ext4 that holds the same files
    template: list[str] | None = None  # None for native
    mnt: str | None = None
    stats: str | None = None  # --stats-file path, if the daemon writes one
    is_baseguard: bool = False  # real baseguard: quarantine/restore apply
    standin: bool = False
    expect_fstype: str | None = None  # exact fstype, or None for any fuse*
    proc: subprocess.Popen | None = None
    pid: int | None = None
    log_path: str | None = None
    dead: str | None = None
    unmounted: bool = False
    nofile: int | None = None  # RLIMIT_NOFILE for the daemon
    notes: list[str] = field(default_factory=list)
    state: dict = field(default_factory=dict)

    @property
    def native(self) -> bool:
        return self.template is None

    def path(self, *rel: str) -> str:
        return os.path.join(self.root, *rel)

    def bpath(self, *rel: str) -> str:
        return os.path.join(self.backing, *rel)

    def alive(self) -> bool:
        if self.native:
            return True
        if self.dead:
            return False
        if self.proc is not None and self.proc.poll() is not None:
            self.dead = f"daemon exited with rc={self.proc.returncode}"
            return False
        if not self.mounted():
            self.dead = "mount disappeared"
            return False
        return True

    def mounted(self) -> bool:
        t = fstype_at(self.mnt) if self.mnt else None
        if t is None:
            return False
        return t == self.expect_fstype if self.expect_fstype else t.startswith("fuse")

    def mount(self, timeout: float) -> None:
        assert self.mnt and self.template
        os.makedirs(self.mnt, exist_ok=True)
        if fstype_at(self.mnt):
            raise RuntimeError(f"{self.mnt} is already a mountpoint")
        subst = {"{backing}": self.backing, "{mnt}": self.mnt, "{stats}": self.stats or ""}
        argv = []
        for a in self.template:
            for k, v in subst.items():
                a = a.replace(k, v)
            argv.append(a)
        log(f"mount {self.name}: {shlex.join(argv)}")
        logf = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the daemon
        nofile = self.nofile

        def limits() -> None:
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            preexec_fn=limits if nofile else None,
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.mounted():
                break
            rc = self.proc.poll()
            if rc is not None and rc != 0:
                raise RuntimeError(f"{self.name} exited rc={rc} before mounting:\n{self.log_tail()}")
            time.sleep(0.05)
        else:
            t = fstype_at(self.mnt)
            raise RuntimeError(
                f"{self.name}: {self.mnt} not mounted as "
                f"{self.expect_fstype or 'fuse*'} within {timeout:.0f}s (found {t}):\n{self.log_tail()}"
            )
        if self.proc.poll() is None:
            self.pid = self.proc.pid
        else:
            self.notes.append("daemonized (not foreground): no CPU/RSS/stats figures")
        log(f"mounted {self.name} ({fstype_at(self.mnt)}) pid={self.pid}")

    def log_tail(self, n: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except (OSError, TypeError):
            return ""

    def unmount(self) -> None:
        if self.native or self.mnt is None or (self.unmounted and fstype_at(self.mnt) is None):
            return
        self.unmounted = True
        if self.mounted() or fstype_at(self.mnt):
            subprocess.run(["umount", self.mnt], capture_output=True)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        for cmd in (["umount", "-l", self.mnt], ["fusermount3", "-u", "-z", self.mnt]):
            if fstype_at(self.mnt) is None:
                break
            subprocess.run(cmd, capture_output=True)
        if fstype_at(self.mnt) is not None:
            log(f"WARNING: {self.mnt} is still mounted")
        elif self.proc is not None:
            log(f"unmounted {self.name} (daemon rc={self.proc.returncode})")

    def stats_snapshot(self) -> dict | None:
        """SIGUSR1 the daemon and read the stats file it rewrites."""
        if not self.stats or not self.pid or not self.alive():
            return None
        try:
            os.unlink(self.stats)
        except FileNotFoundError:
            pass
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                with open(self.stats) as f:
                    return json.load(f)
            except (FileNotFoundError, ValueError):
                time.sleep(0.005)
        self.notes.append("stats file not written within 3 s of SIGUSR1; stats disabled")
        self.stats = None
        return None


def stats_diff(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return None
    out = {}
    for k, v in b.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            d = v - (a.get(k) or 0)
            if d:
                out[k] = d
    return out


# --------------------------------------------------------------------------
# workloads


@dataclass
class Result:
    value: float
    extra: dict = field(default_factory=dict)


class Workload:
    key = ""
    label = ""
    unit = ""
    higher_better = True
    cold = False

    def __init__(self, cfg: argparse.Namespace):
        self.cfg = cfg

    def prepare(self, side: Side) -> None:
        pass

    def pre(self, side: Side) -> None:
        pass

    def measure(self, side: Side) -> Result:
        raise NotImplementedError

    def post(self, side: Side) -> None:
        pass


def run_fio(cfg: argparse.Namespace, filename: str, *opts: str, time_based: bool = True) -> dict:
    cmd = [
        "fio",
        "--output-format=json",
        "--name=bench",
        f"--filename={filename}",
        "--invalidate=0",  # fio would otherwise drop the page cache: we want "warm"
        "--randrepeat=1",
        "--numjobs=1",
        *opts,
    ]
    if time_based:
        cmd += ["--time_based", f"--runtime={cfg.runtime}"]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=cfg.runtime + 600)
    try:
        # fio may print warnings before the JSON
        out = json.loads(cp.stdout[cp.stdout.index("{") :])
    except ValueError as e:
        raise RuntimeError(f"fio rc={cp.returncode}: {cp.stderr.strip()[-400:]}") from e
    job = out["jobs"][0]
    if cp.returncode != 0 or job.get("error"):
        raise RuntimeError(f"fio rc={cp.returncode} error={job.get('error')}: {cp.stderr.strip()[-400:]}")
    return job


def fio_extra(job: dict) -> dict:
    r, w = job["read"], job["write"]
    lat = job["read" if r["io_bytes"] else "write"].get("clat_ns", {})
    return {
        "io_bytes": r["io_bytes"] + w["io_bytes"],
        "read_iops": r["iops"],
        "write_iops": w["iops"],
        "read_bw_bytes": r["bw_bytes"],
        "write_bw_bytes": w["bw_bytes"],
        "runtime_ms": max(r["runtime"], w["runtime"]),
        "clat_mean_ns": lat.get("mean"),
        "clat_p99_ns": (lat.get("percentile") or {}).get("99.000000"),
        "usr_cpu": job.get("usr_cpu"),
        "sys_cpu": job.get("sys_cpu"),
    }


class SeqRead(Workload):
    key = "seqread"
    label = "Sequential read 1 MiB, buffered, warm"
    unit = "MiB/s"

    def prepare(self, side: Side) -> None:
        if not os.path.exists(side.bpath("bench-data", "seq.dat")):
            os.makedirs(side.bpath("bench-data"), exist_ok=True)
            write_file(side.bpath("bench-data", "seq.dat"), self.cfg.seq_size, seed=1)

    def pre(self, side: Side) -> None:
        read_file(side.path("bench-data", "seq.dat"))  # warm it through this side

    def measure(self, side: Side) -> Result:
        job = run_fio(
            self.cfg,
            side.path("bench-data", "seq.dat"),
            "--rw=read",
            "--bs=1M",
            "--ioengine=psync",
            f"--size={self.cfg.seq_size}",
        )
        return Result(job["read"]["bw_bytes"] / MIB, fio_extra(job))


class RandRead(SeqRead):
    key = "randread"
    label = "4 KiB random read, psync, warm"
    unit = "IOPS"

    def measure(self, side: Side) -> Result:
        job = run_fio(
            self.cfg,
            side.path("bench-data", "seq.dat"),
            "--rw=randread",
            "--bs=4k",
            "--ioengine=psync",
            f"--size={self.cfg.seq_size}",
        )
        return Result(job["read"]["iops"], fio_extra(job))


class RandWrite(Workload):
    key = "randwrite"
    label = "4 KiB random write, buffered, file cached"
    unit = "IOPS"
    warm = True
    opts = ("--ioengine=psync",)

    def prepare(self, side: Side) -> None:
        if not os.path.exists(side.bpath("bench-data", "rw.dat")):
            os.makedirs(side.bpath("bench-data"), exist_ok=True)
            write_file(side.bpath("bench-data", "rw.dat"), self.cfg.rand_size, seed=2)

    def pre(self, side: Side) -> None:
        if self.warm:  # same page-cache state on every side and round
            read_file(side.path("bench-data", "rw.dat"))

    def measure(self, side: Side) -> Result:
        job = run_fio(
            self.cfg,
            side.path("bench-data", "rw.dat"),
            "--rw=randwrite",
            "--bs=4k",
            f"--size={self.cfg.rand_size}",
            *self.opts,
        )
        return Result(job["write"]["iops"], fio_extra(job))

    def post(self, side: Side) -> None:
        os.sync()  # don't leave dirty pages to the next workload


class RandWriteDirect(RandWrite):
    key = "randwrite-direct"
    label = "4 KiB random write, O_DIRECT, libaio QD16"
    opts = ("--ioengine=libaio", "--direct=1", "--iodepth=16")
    warm = False


class SeqWriteFsync(Workload):
    key = "seqwrite"
    label = "Sequential write 1 MiB + fsync (end_fsync=1)"
    unit = "MiB/s"

    def _path(self, side: Side) -> str:
        return side.path("bench-data", "seqw.dat")

    def prepare(self, side: Side) -> None:
        os.makedirs(side.bpath("bench-data"), exist_ok=True)

    def pre(self, side: Side) -> None:
        if os.path.exists(self._path(side)):
            os.unlink(self._path(side))

    def measure(self, side: Side) -> Result:
        job = run_fio(
            self.cfg,
            self._path(side),
            "--rw=write",
            "--bs=1M",
            "--ioengine=psync",
            "--end_fsync=1",
            f"--size={self.cfg.seqwrite_size}",
            time_based=False,
        )
        # fio's runtime (and so bw) includes the final fsync
        return Result(job["write"]["bw_bytes"] / MIB, fio_extra(job))

    post = pre


def make_qemu_images(side: Side, cfg: argparse.Namespace) -> None:
    """_base/<sha1> sparse raw with scattered data, <instance>/disk qcow2 overlay."""
    base = side.bpath("_base", BASE_NAME)
    if os.path.exists(side.bpath(INSTANCE, "disk")):
        return
    os.makedirs(side.bpath("_base"), exist_ok=True)
    os.makedirs(side.bpath(INSTANCE), exist_ok=True)
    virt, data = cfg.qemu_virtual, cfg.qemu_data
    slots, nchunks = virt // MIB, min(data // MIB, virt // MIB)
    rng = random.Random(42)
    chosen = sorted(rng.sample(range(slots), nchunks))
    buf = bytearray(rng.randbytes(MIB))
    fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, virt)
        for s in chosen:
            buf[0:8] = s.to_bytes(8, "little")
            os.pwrite(fd, buf, s * MIB)
        os.fsync(fd)
    finally:
        os.close(fd)
    disk = side.bpath(INSTANCE, "disk")
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", f"../_base/{BASE_NAME}", disk],
        check=True,
        cwd=side.bpath(INSTANCE),
    )
    # a little guest-written data in the overlay too, like a real instance disk
    if shutil.which("qemu-io"):
        cmds = []
        for i in range(8):
            off = (rng.randrange(slots) * MIB) // MIB * MIB
            cmds += ["-c", f"write -P {0x40 + i} {off} {min(2 * MIB, virt - off)}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, disk], check=True, capture_output=True)
    os.sync()


def supports_odirect(directory: str) -> bool:
    p = os.path.join(directory, ".odirect-probe")
    try:
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | getattr(os, "O_DIRECT", 0), 0o644)
        os.close(fd)
        return True
    except OSError:
        return False
    finally:
        try:
            os.unlink(p)
        except OSError:
            pass


def seek_data_works(path: str) -> bool:
    """qemu-img skips holes only if lseek(SEEK_DATA) finds them (the base starts with a hole)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) > 0
    except OSError:
        return False
    finally:
        os.close(fd)


class ConvertCold(Workload):
    key = "convert-cold"
    label = "qemu-img convert qcow2 overlay + sparse raw base, cold"
    unit = "s"
    higher_better = False
    cold = True

    def prepare(self, side: Side) -> None:
        make_qemu_images(side, self.cfg)
        mode = self.cfg.convert_cache
        if mode == "auto":  # what Nova does: O_DIRECT if the destination supports it
            mode = "none" if supports_odirect(side.path(INSTANCE)) else "writeback"
        side.state["convert_cache"] = mode
        side.state["seek_data"] = seek_data_works(side.path("_base", BASE_NAME))

    def _out(self, side: Side) -> str:
        return side.path(INSTANCE, f"converted.{self.cfg.convert_format}")

    def pre(self, side: Side) -> None:
        if os.path.exists(self._out(side)):
            os.unlink(self._out(side))
        if not self.cold:
            read_file(side.path("_base", BASE_NAME))
            read_file(side.path(INSTANCE, "disk"))

    def measure(self, side: Side) -> Result:
        cmd = [
            "qemu-img",
            "convert",
            "-t",
            side.state["convert_cache"],
            "-f",
            "qcow2",
            "-O",
            self.cfg.convert_format,
            side.path(INSTANCE, "disk"),
            self._out(side),
        ]
        t = time.perf_counter()
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        dt = time.perf_counter() - t
        if cp.returncode != 0:
            raise RuntimeError(f"qemu-img convert rc={cp.returncode}: {cp.stderr.strip()[-400:]}")
        return Result(dt, {"cache_mode": side.state["convert_cache"]})

    def post(self, side: Side) -> None:
        if os.path.exists(self._out(side)):
            os.unlink(self._out(side))


class ConvertWarm(ConvertCold):
    key = "convert-warm"
    label = "qemu-img convert, same, warm cache"
    cold = False


class StatCold(Workload):
    key = "stat-cold"
    unit = "s"
    higher_better = False
    cold = True

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"stat {self.cfg.files:,} files (readdir + stat), cold"

    def prepare(self, side: Side) -> None:
        if not os.path.exists(side.bpath("stat-tree")):
            run_child("create", side.bpath("stat-tree"), self.cfg.files, self.cfg.files_per_dir)

    def measure(self, side: Side) -> Result:
        r = run_child("walkstat", side.path("stat-tree"), self.cfg.files, self.cfg.files_per_dir)
        if r["n"] != self.cfg.files:
            raise RuntimeError(f"stat saw {r['n']} files, expected {self.cfg.files}")
        return Result(r["seconds"], {"ops_per_s": r["n"] / r["seconds"]})


class ReaddirCold(Workload):
    """One listing (names only, as `ls -f`) of a directory of --files entries."""

    key = "readdir-cold"
    unit = "s"
    higher_better = False
    cold = True
    child_mode = "listdir"

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"readdir {self.cfg.files:,} entries, {'cold' if self.cold else 'warm'}"

    def prepare(self, side: Side) -> None:
        if not os.path.exists(side.bpath("flat-tree")):
            run_child("createflat", side.bpath("flat-tree"), self.cfg.files, self.cfg.files)

    def measure(self, side: Side) -> Result:
        r = run_child(self.child_mode, side.path("flat-tree"), self.cfg.files, self.cfg.files)
        if r["n"] != self.cfg.files:
            raise RuntimeError(f"listing saw {r['n']} entries, expected {self.cfg.files}")
        return Result(r["seconds"], {"ops_per_s": r["n"] / r["seconds"]})


class ReaddirWarm(ReaddirCold):
    key = "readdir-warm"
    cold = False
    child_mode = "listdir-warm"


class Create(Workload):
    key = "create"
    unit = "s"
    higher_better = False

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"create {self.cfg.files:,} empty files"

    def _dir(self, side: Side) -> str:
        return side.path("bench-meta", "tree")

    def pre(self, side: Side) -> None:
        if os.path.exists(side.bpath("bench-meta", "tree")):
            shutil.rmtree(side.bpath("bench-meta", "tree"))  # natively: fast, unprotected
        os.makedirs(side.bpath("bench-meta"), exist_ok=True)

    def measure(self, side: Side) -> Result:
        r = run_child("create", self._dir(side), self.cfg.files, self.cfg.files_per_dir)
        side.state["tree_ready"] = True
        return Result(r["seconds"], {"ops_per_s": self.cfg.files / r["seconds"]})

    def post(self, side: Side) -> None:
        os.sync()


class Unlink(Create):
    key = "unlink"

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"unlink {self.cfg.files:,} files (outside _base/)"

    def pre(self, side: Side) -> None:
        if not side.state.pop("tree_ready", False):  # create ran on this side just before
            Create.pre(self, side)
            run_child("create", self._dir(side), self.cfg.files, self.cfg.files_per_dir)
        os.sync()

    def measure(self, side: Side) -> Result:
        r = run_child("unlink", self._dir(side), self.cfg.files, self.cfg.files_per_dir)
        return Result(r["seconds"], {"ops_per_s": self.cfg.files / r["seconds"]})

    def post(self, side: Side) -> None:
        shutil.rmtree(self._dir(side), ignore_errors=True)


WORKLOADS: list[type[Workload]] = [
    SeqRead,
    RandRead,
    RandWrite,
    RandWriteDirect,
    SeqWriteFsync,
    ConvertCold,
    ConvertWarm,
    StatCold,
    ReaddirCold,
    ReaddirWarm,
    Create,
    Unlink,
]


# --------------------------------------------------------------------------
# the run


class Bench:
    def __init__(self, cfg: argparse.Namespace):
        self.cfg = cfg
        self.sides: list[Side] = []
        self.scratch = ""
        self.results: dict[str, dict[str, list]] = {}
        self.stats: dict[str, dict[str, list]] = {}
        self.cpu: dict[str, list] = {}
        self.extras: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        self.workloads = [w(cfg) for w in WORKLOADS if not cfg.only or w.key in cfg.only]
        self.bg_caps: dict[str, bool] = {}
        self.ticks0 = cpu_ticks()
        self.load0 = os.getloadavg()[0]
        self.templates: dict[str, str] = {}

    # ---- setup
    def build_sides(self) -> None:
        cfg = self.cfg
        self.scratch = tempfile.mkdtemp(prefix="baseguard-bench.", dir=cfg.scratch)
        os.makedirs(os.path.join(self.scratch, "native"))
        self.sides.append(Side("native", os.path.join(self.scratch, "native"), os.path.join(self.scratch, "native")))
        specs: list[tuple[str, str, bool]] = []  # (name, template, standin)
        if not cfg.no_baseguard:
            if cfg.baseguard_cmd:
                standin = "{baseguard}" not in cfg.baseguard_cmd
                specs.append(("baseguard[stand-in]" if standin else "baseguard", cfg.baseguard_cmd, standin))
            else:
                specs.append(("baseguard", DEFAULT_BASEGUARD_TEMPLATE, False))
            if cfg.with_no_passthrough and not specs[0][2]:
                specs.append(("baseguard-nopt", "{baseguard} mount --no-passthrough {bg_opts} {backing} {mnt}", False))
            if cfg.with_uring and not specs[0][2]:
                specs.append(("baseguard-uring", "{baseguard} mount -o transport=uring {bg_opts} {backing} {mnt}", False))
        for p in cfg.peer:
            name, sep, tmpl = p.partition("=")
            if not sep:
                if name not in PEER_SHORTCUTS:
                    die(f"--peer {name!r}: give NAME=TEMPLATE (shortcuts: {', '.join(PEER_SHORTCUTS)})")
                tmpl = PEER_SHORTCUTS[name]
            if "{passthrough_hp}" in tmpl:
                if not cfg.passthrough_hp:
                    die(f"--peer {name}: no passthrough_hp (give --passthrough-hp PATH; build libfuse's example/)")
                tmpl = tmpl.replace("{passthrough_hp}", shlex.quote(cfg.passthrough_hp))
            if not name or name in ("native",) or any(s[0] == name for s in specs):
                die(f"--peer {p!r}: bad or duplicate name")
            specs.append((name, tmpl, False))
        for name, tmpl, standin in specs:
            self.templates[name] = tmpl
            uses_bg = "{baseguard}" in tmpl
            if uses_bg:
                self.check_baseguard()
            bg_opts = []
            if uses_bg:
                if self.bg_caps.get("foreground"):
                    bg_opts += ["-f"]  # main's mount detaches by default; we need the daemon's PID
                if cfg.threads:
                    bg_opts += ["--threads", str(cfg.threads)]
                if cfg.no_passthrough and "--no-passthrough" not in tmpl:
                    bg_opts += ["--no-passthrough"]
                if self.bg_caps.get("stats") and "{stats}" not in tmpl:
                    bg_opts += ["--stats-file", "{stats}"]
            argv: list[str] = []
            for tok in shlex.split(tmpl):
                if tok == "{bg_opts}":
                    argv += bg_opts
                elif tok == "{baseguard}":
                    argv.append(cfg.baseguard_bin)
                else:
                    argv.append(tok.replace("{baseguard}", cfg.baseguard_bin or ""))
            backing = os.path.join(self.scratch, f"backing-{name}")
            os.makedirs(backing)
            wants_stats = any("{stats}" in a for a in argv)
            side = Side(
                name=name,
                root=os.path.join(self.scratch, f"mnt-{name}"),
                backing=backing,
                template=argv,
                mnt=os.path.join(self.scratch, f"mnt-{name}"),
                stats=os.path.join(self.scratch, f"stats-{name}.json") if wants_stats else None,
                is_baseguard=uses_bg,
                standin=standin,
                expect_fstype="fuse.baseguard" if uses_bg else None,
                log_path=os.path.join(cfg.out_dir, f"{cfg.stamp}-{name}.log"),
                nofile=cfg.nofile,
            )
            if standin:
                side.notes.append("STAND-IN for baseguard (no quarantine, no stats)")
            self.sides.append(side)
        if len(self.sides) < 2:
            die("nothing to compare against native (no baseguard and no --peer)")

    def check_baseguard(self) -> None:
        if "mount" in self.bg_caps:
            return
        b = self.cfg.baseguard_bin
        if not b or not os.access(b, os.X_OK):
            die(
                "no baseguard binary: build it (`cargo build --release`) and/or pass --baseguard PATH, "
                "or benchmark a stand-in: --baseguard-cmd 'bindfs -f {backing} {mnt}'"
            )

        def helps(*sub: str) -> str | None:
            try:
                cp = subprocess.run([b, *sub, "--help"], capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.SubprocessError):
                return None
            text = cp.stdout + cp.stderr
            return text if cp.returncode == 0 and "usage" in text.lower() else None

        mount_help = helps("mount")
        if mount_help is None:
            die(
                f"`{b} mount --help` does not work: the daemon has not landed in this build. "
                "Use a stand-in: --baseguard-cmd 'bindfs -f {backing} {mnt}' (or BASEGUARD_BENCH_CMD)"
            )
        self.bg_caps["mount"] = True
        self.bg_caps["stats"] = "--stats-file" in mount_help
        self.bg_caps["foreground"] = "--foreground" in mount_help
        self.bg_caps["list"] = helps("list") is not None
        self.bg_caps["restore"] = helps("restore") is not None
        self.bg_version = tool_version([b, "--version"])
        for cap in ("stats", "list", "restore"):
            if not self.bg_caps[cap]:
                self.notes.append(f"baseguard build has no `{cap}` support yet: those rows are skipped")

    def fuse_sides(self) -> list[Side]:
        return [s for s in self.sides if not s.native]

    # ---- phases
    def phase_lookup_rss(self) -> None:
        """Fresh daemons: VmHWM before/after looking up N files (cold)."""
        n = self.cfg.lookup_files
        sides = [s for s in self.fuse_sides() if s.pid]
        if not sides or n <= 0:
            return
        log(f"lookup/RSS phase: stat {n:,} files by name on each mount (fresh daemons)")
        drop_caches()
        for s in [self.sides[0], *sides]:
            ex = self.extras.setdefault(s.name, {})
            before = proc_status_kib(s.pid, "VmHWM") if s.pid else None
            st0 = s.stats_snapshot()
            try:
                r = run_child("statnames", s.path("lookup-tree"), n, self.cfg.files_per_dir)
            except (RuntimeError, subprocess.SubprocessError) as e:
                ex["lookup_error"] = str(e)
                continue
            ex["lookup_seconds"] = r["seconds"]
            if s.pid:
                ex["rss_hwm_before_kib"] = before
                ex["rss_hwm_after_kib"] = proc_status_kib(s.pid, "VmHWM")
                # baseguard's mount process is the supervisor; its child serves.
                for child in proc_children(s.pid):
                    ex["server_rss_hwm_after_kib"] = proc_status_kib(child, "VmHWM")
                ex["rss_after_kib"] = proc_status_kib(s.pid, "VmRSS")
                ex["threads"] = proc_status_kib(s.pid, "Threads")
            d = stats_diff(st0, s.stats_snapshot())
            if d is not None:
                ex["lookup_stats"] = d

    def prepare(self) -> None:
        for w in self.workloads:
            for s in self.sides:
                if not s.alive():
                    continue
                log(f"prepare {w.key} on {s.name}")
                try:
                    w.prepare(s)
                except Exception as e:  # noqa: BLE001 - record and go on
                    s.state.setdefault("prep_failed", {})[w.key] = str(e)
                    log(f"  prepare {w.key} on {s.name} FAILED: {e}")
        modes = {s.name: s.state.get("convert_cache") for s in self.sides if s.state.get("convert_cache")}
        if len(set(modes.values())) > 1:
            self.notes.append(f"qemu-img convert -t cache mode differs between sides: {modes}")

    def run_rounds(self) -> None:
        cfg = self.cfg
        for rnd in range(cfg.rounds):
            k = rnd % len(self.sides)
            order = self.sides[k:] + self.sides[:k]  # rotate who goes first
            log(f"round {rnd + 1}/{cfg.rounds}: order {', '.join(s.name for s in order)}")
            for w in self.workloads:
                for s in order:
                    if not s.alive() or w.key in s.state.get("prep_failed", {}):
                        continue
                    self.run_one(w, s, rnd)

    def run_one(self, w: Workload, s: Side, rnd: int) -> None:
        rec = self.results.setdefault(w.key, {}).setdefault(s.name, [])
        try:
            w.pre(s)
            if w.cold:
                drop_caches()
            else:
                os.sync()
            st0 = s.stats_snapshot()
            cpu0 = proc_cpu_seconds(s.pid) if s.pid else None
            t = time.perf_counter()
            res = w.measure(s)
            wall = time.perf_counter() - t
            cpu1 = proc_cpu_seconds(s.pid) if s.pid else None
            st = stats_diff(st0, s.stats_snapshot()) if st0 is not None else None
            w.post(s)
        except Exception as e:  # noqa: BLE001
            rec.append({"round": rnd, "error": str(e)})
            log(f"  {w.key:16s} {s.name:14s} ERROR: {e}")
            s.alive()
            return
        entry = {"round": rnd, "value": res.value, "wall_s": wall, **res.extra}
        if cpu0 is not None and cpu1 is not None:
            entry["daemon_cpu_s"] = cpu1 - cpu0
        if st is not None:
            entry["daemon_stats"] = st
        rec.append(entry)
        cpu_txt = f"  daemon cpu {entry['daemon_cpu_s']:.2f}s" if "daemon_cpu_s" in entry else ""
        log(f"  {w.key:16s} {s.name:14s} {res.value:12.3f} {w.unit}{cpu_txt}")

    def phase_unlink_latency(self) -> None:
        cfg = self.cfg
        n = cfg.unlink_lat_files
        if n <= 0:
            return
        log(f"unlink latency: {n} files outside _base/ vs {n} under _base/, per side")
        for s in self.sides:
            if not s.alive():
                continue
            ex = self.extras.setdefault(s.name, {})
            try:
                for kind, rel in (("unprotected", ("lat-unprot",)), ("protected", ("_base", "lat-prot"))):
                    d = s.path(*rel)
                    if os.path.exists(s.bpath(*rel)):
                        shutil.rmtree(s.bpath(*rel))
                    run_child("create", d, n, n)  # through the side, so dentries are hot on both
                    os.sync()
                    st0 = s.stats_snapshot()
                    r = run_child("unlinklat", d, n, n)
                    lat = sorted(r["lat_ns"])
                    ex[f"unlink_{kind}_us"] = {
                        "median": statistics.median(lat) / 1e3,
                        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e3,
                        "mean": statistics.fmean(lat) / 1e3,
                        "n": len(lat),
                    }
                    d_st = stats_diff(st0, s.stats_snapshot())
                    if d_st is not None:
                        ex[f"unlink_{kind}_stats"] = d_st
                    # one big file as well: quarantine must be a rename, not a copy
                    big = os.path.join(d, "big.img")
                    write_file(os.path.join(s.bpath(*rel), "big.img"), cfg.big_file, seed=7)
                    os.sync()
                    t = time.perf_counter()
                    os.unlink(big)
                    ex[f"unlink_big_{kind}_ms"] = (time.perf_counter() - t) * 1e3
            except Exception as e:  # noqa: BLE001
                ex["unlink_latency_error"] = str(e)
                log(f"  unlink latency on {s.name} FAILED: {e}")
                continue
            if s.is_baseguard:
                self.check_quarantine(s, n)
            log(
                f"  {s.name:14s} unlink median {ex['unlink_unprotected_us']['median']:.1f} us, "
                f"_base/ {ex['unlink_protected_us']['median']:.1f} us"
            )

    def bg_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([self.cfg.baseguard_bin, *args], capture_output=True, text=True, timeout=timeout)

    def check_quarantine(self, s: Side, n: int) -> None:
        ex = self.extras[s.name]
        qdir = s.bpath(".baseguard")
        ex["quarantine_dir_exists"] = os.path.isdir(qdir)
        if not self.bg_caps.get("list"):
            ex["restore_skip"] = "`baseguard list` not available in this build"
            return
        t = time.perf_counter()
        cp = self.bg_cli("list", "--json", "--dir", s.mnt)
        ex["list_ms"] = (time.perf_counter() - t) * 1e3
        if cp.returncode != 0:
            ex["restore_skip"] = f"`baseguard list` failed rc={cp.returncode}: {cp.stderr.strip()[-300:]}"
            return
        try:
            entries = json.loads(cp.stdout)
            if isinstance(entries, dict):  # {"version": 1, "entries": [...]}
                entries = entries.get("entries", [])
        except ValueError as e:
            ex["restore_skip"] = f"`baseguard list --json` output is not JSON: {e}"
            return
        def orig_path(e: dict) -> str:  # the brief says original_path; main's list prints path
            return str(e.get("original_path", e.get("path", "")))

        mine = [e for e in entries if isinstance(e, dict) and "lat-prot/" in orig_path(e) and "id" in e]
        ex["quarantined_found"] = len(mine)
        ex["quarantined_expected"] = n + 1
        if len(mine) < n + 1:
            self.notes.append(
                f"{s.name}: only {len(mine)} of {n + 1} protected unlinks show up in `baseguard list`"
            )
        if not self.bg_caps.get("restore"):
            ex["restore_skip"] = "`baseguard restore` not available in this build"
            return
        times, bad = [], 0
        for e in mine[: self.cfg.restore_count]:
            t = time.perf_counter()
            cp = self.bg_cli("restore", str(e["id"]), "--dir", s.mnt)
            dt = time.perf_counter() - t
            orig = orig_path(e)
            rel = orig[orig.index("_base/") :] if "_base/" in orig else orig
            if cp.returncode != 0 or not os.path.exists(s.path(rel)):
                bad += 1
                ex["restore_last_error"] = f"rc={cp.returncode} {cp.stderr.strip()[-300:]} ({rel})"
            else:
                times.append(dt * 1e3)
        if times:
            ex["restore_ms"] = {"median": statistics.median(times), "max": max(times), "n": len(times)}
        if bad:
            self.notes.append(f"{s.name}: {bad} restores failed or did not bring the file back")
        # process start-up cost of the CLI, for scale
        t = time.perf_counter()
        self.bg_cli("--version")
        ex["cli_startup_ms"] = (time.perf_counter() - t) * 1e3

    # ---- teardown
    def cleanup(self) -> None:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for s in reversed(self.sides):
                try:
                    s.unmount()
                except Exception as e:  # noqa: BLE001
                    log(f"unmount {s.name}: {e}")
            if self.scratch and os.path.isdir(self.scratch):
                still = [mp for mp, _ in mount_table() if mp.startswith(self.scratch)]
                if still:
                    log(f"NOT removing {self.scratch}: still mounted: {still}")
                elif self.cfg.keep:
                    log(f"kept scratch {self.scratch}")
                else:
                    log(f"removing scratch {self.scratch}")
                    shutil.rmtree(self.scratch, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old)

    def run(self) -> None:
        cfg = self.cfg
        self.build_sides()
        log(f"scratch {self.scratch} on {fs_of(self.scratch)}")
        if cfg.lookup_files > 0:
            log(f"creating {cfg.lookup_files:,} files for the lookup/RSS phase (natively, before mounting)")
            for s in self.fuse_sides():
                run_child("create", s.bpath("lookup-tree"), cfg.lookup_files, cfg.files_per_dir)
            if self.fuse_sides():
                run_child("create", self.sides[0].bpath("lookup-tree"), cfg.lookup_files, cfg.files_per_dir)
        for s in self.fuse_sides():
            try:
                s.mount(cfg.mount_timeout)
            except Exception as e:  # noqa: BLE001
                s.dead = f"mount failed: {e}"
                self.notes.append(f"{s.name}: mount failed: {one_line(str(e))}")
                log(f"mount {s.name} FAILED: {e}")
        if not any(s.alive() for s in self.fuse_sides()):
            die("no FUSE filesystem could be mounted", 1)
        self.phase_lookup_rss()
        self.prepare()
        self.run_rounds()
        self.phase_unlink_latency()
        for s in self.fuse_sides():
            if s.dead and not s.dead.startswith("mount failed"):  # those are noted already
                self.notes.append(f"{s.name}: {s.dead}")
        # final stats at exit: unmount now so the exit-time stats file is written
        for s in reversed(self.fuse_sides()):
            s.unmount()
            if s.stats and os.path.exists(s.stats):
                with open(s.stats) as f:
                    try:
                        self.extras.setdefault(s.name, {})["stats_at_exit"] = json.load(f)
                    except ValueError:
                        pass


# --------------------------------------------------------------------------
# reporting


def one_line(err: str) -> str:
    """The useful line of an error: a traceback's last line, plus what ran."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    if not lines:
        return "?"
    head = lines[0].split(": rc=")[0] if len(lines) > 1 else ""
    return ((head + ": ") if head else "") + lines[-1][:300]


def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt_val(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "s":
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    if unit == "IOPS":
        return f"{v:,.0f}"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def report(b: Bench, argv: list[str]) -> tuple[str, dict]:
    cfg = b.cfg
    sides = b.sides
    L: list[str] = []
    L.append(f"## baseguard benchmark — {cfg.stamp}")
    L.append("")
    L.append(
        f"Host: {platform.node()}, kernel {platform.release()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM; "
        f"backing fs: {fs_of(b.scratch) if b.scratch else '?'} ({cfg.scratch}); "
        f"{tool_version(['fio', '--version'])}; {tool_version(['qemu-img', '--version'])}."
    )
    if b.bg_caps:
        L.append(f"baseguard: `{cfg.baseguard_bin}` ({getattr(b, 'bg_version', '?')}).")
    L.append(
        f"Rounds: {cfg.rounds} (sides alternate within each round, first side rotates); fio runtime "
        f"{cfg.runtime}s; seq/randread file {fmt_size(cfg.seq_size)}, randwrite file "
        f"{fmt_size(cfg.rand_size)}, seqwrite {fmt_size(cfg.seqwrite_size)}; qemu base "
        f"{fmt_size(cfg.qemu_virtual)} virtual / {fmt_size(cfg.qemu_data)} data, output "
        f"{cfg.convert_format}; {cfg.files:,} files in dirs of {cfg.files_per_dir}; daemons' "
        f"RLIMIT_NOFILE {cfg.nofile or resource.getrlimit(resource.RLIMIT_NOFILE)[1]}."
    )
    st1, tot1 = cpu_ticks()
    steal = (st1 - b.ticks0[0]) / max(1, tot1 - b.ticks0[1]) * 100
    L.append(
        f"Run: {(time.monotonic() - T0) / 60:.1f} min; CPU steal {steal:.1f}%; "
        f"load average at start {b.load0:.2f} (anything else running skews the numbers)."
    )
    L.append("")
    L.append(f"Command: `{shlex.join(argv)}`")
    L.append("")
    for s in sides[1:]:
        cmd = b.templates.get(s.name, "")
        L.append(f"- **{s.name}**: `{cmd}`" + (" — " + "; ".join(s.notes) if s.notes else ""))
    L.append("")
    L.append(
        "Median of the rounds, ±half the min–max spread in %. Ratio ×native: throughput fs/native, "
        "time native/fs — higher is better, 1.00 = native."
    )
    L.append("")
    hdr = ["workload", "unit", "native"]
    for s in sides[1:]:
        hdr += [s.name, "×native"]
    L.append("| " + " | ".join(hdr) + " |")
    L.append("|" + "|".join(["---"] * 2 + ["--:"] * (len(hdr) - 2)) + "|")
    summary: dict[str, Any] = {}
    for w in b.workloads:
        row = [w.label, w.unit + (" (lower=better)" if not w.higher_better else "")]
        per = b.results.get(w.key, {})
        meds: dict[str, float | None] = {}
        for s in sides:
            vals = [e["value"] for e in per.get(s.name, []) if "value" in e]
            errs = [e["error"] for e in per.get(s.name, []) if "error" in e]
            m = med(vals)
            meds[s.name] = m
            spread = (max(vals) - min(vals)) / 2 / m * 100 if vals and m else 0
            cell = fmt_val(m, w.unit) + (f" ±{spread:.0f}%" if len(vals) > 1 else "")
            if errs and not vals:
                cell = "error"
            elif errs:
                cell += f" ({len(errs)} err)"
            row.append(cell)
            if s.native:
                continue
            nat = meds.get("native")
            ratio = None
            if m and nat:
                ratio = m / nat if w.higher_better else nat / m
            row.append(f"{ratio:.2f}" if ratio is not None else "—")
            summary.setdefault(w.key, {})[s.name] = {"median": m, "ratio": ratio, "n": len(vals)}
        summary.setdefault(w.key, {})["native"] = {"median": meds.get("native")}
        L.append("| " + " | ".join(row) + " |")
    L.append("")

    # ---- extras
    fuse = sides[1:]
    L.append("### Daemon cost and quarantine")
    L.append("")
    L.append("| measurement | native | " + " | ".join(s.name for s in fuse) + " |")
    L.append("|---|--:|" + "|".join(["--:"] * len(fuse)) + "|")

    def cpu_cell(s: Side) -> str:
        if s.native:
            return "—"
        runs = [e for e in b.results.get("seqread", {}).get(s.name, []) if "daemon_cpu_s" in e]
        if not runs:
            return "n/a"
        cpu = med([e["daemon_cpu_s"] for e in runs])
        pct = med([e["daemon_cpu_s"] / e["wall_s"] * 100 for e in runs])
        per_gib = med([e["daemon_cpu_s"] / (e["io_bytes"] / GIB) for e in runs if e.get("io_bytes")])
        return f"{cpu:.2f} s ({pct:.1f}% of a core, {per_gib * 1e3:.1f} ms/GiB)"

    def ex(s: Side, key: str) -> Any:
        return b.extras.get(s.name, {}).get(key)

    def rss_cell(s: Side) -> str:
        if s.native:
            return "—"
        a, bb = ex(s, "rss_hwm_before_kib"), ex(s, "rss_hwm_after_kib")
        if ex(s, "lookup_error"):
            return "error (see notes)"
        if a is None or bb is None:
            return "n/a"
        srv = ex(s, "server_rss_hwm_after_kib")
        tail = f"; serving process {srv / 1024:.1f} MiB" if srv is not None else ""
        return f"{bb / 1024:.1f} MiB (fresh {a / 1024:.1f}){tail}"

    def lookup_cell(s: Side) -> str:
        v = ex(s, "lookup_seconds")
        return f"{v:.2f} s" if v is not None else (("error" if ex(s, "lookup_error") else "n/a"))

    def lat_cell(kind: str) -> Callable[[Side], str]:
        def f(s: Side) -> str:
            v = ex(s, f"unlink_{kind}_us")
            if not v:
                return "n/a"
            big = ex(s, f"unlink_big_{kind}_ms")
            cell = f"{v['median']:.0f} / {v['p99']:.0f} µs"
            if big is not None:
                cell += f"; {fmt_size(cfg.big_file)} file {big:.1f} ms"
            if kind == "protected" and not s.is_baseguard and not s.native:
                cell += " (not protected)"
            return cell

        return f

    def restore_cell(s: Side) -> str:
        if not s.is_baseguard:
            return "n/a (stand-in)" if s.standin else "—"
        if ex(s, "restore_ms"):
            r = ex(s, "restore_ms")
            return f"{r['median']:.1f} ms (max {r['max']:.1f}, n={r['n']}; CLI start {ex(s, 'cli_startup_ms'):.1f} ms)"
        return "skipped: " + str(ex(s, "restore_skip") or ex(s, "unlink_latency_error") or "?")

    def list_cell(s: Side) -> str:
        if not s.is_baseguard or ex(s, "list_ms") is None:
            return "—"
        return f"{ex(s, 'list_ms'):.1f} ms ({ex(s, 'quarantined_found')}/{ex(s, 'quarantined_expected')} found)"

    rows = [
        ("daemon CPU (utime+stime) during seq read", cpu_cell),
        (f"daemon peak RSS (VmHWM) after {cfg.lookup_files:,} lookups", rss_cell),
        (f"stat {cfg.lookup_files:,} files by name, cold, fresh mount", lookup_cell),
        ("unlink outside `_base/`: median / p99 per file", lat_cell("unprotected")),
        ("unlink under `_base/` (protected on baseguard): median / p99", lat_cell("protected")),
        ("`baseguard restore ID` wall time (incl. CLI start)", restore_cell),
        ("`baseguard list --json` wall time", list_cell),
    ]
    for label, fn in rows:
        L.append(f"| {label} | " + " | ".join(fn(s) for s in sides) + " |")
    L.append("")

    # ---- stats counters
    stat_sides = [s for s in fuse if any("daemon_stats" in e for w in b.results.values() for e in w.get(s.name, []))]
    if stat_sides:
        L.append("### Requests that reached the daemon (stats file, summed over all rounds)")
        L.append("")
        L.append("| workload | side | read reqs | read bytes | write reqs | write bytes | data moved by workload | top other ops |")
        L.append("|---|---|--:|--:|--:|--:|--:|---|")
        for w in b.workloads:
            for s in stat_sides:
                runs = [e for e in b.results.get(w.key, {}).get(s.name, []) if "daemon_stats" in e]
                if not runs:
                    continue
                tot: dict[str, float] = {}
                for e in runs:
                    for k, v in e["daemon_stats"].items():
                        tot[k] = tot.get(k, 0) + v
                moved = sum(e.get("io_bytes", 0) for e in runs)
                other = sorted(
                    ((k, v) for k, v in tot.items() if k not in ("read", "write", "read_bytes", "write_bytes")),
                    key=lambda kv: -abs(kv[1]),
                )[:4]
                L.append(
                    f"| {w.key} | {s.name} | {tot.get('read', 0):,.0f} | {fmt_size(tot.get('read_bytes', 0))} | "
                    f"{tot.get('write', 0):,.0f} | {fmt_size(tot.get('write_bytes', 0))} | "
                    f"{fmt_size(moved) if moved else '—'} | "
                    + ", ".join(f"{k} {v:,.0f}" for k, v in other)
                    + " |"
                )
        L.append("")
    elif any(s.is_baseguard for s in fuse):
        L.append("Stats counters: not available (no `--stats-file` support in this build, or no SIGUSR1 answer).")
        L.append("")

    notes = list(b.notes)
    for w in b.workloads:
        for sname, runs in b.results.get(w.key, {}).items():
            errs: dict[str, list[int]] = {}
            for e in runs:
                if "error" in e:
                    errs.setdefault(one_line(e["error"]), []).append(e["round"] + 1)
            for msg, rounds in errs.items():
                notes.append(f"{w.key} on {sname}, round {', '.join(map(str, rounds))}: {msg}")
    for s in sides:
        for key in ("lookup_error", "unlink_latency_error"):
            if ex(s, key):
                notes.append(f"{s.name}: {key.replace('_', ' ')}: {one_line(ex(s, key))}")
    modes = {s.name: s.state.get("convert_cache") for s in sides if s.state.get("convert_cache")}
    if modes:
        notes.append(f"qemu-img convert destination cache mode (-t): {modes}")
    no_seek = [s.name for s in sides if s.state.get("seek_data") is False]
    if no_seek:
        notes.append(
            f"lseek(SEEK_DATA) does not find holes on: {', '.join(no_seek)} — qemu-img convert there reads "
            f"all {fmt_size(cfg.qemu_virtual)} of the sparse base instead of {fmt_size(cfg.qemu_data)} "
            "(FUSE_LSEEK not implemented/passed through)"
        )
    if notes:
        L.append("Notes:")
        L.append("")
        L.extend(f"- {n}" for n in notes)
        L.append("")
    md = "\n".join(L)
    data = {
        "stamp": cfg.stamp,
        "argv": argv,
        "config": {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool, list, type(None)))},
        "host": {"kernel": platform.release(), "cpus": os.cpu_count()},
        "sides": [
            {"name": s.name, "template": s.template, "standin": s.standin, "baseguard": s.is_baseguard, "notes": s.notes}
            for s in sides
        ],
        "summary": summary,
        "raw": b.results,
        "extras": b.extras,
        "notes": notes,
    }
    return md, data


# --------------------------------------------------------------------------
# CLI


def default_baseguard_bin() -> str | None:
    for cand in (
        os.environ.get("BASEGUARD_BIN"),
        os.environ.get("BASEGUARD_BENCH_CARGO_BIN"),  # set by `cargo bench` (benches/baseguard.rs)
        os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release", "baseguard"),
        shutil.which("baseguard"),
    ):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="baseguard_bench.py",
        description="Benchmark baseguard (and other FUSE filesystems) against the native backing directory.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""
templates: a mount command run in the foreground, split like a shell would (shlex);
placeholders {backing} {mnt} {stats} {baseguard}. The mount must show up at {mnt}
in /proc/self/mountinfo (fuse.baseguard for templates using {baseguard}, any fuse*
type otherwise). Examples:
  --peer bindfs                                   (shortcut for 'bindfs -f {backing} {mnt}')
  --peer 'bindfs-nocache=bindfs -f -o attr_timeout=0 {backing} {mnt}'
  --peer 'bg-4t={baseguard} mount --threads 4 {backing} {mnt}'
  --baseguard-cmd 'bindfs -f {backing} {mnt}'     (stand-in until the daemon exists)
""",
    )
    p.add_argument("--quick", action="store_true", help="small sizes, 2 rounds: ~1-2 minutes smoke test")
    p.add_argument("--rounds", type=int, help="rounds (default 3, quick 2)")
    p.add_argument("--runtime", type=int, help="seconds per time-based fio job (default 5, quick 1)")
    p.add_argument("--seq-size", type=parse_size, help="seq/rand read file (default 1G, quick 128M)")
    p.add_argument("--rand-size", type=parse_size, help="random write file (default 1G, quick 128M)")
    p.add_argument("--seqwrite-size", type=parse_size, help="seq write + fsync size (default 1G, quick 128M)")
    p.add_argument("--qemu-virtual", type=parse_size, help="raw base virtual size (default 2G)")
    p.add_argument("--qemu-data", type=parse_size, help="data scattered in the base (default 256M, quick 64M)")
    p.add_argument("--convert-format", default="qcow2", choices=["qcow2", "raw"], help="qemu-img convert -O")
    p.add_argument(
        "--convert-cache",
        default="auto",
        help="qemu-img convert -t: auto (Nova: none if O_DIRECT works, else writeback), none, writeback, ...",
    )
    p.add_argument("--files", type=int, help="files for stat/create/unlink (default 19000, quick 5000)")
    p.add_argument("--files-per-dir", type=int, default=1000)
    p.add_argument("--lookup-files", type=int, help="files looked up for the RSS figure (default 100000, quick 20000)")
    p.add_argument("--unlink-lat-files", type=int, help="files per unlink-latency sample (default 500, quick 100)")
    p.add_argument("--big-file", type=parse_size, help="size of the big file unlinked (default 256M, quick 32M)")
    p.add_argument("--restore-count", type=int, help="restores timed (default 20, quick 5)")
    p.add_argument("--only", type=lambda s: s.split(","), help="comma list of workloads: " + ",".join(w.key for w in WORKLOADS))
    p.add_argument("--baseguard", dest="baseguard_bin", help="baseguard binary (default: $BASEGUARD_BIN, target/release)")
    p.add_argument(
        "--baseguard-cmd",
        default=os.environ.get("BASEGUARD_BENCH_CMD"),
        help="mount template for the 'baseguard' column (env BASEGUARD_BENCH_CMD); without {baseguard} it is a stand-in",
    )
    p.add_argument("--no-baseguard", action="store_true", help="only peers vs native")
    p.add_argument("--threads", type=int, help="pass --threads N to baseguard mount")
    p.add_argument("--no-passthrough", action="store_true", help="pass --no-passthrough to baseguard mount")
    p.add_argument("--with-no-passthrough", action="store_true", help="add a baseguard-nopt column")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=TEMPLATE", help="another FUSE fs (repeatable)")
    p.add_argument(
        "--passthrough-hp",
        default=os.environ.get("PASSTHROUGH_HP") or shutil.which("passthrough_hp"),
        help="libfuse's passthrough_hp for the passthrough_hp peers (default: $PASSTHROUGH_HP, else PATH)",
    )
    p.add_argument(
        "--no-auto-peers",
        action="store_true",
        help="do not add the peers found installed (passthrough_hp plain and -o io_uring, bindfs)",
    )
    p.add_argument(
        "--with-uring",
        action="store_true",
        help="add a baseguard-uring column (-o transport=uring; turns FUSE-over-io_uring on for the run)",
    )
    p.add_argument(
        "--uring",
        action="store_true",
        help="turn FUSE-over-io_uring on for the run (enable_uring=1, put back after): "
        "baseguard and peers that can use it do",
    )
    p.add_argument("--scratch", default=os.environ.get("BASEGUARD_BENCH_SCRATCH", "/var/tmp"), help="parent dir (ext4)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--out-dir", default=os.path.join(REPO, "target", "baseguard-bench"), help="results + daemon logs")
    p.add_argument("--json", help="also write the JSON results here")
    p.add_argument("--markdown", help="also write the Markdown report here")
    p.add_argument("--mount-timeout", type=float, default=20)
    p.add_argument("--nofile", type=int, help="RLIMIT_NOFILE (soft=hard) for the daemons (default: inherited)")
    p.add_argument("--no-install", action="store_true", help="don't apt-get install missing tools; print the line")
    cfg = p.parse_args(argv)
    q = cfg.quick
    defaults = {
        "rounds": (3, 2),
        "runtime": (5, 1),
        "seq_size": (GIB, 128 * MIB),
        "rand_size": (GIB, 128 * MIB),
        "seqwrite_size": (GIB, 128 * MIB),
        "qemu_virtual": (2 * GIB, 2 * GIB),
        "qemu_data": (256 * MIB, 64 * MIB),
        "files": (19000, 5000),
        "lookup_files": (100000, 20000),
        "unlink_lat_files": (500, 100),
        "big_file": (256 * MIB, 32 * MIB),
        "restore_count": (20, 5),
    }
    for k, (full, quick) in defaults.items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, quick if q else full)
    if cfg.only:
        bad = set(cfg.only) - {w.key for w in WORKLOADS}
        if bad:
            p.error(f"unknown workloads: {', '.join(sorted(bad))}")
    if cfg.baseguard_bin is None:
        cfg.baseguard_bin = default_baseguard_bin()
    elif not os.path.isabs(cfg.baseguard_bin):
        cfg.baseguard_bin = shutil.which(cfg.baseguard_bin) or os.path.abspath(cfg.baseguard_bin)
    cfg.stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if not cfg.no_auto_peers:
        named = {p.partition("=")[0] for p in cfg.peer}
        found = []
        if cfg.passthrough_hp:
            found += ["passthrough_hp", "passthrough_hp-uring"]
        if shutil.which("bindfs"):
            found.append("bindfs")
        for name in found:
            if name not in named:
                cfg.peer.append(name)
    if cfg.with_uring:
        cfg.uring = True
    if cfg.rounds < 1 or cfg.files < 1 or cfg.files_per_dir < 1:
        p.error("rounds, files and files-per-dir must be >= 1")
    return cfg


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    if os.geteuid() != 0:
        die("must run as root (mounts, /proc/sys/vm/drop_caches)")
    if cfg.nofile:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
        if cfg.nofile > nr_open:
            log(f"--nofile {cfg.nofile} is above fs.nr_open; using {nr_open}")
            cfg.nofile = nr_open
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if cfg.nofile > hard:
            try:  # raising the hard limit needs CAP_SYS_RESOURCE; find out now, not in the child
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, cfg.nofile))
            except (ValueError, OSError) as e:
                die(f"--nofile {cfg.nofile}: cannot raise the hard limit {hard} here ({e}); use <= {hard}")
    tools = ["fio", "qemu-img", "qemu-io", "umount"]
    templates = [cfg.baseguard_cmd or ""] + [t.partition("=")[2] or PEER_SHORTCUTS.get(t, "") for t in cfg.peer]
    for t in templates:
        try:
            first = shlex.split(t)[0] if t.strip() else ""
        except ValueError:
            die(f"bad template {t!r}")
        if first and "{" not in first:
            tools.append(first)
    ensure_tools(tools, cfg.no_install)
    if "libaio" not in subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout:
        die("this fio has no libaio engine (Debian's fio has it: apt-get install -y fio)")
    os.makedirs(cfg.scratch, exist_ok=True)
    os.makedirs(cfg.out_dir, exist_ok=True)
    if fs_of(cfg.scratch) in ("tmpfs", "ramfs"):
        log(f"WARNING: {cfg.scratch} is {fs_of(cfg.scratch)}, not a disk filesystem; use --scratch /work/...")

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    b = Bench(cfg)
    rc = 0
    uring_was = None
    if cfg.uring or any(p.split("=")[0].endswith("-uring") for p in cfg.peer):
        try:
            with open(ENABLE_URING) as f:
                uring_was = f.read().strip()
            with open(ENABLE_URING, "w") as f:
                f.write("1")
            log("FUSE-over-io_uring on for this run (enable_uring=1)")
        except OSError as e:
            die(f"cannot turn FUSE-over-io_uring on ({ENABLE_URING}: {e})")
    try:
        b.run()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        rc = 130
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except Exception:
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        b.cleanup()
        if uring_was is not None:
            with open(ENABLE_URING, "w") as f:
                f.write(uring_was)
    if any(b.results.values()):
        md, data = report(b, [sys.argv[0], *argv])
        md_path = cfg.markdown or os.path.join(cfg.out_dir, f"{cfg.stamp}.md")
        json_path = cfg.json or os.path.join(cfg.out_dir, f"{cfg.stamp}.json")
        with open(md_path, "w") as f:
            f.write(md + "\n")
        with open(json_path, "w") as f:
            json.dump(data, f, indent=1, default=str)
        print(md)
        log(f"wrote {md_path} and {json_path}")
    elif rc == 0:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
