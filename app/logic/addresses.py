"""Addresses (IPAM): a VM's ports on its networks, and its public addresses.

* A **port** is a VM's NIC on a network: a fixed address and a MAC, allocated in the
  transaction that accepts the create. Uniqueness is the database's: ``(network_id, ip)`` and
  ``mac`` are unique constraints, and each address is claimed before it is given (``Allocator``:
  creates on one network skip each other's addresses instead of queueing on the network), so no
  address is ever given twice, whatever runs concurrently. A VM's ports are released when it is
  DESTROYED (``release``; a batch of results, at its end: ``give_back``); reconciliation reports a
  port still held by a destroyed VM as drift.
* A **public address** comes from the admin's pools (``free_public``), is the project's until it
  releases it, and is mapped to one VM's first NIC at a time.

Lock order (every writer): server, networks (by id), a public address, public IP pools (by id),
hosts, project, quota rows. The networks themselves are ``networks.py``'s.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import networks, rows
from app.logic.errors import AddressInUse, BadRequest, NetworkFull
from app.logic.networks import bridge_of
from app.logic.operstate import Operstate
from app.models import Network, Port, PublicIp, PublicIpPool, Server, table_of

_networks, _ports, _servers = table_of(Network), table_of(Port), table_of(Server)
_public, _pools = table_of(PublicIp), table_of(PublicIpPool)


@dataclass(frozen=True)
class Address:
    """A VM's address as representations show it."""

    network: str
    network_id: uuid.UUID
    ip: str
    mac: str
    subnet: str  # the network's EC2 id
    port: str  # the NIC's EC2 id
    public_ip: str | None = None


#: The addresses in use on the network of the row (an array; NULL when there are none).
_USED_ON = sa.select(sa.func.array_agg(_ports.c.ip)).where(_ports.c.network_id == _networks.c.id).scalar_subquery()

#: PostgreSQL: networks share-locked in id order (not deleted under a create; creates do not
#: wait on each other), each with the addresses in use on it. The list is read from the
#: statement's snapshot: a claim looks afresh at what it claims (``_CLAIM``), so an address
#: committed meanwhile is never taken twice.
_LOCK_WITH_USED = (
    sa.select(_networks.c.id, _USED_ON)
    .where(rows.among(_networks.c.id, "ids", postgres=True))
    .order_by(_networks.c.id)
    .with_for_update(read=True, key_share=True)
)

#: PostgreSQL, a create on its project's default network (what a create gets when it names
#: none): ``networks.resolve`` and ``_LOCK_WITH_USED`` in one statement -- the network,
#: share-locked, with the addresses in use on it, read from the statement's snapshot as there.
_DEFAULT_WITH_USED = (
    sa.select(Network, _USED_ON)
    .where(_networks.c.project_id == sa.bindparam("project"), _networks.c.name == networks.DEFAULT_NAME)
    .with_for_update(read=True, key_share=True)
    .execution_options(populate_existing=True)
)


#: PostgreSQL: claim up to ``count`` of the candidate addresses ``ips`` (their lock keys
#: ``keys``) on network ``net``, trying each one's advisory lock without waiting. A candidate
#: already in use as this statement's snapshot sees it is passed over: the candidates were read
#: from an earlier statement's snapshot, and the address another create was taking then (the
#: lowest free, so the first candidate) has often been committed by the time of the claim. A
#: candidate whose lock is taken is then asked again, afresh (``nephos_address_free``, migration
#: 0016: a VOLATILE function reads with a new snapshot): the create that held its lock may have
#: committed it after this statement's snapshot was taken, and a lock is let go only once its
#: transaction's rows are visible. (CASE: the fresh look comes after the lock, never before.)
#: No ORDER BY: the LIMIT stops the scan (and the locking) at the count-th claim; ``n`` is a
#: claimed one's place in the list.
_TRIED = (
    sa.func.unnest(sa.cast(sa.bindparam("ips"), sa.ARRAY(sa.Text)), sa.cast(sa.bindparam("keys"), sa.ARRAY(sa.Integer)))
    .table_valued("ip", "key", with_ordinality="n")
    .render_derived()
)
_NET = sa.bindparam("net", type_=sa.Uuid)
_CLAIM = (
    sa.select(_TRIED.c.ip, _TRIED.c.n)
    .where(
        ~sa.exists().where(_ports.c.network_id == _NET, _ports.c.ip == _TRIED.c.ip),
        sa.case(
            (
                sa.func.pg_try_advisory_xact_lock(sa.bindparam("net_key", type_=sa.Integer), _TRIED.c.key),
                sa.func.nephos_address_free(_NET, _TRIED.c.ip, type_=sa.Boolean),
            ),
            else_=sa.false(),
        ),
    )
    .limit(sa.bindparam("count", type_=sa.Integer))
)


