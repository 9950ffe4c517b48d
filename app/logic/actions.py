"""Lifecycle actions on an existing server.

Every accepted action writes, in one transaction: the VM's task, a Job row
(the outbox), its commission, and a server event. The sequence is always the
same (``_begin``): lock the server row, check operstate and task against
``operstate.TABLE``, make the host reservation the action needs, compute the
commission from the state *before* the change -- locking the project (a start:
in the statement that locks its VM) and checking the quota when it asks for
more -- and write the job, the commission
and the VM's task (one statement for one VM). The lock order -- server,
hosts, project, quota rows -- is the same in every transaction, so two of
them cannot deadlock.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy.ext.asyncio import AsyncSession

from app.ids import utcnow, uuid7
from app.logic import (
    addresses,
    catalogue,
    events,
    firewall_rules,
    hosts,
    jobs,
    keypairs,
    placement,
    quotas,
    results,
    rows,
    servers,
    stream,
)
from app.logic.actor import Actor
from app.logic.catalogue import ImageStatus
from app.logic.errors import BadRequest, Forbidden, HostDown, Protected
from app.logic.hoststate import HostState
from app.logic.jobs import JobStatus, Outbox, new_job
from app.logic.operstate import TABLE, Action, Operstate, decide, footprint
from app.models import Flavor, Image, Job, Server


def vnc_password() -> str:
    """A random VNC password (VNC reads at most 8 characters)."""
    return secrets.token_urlsafe(6)[:8]


@dataclass(frozen=True)
class Console:
    job: Job
    host: str
    port: int
    password: str

    @property
    def url(self) -> str:
        return f"vnc://{self.host}:{self.port}"


async def _begin(
    session: AsyncSession,
    outbox: Outbox,
    *,
    actor: Actor,
    server_id: uuid.UUID,
    action: Action,
    params: dict[str, Any] | None = None,
    new_flavor: Flavor | None = None,
    target_host: str | None = None,
) -> Job:
    # A start wants more of its project's quota and reserves no host: its project is locked
    # with its VM, in one statement, unless the VM is held already (locked with others).
    project_locked = action is Action.START and not servers.is_held(session, server_id)
    server, flavor, host_state = await servers.lock_for_action(
        session, actor=actor, server_id=server_id, project_too=project_locked
    )
    rule = TABLE[action]
    if rule.admin_only and not actor.is_admin:
        raise Forbidden(f"{action.value} needs the admin role")
    if action is Action.DESTROY and server.disable_api_termination:
        raise Protected(
            "the server's termination protection is on; turn it off first "
            "(EC2 ModifyInstanceAttribute DisableApiTermination=false)"
        )
    if action is Action.STOP and server.disable_api_stop:
        raise Protected(
            "the server's stop protection is on; turn it off first (EC2 ModifyInstanceAttribute DisableApiStop=false)"
        )
    before = Operstate(server.operstate)
    decision = decide(action, before, server.task, server.task_job_id)
    if decision.repeat_of_pending:
        # A second destroy while one is pending: the same job answers (a retried DELETE).
        job = await session.get(Job, server.task_job_id)
        assert job is not None
        return job

    host_down = _host_down(server, host_state, action)
    params = dict(params or {})
    after = rule.on_accept or rule.on_success or before
    after_flavor = new_flavor or flavor
    deltas = footprint(after, after_flavor.vcpus, after_flavor.ram_mb, after_flavor.disk_gb) - footprint(
        before, flavor.vcpus, flavor.ram_mb, flavor.disk_gb
    )

    if action is Action.DESTROY:
        # The live jobs this destroy ends (its result finishes these, and looks for no others):
        # the task it overtakes, if its job is still out -- a live job is always its VM's task.
        overtaken = await _supersede(session, server, flavor) if decision.supersedes is not None else None
        params["overtook"] = [str(overtaken.id)] if overtaken is not None else []

    host = server.host
    if action is Action.RELEASE:
        placed = await placement.reserve(session, vcpus=flavor.vcpus, ram_mb=flavor.ram_mb, zone=server.zone)
        server.host, server.zone, server.vnc_port = placed.host, placed.zone, placed.vnc_port
        host = placed.host
        image = await session.get(Image, server.image_id)
        assert image is not None
        keypair = (
            await keypairs.find(session, project_id=server.project_id, name=server.key_name)
            if server.key_name
            else None
        )
        nics = await addresses.nics_of(session, server.id)
        rules = await firewall_rules.params_for(session, server.id)
        params = servers.create_params(server, flavor, image, keypair.public_key if keypair else None, nics, rules)
        params["public_ips"] = await addresses.public_mappings(session, server.id)
    elif action is Action.RESIZE:
        assert new_flavor is not None
        grow = {"vcpus": new_flavor.vcpus - flavor.vcpus, "ram_mb": new_flavor.ram_mb - flavor.ram_mb}
        assert server.host is not None
        await placement.grow(session, host=server.host, **grow)
        params.update(
            reserved=grow,
            flavor_id=str(new_flavor.id),
            vcpus=new_flavor.vcpus,
            ram_mb=new_flavor.ram_mb,
            disk_gb=new_flavor.disk_gb,
        )
    elif action in (Action.MIGRATE, Action.LIVE_MIGRATE):
        if target_host is not None and target_host == server.host:
            raise BadRequest(f"the server is already on {target_host}", field="host")
        placed = await placement.reserve(
            session,
            vcpus=flavor.vcpus,
            ram_mb=flavor.ram_mb,
            zone=None if target_host else server.zone,
            host=target_host,
            exclude=server.host,
        )
        target = await hosts.get(session, placed.host)
        assert target is not None
        params.update(
            target_host=placed.host,
            target_vnc_port=placed.vnc_port,
            target_uri=hosts.migration_uri_for(await hosts.get(session, server.host), target),
            reserved={"vcpus": flavor.vcpus, "ram_mb": flavor.ram_mb},
        )

    now = utcnow()
    if any(v > 0 for v in deltas.as_tuple()):
        # Wanting more of the project: serialize with every other such request, on a lock
        # taken last so it is held only from the check to the commit.
        if not project_locked:
            await quotas.lock_project(session, server.project_id)
        await quotas.check(session, server.project_id, deltas)
    # The commission's id is known before the job is written, so the job's row names it from
    # its INSERT.
    commission_id = None if deltas.is_zero() else uuid7()  # time-ordered, as every id
    job = new_job(
        session, outbox, server, action=action.value, params=params, actor=actor, commission_id=commission_id, host=host
    )
    operstate = rule.on_accept.value if rule.on_accept is not None else server.operstate
    # One VM: its task is written with the job and the commission, in one statement (below).
    mark = servers.mark_task(session, server, task=rule.task, job_id=job.id, operstate=operstate, at=now)
    # What was asked, from which state; ``after`` only when accepting it changed the state
    # (release: HOLD -> BUILD). Where the action ends is the job's event, when it is known.
    events.record(
        session,
        server,
        "action",
        action=action.value,
        job_id=job.id,
        user_id=actor.user_id,
        before=before.value,
        after=rule.on_accept.value if rule.on_accept is not None else None,
        message=f"superseded {decision.supersedes}" if decision.supersedes else "",
    )
    if not deltas.is_zero():
        await quotas.issue(
            session,
            project_id=server.project_id,
            server_id=server.id,
            deltas=deltas,
            accept=rule.commit_at_once,
            move=False,
            commission_id=commission_id,
            job_id=job.id,
        )
    # Never placed (on hold), or on a host that is down: the destroy completes below.
    completes_here = action is Action.DESTROY and (server.host is None or host_down)
    if mark is not None:
        # When it is the transaction's last change, the commit's writes (the action's event)
        # go in the same statement.
        last = not rule.commit_at_once and not completes_here
        await rows.insert_new(session, along=stream.with_out(session, mark) if last else mark)
    if rule.commit_at_once:
        await quotas.move_usage(session, server.project_id, deltas)  # nothing to move: no statement

    if completes_here:
        # Never placed (on hold): no hypervisor has anything to undo, so the destroy
        # completes in this transaction instead of waiting on an agent. On a host that is
        # down, it completes here too (a "local delete"): when the host returns, its
        # inventory shows the domain as an orphan, and reconciliation destroys it there.
        await session.flush()
        job.status = JobStatus.SENT.value
        await results.apply_result(session, job_id=job.id, success=True)
        outbox.discard(job.id)
    return job


def _host_down(server: Server, host_state: str | None, action: Action) -> bool:
    """Is the VM's host down? Then only destroy is accepted: a job there would only wait for
    its deadline."""
    if server.host is None or action is Action.RELEASE or host_state != HostState.DOWN:
        return False
    if action is not Action.DESTROY:
        raise HostDown(f"host {server.host} is down: only destroy is accepted until it is back", host=server.host)
    return True


async def _supersede(session: AsyncSession, server: Server, flavor: Flavor) -> Job | None:
    """Destroy overtakes the pending task: its commission described a view that will not
    come true, so it is rejected now, and the host room it reserved is given back. Returns the
    task's job if it is still live (``None``: already final, nothing overtaken)."""
    old = await session.get(Job, server.task_job_id, with_for_update={"key_share": True})
    if old is None or old.status in (JobStatus.SUCCESS.value, JobStatus.ERROR.value):
        return None
    commission = await quotas.get_commission(session, old.commission_id)
    if commission is not None:
        await quotas.reject(session, commission, "superseded by destroy")
    reserved = old.params.get("reserved")
    if reserved and not old.params.get("reservation_released"):
        target = old.params.get("target_host", server.host)
        await placement.release(session, host=target, vcpus=reserved["vcpus"], ram_mb=reserved["ram_mb"])
        old.params = {**old.params, "reservation_released": True}
    return old


