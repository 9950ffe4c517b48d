"""Quotas through commissions (DESIGN.md "Quotas: commissions").

The invariant: once no task is pending, each project's recorded usage equals
the usage recomputed from its VMs; while tasks are pending, usage plus the
pending positive deltas never exceeds a limit. Every check runs with the
project's row locked (``lock_project``), so concurrent requests that want
more of a project serialize on it and cannot both squeeze into the last free
slot. Nothing else takes that lock: giving back (negative deltas) needs no
check, and applying a result only moves a delta from pending to usage (an
atomic UPDATE), which a check sees whole or not at all (``report``).
Lock order everywhere: server row, host rows, project row, quota rows: the
project is locked last (check, then commit), and usage moves last of all.
"""

from __future__ import annotations

import functools
import uuid
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow
from app.logic import rows, stream
from app.logic.errors import BadRequest, OverLimit
from app.logic.operstate import RESOURCES, Deltas
from app.models import Commission, Project, Quota, table_of


class CommissionState(StrEnum):
    """A commission is pending until its job's result accepts (usage moves) or rejects it."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


#: Limits of a project created without explicit quotas (ram MiB, disk GiB).
DEFAULT_LIMITS: dict[str, int] = {
    "vm": 20,
    "cpu": 40,
    "ram": 81920,
    "disk": 1000,
    "active_cpu": 40,
    "active_ram": 81920,
    "public_ip": 5,
}

_commissions = table_of(Commission)
_quotas = table_of(Quota)


_LOCK_PROJECT = (
    sa.select(table_of(Project).c.id)
    .where(table_of(Project).c.id == sa.bindparam("project"))
    .with_for_update(key_share=True)
)


def project_lock(project_id: uuid.UUID) -> tuple[sa.Select[Any], dict[str, Any]]:
    """The project's lock as a statement and its parameters, for a caller that sends it along
    with its writes (``rows.insert_new``)."""
    return _LOCK_PROJECT, {"project": project_id}


async def lock_project(session: AsyncSession, project_id: uuid.UUID) -> None:
    await session.execute(*project_lock(project_id))


async def set_limits(session: AsyncSession, project_id: uuid.UUID, limits: dict[str, int]) -> None:
    unknown = set(limits) - set(RESOURCES)
    if unknown:
        raise BadRequest(f"unknown quota resources: {sorted(unknown)}", allowed=list(RESOURCES))
    if any(v < 0 for v in limits.values()):
        raise BadRequest("quota limits must be >= 0")
    existing = {
        q.resource: q for q in (await session.scalars(sa.select(Quota).where(_quotas.c.project_id == project_id)))
    }
    for resource in RESOURCES:
        if resource in existing:
            if resource in limits:
                existing[resource].hard_limit = limits[resource]
        else:
            session.add(
                Quota(
                    project_id=project_id, resource=resource, hard_limit=limits.get(resource, DEFAULT_LIMITS[resource])
                )
            )
    await session.flush()


def _report_statement(project_bind: str) -> sa.Select[Any]:
    """``report``'s statement, built once (the project is the bound parameter ``project_bind``):
    building its expressions took longer than running it."""
    project = sa.bindparam(project_bind, type_=_quotas.c.project_id.type)
    pending = (
        sa.select(
            *(
                sa.func.coalesce(sa.func.sum(sa.case((_commissions.c[r] > 0, _commissions.c[r]), else_=0)), 0).label(r)
                for r in RESOURCES
            )
        )
        .where(_commissions.c.project_id == project, _commissions.c.state == CommissionState.PENDING)
        .subquery()
    )
    return (
        sa.select(_quotas.c.resource, _quotas.c.hard_limit, _quotas.c.usage, *pending.c)
        .select_from(_quotas.join(pending, sa.true()))  # the sums are one row
        .where(_quotas.c.project_id == project)
    )


_REPORT = _report_statement("project_id")


async def report(session: AsyncSession, project_id: uuid.UUID) -> dict[str, dict[str, int]]:
    """``{resource: {limit, usage, pending}}`` for one project, read in one statement.

    One statement is one snapshot: a result applied concurrently (moving a delta from pending
    to usage) is seen entirely or not at all, never half -- which ``check`` relies on, since
    applying a result does not take the project's lock.
    """
    return _state((await session.execute(_REPORT, {"project_id": project_id})).all())


def _state(found: list[Any]) -> dict[str, dict[str, int]]:
    """``report``'s answer from its statement's rows."""
    out = {r: {"limit": 0, "usage": 0, "pending": 0} for r in RESOURCES}
    for row in found:
        out[row.resource].update(limit=int(row.hard_limit), usage=int(row.usage))
    if found:
        for r in RESOURCES:
            out[r]["pending"] = int(getattr(found[0], r))
    return out


async def check(session: AsyncSession, project_id: uuid.UUID, requested: Deltas) -> None:
    """Refuse with ``OverLimit`` unless usage + pending positive + request fits every limit.

    The caller holds the project's lock (``lock_project``).
    """
    if any(v > 0 for v in requested.as_dict().values()):
        _refuse_over(await report(session, project_id), requested)


def _refuse_over(state: dict[str, dict[str, int]], requested: Deltas) -> None:
    """``OverLimit`` for the first resource ``requested`` would take past its limit."""
    wanted = requested.as_dict()
    for resource in RESOURCES:
        need = wanted[resource]
        q = state[resource]
        if need > 0 and q["usage"] + q["pending"] + need > q["limit"]:
            raise OverLimit(
                f"quota exceeded for {resource}",
                resource=resource,
                limit=q["limit"],
                usage=q["usage"],
                pending=q["pending"],
                requested=need,
            )


async def check_and_move(
    session: AsyncSession, project_id: uuid.UUID, requested: Deltas, *, last: bool = False
) -> None:
    """``check``, then ``move_usage`` of what it checked: on PostgreSQL in one statement, for
    the path that holds the project's lock to do just this before its commit (a create), so the
    lock is held one round trip less.

    The statement reads usage and pending in its snapshot, taken once the caller holds the
    project's lock (an earlier statement took it), as ``report`` does; the move is a CTE of it,
    which the read does not see (one snapshot for every part of a statement). The check is made
    on what was read. A refusal comes after the move: the caller's ``OverLimit`` ends its
    transaction or savepoint, whose rollback takes the move back.

    ``last``: the caller changes nothing after it, so the commit's writes go in the same
    statement (``stream.with_out``).
    """
    changes = {r: v for r, v in requested.as_dict().items() if v}
    if deferring(session) or not rows.postgres(session) or not any(v > 0 for v in changes.values()):
        await check(session, project_id, requested)
        await move_usage(session, project_id, requested)
        return
    stream.quota_changed(session, project_id, sorted(changes))
    along = (_check_and_move_statement(tuple(sorted(changes))), _move_params(project_id, changes))
    found = list(await session.execute(*(stream.with_out(session, along) if last else along)))
    _refuse_over(_state(found), requested)


#: ``session.info`` key: usage moves summed per project until ``move_deferred`` (a batch of results).
_DEFERRED = "nephos.deferred_usage"


def defer_usage(session: AsyncSession) -> None:
    """From now on, this transaction's usage moves are summed per project and made by
    ``move_deferred``: one UPDATE per project at the end, so the quota rows are locked once,
    last, and only until the commit, whatever the number of results in the transaction."""
    session.info[_DEFERRED] = {}


def deferring(session: AsyncSession) -> bool:
    """Does this transaction sum its usage moves for ``move_deferred`` (a batch of results)?"""
    return _DEFERRED in session.info


async def move_deferred(session: AsyncSession) -> None:
    """Make the moves ``defer_usage`` summed, project by project in id order (the fixed order
    of multi-row locks)."""
    summed: dict[uuid.UUID, Deltas] = session.info.pop(_DEFERRED, None) or {}
    for project_id in sorted(summed):
        await _move(session, project_id, summed[project_id])


def take_deferred_move(session: AsyncSession) -> tuple[sa.Update, dict[str, Any]] | None:
    """The one project's move ``defer_usage`` summed, as a statement and its parameters, taken
    (for a caller that sends it with its last writes: ``stream.write_last``); None, taking
    nothing, unless exactly one project has a move to make."""
    taken = rows.take_only_move(session, _DEFERRED, Deltas.is_zero)
    if taken is None:
        return None
    project_id, deltas = taken
    return _move_of(project_id, deltas, postgres=True)


async def move_usage(session: AsyncSession, project_id: uuid.UUID, deltas: Deltas) -> None:
    """Add ``deltas`` to the project's usage in one statement. Quota rows are the last rows a
    transaction locks (after hosts): callers move usage at the end of their work."""
    changes = {r: v for r, v in deltas.as_dict().items() if v}
    if not changes:
        return
    stream.quota_changed(session, project_id, sorted(changes))
    summed: dict[uuid.UUID, Deltas] | None = session.info.get(_DEFERRED)
    if summed is not None:
        summed[project_id] = summed.get(project_id, Deltas()) + deltas
        return
    await _move(session, project_id, deltas)


@functools.cache
def _move_statements(resources: tuple[str, ...]) -> tuple[sa.Update, sa.Update]:
    """``_move``'s statement for one set of resources, built once (the project and the amounts
    are bound parameters): PostgreSQL's, that locks the rows in order and moves them in one
    statement; and SQLite's (one writer at a time: nothing to order)."""
    # The rows are locked first, in resource order: an UPDATE alone locks them in whatever
    # order its plan visits them (a bitmap scan by position, an index scan by key), and two
    # transactions whose plans differ took the same rows in opposite orders and deadlocked.
    # A locking sub-SELECT with ORDER BY locks after sorting (its plan is LockRows over Sort,
    # never flattened into the UPDATE), so every mover takes them alike; the UPDATE then
    # finds them held by its own transaction, and moves their newest versions.
    where = (
        _quotas.c.project_id == sa.bindparam("project", type_=_quotas.c.project_id.type),
        _quotas.c.resource.in_(resources),
    )
    # One SET for every resource: a CASE keyed on the resource column.
    amount = sa.case(
        *((_quotas.c.resource == r, sa.bindparam(f"add_{r}", type_=sa.Integer)) for r in resources), else_=0
    )
    locked = (
        sa.select(_quotas.c.project_id, _quotas.c.resource)
        .where(*where)
        .order_by(_quotas.c.resource)
        .with_for_update(key_share=True)
        .subquery("locked")
    )
    in_order = (
        _quotas.update()
        .where(_quotas.c.project_id == locked.c.project_id, _quotas.c.resource == locked.c.resource)
        .values(usage=_quotas.c.usage + amount)
    )
    return in_order, _quotas.update().where(*where).values(usage=_quotas.c.usage + amount)


