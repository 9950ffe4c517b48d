"""The libvirt driver of an agent: domain XML and every action of the operstate table.

Every libvirt call runs on a worker thread (``_call``), never on the event loop. Every action
is idempotent: a job whose effect is already there succeeds again (a redelivered job, or one
the dispatcher re-sent), and destroying a missing domain succeeds. Errors are libvirt's own
``libvirtError``; the agent reports their text.

Domains are named ``nephos-<server id>`` with the server id as their UUID, and carry Nephos's
mark: a ``<nephos:vm>`` metadata element (namespace ``NS``) whose ``<nephos:server>`` names that
id. A domain without the mark is not Nephos's: it is reported, never repaired. On libvirt's
``test://`` driver (the embedded hypervisor) there are no disks and no real migration; on
``qemu://`` a VM boots from a qcow2 overlay of its image, and migrations use
``migrateToURI3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from xml.etree import ElementTree as ET

import libvirt

from app.messages import DomainInfo, DomainState

log = logging.getLogger("nephos.agent")
T = TypeVar("T")
NS = "https://nephos.dev/xmlns/vm/1"

_STATES: dict[int, DomainState] = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",  # shutting down: still running until it is off
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
}


_TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"


def _silence_libvirt_stderr() -> None:
    # libvirt prints every error to stderr by default; they are reported through jobs instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def test_node_xml(cpus: int, ram_mb: int) -> str:
    """A private node for libvirt's test driver with this many CPUs and this much memory."""
    return (
        f"<node><cpu><mhz>2000</mhz><model>x86_64</model><active>{cpus}</active><nodes>1</nodes>"
        f"<sockets>1</sockets><cores>{cpus}</cores><threads>1</threads></cpu>"
        f"<memory>{ram_mb * 1024}</memory></node>"
    )


_DOMAIN = re.compile(r"<domain\b.*?</domain>", re.S)
_NETWORK = re.compile(r"<network\b.*?</network>", re.S)
#: Names of the libvirt networks Nephos makes: ``nephos-<network id>``.
NETWORK_PREFIX = "nephos-"
NET_NS = "https://nephos.dev/xmlns/network/1"
FW_NS = "https://nephos.dev/xmlns/firewall/1"
NAT_NS = "https://nephos.dev/xmlns/nat/1"
#: The host's NAT chains for public IPs (nat table), jumped to from PREROUTING and OUTPUT
#: (DNAT) and POSTROUTING (SNAT); every rule carries the comment ``nephos:<server id>``.
DNAT_CHAIN, SNAT_CHAIN = "NEPHOS-DNAT", "NEPHOS-SNAT"
#: The filter table's chain, first in FORWARD, that lets mapped connections be routed in.
FWD_CHAIN = "NEPHOS-FWD"
#: Guests' metadata requests (``169.254.169.254:80`` arriving on a Nephos bridge) are sent to the
#: host's metadata proxy on that network's gateway address, by DNAT rules in this chain (nat
#: table, jumped to from PREROUTING), each with the comment ``nephos:net:<network id>``.
META_CHAIN = "NEPHOS-META"
METADATA_ADDRESS = "169.254.169.254"


