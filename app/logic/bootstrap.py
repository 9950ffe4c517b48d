"""The seed of a fresh cloud (API.md "Running"), idempotent: safe at every start."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import accounts, catalogue, quotas
from app.logic.actor import SYSTEM
from app.models import Flavor, Image, Project, table_of

FLAVORS = (("tiny", 1, 512, 1), ("small", 1, 2048, 20), ("medium", 2, 4096, 40), ("large", 4, 8192, 80))
IMAGES = ("debian-12", "ubuntu-24.04")


class HostLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def cpus(self) -> int: ...
    @property
    def ram_mb(self) -> int: ...
    @property
    def zone(self) -> str: ...


async def seed(session: AsyncSession, *, admin_token: str | None, hosts: Iterable[HostLike] = ()) -> str | None:
    """Make what is missing; return the bootstrap admin's token when one was generated."""
    project = await accounts.find_project(session, "default")
    if project is None:
        project = Project(name="default")
        session.add(project)
        await session.flush()
    await quotas.set_limits(session, project.id, {})
    new_admin = await accounts.ensure_admin(session, project_id=project.id, token=admin_token)
    have = set(await session.scalars(sa.select(table_of(Flavor).c.name)))
    for name, vcpus, ram, disk in FLAVORS:
        if name not in have:
            session.add(Flavor(name=name, vcpus=vcpus, ram_mb=ram, disk_gb=disk))
    images = set(await session.scalars(sa.select(table_of(Image).c.name).where(table_of(Image).c.project_id.is_(None))))
    for name in IMAGES:
        if name not in images:
            session.add(Image(name=name, is_public=True))
    await catalogue.ensure_zone(session, "default")
    for host in hosts:
        await catalogue.register_host(
            session, actor=SYSTEM, name=host.name, zone=host.zone, cpus=host.cpus, ram_mb=host.ram_mb
        )
    await session.flush()
    if new_admin is None or admin_token is not None:
        return None
    return new_admin.token
