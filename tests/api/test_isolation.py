"""Project isolation and roles, over every route the app has (enumerated, not listed by hand)."""

from __future__ import annotations

import pytest

from app.api.app import create_app
from tests.api.helpers import server_in
from tests.conftest import Cloud

# From the OpenAPI document: every route it documents is checked here.
ROUTES = [(m.upper(), path) for path, ops in create_app().openapi()["paths"].items() for m in sorted(ops)]
PUBLIC = {"/healthz"}
BODIES = {
    "/api/v1/servers/{server_id}/actions": {"action": "stop"},
    "/api/v1/servers/{server_id}": {"name": "stolen"},
    "/api/v1/servers/{server_id}/lease": {},
    "/api/v1/servers/{server_id}/schedule": {"action": "destroy", "at": "2030-01-01T00:00:00Z"},
    "/api/v1/servers/{server_id}/firewall": {"open": {"protocol": "tcp", "port": 22}},
}


def _fill(path: str, server_id: str) -> str:
    return (
        path.replace("{server_id}", server_id)
        .replace("{job_id}", server_id)
        .replace("{project_id}", server_id)
        .replace("{schedule_id}", server_id)
        .replace("{name}", "host-1")
        .replace("{access_key}", "AKIAXXXXXXXXXXXXXXXX")
    )


async def test_other_projects_server_is_404_on_every_server_route(cloud: Cloud) -> None:
    owner = await cloud.user()
    intruder = await cloud.user()
    server = await server_in(cloud, owner, "STARTED")
    job = (await cloud.act(owner, server["id"], "reboot"))["job_id"]
    routes = [(m, p) for m, p in ROUTES if "{server_id}" in p]
    assert len(routes) >= 5
    for method, path in routes:
        r = await cloud.client.request(
            method,
            _fill(path, server["id"]),
            headers=intruder,
            json=BODIES.get(path, {"action": "stop"} if method == "POST" else None),
        )
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "NotFound"
    r = await cloud.client.get(f"/api/v1/jobs/{job}", headers=intruder)
    assert r.status_code == 404
    # Asking for every project's servers is the admin's: a user is told so, not silently ignored.
    r = await cloud.client.get("/api/v1/servers?all_projects=true", headers=intruder)
    assert r.status_code == 403 and r.json()["error"]["code"] == "Forbidden"
    # And nothing happened to it.
    assert (await cloud.server(owner, server["id"]))["name"] == server["name"]


async def test_every_admin_route_is_403_for_users(cloud: Cloud) -> None:
    user = await cloud.user()
    routes = [(m, p) for m, p in ROUTES if p.startswith("/api/v1/admin")]
    assert len(routes) >= 10
    for method, path in routes:
        r = await cloud.client.request(
            method,
            _fill(path, "00000000-0000-0000-0000-000000000000"),
            headers=user,
            json={} if method in ("POST", "PATCH") else None,
        )
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["error"]["code"] == "Forbidden"


@pytest.mark.parametrize(("method", "path"), [rp for rp in ROUTES if rp[1] not in PUBLIC])
async def test_no_token_is_401(cloud: Cloud, method: str, path: str) -> None:
    r = await cloud.client.request(method, _fill(path, "00000000-0000-0000-0000-000000000000"))
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "Unauthorized"
