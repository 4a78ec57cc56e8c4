#!/bin/bash
# run-classic.sh - run the classic POSIX suites (pjdfstest's shell suite, xfstests) side by side
# on native ext4, through baseguard, and through FUSE peers (bindfs, mergerfs).
#
# Nothing is fetched here: bring the suites yourself, built outside this repository, and pass
# their paths. As root:
#
#   PJDFSTEST=/path/to/pjdfstest   # a built checkout of pjd/pjdfstest (autoreconf -ifs &&
#                                  # ./configure && make pjdfstest)
#   XFSTESTS=/path/to/xfstests     # a built checkout of xfstests (make)
#   BASEGUARD=target/release/baseguard
#   WORK=/var/tmp/bg-classic       # loop images, backing directories, mountpoints, results
#
#   tests/suites/run-classic.sh setup                    # two 4 GiB ext4 loop images, users,
#                                                        # a mount.fuse.baseguard for mount(8)
#   tests/suites/run-classic.sh pjdfstest FS             # FS: ext4 baseguard bindfs mergerfs
#   tests/suites/run-classic.sh xfstests FS TEST...      # e.g. generic/003, or -g quick
#                                  # (FUSE_OPTIONS=dev,... adds mount options to a FUSE run)
#   tests/suites/run-classic.sh teardown                 # unmount, detach, remove the helper
#
# The backing directories of the FUSE runs are the two ext4 loop images (test, scratch), so
# every FUSE filesystem is compared with the filesystem under it. Results go to
# $WORK/results/SUITE-FS/ (pjdfstest: prove's output; xfstests: its results directory and
# check's output). Run one suite at a time: the runs share the loop images.
#
# What each FS means (the exact commands, so a peer can be rerun by hand):
#   ext4      the loop image itself (xfstests: FSTYP=ext4 on the loop devices)
#   baseguard baseguard mount BACKING MNT               (the default mount; xfstests through
#             mount -t fuse.baseguard, i.e. mount-helpers/mount.fuse.baseguard)
#   bindfs    bindfs BACKING MNT                        (Debian's bindfs; as root it adds
#             allow_other; xfstests through mount -t fuse.bindfs, i.e. fuse2's mount.fuse)
#   mergerfs  mergerfs -o allow_other,minfreespace=0 BACKING MNT   (Debian's mergerfs; its
#             default minfreespace=4G refuses every create on the 4 GiB images)
set -u

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
WORK=${WORK:-/var/tmp/bg-classic}
BASEGUARD=${BASEGUARD:-$repo/target/release/baseguard}
PJDFSTEST=${PJDFSTEST:-}
XFSTESTS=${XFSTESTS:-}
SIZE=${SIZE:-4G}
HELPER=/sbin/mount.fuse.baseguard

die() { echo "run-classic: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root"

loopdev() { losetup -j "$WORK/img/$1.img" | cut -d: -f1 | head -n1; }

# Mount the ext4 loop image NAME (test or scratch) at $WORK/back/NAME, creating it if needed.
back_mount() {
    local name=$1 dev
    dev=$(loopdev "$name")
    [ -n "$dev" ] || die "no loop device for $name: run setup"
    mountpoint -q "$WORK/back/$name" && return
    # xfstests on native ext4 leaves the scratch device with whatever its last test made of it.
    if ! mount -t ext4 "$dev" "$WORK/back/$name" 2>/dev/null; then
        [ "$name" = scratch ] || die "mount $dev"
        mkfs.ext4 -q -F "$dev" && mount -t ext4 "$dev" "$WORK/back/$name" || die "mount $dev"
    fi
}

setup() {
    mkdir -p "$WORK"/img "$WORK"/back/test "$WORK"/back/scratch "$WORK"/mnt/test \
        "$WORK"/mnt/scratch "$WORK"/results
    for name in test scratch; do
        if [ -z "$(loopdev $name)" ]; then
            [ -f "$WORK/img/$name.img" ] || {
                truncate -s "$SIZE" "$WORK/img/$name.img"
                mkfs.ext4 -q -F "$WORK/img/$name.img"
            }
            losetup -f "$WORK/img/$name.img"
        fi
        back_mount $name
    done
    # The users xfstests switches to (tests that need them are skipped without).
    getent passwd fsgqa >/dev/null || useradd -m fsgqa
    getent passwd fsgqa2 >/dev/null || useradd -m fsgqa2
    getent passwd 123456-fsgqa >/dev/null || useradd -m --badname 123456-fsgqa 2>/dev/null \
        || useradd -m 123456-fsgqa || true
    # mount(8) finds helpers only in /sbin: one that runs this checkout's helper and binary.
    if [ ! -e "$HELPER" ] || grep -q 'run-classic.sh' "$HELPER"; then
        printf '#!/bin/sh\n# written by %s (run-classic.sh); removed by its teardown\nBASEGUARD_BIN=%s exec %s "$@"\n' \
            "$repo" "$BASEGUARD" "$repo/mount-helpers/mount.fuse.baseguard" >"$HELPER"
        chmod 755 "$HELPER"
    else
        echo "run-classic: $HELPER exists and is not ours: using it as it is" >&2
    fi
}

teardown() {
    for m in "$WORK"/mnt/test "$WORK"/mnt/scratch "$WORK"/mnt/pjd "$WORK"/back/test \
        "$WORK"/back/scratch; do
        while mountpoint -q "$m" 2>/dev/null; do umount "$m" || { sleep 1; umount -l "$m"; }; done
    done
    for name in test scratch; do
        dev=$(loopdev $name)
        [ -n "$dev" ] && losetup -d "$dev"
    done
    if [ -f "$HELPER" ] && grep -q 'run-classic.sh' "$HELPER"; then rm -f "$HELPER"; fi
}

# fuse_mount FS BACKING MNT: mount BACKING at MNT through FS.
fuse_mount() {
    case $1 in
    baseguard) "$BASEGUARD" mount "$2" "$3" ;;
    bindfs) bindfs "$2" "$3" ;;
    mergerfs) mergerfs -o allow_other,minfreespace=0 "$2" "$3" ;;
    *) die "unknown filesystem $1" ;;
    esac
}

