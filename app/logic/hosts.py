"""Hosts as their agents report them: heartbeats register and revive, silence marks down,
inventories say what each host really runs."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow
from app.logic import catalogue
from app.logic.errors import BadRequest
from app.logic.hoststate import WITHOUT_INVENTORY, HostState
from app.models import Host, table_of

_hosts = table_of(Host)


async def heartbeat(
    session: AsyncSession,
    *,
    name: str,
    zone: str,
    cpus: int,
    ram_mb: int,
    at: datetime,
    migration_uri: str | None = None,
    hypervisor: str | None = None,
) -> Host:
    """Register the host on its first heartbeat; after that keep capacity current and mark it up.

    A host an admin disabled stays disabled: a heartbeat says the agent lives, not that the
    operator wants VMs placed there.
    """
    host = (
        await session.scalars(
            sa.select(Host).options(WITHOUT_INVENTORY).where(_hosts.c.name == name).with_for_update(key_share=True)
        )
    ).first()
    if host is None:
        await catalogue.ensure_zone(session, zone)
        host = Host(name=name, zone=zone, cpus=cpus, ram_mb=ram_mb, state=HostState.UP)
        session.add(host)
    else:
        if host.zone != zone:
            await catalogue.ensure_zone(session, zone)
            host.zone = zone
        host.cpus, host.ram_mb = cpus, ram_mb
        if host.state == HostState.DOWN:
            host.state = HostState.UP
    if host.last_heartbeat is None or at > host.last_heartbeat:
        host.last_heartbeat = at
    host.migration_uri = migration_uri
    host.hypervisor = hypervisor
    await session.flush()
    return host


async def store_inventory(session: AsyncSession, *, name: str, inventory: dict[str, Any], taken_at: datetime) -> bool:
    """Keep the newest inventory of a host; ``False`` if the host is unknown or this one is older."""
    done = await session.execute(
        _hosts.update()
        .where(_hosts.c.name == name, sa.or_(_hosts.c.inventory_at.is_(None), _hosts.c.inventory_at < taken_at))
        .values(inventory=inventory, inventory_at=taken_at)
    )
    return bool(done.rowcount)  # type: ignore[attr-defined]


async def mark_silent_down(session: AsyncSession, *, silent_for: timedelta) -> list[str]:
    """Hosts whose agent has not been heard for ``silent_for`` are down (no VM is placed there)."""
    cutoff = utcnow() - silent_for
    rows = await session.execute(
        _hosts.update()
        .where(_hosts.c.state == HostState.UP, _hosts.c.last_heartbeat.is_not(None), _hosts.c.last_heartbeat < cutoff)
        .values(state=HostState.DOWN)
        .returning(_hosts.c.name)
    )
    return [r[0] for r in rows]


async def get(session: AsyncSession, name: str | None, *, inventory: bool = False) -> Host | None:
    """The host named ``name``; its last inventory (every domain it runs) only if asked for."""
    if name is None:
        return None
    stmt = sa.select(Host).where(_hosts.c.name == name)
    return (await session.scalars(stmt if inventory else stmt.options(WITHOUT_INVENTORY))).first()


#: The libvirt driver of simulated hosts: migration there is a peer transfer between agents.
SIMULATED = "test"


def migration_uri_for(source: Host | None, target: Host) -> str | None:
    """How the source's libvirt reaches the target for a migration. Between simulated hosts
    there is none to need (the agents hand the domain over themselves); a host whose agent has
    not said its hypervisor is judged by that agent, which refuses a real migration without a
    URI. ``BadRequest`` where a real hypervisor is known and there is no way."""
    kinds = {h.hypervisor for h in (source, target) if h is not None}
    if kinds <= {SIMULATED, None}:
        return target.migration_uri
    if not target.migration_uri:
        raise BadRequest(
            f"host {target.name} has no migration URI: migrating to it needs libvirt on both hosts, and its agent "
            "started with --migration-uri (e.g. qemu+ssh://HOST/system)",
            host=target.name,
        )
    return target.migration_uri
