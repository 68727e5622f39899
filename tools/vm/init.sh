#!/bin/sh
# PID 1 of the sealfs test VM (busybox sh). Loads the modules, mounts the host's root file
# system read-only over virtio-9p plus a writable "work" share, runs work/job.sh (with bash
# when the host has it) chrooted into the host root, stores its output and exit status in the
# work share, and powers off.
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
