"""``Idempotency-Key`` on creating POSTs."""

from __future__ import annotations

import asyncio

import sqlalchemy as sa

from app.models import Server
from tests.conftest import Cloud

BODY = {"name": "idem", "flavor": "small", "image": "debian-12"}


async def _servers(cloud: Cloud) -> int:
    async with cloud.sessions() as s:
        return int((await s.execute(sa.select(sa.func.count()).select_from(Server))).scalar_one())


async def test_same_key_same_body_replays(cloud: Cloud) -> None:
    user = await cloud.user()
    headers = {**user, "Idempotency-Key": "k-1"}
    first = await cloud.client.post("/api/v1/servers", headers=headers, json=BODY)
    again = await cloud.client.post("/api/v1/servers", headers=headers, json=dict(reversed(BODY.items())))
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert await _servers(cloud) == 1
    assert (await cloud.quotas(user))["vm"]["usage"] == 1


async def test_same_key_other_body_conflicts(cloud: Cloud) -> None:
    user = await cloud.user()
    headers = {**user, "Idempotency-Key": "k-2"}
    assert (await cloud.client.post("/api/v1/servers", headers=headers, json=BODY)).status_code == 202
    r = await cloud.client.post("/api/v1/servers", headers=headers, json={**BODY, "name": "other"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "IdempotencyConflict"
    # The key is the caller's own: another user may use the same string.
    other = {**(await cloud.user()), "Idempotency-Key": "k-2"}
    assert (await cloud.client.post("/api/v1/servers", headers=other, json=BODY)).status_code == 202


async def test_concurrent_same_key_creates_once(cloud: Cloud) -> None:
    user = await cloud.user()
    headers = {**user, "Idempotency-Key": "race"}
    replies = await asyncio.gather(
        *(cloud.client.post("/api/v1/servers", headers=headers, json=BODY) for _ in range(8))
    )
    assert {r.status_code for r in replies} == {202}
    assert len({r.text for r in replies}) == 1
    assert await _servers(cloud) == 1
    assert (await cloud.quotas(user))["vm"]["usage"] == 1


async def test_refusals_are_not_recorded(cloud: Cloud) -> None:
    user = await cloud.user(vm=0)
    headers = {**user, "Idempotency-Key": "k-3"}
    assert (await cloud.client.post("/api/v1/servers", headers=headers, json=BODY)).status_code == 413
    r = await cloud.client.patch(
        f"/api/v1/admin/projects/{user['X-Project']}", headers=cloud.admin, json={"quotas": {"vm": 5}}
    )
    assert r.status_code == 200 and r.json()["quotas"]["vm"]["limit"] == 5
    assert (await cloud.client.post("/api/v1/servers", headers=headers, json=BODY)).status_code == 202


async def test_keys_on_actions_and_other_creations(cloud: Cloud) -> None:
    user = await cloud.user()
    h = {**user, "Idempotency-Key": "kp"}
    a = await cloud.client.post("/api/v1/keypairs", headers=h, json={"name": "mine"})
    b = await cloud.client.post("/api/v1/keypairs", headers=h, json={"name": "mine"})
    assert a.status_code == b.status_code == 201 and a.json() == b.json() and a.json()["private_key"]
    server = (await cloud.create(user))["servers"][0]
    reply = await cloud.create(user)
    await cloud.finish(reply["job_ids"][0])
    sid = reply["servers"][0]["id"]
    h = {**user, "Idempotency-Key": "stop-once"}
    url = f"/api/v1/servers/{sid}/actions"
    a = await cloud.client.post(url, headers=h, json={"action": "stop"})
    b = await cloud.client.post(url, headers=h, json={"action": "stop"})
    assert a.status_code == b.status_code == 202 and a.json() == b.json()
    assert server["id"] != sid
