"""Security groups, per project: named sets of ingress permissions, and the VMs in them.

They are stored and described (the EC2 facade's Create/Describe/Authorize/Revoke/Delete
calls, RunInstances' groups, ModifyInstanceAttribute's ``GroupId.N``); Nephos's hosts do not
filter traffic by them yet. A group still used by a live VM or by another group's rule cannot
be deleted (``InUse``); a permission is stored once (``AlreadyExists``).
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import ec2, rows
from app.logic.errors import AlreadyExists, BadRequest, InUse, NotFound, UnknownGroup
from app.logic.operstate import Operstate
from app.models import SecurityGroup, SecurityGroupRule, Server, ServerSecurityGroup, table_of

_groups, _rules = table_of(SecurityGroup), table_of(SecurityGroupRule)
_members, _servers = table_of(ServerSecurityGroup), table_of(Server)

#: Protocol names and numbers as clients send them -> the stored name ("-1" is every protocol).
PROTOCOLS = {"tcp": "tcp", "6": "tcp", "udp": "udp", "17": "udp", "icmp": "icmp", "1": "icmp", "-1": "-1", "all": "-1"}


@dataclass(frozen=True)
class Permission:
    protocol: str
    from_port: int
    to_port: int
    cidr: str = ""
    source_group: str = ""  # a group's EC2 id
    description: str = ""


def permission(
    protocol: str | None,
    from_port: int | None,
    to_port: int | None,
    *,
    cidr: str = "",
    source_group: str = "",
    description: str = "",
) -> Permission:
    """A validated permission: ports are required for tcp/udp (0-65535, from <= to); icmp takes
    type/code (-1 for all); every protocol (-1) spans every port. One source: a CIDR or a group."""
    proto = PROTOCOLS.get((protocol or "").lower())
    if proto is None:
        raise BadRequest(f"unknown protocol {protocol!r} (tcp, udp, icmp or -1)", field="IpProtocol")
    if proto == "-1":
        from_port, to_port = -1, -1
    elif proto == "icmp":
        from_port = -1 if from_port is None else from_port
        to_port = -1 if to_port is None else to_port
        if not (-1 <= from_port <= 255 and -1 <= to_port <= 255):
            raise BadRequest("icmp type and code are -1 to 255", field="FromPort")
    else:
        if from_port is None or to_port is None:
            raise BadRequest(f"{proto} needs FromPort and ToPort", field="FromPort")
        if not (0 <= from_port <= to_port <= 65535):
            raise BadRequest("ports are 0 to 65535, FromPort no greater than ToPort", field="FromPort")
    if bool(cidr) == bool(source_group):
        raise BadRequest("a permission needs exactly one source: a CIDR range or a group", field="CidrIp")
    if cidr:
        try:
            cidr = str(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            raise BadRequest(f"{cidr!r} is not a CIDR range", field="CidrIp") from None
    return Permission(proto, from_port, to_port, cidr, source_group, description[:255])


async def create(session: AsyncSession, *, project_id: uuid.UUID, name: str, description: str) -> SecurityGroup:
    if not 0 < len(name) <= 255 or name.startswith("sg-"):
        raise BadRequest("a group name has 1 to 255 characters and does not start with sg-", field="GroupName")
    if not 0 < len(description) <= 255:
        raise BadRequest("a group description has 1 to 255 characters", field="GroupDescription")
    group = SecurityGroup(project_id=project_id, name=name, description=description)
    await rows.insert_unique(session, group, f"security group {name}")
    return group


async def find(
    session: AsyncSession, project_id: uuid.UUID, *, ec2_ids: Iterable[str] = (), names: Iterable[str] = ()
) -> list[SecurityGroup]:
    """The project's groups named by id or by name; every one must exist (``UnknownGroup``)."""
    ec2_ids, names = list(ec2_ids), list(names)
    if not ec2_ids and not names:
        return []
    stmt = sa.select(SecurityGroup).where(
        _groups.c.project_id == project_id, sa.or_(_groups.c.ec2_id.in_(ec2_ids), _groups.c.name.in_(names))
    )
    found = list(await session.scalars(stmt))
    unknown = (set(ec2_ids) - {g.ec2_id for g in found}) | (set(names) - {g.name for g in found})
    if unknown:
        raise UnknownGroup(f"The security group '{', '.join(sorted(unknown))}' does not exist", ids=sorted(unknown))
    return found


async def rules_of(session: AsyncSession, group_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[SecurityGroupRule]]:
    out: dict[uuid.UUID, list[SecurityGroupRule]] = {g: [] for g in group_ids}
    if group_ids:
        stmt = (
            sa.select(SecurityGroupRule)
            .where(_rules.c.group_id.in_(group_ids))
            .order_by(_rules.c.protocol, _rules.c.from_port, _rules.c.to_port, _rules.c.id)
        )
        for rule in await session.scalars(stmt):
            out[rule.group_id].append(rule)
    return out


