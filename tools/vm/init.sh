#!/bin/sh
# PID 1 of the sealfs test VM (busybox sh). Loads the modules, mounts the host's root file
# system read-only over virtio-9p plus a writable "work" share, and then either
# - (default, tools/vm/run.sh) runs work/job.sh (with bash when the host has it) chrooted into
#   the host root, stores its output and exit status in the work share, and powers off; or
# - (kernel argument sealfs.boot=systemd, tools/vm/boot.sh) stacks a tmpfs overlay on the host
#   root, copies work/overlay/ into it, brings up the user-mode network and switches root to
#   /sbin/init: systemd as PID 1, the way a CVM boots.
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r m; do
    insmod "/modules/$m" 2>/dev/null || echo "sealfs-vm: insmod $m failed" >/dev/console
done </modules/load-order
opts=trans=virtio,version=9p2000.L,msize=512000
if ! mount -t 9p -o "$opts,ro,cache=loose" hostroot /host; then
    echo "sealfs-vm: cannot mount the host root" >/dev/console
    poweroff -f
fi
if grep -qw sealfs.boot=systemd /proc/cmdline; then
    # The host root stays read-only underneath; everything the booted system writes goes to
    # the tmpfs upper layer and is gone at the next boot (like a CVM's ephemeral root). Only
    # the virtual disks and the work share persist across a reboot.
    mkdir -p /rw /newroot
    mount -t tmpfs -o mode=0755 rw /rw
    mkdir -p /rw/upper /rw/work
    if ! mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot; then
        echo "sealfs-vm: cannot mount the overlay root" >/dev/console
        poweroff -f
    fi
    # The host may be a container: systemd would see its marker file, believe it runs in a
    # container and skip udev and the like. This VM is a machine of its own.
    rm -f /newroot/.dockerenv /newroot/run/.containerenv
    mkdir -p /newroot/sealfs-vm
    mount -t 9p -o "$opts" work /newroot/sealfs-vm
    [ -d /newroot/sealfs-vm/overlay ] && cp -a /newroot/sealfs-vm/overlay/. /newroot/
    # Disks to mount before systemd starts (sealfs.mount=DEV:DIR): the host root may have no
    # udev, and without it systemd would wait in vain for an fstab entry's device unit.
    read -r cmdline </proc/cmdline
    for arg in $cmdline; do
        case "$arg" in
        sealfs.mount=*:*)
            spec="${arg#sealfs.mount=}"
            mkdir -p "/newroot${spec#*:}"
            mount "${spec%%:*}" "/newroot${spec#*:}" ||
                echo "sealfs-vm: cannot mount ${spec%%:*} on ${spec#*:}" >/dev/console
            ;;
        esac
    done
    # qemu's user-mode network: the host is 10.0.2.2.
    ip link set lo up
    if ip link set eth0 up 2>/dev/null; then
        ip addr add 10.0.2.15/24 dev eth0
        ip route add default via 10.0.2.2
    fi
    echo "sealfs-vm: switching root to systemd" >/dev/console
    for fs in dev proc sys; do mount --move "/$fs" "/newroot/$fs"; done
    exec switch_root /newroot /sbin/init
fi
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
# Scratch space is /run (tmpfs, TMPDIR points there). The host's /tmp stays visible, read-only,
# because the repository under test may live there.
mount -t tmpfs -o mode=0755 run /host/run
mkdir -p /host/run/sealfs-vm /host/run/tmp
chmod 1777 /host/run/tmp
mount -t 9p -o "$opts" work /host/run/sealfs-vm
echo "sealfs-vm: running job" >/dev/console
shell=/bin/sh
[ -x /host/bin/bash ] && shell=/bin/bash
chroot /host /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/run/tmp TMPDIR=/run/tmp LANG=C.UTF-8 TERM=dumb \
    "$shell" -c "cd /run/tmp && exec $shell /run/sealfs-vm/job.sh" \
    >/host/run/sealfs-vm/output 2>&1 </dev/null
echo "$?" >/host/run/sealfs-vm/rc
sync
umount /host/run/sealfs-vm
echo "sealfs-vm: job done" >/dev/console
poweroff -f
