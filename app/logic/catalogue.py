"""Flavors, images, zones and hosts: what VMs are made of and where they run."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import addresses, placement, rows
from app.logic.actor import Actor, require_admin
from app.logic.addresses import Address
from app.logic.errors import BadRequest, NotFound, UnknownFlavor, UnknownZone
from app.logic.hoststate import HostState
from app.logic.pagination import Page, paginate
from app.models import Flavor, Host, Image, LeasePolicy, Zone, table_of

_flavors = table_of(Flavor)
_images = table_of(Image)
_lease_policies = table_of(LeasePolicy)


class ImageStatus(StrEnum):
    """An image's life: usable (``active``), being written by save_image, failed, or removed."""

    ACTIVE = "active"
    SAVING = "saving"
    ERROR = "error"
    DELETED = "deleted"


_hosts = table_of(Host)
_zones = table_of(Zone)


@dataclass(frozen=True)
class Labels:
    """Names of the flavors and images some servers use, for representations that show them."""

    flavors: dict[uuid.UUID, str]
    images: dict[uuid.UUID, str]
    addresses: dict[uuid.UUID, list[Address]]


def _names(postgres: bool) -> sa.CompoundSelect[Any]:
    """The names of some flavors and images, by id, each row saying which it is."""
    return sa.union_all(
        sa.select(_flavors.c.id, _flavors.c.name, sa.literal(True).label("flavor")).where(
            rows.among(_flavors.c.id, "flavors", postgres=postgres)
        ),
        sa.select(_images.c.id, _images.c.name, sa.literal(False).label("flavor")).where(
            rows.among(_images.c.id, "images", postgres=postgres)
        ),
    )


_NAMES = rows.ByDialect(_names)


async def labels(session: AsyncSession, servers: Iterable[Any]) -> Labels:
    """The names of the flavors and images of ``servers`` and their addresses (two queries,
    whatever their number)."""
    listed = list(servers)
    flavors: dict[uuid.UUID, str] = {}
    images: dict[uuid.UUID, str] = {}
    if listed:
        wanted = {"flavors": list({s.flavor_id for s in listed}), "images": list({s.image_id for s in listed})}
        for found, name, is_flavor in (await session.execute(_NAMES.of(session), wanted)).all():
            (flavors if is_flavor else images)[found] = name
    return Labels(flavors, images, await addresses.addresses_of(session, [s.id for s in listed]))


# -- flavors -------------------------------------------------------------------


_FLAVOR_NAMED = sa.select(Flavor).where(_flavors.c.name == sa.bindparam("name"))


async def resolve_flavor(
    session: AsyncSession, *, flavor_id: uuid.UUID | None, name: str | None, field: str = "flavor"
) -> Flavor:
    _asked("flavor", flavor_id, name, field)
    if flavor_id is not None:  # by key: no statement when this transaction already read it
        flavor = await session.get(Flavor, flavor_id)
    else:
        flavor = (await session.scalars(_FLAVOR_NAMED, {"name": name})).first()
    return flavor_found(flavor, flavor_id=flavor_id, name=name, field=field)


def _asked(what: str, key: Any, name: str | None, field: str | None = None) -> None:
    """A flavor or an image is asked for by id or by name: refuse a request that gives neither."""
    if key is None and not name:
        field = field or what
        raise BadRequest(f"give {field}_id or {field}", field=f"{field}_id")


def flavor_found(
    flavor: Flavor | None, *, flavor_id: uuid.UUID | None, name: str | None, field: str = "flavor"
) -> Flavor:
    """The flavor asked for by id or name, once read, or the refusal when there is none."""
    if flavor is None:
        raise UnknownFlavor(
            f"flavor {flavor_id or name} does not exist", field=f"{field}_id", names=[str(flavor_id or name)]
        )
    return flavor


