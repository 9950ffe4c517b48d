"""Faults against real processes on PostgreSQL + RabbitMQ: nothing accepted is lost."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import _pg_database
from tests.e2e.conftest import Cluster, production_cluster
from tests.e2e.test_lifecycle import new_user
from tests.procs import Proxy

pytestmark = pytest.mark.slow

HUGE = {"vm": 1000, "cpu": 10**4, "ram": 10**8, "disk": 10**6, "active_cpu": 10**4, "active_ram": 10**8}


async def all_settled(c: Cluster, user: dict[str, str], n: int, state: str, timeout: float = 120) -> list[Any]:
    async def settled() -> list[Any] | None:
        r = await c.client.get("/api/v1/servers?limit=1000", headers=user)
        items = r.json()["items"]
        done = [s for s in items if s["task"] is None and s["operstate"] == state]
        return items if len(done) == n == len(items) else None

    return await c.wait_for(f"{n} servers {state}", settled, timeout)  # type: ignore[no-any-return]


async def exact_usage(c: Cluster, user: dict[str, str], vms: int, active: bool = True) -> None:
    q = (await c.client.get("/api/v1/quotas", headers=user)).json()
    assert all(v["pending"] == 0 for v in q.values()), q
    assert q["vm"]["usage"] == vms and q["ram"]["usage"] == vms * 512
    assert q["active_cpu"]["usage"] == (vms if active else 0)


@pytest.fixture
async def big_cluster(pg_template: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    async for url in _pg_database(pg_template):
        async with production_cluster(url, tmp_path, size="64:262144") as c:
            yield c


async def test_dispatcher_killed_with_200_jobs_in_flight(big_cluster: Cluster) -> None:
    c = big_cluster
    user = await new_user(c, **HUGE)
    body = {"name": "k", "flavor": "tiny", "image": "debian-12", "count": 100}
    replies = await asyncio.gather(*(c.client.post("/api/v1/servers", headers=user, json=body) for _ in range(2)))
    assert [r.status_code for r in replies] == [202, 202]
    c.kill("dispatcher", signal.SIGKILL)  # results pile up unapplied, some half-handled
    await asyncio.sleep(2)
    c.spawn("dispatcher")
    servers = await all_settled(c, user, 200, "STARTED")
    assert {s["host"] for s in servers} == {"host-1", "host-2"}
    job_ids = [j for r in replies for j in r.json()["job_ids"]]
    statuses = Counter([(await c.get(f"/api/v1/jobs/{j}"))["status"] for j in job_ids])
    assert statuses == {"SUCCESS": 200}
    await exact_usage(c, user, 200)
    # Each job applied once: one success event per job.
    sample = servers[:20]
    for s in sample:
        events = (await c.client.get(f"/api/v1/servers/{s['id']}/events", headers=user)).json()["items"]
        assert [e["kind"] for e in events].count("job_succeeded") == 1


async def test_jobs_committed_while_the_broker_is_down_are_delivered_when_it_is_back(
    pg_template: str, tmp_path: Path
) -> None:
    proxy = Proxy()
    await proxy.start()
    async for url in _pg_database(pg_template):
        async with production_cluster(url, tmp_path, amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/") as c:
            user = await new_user(c)
            await proxy.cut()  # the broker is gone for every Nephos process
            r = await c.client.post(
                "/api/v1/servers",
                headers=user,
                json={"name": "late", "flavor": "tiny", "image": "debian-12", "count": 3},
            )
            assert r.status_code == 202, r.text  # committed: the API does not need the broker
            for job_id in r.json()["job_ids"]:
                assert (await c.get(f"/api/v1/jobs/{job_id}"))["status"] == "PENDING"
            await asyncio.sleep(2)
            await proxy.start()  # the broker is back; connections recover by themselves
            await all_settled(c, user, 3, "STARTED", timeout=60)
            for job_id in r.json()["job_ids"]:
                assert (await c.get(f"/api/v1/jobs/{job_id}"))["status"] == "SUCCESS"
            await exact_usage(c, user, 3)


async def test_two_dispatchers_and_two_apis_keep_every_rule(pg_template: str, tmp_path: Path) -> None:
    async for url in _pg_database(pg_template):
        async with production_cluster(url, tmp_path, dispatchers=2, apis=2, size="64:262144") as c:
            second = httpx.AsyncClient(base_url=c.bases["api-2"], timeout=30)
            await c.wait_for("the second API", lambda second=second: _healthy(second))
            user = await new_user(c, **HUGE)
            apis = [c.client, second]
            body = {"name": "two", "flavor": "tiny", "image": "debian-12", "count": 20}
            replies = await asyncio.gather(*(api.post("/api/v1/servers", headers=user, json=body) for api in apis))
            assert [r.status_code for r in replies] == [202, 202]
            servers = await all_settled(c, user, 40, "STARTED")
            # 20 concurrent stops of one VM, spread over both APIs: one wins.
            target = servers[0]["id"]
            stops = await asyncio.gather(
                *(
                    apis[i % 2].post(f"/api/v1/servers/{target}/actions", headers=user, json={"action": "stop"})
                    for i in range(20)
                )
            )
            assert Counter(r.status_code for r in stops) == {202: 1, 409: 19}
            # Everything else stops through alternating APIs.
            others = [s["id"] for s in servers[1:]]
            acks = await asyncio.gather(
                *(
                    apis[i % 2].post(f"/api/v1/servers/{sid}/actions", headers=user, json={"action": "stop"})
                    for i, sid in enumerate(others)
                )
            )
            assert {r.status_code for r in acks} == {202}
            await all_settled(c, user, 40, "STOPPED")
            await exact_usage(c, user, 40, active=False)
            for s in servers[:10]:
                events = (await c.client.get(f"/api/v1/servers/{s['id']}/events", headers=user)).json()["items"]
                kinds = [e["kind"] for e in events]
                assert kinds.count("job_succeeded") == 2 and "out_of_band" not in kinds, kinds
            await second.aclose()


async def _healthy(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/healthz")).status_code == 200
    except httpx.TransportError:
        return False