class Allocator:
    """Addresses of some networks for the VMs of one create, taken up front by ``take``; then
    each VM's ports get the next ones (``ports``).

    Creates do not queue on a network. On PostgreSQL each address is claimed with a transaction
    advisory lock, tried without waiting: a create skips an address another create is taking
    and takes the next free one; once it holds an address's lock it reads afresh that the
    address is still free (another create may have committed it since the read), in the same
    statement (``_CLAIM``). The network row
    is only share-locked, so a network is not deleted under a create. The unique constraint on
    ``(network_id, ip)`` stays the last word. SQLite runs one writer at a time: there the
    lowest free addresses are simply taken.
    """

    #: Addresses tried beyond those needed, per claim, when others are being taken: as many as
    #: the creates a busy network may have in flight at once, each holding the next lowest (a
    #: lock tried and refused costs next to nothing; a claim that finds every candidate held
    #: costs a statement). With 8, 50 concurrent creates on one network made 1.36 claims each.
    SLACK = 64

    def __init__(self, nets: list[Network], used: dict[uuid.UUID, set[str]] | None = None) -> None:
        self.networks = nets
        #: the addresses in use per network, once they are share-locked (``take``'s first step,
        #: or ``for_create``'s statement)
        self._used: dict[uuid.UUID, set[str]] = used or {}
        self._next: dict[uuid.UUID, int] = {}  # per network: where the search for a free address resumes
        self._taken: dict[uuid.UUID, list[str]] = {}

    @classmethod
    async def for_create(cls, session: AsyncSession, project_id: uuid.UUID, names: list[str] | None) -> Allocator:
        """The allocator of the networks a create names (``networks.resolve``). The project's
        default network, a create's when it names none, is read on PostgreSQL share-locked with
        its addresses in use, in one statement instead of two."""
        if not names and rows.postgres(session):
            found = (await session.execute(_DEFAULT_WITH_USED, {"project": project_id})).first()
            if found is not None:  # (else made on first use, by resolve)
                net, used = found
                return cls([net], {net.id: set(used or ())})
        return cls(await networks.resolve(session, project_id, names))

    async def take(self, session: AsyncSession, count: int, fixed_ip: str | None = None) -> None:
        """Claim the addresses of ``count`` VMs on every network (``fixed_ip``: the first
        network's address of the one VM, asked for)."""
        postgres = rows.postgres(session)
        ids = sorted(n.id for n in self.networks)
        if self._used:  # read with the networks (``for_create``)
            pass
        elif postgres:  # the networks share-locked and their used addresses read, in one statement
            found = await session.execute(_LOCK_WITH_USED, {"ids": ids})
            self._used = {net_id: set() for net_id in ids} | {net_id: set(used or ()) for net_id, used in found}
        else:  # one writer at a time: nothing to lock
            for net_id in ids:
                self._used[net_id] = set(
                    await session.scalars(sa.select(_ports.c.ip).where(_ports.c.network_id == net_id))
                )
        for i, net in enumerate(self.networks):
            taken: list[str] = []
            if i == 0 and fixed_ip:
                taken.append(await self._fixed(session, net, fixed_ip, postgres))
            while len(taken) < count:
                taken += await self._claim(session, net, count - len(taken), postgres)
            self._taken[net.id] = taken

    async def _fixed(self, session: AsyncSession, net: Network, ip: str, postgres: bool) -> str:
        """``ip`` on ``net`` for one VM: in its range, not its gateway, and free."""
        try:
            address = ipaddress.IPv4Address(ip)
        except ValueError:
            raise BadRequest(f"{ip!r} is not an IPv4 address", field="fixed_ip") from None
        cidr = ipaddress.IPv4Network(net.cidr)
        if not cidr.network_address < address < cidr.broadcast_address or ip == net.gateway:
            raise BadRequest(
                f"{ip} is not an address a VM may have on network {net.name} ({net.cidr}, gateway {net.gateway})",
                field="fixed_ip",
            )
        if postgres and ip not in self._used[net.id]:
            # Waits for a create taking it to end, then reads afresh whether it kept it.
            await session.execute(sa.select(sa.func.pg_advisory_xact_lock(*_claim_key(net, int(address)))))
            self._used[net.id] |= await _committed(session, net, {ip})
        if ip in self._used[net.id]:
            raise AddressInUse(f"{ip} is in use on network {net.name}", network=net.name, ip=ip)
        self._used[net.id].add(ip)
        return ip

    def _free(self, net: Network, count: int) -> list[tuple[str, int]]:
        """Up to ``count`` of the lowest free addresses (and their values), marked used. The
        search resumes where the last one ended: a create of 100 VMs scans the network once."""
        used, gateway = self._used[net.id], net.gateway
        cidr = ipaddress.IPv4Network(net.cidr)
        first = self._next.get(net.id, int(cidr.network_address) + 1)
        found: list[tuple[str, int]] = []
        for value in range(first, int(cidr.broadcast_address)):
            if len(found) == count:
                break
            ip = socket.inet_ntoa(value.to_bytes(4, "big"))  # str(IPv4Address(value)), 10x faster
            if ip != gateway and ip not in used:
                used.add(ip)
                found.append((ip, value))
            self._next[net.id] = value + 1
        if not found:
            raise NetworkFull(
                f"network {net.name} ({net.cidr}) has no free address left",
                network=net.name,
                cidr=net.cidr,
            )
        return found

    async def _claim(self, session: AsyncSession, net: Network, count: int, postgres: bool) -> list[str]:
        """At most ``count`` free addresses of ``net``, claimed: fewer (even none) when others
        were being taken, or were committed meanwhile; ``take`` asks again, and the search moves
        on until the network has none left (``NetworkFull``)."""
        if not postgres:
            return [ip for ip, _ in self._free(net, count)]
        candidates = self._free(net, count + self.SLACK)
        key, _ = _claim_key(net, 0)
        claimed = (
            await session.execute(
                _CLAIM,
                {
                    "ips": [ip for ip, _ in candidates],
                    "keys": [_claim_key(net, v)[1] for _, v in candidates],
                    "net": net.id,
                    "net_key": key,
                    "count": count,
                },
            )
        ).all()
        got = {ip for ip, _ in claimed}
        # Once ``count`` are claimed the scan stopped: the candidates after the last claim were not
        # tried and go back. Every other candidate not claimed is in use or being taken by another
        # create.
        last = max(n for _, n in claimed) if len(claimed) == count else len(candidates)
        for ip, value in candidates[last:]:
            self._used[net.id].discard(ip)
            self._next[net.id] = min(self._next[net.id], value)
        return [ip for ip, _ in candidates if ip in got]  # lowest first, as the candidates

    def ports(self, server: Server) -> list[Port]:
        """The server's NICs, one per network in order (added by the caller), on addresses
        ``take`` claimed."""
        return [
            Port(
                server_id=server.id,
                network_id=net.id,
                ip=self._taken[net.id].pop(0),
                mac=new_mac(),
                position=i,
            )
            for i, net in enumerate(self.networks)
        ]


