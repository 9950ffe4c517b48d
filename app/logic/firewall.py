"""Firewall changes reaching the hosts: a port opened or closed on a VM, a group's rules or a
VM's groups changed -- each sends the VM's whole rule set (``firewall_rules``) to its host in a
FIREWALL job (the task lock applies, as to any job); a VM with no host yet (HOLD) gets its rules
with its create job.
"""

from __future__ import annotations

import uuid
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import actions, servers
from app.logic.actor import SYSTEM, Actor
from app.logic.errors import InvalidState, NotFound, TaskPending
from app.logic.firewall_rules import params_for, parse
from app.logic.jobs import Outbox
from app.models import FirewallRule, Job, SecurityGroup, SecurityGroupRule, Server, ServerSecurityGroup, table_of

_rules, _sg_rules, _members = table_of(FirewallRule), table_of(SecurityGroupRule), table_of(ServerSecurityGroup)


async def change(
    session: AsyncSession,
    outbox: Outbox,
    *,
    actor: Actor,
    server_id: uuid.UUID,
    op: Literal["open", "close"],
    protocol: str,
    port: int | list[int] | None,
    cidr: str,
) -> Job | None:
    """Open or close a port on one VM, then send the VM's whole rule set to its host (a
    FIREWALL job). The server's row is locked first, as by every writer."""
    server = await servers.lock(session, actor=actor, server_id=server_id)
    protocol, low, high, net = parse(protocol, port, cidr)
    same = sa.and_(
        _rules.c.server_id == server.id,
        _rules.c.protocol == protocol,
        _rules.c.port_min == low,
        _rules.c.port_max == high,
        _rules.c.cidr == net,
    )
    found = (await session.execute(sa.select(_rules.c.id).where(same))).first()
    if op == "open" and found is None:
        session.add(FirewallRule(server_id=server.id, protocol=protocol, port_min=low, port_max=high, cidr=net))
        await session.flush()
    elif op == "close":
        if found is None:
            raise NotFound("no such opened port on this server (a group's rule is closed in its group)")
        await session.execute(_rules.delete().where(same))
    return await _send(session, outbox, actor, server, changed=True)


async def _send(session: AsyncSession, outbox: Outbox, actor: Actor, server: Server, *, changed: bool) -> Job | None:
    """Send a locked VM its whole rule set and its generation (moved on first when its intended
    rules ``changed``); a VM not on a host yet gets them with its create job."""
    if changed:
        server.firewall_gen += 1
    if server.host is None:
        return None
    return await actions.firewall(
        session,
        outbox,
        actor=actor,
        server_id=server.id,
        rules=await params_for(session, server.id),
        generation=server.firewall_gen,
    )


async def resync(
    session: AsyncSession, outbox: Outbox, *, server_ids: list[uuid.UUID], changed: bool = True
) -> list[Job]:
    """Send each of these VMs its rule set again, in id order (the lock order of several
    servers). ``changed``: their intended rules changed (a group's rules, or a VM's groups), so
    their generation moves on; reconciliation resends without a change.

    A VM with no host yet gets its rules when it is built. One busy with another task, or in a
    state with no domain to filter, is skipped: its host still records the older generation,
    so reconciliation reports it (``unsynced_firewall``) once it is idle, and sends it then."""
    sent = []
    for server_id in sorted(set(server_ids)):
        server = await servers.locked(session, server_id)
        if server is None:
            continue
        try:
            job = await _send(session, outbox, SYSTEM, server, changed=changed)
        except (TaskPending, InvalidState):
            continue
        if job is not None:
            sent.append(job)
    return sent


async def group_changed(session: AsyncSession, outbox: Outbox, *, group_id: uuid.UUID) -> list[Job]:
    """A group's rules changed: every member's firewall follows, and so does every VM whose
    group allows this group's members."""
    group = await session.get(SecurityGroup, group_id)
    if group is None:
        return []
    members = list(await session.scalars(sa.select(_members.c.server_id).where(_members.c.group_id == group_id)))
    naming = sa.select(_sg_rules.c.group_id).where(_sg_rules.c.source_group == group.ec2_id)
    others = list(await session.scalars(sa.select(_members.c.server_id).where(_members.c.group_id.in_(naming))))
    return await resync(session, outbox, server_ids=members + others)
