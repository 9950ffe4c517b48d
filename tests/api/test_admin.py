"""Admin routes: projects and quotas, users, hosts, flavors, images; health."""

from __future__ import annotations

from tests.api.helpers import server_in
from tests.conftest import Cloud


async def test_projects_and_users(cloud: Cloud) -> None:
    project = await cloud.project(name="acme", vm=3, cpu=6)
    assert project["quotas"]["vm"] == {"limit": 3, "usage": 0, "pending": 0}
    assert project["quotas"]["ram"]["limit"] == 81920  # default for what was not given
    r = await cloud.client.patch(
        f"/api/v1/admin/projects/{project['id']}", headers=cloud.admin, json={"name": "acme-2", "quotas": {"vm": 4}}
    )
    assert r.status_code == 200 and r.json()["name"] == "acme-2" and r.json()["quotas"]["vm"]["limit"] == 4
    assert r.json()["quotas"]["cpu"]["limit"] == 6
    got = await cloud.client.get(f"/api/v1/admin/projects/{project['id']}", headers=cloud.admin)
    assert got.json()["name"] == "acme-2"
    names = [p["name"] for p in (await cloud.client.get("/api/v1/admin/projects", headers=cloud.admin)).json()["items"]]
    assert names == ["default", "acme-2"]
    r = await cloud.client.post(
        "/api/v1/admin/users", headers=cloud.admin, json={"name": "ann", "email": "a@x", "project_id": project["id"]}
    )
    assert r.status_code == 201 and r.json()["token"].startswith("nph_") and r.json()["role"] == "user"
    users = (await cloud.client.get("/api/v1/admin/users", headers=cloud.admin)).json()["items"]
    assert [u["name"] for u in users] == ["admin", "ann"] and all(u["token"] is None for u in users)
    r = await cloud.client.post(
        "/api/v1/admin/users",
        headers=cloud.admin,
        json={"name": "x", "project_id": "00000000-0000-0000-0000-000000000000"},
    )
    assert r.status_code == 400
    second_admin = await cloud.user(project_id=project["id"], role="admin")
    assert (await cloud.client.get("/api/v1/admin/hosts", headers=second_admin)).status_code == 200


async def test_hosts_register_disable_and_placement(cloud: Cloud) -> None:
    hosts = (await cloud.client.get("/api/v1/admin/hosts", headers=cloud.admin)).json()["items"]
    assert [(h["name"], h["state"], h["cpus"], h["ram_mb"], h["used_cpus"]) for h in hosts] == [
        ("host-1", "up", 16, 32768, 0),
        ("host-2", "up", 16, 32768, 0),
    ]
    r = await cloud.client.post(
        "/api/v1/admin/hosts", headers=cloud.admin, json={"name": "edge-1", "zone": "edge", "cpus": 4, "ram_mb": 4096}
    )
    assert r.status_code == 201 and r.json()["zone"] == "edge"
    zones = {z["name"]: z for z in (await cloud.client.get("/api/v1/zones", headers=cloud.admin)).json()["items"]}
    assert zones["edge"]["hosts"] == 1
    user = await cloud.user()
    placed = (await cloud.create(user, zone="edge"))["servers"][0]
    assert placed["host"] == "edge-1" and placed["zone"] == "edge"
    r = await cloud.client.patch("/api/v1/admin/hosts/edge-1", headers=cloud.admin, json={"state": "disabled"})
    assert r.status_code == 200 and r.json()["state"] == "disabled"
    r = await cloud.client.post(
        "/api/v1/servers", headers=user, json={"name": "x", "flavor": "small", "image": "debian-12", "zone": "edge"}
    )
    assert r.status_code == 503
    assert (
        await cloud.client.patch("/api/v1/admin/hosts/nope", headers=cloud.admin, json={"state": "up"})
    ).status_code == 404
    # Placement weighs by free RAM: with host-1 busier, the next VM goes to host-2.
    busy = (await cloud.create(user, flavor="large"))["servers"][0]["host"]
    nxt = (await cloud.create(user, flavor="small"))["servers"][0]["host"]
    assert {busy, nxt} == {"host-1", "host-2"}


async def test_flavors_images_and_health(cloud: Cloud) -> None:
    r = await cloud.client.post("/api/v1/admin/images", headers=cloud.admin, json={"name": "alpine"})
    assert r.status_code == 201 and r.json()["is_public"]
    private = await cloud.client.post(
        "/api/v1/admin/images", headers=cloud.admin, json={"name": "secret-img", "is_public": False}
    )
    user = await cloud.user()
    names = {i["name"] for i in (await cloud.client.get("/api/v1/images", headers=user)).json()["items"]}
    assert names == {"debian-12", "ubuntu-24.04", "alpine"}
    assert private.json()["name"] not in names
    r = await cloud.client.post(
        "/api/v1/servers", headers=user, json={"name": "x", "flavor": "small", "image_id": private.json()["id"]}
    )
    assert r.status_code == 400
    r = await cloud.client.post(
        "/api/v1/admin/flavors", headers=cloud.admin, json={"name": "xl", "vcpus": 8, "ram_mb": 16384, "disk_gb": 160}
    )
    assert r.status_code == 201 and r.json()["capacity"] == 4
    health = await cloud.client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"database": "ok", "bus": "ok", "hosts_up": 2}


async def test_save_image_makes_a_private_image(cloud: Cloud) -> None:
    server = await server_in(cloud, cloud.admin, "STARTED")
    job = (await cloud.act(cloud.admin, server["id"], "save_image", image_name="golden"))["job_id"]
    names = {i["name"]: i for i in (await cloud.client.get("/api/v1/images", headers=cloud.admin)).json()["items"]}
    assert names["golden"]["status"] == "saving" and not names["golden"]["is_public"]
    await cloud.finish(job)
    names = {i["name"]: i for i in (await cloud.client.get("/api/v1/images", headers=cloud.admin)).json()["items"]}
    assert names["golden"]["status"] == "active" and names["golden"]["source_server_id"] == server["id"]
    reply = await cloud.create(cloud.admin, image="golden")
    assert reply["servers"][0]["image_id"] == names["golden"]["id"]
