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
``fix_entry`` repairs one finding through the paths live events use: out-of-band transitions
with their own commissions, the deadline resolver; ``fix_usage`` then records an adjustment
commission (issuer ``reconcile``) for whatever usage still drifts. Orphans are for the edge to
destroy with a job to their host (logic sends nothing), and only those ``reapable`` says.
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
from app.ids import utcnow
from app.logic import (
    catalogue,
    deadlines,
    events,
    firewall,
    hosts,
    networks,
    placement,
    public_ips,
    quotas,
    results,
    servers,
)
from app.logic.hoststate import HostState
from app.logic.jobs import FINAL, Outbox
from app.logic.operstate import RESOURCES, Deltas, Operstate, footprint
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


async def _quota_drift(session: AsyncSession, report: Report) -> None:
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
    await _quota_drift(session, report)
    await _pending_without_job(session, report)
    for server_id, network, ip in await networks.held_by_destroyed(session):
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


FIXABLE = (
    "moved",
    "unsynced_operstate",
    "unsynced_flavor",
    "stale",
    "stuck_tasks",
    "pending_without_job",
    "stale_addresses",
    "unsynced_firewall",
)


async def fix_entry(session: AsyncSession, kind: str, entry: dict[str, Any], outbox: Outbox | None = None) -> list[str]:
    """Repair one finding, in the caller's transaction (one per finding: each touches one VM's
    rows in the usual lock order). Returns what was done, for the report. A repair that sends
    a job (``unsynced_firewall``) writes it to ``outbox``, for the caller to publish after the
    commit."""
    if kind == "unsynced_operstate":
        outcome = await results.apply_state_change(
            session,
            server_id=uuid.UUID(entry["server_id"]),
            observed=entry["observed"],
            seq=None,
            issuer="reconcile",
            reason="reconcile: the host runs it " + entry["observed"],
        )
        return [f"server {entry['server_id']}: operstate set from the host ({outcome.value})"]
    if kind == "unsynced_flavor":
        return await resized(session, uuid.UUID(entry["server_id"]), **entry["observed"])
    if kind == "moved":
        return await moved(session, uuid.UUID(entry["server_id"]), entry["host"], entry["found_on"], entry["observed"])
    if kind == "stale":
        await vanished(session, uuid.UUID(entry["server_id"]))
        return [f"server {entry['server_id']}: gone from {entry['host']}, marked DESTROYED"]
    if kind == "stuck_tasks":
        passed = deadlines.Pass()
        await deadlines.resolve(session, uuid.UUID(entry["job_id"]), passed)
        return [f"job {j}: resolved past its deadline" for j in passed.resolved] + [
            f"host {h}: must send a fresh inventory first" for h in passed.need_inventory
        ]
    if kind == "pending_without_job":
        commission = await quotas.get_commission(session, uuid.UUID(entry["commission_id"]))
        if commission is None:
            return []
        await quotas.reject(session, commission, "reconcile: its job is no longer live")
        return [f"commission {entry['commission_id']}: rejected (no live job)"]
    if kind == "stale_addresses":
        if await networks.release(session, [uuid.UUID(entry["server_id"])]):
            return [f"server {entry['server_id']}: address {entry['ip']} on {entry['network']} given back"]
        return []
    if kind == "unsynced_firewall":
        server_id = uuid.UUID(entry["server_id"])
        if outbox is not None and await firewall.resync(session, outbox, server_ids=[server_id], changed=False):
            return [f"server {entry['server_id']}: its firewall (generation {entry['expected']}) sent again"]
        return [f"server {entry['server_id']}: firewall behind, but it is busy; the next pass sends it"]
    raise ValueError(f"{kind} is not fixed here")


async def fix_usage(session: AsyncSession) -> list[str]:
    """Record an adjustment for every project whose usage drifted from its VMs (after the other
    fixes, which move usage themselves). Read in one snapshot: on PostgreSQL a result applied
    meanwhile makes the adjustment fail to serialize (the caller rolls back; the next pass
    looks again) rather than correct a drift that is not there."""
    await snapshot(session)
    drift = Report()
    await _quota_drift(session, drift)
    by_project: dict[str, dict[str, int]] = defaultdict(dict)
    for entry in drift.quota_drift:
        by_project[entry["project_id"]][entry["resource"]] = entry["recomputed"] - entry["recorded"]
    done = []
    for project_id, change in by_project.items():
        deltas = Deltas(**{r: change.get(r, 0) for r in RESOURCES})
        await quotas.issue(
            session,
            project_id=uuid.UUID(project_id),
            server_id=None,
            deltas=deltas,
            issuer="reconcile",
            accept=True,
            reason="reconcile: usage recomputed from the VMs",
        )
        done.append(f"project {project_id}: usage adjusted by {change}")
    return done


