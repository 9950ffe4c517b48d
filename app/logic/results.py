"""Applying a job's outcome: what the dispatcher calls for every result.

``apply_result`` runs in the caller's transaction and, in it: sets the
operstate the table says, clears the task only when the job is the VM's
current task, accepts or rejects the job's commission, records an event,
and frees or moves host capacity. It is a no-op for a job already final, so
a redelivered result changes nothing.

Quota bookkeeping follows one rule, whatever happened in between: the change
the VM's usage really undergoes is ``footprint(after) - footprint(before)``,
computed from the state stored *before* this result. A pending commission
that says exactly that is accepted; one that does not (a destroy overtook
the task, an out-of-band change got there first) is rejected as stale and a
dispatcher-issued commission for the real change is accepted instead. So a
duplicate or stale event can never move usage twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from enum import StrEnum
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from app.ids import utcnow
from app.logic import addresses, events, placement, quotas, rows, servers, stream
from app.logic.catalogue import ImageStatus
from app.logic.jobs import FINAL, JobStatus
from app.logic.operstate import TABLE, Action, Operstate, Task, footprint, target_state
from app.models import Commission, Flavor, Image, Job, Server, table_of

_jobs, _servers, _flavors = table_of(Job), table_of(Server), table_of(Flavor)
_commissions = table_of(Commission)
T = TypeVar("T")


def _server_of_job(postgres: bool) -> sa.Select[*tuple[Any, ...]]:
    """A job's VM and the job, locked in that order (the VM's lock is the per-VM task lock: every
    writer takes it first), read afresh with the VM's flavor (which ``session.get`` then finds in
    the session), and then the job's commission, locked last, in one statement: no row when
    there is no such job. PostgreSQL locks a row's relations in the order ``OF`` names them.

    A job may have no commission, and PostgreSQL locks no row on the nullable side of an outer
    join: there, the VM and the job are locked in a sub-SELECT, and the commission in a LATERAL
    sub-SELECT joined to each row it gives, so only once they are held (lock order: server,
    job, commission). SQLite locks no rows (one writer at a time: its transactions begin
    IMMEDIATE), and reads the commission with an outer join."""
    found = (
        sa.select(Server, Flavor, Job)
        .join(_flavors, _flavors.c.id == _servers.c.flavor_id)
        .join(_jobs, _jobs.c.server_id == _servers.c.id)
        .where(_jobs.c.id == sa.bindparam("job"))
    )
    if not postgres:
        return (
            found.add_columns(Commission)
            .outerjoin(_commissions, _commissions.c.id == _jobs.c.commission_id)
            .execution_options(populate_existing=True)
        )
    held = (
        found.with_for_update(of=[_servers, _jobs], key_share=True)
        .set_label_style(sa.LABEL_STYLE_TABLENAME_PLUS_COL)
        .subquery("held")
    )
    commission = (
        sa.select(_commissions)
        .where(_commissions.c.id == held.c.jobs_commission_id)
        .with_for_update(key_share=True)
        .lateral("commission")
    )
    return (
        sa.select(aliased(Server, held), aliased(Flavor, held), aliased(Job, held), aliased(Commission, commission))
        .select_from(held)
        .outerjoin(commission, sa.true())
        .execution_options(populate_existing=True)
    )


_SERVER_OF_JOB = rows.ByDialect(_server_of_job)


class Outcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # the job was already final
    UNKNOWN = "unknown"  # no such job


def _batch_vms(postgres: bool) -> sa.Select[*tuple[Any, ...]]:
    """``begin_batch``'s first statement, built once per dialect (one text for a batch of any
    size): the VMs named and those of the jobs named, locked in id order, each with its flavor
    (not locked: flavors do not change under a VM)."""
    # One list of ids, so the VMs are found by key (an OR of the two would scan the table).
    wanted = sa.union_all(
        sa.select(_jobs.c.server_id).where(rows.among(_jobs.c.id, "job_ids", postgres=postgres)),
        sa.select(_servers.c.id).where(rows.among(_servers.c.id, "server_ids", postgres=postgres)),
    )
    return (
        sa.select(Server, Flavor)
        .join(_flavors, _flavors.c.id == _servers.c.flavor_id)
        .where(_servers.c.id.in_(wanted))
        .order_by(_servers.c.id)
        .with_for_update(of=_servers, key_share=True)
        .execution_options(populate_existing=True)
    )


_BATCH_VMS = rows.ByDialect(_batch_vms)


async def begin_batch(
    session: AsyncSession, *, job_ids: set[uuid.UUID], server_ids: set[uuid.UUID]
) -> dict[uuid.UUID, uuid.UUID]:
    """Open a batch of results in one transaction: returns each known job's VM, having locked
    every VM the batch touches in id order, so two batches never wait on each other in opposite
    orders. Host and usage moves are then summed, and made last by ``end_batch``: one UPDATE per
    host and per project for the whole batch, so a project's quota rows are locked once per
    batch and only until its commit."""
    # The VMs with their flavors, in one statement; then their jobs and the jobs' commissions,
    # each in one statement (the lock order of ``apply_result``: server, job, commission).
    # Applying the results reads them all from the session.
    found = await session.execute(
        _BATCH_VMS.of(session), {"job_ids": sorted(job_ids), "server_ids": sorted(server_ids)}
    )
    for vm, flavor in found:
        rows.hold(session, vm)
        rows.keep(session, [flavor])
    held = await rows.lock_all(session, Job, job_ids)
    await rows.lock_all(session, Commission, [job.commission_id for job in held if job.commission_id is not None])
    owners = {job.id: job.server_id for job in held}
    placement.defer_moves(session)
    addresses.defer_releases(session)
    quotas.defer_usage(session)
    return owners


async def end_batch(session: AsyncSession) -> None:
    """Make a batch's summed moves: hosts, the destroyed VMs' addresses, then quota rows (the
    order a result alone takes them in)."""
    await _hosts_and_addresses(session)
    await quotas.move_deferred(session)
    rows.release_all(session)


async def _hosts_and_addresses(session: AsyncSession) -> None:
    """The hosts' summed moves, then the destroyed VMs' addresses given back. One host's move
    (a result alone has at most one) goes with the addresses, in one statement on PostgreSQL;
    several are made one by one, in name order, the fixed order of multi-row locks."""
    one = placement.take_deferred_move(session)
    await placement.add_deferred(session)
    await addresses.give_back_deferred(session, along=one)


def begin_alone(session: AsyncSession) -> None:
    """A result applied alone (not in a batch): its host and usage moves and its addresses'
    release wait for ``end_alone``, as a batch's do, so its VM's and job's changes are not
    written before them, and a destroy gives its host room and addresses back in one statement."""
    placement.defer_moves(session)
    addresses.defer_releases(session)
    quotas.defer_usage(session)


async def end_alone(session: AsyncSession) -> None:
    """A result applied alone, written: its host's move and its addresses' release, then its
    VM's, job's and commission's changes, its usage move (the quota rows, locked last and only
    until the commit) and their events, in one statement (``stream.write_last``)."""
    move = quotas.take_deferred_move(session)  # (one project's: a result alone has one)
    with session.no_autoflush:  # the rows' changes go in the last statement, not before the moves
        await _hosts_and_addresses(session)
        await quotas.move_deferred(session)
    await stream.write_last(session, move)
    rows.release_all(session)


def in_sequence(items: list[T], key: Callable[[T], tuple[uuid.UUID, int] | None]) -> list[T]:
    """``items`` with each VM's events in the order of their ``seq``, as its host stamped them.

    ``key`` gives an item's VM and sequence number (``None``: no VM). Items of one VM take the
    places that VM's items had, sorted by sequence; every other item keeps its place. So a
    batch that received a VM's events out of order applies them in order, and a true duplicate
    or a stale event is still caught by ``last_seq`` as it would be one by one.
    """
    slots: dict[uuid.UUID, list[int]] = {}
    for index, item in enumerate(items):
        found = key(item)
        if found is not None:
            slots.setdefault(found[0], []).append(index)
    ordered = list(items)
    for indices in slots.values():
        by_seq = sorted((items[i] for i in indices), key=lambda item: key(item)[1])  # type: ignore[index]
        for index, item in zip(indices, by_seq, strict=True):
            ordered[index] = item
    return ordered


async def apply_result(
    session: AsyncSession,
    *,
    job_id: uuid.UUID,
    success: bool,
    error: str | None = None,
    seq: int | None = None,
    details: dict[str, Any] | None = None,
    domain_state: str | None = None,
) -> Outcome:
    """Apply a job's SUCCESS (``success=True``) or ERROR outcome; idempotent.

    ``domain_state`` and ``details`` are what the agent saw after the job; both are kept on the
    job. A "success" whose domain is not in the state the action leads to (a start whose domain
    is off) is not believed: the job ends in ERROR saying so, and the VM takes the state its
    host reports, through the out-of-band path with its own commission.
    """
    known: Commission | None = None  # the job's commission, as read with it (unlocked)
    if rows.held(session, Job, job_id):  # locked and read afresh by ``begin_batch``, VM first
        job = await session.get(Job, job_id)
        assert job is not None
        server = await servers.locked(session, job.server_id)
        assert server is not None  # jobs reference their server
    else:
        # Lock order: server first, as every other writer does, then the job, then its
        # commission -- with the VM's flavor, in one statement. (``execute``, not ``scalars``:
        # the flavor, the job and the commission must be loaded too, not only the VM.)
        row = (await session.execute(_SERVER_OF_JOB.of(session), {"job": job_id})).first()
        if row is None:
            return Outcome.UNKNOWN  # no such job (every job has its server)
        server, _, job, known = row
        if known is not None:  # locked with them: settling it needs no statement of its own
            rows.hold(session, known)
    if job.status in FINAL:
        return Outcome.DUPLICATE

    # A result older than an event already applied to this VM still ends its
    # job, but says nothing current about the operstate.
    stale = seq is not None and seq <= server.last_seq
    if seq is not None and not stale:
        server.last_seq = seq
    action = Action(job.action)
    params = job.params
    current = server.task_job_id == job.id
    superseded = bool(params.get("reservation_released"))
    before = Operstate(server.operstate)
    flavor = await session.get(Flavor, server.flavor_id)
    assert flavor is not None
    new_flavor = flavor

    contradicted: str | None = None
    if (
        success
        and current
        and not stale
        and before is not Operstate.DESTROYED
        and action not in (Action.MIGRATE, Action.LIVE_MIGRATE)  # the source reports after it left
        and _contradicts(target_state(action, before, True), domain_state)
    ):
        contradicted = domain_state
        success = False
        error = (
            f"the agent reported success, but the domain is {domain_state}: "
            f"{action.value} should have left it {target_state(action, before, True).value}"
        )

    after: Operstate
    if before is Operstate.DESTROYED:
        after = before  # nothing happens to a destroyed VM any more
    else:
        # Destruction is final whatever was seen before it; other stale results keep the state.
        keep = stale and action is not Action.DESTROY
        after = before if keep else target_state(action, before, success)
        if success and action is Action.RESIZE:
            new_flavor = await session.get(Flavor, uuid.UUID(params["flavor_id"])) or flavor
        await _move_host_room(session, server, job, action, success, superseded)

    now = utcnow()
    if seq is not None and job.started_at is None:
        # An agent ran it, but its RUNNING report is late (dispatchers handle messages
        # concurrently, and a late RUNNING is ignored): the history still says it started.
        job.started_at = now
        events.record(
            session, server, "job_started", job_id=job.id, action=action.value, message=f"running on {job.host}"
        )
    server.operstate = after.value
    server.flavor_id = new_flavor.id
    if after is Operstate.DESTROYED and before is not Operstate.DESTROYED:
        server.destroyed_at = now
        # Other tables' rows, by the VM's id: the VM's own changes are flushed once, later.
        with session.no_autoflush:
            if server.host is not None:
                await placement.release(session, host=server.host, vcpus=flavor.vcpus, ram_mb=flavor.ram_mb)
            await addresses.give_back(session, [server.id])
    if current or after is Operstate.DESTROYED:
        server.task, server.task_job_id = None, None
        if current and action is Action.DESTROY and not success:
            await _resume_overtaken(session, server, job)
    server.updated_at = now
    job.status = (JobStatus.SUCCESS if success else JobStatus.ERROR).value
    job.error = None if success else (error or "the job failed")
    job.finished_at = now
    job.domain_state = domain_state
    reported = {k: v for k, v in (details or {}).items() if k != "purge"}
    job.details = reported or None
    if success and action is Action.CONSOLE and int(reported.get("port") or 0) > 0:
        server.vnc_port = int(reported["port"])  # the port the domain really listens on
    if action is Action.SAVE_IMAGE:
        image = await session.get(Image, uuid.UUID(params["image_id"]))
        if image is not None:
            image.status = (ImageStatus.ACTIVE if success else ImageStatus.ERROR).value
            if success and reported.get("size_bytes") is not None:
                image.size_bytes = int(reported["size_bytes"])
    events.record(
        session,
        server,
        "job_succeeded" if success else "job_failed",
        job_id=job.id,
        action=action.value,
        before=before.value,
        after=after.value,
        message=error or ("stale result: operstate kept" if stale else ""),
    )
    if after is Operstate.DESTROYED and before is not Operstate.DESTROYED:
        await _finish_overtaken(session, server, job)
    # Usage moves last: the quota rows it updates stay locked only until the commit. A batch
    # makes its moves at its end, and its VMs' and jobs' changes are written then, together
    # (one UPDATE of many rows per table, not two statements per result).
    if not quotas.deferring(session):
        await session.flush()
    real = footprint(after, new_flavor.vcpus, new_flavor.ram_mb, new_flavor.disk_gb) - footprint(
        before, flavor.vcpus, flavor.ram_mb, flavor.disk_gb
    )
    # A commission already final (a create's, accepted when it was) has nothing left to settle.
    settled = known is not None and known.state != quotas.CommissionState.PENDING
    with session.no_autoflush:  # the VM's and job's changes wait for the last write (``end_alone``)
        commission = None if settled else await quotas.get_commission(session, job.commission_id)
    if commission is not None and commission.state == quotas.CommissionState.PENDING:
        if quotas.deltas_of(commission) == real:
            await quotas.accept(session, commission)
            real = real - real
        else:
            await quotas.reject(session, commission, "the change it described did not happen as described")
    if not real.is_zero():
        await quotas.issue(
            session,
            project_id=server.project_id,
            server_id=server.id,
            deltas=real,
            issuer="dispatcher",
            accept=True,
            reason=f"{action.value} result moved usage uncommissioned",
        )
    if contradicted is not None:
        # The VM follows its host, as for any change nobody asked for.
        await session.flush()
        await apply_state_change(
            session,
            server_id=server.id,
            observed=contradicted,
            seq=None,
            reason=f"after {action.value}, the host reports the domain {contradicted}",
        )
    return Outcome.APPLIED


def _contradicts(expected: Operstate, domain_state: str | None) -> bool:
    """Does the domain state an agent saw contradict the operstate the job should have left?"""
    if domain_state is None or domain_state == "other":
        return False  # nothing said, or nothing Nephos can judge
    if expected is Operstate.DESTROYED:
        return domain_state != "missing"
    return OBSERVED.get(domain_state) is not expected


async def _move_host_room(
    session: AsyncSession, server: Server, job: Job, action: Action, success: bool, superseded: bool
) -> None:
    """Resize and migrate reserved room when accepted: keep, give back or move it now."""
    reserved = job.params.get("reserved")
    if not reserved:
        return
    vcpus, ram = int(reserved["vcpus"]), int(reserved["ram_mb"])
    if action is Action.RESIZE:
        if superseded and success:
            await placement.add(session, host=server.host, vcpus=vcpus, ram_mb=ram)
        elif not superseded and not success:
            await placement.release(session, host=server.host, vcpus=vcpus, ram_mb=ram)
    elif action in (Action.MIGRATE, Action.LIVE_MIGRATE):
        target = job.params["target_host"]
        if success:
            if superseded:
                await placement.add(session, host=target, vcpus=vcpus, ram_mb=ram)
            await placement.release(session, host=server.host, vcpus=vcpus, ram_mb=ram)
            server.host = target
            server.vnc_port = job.params.get("target_vnc_port", server.vnc_port)
        elif not superseded:
            await placement.release(session, host=target, vcpus=vcpus, ram_mb=ram)


def _overtaken(server: Server, destroy_job: Job) -> sa.Select[Job]:
    """The server's live jobs other than its destroy: those the destroy overtook."""
    return sa.select(Job).where(
        _jobs.c.server_id == server.id, _jobs.c.id != destroy_job.id, _jobs.c.status.notin_([s.value for s in FINAL])
    )


