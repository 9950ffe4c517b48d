#!/usr/bin/env bash
# The real-hypervisor tier's host: libvirtd + QEMU from Debian's packages, started by hand when
# they are not running (no systemd here), then the test guest built (.ci/guest/build.sh).
# A daemon that does not come up is a clear failure, never a skip.
set -euo pipefail
need=()
for pkg in libvirt-daemon-system libvirt-daemon-config-nwfilter libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils \
    dnsmasq-base iproute2 iptables libxml2-utils genisoimage; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
if ((${#need[@]})); then
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
    }
fi
pgrep -x virtlogd >/dev/null || $sudo virtlogd -d
pgrep -x libvirtd >/dev/null || $sudo libvirtd -d
for _ in $(seq 1 60); do
    if $sudo virsh -c qemu:///system version >/dev/null 2>&1; then
        break
    fi
    sleep 1
done
if ! $sudo virsh -c qemu:///system version >/dev/null 2>&1; then
    echo "hypervisor: libvirtd did not answer on qemu:///system within 60 s" >&2
    exit 1
fi
"$(dirname "$0")/guest/build.sh" "${1:-var/guest}"
