"""Private networks.

* A **network** belongs to a project: a name, an IPv4 CIDR (the user's, or the next free range of
  the pool: the admin's, else ``POOL``), its gateway (the first address). No two networks
  overlap, in any project: on a host each is a libvirt network with its own bridge, and
  libvirt refuses overlapping ones. A project without one gets ``default`` at its first create.
* A VM's **ports** on its networks, and public addresses, are ``addresses.py``'s.

Lock order (every writer): server, networks (by id), a public address, public IP pools (by id),
hosts, project, quota rows.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import ec2_id, utcnow, uuid7
from app.logic import rows
from app.logic.actor import Actor, require_admin
from app.logic.errors import AlreadyExists, BadRequest, InUse, NetworkFull, NotFound, UnknownSubnet
from app.logic.pagination import Page, paginate
from app.models import Network, NetworkPool, Port, PublicIp, PublicIpPool, Server, table_of

_networks, _ports, _servers = table_of(Network), table_of(Port), table_of(Server)
_public, _pools, _pool = table_of(PublicIp), table_of(PublicIpPool), table_of(NetworkPool)

#: Where networks made without a CIDR come from, a /24 each, until an admin sets a pool.
POOL = ipaddress.IPv4Network("10.128.0.0/9")
DEFAULT_PREFIX = 24
#: Smallest and largest networks a user may ask for.
MIN_PREFIX, MAX_PREFIX = 16, 29
DEFAULT_NAME = "default"


def bridge_of(network: Network) -> str:
    """The host bridge of a network (at most 15 characters, as Linux wants)."""
    return f"nph{network.id.hex[:12]}"


def ipv4_network(cidr: str, *, strict: bool = True) -> ipaddress.IPv4Network:
    """A client's CIDR as an IPv4 network, else ``BadRequest`` on ``cidr`` (``strict``: no host
    bits set). Networks, firewall sources and public IP pools all read CIDRs through this."""
    try:
        net = ipaddress.ip_network(cidr, strict=strict)
    except ValueError as exc:
        raise BadRequest(f"cidr {cidr!r} is not a network address with a prefix: {exc}", field="cidr") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise BadRequest("only IPv4 networks are supported", field="cidr")
    return net


#: The private ranges of RFC 1918: the only ones networks are made of (Python's ``is_private``
#: also admits documentation and reserved ranges).
PRIVATE = tuple(ipaddress.IPv4Network(c) for c in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))


def _private(net: ipaddress.IPv4Network) -> bool:
    return any(net.subnet_of(r) for r in PRIVATE)


def _parse(cidr: str) -> ipaddress.IPv4Network:
    net = ipv4_network(cidr)
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
        raise BadRequest(f"the prefix must be between /{MIN_PREFIX} and /{MAX_PREFIX}", field="cidr")
    if not _private(net):
        raise BadRequest("a private network needs a private (RFC 1918) range", field="cidr")
    return net


async def _taken(session: AsyncSession) -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network(c) for c in await session.scalars(sa.select(_networks.c.cidr))]


@dataclass(frozen=True)
class Pool:
    """Where networks made without a CIDR come from: ``cidr`` cut into networks of ``prefix``."""

    cidr: ipaddress.IPv4Network
    prefix: int


async def pool(session: AsyncSession) -> Pool:
    """The admin's pool, or ``POOL`` in /``DEFAULT_PREFIX`` networks."""
    row = await session.get(NetworkPool, 1)
    if row is None:
        return Pool(POOL, DEFAULT_PREFIX)
    return Pool(ipaddress.IPv4Network(row.cidr), row.prefix)


async def set_pool(session: AsyncSession, *, actor: Actor, cidr: str, prefix: int) -> Pool:
    """An admin sets the pool: a private IPv4 range, and the size of the networks cut from it
    (/16 to /29, no bigger than the range). Networks already made keep their ranges."""
    require_admin(actor)
    net = ipv4_network(cidr)
    if not _private(net):
        raise BadRequest("the pool must be a private (RFC 1918) range", field="cidr")
    if not max(MIN_PREFIX, net.prefixlen) <= prefix <= MAX_PREFIX:
        raise BadRequest(
            f"prefix must be between /{max(MIN_PREFIX, net.prefixlen)} and /{MAX_PREFIX} for {net}", field="prefix"
        )
    row = await session.get(NetworkPool, 1, with_for_update=True)
    if row is None:
        await rows.insert_or_skip(session, _pool, {"id": 1, "cidr": str(net), "prefix": prefix, "updated_at": utcnow()})
    await session.execute(
        _pool.update().where(_pool.c.id == 1).values(cidr=str(net), prefix=prefix, updated_at=utcnow())
    )
    return Pool(net, prefix)


def _next_free(taken: list[ipaddress.IPv4Network], within: Pool) -> ipaddress.IPv4Network:
    for candidate in within.cidr.subnets(new_prefix=within.prefix):
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise NetworkFull(f"the network pool {within.cidr} has no free /{within.prefix} left", pool=str(within.cidr))


def _row(project_id: uuid.UUID, name: str, net: ipaddress.IPv4Network, *, default: bool) -> dict[str, object]:
    return {
        "id": uuid7(),
        "project_id": project_id,
        "name": name,
        "cidr": str(net),
        "gateway": str(net.network_address + 1),
        "is_default": default,
        "ec2_id": ec2_id("subnet"),
        "created_at": utcnow(),
    }


_NAMED = (
    sa.select(Network)
    .where(_networks.c.project_id == sa.bindparam("project"), _networks.c.name == sa.bindparam("name"))
    .execution_options(populate_existing=True)
)


