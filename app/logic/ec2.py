"""What the EC2 facade keeps beside the logic layer: EC2 ids, state names, tags, client tokens.

Every VM has an ``i-`` id and an ``r-`` reservation id, every image an ``ami-`` id, however
they were made (REST or EC2). The six AWS state names are one SQL expression over operstate
and task (``STATE``), so DescribeInstances filters and pages on them in the database, and a
reply can never show a name a waiter does not know.
"""

from __future__ import annotations

import fnmatch
import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow
from app.logic import networks, rows
from app.logic.actor import Actor
from app.logic.catalogue import ImageStatus, visible_images
from app.logic.errors import InvalidState, UnknownFilter, UnknownFlavor, UnknownImage
from app.logic.operstate import TABLE, Action, Operstate, Task, decide
from app.models import Ec2ClientToken, Flavor, Image, Network, PublicIp, Server, Zone, table_of

_servers, _images = table_of(Server), table_of(Image)
_flavors, _zones = table_of(Flavor), table_of(Zone)

#: How long a terminated instance stays listed.
TERMINATED_VISIBLE = timedelta(hours=1)
CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}
STATE_OF_CODE = {str(code): name for name, code in CODES.items()}
ID = re.compile(r"^(i|r|ami|sg|sgr|key|subnet)-([0-9a-f]{8}|[0-9a-f]{17})$")

_S, _T = Operstate, Task
#: operstate + task -> AWS state name, the first rule that holds (EC2.md: a terminate never shows
#: stopping, a stop never shows pending, a reboot stays running). A rule is (name, operstates,
#: tasks); ``None`` there means any. ``STATE`` (SQL, for filters and pages) and ``state_of``
#: (Python, for a row this transaction just wrote) are both read off this one list.
STATE_RULES: tuple[tuple[str, frozenset[Operstate] | None, frozenset[Task] | None], ...] = (
    ("terminated", frozenset({_S.DESTROYED}), None),
    ("shutting-down", None, frozenset({_T.DESTROY})),
    ("pending", frozenset({_S.HOLD, _S.BUILD}), None),
    ("pending", None, frozenset({_T.START, _T.RESUME})),
    ("stopping", None, frozenset({_T.STOP})),
    ("stopping", frozenset({_S.STARTED}), frozenset({_T.SAVE_IMAGE})),
    ("running", frozenset({_S.STARTED}), None),
)
#: The state when no rule holds.
OTHERWISE = "stopped"


def _holds(operstates: frozenset[Operstate] | None, tasks: frozenset[Task] | None) -> sa.ColumnElement[bool]:
    def among(column: sa.ColumnElement[str], values: frozenset[Any]) -> sa.ColumnElement[bool]:
        ordered = sorted(v.value for v in values)
        return column == ordered[0] if len(ordered) == 1 else column.in_(ordered)

    found = []
    if operstates is not None:
        found.append(among(_servers.c.operstate, operstates))
    if tasks is not None:
        found.append(among(_servers.c.task, tasks))
    return sa.and_(*found)


STATE: sa.ColumnElement[str] = sa.case(
    *((_holds(operstates, tasks), name) for name, operstates, tasks in STATE_RULES), else_=OTHERWISE
).label("ec2_state")


def state_of(operstate: str, task: str | None) -> str:
    """``STATE`` of a VM whose operstate and task are known (the same rules, in Python)."""
    for name, operstates, tasks in STATE_RULES:
        if (operstates is None or operstate in operstates) and (tasks is None or task in tasks):
            return name
    return OTHERWISE


#: An image's status as EC2 names it: DescribeImages' ``imageState`` and its ``state`` filter read
#: this one table, so a filter compares what the reply shows (``available``), never ``active``.
IMAGE_STATES: dict[ImageStatus, str] = {
    ImageStatus.ACTIVE: "available",
    ImageStatus.SAVING: "pending",
    ImageStatus.ERROR: "failed",
    ImageStatus.DELETED: "deregistered",
}
IMAGE_STATE: sa.ColumnElement[str] = sa.case(
    *((_images.c.status == status.value, name) for status, name in IMAGE_STATES.items()),
    else_="failed",
).label("ec2_image_state")


# -- what an EC2 verb means, read off the operstate table ----------------------------------------

