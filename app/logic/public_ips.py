"""Public IPs: addresses from admin pools, allocated to projects, associated with VMs.

* **Pools** are an admin's: a name and a CIDR (no two overlap). Allocation takes the lowest free
  address of a pool (any pool, when none is named) under the pools' row locks, so no address is
  given twice.
* **Quota.** Each allocated address is one unit of the project's ``public_ip`` resource, moved
  by an accepted commission like any other usage (over the limit: 413 ``OverLimit``; EC2's
  ``AddressLimitExceeded``). Releasing gives it back.
* **Association** maps the address to a VM's first private address. The VM's host gets the
  whole set of its mappings in a ``public_ip`` job (the task lock applies, as to any job), and
  the agent installs them as NAT rules, idempotently; a VM with no host yet gets them with its
  create job. A destroyed VM's addresses are disassociated and stay allocated, as on EC2
  (``addresses.release``).

Lock order: server, the address, pools (by id), project, quota rows.
"""

from __future__ import annotations

import ipaddress
import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import ec2_id
from app.logic import actions, addresses, networks, quotas, servers
from app.logic.actor import Actor, require_admin
from app.logic.errors import AlreadyExists, BadRequest, InUse, NotFound
from app.logic.jobs import Outbox
from app.logic.operstate import Deltas
from app.logic.pagination import Page, paginate
from app.models import Job, Port, PublicIp, PublicIpPool, Server, table_of

_pools, _ips, _ports = table_of(PublicIpPool), table_of(PublicIp), table_of(Port)
ONE = Deltas(public_ip=1)


async def create_pool(session: AsyncSession, *, actor: Actor, name: str, cidr: str) -> PublicIpPool:
    require_admin(actor)
    net = networks.ipv4_network(cidr)
    if not 16 <= net.prefixlen <= 32:
        raise BadRequest("a pool is an IPv4 network, /16 to /32", field="cidr")
    for other in await session.scalars(sa.select(PublicIpPool)):
        if other.name == name:
            raise AlreadyExists(f"pool {name} already exists", field="name")
        if net.overlaps(ipaddress.IPv4Network(other.cidr)):
            raise InUse(f"{net} overlaps pool {other.name} ({other.cidr})", cidr=str(net))
    pool = PublicIpPool(name=name, cidr=str(net))
    session.add(pool)
    await session.flush()
    return pool


async def pools(session: AsyncSession, *, actor: Actor, limit: int, cursor: str | None) -> Page[PublicIpPool]:
    require_admin(actor)
    return await paginate(session, sa.select(PublicIpPool), _pools.c.id, limit=limit, cursor=cursor)


async def allocate(session: AsyncSession, *, actor: Actor, pool: str | None = None) -> PublicIp:
    """The lowest free address of the named pool (or of any), for the caller's project."""
    if actor.project_id is None:
        raise BadRequest("the caller has no project")
    await quotas.check(session, actor.project_id, ONE)  # over quota is the answer before a pool is touched
    [(found, address)] = await addresses.free_public(session, pool=pool, count=1)
    await quotas.lock_project(session, actor.project_id)
    await quotas.check(session, actor.project_id, ONE)
    ip = PublicIp(pool_id=found.id, address=address, project_id=actor.project_id)
    session.add(ip)
    await session.flush()
    await quotas.issue(session, project_id=actor.project_id, server_id=None, deltas=ONE, accept=True)
    return ip


async def get(session: AsyncSession, *, actor: Actor, ip_id: uuid.UUID | None = None, **by: str) -> PublicIp:
    """By id, or by ``address`` / ``ec2_id`` / ``association_id`` (the EC2 facade's handles)."""
    stmt = sa.select(PublicIp)
    if ip_id is not None:
        stmt = stmt.where(_ips.c.id == ip_id)
    for column, value in by.items():
        stmt = stmt.where(_ips.c[column] == value)
    ip = (await session.scalars(stmt)).first()
    if ip is None or not actor.sees(ip.project_id):
        raise NotFound(f"public IP {ip_id or next(iter(by.values()), '')} not found")
    return ip


