#!/usr/bin/env bash
# baseguard demo: sets everything up on a fresh Debian 12 machine (as root)
# and replays "the disappearing images" incident on two simulated compute
# nodes that share one instances directory. Leaves both mounts up to play
# with; `umount /tmp/baseguard-demo/node-a /tmp/baseguard-demo/node-b` ends it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: run as root (FUSE passthrough and per-caller credentials need it)" >&2
  exit 1
fi
need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
command -v cargo >/dev/null || { echo "demo: cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }
cargo build --release --quiet
BG="$PWD/target/release/baseguard"

D=/tmp/baseguard-demo
for m in "$D/node-a" "$D/node-b"; do
  if grep -q " $m fuse.baseguard" /proc/mounts; then umount "$m"; fi
done
rm -rf "$D" && mkdir -p "$D/nfs/_base" "$D/node-a" "$D/node-b"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Two compute nodes mount the shared instances directory through baseguard"
"$BG" mount "$D/nfs" "$D/node-a"
"$BG" mount "$D/nfs" "$D/node-b"
findmnt -t fuse.baseguard -o TARGET,SOURCE,FSTYPE

SHA=7b4783508212f5d242cbf9ff56fb8d33b4ce6166
UUID=6f1c2a8e-3b9d-4c4e-9a52-0c1d2e3f4a5b
say "Node B downloads a Glance image into _base and boots an instance on it"
qemu-img create -q -f raw "$D/node-b/_base/$SHA" 64M
qemu-io -f raw -c "write -P 0x42 0 8M" "$D/node-b/_base/$SHA" >/dev/null
mkdir "$D/node-b/$UUID"
qemu-img create -q -f qcow2 -F raw -b "$D/node-b/_base/$SHA" "$D/node-b/$UUID/disk"
qemu-img info --backing-chain "$D/node-b/$UUID/disk" | grep -E '^(image|backing file):'

say "Node B goes down; node A's image cache manager removes the 'unused' base file"
python3 -c "import os, sys; os.remove(sys.argv[1])" "$D/node-a/_base/$SHA"
ls -la "$D/node-a/_base/"
"$BG" list --dir "$D/node-a"

say "Node B comes back: qemu opens the instance disk and reads the original bytes"
sleep 1.5  # let node B's kernel attribute cache (1 s) expire, as NFS's would
qemu-io -f qcow2 -t none -c "read -P 0x42 0 8M" "$D/node-b/$UUID/disk"
ls -la "$D/node-b/_base/"

say "An unreferenced base file deleted the same way stays in the quarantine"
qemu-img create -q -f raw "$D/node-a/_base/0000000000000000000000000000000000000000" 1M
python3 -c "import os, sys; os.remove(sys.argv[1])" "$D/node-a/_base/0000000000000000000000000000000000000000"
"$BG" list --dir "$D/node-a"
"$BG" status --dir "$D/node-a" || true

cat <<EOT

The demo mounts are still up: $D/node-a and $D/node-b over $D/nfs.
Try: $BG list --dir $D/node-a ; $BG restore <ID> --dir $D/node-a ; $BG check --dir $D/node-a
End: umount $D/node-a $D/node-b
EOT
