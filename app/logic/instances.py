"""VMs as instances: found by their EC2 ids, listed with EC2's filters and pages, launched as a
reservation -- the queries and rules the EC2 facade used to keep, here for any caller.

Every rule is the logic layer's own: a launch is ``servers.create`` (quotas, placement, jobs),
with what EC2 adds around it -- as many as fit between a minimum and a maximum, a client token
that makes a repeat return the same reservation (even when two race), tags, security groups and
termination protection, all in the caller's transaction.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Container
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import ec2_id, utcnow
from app.logic import catalogue, ec2, ec2_tags, firewall_rules, keypairs, leases, networks, rows, secgroups, servers
from app.logic.actor import Actor
from app.logic.addresses import Address
from app.logic.catalogue import ImageStatus
from app.logic.errors import (
    IdempotencyConflict,
    ImageUnavailable,
    NoCapacity,
    OverLimit,
    UnknownFlavor,
    UnknownImage,
    UnknownInstances,
    UnknownKeyPair,
)
from app.logic.hoststate import HostState
from app.logic.jobs import Outbox
from app.models import (
    Ec2Tag,
    Flavor,
    Host,
    Image,
    Port,
    SecurityGroup,
    Server,
    ServerSecurityGroup,
    Zone,
    table_of,
)

_servers, _flavors, _images, _zones = table_of(Server), table_of(Flavor), table_of(Image), table_of(Zone)
_tags, _sgroups, _members = table_of(Ec2Tag), table_of(SecurityGroup), table_of(ServerSecurityGroup)
_ports = table_of(Port)


@dataclass(frozen=True)
class Row:
    """An instance as listings show it: the VM, its EC2 state, flavor name and image id; and,
    when the transaction that made it knows them already (a launch), its tags (by key), its
    groups as (EC2 id, name) by name, and its addresses in NIC order (``None``: to be read)."""

    server: Server
    state: str
    flavor: str
    image: str
    tags: list[tuple[str, str]] | None = None
    groups: list[tuple[str, str]] | None = None
    addresses: list[Address] | None = None


_SELECT = (
    sa.select(Server, ec2.STATE, _flavors.c.name, _images.c.ec2_id)
    .join(_flavors, _flavors.c.id == _servers.c.flavor_id)
    .join(_images, _images.c.id == _servers.c.image_id)
)


def _rows(result: Any) -> list[Row]:
    return [Row(*r) for r in result.all()]


def _every_one(ids: list[str], found: Container[str]) -> None:
    """``UnknownInstances`` naming those of ``ids`` not ``found``, if any."""
    unknown = [i for i in ids if i not in found]
    if unknown:
        raise UnknownInstances(f"instances {', '.join(unknown)} do not exist", ids=unknown)


async def find(session: AsyncSession, project_id: uuid.UUID, ids: list[str]) -> list[Server]:
    """The instances named, in the order named: all of them visible in this project, or
    ``UnknownInstances`` naming the others."""
    found = await ec2.instances(session, project_id, ids)
    _every_one(ids, found)
    return [found[i] for i in ids]


def _named_for_change(postgres: bool) -> sa.Select[Any]:
    """The project's visible instances among some EC2 ids, locked in id order (the order of
    multi-row locks), each with its EC2 state and what an action on it needs."""
    return (
        servers.FOR_ACTION.add_columns(ec2.STATE)
        .where(
            ec2.visible(sa.bindparam("project_id"), sa.bindparam("since")),
            rows.among(_servers.c.ec2_id, "ids", postgres=postgres),
        )
        .order_by(_servers.c.id)
    )


_NAMED_FOR_CHANGE = rows.ByDialect(_named_for_change)


@contextlib.asynccontextmanager
async def locked_for_change(
    session: AsyncSession, project_id: uuid.UUID, ids: list[str]
) -> AsyncIterator[list[tuple[Server, str]]]:
    """``find`` for a state change (Start/Stop/Reboot/TerminateInstances), each instance with its
    EC2 state: the instances are locked, in id order, in the same one statement, and the actions
    run inside take them from it (``servers.holding``) instead of locking each again."""
    values = {"project_id": project_id, "since": utcnow() - ec2.TERMINATED_VISIBLE, "ids": ids}
    found = (await session.execute(_NAMED_FOR_CHANGE.of(session), values)).all()
    by_ec2_id = {row[0].ec2_id: row for row in found}
    _every_one(ids, by_ec2_id)
    with servers.holding(session, [(server, flavor, host) for server, flavor, host, _ in found]):
        yield [(by_ec2_id[i][0], str(by_ec2_id[i][3])) for i in ids]


def _groups(column: Any) -> ec2.Filter:
    return lambda values: _servers.c.id.in_(
        sa.select(_members.c.server_id)
        .join(_sgroups, _sgroups.c.id == _members.c.group_id)
        .where(ec2.matches(column, values))
    )


#: DescribeInstances' filters (tag:KEY is handled by name).
FILTERS: dict[str, ec2.Filter] = {
    "instance-id": _servers.c.ec2_id,
    "image-id": _images.c.ec2_id,
    "instance-type": _flavors.c.name,
    "key-name": _servers.c.key_name,
    "availability-zone": _servers.c.zone,
    "client-token": _servers.c.client_token,
    "reservation-id": _servers.c.reservation_id,
    "instance-state-name": ec2.STATE,
    "instance-state-code": ec2.state_codes,
    "instance.group-id": _groups(_sgroups.c.ec2_id),
    "group-id": _groups(_sgroups.c.ec2_id),
    "instance.group-name": _groups(_sgroups.c.name),
    "group-name": _groups(_sgroups.c.name),
    "tag-key": lambda values: sa.or_(
        ec2_tags.has_tag(ec2.matches(_tags.c.key, values)),
        sa.and_(_servers.c.lease_expires_at.is_not(None), ec2.matches(sa.literal(ec2_tags.LEASE_TAG), values)),
    ),
    "tag-value": lambda values: ec2_tags.has_tag(ec2.matches(_tags.c.value, values)),
    "private-ip-address": lambda values: sa.exists().where(
        _ports.c.server_id == _servers.c.id, ec2.matches(_ports.c.ip, values)
    ),
    "network-interface.mac-address": lambda values: sa.exists().where(
        _ports.c.server_id == _servers.c.id, ec2.matches(_ports.c.mac, values)
    ),
}


def _with_tags(given: ec2.Given) -> dict[str, ec2.Filter]:
    known = dict(FILTERS)
    for name, _ in given:
        if name == f"tag:{ec2_tags.LEASE_TAG}":
            known[name] = ec2_tags.lease_tag_filter
        elif name.startswith("tag:"):
            key = name[4:]
            known[name] = lambda values, key=key: ec2_tags.tag_filter(key, values)  # type: ignore[misc]
    return known


@dataclass(frozen=True)
class Listing:
    """What to list: named ids (each must exist) or a page (after a cursor, of ``size``)."""

    ids: list[str] = field(default_factory=list)
    filters: ec2.Given = field(default_factory=list)
    after: uuid.UUID | None = None
    size: int | None = None


async def page(
    session: AsyncSession, stmt: sa.Select[Any], *, project_id: uuid.UUID, listing: Listing
) -> tuple[list[Any], uuid.UUID | None]:
    """One page of ``stmt`` (its first column a Server) over the project's visible instances, in id
    order; and the id to continue after, when there is more."""
    stmt = stmt.where(ec2.visible(project_id))
    if listing.ids:
        await find(session, project_id, listing.ids)
        stmt = stmt.where(_servers.c.ec2_id.in_(listing.ids))
    if listing.after is not None:
        stmt = stmt.where(_servers.c.id > listing.after)
    stmt = stmt.order_by(_servers.c.id)
    if listing.size is not None:
        stmt = stmt.limit(listing.size + 1)
    rows = list((await session.execute(stmt)).all())
    if listing.size is not None and len(rows) > listing.size:
        rows = rows[: listing.size]
        return rows, rows[-1][0].id
    return rows, None


async def describe(
    session: AsyncSession, *, project_id: uuid.UUID, listing: Listing
) -> tuple[list[Row], uuid.UUID | None]:
    """DescribeInstances: the project's instances, filtered and paged in the database."""
    stmt = ec2.where(_SELECT, _with_tags(listing.filters), listing.filters)
    rows, more = await page(session, stmt, project_id=project_id, listing=listing)
    return [Row(*r) for r in rows], more