# -- the actions, one function each: the API, the EC2 facade and admin tools call these --


async def release(session: AsyncSession, outbox: Outbox, *, actor: Actor, server_id: uuid.UUID) -> Job:
    return await _begin(session, outbox, actor=actor, server_id=server_id, action=Action.RELEASE)


async def start(session: AsyncSession, outbox: Outbox, *, actor: Actor, server_id: uuid.UUID) -> Job:
    return await _begin(session, outbox, actor=actor, server_id=server_id, action=Action.START)


async def stop(session: AsyncSession, outbox: Outbox, *, actor: Actor, server_id: uuid.UUID) -> Job:
    return await _begin(session, outbox, actor=actor, server_id=server_id, action=Action.STOP)


async def reboot(
    session: AsyncSession, outbox: Outbox, *, actor: Actor, server_id: uuid.UUID, hard: bool = False
) -> Job:
    return await _begin(session, outbox, actor=actor, server_id=server_id, action=Action.REBOOT, params={"hard": hard})


async def suspend(session: AsyncSession, outbox: Outbox, *, actor: Actor, server_id: uuid.UUID) -> Job:
    return await _begin(session, outbox, actor=actor, server_id=server_id, action=Action.SUSPEND)


async def resume(session: AsyncSession, outbox: Outbox, *, actor: Actor, server_id: uuid.UUID) -> Job:
    return await _begin(session, outbox, actor=actor, server_id=server_id, action=Action.RESUME)