#: The operstate actions an EC2 verb may mean, tried in order: the first allowed from the VM's
#: operstate is the one. StartInstances on a suspended VM resumes it, on a held one releases it.
VERBS: dict[str, tuple[Action, ...]] = {
    "start": (Action.START, Action.RESUME, Action.RELEASE),
    "stop": (Action.STOP,),
    "reboot": (Action.REBOOT,),
    "terminate": (Action.DESTROY,),
}
#: Verbs that succeed doing nothing when the VM is already where they lead, or on its way there
#: (AWS: starting a running instance, stopping a stopped one, terminating a terminated one).
IDEMPOTENT = frozenset({"start", "stop", "terminate"})


def _goal_of_task(task: str | None) -> Operstate | None:
    """Where the pending task leads, by the table's rule for it."""
    return next((rule.on_success for rule in TABLE.values() if rule.task == task), None)


def verb_action(verb: str, operstate: Operstate, task: str | None) -> Action | None:
    """The operstate action an EC2 verb means for a VM, or ``None`` when there is nothing to do.

    Everything comes from ``operstate.TABLE``: the candidates' ``allowed_from`` say which one
    applies, their ``on_success`` where the verb leads, and ``decide`` refuses (``TaskPending``,
    ``InvalidState``) exactly as it does for REST. The facade only translates the refusal.
    """
    candidates = VERBS[verb]
    goal = TABLE[candidates[0]].on_success
    if verb in IDEMPOTENT:
        if task is None and operstate is goal:
            return None
        if task is not None and _goal_of_task(task) is goal:
            return None  # already on its way (a destroy while one is pending included)
    for action in candidates:
        if operstate in TABLE[action].allowed_from:
            decide(action, operstate, task)
            return action
    decide(candidates[0], operstate, task)  # raises: TaskPending, or InvalidState
    raise InvalidState(f"{verb} is not allowed in operstate {operstate.value}", operstate=operstate.value)


def state_codes(codes: list[str]) -> sa.ColumnElement[bool]:
    """The ``instance-state-code`` filter: instances in the states of these codes."""
    return STATE.in_([STATE_OF_CODE.get(c, "") for c in codes])


def well_formed(ec2_id: str, prefix: str) -> bool:
    m = ID.match(ec2_id)
    return m is not None and m.group(1) == prefix


def like(pattern: str) -> str:
    """An EC2 filter value (``*`` and ``?`` wildcards) as a LIKE pattern (escape ``\\``)."""
    out = []
    for ch in pattern:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


#: A filter: a column matched with EC2's wildcards, or a function of the values giving the clause.
Filter = sa.ColumnElement[Any] | Callable[[list[str]], sa.ColumnElement[bool]]
#: Filters as a request gives them: (name, values), in order.
Given = list[tuple[str, list[str]]]


def where(stmt: Any, known: dict[str, Filter], given: Given) -> Any:
    """``given`` filters as WHERE clauses: OR across one name's values, AND across names; a name
    the listing does not know is ``UnknownFilter``."""
    for name, values in given:
        found = known.get(name)
        if found is None:
            raise UnknownFilter(f"unsupported filter name {name}", name=name)
        stmt = stmt.where(matches(found, values) if isinstance(found, sa.ColumnElement) else found(values))
    return stmt


def matches(column: Any, values: list[str]) -> sa.ColumnElement[bool]:
    """``column`` matches one of the filter's values (wildcards allowed): EC2's OR within a filter."""
    return sa.or_(*[column.like(like(v), escape="\\") for v in values])


def _flag(column: Any) -> Callable[[list[str]], sa.ColumnElement[bool]]:
    """A boolean column as EC2 filters it: the values ``true`` / ``false``."""

    def clause(values: list[str]) -> sa.ColumnElement[bool]:
        wanted = {v.lower() for v in values}
        return sa.or_(
            *([column.is_(True)] if "true" in wanted else []),
            *([column.is_(False)] if "false" in wanted else []),
            sa.false(),
        )

    return clause


