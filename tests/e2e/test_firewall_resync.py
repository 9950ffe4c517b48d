"""A group's rule changes while one of its members is busy: the idle member's host gets the new
rules at once; the busy one keeps its old rules, reconciliation reports it
(``unsynced_firewall``) once it is idle, and the fix sends them -- driven by boto3 and the admin
API against a whole cloud in this process (agents on libvirt's test driver), on both
transports. The host's side is read from the domains themselves."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.backend.agent import Agent
from app.logic import reconcile
from tests.e2e.inprocess import ADMIN, Cloud, inprocess_cloud


@pytest.fixture(params=["embedded", "production"])
async def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Cloud]:
    # The periodic pass would repair the drift by itself: here the test runs reconciliation.
    async with inprocess_cloud(request, tmp_path, serve_http=True, reconcile_interval=3600) as c:
        yield c


def _agent(cloud: Cloud, host: str) -> Agent:
    return next(a for a in cloud.plane.agents if a.host == host)


async def _enforced(cloud: Cloud, server: dict[str, Any]) -> tuple[int | None, list[tuple[str, int]]]:
    """The generation and (protocol, port) rules the server's host records on its domain."""
    driver = _agent(cloud, server["host"]).driver
    assert driver.conn is not None
    dom = driver.conn.lookupByUUIDString(server["id"])
    rules = driver.rules_of(dom) or []
    return driver.firewall_gen(dom), [(r["protocol"], r["port_min"]) for r in rules]


async def _reconcile(cloud: Cloud, fix: bool) -> dict[str, Any]:
    r = await cloud.client.post("/api/v1/admin/reconcile", headers=ADMIN, json={"fix": fix, "wait": 5})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_a_member_busy_when_its_group_changed_is_repaired_by_reconciliation(cloud: Cloud) -> None:
    user = await cloud.user("fw")
    ec2 = await cloud.ec2(user)
    web = (await asyncio.to_thread(ec2.create_security_group, GroupName="web", Description="web"))["GroupId"]
    ami = (await asyncio.to_thread(ec2.describe_images))["Images"][0]["ImageId"]
    run = await asyncio.to_thread(
        ec2.run_instances, ImageId=ami, InstanceType="tiny", MinCount=2, MaxCount=2, SecurityGroupIds=[web]
    )
    ids = [i["InstanceId"] for i in run["Instances"]]
    servers = (await cloud.client.get("/api/v1/servers", headers=user)).json()["items"]
    idle, busy = sorted((s for s in servers if s["ec2_id"] in ids), key=lambda s: s["ec2_id"])

    async def settled(sid: str, operstate: str) -> dict[str, Any] | None:
        s = await cloud.server(sid)
        return s if s["operstate"] == operstate and s["task"] is None else None

    for s in (idle, busy):
        await cloud.until("STARTED", lambda s=s: settled(s["id"], "STARTED"))
    idle, busy = await cloud.server(idle["id"]), await cloud.server(busy["id"])
    assert await _enforced(cloud, idle) == (0, [])

    # The busy member's stop waits on its host (the agent's lock for that VM is held) while the
    # group gains a rule.
    lock = _agent(cloud, busy["host"])._locks[uuid.UUID(busy["id"])]
    await lock.acquire()
    try:
        stop = await asyncio.to_thread(ec2.stop_instances, InstanceIds=[busy["ec2_id"]])
        assert stop["StoppingInstances"][0]["CurrentState"]["Name"] == "stopping"
        https = {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
        await asyncio.to_thread(ec2.authorize_security_group_ingress, GroupId=web, IpPermissions=[https])

        async def idle_enforces() -> bool:
            return await _enforced(cloud, idle) == (1, [("tcp", 443)])

        await cloud.until("the idle member's new rules", idle_enforces)
        assert (await cloud.server(busy["id"]))["task"] == "STOP"
    finally:
        lock.release()
    await cloud.until("the busy member stopped", lambda: settled(busy["id"], "STOPPED"))
    assert await _enforced(cloud, busy) == (0, [])  # its host still has the old rules

    # A VM changed within reconcile.SETTLE of an inventory is not judged against it.
    await asyncio.sleep(reconcile.SETTLE.total_seconds() + 0.1)
    report = await _reconcile(cloud, fix=False)
    assert [(e["server_id"], e["expected"], e["observed"]) for e in report["unsynced_firewall"]] == [(busy["id"], 1, 0)]
    fixed = await _reconcile(cloud, fix=True)
    assert any(busy["id"] in a and "firewall" in a for a in fixed["actions"]), fixed["actions"]

    async def busy_enforces() -> bool:
        return await _enforced(cloud, busy) == (1, [("tcp", 443)])

    await cloud.until("the repaired member's rules", busy_enforces)
    await cloud.until("the repair job done", lambda: settled(busy["id"], "STOPPED"))
    await asyncio.sleep(reconcile.SETTLE.total_seconds() + 0.1)
    assert (await _reconcile(cloud, fix=False))["unsynced_firewall"] == []