async def _resume_overtaken(session: AsyncSession, server: Server, destroy_job: Job) -> None:
    """A destroy failed: the task it overtook, if its job is still out on the host, is the
    VM's task again -- so a live job is always its VM's task, and no second action is
    accepted while the first may still be running. (Its commission stays rejected and its
    reservation given back; its result moves usage as an uncommissioned change.)"""
    overtaken = (await session.scalars(_overtaken(server, destroy_job).order_by(_jobs.c.id.desc()).limit(1))).first()
    if overtaken is not None:
        server.task, server.task_job_id = TABLE[Action(overtaken.action)].task, overtaken.id
        events.record(
            session,
            server,
            "task_resumed",
            job_id=overtaken.id,
            action=overtaken.action,
            message=f"destroy failed: {overtaken.action} is the task again",
        )


async def _finish_overtaken(session: AsyncSession, server: Server, destroy_job: Job) -> None:
    """A job is final no later than its server's task is cleared: end the ones destroy overtook.
    A destroy that overtook none says so in its parameters (``overtook``: empty), and nothing
    is read; one from before that parameter is looked up."""
    if destroy_job.params.get("overtook", None) == []:
        return
    overtaken = list(
        await session.scalars(  # several rows: locked in id order, as everywhere
            _overtaken(server, destroy_job).order_by(_jobs.c.id).with_for_update(key_share=True)
        )
    )
    now = utcnow()
    for job in overtaken:
        commission = await quotas.get_commission(session, job.commission_id)
        if commission is not None:
            await quotas.reject(session, commission, "superseded by destroy")
        job.status, job.error, job.finished_at = JobStatus.ERROR.value, "superseded by destroy", now
        events.record(session, server, "job_failed", job_id=job.id, action=job.action, message="superseded by destroy")