run_pjdfstest() {
    local fs=$1 dir out
    [ -x "$PJDFSTEST/pjdfstest" ] || die "PJDFSTEST=$PJDFSTEST has no built pjdfstest"
    back_mount test
    out="$WORK/results/pjdfstest-$fs"
    mkdir -p "$out"
    rm -rf "$WORK/back/test/pjd"
    mkdir -p "$WORK/back/test/pjd" "$WORK/mnt/pjd"
    if [ "$fs" = ext4 ]; then
        dir=$WORK/back/test/pjd
    else
        fuse_mount "$fs" "$WORK/back/test/pjd" "$WORK/mnt/pjd" || die "mount $fs"
        dir=$WORK/mnt/pjd
    fi
    chmod 0755 "$dir"
    # pjdfstest's tests find their binary two directories up from each test file.
    (cd "$dir" && prove -r "$PJDFSTEST/tests") >"$out/prove.log" 2>&1
    local rc=$?
    if [ "$fs" != ext4 ]; then
        umount "$WORK/mnt/pjd" 2>/dev/null || { sleep 2; umount "$WORK/mnt/pjd"; }
    fi
    rm -rf "$WORK/back/test/pjd"
    summarize_prove "$out/prove.log" | tee "$out/summary.txt"
    return $rc
}

# From prove's closing report: the failed files and how many assertions each failed.
summarize_prove() {
    awk '
        /^Test Summary Report/ { report = 1; next }
        report && /^\// { file = $1 }
        report && /Failed: [1-9][0-9]*\)/ { match($0, /Failed: [0-9]+/); n = substr($0, RSTART + 8, RLENGTH - 8); failed += n; files++; print "  " file " " n }
        report && /TODO passed:/ { print "  " file " (some TODO assertions passed)" }
        report && /Parse errors/ { print "  " file " parse errors: " $0; files++ }
        /^Files=/ { total = $0 }
        /^Result:/ { result = $2 }
        END { printf "failed assertions: %d in %d files; %s; Result: %s\n", failed, files, total, result }
    ' "$1"
}

run_xfstests() {
    local fs=$1 out cfg
    shift
    [ -x "$XFSTESTS/check" ] || die "XFSTESTS=$XFSTESTS has no check"
    out="$WORK/results/xfstests-$fs"
    mkdir -p "$out"
    cfg="$out/local.config"
    if [ "$fs" = ext4 ]; then
        back_mount test
        back_mount scratch
        umount "$WORK/back/scratch"
        cat >"$cfg" <<EOF
export FSTYP=ext4
export TEST_DEV=$(loopdev test)
export TEST_DIR=$WORK/back/test
export SCRATCH_DEV=$(loopdev scratch)
export SCRATCH_MNT=$WORK/back/scratch
EOF
    else
        back_mount test
        back_mount scratch
        mkdir -p "$WORK/back/test/xfs" "$WORK/back/scratch/xfs"
        cat >"$cfg" <<EOF
export FSTYP=fuse
export FUSE_SUBTYP=.$fs
export TEST_DEV=$WORK/back/test/xfs
export TEST_DIR=$WORK/mnt/test
export SCRATCH_DEV=$WORK/back/scratch/xfs
export SCRATCH_MNT=$WORK/mnt/scratch
EOF
        # Extra mount options for both mounts: $FUSE_OPTIONS (e.g. FUSE_OPTIONS=dev).
        local opts=${FUSE_OPTIONS:-}
        [ "$fs" = mergerfs ] && opts=allow_other,minfreespace=0${opts:+,$opts}
        [ -n "$opts" ] && {
            echo "export MOUNT_OPTIONS=\"-o $opts\""
            echo "export TEST_FS_MOUNT_OPTS=\"-o $opts\""
        } >>"$cfg"
    fi
    # shim/: df and umount as xfstests' FUSE configurations need them (see each file).
    (cd "$XFSTESTS" && PATH=$here/shim:$PATH HOST_OPTIONS=$cfg RESULT_BASE=$out/results \
        ./check "$@") >"$out/check.log" 2>&1
    local rc=$?
    for m in "$WORK/mnt/test" "$WORK/mnt/scratch"; do
        mountpoint -q "$m" && { umount "$m" || { sleep 2; umount "$m"; }; }
    done
    if [ "$fs" = ext4 ]; then
        # The scratch device holds whatever the last test made of it (a smaller filesystem,
        # a full one): a fresh ext4 on the whole image for the FUSE runs' backing directory.
        mountpoint -q "$WORK/back/scratch" && umount "$WORK/back/scratch"
        mkfs.ext4 -q -F "$(loopdev scratch)"
    fi
    back_mount scratch
    grep -E '^(Ran|Not run|Failures|Failed|Passed)' "$out/check.log" | tee "$out/summary.txt"
    return $rc
}

cmd=${1:-}
shift || true
case $cmd in
setup) setup ;;
teardown) teardown ;;
pjdfstest) run_pjdfstest "${1:?FS}" ;;
xfstests) [ $# -ge 2 ] || die "name the tests (or -g GROUP): check runs everything without"; run_xfstests "$1" "${@:2}" ;;
*) die "usage: $0 setup|pjdfstest FS|xfstests FS TEST...|teardown" ;;
esac