async def flavors_of_size(session: AsyncSession, *, vcpus: int, ram_mb: int) -> list[Flavor]:
    """The flavors of exactly this size, by name (a domain's size, read off its host)."""
    stmt = sa.select(Flavor).where(_flavors.c.vcpus == vcpus, _flavors.c.ram_mb == ram_mb)
    return list(await session.scalars(stmt.order_by(_flavors.c.name)))


async def all_flavors(session: AsyncSession) -> list[Flavor]:
    """Every flavor, smallest first (the capacity view)."""
    stmt = sa.select(Flavor).order_by(_flavors.c.vcpus, _flavors.c.ram_mb, _flavors.c.name)
    return list(await session.scalars(stmt))


async def list_flavors(
    session: AsyncSession, *, limit: int, cursor: str | None
) -> tuple[Page[Flavor], dict[uuid.UUID, dict[str, int]]]:
    """A page of flavors, and per flavor how many more VMs of it each zone's up hosts take now."""
    page = await paginate(session, sa.select(Flavor), _flavors.c.id, limit=limit, cursor=cursor)
    room: dict[uuid.UUID, dict[str, int]] = {f.id: {} for f in page.items}
    for fit in await placement.fits(session, page.items):
        room[fit.flavor.id][fit.zone] = fit.now
    return page, room


async def create_flavor(
    session: AsyncSession, *, actor: Actor, name: str, vcpus: int, ram_mb: int, disk_gb: int
) -> Flavor:
    require_admin(actor)
    if vcpus <= 0 or ram_mb <= 0 or disk_gb < 0:
        raise BadRequest("vcpus and ram_mb must be positive, disk_gb not negative")
    flavor = Flavor(name=name, vcpus=vcpus, ram_mb=ram_mb, disk_gb=disk_gb)
    await rows.insert_unique(session, flavor, f"flavor {name}")
    return flavor


# -- images --------------------------------------------------------------------


def visible_images(actor: Actor) -> sa.Select[Image]:
    """The images ``actor`` may see and use: public ones and its project's (an admin: all)."""
    return sa.select(Image).where(_image_seen(actor.is_admin, actor.project_id))


def _image_seen(admin: bool, project: Any) -> sa.ColumnElement[bool]:
    """``visible_images``' rule, as a condition (``project``: the actor's project, or a
    parameter standing for it)."""
    seen = _images.c.status != ImageStatus.DELETED.value
    if admin:
        return seen
    return sa.and_(seen, sa.or_(_images.c.is_public.is_(True), _images.c.project_id == project))


def _sees(actor: Actor, image: Image) -> bool:
    """``visible_images``, for one image already read."""
    return image.status != ImageStatus.DELETED.value and (
        actor.is_admin or image.is_public or image.project_id == actor.project_id
    )


@functools.cache
def _first_reads(flavor_by: str, image_by: str, admin: bool, along: sa.Insert | None) -> sa.Select[*tuple[Any, ...]]:
    """``first_reads``' statement for one shape of request, built once: each of the three is
    outer-joined to a one-row table, so a missing one is a ``None``, not a missing row.
    ``along``: an INSERT that returns a row when it wrote one, sent as a CTE of it; the last
    column counts the rows it returned (PostgreSQL)."""
    one = sa.select(sa.literal_column("1").label("one")).subquery("one")
    flavor_is = (
        _flavors.c.id == sa.bindparam("flavor_id") if flavor_by == "id" else _flavors.c.name == sa.bindparam("flavor")
    )
    image_is = {
        "id": _images.c.id == sa.bindparam("image_id"),
        "ec2_id": _images.c.ec2_id == sa.bindparam("image_ec2_id"),
        # by name, only among those the actor may see: a name others use is not ambiguous here
        "name": sa.and_(_images.c.name == sa.bindparam("image"), _image_seen(admin, sa.bindparam("project"))),
    }[image_by]
    statement = (
        sa.select(Flavor, Image, LeasePolicy)
        .select_from(one)
        .outerjoin(_flavors, flavor_is)
        .outerjoin(_images, image_is)
        .outerjoin(_lease_policies, _lease_policies.c.project_id == sa.bindparam("project"))
        .limit(2)
    )
    if along is None:
        return statement
    written = along.cte("along")
    return statement.add_columns(sa.select(sa.func.count()).select_from(written).scalar_subquery())


