"""The EC2-compatible metadata service: what a guest reads at 169.254.169.254.

Nephos answers a host-side proxy, never a guest directly. The proxy vouches for the request: it
sends the shared proxy key, the Nephos network the request arrived on and the guest's source
address (``Source``). Nephos attributes the request to the VM that holds that address on that
network; a request it cannot attribute -- no key, a wrong key, an address no live VM holds --
gets nothing.

Sessions are IMDSv2's and required (AWS's ``HttpTokens=required``): ``PUT /latest/api/token``
with a TTL gives a token bound to the VM; every read needs it (401 without, or when expired or
another VM's). Tokens are HMACs of (server, expiry) under the proxy key: nothing is stored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import catalogue, keypairs, secgroups
from app.logic.operstate import Operstate
from app.models import Image, Port, Server, table_of

_ports, _servers = table_of(Port), table_of(Server)

MAX_TTL = 21600


@dataclass(frozen=True)
class Source:
    """Who the proxy says is asking."""

    network_id: uuid.UUID
    ip: str


class Refused(Exception):
    """Not attributable to a VM: nothing is answered."""


class Unauthorized(Exception):
    """No valid session token for this VM (IMDSv2)."""


def vouched(proxy_key: str | None, given: str | None) -> bool:
    """Does the request carry the proxies' key? (None configured: no request does.)"""
    if not proxy_key or given is None:
        return False
    return hmac.compare_digest(proxy_key.encode(), given.encode())


async def attribute(session: AsyncSession, source: Source) -> Server:
    """The live VM holding ``source``'s address on its network, else ``Refused``."""
    server = (
        await session.scalars(
            sa.select(Server)
            .join(_ports, _ports.c.server_id == _servers.c.id)
            .where(
                _ports.c.network_id == source.network_id,
                _ports.c.ip == source.ip,
                _servers.c.operstate != Operstate.DESTROYED.value,
            )
        )
    ).first()
    if server is None:
        raise Refused(f"no VM holds {source.ip} on network {source.network_id}")
    return server


def token_for(proxy_key: str, server_id: uuid.UUID, ttl: int, now: float | None = None) -> str:
    expiry = int((now or time.time()) + ttl)
    mac = hmac.new(proxy_key.encode(), f"{server_id}:{expiry}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(expiry.to_bytes(8, "big") + mac).decode().rstrip("=")


def check_token(proxy_key: str, server_id: uuid.UUID, token: str | None, now: float | None = None) -> None:
    if not token:
        raise Unauthorized("a session token is required (PUT /latest/api/token)")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        raise Unauthorized("the token is not valid") from None
    if len(raw) != 40:
        raise Unauthorized("the token is not valid")
    expiry = int.from_bytes(raw[:8], "big")
    want = hmac.new(proxy_key.encode(), f"{server_id}:{expiry}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(want, raw[8:]):
        raise Unauthorized("the token is not this instance's")
    if expiry < (now or time.time()):
        raise Unauthorized("the token has expired")


@dataclass(frozen=True)
class Document:
    """A VM's metadata: leaf paths under ``/latest/meta-data/`` and their values."""

    leaves: dict[str, str]
    key_names: list[str]

    def read(self, path: str) -> str | None:
        """A leaf's value, or a directory's listing (children, directories ending ``/``);
        None when there is no such path."""
        path = path.strip("/")
        if path in self.leaves:
            return self.leaves[path]
        if path == "public-keys":  # EC2 lists keys as "<index>=<name>"
            return "\n".join(f"{i}={name}" for i, name in enumerate(self.key_names)) or None
        prefix = f"{path}/" if path else ""
        children: list[str] = []
        for key in self.leaves:
            if key.startswith(prefix):
                rest = key[len(prefix) :]
                child = rest.split("/", 1)[0] + ("/" if "/" in rest else "")
                if child not in children:
                    children.append(child)
        return "\n".join(children) if children else None


async def document(session: AsyncSession, server: Server) -> Document:
    """What a VM reads about itself."""
    labels = await catalogue.labels(session, [server])
    addresses = labels.addresses.get(server.id, [])
    image = await session.get(Image, server.image_id)
    groups = (await secgroups.groups_of(session, [server.id]))[server.id]
    leaves = {
        "ami-id": image.ec2_id if image is not None else "",
        "ami-launch-index": "0",
        "hostname": server.name,
        "local-hostname": server.name,
        "instance-id": server.ec2_id,
        "instance-type": labels.flavors.get(server.flavor_id, ""),
        "placement/availability-zone": server.zone or "",
        "reservation-id": server.reservation_id,
        "security-groups": "\n".join(name for _, name in groups),
    }
    if addresses:
        leaves.update({"local-ipv4": addresses[0].ip, "mac": addresses[0].mac})
        if addresses[0].public_ip:
            leaves["public-ipv4"] = addresses[0].public_ip
        for a in addresses:
            base = f"network/interfaces/macs/{a.mac}/"
            leaves.update({base + "local-ipv4s": a.ip, base + "subnet-id": a.subnet, base + "interface-id": a.port})
    names = []
    if server.key_name:
        found = await keypairs.find(session, project_id=server.project_id, name=server.key_name)
        if found is not None:
            names.append(server.key_name)
            leaves["public-keys/0/openssh-key"] = found.public_key
    return Document(leaves, names)
