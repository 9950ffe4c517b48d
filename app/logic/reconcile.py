"""Reconciliation: is the database true to the hypervisors, and are quotas true to the VMs?

``compare`` reads every host's latest inventory (the edge asks the agents for fresh ones first;
a host whose inventory is older than ``fresh_since`` is reported as unreachable, never treated
as empty) and the quota tables, and reports, per kind:

* ``stale``: a VM the database places on a host that does not have it;
* ``moved``: a VM its recorded host does not have, whose marked domain another host runs (a
  migration whose result was lost, or that ended after its deadline was resolved);
* ``orphans``: a domain on a host that no live VM row owns there, named (host, domain name and
  UUID) and marked ``owned`` only when it carries Nephos's mark;
* ``unsynced_operstate`` / ``unsynced_flavor``: the host runs the VM in another state or size;
* ``stuck_tasks``: jobs past their deadline;
* ``quota_drift``: recorded usage differs from usage recomputed from the VMs (only counted for
  projects with no task pending, when the invariant must hold exactly);
* ``pending_without_job``: pending commissions whose job is final or gone;
* ``stale_addresses``: addresses still held by DESTROYED VMs;
* ``unsynced_firewall``: the host enforces an older firewall generation than the VM's (a
  group changed while the VM was busy, or the host lost its rules); the fix sends the rules.

A VM with a task pending is never judged: its job is in flight and will say where it ends.
The repairs are ``repairs.py``'s. Orphans are for the edge to destroy with a job to their host
(logic sends nothing), and only those ``reapable`` says.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import snapshot
from app.logic import (
    addresses,
    deadlines,
    public_ips,
    quotas,
    results,
)
from app.logic.hoststate import HostState
from app.logic.jobs import FINAL
from app.logic.operstate import Deltas, Operstate, footprint
from app.models import Commission, DriftReport, Flavor, Host, Job, Quota, Server, table_of

_servers, _flavors, _jobs = table_of(Server), table_of(Flavor), table_of(Job)
_hosts, _quotas, _commissions = table_of(Host), table_of(Quota), table_of(Commission)
_drift = table_of(DriftReport)


@dataclass
class Report:
    stale: list[dict[str, Any]] = field(default_factory=list)
    moved: list[dict[str, Any]] = field(default_factory=list)
    orphans: list[dict[str, Any]] = field(default_factory=list)
    unsynced_operstate: list[dict[str, Any]] = field(default_factory=list)
    unsynced_flavor: list[dict[str, Any]] = field(default_factory=list)
    stuck_tasks: list[dict[str, Any]] = field(default_factory=list)
    quota_drift: list[dict[str, Any]] = field(default_factory=list)
    pending_without_job: list[dict[str, Any]] = field(default_factory=list)
    stale_addresses: list[dict[str, Any]] = field(default_factory=list)
    unsynced_firewall: list[dict[str, Any]] = field(default_factory=list)
    unreachable_hosts: list[str] = field(default_factory=list)
    fixed: bool = False
    actions: list[str] = field(default_factory=list)

    KINDS = (
        "stale",
        "moved",
        "orphans",
        "unsynced_operstate",
        "unsynced_flavor",
        "stuck_tasks",
        "quota_drift",
        "pending_without_job",
        "stale_addresses",
        "unsynced_firewall",
    )

    def counts(self) -> dict[str, int]:
        return {kind: len(getattr(self, kind)) for kind in self.KINDS}

    def empty(self) -> bool:
        return not any(self.counts().values())


async def recomputed_usage(session: AsyncSession) -> dict[uuid.UUID, Deltas]:
    """Usage per project as its VMs say it should be (the invariant's right-hand side)."""
    rows = (
        await session.execute(
            sa.select(
                _servers.c.project_id,
                _servers.c.operstate,
                _flavors.c.vcpus,
                _flavors.c.ram_mb,
                _flavors.c.disk_gb,
                sa.func.count(),
            )
            .join(_flavors, _flavors.c.id == _servers.c.flavor_id)
            .where(_servers.c.operstate != Operstate.DESTROYED.value)
            .group_by(
                _servers.c.project_id, _servers.c.operstate, _flavors.c.vcpus, _flavors.c.ram_mb, _flavors.c.disk_gb
            )
        )
    ).all()
    out: dict[uuid.UUID, Deltas] = defaultdict(Deltas)
    for project_id, state, vcpus, ram, disk, n in rows:
        out[project_id] = out[project_id] + footprint(Operstate(state), vcpus, ram, disk) * int(n)
    for project_id, n in await public_ips.held(session):
        out[project_id] = out[project_id] + Deltas(public_ip=int(n))
    return out


async def quota_drift(session: AsyncSession, report: Report) -> None:
    """Add to ``report`` each project's usage that differs from its VMs' (projects with a task
    pending are skipped: their usage is in flight)."""
    busy = set(await session.scalars(sa.select(_servers.c.project_id).where(_servers.c.task.is_not(None)).distinct()))
    actual = await recomputed_usage(session)
    for project_id, resource, usage in (
        await session.execute(sa.select(_quotas.c.project_id, _quotas.c.resource, _quotas.c.usage))
    ).all():
        if project_id in busy:
            continue
        want = getattr(actual.get(project_id, Deltas()), resource)
        if int(usage) != want:
            report.quota_drift.append(
                {"project_id": str(project_id), "resource": resource, "recorded": int(usage), "recomputed": want}
            )


async def _pending_without_job(session: AsyncSession, report: Report) -> None:
    rows = (
        await session.execute(
            sa.select(_commissions.c.id, _commissions.c.project_id, _commissions.c.server_id, _jobs.c.status)
            .outerjoin(_jobs, _jobs.c.id == _commissions.c.job_id)
            .where(_commissions.c.state == quotas.CommissionState.PENDING)
        )
    ).all()
    for commission_id, project_id, server_id, status in rows:
        if status is None or status in FINAL:
            report.pending_without_job.append(
                {
                    "commission_id": str(commission_id),
                    "project_id": str(project_id),
                    "server_id": str(server_id) if server_id else None,
                    "job_status": status,
                }
            )


#: A VM changed this close to (or after) its host's inventory was taken is not judged against
#: it: the inventory may predate the change (and hosts' clocks may differ a little).
SETTLE = timedelta(seconds=0.5)


async def compare(session: AsyncSession, *, fresh_since: datetime | None = None) -> Report:
    """Everything read in one snapshot (REPEATABLE READ on PostgreSQL), so results applied
    meanwhile cannot make quotas and VMs look apart when they are not."""
    await snapshot(session)
    report = Report()
    hosts = list(await session.scalars(sa.select(Host).where(_hosts.c.state != HostState.DISABLED)))
    domains: dict[str, dict[uuid.UUID, dict[str, Any]]] = {}
    taken: dict[str, datetime] = {}
    for host in hosts:
        if host.inventory is None or (fresh_since is not None and (host.inventory_at or fresh_since) < fresh_since):
            report.unreachable_hosts.append(host.name)
            continue
        domains[host.name] = {uuid.UUID(d["server_id"]): d for d in host.inventory.get("domains", [])}
        assert host.inventory_at is not None
        taken[host.name] = host.inventory_at - SETTLE

    flavors = {f.id: f for f in await session.scalars(sa.select(Flavor))}
    placed = list(
        await session.scalars(
            sa.select(Server).where(_servers.c.host.is_not(None), _servers.c.operstate != Operstate.DESTROYED.value)
        )
    )
    owned: dict[str, set[uuid.UUID]] = defaultdict(set)
    for server in placed:
        assert server.host is not None
        owned[server.host].add(server.id)
        if server.host not in domains or server.task is not None or server.updated_at >= taken[server.host]:
            continue  # unreachable host, a job in flight, or changed since the inventory: not judged now
        seen = domains[server.host].get(server.id)
        entry = {
            "server_id": str(server.id),
            "project_id": str(server.project_id),
            "host": server.host,
            "operstate": server.operstate,
        }
        if seen is None or seen["state"] == "missing":
            report.stale.append(entry)
            continue
        observed = results.OBSERVED.get(seen["state"])
        if observed is not None and observed.value != server.operstate:
            report.unsynced_operstate.append({**entry, "observed": seen["state"]})
        flavor = flavors[server.flavor_id]
        if (seen["vcpus"], seen["ram_mb"]) != (flavor.vcpus, flavor.ram_mb):
            report.unsynced_flavor.append(
                {
                    **entry,
                    "flavor": flavor.name,
                    "expected": {"vcpus": flavor.vcpus, "ram_mb": flavor.ram_mb},
                    "observed": {"vcpus": seen["vcpus"], "ram_mb": seen["ram_mb"]},
                }
            )
        enforced = seen.get("firewall_gen")
        if seen.get("owned") and (enforced or 0) != (server.firewall_gen or 0):
            report.unsynced_firewall.append({**entry, "expected": server.firewall_gen, "observed": enforced})
    in_flight = set(await session.scalars(sa.select(_jobs.c.server_id).where(_jobs.c.status.notin_(list(FINAL)))))
    changed = {
        sid: at
        for sid, at in (
            await session.execute(
                sa.select(_servers.c.id, _servers.c.updated_at).where(
                    _servers.c.id.in_([sid for seen_domains in domains.values() for sid in seen_domains])
                )
            )
        ).all()
    }
    orphans = [
        (host_name, server_id, seen)
        for host_name, seen_domains in domains.items()
        for server_id, seen in seen_domains.items()
        if server_id not in owned[host_name]
        and server_id not in in_flight
        and not (server_id in changed and changed[server_id] >= taken[host_name])
    ]
    orphans = _moved(report, orphans)
    rows = {
        sid: state
        for sid, state in (
            await session.execute(
                sa.select(_servers.c.id, _servers.c.operstate).where(_servers.c.id.in_({o[1] for o in orphans}))
            )
        ).all()
    }
    for host_name, server_id, seen in orphans:
        marked = bool(seen.get("owned", False))
        report.orphans.append(
            {
                "host": host_name,
                "domain_name": seen.get("name", ""),
                "domain_uuid": str(server_id),
                "state": seen["state"],
                "owned": marked,
                # Only a marked domain was made for a VM; the VM's operstate, if it has a row.
                "server_id": str(server_id) if marked else None,
                "operstate": rows.get(server_id) if marked else None,
            }
        )

    for job_id in await deadlines.expired(session):
        job = await session.get(Job, job_id)
        assert job is not None
        report.stuck_tasks.append(
            {
                "job_id": str(job.id),
                "server_id": str(job.server_id),
                "action": job.action,
                "host": job.host,
                "deadline": job.deadline.isoformat(),
            }
        )
    await quota_drift(session, report)
    await _pending_without_job(session, report)
    for server_id, network, ip in await addresses.held_by_destroyed(session):
        report.stale_addresses.append({"server_id": str(server_id), "network": network, "ip": ip})
    return report


def _moved(
    report: Report, orphans: list[tuple[str, uuid.UUID, dict[str, Any]]]
) -> list[tuple[str, uuid.UUID, dict[str, Any]]]:
    """Stale VMs whose marked domain one other host runs have moved, not vanished: they are
    reported as ``moved`` (and neither stale nor orphaned); the other orphans are returned."""
    stale = {uuid.UUID(entry["server_id"]): entry for entry in report.stale}
    found: dict[uuid.UUID, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for host_name, server_id, seen in orphans:
        if server_id in stale and seen.get("owned") and seen["state"] != "missing":
            found[server_id].append((host_name, seen))
    moved = {sid: places[0] for sid, places in found.items() if len(places) == 1}
    for sid, (host_name, seen) in moved.items():
        report.moved.append({**stale[sid], "found_on": host_name, "observed": seen["state"]})
    report.stale = [entry for entry in report.stale if uuid.UUID(entry["server_id"]) not in moved]
    return [o for o in orphans if o[1] not in moved]


def reapable(orphan: dict[str, Any]) -> bool:
    """May the periodic pass destroy this orphan domain? Only one Nephos can prove it made (the
    mark) for a VM that is DESTROYED (a destroy that completed while the host was away). Any
    other -- a foreign domain, a marked one with no VM row or a copy of a live VM -- is reported
    and touched only when an admin names it (``domains``)."""
    return bool(orphan.get("owned")) and orphan.get("operstate") == Operstate.DESTROYED.value


# -- the continuous drift report -----------------------------------------------------------------


async def record(
    session: AsyncSession, report: Report, *, started_at: datetime, duration_s: float, keep: int = 100
) -> DriftReport:
    """Store a periodic pass's report; only the latest ``keep`` are kept."""
    row = DriftReport(
        started_at=started_at,
        duration_s=duration_s,
        fixed=report.fixed,
        counts=report.counts(),
        report={k: getattr(report, k) for k in (*Report.KINDS, "unreachable_hosts", "actions")},
    )
    session.add(row)
    await session.flush()
    old = list(await session.scalars(sa.select(_drift.c.id).order_by(_drift.c.id.desc()).offset(keep)))
    if old:
        await session.execute(_drift.delete().where(_drift.c.id.in_(old)))
    return row


async def latest(session: AsyncSession) -> DriftReport | None:
    return (await session.scalars(sa.select(DriftReport).order_by(_drift.c.id.desc()).limit(1))).first()
