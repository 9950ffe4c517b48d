"""The invariant suite: random interleavings, on PostgreSQL, never break the rules.

A hypothesis state machine drives the real API (in process, over HTTP) and plays the
hypervisors and the message bus itself: it keeps a model of every host's domains, and hands
the dispatcher job results (success and failure, duplicated and out of order, RUNNING
reports), out-of-band state changes, inventories, deadline expiries with the sweeper's
pass, and reconciliation passes. Several VMs in two projects whose quotas are nearly full,
on two small hosts, so refusals for quota and capacity are part of the mix.

After every step:
  * a VM has at most one task, and its task is a live job; any other live job of the VM is
    one a pending destroy overtook, and its commission is no longer pending;
  * no pending commission without a live job;
  * no host over capacity, and each host's usage is exactly what its VMs and live
    reservations hold (nothing leaks);
  * usage + pending <= limit: only the hypervisors' reality (an out-of-band change, accepted
    without asking) may push a project over, never an action the API accepted.
At quiescence (every result in): every job terminal, no pending commission, recorded usage
equal to usage recomputed from the VMs, and a reconciliation pass (from the model's
inventories) that fixes whatever reality did behind the API, after which the report is empty.

``NEPHOS_INVARIANT_EXAMPLES`` sets the number of examples (100 in ``make test``, 20 in
``make test-fast``, more in ``make faults``); each runs ``STEPS`` steps.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import Coroutine
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from app.dispatcher import reconciler
from app.dispatcher.handlers import Dispatcher
from app.dispatcher.sweepers import resolve_deadlines
from app.ids import utcnow
from app.logic import reconcile
from app.logic.jobs import FINAL
from app.logic.operstate import RESOURCES
from app.messages import DomainInfo, Inventory, JobStatus, StateChange, encode
from app.models import Commission, Flavor, Host, Job, Quota, Server, table_of
from app.settings import HostSpec
from tests.conftest import Cloud, _pg_database, start_cloud

EXAMPLES = int(os.environ.get("NEPHOS_INVARIANT_EXAMPLES", "100"))
STEPS = 50
# Two small hosts: 8 vCPUs and 3 GiB each (cpu_ratio 4), so capacity runs out too.
HOSTS = [HostSpec("inv-1", 2, 3072), HostSpec("inv-2", 2, 3072)]
# Near-full quotas: two or three VMs per project, fewer of them active.
LIMITS = {"vm": 3, "cpu": 3, "ram": 4096, "disk": 45, "active_cpu": 2, "active_ram": 2560}
ACTIONS = (
    "start",
    "stop",
    "reboot",
    "suspend",
    "resume",
    "release",
    "console",
    "resize",
    "save_image",
    "migrate",
    "live_migrate",
)
FINAL_VALUES = [s.value for s in FINAL]

_servers, _jobs, _hosts = table_of(Server), table_of(Job), table_of(Host)
_commissions, _quotas, _flavors = table_of(Commission), table_of(Quota), table_of(Flavor)

T = TypeVar("T")

# The invariants' statements, built once (building SQLAlchemy statements costs more than running
# them); ``projects`` and ``after`` are bound per step.
_PROJECTS = sa.bindparam("projects", expanding=True)
_TASKS = (
    sa.select(_servers.c.id, _servers.c.task, _servers.c.task_job_id, _jobs.c.status)
    .outerjoin(_jobs, _jobs.c.id == _servers.c.task_job_id)
    .where(_servers.c.project_id.in_(_PROJECTS))
)
_JOB_COLUMNS = (_jobs.c.id, _jobs.c.server_id, _jobs.c.action, _jobs.c.host, _jobs.c.params)
_JOB = sa.select(*_JOB_COLUMNS).where(_jobs.c.id == sa.bindparam("job_id"))
_LIVE = sa.select(*_JOB_COLUMNS).where(_jobs.c.status.notin_(FINAL_VALUES)).order_by(_jobs.c.id)
_PENDING = (
    sa.select(_commissions.c.id, _commissions.c.job_id, _jobs.c.status)
    .outerjoin(_jobs, _jobs.c.id == _commissions.c.job_id)
    .where(_commissions.c.project_id.in_(_PROJECTS), _commissions.c.state == "pending")
)
_HELD = (
    sa.select(_servers.c.host, _flavors.c.vcpus, _flavors.c.ram_mb)
    .join(_flavors, _flavors.c.id == _servers.c.flavor_id)
    .where(_servers.c.host.is_not(None), _servers.c.operstate != "DESTROYED")
)
_HOSTS = sa.select(
    _hosts.c.name,
    _hosts.c.cpus,
    _hosts.c.ram_mb,
    _hosts.c.cpu_ratio,
    _hosts.c.ram_ratio,
    _hosts.c.used_cpus,
    _hosts.c.used_ram_mb,
)
_NEW_COMMISSIONS = (
    sa.select(
        _commissions.c.id,
        _commissions.c.project_id,
        _commissions.c.issuer,
        _commissions.c.state,
        *[_commissions.c[r] for r in RESOURCES],
    )
    .where(_commissions.c.project_id.in_(_PROJECTS), _commissions.c.id > sa.bindparam("after"))
    .order_by(_commissions.c.id)
)
_pending_sums = (
    sa.select(
        _commissions.c.project_id,
        *[sa.func.sum(sa.case((_commissions.c[r] > 0, _commissions.c[r]), else_=0)).label(r) for r in RESOURCES],
    )
    .where(_commissions.c.project_id.in_(_PROJECTS), _commissions.c.state == "pending")
    .group_by(_commissions.c.project_id)
    .subquery()
)
_OVERDRAFT = (
    sa.select(
        _quotas.c.project_id,
        _quotas.c.resource,
        _quotas.c.usage,
        _quotas.c.hard_limit,
        *[_pending_sums.c[r] for r in RESOURCES],
    )
    .outerjoin(_pending_sums, _pending_sums.c.project_id == _quotas.c.project_id)
    .where(_quotas.c.project_id.in_(_PROJECTS))
)


class World:
    """What the machine's steps share across examples: one loop, one database, one API."""

    loop: asyncio.AbstractEventLoop
    cloud: Cloud
    dispatcher: Dispatcher
    steps: list[int]

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)


