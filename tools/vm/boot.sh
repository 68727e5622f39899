#!/usr/bin/env bash
# Boot the sealfs test VM with systemd as PID 1, the way a confidential VM boots.
#
# Usage: tools/vm/boot.sh [--disk IMAGE]... [--mount DEV:DIR]... [--timeout SECONDS] WORK_DIR
# The root file system is the host's own (shared read-only over virtio-9p: the same systemd,
# cryptsetup, Python and sealfs) under a tmpfs overlay, so every boot starts from the host's
# files plus WORK_DIR/overlay/ (copied onto the root before systemd starts: units, masks,
# configs). WORK_DIR itself is shared read-write at /sealfs-vm, where the booted
# system leaves its results. Disks appear as /dev/vda, /dev/vdb, ...; --mount mounts one (a
# file system made on the host) on DIR before systemd starts (the host root may lack udev,
# and systemd would wait for an fstab device forever). The host is 10.0.2.2 on qemu's
# user-mode network (a KMS listening on the host's 127.0.0.1 is reachable there).
#
# A reboot inside the VM (`systemctl reboot`) boots again in the same qemu, overlay copied
# afresh; the guest powering off ends the run. The console (kernel and systemd) is in
# WORK_DIR/console.log. Exit status: 0 when the guest powered off, 124 on timeout.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
usage="usage: $0 [--disk IMG]... [--mount DEV:DIR]... [--timeout S] WORK_DIR"
disks=()
mounts=""
timeout=600
while [ $# -gt 1 ]; do
    case "$1" in
    --disk) disks+=("$2"); shift 2 ;;
    --mount) mounts="$mounts sealfs.mount=$2"; shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    *) echo "$usage" >&2; exit 2 ;;
    esac
done
[ $# -eq 1 ] || { echo "$usage" >&2; exit 2; }
work="$(cd "$1" && pwd)"

QEMU="$(command -v qemu-system-x86_64 || true)"
[ -n "$QEMU" ] || { echo "sealfs-vm: qemu-system-x86_64 not found (apt-get install qemu-system-x86)" >&2; exit 3; }
cache="$("$HERE/build.sh")"

drive_args=()
for d in "${disks[@]}"; do
    drive_args+=(-drive "file=$d,format=raw,if=virtio,cache=writeback")
done

# TCG, one vCPU, qemu64: see run.sh for why. No -no-reboot: a guest reboot is a real reboot.
set +e
timeout --kill-after=10 "$timeout" "$QEMU" \
    -accel tcg -cpu qemu64 -smp 1 -m 1536 \
    -nodefaults -display none \
    -serial "file:$work/console.log" \
    -kernel "$cache/vmlinuz" -initrd "$cache/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4 sealfs.boot=systemd systemd.show_status=1$mounts" \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$work,mount_tag=work,security_model=none" \
    -netdev user,id=net0 -device virtio-net-pci,netdev=net0 \
    "${drive_args[@]}"
qrc=$?
set -e
if [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then
    echo "sealfs-vm: timed out after ${timeout}s; console log:" >&2
    tail -n 40 "$work/console.log" >&2 || true
    exit 124
fi
exit "$qrc"
