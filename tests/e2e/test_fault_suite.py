"""The fault suite: under a steady load of actions, every fault heals by itself.

api, dispatcher and two agents run as separate processes on PostgreSQL + RabbitMQ. A load
of actions (create, stop, start, reboot, suspend, resume, destroy) keeps running while each
fault is injected and then undone:

* SIGKILL of the dispatcher, of an agent, of the API -- each restarted;
* RabbitMQ restarting; PostgreSQL restarting;
* an agent that never answers (its process stopped): its host is marked down, its VMs'
  tasks end at their deadline with a clear error, new VMs go to the other host; then it
  comes back.

After each, within a bounded time and with nobody running anything: every accepted action's
job is terminal (0 lost), no task past its deadline, no pending commission, recorded usage
equal to the usage recomputed from the VMs, and a fresh reconciliation report that is empty
(0 drift). The suite prints a table: fault, actions in flight, convergence time, lost, drift.

``make test`` runs it at a reduced size, with RabbitMQ and PostgreSQL "restarting" behind TCP
proxies (other tests share the real services); ``make faults`` (``NEPHOS_FAULTS=full``) runs
it bigger and restarts the real services (``NEPHOS_FAULTS_REAL_RESTART=1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from app.logic.reconcile import Report
from tests.conftest import AMQP_URL, _pg_database
from tests.e2e.conftest import ADMIN, Cluster, production_cluster
from tests.e2e.test_lifecycle import new_user
from tests.procs import Proxy

pytestmark = pytest.mark.slow

FULL = os.environ.get("NEPHOS_FAULTS", "reduced") == "full"
REAL_RESTART = os.environ.get("NEPHOS_FAULTS_REAL_RESTART") == "1"
VMS = 40 if FULL else 12
WORKERS = 8 if FULL else 4
LOAD_BEFORE = 4.0 if FULL else 1.5  # seconds of load before the fault
OUTAGE = 5.0 if FULL else 2.0  # how long a process or service stays away
CONVERGE_WITHIN = 120.0 if FULL else 60.0
DEADLINE = 10  # job deadline (s): an unanswered job ends this long after it was accepted
QUOTA = {"vm": 1000, "cpu": 10**4, "ram": 10**8, "disk": 10**6, "active_cpu": 10**4, "active_ram": 10**8}
LIVE = ("PENDING", "SENT", "RUNNING")
ENV = {"NEPHOS_JOB_DEADLINE_SECONDS": str(DEADLINE), "NEPHOS_RECONCILE_INTERVAL": "2", "NEPHOS_HOST_TIMEOUT": "4"}


@dataclass
class Row:
    fault: str
    in_flight: int
    converged_s: float
    lost: int
    drift: int
    accepted: int
    refused: int


@dataclass
class Load:
    """A steady stream of actions on a pool of VMs, from a few concurrent clients."""

    c: Cluster
    user: dict[str, str]
    vms: list[str]
    accepted: list[str] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    NEXT = {"STARTED": ("stop", "reboot", "suspend"), "STOPPED": ("start",), "SUSPENDED": ("resume",)}

    async def run(self) -> None:
        await asyncio.gather(*(self._worker(i) for i in range(WORKERS)))

    async def _worker(self, i: int) -> None:
        rng = random.Random(i)
        while not self.stop.is_set():
            try:
                await self._one(rng)
            except (httpx.TransportError, ValueError) as exc:  # the API is away: not accepted
                self.refused[type(exc).__name__] += 1
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.02)

    async def _one(self, rng: random.Random) -> None:
        sid = rng.choice(self.vms)
        r = await self.c.client.get(f"/api/v1/servers/{sid}", headers=self.user)
        if r.status_code != 200:
            self.refused[str(r.status_code)] += 1
            return
        server = r.json()
        if server["operstate"] == "DESTROYED":
            self.vms.remove(sid)
            r = await self.c.client.post(
                "/api/v1/servers", headers=self.user, json={"name": "load", "flavor": "tiny", "image": "debian-12"}
            )
            if r.status_code == 202:
                self.vms += [s["id"] for s in r.json()["servers"]]
                self.accepted += [str(j) for j in r.json()["job_ids"]]
            else:
                self.vms.append(sid)
                self.refused[str(r.status_code)] += 1
            return
        if server["task"] is not None:
            return
        choices = self.NEXT.get(server["operstate"], ())
        if rng.random() < 0.08 or not choices:
            r = await self.c.client.delete(f"/api/v1/servers/{sid}", headers=self.user)
        else:
            r = await self.c.client.post(
                f"/api/v1/servers/{sid}/actions", headers=self.user, json={"action": rng.choice(choices)}
            )
        if r.status_code == 202:
            self.accepted.append(r.json()["job_id"])
        else:
            self.refused[str(r.status_code)] += 1


class Faults:
    """The cluster, its services (behind proxies, or real), and the checks of a healed state."""

    def __init__(self, c: Cluster, db: str, pg: Proxy, amqp: Proxy) -> None:
        self.c, self.db, self.pg, self.amqp = c, db, pg, amqp
        self.rows: list[Row] = []

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """Rows of ``query`` on the real database (never through the proxy)."""
        conn = await asyncpg.connect(self.db)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def sql(self, query: str, *args: Any) -> int:
        return int((await self.fetch(query, *args))[0][0])

    async def in_flight(self) -> int:
        return await self.sql(f"SELECT count(*) FROM jobs WHERE status IN {LIVE}")

    async def restart(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.c.kill(name, sig)
        await asyncio.sleep(OUTAGE)
        self.c.spawn(name)

    async def restart_rabbitmq(self) -> None:
        if REAL_RESTART:
            await _run("rabbitmqctl", "stop_app")
            try:
                await asyncio.sleep(OUTAGE)
            finally:  # never leave the shared broker stopped, whatever interrupts the test
                await _run("rabbitmqctl", "start_app")
                await _run("rabbitmqctl", "await_startup")
        else:
            await self.amqp.cut()
            await asyncio.sleep(OUTAGE)
            await self.amqp.start()

    async def restart_postgresql(self) -> None:
        if REAL_RESTART:
            version = sorted(os.listdir("/etc/postgresql"))[-1]
            await _run("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "stop", "-m", "fast")
            try:
                await asyncio.sleep(OUTAGE)
            finally:
                await _run("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start")
        else:
            await self.pg.cut()
            await asyncio.sleep(OUTAGE)
            await self.pg.start()

    async def healed(self) -> tuple[bool, int, int]:
        """(healed?, lost, drift): every job terminal, nothing pending, no drift anywhere."""
        try:
            live = await self.in_flight()
            tasks = await self.sql("SELECT count(*) FROM servers WHERE task IS NOT NULL")
            pending = await self.sql("SELECT count(*) FROM commissions WHERE state = 'pending'")
        except (OSError, asyncpg.PostgresError):
            return False, -1, -1
        if live or tasks or pending:
            return False, live, -1
        try:
            r = await self.c.client.post("/api/v1/admin/reconcile", headers=ADMIN, json={"wait": 5})
        except httpx.TransportError:
            return False, 0, -1
        if r.status_code != 200:
            return False, 0, -1
        report = r.json()
        drift = sum(len(report[k]) for k in (*Report.KINDS, "unreachable_hosts"))
        return drift == 0, 0, drift

    async def converge(self, fault: str, in_flight: int, load: Load, recovered_at: float) -> Row:
        lost, drift = -1, -1
        while time.monotonic() - recovered_at < CONVERGE_WITHIN:
            ok, lost, drift = await self.healed()
            if ok:
                break
            await asyncio.sleep(0.5)
        converged = time.monotonic() - recovered_at
        statuses: Counter[str] = Counter()
        for job_id in load.accepted:
            r = await self.c.client.get(f"/api/v1/jobs/{job_id}", headers=ADMIN)
            statuses[r.json()["status"] if r.status_code == 200 else str(r.status_code)] += 1
        lost_accepted = sum(n for s, n in statuses.items() if s not in ("SUCCESS", "ERROR"))
        row = Row(
            fault,
            in_flight,
            round(converged, 1),
            max(lost, 0) + lost_accepted,
            max(drift, 0),
            len(load.accepted),
            sum(load.refused.values()),
        )
        self.rows.append(row)
        assert lost == 0 and drift == 0 and lost_accepted == 0, (row, statuses, self.c.logs())
        return row

    async def under_load(
        self, fault: str, inject: Callable[[], Awaitable[None]], during: Callable[[Load], Awaitable[None]] | None = None
    ) -> Row:
        user = await new_user(self.c, f"load-{len(self.rows)}", **QUOTA)
        r = await self.c.client.post(
            "/api/v1/servers", headers=user, json={"name": "pool", "flavor": "tiny", "image": "debian-12", "count": VMS}
        )
        assert r.status_code == 202, r.text
        load = Load(self.c, user, [s["id"] for s in r.json()["servers"]])
        load.accepted += [str(j) for j in r.json()["job_ids"]]
        running = asyncio.create_task(load.run())
        await asyncio.sleep(LOAD_BEFORE)
        in_flight = await self.in_flight()
        await inject()
        if during is not None:
            await during(load)
        recovered = time.monotonic()
        await asyncio.sleep(1.0)  # some load after the recovery too
        load.stop.set()
        await running
        return await self.converge(fault, in_flight, load, recovered)

    def table(self) -> str:
        lines = [
            "| fault | actions in flight | convergence (s) | lost | drift | accepted | refused |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r.fault} | {r.in_flight} | {r.converged_s} | {r.lost} | {r.drift} | {r.accepted} | {r.refused} |"
            for r in self.rows
        ]
        return "\n".join(lines)


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert await proc.wait() == 0, argv


@contextlib.asynccontextmanager
async def fault_cluster(pg_template: str, workdir: Path) -> AsyncIterator[Faults]:
    amqp_port = urlsplit(AMQP_URL).port or 5672
    async for url in _pg_database(pg_template):
        real = make_url(url)
        pg, amqp = Proxy(real.port or 5432), Proxy(amqp_port)
        await pg.start()
        await amqp.start()
        behind = real.set(port=pg.port).render_as_string(hide_password=False)
        amqp_url = AMQP_URL.replace(f":{amqp_port}/", f":{amqp.port}/")
        async with production_cluster(behind, workdir, size="64:262144", amqp_url=amqp_url, extra_env=ENV) as c:
            yield Faults(c, real.set(drivername="postgresql").render_as_string(hide_password=False), pg, amqp)


async def test_every_fault_heals_with_nothing_lost(pg_template: str, tmp_path: Path) -> None:
    async with fault_cluster(pg_template, tmp_path) as f:
        c = f.c
        await f.under_load("SIGKILL dispatcher", lambda: f.restart("dispatcher"))
        await f.under_load("SIGKILL agent", lambda: f.restart("host-1"))
        await f.under_load("SIGKILL API", lambda: f.restart("api"))
        await f.under_load("restart RabbitMQ", f.restart_rabbitmq)
        await f.under_load("restart PostgreSQL", f.restart_postgresql)

        # The agent silenced is the one of the host where this phase's VMs are: placement does
        # not promise that a phase's pool lands on both hosts (an outage of an earlier phase can
        # leave one host fuller, and the freer one then takes a whole pool).
        silenced_at: list[datetime] = []
        silent: list[str] = []

        async def silence() -> None:
            busiest = await f.fetch(
                "SELECT host, count(*) AS n FROM servers WHERE host IS NOT NULL AND operstate <> 'DESTROYED'"
                " AND project_id = (SELECT project_id FROM servers ORDER BY created_at DESC LIMIT 1)"
                " GROUP BY host ORDER BY n DESC, host LIMIT 1"
            )
            silent.append(busiest[0]["host"])
            silenced_at.append((await f.fetch("SELECT now()"))[0][0])
            c.procs[silent[0]].send_signal(signal.SIGSTOP)
            # At least one task is pending there: an action on an idle VM of the silent host, sent
            # before the host is found silent (the load's own may all land on busy VMs).
            idle = await f.fetch(
                "SELECT id, operstate FROM servers WHERE host = $1 AND task IS NULL"
                " AND operstate IN ('STARTED', 'STOPPED', 'SUSPENDED') ORDER BY created_at DESC LIMIT 5",
                silent[0],
            )
            wanted = {"STARTED": "reboot", "STOPPED": "start", "SUSPENDED": "resume"}
            for vm in idle:
                r = await c.client.post(
                    f"/api/v1/servers/{vm['id']}/actions", headers=ADMIN, json={"action": wanted[vm["operstate"]]}
                )
                if r.status_code == 202:
                    break

        async def host_down(load: Load) -> None:
            (quiet,) = silent
            (other,) = [h for h in ("host-1", "host-2") if h != quiet]

            async def down() -> bool:
                hosts = (await c.client.get("/api/v1/admin/hosts", headers=ADMIN)).json()["items"]
                return any(h["name"] == quiet and h["state"] == "down" for h in hosts)

            await c.wait_for(f"{quiet} marked down", down, timeout=30)
            # New VMs go to the host that answers.
            r = await c.client.post(
                "/api/v1/servers",
                headers=load.user,
                json={"name": "elsewhere", "flavor": "tiny", "image": "debian-12", "count": 3},
            )
            assert r.status_code == 202, r.text
            assert {s["host"] for s in r.json()["servers"]} == {other}
            load.accepted += [str(j) for j in r.json()["job_ids"]]

            # The silent host's tasks end at their deadline, with a clear error.
            async def ended() -> bool:
                return await f.sql(f"SELECT count(*) FROM jobs WHERE host = '{quiet}' AND status IN {LIVE}") == 0

            await c.wait_for(f"{quiet}'s jobs ended", ended, timeout=DEADLINE * 3)
            # The errors of the silent host's jobs accepted since it went silent that ended at their deadline.
            errors = [
                r["error"]
                for r in await f.fetch(
                    "SELECT error FROM jobs WHERE host = $1 AND status = 'ERROR' AND error LIKE '%deadline%'"
                    " AND created_at >= $2",
                    quiet,
                    silenced_at[0],
                )
            ]
            assert errors, "the silent host had jobs in flight"
            assert all("deadline" in e and f"{quiet} is down" in e for e in errors), errors
            c.procs[quiet].send_signal(signal.SIGCONT)  # it comes back

        try:
            await f.under_load("agent never answers (host down)", silence, during=host_down)
        finally:
            for host in silent:
                c.procs[host].send_signal(signal.SIGCONT)
        print("\n" + f.table())