async def listed(session: AsyncSession, *, actor: Actor, limit: int, cursor: str | None) -> Page[PublicIp]:
    stmt = sa.select(PublicIp)
    if not actor.is_admin:
        stmt = stmt.where(_ips.c.project_id == actor.project_id)
    return await paginate(session, stmt, _ips.c.id, limit=limit, cursor=cursor)


async def _send(session: AsyncSession, outbox: Outbox, actor: Actor, server: Server) -> Job | None:
    if server.host is None:
        return None
    return await actions.public_ips(
        session, outbox, actor=actor, server_id=server.id, mappings=await addresses.public_mappings(session, server.id)
    )


async def associate(
    session: AsyncSession, outbox: Outbox, *, actor: Actor, ip: PublicIp, server_id: uuid.UUID
) -> Job | None:
    """Map ``ip`` to the VM's first private address (409 ``InUse`` if mapped elsewhere)."""
    server = await servers.lock(session, actor=actor, server_id=server_id)
    await session.refresh(ip, with_for_update=True)  # then the address (lock order): read afresh
    if server.project_id != ip.project_id:
        raise NotFound(f"server {server_id} not found", server_id=str(server_id))
    if ip.server_id is not None and ip.server_id != server.id:
        raise InUse(
            f"{ip.address} is associated with another server; disassociate it first", server_id=str(ip.server_id)
        )
    has_address = (await session.execute(sa.select(_ports.c.id).where(_ports.c.server_id == server.id))).first()
    if has_address is None:
        raise BadRequest("the server has no private address to map to", field="server_id")
    if ip.server_id is None:
        ip.server_id, ip.association_id = server.id, ec2_id("eipassoc")
        await session.flush()
    return await _send(session, outbox, actor, server)


async def disassociate(session: AsyncSession, outbox: Outbox, *, actor: Actor, ip: PublicIp) -> Job | None:
    if ip.server_id is None:
        raise BadRequest(f"{ip.address} is not associated", field="id")
    server = await servers.lock(session, actor=actor, server_id=ip.server_id)
    await session.refresh(ip, with_for_update=True)  # then the address (lock order): read afresh
    if ip.server_id != server.id:  # moved or unmapped by a concurrent request meanwhile
        raise InUse(f"{ip.address} changed meanwhile; retry", server_id=str(ip.server_id))
    ip.server_id, ip.association_id = None, None
    await session.flush()
    return await _send(session, outbox, actor, server)


async def release(session: AsyncSession, *, actor: Actor, ip: PublicIp) -> None:
    """Give the address back to its pool and the unit back to the quota."""
    if ip.server_id is not None:
        raise InUse(f"{ip.address} is associated; disassociate it first", server_id=str(ip.server_id))
    await quotas.lock_project(session, ip.project_id)
    await session.delete(ip)
    await quotas.issue(session, project_id=ip.project_id, server_id=None, deltas=Deltas(public_ip=-1), accept=True)


async def held(session: AsyncSession) -> list[tuple[uuid.UUID, int]]:
    """(project, addresses allocated): the public_ip usage reconciliation recomputes."""
    rows = await session.execute(sa.select(_ips.c.project_id, sa.func.count()).group_by(_ips.c.project_id))
    return [(project_id, int(n)) for project_id, n in rows.all()]


async def by_server(session: AsyncSession, server_ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The first public address mapped to each of these servers."""
    if not server_ids:
        return {}
    rows = await session.execute(
        sa.select(_ips.c.server_id, _ips.c.address).where(_ips.c.server_id.in_(server_ids)).order_by(_ips.c.address)
    )
    out: dict[uuid.UUID, str] = {}
    for sid, address in rows.all():
        out.setdefault(sid, address)
    return out
