"""Load in one project: concurrent creates, actions and results end with no 5xx.

Creates move usage in the accepting transaction (their commissions are accepted at once) while
results applied by the dispatcher move the same project's usage rows; start/stop are accepted
against a project lock. Every such transaction takes the quota rows in one order, and a
deadlock or serialization failure that the database still reports is retried whole, so no
client ever sees a 500 (or, once retries run out, a 503 with Retry-After, never an
InternalError).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.logic.results import apply_result
from app.settings import HostSpec
from tests.conftest import Cloud, start_cloud, stop_cloud

ROUNDS = 5
WIDTH = 40


async def _finish(cloud: Cloud, job_id: str) -> None:
    async with cloud.sessions() as session:
        await apply_result(session, job_id=uuid.UUID(job_id), success=True)
        await session.commit()


@pytest.fixture
async def roomy(db_url: str) -> AsyncIterator[Cloud]:
    cloud, manager = await start_cloud(
        db_url, hosts=[HostSpec("roomy-1", 4096, 4 * 10**6), HostSpec("roomy-2", 4096, 4 * 10**6)]
    )
    yield cloud
    await stop_cloud(cloud, manager)


async def test_creates_actions_and_results_in_one_project_never_5xx(roomy: Cloud) -> None:
    cloud = roomy
    big = {"vm": 10**4, "cpu": 10**5, "ram": 10**8, "disk": 10**7, "active_cpu": 10**5, "active_ram": 10**8}
    user = await cloud.user(**big)
    rng = random.Random(9)
    codes: Counter[int] = Counter()
    kinds: Counter[str] = Counter()

    def count(r: httpx.Response) -> None:
        codes[r.status_code] += 1
        if r.status_code >= 400:
            kinds[f"{r.status_code} {r.json()['error']['code']}"] += 1

    pending_jobs: list[str] = []
    servers: dict[str, str] = {}  # id -> operstate we expect after its pending job

    async def create() -> None:
        r = await cloud.client.post(
            "/api/v1/servers", headers=user, json={"name": "load", "flavor": "tiny", "image": "debian-12"}
        )
        count(r)
        if r.status_code == 202:
            body: dict[str, Any] = r.json()
            pending_jobs.extend(body["job_ids"])
            for s in body["servers"]:
                servers[s["id"]] = "STARTED"

    async def act(server_id: str) -> None:
        action = "stop" if servers[server_id] == "STARTED" else "start"
        r = await cloud.client.post(f"/api/v1/servers/{server_id}/actions", headers=user, json={"action": action})
        count(r)
        if r.status_code == 202:
            pending_jobs.append(r.json()["job_id"])
            servers[server_id] = "STOPPED" if action == "stop" else "STARTED"

    async def finish(job_id: str) -> None:
        await _finish(cloud, job_id)

    for _ in range(ROUNDS):
        work = [create() for _ in range(WIDTH // 2)]
        work += [act(sid) for sid in rng.sample(sorted(servers), min(len(servers), WIDTH // 2))]
        jobs, pending_jobs[:] = list(pending_jobs), []
        work += [finish(j) for j in jobs]
        rng.shuffle(work)
        await asyncio.gather(*work)
    await asyncio.gather(*(finish(j) for j in pending_jobs))

    assert not [c for c in codes if c >= 500], kinds
    assert codes[202] > ROUNDS * WIDTH // 2
    # The invariant held all along: with no task pending, usage is what the VMs count.
    listed = (await cloud.client.get("/api/v1/servers?limit=1000", headers=user)).json()["items"]
    assert all(s["task"] is None for s in listed)
    q = await cloud.quotas(user)
    started = sum(1 for s in listed if s["operstate"] == "STARTED")
    assert q["vm"]["usage"] == len(listed) and q["active_cpu"]["usage"] == started
    assert all(v["pending"] == 0 for v in q.values())