async def vanished(session: AsyncSession, server_id: uuid.UUID) -> None:
    """A VM its host no longer has: it is gone (DESTROYED), its quota and host room given back."""
    server = await _settled(session, server_id)
    if server is None:
        return
    flavor = await session.get(Flavor, server.flavor_id)
    assert flavor is not None
    before = Operstate(server.operstate)
    await placement.release(session, host=server.host, vcpus=flavor.vcpus, ram_mb=flavor.ram_mb)
    await networks.release(session, [server.id])
    server.operstate, server.destroyed_at, server.updated_at = Operstate.DESTROYED.value, utcnow(), utcnow()
    events.record(
        session,
        server,
        "out_of_band",
        before=before.value,
        after=Operstate.DESTROYED.value,
        message=f"reconcile: host {server.host} no longer has it",
    )
    await session.flush()
    await quotas.issue(
        session,
        project_id=server.project_id,
        server_id=server.id,
        deltas=Deltas() - footprint(before, flavor.vcpus, flavor.ram_mb, flavor.disk_gb),
        issuer="reconcile",
        accept=True,
        reason="reconcile: vanished from its host",
    )


async def moved(session: AsyncSession, server_id: uuid.UUID, source: str, target: str, observed: str) -> list[str]:
    """A VM found running on another host than the one recorded: the database follows it there
    (its host room moves), then it takes the state that
    host reports. A VM changed since (no longer recorded on ``source``) is left for the next pass."""
    server = await _settled(session, server_id)
    if server is None or server.host != source:
        return []
    found_on = await hosts.get(session, target)
    if found_on is None:
        return []
    flavor = await session.get(Flavor, server.flavor_id)
    assert flavor is not None
    placement.defer_moves(session)  # the two hosts' rows are updated in name order
    await placement.release(session, host=source, vcpus=flavor.vcpus, ram_mb=flavor.ram_mb)
    await placement.add(session, host=target, vcpus=flavor.vcpus, ram_mb=flavor.ram_mb)
    await placement.add_deferred(session)
    server.host, server.zone, server.updated_at = target, found_on.zone, utcnow()
    events.record(session, server, "moved", message=f"reconcile: found on {target}, no longer on {source}")
    await session.flush()
    done = [f"server {server_id}: found on {target}, no longer on {source}; recorded there"]
    before = server.operstate
    await results.apply_state_change(
        session,
        server_id=server_id,
        observed=observed,
        seq=None,
        issuer="reconcile",
        reason=f"reconcile: {target} runs it {observed}",
    )
    if server.operstate != before:
        done.append(f"server {server_id}: operstate set from {target} ({server.operstate})")
    return done


async def _settled(session: AsyncSession, server_id: uuid.UUID) -> Server | None:
    """The server, locked, if a repair may touch it: not destroyed, and no job in flight."""
    server = await servers.locked(session, server_id)
    if server is None or server.operstate == Operstate.DESTROYED.value or server.task is not None:
        return None
    return server


async def resized(session: AsyncSession, server_id: uuid.UUID, *, vcpus: int, ram_mb: int) -> list[str]:
    """A VM its host runs at another size: it takes the flavor of that size (the database
    follows the hypervisor, as for operstate), with the quota and host room that size holds.
    With no flavor of that size, it is left for an operator (and reported again)."""
    server = await _settled(session, server_id)
    if server is None:
        return []
    old = await session.get(Flavor, server.flavor_id)
    assert old is not None
    if (old.vcpus, old.ram_mb) == (vcpus, ram_mb):
        return []
    same_size = await catalogue.flavors_of_size(session, vcpus=vcpus, ram_mb=ram_mb)
    if not same_size:
        return [f"server {server_id}: no flavor has {vcpus} vCPUs and {ram_mb} MiB; left for an operator"]
    new = next((f for f in same_size if f.disk_gb == old.disk_gb), same_size[0])
    state = Operstate(server.operstate)
    await placement.add(session, host=server.host, vcpus=new.vcpus - old.vcpus, ram_mb=new.ram_mb - old.ram_mb)
    server.flavor_id, server.updated_at = new.id, utcnow()
    events.record(
        session,
        server,
        "out_of_band",
        before=state.value,
        after=state.value,
        message=f"reconcile: the host runs it as {new.name}, not {old.name}",
    )
    await session.flush()
    real = footprint(state, new.vcpus, new.ram_mb, new.disk_gb) - footprint(state, old.vcpus, old.ram_mb, old.disk_gb)
    if not real.is_zero():
        await quotas.issue(
            session,
            project_id=server.project_id,
            server_id=server.id,
            deltas=real,
            issuer="reconcile",
            accept=True,
            reason=f"reconcile: runs as {new.name}",
        )
    return [f"server {server_id}: flavor set from the host ({old.name} -> {new.name})"]


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