async def resize(
    session: AsyncSession,
    outbox: Outbox,
    *,
    actor: Actor,
    server_id: uuid.UUID,
    flavor_id: uuid.UUID | None = None,
    flavor: str | None = None,
) -> Job:
    new = await catalogue.resolve_flavor(session, flavor_id=flavor_id, name=flavor)
    current = await servers.get(session, actor=actor, server_id=server_id)
    if new.id == current.flavor_id:
        raise BadRequest("the server already has that flavor", field="flavor_id")
    return await _begin(session, outbox, actor=actor, server_id=server_id, action=Action.RESIZE, new_flavor=new)


async def migrate(
    session: AsyncSession,
    outbox: Outbox,
    *,
    actor: Actor,
    server_id: uuid.UUID,
    host: str | None = None,
    live: bool = False,
) -> Job:
    return await _begin(
        session,
        outbox,
        actor=actor,
        server_id=server_id,
        action=Action.LIVE_MIGRATE if live else Action.MIGRATE,
        target_host=host,
    )


async def save_image(
    session: AsyncSession, outbox: Outbox, *, actor: Actor, server_id: uuid.UUID, image_name: str
) -> Job:
    if not image_name.strip():
        raise BadRequest("image_name must not be empty", field="image_name")
    server = await servers.get(session, actor=actor, server_id=server_id)
    source = await session.get(Image, server.image_id)
    image = Image(
        name=image_name,
        project_id=server.project_id,
        is_public=False,
        status=ImageStatus.SAVING.value,
        disk_format=source.disk_format if source else "qcow2",
        source_server_id=server.id,
    )
    job = await _begin(
        session,
        outbox,
        actor=actor,
        server_id=server_id,
        action=Action.SAVE_IMAGE,
        params={"image_id": str(image.id), "image_name": image_name},
    )
    session.add(image)
    return job


