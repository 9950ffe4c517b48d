"""A VM's firewall through the API, on both databases: ports opened and closed, the rules its
security groups add, the job that carries the whole set to the host, the task lock, and a VM on
hold whose rules travel with its create job."""

from __future__ import annotations

import uuid
from typing import Any

from app.models import Job, SecurityGroup, SecurityGroupRule, ServerSecurityGroup
from tests.api.helpers import server_in
from tests.conftest import Cloud


async def _change(cloud: Cloud, user: dict[str, str], sid: str, expect: int = 202, **body: Any) -> Any:
    r = await cloud.client.post(f"/api/v1/servers/{sid}/firewall", headers=user, json=body)
    assert r.status_code == expect, r.text
    return r.json()


async def _rules(cloud: Cloud, user: dict[str, str], sid: str) -> list[dict[str, Any]]:
    r = await cloud.client.get(f"/api/v1/servers/{sid}/firewall", headers=user)
    assert r.status_code == 200, r.text
    return r.json()["rules"]  # type: ignore[no-any-return]


async def _job_rules(cloud: Cloud, job_id: str) -> list[dict[str, Any]]:
    async with cloud.sessions() as s:
        job = await s.get(Job, uuid.UUID(job_id))
        assert job is not None
        return list(job.params["rules"] if job.action == "firewall" else job.params["firewall"])


async def test_open_and_close_ports_and_the_job_carries_the_whole_set(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    assert await _rules(cloud, user, vm["id"]) == []  # inbound: nothing but what is opened
    ssh = await _change(cloud, user, vm["id"], open={"protocol": "tcp", "port": 22})
    assert await _job_rules(cloud, ssh["job_id"]) == [
        {"protocol": "tcp", "port_min": 22, "port_max": 22, "cidr": "0.0.0.0/0"}
    ]
    # One job at a time: the task lock.
    busy = await cloud.client.post(
        f"/api/v1/servers/{vm['id']}/firewall", headers=user, json={"open": {"protocol": "icmp"}}
    )
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "TaskPending"
    assert await cloud.finish(ssh["job_id"]) == "applied"
    web = await _change(cloud, user, vm["id"], open={"protocol": "tcp", "port": [8000, 8100], "cidr": "10.0.0.0/8"})
    await cloud.finish(web["job_id"])
    rules = await _rules(cloud, user, vm["id"])
    assert [(r["protocol"], r["port_min"], r["port_max"], r["cidr"], r["source"]) for r in rules] == [
        ("tcp", 22, 22, "0.0.0.0/0", "port"),
        ("tcp", 8000, 8100, "10.0.0.0/8", "port"),
    ]
    # Opening twice changes nothing but sends the set again; closing removes it.
    again = await _change(cloud, user, vm["id"], open={"protocol": "tcp", "port": 22})
    await cloud.finish(again["job_id"])
    assert len(await _rules(cloud, user, vm["id"])) == 2
    closed = await _change(cloud, user, vm["id"], close={"protocol": "tcp", "port": 22})
    assert await _job_rules(cloud, closed["job_id"]) == [
        {"protocol": "tcp", "port_min": 8000, "port_max": 8100, "cidr": "10.0.0.0/8"}
    ]
    await cloud.finish(closed["job_id"])
    # A stopped VM's filter is changed too; a destroyed one has none.
    job = (await cloud.act(user, vm["id"], "stop"))["job_id"]
    await cloud.finish(job)
    stopped = await _change(cloud, user, vm["id"], open={"protocol": "udp", "port": 53})
    await cloud.finish(stopped["job_id"])


async def test_refusals(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    cases = {
        "both": ({"open": {"protocol": "tcp", "port": 1}, "close": {"protocol": "tcp", "port": 1}}, 422),
        "neither": ({}, 422),
        "bad protocol": ({"open": {"protocol": "sctp", "port": 1}}, 422),
        "port 0": ({"open": {"protocol": "tcp", "port": 0}}, 422),
        "range of 3": ({"open": {"protocol": "tcp", "port": [1, 2, 3]}}, 422),
        "no port": ({"open": {"protocol": "tcp"}}, 400),
        "icmp with a port": ({"open": {"protocol": "icmp", "port": 5}}, 400),
        "reversed range": ({"open": {"protocol": "tcp", "port": [90, 80]}}, 400),
        "bad cidr": ({"open": {"protocol": "tcp", "port": 80, "cidr": "10.0.0.300/8"}}, 400),
        "ipv6": ({"open": {"protocol": "tcp", "port": 80, "cidr": "::/0"}}, 400),
        "close what is not open": ({"close": {"protocol": "tcp", "port": 80}}, 404),
    }
    for what, (body, status) in cases.items():
        r = await cloud.client.post(f"/api/v1/servers/{vm['id']}/firewall", headers=user, json=body)
        assert r.status_code == status, (what, r.text)
    stranger = await cloud.user()
    r = await cloud.client.get(f"/api/v1/servers/{vm['id']}/firewall", headers=stranger)
    assert r.status_code == 404


async def test_group_rules_count_and_a_held_vm_gets_its_rules_when_built(cloud: Cloud) -> None:
    user = await cloud.user()
    project = uuid.UUID(user["X-Project"])
    held = await server_in(cloud, user, "HOLD")
    reply = await _change(cloud, user, held["id"], open={"protocol": "tcp", "port": 80})
    assert reply["job_id"] is None  # no host yet
    friend = await server_in(cloud, user, "STARTED")
    async with cloud.sessions() as s:
        web, peers = SecurityGroup(project_id=project, name="web"), SecurityGroup(project_id=project, name="peers")
        s.add_all([web, peers])
        await s.flush()
        s.add_all(
            [
                SecurityGroupRule(group_id=web.id, protocol="tcp", from_port=443, to_port=443, cidr="0.0.0.0/0"),
                SecurityGroupRule(group_id=web.id, protocol="-1", from_port=-1, to_port=-1, source_group=peers.ec2_id),
                ServerSecurityGroup(server_id=uuid.UUID(held["id"]), group_id=web.id),
                ServerSecurityGroup(server_id=uuid.UUID(friend["id"]), group_id=peers.id),
            ]
        )
        await s.commit()
    rules = await _rules(cloud, user, held["id"])
    assert [(r["protocol"], r["port_min"], r["cidr"], r["source"]) for r in rules] == [
        ("tcp", 80, "0.0.0.0/0", "port"),
        ("tcp", 443, "0.0.0.0/0", "group"),
        ("all", -1, f"{friend['addresses'][0]['ip']}/32", "group"),
    ]
    release = (await cloud.act(user, held["id"], "release"))["job_id"]
    async with cloud.sessions() as s:
        job = await s.get(Job, uuid.UUID(release))
        assert job is not None
        assert job.params["firewall"] == [
            {"protocol": r["protocol"], "port_min": r["port_min"], "port_max": r["port_max"], "cidr": r["cidr"]}
            for r in rules
        ]
