"""End to end, through the HTTP API, on both clusters: every action on real agents.

After each step the operstate, task, job, events and quota usage are what DESIGN.md says.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.api.helpers import MEDIUM, SMALL, expected_usage
from tests.e2e.conftest import ADMIN, HOSTS, Cluster
from tests.procs import nephos_bin

BIG = {"vm": 10, "cpu": 100, "ram": 10**6, "disk": 10**4, "active_cpu": 100, "active_ram": 10**6}


async def new_user(c: Cluster, name: str = "e2e", **quotas: int) -> dict[str, str]:
    r = await c.client.post("/api/v1/admin/projects", headers=ADMIN, json={"name": name, "quotas": quotas or BIG})
    assert r.status_code == 201, r.text
    r = await c.client.post("/api/v1/admin/users", headers=ADMIN, json={"name": "u", "project_id": r.json()["id"]})
    return {"Authorization": f"Bearer {r.json()['token']}"}


async def step(
    c: Cluster, headers: dict[str, str], sid: str, action: str, expect: str, **extra: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run an action, wait for its job, check the server is idle in ``expect``."""
    r = await c.client.post(f"/api/v1/servers/{sid}/actions", headers=headers, json={"action": action, **extra})
    assert r.status_code in (200, 202), r.text
    job = await c.job_done(r.json()["job_id"])
    assert job["status"] == "SUCCESS", (action, job, c.logs())
    server = await c.idle(sid)
    assert server["operstate"] == expect, (action, server)
    return server, r.json()


async def usage(c: Cluster, headers: dict[str, str]) -> dict[str, int]:
    r = await c.client.get("/api/v1/quotas", headers=headers)
    q = r.json()
    assert all(v["pending"] == 0 for v in q.values()), q
    return {k: v["usage"] for k, v in q.items()}


async def test_every_action_end_to_end(cluster: Cluster) -> None:
    c = cluster
    user = await new_user(c)
    r = await c.client.post(
        "/api/v1/servers",
        headers=user,
        json={"name": "e2e", "flavor": "small", "image": "debian-12", "user_data": "#!/bin/sh"},
    )
    assert r.status_code == 202, r.text
    sid, job_id = r.json()["servers"][0]["id"], r.json()["job_ids"][0]
    assert (await c.job_done(job_id))["status"] == "SUCCESS"
    server = await c.idle(sid)
    assert server["operstate"] == "STARTED" and server["host"] in HOSTS
    assert await usage(c, user) == expected_usage("STARTED")

    await step(c, user, sid, "stop", "STOPPED")
    assert await usage(c, user) == expected_usage("STOPPED")
    await step(c, user, sid, "start", "STARTED")
    assert await usage(c, user) == expected_usage("STARTED")
    await step(c, user, sid, "reboot", "STARTED", hard=True)
    await step(c, user, sid, "reboot", "STARTED")
    await step(c, user, sid, "suspend", "SUSPENDED")
    assert await usage(c, user) == expected_usage("SUSPENDED")
    await step(c, user, sid, "resume", "STARTED")
    await step(c, user, sid, "stop", "STOPPED")
    server, _ = await step(c, user, sid, "resize", "STOPPED", flavor="medium")
    flavors = {f["name"]: f["id"] for f in (await c.get("/api/v1/flavors"))["items"]}
    assert server["flavor_id"] == flavors["medium"]
    assert await usage(c, user) == expected_usage("STOPPED", MEDIUM)

    source = server["host"]
    server, _ = await step(c, ADMIN, sid, "migrate", "STOPPED")
    assert server["host"] != source and server["host"] in HOSTS
    await step(c, user, sid, "start", "STARTED")
    server, _ = await step(c, ADMIN, sid, "live_migrate", "STARTED", host=source)
    assert server["host"] == source
    assert await usage(c, user) == expected_usage("STARTED", MEDIUM)
    hosts = {h["name"]: h for h in (await c.get("/api/v1/admin/hosts"))["items"]}
    assert hosts[source]["used_cpus"] == MEDIUM[0] and sum(h["used_cpus"] for h in hosts.values()) == MEDIUM[0]

    _, console = await step(c, user, sid, "console", "STARTED")
    assert console["host"] == source and console["port"] >= 5900 and console["password"]

    await step(c, user, sid, "save_image", "STOPPED", image_name="golden")
    images = {i["name"]: i for i in (await c.client.get("/api/v1/images", headers=user)).json()["items"]}
    assert images["golden"]["status"] == "active" and images["golden"]["source_server_id"] == sid

    r = await c.client.delete(f"/api/v1/servers/{sid}", headers=user)
    assert (await c.job_done(r.json()["job_id"]))["status"] == "SUCCESS"
    server = await c.idle(sid)
    assert server["operstate"] == "DESTROYED"
    assert await usage(c, user) == expected_usage("DESTROYED")
    assert all(h["used_cpus"] == 0 for h in (await c.get("/api/v1/admin/hosts"))["items"])

    events = (await c.client.get(f"/api/v1/servers/{sid}/events?limit=1000", headers=user)).json()["items"]
    kinds = [e["kind"] for e in events]
    assert kinds.count("action") == kinds.count("job_started") == kinds.count("job_succeeded") == 15
    assert "out_of_band" not in kinds and "job_failed" not in kinds


async def test_a_failing_job_reports_libvirts_error(cluster: Cluster) -> None:
    c = cluster
    r = await c.client.post(
        "/api/v1/admin/flavors", headers=ADMIN, json={"name": "wide", "vcpus": 40, "ram_mb": 2048, "disk_gb": 20}
    )
    assert r.status_code == 201
    user = await new_user(c)
    r = await c.client.post(
        "/api/v1/servers", headers=user, json={"name": "f", "flavor": "small", "image": "debian-12"}
    )
    sid = r.json()["servers"][0]["id"]
    await c.job_done(r.json()["job_ids"][0])
    await step(c, user, sid, "stop", "STOPPED")
    before = await usage(c, user)
    r = await c.client.post(f"/api/v1/servers/{sid}/actions", headers=user, json={"action": "resize", "flavor": "wide"})
    assert r.status_code == 202
    job = await c.job_done(r.json()["job_id"])
    assert job["status"] == "ERROR" and "exceeds maximum" in job["error"]
    server = await c.idle(sid)
    assert server["operstate"] == "STOPPED" and server["flavor_id"] != r.json()
    assert await usage(c, user) == before == expected_usage("STOPPED", SMALL)
    hosts = {h["name"]: h for h in (await c.get("/api/v1/admin/hosts"))["items"]}
    assert hosts[server["host"]]["used_cpus"] == 1  # the resize's reservation was given back


async def test_admin_reconcile_command(prod_cluster: Cluster) -> None:
    """``nephos admin reconcile`` asks the live hosts for inventories and prints the report."""
    c = prod_cluster
    user = await new_user(c)
    r = await c.client.post("/api/v1/servers", headers=user, json={"name": "r", "flavor": "tiny", "image": "debian-12"})
    await c.job_done(r.json()["job_ids"][0])
    run = await asyncio.create_subprocess_exec(
        nephos_bin(),
        "admin",
        "reconcile",
        "--wait",
        "20",
        env=c.env,
        cwd=c.workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await run.communicate())[0].decode()
    assert run.returncode == 0, out
    assert "reconciliation (dry run)" in out and "no fresh inventory" not in out
    for kind in ("stale", "orphans", "unsynced_operstate", "quota_drift"):
        assert f"│ {kind}" in out.replace("┃", "│")
