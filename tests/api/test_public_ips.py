"""Public IPs through the API, on both databases: pools, allocation under the public_ip quota,
association carried to the host in a job, refusals, and what a destroy leaves."""

from __future__ import annotations

import uuid
from typing import Any

from app.logic import reconcile
from app.models import Job
from tests.api.helpers import server_in
from tests.conftest import Cloud


async def _call(cloud: Cloud, headers: dict[str, str], method: str, path: str, expect: int, **body: Any) -> Any:
    r = await cloud.client.request(method, path, headers=headers, json=body if method != "GET" else None)
    assert r.status_code == expect, r.text
    return r.json() if r.content else None


async def _mappings(cloud: Cloud, job_id: str) -> list[dict[str, str]]:
    async with cloud.sessions() as s:
        job = await s.get(Job, uuid.UUID(job_id))
        assert job is not None and job.action == "public_ip"
        return list(job.params["mappings"])


async def test_allocate_associate_disassociate_release(cloud: Cloud) -> None:
    await _call(cloud, cloud.admin, "POST", "/api/v1/admin/public-ip-pools", 201, name="edge", cidr="203.0.113.0/30")
    user = await cloud.user()
    first = await _call(cloud, user, "POST", "/api/v1/public-ips", 201)
    second = await _call(cloud, user, "POST", "/api/v1/public-ips", 201, pool="edge")
    assert [first["address"], second["address"]] == ["203.0.113.1", "203.0.113.2"]
    assert first["ec2_id"].startswith("eipalloc-") and first["server_id"] is None
    full = await cloud.client.post("/api/v1/public-ips", headers=user, json={})
    assert full.status_code == 409 and full.json()["error"]["code"] == "NetworkFull"
    assert (await cloud.quotas(user))["public_ip"]["usage"] == 2

    vm = await server_in(cloud, user, "STARTED")
    job = await _call(cloud, user, "POST", f"/api/v1/public-ips/{first['id']}/associate", 202, server_id=vm["id"])
    assert await _mappings(cloud, job["job_id"]) == [{"public": "203.0.113.1", "private": vm["addresses"][0]["ip"]}]
    await cloud.finish(job["job_id"])
    shown = await cloud.server(user, vm["id"])
    assert shown["addresses"][0]["public_ip"] == "203.0.113.1"
    other = await server_in(cloud, user, "STARTED")
    taken = await cloud.client.post(
        f"/api/v1/public-ips/{first['id']}/associate", headers=user, json={"server_id": other["id"]}
    )
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "InUse"
    busy = await cloud.client.delete(f"/api/v1/public-ips/{first['id']}", headers=user)
    assert busy.status_code == 409
    job = await _call(cloud, user, "POST", f"/api/v1/public-ips/{first['id']}/disassociate", 202)
    assert await _mappings(cloud, job["job_id"]) == []
    await cloud.finish(job["job_id"])
    await _call(cloud, user, "DELETE", f"/api/v1/public-ips/{first['id']}", 204)
    assert (await cloud.quotas(user))["public_ip"]["usage"] == 1
    # A destroyed VM's address stays allocated, unmapped.
    job = await _call(cloud, user, "POST", f"/api/v1/public-ips/{second['id']}/associate", 202, server_id=other["id"])
    await cloud.finish(job["job_id"])
    gone = (await cloud.act(user, other["id"], "destroy"))["job_id"]
    await cloud.finish(gone)
    kept = await _call(cloud, user, "GET", f"/api/v1/public-ips/{second['id']}", 200)
    assert kept["server_id"] is None and kept["association_id"] is None
    # Quotas agree with what is held.
    async with cloud.sessions() as s:
        assert (await reconcile.compare(s)).quota_drift == []
    # Another project sees none of it.
    stranger = await cloud.user()
    assert (await cloud.client.get(f"/api/v1/public-ips/{second['id']}", headers=stranger)).status_code == 404


async def test_the_public_ip_quota_and_pool_refusals(cloud: Cloud) -> None:
    await _call(cloud, cloud.admin, "POST", "/api/v1/admin/public-ip-pools", 201, name="big", cidr="198.51.100.0/24")
    for body, status in (
        ({"name": "x", "cidr": "198.51.100.128/25"}, 409),
        ({"name": "big", "cidr": "192.0.2.0/24"}, 409),
        ({"name": "y", "cidr": "fd00::/64"}, 400),
        ({"name": "z", "cidr": "192.0.2.1/24"}, 400),
    ):
        r = await cloud.client.post("/api/v1/admin/public-ip-pools", headers=cloud.admin, json=body)
        assert r.status_code == status, (body, r.text)
    user = await cloud.user(public_ip=1)
    assert (
        await cloud.client.post(
            "/api/v1/admin/public-ip-pools", headers=user, json={"name": "u", "cidr": "192.0.2.0/24"}
        )
    ).status_code == 403
    await _call(cloud, user, "POST", "/api/v1/public-ips", 201)
    over = await cloud.client.post("/api/v1/public-ips", headers=user, json={})
    assert over.status_code == 413 and over.json()["error"]["details"]["resource"] == "public_ip"
    unknown = await cloud.client.post("/api/v1/public-ips", headers=user, json={"pool": "nope"})
    assert unknown.status_code in (400, 413)
