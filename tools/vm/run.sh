#!/usr/bin/env bash
# Boot the sealfs test VM once and run a shell script inside it.
#
# Usage: tools/vm/run.sh [--disk IMAGE]... [--timeout SECONDS] [--work DIR] JOB.sh
# JOB.sh runs as root in the VM, chrooted into the host's root file system (read-only, shared
# over virtio-9p): the same cryptsetup, mkfs and Python as on the host, but a kernel with
# device-mapper. Everything but /run is the host's, read-only; /run is tmpfs and TMPDIR is
# /run/tmp; /run/sealfs-vm is the writable work directory shared with the host (JOB.sh can leave
# result files there). Disks appear as /dev/vda, /dev/vdb, ...
# The job's combined output is printed; the exit status is the job's (or 124 on timeout,
# 125 if the VM died without reporting one).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
disks=()
timeout=300
work=""
while [ $# -gt 1 ]; do
    case "$1" in
    --disk) disks+=("$2"); shift 2 ;;
    --timeout) timeout="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    *) echo "usage: $0 [--disk IMG]... [--timeout S] [--work DIR] JOB.sh" >&2; exit 2 ;;
    esac
done
[ $# -eq 1 ] || { echo "usage: $0 [--disk IMG]... [--timeout S] [--work DIR] JOB.sh" >&2; exit 2; }
job="$1"

QEMU="$(command -v qemu-system-x86_64 || true)"
[ -n "$QEMU" ] || { echo "sealfs-vm: qemu-system-x86_64 not found (apt-get install qemu-system-x86)" >&2; exit 3; }
cache="$("$HERE/build.sh")"

if [ -z "$work" ]; then
    work="$(mktemp -d /tmp/sealfs-vm.XXXXXX)"
    trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
cp "$job" "$work/job.sh"
rm -f "$work/rc" "$work/output"

drive_args=()
for d in "${disks[@]}"; do
    drive_args+=(-drive "file=$d,format=raw,if=virtio,cache=writeback")
done

# Software emulation (TCG). KVM would be faster but hangs (or aborts on an MSR) on the nested
# machines this was written for. Measured there: one vCPU is 2-3x faster than two (multi-
# threaded TCG contends with qemu's own threads on a 2-core host), and the plain qemu64 CPU
# model is about 2x faster than "max" (glibc then avoids AVX paths that TCG emulates slowly).
set +e
timeout --kill-after=10 "$timeout" "$QEMU" \
    -accel tcg -cpu qemu64 -smp 1 -m 1536 \
    -nodefaults -display none -no-reboot \
    -serial "file:$work/console.log" \
    -kernel "$cache/vmlinuz" -initrd "$cache/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 loglevel=4" \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$work,mount_tag=work,security_model=none" \
    "${drive_args[@]}"
qrc=$?
set -e
[ -f "$work/output" ] && cat "$work/output"
if [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then
    echo "sealfs-vm: timed out after ${timeout}s; console log:" >&2
    tail -n 30 "$work/console.log" >&2 || true
    exit 124
fi
if [ ! -f "$work/rc" ]; then
    echo "sealfs-vm: the VM stopped without a job result (qemu exit $qrc); console log:" >&2
    tail -n 30 "$work/console.log" >&2 || true
    exit 125
fi
exit "$(cat "$work/rc")"