_COMMITTED = sa.select(_ports.c.ip).where(
    _ports.c.network_id == sa.bindparam("net"), rows.among(_ports.c.ip, "ips", postgres=True)
)


async def _committed(session: AsyncSession, net: Network, ips: set[str]) -> set[str]:
    """Which of ``ips`` are ``net``'s addresses in use, read afresh (a fixed address, once its
    lock was waited for)."""
    return set(await session.scalars(_COMMITTED, {"net": net.id, "ips": sorted(ips)}))


def _claim_key(net: Network, value: int) -> tuple[int, int]:
    """The advisory lock keys of address ``value`` on ``net``: 32 bits of the network's id (its
    random end: a uuid7 begins with its time) and the address, as signed 32-bit integers. No two
    networks overlap, so no address of one shares its keys with an address of another even when
    their first keys are equal."""
    return int.from_bytes(net.id.bytes[-4:], "big", signed=True), value - 2**31


def new_mac() -> str:
    """A locally administered unicast MAC with 40 random bits (``52:`` first, as QEMU's are)."""
    return "52:" + ":".join(f"{b:02x}" for b in os.urandom(5))


#: ``release``'s statements, built once: public addresses mapped to the VMs stay allocated to
#: their project, unmapped (as on EC2); then the VMs' ports go.
_UNMAP = rows.ByDialect(
    lambda postgres: (
        _public.update()
        .where(rows.among(_public.c.server_id, "ids", postgres=postgres))
        .values(server_id=None, association_id=None)
    )
)
_UNPLUG = rows.ByDialect(
    lambda postgres: _ports.delete().where(rows.among(_ports.c.server_id, "ids", postgres=postgres))
)


