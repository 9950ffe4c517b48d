"""Placement: which host takes a VM, and how much room the hosts have left.

Filter hosts by zone, state ``up`` and free CPU / RAM (capacity times the
overcommit ratio, minus what placed VMs hold), weigh by free RAM, reserve.
A VM holds its host's CPU and memory from placement until it is destroyed
(a stopped VM can start again without being placed anew).

Race safety: the reservation is a conditional UPDATE
(``used + want <= capacity * ratio``) that refuses to overfill a host whatever
runs concurrently. One VM takes the best host no other transaction holds (``SKIP
LOCKED``), so concurrent creates fill several hosts at once instead of queueing on
one row; a transaction placing several VMs first locks the candidate hosts in id
order (one order for every transaction, so two cannot deadlock).
Lock order: server, hosts, project, quota rows.
"""

from __future__ import annotations

import functools
import math
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import rows
from app.logic.errors import NoCapacity
from app.logic.hoststate import WITHOUT_INVENTORY, HostState
from app.models import Flavor, Host, table_of

_hosts = table_of(Host)
VNC_BASE = 5900
VNC_RANGE = 10000


@dataclass(frozen=True)
class Placed:
    host: str
    zone: str
    vnc_port: int


def free_of(host: Host) -> tuple[int, int]:
    """(free vCPUs, free MiB) of a host, overcommit included."""
    return (
        math.floor(host.cpus * host.cpu_ratio) - host.used_cpus,
        math.floor(host.ram_mb * host.ram_ratio) - host.used_ram_mb,
    )


@functools.cache
def _candidates_statement(zone: bool, lock: bool) -> sa.Select[Any]:
    stmt = (
        sa.select(Host)
        .options(WITHOUT_INVENTORY)
        .where(_hosts.c.state == HostState.UP)
        .execution_options(populate_existing=True)
    )
    if zone:
        stmt = stmt.where(_hosts.c.zone == sa.bindparam("in_zone"))
    if lock:
        stmt = stmt.order_by(_hosts.c.id).with_for_update(key_share=True)
    return stmt


async def _candidates(session: AsyncSession, zone: str | None, *, lock: bool = False) -> list[Host]:
    """Up hosts (of ``zone``), read afresh; with ``lock``, locked in id order."""
    stmt = _candidates_statement(zone is not None, lock)
    return list(await session.scalars(stmt, {"in_zone": zone} if zone is not None else {}))


async def reserve(
    session: AsyncSession,
    *,
    vcpus: int,
    ram_mb: int,
    zone: str | None,
    host: str | None = None,
    exclude: str | None = None,
    several: bool = False,
) -> Placed:
    """Reserve ``vcpus`` / ``ram_mb`` on the best fitting host, or raise ``NoCapacity``.

    One VM needs no lock on the candidates: it takes the best fitting host no one else holds,
    or, when every fitting host is held, waits for the best one, in one statement; it moves on to
    the next best when another transaction filled that one meanwhile. A transaction that places
    ``several`` VMs locks the candidates in id order first, so two such transactions cannot take
    the same hosts in opposite orders.
    """
    if not several:
        placed = await _reserve_one(session, vcpus=vcpus, ram_mb=ram_mb, zone=zone, host=host, exclude=exclude)
        if placed is not None:
            return placed
    found = await _candidates(session, zone, lock=several)
    candidates = [h for h in found if (host is None or h.name == host) and h.name != exclude]
    fitting = [h for h in candidates if free_of(h)[0] >= vcpus and free_of(h)[1] >= ram_mb]
    for chosen in sorted(fitting, key=lambda h: free_of(h)[1], reverse=True):
        # The loaded Host is left untouched: the ORM would write it back as absolute values
        # over concurrent reservations. A later read in this transaction re-reads the row.
        row = (
            await session.execute(_ON_HOST_ID, {"host_id": chosen.id, "want_cpus": vcpus, "want_ram": ram_mb})
        ).first()
        if row is not None:
            return _placed(row)
    where = f"host {host}" if host else (f"zone {zone}" if zone else "any zone")
    raise NoCapacity(
        f"no host in {where} can take {vcpus} vCPUs and {ram_mb} MiB",
        vcpus=vcpus,
        ram_mb=ram_mb,
        zone=zone,
        host=host,
    )


def _room_for(vcpus: int | sa.BindParameter[int], ram_mb: int | sa.BindParameter[int]) -> sa.ColumnElement[bool]:
    return sa.and_(
        _hosts.c.used_cpus + vcpus <= _hosts.c.cpus * _hosts.c.cpu_ratio,
        _hosts.c.used_ram_mb + ram_mb <= _hosts.c.ram_mb * _hosts.c.ram_ratio,
    )