@functools.cache
def _check_and_move_statement(resources: tuple[str, ...]) -> sa.Select[Any]:
    """``check_and_move``'s statement on PostgreSQL: ``report``'s, with ``_move``'s UPDATE of
    these resources as a CTE of it (built once per set of resources)."""
    in_order, _ = _move_statements(resources)
    # The project is bound once, as ``project`` for both: executed with a parameter named as a
    # column (``project_id``), the UPDATE would also set that column.
    return _report_statement("project").add_cte(in_order.returning(_quotas.c.resource).cte("moved"))


async def _move(session: AsyncSession, project_id: uuid.UUID, deltas: Deltas) -> None:
    move = _move_of(project_id, deltas, postgres=rows.postgres(session))
    if move is not None:
        await session.execute(*move)


def _move_of(project_id: uuid.UUID, deltas: Deltas, *, postgres: bool) -> tuple[sa.Update, dict[str, Any]] | None:
    """``_move``'s statement for this dialect and its parameters (None: nothing moves)."""
    changes = {r: v for r, v in deltas.as_dict().items() if v}
    if not changes:
        return None
    in_order, plain = _move_statements(tuple(sorted(changes)))
    return (in_order if postgres else plain), _move_params(project_id, changes)


def _move_params(project_id: uuid.UUID, changes: dict[str, int]) -> dict[str, Any]:
    """The parameters of ``_move_statements``' statements (and of ``check_and_move``'s)."""
    return {"project": project_id} | {f"add_{r}": v for r, v in changes.items()}


