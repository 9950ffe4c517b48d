"""Domains on a host that no VM owns, and what an admin may do with one when naming it.

Reconciliation reports every such domain (``reconcile.compare``: host, name, UUID, whether it
carries Nephos's mark) and repairs on its own only one Nephos made for a VM that is DESTROYED.
Anything else -- an operator's own VM, a copy left behind -- is touched only here, by an admin
who names it by host and UUID:

* ``for_destroy``: the domain exists (the host's latest inventory lists it) and no live VM owns
  it; the edge then sends the host's agent an untracked destroy;
* ``adopt``: the domain becomes a VM of a project -- the server row takes the domain's UUID as
  its id, the flavor of its size, the operstate the host reports, the project's quota (checked,
  like any request for more) and its room on the host; the edge then has the agent mark it.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow
from app.logic import accounts, catalogue, events, hosts, placement, quotas, results
from app.logic.actor import Actor
from app.logic.errors import BadRequest, Forbidden, InUse, NotFound
from app.logic.operstate import Operstate, footprint
from app.models import Flavor, Server, table_of

_flavors = table_of(Flavor)


async def _unowned(session: AsyncSession, *, actor: Actor, host: str, domain_uuid: uuid.UUID) -> dict[str, Any]:
    """The domain as its host last reported it, if no VM row claims it."""
    if not actor.is_admin:
        raise Forbidden("acting on a host's domains needs the admin role")
    row = await hosts.get(session, host, inventory=True)
    if row is None:
        raise NotFound(f"host {host} not found", host=host)
    seen = next((d for d in (row.inventory or {}).get("domains", []) if d.get("server_id") == str(domain_uuid)), None)
    if seen is None:
        raise NotFound(
            f"host {host} reported no domain {domain_uuid} in its last inventory",
            host=host,
            domain_uuid=str(domain_uuid),
        )
    server = await session.get(Server, domain_uuid)
    if server is not None:
        if server.operstate != Operstate.DESTROYED.value:
            raise InUse(
                f"domain {domain_uuid} is server {server.id}'s: act on the server instead", server_id=str(server.id)
            )
    return dict(seen)


async def for_destroy(session: AsyncSession, *, actor: Actor, host: str, domain_uuid: uuid.UUID) -> dict[str, Any]:
    """Check that an admin may destroy this domain; returns it as reported."""
    return await _unowned(session, actor=actor, host=host, domain_uuid=domain_uuid)


async def adopt(
    session: AsyncSession,
    *,
    actor: Actor,
    host: str,
    domain_uuid: uuid.UUID,
    project_id: uuid.UUID | None,
    image: str,
    flavor: str | None = None,
    name: str | None = None,
) -> Server:
    """Make the domain a VM of ``project_id`` (see the module's docstring)."""
    seen = await _unowned(session, actor=actor, host=host, domain_uuid=domain_uuid)
    if actor.user_id is None:
        raise Forbidden("a domain is adopted by an admin user (the VM's recorded owner)")
    if await session.get(Server, domain_uuid) is not None:
        raise InUse(
            f"a destroyed VM had the id {domain_uuid}; destroy the domain instead", domain_uuid=str(domain_uuid)
        )
    target = project_id or actor.project_id
    if target is None:
        raise BadRequest("give project_id", field="project_id")
    project = await accounts.get_project(session, actor=actor, project_id=target)
    if flavor is not None:
        size = await catalogue.resolve_flavor(session, flavor_id=None, name=flavor)
        if (size.vcpus, size.ram_mb) != (seen["vcpus"], seen["ram_mb"]):
            raise BadRequest(
                f"flavor {flavor} has {size.vcpus} vCPUs and {size.ram_mb} MiB; the domain has "
                f"{seen['vcpus']} and {seen['ram_mb']}",
                field="flavor",
            )
    else:
        found = next(iter(await catalogue.flavors_of_size(session, vcpus=seen["vcpus"], ram_mb=seen["ram_mb"])), None)
        if found is None:
            raise BadRequest(
                f"no flavor has {seen['vcpus']} vCPUs and {seen['ram_mb']} MiB: create one first", field="flavor"
            )
        size = found
    picture = await catalogue.resolve_image(session, actor=actor, image_id=None, name=image)
    state = results.OBSERVED.get(seen["state"]) or Operstate.STOPPED
    host_row = await hosts.get(session, host)
    assert host_row is not None
    now = utcnow()
    server = Server(
        id=domain_uuid,
        name=name or seen.get("name") or f"adopted-{domain_uuid}",
        project_id=project.id,
        user_id=actor.user_id,
        flavor_id=size.id,
        image_id=picture.id,
        host=host,
        zone=host_row.zone,
        operstate=state.value,
        created_at=now,
        updated_at=now,
    )
    session.add(server)
    await session.flush()
    # Lock order as everywhere: host, project, quota rows.
    await placement.add(session, host=host, vcpus=size.vcpus, ram_mb=size.ram_mb)
    deltas = footprint(state, size.vcpus, size.ram_mb, size.disk_gb)
    await quotas.lock_project(session, project.id)
    await quotas.check(session, project.id, deltas)
    await quotas.issue(
        session,
        project_id=project.id,
        server_id=server.id,
        deltas=deltas,
        issuer="admin",
        accept=True,
        reason=f"adopted from host {host}",
    )
    events.record(
        session,
        server,
        "adopted",
        after=state.value,
        user_id=actor.user_id,
        message=f"domain {seen.get('name', '')} on {host} adopted by an admin",
    )
    return server