def _reservation(
    which: sa.ColumnElement[bool], vcpus: int | sa.BindParameter[int], ram_mb: int | sa.BindParameter[int]
) -> sa.Update:
    """Reserve on the host ``which`` names, if it has the room (the conditional UPDATE)."""
    return (
        _hosts.update()
        .where(which, _room_for(vcpus, ram_mb))
        .values(
            used_cpus=_hosts.c.used_cpus + vcpus,
            used_ram_mb=_hosts.c.used_ram_mb + ram_mb,
            vnc_seq=_hosts.c.vnc_seq + 1,
        )
        .returning(_hosts.c.name, _hosts.c.zone, _hosts.c.vnc_seq)
    )


def _placed(row: sa.Row[Any]) -> Placed:
    return Placed(row.name, row.zone, VNC_BASE + row.vnc_seq % VNC_RANGE)


_WANT_CPUS, _WANT_RAM = sa.bindparam("want_cpus", type_=sa.Integer), sa.bindparam("want_ram", type_=sa.BigInteger)
#: The reservation on one host, by id (``reserve``'s last resort, host by host).
_ON_HOST_ID = _reservation(_hosts.c.id == sa.bindparam("host_id"), _WANT_CPUS, _WANT_RAM)


@functools.cache
def _one_statement(zone: bool, host: bool, exclude: bool) -> sa.Update:
    """``_reserve_one``'s statement for one shape of request (which filters it has), built once
    with its values as bound parameters: building it took longer than running it."""
    vcpus, ram_mb = _WANT_CPUS, _WANT_RAM
    pick = sa.select(_hosts.c.id).where(_hosts.c.state == HostState.UP, _room_for(vcpus, ram_mb))
    if zone:
        pick = pick.where(_hosts.c.zone == sa.bindparam("in_zone"))
    if host:
        pick = pick.where(_hosts.c.name == sa.bindparam("on_host"))
    if exclude:
        pick = pick.where(_hosts.c.name != sa.bindparam("not_host"))
    free_ram = sa.func.floor(_hosts.c.ram_mb * _hosts.c.ram_ratio) - _hosts.c.used_ram_mb
    pick = pick.order_by(free_ram.desc(), _hosts.c.name).limit(1)
    # The best no one holds, else (PostgreSQL evaluates the second only when the first found
    # none) the best as the statement's snapshot sees it. SQLite has no row locks: both are
    # the same pick there.
    unheld = pick.with_for_update(key_share=True, skip_locked=True).scalar_subquery()
    return _reservation(_hosts.c.id == sa.func.coalesce(unheld, pick.scalar_subquery()), vcpus, ram_mb)


async def _reserve_one(
    session: AsyncSession,
    *,
    vcpus: int,
    ram_mb: int,
    zone: str | None,
    host: str | None,
    exclude: str | None,
) -> Placed | None:
    """One statement: the best fitting up host that no other transaction holds, reserved (a
    host another create is filling is skipped rather than waited for, so concurrent creates
    spread over the hosts instead of queueing on the freest one); when every fitting host is
    held, the best as this statement's snapshot sees it, waited for: the conditional UPDATE
    re-checks the room on the row as the holder left it. None when that host has been filled
    meanwhile (or none fits): ``reserve`` then tries host by host, or says there is no room.
    (Until step 20 of bench/README.md, the wait was a second statement, sent by three creates
    in four under load.)"""
    stmt = _one_statement(zone is not None, host is not None, exclude is not None)
    values = {"want_cpus": vcpus, "want_ram": ram_mb, "in_zone": zone, "on_host": host, "not_host": exclude}
    row = (await session.execute(stmt, {k: v for k, v in values.items() if v is not None})).first()
    return None if row is None else _placed(row)


async def grow(session: AsyncSession, *, host: str, vcpus: int, ram_mb: int) -> None:
    """Reserve more on the VM's own host (resize up); ``NoCapacity`` when it does not fit."""
    if vcpus <= 0 and ram_mb <= 0:
        await release(session, host=host, vcpus=-vcpus, ram_mb=-ram_mb)
        return
    # The conditional UPDATE takes the host's row lock and re-checks the room
    # after any concurrent writer commits, so the host is never overfilled.
    done = (
        await session.execute(
            _hosts.update()
            .where(_hosts.c.name == host, _room_for(vcpus, ram_mb))
            .values(used_cpus=_hosts.c.used_cpus + vcpus, used_ram_mb=_hosts.c.used_ram_mb + ram_mb)
            .returning(_hosts.c.id)
        )
    ).scalar_one_or_none()
    if done is None:
        raise NoCapacity(
            f"host {host} cannot grow by {vcpus} vCPUs and {ram_mb} MiB", host=host, vcpus=vcpus, ram_mb=ram_mb
        )