@dataclass(frozen=True)
class FirstReads:
    """What a create reads first, in one statement: its flavor, the images it may mean (by id or
    EC2 id: the one, if the actor may see it; by name: up to two of those it may see) and its
    project's lease policy row (``None``: the default policy)."""

    flavor: Flavor | None
    images: list[Image]
    lease: LeasePolicy | None
    along: bool | None = None  # the INSERT sent with it wrote its row (None: there was none)


async def first_reads(
    session: AsyncSession,
    *,
    actor: Actor,
    flavor_id: uuid.UUID | None = None,
    flavor: str | None = None,
    image_id: uuid.UUID | None = None,
    image: str | None = None,
    image_ec2_id: str | None = None,
    along: tuple[sa.Insert, dict[str, Any]] | None = None,
) -> FirstReads:
    """A create's flavor, image and lease policy, in one statement (three before). A request
    that names no flavor or no image is refused first, as ``resolve_flavor`` and
    ``resolve_image`` refuse it. ``along``: an INSERT (built once) and its parameters that
    return a row when it wrote one (a launch's client token, ``ec2.token_claim``), sent first:
    in the same statement on PostgreSQL, before it elsewhere; ``FirstReads.along`` says
    whether it wrote. Its parameters are named apart from these."""
    _asked("flavor", flavor_id, flavor)
    _asked("image", image_id or image_ec2_id, image)
    wrote: bool | None = None
    joined = along if along is not None and rows.postgres(session) else None  # sent in the statement
    if along is not None and joined is None:
        wrote = (await session.execute(*along)).first() is not None
    image_by = "id" if image_id is not None else ("ec2_id" if image_ec2_id is not None else "name")
    flavor_by = "id" if flavor_id is not None else "name"
    statement = _first_reads(flavor_by, image_by, actor.is_admin, joined[0] if joined else None)
    params = {
        "flavor_id": flavor_id,
        "flavor": flavor,
        "image_id": image_id,
        "image": image,
        "image_ec2_id": image_ec2_id,
        "project": actor.project_id,
    }  # (those the shape does not use are not sent)
    if joined:
        params |= joined[1]
    found = (await session.execute(statement, params)).all()
    if joined:
        wrote = bool(found[0][3])
    images = [row[1] for row in found if row[1] is not None]
    if image_by != "name":  # by key: seen or not, as ``resolve_image`` asks
        images = [i for i in images[:1] if _sees(actor, i)]
    return FirstReads(found[0][0] if found else None, images, found[0][2] if found else None, wrote)


async def resolve_image(session: AsyncSession, *, actor: Actor, image_id: uuid.UUID | None, name: str | None) -> Image:
    _asked("image", image_id, name)
    if image_id is not None:  # by key: no statement when this transaction already read it
        image = await session.get(Image, image_id)
        found = [image] if image is not None and _sees(actor, image) else []
    else:
        found = list(await session.scalars(visible_images(actor).where(_images.c.name == name).limit(2)))
    return image_found(found, image_id=image_id, name=name)


def image_found(found: list[Image], *, image_id: uuid.UUID | None, name: str | None) -> Image:
    """The image asked for by id or name, of those read that the actor may see (at most two),
    or the refusal: none, two of that name, or one not active."""
    if not found:
        raise BadRequest(f"image {image_id or name} does not exist", field="image_id")
    if len(found) > 1:
        raise BadRequest(f"image name {name} is ambiguous: use image_id", field="image")
    if found[0].status != ImageStatus.ACTIVE.value:
        raise BadRequest(f"image {found[0].name} is {found[0].status}", field="image_id")
    return found[0]


async def list_images(session: AsyncSession, *, actor: Actor, limit: int, cursor: str | None) -> Page[Image]:
    return await paginate(session, visible_images(actor), _images.c.id, limit=limit, cursor=cursor)


