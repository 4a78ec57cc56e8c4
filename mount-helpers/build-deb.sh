#!/bin/sh
# build-deb.sh - build a Debian package of baseguard from this repository.
#
# usage: sh mount-helpers/build-deb.sh        (or: make -C mount-helpers deb)
#
# Needs cargo (Rust >= 1.85), gcc, dpkg-deb and binutils (strip); no root.
# Writes target/debian/baseguard_<version>_<arch>.deb, which installs:
#   /usr/bin/baseguard                       (stripped)
#   /usr/sbin/mount.fuse.baseguard           (the mount(8) helper)
#   /usr/share/man/man1/baseguard*.1, /usr/share/man/man8/mount.fuse.baseguard.8
#   bash, zsh and fish completions
#   /usr/share/doc/baseguard/examples/       (fstab line, systemd drop-ins)
#   /etc/logrotate.d/baseguard               (a conffile)
# Nothing else: no unit is enabled, no fstab line is written, nothing under
# /var/lib/nova is touched. `dpkg -r baseguard` removes it all.
set -eu

here=$(cd -- "$(dirname -- "$0")" && pwd)
top=$(cd -- "$here/.." && pwd)
cd "$top"

cargo build --release --locked
bin=$top/target/release/baseguard
out=$top/target/debian
stage=$out/stage
rm -rf "$stage"
mkdir -p "$stage/DEBIAN"
"$bin" gen-docs "$out/docs" >/dev/null

# Stage with the same installer as `make install`, into /usr.
PREFIX=/usr SBINDIR=/usr/sbin DESTDIR=$stage BINARY=$bin DOCS=$out/docs \
    sh "$here/install.sh" >/dev/null
strip --strip-unneeded "$stage/usr/bin/baseguard"
install -D -m 0644 "$here/logrotate.baseguard" "$stage/etc/logrotate.d/baseguard"
gzip -9n "$stage"/usr/share/man/man1/*.1 "$stage"/usr/share/man/man8/*.8
install -D -m 0644 "$top/README.md" "$stage/usr/share/doc/baseguard/README.md"

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
if rev=$(git -C "$top" rev-parse --short=10 HEAD 2>/dev/null); then
    version="$version+git$rev"
fi
arch=$(dpkg --print-architecture)
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: baseguard
Version: $version
Architecture: $arch
Maintainer: baseguard maintainers <root@localhost>
Installed-Size: $size
Depends: libc6
Suggests: qemu-utils
Section: admin
Priority: optional
Description: FUSE guard over Nova's shared instances directory
 baseguard passes every operation through to the real instances directory
 at native speed, but a deletion under _base/ becomes an atomic rename into
 a quarantine, restored automatically when an instance disk still needs it.
CONTROL
echo /etc/logrotate.d/baseguard >"$stage/DEBIAN/conffiles"
deb=$out/baseguard_${version}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