_RESERVATION = _SELECT.where(
    _servers.c.reservation_id == sa.bindparam("reservation"), _servers.c.project_id == sa.bindparam("project")
).order_by(_servers.c.id)


async def reservation(session: AsyncSession, project_id: uuid.UUID, reservation_id: str) -> list[Row]:
    """The instances of one reservation (one launch), in id order."""
    return _rows(await session.execute(_RESERVATION, {"reservation": reservation_id, "project": project_id}))


# -- launching ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """RunInstances' parameters, as the facade parsed them."""

    image: str  # ami- id
    flavor: str  # instance type = flavor name
    low: int
    high: int
    key_name: str | None = None
    user_data: str | None = None
    zone: str | None = None
    tags: list[tuple[str, str]] = field(default_factory=list)
    group_ids: list[str] = field(default_factory=list)
    group_names: list[str] = field(default_factory=list)
    protect: bool = False
    client_token: str | None = None
    subnet_id: str | None = None  # the network to launch in (its EC2 id)
    private_ip: str | None = None  # the instance's address in it
    request_hash: str = ""  # the parameters' digest: a token reused with others is a conflict


async def _earlier(session: AsyncSession, actor: Actor, launch: Launch) -> str | None:
    """The reservation this client token already made, if any (``IdempotencyConflict`` when it
    was made with other parameters)."""
    assert actor.project_id is not None and launch.client_token is not None
    earlier = await ec2.token(session, actor.project_id, launch.client_token)
    if earlier is None:
        return None
    if earlier.request_hash != launch.request_hash:
        raise IdempotencyConflict("the client token was already used with different parameters")
    return earlier.reservation_id