#: What a domain state observed on a host means for the VM's operstate (``None``: no domain).
OBSERVED: dict[str, Operstate | None] = {
    "running": Operstate.STARTED,
    "paused": Operstate.SUSPENDED,
    "shutoff": Operstate.STOPPED,
    "crashed": Operstate.STOPPED,
    "missing": None,
}


async def apply_state_change(
    session: AsyncSession,
    *,
    server_id: uuid.UUID,
    observed: str,
    seq: int | None,
    reason: str = "",
    issuer: str = "dispatcher",
) -> Outcome:
    """A change nobody commissioned (guest shut down, crash, an operator on the host).

    The VM takes the observed operstate, the pending commission of its task (which described
    a view that is now stale) is rejected, and a commission for the real change, computed from
    the state before it, is issued and accepted -- so quotas follow reality without anyone
    running anything. A VM being built is left to its build job's result; a missing domain is
    reconciliation's business (it may be mid-migration or never created).
    """
    server = await servers.locked(session, server_id)
    if server is None:
        return Outcome.UNKNOWN
    if seq is not None:
        if seq <= server.last_seq:
            return Outcome.DUPLICATE
        server.last_seq = seq
    before = Operstate(server.operstate)
    after = OBSERVED.get(observed)
    if (
        after is None
        or after is before
        or before in (Operstate.DESTROYED, Operstate.HOLD)
        or server.task in (Task.BUILD, Task.DESTROY)
    ):
        return Outcome.APPLIED
    task_job = await session.get(Job, server.task_job_id) if server.task_job_id is not None else None
    if task_job is not None and after is target_state(Action(task_job.action), before, True):
        # The pending task doing what it was asked (its event overtook its result, which
        # dispatchers may handle in any order): the job's result applies it, with its commission.
        return Outcome.APPLIED
    if task_job is not None:
        commission = await quotas.get_commission(session, task_job.commission_id)
        if commission is not None:
            await quotas.reject(session, commission, f"stale: the VM went {after.value} on its own")
    flavor = await session.get(Flavor, server.flavor_id)
    assert flavor is not None
    real = footprint(after, flavor.vcpus, flavor.ram_mb, flavor.disk_gb) - footprint(
        before, flavor.vcpus, flavor.ram_mb, flavor.disk_gb
    )
    if not real.is_zero():
        await quotas.issue(
            session,
            project_id=server.project_id,
            server_id=server.id,
            deltas=real,
            issuer=issuer,
            accept=True,
            reason=f"out-of-band {before.value} -> {after.value}",
        )
    server.operstate = after.value
    server.updated_at = utcnow()
    events.record(
        session,
        server,
        "out_of_band",
        before=before.value,
        after=after.value,
        message=reason or f"the host reports the domain {observed}",
    )
    return Outcome.APPLIED