async def create_image(
    session: AsyncSession,
    *,
    actor: Actor,
    name: str,
    is_public: bool = True,
    disk_format: str = "qcow2",
    source_url: str = "",
) -> Image:
    require_admin(actor)
    image = Image(
        name=name,
        is_public=is_public,
        disk_format=disk_format,
        source_url=source_url,
        project_id=None if is_public else actor.project_id,
    )
    session.add(image)
    await session.flush()
    return image


# -- zones and hosts -------------------------------------------------------------


async def ensure_zone(session: AsyncSession, name: str) -> Zone:
    zone = (await session.scalars(sa.select(Zone).where(_zones.c.name == name))).first()
    if zone is None:
        zone = Zone(name=name)
        session.add(zone)
        await session.flush()
    return zone


async def check_zone(session: AsyncSession, name: str) -> None:
    if (await session.scalars(sa.select(_zones.c.id).where(_zones.c.name == name))).first() is None:
        raise UnknownZone(f"zone {name} does not exist", field="zone", name=name)


@dataclass(frozen=True)
class ZoneView:
    zone: Zone
    hosts: int
    hosts_up: int


async def list_zones(session: AsyncSession, *, limit: int, cursor: str | None) -> Page[ZoneView]:
    page = await paginate(session, sa.select(Zone), _zones.c.id, limit=limit, cursor=cursor)
    counts = {
        (zone, state): n
        for zone, state, n in (
            await session.execute(
                sa.select(_hosts.c.zone, _hosts.c.state, sa.func.count()).group_by(_hosts.c.zone, _hosts.c.state)
            )
        ).all()
    }
    views = [
        ZoneView(z, sum(n for (zn, _), n in counts.items() if zn == z.name), counts.get((z.name, HostState.UP), 0))
        for z in page.items
    ]
    return Page(views, page.next_cursor)


async def list_hosts(session: AsyncSession, *, actor: Actor, limit: int, cursor: str | None) -> Page[Host]:
    require_admin(actor)
    return await paginate(session, sa.select(Host), _hosts.c.id, limit=limit, cursor=cursor)


async def register_host(
    session: AsyncSession,
    *,
    actor: Actor,
    name: str,
    zone: str,
    cpus: int,
    ram_mb: int,
    cpu_ratio: float = 4.0,
    ram_ratio: float = 1.0,
    state: str = HostState.UP,
) -> Host:
    """Create a host, or update its capacity and zone if it exists (an agent re-registering)."""
    require_admin(actor)
    if cpus <= 0 or ram_mb <= 0 or cpu_ratio <= 0 or ram_ratio <= 0:
        raise BadRequest("cpus, ram_mb and the ratios must be positive")
    await ensure_zone(session, zone)
    host = (await session.scalars(sa.select(Host).where(_hosts.c.name == name))).first()
    if host is None:
        host = Host(
            name=name, zone=zone, cpus=cpus, ram_mb=ram_mb, cpu_ratio=cpu_ratio, ram_ratio=ram_ratio, state=state
        )
        session.add(host)
    else:
        host.zone, host.cpus, host.ram_mb = zone, cpus, ram_mb
        host.cpu_ratio, host.ram_ratio = cpu_ratio, ram_ratio
    await session.flush()
    return host


async def set_host_state(session: AsyncSession, *, actor: Actor, name: str, state: str) -> Host:
    require_admin(actor)
    if state not in set(HostState):
        raise BadRequest("state is one of up, down, disabled", state=state)
    host = (await session.scalars(sa.select(Host).where(_hosts.c.name == name))).first()
    if host is None:
        raise NotFound(f"host {name} not found", host=name)
    host.state = state
    return host


async def hosts_up(session: AsyncSession) -> int:
    return int(
        (
            await session.execute(sa.select(sa.func.count()).select_from(_hosts).where(_hosts.c.state == HostState.UP))
        ).scalar_one()
    )