async def _named(session: AsyncSession, project_id: uuid.UUID, name: str) -> Network | None:
    return (await session.scalars(_NAMED, {"project": project_id, "name": name})).first()


async def create(session: AsyncSession, *, actor: Actor, name: str, cidr: str | None) -> Network:
    """A network of the caller's project: ``cidr`` if given (409 ``InUse`` if it overlaps
    another network), else the pool's next free range."""
    if actor.project_id is None:
        raise BadRequest("the caller has no project")
    if await _named(session, actor.project_id, name) is not None:
        raise AlreadyExists(f"network {name} already exists", field="name")
    if cidr is not None:
        net = _parse(cidr)
        clash = next((t for t in await _taken(session) if net.overlaps(t)), None)
        if clash is not None:
            raise InUse(f"{net} overlaps network {clash}", cidr=str(net), overlaps=str(clash))
        if not await rows.insert_or_skip(
            session, _networks, _row(actor.project_id, name, net, default=name == DEFAULT_NAME)
        ):
            raise InUse(f"{net} or the name {name} was taken meanwhile", cidr=str(net))
    else:
        await _made_from_pool(session, actor.project_id, name)
    made = await _named(session, actor.project_id, name)
    assert made is not None
    return made


async def _made_from_pool(session: AsyncSession, project_id: uuid.UUID, name: str) -> None:
    within = await pool(session)
    for _ in range(20):  # another project may take the same range at the same moment: next one
        candidate = _next_free(await _taken(session), within)
        if await rows.insert_or_skip(
            session, _networks, _row(project_id, name, candidate, default=name == DEFAULT_NAME)
        ):
            return
        if await _named(session, project_id, name) is not None:
            return  # made by a concurrent request of the same project
    raise NetworkFull("no free range could be taken from the pool (too much contention); retry")


async def default_for(session: AsyncSession, project_id: uuid.UUID) -> Network:
    """The project's default network, made on first use."""
    found = await _named(session, project_id, DEFAULT_NAME)
    if found is None:
        await _made_from_pool(session, project_id, DEFAULT_NAME)
        found = await _named(session, project_id, DEFAULT_NAME)
    assert found is not None
    return found


async def resolve(session: AsyncSession, project_id: uuid.UUID, names: list[str] | None) -> list[Network]:
    """The networks a create names (by name or id; default: the project's default one)."""
    if not names:
        return [await default_for(session, project_id)]
    out: list[Network] = []
    for given in names:
        try:
            cond = _networks.c.id == uuid.UUID(given)
        except ValueError:
            cond = _networks.c.name == given
        found = (await session.scalars(sa.select(Network).where(cond, _networks.c.project_id == project_id))).first()
        if found is None:
            if given == DEFAULT_NAME:
                found = await default_for(session, project_id)
            else:
                raise BadRequest(f"network {given} does not exist", field="networks")
        if found.id in {n.id for n in out}:
            raise BadRequest(f"network {given} is named twice", field="networks")
        out.append(found)
    return out


async def by_subnet(session: AsyncSession, project_id: uuid.UUID, subnet_ids: list[str]) -> list[Network]:
    """The project's networks by their EC2 subnet ids, in the order named (``UnknownSubnet``
    naming those it does not have)."""
    found = {
        n.ec2_id: n
        for n in await session.scalars(
            sa.select(Network).where(_networks.c.project_id == project_id, _networks.c.ec2_id.in_(subnet_ids))
        )
    }
    missing = [i for i in subnet_ids if i not in found]
    if missing:
        raise UnknownSubnet(f"subnet {', '.join(missing)} does not exist", ids=missing)
    return [found[i] for i in subnet_ids]


async def free_counts(session: AsyncSession, nets: list[Network]) -> dict[uuid.UUID, int]:
    """How many addresses each network still has for VMs (one query)."""
    used: dict[uuid.UUID, int] = dict(
        (
            await session.execute(
                sa.select(_ports.c.network_id, sa.func.count())
                .where(_ports.c.network_id.in_([n.id for n in nets]))
                .group_by(_ports.c.network_id)
            )
        ).all()
    )
    size = {n.id: ipaddress.IPv4Network(n.cidr).num_addresses - 3 for n in nets}  # network, gateway, broadcast
    return {n.id: max(size[n.id] - int(used.get(n.id, 0)), 0) for n in nets}


async def get(session: AsyncSession, *, actor: Actor, network_id: uuid.UUID) -> Network:
    found = await session.get(Network, network_id)
    if found is None or not actor.sees(found.project_id):
        raise NotFound(f"network {network_id} not found", network_id=str(network_id))
    return found


async def listed(session: AsyncSession, *, actor: Actor, limit: int, cursor: str | None) -> Page[Network]:
    stmt = sa.select(Network)
    if not actor.is_admin:
        stmt = stmt.where(_networks.c.project_id == actor.project_id)
    return await paginate(session, stmt, _networks.c.id, limit=limit, cursor=cursor)


async def delete(session: AsyncSession, *, actor: Actor, network_id: uuid.UUID) -> None:
    found = await get(session, actor=actor, network_id=network_id)
    await session.execute(sa.select(_networks.c.id).where(_networks.c.id == found.id).with_for_update())
    held = (await session.execute(sa.select(sa.func.count()).where(_ports.c.network_id == found.id))).scalar_one()
    if held:
        raise InUse(f"network {found.name} still has {held} address(es) in use", network_id=str(found.id))
    await session.delete(found)