#: ``session.info`` key: the VMs whose addresses a batch of results gives back at its end.
_DEFERRED = "nephos.deferred_releases"


def defer_releases(session: AsyncSession) -> None:
    """From now on, ``give_back`` collects the VMs and ``give_back_deferred`` releases their
    addresses together: a batch of results runs ``release``'s two statements once."""
    session.info[_DEFERRED] = set()


async def give_back(session: AsyncSession, server_ids: Iterable[uuid.UUID]) -> None:
    """``release``, now or, in a batch (``defer_releases``), at its end."""
    deferred: set[uuid.UUID] | None = session.info.get(_DEFERRED)
    if deferred is not None:
        deferred.update(server_ids)
        return
    await release(session, server_ids)


async def give_back_deferred(session: AsyncSession, *, along: tuple[sa.Update, dict[str, Any]] | None = None) -> None:
    """Release what ``give_back`` collected since ``defer_releases``. ``along``: a statement
    (built once) and its parameters, sent with the release (PostgreSQL) or alone if there is
    nothing to release (a destroyed VM's host move: ``placement.take_deferred_move``)."""
    deferred: set[uuid.UUID] = session.info.pop(_DEFERRED, None) or set()
    if deferred:
        await release(session, sorted(deferred), along=along)
    elif along is not None:
        await session.execute(*along)


async def release(
    session: AsyncSession, server_ids: Iterable[uuid.UUID], *, along: tuple[sa.Update, dict[str, Any]] | None = None
) -> int:
    """The addresses of destroyed VMs go back to their networks: on PostgreSQL in one statement
    (the public addresses' unmapping rides with the ports' deletion), with ``along`` in it if
    given (PostgreSQL only). PostgreSQL fixes no order among the parts of one statement, so
    ``along`` must be safe to run in any order with these: a host's move is, as the VMs' NICs and
    addresses are locked by nobody who does not hold the VMs. The number of ports released."""
    ids = list(server_ids)
    if not ids:
        return 0
    if rows.postgres(session):
        stmt, params = _release_statement(along[0] if along is not None else None), {"ids": ids}
        if along is not None:
            params |= along[1]
        result = await session.execute(stmt, params)
    else:
        assert along is None, "SQLite sends no writes along"
        await session.execute(_UNMAP.of(session), {"ids": ids})
        result = await session.execute(_UNPLUG.of(session), {"ids": ids})
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


@functools.cache
def _release_statement(along: sa.Update | None) -> sa.Delete:
    """``release``'s statement on PostgreSQL (with ``along``'s, as a CTE), built once: the ports
    deleted, the public addresses unmapped in a CTE. PostgreSQL runs unreferenced CTEs to
    completion in an order it does not specify; each touches rows of its own, so none waits on
    another's."""
    stmt = _UNPLUG.of_dialect(postgres=True).add_cte(_UNMAP.of_dialect(postgres=True).cte("unmapped"))
    return stmt if along is None else stmt.add_cte(along.cte("along"))


def _addresses(postgres: bool) -> sa.Select[Any]:
    """Servers' NICs, each with its network's name and subnet; a VM's public address (the
    lowest, should it hold several) comes with its NICs' rows."""
    return (
        sa.select(
            _ports,
            _networks.c.name,
            _networks.c.ec2_id.label("subnet"),
            sa.select(sa.func.min(_public.c.address))
            .where(_public.c.server_id == _ports.c.server_id)
            .scalar_subquery()
            .label("public_ip"),
        )
        .join(_networks, _networks.c.id == _ports.c.network_id)
        .where(rows.among(_ports.c.server_id, "ids", postgres=postgres))
        .order_by(_ports.c.server_id, _ports.c.position)
    )


