"""Repairs: what reconciliation does about what ``reconcile.compare`` found.

``fix_entry`` repairs one finding through the paths live events use: out-of-band transitions
with their own commissions, the deadline resolver, the firewall resync; ``fix_usage`` then
records an adjustment commission (issuer ``reconcile``) for whatever usage still drifts. A repair
touches a VM only when it is settled (not destroyed, no job in flight), locked first, in the
usual lock order; the database follows the hypervisors, never the other way round.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from app.db import snapshot
from app.ids import utcnow
from app.logic import (
    addresses,
    catalogue,
    deadlines,
    events,
    firewall,
    hosts,
    placement,
    quotas,
    reconcile,
    results,
    servers,
)
from app.logic.jobs import Outbox
from app.logic.operstate import RESOURCES, Deltas, Operstate, footprint
from app.models import Flavor, Server

#: The kinds of findings ``fix_entry`` repairs, in the order a pass repairs them.
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
        if await addresses.release(session, [uuid.UUID(entry["server_id"])]):
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
    drift = reconcile.Report()
    await reconcile.quota_drift(session, drift)
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
    await addresses.release(session, [server.id])
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
