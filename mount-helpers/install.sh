#!/bin/sh
# install.sh - install baseguard, its mount(8) helper, man pages and shell completions.
#
# usage: install.sh [--uninstall] [--bin PATH] [--docs DIR] [--prefix PREFIX]
#                   [--destdir DESTDIR] [--sbindir DIR]
#
# Settings (flags win over environment variables):
#   PREFIX   /usr/local        baseguard goes to $DESTDIR$PREFIX/bin
#   DESTDIR  (empty)           staging root for packaging
#   SBINDIR  /sbin             the helper goes to $DESTDIR$SBINDIR/mount.fuse.baseguard;
#                              mount(8) looks in /sbin, /sbin/fs.d and /sbin/fs (on
#                              merged-/usr systems /sbin is a link to usr/sbin, so packagers
#                              staging into DESTDIR may prefer SBINDIR=/usr/sbin)
#   BINARY   ../target/release/baseguard (relative to this script)
#   DOCS     (empty)           output of `baseguard gen-docs DIR`: DIR/man1/*.1 and
#                              DIR/completions/{baseguard.bash,_baseguard,baseguard.fish};
#                              installed when given and present
#
# Installed:
#   $PREFIX/bin/baseguard
#   $SBINDIR/mount.fuse.baseguard                 (records $PREFIX/bin as where baseguard is)
#   $PREFIX/share/man/man8/mount.fuse.baseguard.8
#   $PREFIX/share/man/man1/*.1                    (from DOCS)
#   $PREFIX/share/bash-completion/completions/baseguard
#   $PREFIX/share/zsh/site-functions/_baseguard
#   $PREFIX/share/fish/vendor_completions.d/baseguard.fish
#   $PREFIX/share/doc/baseguard/examples/         (fstab.example, baseguard.toml, systemd drop-ins)
set -eu

here=$(cd -- "$(dirname -- "$0")" && pwd)

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
SBINDIR=${SBINDIR:-/sbin}
BINARY=${BINARY:-$here/../target/release/baseguard}
DOCS=${DOCS:-}
uninstall=0

die() {
    printf 'install.sh: %s\n' "$1" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case $1 in
    --uninstall) uninstall=1 ;;
    --bin | --docs | --prefix | --destdir | --sbindir)
        [ $# -ge 2 ] || die "$1 needs a value"
        case $1 in
        --bin) BINARY=$2 ;;
        --docs) DOCS=$2 ;;
        --prefix) PREFIX=$2 ;;
        --destdir) DESTDIR=$2 ;;
        --sbindir) SBINDIR=$2 ;;
        esac
        shift
        ;;
    -h | --help)
        sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done

case $PREFIX in /*) ;; *) die "PREFIX must be an absolute path, not '$PREFIX'" ;; esac
case $SBINDIR in /*) ;; *) die "SBINDIR must be an absolute path, not '$SBINDIR'" ;; esac

bindir=$PREFIX/bin
mandir=$PREFIX/share/man
bashdir=$PREFIX/share/bash-completion/completions
zshdir=$PREFIX/share/zsh/site-functions
fishdir=$PREFIX/share/fish/vendor_completions.d
exdir=$PREFIX/share/doc/baseguard/examples

say() { printf '  %s\n' "$1"; }

# put SRC DEST MODE: install one file, creating parent directories.
put() {
    mkdir -p -- "$(dirname -- "$2")"
    cp -- "$1" "$2.tmp.$$"
    chmod "$3" "$2.tmp.$$"
    mv -f -- "$2.tmp.$$" "$2"
    say "$2"
}

if [ "$uninstall" = 1 ]; then
    for f in "$bindir/baseguard" "$SBINDIR/mount.fuse.baseguard" \
        "$mandir/man8/mount.fuse.baseguard.8" "$bashdir/baseguard" "$zshdir/_baseguard" \
        "$fishdir/baseguard.fish"; do
        if [ -e "$DESTDIR$f" ]; then rm -f -- "$DESTDIR$f" && say "removed $DESTDIR$f"; fi
    done
    for f in "$DESTDIR$mandir"/man1/baseguard.1 "$DESTDIR$mandir"/man1/baseguard-*.1; do
        if [ -e "$f" ]; then rm -f -- "$f" && say "removed $f"; fi
    done
    if [ -d "$DESTDIR$exdir" ]; then rm -rf -- "$DESTDIR$exdir" && say "removed $DESTDIR$exdir"; fi
    exit 0
fi

if ! [ -f "$BINARY" ] || ! [ -x "$BINARY" ]; then
    die "no baseguard binary at '$BINARY' (build it with 'cargo build --release' or pass --bin PATH)"
fi

echo "installing baseguard (PREFIX=$PREFIX${DESTDIR:+ DESTDIR=$DESTDIR} SBINDIR=$SBINDIR):"
put "$BINARY" "$DESTDIR$bindir/baseguard" 0755

# The helper, with the install location recorded so it finds baseguard even when
# PREFIX/bin is not on mount(8)'s PATH.
helper_tmp=$(mktemp)
trap 'rm -f -- "$helper_tmp"' EXIT
quoted=$(printf '%s' "$bindir" | sed "s/'/'\\\\''/g")
{
    sed '/^INSTALLED_BINDIR=$/,$d' "$here/mount.fuse.baseguard"
    printf "INSTALLED_BINDIR='%s'\n" "$quoted"
    sed '1,/^INSTALLED_BINDIR=$/d' "$here/mount.fuse.baseguard"
} >"$helper_tmp"
grep -q '^INSTALLED_BINDIR=.' "$helper_tmp" || die "could not record $bindir in the helper"
put "$helper_tmp" "$DESTDIR$SBINDIR/mount.fuse.baseguard" 0755

put "$here/mount.fuse.baseguard.8" "$DESTDIR$mandir/man8/mount.fuse.baseguard.8" 0644

if [ -n "$DOCS" ]; then
    [ -d "$DOCS" ] || die "docs directory '$DOCS' does not exist (run 'baseguard gen-docs $DOCS' first)"
    for f in "$DOCS"/man1/*.1; do
        [ -f "$f" ] && put "$f" "$DESTDIR$mandir/man1/$(basename -- "$f")" 0644
    done
    c=$DOCS/completions
    if [ -f "$c/baseguard.bash" ]; then put "$c/baseguard.bash" "$DESTDIR$bashdir/baseguard" 0644; fi
    if [ -f "$c/_baseguard" ]; then put "$c/_baseguard" "$DESTDIR$zshdir/_baseguard" 0644; fi
    if [ -f "$c/baseguard.fish" ]; then put "$c/baseguard.fish" "$DESTDIR$fishdir/baseguard.fish" 0644; fi
fi

put "$here/fstab.example" "$DESTDIR$exdir/fstab.example" 0644
put "$here/baseguard.toml" "$DESTDIR$exdir/baseguard.toml" 0644
for unit in nova-compute openstack-nova-compute libvirtd virtqemud; do
    put "$here/systemd/$unit.service.d/baseguard.conf" \
        "$DESTDIR$exdir/systemd/$unit.service.d/baseguard.conf" 0644
done

if [ -z "$DESTDIR" ]; then
    cat <<EOF
done. Next steps:
  - add the fstab line (see $exdir/fstab.example), then: systemctl daemon-reload && mount /var/lib/nova/instances
  - install the drop-ins: cp -r $exdir/systemd/*.service.d /etc/systemd/system/ && systemctl daemon-reload
EOF
fi
