"""One node's workload for the crash harness (tests/crash_harness.rs).

Usage: crash_worker.py MOUNT BACKING TAG SECONDS BASEGUARD_BIN SEED

Writes versions of a few protected files the way Nova does (a `.part`
renamed over the name), deletes, truncates, punches holes, and runs the
CLI's restore and purge, killing the CLI at random moments. Every version
gets a unique content and the same string in the xattr `user.bg`.

Prints one line per fact the harness needs:
  V <content>        the rename that placed this version returned success
  PURGED <content>   a purge that completed removed this version for good
  MAYBE <content>    a purge was killed: this version may be gone
It stops at the first ENOTCONN/ECONNABORTED (its daemon was killed) or when
the time is up.
"""

import errno
import os
import random
import signal
import subprocess
import sys
import time

mnt, backing, tag, seconds, binary, seed = sys.argv[1:7]
rng = random.Random(int(seed))
base = os.path.join(mnt, "_base")
entries = os.path.join(backing, ".baseguard", "entries")
deadline = time.time() + float(seconds)
DEAD = (errno.ENOTCONN, errno.ECONNABORTED)
n = 0


def say(*a):
    print(*a, flush=True)


def held_ids():
    try:
        return [f[:-5] for f in os.listdir(entries) if f.endswith(".data")]
    except OSError:
        return []


def content_of(ident):
    try:
        with open(os.path.join(entries, ident + ".data"), "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def cli(args, kill_after):
    p = subprocess.Popen([binary] + args + ["--dir", mnt], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    if kill_after is not None:
        time.sleep(kill_after)
        p.send_signal(signal.SIGKILL)
    return p.wait()


while time.time() < deadline:
    k = rng.randrange(4)
    name = os.path.join(base, "f%d" % k)
    op = rng.random()
    try:
        if op < 0.45:
            n += 1
            v = "version-%s-%d-%s" % (tag, n, "x" * rng.randrange(1, 3000))
            part = os.path.join(base, "f%d.%s.%d.part" % (k, tag, n))
            with open(part, "w") as f:
                f.write(v)
            os.setxattr(part, "user.bg", v[:200].encode())
            os.rename(part, name)
            say("V", v)
        elif op < 0.6:
            os.unlink(name)
        elif op < 0.7:
            os.truncate(name, 0)
        elif op < 0.75:
            fd = os.open(name, os.O_RDWR)
            try:
                os.pwrite(fd, b"OVERWRITTEN", 0)
            finally:
                os.close(fd)
        elif op < 0.9:
            ids = held_ids()
            if ids:
                kill = rng.choice([None, None, rng.uniform(0, 0.01)])
                cli(["restore", rng.choice(ids)], kill)
        else:
            ids = held_ids()
            if ids:
                ident = rng.choice(ids)
                c = content_of(ident)
                kill = rng.choice([None, rng.uniform(0, 0.01)])
                rc = cli(["purge", ident, "--yes", "--force"], kill)
                if c is not None:
                    if kill is not None:
                        say("MAYBE", c)
                    elif rc == 0:
                        say("PURGED", c)
    except OSError as e:
        if e.errno in DEAD:
            break
time.sleep(0)
