#!/usr/bin/env bash
# baseguard demo: on a Debian 12 machine (as root), builds baseguard and replays "the
# disappearing images" incident on two simulated compute nodes that share one instances
# directory. Everything lives in a fresh directory of its own (mktemp -d): running it
# again, or next to other mounts, touches nothing else. It installs only the Debian
# packages it is missing (qemu-utils, python3, gcc), never removes one, and says what
# it installed. It leaves both mounts up to play with and prints how to end them.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (baseguard mounts with mount(2) and serves every caller with their own credentials)"
[ -c /dev/fuse ] || die "/dev/fuse is missing: load the fuse module (modprobe fuse)"

D=$(mktemp -d /tmp/baseguard-demo.XXXXXX)
chmod 755 "$D"

# Only what the demo runs. Not fuse3: as root, baseguard calls mount(2) itself.
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v python3 >/dev/null || need+=(python3)
command -v cc >/dev/null || need+=(gcc) # the linker rustc calls
installed=
if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  installed="${need[*]}"
  echo "demo: installing $installed (apt's output: $D/apt.log)"
  apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q)
  if ! { "${apt[@]}" update && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install \
      --no-remove --no-install-recommends "${need[@]}"; } >"$D/apt.log" 2>&1; then
    tail -n 20 "$D/apt.log" >&2
    die "installing $installed failed (whole output: $D/apt.log)"
  fi
fi

command -v cargo >/dev/null ||
  die "cargo (Rust >= 1.85) is required: https://rustup.rs (Debian 12's own cargo, 1.63, is too old)"
echo "demo: building baseguard (cargo build --release)"
cargo build --release --quiet ||
  die "the build failed; baseguard needs Rust >= 1.85 ($(cargo --version)): https://rustup.rs"
BG="$PWD/target/release/baseguard"

mkdir -p "$D/nfs/_base" "$D/node-a" "$D/node-b"

say "Two compute nodes mount the shared instances directory ($D/nfs) through baseguard"
"$BG" mount --log-file "$D/node-a.log" "$D/nfs" "$D/node-a"
"$BG" mount --log-file "$D/node-b.log" "$D/nfs" "$D/node-b"
findmnt -o TARGET,SOURCE,FSTYPE "$D/node-a"
findmnt -n -o TARGET,SOURCE,FSTYPE "$D/node-b"
if grep -q "no FUSE passthrough" "$D/node-a.log"; then
  echo "Note: kernel $(uname -r) has no FUSE passthrough (Linux >= 6.9): file data goes through the daemon, slower but the same."
fi

SHA=7b4783508212f5d242cbf9ff56fb8d33b4ce6166
UUID=6f1c2a8e-3b9d-4c4e-9a52-0c1d2e3f4a5b
say "Node B downloads a Glance image into _base and boots an instance on it"
# As Nova downloads: into "<sha>.part" (ignored by the guard), then renamed into place.
qemu-img create -q -f raw "$D/node-b/_base/$SHA.part" 64M
qemu-io -f raw -c "write -P 0x42 0 8M" "$D/node-b/_base/$SHA.part" >/dev/null
mv "$D/node-b/_base/$SHA.part" "$D/node-b/_base/$SHA"
mkdir "$D/node-b/$UUID"
qemu-img create -q -f qcow2 -F raw -b "$D/node-b/_base/$SHA" "$D/node-b/$UUID/disk"
qemu-img info --backing-chain "$D/node-b/$UUID/disk" | grep -E '^(image|backing file):'

say "Node B goes down; node A's image cache manager removes the 'unused' base file"
python3 -c "import os, sys; os.remove(sys.argv[1])" "$D/node-a/_base/$SHA"
ls -la "$D/node-a/_base/"
"$BG" list --dir "$D/node-a"

say "Node B comes back: qemu opens the instance disk; node B's baseguard restores the base file"
sleep 1.5 # let node B's kernel attribute cache (1 s) expire, as NFS's would
qemu-io -f qcow2 -t none -c "read -P 0x42 0 8M" "$D/node-b/$UUID/disk"
ls -la "$D/node-b/_base/"
if line=$(grep -m1 "restored a quarantined base file" "$D/node-b.log"); then
  echo "Node B's baseguard restored it automatically when qemu looked it up (no command was run); its log says:"
  echo "  $line"
else
  echo "(node B's log, $D/node-b.log, has no restore line: see it for why)"
fi

say "An unreferenced base file deleted the same way stays in the quarantine"
qemu-img create -q -f raw "$D/node-a/_base/0000000000000000000000000000000000000000" 1M
python3 -c "import os, sys; os.remove(sys.argv[1])" "$D/node-a/_base/0000000000000000000000000000000000000000"
"$BG" list --dir "$D/node-a"
"$BG" status --dir "$D/node-a" || true

cat <<EOT

The demo's mounts are still up: $D/node-a and $D/node-b over $D/nfs
(logs: $D/node-a.log, $D/node-b.log).
Try:      $BG list --dir $D/node-a
          $BG restore <ID> --dir $D/node-a
          $BG check --dir $D/node-a
Clean up: umount $D/node-a $D/node-b && rm -r $D
EOT
if [ -n "$installed" ]; then
  echo "Installed from Debian for the demo: $installed (apt-get remove $installed to undo)"
else
  echo "No packages were installed."
fi
