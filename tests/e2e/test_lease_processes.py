"""Leases with separate processes: on PostgreSQL + RabbitMQ two dispatchers sweep at once and
one is killed between the two warnings; embedded (``nephos up``: SQLite, in-memory bus) one
process does it all. Either way every mail goes once and every lease's end runs once. The
admin's command line (leases, capacity, notify-test) is driven against the same cluster."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _pg_database
from tests.e2e.conftest import ADMIN, TOKEN, Cluster, embedded_cluster, production_cluster
from tests.e2e.receivers import Inbox
from tests.procs import free_port, nephos_bin

pytestmark = pytest.mark.slow


def notices(bodies: list[str]) -> Counter[tuple[str, str]]:
    """(heading, server id) of every item of every digest."""
    seen: Counter[tuple[str, str]] = Counter()
    heading = ""
    for body in bodies:
        for line in body.splitlines():
            if line and not line.startswith(" ") and line.endswith(":"):
                heading = line[:-1]
            elif found := re.match(r"  - \S+ \(([0-9a-f-]{36})\)", line):
                seen[(heading, found.group(1))] += 1
    return seen


async def _cli(c: Cluster, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        nephos_bin(),
        "admin",
        *args,
        env={**os.environ, "NEPHOS_API_URL": c.base, "NEPHOS_ADMIN_TOKEN": TOKEN, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    return out.decode()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["embedded", "production"])
async def test_mail_once_and_end_once_with_dispatchers_doubled_and_killed(
    mode: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    inbox = Inbox(free_port())
    inbox.start()
    env = {
        "NEPHOS_SMTP_HOST": "127.0.0.1",
        "NEPHOS_SMTP_PORT": str(inbox.port),
        "NEPHOS_NOTIFY_RETRY": "0.2",
        "NEPHOS_LEASE_INTERVAL": "0.2",
    }
    try:
        if mode == "embedded":
            async with embedded_cluster(tmp_path, extra_env=env) as c:
                await _run(c, inbox)
        else:
            async for url in _pg_database(request.getfixturevalue("pg_template")):
                async with production_cluster(url, tmp_path, dispatchers=2, extra_env=env) as c:
                    await _run(c, inbox)
    finally:
        inbox.stop()


async def _run(c: Cluster, inbox: Inbox) -> None:
    project = (await c.get("/api/v1/lease-policy"))["project_id"]
    r = await c.client.put(
        f"/api/v1/admin/projects/{project}/lease-policy",
        headers=ADMIN,
        json={"duration_s": 14, "warn_before_s": [10, 5], "on_expiry": "stop"},
    )
    assert r.status_code == 200, r.text
    r = await c.client.post(
        "/api/v1/admin/users",
        headers=ADMIN,
        json={"name": "carol", "email": "carol@example.org", "project_id": project},
    )
    user = {"Authorization": f"Bearer {r.json()['token']}"}
    r = await c.client.post(
        "/api/v1/servers", headers=user, json={"name": "leased", "flavor": "tiny", "image": "debian-12", "count": 3}
    )
    assert r.status_code == 202, r.text
    ids = [s["id"] for s in r.json()["servers"]]

    async def first_warnings() -> bool:
        return sum(n for (h, _), n in notices(inbox.bodies()).items() if "10 seconds" in h) >= 3

    await c.wait_for("the first warnings", first_warnings, timeout=30)
    if c.mode == "production":
        # Killed between the two warnings, then back: the second warnings and the ends still go
        # once, the other dispatcher racing it throughout.
        c.kill("dispatcher", signal.SIGKILL)
        await asyncio.sleep(0.5)
        c.spawn("dispatcher")

    # The admin's command line, meanwhile.
    listed = await _cli(c, "leases", "--within", "1")
    assert all(i in listed for i in ids), listed
    capacity = await _cli(c, "capacity")
    assert "tiny" in capacity and "default" in capacity and "fit on empty hosts" in capacity, capacity
    sent = await _cli(c, "notify-test", "--to", "ops@example.org")
    assert "ops@example.org" in sent

    async def all_stopped() -> bool:
        servers = [await c.get(f"/api/v1/servers/{i}") for i in ids]
        return all(s["operstate"] == "STOPPED" and s["task"] is None for s in servers)

    await c.wait_for("every lease's end", all_stopped, timeout=60)

    async def all_mailed() -> bool:
        return len(notices(inbox.bodies())) >= 9

    await c.wait_for("every notice", all_mailed, timeout=30)
    await asyncio.sleep(2.0)  # time for a duplicate, were there one
    seen = notices(inbox.bodies())
    for server_id in ids:
        for heading in (
            "Leases ending in 10 seconds",
            "Leases ending in 5 seconds",
            "Servers that were stopped at their lease's end",
        ):
            assert seen[(heading, server_id)] == 1, (heading, server_id, inbox.bodies())
        events: list[dict[str, Any]] = (await c.get(f"/api/v1/servers/{server_id}/events"))["items"]
        kinds = Counter(e["kind"] for e in events)
        assert kinds["lease_action"] == 1 and kinds["lease_warning"] == 2, kinds
    assert "ops@example.org" in [m["To"] for m in inbox.messages]
    usage = {k: v["usage"] for k, v in (await c.get("/api/v1/quotas")).items()}
    assert usage["vm"] >= 3 and usage["active_cpu"] == 0, usage
