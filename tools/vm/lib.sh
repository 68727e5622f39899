# shellcheck shell=bash
# What tools/vm/run.sh and tools/vm/boot.sh share (sourced, not run): finding qemu, building
# the kernel and initramfs, and the qemu command line of the test VM.

VM_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Sets QEMU and VM_CACHE (the built kernel and initramfs), or exits 3 without qemu.
vm_setup() {
    QEMU="$(command -v qemu-system-x86_64 || true)"
    if [ -z "$QEMU" ]; then
        echo "sealfs-vm: qemu-system-x86_64 not found (apt-get install qemu-system-x86)" >&2
        exit 3
    fi
    VM_CACHE="$("$VM_HERE/build.sh")"
}

# vm_qemu TIMEOUT WORK_DIR KERNEL_ARGS [QEMU_ARG...]: boot the VM with the disks in the array
# `disks`, the host root and WORK_DIR shared over 9p, the console in WORK_DIR/console.log.
# Returns qemu's status (124 or 137 when TIMEOUT ran out).
#
# Software emulation (TCG). KVM would be faster but hangs (or aborts on an MSR) on the nested
# machines this was written for. Measured there: one vCPU is 2-3x faster than two (multi-
# threaded TCG contends with qemu's own threads on a 2-core host), and the plain qemu64 CPU
# model is about 2x faster than "max" (glibc then avoids AVX paths that TCG emulates slowly).
vm_qemu() {
    local timeout="$1" work="$2" append="$3" d
    shift 3
    local drive_args=()
    # shellcheck disable=SC2154 # the caller's array
    for d in "${disks[@]}"; do
        drive_args+=(-drive "file=$d,format=raw,if=virtio,cache=writeback")
    done
    timeout --kill-after=10 "$timeout" "$QEMU" \
        -accel tcg -cpu qemu64 -smp 1 -m 1536 \
        -nodefaults -display none \
        -serial "file:$work/console.log" \
        -kernel "$VM_CACHE/vmlinuz" -initrd "$VM_CACHE/initramfs.cpio.gz" \
        -append "$append" \
        -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
        -virtfs "local,path=$work,mount_tag=work,security_model=none" \
        "$@" "${drive_args[@]}"
}

# vm_report_timeout TIMEOUT WORK_DIR
vm_report_timeout() {
    echo "sealfs-vm: timed out after ${1}s; console log:" >&2
    tail -n 40 "$2/console.log" >&2 || true
}
