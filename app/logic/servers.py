"""Servers: create (with count and hold), read, list, edit.

The lifecycle actions on an existing server live in ``actions.py``; the
result of a job is applied in ``results.py``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from app.ids import ec2_id, utcnow, uuid7
from app.logic import addresses, catalogue, events, keypairs, leases, placement, quotas, rows
from app.logic.actor import Actor
from app.logic.addresses import Address
from app.logic.errors import BadRequest, Forbidden, InUse, InvalidState, NephosError, NotFound, OverLimit
from app.logic.jobs import Outbox, new_job
from app.logic.operstate import Action, Deltas, Operstate, Task, footprint
from app.logic.pagination import Page, paginate
from app.models import Flavor, Host, Image, Job, Project, PublicIp, Server, table_of

_servers, _public = table_of(Server), table_of(PublicIp)
_flavors, _hosts = table_of(Flavor), table_of(Host)
MAX_COUNT = 100


@dataclass(frozen=True)
class CreateSpec:
    name: str
    flavor_id: uuid.UUID | None = None
    flavor: str | None = None
    image_id: uuid.UUID | None = None
    image: str | None = None
    count: int = 1
    key_name: str | None = None
    user_data: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    zone: str | None = None
    hold: bool = False
    description: str = ""
    client_token: str | None = None  # the EC2 facade's ClientToken
    reservation_id: str | None = None  # the EC2 reservation the VMs make up; default: a new one
    networks: list[str] | None = None  # names or ids; default: the project's default network
    fixed_ip: str | None = None  # the first NIC's address, asked for (one VM only)
    # A public address for each VM: True, a new one each (a unit of the public_ip quota); or the
    # id of one the project holds, unassociated (one VM only).
    public_ip: bool | uuid.UUID | None = None


@dataclass(frozen=True)
class Created:
    server: Server
    job: Job | None  # None for a server created on hold
    # What its representation shows, known when it is made (no reads to answer the request).
    flavor: str = ""
    image: str = ""
    addresses: list[Address] = field(default_factory=list)


def _not_found(server_id: uuid.UUID) -> NotFound:
    return NotFound(f"server {server_id} not found", server_id=str(server_id))


async def get(session: AsyncSession, *, actor: Actor, server_id: uuid.UUID) -> Server:
    server = await session.get(Server, server_id)
    if server is None or not actor.sees(server.project_id):
        raise _not_found(server_id)
    return server


async def locked(session: AsyncSession, server_id: uuid.UUID) -> Server | None:
    """The server row, locked for this transaction and read afresh (``None`` if there is none).

    Every writer of a VM takes this lock first: it is the per-VM task lock. In a transaction
    that locked its VMs already (``rows.lock_all``), a VM it holds is read from the session.
    """
    if rows.held(session, Server, server_id):
        return await session.get(Server, server_id)
    stmt = (
        sa.select(Server)
        .where(_servers.c.id == server_id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )
    return (await session.scalars(stmt)).first()


#: ``session.info`` key: the VMs ``holding`` hands to ``lock_for_action``, by id.
_HOLDING = "nephos.holding"

Locked = tuple[Server, Flavor, str | None]


@contextlib.contextmanager
def holding(session: AsyncSession, locked: Iterable[Locked]) -> Iterator[None]:
    """While open, ``lock_for_action`` takes these VMs from here, with no statement: the caller
    locked them in this transaction, in id order, and read them afresh with what an action
    needs (the VM, its flavor, its host's state). Inside another ``holding``, the VMs of both
    are held, and the outer one's again once this one closes."""
    outer: dict[uuid.UUID, Locked] | None = session.info.get(_HOLDING)
    session.info[_HOLDING] = (outer or {}) | {server.id: (server, flavor, host) for server, flavor, host in locked}
    try:
        yield
    finally:
        if outer is None:
            session.info.pop(_HOLDING, None)
        else:
            session.info[_HOLDING] = outer


#: The select ``lock_for_action`` runs (its callers filter it): VMs with their flavor and their
#: host's state, the VMs locked (only them) and read afresh.
FOR_ACTION = (
    sa.select(Server, Flavor, _hosts.c.state)
    .join(_flavors, _flavors.c.id == _servers.c.flavor_id)
    .outerjoin(_hosts, _hosts.c.name == _servers.c.host)
    .with_for_update(of=_servers, key_share=True)
    .execution_options(populate_existing=True)
)
_LOCK_FOR_ACTION = FOR_ACTION.where(_servers.c.id == sa.bindparam("server_id"))
#: The same, and the VM's project locked after it (the lock order: VM, hosts, project), for an
#: action that wants more of its project's quota and reserves no host (a start): the project's
#: lock, which it would take next, comes in this statement instead of one of its own, and is
#: held no longer (the quota check follows it either way, then the write and the commit).
_LOCK_FOR_ACTION_AND_PROJECT = (
    FOR_ACTION.join(table_of(Project), table_of(Project).c.id == _servers.c.project_id)
    .where(_servers.c.id == sa.bindparam("server_id"))
    .with_for_update(of=[_servers, table_of(Project)], key_share=True)
)


#: An accepted action's mark on its VM, as ``mark_task`` writes it.
_MARK_TASK = (
    sa.update(_servers)
    .where(_servers.c.id == sa.bindparam("s_id", type_=_servers.c.id.type))
    .values(
        task=sa.bindparam("s_task", type_=_servers.c.task.type),
        task_job_id=sa.bindparam("s_job", type_=_servers.c.task_job_id.type),
        operstate=sa.bindparam("s_state", type_=_servers.c.operstate.type),
        updated_at=sa.bindparam("s_at", type_=_servers.c.updated_at.type),
    )
)


def mark_task(
    session: AsyncSession, server: Server, *, task: str | None, job_id: uuid.UUID, operstate: str, at: datetime
) -> tuple[sa.Update, dict[str, Any]] | None:
    """An accepted action's mark on its VM (its task and job, its state, the time).

    One VM: as a statement and its parameters, for the caller to send with the job's rows
    (``rows.insert_new``'s ``along``); ``server`` holds the values already, as written (the
    flush has nothing left to write for them). Bind names are no column's: a parameter named
    like a column would be set by the UPDATE too. Several VMs in this transaction (``holding``
    more than one): None, and the flush writes them, each table in one statement for all."""
    values = {"task": task, "task_job_id": job_id, "operstate": operstate, "updated_at": at}
    if len(session.info.get(_HOLDING, ())) > 1:
        for key, value in values.items():
            setattr(server, key, value)
        return None
    for key, value in values.items():
        set_committed_value(server, key, value)
    return _MARK_TASK, {"s_id": server.id, "s_task": task, "s_job": job_id, "s_state": operstate, "s_at": at}


async def lock_for_action(
    session: AsyncSession, *, actor: Actor, server_id: uuid.UUID, project_too: bool = False
) -> Locked:
    """``lock``, for an action: with the VM's flavor and its host's state (``None``: no host), in
    the same one statement -- or none, inside ``holding`` (``is_held``). ``project_too``: the
    VM's project is locked in that statement too, after the VM. (The session's identity map
    holds objects weakly: a flavor the caller did not keep would be gone by its next
    ``session.get``, and read again.)"""
    held: Locked | None = session.info.get(_HOLDING, {}).get(server_id)
    if held is not None:
        if not actor.sees(held[0].project_id):
            raise _not_found(server_id)
        return held
    statement = _LOCK_FOR_ACTION_AND_PROJECT if project_too else _LOCK_FOR_ACTION
    row = (await session.execute(statement, {"server_id": server_id})).first()
    if row is None or not actor.sees(row[0].project_id):
        raise _not_found(server_id)
    return row[0], row[1], row[2]


def is_held(session: AsyncSession, server_id: uuid.UUID) -> bool:
    """Is the VM held (``holding``): locked already, so that ``lock_for_action`` locks nothing?"""
    return server_id in session.info.get(_HOLDING, {})


async def lock(session: AsyncSession, *, actor: Actor, server_id: uuid.UUID) -> Server:
    """The server row, locked, if ``actor`` may see it (else ``NotFound``)."""
    server = await locked(session, server_id)
    if server is None or not actor.sees(server.project_id):
        raise _not_found(server_id)
    return server


def create_params(
    server: Server,
    flavor: Flavor,
    image: Image,
    ssh_key: str | None,
    nics: list[dict[str, Any]],
    firewall: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """What an agent needs to build the VM, carried in the job itself."""
    return {
        "name": server.name,
        "vcpus": flavor.vcpus,
        "ram_mb": flavor.ram_mb,
        "disk_gb": flavor.disk_gb,
        "image": {
            "id": str(image.id),
            "name": image.name,
            "disk_format": image.disk_format,
            "source_url": image.source_url,
        },
        "ssh_key": ssh_key,
        "user_data": server.user_data,
        "metadata": server.meta,
        "vnc_port": server.vnc_port,
        "ec2_id": server.ec2_id,
        "nics": nics,
        # Inbound denied but for these (``logic.firewall``); a new VM has opened nothing yet.
        "firewall": firewall or [],
        "firewall_gen": server.firewall_gen,
    }


async def create(
    session: AsyncSession, outbox: Outbox, *, actor: Actor, spec: CreateSpec, lease: leases.Policy | None = None
) -> list[Created]:
    """Accept the creation of ``spec.count`` VMs: all of them, or none. ``lease``: the project's
    lease policy, when the caller has read it (a launch reads it with its image and flavor);
    else it is read with this create's flavor and image, in one statement."""
    if actor.project_id is None or actor.user_id is None:
        raise BadRequest("servers are created by a user")
    if not 1 <= spec.count <= MAX_COUNT:
        raise BadRequest(f"count must be between 1 and {MAX_COUNT}", field="count")
    if lease is not None:  # by key, as the caller read them: no statement
        flavor = await catalogue.resolve_flavor(session, flavor_id=spec.flavor_id, name=spec.flavor)
        image = await catalogue.resolve_image(session, actor=actor, image_id=spec.image_id, name=spec.image)
    else:
        first = await catalogue.first_reads(
            session, actor=actor, flavor_id=spec.flavor_id, flavor=spec.flavor, image_id=spec.image_id, image=spec.image
        )
        flavor = catalogue.flavor_found(first.flavor, flavor_id=spec.flavor_id, name=spec.flavor)
        image = catalogue.image_found(first.images, image_id=spec.image_id, name=spec.image)
        lease = leases.policy_of(first.lease)
    ssh_key = None
    if spec.key_name:
        keypair = await keypairs.find(session, project_id=actor.project_id, name=spec.key_name)
        if keypair is None:
            raise BadRequest(f"key pair {spec.key_name} does not exist", field="key_name")
        ssh_key = keypair.public_key
    if spec.zone is not None:
        await catalogue.check_zone(session, spec.zone)

    if spec.count > 1 and spec.fixed_ip:
        raise BadRequest("a fixed address goes to one VM: count must be 1", field="fixed_ip")
    try:
        return await _accept(
            session, outbox, actor=actor, spec=spec, flavor=flavor, image=image, ssh_key=ssh_key, lease=lease
        )
    except OverLimit:
        raise
    except NephosError:
        # Over quota is the caller's answer before any other refusal (413 OverLimit, not 503
        # NoCapacity or 409 NetworkFull when both hold). Asked only on this path: a create that
        # is accepted meets the binding check, under the project's lock, at its end.
        await quotas.check(session, actor.project_id, _footprint(spec, flavor) * spec.count)
        raise


def _footprint(spec: CreateSpec, flavor: Flavor) -> Deltas:
    """What one VM of ``spec`` holds of its project's quota."""
    per_vm = footprint(Operstate.HOLD if spec.hold else Operstate.BUILD, flavor.vcpus, flavor.ram_mb, flavor.disk_gb)
    return per_vm + Deltas(public_ip=1) if spec.public_ip is True else per_vm


async def _accept(
    session: AsyncSession,
    outbox: Outbox,
    *,
    actor: Actor,
    spec: CreateSpec,
    flavor: Flavor,
    image: Image,
    ssh_key: str | None,
    lease: leases.Policy,
) -> list[Created]:
    """``create`` once the request is known to be well formed. The locks are taken in the lock
    order (networks' addresses, public addresses, hosts, the project, quota rows), each as late
    and as short as it can be; the VMs' rows are written once their hosts are known, so each
    goes in whole, and the project is locked last, for the quota check and the usage move."""
    assert actor.project_id is not None and actor.user_id is not None
    state = Operstate.HOLD if spec.hold else Operstate.BUILD
    per_vm = _footprint(spec, flavor)
    reservation = spec.reservation_id or ec2_id("r")  # the VMs of one request are one EC2 reservation
    allocator = await addresses.Allocator.for_create(session, actor.project_id, spec.networks)
    nets = allocator.networks
    await allocator.take(session, spec.count, spec.fixed_ip)
    public = await _public_addresses(session, actor.project_id, spec)
    # Each VM's host before its row: the row is then written whole (host, console port, task
    # and its job's id) in one INSERT, not an INSERT and then an UPDATE. The host is held from
    # here to the commit.
    places = (
        []
        if spec.hold
        else [
            await placement.reserve(
                session, vcpus=flavor.vcpus, ram_mb=flavor.ram_mb, zone=spec.zone, several=spec.count > 1
            )
            for _ in range(spec.count)
        ]
    )
    now = utcnow()
    made = [
        Server(
            name=spec.name if spec.count == 1 else f"{spec.name}-{i + 1}",
            description=spec.description,
            project_id=actor.project_id,
            user_id=actor.user_id,
            flavor_id=flavor.id,
            image_id=image.id,
            zone=places[i].zone if places else spec.zone,
            host=places[i].host if places else None,
            vnc_port=places[i].vnc_port if places else None,
            task=Task.BUILD if places else None,
            task_job_id=uuid7() if places else None,
            operstate=state.value,
            meta=dict(spec.metadata),
            key_name=spec.key_name,
            user_data=spec.user_data,
            created_at=now,
            updated_at=now,
            reservation_id=reservation,
            client_token=spec.client_token,
        )
        for i in range(spec.count)
    ]
    leases.give(made, lease)
    session.add_all(made)
    leases.arm_given(session, made, lease)
    created = []
    for i, server in enumerate(made):
        ports = allocator.ports(server)
        session.add_all(ports)
        nics = [addresses.nic_params(net, port) for net, port in zip(nets, ports, strict=True)]
        mapped = None  # the VM's public address, mapped to its first NIC
        if public:
            ip = public[i]
            ip.server_id, ip.association_id = server.id, ec2_id("eipassoc")
            session.add(ip)
            mapped = ip.address
        # Accepted at once; the usage moves last, after the binding check (no limit check here).
        commission = await quotas.issue(
            session,
            project_id=actor.project_id,
            server_id=server.id,
            deltas=per_vm,
            accept=True,
            move=False,
            job_id=server.task_job_id,
        )
        job = None
        if server.task_job_id is not None:
            assert server.host is not None
            job = new_job(
                session,
                outbox,
                server,
                action=Action.CREATE.value,
                params=create_params(server, flavor, image, ssh_key, nics)
                | {"public_ips": [{"public": mapped, "private": ports[0].ip}] if mapped else []},
                actor=actor,
                commission_id=commission.id,
                host=server.host,
                job_id=server.task_job_id,
            )
        events.record(
            session,
            server,
            "action",
            action=Action.CREATE.value,
            after=state.value,
            job_id=job.id if job else None,
            user_id=actor.user_id,
            message="created on hold" if spec.hold else f"placed on {server.host}",
        )
        shown = [
            Address(
                net.name,
                net.id,
                port.ip,
                port.mac,
                net.ec2_id,
                port.ec2_id,
                mapped if j == 0 else None,
            )
            for j, (net, port) in enumerate(zip(nets, ports, strict=True))
        ]
        created.append(Created(server, job, flavor.name, image.name, shown))

    # Every row made above (VMs, NICs, public addresses, commissions, jobs, lease actions) in
    # one statement, which also takes the project's lock. Then the quota check and the usage
    # move, in one statement with the commit's writes (the VMs' events), last, under that lock,
    # right before the commit: the lock serializes every request that wants more of this
    # project, so it is held only for this.
    await rows.insert_new(session, along=quotas.project_lock(actor.project_id))
    await quotas.check_and_move(session, actor.project_id, per_vm * spec.count, last=True)
    await session.flush()
    return created


async def _public_addresses(session: AsyncSession, project_id: uuid.UUID, spec: CreateSpec) -> list[PublicIp]:
    """The public address of each VM of a create (none unless ``spec.public_ip``): new ones from
    the pools, or the one the project holds that is named (locked, and unassociated)."""
    if spec.public_ip is None or spec.public_ip is False:
        return []
    if spec.public_ip is True:
        free = await addresses.free_public(session, pool=None, count=spec.count)
        return [PublicIp(pool_id=pool.id, address=address, project_id=project_id) for pool, address in free]
    if spec.count != 1:
        raise BadRequest("a public IP held by the project goes to one VM: count must be 1", field="public_ip")
    stmt = sa.select(PublicIp).where(_public.c.id == spec.public_ip, _public.c.project_id == project_id)
    held = (await session.scalars(stmt.with_for_update())).first()
    if held is None:
        raise BadRequest(f"public IP {spec.public_ip} is not this project's", field="public_ip")
    if held.server_id is not None:
        raise InUse(f"{held.address} is associated with another server", server_id=str(held.server_id))
    return [held]


async def how_many(session: AsyncSession, *, actor: Actor, flavor: Flavor, low: int, high: int) -> int:
    """How many VMs of ``flavor`` between ``low`` and ``high`` fit now, by the project's quota and
    the hosts' room (EC2's MinCount/MaxCount: as many as fit). Never below ``low``: when even that
    does not fit, creating ``low`` gives the refusal that says why."""
    if actor.project_id is None or low >= high:
        return low
    per_vm = footprint(Operstate.BUILD, flavor.vcpus, flavor.ram_mb, flavor.disk_gb).as_dict()
    report = await quotas.report(session, actor.project_id)
    fit = high
    for resource, need in per_vm.items():
        if need > 0:
            q = report[resource]
            fit = min(fit, max(0, q["limit"] - q["usage"] - q["pending"]) // need)
    room = await placement.capacity(session, [flavor])
    fit = min(fit, room.get(flavor.id, 0))
    return max(low, min(high, fit))


@dataclass(frozen=True)
class ListFilter:
    operstate: str | None = None
    name: str | None = None
    zone: str | None = None
    host: str | None = None
    user_id: uuid.UUID | None = None
    changes_since: datetime | None = None
    all_projects: bool = False


async def list_servers(
    session: AsyncSession, *, actor: Actor, filters: ListFilter, limit: int, cursor: str | None
) -> Page[Server]:
    stmt = sa.select(Server)
    if filters.all_projects and not actor.is_admin:
        raise Forbidden("all_projects needs the admin role")
    if not (actor.is_admin and filters.all_projects):
        stmt = stmt.where(_servers.c.project_id == actor.project_id)
    if filters.operstate is not None:
        if filters.operstate not in Operstate.__members__:
            raise BadRequest(
                f"unknown operstate {filters.operstate}: one of {', '.join(Operstate)}",
                field="operstate",
                allowed=list(Operstate),
            )
        stmt = stmt.where(_servers.c.operstate == filters.operstate)
    elif filters.changes_since is None:
        # Destroyed servers are listed only when asked for (or as changes).
        stmt = stmt.where(_servers.c.operstate != Operstate.DESTROYED.value)
    if filters.host is not None:
        if not actor.is_admin:
            raise Forbidden("filtering by host needs the admin role")
        stmt = stmt.where(_servers.c.host == filters.host)
    if filters.name is not None:
        stmt = stmt.where(_servers.c.name == filters.name)
    if filters.zone is not None:
        stmt = stmt.where(_servers.c.zone == filters.zone)
    if filters.user_id is not None:
        stmt = stmt.where(_servers.c.user_id == filters.user_id)
    if filters.changes_since is not None:
        stmt = stmt.where(_servers.c.updated_at >= filters.changes_since)
    return await paginate(session, stmt, _servers.c.id, limit=limit, cursor=cursor)


async def update(
    session: AsyncSession,
    *,
    actor: Actor,
    server_id: uuid.UUID,
    name: str | None,
    description: str | None,
    metadata: dict[str, str] | None,
) -> Server:
    """Edit what a user may edit without a job: name, description, metadata."""
    server = await lock(session, actor=actor, server_id=server_id)
    if server.operstate == Operstate.DESTROYED.value:
        raise InvalidState(
            "a destroyed server cannot be edited",
            operstate=server.operstate,
            allowed_from=[s.value for s in Operstate if s is not Operstate.DESTROYED],
        )
    if name is not None:
        server.name = name
    if description is not None:
        server.description = description
    if metadata is not None:
        server.meta = dict(metadata)
    server.updated_at = utcnow()
    events.record(
        session,
        server,
        "edited",
        user_id=actor.user_id,
        message=", ".join(
            k for k, v in (("name", name), ("description", description), ("metadata", metadata)) if v is not None
        ),
    )
    return server


async def set_attributes(
    session: AsyncSession,
    *,
    actor: Actor,
    server_id: uuid.UUID,
    disable_api_termination: bool | None = None,
    disable_api_stop: bool | None = None,
    user_data: str | None = None,
) -> Server:
    """Change what needs no job (under the VM's lock): the protections, and user data (read by
    the VM's next build). Protections are honoured by ``actions.destroy`` and ``actions.stop``."""
    server = await lock(session, actor=actor, server_id=server_id)
    if disable_api_termination is not None:
        server.disable_api_termination = disable_api_termination
    if disable_api_stop is not None:
        server.disable_api_stop = disable_api_stop
    if user_data is not None:
        server.user_data = user_data
    server.updated_at = utcnow()
    return server
