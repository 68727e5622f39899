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

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
vm_setup

if [ -z "$work" ]; then
    work="$(mktemp -d /tmp/sealfs-vm.XXXXXX)"
    trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
cp "$job" "$work/job.sh"
rm -f "$work/rc" "$work/output"

set +e
vm_qemu "$timeout" "$work" "console=ttyS0 quiet panic=-1 loglevel=4" -no-reboot
qrc=$?
set -e
[ -f "$work/output" ] && cat "$work/output"
if [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then
    vm_report_timeout "$timeout" "$work"
    exit 124
fi
if [ ! -f "$work/rc" ]; then
    echo "sealfs-vm: the VM stopped without a job result (qemu exit $qrc); console log:" >&2
    tail -n 30 "$work/console.log" >&2 || true
    exit 125
fi
exit "$(cat "$work/rc")"