async def console(
    session: AsyncSession, outbox: Outbox, *, actor: Actor, server_id: uuid.UUID, cipher: Fernet
) -> Console:
    """A fresh VNC password per attach, shown once: the job row keeps it sealed (``jobs.seal``)."""
    password = vnc_password()
    job = await _begin(
        session,
        outbox,
        actor=actor,
        server_id=server_id,
        action=Action.CONSOLE,
        params=jobs.seal({}, cipher, password=password),
    )
    server = await session.get(Server, server_id)
    assert server is not None and server.host is not None and server.vnc_port is not None
    return Console(job, server.host, server.vnc_port, password)


async def firewall(
    session: AsyncSession,
    outbox: Outbox,
    *,
    actor: Actor,
    server_id: uuid.UUID,
    rules: list[dict[str, Any]],
    generation: int,
) -> Job:
    """Send a VM's whole rule set, and its generation, to its host (``logic.firewall`` decides
    the rules)."""
    params = {"rules": rules, "generation": generation}
    return await _begin(session, outbox, actor=actor, server_id=server_id, action=Action.FIREWALL, params=params)


async def public_ips(
    session: AsyncSession, outbox: Outbox, *, actor: Actor, server_id: uuid.UUID, mappings: list[dict[str, Any]]
) -> Job:
    """Send a VM's whole set of public-to-private mappings to its host (``logic.public_ips``),
    with what its config drive is made of: the drive says the public address, so the host
    makes it anew."""
    server = await session.get(Server, server_id)
    guest = await guest_params(session, server) if server is not None else {}
    params = {"mappings": mappings, "guest": guest}
    return await _begin(session, outbox, actor=actor, server_id=server_id, action=Action.PUBLIC_IP, params=params)


async def guest_params(session: AsyncSession, server: Server) -> dict[str, Any]:
    """What a VM's config drive is made of besides its public addresses (a job that changes the
    drive carries it). A key pair deleted since the VM was made leaves the key out: the host
    keeps the key the VM was made with."""
    keypair = (
        await keypairs.find(session, project_id=server.project_id, name=server.key_name) if server.key_name else None
    )
    return {
        "name": server.name,
        "ec2_id": server.ec2_id,
        "ssh_key": keypair.public_key if keypair else None,
        "user_data": server.user_data,
        "nics": await addresses.nics_of(session, server.id),
    }


async def destroy(session: AsyncSession, outbox: Outbox, *, actor: Actor, server_id: uuid.UUID) -> Job | None:
    """Destroy the VM. Destroying one already destroyed succeeds and changes nothing (as on AWS
    and Nova): the answer is the job that destroyed it, if a job did (``None``: reconciliation)."""
    # Locked at once, as ``_begin`` locks it (which then takes it from here, with no statement):
    # whether it is destroyed already is read under the lock.
    locked = await servers.lock_for_action(session, actor=actor, server_id=server_id)
    if locked[0].operstate == Operstate.DESTROYED.value:
        return await jobs.last(session, server_id, Action.DESTROY)
    with servers.holding(session, [locked]):
        return await _begin(session, outbox, actor=actor, server_id=server_id, action=Action.DESTROY)


#: The actions that take nothing but the server, by the table's name: what facades and sweepers
#: run when they have an ``Action`` in hand (``run``).
SIMPLE: dict[Action, Callable[..., Awaitable[Job | None]]] = {
    Action.RELEASE: release,
    Action.START: start,
    Action.STOP: stop,
    Action.REBOOT: reboot,
    Action.SUSPEND: suspend,
    Action.RESUME: resume,
    Action.DESTROY: destroy,
}


async def run(
    action: Action, session: AsyncSession, outbox: Outbox, *, actor: Actor, server_id: uuid.UUID
) -> Job | None:
    """Run one of the actions that need no more than the server (a soft reboot for ``reboot``)."""
    fn = SIMPLE.get(action)
    if fn is None:
        raise BadRequest(f"{action.value} needs more than a server", action=action.value)
    return await fn(session, outbox, actor=actor, server_id=server_id)