async def _sources_exist(session: AsyncSession, project_id: uuid.UUID, perms: list[Permission]) -> None:
    await find(session, project_id, ec2_ids={p.source_group for p in perms if p.source_group})


async def authorize(session: AsyncSession, group: SecurityGroup, perms: list[Permission]) -> list[SecurityGroupRule]:
    """Add the permissions, all or none: one that exists already is ``AlreadyExists``."""
    await _sources_exist(session, group.project_id, perms)
    rules = [
        SecurityGroupRule(
            group_id=group.id,
            protocol=p.protocol,
            from_port=p.from_port,
            to_port=p.to_port,
            cidr=p.cidr,
            source_group=p.source_group,
            description=p.description,
        )
        for p in dict.fromkeys(perms)
    ]
    try:
        async with session.begin_nested():
            session.add_all(rules)
    except IntegrityError:
        raise AlreadyExists("the specified rule already exists in that group") from None
    return rules


async def revoke(session: AsyncSession, group: SecurityGroup, perms: list[Permission]) -> None:
    """Remove the permissions, all or none: one the group does not have is ``NotFound``."""
    for p in perms:
        deleted = await session.execute(
            _rules.delete().where(
                _rules.c.group_id == group.id,
                _rules.c.protocol == p.protocol,
                _rules.c.from_port == p.from_port,
                _rules.c.to_port == p.to_port,
                _rules.c.cidr == p.cidr,
                _rules.c.source_group == p.source_group,
            )
        )
        if deleted.rowcount == 0:  # type: ignore[attr-defined]
            raise NotFound("the specified rule does not exist in this security group")


async def delete(session: AsyncSession, group: SecurityGroup) -> None:
    live = await session.scalar(
        sa.select(_servers.c.ec2_id)
        .join(_members, _members.c.server_id == _servers.c.id)
        .where(_members.c.group_id == group.id, _servers.c.operstate != Operstate.DESTROYED.value)
        .limit(1)
    )
    if live is not None:
        raise InUse(f"resource {group.ec2_id} has a dependent object: instance {live}")
    referenced = await session.scalar(
        sa.select(_groups.c.ec2_id)
        .join(_rules, _rules.c.group_id == _groups.c.id)
        .where(_rules.c.source_group == group.ec2_id, _groups.c.id != group.id)
        .limit(1)
    )
    if referenced is not None:
        raise InUse(f"resource {group.ec2_id} has a dependent object: a rule of {referenced}")
    await session.execute(_members.delete().where(_members.c.group_id == group.id))
    await session.execute(_rules.delete().where(_rules.c.group_id == group.id))
    await session.delete(group)


async def set_members(
    session: AsyncSession, server_ids: list[uuid.UUID], groups: list[SecurityGroup], *, new: bool = False
) -> None:
    """The VMs are in exactly these groups (``new``: VMs this transaction creates, in none yet)."""
    if not new:
        await session.execute(_members.delete().where(_members.c.server_id.in_(server_ids)))
    session.add_all([ServerSecurityGroup(server_id=s, group_id=g.id) for s in server_ids for g in groups])


_GROUPS_OF = rows.ByDialect(
    lambda postgres: (
        sa.select(_members.c.server_id, _groups.c.ec2_id, _groups.c.name)
        .join(_groups, _groups.c.id == _members.c.group_id)
        .where(rows.among(_members.c.server_id, "ids", postgres=postgres))
        .order_by(_groups.c.name)
    )
)


async def groups_of(session: AsyncSession, server_ids: list[uuid.UUID]) -> dict[uuid.UUID, list[tuple[str, str]]]:
    """Each VM's groups as (EC2 id, name), in name order."""
    out: dict[uuid.UUID, list[tuple[str, str]]] = {s: [] for s in server_ids}
    if server_ids:
        for server_id, ec2_id, name in (await session.execute(_GROUPS_OF.of(session), {"ids": server_ids})).all():
            out[server_id].append((ec2_id, name))
    return out


async def listed(
    session: AsyncSession,
    *,
    project_id: uuid.UUID,
    ec2_ids: list[str],
    names: list[str],
    filters: list[tuple[str, list[str]]],
) -> list[SecurityGroup]:
    """DescribeSecurityGroups: the project's groups by id, name and EC2 filters (every one named
    must exist: ``UnknownGroup``)."""
    named = {g.id for g in await find(session, project_id, ec2_ids=ec2_ids, names=names)}
    stmt = sa.select(SecurityGroup).where(_groups.c.project_id == project_id)
    if ec2_ids or names:
        stmt = stmt.where(_groups.c.id.in_(named))
    known: dict[str, ec2.Filter] = {
        "group-id": _groups.c.ec2_id,
        "group-name": _groups.c.name,
        "description": _groups.c.description,
    }
    return list(await session.scalars(ec2.where(stmt, known, filters).order_by(_groups.c.name)))