async def launch(
    session: AsyncSession, outbox: Outbox, *, actor: Actor, spec: Launch, claim_token: bool = True
) -> list[Row]:
    """RunInstances: as many VMs as fit between ``low`` and ``high`` (none unless ``low`` do), one
    reservation; a repeated client token returns the reservation it made. ``claim_token`` false
    (a dry run) neither reads nor records the token."""
    assert actor.project_id is not None
    project_id = actor.project_id
    reservation_id = ec2_id("r")  # the VMs of one launch are one reservation
    # The client token is claimed first thing, in the statement that reads the image, the
    # flavor and the lease policy (``ec2.token_claim``): a twin's claim waits there for this
    # transaction to end, having done no work.
    claim = (
        ec2.token_claim(session, project_id, spec.client_token, spec.request_hash, reservation_id)
        if spec.client_token and claim_token
        else None
    )
    while True:
        first = await catalogue.first_reads(
            session, actor=actor, image_ec2_id=spec.image, flavor=spec.flavor, along=claim
        )
        if claim is None or first.along:
            break
        made = await _earlier(session, actor, spec)
        if made is not None:
            return await reservation(session, project_id, made)
        # Taken, then gone before it could be read (its project removed meanwhile): claim again.
    image, flavor = first.images[0] if first.images else None, first.flavor
    if image is None:
        raise UnknownImage(f"image {spec.image} does not exist", ids=[spec.image])
    if image.status != ImageStatus.ACTIVE.value:
        state = ec2.IMAGE_STATES[ImageStatus(image.status)]
        raise ImageUnavailable(f"image {spec.image} is {state}", ids=[spec.image], state=state)
    if flavor is None:  # the refusal resolve_flavor gives, whatever the name
        flavor = await catalogue.resolve_flavor(session, flavor_id=None, name=spec.flavor)
    if spec.key_name is not None and await keypairs.find(session, project_id=project_id, name=spec.key_name) is None:
        raise UnknownKeyPair(f"key pair {spec.key_name} does not exist", name=spec.key_name)
    if spec.zone:
        await catalogue.check_zone(session, spec.zone)
    groups = await secgroups.find(session, project_id, ec2_ids=spec.group_ids, names=spec.group_names)
    nets = None
    if spec.subnet_id:
        nets = [str(n.id) for n in await networks.by_subnet(session, project_id, [spec.subnet_id])]

    created: list[servers.Created] = []
    name = dict(spec.tags).get("Name", "") or "ec2"
    fit = await servers.how_many(session, actor=actor, flavor=flavor, low=spec.low, high=spec.high)
    counts = sorted({fit, spec.low}, reverse=True)
    for count in counts:
        create = servers.CreateSpec(
            name=name,
            flavor_id=flavor.id,
            image_id=image.id,
            count=count,
            key_name=spec.key_name,
            user_data=spec.user_data,
            zone=spec.zone or None,
            client_token=spec.client_token,
            reservation_id=reservation_id,
            networks=nets,
            fixed_ip=spec.private_ip,
        )
        # A savepoint only when a lower count could be tried after a refusal.
        attempt = session.begin_nested() if len(counts) > 1 else contextlib.nullcontext()
        try:
            async with attempt:
                created = await servers.create(
                    session, outbox, actor=actor, spec=create, lease=leases.policy_of(first.lease)
                )
            break
        except (OverLimit, NoCapacity):
            outbox.clear()
            if count == spec.low:
                raise
    await ec2_tags.set_tags(session, project_id, [c.server.ec2_id for c in created], spec.tags, new=True)
    await secgroups.set_members(session, [c.server.id for c in created], groups, new=True)
    for c in created:  # the groups' rules go with the create job
        if c.job is not None and groups:
            c.job.params = {**c.job.params, "firewall": await firewall_rules.params_for(session, c.server.id)}
    for c in created:
        c.server.disable_api_termination = spec.protect
    await session.flush()
    # The reply is what this transaction wrote: nothing to read back.
    tags = sorted(dict(spec.tags).items())
    shown_groups = sorted(((g.ec2_id, g.name) for g in groups), key=lambda g: (g[1], g[0]))
    return [
        Row(
            c.server,
            ec2.state_of(c.server.operstate, c.server.task),
            flavor.name,
            image.ec2_id,
            tags=tags,
            groups=shown_groups,
            addresses=c.addresses,
        )
        for c in sorted(created, key=lambda c: c.server.id)
    ]