async def release(session: AsyncSession, *, host: str | None, vcpus: int, ram_mb: int) -> None:
    """Give back what a VM held on ``host`` (unconditional: it reflects what happened)."""
    await add(session, host=host, vcpus=-vcpus, ram_mb=-ram_mb)


#: ``session.info`` key: host usage moves summed per host until ``add_deferred``.
_DEFERRED = "nephos.deferred_hosts"


def defer_moves(session: AsyncSession) -> None:
    """From now on, this transaction's unchecked host moves (``add``, ``release``) are summed per
    host and made by ``add_deferred``: a batch of results updates each host row once."""
    session.info[_DEFERRED] = {}


async def add_deferred(session: AsyncSession) -> None:
    """Make the moves ``defer_moves`` summed, host by host in name order."""
    summed: dict[str, tuple[int, int]] = session.info.pop(_DEFERRED, None) or {}
    for host in sorted(summed):
        await add(session, host=host, vcpus=summed[host][0], ram_mb=summed[host][1])


def take_deferred_move(session: AsyncSession) -> tuple[sa.Update, dict[str, Any]] | None:
    """The one host's move ``defer_moves`` summed, as a statement and its parameters, taken (for
    a caller that sends it with other writes on PostgreSQL: ``addresses.give_back_deferred``);
    None, taking nothing, unless exactly one host has a move to make and the database is
    PostgreSQL -- otherwise ``add_deferred`` makes them one by one, in name order."""
    taken = rows.take_only_move(session, _DEFERRED, lambda move: move == (0, 0))
    if taken is None:
        return None
    host, (vcpus, ram_mb) = taken
    return _MOVE, {"move_host": host, "move_cpus": vcpus, "move_ram": ram_mb}


#: An unchecked move of one host's usage (``add``), built once: the host and the amounts are
#: bound parameters, named apart from those of the statements it may be sent with.
_MOVE = (
    _hosts.update()
    .where(_hosts.c.name == sa.bindparam("move_host"))
    .values(
        used_cpus=_hosts.c.used_cpus + sa.bindparam("move_cpus", type_=sa.Integer),
        used_ram_mb=_hosts.c.used_ram_mb + sa.bindparam("move_ram", type_=sa.BigInteger),
    )
)


async def add(session: AsyncSession, *, host: str | None, vcpus: int, ram_mb: int) -> None:
    """Move a host's usage without a capacity check: the hypervisor already did it."""
    if host is None or (vcpus == 0 and ram_mb == 0):
        return
    summed: dict[str, tuple[int, int]] | None = session.info.get(_DEFERRED)
    if summed is not None:
        cpus, ram = summed.get(host, (0, 0))
        summed[host] = (cpus + vcpus, ram + ram_mb)
        return
    await session.execute(_MOVE, {"move_host": host, "move_cpus": vcpus, "move_ram": ram_mb})


@dataclass(frozen=True)
class Fit:
    """How many more VMs of a flavor a zone takes now, and would take on empty hosts."""

    flavor: Flavor
    zone: str
    now: int
    empty: int
    hosts_up: int


def _fits(cpu: int, ram: int, flavor: Flavor) -> int:
    return max(0, min(cpu // flavor.vcpus, ram // flavor.ram_mb))


async def fits(session: AsyncSession, flavors: list[Flavor]) -> list[Fit]:
    """Per flavor and zone (of the up hosts): room now, and room were the hosts empty."""
    hosts = list(
        await session.scalars(sa.select(Host).options(WITHOUT_INVENTORY).where(_hosts.c.state == HostState.UP))
    )
    zones: dict[str, list[Host]] = {}
    for h in hosts:
        zones.setdefault(h.zone, []).append(h)
    out = []
    for flavor in flavors:
        for zone, members in sorted(zones.items()):
            now = sum(_fits(*free_of(h), flavor) for h in members)
            empty = sum(
                _fits(math.floor(h.cpus * h.cpu_ratio), math.floor(h.ram_mb * h.ram_ratio), flavor) for h in members
            )
            out.append(Fit(flavor, zone, now, empty, len(members)))
    return out


async def capacity(session: AsyncSession, flavors: list[Flavor]) -> dict[uuid.UUID, int]:
    """How many more VMs of each flavor the up hosts can take now (the lease-it view)."""
    out = {flavor.id: 0 for flavor in flavors}
    for fit in await fits(session, flavors):
        out[fit.flavor.id] += fit.now
    return out
