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

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
vm_setup

# No -no-reboot: a reboot in the guest is a real reboot, in the same qemu.
set +e
vm_qemu "$timeout" "$work" \
    "console=ttyS0 panic=-1 loglevel=4 sealfs.boot=systemd systemd.show_status=1$mounts" \
    -netdev user,id=net0 -device virtio-net-pci,netdev=net0
qrc=$?
set -e
if [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then
    vm_report_timeout "$timeout" "$work"
    exit 124
fi
exit "$qrc"
