"""Every refusal code of API.md's table, in the shape API.md gives, on both databases."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from tests.api.helpers import server_in
from tests.conftest import Cloud


def error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code and body["error"]["message"]
    details: dict[str, Any] = body["error"]["details"]
    return details


async def test_400_bad_request(cloud: Cloud) -> None:
    user = await cloud.user()
    server = await server_in(cloud, user, "STOPPED")
    small = (await cloud.server(user, server["id"]))["flavor_id"]
    r = await cloud.client.post(
        f"/api/v1/servers/{server['id']}/actions", headers=user, json={"action": "resize", "flavor_id": small}
    )
    error(r, 400, "BadRequest")
    r = await cloud.client.post(
        "/api/v1/servers", headers=user, json={"name": "x", "flavor": "nope", "image": "debian-12"}
    )
    assert error(r, 400, "BadRequest")["field"] == "flavor_id"
    r = await cloud.client.post(
        "/api/v1/servers",
        headers=user,
        json={"name": "x", "flavor": "small", "image": "debian-12", "key_name": "nokey"},
    )
    assert error(r, 400, "BadRequest")["field"] == "key_name"
    # A cursor of the documented alphabet that this API never handed out: well-formed, invalid.
    r = await cloud.client.get("/api/v1/servers?cursor=AAAA", headers=user)
    error(r, 400, "BadRequest")
    # Outside the documented alphabet it does not match the schema at all.
    r = await cloud.client.get("/api/v1/servers?cursor=!!notacursor", headers=user)
    error(r, 422, "ValidationError")


async def test_a_missing_field_or_an_unknown_value_is_422(cloud: Cloud) -> None:
    """API.md: a missing field is 422 ValidationError, whichever spelling it has (flavor or
    flavor_id), and a query value outside the schema's list names the valid ones."""
    user = await cloud.user()
    r = await cloud.client.post("/api/v1/servers", headers=user, json={"name": "x", "image": "debian-12"})
    assert "flavor" in error(r, 422, "ValidationError")["errors"][0]["msg"]
    r = await cloud.client.post("/api/v1/servers", headers=user, json={"name": "x", "flavor": "small"})
    assert "image" in error(r, 422, "ValidationError")["errors"][0]["msg"]
    r = await cloud.client.get("/api/v1/servers?operstate=started", headers=user)
    message = error(r, 422, "ValidationError")["errors"][0]["msg"]
    assert all(state in message for state in ("HOLD", "STARTED", "DESTROYED")), message


