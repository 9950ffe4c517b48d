"""The first run, tried as a new user would: what Swagger's "Try it out" sends works, refusals
say the right thing, events tell the real states, and the bootstrap token rotates."""

from __future__ import annotations

from typing import Any

from app.logic import bootstrap
from tests.api.helpers import server_in, statements_sent
from tests.conftest import ADMIN_TOKEN, Cloud


def _examples(spec: dict[str, Any], schema: dict[str, Any]) -> list[Any]:
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    found = list(schema.get("examples", []))
    for branch in schema.get("oneOf", []) + schema.get("anyOf", []):
        found += _examples(spec, branch)
    return found


async def test_every_request_body_carries_an_example_and_the_create_example_works(cloud: Cloud) -> None:
    spec = (await cloud.client.get("/openapi.json")).json()
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            body = op.get("requestBody")
            if body is None:
                continue
            examples = _examples(spec, body["content"]["application/json"]["schema"])
            assert examples, f"{method.upper()} {path} has no example"
    create = _examples(
        spec, spec["paths"]["/api/v1/servers"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    )[0]
    user = await cloud.user()
    r = await cloud.client.post("/api/v1/servers", headers=user, json=create)
    assert r.status_code == 202, r.text
    server = r.json()["servers"][0]
    # Names beside ids: what the user asked for is what the representation says.
    assert (server["flavor"], server["image"]) == (create["flavor"], create["image"])
    assert server["ec2_id"].startswith("i-")
    # The admin's examples work as sent too: a user of the admin's own project, a project.
    for path in ("/api/v1/admin/users", "/api/v1/admin/projects"):
        example = _examples(spec, spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])[
            0
        ]
        r = await cloud.client.post(path, headers=cloud.admin, json=example)
        assert r.status_code == 201, (path, r.text)


async def test_over_quota_is_413_before_any_placement(cloud: Cloud) -> None:
    user = await cloud.user()  # default quotas: 40 vCPUs
    # 11 x large (4 vCPUs, 8 GiB) exceeds the vCPU quota and also the hosts' memory: the quota
    # is the answer (the user can act on it), not 503 NoCapacity.
    r = await cloud.client.post(
        "/api/v1/servers", headers=user, json={"name": "big", "flavor": "large", "image": "debian-12", "count": 11}
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "OverLimit" and r.json()["error"]["details"]["resource"] == "cpu"
    q = await cloud.quotas(user)
    assert q["vm"]["usage"] == 0 and q["cpu"]["pending"] == 0


async def test_events_record_the_real_states(cloud: Cloud) -> None:
    user = await cloud.user()
    server = await server_in(cloud, user, "STOPPED")
    events = (await cloud.client.get(f"/api/v1/servers/{server['id']}/events", headers=user)).json()["items"]
    stop = [(e["kind"], e["operstate_from"], e["operstate_to"]) for e in events if e["action"] == "stop"]
    # Asked from STARTED (no state yet), then the job took it from STARTED to STOPPED.
    assert stop == [("action", "STARTED", None), ("job_succeeded", "STARTED", "STOPPED")]
    assert not any(e["operstate_from"] == e["operstate_to"] == "STARTED" and e["action"] == "stop" for e in events)


async def test_setting_the_admin_token_rotates_the_bootstrap_token(cloud: Cloud) -> None:
    assert (await cloud.client.get("/api/v1/admin/hosts", headers=cloud.admin)).status_code == 200
    async with cloud.sessions() as session:
        await bootstrap.seed(session, admin_token="nph_rotated_admin_token_000000000")
        await session.commit()
    old = await cloud.client.get("/api/v1/admin/hosts", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    new = await cloud.client.get(
        "/api/v1/admin/hosts", headers={"Authorization": "Bearer nph_rotated_admin_token_000000000"}
    )
    assert (old.status_code, new.status_code) == (401, 200)
    users = (
        await cloud.client.get(
            "/api/v1/admin/users", headers={"Authorization": "Bearer nph_rotated_admin_token_000000000"}
        )
    ).json()["items"]
    assert [u["name"] for u in users if u["role"] == "admin"] == ["admin"]  # rotated, not a second admin


async def test_a_users_requests_read_the_caller_once_an_admins_every_time(cloud: Cloud) -> None:
    """A user found behind a token is remembered by the API (one statement fewer per request);
    an admin is read on every request, so a rotated admin token stops at once (above), and an
    unknown token is refused every time."""
    user = await cloud.user()

    def callers(sent: list[str]) -> int:
        return sum(1 for s in sent if "FROM users WHERE users.token_hash" in s)

    with statements_sent(cloud) as sent:
        for headers, expect in ((user, [1, 0, 0]), (cloud.admin, [1, 1, 1])):
            found = []
            for _ in range(3):
                sent.clear()
                assert (await cloud.client.get("/api/v1/servers", headers=headers)).status_code == 200
                found.append(callers(sent))
            assert found == expect, (headers is user, found)
        for _ in range(2):
            sent.clear()
            r = await cloud.client.get("/api/v1/servers", headers={"Authorization": "Bearer nph_nobody"})
            assert r.status_code == 401 and callers(sent) == 1