WORLD = World()


class ControlPlane(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.w = WORLD
        self.c = WORLD.cloud
        self.users: list[dict[str, str]] = []
        self.projects: list[uuid.UUID] = []
        for _ in range(2):
            headers = self.w.run(self.c.user(**LIMITS))
            self.users.append(headers)
            self.projects.append(uuid.UUID(headers["X-Project"]))
        self.servers: list[tuple[int, str]] = []  # (user index, server id)
        self.jobs: list[str] = []
        self.sent: list[bytes] = []  # every result message handed to the dispatcher
        # The hypervisors: server id -> {"host", "state", "vcpus", "ram_mb"}.
        self.domains: dict[str, dict[str, Any]] = {}
        self.effected: set[uuid.UUID] = set()  # jobs whose effect the model already has
        self.seq = 0
        self.steps = 0
        self.over: dict[tuple[uuid.UUID, str], int] = {}
        self.last_commission = uuid.UUID(int=0)

    # -- helpers ---------------------------------------------------------------------------

    def _next_seq(self) -> int:
        self.seq = max(self.seq + 1, 1)
        return self.seq

    async def _sql(self, stmt: Any) -> list[Any]:
        async with self.c.sessions() as session:
            result = await session.execute(stmt)
            rows = list(result.all()) if result.returns_rows else []
            await session.commit()
            return rows

    def sql(self, stmt: Any) -> list[Any]:
        return self.w.run(self._sql(stmt))

    def handle(self, body: bytes) -> None:
        self.sent.append(body)
        self.w.run(self.w.dispatcher.handle(body))

    def request(self, user: int, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = self.c.admin if user < 0 else self.users[user]
        r = self.w.run(self.c.client.request(method, path, headers=headers, json=body))
        # A refusal is fine (state, task, quota, capacity, admin-only); a 5xx never is,
        # except NoCapacity's 503, which is an answer.
        assert r.status_code < 500 or r.json()["error"]["code"] == "NoCapacity", r.text
        return r

    def live_jobs(self) -> list[Any]:
        return self.sql(_LIVE)

    def job(self, job_id: str) -> Any:
        return self.w.run(self._job(uuid.UUID(job_id)))

    async def _job(self, job_id: uuid.UUID) -> Any:
        async with self.c.sessions() as session:
            return (await session.execute(_JOB, {"job_id": job_id})).one()

    def effect(self, job: Any) -> bool:
        """What the job does on its host, in the model; False if the agent would fail it."""
        sid, action, host, params = str(job.server_id), job.action, job.host, job.params
        if job.id in self.effected:
            return True
        domain = self.domains.get(sid)
        if action in ("create", "release"):
            self.domains[sid] = {"host": host, "state": "running", "vcpus": params["vcpus"], "ram_mb": params["ram_mb"]}
        elif action == "destroy":
            self.domains.pop(sid, None)
        elif domain is None:
            return False  # the domain is gone: the agent reports an error
        elif action in ("start", "resume", "reboot"):
            domain["state"] = "running"
        elif action in ("stop", "save_image"):
            domain["state"] = "shutoff"
        elif action == "suspend":
            domain["state"] = "paused"
        elif action == "resize":
            domain.update(vcpus=params["vcpus"], ram_mb=params["ram_mb"])
        elif action in ("migrate", "live_migrate"):
            domain["host"] = params["target_host"]
        self.effected.add(job.id)
        return True

    def status(self, job: Any, status: str, **extra: Any) -> None:
        """The agent's report on a job: RUNNING, SUCCESS or ERROR."""
        self.handle(
            encode(
                JobStatus(
                    job_id=job.id,
                    server_id=job.server_id,
                    host=job.host or "none",
                    status=status,
                    seq=self._next_seq(),
                    **extra,
                )
            )
        )

    def result(self, job_id: str, success: bool) -> None:
        job = self.job(job_id)
        if success:
            success = self.effect(job)
        self.status(job, "SUCCESS" if success else "ERROR", error=None if success else "the model says no")

    def inventories(self) -> None:
        # The model's inventory is exact at this instant; reconciliation leaves alone VMs changed
        # within ``reconcile.SETTLE`` of an inventory, so these are stamped as if taken after that.
        taken = utcnow() + 2 * reconcile.SETTLE
        for spec in HOSTS:
            domains = [
                DomainInfo(
                    server_id=uuid.UUID(sid),
                    state=d["state"],
                    vcpus=d["vcpus"],
                    ram_mb=d["ram_mb"],
                    name=f"nephos-{sid}",
                    owned=True,
                )
                for sid, d in self.domains.items()
                if d["host"] == spec.name
            ]
            self.handle(
                encode(
                    Inventory(
                        host=spec.name,
                        zone=spec.zone,
                        cpus=spec.cpus,
                        ram_mb=spec.ram_mb,
                        domains=domains,
                        taken_at=taken,
                    )
                )
            )

    def reconcile(self, *, fix: bool) -> reconcile.Report:
        started = utcnow()
        self.inventories()
        report = self.w.run(reconciler.run(self.c.sessions, fix=fix, fresh_since=started))
        if fix:
            for orphan in report.orphans:  # the edge sends a purge job: the agent destroys it
                if reconcile.reapable(orphan):
                    self.domains.pop(orphan["domain_uuid"], None)
        return report

    # -- the rules: API actions --------------------------------------------------------------

    @rule(
        user=st.integers(0, 1), flavor=st.sampled_from(["tiny", "small"]), count=st.integers(1, 2), hold=st.booleans()
    )
    def create(self, user: int, flavor: str, count: int, hold: bool) -> None:
        r = self.request(
            user,
            "POST",
            "/api/v1/servers",
            {"name": "inv", "flavor": flavor, "image": "debian-12", "count": count, "hold": hold},
        )
        if r.status_code == 202:
            self.servers += [(user, s["id"]) for s in r.json()["servers"]]
            self.jobs += r.json()["job_ids"]

    @precondition(lambda self: self.servers)
    @rule(
        i=st.integers(0, 63),
        action=st.sampled_from(ACTIONS),
        flavor=st.sampled_from(["tiny", "small"]),
        admin=st.booleans(),
    )
    def act(self, i: int, action: str, flavor: str, admin: bool) -> None:
        user, sid = self.servers[i % len(self.servers)]
        body: dict[str, Any] = {"action": action}
        if action == "resize":
            body["flavor"] = flavor
        elif action == "save_image":
            body["image_name"] = f"img-{uuid.uuid4().hex[:8]}"
        r = self.request(-1 if admin else user, "POST", f"/api/v1/servers/{sid}/actions", body)
        if r.status_code == 202:
            self.jobs.append(r.json()["job_id"])

    @precondition(lambda self: self.servers)
    @rule(i=st.integers(0, 63))
    def destroy(self, i: int) -> None:
        user, sid = self.servers[i % len(self.servers)]
        r = self.request(user, "DELETE", f"/api/v1/servers/{sid}")
        # A destroyed server's DELETE is a no-op naming the job that destroyed it (or none).
        if r.status_code == 202 and r.json()["job_id"] and r.json()["job_id"] not in self.jobs:
            self.jobs.append(r.json()["job_id"])

    # -- the rules: what the hypervisors and the bus do ----------------------------------------

    @precondition(lambda self: self.jobs)
    @rule(i=st.integers(0, 63), success=st.booleans())
    def job_result(self, i: int, success: bool) -> None:
        """A job's result; for a job already final, a duplicate."""
        self.result(self.jobs[i % len(self.jobs)], success)

    @precondition(lambda self: self.jobs)
    @rule(i=st.integers(0, 63))
    def job_running(self, i: int) -> None:
        self.status(self.job(self.jobs[i % len(self.jobs)]), "RUNNING")

    @precondition(lambda self: self.sent)
    @rule(i=st.integers(0, 255))
    def redeliver(self, i: int) -> None:
        """At-least-once delivery: an old message again, after newer ones."""
        self.handle(self.sent[i % len(self.sent)])

    @precondition(lambda self: self.domains)
    @rule(i=st.integers(0, 63), state=st.sampled_from(["running", "paused", "shutoff", "crashed", "missing"]))
    def out_of_band(self, i: int, state: str) -> None:
        """The guest shuts down, crashes, is started or removed behind the control plane's back."""
        sid = sorted(self.domains)[i % len(self.domains)]
        host = self.domains[sid]["host"]
        if state == "missing":
            del self.domains[sid]
        else:
            self.domains[sid]["state"] = state
        self.handle(
            encode(
                StateChange(
                    server_id=uuid.UUID(sid),
                    host=host,
                    domain_state=state,  # type: ignore[arg-type]
                    seq=self._next_seq(),
                    reason="the model",
                )
            )
        )

    @rule(i=st.integers(0, 63), agent_did_it=st.booleans())
    def deadline_passes(self, i: int, agent_did_it: bool) -> None:
        """A job's result never comes: its deadline passes, and the sweeper resolves it from a
        fresh inventory (the agent may or may not have done the work)."""
        live = [j for j in self.live_jobs() if j.host is not None]
        if live:
            job = live[i % len(live)]
            if agent_did_it:
                self.effect(job)
            self.sql(_jobs.update().where(_jobs.c.id == job.id).values(deadline=utcnow() - timedelta(seconds=1)))
        self.sweep()

    def sweep(self) -> None:
        passed = self.w.run(resolve_deadlines(self.c.sessions))
        if passed.need_inventory:
            self.inventories()
            self.w.run(resolve_deadlines(self.c.sessions))

    @rule(fix=st.booleans())
    def reconciliation(self, fix: bool) -> None:
        """The periodic pass, while jobs are in flight: it must never fix a VM under its job."""
        self.reconcile(fix=fix)

    # -- the invariants (one transaction, read together) ----------------------------------------

    @invariant()
    def every_rule_holds(self) -> None:
        self.steps += 1
        self.w.run(self._check())

    async def _check(self) -> None:
        mine = {"projects": self.projects}
        async with self.c.sessions() as session:
            run = session.execute
            tasks = {
                sid: (task, job_id)
                for sid, task, job_id, status in (await run(_TASKS, mine)).all()
                if self._task_is_live(sid, task, job_id, status)
            }
            live = (await run(_LIVE)).all()
            for job_id, server_id, *_ in live:
                task, current = tasks.get(server_id, (None, None))
                if job_id != current:
                    assert task == "DESTROY", f"server {server_id}: live job {job_id} beside its task {task}"
            for commission_id, job_id, status in (await run(_PENDING, mine)).all():
                assert job_id is not None and status not in FINAL_VALUES, (
                    f"pending commission {commission_id} with job {job_id} {status}"
                )
            await self._hosts_hold_exactly_their_vms(session, live)
            await self._only_reality_overdraws(session)

    @staticmethod
    def _task_is_live(sid: uuid.UUID, task: str | None, job_id: uuid.UUID | None, status: str | None) -> bool:
        assert (task is None) == (job_id is None), (sid, task, job_id)
        assert task is None or status not in FINAL_VALUES, f"server {sid}: task {task} on a {status} job"
        return True

    async def _hosts_hold_exactly_their_vms(self, session: Any, live: list[Any]) -> None:
        """No host over capacity, and each holds exactly its VMs and live reservations."""
        held: Counter[tuple[str, str]] = Counter()
        for host, vcpus, ram in (await session.execute(_HELD)).all():
            held[(host, "cpu")] += vcpus
            held[(host, "ram")] += ram
        for _, _, action, host, params in live:
            reserved = params.get("reserved")
            if reserved and not params.get("reservation_released"):
                where = params["target_host"] if action in ("migrate", "live_migrate") else host
                held[(where, "cpu")] += reserved["vcpus"]
                held[(where, "ram")] += reserved["ram_mb"]
        for name, cpus, ram, cpu_ratio, ram_ratio, used_cpus, used_ram in (await session.execute(_HOSTS)).all():
            assert 0 <= used_cpus <= cpus * cpu_ratio and 0 <= used_ram <= ram * ram_ratio, (
                f"host {name} over capacity: {used_cpus} vCPUs, {used_ram} MiB"
            )
            assert (used_cpus, used_ram) == (held[(name, "cpu")], held[(name, "ram")]), (
                f"host {name} holds {used_cpus}/{used_ram}, its VMs and reservations {held[(name, 'cpu')]}/"
                f"{held[(name, 'ram')]}"
            )

    async def _only_reality_overdraws(self, session: Any) -> None:
        """usage + pending <= limit, unless reality (a commission the dispatcher or reconciliation
        accepted without asking, since the last step) pushed it over: an accepted action never does."""
        reality: Counter[tuple[uuid.UUID, str]] = Counter()
        for row in (
            await session.execute(_NEW_COMMISSIONS, {"projects": self.projects, "after": self.last_commission})
        ).all():
            self.last_commission = row.id
            if row.issuer != "api" and row.state == "accepted":
                for resource, value in zip(RESOURCES, row[4:], strict=True):
                    reality[(row.project_id, resource)] += max(0, value)
        now = {}
        for row in (await session.execute(_OVERDRAFT, {"projects": self.projects})).all():
            assert row.usage >= 0, (row.project_id, row.resource, row.usage)
            extra = dict(zip(RESOURCES, row[4:], strict=True))[row.resource] or 0
            now[(row.project_id, row.resource)] = row.usage + int(extra) - row.hard_limit
        for key, over in now.items():
            assert over <= max(0, self.over.get(key, 0)) + reality[key], (
                f"project {key[0]} {key[1]}: usage + pending exceeds its limit by {over}"
            )
        self.over = now

    # -- quiescence ---------------------------------------------------------------------------------

    def teardown(self) -> None:
        WORLD.steps.append(self.steps - 1)  # the invariants also run once before the first step
        for _ in range(3):  # a result can only end jobs, but a destroy's ends those it overtook
            for job in self.live_jobs():
                self.result(str(job.id), True)
        assert not self.live_jobs(), "every job terminal"
        assert not self.sql(
            sa.select(_commissions.c.id).where(
                _commissions.c.project_id.in_(self.projects), _commissions.c.state == "pending"
            )
        ), "no pending commission at quiescence"
        report = self.w.run(self._compare())
        assert not report.quota_drift and not report.pending_without_job, (
            report.quota_drift,
            report.pending_without_job,
        )
        # Reality may have drifted behind the API's back (a domain removed, a late job):
        # one reconciliation pass repairs it, and the next finds nothing.
        self.reconcile(fix=True)
        after = self.reconcile(fix=False)
        assert after.empty() and not after.unreachable_hosts, after
        self.w.run(self._exact_usage())
        # Clean up, so the next example starts with empty hosts.
        for user, sid in self.servers:
            r = self.request(user, "DELETE", f"/api/v1/servers/{sid}")
            if r.status_code == 202 and r.json()["job_id"]:  # null: destroyed without a job
                self.result(r.json()["job_id"], True)
        used = self.sql(sa.select(sa.func.sum(_hosts.c.used_cpus), sa.func.sum(_hosts.c.used_ram_mb)))[0]
        assert tuple(used) == (0, 0), f"hosts still hold {used} after every VM was destroyed"
        self.w.run(self._exact_usage())

    async def _compare(self) -> reconcile.Report:
        async with self.c.sessions() as session:
            return await reconcile.compare(session)

    async def _exact_usage(self) -> None:
        async with self.c.sessions() as session:
            actual = await reconcile.recomputed_usage(session)
            for project_id in self.projects:
                recorded = {
                    q.resource: q.usage
                    for q in await session.scalars(sa.select(Quota).where(_quotas.c.project_id == project_id))
                }
                assert recorded == actual.get(project_id, reconcile.Deltas()).as_dict(), (recorded, actual)


@pytest.fixture
def world(pg_template: str, tmp_path: Path) -> Any:
    loop = asyncio.new_event_loop()
    databases = _pg_database(pg_template)
    url = loop.run_until_complete(databases.__anext__())
    cloud, manager = loop.run_until_complete(start_cloud(url, hosts=HOSTS))
    WORLD.loop, WORLD.cloud, WORLD.steps = loop, cloud, []
    WORLD.dispatcher = Dispatcher(cloud.sessions)
    try:
        yield WORLD
    finally:
        loop.run_until_complete(cloud.client.aclose())
        loop.run_until_complete(manager.__aexit__(None, None, None))
        loop.run_until_complete(cloud.engine.dispose())
        loop.run_until_complete(databases.aclose())
        loop.close()


@pytest.mark.timeout(120 + 6 * EXAMPLES)  # about 1 s an example on this machine: room for a loaded CI
def test_random_interleavings_keep_every_invariant(world: World) -> None:
    # Hypothesis cuts some examples short (its simplest first tries, an overrun buffer): run
    # until EXAMPLES of them have run every step.
    full = 0
    for _ in range(5):
        run_state_machine_as_test(
            ControlPlane,
            settings=settings(
                max_examples=max(EXAMPLES - full, 10),
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                print_blob=True,
                phases=[Phase.explicit, Phase.generate]
                if os.environ.get("NEPHOS_INVARIANT_NO_SHRINK")
                else list(Phase),
            ),
        )
        full = sum(1 for n in world.steps if n >= STEPS)
        if full >= EXAMPLES:
            break
    print(f"{len(world.steps)} examples, {full} of {STEPS} steps: {Counter(world.steps).most_common(5)}")
    assert full >= EXAMPLES, f"only {full} of {len(world.steps)} examples ran {STEPS} steps"


# -- shrunk failures, kept: each replays a sequence hypothesis found and shrank --------------------


def replay(world: World, steps: str) -> None:
    state = ControlPlane()
    state.every_rule_holds()
    for line in filter(None, map(str.strip, steps.splitlines())):
        eval(line, {"state": state})  # our own text: the steps hypothesis printed
        state.every_rule_holds()
    state.teardown()


def test_a_failed_destroy_gives_the_vm_back_the_task_it_overtook(world: World) -> None:
    """Found by the suite: a destroy overtook a create, then failed; the create's job was still
    out on the host, yet the VM had no task, so a second action could have run beside it."""
    replay(
        world,
        """
        state.reconciliation(fix=False)
        state.create(count=1, flavor='tiny', hold=True, user=0)
        state.create(count=1, flavor='tiny', hold=False, user=0)
        state.reconciliation(fix=False)
        state.reconciliation(fix=True)
        state.destroy(i=55)
        state.destroy(i=36)
        state.act(action='console', admin=True, flavor='small', i=35)
        state.destroy(i=41)
        state.create(count=2, flavor='tiny', hold=True, user=1)
        state.create(count=2, flavor='tiny', hold=False, user=0)
        state.reconciliation(fix=True)
        state.destroy(i=25)
        state.reconciliation(fix=False)
        state.reconciliation(fix=True)
        state.job_running(i=28)
        state.act(action='console', admin=True, flavor='small', i=36)
        state.destroy(i=10)
        state.job_result(i=39, success=False)
    """,
    )


def test_a_migration_that_ended_after_its_deadline_leaves_the_vm_where_it_runs(world: World) -> None:
    """Found by the suite (seed 39741064482223596570518995786326857495, shrunk by hand): a live
    migration's deadline was resolved from an inventory that still had the domain on its source,
    so the job failed; the domain was on the target by then. The next reconciliation found the
    VM stale on its source and marked it DESTROYED, and its running domain on the target became
    an orphan that the following pass would have reaped. Now it is ``moved``: recorded where it runs."""
    replay(
        world,
        """
        state.create(count=1, flavor='tiny', hold=False, user=0)
        state.deadline_passes(agent_did_it=True, i=37)
        state.act(action='live_migrate', admin=True, flavor='small', i=0)
        state.deadline_passes(agent_did_it=True, i=7)
    """,
    )
