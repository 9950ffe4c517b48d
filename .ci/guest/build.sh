#!/usr/bin/env bash
# The test guest of the real-hypervisor tier, built from Debian packages (nothing else is
# downloaded): the kernel of linux-image-*-amd64 and a busybox-static initramfs whose /init
# (.ci/guest/init) mounts the config drive, applies its network config, prints its meta-data
# and user data to the serial console, serves two tiny HTTP ports and powers off on ACPI.
#
#   .ci/guest/build.sh [OUT_DIR]     (default var/guest) -> OUT_DIR/vmlinuz, OUT_DIR/initrd.gz
#
# Rebuilt only when /init changed or the files are missing. The packages are downloaded with
# `apt-get download` into a scratch directory, never installed.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(realpath -m "${1:-var/guest}")"
stamp="$out/.init.sha256"
want="$(sha256sum "$here/init" | cut -d' ' -f1)"
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    exit 0
fi
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
kernel_pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
if [ -z "$kernel_pkg" ]; then
    apt-get update -qq
    kernel_pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
fi
apt-get download -qq "$kernel_pkg" busybox-static >/dev/null 2>&1 || {
    apt-get update -qq
    apt-get download -qq "$kernel_pkg" busybox-static
}
mkdir kernel busybox root
dpkg-deb --fsys-tarfile "$kernel_pkg"_*.deb | tar -x -C kernel --wildcards './boot/vmlinuz-*' './lib/modules/*'
dpkg-deb --fsys-tarfile busybox-static_*.deb | tar -x -C busybox ./bin/busybox
version="$(ls kernel/lib/modules)"
mkdir -p root/{bin,sbin,proc,sys,dev,tmp,cidata,www,lib/modules,etc/acpi/PWRF}
cp busybox/bin/busybox root/bin/busybox
for applet in $(root/bin/busybox --list); do
    [ -e "root/bin/$applet" ] || ln -s busybox "root/bin/$applet"
done
# The modules /init loads, in this order (REAL-HYPERVISOR.md): virtio, disks, NICs, the cdrom
# with its filesystem, and the power button.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net \
    scsi_common scsi_mod cdrom sr_mod libata ata_piix isofs evdev button; do
    found="$(find "kernel/lib/modules/$version" -name "$m.ko*" | head -1)"
    if [ -z "$found" ]; then
        continue  # built into this kernel
    fi
    case "$found" in
        *.ko.xz) xz -dc "$found" >"root/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$found" >"root/lib/modules/$m.ko" ;;
        *) cp "$found" "root/lib/modules/$m.ko" ;;
    esac
done
install -m 0755 "$here/init" root/init
printf '#!/bin/sh\necho "nephos-guest: power button, powering off"\npoweroff -f\n' >root/etc/acpi/PWRF/00000080
chmod 0755 root/etc/acpi/PWRF/00000080
(cd root && find . | ../busybox/bin/busybox cpio -o -H newc 2>/dev/null | gzip -9) >"$out/initrd.gz.part"
cp kernel/boot/vmlinuz-* "$out/vmlinuz.part"
chmod 0644 "$out/vmlinuz.part" "$out/initrd.gz.part"
mv "$out/vmlinuz.part" "$out/vmlinuz"
mv "$out/initrd.gz.part" "$out/initrd.gz"
echo "$want" >"$stamp"
echo "test guest: $kernel_pkg, $(du -h "$out/initrd.gz" | cut -f1) initramfs in $out"