def write_test_node(directory: Path, name: str, cpus: int, ram_mb: int) -> str:
    """The node file of a simulated host; the domains a previous agent left in it stay (the
    simulated hypervisor outlives its agent, as libvirtd does)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.xml"
    text = path.read_text() if path.exists() else ""
    kept = _NETWORK.findall(text) + _DOMAIN.findall(text)
    _write_atomically(path, test_node_xml(cpus, ram_mb).replace("</node>", "".join(kept) + "</node>"))
    return f"test://{path.resolve()}"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def network_name(nic: dict[str, Any]) -> str:
    return f"{NETWORK_PREFIX}{nic['network_id']}"


def network_xml(nic: dict[str, Any]) -> str:
    """A Nephos network on a host: its own bridge, the gateway address, DHCP for reserved
    addresses only, no forwarding (isolated), and the mark."""
    net = ipaddress.IPv4Network(str(nic["cidr"]))
    root = ET.Element("network")
    ET.SubElement(root, "name").text = network_name(nic)
    meta = ET.SubElement(ET.SubElement(root, "metadata"), f"{{{NET_NS}}}network")
    ET.SubElement(meta, f"{{{NET_NS}}}id").text = str(nic["network_id"])  # the mark
    ET.SubElement(meta, f"{{{NET_NS}}}name").text = str(nic.get("network", ""))
    ET.SubElement(root, "bridge", name=str(nic["bridge"]), stp="on", delay="0")
    ip = ET.SubElement(root, "ip", address=str(nic["gateway"]), netmask=str(net.netmask))
    ET.SubElement(ip, "dhcp")
    ET.register_namespace("nephosnet", NET_NS)
    return ET.tostring(root, encoding="unicode")


def config_drive_files(server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, str]:
    """What a VM's config drive holds (cloud-init NoCloud): its identity and keys, its user data,
    and its addresses as network-config version 2 (the first NIC carries the default route)."""
    keys = [str(p["ssh_key"]).strip()] if p.get("ssh_key") else []
    meta = [
        f"instance-id: {p.get('ec2_id') or server_id}",
        f"local-hostname: {_hostname(str(p.get('name') or server_id))}",
        f"nephos-server-id: {server_id}",
    ]
    if keys:
        meta.append("public-keys:")
        meta += [f'  - "{k}"' for k in keys]
    if p.get("public_ips"):  # the first NIC's public address (EC2's public-ipv4)
        meta.append(f"public-ipv4: {p['public_ips'][0]['public']}")
    net = ["version: 2", "ethernets:"]
    for i, nic in enumerate(p.get("nics") or []):
        prefix = ipaddress.IPv4Network(str(nic["cidr"])).prefixlen
        net += [
            f"  nic{i}:",
            "    match:",
            f'      macaddress: "{nic["mac"]}"',
            "    addresses:",
            f"      - {nic['ip']}/{prefix}",
        ]
        if i == 0:
            net.append(f"    gateway4: {nic['gateway']}")
    return {
        "meta-data": "\n".join(meta) + "\n",
        "user-data": str(p.get("user_data") or ""),
        "network-config": "\n".join(net) + "\n",
    }


def filter_name(server_id: uuid.UUID) -> str:
    return f"nephos-{server_id}"


def filter_xml(server_id: uuid.UUID, rules: list[dict[str, Any]]) -> str:
    """A VM's nwfilter: no spoofing (libvirt's ``clean-traffic``: the NIC's own MAC and address
    only, no forged ARP, no other layer-2 traffic), outbound allowed (replies come back:
    libvirt's rules are stateful), inbound allowed where a rule says, every other inbound packet
    dropped. Spoofing matters beyond the VM: the metadata proxy knows a VM by its address."""
    root = ET.Element("filter", name=filter_name(server_id), chain="root")
    ET.SubElement(root, "uuid").text = str(server_id)  # the same on every redefinition
    ET.SubElement(root, "filterref", filter="clean-traffic")
    ET.SubElement(ET.SubElement(root, "rule", action="accept", direction="out", priority="100"), "all")
    for rule in rules:
        net = ipaddress.IPv4Network(str(rule["cidr"]), strict=False)
        attrs = {"srcipaddr": str(net.network_address), "srcipmask": str(net.prefixlen)}
        if rule["protocol"] in ("tcp", "udp") and int(rule["port_min"]) > 0:
            attrs.update(dstportstart=str(rule["port_min"]), dstportend=str(rule["port_max"]))
        el = ET.SubElement(root, "rule", action="accept", direction="in", priority="200")
        ET.SubElement(el, str(rule["protocol"]), attrs)
    ET.SubElement(ET.SubElement(root, "rule", action="drop", direction="in", priority="900"), "all")
    return ET.tostring(root, encoding="unicode")


def firewall_metadata(rules: list[dict[str, Any]], generation: int | None) -> str:
    """The rules as the domain records them, with their generation (the inventory reports it,
    and reconciliation compares it with the VM's)."""
    root = ET.Element("firewall", {"generation": str(generation or 0)})
    for rule in rules:
        ET.SubElement(root, "rule", {k: str(rule[k]) for k in ("protocol", "port_min", "port_max", "cidr")})
    return ET.tostring(root, encoding="unicode")


def _iptables(*args: str, table: str = "nat", check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "-t", table, *args], check=check, capture_output=True, text=True)


def _own_chain(chain: str, hooks: tuple[str, ...], *, table: str = "nat", first: bool = False) -> None:
    """Nephos's chain ``chain`` exists in ``table`` and each hook jumps to it (``first``: as the
    hook's first rule, moved back there if something was put before it). Idempotent."""
    if _iptables("-n", "-L", chain, table=table, check=False).returncode != 0:
        _iptables("-N", chain, table=table)
    for hook in hooks:
        if first:
            rules = _iptables("-S", hook, table=table).stdout.splitlines()
            if len(rules) > 1 and rules[1] == f"-A {hook} -j {chain}":
                continue
            while _iptables("-D", hook, "-j", chain, table=table, check=False).returncode == 0:
                pass
            _iptables("-I", hook, "1", "-j", chain, table=table)
        elif _iptables("-C", hook, "-j", chain, table=table, check=False).returncode != 0:
            _iptables("-A", hook, "-j", chain, table=table)


def _drop_marked(chain: str, mark: str, *, table: str = "nat") -> None:
    """Delete the rules of ``chain`` that carry the comment ``mark`` (and nothing else)."""
    for line in _iptables("-S", chain, table=table).stdout.splitlines():
        if f'"{mark}"' in line or f" {mark} " in f"{line} ":
            _iptables(*shlex.split(line.replace("-A ", "-D ", 1)), table=table)


def nat_apply(server_id: uuid.UUID, mappings: list[dict[str, Any]]) -> None:
    """The VM's NAT rules become exactly ``mappings``, in Nephos's own chains; rules of other VMs
    and anything not Nephos's are never touched:

    - DNAT public -> private (PREROUTING and OUTPUT);
    - SNAT private -> public for what the VM starts towards the outside (POSTROUTING; never for
      traffic bridged within its network, which keeps its private address);
    - in the filter table's FORWARD, an accept for connections DNATed to the VM while they are
      routed into its network: libvirt rejects routing into an isolated network, and this lets
      through only what a mapping brought. Only the routed pass: the bridged pass to the VM's
      NIC still meets the VM's firewall (its nwfilter).
    """
    mark = f"nephos:{server_id}"
    _own_chain(DNAT_CHAIN, ("PREROUTING", "OUTPUT"))
    _own_chain(SNAT_CHAIN, ("POSTROUTING",))
    _own_chain(FWD_CHAIN, ("FORWARD",), table="filter", first=True)
    _drop_marked(DNAT_CHAIN, mark)
    _drop_marked(SNAT_CHAIN, mark)
    _drop_marked(FWD_CHAIN, mark, table="filter")
    routed = ["-m", "physdev", "!", "--physdev-is-bridged"]
    for m in mappings:
        public, private = str(m["public"]), str(m["private"])
        comment = ["-m", "comment", "--comment", mark]
        _iptables("-A", DNAT_CHAIN, "-d", f"{public}/32", *comment, "-j", "DNAT", "--to-destination", private)
        _iptables("-A", SNAT_CHAIN, "-s", f"{private}/32", *routed, *comment, "-j", "SNAT", "--to-source", public)
        accept = ["-d", f"{private}/32", *routed, "-m", "conntrack", "--ctstate", "DNAT", *comment, "-j", "ACCEPT"]
        _iptables("-A", FWD_CHAIN, *accept, table="filter")


def metadata_redirect(nic: dict[str, Any], port: int) -> None:
    """Guests on the NIC's network reach the metadata proxy at ``169.254.169.254:80``: a DNAT
    rule from its bridge to ``gateway:port``. Idempotent; a stale rule of the network (another
    port) is replaced."""
    mark = f"nephos:net:{nic['network_id']}"
    rule = ["-i", str(nic["bridge"]), "-d", f"{METADATA_ADDRESS}/32", "-p", "tcp", "--dport", "80"]
    rule += ["-m", "comment", "--comment", mark, "-j", "DNAT", "--to-destination", f"{nic['gateway']}:{port}"]
    _own_chain(META_CHAIN, ("PREROUTING",))
    if _iptables("-C", META_CHAIN, *rule, check=False).returncode != 0:
        _drop_marked(META_CHAIN, mark)
        _iptables("-A", META_CHAIN, *rule)


def _hostname(name: str) -> str:
    cleaned = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")
    return cleaned[:63] or "vm"


class Driver:
    def __init__(
        self,
        uri: str,
        *,
        vnc_listen: str = "127.0.0.1",
        image_dir: Path | None = None,
        instance_dir: Path | None = None,
        stop_timeout: float = 60.0,
        domain_type: str = "kvm",
        metadata_port: int | None = None,
    ) -> None:
        self.uri = uri
        # Where this host's metadata proxy listens (None: no proxy, no redirect rules).
        self.metadata_port = metadata_port
        # "kvm", or "qemu" (software emulation) where /dev/kvm exists but does not run guests.
        self.domain_type = domain_type
        self.vnc_listen = vnc_listen
        self.image_dir = image_dir or Path("/var/lib/nephos/images")
        self.instance_dir = instance_dir or Path("/var/lib/nephos/instances")
        self.stop_timeout = stop_timeout
        self.conn: libvirt.virConnect | None = None
        # One thread: a libvirt connection is used from one worker, calls are short, and the
        # event loop never waits on one.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="libvirt")
        # A simulated host's domains as its node file last had them: definition and run state.
        self._domains: dict[str, str] = {}
        # Its node file less the domains and networks (the host's own part), as first read: only
        # this driver writes the file, so a write need not read and strip the whole file again.
        self._head: str | None = None
        # ``persist``'s group writes: the calls made, the calls the last write covered, and
        # the domains to read again (None: all of them, as the first write does).
        self._asked, self._saved = 0, 0
        self._stale: set[str] | None = None
        self._writing = asyncio.Lock()

    @property
    def simulated(self) -> bool:
        return self.uri.startswith("test:")

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def open(self) -> None:
        _silence_libvirt_stderr()
        self.conn = await self._call(libvirt.open, self.uri)

    @property
    def node_file(self) -> Path | None:
        """A simulated host's node file (``test:///path.xml``), where its domains are kept."""
        if not self.simulated or not self.uri.startswith("test:///") or not self.uri.endswith(".xml"):
            return None
        return Path(self.uri.removeprefix("test://"))

    async def persist(self, changed: uuid.UUID | None = None) -> None:
        """Keep a simulated host's networks and domains (with run states) in its node file, so an agent
        that restarts (or is killed) finds them again; a no-op for a real hypervisor.

        With ``changed``, only that domain is read again (its definition and run state), with
        those ``touched`` since the last write; the others are as the last write read them.
        Without it (and on the first write), every domain is read. A host of a thousand domains
        then writes its file after each job without asking libvirt about a thousand domains.

        Calls that come while a write runs share the next one (a group write): when it returns,
        the file holds what libvirt held when the call was made, as if it had written alone, and
        jobs finishing together on a busy host write the file once, not once each."""
        path, conn = self.node_file, self.conn
        if path is None or conn is None:
            return
        if changed is None:
            self._stale = None
        elif self._stale is not None:
            self._stale.add(str(changed))
        self._asked += 1
        mine = self._asked
        async with self._writing:
            if self._saved >= mine:
                return  # a write that began after this call was made has saved it
            covering, stale = self._asked, self._stale
            self._stale = set()
            try:
                await self._call(self._write_node, path, conn, stale)
            except BaseException:
                self._stale = None  # read everything again next time
                raise
            self._saved = covering

    def touched(self, server_id: uuid.UUID) -> None:
        """A domain changed outside a job (the agent's lifecycle events say so): the next write
        reads it again. No write now."""
        if self._stale is not None:
            self._stale.add(str(server_id))

    def _write_node(self, path: Path, conn: libvirt.virConnect, stale: set[str] | None) -> None:
        """``persist``'s write, in the libvirt thread: the domains in ``stale`` (None: all) are
        read again, the others kept as the last write read them; the networks are read anew."""
        if stale is None:
            self._domains = {}
            for dom in conn.listAllDomains():
                with contextlib.suppress(libvirt.libvirtError):
                    self._domains[dom.UUIDString()] = self._saved_form(dom)
        else:
            for key in stale:
                try:
                    self._domains[key] = self._saved_form(conn.lookupByUUIDString(key))
                except libvirt.libvirtError:  # gone (or going): not kept
                    self._domains.pop(key, None)
        if stale is None or self._head is None:
            self._head = _NETWORK.sub("", _DOMAIN.sub("", path.read_text()))
        kept = []
        for net in conn.listAllNetworks():
            with contextlib.suppress(libvirt.libvirtError):
                kept.append(net.XMLDesc(0))
        kept.extend(self._domains.values())
        _write_atomically(path, self._head.replace("</node>", "".join(kept) + "</node>"))

    @staticmethod
    def _saved_form(dom: libvirt.virDomain) -> str:
        """A domain as a node file keeps it: its definition, with its run state."""
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        xml = re.sub(r"^<domain ([^>]*)>", rf"<domain \1 xmlns:test='{_TEST_NS}'>", xml.strip(), count=1)
        state = dom.state()[0]
        return xml.replace("</domain>", f"<test:runstate>{state}</test:runstate></domain>")

    async def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                await self._call(self.conn.close)
            self.conn = None
        self._executor.shutdown(wait=False)

    # -- reading ---------------------------------------------------------------------------
    async def capacity(self) -> tuple[int, int]:
        """(CPUs, MiB) of the host, as libvirt reads them."""
        assert self.conn is not None
        info = await self._call(self.conn.getInfo)
        return int(info[2]), int(info[1])

    def _lookup(self, server_id: uuid.UUID) -> libvirt.virDomain | None:
        assert self.conn is not None
        try:
            return self.conn.lookupByUUIDString(str(server_id))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    @staticmethod
    def _read_metadata(dom: libvirt.virDomain, ns: str) -> ET.Element | None:
        """The domain's metadata element in namespace ``ns`` (None: there is none, or it is not
        XML). Nephos keeps its mark, a VM's firewall rules and its NAT mappings there."""
        try:
            meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, ns, 0)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise
        try:
            return ET.fromstring(meta)
        except ET.ParseError:
            return None

    @staticmethod
    def _set_metadata(dom: libvirt.virDomain, xml: str, prefix: str, ns: str) -> None:
        """Write the domain's metadata element in ``ns``: in its definition, and live if it runs."""
        flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0)
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, prefix, ns, flags)

    @classmethod
    def _marked(cls, dom: libvirt.virDomain, server_id: uuid.UUID) -> bool:
        """Does the domain carry Nephos's mark for ``server_id`` (its own UUID)?"""
        meta = cls._read_metadata(dom, NS)
        marked = meta.findtext("server") if meta is not None else None
        return marked is not None and marked.strip() == str(server_id)

    @staticmethod
    def _state(dom: libvirt.virDomain | None) -> DomainState:
        if dom is None:
            return "missing"
        return _STATES.get(dom.state()[0], "other")

    async def state(self, server_id: uuid.UUID) -> DomainState:
        return await self._call(lambda: self._state(self._lookup(server_id)))  # type: ignore[no-any-return]

    async def domains(self) -> list[DomainInfo]:
        assert self.conn is not None
        conn = self.conn

        def read() -> list[DomainInfo]:
            out = []
            for dom in conn.listAllDomains():
                with contextlib.suppress(libvirt.libvirtError, ValueError):  # vanished while listed
                    info = dom.info()
                    sid = uuid.UUID(dom.UUIDString())
                    out.append(
                        DomainInfo(
                            server_id=sid,
                            state=self._state(dom),
                            vcpus=int(info[3]),
                            ram_mb=int(info[1]) // 1024,
                            name=dom.name(),
                            owned=self._marked(dom, sid),
                            firewall_gen=self.firewall_gen(dom),
                        )
                    )
            return out

        return await self._call(read)  # type: ignore[no-any-return]

    # -- building --------------------------------------------------------------------------
    def domain_xml(
        self, server_id: uuid.UUID, p: dict[str, Any], *, disk: str | None = None, drive: Path | None = None
    ) -> str:
        kind = "test" if self.simulated else self.domain_type
        root = ET.Element("domain", type=kind)
        ET.SubElement(root, "name").text = f"nephos-{server_id}"
        ET.SubElement(root, "uuid").text = str(server_id)
        ET.SubElement(root, "title").text = str(p.get("name", ""))
        ET.SubElement(root, "memory", unit="MiB").text = str(p["ram_mb"])
        ET.SubElement(root, "vcpu").text = str(p["vcpus"])
        os_el = ET.SubElement(root, "os")
        ET.SubElement(os_el, "type", arch="x86_64" if not self.simulated else "i686").text = "hvm"
        kernel = self._kernel_of(p)
        if kernel is not None:  # a direct-kernel image: <id>.kernel and <id>.initrd in the store
            ET.SubElement(os_el, "kernel").text = str(kernel)
            ET.SubElement(os_el, "initrd").text = str(kernel.with_suffix(".initrd"))
            ET.SubElement(os_el, "cmdline").text = "console=ttyS0 quiet"
        else:
            ET.SubElement(os_el, "boot", dev="hd")
        if not self.simulated:  # ACPI: a graceful stop is the power button
            features = ET.SubElement(root, "features")
            ET.SubElement(features, "acpi")
            ET.SubElement(features, "apic")
        meta = ET.SubElement(ET.SubElement(root, "metadata"), f"{{{NS}}}vm")
        ET.SubElement(meta, f"{{{NS}}}server").text = str(server_id)  # the mark: Nephos made it
        for key in ("ssh_key", "user_data"):
            if p.get(key):
                ET.SubElement(meta, f"{{{NS}}}{key}").text = str(p[key])
        ET.SubElement(meta, f"{{{NS}}}image").text = str(p.get("image", {}).get("name", ""))
        devices = ET.SubElement(root, "devices")
        if disk is not None:
            d = ET.SubElement(devices, "disk", type="file", device="disk")
            ET.SubElement(d, "driver", name="qemu", type="qcow2")
            ET.SubElement(d, "source", file=disk)
            ET.SubElement(d, "target", dev="vda", bus="virtio")
        if not self.simulated:
            iso = drive or self.instance_dir / f"{server_id}.cidata.iso"
            cd = ET.SubElement(devices, "disk", type="file", device="cdrom")
            ET.SubElement(cd, "driver", name="qemu", type="raw")
            ET.SubElement(cd, "source", file=str(iso))
            ET.SubElement(cd, "target", dev="hdc", bus="ide")
            ET.SubElement(cd, "readonly")
            # The serial console, kept (append: a restart or restore does not empty it).
            log = str(self.instance_dir / f"{server_id}.console.log")
            for tag in ("serial", "console"):
                el = ET.SubElement(devices, tag, type="file")
                ET.SubElement(el, "source", path=log, append="on")
        for spec in p.get("nics") or [{"network_name": "default"}]:
            nic = ET.SubElement(devices, "interface", type="network")
            if spec.get("mac"):
                ET.SubElement(nic, "mac", address=str(spec["mac"]))
            ET.SubElement(nic, "source", network=spec.get("network_name") or network_name(spec))
            if not self.simulated:
                ET.SubElement(nic, "model", type="virtio")
                if "firewall" in p:
                    ref = ET.SubElement(nic, "filterref", filter=filter_name(server_id))
                    if spec.get("ip"):  # the one address clean-traffic lets this NIC use
                        ET.SubElement(ref, "parameter", name="IP", value=str(spec["ip"]))
        # The console is never open: it listens where the operator says (loopback unless told
        # otherwise) and has a random password from the start, which nobody is shown; the
        # console action sets a fresh one and shows it once.
        graphics = {"type": "vnc", "listen": self.vnc_listen, "passwd": secrets.token_urlsafe(6)[:8]}
        if p.get("vnc_port"):
            graphics.update(port=str(p["vnc_port"]), autoport="no")
        else:
            graphics.update(autoport="yes")
        ET.SubElement(devices, "graphics", graphics)
        ET.register_namespace("nephos", NS)
        return ET.tostring(root, encoding="unicode")

    def _kernel_of(self, p: dict[str, Any]) -> Path | None:
        """The image's kernel when it is a direct-kernel image (real hypervisors only)."""
        if self.simulated or not p.get("image", {}).get("id"):
            return None
        kernel = self.image_dir / f"{p['image']['id']}.kernel"
        return kernel if kernel.exists() else None

    def _overlay(self, server_id: uuid.UUID, p: dict[str, Any]) -> str | None:
        """A qcow2 overlay on the image (real hypervisors only; a blank disk for a direct-kernel
        image); made once, kept on redelivery."""
        if self.simulated:
            return None
        base = self.image_dir / f"{p['image']['id']}.qcow2"
        overlay = self.instance_dir / f"{server_id}.qcow2"
        if not overlay.exists():
            self.instance_dir.mkdir(parents=True, exist_ok=True)
            backing = [] if self._kernel_of(p) is not None else ["-F", "qcow2", "-b", str(base)]
            size = f"{int(p.get('disk_gb') or 1)}G"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(overlay), size],
                check=True,
                capture_output=True,
            )
        return str(overlay)

    def _config_drive(self, server_id: uuid.UUID, p: dict[str, Any]) -> Path | None:
        """The cloud-init NoCloud config drive (an ISO labelled ``cidata``: meta-data, user-data,
        network-config v2), made from the job (real hypervisors only). Its file is named by its
        content: the same content is the same file (a redelivered job makes nothing new), and a
        changed drive is a new file, which a running guest gets as new media."""
        if self.simulated:
            return None
        files = config_drive_files(server_id, p)
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
        iso = self.instance_dir / f"{server_id}.cidata-{digest}.iso"
        if iso.exists():
            return iso
        self.instance_dir.mkdir(parents=True, exist_ok=True)
        staging = self.instance_dir / f"{server_id}.cidata"
        staging.mkdir(exist_ok=True)
        for name, text in files.items():
            (staging / name).write_text(text)
        tmp = iso.with_suffix(".part")
        subprocess.run(
            ["genisoimage", "-quiet", "-o", str(tmp), "-volid", "cidata", "-joliet", "-rock"]
            + [str(staging / name) for name in files],
            check=True,
            capture_output=True,
        )
        os.chmod(tmp, 0o644)
        os.replace(tmp, iso)
        return iso

    def _remake_config_drive(self, dom: libvirt.virDomain, server_id: uuid.UUID, guest: dict[str, Any]) -> bool:
        """Make the VM's config drive anew from ``guest`` and put it in the VM's cdrom drive
        (live too: a media change), the old file removed. The key the VM was made with stays
        when the job carries none (its key pair deleted since). True if the drive changed."""
        if self.simulated:
            return False
        if not guest.get("ssh_key"):
            made = self._read_metadata(dom, NS)
            guest = {**guest, "ssh_key": made.findtext("ssh_key") if made is not None else None}
        iso = self._config_drive(server_id, guest)
        assert iso is not None
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        for disk in root.findall("./devices/disk[@device='cdrom']"):
            source = disk.find("source")
            current = source.get("file", "") if source is not None else ""
            if source is None or not Path(current).name.startswith(f"{server_id}.cidata"):
                continue  # not its config drive
            if current == str(iso):
                return False
            source.set("file", str(iso))
            # A running guest that keeps the drive mounted has locked its tray: the media change
            # is forced rather than waiting on the guest.
            live = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_DEVICE_MODIFY_FORCE if dom.isActive() else 0
            dom.updateDeviceFlags(ET.tostring(disk, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_CONFIG | live)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(current)
            return True
        return False

    # -- networks ----------------------------------------------------------------------------
    def _ensure_network(self, nic: dict[str, Any]) -> libvirt.virNetwork:
        """The NIC's network on this host, defined (isolated: no forwarding off the host) and
        started if it is not, with the NIC's DHCP reservation. Idempotent."""
        assert self.conn is not None
        name = network_name(nic)
        try:
            net = self.conn.networkLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                raise
            net = self.conn.networkDefineXML(network_xml(nic))
            with contextlib.suppress(libvirt.libvirtError):
                net.setAutostart(True)
        if not net.isActive():
            net.create()
        if self.metadata_port and not self.simulated:
            metadata_redirect(nic, self.metadata_port)
        host = f"<host mac='{nic['mac']}' ip='{nic['ip']}'/>"
        flags = self._reservation_flags(net)
        try:  # a new reservation, the usual case: libvirt refuses one whose MAC is there already
            net.update(
                libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, host, flags
            )
        except libvirt.libvirtError:
            existing = ET.fromstring(net.XMLDesc(0)).find(f"./ip/dhcp/host[@mac='{nic['mac']}']")
            if existing is None:
                raise
            if existing.get("ip") != nic["ip"]:  # (else a job run again: nothing to do)
                net.update(
                    libvirt.VIR_NETWORK_UPDATE_COMMAND_MODIFY, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, host, flags
                )
        return net

    def _reservation_flags(self, net: libvirt.virNetwork) -> int:
        """Where a DHCP reservation is changed: the running network and its definition; on a
        simulated host the running network only (its node file keeps the running definition,
        and libvirt's update copies the whole network once per definition it changes: half the
        work, on a network of hundreds of reservations)."""
        if not net.isActive():
            return int(libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG)
        if self.simulated:
            return int(libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE)
        return int(libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG)

    async def gateways(self) -> dict[str, uuid.UUID]:
        """The gateway address of each Nephos network on this host, with the network's id (from
        its mark): how the metadata proxy knows which network a request arrived on."""

        def read() -> dict[str, uuid.UUID]:
            assert self.conn is not None
            found: dict[str, uuid.UUID] = {}
            for net in self.conn.listAllNetworks():
                if not net.name().startswith(NETWORK_PREFIX):
                    continue
                root = ET.fromstring(net.XMLDesc(0))
                mark, ip = root.find(f"./metadata/{{{NET_NS}}}network/{{{NET_NS}}}id"), root.find("ip")
                if mark is None or ip is None or not mark.text or not ip.get("address"):
                    continue
                with contextlib.suppress(ValueError):
                    found[str(ip.get("address"))] = uuid.UUID(mark.text)
            return found

        return await self._call(read)  # type: ignore[no-any-return]

    def _record_firewall(self, dom: libvirt.virDomain, rules: list[dict[str, Any]], generation: int | None) -> None:
        self._set_metadata(dom, firewall_metadata(rules, generation), "nephosfw", FW_NS)

    def firewall_gen(self, dom: libvirt.virDomain) -> int | None:
        """The firewall generation a domain records (None: none recorded, or unreadable)."""
        try:
            meta = self._read_metadata(dom, FW_NS)
        except libvirt.libvirtError:
            return None
        if meta is None:
            return None
        try:
            return int(meta.get("generation", "0"))
        except ValueError:
            return None

    async def firewall(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        """Enforce a VM's whole rule set: its nwfilter redefined (libvirt re-applies it to the
        running NICs at once) and the rules recorded in the domain."""
        rules = list(p.get("rules") or [])

        def run() -> dict[str, Any]:
            assert self.conn is not None
            dom = self._need(server_id)
            if not self.simulated:
                self.conn.nwfilterDefineXML(filter_xml(server_id, rules))
                root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                if root.find("./devices/interface/filterref") is None:  # made before firewalls
                    for iface in root.findall("./devices/interface"):
                        ET.SubElement(iface, "filterref", filter=filter_name(server_id))
                    self.conn.defineXML(ET.tostring(root, encoding="unicode"))
            self._record_firewall(dom, rules, p.get("generation"))
            return {"rules": len(rules), "generation": p.get("generation")}

        return await self._call(run)  # type: ignore[no-any-return]

    async def public_ip(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        """Make a VM's public-to-private mappings exactly ``mappings``: NAT rules on a real host
        (idempotent: the VM's rules are replaced), recorded in the domain everywhere."""
        mappings = list(p.get("mappings") or [])

        def run() -> dict[str, Any]:
            dom = self._need(server_id)
            if not self.simulated:
                nat_apply(server_id, mappings)
            root = ET.Element("nat")
            for m in mappings:
                ET.SubElement(root, "map", public=str(m["public"]), private=str(m["private"]))
            self._set_metadata(dom, ET.tostring(root, encoding="unicode"), "nephosnat", NAT_NS)
            remade = "guest" in p and self._remake_config_drive(dom, server_id, {**p["guest"], "public_ips": mappings})
            return {"mappings": len(mappings), "config_drive": "remade" if remade else "unchanged"}

        return await self._call(run)  # type: ignore[no-any-return]

    def mappings_of(self, dom: libvirt.virDomain) -> list[dict[str, str]]:
        """The public-to-private mappings recorded in a domain."""
        meta = self._read_metadata(dom, NAT_NS)
        return [{"public": m.get("public", ""), "private": m.get("private", "")} for m in meta or []]

    def rules_of(self, dom: libvirt.virDomain) -> list[dict[str, Any]] | None:
        """The rules recorded in a domain (None: never set)."""
        meta = self._read_metadata(dom, FW_NS)
        if meta is None:
            return None
        return [
            {
                "protocol": r.get("protocol"),
                "port_min": int(r.get("port_min", -1)),
                "port_max": int(r.get("port_max", -1)),
                "cidr": r.get("cidr"),
            }
            for r in meta.findall("rule")
        ]

    def _forget_reservations(self, dom: libvirt.virDomain) -> None:
        """A destroyed domain's DHCP reservations leave its networks (Nephos's networks only)."""
        assert self.conn is not None
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        for iface in root.findall("./devices/interface[@type='network']"):
            source, mac = iface.find("source"), iface.find("mac")
            if source is None or mac is None or not source.get("network", "").startswith(NETWORK_PREFIX):
                continue
            with contextlib.suppress(libvirt.libvirtError):
                net = self.conn.networkLookupByName(source.get("network", ""))
                found = ET.fromstring(net.XMLDesc(0)).find(f"./ip/dhcp/host[@mac='{mac.get('address')}']")
                if found is not None:
                    net.update(
                        libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE,
                        libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST,
                        -1,
                        ET.tostring(found, encoding="unicode"),
                        self._reservation_flags(net),
                    )

    # -- actions (each returns details for the job's result) -------------------------------------
    async def create(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            assert self.conn is not None
            for nic in p.get("nics") or []:
                self._ensure_network(nic)
            drive = self._config_drive(server_id, p)
            if "firewall" in p and not self.simulated:
                self.conn.nwfilterDefineXML(filter_xml(server_id, p["firewall"]))
            dom = self._lookup(server_id)
            if dom is None:
                dom = self.conn.defineXML(self.domain_xml(server_id, p, disk=self._overlay(server_id, p), drive=drive))
                if "firewall" in p:
                    self._record_firewall(dom, p["firewall"], p.get("firewall_gen"))
            if p.get("public_ips") and not self.simulated:
                nat_apply(server_id, p["public_ips"])
            if not dom.isActive():
                dom.create()
            return {}

        return await self._call(run)  # type: ignore[no-any-return]

    def _need(self, server_id: uuid.UUID) -> libvirt.virDomain:
        dom = self._lookup(server_id)
        if dom is None:
            raise libvirt.libvirtError(f"Domain not found: no domain with UUID {server_id}")
        return dom

    async def start(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        def run() -> None:
            dom = self._need(server_id)
            if not dom.isActive():
                dom.create()

        await self._call(run)
        return {}

    async def stop(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        """Graceful shutdown, waiting up to ``stop_timeout``; then forced off."""
        dom = await self._call(self._need, server_id)
        state = await self._call(self._state, dom)
        if state == "shutoff":
            return {}
        if state == "paused":  # a paused guest cannot answer ACPI
            await self._call(dom.destroy)
            return {"forced": True}
        await self._call(dom.shutdown)
        deadline = time.monotonic() + float(p.get("timeout", self.stop_timeout))
        while time.monotonic() < deadline:
            if await self._call(self._state, dom) == "shutoff":
                return {}
            await asyncio.sleep(0.5)
        with contextlib.suppress(libvirt.libvirtError):  # it may have gone off meanwhile
            await self._call(dom.destroy)
        return {"forced": True}

    async def reboot(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        def run() -> None:
            dom = self._need(server_id)
            if p.get("hard"):
                dom.reset(0)
            else:
                dom.reboot(0)

        await self._call(run)
        return {}

    async def suspend(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        def run() -> None:
            dom = self._need(server_id)
            if self._state(dom) != "paused":
                dom.suspend()

        await self._call(run)
        return {}

    async def resume(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        def run() -> None:
            dom = self._need(server_id)
            if self._state(dom) == "paused":
                dom.resume()

        await self._call(run)
        return {}

    async def resize(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        vcpus, kib = int(p["vcpus"]), int(p["ram_mb"]) * 1024

        def run() -> None:
            dom = self._need(server_id)
            config = libvirt.VIR_DOMAIN_AFFECT_CONFIG
            dom.setVcpusFlags(vcpus, config | libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
            dom.setVcpusFlags(vcpus, config)
            dom.setMemoryFlags(kib, config | libvirt.VIR_DOMAIN_MEM_MAXIMUM)
            dom.setMemoryFlags(kib, config)

        await self._call(run)
        return {"vcpus": vcpus, "ram_mb": kib // 1024}

    async def console(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        """Attach: set a fresh VNC password (live where the driver can, in the definition always)."""
        password = str(p["password"])

        def run() -> dict[str, Any]:
            assert self.conn is not None
            dom = self._need(server_id)
            if not dom.isActive():
                raise libvirt.libvirtError("Requested operation is not valid: domain is not running")
            root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
            graphics = root.find("./devices/graphics[@type='vnc']")
            if graphics is None:
                raise libvirt.libvirtError("the domain has no VNC graphics device")
            graphics.set("passwd", password)
            try:
                dom.updateDeviceFlags(ET.tostring(graphics, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
            self.conn.defineXML(ET.tostring(root, encoding="unicode"))
            return {"port": int(graphics.get("port", "0") or 0)}

        return await self._call(run)  # type: ignore[no-any-return]

    async def save_image(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        """save_and_shutdown: stop the VM, then copy its disk into a new image."""
        await self.stop(server_id, p)
        if self.simulated:
            return {"image_id": p["image_id"]}
        source = self.instance_dir / f"{server_id}.qcow2"
        target = self.image_dir / f"{p['image_id']}.qcow2"
        if not target.exists():
            tmp = target.with_suffix(".part")
            await asyncio.to_thread(
                subprocess.run,
                ["qemu-img", "convert", "-O", "qcow2", str(source), str(tmp)],
                check=True,
                capture_output=True,
            )
            os.replace(tmp, target)
        return {"image_id": p["image_id"], "size_bytes": target.stat().st_size}

    async def destroy(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        def run() -> None:
            dom = self._lookup(server_id)
            if dom is None:
                return
            if dom.isActive():
                dom.destroy()
            self._forget_reservations(dom)
            flags = libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            dom.undefineFlags(flags)
            if not self.simulated and self.conn is not None:
                with contextlib.suppress(libvirt.libvirtError):  # none, if it predates firewalls
                    self.conn.nwfilterLookupByName(filter_name(server_id)).undefine()
                nat_apply(server_id, [])

        await self._call(run)
        if not self.simulated:
            for leftover in (self.instance_dir / f"{server_id}.qcow2", *self.instance_dir.glob(f"{server_id}.cidata*")):
                with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                    os.unlink(leftover)
            shutil.rmtree(self.instance_dir / f"{server_id}.cidata", ignore_errors=True)
        return {}

    async def mark(self, server_id: uuid.UUID, p: dict[str, Any]) -> dict[str, Any]:
        """An admin adopted this domain into a project: it carries Nephos's mark from now on."""

        def run() -> None:
            self._set_metadata(self._need(server_id), f"<vm><server>{server_id}</server></vm>", "nephos", NS)

        await self._call(run)
        return {}

    # -- migration ---------------------------------------------------------------------------
    @property
    def hypervisor(self) -> str:
        """The libvirt driver: ``test`` (simulated), ``qemu``, ..."""
        return self.uri.split(":", 1)[0].split("+", 1)[0]

    async def migrate_native(self, server_id: uuid.UUID, target_uri: str, live: bool) -> None:
        """libvirt's own migration, peer to peer. Live: the running guest moves, its overlay disk
        copied incrementally (the base image is in ``image_dir`` on both hosts). Cold (the VM is
        stopped): an offline migration of the definition, which needs ``instance_dir`` on storage
        both hosts share."""
        flags = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE | libvirt.VIR_MIGRATE_PEER2PEER
        if live:
            flags |= libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_NON_SHARED_INC
        else:
            flags |= libvirt.VIR_MIGRATE_OFFLINE

        def run() -> None:
            dom = self._lookup(server_id)
            if dom is not None:
                dom.migrateToURI3(target_uri, {}, flags)

        await self._call(run)

    async def export(self, server_id: uuid.UUID, vnc_port: int | None) -> tuple[str, bool] | None:
        """The definition to hand to a peer (with the port it will use there), and whether it runs."""

        def run() -> tuple[str, bool] | None:
            dom = self._lookup(server_id)
            if dom is None:
                return None
            root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE | libvirt.VIR_DOMAIN_XML_INACTIVE))
            graphics = root.find("./devices/graphics[@type='vnc']")
            if graphics is not None and vnc_port:
                graphics.set("port", str(vnc_port))
                graphics.set("autoport", "no")
            return ET.tostring(root, encoding="unicode"), bool(dom.isActive())

        return await self._call(run)  # type: ignore[no-any-return]

    async def adopt(self, domain_xml: str, start: bool) -> None:
        def run() -> None:
            assert self.conn is not None
            dom = self.conn.defineXML(domain_xml)
            if start and not dom.isActive():
                dom.create()

        await self._call(run)

    async def forget(self, server_id: uuid.UUID) -> None:
        """Drop the source copy after a peer adopted the domain (no disk to delete)."""

        def run() -> None:
            dom = self._lookup(server_id)
            if dom is not None:
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)

        await self._call(run)