def visible(project_id: Any, since: Any = None) -> sa.ColumnElement[bool]:
    """A project's instances, terminated ones for an hour after (``since``: that hour's start,
    now's by default; a bound parameter in a statement built once)."""
    return sa.and_(
        _servers.c.project_id == project_id,
        sa.or_(
            _servers.c.operstate != _S.DESTROYED.value,
            _servers.c.destroyed_at > (utcnow() - TERMINATED_VISIBLE if since is None else since),
        ),
    )


def _named(postgres: bool) -> sa.Select[Any]:
    """The project's visible instances among some EC2 ids."""
    return sa.select(Server).where(
        visible(sa.bindparam("project_id"), sa.bindparam("since")),
        rows.among(_servers.c.ec2_id, "ids", postgres=postgres),
    )


_NAMED = rows.ByDialect(_named)


async def instances(session: AsyncSession, project_id: uuid.UUID, ec2_ids: list[str]) -> dict[str, Server]:
    """The project's visible instances among ``ec2_ids`` (missing ones are not in the result)."""
    if not ec2_ids:
        return {}
    values = {"project_id": project_id, "since": utcnow() - TERMINATED_VISIBLE, "ids": ec2_ids}
    return {server.ec2_id: server for server in await session.scalars(_NAMED.of(session), values)}


async def instances_by_id(session: AsyncSession, server_ids: list[uuid.UUID]) -> dict[uuid.UUID, Server]:
    """Servers by their ids (to name them as EC2 instances)."""
    if not server_ids:
        return {}
    return {s.id: s for s in await session.scalars(sa.select(Server).where(_servers.c.id.in_(server_ids)))}


# -- client tokens -------------------------------------------------------------------------------


def token_claim(
    session: AsyncSession, project_id: uuid.UUID, token: str, request_hash: str, reservation_id: str
) -> tuple[sa.Insert, dict[str, Any]]:
    """The claim of a client token for the reservation this transaction is about to make, as a
    statement and its parameters (``rows.insert_or_skip``'s), for the launch to send first thing
    with its first read; the statement returns a row when it claimed the token, none when the
    token is taken. A concurrent twin's claim waits for this transaction to end: it then finds
    the token taken and reads the reservation made (or, if this one rolled back, claims it
    itself). Either way the twin has done no work and holds no other lock."""
    values = {
        "project_id": project_id,
        "token": token,
        "request_hash": request_hash,
        "reservation_id": reservation_id,
        "created_at": utcnow(),
    }
    return rows.insert_or_skip_statement(rows.postgres(session), table_of(Ec2ClientToken), tuple(values)), values


async def token(session: AsyncSession, project_id: uuid.UUID, value: str) -> Ec2ClientToken | None:
    return await session.get(Ec2ClientToken, (project_id, value))


#: The owner of public images, as DescribeImages shows it (imageOwnerId) and --owners names it.
PUBLIC_OWNER = "nephos"


def owned_by(project_id: uuid.UUID, owners: list[str]) -> sa.ColumnElement[bool]:
    """``Owner.N`` / ``owner-id``: ``self`` (the caller's project), ``nephos`` or ``amazon`` (the
    cloud's public images), or a project id."""
    clauses: list[sa.ColumnElement[bool]] = []
    for owner in owners:
        if owner == "self":
            clauses.append(_images.c.project_id == project_id)
        elif owner in (PUBLIC_OWNER, "amazon"):
            clauses.append(_images.c.project_id.is_(None))
        else:
            try:
                clauses.append(_images.c.project_id == uuid.UUID(owner))
            except ValueError:
                clauses.append(sa.false())
    return sa.or_(*clauses)


async def images(
    session: AsyncSession, actor: Actor, *, project_id: uuid.UUID, ids: list[str], owners: list[str], filters: Given
) -> list[Image]:
    """DescribeImages: the images ``actor`` may see, by id, owner and filters; every id named must
    be one of them (``UnknownImage``)."""
    stmt = visible_images(actor)
    if ids:
        stmt = stmt.where(_images.c.ec2_id.in_(ids))
    if owners:
        stmt = stmt.where(owned_by(project_id, owners))
    known: dict[str, Filter] = {
        "image-id": _images.c.ec2_id,
        "name": _images.c.name,
        "owner-id": lambda values: owned_by(project_id, values),
        "state": IMAGE_STATE,
        "is-public": _flag(_images.c.is_public),
    }
    found = list(await session.scalars(where(stmt, known, filters).order_by(_images.c.name)))
    unknown = sorted(set(ids) - {i.ec2_id for i in found})
    if unknown:
        raise UnknownImage(f"images {', '.join(unknown)} do not exist", ids=unknown)
    return found


