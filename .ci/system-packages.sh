#!/usr/bin/env bash
# Debian packages the install needs (with --test: what the tests add); installs only what is missing.
set -euo pipefail
need=()
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv python3-pip)
command -v gcc >/dev/null || need+=(build-essential python3-dev)
# libvirt-python compiles against libvirt's headers, found through pkg-config.
pkg-config --exists libvirt 2>/dev/null || need+=(libvirt-dev pkg-config)
dpkg -s python3-dev >/dev/null 2>&1 || need+=(python3-dev)
if [ "${1:-}" = "--test" ]; then
    # Tests only: Debian's chromium renders the pages a person sees (tests/api/test_docs_page.py,
    # and the dashboard, driven by Playwright: tests/e2e/test_dashboard.py).
    need=()
    command -v chromium >/dev/null || need+=(chromium)
fi
if ((${#need[@]})); then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