async def issue(
    session: AsyncSession,
    *,
    project_id: uuid.UUID,
    server_id: uuid.UUID | None,
    deltas: Deltas,
    issuer: str = "api",
    accept: bool = False,
    reason: str | None = None,
    move: bool = True,
    commission_id: uuid.UUID | None = None,
    job_id: uuid.UUID | None = None,
) -> Commission:
    """Record a commission (with ``commission_id``, under an id the caller already gave its
    job); with ``accept`` it is accepted at once, and usage moves now unless ``move`` is false
    (the caller then moves it last, with ``move_usage``). No limit check here."""
    commission = Commission(project_id=project_id, server_id=server_id, issuer=issuer, reason=reason, job_id=job_id)
    if commission_id is not None:
        commission.id = commission_id
    for resource, amount in deltas.as_dict().items():
        setattr(commission, resource, amount)
    if accept:
        commission.state = CommissionState.ACCEPTED
        commission.resolved_at = utcnow()
        if move:
            await move_usage(session, project_id, deltas)
    else:  # pending amounts move
        stream.quota_changed(session, project_id, [r for r, v in deltas.as_dict().items() if v])
    session.add(commission)
    return commission


def deltas_of(commission: Commission) -> Deltas:
    return Deltas(**{r: getattr(commission, r) for r in RESOURCES})


async def accept(session: AsyncSession, commission: Commission) -> None:
    if commission.state != CommissionState.PENDING:
        return
    await move_usage(session, commission.project_id, deltas_of(commission))
    commission.state = CommissionState.ACCEPTED
    commission.resolved_at = utcnow()


async def reject(session: AsyncSession, commission: Commission, reason: str) -> None:
    if commission.state != CommissionState.PENDING:
        return
    commission.state = CommissionState.REJECTED
    commission.reason = reason
    commission.resolved_at = utcnow()
    stream.quota_changed(session, commission.project_id, [r for r, v in deltas_of(commission).as_dict().items() if v])


async def get_commission(session: AsyncSession, commission_id: uuid.UUID | None) -> Commission | None:
    """The commission, locked and read afresh (read from the session if ``rows.lock_all`` holds
    it already). Afresh: a ``get`` that locks still keeps the attributes of a row the session
    had read before, unlocked."""
    if commission_id is None:
        return None
    if rows.held(session, Commission, commission_id):
        return await session.get(Commission, commission_id)
    return await session.get(Commission, commission_id, with_for_update={"key_share": True}, populate_existing=True)


def as_limits(raw: dict[str, Any] | None) -> dict[str, int]:
    return {k: int(v) for k, v in (raw or {}).items()}
