"""The real-hypervisor tier: an agent on ``qemu:///system`` (libvirtd + QEMU, software
emulation) boots the test guest built by ``.ci/guest/build.sh`` from Debian's packages. The VM
is created through the API, reads its config drive (user data, SSH key, addresses) and the metadata
service through its host's proxy, cannot forge its address, serves HTTP
on its private address behind its firewall (libvirt nwfilter: closed until opened, closed
again), and every lifecycle action drives the real domain while the database follows -- a
guest that powers itself off included.

``make test`` starts libvirtd (``.ci/hypervisor.sh``); in CI a daemon that does not answer is a
failure here, never a skip. At most one guest runs at a time in this file; every address the
test sends traffic to is the guest it booted, on an isolated network it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import libvirt
import pytest

from app.backend.driver import nat_apply
from tests.api.helpers import expected_usage
from tests.e2e.inprocess import ADMIN, Cloud, inprocess_cloud

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GUEST = ROOT / "var" / "guest"
URI = "qemu:///system"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx1Y2t5LW5lcGhvcy10ZXN0LWtleS0wMDAwMDAwMDAw tester@nephos"


def _hypervisor() -> libvirt.virConnect:
    """libvirtd on this machine; in CI its absence fails the test (``make test`` starts it)."""
    try:
        return libvirt.open(URI)
    except libvirt.libvirtError as exc:
        message = f"libvirtd is not answering on {URI} ({exc}); run .ci/hypervisor.sh (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _free_cidr(conn: libvirt.virConnect) -> str:
    """A /24 no network on this host (ours from earlier runs included) overlaps."""
    from xml.etree import ElementTree as ET

    taken = []
    for net in conn.listAllNetworks():
        for ip in ET.fromstring(net.XMLDesc(0)).findall("ip"):
            if ip.get("address") and ip.get("netmask"):
                taken.append(ipaddress.IPv4Network(f"{ip.get('address')}/{ip.get('netmask')}", strict=False))
    for third in range(0, 256):
        candidate = ipaddress.IPv4Network(f"10.231.{third}.0/24")
        if not any(candidate.overlaps(t) for t in taken):
            return str(candidate)
    raise AssertionError("no free /24 in 10.231.0.0/16 on this host")


def _drop_nat_rules(mark: str) -> None:
    """The host's nat rules carrying ``mark`` (a network's metadata redirect) go with it."""
    listed = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        if line.startswith("-A ") and (f'"{mark}"' in line or f" {mark} " in line):
            subprocess.run(["iptables", "-w", "-t", "nat", *shlex.split(line.replace("-A ", "-D ", 1))], check=False)


@pytest.fixture
async def qemu_cloud(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Cloud, Path, list[str]]]:
    conn = _hypervisor()
    if not (GUEST / "vmlinuz").exists():
        pytest.fail(f"the test guest is not built: run .ci/guest/build.sh {GUEST}")
    # QEMU runs as libvirt-qemu: its files live where it can reach them (pytest's tmp is 0700).
    store = Path("/var/lib/nephos-test") / uuid.uuid4().hex[:12]
    networks: list[str] = []
    with socket.socket() as probe:  # a free port for this test's metadata proxy
        probe.bind(("127.0.0.1", 0))
        proxy_port = probe.getsockname()[1]
    for sub in ("images", "instances"):
        (store / sub).mkdir(parents=True)
    for d in (store.parent, store, store / "images", store / "instances"):
        d.chmod(0o755)
    try:
        async with inprocess_cloud(
            request,
            tmp_path,
            mode="production",  # PostgreSQL + RabbitMQ, as production runs
            agents={"qemu-1": URI},
            domain_type="qemu",
            image_dir=store / "images",
            instance_dir=store / "instances",
            stop_timeout=30.0,
            job_deadline_seconds=120,
            serve_http=True,  # the metadata proxy calls the API over HTTP
            metadata_proxy_key="qemu-tier-proxy-key",
            metadata_proxy_port=proxy_port,
        ) as cloud:
            yield cloud, store, networks
    finally:
        for name in networks:  # the libvirt networks this test's VMs made on the host
            with contextlib.suppress(libvirt.libvirtError):
                net = conn.networkLookupByName(name)
                if net.isActive():
                    net.destroy()
                net.undefine()
            _drop_nat_rules(f"nephos:net:{name.removeprefix('nephos-')}")
        for dom in conn.listAllDomains():
            if dom.name().startswith("nephos-") and (store / "instances" / f"{dom.UUIDString()}.qcow2").exists():
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
                with contextlib.suppress(libvirt.libvirtError):  # its firewall, if destroy did not run
                    conn.nwfilterLookupByUUIDString(dom.UUIDString()).undefine()
                nat_apply(uuid.UUID(dom.UUIDString()), [])  # its public addresses' rules, likewise
        conn.close()
        shutil.rmtree(store, ignore_errors=True)


async def _api(cloud: Cloud, method: str, path: str, expect: int, headers: dict[str, str] = ADMIN, **kw: Any) -> Any:
    r = await cloud.client.request(method, path, headers=headers, **kw)
    assert r.status_code == expect, r.text
    return r.json() if r.content else None


async def _settled(cloud: Cloud, sid: str, operstate: str, timeout: float = 120) -> dict[str, Any]:
    async def there() -> dict[str, Any] | None:
        s = await cloud.server(sid)
        return s if s["operstate"] == operstate and s["task"] is None else None

    return await cloud.until(f"{sid} {operstate}", there, timeout)  # type: ignore[no-any-return]


async def _console(store: Path, sid: str, line: str, count: int = 1, timeout: float = 120) -> str:
    log = store / "instances" / f"{sid}.console.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if text.count(line) >= count:
            return text
        await asyncio.sleep(0.5)
    raise AssertionError(f"the console never said {line!r} ({count}x):\n{text[-3000:]}")


async def _final(cloud: Cloud, job_id: str) -> dict[str, Any] | None:
    job: dict[str, Any] = await _api(cloud, "GET", f"/api/v1/jobs/{job_id}", 200)
    return job if job["status"] in ("SUCCESS", "ERROR") else None


async def _answers(ip: str, port: int, want: str | None = None, tries: int = 6) -> bool:
    """Does the guest's HTTP port answer (``want`` as its page)? A few tries, 1 s each: a
    dropped port times out, bounded in count and time."""
    async with httpx.AsyncClient(timeout=1.0) as http:
        for _ in range(tries):
            try:
                page = await http.get(f"http://{ip}:{port}/")
            except httpx.TransportError:
                await asyncio.sleep(0.3)
                continue
            return want is None or page.text.strip() == want
    return False


def _free_public_pool() -> str:
    """A /28 of TEST-NET-3 that no NAT rule on this host uses (a run killed before its cleanup
    may have left one behind)."""
    rules = subprocess.run(["iptables", "-w", "-t", "nat", "-S"], capture_output=True, text=True).stdout
    used = set(re.split(r"[\s/:]", rules))
    for pool in ipaddress.IPv4Network("203.0.113.0/24").subnets(new_prefix=28):
        if not any(str(host) in used for host in pool):
            return str(pool)
    raise AssertionError("every /28 of 203.0.113.0/24 has NAT rules on this host")


class Outside:
    """A network namespace standing for the world outside the host: a veth pair on TEST-NET-2
    (198.51.100.0/24) with a route to the public pool (TEST-NET-3) through the host."""

    def __init__(self, ns: str) -> None:
        self.ns = ns

    async def answers(self, ip: str, port: int, want: str | None = None, tries: int = 4) -> bool:
        """Does ``ip:port`` answer from outside (``want`` as its page)? Bounded: a few tries, 2 s each."""
        fetch = (
            "import sys, urllib.request\n"
            "try:\n"
            f"    print(urllib.request.urlopen('http://{ip}:{port}/', timeout=2).read().decode().strip())\n"
            "except Exception as exc:\n"
            "    sys.exit(f'no answer: {exc}')\n"
        )
        for _ in range(tries):
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", self.ns, sys.executable, "-c", fetch,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            out, _ = await asyncio.wait_for(proc.communicate(), 10)
            if proc.returncode == 0:
                return want is None or out.decode().strip() == want
            await asyncio.sleep(0.3)
        return False


@contextlib.contextmanager
def _outside() -> Iterator[Outside]:
    tag = uuid.uuid4().hex[:6]
    ns, host_end, ns_end = f"nphns-{tag}", f"nphvh{tag}", f"nphvn{tag}"
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    was = forward.read_text().strip()

    def run(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True)

    try:
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        run("ip", "link", "set", ns_end, "netns", ns)
        run("ip", "addr", "add", "198.51.100.1/24", "dev", host_end)
        run("ip", "link", "set", host_end, "up")
        inside = ("ip", "netns", "exec", ns)
        run(*inside, "ip", "addr", "add", "198.51.100.2/24", "dev", ns_end)
        run(*inside, "ip", "link", "set", ns_end, "up")
        run(*inside, "ip", "link", "set", "lo", "up")
        run(*inside, "ip", "route", "add", "203.0.113.0/24", "via", "198.51.100.1")
        forward.write_text("1")  # the host routes (an operator's public addresses need it)
        yield Outside(ns)
    finally:
        forward.write_text(was)
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


async def test_a_real_guest_boots_reads_its_config_drive_is_reachable_and_follows_every_action(
    qemu_cloud: tuple[Cloud, Path, list[str]],
) -> None:
    cloud, store, host_networks = qemu_cloud
    image = await _api(cloud, "POST", "/api/v1/admin/images", 201, json={"name": "nephos-guest", "disk_format": "raw"})
    for src, suffix in (("vmlinuz", "kernel"), ("initrd.gz", "initrd")):
        target = store / "images" / f"{image['id']}.{suffix}"
        shutil.copyfile(GUEST / src, target)
        target.chmod(0o644)
    project = await _api(cloud, "POST", "/api/v1/admin/projects", 201, json={"name": "qemu"})
    made = await _api(cloud, "POST", "/api/v1/admin/users", 201, json={"name": "q", "project_id": project["id"]})
    user = {"Authorization": f"Bearer {made['token']}"}
    await _api(cloud, "POST", "/api/v1/keypairs", 201, user, json={"name": "k", "public_key": KEY})
    conn = libvirt.open(URI)
    cidr = _free_cidr(conn)
    lab = await _api(cloud, "POST", "/api/v1/networks", 201, user, json={"name": "lab", "cidr": cidr})
    host_networks.append(f"nephos-{lab['id']}")
    body = {
        "name": "guest",
        "flavor": "tiny",
        "image": "nephos-guest",
        "key_name": "k",
        "networks": ["lab"],
        "user_data": "#!/bin/sh\necho user-data-ran-in-the-guest\n",
    }
    created = await _api(cloud, "POST", "/api/v1/servers", 202, user, json=body)
    vm = created["servers"][0]
    sid, ip, mac = vm["id"], vm["addresses"][0]["ip"], vm["addresses"][0]["mac"]
    await _settled(cloud, sid, "STARTED")

    # The guest read its config drive and took its address from it.
    log = await _console(store, sid, "nephos-guest: ready")
    assert f"instance-id: {vm['ec2_id']}" in log
    assert KEY in log
    assert "echo user-data-ran-in-the-guest" in log
    assert f"nephos-guest: address eth0 {ip}/24 {mac}" in log
    await _console(store, sid, "user-data-ran-in-the-guest\n", count=2)  # printed, then run

    # It cannot pose as another address (the metadata proxy knows VMs by their addresses).
    assert "nephos-guest: ping from its own address: ok" in log
    assert "nephos-guest: ping from a forged address: no answer" in log
    # It read the metadata service at 169.254.169.254 through its host's proxy (IMDSv2: a token
    # first; without one the answer is 401), and the proxy vouched for it by its address.
    assert f"nephos-guest: metadata instance-id {vm['ec2_id']}" in log
    assert f"nephos-guest: metadata local-ipv4 {ip}" in log
    assert f"nephos-guest: metadata mac {mac}" in log
    assert "nephos-guest: metadata without a token: wget: server returned error: HTTP/1.1 401" in log
    # A request the proxy cannot attribute to a VM gets nothing: the host itself, on the
    # network's gateway, and anything not arriving on a Nephos network.
    port = cloud.plane.settings.metadata_proxy_port
    async with httpx.AsyncClient(timeout=5) as http:
        for where in (lab["gateway"], "127.0.0.1"):
            r = await http.put(
                f"http://{where}:{port}/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"}
            )
            assert (r.status_code, r.text) == (403, ""), where

    # Inbound is closed until a port is opened; then the host reaches it on the private address,
    # and a closed port is unreachable again while another opened one still answers.
    async def firewall(op: str, port: int) -> None:
        reply = await _api(
            cloud, "POST", f"/api/v1/servers/{sid}/firewall", 202, user, json={op: {"protocol": "tcp", "port": port}}
        )
        job = await cloud.until("the firewall job", lambda: _final(cloud, reply["job_id"]), timeout=60)
        assert job["status"] == "SUCCESS", job.get("error")

    assert not await _answers(ip, 80)
    await firewall("open", 80)
    await firewall("open", 8080)
    assert await _answers(ip, 80, want=f"nephos-guest {vm['ec2_id']}")
    assert await _answers(ip, 8080, want=f"nephos-guest {vm['ec2_id']}")
    await firewall("close", 80)
    assert not await _answers(ip, 80)
    assert await _answers(ip, 8080, want=f"nephos-guest {vm['ec2_id']}")

    async def act(action: str, operstate: str) -> dict[str, Any]:
        reply = await _api(cloud, "POST", f"/api/v1/servers/{sid}/actions", 202, user, json={"action": action})
        await _settled(cloud, sid, operstate)
        return await _api(cloud, "GET", f"/api/v1/jobs/{reply['job_id']}", 200)  # type: ignore[no-any-return]

    # A public IP: a machine outside the VM's network (a network namespace this test made,
    # routed through the host) reaches the open port at the public address; once the address
    # is disassociated, it does not.
    pool = _free_public_pool()
    await _api(cloud, "POST", "/api/v1/admin/public-ip-pools", 201, json={"name": "lab", "cidr": pool})
    eip = await _api(cloud, "POST", "/api/v1/public-ips", 201, user, json={})
    reply = await _api(cloud, "POST", f"/api/v1/public-ips/{eip['id']}/associate", 202, user, json={"server_id": sid})
    job = await cloud.until("the association", lambda: _final(cloud, reply["job_id"]), timeout=60)
    assert job["status"] == "SUCCESS", job.get("error")
    with _outside() as outside:
        assert await outside.answers(eip["address"], 8080, want=f"nephos-guest {vm['ec2_id']}")
        assert not await outside.answers(eip["address"], 80)  # its firewall still holds
        # Its config drive was made anew with the public address: the guest reads it at its next
        # boot (the new drive went into its cdrom drive while it ran).
        await act("reboot", "STARTED")
        boot = (await _console(store, sid, "nephos-guest: ready", count=2)).rsplit("nephos-guest: booting", 1)[1]
        assert f"public-ipv4: {eip['address']}" in boot
        assert await outside.answers(eip["address"], 8080, want=f"nephos-guest {vm['ec2_id']}")
        reply = await _api(cloud, "POST", f"/api/v1/public-ips/{eip['id']}/disassociate", 202, user)
        job = await cloud.until("unmapped", lambda: _final(cloud, reply["job_id"]), timeout=60)
        assert job["status"] == "SUCCESS", job.get("error")
        assert not await outside.answers(eip["address"], 8080)
    await _api(cloud, "DELETE", f"/api/v1/public-ips/{eip['id']}", 204, user)

    # Every action drives the real domain, and the database follows.
    dom = conn.lookupByUUIDString(sid)

    stop = await act("stop", "STOPPED")
    assert not dom.isActive() and stop["status"] == "SUCCESS"
    assert not (stop.get("details") or {}).get("forced"), stop  # the guest answered the power button
    await act("start", "STARTED")
    boot = (await _console(store, sid, "nephos-guest: ready", count=3)).rsplit("nephos-guest: booting", 1)[1]
    assert "public-ipv4" not in boot and "instance-id" in boot  # disassociated: the drive says so
    await act("reboot", "STARTED")
    await _console(store, sid, "nephos-guest: ready", count=4)
    await act("suspend", "SUSPENDED")
    assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
    await act("resume", "STARTED")
    assert dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    # A guest that powers itself off (its power button pressed behind Nephos's back): STOPPED,
    # with its quota moved.
    dom.shutdown()
    await _settled(cloud, sid, "STOPPED")
    quotas = await _api(cloud, "GET", "/api/v1/quotas", 200, user)
    assert {k: v["usage"] for k, v in quotas.items() if k in expected_usage("STOPPED")} == expected_usage(
        "STOPPED", (1, 512, 1)
    )

    await act("destroy", "DESTROYED")
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByUUIDString(sid)
    assert (await cloud.server(sid))["addresses"] == []
    conn.close()