# -- status, and what an instance is made of ---------------------------------------------------

_hosts = table_of(Host)

#: A running instance is "ok" while its host is up, "impaired" while it is down; a stopped,
#: pending or terminated one has no status ("not-applicable").
STATUS: sa.ColumnElement[str] = sa.case(
    (ec2.STATE != "running", "not-applicable"),
    (_hosts.c.state == HostState.UP, "ok"),
    else_="impaired",
).label("status")

STATUS_FILTERS: dict[str, ec2.Filter] = {
    "availability-zone": _servers.c.zone,
    "instance-state-name": ec2.STATE,
    "instance-state-code": ec2.state_codes,
    "instance-status.status": STATUS,
    "system-status.status": STATUS,
}


async def statuses(
    session: AsyncSession, *, project_id: uuid.UUID, listing: Listing, include_all: bool
) -> tuple[list[tuple[Server, str, str]], uuid.UUID | None]:
    """DescribeInstanceStatus: (server, EC2 state, status) -- running instances only unless
    ``include_all`` or ids are named."""
    stmt = sa.select(Server, ec2.STATE, STATUS).outerjoin(_hosts, _hosts.c.name == _servers.c.host)
    if not listing.ids and not include_all:
        stmt = stmt.where(ec2.STATE == "running")
    stmt = ec2.where(stmt, STATUS_FILTERS, listing.filters)
    rows, more = await page(session, stmt, project_id=project_id, listing=listing)
    return [(s, str(state), str(status)) for s, state, status in rows], more


async def flavor_id(session: AsyncSession, name: str) -> uuid.UUID:
    """The id of the flavor (instance type) of this name, or ``UnknownFlavor``."""
    if not name:  # an empty InstanceType names no flavor (catalogue would ask for one)
        raise UnknownFlavor("an instance type is needed", names=[name])
    return (await catalogue.resolve_flavor(session, flavor_id=None, name=name)).id


async def flavor_name(session: AsyncSession, server: Server) -> str:
    return str(await session.scalar(sa.select(_flavors.c.name).where(_flavors.c.id == server.flavor_id)))