async def flavors(session: AsyncSession, names: list[str]) -> list[Flavor]:
    """DescribeInstanceTypes: the flavors matching ``names`` (wildcards allowed), smallest first;
    a name without wildcards that matches none is ``UnknownFlavor``."""
    stmt = sa.select(Flavor).order_by(_flavors.c.vcpus, _flavors.c.ram_mb)
    if names:
        stmt = stmt.where(matches(_flavors.c.name, names))
    found = list(await session.scalars(stmt))
    unknown = sorted(set(names) - {f.name for f in found})
    if unknown and not any("*" in n or "?" in n for n in names):
        raise UnknownFlavor(f"instance types {', '.join(unknown)} do not exist", names=unknown)
    return found


async def zones(session: AsyncSession) -> list[str]:
    return [str(z) for z in await session.scalars(sa.select(_zones.c.name).order_by(_zones.c.name))]


# -- subnets -------------------------------------------------------------------------------------

_networks = table_of(Network)


def vpc_of(project_id: uuid.UUID) -> str:
    """The one VPC a project's networks are in, as EC2 names it (Nephos has no VPCs: a project's
    networks never overlap anyone's)."""
    return f"vpc-{project_id.hex[-17:]}"


def _constant(value: str) -> Callable[[list[str]], sa.ColumnElement[bool]]:
    """A filter on something every row has alike (a subnet's state, its VPC)."""

    def clause(values: list[str]) -> sa.ColumnElement[bool]:
        return sa.true() if any(fnmatch.fnmatchcase(value, v) for v in values) else sa.false()

    return clause


async def subnets(
    session: AsyncSession, project_id: uuid.UUID, ec2_ids: list[str], given: Given
) -> list[tuple[Network, int]]:
    """DescribeSubnets: the project's networks (those named, each of which must exist:
    ``UnknownSubnet``), filtered in SQL, each with its free address count."""
    if ec2_ids:
        await networks.by_subnet(session, project_id, ec2_ids)
    known: dict[str, Filter] = {
        "subnet-id": _networks.c.ec2_id,
        "cidr-block": _networks.c.cidr,
        "cidr": _networks.c.cidr,
        "cidrBlock": _networks.c.cidr,
        "default-for-az": _flag(_networks.c.is_default),
        "defaultForAz": _flag(_networks.c.is_default),
        "state": _constant("available"),
        "vpc-id": _constant(vpc_of(project_id)),
    }
    stmt = sa.select(Network).where(_networks.c.project_id == project_id).order_by(_networks.c.ec2_id)
    if ec2_ids:
        stmt = stmt.where(_networks.c.ec2_id.in_(ec2_ids))
    found = list(await session.scalars(where(stmt, known, given)))
    free = await networks.free_counts(session, found)
    return [(n, free[n.id]) for n in found]


# -- addresses ------------------------------------------------------------------------------------

_ips = table_of(PublicIp)


async def addresses(
    session: AsyncSession, project_id: uuid.UUID, *, allocation_ids: list[str], public_ips: list[str], given: Given
) -> list[tuple[PublicIp, str | None]]:
    """DescribeAddresses: the project's public IPs (those named, if any), filtered in SQL, each
    with the EC2 id of the instance it is associated with."""
    stmt = (
        sa.select(PublicIp, _servers.c.ec2_id)
        .outerjoin(_servers, _servers.c.id == _ips.c.server_id)
        .where(_ips.c.project_id == project_id)
        .order_by(_ips.c.address)
    )
    if allocation_ids or public_ips:
        stmt = stmt.where(sa.or_(_ips.c.ec2_id.in_(allocation_ids), _ips.c.address.in_(public_ips)))
    known: dict[str, Filter] = {
        "public-ip": _ips.c.address,
        "allocation-id": _ips.c.ec2_id,
        "instance-id": _servers.c.ec2_id,
        "association-id": _ips.c.association_id,
        "domain": _constant("vpc"),
    }
    return [(ip, instance) for ip, instance in (await session.execute(where(stmt, known, given))).all()]
