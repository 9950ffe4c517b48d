"""What-if: would this plan of actions pass now? (``POST /api/v1/quotas/check``)

The plan is not simulated: it runs. Each step calls the very function its real request calls
(``servers.create``, ``actions.resize``, ``actions.run``), in a savepoint, one after the other
in one transaction, so each sees what the steps before it did -- the same quota check under the
project's lock, the same placement on the same hosts, the same operstate table and task lock. A
step that is refused is rolled back to its savepoint and reports the code the real call gives.
Then the whole transaction is rolled back: no row stays, no job is published, no event is
streamed or delivered (both are written only when a transaction commits).

The answer is right for the moment it was computed; what other requests do afterwards is theirs.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import actions, catalogue, quotas, servers
from app.logic.actor import Actor
from app.logic.catalogue import ImageStatus
from app.logic.errors import BadRequest, NephosError, NoCapacity
from app.logic.hoststate import WITHOUT_INVENTORY, HostState
from app.logic.jobs import Outbox
from app.logic.operstate import RESOURCES, Action
from app.logic.placement import free_of
from app.models import Host, Image, table_of

_hosts, _images = table_of(Host), table_of(Image)
#: The actions a plan may hold: creating, and those that take a server (and a flavor).
ACTIONS = ("create", "resize", *(a.value for a in actions.SIMPLE))
MAX_STEPS = 50


@dataclass(frozen=True)
class Step:
    action: str
    server_id: uuid.UUID | None = None
    flavor: str | None = None
    count: int = 1
    zone: str | None = None
    image: str | None = None


@dataclass
class Outcome:
    ok: bool
    code: str | None = None
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Answer:
    ok: bool
    steps: list[Outcome]
    quotas: dict[str, dict[str, int]]
    placement_ok: bool
    zones: dict[str, dict[str, int]]
    hosts: dict[str, dict[str, int]]


async def _room(session: AsyncSession) -> dict[str, tuple[str, int, int]]:
    """Each up host's zone and free vCPUs and MiB, read afresh."""
    stmt = (
        sa.select(Host)
        .options(WITHOUT_INVENTORY)
        .where(_hosts.c.state == HostState.UP)
        .execution_options(populate_existing=True)
    )
    return {h.name: (h.zone, *free_of(h)) for h in await session.scalars(stmt)}


async def _image(session: AsyncSession, actor: Actor, name: str | None) -> str:
    """The step's image, or any image the caller may boot (the image changes nothing a plan
    checks: quotas and room come from the flavor)."""
    if name:
        return name
    stmt = catalogue.visible_images(actor).where(_images.c.status == ImageStatus.ACTIVE).order_by(_images.c.name)
    found = (await session.scalars(stmt.limit(1))).first()
    if found is None:
        raise BadRequest("no image can be booted: name one in the step", field="image")
    return found.name


async def _run(session: AsyncSession, outbox: Outbox, actor: Actor, step: Step) -> None:
    if step.action == "create":
        if not step.flavor:
            raise BadRequest("a create step names its flavor", field="flavor")
        spec = servers.CreateSpec(
            name="what-if",
            flavor=step.flavor,
            image=await _image(session, actor, step.image),
            count=step.count,
            zone=step.zone,
        )
        await servers.create(session, outbox, actor=actor, spec=spec)
        return
    if step.server_id is None:
        raise BadRequest(f"a {step.action} step names its server", field="server_id")
    if step.action == "resize":
        await actions.resize(session, outbox, actor=actor, server_id=step.server_id, flavor=step.flavor)
    else:
        await actions.run(Action(step.action), session, outbox, actor=actor, server_id=step.server_id)


async def check(session: AsyncSession, *, actor: Actor, plan: list[Step]) -> Answer:
    """Run ``plan`` step by step, then roll everything back; see the module's text."""
    if actor.project_id is None:
        raise BadRequest("the caller has no project")
    if not 1 <= len(plan) <= MAX_STEPS:
        raise BadRequest(f"a plan has 1 to {MAX_STEPS} steps", field="plan")
    for step in plan:
        if step.action not in ACTIONS:
            raise BadRequest(f"{step.action} is not an action a plan takes ({', '.join(ACTIONS)})", field="action")
    before, room_before = await quotas.report(session, actor.project_id), await _room(session)
    outbox, outcomes = Outbox(), []
    try:
        for step in plan:
            try:
                async with session.begin_nested():
                    await _run(session, outbox, actor, step)
                outcomes.append(Outcome(True))
            except NephosError as exc:
                outcomes.append(Outcome(False, exc.code, exc.message, dict(exc.details)))
        after, room_after = await quotas.report(session, actor.project_id), await _room(session)
    finally:
        outbox.clear()
        await session.rollback()
    limits = {
        r: {
            "limit": before[r]["limit"],
            "usage": before[r]["usage"],
            "pending": before[r]["pending"],
            "after": after[r]["usage"] + after[r]["pending"],
            "headroom_before": before[r]["limit"] - before[r]["usage"] - before[r]["pending"],
            "headroom_after": after[r]["limit"] - after[r]["usage"] - after[r]["pending"],
        }
        for r in RESOURCES
    }
    zones: dict[str, dict[str, int]] = {}
    hosts: dict[str, dict[str, int]] = {}
    for name, (zone, cpus, ram) in sorted(room_before.items()):
        _, cpus_after, ram_after = room_after.get(name, (zone, cpus, ram))
        free = {"vcpus_free": cpus, "ram_mb_free": ram, "vcpus_free_after": cpus_after, "ram_mb_free_after": ram_after}
        hosts[name] = free
        z = zones.setdefault(zone, dict.fromkeys(free, 0))
        for k, v in free.items():
            z[k] += v
    placed = not any(o.code == NoCapacity.code for o in outcomes)
    return Answer(all(o.ok for o in outcomes), outcomes, limits, placed, zones, hosts if actor.is_admin else {})