async def test_401_unauthorized(cloud: Cloud) -> None:
    r = await cloud.client.get("/api/v1/servers")
    error(r, 401, "Unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    error(await cloud.client.get("/api/v1/servers", headers={"Authorization": "Bearer nope"}), 401, "Unauthorized")
    error(
        await cloud.client.get("/api/v1/servers", headers={"Authorization": "Basic Zm9vOmJhcg=="}), 401, "Unauthorized"
    )


async def test_403_forbidden(cloud: Cloud) -> None:
    user = await cloud.user()
    server = await server_in(cloud, user, "STOPPED")
    r = await cloud.client.post(f"/api/v1/servers/{server['id']}/actions", headers=user, json={"action": "migrate"})
    error(r, 403, "Forbidden")
    error(await cloud.client.get("/api/v1/servers?host=host-1", headers=user), 403, "Forbidden")


async def test_404_not_found(cloud: Cloud) -> None:
    user = await cloud.user()
    missing = uuid.uuid4()
    for r in (
        await cloud.client.get(f"/api/v1/servers/{missing}", headers=user),
        await cloud.client.post(f"/api/v1/servers/{missing}/actions", headers=user, json={"action": "start"}),
        await cloud.client.get(f"/api/v1/jobs/{missing}", headers=user),
        await cloud.client.delete("/api/v1/keypairs/none", headers=user),
        await cloud.client.get("/api/v1/no/such/route", headers=user),
    ):
        error(r, 404, "NotFound")


async def test_409_task_pending_and_invalid_state(cloud: Cloud) -> None:
    user = await cloud.user()
    reply = await cloud.create(user)
    sid, job = reply["servers"][0]["id"], reply["job_ids"][0]
    details = error(
        await cloud.client.post(f"/api/v1/servers/{sid}/actions", headers=user, json={"action": "stop"}),
        409,
        "TaskPending",
    )
    assert details == {"task": "BUILD", "job_id": job}
    await cloud.finish(job)
    details = error(
        await cloud.client.post(f"/api/v1/servers/{sid}/actions", headers=user, json={"action": "start"}),
        409,
        "InvalidState",
    )
    assert details == {"operstate": "STARTED", "allowed_from": ["STOPPED"]}
    destroyed = await server_in(cloud, user, "DESTROYED")
    details = error(
        await cloud.client.post(f"/api/v1/servers/{destroyed['id']}/actions", headers=user, json={"action": "start"}),
        409,
        "InvalidState",
    )
    assert details["operstate"] == "DESTROYED"
    # Destroying a destroyed server succeeds and changes nothing (AWS and Nova): the answer names
    # the job that destroyed it, and no new job is made.
    events = (await cloud.client.get(f"/api/v1/servers/{destroyed['id']}/events", headers=user)).json()["items"]
    destroy_job = next(e["job_id"] for e in events if e["action"] == "destroy")
    for again in (
        cloud.client.delete(f"/api/v1/servers/{destroyed['id']}", headers=user),
        cloud.client.post(f"/api/v1/servers/{destroyed['id']}/actions", headers=user, json={"action": "destroy"}),
    ):
        r = await again
        assert r.status_code == 202 and r.json() == {"job_id": destroy_job}, r.text
    after = (await cloud.client.get(f"/api/v1/servers/{destroyed['id']}/events", headers=user)).json()["items"]
    assert len(after) == len(events)


async def test_409_already_exists(cloud: Cloud) -> None:
    user = await cloud.user()
    assert (await cloud.client.post("/api/v1/keypairs", headers=user, json={"name": "k"})).status_code == 201
    error(await cloud.client.post("/api/v1/keypairs", headers=user, json={"name": "k"}), 409, "AlreadyExists")
    await cloud.project(name="dup")
    error(
        await cloud.client.post("/api/v1/admin/projects", headers=cloud.admin, json={"name": "dup"}),
        409,
        "AlreadyExists",
    )


async def test_413_over_limit(cloud: Cloud) -> None:
    user = await cloud.user(vm=2, cpu=10)
    await cloud.create(user)
    r = await cloud.client.post(
        "/api/v1/servers", headers=user, json={"name": "x", "flavor": "small", "image": "debian-12", "count": 2}
    )
    assert error(r, 413, "OverLimit") == {"resource": "vm", "limit": 2, "usage": 1, "pending": 0, "requested": 2}
    # Pending positive deltas count too: a start reserves active_cpu until its result.
    tight = await cloud.user(active_cpu=1, cpu=5, vm=5)
    stopped = await server_in(cloud, tight, "STOPPED")
    await cloud.act(tight, stopped["id"], "start")
    r = await cloud.client.post(
        "/api/v1/servers", headers=tight, json={"name": "x", "flavor": "small", "image": "debian-12"}
    )
    assert error(r, 413, "OverLimit") == {
        "resource": "active_cpu",
        "limit": 1,
        "usage": 0,
        "pending": 1,
        "requested": 1,
    }


async def test_422_validation_error(cloud: Cloud) -> None:
    user = await cloud.user()
    server = await server_in(cloud, user, "STARTED")
    url = f"/api/v1/servers/{server['id']}/actions"
    for r in (
        await cloud.client.post(url, headers=user, json={"action": "explode"}),
        await cloud.client.post(url, headers=user, json={}),
        await cloud.client.post(url, headers=user, json={"action": "save_image"}),
        await cloud.client.post(
            url,
            headers=user,
            content=b"{not json",
        ),
        await cloud.client.post("/api/v1/servers", headers=user, json={"flavor": "small"}),
        await cloud.client.post("/api/v1/servers", headers=user, json={"name": "x", "count": 0}),
        await cloud.client.post("/api/v1/servers", headers=user, json={"name": "x", "surprise": 1}),
        await cloud.client.get("/api/v1/servers/not-a-uuid", headers=user),
        await cloud.client.get("/api/v1/servers?limit=100000", headers=user),
        await cloud.client.post(
            "/api/v1/admin/projects", headers=cloud.admin, json={"name": "q", "quotas": {"gpus": 1}}
        ),
    ):
        details = error(r, 422, "ValidationError")
        assert details["errors"]
    # Validation comes before any state rule: an unknown action on a busy VM is still 422.
    await cloud.act(user, server["id"], "reboot")
    error(await cloud.client.post(url, headers=user, json={"action": "explode"}), 422, "ValidationError")


async def test_503_no_capacity(cloud: Cloud) -> None:
    user = await cloud.user(vm=100, cpu=10**4, active_cpu=10**4, ram=10**8, active_ram=10**8, disk=10**6)
    r = await cloud.client.post(
        "/api/v1/admin/flavors", headers=cloud.admin, json={"name": "huge", "vcpus": 8, "ram_mb": 30000, "disk_gb": 10}
    )
    assert r.status_code == 201 and r.json()["capacity"] == 2
    await cloud.create(user, flavor="huge", count=2)
    r = await cloud.client.post(
        "/api/v1/servers", headers=user, json={"name": "x", "flavor": "huge", "image": "debian-12"}
    )
    error(r, 503, "NoCapacity")
    # All or nothing: nothing of the refused request is left behind.
    listed = (await cloud.client.get("/api/v1/servers", headers=user)).json()["items"]
    assert len(listed) == 2
    r = await cloud.client.post(
        "/api/v1/servers",
        headers=user,
        json={"name": "x", "flavor": "tiny", "image": "debian-12", "zone": "default", "count": 3},
    )
    assert r.status_code == 202
    r = await cloud.client.post(
        "/api/v1/servers", headers=user, json={"name": "x", "flavor": "tiny", "image": "debian-12", "zone": "mars"}
    )
    error(r, 400, "BadRequest")


async def test_what_postgresql_cannot_store_is_a_422_not_a_500(cloud: Cloud) -> None:
    """Found by schemathesis against PostgreSQL: NUL characters and integers past a column's range."""
    user = await cloud.user()
    for r in (
        await cloud.client.post(
            "/api/v1/servers", headers=user, json={"name": "a\u0000b", "flavor": "small", "image": "debian-12"}
        ),
        await cloud.client.post(
            "/api/v1/servers",
            headers=user,
            json={"name": "a", "flavor": "small", "image": "debian-12", "metadata": {"k": "\u0000"}},
        ),
        await cloud.client.get("/api/v1/servers", params={"name": "x\u0000"}, headers=user),
        await cloud.client.delete("/api/v1/keypairs/a%00b", headers=user),
        await cloud.client.post(
            "/api/v1/admin/hosts", headers=cloud.admin, json={"name": "h", "cpus": 4, "ram_mb": 177263041841886}
        ),
        await cloud.client.post(
            "/api/v1/admin/projects", headers=cloud.admin, json={"name": "big", "quotas": {"vm": 2**70}}
        ),
    ):
        assert error(r, 422, "ValidationError")["errors"]


async def test_503_unavailable_while_the_database_is_away(pg_cloud: Cloud) -> None:
    """PostgreSQL restarting or out of reach is a 503 the client may retry, never a 500."""
    from app.db import make_engine, make_sessionmaker
    from tests.procs import free_port

    user = await pg_cloud.user()
    away = make_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nowhere")
    kept, pg_cloud.state.sessions = pg_cloud.state.sessions, make_sessionmaker(away)
    try:
        for method, path in (("GET", "/api/v1/servers"), ("POST", "/api/v1/servers")):
            r = await pg_cloud.client.request(
                method, path, headers=user, json={"name": "x", "flavor": "tiny", "image": "debian-12"}
            )
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "Unavailable" and r.headers["Retry-After"] == "1"
    finally:
        pg_cloud.state.sessions = kept
        await away.dispose()
    assert (await pg_cloud.client.get("/api/v1/servers", headers=user)).status_code == 200
