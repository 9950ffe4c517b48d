"""A VM's firewall: inbound denied except what its rules allow, outbound allowed.

Its rules are the ports opened on it (``POST /api/v1/servers/{id}/firewall``, CRS4's
open/close) and the ingress rules of its security groups (EC2); a group rule naming another
group allows that group's members' addresses. The agent enforces them with a libvirt nwfilter
per VM (``nephos-<server id>``) on every NIC, and records them in the domain's metadata (the
test driver has no nwfilter: the embedded mode shows what would be enforced).

A change reaches a running VM by a FIREWALL job carrying the whole rule set (the task lock
applies, as to any job); a VM with no host yet (HOLD) gets its rules with its create job.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import actions, servers
from app.logic.actor import SYSTEM, Actor
from app.logic.errors import BadRequest, InvalidState, NotFound, TaskPending
from app.logic.jobs import Outbox
from app.models import FirewallRule, Job, Port, SecurityGroup, SecurityGroupRule, ServerSecurityGroup, table_of

_rules, _sg_rules, _members = table_of(FirewallRule), table_of(SecurityGroupRule), table_of(ServerSecurityGroup)
_groups, _ports = table_of(SecurityGroup), table_of(Port)

PROTOCOLS = ("tcp", "udp", "icmp", "all")


@dataclass(frozen=True)
class Rule:
    protocol: str  # tcp, udp, icmp or all
    port_min: int  # -1: every port
    port_max: int
    cidr: str
    source: Literal["port", "group"]
    id: str = ""

    def wire(self) -> dict[str, Any]:
        """As a job carries it to the agent."""
        return {k: v for k, v in asdict(self).items() if k in ("protocol", "port_min", "port_max", "cidr")}


def parse(protocol: str, port: int | list[int] | None, cidr: str) -> tuple[str, int, int, str]:
    """A rule as a client gives it, checked: (protocol, port_min, port_max, cidr)."""
    if protocol not in PROTOCOLS:
        raise BadRequest(f"protocol is one of {', '.join(PROTOCOLS)}", field="protocol")
    try:
        net = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        raise BadRequest(f"cidr {cidr!r} is not a network", field="cidr") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise BadRequest("only IPv4 sources are enforced", field="cidr")
    if protocol in ("icmp", "all"):
        if port is not None:
            raise BadRequest(f"{protocol} rules take no port", field="port")
        return protocol, -1, -1, str(net)
    if port is None:
        raise BadRequest(f"a {protocol} rule needs a port or a [first, last] range", field="port")
    low, high = (port, port) if isinstance(port, int) else (port[0], port[-1])
    if isinstance(port, list) and len(port) != 2:
        raise BadRequest("a range is [first, last]", field="port")
    if not 1 <= low <= high <= 65535:
        raise BadRequest("ports are 1 to 65535, first <= last", field="port")
    return protocol, low, high, str(net)


async def effective(session: AsyncSession, server_id: uuid.UUID) -> list[Rule]:
    """Every rule the VM's firewall enforces: its opened ports, then its groups' rules."""
    out = [
        Rule(r.protocol, r.port_min, r.port_max, r.cidr, "port", str(r.id))
        for r in await session.scalars(
            sa.select(FirewallRule).where(_rules.c.server_id == server_id).order_by(_rules.c.created_at, _rules.c.id)
        )
    ]
    rows = (
        await session.execute(
            sa.select(_sg_rules)
            .join(_members, _members.c.group_id == _sg_rules.c.group_id)
            .where(_members.c.server_id == server_id)
            .order_by(_sg_rules.c.group_id, _sg_rules.c.id)
        )
    ).all()
    for r in rows:
        protocol = "all" if r.protocol == "-1" else r.protocol
        low, high = (-1, -1) if protocol in ("all", "icmp") or r.from_port < 0 else (r.from_port, r.to_port)
        if r.cidr:
            sources = [r.cidr]
        else:  # another group: its members' addresses
            members = sa.select(_members.c.server_id).join(_groups, _groups.c.id == _members.c.group_id)
            sources = [
                f"{ip}/32"
                for ip in await session.scalars(
                    sa.select(_ports.c.ip).where(
                        _ports.c.server_id.in_(members.where(_groups.c.ec2_id == r.source_group))
                    )
                )
            ]
        for source in sources:
            net = ipaddress.ip_network(source, strict=False)
            if isinstance(net, ipaddress.IPv4Network):
                out.append(Rule(protocol, low, high, str(net), "group", r.ec2_id))
    return out


async def params_for(session: AsyncSession, server_id: uuid.UUID) -> list[dict[str, Any]]:
    """The rule set a job carries to the agent."""
    return [rule.wire() for rule in await effective(session, server_id)]


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
    if server.host is None:  # not on a host yet: its create job will carry the rules
        return None
    return await actions.firewall(
        session, outbox, actor=actor, server_id=server.id, rules=await params_for(session, server.id)
    )


async def resync(session: AsyncSession, outbox: Outbox, *, server_ids: list[uuid.UUID]) -> list[Job]:
    """Send each of these VMs its rule set again (a group's rules or a VM's groups changed), in
    id order (the lock order of several servers). A VM with no host yet gets its rules when it
    is built; one busy with another task, or in a state with no domain to filter, keeps its
    rules until its next firewall change (reported in the job list it is missing from)."""
    sent = []
    for server_id in sorted(set(server_ids)):
        server = await servers.locked(session, server_id)
        if server is None or server.host is None:
            continue
        try:
            sent.append(
                await actions.firewall(
                    session, outbox, actor=SYSTEM, server_id=server_id, rules=await params_for(session, server_id)
                )
            )
        except (TaskPending, InvalidState):
            continue
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
