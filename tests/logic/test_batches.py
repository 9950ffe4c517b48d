"""The dispatcher applying results in batches, on both databases.

Every message goes through ``Dispatcher.handle`` (what the bus calls), all at once, so one
runner takes them as one batch. The batches hold what a busy results queue holds: two events
of one VM received out of order, the same result twice, a stale event, a result nobody knows
and a malformed body among them; then a message whose application raises, in the middle of
good ones. Afterwards the VMs, jobs, history and quota usage must be what the agents' events,
applied one at a time in the order their hosts stamped them, make them.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from app.bus import Poison
from app.dispatcher.handlers import Dispatcher
from app.logic.operstate import Operstate, footprint
from app.messages import Heartbeat, JobStatus, StateChange
from app.models import Job, Port, PublicIp, Server, ServerEvent, table_of
from tests.api.helpers import server_in, statements_sent, usage
from tests.conftest import Cloud


def _done(job_id: str, server_id: str, seq: int, status: str = "SUCCESS", domain: str | None = None) -> bytes:
    return (
        JobStatus(
            job_id=uuid.UUID(job_id),
            server_id=uuid.UUID(server_id),
            host="host-1",
            status=status,
            seq=seq,  # type: ignore[arg-type]
            domain_state=domain,  # type: ignore[arg-type]
        )
        .model_dump_json()
        .encode()
    )


def _seen(server_id: str, state: str, seq: int) -> bytes:
    return (
        StateChange(
            server_id=uuid.UUID(server_id),
            host="host-1",
            domain_state=state,
            seq=seq,  # type: ignore[arg-type]
        )
        .model_dump_json()
        .encode()
    )


async def _deliver(dispatcher: Dispatcher, bodies: list[bytes]) -> list[Any]:
    """All at once, as a bus with that many unacked deliveries would: one batch."""
    return await asyncio.gather(*(dispatcher.handle(b) for b in bodies), return_exceptions=True)


async def _history(cloud: Cloud, server_id: str) -> list[tuple[str, str | None, str | None]]:
    events = table_of(ServerEvent)
    async with cloud.sessions() as s:
        rows = await s.execute(
            sa.select(events.c.kind, events.c.operstate_from, events.c.operstate_to)
            .where(events.c.server_id == uuid.UUID(server_id))
            .order_by(events.c.id)
        )
        return [(r.kind, r.operstate_from, r.operstate_to) for r in rows]


async def _usage_matches_vms(cloud: Cloud, user: dict[str, str]) -> None:
    """The project's recorded usage is the sum of its VMs' footprints, and nothing is pending."""
    servers = table_of(Server)
    async with cloud.sessions() as s:
        rows = (
            await s.execute(
                sa.select(servers.c.operstate, servers.c.task).where(
                    servers.c.project_id == uuid.UUID(user["X-Project"])
                )
            )
        ).all()
    assert all(r.task is None for r in rows)
    expected: dict[str, int] = dict.fromkeys(usage(await cloud.quotas(user)), 0)
    for r in rows:
        for k, v in footprint(Operstate(r.operstate), 1, 2048, 20).as_dict().items():
            expected[k] += v
    q = await cloud.quotas(user)
    assert usage(q) == expected
    assert {v["pending"] for v in q.values()} == {0}


async def test_a_batch_with_reordered_duplicate_stale_and_poison(cloud: Cloud) -> None:
    user = await cloud.user()
    dispatcher = Dispatcher(cloud.sessions, batch=64, runners=1)
    # C: a start whose success is followed at once by the guest shutting down (seq 21, 22),
    # received the other way round.
    c = await server_in(cloud, user, "STOPPED")
    start_c = (await cloud.act(user, c["id"], "start"))["job_id"]
    # D: a stop whose result is delivered twice.
    d = await server_in(cloud, user, "STARTED")
    stop_d = (await cloud.act(user, d["id"], "stop"))["job_id"]
    # E: an event older than one already applied.
    e = await server_in(cloud, user, "STARTED")
    assert await dispatcher.handle(_seen(e["id"], "running", 4)) is None
    # F: a guest crashing, nothing else going on.
    f = await server_in(cloud, user, "STARTED")

    heartbeat = (
        Heartbeat(host="host-1", zone="default", cpus=16, ram_mb=32768, sent_at=datetime.now(UTC))
        .model_dump_json()
        .encode()
    )
    unknown = str(uuid.uuid4())
    bodies = [
        _seen(c["id"], "shutoff", 22),
        _done(stop_d, d["id"], 31, domain="shutoff"),
        _seen(e["id"], "shutoff", 3),
        _done(unknown, f["id"], 1),  # poison, in the middle
        b'{"kind": "job_status", "seq": "not a number"}',  # malformed
        heartbeat,
        _done(stop_d, d["id"], 31, domain="shutoff"),
        _done(start_c, c["id"], 21, domain="running"),
        _seen(f["id"], "crashed", 41),
    ]
    outcomes = await _deliver(dispatcher, bodies)

    assert isinstance(outcomes[3], Poison) and unknown in str(outcomes[3])
    assert isinstance(outcomes[4], Poison)
    assert [o for i, o in enumerate(outcomes) if i not in (3, 4)] == [None] * 7
    assert dispatcher.counts["batches"] == 1 and dispatcher.counts["batches_split"] == 0
    # D's second copy is a duplicate; E's old event is dropped; C's events ran in their order.
    assert dispatcher.counts["job_status:duplicate"] == 1
    assert dispatcher.counts["state_change:duplicate"] == 1
    assert dispatcher.counts["job_status:applied"] == 2

    after = {k: await cloud.server(user, v["id"]) for k, v in {"c": c, "d": d, "e": e, "f": f}.items()}
    assert {k: v["operstate"] for k, v in after.items()} == {
        "c": "STOPPED",
        "d": "STOPPED",
        "e": "STARTED",
        "f": "STOPPED",
    }
    assert all(v["task"] is None for v in after.values())
    # C: the start succeeded (STOPPED -> STARTED, its commission accepted), then the guest shut down.
    history = await _history(cloud, c["id"])
    assert history[-2:] == [("job_succeeded", "STOPPED", "STARTED"), ("out_of_band", "STARTED", "STOPPED")]
    async with cloud.sessions() as s:
        for job_id in (start_c, stop_d):
            job = await s.get(Job, uuid.UUID(job_id))
            assert job is not None and job.status == "SUCCESS"
    await _usage_matches_vms(cloud, user)


async def test_a_failing_message_is_isolated(cloud: Cloud) -> None:
    """A message whose application raises fails alone; the rest of its batch is applied."""
    user = await cloud.user()
    dispatcher = Dispatcher(cloud.sessions, batch=64, runners=1)
    good = [await server_in(cloud, user, "STARTED") for _ in range(3)]
    stops = [(await cloud.act(user, g["id"], "stop"))["job_id"] for g in good]
    bad = await server_in(cloud, user, "STOPPED")
    resize = (await cloud.act(user, bad["id"], "resize", flavor="medium"))["job_id"]
    async with cloud.sessions() as s:  # a job row the dispatcher cannot read
        await s.execute(
            sa.update(table_of(Job)).where(table_of(Job).c.id == uuid.UUID(resize)).values(params={"flavor_id": "??"})
        )
        await s.commit()
    bodies = [_done(stops[0], good[0]["id"], 5, domain="shutoff"), _done(resize, bad["id"], 5, domain="shutoff")]
    bodies += [_done(j, g["id"], 5, domain="shutoff") for j, g in zip(stops[1:], good[1:], strict=True)]
    outcomes = await _deliver(dispatcher, bodies)

    assert isinstance(outcomes[1], ValueError)
    assert outcomes[0] is None and outcomes[2:] == [None, None]
    assert dispatcher.counts["batches_split"] == 1 and dispatcher.counts["job_status:applied"] == 3
    for g in good:
        assert (await cloud.server(user, g["id"]))["operstate"] == "STOPPED"
    # Nothing of the failed message stuck: its VM still waits for its result.
    held = await cloud.server(user, bad["id"])
    assert held["task"] == "RESIZE" and held["task_job_id"] == resize
    async with cloud.sessions() as s:
        job = await s.get(Job, uuid.UUID(resize))
        assert job is not None and job.status in ("PENDING", "SENT")


@pytest.mark.parametrize("batch", [1, 64])
async def test_one_by_one_and_batched_agree(cloud: Cloud, batch: int) -> None:
    """The same events, in their order, leave the same state whatever the batch size."""
    user = await cloud.user()
    dispatcher = Dispatcher(cloud.sessions, batch=batch, runners=1)
    vms = [await server_in(cloud, user, "STARTED") for _ in range(4)]
    stops = [(await cloud.act(user, v["id"], "stop"))["job_id"] for v in vms[:2]]
    bodies = [_done(j, v["id"], 7, domain="shutoff") for j, v in zip(stops, vms[:2], strict=True)]
    bodies += [_seen(vms[2]["id"], "paused", 3), _seen(vms[3]["id"], "shutoff", 3), _seen(vms[3]["id"], "running", 4)]
    assert await _deliver(dispatcher, bodies) == [None] * 5
    states = [(await cloud.server(user, v["id"]))["operstate"] for v in vms]
    assert states == ["STOPPED", "STOPPED", "SUSPENDED", "STARTED"]
    assert dispatcher.counts["batches"] == (1 if batch > 1 else 0)
    await _usage_matches_vms(cloud, user)


@pytest.mark.parametrize("batch", [1, 64])
async def test_destroys_in_a_batch_give_their_addresses_back_at_its_end(cloud: Cloud, batch: int) -> None:
    """A batch of destroy results releases the VMs' addresses together, at its end: the ports
    are gone, the public addresses unmapped but still the project's, exactly as one by one;
    and a VM of the same batch that lives keeps its own."""
    pool = await cloud.client.post(
        "/api/v1/admin/public-ip-pools", headers=cloud.admin, json={"name": f"p{batch}", "cidr": "198.51.100.0/29"}
    )
    assert pool.status_code == 201, pool.text
    user = await cloud.user(public_ip=4)
    dispatcher = Dispatcher(cloud.sessions, batch=batch, runners=1)
    doomed = [await server_in(cloud, user, "STARTED", public_ip=True) for _ in range(3)]
    kept = await server_in(cloud, user, "STARTED", public_ip=True)
    destroys = [(await cloud.act(user, v["id"], "destroy"))["job_id"] for v in doomed]
    stop = (await cloud.act(user, kept["id"], "stop"))["job_id"]
    bodies = [_done(j, v["id"], 9, domain="missing") for j, v in zip(destroys, doomed, strict=True)]
    bodies.insert(1, _done(stop, kept["id"], 9, domain="shutoff"))
    assert await _deliver(dispatcher, bodies) == [None] * 4
    assert dispatcher.counts["batches"] == (1 if batch > 1 else 0)

    ports, publics = table_of(Port), table_of(PublicIp)
    async with cloud.sessions() as s:
        left = {r.server_id for r in await s.execute(sa.select(ports.c.server_id))}
        mapped = {r.address: r.server_id for r in await s.execute(sa.select(publics.c.address, publics.c.server_id))}
    assert left & {uuid.UUID(v["id"]) for v in doomed} == set()
    assert uuid.UUID(kept["id"]) in left
    assert sorted(mapped.values(), key=str) == sorted([None, None, None, uuid.UUID(kept["id"])], key=str)
    assert (await cloud.quotas(user))["public_ip"]["usage"] == 4  # unmapped, still the project's
    listed = (await cloud.client.get("/api/v1/servers", headers=user)).json()["items"]
    assert next(s["addresses"] for s in listed if s["id"] == kept["id"])[0]["public_ip"] is not None


async def test_a_batch_writes_its_vms_and_jobs_together(cloud: Cloud) -> None:
    """A batch's statements do not grow with its results: its VMs' and jobs' changes are
    written at its end, an UPDATE of many rows per table, not two statements per result."""
    user = await cloud.user()
    dispatcher = Dispatcher(cloud.sessions, batch=64, runners=1)
    with statements_sent(cloud) as sent:
        spent = []
        for n in (2, 8):
            vms = [await server_in(cloud, user, "STARTED") for _ in range(n)]
            stops = [(await cloud.act(user, v["id"], "stop"))["job_id"] for v in vms]
            sent.clear()
            bodies = [_done(j, v["id"], 7, domain="shutoff") for j, v in zip(stops, vms, strict=True)]
            assert await _deliver(dispatcher, bodies) == [None] * n
            spent.append(len(sent))
            assert [(await cloud.server(user, v["id"]))["operstate"] for v in vms] == ["STOPPED"] * n
        assert spent[0] == spent[1], spent
        assert dispatcher.counts["batches"] == 2
    await _usage_matches_vms(cloud, user)


async def test_results_that_wait_for_a_running_transaction_go_in_the_next_one(cloud: Cloud) -> None:
    """With several runners allowed (the default), results that arrive one by one while a
    transaction runs wait for it and are applied together in the next one, not each in a
    transaction of its own; and a result that arrives right after the last one was applied
    (its runner just ended) is applied at once, never left in the queue."""
    user = await cloud.user()
    dispatcher = Dispatcher(cloud.sessions, batch=32, runners=4)
    vms = [await server_in(cloud, user, "STARTED") for _ in range(5)]
    stops = [(await cloud.act(user, v["id"], "stop"))["job_id"] for v in vms]
    bodies = [_done(j, v["id"], 7, domain="shutoff") for j, v in zip(stops, vms, strict=True)]
    commits = 0

    def committed(*_: Any) -> None:
        nonlocal commits
        commits += 1

    servers = table_of(Server)
    sa.event.listen(cloud.engine.sync_engine, "commit", committed)
    try:
        # The first result's transaction waits on its VM's row (on SQLite: on the database's
        # write lock) while the others arrive, a moment apart.
        async with cloud.sessions() as blocker:
            await blocker.execute(
                sa.select(servers.c.id).where(servers.c.id == uuid.UUID(vms[0]["id"])).with_for_update()
            )
            handled = [asyncio.create_task(dispatcher.handle(bodies[0]))]
            for body in bodies[1:]:
                await asyncio.sleep(0.05)
                handled.append(asyncio.create_task(dispatcher.handle(body)))
            await asyncio.sleep(0.05)
            assert not any(h.done() for h in handled)
            await blocker.rollback()
        await asyncio.wait_for(asyncio.gather(*handled), 30)
        assert commits == 2  # the first alone, then the four that waited, together
        assert dispatcher.counts["batches"] == 1

        # One at a time, each sent when the last was applied: none waits for a runner.
        starts = [(await cloud.act(user, v["id"], "start"))["job_id"] for v in vms]
        for job_id, vm in zip(starts, vms, strict=True):
            async with asyncio.timeout(10):  # in this task, as the bus's handler awaits it
                await dispatcher.handle(_done(job_id, vm["id"], 9, domain="running"))
    finally:
        sa.event.remove(cloud.engine.sync_engine, "commit", committed)
    assert [(await cloud.server(user, v["id"]))["operstate"] for v in vms] == ["STARTED"] * 5
    await _usage_matches_vms(cloud, user)


async def test_a_result_alone_writes_its_changes_in_one_statement(cloud: Cloud) -> None:
    """A result applied alone (nothing else queued) writes its VM, its job, its commission,
    its usage move and its events in one statement on PostgreSQL, after locking its rows; on
    both databases the VM, the job, the usage and the history are what they would be."""
    user = await cloud.user()
    dispatcher = Dispatcher(cloud.sessions, batch=64, runners=1)
    vm = await server_in(cloud, user, "STARTED")
    before = await _history(cloud, vm["id"])
    stop = (await cloud.act(user, vm["id"], "stop"))["job_id"]
    with statements_sent(cloud) as sent:
        assert await _deliver(dispatcher, [_done(stop, vm["id"], 7, domain="shutoff")]) == [None]
    assert dispatcher.counts["batches"] == 0
    writes = [s for s in sent if not s.lstrip().upper().startswith("SELECT")]
    if cloud.engine.dialect.name == "postgresql":
        assert len(writes) == 1, writes
        parts = ("UPDATE servers", "UPDATE jobs", "UPDATE commissions", "UPDATE quotas", "INSERT INTO server_events")
        for part in parts:
            assert part in writes[0], (part, writes[0])
    server = await cloud.server(user, vm["id"])
    assert (server["operstate"], server["task"]) == ("STOPPED", None)
    async with cloud.sessions() as s:
        job = await s.get(Job, uuid.UUID(stop))
        assert job is not None and (job.status, job.domain_state) == ("SUCCESS", "shutoff")
    assert (await _history(cloud, vm["id"]))[len(before) :][-1] == ("job_succeeded", "STARTED", "STOPPED")
    await _usage_matches_vms(cloud, user)


async def test_a_batch_opens_with_its_vms_and_their_flavors_in_one_statement(cloud: Cloud) -> None:
    """A batch locks the VMs it touches -- those of its jobs and those its hosts' events name --
    with their flavors in one statement (in id order), then their jobs, then their commissions:
    three statements before it applies anything, whatever its size. A result for a job nobody
    knows in it is applied alone, and refused, as before."""
    user = await cloud.user()
    dispatcher = Dispatcher(cloud.sessions, batch=64, runners=1)
    vms = [await server_in(cloud, user, "STARTED") for _ in range(3)]
    seen = await server_in(cloud, user, "STARTED")
    stops = [(await cloud.act(user, v["id"], "stop"))["job_id"] for v in vms]
    bodies = [_done(j, v["id"], 7, domain="shutoff") for j, v in zip(stops, vms, strict=True)]
    bodies += [_seen(seen["id"], "shutoff", 7), _done(str(uuid.uuid4()), seen["id"], 8)]
    with statements_sent(cloud) as sent:
        delivered = await _deliver(dispatcher, bodies)
    assert delivered[:4] == [None] * 4 and isinstance(delivered[4], Poison), delivered
    assert dispatcher.counts["batches"] == 1
    assert [(await cloud.server(user, v["id"]))["operstate"] for v in [*vms, seen]] == ["STOPPED"] * 4
    opening = [s for s in sent if s.startswith("SELECT")][:3]
    assert "JOIN flavors" in opening[0] and "FROM jobs" in opening[0] and "ORDER BY servers.id" in opening[0], opening
    assert opening[1].startswith("SELECT jobs.") and opening[2].startswith("SELECT commissions."), opening
    if cloud.engine.dialect.name == "postgresql":
        assert opening[0].endswith("FOR NO KEY UPDATE OF servers"), opening[0]
    assert not any(s.startswith("SELECT flavors.") for s in sent), sent
    await _usage_matches_vms(cloud, user)
