#!/usr/bin/env bash
# Build (or reuse) the kernel + initramfs of the sealfs test VM.
#
# Why a VM: the machines sealfs is developed and tested on run a kernel without device-mapper,
# so `cryptsetup open` cannot map anything there. Debian's generic kernel has dm-crypt and
# dm-integrity as modules; booted under qemu (software emulation) it gives the LUKS tests a
# real device-mapper. The VM mounts the host's root file system read-only over virtio-9p, so
# it runs the very same cryptsetup, mkfs and Python/sealfs as the host; the initramfs only has
# busybox, the kernel modules and an init script.
#
# Usage: tools/vm/build.sh [CACHE_DIR]   (default: $SEALFS_VM_CACHE or /var/cache/sealfs-vm)
# Prints the cache directory on success. Nothing here is committed: artefacts are rebuilt from
# Debian packages when missing. Needs: apt-get, dpkg-deb, busybox (busybox-static), cpio.
set -euo pipefail

CACHE="${1:-${SEALFS_VM_CACHE:-/var/cache/sealfs-vm}}"
HERE="$(cd "$(dirname "$0")" && pwd)"
KPKG_META="${SEALFS_VM_KERNEL_META:-linux-image-amd64}"
FORMAT_VERSION=5 # bump when the initramfs layout or init script changes

# Modules the VM needs (dependencies are added automatically). Optional ones may be missing.
# overlay, fuse and virtio_net serve the systemd boot (tools/vm/boot.sh): a tmpfs overlay on
# the host root, sealfs's FUSE daemons, and the user-mode network to the host's KMS.
MODULES="virtio_pci virtio_blk 9pnet_virtio 9p loop dm-mod dm-crypt dm-integrity ext4 xts ecb
crypto_null crc32c_generic algif_skcipher algif_hash authenc overlay fuse virtio_net"
OPTIONAL_MODULES="aesni-intel crc32c-intel autofs4"

log() { echo "sealfs-vm: $*" >&2; }
die() { log "$*"; exit 1; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

stamp="$CACHE/ready"
want="format=$FORMAT_VERSION init=$(sha256sum "$HERE/init.sh" | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f "$CACHE/vmlinuz" ] &&
    [ -f "$CACHE/initramfs.cpio.gz" ]; then
    echo "$CACHE"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb gzip; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
BUSYBOX="$(command -v busybox || true)"
[ -n "$BUSYBOX" ] || die "busybox not found (apt-get install busybox-static)"
if ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked; install busybox-static"
fi

# Which kernel image package does the meta package point at?
resolve() { apt-cache depends "$KPKG_META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
download() { (cd "$work" && apt-get download "$1" >"$work/apt.log" 2>&1); }

work="$(mktemp -d "$CACHE/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
kpkg="$(resolve)"
deb=""
[ -n "$kpkg" ] && deb="$(ls "$CACHE"/"$kpkg"_*.deb 2>/dev/null | head -1 || true)"
if [ -z "$deb" ]; then
    if [ -z "$kpkg" ] || ! download "$kpkg"; then
        # Missing or stale apt lists (the mirror moved on to a newer kernel): refresh once.
        log "refreshing apt lists (apt-get update)"
        apt-get update -qq >&2
        kpkg="$(resolve)"
        [ -n "$kpkg" ] || die "cannot resolve the kernel package behind $KPKG_META"
        download "$kpkg" || { cat "$work/apt.log" >&2; die "apt-get download $kpkg failed"; }
    fi
    log "downloaded $kpkg"
    rm -f "$CACHE"/linux-image-*.deb
    mv "$work"/"$kpkg"_*.deb "$CACHE/"
    deb="$(ls "$CACHE"/"$kpkg"_*.deb | head -1)"
fi
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$work/kernel"
kver="$(ls "$work/kernel/lib/modules" | head -1)"
moddir="$work/kernel/lib/modules/$kver"
vmlinuz="$work/kernel/boot/vmlinuz-$kver"
[ -f "$vmlinuz" ] || die "no vmlinuz in $deb"

# Resolve modules and their dependencies into load order (dependencies first).
declare -A seen=()
order=()
find_module() {
    local name="$1" alt="${1//-/_}" alt2="${1//_/-}"
    find "$moddir/kernel" \( -name "$name.ko" -o -name "$alt.ko" -o -name "$alt2.ko" \) -print -quit
}
add_module() {
    local name="$1" optional="${2:-}" file deps dep
    file="$(find_module "$name")"
    if [ -z "$file" ]; then
        grep -q "/${name//-/[-_]}\.ko\$" "$moddir/modules.builtin" 2>/dev/null && return 0
        [ -n "$optional" ] && return 0
        die "kernel module $name not found in $kpkg"
    fi
    [ -n "${seen[$file]:-}" ] && return 0
    seen[$file]=1
    deps="$(tr '\0' '\n' <"$file" | sed -n 's/^depends=//p' | head -1)"
    for dep in ${deps//,/ }; do add_module "$dep"; done
    order+=("$file")
}
for m in $MODULES; do add_module "$m"; done
for m in $OPTIONAL_MODULES; do add_module "$m" optional; done

root="$work/initramfs"
mkdir -p "$root"/{bin,dev,proc,sys,host,mnt,modules}
cp "$BUSYBOX" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
: >"$root/modules/load-order"
for f in "${order[@]}"; do
    base="$(basename "$f")"
    cp "$f" "$root/modules/$base"
    echo "$base" >>"$root/modules/load-order"
done
install -m 0755 "$HERE/init.sh" "$root/init"
(cd "$root" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1) >"$work/initramfs.cpio.gz"

cp "$vmlinuz" "$work/vmlinuz"
mv -f "$work/vmlinuz" "$CACHE/vmlinuz"
mv -f "$work/initramfs.cpio.gz" "$CACHE/initramfs.cpio.gz"
echo "$kver" >"$CACHE/kernel-version"
echo "$want" >"$stamp"
log "built VM for kernel $kver in $CACHE (${#order[@]} modules)"
echo "$CACHE"