_ADDRESSES = rows.ByDialect(_addresses)


async def addresses_of(session: AsyncSession, server_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, list[Address]]:
    """Each server's addresses, NIC order (one query, whatever the number of servers)."""
    ids = list(server_ids)
    out: dict[uuid.UUID, list[Address]] = {sid: [] for sid in ids}
    if not ids:
        return out
    found = await session.execute(_ADDRESSES.of(session), {"ids": ids})
    for row in found:  # a row's attributes, not its mapping: this runs for every VM of a page
        nics = out[row.server_id]
        first = not nics  # a VM's public address maps to its first NIC
        nics.append(
            Address(row.name, row.network_id, row.ip, row.mac, row.subnet, row.ec2_id, row.public_ip if first else None)
        )
    return out


def _usable(net: ipaddress.IPv4Network) -> list[ipaddress.IPv4Address]:
    return list(net) if net.prefixlen >= 31 else list(net.hosts())


async def free_public(session: AsyncSession, *, pool: str | None, count: int) -> list[tuple[PublicIpPool, str]]:
    """``count`` free public addresses, lowest first, from the named pool (or from any), under
    the pools' row locks (by id): ``NetworkFull`` if fewer are free, ``BadRequest`` if there is
    no such pool. The caller makes the rows in the same transaction."""
    stmt = sa.select(PublicIpPool).order_by(_pools.c.id).with_for_update()
    if pool is not None:
        stmt = stmt.where(_pools.c.name == pool)
    pools = list(await session.scalars(stmt))
    if not pools:
        raise BadRequest(f"no public IP pool {pool}" if pool else "no public IP pool is defined", field="pool")
    taken = set(await session.scalars(sa.select(_public.c.address).where(_public.c.pool_id.in_([p.id for p in pools]))))
    out: list[tuple[PublicIpPool, str]] = []
    for candidate in pools:
        for address in _usable(ipaddress.IPv4Network(candidate.cidr)):
            if len(out) == count:
                return out
            if str(address) not in taken:
                out.append((candidate, str(address)))
    if len(out) == count:
        return out
    raise NetworkFull(
        ("no public IP is free" if count == 1 else f"fewer than {count} public IPs are free")
        + (f" in pool {pool}" if pool else ""),
        pool=pool,
        wanted=count,
    )


def nic_params(network: Network, port: Port) -> dict[str, object]:
    """What an agent needs for a NIC (carried in the create job)."""
    return {
        "network_id": str(network.id),
        "network": network.name,
        "bridge": bridge_of(network),
        "cidr": network.cidr,
        "gateway": network.gateway,
        "ip": port.ip,
        "mac": port.mac,
    }


async def nics_of(session: AsyncSession, server_id: uuid.UUID) -> list[dict[str, object]]:
    """A server's NICs as a job carries them (a held VM released to a host)."""
    rows = await session.execute(
        sa.select(Network, Port)
        .join(_ports, _ports.c.network_id == _networks.c.id)
        .where(_ports.c.server_id == server_id)
        .order_by(_ports.c.position)
    )
    return [nic_params(net, port) for net, port in rows.all()]


async def public_mappings(session: AsyncSession, server_id: uuid.UUID) -> list[dict[str, object]]:
    """A VM's public-to-private mappings (``public_ips``), as a job carries them to its host:
    each public address associated with it maps to its first NIC's address."""
    first = (
        sa.select(_ports.c.ip).where(_ports.c.server_id == server_id).order_by(_ports.c.position).limit(1)
    ).scalar_subquery()
    rows = await session.execute(
        sa.select(_public.c.address, first).where(_public.c.server_id == server_id).order_by(_public.c.address)
    )
    return [{"public": public, "private": private} for public, private in rows.all() if private]


async def held_by_destroyed(session: AsyncSession) -> list[tuple[uuid.UUID, str, str]]:
    """Reconciliation: (server, network, ip) of addresses still held by DESTROYED servers."""
    rows = await session.execute(
        sa.select(_ports.c.server_id, _networks.c.name, _ports.c.ip)
        .join(_servers, _servers.c.id == _ports.c.server_id)
        .join(_networks, _networks.c.id == _ports.c.network_id)
        .where(_servers.c.operstate == Operstate.DESTROYED.value)
    )
    return [(r[0], r[1], r[2]) for r in rows.all()]
