"""A VM's firewall rules: inbound denied except what they allow, outbound allowed.

Its rules are the ports opened on it (``POST /api/v1/servers/{id}/firewall``, CRS4's
open/close) and the ingress rules of its security groups (EC2); a group rule naming another
group allows that group's members' addresses. The agent enforces them with a libvirt nwfilter
per VM (``nephos-<server id>``) on every NIC, and records them in the domain's metadata (the
test driver has no nwfilter: the embedded mode shows what would be enforced).

How a change reaches the host is ``firewall``'s (a FIREWALL job with the whole set); this
module only reads and checks rules, so the actions that build jobs can ask it for a VM's set.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import networks
from app.logic.errors import BadRequest
from app.models import FirewallRule, Port, SecurityGroup, SecurityGroupRule, ServerSecurityGroup, table_of

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
    net = networks.ipv4_network(cidr, strict=False)  # a source with host bits is its network
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
