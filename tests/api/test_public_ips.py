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


async def _created(cloud: Cloud, user: dict[str, str], expect: int = 202, **body: Any) -> Any:
    r = await cloud.client.post(
        "/api/v1/servers", headers=user, json={"name": "vm", "flavor": "small", "image": "debian-12", **body}
    )
    assert r.status_code == expect, r.text
    return r.json()


async def test_a_create_takes_public_ips_and_a_fixed_address(cloud: Cloud) -> None:
    """CC1's ``public_ip`` at create -- a new address per VM under the quota, or one the project
    holds -- and a fixed private address; all or nothing, with the addresses in the create job."""
    await _call(cloud, cloud.admin, "POST", "/api/v1/admin/public-ip-pools", 201, name="edge", cidr="198.51.100.0/29")
    user = await cloud.user(public_ip=4)
    made = await _created(cloud, user, count=2, public_ip=True)
    publics = [s["addresses"][0]["public_ip"] for s in made["servers"]]
    assert publics == ["198.51.100.1", "198.51.100.2"]
    assert (await cloud.quotas(user))["public_ip"]["usage"] == 2
    async with cloud.sessions() as s:
        for server, job_id in zip(made["servers"], made["job_ids"], strict=True):
            job = await s.get(Job, uuid.UUID(job_id))
            assert job is not None
            assert job.params["public_ips"] == [
                {"public": server["addresses"][0]["public_ip"], "private": server["addresses"][0]["ip"]}
            ]
    listed = (await _call(cloud, user, "GET", "/api/v1/public-ips", 200))["items"]
    assert {(p["address"], p["server_id"]) for p in listed} == {
        (s["addresses"][0]["public_ip"], s["id"]) for s in made["servers"]
    }
    # Past the quota: nothing is made (413); past what the pools hold: 409 NetworkFull.
    over = await _created(cloud, user, 413, count=3, public_ip=True)
    assert over["error"]["code"] == "OverLimit"
    assert (await cloud.quotas(user))["public_ip"]["usage"] == 2
    roomy = await cloud.user(public_ip=10)
    full = await _created(cloud, roomy, 409, count=5, public_ip=True)
    assert full["error"]["code"] == "NetworkFull"
    assert (await cloud.quotas(roomy))["public_ip"]["usage"] == 0

    # An address the project holds goes to one VM, once.
    held = await _call(cloud, user, "POST", "/api/v1/public-ips", 201)
    one = (await _created(cloud, user, public_ip=held["id"]))["servers"][0]
    assert one["addresses"][0]["public_ip"] == held["address"]
    assert (await cloud.quotas(user))["public_ip"]["usage"] == 3  # no new unit for it
    assert (await _created(cloud, user, 409, public_ip=held["id"]))["error"]["code"] == "InUse"
    assert (await _created(cloud, user, 400, count=2, public_ip=held["id"]))["error"]["code"] == "BadRequest"
    theirs = await _call(cloud, roomy, "POST", "/api/v1/public-ips", 201)
    assert (await _created(cloud, user, 400, public_ip=theirs["id"]))["error"]["code"] == "BadRequest"

    # A destroyed VM's address is unmapped and stays the project's (as on EC2).
    await cloud.finish(made["job_ids"][0])
    await cloud.finish((await cloud.act(user, made["servers"][0]["id"], "destroy"))["job_id"])
    kept = await _call(cloud, user, "GET", f"/api/v1/public-ips/{listed[0]['id']}", 200)
    assert kept["server_id"] is None and (await cloud.quotas(user))["public_ip"]["usage"] == 3

    # A fixed private address: in the network's range, not its gateway, free, one VM.
    network = (await _call(cloud, user, "GET", "/api/v1/networks", 200))["items"][0]
    base = network["cidr"].rsplit(".", 1)[0]
    fixed = (await _created(cloud, user, fixed_ip=f"{base}.50"))["servers"][0]
    assert fixed["addresses"][0]["ip"] == f"{base}.50"
    assert (await _created(cloud, user, 409, fixed_ip=f"{base}.50"))["error"]["code"] == "InUse"
    for wrong in (f"{base}.1", f"{base}.0", f"{base}.255", "192.0.2.7", "not-an-address"):
        assert (await _created(cloud, user, 400, fixed_ip=wrong))["error"]["code"] == "BadRequest", wrong
    assert (await _created(cloud, user, 400, count=2, fixed_ip=f"{base}.51"))["error"]["code"] == "BadRequest"
